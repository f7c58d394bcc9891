//! What the handlers of one session share (the confirming publisher, the task tracker, the
//! connection), and the steps every handler ends with: copying a message to another queue
//! until the broker confirms it, giving a delivery back, acking. The consumer and the batch
//! handlers both use these; neither imports the other's internals.

use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use tokio_util::task::TaskTracker;

use super::publisher::{Publisher, Routing};
use super::topology;
use crate::error::{Stage, StageError};
use crate::health::names;
use crate::processor::Deps;
use crate::retry::{RetryBudget, RetryPolicy};

/// What a job's task shares with its session.
#[derive(Clone)]
pub struct SessionHandle {
    /// Confirm-mode channels for events, delay-queue copies and dead letters, one publish in
    /// flight on each.
    pub(super) publisher: Publisher,
    /// Tracks jobs and their cleanups, so shutdown can wait for them.
    pub(super) tracker: TaskTracker,
    /// The session's connection: a copy that cannot be confirmed declares the topology again on
    /// it (someone may have deleted an exchange or a queue).
    pub(super) connection: Arc<lapin::Connection>,
}

/// Publishes a copy of the job (to a delay queue or the dead-letter exchange), retrying with
/// backoff for up to [`COPY_PATIENCE`] until the broker confirms it, then once more after
/// declaring the topology again. True when it went through; otherwise the delivery alone is
/// returned to the queue ([`give_back`]) and false.
pub(super) async fn copy_job(
    deps: &Deps,
    session: &SessionHandle,
    delivery: &Delivery,
    exchange: &str,
    routing_key: &str,
    properties: BasicProperties,
) -> bool {
    let policy = RetryPolicy { max_attempts: 8, max_elapsed: COPY_PATIENCE, ..deps.retry_policy() };
    let publish = || async {
        session
            .publisher
            .publish(exchange, routing_key, &delivery.data, properties.clone(), Routing::Mandatory)
            .await
            .map_err(|e| {
                StageError::transient(Stage::Publish, format!("copy to {exchange:?}/{routing_key}: {e}"))
            })
    };
    let failure = match tokio::time::timeout(COPY_PATIENCE, RetryBudget::new(policy).run(publish)).await {
        Ok(Ok(())) => return true,
        Ok(Err(failure)) => failure.to_string(),
        Err(_) => {
            format!("copy to {exchange:?}/{routing_key} not confirmed within {} s", COPY_PATIENCE.as_secs())
        }
    };
    // An exchange or queue deleted by hand is put back (declaring is idempotent), and the copy
    // tried once more before the delivery is given back.
    let names = &deps.settings.amqp;
    let declare = topology::declare(&session.connection, names, &deps.settings.worker.retry_schedule);
    match tokio::time::timeout(names.confirm_timeout, declare).await {
        Ok(Ok(())) => {
            if publish().await.is_ok() {
                tracing::warn!(error = %failure, "the copy went through once the topology was declared again");
                return true;
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "declaring the topology again failed"),
        Err(_) => tracing::warn!("declaring the topology again timed out"),
    }
    give_back(delivery, &failure).await;
    false
}

/// How long (wall clock) a delivery keeps trying to get its delay-queue copy or dead letter
/// confirmed, before one more try after declaring the topology again (each bounded by
/// `AMQP_CONFIRM_TIMEOUT_SECS`) and giving up. The whole of carrying out an outcome is bounded
/// by [`SETTLE_BUDGET`].
pub const COPY_PATIENCE: Duration = Duration::from_secs(40);

/// The longest carrying out an outcome may take (copies, events, the ack), inside the room
/// `JOB_DEADLINE_SECS` leaves below the broker's `consumer_timeout`
/// ([`crate::config::SETTLE_MARGIN`]); past it the delivery is given back.
pub const SETTLE_BUDGET: Duration = Duration::from_secs(110);

/// Last resort when the broker confirms neither a delay-queue copy nor a dead letter (or the
/// outcome could not be carried out within [`SETTLE_BUDGET`]): this delivery, and only it, goes
/// back to the queue (`basic.reject` with requeue), so the other in-flight jobs finish and are
/// acked as usual. Never acked, so never lost; the broker counts the return
/// (`x-delivery-count`), so a job that can never be parked ends at `AMQP_DELIVERY_LIMIT` instead
/// of looping.
pub(super) async fn give_back(delivery: &Delivery, why: &str) {
    tracing::error!(error = %why, "could not park or dead-letter the job; returning it to the queue");
    metrics::counter!(names::RETURNED_DELIVERIES).increment(1);
    // `basic.reject`, not `basic.nack`: from RabbitMQ 4.3 a nack-requeue no longer counts
    // towards `x-delivery-count`, a reject does on every version.
    if let Err(e) = delivery.reject(BasicRejectOptions { requeue: true }).await {
        tracing::error!(error = %e, "returning the job failed; it returns when its channel closes");
    }
}

/// Acks `delivery`; false when the channel is gone (the broker then redelivers the job, and
/// the idempotent upsert keeps one document).
pub(super) async fn ack(delivery: &Delivery) -> bool {
    match delivery.ack(BasicAckOptions::default()).await {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %e, "ack failed");
            false
        }
    }
}
