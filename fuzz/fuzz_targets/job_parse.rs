//! Arbitrary bytes as a job body: `SaveAudioJob::parse` must never panic, and a job it accepts
//! must have safe tenant ids, object keys and audio/cleanup URLs.
#![no_main]

mod common;

use std::sync::LazyLock;

use audio_worker::job::SaveAudioJob;
use libfuzzer_sys::fuzz_target;

#[derive(serde::Deserialize)]
struct AudioUrl {
    audio_url: String,
}

static SETUP: LazyLock<common::Setup> = LazyLock::new(|| common::Setup::for_base(common::BASE));

fuzz_target!(|body: &[u8]| {
    if let Ok(job) = SaveAudioJob::parse(body, &SETUP.policy) {
        common::check_job(&job, &SETUP);
        // The audio_url as sent, for the URL invariants. (Through serde like the job itself: a
        // `Value` would refuse what serde skips unchecked in unknown fields, e.g. invalid UTF-8.)
        let raw: AudioUrl = serde_json::from_slice(body).expect("parsed once already");
        common::check_resolution(&SETUP, &raw.audio_url, &job.source);
    }
});
