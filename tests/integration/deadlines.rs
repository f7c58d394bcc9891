//! Never loop, never hang: a dripping download and a job past its deadline end in the DLQ with a
//! reason naming the limit; a job that kills its worker is dead-lettered after the delivery
//! limit; a delivery that cannot settle is returned on its own, leaving the other in-flight jobs
//! alone; replies to vanished `reply_to` queues never fork a job; a slow DLQ replay outlives the
//! broker's `consumer_timeout` and moves each dead letter exactly once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use audio_worker::amqp::headers::{
    HEADER_ATTEMPTS, HEADER_ERROR_CLASS, HEADER_REASON, HEADER_STAGE, header_str, text,
};
use audio_worker::dlq::{self, Filter, ReplayOptions};
use audio_worker::standin::Fault;
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeleteOptions};
use lapin::types::FieldTable;

use crate::helpers::{job, spawn_app_with, spawn_app_without_worker, wav_tone};
use crate::services::OwnRabbit;

fn asset(job: &serde_json::Value) -> String {
    job["asset_id"].as_str().unwrap().to_owned()
}

/// Takes every message in `queue` and counts them per `asset_id`.
async fn count_by_asset(channel: &lapin::Channel, queue: &str) -> HashMap<String, usize> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    while let Some(m) = channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        let body: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
        *seen.entry(asset(&body)).or_default() += 1;
    }
    seen
}

/// The one dead letter of `asset` and its failure headers: (stage, class, reason, attempts).
async fn only_dead_letter(app: &crate::helpers::TestApp, asset: &str) -> (String, String, String, String) {
    let dead = app.drain_dlq().await;
    assert_eq!(dead.len(), 1, "one dead letter");
    let message = &dead[0];
    let body: serde_json::Value = serde_json::from_slice(&message.delivery.data).unwrap();
    assert_eq!(body["asset_id"], asset);
    let h = message.delivery.properties.headers().as_ref();
    let get = |name| header_str(h, name).unwrap_or_default();
    (get(HEADER_STAGE), get(HEADER_ERROR_CLASS), get(HEADER_REASON), get(HEADER_ATTEMPTS))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dripping_download_ends_in_the_dlq_with_the_rate_reason() {
    let mut app = spawn_app_with(&[
        ("DOWNLOAD_MIN_BYTES_PER_SEC", "1000"),
        ("DOWNLOAD_RATE_WINDOW_SECS", "2"),
        ("DOWNLOAD_READ_TIMEOUT_SECS", "30"),
        ("RETRY_MAX_ATTEMPTS", "1"),
        ("RETRY_SCHEDULE", "100ms"),
    ])
    .await;
    // 64 KB at one byte every 300 ms: under any read timeout, finished in five and a half hours.
    app.add_audio("drip.wav", &wav_tone(2.0));
    app.standin.script("drip.wav", [Fault::Drip(Duration::from_millis(300)); 2]);
    let job = job("/temp/drip.wav");
    let started = Instant::now();
    app.publish(&job).await;
    let outcomes = app.outcomes(1, Duration::from_secs(40)).await;
    let took = started.elapsed();
    let event = &outcomes[&asset(&job)][0];
    assert_eq!(event.routing_key, "audio.failed");
    let reason = event.json["reason"].as_str().unwrap();
    assert!(
        reason.contains("body too slow") && reason.contains("DOWNLOAD_MIN_BYTES_PER_SEC=1000"),
        "{reason}"
    );
    // Two deliveries of one 2 s window (plus a second of slack each) and a 100 ms delay.
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let (stage, class, dead_reason, attempts) = only_dead_letter(&app, &asset(&job)).await;
    assert_eq!((stage.as_str(), class.as_str(), attempts.as_str()), ("download", "transient", "2"));
    assert_eq!(dead_reason, reason);
    assert_eq!(app.standin.count("GET", "drip.wav"), 2, "one download per delivery");
    assert!(app.list_keys().await.unwrap().is_empty(), "nothing stored");
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_deadline_is_retried_then_dead_lettered_naming_the_limit() {
    let mut app = spawn_app_with(&[
        ("AMQP_CONSUMER_TIMEOUT_SECS", "130"),
        ("JOB_DEADLINE_SECS", "2"),
        ("DOWNLOAD_READ_TIMEOUT_SECS", "60"),
        ("DOWNLOAD_MIN_BYTES_PER_SEC", "0"),
        ("RETRY_SCHEDULE", "100ms"),
    ])
    .await;
    app.add_audio("stuck.wav", &wav_tone(0.2));
    // No answer at all for a minute, each time: only the deadline ends it.
    app.standin.script("stuck.wav", [Fault::Hang(Duration::from_secs(60)); 2]);
    let job = job("/temp/stuck.wav");
    let started = Instant::now();
    app.publish(&job).await;
    let outcomes = app.outcomes(1, Duration::from_secs(30)).await;
    let took = started.elapsed();
    let event = &outcomes[&asset(&job)][0];
    assert_eq!(event.routing_key, "audio.failed");
    assert_eq!(
        event.json["reason"],
        "job deadline passed: JOB_DEADLINE_SECS=2 s ran out during the download stage"
    );
    assert!(took < Duration::from_secs(10), "two deliveries of 2 s each, took {took:?}");
    let (stage, class, _, attempts) = only_dead_letter(&app, &asset(&job)).await;
    assert_eq!((stage.as_str(), class.as_str(), attempts.as_str()), ("download", "transient", "2"));
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_kills_its_worker_is_dead_lettered_after_the_delivery_limit() {
    let mut app = spawn_app_without_worker(&[("AMQP_DELIVERY_LIMIT", "2")]).await;
    app.add_audio("fatal.wav", &wav_tone(0.2));
    // Every download hangs; the test kills the worker while it waits, as an out-of-memory kill
    // or a panicking library would.
    app.standin.script("fatal.wav", [Fault::Hang(Duration::from_secs(120)); 5]);
    let job = job("/temp/fatal.wav");
    app.publish(&job).await;
    for delivery in 1..=2 {
        let mut worker = app.start_worker_process(&[]);
        app.wait_for_requests("GET", "fatal.wav", delivery).await;
        worker.kill();
    }
    let _worker = app.start_worker_process(&[]);
    let outcomes = app.outcomes(1, Duration::from_secs(30)).await;
    let event = &outcomes[&asset(&job)][0];
    assert_eq!(event.routing_key, "audio.failed");
    assert_eq!(event.json["stage"], "delivery");
    let reason = event.json["reason"].as_str().unwrap();
    assert!(reason.starts_with("redelivered 2 times without finishing (AMQP_DELIVERY_LIMIT=2)"), "{reason}");
    let (stage, class, dead_reason, _) = only_dead_letter(&app, &asset(&job)).await;
    assert_eq!((stage.as_str(), class.as_str()), ("delivery", "permanent"));
    assert_eq!(dead_reason, reason);
    assert_eq!(app.standin.count("GET", "fatal.wav"), 2, "the third delivery was refused, not run");
    assert_eq!(app.queue_depth(&app.settings.amqp.job_queue).await, 0);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_cannot_settle_leaves_the_other_jobs_alone() {
    let mut app = spawn_app_with(&[
        ("AMQP_DELIVERY_LIMIT", "2"),
        ("RETRY_MAX_ATTEMPTS", "1"),
        ("RETRY_SCHEDULE", "10m"),
        ("CLEANUP_TEMP_AUDIO", "false"),
        ("DOWNLOAD_READ_TIMEOUT_SECS", "30"),
    ])
    .await;
    // Once the worker has declared its topology, the delay queue is replaced by a full one (the
    // same arguments, a length limit of 0 and one message already over it (a quorum queue
    // refuses a publish once it holds more than its limit), overflow
    // reject-publish): the broker refuses the failing job's copy every time, and declaring the
    // topology again cannot change that.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !app.deps.health.is_consuming() {
        assert!(Instant::now() < deadline, "the worker never started consuming");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delay_queue = audio_worker::amqp::topology::delay_queue(&app.settings.amqp, 1);
    app.channel.queue_delete(delay_queue.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    let mut full = FieldTable::default();
    for (k, v) in [
        ("x-queue-type", "quorum"),
        ("x-dead-letter-strategy", "at-least-once"),
        ("x-overflow", "reject-publish"),
        ("x-dead-letter-exchange", app.settings.amqp.job_exchange.as_str()),
        ("x-dead-letter-routing-key", app.settings.amqp.job_queue.as_str()),
    ] {
        full.insert(k.into(), text(v));
    }
    full.insert("x-max-length".into(), lapin::types::AMQPValue::LongLongInt(0));
    let durable = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    app.channel.queue_declare(delay_queue.as_str().into(), durable, full).await.unwrap();
    app.channel
        .basic_publish(
            "".into(),
            delay_queue.as_str().into(),
            BasicPublishOptions::default(),
            b"filler",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let wav = wav_tone(0.2);
    let healthy: Vec<_> = (0..4)
        .map(|i| {
            let name = format!("healthy{i}.wav");
            app.add_audio(&name, &wav);
            // Still downloading while the failing job gives up on its copy.
            app.standin.script(&name, [Fault::Hang(Duration::from_secs(8))]);
            job(&format!("/temp/{name}"))
        })
        .collect();
    app.add_audio("failing.wav", &wav);
    app.standin.script("failing.wav", [Fault::Status(503); 10]);
    let failing = job("/temp/failing.wav");
    for j in &healthy {
        app.publish(j).await;
    }
    app.publish(&failing).await;
    let outcomes = app.outcomes(5, Duration::from_secs(60)).await;
    for (i, j) in healthy.iter().enumerate() {
        let events = &outcomes[&asset(j)];
        assert_eq!(events.len(), 1, "healthy{i}: one event");
        assert_eq!(events[0].routing_key, "audio.saved");
        assert_eq!(app.standin.count("GET", &format!("healthy{i}.wav")), 1, "healthy{i} ran once");
    }
    let events = &outcomes[&asset(&failing)];
    assert_eq!(events[0].routing_key, "audio.failed");
    assert_eq!(events[0].json["stage"], "delivery", "returned until the delivery limit");
    assert!(app.more_events(Duration::from_secs(2)).await.is_empty(), "no duplicate events");
    let (stage, _, _, _) = only_dead_letter(&app, &asset(&failing)).await;
    assert_eq!(stage, "delivery");
    // Delivered three times: twice returned because its copy could not be parked, then refused.
    assert_eq!(app.standin.count("GET", "failing.wav"), 2);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_to_vanished_queues_and_retries_make_exactly_one_copy_per_attempt() {
    // 500 jobs whose reply comes back unroutable, among 500 that park in a delay queue: with
    // publishes sharing one confirm channel, one of the returns was paired with a delay-queue
    // copy's confirm and that job parked twice (seen in a run of the code before the fix).
    let mut app = spawn_app_with(&[
        ("RETRY_MAX_ATTEMPTS", "1"),
        ("RETRY_SCHEDULE", "10m"),
        ("CLEANUP_TEMP_AUDIO", "false"),
        ("WORKER_PREFETCH", "32"),
    ])
    .await;
    let wav = wav_tone(0.05);
    app.add_audio("ok.wav", &wav);
    let mut replied = Vec::new();
    let mut retried = Vec::new();
    for i in 0..1000 {
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_correlation_id(format!("c{i}").into());
        let j = if i % 2 == 0 {
            // The waiter gave up and its queue is gone (it never existed here).
            properties = properties.with_reply_to(format!("{}.gone.{i}", app.settings.amqp.job_queue).into());
            let j = job("/temp/ok.wav");
            replied.push(asset(&j));
            j
        } else {
            let name = format!("flaky{i}.wav");
            app.add_audio(&name, &wav);
            app.standin.script(&name, [Fault::Status(503)]);
            let j = job(&format!("/temp/{name}"));
            retried.push(asset(&j));
            j
        };
        app.publish_raw(&serde_json::to_vec(&j).unwrap(), properties).await;
    }
    let saved = app.outcomes(500, Duration::from_secs(180)).await;
    for a in &replied {
        let events = &saved[a];
        assert_eq!(events.len(), 1, "{a}: one event");
        assert_eq!(events[0].routing_key, "audio.saved");
    }
    // Every retried job parked exactly once (the 10 min delay keeps the copies there).
    let delay_queue = audio_worker::amqp::topology::delay_queue(&app.settings.amqp, 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.queue_depth(&delay_queue).await < 500 {
        assert!(Instant::now() < deadline, "only {} parked", app.queue_depth(&delay_queue).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(app.more_events(Duration::from_secs(2)).await.is_empty(), "no other events");
    let parked = count_by_asset(&app.channel, &delay_queue).await;
    assert_eq!(parked.len(), 500);
    for a in &retried {
        assert_eq!(parked.get(a), Some(&1), "{a}: one delay-queue copy");
    }
    assert!(app.drain_dlq().await.is_empty(), "nothing dead-lettered");
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_dlq_replay_outlives_the_consumer_timeout_and_moves_each_dead_letter_once() {
    // A broker that takes a delivery back after 5 s unacked (RabbitMQ 3.10 checks about once a
    // minute, so the run must outlast that).
    let rabbit = OwnRabbit::start_with("consumer_timeout = 5000\n").await;
    let url = rabbit.url();
    let app = spawn_app_without_worker(&[("AMQP_URL", url.as_str())]).await;
    // What `audio-worker dlq` reads from AMQP_CONSUMER_TIMEOUT_SECS=5 (a worker could not run
    // with it: its job deadline would not fit).
    let mut amqp = app.settings.amqp.clone();
    amqp.consumer_timeout = Duration::from_secs(5);
    let a = &amqp;
    // 500 dead letters to replay among 100 to leave, interleaved.
    let mut wanted = Vec::new();
    let mut left = Vec::new();
    for i in 0..600 {
        let j = job("/temp/any.wav");
        let reason = if i % 6 == 5 { "left alone" } else { "replay me" };
        let mut headers = FieldTable::default();
        headers.insert(HEADER_STAGE.into(), text("download"));
        headers.insert(HEADER_REASON.into(), text(reason));
        let properties = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
        app.channel
            .basic_publish(
                "".into(),
                a.dead_letter_queue.as_str().into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&j).unwrap(),
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        if reason == "replay me" { wanted.push(asset(&j)) } else { left.push(asset(&j)) }
    }
    // A quorum queue counts confirmed messages a moment later: the scan reads what it counts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.queue_depth(&a.dead_letter_queue).await < 600 {
        assert!(Instant::now() < deadline, "the 600 dead letters were never counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let options = ReplayOptions {
        filter: Filter { reason_contains: Some("replay me".into()), ..Filter::default() },
        rate: Some(6.0),
        ..ReplayOptions::default()
    };
    let started = Instant::now();
    let summary = dlq::replay(a, &app.settings.audio_gen.url_policy, &options, |_, _| {}).await.unwrap();
    let took = started.elapsed();
    assert!(took > Duration::from_secs(75), "the run outlived the broker's timeout check: {took:?}");
    assert_eq!((summary.moved, summary.skipped, summary.failed), (500, 100, 0));

    let replayed = count_by_asset(&app.channel, &a.job_queue).await;
    assert_eq!(replayed.len(), 500);
    assert!(wanted.iter().all(|w| replayed.get(w) == Some(&1)), "each replayed exactly once");
    // Left alone, exactly once each, and in their order.
    let mut order = Vec::new();
    while let Some(m) = app
        .channel
        .basic_get(a.dead_letter_queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let body: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
        order.push(asset(&body));
    }
    assert_eq!(order, left, "the dead letters left alone, once each, in their order");
    app.teardown().await;
    drop(rabbit);
}
