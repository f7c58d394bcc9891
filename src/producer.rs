//! The producer side: publish a job the way the audio-generation service does, and optionally
//! wait for its outcome on a `reply_to` queue the way the api-server does. Used by the
//! `publish` command, the demo and the tests.

use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use uuid::Uuid;

use crate::amqp::publisher::{Publisher, Routing};
use crate::amqp::topology;
use crate::config::AmqpSettings;

/// The outcome event a producer waited for.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The message's `type` property: `audio.saved` or `audio.failed` for a job,
    /// `audio.batch.completed` for a batch, `audio.url.refreshed` for a URL refresh.
    pub kind: String,
    /// The event's JSON.
    pub event: serde_json::Value,
}

/// Publishes `body` (a job's JSON) to the job exchange with publisher confirms. With `wait`, a
/// private reply queue is named in `reply_to` with a fresh `correlation_id`, and the first event
/// carrying that id is returned (or an error after `wait`).
///
/// # Errors
/// The broker is unreachable, refuses or does not route the job, or no event came in time.
pub async fn publish(
    settings: &AmqpSettings,
    body: &[u8],
    wait: Option<Duration>,
) -> anyhow::Result<Option<Reply>> {
    publish_to(settings, &settings.job_queue, body, wait).await
}

/// [`publish`] with another routing key on the job exchange: a batch
/// ([`AmqpSettings::batch_queue`]), whose reply is its `audio.batch.completed`, or a URL refresh
/// request ([`AmqpSettings::url_refresh_queue`]), whose reply is `audio.url.refreshed`.
///
/// # Errors
/// The broker is unreachable, refuses or does not route the message, or no reply came in time.
pub async fn publish_to(
    settings: &AmqpSettings,
    routing_key: &str,
    body: &[u8],
    wait: Option<Duration>,
) -> anyhow::Result<Option<Reply>> {
    let (connection, _) = crate::amqp::connect(&settings.nodes, "audio-worker publish", 0).await?;
    let connection = std::sync::Arc::new(connection);
    topology::declare(&connection, settings, &[]).await.context("declaring the topology")?;
    let publisher = Publisher::open(connection.clone(), 1, settings.confirm_timeout).await?;
    let message_id = Uuid::new_v4().to_string();
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(message_id.as_str().into());
    let mut replies = None;
    let correlation_id = Uuid::new_v4().to_string();
    if wait.is_some() {
        let channel = connection.create_channel().await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() },
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
                FieldTable::default(),
            )
            .await?;
        properties = properties
            .with_reply_to(queue.name().clone())
            .with_correlation_id(correlation_id.as_str().into());
        replies = Some((channel, consumer));
    }
    publisher
        .publish(&settings.job_exchange, routing_key, body, properties, Routing::Mandatory)
        .await
        .with_context(|| format!("publishing to {routing_key}"))?;
    let (Some(wait), Some((_channel, mut consumer))) = (wait, replies) else {
        let _ = connection.close(200, "done".into()).await;
        return Ok(None);
    };
    let reply = tokio::time::timeout(wait, async {
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery?;
            let matches = delivery.properties.correlation_id().as_ref().map(|c| c.as_str())
                == Some(correlation_id.as_str());
            if matches {
                let kind =
                    delivery.properties.kind().as_ref().map(|k| k.as_str().to_owned()).unwrap_or_default();
                let event = serde_json::from_slice(&delivery.data).context("the reply is not JSON")?;
                return Ok(Reply { kind, event });
            }
        }
        anyhow::bail!("the reply queue closed")
    })
    .await
    .with_context(|| format!("no event within {} s", wait.as_secs()))??;
    let _ = connection.close(200, "done".into()).await;
    Ok(Some(reply))
}
