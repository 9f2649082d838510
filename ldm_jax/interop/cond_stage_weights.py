"""Conditioning encoders of the CompVis LDM releases (`cond_stage_model.*`) -> ldm_jax params.

BERTEmbedder: `cond_stage_model.transformer` is the x-transformers TransformerWrapper that
latent-diffusion vendored (ldm/modules/x_transformer.py, x-transformers 0.8's module
tree). Its Encoder of depth n holds 2n layers, attention and feed-forward in turn, each
`[pre-norm, block, residual]`; ldm_jax's TransformerEncoder pairs them per block:

    token_emb.weight                              token_emb/embedding
    pos_emb.emb.weight                            pos_emb/embedding
    attn_layers.layers.{2i}.0                     layers_i/attn_norm
    attn_layers.layers.{2i}.1.to_{q,k,v,out}      layers_i/to_{q,k,v,out}
    attn_layers.layers.{2i+1}.0                   layers_i/ff_norm
    attn_layers.layers.{2i+1}.1.net.{0.0,2}       layers_i/ff_{in,out}
    norm                                          norm
    to_logits                                     (unused: the context is the embeddings)

ClassEmbedder: `cond_stage_model.embedding.weight`, one row per class. ldm_jax's
ClassEmbedder holds one row more, its learned null class (row n_classes). SpatialRescaler:
`cond_stage_model.channel_mapper.weight`, a 1x1 conv [out, classes, 1, 1].
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import UserError
from ldm_jax.interop.mapping import abstract_params, import_state, named_table, torch_leaf
from ldm_jax.models.conditioning import ClassEmbedder, SpatialRescaler, TransformerEncoder

COND_PREFIX = "cond_stage_model."
BERT_PREFIX = COND_PREFIX + "transformer."
_ATTENTION = {"attn_norm": "0", "to_q": "1.to_q", "to_k": "1.to_k", "to_v": "1.to_v",
              "to_out": "1.to_out"}  # fmt: skip
_FEED_FORWARD = {"ff_norm": "0", "ff_in": "1.net.0.0", "ff_out": "1.net.2"}


def _bert_name(path: tuple[str, ...]) -> str:
    """An ldm_jax TransformerEncoder param path -> its vendored x-transformers name."""
    module, leaf = path[0], torch_leaf(path)
    if module == "token_emb":
        return f"token_emb.{leaf}"
    if module == "pos_emb":
        return f"pos_emb.emb.{leaf}"
    if module == "norm":
        return f"norm.{leaf}"
    block = int(module.removeprefix("layers_"))
    sub = path[1]
    if sub in _ATTENTION:
        return f"attn_layers.layers.{2 * block}.{_ATTENTION[sub]}.{leaf}"
    return f"attn_layers.layers.{2 * block + 1}.{_FEED_FORWARD[sub]}.{leaf}"


def transformer_from_compvis(
    state: Mapping[str, np.ndarray], module: TransformerEncoder, prefix: str = BERT_PREFIX
) -> dict:
    """{'params': ...} of `module` from a BERTEmbedder's transformer tensors (under
    `prefix`), every shape checked; the unused `to_logits` head is skipped."""
    tokens = jnp.zeros((1, module.max_seq_len), jnp.int32)
    abstract = abstract_params(module, tokens)
    table = named_table(abstract, lambda path: prefix + _bert_name(path))
    return import_state(
        state, table, abstract, what="BERTEmbedder (x-transformers layout)", prefix=prefix,
        ignore_prefixes=(prefix + "to_logits.",),
        hint="Its n_embed, n_layer, vocab_size and max_seq_len come from cond_stage_config.",
    )  # fmt: skip


def _tensor(state: Mapping[str, np.ndarray], name: str, what: str) -> np.ndarray:
    if name not in state:
        raise UserError(f"{what}: the checkpoint has no tensor {name!r}")
    return np.asarray(state[name], np.float32)


def class_table_from_compvis(state: Mapping[str, np.ndarray], module: ClassEmbedder) -> dict:
    """{'params': ...} of `module` from a ClassEmbedder's table. A table of n_classes + 1
    rows ends in a learned null class (cin256-v2: 1001 rows for ImageNet's 1000 classes),
    which becomes ldm_jax's null row as it is; a table of n_classes rows never learned
    one, and its null row is zeros (such a release samples unguided)."""
    table = _tensor(state, COND_PREFIX + "embedding.weight", "ClassEmbedder")
    n, width = module.n_classes, module.embed_dim
    if table.shape not in ((n, width), (n + 1, width)):
        raise UserError(
            f"ClassEmbedder: tensor 'cond_stage_model.embedding.weight' has shape "
            f"{table.shape} but cond_stage_config describes {n} classes of {width}"
        )
    if table.shape[0] == n:
        table = np.concatenate([table, np.zeros((1, width), np.float32)])
    return {"params": {"embedding": {"embedding": table}}}


def rescaler_from_compvis(state: Mapping[str, np.ndarray], module: SpatialRescaler) -> dict:
    """{'params': ...} of `module` from a SpatialRescaler's bias-free 1x1 conv."""
    weight = _tensor(state, COND_PREFIX + "channel_mapper.weight", "SpatialRescaler")
    want = (module.out_channels, module.n_classes, 1, 1)
    if weight.shape != want:
        raise UserError(
            f"SpatialRescaler: tensor 'cond_stage_model.channel_mapper.weight' has shape "
            f"{weight.shape} but cond_stage_config describes {want}"
        )
    if COND_PREFIX + "channel_mapper.bias" in state:
        raise UserError("SpatialRescaler: the checkpoint's channel_mapper has a bias (bias: True)")
    return {"params": {"channel_mapper": weight[:, :, 0, 0].T}}  # [classes, out]
