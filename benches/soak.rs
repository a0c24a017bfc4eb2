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

mod support;

use support::{
    PgDatabase, ResultsHeader, bench_command, fmt_dur, fmt_rps, free_addr, interrupted, metric, scrape,
    server_argon2_defaults, write_results,
};

use clap::Parser;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    io::Read as _,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};
use takumo_keys::{
    domain::keys,
    domain::model::Environment,
    proto::pb::{
        self, CreateKeyRequest, DeleteKeyRequest, GetKeyRequest, GetKeyStatsRequest, KeyStatus, ListKeysRequest, Plan,
        RevokeKeyRequest, SetKeyStatusRequest, SetOrganizationPlanRequest, VerifyCode, VerifyKeyRequest,
        VerifyKeyResponse, api_key_service_client::ApiKeyServiceClient,
    },
};
use tonic::{
    Code, Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

type Client = ApiKeyServiceClient<Channel>;

const SERVICE_TOKEN: &str = "soak-service-token-0123456789abcdefghijklmnop";
const PEPPER: &str = "soak-pepper-0123456789abcdef";
const ACTOR: &str = "soak";
const REPLICAS: usize = 2;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Key layout: `tk_live_` (8) + id (16) + secret (32) + checksum (6).
const KEY_LEN: usize = 62;
const ID_RANGE: std::ops::Range<usize> = 8..24;
/// The read-only preset holds every `*.read` scope and nothing else.
const HELD_SCOPES: [&str; 3] = ["fleet.read", "members.read", "api_keys.read"];
const MISSING_SCOPE: &str = "fleet.manage";
/// The servers write usage counts this often (the default).
const USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

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
    support::ensure_server_built(&opts.server_bin);
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
    let mut env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), db.url()),
        ("TAKUMO_PEPPER".into(), PEPPER.into()),
        ("TAKUMO_SERVICE_TOKENS".into(), format!("soak={SERVICE_TOKEN}")),
        ("TAKUMO_CACHE_CAPACITY".into(), opts.cache_capacity.to_string()),
    ];
    // Both replicas start together on the empty database: migrations run once, under the advisory lock.
    let mut servers: Vec<Server> = (0..REPLICAS)
        .map(|i| {
            let (addr, metrics) = (free_addr(), free_addr());
            env.retain(|(k, _)| k != "TAKUMO_LISTEN" && k != "TAKUMO_METRICS_LISTEN");
            env.push(("TAKUMO_LISTEN".into(), addr.to_string()));
            env.push(("TAKUMO_METRICS_LISTEN".into(), metrics.to_string()));
            Server::start(opts, &env, &tmp.path().join(format!("replica-{i}.log")), addr, metrics)
        })
        .collect();
    for (i, s) in servers.iter().enumerate() {
        s.wait_ready().await;
        eprintln!("replica {i}: pid {} on {} (metrics {})", s.pid(), s.addr, s.metrics);
    }
    let rss_boot: Vec<Option<u64>> = servers.iter().map(|s| proc_status_kb(s.pid(), "VmRSS")).collect();

    let auth: AsciiMetadataValue = format!("Bearer {SERVICE_TOKEN}").parse().expect("ascii");
    let mut clients = Vec::new();
    for s in &servers {
        clients.push(connect(s.addr, opts.connections).await);
    }
    let orgs: Vec<String> = (0..opts.orgs).map(|i| format!("soak-org-{i}")).collect();
    let mut setup = Stats::new(orgs.len());
    let mut ctx = Ctx {
        clients,
        auth,
        orgs,
        stable: Vec::new(),
        toggle: Vec::new(),
        pool: RwLock::new(Vec::new()),
        malformed: Vec::new(),
        mix,
        bound: Duration::from_millis(opts.propagation_bound_ms),
        names: std::sync::atomic::AtomicU64::new(0),
        opts: opts.clone(),
    };

    // Plans first: every organization on Enterprise (unlimited keys).
    let t = Instant::now();
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
    // Stable and toggle keys, created on both replicas, then verified once on each (first sight: argon2).
    let n_stable = opts.orgs * opts.stable_keys;
    let specs: Vec<(usize, String)> = (0..n_stable)
        .map(|i| (i % opts.orgs, format!("stable-{i}")))
        .chain((0..opts.toggle_keys).map(|i| (i % opts.orgs, format!("toggle-{i}"))))
        .collect();
    let created = create_many(&ctx, &specs).await;
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
            ctx.verify(&mut setup, Kind::VerifyFresh, &mut c, body(&k.secret), Expect::strict(VerifyCode::Valid, k))
                .await;
        }
    }
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

    // Measured run, with resident memory sampled alongside.
    let rss_start: Vec<Option<u64>> = pids.iter().map(|p| proc_status_kb(*p, "VmRSS")).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (pids, stop, every) = (pids.clone(), stop.clone(), Duration::from_secs_f64(opts.sample_secs.max(0.5)));
        tokio::spawn(async move { sample_rss(&pids, every, &stop).await })
    };
    let me = std::process::id();
    let cpu0: Vec<Option<f64>> = pids.iter().chain([&me]).map(|p| proc_cpu_s(*p)).collect();
    let busy0 = sys_busy_s();
    let soak_t = Instant::now();
    let soak = run_phase(&ctx, Duration::from_secs_f64(opts.duration)).await;
    let soak_elapsed = soak_t.elapsed();
    // CPUs used on average over the run: each server, this load generator, everything else (PostgreSQL).
    let cpu: Vec<Option<f64>> = {
        let secs = soak_elapsed.as_secs_f64();
        let mut used: Vec<Option<f64>> =
            pids.iter().chain([&me]).zip(&cpu0).map(|(p, c0)| Some((proc_cpu_s(*p)? - (*c0)?) / secs)).collect();
        let busy = sys_busy_s().zip(busy0).map(|(b, b0)| (b - b0) / secs);
        let ours: Option<f64> = used.iter().copied().sum();
        used.push(busy.zip(ours).map(|(b, o)| (b - o).max(0.0)));
        used
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rss_end: Vec<Option<u64>> = pids.iter().map(|p| proc_status_kb(*p, "VmRSS")).collect();
    let hwm: Vec<Option<u64>> = pids.iter().map(|p| proc_status_kb(*p, "VmHWM")).collect();
    let mut samples = sampler.await.expect("sampler task");
    samples.push((soak_elapsed.as_secs_f64(), rss_end.clone()));
    eprintln!("soak done in {soak_elapsed:.1?}: {} requests, {} errors", soak.requests(), soak.errors());

    // Counted usage: wait past a flush interval, then compare, polling a while if not equal yet.
    let mut post = Stats::new(ctx.orgs.len());
    tokio::time::sleep(USAGE_FLUSH_INTERVAL * 2 + Duration::from_millis(500)).await;
    let client_resolved: Vec<u64> = {
        let mut all = setup.resolved.clone();
        for s in [&warm, &soak] {
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
    let usage = UsageCheck {
        orgs: ctx.orgs.clone(),
        client: client_resolved,
        other: setup.resolved_other() + warm.resolved_other() + soak.resolved_other(),
        first: first.unwrap_or_default(),
        stored,
        settled_after: waited_from.elapsed(),
    };

    // Server-side view: metrics, then a graceful stop, then the logs.
    let scraped: Vec<Result<String, String>> = servers.iter().map(|s| scrape(s.metrics)).collect();
    let exits = stop_all(&mut servers);
    let logs: Vec<String> = servers.iter().map(Server::read_log).collect();
    let mut client_codes = [0u64; 9];
    for s in [&setup, &warm, &soak, &post] {
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
        soak,
        soak_elapsed,
        post,
        stable_keys: ctx.stable.len(),
        toggle_keys: ctx.toggle.len(),
        pool_size,
        rss_boot,
        rss_start,
        rss_end,
        cpu,
        hwm,
        samples,
        scraped,
        client_codes,
        usage,
        exits,
        logs,
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

/// Runs every task of the mix for `dur`; the paced tasks finish the cycle they are in.
async fn run_phase(ctx: &Arc<Ctx>, dur: Duration) -> Stats {
    let mut all = Stats::new(ctx.orgs.len());
    if dur.is_zero() {
        return all;
    }
    let deadline = Instant::now() + dur;
    let mut tasks = Vec::new();
    for i in 0..ctx.opts.concurrency {
        tasks.push(tokio::spawn(verify_worker(ctx.clone(), i, deadline)));
    }
    for w in 0..ctx.opts.toggle_workers.min(ctx.toggle.len()) {
        tasks.push(tokio::spawn(toggle_task(ctx.clone(), w, deadline)));
    }
    tasks.push(tokio::spawn(create_task(ctx.clone(), deadline)));
    tasks.push(tokio::spawn(lifecycle_task(ctx.clone(), deadline)));
    tasks.push(tokio::spawn(list_task(ctx.clone(), deadline)));
    tasks.push(tokio::spawn(wrong_secret_task(ctx.clone(), deadline)));
    for t in tasks {
        all.merge(t.await.expect("soak task panicked"));
    }
    all
}

// ---------------------------------------------------------------------------
// Shared state and checked calls.

#[derive(Debug, Clone)]
struct TestKey {
    secret: String,
    id: String,
    org: usize,
}

struct Ctx {
    /// `[replica][connection]`.
    clients: Vec<Vec<Client>>,
    auth: AsciiMetadataValue,
    orgs: Vec<String>,
    /// Never changed: must verify VALID every time.
    stable: Vec<TestKey>,
    /// Toggled between ACTIVE and DISABLED by their owning toggle task.
    toggle: Vec<TestKey>,
    /// Created during the run and never changed afterwards.
    pool: RwLock<Vec<TestKey>>,
    malformed: Vec<String>,
    mix: Mix,
    bound: Duration,
    names: std::sync::atomic::AtomicU64,
    opts: Opts,
}

/// One client and the replica it talks to.
struct Conn {
    replica: usize,
    c: Client,
}

/// What a VerifyKey answer may be.
#[derive(Clone, Copy)]
struct Expect<'a> {
    codes: &'a [VerifyCode],
    /// For answers that resolve to a key: the key it must name.
    key: Option<&'a TestKey>,
}

impl<'a> Expect<'a> {
    fn strict(code: VerifyCode, key: &'a TestKey) -> Self {
        Expect { codes: std::slice::from_ref(CODES.iter().find(|c| **c == code).expect("known code")), key: Some(key) }
    }

    fn code(code: VerifyCode) -> Self {
        Expect { codes: std::slice::from_ref(CODES.iter().find(|c| **c == code).expect("known code")), key: None }
    }
}

static CODES: [VerifyCode; 9] = [
    VerifyCode::Unspecified,
    VerifyCode::Valid,
    VerifyCode::Malformed,
    VerifyCode::NotFound,
    VerifyCode::Disabled,
    VerifyCode::Revoked,
    VerifyCode::Expired,
    VerifyCode::InsufficientScope,
    VerifyCode::WrongOrganization,
];

/// Answers whose secret was proven: these, and only these, count as usage.
/// What `api_calls_24h` counts: accepted calls only, so VALID answers (the
/// soak's management calls use a service token, which counts nothing).
fn resolves(code: VerifyCode) -> bool {
    code == VerifyCode::Valid
}

fn request<T>(auth: &AsciiMetadataValue, actor: bool, body: T) -> Request<T> {
    let mut r = Request::new(body);
    r.metadata_mut().insert("authorization", auth.clone());
    if actor {
        r.metadata_mut().insert("x-takumo-actor", MetadataValue::from_static(ACTOR));
    }
    r
}

fn body(key: &str) -> VerifyKeyRequest {
    VerifyKeyRequest { key: key.to_owned(), required_scopes: vec![HELD_SCOPES[0].to_owned()], organization_id: None }
}

fn create_body(org: &str, name: String) -> CreateKeyRequest {
    CreateKeyRequest {
        organization_id: org.to_owned(),
        name,
        scopes: Some(pb::create_key_request::Scopes::Preset(pb::ScopePreset::ReadOnly as i32)),
        environment: pb::Environment::Live as i32,
        expires_at: None,
    }
}

fn check_created(r: &pb::CreateKeyResponse, orgs: &[String], org: usize) -> Result<TestKey, String> {
    let s = &r.secret;
    let k = r.key.as_ref().ok_or("no key in the answer")?;
    if s.len() != KEY_LEN || !s.starts_with("tk_live_") || keys::parse(s).is_none() {
        return Err(format!("secret of unexpected shape ({} characters)", s.len()));
    }
    let problems = [
        (k.id != s[ID_RANGE], "id is not the key's id part"),
        (k.prefix != s[..16], "prefix is not the key's first 16 characters"),
        (k.status != KeyStatus::Active as i32, "status is not ACTIVE"),
        (k.organization_id != orgs[org], "wrong organization"),
        (k.created_by != ACTOR, "created_by is not the x-takumo-actor"),
        (!HELD_SCOPES.iter().all(|h| k.scopes.iter().any(|s| s == h)), "read-only scopes missing"),
        (k.scopes.iter().any(|s| s == MISSING_SCOPE), "read-only key holds fleet.manage"),
    ];
    match problems.iter().find(|(bad, _)| *bad) {
        Some((_, what)) => Err(format!("created key {}: {what}", k.id)),
        None => Ok(TestKey { secret: s.clone(), id: k.id.clone(), org }),
    }
}

impl Ctx {
    fn conn(&self, replica: usize, i: usize) -> Conn {
        let cs = &self.clients[replica];
        Conn { replica, c: cs[i % cs.len()].clone() }
    }

    fn req<T>(&self, body: T) -> Request<T> {
        request(&self.auth, true, body)
    }

    fn name(&self, tag: &str) -> String {
        format!("{tag}-{}", self.names.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }

    fn judge(&self, r: &VerifyKeyResponse, exp: &Expect<'_>) -> Result<VerifyCode, String> {
        let code = VerifyCode::try_from(r.code).map_err(|_| format!("unknown verify code {}", r.code))?;
        if !exp.codes.contains(&code) {
            let want: Vec<&str> = exp.codes.iter().map(|c| c.as_str_name()).collect();
            return Err(format!("expected {}, got {}", want.join(" or "), code.as_str_name()));
        }
        if r.valid != (code == VerifyCode::Valid) {
            return Err(format!("valid={} with {}", r.valid, code.as_str_name()));
        }
        if resolves(code) {
            if let Some(k) = exp.key
                && (r.key_id != k.id || r.organization_id != self.orgs[k.org])
            {
                return Err(format!(
                    "{} names key {} of {}, expected key {} of {}",
                    code.as_str_name(),
                    r.key_id,
                    r.organization_id,
                    k.id,
                    self.orgs[k.org]
                ));
            }
            if code == VerifyCode::InsufficientScope && r.missing_scopes != [MISSING_SCOPE] {
                return Err(format!("missing_scopes {:?}, expected [{MISSING_SCOPE}]", r.missing_scopes));
            }
        } else if !r.key_id.is_empty() || !r.organization_id.is_empty() {
            return Err(format!("{} answer carries a key identity", code.as_str_name()));
        }
        Ok(code)
    }

    /// One checked VerifyKey. Every answer is counted (codes, resolved usage) whatever was expected.
    async fn verify(
        &self,
        st: &mut Stats,
        kind: Kind,
        c: &mut Conn,
        body: VerifyKeyRequest,
        exp: Expect<'_>,
    ) -> Option<VerifyCode> {
        let t0 = Instant::now();
        let r = c.c.verify_key(request(&self.auth, false, body)).await;
        let r = match r {
            Err(s) => Err(status_text(&s)),
            Ok(r) => {
                let r = r.into_inner();
                st.note_verify(&r, &self.orgs);
                self.judge(&r, &exp)
            }
        };
        st.record(kind, c.replica, t0, r)
    }

    /// After a change made elsewhere at `since`: verifies until the answer is
    /// `want`; `stale` (the answer before the change) is accepted only within
    /// the propagation bound.
    async fn converge(
        &self,
        st: &mut Stats,
        c: &mut Conn,
        key: &TestKey,
        want: VerifyCode,
        stale: VerifyCode,
        since: Instant,
    ) {
        let both = [want, stale];
        let mut first = true;
        loop {
            // Lag is when the first request that saw the change was sent, so that a
            // slow answer (a cache miss queued for argon2) is not counted as propagation.
            let sent = since.elapsed();
            let within = sent < self.bound;
            let codes: &[VerifyCode] = if within { &both } else { &both[..1] };
            let exp = Expect { codes, key: Some(key) };
            match self.verify(st, Kind::VerifyCheck, c, body(&key.secret), exp).await {
                Some(code) if code == want => {
                    st.converged += 1;
                    st.converged_at_once += u64::from(first);
                    st.max_lag = st.max_lag.max(sent);
                    return;
                }
                Some(_) => {
                    st.stale += 1;
                    first = false;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                None => {
                    if !within {
                        st.late += 1;
                    }
                    return;
                }
            }
        }
    }

    /// Right after a change made through `here`: checks it there (at once) and on
    /// `there` (until it converges) concurrently, so that a slow answer on one
    /// side (a miss waiting for argon2) does not delay the other's first look.
    async fn check_change(
        &self,
        st: &mut Stats,
        here: &mut Conn,
        there: &mut Conn,
        key: &TestKey,
        want: VerifyCode,
        stale: VerifyCode,
    ) {
        let since = Instant::now();
        let mut other = Stats::new(self.orgs.len());
        tokio::join!(
            self.verify(st, Kind::VerifyCheck, here, body(&key.secret), Expect::strict(want, key)),
            self.converge(&mut other, there, key, want, stale, since),
        );
        st.merge(other);
    }

    async fn create(&self, st: &mut Stats, c: &mut Conn, org: usize, tag: &str) -> Option<TestKey> {
        let t0 = Instant::now();
        let r = c.c.create_key(self.req(create_body(&self.orgs[org], self.name(tag)))).await;
        let r = r.map_err(|s| status_text(&s)).and_then(|r| check_created(&r.into_inner(), &self.orgs, org));
        st.record(Kind::Create, c.replica, t0, r)
    }

    /// SetKeyStatus that must succeed and answer the new status.
    async fn set_status(&self, st: &mut Stats, c: &mut Conn, key: &TestKey, status: KeyStatus) -> bool {
        let t0 = Instant::now();
        let r = c.c.set_key_status(self.req(SetKeyStatusRequest { id: key.id.clone(), status: status as i32 })).await;
        let r = match r {
            Ok(r) if r.get_ref().id == key.id && r.get_ref().status == status as i32 => Ok(()),
            Ok(r) => {
                Err(format!("key {} answered status {} after setting {}", key.id, r.get_ref().status, status as i32))
            }
            Err(s) => Err(status_text(&s)),
        };
        st.record(Kind::SetStatus, c.replica, t0, r).is_some()
    }
}

/// `Ok` when the call failed with exactly `code`.
fn expect_code<T>(r: Result<T, Status>, code: Code) -> Result<(), String> {
    match r {
        Err(s) if s.code() == code => Ok(()),
        Err(s) => Err(format!("expected {code:?}, got {}", status_text(&s))),
        Ok(_) => Err(format!("expected {code:?}, got OK")),
    }
}

fn status_text(s: &Status) -> String {
    format!("gRPC {:?}: {}", s.code(), s.message())
}

/// A well-formed key (valid checksum) with a random secret: for `id`, or a random id.
fn random_key(rng: &mut StdRng, id: Option<&str>) -> String {
    let mut part = |n: usize| (0..n).map(|_| BASE62[rng.random_range(0..62)] as char).collect::<String>();
    let id = id.map_or_else(|| part(16), str::to_owned);
    let secret = part(32);
    keys::compose(Environment::Live, &id, &secret).into_exposed()
}

/// Keys that must be MALFORMED: garbage, wrong lengths, typos (checksum), wrong alphabet.
fn malformed_keys(k: &str) -> Vec<String> {
    let mut typo = k.as_bytes().to_vec();
    typo[30] = if typo[30] == b'a' { b'b' } else { b'a' };
    let sum = &k[KEY_LEN - 6..];
    vec![
        String::new(),
        "tk_live_".into(),
        "not-a-key-at-all".into(),
        k[..KEY_LEN - 1].into(),
        format!("{k}0"),
        String::from_utf8(typo).expect("ascii"),
        format!("{}{}", &k[..KEY_LEN - 6], if sum == "000000" { "000001" } else { "000000" }),
        k.replacen("tk_live_", "tk_prod_", 1),
        k.to_ascii_uppercase(),
        format!("tk_live_{}", "-".repeat(KEY_LEN - 8)),
        format!("tk_live_{}", "é".repeat((KEY_LEN - 8) / 2)),
        format!(" {}", &k[..KEY_LEN - 1]),
        "A".repeat(4096),
    ]
}

// ---------------------------------------------------------------------------
// The tasks.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pick {
    Valid,
    Created,
    Toggled,
    Scope,
    WrongOrg,
    Malformed,
    Unknown,
}

#[derive(Debug, Clone)]
struct Mix {
    table: Vec<(Pick, u32)>,
    total: u32,
}

impl Mix {
    fn parse(s: &str) -> Result<Mix, String> {
        let mut table = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, w) = part.split_once('=').ok_or_else(|| format!("`{part}` is not name=weight"))?;
            let pick = match name.trim() {
                "valid" => Pick::Valid,
                "created" => Pick::Created,
                "toggled" => Pick::Toggled,
                "scope" => Pick::Scope,
                "org" => Pick::WrongOrg,
                "malformed" => Pick::Malformed,
                "unknown" => Pick::Unknown,
                other => return Err(format!("unknown kind `{other}`")),
            };
            let w: u32 = w.trim().parse().map_err(|_| format!("`{part}`: weight is not a whole number"))?;
            table.push((pick, w));
        }
        let total = table.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return Err("all weights are zero".into());
        }
        Ok(Mix { table, total })
    }

    fn pick(&self, mut n: u32) -> Pick {
        for &(p, w) in &self.table {
            if n < w {
                return p;
            }
            n -= w;
        }
        self.table[0].0
    }

    fn describe(&self) -> String {
        let parts: Vec<String> = self
            .table
            .iter()
            .filter(|(_, w)| *w > 0)
            .map(|(p, w)| format!("{p:?} {:.1}%", *w as f64 * 100.0 / self.total as f64).to_lowercase())
            .collect();
        parts.join(", ")
    }
}

/// A closed-loop VerifyKey worker on replica `i % 2`.
async fn verify_worker(ctx: Arc<Ctx>, i: usize, deadline: Instant) -> Stats {
    let mut c = ctx.conn(i % REPLICAS, i / REPLICAS);
    let mut rng = StdRng::from_os_rng();
    let mut st = Stats::new(ctx.orgs.len());
    let valid = Expect::code(VerifyCode::Valid);
    while Instant::now() < deadline {
        let mut pick = ctx.mix.pick(rng.random_range(0..ctx.mix.total));
        let created = if pick == Pick::Created {
            let pool = ctx.pool.read().expect("pool lock");
            (!pool.is_empty()).then(|| pool[rng.random_range(0..pool.len())].clone())
        } else {
            None
        };
        if (pick == Pick::Created && created.is_none()) || (pick == Pick::Toggled && ctx.toggle.is_empty()) {
            pick = Pick::Valid;
        }
        let stable = &ctx.stable[rng.random_range(0..ctx.stable.len())];
        match pick {
            Pick::Valid | Pick::Created => {
                let (k, kind) = match &created {
                    Some(k) => (k, Kind::VerifyCreated),
                    None => (stable, Kind::VerifyValid),
                };
                // Any subset of the held scopes, with or without the (right) organization.
                let n = rng.random_range(0..=HELD_SCOPES.len());
                let b = VerifyKeyRequest {
                    key: k.secret.clone(),
                    required_scopes: HELD_SCOPES[..n].iter().map(|s| (*s).to_owned()).collect(),
                    organization_id: rng.random_bool(0.3).then(|| ctx.orgs[k.org].clone()),
                };
                ctx.verify(&mut st, kind, &mut c, b, Expect { key: Some(k), ..valid }).await;
            }
            Pick::Toggled => {
                let k = &ctx.toggle[rng.random_range(0..ctx.toggle.len())];
                let exp = Expect { codes: &[VerifyCode::Valid, VerifyCode::Disabled], key: Some(k) };
                ctx.verify(&mut st, Kind::VerifyToggled, &mut c, body(&k.secret), exp).await;
            }
            Pick::Scope => {
                let b = VerifyKeyRequest {
                    key: stable.secret.clone(),
                    required_scopes: vec![HELD_SCOPES[0].to_owned(), MISSING_SCOPE.to_owned()],
                    organization_id: None,
                };
                ctx.verify(
                    &mut st,
                    Kind::VerifyScope,
                    &mut c,
                    b,
                    Expect::strict(VerifyCode::InsufficientScope, stable),
                )
                .await;
            }
            Pick::WrongOrg => {
                let other = if ctx.orgs.len() > 1 {
                    ctx.orgs[(stable.org + 1) % ctx.orgs.len()].clone()
                } else {
                    "soak-org-nobody".to_owned()
                };
                let b = VerifyKeyRequest { organization_id: Some(other), ..body(&stable.secret) };
                let exp = Expect::strict(VerifyCode::WrongOrganization, stable);
                ctx.verify(&mut st, Kind::VerifyWrongOrg, &mut c, b, exp).await;
            }
            Pick::Malformed => {
                let k = &ctx.malformed[rng.random_range(0..ctx.malformed.len())];
                ctx.verify(&mut st, Kind::VerifyMalformed, &mut c, body(k), Expect::code(VerifyCode::Malformed)).await;
            }
            Pick::Unknown => {
                let k = random_key(&mut rng, None);
                ctx.verify(&mut st, Kind::VerifyUnknown, &mut c, body(&k), Expect::code(VerifyCode::NotFound)).await;
            }
        }
    }
    st
}

/// Ticks at a fixed rate; after a slow step it runs the next at once, without catching up.
struct Pacer {
    period: Option<Duration>,
    next: Instant,
}

impl Pacer {
    fn new(rate: f64) -> Self {
        Pacer { period: (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate)), next: Instant::now() }
    }

    async fn tick(&mut self, deadline: Instant) -> bool {
        let Some(p) = self.period else { return false };
        tokio::time::sleep_until(self.next.min(deadline).into()).await;
        if Instant::now() >= deadline {
            return false;
        }
        self.next = (self.next + p).max(Instant::now());
        true
    }
}

fn conns(ctx: &Ctx, i: usize) -> [Conn; REPLICAS] {
    [ctx.conn(0, i), ctx.conn(1, i)]
}

/// The connection to replica `a` and the one to the other replica.
fn pair(cs: &mut [Conn; REPLICAS], a: usize) -> (&mut Conn, &mut Conn) {
    let [c0, c1] = cs;
    if a == 0 { (c0, c1) } else { (c1, c0) }
}

/// Creates keys at `--create-rate`; each is verified on the other replica, then joins the pool.
async fn create_task(ctx: Arc<Ctx>, deadline: Instant) -> Stats {
    let mut st = Stats::new(ctx.orgs.len());
    let mut cs = conns(&ctx, 0);
    let mut pacer = Pacer::new(ctx.opts.create_rate);
    let mut i = 0;
    while pacer.tick(deadline).await {
        let (a, b) = (i % REPLICAS, (i + 1) % REPLICAS);
        if let Some(k) = ctx.create(&mut st, &mut cs[a], i % ctx.orgs.len(), "created").await
            && ctx
                .verify(&mut st, Kind::VerifyFresh, &mut cs[b], body(&k.secret), Expect::strict(VerifyCode::Valid, &k))
                .await
                .is_some()
        {
            ctx.pool.write().expect("pool lock").push(k);
        }
        i += 1;
    }
    st
}

/// Create, verify on both replicas, then either revoke → (re-enable refused) →
/// delete, or delete at once; after each change the key is checked on the
/// replica that made it (at once) and on the other (within the bound).
async fn lifecycle_task(ctx: Arc<Ctx>, deadline: Instant) -> Stats {
    let mut st = Stats::new(ctx.orgs.len());
    let mut cs = conns(&ctx, 1);
    let mut pacer = Pacer::new(ctx.opts.lifecycle_rate);
    let mut i = 0;
    while pacer.tick(deadline).await {
        let (x, y) = (i % REPLICAS, (i + 1) % REPLICAS);
        let revoke_first = (i / REPLICAS).is_multiple_of(2);
        i += 1;
        let Some(k) = ctx.create(&mut st, &mut cs[x], i % ctx.orgs.len(), "lifecycle").await else { continue };
        for r in [y, x] {
            ctx.verify(&mut st, Kind::VerifyFresh, &mut cs[r], body(&k.secret), Expect::strict(VerifyCode::Valid, &k))
                .await;
        }
        let mut stale = VerifyCode::Valid;
        let mut deleter = x;
        if revoke_first {
            let t0 = Instant::now();
            let r = cs[x].c.revoke_key(ctx.req(RevokeKeyRequest { id: k.id.clone() })).await;
            let r = match r {
                Ok(r) if r.get_ref().id == k.id && r.get_ref().status == KeyStatus::Revoked as i32 => Ok(()),
                Ok(r) => Err(format!("RevokeKey answered status {}", r.get_ref().status)),
                Err(s) => Err(status_text(&s)),
            };
            if st.record(Kind::Revoke, x, t0, r).is_none() {
                continue;
            }
            let (cx, cy) = pair(&mut cs, x);
            ctx.check_change(&mut st, cx, cy, &k, VerifyCode::Revoked, VerifyCode::Valid).await;
            // Revocation is terminal.
            let t0 = Instant::now();
            let req = ctx.req(SetKeyStatusRequest { id: k.id.clone(), status: KeyStatus::Active as i32 });
            let r = expect_code(cs[y].c.set_key_status(req).await, Code::FailedPrecondition);
            st.record(Kind::SetStatus, y, t0, r);
            stale = VerifyCode::Revoked;
            deleter = y;
        }
        let other = (deleter + 1) % REPLICAS;
        let t0 = Instant::now();
        let r = cs[deleter].c.delete_key(ctx.req(DeleteKeyRequest { id: k.id.clone() })).await;
        if st.record(Kind::Delete, deleter, t0, r.map_err(|s| status_text(&s))).is_none() {
            continue;
        }
        let (cd, co) = pair(&mut cs, deleter);
        ctx.check_change(&mut st, cd, co, &k, VerifyCode::NotFound, stale).await;
        // Gone for the management API too.
        let t0 = Instant::now();
        let r = if revoke_first {
            expect_code(cs[other].c.get_key(ctx.req(GetKeyRequest { id: k.id.clone() })).await, Code::NotFound)
        } else {
            expect_code(cs[other].c.delete_key(ctx.req(DeleteKeyRequest { id: k.id.clone() })).await, Code::NotFound)
        };
        st.record(if revoke_first { Kind::GetKey } else { Kind::Delete }, other, t0, r);
    }
    st
}

/// Disables and re-enables its own toggle keys, alternating replicas.
async fn toggle_task(ctx: Arc<Ctx>, w: usize, deadline: Instant) -> Stats {
    let mut st = Stats::new(ctx.orgs.len());
    let mut cs = conns(&ctx, w);
    let mine: Vec<&TestKey> = ctx.toggle.iter().skip(w).step_by(ctx.opts.toggle_workers.max(1)).collect();
    let pause = Duration::from_millis(ctx.opts.toggle_pause_ms);
    let mut cycle = 0;
    while Instant::now() < deadline && !mine.is_empty() {
        let k = mine[cycle % mine.len()];
        let (a, b) = ((cycle + w) % REPLICAS, (cycle + w + 1) % REPLICAS);
        cycle += 1;
        if ctx.set_status(&mut st, &mut cs[a], k, KeyStatus::Disabled).await {
            let (ca, cb) = pair(&mut cs, a);
            ctx.check_change(&mut st, ca, cb, k, VerifyCode::Disabled, VerifyCode::Valid).await;
        }
        tokio::time::sleep(pause).await;
        // Always re-enabled, so that every phase ends with the toggle keys active.
        if ctx.set_status(&mut st, &mut cs[b], k, KeyStatus::Active).await {
            let (cb, ca) = pair(&mut cs, b);
            ctx.check_change(&mut st, cb, ca, k, VerifyCode::Valid, VerifyCode::Disabled).await;
        }
        tokio::time::sleep(pause).await;
    }
    st
}

/// Walks every ListKeys page of one organization (every third walk filtered to
/// ACTIVE), checks order, uniqueness and that no long-lived key is missing,
/// then reads GetKeyStats on the other replica.
async fn list_task(ctx: Arc<Ctx>, deadline: Instant) -> Stats {
    let mut st = Stats::new(ctx.orgs.len());
    let mut cs = conns(&ctx, 0);
    let mut pacer = Pacer::new(ctx.opts.list_rate);
    let page_size = ctx.opts.list_page_size;
    let mut i = 0;
    while pacer.tick(deadline).await {
        let (org, r, other) = (i % ctx.orgs.len(), i % REPLICAS, (i + 1) % REPLICAS);
        let active_only = i % 3 == 2;
        i += 1;
        // Keys that exist throughout the walk; toggle keys may be DISABLED at any moment.
        let mut must: HashSet<String> = ctx.stable.iter().filter(|k| k.org == org).map(|k| k.id.clone()).collect();
        if !active_only {
            must.extend(ctx.toggle.iter().filter(|k| k.org == org).map(|k| k.id.clone()));
        }
        let long_lived_active = {
            let pool = ctx.pool.read().expect("pool lock");
            must.extend(pool.iter().filter(|k| k.org == org).map(|k| k.id.clone()));
            ctx.stable.iter().filter(|k| k.org == org).count() + pool.iter().filter(|k| k.org == org).count()
        };
        let mut seen = HashSet::new();
        let mut last: Option<(i64, i32)> = None;
        let mut token = String::new();
        let complete = loop {
            let t0 = Instant::now();
            let req = ListKeysRequest {
                organization_id: ctx.orgs[org].clone(),
                page_size,
                page_token: std::mem::take(&mut token),
                status: active_only.then_some(KeyStatus::Active as i32),
                created_by: None,
            };
            let res = cs[r].c.list_keys(ctx.req(req)).await.map_err(|s| status_text(&s)).and_then(|resp| {
                let resp = resp.into_inner();
                if resp.keys.len() > page_size as usize
                    || (!resp.next_page_token.is_empty() && resp.keys.len() != page_size as usize)
                {
                    return Err(format!(
                        "page of {} keys (page_size {page_size}) with next token {:?}",
                        resp.keys.len(),
                        !resp.next_page_token.is_empty()
                    ));
                }
                for k in &resp.keys {
                    let at = k.created_at.as_ref().map_or((0, 0), |t| (t.seconds, t.nanos));
                    if k.organization_id != ctx.orgs[org] {
                        return Err(format!("key {} of {} listed for {}", k.id, k.organization_id, ctx.orgs[org]));
                    }
                    if active_only && k.status != KeyStatus::Active as i32 {
                        return Err(format!("key {} with status {} in an ACTIVE listing", k.id, k.status));
                    }
                    if !seen.insert(k.id.clone()) {
                        return Err(format!("key {} listed twice", k.id));
                    }
                    // Newest first (ties on created_at are ordered by id in the database's collation).
                    if last.is_some_and(|l| at > l) {
                        return Err(format!("key {} is newer than the one listed before it", k.id));
                    }
                    last = Some(at);
                }
                Ok(resp.next_page_token)
            });
            match st.record(Kind::ListPage, r, t0, res) {
                None => break false,
                Some(t) if t.is_empty() => break true,
                Some(t) => token = t,
            }
            if seen.len() > 1_000_000 {
                st.fail(Kind::ListPage, r, "pagination does not end".into());
                break false;
            }
        };
        if complete {
            st.walks += 1;
            let missing: Vec<&String> = must.iter().filter(|id| !seen.contains(*id)).collect();
            if !missing.is_empty() {
                st.fail(
                    Kind::ListPage,
                    r,
                    format!("walk of {} misses {} long-lived keys, e.g. {}", ctx.orgs[org], missing.len(), missing[0]),
                );
            }
        }
        let t0 = Instant::now();
        let res =
            cs[other].c.get_key_stats(ctx.req(GetKeyStatsRequest { organization_id: ctx.orgs[org].clone() })).await;
        let res = res.map_err(|s| status_text(&s)).and_then(|s| {
            let s = s.into_inner();
            if s.plan != Plan::Enterprise as i32 || s.key_limit != 0 {
                Err(format!("plan {} limit {} (expected Enterprise, unlimited)", s.plan, s.key_limit))
            } else if complete && !active_only && (s.total_keys as usize) < seen.len() {
                Err(format!("total_keys {} below the {} keys just listed", s.total_keys, seen.len()))
            } else if (s.active_keys as usize) < long_lived_active {
                Err(format!("active_keys {} below the {long_lived_active} keys that are always active", s.active_keys))
            } else {
                Ok(())
            }
        });
        st.record(Kind::GetStats, other, t0, res);
    }
    st
}

/// Wrong secrets for real key ids (argon2 on the server); every other one repeats the last (negative cache).
async fn wrong_secret_task(ctx: Arc<Ctx>, deadline: Instant) -> Stats {
    let mut st = Stats::new(ctx.orgs.len());
    let mut cs = conns(&ctx, 1);
    let mut rng = StdRng::from_os_rng();
    let mut pacer = Pacer::new(ctx.opts.wrong_secret_rate);
    let mut last: [Option<String>; REPLICAS] = Default::default();
    let mut i = 0;
    while pacer.tick(deadline).await {
        let r = (i / 2) % REPLICAS;
        let key = match (&last[r], i % 2) {
            (Some(k), 1) => k.clone(),
            _ => {
                let id = &ctx.stable[rng.random_range(0..ctx.stable.len())].id;
                random_key(&mut rng, Some(id))
            }
        };
        i += 1;
        ctx.verify(&mut st, Kind::VerifyWrongSecret, &mut cs[r], body(&key), Expect::code(VerifyCode::NotFound)).await;
        last[r] = Some(key);
    }
    st
}

// ---------------------------------------------------------------------------
// Bookkeeping: per-kind counts and latency histograms, merged at the end.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    VerifyValid,
    VerifyCreated,
    VerifyToggled,
    VerifyScope,
    VerifyWrongOrg,
    VerifyMalformed,
    VerifyUnknown,
    VerifyWrongSecret,
    VerifyFresh,
    VerifyCheck,
    Create,
    ListPage,
    GetKey,
    GetStats,
    SetStatus,
    Revoke,
    Delete,
    SetPlan,
}

impl Kind {
    const ALL: [Kind; 18] = [
        Kind::VerifyValid,
        Kind::VerifyCreated,
        Kind::VerifyToggled,
        Kind::VerifyScope,
        Kind::VerifyWrongOrg,
        Kind::VerifyMalformed,
        Kind::VerifyUnknown,
        Kind::VerifyWrongSecret,
        Kind::VerifyFresh,
        Kind::VerifyCheck,
        Kind::Create,
        Kind::ListPage,
        Kind::GetKey,
        Kind::GetStats,
        Kind::SetStatus,
        Kind::Revoke,
        Kind::Delete,
        Kind::SetPlan,
    ];

    fn is_verify(self) -> bool {
        (self as usize) <= Kind::VerifyCheck as usize
    }

    fn label(self) -> &'static str {
        match self {
            Kind::VerifyValid => "VerifyKey valid, stable keys (warm) → VALID",
            Kind::VerifyCreated => "VerifyKey valid, keys created during the run → VALID",
            Kind::VerifyToggled => "VerifyKey toggled keys → VALID or DISABLED",
            Kind::VerifyScope => "VerifyKey insufficient scope → INSUFFICIENT_SCOPE",
            Kind::VerifyWrongOrg => "VerifyKey other organization → WRONG_ORGANIZATION",
            Kind::VerifyMalformed => "VerifyKey malformed → MALFORMED",
            Kind::VerifyUnknown => "VerifyKey well-formed, unknown id → NOT_FOUND",
            Kind::VerifyWrongSecret => "VerifyKey wrong secret for a real id → NOT_FOUND",
            Kind::VerifyFresh => "VerifyKey first sight of a new key (argon2) → VALID",
            Kind::VerifyCheck => "VerifyKey after a change: same replica at once, other replica until it converges",
            Kind::Create => "CreateKey (`x-takumo-actor`)",
            Kind::ListPage => "ListKeys, one page (full walks)",
            Kind::GetKey => "GetKey of a deleted key → NOT_FOUND",
            Kind::GetStats => "GetKeyStats",
            Kind::SetStatus => "SetKeyStatus (toggles; re-enabling a revoked key → FAILED_PRECONDITION)",
            Kind::Revoke => "RevokeKey",
            Kind::Delete => "DeleteKey (and deleting again → NOT_FOUND)",
            Kind::SetPlan => "SetOrganizationPlan → ENTERPRISE",
        }
    }
}

/// Log-linear latency histogram in µs: exact below 64 µs, then 32 buckets per
/// power of two (about 3% wide). Percentiles report a bucket's upper edge.
#[derive(Debug, Clone, Default)]
struct Hist {
    counts: Vec<u64>,
    n: u64,
    sum_us: u64,
    max_us: u64,
}

const HIST_LEN: usize = 64 + 26 * 32;

fn hist_index(us: u32) -> usize {
    if us < 64 {
        return us as usize;
    }
    let b = 31 - us.leading_zeros();
    let sub = (us >> (b - 5)) & 31;
    64 + ((b - 6) * 32 + sub) as usize
}

fn hist_upper(idx: usize) -> u64 {
    if idx < 64 {
        return idx as u64;
    }
    let (b, sub) = ((idx - 64) / 32 + 6, ((idx - 64) % 32) as u64);
    ((33 + sub) << (b - 5)) - 1
}

impl Hist {
    fn add(&mut self, d: Duration) {
        if self.counts.is_empty() {
            self.counts = vec![0; HIST_LEN];
        }
        let us = d.as_micros().min(u32::MAX as u128) as u32;
        self.counts[hist_index(us)] += 1;
        self.n += 1;
        self.sum_us += us as u64;
        self.max_us = self.max_us.max(us as u64);
    }

    fn merge(&mut self, o: &Hist) {
        if o.n == 0 {
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; HIST_LEN];
        }
        self.counts.iter_mut().zip(&o.counts).for_each(|(a, b)| *a += b);
        self.n += o.n;
        self.sum_us += o.sum_us;
        self.max_us = self.max_us.max(o.max_us);
    }

    fn mean(&self) -> Option<Duration> {
        (self.n > 0).then(|| Duration::from_micros(self.sum_us / self.n))
    }

    fn percentile(&self, q: f64) -> Option<Duration> {
        if self.n == 0 {
            return None;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_micros(hist_upper(i).min(self.max_us)));
            }
        }
        Some(Duration::from_micros(self.max_us))
    }
}

#[derive(Debug, Clone, Default)]
struct KindStats {
    ok: u64,
    errors: u64,
    hist: Hist,
}

#[derive(Debug, Clone)]
struct Stats {
    kinds: Vec<KindStats>,
    first_errors: Vec<String>,
    /// Every VerifyKey answer by code, expected or not.
    codes: [u64; 9],
    /// Accepted (VALID) answers, by organization index; the last slot is "another organization".
    resolved: Vec<u64>,
    /// Convergence: answers still showing the state before a change (within the bound), changes seen, slowest.
    stale: u64,
    converged: u64,
    /// Changes already visible to the first request after the change call returned.
    converged_at_once: u64,
    /// Changes still not visible on the other replica after the bound (each is also an error).
    late: u64,
    max_lag: Duration,
    walks: u64,
}

impl Stats {
    fn new(orgs: usize) -> Self {
        Stats {
            kinds: vec![KindStats::default(); Kind::ALL.len()],
            first_errors: Vec::new(),
            codes: [0; 9],
            resolved: vec![0; orgs + 1],
            stale: 0,
            converged: 0,
            converged_at_once: 0,
            late: 0,
            max_lag: Duration::ZERO,
            walks: 0,
        }
    }

    /// Counts a call's outcome (latency of every answered call, right or wrong); `Some` when right.
    fn record<T>(&mut self, kind: Kind, replica: usize, t0: Instant, r: Result<T, String>) -> Option<T> {
        let k = &mut self.kinds[kind as usize];
        k.hist.add(t0.elapsed());
        match r {
            Ok(v) => {
                k.ok += 1;
                Some(v)
            }
            Err(e) => {
                k.errors += 1;
                self.note_error(kind, replica, e);
                None
            }
        }
    }

    /// An error found after the calls themselves were fine (e.g. a listing that misses a key).
    fn fail(&mut self, kind: Kind, replica: usize, e: String) {
        self.kinds[kind as usize].errors += 1;
        self.note_error(kind, replica, e);
    }

    fn note_error(&mut self, kind: Kind, replica: usize, e: String) {
        if self.first_errors.len() < 8 {
            let e = format!("{} on replica {replica}: {e}", kind.label());
            eprintln!("error: {e}");
            self.first_errors.push(e);
        }
    }

    fn note_verify(&mut self, r: &VerifyKeyResponse, orgs: &[String]) {
        if let Some(slot) = self.codes.get_mut(r.code.clamp(0, 8) as usize) {
            *slot += 1;
        }
        if VerifyCode::try_from(r.code).is_ok_and(resolves) {
            let i = orgs.iter().position(|o| *o == r.organization_id).unwrap_or(orgs.len());
            self.resolved[i] += 1;
        }
    }

    fn merge(&mut self, o: Stats) {
        for (a, b) in self.kinds.iter_mut().zip(&o.kinds) {
            a.ok += b.ok;
            a.errors += b.errors;
            a.hist.merge(&b.hist);
        }
        for e in o.first_errors {
            if self.first_errors.len() < 8 {
                self.first_errors.push(e);
            }
        }
        self.codes.iter_mut().zip(&o.codes).for_each(|(a, b)| *a += b);
        self.resolved.iter_mut().zip(&o.resolved).for_each(|(a, b)| *a += b);
        self.stale += o.stale;
        self.converged += o.converged;
        self.converged_at_once += o.converged_at_once;
        self.late += o.late;
        self.max_lag = self.max_lag.max(o.max_lag);
        self.walks += o.walks;
    }

    fn kind(&self, k: Kind) -> &KindStats {
        &self.kinds[k as usize]
    }

    fn requests(&self) -> u64 {
        self.kinds.iter().map(|k| k.ok + k.errors).sum()
    }

    fn errors(&self) -> u64 {
        self.kinds.iter().map(|k| k.errors).sum()
    }

    fn resolved_other(&self) -> u64 {
        self.resolved.last().copied().unwrap_or(0)
    }

    /// Requests, errors and latencies of every kind matching `f`, together.
    fn combined(&self, f: impl Fn(Kind) -> bool) -> KindStats {
        let mut out = KindStats::default();
        for k in Kind::ALL.into_iter().filter(|k| f(*k)) {
            let s = self.kind(k);
            out.ok += s.ok;
            out.errors += s.errors;
            out.hist.merge(&s.hist);
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Servers, database, /proc, metrics.

async fn connect(addr: SocketAddr, n: usize) -> Vec<Client> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        // One `connect()` per channel: each is its own HTTP/2 connection.
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connect to server");
        out.push(ApiKeyServiceClient::new(ch));
    }
    out
}

/// One server process; stopped on drop, panics included.
struct Server {
    child: Option<Child>,
    log: PathBuf,
    addr: SocketAddr,
    metrics: SocketAddr,
    pid: u32,
}

impl Server {
    fn start(opts: &Opts, env: &[(String, String)], log: &Path, addr: SocketAddr, metrics: SocketAddr) -> Self {
        let log_file = std::fs::File::create(log).expect("server log file");
        let mut cmd = Command::new(&opts.server_bin);
        // Only our settings: drop any TAKUMO_* / DATABASE_URL / RUST_LOG / OTEL_* from the caller.
        for (k, _) in std::env::vars() {
            if k.starts_with("TAKUMO_") || k.starts_with("OTEL_") || k == "DATABASE_URL" || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        // SAFETY: prctl is async-signal-safe; the child gets SIGTERM if this process dies
        // without running its destructors (e.g. SIGKILL), so no server outlives the soak.
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
        let pid = child.id();
        Server { child: Some(child), log: log.to_owned(), addr, metrics, pid }
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    async fn wait_ready(&self) {
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(ch) = Endpoint::from_shared(format!("http://{}", self.addr)).expect("endpoint").connect().await {
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

    fn signal_term(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).stderr(Stdio::null()).status();
        }
    }

    /// Waits for the process after SIGTERM, killing it after `grace`.
    fn reap(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let give_up = Instant::now() + grace;
        while Instant::now() < give_up {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal_term();
            self.reap(Duration::from_secs(5));
        }
    }
}

/// SIGTERM to every server, then wait for each: the exit status (None: killed after 25 s).
fn stop_all(servers: &mut [Server]) -> Vec<Option<ExitStatus>> {
    servers.iter().for_each(Server::signal_term);
    servers.iter_mut().map(|s| s.reap(Duration::from_secs(25))).collect()
}

/// A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), Linux only.
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok())
}

type RssSample = (f64, Vec<Option<u64>>);

async fn sample_rss(pids: &[u32], every: Duration, stop: &std::sync::atomic::AtomicBool) -> Vec<RssSample> {
    let t0 = Instant::now();
    let mut out = Vec::new();
    loop {
        let rss: Vec<Option<u64>> = pids.iter().map(|p| proc_status_kb(*p, "VmRSS")).collect();
        if !out.is_empty() {
            let shown: Vec<String> = rss.iter().map(|r| r.map_or("?".into(), |kb| format!("{:.1}", mib(kb)))).collect();
            eprintln!("t={:>4.0} s  RSS MiB {}", t0.elapsed().as_secs_f64(), shown.join(" / "));
        }
        out.push((t0.elapsed().as_secs_f64(), rss));
        let next = t0 + every * out.len() as u32;
        while Instant::now() < next {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// USER_HZ: 100 on every Linux architecture this runs on.
const CLK_TCK: f64 = 100.0;

/// User plus system CPU seconds of a process, from /proc/<pid>/stat.
fn proc_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised command: state is field 3; utime and stime are 14 and 15.
    let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / CLK_TCK)
}

/// Busy CPU seconds of the whole machine (all but idle and iowait), from /proc/stat.
fn sys_busy_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<f64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    Some(f.get(..8)?.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum::<f64>() / CLK_TCK)
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// RPCs the servers answered with anything but OK, by `method`/`code` labels.
fn non_ok_rpcs(text: &str, into: &mut BTreeMap<String, f64>) {
    for (series, value) in text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.rsplit_once(' ')) {
        if let Some(labels) = series.strip_prefix("takumo_keys_rpc_requests_total")
            && !labels.contains("code=\"OK\"")
        {
            let v = value.parse::<f64>().unwrap_or(0.0);
            if v > 0.0 {
                *into.entry(labels.trim_matches(|c| c == '{' || c == '}').replace('"', "")).or_default() += v;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Report.

struct UsageCheck {
    orgs: Vec<String>,
    /// Accepted (VALID) verifications, counted by this client from the answers.
    client: Vec<u64>,
    /// Resolved answers naming an organization the soak did not create (must be 0).
    other: u64,
    /// `api_calls_24h` at the first read and when compared.
    first: Vec<Option<i64>>,
    stored: Vec<Option<i64>>,
    settled_after: Duration,
}

impl UsageCheck {
    fn equal(&self) -> bool {
        self.other == 0
            && self.stored.len() == self.client.len()
            && self.stored.iter().zip(&self.client).all(|(s, c)| *s == Some(*c as i64))
    }
}

struct Report {
    pg_version: String,
    setup: Stats,
    warm: Stats,
    warm_elapsed: Duration,
    soak: Stats,
    soak_elapsed: Duration,
    post: Stats,
    stable_keys: usize,
    toggle_keys: usize,
    pool_size: usize,
    rss_boot: Vec<Option<u64>>,
    rss_start: Vec<Option<u64>>,
    rss_end: Vec<Option<u64>>,
    /// CPUs used on average over the measured run: replica 0, replica 1, the load generator, the rest.
    cpu: Vec<Option<f64>>,
    hwm: Vec<Option<u64>>,
    samples: Vec<RssSample>,
    scraped: Vec<Result<String, String>>,
    client_codes: [u64; 9],
    usage: UsageCheck,
    exits: Vec<Option<ExitStatus>>,
    logs: Vec<String>,
}

impl Report {
    fn total_errors(&self) -> u64 {
        [&self.setup, &self.warm, &self.soak, &self.post].iter().map(|s| s.errors()).sum()
    }

    fn cache_entries(&self) -> Vec<Option<f64>> {
        self.scraped.iter().map(|m| m.as_ref().ok().and_then(|t| metric(t, "takumo_keys_cache_entries", &[]))).collect()
    }

    fn memory_ok(&self, opts: &Opts) -> bool {
        let growth_ok = self.rss_start.iter().zip(&self.rss_end).all(|(s, e)| match (s, e) {
            (Some(s), Some(e)) => mib(*e) - mib(*s) <= opts.max_rss_growth_mb,
            _ => false,
        });
        let cache_ok = self.cache_entries().iter().all(|c| c.is_some_and(|c| c <= opts.cache_capacity as f64));
        growth_ok && cache_ok
    }

    /// Server-side VerifyKey outcomes (both replicas) by code, as the client saw them.
    fn server_codes(&self) -> Option<[u64; 9]> {
        let mut out = [0u64; 9];
        for m in &self.scraped {
            let t = m.as_ref().ok()?;
            for (i, name) in verify_code_labels() {
                let label = format!("code=\"{name}\"");
                out[i] += metric(t, "takumo_keys_verify_outcomes_total", &[&label])? as u64;
            }
        }
        Some(out)
    }

    fn codes_match(&self) -> bool {
        self.server_codes().is_some_and(|s| s[1..] == self.client_codes[1..])
    }

    fn clean_exit(&self) -> bool {
        self.exits.iter().all(|e| e.is_some_and(|s| s.success()))
    }

    fn late(&self) -> u64 {
        [&self.setup, &self.warm, &self.soak, &self.post].iter().map(|s| s.late).sum()
    }

    fn all_met(&self, opts: &Opts) -> bool {
        self.total_errors() == 0
            && self.memory_ok(opts)
            && self.usage.equal()
            && self.codes_match()
            && self.clean_exit()
            && self.late() == 0
    }

    fn render(&self, opts: &Opts, total: Duration) -> String {
        let header = ResultsHeader {
            title: "Reliability results: soak",
            generator: "benches/soak.rs",
            analysis: "docs/reliability.md",
            command: bench_command("soak", "TAKUMO_SOAK_"),
            path: &opts.docs,
        };
        let mut s = header.render();
        s.push('\n');
        let soak = &self.soak;
        let secs = self.soak_elapsed.as_secs_f64();
        let verifies = soak.combined(Kind::is_verify);
        let mgmt = soak.combined(|k| !k.is_verify());
        let errors = self.total_errors();
        let memory_ok = self.memory_ok(opts);
        let usage_ok = self.usage.equal();
        let codes_ok = self.codes_match();
        let exit_ok = self.clean_exit();
        let all = self.all_met(opts);
        let met = |ok: bool| if ok { "met" } else { "**not met**" };

        let _ = writeln!(
            s,
            "**Verdict: {}** — {} errors in {} requests; {} verifications/s; verify p99 {}; memory {}; \
             usage counted {}.\n",
            if all { "met" } else { "not met" },
            errors,
            self.setup.requests() + self.warm.requests() + soak.requests() + self.post.requests(),
            fmt_rps(verifies.ok as f64 / secs),
            verifies.hist.percentile(0.99).map_or("–".into(), fmt_dur),
            if memory_ok { "bounded" } else { "NOT bounded" },
            if usage_ok { "exactly" } else { "WRONG" },
        );

        let _ = writeln!(s, "## Run\n");
        let _ = writeln!(
            s,
            "- Machine, besides the above: {:.1} GiB RAM; PostgreSQL {} on 127.0.0.1 (TCP loopback, \
             `sslmode=disable`)",
            mem_total_gib(),
            self.pg_version
        );
        let _ = writeln!(
            s,
            "- Servers: 2 release `takumo-keys` processes on one fresh PostgreSQL database (started together: \
             migrations ran once), one pepper and service token, argon2id at the server binary's defaults ({}, \
             from `serve --help`), `TAKUMO_CACHE_CAPACITY={}`, other settings default (freshness 30 s, negative \
             TTL 30 s, usage flush every 1 s), metrics on. {} organizations on PLAN_ENTERPRISE; {} stable keys, {} \
             toggle keys, all read-only preset.",
            server_argon2_defaults(&opts.server_bin),
            opts.cache_capacity,
            opts.orgs,
            self.stable_keys,
            self.toggle_keys
        );
        let _ = writeln!(
            s,
            "- Load generator: this bench (tonic client, {} tokio threads) on the same {} CPUs as both servers and \
             PostgreSQL; {:.0} s warm-up then {:.0} s measured (wall {:.1} s); {} closed-loop VerifyKey requests in \
             flight, half per replica, over {} HTTP/2 connections per replica, mix: {}. Paced alongside, \
             alternating replicas: CreateKey {}/s (then verified on the other replica and added to the verified \
             pool, {} keys at the end), key lifecycles {}/s, toggle tasks {} (pause {} ms), ListKeys walks {}/s \
             (page size {}) each followed by GetKeyStats, wrong secrets {}/s. A change must show on the other \
             replica within {} ms. Whole run {:.0} s.",
            opts.client_threads,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            opts.warmup,
            opts.duration,
            secs,
            opts.concurrency,
            opts.connections,
            Mix::parse(&opts.mix).map_or(opts.mix.clone(), |m| m.describe()),
            opts.create_rate,
            self.pool_size,
            opts.lifecycle_rate,
            opts.toggle_workers,
            opts.toggle_pause_ms,
            opts.list_rate,
            opts.list_page_size,
            opts.wrong_secret_rate,
            opts.propagation_bound_ms,
            total.as_secs_f64()
        );
        let c = |i: usize| self.cpu.get(i).copied().flatten().map_or("?".into(), |v| format!("{v:.2}"));
        let _ = writeln!(
            s,
            "- CPUs used on average over the measured run: replica 0 {}, replica 1 {}, this load generator {}, \
             everything else (PostgreSQL, …) {}. The closed-loop workers keep the machine saturated, so the \
             latencies of calls that need a store read or argon2 (creates, first sights, wrong secrets, verifies \
             right after a change) include waiting for a core behind them, not only their own work.",
            c(0),
            c(1),
            c(2),
            c(3)
        );
        if opts.duration < 30.0 {
            let _ = writeln!(s, "- **Short run** ({:.0} s): a smoke test, not a soak.", opts.duration);
        }
        s.push('\n');

        let _ = writeln!(s, "## Requests (measured {:.0} s)\n", opts.duration);
        let _ = writeln!(
            s,
            "Every answer is checked for the outcome it must have; an error is any other answer (gRPC error, wrong \
             code, wrong identity, a listing out of order or missing a key, a change not visible on the other replica \
             in time). Latency of every answered call, from this client.\n"
        );
        s.push_str(
            "| requests | count | errors | per second | mean | p50 | p99 |\n|---|---:|---:|---:|---:|---:|---:|\n",
        );
        let row = |s: &mut String, label: &str, k: &KindStats, bold: bool| {
            let n = k.ok + k.errors;
            let b = if bold { "**" } else { "" };
            let errs = if k.errors > 0 { format!("**{}**", k.errors) } else { "0".into() };
            let _ = writeln!(
                s,
                "| {b}{label}{b} | {n} | {errs} | {} | {} | {} | {} |",
                fmt_rps(n as f64 / secs),
                k.hist.mean().map_or("–".into(), fmt_dur),
                k.hist.percentile(0.5).map_or("–".into(), fmt_dur),
                k.hist.percentile(0.99).map_or("–".into(), fmt_dur),
            );
        };
        for k in Kind::ALL {
            let ks = soak.kind(k);
            if ks.ok + ks.errors > 0 {
                row(&mut s, k.label(), ks, false);
            }
        }
        row(&mut s, "all VerifyKey", &verifies, true);
        row(&mut s, "all management calls", &mgmt, true);
        let _ = writeln!(
            s,
            "\nErrors outside the measured window: setup {}, warm-up {} ({} requests in {:.1} s), \
             final GetKeyStats {}. \
             ListKeys walks completed: {}. Changes checked on the other replica: {}, {} of them visible to the \
             first request sent after the change call returned; the slowest was first seen by a request sent {} \
             after it; {} answers showed the previous state meanwhile.\n",
            self.setup.errors(),
            self.warm.errors(),
            self.warm.requests(),
            self.warm_elapsed.as_secs_f64(),
            self.post.errors(),
            soak.walks,
            soak.converged,
            soak.converged_at_once,
            fmt_dur(soak.max_lag),
            soak.stale
        );
        let mut errs: Vec<&String> = Vec::new();
        for st in [&self.setup, &self.warm, soak, &self.post] {
            errs.extend(st.first_errors.iter());
        }
        if !errs.is_empty() {
            s.push_str("First errors:\n\n");
            for e in errs.iter().take(8) {
                let _ = writeln!(s, "- {e}");
            }
            s.push('\n');
        }

        let _ = writeln!(s, "## Memory\n");
        let _ = writeln!(
            s,
            "Resident memory (`VmRSS` from `/proc/<pid>/status`) after the warm-up and at the end of the measured \
             run; `VmHWM` is the peak over the process's life. The cache gauge is `takumo_keys_cache_entries` \
             (verified keys cached) scraped at the end; capacity {} per process (the negative cache has the same \
             bound). Bounded means: growth ≤ {} MiB and cache entries ≤ capacity.\n",
            opts.cache_capacity, opts.max_rss_growth_mb
        );
        s.push_str(concat!(
            "| replica | RSS after boot | RSS at start (after warm-up) | RSS at end | growth | peak sampled | VmHWM \
             | trend | cache entries at end |\n",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        ));
        let cache = self.cache_entries();
        for i in 0..self.rss_start.len() {
            let f = |v: Option<u64>| v.map_or("?".into(), |kb| format!("{:.1} MiB", mib(kb)));
            let growth = match (self.rss_start[i], self.rss_end[i]) {
                (Some(a), Some(b)) => format!("{:+.1} MiB", mib(b) - mib(a)),
                _ => "?".into(),
            };
            let peak = self.samples.iter().filter_map(|(_, v)| v.get(i).copied().flatten()).max();
            let _ = writeln!(
                s,
                "| {i} | {} | {} | {} | {growth} | {} | {} | {} | {} |",
                f(self.rss_boot[i]),
                f(self.rss_start[i]),
                f(self.rss_end[i]),
                f(peak),
                f(self.hwm[i]),
                self.slope(i).map_or("?".into(), |m| format!("{m:+.2} MiB/min")),
                cache.get(i).copied().flatten().map_or("?".into(), |c| format!("{c:.0} / {}", opts.cache_capacity)),
            );
        }
        let _ = writeln!(
            s,
            "\nTrend: least-squares slope of the samples over the measured run (every {:.0} s). Samples, MiB: {}\n",
            opts.sample_secs,
            (0..self.rss_start.len())
                .map(|i| format!(
                    "replica {i}: {}",
                    self.samples
                        .iter()
                        .map(|(_, v)| v.get(i).copied().flatten().map_or("?".into(), |kb| format!("{:.1}", mib(kb))))
                        .collect::<Vec<_>>()
                        .join(" ")
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );

        let _ = writeln!(s, "## Usage counting\n");
        let _ = writeln!(
            s,
            "Accepted verifications (VALID answers: refusals such as DISABLED or INSUFFICIENT_SCOPE are not API \
             calls), counted by this client from the \
             answers over the whole run (setup and warm-up included), against `api_calls_24h` from GetKeyStats, \
             read {:.1} s after the load stopped{}.\n",
            (USAGE_FLUSH_INTERVAL * 2 + Duration::from_millis(500)).as_secs_f64(),
            if self.usage.settled_after > Duration::from_millis(100) {
                format!(" and re-read until equal or 10 s ({:.1} s)", self.usage.settled_after.as_secs_f64())
            } else {
                String::new()
            }
        );
        s.push_str(concat!(
            "| organization | VALID verifications (client) | `api_calls_24h` (server) | equal |\n",
            "|---|---:|---:|---|\n"
        ));
        for (i, org) in self.usage.orgs.iter().enumerate() {
            let stored = self.usage.stored.get(i).copied().flatten();
            let first = self.usage.first.get(i).copied().flatten();
            let shown = match (first, stored) {
                (Some(a), Some(b)) if a != b => format!("{b} (first read {a})"),
                (_, Some(b)) => b.to_string(),
                _ => "?".into(),
            };
            let eq = stored == Some(self.usage.client[i] as i64);
            let _ =
                writeln!(s, "| {org} | {} | {shown} | {} |", self.usage.client[i], if eq { "yes" } else { "**no**" });
        }
        if self.usage.other > 0 {
            let _ =
                writeln!(s, "\n**{} resolved answers named an organization the soak never used.**", self.usage.other);
        }
        s.push('\n');

        let _ = writeln!(s, "## Server side\n");
        let server = self.server_codes();
        s.push_str(
            "| VerifyKey outcome | client saw | servers counted (`verify_outcomes_total`, both) |\n|---|---:|---:|\n",
        );
        for (i, name) in verify_code_labels() {
            let sv = server.map_or("?".into(), |c| c[i].to_string());
            if self.client_codes[i] > 0 || server.is_some_and(|c| c[i] > 0) {
                let _ = writeln!(s, "| {name} | {} | {sv} |", self.client_codes[i]);
            }
        }
        let mut non_ok = BTreeMap::new();
        let mut extra = Vec::new();
        for (i, m) in self.scraped.iter().enumerate() {
            match m {
                Ok(t) => {
                    non_ok_rpcs(t, &mut non_ok);
                    let g = |n: &str| metric(t, n, &[]).map_or("?".into(), |v| format!("{v:.0}"));
                    extra.push(format!(
                        "replica {i}: VerifyKey answered {}, argon2 verifications {}, argon2 rejected {}, \
                         cache hits {}, misses {}, refreshes {}, negative hits {}, invalidations {}, \
                         cache resets {}, usage flush failures {}",
                        g("takumo_keys_verify_outcomes_total"),
                        g("takumo_keys_argon2_verifications_total"),
                        g("takumo_keys_argon2_rejected_total"),
                        g("takumo_keys_cache_hits_total"),
                        g("takumo_keys_cache_misses_total"),
                        g("takumo_keys_cache_refreshes_total"),
                        g("takumo_keys_negative_cache_hits_total"),
                        g("takumo_keys_cache_invalidations_total"),
                        g("takumo_keys_cache_resets_total"),
                        g("takumo_keys_usage_flush_failures_total"),
                    ));
                }
                Err(e) => extra.push(format!("replica {i}: metrics scrape failed: {e}")),
            }
        }
        s.push('\n');
        for e in &extra {
            let _ = writeln!(s, "- {e}");
        }
        if non_ok.is_empty() {
            s.push_str("- Non-OK gRPC answers: none.\n");
        } else {
            let list: Vec<String> = non_ok.iter().map(|(k, v)| format!("{k}: {v:.0}")).collect();
            let _ = writeln!(
                s,
                "- Non-OK gRPC answers (expected: the refused re-enable and the deleted-key calls): {}",
                list.join("; ")
            );
        }
        let exits: Vec<String> =
            self.exits.iter().map(|e| e.map_or("killed after 25 s".into(), |s| s.to_string())).collect();
        let _ = writeln!(s, "- SIGTERM at the end: {}", exits.join(", "));
        for (i, log) in self.logs.iter().enumerate() {
            let bad: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ") || l.contains(" WARN ")).collect();
            if bad.is_empty() {
                let _ = writeln!(s, "- replica {i} log: no WARN or ERROR lines");
            } else {
                let _ = writeln!(s, "- replica {i} log: {} WARN/ERROR lines, e.g. `{}`", bad.len(), bad[0].trim());
            }
        }
        s.push('\n');

        let _ = writeln!(s, "## Checks\n");
        s.push_str("| check | result |\n|---|---|\n");
        let _ = writeln!(s, "| errors = 0 (setup, warm-up, measured, final reads) | {} ({errors}) |", met(errors == 0));
        let growth: Vec<String> = self
            .rss_start
            .iter()
            .zip(&self.rss_end)
            .map(|(a, b)| match (a, b) {
                (Some(a), Some(b)) => format!("{:+.1} MiB", mib(*b) - mib(*a)),
                _ => "?".into(),
            })
            .collect();
        let cache_txt: Vec<String> = cache.iter().map(|c| c.map_or("?".into(), |c| format!("{c:.0}"))).collect();
        let _ = writeln!(
            s,
            "| memory bounded: RSS growth ≤ {} MiB per server, cache entries ≤ {} | {} (growth {}; entries {}) |",
            opts.max_rss_growth_mb,
            opts.cache_capacity,
            met(memory_ok),
            growth.join(", "),
            cache_txt.join(", ")
        );
        let _ = writeln!(
            s,
            "| stored `api_calls_24h` = accepted (VALID) verifications, per organization | {} ({} vs {}) |",
            met(usage_ok),
            self.usage.stored.iter().map(|v| v.map_or("?".into(), |v| v.to_string())).collect::<Vec<_>>().join("/"),
            self.usage.client.iter().map(u64::to_string).collect::<Vec<_>>().join("/")
        );
        let _ = writeln!(s, "| servers' VerifyKey outcome counts = the client's | {} |", met(codes_ok));
        let _ = writeln!(
            s,
            "| changes visible on the other replica within {} ms | {} (slowest {}; {} late) |",
            opts.propagation_bound_ms,
            met(self.late() == 0),
            fmt_dur(soak.max_lag.max(self.warm.max_lag)),
            self.late()
        );
        let _ = writeln!(s, "| both servers exit 0 on SIGTERM | {} |", met(exit_ok));
        s
    }

    /// Least-squares slope of replica `i`'s sampled RSS, MiB per minute.
    fn slope(&self, i: usize) -> Option<f64> {
        let pts: Vec<(f64, f64)> =
            self.samples.iter().filter_map(|(t, v)| v.get(i).copied().flatten().map(|kb| (*t, mib(kb)))).collect();
        if pts.len() < 3 {
            return None;
        }
        let n = pts.len() as f64;
        let (mx, my) = (pts.iter().map(|p| p.0).sum::<f64>() / n, pts.iter().map(|p| p.1).sum::<f64>() / n);
        let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        (sxx > 0.0).then(|| sxy / sxx * 60.0)
    }
}

fn mem_total_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0)
}

/// Every VerifyKey code but UNSPECIFIED, with its metric label, by wire number
/// (the index the client-side tallies use).
fn verify_code_labels() -> impl Iterator<Item = (usize, &'static str)> {
    (1..9).filter_map(|i| {
        let code = takumo_keys::proto::pb::VerifyCode::try_from(i as i32).ok()?;
        Some((i, takumo_keys::verify::code_label(code)))
    })
}
