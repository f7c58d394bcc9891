#!/usr/bin/env bash
# Brings up the services the tests need (scripts/services.sh) and runs the whole test suite:
# unit tests and the integration tests against real RabbitMQ, S3 (s3s-fs) and MongoDB
# (SecantusDB). Services this script started are stopped at the end unless KEEP_SERVICES=1.
# Intermediate build files are shared by every clone on the machine (~/.cache/audio-worker/build),
# so only the first run compiles the dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

started_here=0
# (no grep -q in a pipe: with pipefail its early exit would read as "all up")
case "$(./scripts/services.sh status)" in *down*) started_here=1 ;; esac
./scripts/services.sh up
if [ "$started_here" = 1 ] && [ "${KEEP_SERVICES:-0}" != 1 ]; then
  trap './scripts/services.sh down' EXIT
fi

# Queues of earlier runs that died (a panicking test skips its teardown) are
# deleted first: every test names its own `t-{id}` queues, and hundreds of leftover quorum
# queues once wedged the machine's broker (leftover exchanges cost nothing and stay).
if command -v rabbitmqctl >/dev/null 2>&1; then
  for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep '^t-' || true); do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
fi
export AUDIO_WORKER_HOME="${AUDIO_WORKER_HOME:-$HOME/.cache/audio-worker}"
# Shared build-dir, per-clone target/ (see build-env.sh).
source scripts/build-env.sh
# The analysis tests make their files with Debian's sox and check the figures against pyloudnorm
# and scipy (PyPI), in the tools venv that services.sh made.
# The rendition tests decode the FLAC with Debian's flac and the Vorbis with sox (its Ogg
# Vorbis support is in libsox-fmt-all on some releases).
for tool in sox:sox flac:flac; do
  if ! command -v "${tool%%:*}" >/dev/null 2>&1; then
    echo "[test] installing ${tool#*:}" >&2
    apt-get install -y -q "${tool#*:}" >&2 || { apt-get update -q >&2 && apt-get install -y -q "${tool#*:}" >&2; }
  fi
done
# (`sox --help-format` exits 1 even when it answers, and grep -q in a pipe under pipefail would
# read as a failure: the answer is matched as a whole.)
case "$(sox --help-format ogg 2>/dev/null || true)" in
  *vorbis*) sox_vorbis=1 ;;
  *) sox_vorbis=0 ;;
esac
if [ "$sox_vorbis" = 0 ]; then
  echo "[test] installing libsox-fmt-all (Ogg Vorbis for sox)" >&2
  apt-get install -y -q libsox-fmt-all >&2 || { apt-get update -q >&2 && apt-get install -y -q libsox-fmt-all >&2; }
fi
if ! "$AUDIO_WORKER_HOME/tools/venv/bin/python" -c 'import pyloudnorm, scipy' 2>/dev/null; then
  echo "[test] installing pyloudnorm and scipy" >&2
  "$AUDIO_WORKER_HOME/tools/venv/bin/pip" install -q pyloudnorm scipy >&2
fi
# The console's browser test (tests/integration/browser.rs): Debian's Chromium, driven by
# playwright-core from npm (never a browser download of its own), in the tools folder.
if [ ! -x /usr/bin/chromium ]; then
  echo "[test] installing chromium" >&2
  apt-get install -y -q chromium >&2 || { apt-get update -q >&2 && apt-get install -y -q chromium >&2; }
fi
if ! command -v node >/dev/null 2>&1; then
  echo "[test] installing nodejs" >&2
  apt-get install -y -q nodejs npm >&2 || { apt-get update -q >&2 && apt-get install -y -q nodejs npm >&2; }
fi
if [ ! -f "$AUDIO_WORKER_HOME/tools/node/node_modules/playwright-core/package.json" ]; then
  echo "[test] installing playwright-core into $AUDIO_WORKER_HOME/tools/node" >&2
  mkdir -p "$AUDIO_WORKER_HOME/tools/node"
  # 1.65 drove Debian's Chromium 156 here; no browser is downloaded (PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD).
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$AUDIO_WORKER_HOME/tools/node" \
    --no-audit --no-fund --silent playwright-core@1.65.2 >&2
fi
# The Kubernetes manifests against the API's schemas (the contract tests check the rest).
./scripts/check-manifests.sh
# The optional OTLP export must keep compiling even though the tests run without it.
cargo check --locked --lib --features otlp --quiet
cargo test --locked --all-targets "$@"
