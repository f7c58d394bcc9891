//! The consumer: deliveries in, outcomes out.
//!
//! ```text
//! delivery ─parse─► Job ─processor::handle─► Outcome ─┬─ Saved ──────► ack ─► cleanup
//!             │                                         ├─ RetryLater ─► delay-queue copy (confirmed) ─► ack
//!             └─ JobError ─► processor::refuse ─────────┴─ DeadLetter ─► dead letter (confirmed) ─► audio.failed ─► ack
//! ```
//! The processor decides; this module only reads the delivery (its body and headers), carries
//! the outcome out and acks. A delivery is acked only after what it produced (the completion
//! event, the delay-queue copy or the dead letter) is confirmed by the broker; until then it
//! stays unacked and the broker redelivers it if this worker dies.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, field};

use super::headers::{self, copy_properties};
use super::publisher::{Publisher, Routing};
pub use super::session::SessionHandle;
use super::session::{SETTLE_BUDGET, ack, copy_job, give_back};
use super::topology;
use super::trace_context::TraceContext;
use crate::batch::ItemProgress;
use crate::error::{Stage, StageError};
use crate::events::{AudioFailed, AudioSaved, FAILED_ROUTING_KEY, SAVED_ROUTING_KEY};
use crate::health::names;
use crate::job::{Envelope, Job, SaveAudioJob, raw_fingerprint, sniff_asset_id, sniff_batch_item};
use crate::pipeline::cleanup::spawn_cleanup;
use crate::processor::{self, Announcer, Deps, Outcome, Saved};
use crate::retry::Failure;

/// Consumes jobs until `shutdown` is cancelled, reconnecting when the broker goes away (see
/// [`crate::startup`] for what is prepared before).
///
/// Each session connects to a node of `AMQP_URL` (the next one after a node that dropped the
/// last session), declares the topology and consumes with `WORKER_PREFETCH` unacked deliveries
/// processed concurrently. On shutdown the consumer is cancelled, in-flight jobs get
/// `SHUTDOWN_GRACE_SECS` to finish, and whatever is unfinished returns to the queue when the
/// connection closes.
///
/// Every session error leads to a reconnect with capped backoff (1 s doubling to 30 s, reset
/// once a session consumed), so this returns only on shutdown.
pub async fn run(deps: Arc<Deps>, shutdown: CancellationToken) {
    let mut delay = Duration::from_secs(1);
    let mut node = 0;
    loop {
        let ended = session(&deps, &shutdown, &mut node).await;
        let was_consuming = deps.health.is_consuming();
        deps.health.set_consuming(false);
        if was_consuming {
            // The broker was fine until now: start the backoff afresh.
            delay = Duration::from_secs(1);
        }
        // Next time, start at the node after the one this session reached: it dropped the
        // session, or answered without being able to set it up (still booting, a minority
        // partition).
        node += 1;
        match ended {
            Ok(()) => return,
            Err(e) if shutdown.is_cancelled() => {
                tracing::info!(error = %format!("{e:#}"), "stopped");
                return;
            }
            Err(e) => {
                metrics::counter!(names::RECONNECTS).increment(1);
                tracing::error!(error = %format!("{e:#}"), retry_in_s = delay.as_secs(), "AMQP session ended; reconnecting");
                deps.health.failed(crate::health::Dependency::RabbitMq, format!("{e:#}"));
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// One connection's life: connect (from node `*node` on, which is updated to the node
/// reached), declare, consume, and on shutdown drain in-flight jobs.
async fn session(deps: &Arc<Deps>, shutdown: &CancellationToken, node: &mut usize) -> anyhow::Result<()> {
    let names = &deps.settings.amqp;
    // The process id in the name tells an operator (and `rabbitmqctl list_connections`) which
    // replica a connection belongs to.
    let name = format!("audio-worker pid {}", std::process::id());
    let (connection, reached) = super::connect(&names.nodes, &name, *node).await?;
    *node = reached;
    let connection = Arc::new(connection);
    let setup = async {
        topology::declare(&connection, names, &deps.settings.worker.retry_schedule)
            .await
            .context("declaring the topology")?;
        // One lane per job that may publish at once: no publish waits for another's confirm.
        let lanes = usize::from(deps.settings.worker.prefetch).min(MAX_PUBLISH_LANES);
        let publisher = Publisher::open(connection.clone(), lanes, names.confirm_timeout)
            .await
            .context("opening the publisher channels")?;
        let worker = &deps.settings.worker;
        let mut consumers = Vec::with_capacity(5);
        for (kind, queue, prefetch) in [
            (Inbox::Jobs, names.job_queue.clone(), worker.prefetch),
            (Inbox::Jobs, names.batch_items_queue(), worker.batch_prefetch),
            (Inbox::Batches, names.batch_queue(), 1),
            (Inbox::Progress, names.batch_progress_queue(), PROGRESS_PREFETCH),
            (Inbox::Refresh, names.url_refresh_queue.clone(), REFRESH_PREFETCH),
        ] {
            // A channel per queue: the prefetch (basic.qos) is per channel, so each queue has
            // its own slots and none can fill another's.
            let channel = connection.create_channel().await.context("opening a consumer channel")?;
            channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("consuming {queue}"))?;
            consumers.push((kind, channel, consumer));
        }
        anyhow::Ok((publisher, consumers))
    };
    // A node that accepts connections but cannot serve (still booting, a minority partition)
    // must not hold the worker: past this, the next node is tried.
    let (publisher, consumers) = match tokio::time::timeout(super::connect::CONNECT_TIMEOUT * 3, setup).await
    {
        Ok(set_up) => set_up?,
        Err(_) => {
            let _ = connection.close(200, "session setup timed out".into()).await;
            anyhow::bail!(
                "the node did not set the session up within {} s",
                (super::connect::CONNECT_TIMEOUT * 3).as_secs()
            );
        }
    };
    tracing::info!(queue = %names.job_queue, prefetch = deps.settings.worker.prefetch, "consuming");
    deps.health.set_consuming(true);

    let tracker = TaskTracker::new();
    let session = SessionHandle { publisher, tracker: tracker.clone(), connection: connection.clone() };
    let mut cancel = Vec::with_capacity(consumers.len());
    let mut inbox =
        futures_util::stream::select_all(consumers.into_iter().map(|(kind, channel, consumer)| {
            cancel.push((channel, consumer.tag()));
            consumer.map(move |delivery| (kind, delivery))
        }));
    let result = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            next = inbox.next() => match next {
                Some((kind, Ok(delivery))) => {
                    let (deps, session) = (deps.clone(), session.clone());
                    match kind {
                        Inbox::Jobs => tracker.spawn(handle_delivery(deps, session, delivery)),
                        Inbox::Batches => tracker.spawn(super::batches::intake(deps, session, delivery)),
                        Inbox::Progress => tracker.spawn(super::batches::track(deps, session, delivery)),
                        Inbox::Refresh => tracker.spawn(refresh_urls(deps, session, delivery)),
                    };
                }
                Some((_, Err(e))) => break Err(anyhow::Error::new(e).context("consumer failed")),
                None => break Err(anyhow::anyhow!("consumer stream ended (channel or connection closed)")),
            }
        }
    };
    if result.is_ok() {
        // Stop new deliveries first; the prefetched ones not yet started are released when the
        // connection closes.
        for (channel, tag) in cancel {
            if let Err(e) = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await {
                tracing::warn!(error = %e, "cancelling a consumer failed");
            }
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

/// The most publisher lanes (channels) a session opens, whatever the prefetch: RabbitMQ allows
/// 2047 channels per connection by default, and past a few dozen lanes the broker, not the
/// round trips, is the limit.
const MAX_PUBLISH_LANES: usize = 64;

/// Which queue a delivery came from, and so which handler takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inbox {
    /// The job queue and the batch items queue: [`handle_delivery`].
    Jobs,
    /// Batch messages: [`super::batches::intake`].
    Batches,
    /// Batch items' terminal states: [`super::batches::track`].
    Progress,
    /// URL refresh requests: [`refresh_urls`].
    Refresh,
}

/// Unacked batch progress reports per worker: each is a few MongoDB round trips.
const PROGRESS_PREFETCH: u16 = 8;

/// Unacked URL refresh requests per worker: each is one read and a few signatures.
const REFRESH_PREFETCH: u16 = 16;

/// Processes one delivery to its end: parsed, handled by the processor, and its outcome carried
/// out (acked once what it produced is confirmed).
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
    let activity = deps.activity.clone();
    let settled = async move {
        let attempt = headers::attempt(delivery.properties.headers().as_ref());
        let envelope = headers::envelope(&delivery.properties);
        let policy = &deps.settings.audio_gen.url_policy;
        let (job, outcome) = match SaveAudioJob::parse_delivered(&delivery.data, policy, &envelope) {
            Ok(job) => {
                tracing::Span::current().record("asset_id", field::display(job.asset_id));
                let announcer =
                    DeliveryAnnouncer { deps: &deps, session: &session, delivery: &delivery, trace: &trace };
                let outcome = processor::handle(&job, &deps, attempt, &announcer).await;
                (Some(job), outcome)
            }
            Err(e) => {
                if let Some(id) = sniff_asset_id(&delivery.data) {
                    tracing::Span::current().record("asset_id", id.as_str());
                }
                (None, processor::refuse(StageError::permanent(Stage::Parse, e.to_string()), attempt))
            }
        };
        let carried = carry_out(&deps, &session, &delivery, &trace, &envelope, job.as_ref(), &outcome);
        let acked = match tokio::time::timeout(SETTLE_BUDGET, carried).await {
            Ok(acked) => acked,
            Err(_) => {
                give_back(
                    &delivery,
                    &format!("the outcome was not carried out within {} s", SETTLE_BUDGET.as_secs()),
                )
                .await;
                false
            }
        };
        if acked && matches!(outcome, Outcome::Saved(_)) {
            tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "job completed");
        }
        acked.then(|| outcome.metric_label())
    }
    .instrument(span)
    .await;
    metrics::gauge!(names::IN_FLIGHT).decrement(1.0);
    // A delivery given back, or left unacked by a lost channel, has no outcome yet: it comes back.
    if let Some(outcome) = settled {
        metrics::counter!(names::JOBS, "outcome" => outcome).increment(1);
        activity.record(outcome);
        metrics::histogram!(names::JOB_DURATION, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
    }
}

/// Carries out the processor's verdict on `delivery`; true when the delivery was acked.
async fn carry_out(
    deps: &Deps,
    session: &SessionHandle,
    delivery: &Delivery,
    trace: &TraceContext,
    envelope: &Envelope,
    job: Option<&Job>,
    outcome: &Outcome,
) -> bool {
    match outcome {
        Outcome::Saved(_) => {
            let acked = ack(delivery).await;
            // Without the ack the job is redelivered and needs its audio again.
            if acked
                && deps.settings.audio_gen.cleanup_temp_audio
                && let Some(url) = job.and_then(|j| j.source.cleanup_url.clone())
            {
                spawn_cleanup(deps.http.clone(), url, &session.tracker);
            }
            acked
        }
        Outcome::Superseded { version, failure } => {
            tracing::warn!(version, reason = %failure.error.reason, "job superseded by a newer save; not stored");
            if !report_failed(deps, session, delivery, job, failure).await {
                return false;
            }
            let event = failed_event(delivery, envelope, job, failure).superseded_by(*version);
            publish_failed(deps, session, delivery, trace, &event).await;
            ack(delivery).await
        }
        Outcome::RetryLater { next_delivery, delay, failure } => {
            retry_later(deps, session, delivery, envelope, *next_delivery, *delay, failure).await
        }
        Outcome::DeadLetter(failure) => {
            dead_letter(deps, session, delivery, trace, envelope, job, failure).await
        }
    }
}

/// The processor's [`Announcer`] for one delivery: `audio.saved` on the events exchange and to
/// the job's `reply_to`, carrying its correlation id and trace context.
struct DeliveryAnnouncer<'a> {
    deps: &'a Deps,
    session: &'a SessionHandle,
    delivery: &'a Delivery,
    trace: &'a TraceContext,
}

impl Announcer for DeliveryAnnouncer<'_> {
    async fn announce(&self, job: &Job, saved: &Saved) -> Result<(), StageError> {
        let event = AudioSaved::new(job, &saved.object, &saved.entry);
        let body = serde_json::to_vec(&event).expect("events serialize");
        let properties =
            event_properties(self.delivery, self.trace, &event.event_id.to_string(), SAVED_ROUTING_KEY);
        publish_event(self.deps, self.session, self.delivery, SAVED_ROUTING_KEY, &body, properties).await?;
        tracing::info!(event_id = %event.event_id, version = event.version, "audio.saved published");
        // A batch item's save reaches its batch before the delivery is acked: a worker that
        // dies in between runs the job again, which saves nothing new and reports again.
        if let Some(item) = job.batch {
            let progress = ItemProgress::saved(item, job, saved);
            super::batches::report(self.deps, self.session, &progress).await.map_err(|f| f.error)?;
        }
        Ok(())
    }
}

/// Publishes an event on the events exchange and, when the job asked for it, to its `reply_to`
/// queue with its `correlation_id` (sent in the background on the session's tracker). Once the
/// event is confirmed the job's outcome is recorded, so a reply that cannot be delivered (the
/// waiter gave up, its queue is full) is logged, never a reason to run the job again or to
/// dead-letter a saved asset.
async fn publish_event(
    deps: &Deps,
    session: &SessionHandle,
    delivery: &Delivery,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), StageError> {
    let (publisher, tracker) = (&session.publisher, &session.tracker);
    publisher
        .publish(
            &deps.settings.amqp.events_exchange,
            routing_key,
            body,
            properties.clone(),
            Routing::Mandatory,
        )
        .await
        .map_err(|e| StageError::transient(Stage::Publish, e.to_string()))?;
    if let Some(reply_to) = delivery.properties.reply_to().as_ref().filter(|r| !r.as_str().is_empty()) {
        // Not mandatory: a waiter that gave up and deleted its queue is not our failure, and a
        // return that could be taken for another publish's is never asked for. Not waited for
        // either: the job's outcome stands once the event is confirmed, so neither the job
        // deadline nor a slow reply can undo it.
        let (publisher, reply_to, body) = (publisher.clone(), reply_to.as_str().to_owned(), body.to_vec());
        tracker.spawn(async move {
            match publisher.publish("", &reply_to, &body, properties, Routing::BestEffort).await {
                Ok(()) => tracing::debug!(%reply_to, "reply sent"),
                Err(e) => {
                    tracing::warn!(%reply_to, error = %e, "reply not sent; the event on the events exchange stands");
                }
            }
        }.in_current_span());
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

/// Parks a transiently failed job in delay queue `next_delivery - 1` for `delay` (a
/// per-message TTL); the broker then dead-letters it back to the job queue as delivery
/// `next_delivery`. The delivery is acked only once the parked copy is confirmed, so the
/// consumer slot is free meanwhile and the job is never in neither place. True when the job
/// was parked and acked.
async fn retry_later(
    deps: &Deps,
    session: &SessionHandle,
    delivery: &Delivery,
    envelope: &Envelope,
    next_delivery: u32,
    delay: Duration,
    failure: &Failure,
) -> bool {
    let error = &failure.error;
    let ttl_ms = delay.as_millis().max(1);
    tracing::warn!(stage = %error.stage, attempts = failure.attempts, next_delivery, retry_in_ms = ttl_ms as u64, reason = %error.reason, "transient failure; job parked in a delay queue");
    let headers = headers::retry_headers(
        delivery.properties.headers().as_ref(),
        delivery.exchange.as_str(),
        delivery.routing_key.as_str(),
        failure,
        envelope,
        next_delivery,
    );
    let properties =
        copy_properties(&delivery.properties, headers).with_expiration(ttl_ms.to_string().into());
    // Back to the queue it came from: a batch item keeps the batch items' own slots.
    let names = &deps.settings.amqp;
    let items = names.batch_items_queue();
    let home = if delivery.routing_key.as_str() == items { items.as_str() } else { names.job_queue.as_str() };
    let queue = topology::delay_queue_of(home, next_delivery.saturating_sub(1) as usize);
    if !copy_job(deps, session, delivery, "", &queue, properties).await {
        return false;
    }
    metrics::counter!(names::DELAY_QUEUE_PUBLISHES, "queue" => queue).increment(1);
    ack(delivery).await
}

/// Moves a failed job to the dead-letter exchange with its failure headers, publishes
/// `audio.failed`, then acks. If the dead letter cannot be confirmed the delivery is returned to
/// the queue (see [`give_back`]): a job is never dropped. True when the
/// job was dead-lettered and acked. `job` is `None` for a delivery that did not parse.
async fn dead_letter(
    deps: &Deps,
    session: &SessionHandle,
    delivery: &Delivery,
    trace: &TraceContext,
    envelope: &Envelope,
    job: Option<&Job>,
    failure: &Failure,
) -> bool {
    let error = &failure.error;
    tracing::error!(stage = %error.stage, class = error.class.as_str(), attempts = failure.attempts, reason = %error.reason, "job failed; dead-lettering");
    let headers = headers::failure_headers(
        delivery.properties.headers().as_ref(),
        delivery.exchange.as_str(),
        delivery.routing_key.as_str(),
        failure,
        envelope,
    );
    let properties = copy_properties(&delivery.properties, headers);
    // Reported before the copy: a report whose dead letter then fails is repeated by the next
    // delivery (the tracker drops the repeat); a dead letter without its report would leave
    // the batch waiting.
    if !report_failed(deps, session, delivery, job, failure).await {
        return false;
    }
    let dead_letter_exchange = &deps.settings.amqp.dead_letter_exchange;
    if !copy_job(deps, session, delivery, dead_letter_exchange, delivery.routing_key.as_str(), properties)
        .await
    {
        return false;
    }
    metrics::counter!(names::DEAD_LETTER_PUBLISHES).increment(1);
    publish_failed(deps, session, delivery, trace, &failed_event(delivery, envelope, job, failure)).await;
    ack(delivery).await
}

/// Reports a failed batch item (the job's, or the batch fields a body that did not parse
/// names) to its batch; true when there is nothing to report or the report is confirmed, false
/// when the delivery was given back because it could not be.
async fn report_failed(
    deps: &Deps,
    session: &SessionHandle,
    delivery: &Delivery,
    job: Option<&Job>,
    failure: &Failure,
) -> bool {
    let item = match job {
        Some(job) => job.batch,
        None => sniff_batch_item(&delivery.data),
    };
    let Some(item) = item else { return true };
    let asset_id = job.map(|j| j.asset_id.to_string()).or_else(|| sniff_asset_id(&delivery.data));
    match super::batches::report(deps, session, &ItemProgress::of_failure(item, asset_id, failure)).await {
        Ok(()) => true,
        Err(e) => {
            give_back(delivery, &format!("the batch item's failure could not be reported: {e}")).await;
            false
        }
    }
}

/// Answers one URL refresh request on its `reply_to` (with its `correlation_id`), then acks
/// it. A request without `reply_to` has nobody to answer: it is logged and acked.
async fn refresh_urls(deps: Arc<Deps>, session: SessionHandle, delivery: Delivery) {
    let reply = crate::refresh::answer_body(&deps.catalog, &deps.store, &delivery.data).await;
    let span = tracing::info_span!("url_refresh", asset_id = %reply.asset_id, status = %reply.status);
    async move {
        let Some(reply_to) = delivery.properties.reply_to().as_ref().filter(|r| !r.as_str().is_empty())
        else {
            tracing::warn!("a URL refresh request without reply_to; nobody to answer");
            ack(&delivery).await;
            return;
        };
        let body = serde_json::to_vec(&reply).expect("replies serialize");
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_type(crate::refresh::REFRESHED_TYPE.into())
            .with_app_id("audio-worker".into())
            .with_timestamp(Utc::now().timestamp().try_into().unwrap_or_default());
        if let Some(correlation_id) = delivery.properties.correlation_id() {
            properties = properties.with_correlation_id(correlation_id.clone());
        }
        // Not mandatory: an asker that gave up and deleted its queue is not a reason to keep
        // the request.
        match session.publisher.publish("", reply_to.as_str(), &body, properties, Routing::BestEffort).await {
            Ok(()) => {
                tracing::info!(error = ?reply.error, "URL refresh answered");
                ack(&delivery).await;
            }
            Err(e) => give_back(&delivery, &format!("the URL refresh reply was not confirmed: {e}")).await,
        }
    }
    .instrument(span)
    .await;
}

/// The `audio.failed` event of a failure: its id from the job's fingerprint (or the raw body's,
/// for a job that did not parse) and its attempts, so a repeat has the same id.
fn failed_event(
    delivery: &Delivery,
    envelope: &Envelope,
    job: Option<&Job>,
    failure: &Failure,
) -> AudioFailed {
    let error = &failure.error;
    let raw_asset_id = job.is_none().then(|| sniff_asset_id(&delivery.data)).flatten();
    let fingerprint = match job {
        Some(job) => job.provenance.fingerprint.clone(),
        None => raw_fingerprint(&delivery.data, envelope),
    };
    AudioFailed::new(
        job,
        raw_asset_id,
        &fingerprint,
        error.stage,
        error.class,
        &error.reason,
        failure.attempts,
    )
    .with_tenant_of(&delivery.data)
}

/// Publishes `audio.failed`. The job's outcome is already safe (dead-lettered, or superseded
/// by a save that stays), so a failed event is logged, not a reason to keep the delivery.
async fn publish_failed(
    deps: &Deps,
    session: &SessionHandle,
    delivery: &Delivery,
    trace: &TraceContext,
    event: &AudioFailed,
) {
    let body = serde_json::to_vec(event).expect("events serialize");
    let properties = event_properties(delivery, trace, &event.event_id.to_string(), FAILED_ROUTING_KEY);
    if let Err(e) = publish_event(deps, session, delivery, FAILED_ROUTING_KEY, &body, properties).await {
        tracing::error!(error = %e, "audio.failed event not published");
    }
}
