#!/usr/bin/env bash
# The soak: N jobs (default 200) through two worker processes while faults hit from every side
# (generation-service errors, missing audio, invalid jobs, duplicates, SIGKILL of a worker, an S3
# outage, a RabbitMQ restart, a MongoDB outage), then the accounting, printed as one line:
# saved + dead-lettered = published, no duplicate documents, one outcome per asset.
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
SOAK_JOBS="$jobs" cargo test --locked --test integration soak -- --exact soak::soak --nocapture 2>&1 | grep -E '^soak:|test result|panicked|assert' || true
status=${PIPESTATUS[0]}
echo "soak.sh: $jobs jobs, exit $status, $(( $(date +%s) - start )) s wall"
exit "$status"
