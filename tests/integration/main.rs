//! Integration tests against real RabbitMQ, S3 (s3s-fs) and MongoDB (SecantusDB). Start them
//! with `scripts/services.sh up` (scripts/test.sh does).

mod analysis;
mod audit;
mod batches;
mod browser;
mod cluster;
mod console;
mod contract;
mod deadlines;
mod delivery;
mod faults;
mod helpers;
mod hostile;
mod integrity;
mod large;
mod layout;
mod library;
mod operations;
mod processor;
mod refresh;
mod renditions;
mod services;
mod soak;

use std::time::Duration;

use audio_worker::amqp::headers::header_str;
use audio_worker::amqp::headers::{
    HEADER_ATTEMPTS, HEADER_ERROR_CLASS, HEADER_ORIGINAL_ROUTING_KEY, HEADER_REASON, HEADER_STAGE,
};
use audio_worker::standin::Fault;
use chrono::{DateTime, Utc};
use helpers::{job, spawn_app, spawn_app_with, wav_tone};
use lapin::BasicProperties;
use mongodb::bson::Bson;
use sha2::Digest;

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_stored_catalogued_announced_and_cleaned_up() {
    let mut app = spawn_app().await;
    let wav = wav_tone(0.5);
    // A name with a space and a non-ASCII letter: percent-encoded once on the way.
    app.add_audio("my file é.wav", &wav);
    let job = job("/temp/my file é.wav");
    let asset_id = job["asset_id"].as_str().unwrap().to_owned();
    let before = Utc::now();
    app.publish(&job).await;

    let event = app.next_event().await;
    assert_eq!(event.routing_key, "audio.saved");
    let e = &event.json;
    let key = format!("cust_42/user-7/audio/{asset_id}.wav");
    assert_eq!(e["event_type"], "audio.saved");
    assert_eq!(e["asset_id"], asset_id.as_str());
    assert_eq!(e["customer_id"], "cust_42");
    assert_eq!(e["user_id"], "user-7");
    assert_eq!(e["storage"]["bucket"], app.settings.s3.bucket.as_str());
    assert_eq!(e["storage"]["key"], key.as_str());
    assert_eq!(e["storage"]["size"], wav.len());
    assert_eq!(e["storage"]["content_type"], "audio/wav");
    assert_eq!(e["duration"], 1.5);
    assert_eq!(e["version"], 1);
    let expected_event_id = uuid::Uuid::new_v5(&asset_id.parse().unwrap(), b"audio.saved/1");
    assert_eq!(e["event_id"], expected_event_id.to_string());
    assert_eq!(event.properties.message_id().as_ref().unwrap().as_str(), expected_event_id.to_string());
    assert_eq!(e["storage"]["delivery"], "presigned");
    let expires: DateTime<Utc> = e["storage"]["url_expires_at"].as_str().unwrap().parse().unwrap();
    let week = chrono::Duration::seconds(604_800);
    assert!(expires >= before + week && expires <= Utc::now() + week, "{expires}");
    let occurred: DateTime<Utc> = e["occurred_at"].as_str().unwrap().parse().unwrap();
    assert!(occurred >= before);

    // The object: same bytes, content type and metadata.
    let (bytes, object) = app.get_object(&key).await.unwrap();
    assert_eq!(bytes, wav);
    assert_eq!(object.content_type(), Some("audio/wav"));
    let meta = object.metadata().unwrap();
    assert_eq!(meta.get("asset_id").map(String::as_str), Some(asset_id.as_str()));
    assert_eq!(meta.get("voice").map(String::as_str), Some("en-US-Neural-A"));
    assert_eq!(meta.get("model").map(String::as_str), Some("tts-hd"));
    assert_eq!(meta.get("language").map(String::as_str), Some("en-US"));
    assert_eq!(meta.get("duration").map(String::as_str), Some("1.5"));
    assert_eq!(meta.get("sha256"), Some(&sha256_hex(&wav)));

    // The presigned URL gives the same bytes to anyone holding it.
    let url = e["storage"]["url"].as_str().unwrap();
    assert!(url.contains("X-Amz-Signature=") && url.contains("X-Amz-Expires=604800"), "{url}");
    let fetched = reqwest::get(url).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), wav.as_slice());

    // The document: every field.
    let doc = app.document(&asset_id).await.expect("document");
    assert_eq!(doc.get_str("asset_id").unwrap(), asset_id);
    assert_eq!(doc.get_str("customer_id").unwrap(), "cust_42");
    assert_eq!(doc.get_str("user_id").unwrap(), "user-7");
    assert_eq!(doc.get_str("status").unwrap(), "saved");
    assert_eq!(doc.get_i64("version").unwrap(), 1);
    assert_eq!(doc.get_f64("duration").unwrap(), 1.5);
    assert_eq!(doc.get_str("folder").unwrap(), "greetings");
    let tags: Vec<&str> = doc.get_array("tags").unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tags, ["test", "hello"]);
    let tts = doc.get_document("tts").unwrap();
    assert_eq!(tts.get_str("text").unwrap(), "Hello from the test suite");
    assert_eq!(tts.get_str("voice").unwrap(), "en-US-Neural-A");
    assert_eq!(tts.get_str("voice_name").unwrap(), "Zoë");
    assert_eq!(tts.get_str("language").unwrap(), "en-US");
    assert_eq!(tts.get_f64("speed").unwrap(), 1.25);
    assert_eq!(tts.get_str("model").unwrap(), "tts-hd");
    let storage = doc.get_document("storage").unwrap();
    assert_eq!(storage.get_str("bucket").unwrap(), app.settings.s3.bucket);
    assert_eq!(storage.get_str("key").unwrap(), key);
    assert_eq!(storage.get_i64("size").unwrap(), wav.len() as i64);
    assert_eq!(storage.get_str("content_type").unwrap(), "audio/wav");
    assert!(!storage.get_str("etag").unwrap().is_empty());
    assert_eq!(storage.get_str("url").unwrap(), url);
    assert_eq!(storage.get_str("delivery").unwrap(), "presigned");
    assert_eq!(
        storage.get_datetime("url_expires_at").unwrap().timestamp_millis(),
        expires.timestamp_millis()
    );
    assert_eq!(doc.get_document("checksum").unwrap().get_str("sha256").unwrap(), sha256_hex(&wav));
    let created = doc.get_datetime("created_at").unwrap().timestamp_millis();
    let updated = doc.get_datetime("updated_at").unwrap().timestamp_millis();
    assert_eq!(created, updated);
    assert!(created >= before.timestamp_millis());

    // The stand-in was asked to delete its temporary file, and did.
    app.wait_for_requests("DELETE", "my file é.wav", 1).await;
    assert_eq!(app.standin.count("GET", "my file é.wav"), 1);
    assert!(!app.standin.dir().join("my file é.wav").exists());
    assert!(app.drain_dlq().await.is_empty());
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saving_the_same_asset_twice_gives_version_2_and_one_document() {
    let mut app = spawn_app_with(&[("CLEANUP_TEMP_AUDIO", "false")]).await;
    app.add_audio("a.wav", &wav_tone(0.2));
    let job = job("/temp/a.wav");
    let asset_id = job["asset_id"].as_str().unwrap().to_owned();
    app.publish(&job).await;
    let first = app.next_event().await.json;
    assert_eq!(first["version"], 1);
    let created =
        app.document(&asset_id).await.unwrap().get_datetime("created_at").unwrap().timestamp_millis();

    let second_wav = wav_tone(0.3);
    app.add_audio("a.wav", &second_wav);
    app.publish(&job).await;
    let second = app.next_event().await.json;
    assert_eq!(second["version"], 2);
    assert_ne!(second["event_id"], first["event_id"]);
    assert_eq!(second["storage"]["size"], second_wav.len());

    assert_eq!(app.document_count(&asset_id).await, 1);
    let doc = app.document(&asset_id).await.unwrap();
    assert_eq!(doc.get_i64("version").unwrap(), 2);
    assert_eq!(doc.get_datetime("created_at").unwrap().timestamp_millis(), created, "created_at is kept");
    assert!(doc.get_datetime("updated_at").unwrap().timestamp_millis() >= created);
    assert_eq!(doc.get_document("storage").unwrap().get_i64("size").unwrap(), second_wav.len() as i64);
    let (bytes, _) = app.get_object(first["storage"]["key"].as_str().unwrap()).await.unwrap();
    assert_eq!(bytes, second_wav);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_go_to_the_dlq_with_their_reason_and_the_worker_keeps_running() {
    let mut app = spawn_app().await;
    app.publish_raw(b"this is not json", BasicProperties::default()).await;
    let mut escaping = job("/temp/x.wav");
    escaping["customer_id"] = "../other-tenant".into();
    let escaping_id = escaping["asset_id"].as_str().unwrap().to_owned();
    app.publish(&escaping).await;
    let mut missing = job("/temp/x.wav");
    missing.as_object_mut().unwrap().remove("voice");
    app.publish(&missing).await;

    // Jobs run concurrently, so the three failures may come in any order.
    let mut reasons = Vec::new();
    for _ in 0..3 {
        let event = app.next_event().await;
        assert_eq!(event.routing_key, "audio.failed");
        assert_eq!(event.json["stage"], "parse");
        assert_eq!(event.json["error_class"], "permanent");
        assert_eq!(event.json["attempts"], 1);
        reasons.push(event.json["reason"].as_str().unwrap().to_owned());
    }
    for expected in ["invalid job JSON: expected", "invalid field customer_id", "missing field `voice`"] {
        assert!(reasons.iter().any(|r| r.contains(expected)), "{expected} not in {reasons:?}");
    }

    // Still consuming: a good job completes.
    app.add_audio("ok.wav", &wav_tone(0.1));
    let good = job("/temp/ok.wav");
    app.publish(&good).await;
    let event = app.next_event().await;
    assert_eq!(event.routing_key, "audio.saved");
    assert_eq!(event.json["asset_id"], good["asset_id"]);

    let dead = app.drain_dlq().await;
    assert_eq!(dead.len(), 3);
    let bodies: Vec<&[u8]> = dead.iter().map(|m| m.delivery.data.as_slice()).collect();
    assert!(bodies.contains(&b"this is not json".as_slice()));
    let escaped = dead
        .iter()
        .find(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.delivery.data).ok().as_ref() == Some(&escaping)
        })
        .expect("the escaping job is dead-lettered as it was sent");
    for message in &dead {
        let headers = message.delivery.properties.headers().as_ref();
        assert_eq!(header_str(headers, HEADER_STAGE).as_deref(), Some("parse"));
        assert_eq!(header_str(headers, HEADER_ERROR_CLASS).as_deref(), Some("permanent"));
        assert_eq!(header_str(headers, HEADER_ATTEMPTS).as_deref(), Some("1"));
        assert_eq!(
            header_str(headers, HEADER_ORIGINAL_ROUTING_KEY).as_deref(),
            Some(app.settings.amqp.job_queue.as_str())
        );
    }
    assert!(
        header_str(escaped.delivery.properties.headers().as_ref(), HEADER_REASON)
            .unwrap()
            .contains("customer_id")
    );
    assert!(app.get_object(&format!("../other-tenant/user-7/audio/{escaping_id}.wav")).await.is_err());
    assert_eq!(app.document_count(&escaping_id).await, 0);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_404_is_dead_lettered_without_retries() {
    let mut app = spawn_app().await;
    let job = job("/temp/missing.wav");
    app.publish(&job).await;
    let event = app.next_event().await;
    assert_eq!(event.routing_key, "audio.failed");
    assert_eq!(event.json["asset_id"], job["asset_id"]);
    assert_eq!(event.json["customer_id"], "cust_42");
    assert_eq!(event.json["stage"], "download");
    assert_eq!(event.json["error_class"], "permanent");
    assert_eq!(event.json["attempts"], 1);
    let reason = event.json["reason"].as_str().unwrap();
    assert!(reason.contains("404") && reason.contains("/temp/missing.wav"), "{reason}");
    assert_eq!(app.standin.count("GET", "missing.wav"), 1);

    let dead = app.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    let headers = dead[0].delivery.properties.headers().as_ref();
    assert_eq!(header_str(headers, HEADER_STAGE).as_deref(), Some("download"));
    assert_eq!(header_str(headers, HEADER_ATTEMPTS).as_deref(), Some("1"));
    assert!(header_str(headers, HEADER_REASON).unwrap().contains("HTTP 404"));
    assert_eq!(app.document_count(job["asset_id"].as_str().unwrap()).await, 0);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_503s_then_200_completes_after_two_retries() {
    let mut app = spawn_app().await;
    let wav = wav_tone(0.2);
    app.add_audio("flaky.wav", &wav);
    app.standin.script("flaky.wav", [Fault::Status(503), Fault::Status(503)]);
    let job = job("/temp/flaky.wav");
    app.publish(&job).await;
    let event = app.next_event().await;
    assert_eq!(event.routing_key, "audio.saved", "{}", event.json);
    assert_eq!(app.standin.count("GET", "flaky.wav"), 3);
    let (bytes, _) = app.get_object(event.json["storage"]["key"].as_str().unwrap()).await.unwrap();
    assert_eq!(bytes, wav);
    assert!(app.drain_dlq().await.is_empty());
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_download_faults_are_retried_then_dead_lettered_when_they_persist() {
    let mut app = spawn_app_with(&[("RETRY_MAX_ATTEMPTS", "3"), ("RETRY_SCHEDULE", "none")]).await;
    let wav = wav_tone(0.5);
    app.add_audio("cut.wav", &wav);
    app.add_audio("down.wav", &wav);
    // A body cut short and a hang past the read timeout are retried; the third GET succeeds.
    app.standin.script("cut.wav", [Fault::CloseEarly, Fault::Hang(Duration::from_secs(4))]);
    app.standin.script("down.wav", [Fault::Status(500), Fault::Status(502), Fault::Status(503)]);
    let cut = job("/temp/cut.wav");
    let down = job("/temp/down.wav");
    app.publish(&cut).await;
    app.publish(&down).await;

    let mut saved = None;
    let mut failed = None;
    for _ in 0..2 {
        let event = app.next_event().await;
        match event.routing_key.as_str() {
            "audio.saved" => saved = Some(event.json),
            _ => failed = Some(event.json),
        }
    }
    let saved = saved.expect("cut.wav saved");
    assert_eq!(saved["asset_id"], cut["asset_id"]);
    assert_eq!(app.standin.count("GET", "cut.wav"), 3);
    let failed = failed.expect("down.wav failed");
    assert_eq!(failed["asset_id"], down["asset_id"]);
    assert_eq!(failed["error_class"], "transient");
    assert_eq!(failed["attempts"], 3);
    assert!(failed["reason"].as_str().unwrap().contains("HTTP 503"), "{failed}");
    assert_eq!(app.standin.count("GET", "down.wav"), 3);
    let dead = app.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    let headers = dead[0].delivery.properties.headers().as_ref();
    assert_eq!(header_str(headers, HEADER_ERROR_CLASS).as_deref(), Some("transient"));
    assert_eq!(header_str(headers, HEADER_ATTEMPTS).as_deref(), Some("3"));
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_can_be_turned_off() {
    let mut app = spawn_app_with(&[("CLEANUP_TEMP_AUDIO", "false")]).await;
    app.add_audio("keep.wav", &wav_tone(0.1));
    app.publish(&job("/temp/keep.wav")).await;
    assert_eq!(app.next_event().await.routing_key, "audio.saved");
    // Cleanup would be spawned right after the ack; give it ample time to (not) happen.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.standin.count("DELETE", "keep.wav"), 0);
    assert!(app.standin.dir().join("keep.wav").exists());
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_receives_the_event_with_the_correlation_id() {
    let app = spawn_app().await;
    app.add_audio("reply.wav", &wav_tone(0.1));
    let job = job("/temp/reply.wav");
    // The producer side names a private reply queue and a fresh correlation id, and only
    // accepts an event carrying that id.
    let reply = audio_worker::producer::publish(
        &app.settings.amqp,
        &serde_json::to_vec(&job).unwrap(),
        Some(helpers::WAIT),
    )
    .await
    .unwrap()
    .expect("a reply");
    assert_eq!(reply.kind, "audio.saved");
    assert_eq!(reply.event["asset_id"], job["asset_id"]);
    assert_eq!(reply.event["version"], 1);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_urls_are_signed_for_the_public_endpoint() {
    // Same server, another host name: the URL must be signed for `localhost`, not rewritten.
    let s3_port = url::Url::parse(&helpers::env_or("S3_ENDPOINT", "http://127.0.0.1:9000"))
        .unwrap()
        .port()
        .unwrap_or(80);
    let public = format!("http://localhost:{s3_port}");
    let mut app =
        spawn_app_with(&[("S3_PUBLIC_ENDPOINT", &public), ("PRESIGNED_URL_EXPIRY_SECS", "3600")]).await;
    let wav = wav_tone(0.1);
    app.add_audio("pub.wav", &wav);
    app.publish(&job("/temp/pub.wav")).await;
    let event = app.next_event().await.json;
    let url = event["storage"]["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{public}/{}/cust_42/user-7/audio/", app.settings.s3.bucket)), "{url}");
    assert!(url.contains("X-Amz-Expires=3600"), "{url}");
    let fetched = reqwest::get(url).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), wav.as_slice());
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_cannot_take_over_an_asset_id() {
    let mut app = spawn_app_with(&[("CLEANUP_TEMP_AUDIO", "false")]).await;
    app.add_audio("mine.wav", &wav_tone(0.1));
    let mine = job("/temp/mine.wav");
    app.publish(&mine).await;
    assert_eq!(app.next_event().await.routing_key, "audio.saved");
    let mut theirs = mine.clone();
    theirs["customer_id"] = "intruder".into();
    app.publish(&theirs).await;
    let event = app.next_event().await.json;
    assert_eq!(event["stage"], "catalog");
    assert_eq!(event["error_class"], "permanent");
    assert!(event["reason"].as_str().unwrap().contains("another customer"), "{event}");
    let doc = app.document(mine["asset_id"].as_str().unwrap()).await.unwrap();
    assert_eq!(doc.get_str("customer_id").unwrap(), "cust_42");
    assert_eq!(doc.get_i64("version").unwrap(), 1);
    assert_eq!(app.drain_dlq().await.len(), 1);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_audio_is_a_permanent_error() {
    let mut app = spawn_app().await;
    app.add_audio("page.wav", b"<html><body>502 Bad Gateway</body></html>");
    let job = job("/temp/page.wav");
    app.publish(&job).await;
    let event = app.next_event().await.json;
    assert_eq!(event["stage"], "download");
    assert_eq!(event["error_class"], "permanent");
    assert!(event["reason"].as_str().unwrap().contains("not a WAV"), "{event}");
    assert_eq!(
        app.document(job["asset_id"].as_str().unwrap()).await.map(|d| d.get("version").cloned()),
        None::<Option<Bson>>
    );
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_job_with_the_same_bytes_keeps_its_version_and_event_id() {
    let mut app = spawn_app_with(&[("CLEANUP_TEMP_AUDIO", "false")]).await;
    let wav = wav_tone(0.2);
    app.add_audio("same.wav", &wav);
    let job = job("/temp/same.wav");
    let asset_id = job["asset_id"].as_str().unwrap().to_owned();
    app.publish(&job).await;
    let first = app.next_event().await.json;
    let updated =
        app.document(&asset_id).await.unwrap().get_datetime("updated_at").unwrap().timestamp_millis();
    app.publish(&job).await;
    let second = app.next_event().await.json;
    assert_eq!(first["version"], 1);
    assert_eq!(second["version"], 1);
    assert_eq!(second["event_id"], first["event_id"]);
    assert_eq!(app.document_count(&asset_id).await, 1);
    let doc = app.document(&asset_id).await.unwrap();
    assert_eq!(doc.get_i64("version").unwrap(), 1);
    assert_eq!(
        doc.get_datetime("updated_at").unwrap().timestamp_millis(),
        updated,
        "nothing changed but the URL"
    );
    assert_eq!(
        doc.get_document("storage").unwrap().get_str("url").unwrap(),
        second["storage"]["url"].as_str().unwrap()
    );
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_of_one_asset_give_one_document_and_no_dead_letter() {
    let mut app = spawn_app_with(&[("CLEANUP_TEMP_AUDIO", "false")]).await;
    app.add_audio("race.wav", &wav_tone(0.3));
    let job = job("/temp/race.wav");
    let asset_id = job["asset_id"].as_str().unwrap().to_owned();
    for _ in 0..4 {
        app.publish(&job).await;
    }
    let mut event_ids = std::collections::HashSet::new();
    for _ in 0..4 {
        let event = app.next_event().await;
        assert_eq!(event.routing_key, "audio.saved", "{}", event.json);
        assert_eq!(event.json["version"], 1);
        event_ids.insert(event.json["event_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(event_ids.len(), 1, "{event_ids:?}");
    assert_eq!(app.document_count(&asset_id).await, 1);
    assert!(app.drain_dlq().await.is_empty());
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_wait_in_delay_queues_and_free_the_consumer_slot() {
    let mut app = spawn_app_with(&[
        ("WORKER_PREFETCH", "1"),
        ("RETRY_MAX_ATTEMPTS", "1"),
        ("RETRY_SCHEDULE", "1s,1s,1s"),
        ("CLEANUP_TEMP_AUDIO", "false"),
    ])
    .await;
    let wav = wav_tone(0.2);
    app.add_audio("slow.wav", &wav);
    app.add_audio("dead.wav", &wav);
    app.add_audio("quick.wav", &wav);
    app.standin.script("slow.wav", [Fault::Status(503), Fault::Status(503), Fault::Status(503)]);
    app.standin.script("dead.wav", (0..10).map(|_| Fault::Status(503)));
    let slow = job("/temp/slow.wav");
    let dead = job("/temp/dead.wav");
    let quick = job("/temp/quick.wav");
    app.publish(&slow).await;
    app.publish(&dead).await;
    app.wait_for_requests("GET", "dead.wav", 1).await;
    // With one consumer slot, `quick` completes while the other two wait in delay queues.
    app.publish(&quick).await;
    let first = app.next_event().await;
    assert_eq!(first.routing_key, "audio.saved");
    assert_eq!(first.json["asset_id"], quick["asset_id"]);

    let mut outcomes = std::collections::HashMap::new();
    for _ in 0..2 {
        let event = app.next_event().await;
        outcomes.insert(event.json["asset_id"].as_str().unwrap().to_owned(), (event.routing_key, event.json));
    }
    let (kind, saved) = &outcomes[slow["asset_id"].as_str().unwrap()];
    assert_eq!(kind, "audio.saved", "{saved}");
    assert_eq!(app.standin.count("GET", "slow.wav"), 4, "one first delivery and three redeliveries");
    let (kind, failed) = &outcomes[dead["asset_id"].as_str().unwrap()];
    assert_eq!(kind, "audio.failed");
    assert_eq!(failed["error_class"], "transient");
    assert_eq!(failed["attempts"], 4);
    assert_eq!(app.standin.count("GET", "dead.wav"), 4);

    let dead_letters = app.drain_dlq().await;
    assert_eq!(dead_letters.len(), 1);
    let message = &dead_letters[0];
    let headers = message.delivery.properties.headers().as_ref();
    assert_eq!(header_str(headers, HEADER_STAGE).as_deref(), Some("download"));
    assert_eq!(header_str(headers, HEADER_ATTEMPTS).as_deref(), Some("4"));
    assert_eq!(
        header_str(headers, HEADER_ORIGINAL_ROUTING_KEY).as_deref(),
        Some(app.settings.amqp.job_queue.as_str())
    );
    let first_failed: DateTime<Utc> =
        header_str(headers, audio_worker::amqp::headers::HEADER_FIRST_FAILED_AT).unwrap().parse().unwrap();
    let last_failed: DateTime<Utc> =
        header_str(headers, audio_worker::amqp::headers::HEADER_FAILED_AT).unwrap().parse().unwrap();
    assert!(
        last_failed - first_failed >= chrono::Duration::milliseconds(2000),
        "{first_failed} {last_failed}"
    );
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&message.delivery.data).unwrap(), dead);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_can_be_listed_shown_replayed_and_purged() {
    use audio_worker::dlq::{self, Filter, ReplayOptions, Summary};
    let mut app = spawn_app_with(&[("CLEANUP_TEMP_AUDIO", "false")]).await;
    let jobs: Vec<_> = ["a.wav", "b.wav", "c.wav"].iter().map(|f| job(&format!("/temp/{f}"))).collect();
    for j in &jobs {
        app.publish_raw(
            &serde_json::to_vec(j).unwrap(),
            BasicProperties::default()
                .with_message_id(format!("msg-{}", j["asset_id"].as_str().unwrap()).into())
                .with_correlation_id("corr-1".into()),
        )
        .await;
    }
    app.publish_raw(b"{\"asset_id\": \"broken\"}", BasicProperties::default()).await;
    for _ in 0..4 {
        assert_eq!(app.next_event().await.routing_key, "audio.failed");
    }
    let amqp = &app.settings.amqp.clone();
    let listed = dlq::list(amqp, 10).await.unwrap();
    assert_eq!(listed.len(), 4);
    let order: Vec<Option<String>> = listed.iter().map(|d| d.asset_id.clone()).collect();
    let b_id = jobs[1]["asset_id"].as_str().unwrap().to_owned();
    let b = listed.iter().find(|d| d.asset_id.as_deref() == Some(b_id.as_str())).unwrap();
    assert_eq!(b.failure.stage.as_deref(), Some("download"));
    assert_eq!(b.failure.attempts, Some(1));
    assert!(b.failure.reason.as_deref().unwrap().contains("404"));
    assert!(b.failure.failed_at.is_some());

    let shown = dlq::show(amqp, &format!("msg-{b_id}")).await.unwrap().expect("found by message_id");
    assert_eq!(shown.job, jobs[1]);
    assert_eq!(shown.headers["audio-worker-stage"], "download");
    assert_eq!(dlq::list(amqp, 10).await.unwrap().len(), 4, "list and show leave the queue as it was");

    // The fault is gone: B's audio exists now. Replay B only.
    app.add_audio("b.wav", &wav_tone(0.2));
    let base = app.settings.audio_gen.url_policy.clone();
    let only_b = ReplayOptions {
        filter: Filter { asset_id: Some(b_id.clone()), ..Filter::default() },
        ..ReplayOptions::default()
    };
    let dry = dlq::replay(amqp, &base, &ReplayOptions { dry_run: true, ..only_b.clone() }, |_, _| {})
        .await
        .unwrap();
    assert_eq!(dry, Summary { moved: 1, skipped: 3, failed: 0 });
    assert_eq!(dlq::list(amqp, 10).await.unwrap().len(), 4, "a dry run moves nothing");
    let summary = dlq::replay(amqp, &base, &only_b, |_, _| {}).await.unwrap();
    assert_eq!(summary, Summary { moved: 1, skipped: 3, failed: 0 });
    let event = app.next_event().await;
    assert_eq!(event.routing_key, "audio.saved");
    assert_eq!(event.json["asset_id"], b_id.as_str());
    assert_eq!(event.properties.correlation_id().as_ref().unwrap().as_str(), "corr-1", "correlation id kept");

    // The others stay, in their order.
    let left: Vec<Option<String>> =
        dlq::list(amqp, 10).await.unwrap().iter().map(|d| d.asset_id.clone()).collect();
    let expected: Vec<Option<String>> =
        order.into_iter().filter(|id| id.as_deref() != Some(b_id.as_str())).collect();
    assert_eq!(left, expected);

    // A job that no longer parses is reported and stays.
    let all = dlq::replay(
        amqp,
        &base,
        &ReplayOptions {
            filter: Filter { asset_id: Some("broken".into()), ..Filter::default() },
            ..ReplayOptions::default()
        },
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(all, Summary { moved: 0, skipped: 2, failed: 1 });
    assert_eq!(dlq::list(amqp, 10).await.unwrap().len(), 3);

    let purged = dlq::purge(
        amqp,
        &Filter { stage: Some(audio_worker::error::Stage::Parse), ..Filter::default() },
        None,
    )
    .await
    .unwrap();
    assert_eq!(purged, Summary { moved: 1, skipped: 2, failed: 0 });
    let left = dlq::list(amqp, 10).await.unwrap();
    assert_eq!(left.len(), 2);
    assert!(left.iter().all(|d| d.failure.stage.as_deref() == Some("download")));
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_string_in_the_audio_url_never_reaches_headers_or_events() {
    let mut app = spawn_app_with(&[
        ("RETRY_MAX_ATTEMPTS", "1"),
        ("RETRY_SCHEDULE", "none"),
        ("AUDIO_URL_ALLOWED_HOSTS", "127.0.0.1"),
        ("AUDIO_URL_PRIVATE_HOSTS", "127.0.0.1"),
    ])
    .await;
    // Signed download URLs: their query is a credential. One answers 404, one refuses connections.
    app.publish(&job("/temp/secret.wav?token=hunter2")).await;
    app.publish(&job("http://127.0.0.1:1/secret.wav?token=hunter2")).await;
    for _ in 0..2 {
        let event = app.next_event().await;
        assert_eq!(event.routing_key, "audio.failed");
        let reason = event.json["reason"].as_str().unwrap();
        assert!(reason.contains("/secret.wav") && !reason.contains("hunter2"), "{reason}");
    }
    let dead = app.drain_dlq().await;
    assert_eq!(dead.len(), 2);
    for message in &dead {
        let header = header_str(message.delivery.properties.headers().as_ref(), HEADER_REASON).unwrap();
        assert!(!header.contains("hunter2"), "{header}");
    }
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_jobs_that_still_fail_ends_and_dead_letters_each_once_more() {
    use audio_worker::dlq::{self, ReplayOptions, Summary};
    let mut app = spawn_app_with(&[("RETRY_SCHEDULE", "none")]).await;
    let jobs: Vec<_> = (0..20).map(|i| job(&format!("/temp/gone{i}.wav"))).collect();
    for j in &jobs {
        app.publish(j).await;
    }
    app.outcomes(20, helpers::WAIT).await;
    let amqp = app.settings.amqp.clone();
    let base = app.settings.audio_gen.url_policy.clone();
    // The worker fails the replayed jobs again while the replay is still reading: the replay
    // must stop at the 20 messages that were there when it began.
    let summary =
        tokio::time::timeout(helpers::WAIT, dlq::replay(&amqp, &base, &ReplayOptions::default(), |_, _| {}))
            .await
            .expect("the replay ends")
            .unwrap();
    assert_eq!(summary, Summary { moved: 20, skipped: 0, failed: 0 });
    let outcomes = app.outcomes(20, helpers::WAIT).await;
    assert!(outcomes.values().all(|events| events.iter().all(|e| e.routing_key == "audio.failed")));
    assert_eq!(app.drain_dlq().await.len(), 20);
    for i in 0..20 {
        assert_eq!(
            app.standin.count("GET", &format!("gone{i}.wav")),
            2,
            "once before, once after the replay"
        );
    }
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_redelivered_after_its_audio_was_cleaned_up_reports_the_save() {
    let mut app = spawn_app().await;
    app.add_audio("once.wav", &wav_tone(0.2));
    let job = job("/temp/once.wav");
    app.publish(&job).await;
    let first = app.next_event().await;
    assert_eq!(first.routing_key, "audio.saved");
    app.wait_for_requests("DELETE", "once.wav", 1).await;
    // The producer publishes the same job again (or the broker redelivers it): the temporary
    // audio is gone, but the asset is saved, so that is the outcome.
    app.publish(&job).await;
    let second = app.next_event().await;
    assert_eq!(second.routing_key, "audio.saved", "{}", second.json);
    assert_eq!(second.json["event_id"], first.json["event_id"]);
    assert_eq!(second.json["version"], 1);
    assert_eq!(second.json["storage"]["key"], first.json["storage"]["key"]);
    let fetched = reqwest::get(second.json["storage"]["url"].as_str().unwrap()).await.unwrap();
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), wav_tone(0.2).as_slice());
    assert!(app.drain_dlq().await.is_empty());
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_ttl_does_not_make_the_dead_letter_expire() {
    let mut app = spawn_app().await;
    let job = job("/temp/missing.wav");
    app.publish_raw(
        &serde_json::to_vec(&job).unwrap(),
        BasicProperties::default().with_expiration("1500".into()),
    )
    .await;
    assert_eq!(app.next_event().await.routing_key, "audio.failed");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let dead = app.drain_dlq().await;
    assert_eq!(dead.len(), 1, "the dead letter is still there after the producer's TTL");
    assert_eq!(dead[0].delivery.properties.expiration(), &None);
    app.teardown().await;
}
