#!/usr/bin/env bash
# N local CPU processes forming one multi-process run (what a TPU pod or a GPU cluster does
# with one process per host), each simulating D devices; gloo collectives between them.
#   launch/local_processes.sh [--dry_run] N D [mqt-jax train args...]
# e.g. launch/local_processes.sh 2 4 --gin_file tiny.gin --workdir workdir/mp
# Process i logs to WORKDIR_LOGS/process_<i>.log (default logs/); process 0 also to the terminal.
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry_run" ]; then dry_run=1; shift; fi
if [ $# -lt 2 ]; then echo "usage: $0 [--dry_run] N D [mqt-jax train args...]" >&2; exit 2; fi
num_processes="$1"; devices="$2"; shift 2
port="${PORT:-$((20000 + RANDOM % 20000))}"
logs="${WORKDIR_LOGS:-logs}"
commands=()
for ((i = 0; i < num_processes; i++)); do
  commands+=("env XLA_FLAGS='${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}' JAX_PLATFORMS=cpu mqt-jax train --coordinator_address 127.0.0.1:${port} --num_processes ${num_processes} --process_id ${i} $(printf '%q ' "$@")")
done
if [ "$dry_run" = 1 ]; then printf '%s\n' "${commands[@]}"; exit 0; fi
mkdir -p "$logs"
pids=()
for ((i = 1; i < num_processes; i++)); do
  bash -c "${commands[$i]}" > "$logs/process_$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
status=0
bash -c "${commands[0]}" 2>&1 | tee "$logs/process_0.log" || status=$?
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
trap - EXIT
exit "$status"
