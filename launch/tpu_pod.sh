#!/usr/bin/env bash
# Train on every worker of a Cloud TPU pod slice: copy this checkout to each worker, install
# the environment there (scripts/install.sh --accelerator tpu: once per VM, later launches
# find its stamp and go on), check that JAX sees the TPU (ldm_jax.accelerator: a VM whose
# TPU is missing or held by another process stops with one line instead of training on
# its CPU), and start the same command on all of them at once. JAX finds its peers on a
# TPU slice by itself (ldm_jax.parallel.distributed).
#
#   bash launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--remote_dir ~/ldm_jax] \
#       [--extras gcs] [--no_sync] [--dry_run] -- --config configs/diffusion/cin256_ldm4_g.py \
#       --workdir gs://bucket/runs/cin256 --config.data.data_dir=gs://bucket/tfds
#
# --extras: setup.cfg's extras to install beside jax[tpu] (default gcs: gs:// workdirs).
# --dry_run prints the gcloud commands instead of running them. The workdir and data_dir
# must be visible to all workers (a GCS bucket): checkpoints are written by all of them.
set -euo pipefail

TPU="" ZONE="" PROJECT="" REMOTE_DIR="~/ldm_jax" EXTRAS=gcs SYNC=1 DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --remote_dir) REMOTE_DIR="$2"; shift 2 ;;
    --extras) EXTRAS="$2"; shift 2 ;;
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
REMOTE="cd $REMOTE_DIR && bash scripts/install.sh --accelerator tpu --extras $(printf '%q' "$EXTRAS") \
&& .venv/bin/python -m ldm_jax.accelerator --expect tpu && .venv/bin/python -m ldm_jax.train $TRAIN"

run() {
  if [[ $DRY -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
if [[ $SYNC -eq 1 ]]; then
  run "${GCLOUD[@]}" ssh "$TPU" "${TARGET[@]}" --command "mkdir -p $REMOTE_DIR"
  run "${GCLOUD[@]}" scp --recurse "$ROOT/ldm_jax" "$ROOT/configs" "$ROOT/scripts" \
    "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$ROOT/constraints.txt" "$ROOT/README.md" \
    "$TPU:$REMOTE_DIR" "${TARGET[@]}"
fi
run "${GCLOUD[@]}" ssh "$TPU" "${TARGET[@]}" --command "$REMOTE"
