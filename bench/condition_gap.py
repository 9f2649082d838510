"""How much does a run's condition change its prediction? The diffusion loss with each
held-out example's own conditioning input (class, prompt, layout) against with the
unconditional one (null class, empty prompt or layout), at fixed timesteps and noise,
for checkpoints of one run (a dense condition, if any, is the example's in both).

    python bench/condition_gap.py --workdir runs/digit_scenes/layout --steps 1000 2000

A conditioned model that uses its condition shows a clear gap that grows with training;
one that learnt only the unconditional data shows none. Prints one line per checkpoint:
(t, loss with the condition, loss with the unconditional input) for each t.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from ldm_jax.data import pipeline
from ldm_jax.diffusion import objectives
from ldm_jax.training.restore import open_run


def gap(workdir: str, step: int, examples: int, timesteps) -> list:
    restored = open_run(workdir, step, "diffusion", inference=True)
    task, state, frozen = restored.task, restored.state, restored.mesh_run.frozen
    data_cfg = restored.config.data.copy_and_resolve_references()
    batch = next(
        pipeline.eval_batches(
            data_cfg, global_batch_size=examples, process_count=1, process_index=0
        )
    )
    inputs = {k: jnp.asarray(v) for k, v in task.cond.host_inputs(batch).items()}
    null = {k: jnp.asarray(v) for k, v in task.cond.null_inputs(examples).items()}
    dense = {k: jnp.asarray(v) for k, v in task.dense.host_inputs(batch).items()}
    z0 = task.encode_images(state, frozen, jnp.asarray(batch["image"]), jax.random.PRNGKey(0))
    parameterization = restored.config.diffusion.parameterization
    rows = []
    for t_value in timesteps:
        t = jnp.full((examples,), t_value, jnp.int32)
        noise = jax.random.normal(jax.random.PRNGKey(1), z0.shape)
        z_t = objectives.q_sample(task.sched, z0, t, noise)
        features = (
            task.dense_features(state, frozen, dense, z_t.shape[1:3]) if task.concat else None
        )
        losses = []
        for cond in (inputs, null):
            out = task._apply(state.ema_params, state.params["cond"], frozen, z_t, t, cond,
                              features, False)  # fmt: skip
            loss, _ = objectives.diffusion_loss(
                task.sched, out, z0, noise, t, parameterization=parameterization, loss_type="l2"
            )
            losses.append(round(float(loss), 5))
        rows.append((t_value, *losses))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, nargs="+", default=[-1], help="checkpoints (-1: latest)")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--t", type=int, nargs="+", default=[200, 500, 800])
    args = p.parse_args()
    for step in args.steps:
        print(step, gap(args.workdir, step, args.examples, args.t), flush=True)


if __name__ == "__main__":
    main()
