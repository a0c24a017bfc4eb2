//! The span of each RPC and what handlers record on it. The span is
//! continued from the caller's W3C `traceparent` when one is sent; exporting
//! it is [`crate::server::telemetry`]'s business.

use opentelemetry::{global, propagation::Extractor};
use tonic::codegen::http;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of [`rpc_span`] (its module path): the trace exporter enables
/// this target at DEBUG, whatever the log level.
pub const RPC_SPAN_TARGET: &str = module_path!();

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
        target: RPC_SPAN_TARGET,
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
            if c.is_control() || crate::domain::validate::is_invisible_format(c) || c == '\\' {
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
