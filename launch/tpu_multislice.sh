#!/usr/bin/env bash
# Train on several TPU slices joined over the data-center network (multislice), through a
# queued resource: one process per worker of every slice, data parallel across slices.
#   launch/tpu_multislice.sh [--dry_run] --name N --zone Z --type v5p-64 --slices 2 \
#       [--version V] [--project P] -- [mqt-jax train args...]
# The mesh gets MeshConfig.slices = data = S: the `data` axis spans the slices, so only the
# gradient all-reduce crosses the slower network, while fsdp / tensor stay inside a slice.
# The runtime sets the MEGASCALE_* variables JAX needs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
version="tpu-ubuntu2204-base"; project=(); name=""; zone=""; type=""; slices=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) dry_run=1 ;;
    --name) name="$2"; shift ;;
    --zone) zone="$2"; shift ;;
    --type) type="$2"; shift ;;
    --slices) slices="$2"; shift ;;
    --version) version="$2"; shift ;;
    --project) project=(--project "$2"); shift ;;
    --) shift; break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$name" ] || [ -z "$zone" ] || [ -z "$type" ] || [ -z "$slices" ]; then
  echo "usage: $0 [--dry_run] --name N --zone Z --type v5p-64 --slices S [--version V] [--project P] -- [train args]" >&2
  exit 2
fi
run gcloud compute tpus queued-resources create "$name" --zone "$zone" --accelerator-type "$type" \
  --runtime-version "$version" --node-count "$slices" --node-prefix "$name" "${project[@]}"
package /tmp/mqt_jax.tar.gz
args=$(printf '%q ' "$@")
for ((s = 0; s < slices; s++)); do
  node="$name-$s"
  run gcloud compute tpus tpu-vm scp /tmp/mqt_jax.tar.gz "$node:~/" --zone "$zone" --worker=all "${project[@]}"
  run gcloud compute tpus tpu-vm ssh "$node" --zone "$zone" --worker=all "${project[@]}" --command \
    "mkdir -p mqt_jax && tar xzf mqt_jax.tar.gz -C mqt_jax && cd mqt_jax && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]' && nohup .venv/bin/mqt-jax train --distributed --gin_param 'MeshConfig.slices = ${slices}' --gin_param 'MeshConfig.data = ${slices}' ${args} > train.log 2>&1 &"
done
