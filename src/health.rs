//! What operators and Kubernetes see of a running worker: Prometheus metrics, liveness and
//! readiness, on one listener (`METRICS_ADDR`, default `0.0.0.0:9090`).
//!
//! - `GET /metrics`: Prometheus text format; the names are in [`names`].
//! - `GET /healthz`: 200 while the process serves HTTP (liveness: a hung runtime fails it).
//! - `GET /readyz`: 200 when the worker is consuming and RabbitMQ, S3 and MongoDB each answered
//!   within [`READY_WINDOW`]; otherwise 503 with a JSON body naming each failing part.
//!
//! S3 and MongoDB are marked as answering by every successful job stage and by a probe that runs
//! every [`PROBE_INTERVAL`] (so an idle worker stays ready, and a dead store makes it unready
//! before a job finds out); RabbitMQ by the consumer holding an open, consuming channel, for as
//! long as it does (no window: an idle queue is not a broker that stopped answering).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::Utc;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::pipeline::catalog::Catalog;
use crate::pipeline::store::Store;

/// A dependency that has not answered for this long makes the worker unready.
pub const READY_WINDOW: Duration = Duration::from_secs(30);

/// How often S3 and MongoDB are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// Metric names, Prometheus style: `_total` for counters, base units (seconds, bytes).
pub mod names {
    /// Counter, label `outcome`: `saved`, `superseded` (a newer save stays), `retried` (parked in
    /// a delay queue) or `dead_lettered`.
    pub const JOBS: &str = "audio_worker_jobs_total";
    /// Histogram (seconds) of a delivery from receipt to ack, label `outcome`.
    pub const JOB_DURATION: &str = "audio_worker_job_duration_seconds";
    /// Histogram (seconds) of one stage, retries included, label `stage`: `download`, `upload`,
    /// `catalog`, `publish`.
    pub const STAGE_DURATION: &str = "audio_worker_stage_duration_seconds";
    /// Counter (bytes) of audio downloaded.
    pub const DOWNLOADED_BYTES: &str = "audio_worker_downloaded_bytes_total";
    /// Counter (bytes) of audio uploaded to S3.
    pub const UPLOADED_BYTES: &str = "audio_worker_uploaded_bytes_total";
    /// Gauge: deliveries being processed now.
    pub const IN_FLIGHT: &str = "audio_worker_jobs_in_flight";
    /// Counter, label `queue`: confirmed copies parked in a delay queue.
    pub const DELAY_QUEUE_PUBLISHES: &str = "audio_worker_delay_queue_publishes_total";
    /// Counter: confirmed copies sent to the dead-letter exchange.
    pub const DEAD_LETTER_PUBLISHES: &str = "audio_worker_dead_letter_publishes_total";
    /// Counter: AMQP sessions re-opened after the connection or a channel failed.
    pub const RECONNECTS: &str = "audio_worker_amqp_reconnects_total";
    /// Counter: deliveries returned to the job queue on their own (`basic.reject` with requeue)
    /// because neither their delay-queue copy nor their dead letter was confirmed.
    pub const RETURNED_DELIVERIES: &str = "audio_worker_returned_deliveries_total";
    /// Gauge: 1 when `/readyz` would answer 200.
    pub const READY: &str = "audio_worker_ready";
}

/// Installs the global Prometheus recorder (once per process: later calls return the same
/// handle, so several workers built in one test process share it) and describes every metric.
/// Without it the metric macros are no-ops.
///
/// # Errors
/// Another recorder was installed by someone else.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut installed = INSTALLED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    // Buckets from 5 ms (a small file on a LAN) to 10 min (500 MiB over a slow link).
    let buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0];
    let handle = PrometheusBuilder::new().set_buckets(&buckets)?.install_recorder()?;
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(names::JOBS, "Jobs finished, by outcome (saved, superseded, retried, dead_lettered)");
    describe_histogram!(names::JOB_DURATION, Unit::Seconds, "Time from delivery to ack, by outcome");
    describe_histogram!(names::STAGE_DURATION, Unit::Seconds, "Time in a pipeline stage, retries included");
    describe_counter!(names::DOWNLOADED_BYTES, Unit::Bytes, "Audio bytes downloaded");
    describe_counter!(names::UPLOADED_BYTES, Unit::Bytes, "Audio bytes uploaded to S3");
    describe_gauge!(names::IN_FLIGHT, "Deliveries being processed");
    describe_counter!(names::DELAY_QUEUE_PUBLISHES, "Jobs parked in a delay queue (confirmed)");
    describe_counter!(names::DEAD_LETTER_PUBLISHES, "Jobs dead-lettered (confirmed)");
    describe_counter!(names::RECONNECTS, "AMQP sessions reopened after a failure");
    describe_counter!(
        names::RETURNED_DELIVERIES,
        "Deliveries returned to the queue because their copy was not confirmed"
    );
    describe_gauge!(names::READY, "1 when the worker is ready (see /readyz)");
    *installed = Some(handle.clone());
    Ok(handle)
}

/// A dependency whose answers decide readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// The broker: an open channel consuming the job queue.
    RabbitMq,
    /// The object store: answered when a stage or the probe reached it.
    S3,
    /// The catalog: answered when a stage or the probe reached it.
    MongoDb,
}

impl Dependency {
    const ALL: [Self; 3] = [Self::RabbitMq, Self::S3, Self::MongoDb];

    /// `rabbitmq`, `s3` or `mongodb`: the name `/readyz` reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RabbitMq => "rabbitmq",
            Self::S3 => "s3",
            Self::MongoDb => "mongodb",
        }
    }
}

/// When a dependency last answered, and its last error.
#[derive(Debug, Default)]
struct Answered {
    /// Unix milliseconds of the last success; 0 = never.
    last_ok_ms: AtomicI64,
    /// The last failure, cleared by a success.
    last_error: Mutex<Option<String>>,
}

/// Shared readiness state: written by the consumer, the pipeline and the probe; read by
/// `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    /// True while a channel consumes the job queue: RabbitMQ's part of readiness.
    consuming: AtomicBool,
    /// S3's and MongoDB's last answers (and RabbitMQ's last error), indexed by [`Dependency`].
    answered: [Answered; 3],
}

impl Health {
    /// A fresh state: not consuming, nothing answered yet.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn slot(&self, dependency: Dependency) -> &Answered {
        &self.answered[dependency as usize]
    }

    /// Records that `dependency` answered just now.
    pub fn ok(&self, dependency: Dependency) {
        let slot = self.slot(dependency);
        slot.last_ok_ms.store(Utc::now().timestamp_millis(), Ordering::Relaxed);
        if let Ok(mut error) = slot.last_error.lock() {
            error.take();
        }
    }

    /// Records a failed call to `dependency`.
    pub fn failed(&self, dependency: Dependency, error: impl Into<String>) {
        if let Ok(mut slot) = self.slot(dependency).last_error.lock() {
            *slot = Some(error.into());
        }
    }

    /// Sets whether a channel consumes the job queue; consuming counts as RabbitMQ answering.
    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Relaxed);
        if consuming {
            self.ok(Dependency::RabbitMq);
        }
    }

    /// Whether a channel consumes the job queue right now.
    pub fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    /// `Ok` when ready; otherwise one line per failing part, e.g. `s3: no answer for 45 s (…)`.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let now = Utc::now().timestamp_millis();
        let consuming = self.consuming.load(Ordering::Relaxed);
        let mut failing = Vec::new();
        for dependency in Dependency::ALL {
            let slot = self.slot(dependency);
            let error = slot.last_error.lock().ok().and_then(|e| e.clone());
            let last = slot.last_ok_ms.load(Ordering::Relaxed);
            let age = Duration::from_millis(u64::try_from(now - last).unwrap_or_default());
            let fresh = last > 0 && age <= READY_WINDOW;
            let because = error.map(|e| format!(" ({e})")).unwrap_or_default();
            if dependency == Dependency::RabbitMq {
                // An open channel consuming the queue is the broker answering (heartbeats keep
                // it honest; a dead connection ends the consumer), however long since a job.
                if !consuming {
                    failing.push(format!("rabbitmq: not consuming the job queue{because}"));
                }
            } else if !fresh && last == 0 {
                failing.push(format!("{}: no answer yet{because}", dependency.as_str()));
            } else if !fresh {
                failing.push(format!("{}: no answer for {} s{because}", dependency.as_str(), age.as_secs()));
            }
        }
        if failing.is_empty() { Ok(()) } else { Err(failing) }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// The listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State((metrics, health)): State<(PrometheusHandle, Arc<Health>)>| async move {
                metrics::gauge!(names::READY).set(if health.readiness().is_ok() { 1.0 } else { 0.0 });
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.render())
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State((_, health)): State<(PrometheusHandle, Arc<Health>)>| async move {
                let (status, body) = match health.readiness() {
                    Ok(()) => (StatusCode::OK, serde_json::json!({ "ready": true })),
                    Err(failing) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        serde_json::json!({ "ready": false, "failing": failing }),
                    ),
                };
                (status, [(header::CONTENT_TYPE, "application/json")], format!("{body}\n")).into_response()
            }),
        )
        .with_state((metrics, health));
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

/// Probes S3 (`HeadBucket`, which creates nothing) and MongoDB (`ping`) every
/// [`PROBE_INTERVAL`] until `shutdown`, recording the answers in `health`, so readiness follows
/// the stores even when no job runs.
pub async fn probe_dependencies(
    store: Store,
    catalog: Catalog,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let timeout = Duration::from_secs(5);
        let (s3, mongo) = tokio::join!(
            tokio::time::timeout(timeout, store.head_bucket()),
            tokio::time::timeout(timeout, catalog.ping()),
        );
        for (dependency, result) in [(Dependency::S3, s3), (Dependency::MongoDb, mongo)] {
            match result {
                Ok(Ok(())) => health.ok(dependency),
                Ok(Err(e)) => health.failed(dependency, e.reason),
                Err(_) => health.failed(dependency, format!("no answer within {} s", timeout.as_secs())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_each_failing_part() {
        let health = Health::new();
        let failing = health.readiness().unwrap_err();
        assert_eq!(failing.len(), 3, "{failing:?}");
        assert!(failing[0].starts_with("rabbitmq: not consuming"), "{failing:?}");
        health.set_consuming(true);
        health.ok(Dependency::S3);
        health.failed(Dependency::MongoDb, "connection refused");
        assert_eq!(health.readiness().unwrap_err(), ["mongodb: no answer yet (connection refused)"]);
        health.ok(Dependency::MongoDb);
        assert_eq!(health.readiness(), Ok(()));
        health
            .slot(Dependency::S3)
            .last_ok_ms
            .store(Utc::now().timestamp_millis() - 45_000, Ordering::Relaxed);
        assert_eq!(health.readiness().unwrap_err(), ["s3: no answer for 45 s"]);
        // Consuming for longer than the window, with no job since: still ready as far as the
        // broker goes.
        health.slot(Dependency::S3).last_ok_ms.store(Utc::now().timestamp_millis(), Ordering::Relaxed);
        health
            .slot(Dependency::RabbitMq)
            .last_ok_ms
            .store(Utc::now().timestamp_millis() - 600_000, Ordering::Relaxed);
        assert_eq!(health.readiness(), Ok(()));
        health.set_consuming(false);
        assert_eq!(health.readiness().unwrap_err(), ["rabbitmq: not consuming the job queue"]);
    }
}
