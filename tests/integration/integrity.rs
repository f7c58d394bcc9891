//! One hash per byte (issue 13): the uploads reuse the checksums computed while downloading,
//! send no SigV4 payload hash, and the store refuses bytes that do not match them. What went on
//! the wire is read back from a [`Wiretap`] in front of s3s-fs.

use audio_worker::asset::Downloaded;
use audio_worker::audio::AudioFormat;
use audio_worker::error::StageError;
use audio_worker::job::{Job, SaveAudioJob};
use audio_worker::processor::{self, Announcer, Outcome, Saved};
use audio_worker::retry::Attempt;
use sha2::Digest;

use crate::helpers::{Stages, env_or, job, spawn_stages, wav_tone};
use crate::services::{TappedRequest, Wiretap};

/// Nothing listens on port 1: any AMQP use would fail the test.
const NO_BROKER: (&str, &str) = ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f");

struct Quiet;

impl Announcer for Quiet {
    async fn announce(&self, _job: &Job, _saved: &Saved) -> Result<(), StageError> {
        Ok(())
    }
}

fn parse(stages: &Stages, json: &serde_json::Value) -> Job {
    SaveAudioJob::parse(json.to_string().as_bytes(), &stages.settings.audio_gen.url_policy).unwrap()
}

fn s3_port() -> u16 {
    let endpoint = env_or("S3_ENDPOINT", "http://127.0.0.1:9000");
    url::Url::parse(&endpoint).unwrap().port().unwrap_or(80)
}

/// CRC-32C (Castagnoli, reflected 0x82F63B78), bit by bit: the test's own, not the worker's.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

fn base64(bytes: &[u8]) -> String {
    aws_smithy_types::base64::encode(bytes)
}

/// A spool file holding `bytes`, as the download stage leaves it, claiming `sha256`.
fn spooled(bytes: &[u8], sha256: String) -> Downloaded {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    Downloaded {
        path: file.into_temp_path(),
        size: bytes.len() as u64,
        sha256,
        format: AudioFormat::Wav,
        measured_duration: 0.5,
        analysis: None,
        derived: Vec::new(),
        waveform_skipped: None,
        renditions_skipped: Vec::new(),
        part_checksums: Vec::new(),
    }
}

/// s3s-fs 0.14.1 writes the object before it compares the checksums, so after its `BadDigest`
/// the key holds the bytes without their metadata or Content-Type (AWS S3 and MinIO store
/// nothing). The worker treats the refusal as a failed upload either way: it restores the
/// previous bytes or deletes a first save's object (see `processor::save`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_whose_bytes_do_not_match_the_downloaded_sha256_is_refused() {
    let stages = spawn_stages(&[NO_BROKER]).await;
    let job = parse(&stages, &job("/temp/x.wav"));
    let key = format!("cust_42/user-7/audio/{}.wav", job.asset_id);
    let wav = wav_tone(0.5);

    // The spool file's bytes changed after they were hashed (or the hash is another file's).
    let changed = spooled(&wav, hex::encode(sha2::Sha256::digest(b"other bytes")));
    let error = stages.deps.store.put(&job, &changed, &key).await.unwrap_err();
    assert!(error.reason.contains("BadDigest"), "{}", error.reason);
    assert!(error.is_transient(), "sending the spool file again may succeed: {}", error.reason);
    if let Ok((_, left)) = stages.get_object(&key).await {
        assert!(
            left.metadata().is_none_or(|m| !m.contains_key("sha256")),
            "what s3s-fs leaves after BadDigest is not a stored save: {left:?}"
        );
    }

    let right = spooled(&wav, hex::encode(sha2::Sha256::digest(&wav)));
    let stored = stages.deps.store.put(&job, &right, &key).await.unwrap();
    let (bytes, _) = stages.get_object(&key).await.unwrap();
    assert!(bytes == wav, "the stored bytes are the spool file's");
    assert_eq!(stored.sha256, hex::encode(sha2::Sha256::digest(&bytes)));
    stages.teardown().await;
}

fn uploads_of<'a>(requests: &'a [TappedRequest], key: &str) -> Vec<&'a TappedRequest> {
    requests.iter().filter(|r| r.target.contains(key)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_carry_the_download_checksums_and_no_payload_hash() {
    let tap = Wiretap::start(s3_port()).await;
    let endpoint = format!("http://127.0.0.1:{}", tap.port);
    let stages = spawn_stages(&[NO_BROKER, ("S3_ENDPOINT", &endpoint)]).await;

    // One PutObject: the SHA-256 the document records, checked by the store.
    let small = wav_tone(0.5);
    stages.add_audio("small.wav", &small);
    let one = parse(&stages, &job("/temp/small.wav"));
    let outcome = processor::handle(&one, &stages.deps, Attempt::FIRST, &Quiet).await;
    let Outcome::Saved(saved) = outcome else { panic!("{outcome:?}") };
    let requests = tap.requests();
    let puts: Vec<_> =
        uploads_of(&requests, &saved.object.key).into_iter().filter(|r| r.method == "PUT").collect();
    assert_eq!(puts.len(), 1, "{puts:?}");
    let put = puts[0];
    assert_eq!(put.headers["x-amz-content-sha256"], "UNSIGNED-PAYLOAD", "no second hash of the body");
    assert_eq!(put.headers["x-amz-checksum-sha256"], base64(&sha2::Sha256::digest(&small)));
    assert!(put.body == small);
    let doc = stages.document(&one.asset_id.to_string()).await.unwrap();
    let recorded = doc.get_document("checksum").unwrap().get_str("sha256").unwrap().to_owned();
    assert_eq!(recorded, hex::encode(sha2::Sha256::digest(&small)), "the same hash as the store checked");

    // A multipart upload (20 MiB: two 8 MiB parts and the rest): each part with its CRC32C.
    let large = wav_tone(20.0 * 1048576.0 / 32000.0);
    stages.add_audio("large.wav", &large);
    let two = parse(&stages, &job("/temp/large.wav"));
    let outcome = processor::handle(&two, &stages.deps, Attempt::FIRST, &Quiet).await;
    let Outcome::Saved(saved) = outcome else { panic!("{outcome:?}") };
    let requests = tap.requests();
    let mine = uploads_of(&requests, &saved.object.key);
    let create: Vec<_> = mine.iter().filter(|r| r.method == "POST" && r.target.contains("uploads")).collect();
    assert_eq!(create.len(), 1, "{mine:?}");
    assert_eq!(create[0].headers["x-amz-checksum-algorithm"], "CRC32C");
    let mut parts: Vec<_> =
        mine.iter().filter(|r| r.method == "PUT" && r.target.contains("partNumber=")).collect();
    parts.sort_by_key(|r| {
        r.target.split("partNumber=").nth(1).and_then(|n| n.split('&').next()?.parse::<usize>().ok()).unwrap()
    });
    assert_eq!(parts.len(), 3, "{:?}", parts.iter().map(|p| &p.target).collect::<Vec<_>>());
    let complete = mine
        .iter()
        .find(|r| r.method == "POST" && r.target.contains("uploadId="))
        .expect("CompleteMultipartUpload");
    let listed = String::from_utf8_lossy(&complete.body).into_owned();
    for (i, (part, piece)) in parts.iter().zip(large.chunks(8 << 20)).enumerate() {
        assert_eq!(part.headers["x-amz-content-sha256"], "UNSIGNED-PAYLOAD", "part {}", i + 1);
        let expected = base64(&crc32c(piece).to_be_bytes());
        assert_eq!(part.headers["x-amz-checksum-crc32c"], expected, "part {}", i + 1);
        assert!(part.body == piece, "part {} holds its slice of the file", i + 1);
        assert!(listed.contains(&format!("<ChecksumCRC32C>{expected}</ChecksumCRC32C>")), "{listed}");
    }
    let (bytes, _) = stages.get_object(&saved.object.key).await.unwrap();
    assert!(bytes == large, "the object is the file");
    let doc = stages.document(&two.asset_id.to_string()).await.unwrap();
    assert_eq!(
        doc.get_document("checksum").unwrap().get_str("sha256").unwrap(),
        hex::encode(sha2::Sha256::digest(&large))
    );
    stages.teardown().await;
}
