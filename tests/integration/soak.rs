//! The soak: `SOAK_JOBS` assets (default 200; `scripts/soak.sh --jobs N`) through two worker
//! processes while faults hit from every side, then the accounting, per published message and
//! per asset.
//!
//! The mix: clean jobs, some published twice; jobs whose generation-service requests fail first
//! (500, hang, connection closed early); missing audio and invalid jobs (dead-lettered);
//! regenerated assets, with two or three takes of different bytes published in random order
//! (the newest must win), some followed by a newer take whose audio is gone (dead-lettered, the
//! saved take stays). Cleanup of the temporary audio is on. Faults while the jobs flow: SIGKILL
//! of a worker, an S3 outage, a RabbitMQ restart, and MongoDB stopped right as a save's first
//! S3 write goes out (a catalog failure after the upload). The broker, S3 and MongoDB are the
//! test's own, so nothing shared is disturbed.
//!
//! The accounting, once the job and delay queues are empty: every published message has exactly
//! one outcome (one event id: duplicates of an event carry its id) and the dead letters it
//! should (one, or none); every asset's object hashes to its document's checksum, and the
//! document is the newest take's; one document and one object per saved asset, nothing else in
//! the bucket.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use audio_worker::standin::Fault;
use lapin::BasicProperties;
use sha2::Digest;

use crate::helpers::{WAIT, job, spawn_app_without_worker, wav_tone};
use crate::services::{OwnRabbit, OwnServer, Tripwire};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// Saved.
    Clean,
    /// Saved after transient download faults.
    Flaky,
    /// Audio missing: dead-lettered.
    Missing,
    /// Does not parse: dead-lettered.
    Invalid,
    /// One take of a regenerated asset: saved, or superseded by a newer take; never
    /// dead-lettered.
    Take,
    /// The newest take of a regenerated asset, its audio gone: dead-lettered.
    Gone,
}

impl Kind {
    fn dead_lettered(self) -> bool {
        matches!(self, Self::Missing | Self::Invalid | Self::Gone)
    }
}

/// One message to publish.
struct Message {
    body: serde_json::Value,
    kind: Kind,
    /// The AMQP `timestamp` (takes only: their order).
    timestamp: Option<u64>,
}

/// A dead letter's failing stage and attempts (its `audio-worker-stage` and
/// `audio-worker-attempts` headers).
type Failure = (Option<String>, Option<String>);

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let jobs: usize = std::env::var("SOAK_JOBS").ok().and_then(|n| n.parse().ok()).unwrap_or(200);
    let started = Instant::now();
    let mut rabbit = OwnRabbit::start().await;
    let mut s3 = OwnServer::s3().await;
    let mut mongo = OwnServer::mongo().await;
    let wire = Tripwire::start(s3.port, "PUT ").await;
    let (amqp, s3_url, mongo_url) =
        (rabbit.url(), format!("http://127.0.0.1:{}", wire.port), mongo.url("mongodb"));
    let mut app = spawn_app_without_worker(&[
        ("AMQP_URL", amqp.as_str()),
        ("S3_ENDPOINT", s3_url.as_str()),
        ("MONGODB_URI", mongo_url.as_str()),
        ("MONGODB_SERVER_SELECTION_TIMEOUT_SECS", "1"),
        ("RETRY_MAX_ATTEMPTS", "2"),
        ("RETRY_SCHEDULE", "300ms,500ms,1s,1s,2s,2s,3s,3s,5s,5s,5s,5s"),
        ("DOWNLOAD_READ_TIMEOUT_SECS", "1"),
        ("CLEANUP_TEMP_AUDIO", "true"),
        ("SAVE_LEASE_SECS", "3"),
        ("SHUTDOWN_GRACE_SECS", "10"),
    ])
    .await;
    let mut worker_a = app.start_worker_process(&[]);
    let worker_b = app.start_worker_process(&[]);

    // Deterministic mix, so a failure can be reproduced with the same SOAK_JOBS.
    let mut rng = fastrand::Rng::with_seed(42);
    let base_time = chrono::Utc::now().timestamp() as u64;
    // Per asset: the take that must end in the library (text and SHA-256), or None.
    let mut expected: HashMap<String, Option<(String, String)>> = HashMap::new();
    let mut messages = Vec::new();
    for i in 0..jobs {
        let name = format!("soak{i}.wav");
        let wav = wav_tone(0.05 + 0.001 * (i % 50) as f64);
        let roll = rng.u32(0..100);
        let mut j = job(&format!("/temp/{name}"));
        let asset = j["asset_id"].as_str().unwrap().to_owned();
        match roll {
            0..=59 => {
                app.add_audio(&name, &wav);
                expected.insert(asset, Some((j["text"].as_str().unwrap().to_owned(), sha256_hex(&wav))));
                // About 7 % are published twice (a producer retrying): still one document.
                let twice = rng.u32(0..100) < 7;
                messages.push(Message { body: j.clone(), kind: Kind::Clean, timestamp: None });
                if twice {
                    messages.push(Message { body: j, kind: Kind::Clean, timestamp: None });
                }
            }
            60..=74 => {
                app.add_audio(&name, &wav);
                let faults = (0..rng.u32(1..=3)).map(|_| match rng.u32(0..3) {
                    0 => Fault::Status(500),
                    1 => Fault::Hang(Duration::from_millis(1500)),
                    _ => Fault::CloseEarly,
                });
                app.standin.script(&name, faults);
                expected.insert(asset, Some((j["text"].as_str().unwrap().to_owned(), sha256_hex(&wav))));
                messages.push(Message { body: j, kind: Kind::Flaky, timestamp: None });
            }
            75..=79 => {
                expected.insert(asset, None);
                messages.push(Message { body: j, kind: Kind::Missing, timestamp: None });
            }
            80..=86 => {
                j["customer_id"] = "../not-a-tenant".into();
                expected.insert(asset, None);
                messages.push(Message { body: j, kind: Kind::Invalid, timestamp: None });
            }
            _ => {
                let takes = rng.u32(2..=3) as usize;
                let mut newest = None;
                for k in 0..takes {
                    let file = format!("soak{i}-take{k}.wav");
                    let bytes = wav_tone(0.05 + 0.01 * k as f64 + 0.001 * (i % 7) as f64);
                    app.add_audio(&file, &bytes);
                    let mut take = j.clone();
                    take["audio_url"] = format!("/temp/{file}").into();
                    take["text"] = format!("take {k} of asset {i}").into();
                    newest = Some((take["text"].as_str().unwrap().to_owned(), sha256_hex(&bytes)));
                    messages.push(Message {
                        body: take,
                        kind: Kind::Take,
                        timestamp: Some(base_time + k as u64),
                    });
                }
                if rng.u32(0..100) < 30 {
                    let mut gone = j.clone();
                    gone["audio_url"] = format!("/temp/soak{i}-gone.wav").into();
                    gone["text"] = format!("a take of asset {i} whose audio is gone").into();
                    messages.push(Message {
                        body: gone,
                        kind: Kind::Gone,
                        timestamp: Some(base_time + takes as u64),
                    });
                }
                expected.insert(asset, newest);
            }
        }
    }
    rng.shuffle(&mut messages);
    let published = messages.len();
    let properties = |n: usize, m: &Message| {
        let p = BasicProperties::default().with_correlation_id(format!("m{n}").into());
        match m.timestamp {
            Some(t) => p.with_timestamp(t),
            None => p,
        }
    };
    let quarter = published.div_ceil(4);
    let mut faults = Vec::new();
    let mut n = 0;
    let mut publish_batch = async |app: &mut crate::helpers::TestApp, batch: &[Message]| {
        for m in batch {
            app.publish_raw(&serde_json::to_vec(&m.body).unwrap(), properties(n, m)).await;
            n += 1;
        }
    };
    let mut batches = messages.chunks(quarter);

    publish_batch(&mut app, batches.next().unwrap_or_default()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker_a.kill();
    faults.push("SIGKILL of a worker");
    worker_a = app.start_worker_process(&[]);

    publish_batch(&mut app, batches.next().unwrap_or_default()).await;
    s3.stop().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    s3.start_again().await;
    faults.push("S3 down 4 s");

    publish_batch(&mut app, batches.next().unwrap_or_default()).await;
    rabbit.restart().await;
    app.reconnect().await;
    faults.push("RabbitMQ restarted");

    wire.arm();
    publish_batch(&mut app, batches.next().unwrap_or_default()).await;
    wire.tripped(WAIT).await;
    mongo.stop().await;
    wire.resume();
    tokio::time::sleep(Duration::from_secs(4)).await;
    mongo.start_again().await;
    faults.push("MongoDB down 4 s from a save's first S3 write");

    let limit = std::env::var("SOAK_LIMIT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(120 + jobs as u64 / 4), Duration::from_secs);
    let correlation = |e: &crate::helpers::ReceivedEvent| {
        e.properties.correlation_id().as_ref().map(|c| c.as_str().to_owned()).unwrap_or_default()
    };
    let mut outcomes = app.outcomes_by(correlation, published, limit).await;
    // Judge only once nothing is left to run: the job queue and every delay queue are empty.
    let settings = app.settings.clone();
    let mut queues = vec![settings.amqp.job_queue.clone()];
    queues.extend(
        (1..=settings.worker.retry_schedule.len())
            .map(|k| audio_worker::amqp::topology::delay_queue(&settings.amqp, k)),
    );
    let deadline = tokio::time::Instant::now() + limit;
    for queue in &queues {
        while app.queue_depth(queue).await > 0 {
            assert!(tokio::time::Instant::now() < deadline, "{queue} never emptied");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for late in app.more_events(Duration::from_secs(2)).await {
        outcomes.entry(correlation(&late)).or_default().push(late);
    }

    // Dead letters per message: (failing stage, attempts) of each copy. A copy confirmed whose
    // ack was lost (a worker killed, the broker restarted) is dead-lettered again: the same
    // failure, with the same `audio.failed` id, which consumers drop; two different failures of
    // one message fail the run.
    let mut dead: HashMap<String, Vec<Failure>> = HashMap::new();
    for message in app.drain_dlq().await {
        let properties = &message.delivery.properties;
        let id = properties.correlation_id().as_ref().map(|c| c.as_str().to_owned()).unwrap_or_default();
        let headers = properties.headers().as_ref();
        let failure = (
            audio_worker::amqp::headers::header_str(headers, audio_worker::amqp::headers::HEADER_STAGE),
            audio_worker::amqp::headers::header_str(headers, audio_worker::amqp::headers::HEADER_ATTEMPTS),
        );
        dead.entry(id).or_default().push(failure);
    }
    let mut duplicate_dead_letters = 0;
    let mut superseded = 0;
    let mut resaved = 0;
    let mut duplicate_events = 0;
    for (n, m) in messages.iter().enumerate() {
        let id = format!("m{n}");
        let events = outcomes.get(&id).map(Vec::as_slice).unwrap_or_default();
        let distinct: BTreeSet<(String, String)> = events
            .iter()
            .map(|e| (e.routing_key.clone(), e.json["event_id"].as_str().unwrap_or_default().to_owned()))
            .collect();
        // A take saved, then replaced by a newer take before its ack reached the broker, is
        // redelivered and ends superseded: saved, then superseded, each with its own id. Every
        // other message has exactly one outcome.
        let kinds: BTreeSet<&str> = distinct.iter().map(|(k, _)| k.as_str()).collect();
        let saved_then_superseded = m.kind == Kind::Take && distinct.len() == 2 && kinds.len() == 2;
        assert!(
            distinct.len() == 1 || saved_then_superseded,
            "message {id} ({:?}) has {} outcomes: {distinct:?}",
            m.kind,
            distinct.len()
        );
        resaved += usize::from(saved_then_superseded);
        duplicate_events += events.len() - distinct.len();
        // The last word: a superseded take's `audio.failed` when it has one.
        let event = events.iter().find(|e| e.routing_key == "audio.failed").unwrap_or(&events[0]);
        let copies = dead.get(&id).map(Vec::as_slice).unwrap_or_default();
        if m.kind.dead_lettered() {
            assert_eq!(event.routing_key, "audio.failed", "message {id} ({:?}): {}", m.kind, event.json);
            let failures: BTreeSet<_> = copies.iter().collect();
            assert_eq!(failures.len(), 1, "message {id} ({:?}) dead letters: {copies:?}", m.kind);
            duplicate_dead_letters += copies.len() - 1;
        } else {
            assert!(copies.is_empty(), "message {id} ({:?}) dead-lettered: {}", m.kind, event.json);
            let was_superseded = event.json["superseded_by_version"].is_i64();
            assert!(
                event.routing_key == "audio.saved" || (m.kind == Kind::Take && was_superseded),
                "message {id} ({:?}): {}",
                m.kind,
                event.json
            );
            superseded += usize::from(was_superseded);
        }
    }
    let dead_lettered = messages.iter().filter(|m| m.kind.dead_lettered()).count();
    assert_eq!(dead.len(), dead_lettered, "dead letters of messages that should have none");

    let mut keys = BTreeSet::new();
    for (asset, take) in &expected {
        let doc = app.document(asset).await;
        let Some((text, sha)) = take else {
            assert!(doc.is_none(), "{asset} has a document but should have none: {doc:?}");
            continue;
        };
        let doc = doc.unwrap_or_else(|| panic!("{asset} has no document"));
        assert_eq!(doc.get_str("status").unwrap(), "saved", "{asset}");
        assert_eq!(
            doc.get_document("tts").unwrap().get_str("text").unwrap(),
            text,
            "{asset}: the newest take"
        );
        let checksum = doc.get_document("checksum").unwrap().get_str("sha256").unwrap();
        assert_eq!(checksum, sha, "{asset}");
        let key = doc.get_document("storage").unwrap().get_str("key").unwrap().to_owned();
        let (bytes, _) = app.get_object(&key).await.unwrap();
        assert_eq!(sha256_hex(&bytes), checksum, "{asset}: the object is what its document says");
        if !text.starts_with("take ") {
            assert_eq!(doc.get_i64("version").unwrap(), 1, "{asset}: redeliveries did not bump the version");
        }
        keys.insert(key);
        // The waveform beside it agrees with the document too (WAVEFORM=on, the default).
        let waveform = doc.get_document("waveform").unwrap_or_else(|e| panic!("{asset}: no waveform: {e}"));
        let peaks = waveform.get_str("key").unwrap().to_owned();
        let (bytes, _) = app.get_object(&peaks).await.unwrap();
        assert_eq!(
            sha256_hex(&bytes),
            waveform.get_str("sha256").unwrap(),
            "{asset}: the waveform is what its document says"
        );
        keys.insert(peaks);
    }
    let saved = expected.values().filter(|t| t.is_some()).count();
    let documents = app.collection().count_documents(mongodb::bson::doc! {}).await.unwrap();
    assert_eq!(documents as usize, saved, "one document per saved asset");
    // A backup whose CopyObject answer was lost in the S3 outage, or that could not be deleted
    // after its commit, is deleted by the worker in the background once S3 answers (every 2 s):
    // give that a bounded while, then nothing but the saved objects may be left.
    let settle = tokio::time::Instant::now() + Duration::from_secs(20);
    let stored = loop {
        let stored: BTreeSet<String> = app.list_all_keys().await.into_iter().collect();
        if stored == keys || tokio::time::Instant::now() > settle {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(stored, keys, "the objects of each saved asset (audio and waveform): no orphan, no backup");

    let count = |k: Kind| messages.iter().filter(|m| m.kind == k).count();
    println!(
        "soak: {} assets, {published} messages (clean {}, flaky {}, missing {}, invalid {}, takes {}, gone {}), \
         saved assets {saved}, dead-lettered messages {dead_lettered} (duplicate copies {duplicate_dead_letters}), \
         superseded takes {superseded} ({resaved} of them after their own save), duplicate events {duplicate_events}, \
         documents {documents}, objects {}, faults: {}; took {:.1} s",
        expected.len(),
        count(Kind::Clean),
        count(Kind::Flaky),
        count(Kind::Missing),
        count(Kind::Invalid),
        count(Kind::Take),
        count(Kind::Gone),
        stored.len(),
        faults.join(", "),
        started.elapsed().as_secs_f64()
    );
    drop((worker_a, worker_b));
    app.teardown().await;
}
