//! Publishing with publisher confirms: a publish counts only once the broker has confirmed it,
//! and a `mandatory` publish turns an unroutable message into an error instead of a silent drop.
//!
//! The broker sends a `basic.return` before the `basic.ack` of the same publish, but with several
//! publishes in flight on one channel it may cover a routed and a returned publish with one
//! `basic.ack(multiple)`, and a client cannot tell beyond doubt which publish a return belongs to
//! (a confirmed delay-queue copy taken as unroutable forks the job; an unroutable one taken as
//! confirmed loses it). So the publisher is a pool of confirm-mode channels ("lanes"), each with
//! **one publish in flight at a time**: the only publish a return or an ack can belong to is the
//! one waiting on that lane. The pool is as wide as the work that publishes at once (the
//! worker's prefetch), so one lane's round trip does not hold the others up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;

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
    /// No confirm within `AMQP_CONFIRM_TIMEOUT_SECS` (or no channel could be opened in that time).
    /// The message may still have been stored, so a retry can store it twice (at-least-once: the
    /// job may run twice, `asset_id` keeps that idempotent); the lane is closed so that a late
    /// confirm or return cannot be paired with the next publish.
    #[error("no publisher confirm within {} s for the publish to {exchange:?} with routing key {routing_key:?}", timeout.as_secs())]
    NoConfirm {
        /// Target exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// The wait that ran out.
        timeout: Duration,
    },
}

/// Whether an unroutable publish is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// `mandatory`: a message no queue takes comes back and the publish fails
    /// ([`PublishError::Unroutable`]). For events, delay-queue copies, dead letters and replays.
    Mandatory,
    /// Not `mandatory`: the broker drops a message no queue takes and still confirms it. For
    /// replies to a job's `reply_to`, whose waiter may have given up and deleted its queue.
    BestEffort,
}

/// A pool of confirm-mode channels, each carrying one publish at a time (see the module
/// docs). Cheap to clone; publishes from many tasks at once each take a free lane.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where lanes are (re)opened.
    connection: Arc<Connection>,
    /// The lanes; `None` until first used, or after a failure closed the channel.
    lanes: Vec<Mutex<Option<Channel>>>,
    /// Where the search for a free lane starts next, so lanes are used in turn.
    next: AtomicUsize,
    /// `AMQP_CONFIRM_TIMEOUT_SECS`.
    confirm_timeout: Duration,
}

impl Publisher {
    /// A pool of `lanes` (at least 1) confirm-mode channels on `connection`, opened on first use.
    /// Opens the first one now, so a broker that refuses channels or confirm mode is seen at once.
    ///
    /// # Errors
    /// The broker refuses the channel or confirm mode.
    pub async fn open(
        connection: Arc<Connection>,
        lanes: usize,
        confirm_timeout: Duration,
    ) -> lapin::Result<Self> {
        let first = open_lane(&connection).await?;
        let mut pool: Vec<Mutex<Option<Channel>>> = (0..lanes.max(1)).map(|_| Mutex::new(None)).collect();
        pool[0] = Mutex::new(Some(first));
        Ok(Self {
            inner: Arc::new(Inner { connection, lanes: pool, next: AtomicUsize::new(0), confirm_timeout }),
        })
    }

    /// Publishes `body` and waits for the broker's confirm, on a lane of its own.
    ///
    /// # Errors
    /// [`PublishError`]: the channel failed, the broker nacked, nothing was routed (with
    /// [`Routing::Mandatory`]), or no confirm came in time.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        routing: Routing,
    ) -> Result<(), PublishError> {
        let inner = &self.inner;
        let start = inner.next.fetch_add(1, Ordering::Relaxed);
        let n = inner.lanes.len();
        let free = (0..n).find_map(|i| inner.lanes[(start + i) % n].try_lock().ok());
        let mut lane = match free {
            Some(lane) => lane,
            None => inner.lanes[start % n].lock().await,
        };
        let channel = match lane.as_ref().filter(|c| c.status().connected()) {
            Some(channel) => channel.clone(),
            None => {
                let opened = tokio::time::timeout(inner.confirm_timeout, open_lane(&inner.connection)).await;
                let Ok(channel) = opened else {
                    return Err(PublishError::NoConfirm {
                        exchange: exchange.to_owned(),
                        routing_key: routing_key.to_owned(),
                        timeout: inner.confirm_timeout,
                    });
                };
                let channel = channel?;
                *lane = Some(channel.clone());
                channel
            }
        };
        let options = BasicPublishOptions { mandatory: routing == Routing::Mandatory, ..Default::default() };
        let sent = async {
            channel.basic_publish(exchange.into(), routing_key.into(), options, body, properties).await?.await
        };
        let confirm = match tokio::time::timeout(inner.confirm_timeout, sent).await {
            Ok(Ok(confirm)) => confirm,
            Ok(Err(e)) => {
                *lane = None;
                return Err(e.into());
            }
            Err(_) => {
                // A confirm may still come: never on a channel another publish uses.
                *lane = None;
                // Not awaited: a broker that stopped confirming (a memory or disk alarm) may not
                // answer the close either, and the lane is free for a new channel at once.
                tokio::spawn(async move {
                    let _ = channel.close(200, "publisher confirm timed out".into()).await;
                });
                return Err(PublishError::NoConfirm {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                    timeout: inner.confirm_timeout,
                });
            }
        };
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

async fn open_lane(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(channel)
}
