"""Numeric helpers shared by tests: parameter-tree comparison and perturbation, and the
PyTorch references (torch and diffusers are test-only; tests that need them skip without)."""

import pathlib

import jax
import numpy as np
import pytest
from flax import traverse_util


def assert_trees_identical(a, b, *, dtype=None) -> None:
    """The same non-empty set of paths, and at each the same dtype (`dtype` where given),
    shape and bits."""
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa, "no leaves to compare"
    assert fa.keys() == fb.keys()
    for path in fa:
        x, y = np.asarray(fa[path]), np.asarray(fb[path])
        assert x.dtype == y.dtype and x.shape == y.shape, path
        if dtype is not None:
            assert x.dtype == dtype, path
        assert np.array_equal(x, y), path  # bit-identical (no NaNs in these weights)


def perturb(params, *, scale: float, seed: int):
    """`scale` x N(0, 1) added to every leaf, so zero-initialised layers stop hiding paths.

    numpy draws: eager jax.random would compile one program per leaf shape.
    """
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree.flatten(params)
    new = [np.asarray(p) + scale * rng.standard_normal(p.shape).astype(np.float32) for p in leaves]
    return jax.tree.unflatten(tree, new)


def jit_init(model, rngs, *inputs, **kwargs):
    """`model.init(rngs, *inputs, **kwargs)["params"]` in one jitted call (flax's eager
    init dispatches op by op: 15 s for a tiny SD UNet, 2.5 s jitted from the cache)."""
    return jax.jit(lambda r, x: model.init(r, *x, **kwargs)["params"])(rngs, inputs)


def noisy_params(params, seed):
    """Random params with no exact zeros (zero-initialised outputs would hide mistakes):
    0.05 x N(0, 1) added to every unboxed leaf (`perturb`)."""
    from flax import linen as nn

    return perturb(nn.unbox(params), scale=0.05, seed=seed)


def torch_with_diffusers():
    """torch, or a skip when torch or diffusers (the PyTorch references) is missing."""
    torch = pytest.importorskip("torch", reason="test-only reference: pip install torch==2.13.0")
    pytest.importorskip("diffusers", reason="test-only reference: pip install diffusers==0.42.1")
    return torch


def numpy_state(module) -> dict[str, np.ndarray]:
    """A torch module's state dict as numpy copies."""
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def perturbed_reference(build):
    """`build()` (a diffusers module) made under torch seed 0, in eval mode, with 0.1 x
    N(0, 1) added to every parameter, so zero-initialised layers hide no mapping error;
    returns (module, its numpy state)."""
    torch = torch_with_diffusers()
    torch.manual_seed(0)
    ref = build().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref, numpy_state(ref)


def listing(path: pathlib.Path) -> dict:
    """Every file under `path` with its size and modification time: equal listings
    before and after a command mean it changed nothing there."""
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def assert_all_refused(main, cases, capsys, out, watched: dict) -> None:
    """Each (name, argv, expected text) of `cases` makes `main(argv)` exit 2 with one line
    naming the problem, no traceback; `out` is never created and the `watched` folders
    are left as they were."""
    from test_bad_inputs import _check_one_line_error

    before = {k: listing(v) for k, v in watched.items()}
    for name, argv, names in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        _check_one_line_error(name, exit_info.value.code, capsys.readouterr().err, names)
    assert not out.exists()
    assert {k: listing(v) for k, v in watched.items()} == before


def write_diffusion_run(workdir: pathlib.Path, config, *, scale: float = 0.05) -> None:
    """A step-0 checkpoint of `config` in `workdir`, its EMA UNet perturbed so that the
    output (zero-initialised last layer) depends on its inputs: writing a run costs
    seconds where training one costs a train-step compile, and commands and the API must
    agree on any weights."""
    from flax import linen as nn

    from ldm_jax.training import checkpoint as ckpt_lib
    from ldm_jax.training.diffusion import DiffusionTask

    task = DiffusionTask(config)
    state = nn.unbox(jax.jit(task.init_state)(jax.random.PRNGKey(0)))
    state = state.replace(ema_params=perturb(state.ema_params, scale=scale, seed=1))
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=1, async_save=False)
    ckpt.save(0, state, {}, config, force=True)
    ckpt.close()
