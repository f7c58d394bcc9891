#!/usr/bin/env bash
# Profiles the release worker on one bench cell (default 1 MiB × 16, 400 jobs): `perf record`
# (Debian's linux-perf, installed when missing) samples the worker process while the bench feeds
# it, then the top frames by self time are printed, with the machine-wide share of the worker.
# This machine kind has no hardware counters, so the sampling event is cpu-clock.
# Usage: scripts/profile.sh [--size 1M] [--concurrency 16] [--jobs 400] [--top 10] [--out FILE]
#                           [--analysis] (the worker with ANALYSIS=on)
# Output: the perf data in target/profile/perf.data and the report (FILE, default
# target/profile/top.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
size=1M concurrency=16 jobs=400 top=10 out= analysis=
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --top) top=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --analysis) analysis=--analysis-in-cells; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export AUDIO_WORKER_HOME="${AUDIO_WORKER_HOME:-$HOME/.cache/audio-worker}"
source scripts/build-env.sh
command -v perf >/dev/null || { echo "[profile] installing linux-perf" >&2; apt-get install -y -q linux-perf >&2; }
dir="$ROOT/target/profile"
mkdir -p "$dir"
out="${out:-$dir/top.txt}"

started_here=0
case "$(./scripts/services.sh status)" in *down*) started_here=1 ;; esac
./scripts/services.sh up
# SecantusDB slows down as it accumulates databases (see services.sh): start from a fresh one,
# unless BENCH_FRESH_MONGO=0.
if [ "${BENCH_FRESH_MONGO:-1}" = 1 ]; then ./scripts/services.sh restart-mongo; fi
perf_pid=
cleanup() {
  [ -n "$perf_pid" ] && kill -INT "$perf_pid" 2>/dev/null || true
  if [ "$started_here" = 1 ] && [ "${KEEP_SERVICES:-0}" != 1 ]; then "$ROOT/scripts/services.sh" down; fi
}
trap cleanup EXIT

cargo build --locked --release --bins
cargo bench --locked --bench throughput --no-run
log="$dir/bench.log"
cargo bench --locked --bench throughput -- --bin-dir "$CARGO_TARGET_DIR/release" --sizes "$size" \
  --concurrency "$concurrency" --jobs "$jobs" --no-big --no-python --no-scaling --no-analysis $analysis >"$log" 2>&1 &
bench=$!
pid=
for _ in $(seq 1 600); do
  pid=$(sed -n 's/.*worker pid \([0-9]*\).*/\1/p' "$log" | head -1)
  [ -n "$pid" ] && break
  kill -0 "$bench" 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.2
done
[ -n "$pid" ] || { echo "[profile] the bench never started a worker" >&2; exit 1; }
echo "[profile] recording worker pid $pid" >&2
# The whole machine is sampled and the report keeps the worker's threads: `perf record -p` only
# follows the threads that exist when it attaches, and the worker starts blocking-pool threads
# (file I/O) as it goes.
perf record -e cpu-clock -F 999 -g -a -o "$dir/perf.data" 2>"$dir/perf-record.log" &
perf_pid=$!
# The worker phase ends when the bench logs the worker's figures; the floor runs after it.
until grep -q "worker: .* jobs/s" "$log"; do
  kill -0 "$bench" 2>/dev/null || break
  sleep 0.2
done
kill -INT "$perf_pid" 2>/dev/null || true
wait "$perf_pid" 2>/dev/null || true
perf_pid=
wait "$bench" || { cat "$log" >&2; exit 1; }
{
  echo "# perf: the worker at $size × $concurrency ($jobs jobs${analysis:+, ANALYSIS=on}), commit $(git rev-parse --short HEAD)"
  grep "worker: " "$log" | head -1
  echo
  echo "## Top $top frames by self time (% of the worker's $(perf report -i "$dir/perf.data" --pid "$pid" --percentage relative --stdio 2>/dev/null | sed -n 's/^# Samples: \([^ ]*\) .*/\1/p' | head -1) samples)"
  perf report -i "$dir/perf.data" --pid "$pid" --percentage relative --no-children --sort symbol --stdio -g none --percent-limit 0.5 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' | head -n "$top"
  echo
  echo "## Inclusive share of chosen frames (children included)"
  perf report -i "$dir/perf.data" --pid "$pid" --percentage relative --children --sort symbol --stdio -g none 2>/dev/null | grep -v '^#' \
    | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' \
    | grep -E 'tokio::runtime::blocking::pool::Inner::run$|\] __x64_sys_futex$|sha2::sha256::x86::digest_blocks$|\] ext4_buffered_write_iter$|\] tcp_recvmsg$|\] tcp_sendmsg$|\] __x64_sys_epoll_wait$|TempPath as core::ops::drop::Drop>::drop$' || true
  echo
  echo "## By shared object"
  perf report -i "$dir/perf.data" --pid "$pid" --percentage relative --no-children --sort dso --stdio -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' | head -n 6
} | tee "$out"
