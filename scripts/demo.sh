#!/usr/bin/env bash
# The main job, end to end on a real WAV:
#   services up → worker + stand-in audio-generation service → spoken WAV (espeak-ng) →
#   publish a job and wait for its completion event → download the presigned URL and compare
#   the bytes → print the MongoDB document → stop what was started.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
HOME_DIR="${AUDIO_WORKER_HOME:-$HOME/.cache/audio-worker}"
# Shared build-dir, per-clone target/ (see build-env.sh).
source scripts/build-env.sh
STANDIN_PORT="${STANDIN_PORT:-3077}"
WORK=$(mktemp -d)
pids=()

say() { printf '\n== %s\n' "$*"; }

started_services=0
# (no grep -q in a pipe: with pipefail its early exit would read as "all up")
case "$(./scripts/services.sh status)" in *down*) started_services=1 ;; esac
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if command -v rabbitmqctl >/dev/null 2>&1; then rabbitmqctl -q delete_queue audio.events.demo >/dev/null 2>&1 || true; fi
  if [ "$started_services" = 1 ]; then "$ROOT/scripts/services.sh" down; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

say "services"
./scripts/services.sh up

say "building audio-worker"
cargo build --locked --bins
BIN="$CARGO_TARGET_DIR/debug"

say "making a real WAV"
TEXT="Hello from the audio worker. This sentence was spoken by e speak, stored in S3 and catalogued in MongoDB."
if ! command -v espeak-ng >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng) >/dev/null 2>&1 || true
fi
mkdir -p "$WORK/audio"
WAV="$WORK/audio/demo greeting.wav"
if command -v espeak-ng >/dev/null 2>&1 && espeak-ng -w "$WAV" "$TEXT" 2>/dev/null; then
  echo "spoken with espeak-ng: \"$TEXT\""
else
  echo "espeak-ng unavailable: generating a 2 s tone instead"
  python3 - "$WAV" <<'PY'
import math, struct, sys, wave
with wave.open(sys.argv[1], "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
    w.writeframes(b"".join(struct.pack("<h", int(12000 * math.sin(2 * math.pi * 440 * i / 16000))) for i in range(32000)))
PY
fi
SIZE=$(stat -c %s "$WAV")
DURATION=$(python3 -c 'import sys, wave; w = wave.open(sys.argv[1]); print(round(w.getnframes() / w.getframerate(), 3))' "$WAV")
cp "$WAV" "$WORK/original.wav"
echo "$WAV: $SIZE bytes, $DURATION s"

export AUDIO_GENERATION_SERVICE_URL="http://127.0.0.1:$STANDIN_PORT"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export S3_ENDPOINT="${S3_ENDPOINT:-http://127.0.0.1:${S3_PORT:-9000}}"
export S3_ACCESS_KEY_ID="${S3_ACCESS_KEY_ID:-audioworker}"
export S3_SECRET_ACCESS_KEY="${S3_SECRET_ACCESS_KEY:-audioworker-secret}"
export MONGODB_URI="${MONGODB_URI:-mongodb://127.0.0.1:${MONGO_PORT:-27017}}"
export MONGODB_DATABASE="${MONGODB_DATABASE:-audio_library}"
# Events are published `mandatory`: something must be bound to audio.events. In production the
# api-server binds its queue; here the worker declares one for the demo.
export AMQP_EVENTS_QUEUE=audio.events.demo
# The lossless and the lossy rendition beside the WAV (the waveform is on by default).
export RENDITIONS="${RENDITIONS:-flac,vorbis}"
export RUST_LOG="${RUST_LOG:-info}"
# /metrics, /healthz and /readyz: on :9090 unless something else holds it.
METRICS_PORT="${METRICS_PORT:-$(python3 -c 'import socket
s = socket.socket()
try:
    s.bind(("127.0.0.1", 9090))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')}"
export METRICS_ADDR="127.0.0.1:$METRICS_PORT"

say "starting the stand-in audio-generation service and the worker"
STANDIN_DIR="$WORK/audio" STANDIN_LISTEN="127.0.0.1:$STANDIN_PORT" "$BIN/audio-gen-standin" 2>"$WORK/standin.log" &
pids+=($!)
"$BIN/audio-worker" run 2>"$WORK/worker.log" &
pids+=($!)
for _ in $(seq 1 120); do
  grep -q '"consuming"' "$WORK/worker.log" 2>/dev/null && break
  if ! kill -0 "${pids[1]}" 2>/dev/null; then cat "$WORK/worker.log"; exit 1; fi
  sleep 0.25
done
grep -q '"consuming"' "$WORK/worker.log" || { echo "worker did not start:"; cat "$WORK/worker.log"; exit 1; }
echo "worker consuming (logs: JSON lines, one span per job)"

say "publishing the job and waiting for its completion event"
ASSET_ID=$(python3 -c 'import uuid; print(uuid.uuid4())')
"$BIN/audio-worker" publish \
  --asset-id "$ASSET_ID" --customer-id demo-customer --user-id demo_user \
  --audio-url "/temp/demo greeting.wav" --text "$TEXT" --duration "$DURATION" \
  --voice en --voice-name "eSpeak English" --language en-US --speed 1.0 --model espeak-ng \
  --folder demos --tag demo --tag espeak \
  --wait 60 >"$WORK/event.json"
cat "$WORK/event.json"
python3 - "$WORK/event.json" <<'PY'
import json, sys
a = json.load(open(sys.argv[1])).get("analysis")
if not a:
    print("analysis: none (ANALYSIS=off)")
elif "skipped" in a:
    print("analysis skipped: " + a["skipped"])
else:
    l, s = a["loudness"], a["silence"]
    fmt = lambda v, unit: "n/a" if v is None else f"{v:.1f} {unit}"
    print(f"analysis: {fmt(l['integrated_lufs'], 'LUFS')} integrated, true peak {fmt(l['true_peak_dbtp'], 'dBTP')}, "
          f"silence {s['leading_s']:.2f} s before / {s['trailing_s']:.2f} s after (below {s['threshold_dbfs']} dBFS), "
          f"{a['clipped_samples']} clipped samples, {a['codec']} {a['sample_rate']} Hz x {a['channels']}")
PY
python3 - "$WORK/event.json" <<'PY'
import json, sys, urllib.request
e = json.load(open(sys.argv[1]))
w = e.get("waveform")
if not w:
    print("waveform: none (WAVEFORM=off)")
elif "skipped" in w:
    print("waveform skipped: " + w["skipped"])
else:
    peaks = json.load(urllib.request.urlopen(w["url"]))
    print(f"waveform: {w['length']} pixels of {w['samples_per_pixel']} frames, {w['bits']} bits, "
          f"{len(peaks['data'])} values fetched from {w['url'].split('?')[0]}?<signature>")
for r in e.get("renditions", []):
    print(f"rendition {r['name']}: {r['content_type']}, {r['size']} bytes ({r['bytes_saved']} bytes saved), {r['key']}")
for r in e.get("renditions_skipped", []):
    print(f"rendition {r['name']} skipped: {r['reason']}")
PY

say "downloading the presigned URL"
URL=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["storage"]["url"])' "$WORK/event.json")
echo "GET ${URL%%\?*}?<signature>"
curl -fsS -o "$WORK/downloaded.wav" "$URL"
if cmp -s "$WORK/original.wav" "$WORK/downloaded.wav"; then
  echo "bytes identical: $(stat -c %s "$WORK/downloaded.wav") bytes, sha256 $(sha256sum "$WORK/downloaded.wav" | cut -d' ' -f1)"
else
  echo "MISMATCH between the WAV and the downloaded object" >&2
  exit 1
fi

say "the MongoDB document"
PY="$HOME_DIR/tools/venv/bin/python"
if ! "$PY" -c 'import pymongo' 2>/dev/null; then
  python3 -m venv "$HOME_DIR/tools/venv" && "$HOME_DIR/tools/venv/bin/pip" install -q pymongo
fi
"$PY" - "$MONGODB_URI" "$MONGODB_DATABASE" "$ASSET_ID" <<'PY'
import json, sys
from pymongo import MongoClient
doc = MongoClient(sys.argv[1], serverSelectionTimeoutMS=5000)[sys.argv[2]]["audio_assets"].find_one({"asset_id": sys.argv[3]}, {"_id": 0})
if doc is None:
    sys.exit("no document for " + sys.argv[3])
doc["storage"]["url"] = doc["storage"]["url"].split("?")[0] + "?<signature>"
print(json.dumps(doc, indent=2, default=str, ensure_ascii=False))
PY

say "the worker's readiness and metrics (http://$METRICS_ADDR)"
echo "GET /readyz: $(curl -sS "http://$METRICS_ADDR/readyz")"
curl -fsS "http://$METRICS_ADDR/metrics" \
  | grep -E '^audio_worker_(jobs_total|downloaded_bytes_total|uploaded_bytes_total|jobs_in_flight|ready|job_duration_seconds_(sum|count))' || true

say "a fresh URL for the saved asset (audio-worker url, as an audio.url.refresh request answers)"
"$BIN/audio-worker" url "$ASSET_ID" --customer-id demo-customer --user-id demo_user >"$WORK/fresh.json"
python3 - "$WORK/fresh.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"version {r['version']}: {r['storage']['key']}, valid until {r['storage']['url_expires_at']}"
      + (f", waveform {r['waveform']['key']}" if r.get("waveform") else "")
      + "".join(f", {x['name']} {x['key']}" for x in r.get("renditions", [])))
PY
FRESH=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["storage"]["url"])' "$WORK/fresh.json")
curl -fsS -o "$WORK/fresh.wav" "$FRESH"
cmp -s "$WORK/original.wav" "$WORK/fresh.wav" && echo "the fresh URL serves the same bytes"
echo "another tenant asking for it: $("$BIN/audio-worker" url "$ASSET_ID" --customer-id someone-else --user-id demo_user \
  | python3 -c 'import json, sys; r = json.load(sys.stdin); print(r["status"], r["error"])' || true)"

say "a CloudFront signed URL for the same asset (DELIVERY=cloudfront, a key pair made now)"
openssl genrsa -out "$WORK/cloudfront.pem" 2048 2>/dev/null
openssl rsa -in "$WORK/cloudfront.pem" -pubout -out "$WORK/cloudfront.pub.pem" 2>/dev/null
DELIVERY=cloudfront PUBLIC_BASE_URL=https://d111111abcdef8.cloudfront.net CLOUDFRONT_KEY_PAIR_ID=K2JCJMDEHXQW5F \
  CLOUDFRONT_PRIVATE_KEY_FILE="$WORK/cloudfront.pem" DELIVERY_URL_EXPIRY_SECS=3600 \
  "$BIN/audio-worker" url "$ASSET_ID" --customer-id demo-customer --user-id demo_user >"$WORK/cdn.json"
python3 - "$WORK/cdn.json" "$WORK" <<'PY'
import base64, json, sys, urllib.parse
url = json.load(open(sys.argv[1]))["storage"]["url"]
base, query = url.split("?", 1)
q = dict(urllib.parse.parse_qsl(query))
print(f"{base}?Expires={q['Expires']}&Signature=<{len(q['Signature'])} chars>&Key-Pair-Id={q['Key-Pair-Id']}")
policy = '{"Statement":[{"Resource":"%s","Condition":{"DateLessThan":{"AWS:EpochTime":%s}}}]}' % (base, q["Expires"])
open(f"{sys.argv[2]}/policy.json", "w").write(policy)
sig = q["Signature"].translate(str.maketrans("-_~", "+=/"))
open(f"{sys.argv[2]}/signature.bin", "wb").write(base64.b64decode(sig))
PY
echo "openssl, with the public key: $(openssl dgst -sha1 -verify "$WORK/cloudfront.pub.pem" -signature "$WORK/signature.bin" "$WORK/policy.json")"

say "a batch: three chapters and one missing file, one audio.batch.completed"
for n in 1 2 3; do
  if command -v espeak-ng >/dev/null 2>&1; then
    espeak-ng -w "$WORK/audio/chapter-$n.wav" "Chapter $n." 2>/dev/null
  else
    cp "$WORK/original.wav" "$WORK/audio/chapter-$n.wav"
  fi
  cp "$WORK/audio/chapter-$n.wav" "$WORK/chapter-$n.original.wav"
done
python3 - "$WORK/batch.json" <<'PY'
import json, sys, uuid
item = lambda n, f: {"asset_id": str(uuid.uuid4()), "audio_url": f"/temp/{f}", "text": f"Chapter {n}.",
                     "duration": 1.0, "voice": "en", "voice_name": "eSpeak English", "language": "en-US",
                     "speed": 1.0, "model": "espeak-ng"}
batch = {"batch_id": str(uuid.uuid4()), "customer_id": "demo-customer", "user_id": "demo_user",
         "folder": "audiobook", "tags": ["demo"],
         "items": [item(1, "chapter-1.wav"), item(2, "chapter-2.wav"), item(3, "chapter-3.wav"),
                   item(4, "chapter-4-never-made.wav")]}
json.dump(batch, open(sys.argv[1], "w"))
PY
"$BIN/audio-worker" publish-batch --file "$WORK/batch.json" --wait 60 >"$WORK/batch-event.json" || true
python3 - "$WORK/batch-event.json" "$WORK" <<'PY'
import json, sys, urllib.request
e, work = json.load(open(sys.argv[1])), sys.argv[2]
print(f"audio.batch.completed v{e['version']}: {e['status']}, {e['saved']} of {e['expected']} saved")
for i in e["items"]:
    print(f"  item {i['index']}: {i['status']}: " + (i["key"] if i["status"] == "saved" else i["reason"]))
m3u = urllib.request.urlopen(e["manifest"]["m3u"]["url"]).read().decode()
urls = [l for l in m3u.splitlines() if l and not l.startswith("#")]
print(f"playlist {e['manifest']['m3u']['key']}: {len(urls)} entries")
for n, url in enumerate(urls, 1):
    same = urllib.request.urlopen(url).read() == open(f"{work}/chapter-{n}.original.wav", "rb").read()
    print(f"  entry {n}: {'the chapter' + chr(39) + 's bytes' if same else 'MISMATCH'}")
    if not same:
        sys.exit(1)
manifest = json.load(urllib.request.urlopen(e["manifest"]["json"]["url"]))
print(f"manifest {e['manifest']['json']['key']}: {len(manifest['items'])} items, status {manifest['status']}")
if e["status"] != "partial":
    sys.exit("expected a partial batch")
PY

say "operator console: the missing chapter's dead letter, edited, then replayed"
# The console (audio-worker console) on a free port, logged into with curl as a browser would:
# the dead letter of chapter 4 is found by its asset id, its audio_url corrected to a file that
# now exists, and the edited job replayed; the chapter is then in the library.
CONSOLE_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CONSOLE_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
CONSOLE="http://127.0.0.1:$CONSOLE_PORT"
CONSOLE_ADDR="127.0.0.1:$CONSOLE_PORT" CONSOLE_TOKEN="$CONSOLE_TOKEN" "$BIN/audio-worker" console 2>"$WORK/console.log" &
pids+=($!)
for _ in $(seq 1 40); do curl -sf "$CONSOLE/healthz" >/dev/null && break; sleep 0.25; done
COOKIE=$(curl -s -D - -o /dev/null --data-urlencode "token=$CONSOLE_TOKEN" --data-urlencode "operator=demo" "$CONSOLE/login" \
  | tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: \([^;]*\);.*/\1/p')
[ -n "$COOKIE" ] || { echo "console login failed:"; cat "$WORK/console.log"; exit 1; }
CHAPTER4=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["items"][3]["asset_id"])' "$WORK/batch.json")
curl -s -H "Cookie: $COOKIE" "$CONSOLE/dead-letters?asset_id=$CHAPTER4" >"$WORK/console-dead-letters.html"
KEY=$(grep -o 'data-key="[0-9a-f]*"' "$WORK/console-dead-letters.html" | head -n 1 | cut -d'"' -f2)
CSRF=$(grep -o 'name="csrf" value="[0-9a-f]*"' "$WORK/console-dead-letters.html" | head -n 1 | cut -d'"' -f4)
[ -n "$KEY" ] || { echo "chapter 4's dead letter is not listed"; exit 1; }
echo "console $CONSOLE: chapter 4 is dead letter $KEY ($(grep -o 'HTTP 404[^<]*' "$WORK/console-dead-letters.html" | head -n 1))"
if command -v espeak-ng >/dev/null 2>&1; then espeak-ng -w "$WORK/audio/chapter-4.wav" "Chapter 4." 2>/dev/null
else cp "$WORK/original.wav" "$WORK/audio/chapter-4.wav"; fi
cp "$WORK/audio/chapter-4.wav" "$WORK/chapter-4.original.wav"
"$BIN/audio-worker" dlq show "$CHAPTER4" | python3 -c '
import json, sys
job = json.load(sys.stdin)["job"]
job["audio_url"] = "/temp/chapter-4.wav"
print(json.dumps(job))' >"$WORK/chapter-4.edited.json"
ACTION=$(curl -s -o /dev/null -w '%{redirect_url}' -H "Cookie: $COOKIE" --data-urlencode "csrf=$CSRF" \
  --data-urlencode "job@$WORK/chapter-4.edited.json" "$CONSOLE/dead-letters/$KEY/edit")
echo "edited audio_url to /temp/chapter-4.wav and replayed: $ACTION"
for _ in $(seq 1 60); do
  "$BIN/audio-worker" url "$CHAPTER4" --customer-id demo-customer --user-id demo_user >"$WORK/chapter-4.url.json" 2>/dev/null && break
  sleep 0.5
done
python3 - "$WORK/chapter-4.url.json" "$WORK/chapter-4.original.wav" <<'PY'
import json, sys, urllib.request
reply = json.load(open(sys.argv[1]))
if reply.get("status") != "ok":
    sys.exit(f"chapter 4 was not saved after the edit: {reply}")
same = urllib.request.urlopen(reply["storage"]["url"]).read() == open(sys.argv[2], "rb").read()
print(f"chapter 4 saved, version {reply['version']}: {'the bytes of the corrected file' if same else 'MISMATCH'}")
sys.exit(0 if same else 1)
PY
grep -o '"message":"action done"[^}]*' "$WORK/console.log" | head -n 1 | sed 's/^/console audit log: /' || true

say "audit: the catalog against the bucket (audio-worker audit)"
# Exit 1 means it found something: on a machine where SecantusDB (in memory) was restarted since
# an earlier demo, that run's objects are left in s3s-fs's folder without their documents.
"$BIN/audio-worker" audit --customer-id demo-customer --min-age 0s 2>/dev/null | tail -n 5 \
  || echo "(orphans here are earlier demo runs' objects whose documents went with a SecantusDB restart)"

say "cleanup of the temporary audio (DELETE on the stand-in)"
sleep 0.5
if [ -e "$WAV" ]; then echo "temporary file still there (cleanup is fire-and-forget)"; else echo "temporary file deleted by DELETE /api/cleanup/temp/demo%20greeting.wav"; fi
say "done"
