#!/usr/bin/env bash
# Bench-only venv with diffusers' Flax UNet (FlaxUNet2DConditionModel), for
# bench/unet_vs_diffusers.py. Kept apart from .venv: diffusers >= 0.40 has no Flax models,
# and the main venv pins diffusers 0.42 as the PyTorch test reference.
#   bash bench/setup_diffusers_flax_env.sh [VENV_DIR]   # default .venv-bench-flax
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-bench-flax}"
# The same jax/jaxlib as the main venv, so both JAX sides run the same XLA.
jax_version="$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# diffusers 0.32 still imports huggingface_hub names that 1.x dropped; flax 0.12.8 is the
# main venv's and runs diffusers 0.32's linen modules unchanged (checked below).
"$venv/bin/pip" install -q "jax==$jax_version" "jaxlib==$jax_version" flax==0.12.8 \
  diffusers==0.32.2 "huggingface-hub>=0.23.2,<0.28" numpy
"$venv/bin/python" - <<'PY'
import jax
import jax.numpy as jnp
from diffusers import FlaxUNet2DConditionModel

unet = FlaxUNet2DConditionModel(
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8,
)
params = unet.init_weights(jax.random.PRNGKey(0))
out = unet.apply({"params": params}, jnp.zeros((1, 4, 8, 8)), jnp.ones((1,)), jnp.zeros((1, 3, 32)))
assert out.sample.shape == (1, 4, 8, 8), out.sample.shape
print(f"FlaxUNet2DConditionModel OK (jax {jax.__version__})")
PY
