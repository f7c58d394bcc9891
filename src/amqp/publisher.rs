//! Publishing with publisher confirms: a publish counts only once the broker has confirmed it,
//! and `mandatory` turns an unroutable message into an error instead of a silent drop.

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};

/// Why a publish did not make it.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The channel or connection failed.
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker nacked the message (it could not store it).
    #[error("broker nacked the publish to {exchange:?} with routing key {routing_key:?}")]
    Nacked {
        /// Target exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
    },
    /// No queue is bound for the routing key (the message came back as a `basic.return`).
    #[error(
        "unroutable: no queue bound to exchange {exchange:?} for routing key {routing_key:?} ({reply_code} {reply_text})"
    )]
    Unroutable {
        /// Target exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// AMQP reply code, 312 NO_ROUTE.
        reply_code: u16,
        /// The broker's text.
        reply_text: String,
    },
}

/// A channel in confirm mode. Cheap to clone; publishes from many tasks at once are each
/// confirmed individually.
#[derive(Clone)]
pub struct Publisher {
    /// The confirm-mode channel.
    channel: Channel,
}

impl Publisher {
    /// Opens a channel on `connection` and turns on publisher confirms.
    ///
    /// # Errors
    /// The broker refuses the channel or confirm mode.
    pub async fn open(connection: &Connection) -> lapin::Result<Self> {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Self { channel })
    }

    /// The channel, for declarations.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes `body` with `mandatory` set and waits for the broker's confirm.
    ///
    /// # Errors
    /// [`PublishError`]: the channel failed, the broker nacked, or nothing was routed.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                body,
                properties,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(PublishError::Unroutable {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                    reply_code: returned.reply_code,
                    reply_text: returned.reply_text.as_str().to_owned(),
                })
            }
            Confirmation::Nack(None) => Err(PublishError::Nacked {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            }),
        }
    }
}
