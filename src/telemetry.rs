//! Telemetry: logs through `tracing`, traces to an OTLP collector.
//!
//! Logs go to stderr (stdout belongs to commands such as `ocsync odm dump`),
//! human-readable by default and one JSON object per line when
//! `LOG_FORMAT=json`. Spans are exported over OTLP/HTTP only when an endpoint
//! is configured; without one no exporter exists and nothing is buffered.
//!
//! Call [`init`] before starting the async runtime: the OTLP exporter runs on
//! its own thread with a blocking HTTP client, which must not be created or
//! dropped inside a runtime. Keep the returned [`Telemetry`] alive until the
//! process ends; dropping it flushes the spans still queued.
//!
//! Fields use dotted names (`cp.id`, `run.id`, `duration_ms`). Clinical values
//! never appear in logs, span fields or errors.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TelemetryConfig};

/// Keeps the trace pipeline alive; flushes it when dropped.
#[must_use = "dropping the guard stops trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("ocsync: flushing traces failed: {e}");
        }
    }
}

/// Installs the global subscriber (and the OTLP pipeline when configured).
pub fn init(config: &TelemetryConfig) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_new(&config.log_filter)?;
    let provider = match &config.otlp_traces_endpoint {
        None => None,
        Some(endpoint) => {
            crate::install_crypto_provider();
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint.as_str())
                .with_headers(Default::default())
                .build()?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(config.service_name.clone())
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    // W3C trace context, so a run's spans can join the request that queued it.
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let otel_layer = provider.as_ref().map(|p| {
        opentelemetry::global::set_tracer_provider(p.clone());
        tracing_opentelemetry::layer().with_tracer(p.tracer("ocsync"))
    });
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    let writer = std::io::stderr;
    match config.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(writer),
            )
            .try_init()?,
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(writer),
            )
            .try_init()?,
    }
    Ok(Telemetry { provider })
}

/// The job metadata key that carries the enqueuing span's trace context
/// (the key apalis's own `opentelemetry` feature uses).
pub const TRACE_CONTEXT_KEY: &str = "apalis_core.tracing.context";

/// The current span's W3C trace context as JSON (`{"traceparent": …}`), to
/// store with a job; `None` when there is no sampled span to link to.
pub fn trace_carrier() -> Option<String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = tracing::Span::current().context();
    let mut carrier = std::collections::HashMap::<String, String>::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    if carrier.is_empty() {
        return None;
    }
    serde_json::to_string(&carrier).ok()
}

/// Makes `span` a child of the context in `carrier` (from
/// [`trace_carrier`]), so a run's spans join the trace of the request that
/// enqueued it. A malformed carrier is ignored: tracing must never fail a run.
pub fn set_parent_from(span: &tracing::Span, carrier: &str) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let Ok(map) = serde_json::from_str::<std::collections::HashMap<String, String>>(carrier) else {
        return;
    };
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&map));
    let _ = span.set_parent(parent);
}
