//! W3C trace context (`traceparent`, `tracestate`) carried from a job to its events.
//!
//! A producer that traces its request puts `traceparent: 00-{trace-id}-{parent-id}-{flags}` in
//! the job message's headers. The worker continues that trace: the job's span records
//! `trace_id` and `parent_span_id` (so every log line of the job carries them), gets a span id of
//! its own, and every event it publishes for the job (`audio.saved`, `audio.failed`, the reply)
//! carries `traceparent: 00-{trace-id}-{the job's span id}-{flags}` and the job's `tracestate`.
//! A job without a valid `traceparent` starts a new trace, so the api-server can still follow
//! events by trace id. With the `otlp` cargo feature the same ids are exported as OTLP spans.

use lapin::types::FieldTable;
use opentelemetry::trace::TraceState;
use opentelemetry::{SpanId, TraceFlags, TraceId};

use super::headers::{header_str, text};

/// Header name of the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// Header name of the W3C vendor trace state.
pub const TRACESTATE: &str = "tracestate";

/// The trace a job belongs to, and its own place in it.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceContext {
    /// The trace: the producer's, or a new one.
    pub trace_id: TraceId,
    /// The producer's span (from `traceparent`); `None` when this job started the trace.
    pub parent_span_id: Option<SpanId>,
    /// This job's span: the parent of its events.
    pub span_id: SpanId,
    /// Sampling flags, carried over (sampled for a new trace).
    pub flags: TraceFlags,
    /// Vendor state, carried over verbatim when it is valid.
    pub state: Option<String>,
}

impl TraceContext {
    /// Reads `traceparent`/`tracestate` from message headers; starts a new trace when they are
    /// missing or invalid (an invalid header is never an error: tracing must not fail a job).
    pub fn from_headers(headers: Option<&FieldTable>) -> Self {
        let span_id = SpanId::from_bytes(fastrand::u64(1..).to_be_bytes());
        match header_str(headers, TRACEPARENT).as_deref().and_then(parse_traceparent) {
            Some((trace_id, parent, flags)) => {
                let state = header_str(headers, TRACESTATE)
                    .filter(|s| s.parse::<TraceState>().is_ok() && !s.trim().is_empty());
                Self { trace_id, parent_span_id: Some(parent), span_id, flags, state }
            }
            None => Self {
                trace_id: TraceId::from_bytes(uuid::Uuid::new_v4().into_bytes()),
                parent_span_id: None,
                span_id,
                flags: TraceFlags::SAMPLED,
                state: None,
            },
        }
    }

    /// `00-{trace-id}-{this job's span id}-{flags}`: the `traceparent` of the job's events.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags.to_u8())
    }

    /// Adds `traceparent` (and `tracestate`) to `headers`.
    pub fn inject(&self, headers: &mut FieldTable) {
        headers.insert(TRACEPARENT.into(), text(self.traceparent()));
        if let Some(state) = &self.state {
            headers.insert(TRACESTATE.into(), text(state.as_str()));
        }
    }
}

/// Parses version 00 of `traceparent`; `None` for anything invalid (an all-zero id included).
/// A later version is read by its first four fields, as the specification asks.
fn parse_traceparent(value: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let lower_hex =
        |s: &str, len: usize| s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !lower_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !lower_hex(trace, 32) || !lower_hex(parent, 16) || !lower_hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
    let parent = SpanId::from_hex(parent).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    Some((trace_id, parent, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (k, v) in pairs {
            table.insert((*k).into(), text(*v));
        }
        table
    }

    #[test]
    fn a_valid_traceparent_is_continued() {
        let h = headers(&[
            (TRACEPARENT, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            (TRACESTATE, "congo=t61rcWkgMzE"),
        ]);
        let ctx = TraceContext::from_headers(Some(&h));
        assert_eq!(ctx.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.parent_span_id.unwrap().to_string(), "00f067aa0ba902b7");
        let parent = ctx.traceparent();
        assert!(parent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{parent}");
        assert!(parent.ends_with("-01"), "{parent}");
        assert_ne!(&parent[36..52], "00f067aa0ba902b7", "the job's own span id");
        let mut out = FieldTable::default();
        ctx.inject(&mut out);
        assert_eq!(header_str(Some(&out), TRACESTATE).as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(header_str(Some(&out), TRACEPARENT), Some(parent));
    }

    #[test]
    fn an_invalid_or_missing_traceparent_starts_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "xyz",
        ] {
            let ctx = TraceContext::from_headers(Some(&headers(&[(TRACEPARENT, bad), (TRACESTATE, "a=b")])));
            assert_eq!(ctx.parent_span_id, None, "{bad:?}");
            assert_ne!(ctx.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736", "{bad:?}");
            assert_eq!(ctx.state, None, "{bad:?}");
        }
        let fresh = TraceContext::from_headers(None);
        assert_ne!(fresh.trace_id, TraceId::INVALID);
        assert!(fresh.traceparent().ends_with("-01"));
        // A later version with extra fields is read by its first four.
        let v1 = headers(&[(TRACEPARENT, "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-future")]);
        assert_eq!(
            TraceContext::from_headers(Some(&v1)).trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }
}
