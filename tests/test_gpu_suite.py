"""bench/gpu_suite.py: the batch search's logic (fake steps, no compiling) and each section
end to end at toy sizes on the CPU (figures positive and finite, the JSON's keys)."""

import dataclasses
import importlib.util
import json
import math
import pathlib
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
gpu_suite = importlib.util.module_from_spec(_spec)
sys.modules["gpu_suite"] = gpu_suite  # dataclasses look their module up there
_spec.loader.exec_module(gpu_suite)

GIB = 2**30


def _oom():
    return jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")


def _fake(fits_up_to: int, base_gib: float = 10.0, gib_per_image: float = 1.0):
    """A measure that runs out of memory above `fits_up_to`, and its probes' footprints."""
    calls = []

    def measure(b):
        calls.append(b)
        if b > fits_up_to:
            raise _oom()
        return {"batch": b, "images_per_sec": 10.0 * b, "step_s": 0.1}

    def footprints(batches):
        return [int((base_gib + gib_per_image * b) * GIB) for b in batches]

    return measure, footprints, calls


def test_is_oom():
    assert gpu_suite.is_oom(_oom()) and gpu_suite.is_oom(MemoryError())
    assert not gpu_suite.is_oom(ValueError("shapes do not match"))


def test_search_predicts_then_steps_back():
    # Fits 10 + b GiB; the limit 150 GiB x 0.9 predicts 125 -> 120; only 100 really fits.
    measure, footprints, calls = _fake(fits_up_to=100)
    best, tried = gpu_suite.search_batch(
        measure, start=8, max_batch=1024, limit=150 * GIB, footprints=footprints, log=lambda s: 0
    )
    assert tried[0]["predicted_batch"] == 125
    assert calls == [120, 96]  # 120 x 0.85 = 102 -> 96 (multiples of 8)
    assert best["batch"] == 96
    assert [t["status"] for t in tried[1:]] == ["oom", "ok"]


def test_search_doubles_without_a_limit():
    measure, _, calls = _fake(fits_up_to=40)
    best, _ = gpu_suite.search_batch(
        measure, start=8, max_batch=1024, limit=None, footprints=None, log=lambda s: 0
    )
    assert calls == [8, 16, 32, 64, 48] and best["batch"] == 32  # 48 > 40: 32 stays
    measure, _, calls = _fake(fits_up_to=1000)
    best, _ = gpu_suite.search_batch(
        measure, start=1, max_batch=4, limit=None, footprints=None, log=lambda s: 0
    )
    assert calls == [1, 2, 4] and best["batch"] == 4


def test_search_reraises_other_errors():
    def measure(b):
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError):
        gpu_suite.search_batch(
            measure, start=1, max_batch=2, limit=None, footprints=None, log=lambda s: 0
        )


# The CLI's --tiny sizes, fewer of everything: one batch, one timed step, 2 DDIM steps.
SMALL = dataclasses.replace(
    gpu_suite.TINY,
    max_batch=1,
    train_steps=1,
    txt2img_batches=(1,),
    ddim_steps=2,
    vae_steps=1,
)
FIGURES = {
    "unet": ("images_per_sec", "step_s", "flops_per_step", "mfu", "attention_flops_per_step"),
    "txt2img": (),
    "vae": ("images_per_sec", "step_s"),
}


def _positive_finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.parametrize("section", gpu_suite.SECTIONS)
def test_section_runs_at_toy_size(section, tmp_path):
    out = tmp_path / "results.json"
    args = gpu_suite.build_parser().parse_args(
        ["--tiny", "--only", section, "--out", str(out), "--peak_flops", "1e11"]
    )
    lines = []
    gpu_suite.run(args, log=lines.append, sizes=SMALL)
    results = json.loads(out.read_text())
    assert {"device", "jax", "tiny", "goals", "references", "total_s", section} <= set(results)
    r = results[section]
    for key in FIGURES[section]:
        assert _positive_finite(r[key]), (key, r[key])
    if section == "txt2img":
        (row,) = r["by_batch"]
        assert row["batch"] == 1 and row["finite"]
        assert all(_positive_finite(row[k]) for k in ("s_per_image", "images_per_sec"))
    text = "\n".join(lines)
    assert "| --- |" in text and "tiny sizes" in text  # the markdown table was printed
