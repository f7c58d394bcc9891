//! Large files: uploaded in parts while they download (issue 7), and a large file that fails
//! its checks leaves neither an object nor an incomplete multipart upload behind.

use audio_worker::amqp::headers::HEADER_REASON;
use audio_worker::amqp::headers::header_str;
use audio_worker::pipeline::transfer;

const PART_SIZE: usize = transfer::PART_SIZE as usize;

use crate::helpers::{WAIT, job, spawn_app_with, wav_tone};
use crate::services::OwnServer;

/// Files s3s-fs keeps for multipart uploads in progress (`.upload_id-…`, `.upload-…`).
fn incomplete_uploads(dir: &std::path::Path) -> Vec<String> {
    walk(dir).into_iter().filter(|name| name.starts_with(".upload")).collect()
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&entry.path()));
        } else {
            out.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_goes_up_in_parts_and_a_bad_one_leaves_no_upload_behind() {
    let s3 = OwnServer::s3().await;
    let mut app = spawn_app_with(&[
        ("S3_ENDPOINT", &s3.url("http")),
        ("RETRY_MAX_ATTEMPTS", "1"),
        ("RETRY_SCHEDULE", "none"),
        ("CLEANUP_TEMP_AUDIO", "false"),
    ])
    .await;
    // 700 s at 16 kHz, 16-bit: 22.4 MB, so two full parts and a last one.
    let wav = wav_tone(700.0);
    assert!(wav.len() > 2 * PART_SIZE, "{}", wav.len());
    app.add_audio("long.wav", &wav);
    // The same file cut short after two parts' worth: its header promises 700 s.
    app.add_audio("cut.wav", &wav[..2 * PART_SIZE + 1000]);
    let good = job("/temp/long.wav");
    let bad = job("/temp/cut.wav");
    app.publish(&good).await;
    app.publish(&bad).await;
    let outcomes = app.outcomes(2, WAIT).await;

    let saved = &outcomes[good["asset_id"].as_str().unwrap()][0];
    assert_eq!(saved.routing_key, "audio.saved", "{}", saved.json);
    let key = saved.json["storage"]["key"].as_str().unwrap();
    assert_eq!(saved.json["storage"]["size"], wav.len());
    let (bytes, output) = app.get_object(key).await.unwrap();
    assert!(bytes == wav, "the object's bytes are the file's");
    // Multipart objects carry the metadata known up front; the checksum is in the catalog.
    let metadata = output.metadata().unwrap();
    assert_eq!(metadata["asset_id"], good["asset_id"].as_str().unwrap());
    assert!(!metadata.contains_key("sha256"), "{metadata:?}: uploaded in parts, as the upload began");
    let doc = app.document(good["asset_id"].as_str().unwrap()).await.unwrap();
    assert!((doc.get_f64("measured_duration").unwrap() - 700.0).abs() < 0.01);
    assert_eq!(doc.get_document("checksum").unwrap().get_str("sha256").unwrap(), crate::sha256_hex(&wav));

    let failed = &outcomes[bad["asset_id"].as_str().unwrap()][0];
    assert_eq!(failed.routing_key, "audio.failed");
    let dead = app.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    let reason = header_str(dead[0].properties.headers().as_ref(), HEADER_REASON).unwrap();
    assert!(reason.contains("truncated WAV"), "{reason}");
    let keys = app.list_keys().await.unwrap();
    let peaks = key.replace(".wav", ".peaks.json");
    assert_eq!(
        keys,
        [peaks, key.to_owned()],
        "no object for the cut file (the good one's waveform and audio)"
    );
    assert_eq!(incomplete_uploads(s3.data_dir()), Vec::<String>::new(), "its multipart upload was aborted");
    app.teardown().await;
}
