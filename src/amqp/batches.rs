//! The batch side of a session: the intake of batch messages (`{job_queue}.batch`), the
//! reports of settled items (`{job_queue}.batch.progress`), and the tracker that records them
//! and publishes `audio.batch.completed` (see [`crate::batch`] for the whole flow).
//!
//! Like jobs, a batch delivery is acked only once what it produced is confirmed: every item
//! published (or its refusal reported) and the batch marked fanned out. A report is acked only
//! once it is recorded and, when it completed the batch, the manifest is stored and the
//! completion confirmed.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::{StreamExt, TryStreamExt};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::FieldTable;
use tracing::{Instrument, field};

use super::headers::{self, copy_properties};
use super::publisher::Routing;
use super::session::{SessionHandle, ack, copy_job, give_back};
use crate::batch::manifest::{Completion, ManifestFile, ManifestFiles};
use crate::batch::{Batch, COMPLETED_ROUTING_KEY, ItemPlan, ItemProgress};
use crate::error::{Stage, StageError};
use crate::job::BatchItem;
use crate::pipeline::catalog::{Opened, ReplyTo};
use crate::processor::Deps;
use crate::retry::{Failure, RetryBudget};

/// Items published at once while a batch fans out (each waits for its own confirm).
const FAN_OUT_CONCURRENCY: usize = 8;

/// How long a batch or a report whose MongoDB or S3 work failed waits before it is returned to
/// its queue, so an outage is not a busy loop.
const RETURN_PAUSE: Duration = Duration::from_secs(2);

/// Reports a batch item's terminal state to the tracker (a confirmed, mandatory publish to the
/// progress queue), retried like a stage.
///
/// # Errors
/// A transient `publish` error once the retries are spent.
pub async fn report(deps: &Deps, session: &SessionHandle, progress: &ItemProgress) -> Result<(), Failure> {
    let queue = deps.settings.amqp.batch_progress_queue();
    let body = serde_json::to_vec(progress).expect("a report serializes");
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_type("audio.batch.progress".into());
    RetryBudget::new(deps.retry_policy())
        .run(|| async {
            session
                .publisher
                .publish("", &queue, &body, properties.clone(), Routing::Mandatory)
                .await
                .map_err(|e| StageError::transient(Stage::Publish, format!("batch progress to {queue}: {e}")))
        })
        .await
}

/// Takes one batch message: validated, recorded with its expected count, its items published to
/// the batch items queue (and refused items reported failed), then acked. A batch that cannot
/// be taken (invalid, or its `batch_id` another tenant's) is dead-lettered with its reason; the
/// same batch published again is acked without publishing anything.
pub async fn intake(deps: Arc<Deps>, session: SessionHandle, delivery: Delivery) {
    let span = tracing::info_span!("batch", batch_id = field::Empty, items = field::Empty);
    async move {
        let settings = &deps.settings;
        let batch = match Batch::parse(
            &delivery.data,
            &settings.audio_gen.url_policy,
            settings.worker.batch_max_items,
        ) {
            Ok(batch) => batch,
            Err(e) => return refuse(&deps, &session, &delivery, e.to_string()).await,
        };
        tracing::Span::current().record("batch_id", field::display(batch.id));
        tracing::Span::current().record("items", batch.expected());
        let reply_to = ReplyTo {
            queue: delivery
                .properties
                .reply_to()
                .as_ref()
                .map(|q| q.as_str().to_owned())
                .filter(|q| !q.is_empty()),
            correlation_id: delivery.properties.correlation_id().as_ref().map(|c| c.as_str().to_owned()),
        };
        let batches = deps.catalog.batches();
        let opened = RetryBudget::new(deps.retry_policy()).run(|| batches.open(&batch, &reply_to)).await;
        let created_at = match opened {
            Ok(Opened::ToFanOut { created_at }) => created_at,
            Ok(Opened::AlreadyStarted) => {
                tracing::info!("batch already started: its items were published before; nothing new");
                ack(&delivery).await;
                return;
            }
            Ok(Opened::OtherTenant) => {
                let reason = format!("batch_id {} belongs to another tenant's batch", batch.id);
                return refuse(&deps, &session, &delivery, reason).await;
            }
            Ok(Opened::OtherContent) => {
                let reason =
                    format!("batch_id {} already names a batch with other items, not yet started", batch.id);
                return refuse(&deps, &session, &delivery, reason).await;
            }
            Err(failure) => return later(&delivery, &failure.error.reason).await,
        };
        // Indexes, not borrowed items: the stream's closure then takes no reference, which the
        // spawned task's future needs.
        let fanned = futures_util::stream::iter(0..batch.items.len())
            .map(|index| fan_out(&deps, &session, &batch, index, created_at))
            .buffer_unordered(FAN_OUT_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await;
        if let Err(failure) = fanned {
            return later(&delivery, &failure.error.reason).await;
        }
        if let Err(failure) = RetryBudget::new(deps.retry_policy()).run(|| batches.fanned_out(batch.id)).await
        {
            return later(&delivery, &failure.error.reason).await;
        }
        tracing::info!("batch taken: its items are published");
        ack(&delivery).await;
    }
    .instrument(span)
    .await;
}

/// Publishes item `index` of `batch` as a job (message id `{batch_id}/{index}`, so the same
/// item published twice is the same job), or reports its refusal.
async fn fan_out(
    deps: &Deps,
    session: &SessionHandle,
    batch: &Batch,
    index: usize,
    created_at: chrono::DateTime<Utc>,
) -> Result<(), Failure> {
    let plan = &batch.items[index];
    let item = BatchItem { batch_id: batch.id, index: u32::try_from(index).unwrap_or(u32::MAX) };
    match plan {
        ItemPlan::Refused { asset_id, reason } => {
            report(
                deps,
                session,
                &ItemProgress::failed(item, asset_id.clone(), Stage::Parse.as_str(), reason),
            )
            .await
        }
        ItemPlan::Job { body, .. } => {
            let names = &deps.settings.amqp;
            let queue = names.batch_items_queue();
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(format!("{}/{index}", batch.id).into())
                .with_timestamp(u64::try_from(created_at.timestamp()).unwrap_or_default());
            RetryBudget::new(deps.retry_policy())
                .run(|| async {
                    session
                        .publisher
                        .publish(&names.job_exchange, &queue, body, properties.clone(), Routing::Mandatory)
                        .await
                        .map_err(|e| {
                            StageError::transient(Stage::Publish, format!("batch item {index}: {e}"))
                        })
                })
                .await
        }
    }
}

/// Dead-letters a batch message that cannot be taken, with its reason (stage `parse`), then
/// acks it; when the dead letter is not confirmed the delivery is given back.
async fn refuse(deps: &Deps, session: &SessionHandle, delivery: &Delivery, reason: String) {
    tracing::error!(%reason, "batch refused; dead-lettering");
    let failure = Failure { error: StageError::permanent(Stage::Parse, reason), attempts: 1 };
    let envelope = headers::envelope(&delivery.properties);
    let failure_headers = headers::failure_headers(
        delivery.properties.headers().as_ref(),
        delivery.exchange.as_str(),
        delivery.routing_key.as_str(),
        &failure,
        &envelope,
    );
    let properties = copy_properties(&delivery.properties, failure_headers);
    let exchange = &deps.settings.amqp.dead_letter_exchange;
    if copy_job(deps, session, delivery, exchange, delivery.routing_key.as_str(), properties).await {
        ack(delivery).await;
    }
}

/// Returns a delivery whose work failed for now (MongoDB, S3 or the broker out of reach) to its
/// queue after [`RETURN_PAUSE`].
async fn later(delivery: &Delivery, why: &str) {
    tokio::time::sleep(RETURN_PAUSE).await;
    give_back(delivery, why).await;
}

/// Takes one item report: recorded in the batch's document, and when it leaves every item
/// terminal (and the last completion described an earlier state), the manifest uploaded and
/// the completion published; then acked. A report that is not JSON is logged and acked (nothing
/// could ever record it).
pub async fn track(deps: Arc<Deps>, session: SessionHandle, delivery: Delivery) {
    let report: ItemProgress = match serde_json::from_slice(&delivery.data) {
        Ok(report) => report,
        Err(e) => {
            tracing::error!(error = %e, "a batch progress report that is not one; dropped");
            ack(&delivery).await;
            return;
        }
    };
    let span = tracing::info_span!("batch_progress", batch_id = %report.batch_id, index = report.index);
    async move {
        match settle(&deps, &session, &report).await {
            Ok(()) => {
                ack(&delivery).await;
            }
            Err(failure) => later(&delivery, &failure.error.reason).await,
        }
    }
    .instrument(span)
    .await;
}

/// [`track`]'s work: apply the report, then publish every completion that is due.
async fn settle(deps: &Deps, session: &SessionHandle, report: &ItemProgress) -> Result<(), Failure> {
    let batches = deps.catalog.batches();
    let mut budget = RetryBudget::new(deps.retry_policy());
    let Some(counts) = budget.run(|| batches.apply(report)).await? else {
        tracing::warn!("a report for a batch that is not recorded; dropped");
        return Ok(());
    };
    if !counts.completion_due() {
        return Ok(());
    }
    // Another replica may record the same version first: then what it described is read again,
    // and a newer version published if the batch changed since.
    loop {
        let Some(view) = budget.run(|| batches.load(report.batch_id)).await? else { return Ok(()) };
        if !view.counts.completion_due() {
            return Ok(());
        }
        let completion = Completion::new(report.batch_id, view);
        publish_completion(deps, session, &completion).await?;
        let counts = completion.view().counts;
        if budget.run(|| batches.published(report.batch_id, &counts)).await? {
            tracing::info!(version = completion.version, status = counts.status(), "batch completed");
            return Ok(());
        }
    }
}

/// Uploads the manifest files of `completion` and publishes its event on the events exchange
/// (confirmed) and, in the background, to the batch's `reply_to`.
async fn publish_completion(
    deps: &Deps,
    session: &SessionHandle,
    completion: &Completion,
) -> Result<(), Failure> {
    let mut budget = RetryBudget::new(deps.retry_policy());
    let mut files = Vec::with_capacity(2);
    for (ext, content_type, bytes) in
        [("json", "application/json", &completion.json), ("m3u", "audio/x-mpegurl", &completion.m3u)]
    {
        let key = completion.key(ext);
        let (url, url_expires_at) =
            budget.run(|| deps.store.put_bytes(&key, bytes.clone(), content_type)).await?;
        files.push(ManifestFile { key, url, url_expires_at });
    }
    let m3u = files.pop().expect("two files");
    let json = files.pop().expect("two files");
    let event = completion.event(ManifestFiles { json, m3u });
    let body = serde_json::to_vec(&event).expect("events serialize");
    let reply_to = &completion.view().reply_to;
    let mut properties = BasicProperties::default()
        .with_headers(FieldTable::default())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(event.event_id.to_string().into())
        .with_type(COMPLETED_ROUTING_KEY.into())
        .with_app_id("audio-worker".into())
        .with_timestamp(u64::try_from(Utc::now().timestamp()).unwrap_or_default());
    if let Some(correlation_id) = &reply_to.correlation_id {
        properties = properties.with_correlation_id(correlation_id.as_str().into());
    }
    let exchange = &deps.settings.amqp.events_exchange;
    budget
        .run(|| async {
            session
                .publisher
                .publish(exchange, COMPLETED_ROUTING_KEY, &body, properties.clone(), Routing::Mandatory)
                .await
                .map_err(|e| StageError::transient(Stage::Publish, e.to_string()))
        })
        .await?;
    tracing::info!(event_id = %event.event_id, version = event.version, "audio.batch.completed published");
    if let Some(queue) = reply_to.queue.clone() {
        let publisher = session.publisher.clone();
        session.tracker.spawn(
            async move {
                if let Err(e) = publisher.publish("", &queue, &body, properties, Routing::BestEffort).await {
                    tracing::warn!(reply_to = %queue, error = %e, "batch reply not sent; the event stands");
                }
            }
            .in_current_span(),
        );
    }
    Ok(())
}
