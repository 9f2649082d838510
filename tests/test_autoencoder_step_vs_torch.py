"""bench/autoencoder_step_vs_torch.py: at a toy size (16-channel autoencoder, 32^2), one
step of ldm_jax's first-stage task equals the PyTorch twin's (diffusers' AutoencoderKL,
the bench's LPIPS-VGG16 and PatchGAN) in both torch styles, judged against torch in fp64:
losses, every gradient, and the adaptive weight."""

import importlib.util
import pathlib

from helpers import torch_with_diffusers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "autoencoder_step_vs_torch", ROOT / "bench" / "autoencoder_step_vs_torch.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_step_equals_torch():
    torch_with_diffusers()
    r = _bench().check(32, 2, ("reference", "composed"), tiny=True)
    assert r["tensors"] > 100
    assert r["max_loss_rel"] <= 1e-4, r["ldm_jax_vs_fp64"]
    assert r["max_grad_rel"] <= 1e-3, r["ldm_jax_grad_vs_fp64"]
    for style in ("reference", "composed"):
        assert max(r[f"ldm_jax_vs_torch_{style}"].values()) <= 1e-3
        assert r[f"torch_{style}_max_grad_rel_vs_fp64"] <= 1e-3
