//! Revocation pushed to callers: `cargo bench --bench push [-- FLAGS]`.
//!
//! Two release server processes, replicas A and B, on one fresh PostgreSQL
//! database, and the Rust `VerifyLayer` in this process attached to B with a
//! 10-minute TTL, so that only the pushed change (`WatchKeyChanges`) can make
//! it refuse a key it has cached. It measures:
//!
//! 1. propagation to a layer: `--rounds` times (default 200), a fresh key
//!    created through A and let through by the layer twice (cold on B, then
//!    from the layer's cache); `RevokeKey` through A; from the moment that call
//!    returns, the layer is asked back to back until it refuses the key.
//!    p50, p99 and max of that time (target: p99 ≤ 100 ms);
//! 2. the cost of a cached check in the layer: `--checks` requests with a
//!    cached key through the layer in one task, in front of an inner service
//!    that answers at once, against the same loop without the layer (the
//!    floor); the difference is the layer's own cost (target: ≤ 2 µs).
//!
//! Results go to stdout and to `docs/push-results.md`, which this bench owns
//! and rewrites whole (`--docs` elsewhere, `--no-docs` not at all). The
//! analysis is hand-written in `docs/performance.md`.

#[path = "support/mod.rs"]
mod support;

// The allocator the server binary uses: the layer's cached check hands the
// handler an owned `VerifiedKey` (a dozen small allocations), so the
// allocator is part of its cost. `--system-allocator` is not offered: the
// figure with glibc's malloc was measured by hand (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use std::{
    convert::Infallible,
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};
use support::{
    load::{admin_req, connect},
    pgdb::PgDatabase,
    report::write_results,
    server::{Server, ensure_server_built, free_addr, warn_lines},
};
use takumo_keys::{
    client::{KeysClient, VerifyLayer},
    domain::secret::SecretString,
    proto::pb::{self, api_key_service_client::ApiKeyServiceClient, create_key_request::Scopes},
};
use tonic::{Request, metadata::AsciiMetadataValue, transport::Channel};
use tower::{Layer, Service, ServiceExt};

const SERVICE_TOKEN: &str = "bench-service-token-0123456789abcdefghijklmnop";
const PEPPER: &str = "bench-pepper-0123456789abcdef";
const ORG: &str = "bench";
const PROPAGATION_TARGET: Duration = Duration::from_millis(100);
const CACHED_CHECK_TARGET: Duration = Duration::from_micros(2);
/// A round the layer has not refused by then is a failure.
const GIVE_UP: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Parser)]
#[command(name = "push", about = "Revocation pushed to a VerifyLayer (cargo bench --bench push -- FLAGS)")]
struct Opts {
    /// Propagation rounds (a fresh key each).
    #[arg(long, env = "TAKUMO_BENCH_PUSH_ROUNDS", default_value_t = 200)]
    rounds: usize,
    /// Cached checks timed, with and without the layer.
    #[arg(long, env = "TAKUMO_BENCH_PUSH_CHECKS", default_value_t = 500_000)]
    checks: usize,
    #[arg(long, env = "TAKUMO_BENCH_PG_HOST", default_value = "127.0.0.1")]
    pg_host: String,
    #[arg(long, env = "TAKUMO_BENCH_PG_PORT", default_value_t = 5432)]
    pg_port: u16,
    #[arg(long, env = "TAKUMO_BENCH_PG_USER", default_value = "postgres")]
    pg_user: String,
    /// Server binary; cargo builds it for benches, so the default is the release build.
    #[arg(long, env = "TAKUMO_BENCH_SERVER_BIN", default_value = env!("CARGO_BIN_EXE_takumo-keys"))]
    server_bin: PathBuf,
    /// The results file, rewritten whole on each run.
    #[arg(long, env = "TAKUMO_BENCH_PUSH_DOCS", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/push-results.md"))]
    docs: PathBuf,
    /// Print the results only; leave the results file alone.
    #[arg(long, env = "TAKUMO_BENCH_NO_DOCS")]
    no_docs: bool,
    /// Passed by `cargo bench`; without it (as under `cargo test --all-targets`) nothing runs.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A management call with the bench's service token.
fn admin<T>(msg: T) -> Request<T> {
    static AUTH: std::sync::LazyLock<AsciiMetadataValue> =
        std::sync::LazyLock::new(|| format!("Bearer {SERVICE_TOKEN}").parse().expect("ascii"));
    admin_req(msg, &AUTH)
}

async fn channel(addr: std::net::SocketAddr) -> Channel {
    connect(addr, 1, Some(Duration::from_secs(10))).await.remove(0)
}

type Inner = tower::util::ServiceFn<
    fn(http::Request<axum::body::Body>) -> std::future::Ready<Result<http::Response<axum::body::Body>, Infallible>>,
>;

fn inner() -> Inner {
    fn answer(
        _: http::Request<axum::body::Body>,
    ) -> std::future::Ready<Result<http::Response<axum::body::Body>, Infallible>> {
        std::future::ready(Ok(http::Response::new(axum::body::Body::empty())))
    }
    tower::service_fn(answer as fn(_) -> _)
}

fn request(key: &str) -> http::Request<axum::body::Body> {
    http::Request::get("/fleet/instances")
        .header("authorization", format!("Bearer {key}"))
        .body(axum::body::Body::empty())
        .unwrap()
}

/// One check through `svc`: the status code.
async fn check<S>(svc: &mut S, key: &str) -> u16
where
    S: Service<http::Request<axum::body::Body>, Response = http::Response<axum::body::Body>, Error = Infallible>,
{
    svc.ready().await.unwrap().call(request(key)).await.unwrap().status().as_u16()
}

struct Round {
    /// From RevokeKey returning on A to the layer's first refusal.
    refused_after: Duration,
    revoke_call: Duration,
}

fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn fmt(d: Duration) -> String {
    if d < Duration::from_micros(10) {
        format!("{:.0} ns", d.as_nanos())
    } else if d < Duration::from_millis(10) {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let opts = Opts::parse();
    if !opts.bench {
        eprintln!("push: not run (no --bench); use `cargo bench --bench push [-- FLAGS]`");
        return;
    }
    assert!(opts.rounds > 0 && opts.checks > 0, "--rounds and --checks must be at least 1");
    ensure_server_built(&opts.server_bin);
    let tmp = tempfile::Builder::new().prefix("takumo-push-").tempdir().expect("tempdir");
    let db = PgDatabase::create("takumo_push", &opts.pg_host, opts.pg_port, &opts.pg_user);
    let env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), db.url()),
        ("TAKUMO_PEPPER".into(), PEPPER.into()),
        ("TAKUMO_SERVICE_TOKENS".into(), format!("bench={SERVICE_TOKEN}")),
    ];
    let server_a = Server::start(&opts.server_bin, &env, &tmp.path().join("a.log"), free_addr(), free_addr());
    server_a.wait_ready().await;
    let server_b = Server::start(&opts.server_bin, &env, &tmp.path().join("b.log"), free_addr(), free_addr());
    server_b.wait_ready().await;
    eprintln!(
        "replica A pid {} on {}, replica B pid {} on {}",
        server_a.pid(),
        server_a.addr,
        server_b.pid(),
        server_b.addr
    );

    let mut a = ApiKeyServiceClient::new(channel(server_a.addr).await);
    a.set_organization_plan(admin(pb::SetOrganizationPlanRequest {
        organization_id: ORG.into(),
        plan: pb::Plan::Enterprise as i32,
    }))
    .await
    .expect("plan");
    let keys_b = KeysClient::from_channel(channel(server_b.addr).await, SecretString::new(SERVICE_TOKEN)).unwrap();
    let layer = VerifyLayer::builder(keys_b).cache_ttl(Duration::from_secs(600)).build().unwrap();
    let mut svc = layer.layer(inner());

    let create = |i: usize| pb::CreateKeyRequest {
        organization_id: ORG.into(),
        name: format!("push-{i}"),
        scopes: Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32)),
        ..Default::default()
    };

    // 1. Propagation.
    let mut rounds = Vec::new();
    let mut failures = Vec::new();
    for i in 0..opts.rounds {
        let created = a.create_key(admin(create(i))).await.expect("CreateKey on A").into_inner();
        let (id, secret) = (created.key.unwrap().id, created.secret);
        // Cold on B (and B's first sight of the key), then from the layer's cache.
        let give_up = Instant::now() + GIVE_UP;
        while check(&mut svc, &secret).await != 200 {
            assert!(Instant::now() < give_up, "round {i}: the layer did not let a fresh key through in 5 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(check(&mut svc, &secret).await, 200);
        if i == 0 {
            let up = Instant::now() + Duration::from_secs(10);
            while !layer.is_watching() {
                assert!(Instant::now() < up, "the layer's change stream did not come up in 10 s");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let t0 = Instant::now();
        a.revoke_key(admin(pb::RevokeKeyRequest { id })).await.expect("RevokeKey on A");
        let acked = Instant::now();
        loop {
            match check(&mut svc, &secret).await {
                401 => {
                    rounds.push(Round { refused_after: acked.elapsed(), revoke_call: acked - t0 });
                    break;
                }
                200 if acked.elapsed() < GIVE_UP => tokio::task::yield_now().await,
                200 => {
                    failures.push(format!("round {i}: the layer still let the key through 5 s after RevokeKey"));
                    break;
                }
                other => {
                    failures.push(format!("round {i}: the layer answered {other}"));
                    break;
                }
            }
        }
    }
    eprintln!("propagation: {} rounds, {} failed", rounds.len(), failures.len());

    // 2. A cached check, with and without the layer (same loop, same request building).
    let created = a.create_key(admin(create(opts.rounds))).await.expect("CreateKey on A").into_inner();
    let secret = created.secret;
    assert_eq!(check(&mut svc, &secret).await, 200);
    for _ in 0..10_000 {
        check(&mut svc, &secret).await;
    }
    let asked = || {
        support::scrape::scrape(server_b.metrics)
            .ok()
            .and_then(|t| support::scrape::metric(&t, "takumo_keys_rpc_requests_total", &["method=\"VerifyKey\""]))
    };
    let b_before = asked();
    let start = Instant::now();
    for _ in 0..opts.checks {
        if check(&mut svc, &secret).await != 200 {
            panic!("a cached check was refused");
        }
    }
    let layered = start.elapsed() / opts.checks as u32;
    let b_after = asked();
    let mut bare = inner();
    let start = Instant::now();
    for _ in 0..opts.checks {
        check(&mut bare, &secret).await;
    }
    let floor = start.elapsed() / opts.checks as u32;
    let own = layered.saturating_sub(floor);
    let asked_b = match (b_before, b_after) {
        (Some(x), Some(y)) => format!("{}", y - x),
        _ => "?".into(),
    };

    let logs = [("A", server_a.stop()), ("B", server_b.stop())];
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Push invalidation results\n\nGenerated by `cargo bench --bench push` (benches/push.rs); rewritten \
         whole on every run. The analysis is in `docs/performance.md`.\n"
    );
    let _ = writeln!(
        t,
        "- PostgreSQL {}; two release server processes on one database; this process runs the layer (tokio, 2 workers).",
        db.psql("SHOW server_version")
    );
    let _ = writeln!(
        t,
        "- Layer: `VerifyLayer` attached to replica B, TTL 10 min, maximum age 5 min (default), change stream on.\n"
    );
    let _ = writeln!(t, "## Propagation: RevokeKey on A returns → the layer on B refuses\n");
    let after: Vec<Duration> = rounds.iter().map(|r| r.refused_after).collect();
    let calls: Vec<Duration> = rounds.iter().map(|r| r.revoke_call).collect();
    t.push_str("| rounds | failed | p50 | p99 | max | RevokeKey call p50 | target | met |\n|---:|---:|---:|---:|---:|---:|---|---|\n");
    if after.is_empty() {
        let _ = writeln!(t, "| {} | {} | – | – | – | – | p99 ≤ 100 ms | no |", opts.rounds, failures.len());
    } else {
        let p99 = quantile(&after, 0.99);
        let met = failures.is_empty() && p99 <= PROPAGATION_TARGET;
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | p99 ≤ 100 ms | {} |",
            opts.rounds,
            failures.len(),
            fmt(quantile(&after, 0.5)),
            fmt(p99),
            fmt(*after.iter().max().unwrap()),
            fmt(quantile(&calls, 0.5)),
            if met { "yes" } else { "**no**" }
        );
    }
    let _ = writeln!(
        t,
        "\nEach round: a fresh key created through A, let through by the layer twice (cold on B, then from the \
         layer's cache), `RevokeKey` through A; the time runs from that call's return to the layer's first \
         refusal, asking the layer back to back (a yield between asks). The refusal needs A's commit and \
         `pg_notify`, PostgreSQL delivering the notice to B, B streaming it to the layer, and the layer's next \
         ask going to B, which re-reads the key. A round not refused within 5 s fails.\n"
    );
    for f in failures.iter().take(5) {
        let _ = writeln!(t, "- {f}");
    }
    let _ = writeln!(t, "## A cached check in the layer\n");
    t.push_str("| checks | with the layer | inner service alone | the layer's own cost | target | met | VerifyKey calls B got meanwhile |\n|---:|---:|---:|---:|---|---|---:|\n");
    let _ = writeln!(
        t,
        "| {} | {} | {} | {} | ≤ 2 µs | {} | {asked_b} |",
        opts.checks,
        fmt(layered),
        fmt(floor),
        fmt(own),
        if own <= CACHED_CHECK_TARGET { "yes" } else { "**no**" }
    );
    let _ = writeln!(
        t,
        "\nOne task, one request at a time, each built with its `authorization` header and driven through \
         `ready().call()`; the inner service answers an empty 200 at once. The layer's work per check: the route \
         lookup, reading the bearer key and its checksum, an HMAC-SHA256 of key and scopes, a cache read and the \
         freshness check. The last column must be 0: every answer came from the layer's cache.\n"
    );
    for (name, log) in &logs {
        if let Some(w) = warn_lines(log).next() {
            let _ = writeln!(t, "- replica {name} logged warnings, e.g. `{}`", w.trim());
        }
    }
    print!("{t}");
    if !opts.no_docs {
        write_results(&opts.docs, &t);
    }
}
