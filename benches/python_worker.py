"""Seed-style Python baseline of audio-worker, for the throughput bench (benches/throughput.rs).

It is the same service as a Python team would write it: pika (blocking), requests, boto3 and
pymongo, one consumer per process with prefetch 1. The bench starts N of these processes with the
Rust worker's environment (AMQP_*, S3_*, MONGODB_*, AUDIO_GENERATION_SERVICE_URL, WORKER_TMP_DIR),
waits for the "consuming" log line of each, publishes its jobs and compares jobs/s, CPU per job
(utime+stime from /proc/<pid>/stat) and RSS with the Rust worker's.

Per job: GET the audio streamed to a temp file in 64 KiB chunks while hashing SHA-256, sniff the
format (WAV/MP3/Ogg/FLAC), put_object it to S3 and presign a 7-day GET URL, upsert the
`audio_assets` document ($inc version), publish `audio.saved` with publisher confirms, ack.
On any failure it publishes `audio.failed` (with the stage) and acks: no retries, no DLQ, no
size limit or URL policy. Those are the Rust worker's job, not the baseline's. SIGTERM stops
consuming after the current job and exits 0.

Run: python benches/python_worker.py (needs pip install pika requests boto3 pymongo).
"""
import datetime as dt
import hashlib
import json
import os
import signal
import sys
import tempfile
import urllib.parse
import uuid

import boto3
import pika
import requests
from botocore.config import Config
from botocore.exceptions import ClientError
from pymongo import MongoClient, ReturnDocument
from pymongo.errors import DuplicateKeyError

CHUNK = 64 * 1024
URL_EXPIRY = 7 * 24 * 3600
FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg", "ogg": "audio/ogg", "flac": "audio/flac"}
env = os.environ.get


def log(level, message, **fields):
    print(json.dumps({"level": level, "message": message, **fields}, separators=(",", ":")), flush=True)


def now():
    return dt.datetime.now(dt.timezone.utc)


def sniff(head):
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"fLaC":
        return "flac"
    return None


class Worker:
    def __init__(self):
        self.stopping = False
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.base_url = env("AUDIO_GENERATION_SERVICE_URL")
        self.tmp_dir = env("WORKER_TMP_DIR") or tempfile.gettempdir()
        self.events_exchange = env("AMQP_EVENTS_EXCHANGE")
        self.http = requests.Session()
        self.bucket = env("S3_BUCKET")
        self.s3 = boto3.client(
            "s3", endpoint_url=env("S3_ENDPOINT"), region_name=env("S3_REGION", "us-east-1"),
            aws_access_key_id=env("S3_ACCESS_KEY_ID"), aws_secret_access_key=env("S3_SECRET_ACCESS_KEY"),
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self.s3.create_bucket(Bucket=self.bucket)
            except ClientError as e:  # another process created it first
                if e.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        self.mongo = MongoClient(env("MONGODB_URI"))
        self.assets = self.mongo[env("MONGODB_DATABASE")]["audio_assets"]
        self.assets.create_index("asset_id", unique=True)
        self.connection = pika.BlockingConnection(pika.URLParameters(env("AMQP_URL")))
        ch = self.channel = self.connection.channel()
        quorum = {"x-queue-type": "quorum"}
        job_exchange, self.job_queue = env("AMQP_JOB_EXCHANGE"), env("AMQP_JOB_QUEUE")
        ch.exchange_declare(job_exchange, exchange_type="direct", durable=True)
        ch.queue_declare(self.job_queue, durable=True, arguments=quorum)
        ch.queue_bind(self.job_queue, job_exchange, routing_key=self.job_queue)
        ch.exchange_declare(self.events_exchange, exchange_type="topic", durable=True)
        ch.queue_declare(env("AMQP_EVENTS_QUEUE"), durable=True, arguments=quorum)
        ch.queue_bind(env("AMQP_EVENTS_QUEUE"), self.events_exchange, routing_key="audio.#")
        ch.confirm_delivery()
        ch.basic_qos(prefetch_count=1)

    def stop(self, _signum, _frame):
        self.stopping = True  # checked between jobs: the current one finishes

    def publish(self, routing_key, event):
        self.channel.basic_publish(
            self.events_exchange, routing_key, json.dumps(event).encode(),
            pika.BasicProperties(content_type="application/json", delivery_mode=2))

    def download(self, job, path):
        url = urllib.parse.urljoin(self.base_url, job["audio_url"])
        sha, size, head = hashlib.sha256(), 0, b""
        with self.http.get(url, stream=True, timeout=(10, 60)) as response, open(path, "wb") as f:
            response.raise_for_status()
            for chunk in response.iter_content(CHUNK):
                if len(head) < 12:
                    head += chunk[:12 - len(head)]
                sha.update(chunk)
                f.write(chunk)
                size += len(chunk)
        fmt = sniff(head)
        if fmt is None:
            raise ValueError(f"not WAV/MP3/Ogg/FLAC audio (starts with {head[:12]!r})")
        return fmt, size, sha.hexdigest()

    def upload(self, job, path, fmt, size, sha256):
        key = f"{job['customer_id']}/{job['user_id']}/audio/{job['asset_id']}.{fmt}"
        meta = {"asset_id": job["asset_id"], "customer_id": job["customer_id"],
                "user_id": job["user_id"], "sha256": sha256}
        with open(path, "rb") as f:
            put = self.s3.put_object(Bucket=self.bucket, Key=key, Body=f, ContentType=FORMATS[fmt],
                                     ContentLength=size, Metadata=meta)
        url = self.s3.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=URL_EXPIRY)
        return {"bucket": self.bucket, "key": key, "size": size, "content_type": FORMATS[fmt],
                "etag": put["ETag"].strip('"'), "url": url}

    def catalog(self, job, storage, sha256):
        t = now()
        tts = {k: job.get(k) for k in ("text", "voice", "voice_name", "language", "speed", "model")}
        doc = self.assets.find_one_and_update(
            {"asset_id": job["asset_id"], "customer_id": job["customer_id"], "user_id": job["user_id"]},
            {"$set": {"status": "saved", "storage": storage, "checksum": {"sha256": sha256}, "tts": tts,
                      "duration": job["duration"], "folder": job.get("folder"), "tags": job.get("tags"),
                      "updated_at": t},
             "$setOnInsert": {"created_at": t}, "$inc": {"version": 1}},
            upsert=True, return_document=ReturnDocument.AFTER, projection={"version": True})
        return doc["version"]

    def handle(self, body):
        stage, job = "parse", {}
        fd, path = tempfile.mkstemp(prefix="audio-", suffix=".part", dir=self.tmp_dir)
        os.close(fd)
        try:
            job = json.loads(body)
            asset_id = job["asset_id"] = str(uuid.UUID(job["asset_id"]))
            stage = "download"
            fmt, size, sha256 = self.download(job, path)
            stage = "upload"
            storage = self.upload(job, path, fmt, size, sha256)
            expires = now() + dt.timedelta(seconds=URL_EXPIRY)
            stage = "catalog"
            try:
                version = self.catalog(job, storage, sha256)
            except DuplicateKeyError:
                raise ValueError(f"asset {asset_id} belongs to another customer/user") from None
            stage = "publish"
            self.publish("audio.saved", {
                "event_id": str(uuid.uuid5(uuid.UUID(asset_id), f"audio.saved/{version}")),
                "event_type": "audio.saved", "asset_id": asset_id,
                "customer_id": job["customer_id"], "user_id": job["user_id"],
                "storage": {**storage, "url_expires_at": expires.isoformat()},
                "duration": job["duration"], "version": version, "occurred_at": now().isoformat()})
        except Exception as e:
            asset_id = job.get("asset_id") if isinstance(job, dict) else None
            log("ERROR", "job failed", asset_id=asset_id, stage=stage, reason=str(e))
            self.publish("audio.failed", {"event_type": "audio.failed", "asset_id": asset_id,
                                          "reason": str(e), "stage": stage,
                                          "occurred_at": now().isoformat()})
        finally:
            os.remove(path)

    def run(self):
        log("INFO", "consuming")
        for method, _props, body in self.channel.consume(self.job_queue, inactivity_timeout=1.0):
            if self.stopping:
                break
            if method is not None:
                self.handle(body)
                self.channel.basic_ack(method.delivery_tag)
        self.channel.cancel()  # requeues anything delivered but not yet handled
        self.connection.close()


def main():
    worker = Worker()
    worker.run()
    log("INFO", "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
