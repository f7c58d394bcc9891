#!/usr/bin/env bash
# The soak: N assets (default 200) through two worker processes while faults hit from every side
# (generation-service errors, missing audio, invalid jobs, duplicates, regenerated assets with
# takes in random order, newer takes whose audio is gone, SIGKILL of a worker, an S3 outage, a
# RabbitMQ restart, MongoDB stopped right after a save's first S3 write), then the accounting,
# printed as one line: one outcome per message, the dead letters it should have, every object
# hashing to its document's checksum, the newest take in the library, nothing else in the bucket.
# The run's time limit grows with N (SOAK_LIMIT_SECS overrides it).
# Usage: scripts/soak.sh [--jobs N]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=200
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) jobs="$2"; shift 2 ;;
    --jobs=*) jobs="${1#--jobs=}"; shift ;;
    *) echo "usage: $0 [--jobs N]" >&2; exit 2 ;;
  esac
done
./scripts/services.sh up
export AUDIO_WORKER_HOME="${AUDIO_WORKER_HOME:-$HOME/.cache/audio-worker}"
# Shared build-dir, per-clone target/ (see build-env.sh).
source scripts/build-env.sh
start=$(date +%s)
set +e
SOAK_JOBS="$jobs" cargo test --locked --test integration soak -- --exact soak::soak --nocapture 2>&1 \
  | grep -E -A2 '^soak:|test result|panicked'
status=${PIPESTATUS[0]}
set -e
echo "soak.sh: $jobs jobs, exit $status, $(( $(date +%s) - start )) s wall"
exit "$status"
