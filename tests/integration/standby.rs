//! Verification reads from a PostgreSQL hot standby (`DATABASE_READ_URL`),
//! against a real primary and a real streaming standby of the test's own
//! (`pg_basebackup -R`), whose `recovery_min_apply_delay` makes it lag by a
//! known 3 s: new keys verify at once anywhere, revoked keys never verify
//! again anywhere (even where the standby still has the old row), cold keys
//! verify from the standby with the primary stopped, and everything works
//! with the standby stopped.

use crate::common::{self, TestApp, TestDb, as_service, cluster::PgCluster};
use std::{sync::Arc, time::Duration};
use takumo_keys::{
    domain::secret::SecretString,
    proto::pb::{self, create_key_request::Scopes},
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

const APPLY_DELAY: &str = "3s";

struct Pair {
    // Dropped standby first: it streams from the primary.
    standby: PgCluster,
    primary: PgCluster,
}

fn pair() -> Pair {
    pair_lagging(APPLY_DELAY)
}

fn pair_lagging(apply_delay: &str) -> Pair {
    let primary = PgCluster::start();
    let standby = PgCluster::standby_of(&primary, apply_delay);
    Pair { standby, primary }
}

async fn replica(p: &Pair) -> TestApp {
    let read = p.standby.url("postgres");
    TestApp::spawn_on(Arc::new(TestDb::external(p.primary.url("postgres"))), move |url| {
        let mut a = common::serve_args(url);
        a.store.database_read_url = Some(SecretString::new(read));
        a.store.db_acquire_timeout_ms = 1_000;
        a
    })
    .await
}

async fn serving(app: &TestApp) -> ServingStatus {
    let mut health = HealthClient::new(app.channel.clone());
    let mut req = tonic::Request::new(HealthCheckRequest { service: String::new() });
    req.set_timeout(Duration::from_secs(10));
    let status = health.check(req).await.expect("health answers").into_inner().status;
    ServingStatus::try_from(status).unwrap()
}

fn read_only() -> Option<Scopes> {
    Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32))
}

async fn verify(app: &TestApp, key: &str) -> Result<pb::VerifyKeyResponse, tonic::Status> {
    let req = pb::VerifyKeyRequest { key: key.into(), ..Default::default() };
    app.client.clone().verify_key(as_service(req, "gateway")).await.map(|r| r.into_inner())
}

/// Waits until the standby has replayed key `id`'s row in `status`.
async fn standby_shows(p: &Pair, id: &str, status: &str) {
    let pool = sqlx::PgPool::connect(&p.standby.url("postgres")).await.unwrap();
    common::eventually(30, "the standby replays the change", || {
        let pool = pool.clone();
        let (id, status) = (id.to_owned(), status.to_owned());
        async move {
            let got: Option<String> = sqlx::query_scalar("SELECT status FROM api_keys WHERE id = $1")
                .bind(&id)
                .fetch_optional(&pool)
                .await
                .ok()
                .flatten();
            got.as_deref() == Some(status.as_str())
        }
    })
    .await;
}

async fn standby_status(p: &Pair, id: &str) -> Option<String> {
    let pool = sqlx::PgPool::connect(&p.standby.url("postgres")).await.unwrap();
    // Before the standby replays the migrations, there is no table: no row either.
    sqlx::query_scalar("SELECT status FROM api_keys WHERE id = $1").bind(id).fetch_optional(&pool).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_verifies_at_once_on_another_replica_although_the_standby_has_not_got_it() {
    let p = pair();
    let (a, b) = (replica(&p).await, replica(&p).await);
    let (key, secret) = a.create("acme", read_only()).await;
    assert_eq!(standby_status(&p, &key.id).await, None, "the standby is not lagging: the test proves nothing");
    assert!(verify(&b, &secret).await.unwrap().valid, "a key created a moment ago is not found on another replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_never_verifies_again_on_any_replica_while_the_standby_has_the_old_row() {
    let p = pair();
    let (a, b) = (replica(&p).await, replica(&p).await);
    let (key, secret) = a.create("acme", read_only()).await;
    standby_shows(&p, &key.id, "active").await;
    assert!(verify(&b, &secret).await.unwrap().valid);

    let heard = b.metrics.invalidations.get();
    a.client.clone().revoke_key(as_service(pb::RevokeKeyRequest { id: key.id.clone() }, "alice")).await.unwrap();
    // The notice takes a moment to reach B (longer under load); until it has,
    // B's cached entry is as good as any replica's and proves nothing here.
    common::eventually(10, "B hears of the revocation", || {
        let now = b.metrics.invalidations.get();
        async move { now > heard }
    })
    .await;
    // B held the key; a replica started now never saw it. Both must refuse it
    // for as long as the standby still says ACTIVE, and after.
    let c = replica(&p).await;
    assert_eq!(standby_status(&p, &key.id).await.as_deref(), Some("active"), "the standby caught up too soon");
    let mut checks = 0;
    while standby_status(&p, &key.id).await.as_deref() == Some("active") {
        for app in [&a, &b, &c] {
            let r = verify(app, &secret).await.unwrap();
            assert_eq!(
                r.code(),
                pb::VerifyCode::Revoked,
                "a revoked key verified as {:?} from the lagging standby",
                r.code()
            );
        }
        checks += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(checks > 0);
    for app in [&a, &b, &c] {
        assert_eq!(verify(app, &secret).await.unwrap().code(), pb::VerifyCode::Revoked);
    }
}

/// Scans of `api_keys` the standby has served (its own statistics: a hot
/// standby counts the queries run on it).
async fn standby_key_scans(p: &Pair) -> i64 {
    let pool = sqlx::PgPool::connect(&p.standby.url("postgres")).await.unwrap();
    sqlx::query_scalar(
        "SELECT (coalesce(seq_scan, 0) + coalesce(idx_scan, 0))::bigint FROM pg_stat_user_tables \
         WHERE relname = 'api_keys'",
    )
    .fetch_optional(&pool)
    .await
    .unwrap()
    .unwrap_or(0)
}

/// Waits until the standby has replayed everything the primary has
/// written so far, without reading `api_keys` there (which would count in
/// [`standby_key_scans`]).
async fn standby_replays_all(p: &Pair) {
    let primary = sqlx::PgPool::connect(&p.primary.url("postgres")).await.unwrap();
    let at: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text").fetch_one(&primary).await.unwrap();
    // One record more: at a page boundary the insert position is past the
    // next page's header, which replay reaches only with the next record.
    sqlx::query("SELECT pg_logical_emit_message(false, 'takumo-test', 'x')").execute(&primary).await.unwrap();
    let standby = sqlx::PgPool::connect(&p.standby.url("postgres")).await.unwrap();
    common::eventually(30, "the standby replays the primary", || {
        let (standby, at) = (standby.clone(), at.clone());
        async move {
            sqlx::query_scalar::<_, bool>("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
                .bind(at)
                .fetch_one(&standby)
                .await
                .unwrap_or(false)
        }
    })
    .await;
}

/// The point of DATABASE_READ_URL: while notices flow, a cold verification
/// is read from the standby, not the primary (the primary is only asked
/// first while this replica hears no notices).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_notices_flow_a_cold_verification_is_read_from_the_standby() {
    let p = pair();
    let a = replica(&p).await;
    let (_, secret) = a.create("acme", read_only()).await;
    let b = replica(&p).await;
    common::eventually(20, "B hears notices", || async { b.metrics.cache_resets.get() > 0 }).await;
    // B's barrier was taken when its listener connected: replay past it.
    standby_replays_all(&p).await;
    let before = standby_key_scans(&p).await;
    assert!(verify(&b, &secret).await.unwrap().valid);
    // Statistics reach the view within the standby's flush interval (≤ 10 s).
    common::eventually(30, "the standby served the read", || async { standby_key_scans(&p).await > before }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_primary_stopped_a_cold_key_verifies_from_the_standby() {
    let p = pair();
    let a = replica(&p).await;
    let (key, secret) = a.create("acme", read_only()).await;
    standby_shows(&p, &key.id, "active").await;
    p.primary.stop();
    // Never verified on this replica: only the standby can answer.
    let r = verify(&a, &secret).await.expect("a cold key is answered by the standby");
    assert!(r.valid, "{r:?}");
    // Management needs the primary.
    let e = a
        .client
        .clone()
        .list_keys(as_service(pb::ListKeysRequest { organization_id: "acme".into(), ..Default::default() }, "alice"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    // The health probe sees the primary gone and the standby answering, so
    // the replica stays SERVING: it can still verify.
    common::eventually(30, "the probe marks the primary down", || async { a.metrics.store_primary_up.get() == 0 })
        .await;
    assert_eq!(a.metrics.store_standby_up.get(), 1, "the standby answers the probe");
    assert_eq!(serving(&a).await, ServingStatus::Serving);
}

/// With the primary stopped no notices arrive, so the primary is asked
/// first; but a stopped primary is not refused at once (the pool retries
/// connecting until its acquire timeout, here 30 s). A read waits for it
/// one second at most (and only one read a second does), so cold keys
/// verify from the standby well within a 10 s deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_primary_stopped_cold_keys_verify_without_waiting_out_the_pools_acquire_timeout() {
    let p = pair();
    let read = p.standby.url("postgres");
    let a = TestApp::spawn_on(Arc::new(TestDb::external(p.primary.url("postgres"))), move |url| {
        let mut args = common::serve_args(url);
        args.store.database_read_url = Some(SecretString::new(read));
        args.store.db_acquire_timeout_ms = 30_000;
        args
    })
    .await;
    let (_, first) = a.create("acme", read_only()).await;
    let (last, second) = a.create("acme", read_only()).await;
    // Replayed in commit order: the second shown, both are.
    standby_shows(&p, &last.id, "active").await;
    p.primary.stop();
    common::eventually(30, "A knows its notices stopped", || async { a.metrics.change_notices_flowing.get() == 0 })
        .await;
    for secret in [first, second] {
        let mut req = as_service(pb::VerifyKeyRequest { key: secret, ..Default::default() }, "gateway");
        req.set_timeout(Duration::from_secs(10));
        let r = a.client.clone().verify_key(req).await.expect("a cold key is answered by the standby in time");
        assert!(r.into_inner().valid);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_standby_stopped_everything_still_works() {
    let p = pair();
    let a = replica(&p).await;
    common::eventually(30, "the probe sees the standby", || async { a.metrics.store_standby_up.get() == 1 }).await;
    p.standby.stop();
    common::eventually(30, "the probe marks the standby down", || async { a.metrics.store_standby_up.get() == 0 })
        .await;
    assert_eq!(serving(&a).await, ServingStatus::Serving, "the primary still answers");
    let (_, secret) = a.create("acme", read_only()).await;
    assert!(verify(&a, &secret).await.unwrap().valid, "verification did not fall back to the primary");
    let (_, second) = a.create("acme", read_only()).await;
    assert!(verify(&a, &second).await.unwrap().valid);
}

/// `DATABASE_LISTEN_URL` is where the change listener connects (the primary
/// directly, past a pooler): its connection is the one that LISTENs, and
/// changes made through another replica still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_listener_connects_to_database_listen_url() {
    let primary = PgCluster::start();
    let listen = format!("{}&application_name=takumo-listener", primary.url("postgres"));
    let db = Arc::new(TestDb::external(primary.url("postgres")));
    let a = TestApp::spawn_on(db.clone(), common::serve_args).await;
    let b = TestApp::spawn_on(db, move |url| {
        let mut args = common::serve_args(url);
        args.store.database_listen_url = Some(SecretString::new(listen));
        args
    })
    .await;
    let admin = sqlx::PgPool::connect(&primary.url("postgres")).await.unwrap();
    let listening: Vec<String> = sqlx::query_scalar(
        "SELECT application_name FROM pg_stat_activity WHERE query LIKE 'LISTEN%' ORDER BY application_name",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(listening, ["takumo-keys", "takumo-listener"], "B's listener did not use DATABASE_LISTEN_URL");

    let (key, secret) = a.create("acme", read_only()).await;
    assert!(verify(&b, &secret).await.unwrap().valid);
    a.client.clone().revoke_key(as_service(pb::RevokeKeyRequest { id: key.id }, "alice")).await.unwrap();
    b.verifies_eventually(&secret, pb::VerifyCode::Revoked).await;
}

/// Notices of changes made while a replica's listener was cut off never
/// reach it, so it must not trust the lagging standby with a key revoked
/// during the gap: not during the gap (the primary is asked first), and not
/// once it listens again (its barrier moved to the primary's position at
/// reconnection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_while_the_listener_was_cut_off_never_verifies_from_the_lagging_standby() {
    // Lagging longer than the others: the listener's reconnect backoff (up
    // to seconds) and the checks must all fit before the standby catches up.
    let p = pair_lagging("10s");
    let admin = sqlx::PgPool::connect(&p.primary.url("postgres")).await.unwrap();
    sqlx::query("CREATE ROLE listener LOGIN").execute(&admin).await.unwrap();
    let read = p.standby.url("postgres");
    let listen = p.primary.url("postgres").replace("postgres@", "listener@");
    let a = TestApp::spawn_on(Arc::new(TestDb::external(p.primary.url("postgres"))), move |url| {
        let mut args = common::serve_args(url);
        args.store.database_read_url = Some(SecretString::new(read));
        args.store.database_listen_url = Some(SecretString::new(listen));
        args.store.db_acquire_timeout_ms = 1_000;
        args
    })
    .await;
    let b = replica(&p).await;
    let (key, secret) = b.create("acme", read_only()).await;
    standby_shows(&p, &key.id, "active").await;
    assert!(verify(&a, &secret).await.unwrap().valid);

    // Cut A's listener off and keep it off while B revokes the key.
    sqlx::query("ALTER ROLE listener NOLOGIN").execute(&admin).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'listener'")
        .execute(&admin)
        .await
        .unwrap();
    common::eventually(20, "A knows its notices stopped", || async { a.metrics.change_notices_flowing.get() == 0 })
        .await;
    // Read only now: a resync from here on can only be the reconnection below.
    let resets = a.metrics.cache_resets.get();
    b.client.clone().revoke_key(as_service(pb::RevokeKeyRequest { id: key.id.clone() }, "alice")).await.unwrap();
    // During the gap no notice raises a floor: the primary must answer.
    let r = verify(&a, &secret).await.unwrap();
    assert_eq!(r.code(), pb::VerifyCode::Revoked, "during the gap a revoked key verified from the lagging standby");
    sqlx::query("ALTER ROLE listener LOGIN").execute(&admin).await.unwrap();
    // Listening again: the barrier moved before the resync was announced.
    common::eventually(20, "A listens again", || async { a.metrics.cache_resets.get() > resets }).await;
    assert_eq!(standby_status(&p, &key.id).await.as_deref(), Some("active"), "the standby caught up too soon");
    let r = verify(&a, &secret).await.unwrap();
    assert_eq!(r.code(), pb::VerifyCode::Revoked, "after the gap a revoked key verified from the lagging standby");
}
