//! `handle(job, deps, attempt, announcer) -> Outcome`: the one place that decides what becomes
//! of a delivery.
//!
//! ```text
//! Job ─► download ─► upload ─► catalog ─► announce ─► Outcome::Saved
//!           └──────────┴──────────┴──────────┴─► Failure ─► RetryLater | DeadLetter
//! ```
//! Each stage is retried in process on transient errors ([`RetryBudget`]); a failure that
//! survives that waits in a delay queue while `RETRY_SCHEDULE` has an entry for this delivery,
//! and is dead-lettered otherwise ([`crate::retry::next_redelivery`]). No AMQP type appears
//! here: the consumer reads the [`Attempt`] from a delivery's headers and turns the
//! [`Outcome`] into confirmed publishes and an ack, and a test can run a job without a broker.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tracing::Instrument;

use crate::asset::Downloaded;
use crate::asset::{CatalogEntry, StoredObject, derived_key, object_key};
use crate::audio::measure::AnalysisOutcome;
use crate::config::Settings;
use crate::error::{Stage, StageError};
use crate::health::{Dependency, Health, names};
use crate::job::Job;
use crate::pipeline::catalog::{
    Catalog, CommitOutcome, FoundSave, Lease, RELEASE_GIVE_UP, RELEASE_RETRY, StaleLease,
};
use crate::pipeline::commit;
use crate::pipeline::download;
use crate::pipeline::store::Store;
use crate::pipeline::transfer::{self, Pending};
use crate::retry::{Attempt, Failure, RetryBudget, RetryPolicy, next_redelivery};

/// The clients a job needs, built once at start-up ([`crate::startup::build_deps`]) and shared
/// by every job.
#[derive(Debug, Clone)]
pub struct Deps {
    /// Downloads the audio and sends cleanups; its resolver and redirect policy enforce
    /// `AUDIO_URL_*` on every request.
    pub http: reqwest::Client,
    /// Where the audio bytes go (stage 2).
    pub store: Store,
    /// Where the asset's document goes (stage 3), and the tenant check before any download.
    pub catalog: Catalog,
    /// Retry policy, spool dir, limits and the retry schedule.
    pub settings: Arc<Settings>,
    /// Readiness: stages record here whether S3 and MongoDB answered, so `/readyz` follows the
    /// jobs as well as the probe.
    pub health: Arc<Health>,
    /// This replica's settled outcomes, counted for the operator console's overview and flushed
    /// to MongoDB with a heartbeat ([`crate::activity::report`]).
    pub activity: Arc<crate::activity::Activity>,
}

impl Deps {
    /// The in-process retry policy from the `RETRY_*` settings.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.settings.worker.retry_max_attempts,
            initial_delay: self.settings.worker.retry_initial_delay,
            max_elapsed: self.settings.worker.retry_max_elapsed,
        }
    }
}

/// A saved job: the object in S3 and the catalog's answer.
#[derive(Debug, Clone)]
pub struct Saved {
    /// The uploaded object with its presigned URL.
    pub object: StoredObject,
    /// The document's version and creation time.
    pub entry: CatalogEntry,
}

/// Announces a saved job (`audio.saved`, confirmed by the broker, plus the `reply_to` copy):
/// the consumer's publisher in production. The last stage, so that a save nobody heard of is
/// retried like any other failure.
pub trait Announcer {
    /// Publishes the completion event of `job`, saved as `saved`, and waits for the confirm.
    ///
    /// # Errors
    /// A [`StageError`] of stage `publish`: transient when the broker did not confirm.
    fn announce(&self, job: &Job, saved: &Saved) -> impl Future<Output = Result<(), StageError>> + Send;
}

/// What becomes of a delivery: the processor's verdict, which the consumer carries out.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per delivery, moved once into the consumer
pub enum Outcome {
    /// Stored, catalogued and announced: ack the delivery (then clean up the temporary audio).
    Saved(Saved),
    /// The asset holds a save newer than this job (by generation), which stays: publish
    /// `audio.failed` with `superseded_by_version`, then ack. Not dead-lettered: nothing is wrong
    /// with the job, it is just late.
    Superseded {
        /// The version of the newer save.
        version: i64,
        /// The reason (`superseded by version N …`) and the attempts, for the event.
        failure: Failure,
    },
    /// A transient failure with deliveries left: park a copy in delay queue
    /// `next_delivery - 1` for `delay` (the per-message TTL), then ack.
    RetryLater {
        /// The number the next delivery will have (see [`crate::retry::Redelivery`]).
        next_delivery: u32,
        /// How long the copy waits before the broker sends it back to the job queue.
        delay: Duration,
        /// Why, with the attempts so far (all deliveries together), for the copy's headers.
        failure: Failure,
    },
    /// A permanent failure, or the last delivery failed: dead-letter the job with its reason,
    /// publish `audio.failed`, then ack. `attempts` counts all deliveries together.
    DeadLetter(Failure),
}

impl Outcome {
    /// The value of the `outcome` label on the job metrics: `saved`, `superseded`, `retried` or
    /// `dead_lettered`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Saved(_) => "saved",
            Self::Superseded { .. } => "superseded",
            Self::RetryLater { .. } => "retried",
            Self::DeadLetter(_) => "dead_lettered",
        }
    }
}

/// Runs `job` through every stage and decides its outcome. `attempt` is which delivery this
/// is (from the consumer), `announcer` publishes the completion event.
///
/// The whole run is bounded by `JOB_DEADLINE_SECS`: past it the job stops where it stands (as if
/// its worker had died: the save lease expires and the next save repairs what was left) and
/// fails as a transient error naming the limit and the stage it was in, so it goes through the
/// delay queues like any outage and the delivery settles before the broker's
/// `consumer_timeout` would take it back.
///
/// A job the broker already delivered `AMQP_DELIVERY_LIMIT` times without it being settled is
/// not run again (its worker died each time: it would again): it is dead-lettered at once with
/// `stage: delivery`.
pub async fn handle(job: &Job, deps: &Deps, attempt: Attempt, announcer: &impl Announcer) -> Outcome {
    let limit = deps.settings.amqp.delivery_limit;
    if attempt.redeliveries >= limit {
        let reason = format!(
            "redelivered {} times without finishing (AMQP_DELIVERY_LIMIT={limit}): each delivery ended \
             without an outcome (its worker died, lost its channel, or could not park the job)",
            attempt.redeliveries
        );
        return refuse(StageError::permanent(Stage::Delivery, reason), attempt);
    }
    let deadline = deps.settings.worker.job_deadline;
    let stage = Arc::new(AtomicU8::new(0));
    let run = STAGE.scope(stage.clone(), run(job, deps, attempt, announcer));
    let result = match tokio::time::timeout(deadline, run).await {
        Ok(result) => result,
        Err(_) => {
            let stage = Stage::ALL[usize::from(stage.load(Ordering::Relaxed))];
            let reason = format!(
                "job deadline passed: JOB_DEADLINE_SECS={} s ran out during the {stage} stage",
                deadline.as_secs()
            );
            Err(Failure { error: StageError::transient(stage, reason), attempts: 1 })
        }
    };
    match result {
        Ok(outcome) => outcome,
        Err(failure) => decide(failure, attempt, &deps.settings.worker.retry_schedule),
    }
}

tokio::task_local! {
    /// The stage the job's task is in (an index into [`Stage::ALL`]), so a deadline can say
    /// where it struck.
    static STAGE: Arc<AtomicU8>;
}

/// Notes that the job's task entered `stage`.
fn at(stage: Stage) {
    let index = Stage::ALL.iter().position(|s| *s == stage).unwrap_or(0);
    let _ = STAGE.try_with(|s| s.store(u8::try_from(index).unwrap_or(0), Ordering::Relaxed));
}

/// The stages and the announcement, without the deadline.
async fn run(
    job: &Job,
    deps: &Deps,
    attempt: Attempt,
    announcer: &impl Announcer,
) -> Result<Outcome, Failure> {
    async {
        let saved = match process(job, deps).await? {
            Done::Saved(saved) => saved,
            Done::Superseded { version } => {
                let reason = format!(
                    "superseded by version {version}: the asset holds a save asked for after this job \
                     (generation {}), which stays",
                    job.provenance.generation.to_rfc3339()
                );
                let attempts = attempt.prior_attempts.saturating_add(1);
                let failure = Failure { error: StageError::permanent(Stage::Catalog, reason), attempts };
                return Ok(Outcome::Superseded { version, failure });
            }
        };
        let started = std::time::Instant::now();
        at(Stage::Publish);
        let announced = RetryBudget::new(deps.retry_policy()).run(|| announcer.announce(job, &saved)).await;
        metrics::histogram!(names::STAGE_DURATION, "stage" => "publish")
            .record(started.elapsed().as_secs_f64());
        announced.map(|()| Outcome::Saved(saved))
    }
    .await
}

/// The outcome of a delivery that cannot become a job (its JSON or a field is invalid): dead
/// letter at once, whatever the schedule, since the same bytes would fail again.
pub fn refuse(error: StageError, attempt: Attempt) -> Outcome {
    Outcome::DeadLetter(Failure { error, attempts: attempt.prior_attempts.saturating_add(1) })
}

/// A failure of this delivery, judged against the schedule: a delay queue or the dead-letter
/// queue, with the attempts of earlier deliveries added.
fn decide(failure: Failure, attempt: Attempt, schedule: &[Duration]) -> Outcome {
    let failure = Failure { attempts: attempt.prior_attempts.saturating_add(failure.attempts), ..failure };
    match next_redelivery(schedule, &failure.error, attempt) {
        Some(next) => Outcome::RetryLater { next_delivery: next.delivery, delay: next.delay, failure },
        None => Outcome::DeadLetter(failure),
    }
}

/// What the stages came to, before the announcement.
#[allow(clippy::large_enum_variant)] // one per job, moved once
enum Done {
    /// Stored and catalogued (or found already saved by this job).
    Saved(Saved),
    /// A newer save of the asset stays; this job's audio was not stored.
    Superseded {
        /// The newer save's version.
        version: i64,
    },
}

/// Runs the stages of one job: the document's size check, the download (overlapped with the
/// upload for large files), the asset's save lease (which checks the tenant and a newer save),
/// then the save under it (see [`save`]).
///
/// # Errors
/// [`Failure`] with the first stage that failed permanently or ran out of in-process retries.
async fn process(job: &Job, deps: &Deps) -> Result<Done, Failure> {
    let mut budget = RetryBudget::new(deps.retry_policy());
    let settings = &deps.settings;
    let (spool_dir, limits) = (&settings.worker.tmp_dir, download::Limits::of(&settings.audio_gen));
    at(Stage::Catalog);
    Catalog::check_fits(job).map_err(|error| Failure { error, attempts: 1 })?;
    let started = std::time::Instant::now();
    at(Stage::Download);
    // The first attempt uploads while it downloads (large files); a retry downloads only, and
    // the upload step sends the spool file.
    let mut first_attempt = true;
    let download = budget
        .run(|| {
            let overlap = std::mem::take(&mut first_attempt);
            async move {
                if overlap {
                    transfer::download_and_upload(&deps.http, &deps.store, job, spool_dir, limits).await
                } else {
                    let downloaded =
                        download::download(&deps.http, &job.source.url, spool_dir, limits, None).await?;
                    Ok((downloaded, None))
                }
            }
        })
        .await;
    metrics::histogram!(names::STAGE_DURATION, "stage" => "download").record(started.elapsed().as_secs_f64());
    let (mut downloaded, pending) = match download {
        Ok(done) => done,
        Err(failure) if failure.error.not_found => return gone(job, deps, failure).await,
        Err(failure) => return Err(failure),
    };
    // QUALITY_RULES: a take that breaks one is refused before anything is stored.
    let rules = &settings.audio_gen.quality_rules;
    if !rules.is_empty()
        && let Some(AnalysisOutcome::Done(analysis)) = downloaded.analysis.as_mut()
    {
        match rules.judge(analysis) {
            Ok(passed) => analysis.quality_rules_passed = Some(passed),
            Err(broken) => {
                if let Some(pending) = pending {
                    pending.abort(&deps.store).await;
                }
                return Err(Failure { error: StageError::permanent(Stage::Download, broken), attempts: 1 });
            }
        }
    }
    tracing::info!(size = downloaded.size, sha256 = %downloaded.sha256, "downloaded");
    metrics::counter!(names::DOWNLOADED_BYTES).increment(downloaded.size);
    let key = object_key(job, downloaded.format);
    let derived_keys: Vec<String> =
        downloaded.derived.iter().map(|file| derived_key(job, &file.key_suffix())).collect();
    at(Stage::Catalog);
    let lease = match budget.run(|| deps.catalog.acquire(job, &key, &derived_keys)).await {
        Ok(lease) => lease,
        Err(failure) => {
            if let Some(pending) = pending {
                pending.abort(&deps.store).await;
            }
            return Err(failure);
        }
    };
    tracing::debug!(previous = ?lease.previous, stale = ?lease.stale, "save lease taken");
    // The lease is renewed while the save runs; the renewal stops with it.
    let renewing = async {
        loop {
            tokio::time::sleep(deps.catalog.renew_every()).await;
            // Bounded by the renewal interval, so a slow MongoDB cannot hold the next renewal
            // back until the lease runs out.
            match tokio::time::timeout(deps.catalog.renew_every(), deps.catalog.renew(job, &lease)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e.reason, "renewing the save lease failed"),
                Err(_) => tracing::warn!("renewing the save lease timed out"),
            }
        }
    };
    tokio::select! {
        saved = save(job, deps, &mut budget, &lease, &downloaded, pending) => saved,
        never = renewing => never,
    }
}

/// The audio is gone (HTTP 404/410). A redelivery after the temporary file was cleaned up finds
/// the asset saved by this very job (same fingerprint) and reports that save (same version, same
/// event id). Any other save of the asset is another job's: this job's take is lost, which is a
/// permanent failure, never a report of somebody else's save.
async fn gone(job: &Job, deps: &Deps, failure: Failure) -> Result<Done, Failure> {
    let one = |error| Failure { error, attempts: 1 };
    match deps.catalog.find_saved(job).await.map_err(one)? {
        FoundSave::Mine(mut object, entry) => {
            let (url, url_expires_at) = deps.store.delivery_url(&object.key).await.map_err(one)?;
            for derived in object.derived_mut() {
                (derived.url, derived.url_expires_at) =
                    deps.store.delivery_url(&derived.key).await.map_err(one)?;
            }
            tracing::info!(
                version = entry.version,
                "audio gone but already saved by this job; reporting that save"
            );
            let delivery = deps.store.delivery();
            Ok(Done::Saved(Saved { object: StoredObject { url, url_expires_at, delivery, ..object }, entry }))
        }
        FoundSave::Other { version } => Err(Failure {
            error: StageError::permanent(
                Stage::Download,
                format!(
                    "{}; the audio is gone and the stored version {version} belongs to another job, so \
                     this job's take cannot be saved",
                    failure.error.reason
                ),
            ),
            ..failure
        }),
        FoundSave::None => Err(failure),
    }
}

/// Saves the downloaded take under `lease`: repairs a dead holder's leftovers, stops for a
/// newer save, keeps the same bytes as they are, otherwise backs the current bytes up (same
/// key), uploads, commits the document and tidies up; a failure after the upload restores the
/// previous bytes. The lease is given up on every path that leaves S3 as the document says;
/// when a restore fails it is kept, and expires into the next holder's repair.
async fn save(
    job: &Job,
    deps: &Deps,
    budget: &mut RetryBudget,
    lease: &Lease,
    downloaded: &Downloaded,
    pending: Option<Pending>,
) -> Result<Done, Failure> {
    let (store, catalog) = (&deps.store, &deps.catalog);
    let give_up = |pending: Option<Pending>| async move {
        if let Some(pending) = pending {
            pending.abort(store).await;
        }
        catalog.release(job, lease).await;
    };
    if let Some(stale) = &lease.stale
        && let Err(failure) = budget.run(|| commit::repair(store, stale, lease.previous.as_ref())).await
    {
        if let Some(pending) = pending {
            pending.abort(store).await;
        }
        catalog.put_back_stale(job, lease, stale).await;
        return Err(failure);
    }
    if let Some(previous) = lease.previous.as_ref().filter(|p| p.supersedes(job)) {
        give_up(pending).await;
        return Ok(Done::Superseded { version: previous.version });
    }
    let started = std::time::Instant::now();
    at(Stage::Upload);
    let planned: Vec<(String, String)> = lease
        .derived_keys
        .iter()
        .cloned()
        .zip(downloaded.derived.iter().map(|file| file.sha256.clone()))
        .collect();
    let same_bytes = lease
        .previous
        .as_ref()
        .is_some_and(|p| p.is_same_take(&downloaded.sha256, &lease.target_key, &planned));
    let backup = if same_bytes {
        Vec::new()
    } else {
        match budget.run(|| commit::backup(store, lease)).await {
            Ok(backup) => backup,
            Err(failure) => {
                // A copy whose answer was lost (S3 went down mid-request) may have landed: its
                // key is this lease's alone, so it is deleted in the background whatever
                // happened, once S3 answers.
                let maybe = commit::backups_of(lease);
                tokio::spawn(
                    commit::drop_backup_later(store.clone(), maybe, RELEASE_RETRY, RELEASE_GIVE_UP)
                        .in_current_span(),
                );
                give_up(pending).await;
                return Err(failure);
            }
        }
    };
    let uploaded = if same_bytes {
        if let Some(pending) = pending {
            pending.abort(store).await;
        }
        store
            .stored_again(&lease.target_key, downloaded)
            .await
            .map_err(|error| Failure { error, attempts: 1 })
    } else {
        let completed = match pending {
            Some(pending) => pending.complete(store, downloaded).await.inspect_err(|e| {
                tracing::warn!(error = %e.reason, "completing the overlapped upload failed; sending the spool file");
            }),
            None => Err(StageError::transient(Stage::Upload, "no overlapped upload")),
        };
        match completed {
            Ok(object) => Ok(object),
            Err(_) => budget.run(|| store.put(job, downloaded, &lease.target_key)).await,
        }
    };
    // The waveform and the renditions, beside it under the same lease: a failure is the
    // upload's, and puts every key back as the document says.
    let uploaded = match uploaded {
        Ok(object) => store_derived(job, store, budget, lease, downloaded, object, same_bytes).await,
        Err(failure) => Err(failure),
    };
    let object = match record(deps, Dependency::S3, Stage::Upload, started, uploaded) {
        Ok(object) => object,
        Err(failure) if same_bytes => {
            catalog.release(job, lease).await;
            return Err(failure);
        }
        Err(failure) => {
            // An upload that timed out may still have landed: put the key back as the document
            // says, as after a failed commit.
            restore_or_keep_lease(job, deps, budget, lease, &backup).await;
            return Err(failure);
        }
    };
    if !same_bytes {
        metrics::counter!(names::UPLOADED_BYTES).increment(object.size);
        tracing::info!(bucket = %object.bucket, key = %object.key, "uploaded");
    }
    let started = std::time::Instant::now();
    at(Stage::Catalog);
    let committed = budget.run(|| catalog.commit(job, lease, &object)).await;
    let committed = match record(deps, Dependency::MongoDb, Stage::Catalog, started, committed) {
        Ok(entry) => Ok(entry),
        // The error may have come after MongoDB applied the commit (its reply lost, a timeout):
        // undoing S3 then would leave the document naming bytes that are gone. Ask first.
        Err(failure) => match budget.run(|| catalog.commit_outcome(job, lease)).await {
            Ok(CommitOutcome::Committed(entry)) => {
                tracing::warn!(error = %failure.error.reason, "the commit landed although its reply was lost");
                Ok(entry)
            }
            Ok(CommitOutcome::Pending) if same_bytes => {
                catalog.release(job, lease).await;
                Err(failure)
            }
            Ok(CommitOutcome::Pending) => {
                restore_or_keep_lease(job, deps, budget, lease, &backup).await;
                Err(failure)
            }
            Ok(CommitOutcome::Lost) => {
                repair_lost(job, deps, lease).await;
                Err(failure)
            }
            Err(unknown) => {
                // Neither restoring (the commit may have landed) nor keeping the new bytes (it
                // may not have) is safe yet: ask again in the background until MongoDB answers.
                tracing::warn!(error = %unknown.error.reason, "whether the commit landed is unknown; asking again in the background");
                let (job, deps, lease) = (job.clone(), deps.clone(), lease.clone());
                tokio::spawn(settle_commit(job, deps, lease, backup.clone(), same_bytes).in_current_span());
                Err(failure)
            }
        },
    };
    match committed {
        Ok(entry) => {
            tidy(deps, lease, &backup).await;
            tracing::info!(version = entry.version, "catalogued");
            Ok(Done::Saved(Saved { object, entry }))
        }
        Err(failure) => Err(failure),
    }
}

/// Uploads the files made beside the take (waveform, renditions) under `lease`'s derived keys
/// and records them in `object`; with `same_bytes` they are already there and only get fresh
/// presigned URLs.
///
/// # Errors
/// The first upload that failed past its retries.
async fn store_derived(
    job: &Job,
    store: &Store,
    budget: &mut RetryBudget,
    lease: &Lease,
    downloaded: &Downloaded,
    mut object: StoredObject,
    same_bytes: bool,
) -> Result<StoredObject, Failure> {
    for (file, key) in downloaded.derived.iter().zip(&lease.derived_keys) {
        let stored = if same_bytes {
            store.derived_again(file, key).await.map_err(|error| Failure { error, attempts: 1 })?
        } else {
            budget.run(|| store.put_derived(job, file, key)).await?
        };
        object.attach(&file.what, stored);
    }
    Ok(object)
}

/// Settles a commit whose outcome MongoDB could not tell (it was out of reach), asking every
/// [`RELEASE_RETRY`] for up to [`RELEASE_GIVE_UP`]: committed, the backup is dropped; still
/// pending, the lease is renewed (so no other holder can be writing) and the previous bytes put
/// back as after any failed commit; taken over, nothing is touched (the new holder repairs).
/// Given up, the lease expires into the next holder's repair, which is right either way: a
/// lease left in the document means the commit did not land.
async fn settle_commit(job: Job, deps: Deps, lease: Lease, backup: Vec<String>, same_bytes: bool) {
    let give_up = tokio::time::Instant::now() + RELEASE_GIVE_UP;
    while tokio::time::Instant::now() < give_up {
        tokio::time::sleep(RELEASE_RETRY).await;
        match deps.catalog.commit_outcome(&job, &lease).await {
            Ok(CommitOutcome::Committed(entry)) => {
                tracing::info!(version = entry.version, "the commit had landed after all");
                tidy(&deps, &lease, &backup).await;
                return;
            }
            Ok(CommitOutcome::Pending) if same_bytes => {
                deps.catalog.release(&job, &lease).await;
                return;
            }
            Ok(CommitOutcome::Pending) => {
                if deps.catalog.renew(&job, &lease).await.is_ok() {
                    let mut budget = RetryBudget::new(deps.retry_policy());
                    restore_or_keep_lease(&job, &deps, &mut budget, &lease, &backup).await;
                    tracing::info!("the commit had not landed; the previous bytes are back");
                    return;
                }
            }
            Ok(CommitOutcome::Lost) => {
                repair_lost(&job, &deps, &lease).await;
                return;
            }
            Err(_) => {}
        }
    }
    tracing::warn!(
        "MongoDB never told whether the commit landed; the save lease expires into the next save's repair"
    );
}

/// The lease vanished without this holder's commit: another holder took it over after it
/// expired (and repairs with this holder's backup, found by its token), or MongoDB lost the
/// lease's write. Takes the lease again and repairs as a next holder would (the backup copied
/// back, or an uncommitted object deleted; nothing when the backup is gone and the document
/// names the key); when another holder has it, that holder is doing exactly this.
async fn repair_lost(job: &Job, deps: &Deps, lease: &Lease) {
    let Ok(again) = deps.catalog.acquire(job, &lease.target_key, &lease.derived_keys).await else { return };
    let mine: StaleLease = lease.as_stale();
    for stale in std::iter::once(&mine).chain(again.stale.as_ref()) {
        if let Err(e) = commit::repair(&deps.store, stale, again.previous.as_ref()).await {
            tracing::warn!(error = %e.reason, "repairing after a lost save lease failed");
            deps.catalog.put_back_stale(job, &again, stale).await;
            return;
        }
    }
    deps.catalog.release(job, &again).await;
}

/// After a failed upload or commit: the key put back as the document says (see
/// [`commit::restore`]) and the lease given up; when the restore itself fails (S3 down) the
/// lease is ended at once with its record kept, so the next save of the asset repairs it first.
async fn restore_or_keep_lease(
    job: &Job,
    deps: &Deps,
    budget: &mut RetryBudget,
    lease: &Lease,
    backup: &[String],
) {
    match budget.run(|| commit::restore(&deps.store, lease, backup)).await {
        Ok(()) => deps.catalog.release(job, lease).await,
        Err(e) => {
            // A next save of the asset may never come (a newer take already won, the job is
            // dead-lettered): keep the lease and put the bytes back in the background once S3
            // answers, so no backup or uncommitted object is left behind.
            tracing::error!(error = %e.error.reason, "restoring the previous bytes failed; trying again in the background");
            let (job, deps, lease) = (job.clone(), deps.clone(), lease.clone());
            let backup = backup.to_vec();
            tokio::spawn(restore_later(job, deps, lease, backup).in_current_span());
        }
    }
}

/// [`restore_or_keep_lease`]'s background half: every [`RELEASE_RETRY`], the lease renewed (so
/// no other holder can be writing the key), then the restore tried again; done, the lease is
/// given up. When the lease cannot be renewed (MongoDB down too) or S3 stays down past
/// [`RELEASE_GIVE_UP`], the lease is ended with its record kept, so the next save of the asset
/// repairs first.
async fn restore_later(job: Job, deps: Deps, lease: Lease, backup: Vec<String>) {
    let give_up = tokio::time::Instant::now() + RELEASE_GIVE_UP;
    while tokio::time::Instant::now() < give_up {
        tokio::time::sleep(RELEASE_RETRY).await;
        if deps.catalog.renew(&job, &lease).await.is_err() {
            break;
        }
        if commit::restore(&deps.store, &lease, &backup).await.is_ok() {
            tracing::info!("the previous bytes are back");
            deps.catalog.release(&job, &lease).await;
            return;
        }
    }
    tracing::warn!("restoring the previous bytes keeps failing; the next save of the asset repairs them");
    deps.catalog.expire(&job, &lease).await;
}

/// [`commit::tidy`], with a backup it could not delete dropped in the background.
async fn tidy(deps: &Deps, lease: &Lease, backup: &[String]) {
    let left = commit::tidy(&deps.store, lease, backup).await;
    if !left.is_empty() {
        let store = deps.store.clone();
        tokio::spawn(
            commit::drop_backup_later(store, left, RELEASE_RETRY, RELEASE_GIVE_UP).in_current_span(),
        );
    }
}

/// Records a stage's duration and whether its store answered (readiness): a transient failure
/// after the retries means it did not; a permanent one (a refused key, a tenant conflict) means
/// it did.
fn record<T>(
    deps: &Deps,
    dependency: Dependency,
    stage: Stage,
    started: std::time::Instant,
    result: Result<T, Failure>,
) -> Result<T, Failure> {
    metrics::histogram!(names::STAGE_DURATION, "stage" => stage.as_str())
        .record(started.elapsed().as_secs_f64());
    match &result {
        Err(failure) if failure.error.is_transient() => {
            deps.health.failed(dependency, failure.error.reason.clone())
        }
        _ => deps.health.ok(dependency),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEDULE: [Duration; 2] = [Duration::from_secs(5), Duration::from_secs(30)];

    fn failure(error: StageError, attempts: u32) -> Failure {
        Failure { error, attempts }
    }

    #[test]
    fn a_transient_failure_with_deliveries_left_waits_in_the_next_delay_queue() {
        let outcome = decide(
            failure(StageError::transient(Stage::Upload, "HTTP 503"), 5),
            Attempt { delivery: 2, prior_attempts: 5, redeliveries: 0 },
            &SCHEDULE,
        );
        let Outcome::RetryLater { next_delivery, delay, failure } = outcome else { panic!("{outcome:?}") };
        assert_eq!(next_delivery, 3);
        assert!((24_000..=36_000).contains(&delay.as_millis()), "{delay:?}");
        assert_eq!(failure.attempts, 10, "this delivery's 5 on top of the earlier 5");
        assert_eq!(failure.error.reason, "HTTP 503");
    }

    #[test]
    fn the_last_delivery_and_permanent_errors_dead_letter() {
        let last = decide(
            failure(StageError::transient(Stage::Catalog, "no server"), 5),
            Attempt { delivery: 3, prior_attempts: 10, redeliveries: 0 },
            &SCHEDULE,
        );
        let Outcome::DeadLetter(f) = last else { panic!("{last:?}") };
        assert_eq!((f.attempts, f.error.stage), (15, Stage::Catalog));
        let permanent =
            decide(failure(StageError::permanent(Stage::Download, "HTTP 404"), 1), Attempt::FIRST, &SCHEDULE);
        let Outcome::DeadLetter(f) = permanent else { panic!("{permanent:?}") };
        assert_eq!((f.attempts, f.error.reason.as_str()), (1, "HTTP 404"));
        let refused = refuse(
            StageError::permanent(Stage::Parse, "invalid job JSON"),
            Attempt { delivery: 2, prior_attempts: 3, redeliveries: 0 },
        );
        let Outcome::DeadLetter(f) = refused else { panic!("{refused:?}") };
        assert_eq!((f.attempts, f.error.stage), (4, Stage::Parse));
        assert_eq!(
            [
                Outcome::DeadLetter(f.clone()).metric_label(),
                Outcome::RetryLater { next_delivery: 2, delay: Duration::ZERO, failure: f }.metric_label()
            ],
            ["dead_lettered", "retried"]
        );
    }
}
