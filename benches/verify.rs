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
//!
//! The code: this file (flags, one backend's run), `verify/` (the phases,
//! the own client's calls, the report) and `support/` (shared with the soak:
//! the server process, the load engine, /proc, metrics, results files,
//! PostgreSQL and h2load).

#[path = "support/mod.rs"]
mod support;

#[path = "verify/calls.rs"]
mod calls;
#[path = "verify/h2call.rs"]
mod h2call;
#[path = "verify/measure.rs"]
mod measure;
#[path = "verify/phases.rs"]
mod phases;
#[path = "verify/propagation.rs"]
mod propagation;
#[path = "verify/report.rs"]
mod report;
#[path = "verify/restart.rs"]
mod restart;

use support::{
    h2load::H2load,
    load::connect,
    pgdb::PgDatabase,
    pgproxy::{self, StatementCounter},
    procfs::ProcCpu,
    report::write_results,
    server::{Server, ensure_server_built, free_addr, interrupted, server_command, warn_lines},
};

use clap::Parser;
use measure::{Ctx, Keys, Row};
use propagation::Propagation;
use restart::Restart;
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};
use takumo_keys::domain::keys::KEY_LEN;

const SERVICE_TOKEN: &str = "bench-service-token-0123456789abcdefghijklmnop";
const PG_PEPPER: &str = "bench-pepper-0123456789abcdef";
const ORG: &str = "bench";
const REQUIRED_SCOPE: &str = "fleet.read";
/// Key layout: `tk_live_` (8) + id (16) + secret (32) + checksum (6).
const ID_RANGE: std::ops::Range<usize> = 8..24;
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
    ensure_server_built(&opts.server_bin);
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
    println!("\n{}", report::targets_section(&opts, &reports));
    if !opts.no_docs {
        write_results(&opts.docs, &report::render_results(&opts, &reports, &h2load_version, started.elapsed()));
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

async fn run_backend(backend: Backend, opts: &Opts, h2load: &H2load) -> BackendReport {
    let tmp = tempfile::Builder::new().prefix("takumo-bench-").tempdir().expect("tempdir");
    // Declared before the server so that it is dropped (the database dropped) after it.
    let (mut env, pg) = backend_env(backend, opts, tmp.path());
    let pg_version = pg.as_ref().map(|db| db.psql("SHOW server_version"));

    // Bootstrap (migrations, the organization on Enterprise so that 20,000
    // keys fit) talks to the database directly; the server goes through the
    // counting proxy.
    bootstrap(opts, &env);
    let counter = pg.as_ref().filter(|_| !opts.no_pg_proxy).map(|db| through_proxy(opts, db, &mut env));
    let (addr, metrics) = (free_addr(), free_addr());
    let mut server = Server::start(&opts.server_bin, &env, &tmp.path().join("server.log"), addr, metrics);
    server.wait_ready().await;
    eprintln!("server pid {} on {addr} (metrics {metrics})", server.pid());

    let ctx = Ctx {
        opts,
        addr,
        metrics,
        channels: connect(addr, opts.connections, None).await,
        auth: format!("Bearer {SERVICE_TOKEN}").parse().expect("ascii"),
        cpu: ProcCpu::new(server.pid()),
        counter,
        dir: tmp.path().to_owned(),
    };
    let mut notes = Vec::new();
    let keys = phases::create_all_keys(&ctx, &mut notes).await;
    let (rows, check_failures) = measured_phases(&ctx, h2load, &keys, &mut notes).await;

    // (f) Cross-replica propagation, on a second server process started only now.
    let mut propagation = None;
    if backend == Backend::Postgres && opts.propagation_rounds > 0 {
        propagation = Some(propagation::replica_phase(&ctx, &env).await);
    }

    // (g) Restart, last: it replaces the server process.
    let mut restart = None;
    if backend == Backend::Postgres && opts.restart_after > 0.0 && !keys.cold.is_empty() {
        let r = restart::restart_phase(&ctx, &mut server, &env, &keys.cold).await;
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

/// The server's environment for `backend` (service token, database URL,
/// pepper), and the fresh PostgreSQL database behind it, if any.
fn backend_env(backend: Backend, opts: &Opts, dir: &Path) -> (Vec<(String, String)>, Option<PgDatabase>) {
    let mut env: Vec<(String, String)> = vec![("TAKUMO_SERVICE_TOKENS".into(), format!("bench={SERVICE_TOKEN}"))];
    let mut pg = None;
    match backend {
        Backend::Sqlite => {
            let db = dir.join("keys.db");
            env.push(("DATABASE_URL".into(), format!("sqlite://{}", db.display())));
        }
        Backend::Postgres => {
            let db = PgDatabase::create("takumo_bench", &opts.pg_host, opts.pg_port, &opts.pg_user);
            env.push(("DATABASE_URL".into(), db.url()));
            env.push(("TAKUMO_PEPPER".into(), PG_PEPPER.into()));
            pg = Some(db);
        }
    }
    (env, pg)
}

/// Starts the statement-counting proxy in front of PostgreSQL and points the
/// server's `DATABASE_URL` at it.
fn through_proxy(opts: &Opts, db: &PgDatabase, env: &mut [(String, String)]) -> Arc<StatementCounter> {
    let (proxy_addr, counter) = pgproxy::start(&opts.pg_host, opts.pg_port);
    let url = db.url_via(&proxy_addr.ip().to_string(), proxy_addr.port());
    env.iter_mut().filter(|(k, _)| k == "DATABASE_URL").for_each(|(_, v)| *v = url.clone());
    counter
}

/// (a)–(e): the own client's and h2load's rounds, cold, and the flood; the
/// rows, and the h2load checks that did not hold.
async fn measured_phases(
    ctx: &Ctx<'_>,
    h2load: &H2load,
    keys: &Keys,
    notes: &mut Vec<String>,
) -> (Vec<Row>, Vec<String>) {
    let mut rows = Vec::new();
    let mut check_failures = Vec::new();
    rows.extend(phases::own_client_rounds(ctx, keys, notes).await);
    eprintln!("own client: baseline, warm, malformed done");
    rows.extend(phases::h2load_rounds(ctx, h2load, keys, &mut check_failures).await);
    eprintln!("h2load: baseline, warm, malformed done");
    if !keys.cold.is_empty() {
        rows.push(phases::cold_phase(ctx, &keys.cold).await);
        eprintln!("cold done");
    }
    rows.extend(phases::flood_phase(ctx, h2load, keys, &mut check_failures).await);
    eprintln!("flood done");
    (rows, check_failures)
}

/// Migrates the database and puts the organization on Enterprise (no key limit).
fn bootstrap(opts: &Opts, env: &[(String, String)]) {
    let out = server_command(&opts.server_bin, env)
        .args(["bootstrap", "--organization", ORG, "--member", "bench", "--plan", "enterprise"])
        .stdin(Stdio::null())
        .output()
        .expect("run takumo-keys bootstrap");
    assert!(out.status.success(), "bootstrap failed: {}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).expect("utf-8").trim().to_owned();
    assert_eq!(key.len(), KEY_LEN, "bootstrap printed an unexpected key shape");
}

/// Up to three WARN/ERROR lines of a server log, quoted, if there are any.
fn warnings(log: &str) -> Option<String> {
    let lines: Vec<&str> = warn_lines(log).take(3).collect();
    (!lines.is_empty()).then(|| format!("`{}`", lines.join("` / `")))
}
