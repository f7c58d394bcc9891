#!/usr/bin/env bash
# Starts on 127.0.0.1 whatever the tests and the demo need and is not already running, and
# waits until each answers:
#   RabbitMQ   :5672   (Debian's rabbitmq-server; our machines already run it)
#   SecantusDB :27017  (PyPI secantusdb, MongoDB wire protocol, in-memory)
#   s3s-fs     :9000   (crates.io s3s-fs, an S3 server on a folder that checks SigV4)
# Usage: scripts/services.sh up|down|status
# Tools are installed once into $AUDIO_WORKER_HOME (default ~/.cache/audio-worker, outside the
# repo, so every clone on the machine reuses them); state and logs go to $AUDIO_WORKER_HOME/run.
set -euo pipefail

HOME_DIR="${AUDIO_WORKER_HOME:-$HOME/.cache/audio-worker}"
TOOLS="$HOME_DIR/tools"
RUN="$HOME_DIR/run"
MONGO_PORT="${MONGO_PORT:-27017}"
S3_PORT="${S3_PORT:-9000}"
AMQP_PORT="${AMQP_PORT:-5672}"
S3_ACCESS_KEY_ID="${S3_ACCESS_KEY_ID:-audioworker}"
S3_SECRET_ACCESS_KEY="${S3_SECRET_ACCESS_KEY:-audioworker-secret}"
mkdir -p "$TOOLS" "$RUN"

log() { printf '[services] %s\n' "$*" >&2; }

# True when something accepts TCP connections on 127.0.0.1:$1.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name port seconds
  local i
  for ((i = 0; i < $3 * 4; i++)); do
    if listening "$2"; then log "$1 answers on 127.0.0.1:$2"; return 0; fi
    sleep 0.25
  done
  log "$1 did not answer on 127.0.0.1:$2 within $3 s; its log:"
  tail -n 30 "$RUN/$1.log" >&2 2>/dev/null || true
  return 1
}

apt_install() {
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq >&2; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# The fault tests run RabbitMQ nodes, s3s-fs and SecantusDB of their own, so the tools are
# installed even when the shared services already answer.
install_tools() {
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  if [ ! -x "$TOOLS/venv/bin/python" ] || ! "$TOOLS/venv/bin/python" -c 'import secantus' 2>/dev/null; then
    log "installing SecantusDB into $TOOLS/venv"
    python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install -q secantusdb >&2
  fi
  if [ ! -x "$TOOLS/bin/s3s-fs" ]; then
    log "installing s3s-fs 0.14.1 into $TOOLS (a few minutes, once)"
    cargo install s3s-fs@0.14.1 --locked --features binary --root "$TOOLS" >&2
  fi
}

start_rabbitmq() {
  if listening "$AMQP_PORT"; then log "RabbitMQ already running on :$AMQP_PORT"; return; fi
  log "starting RabbitMQ"
  rabbitmq-server -detached >"$RUN/rabbitmq.log" 2>&1 || true
  wait_for rabbitmq "$AMQP_PORT" 90
}

start_mongo() {
  if listening "$MONGO_PORT"; then log "MongoDB-compatible server already running on :$MONGO_PORT"; return; fi
  log "starting SecantusDB"
  nohup "$TOOLS/venv/bin/python" -m secantus --host 127.0.0.1 --port "$MONGO_PORT" --storage-path :memory: \
    --log-level WARNING >"$RUN/secantus.log" 2>&1 &
  echo $! >"$RUN/secantus.pid"
  wait_for secantus "$MONGO_PORT" 60
}

start_s3() {
  if listening "$S3_PORT"; then log "S3 server already running on :$S3_PORT"; return; fi
  mkdir -p "$RUN/s3-data"
  log "starting s3s-fs"
  nohup "$TOOLS/bin/s3s-fs" --host 127.0.0.1 --port "$S3_PORT" \
    --access-key "$S3_ACCESS_KEY_ID" --secret-key "$S3_SECRET_ACCESS_KEY" "$RUN/s3-data" \
    >"$RUN/s3s-fs.log" 2>&1 &
  echo $! >"$RUN/s3s-fs.pid"
  wait_for s3s-fs "$S3_PORT" 30
}

stop_pid() { # name — stops it and waits (up to 10 s) until it has exited
  local pidfile="$RUN/$1.pid" pid i
  if [ -f "$pidfile" ]; then
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
      for ((i = 0; i < 40; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      log "stopped $1"
    fi
    rm -f "$pidfile"
  fi
}

status() {
  local name port
  for pair in "RabbitMQ:$AMQP_PORT" "MongoDB:$MONGO_PORT" "S3:$S3_PORT"; do
    name="${pair%%:*}"; port="${pair##*:}"
    if listening "$port"; then echo "up    $name 127.0.0.1:$port"; else echo "down  $name 127.0.0.1:$port"; fi
  done
}

case "${1:-}" in
  up) install_tools; start_rabbitmq; start_mongo; start_s3 ;;
  # Stops only what this script started (under this AUDIO_WORKER_HOME); the machine's RabbitMQ
  # is left alone.
  down) stop_pid secantus; stop_pid s3s-fs ;;
  # A fresh, empty SecantusDB (it keeps everything in memory, and its writes slow from ~8 ms to
  # ~25 ms each after a few thousand test databases): what scripts/bench.sh starts from.
  restart-mongo) install_tools; stop_pid secantus; start_mongo ;;
  status) status ;;
  *) echo "usage: $0 up|down|restart-mongo|status" >&2; exit 2 ;;
esac
