//! Logging: JSON lines on stderr (stdout is for command output such as `publish --wait`), one
//! span per job carrying `asset_id`, `trace_id` and `span_id`. Filtered by `RUST_LOG` (default
//! `info`). Built with `--features otlp` and given `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), the spans are also exported over OTLP/HTTP.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,aws=warn,hyper=warn"));
    let json = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_target(true)
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter).with(json);
    #[cfg(feature = "otlp")]
    let registry = registry.with(otlp::layer());
    registry.init();
}

/// Flushes what the OTLP exporter still holds; a no-op without the `otlp` feature.
pub fn shutdown() {
    #[cfg(feature = "otlp")]
    otlp::shutdown();
}

/// OTLP export of the job spans, continuing the producer's trace.
#[cfg(feature = "otlp")]
pub mod otlp {
    use std::sync::OnceLock;

    use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use crate::amqp::trace_context::TraceContext;

    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

    /// The OpenTelemetry layer, when an OTLP endpoint is configured.
    pub fn layer<S>() -> Option<impl tracing_subscriber::Layer<S>>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let configured = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
        if !configured {
            return None;
        }
        let exporter = match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
            Ok(exporter) => exporter,
            Err(e) => {
                eprintln!("OTLP exporter not started: {e}");
                return None;
            }
        };
        let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).build();
        let tracer = provider.tracer("audio-worker");
        let _ = PROVIDER.set(provider);
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    }

    /// Makes `span` a child of the producer's span (when the job had a `traceparent`) and
    /// takes the exported span's ids into `trace`, so events name the span that was exported.
    pub fn continue_trace(span: &tracing::Span, trace: &mut TraceContext) {
        if PROVIDER.get().is_none() {
            return;
        }
        if let Some(parent) = trace.parent_span_id {
            let state = trace.state.as_deref().and_then(|s| s.parse().ok()).unwrap_or_default();
            let remote = SpanContext::new(trace.trace_id, parent, trace.flags, true, state);
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
        }
        let context = span.context();
        let own = context.span().span_context().clone();
        if own.is_valid() {
            trace.trace_id = own.trace_id();
            trace.span_id = own.span_id();
        }
    }

    /// Exports what is buffered.
    pub fn shutdown() {
        if let Some(provider) = PROVIDER.get() {
            let _ = provider.shutdown();
        }
    }
}
