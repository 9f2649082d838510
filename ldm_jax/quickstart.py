"""The quickstart: both stages of the paper on the embedded data, on a CPU.

    python -m ldm_jax.quickstart [--workdir runs/quickstart] [--skip_text] [--runlocal]

1. A small KL autoencoder (f=4) on the digits, the LDMs' own data (as the paper trains
   each first stage on its domain); held-out PSNR / SSIM / LPIPS.
2. A class-conditional LDM on the digits in that autoencoder's latents, with classifier-
   free guidance, sampled by DDIM at eta 1; a grid of all ten classes and samples.npz;
   the conditional accuracy of the samples, measured by a classifier trained on the
   real digits, and the share of samples off the digits' manifold.
3. A text-conditional LDM on the digits' captions (BERT tokens -> transformer encoder
   trained with the UNet), sampled from captions, with the same accuracy check.
Each stage resumes from its checkpoints when run again; metrics.json gathers the figures.
"""

from __future__ import annotations

import argparse
import functools
import json

from ldm_jax import runtime, storage
from ldm_jax.config_loader import load_config

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _spec(path: str, *args: str) -> str:
    args = [a for a in args if a]
    return path + (":" + ",".join(args) if args else "")


@functools.lru_cache
def _classifier(data_dir):
    """Fitted once and shared by the class- and text-conditional stages."""
    from ldm_jax.evaluation.digits_classifier import DigitsClassifier

    return DigitsClassifier(data_dir)


def _accuracy(samples: dict, data_dir) -> dict:
    clf = _classifier(data_dir)
    images = samples["images"].astype("float32") / 127.5 - 1.0
    return {
        "conditional_accuracy": clf.accuracy(images, samples["labels"]),
        "classifier_real_test_accuracy": clf.real_test_accuracy,
        # samples far from every real digit (colour-noise blobs the classifier still names)
        "off_manifold_share": clf.off_manifold_share(images),
        "real_off_manifold_share": clf.real_off_manifold_share,
        "num_samples": int(len(images)),
    }


def _sample(workdir: storage.Path, out: storage.Path, *, labels=None, prompts=None, n: int):
    from ldm_jax import sample

    argv = [f"--workdir={workdir}", f"--out={out}", f"--num_per_condition={n}"]
    if labels is not None:
        argv.append("--labels=" + ",".join(map(str, labels)))
    if prompts is not None:
        argv += ["--prompts", *prompts]
    return sample.run(sample.build_parser().parse_args(argv))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--runlocal", action="store_true", help="tiny smoke-test sizes")
    parser.add_argument("--skip_text", action="store_true", help="skip the text-conditional LDM")
    parser.add_argument("--samples_per_class", type=int, default=10)
    args = parser.parse_args(argv)
    runtime.setup()
    from ldm_jax.training import loop

    root = storage.path(args.workdir)
    small = "runlocal" if args.runlocal else ""
    n = 2 if args.runlocal else args.samples_per_class
    summary: dict = {}

    ae_cfg = load_config(_spec("configs/autoencoder/quickstart.py", small))
    print(f"[quickstart] 1/3 KL autoencoder on {ae_cfg.data.name} -> {root / 'autoencoder'}")
    ae = loop.run(ae_cfg, root / "autoencoder")
    summary["autoencoder"] = ae
    ev = ae["eval"]
    print(
        f"[quickstart] held-out reconstructions: PSNR {ev['psnr']:.2f} dB, "
        f"SSIM {ev['ssim']:.4f}, LPIPS {ev['lpips']:.4f} ({int(ev['num_examples'])} images)"
    )
    data_dir = ae_cfg.data.data_dir

    def diffusion_stage(name: str, text: bool) -> dict:
        cfg = load_config(
            _spec("configs/diffusion/quickstart_digits.py", small, "text" if text else ""),
            lock=False,
        )
        cfg.first_stage.workdir = str(root / "autoencoder")
        cfg.lock()
        workdir = root / name
        result = loop.run(cfg, workdir)
        labels = list(range(10))
        if text:
            prompts = [f"a handwritten digit {DIGIT_WORDS[k]}" for k in labels]
            samples = _sample(workdir, workdir / "samples", prompts=prompts, n=n)
            samples["labels"] = [k for k in labels for _ in range(n)]
        else:
            samples = _sample(workdir, workdir / "samples", labels=labels, n=n)
        result["samples"] = {"png": samples["out"] + "/samples.png", **_accuracy(samples, data_dir)}
        acc = result["samples"]["conditional_accuracy"]
        off = result["samples"]["off_manifold_share"]
        print(f"[quickstart] {name}: conditional accuracy {acc:.1%}, off the digits' "
              f"manifold {off:.1%} -> {samples['out']}")  # fmt: skip
        return result

    print(f"[quickstart] 2/3 class-conditional LDM on digits -> {root / 'ldm_digits'}")
    summary["ldm_digits"] = diffusion_stage("ldm_digits", text=False)
    if not args.skip_text:
        print(f"[quickstart] 3/3 text-conditional LDM on captions -> {root / 'ldm_text'}")
        summary["ldm_text"] = diffusion_stage("ldm_text", text=True)
    (root / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"[quickstart] metrics: {root / 'metrics.json'}")
    return summary


if __name__ == "__main__":
    main()
