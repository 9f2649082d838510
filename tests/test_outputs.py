"""The run's writers (training/outputs.py): TensorBoard, metrics.jsonl and an offline
W&B run, through the loop's one MetricWriter."""

import json
import struct

import numpy as np
import pytest

from ldm_jax import config_common


def _wandb_records(path):
    """The protobuf records of a W&B transaction log (.wandb): a 7-byte header, then
    32 KiB blocks of chunks (crc32, 2-byte length, type: 1 full, 2 first, 3 middle,
    4 last), LevelDB's log format."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _history(records) -> dict:
    """{step: {key: value}} of the logged history (W&B's own _runtime etc. left out; a
    logged image's fields are keys "<tag>/<field>")."""
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            step = items.pop("_step")
            out.setdefault(step, {}).update({k: v for k, v in items.items() if k[0] != "_"})
    return out


def test_an_offline_wandb_run_gets_the_scalars_images_and_config_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from ldm_jax.training import outputs

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = config_common.autoencoder_config(kind="kl", embed_dim=4, ch_mult=(1, 2),
                                              attn_resolutions=())  # fmt: skip
    config.logging.wandb = "ldm-jax-test"
    workdir = tmp_path / "run"
    workdir.mkdir()
    writer = outputs.MetricWriter(workdir, config)
    for step in (1, 2):
        writer.scalars(step, {"loss": 1.0 / step, "eval/psnr": np.float32(20 + step)})
    writer.image(2, "reconstructions", np.full((8, 8, 3), 200, np.uint8))
    writer.close()
    resumed = outputs.MetricWriter(workdir, config)  # the same run, resumed
    resumed.scalars(3, {"loss": 0.25})
    resumed.close()

    run_id = (workdir / "wandb_id").read_text().strip()
    runs = sorted((workdir / "wandb").glob(f"offline-run-*-{run_id}*"))  # "-1": same second
    assert len(runs) == 2  # one offline folder per process start, one W&B run id
    first, second = (_wandb_records(r / f"run-{run_id}.wandb") for r in runs)
    history = _history(first)
    assert history[1]["loss"] == 1.0 and history[2]["eval/psnr"] == 22.0
    assert history[2]["reconstructions/_type"] == "image-file"
    assert history[2]["reconstructions/width"] == 8
    assert list((runs[0] / "files/media/images").glob("reconstructions_2_*.png"))
    assert _history(second) == {3: {"loss": 0.25}}
    # The run's config: in its run record and any config records after it.
    configs = [r.run.config if r.WhichOneof("record_type") == "run" else r.config
               for r in first if r.WhichOneof("record_type") in ("run", "config")]  # fmt: skip
    logged = {i.key: json.loads(i.value_json) for c in configs for i in c.update}
    assert logged["logging"]["wandb"] == "ldm-jax-test" and logged["stage"] == "autoencoder"
    # TensorBoard and metrics.jsonl got the same scalars as always.
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert rows == [{"step": 1, "loss": 1.0, "eval/psnr": 21.0},
                    {"step": 2, "loss": 0.5, "eval/psnr": 22.0}, {"step": 3, "loss": 0.25}]  # fmt: skip
    assert list((workdir / "tb").glob("events.out.tfevents.*"))


def test_without_a_project_no_wandb_run_starts(tmp_path):
    from ldm_jax.training import outputs

    config = config_common.autoencoder_config(kind="kl", embed_dim=4, ch_mult=(1, 2),
                                              attn_resolutions=())  # fmt: skip
    writer = outputs.MetricWriter(tmp_path, config)
    writer.scalars(1, {"loss": 1.0})
    writer.close()
    assert [type(s).__name__ for s in writer.sinks] == ["_TensorBoard", "_JsonLines"]
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_id").exists()
