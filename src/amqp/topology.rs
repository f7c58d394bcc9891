//! The queues and exchanges, declared idempotently by every worker at start-up (declaring what
//! exists with the same arguments is a no-op; different arguments fail loudly, which is what we
//! want when two deployments disagree).
//!
//! ```text
//! producer ──► {job_exchange} (direct) ──audio.save──► audio.save (quorum, DLX ─┐)
//!                                                                               │
//! worker ──dead letter──► {dead_letter_exchange} (fanout) ◄─────────────────────┘
//!                                   └──► audio.save.dlq (quorum)
//! worker ──audio.saved / audio.failed──► audio.events (topic) ──► subscribers, reply_to
//! worker ──transient failure──► audio.save.retry.{n} (quorum, per-message TTL)
//!                                   └─ expired ─► {job_exchange} ──audio.save──► audio.save
//! ```
//! Broker-side dead-lettering (delay queues back to the job queue, the job queue to the DLX) is
//! `at-least-once`, so the broker never drops a message between two queues.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};

use super::text;
use crate::config::AmqpSettings;

/// The name of the delay queue for redelivery `n` (1-based): `{job_queue}.retry.{n}`.
pub fn delay_queue(names: &AmqpSettings, n: usize) -> String {
    format!("{}.retry.{n}", names.job_queue)
}

/// Declares the whole topology on `channel`, with one delay queue per entry of `retry_schedule`
/// (the delays themselves travel as per-message TTLs, so changing the schedule needs no
/// re-declaration).
///
/// # Errors
/// The broker refuses a declaration (e.g. a queue exists with other arguments).
pub async fn declare(
    channel: &Channel,
    names: &AmqpSettings,
    retry_schedule: &[Duration],
) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare(
            names.job_exchange.as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            names.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            names.events_exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;

    let queue = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), text("quorum"));
    channel.queue_declare(names.dead_letter_queue.as_str().into(), queue, quorum.clone()).await?;
    channel
        .queue_bind(
            names.dead_letter_queue.as_str().into(),
            names.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    // A delivery the broker itself gives up on (delivery limit, rejection) still lands in the
    // dead-letter queue rather than vanishing.
    let mut at_least_once = quorum.clone();
    at_least_once.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    at_least_once.insert("x-overflow".into(), text("reject-publish"));
    let mut jobs = at_least_once.clone();
    jobs.insert("x-dead-letter-exchange".into(), text(names.dead_letter_exchange.clone()));
    channel.queue_declare(names.job_queue.as_str().into(), queue, jobs).await?;
    channel
        .queue_bind(
            names.job_queue.as_str().into(),
            names.job_exchange.as_str().into(),
            names.job_queue.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    for n in 1..=retry_schedule.len() {
        let mut delay = at_least_once.clone();
        delay.insert("x-dead-letter-exchange".into(), text(names.job_exchange.clone()));
        delay.insert("x-dead-letter-routing-key".into(), text(names.job_queue.clone()));
        channel.queue_declare(delay_queue(names, n).as_str().into(), queue, delay).await?;
    }

    if let Some(events_queue) = &names.events_queue {
        channel.queue_declare(events_queue.as_str().into(), queue, quorum).await?;
        channel
            .queue_bind(
                events_queue.as_str().into(),
                names.events_exchange.as_str().into(),
                "audio.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}
