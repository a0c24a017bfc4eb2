//! One store suite, run against every backend: each test gets its own
//! database, so the suite runs in parallel.

use crate::common;

use chrono::{Duration, DurationRound, Utc};
use common::{Backend, TestStore, test_store};
use std::sync::Arc;
use takumo_keys::{
    Error,
    domain::keys,
    domain::model::{
        AuditAction, AuditContext, AuditFilter, Environment, KeyStatus, ListFilter, NewKey, Plan, StoredHash,
        UsageDelta,
    },
    store::{self, StoreOptions, truncate_micros},
};

fn ctx() -> AuditContext {
    AuditContext {
        actor: "alice".into(),
        principal: "service:dashboard".into(),
        request_id: "req-1".into(),
        peer: Some("127.0.0.1:4000".into()),
    }
}

fn new_key(org: &str, created_by: &str) -> NewKey {
    let g = keys::generate(Environment::Live);
    NewKey {
        id: g.id.clone(),
        organization_id: org.into(),
        name: "ci-pipeline".into(),
        prefix: g.display_prefix(),
        scopes: vec!["api_keys.read".into(), "fleet.read".into()],
        created_by: created_by.into(),
        created_at: truncate_micros(Utc::now()),
        expires_at: None,
        environment: Environment::Live,
        // Non-empty, with characters JSON must escape: every test round-trips it.
        metadata: [("tenant".into(), "acme \"eu\"".into()), ("plan.tier".into(), "pro/ü".into())].into(),
        rotated_from: None,
        secret_hash: StoredHash {
            phc: "$argon2id$v=19$m=256,t=1,p=1$c2FsdHNhbHQ$aGFzaA".into(),
            pepper_id: "0badc0de".into(),
        },
    }
}

async fn create_key_then_get_returns_the_same_key(b: Backend) {
    let s = test_store(b).await;
    let nk = new_key("acme", "alice");
    let created = s.create_key(nk.clone(), &ctx()).await.unwrap();
    assert_eq!(created.id, nk.id);
    assert_eq!(created.status, KeyStatus::Active);
    assert_eq!(created.scopes, nk.scopes);
    assert_eq!(created.created_at, nk.created_at);
    assert_eq!(created.last_used_at, None);
    assert_eq!(created.metadata, nk.metadata);
    let got = s.get_key(&nk.id).await.unwrap().unwrap();
    assert_eq!(got, created);
    let (with_hash, phc) = s.get_key_with_hash(&nk.id).await.unwrap().unwrap();
    assert_eq!(with_hash, created);
    assert_eq!(phc, nk.secret_hash);
}

async fn unknown_key_is_none(b: Backend) {
    let s = test_store(b).await;
    assert!(s.get_key("0000000000000000").await.unwrap().is_none());
    assert!(s.get_key_with_hash("0000000000000000").await.unwrap().is_none());
    assert!(s.set_status("0000000000000000", KeyStatus::Disabled, &ctx()).await.unwrap().is_none());
    assert!(s.revoke_key("0000000000000000", &ctx()).await.unwrap().is_none());
    assert!(!s.delete_key("0000000000000000", &ctx()).await.unwrap());
}

async fn unseen_organization_is_on_free(b: Backend) {
    let s = test_store(b).await;
    assert_eq!(s.get_organization("new-org").await.unwrap().plan, Plan::Free);
    let stats = s.key_stats("new-org", Utc::now()).await.unwrap();
    assert_eq!((stats.plan, stats.total_keys, stats.api_calls_24h), (Plan::Free, 0, 0));
    s.set_plan("new-org", Plan::Pro, &ctx()).await.unwrap();
    assert_eq!(s.get_organization("new-org").await.unwrap().plan, Plan::Pro);
    s.set_plan("new-org", Plan::Developer, &ctx()).await.unwrap();
    assert_eq!(s.get_organization("new-org").await.unwrap().plan, Plan::Developer);
}

async fn plan_limit_counts_active_and_disabled_but_not_revoked_or_deleted(b: Backend) {
    let s = test_store(b).await;
    let a = s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    let d = s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    let r = s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    s.set_status(&d.id, KeyStatus::Disabled, &ctx()).await.unwrap();
    let err = s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap_err();
    assert!(matches!(err, Error::LimitExceeded { plan: Plan::Free, limit: 3 }), "{err:?}");
    s.revoke_key(&r.id, &ctx()).await.unwrap();
    let fourth = s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    assert!(s.create_key(new_key("acme", "alice"), &ctx()).await.is_err());
    assert!(s.delete_key(&fourth.id, &ctx()).await.unwrap());
    s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    let _ = a;
    // Another organization has a limit of its own.
    s.create_key(new_key("other", "bob"), &ctx()).await.unwrap();
}

async fn downgrade_keeps_existing_keys_but_blocks_new_ones(b: Backend) {
    let s = test_store(b).await;
    s.set_plan("acme", Plan::Developer, &ctx()).await.unwrap();
    let mut ids = vec![];
    for _ in 0..5 {
        ids.push(s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap().id);
    }
    s.set_plan("acme", Plan::Free, &ctx()).await.unwrap();
    assert!(matches!(s.create_key(new_key("acme", "alice"), &ctx()).await, Err(Error::LimitExceeded { .. })));
    for id in ids {
        assert_eq!(s.get_key(&id).await.unwrap().unwrap().status, KeyStatus::Active);
    }
}

async fn concurrent_creates_never_exceed_the_plan_limit(b: Backend) {
    let s = test_store(b).await;
    let store = s.store.clone();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.create_key(new_key("race", "alice"), &ctx()).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(Error::LimitExceeded { .. }) => {}
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert_eq!(ok, 3);
    let stats = s.key_stats("race", Utc::now()).await.unwrap();
    assert_eq!((stats.total_keys, stats.keys_counted), (3, 3));
}

async fn list_is_newest_first_and_pages_by_keyset(b: Backend) {
    let s = test_store(b).await;
    s.set_plan("acme", Plan::Enterprise, &ctx()).await.unwrap();
    let base = truncate_micros(Utc::now());
    let mut ids = vec![];
    for i in 0..7 {
        let mut k = new_key("acme", if i % 2 == 0 { "alice" } else { "bob" });
        // Two keys share a timestamp, so the id tie-break is exercised.
        k.created_at = base + Duration::milliseconds((i / 2) as i64);
        ids.push((k.created_at, k.id.clone()));
        s.create_key(k, &ctx()).await.unwrap();
    }
    s.create_key(new_key("other", "carol"), &ctx()).await.unwrap();
    ids.sort();
    ids.reverse();
    let want: Vec<String> = ids.into_iter().map(|(_, id)| id).collect();

    let mut got = vec![];
    let mut after = None;
    loop {
        let page = s.list_keys("acme", &ListFilter::default(), after.as_ref(), 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        let last = page.last().unwrap();
        after = Some(takumo_keys::domain::model::Cursor { created_at: last.created_at, id: last.id.clone() });
        got.extend(page.into_iter().map(|k| k.id));
    }
    assert_eq!(got, want);

    let bobs = s
        .list_keys("acme", &ListFilter { created_by: Some("bob".into()), ..Default::default() }, None, 100)
        .await
        .unwrap();
    assert_eq!(bobs.len(), 3);
    assert!(bobs.iter().all(|k| k.created_by == "bob"));
    s.set_status(&want[0], KeyStatus::Disabled, &ctx()).await.unwrap();
    let disabled = s
        .list_keys("acme", &ListFilter { status: Some(KeyStatus::Disabled), ..Default::default() }, None, 100)
        .await
        .unwrap();
    assert_eq!(disabled.iter().map(|k| k.id.clone()).collect::<Vec<_>>(), vec![want[0].clone()]);

    // The environment filter (what an API-key caller's ListKeys uses).
    let mut test_key = new_key("acme", "bob");
    test_key.environment = Environment::Test;
    let test_key = s.create_key(test_key, &ctx()).await.unwrap();
    let only = |e| ListFilter { environment: Some(e), ..Default::default() };
    let tests = s.list_keys("acme", &only(Environment::Test), None, 100).await.unwrap();
    assert_eq!(tests.iter().map(|k| k.id.clone()).collect::<Vec<_>>(), vec![test_key.id.clone()]);
    let lives = s.list_keys("acme", &only(Environment::Live), None, 100).await.unwrap();
    assert_eq!(lives.len(), want.len());
    assert!(lives.iter().all(|k| k.environment == Environment::Live));
}

async fn revoked_key_cannot_change_status(b: Backend) {
    let s = test_store(b).await;
    let k = s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    assert_eq!(s.set_status(&k.id, KeyStatus::Disabled, &ctx()).await.unwrap().unwrap().status, KeyStatus::Disabled);
    // Idempotent toggles.
    assert_eq!(s.set_status(&k.id, KeyStatus::Disabled, &ctx()).await.unwrap().unwrap().status, KeyStatus::Disabled);
    assert_eq!(s.set_status(&k.id, KeyStatus::Active, &ctx()).await.unwrap().unwrap().status, KeyStatus::Active);
    assert_eq!(s.revoke_key(&k.id, &ctx()).await.unwrap().unwrap().status, KeyStatus::Revoked);
    assert_eq!(s.revoke_key(&k.id, &ctx()).await.unwrap().unwrap().status, KeyStatus::Revoked);
    let err = s.set_status(&k.id, KeyStatus::Active, &ctx()).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert_eq!(s.get_key(&k.id).await.unwrap().unwrap().status, KeyStatus::Revoked);
}

async fn deleted_key_is_gone_but_still_counts_in_total_keys(b: Backend) {
    let s = test_store(b).await;
    let k = s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    assert!(s.delete_key(&k.id, &ctx()).await.unwrap());
    assert!(s.get_key(&k.id).await.unwrap().is_none());
    let stats = s.key_stats("acme", Utc::now()).await.unwrap();
    assert_eq!((stats.total_keys, stats.active_keys, stats.keys_counted), (2, 1, 1));
}

async fn active_keys_exclude_disabled_and_expired(b: Backend) {
    let s = test_store(b).await;
    let mut expired = new_key("acme", "alice");
    expired.expires_at = Some(truncate_micros(Utc::now() + Duration::milliseconds(1)));
    s.create_key(expired, &ctx()).await.unwrap();
    let d = s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    s.set_status(&d.id, KeyStatus::Disabled, &ctx()).await.unwrap();
    s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    let stats = s.key_stats("acme", Utc::now() + Duration::seconds(1)).await.unwrap();
    assert_eq!((stats.active_keys, stats.keys_counted, stats.total_keys), (1, 3, 3));
}

async fn usage_adds_up_and_last_used_only_moves_forward(b: Backend) {
    let s = test_store(b).await;
    let k = s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    let now = truncate_micros(Utc::now());
    let minute = now.duration_trunc(Duration::minutes(1)).unwrap();
    let delta = |calls, at| UsageDelta {
        key_id: k.id.clone(),
        organization_id: "acme".into(),
        minute,
        calls,
        last_used_at: at,
    };
    // Two replicas flushing the same bucket add up; duplicates in one batch merge.
    s.record_usage(&[delta(3, now), delta(2, now - Duration::seconds(1))]).await.unwrap();
    s.record_usage(&[delta(5, now - Duration::seconds(2))]).await.unwrap();
    let stats = s.key_stats("acme", now).await.unwrap();
    assert_eq!(stats.api_calls_24h, 10);
    assert_eq!(stats.last_call_at, Some(now));
    assert_eq!(s.get_key(&k.id).await.unwrap().unwrap().last_used_at, Some(now));
    s.record_usage(&[]).await.unwrap();
}

async fn deleted_keys_calls_still_count_in_24h(b: Backend) {
    let s = test_store(b).await;
    let k = s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    let now = truncate_micros(Utc::now());
    let minute = now.duration_trunc(Duration::minutes(1)).unwrap();
    s.record_usage(&[UsageDelta {
        key_id: k.id.clone(),
        organization_id: "acme".into(),
        minute,
        calls: 4,
        last_used_at: now,
    }])
    .await
    .unwrap();
    s.delete_key(&k.id, &ctx()).await.unwrap();
    assert_eq!(s.key_stats("acme", now).await.unwrap().api_calls_24h, 4);
    // Usage of a key deleted before its flush still lands.
    s.record_usage(&[UsageDelta {
        key_id: k.id.clone(),
        organization_id: "acme".into(),
        minute,
        calls: 1,
        last_used_at: now,
    }])
    .await
    .unwrap();
    assert_eq!(s.key_stats("acme", now).await.unwrap().api_calls_24h, 5);
}

async fn calls_older_than_24h_do_not_count_and_prune_removes_them(b: Backend) {
    let s = test_store(b).await;
    let k = s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    let now = truncate_micros(Utc::now());
    let old = (now - Duration::hours(30)).duration_trunc(Duration::minutes(1)).unwrap();
    let recent = now.duration_trunc(Duration::minutes(1)).unwrap();
    s.record_usage(&[
        UsageDelta { key_id: k.id.clone(), organization_id: "acme".into(), minute: old, calls: 7, last_used_at: old },
        UsageDelta {
            key_id: k.id.clone(),
            organization_id: "acme".into(),
            minute: recent,
            calls: 2,
            last_used_at: now,
        },
    ])
    .await
    .unwrap();
    assert_eq!(s.key_stats("acme", now).await.unwrap().api_calls_24h, 2);
    assert_eq!(s.prune_usage(now - Duration::hours(25)).await.unwrap(), 1);
    assert_eq!(s.key_stats("acme", now).await.unwrap().api_calls_24h, 2);
}

async fn migrations_run_twice_without_harm(b: Backend) {
    let s: TestStore = test_store(b).await;
    s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    let again = store::connect(&s.db.url, &StoreOptions::default()).await.unwrap();
    assert_eq!(again.key_stats("acme", Utc::now()).await.unwrap().total_keys, 1);
}

async fn replicas_starting_together_migrate_once(b: Backend) {
    let db = Arc::new(common::TestDb::new(b).await);
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { store::connect(&url, &StoreOptions::default()).await.map(|_| ()) })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("each replica starts");
    }
    // Once: one row per migration version in sqlx's ledger, all applied.
    let versions: Vec<(i64, bool)> = match b {
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
                .fetch_all(&pool)
                .await
                .unwrap()
        }
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
            sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };
    let mut unique: Vec<i64> = versions.iter().map(|(v, _)| *v).collect();
    unique.dedup();
    assert_eq!(unique.len(), versions.len(), "a migration ran twice: {versions:?}");
    assert!(!versions.is_empty() && versions.iter().all(|(_, ok)| *ok), "{versions:?}");
}

async fn every_mutation_appends_an_audit_event_in_its_transaction(b: Backend) {
    let s = test_store(b).await;
    let k = s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    s.set_status(&k.id, KeyStatus::Disabled, &ctx()).await.unwrap();
    s.revoke_key(&k.id, &ctx()).await.unwrap();
    s.delete_key(&k.id, &ctx()).await.unwrap();
    s.set_plan("acme", Plan::Pro, &ctx()).await.unwrap();
    s.create_key(new_key("other", "bob"), &AuditContext::operator("bob")).await.unwrap();
    // Failed mutations leave no trace.
    let _ = s.set_status(&k.id, KeyStatus::Active, &ctx()).await;
    s.set_plan("full", Plan::Free, &ctx()).await.unwrap();
    for _ in 0..3 {
        s.create_key(new_key("full", "carol"), &ctx()).await.unwrap();
    }
    assert!(s.create_key(new_key("full", "carol"), &ctx()).await.is_err());

    let events = s.list_audit_events("acme", &AuditFilter::default(), None, 100).await.unwrap();
    let got: Vec<_> = events.iter().map(|e| (e.action, e.status_before, e.status_after)).collect();
    assert_eq!(
        got,
        vec![
            (AuditAction::PlanChanged, None, None),
            (AuditAction::KeyDeleted, Some(KeyStatus::Revoked), None),
            (AuditAction::KeyRevoked, Some(KeyStatus::Disabled), Some(KeyStatus::Revoked)),
            (AuditAction::KeyStatusChanged, Some(KeyStatus::Active), Some(KeyStatus::Disabled)),
            (AuditAction::KeyCreated, None, Some(KeyStatus::Active)),
        ]
    );
    let created = events.last().unwrap();
    assert_eq!(created.key_id.as_deref(), Some(k.id.as_str()));
    assert_eq!(created.key_prefix.as_deref(), Some(k.prefix.as_str()));
    assert_eq!((created.actor.as_str(), created.principal.as_str()), ("alice", "service:dashboard"));
    assert_eq!((created.request_id.as_str(), created.peer.as_deref()), ("req-1", Some("127.0.0.1:4000")));
    assert_eq!(events[0].detail.as_deref(), Some("plan free -> pro"));

    let other = s.list_audit_events("other", &AuditFilter::default(), None, 100).await.unwrap();
    assert_eq!(other.len(), 1);
    assert_eq!((other[0].action, other[0].principal.as_str()), (AuditAction::Bootstrap, "operator:cli"));
    let full = s.list_audit_events("full", &AuditFilter::default(), None, 100).await.unwrap();
    assert_eq!(full.len(), 4, "plan change and three creates; the refused create left nothing");
}

async fn audit_events_filter_and_page_newest_first(b: Backend) {
    let s = test_store(b).await;
    s.set_plan("acme", Plan::Enterprise, &ctx()).await.unwrap();
    for _ in 0..5 {
        let k = s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
        s.revoke_key(&k.id, &ctx()).await.unwrap();
    }
    let revokes = AuditFilter { action: Some(AuditAction::KeyRevoked), ..Default::default() };
    let mut ids = vec![];
    let mut before = None;
    loop {
        let page = s.list_audit_events("acme", &revokes, before, 2).await.unwrap();
        if page.is_empty() {
            break;
        }
        before = page.last().map(|e| e.id);
        ids.extend(page.iter().map(|e| e.id));
        assert!(page.iter().all(|e| e.action == AuditAction::KeyRevoked));
    }
    assert_eq!(ids.len(), 5);
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first");
    let future = AuditFilter { since: Some(Utc::now() + Duration::hours(1)), ..Default::default() };
    assert!(s.list_audit_events("acme", &future, None, 100).await.unwrap().is_empty());
    let past = AuditFilter { until: Some(Utc::now() - Duration::hours(1)), ..Default::default() };
    assert!(s.list_audit_events("acme", &past, None, 100).await.unwrap().is_empty());
}

for_each_backend!(
    every_mutation_appends_an_audit_event_in_its_transaction,
    audit_events_filter_and_page_newest_first,
    create_key_then_get_returns_the_same_key,
    unknown_key_is_none,
    unseen_organization_is_on_free,
    plan_limit_counts_active_and_disabled_but_not_revoked_or_deleted,
    downgrade_keeps_existing_keys_but_blocks_new_ones,
    concurrent_creates_never_exceed_the_plan_limit,
    list_is_newest_first_and_pages_by_keyset,
    revoked_key_cannot_change_status,
    deleted_key_is_gone_but_still_counts_in_total_keys,
    active_keys_exclude_disabled_and_expired,
    usage_adds_up_and_last_used_only_moves_forward,
    deleted_keys_calls_still_count_in_24h,
    calls_older_than_24h_do_not_count_and_prune_removes_them,
    migrations_run_twice_without_harm,
    replicas_starting_together_migrate_once,
);
