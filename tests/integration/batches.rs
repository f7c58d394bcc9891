//! Batches (`audio.save.batch`): one completion event per batch with its manifest, the same
//! batch published twice, replayed items, fairness towards other tenants' jobs, and refusals.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use audio_worker::standin::Fault;
use futures_util::StreamExt;
use lapin::BasicProperties;
use mongodb::bson::doc;

use crate::helpers::{ReceivedEvent, TestApp, spawn_app_with, wav_tone};

const CUSTOMER: &str = "cust_42";
const USER: &str = "user-7";

/// A batch item for `file` with a fresh asset id (the tenant is the batch's).
fn item(file: &str, text: &str) -> serde_json::Value {
    serde_json::json!({
        "asset_id": uuid::Uuid::new_v4().to_string(),
        "audio_url": format!("/temp/{file}"),
        "text": text, "duration": 0.5, "voice": "v", "voice_name": "Ada", "language": "en-US",
        "speed": 1.0, "model": "tts-1"
    })
}

fn batch(items: Vec<serde_json::Value>) -> serde_json::Value {
    serde_json::json!({
        "batch_id": uuid::Uuid::new_v4().to_string(),
        "customer_id": CUSTOMER, "user_id": USER, "folder": "book", "tags": ["chapter"],
        "items": items
    })
}

async fn publish_batch(app: &TestApp, batch: &serde_json::Value, properties: BasicProperties) {
    let key = app.settings.amqp.batch_queue();
    app.publish_to(&key, &serde_json::to_vec(batch).unwrap(), properties).await;
}

/// Events until the first `audio.batch.completed`, which is returned with the others.
async fn until_completed(app: &mut TestApp, limit: Duration) -> (ReceivedEvent, Vec<ReceivedEvent>) {
    let deadline = Instant::now() + limit;
    let mut others = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "no audio.batch.completed; saw {:?}", routing_keys(&others));
        let event = app.next_event().await;
        if event.routing_key == "audio.batch.completed" {
            return (event, others);
        }
        others.push(event);
    }
}

fn routing_keys(events: &[ReceivedEvent]) -> Vec<String> {
    events.iter().map(|e| e.routing_key.clone()).collect()
}

async fn fetch(url: &str) -> (u16, Vec<u8>) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn a_batch_with_a_missing_file_completes_once_as_partial_with_its_manifest() {
    let mut app = spawn_app_with(&[("WAVEFORM", "off")]).await;
    let mut audio = HashMap::new();
    let mut items = Vec::new();
    for i in 0..5 {
        let file = format!("chapter-{i}.wav");
        let bytes = wav_tone(0.2 + f64::from(i) * 0.05);
        if i != 3 {
            app.add_audio(&file, &bytes);
        }
        let it = item(&file, &format!("Chapter {i},\nread aloud"));
        audio.insert(it["asset_id"].as_str().unwrap().to_owned(), bytes);
        items.push(it);
    }
    let batch = batch(items.clone());
    let batch_id = batch["batch_id"].as_str().unwrap().to_owned();
    let (reply_to, mut replies) = app.reply_queue().await;
    let properties =
        BasicProperties::default().with_reply_to(reply_to.as_str().into()).with_correlation_id("c-17".into());
    publish_batch(&app, &batch, properties).await;

    let (completed, others) = until_completed(&mut app, Duration::from_secs(60)).await;
    let done = &completed.json;
    assert_eq!(done["event_type"], "audio.batch.completed");
    assert_eq!(done["batch_id"], batch_id);
    assert_eq!((done["customer_id"].as_str(), done["user_id"].as_str()), (Some(CUSTOMER), Some(USER)));
    assert_eq!(done["status"], "partial", "{done}");
    assert_eq!(
        (done["expected"].as_i64(), done["saved"].as_i64(), done["failed"].as_i64()),
        (Some(5), Some(4), Some(1))
    );
    assert_eq!(done["version"], 1);
    let batch_uuid: uuid::Uuid = batch_id.parse().unwrap();
    assert_eq!(done["event_id"], uuid::Uuid::new_v5(&batch_uuid, b"audio.batch.completed/1").to_string());
    assert_eq!(completed.properties.kind().as_ref().map(|k| k.as_str()), Some("audio.batch.completed"));
    // Every item settled before the batch did: four saves, one failure.
    let mut kinds = routing_keys(&others);
    kinds.sort();
    assert_eq!(kinds, ["audio.failed", "audio.saved", "audio.saved", "audio.saved", "audio.saved"]);
    for saved in others.iter().filter(|e| e.routing_key == "audio.saved") {
        assert_eq!(saved.json["batch_id"], batch_id, "{}", saved.json);
    }

    let listed = done["items"].as_array().unwrap();
    assert_eq!(listed.len(), 5);
    for (i, (entry, sent)) in listed.iter().zip(&items).enumerate() {
        let asset = sent["asset_id"].as_str().unwrap();
        assert_eq!(entry["index"], i);
        assert_eq!(entry["asset_id"], asset);
        if i == 3 {
            assert_eq!(entry["status"], "failed");
            assert_eq!(entry["stage"], "download");
            assert!(entry["reason"].as_str().unwrap().contains("404"), "{entry}");
            assert!(entry.get("url").is_none());
            continue;
        }
        assert_eq!(entry["status"], "saved", "{entry}");
        assert_eq!(entry["key"], format!("{CUSTOMER}/{USER}/audio/{asset}.wav"));
        let (status, bytes) = fetch(entry["url"].as_str().unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(bytes, audio[asset], "item {i}'s URL serves its own audio");
        // The document of an item carries the batch's folder and tags.
        let document = app.document(asset).await.unwrap();
        assert_eq!(document.get_str("folder").ok(), Some("book"));
    }

    // The manifest files sit beside the batch's audio and say the same.
    let manifest = &done["manifest"];
    assert_eq!(manifest["json"]["key"], format!("{CUSTOMER}/{USER}/batches/{batch_id}.json"));
    assert_eq!(manifest["m3u"]["key"], format!("{CUSTOMER}/{USER}/batches/{batch_id}.m3u"));
    let (status, json) = fetch(manifest["json"]["url"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(json["items"], done["items"]);
    assert_eq!((json["status"].as_str(), json["version"].as_i64()), (Some("partial"), Some(1)));
    let (status, m3u) = fetch(manifest["m3u"]["url"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    let m3u = String::from_utf8(m3u).unwrap();
    let lines: Vec<&str> = m3u.lines().collect();
    assert_eq!(lines[0], "#EXTM3U");
    assert_eq!(lines.len(), 1 + 2 * 4, "{m3u}");
    for (n, i) in [0, 1, 2, 4].into_iter().enumerate() {
        assert_eq!(lines[1 + 2 * n], format!("#EXTINF:0.500,Chapter {i}, read aloud"));
        let asset = items[i]["asset_id"].as_str().unwrap();
        let (status, bytes) = fetch(lines[2 + 2 * n]).await;
        assert_eq!((status, bytes == audio[asset]), (200, true), "playlist entry {n} is item {i}'s audio");
    }

    // The reply_to got the same event, with the batch's correlation id.
    let reply =
        tokio::time::timeout(Duration::from_secs(10), replies.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(reply.properties.correlation_id().as_ref().map(|c| c.as_str()), Some("c-17"));
    let reply: serde_json::Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(reply["event_id"], done["event_id"]);

    // Exactly one completion.
    let late = app.more_events(Duration::from_secs(2)).await;
    assert!(late.iter().all(|e| e.routing_key != "audio.batch.completed"), "{:?}", routing_keys(&late));
    let record = app.batches().await.find_one(doc! { "_id": &batch_id }).await.unwrap().unwrap();
    assert_eq!((record.get_i64("expected"), record.get_i64("terminal")), (Ok(5), Ok(5)));
    assert_eq!(record.get_str("status"), Ok("partial"));

    // The missing file turns up and the dead letter is replayed: the batch is corrected.
    app.add_audio("chapter-3.wav", &audio[items[3]["asset_id"].as_str().unwrap()]);
    let dead = app.drain_dlq().await;
    assert_eq!(dead.len(), 1, "the failed item is dead-lettered");
    for message in dead {
        let original = message.delivery.routing_key.as_str().to_owned();
        assert_eq!(original, app.settings.amqp.batch_items_queue());
        let properties = BasicProperties::default()
            .with_message_id(message.delivery.properties.message_id().clone().unwrap_or_default());
        app.publish_to(&original, &message.delivery.data, properties).await;
    }
    let (corrected, others) = until_completed(&mut app, Duration::from_secs(60)).await;
    assert_eq!(routing_keys(&others), ["audio.saved"]);
    let fixed = &corrected.json;
    assert_eq!(
        (fixed["version"].as_i64(), fixed["status"].as_str()),
        (Some(2), Some("completed")),
        "{fixed}"
    );
    assert_eq!(fixed["event_id"], uuid::Uuid::new_v5(&batch_uuid, b"audio.batch.completed/2").to_string());
    assert_eq!((fixed["saved"].as_i64(), fixed["failed"].as_i64()), (Some(5), Some(0)));
    let (status, bytes) = fetch(fixed["items"][3]["url"].as_str().unwrap()).await;
    assert_eq!((status, bytes == audio[items[3]["asset_id"].as_str().unwrap()]), (200, true));
    let (_, m3u) = fetch(fixed["manifest"]["m3u"]["url"].as_str().unwrap()).await;
    assert_eq!(String::from_utf8(m3u).unwrap().lines().count(), 1 + 2 * 5);
    app.teardown().await;
}

#[tokio::test]
async fn the_same_batch_published_twice_is_one_batch_and_one_completion() {
    let mut app = spawn_app_with(&[("WAVEFORM", "off"), ("CLEANUP_TEMP_AUDIO", "false")]).await;
    app.add_audio("a.wav", &wav_tone(0.2));
    let batch = batch((0..3).map(|i| item("a.wav", &format!("take {i}"))).collect());
    publish_batch(&app, &batch, BasicProperties::default()).await;
    publish_batch(&app, &batch, BasicProperties::default()).await;
    let (completed, others) = until_completed(&mut app, Duration::from_secs(60)).await;
    assert_eq!(
        (completed.json["status"].as_str(), completed.json["saved"].as_i64()),
        (Some("completed"), Some(3))
    );
    let late = app.more_events(Duration::from_secs(3)).await;
    let all: Vec<&ReceivedEvent> = others.iter().chain(&late).collect();
    assert!(
        all.iter().all(|e| e.routing_key == "audio.saved"),
        "one completion only: {:?}",
        routing_keys(&late)
    );
    let mut saved: HashMap<String, Vec<&ReceivedEvent>> = HashMap::new();
    for event in all {
        saved.entry(event.json["asset_id"].as_str().unwrap().to_owned()).or_default().push(event);
    }
    assert_eq!(saved.len(), 3);
    for (asset, events) in &saved {
        assert!(
            events.iter().all(|e| e.json["version"] == 1 && e.json["event_id"] == events[0].json["event_id"])
        );
        assert_eq!(app.document_count(asset).await, 1);
    }
    let batches = app.batches().await;
    assert_eq!(batches.count_documents(doc! {}).await.unwrap(), 1);
    assert!(app.drain_dlq().await.is_empty(), "the second message is not refused");
    app.teardown().await;
}

#[tokio::test]
async fn a_large_batch_does_not_hold_up_other_tenants_jobs() {
    // The bound: while a 200-item batch is in progress, a single job of another tenant is
    // saved within 2 s of its publish. One slot for batch items beside the job queue's two;
    // each batch download takes 100 ms, so the batch takes at least 20 s. In one queue with the
    // batch, a single job would wait for the items ahead of it: about 200 × 100 ms / 2 = 10 s.
    let mut app = spawn_app_with(&[
        ("WAVEFORM", "off"),
        ("WORKER_PREFETCH", "2"),
        ("BATCH_PREFETCH", "1"),
        // Every item reads the same file: it must stay after the first save.
        ("CLEANUP_TEMP_AUDIO", "false"),
    ])
    .await;
    app.add_audio("batch.wav", &wav_tone(0.1));
    app.add_audio("single.wav", &wav_tone(0.1));
    app.standin.script("batch.wav", [Fault::Hang(Duration::from_millis(100)); 200]);
    let batch = batch((0..200).map(|i| item("batch.wav", &format!("item {i}"))).collect());
    publish_batch(&app, &batch, BasicProperties::default()).await;
    // Wait until the batch is taken (every item published), then send the single jobs.
    let batch_id = batch["batch_id"].as_str().unwrap().to_owned();
    let batches = app.batches().await;
    let started = Instant::now();
    loop {
        let record = batches.find_one(doc! { "_id": &batch_id }).await.unwrap();
        if record.is_some_and(|r| r.get_bool("fanned_out") == Ok(true)) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the batch was not fanned out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut latencies = Vec::new();
    let mut batch_done = None;
    for n in 0..5 {
        let mut single = crate::helpers::job("/temp/single.wav");
        single["customer_id"] = "other_tenant".into();
        let asset = single["asset_id"].as_str().unwrap().to_owned();
        let sent = Instant::now();
        app.publish(&single).await;
        loop {
            let event = app.next_event().await;
            if event.routing_key == "audio.batch.completed" {
                batch_done = Some(n);
            }
            if event.json["asset_id"] == asset.as_str() {
                assert_eq!(event.routing_key, "audio.saved", "{}", event.json);
                latencies.push(sent.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let worst = latencies.iter().max().unwrap();
    assert!(*worst < Duration::from_secs(2), "single jobs waited for the batch: {latencies:?}");
    assert_eq!(batch_done, None, "the batch was still running while the single jobs were saved");
    let items_queue = app.settings.amqp.batch_items_queue();
    assert!(app.queue_depth(&items_queue).await > 0, "batch items were still waiting");
    let (completed, _) = until_completed(&mut app, Duration::from_secs(90)).await;
    assert_eq!(
        (completed.json["status"].as_str(), completed.json["saved"].as_i64()),
        (Some("completed"), Some(200))
    );
    app.teardown().await;
}

#[tokio::test]
async fn bad_batches_are_dead_lettered_whole_and_bad_items_alone() {
    let mut app =
        spawn_app_with(&[("WAVEFORM", "off"), ("BATCH_MAX_ITEMS", "3"), ("CLEANUP_TEMP_AUDIO", "false")])
            .await;
    app.add_audio("a.wav", &wav_tone(0.2));
    // Too many items, no items, not JSON: the whole message is dead-lettered with its reason.
    let too_many = batch((0..4).map(|i| item("a.wav", &format!("{i}"))).collect());
    publish_batch(&app, &too_many, BasicProperties::default()).await;
    publish_batch(&app, &batch(vec![]), BasicProperties::default()).await;
    app.publish_to(&app.settings.amqp.batch_queue(), b"{not json", BasicProperties::default()).await;
    let started = Instant::now();
    let mut dead = Vec::new();
    while dead.len() < 3 {
        assert!(started.elapsed() < Duration::from_secs(20), "only {} dead letters", dead.len());
        dead.extend(app.drain_dlq().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reasons: Vec<String> = dead
        .iter()
        .map(|m| {
            let headers = m.delivery.properties.headers().as_ref();
            let record = audio_worker::amqp::headers::FailureRecord::read(headers);
            assert_eq!(record.stage.as_deref(), Some("parse"));
            record.reason.unwrap()
        })
        .collect();
    assert!(reasons[0].contains("1 to 3 jobs (BATCH_MAX_ITEMS), got 4"), "{reasons:?}");
    assert!(reasons[1].contains("got 0"), "{reasons:?}");
    assert!(reasons[2].contains("invalid batch JSON"), "{reasons:?}");

    // An item that names another tenant is refused alone; the rest is saved.
    let mut other = item("a.wav", "other tenant");
    other["customer_id"] = "someone_else".into();
    let good = item("a.wav", "fine");
    let mixed = batch(vec![good.clone(), other]);
    publish_batch(&app, &mixed, BasicProperties::default()).await;
    let (completed, _) = until_completed(&mut app, Duration::from_secs(30)).await;
    let done = &completed.json;
    assert_eq!(done["status"], "partial");
    assert_eq!(done["items"][0]["asset_id"], good["asset_id"]);
    assert_eq!(done["items"][1]["stage"], "parse");
    assert!(
        done["items"][1]["reason"].as_str().unwrap().contains("cannot change the batch's tenant"),
        "{done}"
    );

    // The batch's id under another tenant is refused too.
    let mut stolen = mixed.clone();
    stolen["customer_id"] = "thief".into();
    publish_batch(&app, &stolen, BasicProperties::default()).await;
    let started = Instant::now();
    let dead = loop {
        let dead = app.drain_dlq().await;
        if !dead.is_empty() {
            break dead;
        }
        assert!(started.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let record =
        audio_worker::amqp::headers::FailureRecord::read(dead[0].delivery.properties.headers().as_ref());
    assert!(record.reason.unwrap().contains("another tenant"));
    app.teardown().await;
}

#[tokio::test]
async fn a_retried_item_waits_in_the_items_delay_queue_and_the_batch_completes() {
    let mut app =
        spawn_app_with(&[("WAVEFORM", "off"), ("RETRY_MAX_ATTEMPTS", "1"), ("RETRY_SCHEDULE", "2s")]).await;
    app.add_audio("flaky.wav", &wav_tone(0.2));
    app.add_audio("fine.wav", &wav_tone(0.3));
    app.standin.script("flaky.wav", [Fault::Status(503)]);
    let batch = batch(vec![item("flaky.wav", "flaky"), item("fine.wav", "fine")]);
    publish_batch(&app, &batch, BasicProperties::default()).await;
    let a = &app.settings.amqp;
    let (items_delay, jobs_delay) = (
        audio_worker::amqp::topology::delay_queue_of(&a.batch_items_queue(), 1),
        audio_worker::amqp::topology::delay_queue(a, 1),
    );
    let started = Instant::now();
    while app.queue_depth(&items_delay).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the retried item never waited in {items_delay}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.queue_depth(&jobs_delay).await, 0, "not in the single jobs' delay queue");
    let (completed, _) = until_completed(&mut app, Duration::from_secs(30)).await;
    assert_eq!(
        (completed.json["status"].as_str(), completed.json["saved"].as_i64()),
        (Some("completed"), Some(2))
    );
    assert_eq!(app.standin.count("GET", "flaky.wav"), 2);
    app.teardown().await;
}
