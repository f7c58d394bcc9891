#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (job parsing, audio URL resolution) for a bounded time.
# Usage: scripts/fuzz.sh [--seconds N] [target...] [-- libFuzzer args...]
#   N: seconds per target (default 60); targets: default all (`job_parse job_fields url_resolve`).
# Prints one summary line per target and exits non-zero when any target crashed or broke an
# invariant; the crashing input is left in fuzz/artifacts/<target>/. Replay or shrink one with
#   cargo +nightly fuzz run|tmin -s none --fuzz-dir fuzz \
#     --target-dir ~/.cache/audio-worker/fuzz-target <target> <file>
# Environment:
#   AUDIO_WORKER_HOME   tools and builds (default ~/.cache/audio-worker): cargo-fuzz is installed
#                       once into $AUDIO_WORKER_HOME/tools, targets built in .../fuzz-target
#                       (never the main target dir: instrumented builds would clobber it).
#   FUZZ_TOOLCHAIN      rustup toolchain (default nightly; libFuzzer needs nightly rustc flags).
#   FUZZ_SANITIZER      none (default: the crate forbids unsafe code) or address, memory, ...
#   FUZZ_ALLOW          invariants to skip while triaging, e.g. traversal_contained,cleanup_filename
# The corpus of a target is fuzz/corpus/<target>: committed seeds plus what the fuzzer finds
# (ignored by git). Logs go to $AUDIO_WORKER_HOME/fuzz-logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/.."

HOME_DIR="${AUDIO_WORKER_HOME:-$HOME/.cache/audio-worker}"
TOOLS="$HOME_DIR/tools"
TARGET_DIR="$HOME_DIR/fuzz-target"
LOGS="$HOME_DIR/fuzz-logs"
TOOLCHAIN="${FUZZ_TOOLCHAIN:-nightly}"
SANITIZER="${FUZZ_SANITIZER:-none}"
CARGO_FUZZ_VERSION=0.13.2
SECONDS_PER_TARGET=60
TARGETS=()
EXTRA=()

log() { printf '[fuzz] %s\n' "$*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_PER_TARGET="${2:?--seconds needs a number}"; shift 2 ;;
    --seconds=*) SECONDS_PER_TARGET="${1#*=}"; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) log "unknown option $1"; exit 2 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
case "$SECONDS_PER_TARGET" in '' | *[!0-9]*) log "--seconds takes a whole number"; exit 2 ;; esac

mkdir -p "$TOOLS" "$LOGS"
export PATH="$TOOLS/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION into $TOOLS (about a minute, once)"
  cargo install "cargo-fuzz@$CARGO_FUZZ_VERSION" --locked --root "$TOOLS" >&2
fi
if ! rustup run "$TOOLCHAIN" rustc --version >/dev/null 2>&1; then
  log "toolchain $TOOLCHAIN is missing: rustup toolchain install $TOOLCHAIN --profile minimal"
  exit 2
fi

fuzz() { cargo "+$TOOLCHAIN" fuzz "$@"; }
[ ${#TARGETS[@]} -gt 0 ] || mapfile -t TARGETS < <(fuzz list --fuzz-dir fuzz)

# One build of every target (they share the dependency graph); `run` below finds it up to date.
log "building ${TARGETS[*]} (sanitizer $SANITIZER, $TOOLCHAIN) into $TARGET_DIR"
start=$(date +%s)
fuzz build -s "$SANITIZER" --fuzz-dir fuzz --target-dir "$TARGET_DIR" >&2
log "built in $(($(date +%s) - start)) s"

failed=0
for t in "${TARGETS[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  logfile="$LOGS/$t.log"
  args=(-max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
  [ -f fuzz/url.dict ] && args+=(-dict=fuzz/url.dict)
  log "running $t for ${SECONDS_PER_TARGET} s (log: $logfile)"
  start=$(date +%s)
  rc=0
  fuzz run -s "$SANITIZER" --fuzz-dir fuzz --target-dir "$TARGET_DIR" "$t" "fuzz/corpus/$t" -- \
    "${args[@]}" ${EXTRA[@]+"${EXTRA[@]}"} >"$logfile" 2>&1 || rc=$?
  took=$(($(date +%s) - start))
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logfile" | tail -n1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logfile" | tail -n1)
  if [ "$rc" = 0 ]; then
    echo "$t: ${runs:-?} runs in ${took} s (${rate:-?}/s), no crash"
  else
    failed=1
    artifact=$(sed -n 's/.*Test unit written to \([^ ]*\).*/\1/p' "$logfile" | tail -n1)
    why=$(grep -m1 -oE "invariant [a-z0-9_]+ violated.*" "$logfile" || grep -m1 -oE "panicked at .*|ERROR: libFuzzer: [a-z-]+" "$logfile" || true)
    why="${why:0:300}"
    echo "$t: ${runs:-?} runs in ${took} s (${rate:-?}/s), CRASH (exit $rc): ${why:-see $logfile}${artifact:+ -> $artifact}"
  fi
done
exit "$failed"
