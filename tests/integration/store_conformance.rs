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
        AuditAction, AuditContext, AuditFilter, Environment, KeyStatus, KeyUpdate, LeakAction, ListFilter, NewKey,
        Plan, StoredHash, UsageDelta,
    },
    domain::secret::SecretString,
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
    assert_eq!(s.prune_usage(now - Duration::hours(25)).await.unwrap(), 0, "the pruned bucket is gone");
}

async fn a_bucket_straddling_the_window_start_counts(b: Backend) {
    let s = test_store(b).await;
    let k = s.create_key(new_key("acme", "alice"), &ctx()).await.unwrap();
    let now = truncate_micros(Utc::now());
    // The minute holding `now - 24h + 30s`: its second half lies in the window.
    let edge = (now - Duration::hours(24) + Duration::seconds(30)).duration_trunc(Duration::minutes(1)).unwrap();
    let before = edge - Duration::minutes(2);
    let delta = |minute, calls| UsageDelta {
        key_id: k.id.clone(),
        organization_id: "acme".into(),
        minute,
        calls,
        last_used_at: minute,
    };
    s.record_usage(&[delta(edge, 3), delta(before, 100)]).await.unwrap();
    assert_eq!(s.key_stats("acme", now).await.unwrap().api_calls_24h, 3);
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

async fn verification_reads_follow_the_primary_without_a_standby(b: Backend) {
    let s = test_store(b).await;
    assert!(s.ping_standby().await.is_none(), "no standby is configured, so none is reported");
    let nk = new_key("acme", "alice");
    let created = s.create_key(nk.clone(), &ctx()).await.unwrap();
    // Without a standby the floor has nothing to guard: the primary is read.
    for floor in [None, Some(created.updated_at)] {
        let (key, hash) = s.verification_read(&nk.id, floor).await.unwrap().expect("the new key is found");
        assert_eq!((key, hash), (created.clone(), nk.secret_hash.clone()));
        assert_eq!(s.verification_reread(&nk.id, floor).await.unwrap(), Some(created.clone()));
    }
    let disabled = s.set_status(&nk.id, KeyStatus::Disabled, &ctx()).await.unwrap().unwrap();
    assert_eq!(s.verification_reread(&nk.id, Some(disabled.updated_at)).await.unwrap(), Some(disabled));
    assert!(s.verification_read("0000000000000000", None).await.unwrap().is_none());
    assert!(s.verification_reread("0000000000000000", None).await.unwrap().is_none());
}

/// A change sink that only remembers whether notices were reported lost.
#[derive(Default)]
struct LostNotices(std::sync::atomic::AtomicBool);

impl store::ChangeSink for LostNotices {
    fn key_changed(&self, _: &str, _: Option<&str>, _: Option<chrono::DateTime<Utc>>) {}
    fn resync(&self) {}
    fn notices_lost(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn watching_changes_lasts_until_stopped(b: Backend) {
    let s = test_store(b).await;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let store = s.store.clone();
    let sink = Arc::new(LostNotices::default());
    let watch = tokio::spawn({
        let sink = sink.clone();
        async move { store.watch_changes(sink, stop).await }
    });
    // A watch that returned early would leave the cache deaf to other
    // writers while looking healthy; it must still be running.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!watch.is_finished(), "the watch ended before it was stopped");
    assert!(!sink.0.load(std::sync::atomic::Ordering::Relaxed), "a watch of a healthy store reported notices lost");
    stop_tx.send(true).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), watch).await.expect("the watch ends once stopped").unwrap();
}

/// The audit events of `org` with `action`, newest first.
async fn events_of(s: &TestStore, org: &str, action: AuditAction) -> Vec<takumo_keys::domain::model::AuditEvent> {
    let only = AuditFilter { action: Some(action), ..Default::default() };
    s.list_audit_events(org, &only, None, 100).await.unwrap()
}

async fn update_changes_only_the_named_fields_and_audits_their_names(b: Backend) {
    let s = test_store(b).await;
    let nk = new_key("acme", "alice");
    let created = s.create_key(nk.clone(), &ctx()).await.unwrap();

    let rename = KeyUpdate { name: Some("renamed".into()), ..Default::default() };
    let renamed = s.update_key(&nk.id, &rename, &ctx()).await.unwrap().unwrap();
    assert_eq!(renamed.name, "renamed");
    assert_eq!((&renamed.metadata, renamed.expires_at), (&created.metadata, None));
    assert!(renamed.updated_at >= created.updated_at);
    assert_eq!(s.get_key(&nk.id).await.unwrap(), Some(renamed.clone()));

    let expiry = truncate_micros(Utc::now() + Duration::days(30));
    let relabel = KeyUpdate {
        metadata: Some([("team".into(), "infra".into())].into()),
        expires_at: Some(Some(expiry)),
        ..Default::default()
    };
    let relabelled = s.update_key(&nk.id, &relabel, &ctx()).await.unwrap().unwrap();
    assert_eq!(relabelled.name, "renamed", "a field the update leaves out is kept");
    assert_eq!(relabelled.metadata, [("team".to_string(), "infra".to_string())].into());
    assert_eq!(relabelled.expires_at, Some(expiry));

    let never = KeyUpdate { expires_at: Some(None), ..Default::default() };
    assert_eq!(s.update_key(&nk.id, &never, &ctx()).await.unwrap().unwrap().expires_at, None);

    let updates = events_of(&s, "acme", AuditAction::KeyUpdated).await;
    let details: Vec<_> = updates.iter().map(|e| e.detail.as_deref().unwrap_or_default()).collect();
    assert_eq!(details, ["changed: expires_at", "changed: metadata, expires_at", "changed: name"]);
    assert!(updates.iter().all(|e| e.status_before == Some(KeyStatus::Active) && e.key_id.as_deref() == Some(&*nk.id)));
    assert!(s.update_key("0000000000000000", &rename, &ctx()).await.unwrap().is_none());
}

/// A successor of `old` as the API builds it for RollKey.
fn successor(old: &NewKey) -> NewKey {
    NewKey { rotated_from: Some(old.id.clone()), ..new_key(&old.organization_id, &old.created_by) }
}

async fn roll_links_the_keys_and_ends_the_old_one_at_the_earlier_of_grace_and_expiry(b: Backend) {
    let s = test_store(b).await;
    // Free: three keys fill the plan, and rolling one still works.
    let (a, soon, now_gone) = (new_key("acme", "alice"), new_key("acme", "alice"), new_key("acme", "alice"));
    let expiry = truncate_micros(Utc::now() + Duration::minutes(10));
    for k in [&a, &NewKey { expires_at: Some(expiry), ..soon.clone() }, &now_gone] {
        s.create_key(k.clone(), &ctx()).await.unwrap();
    }

    let before = Utc::now();
    let (new, old) = s.roll_key(&a.id, successor(&a), Duration::hours(1), &ctx()).await.unwrap().unwrap();
    let after = Utc::now();
    assert_eq!((new.rotated_from.as_deref(), new.status), (Some(&*a.id), KeyStatus::Active));
    assert_eq!((old.rotated_to.as_deref(), old.status), (Some(&*new.id), KeyStatus::Active));
    let end = old.expires_at.expect("the old key works for the grace period");
    assert!(end >= truncate_micros(before + Duration::hours(1)) && end <= after + Duration::hours(1), "{end}");
    assert_eq!(s.get_key(&a.id).await.unwrap(), Some(old.clone()));

    match s.roll_key(&a.id, successor(&a), Duration::hours(1), &ctx()).await {
        Err(Error::FailedPrecondition(m)) => assert!(m.contains("already rolled"), "{m}"),
        other => panic!("a key rolled twice: {other:?}"),
    }

    // Grace beyond the key's own expiry: it still ends at its expiry.
    let (_, old_soon) = s.roll_key(&soon.id, successor(&soon), Duration::hours(1), &ctx()).await.unwrap().unwrap();
    assert_eq!((old_soon.expires_at, old_soon.status), (Some(expiry), KeyStatus::Active));

    // No grace: revoked at once.
    let (_, revoked) = s.roll_key(&now_gone.id, successor(&now_gone), Duration::zero(), &ctx()).await.unwrap().unwrap();
    assert_eq!((revoked.status, revoked.expires_at), (KeyStatus::Revoked, None));

    let rolls = events_of(&s, "acme", AuditAction::KeyRolled).await;
    let details: Vec<_> = rolls.iter().map(|e| e.detail.clone().unwrap_or_default()).collect();
    assert_eq!(details[0], format!("rolled from {}; the previous key revoked at once", now_gone.id));
    let until = expiry.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(details[1], format!("rolled from {}; the previous key works until {until}", soon.id));
    assert!(details[2].starts_with(&format!("rolled from {}; the previous key works until ", a.id)), "{}", details[2]);
    assert!(s.roll_key("0000000000000000", successor(&a), Duration::hours(1), &ctx()).await.unwrap().is_none());
}

async fn only_an_active_unexpired_key_can_be_rolled(b: Backend) {
    let s = test_store(b).await;
    s.set_plan("acme", Plan::Enterprise, &ctx()).await.unwrap();
    let disabled = new_key("acme", "alice");
    s.create_key(disabled.clone(), &ctx()).await.unwrap();
    s.set_status(&disabled.id, KeyStatus::Disabled, &ctx()).await.unwrap();
    let expired =
        NewKey { expires_at: Some(truncate_micros(Utc::now() - Duration::minutes(1))), ..new_key("acme", "alice") };
    s.create_key(expired.clone(), &ctx()).await.unwrap();
    for (k, why) in [(&disabled, "only an active key"), (&expired, "has expired")] {
        match s.roll_key(&k.id, successor(k), Duration::hours(1), &ctx()).await {
            Err(Error::FailedPrecondition(m)) => assert!(m.contains(why), "{m}"),
            other => panic!("rolled a key that {why}: {other:?}"),
        }
        let unchanged = s.get_key(&k.id).await.unwrap().unwrap();
        assert_eq!(unchanged.rotated_to, None, "a refused roll left a link");
    }
    assert!(events_of(&s, "acme", AuditAction::KeyRolled).await.is_empty());
}

async fn a_leak_report_acts_once_per_key_and_url(b: Backend) {
    let s = test_store(b).await;
    s.set_plan("acme", Plan::Enterprise, &ctx()).await.unwrap();
    let url = "https://github.com/acme/app/blob/main/.env";
    let leaked = |k: &NewKey, url: &str, action| {
        let (s, id, url) = (&s, k.id.clone(), url.to_owned());
        async move { s.record_leak(&id, &url, "github", action, &ctx()).await.unwrap() }
    };
    let revoked = new_key("acme", "alice");
    let disabled = new_key("acme", "alice");
    let reported = new_key("acme", "alice");
    for k in [&revoked, &disabled, &reported] {
        s.create_key(k.clone(), &ctx()).await.unwrap();
    }

    assert!(leaked(&revoked, url, LeakAction::Revoke).await, "the first report of a key and URL acts");
    assert!(!leaked(&revoked, url, LeakAction::Revoke).await, "a repeat changes nothing");
    assert!(leaked(&revoked, "https://gist.github.com/x", LeakAction::Revoke).await);
    assert_eq!(s.get_key(&revoked.id).await.unwrap().unwrap().status, KeyStatus::Revoked);

    assert!(leaked(&disabled, url, LeakAction::Disable).await);
    assert_eq!(s.get_key(&disabled.id).await.unwrap().unwrap().status, KeyStatus::Disabled);
    assert!(leaked(&disabled, "https://gist.github.com/x", LeakAction::Disable).await);

    assert!(leaked(&reported, url, LeakAction::Report).await);
    assert_eq!(s.get_key(&reported.id).await.unwrap().unwrap().status, KeyStatus::Active);
    assert!(!s.record_leak("0000000000000000", url, "github", LeakAction::Revoke, &ctx()).await.unwrap());

    let events = events_of(&s, "acme", AuditAction::KeyLeaked).await;
    let got: Vec<_> = events
        .iter()
        .rev()
        .map(|e| (e.key_id.clone().unwrap(), e.status_before, e.status_after, e.detail.clone().unwrap()))
        .collect();
    let (active, dis, rev) = (Some(KeyStatus::Active), Some(KeyStatus::Disabled), Some(KeyStatus::Revoked));
    let at = |u: &str, done: &str| format!("found at {u} (source: github); {done}");
    assert_eq!(
        got,
        vec![
            (revoked.id.clone(), active, rev, at(url, "revoked")),
            (revoked.id.clone(), rev, rev, at("https://gist.github.com/x", "already revoked")),
            (disabled.id.clone(), active, dis, at(url, "disabled")),
            (disabled.id.clone(), dis, dis, at("https://gist.github.com/x", "already disabled")),
            (reported.id.clone(), active, active, at(url, "reported only (TAKUMO_LEAK_ACTION=report)")),
        ]
    );
}

async fn a_rehash_replaces_the_hash_only_if_it_is_still_the_old_one(b: Backend) {
    let s = test_store(b).await;
    let nk = new_key("acme", "alice");
    let created = s.create_key(nk.clone(), &ctx()).await.unwrap();
    let newer =
        StoredHash { phc: "$argon2id$v=19$m=512,t=2,p=1$c2FsdHNhbHQ$bmV3".into(), pepper_id: "1badc0de".into() };
    assert!(s.replace_hash(&nk.id, &nk.secret_hash, &newer).await.unwrap());
    let (key, hash) = s.get_key_with_hash(&nk.id).await.unwrap().unwrap();
    assert_eq!((key, &hash), (created, &newer), "the record is unchanged; only the hash moved");
    // Another replica rehashed first: this one's old hash is stale and loses.
    let other =
        StoredHash { phc: "$argon2id$v=19$m=512,t=2,p=1$c2FsdHNhbHQ$b3RoZXI".into(), pepper_id: "2badc0de".into() };
    assert!(!s.replace_hash(&nk.id, &nk.secret_hash, &other).await.unwrap());
    assert_eq!(s.get_key_with_hash(&nk.id).await.unwrap().unwrap().1, newer);
    assert!(events_of(&s, "acme", AuditAction::KeyUpdated).await.is_empty(), "a rehash is not audited");
}

async fn the_store_names_its_backend_and_reports_its_pool(b: Backend) {
    let s = test_store(b).await;
    let name = match b {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    assert_eq!(s.backend(), name);
    s.ping().await.unwrap();
    let pool = s.pool_stats();
    assert!(pool.size >= 1 && pool.idle <= pool.size, "{pool:?}");
}

async fn a_duplicate_key_id_is_refused_and_changes_nothing(b: Backend) {
    let s = test_store(b).await;
    let nk = new_key("acme", "alice");
    let first = s.create_key(nk.clone(), &ctx()).await.unwrap();
    let again = NewKey { name: "impostor".into(), ..nk.clone() };
    assert!(matches!(s.create_key(again, &ctx()).await, Err(Error::Internal(_))));
    assert_eq!(s.get_key(&nk.id).await.unwrap(), Some(first));
    assert_eq!(s.key_stats("acme", Utc::now()).await.unwrap().total_keys, 1, "the refused create counted");
    assert_eq!(events_of(&s, "acme", AuditAction::KeyCreated).await.len(), 1);
}

for_each_backend!(
    a_duplicate_key_id_is_refused_and_changes_nothing,
    a_bucket_straddling_the_window_start_counts,
    update_changes_only_the_named_fields_and_audits_their_names,
    roll_links_the_keys_and_ends_the_old_one_at_the_earlier_of_grace_and_expiry,
    only_an_active_unexpired_key_can_be_rolled,
    a_leak_report_acts_once_per_key_and_url,
    a_rehash_replaces_the_hash_only_if_it_is_still_the_old_one,
    the_store_names_its_backend_and_reports_its_pool,
    verification_reads_follow_the_primary_without_a_standby,
    watching_changes_lasts_until_stopped,
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

/// The embedded store has no standby and no listener: a setting for either
/// is refused at start instead of being silently ignored.
#[tokio::test]
async fn the_embedded_store_refuses_a_read_url_or_a_listen_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keys.db").display());
    let pg = || Some(SecretString::new("postgres://postgres@127.0.0.1:5432/postgres"));
    for opts in
        [StoreOptions { read_url: pg(), ..Default::default() }, StoreOptions { listen_url: pg(), ..Default::default() }]
    {
        match store::connect(&url, &opts).await {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("DATABASE_READ_URL"), "{m}"),
            Err(e) => panic!("expected InvalidArgument, got {e}"),
            Ok(_) => panic!("the embedded store accepted {opts:?}"),
        }
    }
    assert!(store::connect(&url, &StoreOptions::default()).await.is_ok());
}

/// The readiness probe's ping really asks PostgreSQL: with the database
/// refusing connections (and the pool's ones ended) it fails.
#[tokio::test]
async fn a_ping_fails_while_the_database_refuses_connections() {
    let s = test_store(Backend::Postgres).await;
    s.ping().await.unwrap();
    s.db.allow_connections(false).await;
    let refused = tokio::time::timeout(std::time::Duration::from_secs(30), s.ping()).await.expect("the ping ends");
    assert!(matches!(refused, Err(Error::Unavailable { .. })), "{refused:?}");
    s.db.allow_connections(true).await;
    s.ping().await.unwrap();
}
