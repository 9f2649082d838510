"""Builds a dataset for offline use (no TensorFlow, no downloads).

python -m ldm_jax.data.prepare --dataset digits [--data_dir DIR]
python -m ldm_jax.data.prepare --dataset all
python -m ldm_jax.data.prepare --folder IMAGES --name NAME [--captions FILE] [--data_dir DIR]

A folder of images (class subfolders give labels; captions from a JSONL or CSV file, or
IMAGES/metadata.jsonl) becomes the TFDS dataset NAME: train with
`--config.data.name=NAME --config.data.data_dir=DIR` (ldm_jax.data.folder says more).
An interrupted folder build resumes where it stopped when run again.
"""

import argparse
import sys
import time

from ldm_jax.data.datasets import PROJECT_DATASETS, prepare, resolve_data_dir
from ldm_jax.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from ldm_jax.runtime import CommandParser

    parser = CommandParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=[*PROJECT_DATASETS, "all"])
    source.add_argument("--folder", help="a folder of images to build as dataset --name")
    parser.add_argument(
        "--data_dir",
        default=None,
        help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)",
    )
    parser.add_argument("--name", help="the folder dataset's name (lower case, digits, _)")
    parser.add_argument("--captions", default=None, help="JSONL / CSV: file_name, caption")
    parser.add_argument("--test_fraction", type=float, default=0.05,
                        help="share of the folder's images held out as the test split")  # fmt: skip
    parser.add_argument("--workers", type=int, default=4, help="threads reading images")
    return parser


def _summary(name: str, version, splits, where, start: float) -> str:
    counts = ", ".join(f"{k}={v.num_examples}" for k, v in splits.items())
    return f"{name} {version}: {counts} at {where} ({time.perf_counter() - start:.1f} s)"


def _prepare_folder(args, data_dir: str) -> None:
    from ldm_jax.data import folder
    from ldm_jax.data.datasets import open_source

    if not args.name:
        raise UserError("--folder needs --name NAME, the dataset's name in --data_dir")
    if args.name in PROJECT_DATASETS:
        raise UserError(f"--name {args.name} is one of the project's datasets: pick another")
    start = time.perf_counter()
    path = folder.build(
        args.folder, args.name, data_dir, captions=args.captions,
        test_fraction=args.test_fraction, workers=args.workers,
    )  # fmt: skip
    splits = open_source(args.name, "train", data_dir).builder.info.splits
    print(_summary(args.name, folder.VERSION, splits, path, start))
    print(f"train on it with --config.data.name={args.name} --config.data.data_dir={data_dir}")


def run(args) -> int:
    data_dir = resolve_data_dir(args.data_dir)
    if args.folder:
        _prepare_folder(args, data_dir)
        return 0
    names = PROJECT_DATASETS if args.dataset == "all" else (args.dataset,)
    for name in names:
        start = time.perf_counter()
        builder = prepare(name, data_dir)
        print(_summary(name, builder.version, builder.info.splits, builder.data_dir, start))
    return 0


def main(argv=None) -> int:
    # Not runtime.run_command: this compiles nothing, and tests call it in-process, where
    # its jax settings (the compilation cache's) would change the test session's.
    from ldm_jax import runtime

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        runtime.fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
