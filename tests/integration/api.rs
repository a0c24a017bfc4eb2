//! End-to-end: the real server on an ephemeral port, a generated tonic
//! client, and a real database of each backend.

use crate::common;

use common::{Backend, PEPPER, SERVICE_TOKEN, TestApp, as_service, with_bearer};
use prost::Message;
use takumo_keys::{
    api::issue::{KeySpec, issue_key},
    domain::keys,
    domain::model::Environment,
    domain::scopes::{self, Preset},
    domain::secret::SecretString,
    proto::pb::{self, create_key_request::Scopes},
    verify::hashing::{HashParams, Hasher},
};
use tonic::Code;

fn preset(p: pb::ScopePreset) -> Option<Scopes> {
    Some(Scopes::Preset(p as i32))
}

fn custom(s: &[&str]) -> Option<Scopes> {
    Some(Scopes::Custom(pb::ScopeList { scopes: s.iter().map(|x| x.to_string()).collect() }))
}

fn create_req(org: &str, name: &str, scopes: Option<Scopes>) -> pb::CreateKeyRequest {
    pb::CreateKeyRequest { organization_id: org.into(), name: name.into(), scopes, ..Default::default() }
}

fn code_of(r: &pb::VerifyKeyResponse) -> pb::VerifyCode {
    r.code()
}

/// The dashboard's summary of `org`, as the service sees it now.
async fn key_stats(app: &TestApp, org: &str) -> pb::KeyStats {
    app.client
        .clone()
        .get_key_stats(as_service(pb::GetKeyStatsRequest { organization_id: org.into() }, "a"))
        .await
        .unwrap()
        .into_inner()
}

async fn secret_is_returned_once_and_never_again(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (key, secret) = app.create("acme", preset(pb::ScopePreset::Workspace)).await;
    assert!(secret.starts_with("tk_live_"));
    assert_eq!(secret.len(), keys::KEY_LEN);
    assert!(secret.starts_with(&key.prefix));
    assert_eq!(key.prefix.len(), 16);
    let mut c = app.client.clone();
    let got = c.get_key(as_service(pb::GetKeyRequest { id: key.id.clone() }, "alice")).await.unwrap().into_inner();
    let listed = c
        .list_keys(as_service(pb::ListKeysRequest { organization_id: "acme".into(), ..Default::default() }, "alice"))
        .await
        .unwrap()
        .into_inner();
    let verified = app.verify(&secret, &[], None).await;
    let secret_part = &secret[24..56];
    for bytes in [got.encode_to_vec(), listed.encode_to_vec(), verified.encode_to_vec()] {
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(secret_part), "secret leaked in a later response");
    }
    assert!(verified.valid);
}

const READ_SCOPES: [&str; 12] = [
    "organization.read",
    "members.read",
    "api_keys.read",
    "policies.read",
    "fleet.read",
    "audit.read",
    "billing.read",
    "security.read",
    "roles.read",
    "compliance.read",
    "integrations.read",
    "notifications.read",
];

const WORKSPACE_WRITE_SCOPES: [&str; 9] = [
    "policies.create",
    "policies.edit",
    "policies.delete",
    "fleet.manage",
    "api_keys.create",
    "api_keys.revoke",
    "audit.export",
    "integrations.manage",
    "notifications.manage",
];

async fn presets_expand_to_the_catalogs_sets(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.set_plan("acme", pb::Plan::Enterprise).await;
    let catalog =
        app.client.clone().list_scopes(as_service(pb::ListScopesRequest {}, "alice")).await.unwrap().into_inner();
    assert_eq!(catalog.groups.len(), 12);
    assert_eq!(catalog.groups.iter().map(|g| g.scopes.len()).sum::<usize>(), 34);
    for (p, domain) in [
        (pb::ScopePreset::Workspace, Preset::Workspace),
        (pb::ScopePreset::Organization, Preset::Organization),
        (pb::ScopePreset::ReadOnly, Preset::ReadOnly),
    ] {
        let (key, _) = app.create("acme", preset(p)).await;
        assert_eq!(key.scopes, scopes::expand_preset(domain));
        // Pinned here, not derived from the function the server calls: a
        // preset that gains or loses a scope must fail this test.
        let mut got = key.scopes.clone();
        got.sort();
        let mut want: Vec<&str> = match p {
            pb::ScopePreset::ReadOnly => READ_SCOPES.to_vec(),
            pb::ScopePreset::Workspace => READ_SCOPES.iter().chain(&WORKSPACE_WRITE_SCOPES).copied().collect(),
            _ => catalog.groups.iter().flat_map(|g| g.scopes.iter().map(|s| s.name.as_str())).collect(),
        };
        want.sort();
        assert_eq!(got, want, "{p:?}");
        let listed = catalog.presets.iter().find(|x| x.preset == p as i32).unwrap();
        assert_eq!(listed.scopes, key.scopes);
    }
    let (key, _) = app.create("acme", custom(&["fleet.read", "audit.export"])).await;
    assert_eq!(key.scopes, vec!["audit.export", "fleet.read"]);
}

async fn invalid_create_requests_are_invalid_argument(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    let cases: Vec<(pb::CreateKeyRequest, &str)> = vec![
        (create_req("acme", "", preset(pb::ScopePreset::ReadOnly)), "name"),
        (create_req("acme", &"x".repeat(65), preset(pb::ScopePreset::ReadOnly)), "at most 64"),
        (create_req("acme", "bad\nname", preset(pb::ScopePreset::ReadOnly)), "control"),
        (create_req("acme", "k", None), "preset"),
        (create_req("acme", "k", preset(pb::ScopePreset::Unspecified)), "preset"),
        (create_req("acme", "k", Some(Scopes::Preset(99))), "preset"),
        (create_req("acme", "k", custom(&[])), "at least one"),
        (create_req("acme", "k", custom(&["fleet.read", "fleet.fly"])), "fleet.fly"),
        (create_req("acme", "k", custom(&["fleet.read", "fleet.read"])), "duplicate"),
        (create_req("", "k", preset(pb::ScopePreset::ReadOnly)), "organization_id"),
        (
            pb::CreateKeyRequest {
                expires_at: Some(prost_types::Timestamp { seconds: 1, nanos: 0 }),
                ..create_req("acme", "k", preset(pb::ScopePreset::ReadOnly))
            },
            "future",
        ),
        (
            pb::CreateKeyRequest { environment: 7, ..create_req("acme", "k", preset(pb::ScopePreset::ReadOnly)) },
            "environment",
        ),
    ];
    for (req, needle) in cases {
        let err = c.create_key(as_service(req, "alice")).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains(needle), "{:?} lacks {needle:?}", err.message());
    }
    // A service token must name the acting member.
    let err = c
        .create_key(with_bearer(create_req("acme", "k", preset(pb::ScopePreset::ReadOnly)), SERVICE_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("x-takumo-actor"));
    let stats =
        c.get_key_stats(as_service(pb::GetKeyStatsRequest { organization_id: "acme".into() }, "a")).await.unwrap();
    assert_eq!(stats.into_inner().total_keys, 0, "no invalid request created a key");
}

async fn test_environment_keys_carry_the_test_prefix(b: Backend) {
    let app = TestApp::spawn(b).await;
    let req = pb::CreateKeyRequest {
        environment: pb::Environment::Test as i32,
        ..create_req("acme", "staging-gateway", preset(pb::ScopePreset::ReadOnly))
    };
    let r = app.client.clone().create_key(as_service(req, "alice")).await.unwrap().into_inner();
    assert!(r.secret.starts_with("tk_test_"));
    assert_eq!(r.key.unwrap().environment(), pb::Environment::Test);
    let v = app.verify(&r.secret, &[], None).await;
    assert!(v.valid);
    assert_eq!(v.environment(), pb::Environment::Test);
}

async fn over_the_plan_limit_create_is_resource_exhausted(b: Backend) {
    let app = TestApp::spawn(b).await;
    for _ in 0..3 {
        app.create("acme", preset(pb::ScopePreset::ReadOnly)).await;
    }
    let err = app
        .client
        .clone()
        .create_key(as_service(create_req("acme", "k", preset(pb::ScopePreset::ReadOnly)), "alice"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("Free") && err.message().contains('3'), "{}", err.message());
    // Upgrading lifts the limit; downgrading blocks new keys but keeps old ones.
    app.set_plan("acme", pb::Plan::Developer).await;
    app.create("acme", preset(pb::ScopePreset::ReadOnly)).await;
    app.set_plan("acme", pb::Plan::Free).await;
    let stats = key_stats(&app, "acme").await;
    assert_eq!((stats.active_keys, stats.keys_counted, stats.key_limit), (4, 4, 3));
    assert_eq!(stats.plan(), pb::Plan::Free);
}

async fn fifty_concurrent_creates_on_free_yield_exactly_three_keys(b: Backend) {
    let app = TestApp::spawn(b).await;
    // Repeated on fresh organizations: a race that holds once may not hold twice.
    for round in 0..3 {
        let org = format!("race-{round}");
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let (mut c, org) = (app.client.clone(), org.clone());
                tokio::spawn(async move {
                    c.create_key(as_service(
                        create_req(&org, &format!("k{i}"), preset(pb::ScopePreset::ReadOnly)),
                        "alice",
                    ))
                    .await
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message()),
            }
        }
        assert_eq!(ok, 3, "round {round}");
        let stats = key_stats(&app, &org).await;
        assert_eq!((stats.total_keys, stats.keys_counted), (3, 3));
    }
}

async fn list_pages_across_pages_newest_first(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.set_plan("acme", pb::Plan::Pro).await;
    let mut created = vec![];
    for _ in 0..5 {
        created.push(app.create("acme", preset(pb::ScopePreset::ReadOnly)).await.0.id);
    }
    app.create_as("acme", "bob", preset(pb::ScopePreset::ReadOnly)).await;
    app.create("other", preset(pb::ScopePreset::ReadOnly)).await;
    let mut c = app.client.clone();
    let mut seen = vec![];
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_keys(as_service(
                pb::ListKeysRequest {
                    organization_id: "acme".into(),
                    page_size: 2,
                    page_token: token.clone(),
                    created_by: Some("alice".into()),
                    ..Default::default()
                },
                "alice",
            ))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.keys.len() <= 2);
        seen.extend(page.keys.into_iter().map(|k| k.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    created.reverse();
    assert_eq!(seen, created);
    assert_eq!(pages, 3);
    for (req, needle) in [
        (pb::ListKeysRequest { organization_id: "acme".into(), page_size: 501, ..Default::default() }, "500"),
        (pb::ListKeysRequest { organization_id: "acme".into(), page_size: -1, ..Default::default() }, "negative"),
        (
            pb::ListKeysRequest { organization_id: "acme".into(), page_token: "garbage!".into(), ..Default::default() },
            "page_token",
        ),
    ] {
        let err = c.list_keys(as_service(req, "alice")).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(needle), "{}", err.message());
    }
}

async fn toggling_status_is_idempotent_and_revoked_key_cannot_be_reenabled(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (key, secret) = app.create("acme", preset(pb::ScopePreset::ReadOnly)).await;
    let mut c = app.client.clone();
    let set = |status: pb::KeyStatus| {
        as_service(pb::SetKeyStatusRequest { id: key.id.clone(), status: status as i32 }, "alice")
    };
    for _ in 0..2 {
        let k = c.set_key_status(set(pb::KeyStatus::Disabled)).await.unwrap().into_inner();
        assert_eq!(k.status(), pb::KeyStatus::Disabled);
    }
    assert_eq!(code_of(&app.verify(&secret, &[], None).await), pb::VerifyCode::Disabled);
    c.set_key_status(set(pb::KeyStatus::Active)).await.unwrap();
    assert!(app.verify(&secret, &[], None).await.valid);
    for bad in [pb::KeyStatus::Unspecified, pb::KeyStatus::Revoked] {
        assert_eq!(c.set_key_status(set(bad)).await.unwrap_err().code(), Code::InvalidArgument);
    }
    let revoked = c.revoke_key(as_service(pb::RevokeKeyRequest { id: key.id.clone() }, "alice")).await.unwrap();
    assert_eq!(revoked.into_inner().status(), pb::KeyStatus::Revoked);
    let err = c.set_key_status(set(pb::KeyStatus::Active)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("revoked"));
    assert_eq!(code_of(&app.verify(&secret, &[], None).await), pb::VerifyCode::Revoked);
    // A revoked key stays listed.
    let listed = c
        .list_keys(as_service(pb::ListKeysRequest { organization_id: "acme".into(), ..Default::default() }, "alice"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys.len(), 1);
    assert_eq!(listed.keys[0].status(), pb::KeyStatus::Revoked);
}

async fn deleted_key_stops_verifying_and_still_counts_in_total_keys(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (key, secret) = app.create("acme", preset(pb::ScopePreset::ReadOnly)).await;
    app.create("acme", preset(pb::ScopePreset::ReadOnly)).await;
    let mut c = app.client.clone();
    assert!(app.verify(&secret, &[], None).await.valid);
    c.delete_key(as_service(pb::DeleteKeyRequest { id: key.id.clone() }, "alice")).await.unwrap();
    assert_eq!(code_of(&app.verify(&secret, &[], None).await), pb::VerifyCode::NotFound);
    let err = c.get_key(as_service(pb::GetKeyRequest { id: key.id.clone() }, "alice")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c.delete_key(as_service(pb::DeleteKeyRequest { id: key.id.clone() }, "alice")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    app.usage.flush().await.unwrap();
    let stats = key_stats(&app, "acme").await;
    assert_eq!((stats.total_keys, stats.active_keys), (2, 1));
    assert_eq!(stats.api_calls_24h, 1, "the deleted key's call still counts");
}

async fn unknown_ids_are_not_found_and_empty_ids_invalid(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    for id in ["0000000000000000", "nope", "'; DROP TABLE api_keys; --"] {
        let e = c.get_key(as_service(pb::GetKeyRequest { id: id.into() }, "a")).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{id}");
        let e = c.revoke_key(as_service(pb::RevokeKeyRequest { id: id.into() }, "a")).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{id}");
        let e = c
            .set_key_status(as_service(
                pb::SetKeyStatusRequest { id: id.into(), status: pb::KeyStatus::Disabled as i32 },
                "a",
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{id}");
    }
    let e = c.get_key(as_service(pb::GetKeyRequest { id: String::new() }, "a")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // The message names the id asked for: verbatim when it is well-formed,
    // quoted and cut to an id's length when not.
    for (id, want) in [
        ("0000000000000000", "key 0000000000000000 not found"),
        ("nope", r#"key "nope" not found"#),
        ("nope-nope-nope-nope-nope", r#"key "nope-nope-nope-n" not found"#),
    ] {
        let e = c.get_key(as_service(pb::GetKeyRequest { id: id.into() }, "a")).await.unwrap_err();
        assert_eq!(e.message(), want);
    }
}

async fn verify_answers_every_denial_with_its_code(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (key, secret) = app.create("acme", preset(pb::ScopePreset::ReadOnly)).await;
    let ok = app.verify(&secret, &["fleet.read", "audit.read"], Some("acme")).await;
    assert!(ok.valid);
    assert_eq!(code_of(&ok), pb::VerifyCode::Valid);
    assert_eq!(
        (ok.key_id.as_str(), ok.organization_id.as_str(), ok.created_by.as_str()),
        (key.id.as_str(), "acme", "alice")
    );
    assert_eq!(ok.name, "cursor-dev");

    // One character changed in the checksum: a typo, caught without any lookup.
    let last = secret.chars().last().unwrap();
    let typo = format!("{}{}", &secret[..secret.len() - 1], if last == 'x' { 'y' } else { 'x' });
    for garbage in ["", "hello", "tk_live_short", &typo, &"A".repeat(100_000)] {
        let r = app.verify(garbage, &[], None).await;
        assert_eq!(code_of(&r), pb::VerifyCode::Malformed);
        assert!(!r.valid && r.key_id.is_empty() && r.scopes.is_empty());
    }
    // Right id, wrong secret, valid checksum: NOT_FOUND, revealing nothing.
    let wrong = keys::compose(Environment::Live, &key.id, &"w".repeat(keys::SECRET_LEN));
    let r = app.verify(wrong.expose(), &[], None).await;
    assert_eq!(code_of(&r), pb::VerifyCode::NotFound);
    assert!(r.key_id.is_empty() && r.organization_id.is_empty() && r.scopes.is_empty());
    let unknown = keys::generate(Environment::Live);
    assert_eq!(code_of(&app.verify(unknown.full.expose(), &[], None).await), pb::VerifyCode::NotFound);

    let r = app.verify(&secret, &["fleet.read", "fleet.manage", "billing.manage"], None).await;
    assert_eq!(code_of(&r), pb::VerifyCode::InsufficientScope);
    assert!(!r.valid);
    assert_eq!(r.missing_scopes, vec!["fleet.manage", "billing.manage"]);

    let r = app.verify(&secret, &[], Some("globex")).await;
    assert_eq!(code_of(&r), pb::VerifyCode::WrongOrganization);

    let err = app
        .client
        .clone()
        .verify_key(as_service(
            pb::VerifyKeyRequest {
                key: secret.clone(),
                required_scopes: vec!["fleet.fly".into()],
                organization_id: None,
            },
            "a",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("fleet.fly"));
    assert!(!err.message().contains(&secret[8..]), "errors never echo a presented key");
}

async fn expired_key_verifies_as_expired(b: Backend) {
    let app = TestApp::spawn(b).await;
    // Keys cannot be created already expired through the API, so the test
    // writes one through the library with the server's pepper.
    let hasher = Hasher::new(
        SecretString::new(PEPPER),
        HashParams { memory_kib: 256, iterations: 1, parallelism: 1 },
        Default::default(),
    )
    .unwrap();
    let (_, secret) = issue_key(
        &*app.store,
        &hasher,
        KeySpec {
            organization_id: "acme".into(),
            name: "old".into(),
            scopes: scopes::expand_preset(Preset::ReadOnly),
            created_by: "alice".into(),
            environment: Environment::Live,
            expires_at: Some(chrono::Utc::now() - chrono::Duration::seconds(1)),
            metadata: Default::default(),
        },
        &takumo_keys::domain::model::AuditContext::operator("alice"),
    )
    .await
    .unwrap();
    assert_eq!(code_of(&app.verify(secret.expose(), &[], None).await), pb::VerifyCode::Expired);
    let e = app.client.clone().list_scopes(with_bearer(pb::ListScopesRequest {}, secret.expose())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"));
}

async fn verifications_count_in_stats_and_last_used(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (key, secret) = app.create("acme", preset(pb::ScopePreset::ReadOnly)).await;
    let mut c = app.client.clone();
    let stats = key_stats(&app, "acme").await;
    assert_eq!((stats.api_calls_24h, stats.last_call_at), (0, None));
    for _ in 0..7 {
        assert!(app.verify(&secret, &[], None).await.valid);
    }
    app.verify("tk_live_garbage", &[], None).await;
    app.usage.flush().await.unwrap();
    let stats = key_stats(&app, "acme").await;
    assert_eq!(stats.api_calls_24h, 7);
    assert!(stats.last_call_at.is_some());
    let got = c.get_key(as_service(pb::GetKeyRequest { id: key.id }, "a")).await.unwrap().into_inner();
    assert_eq!(got.last_used_at, stats.last_call_at);
}

async fn shutdown_flushes_pending_usage(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (_, secret) = app.create("acme", preset(pb::ScopePreset::ReadOnly)).await;
    for _ in 0..5 {
        app.verify(&secret, &[], None).await;
    }
    let store = app.store.clone();
    let db = app.db.clone();
    app.shutdown().await;
    let stats = store.key_stats("acme", chrono::Utc::now()).await.unwrap();
    assert_eq!(stats.api_calls_24h, 5);
    drop(db);
}

async fn credentials_are_checked_before_anything_else(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    let req = || pb::ListScopesRequest {};
    let e = c.list_scopes(tonic::Request::new(req())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("authorization"));
    for token in ["not-a-real-token-but-long-enough-000000", "tk_live_bogus", ""] {
        let e = c.list_scopes(with_bearer(req(), token)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{token}");
    }
    let mut r = tonic::Request::new(req());
    r.metadata_mut().insert("authorization", format!("Basic {SERVICE_TOKEN}").parse().unwrap());
    assert_eq!(c.list_scopes(r).await.unwrap_err().code(), Code::Unauthenticated);
}

async fn api_key_callers_act_only_within_their_scopes_and_organization(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.set_plan("acme", pb::Plan::Pro).await;
    let mut c = app.client.clone();
    let (_, admin) = app.create_as("acme", "alice", preset(pb::ScopePreset::Organization)).await;
    let (_, workspace) = app.create_as("acme", "alice", preset(pb::ScopePreset::Workspace)).await;
    let (_, reader) = app.create_as("acme", "alice", preset(pb::ScopePreset::ReadOnly)).await;
    let (bobs, _) = app.create_as("acme", "bob", preset(pb::ScopePreset::ReadOnly)).await;
    let (foreign, foreign_secret) = app.create_as("globex", "gina", preset(pb::ScopePreset::Organization)).await;

    // Reading needs api_keys.read; an empty organization_id means the key's own.
    let listed = c.list_keys(with_bearer(pb::ListKeysRequest::default(), &reader)).await.unwrap().into_inner();
    assert_eq!(listed.keys.len(), 4);
    let (_, no_read) = app.create_as("acme", "alice", custom(&["fleet.read"])).await;
    let e = c.list_keys(with_bearer(pb::ListKeysRequest::default(), &no_read)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("api_keys.read"));
    // ListScopes needs authentication only.
    c.list_scopes(with_bearer(pb::ListScopesRequest {}, &no_read)).await.unwrap();

    // Another organization is invisible.
    let e = c.get_key(with_bearer(pb::GetKeyRequest { id: foreign.id.clone() }, &admin)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .list_keys(with_bearer(pb::ListKeysRequest { organization_id: "globex".into(), ..Default::default() }, &admin))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c.revoke_key(with_bearer(pb::RevokeKeyRequest { id: foreign.id.clone() }, &admin)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(app.verify(&foreign_secret, &[], None).await.valid, "the foreign key is untouched");

    // Service-only RPCs.
    let e = c
        .verify_key(with_bearer(pb::VerifyKeyRequest { key: reader.clone(), ..Default::default() }, &admin))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .set_organization_plan(with_bearer(
            pb::SetOrganizationPlanRequest { organization_id: "acme".into(), plan: pb::Plan::Enterprise as i32 },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // No escalation: a workspace key cannot mint an organization key.
    let e = c
        .create_key(with_bearer(create_req("", "esc", preset(pb::ScopePreset::Organization)), &workspace))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("api_keys.manage_all"));
    let made = c
        .create_key(with_bearer(create_req("", "sub", preset(pb::ScopePreset::ReadOnly)), &workspace))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(made.key.unwrap().created_by, "alice", "created_by is the member behind the calling key");

    // Managing another member's key needs api_keys.manage_all.
    let e = c.revoke_key(with_bearer(pb::RevokeKeyRequest { id: bobs.id.clone() }, &workspace)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    c.set_key_status(with_bearer(
        pb::SetKeyStatusRequest { id: bobs.id.clone(), status: pb::KeyStatus::Disabled as i32 },
        &admin,
    ))
    .await
    .unwrap();

    // A disabled key is refused at once, and cannot re-enable itself.
    let (me, me_secret) = app.create_as("acme", "alice", preset(pb::ScopePreset::Workspace)).await;
    c.set_key_status(with_bearer(
        pb::SetKeyStatusRequest { id: me.id.clone(), status: pb::KeyStatus::Disabled as i32 },
        &me_secret,
    ))
    .await
    .unwrap();
    let e = c
        .set_key_status(with_bearer(
            pb::SetKeyStatusRequest { id: me.id.clone(), status: pb::KeyStatus::Active as i32 },
            &me_secret,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("disabled"));
}

async fn set_organization_plan_reports_the_limit(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    for (plan, limit) in
        [(pb::Plan::Free, 3), (pb::Plan::Developer, 10), (pb::Plan::Pro, 20), (pb::Plan::Enterprise, 0)]
    {
        let org = c
            .set_organization_plan(as_service(
                pb::SetOrganizationPlanRequest { organization_id: "acme".into(), plan: plan as i32 },
                "b",
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((org.id.as_str(), org.plan(), org.key_limit), ("acme", plan, limit));
    }
    let e = c
        .set_organization_plan(as_service(
            pb::SetOrganizationPlanRequest { organization_id: "acme".into(), plan: 0 },
            "b",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

async fn health_and_reflection_need_no_credentials(b: Backend) {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let app = TestApp::spawn(b).await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", app.addr)).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "takumo.apikeys.v1.ApiKeyService"] {
        let r = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
    }
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl.server_reflection_info(futures::stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("no list") };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"takumo.apikeys.v1.ApiKeyService".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
}

async fn secrets_are_stored_only_as_peppered_argon2id_hashes(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (key, secret) = app.create("acme", preset(pb::ScopePreset::ReadOnly)).await;
    let (_, stored) = app.store.get_key_with_hash(&key.id).await.unwrap().unwrap();
    let phc = stored.phc;
    assert!(phc.starts_with("$argon2id$"));
    assert!(!phc.contains(&secret[24..56]) && !phc.contains(PEPPER));
    // Peppered: the same parameters without the pepper do not verify it.
    use argon2::{PasswordHash, PasswordVerifier};
    let parsed = PasswordHash::new(&phc).unwrap();
    assert!(
        argon2::Argon2::default().verify_password(secret.as_bytes(), &parsed).is_err(),
        "verifies without the pepper"
    );
    let peppered = argon2::Argon2::new_with_secret(
        PEPPER.as_bytes(),
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::try_from(&parsed).unwrap(),
    )
    .unwrap();
    assert!(peppered.verify_password(secret.as_bytes(), &parsed).is_ok(), "verifies with it");
}

async fn request_limits_are_enforced_with_clear_statuses(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    let huge = create_req("acme", &"n".repeat(1 << 20), preset(pb::ScopePreset::ReadOnly));
    let e = c.create_key(as_service(huge, "alice")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    let many: Vec<String> = (0..101).map(|i| format!("fleet.read{i}")).collect();
    let req = pb::CreateKeyRequest {
        scopes: Some(Scopes::Custom(pb::ScopeList { scopes: many.clone() })),
        ..create_req("acme", "k", None)
    };
    let e = c.create_key(as_service(req, "alice")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("at most 100"), "{}", e.message());
    let e = c
        .verify_key(as_service(
            pb::VerifyKeyRequest { key: "tk_live_x".into(), required_scopes: many, organization_id: None },
            "a",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // The server is fine afterwards.
    c.list_scopes(as_service(pb::ListScopesRequest {}, "a")).await.unwrap();
}

async fn audit_log_records_who_did_what_and_exports_it(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    let mut req = as_service(create_req("acme", "ci", preset(pb::ScopePreset::Organization)), "alice");
    req.metadata_mut().insert("x-request-id", "req-42".parse().unwrap());
    let created = c.create_key(req).await.unwrap().into_inner();
    let (key, secret) = (created.key.unwrap(), created.secret);
    c.set_key_status(with_bearer(
        pb::SetKeyStatusRequest { id: key.id.clone(), status: pb::KeyStatus::Disabled as i32 },
        &secret,
    ))
    .await
    .unwrap();
    app.set_plan("acme", pb::Plan::Pro).await;
    let (_, reader) = app.create_as("acme", "bob", custom(&["audit.read"])).await;

    let page = c
        .list_audit_events(with_bearer(pb::ListAuditEventsRequest { page_size: 2, ..Default::default() }, &reader))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 2);
    assert!(!page.next_page_token.is_empty());
    let rest = c
        .list_audit_events(with_bearer(
            pb::ListAuditEventsRequest { page_token: page.next_page_token.clone(), page_size: 2, ..Default::default() },
            &reader,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (rest.events.len(), rest.next_page_token.as_str()),
        (2, ""),
        "a last page that is exactly full has no next page token"
    );
    let all: Vec<pb::AuditEvent> = page.events.into_iter().chain(rest.events).collect();
    let actions: Vec<pb::AuditAction> = all.iter().map(|e| e.action()).collect();
    assert_eq!(
        actions,
        vec![
            pb::AuditAction::KeyCreated,
            pb::AuditAction::PlanChanged,
            pb::AuditAction::KeyStatusChanged,
            pb::AuditAction::KeyCreated
        ]
    );
    let toggled = &all[2];
    assert_eq!(toggled.principal, format!("key:{}", key.id));
    assert_eq!((toggled.actor.as_str(), toggled.key_prefix.as_str()), ("alice", key.prefix.as_str()));
    assert_eq!((toggled.status_before(), toggled.status_after()), (pb::KeyStatus::Active, pb::KeyStatus::Disabled));
    assert!(toggled.peer.starts_with("127.0.0.1:"));
    let first = &all[3];
    assert_eq!((first.request_id.as_str(), first.principal.as_str()), ("req-42", "service:dashboard"));
    for e in &all {
        assert!(!format!("{e:?}").contains(&secret[24..56]), "no secret in the audit log");
    }

    // Export streams the same events; the reader lacks audit.export.
    let e = c.export_audit_events(with_bearer(pb::ExportAuditEventsRequest::default(), &reader)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut stream = c
        .export_audit_events(as_service(
            pb::ExportAuditEventsRequest { organization_id: "acme".into(), ..Default::default() },
            "a",
        ))
        .await
        .unwrap()
        .into_inner();
    let exported = common::read_to_end(&mut stream).await.unwrap();
    assert_eq!(exported, all);
}

/// Toggles `id` `n` times (2 audit events per round), as the dashboard.
async fn toggle(c: &mut common::Client, id: &str, rounds: usize) {
    for _ in 0..rounds {
        for status in [pb::KeyStatus::Disabled, pb::KeyStatus::Active] {
            c.set_key_status(as_service(pb::SetKeyStatusRequest { id: id.into(), status: status as i32 }, "alice"))
                .await
                .unwrap();
        }
    }
}

fn ts(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

async fn export(c: &mut common::Client, req: pb::ExportAuditEventsRequest) -> Vec<pb::AuditEvent> {
    let mut stream = c.export_audit_events(as_service(req, "a")).await.unwrap().into_inner();
    common::read_to_end(&mut stream).await.unwrap()
}

async fn audit_queries_honour_since_until_and_action_through_the_rpc(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    let (key, _) = app.create("acme", custom(&["fleet.read"])).await;
    toggle(&mut c, &key.id, 2).await; // 4 status events before the mark
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let mark = chrono::Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    toggle(&mut c, &key.id, 1).await; // 2 after it
    c.revoke_key(as_service(pb::RevokeKeyRequest { id: key.id.clone() }, "alice")).await.unwrap();

    let list = |since: Option<prost_types::Timestamp>, until: Option<prost_types::Timestamp>, action: Option<i32>| {
        let mut c = c.clone();
        async move {
            c.list_audit_events(as_service(
                pb::ListAuditEventsRequest {
                    organization_id: "acme".into(),
                    since,
                    until,
                    action,
                    page_size: 500,
                    ..Default::default()
                },
                "a",
            ))
            .await
            .unwrap()
            .into_inner()
            .events
        }
    };
    assert_eq!(list(None, None, None).await.len(), 8, "create + 6 toggles + revoke");
    assert_eq!(list(Some(ts(mark)), None, None).await.len(), 3, "since: the 2 later toggles and the revoke");
    assert_eq!(list(None, Some(ts(mark)), None).await.len(), 5, "until: the create and 4 toggles");
    let revoked = list(None, None, Some(pb::AuditAction::KeyRevoked as i32)).await;
    assert_eq!(revoked.iter().map(|e| e.action()).collect::<Vec<_>>(), vec![pb::AuditAction::KeyRevoked]);

    let bounded = |since, until| pb::ExportAuditEventsRequest { organization_id: "acme".into(), since, until };
    assert_eq!(export(&mut c, bounded(Some(ts(mark)), None)).await.len(), 3);
    assert_eq!(export(&mut c, bounded(None, Some(ts(mark)))).await.len(), 5);

    // A page token this service did not issue is refused, never read as "from the top".
    for token in ["garbage", "YXVkaXQuYWJj", "a2V5LjEyMw"] {
        let e = c
            .list_audit_events(as_service(
                pb::ListAuditEventsRequest {
                    organization_id: "acme".into(),
                    page_token: token.into(),
                    ..Default::default()
                },
                "a",
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{token}: {}", e.message());
    }
}

async fn export_streams_every_event_past_one_batch(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    let (key, _) = app.create("acme", custom(&["fleet.read"])).await;
    toggle(&mut c, &key.id, 260).await; // 520 status events + the create: more than one 500-row batch
    let all =
        export(&mut c, pb::ExportAuditEventsRequest { organization_id: "acme".into(), ..Default::default() }).await;
    assert_eq!(all.len(), 521);
    let mut ids: Vec<i64> = all.iter().map(|e| e.id.parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first, no repeats");
    ids.dedup();
    assert_eq!(ids.len(), 521);
}

async fn list_keys_filters_by_status_and_pages_by_fifty(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.set_plan("acme", pb::Plan::Enterprise).await;
    let mut c = app.client.clone();
    let mut ids = vec![];
    for _ in 0..51 {
        ids.push(app.create("acme", custom(&["fleet.read"])).await.0.id);
    }
    c.set_key_status(as_service(
        pb::SetKeyStatusRequest { id: ids[7].clone(), status: pb::KeyStatus::Disabled as i32 },
        "a",
    ))
    .await
    .unwrap();
    let list = |status: Option<pb::KeyStatus>, page_token: String| {
        let mut c = c.clone();
        async move {
            c.list_keys(as_service(
                pb::ListKeysRequest {
                    organization_id: "acme".into(),
                    status: status.map(|s| s as i32),
                    page_token,
                    ..Default::default()
                },
                "a",
            ))
            .await
            .unwrap()
            .into_inner()
        }
    };
    let first = list(None, String::new()).await;
    assert_eq!(first.keys.len(), 50, "the default page size is 50");
    let rest = list(None, first.next_page_token).await;
    assert_eq!((rest.keys.len(), rest.next_page_token.as_str()), (1, ""));
    let disabled = list(Some(pb::KeyStatus::Disabled), String::new()).await;
    assert_eq!(disabled.keys.iter().map(|k| k.id.clone()).collect::<Vec<_>>(), vec![ids[7].clone()]);
    let active = list(Some(pb::KeyStatus::Active), String::new()).await;
    assert_eq!(
        (active.keys.len(), active.next_page_token.as_str()),
        (50, ""),
        "a last page that is exactly full has no next page token"
    );
}

async fn set_organization_plan_refuses_an_invalid_organization_id(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    for org in ["", "has space", &"o".repeat(65), "ctl\u{7}"] {
        let e = c
            .set_organization_plan(as_service(
                pb::SetOrganizationPlanRequest { organization_id: org.into(), plan: pb::Plan::Pro as i32 },
                "billing",
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{org:?}: {}", e.message());
    }
}

async fn a_caller_is_authenticated_before_its_request_is_validated(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    // Invalid in every field: still UNAUTHENTICATED for a caller with no credential.
    let bad = pb::CreateKeyRequest {
        organization_id: "has space".into(),
        name: String::new(),
        scopes: None,
        ..Default::default()
    };
    for req in [tonic::Request::new(bad.clone()), with_bearer(bad.clone(), "tk_live_bogus")] {
        let e = c.create_key(req).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    }
    let e = c
        .set_key_status(tonic::Request::new(pb::SetKeyStatusRequest { id: String::new(), status: 99 }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
}

async fn a_downgrade_blocks_the_next_create(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.set_plan("acme", pb::Plan::Developer).await;
    for _ in 0..4 {
        app.create("acme", custom(&["fleet.read"])).await;
    }
    app.set_plan("acme", pb::Plan::Free).await;
    let e = app
        .client
        .clone()
        .create_key(as_service(create_req("acme", "fifth", custom(&["fleet.read"])), "alice"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert_eq!(key_stats(&app, "acme").await.keys_counted, 4, "existing keys are kept");
}

async fn metadata_is_stored_listed_and_returned_by_verify(b: Backend) {
    let app = TestApp::spawn(b).await;
    let metadata: std::collections::HashMap<String, String> =
        [("tenant".to_string(), "acme-eu".to_string()), ("plan.tier".to_string(), "pro".to_string())].into();
    let req = pb::CreateKeyRequest {
        metadata: metadata.clone(),
        ..create_req("acme", "gateway", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32)))
    };
    let created = app.client.clone().create_key(as_service(req, "alice")).await.unwrap().into_inner();
    let key = created.key.unwrap();
    assert_eq!(key.metadata, metadata);
    let got = app.client.clone().get_key(as_service(pb::GetKeyRequest { id: key.id.clone() }, "a")).await.unwrap();
    assert_eq!(got.into_inner().metadata, metadata);
    let listed = app
        .client
        .clone()
        .list_keys(as_service(pb::ListKeysRequest { organization_id: "acme".into(), ..Default::default() }, "a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys[0].metadata, metadata);
    // Cold (store read and argon2), then warm (from the cache): the same labels.
    for _ in 0..2 {
        let v = app.verify(&created.secret, &[], None).await;
        assert!(v.valid);
        assert_eq!(v.metadata, metadata);
    }
    // A refused key still names itself, labels included; a malformed one says nothing.
    assert_eq!(app.verify(&created.secret, &["audit.export"], None).await.metadata, metadata);
    assert!(app.verify("tk_live_garbage", &[], None).await.metadata.is_empty());
}

async fn invalid_metadata_is_invalid_argument_naming_the_entry_and_creates_nothing(b: Backend) {
    let app = TestApp::spawn(b).await;
    let cases: Vec<(Vec<(String, String)>, &str)> = vec![
        (vec![("Tenant".into(), "x".into())], "\"Tenant\""),
        (vec![("k".into(), "v".repeat(257))], "metadata[\"k\"]"),
        (vec![("k".into(), "line\nbreak".into())], "metadata[\"k\"]"),
        ((0..17).map(|i| (format!("k{i}"), "v".into())).collect(), "17 entries"),
        ((0..16).map(|i| (format!("{i:0>64}"), "v".repeat(200))).collect(), "4096"),
    ];
    for (entries, named) in cases {
        let req = pb::CreateKeyRequest {
            metadata: entries.into_iter().collect(),
            ..create_req("acme", "k", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32)))
        };
        let e = app.client.clone().create_key(as_service(req, "alice")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(named), "{named} not in {:?}", e.message());
    }
    assert_eq!(key_stats(&app, "acme").await.total_keys, 0, "a refused create created a key");
}

fn update_req(key: pb::ApiKey, paths: &[&str]) -> pb::UpdateKeyRequest {
    pb::UpdateKeyRequest {
        key: Some(key),
        update_mask: Some(prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() }),
    }
}

async fn update_key_changes_only_the_masked_fields_and_is_audited(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (key, secret) = app.create("acme", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32))).await;
    assert!(app.verify(&secret, &[], None).await.valid, "warm the cache");
    let labels: std::collections::HashMap<String, String> = [("tenant".to_string(), "acme-eu".to_string())].into();
    let in_a_day = prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() + 86_400, nanos: 0 };
    let change = pb::ApiKey {
        id: key.id.clone(),
        name: "renamed".into(),
        metadata: labels.clone(),
        expires_at: Some(in_a_day),
        // Not in the mask: ignored.
        scopes: vec!["audit.export".into()],
        ..Default::default()
    };
    let mut c = app.client.clone();
    let updated = c
        .update_key(as_service(update_req(change, &["name", "metadata", "expires_at"]), "alice"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((updated.name.as_str(), &updated.metadata), ("renamed", &labels));
    assert_eq!(updated.expires_at.map(|t| t.seconds), Some(in_a_day.seconds));
    assert_eq!(updated.scopes, key.scopes, "a field outside the mask is left alone");
    // The cached record follows at once on this replica.
    assert_eq!(app.verify(&secret, &[], None).await.metadata, labels);

    // Metadata is replaced whole; an absent expires_at in the mask clears it.
    let change = pb::ApiKey { id: key.id.clone(), ..Default::default() };
    let cleared =
        c.update_key(as_service(update_req(change, &["metadata", "expires_at"]), "alice")).await.unwrap().into_inner();
    assert!(cleared.metadata.is_empty() && cleared.expires_at.is_none());
    assert_eq!(cleared.name, "renamed");

    let events = events_of(&app, pb::AuditAction::KeyUpdated).await;
    let details: Vec<&str> = events.iter().map(|e| e.detail.as_str()).collect();
    assert_eq!(details, ["changed: metadata, expires_at", "changed: name, metadata, expires_at"]);
    assert!(!events.iter().any(|e| e.detail.contains("acme-eu")), "a metadata value reached the audit log");
}

async fn update_key_refuses_bad_masks_and_values_naming_them(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (key, _) = app.create("acme", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32))).await;
    let mut c = app.client.clone();
    let with = |f: &dyn Fn(&mut pb::ApiKey)| {
        let mut k = pb::ApiKey { id: key.id.clone(), name: "ok".into(), ..Default::default() };
        f(&mut k);
        k
    };
    let past = prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() - 60, nanos: 0 };
    let cases: Vec<(pb::UpdateKeyRequest, &str)> = vec![
        (pb::UpdateKeyRequest { key: None, update_mask: None }, "key is required"),
        (update_req(with(&|_| {}), &[]), "update_mask is required"),
        (update_req(with(&|_| {}), &["scopes"]), "\"scopes\""),
        (update_req(with(&|_| {}), &["name", "status"]), "\"status\""),
        (update_req(with(&|k| k.name = String::new()), &["name"]), "key.name"),
        (
            update_req(
                with(&|k: &mut pb::ApiKey| k.metadata = [("Bad Key".to_string(), "v".to_string())].into()),
                &["metadata"],
            ),
            "\"Bad Key\"",
        ),
        (update_req(with(&|k| k.expires_at = Some(past)), &["expires_at"]), "key.expires_at"),
    ];
    for (req, named) in cases {
        let e = c.update_key(as_service(req, "alice")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(named), "{named} not in {:?}", e.message());
    }
    let unknown = pb::ApiKey { id: "0123456789ABCDEF".into(), name: "x".into(), ..Default::default() };
    let e = c.update_key(as_service(update_req(unknown, &["name"]), "alice")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let got = c.get_key(as_service(pb::GetKeyRequest { id: key.id.clone() }, "a")).await.unwrap().into_inner();
    assert_eq!(got, key, "a refused update changed the key");
}

async fn an_api_key_cannot_extend_a_key_past_its_own_expiry(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.set_plan("acme", pb::Plan::Enterprise).await;
    let own_expiry = chrono::Utc::now().timestamp() + 3_600;
    let req = pb::CreateKeyRequest {
        expires_at: Some(prost_types::Timestamp { seconds: own_expiry, nanos: 0 }),
        ..create_req("acme", "admin", Some(Scopes::Preset(pb::ScopePreset::Organization as i32)))
    };
    let admin = app.client.clone().create_key(as_service(req, "alice")).await.unwrap().into_inner().secret;
    let (target, _) = app.create("acme", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32))).await;
    let mut c = app.client.clone();
    let later = pb::ApiKey {
        id: target.id.clone(),
        expires_at: Some(prost_types::Timestamp { seconds: own_expiry + 60, nanos: 0 }),
        ..Default::default()
    };
    let e = c.update_key(with_bearer(update_req(later, &["expires_at"]), &admin)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    // Clearing the expiry gives the target the caller's own instead.
    let clear = pb::ApiKey { id: target.id.clone(), ..Default::default() };
    let k = c.update_key(with_bearer(update_req(clear, &["expires_at"]), &admin)).await.unwrap().into_inner();
    assert_eq!(k.expires_at.map(|t| t.seconds), Some(own_expiry));
}

fn roll_req(id: &str, grace_seconds: Option<i64>) -> pb::RollKeyRequest {
    pb::RollKeyRequest {
        id: id.into(),
        grace_period: grace_seconds.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
    }
}

async fn roll_key_issues_a_linked_copy_and_keeps_the_old_key_for_its_grace(b: Backend) {
    let app = TestApp::spawn(b).await;
    let labels: std::collections::HashMap<String, String> = [("tenant".to_string(), "eu".to_string())].into();
    let in_a_day = prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() + 86_400, nanos: 0 };
    let req = pb::CreateKeyRequest {
        metadata: labels.clone(),
        expires_at: Some(in_a_day),
        ..create_req("acme", "ci", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32)))
    };
    let created = app.client.clone().create_key(as_service(req, "alice")).await.unwrap().into_inner();
    let old = created.key.unwrap();
    let mut c = app.client.clone();
    let r = c.roll_key(as_service(roll_req(&old.id, Some(3_600)), "bob")).await.unwrap().into_inner();
    let (new, previous) = (r.key.unwrap(), r.previous.unwrap());
    assert_ne!(new.id, old.id);
    assert!(r.secret.starts_with(&new.prefix) && r.secret != created.secret);
    assert_eq!((new.rotated_from.as_str(), previous.rotated_to.as_str()), (old.id.as_str(), new.id.as_str()));
    assert_eq!(
        (&new.name, &new.scopes, &new.metadata, new.environment, new.expires_at),
        (&old.name, &old.scopes, &old.metadata, old.environment, old.expires_at)
    );
    assert_eq!(new.created_by, "alice", "the key keeps its creator");
    // The old key works until an hour from now (sooner than its own expiry).
    let until = previous.expires_at.unwrap().seconds - chrono::Utc::now().timestamp();
    assert!((3_500..=3_600).contains(&until), "previous key expires in {until} s");
    assert_eq!(previous.status, pb::KeyStatus::Active as i32);
    assert!(app.verify(&created.secret, &[], None).await.valid, "the old key works during its grace");
    let v = app.verify(&r.secret, &[], None).await;
    assert!(v.valid && v.metadata == labels, "{v:?}");

    let events = events_of(&app, pb::AuditAction::KeyRolled).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].key_id, new.id);
    assert!(events[0].detail.contains(&old.id) && events[0].detail.contains("works until"), "{}", events[0].detail);
}

async fn roll_key_without_grace_revokes_the_old_key_at_once(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (old, secret) = app.create("acme", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32))).await;
    assert!(app.verify(&secret, &[], None).await.valid, "cached before the roll");
    for grace in [None, Some(0)] {
        let (old, secret) = if grace.is_none() {
            (old.clone(), secret.clone())
        } else {
            app.create("acme", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32))).await
        };
        let r = app.client.clone().roll_key(as_service(roll_req(&old.id, grace), "alice")).await.unwrap().into_inner();
        assert_eq!(r.previous.unwrap().status, pb::KeyStatus::Revoked as i32);
        assert_eq!(app.verify(&secret, &[], None).await.code(), pb::VerifyCode::Revoked);
        assert!(app.verify(&r.secret, &[], None).await.valid);
    }
}

async fn roll_key_is_never_blocked_by_the_plan_limit(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut ids = vec![];
    for _ in 0..3 {
        ids.push(app.create("acme", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32))).await.0.id);
    }
    let mut c = app.client.clone();
    let ro = Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32));
    let e = c.create_key(as_service(create_req("acme", "fourth", ro), "alice")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "Free allows 3");
    let r = c.roll_key(as_service(roll_req(&ids[0], Some(60)), "alice")).await.unwrap().into_inner();
    assert!(app.verify(&r.secret, &[], None).await.valid);
    // While both live, both count: 4 of 3, and creates stay refused.
    assert_eq!(key_stats(&app, "acme").await.keys_counted, 4);
    let e = c
        .create_key(as_service(
            create_req("acme", "fifth", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32))),
            "alice",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
}

async fn only_an_active_key_without_a_successor_rolls(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.set_plan("acme", pb::Plan::Enterprise).await;
    let ro = || Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32));
    let (k, _) = app.create("acme", ro()).await;
    let mut c = app.client.clone();
    let r = c.roll_key(as_service(roll_req(&k.id, Some(60)), "alice")).await.unwrap().into_inner();
    let e = c.roll_key(as_service(roll_req(&k.id, Some(60)), "alice")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains(&r.key.unwrap().id), "the refusal names the successor: {}", e.message());

    let (disabled, _) = app.create("acme", ro()).await;
    c.set_key_status(as_service(
        pb::SetKeyStatusRequest { id: disabled.id.clone(), status: pb::KeyStatus::Disabled as i32 },
        "alice",
    ))
    .await
    .unwrap();
    let e = c.roll_key(as_service(roll_req(&disabled.id, None), "alice")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let e = c.roll_key(as_service(roll_req("0123456789ABCDEF", None), "alice")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let (fresh, _) = app.create("acme", ro()).await;
    let bad = [
        prost_types::Duration { seconds: 7 * 86_400 + 1, nanos: 0 },
        prost_types::Duration { seconds: -1, nanos: 0 },
        prost_types::Duration { seconds: 1, nanos: 1_000_000_000 },
        prost_types::Duration { seconds: 1, nanos: -5 },
        prost_types::Duration { seconds: i64::MAX, nanos: 0 },
    ];
    for d in bad {
        let req = pb::RollKeyRequest { id: fresh.id.clone(), grace_period: Some(d) };
        let e = c.roll_key(as_service(req, "alice")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{d:?}: {}", e.message());
        assert!(e.message().contains("grace_period"), "{}", e.message());
    }
    let req = pb::RollKeyRequest {
        id: fresh.id.clone(),
        grace_period: Some(prost_types::Duration { seconds: 7 * 86_400, nanos: 0 }),
    };
    c.roll_key(as_service(req, "alice")).await.expect("exactly 7 days is allowed");
}

fn leak(key: &str, url: &str) -> pb::LeakedKey {
    pb::LeakedKey { key: key.into(), source_url: url.into(), source: "github".into() }
}

/// The audit events of organization `acme` with `action`, newest first.
async fn events_of(app: &TestApp, action: pb::AuditAction) -> Vec<pb::AuditEvent> {
    app.client
        .clone()
        .list_audit_events(as_service(
            pb::ListAuditEventsRequest {
                organization_id: "acme".into(),
                action: Some(action as i32),
                ..Default::default()
            },
            "a",
        ))
        .await
        .unwrap()
        .into_inner()
        .events
}

async fn leaked_keys_are_revoked_once_per_source_and_false_positives_change_nothing(b: Backend) {
    use takumo_keys::domain::{keys, model::Environment};
    let app = TestApp::spawn(b).await;
    let ro = || Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32));
    let (leaked, leaked_secret) = app.create("acme", ro()).await;
    let (kept, kept_secret) = app.create("acme", ro()).await;
    assert!(app.verify(&leaked_secret, &[], None).await.valid, "cached before the report");
    let wrong_secret = keys::compose(Environment::Live, &kept.id, &"x".repeat(keys::SECRET_LEN));
    let unknown = keys::compose(Environment::Live, "0123456789ABCDEF", &"y".repeat(keys::SECRET_LEN));
    let url = "https://github.com/acme/app/blob/abc123/.env";
    let report = |leaks: Vec<pb::LeakedKey>| {
        let mut c = app.client.clone();
        async move {
            c.report_leaked_keys(as_service(pb::ReportLeakedKeysRequest { leaks }, "scanner"))
                .await
                .unwrap()
                .into_inner()
                .verdicts
        }
    };
    let verdicts = report(vec![
        leak("tk_live_not-a-key", url),
        leak(&leaked_secret, url),
        leak(wrong_secret.expose(), url),
        leak(unknown.expose(), url),
    ])
    .await;
    let got: Vec<(bool, &str, &str)> =
        verdicts.iter().map(|v| (v.true_positive, v.key_id.as_str(), v.prefix.as_str())).collect();
    assert_eq!(
        got,
        [(false, "", ""), (true, leaked.id.as_str(), leaked.prefix.as_str()), (false, "", ""), (false, "", "")]
    );
    assert_eq!(app.verify(&leaked_secret, &[], None).await.code(), pb::VerifyCode::Revoked, "revoked, cache included");
    assert!(app.verify(&kept_secret, &[], None).await.valid, "a wrong secret for a real id changes nothing");

    // Again from the same place: nothing new. From another place: audited, nothing more to do.
    assert!(report(vec![leak(&leaked_secret, url)]).await[0].true_positive);
    assert_eq!(events_of(&app, pb::AuditAction::KeyLeaked).await.len(), 1);
    report(vec![leak(&leaked_secret, "https://gist.github.com/x")]).await;
    let events = events_of(&app, pb::AuditAction::KeyLeaked).await;
    assert_eq!(events.len(), 2);
    assert!(events[1].detail.contains(url) && events[1].detail.contains("revoked"), "{}", events[1].detail);
    assert!(events[0].detail.contains("already revoked"), "{}", events[0].detail);
    assert!(events.iter().all(|e| !e.detail.contains(&leaked_secret[8..])), "the key reached the audit log");
}

async fn leak_reports_are_bounded_and_checked(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    let many = pb::ReportLeakedKeysRequest { leaks: (0..1_001).map(|_| leak("x", "https://example.com")).collect() };
    let e = c.report_leaked_keys(as_service(many, "scanner")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("1000"), "{}", e.message());
    let bad =
        pb::ReportLeakedKeysRequest { leaks: vec![leak("x", "https://example.com"), leak("x", "a\nforged log line")] };
    let e = c.report_leaked_keys(as_service(bad, "scanner")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("leaks[1].source_url"), "{}", e.message());
    let ok =
        pb::ReportLeakedKeysRequest { leaks: (0..1_000).map(|_| leak("tk_live_x", "https://example.com")).collect() };
    let verdicts = c.report_leaked_keys(as_service(ok, "scanner")).await.unwrap().into_inner().verdicts;
    assert_eq!(verdicts.len(), 1_000);
}

async fn the_leak_action_can_disable_or_only_report(b: Backend) {
    use takumo_keys::domain::model::LeakAction;
    for (action, want) in [(LeakAction::Disable, pb::VerifyCode::Disabled), (LeakAction::Report, pb::VerifyCode::Valid)]
    {
        let db = std::sync::Arc::new(common::TestDb::new(b).await);
        let app = TestApp::spawn_on(db, |url| {
            let mut a = common::serve_args(url);
            a.leak_action = action;
            a
        })
        .await;
        let (_, secret) = app.create("acme", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32))).await;
        let req = pb::ReportLeakedKeysRequest { leaks: vec![leak(&secret, "https://example.com/p")] };
        let v = app.client.clone().report_leaked_keys(as_service(req, "support")).await.unwrap().into_inner();
        assert!(v.verdicts[0].true_positive);
        assert_eq!(app.verify(&secret, &[], None).await.code(), want, "{action:?}");
        assert_eq!(events_of(&app, pb::AuditAction::KeyLeaked).await.len(), 1, "{action:?} is audited");
    }
}

for_each_backend!(
    leaked_keys_are_revoked_once_per_source_and_false_positives_change_nothing,
    leak_reports_are_bounded_and_checked,
    the_leak_action_can_disable_or_only_report,
    roll_key_issues_a_linked_copy_and_keeps_the_old_key_for_its_grace,
    roll_key_without_grace_revokes_the_old_key_at_once,
    roll_key_is_never_blocked_by_the_plan_limit,
    only_an_active_key_without_a_successor_rolls,
    update_key_changes_only_the_masked_fields_and_is_audited,
    update_key_refuses_bad_masks_and_values_naming_them,
    an_api_key_cannot_extend_a_key_past_its_own_expiry,
    metadata_is_stored_listed_and_returned_by_verify,
    invalid_metadata_is_invalid_argument_naming_the_entry_and_creates_nothing,
    audit_queries_honour_since_until_and_action_through_the_rpc,
    export_streams_every_event_past_one_batch,
    list_keys_filters_by_status_and_pages_by_fifty,
    set_organization_plan_refuses_an_invalid_organization_id,
    a_caller_is_authenticated_before_its_request_is_validated,
    a_downgrade_blocks_the_next_create,
    audit_log_records_who_did_what_and_exports_it,
    request_limits_are_enforced_with_clear_statuses,
    secret_is_returned_once_and_never_again,
    presets_expand_to_the_catalogs_sets,
    invalid_create_requests_are_invalid_argument,
    test_environment_keys_carry_the_test_prefix,
    over_the_plan_limit_create_is_resource_exhausted,
    fifty_concurrent_creates_on_free_yield_exactly_three_keys,
    list_pages_across_pages_newest_first,
    toggling_status_is_idempotent_and_revoked_key_cannot_be_reenabled,
    deleted_key_stops_verifying_and_still_counts_in_total_keys,
    unknown_ids_are_not_found_and_empty_ids_invalid,
    verify_answers_every_denial_with_its_code,
    expired_key_verifies_as_expired,
    verifications_count_in_stats_and_last_used,
    shutdown_flushes_pending_usage,
    credentials_are_checked_before_anything_else,
    api_key_callers_act_only_within_their_scopes_and_organization,
    set_organization_plan_reports_the_limit,
    health_and_reflection_need_no_credentials,
    secrets_are_stored_only_as_peppered_argon2id_hashes,
);
