#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one task (process) per node driving all of its GPUs.
#   launch/slurm.sh [--dry_run] --nodes N [--gpus_per_node 8] [--partition P] [--time 24:00:00] \
#       [--venv PATH] -- [mqt-jax train args...]
# Needs the CUDA build of JAX in the venv: pip install -e . 'jax[cuda12]'.
# Writes the batch script to slurm_mqt_jax.sbatch and submits it (--dry_run prints it
# instead). `mqt-jax train --distributed` finds the other tasks from SLURM's variables.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
nodes=""; gpus=8; partition=""; time_limit="24:00:00"; venv="$(pwd)/.venv"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) dry_run=1 ;;
    --nodes) nodes="$2"; shift ;;
    --gpus_per_node) gpus="$2"; shift ;;
    --partition) partition="$2"; shift ;;
    --time) time_limit="$2"; shift ;;
    --venv) venv="$2"; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$nodes" ]; then
  echo "usage: $0 [--dry_run] --nodes N [--gpus_per_node 8] [--partition P] [--time T] [--venv PATH] -- [train args]" >&2
  exit 2
fi
args=$(printf '%q ' "$@")
script="#!/usr/bin/env bash
#SBATCH --job-name=mqt_jax
#SBATCH --nodes=${nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=${gpus}
#SBATCH --time=${time_limit}
#SBATCH --output=slurm-%j.log
${partition:+#SBATCH --partition=${partition}}
#SBATCH --signal=TERM@120
# (SIGTERM two minutes before the time limit: mqt-jax saves a checkpoint and exits 0;
#  resubmitting the same script resumes.)
set -euo pipefail
srun --kill-on-bad-exit=1 ${venv}/bin/mqt-jax train --distributed ${args}"
if [ "$dry_run" = 1 ]; then echo "$script"; echo "sbatch slurm_mqt_jax.sbatch"; exit 0; fi
printf '%s\n' "$script" > slurm_mqt_jax.sbatch
sbatch slurm_mqt_jax.sbatch
