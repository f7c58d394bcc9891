//! URLs that never go stale: `audio.url.refresh` on the bus and `audio-worker url` in the shell
//! answer with fresh URLs for the current version, and only to the asset's own tenant.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;

use crate::helpers::{TestApp, job, spawn_app_with, wav_tone};

async fn fetch(url: &str) -> (u16, Vec<u8>) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

/// Sends a refresh request with a private `reply_to` and returns the reply's JSON.
async fn ask(app: &TestApp, request: &serde_json::Value) -> serde_json::Value {
    let (queue, mut replies) = app.reply_queue().await;
    let correlation_id = uuid::Uuid::new_v4().to_string();
    let properties = BasicProperties::default()
        .with_reply_to(queue.as_str().into())
        .with_correlation_id(correlation_id.as_str().into());
    let key = app.settings.amqp.url_refresh_queue.clone();
    app.publish_to(&key, &serde_json::to_vec(request).unwrap(), properties).await;
    let reply = tokio::time::timeout(Duration::from_secs(20), replies.next())
        .await
        .expect("a reply in time")
        .unwrap()
        .unwrap();
    assert_eq!(reply.properties.correlation_id().as_ref().map(|c| c.as_str()), Some(correlation_id.as_str()));
    assert_eq!(reply.properties.kind().as_ref().map(|k| k.as_str()), Some("audio.url.refreshed"));
    serde_json::from_slice(&reply.data).unwrap()
}

#[tokio::test]
async fn a_refresh_returns_working_urls_after_the_stored_ones_expired_and_only_to_the_tenant() {
    let mut app = spawn_app_with(&[("PRESIGNED_URL_EXPIRY_SECS", "2")]).await;
    let audio = wav_tone(0.3);
    app.add_audio("r.wav", &audio);
    let job = job("/temp/r.wav");
    let asset = job["asset_id"].as_str().unwrap().to_owned();
    app.publish(&job).await;
    let saved = app.next_event().await;
    assert_eq!(saved.routing_key, "audio.saved", "{}", saved.json);
    let stored_url = saved.json["storage"]["url"].as_str().unwrap().to_owned();
    let waveform_key = saved.json["waveform"]["key"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, _) = fetch(&stored_url).await;
    assert_ne!(status, 200, "the stored URL has expired");

    let reply =
        ask(&app, &serde_json::json!({"asset_id": asset, "customer_id": "cust_42", "user_id": "user-7"}))
            .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["asset_id"], asset.as_str());
    assert_eq!(reply["version"], 1);
    assert_eq!(reply["storage"]["key"], saved.json["storage"]["key"]);
    let expires: chrono::DateTime<chrono::Utc> =
        reply["storage"]["url_expires_at"].as_str().unwrap().parse().unwrap();
    assert!(expires > chrono::Utc::now(), "{reply}");
    let (status, bytes) = fetch(reply["storage"]["url"].as_str().unwrap()).await;
    assert_eq!((status, bytes == audio), (200, true), "the fresh URL serves the asset's bytes");
    assert_eq!(reply["waveform"]["key"], waveform_key.as_str());
    let (status, peaks) = fetch(reply["waveform"]["url"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    let (stored_peaks, _) = app.get_object(&waveform_key).await.unwrap();
    assert_eq!(peaks, stored_peaks);

    // Another tenant (or user) asking for the same id learns nothing, as for an unknown id.
    for (customer, user) in [("other", "user-7"), ("cust_42", "someone")] {
        let refused =
            ask(&app, &serde_json::json!({"asset_id": asset, "customer_id": customer, "user_id": user}))
                .await;
        assert_eq!(
            (refused["status"].as_str(), refused["error"].as_str()),
            (Some("refused"), Some("not_found"))
        );
        assert!(refused.get("storage").is_none(), "{refused}");
    }
    let unknown = ask(
        &app,
        &serde_json::json!({"asset_id": uuid::Uuid::new_v4(), "customer_id": "cust_42", "user_id": "user-7"}),
    )
    .await;
    assert_eq!(unknown["error"], "not_found");
    let invalid =
        ask(&app, &serde_json::json!({"asset_id": "nope", "customer_id": "cust_42", "user_id": "u"})).await;
    assert_eq!(invalid["error"], "invalid_request");

    // The same from the shell.
    let run = |customer: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_audio-worker"))
            .args(["url", &asset, "--customer-id", customer, "--user-id", "user-7"])
            .env_clear()
            .envs(&app.env)
            .output()
            .unwrap()
    };
    let output = run("cust_42");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let (status, bytes) = fetch(printed["storage"]["url"].as_str().unwrap()).await;
    assert_eq!((status, bytes == audio), (200, true));
    let output = run("other");
    assert_eq!(output.status.code(), Some(1));
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed["error"], "not_found");
    app.teardown().await;
}

#[tokio::test]
async fn check_config_warns_when_temporary_credentials_end_before_the_urls() {
    let app = crate::helpers::spawn_app_without_worker(&[]).await;
    let soon = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_audio-worker"))
        .arg("check-config")
        .env_clear()
        .envs(&app.env)
        .env("S3_SESSION_TOKEN", "token")
        .env("S3_CREDENTIALS_EXPIRE_AT", &soon)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let warning = stdout.lines().find(|l| l.starts_with("warning: ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        warning.contains("temporary") && warning.contains("PRESIGNED_URL_EXPIRY_SECS=604800"),
        "{warning}"
    );
    // Long-lived keys: no warning.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_audio-worker"))
        .arg("check-config")
        .env_clear()
        .envs(&app.env)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&output.stdout).contains("warning: "));
    app.teardown().await;
}
