"""Training entry point for both stages.

    python -m ldm_jax.train --config configs/autoencoder/kl_f8.py --workdir runs/kl_f8 \
        --config.batch_size=8

The config is locked: an override of a key that does not exist is an error naming it.
Bad input (a missing config file, an unknown or mistyped key, settings a task cannot
train with) is one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from ldm_jax import runtime
from ldm_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
_USAGE = "python -m ldm_jax.train --config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]"


def _parse_flags(argv):
    """absl's flag parsing with the project's error path (one line, exit 2). The config
    file is loaded and its overrides applied while parsing, so their errors land here."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        text = _last_line(e) if "Traceback" in str(e) else _one_line(e)
        runtime.fail(f"{text}; usage: {_USAGE}")
    except (AttributeError, KeyError) as e:
        runtime.fail(f"bad --config. override: {_one_line(e)}")
    except (TypeError, ValueError) as e:
        runtime.fail(f"bad --config. override value: {_one_line(e)}")
    except OSError as e:
        _fail_config_file(e)


def _load_config():
    """The experiment config; a file that failed to load reports it on first use."""
    config = _CONFIG.value
    if config is None:
        runtime.fail(f"--config is required; usage: {_USAGE}")
    try:
        config.get("stage")
    except OSError as e:
        _fail_config_file(e)
    return config


def _fail_config_file(e: OSError):
    runtime.fail(
        f"--config: {_last_line(e)}; give an experiment file, e.g. configs/autoencoder/kl_f8.py"
    )


def _last_line(e: Exception) -> str:
    """The innermost message of a library error that embeds a whole traceback."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def _one_line(e: Exception) -> str:
    text = str(e.args[0] if isinstance(e, KeyError | AttributeError) and e.args else e)
    return " ".join(text.replace("\\n", " ").replace("\\'", "'").split()).strip("'\"")


def main(argv):
    if len(argv) > 1:
        runtime.fail(f"unexpected arguments: {argv[1:]}; usage: {_USAGE}")
    if not _WORKDIR.value:
        runtime.fail(f"--workdir is required; usage: {_USAGE}")
    config = _load_config()
    runtime.setup()
    from ldm_jax.parallel import distributed
    from ldm_jax.training import loop

    try:
        distributed.initialize(config.get("distributed"))
        result = loop.run(config, _WORKDIR.value)
    except UserError as e:
        runtime.fail(str(e))
    except loop.NonFiniteLossError as e:
        runtime.fail(str(e), code=3)
    if result.get("preempted"):
        print(
            f"preempted: saved step {result['step']} in {result['workdir']}; run the same "
            "command again to resume from it"
        )
        return
    print(f"done: step {result['step']} in {result['workdir']}")
    print(f"metrics: {result['workdir']}/metrics.json")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
