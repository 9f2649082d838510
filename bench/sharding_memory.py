"""Per-device memory of the training state under FSDP, from XLA's compiled memory analysis.

    python bench/sharding_memory.py                 # both stages, fsdp = 1, 2, 4, 8
    python bench/sharding_memory.py --stage diffusion --fsdp 1 8

Runs on 8 fake CPU devices (the mesh is data x fsdp = 8). Each stage's train step is
compiled ahead of time on abstract inputs (no parameters are initialised): the paper's
KL-f8 autoencoder (the SD VAE + PatchGAN, 256x256) and the CelebA-HQ LDM-4 UNet (274M
parameters, on VQ-f4 latents). Printed per device: the state (params + optimizer moments
[+ EMA]) from the shardings, the step's arguments/outputs/temporaries from XLA, and the
state's ratio to total / N (the aim: <= 1.15).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

from ldm_jax import runtime  # noqa: E402
from ldm_jax.config_loader import load_config  # noqa: E402
from ldm_jax.parallel import mesh as mesh_lib  # noqa: E402
from ldm_jax.parallel import step as step_lib  # noqa: E402

GiB = 2**30


def _autoencoder():
    from ldm_jax.training.autoencoder import AutoencoderTask

    config = load_config("configs/autoencoder/kl_f8.py", lock=False)
    config.batch_size = 8
    task = AutoencoderTask(config)
    frozen = jax.eval_shape(task.frozen_params)
    size = config.data.image_size
    batch = {"image": jax.ShapeDtypeStruct((8, size, size, 3), jnp.float32)}
    return "autoencoder kl_f8 256px", task, frozen, batch


def _diffusion():
    from ldm_jax.training.diffusion import DiffusionTask
    from ldm_jax.training.first_stage import FirstStage

    config = load_config("configs/diffusion/celebahq_ldm_vq4.py", lock=False)
    config.batch_size = 8
    fs = FirstStage.from_model_config(load_config("configs/autoencoder/vq_f4.py").model)
    task = DiffusionTask(config, first_stage=fs)
    frozen = {"first_stage": fs.abstract_params(), **jax.eval_shape(task.cond.frozen_params)}
    size = config.data.image_size
    batch = {"image": jax.ShapeDtypeStruct((8, size, size, 3), jnp.float32)}
    return "diffusion celebahq LDM-4", task, frozen, batch


STAGES = {"autoencoder": _autoencoder, "diffusion": _diffusion}


def _with(tree, shardings):
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def measure(task, frozen, batch, fsdp: int) -> dict:
    mesh = mesh_lib.mesh_of(fsdp=fsdp)
    shardings = step_lib.state_shardings(task, mesh)
    abstract_state = jax.eval_shape(lambda r: nn.unbox(task.init_state(r)), jax.random.PRNGKey(0))
    rep, data = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
    args = (
        _with(abstract_state, shardings),
        _with(batch, jax.tree_util.tree_map(lambda _: data, batch)),
        jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
        _with(frozen, jax.tree_util.tree_map(lambda _: rep, frozen)),
    )
    t = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step_lib.jit_train_step(task, mesh, shardings).lower(*args).compile()
    mem = compiled.memory_analysis()
    one = mesh_lib.bytes_per_device(abstract_state, step_lib.state_shardings(task, _single()))
    return dict(
        fsdp=fsdp,
        state=mesh_lib.bytes_per_device(abstract_state, shardings),
        total=one,
        args=mem.argument_size_in_bytes,
        out=mem.output_size_in_bytes,
        temp=mem.temp_size_in_bytes,
        compile_s=time.perf_counter() - t,
    )


def _single():
    return mesh_lib.mesh_of(1, devices=jax.devices()[:1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=[*STAGES, "both"], default="both")
    parser.add_argument("--fsdp", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    runtime.setup()
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}")
    for name in STAGES if args.stage == "both" else [args.stage]:
        label, task, frozen, batch = STAGES[name]()
        print(f"\n{label}: per-device GiB (state = params + optimizer moments [+ EMA])")
        print(
            f"{'fsdp':>4} {'state':>7} {'state/(total/N)':>15} {'args':>7} {'out':>7} "
            f"{'temp':>7} {'compile s':>9}"
        )
        for n in args.fsdp:
            r = measure(task, frozen, batch, n)
            ratio = r["state"] / (r["total"] / n)
            print(
                f"{n:>4} {r['state'] / GiB:7.3f} {ratio:15.3f} {r['args'] / GiB:7.3f} "
                f"{r['out'] / GiB:7.3f} {r['temp'] / GiB:7.3f} {r['compile_s']:9.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
