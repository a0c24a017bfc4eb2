//! Capacity figures for `docs/scaling.md`: `cargo bench --bench scaling [-- FLAGS]`.
//!
//! A private PostgreSQL primary and a streaming hot standby of it (initdb,
//! `pg_basebackup -R`, like the standby tests), `--keys` keys created through
//! the API, then two release server processes started fresh: one reading the
//! primary only, one with `DATABASE_READ_URL` on the standby. Each verifies
//! every key once (cold: one key read and one argon2 verification, then
//! cached). Measured per server: CPU per cold verification (from /proc), and
//! resident memory before and after caching every key (RSS per 100,000
//! cached keys).
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
use std::{fmt::Write as _, path::PathBuf, time::Duration};
use support::{
    procfs::{cpu_seconds, status_kb},
    report::write_results,
    server::{Server, ensure_server_built, free_addr},
};
use takumo_keys::proto::pb::{self, api_key_service_client::ApiKeyServiceClient, create_key_request::Scopes};
use tonic::{Request, metadata::MetadataValue, transport::Channel};

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
    #[arg(long, env = "TAKUMO_BENCH_SERVER_BIN", default_value = env!("CARGO_BIN_EXE_takumo-keys"))]
    server_bin: PathBuf,
    #[arg(long, env = "TAKUMO_BENCH_SCALING_DOCS", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/scaling-results.md"))]
    docs: PathBuf,
    #[arg(long, env = "TAKUMO_BENCH_NO_DOCS")]
    no_docs: bool,
    #[arg(long, hide = true)]
    bench: bool,
}

fn admin<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {SERVICE_TOKEN}")).unwrap());
    r.metadata_mut().insert("x-takumo-actor", MetadataValue::from_static("bench"));
    r
}

async fn client(addr: std::net::SocketAddr) -> ApiKeyServiceClient<Channel> {
    let ch = Channel::from_shared(format!("http://{addr}")).unwrap().timeout(Duration::from_secs(30));
    ApiKeyServiceClient::new(ch.connect().await.expect("connect"))
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
    print!("{t}");
    if !opts.no_docs {
        write_results(&opts.docs, &t);
    }
}
