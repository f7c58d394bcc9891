//! The analysis (issue 14) against independent references, on real files made at test time with
//! Debian's `sox`: integrated loudness from `pyloudnorm` (PyPI), true peak from a 4× polyphase
//! resampling in `scipy`, silence from the padding sox wrote, clipping counted in the test.
//! `scripts/test.sh` installs sox, pyloudnorm and scipy when they are missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use audio_worker::audio::analysis::Analysis;
use audio_worker::audio::measure::AnalysisOutcome;
use audio_worker::error::StageError;
use audio_worker::job::{Job, SaveAudioJob};
use audio_worker::processor::{self, Announcer, Outcome, Saved};
use audio_worker::retry::Attempt;

use crate::helpers::{Stages, env_or, job, spawn_stages};

/// Nothing listens on port 1: any AMQP use would fail the test.
pub(crate) const NO_BROKER: (&str, &str) = ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f");

pub(crate) struct Quiet;

impl Announcer for Quiet {
    async fn announce(&self, _job: &Job, _saved: &Saved) -> Result<(), StageError> {
        Ok(())
    }
}

fn sox(dir: &Path, name: &str, args: &[&str]) -> Vec<u8> {
    sox_as(dir, name, &["-r", "48000", "-b", "16", "-c", "2"], args)
}

/// Makes `name` in `dir` with sox from nothing (`-n`): `format` (rate, bits, channels), then the
/// `effects` (synth, pad, vol…). Returns its bytes.
pub(crate) fn sox_as(dir: &Path, name: &str, format: &[&str], effects: &[&str]) -> Vec<u8> {
    let path = dir.join(name);
    let status = Command::new("sox")
        .arg("-n")
        .args(format)
        .arg(&path)
        .args(effects)
        .status()
        .expect("sox (scripts/test.sh installs it)");
    assert!(status.success(), "sox {format:?} {effects:?}");
    std::fs::read(&path).unwrap()
}

/// The tools venv's python (numpy, scipy, pyloudnorm).
pub(crate) fn python() -> PathBuf {
    PathBuf::from(env_or("AUDIO_WORKER_HOME", &format!("{}/.cache/audio-worker", env_or("HOME", "/root"))))
        .join("tools/venv/bin/python")
}

/// The reference figures of a 16-bit WAV: (integrated LUFS, true peak dBTP, samples at ±full
/// scale), by pyloudnorm and scipy in the tools venv.
fn reference(wav: &Path) -> (f64, f64, u64) {
    let python = python();
    let script = r#"
import sys
import numpy as np
import pyloudnorm
from scipy.io import wavfile
from scipy.signal import resample_poly
rate, pcm = wavfile.read(sys.argv[1])
data = pcm.astype(np.float64) / 32768.0
lufs = pyloudnorm.Meter(rate).integrated_loudness(data)
peak = np.max(np.abs(resample_poly(data, 4, 1, axis=0)))
clipped = int(np.sum((pcm == 32767) | (pcm == -32768)))
print(lufs, 20 * np.log10(peak), clipped)
"#;
    let out = Command::new(&python).arg("-c").arg(script).arg(wav).output().expect("the tools venv's python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let v: Vec<&str> = text.split_whitespace().collect();
    (v[0].parse().unwrap(), v[1].parse().unwrap(), v[2].parse().unwrap())
}

/// Serves `bytes` as `name` and runs a job for it through the processor: the job and its outcome.
pub(crate) async fn run(stages: &Stages, name: &str, bytes: &[u8]) -> (Job, Outcome) {
    stages.add_audio(name, bytes);
    let json = job(&format!("/temp/{name}"));
    let job =
        SaveAudioJob::parse(json.to_string().as_bytes(), &stages.settings.audio_gen.url_policy).unwrap();
    let outcome = processor::handle(&job, &stages.deps, Attempt::FIRST, &Quiet).await;
    (job, outcome)
}

async fn analyse(stages: &Stages, name: &str, bytes: &[u8]) -> (Analysis, mongodb::bson::Document) {
    let (job, outcome) = run(stages, name, bytes).await;
    let Outcome::Saved(saved) = outcome else { panic!("{name}: {outcome:?}") };
    let Some(AnalysisOutcome::Done(analysis)) = saved.object.analysis.clone() else {
        panic!("{name}: no analysis: {:?}", saved.object.analysis)
    };
    let doc = stages.document(&job.asset_id.to_string()).await.unwrap();
    (analysis, doc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_analysis_matches_pyloudnorm_and_the_padding_sox_wrote() {
    let stages = spawn_stages(&[NO_BROKER]).await;
    let dir = tempfile::tempdir().unwrap();
    // 3 s of a 440 Hz tone at -12 dBFS, padded with 1.5 s of silence before and 0.5 s after.
    let wav =
        sox(dir.path(), "padded.wav", &["synth", "3", "sine", "440", "vol", "0.25", "pad", "1.5", "0.5"]);
    let (lufs, true_peak, clipped) = reference(&dir.path().join("padded.wav"));
    let (analysis, doc) = analyse(&stages, "padded.wav", &wav).await;
    let integrated = analysis.loudness.integrated_lufs.unwrap();
    assert!((integrated - lufs).abs() <= 0.1, "integrated {integrated} LUFS, pyloudnorm {lufs}");
    let peak = analysis.loudness.true_peak_dbtp.unwrap();
    assert!((peak - true_peak).abs() <= 0.2, "true peak {peak} dBTP, scipy 4x {true_peak}");
    assert!((analysis.silence.leading_s - 1.5).abs() <= 0.010, "{:?}", analysis.silence);
    assert!((analysis.silence.trailing_s - 0.5).abs() <= 0.010, "{:?}", analysis.silence);
    assert_eq!(analysis.clipped_samples, clipped);
    assert_eq!((analysis.sample_rate, analysis.channels, analysis.bits_per_sample), (48_000, 2, Some(16)));
    assert!(analysis.codec.starts_with("pcm_s16"), "{}", analysis.codec);
    // The document records the same analysis.
    let stored = doc.get_document("analysis").unwrap();
    let recorded = stored.get_document("loudness").unwrap().get_f64("integrated_lufs").unwrap();
    assert_eq!(recorded, integrated);
    assert_eq!(
        stored.get_document("silence").unwrap().get_f64("leading_s").unwrap(),
        analysis.silence.leading_s
    );

    // The same take as FLAC: lossless, so the same figures, decoded by the FLAC decoder.
    let flac = dir.path().join("padded.flac");
    assert!(Command::new("sox").arg(dir.path().join("padded.wav")).arg(&flac).status().unwrap().success());
    let (from_flac, _) = analyse(&stages, "padded.flac", &std::fs::read(&flac).unwrap()).await;
    assert_eq!(from_flac.codec, "flac");
    assert!((from_flac.loudness.integrated_lufs.unwrap() - lufs).abs() <= 0.1, "{from_flac:?}");
    assert!((from_flac.silence.leading_s - 1.5).abs() <= 0.010, "{from_flac:?}");
    stages.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clipped_samples_are_counted_exactly() {
    let stages = spawn_stages(&[NO_BROKER]).await;
    let dir = tempfile::tempdir().unwrap();
    // A tone driven 4x over full scale: sox clips it (and says so on stderr).
    let wav = sox(dir.path(), "clipped.wav", &["synth", "1", "sine", "300", "vol", "4"]);
    let (_, _, clipped) = reference(&dir.path().join("clipped.wav"));
    assert!(clipped > 1000, "the file is clipped: {clipped}");
    let (analysis, _) = analyse(&stages, "clipped.wav", &wav).await;
    assert_eq!(analysis.clipped_samples, clipped);
    stages.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opus_take_is_saved_with_its_analysis_skipped_and_why() {
    let stages = spawn_stages(&[NO_BROKER]).await;
    let opus =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/audio/tone-opus.ogg"))
            .unwrap();
    let (job, outcome) = run(&stages, "take.ogg", &opus).await;
    let Outcome::Saved(saved) = outcome else { panic!("{outcome:?}") };
    let Some(AnalysisOutcome::Skipped { skipped }) = &saved.object.analysis else {
        panic!("{:?}", saved.object.analysis)
    };
    assert!(skipped.contains("no decoder"), "{skipped}");
    let doc = stages.document(&job.asset_id.to_string()).await.unwrap();
    assert_eq!(doc.get_document("analysis").unwrap().get_str("skipped").unwrap(), skipped);
    stages.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_that_breaks_a_quality_rule_is_dead_lettered_and_nothing_is_stored() {
    let rules = "max_clipped_samples=0,max_leading_silence_s=1";
    let stages = spawn_stages(&[NO_BROKER, ("QUALITY_RULES", rules)]).await;
    let dir = tempfile::tempdir().unwrap();
    let clipped = sox(dir.path(), "clipped.wav", &["synth", "1", "sine", "300", "vol", "4"]);
    let (_, _, count) = reference(&dir.path().join("clipped.wav"));
    let padded =
        sox(dir.path(), "padded.wav", &["synth", "1", "sine", "300", "vol", "0.25", "pad", "1.5", "0"]);
    let clean =
        sox(dir.path(), "clean.wav", &["synth", "1", "sine", "300", "vol", "0.25", "pad", "0.2", "0.2"]);
    for (name, bytes, reason) in [
        (
            "clipped.wav",
            &clipped,
            format!("quality rule max_clipped_samples=0 broken: {count} clipped samples"),
        ),
        (
            "padded.wav",
            &padded,
            "quality rule max_leading_silence_s=1 broken: 1.500 s of leading silence".to_owned(),
        ),
    ] {
        let (job, outcome) = run(&stages, name, bytes).await;
        let Outcome::DeadLetter(failure) = outcome else { panic!("{name}: {outcome:?}") };
        assert_eq!(failure.error.reason, reason, "{name}");
        assert!(!failure.error.is_transient(), "{name}: the same take breaks the rule again");
        assert!(stages.document(&job.asset_id.to_string()).await.is_none(), "{name}: no document");
    }
    assert_eq!(stages.list_keys().await.unwrap(), Vec::<String>::new(), "no object for a refused take");

    let (analysis, doc) = analyse(&stages, "clean.wav", &clean).await;
    let passed = ["max_clipped_samples=0", "max_leading_silence_s=1"];
    assert_eq!(analysis.quality_rules_passed.as_deref(), Some(&passed.map(String::from)[..]));
    let recorded = doc.get_document("analysis").unwrap().get_array("quality_rules_passed").unwrap();
    assert_eq!(recorded.iter().map(|r| r.as_str().unwrap()).collect::<Vec<_>>(), passed);
    stages.teardown().await;
}
