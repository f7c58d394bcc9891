//! This replica's activity for the operator console: the outcomes it settled, counted in
//! memory on the job's path (an atomic add, no I/O) and flushed to MongoDB with a heartbeat every
//! [`FLUSH_INTERVAL`] by [`report`] (see [`crate::pipeline::catalog::ActivityLog`]). The console
//! sums the last hour's buckets and lists the replicas seen.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::pipeline::catalog::{ActivityLog, OutcomeCounts, Replica};

/// How often a replica writes its heartbeat and the outcomes counted since the last flush. The
/// console calls a replica gone after [`GONE_AFTER`] without one.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(15);

/// A replica whose last heartbeat is older than this is shown as gone (four missed flushes).
pub const GONE_AFTER: Duration = Duration::from_secs(60);

/// Outcomes settled by this process and not yet flushed.
#[derive(Debug, Default)]
pub struct Activity {
    /// Deliveries saved.
    saved: AtomicU64,
    /// Deliveries parked in a delay queue.
    retried: AtomicU64,
    /// Deliveries dead-lettered.
    dead_lettered: AtomicU64,
    /// Deliveries that ended superseded.
    superseded: AtomicU64,
    /// This replica's id and start time (the heartbeat's identity).
    identity: Identity,
}

/// Who this replica is, fixed at start-up.
#[derive(Debug, Clone)]
struct Identity {
    /// `{host}/{pid}`.
    id: String,
    /// When the process built its dependencies.
    started_at: DateTime<Utc>,
}

impl Default for Identity {
    fn default() -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.trim().is_empty())
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map_or_else(|| "unknown-host".to_owned(), |h| h.trim().to_owned());
        Self { id: format!("{host}/{}", std::process::id()), started_at: Utc::now() }
    }
}

impl Activity {
    /// Counts one settled delivery by its outcome label (`saved`, `retried`, `dead_lettered`,
    /// `superseded`: [`crate::processor::Outcome::metric_label`]); other labels are ignored.
    pub fn record(&self, outcome: &str) {
        let counter = match outcome {
            "saved" => &self.saved,
            "retried" => &self.retried,
            "dead_lettered" => &self.dead_lettered,
            "superseded" => &self.superseded,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts since the last take, resetting them.
    fn take(&self) -> OutcomeCounts {
        OutcomeCounts {
            saved: self.saved.swap(0, Ordering::Relaxed),
            retried: self.retried.swap(0, Ordering::Relaxed),
            dead_lettered: self.dead_lettered.swap(0, Ordering::Relaxed),
            superseded: self.superseded.swap(0, Ordering::Relaxed),
        }
    }

    /// Puts counts back after a flush that failed, so the next flush carries them.
    fn give_back(&self, counts: OutcomeCounts) {
        self.saved.fetch_add(counts.saved, Ordering::Relaxed);
        self.retried.fetch_add(counts.retried, Ordering::Relaxed);
        self.dead_lettered.fetch_add(counts.dead_lettered, Ordering::Relaxed);
        self.superseded.fetch_add(counts.superseded, Ordering::Relaxed);
    }

    /// This replica's id, `{host}/{pid}` (`HOSTNAME` is the pod name in Kubernetes).
    pub fn replica_id(&self) -> &str {
        &self.identity.id
    }

    /// Writes the heartbeat and the outcomes counted since the last flush. On failure the
    /// counts are kept for the next flush; the error is returned for the log.
    ///
    /// # Errors
    /// MongoDB refused or did not answer.
    pub async fn flush(&self, log: &ActivityLog, consuming: bool) -> Result<(), crate::error::StageError> {
        let now = Utc::now();
        let replica = Replica {
            id: self.identity.id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: self.identity.started_at,
            last_seen: now,
            consuming,
        };
        let counts = self.take();
        log.record(&replica, counts, now).await.inspect_err(|_| self.give_back(counts))
    }
}

/// Flushes `activity` every [`FLUSH_INTERVAL`] until `shutdown`, then once more (the last
/// outcomes of a graceful stop are counted too). Failures are logged and retried next time:
/// the console's figures may lag, the jobs never wait for them.
pub async fn report(
    activity: Arc<Activity>,
    log: ActivityLog,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            () = shutdown.cancelled() => true,
        };
        if let Err(e) = activity.flush(&log, health.is_consuming() && !stopping).await {
            tracing::warn!(error = %e, "recording this replica's activity for the console failed; kept for the next flush");
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_counted_by_label_and_taken_once() {
        let activity = Activity::default();
        for label in ["saved", "saved", "retried", "dead_lettered", "superseded", "unknown"] {
            activity.record(label);
        }
        let taken = activity.take();
        assert_eq!(taken, OutcomeCounts { saved: 2, retried: 1, dead_lettered: 1, superseded: 1 });
        assert!(activity.take().is_empty());
        activity.give_back(taken);
        assert_eq!(activity.take(), taken);
        assert!(activity.replica_id().ends_with(&format!("/{}", std::process::id())));
    }
}
