"""Runs pytorch-fid's own InceptionV3 (needs torchvision and `pytorch-fid`, which the
project's environment does not install) on inputs saved by the project, to check the
project's pytorch-fid weight loader against the reference module:

    # in the project's venv: export weights in pytorch-fid's layout + features to compare
    # in an environment with torch, torchvision and pytorch-fid:
    python scripts/pytorch_fid_reference.py WEIGHTS.pth OURS.npz [SHAPES.json]

Prints the max abs differences of pool3 features and logits, and (optionally) writes the
names and shapes of the reference module's state dict.
"""

import json
import sys

import numpy as np
import torch
from pytorch_fid import inception as pf


def reference_module():
    """pytorch-fid's FID InceptionV3, built as its `fid_inception_v3` does, minus download."""
    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    return net.eval()


def main(weights, ours, shapes_out=None):
    net = reference_module()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    if shapes_out:
        shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
        with open(shapes_out, "w") as f:
            json.dump(shapes, f, indent=0, sort_keys=True)
    data = np.load(ours)
    # The blocks pytorch-fid's `InceptionV3` wrapper chains up to pool3 (its resize and
    # normalisation are left out: the saved input is already at 299 in [-1, 1]).
    pool = torch.nn.MaxPool2d(kernel_size=3, stride=2)
    names = [
        "Conv2d_1a_3x3",
        "Conv2d_2a_3x3",
        "Conv2d_2b_3x3",
        pool,
        "Conv2d_3b_1x1",
        "Conv2d_4a_3x3",
        pool,
        "Mixed_5b",
        "Mixed_5c",
        "Mixed_5d",
        "Mixed_6a",
        "Mixed_6b",
        "Mixed_6c",
        "Mixed_6d",
        "Mixed_6e",
        "Mixed_7a",
        "Mixed_7b",
        "Mixed_7c",
    ]
    seq = torch.nn.Sequential(
        *[getattr(net, n) if isinstance(n, str) else n for n in names],
        torch.nn.AdaptiveAvgPool2d((1, 1)),
    )
    with torch.no_grad():
        x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2)
        pool3 = seq(x).flatten(1)
        logits = net.fc(pool3)
    d_pool = np.abs(pool3.numpy() - data["pool3"]).max()
    d_logits = np.abs(logits.numpy() - data["logits"]).max()
    print(f"pool3 max |diff| {d_pool:.3g} (max |value| {np.abs(data['pool3']).max():.3g})")
    print(f"logits max |diff| {d_logits:.3g} (max |value| {np.abs(data['logits']).max():.3g})")


if __name__ == "__main__":
    main(*sys.argv[1:])
