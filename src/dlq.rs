//! Dead-letter operations: list, show, replay and purge the jobs in `audio.save.dlq`.
//!
//! Every operation reads the queue with `basic.get` without acking, so nothing leaves it unless
//! it was chosen: a chosen message is acked only after its copy is confirmed by the broker
//! (replay) or when it is deliberately deleted (purge). The messages left alone are held in a
//! bounded window and returned in reading order, or moved to the back of the queue once the
//! window fills or ages (see [`Scan`]), so the queue keeps its order, memory stays bounded and
//! a run of hours (a slow `--rate`) never meets the broker's `consumer_timeout`. A crash
//! mid-replay can duplicate a job (its copy confirmed, its ack lost), never lose one;
//! duplicates are harmless because `asset_id` is the idempotency key.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::url_policy::UrlPolicy;
use anyhow::Context;
use chrono::{DateTime, Utc};
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::amqp::headers::{
    FailureRecord, HEADER_FAILED_AT, copy_properties, envelope, header_str, replay_headers,
};
use crate::amqp::publisher::{Publisher, Routing};
use crate::amqp::topology;
use crate::config::AmqpSettings;
use crate::error::{ErrorClass, Stage};
use crate::events::AudioFailed;
use crate::job::{Envelope, SaveAudioJob, raw_fingerprint, sniff_asset_id};
use sha2::{Digest, Sha256};

/// A dead-lettered job as an operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// A short id of this dead letter (16 hex digits of the SHA-256 of its body, its
    /// `failed-at` header and its message id), stable across scans: what the console's links
    /// and actions name, since neither `asset_id` nor `message_id` is unique or always present.
    pub key: String,
    /// The message's `message_id` property, if the producer set one.
    pub message_id: Option<String>,
    /// The job's `asset_id`, if the body has one.
    pub asset_id: Option<String>,
    /// The job's `customer_id` as written in the body (any string, shown and filtered on as it
    /// is), if it has one.
    pub customer_id: Option<String>,
    /// The job's `user_id` as written in the body, if it has one.
    pub user_id: Option<String>,
    /// Why and when it failed, from the worker's headers (serialized inline: `stage`,
    /// `error_class`, `reason`, `attempts`, `first_failed_at`, `failed_at`,
    /// `original_routing_key`); all `None` when the broker dead-lettered it.
    #[serde(flatten)]
    pub failure: FailureRecord,
    /// Every header, as text where it is text.
    pub headers: serde_json::Map<String, serde_json::Value>,
    /// The job's body (JSON when it parses, else a lossy string).
    pub job: serde_json::Value,
    /// The body's bytes as dead-lettered.
    #[serde(skip)]
    pub body: Vec<u8>,
    /// Its message id and generation, as the worker read them: with `body`, what rebuilds the
    /// `audio.failed` event the worker published ([`DeadLetter::failed_event`]).
    #[serde(skip)]
    pub envelope: Envelope,
}

impl DeadLetter {
    fn from_message(message: &BasicGetMessage) -> Self {
        let properties = &message.delivery.properties;
        let headers = properties.headers().as_ref();
        let data = &message.delivery.data;
        let job = serde_json::from_slice(data)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(data).into_owned()));
        let mut all = serde_json::Map::new();
        if let Some(table) = headers {
            for (k, v) in table.inner() {
                let value = header_str(headers, k.as_str())
                    .map_or_else(|| serde_json::json!(format!("{v:?}")), Into::into);
                all.insert(k.as_str().to_owned(), value);
            }
        }
        let message_id = properties.message_id().as_ref().map(|m| m.as_str().to_owned());
        let failure = FailureRecord::read(headers);
        let field = |name: &str| job.get(name).and_then(serde_json::Value::as_str).map(str::to_owned);
        Self {
            key: message_key(message),
            customer_id: field("customer_id"),
            user_id: field("user_id"),
            message_id,
            asset_id: sniff_asset_id(data).map(|id| normalize_asset_id(&id)),
            failure,
            headers: all,
            envelope: envelope(properties),
            body: data.to_vec(),
            job,
        }
    }

    /// The `audio.failed` event the worker published when it dead-lettered this job, rebuilt
    /// from the body and the failure headers: the same `event_id` (from the job's fingerprint
    /// and attempts), `occurred_at` taken from `failed-at`. `None` when the headers do not say
    /// the stage, class or reason (the broker dead-lettered the job itself, and no event was
    /// published).
    pub fn failed_event(&self, url_policy: &UrlPolicy) -> Option<AudioFailed> {
        let stage: Stage = self.failure.stage.as_deref()?.parse().ok()?;
        let class = match self.failure.error_class.as_deref()? {
            "transient" => ErrorClass::Transient,
            "permanent" => ErrorClass::Permanent,
            _ => return None,
        };
        let parsed = SaveAudioJob::parse_delivered(&self.body, url_policy, &self.envelope).ok();
        let fingerprint = parsed.as_ref().map_or_else(
            || raw_fingerprint(&self.body, &self.envelope),
            |job| job.provenance.fingerprint.clone(),
        );
        let raw_asset_id = parsed.is_none().then(|| sniff_asset_id(&self.body)).flatten();
        let mut event = AudioFailed::new(
            parsed.as_ref(),
            raw_asset_id,
            &fingerprint,
            stage,
            class,
            self.failure.reason.as_deref()?,
            self.failure.attempts.unwrap_or(0),
        )
        .with_tenant_of(&self.body);
        if let Some(at) = self.failure.failed_at {
            event.occurred_at = at;
        }
        Some(event)
    }

    /// Time since the last failure, if known.
    pub fn age(&self, now: DateTime<Utc>) -> Option<Duration> {
        self.failure.failed_at.and_then(|t| (now - t).to_std().ok())
    }
}

/// [`DeadLetter::key`] of a message read from the queue.
fn message_key(message: &BasicGetMessage) -> String {
    let properties = &message.delivery.properties;
    let failed_at = header_str(properties.headers().as_ref(), HEADER_FAILED_AT);
    let message_id = properties.message_id().as_ref().map(|m| m.as_str());
    dead_letter_key(&message.delivery.data, failed_at.as_deref(), message_id)
}

/// [`DeadLetter::key`]: 16 hex digits of SHA-256 over the body, the `failed-at` header and the
/// message id (each followed by a zero byte).
fn dead_letter_key(body: &[u8], failed_at: Option<&str>, message_id: Option<&str>) -> String {
    let mut hash = Sha256::new();
    for part in [body, failed_at.unwrap_or_default().as_bytes(), message_id.unwrap_or_default().as_bytes()] {
        hash.update(part);
        hash.update([0]);
    }
    hex::encode(&hash.finalize()[..8])
}

/// A UUID in its canonical form (lowercase, hyphenated), as events report it; anything else as
/// it is. `A1B2…`, `{a1b2…}` and `urn:uuid:a1b2…` all name the same asset.
pub fn normalize_asset_id(id: &str) -> String {
    uuid::Uuid::parse_str(id).map_or_else(|_| id.to_owned(), |u| u.to_string())
}

/// Which dead letters an operation applies to; every set condition must hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Exactly this `asset_id`.
    pub asset_id: Option<String>,
    /// Exactly this stage (typed, so a misspelt `--stage` is refused rather than matching
    /// nothing).
    pub stage: Option<Stage>,
    /// The reason contains this text (case-insensitive).
    pub reason_contains: Option<String>,
    /// Failed at least this long ago.
    pub older_than: Option<Duration>,
    /// Failed at most this long ago.
    pub newer_than: Option<Duration>,
    /// Exactly this tenant (`customer_id` in the body).
    pub customer_id: Option<String>,
    /// Exactly this user (`user_id` in the body).
    pub user_id: Option<String>,
    /// Exactly this dead letter ([`DeadLetter::key`]).
    pub key: Option<String>,
}

impl Filter {
    /// Whether `dead` is selected.
    pub fn matches(&self, dead: &DeadLetter, now: DateTime<Utc>) -> bool {
        let eq = |want: &Option<String>, have: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_ref() == Some(w))
        };
        eq(&self.asset_id.as_deref().map(normalize_asset_id), &dead.asset_id)
            && self.stage.is_none_or(|stage| dead.failure.stage.as_deref() == Some(stage.as_str()))
            && self.reason_contains.as_ref().is_none_or(|t| {
                dead.failure.reason.as_ref().is_some_and(|r| r.to_lowercase().contains(&t.to_lowercase()))
            })
            && self.older_than.is_none_or(|min| dead.age(now).is_some_and(|age| age >= min))
            && self.newer_than.is_none_or(|max| dead.age(now).is_some_and(|age| age <= max))
            && eq(&self.customer_id, &dead.customer_id)
            && eq(&self.user_id, &dead.user_id)
            && eq(&self.key, &Some(dead.key.clone()))
    }
}

/// A replay rate from an operator: `10/s` or `10`, between 0.01 and 10000 per second.
///
/// # Errors
/// Anything else, in words.
pub fn parse_rate(raw: &str) -> Result<f64, String> {
    let number = raw.trim().strip_suffix("/s").unwrap_or(raw.trim());
    match number.parse::<f64>() {
        Ok(r) if (0.01..=10_000.0).contains(&r) => Ok(r),
        _ => Err(format!("{raw:?} is not a rate between 0.01/s and 10000/s, like 10/s")),
    }
}

/// What a replay or purge did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Moved back to the job queue (replay) or deleted (purge); for a dry run, would be.
    pub moved: usize,
    /// Not selected by the filter, or past `--limit`: left in place.
    pub skipped: usize,
    /// Selected but left in place: the job no longer parses, or its copy was not confirmed.
    pub failed: usize,
}

/// Options of [`replay`].
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Which messages.
    pub filter: Filter,
    /// At most this many moved.
    pub limit: Option<usize>,
    /// At most this many moved per second.
    pub rate: Option<f64>,
    /// Report only; move nothing.
    pub dry_run: bool,
    /// Cancelled to stop moving (the console's Cancel): the rest is skipped, and the scan still
    /// reads to the end so the queue keeps its order. `None`: runs to the end.
    pub stop: Option<CancellationToken>,
}

/// An open scan of the dead-letter queue, holding a bounded window of unacked messages.
///
/// A message left alone is held unacked ([`Scan::keep`]) until the window is full
/// ([`WINDOW_MESSAGES`], [`WINDOW_BYTES`]) or its oldest message has been held for a third of
/// `AMQP_CONSUMER_TIMEOUT_SECS`; then every held message is *cycled*: published again to the
/// back of the queue (confirmed) and only then acked. So memory stays bounded whatever the
/// queue's depth, and no delivery is ever held long enough for the broker's
/// `consumer_timeout` to close the channel mid-run. Once anything was cycled, the scan reads
/// the queue to the end and cycles the rest too, so the queue keeps its order.
struct Scan {
    connection: Arc<Connection>,
    channel: Channel,
    publisher: Publisher,
    queue: String,
    /// Messages read and left alone, in reading order, with when each was read.
    held: VecDeque<(Instant, BasicGetMessage)>,
    /// Body bytes in `held`.
    held_bytes: usize,
    /// The longest a message is held before the window is cycled.
    max_hold: Duration,
    /// Whether messages were cycled (then the scan must go all the way round).
    cycled: bool,
    /// Messages still to read: the queue's depth when the scan began. A replayed job that fails
    /// again, and every cycled message, comes back behind them and is not read a second time
    /// (otherwise a replay of jobs that keep failing would never end).
    remaining: u32,
}

/// The most messages a scan holds unacked at once.
pub const WINDOW_MESSAGES: usize = 1000;

/// The longest a scan waits for one returned dead letter to be ready again before it returns
/// the next (past it the queue's order may suffer; nothing is lost).
const RETURN_WAIT: Duration = Duration::from_secs(2);

/// The most body bytes a scan holds unacked at once (a dead letter may carry up to the broker's
/// 128 MiB message limit).
pub const WINDOW_BYTES: usize = 64 << 20;

impl Scan {
    async fn open(settings: &AmqpSettings) -> anyhow::Result<Self> {
        let (connection, _) = crate::amqp::connect(&settings.nodes, "audio-worker dlq", 0).await?;
        let connection = Arc::new(connection);
        topology::declare(&connection, settings, &[]).await.context("declaring the topology")?;
        let channel = connection.create_channel().await?;
        let publisher = Publisher::open(connection.clone(), 1, settings.confirm_timeout).await?;
        let queue = settings.dead_letter_queue.clone();
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let remaining = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await?
            .message_count();
        Ok(Self {
            connection,
            channel,
            publisher,
            queue,
            held: VecDeque::new(),
            held_bytes: 0,
            max_hold: settings.consumer_timeout / 3,
            cycled: false,
            remaining,
        })
    }

    /// The next message, unacked: the caller acks it or hands it to [`Scan::keep`]. `None` once
    /// every message present at the start has been read. Cycles the window first when its
    /// oldest message has been held too long.
    async fn next(&mut self) -> anyhow::Result<Option<BasicGetMessage>> {
        if self.held.front().is_some_and(|(read, _)| read.elapsed() >= self.max_hold) {
            self.cycle().await?;
        }
        if self.remaining == 0 {
            return Ok(None);
        }
        self.remaining -= 1;
        let options = BasicGetOptions { no_ack: false };
        Ok(self.channel.basic_get(self.queue.as_str().into(), options).await?)
    }

    /// Leaves `message` in the queue (held, then returned or cycled).
    async fn keep(&mut self, message: BasicGetMessage) -> anyhow::Result<()> {
        let bytes = message.delivery.data.len();
        if self.held.len() + 1 > WINDOW_MESSAGES || self.held_bytes + bytes > WINDOW_BYTES {
            self.cycle().await?;
        }
        self.held_bytes += bytes;
        self.held.push_back((Instant::now(), message));
        Ok(())
    }

    /// Sleeps `pause` (a `--rate` between moves), cycling the window whenever its oldest message
    /// reaches the hold limit meanwhile; returns early when `stop` is cancelled (between
    /// cycles, never inside one).
    async fn wait(&mut self, pause: Duration, stop: Option<&CancellationToken>) -> anyhow::Result<()> {
        let until = Instant::now() + pause;
        let stopped = async {
            match stop {
                Some(stop) => stop.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stopped);
        loop {
            let now = Instant::now();
            let cycle_at = self.held.front().map(|(read, _)| *read + self.max_hold);
            let (sleep_until, then_cycle) = match cycle_at {
                Some(at) if at < until => (at, true),
                _ => (until, false),
            };
            tokio::select! {
                () = tokio::time::sleep(sleep_until.saturating_duration_since(now)) => {}
                () = &mut stopped => return Ok(()),
            }
            if !then_cycle {
                return Ok(());
            }
            self.cycle().await?;
        }
    }

    /// Publishes every held message to the back of the queue, as it is, and acks each once its
    /// copy is confirmed. A crash between the two leaves a duplicate dead letter, never a gap.
    async fn cycle(&mut self) -> anyhow::Result<()> {
        while let Some((_, message)) = self.held.pop_front() {
            self.held_bytes -= message.delivery.data.len();
            let delivery = &message.delivery;
            let headers = delivery.properties.headers().clone().unwrap_or_default();
            let properties = copy_properties(&delivery.properties, headers);
            self.publisher
                .publish("", &self.queue, &delivery.data, properties, Routing::Mandatory)
                .await
                .context("moving a dead letter to the back of the queue")?;
            delivery.ack(BasicAckOptions::default()).await.context("acking a moved dead letter")?;
            self.cycled = true;
        }
        Ok(())
    }

    /// Returns `message` to the queue (`basic.nack` with requeue) and waits, at most
    /// [`RETURN_WAIT`], until the queue counts `ready` messages ready, so the next return cannot
    /// overtake it. False when the nack could not be sent (the channel is gone: what it held
    /// returns when it closes).
    async fn give_back(&self, message: &BasicGetMessage, ready: u32) -> bool {
        let requeue = BasicNackOptions { requeue: true, ..BasicNackOptions::default() };
        if let Err(e) = message.delivery.nack(requeue).await {
            tracing::warn!(error = %e, "returning a dead letter failed; it returns when the channel closes");
            return false;
        }
        let deadline = Instant::now() + RETURN_WAIT;
        while self.ready().await < ready && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }

    /// The messages ready in the queue now (0 when the broker does not answer).
    async fn ready(&self) -> u32 {
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let declared =
            self.channel.queue_declare(self.queue.as_str().into(), passive, FieldTable::default()).await;
        declared.map(|q| q.message_count()).unwrap_or(0)
    }

    /// Ends the scan, the queue in its order: after a cycle, reads the rest and cycles it too;
    /// otherwise returns the held messages one by one in reading order, each waited for, then
    /// moves what arrived during the scan behind them (RabbitMQ 3.10's quorum queues put returned
    /// messages behind the ready ones). Anything not returned explicitly goes back when the
    /// channel closes. After a cycle, dead letters that arrived during the scan stay interleaved
    /// with the cycled ones (nothing lost; their order among themselves is kept).
    async fn close(mut self) -> anyhow::Result<()> {
        if self.cycled {
            while let Some(message) = self.next().await? {
                self.keep(message).await?;
            }
            self.cycle().await?;
        }
        // One return at a time, each waited for until the queue counts it ready: a quorum queue
        // applies returns asynchronously and, when several are in flight, in batches that may
        // put them back out of order (seen on RabbitMQ 3.10: the tail of a window came back
        // reversed). `arrived` is what came in during the scan.
        let arrived = self.ready().await;
        let mut ready = arrived;
        for (_, message) in &self.held {
            ready += 1;
            if !self.give_back(message, ready).await {
                break;
            }
        }
        // RabbitMQ 3.10 puts returned messages behind the ready ones: what arrived during the
        // scan now stands in front of the older dead letters. Moved behind them (each taken and
        // returned in turn), the queue is in its order again. Where the broker returns to the
        // front instead, the first message is the first one held, and nothing needs moving.
        if arrived > 0 && !self.held.is_empty() && !self.cycled {
            let first_held = message_key(&self.held[0].1);
            for i in 0..arrived {
                let options = BasicGetOptions { no_ack: false };
                let Ok(Some(message)) = self.channel.basic_get(self.queue.as_str().into(), options).await
                else {
                    break;
                };
                let in_order = i == 0 && message_key(&message) == first_held;
                if !self.give_back(&message, ready).await || in_order {
                    break;
                }
            }
        }
        let _ = self.channel.close(200, "scan done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
        Ok(())
    }
}

/// Reads the whole queue and returns the first `limit` messages (`None`: all) that `select`
/// picks, in reading order; only those are kept in memory. It never stops early: RabbitMQ may
/// put returned messages behind the ones not yet read, which would reorder the queue.
async fn read(
    settings: &AmqpSettings,
    limit: Option<usize>,
    mut select: impl FnMut(&DeadLetter) -> bool,
) -> anyhow::Result<Vec<DeadLetter>> {
    let mut scan = Scan::open(settings).await?;
    let mut out = Vec::new();
    while let Some(message) = scan.next().await? {
        if limit.is_none_or(|l| out.len() < l) {
            let dead = DeadLetter::from_message(&message);
            if select(&dead) {
                out.push(dead);
            }
        }
        scan.keep(message).await?;
    }
    scan.close().await?;
    Ok(out)
}

/// Up to `limit` dead letters, oldest first; the queue is left as it was.
///
/// # Errors
/// The broker is unreachable.
pub async fn list(settings: &AmqpSettings, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    read(settings, Some(limit), |_| true).await
}

/// The first dead letter whose `asset_id` or `message_id` is `id`; the queue is left as it was.
///
/// # Errors
/// The broker is unreachable.
pub async fn show(settings: &AmqpSettings, id: &str) -> anyhow::Result<Option<DeadLetter>> {
    let asset_id = normalize_asset_id(id);
    let found = read(settings, Some(1), |d| {
        d.asset_id.as_deref() == Some(&asset_id) || d.message_id.as_deref() == Some(id)
    })
    .await?;
    Ok(found.into_iter().next())
}

/// One page of the dead letters a filter selects, and the counts around it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Page {
    /// The selected dead letters `offset..offset + limit`, oldest first.
    pub items: Vec<DeadLetter>,
    /// How many the filter selects in all.
    pub matched: usize,
    /// How many the queue held when the scan began.
    pub total: usize,
}

/// The page `offset..offset + limit` of the dead letters `filter` selects, with the counts; the
/// whole queue is read (as by [`list`]) and left as it was, only the page held in memory.
///
/// # Errors
/// The broker is unreachable.
pub async fn page(
    settings: &AmqpSettings,
    filter: &Filter,
    offset: usize,
    limit: usize,
) -> anyhow::Result<Page> {
    let now = Utc::now();
    let (mut matched, mut total) = (0, 0);
    let items = read(settings, None, |dead| {
        total += 1;
        if !filter.matches(dead, now) {
            return false;
        }
        matched += 1;
        matched > offset && matched <= offset.saturating_add(limit)
    })
    .await?;
    Ok(Page { items, matched, total })
}

/// What [`replay_edited`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edited {
    /// The edited job was published to the job exchange (confirmed), then the dead letter
    /// acked. `message_id` is the new job's (the original's with `/edited-…`, or none).
    Replayed {
        /// The replayed job's message id.
        message_id: Option<String>,
    },
    /// No dead letter has this key (any more): replayed or purged meanwhile.
    NotFound,
    /// `check` refused the edit against the dead letter as found; nothing moved.
    Refused(String),
}

/// Replaces the dead letter `key` by `body` on its way back: `check` sees the dead letter as
/// found and may refuse the edit; otherwise `body` is published to the job exchange (original
/// routing key, replay headers as for [`replay`], correlation id and reply-to kept, a new
/// message id so the edited job has a fingerprint of its own), and only once the broker
/// confirms it is the dead letter acked. Validating `body` itself (contract, URL policy) is the
/// caller's, before.
///
/// # Errors
/// The broker is unreachable, or the copy was not confirmed (the dead letter stays).
pub async fn replay_edited(
    settings: &AmqpSettings,
    key: &str,
    body: &[u8],
    check: impl Fn(&DeadLetter) -> Result<(), String>,
) -> anyhow::Result<Edited> {
    let mut scan = Scan::open(settings).await?;
    let mut result = Edited::NotFound;
    while let Some(message) = scan.next().await? {
        let dead = DeadLetter::from_message(&message);
        if result != Edited::NotFound || dead.key != key {
            scan.keep(message).await?;
            continue;
        }
        if let Err(why) = check(&dead) {
            result = Edited::Refused(why);
            scan.keep(message).await?;
            continue;
        }
        let original = &message.delivery.properties;
        let message_id = original
            .message_id()
            .as_ref()
            .map(|id| format!("{}/edited-{}", id.as_str(), &uuid::Uuid::new_v4().simple().to_string()[..8]));
        let mut properties = replay_properties(original);
        if let Some(id) = &message_id {
            properties = properties.with_message_id(id.as_str().into());
        }
        let routing_key =
            dead.failure.original_routing_key.clone().unwrap_or_else(|| settings.job_queue.clone());
        let published = scan
            .publisher
            .publish(&settings.job_exchange, &routing_key, body, properties, Routing::Mandatory)
            .await;
        if let Err(e) = published {
            scan.keep(message).await?;
            scan.close().await?;
            return Err(e).context("the edited job was not confirmed; the dead letter stays");
        }
        message.delivery.ack(BasicAckOptions::default()).await.context("acking the edited dead letter")?;
        result = Edited::Replayed { message_id };
    }
    scan.close().await?;
    Ok(result)
}

/// Moves the selected dead letters back to the job queue with the attempt counter reset and
/// `message_id`, `correlation_id` and `reply_to` kept. Each copy is confirmed before its dead
/// letter is acked. A job that no longer parses (its `audio_url` under `url_policy` included) is reported and
/// stays.
/// `progress` is called after each message with (messages seen, summary so far).
///
/// # Errors
/// The broker is unreachable.
pub async fn replay(
    settings: &AmqpSettings,
    url_policy: &UrlPolicy,
    options: &ReplayOptions,
    mut progress: impl FnMut(usize, &Summary),
) -> anyhow::Result<Summary> {
    let mut scan = Scan::open(settings).await?;
    let now = Utc::now();
    let mut summary = Summary::default();
    let mut seen = 0;
    let pause = options.rate.filter(|r| *r > 0.0).map(|r| Duration::from_secs_f64(1.0 / r));
    while let Some(message) = scan.next().await? {
        seen += 1;
        let dead = DeadLetter::from_message(&message);
        let stopped = options.stop.as_ref().is_some_and(CancellationToken::is_cancelled);
        let selected =
            !stopped && options.filter.matches(&dead, now) && options.limit.is_none_or(|l| summary.moved < l);
        let moved = if !selected {
            summary.skipped += 1;
            false
        } else if let Err(e) = SaveAudioJob::parse(&message.delivery.data, url_policy) {
            tracing::warn!(asset_id = ?dead.asset_id, error = %e, "not replayed: the job does not parse");
            eprintln!("not replayed ({}): {e}", dead.asset_id.as_deref().unwrap_or("no asset_id"));
            summary.failed += 1;
            false
        } else if options.dry_run {
            summary.moved += 1;
            false
        } else {
            let routing_key =
                dead.failure.original_routing_key.clone().unwrap_or_else(|| settings.job_queue.clone());
            let properties = replay_properties(&message.delivery.properties);
            match scan
                .publisher
                .publish(
                    &settings.job_exchange,
                    &routing_key,
                    &message.delivery.data,
                    properties,
                    Routing::Mandatory,
                )
                .await
            {
                Ok(()) => {
                    summary.moved += 1;
                    true
                }
                Err(e) => {
                    tracing::error!(asset_id = ?dead.asset_id, error = %e, "replay publish not confirmed; the dead letter stays");
                    summary.failed += 1;
                    false
                }
            }
        };
        if moved {
            message
                .delivery
                .ack(BasicAckOptions::default())
                .await
                .context("acking a replayed dead letter")?;
            if let Some(pause) = pause {
                scan.wait(pause, options.stop.as_ref()).await?;
            }
        } else {
            scan.keep(message).await?;
        }
        progress(seen, &summary);
    }
    scan.close().await?;
    Ok(summary)
}

/// Deletes the selected dead letters (at most `limit`).
///
/// # Errors
/// The broker is unreachable.
pub async fn purge(
    settings: &AmqpSettings,
    filter: &Filter,
    limit: Option<usize>,
) -> anyhow::Result<Summary> {
    let mut scan = Scan::open(settings).await?;
    let now = Utc::now();
    let mut summary = Summary::default();
    while let Some(message) = scan.next().await? {
        let dead = DeadLetter::from_message(&message);
        if filter.matches(&dead, now) && limit.is_none_or(|l| summary.moved < l) {
            message.delivery.ack(BasicAckOptions::default()).await?;
            summary.moved += 1;
        } else {
            summary.skipped += 1;
            scan.keep(message).await?;
        }
    }
    scan.close().await?;
    Ok(summary)
}

/// The dead letter's properties for its way back (see [`replay_headers`]); message id,
/// correlation id, reply-to and content type kept.
fn replay_properties(original: &BasicProperties) -> BasicProperties {
    copy_properties(original, replay_headers(original.headers().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::headers::{HEADER_ATTEMPTS, HEADER_DELIVERY, HEADER_REPLAYED_AT, text};

    fn dead(stage: &str, reason: &str, failed_minutes_ago: i64) -> DeadLetter {
        DeadLetter {
            key: "k1".into(),
            message_id: None,
            asset_id: Some("a1".into()),
            customer_id: Some("acme".into()),
            user_id: Some("u1".into()),
            body: Vec::new(),
            envelope: Envelope::default(),
            failure: FailureRecord {
                stage: Some(stage.into()),
                error_class: Some("permanent".into()),
                reason: Some(reason.into()),
                attempts: Some(1),
                first_failed_at: None,
                failed_at: Some(Utc::now() - chrono::Duration::minutes(failed_minutes_ago)),
                original_routing_key: None,
            },
            headers: serde_json::Map::new(),
            job: serde_json::Value::Null,
        }
    }

    #[test]
    fn asset_ids_match_in_any_uuid_spelling() {
        let canonical = "a1000000-0000-4000-8000-00000000000a";
        for spelling in [
            "A1000000-0000-4000-8000-00000000000A",
            "{a1000000-0000-4000-8000-00000000000a}",
            "urn:uuid:a1000000-0000-4000-8000-00000000000a",
            "a1000000000040008000 00000000000a".replace(' ', "").as_str(),
        ] {
            assert_eq!(normalize_asset_id(spelling), canonical, "{spelling}");
        }
        assert_eq!(normalize_asset_id("not-a-uuid"), "not-a-uuid");
        let mut d = dead("download", "x", 1);
        d.asset_id = Some(canonical.into());
        let upper = Filter { asset_id: Some(canonical.to_uppercase()), ..Filter::default() };
        assert!(upper.matches(&d, Utc::now()));
    }

    #[test]
    fn filters_combine() {
        let now = Utc::now();
        let d = dead("download", "GET http://h/temp/x.wav: HTTP 404 Not Found", 30);
        assert!(Filter::default().matches(&d, now));
        assert!(Filter { stage: Some(Stage::Download), ..Filter::default() }.matches(&d, now));
        assert!(!Filter { stage: Some(Stage::Upload), ..Filter::default() }.matches(&d, now));
        assert!(Filter { reason_contains: Some("http 404".into()), ..Filter::default() }.matches(&d, now));
        assert!(Filter { older_than: Some(Duration::from_secs(600)), ..Filter::default() }.matches(&d, now));
        assert!(
            !Filter { older_than: Some(Duration::from_secs(3600)), ..Filter::default() }.matches(&d, now)
        );
        assert!(
            !Filter { asset_id: Some("a2".into()), stage: Some(Stage::Download), ..Filter::default() }
                .matches(&d, now)
        );
        assert!(Filter { newer_than: Some(Duration::from_secs(3600)), ..Filter::default() }.matches(&d, now));
        assert!(!Filter { newer_than: Some(Duration::from_secs(600)), ..Filter::default() }.matches(&d, now));
        assert!(Filter { customer_id: Some("acme".into()), ..Filter::default() }.matches(&d, now));
        assert!(!Filter { customer_id: Some("acme2".into()), ..Filter::default() }.matches(&d, now));
        assert!(
            !Filter { customer_id: Some("acme".into()), user_id: Some("u2".into()), ..Filter::default() }
                .matches(&d, now)
        );
        assert!(Filter { key: Some("k1".into()), ..Filter::default() }.matches(&d, now));
        assert!(!Filter { key: Some("k2".into()), ..Filter::default() }.matches(&d, now));
    }

    #[test]
    fn replayed_properties_reset_the_attempts_and_keep_the_identity() {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_ATTEMPTS.into(), text("4"));
        headers.insert(HEADER_DELIVERY.into(), text("4"));
        headers.insert("x-death".into(), text("broker"));
        headers.insert("tenant-trace".into(), text("kept"));
        let original = BasicProperties::default()
            .with_message_id("m1".into())
            .with_correlation_id("c1".into())
            .with_reply_to("replies".into())
            .with_headers(headers);
        let replayed = replay_properties(&original);
        assert_eq!(replayed.message_id().as_ref().unwrap().as_str(), "m1");
        assert_eq!(replayed.correlation_id().as_ref().unwrap().as_str(), "c1");
        assert_eq!(replayed.reply_to().as_ref().unwrap().as_str(), "replies");
        let h = replayed.headers().as_ref();
        assert_eq!(header_str(h, HEADER_ATTEMPTS), None);
        assert_eq!(header_str(h, HEADER_DELIVERY), None);
        assert_eq!(header_str(h, "x-death"), None);
        assert_eq!(header_str(h, "tenant-trace").as_deref(), Some("kept"));
        assert!(header_str(h, HEADER_REPLAYED_AT).is_some());
    }
}
