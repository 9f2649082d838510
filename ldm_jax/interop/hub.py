"""Diffusers folders on the Hugging Face hub, named by id: `ORG/NAME` or `ORG/NAME@REVISION`.

Only `--diffusers ORG/NAME` downloads (nothing else in ldm_jax reaches the network), through
huggingface_hub into its usual cache (`HF_HUB_CACHE`, by default ~/.cache/huggingface/hub),
so a folder already fetched by diffusers is reused, and `HF_HUB_OFFLINE=1` reads the cache
only. Only what the import reads is fetched: the configs, the tokenizer and each model's
full-precision safetensors (not the fp16, EMA-less or .bin duplicates).
"""

from __future__ import annotations

import pathlib
import re

from ldm_jax import storage
from ldm_jax.errors import UserError

PIPELINE_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def is_hub_id(value: str) -> bool:
    """Whether `value` names a hub repository rather than a folder: ORG/NAME[@REV] that is
    not a URL and not an existing local path."""
    return (
        _HUB_ID.fullmatch(value) is not None
        and not storage.is_remote(value)
        and not pathlib.Path(value).exists()
    )


def fetch(hub_id: str) -> pathlib.Path:
    """The local snapshot folder of `hub_id`'s pipeline files, downloaded where the cache
    lacks them (or, offline, found in the cache)."""
    import huggingface_hub
    from huggingface_hub import errors

    repo_id, _, revision = hub_id.partition("@")
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision or None, allow_patterns=PIPELINE_FILES
        )
    except errors.LocalEntryNotFoundError:
        raise UserError(
            f"--diffusers {hub_id}: not in the hub cache ({huggingface_hub.constants.HF_HUB_CACHE})"
            " and the hub cannot be reached; fetch it where there is network (the same "
            "command), or pass a local folder."
        ) from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError, errors.RevisionNotFoundError):
        raise UserError(
            f"--diffusers {hub_id}: no such repository or revision on the hub, or it needs a "
            "login (`hf auth login`) and accepted terms."
        ) from None
    return pathlib.Path(folder)
