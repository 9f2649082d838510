"""ldm_jax.storage on local paths (the gs:// side runs end to end in
test_remote_storage.py): URLs kept as they are, atomic writes, the append-only log and the
tree copy."""

import os

from ldm_jax import storage


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(storage.path("gs://bucket/runs/x")) == "gs://bucket/runs/x"
    assert storage.is_remote("gs://bucket/x") and not storage.is_remote("runs/x")
    assert str(storage.path("runs/x")) == str(tmp_path / "runs" / "x")
    assert str(storage.path("~/x")) == os.path.expanduser("~/x")
    assert not (tmp_path / "runs").exists()  # making a path writes nothing
    mirror = storage.local_mirror("gs://bucket/a/b/")
    assert str(mirror).endswith(os.path.join("gs", "bucket", "a", "b"))


def test_atomic_writes_log_lines_and_tree_copies(tmp_path):
    target = tmp_path / "out" / "report.json"
    target.parent.mkdir()
    storage.write_atomic(target, "{}\n")
    storage.write_atomic(target, '{"a": 1}\n')
    assert target.read_text() == '{"a": 1}\n'
    assert os.listdir(target.parent) == ["report.json"]  # no temporary file left behind
    for lines in (["1\n", "2\n"], ["3\n"]):  # a second LineLog on the file appends to it
        log = storage.LineLog(tmp_path / "log.jsonl")
        for line in lines:
            log.write(line)
            assert (tmp_path / "log.jsonl").read_text().endswith(line)  # flushed at once
        log.close()
    assert (tmp_path / "log.jsonl").read_text() == "1\n2\n3\n"
    (tmp_path / "src" / "deep").mkdir(parents=True)
    (tmp_path / "src" / "deep" / "a.bin").write_bytes(bytes(range(256)) * 1000)
    (tmp_path / "src" / "b.txt").write_text("b")
    storage.copy_tree(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst" / "deep" / "a.bin").read_bytes() == bytes(range(256)) * 1000
    assert (tmp_path / "dst" / "b.txt").read_text() == "b"
