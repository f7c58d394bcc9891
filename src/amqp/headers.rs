//! The worker's AMQP header contract, written and read in one place: which delivery a job is
//! on, why it failed (on delay-queue copies and dead letters), and which properties a copy of
//! a job keeps. The consumer writes these, `dlq` and the tests read them back, and
//! `docs/asyncapi.yaml` describes every one of [`FAILURE_HEADERS`].

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::job::Envelope;
use crate::retry::{Attempt, Failure};

/// The stage that failed (`parse`, `download`, `upload`, `catalog`, `publish`).
pub const HEADER_STAGE: &str = "audio-worker-stage";
/// `transient` (retries exhausted) or `permanent`.
pub const HEADER_ERROR_CLASS: &str = "audio-worker-error-class";
/// The last error, in words (at most [`MAX_REASON_CHARS`]).
pub const HEADER_REASON: &str = "audio-worker-reason";
/// Attempts made so far, all deliveries together.
pub const HEADER_ATTEMPTS: &str = "audio-worker-attempts";
/// Which delivery of the job this is (1 = first); decides the next delay queue. Our own
/// header: `x-death` and client-set `x-` headers are the broker's to change.
pub const HEADER_DELIVERY: &str = "audio-worker-delivery";
/// RFC 3339 time of the first failure (kept across replays).
pub const HEADER_FIRST_FAILED_AT: &str = "audio-worker-first-failed-at";
/// RFC 3339 time of this failure.
pub const HEADER_FAILED_AT: &str = "audio-worker-failed-at";
/// The exchange the job was first published to.
pub const HEADER_ORIGINAL_EXCHANGE: &str = "audio-worker-original-exchange";
/// The routing key the job was first published with: where a replay sends it back.
pub const HEADER_ORIGINAL_ROUTING_KEY: &str = "audio-worker-original-routing-key";
/// Added to a replayed job: when it was replayed (RFC 3339).
pub const HEADER_REPLAYED_AT: &str = "audio-worker-replayed-at";
/// The job's generation (RFC 3339, milliseconds): when its producer published it (the AMQP
/// `timestamp`) or, without one, when a worker first saw it. Set on every copy of a job and
/// kept by replays, so a retried or replayed job keeps its place among the asset's saves.
pub const HEADER_GENERATION: &str = "audio-worker-generation";

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

/// Longest reason kept in a header, in characters (AMQP headers are not the place for
/// megabytes).
pub const MAX_REASON_CHARS: usize = 2000;

/// Reads a header as text, whatever string or integer type the publisher used.
pub fn header_str(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    let value = headers?.inner().get(name)?;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongLongInt(i) => Some(i.to_string()),
        AMQPValue::LongInt(i) => Some(i.to_string()),
        AMQPValue::LongUInt(i) => Some(i.to_string()),
        AMQPValue::ShortInt(i) => Some(i.to_string()),
        AMQPValue::Timestamp(t) => Some(t.to_string()),
        _ => None,
    }
}

/// A long-string header value.
pub fn text(value: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.into()))
}

fn header_u32(headers: Option<&FieldTable>, name: &str) -> Option<u32> {
    header_str(headers, name)?.parse().ok()
}

/// The header a quorum queue sets on a message it delivers again (its consumer's channel closed
/// or it was returned): how many times it was delivered before. Absent on a first delivery.
pub const X_DELIVERY_COUNT: &str = "x-delivery-count";

/// How many times the broker delivered this message before without it being settled
/// ([`X_DELIVERY_COUNT`]; 0 when absent).
pub fn redeliveries(headers: Option<&FieldTable>) -> u32 {
    header_u32(headers, X_DELIVERY_COUNT).unwrap_or(0)
}

/// Which delivery of its job a message is, from [`HEADER_DELIVERY`], [`HEADER_ATTEMPTS`] and
/// [`X_DELIVERY_COUNT`]
/// ([`Attempt::FIRST`] when neither is there: a job fresh from its producer or a replay).
pub fn attempt(headers: Option<&FieldTable>) -> Attempt {
    Attempt {
        delivery: header_u32(headers, HEADER_DELIVERY).unwrap_or(1).max(1),
        prior_attempts: header_u32(headers, HEADER_ATTEMPTS).unwrap_or(0),
        redeliveries: redeliveries(headers),
    }
}

/// What a delivered message says about its job besides the body: `message_id` (when non-empty)
/// and its generation, from [`HEADER_GENERATION`], else the AMQP `timestamp` (seconds), else now
/// (the first time a worker sees it). Always returns a generation, so every copy of the job
/// carries the same one.
pub fn envelope(properties: &BasicProperties) -> Envelope {
    let headers = properties.headers().as_ref();
    let stamped = header_str(headers, HEADER_GENERATION).and_then(|t| t.parse::<DateTime<Utc>>().ok());
    let published = properties
        .timestamp()
        .and_then(|secs| i64::try_from(secs).ok())
        .and_then(|secs| DateTime::<Utc>::from_timestamp(secs, 0));
    Envelope {
        message_id: properties.message_id().as_ref().map(|m| m.as_str().to_owned()).filter(|m| !m.is_empty()),
        generation: Some(stamped.or(published).unwrap_or_else(Utc::now)),
    }
}

/// The headers of a failed job's copy: the original headers plus ours. `first-failed-at` and the
/// original exchange and routing key survive later failures and replays; `exchange` and
/// `routing_key` are where this delivery came from; `envelope`'s generation is stamped as
/// [`HEADER_GENERATION`] when the message did not carry it yet.
pub fn failure_headers(
    original: Option<&FieldTable>,
    exchange: &str,
    routing_key: &str,
    failure: &Failure,
    envelope: &Envelope,
) -> FieldTable {
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    // A copy is a new message: the broker's count of this one's redeliveries must not follow it
    // (a copy delivered for the first time carries no count, so a stale one would be believed).
    let mut headers: FieldTable = original
        .map(|h| {
            let mut table = h.inner().clone();
            table.remove(X_DELIVERY_COUNT);
            table
        })
        .unwrap_or_default()
        .into();
    if let (None, Some(generation)) = (header_str(original, HEADER_GENERATION), envelope.generation) {
        headers
            .insert(HEADER_GENERATION.into(), text(generation.to_rfc3339_opts(SecondsFormat::Millis, true)));
    }
    let reason: String = failure.error.reason.chars().take(MAX_REASON_CHARS).collect();
    headers.insert(HEADER_STAGE.into(), text(failure.error.stage.as_str()));
    headers.insert(HEADER_ERROR_CLASS.into(), text(failure.error.class.as_str()));
    headers.insert(HEADER_REASON.into(), text(reason));
    headers.insert(HEADER_ATTEMPTS.into(), AMQPValue::LongLongInt(i64::from(failure.attempts)));
    headers.insert(HEADER_FAILED_AT.into(), text(now.clone()));
    let first = header_str(original, HEADER_FIRST_FAILED_AT).unwrap_or(now);
    headers.insert(HEADER_FIRST_FAILED_AT.into(), text(first));
    if header_str(original, HEADER_ORIGINAL_ROUTING_KEY).is_none() {
        headers.insert(HEADER_ORIGINAL_EXCHANGE.into(), text(exchange));
        headers.insert(HEADER_ORIGINAL_ROUTING_KEY.into(), text(routing_key));
    }
    headers
}

/// [`failure_headers`] for a copy parked in a delay queue, which comes back as delivery
/// `next_delivery`.
pub fn retry_headers(
    original: Option<&FieldTable>,
    exchange: &str,
    routing_key: &str,
    failure: &Failure,
    envelope: &Envelope,
    next_delivery: u32,
) -> FieldTable {
    let mut headers = failure_headers(original, exchange, routing_key, failure, envelope);
    headers.insert(HEADER_DELIVERY.into(), AMQPValue::LongLongInt(i64::from(next_delivery)));
    headers
}

/// The headers of a replayed dead letter: ours and the broker's `x-` headers removed (a fresh
/// start: attempt counter reset), [`HEADER_REPLAYED_AT`] added, everything else kept.
pub fn replay_headers(original: Option<&FieldTable>) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(old) = original {
        for (k, v) in old.inner() {
            if !k.as_str().starts_with("x-") && !FAILURE_HEADERS.contains(&k.as_str()) {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    headers.insert(HEADER_REPLAYED_AT.into(), text(Utc::now().to_rfc3339()));
    headers
}

/// The failure a dead letter records, read back from its headers; every field is `None` when
/// its header is missing (the broker dead-lettered the job itself, or an older worker did).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct FailureRecord {
    /// [`HEADER_STAGE`].
    pub stage: Option<String>,
    /// [`HEADER_ERROR_CLASS`]: `transient` or `permanent`.
    pub error_class: Option<String>,
    /// [`HEADER_REASON`].
    pub reason: Option<String>,
    /// [`HEADER_ATTEMPTS`], all deliveries together.
    pub attempts: Option<u32>,
    /// [`HEADER_FIRST_FAILED_AT`].
    pub first_failed_at: Option<DateTime<Utc>>,
    /// [`HEADER_FAILED_AT`].
    pub failed_at: Option<DateTime<Utc>>,
    /// [`HEADER_ORIGINAL_ROUTING_KEY`].
    pub original_routing_key: Option<String>,
}

impl FailureRecord {
    /// Reads the worker's failure headers from `headers`.
    pub fn read(headers: Option<&FieldTable>) -> Self {
        let get = |name| header_str(headers, name);
        let time = |name| get(name).and_then(|t| t.parse::<DateTime<Utc>>().ok());
        Self {
            stage: get(HEADER_STAGE),
            error_class: get(HEADER_ERROR_CLASS),
            reason: get(HEADER_REASON),
            attempts: header_u32(headers, HEADER_ATTEMPTS),
            first_failed_at: time(HEADER_FIRST_FAILED_AT),
            failed_at: time(HEADER_FAILED_AT),
            original_routing_key: get(HEADER_ORIGINAL_ROUTING_KEY),
        }
    }
}

/// The job's properties for a copy of it (delay queue, dead letter, replay): persistent, with
/// `headers`, keeping message id, correlation id, reply-to, content type and encoding, priority,
/// timestamp, type and app id. Left out on purpose: `expiration` (a producer's TTL would make
/// the dead letter vanish from the DLQ) and `user_id` (the broker checks it against the
/// connection's user).
pub fn copy_properties(original: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut copy = BasicProperties::default().with_headers(headers).with_delivery_mode(2);
    macro_rules! keep {
        ($($get:ident => $set:ident),*) => {
            $(if let Some(v) = original.$get() {
                copy = copy.$set(v.clone());
            })*
        };
    }
    keep!(content_type => with_content_type, content_encoding => with_content_encoding,
        priority => with_priority, correlation_id => with_correlation_id, reply_to => with_reply_to,
        message_id => with_message_id, timestamp => with_timestamp, kind => with_type, app_id => with_app_id);
    copy
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Stage, StageError};

    #[test]
    fn failure_headers_are_read_back_as_written() {
        let failure =
            Failure { error: StageError::transient(Stage::Upload, "HTTP 503 SlowDown"), attempts: 7 };
        let at: DateTime<Utc> = "2026-03-04T05:06:07.089Z".parse().unwrap();
        let envelope = Envelope { message_id: None, generation: Some(at) };
        let written = retry_headers(None, "jobs", "audio.save", &failure, &envelope, 3);
        let copy = BasicProperties::default().with_headers(written.clone()).with_timestamp(1);
        assert_eq!(self::envelope(&copy).generation, Some(at), "the stamped generation wins");
        let record = FailureRecord::read(Some(&written));
        assert_eq!(record.stage.as_deref(), Some("upload"));
        assert_eq!(record.error_class.as_deref(), Some("transient"));
        assert_eq!(record.reason.as_deref(), Some("HTTP 503 SlowDown"));
        assert_eq!(record.attempts, Some(7));
        assert_eq!(record.original_routing_key.as_deref(), Some("audio.save"));
        assert_eq!(record.first_failed_at, record.failed_at);
        assert_eq!(attempt(Some(&written)), Attempt { delivery: 3, prior_attempts: 7, redeliveries: 0 });
        assert_eq!(attempt(None), Attempt::FIRST);
        // A later failure keeps the first failure's time and the original routing key.
        let mut earlier = written.clone();
        earlier.insert(HEADER_FIRST_FAILED_AT.into(), text("2026-01-01T00:00:00.000Z"));
        let later = Envelope { message_id: None, generation: Some(Utc::now()) };
        let again = failure_headers(Some(&earlier), "", "audio.save.retry.2", &failure, &later);
        assert_eq!(
            header_str(Some(&again), HEADER_GENERATION).as_deref(),
            Some("2026-03-04T05:06:07.089Z"),
            "kept from the first copy"
        );
        let record = FailureRecord::read(Some(&again));
        assert_eq!(record.first_failed_at.unwrap().to_rfc3339(), "2026-01-01T00:00:00+00:00");
        assert_eq!(record.original_routing_key.as_deref(), Some("audio.save"));
    }

    #[test]
    fn the_envelope_takes_the_message_id_and_the_publish_time() {
        let published =
            BasicProperties::default().with_message_id("m-1".into()).with_timestamp(1_700_000_000);
        let envelope = envelope(&published);
        assert_eq!(envelope.message_id.as_deref(), Some("m-1"));
        assert_eq!(envelope.generation.unwrap().timestamp(), 1_700_000_000);
        let bare = self::envelope(&BasicProperties::default().with_message_id("".into()));
        assert_eq!(bare.message_id, None, "an empty message_id is no identity");
        assert!(Utc::now() - bare.generation.unwrap() < chrono::Duration::seconds(5), "first seen now");
    }

    #[test]
    fn long_reasons_are_cut() {
        let failure = Failure { error: StageError::permanent(Stage::Parse, "x".repeat(10_000)), attempts: 1 };
        let headers = failure_headers(None, "", "q", &failure, &Envelope::default());
        assert_eq!(header_str(Some(&headers), HEADER_REASON).unwrap().len(), MAX_REASON_CHARS);
    }

    #[test]
    fn replayed_headers_reset_the_attempts_and_keep_the_rest() {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_ATTEMPTS.into(), text("4"));
        headers.insert(HEADER_DELIVERY.into(), text("4"));
        headers.insert("x-death".into(), text("broker"));
        headers.insert("tenant-trace".into(), text("kept"));
        headers.insert(HEADER_GENERATION.into(), text("2026-03-04T05:06:07.089Z"));
        let h = replay_headers(Some(&headers));
        assert_eq!(header_str(Some(&h), HEADER_GENERATION).as_deref(), Some("2026-03-04T05:06:07.089Z"));
        assert_eq!(header_str(Some(&h), HEADER_ATTEMPTS), None);
        assert_eq!(header_str(Some(&h), HEADER_DELIVERY), None);
        assert_eq!(header_str(Some(&h), "x-death"), None);
        assert_eq!(header_str(Some(&h), "tenant-trace").as_deref(), Some("kept"));
        assert!(header_str(Some(&h), HEADER_REPLAYED_AT).is_some());
        assert_eq!(attempt(Some(&h)), Attempt::FIRST);
    }
}
