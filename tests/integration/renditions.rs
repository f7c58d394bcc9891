//! The files made beside a take: its waveform and its renditions, on real files made
//! at test time with Debian's `sox`, each checked against a reference that shares no code with the
//! worker. The peaks against min/max computed in numpy from the WAV (scipy's reader) by the BBC
//! audiowaveform JSON v2 rules (a min/max pair per channel per `samples_per_pixel` frames, the
//! last pixel partial, 8 bits = the 16-bit code shifted down 8); the FLAC rendition decoded by
//! the reference decoder (Debian's `flac -d`) against the source's PCM, byte for byte; the Vorbis
//! rendition decoded by sox (libvorbis) for its length and level. Every object is read back from
//! S3 and through its presigned URL against the document, and the save lease's rules (replace,
//! keep, tidy) are checked for these keys as for the audio. `scripts/test.sh` installs sox, flac
//! and the tools venv's numpy/scipy when they are missing.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use audio_worker::asset::WaveformOutcome;
use audio_worker::config::Settings;
use audio_worker::events::AudioSaved;
use audio_worker::job::{Job, SaveAudioJob};
use audio_worker::processor::{self, Deps, Outcome, Saved};
use audio_worker::retry::Attempt;
use mongodb::bson::{Bson, Document};
use sha2::Digest;

use crate::analysis::{NO_BROKER, Quiet, python, run, sox_as};
use crate::helpers::{Stages, job, spawn_stages};

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// An integer field of a document, whatever width the catalog wrote it in.
fn int(doc: &Document, field: &str) -> i64 {
    match doc.get(field) {
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Int64(v)) => *v,
        other => panic!("{field}: {other:?} in {doc}"),
    }
}

/// The saved take of a fresh asset (`bytes` served as `name`) and its document.
async fn save_new(stages: &Stages, name: &str, bytes: &[u8]) -> (Job, Saved, Document) {
    let (job, outcome) = run(stages, name, bytes).await;
    let Outcome::Saved(saved) = outcome else { panic!("{name}: {outcome:?}") };
    let doc = stages.document(&job.asset_id.to_string()).await.expect("a document");
    (job, saved, doc)
}

/// Runs the job `json` through the processor with `deps` (a worker's settings) as `attempt`.
async fn save(stages: &Stages, deps: &Deps, json: &serde_json::Value, attempt: Attempt) -> Saved {
    let job =
        SaveAudioJob::parse(json.to_string().as_bytes(), &stages.settings.audio_gen.url_policy).unwrap();
    match processor::handle(&job, deps, attempt, &Quiet).await {
        Outcome::Saved(saved) => saved,
        other => panic!("{}: {other:?}", json["audio_url"]),
    }
}

/// A worker's clients with `overrides` on the test's settings, on the same bucket, database and
/// stand-in: the worker restarted with other settings, finding the library as it was.
async fn reconfigured(stages: &Stages, overrides: &[(&str, &str)]) -> Arc<Deps> {
    let mut env = stages.env.clone();
    env.extend(overrides.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let settings = Settings::from_lookup(|k| env.get(k).cloned()).expect("settings");
    Arc::new(audio_worker::startup::build_deps(settings).await.expect("the worker's clients"))
}

/// The object a document entry (`waveform`, a `renditions` item) names, checked against it: its
/// Content-Type, size and SHA-256, listed in `storage.derived`, and its presigned URL serves the
/// same bytes.
async fn object_of(stages: &Stages, doc: &Document, entry: &Document) -> Vec<u8> {
    let key = entry.get_str("key").unwrap();
    let (bytes, output) = stages.get_object(key).await.unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(output.content_type(), Some(entry.get_str("content_type").unwrap()), "{key}");
    assert_eq!(int(entry, "size"), bytes.len() as i64, "{key}");
    assert_eq!(entry.get_str("sha256").unwrap(), sha256_hex(&bytes), "{key}");
    let derived = doc.get_document("storage").unwrap().get_array("derived").unwrap();
    assert!(
        derived
            .iter()
            .filter_map(Bson::as_document)
            .any(|d| d.get_str("key") == Ok(key) && d.get_str("sha256") == Ok(&sha256_hex(&bytes))),
        "{key} not in storage.derived: {derived:?}"
    );
    assert_eq!(fetch(entry.get_str("url").unwrap()).await, bytes, "{key} through its presigned URL");
    bytes
}

async fn fetch(url: &str) -> Vec<u8> {
    let response = reqwest::get(url).await.unwrap();
    assert!(response.status().is_success(), "GET {url}: {}", response.status());
    response.bytes().await.unwrap().to_vec()
}

/// The document's `renditions` item called `name`.
fn rendition<'a>(doc: &'a Document, name: &str) -> &'a Document {
    let all = doc.get_array("renditions").unwrap();
    all.iter().filter_map(Bson::as_document).find(|r| r.get_str("name") == Ok(name)).unwrap_or_else(|| {
        panic!("no {name} rendition in {all:?} (skipped: {:?})", doc.get("renditions_skipped"))
    })
}

fn key(job: &Job, suffix: &str) -> String {
    format!("cust_42/user-7/audio/{}.{suffix}", job.asset_id)
}

/// Runs a command to completion; its stdout.
fn tool(program: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// `soxi -{what}` of a file (`r` rate, `c` channels, `b` bits, `D` seconds).
fn soxi(path: &Path, what: &str) -> String {
    String::from_utf8(tool("soxi", &[&format!("-{what}"), path.to_str().unwrap()])).unwrap().trim().to_owned()
}

/// The peaks of a 16-bit WAV computed in numpy: the `data` audiowaveform would write, and frames.
fn numpy_peaks(wav: &Path, samples_per_pixel: u32, bits: u32) -> (Vec<i64>, usize) {
    let script = r#"
import json, sys
import numpy as np
from scipy.io import wavfile
rate, pcm = wavfile.read(sys.argv[1])
spp, bits = int(sys.argv[2]), int(sys.argv[3])
assert pcm.dtype == np.int16
codes = pcm.reshape(len(pcm), -1).astype(np.int64)
if bits == 8:
    codes = codes >> 8
data = []
for start in range(0, len(codes), spp):
    block = codes[start:start + spp]
    for ch in range(codes.shape[1]):
        data += [int(block[:, ch].min()), int(block[:, ch].max())]
print(json.dumps([data, len(codes)]))
"#;
    let (wav, spp, bits) = (wav.to_str().unwrap(), samples_per_pixel.to_string(), bits.to_string());
    let out = tool(python().to_str().unwrap(), &["-c", script, wav, &spp, &bits]);
    serde_json::from_slice(&out).unwrap()
}

/// RMS level (dBFS) of a 16-bit WAV, by numpy.
fn rms_db(wav: &Path) -> f64 {
    let script = "import sys, numpy as np\nfrom scipy.io import wavfile\n_, p = wavfile.read(sys.argv[1])\n\
                  print(20 * np.log10(np.sqrt(np.mean((p / 32768.0) ** 2))))";
    let out = tool(python().to_str().unwrap(), &["-c", script, wav.to_str().unwrap()]);
    String::from_utf8(out).unwrap().trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waveform_matches_min_max_computed_in_numpy() {
    let spp = ("WAVEFORM_SAMPLES_PER_PIXEL", "300");
    let sixteen = spawn_stages(&[NO_BROKER, spp]).await;
    let eight = spawn_stages(&[NO_BROKER, spp, ("WAVEFORM_BITS", "8")]).await;
    let dir = tempfile::tempdir().unwrap();
    // 1.3 s at 22.05 kHz = 28 665 frames: 95 pixels of 300 and a last one of 165. A tone on the
    // left, noise on the right, so that a swap of channels or of min and max shows.
    let format = ["-r", "22050", "-b", "16", "-c", "2"];
    let wav =
        sox_as(dir.path(), "take.wav", &format, &["synth", "1.3", "sine", "440", "whitenoise", "vol", "0.7"]);
    for (stages, bits) in [(&sixteen, 16), (&eight, 8)] {
        let (job, saved, doc) = save_new(stages, "take.wav", &wav).await;
        let entry = doc.get_document("waveform").unwrap();
        assert_eq!(entry.get_str("key").unwrap(), key(&job, "peaks.json"));
        assert_eq!(entry.get_str("content_type").unwrap(), "application/json");
        let bytes = object_of(stages, &doc, entry).await;
        let peaks: serde_json::Value = serde_json::from_slice(&bytes).expect("the peaks are JSON");
        let header = [("version", 2), ("channels", 2), ("sample_rate", 22_050)];
        let header = header.into_iter().chain([("samples_per_pixel", 300), ("bits", bits), ("length", 96)]);
        for (field, value) in header {
            assert_eq!(peaks[field], value, "{bits} bits: {field}");
            if field != "version" {
                assert_eq!(int(entry, field), value, "{bits} bits: the document's {field}");
            }
        }
        let (reference, frames) = numpy_peaks(&dir.path().join("take.wav"), 300, bits as u32);
        assert_eq!(frames, 28_665);
        let data: Vec<i64> = serde_json::from_value(peaks["data"].clone()).unwrap();
        assert_eq!(data.len(), 96 * 2 * 2, "{bits} bits: a min/max pair per channel per pixel");
        let first_difference = data.iter().zip(&reference).position(|(a, b)| a != b);
        assert_eq!(first_difference, None, "{bits} bits: peaks differ from numpy's");
        // The noise reaches well past half scale: the values are not all near 0.
        assert!(data.iter().any(|v| *v > (1 << (bits - 2))), "{bits} bits: {:?}", &data[..8]);
        // The processor's result and the event carry the same object.
        let Some(WaveformOutcome::Stored { object, info }) = &saved.object.waveform else {
            panic!("{:?}", saved.object.waveform)
        };
        assert_eq!(
            (info.length, info.bits, object.sha256.as_str()),
            (96, bits as u32, entry.get_str("sha256").unwrap())
        );
        let event = serde_json::to_value(AudioSaved::new(&job, &saved.object, &saved.entry)).unwrap();
        assert_eq!(event["waveform"]["key"], key(&job, "peaks.json"));
        assert_eq!(event["waveform"]["sha256"], sha256_hex(&bytes));
        assert_eq!(event["waveform"]["length"], 96);
        assert_eq!(fetch(event["waveform"]["url"].as_str().unwrap()).await, bytes, "the event's URL");
    }
    sixteen.teardown().await;
    eight.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flac_rendition_decodes_to_the_source_pcm() {
    let stages = spawn_stages(&[NO_BROKER, ("RENDITIONS", "flac,vorbis")]).await;
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    for (name, rate, bits, channels) in [
        ("s16-stereo.wav", "22050", "16", "2"),
        ("s24-mono.wav", "48000", "24", "1"),
        ("s24-stereo.wav", "44100", "24", "2"),
    ] {
        // Speech-like: a sweep (and noise on a second channel) between silences.
        let effects = ["synth", "0.8", "sine", "220-660", "pinknoise", "vol", "0.5", "pad", "0.3", "0.4"];
        let wav = sox_as(dir.path(), name, &["-r", rate, "-b", bits, "-c", channels], &effects);
        let (job, saved, doc) = save_new(&stages, name, &wav).await;
        let flac = rendition(&doc, "flac");
        assert_eq!(flac.get_str("key").unwrap(), key(&job, "flac.flac"), "{name}");
        assert_eq!(flac.get_str("content_type").unwrap(), "audio/flac", "{name}");
        assert!(!flac.contains_key("bitrate_kbps"), "{name}: {flac}");
        let bytes = object_of(&stages, &doc, flac).await;
        assert_eq!(&bytes[..4], b"fLaC", "{name}");
        let saved_bytes = wav.len() as i64 - bytes.len() as i64;
        assert_eq!(int(flac, "bytes_saved"), saved_bytes, "{name}");
        assert!(saved_bytes > 0, "{name}: FLAC {} bytes of a {} byte WAV", bytes.len(), wav.len());
        let from_processor = saved.object.renditions.iter().find(|r| r.name == "flac").unwrap();
        assert_eq!(
            (from_processor.bytes_saved, from_processor.object.size),
            (saved_bytes, bytes.len() as u64)
        );

        // The reference decoder (which also checks the MD5 of the samples if STREAMINFO has one).
        let (encoded, decoded) = (d(&format!("{name}.flac")), d(&format!("{name}.decoded.wav")));
        std::fs::write(&encoded, &bytes).unwrap();
        tool("flac", &["-d", "-s", "-f", "-o", &decoded, &encoded]);
        for what in ["r", "c", "b"] {
            assert_eq!(
                soxi(Path::new(&decoded), what),
                soxi(&dir.path().join(name), what),
                "{name}: soxi -{what}"
            );
        }
        let source_pcm = tool("sox", &[&d(name), "-t", "raw", "-"]);
        let decoded_pcm = tool("sox", &[&decoded, "-t", "raw", "-"]);
        let frames = (1.5 * rate.parse::<f64>().unwrap()) as usize;
        let width = bits.parse::<usize>().unwrap() / 8 * channels.parse::<usize>().unwrap();
        assert_eq!(source_pcm.len(), frames * width, "{name}");
        assert!(source_pcm == decoded_pcm, "{name}: the FLAC does not decode to the source's samples");
    }
    stages.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vorbis_rendition_plays_for_the_right_duration() {
    let stages = spawn_stages(&[NO_BROKER, ("RENDITIONS", "vorbis")]).await;
    let dir = tempfile::tempdir().unwrap();
    for (name, rate, channels, seconds) in [
        ("m24k.wav", "24000", "1", "1.7"),
        ("s44k.wav", "44100", "2", "1.234"),
        ("m16k.wav", "16000", "1", "0.9"),
    ] {
        let effects = ["synth", seconds, "sine", "300-900", "sine", "500", "vol", "0.5"];
        let wav = sox_as(dir.path(), name, &["-r", rate, "-b", "16", "-c", channels], &effects);
        let (job, _, doc) = save_new(&stages, name, &wav).await;
        let vorbis = rendition(&doc, "vorbis");
        assert_eq!(vorbis.get_str("key").unwrap(), key(&job, "vorbis.ogg"), "{name}");
        assert_eq!(vorbis.get_str("content_type").unwrap(), "audio/ogg", "{name}");
        assert_eq!(int(vorbis, "bitrate_kbps"), 64, "{name}");
        assert_eq!(doc.get_array("renditions_skipped").unwrap().len(), 0, "{name}");
        let bytes = object_of(&stages, &doc, vorbis).await;
        assert_eq!(&bytes[..4], b"OggS", "{name}");
        assert!(bytes.windows(7).any(|w| w == b"\x01vorbis"), "{name}: a Vorbis identification header");
        assert_eq!(int(vorbis, "bytes_saved"), wav.len() as i64 - bytes.len() as i64, "{name}");

        let (source, encoded) = (dir.path().join(name), dir.path().join(format!("{name}.ogg")));
        let decoded = dir.path().join(format!("{name}.decoded.wav"));
        std::fs::write(&encoded, &bytes).unwrap();
        tool("sox", &[encoded.to_str().unwrap(), "-b", "16", decoded.to_str().unwrap()]);
        let length = |p: &Path| soxi(p, "D").parse::<f64>().unwrap();
        let (want, got) = (length(&source), length(&decoded));
        assert!((got - want).abs() <= 0.020, "{name}: decoded {got} s, source {want} s");
        assert_eq!(
            (soxi(&decoded, "r"), soxi(&decoded, "c")),
            (rate.to_owned(), channels.to_owned()),
            "{name}"
        );
        let (want, got) = (rms_db(&source), rms_db(&decoded));
        assert!((got - want).abs() <= 1.0, "{name}: decoded RMS {got:.2} dBFS, source {want:.2} dBFS");
    }
    stages.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renditions_that_do_not_apply_are_listed_as_skipped() {
    let stages = spawn_stages(&[NO_BROKER, ("RENDITIONS", "flac,vorbis")]).await;
    let fixture = |name: &str| {
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/audio").join(name)).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let flac = sox_as(dir.path(), "take.flac", &["-r", "22050", "-c", "1"], &["synth", "1", "sine", "440"]);
    let mut expected_keys = Vec::new();
    // (file, its bytes, a word of why FLAC is skipped, and of why Vorbis is, when it is). The
    // MP3 at 22.05 kHz: libvorbis has no 64 kbit/s mode for 8 kHz mono (tone.mp3).
    let cases = [
        ("tone-id3.mp3", fixture("tone-id3.mp3"), "mp3", None),
        ("take.flac", flac, "integer PCM", None),
        ("tone-vorbis.ogg", fixture("tone-vorbis.ogg"), "vorbis", Some("Ogg Vorbis already")),
        ("tone-opus.ogg", fixture("tone-opus.ogg"), "no decoder", Some("no decoder")),
    ];
    for (file, bytes, flac_reason, vorbis_reason) in cases {
        let (job, saved, doc) = save_new(&stages, file, &bytes).await;
        let made: Vec<&str> = saved.object.renditions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(made, if vorbis_reason.is_some() { vec![] } else { vec!["vorbis"] }, "{file}");
        let listed: Vec<(String, String)> = (doc.get_array("renditions_skipped").unwrap().iter())
            .filter_map(Bson::as_document)
            .map(|s| (s.get_str("name").unwrap().to_owned(), s.get_str("reason").unwrap().to_owned()))
            .collect();
        let expected = [("flac", Some(flac_reason)), ("vorbis", vorbis_reason)];
        let expected: Vec<(&str, &str)> = expected.into_iter().filter_map(|(n, w)| Some((n, w?))).collect();
        assert_eq!(listed.len(), expected.len(), "{file}: {listed:?}");
        for ((name, reason), (want, word)) in listed.iter().zip(&expected) {
            assert!(name == want && reason.contains(word), "{file}: {name} skipped because {reason:?}");
        }
        let from_processor: Vec<(String, String)> =
            saved.object.renditions_skipped.iter().map(|s| (s.name.clone(), s.reason.clone())).collect();
        assert_eq!(from_processor, listed, "{file}: the event lists the same");
        let ext = file.rsplit('.').next().unwrap();
        expected_keys.push(key(&job, ext));
        for name in &made {
            object_of(&stages, &doc, rendition(&doc, name)).await;
            expected_keys.push(rendition(&doc, name).get_str("key").unwrap().to_owned());
        }
        if file == "tone-opus.ogg" {
            let why = doc.get_document("waveform").unwrap().get_str("skipped").unwrap();
            assert!(why.contains("no decoder"), "{why}");
            assert!(
                matches!(&saved.object.waveform, Some(WaveformOutcome::Skipped { skipped }) if skipped == why)
            );
        } else {
            object_of(&stages, &doc, doc.get_document("waveform").unwrap()).await;
            expected_keys.push(key(&job, "peaks.json"));
        }
    }
    // Nothing under a skipped rendition's key (nor a backup): exactly the files listed.
    let mut keys = stages.list_keys().await.unwrap();
    keys.sort();
    expected_keys.sort();
    assert_eq!(keys, expected_keys);
    stages.teardown().await;
}

/// The asset's version and the SHA-256 of the objects at `keys` (its FLAC, peaks and WAV), each
/// checked against the document.
async fn current(stages: &Stages, asset: &str, keys: &[String; 3]) -> (i64, Vec<String>) {
    let doc = stages.document(asset).await.unwrap();
    let flac = sha256_hex(&object_of(stages, &doc, rendition(&doc, "flac")).await);
    let peaks = sha256_hex(&object_of(stages, &doc, doc.get_document("waveform").unwrap()).await);
    let audio = sha256_hex(&stages.get_object(&keys[2]).await.unwrap().0);
    assert_eq!(doc.get_document("checksum").unwrap().get_str("sha256").unwrap(), audio);
    assert_eq!(doc.get_document("storage").unwrap().get_str("key").unwrap(), keys[2]);
    (doc.get_i64("version").unwrap(), vec![flac, peaks, audio])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_take_replaces_every_file_and_a_dropped_rendition_is_deleted() {
    let stages = spawn_stages(&[NO_BROKER, ("RENDITIONS", "flac")]).await;
    let dir = tempfile::tempdir().unwrap();
    let format = ["-r", "16000", "-b", "16", "-c", "1"];
    for (i, tone) in ["440", "660", "880"].into_iter().enumerate() {
        let name = format!("take{i}.wav");
        stages.add_audio(
            &name,
            &sox_as(dir.path(), &name, &format, &["synth", "0.7", "sine", tone, "pad", "0.2", "0.2"]),
        );
    }
    let mut take = job("/temp/take0.wav");
    let asset = take["asset_id"].as_str().unwrap().to_owned();
    let k = |suffix: &str| format!("cust_42/user-7/audio/{asset}.{suffix}");
    let keys = [k("flac.flac"), k("peaks.json"), k("wav")];
    let first = save(&stages, &stages.deps, &take, Attempt::FIRST).await;
    assert_eq!(first.entry.version, 1);
    let (_, v1) = current(&stages, &asset, &keys).await;
    take["audio_url"] = "/temp/take1.wav".into();
    take["text"] = "second take".into();
    let second = save(&stages, &stages.deps, &take, Attempt::FIRST).await;
    assert_eq!(second.entry.version, 2);
    let (version, v2) = current(&stages, &asset, &keys).await;
    assert_eq!(version, 2);
    for (key, (old, new)) in keys.iter().zip(v1.iter().zip(&v2)) {
        assert_ne!(old, new, "{key} still holds the first take's bytes");
    }
    let mut listed = stages.list_keys().await.unwrap();
    listed.sort();
    assert_eq!(listed, keys, "every key replaced, no .backup/ left");

    // The same job delivered again: same bytes, so nothing is uploaded and the version stays.
    // (Last-Modified has a 1 s resolution: wait past it so that a new upload would show.)
    let stamps = async || {
        let mut out = Vec::new();
        for key in &keys {
            let (_, o) = stages.get_object(key).await.unwrap();
            out.push((o.e_tag().map(str::to_owned), o.last_modified().copied()));
        }
        out
    };
    let before = stamps().await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let again = save(&stages, &stages.deps, &take, Attempt { redeliveries: 1, ..Attempt::FIRST }).await;
    assert_eq!(again.entry.version, 2);
    assert_eq!(stamps().await, before, "a redelivery of the same bytes uploads nothing");
    assert_eq!(current(&stages, &asset, &keys).await, (2, v2.clone()));

    // A worker restarted without renditions saves a third take: the FLAC of the second is gone.
    let plain = reconfigured(&stages, &[("RENDITIONS", "")]).await;
    take["audio_url"] = "/temp/take2.wav".into();
    take["text"] = "third take".into();
    let third = save(&stages, &plain, &take, Attempt::FIRST).await;
    assert_eq!((third.entry.version, third.object.renditions.len()), (3, 0));
    let doc = stages.document(&asset).await.unwrap();
    assert_eq!(doc.get_array("renditions").unwrap().len(), 0, "{doc}");
    let mut listed = stages.list_keys().await.unwrap();
    listed.sort();
    assert_eq!(listed, keys[1..], "the dropped rendition is deleted, nothing else left");
    let peaks = doc.get_document("waveform").unwrap();
    assert_ne!(sha256_hex(&object_of(&stages, &doc, peaks).await), v2[1], "the waveform is the third take's");
    assert!(stages.get_object(&keys[0]).await.unwrap_err().contains("NoSuchKey"));
    stages.teardown().await;
}

/// Found by this suite: libvorbis has no 64 kbit/s mode for 8 kHz mono (a telephony voice), and
/// the whole job was dead-lettered for it. The rendition is now made at the nearest bitrate
/// libvorbis has a mode for, and records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_without_a_mode_at_the_bitrate_gets_the_nearest_one() {
    let stages = spawn_stages(&[NO_BROKER, ("RENDITIONS", "vorbis")]).await;
    let dir = tempfile::tempdir().unwrap();
    let wav = sox_as(
        dir.path(),
        "phone.wav",
        &["-r", "8000", "-b", "16", "-c", "1"],
        &["synth", "1.5", "sine", "440"],
    );
    let (job, _, doc) = save_new(&stages, "phone.wav", &wav).await;
    let vorbis = rendition(&doc, "vorbis");
    assert_eq!(vorbis.get_str("key").unwrap(), key(&job, "vorbis.ogg"));
    let used = int(vorbis, "bitrate_kbps");
    assert!((8..64).contains(&used), "the bitrate used: {used} kbit/s");
    let encoded = dir.path().join("phone.ogg");
    std::fs::write(&encoded, object_of(&stages, &doc, vorbis).await).unwrap();
    let seconds: f64 = soxi(&encoded, "D").parse().unwrap();
    assert!((seconds - 1.5).abs() <= 0.020, "decoded {seconds} s");
    stages.teardown().await;
}

/// Found by this suite: flacenc 0.5.1 turned 1.5 s of loud 24-bit noise (216 kB as WAV) into a
/// 237 MB "rendition" after 41 s of CPU. A FLAC that grows past its PCM (plus 1 MiB) is now given
/// up at once and listed as skipped with the reason; the take is saved, and nothing of the FLAC
/// is left in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flac_larger_than_its_source_is_skipped_not_stored() {
    let stages = spawn_stages(&[NO_BROKER, ("RENDITIONS", "flac")]).await;
    let dir = tempfile::tempdir().unwrap();
    let format = ["-r", "48000", "-b", "24", "-c", "1"];
    let wav = sox_as(dir.path(), "noise.wav", &format, &["synth", "1.5", "whitenoise", "vol", "0.5"]);
    let started = std::time::Instant::now();
    let (job, saved, doc) = save_new(&stages, "noise.wav", &wav).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "took {:?}", started.elapsed());
    assert!(saved.object.renditions.is_empty());
    let skipped = doc.get_array("renditions_skipped").unwrap();
    let skipped = skipped[0].as_document().unwrap();
    assert_eq!(skipped.get_str("name").unwrap(), "flac");
    assert!(skipped.get_str("reason").unwrap().contains("larger than the source"), "{skipped}");
    let mut keys = stages.list_keys().await.unwrap();
    keys.sort();
    assert_eq!(keys, [key(&job, "peaks.json"), key(&job, "wav")]);
    stages.teardown().await;
}
