"""One implementation's side of bench/unet_vs_diffusers.py (the driver starts this).

    python bench/unet_vs_diffusers_worker.py {torch,flax,ldm_jax} --case a|b --dir DIR

Builds the UNet of the case from the diffusers config in DIR/config.json, loads the
weights (DIR/weights.safetensors, diffusers names, written by the torch worker), compiles
and runs once (writing DIR/<label>_out.npy for case a, reporting the first step's loss for
case b), prints {"ready": ...}, then answers each "go" line on stdin with {"t": seconds of
one call} until "quit". Only stdlib and numpy at the top:
the flax worker runs in the bench-only venv, which has no ldm_jax and no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

LR, WEIGHT_DECAY = 1e-4, 0.01  # AdamW for all three (torch's and optax's other defaults agree)


def _inputs(d: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(d, "inputs.npz")) as f:
        return dict(f)  # x/target [B, C, H, W] (NCHW, diffusers' layout), t [B], ctx [B, L, D]


def _weights(d: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(os.path.join(d, "weights.safetensors"))


def torch_side(case: str, d: str, config: dict):
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.numpy import save_file

    torch.manual_seed(0)
    model = UNet2DConditionModel(**config)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(d, "weights.safetensors"))  # the weights all three use
    del state
    inp = {k: torch.from_numpy(v) for k, v in _inputs(d).items()}
    if case == "a":
        model.eval()

        @torch.inference_mode()
        def call():
            return model(inp["x"], inp["t"], inp["ctx"]).sample

        return call, lambda out: out.numpy().transpose(0, 2, 3, 1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(inp["x"], inp["t"], inp["ctx"]).sample
        loss = torch.nn.functional.mse_loss(out, inp["target"])
        loss.backward()
        opt.step()
        return loss.detach()

    return step, float


def _jax_train_step(apply_fn, params, inp):
    """(call, loss_of) for AdamW on mean squared error, params and moments donated."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    state = [params, tx.init(params)]

    def loss_fn(p):
        return jnp.mean((apply_fn(p, inp["x"], inp["t"], inp["ctx"]) - inp["target"]) ** 2)

    def _step(p, opt):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    step = jax.jit(_step, donate_argnums=(0, 1))

    def call():
        state[0], state[1], loss = step(state[0], state[1])
        jax.block_until_ready(state)  # the update too, not only the loss
        return jax.block_until_ready(loss)

    return call, float


def _jax_forward(apply_fn, params, inp, to_nhwc):
    import jax

    fwd = jax.jit(apply_fn)
    call = lambda: jax.block_until_ready(fwd(params, inp["x"], inp["t"], inp["ctx"]))
    return call, lambda out: to_nhwc(np.asarray(out))


def flax_side(case: str, d: str, config: dict):
    import jax
    import jax.numpy as jnp
    from diffusers import FlaxUNet2DConditionModel
    from diffusers.models.modeling_flax_pytorch_utils import (
        rename_key,
        rename_key_and_reshape_tensor,
    )
    from flax.traverse_util import flatten_dict, unflatten_dict

    unet = FlaxUNet2DConditionModel(**config, dtype=jnp.float32)
    shapes = flatten_dict(jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0)))
    flat, state = {}, _weights(d)
    while state:  # diffusers' own PyTorch -> Flax renaming; popped: one copy in memory
        name, value = state.popitem()
        key, value = rename_key_and_reshape_tensor(
            tuple(rename_key(name).split(".")), value, shapes
        )
        assert key in shapes and shapes[key].shape == value.shape, (name, key, value.shape)
        flat[key] = jnp.asarray(value)
    assert flat.keys() == shapes.keys(), set(shapes) ^ set(flat)
    params = unflatten_dict(flat)
    del flat
    inp = {k: jnp.asarray(v) for k, v in _inputs(d).items()}  # NCHW: its API's layout
    train = case == "b"
    apply_fn = lambda p, x, t, c: unet.apply({"params": p}, x, t, c, train=train).sample
    if train:
        return _jax_train_step(apply_fn, params, inp)
    return _jax_forward(apply_fn, params, inp, lambda a: a.transpose(0, 2, 3, 1))


def ldm_side(case: str, d: str, config: dict):
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    from ldm_jax.interop.diffusers_config import unet_config_from_diffusers
    from ldm_jax.interop.unet_weights import unet_from_diffusers
    from ldm_jax.models import unet_configs

    cfg = unet_config_from_diffusers(config)
    cfg.pop("image_size", None)
    if case == "a":  # the issue asks for the SD v1 preset; it must be the same network
        preset = dict(unet_configs.PAPER_UNETS["sd-v1"])
        preset.pop("image_size")
        same = lambda c: unet_configs.from_config(  # the order of levels does not matter
            dict(c, attention_resolutions=sorted(c["attention_resolutions"]))
        )
        assert same(cfg) == same(preset), cfg
        cfg = preset
    model = unet_configs.from_config(cfg)
    state = _weights(d)
    flat = flatten_dict(unet_from_diffusers(state, model))  # numpy views of `state`
    state.clear()
    for key in list(flat):  # to the device one by one, so SD's 3.4 GB are not held twice
        flat[key] = jnp.asarray(flat[key])
    params = unflatten_dict(flat)
    inp = _inputs(d)
    for k in ("x", "target"):
        if k in inp:
            inp[k] = inp[k].transpose(0, 2, 3, 1)  # NHWC is ldm_jax's layout
    inp = {k: jnp.asarray(v) for k, v in inp.items()}
    apply_fn = lambda p, x, t, c: model.apply(p, x, t, c, train=case == "b")
    if case == "b":
        return _jax_train_step(apply_fn, params, inp)
    return _jax_forward(apply_fn, params, inp, lambda a: a)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("impl", choices=("torch", "flax", "ldm_jax"))
    p.add_argument("--case", choices=("a", "b"), required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--label", default=None)
    args = p.parse_args()
    # Protocol lines go to the real stdout; anything the libraries print goes to stderr.
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    with open(os.path.join(args.dir, "config.json")) as f:
        config = json.load(f)
    if args.impl != "torch":
        import jax

        if os.environ.get("BENCH_JAX_CACHE"):
            jax.config.update("jax_compilation_cache_dir", os.environ["BENCH_JAX_CACHE"])
    side = {"torch": torch_side, "flax": flax_side, "ldm_jax": ldm_side}[args.impl]
    start = time.perf_counter()
    call, check = side(args.case, args.dir, config)
    first = call()  # compile (JAX) and warm up
    setup_s = time.perf_counter() - start
    ready = {"ready": True, "setup_s": setup_s}
    if args.impl == "ldm_jax":  # which checkout a variant really imported
        ready["module"] = os.path.dirname(sys.modules["ldm_jax"].__file__)
    if args.case == "a":
        np.save(os.path.join(args.dir, f"{args.label or args.impl}_out.npy"), check(first))
    else:
        ready["loss"] = check(first)
    print(json.dumps(ready), file=proto)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        t = time.perf_counter()
        call()
        print(json.dumps({"t": time.perf_counter() - t}), file=proto)


if __name__ == "__main__":
    main()
