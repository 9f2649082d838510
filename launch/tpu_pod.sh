#!/usr/bin/env bash
# Train on every worker of a Cloud TPU pod slice: copy this checkout to each worker, install
# the environment there (jax[tpu]), and start the same command on all of them at once.
# JAX finds its peers on a TPU slice by itself (ldm_jax.parallel.distributed).
#
#   bash launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--remote_dir ~/ldm_jax] \
#       [--no_sync] [--dry_run] -- --config configs/diffusion/cin256_ldm4_g.py \
#       --workdir gs://bucket/runs/cin256 --config.data.data_dir=gs://bucket/tfds
#
# --dry_run prints the gcloud commands instead of running them. The workdir and data_dir
# must be visible to all workers (a GCS bucket): checkpoints are written by all of them.
set -euo pipefail

TPU="" ZONE="" PROJECT="" REMOTE_DIR="~/ldm_jax" SYNC=1 DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --remote_dir) REMOTE_DIR="$2"; shift 2 ;;
    --no_sync) SYNC=0; shift ;;
    --dry_run) DRY=1; shift ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (train arguments go after --)" >&2; exit 2 ;;
  esac
done
if [[ -z "$TPU" || -z "$ZONE" ]]; then
  echo "error: --tpu NAME and --zone ZONE are required" >&2; exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "error: give the training arguments after -- (at least --config and --workdir)" >&2; exit 2
fi

GCLOUD=(gcloud compute tpus tpu-vm)
TARGET=(--zone "$ZONE" --worker=all)
[[ -n "$PROJECT" ]] && TARGET+=(--project "$PROJECT")
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TRAIN="$(printf '%q ' "$@")"
REMOTE="cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2' \
&& .venv/bin/python -m ldm_jax.train $TRAIN"

run() {
  if [[ $DRY -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
if [[ $SYNC -eq 1 ]]; then
  run "${GCLOUD[@]}" ssh "$TPU" "${TARGET[@]}" --command "mkdir -p $REMOTE_DIR"
  run "${GCLOUD[@]}" scp --recurse "$ROOT/ldm_jax" "$ROOT/configs" "$ROOT/setup.cfg" \
    "$ROOT/pyproject.toml" "$TPU:$REMOTE_DIR" "${TARGET[@]}"
fi
run "${GCLOUD[@]}" ssh "$TPU" "${TARGET[@]}" --command "$REMOTE"
