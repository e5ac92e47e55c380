#!/usr/bin/env bash
# Run `mqt-jax train` on N simulated CPU devices (default 8), e.g. to try a mesh locally:
#   launch/local_cpu.sh 8 --gin_param 'MeshConfig.data = 2' --gin_param 'MeshConfig.tensor = 2'
# Add --dry_run first to print the command instead of running it.
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry_run" ]; then dry_run=1; shift; fi
devices="${1:-8}"
shift || true
cmd=(env XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" mqt-jax train "$@")
if [ "$dry_run" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
