#!/usr/bin/env bash
# Audit at scale, run by hand (not in CI): plants N small objects (default 100000, 1 KiB each)
# with their saved documents in a fresh bucket and database, damages three (one object deleted,
# one overwritten with other bytes of the same size, one orphan added), then runs
# `audio-worker audit --json` under /usr/bin/time -v and prints its counts, peak RSS and wall
# time. The audit must find exactly the three problems (exit 1); anything else fails the script.
# Usage: scripts/audit-scale.sh [--objects N] [--concurrency C] [--quick] [--release]
#   --release builds and runs the release binary (a cold release build takes ~15 min on 2
#   cores); by default the debug one, which the tests build anyway.
# Planting uses boto3 and pymongo from the tools venv (installed there when missing). The bucket
# and the database are left behind for a second look; SecantusDB keeps them in memory until
# `scripts/services.sh restart-mongo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/build-env.sh

objects=100000
concurrency=8
quick=""
profile=debug
while [ $# -gt 0 ]; do
  case "$1" in
    --objects) objects="$2"; shift 2 ;;
    --concurrency) concurrency="$2"; shift 2 ;;
    --quick) quick="--quick"; shift ;;
    --release) profile=release; shift ;;
    *) echo "usage: $0 [--objects N] [--concurrency C] [--quick] [--release]" >&2; exit 2 ;;
  esac
done

./scripts/services.sh up
PY="$AUDIO_WORKER_HOME/tools/venv/bin/python"
if ! "$PY" -c 'import boto3, pymongo' 2>/dev/null; then
  echo "[audit-scale] installing boto3 and pymongo into the tools venv" >&2
  "$PY" -m pip install -q boto3 pymongo >&2
fi

if [ "$profile" = release ]; then
  cargo build --locked --release --bin audio-worker
else
  cargo build --locked --bin audio-worker
fi
bin="$CARGO_TARGET_DIR/$profile/audio-worker"

id=$(date +%s)
export S3_ENDPOINT="${S3_ENDPOINT:-http://127.0.0.1:9000}"
export S3_ACCESS_KEY_ID="${S3_ACCESS_KEY_ID:-audioworker}"
export S3_SECRET_ACCESS_KEY="${S3_SECRET_ACCESS_KEY:-audioworker-secret}"
export S3_BUCKET="audit-scale-$id"
export MONGODB_URI="${MONGODB_URI:-mongodb://127.0.0.1:27017}"
export MONGODB_DATABASE="audit_scale_$id"
export MONGODB_OPERATION_TIMEOUT_SECS=120

echo "[audit-scale] planting $objects objects and documents in bucket $S3_BUCKET, database $MONGODB_DATABASE" >&2
plant_start=$(date +%s)
"$PY" - "$objects" <<'EOF'
import hashlib, os, sys, uuid
from concurrent.futures import ThreadPoolExecutor
import boto3, pymongo
from botocore.config import Config

n = int(sys.argv[1])
bucket = os.environ["S3_BUCKET"]
s3 = boto3.client(
    "s3", endpoint_url=os.environ["S3_ENDPOINT"], region_name="us-east-1",
    aws_access_key_id=os.environ["S3_ACCESS_KEY_ID"], aws_secret_access_key=os.environ["S3_SECRET_ACCESS_KEY"],
    config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, max_pool_connections=32,
                  request_checksum_calculation="when_required", response_checksum_validation="when_required"))
s3.create_bucket(Bucket=bucket)
collection = pymongo.MongoClient(os.environ["MONGODB_URI"])[os.environ["MONGODB_DATABASE"]]["audio_assets"]
collection.create_index("asset_id", unique=True, name="asset_id_unique")

def key_of(i, asset):
    return f"cust_{i % 10}/user-{i % 7}/audio/{asset}.wav"

def plant(i):
    asset = str(uuid.UUID(int=i + 1, version=4))
    body = os.urandom(1024)
    sha256 = hashlib.sha256(body).hexdigest()
    s3.put_object(Bucket=bucket, Key=key_of(i, asset), Body=body, ContentType="audio/wav", Metadata={"sha256": sha256})
    return {
        "asset_id": asset, "customer_id": f"cust_{i % 10}", "user_id": f"user-{i % 7}", "status": "saved",
        "version": 1,
        "storage": {"bucket": bucket, "key": key_of(i, asset), "size": 1024, "content_type": "audio/wav",
                    "etag": "", "url": "", "derived": []},
        "checksum": {"sha256": sha256},
    }

with ThreadPoolExecutor(32) as pool:
    batch = []
    for document in pool.map(plant, range(n), chunksize=64):
        batch.append(document)
        if len(batch) == 1000:
            collection.insert_many(batch)
            batch = []
    if batch:
        collection.insert_many(batch)

# The three problems: a missing object, a changed one (same size and metadata), an orphan.
first = collection.find_one({"asset_id": str(uuid.UUID(int=1, version=4))})
second = collection.find_one({"asset_id": str(uuid.UUID(int=2, version=4))})
s3.delete_object(Bucket=bucket, Key=first["storage"]["key"])
s3.put_object(Bucket=bucket, Key=second["storage"]["key"], Body=os.urandom(1024),
              Metadata={"sha256": second["checksum"]["sha256"]})
s3.put_object(Bucket=bucket, Key=f"cust_0/user-0/audio/{uuid.uuid4()}.wav", Body=b"orphan")
print(f"[audit-scale] planted {n} objects and documents", file=sys.stderr)
EOF
plant_seconds=$(( $(date +%s) - plant_start ))

out=$(mktemp)
timing=$(mktemp)
trap 'rm -f "$out" "$timing"' EXIT
echo "[audit-scale] running audio-worker audit --json --concurrency $concurrency $quick ($profile build)" >&2
set +e
RUST_LOG=warn /usr/bin/time -v "$bin" audit --json --min-age 0s --concurrency "$concurrency" $quick >"$out" 2>"$timing"
code=$?
set -e
summary=$("$PY" -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))["summary"]))' "$out")
rss_kib=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$timing")
wall=$(awk -F': ' '/Elapsed \(wall clock\) time/ { print $2 }' "$timing")
cpu_user=$(awk -F': ' '/User time/ { print $2 }' "$timing")
cpu_sys=$(awk -F': ' '/System time/ { print $2 }' "$timing")

echo "objects:      $objects (1 KiB each; planting took ${plant_seconds} s)"
echo "command:      audio-worker audit --json --min-age 0s --concurrency $concurrency $quick ($profile build)"
echo "exit status:  $code"
echo "summary:      $summary"
echo "peak RSS:     $(awk -v k="$rss_kib" 'BEGIN { printf "%.1f MiB", k / 1024 }')"
echo "wall time:    $wall (user ${cpu_user} s, system ${cpu_sys} s)"

# --quick trusts the metadata, which the changed object kept: it sees two problems, not three.
"$PY" - "$out" "$objects" "$quick" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))["summary"]
n, quick = int(sys.argv[2]), sys.argv[3] == "--quick"
mismatched = 0 if quick else 1
want = {"checked": n + 1, "ok": n - 1 - mismatched, "missing": 1, "mismatched": mismatched, "orphans": 1,
        "documents": n}
got = {k: summary[k] for k in want}
if got != want:
    sys.exit(f"[audit-scale] unexpected counts: {got}, expected {want}")
EOF
[ "$code" = 1 ] || { echo "[audit-scale] expected exit status 1, got $code" >&2; exit 1; }
