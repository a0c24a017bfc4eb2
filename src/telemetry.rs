//! Logs and traces. Logs go to stderr (text or JSON) so stdout stays for
//! command output (`bootstrap` prints the key there and nothing else).
//! OpenTelemetry traces are exported over OTLP/gRPC only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, honouring the standard `OTEL_*`
//! variables; each RPC continues the caller's W3C `traceparent`.

use crate::config::LogFormat;
use opentelemetry::{global, propagation::Extractor, trace::TracerProvider as _};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tonic::codegen::http;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, fmt, prelude::*};

/// Service name in exported traces unless `OTEL_SERVICE_NAME` says otherwise.
pub const SERVICE_NAME: &str = "takumo-keys";

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
#[must_use = "dropping the guard without shutdown() may lose buffered spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("takumo-keys: flushing traces failed: {e}");
        }
    }
}

/// Installs the global subscriber; `RUST_LOG` overrides the `info` default.
pub fn init(format: LogFormat) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt_layer = match format {
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    let provider = otlp_provider();
    // The per-RPC span is DEBUG: logs at the default level skip it (it costs
    // the warm VerifyKey path several allocations), while the exporter, when
    // configured, always receives it.
    let otel_layer = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(SERVICE_NAME))
            .with_filter(EnvFilter::new(format!("info,{}=debug", module_path!())))
    });
    global::set_text_map_propagator(TraceContextPropagator::new());
    let _ = tracing_subscriber::registry().with(fmt_layer.with_filter(filter)).with(otel_layer).try_init();
    if provider.is_some() {
        tracing::info!("exporting traces over OTLP");
    }
    Telemetry { provider }
}

fn otlp_provider() -> Option<SdkTracerProvider> {
    std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|v| !v.is_empty())?;
    // The exporter reads OTEL_EXPORTER_OTLP_* itself (endpoint, headers, timeout).
    let exporter = match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("takumo-keys: OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the OTLP exporter: {e}");
            return None;
        }
    };
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}

/// Reads W3C trace context from HTTP/2 headers (gRPC metadata).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The span of one RPC: method now, organization, key and outcome recorded
/// by the handler as it learns them. Never a secret. A `traceparent` in the
/// request metadata makes it a child of the caller's span.
pub fn rpc_span(req: &http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    let method = path.rsplit('/').next().unwrap_or(path);
    let span = tracing::debug_span!(
        "rpc",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = %method,
        organization_id = Empty,
        key_id = Empty,
        code = Empty,
        rpc.grpc.status_code = Empty,
    );
    let parent = global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(req.headers())));
    // Fails only when no OpenTelemetry layer is installed: nothing to continue then.
    let _ = span.set_parent(parent);
    span
}

/// Records a caller-supplied field on the current RPC span, escaped.
pub fn record(field: &'static str, value: &str) {
    tracing::Span::current().record(field, tracing::field::display(Escaped(value)));
}

/// A caller-supplied string as it may appear in a log line: control and
/// format characters (newlines, bidi overrides, zero-width characters) are
/// written as `\u{…}` escapes, so a value can neither forge a line nor
/// reorder what a reader sees. Plain text is written as it is.
pub struct Escaped<'a>(pub &'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        if self.0.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return f.write_str(self.0);
        }
        for c in self.0.chars() {
            if c.is_control() || crate::validate::is_invisible_format(c) || c == '\\' {
                write!(f, "{}", c.escape_unicode())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Escaped;

    #[test]
    fn logged_fields_escape_control_and_direction_characters() {
        assert_eq!(Escaped("acme").to_string(), "acme");
        assert_eq!(Escaped("Größe 鍵").to_string(), "Größe 鍵");
        assert_eq!(Escaped("a\u{202E}b").to_string(), "a\\u{202e}b");
        assert_eq!(Escaped("a\nb\u{200B}").to_string(), "a\\u{a}b\\u{200b}");
    }
}
