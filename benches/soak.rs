//! Soak: a mixed workload against two replicas sharing one PostgreSQL database.
//!
//! `cargo bench --bench soak [-- FLAGS]` (see `--help`; every flag also has a
//! `TAKUMO_SOAK_*` environment variable). Not part of the test suite: without
//! `--bench` (as under `cargo test --all-targets`) it does nothing.
//!
//! It creates a fresh PostgreSQL database, starts two release servers on it
//! (free ports, one pepper and service token, a modest verified-key cache,
//! metrics on), puts a few organizations on the Enterprise plan, creates
//! keys, and then, after a warm-up, drives for a bounded time, spread over
//! both replicas:
//!
//! - closed-loop `VerifyKey` workers (`--concurrency`): mostly warm valid keys,
//!   plus keys created during the run, toggled keys, insufficient scope, wrong
//!   organization, malformed keys and well-formed unknown keys (`--mix`);
//! - paced tasks: wrong secrets for real key ids (argon2 each); `CreateKey`,
//!   each new key then verified on the other replica and added to the pool
//!   the workers verify; a key lifecycle (create, verify on both replicas,
//!   revoke and/or delete, verify again on both, re-enable a revoked key,
//!   delete twice, get a deleted key); `SetKeyStatus` toggles of keys kept for
//!   that, each change checked on the replica that made it (at once) and on
//!   the other (within `--propagation-bound-ms`); full `ListKeys` walks with
//!   pagination, and `GetKeyStats`.
//!
//! Every answer is checked for the outcome it must have; anything else (a gRPC
//! error, a wrong code, a wrong identity, a listing that misses a key or is
//! out of order) is an error, and there must be none. At the end it reports
//! requests by kind, verifications/s and latencies, each server's resident
//! memory after the warm-up and at the end, the cache gauge, and compares
//! each organization's stored `api_calls_24h` with the accepted (VALID)
//! verifications. Results go to stdout and to `docs/reliability-results.md`,
//! which this bench owns and rewrites whole (`--docs` elsewhere, `--no-docs`
//! not at all). The analysis, the fault-test findings and the fuzzing record
//! are hand-written in `docs/reliability.md`; nothing writes that file.
//!
//! The load generator shares the machine with both servers and PostgreSQL,
//! so it is lean: a few HTTP/2 connections, one task per in-flight request,
//! per-task log-bucketed latency histograms merged at the end.
//!
//! The code: this file (flags, the run), `soak/` (checked calls, the tasks,
//! bookkeeping, the report) and `support/` (shared with the verify bench: the
//! server process, /proc, metrics, results files, PostgreSQL).

#[path = "support/mod.rs"]
mod support;

#[path = "soak/checks.rs"]
mod checks;
#[path = "soak/report.rs"]
mod report;
#[path = "soak/stats.rs"]
mod stats;
#[path = "soak/tasks.rs"]
mod tasks;

use support::{
    load::{connect, status_text},
    pgdb::PgDatabase,
    procfs::{busy_seconds, cpu_seconds, mib, status_kb},
    report::write_results,
    scrape::scrape,
    server::{Server, ensure_server_built, free_addr, interrupted, stop_all},
};

use checks::{Ctx, Expect, TestKey, body, check_created, create_body, malformed_keys, request};
use clap::Parser;
use report::{Report, UsageCheck};
use stats::{Kind, Stats};
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use takumo_keys::proto::pb::{
    GetKeyStatsRequest, Plan, SetOrganizationPlanRequest, VerifyCode, api_key_service_client::ApiKeyServiceClient,
};
use tasks::{Mix, run_phase};
use tonic::{metadata::AsciiMetadataValue, transport::Channel};

type Client = ApiKeyServiceClient<Channel>;

const SERVICE_TOKEN: &str = "soak-service-token-0123456789abcdefghijklmnop";
const PEPPER: &str = "soak-pepper-0123456789abcdef";
const ACTOR: &str = "soak";
const REPLICAS: usize = 2;
/// Key layout: `tk_live_` (8) + id (16) + secret (32) + checksum (6).
const ID_RANGE: std::ops::Range<usize> = 8..24;
/// The read-only preset holds every `*.read` scope and nothing else.
const HELD_SCOPES: [&str; 3] = ["fleet.read", "members.read", "api_keys.read"];
const MISSING_SCOPE: &str = "fleet.manage";
/// The servers write usage counts this often (the default).
const USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Bound of every request of the load generator: a hung call is an error, not a stalled soak.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Parser)]
#[command(name = "soak", about = "Mixed-workload soak against two replicas (cargo bench --bench soak -- FLAGS)")]
struct Opts {
    /// Measured seconds of mixed load (after the warm-up).
    #[arg(long, env = "TAKUMO_SOAK_DURATION", default_value_t = 60.0)]
    duration: f64,
    /// Seconds of the same mixed load before measuring; resident memory "at start" is read after it.
    #[arg(long, env = "TAKUMO_SOAK_WARMUP", default_value_t = 5.0)]
    warmup: f64,
    /// Closed-loop VerifyKey requests in flight, half on each replica.
    #[arg(long, env = "TAKUMO_SOAK_CONCURRENCY", default_value_t = 32)]
    concurrency: usize,
    /// HTTP/2 connections to each replica.
    #[arg(long, env = "TAKUMO_SOAK_CONNECTIONS", default_value_t = 2)]
    connections: usize,
    /// What the VerifyKey workers send, as relative weights: `valid` (stable keys, warm),
    /// `created` (keys created during the run), `toggled` (keys being disabled and enabled),
    /// `scope` (insufficient scope), `org` (wrong organization), `malformed`, `unknown`
    /// (well-formed, no such id).
    #[arg(
        long,
        env = "TAKUMO_SOAK_MIX",
        default_value = "valid=755,created=50,toggled=30,scope=20,org=10,malformed=35,unknown=100"
    )]
    mix: String,
    /// Organizations (all put on PLAN_ENTERPRISE first).
    #[arg(long, env = "TAKUMO_SOAK_ORGS", default_value_t = 3)]
    orgs: usize,
    /// Stable keys per organization: never changed, must always verify VALID.
    #[arg(long, env = "TAKUMO_SOAK_STABLE_KEYS", default_value_t = 8)]
    stable_keys: usize,
    /// Keys kept for SetKeyStatus toggles (spread over the organizations).
    #[arg(long, env = "TAKUMO_SOAK_TOGGLE_KEYS", default_value_t = 6)]
    toggle_keys: usize,
    /// Tasks toggling them; each owns its keys, so it knows their status.
    #[arg(long, env = "TAKUMO_SOAK_TOGGLE_WORKERS", default_value_t = 2)]
    toggle_workers: usize,
    /// Pause after each status change of a toggle task.
    #[arg(long, env = "TAKUMO_SOAK_TOGGLE_PAUSE_MS", default_value_t = 500)]
    toggle_pause_ms: u64,
    /// CreateKey per second (each new key is verified once on the other replica, then joins the pool).
    #[arg(long, env = "TAKUMO_SOAK_CREATE_RATE", default_value_t = 1.0)]
    create_rate: f64,
    /// Key lifecycles per second: create, verify on both replicas, revoke and/or delete, verify on both.
    #[arg(long, env = "TAKUMO_SOAK_LIFECYCLE_RATE", default_value_t = 1.0)]
    lifecycle_rate: f64,
    /// Full ListKeys walks (every page of one organization) per second, each followed by GetKeyStats.
    #[arg(long, env = "TAKUMO_SOAK_LIST_RATE", default_value_t = 1.0)]
    list_rate: f64,
    /// ListKeys page size.
    #[arg(long, env = "TAKUMO_SOAK_LIST_PAGE_SIZE", default_value_t = 20)]
    list_page_size: i32,
    /// Wrong secrets for real key ids per second (argon2 each; every other one repeats the last).
    #[arg(long, env = "TAKUMO_SOAK_WRONG_SECRET_RATE", default_value_t = 4.0)]
    wrong_secret_rate: f64,
    /// TAKUMO_CACHE_CAPACITY of both servers.
    #[arg(long, env = "TAKUMO_SOAK_CACHE_CAPACITY", default_value_t = 10_000)]
    cache_capacity: u64,
    /// Largest resident-memory growth per server, start (after warm-up) to end, still judged bounded.
    #[arg(long, env = "TAKUMO_SOAK_MAX_RSS_GROWTH_MB", default_value_t = 32.0)]
    max_rss_growth_mb: f64,
    /// A change made on one replica must show on the other within this.
    #[arg(long, env = "TAKUMO_SOAK_PROPAGATION_BOUND_MS", default_value_t = 1000)]
    propagation_bound_ms: u64,
    /// Resident memory is sampled this often during the measured run.
    #[arg(long, env = "TAKUMO_SOAK_SAMPLE_SECS", default_value_t = 5.0)]
    sample_secs: f64,
    /// Tokio worker threads of this load generator.
    #[arg(long, env = "TAKUMO_SOAK_CLIENT_THREADS", default_value_t = 2)]
    client_threads: usize,
    /// PostgreSQL host (a fresh database is created and dropped per run; trust auth).
    #[arg(long, env = "TAKUMO_SOAK_PG_HOST", default_value = "127.0.0.1")]
    pg_host: String,
    #[arg(long, env = "TAKUMO_SOAK_PG_PORT", default_value_t = 5432)]
    pg_port: u16,
    #[arg(long, env = "TAKUMO_SOAK_PG_USER", default_value = "postgres")]
    pg_user: String,
    /// Server binary; cargo builds it for benches, so the default is the release build.
    #[arg(long, env = "TAKUMO_SOAK_SERVER_BIN", default_value = env!("CARGO_BIN_EXE_takumo-keys"))]
    server_bin: PathBuf,
    /// The results file, rewritten whole on each run.
    #[arg(long, env = "TAKUMO_SOAK_DOCS", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/reliability-results.md"))]
    docs: PathBuf,
    /// Print the results only; leave the results file alone.
    #[arg(long, env = "TAKUMO_SOAK_NO_DOCS")]
    no_docs: bool,
    /// Passed by `cargo bench`. Without it (as under `cargo test --all-targets`)
    /// the soak does nothing, so that test runs never start it by accident.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let opts = Opts::parse();
    if !opts.bench {
        eprintln!("soak: not run (no --bench); use `cargo bench --bench soak [-- FLAGS]`");
        return;
    }
    let mix = Mix::parse(&opts.mix).unwrap_or_else(|e| {
        eprintln!("soak: --mix: {e}");
        std::process::exit(2);
    });
    assert!(opts.duration > 0.0 && opts.warmup >= 0.0, "--duration must be positive");
    assert!(opts.concurrency > 0 && opts.connections > 0, "--concurrency and --connections must be at least 1");
    assert!(opts.orgs > 0 && opts.stable_keys > 0, "--orgs and --stable-keys must be at least 1");
    assert!((1..=500).contains(&opts.list_page_size), "--list-page-size must be 1..=500");
    ensure_server_built(&opts.server_bin);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.client_threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();
    // On Ctrl-C or SIGTERM the run is dropped, which stops both servers and
    // drops the database; a panic unwinds through the same destructors.
    let report = rt.block_on(async {
        tokio::select! {
            r = run(&opts, mix) => Some(r),
            () = interrupted() => None,
        }
    });
    let Some(report) = report else {
        eprintln!("interrupted: servers stopped, database dropped");
        std::process::exit(130);
    };
    let results = report.render(&opts, started.elapsed());
    println!("\n{results}");
    if !opts.no_docs {
        write_results(&opts.docs, &results);
    }
    eprintln!("total {:.0?}", started.elapsed());
    if !report.all_met(&opts) {
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------
// The run.

async fn run(opts: &Opts, mix: Mix) -> Report {
    let tmp = tempfile::Builder::new().prefix("takumo-soak-").tempdir().expect("tempdir");
    // Declared before the servers, so it is dropped (the database dropped) after them.
    let db = PgDatabase::create("takumo_soak", &opts.pg_host, opts.pg_port, &opts.pg_user);
    let pg_version = db.psql("SHOW server_version");
    let mut servers = start_replicas(opts, &db, tmp.path()).await;
    let rss_boot: Vec<Option<u64>> = servers.iter().map(|s| status_kb(s.pid(), "VmRSS")).collect();

    let mut ctx = new_ctx(opts, &servers, mix).await;
    let mut setup = Stats::new(ctx.orgs.len());
    let t = Instant::now();
    set_plans(&ctx, &mut setup).await;
    create_setup_keys(&mut ctx, &mut setup).await;
    eprintln!(
        "setup: {} organizations on Enterprise, {} stable + {} toggle keys, verified on both replicas in {:.1?}",
        ctx.orgs.len(),
        ctx.stable.len(),
        ctx.toggle.len(),
        t.elapsed()
    );
    let ctx = Arc::new(ctx);
    let pids: Vec<u32> = servers.iter().map(Server::pid).collect();

    // Warm-up: the same mix, so that every path, allocator arena and argon2 context exists.
    let warm_t = Instant::now();
    let warm = run_phase(&ctx, Duration::from_secs_f64(opts.warmup)).await;
    let warm_elapsed = warm_t.elapsed();
    eprintln!("warm-up done in {warm_elapsed:.1?}: {} requests, {} errors", warm.requests(), warm.errors());

    let measured = measured_run(&ctx, &pids).await;
    let mut post = Stats::new(ctx.orgs.len());
    let usage = check_usage(&ctx, &mut post, [&setup, &warm, &measured.soak]).await;

    // Server-side view: metrics, then a graceful stop, then the logs.
    let scraped: Vec<Result<String, String>> = servers.iter().map(|s| scrape(s.metrics)).collect();
    let exits = stop_all(&mut servers, Duration::from_secs(25));
    let logs: Vec<String> = servers.iter().map(Server::read_log).collect();
    let mut client_codes = [0u64; 9];
    for s in [&setup, &warm, &measured.soak, &post] {
        client_codes.iter_mut().zip(&s.codes).for_each(|(a, b)| *a += b);
    }
    let pool_size = ctx.pool.read().expect("pool lock").len();
    drop(servers);
    drop(db);
    Report {
        pg_version,
        setup,
        warm,
        warm_elapsed,
        soak: measured.soak,
        soak_elapsed: measured.elapsed,
        post,
        stable_keys: ctx.stable.len(),
        toggle_keys: ctx.toggle.len(),
        pool_size,
        rss_boot,
        rss_start: measured.rss_start,
        rss_end: measured.rss_end,
        cpu: measured.cpu,
        hwm: measured.hwm,
        samples: measured.samples,
        scraped,
        client_codes,
        usage,
        exits,
        logs,
    }
}

/// Both replicas, started together on the empty database (migrations run
/// once, under the advisory lock), each on ports of its own; returned once
/// each answers health.
async fn start_replicas(opts: &Opts, db: &PgDatabase, dir: &Path) -> Vec<Server> {
    let env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), db.url()),
        ("TAKUMO_PEPPER".into(), PEPPER.into()),
        ("TAKUMO_SERVICE_TOKENS".into(), format!("soak={SERVICE_TOKEN}")),
        ("TAKUMO_CACHE_CAPACITY".into(), opts.cache_capacity.to_string()),
    ];
    let servers: Vec<Server> = (0..REPLICAS)
        .map(|i| {
            let (addr, metrics) = (free_addr(), free_addr());
            Server::start(&opts.server_bin, &env, &dir.join(format!("replica-{i}.log")), addr, metrics)
        })
        .collect();
    for (i, s) in servers.iter().enumerate() {
        s.wait_ready().await;
        eprintln!("replica {i}: pid {} on {} (metrics {})", s.pid(), s.addr, s.metrics);
    }
    servers
}

/// The shared state, with `--connections` connections to each replica and no key yet.
async fn new_ctx(opts: &Opts, servers: &[Server], mix: Mix) -> Ctx {
    let auth: AsciiMetadataValue = format!("Bearer {SERVICE_TOKEN}").parse().expect("ascii");
    let mut clients = Vec::new();
    for s in servers {
        let channels = connect(s.addr, opts.connections, Some(REQUEST_TIMEOUT)).await;
        clients.push(channels.into_iter().map(ApiKeyServiceClient::new).collect());
    }
    let orgs: Vec<String> = (0..opts.orgs).map(|i| format!("soak-org-{i}")).collect();
    Ctx {
        clients,
        auth,
        orgs,
        stable: Vec::new(),
        toggle: Vec::new(),
        pool: RwLock::new(Vec::new()),
        malformed: Vec::new(),
        mix,
        bound: Duration::from_millis(opts.propagation_bound_ms),
        names: AtomicU64::new(0),
        opts: opts.clone(),
    }
}

/// Plans first: every organization on Enterprise (unlimited keys).
async fn set_plans(ctx: &Ctx, setup: &mut Stats) {
    for (i, org) in ctx.orgs.iter().enumerate() {
        let mut c = ctx.conn(i % REPLICAS, 0);
        let t0 = Instant::now();
        let r =
            c.c.set_organization_plan(
                ctx.req(SetOrganizationPlanRequest { organization_id: org.clone(), plan: Plan::Enterprise as i32 }),
            )
            .await;
        let r = match r {
            Ok(r) if r.get_ref().plan == Plan::Enterprise as i32 && r.get_ref().key_limit == 0 => Ok(()),
            Ok(r) => Err(format!("plan answer {:?}", r.get_ref())),
            Err(s) => Err(status_text(&s)),
        };
        setup.record(Kind::SetPlan, c.replica, t0, r);
    }
}

/// Stable and toggle keys, created on both replicas, then verified once on each (first sight: argon2).
async fn create_setup_keys(ctx: &mut Ctx, setup: &mut Stats) {
    let opts = &ctx.opts;
    let n_stable = opts.orgs * opts.stable_keys;
    let specs: Vec<(usize, String)> = (0..n_stable)
        .map(|i| (i % opts.orgs, format!("stable-{i}")))
        .chain((0..opts.toggle_keys).map(|i| (i % opts.orgs, format!("toggle-{i}"))))
        .collect();
    let created = create_many(ctx, &specs).await;
    let mut made = Vec::with_capacity(specs.len());
    for (s, k) in created {
        setup.merge(s);
        made.extend(k);
    }
    assert_eq!(made.len(), specs.len(), "could not create the keys: {:?}", setup.first_errors);
    made.sort_by_key(|(i, _)| *i);
    let mut made: Vec<TestKey> = made.into_iter().map(|(_, k)| k).collect();
    ctx.toggle = made.split_off(n_stable);
    ctx.stable = made;
    ctx.malformed = malformed_keys(&ctx.stable[0].secret);
    for r in 0..REPLICAS {
        let mut c = ctx.conn(r, 0);
        for k in ctx.stable.iter().chain(&ctx.toggle) {
            ctx.verify(setup, Kind::VerifyFresh, &mut c, body(&k.secret), Expect::strict(VerifyCode::Valid, k)).await;
        }
    }
}

/// Creates keys `(org, name)` over both replicas (one task each); returns each
/// task's stats and the keys with their index in `specs`.
async fn create_many(ctx: &Ctx, specs: &[(usize, String)]) -> Vec<(Stats, Vec<(usize, TestKey)>)> {
    let mut tasks = Vec::new();
    for r in 0..REPLICAS {
        let mut c = ctx.conn(r, 0);
        let mine: Vec<(usize, usize, String)> =
            specs.iter().enumerate().filter(|(i, _)| i % REPLICAS == r).map(|(i, (o, n))| (i, *o, n.clone())).collect();
        let (auth, orgs) = (ctx.auth.clone(), ctx.orgs.clone());
        tasks.push(tokio::spawn(async move {
            let mut st = Stats::new(orgs.len());
            let mut out = Vec::new();
            for (i, org, name) in mine {
                let t0 = Instant::now();
                let r = c.c.create_key(request(&auth, true, create_body(&orgs[org], name))).await;
                let r = r.map_err(|s| status_text(&s)).and_then(|r| check_created(&r.into_inner(), &orgs, org));
                if let Some(k) = st.record(Kind::Create, c.replica, t0, r) {
                    out.push((i, k));
                }
            }
            (st, out)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("create task"));
    }
    out
}

/// The measured run, with resident memory sampled alongside and CPU use around it.
struct Measured {
    soak: Stats,
    elapsed: Duration,
    /// Per server: after the warm-up, at the end, the peak over its life (VmHWM).
    rss_start: Vec<Option<u64>>,
    rss_end: Vec<Option<u64>>,
    hwm: Vec<Option<u64>>,
    /// CPUs used on average: each server, this load generator, everything else.
    cpu: Vec<Option<f64>>,
    samples: Vec<RssSample>,
}

/// Measured run, with resident memory sampled alongside.
async fn measured_run(ctx: &Arc<Ctx>, pids: &[u32]) -> Measured {
    let opts = &ctx.opts;
    let rss_start: Vec<Option<u64>> = pids.iter().map(|p| status_kb(*p, "VmRSS")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (pids, stop, every) = (pids.to_vec(), stop.clone(), Duration::from_secs_f64(opts.sample_secs.max(0.5)));
        tokio::spawn(async move { sample_rss(&pids, every, &stop).await })
    };
    let me = std::process::id();
    let cpu0: Vec<Option<f64>> = pids.iter().chain([&me]).map(|p| cpu_seconds(*p)).collect();
    let busy0 = busy_seconds();
    let soak_t = Instant::now();
    let soak = run_phase(ctx, Duration::from_secs_f64(opts.duration)).await;
    let soak_elapsed = soak_t.elapsed();
    // CPUs used on average over the run: each server, this load generator, everything else (PostgreSQL).
    let cpu: Vec<Option<f64>> = {
        let secs = soak_elapsed.as_secs_f64();
        let mut used: Vec<Option<f64>> =
            pids.iter().chain([&me]).zip(&cpu0).map(|(p, c0)| Some((cpu_seconds(*p)? - (*c0)?) / secs)).collect();
        let busy = busy_seconds().zip(busy0).map(|(b, b0)| (b - b0) / secs);
        let ours: Option<f64> = used.iter().copied().sum();
        used.push(busy.zip(ours).map(|(b, o)| (b - o).max(0.0)));
        used
    };
    stop.store(true, Ordering::Relaxed);
    let rss_end: Vec<Option<u64>> = pids.iter().map(|p| status_kb(*p, "VmRSS")).collect();
    let hwm: Vec<Option<u64>> = pids.iter().map(|p| status_kb(*p, "VmHWM")).collect();
    let mut samples = sampler.await.expect("sampler task");
    samples.push((soak_elapsed.as_secs_f64(), rss_end.clone()));
    eprintln!("soak done in {soak_elapsed:.1?}: {} requests, {} errors", soak.requests(), soak.errors());
    Measured { soak, elapsed: soak_elapsed, rss_start, rss_end, hwm, cpu, samples }
}

/// Counted usage: waits past a flush interval, then compares each
/// organization's stored `api_calls_24h` with the VALID answers of `phases`,
/// polling a while if not equal yet (the reads are recorded in `post`).
async fn check_usage(ctx: &Ctx, post: &mut Stats, phases: [&Stats; 3]) -> UsageCheck {
    tokio::time::sleep(USAGE_FLUSH_INTERVAL * 2 + Duration::from_millis(500)).await;
    let client_resolved: Vec<u64> = {
        let mut all = phases[0].resolved.clone();
        for s in &phases[1..] {
            all.iter_mut().zip(&s.resolved).for_each(|(a, b)| *a += b);
        }
        all.truncate(ctx.orgs.len());
        all
    };
    let waited_from = Instant::now();
    let mut first: Option<Vec<Option<i64>>> = None;
    let stored = loop {
        let mut now = Vec::new();
        for (i, org) in ctx.orgs.iter().enumerate() {
            let mut c = ctx.conn(i % REPLICAS, 0);
            let t0 = Instant::now();
            let r = c.c.get_key_stats(ctx.req(GetKeyStatsRequest { organization_id: org.clone() })).await;
            let v = post.record(
                Kind::GetStats,
                c.replica,
                t0,
                r.map(|r| r.into_inner().api_calls_24h).map_err(|s| status_text(&s)),
            );
            now.push(v);
        }
        first.get_or_insert_with(|| now.clone());
        let equal = now.iter().zip(&client_resolved).all(|(s, c)| *s == Some(*c as i64));
        if equal || waited_from.elapsed() > Duration::from_secs(10) {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    UsageCheck {
        orgs: ctx.orgs.clone(),
        client: client_resolved,
        other: phases.iter().map(|s| s.resolved_other()).sum(),
        first: first.unwrap_or_default(),
        stored,
        settled_after: waited_from.elapsed(),
    }
}

type RssSample = (f64, Vec<Option<u64>>);

async fn sample_rss(pids: &[u32], every: Duration, stop: &AtomicBool) -> Vec<RssSample> {
    let t0 = Instant::now();
    let mut out = Vec::new();
    loop {
        let rss: Vec<Option<u64>> = pids.iter().map(|p| status_kb(*p, "VmRSS")).collect();
        if !out.is_empty() {
            let shown: Vec<String> = rss.iter().map(|r| r.map_or("?".into(), |kb| format!("{:.1}", mib(kb)))).collect();
            eprintln!("t={:>4.0} s  RSS MiB {}", t0.elapsed().as_secs_f64(), shown.join(" / "));
        }
        out.push((t0.elapsed().as_secs_f64(), rss));
        let next = t0 + every * out.len() as u32;
        while Instant::now() < next {
            if stop.load(Ordering::Relaxed) {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
