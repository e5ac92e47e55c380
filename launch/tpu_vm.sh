#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: (create,) copy the code, install, run on every worker.
#   launch/tpu_vm.sh [--dry_run] [--create] [--spot] --name N --zone Z --type v5p-64 \
#       [--version V] [--project P] -- [mqt-jax train args...]
# Each worker runs one process (`mqt-jax train --distributed`: JAX finds the other workers
# through the TPU metadata); process 0 writes the logs. Follow them with
#   gcloud compute tpus tpu-vm ssh N --zone Z --worker=0 --command 'tail -f mqt_jax/train.log'
# The workdir should be a gs:// bucket (orbax and the pipeline read and write it directly);
# data paths must be readable from every worker.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
create=0; spot=(); version="tpu-ubuntu2204-base"; project=(); name=""; zone=""; type=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) dry_run=1 ;;
    --create) create=1 ;;
    --spot) spot=(--spot) ;;
    --name) name="$2"; shift ;;
    --zone) zone="$2"; shift ;;
    --type) type="$2"; shift ;;
    --version) version="$2"; shift ;;
    --project) project=(--project "$2"); shift ;;
    --) shift; break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$name" ] || [ -z "$zone" ] || [ -z "$type" ]; then
  echo "usage: $0 [--dry_run] [--create] [--spot] --name N --zone Z --type v5p-64 [--version V] [--project P] -- [train args]" >&2
  exit 2
fi
tpu=(gcloud compute tpus tpu-vm)
if [ "$create" = 1 ]; then
  run "${tpu[@]}" create "$name" --zone "$zone" --accelerator-type "$type" --version "$version" "${spot[@]}" "${project[@]}"
fi
package /tmp/mqt_jax.tar.gz
run "${tpu[@]}" scp /tmp/mqt_jax.tar.gz "$name:~/" --zone "$zone" --worker=all "${project[@]}"
run "${tpu[@]}" ssh "$name" --zone "$zone" --worker=all "${project[@]}" --command \
  "mkdir -p mqt_jax && tar xzf mqt_jax.tar.gz -C mqt_jax && cd mqt_jax && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
args=$(printf '%q ' "$@")
run "${tpu[@]}" ssh "$name" --zone "$zone" --worker=all "${project[@]}" --command \
  "cd mqt_jax && nohup .venv/bin/mqt-jax train --distributed ${args} > train.log 2>&1 &"
