"""The launch scripts' dry runs print exactly what they would run; bad input is refused."""

import subprocess
import sys

from toy import ROOT

TRAIN = ["--config", "configs/diffusion/cin256_ldm4_g.py", "--workdir", "/shared/runs/x"]


def _run(*cmd):
    return subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_local_dry_run_gives_each_rank_its_coordinates():
    out = _run(
        sys.executable, "launch/local.py", "--num_processes=3", "--devices_per_process=2",
        "--port=9999", "--dry_run", "--", "python", "-m", "ldm_jax.train", *TRAIN,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    for rank, line in enumerate(lines):
        assert "LDM_JAX_COORDINATOR=127.0.0.1:9999" in line
        assert "LDM_JAX_NUM_PROCESSES=3" in line and f"LDM_JAX_PROCESS_ID={rank}" in line
        assert "xla_force_host_platform_device_count=2" in line
        assert line.endswith("python -m ldm_jax.train " + " ".join(TRAIN))


def test_slurm_dry_run_prints_the_batch_script():
    gpu = _run("bash", "launch/slurm.sh", "--nodes", "4", "--gpus_per_node", "8", "--dry_run",
               "--", *TRAIN)  # fmt: skip
    assert gpu.returncode == 0, gpu.stderr
    assert "#SBATCH --nodes=4" in gpu.stdout and "#SBATCH --ntasks-per-node=8" in gpu.stdout
    assert "#SBATCH --gpus-per-task=1" in gpu.stdout and "--signal=TERM@120" in gpu.stdout
    assert "srun --kill-on-bad-exit=1 .venv/bin/python -m ldm_jax.train " + " ".join(TRAIN) in (
        gpu.stdout
    )
    node = _run("bash", "launch/slurm.sh", "--per", "node", "--dry_run", "--", *TRAIN)
    assert "#SBATCH --ntasks-per-node=1" in node.stdout and "--gpus-per-node=8" in node.stdout
    bad = _run("bash", "launch/slurm.sh", "--per", "socket", "--dry_run", "--", *TRAIN)
    assert bad.returncode == 2 and "--per must be" in bad.stderr


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
    out = _run("bash", "launch/tpu_pod.sh", "--tpu", "v4-32", "--zone", "us-central2-b",
               "--dry_run", "--", *TRAIN)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("gcloud compute tpus tpu-vm") for line in lines)
    assert all("--worker=all" in line for line in lines)
    assert "jax\\[tpu\\]==0.10.2" in lines[-1] and "ldm_jax.train" in lines[-1]
    missing = _run("bash", "launch/tpu_pod.sh", "--dry_run", "--", *TRAIN)
    assert missing.returncode == 2 and "--tpu NAME and --zone ZONE are required" in missing.stderr
