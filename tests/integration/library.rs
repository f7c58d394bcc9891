//! The library never lies (issue 11): each finding reproduced as it was described, against a
//! running worker and real services. A new take whose audio is gone is never reported as the
//! old save; a job whose document cannot be written leaves no object behind and never replaces
//! the previous bytes; a stale retry never wins over a newer save; duplicate failures carry the
//! same id; a save whose announcement failed is reported, not failed, when replayed.

use std::time::Duration;

use audio_worker::amqp::headers::{HEADER_REASON, HEADER_STAGE, header_str};
use lapin::BasicProperties;
use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;
use sha2::Digest;

use crate::helpers::{TestApp, WAIT, job, spawn_app_with, wav_tone};
use crate::services::{Gate, OwnServer, ReplyCut, Tripwire};

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn key_of(job: &serde_json::Value) -> String {
    format!("cust_42/user-7/audio/{}.wav", job["asset_id"].as_str().unwrap())
}

/// Every key a saved WAV take holds, as the bucket lists them: its waveform (`WAVEFORM=on`, the
/// default), then the audio.
fn keys_of(job: &serde_json::Value) -> [String; 2] {
    [format!("cust_42/user-7/audio/{}.peaks.json", job["asset_id"].as_str().unwrap()), key_of(job)]
}

/// The waveform object's SHA-256 and the one its document records: the waveform agrees with
/// the document like the audio.
async fn waveform_agrees(app: &TestApp, job: &serde_json::Value) {
    let doc = app.document(job["asset_id"].as_str().unwrap()).await.expect("a document");
    let waveform = doc.get_document("waveform").expect("a waveform");
    let key = waveform.get_str("key").unwrap();
    assert_eq!(key, keys_of(job)[0]);
    let bytes = app.get_object(key).await.unwrap().0;
    assert_eq!(sha256_hex(&bytes), waveform.get_str("sha256").unwrap(), "waveform object and document agree");
}

/// The document's `tts.text`, `version` and `checksum.sha256`.
async fn saved_state(app: &TestApp, job: &serde_json::Value) -> (String, i64, String) {
    let doc = app.document(job["asset_id"].as_str().unwrap()).await.expect("a document");
    (
        doc.get_document("tts").unwrap().get_str("text").unwrap().to_owned(),
        doc.get_i64("version").unwrap(),
        doc.get_document("checksum").unwrap().get_str("sha256").unwrap().to_owned(),
    )
}

/// Saves `take` (text "first take", audio `a.wav` = `wav`) and checks it is version 1.
async fn first_take(app: &mut TestApp, wav: &[u8]) -> serde_json::Value {
    app.add_audio("a.wav", wav);
    let mut first = job("/temp/a.wav");
    first["text"] = "first take".into();
    app.publish(&first).await;
    let saved = app.next_event().await;
    assert_eq!(saved.routing_key, "audio.saved", "{}", saved.json);
    assert_eq!(saved.json["version"], 1);
    first
}

/// Waits until the asset's document holds no save lease (a failed save gave it up).
async fn wait_for_no_lease(app: &TestApp, job: &serde_json::Value) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Some(doc) =
        app.document(job["asset_id"].as_str().unwrap()).await.filter(|d| d.contains_key("lease"))
    {
        assert!(tokio::time::Instant::now() < deadline, "the save lease was never given up: {doc}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A worker whose MongoDB (its own SecantusDB) sits behind a [`Gate`] and whose S3 (the shared
/// one) behind a [`Tripwire`] on `PUT `, with `RETRY_SCHEDULE=schedule`, two in-process attempts
/// and a 1 s server selection. MongoDB is cut off by the gate rather than killed: SecantusDB,
/// killed, may lose its last writes. The server is returned so it lives as long as the test.
async fn behind_gate_and_tripwire(schedule: &str) -> (TestApp, Gate, Tripwire, OwnServer) {
    let mongo = OwnServer::mongo().await;
    let gate = Gate::start(mongo.port).await;
    let wire = Tripwire::start(shared_s3_port(), "PUT ").await;
    let (mongo_url, s3_url) = (
        format!("mongodb://127.0.0.1:{}/?directConnection=true", gate.port),
        format!("http://127.0.0.1:{}", wire.port),
    );
    let app = spawn_app_with(&[
        ("MONGODB_URI", mongo_url.as_str()),
        ("S3_ENDPOINT", s3_url.as_str()),
        ("MONGODB_SERVER_SELECTION_TIMEOUT_SECS", "1"),
        ("RETRY_SCHEDULE", schedule),
        ("RETRY_MAX_ATTEMPTS", "2"),
        ("CLEANUP_TEMP_AUDIO", "false"),
    ])
    .await;
    (app, gate, wire, mongo)
}

fn shared_s3_port() -> u16 {
    let endpoint = crate::helpers::env_or("S3_ENDPOINT", "http://127.0.0.1:9000");
    url::Url::parse(&endpoint).unwrap().port_or_known_default().unwrap()
}

/// Finding 1: a second job for the asset whose audio answers 404 used to end as `audio.saved`
/// with the first save's version and event id. Now it fails, says why, and the first take stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_take_whose_audio_is_gone_is_not_reported_as_the_old_save() {
    let mut app = spawn_app_with(&[("CLEANUP_TEMP_AUDIO", "false")]).await;
    let wav = wav_tone(0.3);
    let first = first_take(&mut app, &wav).await;
    let mut second = first.clone();
    second["text"] = "second take".into();
    second["audio_url"] = "/temp/missing.wav".into();
    app.publish(&second).await;

    let event = app.next_event().await;
    assert_eq!(event.routing_key, "audio.failed", "{}", event.json);
    let reason = event.json["reason"].as_str().unwrap();
    assert!(reason.contains("HTTP 404"), "{reason}");
    assert!(reason.contains("the stored version 1 belongs to another job"), "{reason}");
    assert_eq!(event.json["stage"], "download");
    assert_eq!(event.json["error_class"], "permanent");
    let dead = app.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    let headers = dead[0].delivery.properties.headers().as_ref();
    assert!(header_str(headers, HEADER_REASON).unwrap().contains("belongs to another job"));
    assert_eq!(saved_state(&app, &first).await, ("first take".into(), 1, sha256_hex(&wav)));
    assert_eq!(app.get_object(&key_of(&first)).await.unwrap().0, wav);
    app.teardown().await;
}

/// Finding 2, first half: a job whose `text` is 17 MB (over MongoDB's 16 MB document limit) is
/// refused before its audio is even downloaded; the previous take's bytes stay, and a first save
/// leaves no object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_document_cannot_be_written_replaces_nothing_and_leaves_no_object() {
    let mut app = spawn_app_with(&[("CLEANUP_TEMP_AUDIO", "false")]).await;
    let wav = wav_tone(0.3);
    let first = first_take(&mut app, &wav).await;
    app.add_audio("b.wav", &wav_tone(0.4));
    let huge = "x".repeat(17_000_000);
    let mut second = first.clone();
    second["text"] = huge.as_str().into();
    second["audio_url"] = "/temp/b.wav".into();
    let mut fresh = job("/temp/b.wav");
    fresh["text"] = huge.as_str().into();
    app.publish(&second).await;
    app.publish(&fresh).await;

    for _ in 0..2 {
        let event = app.next_event().await;
        assert_eq!(event.routing_key, "audio.failed", "{}", event.json["reason"]);
        assert_eq!(event.json["stage"], "catalog");
        assert_eq!(event.json["error_class"], "permanent");
        assert!(
            event.json["reason"].as_str().unwrap().contains("over MongoDB's limit"),
            "{}",
            event.json["reason"]
        );
    }
    assert_eq!(app.standin.count("GET", "b.wav"), 0, "refused before the download");
    assert_eq!(app.drain_dlq().await.len(), 2);
    assert_eq!(saved_state(&app, &first).await, ("first take".into(), 1, sha256_hex(&wav)));
    assert_eq!(app.get_object(&key_of(&first)).await.unwrap().0, wav);
    assert_eq!(app.list_keys().await.unwrap(), keys_of(&first), "no object for the fresh asset, no backup");
    waveform_agrees(&app, &first).await;
    assert_eq!(app.document_count(fresh["asset_id"].as_str().unwrap()).await, 0);
    app.teardown().await;
}

/// Finding 2, second half: MongoDB goes away right after the upload started (the tripwire holds
/// the worker's first S3 write after it took the save lease until MongoDB is cut off), so the
/// catalog stage fails for good after the upload. The previous bytes are back under the key,
/// a first save's object is gone, and no backup is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_failure_after_the_upload_restores_the_previous_bytes() {
    let (mut app, gate, wire, _mongo) = behind_gate_and_tripwire("none").await;
    let wav = wav_tone(0.3);
    let first = first_take(&mut app, &wav).await;
    app.add_audio("b.wav", &wav_tone(0.4));
    let mut second = first.clone();
    second["text"] = "second take".into();
    second["audio_url"] = "/temp/b.wav".into();
    let fresh = job("/temp/b.wav");

    for take in [&second, &fresh] {
        wire.arm();
        app.publish(take).await;
        wire.tripped(WAIT).await;
        gate.close();
        wire.resume();
        let event = app.next_event().await;
        assert_eq!(event.routing_key, "audio.failed", "{}", event.json);
        assert_eq!(event.json["stage"], "catalog", "{}", event.json["reason"]);
        assert_eq!(event.json["error_class"], "transient");
        gate.open();
        wait_for_no_lease(&app, take).await;
    }
    assert_eq!(app.get_object(&key_of(&first)).await.unwrap().0, wav, "the previous bytes are back");
    assert_eq!(saved_state(&app, &first).await, ("first take".into(), 1, sha256_hex(&wav)));
    assert_eq!(app.list_keys().await.unwrap(), keys_of(&first), "no orphan, no backup");
    waveform_agrees(&app, &first).await;
    assert_eq!(app.document_count(fresh["asset_id"].as_str().unwrap()).await, 0);
    let dead = app.drain_dlq().await;
    let stages: Vec<_> =
        dead.iter().map(|m| header_str(m.delivery.properties.headers().as_ref(), HEADER_STAGE)).collect();
    assert_eq!(stages, [Some("catalog".to_owned()), Some("catalog".to_owned())]);
    app.teardown().await;
}

/// Finding 3: J1 (bytes A, published first) uploads, its catalog write fails and it waits in a
/// delay queue; J2 (bytes B, published later) saves; J1 comes back. It used to overwrite the
/// object and the document with the older audio as version 2; now it ends superseded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_retry_never_overwrites_a_newer_save() {
    let (mut app, gate, wire, _mongo) = behind_gate_and_tripwire("3s").await;
    let (bytes_a, bytes_b) = (wav_tone(0.3), wav_tone(0.4));
    app.add_audio("a.wav", &bytes_a);
    app.add_audio("b.wav", &bytes_b);
    let mut j1 = job("/temp/a.wav");
    j1["text"] = "older take".into();
    let mut j2 = j1.clone();
    j2["text"] = "newer take".into();
    j2["audio_url"] = "/temp/b.wav".into();
    let now = chrono::Utc::now().timestamp() as u64;
    let published_at = |secs| BasicProperties::default().with_timestamp(secs);
    // Start-up creates the bucket with a PUT: arm only once it is there.
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.list_keys().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the worker never made its bucket");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    wire.arm();
    app.publish_raw(&serde_json::to_vec(&j1).unwrap(), published_at(now - 10)).await;
    wire.tripped(WAIT).await;
    gate.close();
    wire.resume();
    let delay_queue = audio_worker::amqp::topology::delay_queue(&app.settings.amqp, 1);
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.queue_depth(&delay_queue).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "J1 never reached the delay queue");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gate.open();
    wait_for_no_lease(&app, &j1).await;
    app.publish_raw(&serde_json::to_vec(&j2).unwrap(), published_at(now)).await;

    let saved = app.next_event().await;
    assert_eq!(saved.routing_key, "audio.saved", "{}", saved.json);
    let superseded = app.next_event().await;
    assert_eq!(superseded.routing_key, "audio.failed", "{}", superseded.json);
    assert_eq!(superseded.json["superseded_by_version"], saved.json["version"]);
    let reason = superseded.json["reason"].as_str().unwrap();
    assert!(reason.starts_with(&format!("superseded by version {}", saved.json["version"])), "{reason}");
    let (text, version, sha) = saved_state(&app, &j1).await;
    assert_eq!((text.as_str(), sha), ("newer take", sha256_hex(&bytes_b)));
    assert_eq!(Some(version), saved.json["version"].as_i64());
    assert_eq!(app.get_object(&key_of(&j1)).await.unwrap().0, bytes_b);
    assert!(app.drain_dlq().await.is_empty(), "a superseded job is not dead-lettered");
    assert_eq!(app.list_keys().await.unwrap(), keys_of(&j1));
    waveform_agrees(&app, &j1).await;
    app.teardown().await;
}

/// Finding 3, second half: simultaneous saves of one asset with different bytes. S3's last
/// writer and MongoDB's last writer are the same job, and it is the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_takes_end_with_the_newest_in_both_stores() {
    let mut app =
        spawn_app_with(&[("CLEANUP_TEMP_AUDIO", "false"), ("RETRY_SCHEDULE", "500ms,1s,1s,2s")]).await;
    let base = job("/temp/t0.wav");
    let now = chrono::Utc::now().timestamp() as u64;
    let takes: Vec<Vec<u8>> = (0..6).map(|i| wav_tone(0.2 + 0.05 * f64::from(i))).collect();
    for (i, bytes) in takes.iter().enumerate() {
        app.add_audio(&format!("t{i}.wav"), bytes);
    }
    for i in 0..takes.len() {
        let mut take = base.clone();
        take["text"] = format!("take {i}").into();
        take["audio_url"] = format!("/temp/t{i}.wav").into();
        let properties = BasicProperties::default().with_timestamp(now + i as u64);
        app.publish_raw(&serde_json::to_vec(&take).unwrap(), properties).await;
    }
    let mut kinds = Vec::new();
    for _ in 0..takes.len() {
        let event = app.next_event().await;
        let superseded = event.json["superseded_by_version"].is_i64();
        assert!(event.routing_key == "audio.saved" || superseded, "{}", event.json);
        kinds.push(event.routing_key);
    }
    let newest = takes.last().unwrap();
    let (text, _, sha) = saved_state(&app, &base).await;
    assert_eq!((text.as_str(), sha.as_str()), ("take 5", sha256_hex(newest).as_str()), "{kinds:?}");
    assert_eq!(
        sha256_hex(&app.get_object(&key_of(&base)).await.unwrap().0),
        sha,
        "object and document agree"
    );
    assert!(app.drain_dlq().await.is_empty());
    assert_eq!(app.list_keys().await.unwrap(), keys_of(&base));
    waveform_agrees(&app, &base).await;
    app.teardown().await;
}

/// Finding 4: a job dead-lettered twice (here: the same job published twice, as a redelivery
/// after a lost ack would be) gives two `audio.failed` with one `event_id`; another job's
/// failure has another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_failures_carry_the_same_event_id() {
    let mut app = spawn_app_with(&[]).await;
    let missing = job("/temp/nowhere.wav");
    app.publish(&missing).await;
    app.publish(&missing).await;
    let other = job("/temp/nowhere.wav");
    app.publish(&other).await;
    let mut ids = std::collections::HashMap::<String, Vec<String>>::new();
    for _ in 0..3 {
        let event = app.next_event().await;
        assert_eq!(event.routing_key, "audio.failed");
        ids.entry(event.json["asset_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(event.json["event_id"].as_str().unwrap().to_owned());
    }
    let twice = &ids[missing["asset_id"].as_str().unwrap()];
    assert_eq!(twice.len(), 2);
    assert_eq!(twice[0], twice[1], "the same failure, the same id");
    assert_ne!(ids[other["asset_id"].as_str().unwrap()][0], twice[0]);
    assert_eq!(app.drain_dlq().await.len(), 3);
    app.teardown().await;
}

/// Finding 5: the save completed but `audio.saved` could not be published (nothing bound to the
/// events exchange), so the job was dead-lettered at the publish stage with the document saved.
/// Replayed after its temporary audio is gone, it reports that save instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_dead_lettered_after_its_save_reports_the_save_when_replayed() {
    let mut app = spawn_app_with(&[
        ("RETRY_SCHEDULE", "none"),
        ("RETRY_MAX_ATTEMPTS", "2"),
        ("CLEANUP_TEMP_AUDIO", "false"),
    ])
    .await;
    let amqp = app.settings.amqp.clone();
    let events_queue = amqp.events_queue.clone().unwrap();
    // A first job, so the worker has declared (and bound) its topology before the unbind.
    app.add_audio("warm-up.wav", &wav_tone(0.1));
    app.publish(&job("/temp/warm-up.wav")).await;
    assert_eq!(app.next_event().await.routing_key, "audio.saved");
    app.channel
        .queue_unbind(
            events_queue.as_str().into(),
            amqp.events_exchange.as_str().into(),
            "audio.#".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let wav = wav_tone(0.3);
    app.add_audio("a.wav", &wav);
    let saved = job("/temp/a.wav");
    app.publish(&saved).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.queue_depth(&amqp.dead_letter_queue).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the job was never dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, version, sha) = saved_state(&app, &saved).await;
    assert_eq!((version, sha), (1, sha256_hex(&wav)), "the save itself completed");
    app.channel
        .queue_bind(
            events_queue.as_str().into(),
            amqp.events_exchange.as_str().into(),
            "audio.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    std::fs::remove_file(app.standin.dir().join("a.wav")).unwrap();

    let policy = &app.settings.audio_gen.url_policy;
    let options = audio_worker::dlq::ReplayOptions::default();
    let summary = audio_worker::dlq::replay(&amqp, policy, &options, |_, _| {}).await.unwrap();
    assert_eq!(summary.moved, 1);
    let event = app.next_event().await;
    assert_eq!(event.routing_key, "audio.saved", "{}", event.json);
    assert_eq!(event.json["version"], 1);
    let asset: uuid::Uuid = saved["asset_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(event.json["event_id"], uuid::Uuid::new_v5(&asset, b"audio.saved/1").to_string());
    assert!(app.drain_dlq().await.is_empty());
    assert!(app.standin.count("GET", "a.wav") >= 2, "the replay asked for the audio and found it gone");
    app.teardown().await;
}

/// Found by the 10,000-asset soak: a commit that MongoDB applied but whose reply was lost, with
/// MongoDB out of reach right after (so the driver's own retry could not learn the result), was
/// taken for a failed one, and the worker "restored" S3: a first save's object was deleted, a
/// later take's bytes rolled back, while the document named them. The next take of that asset
/// then failed for good (`CopyObject … 404 NoSuchKey`). Now the worker asks the document whether
/// its commit landed before undoing anything, and undoes nothing while it cannot tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_reply_is_lost_keeps_the_bytes_its_document_names() {
    let endpoint = crate::helpers::env_or("MONGODB_URI", "mongodb://127.0.0.1:27017");
    let mongo_port =
        endpoint.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()).unwrap_or(27017);
    // The commit's update is the first request that names the lease it commits (the lease's own
    // requests name `lease`, the commit also `committed_lease`).
    let cut = ReplyCut::start(mongo_port, "committed_lease").await;
    let mongo_url = format!("mongodb://127.0.0.1:{}/?directConnection=true", cut.port);
    let mut app = spawn_app_with(&[
        ("MONGODB_URI", mongo_url.as_str()),
        ("MONGODB_SERVER_SELECTION_TIMEOUT_SECS", "1"),
        ("RETRY_MAX_ATTEMPTS", "2"),
        ("CLEANUP_TEMP_AUDIO", "false"),
        // A job that fails waits here for the rest of the test.
        ("RETRY_SCHEDULE", "10m"),
    ])
    .await;
    let (first_wav, second_wav) = (wav_tone(0.3), wav_tone(0.4));
    app.add_audio("first.wav", &first_wav);
    app.add_audio("second.wav", &second_wav);
    let mut first = job("/temp/first.wav");
    first["text"] = "first take".into();
    let asset = first["asset_id"].as_str().unwrap().to_owned();
    let key = format!("cust_42/user-7/audio/{asset}.wav");

    // The first save's commit lands, its reply is lost and MongoDB is out of reach for 4 s.
    cut.arm();
    app.publish(&first).await;
    cut.lost(WAIT).await;
    cut.close();
    tokio::time::sleep(Duration::from_secs(4)).await;
    cut.open();
    let delay_queue = audio_worker::amqp::topology::delay_queue(&app.settings.amqp, 1);
    let deadline = tokio::time::Instant::now() + WAIT;
    let first_outcome = loop {
        if let Ok(event) = tokio::time::timeout(Duration::from_millis(200), app.next_event()).await {
            break event.routing_key;
        }
        if app.queue_depth(&delay_queue).await == 1 {
            break "parked".to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "the first take has no outcome");
    };
    let doc = app.document(&asset).await.unwrap();
    assert_eq!(doc.get_str("status").unwrap(), "saved", "the commit landed");
    let checksum = doc
        .get_document("checksum")
        .and_then(|c| c.get_str("sha256"))
        .unwrap_or_else(|e| panic!("a saved document without its checksum ({e}): {doc:?}"))
        .to_owned();
    assert_eq!(checksum, sha256_hex(&first_wav));
    let (stored, _) = app.get_object(&key).await.unwrap_or_else(|e| {
        panic!("the object the document names is gone (first take {first_outcome}): {e}")
    });
    assert_eq!(sha256_hex(&stored), checksum, "the object is what its document says");

    // The next take replaces those bytes as usual.
    let mut second = job("/temp/second.wav");
    second["asset_id"] = asset.as_str().into();
    second["text"] = "second take".into();
    app.publish(&second).await;
    let event = loop {
        let event = app.next_event().await;
        if event.json["version"] == 2 || event.routing_key == "audio.failed" {
            break event;
        }
    };
    assert_eq!(event.routing_key, "audio.saved", "{}", event.json);
    let doc = app.document(&asset).await.unwrap();
    assert_eq!(doc.get_i64("version").unwrap(), 2);
    let checksum = doc.get_document("checksum").unwrap().get_str("sha256").unwrap().to_owned();
    assert_eq!(checksum, sha256_hex(&second_wav));
    let (stored, _) = app.get_object(&key).await.unwrap();
    assert_eq!(sha256_hex(&stored), checksum);
    assert!(app.drain_dlq().await.is_empty());
    app.teardown().await;
}
