//! Faults made real: a database that stops and comes back, a server killed
//! mid-write, a database too slow to answer, and races on one key (the
//! plan-limit race is in `api.rs`). The outage tests run a PostgreSQL of their own.

use crate::common::{self, eventually};

use common::{Backend, ServerProcess, TestApp, TestDb, as_service, cluster::PgCluster};
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};
use takumo_keys::proto::pb;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use common::Client;

async fn create(c: &mut Client, org: &str) -> Result<(String, String), tonic::Status> {
    common::create_read_only(c, org, None).await.map(|r| (r.key.unwrap().id, r.secret))
}

async fn verify(c: &mut Client, key: &str) -> Result<pb::VerifyKeyResponse, tonic::Status> {
    c.verify_key(as_service(pb::VerifyKeyRequest { key: key.into(), ..Default::default() }, "svc"))
        .await
        .map(|r| r.into_inner())
}

async fn list(c: &mut Client) -> Result<pb::ListKeysResponse, tonic::Status> {
    c.list_keys(as_service(pb::ListKeysRequest { organization_id: "acme".into(), ..Default::default() }, "a"))
        .await
        .map(|r| r.into_inner())
}

async fn set_enterprise(c: &mut Client, org: &str) {
    common::set_plan(c, org, pb::Plan::Enterprise).await
}

async fn outage_app(pg: &PgCluster, stale_ms: u64) -> TestApp {
    let db = Arc::new(TestDb::external(pg.url("postgres")));
    TestApp::spawn_on(db, |url| {
        let mut a = common::serve_args(url);
        a.usage_flush_interval_ms = 200;
        a.cache_stale_ms = stale_ms;
        a.store.db_acquire_timeout_ms = 1_000;
        a
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_fails_static_for_cached_keys_and_recovers_without_restart() {
    let pg = PgCluster::start();
    let app = outage_app(&pg, 300_000).await;
    let mut c = app.client.clone();
    set_enterprise(&mut c, "acme").await;
    let (a_id, a) = create(&mut c, "acme").await.unwrap();
    let (b_id, b) = create(&mut c, "acme").await.unwrap();
    let valid_a = Arc::new(AtomicI64::new(0));
    assert!(verify(&mut c, &a).await.unwrap().valid);
    valid_a.fetch_add(1, Ordering::SeqCst);

    // Load on key A throughout the outage: every answer must be VALID.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (mut c, a, stop, valid_a) = (c.clone(), a.clone(), stop.clone(), valid_a.clone());
        tokio::spawn(async move {
            let mut wrong = vec![];
            while !stop.load(Ordering::SeqCst) {
                match verify(&mut c, &a).await {
                    Ok(r) if r.valid => {
                        valid_a.fetch_add(1, Ordering::SeqCst);
                    }
                    other => wrong.push(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            wrong
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Blocks this worker for the shutdown; the load runs on the other.
    pg.stop();

    // Warm keys keep verifying, flagged stale; cold keys and management are UNAVAILABLE.
    let mut c2 = c.clone();
    eventually(10, "a cached key answered stale during the outage", || {
        let (mut c, a, valid_a) = (c2.clone(), a.clone(), valid_a.clone());
        async move {
            let r = verify(&mut c, &a).await.unwrap_or_else(|e| panic!("a valid key got {e:?} during the outage"));
            assert!(r.valid, "a valid key got {r:?} during the outage");
            valid_a.fetch_add(1, Ordering::SeqCst);
            r.stale
        }
    })
    .await;
    let e = verify(&mut c2, &b).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "cold key: {}", e.message());
    let e = list(&mut c2).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "management: {}", e.message());
    let health = HealthClient::new(Channel::from_shared(format!("http://{}", app.addr)).unwrap().connect_lazy());
    eventually(10, "health NOT_SERVING while the store is down", || {
        let mut h = health.clone();
        async move {
            h.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status()
                == ServingStatus::NotServing
        }
    })
    .await;
    assert!(app.metrics.cache_stale_served.get() > 0);
    assert!(app.metrics.usage_flush_failures.get() > 0, "usage was held, not written");

    // The database returns: no restart of the service.
    pg.restart();
    eventually(15, "management calls work again", || {
        let mut c = c.clone();
        async move { list(&mut c).await.is_ok() }
    })
    .await;
    eventually(15, "verifications are confirmed by the store again", || {
        let (mut c, a, valid_a) = (c.clone(), a.clone(), valid_a.clone());
        async move {
            // Recovery is no blip: the listener's reconnect closes the breaker and
            // keeps the cached entry, so this key never sees UNAVAILABLE.
            let r = verify(&mut c, &a).await.unwrap_or_else(|e| panic!("a valid key got {e:?} during recovery"));
            assert!(r.valid, "a valid key got {r:?} during recovery");
            valid_a.fetch_add(1, Ordering::SeqCst);
            !r.stale
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let wrong = load.await.unwrap();
    assert!(
        wrong.is_empty(),
        "{} answers for a valid key were not VALID: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );

    // Every acknowledged write is there, and every counted call was written.
    for id in [&a_id, &b_id] {
        c.get_key(as_service(pb::GetKeyRequest { id: id.clone() }, "a")).await.unwrap();
    }
    assert!(verify(&mut c, &b).await.unwrap().valid);
    let want = valid_a.load(Ordering::SeqCst) + 1; // + b's verification just now
    eventually(10, "usage counted through the outage is flushed", || {
        let store = app.store.clone();
        async move { store.key_stats("acme", chrono::Utc::now()).await.unwrap().api_calls_24h == want }
    })
    .await;
}

/// The outage breaker: after one failed read, cold verifications answer
/// UNAVAILABLE without trying the store again for its retry interval (1 s),
/// so an outage does not make every call wait on a dead database; after it, a
/// call tries again. Counted, not timed: 50 calls back to back try the store
/// far fewer than 50 times, and the one call after a 1.5 s sleep tries it (a
/// slower machine only sleeps longer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_cold_verifications_fail_fast_without_each_trying_the_store() {
    let pg = PgCluster::start();
    let app = outage_app(&pg, 300_000).await;
    let mut c = app.client.clone();
    set_enterprise(&mut c, "acme").await;
    let (_, cold) = create(&mut c, "acme").await.unwrap();
    pg.stop();

    let reads = app.metrics.store_key_reads.get();
    for i in 0..50 {
        let err = verify(&mut c, &cold).await.expect_err("a cold key verified with the store down");
        assert_eq!(err.code(), Code::Unavailable, "call {i}: {err:?}");
    }
    let tried = app.metrics.store_key_reads.get() - reads;
    assert!(tried >= 1, "the store was never tried");
    assert!(tried <= 25, "50 calls during an outage tried the store {tried} times: the breaker did not open");

    // After its interval the breaker lets a call try again (the outage may be over).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let before = app.metrics.store_key_reads.get();
    assert_eq!(verify(&mut c, &cold).await.unwrap_err().code(), Code::Unavailable);
    assert!(app.metrics.store_key_reads.get() > before, "the breaker stayed open past its 1 s interval");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_keys_older_than_the_stale_window_are_unavailable_not_valid() {
    let pg = PgCluster::start();
    let app = outage_app(&pg, 300).await;
    let mut c = app.client.clone();
    let (_, a) = create(&mut c, "acme").await.unwrap();
    assert!(verify(&mut c, &a).await.unwrap().valid);
    pg.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let e = verify(&mut c, &a).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("stale window"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_create_storm_loses_no_acknowledged_key() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut server = ServerProcess::start(&db.url, &[]).await;
    let mut c = server.client().await;
    set_enterprise(&mut c, "storm").await;
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let storm: Vec<_> = (0..8)
        .map(|_| {
            let (mut c, acked) = (c.clone(), acked.clone());
            tokio::spawn(async move {
                while let Ok((_, secret)) = create(&mut c, "storm").await {
                    acked.lock().unwrap().push(secret);
                }
            })
        })
        .collect();
    // Killed once five keys are acknowledged, with eight creates still in
    // flight: what the test proves follows from the count, not from how
    // many creates a loaded machine gets through in a fixed sleep (under
    // load, 400 ms once gave one).
    eventually(common::RPC_DEADLINE.as_secs(), "five keys acknowledged by the storm", || {
        let n = acked.lock().unwrap().len();
        async move { n >= 5 }
    })
    .await;
    server.child.kill().unwrap(); // SIGKILL: no drain, no flush
    let _ = server.child.wait();
    for t in storm {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let restarted = ServerProcess::start(&db.url, &[]).await;
    let mut c = restarted.client().await;
    for secret in &acked {
        assert!(verify(&mut c, secret).await.unwrap().valid, "an acknowledged key was lost");
    }
    // No half-created key: the counter, the rows and the audit log agree.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE organization_id = 'storm'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let created: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE organization_id = 'storm' AND action = 'key.created'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let stats = c
        .get_key_stats(as_service(pb::GetKeyStatsRequest { organization_id: "storm".into() }, "a"))
        .await
        .unwrap()
        .into_inner();
    assert!(rows >= acked.len() as i64);
    assert_eq!((stats.total_keys, created), (rows, rows));
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_gives_unavailable_within_the_statement_timeout() {
    let db = Arc::new(TestDb::new(Backend::Postgres).await);
    let app = TestApp::spawn_on(db.clone(), |url| {
        let mut a = common::serve_args(url);
        a.store.db_statement_timeout_ms = 300;
        a.store.db_acquire_timeout_ms = 500;
        a
    })
    .await;
    let mut c = app.client.clone();
    let (id, secret) = create(&mut c, "acme").await.unwrap();

    // Hold a lock that every key read and write waits on.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await.unwrap();
    let started = Instant::now();
    let e = c.get_key(as_service(pb::GetKeyRequest { id: id.clone() }, "a")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    let e = verify(&mut c, &secret).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "a cold verification: {}", e.message());
    let e = create(&mut c, "acme").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    // A bound, not a benchmark: nothing waited on the lock for long.
    assert!(started.elapsed() < Duration::from_secs(10), "calls piled up behind the lock");
    tx.rollback().await.unwrap();
    c.get_key(as_service(pb::GetKeyRequest { id }, "a")).await.expect("works once the lock is gone");
    pool.close().await;
}

async fn concurrent_toggles_and_deletes_of_one_key_end_consistent(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    for _round in 0..3 {
        let (id, secret) = create(&mut c, "acme").await.unwrap();
        let tasks: Vec<_> = (0..24)
            .map(|i| {
                let (mut c, id) = (c.clone(), id.clone());
                tokio::spawn(async move {
                    let r = match i % 8 {
                        0 => c.delete_key(as_service(pb::DeleteKeyRequest { id }, "a")).await.map(|_| ()),
                        1 => c.revoke_key(as_service(pb::RevokeKeyRequest { id }, "a")).await.map(|_| ()),
                        n => {
                            let status = if n % 2 == 0 { pb::KeyStatus::Active } else { pb::KeyStatus::Disabled };
                            c.set_key_status(as_service(pb::SetKeyStatusRequest { id, status: status as i32 }, "a"))
                                .await
                                .map(|_| ())
                        }
                    };
                    match r {
                        Ok(()) => Ok(()),
                        Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => Ok(()),
                        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        // Deletes were among the racers: the key is gone everywhere, for good.
        let e = c.get_key(as_service(pb::GetKeyRequest { id: id.clone() }, "a")).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(verify(&mut c, &secret).await.unwrap().code(), pb::VerifyCode::NotFound);
    }
    let stats = c
        .get_key_stats(as_service(pb::GetKeyStatsRequest { organization_id: "acme".into() }, "a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stats.total_keys, stats.keys_counted), (3, 0));
}

for_each_backend!(concurrent_toggles_and_deletes_of_one_key_end_consistent);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_a_change_named_is_never_served_stale_during_an_outage() {
    let pg = PgCluster::start();
    let app = outage_app(&pg, 300_000).await;
    let mut c = app.client.clone();
    let (id, key) = create(&mut c, "acme").await.unwrap();
    let (_, other) = create(&mut c, "acme").await.unwrap();
    assert!(verify(&mut c, &key).await.unwrap().valid);
    assert!(verify(&mut c, &other).await.unwrap().valid);
    // Disabled, then the store goes away before anything re-read the record.
    c.set_key_status(as_service(pb::SetKeyStatusRequest { id, status: pb::KeyStatus::Disabled as i32 }, "a"))
        .await
        .unwrap();
    pg.stop();
    let e = verify(&mut c, &key).await.expect_err("the changed key must not verify from its old record");
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    // An unchanged key still rides the outage out.
    let r = verify(&mut c, &other).await.expect("an unchanged cached key is served stale");
    assert!(r.valid && r.stale, "{r:?}");
}
