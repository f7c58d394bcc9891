//! The soak: `SOAK_JOBS` jobs (default 200; `scripts/soak.sh --jobs N`) through two worker
//! processes while faults hit from every side, then the accounting: saved + dead-lettered =
//! published, no duplicate documents, one terminal outcome (one event id) per asset.
//!
//! Faults, in order while the jobs flow: generation-service errors on a share of the jobs (500,
//! hang, connection closed early), missing audio and invalid jobs (permanent), jobs published
//! twice, SIGKILL of a worker, an S3 outage, a RabbitMQ restart and a MongoDB outage. The broker,
//! S3 and MongoDB are the test's own, so nothing shared is disturbed.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use audio_worker::standin::Fault;

use crate::helpers::{job, spawn_app_without_worker, wav_tone};
use crate::services::{OwnRabbit, OwnServer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Clean,
    Flaky,
    Missing,
    Invalid,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let jobs: usize = std::env::var("SOAK_JOBS").ok().and_then(|n| n.parse().ok()).unwrap_or(200);
    let started = Instant::now();
    let mut rabbit = OwnRabbit::start().await;
    let mut s3 = OwnServer::s3().await;
    let mut mongo = OwnServer::mongo().await;
    let (amqp, s3_url, mongo_url) = (rabbit.url(), s3.url("http"), mongo.url("mongodb"));
    let mut app = spawn_app_without_worker(&[
        ("AMQP_URL", amqp.as_str()),
        ("S3_ENDPOINT", s3_url.as_str()),
        ("MONGODB_URI", mongo_url.as_str()),
        ("MONGODB_SERVER_SELECTION_TIMEOUT_SECS", "1"),
        ("RETRY_MAX_ATTEMPTS", "2"),
        ("RETRY_SCHEDULE", "300ms,500ms,1s,1s,2s,2s,3s,3s,5s,5s,5s,5s"),
        ("DOWNLOAD_READ_TIMEOUT_SECS", "1"),
        ("CLEANUP_TEMP_AUDIO", "false"),
        ("SHUTDOWN_GRACE_SECS", "10"),
    ])
    .await;
    let mut worker_a = app.start_worker_process(&[]);
    let worker_b = app.start_worker_process(&[]);

    // Deterministic mix, so a failure can be reproduced with the same SOAK_JOBS.
    let mut rng = fastrand::Rng::with_seed(42);
    let wav = wav_tone(0.05);
    let mut expected: HashMap<String, Kind> = HashMap::new();
    let mut bodies = Vec::new();
    for i in 0..jobs {
        let name = format!("soak{i}.wav");
        let roll = rng.u32(0..100);
        let kind = match roll {
            0..=69 => Kind::Clean,
            70..=84 => Kind::Flaky,
            85..=89 => Kind::Missing,
            _ => Kind::Invalid,
        };
        if kind != Kind::Missing {
            app.add_audio(&name, &wav);
        }
        if kind == Kind::Flaky {
            let faults = (0..rng.u32(1..=3)).map(|_| match rng.u32(0..3) {
                0 => Fault::Status(500),
                1 => Fault::Hang(Duration::from_millis(1500)),
                _ => Fault::CloseEarly,
            });
            app.standin.script(&name, faults);
        }
        let mut j = job(&format!("/temp/{name}"));
        if kind == Kind::Invalid {
            j["customer_id"] = "../not-a-tenant".into();
        }
        expected.insert(j["asset_id"].as_str().unwrap().to_owned(), kind);
        bodies.push(j.clone());
        // About 5 % are published twice (a producer retrying): still one document.
        if kind == Kind::Clean && rng.u32(0..100) < 7 {
            bodies.push(j);
        }
    }
    let published = bodies.len();
    let quarter = published.div_ceil(4);
    let mut batches = bodies.chunks(quarter);
    let mut faults = Vec::new();

    for j in batches.next().unwrap_or_default() {
        app.publish(j).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker_a.kill();
    faults.push("SIGKILL of a worker");
    worker_a = app.start_worker_process(&[]);

    for j in batches.next().unwrap_or_default() {
        app.publish(j).await;
    }
    s3.stop().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    s3.start_again().await;
    faults.push("S3 down 4 s");

    for j in batches.next().unwrap_or_default() {
        app.publish(j).await;
    }
    rabbit.restart().await;
    app.reconnect().await;
    faults.push("RabbitMQ restarted");

    for j in batches.next().unwrap_or_default() {
        app.publish(j).await;
    }
    mongo.stop().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    mongo.start_again().await;
    faults.push("MongoDB down 4 s");

    let limit = Duration::from_secs(120 + jobs as u64 / 10);
    let outcomes = app.outcomes(expected.len(), limit).await;
    // Late duplicates of events already counted have a moment to arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let dead: HashSet<String> = app
        .drain_dlq()
        .await
        .iter()
        .filter_map(|m| audio_worker::job::sniff_asset_id(&m.delivery.data))
        .collect();
    let mut saved = HashSet::new();
    let mut duplicate_events = 0;
    for (asset, events) in &outcomes {
        let kinds: HashSet<&str> = events.iter().map(|e| e.routing_key.as_str()).collect();
        assert_eq!(kinds.len(), 1, "{asset} has mixed outcomes: {kinds:?}");
        if kinds.contains("audio.saved") {
            let ids: HashSet<&str> = events.iter().filter_map(|e| e.json["event_id"].as_str()).collect();
            assert_eq!(ids.len(), 1, "{asset} was saved under several event ids: {ids:?}");
            saved.insert(asset.clone());
        }
        duplicate_events += events.len() - 1;
    }
    for (asset, kind) in &expected {
        let should_save = matches!(kind, Kind::Clean | Kind::Flaky);
        assert_eq!(saved.contains(asset), should_save, "{asset} ({kind:?}) saved?");
        assert_eq!(dead.contains(asset), !should_save, "{asset} ({kind:?}) dead-lettered?");
    }
    assert_eq!(saved.len() + dead.len(), expected.len(), "saved + dead-lettered = published");
    assert!(saved.is_disjoint(&dead));
    let documents = app.collection().count_documents(mongodb::bson::doc! {}).await.unwrap();
    assert_eq!(documents as usize, saved.len(), "one document per saved asset");
    for asset in &saved {
        let doc = app.document(asset).await.unwrap();
        assert_eq!(doc.get_i64("version").unwrap(), 1, "{asset}: redeliveries did not bump the version");
    }
    let count = |k: Kind| expected.values().filter(|v| **v == k).count();
    println!(
        "soak: {} jobs ({} messages published, {} duplicates), saved {}, dead-lettered {} (missing audio {}, invalid {}), \
         flaky jobs {}, duplicate events {}, documents {}, faults: {}; took {:.1} s",
        expected.len(),
        published,
        published - expected.len(),
        saved.len(),
        dead.len(),
        count(Kind::Missing),
        count(Kind::Invalid),
        count(Kind::Flaky),
        duplicate_events,
        documents,
        faults.join(", "),
        started.elapsed().as_secs_f64()
    );
    drop((worker_a, worker_b));
    app.teardown().await;
}
