//! Logs and traces. Logs go to stderr (text or JSON) so stdout stays for
//! command output (`bootstrap` prints the key there and nothing else).
//! OpenTelemetry traces are exported over OTLP/gRPC only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, honouring the standard `OTEL_*`
//! variables; each RPC continues the caller's W3C `traceparent`.

use crate::server::config::LogFormat;
use opentelemetry::{global, trace::TracerProvider as _};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
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
            .with_filter(EnvFilter::new(format!("info,{}=debug", crate::api::spans::RPC_SPAN_TARGET)))
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
