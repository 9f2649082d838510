#!/usr/bin/env bash
# Multi-host GPU training under SLURM: writes a batch script and submits it with sbatch.
# Every task runs `python -m ldm_jax.train ...`; JAX reads its rank and the coordinator
# from SLURM's environment (ldm_jax.parallel.distributed).
#
#   bash launch/slurm.sh --nodes 2 --gpus_per_node 8 [--per gpu|node] [--time 24:00:00] \
#       [--partition P] [--account A] [--venv .venv] [--accelerator cuda12|cuda13] \
#       [--extras gcs] [--no_install] [--dry_run] -- \
#       --config configs/diffusion/txt2img_ldm_kl8.py --workdir /shared/runs/txt2img
#
# --per gpu: one process per GPU (each sees one device); --per node: one process per node
# driving all its GPUs. The venv is installed here first, once (scripts/install.sh with
# JAX's CUDA plugin; later launches find its stamp and go on); the job then checks on every
# node that JAX sees its GPUs (ldm_jax.accelerator) and refuses to train on CPUs.
# --dry_run prints the install command and the batch script instead of running them.
# The checkout, the venv and the workdir must be on a filesystem all nodes share.
set -euo pipefail

NODES=1 GPUS=8 PER=gpu TIME="24:00:00" PARTITION="" ACCOUNT="" VENV=".venv" DRY=0
ACCEL=cuda12 EXTRAS="" INSTALL=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --gpus_per_node) GPUS="$2"; shift 2 ;;
    --per) PER="$2"; shift 2 ;;
    --time) TIME="$2"; shift 2 ;;
    --partition) PARTITION="$2"; shift 2 ;;
    --account) ACCOUNT="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --accelerator) ACCEL="$2"; shift 2 ;;
    --extras) EXTRAS="$2"; shift 2 ;;
    --no_install) INSTALL=0; shift ;;
    --dry_run) DRY=1; shift ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (train arguments go after --)" >&2; exit 2 ;;
  esac
done
if [[ "$PER" != gpu && "$PER" != node ]]; then
  echo "error: --per must be 'gpu' or 'node', got '$PER'" >&2; exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "error: give the training arguments after -- (at least --config and --workdir)" >&2; exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ "$ACCEL" != cuda12 && "$ACCEL" != cuda13 ]]; then
  echo "error: --accelerator must be 'cuda12' or 'cuda13', got '$ACCEL'" >&2; exit 2
fi
if [[ "$PER" == gpu ]]; then
  VISIBLE=1
  TASKS="#SBATCH --ntasks-per-node=$GPUS
#SBATCH --gpus-per-task=1"
else
  VISIBLE=$GPUS
  TASKS="#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS"
fi
EXTRA=""
[[ -n "$PARTITION" ]] && EXTRA+="#SBATCH --partition=$PARTITION"$'\n'
[[ -n "$ACCOUNT" ]] && EXTRA+="#SBATCH --account=$ACCOUNT"$'\n'

SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=ldm_jax
#SBATCH --nodes=$NODES
$TASKS
#SBATCH --time=$TIME
#SBATCH --signal=TERM@120
#SBATCH --output=ldm_jax-%j.out
${EXTRA}set -euo pipefail
cd $(printf '%q' "$ROOT")
# One task per node first: JAX must see its GPUs there (else one line, and no training).
srun --ntasks-per-node=1 $(printf '%q' "$VENV")/bin/python -m ldm_jax.accelerator --expect gpu --min_devices $VISIBLE
# SIGTERM 120 s before the time limit (--signal): every rank saves at one step and exits 0;
# submit again to resume.
srun --kill-on-bad-exit=1 $(printf '%q' "$VENV")/bin/python -m ldm_jax.train $(printf '%q ' "$@")
"
INSTALL_CMD=(bash "$ROOT/scripts/install.sh" --venv "$VENV" --accelerator "$ACCEL" --extras "$EXTRAS")
if [[ $DRY -eq 1 ]]; then
  if [[ $INSTALL -eq 1 ]]; then LINE="$(printf '%q ' "${INSTALL_CMD[@]}")"; echo "${LINE% }"; fi
  printf '%s' "$SCRIPT"
else
  [[ $INSTALL -eq 1 ]] && (cd "$ROOT" && "${INSTALL_CMD[@]}")
  printf '%s' "$SCRIPT" | sbatch
fi
