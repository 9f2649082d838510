"""A folder of images -> a TFDS dataset (ldm_jax.data.folder via ldm_jax.data.prepare):
what is stored, determinism, resuming an interrupted build, bad folders, and training."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import folder as folder_lib
from ldm_jax.data.datasets import open_source
from ldm_jax.data.prepare import main as prepare_main

CLASSES = ("cat", "dog", "fox")


def _write_folder(root, count=24, start=0):
    """Class subfolders of RGB JPEGs, with every fifth image a grey PNG; a metadata.jsonl
    captions them. Returns {relative path: (label, caption)}."""
    rng = np.random.default_rng(start)
    truth = {}
    for i in range(start, start + count):
        name = CLASSES[i % 3]
        (root / name).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (36 + i % 7, 40, 3), dtype=np.uint8)
        if i % 5 == 0:
            rel = f"{name}/{i:03d}.png"
            Image.fromarray(pixels[:, :, 0]).save(root / rel)
        else:
            rel = f"{name}/{i:03d}.jpg"
            Image.fromarray(pixels).save(root / rel, quality=90)
        truth[rel] = (i % 3, f"a {name}, picture {i}")
    with open(root / "metadata.jsonl", "a") as f:
        for rel, (_, caption) in truth.items():
            f.write(json.dumps({"file_name": rel, "text": caption}) + "\n")
    return truth


def _prepare(*args):
    return prepare_main([str(a) for a in args])


def _shard_bytes(version_dir):
    return {p.name: p.read_bytes() for p in sorted(version_dir.glob("*.array_record-*"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folder")
    truth = _write_folder(tmp / "images")
    data_dir = tmp / "data"
    assert _prepare("--folder", tmp / "images", "--name", "pets", "--data_dir", data_dir,
                    "--test_fraction", "0.25") == 0  # fmt: skip
    return tmp, truth, data_dir


def test_every_image_is_stored_once_with_its_label_caption_and_pixels(built):
    tmp, truth, data_dir = built
    seen = {}
    for split in ("train", "test"):
        source = open_source("pets", split, str(data_dir))
        assert source.builder.info.features["label"].names == sorted(CLASSES)
        for i in range(len(source)):
            ex = source[i]
            seen[ex["file_name"]] = split
            label, caption = truth[ex["file_name"]]
            assert (ex["label"], ex["caption"]) == (label, caption)
            original = np.asarray(Image.open(tmp / "images" / ex["file_name"]).convert("RGB"))
            # JPEG bytes are kept as they are and a grey PNG becomes RGB: the same pixels.
            np.testing.assert_array_equal(ex["image"], original)
    assert set(seen) == set(truth)
    assert 0 < list(seen.values()).count("test") < len(truth)


def test_rgb_jpegs_are_kept_byte_for_byte_and_other_images_become_rgb_png():
    rgb = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(rgb, format="JPEG")
    assert folder_lib.stored_image(rgb.getvalue(), "x.jpg") == rgb.getvalue()
    rgba = io.BytesIO()
    Image.new("RGBA", (8, 6), (10, 200, 30, 7)).save(rgba, format="WEBP", lossless=True)
    stored = Image.open(io.BytesIO(folder_lib.stored_image(rgba.getvalue(), "x.webp")))
    assert (stored.format, stored.mode, stored.size) == ("PNG", "RGB", (8, 6))
    assert stored.getpixel((3, 3)) == (10, 200, 30)


def test_a_rebuild_is_byte_identical_and_new_images_move_no_old_one(built, tmp_path):
    tmp, truth, data_dir = built
    again = tmp_path / "again"
    assert _prepare("--folder", tmp / "images", "--name", "pets", "--data_dir", again,
                    "--test_fraction", "0.25") == 0  # fmt: skip
    assert _shard_bytes(again / "pets/1.0.0") == _shard_bytes(data_dir / "pets/1.0.0")

    grown = tmp_path / "grown"
    for rel in truth:
        (grown / rel).parent.mkdir(parents=True, exist_ok=True)
        (grown / rel).write_bytes((tmp / "images" / rel).read_bytes())
    (grown / "metadata.jsonl").write_bytes((tmp / "images/metadata.jsonl").read_bytes())
    _write_folder(grown, count=12, start=100)
    entries, _, _ = folder_lib.scan(grown)

    def split_of(plan):
        return {e.file: s for s, shards in plan.items() for shard in shards for e in shard}

    before = split_of(folder_lib.plan_splits(folder_lib.scan(tmp / "images")[0], 0.25))
    after = split_of(folder_lib.plan_splits(entries, 0.25))
    assert len(after) == len(truth) + 12
    assert {f: after[f] for f in before} == before


def test_an_interrupted_build_resumes_from_its_whole_shards(built, tmp_path, monkeypatch):
    tmp, _, data_dir = built
    monkeypatch.setattr(folder_lib, "SHARD_EXAMPLES", 4)  # several shards per split
    written = []
    real_write = folder_lib._write_shard

    def cut_off(records):
        for n, record in enumerate(records):
            if n == 2:
                raise KeyboardInterrupt
            yield record

    def write_then_stop(path, records):
        if len(written) == 3:  # the fourth shard is cut off mid-write
            real_write(path, cut_off(records))
        real_write(path, records)
        written.append(path.name)

    monkeypatch.setattr(folder_lib, "_write_shard", write_then_stop)
    out = tmp_path / "data"
    args = (tmp / "images", "pets", out)
    with pytest.raises(KeyboardInterrupt):
        folder_lib.build(*args, test_fraction=0.25)
    assert not (out / "pets/1.0.0").exists()  # nothing appears before it is whole
    assert len(list((out / "pets/1.0.0.incomplete").glob("*.partial"))) == 1
    monkeypatch.setattr(folder_lib, "_write_shard", real_write)
    lines = []
    folder_lib.build(*args, test_fraction=0.25, log=lines.append)
    assert lines[0].startswith("resuming")
    shard_lines = [line for line in lines if " shard " in line]
    total = len(list((out / "pets/1.0.0").glob("*.array_record-*")))
    assert len(shard_lines) == total - 3  # the three whole shards were not rewritten
    clean = tmp_path / "clean"
    folder_lib.build(tmp / "images", "pets", clean, test_fraction=0.25)
    assert _shard_bytes(out / "pets/1.0.0") == _shard_bytes(clean / "pets/1.0.0")
    assert open_source("pets", "train", str(out)).builder.info.splits["train"].num_shards > 1


@pytest.mark.parametrize(
    "case, expected",
    [
        ("mixed", "mixes top-level images"),
        ("uncaptioned", "have no caption"),
        ("changed", "holds another build"),
        ("broken", "not a readable image"),
    ],
)
def test_bad_folders_fail_in_one_line_and_change_nothing(built, tmp_path, capsys, case, expected):
    tmp, _, data_dir = built
    images = tmp_path / "images"
    _write_folder(images, count=6)
    target = tmp_path / "data"
    if case == "mixed":
        Image.new("RGB", (9, 9)).save(images / "loose.png")
    elif case == "uncaptioned":
        Image.new("RGB", (9, 9)).save(images / "cat" / "new.png")
    elif case == "changed":
        target = data_dir  # 'pets' there was built from another folder
    else:
        (images / "dog" / "bad.png").write_bytes(b"not a png")
        (images / "metadata.jsonl").open("a").write('{"file_name": "dog/bad.png", "text": "x"}\n')
    before = sorted(p.relative_to(target) for p in target.rglob("*")) if target.exists() else []
    with pytest.raises(SystemExit) as exit_info:
        _prepare("--folder", images, "--name", "pets", "--data_dir", target)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1
    if case != "broken":  # a broken image is found while writing: only its build dir exists
        after = sorted(p.relative_to(target) for p in target.rglob("*")) if target.exists() else []
        assert after == before


def test_a_folder_dataset_trains_an_autoencoder(built, tmp_path):
    from toy import AE_CONFIG, run_module

    _, _, data_dir = built
    workdir = tmp_path / "run"
    proc = run_module(
        "ldm_jax.train", f"--config={AE_CONFIG}", f"--workdir={workdir}",
        "--config.data.name=pets", f"--config.data.data_dir={data_dir}",
        "--config.data.resize=32", "--config.train.num_steps=2",
        "--config.train.progress_bar=False",
    )  # fmt: skip
    assert (workdir / "checkpoints" / "2").is_dir(), proc.stdout[-2000:]
    losses = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in losses if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["loss"]) for r in train)
    # The held-out evaluation read the folder's test split.
    assert any(np.isfinite(r.get("eval/lpips", np.nan)) for r in losses)
