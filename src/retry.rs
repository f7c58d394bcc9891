//! The retry policy, in two layers, and the budget that enforces it:
//!
//! 1. **In process, for blips**: a [`RetryBudget`] runs one stage up to `RETRY_MAX_ATTEMPTS`
//!    times with exponential backoff and jitter ([`RetryPolicy`]).
//! 2. **Across deliveries, for outages**: a delivery whose stage still fails transiently waits in
//!    a delay queue and comes back as the next delivery, as `RETRY_SCHEDULE` says
//!    ([`next_redelivery`]); after the last entry, or at once for a permanent error, the job is
//!    dead-lettered.
//!
//! Nothing here knows about AMQP: the consumer reads an [`Attempt`] from a delivery's headers
//! and the processor turns a [`Failure`] into an outcome with these rules.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use crate::error::StageError;

/// Bounded exponential backoff with jitter, from the `RETRY_*` settings.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts of one stage, the first included (`RETRY_MAX_ATTEMPTS`).
    pub max_attempts: u32,
    /// Delay before the second attempt (`RETRY_INITIAL_DELAY_MS`); it doubles each time (capped
    /// at 30 s), with jitter.
    pub initial_delay: Duration,
    /// The most one stage spends sleeping between its retries (`RETRY_MAX_ELAPSED_SECS`).
    pub max_elapsed: Duration,
}

/// A job that failed for good in this delivery: the last error and how many attempts it took.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error} after {attempts} attempt(s)")]
pub struct Failure {
    /// The last error; its class decides between a delay queue and the dead-letter queue.
    pub error: StageError,
    /// Attempts made at the failing stage. Inside one delivery, this delivery's; once the
    /// processor returns it, all deliveries together (what dead letters and `audio.failed`
    /// report).
    pub attempts: u32,
}

/// Which delivery of a job this is and what earlier deliveries spent: read by the consumer from
/// the worker's own headers (`audio-worker-delivery`, `audio-worker-attempts`), absent on a
/// job's first delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// 1 for the first delivery; n + 1 after n waits in delay queues. Picks the next delay.
    pub delivery: u32,
    /// Stage attempts made by earlier deliveries, so the last failure reports the total.
    pub prior_attempts: u32,
    /// How often the broker delivered this very message before without it being settled (the
    /// quorum queue's `x-delivery-count`: its worker died or lost its channel, or the delivery
    /// was returned because its outcome could not be carried out). Checked against
    /// `AMQP_DELIVERY_LIMIT`.
    pub redeliveries: u32,
}

impl Attempt {
    /// A job's first delivery.
    pub const FIRST: Self = Self { delivery: 1, prior_attempts: 0, redeliveries: 0 };
}

/// Where a transiently failed delivery goes next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Redelivery {
    /// The number the next delivery will have (2 after the first); the copy waits in delay
    /// queue `delivery - 1`.
    pub delivery: u32,
    /// How long it waits there: the schedule's entry with ±20 % jitter, so jobs that failed
    /// together (an outage) do not all come back in the same second.
    pub delay: Duration,
}

/// The redelivery for `error` on `attempt` under `schedule` (`RETRY_SCHEDULE`), or `None` when
/// the job must be dead-lettered: the error is permanent, or this was the last delivery the
/// schedule allows (`schedule.len() + 1` deliveries in all).
pub fn next_redelivery(schedule: &[Duration], error: &StageError, attempt: Attempt) -> Option<Redelivery> {
    if !error.is_transient() {
        return None;
    }
    let index = usize::try_from(attempt.delivery.max(1) - 1).ok()?;
    let delay = schedule.get(index)?;
    let jitter = 0.8 + 0.4 * fastrand::f64();
    let delay = Duration::from_millis(((delay.as_millis() as f64) * jitter).max(1.0) as u64);
    Some(Redelivery { delivery: attempt.delivery.max(1) + 1, delay })
}

/// One job's retry allowance: attempts and sleeping time, both **per stage**. Each [`run`]
/// starts its own allowance, so a stage that took long (a 120 s download) leaves the next
/// stages (upload, catalog) all their retries; what bounds the delivery as a whole is
/// `JOB_DEADLINE_SECS` (see [`crate::processor::handle`]).
///
/// [`run`]: RetryBudget::run
#[derive(Debug)]
pub struct RetryBudget {
    policy: RetryPolicy,
}

impl RetryBudget {
    /// A fresh budget.
    pub fn new(policy: RetryPolicy) -> Self {
        Self { policy }
    }

    /// Runs `op` (one stage) until it succeeds, fails permanently, uses its attempts, or its
    /// sleeping allowance (`max_elapsed`, from now) is spent.
    ///
    /// # Errors
    /// The last error with the attempt count.
    pub async fn run<T, F, Fut>(&mut self, mut op: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StageError>>,
    {
        let attempts = AtomicU32::new(0);
        let remaining = self.policy.max_elapsed;
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
    use tokio::time::Instant;

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

    #[tokio::test(start_paused = true)]
    async fn a_slow_stage_leaves_the_next_stage_its_retries() {
        let policy = RetryPolicy {
            max_attempts: 3,
            initial_delay: Duration::from_secs(1),
            max_elapsed: Duration::from_secs(60),
        };
        let mut budget = RetryBudget::new(policy);
        // A download that took 120 s (twice the sleeping allowance) and then succeeded.
        budget
            .run(|| async {
                tokio::time::sleep(Duration::from_secs(120)).await;
                Ok::<_, StageError>(())
            })
            .await
            .unwrap();
        let calls = AtomicU32::new(0);
        let failure = budget
            .run(|| async {
                calls.fetch_add(1, Ordering::Relaxed);
                Err::<(), _>(StageError::transient(Stage::Upload, "HTTP 503"))
            })
            .await
            .unwrap_err();
        assert_eq!(failure.attempts, 3, "the upload got all its attempts after a slow download");
        assert_eq!(calls.load(Ordering::Relaxed), 3);
    }
}

#[cfg(test)]
mod redelivery_tests {
    use super::*;
    use crate::error::Stage;

    const SCHEDULE: [Duration; 2] = [Duration::from_secs(5), Duration::from_secs(30)];

    #[test]
    fn transient_failures_follow_the_schedule_with_jitter() {
        let error = StageError::transient(Stage::Upload, "HTTP 503");
        let first = next_redelivery(&SCHEDULE, &error, Attempt::FIRST).unwrap();
        assert_eq!(first.delivery, 2);
        assert!((4_000..=6_000).contains(&first.delay.as_millis()), "{:?}", first.delay);
        let second =
            next_redelivery(&SCHEDULE, &error, Attempt { delivery: 2, prior_attempts: 5, redeliveries: 0 })
                .unwrap();
        assert_eq!(second.delivery, 3);
        assert!((24_000..=36_000).contains(&second.delay.as_millis()), "{:?}", second.delay);
        assert_eq!(
            next_redelivery(&SCHEDULE, &error, Attempt { delivery: 3, prior_attempts: 10, redeliveries: 0 }),
            None
        );
        assert_eq!(next_redelivery(&[], &error, Attempt::FIRST), None, "RETRY_SCHEDULE=none");
    }

    #[test]
    fn permanent_failures_are_never_redelivered() {
        let error = StageError::permanent(Stage::Download, "HTTP 404");
        assert_eq!(next_redelivery(&SCHEDULE, &error, Attempt::FIRST), None);
    }

    #[test]
    fn a_missing_or_zero_delivery_header_counts_as_the_first() {
        let error = StageError::transient(Stage::Download, "timeout");
        let zero =
            next_redelivery(&SCHEDULE, &error, Attempt { delivery: 0, prior_attempts: 0, redeliveries: 0 })
                .unwrap();
        assert_eq!(zero.delivery, 2);
    }
}
