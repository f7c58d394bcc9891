//! Arbitrary strings as a job's `audio_url`, resolved under several URL policies (the default
//! policy of four bases, and one that also allows a CDN and some IP literals): never a panic; an
//! accepted URL is http(s) with an allowed host, no user-info and no non-public IP; a relative
//! one stays on the base's origin and under its path, and so does anything with `..` segments or
//! backslashes; cleanup URLs only for `{base}/temp/{file}`.
#![no_main]

mod common;

use std::sync::LazyLock;

use audio_worker::job::resolve_audio_source;
use libfuzzer_sys::fuzz_target;

static SETUPS: LazyLock<Vec<common::Setup>> = LazyLock::new(|| {
    let mut setups: Vec<_> = common::BASES.iter().map(|b| common::Setup::for_base(b)).collect();
    setups.push(common::Setup::wide(common::BASE));
    setups
});

fuzz_target!(|input: &str| {
    for setup in SETUPS.iter() {
        if let Ok(src) = resolve_audio_source(&setup.policy, input) {
            common::check_source(setup, &src);
            common::check_resolution(setup, input, &src);
        }
    }
});
