#!/usr/bin/env bash
# The cluster run: N jobs (default 600) through two worker processes on a 3-node RabbitMQ cluster
# of the test's own (three rabbitmq-server nodes on this machine, joined with
# `rabbitmqctl join_cluster`, quorum queues with a member on each node). Mid-run the node holding
# the job queue's leader is stopped, then the node a worker is connected to; each is started
# again. Prints one line: jobs saved, lost, dead-lettered, duplicate documents and events.
# `./scripts/test.sh` runs the same test with 90 jobs.
# Usage: scripts/cluster.sh [--jobs N]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=600
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
CLUSTER_JOBS="$jobs" cargo test --locked --test integration cluster -- --nocapture 2>&1 \
  | grep -E -A2 '^cluster:|test result|panicked'
status=${PIPESTATUS[0]}
set -e
echo "cluster.sh: $jobs jobs, exit $status, $(( $(date +%s) - start )) s wall"
exit "$status"
