//! What operators see (issue 7): `/metrics`, `/healthz` and `/readyz` of a worker process.

use std::time::Duration;

use crate::helpers::{WAIT, job, spawn_app_without_worker, wav_tone};

/// A port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}{path}")).await.ok()?;
    Some((response.status().as_u16(), response.text().await.ok()?))
}

/// Polls `path` until it answers `status`; the last answer.
async fn wait_for(port: u16, path: &str, status: u16) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let answer = get(port, path).await;
        if let Some((code, body)) = &answer
            && *code == status
        {
            return body.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{path} never answered {status}: {answer:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The value of the sample `name` (labels included, exactly as rendered) in a Prometheus text page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_readiness_follow_the_jobs_and_the_dependencies() {
    let mut app = spawn_app_without_worker(&[("RETRY_SCHEDULE", "none"), ("RETRY_MAX_ATTEMPTS", "1")]).await;
    let port = free_port();
    let _worker = app.start_worker_process(&[("METRICS_ADDR", &format!("127.0.0.1:{port}"))]);
    assert_eq!(wait_for(port, "/healthz", 200).await, "ok\n");
    let ready = wait_for(port, "/readyz", 200).await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ready).unwrap(),
        serde_json::json!({"ready": true})
    );

    let wav = wav_tone(0.5);
    app.add_audio("m.wav", &wav);
    app.publish(&job("/temp/m.wav")).await;
    app.publish(&job("/temp/missing.wav")).await;
    let mut kinds = vec![app.next_event().await.routing_key, app.next_event().await.routing_key];
    kinds.sort();
    assert_eq!(kinds, ["audio.failed", "audio.saved"]);

    // Counters are updated just after the ack; poll briefly.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let page = loop {
        let (_, page) = get(port, "/metrics").await.unwrap();
        if sample(&page, r#"audio_worker_jobs_total{outcome="dead_lettered"}"#).is_some()
            && sample(&page, r#"audio_worker_jobs_total{outcome="saved"}"#).is_some()
        {
            break page;
        }
        assert!(tokio::time::Instant::now() < deadline, "{page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(sample(&page, r#"audio_worker_jobs_total{outcome="saved"}"#), Some(1.0), "{page}");
    assert_eq!(sample(&page, r#"audio_worker_jobs_total{outcome="dead_lettered"}"#), Some(1.0), "{page}");
    assert_eq!(sample(&page, "audio_worker_dead_letter_publishes_total"), Some(1.0), "{page}");
    assert_eq!(sample(&page, "audio_worker_downloaded_bytes_total"), Some(wav.len() as f64), "{page}");
    assert_eq!(sample(&page, "audio_worker_uploaded_bytes_total"), Some(wav.len() as f64), "{page}");
    assert_eq!(sample(&page, "audio_worker_jobs_in_flight"), Some(0.0), "{page}");
    assert_eq!(sample(&page, "audio_worker_ready"), Some(1.0), "{page}");
    assert_eq!(
        sample(&page, r#"audio_worker_job_duration_seconds_count{outcome="saved"}"#),
        Some(1.0),
        "{page}"
    );
    for stage in ["download", "upload", "catalog", "publish"] {
        let count =
            sample(&page, &format!(r#"audio_worker_stage_duration_seconds_count{{stage="{stage}"}}"#));
        assert!(count.is_some_and(|c| c >= 1.0), "{stage}: {page}");
    }
    assert!(page.contains("# TYPE audio_worker_jobs_total counter"), "{page}");
    assert!(page.contains("# TYPE audio_worker_job_duration_seconds histogram"), "{page}");
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_the_store_that_does_not_answer() {
    let app = spawn_app_without_worker(&[]).await;
    let port = free_port();
    // Nothing listens on port 1: the worker cannot prepare its bucket and never consumes.
    let _worker = app.start_worker_process(&[
        ("METRICS_ADDR", &format!("127.0.0.1:{port}")),
        ("S3_ENDPOINT", "http://127.0.0.1:1"),
    ]);
    assert_eq!(wait_for(port, "/healthz", 200).await, "ok\n");
    // The probe runs at once; wait for its verdict on S3 to show.
    let deadline = tokio::time::Instant::now() + WAIT;
    let body = loop {
        let body = wait_for(port, "/readyz", 503).await;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let failing: Vec<String> =
            json["failing"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
        if failing.iter().any(|f| f.starts_with("s3: ") && f.contains('(')) {
            break failing;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(body.iter().any(|f| f.starts_with("rabbitmq: not consuming")), "{body:?}");
    assert!(!body.iter().any(|f| f.starts_with("mongodb")), "MongoDB answers: {body:?}");
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producers_trace_continues_on_the_events() {
    use audio_worker::amqp::headers::header_str;
    use lapin::types::{AMQPValue, FieldTable};
    let mut app =
        crate::helpers::spawn_app_with(&[("RETRY_SCHEDULE", "none"), ("RETRY_MAX_ATTEMPTS", "1")]).await;
    app.add_audio("t.wav", &wav_tone(0.2));
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traced = |url: &str| {
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(format!("00-{trace_id}-00f067aa0ba902b7-01").into()),
        );
        headers.insert("tracestate".into(), AMQPValue::LongString("vendor=abc".into()));
        (serde_json::to_vec(&job(url)).unwrap(), lapin::BasicProperties::default().with_headers(headers))
    };
    for url in ["/temp/t.wav", "/temp/absent.wav"] {
        let (body, properties) = traced(url);
        app.publish_raw(&body, properties).await;
    }
    // A job without a traceparent starts a trace of its own.
    app.publish(&job("/temp/t.wav")).await;
    let mut traced_events = 0;
    let mut fresh = Vec::new();
    for _ in 0..3 {
        let event = app.next_event().await;
        let headers = event.properties.headers().clone();
        let parent = header_str(headers.as_ref(), "traceparent").expect("every event has a traceparent");
        let parts: Vec<&str> = parent.split('-').collect();
        assert_eq!(parts.len(), 4, "{parent}");
        assert_eq!((parts[0], parts[1].len(), parts[2].len(), parts[3]), ("00", 32, 16, "01"), "{parent}");
        assert_ne!(parts[2], "00f067aa0ba902b7", "the event's parent is the job's span, not the producer's");
        if parts[1] == trace_id {
            traced_events += 1;
            assert_eq!(header_str(headers.as_ref(), "tracestate").as_deref(), Some("vendor=abc"));
        } else {
            fresh.push(event.routing_key.clone());
            assert_eq!(header_str(headers.as_ref(), "tracestate"), None);
        }
    }
    assert_eq!(traced_events, 2, "audio.saved and audio.failed of the traced jobs");
    assert_eq!(fresh, ["audio.saved"]);
    // The dead letter keeps the producer's own traceparent (a replay continues the same trace).
    let dead = app.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header_str(dead[0].properties.headers().as_ref(), "traceparent").unwrap(),
        format!("00-{trace_id}-00f067aa0ba902b7-01")
    );
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_carry_credentials_or_a_presigned_urls_query() {
    let mut app = spawn_app_without_worker(&[("RETRY_SCHEDULE", "none"), ("RETRY_MAX_ATTEMPTS", "1")]).await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("s3-secret");
    std::fs::write(&secret_file, format!("{}\n", app.env["S3_SECRET_ACCESS_KEY"])).unwrap();
    let log = dir.path().join("worker.log");
    // The secret comes from a file, at the most verbose level the worker's own code logs at.
    let worker = app.start_worker_process_logging(
        &[("S3_SECRET_ACCESS_KEY", ""), ("S3_SECRET_ACCESS_KEY_FILE", secret_file.to_str().unwrap())],
        "debug",
        &log,
    );
    app.add_audio("s.wav", &wav_tone(0.2));
    app.publish(&job("/temp/s.wav?token=hunter2")).await;
    app.publish(&job("/temp/absent.wav?token=hunter2")).await;
    let mut events = [app.next_event().await, app.next_event().await];
    events.sort_by_key(|e| e.routing_key.clone());
    assert_eq!(events[1].routing_key, "audio.saved");
    let presigned = events[1].json["storage"]["url"].as_str().unwrap().to_owned();
    let signature = presigned.split("X-Amz-Signature=").nth(1).unwrap().to_owned();
    worker.terminate();
    let mut worker = worker;
    worker.wait(Duration::from_secs(20)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.lines().count() > 5, "the worker logged: {text}");
    assert!(text.contains("job completed"), "{text}");
    for secret in
        [app.env["S3_SECRET_ACCESS_KEY"].as_str(), "hunter2", signature.as_str(), "X-Amz-Credential"]
    {
        assert!(!text.contains(secret), "{secret:?} in the worker's log");
    }
    app.teardown().await;
}
