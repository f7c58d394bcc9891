//! The queues and exchanges, declared idempotently by every worker at start-up (declaring what
//! exists with the same arguments is a no-op; different arguments fail loudly, which is what we
//! want when two deployments disagree).
//!
//! ```text
//! producer ──► {job_exchange} (direct) ──audio.save──► audio.save (quorum, delivery limit, DLX ─┐)
//!                                                                               │
//! worker ──dead letter──► {dead_letter_exchange} (fanout) ◄─────────────────────┘
//!                                   └──► audio.save.dlq (quorum)
//! worker ──audio.saved / audio.failed──► audio.events (topic) ──► subscribers, reply_to
//! worker ──transient failure──► audio.save.retry.{n} (quorum, per-message TTL)
//!                                   └─ expired ─► {job_exchange} ──audio.save──► audio.save
//! producer ──► {job_exchange} ──audio.save.batch──► audio.save.batch (quorum; batch messages)
//! worker (intake) ──► {job_exchange} ──audio.save.items──► audio.save.items (like audio.save,
//!                                   with delay queues audio.save.items.retry.{n} of its own)
//! worker ──item settled──► audio.save.batch.progress (quorum, default exchange) ──► tracker
//! asker ──► {job_exchange} ──audio.url.refresh──► audio.url.refresh (quorum) ──► reply_to
//! ```
//! Broker-side dead-lettering (delay queues back to the job queue, the job queue to the DLX) is
//! `at-least-once`, so the broker never drops a message between two queues.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use super::headers::text;
use crate::config::AmqpSettings;

/// The name of the delay queue for redelivery `n` (1-based) of a job: `{job_queue}.retry.{n}`.
pub fn delay_queue(names: &AmqpSettings, n: usize) -> String {
    delay_queue_of(&names.job_queue, n)
}

/// The name of the delay queue for redelivery `n` (1-based) of a message of `queue` (the job
/// queue or the batch items queue): `{queue}.retry.{n}`, which sends it back to `queue`, so a
/// retried batch item keeps the batch items' own slots.
pub fn delay_queue_of(queue: &str, n: usize) -> String {
    format!("{queue}.retry.{n}")
}

/// Declares the whole topology on a channel of `connection`, with one delay queue per entry of
/// `retry_schedule` (the delays themselves travel as per-message TTLs, so changing the schedule
/// needs no re-declaration).
///
/// The job queue gets `x-delivery-limit` = `AMQP_DELIVERY_LIMIT` + 2: the worker refuses a job
/// redelivered `AMQP_DELIVERY_LIMIT` times with its own reason, and the broker's limit is only
/// the backstop (a job that kills its worker before the check). A job queue declared earlier
/// with another limit (or none, before this setting existed) is used as it is, with a warning:
/// queue arguments cannot change, but a policy can set `delivery-limit`, and the worker's own
/// check works either way.
///
/// # Errors
/// The broker refuses a declaration (e.g. a queue exists with other arguments).
pub async fn declare(
    connection: &Connection,
    names: &AmqpSettings,
    retry_schedule: &[Duration],
) -> lapin::Result<()> {
    let channel = connection.create_channel().await?;
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    for (exchange, kind) in [
        (&names.job_exchange, ExchangeKind::Direct),
        (&names.dead_letter_exchange, ExchangeKind::Fanout),
        (&names.events_exchange, ExchangeKind::Topic),
    ] {
        channel.exchange_declare(exchange.as_str().into(), kind, durable, FieldTable::default()).await?;
    }

    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), text("quorum"));
    declare_queue(&channel, &names.dead_letter_queue, quorum.clone()).await?;
    bind(&channel, &names.dead_letter_queue, &names.dead_letter_exchange, "").await?;

    // A delivery the broker itself gives up on (delivery limit, rejection) still lands in the
    // dead-letter queue rather than vanishing.
    let mut at_least_once = quorum.clone();
    at_least_once.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    at_least_once.insert("x-overflow".into(), text("reject-publish"));
    let mut jobs = at_least_once.clone();
    jobs.insert("x-dead-letter-exchange".into(), text(names.dead_letter_exchange.clone()));
    let mut limited = jobs.clone();
    let broker_limit = i64::from(names.delivery_limit) + 2;
    limited.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(broker_limit));
    let limited_items = limited.clone();
    let channel = match declare_queue(&channel, &names.job_queue, limited).await {
        Ok(()) => channel,
        Err(e) if e.to_string().contains("x-delivery-limit") => {
            tracing::warn!(
                queue = %names.job_queue,
                error = %e,
                "the job queue exists with another x-delivery-limit; using it as it is (the worker \
                 still refuses a job at AMQP_DELIVERY_LIMIT; set the broker's backstop with a policy: \
                 rabbitmqctl set_policy <name> '^<queue>$' '{{\"delivery-limit\":{broker_limit}}}' \
                 --apply-to quorum_queues)"
            );
            let channel = connection.create_channel().await?;
            // Declared with some other limit, no declaration without it matches either: a
            // passive one checks the queue is there (its other arguments were checked when it
            // was declared with them).
            match declare_queue(&channel, &names.job_queue, jobs.clone()).await {
                Ok(()) => channel,
                Err(e) if e.to_string().contains("x-delivery-limit") => {
                    let channel = connection.create_channel().await?;
                    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
                    channel
                        .queue_declare(names.job_queue.as_str().into(), passive, FieldTable::default())
                        .await?;
                    channel
                }
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    bind(&channel, &names.job_queue, &names.job_exchange, &names.job_queue).await?;
    // Batch items are jobs like the others (same limits, same dead-letter exchange), in a queue
    // of their own so the consumer gives them slots of their own.
    let items = names.batch_items_queue();
    declare_queue(&channel, &items, limited_items.clone()).await?;
    bind(&channel, &items, &names.job_exchange, &items).await?;
    let batches = names.batch_queue();
    // With the job queue's delivery limit too: a batch whose intake kills its worker every time is
    // dead-lettered by the broker instead of looping.
    declare_queue(&channel, &batches, limited_items).await?;
    bind(&channel, &batches, &names.job_exchange, &batches).await?;
    declare_queue(&channel, &names.batch_progress_queue(), at_least_once.clone()).await?;
    declare_queue(&channel, &names.url_refresh_queue, quorum.clone()).await?;
    bind(&channel, &names.url_refresh_queue, &names.job_exchange, &names.url_refresh_queue).await?;

    for home in [names.job_queue.clone(), names.batch_items_queue()] {
        for n in 1..=retry_schedule.len() {
            let mut delay = at_least_once.clone();
            delay.insert("x-dead-letter-exchange".into(), text(names.job_exchange.clone()));
            delay.insert("x-dead-letter-routing-key".into(), text(home.clone()));
            declare_queue(&channel, &delay_queue_of(&home, n), delay).await?;
        }
    }

    if let Some(events_queue) = &names.events_queue {
        declare_queue(&channel, events_queue, quorum).await?;
        bind(&channel, events_queue, &names.events_exchange, "audio.#").await?;
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

async fn declare_queue(channel: &Channel, queue: &str, arguments: FieldTable) -> lapin::Result<()> {
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(queue.into(), durable, arguments).await.map(drop)
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, routing_key: &str) -> lapin::Result<()> {
    let options = QueueBindOptions::default();
    channel
        .queue_bind(queue.into(), exchange.into(), routing_key.into(), options, FieldTable::default())
        .await
}
