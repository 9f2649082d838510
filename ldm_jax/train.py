"""Training entry point for both stages.

    python -m ldm_jax.train --config configs/autoencoder/kl_f8.py --workdir runs/kl_f8 \
        --config.batch_size=8

The config is locked: an override of a key that does not exist is an error naming it.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from ldm_jax import runtime
from ldm_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.setup()
    from ldm_jax.parallel import distributed
    from ldm_jax.training import loop

    try:
        config = _CONFIG.value
        distributed.initialize(config.get("distributed"))
        result = loop.run(config, _WORKDIR.value)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except loop.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    if result.get("preempted"):
        print(
            f"preempted: saved step {result['step']} in {result['workdir']}; run the same "
            "command again to resume from it"
        )
        return
    print(f"done: step {result['step']} in {result['workdir']}")
    print(f"metrics: {result['workdir']}/metrics.json")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
