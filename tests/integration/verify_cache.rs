//! The verified-key cache: warm verifications do no I/O, and every change
//! reaches every replica's cache.

use crate::common;

use common::{Backend, TestApp, TestDb, as_service};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use takumo_keys::{
    domain::keys,
    domain::model::Environment,
    proto::pb::{self, create_key_request::Scopes},
};

async fn create(app: &TestApp, org: &str, expires_at: Option<prost_types::Timestamp>) -> (pb::ApiKey, String) {
    let r = common::create_read_only(&mut app.client.clone(), org, expires_at).await.unwrap();
    (r.key.unwrap(), r.secret)
}

async fn two_replicas() -> (TestApp, TestApp) {
    let db = Arc::new(TestDb::new(Backend::Postgres).await);
    let a = TestApp::spawn_on(db.clone(), common::serve_args).await;
    let b = TestApp::spawn_on(db, common::serve_args).await;
    (a, b)
}

/// A rolled key's grace ends on every replica: B, which cached the old key,
/// answers EXPIRED once the grace has passed (expiry is checked on each hit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_keys_grace_ends_on_another_replica() {
    let (a, b) = two_replicas().await;
    let (key, secret) = create(&a, "acme", None).await;
    assert!(b.verify(&secret, &[], None).await.valid, "cached on b");
    let req =
        pb::RollKeyRequest { id: key.id.clone(), grace_period: Some(prost_types::Duration { seconds: 1, nanos: 0 }) };
    let rolled = a.client.clone().roll_key(as_service(req, "alice")).await.unwrap().into_inner();
    assert!(b.verify(&rolled.secret, &[], None).await.valid, "the new key works on b");
    b.verifies_eventually(&secret, pb::VerifyCode::Expired).await;
}

/// A leaked key reported through replica A is refused on replica B, which
/// had it cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reported_leak_revokes_the_key_on_every_replica() {
    let (a, b) = two_replicas().await;
    let (_, secret) = create(&a, "acme", None).await;
    assert!(b.verify(&secret, &[], None).await.valid, "cached on b");
    let leak = pb::LeakedKey { key: secret.clone(), source_url: "https://example.com/x".into(), source: "t".into() };
    let req = pb::ReportLeakedKeysRequest { leaks: vec![leak] };
    assert!(
        a.client.clone().report_leaked_keys(as_service(req, "scanner")).await.unwrap().into_inner().verdicts[0]
            .true_positive
    );
    b.verifies_eventually(&secret, pb::VerifyCode::Revoked).await;
}

/// UpdateKey on replica A reaches B's cached record at once (its notice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_reaches_another_replicas_cache() {
    let (a, b) = two_replicas().await;
    let (key, secret) = create(&a, "acme", None).await;
    assert!(b.verify(&secret, &[], None).await.metadata.is_empty(), "cached on b, no labels yet");
    let labels: std::collections::HashMap<String, String> = [("tenant".to_string(), "eu".to_string())].into();
    let change = pb::ApiKey { id: key.id.clone(), metadata: labels.clone(), ..Default::default() };
    let req = pb::UpdateKeyRequest {
        key: Some(change),
        update_mask: Some(prost_types::FieldMask { paths: vec!["metadata".into()] }),
    };
    a.client.clone().update_key(as_service(req, "alice")).await.unwrap();
    let start = Instant::now();
    while b.verify(&secret, &[], None).await.metadata != labels {
        assert!(start.elapsed() < Duration::from_secs(5), "b still serves the old labels after 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn warm_verifications_read_nothing_from_the_store(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (_, secret) = create(&app, "acme", None).await;
    assert_eq!(app.verify(&secret, &[], None).await.code(), pb::VerifyCode::Valid);
    let reads = app.metrics.store_key_reads.get();
    let hashes = app.metrics.argon2_verifications.get();
    for _ in 0..100 {
        assert_eq!(app.verify(&secret, &[], None).await.code(), pb::VerifyCode::Valid);
    }
    assert_eq!(app.metrics.store_key_reads.get(), reads);
    assert_eq!(app.metrics.argon2_verifications.get(), hashes);
    assert!(app.metrics.cache_hits.get() >= 100);
    // Each cached verification still counts as a call.
    app.usage.flush().await.unwrap();
    let stats = app.store.key_stats("acme", chrono::Utc::now()).await.unwrap();
    assert_eq!(stats.api_calls_24h, 101);
}

async fn repeated_bad_keys_cost_no_database_or_argon2_work(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (key, _) = create(&app, "acme", None).await;
    let wrong = keys::compose(Environment::Live, &key.id, &"w".repeat(keys::SECRET_LEN));
    let unknown = keys::generate(Environment::Live);
    for _ in 0..3 {
        assert_eq!(app.verify(wrong.expose(), &[], None).await.code(), pb::VerifyCode::NotFound);
        assert_eq!(app.verify(unknown.full.expose(), &[], None).await.code(), pb::VerifyCode::NotFound);
        assert_eq!(app.verify("tk_live_garbage", &[], None).await.code(), pb::VerifyCode::Malformed);
    }
    assert_eq!(app.metrics.argon2_verifications.get(), 1, "one argon2 for the wrong secret");
    assert_eq!(app.metrics.store_key_reads.get(), 2, "one lookup per distinct key");
    assert_eq!(app.metrics.negative_hits.get(), 4);
}

async fn concurrent_first_sights_of_a_key_share_one_argon2_verification(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (_, secret) = create(&app, "acme", None).await;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (c, secret) = (app.client.clone(), secret.clone());
            tokio::spawn(async move {
                let mut c = c;
                c.verify_key(as_service(pb::VerifyKeyRequest { key: secret, ..Default::default() }, "svc"))
                    .await
                    .unwrap()
                    .into_inner()
                    .code()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), pb::VerifyCode::Valid);
    }
    assert_eq!(app.metrics.argon2_verifications.get(), 1);
    assert_eq!(app.metrics.store_key_reads.get(), 1);
}

async fn local_changes_take_effect_at_once(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (key, secret) = create(&app, "acme", None).await;
    let mut c = app.client.clone();
    assert_eq!(app.verify(&secret, &[], None).await.code(), pb::VerifyCode::Valid);
    c.set_key_status(as_service(
        pb::SetKeyStatusRequest { id: key.id.clone(), status: pb::KeyStatus::Disabled as i32 },
        "alice",
    ))
    .await
    .unwrap();
    assert_eq!(app.verify(&secret, &[], None).await.code(), pb::VerifyCode::Disabled);
    c.revoke_key(as_service(pb::RevokeKeyRequest { id: key.id.clone() }, "alice")).await.unwrap();
    assert_eq!(app.verify(&secret, &[], None).await.code(), pb::VerifyCode::Revoked);
    // A change re-reads the record; the secret, proven once, is not hashed again.
    assert_eq!(app.metrics.argon2_verifications.get(), 1);
    c.delete_key(as_service(pb::DeleteKeyRequest { id: key.id.clone() }, "alice")).await.unwrap();
    assert_eq!(app.verify(&secret, &[], None).await.code(), pb::VerifyCode::NotFound);
}

async fn expired_keys_are_refused_from_cache(b: Backend) {
    let app = TestApp::spawn(b).await;
    let soon = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let ts = prost_types::Timestamp { seconds: soon.timestamp(), nanos: soon.timestamp_subsec_nanos() as i32 };
    let (_, secret) = create(&app, "acme", Some(ts)).await;
    assert_eq!(app.verify(&secret, &[], None).await.code(), pb::VerifyCode::Valid);
    let reads = app.metrics.store_key_reads.get();
    app.verifies_eventually(&secret, pb::VerifyCode::Expired).await;
    assert_eq!(app.metrics.store_key_reads.get(), reads, "expiry is checked on the cached entry");
}

async fn disable_revoke_and_delete_on_one_replica_reach_the_other() {
    let (a, b) = two_replicas().await;
    let (key, secret) = create(&a, "acme", None).await;
    assert_eq!(b.verify(&secret, &[], None).await.code(), pb::VerifyCode::Valid);
    assert_eq!(b.verify(&secret, &[], None).await.code(), pb::VerifyCode::Valid, "now cached on b");
    let mut c = a.client.clone();
    c.set_key_status(as_service(
        pb::SetKeyStatusRequest { id: key.id.clone(), status: pb::KeyStatus::Disabled as i32 },
        "alice",
    ))
    .await
    .unwrap();
    b.verifies_eventually(&secret, pb::VerifyCode::Disabled).await;
    c.set_key_status(as_service(
        pb::SetKeyStatusRequest { id: key.id.clone(), status: pb::KeyStatus::Active as i32 },
        "alice",
    ))
    .await
    .unwrap();
    b.verifies_eventually(&secret, pb::VerifyCode::Valid).await;
    c.revoke_key(as_service(pb::RevokeKeyRequest { id: key.id.clone() }, "alice")).await.unwrap();
    b.verifies_eventually(&secret, pb::VerifyCode::Revoked).await;
    c.delete_key(as_service(pb::DeleteKeyRequest { id: key.id.clone() }, "alice")).await.unwrap();
    b.verifies_eventually(&secret, pb::VerifyCode::NotFound).await;
    assert!(b.metrics.invalidations.get() >= 4);
}

async fn a_change_missed_while_the_listener_was_cut_is_not_trusted() {
    let (a, b) = two_replicas().await;
    let (key, secret) = create(&a, "acme", None).await;
    assert_eq!(b.verify(&secret, &[], None).await.code(), pb::VerifyCode::Valid);
    let pool = sqlx::PgPool::connect(&a.db.url).await.unwrap();
    // A change whose notice never arrives: written behind the service's back.
    sqlx::query("UPDATE api_keys SET status = 'disabled' WHERE id = $1").bind(&key.id).execute(&pool).await.unwrap();
    assert_eq!(b.verify(&secret, &[], None).await.code(), pb::VerifyCode::Valid, "b still trusts its cache");
    // Cut every listener connection (both replicas'); they reconnect by themselves.
    let cut: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(cut.len(), 2, "one listener per replica");
    for pid in cut {
        sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&pool).await.unwrap();
    }
    b.verifies_eventually(&secret, pb::VerifyCode::Disabled).await;
    pool.close().await;
}

async fn usage_from_two_replicas_adds_up() {
    let (a, b) = two_replicas().await;
    let (_, secret) = create(&a, "acme", None).await;
    for i in 0..30 {
        let app = if i % 3 == 0 { &a } else { &b };
        assert_eq!(app.verify(&secret, &[], None).await.code(), pb::VerifyCode::Valid);
    }
    a.usage.flush().await.unwrap();
    b.usage.flush().await.unwrap();
    let stats = a.store.key_stats("acme", chrono::Utc::now()).await.unwrap();
    assert_eq!(stats.api_calls_24h, 30);
    // Shutdown flushes what is still pending.
    for _ in 0..4 {
        b.verify(&secret, &[], None).await.code();
    }
    let store = a.store.clone();
    b.shutdown().await;
    assert_eq!(store.key_stats("acme", chrono::Utc::now()).await.unwrap().api_calls_24h, 34);
}

/// Disables key `id` through `app`, as the dashboard acting for alice.
async fn disable(app: &TestApp, id: &str) {
    app.client
        .clone()
        .set_key_status(as_service(
            pb::SetKeyStatusRequest { id: id.into(), status: pb::KeyStatus::Disabled as i32 },
            "alice",
        ))
        .await
        .unwrap();
}

fn wrong_secret(id: &str, n: usize) -> String {
    let secret: String = format!("{n:0>width$}", width = keys::SECRET_LEN);
    keys::compose(Environment::Live, id, &secret).into_exposed()
}

async fn wrong_secrets_for_a_known_id_are_refuted_in_memory_until_the_key_changes(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (key, secret) = create(&app, "acme", None).await;
    for n in 0..5 {
        assert_eq!(app.verify(&wrong_secret(&key.id, n), &[], None).await.code(), pb::VerifyCode::NotFound);
    }
    assert_eq!(app.metrics.store_key_reads.get(), 1, "one read for five wrong secrets");
    assert_eq!(app.metrics.id_cache_hits.get(), 4);
    assert_eq!(app.metrics.argon2_verifications.get(), 5, "each refuted with one hash");

    // A change voids the id's record: the first sight of the real secret
    // afterwards sees the change, not the record read before it.
    disable(&app, &key.id).await;
    assert_eq!(app.verify(&secret, &[], None).await.code(), pb::VerifyCode::Disabled);
    assert_eq!(app.metrics.store_key_reads.get(), 2);
}

async fn a_key_hashed_with_other_parameters_is_rehashed_once_after_it_verifies(b: Backend) {
    use takumo_keys::{
        api::issue::{KeySpec, issue_key},
        domain::model::AuditContext,
        domain::scopes::{Preset, expand_preset},
        domain::secret::SecretString,
        verify::hashing::{HashParams, Hasher},
    };
    let app = TestApp::spawn(b).await;
    // Written with other parameters than the server's (m=256, t=1): as keys
    // created before the defaults changed were.
    let old_params = HashParams { memory_kib: 64, iterations: 2, parallelism: 1 };
    let old = Hasher::new(SecretString::new(common::PEPPER), old_params, Default::default()).unwrap();
    let spec = KeySpec {
        organization_id: "acme".into(),
        name: "old".into(),
        scopes: expand_preset(Preset::ReadOnly),
        created_by: "alice".into(),
        environment: Environment::Live,
        expires_at: None,
        metadata: Default::default(),
    };
    let (key, secret) = issue_key(&*app.store, &old, spec, &AuditContext::operator("alice")).await.unwrap();
    let (_, before) = app.store.get_key_with_hash(&key.id).await.unwrap().unwrap();
    assert!(before.phc.starts_with("$argon2id$v=19$m=64,t=2,p=1$"), "{}", before.phc);

    assert_eq!(app.verify(secret.expose(), &[], None).await.code(), pb::VerifyCode::Valid);
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.metrics.argon2_rehashes.get() == 0 {
        assert!(Instant::now() < deadline, "not rehashed within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, after) = app.store.get_key_with_hash(&key.id).await.unwrap().unwrap();
    assert!(after.phc.starts_with("$argon2id$v=19$m=256,t=1,p=1$"), "{}", after.phc);
    assert_ne!(after.phc, before.phc);

    // The new hash verifies on a fresh replica, which has nothing to rehash.
    let fresh = TestApp::spawn_on(app.db.clone(), common::serve_args).await;
    assert_eq!(fresh.verify(secret.expose(), &[], None).await.code(), pb::VerifyCode::Valid);
    assert_eq!(app.verify(secret.expose(), &[], None).await.code(), pb::VerifyCode::Valid);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fresh.metrics.argon2_rehashes.get(), 0);
    assert_eq!(app.metrics.argon2_rehashes.get(), 1, "rehashed once");
}

/// A record another replica changed is not trusted from this one's id cache.
async fn a_change_on_another_replica_voids_the_id_cache() {
    let (a, b) = two_replicas().await;
    let (key, secret) = create(&a, "acme", None).await;
    // b reads the key's record while refuting a wrong secret.
    assert_eq!(b.verify(&wrong_secret(&key.id, 1), &[], None).await.code(), pb::VerifyCode::NotFound);
    let invalidations = b.metrics.invalidations.get();
    disable(&a, &key.id).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.metrics.invalidations.get() == invalidations {
        assert!(Instant::now() < deadline, "the notice did not reach b within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.verify(&secret, &[], None).await.code(), pb::VerifyCode::Disabled);
}

for_each_backend!(
    wrong_secrets_for_a_known_id_are_refuted_in_memory_until_the_key_changes,
    a_key_hashed_with_other_parameters_is_rehashed_once_after_it_verifies,
    concurrent_first_sights_of_a_key_share_one_argon2_verification,
    warm_verifications_read_nothing_from_the_store,
    repeated_bad_keys_cost_no_database_or_argon2_work,
    local_changes_take_effect_at_once,
    expired_keys_are_refused_from_cache,
);

/// The same, with two real server processes: separate address spaces,
/// separate pools, one database.
async fn two_server_processes_agree_within_seconds() {
    let db = TestDb::new(Backend::Postgres).await;
    let a = common::ServerProcess::start(&db.url, &[]).await;
    let b = common::ServerProcess::start(&db.url, &[]).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let created = ca
        .create_key(as_service(
            pb::CreateKeyRequest {
                organization_id: "acme".into(),
                name: "gateway".into(),
                scopes: Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32)),
                ..Default::default()
            },
            "alice",
        ))
        .await
        .unwrap()
        .into_inner();
    let (id, secret) = (created.key.unwrap().id, created.secret);
    let code = |c: &mut pb::api_key_service_client::ApiKeyServiceClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        let secret = secret.clone();
        async move {
            c.verify_key(as_service(pb::VerifyKeyRequest { key: secret, ..Default::default() }, "svc"))
                .await
                .unwrap()
                .into_inner()
                .code()
        }
    };
    assert_eq!(code(&mut cb).await, pb::VerifyCode::Valid);
    for (change, want) in [
        ("disable", pb::VerifyCode::Disabled),
        ("revoke", pb::VerifyCode::Revoked),
        ("delete", pb::VerifyCode::NotFound),
    ] {
        match change {
            "disable" => {
                ca.set_key_status(as_service(
                    pb::SetKeyStatusRequest { id: id.clone(), status: pb::KeyStatus::Disabled as i32 },
                    "alice",
                ))
                .await
                .unwrap();
            }
            "revoke" => {
                ca.revoke_key(as_service(pb::RevokeKeyRequest { id: id.clone() }, "alice")).await.unwrap();
            }
            _ => {
                ca.delete_key(as_service(pb::DeleteKeyRequest { id: id.clone() }, "alice")).await.unwrap();
            }
        }
        let start = Instant::now();
        while code(&mut cb).await != want {
            assert!(start.elapsed() < Duration::from_secs(5), "{change} on one process not seen by the other in 5 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

mod replicas {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_server_processes_agree_within_seconds() {
        super::two_server_processes_agree_within_seconds().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disable_revoke_and_delete_on_one_replica_reach_the_other() {
        super::disable_revoke_and_delete_on_one_replica_reach_the_other().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_missed_while_the_listener_was_cut_is_not_trusted() {
        super::a_change_missed_while_the_listener_was_cut_is_not_trusted().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_on_another_replica_voids_the_id_cache() {
        super::a_change_on_another_replica_voids_the_id_cache().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn usage_from_two_replicas_adds_up() {
        super::usage_from_two_replicas_adds_up().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_key_is_re_read_once_older_than_the_freshness_bound() {
    let db = Arc::new(TestDb::new(Backend::Sqlite).await);
    let app = TestApp::spawn_on(db, |url| {
        let mut a = common::serve_args(url);
        a.cache_freshness_ms = 50;
        a
    })
    .await;
    let (_, secret) = create(&app, "acme", None).await;
    assert_eq!(app.verify(&secret, &[], None).await.code(), pb::VerifyCode::Valid);
    assert_eq!(app.verify(&secret, &[], None).await.code(), pb::VerifyCode::Valid);
    let reads = app.metrics.store_key_reads.get();
    assert_eq!(app.metrics.cache_refreshes.get(), 0, "fresh: answered from the cache");
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(app.verify(&secret, &[], None).await.code(), pb::VerifyCode::Valid);
    assert_eq!(app.metrics.cache_refreshes.get(), 1, "older than 50 ms: re-read");
    assert_eq!(app.metrics.store_key_reads.get(), reads + 1);
    assert_eq!(app.metrics.argon2_verifications.get(), 1, "a re-read needs no argon2");
}
