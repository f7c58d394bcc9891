# Sourced by the scripts that build (test.sh, demo.sh, soak.sh, bench.sh), from the repo root.
# Cargo's intermediate build files are shared by every clone on the machine
# ($AUDIO_WORKER_HOME/build, cargo's build-dir), so dependencies compile once; each clone's own
# binaries go to its own target/.
# Cargo names this package's artifacts the same in every clone and decides freshness by file
# times, so a clone whose sources are older than another clone's build would reuse that build.
# When the last clone built here was another one, this package's artifacts are cleaned first.
export AUDIO_WORKER_HOME="${AUDIO_WORKER_HOME:-$HOME/.cache/audio-worker}"
export CARGO_BUILD_BUILD_DIR="${CARGO_BUILD_BUILD_DIR:-$AUDIO_WORKER_HOME/build}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
mkdir -p "$CARGO_BUILD_BUILD_DIR"
if [ "$(cat "$CARGO_BUILD_BUILD_DIR/.last-clone" 2>/dev/null)" != "$PWD" ]; then
  cargo clean --quiet -p audio-worker 2>/dev/null || true
  printf '%s\n' "$PWD" >"$CARGO_BUILD_BUILD_DIR/.last-clone"
fi
