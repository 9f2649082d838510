"""Builds a project dataset for offline use (no TensorFlow, no downloads).

python -m ldm_jax.data.prepare --dataset digits [--data_dir DIR]
python -m ldm_jax.data.prepare --dataset all
"""

import argparse
import sys
import time

from ldm_jax.data.datasets import PROJECT_DATASETS, prepare, resolve_data_dir
from ldm_jax.errors import UserError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=[*PROJECT_DATASETS, "all"])
    parser.add_argument(
        "--data_dir",
        default=None,
        help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)",
    )
    args = parser.parse_args(argv)
    names = PROJECT_DATASETS if args.dataset == "all" else (args.dataset,)
    data_dir = resolve_data_dir(args.data_dir)
    for name in names:
        start = time.perf_counter()
        try:
            builder = prepare(name, data_dir)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        counts = ", ".join(f"{k}={v.num_examples}" for k, v in builder.info.splits.items())
        print(
            f"{name} {builder.version}: {counts} at {builder.data_dir} "
            f"({time.perf_counter() - start:.1f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
