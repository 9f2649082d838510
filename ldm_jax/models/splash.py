"""Self-attention through the TPU's Pallas splash (flash) attention kernel.

SD's 64x64 latents are 4096-token self-attention: XLA's dense form keeps the whole
[B, H, 4096, 4096] score matrix in HBM, the kernel streams it through VMEM in blocks.
Used by `attention(impl="auto")` on TPU where it applies (`supported`): no mask, as many
keys as queries, a sequence of at least SPLASH_MIN_TOKENS in whole blocks. Cross-attention
over a few context tokens stays with XLA. On other backends the same kernel runs in Pallas
interpret mode (how the tests check it against the plain form, values and gradients).

Layout: the kernel takes one example's [H, L, D] (vmapped over the batch) with D a
multiple of 128 on the TPU's lanes, so SD's head dims 40 / 64 / 80 are zero-padded to 128
and 160 to 256 (zero columns of q and k add nothing to the logits, those of v give zero
outputs, sliced off). Blocks: 512 queries x 512 keys for a padded D of 128 (a 1 MiB fp32
score tile), 256 x 256 for 256, smaller where the sequence needs it. Under a mesh the
kernel runs per shard (shard_map): the batch split over data x fsdp, the heads over
tensor, as the UNet's activations are. These sizes follow the kernel's VMEM budget; they
are not yet tuned on a TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

SPLASH_MIN_TOKENS = 1024
_LANES = 128


def supported(q: jax.Array, k: jax.Array, mask) -> bool:
    """Whether q [B, Lq, H, D] and k [B, Lk, H, D] fit the kernel as used here."""
    lq, lk = q.shape[1], k.shape[1]
    return mask is None and lq == lk and lq >= SPLASH_MIN_TOKENS and lq % _LANES == 0


def padded_head_dim(d: int) -> int:
    return -(-d // _LANES) * _LANES


def block_size(seq_len: int, padded_d: int) -> int:
    """The kernel's query and key block: 512 for D <= 128, 256 above, halved until it
    divides the sequence (at least 128: supported() asks for whole lanes)."""
    block = 512 if padded_d <= _LANES else 256
    while seq_len % block:
        block //= 2
    return block


def _kernel(heads: int, seq_len: int, block: int, interpret: bool):
    """Made inside each trace: the kernel holds its block-mask arrays as jax arrays."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.FullMask((seq_len, seq_len)) for _ in range(heads)])
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return sk.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _per_shard(q, k, v):
    """q/k/v [B, H, L, Dp] (q already scaled) -> [B, H, L, Dp], on one device's shard."""
    _, h, length, dp = q.shape
    kernel = _kernel(h, length, block_size(length, dp), jax.default_backend() != "tpu")
    return jax.vmap(kernel)(q, k, v)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(QK^T / sqrt(D)) V for q/k/v [B, L, H, D] -> [B, L, H, D] (see module doc)."""
    from ldm_jax.parallel import mesh as mesh_lib

    d = q.shape[-1]
    dp = padded_head_dim(d)

    def prepare(x, scale=1.0):  # [B, L, H, D] -> [B, H, L, Dp]
        x = (x * scale).astype(x.dtype).transpose(0, 2, 1, 3)
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, dp - d)))

    qt, kt, vt = prepare(q, d**-0.5), prepare(k), prepare(v)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        out = _per_shard(qt, kt, vt)
    else:
        spec = mesh_lib.fit_spec(P(mesh_lib.BATCH_AXES, "tensor"), qt.shape, mesh)
        run = jax.shard_map(
            _per_shard, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False
        )
        out = run(qt, kt, vt)
    return out[..., :d].transpose(0, 2, 1, 3).astype(q.dtype)
