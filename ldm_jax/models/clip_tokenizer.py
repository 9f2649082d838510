"""Offline CLIP BPE tokenizer for the CLIP text encoders (Stable Diffusion 1.x and 2.x).

CLIP's byte-level BPE table (`bpe_simple_vocab_16e6.txt.gz`) ships inside the
`open-clip-torch` package; we only read that file (importing open_clip would pull in
torchvision). From it we build vocab.json and merges.txt the way CLIP defines its
vocabulary, cache them, and hand them to transformers' tokenizer:

    ids 0..255      the 256 byte symbols (GPT-2's printable byte -> unicode alphabet)
    ids 256..511    the same symbols with the end-of-word marker "</w>"
    ids 512..49405  one entry per merge, in merge order (48,894 merges)
    49406, 49407    <|startoftext|>, <|endoftext|>

SD 1.x (CompVis FrozenCLIPEmbedder, diffusers) pads with <|endoftext|> (49407); SD 2.x
(OpenCLIP `tokenize`) pads with id 0, the token "!". Both keep <|startoftext|> + the first
75 tokens + <|endoftext|> of a longer prompt. Not reproduced: OpenCLIP's ftfy/HTML-entity
clean-up of the prompt, which only changes prompts holding mojibake or entities like &amp;.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import tempfile
from collections.abc import Sequence

import numpy as np
from transformers import CLIPTokenizer

from ldm_jax.models.tokenizers import package_file

OPEN_CLIP_PACKAGE = "open_clip"
OPEN_CLIP_INSTALL = "pip install open-clip-torch --no-deps"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
_N_MERGES = 49152 - 256 - 2  # CLIP's table size minus bytes and the two specials
PAD_TOKENS = {"sd1": EOS, "sd2": "!"}  # "!" is id 0, OpenCLIP's zero padding
DEFAULT_CACHE = pathlib.Path.home() / ".cache" / "ldm_jax" / "clip_bpe_16e6"


def bpe_file() -> pathlib.Path:
    """Path of CLIP's BPE merges table inside the installed open-clip-torch package."""
    return package_file(OPEN_CLIP_PACKAGE, BPE_FILE, "The CLIP BPE vocabulary", OPEN_CLIP_INSTALL)


def byte_symbols() -> list[str]:
    """The 256 byte symbols in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first, in byte order; the other
    68 bytes (controls, space, NBSP, soft hyphen) follow in byte order, mapped to
    chr(256), chr(257), ... so that no symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(shifted))]


def read_merges(path: str | pathlib.Path | None = None) -> list[str]:
    """The first 48,894 merges ("a b" strings) of CLIP's table, skipping its header line."""
    path = bpe_file() if path is None else pathlib.Path(path)
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 1 + _N_MERGES]
    bad = next((m for m in merges if len(m.split()) != 2), None)
    if len(merges) != _N_MERGES or bad is not None:
        raise ValueError(f"{path} is not CLIP's BPE table (bad or short merges list: {bad!r})")
    return merges


def build_vocab(merges: Sequence[str]) -> dict[str, int]:
    """CLIP's token -> id map: bytes, bytes + "</w>", merged pairs, then the two specials."""
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("CLIP vocabulary has duplicate tokens; the merges table is corrupt")
    return vocab


def _write_atomic(path: pathlib.Path, text: str) -> None:
    # Tests and several processes may build the cache at once: never expose half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def tokenizer_files(cache_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Directory holding CLIP's vocab.json and merges.txt (HF layout), built once from the
    open-clip-torch BPE table. Default: ~/.cache/ldm_jax/clip_bpe_16e6."""
    path = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return path
    merges = read_merges()
    path.mkdir(parents=True, exist_ok=True)
    for name, text in bpe_file_texts(build_vocab(merges), merges).items():
        _write_atomic(path / name, text)
    return path


def clip_tokenizer(variant: str = "sd1", cache_dir: str | pathlib.Path | None = None):
    """transformers CLIPTokenizer (the fast, Rust-backed one) from local files only.

    variant: "sd1" pads with <|endoftext|> (49407), "sd2" with "!" (0), as their references.
    """
    if variant not in PAD_TOKENS:
        raise ValueError(f"variant must be one of {sorted(PAD_TOKENS)}, got {variant!r}")
    path = tokenizer_files(cache_dir)
    vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    lines = (path / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:] if m]  # line 0 is the "#version" header
    if len(vocab) != VOCAB_SIZE or len(merges) != _N_MERGES:
        raise ValueError(f"{path} holds a damaged CLIP vocabulary: delete it to rebuild")
    # vocab/merges passed as objects: transformers 5 ignores some *_file arguments silently.
    tok = CLIPTokenizer(
        vocab=vocab, merges=merges, pad_token=PAD_TOKENS[variant], model_max_length=CONTEXT_LENGTH
    )
    if tok.bos_token_id != vocab[BOS] or tok.eos_token_id != vocab[EOS]:
        raise RuntimeError("transformers CLIPTokenizer mapped the special tokens wrongly")
    return tok


def bpe_tables(tokenizer) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges as "a b" lines) of a fast CLIP tokenizer's BPE model, as vocab.json
    and merges.txt hold them (tokens added on top are not in the BPE model)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return model["vocab"], merges


def bpe_file_texts(vocab: dict[str, int], merges: list[str]) -> dict[str, str]:
    """{file name: text} of the HF layout's vocab.json and merges.txt (with its header)."""
    return {
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
    }


def tokenize_clip(
    tokenizer, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH
) -> tuple[np.ndarray, np.ndarray]:
    """texts -> (ids int32 [B, context_length], mask bool [B, context_length]).

    <|startoftext|> ... <|endoftext|>, padded with the tokenizer's pad token. Longer prompts
    keep their first context_length - 2 tokens and the final <|endoftext|>, with a warning:
    a silently cut prompt is a conditioning bug that no loss curve shows. The SD encoders
    ignore `mask` (they attend causally over the padding too); it marks the real tokens.
    """
    from ldm_jax.models import tokenizers

    return tokenizers.tokenize(tokenizer, texts, context_length)
