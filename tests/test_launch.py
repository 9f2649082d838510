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
    install, *script = gpu.stdout.splitlines()
    assert (
        install == f"bash {ROOT}/scripts/install.sh --venv .venv --accelerator cuda12 --extras ''"
    )
    script = "\n".join(script)
    check = "srun --ntasks-per-node=1 .venv/bin/python -m ldm_jax.accelerator --expect gpu"
    train = "srun --kill-on-bad-exit=1 .venv/bin/python -m ldm_jax.train " + " ".join(TRAIN)
    assert f"{check} --min_devices 1\n" in script and train in script
    assert script.index(check) < script.index(train)  # no training unless the GPUs are there
    node = _run("bash", "launch/slurm.sh", "--per", "node", "--accelerator", "cuda13",
                "--no_install", "--dry_run", "--", *TRAIN)  # fmt: skip
    assert "#SBATCH --ntasks-per-node=1" in node.stdout and "--gpus-per-node=8" in node.stdout
    assert f"{check} --min_devices 8\n" in node.stdout and "install.sh" not in node.stdout
    bad = _run("bash", "launch/slurm.sh", "--per", "socket", "--dry_run", "--", *TRAIN)
    assert bad.returncode == 2 and "--per must be" in bad.stderr


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
    out = _run("bash", "launch/tpu_pod.sh", "--tpu", "v4-32", "--zone", "us-central2-b",
               "--dry_run", "--", *TRAIN)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("gcloud compute tpus tpu-vm") for line in lines)
    assert all("--worker=all" in line for line in lines)
    assert "constraints.txt" in lines[1] and "scripts" in lines[1]  # what install.sh reads
    install = "bash\\ scripts/install.sh\\ --accelerator\\ tpu\\ --extras\\ gcs"
    check = ".venv/bin/python\\ -m\\ ldm_jax.accelerator\\ --expect\\ tpu"
    assert lines[-1].index(install) < lines[-1].index(check) < lines[-1].index("ldm_jax.train")
    missing = _run("bash", "launch/tpu_pod.sh", "--dry_run", "--", *TRAIN)
    assert missing.returncode == 2 and "--tpu NAME and --zone ZONE are required" in missing.stderr


def test_install_dry_run_pins_every_install_to_the_constraints():
    """The one install script (setup_env.sh, the TPU launcher and the SLURM launcher call
    it): each pip command reads constraints.txt, whose jax pin the accelerator's plugin
    takes; bad options are refused in one line."""
    out = _run("bash", "scripts/install.sh", "--accelerator", "tpu", "--extras", "gcs",
               "--venv", "/nonexistent/venv", "--dry_run")  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "python3 -m venv /nonexistent/venv"
    pips = [line for line in lines if " install " in line and "--upgrade pip" not in line]
    assert pips and all("-c constraints.txt" in line for line in pips)
    jax_pin = next(
        p for p in (ROOT / "constraints.txt").read_text().split() if p.startswith("jax==")
    )
    assert f"jax\\[tpu\\]=={jax_pin[5:]}" in out.stdout and "-e .\\[gcs\\]" in out.stdout
    cpu = _run("bash", "scripts/install.sh", "--venv", "/nonexistent/venv", "--dry_run")
    assert "jax\\[" not in cpu.stdout and "constraints.txt -e .\n" in cpu.stdout
    for bad, says in ((["--accelerator", "rocm"], "--accelerator must be"),
                      (["--extras", "test gcs"], "--extras takes names")):  # fmt: skip
        got = _run("bash", "scripts/install.sh", *bad, "--dry_run")
        assert got.returncode == 2 and got.stderr.count("\n") == 1 and says in got.stderr


def test_setup_cfg_states_ranges_that_admit_the_constraints():
    """setup.cfg asks for ranges (ldm_jax installs beside other packages); constraints.txt
    pins one version of each, which those ranges admit."""
    import configparser

    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    reqs = cfg["options"]["install_requires"].split("\n")
    for extra in cfg["options.extras_require"].values():
        reqs += extra.split("\n")
    reqs = [Requirement(r) for r in reqs if r.strip() and not r.startswith("#")]
    assert len(reqs) > 20
    for req in reqs:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[name]), (req, pins[name])
        assert not str(req.specifier).startswith("=="), f"{req}: state a range in setup.cfg"


def test_accelerator_check_refuses_a_missing_kind_in_one_line():
    """`python -m ldm_jax.accelerator --expect tpu` on this CPU machine: exit 2 and one line
    naming what JAX sees and the install that fixes it; --expect cpu passes."""
    import os

    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"
    )
    run = lambda *a: subprocess.run([sys.executable, "-m", "ldm_jax.accelerator", *a], cwd=ROOT,
                                    env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    for kind, fix in (("tpu", "--accelerator tpu"), ("gpu", "--accelerator cuda12")):
        out = run("--expect", kind)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert f"asked for {kind} but JAX sees 2 x cpu" in out.stderr and fix in out.stderr
    ok = run("--expect", "cpu", "--min_devices", "2")
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 2 x cpu"), ok.stdout + ok.stderr
    few = run("--expect", "cpu", "--min_devices", "4")
    assert few.returncode == 2 and "at least 4 cpu devices" in few.stderr
