//! Capacity figures for `docs/scaling.md`: `cargo bench --bench scaling [-- FLAGS]`.
//!
//! A private PostgreSQL primary and a streaming hot standby of it (initdb,
//! `pg_basebackup -R`, like the standby tests), `--keys` keys created through
//! the API, then two release server processes started fresh: one reading the
//! primary only, one with `DATABASE_READ_URL` on the standby. Each verifies
//! every key once (cold: one key read and one argon2 verification, then
//! cached). Measured per server: CPU per cold verification (from /proc), and
//! resident memory before and after caching every key (RSS per 100,000
//! cached keys). Then change notices: `--listeners` replicas (each a server
//! process with a `WatchKeyChanges` stream open from this bench) while one
//! more replica takes `SetKeyStatus` changes at increasing rates; for each
//! rate, the time from a change call's return to its notice arriving on
//! every listener's stream, p50 and p99 (the rate at which p99 passes 100 ms
//! is the figure asked for).
//!
//! Results go to stdout and to `docs/scaling-results.md`, which this bench
//! owns and rewrites whole (`--docs` elsewhere, `--no-docs` not at all).
//! The analysis is hand-written in `docs/scaling.md`.

#[path = "support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "../tests/common/cluster.rs"]
mod cluster;

use clap::Parser;
use futures::StreamExt;
use std::{fmt::Write as _, path::PathBuf, sync::Arc, time::Duration};
use support::{
    load::{admin_req, connect},
    procfs::{cpu_seconds, status_kb},
    report::write_results,
    server::{Server, ensure_server_built, free_addr},
};
use takumo_keys::proto::pb::{self, api_key_service_client::ApiKeyServiceClient, create_key_request::Scopes};
use tonic::{Request, metadata::AsciiMetadataValue, transport::Channel};

const SERVICE_TOKEN: &str = "bench-service-token-0123456789abcdefghijklmnop";
const PEPPER: &str = "bench-pepper-0123456789abcdef";
const ORGS: usize = 100;

#[derive(Debug, Clone, Parser)]
#[command(name = "scaling", about = "Capacity figures (cargo bench --bench scaling -- FLAGS)")]
struct Opts {
    /// Keys created, then verified once on each server.
    #[arg(long, env = "TAKUMO_BENCH_SCALING_KEYS", default_value_t = 50_000)]
    keys: usize,
    /// Requests in flight while creating and verifying.
    #[arg(long, env = "TAKUMO_BENCH_SCALING_CONCURRENCY", default_value_t = 32)]
    concurrency: usize,
    /// Listener counts for the notice phase, comma-separated (0 skips it).
    #[arg(long, env = "TAKUMO_BENCH_SCALING_LISTENERS", value_delimiter = ',', default_value = "1,4,8")]
    listeners: Vec<usize>,
    /// Change rates (per second) tried for each listener count, comma-separated.
    #[arg(long, env = "TAKUMO_BENCH_SCALING_RATES", value_delimiter = ',', default_value = "50,200,500,1000")]
    rates: Vec<u32>,
    #[arg(long, env = "TAKUMO_BENCH_SERVER_BIN", default_value = env!("CARGO_BIN_EXE_takumo-keys"))]
    server_bin: PathBuf,
    #[arg(long, env = "TAKUMO_BENCH_SCALING_DOCS", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/scaling-results.md"))]
    docs: PathBuf,
    #[arg(long, env = "TAKUMO_BENCH_NO_DOCS")]
    no_docs: bool,
    #[arg(long, hide = true)]
    bench: bool,
}

/// A management call with the bench's service token.
fn admin<T>(msg: T) -> Request<T> {
    static AUTH: std::sync::LazyLock<AsciiMetadataValue> =
        std::sync::LazyLock::new(|| format!("Bearer {SERVICE_TOKEN}").parse().expect("ascii"));
    admin_req(msg, &AUTH)
}

async fn client(addr: std::net::SocketAddr) -> ApiKeyServiceClient<Channel> {
    ApiKeyServiceClient::new(connect(addr, 1, Some(Duration::from_secs(30))).await.remove(0))
}

fn env(primary: &str, standby: Option<&str>) -> Vec<(String, String)> {
    let mut e = vec![
        ("DATABASE_URL".to_owned(), primary.to_owned()),
        ("TAKUMO_PEPPER".into(), PEPPER.into()),
        ("TAKUMO_SERVICE_TOKENS".into(), format!("bench={SERVICE_TOKEN}")),
        ("TAKUMO_CACHE_CAPACITY".into(), "1000000".into()),
    ];
    if let Some(s) = standby {
        e.push(("DATABASE_READ_URL".into(), s.to_owned()));
    }
    e
}

struct ColdRun {
    name: &'static str,
    cpu_per_verify_us: f64,
    rss_before_mib: f64,
    rss_after_mib: f64,
    failures: usize,
}

/// A fresh server verifying every key once.
async fn cold_run(
    opts: &Opts,
    name: &'static str,
    env: &[(String, String)],
    keys: &[String],
    dir: &std::path::Path,
) -> ColdRun {
    let server = Server::start(&opts.server_bin, env, &dir.join(format!("{name}.log")), free_addr(), free_addr());
    server.wait_ready().await;
    let c = client(server.addr).await;
    // One verification first, so the connection, pools and allocator arenas
    // are warm before the baseline is read.
    let _ = c.clone().verify_key(admin(pb::VerifyKeyRequest { key: keys[0].clone(), ..Default::default() })).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = status_kb(server.pid(), "VmRSS").unwrap_or(0);
    let cpu_before = cpu_seconds(server.pid()).unwrap_or(0.0);
    let failures = futures::stream::iter(keys.iter().cloned())
        .map(|key| {
            let mut c = c.clone();
            async move {
                let r = c.verify_key(admin(pb::VerifyKeyRequest { key, ..Default::default() })).await;
                r.map(|r| r.into_inner().valid).unwrap_or(false)
            }
        })
        .buffer_unordered(opts.concurrency)
        .filter(|ok| std::future::ready(!ok))
        .count()
        .await;
    let cpu = cpu_seconds(server.pid()).unwrap_or(0.0) - cpu_before;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = status_kb(server.pid(), "VmRSS").unwrap_or(0);
    drop(server);
    ColdRun {
        name,
        cpu_per_verify_us: cpu / keys.len() as f64 * 1e6,
        rss_before_mib: rss_before as f64 / 1024.0,
        rss_after_mib: rss_after as f64 / 1024.0,
        failures,
    }
}

/// One rate step of the notice phase.
struct NoticeStep {
    listeners: usize,
    rate: u32,
    changes: usize,
    achieved: f64,
    p50: Option<Duration>,
    p99: Option<Duration>,
    missing: usize,
}

/// Changes at `rate` per second for 2 s through `writer`, each to a key of
/// its own, while every listener's stream reports when it hears of each.
async fn notice_step(
    writer: &ApiKeyServiceClient<Channel>,
    listeners: &[std::net::SocketAddr],
    ids: &[String],
    rate: u32,
    status: pb::KeyStatus,
) -> NoticeStep {
    use std::{collections::HashMap, sync::Mutex, time::Instant};
    let heard: Arc<Mutex<Vec<HashMap<String, Instant>>>> = Arc::new(Mutex::new(vec![HashMap::new(); listeners.len()]));
    let mut tasks = vec![];
    for (i, addr) in listeners.iter().enumerate() {
        let mut c = client(*addr).await;
        let mut stream = c
            .watch_key_changes(admin(pb::WatchKeyChangesRequest { organization_id: None }))
            .await
            .expect("watch")
            .into_inner();
        let heard = heard.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(change)) = stream.message().await {
                let now = Instant::now();
                heard.lock().unwrap()[i].entry(change.key_id).or_insert(now);
            }
        }));
    }
    let n = (rate as usize * 2).min(ids.len());
    let every = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let returned: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut calls = vec![];
    for (k, id) in ids.iter().take(n).enumerate() {
        let due = start + every * k as u32;
        tokio::time::sleep_until(due.into()).await;
        let (mut w, id, returned) = (writer.clone(), id.clone(), returned.clone());
        calls.push(tokio::spawn(async move {
            let req = pb::SetKeyStatusRequest { id: id.clone(), status: status as i32 };
            if w.set_key_status(admin(req)).await.is_ok() {
                returned.lock().unwrap().insert(id, Instant::now());
            }
        }));
    }
    for c in calls {
        let _ = c.await;
    }
    let achieved = n as f64 / start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for t in &tasks {
        t.abort();
    }
    let (returned, heard) = (returned.lock().unwrap().clone(), heard.lock().unwrap().clone());
    let mut lat = vec![];
    let mut missing = 0;
    for (id, back) in &returned {
        for h in &heard {
            match h.get(id) {
                Some(at) => lat.push(at.saturating_duration_since(*back)),
                None => missing += 1,
            }
        }
    }
    lat.sort_unstable();
    let q = |q: f64| (!lat.is_empty()).then(|| lat[((q * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1]);
    NoticeStep {
        listeners: listeners.len(),
        rate,
        changes: returned.len(),
        achieved,
        p50: q(0.5),
        p99: q(0.99),
        missing,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let opts = Opts::parse();
    if !opts.bench {
        eprintln!("scaling: not run (no --bench); use `cargo bench --bench scaling [-- FLAGS]`");
        return;
    }
    ensure_server_built(&opts.server_bin);
    let tmp = tempfile::Builder::new().prefix("takumo-scaling-").tempdir().expect("tempdir");
    let primary = cluster::PgCluster::start();
    let standby = cluster::PgCluster::standby_of(&primary, "0");
    let (p_url, s_url) = (primary.url("postgres"), standby.url("postgres"));

    // Keys, through the API of a first server (which migrates the database).
    let maker =
        Server::start(&opts.server_bin, &env(&p_url, None), &tmp.path().join("maker.log"), free_addr(), free_addr());
    maker.wait_ready().await;
    let c = client(maker.addr).await;
    for o in 0..ORGS {
        let req =
            pb::SetOrganizationPlanRequest { organization_id: format!("org-{o}"), plan: pb::Plan::Enterprise as i32 };
        c.clone().set_organization_plan(admin(req)).await.expect("plan");
    }
    let keys: Vec<String> = futures::stream::iter(0..opts.keys)
        .map(|i| {
            let mut c = c.clone();
            async move {
                let req = pb::CreateKeyRequest {
                    organization_id: format!("org-{}", i % ORGS),
                    name: format!("k{i}"),
                    scopes: Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32)),
                    ..Default::default()
                };
                c.create_key(admin(req)).await.expect("create").into_inner().secret
            }
        })
        .buffer_unordered(opts.concurrency)
        .collect()
        .await;
    drop(maker);
    eprintln!("{} keys created", keys.len());
    // The standby has everything before the measured reads.
    let pool = sqlx::PgPool::connect(&s_url).await.unwrap();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys").fetch_one(&pool).await.unwrap_or(0);
        if n as usize >= keys.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let runs = [
        cold_run(&opts, "primary", &env(&p_url, None), &keys, tmp.path()).await,
        cold_run(&opts, "standby", &env(&p_url, Some(&s_url)), &keys, tmp.path()).await,
    ];

    // Change notices to N listeners.
    let ids: Vec<String> =
        keys.iter().map(|k| k.get(takumo_keys::domain::keys::ID_RANGE).unwrap_or_default().to_owned()).collect();
    let mut steps = vec![];
    let most = opts.listeners.iter().copied().max().unwrap_or(0);
    if most > 0 {
        let writer_server = Server::start(
            &opts.server_bin,
            &env(&p_url, None),
            &tmp.path().join("writer.log"),
            free_addr(),
            free_addr(),
        );
        writer_server.wait_ready().await;
        let writer = client(writer_server.addr).await;
        let mut servers = vec![];
        for i in 0..most {
            let s = Server::start(
                &opts.server_bin,
                &env(&p_url, None),
                &tmp.path().join(format!("listener-{i}.log")),
                free_addr(),
                free_addr(),
            );
            s.wait_ready().await;
            servers.push(s);
        }
        let mut next = 0usize;
        let mut status = pb::KeyStatus::Disabled;
        for &n in &opts.listeners {
            let addrs: Vec<_> = servers.iter().take(n).map(|s| s.addr).collect();
            for &rate in &opts.rates {
                let want = (rate as usize * 2).min(ids.len());
                if next + want > ids.len() {
                    next = 0;
                    status =
                        if status == pb::KeyStatus::Disabled { pb::KeyStatus::Active } else { pb::KeyStatus::Disabled };
                }
                let step = notice_step(&writer, &addrs, &ids[next..next + want], rate, status).await;
                next += want;
                eprintln!("notices: {n} listeners, {rate}/s: p99 {:?}", step.p99);
                steps.push(step);
            }
        }
    }

    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Scaling results\n\nGenerated by `cargo bench --bench scaling` (benches/scaling.rs); rewritten whole on \
         every run. The analysis is in `docs/scaling.md`.\n\n- {} keys in {ORGS} organizations, each verified once \
         on a fresh release server ({} in flight, one HTTP/2 connection); PostgreSQL {} primary and a streaming \
         hot standby of it, private clusters on loopback; server defaults otherwise (argon2id m=32 KiB t=1).\n",
        keys.len(),
        opts.concurrency,
        sqlx::query_scalar::<_, String>("SHOW server_version").fetch_one(&pool).await.unwrap_or_default()
    );
    t.push_str(
        "| cold reads from | server CPU per cold verification | RSS before | RSS with every key cached | RSS per 100,000 cached keys | failed |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for r in &runs {
        let per_100k = (r.rss_after_mib - r.rss_before_mib) / keys.len() as f64 * 100_000.0;
        let _ = writeln!(
            t,
            "| {} | {:.0} µs | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} |",
            r.name, r.cpu_per_verify_us, r.rss_before_mib, r.rss_after_mib, per_100k, r.failures
        );
    }
    let _ = writeln!(
        t,
        "\nCPU is the server process's user + system time over the verifications (PostgreSQL's own CPU not \
         included); a cold verification is one key read and one argon2id verification, then the key is cached. \
         From it, a replica's cold start costs (CPU per cold verification × active keys), e.g. {:.2} CPU-seconds \
         per 10,000 keys from the primary. RSS is /proc's VmRSS half a second after the last verification; the \
         allocator keeps what it got, so this is an upper bound on what the caches hold.",
        runs[0].cpu_per_verify_us * 10_000.0 / 1e6
    );
    if !steps.is_empty() {
        let _ = writeln!(
            t,
            "\n## Change notices to N listeners\n\nOne replica takes `SetKeyStatus` changes (each to a key of its \
             own) at the asked rate for 2 s; every listener is another replica with a `WatchKeyChanges` stream open \
             from this bench. Latency: from a change call's return to the notice arriving on a listener's stream \
             (the change's `pg_notify`, PostgreSQL's delivery to the listener's LISTEN connection, the listener's \
             feed); one sample per change per listener. All processes share this machine's 2 cores.\n\n\
             | listeners | asked rate | achieved | changes | p50 | p99 | notices missing | p99 ≤ 100 ms |\n|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for s in &steps {
            let ms = |d: Option<Duration>| d.map_or("–".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3));
            let _ = writeln!(
                t,
                "| {} | {}/s | {:.0}/s | {} | {} | {} | {} | {} |",
                s.listeners,
                s.rate,
                s.achieved,
                s.changes,
                ms(s.p50),
                ms(s.p99),
                s.missing,
                if s.p99.is_some_and(|p| p <= Duration::from_millis(100)) && s.missing == 0 { "yes" } else { "**no**" }
            );
        }
    }
    print!("{t}");
    if !opts.no_docs {
        write_results(&opts.docs, &t);
    }
}
