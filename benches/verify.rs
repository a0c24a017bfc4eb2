//! VerifyKey load benchmark: "VerifyKey at the speed of an empty RPC".
//!
//! `cargo bench --bench verify [-- FLAGS]` (see `--help`; every flag also has a
//! `TAKUMO_BENCH_*` environment variable). For each backend (SQLite, then
//! PostgreSQL) it starts the release server as a separate process on a free
//! port (argon2 and everything else at the server's defaults), creates keys
//! through the API on the Enterprise plan, and measures:
//!
//! 1. throughput ratios with `h2load -c 8 -m 32 -t 1` (256 in flight), in
//!    alternating rounds: `grpc.health.v1.Health/Check`, the baseline, an RPC
//!    that does nothing; warm `VerifyKey` (a cached workspace-preset key, one
//!    required scope); malformed `VerifyKey` (right length, wrong checksum).
//!    h2load counts an HTTP 200 as success whatever the gRPC status says, so
//!    before each run the same request is sent once with this bench's tonic
//!    client and once with `nghttp` from the same body file, and after it the
//!    server's own outcome counters must account for every success;
//! 2. the same three with this bench's own tonic client, every answer checked:
//!    correctness, and the baseline of the cold ratio;
//! 3. cold `VerifyKey`: `--cold-keys` distinct keys, each verified once (own
//!    client; h2load sends one body per run);
//! 4. an unauthenticated flood: a second h2load sending `ListKeys` with a
//!    forged key (a real key id, a random secret, a valid checksum), plus the
//!    own client's flood of distinct wrong secrets for real ids; meanwhile
//!    warm verifications (against the same client's rate just before) and
//!    first verifications of fresh keys;
//! 5. PostgreSQL only: cross-replica propagation. A second server process on
//!    the same database; a key disabled, revoked or deleted through the first
//!    must stop verifying on the second (whose cache holds it) through
//!    LISTEN/NOTIFY;
//! 6. PostgreSQL only: restart. A load spread over the cold keys, the server
//!    SIGKILLed and started again on the same database; how long after it
//!    answers health the verification rate is back to 0.8× the rate before.
//!
//! Every figure names the client that produced it, and every ratio compares
//! figures of the same client in the same run. The server's CPU time per
//! request is read from /proc as a client-independent figure, and its
//! Prometheus counters (argon2 work, key reads) are scraped around each phase.
//!
//! Results go to stdout and to `docs/performance-results.md`, which this
//! bench owns and rewrites whole (`--docs` elsewhere, `--no-docs` not at all).
//! The analysis is hand-written in `docs/performance.md`; nothing writes it.

mod support;

use support::{
    GrpcTarget, H2load, H2loadRun, PgDatabase, ResultsHeader, bench_command, fmt_dur, fmt_rps, free_addr, grpc_frame,
    interrupted, metric, nghttp_grpc_status, scrape, server_argon2_defaults, write_results,
};

use clap::Parser;
use prost::Message as _;
use std::{
    fmt::Write as _,
    future::Future,
    io::Read as _,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use takumo_keys::proto::pb::{
    self, CreateKeyRequest, DeleteKeyRequest, KeyStatus, ListKeysRequest, RevokeKeyRequest, SetKeyStatusRequest,
    VerifyCode, VerifyKeyRequest, api_key_service_client::ApiKeyServiceClient,
};
use tonic::{
    Code, Request,
    metadata::{AsciiMetadataValue, MetadataValue},
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

const SERVICE_TOKEN: &str = "bench-service-token-0123456789abcdefghijklmnop";
const PG_PEPPER: &str = "bench-pepper-0123456789abcdef";
const ORG: &str = "bench";
const REQUIRED_SCOPE: &str = "fleet.read";
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Key layout: `tk_live_` (8) + id (16) + secret (32) + checksum (6).
const ID_RANGE: std::ops::Range<usize> = 8..24;
const KEY_LEN: usize = 62;
/// The server's background database work, for the statements column.
const HEALTH_PING_EVERY_S: f64 = 2.0;
const USAGE_FLUSH_EVERY_S: f64 = 1.0;

const HEALTH_PATH: &str = "/grpc.health.v1.Health/Check";
const VERIFY_PATH: &str = "/takumo.apikeys.v1.ApiKeyService/VerifyKey";
const LIST_KEYS_PATH: &str = "/takumo.apikeys.v1.ApiKeyService/ListKeys";

// Issue 10's targets.
const WARM_RATIO_TARGET: f64 = 0.85;
const MALFORMED_RATIO_TARGET: f64 = 0.95;
const COLD_RATIO_TARGET: f64 = 0.15;
const COLD_CPU_TARGET: f64 = 10.0;
const FRESH_P99_TARGET: Duration = Duration::from_millis(50);
const FLOODED_WARM_TARGET: f64 = 0.4;
const RESTART_RATE_TARGET: f64 = 0.8;
const RESTART_WITHIN: Duration = Duration::from_secs(5);
/// The restart phase counts answers in buckets this long.
const RESTART_BUCKET: Duration = Duration::from_millis(250);
/// The rate counts as back once this many consecutive buckets reach the target.
const RESTART_SUSTAINED_BUCKETS: usize = 4;

#[derive(Debug, Clone, Parser)]
#[command(name = "verify", about = "VerifyKey load benchmark (cargo bench --bench verify -- FLAGS)")]
struct Opts {
    /// Backends to run, comma-separated: sqlite, postgres.
    #[arg(long, env = "TAKUMO_BENCH_BACKENDS", value_delimiter = ',', default_value = "sqlite,postgres")]
    backends: Vec<Backend>,
    /// Measured seconds per phase (per client, for baseline, warm and malformed).
    #[arg(long, env = "TAKUMO_BENCH_DURATION", default_value_t = 5.0)]
    duration: f64,
    /// Baseline, warm and malformed are measured interleaved in this many rounds
    /// (each phase gets duration / rounds per round), for h2load and the own client alike.
    #[arg(long, env = "TAKUMO_BENCH_ROUNDS", default_value_t = 3)]
    rounds: usize,
    /// Unmeasured warm-up seconds before each timed phase.
    #[arg(long, env = "TAKUMO_BENCH_WARMUP", default_value_t = 1.0)]
    warmup: f64,
    /// Requests in flight of the own client (baseline, warm, malformed, cold, warm under flood, restart).
    #[arg(long, env = "TAKUMO_BENCH_CONCURRENCY", default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the own client spreads them over.
    #[arg(long, env = "TAKUMO_BENCH_CONNECTIONS", default_value_t = 4)]
    connections: usize,
    /// The h2load binary (Debian: `apt-get install -y nghttp2-client`, which also brings `nghttp`).
    #[arg(long, env = "TAKUMO_BENCH_H2LOAD", default_value = "h2load")]
    h2load: PathBuf,
    /// h2load connections (`-c`).
    #[arg(long, env = "TAKUMO_BENCH_H2LOAD_CONNECTIONS", default_value_t = 8)]
    h2load_connections: usize,
    /// h2load concurrent streams per connection (`-m`); in flight = connections × streams.
    #[arg(long, env = "TAKUMO_BENCH_H2LOAD_STREAMS", default_value_t = 32)]
    h2load_streams: usize,
    /// Valid keys the own client's warm phases cycle over (h2load verifies the first).
    #[arg(long, env = "TAKUMO_BENCH_WARM_KEYS", default_value_t = 8)]
    warm_keys: usize,
    /// Distinct keys for the cold phase, each verified exactly once; the restart
    /// phase spreads its load over the same keys.
    #[arg(long, env = "TAKUMO_BENCH_COLD_KEYS", default_value_t = 20_000)]
    cold_keys: usize,
    /// Concurrent CreateKey calls while creating the keys.
    #[arg(long, env = "TAKUMO_BENCH_CREATE_CONCURRENCY", default_value_t = 16)]
    create_concurrency: usize,
    /// Fresh keys verified once each while the flood runs (legitimate first sights).
    #[arg(long, env = "TAKUMO_BENCH_FRESH_KEYS", default_value_t = 200)]
    fresh_keys: usize,
    /// Requests in flight for those first verifications (a low, legitimate rate).
    #[arg(long, env = "TAKUMO_BENCH_FRESH_CONCURRENCY", default_value_t = 4)]
    fresh_concurrency: usize,
    /// Wrong-secret requests the own client's attacking side keeps in flight.
    #[arg(long, env = "TAKUMO_BENCH_FLOOD_CONCURRENCY", default_value_t = 16)]
    flood_concurrency: usize,
    /// HTTP/2 connections of that attacking side (separate from the main client's).
    #[arg(long, env = "TAKUMO_BENCH_FLOOD_CONNECTIONS", default_value_t = 2)]
    flood_connections: usize,
    /// PostgreSQL only: rounds of the cross-replica propagation phase (0 skips it).
    /// Each round creates a key, caches it on a second replica, changes it on the
    /// first (disable, revoke, delete in turn) and times until the second agrees.
    #[arg(long, env = "TAKUMO_BENCH_PROPAGATION_ROUNDS", default_value_t = 30)]
    propagation_rounds: usize,
    /// PostgreSQL only: seconds of load over the cold keys before the server is killed.
    #[arg(long, env = "TAKUMO_BENCH_RESTART_BEFORE", default_value_t = 3.0)]
    restart_before: f64,
    /// PostgreSQL only: seconds the load goes on after the restarted server answers health (0 skips the phase).
    #[arg(long, env = "TAKUMO_BENCH_RESTART_AFTER", default_value_t = 10.0)]
    restart_after: f64,
    /// Tokio worker threads of this load generator.
    #[arg(long, env = "TAKUMO_BENCH_CLIENT_THREADS", default_value_t = 2)]
    client_threads: usize,
    /// PostgreSQL host (a fresh database is created and dropped per run; trust auth).
    #[arg(long, env = "TAKUMO_BENCH_PG_HOST", default_value = "127.0.0.1")]
    pg_host: String,
    #[arg(long, env = "TAKUMO_BENCH_PG_PORT", default_value_t = 5432)]
    pg_port: u16,
    #[arg(long, env = "TAKUMO_BENCH_PG_USER", default_value = "postgres")]
    pg_user: String,
    /// Connect the server straight to PostgreSQL instead of through the bench's
    /// statement-counting proxy (the DB column is then n/a).
    #[arg(long, env = "TAKUMO_BENCH_NO_PG_PROXY")]
    no_pg_proxy: bool,
    /// Server binary; cargo builds it for benches, so the default is the release build.
    #[arg(long, env = "TAKUMO_BENCH_SERVER_BIN", default_value = env!("CARGO_BIN_EXE_takumo-keys"))]
    server_bin: PathBuf,
    /// The results file, rewritten whole on each run.
    #[arg(long, env = "TAKUMO_BENCH_DOCS", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/performance-results.md"))]
    docs: PathBuf,
    /// Print the results only; leave the results file alone.
    #[arg(long, env = "TAKUMO_BENCH_NO_DOCS")]
    no_docs: bool,
    /// Passed by `cargo bench`. Without it (as under `cargo test --all-targets`)
    /// the benchmark does nothing, so that test runs never start it by accident.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn title(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }
}

fn main() {
    let opts = Opts::parse();
    if !opts.bench {
        eprintln!("verify: not run (no --bench); use `cargo bench --bench verify [-- FLAGS]`");
        return;
    }
    assert!(opts.concurrency > 0 && opts.connections > 0, "--concurrency and --connections must be at least 1");
    assert!(opts.warm_keys > 0, "--warm-keys must be at least 1");
    assert!(opts.h2load_connections > 0 && opts.h2load_streams > 0, "h2load needs a connection and a stream");
    support::ensure_server_built(&opts.server_bin);
    let h2load =
        H2load { bin: opts.h2load.clone(), connections: opts.h2load_connections, streams: opts.h2load_streams };
    // Checked before any work: without h2load the run has no throughput ratios.
    let h2load_version = h2load.version().unwrap_or_else(|e| {
        eprintln!("verify: {e}");
        std::process::exit(2);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.client_threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");

    let started = Instant::now();
    let mut reports = Vec::new();
    for &backend in &opts.backends {
        eprintln!("== {}", backend.title());
        // On Ctrl-C or SIGTERM the run is dropped, which stops the server and
        // drops the database before exiting.
        let report = rt.block_on(async {
            tokio::select! {
                r = run_backend(backend, &opts, &h2load) => Some(r),
                () = interrupted() => None,
            }
        });
        let Some(report) = report else {
            eprintln!("interrupted: server stopped");
            std::process::exit(130);
        };
        println!("\n{}", report.section(&opts));
        reports.push(report);
    }
    println!("\n{}", targets_section(&opts, &reports));
    if !opts.no_docs {
        write_results(&opts.docs, &render_results(&opts, &reports, &h2load_version, started.elapsed()));
    }
    eprintln!("total {:.0?}", started.elapsed());
    let failed: Vec<&String> = reports.iter().flat_map(|r| &r.check_failures).collect();
    if !failed.is_empty() {
        eprintln!("\nFAILED: {} h2load check(s) did not hold; those figures are not trustworthy:", failed.len());
        for f in failed {
            eprintln!("  - {f}");
        }
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------
// One backend: server process, keys, phases.

struct BackendReport {
    backend: Backend,
    rows: Vec<Row>,
    notes: Vec<String>,
    /// PostgreSQL with `--propagation-rounds` > 0 only.
    propagation: Option<Propagation>,
    /// PostgreSQL with `--restart-after` > 0 only.
    restart: Option<Restart>,
    /// h2load pre- and post-checks that did not hold, for the exit status.
    check_failures: Vec<String>,
    pg_version: Option<String>,
}

/// Statements the server sent to PostgreSQL during one measured window.
#[derive(Clone, Copy)]
struct DbWindow {
    counts: Counts,
    secs: f64,
}

#[derive(Clone)]
struct Row {
    kind: Phase,
    client: Client,
    label: String,
    in_flight: String,
    stats: Stats,
    /// Server process CPU seconds over the phase.
    server_cpu_s: Option<f64>,
    db: Option<DbWindow>,
    /// The server's own counters over the phase.
    counters: Option<Counters>,
    /// h2load's mean request time (it reports no percentiles).
    mean: Option<Duration>,
    extra: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Baseline,
    Warm,
    Malformed,
    Cold,
    WarmBeforeFlood,
    WarmUnderFlood,
    FreshUnderFlood,
    ForgedFlood,
    WrongSecretFlood,
}

/// Which load generator produced a figure.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Client {
    H2load,
    Own,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::H2load => "h2load",
            Client::Own => "own (tonic)",
        }
    }
}

/// What the phases share: the running server's address and counters, the
/// own client's connections, the service token.
struct Ctx<'a> {
    opts: &'a Opts,
    addr: SocketAddr,
    metrics: SocketAddr,
    channels: Vec<Channel>,
    auth: AsciiMetadataValue,
    cpu: ProcCpu,
    counter: Option<Arc<StatementCounter>>,
    /// Where h2load's body files go.
    dir: PathBuf,
}

/// The keys a run creates (secrets as returned by CreateKey).
struct Keys {
    warm: Vec<String>,
    cold: Vec<String>,
    fresh: Vec<String>,
}

async fn run_backend(backend: Backend, opts: &Opts, h2load: &H2load) -> BackendReport {
    let tmp = tempfile::Builder::new().prefix("takumo-bench-").tempdir().expect("tempdir");
    let mut env: Vec<(String, String)> = vec![("TAKUMO_SERVICE_TOKENS".into(), format!("bench={SERVICE_TOKEN}"))];
    // Declared before the server so that it is dropped (the database dropped) after it.
    let mut pg: Option<PgDatabase> = None;
    match backend {
        Backend::Sqlite => {
            let db = tmp.path().join("keys.db");
            env.push(("DATABASE_URL".into(), format!("sqlite://{}", db.display())));
        }
        Backend::Postgres => {
            let db = PgDatabase::create("takumo_bench", &opts.pg_host, opts.pg_port, &opts.pg_user);
            env.push(("DATABASE_URL".into(), db.url()));
            env.push(("TAKUMO_PEPPER".into(), PG_PEPPER.into()));
            pg = Some(db);
        }
    }
    let pg_version = pg.as_ref().map(|db| db.psql("SHOW server_version"));

    // Bootstrap (migrations, the organization on Enterprise so that 20,000
    // keys fit) talks to the database directly; the server goes through the
    // counting proxy.
    bootstrap(opts, &env);
    let mut counter: Option<Arc<StatementCounter>> = None;
    if let Some(db) = pg.as_ref().filter(|_| !opts.no_pg_proxy) {
        let (proxy_addr, c) = pg_proxy::start(&opts.pg_host, opts.pg_port);
        let url = db.url_via(&proxy_addr.ip().to_string(), proxy_addr.port());
        env.iter_mut().filter(|(k, _)| k == "DATABASE_URL").for_each(|(_, v)| *v = url.clone());
        counter = Some(c);
    }
    let (addr, metrics) = (free_addr(), free_addr());
    env.push(("TAKUMO_LISTEN".into(), addr.to_string()));
    env.push(("TAKUMO_METRICS_LISTEN".into(), metrics.to_string()));
    let mut server = Server::start(opts, &env, &tmp.path().join("server.log"));
    server.wait_ready(addr).await;
    eprintln!("server pid {} on {addr} (metrics {metrics})", server.pid());

    let ctx = Ctx {
        opts,
        addr,
        metrics,
        channels: connect(addr, opts.connections).await,
        auth: format!("Bearer {SERVICE_TOKEN}").parse().expect("ascii"),
        cpu: ProcCpu::new(server.pid()),
        counter,
        dir: tmp.path().to_owned(),
    };
    let mut notes = Vec::new();
    let keys = create_all_keys(&ctx, &mut notes).await;
    let mut rows = Vec::new();
    let mut check_failures = Vec::new();

    rows.extend(own_client_rounds(&ctx, &keys, &mut notes).await);
    eprintln!("own client: baseline, warm, malformed done");
    rows.extend(h2load_rounds(&ctx, h2load, &keys, &mut check_failures).await);
    eprintln!("h2load: baseline, warm, malformed done");
    if !keys.cold.is_empty() {
        rows.push(cold_phase(&ctx, &keys.cold).await);
        eprintln!("cold done");
    }
    rows.extend(flood_phase(&ctx, h2load, &keys, &mut check_failures).await);
    eprintln!("flood done");

    // (f) Cross-replica propagation: a second server process on the same
    // database (same environment, its own ports). Started only now, so that its
    // background work stays out of the measured windows above; killed on drop
    // like the first, panics and interrupts included.
    let mut propagation = None;
    if backend == Backend::Postgres && opts.propagation_rounds > 0 {
        let (addr_b, metrics_b) = (free_addr(), free_addr());
        let mut env_b = env.clone();
        for (k, v) in env_b.iter_mut() {
            match k.as_str() {
                "TAKUMO_LISTEN" => *v = addr_b.to_string(),
                "TAKUMO_METRICS_LISTEN" => *v = metrics_b.to_string(),
                _ => {}
            }
        }
        let server_b = Server::start(opts, &env_b, &tmp.path().join("server-b.log"));
        server_b.wait_ready(addr_b).await;
        eprintln!("replica B: server pid {} on {addr_b}", server_b.pid());
        let channel_b = connect(addr_b, 1).await.remove(0);
        let mut p = run_propagation(ctx.channels[0].clone(), channel_b, &ctx.auth, opts.propagation_rounds).await;
        let log_b = server_b.stop();
        if let Some(w) = warnings(&log_b) {
            p.notes.push(format!("replica B logged warnings/errors, e.g. {w}"));
        }
        eprintln!("propagation done ({} rounds, {} failed)", p.rounds.len(), p.failed());
        propagation = Some(p);
    }

    // (g) Restart, last: it replaces the server process.
    let mut restart = None;
    if backend == Backend::Postgres && opts.restart_after > 0.0 && !keys.cold.is_empty() {
        let r = restart_phase(&ctx, &mut server, &env, &keys.cold).await;
        eprintln!("restart done: {}", r.summary());
        restart = Some(r);
    }

    let log = server.stop();
    if ctx.counter.as_ref().is_some_and(|c| c.opaque.load(Ordering::Relaxed) > 0) {
        notes.push("some PostgreSQL connections negotiated TLS/GSS, so their statements were not counted".into());
    }
    if let Some(w) = warnings(&log) {
        notes.push(format!("server logged warnings/errors, e.g. {w}"));
    }
    for r in &rows {
        for e in &r.stats.first_errors {
            notes.push(format!("{} ({}): {e}", r.label, r.client.name()));
        }
    }
    drop(pg);
    BackendReport { backend, rows, notes, propagation, restart, check_failures, pg_version }
}

/// Warm keys, cold keys and fresh keys, created concurrently through CreateKey.
async fn create_all_keys(ctx: &Ctx<'_>, notes: &mut Vec<String>) -> Keys {
    let opts = ctx.opts;
    let t = Instant::now();
    let create = |n: usize, tag: &'static str| create_keys(&ctx.channels, &ctx.auth, n, opts.create_concurrency, tag);
    let keys = Keys {
        warm: create(opts.warm_keys, "warm").await,
        cold: create(opts.cold_keys, "cold").await,
        fresh: create(opts.fresh_keys, "fresh").await,
    };
    let n = keys.warm.len() + keys.cold.len() + keys.fresh.len();
    let secs = t.elapsed().as_secs_f64();
    eprintln!("created {n} keys in {secs:.1} s");
    notes.push(format!(
        "setup: {n} keys created through `CreateKey` ({} concurrent, own client) in {secs:.1} s, {} keys/s",
        opts.create_concurrency,
        fmt_rps(n as f64 / secs.max(1e-9))
    ));
    keys
}

/// Up to three WARN/ERROR lines of a server log, quoted, if there are any.
fn warnings(log: &str) -> Option<String> {
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ") || l.contains(" WARN ")).take(3).collect();
    (!lines.is_empty()).then(|| format!("`{}`", lines.join("` / `")))
}

fn verify_req(key: &str) -> VerifyKeyRequest {
    VerifyKeyRequest { key: key.to_owned(), required_scopes: vec![REQUIRED_SCOPE.to_owned()], organization_id: None }
}

/// `key` with its checksum replaced by a wrong one: the right length and
/// alphabet, refused at the checksum (no store, no argon2).
fn with_wrong_checksum(key: &str) -> String {
    let body = &key[..KEY_LEN - 6];
    let wrong = if &key[KEY_LEN - 6..] == "000000" { "000001" } else { "000000" };
    format!("{body}{wrong}")
}

/// An attacker's guess: `tk_live_` + a real key id + a random 32-character
/// secret + the valid checksum, so it passes every cheap check.
fn forged_key(id: &str, rng: &mut impl rand::Rng) -> String {
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str("tk_live_");
    key.push_str(id);
    for _ in 0..32 {
        key.push(BASE62[rng.random_range(0..62)] as char);
    }
    let sum = checksum(&key);
    key.push_str(&sum);
    key
}

/// Runs `concurrency` jobs made by `make` for `dur`.
async fn run_for<J: Job>(concurrency: usize, dur: Duration, make: impl Fn(usize) -> J) -> Stats {
    if dur.is_zero() {
        return Stats::default();
    }
    run_jobs((0..concurrency).map(make).collect(), Some(Instant::now() + dur), None).await
}

// ---------------------------------------------------------------------------
// Measuring a window: server CPU, PostgreSQL statements, server counters.

/// The server's Prometheus counters the report uses.
#[derive(Clone, Copy, Default)]
struct Counters {
    argon2_verifications: Option<f64>,
    argon2_hashes: Option<f64>,
    /// Exported once the server rehashes keys on verification.
    argon2_rehashes: Option<f64>,
    key_reads: Option<f64>,
    valid: f64,
    malformed: f64,
    /// VerifyKey answered with any gRPC status but OK.
    verify_not_ok: f64,
    list_keys_unauthenticated: f64,
}

impl Counters {
    fn scrape(addr: SocketAddr) -> Option<Counters> {
        let t = scrape(addr).ok()?;
        let all = |name: &str, filter: &[&str]| metric(&t, name, filter).unwrap_or(0.0);
        let verify = ["method=\"VerifyKey\""];
        Some(Counters {
            argon2_verifications: metric(&t, "takumo_keys_argon2_verifications_total", &[]),
            argon2_hashes: metric(&t, "takumo_keys_argon2_hashes_total", &[]),
            argon2_rehashes: metric(&t, "takumo_keys_argon2_rehashes_total", &[]),
            key_reads: metric(&t, "takumo_keys_store_key_reads_total", &[]),
            valid: all("takumo_keys_verify_outcomes_total", &["code=\"valid\""]),
            malformed: all("takumo_keys_verify_outcomes_total", &["code=\"malformed\""]),
            verify_not_ok: all("takumo_keys_rpc_requests_total", &verify)
                - all("takumo_keys_rpc_requests_total", &[verify[0], "code=\"OK\""]),
            list_keys_unauthenticated: all(
                "takumo_keys_rpc_requests_total",
                &["method=\"ListKeys\"", "code=\"Unauthenticated\""],
            ),
        })
    }

    fn minus(&self, o: &Counters) -> Counters {
        let d = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        Counters {
            argon2_verifications: d(self.argon2_verifications, o.argon2_verifications),
            argon2_hashes: d(self.argon2_hashes, o.argon2_hashes),
            argon2_rehashes: d(self.argon2_rehashes, o.argon2_rehashes),
            key_reads: d(self.key_reads, o.key_reads),
            valid: self.valid - o.valid,
            malformed: self.malformed - o.malformed,
            verify_not_ok: self.verify_not_ok - o.verify_not_ok,
            list_keys_unauthenticated: self.list_keys_unauthenticated - o.list_keys_unauthenticated,
        }
    }

    fn plus(&self, o: &Counters) -> Counters {
        let s = |a: Option<f64>, b: Option<f64>| Some(a? + b?);
        Counters {
            argon2_verifications: s(self.argon2_verifications, o.argon2_verifications),
            argon2_hashes: s(self.argon2_hashes, o.argon2_hashes),
            argon2_rehashes: s(self.argon2_rehashes, o.argon2_rehashes),
            key_reads: s(self.key_reads, o.key_reads),
            valid: self.valid + o.valid,
            malformed: self.malformed + o.malformed,
            verify_not_ok: self.verify_not_ok + o.verify_not_ok,
            list_keys_unauthenticated: self.list_keys_unauthenticated + o.list_keys_unauthenticated,
        }
    }
}

/// The start of a measured window.
struct Mark {
    cpu: Option<f64>,
    db: Option<Counts>,
    counters: Option<Counters>,
    at: Instant,
}

impl Ctx<'_> {
    fn mark(&self) -> Mark {
        // Counters first, so that the scrape's own CPU falls outside the window.
        let counters = Counters::scrape(self.metrics);
        Mark { cpu: self.cpu.seconds(), db: self.counter.as_ref().map(|c| c.snapshot()), counters, at: Instant::now() }
    }

    /// What happened on the server since `m`, around `stats`.
    fn since(&self, m: Mark, stats: Stats) -> Measured {
        let cpu = self.cpu.since(m.cpu);
        let db = self
            .counter
            .as_ref()
            .zip(m.db)
            .map(|(c, c0)| DbWindow { counts: c.snapshot().minus(&c0), secs: m.at.elapsed().as_secs_f64() });
        let counters = m.counters.and_then(|c0| Some(Counters::scrape(self.metrics)?.minus(&c0)));
        Measured { stats, server_cpu_s: cpu, db, counters, h2load: None }
    }

    /// Runs `concurrency` own-client jobs for `dur` and measures the window.
    async fn measure<J: Job>(&self, concurrency: usize, dur: Duration, make: impl Fn(usize) -> J) -> Measured {
        let m = self.mark();
        let stats = run_for(concurrency, dur, make).await;
        self.since(m, stats)
    }

    /// Runs own-client jobs until they run out of work and measures the window.
    async fn measure_jobs<J: Job>(&self, jobs: Vec<J>) -> Measured {
        let m = self.mark();
        let stats = run_jobs(jobs, None, None).await;
        self.since(m, stats)
    }

    fn health(&self, i: usize) -> HealthJob {
        HealthJob { client: HealthClient::new(self.channels[i % self.channels.len()].clone()) }
    }

    fn verify_job(&self, i: usize, reqs: &Arc<[VerifyKeyRequest]>, expect: Expect) -> VerifyJob {
        VerifyJob {
            client: ApiKeyServiceClient::new(self.channels[i % self.channels.len()].clone()),
            auth: self.auth.clone(),
            reqs: reqs.clone(),
            next: i,
            expect,
        }
    }

    /// Jobs that verify each of `reqs` exactly once between them.
    fn once_each(&self, concurrency: usize, reqs: Arc<[VerifyKeyRequest]>) -> Vec<ColdJob> {
        let next = Arc::new(AtomicUsize::new(0));
        (0..concurrency.max(1))
            .map(|i| ColdJob {
                client: ApiKeyServiceClient::new(self.channels[i % self.channels.len()].clone()),
                auth: self.auth.clone(),
                reqs: reqs.clone(),
                next: next.clone(),
            })
            .collect()
    }
}

/// Sums of the slices of one phase.
#[derive(Default)]
struct Measured {
    stats: Stats,
    server_cpu_s: Option<f64>,
    db: Option<DbWindow>,
    counters: Option<Counters>,
    /// h2load phases: what it reported, summed.
    h2load: Option<H2loadRun>,
}

impl Measured {
    fn add(&mut self, m: Measured) {
        self.stats.merge(m.stats);
        self.server_cpu_s = match (self.server_cpu_s, m.server_cpu_s) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.db = match (self.db, m.db) {
            (Some(a), Some(b)) => Some(DbWindow { counts: a.counts.plus(&b.counts), secs: a.secs + b.secs }),
            (a, b) => a.or(b),
        };
        self.counters = match (self.counters, m.counters) {
            (Some(a), Some(b)) => Some(a.plus(&b)),
            (a, b) => a.or(b),
        };
        self.h2load = match (self.h2load.take(), m.h2load) {
            (Some(mut a), Some(b)) => {
                a.merge(&b);
                Some(a)
            }
            (a, b) => a.or(b),
        };
    }

    fn row(self, kind: Phase, client: Client, label: &str, in_flight: String) -> Row {
        Row {
            kind,
            client,
            label: label.to_owned(),
            in_flight,
            stats: self.stats,
            server_cpu_s: self.server_cpu_s,
            db: self.db,
            counters: self.counters,
            mean: self.h2load.as_ref().filter(|r| r.succeeded > 0).map(|r| Duration::from_secs_f64(r.mean_us / 1e6)),
            extra: String::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// Phases.

/// Baseline, warm and malformed with the own client, interleaved in rounds of
/// a slice each, so that drifting machine load hits all three alike.
async fn own_client_rounds(ctx: &Ctx<'_>, keys: &Keys, notes: &mut Vec<String>) -> Vec<Row> {
    let opts = ctx.opts;
    let c = opts.concurrency;
    let warm_reqs: Arc<[VerifyKeyRequest]> = keys.warm.iter().map(|k| verify_req(k)).collect();
    let malformed_reqs = malformed_requests(&keys.warm[0]);
    let warm = |i: usize| ctx.verify_job(i, &warm_reqs, Expect::Valid);
    let malformed = |i: usize| ctx.verify_job(i, &malformed_reqs, Expect::Code(VerifyCode::Malformed));
    let health = |i: usize| ctx.health(i);

    // Warm-up: every warm key once (first sight), then each load for the warm-up time.
    for k in &keys.warm {
        let mut j = warm(0);
        j.reqs = Arc::new([verify_req(k)]);
        if let Some(Outcome::Error(e)) = j.call().await {
            eprintln!("warning: warm-up verify failed: {e}");
        }
    }
    let warmup = Duration::from_secs_f64(opts.warmup);
    run_for(c, warmup, health).await;
    run_for(c, warmup, warm).await;
    run_for(c, warmup, malformed).await;

    let rounds = opts.rounds.max(1);
    let slice = Duration::from_secs_f64(opts.duration) / rounds as u32;
    let (mut base_m, mut warm_m, mut bad_m) = (Measured::default(), Measured::default(), Measured::default());
    let me = ProcCpu::new(std::process::id());
    let (sys0, srv0, me0, t0) = (sys_busy_seconds(), ctx.cpu.seconds(), me.seconds(), Instant::now());
    for _ in 0..rounds {
        base_m.add(ctx.measure(c, slice, health).await);
        warm_m.add(ctx.measure(c, slice, warm).await);
        bad_m.add(ctx.measure(c, slice, malformed).await);
    }
    // CPU used by anything but the server and this bench (PostgreSQL included) while measuring.
    let others = (|| {
        let busy = sys_busy_seconds()? - sys0?;
        let ours = (ctx.cpu.seconds()? - srv0?) + (me.seconds()? - me0?);
        Some(((busy - ours) / t0.elapsed().as_secs_f64()).max(0.0))
    })();
    if let Some(o) = others {
        let flag = if o > 0.25 { " — **noisy: compare with care**" } else { "" };
        notes.push(format!(
            "other processes used {o:.2} CPUs on average while the own client measured baseline, warm and \
             malformed{flag}"
        ));
    }
    let n = keys.warm.len();
    vec![
        base_m.row(Phase::Baseline, Client::Own, "health baseline (`Health/Check`)", c.to_string()),
        warm_m.row(Phase::Warm, Client::Own, &format!("warm verify ({n} keys)"), c.to_string()),
        bad_m.row(Phase::Malformed, Client::Own, "malformed verify (4 kinds)", c.to_string()),
    ]
}

fn malformed_requests(key: &str) -> Arc<[VerifyKeyRequest]> {
    [
        "tk_live_notakey".to_owned(),
        "not-a-key-at-all".to_owned(),
        // Right shape and alphabet, wrong checksum.
        with_wrong_checksum(key),
        format!("tk_test_{}", "x".repeat(KEY_LEN - 8)),
    ]
    .iter()
    .map(|k| verify_req(k))
    .collect()
}

/// A call h2load repeats, and what its answer must be.
struct H2Call {
    kind: Phase,
    target: GrpcTarget,
    expect: H2Expect,
}

#[derive(Clone)]
enum H2Expect {
    Serving,
    Verify(VerifyKeyRequest, Expect),
    Unauthenticated(ListKeysRequest),
}

impl H2Call {
    fn health(ctx: &Ctx<'_>) -> H2Call {
        let msg = HealthCheckRequest { service: String::new() };
        let target =
            GrpcTarget::new(ctx.addr, HEALTH_PATH, bearer(&ctx.auth), &grpc_frame(&msg), &ctx.dir, "health.bin");
        H2Call { kind: Phase::Baseline, target, expect: H2Expect::Serving }
    }

    fn verify(ctx: &Ctx<'_>, kind: Phase, key: &str, expect: Expect, file: &str) -> H2Call {
        let msg = verify_req(key);
        let target = GrpcTarget::new(ctx.addr, VERIFY_PATH, bearer(&ctx.auth), &grpc_frame(&msg), &ctx.dir, file);
        H2Call { kind, target, expect: H2Expect::Verify(msg, expect) }
    }

    /// A management call presenting a forged key as its credential.
    fn forged_list_keys(ctx: &Ctx<'_>, forged: &str) -> H2Call {
        let msg = ListKeysRequest::default();
        let auth = format!("Bearer {forged}");
        let target = GrpcTarget::new(ctx.addr, LIST_KEYS_PATH, &auth, &grpc_frame(&msg), &ctx.dir, "forged.bin");
        H2Call { kind: Phase::ForgedFlood, target, expect: H2Expect::Unauthenticated(msg) }
    }

    /// The gRPC status the answer must carry.
    fn grpc_status(&self) -> Code {
        match self.expect {
            H2Expect::Unauthenticated(_) => Code::Unauthenticated,
            _ => Code::Ok,
        }
    }

    /// Before h2load runs it: the same request through the own tonic client
    /// (status, `valid`, `code`), then the exact body file and headers
    /// through `nghttp` (the gRPC status h2load cannot see).
    async fn precheck(&self, ctx: &Ctx<'_>) -> Result<(), String> {
        let on_disk = std::fs::read(&self.target.body_file).map_err(|e| format!("read the body file: {e}"))?;
        let payload = grpc_payload(&on_disk)?;
        let ch = ctx.channels[0].clone();
        let auth: AsciiMetadataValue =
            self.target.header("authorization").expect("authorization header").parse().expect("ascii");
        let own = match &self.expect {
            H2Expect::Serving => {
                let msg = HealthCheckRequest::decode(payload).map_err(|e| e.to_string())?;
                match HealthClient::new(ch).check(authed(msg, &auth)).await {
                    Ok(r) if r.get_ref().status() == ServingStatus::Serving => Ok(()),
                    Ok(r) => Err(format!("health status {:?}", r.get_ref().status())),
                    Err(s) => Err(status_text(&s)),
                }
            }
            H2Expect::Verify(msg, expect) => {
                let decoded = VerifyKeyRequest::decode(payload).map_err(|e| e.to_string())?;
                assert_eq!(&decoded, msg, "the body file holds another request");
                match check_verify(ApiKeyServiceClient::new(ch).verify_key(authed(decoded, &auth)).await, *expect) {
                    Outcome::Ok => Ok(()),
                    Outcome::Shed => Err("shed (RESOURCE_EXHAUSTED)".into()),
                    Outcome::Error(e) => Err(e),
                }
            }
            H2Expect::Unauthenticated(msg) => {
                let decoded = ListKeysRequest::decode(payload).map_err(|e| e.to_string())?;
                assert_eq!(&decoded, msg, "the body file holds another request");
                match ApiKeyServiceClient::new(ch).list_keys(authed(decoded, &auth)).await {
                    Err(s) if s.code() == Code::Unauthenticated => Ok(()),
                    Err(s) => Err(format!("expected UNAUTHENTICATED, got {}", status_text(&s))),
                    Ok(_) => Err("expected UNAUTHENTICATED, got OK: the forged key was accepted".into()),
                }
            }
        };
        own.map_err(|e| format!("own client: {e}"))?;
        let (status, message) = tokio::task::spawn_blocking({
            let t = self.target.clone();
            move || nghttp_grpc_status(&t)
        })
        .await
        .expect("nghttp task")?;
        if status != self.grpc_status() as i32 {
            return Err(format!(
                "nghttp with the h2load body and headers: grpc-status {status} ({message}), expected {}",
                self.grpc_status() as i32
            ));
        }
        Ok(())
    }

    /// After an h2load run: the server's counters must account for every
    /// request h2load counted as a success (h2load itself cannot tell).
    fn postcheck(&self, run: &H2loadRun, counters: Option<&Counters>) -> Result<(), String> {
        let Some(c) = counters else { return Ok(()) };
        let n = run.succeeded as f64;
        let (counted, what) = match &self.expect {
            H2Expect::Serving => return Ok(()),
            H2Expect::Verify(_, Expect::Valid) => (c.valid, "VALID"),
            H2Expect::Verify(_, Expect::Code(VerifyCode::Malformed)) => (c.malformed, "MALFORMED"),
            H2Expect::Verify(..) => return Ok(()),
            H2Expect::Unauthenticated(_) => (c.list_keys_unauthenticated, "ListKeys UNAUTHENTICATED"),
        };
        if matches!(self.expect, H2Expect::Verify(..)) && c.verify_not_ok > 0.0 {
            return Err(format!(
                "the server answered {:.0} VerifyKey calls with a non-OK gRPC status",
                c.verify_not_ok
            ));
        }
        if counted < n {
            return Err(format!("h2load counted {n:.0} successes, the server only {counted:.0} {what} answers"));
        }
        Ok(())
    }

    /// One h2load run of `dur`, checked before and after, with the server's CPU and counters around it.
    async fn run(&self, ctx: &Ctx<'_>, h2load: &H2load, dur: Duration, failures: &mut Vec<String>) -> Measured {
        let label = format!("{} ({:?})", self.target.url, self.kind);
        if let Err(e) = self.precheck(ctx).await {
            let msg = format!("h2load pre-check of {label}: {e}");
            eprintln!("FAILED CHECK: {msg}");
            failures.push(msg.clone());
            return Measured { stats: Stats::failed(msg), ..Measured::default() };
        }
        let m = ctx.mark();
        let result = tokio::task::spawn_blocking({
            let (h, t) = (h2load.clone(), self.target.clone());
            move || h.run(&t, dur)
        })
        .await
        .expect("h2load task");
        let run = match result {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("h2load on {label}: {e}"));
                return Measured { stats: Stats::failed(e), ..Measured::default() };
            }
        };
        let mut measured = ctx.since(m, h2load_stats(&run));
        if let Err(e) = self.postcheck(&run, measured.counters.as_ref()) {
            let msg = format!("h2load post-check of {label}: {e}");
            eprintln!("FAILED CHECK: {msg}");
            failures.push(msg.clone());
            measured.stats.errors += run.succeeded.max(1);
            measured.stats.first_errors.push(msg);
        }
        measured.h2load = Some(run);
        measured
    }
}

/// The message inside one uncompressed gRPC frame, if the frame is whole.
fn grpc_payload(frame: &[u8]) -> Result<&[u8], String> {
    let (head, payload) = frame.split_at_checked(5).ok_or("body file shorter than a gRPC frame header")?;
    let len = u32::from_be_bytes(head[1..].try_into().expect("4 bytes")) as usize;
    if head[0] != 0 || len != payload.len() {
        return Err(format!("body file is not one uncompressed gRPC frame ({} bytes, header says {len})", frame.len()));
    }
    Ok(payload)
}

/// A request carrying `authorization: <auth>`.
fn authed<T>(msg: T, auth: &AsciiMetadataValue) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("authorization", auth.clone());
    req
}

/// `+12 ms` / `-3 ms`.
fn fmt_signed_ms(us: i64) -> String {
    format!("{}{:.0} ms", if us < 0 { "-" } else { "+" }, us.unsigned_abs() as f64 / 1e3)
}

/// The bare `Bearer …` value of the service token, for h2load's header.
fn bearer(auth: &AsciiMetadataValue) -> &str {
    auth.to_str().expect("ascii")
}

/// h2load's counts as the own client's `Stats` (no latencies: it reports a mean only).
fn h2load_stats(run: &H2loadRun) -> Stats {
    Stats {
        ok: run.succeeded,
        errors: run.failed,
        first_errors: if run.failed > 0 {
            vec![format!("h2load: {} requests failed, errored, timed out or got a non-2xx status", run.failed)]
        } else {
            Vec::new()
        },
        elapsed: Duration::from_secs_f64(run.secs),
        ..Stats::default()
    }
}

/// Baseline, warm and malformed with h2load, interleaved in rounds.
async fn h2load_rounds(ctx: &Ctx<'_>, h2load: &H2load, keys: &Keys, failures: &mut Vec<String>) -> Vec<Row> {
    let opts = ctx.opts;
    let calls = [
        H2Call::health(ctx),
        H2Call::verify(ctx, Phase::Warm, &keys.warm[0], Expect::Valid, "warm.bin"),
        H2Call::verify(
            ctx,
            Phase::Malformed,
            &with_wrong_checksum(&keys.warm[0]),
            Expect::Code(VerifyCode::Malformed),
            "malformed.bin",
        ),
    ];
    // Unmeasured warm-up of each (checked like the measured runs).
    let warmup = Duration::from_secs_f64(opts.warmup);
    if !warmup.is_zero() {
        for call in &calls {
            call.run(ctx, h2load, warmup, failures).await;
        }
    }
    let rounds = opts.rounds.max(1);
    let slice = Duration::from_secs_f64(opts.duration) / rounds as u32;
    let mut sums: Vec<Measured> = calls.iter().map(|_| Measured::default()).collect();
    for _ in 0..rounds {
        for (call, sum) in calls.iter().zip(&mut sums) {
            sum.add(call.run(ctx, h2load, slice, failures).await);
        }
    }
    let in_flight = format!("{} ({} × {})", h2load.connections * h2load.streams, h2load.connections, h2load.streams);
    let labels = ["health baseline (`Health/Check`)", "warm verify (1 key)", "malformed verify (wrong checksum)"];
    calls
        .iter()
        .zip(sums)
        .zip(labels)
        .map(|((call, m), label)| m.row(call.kind, Client::H2load, label, in_flight.clone()))
        .collect()
}

/// Each cold key verified once, at the own client's usual concurrency, so
/// that its rate compares with the own client's baseline.
async fn cold_phase(ctx: &Ctx<'_>, cold: &[String]) -> Row {
    let reqs: Arc<[VerifyKeyRequest]> = cold.iter().map(|k| verify_req(k)).collect();
    let m = ctx.measure_jobs(ctx.once_each(ctx.opts.concurrency, reqs)).await;
    let mut row = m.row(
        Phase::Cold,
        Client::Own,
        &format!("cold verify ({} distinct keys, once each)", cold.len()),
        ctx.opts.concurrency.to_string(),
    );
    // Every first sight must have run argon2; fewer means the keys were cached some other way.
    if let Some(v) = row.counters.and_then(|c| c.argon2_verifications)
        && v < cold.len() as f64 * 0.99
    {
        row.extra = format!("only {v:.0} argon2 verifications for {} first sights: cached at creation?", cold.len());
    }
    row
}

/// Warm verifications just before the flood, then, while h2load sends
/// forged-key management calls and the own client's attacking side sends
/// wrong secrets: warm verifications again (same client, same concurrency)
/// and first verifications of fresh keys at a low, legitimate rate.
async fn flood_phase(ctx: &Ctx<'_>, h2load: &H2load, keys: &Keys, failures: &mut Vec<String>) -> Vec<Row> {
    let opts = ctx.opts;
    let (c, dur, warmup) =
        (opts.concurrency, Duration::from_secs_f64(opts.duration), Duration::from_secs_f64(opts.warmup));
    let warm_reqs: Arc<[VerifyKeyRequest]> = keys.warm.iter().map(|k| verify_req(k)).collect();
    let warm = |i: usize| ctx.verify_job(i, &warm_reqs, Expect::Valid);
    let mut rows = Vec::new();

    run_for(c, warmup, warm).await;
    let before = ctx.measure(c, dur, warm).await;
    rows.push(before.row(Phase::WarmBeforeFlood, Client::Own, "warm verify, just before the flood", c.to_string()));

    // The attack: h2load with one forged key for the first warm key's id, and
    // the own client's distinct wrong secrets for every warm key's id.
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::from_os_rng();
    let forged = H2Call::forged_list_keys(ctx, &forged_key(&keys.warm[0][ID_RANGE], &mut rng));
    let h2_stop = Arc::new(AtomicBool::new(false));
    let h2_flood = match forged.precheck(ctx).await {
        Ok(()) => Some((ctx.mark(), h2load.run_until(&forged.target, Duration::from_secs(1), h2_stop.clone()))),
        Err(e) => {
            let msg = format!("h2load pre-check of the forged-key flood: {e}");
            eprintln!("FAILED CHECK: {msg}");
            failures.push(msg);
            None
        }
    };
    let flood_channels = connect(ctx.addr, opts.flood_connections.max(1)).await;
    let warm_ids: Arc<[String]> = keys.warm.iter().map(|k| k[ID_RANGE].to_owned()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let flood_jobs: Vec<FloodJob> = (0..opts.flood_concurrency)
        .map(|i| FloodJob {
            client: ApiKeyServiceClient::new(flood_channels[i % flood_channels.len()].clone()),
            auth: ctx.auth.clone(),
            ids: warm_ids.clone(),
            next: i,
            rng: rand::SeedableRng::from_os_rng(),
        })
        .collect();
    let own_flood = (!flood_jobs.is_empty()).then(|| {
        let stop = stop.clone();
        tokio::spawn(async move { run_jobs(flood_jobs, None, Some(stop)).await })
    });
    let in_flight = |n: usize| {
        let mut s = n.to_string();
        if h2_flood.is_some() {
            let _ = write!(s, " + {} h2load", h2load.connections * h2load.streams);
        }
        if own_flood.is_some() {
            let _ = write!(s, " + {} wrong secrets", opts.flood_concurrency);
        }
        s
    };

    run_for(c, warmup, warm).await;
    let during = ctx.measure(c, dur, warm).await;
    let mut row = during.row(Phase::WarmUnderFlood, Client::Own, "warm verify under the flood", in_flight(c));
    let unloaded = rows[0].stats.rps();
    if unloaded > 0.0 {
        row.extra = format!("{:.2}× the rate just before", row.stats.rps() / unloaded);
    }
    rows.push(row);

    let fresh: Arc<[VerifyKeyRequest]> = keys.fresh.iter().map(|k| verify_req(k)).collect();
    if !fresh.is_empty() {
        let m = ctx.measure_jobs(ctx.once_each(opts.fresh_concurrency, fresh)).await;
        let label = format!("first verification of {} fresh keys under the flood", keys.fresh.len());
        rows.push(m.row(Phase::FreshUnderFlood, Client::Own, &label, in_flight(opts.fresh_concurrency)));
    }

    h2_stop.store(true, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    if let Some((mark, flood)) = h2_flood {
        let (run, errors) = tokio::task::spawn_blocking(move || flood.join()).await.expect("h2load flood");
        let mut m = ctx.since(mark, h2load_stats(&run));
        for e in errors.into_iter().take(3) {
            m.stats.errors += 1;
            m.stats.first_errors.push(e);
        }
        if let Err(e) = forged.postcheck(&run, m.counters.as_ref()) {
            let msg = format!("h2load post-check of the forged-key flood: {e}");
            eprintln!("FAILED CHECK: {msg}");
            failures.push(msg.clone());
            m.stats.first_errors.push(msg);
            m.stats.errors += 1;
        }
        m.h2load = Some(run);
        let in_flight = (h2load.connections * h2load.streams).to_string();
        let mut row = m.row(
            Phase::ForgedFlood,
            Client::H2load,
            "↳ the flood: `ListKeys` with a forged key (expect UNAUTHENTICATED)",
            in_flight,
        );
        row.extra = "CPU and counters: the whole flood, every load above included".into();
        rows.push(row);
    }
    if let Some(flood) = own_flood {
        let stats = flood.await.expect("flood task");
        let mut row = Measured { stats, ..Measured::default() }.row(
            Phase::WrongSecretFlood,
            Client::Own,
            "↳ the flood: wrong secrets for real ids (expect NOT_FOUND)",
            opts.flood_concurrency.to_string(),
        );
        if row.stats.shed > 0 {
            row.extra = format!("{} shed (RESOURCE_EXHAUSTED)", row.stats.shed);
        }
        rows.push(row);
    }
    rows
}

// ---------------------------------------------------------------------------
// Restart (PostgreSQL): SIGKILL under load, start again on the same database,
// time until the verification rate is back.

struct Restart {
    keys: usize,
    /// Verifications per second over the load before the kill (its first second left out).
    before_rps: f64,
    /// From the kill to the new process's first SERVING health answer.
    down: Duration,
    /// Successful answers per bucket after health, as req/s.
    after: Vec<f64>,
    /// The last buckets before the kill, as req/s (oldest first).
    before: Vec<f64>,
    /// The client's longest wait between two successful answers from the kill
    /// on (`None`: none came after it).
    gap: Option<Duration>,
    errors_before_kill: u64,
    errors_while_down: u64,
    errors_after_health: u64,
    /// Answers that were wrong (not transport failures).
    wrong_answers: u64,
    first_errors: Vec<String>,
    /// The restarted server's counters at the end of the phase (it started at zero).
    counters_after: Option<Counters>,
    observed: Duration,
}

impl Restart {
    fn threshold(&self) -> f64 {
        self.before_rps * RESTART_RATE_TARGET
    }

    /// End of the first bucket of `RESTART_SUSTAINED_BUCKETS` consecutive ones
    /// at or above the threshold, counted from the health answer.
    fn recovered_after(&self) -> Option<Duration> {
        let t = self.threshold();
        let n = RESTART_SUSTAINED_BUCKETS;
        (0..self.after.len().saturating_sub(n - 1))
            .find(|&k| self.after[k..k + n].iter().all(|r| *r >= t))
            .map(|k| RESTART_BUCKET * (k as u32 + 1))
    }

    /// End of the first bucket at or above the threshold, sustained or not.
    fn first_back(&self) -> Option<Duration> {
        let t = self.threshold();
        self.after.iter().position(|r| *r >= t).map(|k| RESTART_BUCKET * (k as u32 + 1))
    }

    fn summary(&self) -> String {
        format!(
            "before {} req/s, down {}, back to ≥ {RESTART_RATE_TARGET}× after {}",
            fmt_rps(self.before_rps),
            fmt_dur(self.down),
            self.recovered_after().map_or_else(|| format!("more than {}", fmt_dur(self.observed)), fmt_dur)
        )
    }
}

/// One own-client task of the restart load: each answer's time since `t0`.
#[derive(Default)]
struct RestartTrace {
    ok_us: Vec<u64>,
    /// (time since t0, wrong answer rather than a failed call)
    err_us: Vec<(u64, bool)>,
    /// The task's first wrong answers, with their time since t0.
    first_wrong: Vec<(u64, String)>,
    /// The task's last failed calls, with their time since t0: the outage's
    /// come first, so only the last ones can show failures after it.
    last_failed: Vec<(u64, String)>,
}

async fn restart_phase(ctx: &Ctx<'_>, server: &mut Server, env: &[(String, String)], keys: &[String]) -> Restart {
    let opts = ctx.opts;
    let reqs: Arc<[VerifyKeyRequest]> = keys.iter().map(|k| verify_req(k)).collect();
    // Fresh connections: the phase's own, which the kill breaks and tonic re-establishes.
    let channels = connect(ctx.addr, opts.connections).await;
    let (next, stop, t0) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)), Instant::now());
    let tasks: Vec<_> = (0..opts.concurrency)
        .map(|i| {
            let mut client = ApiKeyServiceClient::new(channels[i % channels.len()].clone());
            let (auth, reqs, next, stop) = (ctx.auth.clone(), reqs.clone(), next.clone(), stop.clone());
            tokio::spawn(async move {
                let mut trace = RestartTrace::default();
                while !stop.load(Ordering::Relaxed) {
                    let body = reqs[next.fetch_add(1, Ordering::Relaxed) % reqs.len()].clone();
                    let mut req = Request::new(body);
                    req.metadata_mut().insert("authorization", auth.clone());
                    let r = client.verify_key(req).await;
                    let failed_call = r.is_err();
                    let at = t0.elapsed().as_micros() as u64;
                    let e = match check_verify(r, Expect::Valid) {
                        Outcome::Ok => {
                            trace.ok_us.push(at);
                            continue;
                        }
                        Outcome::Shed => "shed (RESOURCE_EXHAUSTED)".to_owned(),
                        Outcome::Error(e) => e,
                    };
                    // A failed call is expected while the server is down; an
                    // answer that is not VALID never is.
                    trace.err_us.push((at, !failed_call));
                    if !failed_call {
                        if trace.first_wrong.len() < 3 {
                            trace.first_wrong.push((at, e));
                        }
                        continue;
                    }
                    if trace.last_failed.len() == 3 {
                        trace.last_failed.remove(0);
                    }
                    trace.last_failed.push((at, e));
                    // The server may be down: do not spin on refused connections.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                trace
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs_f64(opts.restart_before)).await;
    let killed = Instant::now();
    server.kill();
    *server = Server::start(opts, env, &ctx.dir.join("server-restarted.log"));
    server.wait_ready(ctx.addr).await;
    let healthy = Instant::now();
    eprintln!("restart: killed, new pid {} serving after {}", server.pid(), fmt_dur(healthy - killed));
    let observed = Duration::from_secs_f64(opts.restart_after);
    tokio::time::sleep(observed).await;
    stop.store(true, Ordering::Relaxed);
    let mut traces = Vec::new();
    for t in tasks {
        traces.push(t.await.expect("restart load task"));
    }
    let counters_after = Counters::scrape(ctx.metrics);
    restart_report(keys.len(), &traces, t0, killed, healthy, observed, counters_after)
}

fn restart_report(
    keys: usize,
    traces: &[RestartTrace],
    t0: Instant,
    killed: Instant,
    healthy: Instant,
    observed: Duration,
    counters_after: Option<Counters>,
) -> Restart {
    let us = |t: Instant| t.duration_since(t0).as_micros() as u64;
    let (kill_us, health_us, bucket_us) = (us(killed), us(healthy), RESTART_BUCKET.as_micros() as u64);
    let mut ok: Vec<u64> = traces.iter().flat_map(|t| t.ok_us.iter().copied()).collect();
    ok.sort_unstable();
    // Before the kill: whole buckets counted back from the kill, the load's first second left out.
    let skip_us = 1_000_000.min(kill_us / 2);
    let n_before = ((kill_us - skip_us) / bucket_us) as usize;
    let count_in = |from: u64, to: u64| (ok.partition_point(|&t| t < to) - ok.partition_point(|&t| t < from)) as f64;
    let bucket_secs = RESTART_BUCKET.as_secs_f64();
    let before: Vec<f64> = (0..n_before)
        .rev()
        .map(|j| count_in(kill_us - (j as u64 + 1) * bucket_us, kill_us - j as u64 * bucket_us) / bucket_secs)
        .collect();
    let before_rps = if n_before > 0 { before.iter().sum::<f64>() / n_before as f64 } else { 0.0 };
    let n_after = (observed.as_micros() as u64 / bucket_us) as usize;
    let after: Vec<f64> = (0..n_after)
        .map(|k| count_in(health_us + k as u64 * bucket_us, health_us + (k as u64 + 1) * bucket_us) / bucket_secs)
        .collect();
    // Answers to calls sent before the kill may still arrive after it: the
    // outage the client saw is the longest silence between two successes
    // from the kill on (or from the last success before it).
    let from = ok.partition_point(|&t| t < kill_us).saturating_sub(1);
    let gap = (ok.len() > from + 1 && ok[ok.len() - 1] >= kill_us)
        .then(|| ok[from..].windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0))
        .map(Duration::from_micros);
    let errs = |f: &dyn Fn(u64) -> bool| traces.iter().flat_map(|t| &t.err_us).filter(|(at, _)| f(*at)).count() as u64;
    Restart {
        keys,
        before_rps,
        down: healthy - killed,
        after,
        before: before.iter().rev().take(4).rev().copied().collect(),
        gap,
        errors_before_kill: errs(&|at| at < kill_us),
        errors_while_down: errs(&|at| (kill_us..health_us).contains(&at)),
        errors_after_health: errs(&|at| at >= health_us),
        wrong_answers: traces.iter().flat_map(|t| &t.err_us).filter(|(_, wrong)| *wrong).count() as u64,
        // The ones that matter: wrong answers, and failed calls before the kill or once the
        // server answered health again.
        first_errors: traces
            .iter()
            .flat_map(|t| {
                t.first_wrong.iter().chain(t.last_failed.iter().filter(|(at, _)| *at >= health_us || *at < kill_us))
            })
            .map(|(at, e)| format!("{} after the health answer: {e}", fmt_signed_ms(*at as i64 - health_us as i64)))
            .take(3)
            .collect(),
        counters_after,
        observed,
    }
}

async fn create_keys(
    channels: &[Channel],
    auth: &AsciiMetadataValue,
    n: usize,
    concurrency: usize,
    tag: &str,
) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let step = (n / 10).max(1000);
    let mut tasks = Vec::new();
    for t in 0..concurrency.max(1) {
        let mut client = ApiKeyServiceClient::new(channels[t % channels.len()].clone());
        let (auth, next, tag) = (auth.clone(), next.clone(), tag.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return out;
                }
                if i > 0 && i % step == 0 {
                    eprintln!("  creating {tag} keys: {i} of {n}");
                }
                let req = admin_req(create_key_req(&format!("{tag}-{i}")), &auth);
                let resp = client.create_key(req).await.unwrap_or_else(|s| panic!("CreateKey: {s}"));
                let secret = resp.into_inner().secret;
                assert_eq!(secret.len(), KEY_LEN, "unexpected key shape");
                out.push(secret);
            }
        }));
    }
    let mut keys = Vec::with_capacity(n);
    for t in tasks {
        keys.extend(t.await.expect("create task"));
    }
    keys
}

/// A workspace-preset key (every `*.read` scope plus everyday writes), so
/// that `fleet.read` is held and the response carries a realistic scope list.
fn create_key_req(name: &str) -> CreateKeyRequest {
    CreateKeyRequest {
        organization_id: ORG.into(),
        name: name.to_owned(),
        scopes: Some(pb::create_key_request::Scopes::Preset(pb::ScopePreset::Workspace as i32)),
        environment: pb::Environment::Live as i32,
        expires_at: None,
    }
}

/// A management call: the service token plus the member acting (`x-takumo-actor`).
fn admin_req<T>(body: T, auth: &AsciiMetadataValue) -> Request<T> {
    let mut req = Request::new(body);
    req.metadata_mut().insert("authorization", auth.clone());
    req.metadata_mut().insert("x-takumo-actor", MetadataValue::from_static("bench"));
    req
}

// ---------------------------------------------------------------------------
// Cross-replica propagation (PostgreSQL): a change made through replica A must
// reach replica B's verified-key cache (LISTEN/NOTIFY, sent in the change's
// own transaction) before B stops accepting the key.

/// A round whose change B has not reflected by then is a failure. Well inside
/// the cache's 30 s freshness window, so a round can only pass through the
/// change notice, never through B re-reading a stale entry on its own.
const PROPAGATION_GIVE_UP: Duration = Duration::from_secs(5);
/// Cached (warm) verifications of each fresh key on B, after its first (cold) one.
const PROPAGATION_WARM_VERIFIES: usize = 3;
const PROPAGATION_TARGET: &str = "a change on one replica takes effect on every replica within 1 s";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Disable,
    Revoke,
    Delete,
}

impl Change {
    const ALL: [Change; 3] = [Change::Disable, Change::Revoke, Change::Delete];

    fn rpc(self) -> &'static str {
        match self {
            Change::Disable => "SetKeyStatus(DISABLED)",
            Change::Revoke => "RevokeKey",
            Change::Delete => "DeleteKey",
        }
    }

    /// What B must answer once the change has reached it.
    fn expect(self) -> VerifyCode {
        match self {
            Change::Disable => VerifyCode::Disabled,
            Change::Revoke => VerifyCode::Revoked,
            Change::Delete => VerifyCode::NotFound,
        }
    }
}

struct PropRound {
    change: Change,
    result: Result<PropTimes, String>,
}

#[derive(Clone, Copy)]
struct PropTimes {
    /// From just before A's change call to B's first answer with the new code.
    effect: Duration,
    /// A's change call alone (it may return after B already agrees).
    ack: Duration,
    /// From t0 to B's last VALID answer: B dropped its cache entry after
    /// serving that one; the rest of `effect` is B resolving the key afresh.
    last_valid: Duration,
    /// B's VALID answers to requests sent after A had acknowledged the change.
    valid_after_ack: u64,
}

#[derive(Default)]
struct Propagation {
    rounds: Vec<PropRound>,
    /// Round trips of B's polls that were still answered VALID (cache hits):
    /// the resolution of the measurement.
    poll_us: Vec<u32>,
    notes: Vec<String>,
}

impl Propagation {
    fn failed(&self) -> usize {
        self.rounds.iter().filter(|r| r.result.is_err()).count()
    }

    fn times(&self, change: Option<Change>) -> (usize, Vec<PropTimes>) {
        let rounds: Vec<&PropRound> = self.rounds.iter().filter(|r| change.is_none_or(|c| r.change == c)).collect();
        let ok = rounds.iter().filter_map(|r| r.result.as_ref().ok().copied()).collect();
        (rounds.len(), ok)
    }
}

/// Nearest-rank quantile of unsorted durations.
fn quantile(mut v: Vec<Duration>, q: f64) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

async fn run_propagation(a: Channel, b: Channel, auth: &AsciiMetadataValue, rounds: usize) -> Propagation {
    let mut out = Propagation::default();
    for i in 0..rounds {
        let change = Change::ALL[i % Change::ALL.len()];
        let result = propagation_round(&a, &b, auth, change, i, &mut out.poll_us).await;
        if let Err(e) = &result {
            eprintln!("propagation round {i} ({}): {e}", change.rpc());
            if out.notes.len() < 3 {
                out.notes.push(format!("round {i} ({}) failed: {e}", change.rpc()));
            }
        }
        out.rounds.push(PropRound { change, result });
    }
    out.poll_us.sort_unstable();
    out
}

/// One round: a fresh key, created on A, cached and warm on B; then `change`
/// on A while B is polled back-to-back until it gives the new answer.
async fn propagation_round(
    a: &Channel,
    b: &Channel,
    auth: &AsciiMetadataValue,
    change: Change,
    i: usize,
    poll_us: &mut Vec<u32>,
) -> Result<PropTimes, String> {
    let mut admin = ApiKeyServiceClient::new(a.clone());
    let mut replica = ApiKeyServiceClient::new(b.clone());
    let created = admin
        .create_key(admin_req(create_key_req(&format!("propagation-{i}")), auth))
        .await
        .map_err(|s| format!("CreateKey on A: {}", status_text(&s)))?
        .into_inner();
    let id = created.key.map(|k| k.id).ok_or("CreateKey on A returned no key")?;
    let body = verify_req(&created.secret);
    let verify = |body: &VerifyKeyRequest| {
        let mut req = Request::new(body.clone());
        req.metadata_mut().insert("authorization", auth.clone());
        req
    };

    // B: the first verification is cold (store read, argon2) and caches the key.
    let give_up = Instant::now() + PROPAGATION_GIVE_UP;
    loop {
        match check_verify(replica.verify_key(verify(&body)).await, Expect::Valid) {
            Outcome::Ok => break,
            Outcome::Shed => {}
            Outcome::Error(e) if Instant::now() >= give_up => {
                return Err(format!("B did not verify the fresh key as VALID in 5 s: {e}"));
            }
            Outcome::Error(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for _ in 0..PROPAGATION_WARM_VERIFIES {
        if let Outcome::Error(e) = check_verify(replica.verify_key(verify(&body)).await, Expect::Valid) {
            return Err(format!("warm verify on B before the change: {e}"));
        }
    }

    // The change call, built up front; it starts when first polled, at t0.
    let call: futures::future::BoxFuture<'static, Result<(), tonic::Status>> = match change {
        Change::Disable => {
            let req = admin_req(SetKeyStatusRequest { id: id.clone(), status: KeyStatus::Disabled as i32 }, auth);
            Box::pin(async move { admin.set_key_status(req).await.map(drop) })
        }
        Change::Revoke => {
            let req = admin_req(RevokeKeyRequest { id: id.clone() }, auth);
            Box::pin(async move { admin.revoke_key(req).await.map(drop) })
        }
        Change::Delete => {
            let req = admin_req(DeleteKeyRequest { id: id.clone() }, auth);
            Box::pin(async move { admin.delete_key(req).await.map(drop) })
        }
    };
    let acked = std::sync::OnceLock::<Instant>::new();
    let mut rtts = Vec::new();
    let t0 = Instant::now();
    let change_call = async {
        let r = call.await;
        let ack = t0.elapsed();
        let _ = acked.set(Instant::now());
        r.map(|()| ack).map_err(|s| format!("{} on A: {}", change.rpc(), status_text(&s)))
    };
    // Back-to-back, one request in flight, no sleep: the resolution is one
    // cached verify round trip.
    let poll = async {
        let (mut valid_after_ack, mut last_valid) = (0u64, Duration::ZERO);
        loop {
            let sent = Instant::now();
            let r = match replica.verify_key(verify(&body)).await {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == Code::ResourceExhausted => continue,
                Err(s) => return Err(format!("VerifyKey on B: {}", status_text(&s))),
            };
            if !r.valid && r.code == change.expect() as i32 {
                return Ok((t0.elapsed(), last_valid, valid_after_ack));
            }
            if !(r.valid && r.code == VerifyCode::Valid as i32) {
                return Err(format!(
                    "B answered valid={} {} (expected VALID, then {})",
                    r.valid,
                    VerifyCode::try_from(r.code).map_or("?", |c| c.as_str_name()),
                    change.expect().as_str_name()
                ));
            }
            last_valid = t0.elapsed();
            rtts.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
            if acked.get().is_some_and(|a| sent >= *a) {
                valid_after_ack += 1;
            }
        }
    };
    let both = async { tokio::try_join!(change_call, poll) };
    let result = match tokio::time::timeout(PROPAGATION_GIVE_UP, both).await {
        Ok(Ok((ack, (effect, last_valid, valid_after_ack)))) => {
            eprintln!(
                "propagation round {i} ({}): {} (A replied after {}, B's last VALID at {}, {valid_after_ack} \
                 VALID after A's reply)",
                change.rpc(),
                fmt_dur(effect),
                fmt_dur(ack),
                fmt_dur(last_valid)
            );
            Ok(PropTimes { effect, ack, last_valid, valid_after_ack })
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(match acked.get() {
            Some(a) => format!(
                "B still answered VALID 5 s after the change ({} on A returned after {})",
                change.rpc(),
                fmt_dur(a.duration_since(t0))
            ),
            None => format!("{} on A did not return in 5 s", change.rpc()),
        }),
    };
    poll_us.extend(rtts);
    result
}

// ---------------------------------------------------------------------------
// Load driver: one task per in-flight request, each looping call → record.

enum Outcome {
    Ok,
    /// Refused on purpose (RESOURCE_EXHAUSTED): load shedding, not an error.
    Shed,
    Error(String),
}

trait Job: Send + 'static {
    /// The next call, or `None` when the job has no more work.
    fn call(&mut self) -> impl Future<Output = Option<Outcome>> + Send + '_;
}

#[derive(Clone, Default)]
struct Stats {
    ok: u64,
    shed: u64,
    errors: u64,
    first_errors: Vec<String>,
    /// Latencies of correct responses, µs, sorted.
    latencies_us: Vec<u32>,
    elapsed: Duration,
}

impl Stats {
    /// Adds another window's results; latencies are kept sorted.
    fn merge(&mut self, o: Stats) {
        self.ok += o.ok;
        self.shed += o.shed;
        self.errors += o.errors;
        for e in o.first_errors {
            if self.first_errors.len() < 3 && !self.first_errors.contains(&e) {
                self.first_errors.push(e);
            }
        }
        self.latencies_us.extend(o.latencies_us);
        self.latencies_us.sort_unstable();
        self.elapsed += o.elapsed;
    }

    /// A phase that could not run: one error, with its reason.
    fn failed(why: String) -> Stats {
        Stats { errors: 1, first_errors: vec![why], ..Stats::default() }
    }

    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn percentile(&self, q: f64) -> Option<Duration> {
        let v = &self.latencies_us;
        if v.is_empty() {
            return None;
        }
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        Some(Duration::from_micros(v[rank - 1] as u64))
    }
}

async fn run_jobs<J: Job>(jobs: Vec<J>, deadline: Option<Instant>, stop: Option<Arc<AtomicBool>>) -> Stats {
    let start = Instant::now();
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|mut job| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut s = Stats { latencies_us: Vec::with_capacity(16 * 1024), ..Stats::default() };
                loop {
                    if deadline.is_some_and(|d| Instant::now() >= d)
                        || stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed))
                    {
                        break;
                    }
                    let t0 = Instant::now();
                    let Some(outcome) = job.call().await else {
                        break;
                    };
                    let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    match outcome {
                        Outcome::Ok => {
                            s.ok += 1;
                            s.latencies_us.push(us);
                        }
                        Outcome::Shed => s.shed += 1,
                        Outcome::Error(e) => {
                            s.errors += 1;
                            if s.first_errors.len() < 3 && !s.first_errors.contains(&e) {
                                s.first_errors.push(e);
                            }
                        }
                    }
                }
                s
            })
        })
        .collect();
    let mut all = Stats::default();
    for t in tasks {
        let mut s = t.await.expect("load task panicked");
        s.elapsed = Duration::ZERO;
        all.merge(s);
    }
    all.elapsed = start.elapsed();
    all
}

struct HealthJob {
    client: HealthClient<Channel>,
}

impl Job for HealthJob {
    async fn call(&mut self) -> Option<Outcome> {
        let r = self.client.check(HealthCheckRequest { service: String::new() }).await;
        Some(match r {
            Ok(r) if r.get_ref().status() == ServingStatus::Serving => Outcome::Ok,
            Ok(r) => Outcome::Error(format!("health status {:?}", r.get_ref().status())),
            Err(s) => Outcome::Error(status_text(&s)),
        })
    }
}

#[derive(Clone, Copy)]
enum Expect {
    Valid,
    Code(VerifyCode),
}

fn check_verify(r: Result<tonic::Response<pb::VerifyKeyResponse>, tonic::Status>, expect: Expect) -> Outcome {
    let r = match r {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == Code::ResourceExhausted => return Outcome::Shed,
        Err(s) => return Outcome::Error(status_text(&s)),
    };
    let (valid, code) = match expect {
        Expect::Valid => (true, VerifyCode::Valid),
        Expect::Code(c) => (false, c),
    };
    if r.valid == valid && r.code == code as i32 {
        Outcome::Ok
    } else {
        Outcome::Error(format!(
            "expected valid={valid} {}, got valid={} {}",
            code.as_str_name(),
            r.valid,
            VerifyCode::try_from(r.code).map_or("?", |c| c.as_str_name())
        ))
    }
}

fn status_text(s: &tonic::Status) -> String {
    format!("gRPC {:?}: {}", s.code(), s.message())
}

struct VerifyJob {
    client: ApiKeyServiceClient<Channel>,
    auth: AsciiMetadataValue,
    reqs: Arc<[VerifyKeyRequest]>,
    next: usize,
    expect: Expect,
}

impl Job for VerifyJob {
    fn call(&mut self) -> impl Future<Output = Option<Outcome>> + Send + '_ {
        let body = self.reqs[self.next % self.reqs.len()].clone();
        self.next = self.next.wrapping_add(1);
        let mut req = Request::new(body);
        req.metadata_mut().insert("authorization", self.auth.clone());
        async move { Some(check_verify(self.client.verify_key(req).await, self.expect)) }
    }
}

struct ColdJob {
    client: ApiKeyServiceClient<Channel>,
    auth: AsciiMetadataValue,
    reqs: Arc<[VerifyKeyRequest]>,
    next: Arc<AtomicUsize>,
}

impl Job for ColdJob {
    fn call(&mut self) -> impl Future<Output = Option<Outcome>> + Send + '_ {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let req = self.reqs.get(i).cloned().map(|body| {
            let mut req = Request::new(body);
            req.metadata_mut().insert("authorization", self.auth.clone());
            req
        });
        async move {
            let req = req?;
            Some(check_verify(self.client.verify_key(req).await, Expect::Valid))
        }
    }
}

/// An attacker who knows key ids (they are half of the public prefix and
/// appear in listings) and guesses secrets: every request is a fresh,
/// well-formed key with a valid checksum and a random secret.
struct FloodJob {
    client: ApiKeyServiceClient<Channel>,
    auth: AsciiMetadataValue,
    ids: Arc<[String]>,
    next: usize,
    rng: rand::rngs::StdRng,
}

impl Job for FloodJob {
    fn call(&mut self) -> impl Future<Output = Option<Outcome>> + Send + '_ {
        let key = forged_key(&self.ids[self.next % self.ids.len()], &mut self.rng);
        self.next = self.next.wrapping_add(1);
        let mut req = Request::new(verify_req(&key));
        req.metadata_mut().insert("authorization", self.auth.clone());
        async move { Some(check_verify(self.client.verify_key(req).await, Expect::Code(VerifyCode::NotFound))) }
    }
}

/// Base62 CRC32 of the key body, 6 digits, big-endian, zero-padded (the key format's checksum).
fn checksum(body: &str) -> String {
    let mut n = crc32fast::hash(body.as_bytes()) as u64;
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(out.to_vec()).expect("ascii")
}

async fn connect(addr: SocketAddr, n: usize) -> Vec<Channel> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        // One `connect()` per channel: each is its own HTTP/2 connection.
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect to server");
        out.push(ch);
    }
    out
}

// ---------------------------------------------------------------------------
// Server process, bootstrap.

fn server_command(opts: &Opts, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(&opts.server_bin);
    // Only our settings: drop any TAKUMO_* / OTEL_* / DATABASE_URL / RUST_LOG from the caller, so that
    // the server defaults are what is measured.
    for (k, _) in std::env::vars() {
        if k.starts_with("TAKUMO_") || k.starts_with("OTEL_") || k == "DATABASE_URL" || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// Migrates the database and puts the organization on Enterprise (no key limit).
fn bootstrap(opts: &Opts, env: &[(String, String)]) {
    let out = server_command(opts, env)
        .args(["bootstrap", "--organization", ORG, "--member", "bench", "--plan", "enterprise"])
        .stdin(Stdio::null())
        .output()
        .expect("run takumo-keys bootstrap");
    assert!(out.status.success(), "bootstrap failed: {}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).expect("utf-8").trim().to_owned();
    assert_eq!(key.len(), KEY_LEN, "bootstrap printed an unexpected key shape");
}

/// The server process; killed on drop, panics included.
struct Server {
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    fn start(opts: &Opts, env: &[(String, String)], log: &Path) -> Self {
        let log_file = std::fs::File::create(log).expect("server log file");
        let mut cmd = server_command(opts, env);
        // SAFETY: prctl is async-signal-safe; the child gets SIGTERM if this process dies
        // without running its destructors (e.g. SIGKILL), so no server outlives the bench.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start takumo-keys");
        Server { child: Some(child), log: log.to_owned() }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    async fn wait_ready(&self, addr: SocketAddr) {
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(ch) = Endpoint::from_shared(format!("http://{addr}")).expect("endpoint").connect().await {
                let r = HealthClient::new(ch).check(HealthCheckRequest { service: String::new() }).await;
                if r.is_ok_and(|r| r.get_ref().status() == ServingStatus::Serving) {
                    return;
                }
            }
            assert!(Instant::now() < give_up, "server did not become SERVING in 60 s; log:\n{}", self.read_log());
            // Short: the restart phase times the first SERVING answer with it.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn read_log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// SIGKILL, as a crash or an OOM kill would: no graceful shutdown, no final usage flush.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s) and returns its log.
    fn stop(mut self) -> String {
        self.shutdown();
        self.read_log()
    }

    fn shutdown(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).stderr(Stdio::null()).status();
        let give_up = Instant::now() + Duration::from_secs(5);
        while Instant::now() < give_up {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Busy CPU seconds of the whole machine, summed over CPUs, from /proc/stat.
fn sys_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<f64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal …: busy is all but idle and iowait.
    let busy = f.get(..8)?.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum::<f64>();
    Some(busy / CLK_TCK)
}

/// USER_HZ: 100 on every Linux architecture the bench runs on.
const CLK_TCK: f64 = 100.0;

/// User plus system CPU time of a process, from /proc (Linux only).
struct ProcCpu {
    pid: u32,
}

impl ProcCpu {
    fn new(pid: u32) -> Self {
        ProcCpu { pid }
    }

    fn seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // Fields after the parenthesised command: state is field 3; utime, stime are 14, 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some(ticks / CLK_TCK)
    }

    fn since(&self, start: Option<f64>) -> Option<f64> {
        Some(self.seconds()? - start?)
    }
}

// ---------------------------------------------------------------------------
// Report.

/// A target's verdict for one backend.
struct Verdict {
    /// `None`: not applicable or not measured.
    met: Option<bool>,
    detail: String,
    /// How far from the target, when not met.
    shortfall: Option<String>,
}

impl Verdict {
    fn na(why: &str) -> Verdict {
        Verdict { met: None, detail: why.to_owned(), shortfall: None }
    }

    fn cell(&self) -> String {
        match (self.met, &self.shortfall) {
            (None, _) => format!("n/a ({})", self.detail),
            (Some(true), _) => format!("met ({})", self.detail),
            (Some(false), Some(s)) => format!("**not met** ({}; {s})", self.detail),
            (Some(false), None) => format!("**not met** ({})", self.detail),
        }
    }
}

/// `0.62× is 0.23× short of 0.85× (27% below)`: how far a ratio misses a floor.
fn ratio_shortfall(r: f64, target: f64) -> String {
    format!("{:.3}× short of {target}×, {:.0}% below it", target - r, (1.0 - r / target) * 100.0)
}

impl BackendReport {
    fn row(&self, kind: Phase, client: Client) -> Option<&Row> {
        self.rows.iter().find(|r| r.kind == kind && r.client == client)
    }

    fn rps(&self, kind: Phase, client: Client) -> Option<f64> {
        self.row(kind, client).map(|r| r.stats.rps())
    }

    /// Server CPU seconds per request of a row.
    fn cpu_per_req(&self, kind: Phase, client: Client) -> Option<f64> {
        let r = self.row(kind, client)?;
        let n = r.stats.ok + r.stats.errors;
        (n > 0).then_some(r.server_cpu_s? / n as f64)
    }

    /// The backend's part of the results: one table per client, then notes,
    /// propagation and restart.
    fn section(&self, opts: &Opts) -> String {
        let mut s = format!("## {}\n\n", self.backend.title());
        let _ = writeln!(
            s,
            "### Throughput ratios (h2load)\n\n`h2load -c {} -m {} -t 1`; baseline, warm and malformed alternate in \
             {} rounds of {:.2} s each, summed per phase. Each run was checked first (own client and `nghttp`, same \
             request) and after (the server's outcome counters account for every success).\n\n{}",
            opts.h2load_connections,
            opts.h2load_streams,
            opts.rounds.max(1),
            opts.duration / opts.rounds.max(1) as f64,
            self.table(Client::H2load)
        );
        let _ = writeln!(
            s,
            "### Own client (tonic)\n\nEvery answer checked (gRPC status, `valid`, `code`). The load generator \
             costs about as much CPU as the server on the same cores, so its ratios are not the throughput ratios \
             above; they serve the cold and flood targets, which compare figures of this client only.\n\n{}",
            self.table(Client::Own)
        );
        if self.backend == Backend::Postgres {
            let _ = writeln!(
                s,
                "{}",
                DB_COLUMN_NOTE
                    .replace("{ping}", &format!("{HEALTH_PING_EVERY_S:.0}"))
                    .replace("{flush}", &format!("{USAGE_FLUSH_EVERY_S:.0}"))
            );
        }
        for n in &self.notes {
            let _ = writeln!(s, "- {n}");
        }
        if !self.notes.is_empty() {
            s.push('\n');
        }
        if let Some(p) = self.propagation_section("###") {
            let _ = writeln!(s, "{p}");
        }
        if let Some(r) = &self.restart {
            let _ = writeln!(s, "{}", r.section(opts));
        }
        s
    }

    fn table(&self, client: Client) -> String {
        let base = self.rps(Phase::Baseline, client);
        let mut t = String::from(
            "| phase | in flight | req/s | ratio to baseline | latency | errors | server CPU per req | argon2 \
             verify / hash / rehash | key reads | DB statements per 10k | notes |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        );
        for r in self.rows.iter().filter(|r| r.client == client) {
            let rps = r.stats.rps();
            let ratio = match (r.kind, base) {
                (Phase::Baseline, _) => "1×".into(),
                (Phase::ForgedFlood | Phase::WrongSecretFlood | Phase::FreshUnderFlood, _) => "–".into(),
                (_, Some(b)) if b > 0.0 => format!("{:.3}×", rps / b),
                _ => "–".into(),
            };
            let latency = match (r.mean, r.stats.percentile(0.5), r.stats.percentile(0.99)) {
                (Some(m), _, _) => format!("mean {}", fmt_dur(m)),
                (None, Some(p50), Some(p99)) => format!("p50 {} · p99 {}", fmt_dur(p50), fmt_dur(p99)),
                _ => "–".into(),
            };
            let errors = match (r.stats.errors, r.stats.shed) {
                (0, 0) => "0".into(),
                (e, 0) => format!("**{e}**"),
                (e, s) => format!("**{e}** + {s} shed"),
            };
            let requests = r.stats.ok + r.stats.errors;
            let loaded = matches!(r.kind, Phase::WarmUnderFlood | Phase::FreshUnderFlood | Phase::ForgedFlood);
            let cpu = match r.server_cpu_s {
                Some(s) if requests > 0 => {
                    let per = fmt_dur(Duration::from_secs_f64(s.max(0.0) / requests as f64));
                    if loaded { format!("{per} (flood included)") } else { per }
                }
                _ => "–".into(),
            };
            let count = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.0}"));
            let (argon2, reads) = match r.counters {
                Some(c) => (
                    format!(
                        "{} / {} / {}",
                        count(c.argon2_verifications),
                        count(c.argon2_hashes),
                        count(c.argon2_rehashes)
                    ),
                    count(c.key_reads),
                ),
                None => ("–".into(), "–".into()),
            };
            let db = match (r.db, self.backend) {
                (Some(w), _) => {
                    let c = w.counts;
                    let detail = format!(
                        "{} read, {} write, {} ping, {} other in {:.1} s",
                        c.reads, c.writes, c.pings, c.other, w.secs
                    );
                    if r.kind == Phase::Baseline {
                        format!("– ({detail})")
                    } else if loaded {
                        format!("– ({detail}, flood included)")
                    } else {
                        format!("{:.1} ({detail})", c.total() as f64 * 10_000.0 / requests.max(1) as f64)
                    }
                }
                (None, Backend::Sqlite) if r.kind == Phase::Warm => "n/a (SQLite)".into(),
                (None, Backend::Postgres) if r.kind == Phase::Warm => "n/a (no proxy)".into(),
                _ => String::new(),
            };
            let mut notes = format!("{} ok in {:.1} s", r.stats.ok, r.stats.elapsed.as_secs_f64());
            if !r.extra.is_empty() {
                let _ = write!(notes, "; {}", r.extra);
            }
            let _ = writeln!(
                t,
                "| {} | {} | {} | {ratio} | {latency} | {errors} | {cpu} | {argon2} | {reads} | {db} | {notes} |",
                r.label,
                r.in_flight,
                fmt_rps(rps),
            );
        }
        t
    }

    /// Whether the rows behind a target are trustworthy: no errors in them or
    /// in the baseline of their client.
    fn judge(&self, ok: bool, detail: String, shortfall: String, rows: &[(Phase, Client)]) -> Verdict {
        let mut errs: u64 = rows.iter().filter_map(|(k, c)| self.row(*k, *c)).map(|r| r.stats.errors).sum();
        for client in [Client::H2load, Client::Own] {
            if rows.iter().any(|(_, c)| *c == client) {
                errs += self.row(Phase::Baseline, client).map_or(0, |r| r.stats.errors);
            }
        }
        if errs > 0 {
            let detail = format!("{detail}; {errs} errors, figures untrustworthy");
            return Verdict { met: Some(false), detail, shortfall: None };
        }
        Verdict { met: Some(ok), detail, shortfall: (!ok).then_some(shortfall) }
    }

    /// A same-client throughput ratio against a floor.
    fn ratio_target(&self, kind: Phase, client: Client, target: f64) -> Verdict {
        let (Some(v), Some(b)) = (self.rps(kind, client), self.rps(Phase::Baseline, client)) else {
            return Verdict::na("not measured");
        };
        let r = v / b.max(1e-9);
        self.judge(
            r >= target,
            format!("{r:.3}×: {} vs {} req/s", fmt_rps(v), fmt_rps(b)),
            ratio_shortfall(r, target),
            &[(kind, client)],
        )
    }

    fn targets(&self, opts: &Opts) -> Vec<(String, Verdict)> {
        let mut out = Vec::new();
        out.push((
            format!("warm VerifyKey ≥ {WARM_RATIO_TARGET}× Health/Check req/s (h2load)"),
            self.ratio_target(Phase::Warm, Client::H2load, WARM_RATIO_TARGET),
        ));
        out.push((
            format!("malformed VerifyKey ≥ {MALFORMED_RATIO_TARGET}× Health/Check req/s (h2load)"),
            self.ratio_target(Phase::Malformed, Client::H2load, MALFORMED_RATIO_TARGET),
        ));
        out.push((
            format!(
                "cold VerifyKey ({} distinct keys, once each) ≥ {COLD_RATIO_TARGET}× Health/Check req/s (own client)",
                opts.cold_keys
            ),
            self.ratio_target(Phase::Cold, Client::Own, COLD_RATIO_TARGET),
        ));
        out.push((
            format!("server CPU per cold verification ≤ {COLD_CPU_TARGET}× a warm one (own client)"),
            self.cold_cpu_verdict(),
        ));
        out.push((
            format!(
                "under the flood: first verifications of fresh keys p99 < {} ms, no errors (own client)",
                FRESH_P99_TARGET.as_millis()
            ),
            self.fresh_verdict(),
        ));
        out.push((
            format!("under the flood: warm VerifyKey ≥ {FLOODED_WARM_TARGET}× its rate just before (own client)"),
            self.flooded_warm_verdict(),
        ));
        out.push((
            format!(
                "after SIGKILL and restart: verification rate back to ≥ {RESTART_RATE_TARGET}× within {} s of the \
                 health answer (own client)",
                RESTART_WITHIN.as_secs()
            ),
            self.restart_verdict(),
        ));
        // Targets of earlier issues, still measured.
        out.push(("(earlier) warm VerifyKey p99 ≤ 2 ms at 64 in flight (own client)".into(), self.p99_verdict(opts)));
        out.push((
            "(earlier) zero DB reads for warm verifications; usage writes ≤ one batched statement per flush interval"
                .into(),
            self.db_verdict(),
        ));
        out.push((format!("(earlier) {PROPAGATION_TARGET}"), self.propagation_verdict()));
        out
    }

    fn cold_cpu_verdict(&self) -> Verdict {
        let (Some(cold), Some(warm)) =
            (self.cpu_per_req(Phase::Cold, Client::Own), self.cpu_per_req(Phase::Warm, Client::Own))
        else {
            return Verdict::na("not measured");
        };
        let x = cold / warm.max(1e-12);
        self.judge(
            x <= COLD_CPU_TARGET,
            format!(
                "{x:.1}×: {} vs {} per request",
                fmt_dur(Duration::from_secs_f64(cold)),
                fmt_dur(Duration::from_secs_f64(warm))
            ),
            format!("{:.1}× over the {COLD_CPU_TARGET}× bound", x - COLD_CPU_TARGET),
            &[(Phase::Cold, Client::Own), (Phase::Warm, Client::Own)],
        )
    }

    fn fresh_verdict(&self) -> Verdict {
        let Some(r) = self.row(Phase::FreshUnderFlood, Client::Own) else {
            return Verdict::na("no fresh keys (`--fresh-keys 0`)");
        };
        let Some(p99) = r.stats.percentile(0.99) else {
            return Verdict { met: Some(false), detail: "no successful verification".into(), shortfall: None };
        };
        let failures = r.stats.errors + r.stats.shed;
        let ok = p99 < FRESH_P99_TARGET && failures == 0;
        let mut short = Vec::new();
        if p99 >= FRESH_P99_TARGET {
            short.push(format!("p99 {} over {} ms", fmt_dur(p99 - FRESH_P99_TARGET), FRESH_P99_TARGET.as_millis()));
        }
        if failures > 0 {
            short.push(format!("{failures} verifications failed or shed"));
        }
        Verdict {
            met: Some(ok),
            detail: format!(
                "p99 {}, p50 {}, {} errors, {} shed over {} keys",
                fmt_dur(p99),
                r.stats.percentile(0.5).map_or("–".into(), fmt_dur),
                r.stats.errors,
                r.stats.shed,
                r.stats.ok + failures
            ),
            shortfall: (!ok).then(|| short.join(", ")),
        }
    }

    fn flooded_warm_verdict(&self) -> Verdict {
        let (Some(during), Some(before)) =
            (self.rps(Phase::WarmUnderFlood, Client::Own), self.rps(Phase::WarmBeforeFlood, Client::Own))
        else {
            return Verdict::na("not measured");
        };
        let r = during / before.max(1e-9);
        self.judge(
            r >= FLOODED_WARM_TARGET,
            format!("{r:.2}×: {} vs {} req/s", fmt_rps(during), fmt_rps(before)),
            ratio_shortfall(r, FLOODED_WARM_TARGET),
            &[(Phase::WarmUnderFlood, Client::Own), (Phase::WarmBeforeFlood, Client::Own)],
        )
    }

    fn restart_verdict(&self) -> Verdict {
        let Some(r) = &self.restart else {
            return match self.backend {
                Backend::Sqlite => Verdict::na("PostgreSQL only"),
                Backend::Postgres => Verdict::na("skipped (`--restart-after 0` or no cold keys)"),
            };
        };
        let back = r.recovered_after();
        let ok = back.is_some_and(|b| b <= RESTART_WITHIN) && r.wrong_answers == 0 && r.errors_before_kill == 0;
        let detail = format!(
            "{} after the health answer (sustained {} ms), from {} req/s before; down {} (kill → SERVING)",
            back.map_or_else(|| format!("not back within {}", fmt_dur(r.observed)), fmt_dur),
            RESTART_BUCKET.as_millis() * RESTART_SUSTAINED_BUCKETS as u128,
            fmt_rps(r.before_rps),
            fmt_dur(r.down)
        );
        let mut short = Vec::new();
        match back {
            Some(b) if b > RESTART_WITHIN => {
                short.push(format!("{} over {} s", fmt_dur(b - RESTART_WITHIN), RESTART_WITHIN.as_secs()))
            }
            None => short.push(format!(
                "more than {} over {} s",
                fmt_dur(r.observed.saturating_sub(RESTART_WITHIN)),
                RESTART_WITHIN.as_secs()
            )),
            _ => {}
        }
        if r.wrong_answers + r.errors_before_kill > 0 {
            short.push(format!("{} wrong answers, {} errors before the kill", r.wrong_answers, r.errors_before_kill));
        }
        Verdict { met: Some(ok), detail, shortfall: (!ok).then(|| short.join(", ")) }
    }

    fn p99_verdict(&self, opts: &Opts) -> Verdict {
        let Some(p99) = self.row(Phase::Warm, Client::Own).and_then(|r| r.stats.percentile(0.99)) else {
            return Verdict::na("not measured");
        };
        let note = if opts.concurrency == 64 { String::new() } else { format!(" at {} in flight", opts.concurrency) };
        let base_p99 = self
            .row(Phase::Baseline, Client::Own)
            .and_then(|r| r.stats.percentile(0.99))
            .map_or(String::new(), |b| format!("; the empty RPC's p99 {}", fmt_dur(b)));
        let limit = Duration::from_millis(2);
        self.judge(
            p99 <= limit,
            format!("p99 {}{note}{base_p99}", fmt_dur(p99)),
            format!("{} over 2 ms", fmt_dur(p99.saturating_sub(limit))),
            &[(Phase::Warm, Client::Own)],
        )
    }

    fn db_verdict(&self) -> Verdict {
        let Some(w) = self.row(Phase::Warm, Client::Own).and_then(|r| r.db) else {
            return match self.backend {
                Backend::Postgres => Verdict::na("run without the counting proxy"),
                Backend::Sqlite => Verdict::na("not measured on SQLite"),
            };
        };
        let c = w.counts;
        // Usage recorded in a warm slice may be flushed during the next
        // (interleaved) slice, so writes are judged over all three phases' windows.
        let (writes, secs) = [Phase::Baseline, Phase::Warm, Phase::Malformed]
            .iter()
            .filter_map(|k| self.row(*k, Client::Own).and_then(|r| r.db))
            .fold((0, 0.0), |(n, t), d| (n + d.counts.writes, t + d.secs));
        // One flush per interval, plus one for a window that straddles an extra tick.
        let budget = (secs / USAGE_FLUSH_EVERY_S).ceil() as u64 + 1;
        self.judge(
            c.reads == 0 && c.other == 0 && writes <= budget,
            format!(
                "warm: {} reads, {} other in {:.1} s; usage writes {writes} in {secs:.1} s of interleaved rounds, \
                 budget {budget}",
                c.reads, c.other, w.secs
            ),
            "see the counts".into(),
            &[(Phase::Warm, Client::Own)],
        )
    }

    /// Judged by the slowest round: every change must reach the other replica within 1 s.
    fn propagation_verdict(&self) -> Verdict {
        let Some(p) = &self.propagation else {
            return match self.backend {
                Backend::Sqlite => Verdict::na("one process; measured on PostgreSQL"),
                Backend::Postgres => Verdict::na("`--propagation-rounds 0`"),
            };
        };
        let (n, ok) = p.times(None);
        let failed = n - ok.len();
        let max = ok.iter().map(|t| t.effect).max();
        let p50 = quantile(ok.iter().map(|t| t.effect).collect(), 0.5);
        let detail = format!(
            "max {}, p50 {} over {n} rounds, {failed} failed; 2 replicas",
            max.map_or("–".into(), fmt_dur),
            p50.map_or("–".into(), fmt_dur)
        );
        let met = n > 0 && failed == 0 && max.is_some_and(|m| m <= Duration::from_secs(1));
        let shortfall = (!met).then(|| match max {
            Some(m) if m > Duration::from_secs(1) => {
                format!("slowest {} over 1 s", fmt_dur(m - Duration::from_secs(1)))
            }
            _ => format!("{failed} rounds failed"),
        });
        Verdict { met: Some(met), detail, shortfall }
    }

    /// The propagation table, under a heading of the given level (`###`, `####`).
    fn propagation_section(&self, heading: &str) -> Option<String> {
        let p = self.propagation.as_ref()?;
        let mut t = format!("{heading} Cross-replica propagation ({}, 2 replicas)\n\n", self.backend.title());
        t.push_str(
            "| change on replica A | replica B must answer | rounds | failed | propagation p50 | p99 | max \
             | A's change call p50 | B's last VALID answer p50 / max | B's VALID answers after A's reply |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let kinds = Change::ALL.iter().map(|c| (Some(*c), format!("`{}`", c.rpc()), c.expect().as_str_name()));
        for (change, label, answer) in kinds.chain([(None, "**all**".to_owned(), "")]) {
            let (n, ok) = p.times(change);
            if n == 0 {
                continue;
            }
            let failed = n - ok.len();
            let effect: Vec<Duration> = ok.iter().map(|t| t.effect).collect();
            let p99 = if effect.len() >= 100 {
                quantile(effect.clone(), 0.99).map_or("–".into(), fmt_dur)
            } else {
                format!("– (n = {})", effect.len())
            };
            let _ = writeln!(
                t,
                "| {label} | {answer} | {n} | {} | {} | {p99} | {} | {} | {} / {} | {} |",
                if failed > 0 { format!("**{failed}**") } else { "0".into() },
                quantile(effect.clone(), 0.5).map_or("–".into(), fmt_dur),
                effect.iter().max().copied().map_or("–".into(), fmt_dur),
                quantile(ok.iter().map(|t| t.ack).collect(), 0.5).map_or("–".into(), fmt_dur),
                quantile(ok.iter().map(|t| t.last_valid).collect(), 0.5).map_or("–".into(), fmt_dur),
                ok.iter().map(|t| t.last_valid).max().map_or("–".into(), fmt_dur),
                ok.iter().map(|t| t.valid_after_ack).sum::<u64>(),
            );
        }
        let poll = |q: f64| {
            let v = &p.poll_us;
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
            v.get(rank - 1).map_or("–".into(), |us| fmt_dur(Duration::from_micros(*us as u64)))
        };
        let _ = write!(
            t,
            "\nReplica B is a second server process on the same database with the same environment (pepper, \
             service tokens, database URL{}), on its own port, started after the phases above. Each round creates \
             a fresh key through A (`CreateKey`, with `x-takumo-actor`), verifies it on B once (cold: store read \
             and argon2, which caches it) and {PROPAGATION_WARM_VERIFIES} more times (cached), then makes the \
             change through A while polling `VerifyKey` on B back-to-back (one request in flight, no sleep) until \
             B gives the new answer; changes rotate disable, revoke, delete. The time runs from just before A's \
             change call to B's first new answer, so it includes A's whole change call (row lock, update, audit \
             row, `pg_notify`, commit), PostgreSQL delivering the notice to B's listener, B dropping its cache \
             entry, and B's next verification resolving from the store: for a disabled or revoked key that is a \
             store read plus an argon2 verification (the cached proof went with the entry), for a deleted key a \
             store read that finds nothing. Resolution: one poll of B, a cached verify round trip (p50 {}, max \
             {} over {} polls still answered VALID). A round that B has not reflected within {} s (well inside \
             the cache's 30 s freshness window, so only the change notice can pass it) is a failure. p99 is shown \
             from 100 rounds; below that it would be the max. B's last VALID answer (from the same t0) bounds when \
             the notice reached B: B dropped its entry after serving it, so the rest of the propagation time is B \
             resolving the key afresh. The last column counts VALID answers B gave to requests sent after A had \
             replied to the change call: the window in which a client told \"disabled\" could still get the key \
             accepted elsewhere.\n",
            if self.rows.iter().any(|r| r.db.is_some()) { ", through the counting proxy" } else { "" },
            poll(0.5),
            poll(1.0),
            p.poll_us.len(),
            PROPAGATION_GIVE_UP.as_secs()
        );
        for n in &p.notes {
            let _ = writeln!(t, "\n- {n}");
        }
        Some(t)
    }
}

const DB_COLUMN_NOTE: &str = "DB statements per 10k: statements the server sent to PostgreSQL during the measured \
window (Execute and simple-Query messages, counted by a pass-through proxy between the server and PostgreSQL), per \
10,000 requests of the phase; in brackets the raw counts by kind: `read` (SELECT), `write` (INSERT/UPDATE/DELETE), \
`ping` (`SELECT 1`) and `other`. The count includes the service's background work, whatever the load: a health ping \
every {ping} s and a usage flush every {flush} s (when there is usage to write); the baseline row shows that \
background alone.\n";

impl Restart {
    fn section(&self, opts: &Opts) -> String {
        let mut t =
            String::from("### Restart after SIGKILL (PostgreSQL, own client)\n\n| figure | value |\n|---|---|\n");
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "| {k} | {v} |");
        };
        row(
            "load",
            format!(
                "{} in flight over {} HTTP/2 connections, cycling over {} distinct keys (the cold keys, cached)",
                opts.concurrency, opts.connections, self.keys
            ),
        );
        row(
            "rate before the kill",
            format!(
                "{} req/s ({} s of load, its first second left out)",
                fmt_rps(self.before_rps),
                opts.restart_before
            ),
        );
        row("SIGKILL → first SERVING health answer of the new process", fmt_dur(self.down));
        row(
            "longest silence between two successful answers, from the kill on",
            self.gap.map_or_else(|| "no successful answer after the kill".into(), fmt_dur),
        );
        row(
            &format!(
                "back to ≥ {RESTART_RATE_TARGET}× ({} req/s) for {} consecutive {} ms buckets, from the health answer",
                fmt_rps(self.threshold()),
                RESTART_SUSTAINED_BUCKETS,
                RESTART_BUCKET.as_millis()
            ),
            self.recovered_after().map_or_else(|| format!("not within {}", fmt_dur(self.observed)), fmt_dur),
        );
        row("first bucket at ≥ that rate (sustained or not)", self.first_back().map_or_else(|| "none".into(), fmt_dur));
        row(
            "failed calls: before the kill / while down / after the health answer; wrong answers",
            format!(
                "{} / {} / {}; {}",
                self.errors_before_kill, self.errors_while_down, self.errors_after_health, self.wrong_answers
            ),
        );
        let count = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.0}"));
        if let Some(c) = self.counters_after {
            row(
                &format!("restarted server's work over the observed {}", fmt_dur(self.observed)),
                format!(
                    "{} argon2 verifications, {} key reads, {} VALID answers",
                    count(c.argon2_verifications),
                    count(c.key_reads),
                    c.valid
                ),
            );
        }
        let fmt = |v: &[f64]| v.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" ");
        let shown = self.after.len().min(40);
        let _ = writeln!(
            t,
            "\nSuccessful verifications per {} ms bucket, as req/s: the last {} before the kill: {}; from the health \
             answer on (first {}): {}",
            RESTART_BUCKET.as_millis(),
            self.before.len(),
            fmt(&self.before),
            fmt_dur(RESTART_BUCKET * shown as u32),
            fmt(&self.after[..shown])
        );
        for e in &self.first_errors {
            let _ = writeln!(t, "\n- {e}");
        }
        t
    }
}

fn targets_section(opts: &Opts, reports: &[BackendReport]) -> String {
    let mut s = String::from(
        "## Targets\n\nEach ratio compares figures of one client in one run (the client is named). n/a: not \
         applicable to that backend, or not measured.\n\n| target |",
    );
    for r in reports {
        let _ = write!(s, " {} |", r.backend.title());
    }
    s.push_str("\n|---|");
    for _ in reports {
        s.push_str("---|");
    }
    s.push('\n');
    let per: Vec<_> = reports.iter().map(|r| r.targets(opts)).collect();
    let names: Vec<&String> = per.first().map(|p| p.iter().map(|(n, _)| n).collect()).unwrap_or_default();
    for (i, name) in names.iter().enumerate() {
        let _ = write!(s, "| {name} |");
        for p in &per {
            let _ = write!(s, " {} |", p[i].1.cell());
        }
        s.push('\n');
    }
    let missed: Vec<String> = reports
        .iter()
        .zip(&per)
        .flat_map(|(r, p)| {
            p.iter().filter(|(_, v)| v.met == Some(false)).map(move |(n, v)| {
                let by = v.shortfall.as_deref().map_or_else(|| v.detail.clone(), |s| format!("{s} ({})", v.detail));
                format!("- **{}**: {n}: {by}", r.backend.title())
            })
        })
        .collect();
    if missed.is_empty() {
        s.push_str("\nEvery applicable target is met.\n");
    } else {
        let _ = writeln!(s, "\nNot met ({}):\n\n{}", missed.len(), missed.join("\n"));
    }
    s
}

fn render_results(opts: &Opts, reports: &[BackendReport], h2load_version: &str, total: Duration) -> String {
    let header = ResultsHeader {
        title: "Performance results: VerifyKey benchmark",
        generator: "benches/verify.rs",
        analysis: "docs/performance.md",
        command: bench_command("verify", "TAKUMO_BENCH_"),
        path: &opts.docs,
    };
    let mut s = header.render();
    let _ = writeln!(
        s,
        "- Server: release build, one process per backend (plus a second replica on PostgreSQL for the \
         propagation phase, and a restarted one for the restart phase), fresh database, every setting at its \
         default but the service token, pepper, listen and metrics addresses: argon2id {} (the defaults of the \
         server binary, from `serve --help`). PostgreSQL {}over TCP loopback with `sslmode=disable`, through the \
         bench's statement-counting proxy{}.",
        server_argon2_defaults(&opts.server_bin),
        reports.iter().find_map(|r| r.pg_version.as_deref()).map_or(String::new(), |v| format!("{v} ")),
        if opts.no_pg_proxy { " (off: `--no-pg-proxy`)" } else { " (one extra loopback hop per statement)" }
    );
    let _ = writeln!(
        s,
        "- Load generators, on the same cores as the server: **h2load** ({h2load_version}, `-c {} -m {} -t 1`, {} \
         in flight) for the throughput ratios and the forged-key flood; the **own client** (this bench: tonic, {} \
         tokio threads, {} in flight over {} HTTP/2 connections) for everything h2load cannot do (many distinct \
         keys, checking every answer, timing single requests).",
        opts.h2load_connections,
        opts.h2load_streams,
        opts.h2load_connections * opts.h2load_streams,
        opts.client_threads,
        opts.concurrency,
        opts.connections
    );
    let _ = writeln!(
        s,
        "- Phases: {:.1} s measured per phase after {:.1} s warm-up; baseline, warm and malformed in {} interleaved \
         rounds per client; {} warm keys (workspace preset, `required_scopes: [\"{REQUIRED_SCOPE}\"]`); cold: {} \
         distinct keys once each; flood: h2load's forged-key `ListKeys` plus {} in-flight wrong secrets over {} \
         connections, with {} fresh keys verified once each at {} in flight; propagation {} rounds and restart \
         ({:.0} s before the kill, {:.0} s after the health answer) on PostgreSQL. Total run {:.0} s.",
        opts.duration,
        opts.warmup,
        opts.rounds.max(1),
        opts.warm_keys,
        opts.cold_keys,
        opts.flood_concurrency,
        opts.flood_connections,
        opts.fresh_keys,
        opts.fresh_concurrency,
        opts.propagation_rounds,
        opts.restart_before,
        opts.restart_after,
        total.as_secs_f64()
    );
    if opts.duration < 3.0 || opts.cold_keys < 20_000 {
        let _ = writeln!(
            s,
            "- **Short run** ({:.1} s per phase, {} cold keys): a smoke test, not a measurement.",
            opts.duration, opts.cold_keys
        );
    }
    s.push('\n');
    s.push_str(&targets_section(opts, reports));
    s.push('\n');
    for r in reports {
        s.push_str(&r.section(opts));
    }
    s.push_str(READING_NOTES);
    s
}

const READING_NOTES: &str = "## How the figures are made\n\n\
- **Ratios** compare figures of the same client in the same run: h2load's warm and malformed against h2load's \
Health/Check, the own client's cold and flooded figures against the own client's. A tonic load generator costs about \
as much CPU per request as the server on the same two cores, which flatters ratios; h2load (one C thread) leaves the \
server as the bottleneck.\n\
- **h2load checks.** h2load counts an HTTP 200 as a success even when the gRPC status in the trailers is an error. \
Before every h2load run the same request goes once through the own tonic client (gRPC status, `valid`, `code`) and \
once through `nghttp` with h2load's very body file and headers (`grpc-status`); after it, the server's counters \
(`takumo_keys_verify_outcomes_total`, `takumo_keys_rpc_requests_total`) must show at least as many answers of the \
expected kind as h2load counted successes, and no VerifyKey with another status. A failed check is an error in the \
row and fails the run.\n\
- **Server CPU per request**: the server process's user + system time (`/proc/<pid>/stat`) over the phase divided by \
its requests; PostgreSQL's own CPU is not included. It does not depend on the client.\n\
- **argon2 / key reads**: deltas of `takumo_keys_argon2_verifications_total`, `…_hashes_total`, `…_rehashes_total` \
and `takumo_keys_store_key_reads_total` over the phase (– when the server does not export the counter).\n\
- **Latency**: the own client reports p50 and p99 of correct answers; h2load reports only a mean. At 64 or 256 in \
flight on shared cores latency is mostly queueing, so compare it with the baseline's.\n\
- **Flood**: the forged key is `tk_live_` + the id of the warm key + a random secret + a valid checksum, presented as \
a management call's credential; it passes every cheap check and must be refused with UNAUTHENTICATED. The own client \
adds fresh wrong secrets for all warm keys' ids (each a full argon2 verification that cannot be cached). Rows measured \
during the flood include the flood's CPU.\n\
- **Restart**: the server is killed with SIGKILL (no graceful shutdown) while the own client cycles over the cold \
keys, started again on the same database and port, and answers are counted in 250 ms buckets from its first \
SERVING health answer.\n";
// ---------------------------------------------------------------------------
// PostgreSQL statement counting.

/// Statements by kind, as classified from their SQL text.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    reads: u64,
    writes: u64,
    pings: u64,
    other: u64,
}

impl Counts {
    fn total(&self) -> u64 {
        self.reads + self.writes + self.pings + self.other
    }

    fn plus(&self, o: &Counts) -> Counts {
        Counts {
            reads: self.reads + o.reads,
            writes: self.writes + o.writes,
            pings: self.pings + o.pings,
            other: self.other + o.other,
        }
    }

    fn minus(&self, o: &Counts) -> Counts {
        Counts {
            reads: self.reads.saturating_sub(o.reads),
            writes: self.writes.saturating_sub(o.writes),
            pings: self.pings.saturating_sub(o.pings),
            other: self.other.saturating_sub(o.other),
        }
    }
}

#[derive(Default)]
struct StatementCounter {
    reads: std::sync::atomic::AtomicU64,
    writes: std::sync::atomic::AtomicU64,
    pings: std::sync::atomic::AtomicU64,
    other: std::sync::atomic::AtomicU64,
    /// Connections whose traffic could not be parsed (TLS or GSS encryption).
    opaque: std::sync::atomic::AtomicU64,
}

impl StatementCounter {
    fn snapshot(&self) -> Counts {
        Counts {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            pings: self.pings.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
        }
    }

    fn count(&self, kind: StmtKind) {
        let c = match kind {
            StmtKind::Read => &self.reads,
            StmtKind::Write => &self.writes,
            StmtKind::Ping => &self.pings,
            StmtKind::Other => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StmtKind {
    Read,
    Write,
    Ping,
    Other,
}

fn classify(sql: &str) -> StmtKind {
    let s = sql.trim().trim_end_matches(';').trim().to_ascii_lowercase();
    if s == "select 1" {
        return StmtKind::Ping;
    }
    let words: Vec<&str> =
        s.split(|c: char| !c.is_ascii_alphanumeric() && c != '_').filter(|w| !w.is_empty()).collect();
    let has = |w: &str| words.contains(&w);
    if has("insert") || has("update") || has("delete") || has("merge") {
        StmtKind::Write
    } else if matches!(words.first(), Some(&"select") | Some(&"with") | Some(&"values") | Some(&"table")) {
        StmtKind::Read
    } else {
        StmtKind::Other
    }
}

/// A pass-through TCP proxy between the server and PostgreSQL that reads the
/// frontend side of the wire protocol and counts statements: each simple
/// `Query` message, and each `Execute`, classified by the SQL of the prepared
/// statement its portal was bound to. Plain threads, so that it takes nothing
/// from the load generator's runtime; it only sees the server's few pooled
/// connections.
mod pg_proxy {
    use super::{StatementCounter, StmtKind, classify};
    use std::{
        collections::HashMap,
        io::{Read, Write},
        net::{Shutdown, SocketAddr, TcpListener, TcpStream},
        sync::{Arc, atomic::Ordering},
        thread,
    };

    pub fn start(pg_host: &str, pg_port: u16) -> (SocketAddr, Arc<StatementCounter>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the PostgreSQL proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let counter = Arc::new(StatementCounter::default());
        let upstream = format!("{pg_host}:{pg_port}");
        let c = counter.clone();
        thread::Builder::new()
            .name("pg-proxy".into())
            .spawn(move || {
                // Lives until the process exits; accepts only the server's connections.
                for client in listener.incoming().flatten() {
                    let Ok(server) = TcpStream::connect(&upstream) else {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (c2s_in, c2s_out) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                    let counter = c.clone();
                    thread::spawn(move || frontend(c2s_in, c2s_out, &counter));
                    thread::spawn(move || backend(server, client));
                }
            })
            .expect("spawn proxy thread");
        (addr, counter)
    }

    /// PostgreSQL → server: copied as is.
    fn backend(mut from: TcpStream, mut to: TcpStream) {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    }

    /// Server → PostgreSQL: forwarded first, then parsed for counting.
    fn frontend(mut from: TcpStream, mut to: TcpStream, counter: &StatementCounter) {
        let mut parser = Parser::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            parser.feed(&buf[..n], counter);
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    }

    #[derive(Default)]
    struct Parser {
        pending: Vec<u8>,
        /// Past the untyped startup message(s).
        started: bool,
        /// Encrypted or otherwise unparseable: stop looking.
        opaque: bool,
        statements: HashMap<Vec<u8>, StmtKind>,
        portals: HashMap<Vec<u8>, StmtKind>,
    }

    fn cstr(b: &[u8]) -> (&[u8], &[u8]) {
        match b.iter().position(|&c| c == 0) {
            Some(i) => (&b[..i], &b[i + 1..]),
            None => (b, &[]),
        }
    }

    impl Parser {
        fn feed(&mut self, bytes: &[u8], counter: &StatementCounter) {
            if self.opaque {
                return;
            }
            self.pending.extend_from_slice(bytes);
            let mut at = 0;
            loop {
                let rest = &self.pending[at..];
                if !self.started {
                    // Untyped: length (4 bytes, including itself), then a protocol code.
                    if rest.len() < 8 {
                        break;
                    }
                    let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                    if rest.len() < len {
                        break;
                    }
                    let code = u32::from_be_bytes(rest[4..8].try_into().unwrap());
                    match code {
                        // SSLRequest / GSSENCRequest: encryption may follow; we cannot count through it.
                        80877103 | 80877104 => {
                            self.opaque = true;
                            counter.opaque.fetch_add(1, Ordering::Relaxed);
                            self.pending.clear();
                            return;
                        }
                        // CancelRequest: a separate connection that carries nothing else.
                        80877102 => {}
                        _ => self.started = true,
                    }
                    at += len.max(8);
                    continue;
                }
                if rest.len() < 5 {
                    break;
                }
                let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
                if len < 4 {
                    self.opaque = true;
                    counter.opaque.fetch_add(1, Ordering::Relaxed);
                    self.pending.clear();
                    return;
                }
                if rest.len() < 1 + len {
                    break;
                }
                let (tag, body) = (rest[0], &rest[5..1 + len]);
                match tag {
                    b'Q' => counter.count(classify(&String::from_utf8_lossy(cstr(body).0))),
                    b'P' => {
                        let (name, rest) = cstr(body);
                        let kind = classify(&String::from_utf8_lossy(cstr(rest).0));
                        self.statements.insert(name.to_vec(), kind);
                    }
                    b'B' => {
                        let (portal, rest) = cstr(body);
                        let (stmt, _) = cstr(rest);
                        let kind = self.statements.get(stmt).copied().unwrap_or(StmtKind::Other);
                        self.portals.insert(portal.to_vec(), kind);
                    }
                    b'E' => {
                        let (portal, _) = cstr(body);
                        counter.count(self.portals.get(portal).copied().unwrap_or(StmtKind::Other));
                    }
                    b'C' => {
                        // Close: 'S' statement or 'P' portal, then the name.
                        if let Some((&which, name)) = body.split_first() {
                            let (name, _) = cstr(name);
                            if which == b'S' {
                                self.statements.remove(name);
                            } else {
                                self.portals.remove(name);
                            }
                        }
                    }
                    _ => {}
                }
                at += 1 + len;
            }
            self.pending.drain(..at);
        }
    }
}
