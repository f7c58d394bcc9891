//! Fault tests: crashes, broker restarts, outages of S3 and MongoDB, a misbehaving generation
//! service, and SIGTERM with jobs in flight. Each asserts the final state of every job: objects,
//! documents, events and the dead-letter queue.

use std::time::Duration;

use audio_worker::standin::Fault;

use crate::helpers::{job, spawn_app, spawn_app_with, spawn_app_without_worker, wav_tone};
use crate::services::{OwnRabbit, OwnServer};

fn asset(job: &serde_json::Value) -> String {
    job["asset_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_upload_and_ack_still_saves_exactly_once() {
    let mut app = spawn_app_without_worker(&[("CLEANUP_TEMP_AUDIO", "false")]).await;
    let wav = wav_tone(0.3);
    app.add_audio("crash.wav", &wav);
    let job = job("/temp/crash.wav");
    let id = asset(&job);
    app.publish(&job).await;
    // This worker's events go to an exchange nothing is bound to: its publish keeps failing
    // after the upload and the upsert, so it is stuck right before the ack when it is killed.
    let unbound = format!("{}.unbound", app.settings.amqp.events_exchange);
    let mut first = app.start_worker_process(&[
        ("AMQP_EVENTS_EXCHANGE", unbound.as_str()),
        ("AMQP_EVENTS_QUEUE", ""),
        ("RETRY_MAX_ATTEMPTS", "100"),
        ("RETRY_INITIAL_DELAY_MS", "200"),
    ]);
    let deadline = tokio::time::Instant::now() + crate::helpers::WAIT;
    // Catalogued: the save is committed (a document holding only a save lease is not).
    while !app.document(&id).await.is_some_and(|d| d.get_str("status") == Ok("saved")) {
        assert!(tokio::time::Instant::now() < deadline, "the first worker never catalogued the job");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (stored, _) = app.get_object(&format!("cust_42/user-7/audio/{id}.wav")).await.unwrap();
    assert_eq!(stored, wav, "uploaded before the crash");
    first.kill();

    let mut second = app.start_worker_process(&[]);
    let outcomes = app.outcomes(1, Duration::from_secs(60)).await;
    let events = &outcomes[&id];
    assert_eq!(events.len(), 1, "one event after the restart");
    assert_eq!(events[0].routing_key, "audio.saved");
    assert_eq!(events[0].json["version"], 1, "the redelivery did not count as a new version");
    assert_eq!(
        events[0].json["event_id"],
        uuid::Uuid::new_v5(&id.parse().unwrap(), b"audio.saved/1").to_string()
    );
    assert_eq!(app.document_count(&id).await, 1);
    assert_eq!(app.document(&id).await.unwrap().get_i64("version").unwrap(), 1);
    assert_eq!(app.standin.count("GET", "crash.wav"), 2, "downloaded once per delivery");
    assert!(app.drain_dlq().await.is_empty());
    second.terminate();
    assert!(second.wait(Duration::from_secs(20)).await.success());
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_restart_while_idle_and_while_busy_loses_no_job() {
    let mut rabbit = OwnRabbit::start().await;
    let url = rabbit.url();
    let mut app = spawn_app_with(&[("AMQP_URL", url.as_str()), ("CLEANUP_TEMP_AUDIO", "false")]).await;
    let wav = wav_tone(0.2);

    // Idle: restart, then work.
    rabbit.restart().await;
    app.reconnect().await;
    let idle: Vec<_> = (0..3)
        .map(|i| {
            app.add_audio(&format!("idle{i}.wav"), &wav);
            job(&format!("/temp/idle{i}.wav"))
        })
        .collect();
    for j in &idle {
        app.publish(j).await;
    }
    let outcomes = app.outcomes(3, Duration::from_secs(90)).await;
    for j in &idle {
        assert!(outcomes[&asset(j)].iter().all(|e| e.routing_key == "audio.saved"));
    }

    // Busy: restart while jobs are downloading.
    let busy: Vec<_> = (0..6)
        .map(|i| {
            let name = format!("busy{i}.wav");
            app.add_audio(&name, &wav);
            app.standin.script(&name, [Fault::Hang(Duration::from_millis(1500))]);
            job(&format!("/temp/{name}"))
        })
        .collect();
    for j in &busy {
        app.publish(j).await;
    }
    app.wait_for_requests("GET", "busy0.wav", 1).await;
    rabbit.restart().await;
    app.reconnect().await;
    let outcomes = app.outcomes(6, Duration::from_secs(120)).await;
    for j in &busy {
        let events = &outcomes[&asset(j)];
        assert!(events.iter().all(|e| e.routing_key == "audio.saved"), "{:?}", events[0].json);
        assert_eq!(app.document_count(&asset(j)).await, 1);
        assert_eq!(app.document(&asset(j)).await.unwrap().get_i64("version").unwrap(), 1);
    }
    assert!(app.drain_dlq().await.is_empty());
    app.teardown().await;
}

/// Jobs fail while a service is down, wait in delay queues (the job queue stays empty, so the
/// consumer is free), and complete once it is back.
async fn outage(kind: &str) {
    let mut server = if kind == "s3" { OwnServer::s3().await } else { OwnServer::mongo().await };
    let (var, url) = if kind == "s3" {
        ("S3_ENDPOINT", server.url("http"))
    } else {
        ("MONGODB_URI", server.url("mongodb"))
    };
    let mut app = spawn_app_with(&[
        (var, url.as_str()),
        ("WORKER_PREFETCH", "2"),
        ("RETRY_MAX_ATTEMPTS", "1"),
        ("RETRY_SCHEDULE", "1s,1s,1s,2s,2s,2s,2s,2s,2s,2s,2s"),
        ("MONGODB_SERVER_SELECTION_TIMEOUT_SECS", "1"),
        ("CLEANUP_TEMP_AUDIO", "false"),
    ])
    .await;
    // The worker prepared bucket and index against the running server; now it goes away.
    app.add_audio("warm.wav", &wav_tone(0.1));
    app.publish(&job("/temp/warm.wav")).await;
    app.outcomes(1, Duration::from_secs(30)).await;
    server.stop().await;
    let started = tokio::time::Instant::now();
    let jobs: Vec<_> = (0..4)
        .map(|i| {
            app.add_audio(&format!("o{i}.wav"), &wav_tone(0.1));
            job(&format!("/temp/o{i}.wav"))
        })
        .collect();
    for j in &jobs {
        app.publish(j).await;
    }
    // During the outage there must be moments where jobs wait in delay queues while the job
    // queue is empty: the consumer is not holding them.
    let mut parked = 0;
    let mut free_while_parked = false;
    while started.elapsed() < Duration::from_secs(10) {
        let mut delayed = 0;
        for n in 1..=11 {
            delayed +=
                app.queue_depth(&audio_worker::amqp::topology::delay_queue(&app.settings.amqp, n)).await;
        }
        let ready = app.queue_depth(&app.settings.amqp.job_queue).await;
        parked = parked.max(delayed);
        free_while_parked |= delayed > 0 && ready == 0;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(parked >= 2, "jobs should wait in delay queues during the outage (max seen {parked})");
    assert!(free_while_parked, "the job queue should empty while jobs wait in delay queues");
    server.start_again().await;
    let outcomes = app.outcomes(4, Duration::from_secs(60)).await;
    for j in &jobs {
        let events = &outcomes[&asset(j)];
        assert!(events.iter().all(|e| e.routing_key == "audio.saved"), "{}", events[0].json);
        assert_eq!(app.document_count(&asset(j)).await, 1);
    }
    assert!(app.drain_dlq().await.is_empty());
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_parks_jobs_until_the_store_is_back() {
    outage("s3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mongodb_outage_parks_jobs_until_the_catalog_is_back() {
    outage("mongo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_generation_service_ends_in_the_dlq_and_replay_saves_the_jobs() {
    let mut app = spawn_app_with(&[
        ("RETRY_MAX_ATTEMPTS", "2"),
        ("RETRY_SCHEDULE", "200ms"),
        ("DOWNLOAD_READ_TIMEOUT_SECS", "1"),
        ("CLEANUP_TEMP_AUDIO", "false"),
    ])
    .await;
    let wav = wav_tone(0.3);
    let faults = [
        ("e500.wav", Fault::Status(500)),
        ("hang.wav", Fault::Hang(Duration::from_secs(3))),
        ("cut.wav", Fault::CloseEarly),
    ];
    let mut jobs = Vec::new();
    for (name, fault) in &faults {
        app.add_audio(name, &wav);
        // Two deliveries of two attempts each: four faults use up every attempt.
        app.standin.script(name, std::iter::repeat_n(*fault, 4));
        jobs.push(job(&format!("/temp/{name}")));
    }
    for j in &jobs {
        app.publish(j).await;
    }
    let outcomes = app.outcomes(3, Duration::from_secs(60)).await;
    for j in &jobs {
        let e = &outcomes[&asset(j)][0];
        assert_eq!(e.routing_key, "audio.failed", "{}", e.json);
        assert_eq!(e.json["stage"], "download");
        assert_eq!(e.json["error_class"], "transient");
        assert_eq!(e.json["attempts"], 4);
    }
    for (name, _) in &faults {
        assert_eq!(app.standin.count("GET", name), 4, "{name}");
    }
    let dead = audio_worker::dlq::list(&app.settings.amqp, 10).await.unwrap();
    assert_eq!(dead.len(), 3);
    for d in &dead {
        assert_eq!(d.failure.stage.as_deref(), Some("download"));
        assert_eq!(d.failure.error_class.as_deref(), Some("transient"));
        assert_eq!(d.failure.attempts, Some(4));
        assert!(d.failure.first_failed_at.unwrap() < d.failure.failed_at.unwrap());
    }
    let reasons: Vec<&str> = dead.iter().filter_map(|d| d.failure.reason.as_deref()).collect();
    assert!(reasons.iter().any(|r| r.contains("HTTP 500")), "{reasons:?}");

    // The faults are used up: replay through the CLI, as an operator would.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_audio-worker"))
        .args(["dlq", "replay", "--stage", "download", "--rate", "50/s"])
        .env_clear()
        .envs(&app.env)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout} {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout.trim(), "moved 3, skipped 0, failed 0");
    let outcomes = app.outcomes(3, Duration::from_secs(60)).await;
    for j in &jobs {
        let e = &outcomes[&asset(j)][0];
        assert_eq!(e.routing_key, "audio.saved", "{}", e.json);
        let (bytes, _) = app.get_object(e.json["storage"]["key"].as_str().unwrap()).await.unwrap();
        assert_eq!(bytes, wav);
    }
    assert!(app.drain_dlq().await.is_empty());
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_jobs_in_flight_finish_and_exits_zero() {
    let mut app =
        spawn_app_without_worker(&[("CLEANUP_TEMP_AUDIO", "false"), ("SHUTDOWN_GRACE_SECS", "20")]).await;
    let wav = wav_tone(0.2);
    let jobs: Vec<_> = (0..3)
        .map(|i| {
            let name = format!("slow{i}.wav");
            app.add_audio(&name, &wav);
            app.standin.script(&name, [Fault::Hang(Duration::from_secs(2))]);
            job(&format!("/temp/{name}"))
        })
        .collect();
    let mut worker = app.start_worker_process(&[]);
    for j in &jobs {
        app.publish(j).await;
    }
    for i in 0..3 {
        app.wait_for_requests("GET", &format!("slow{i}.wav"), 1).await;
    }
    worker.terminate();
    let status = worker.wait(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0));
    let outcomes = app.outcomes(3, Duration::from_secs(10)).await;
    for j in &jobs {
        assert_eq!(outcomes[&asset(j)][0].routing_key, "audio.saved");
        assert_eq!(app.document_count(&asset(j)).await, 1);
    }
    assert_eq!(app.queue_depth(&app.settings.amqp.job_queue).await, 0);
    assert!(app.drain_dlq().await.is_empty());
    // Jobs published after the shutdown stay queued for the next worker.
    app.add_audio("later.wav", &wav);
    app.publish(&job("/temp/later.wav")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.queue_depth(&app.settings.amqp.job_queue).await, 1);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_exchange_deleted_by_hand_is_declared_again_and_the_job_dead_lettered() {
    let mut app = spawn_app().await;
    app.add_audio("warm.wav", &wav_tone(0.1));
    app.publish(&job("/temp/warm.wav")).await;
    assert_eq!(app.next_event().await.routing_key, "audio.saved", "the worker is up");
    // Someone deletes the dead-letter exchange: the dead letter cannot be published, so the job
    // stays unacked while the worker declares the topology again, and then is dead-lettered.
    app.channel
        .exchange_delete(app.settings.amqp.dead_letter_exchange.as_str().into(), Default::default())
        .await
        .unwrap();
    let job = job("/temp/missing.wav");
    app.publish(&job).await;
    let outcomes = app.outcomes(1, Duration::from_secs(60)).await;
    let event = &outcomes[&asset(&job)][0];
    assert_eq!(event.routing_key, "audio.failed");
    assert_eq!(event.json["stage"], "download");
    let dead = app.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&dead[0].delivery.data).unwrap(), job);
    assert_eq!(app.standin.count("GET", "missing.wav"), 1, "dead-lettered by its first delivery");
    assert_eq!(app.queue_depth(&app.settings.amqp.job_queue).await, 0);
    app.teardown().await;
}
