"""The quickstart: train a small KL autoencoder on the embedded photo_crops data.

    python -m ldm_jax.quickstart [--workdir runs/quickstart] [--steps 2000]

Prepares the dataset if missing, trains, evaluates on held-out crops (PSNR / SSIM /
LPIPS), and writes checkpoints, a reconstruction grid PNG and metrics.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from ldm_jax import runtime
from ldm_jax.config_loader import load_config


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--steps", type=int, default=None, help="autoencoder steps (default 2000)")
    parser.add_argument("--runlocal", action="store_true", help="tiny smoke-test sizes")
    args = parser.parse_args(argv)
    runtime.setup()
    from ldm_jax.training import loop

    workdir = pathlib.Path(args.workdir).absolute()
    arg = ",".join(
        a
        for a in ("runlocal" if args.runlocal else "", f"steps={args.steps}" if args.steps else "")
        if a
    )
    config = load_config("configs/autoencoder/quickstart.py" + (f":{arg}" if arg else ""))
    print(
        f"[quickstart] stage 1: KL autoencoder on {config.data.name} -> {workdir / 'autoencoder'}"
    )
    ae = loop.run(config, workdir / "autoencoder")
    summary = {"autoencoder": ae}
    (workdir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    ev = ae["eval"]
    print(
        f"[quickstart] held-out reconstructions: PSNR {ev['psnr']:.2f} dB, "
        f"SSIM {ev['ssim']:.4f}, LPIPS {ev['lpips']:.4f} ({int(ev['num_examples'])} crops)"
    )
    print(f"[quickstart] reconstruction grid: {ae['samples_png']}")
    print(f"[quickstart] checkpoint: {ae['checkpoint']}")
    print(f"[quickstart] metrics: {workdir / 'metrics.json'}")
    return summary


if __name__ == "__main__":
    main()
