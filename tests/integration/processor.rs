//! `processor::handle` driven directly, with no broker: the worker's real clients against S3
//! (s3s-fs), MongoDB (SecantusDB) and the stand-in, and `AMQP_URL` pointing at a closed port,
//! so nothing here can be decided by a broker. Each test asserts the `Outcome` the consumer
//! would carry out, and what the stages left in S3 and MongoDB.

use std::sync::Mutex;

use audio_worker::error::{ErrorClass, Stage, StageError};
use audio_worker::job::{Job, SaveAudioJob};
use audio_worker::processor::{self, Announcer, Outcome, Saved};
use audio_worker::retry::Attempt;
use audio_worker::standin::Fault;
use sha2::Digest;

use crate::helpers::{Stages, job, spawn_stages, wav_tone};

/// Nothing listens on port 1: any AMQP use would fail the test.
const NO_BROKER: (&str, &str) = ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f");

/// Stands in for the consumer's publisher: records what it was asked to announce, or fails.
#[derive(Default)]
struct Recorder {
    /// Each announced save: the asset id, the version and the object key.
    announced: Mutex<Vec<(uuid::Uuid, i64, String)>>,
    /// When set, every announce fails with this (as an unconfirmed publish would).
    fail_with: Option<StageError>,
}

impl Announcer for Recorder {
    async fn announce(&self, job: &Job, saved: &Saved) -> Result<(), StageError> {
        if let Some(error) = &self.fail_with {
            return Err(error.clone());
        }
        self.announced.lock().unwrap().push((job.asset_id, saved.entry.version, saved.object.key.clone()));
        Ok(())
    }
}

async fn stages() -> Stages {
    // Two delay queues of 1 s and 2 s; two in-process attempts per stage.
    spawn_stages(&[NO_BROKER, ("RETRY_SCHEDULE", "1s,2s"), ("RETRY_MAX_ATTEMPTS", "2")]).await
}

fn parse(stages: &Stages, json: &serde_json::Value) -> Job {
    SaveAudioJob::parse(json.to_string().as_bytes(), &stages.settings.audio_gen.url_policy).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_saves_is_announced_and_its_outcome_is_saved() {
    let stages = stages().await;
    let wav = wav_tone(0.5);
    stages.add_audio("ok.wav", &wav);
    let job = parse(&stages, &job("/temp/ok.wav"));
    let recorder = Recorder::default();

    let outcome = processor::handle(&job, &stages.deps, Attempt::FIRST, &recorder).await;

    let Outcome::Saved(saved) = outcome else { panic!("{outcome:?}") };
    let key = format!("cust_42/user-7/audio/{}.wav", job.asset_id);
    assert_eq!(saved.object.key, key);
    assert_eq!(saved.object.size, wav.len() as u64);
    assert_eq!(saved.object.sha256, hex::encode(sha2::Sha256::digest(&wav)));
    assert_eq!(saved.entry.version, 1);
    assert_eq!(*recorder.announced.lock().unwrap(), [(job.asset_id, 1, key.clone())]);
    let (bytes, _) = stages.get_object(&key).await.unwrap();
    assert_eq!(bytes, wav);
    let document = stages.document(&job.asset_id.to_string()).await.unwrap();
    assert_eq!(document.get_str("status").unwrap(), "saved");
    assert_eq!(document.get_i64("version").unwrap(), 1);
    stages.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_on_the_first_delivery_waits_the_schedules_first_delay() {
    let stages = stages().await;
    stages.add_audio("busy.wav", &wav_tone(0.5));
    stages.standin.script("busy.wav", [Fault::Status(503), Fault::Status(503)]);
    let job = parse(&stages, &job("/temp/busy.wav"));
    let recorder = Recorder::default();

    let outcome = processor::handle(&job, &stages.deps, Attempt::FIRST, &recorder).await;

    let Outcome::RetryLater { next_delivery, delay, failure } = outcome else { panic!("{outcome:?}") };
    assert_eq!(next_delivery, 2);
    assert!((800..=1200).contains(&delay.as_millis()), "1 s ± 20 %: {delay:?}");
    assert_eq!(failure.error.stage, Stage::Download);
    assert_eq!(failure.error.class, ErrorClass::Transient);
    assert!(failure.error.reason.contains("HTTP 503"), "{}", failure.error.reason);
    assert_eq!(failure.attempts, 2, "RETRY_MAX_ATTEMPTS in process");
    assert_eq!(stages.standin.count("GET", "busy.wav"), 2);
    assert!(recorder.announced.lock().unwrap().is_empty());
    assert_eq!(stages.list_keys().await.unwrap(), Vec::<String>::new(), "nothing uploaded");
    assert_eq!(stages.document_count(&job.asset_id.to_string()).await, 0);
    stages.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_on_the_last_delivery_is_dead_lettered_with_every_attempt_counted() {
    let stages = stages().await;
    stages.add_audio("down.wav", &wav_tone(0.5));
    stages.standin.script("down.wav", [Fault::Status(502), Fault::Status(502)]);
    let job = parse(&stages, &job("/temp/down.wav"));
    // The schedule has two entries, so delivery 3 is the last; deliveries 1 and 2 made 4 attempts.
    let last = Attempt { delivery: 3, prior_attempts: 4, redeliveries: 0 };

    let outcome = processor::handle(&job, &stages.deps, last, &Recorder::default()).await;

    let Outcome::DeadLetter(failure) = outcome else { panic!("{outcome:?}") };
    assert_eq!(failure.error.stage, Stage::Download);
    assert_eq!(failure.error.class, ErrorClass::Transient);
    assert!(failure.error.reason.contains("HTTP 502"), "{}", failure.error.reason);
    assert_eq!(failure.attempts, 6);
    stages.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_dead_lettered_at_once_whatever_the_schedule() {
    let stages = stages().await;
    let job = parse(&stages, &job("/temp/missing.wav"));

    let outcome = processor::handle(&job, &stages.deps, Attempt::FIRST, &Recorder::default()).await;

    let Outcome::DeadLetter(failure) = outcome else { panic!("{outcome:?}") };
    assert_eq!(failure.error.stage, Stage::Download);
    assert_eq!(failure.error.class, ErrorClass::Permanent);
    assert!(failure.error.reason.contains("HTTP 404"), "{}", failure.error.reason);
    assert_eq!(failure.attempts, 1);
    assert_eq!(stages.standin.count("GET", "missing.wav"), 1, "a 404 is not retried");
    assert_eq!(stages.list_keys().await.unwrap(), Vec::<String>::new());
    stages.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announcement_that_is_not_confirmed_is_a_publish_failure_retried_later() {
    let stages = stages().await;
    let wav = wav_tone(0.5);
    stages.add_audio("quiet.wav", &wav);
    let job = parse(&stages, &job("/temp/quiet.wav"));
    let unconfirmed = Recorder {
        fail_with: Some(StageError::transient(Stage::Publish, "broker nacked the publish")),
        ..Recorder::default()
    };

    let outcome = processor::handle(&job, &stages.deps, Attempt::FIRST, &unconfirmed).await;

    let Outcome::RetryLater { next_delivery, failure, .. } = outcome else { panic!("{outcome:?}") };
    assert_eq!((next_delivery, failure.error.stage, failure.attempts), (2, Stage::Publish, 2));
    // The save itself happened; the redelivery finds the same bytes and reports the same version.
    let document = stages.document(&job.asset_id.to_string()).await.unwrap();
    assert_eq!(document.get_i64("version").unwrap(), 1);
    let recorder = Recorder::default();
    let again = processor::handle(
        &job,
        &stages.deps,
        Attempt { delivery: 2, prior_attempts: 2, redeliveries: 0 },
        &recorder,
    )
    .await;
    let Outcome::Saved(saved) = again else { panic!("{again:?}") };
    assert_eq!(saved.entry.version, 1);
    assert_eq!(recorder.announced.lock().unwrap().len(), 1);
    stages.teardown().await;
}
