"""CLIPTextEncoder params <-> PyTorch state dicts: transformers and OpenCLIP naming.

Converters take numpy state dicts in transformers naming (also SD 1.x CompVis checkpoints
under `cond_stage_model.transformer.`, diffusers `text_encoder/`) or OpenCLIP naming (SD
2.x CompVis checkpoints under `cond_stage_model.model.`), and export back to transformers
naming. ldm_jax's names are transformers' with dots as underscores
(`encoder.layers.3.self_attn.q_proj` -> `layers_3/self_attn/q_proj`); OpenCLIP fuses q, k,
v into one `in_proj`. A text tower's shape comes from a transformers CLIPTextConfig with
`clip_from_hf_config`.
"""

from __future__ import annotations

from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.errors import UserError
from ldm_jax.models.clip import ACTIVATIONS, CLIPTextEncoder


def clip_from_hf_config(config: dict, **kwargs) -> CLIPTextEncoder:
    """CLIPTextEncoder (output "last") from a transformers CLIPTextConfig dict (config.json).

    diffusers' SD 2 text_encoder has 23 layers: its last layer is SD 2's penultimate one.
    """
    act = config.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} unsupported (one of {ACTIVATIONS})")
    return CLIPTextEncoder(
        width=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        mlp_dim=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        context_length=config["max_position_embeddings"],
        activation=act,
        layer_norm_eps=config.get("layer_norm_eps", 1e-5),
        **kwargs,
    )


# transformers module path (under the prefix) -> our path, for the parts outside the blocks.
_TOP = {
    "embeddings.token_embedding": ("token_embedding",),
    "embeddings.position_embedding": ("position_embedding",),
    "final_layer_norm": ("final_layer_norm",),
}
_LAYER_PARTS = (
    "layer_norm1",
    "layer_norm2",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
# Leaf names: torch weight/bias -> flax, by the kind of module that holds them.
_LEAVES = {
    "embedding": {"weight": "embedding"},
    "layer_norm": {"weight": "scale", "bias": "bias"},
    "linear": {"weight": "kernel", "bias": "bias"},
}
_HF_IGNORED = ("embeddings.position_ids",)  # a buffer, in older checkpoints only
# OpenCLIP tensors the SD text encoder does not use (pooling projection, the image tower).
_OPEN_CLIP_IGNORED = ("text_projection", "logit_scale", "attn_mask", "visual.")
# OpenCLIP resblock part -> transformers layer part.
_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _kind(path: tuple[str, ...]) -> str:
    if path[-1] in ("token_embedding", "position_embedding"):
        return "embedding"
    return "layer_norm" if "norm" in path[-1] else "linear"


def _expected_shapes(module: CLIPTextEncoder) -> dict[tuple[str, ...], tuple[int, ...]]:
    init = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    flat = traverse_util.flatten_dict(nn.meta.unbox(init["params"]))
    return {path: tuple(x.shape) for path, x in flat.items()}


def _layer_index(name: str, index: str, module: CLIPTextEncoder) -> int | None:
    """Block index of a tensor name; None for the unused last block of output="penultimate"."""
    if not index.isdigit():
        raise UserError(f"unexpected tensor {name!r} in a CLIP text encoder state dict")
    i = int(index)
    if i >= module.num_layers:
        raise UserError(f"tensor {name!r} is beyond the {module.num_layers} layers configured")
    return None if i >= module.num_built_layers else i


def _hf_path(rest: str, name: str, module: CLIPTextEncoder) -> tuple[str, ...] | None:
    """transformers name without prefix (e.g. `encoder.layers.0.mlp.fc1.weight`) -> flax
    path, or None for a tensor the model does not use."""
    owner, _, leaf = rest.rpartition(".")
    if owner in _TOP:
        path = _TOP[owner]
    else:
        parts = owner.split(".")
        part = ".".join(parts[3:])
        if parts[:2] != ["encoder", "layers"] or len(parts) < 4 or part not in _LAYER_PARTS:
            raise UserError(f"unexpected tensor {name!r} in a CLIP text encoder state dict")
        i = _layer_index(name, parts[2], module)
        if i is None:
            return None
        path = (f"layers_{i}", *part.split("."))
    leaves = _LEAVES[_kind(path)]
    if leaf not in leaves:
        raise UserError(f"unexpected tensor {name!r} in a CLIP text encoder state dict")
    return (*path, leaves[leaf])


def _torch_shape(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    # torch Linear weights are [out, in], flax Dense kernels [in, out].
    return flax_shape[::-1] if path[-1] == "kernel" else flax_shape


def _assemble(entries: Iterator, module: CLIPTextEncoder, source: str) -> dict:
    """(tensor name, flax path, array in torch layout) entries -> {'params': numpy tree}:
    shapes checked against `module`, every parameter required exactly once."""
    expected = _expected_shapes(module)
    params: dict = {}
    for name, path, value in entries:
        if path not in expected:
            raise UserError(f"tensor {name!r} maps to {'/'.join(path)}, not in the model")
        want = _torch_shape(path, expected[path])
        if tuple(value.shape) != want:
            raise UserError(
                f"tensor {name!r} has shape {tuple(value.shape)} but the model expects {want} "
                f"(flax {'/'.join(path)})"
            )
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        if path[-1] in node:
            raise UserError(f"tensor {name!r} given twice (flax {'/'.join(path)})")
        # numpy, not jax arrays: the caller places them (device_put onto a mesh) in one step.
        value = np.asarray(value, np.dtype(module.param_dtype))
        node[path[-1]] = np.ascontiguousarray(value.T) if path[-1] == "kernel" else value
    have = set(traverse_util.flatten_dict(params))
    missing = sorted("/".join(p) for p in set(expected) - have)
    if missing:
        raise UserError(
            f"{source} state dict lacks {len(missing)} parameters of the CLIP text encoder, "
            f"e.g. {missing[:3]} (is the prefix right?)"
        )
    return {"params": params}


def convert_hf_clip(
    state: dict[str, np.ndarray], module: CLIPTextEncoder, prefix: str | None = None
) -> dict:
    """transformers CLIPTextModel state dict (numpy) -> {'params': numpy tree} for `module`.

    Only names under `prefix` are read, so a whole checkpoint can be passed: SD 1.x CompVis
    uses "cond_stage_model.transformer.text_model.", diffusers' text_encoder files
    "text_model.". None: "text_model." if some name starts with it, else "" (transformers 5
    drops that prefix from an in-memory CLIPTextModel's state_dict). The last layer is
    skipped when module.output is "penultimate".
    """
    if prefix is None:
        prefix = "text_model." if any(k.startswith("text_model.") for k in state) else ""

    def entries():
        for name in state:  # a tensor is read only once it is known to be wanted
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if rest in _HF_IGNORED:
                continue
            path = _hf_path(rest, name, module)
            if path is not None:
                yield name, path, state[name]

    return _assemble(entries(), module, "transformers CLIP")


def _open_clip_entries(name: str, rest: str, value, module: CLIPTextEncoder):
    """One OpenCLIP tensor (`rest`: its name without prefix) -> (name, flax path, array in
    torch layout) entries: three for a fused in_proj, none for an unused block."""
    if rest == "token_embedding.weight":
        return [(name, ("token_embedding", "embedding"), value)]
    if rest == "positional_embedding":
        return [(name, ("position_embedding", "embedding"), value)]
    if rest.startswith("ln_final."):
        return [(name, _hf_path("final_layer_norm." + rest[9:], name, module), value)]
    parts = rest.split(".")
    if parts[:2] != ["transformer", "resblocks"] or len(parts) < 5:
        raise UserError(f"unexpected tensor {name!r} in an OpenCLIP state dict")
    i = _layer_index(name, parts[2], module)
    if i is None:
        return []
    part, leaf = ".".join(parts[3:-1]), parts[-1]
    if part == "attn" and leaf in ("in_proj_weight", "in_proj_bias"):
        # nn.MultiheadAttention fuses q, k, v along the output axis: [3C, C] and [3C].
        c = module.width
        want = (3 * c, c) if leaf == "in_proj_weight" else (3 * c,)
        if tuple(value.shape) != want:
            raise UserError(
                f"tensor {name!r} has shape {tuple(value.shape)} but the model expects {want}"
            )
        flax_leaf = "kernel" if leaf == "in_proj_weight" else "bias"
        return [
            (f"{name}[{p}]", (f"layers_{i}", "self_attn", f"{p}_proj", flax_leaf), chunk)
            for p, chunk in zip("qkv", np.split(np.asarray(value), 3, axis=0))
        ]
    if part not in _OPEN_CLIP_LAYER:
        raise UserError(f"unexpected tensor {name!r} in an OpenCLIP state dict")
    hf = f"encoder.layers.{i}.{_OPEN_CLIP_LAYER[part]}.{leaf}"
    return [(name, _hf_path(hf, name, module), value)]


def convert_open_clip(
    state: dict[str, np.ndarray], module: CLIPTextEncoder, prefix: str = ""
) -> dict:
    """OpenCLIP text tower state dict (numpy) -> {'params': numpy tree} for `module`.

    Only names under `prefix` are read (SD 2.x CompVis: "cond_stage_model.model."). The
    pooling projection, logit scale and image tower are ignored; so is the last resblock
    when module.output is "penultimate".
    """

    def entries():
        for name in state:  # a tensor is read only once it is known to be wanted
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if not rest.startswith(_OPEN_CLIP_IGNORED):
                yield from _open_clip_entries(name, rest, state[name], module)

    return _assemble(entries(), module, "OpenCLIP")


def export_hf_clip(params: dict, prefix: str = "text_model.") -> dict[str, np.ndarray]:
    """{'params': ...} (or the bare params tree) -> transformers CLIPTextModel state dict
    (numpy float32), the inverse of `convert_hf_clip`. A penultimate-output model exports
    num_layers - 1 layers: diffusers' SD 2 text_encoder layout."""
    params = params.get("params", params)
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    top = {path[0]: owner for owner, path in _TOP.items()}
    flax_leaf_to_torch = {"embedding": "weight", "scale": "weight", "kernel": "weight"}
    state = {}
    for path, value in flat.items():
        first, *inner, leaf = path
        if first.startswith("layers_"):
            owner = f"encoder.layers.{first[len('layers_') :]}." + ".".join(inner)
        else:
            owner = top[first]
        value = np.asarray(value, np.float32)
        state[f"{prefix}{owner}.{flax_leaf_to_torch.get(leaf, leaf)}"] = (
            value.T if leaf == "kernel" else value
        )
    return state
