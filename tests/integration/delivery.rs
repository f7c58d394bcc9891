//! CDN delivery (`DELIVERY`): the URLs a running worker hands out in `audio.saved` and the
//! document. CloudFront URLs are checked the way CloudFront checks them, with no code shared with
//! the worker: the canned policy rebuilt from the URL, the signature decoded from CloudFront's
//! base64 and verified by `openssl dgst -sha1 -verify` against the public half of an RSA key
//! pair that `openssl genrsa` makes for the test.

use std::path::Path;
use std::process::Command;

use audio_worker::config::Settings;
use audio_worker::delivery::DeliveryMode;
use audio_worker::processor::{self, Outcome};
use audio_worker::retry::Attempt;
use chrono::Utc;
use mongodb::bson::Bson;

use crate::analysis::{NO_BROKER, Quiet, run};
use crate::helpers::{TestApp, job, spawn_app_with, spawn_stages, wav_tone};

const DISTRIBUTION: &str = "https://d111111abcdef8.cloudfront.net";
const KEY_PAIR_ID: &str = "K2JCJMDEHXQW5F";

/// Runs `openssl` with `args` in `dir`; its output and whether it succeeded.
fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// A fresh 2048-bit RSA key pair in `dir`: `private.pem` (PKCS#8, as OpenSSL 3 writes it) and
/// `public.pem`.
fn key_pair(dir: &Path) {
    let (ok, out) = openssl(dir, &["genrsa", "-out", "private.pem", "2048"]);
    assert!(ok, "{out}");
    let (ok, out) = openssl(dir, &["rsa", "-in", "private.pem", "-pubout", "-out", "public.pem"]);
    assert!(ok, "{out}");
}

/// Whether `openssl` verifies `signature` (raw bytes) of `policy` with `public.pem` in `dir`.
fn openssl_verifies(dir: &Path, policy: &str, signature: &[u8]) -> (bool, String) {
    std::fs::write(dir.join("policy.json"), policy).unwrap();
    std::fs::write(dir.join("sig.bin"), signature).unwrap();
    openssl(dir, &["dgst", "-sha1", "-verify", "public.pem", "-signature", "sig.bin", "policy.json"])
}

/// Undoes CloudFront's base64 substitutions (`-` for `+`, `_` for `=`, `~` for `/`) and decodes.
fn cloudfront_unbase64(text: &str) -> Vec<u8> {
    let standard: String = text
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '=',
            '~' => '/',
            c => c,
        })
        .collect();
    aws_smithy_types::base64::decode(standard).expect("base64")
}

/// Checks a CloudFront signed URL for `key` as CloudFront would: `{DISTRIBUTION}/{key}`, then
/// exactly `Expires`, `Signature` and `Key-Pair-Id`; `Expires` about `expiry` seconds from now;
/// the signature over the canned policy verified by openssl, and refused for another `Expires`.
fn check_signed_url(dir: &Path, url: &str, key: &str, expiry: i64) {
    let (resource, query) = url.split_once('?').unwrap_or_else(|| panic!("no query: {url}"));
    assert_eq!(resource, format!("{DISTRIBUTION}/{key}"));
    let params: Vec<(&str, &str)> = query.split('&').map(|p| p.split_once('=').unwrap()).collect();
    let names: Vec<&str> = params.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, ["Expires", "Signature", "Key-Pair-Id"], "{url}");
    let expires: i64 = params[0].1.parse().unwrap();
    let now = Utc::now().timestamp();
    assert!((now + expiry - 60..=now + expiry).contains(&expires), "Expires {expires}, now {now}");
    assert_eq!(params[2].1, KEY_PAIR_ID);
    let signature = cloudfront_unbase64(params[1].1);
    assert_eq!(signature.len(), 256, "a 2048-bit RSA signature");
    let policy = |expires: i64| {
        format!(
            r#"{{"Statement":[{{"Resource":"{resource}","Condition":{{"DateLessThan":{{"AWS:EpochTime":{expires}}}}}}}]}}"#
        )
    };
    let (ok, out) = openssl_verifies(dir, &policy(expires), &signature);
    assert!(ok && out.contains("Verified OK"), "{url}: {out}");
    let (ok, out) = openssl_verifies(dir, &policy(expires + 1), &signature);
    assert!(!ok && out.contains("Verification failure"), "another Expires verified: {out}");
}

/// Saves a fresh WAV take through `app`; the `audio.saved` event and the asset's document.
async fn save_one(app: &mut TestApp, name: &str) -> (serde_json::Value, mongodb::bson::Document) {
    app.add_audio(name, &wav_tone(0.3));
    let job = job(&format!("/temp/{name}"));
    app.publish(&job).await;
    let event = app.next_event().await;
    assert_eq!(event.routing_key, "audio.saved", "{}", event.json);
    let doc = app.document(job["asset_id"].as_str().unwrap()).await.expect("a document");
    (event.json, doc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudfront_urls_carry_a_canned_policy_signature_openssl_verifies() {
    let dir = tempfile::tempdir().unwrap();
    key_pair(dir.path());
    let key_file = dir.path().join("private.pem");
    let mut app = spawn_app_with(&[
        ("DELIVERY", "cloudfront"),
        ("PUBLIC_BASE_URL", DISTRIBUTION),
        ("CLOUDFRONT_KEY_PAIR_ID", KEY_PAIR_ID),
        ("CLOUDFRONT_PRIVATE_KEY_FILE", key_file.to_str().unwrap()),
        ("DELIVERY_URL_EXPIRY_SECS", "600"),
    ])
    .await;
    let (event, doc) = save_one(&mut app, "cf.wav").await;
    let storage = &event["storage"];
    assert_eq!(storage["delivery"], "cloudfront");
    let url = storage["url"].as_str().unwrap();
    check_signed_url(dir.path(), url, storage["key"].as_str().unwrap(), 600);
    let expires_at: chrono::DateTime<Utc> = storage["url_expires_at"].as_str().unwrap().parse().unwrap();
    assert!(url.contains(&format!("Expires={}&", expires_at.timestamp())), "{url} vs {expires_at}");

    // The waveform (WAVEFORM=on, the default) is delivered the same way.
    let waveform = &event["waveform"];
    check_signed_url(dir.path(), waveform["url"].as_str().unwrap(), waveform["key"].as_str().unwrap(), 600);

    // The document holds what the event announced.
    let stored = doc.get_document("storage").unwrap();
    assert_eq!(stored.get_str("url").unwrap(), url);
    assert_eq!(stored.get_str("delivery").unwrap(), "cloudfront");
    assert_eq!(
        stored.get_datetime("url_expires_at").unwrap().timestamp_millis(),
        expires_at.timestamp_millis()
    );
    assert_eq!(
        doc.get_document("waveform").unwrap().get_str("url").unwrap(),
        waveform["url"].as_str().unwrap()
    );
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_urls_are_the_base_and_the_key_and_never_expire() {
    let mut app =
        spawn_app_with(&[("DELIVERY", "public"), ("PUBLIC_BASE_URL", "https://cdn.example.com/audio/")])
            .await;
    let (event, doc) = save_one(&mut app, "pub.wav").await;
    let storage = &event["storage"];
    let key = storage["key"].as_str().unwrap();
    assert_eq!(storage["url"], format!("https://cdn.example.com/audio/{key}"));
    assert_eq!(storage["delivery"], "public");
    assert!(storage["url_expires_at"].is_null(), "{storage}");
    let waveform = &event["waveform"];
    assert_eq!(
        waveform["url"],
        format!("https://cdn.example.com/audio/{}", waveform["key"].as_str().unwrap())
    );
    assert!(waveform["url_expires_at"].is_null(), "{waveform}");

    let stored = doc.get_document("storage").unwrap();
    assert_eq!(stored.get_str("url").unwrap(), storage["url"].as_str().unwrap());
    assert_eq!(stored.get_str("delivery").unwrap(), "public");
    assert_eq!(stored.get("url_expires_at"), Some(&mongodb::bson::Bson::Null));
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_take_saved_after_delivery_changed_gets_urls_of_the_new_kind() {
    let stages = spawn_stages(&[NO_BROKER]).await;
    let (job, outcome) = run(&stages, "switch.wav", &wav_tone(0.3)).await;
    let Outcome::Saved(first) = outcome else { panic!("{outcome:?}") };
    assert_eq!(first.object.delivery, DeliveryMode::Presigned);
    assert!(first.object.url_expires_at.is_some());

    // The worker restarted with DELIVERY=public, on the same bucket and database.
    let mut env = stages.env.clone();
    env.insert("DELIVERY".into(), "public".into());
    env.insert("PUBLIC_BASE_URL".into(), "https://cdn.example.com".into());
    let settings = Settings::from_lookup(|k| env.get(k).cloned()).expect("settings");
    let deps = audio_worker::startup::build_deps(settings).await.expect("the worker's clients");
    let Outcome::Saved(again) = processor::handle(&job, &deps, Attempt::FIRST, &Quiet).await else {
        panic!("not saved")
    };
    assert_eq!(again.entry.version, first.entry.version, "the same bytes: the same version");
    assert_eq!(again.object.delivery, DeliveryMode::Public);
    assert_eq!(again.object.url, format!("https://cdn.example.com/{}", again.object.key));
    assert_eq!(again.object.url_expires_at, None);

    let doc = stages.document(&job.asset_id.to_string()).await.expect("a document");
    let storage = doc.get_document("storage").unwrap();
    assert_eq!(storage.get_str("delivery").unwrap(), "public");
    assert_eq!(storage.get_str("url").unwrap(), again.object.url);
    assert_eq!(storage.get("url_expires_at"), Some(&Bson::Null));
    let waveform = doc.get_document("waveform").unwrap();
    let waveform_key = waveform.get_str("key").unwrap();
    assert_eq!(waveform.get_str("url").unwrap(), format!("https://cdn.example.com/{waveform_key}"));
    assert_eq!(waveform.get("url_expires_at"), Some(&Bson::Null));
    stages.teardown().await;
}
