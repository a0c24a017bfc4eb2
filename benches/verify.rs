//! VerifyKey load benchmark: "VerifyKey at the speed of an empty RPC".
//!
//! `cargo bench --bench verify [-- FLAGS]` (see `--help`; every flag also has a
//! `TAKUMO_BENCH_*` environment variable). For each backend (SQLite, then
//! PostgreSQL) it starts the release server as a separate process on a free
//! port, creates keys through the API, and drives, at one concurrency:
//!
//! 1. `grpc.health.v1.Health/Check`: the baseline, an RPC that does nothing;
//! 2. warm `VerifyKey` over a few valid keys, after a warm-up pass;
//! 3. `VerifyKey` with malformed keys (no store, no argon2);
//! 4. cold `VerifyKey`: fresh keys, each verified exactly once (argon2-bound);
//! 5. warm `VerifyKey` again while a second client floods well-formed keys
//!    with wrong secrets for the same key ids;
//! 6. PostgreSQL only: cross-replica propagation. A second server process on
//!    the same database; a key disabled, revoked or deleted through the first
//!    must stop verifying on the second (whose cache holds it) through
//!    LISTEN/NOTIFY. Timed from just before the change call to the second
//!    replica's first answer with the new code.
//!
//! Every response's gRPC status, `valid` and `code` are checked; anything
//! unexpected is an error and is shown in the table. Results go to stdout as
//! Markdown and into `docs/performance.md` (its `## Analysis` section is kept).
//!
//! The load generator shares the machine with the server, so it is kept lean
//! (a few HTTP/2 connections, one tokio task per in-flight request, requests
//! built up front) and every figure is compared to the baseline of the same
//! run with the same client. The server's own CPU time per request is read
//! from /proc as a client-independent figure.

mod support;

use support::{PgDatabase, cpu_model, fmt_dur, free_addr, interrupted, shell};

use clap::Parser;
use std::{
    fmt::Write as _,
    future::Future,
    io::Read as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use takumo_keys::proto::pb::{
    self, CreateKeyRequest, DeleteKeyRequest, KeyStatus, RevokeKeyRequest, SetKeyStatusRequest, VerifyCode,
    VerifyKeyRequest, api_key_service_client::ApiKeyServiceClient,
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

#[derive(Debug, Clone, Parser)]
#[command(name = "verify", about = "VerifyKey load benchmark (cargo bench --bench verify -- FLAGS)")]
struct Opts {
    /// Backends to run, comma-separated: sqlite, postgres.
    #[arg(long, env = "TAKUMO_BENCH_BACKENDS", value_delimiter = ',', default_value = "sqlite,postgres")]
    backends: Vec<Backend>,
    /// Measured seconds per phase.
    #[arg(long, env = "TAKUMO_BENCH_DURATION", default_value_t = 5.0)]
    duration: f64,
    /// Baseline, warm and malformed are measured interleaved in this many rounds
    /// (each phase gets duration / rounds per round).
    #[arg(long, env = "TAKUMO_BENCH_ROUNDS", default_value_t = 3)]
    rounds: usize,
    /// Unmeasured warm-up seconds before each timed phase.
    #[arg(long, env = "TAKUMO_BENCH_WARMUP", default_value_t = 1.0)]
    warmup: f64,
    /// Requests in flight for the baseline, warm, malformed and flood phases.
    #[arg(long, env = "TAKUMO_BENCH_CONCURRENCY", default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the main client spreads them over.
    #[arg(long, env = "TAKUMO_BENCH_CONNECTIONS", default_value_t = 4)]
    connections: usize,
    /// Valid keys the warm phases cycle over.
    #[arg(long, env = "TAKUMO_BENCH_WARM_KEYS", default_value_t = 8)]
    warm_keys: usize,
    /// Fresh keys created for the cold phase; each is verified exactly once.
    #[arg(long, env = "TAKUMO_BENCH_COLD_KEYS", default_value_t = 200)]
    cold_keys: usize,
    /// Requests in flight in the cold phase (and while creating keys).
    #[arg(long, env = "TAKUMO_BENCH_COLD_CONCURRENCY", default_value_t = 4)]
    cold_concurrency: usize,
    /// Wrong-secret requests the attacking client keeps in flight.
    #[arg(long, env = "TAKUMO_BENCH_FLOOD_CONCURRENCY", default_value_t = 16)]
    flood_concurrency: usize,
    /// HTTP/2 connections of the attacking client (separate from the main client's).
    #[arg(long, env = "TAKUMO_BENCH_FLOOD_CONNECTIONS", default_value_t = 2)]
    flood_connections: usize,
    /// PostgreSQL only: rounds of the cross-replica propagation phase (0 skips it).
    /// Each round creates a key, caches it on a second replica, changes it on the
    /// first (disable, revoke, delete in turn) and times until the second agrees.
    #[arg(long, env = "TAKUMO_BENCH_PROPAGATION_ROUNDS", default_value_t = 30)]
    propagation_rounds: usize,
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
    /// Where the Markdown report goes.
    #[arg(long, env = "TAKUMO_BENCH_DOCS", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/performance.md"))]
    docs: PathBuf,
    /// Print the report only; leave docs/performance.md alone.
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
    assert!(opts.concurrency > 0 && opts.connections > 0 && opts.cold_concurrency > 0);
    assert!(opts.warm_keys > 0, "--warm-keys must be at least 1");
    if !opts.server_bin.exists() {
        // `cargo bench` builds the binary; a custom path may not exist yet.
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--bin", "takumo-keys"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --release failed");
    }
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
                r = run_backend(backend, &opts) => Some(r),
                () = interrupted() => None,
            }
        });
        let Some(report) = report else {
            eprintln!("interrupted: server stopped");
            std::process::exit(130);
        };
        println!("\n### {}\n\n{}", backend.title(), report.table(&opts));
        if let Some(p) = report.propagation_section("####") {
            println!("{p}");
        }
        reports.push(report);
    }
    let markdown = render_doc(&opts, &reports, started.elapsed());
    println!("\n{}", targets_section(&opts, &reports));
    if !opts.no_docs {
        let analysis = std::fs::read_to_string(&opts.docs)
            .ok()
            .and_then(|old| old.find("\n## Analysis").map(|i| old[i + 1..].to_owned()))
            .unwrap_or_else(|| ANALYSIS_PLACEHOLDER.to_owned());
        if let Some(dir) = opts.docs.parent() {
            std::fs::create_dir_all(dir).expect("create docs/");
        }
        std::fs::write(&opts.docs, format!("{markdown}\n{analysis}")).expect("write docs");
        eprintln!("wrote {}", opts.docs.display());
    }
    eprintln!("total {:.0?}", started.elapsed());
}

const ANALYSIS_PLACEHOLDER: &str = "## Analysis\n\n_To be filled in by the engineer: where the time goes, \
what changed since the previous run, and which targets remain open and why. This section is kept when \
the benchmark rewrites this file._\n";

// ---------------------------------------------------------------------------
// One backend: server process, keys, phases.

struct BackendReport {
    backend: Backend,
    rows: Vec<Row>,
    notes: Vec<String>,
    /// PostgreSQL with `--propagation-rounds` > 0 only.
    propagation: Option<Propagation>,
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
    label: String,
    in_flight: String,
    stats: Stats,
    /// Server process CPU seconds over the phase.
    server_cpu_s: Option<f64>,
    db: Option<DbWindow>,
    extra: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Baseline,
    Warm,
    Malformed,
    Cold,
    Flooded,
    Flood,
}

async fn run_backend(backend: Backend, opts: &Opts) -> BackendReport {
    let tmp = tempfile::Builder::new().prefix("takumo-bench-").tempdir().expect("tempdir");
    let mut env: Vec<(String, String)> = vec![("TAKUMO_SERVICE_TOKENS".into(), format!("bench={SERVICE_TOKEN}"))];
    // Declared before the server so that it is dropped (the database dropped) after it.
    let mut pg: Option<PgDatabase> = None;
    let mut counter: Option<Arc<StatementCounter>> = None;
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

    // Bootstrap (migrations, first key) talks to the database directly; the
    // server goes through the counting proxy.
    let bootstrap_key = bootstrap(opts, &env);
    if let Some(db) = pg.as_ref().filter(|_| !opts.no_pg_proxy) {
        let (proxy_addr, c) = pg_proxy::start(&opts.pg_host, opts.pg_port);
        let url = db.url_via(&proxy_addr.ip().to_string(), proxy_addr.port());
        env.iter_mut().filter(|(k, _)| k == "DATABASE_URL").for_each(|(_, v)| *v = url.clone());
        counter = Some(c);
    }
    let db_snap = || counter.as_ref().map(|c| (c.snapshot(), Instant::now()));
    let db_since = |start: Option<(Counts, Instant)>| {
        start.map(|(c0, t0)| DbWindow {
            counts: counter.as_ref().expect("counter").snapshot().minus(&c0),
            secs: t0.elapsed().as_secs_f64(),
        })
    };
    let addr = free_addr();
    env.push(("TAKUMO_LISTEN".into(), addr.to_string()));
    let server = Server::start(opts, &env, &tmp.path().join("server.log"));
    server.wait_ready(addr).await;
    eprintln!("server pid {} on {addr}", server.pid());

    let channels = connect(addr, opts.connections).await;
    let auth: AsciiMetadataValue = format!("Bearer {SERVICE_TOKEN}").parse().expect("ascii");
    let admin = ApiKeyServiceClient::new(channels[0].clone());

    // Keys: the bootstrap key plus created ones for the warm phases, fresh ones for the cold phase.
    let t = Instant::now();
    let mut warm_keys = vec![bootstrap_key];
    warm_keys.extend(create_keys(&admin, &auth, opts.warm_keys.saturating_sub(1), opts.cold_concurrency, "warm").await);
    let cold_keys = create_keys(&admin, &auth, opts.cold_keys, opts.cold_concurrency, "cold").await;
    eprintln!("created {} keys in {:.1?}", warm_keys.len() - 1 + cold_keys.len(), t.elapsed());

    let warm_reqs: Arc<[VerifyKeyRequest]> = warm_keys.iter().map(|k| verify_req(k)).collect();
    let malformed_reqs: Arc<[VerifyKeyRequest]> = [
        "tk_live_notakey".to_owned(),
        "not-a-key-at-all".to_owned(),
        // Right shape and alphabet, wrong checksum.
        format!("{}000000", &warm_keys[0][..KEY_LEN - 6]),
        format!("tk_test_{}", "x".repeat(KEY_LEN - 8)),
    ]
    .iter()
    .map(|k| verify_req(k))
    .collect();
    let warm_ids: Arc<[String]> = warm_keys.iter().map(|k| k[ID_RANGE].to_owned()).collect();

    let dur = Duration::from_secs_f64(opts.duration);
    let warmup = Duration::from_secs_f64(opts.warmup);
    let c = opts.concurrency;
    let cpu = ProcCpu::new(server.pid());
    let me = ProcCpu::new(std::process::id());
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let probe = Probe { cpu: &cpu, counter: counter.as_deref() };

    // (a) baseline, (b) warm and (c) malformed are measured interleaved, in
    // rounds of a slice each, so that drifting machine load hits all three alike.
    let health = |i: usize| HealthJob { client: HealthClient::new(channels[i % channels.len()].clone()) };
    let warm = |i: usize| VerifyJob {
        client: ApiKeyServiceClient::new(channels[i % channels.len()].clone()),
        auth: auth.clone(),
        reqs: warm_reqs.clone(),
        next: i,
        expect: Expect::Valid,
    };
    let malformed = |i: usize| VerifyJob {
        client: ApiKeyServiceClient::new(channels[i % channels.len()].clone()),
        auth: auth.clone(),
        reqs: malformed_reqs.clone(),
        next: i,
        expect: Expect::Code(VerifyCode::Malformed),
    };
    // Warm-up: every warm key once (first sight), then each load for the warm-up time.
    for k in warm_keys.iter() {
        let mut j = warm(0);
        j.reqs = Arc::new([verify_req(k)]);
        if let Some(Outcome::Error(e)) = j.call().await {
            eprintln!("warning: warm-up verify failed: {e}");
        }
    }
    run_for(c, warmup, health).await;
    run_for(c, warmup, warm).await;
    run_for(c, warmup, malformed).await;

    let rounds = opts.rounds.max(1);
    let slice = dur / rounds as u32;
    let (mut base_m, mut warm_m, mut bad_m) = (Measured::default(), Measured::default(), Measured::default());
    let (sys0, srv0, me0, t0) = (sys_busy_seconds(), cpu.seconds(), me.seconds(), Instant::now());
    for _ in 0..rounds {
        base_m.add(probe.measure(c, slice, health).await);
        warm_m.add(probe.measure(c, slice, warm).await);
        bad_m.add(probe.measure(c, slice, malformed).await);
    }
    // CPU used by anything but the server and this bench (PostgreSQL included) while measuring.
    let others = (|| {
        let busy = sys_busy_seconds()? - sys0?;
        let ours = (cpu.seconds()? - srv0?) + (me.seconds()? - me0?);
        Some(((busy - ours) / t0.elapsed().as_secs_f64()).max(0.0))
    })();
    if let Some(o) = others {
        let flag = if o > 0.25 { " — **noisy: compare with care**" } else { "" };
        notes.push(format!(
            "other processes used {o:.2} CPUs on average while baseline, warm and malformed were measured{flag}"
        ));
    }
    rows.push(base_m.row(Phase::Baseline, "health baseline (`Health/Check`)", c.to_string()));
    rows.push(warm_m.row(Phase::Warm, &format!("warm verify ({} keys)", warm_keys.len()), c.to_string()));
    rows.push(bad_m.row(Phase::Malformed, "malformed verify", c.to_string()));
    eprintln!("baseline, warm, malformed done ({rounds} rounds)");

    // (d) Cold verify: each fresh key once.
    if !cold_keys.is_empty() {
        let cold_reqs: Arc<[VerifyKeyRequest]> = cold_keys.iter().map(|k| verify_req(k)).collect();
        let next = Arc::new(AtomicUsize::new(0));
        let cold = |i: usize| ColdJob {
            client: ApiKeyServiceClient::new(channels[i % channels.len()].clone()),
            auth: auth.clone(),
            reqs: cold_reqs.clone(),
            next: next.clone(),
        };
        let (cpu0, db0) = (cpu.seconds(), db_snap());
        let stats = run_jobs((0..opts.cold_concurrency).map(cold).collect(), None, None).await;
        let cold_p50 = stats.percentile(0.5);
        let mut row = Row::new(
            Phase::Cold,
            &format!("cold verify ({} fresh keys, once each)", cold_keys.len()),
            opts.cold_concurrency.to_string(),
            stats,
            cpu.since(cpu0),
        );
        row.db = db_since(db0);
        if cold_p50.is_some_and(|p| p < Duration::from_millis(5)) {
            row.extra = "p50 < 5 ms: argon2 did not run? (keys cached at creation?)".into();
        }
        rows.push(row);
        eprintln!("cold done");
    }

    // (e) Warm verify while a second client floods wrong secrets for the same ids.
    let flood_channels = connect(addr, opts.flood_connections.max(1)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let flood_jobs: Vec<FloodJob> = (0..opts.flood_concurrency)
        .map(|i| FloodJob {
            client: ApiKeyServiceClient::new(flood_channels[i % flood_channels.len()].clone()),
            auth: auth.clone(),
            ids: warm_ids.clone(),
            next: i,
            rng: rand::SeedableRng::from_os_rng(),
        })
        .collect();
    let flood = if flood_jobs.is_empty() {
        None
    } else {
        let stop = stop.clone();
        Some(tokio::spawn(async move { run_jobs(flood_jobs, None, Some(stop)).await }))
    };
    run_for(c, warmup, warm).await;
    let (cpu0, db0) = (cpu.seconds(), db_snap());
    let stats = run_for(c, dur, warm).await;
    let (server_cpu, db) = (cpu.since(cpu0), db_since(db0));
    stop.store(true, Ordering::Relaxed);
    let in_flight = if flood.is_some() { format!("{c} + {} flood", opts.flood_concurrency) } else { c.to_string() };
    let mut row = Row::new(Phase::Flooded, "warm verify under wrong-secret flood", in_flight, stats, server_cpu);
    row.db = db;
    rows.push(row);
    if let Some(flood) = flood {
        let stats = flood.await.expect("flood task");
        let mut row = Row::new(
            Phase::Flood,
            "↳ the flood itself (wrong secrets, expect NOT_FOUND)",
            opts.flood_concurrency.to_string(),
            stats,
            None,
        );
        if row.stats.shed > 0 {
            row.extra = format!("{} shed (RESOURCE_EXHAUSTED)", row.stats.shed);
        }
        rows.push(row);
    }
    eprintln!("flood done");

    // (f) Cross-replica propagation: a second server process on the same
    // database (same environment, its own port). Started only now, so that its
    // background work stays out of the measured windows above; killed on drop
    // like the first, panics and interrupts included.
    let mut propagation = None;
    if backend == Backend::Postgres && opts.propagation_rounds > 0 {
        let addr_b = free_addr();
        let mut env_b = env.clone();
        env_b.iter_mut().filter(|(k, _)| k == "TAKUMO_LISTEN").for_each(|(_, v)| *v = addr_b.to_string());
        let server_b = Server::start(opts, &env_b, &tmp.path().join("server-b.log"));
        server_b.wait_ready(addr_b).await;
        eprintln!("replica B: server pid {} on {addr_b}", server_b.pid());
        let channel_b = connect(addr_b, 1).await.remove(0);
        let mut p = run_propagation(channels[0].clone(), channel_b, &auth, opts.propagation_rounds).await;
        let log_b = server_b.stop();
        if let Some(w) = warnings(&log_b) {
            p.notes.push(format!("replica B logged warnings/errors, e.g. {w}"));
        }
        eprintln!("propagation done ({} rounds, {} failed)", p.rounds.len(), p.failed());
        propagation = Some(p);
    }

    let log = server.stop();
    if counter.as_ref().is_some_and(|c| c.opaque.load(Ordering::Relaxed) > 0) {
        notes.push("some PostgreSQL connections negotiated TLS/GSS, so their statements were not counted".into());
    }
    if let Some(w) = warnings(&log) {
        notes.push(format!("server logged warnings/errors, e.g. {w}"));
    }
    for r in &rows {
        for e in &r.stats.first_errors {
            notes.push(format!("{}: {e}", r.label));
        }
    }
    drop(pg);
    BackendReport { backend, rows, notes, propagation }
}

/// Up to three WARN/ERROR lines of a server log, quoted, if there are any.
fn warnings(log: &str) -> Option<String> {
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ") || l.contains(" WARN ")).take(3).collect();
    (!lines.is_empty()).then(|| format!("`{}`", lines.join("` / `")))
}

fn verify_req(key: &str) -> VerifyKeyRequest {
    VerifyKeyRequest { key: key.to_owned(), required_scopes: vec![REQUIRED_SCOPE.to_owned()], organization_id: None }
}

/// Runs `concurrency` jobs made by `make` for `dur`.
async fn run_for<J: Job>(concurrency: usize, dur: Duration, make: impl Fn(usize) -> J) -> Stats {
    if dur.is_zero() {
        return Stats::default();
    }
    run_jobs((0..concurrency).map(make).collect(), Some(Instant::now() + dur), None).await
}

/// What one timed slice measures besides the load itself.
struct Probe<'a> {
    cpu: &'a ProcCpu,
    counter: Option<&'a StatementCounter>,
}

impl Probe<'_> {
    async fn measure<J: Job>(&self, c: usize, dur: Duration, make: impl Fn(usize) -> J) -> Measured {
        let (cpu0, db0, t0) = (self.cpu.seconds(), self.counter.map(|c| c.snapshot()), Instant::now());
        let stats = run_for(c, dur, make).await;
        Measured {
            server_cpu_s: self.cpu.since(cpu0),
            db: self
                .counter
                .zip(db0)
                .map(|(c, c0)| DbWindow { counts: c.snapshot().minus(&c0), secs: t0.elapsed().as_secs_f64() }),
            stats,
        }
    }
}

/// Sums of the slices of one phase.
#[derive(Default)]
struct Measured {
    stats: Stats,
    server_cpu_s: Option<f64>,
    db: Option<DbWindow>,
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
    }

    fn row(self, kind: Phase, label: &str, in_flight: String) -> Row {
        let mut row = Row::new(kind, label, in_flight, self.stats, self.server_cpu_s);
        row.db = self.db;
        row
    }
}

async fn create_keys(
    client: &ApiKeyServiceClient<Channel>,
    auth: &AsciiMetadataValue,
    n: usize,
    concurrency: usize,
    tag: &str,
) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (mut client, auth, next, tag) = (client.clone(), auth.clone(), next.clone(), tag.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return out;
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

fn create_key_req(name: &str) -> CreateKeyRequest {
    CreateKeyRequest {
        organization_id: ORG.into(),
        name: name.to_owned(),
        scopes: Some(pb::create_key_request::Scopes::Preset(pb::ScopePreset::ReadOnly as i32)),
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
        use rand::Rng as _;
        let id = &self.ids[self.next % self.ids.len()];
        self.next = self.next.wrapping_add(1);
        let mut key = String::with_capacity(KEY_LEN);
        key.push_str("tk_live_");
        key.push_str(id);
        for _ in 0..32 {
            key.push(BASE62[self.rng.random_range(0..62)] as char);
        }
        let sum = checksum(&key);
        key.push_str(&sum);
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
// Server process, bootstrap, PostgreSQL database.

fn server_command(opts: &Opts, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(&opts.server_bin);
    // Only our settings: drop any TAKUMO_* / DATABASE_URL / RUST_LOG from the caller.
    for (k, _) in std::env::vars() {
        if k.starts_with("TAKUMO_") || k == "DATABASE_URL" || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

fn bootstrap(opts: &Opts, env: &[(String, String)]) -> String {
    let out = server_command(opts, env)
        .args(["bootstrap", "--organization", ORG, "--member", "bench", "--plan", "enterprise"])
        .stdin(Stdio::null())
        .output()
        .expect("run takumo-keys bootstrap");
    assert!(out.status.success(), "bootstrap failed: {}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).expect("utf-8").trim().to_owned();
    assert_eq!(key.len(), KEY_LEN, "bootstrap printed an unexpected key shape");
    key
}

/// The server process; killed on drop, panics included.
struct Server {
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    fn start(opts: &Opts, env: &[(String, String)], log: &Path) -> Self {
        let log_file = std::fs::File::create(log).expect("server log file");
        let child = server_command(opts, env)
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
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn read_log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
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

impl Row {
    fn new(kind: Phase, label: &str, in_flight: String, stats: Stats, server_cpu_s: Option<f64>) -> Self {
        Row { kind, label: label.to_owned(), in_flight, stats, server_cpu_s, db: None, extra: String::new() }
    }
}

impl BackendReport {
    fn row(&self, kind: Phase) -> Option<&Row> {
        self.rows.iter().find(|r| r.kind == kind)
    }

    fn baseline_rps(&self) -> Option<f64> {
        self.row(Phase::Baseline).map(|r| r.stats.rps())
    }

    fn table(&self, opts: &Opts) -> String {
        let base = self.baseline_rps();
        let warm = self.row(Phase::Warm).map(|r| r.stats.rps());
        let mut t = String::from(
            "| phase | in flight | req/s | p50 | p99 | ratio to baseline | errors | DB statements per 10k | server CPU per req | notes |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        );
        for r in &self.rows {
            let rps = r.stats.rps();
            let mut ratio = match base {
                Some(b) if b > 0.0 && r.kind != Phase::Baseline => format!("{:.3}×", rps / b),
                Some(_) if r.kind == Phase::Baseline => "1×".into(),
                _ => "–".into(),
            };
            if r.kind == Phase::Flooded
                && let Some(w) = warm.filter(|w| *w > 0.0)
            {
                let _ = write!(ratio, " ({:.2}× unloaded warm)", rps / w);
            }
            let errors = if r.stats.errors > 0 { format!("**{}**", r.stats.errors) } else { "0".into() };
            let requests = r.stats.ok + r.stats.errors;
            let db = match (r.db, self.backend) {
                (Some(w), _) => {
                    let c = w.counts;
                    let detail = format!(
                        "{} read, {} write, {} ping, {} other in {:.1} s",
                        c.reads, c.writes, c.pings, c.other, w.secs
                    );
                    if r.kind == Phase::Baseline {
                        format!("– ({detail})")
                    } else if r.kind == Phase::Flooded {
                        format!("– ({detail}, flood included)")
                    } else {
                        format!("{:.1} ({detail})", c.total() as f64 * 10_000.0 / requests.max(1) as f64)
                    }
                }
                (None, Backend::Sqlite) if r.kind == Phase::Warm => "n/a".into(),
                (None, Backend::Postgres) if r.kind == Phase::Warm => "n/a (no proxy)".into(),
                _ => String::new(),
            };
            let cpu = match r.server_cpu_s {
                Some(s) if requests > 0 => {
                    let per = fmt_dur(Duration::from_secs_f64(s.max(0.0) / requests as f64));
                    if r.kind == Phase::Flooded { format!("{per} (flood included)") } else { per }
                }
                _ => "–".into(),
            };
            let mut notes = format!("{} ok in {:.1} s", r.stats.ok, r.stats.elapsed.as_secs_f64());
            if !r.extra.is_empty() {
                let _ = write!(notes, "; {}", r.extra);
            }
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.label,
                r.in_flight,
                fmt_rps(rps),
                r.stats.percentile(0.5).map_or("–".into(), fmt_dur),
                r.stats.percentile(0.99).map_or("–".into(), fmt_dur),
                ratio,
                errors,
                db,
                cpu,
                notes,
            );
        }
        if self.backend == Backend::Postgres {
            let _ = write!(
                t,
                "\nDB statements per 10k: statements the server sent to PostgreSQL during the measured window \
                 (Execute and simple-Query messages, counted by a pass-through proxy between the server and \
                 PostgreSQL), per 10,000 requests of the phase; in brackets the raw counts by kind: `read` \
                 (SELECT), `write` (INSERT/UPDATE/DELETE), `ping` (`SELECT 1`) and `other`. The count includes \
                 the service's background work, whatever the load: a health ping every {HEALTH_PING_EVERY_S:.0} s \
                 and a usage flush every {USAGE_FLUSH_EVERY_S:.0} s (when there is usage to write); the baseline \
                 row shows that background alone.\n"
            );
        } else {
            t.push_str("\nDB statements per 10k: not measured for SQLite (embedded, no wire to count on).\n");
        }
        if opts.concurrency != 64 {
            let _ = writeln!(t, "\nNote: run at {} in flight, not 64.", opts.concurrency);
        }
        for n in &self.notes {
            let _ = writeln!(t, "\n- {n}");
        }
        t
    }

    fn targets(&self, opts: &Opts) -> Vec<(&'static str, String)> {
        let base = self.baseline_rps().unwrap_or(0.0);
        let verdict = |ok: bool, detail: String, rows: &[Phase]| {
            let errs: u64 = rows.iter().filter_map(|k| self.row(*k)).map(|r| r.stats.errors).sum();
            let base_errs = self.row(Phase::Baseline).map_or(0, |r| r.stats.errors);
            if errs + base_errs > 0 {
                format!("**not met** ({detail}; {} errors, figures untrustworthy)", errs + base_errs)
            } else if ok {
                format!("met ({detail})")
            } else {
                format!("**not met** ({detail})")
            }
        };
        let ratio = |k: Phase| self.row(k).map(|r| r.stats.rps() / base.max(1e-9));
        let mut out = Vec::new();
        if let Some(r) = ratio(Phase::Warm) {
            out.push(("warm verify ≥ 0.8× baseline req/s", verdict(r >= 0.8, format!("{r:.3}×"), &[Phase::Warm])));
        }
        if let Some(r) = ratio(Phase::Malformed) {
            out.push((
                "malformed verify ≥ 0.9× baseline req/s",
                verdict(r >= 0.9, format!("{r:.3}×"), &[Phase::Malformed]),
            ));
        }
        if let Some(p99) = self.row(Phase::Warm).and_then(|r| r.stats.percentile(0.99)) {
            let note =
                if opts.concurrency == 64 { String::new() } else { format!(" at {} in flight", opts.concurrency) };
            let base_p99 = self
                .row(Phase::Baseline)
                .and_then(|r| r.stats.percentile(0.99))
                .map_or(String::new(), |b| format!("; the empty RPC's p99 {}", fmt_dur(b)));
            out.push((
                "warm verify p99 ≤ 2 ms at 64 in flight",
                verdict(
                    p99 <= Duration::from_millis(2),
                    format!("p99 {}{note}{base_p99}", fmt_dur(p99)),
                    &[Phase::Warm],
                ),
            ));
        }
        let db_target = "zero DB reads for warm verifications; usage writes ≤ one batched statement per flush interval";
        match self.row(Phase::Warm).and_then(|r| r.db) {
            Some(w) => {
                let c = w.counts;
                // Usage recorded in a warm slice may be flushed during the next
                // (interleaved) slice, so writes are judged over all three phases' windows.
                let (writes, secs) = [Phase::Baseline, Phase::Warm, Phase::Malformed]
                    .iter()
                    .filter_map(|k| self.row(*k).and_then(|r| r.db))
                    .fold((0, 0.0), |(n, t), d| (n + d.counts.writes, t + d.secs));
                // One flush per interval, plus one for a window that straddles an extra tick.
                let write_budget = (secs / USAGE_FLUSH_EVERY_S).ceil() as u64 + 1;
                out.push((
                    db_target,
                    verdict(
                        c.reads == 0 && c.other == 0 && writes <= write_budget,
                        format!(
                            "warm: {} reads, {} other in {:.1} s; usage writes {writes} in {secs:.1} s \
                             of interleaved rounds, budget {write_budget}",
                            c.reads, c.other, w.secs
                        ),
                        &[Phase::Warm],
                    ),
                ));
            }
            None if self.backend == Backend::Postgres => {
                out.push((db_target, "n/a (run without the counting proxy)".into()))
            }
            None => out.push((db_target, "n/a (not measured on SQLite)".into())),
        }
        if let (Some(f), Some(w)) = (self.row(Phase::Flooded), self.row(Phase::Warm)) {
            let r = f.stats.rps() / w.stats.rps().max(1e-9);
            out.push((
                "under wrong-secret flood, good-key warm verify ≥ 0.5× unloaded",
                verdict(r >= 0.5, format!("{r:.2}×"), &[Phase::Flooded, Phase::Warm]),
            ));
        }
        out.push((PROPAGATION_TARGET, self.propagation_verdict()));
        out
    }

    /// Judged by the slowest round: every change must reach the other replica within 1 s.
    fn propagation_verdict(&self) -> String {
        let Some(p) = &self.propagation else {
            return match self.backend {
                Backend::Sqlite => "n/a (one process; measured on PostgreSQL)".into(),
                Backend::Postgres => "n/a (`--propagation-rounds 0`)".into(),
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
        if n > 0 && failed == 0 && max.is_some_and(|m| m <= Duration::from_secs(1)) {
            format!("met ({detail})")
        } else {
            format!("**not met** ({detail})")
        }
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

fn targets_section(opts: &Opts, reports: &[BackendReport]) -> String {
    let mut s = String::from(
        "## Targets\n\nFrom the figures above (ratios are within one run, same client on both sides).\n\n| target |",
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
    // Every target any backend judged, in first-seen order.
    let mut names: Vec<&str> = Vec::new();
    for (name, _) in per.iter().flatten() {
        if !names.contains(name) {
            names.push(name);
        }
    }
    for name in names {
        let _ = write!(s, "| {name} |");
        for p in &per {
            let _ = write!(s, " {} |", p.iter().find(|(n, _)| *n == name).map_or("–", |(_, v)| v.as_str()));
        }
        s.push('\n');
    }
    s
}

fn render_doc(opts: &Opts, reports: &[BackendReport], total: Duration) -> String {
    let mut s = String::new();
    let argv: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let cmd = if argv.is_empty() {
        "cargo bench --bench verify".to_owned()
    } else {
        format!("cargo bench --bench verify -- {}", argv.join(" "))
    };
    let _ = writeln!(s, "# Performance: VerifyKey at the speed of an empty RPC\n");
    let _ = writeln!(
        s,
        "Generated by `benches/verify.rs`; everything above `## Analysis` is rewritten on each run, \
         the Analysis section is kept.\n"
    );
    let _ = writeln!(s, "Command:\n\n```sh\n{cmd}\n```\n");
    let _ = writeln!(s, "## Machine and run\n");
    let _ = writeln!(s, "- Date: {}", chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"));
    let _ = writeln!(
        s,
        "- Machine: {} CPUs (nproc), {}; Linux {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        shell(&["uname", "-r"])
    );
    let _ = writeln!(s, "- Source: {}", git_description());
    let _ = writeln!(
        s,
        "- Load generator: this bench (tonic client, {} tokio threads) on the same cores as the server; \
         {} in flight over {} HTTP/2 connections; {:.1} s measured per phase after {:.1} s warm-up, \
         baseline, warm and malformed interleaved in {} rounds of {:.2} s each (A B C A B C …); {} warm keys; cold phase {} fresh keys at {} in flight; flood {} in flight over {} connections \
         (random wrong secrets for the warm keys' ids); cross-replica propagation {} rounds (PostgreSQL only). \
         Total run {:.0} s.",
        opts.client_threads,
        opts.concurrency,
        opts.connections,
        opts.duration,
        opts.warmup,
        opts.rounds.max(1),
        opts.duration / opts.rounds.max(1) as f64,
        opts.warm_keys,
        opts.cold_keys,
        opts.cold_concurrency,
        opts.flood_concurrency,
        opts.flood_connections,
        opts.propagation_rounds,
        total.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "- Server: release build, default settings (argon2id m=19456 KiB, t=2, p=1), one process per backend \
         (plus a second replica on PostgreSQL for the propagation phase only), fresh database; PostgreSQL over \
         TCP loopback with `sslmode=disable`."
    );
    let _ = writeln!(
        s,
        "- Every response is checked (gRPC status, `valid`, `code`); req/s and latencies count correct responses only, \
         anything else is in the errors column. Server CPU per request is the server process's user + system time \
         over the phase divided by requests (PostgreSQL's own CPU is not included)."
    );
    let _ = writeln!(
        s,
        "- Reading the figures: the client costs about as much CPU per request as the server and runs on the \
         same cores, so req/s ratios understate the server-side difference (the server CPU column does not); \
         p99 at 64 in flight on shared cores is mostly scheduling, so compare it with the baseline's p99. The \
         flood is CPU-bound by argon2 (about 15 ms per wrong guess), so its own req/s stays low by design; what matters is \
         the good keys' row. On PostgreSQL the server reaches the database through the bench's counting proxy \
         (one extra loopback hop per statement; `--no-pg-proxy` to bypass it)."
    );
    if opts.duration < 3.0 {
        let _ = writeln!(s, "- **Short run** ({:.1} s per phase): a smoke test, not a measurement.", opts.duration);
    }
    s.push('\n');
    for r in reports {
        let _ = writeln!(s, "## {}\n\n{}", r.backend.title(), r.table(opts));
        if let Some(p) = r.propagation_section("###") {
            let _ = writeln!(s, "{p}");
        }
    }
    s.push_str(&targets_section(opts, reports));
    s
}

fn fmt_rps(r: f64) -> String {
    if r >= 100.0 { format!("{:.0}", r) } else { format!("{r:.1}") }
}

fn git_description() -> String {
    let head = shell(&["git", "rev-parse", "--short", "HEAD"]);
    let dirty = shell(&["git", "status", "--porcelain", "--", "src", "Cargo.toml", "migrations"]);
    if dirty.is_empty() || dirty == "?" {
        format!("commit {head}")
    } else {
        format!("commit {head} plus uncommitted changes in src/ (work in progress)")
    }
}

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
