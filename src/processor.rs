//! `process(job, deps)`: download → upload → catalog, each stage retried in process on
//! transient errors. No AMQP types here: a test can run a job without a broker, and the
//! consumer turns the result into ack, event or dead letter.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::time::Instant;

use crate::config::Settings;
use crate::error::StageError;
use crate::health::{Dependency, Health, names};
use crate::job::Job;
use crate::pipeline::catalog::{Catalog, CatalogEntry};
use crate::pipeline::download::{self, http_client};
use crate::pipeline::store::{Store, StoredObject, object_key};
use crate::pipeline::transfer;

/// The clients a job needs, built once at start-up and shared by every job.
#[derive(Debug, Clone)]
pub struct Deps {
    /// Downloads and cleanups.
    pub http: reqwest::Client,
    /// S3.
    pub store: Store,
    /// MongoDB.
    pub catalog: Catalog,
    /// Everything else (retry policy, spool dir, limits).
    pub settings: Arc<Settings>,
    /// Readiness: stages record here that S3 and MongoDB answered.
    pub health: Arc<Health>,
}

impl Deps {
    /// Builds every client from the settings; makes no request.
    ///
    /// # Errors
    /// The TLS backend fails to start or `MONGODB_URI` does not parse.
    pub async fn new(settings: Settings) -> anyhow::Result<Self> {
        use anyhow::Context;
        let http = http_client(
            settings.audio_gen.connect_timeout,
            settings.audio_gen.read_timeout,
            &settings.audio_gen.url_policy,
        )
        .context("building the HTTP client")?;
        let store = Store::new(&settings.s3);
        let catalog = Catalog::connect(&settings.mongo).await.context("MONGODB_URI")?;
        Ok(Self { http, store, catalog, settings: Arc::new(settings), health: Health::new() })
    }

    /// The retry policy from `RETRY_*` settings.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.settings.worker.retry_max_attempts,
            initial_delay: self.settings.worker.retry_initial_delay,
            max_elapsed: self.settings.worker.retry_max_elapsed,
        }
    }
}

/// Bounded exponential backoff with jitter.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts of one stage, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt; it doubles each time (capped at 30 s), with jitter.
    pub initial_delay: Duration,
    /// The most a job spends sleeping between retries, all stages together.
    pub max_elapsed: Duration,
}

/// A job that failed for good: the last error and how many attempts its stage had.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error} after {attempts} attempt(s)")]
pub struct Failure {
    /// The last error.
    pub error: StageError,
    /// Attempts made at the failing stage.
    pub attempts: u32,
}

/// A saved job: the object in S3 and the catalog's answer.
#[derive(Debug, Clone)]
pub struct Saved {
    /// The uploaded object with its presigned URL.
    pub object: StoredObject,
    /// The document's version and creation time.
    pub entry: CatalogEntry,
}

/// Runs the stages of one job.
///
/// # Errors
/// [`Failure`] with the first stage that failed permanently or ran out of retries.
pub async fn process(job: &Job, deps: &Deps) -> Result<Saved, Failure> {
    let mut budget = RetryBudget::new(deps.retry_policy());
    let settings = &deps.settings;
    budget.run(|| deps.catalog.ensure_owner(job)).await?;
    let started = std::time::Instant::now();
    // The first attempt uploads while it downloads (large files); a retry downloads only, and
    // the upload stage below sends the spool file.
    let mut first_attempt = true;
    let download = budget
        .run(|| {
            let overlap = std::mem::take(&mut first_attempt);
            async move {
                if overlap {
                    transfer::download_and_upload(deps, job).await
                } else {
                    let downloaded = download::download(
                        &deps.http,
                        &job.source.url,
                        &settings.worker.tmp_dir,
                        settings.audio_gen.max_audio_bytes,
                        None,
                    )
                    .await?;
                    Ok((downloaded, None))
                }
            }
        })
        .await;
    metrics::histogram!(names::STAGE_DURATION, "stage" => "download").record(started.elapsed().as_secs_f64());
    let (downloaded, uploaded) = match download {
        Ok(done) => done,
        // A redelivery after the temporary file was cleaned up: the asset is already saved, so
        // the job's outcome is that save (same version, same event id), not a failure.
        Err(failure) if failure.error.not_found => {
            let saved = deps.catalog.find_saved(job).await.map_err(|error| Failure { error, attempts: 1 })?;
            let Some((object, entry)) = saved else { return Err(failure) };
            let (url, url_expires_at) =
                deps.store.presign_get(&object.key).await.map_err(|error| Failure { error, attempts: 1 })?;
            tracing::info!(version = entry.version, "audio gone but already saved; reporting that save");
            return Ok(Saved { object: StoredObject { url, url_expires_at, ..object }, entry });
        }
        Err(failure) => return Err(failure),
    };
    tracing::info!(size = downloaded.size, sha256 = %downloaded.sha256, "downloaded");
    let key = object_key(job, downloaded.format);
    metrics::counter!(names::DOWNLOADED_BYTES).increment(downloaded.size);
    let started = std::time::Instant::now();
    let object = match uploaded {
        Some(object) => Ok(object),
        None => budget.run(|| deps.store.put(job, &downloaded, &key)).await,
    };
    let object = record(deps, Dependency::S3, "upload", started, object)?;
    metrics::counter!(names::UPLOADED_BYTES).increment(object.size);
    drop(downloaded);
    tracing::info!(bucket = %object.bucket, key = %object.key, "uploaded");
    let started = std::time::Instant::now();
    let entry = budget.run(|| deps.catalog.upsert(job, &object)).await;
    let entry = record(deps, Dependency::MongoDb, "catalog", started, entry)?;
    tracing::info!(version = entry.version, "catalogued");
    Ok(Saved { object, entry })
}

/// Records a stage's duration and whether its store answered (readiness): a transient failure
/// after the retries means it did not; a permanent one (a refused key, a tenant conflict) means
/// it did.
fn record<T>(
    deps: &Deps,
    dependency: Dependency,
    stage: &'static str,
    started: std::time::Instant,
    result: Result<T, Failure>,
) -> Result<T, Failure> {
    metrics::histogram!(names::STAGE_DURATION, "stage" => stage).record(started.elapsed().as_secs_f64());
    match &result {
        Err(failure) if failure.error.is_transient() => {
            deps.health.failed(dependency, failure.error.reason.clone())
        }
        _ => deps.health.ok(dependency),
    }
    result
}

/// One job's retry allowance: attempts per stage, sleeping time for the whole job.
#[derive(Debug)]
pub struct RetryBudget {
    policy: RetryPolicy,
    /// After this instant no retry starts.
    deadline: Instant,
}

impl RetryBudget {
    /// A fresh budget starting now.
    pub fn new(policy: RetryPolicy) -> Self {
        Self { policy, deadline: Instant::now() + policy.max_elapsed }
    }

    /// Runs `op` until it succeeds, fails permanently, uses its attempts, or the job's time is up.
    ///
    /// # Errors
    /// The last error with the attempt count.
    pub async fn run<T, F, Fut>(&mut self, mut op: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StageError>>,
    {
        let attempts = AtomicU32::new(0);
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.policy.initial_delay)
            .with_max_delay(Duration::from_secs(30).max(self.policy.initial_delay))
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(self.policy.max_attempts.saturating_sub(1) as usize)
            .with_total_delay(Some(remaining));
        let result = (|| {
            attempts.fetch_add(1, Ordering::Relaxed);
            op()
        })
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .when(StageError::is_transient)
        .notify(|error: &StageError, delay: Duration| {
            tracing::warn!(stage = %error.stage, error = %error.reason, retry_in_ms = delay.as_millis() as u64, "transient error, retrying");
        })
        .await;
        result.map_err(|error| Failure { error, attempts: attempts.load(Ordering::Relaxed) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Stage;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_delay: Duration::from_secs(1),
            max_elapsed: Duration::from_secs(120),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let mut budget = RetryBudget::new(policy(5));
        let started = Instant::now();
        let out = budget
            .run(|| async {
                if calls.fetch_add(1, Ordering::Relaxed) < 2 {
                    Err(StageError::transient(Stage::Download, "HTTP 503"))
                } else {
                    Ok(7)
                }
            })
            .await
            .unwrap();
        assert_eq!(out, 7);
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        // Two backoff sleeps happened (at least the 1 s minimum each), on the paused clock.
        assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let failure = RetryBudget::new(policy(5))
            .run(|| async {
                calls.fetch_add(1, Ordering::Relaxed);
                Err::<(), _>(StageError::permanent(Stage::Download, "HTTP 404"))
            })
            .await
            .unwrap_err();
        assert_eq!(failure.attempts, 1);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(failure.error.reason, "HTTP 404");
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded() {
        let failure = RetryBudget::new(policy(5))
            .run(|| async { Err::<(), _>(StageError::transient(Stage::Upload, "HTTP 500")) })
            .await
            .unwrap_err();
        assert_eq!(failure.attempts, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn total_time_is_bounded() {
        let policy = RetryPolicy {
            max_attempts: 100,
            initial_delay: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(60),
        };
        let started = Instant::now();
        let failure = RetryBudget::new(policy)
            .run(|| async { Err::<(), _>(StageError::transient(Stage::Catalog, "no server")) })
            .await
            .unwrap_err();
        assert!(failure.attempts < 100, "{}", failure.attempts);
        assert!(started.elapsed() <= Duration::from_secs(61), "{:?}", started.elapsed());
    }
}
