//! Metrics, in one place: counters of the verification path, RPC counts and
//! latencies, and gauges read at scrape time. One `Metrics` per server,
//! shared by `Arc`, so servers side by side (tests, benchmarks) count apart.
//! Counters are atomics: the hot path pays a relaxed increment per event.
//! Exposed in Prometheus text format by [`serve`] on `TAKUMO_METRICS_LISTEN`.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::{sync::atomic::AtomicU64, time::Duration};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

/// The outcome of a verification, as `Denial::label` (or `valid`) spells it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: &'static str,
}

/// A gateway's answer: which protocol asked (`http` forward-auth or Envoy's
/// `ext_authz`) and what it was told.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabels {
    pub protocol: &'static str,
    pub decision: &'static str,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s: the warm path sits at the bottom, argon2 near 15 ms.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub rpc_requests: Family<RpcLabels, Counter>,
    pub rpc_latency: Family<RpcLabels, Histogram, fn() -> Histogram>,
    /// VerifyKey answers, by code: one family, one series per code seen.
    pub verify_outcomes: Family<CodeLabels, Counter>,
    /// Presentations of a proven key that were refused (disabled, revoked,
    /// expired, insufficient scope, wrong organization), in VerifyKey or as
    /// the credential of a management call. They are not API calls: usage
    /// counts accepted calls only.
    pub key_refusals: Family<CodeLabels, Counter>,
    /// Answers to proxies (forward-auth and ext_authz), by protocol and decision.
    pub gateway_decisions: Family<GatewayLabels, Counter>,
    /// Presented key found in the verified-key cache and fresh.
    pub cache_hits: Counter,
    /// Cached but past the freshness bound: re-read from the store.
    pub cache_refreshes: Counter,
    /// Served from cache although the store could not confirm it (fail static).
    pub cache_stale_served: Counter,
    /// Not cached: store lookup and, if found, argon2.
    pub cache_misses: Counter,
    /// Answered NOT_FOUND from the negative cache.
    pub negative_hits: Counter,
    /// Key rows read by the verification path (lookups and refreshes).
    pub store_key_reads: Counter,
    pub argon2_verifications: Counter,
    /// Argon2 hashes run (new keys, rehashes).
    pub argon2_hashes: Counter,
    /// Queued argon2 jobs skipped because their caller had gone.
    pub argon2_abandoned: Counter,
    /// Verified keys rehashed with the current parameters and pepper.
    pub argon2_rehashes: Counter,
    /// Misses answered from the per-id record cache (no store read).
    pub id_cache_hits: Counter,
    /// Argon2 jobs refused because the queue was full.
    pub argon2_rejected: Counter,
    pub usage_flush_batches: Counter,
    pub usage_flush_rows: Counter,
    pub usage_flush_failures: Counter,
    /// Keys whose cache entries were marked for a re-read by a change notice
    /// or a local change (entries are marked, not dropped: see `cache.rs`).
    pub invalidations: Counter,
    /// Times every cached key was marked for a re-read (listener reconnects).
    pub cache_resets: Counter,
    // Gauges set from their sources just before each scrape.
    pub cache_entries: Gauge,
    pub cache_hit_ratio: Gauge<f64, AtomicU64>,
    pub argon2_queue_depth: Gauge,
    pub usage_flush_lag_seconds: Gauge<f64, AtomicU64>,
    pub usage_pending_keys: Gauge,
    pub db_pool_in_use: Gauge,
    pub db_pool_idle: Gauge,
    /// 1 while change notices from the store flow, 0 while they cannot arrive.
    pub change_notices_flowing: Gauge,
    /// Open `WatchKeyChanges` streams.
    pub change_subscribers: Gauge,
    /// 1 while the primary answers the health probe.
    pub store_primary_up: Gauge,
    /// 1 while the standby (`DATABASE_READ_URL`) answers; 0 also without one.
    pub store_standby_up: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        // Process metrics keep their standard unprefixed names; ours are
        // under `takumo_keys_`.
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("takumo_keys");
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        let rpc_latency = Family::<RpcLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register("rpc_requests", "gRPC requests handled, by method and status code", rpc_requests.clone());
        registry.register(
            "rpc_duration_seconds",
            "Time to handle a gRPC request, by method and status code",
            rpc_latency.clone(),
        );
        let key_refusals = Family::<CodeLabels, Counter>::default();
        registry.register(
            "key_refusals",
            "Presentations of a proven key that were refused (not counted as API calls), by code",
            key_refusals.clone(),
        );
        let gateway_decisions = Family::<GatewayLabels, Counter>::default();
        registry.register(
            "gateway_decisions",
            "Answers to proxies enforcing keys (HTTP forward-auth, Envoy ext_authz), by protocol and decision",
            gateway_decisions.clone(),
        );
        let verify_outcomes = Family::<CodeLabels, Counter>::default();
        registry.register("verify_outcomes", "VerifyKey answers, by code", verify_outcomes.clone());
        let m = Self {
            rpc_requests,
            rpc_latency,
            verify_outcomes,
            key_refusals,
            gateway_decisions,
            cache_hits: Counter::default(),
            cache_refreshes: Counter::default(),
            cache_stale_served: Counter::default(),
            cache_misses: Counter::default(),
            negative_hits: Counter::default(),
            store_key_reads: Counter::default(),
            argon2_verifications: Counter::default(),
            argon2_hashes: Counter::default(),
            argon2_abandoned: Counter::default(),
            argon2_rehashes: Counter::default(),
            id_cache_hits: Counter::default(),
            argon2_rejected: Counter::default(),
            usage_flush_batches: Counter::default(),
            usage_flush_rows: Counter::default(),
            usage_flush_failures: Counter::default(),
            invalidations: Counter::default(),
            cache_resets: Counter::default(),
            cache_entries: Gauge::default(),
            cache_hit_ratio: Gauge::default(),
            argon2_queue_depth: Gauge::default(),
            usage_flush_lag_seconds: Gauge::default(),
            usage_pending_keys: Gauge::default(),
            db_pool_in_use: Gauge::default(),
            db_pool_idle: Gauge::default(),
            change_notices_flowing: Gauge::default(),
            change_subscribers: Gauge::default(),
            store_primary_up: Gauge::default(),
            store_standby_up: Gauge::default(),
            registry: Registry::default(),
        };
        let counters: [(&str, &str, &Counter); 17] = [
            ("cache_hits", "Verifications answered from the verified-key cache", &m.cache_hits),
            ("cache_refreshes", "Cached keys re-read from the store after the freshness bound", &m.cache_refreshes),
            ("cache_stale_served", "Cached keys served while the store could not confirm them", &m.cache_stale_served),
            ("cache_misses", "Verifications that had to look the key up", &m.cache_misses),
            ("negative_cache_hits", "Unknown keys or wrong secrets answered from memory", &m.negative_hits),
            ("store_key_reads", "Key rows read by the verification path", &m.store_key_reads),
            ("argon2_verifications", "Argon2 verifications run", &m.argon2_verifications),
            ("argon2_hashes", "Argon2 hashes run (new keys and rehashes)", &m.argon2_hashes),
            ("argon2_abandoned", "Queued argon2 jobs skipped because their caller had gone", &m.argon2_abandoned),
            ("argon2_rehashes", "Verified keys rehashed with the current parameters and pepper", &m.argon2_rehashes),
            (
                "id_cache_hits",
                "Cache misses answered from the per-id record cache, without a store read",
                &m.id_cache_hits,
            ),
            ("argon2_rejected", "Argon2 jobs refused because the queue was full", &m.argon2_rejected),
            ("usage_flush_batches", "Usage batches written", &m.usage_flush_batches),
            ("usage_flush_rows", "Usage rows (key x minute) written", &m.usage_flush_rows),
            ("usage_flush_failures", "Usage flushes that failed and were kept for retry", &m.usage_flush_failures),
            ("cache_invalidations", "Keys marked for a re-read by change notices or local changes", &m.invalidations),
            (
                "cache_resets",
                "Times every cached key was marked for a re-read after a gap in change notices",
                &m.cache_resets,
            ),
        ];
        for (name, help, c) in counters {
            registry.register(name, help, c.clone());
        }
        let gauges: [(&str, &str, &Gauge); 9] = [
            ("cache_entries", "Verified keys in the cache", &m.cache_entries),
            ("argon2_queue_depth", "Argon2 jobs queued or running", &m.argon2_queue_depth),
            ("usage_pending_keys", "Keys with usage counts not yet written", &m.usage_pending_keys),
            ("db_pool_in_use", "Database connections in use", &m.db_pool_in_use),
            ("db_pool_idle", "Database connections idle", &m.db_pool_idle),
            ("change_notices_flowing", "1 while change notices from the store arrive", &m.change_notices_flowing),
            ("change_subscribers", "Open WatchKeyChanges streams", &m.change_subscribers),
            ("store_primary_up", "1 while the primary database answers the health probe", &m.store_primary_up),
            (
                "store_standby_up",
                "1 while the standby (DATABASE_READ_URL) answers the health probe; 0 also without one",
                &m.store_standby_up,
            ),
        ];
        for (name, help, g) in gauges {
            registry.register(name, help, g.clone());
        }
        registry.register(
            "cache_hit_ratio",
            "Share of key verifications answered from the cache since start",
            m.cache_hit_ratio.clone(),
        );
        registry.register(
            "usage_flush_lag_seconds",
            "Age of the oldest usage count not yet written (0 when none is pending)",
            m.usage_flush_lag_seconds.clone(),
        );
        // Like the cache, start by assuming notices flow: the cache is empty,
        // and the listener's first connect empties it again anyway.
        m.change_notices_flowing.set(1);
        m.store_primary_up.set(1);
        Self { registry: root, ..m }
    }
}

impl Metrics {
    /// Counts one refused presentation of a proven key.
    pub fn refused(&self, code: &'static str) {
        self.key_refusals.get_or_create(&CodeLabels { code }).inc();
    }

    /// Counts one VerifyKey answer.
    pub fn verify_outcome(&self, code: &'static str) {
        self.verify_outcomes.get_or_create(&CodeLabels { code }).inc();
    }

    /// Counts one answer to a proxy.
    pub fn gateway_decision(&self, protocol: &'static str, decision: &'static str) {
        self.gateway_decisions.get_or_create(&GatewayLabels { protocol, decision }).inc();
    }

    /// Counts one handled RPC and its latency.
    pub fn observe_rpc(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        let labels = RpcLabels { method, code: code_name(code) };
        self.rpc_requests.get_or_create(&labels).inc();
        self.rpc_latency.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text format (0.0.4) of every metric, for scrapers and
    /// tools that do not ask for OpenMetrics (`promtool check metrics`, curl).
    pub fn encode_prometheus_text(&self) -> String {
        to_prometheus_text(&self.encode())
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let hits = self.cache_hits.get() as f64;
        let total = hits + self.cache_misses.get() as f64 + self.cache_refreshes.get() as f64;
        self.cache_hit_ratio.set(if total > 0.0 { hits / total } else { 0.0 });
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// OpenMetrics text to the Prometheus text format 0.0.4: a counter family's
/// `# HELP`/`# TYPE` name its `_total` samples (OpenMetrics names the
/// family without the suffix), and the OpenMetrics-only `# UNIT` and
/// `# EOF` lines go. Samples are unchanged.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find(|p| line.starts_with(p));
        match meta {
            Some(prefix) => {
                let rest = &line[prefix.len()..];
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The standard `process_*` metrics of this process (Linux; nothing
/// elsewhere), read from `/proc` at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::{
            encoding::EncodeMetric,
            metrics::{counter::ConstCounter, gauge::ConstGauge},
        };
        let Some(p) = process_stats() else { return Ok(()) };
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges = [
            ("process_resident_memory_bytes", "Resident memory size in bytes", p.resident_bytes),
            ("process_start_time_seconds", "Start time of the process since unix epoch in seconds", p.start_time),
            ("process_open_fds", "Number of open file descriptors", p.open_fds),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: f64,
    start_time: f64,
    open_fds: f64,
}

fn process_stats() -> Option<ProcessStats> {
    // SAFETY: sysconf has no preconditions.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    if ticks <= 0 || page <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command: utime 14, stime 15, starttime 22.
    let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let field = |i: usize| f.get(i)?.parse::<f64>().ok();
    let (utime, stime, start) = (field(11)?, field(12)?, field(19)?);
    let rss_pages: f64 = std::fs::read_to_string("/proc/self/statm").ok()?.split_whitespace().nth(1)?.parse().ok()?;
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as f64).unwrap_or(0.0);
    Some(ProcessStats {
        cpu_seconds: (utime + stime) / ticks as f64,
        resident_bytes: rss_pages * page as f64,
        start_time: boot + start / ticks as f64,
        open_fds,
    })
}

/// gRPC status code names as gRPC's own Prometheus interceptors spell them.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Serves `GET /metrics` until `stop` turns true. `refresh` sets the gauges
/// from their sources first, so a scrape sees current values.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    refresh: std::sync::Arc<dyn Fn() + Send + Sync>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use axum::{
        Router,
        http::{HeaderMap, header},
        routing::get,
    };
    // Content negotiation: OpenMetrics for scrapers that ask for it
    // (Prometheus does), the Prometheus text format for everyone else.
    let app = Router::new().route(
        "/metrics",
        get(move |headers: HeaderMap| {
            let metrics = metrics.clone();
            let refresh = refresh.clone();
            async move {
                refresh();
                let openmetrics = headers
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|a| a.contains("application/openmetrics-text"));
                if openmetrics {
                    (
                        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                        metrics.encode(),
                    )
                } else {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                        metrics.encode_prometheus_text(),
                    )
                }
            }
        }),
    );
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "metrics endpoint failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_counter_metadata_by_their_samples_and_drops_openmetrics_lines() {
        let m = Metrics::default();
        m.verify_outcome("valid");
        m.verify_outcome("malformed");
        let text = m.encode_prometheus_text();
        assert!(text.contains("# HELP takumo_keys_verify_outcomes_total VerifyKey answers"), "{text}");
        assert!(text.contains("# TYPE takumo_keys_verify_outcomes_total counter\n"), "{text}");
        assert!(text.contains("takumo_keys_verify_outcomes_total{code=\"valid\"} 1\n"), "{text}");
        assert!(text.contains("# TYPE takumo_keys_cache_entries gauge\n"), "gauges keep their names: {text}");
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
        // One family per metric: every name has one HELP and one TYPE.
        let helps: Vec<&str> = text.lines().filter(|l| l.starts_with("# HELP ")).collect();
        let mut names: Vec<&str> = helps.iter().map(|l| l.split(' ').nth(2).unwrap()).collect();
        let all = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all, "a metric is declared twice");
        assert!(m.encode().ends_with("# EOF\n"), "OpenMetrics keeps its terminator");
    }

    #[test]
    fn the_process_metrics_are_exposed_without_the_prefix() {
        let text = Metrics::default().encode_prometheus_text();
        for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds"] {
            assert!(text.lines().any(|l| l.starts_with(&format!("{name} "))), "{name} missing: {text}");
        }
    }
}
