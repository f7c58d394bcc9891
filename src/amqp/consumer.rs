//! The consumer: one delivery in, one outcome out.
//!
//! ```text
//! delivery ─parse─► Job ─process─► Saved ─publish audio.saved (confirmed)─► ack ─► cleanup
//!             │                 └─► Failure ─┐
//!             └─ JobError ───────────────────┴─► dead letter (confirmed) ─► audio.failed ─► ack
//! ```
//! A delivery is acked only after what it produced (the completion event, or the dead letter)
//! is confirmed by the broker; until then it stays unacked and the broker redelivers it if this
//! worker dies.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{SecondsFormat, Utc};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, field};

use super::publisher::Publisher;
use super::{copy_properties, header_str, text, topology};
use crate::error::{Stage, StageError};
use crate::events::{AudioFailed, AudioSaved, FAILED_ROUTING_KEY, SAVED_ROUTING_KEY};
use crate::health::names;
use crate::job::{Job, SaveAudioJob, sniff_asset_id};
use crate::pipeline::cleanup::spawn_cleanup;
use crate::processor::{self, Deps, Failure, RetryBudget, RetryPolicy, Saved};
use crate::trace_context::TraceContext;

/// Dead-letter header: the stage that failed (`parse`, `download`, `upload`, `catalog`, `publish`).
pub const HEADER_STAGE: &str = "audio-worker-stage";
/// Dead-letter header: `transient` (retries exhausted) or `permanent`.
pub const HEADER_ERROR_CLASS: &str = "audio-worker-error-class";
/// Dead-letter header: the last error, in words.
pub const HEADER_REASON: &str = "audio-worker-reason";
/// Dead-letter and delay header: attempts made so far, all deliveries together.
pub const HEADER_ATTEMPTS: &str = "audio-worker-attempts";
/// Which delivery of the job this is (1 = first); decides the next delay queue. Our own
/// header: `x-death` and client-set `x-` headers are the broker's to change.
pub const HEADER_DELIVERY: &str = "audio-worker-delivery";
/// Dead-letter header: RFC 3339 time of the first failure (kept across replays).
pub const HEADER_FIRST_FAILED_AT: &str = "audio-worker-first-failed-at";
/// Dead-letter header: RFC 3339 time of this failure.
pub const HEADER_FAILED_AT: &str = "audio-worker-failed-at";
/// Dead-letter header: the exchange the job was first published to.
pub const HEADER_ORIGINAL_EXCHANGE: &str = "audio-worker-original-exchange";
/// Dead-letter header: the routing key the job was first published with.
pub const HEADER_ORIGINAL_ROUTING_KEY: &str = "audio-worker-original-routing-key";

/// Every header the worker sets on a failed job (delay-queue copies and dead letters): what a
/// replay removes, and what the AsyncAPI document must describe.
pub const FAILURE_HEADERS: [&str; 9] = [
    HEADER_STAGE,
    HEADER_ERROR_CLASS,
    HEADER_REASON,
    HEADER_ATTEMPTS,
    HEADER_DELIVERY,
    HEADER_FAILED_AT,
    HEADER_FIRST_FAILED_AT,
    HEADER_ORIGINAL_EXCHANGE,
    HEADER_ORIGINAL_ROUTING_KEY,
];

/// Longest reason kept in a header (AMQP headers are not the place for megabytes).
const MAX_REASON_CHARS: usize = 2000;

/// Consumes jobs until `shutdown` is cancelled, reconnecting when the broker goes away.
///
/// Start-up makes sure the bucket and the unique index exist (retrying for about a minute while
/// the services come up), then declares the topology and consumes with `WORKER_PREFETCH`
/// unacked deliveries processed concurrently. On shutdown the consumer is cancelled, in-flight
/// jobs get `SHUTDOWN_GRACE_SECS` to finish, and whatever is unfinished returns to the queue
/// when the connection closes.
///
/// # Errors
/// S3 or MongoDB cannot be prepared at start-up.
pub async fn run(deps: Arc<Deps>, shutdown: CancellationToken) -> anyhow::Result<()> {
    tokio::select! {
        prepared = prepare(&deps) => prepared?,
        () = shutdown.cancelled() => return Ok(()),
    }
    let mut delay = Duration::from_secs(1);
    loop {
        let ended = session(&deps, &shutdown).await;
        let was_consuming = deps.health.is_consuming();
        deps.health.set_consuming(false);
        if was_consuming {
            // The broker was fine until now: start the backoff afresh.
            delay = Duration::from_secs(1);
        }
        match ended {
            Ok(()) => return Ok(()),
            Err(e) if shutdown.is_cancelled() => {
                tracing::info!(error = %format!("{e:#}"), "stopped");
                return Ok(());
            }
            Err(e) => {
                metrics::counter!(names::RECONNECTS).increment(1);
                tracing::error!(error = %format!("{e:#}"), retry_in_s = delay.as_secs(), "AMQP session ended; reconnecting");
                deps.health.failed(crate::health::Dependency::RabbitMq, format!("{e:#}"));
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Creates the bucket and the catalog index, waiting for the services to come up.
async fn prepare(deps: &Deps) -> anyhow::Result<()> {
    // Downloads of a worker that was killed; anything this old is not being written any more.
    let stale = crate::pipeline::download::remove_stale_spool_files(
        &deps.settings.worker.tmp_dir,
        Duration::from_secs(6 * 3600),
    );
    if stale > 0 {
        tracing::info!(removed = stale, "removed stale spool files");
    }
    let policy = RetryPolicy {
        max_attempts: 15,
        initial_delay: Duration::from_millis(500),
        max_elapsed: Duration::from_secs(60),
    };
    RetryBudget::new(policy).run(|| deps.store.ensure_bucket()).await.context("preparing the S3 bucket")?;
    RetryBudget::new(policy)
        .run(|| deps.catalog.ensure_indexes())
        .await
        .context("preparing the MongoDB index")?;
    Ok(())
}

/// One connection's life: declare, consume, and on shutdown drain in-flight jobs.
async fn session(deps: &Arc<Deps>, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let names = &deps.settings.amqp;
    let properties = ConnectionProperties::default().with_connection_name("audio-worker".into());
    let connection = Connection::connect(&names.url, properties).await.context("connecting to AMQP_URL")?;
    let publisher = Publisher::open(&connection).await.context("opening the publisher channel")?;
    topology::declare(publisher.channel(), names, &deps.settings.worker.retry_schedule)
        .await
        .context("declaring the topology")?;
    let channel = connection.create_channel().await.context("opening the consumer channel")?;
    channel.basic_qos(deps.settings.worker.prefetch, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            names.job_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("consuming the job queue")?;
    tracing::info!(queue = %names.job_queue, prefetch = deps.settings.worker.prefetch, "consuming");
    deps.health.set_consuming(true);

    let tracker = TaskTracker::new();
    let session = SessionHandle { publisher, tracker: tracker.clone(), broken: CancellationToken::new() };
    let result = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            () = session.broken.cancelled() => {
                break Err(anyhow::anyhow!("a publish was not confirmed: reopening the connection, unacked jobs return to the queue"));
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    tracker.spawn(handle_delivery(deps.clone(), session.clone(), delivery));
                }
                Some(Err(e)) => break Err(anyhow::Error::new(e).context("consumer failed")),
                None => break Err(anyhow::anyhow!("consumer stream ended (channel or connection closed)")),
            }
        }
    };
    if result.is_ok() {
        // Stop new deliveries first; the prefetched ones not yet started are released when the
        // connection closes.
        if let Err(e) = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await {
            tracing::warn!(error = %e, "cancelling the consumer failed");
        }
    }
    tracker.close();
    if result.is_ok() {
        let grace = deps.settings.worker.shutdown_grace;
        tracing::info!(in_flight = tracker.len(), grace_s = grace.as_secs(), "draining in-flight jobs");
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                unfinished = tracker.len(),
                "grace period over; unfinished jobs return to the queue"
            );
        }
    }
    // After a failure the in-flight jobs cannot settle on this connection any more: closing it
    // hands every unacked delivery back to the broker, and reconnecting does not wait for them.
    let _ = connection.close(200, "audio-worker stopping".into()).await;
    result
}

/// What a job's task shares with its session.
#[derive(Clone)]
pub struct SessionHandle {
    /// Confirm-mode channel for events, delay-queue copies and dead letters.
    publisher: Publisher,
    /// Tracks jobs and their cleanups, so shutdown can wait for them.
    tracker: TaskTracker,
    /// Cancelled when the broker confirms neither a delay-queue copy nor a dead letter: the
    /// session reconnects, and the job stays unacked (the broker redelivers it) rather than
    /// being nacked into a redelivery loop or acked and lost.
    broken: CancellationToken,
}

/// Processes one delivery to its end: acked after a confirmed event or dead letter.
pub async fn handle_delivery(deps: Arc<Deps>, session: SessionHandle, delivery: Delivery) {
    #[cfg_attr(not(feature = "otlp"), allow(unused_mut))]
    let mut trace = TraceContext::from_headers(delivery.properties.headers().as_ref());
    let span = tracing::info_span!(
        "job",
        asset_id = field::Empty,
        delivery_tag = delivery.delivery_tag,
        redelivered = delivery.redelivered,
        trace_id = field::Empty,
        span_id = field::Empty,
        parent_span_id = field::Empty,
    );
    #[cfg(feature = "otlp")]
    crate::telemetry::otlp::continue_trace(&span, &mut trace);
    span.record("trace_id", field::display(trace.trace_id));
    span.record("span_id", field::display(trace.span_id));
    if let Some(parent) = trace.parent_span_id {
        span.record("parent_span_id", field::display(parent));
    }
    metrics::gauge!(names::IN_FLIGHT).increment(1.0);
    let started = std::time::Instant::now();
    let outcome = async move {
        let publisher = &session.publisher;
        let job = match SaveAudioJob::parse(&delivery.data, &deps.settings.audio_gen.url_policy) {
            Ok(job) => job,
            Err(e) => {
                let raw_asset_id = sniff_asset_id(&delivery.data);
                if let Some(id) = &raw_asset_id {
                    tracing::Span::current().record("asset_id", id.as_str());
                }
                let failure = Failure {
                    error: StageError::permanent(Stage::Parse, e.to_string()),
                    attempts: prior_attempts(&delivery).saturating_add(1),
                };
                let settled =
                    dead_letter(&deps, &session, &delivery, &trace, None, raw_asset_id, &failure).await;
                return settled.then_some("dead_lettered");
            }
        };
        tracing::Span::current().record("asset_id", field::display(job.asset_id));
        let outcome = match processor::process(&job, &deps).await {
            Ok(saved) => {
                let publishing = std::time::Instant::now();
                let published = publish_saved(&deps, publisher, &delivery, &trace, &job, &saved).await;
                metrics::histogram!(names::STAGE_DURATION, "stage" => "publish")
                    .record(publishing.elapsed().as_secs_f64());
                published
            }
            Err(failure) => Err(failure),
        };
        match outcome {
            Ok(()) => {
                let acked = ack(&delivery).await;
                tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "job completed");
                // Without the ack the job is redelivered and needs its audio again.
                if acked
                    && deps.settings.audio_gen.cleanup_temp_audio
                    && let Some(url) = job.source.cleanup_url.clone()
                {
                    spawn_cleanup(deps.http.clone(), url, &session.tracker);
                }
                acked.then_some("saved")
            }
            Err(failure) => {
                let failure = Failure {
                    attempts: prior_attempts(&delivery).saturating_add(failure.attempts),
                    ..failure
                };
                let delivery_no = header_u32(&delivery, HEADER_DELIVERY).unwrap_or(1).max(1);
                let schedule = &deps.settings.worker.retry_schedule;
                match schedule.get(delivery_no as usize - 1) {
                    Some(delay) if failure.error.is_transient() => {
                        retry_later(&deps, &session, &delivery, delivery_no, *delay, &failure)
                            .await
                            .then_some("retried")
                    }
                    _ => dead_letter(&deps, &session, &delivery, &trace, Some(&job), None, &failure)
                        .await
                        .then_some("dead_lettered"),
                }
            }
        }
    }
    .instrument(span)
    .await;
    metrics::gauge!(names::IN_FLIGHT).decrement(1.0);
    // A delivery left unacked (the session reconnects) has no outcome yet: it comes back.
    if let Some(outcome) = outcome {
        metrics::counter!(names::JOBS, "outcome" => outcome).increment(1);
        metrics::histogram!(names::JOB_DURATION, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
    }
}

/// Publishes `audio.saved` (and the reply to `reply_to`), retried like any stage.
async fn publish_saved(
    deps: &Deps,
    publisher: &Publisher,
    delivery: &Delivery,
    trace: &TraceContext,
    job: &Job,
    saved: &Saved,
) -> Result<(), Failure> {
    let event = AudioSaved::new(job, &saved.object, &saved.entry);
    let body = serde_json::to_vec(&event).expect("events serialize");
    let properties = event_properties(delivery, trace, &event.event_id.to_string(), SAVED_ROUTING_KEY);
    RetryBudget::new(deps.retry_policy())
        .run(|| publish_event(deps, publisher, delivery, SAVED_ROUTING_KEY, &body, properties.clone()))
        .await?;
    tracing::info!(event_id = %event.event_id, version = event.version, "audio.saved published");
    Ok(())
}

/// Publishes an event on the events exchange and, when the job asked for it, to its `reply_to`
/// queue with its `correlation_id`. Once the event is confirmed the job's outcome is recorded,
/// so a reply that cannot be delivered (the waiter gave up, its queue is full) is logged, never
/// a reason to run the job again or to dead-letter a saved asset.
async fn publish_event(
    deps: &Deps,
    publisher: &Publisher,
    delivery: &Delivery,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), StageError> {
    publisher
        .publish(&deps.settings.amqp.events_exchange, routing_key, body, properties.clone())
        .await
        .map_err(|e| StageError::transient(Stage::Publish, e.to_string()))?;
    if let Some(reply_to) = delivery.properties.reply_to().as_ref().filter(|r| !r.as_str().is_empty())
        && let Err(e) = publisher.publish("", reply_to.as_str(), body, properties).await
    {
        tracing::warn!(reply_to = %reply_to.as_str(), error = %e, "reply not delivered; the event on the events exchange stands");
    }
    Ok(())
}

/// Properties of an event: persistent JSON, the job's correlation id carried over, and the
/// job's trace context as `traceparent`/`tracestate` headers.
fn event_properties(
    delivery: &Delivery,
    trace: &TraceContext,
    message_id: &str,
    kind: &str,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    trace.inject(&mut headers);
    let mut properties = BasicProperties::default()
        .with_headers(headers)
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(message_id.into())
        .with_type(kind.into())
        .with_app_id("audio-worker".into())
        .with_timestamp(Utc::now().timestamp().try_into().unwrap_or_default());
    if let Some(correlation_id) = delivery.properties.correlation_id() {
        properties = properties.with_correlation_id(correlation_id.clone());
    }
    properties
}

/// Attempts recorded on the message by earlier deliveries.
fn prior_attempts(delivery: &Delivery) -> u32 {
    header_u32(delivery, HEADER_ATTEMPTS).unwrap_or(0)
}

fn header_u32(delivery: &Delivery, name: &str) -> Option<u32> {
    header_str(delivery.properties.headers().as_ref(), name)?.parse().ok()
}

/// Parks a transiently failed job in delay queue `delivery_no` for `delay` (±20 % jitter, as a
/// per-message TTL); the broker then dead-letters it back to the job queue. The delivery is
/// acked only once the parked copy is confirmed, so the consumer slot is free meanwhile and
/// the job is never in neither place. True when the job was parked and acked.
async fn retry_later(
    deps: &Deps,
    session: &SessionHandle,
    delivery: &Delivery,
    delivery_no: u32,
    delay: Duration,
    failure: &Failure,
) -> bool {
    let error = &failure.error;
    let jitter = 0.8 + 0.4 * fastrand::f64();
    let ttl_ms = ((delay.as_millis() as f64) * jitter).max(1.0) as u64;
    tracing::warn!(stage = %error.stage, attempts = failure.attempts, delivery = delivery_no, retry_in_ms = ttl_ms, reason = %error.reason, "transient failure; job parked in a delay queue");
    let mut headers = failure_headers(delivery, failure);
    headers.insert(HEADER_DELIVERY.into(), AMQPValue::LongLongInt(i64::from(delivery_no).saturating_add(1)));
    let properties =
        copy_properties(&delivery.properties, headers).with_expiration(ttl_ms.to_string().into());
    let queue = topology::delay_queue(&deps.settings.amqp, delivery_no as usize);
    if !copy_job(deps, session, delivery, "", &queue, properties).await {
        return false;
    }
    metrics::counter!(names::DELAY_QUEUE_PUBLISHES, "queue" => queue).increment(1);
    ack(delivery).await
}

/// Publishes a copy of the job (to a delay queue or the dead-letter exchange), retrying a few
/// times until the broker confirms it. True when it did; otherwise the job is left unacked (see
/// [`leave_unacked`]) and false.
async fn copy_job(
    deps: &Deps,
    session: &SessionHandle,
    delivery: &Delivery,
    exchange: &str,
    routing_key: &str,
    properties: BasicProperties,
) -> bool {
    let sent = RetryBudget::new(RetryPolicy { max_attempts: 5, ..deps.retry_policy() })
        .run(|| async {
            session
                .publisher
                .publish(exchange, routing_key, &delivery.data, properties.clone())
                .await
                .map_err(|e| {
                    StageError::transient(Stage::Publish, format!("copy to {exchange:?}/{routing_key}: {e}"))
                })
        })
        .await;
    match sent {
        Ok(()) => true,
        Err(e) => {
            leave_unacked(session, &e.to_string());
            false
        }
    }
}

/// Last resort when the broker confirms neither a delay-queue copy nor a dead letter: the job
/// stays where it was, unacked, and the session is reopened so the broker redelivers it (to this
/// or another worker). Never nack-requeue, never ack.
fn leave_unacked(session: &SessionHandle, why: &str) {
    tracing::error!(error = %why, "could not park or dead-letter the job; leaving it unacked and reconnecting");
    session.broken.cancel();
}

/// Moves a failed job to the dead-letter exchange with its failure headers, publishes
/// `audio.failed`, then acks. If the dead letter cannot be confirmed the delivery stays unacked
/// and the session reconnects (see [`leave_unacked`]): a job is never dropped. True when the
/// job was dead-lettered and acked.
async fn dead_letter(
    deps: &Deps,
    session: &SessionHandle,
    delivery: &Delivery,
    trace: &TraceContext,
    job: Option<&Job>,
    raw_asset_id: Option<String>,
    failure: &Failure,
) -> bool {
    let publisher = &session.publisher;
    let error = &failure.error;
    tracing::error!(stage = %error.stage, class = error.class.as_str(), attempts = failure.attempts, reason = %error.reason, "job failed; dead-lettering");
    let headers = failure_headers(delivery, failure);
    let properties = copy_properties(&delivery.properties, headers);
    let dead_letter_exchange = &deps.settings.amqp.dead_letter_exchange;
    if !copy_job(deps, session, delivery, dead_letter_exchange, delivery.routing_key.as_str(), properties)
        .await
    {
        return false;
    }
    metrics::counter!(names::DEAD_LETTER_PUBLISHES).increment(1);
    let event =
        AudioFailed::new(job, raw_asset_id, error.stage, error.class, &error.reason, failure.attempts)
            .with_tenant_of(&delivery.data);
    let body = serde_json::to_vec(&event).expect("events serialize");
    let event_props = event_properties(delivery, trace, &event.event_id.to_string(), FAILED_ROUTING_KEY);
    // The job is safe in the dead-letter queue; a failed event is logged, not a reason to keep it.
    if let Err(e) = publish_event(deps, publisher, delivery, FAILED_ROUTING_KEY, &body, event_props).await {
        tracing::error!(error = %e, "audio.failed event not published");
    }
    ack(delivery).await
}

/// The original headers plus ours; `first-failed-at` survives a replay.
fn failure_headers(delivery: &Delivery, failure: &Failure) -> FieldTable {
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let original = delivery.properties.headers().as_ref();
    let mut headers = original.cloned().unwrap_or_default();
    let reason: String = failure.error.reason.chars().take(MAX_REASON_CHARS).collect();
    headers.insert(HEADER_STAGE.into(), text(failure.error.stage.as_str()));
    headers.insert(HEADER_ERROR_CLASS.into(), text(failure.error.class.as_str()));
    headers.insert(HEADER_REASON.into(), text(reason));
    headers.insert(HEADER_ATTEMPTS.into(), AMQPValue::LongLongInt(i64::from(failure.attempts)));
    headers.insert(HEADER_FAILED_AT.into(), text(now.clone()));
    let first = header_str(original, HEADER_FIRST_FAILED_AT).unwrap_or(now);
    headers.insert(HEADER_FIRST_FAILED_AT.into(), text(first));
    if header_str(original, HEADER_ORIGINAL_ROUTING_KEY).is_none() {
        headers.insert(HEADER_ORIGINAL_EXCHANGE.into(), text(delivery.exchange.as_str()));
        headers.insert(HEADER_ORIGINAL_ROUTING_KEY.into(), text(delivery.routing_key.as_str()));
    }
    headers
}

/// Acks `delivery`; false when the channel is gone (the broker then redelivers the job, and
/// the idempotent upsert keeps one document).
async fn ack(delivery: &Delivery) -> bool {
    match delivery.ack(BasicAckOptions::default()).await {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %e, "ack failed");
            false
        }
    }
}
