//! Everything that speaks AMQP: the [`topology`] declared at start-up, the confirming
//! [`publisher`], and the [`consumer`] that turns deliveries into jobs and outcomes into acks.

pub mod consumer;
pub mod publisher;
pub mod topology;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

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
