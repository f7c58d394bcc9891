//! Structured jobs: every field an arbitrary value (optionally missing), serialised as valid
//! JSON, so that the fuzzer spends its time on field validation rather than on JSON syntax.
#![no_main]

mod common;

use std::sync::LazyLock;

use arbitrary::Arbitrary;
use audio_worker::job::{SaveAudioJob, resolve_audio_source};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

static SETUP: LazyLock<common::Setup> = LazyLock::new(|| common::Setup::for_base(common::BASE));

#[derive(Arbitrary, Debug)]
enum Id {
    Uuid(u128),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
struct Fields {
    asset_id: Id,
    customer_id: String,
    user_id: String,
    audio_url: String,
    text: String,
    duration: f64,
    voice: String,
    voice_name: String,
    language: String,
    speed: f64,
    model: String,
    folder: Option<String>,
    tags: Option<Vec<String>>,
    /// Bit i set: leave field i out of the JSON.
    missing: u16,
}

const REQUIRED: [&str; 11] = [
    "asset_id",
    "customer_id",
    "user_id",
    "audio_url",
    "text",
    "duration",
    "voice",
    "voice_name",
    "language",
    "speed",
    "model",
];

fuzz_target!(|f: Fields| {
    let asset_id = match &f.asset_id {
        Id::Uuid(n) => uuid_string(*n),
        Id::Raw(s) => s.clone(),
    };
    let values = [
        json!(asset_id),
        json!(f.customer_id),
        json!(f.user_id),
        json!(f.audio_url),
        json!(f.text),
        json!(f.duration),
        json!(f.voice),
        json!(f.voice_name),
        json!(f.language),
        json!(f.speed),
        json!(f.model),
        json!(f.folder),
        json!(f.tags),
    ];
    let names = REQUIRED.iter().copied().chain(["folder", "tags"]);
    let mut obj = Map::new();
    for (i, (name, value)) in names.zip(values).enumerate() {
        if f.missing & (1 << i) == 0 {
            obj.insert(name.to_owned(), value);
        }
    }
    let body = serde_json::to_vec(&Value::Object(obj)).unwrap();
    let Ok(job) = SaveAudioJob::parse(&body, &SETUP.policy) else { return };

    let dropped: Vec<_> = REQUIRED.iter().enumerate().filter(|(i, _)| f.missing & (1 << i) != 0).collect();
    assert!(dropped.is_empty(), "invariant required_fields violated: parsed without {dropped:?}");
    assert_eq!(job.customer_id.as_str(), f.customer_id, "invariant ids_verbatim violated");
    assert_eq!(job.user_id.as_str(), f.user_id, "invariant ids_verbatim violated");
    assert!(job.duration.is_finite() && job.duration >= 0.0, "invariant duration violated: {}", job.duration);
    assert!(job.tts.speed.is_finite() && job.tts.speed > 0.0, "invariant speed violated: {}", job.tts.speed);
    common::check_job(&job, &SETUP);
    let direct =
        resolve_audio_source(&SETUP.policy, &f.audio_url).expect("invariant source_consistent violated");
    assert_eq!(direct, job.source, "invariant source_consistent violated");
    common::check_resolution(&SETUP, &f.audio_url, &job.source);
});

fn uuid_string(n: u128) -> String {
    let h = format!("{n:032x}");
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}
