//! Privilege paths found from outside: a weaker key re-enabling a stronger
//! one, test keys reaching live keys, keys outliving the key that made them,
//! and the input edges (empty organization, far-off timestamps, pasted keys
//! in messages, invisible characters, oversized metadata, file modes, what
//! counts as an API call). Each runs on both backends where storage is
//! involved.

use crate::common;

use common::{Backend, TestApp, TestDb, as_service, with_bearer};
use prost_types::Timestamp;
use std::sync::Arc;
use takumo_keys::proto::pb::{self, create_key_request::Scopes};
use tonic::Code;

type Client = common::Client;

fn ts(seconds: i64) -> Timestamp {
    Timestamp { seconds, nanos: 0 }
}

fn now_plus(secs: i64) -> Timestamp {
    ts(chrono::Utc::now().timestamp() + secs)
}

async fn enterprise(c: &mut Client, org: &str) {
    common::set_plan(c, org, pb::Plan::Enterprise).await
}

/// A key for alice in acme, created by the dashboard (a service token).
async fn service_key(
    c: &mut Client,
    scopes: Scopes,
    environment: pb::Environment,
    expires_at: Option<Timestamp>,
) -> (pb::ApiKey, String) {
    let req = pb::CreateKeyRequest {
        organization_id: "acme".into(),
        name: "k".into(),
        scopes: Some(scopes),
        environment: environment as i32,
        expires_at,
        ..Default::default()
    };
    let r = c.create_key(as_service(req, "alice")).await.unwrap().into_inner();
    (r.key.unwrap(), r.secret)
}

fn custom(scopes: &[&str]) -> Scopes {
    Scopes::Custom(pb::ScopeList { scopes: scopes.iter().map(|s| s.to_string()).collect() })
}

fn organization() -> Scopes {
    Scopes::Preset(pb::ScopePreset::Organization as i32)
}

fn set_status(id: &str, status: pb::KeyStatus) -> pb::SetKeyStatusRequest {
    pb::SetKeyStatusRequest { id: id.into(), status: status as i32 }
}

async fn a_weaker_key_cannot_re_enable_a_stronger_one(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    enterprise(&mut c, "acme").await;
    let (strong, _) = service_key(&mut c, organization(), pb::Environment::Live, None).await;
    let (_, weak) =
        service_key(&mut c, custom(&["api_keys.read", "api_keys.revoke"]), pb::Environment::Live, None).await;
    let (weaker, _) = service_key(&mut c, custom(&["api_keys.read"]), pb::Environment::Live, None).await;
    for id in [&strong.id, &weaker.id] {
        c.set_key_status(as_service(set_status(id, pb::KeyStatus::Disabled), "admin")).await.unwrap();
    }

    // Disabling takes power away, so the weak key may still do it; re-enabling
    // the organization key would hand it scopes the weak key does not hold.
    let e = c.set_key_status(with_bearer(set_status(&strong.id, pb::KeyStatus::Active), &weak)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("api_keys.create"), "names the missing scopes: {}", e.message());
    let got = c.get_key(as_service(pb::GetKeyRequest { id: strong.id.clone() }, "a")).await.unwrap().into_inner();
    assert_eq!(got.status(), pb::KeyStatus::Disabled);

    // A key it could have created, it may re-enable.
    let k = c.set_key_status(with_bearer(set_status(&weaker.id, pb::KeyStatus::Active), &weak)).await.unwrap();
    assert_eq!(k.into_inner().status(), pb::KeyStatus::Active);
    // Service tokens are unaffected.
    let k = c.set_key_status(as_service(set_status(&strong.id, pb::KeyStatus::Active), "admin")).await.unwrap();
    assert_eq!(k.into_inner().status(), pb::KeyStatus::Active);
}

async fn a_test_key_acts_in_the_test_environment_only(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    enterprise(&mut c, "acme").await;
    let (live, _) = service_key(&mut c, organization(), pb::Environment::Live, None).await;
    let (test_key, test) = service_key(&mut c, organization(), pb::Environment::Test, None).await;

    // CreateKey defaults to the caller's environment and refuses the other.
    let create = |environment: pb::Environment| pb::CreateKeyRequest {
        name: "made-by-test".into(),
        scopes: Some(custom(&["fleet.read"])),
        environment: environment as i32,
        ..Default::default()
    };
    let made = c.create_key(with_bearer(create(pb::Environment::Unspecified), &test)).await.unwrap().into_inner();
    assert_eq!(made.key.as_ref().unwrap().environment(), pb::Environment::Test);
    assert!(made.secret.starts_with("tk_test_"));
    let e = c.create_key(with_bearer(create(pb::Environment::Live), &test)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    // Asking for its own environment explicitly is fine.
    let explicit = c.create_key(with_bearer(create(pb::Environment::Test), &test)).await.unwrap().into_inner();
    assert_eq!(explicit.key.as_ref().unwrap().environment(), pb::Environment::Test);

    // Live keys do not exist for it.
    let id = || live.id.clone();
    let e = c.get_key(with_bearer(pb::GetKeyRequest { id: id() }, &test)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "GetKey: {}", e.message());
    let e = c.set_key_status(with_bearer(set_status(&live.id, pb::KeyStatus::Disabled), &test)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "SetKeyStatus: {}", e.message());
    let e = c.revoke_key(with_bearer(pb::RevokeKeyRequest { id: id() }, &test)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "RevokeKey: {}", e.message());
    let e = c.delete_key(with_bearer(pb::DeleteKeyRequest { id: id() }, &test)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "DeleteKey: {}", e.message());
    let got = c.get_key(as_service(pb::GetKeyRequest { id: id() }, "a")).await.unwrap().into_inner();
    assert_eq!(got.status(), pb::KeyStatus::Active, "the live key is untouched");

    let listed = c.list_keys(with_bearer(pb::ListKeysRequest::default(), &test)).await.unwrap().into_inner();
    let mut ids: Vec<_> = listed.keys.iter().map(|k| k.id.clone()).collect();
    ids.sort();
    let mut want = vec![test_key.id.clone(), made.key.unwrap().id, explicit.key.unwrap().id];
    want.sort();
    assert_eq!(ids, want, "ListKeys shows only test keys");

    // Stats stay organization-wide; service tokens see both environments.
    let stats = c.get_key_stats(with_bearer(pb::GetKeyStatsRequest::default(), &test)).await.unwrap().into_inner();
    assert_eq!(stats.total_keys, 4);
    let all = c
        .list_keys(as_service(pb::ListKeysRequest { organization_id: "acme".into(), ..Default::default() }, "a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.keys.len(), 4);
}

async fn a_key_never_outlives_the_key_that_made_it(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    enterprise(&mut c, "acme").await;
    let (parent, secret) = service_key(&mut c, organization(), pb::Environment::Live, Some(now_plus(3600))).await;
    let limit = parent.expires_at.unwrap();
    let create = |expires_at: Option<Timestamp>| pb::CreateKeyRequest {
        name: "child".into(),
        scopes: Some(custom(&["fleet.read"])),
        expires_at,
        ..Default::default()
    };

    let child = c.create_key(with_bearer(create(None), &secret)).await.unwrap().into_inner().key.unwrap();
    assert_eq!(child.expires_at, Some(limit), "inherits the caller key's expiry");
    let sooner = now_plus(1800);
    let child = c.create_key(with_bearer(create(Some(sooner)), &secret)).await.unwrap().into_inner();
    assert_eq!(child.key.unwrap().expires_at.unwrap().seconds, sooner.seconds);

    let e = c.create_key(with_bearer(create(Some(now_plus(7200))), &secret)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let named = chrono::DateTime::from_timestamp(limit.seconds, 0).unwrap().format("%Y-%m-%dT%H:%M:%S").to_string();
    assert!(e.message().contains(&named), "names the caller key's expiry {named}: {}", e.message());

    // Service tokens are unaffected.
    let (k, _) = service_key(&mut c, custom(&["fleet.read"]), pb::Environment::Live, None).await;
    assert_eq!(k.expires_at, None);
}

async fn verify_with_a_present_but_empty_organization_is_invalid(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    let (_, secret) = service_key(&mut c, custom(&["fleet.read"]), pb::Environment::Live, None).await;
    let req = |org: Option<&str>| pb::VerifyKeyRequest {
        key: secret.clone(),
        organization_id: org.map(str::to_owned),
        ..Default::default()
    };
    let e = c.verify_key(as_service(req(Some("")), "gw")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(c.verify_key(as_service(req(None), "gw")).await.unwrap().into_inner().valid);
    let r = c.verify_key(as_service(req(Some("globex")), "gw")).await.unwrap().into_inner();
    assert_eq!(r.code(), pb::VerifyCode::WrongOrganization);
}

async fn timestamps_outside_1970_to_9999_are_invalid_on_every_backend(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    // Year 10000, a far past no database stores, and one second before 1970.
    for bad in [ts(253_402_300_800), ts(-8_000_000_000_000), ts(-1)] {
        let create = pb::CreateKeyRequest {
            organization_id: "acme".into(),
            name: "k".into(),
            scopes: Some(custom(&["fleet.read"])),
            expires_at: Some(bad),
            ..Default::default()
        };
        let e = c.create_key(as_service(create, "alice")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "expires_at {bad:?}: {}", e.message());
        let list =
            pb::ListAuditEventsRequest { organization_id: "acme".into(), since: Some(bad), ..Default::default() };
        let e = c.list_audit_events(as_service(list, "a")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "since {bad:?}: {}", e.message());
        let export = pb::ExportAuditEventsRequest { organization_id: "acme".into(), until: Some(bad), since: None };
        let e = match c.export_audit_events(as_service(export, "a")).await {
            Err(e) => e,
            // The channel's deadline has ended with the headers: bound the read.
            Ok(s) => tokio::time::timeout(common::RPC_DEADLINE, s.into_inner().message())
                .await
                .expect("the export neither failed nor sent anything")
                .unwrap_err(),
        };
        assert_eq!(e.code(), Code::InvalidArgument, "until {bad:?}: {}", e.message());
    }
    // The last moment of 9999 is fine.
    let create = pb::CreateKeyRequest {
        organization_id: "acme".into(),
        name: "k".into(),
        scopes: Some(custom(&["fleet.read"])),
        expires_at: Some(ts(253_402_300_799)),
        ..Default::default()
    };
    c.create_key(as_service(create, "alice")).await.unwrap();

    // Page tokens edited to far-off times are refused, not sent to the database.
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    for micros in ["300000000000000000", "-8000000000000000000", "-1"] {
        let token = URL_SAFE_NO_PAD.encode(format!("{micros}.AAAAAAAAAAAAAAAA"));
        let list = pb::ListKeysRequest { organization_id: "acme".into(), page_token: token, ..Default::default() };
        let e = c.list_keys(as_service(list, "a")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "page token at {micros}: {}", e.message());
    }
}

/// True when `message` holds any 8 characters of `key` from `from` on.
fn leaks_from(message: &str, key: &str, from: usize) -> bool {
    (from..=key.len() - 8).any(|i| message.contains(&key[i..i + 8]))
}

async fn error_messages_show_no_more_of_a_pasted_key_than_its_public_prefix(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    let (_, key) = service_key(&mut c, organization(), pb::Environment::Live, None).await;
    let bare = &key[8..]; // without `tk_live_`

    let mut messages = vec![];
    messages.push(c.get_key(as_service(pb::GetKeyRequest { id: key.clone() }, "a")).await.unwrap_err());
    messages.push(c.revoke_key(with_bearer(pb::RevokeKeyRequest { id: key.clone() }, &key)).await.unwrap_err());
    let list = pb::ListKeysRequest { organization_id: key.clone(), ..Default::default() };
    messages.push(c.list_keys(with_bearer(list, &key)).await.unwrap_err());
    let create = pb::CreateKeyRequest {
        organization_id: "acme".into(),
        name: "k".into(),
        scopes: Some(Scopes::Custom(pb::ScopeList { scopes: vec![key.clone(), format!("x{key}")] })),
        ..Default::default()
    };
    messages.push(c.create_key(as_service(create, "alice")).await.unwrap_err());
    let verify = pb::VerifyKeyRequest { key: key.clone(), required_scopes: vec![key.clone()], organization_id: None };
    messages.push(c.verify_key(as_service(verify, "gw")).await.unwrap_err());
    for e in messages {
        // Nothing past the 16-character public prefix (`tk_live_` and half the id).
        assert!(!leaks_from(e.message(), &key, 16), "{:?} leaks the key: {}", e.code(), e.message());
    }
    // Pasted without its prefix as an id, at most the (public) id is shown.
    let e = c.get_key(as_service(pb::GetKeyRequest { id: bare.into() }, "a")).await.unwrap_err();
    assert!(!leaks_from(e.message(), &key, 24), "leaks the secret: {}", e.message());
}

async fn invisible_and_direction_characters_are_refused(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    for (org, name) in [
        ("acme", "\u{200B}\u{200B}\u{200B}"),
        ("acme", "invoice\u{202E}fdp.exe"),
        ("acme", "ci\u{2066}key"),
        ("acme", "\u{FEFF}ci"),
        ("\u{200D}\u{200D}", "ci"),
        ("acme\u{202E}", "ci"),
        ("ac\u{2069}me", "ci"),
    ] {
        let create = pb::CreateKeyRequest {
            organization_id: org.into(),
            name: name.into(),
            scopes: Some(custom(&["fleet.read"])),
            ..Default::default()
        };
        let e = c.create_key(as_service(create, "alice")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{org:?}/{name:?}: {}", e.message());
    }
    let ok = pb::CreateKeyRequest {
        organization_id: "acme".into(),
        name: "Größe 🚀 鍵".into(),
        scopes: Some(custom(&["fleet.read"])),
        ..Default::default()
    };
    c.create_key(as_service(ok, "alice")).await.expect("ordinary Unicode names are fine");
}

async fn a_create_the_plan_refuses_costs_no_hash(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    for _ in 0..3 {
        service_key(&mut c, custom(&["fleet.read"]), pb::Environment::Live, None).await;
    }
    let hashes = app.metrics.argon2_hashes.get();
    assert_eq!(hashes, 3);
    let create = pb::CreateKeyRequest {
        organization_id: "acme".into(),
        name: "fourth".into(),
        scopes: Some(custom(&["fleet.read"])),
        ..Default::default()
    };
    let e = c.create_key(as_service(create, "alice")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert_eq!(app.metrics.argon2_hashes.get(), hashes, "the refused create ran argon2");
}

async fn only_accepted_calls_count_as_api_calls(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    let (k, key) = service_key(&mut c, custom(&["api_keys.read", "fleet.read"]), pb::Environment::Live, None).await;
    let verify = |scopes: &[&str]| {
        as_service(
            pb::VerifyKeyRequest {
                key: key.clone(),
                required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
                organization_id: None,
            },
            "gw",
        )
    };
    // Accepted: two VALID verifications and one authorized management call.
    assert!(c.verify_key(verify(&["fleet.read"])).await.unwrap().into_inner().valid);
    assert!(c.verify_key(verify(&[])).await.unwrap().into_inner().valid);
    c.get_key(with_bearer(pb::GetKeyRequest { id: k.id.clone() }, &key)).await.unwrap();
    app.usage.flush().await.unwrap();
    let stats = |c: &mut Client| {
        let mut c = c.clone();
        async move {
            c.get_key_stats(as_service(pb::GetKeyStatsRequest { organization_id: "acme".into() }, "a"))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let first = stats(&mut c).await;
    assert_eq!(first.api_calls_24h, 3);
    let last_used = c.get_key(as_service(pb::GetKeyRequest { id: k.id.clone() }, "a")).await.unwrap();
    let last_used = last_used.into_inner().last_used_at.expect("accepted calls move last_used_at");

    // Refused: missing scope, a management call it lacks the scope for, and
    // both paths once disabled.
    let r = c.verify_key(verify(&["fleet.manage"])).await.unwrap().into_inner();
    assert_eq!(r.code(), pb::VerifyCode::InsufficientScope);
    let e = c.revoke_key(with_bearer(pb::RevokeKeyRequest { id: k.id.clone() }, &key)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    c.set_key_status(as_service(set_status(&k.id, pb::KeyStatus::Disabled), "admin")).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await; // a later last_used_at would be visible
    assert_eq!(c.verify_key(verify(&[])).await.unwrap().into_inner().code(), pb::VerifyCode::Disabled);
    let e = c.get_key(with_bearer(pb::GetKeyRequest { id: k.id.clone() }, &key)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    app.usage.flush().await.unwrap();

    assert_eq!(stats(&mut c).await.api_calls_24h, 3, "refusals are not API calls");
    let after = c.get_key(as_service(pb::GetKeyRequest { id: k.id.clone() }, "a")).await.unwrap().into_inner();
    assert_eq!(after.last_used_at, Some(last_used), "refusals do not move last_used_at");
    let exposition = app.metrics.encode();
    for line in [
        "takumo_keys_key_refusals_total{code=\"insufficient_scope\"} 2",
        "takumo_keys_key_refusals_total{code=\"disabled\"} 2",
    ] {
        assert!(exposition.contains(line), "missing {line}:\n{exposition}");
    }
}

/// The credential length bound is exact: a 1,024-byte `authorization` value
/// is read (and refused as an unknown token), a 1,025-byte one is refused
/// before anything else.
async fn an_authorization_value_of_1024_bytes_is_read_and_a_longer_one_refused(b: Backend) {
    let app = TestApp::spawn(b).await;
    let message = |len: usize| {
        let mut c = app.client.clone();
        async move {
            let token = "t".repeat(len - "Bearer ".len());
            let e = c.list_scopes(with_bearer(pb::ListScopesRequest {}, &token)).await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated);
            e.message().to_owned()
        }
    };
    assert_eq!(message(1024).await, "unknown service token");
    assert!(message(1025).await.contains("too long"), "1,025 bytes were read as a credential");
}

for_each_backend!(
    an_authorization_value_of_1024_bytes_is_read_and_a_longer_one_refused,
    re_enabling_and_granting_stop_at_the_callers_own_power,
    a_sane_request_id_is_recorded_and_any_other_is_replaced,
    a_weaker_key_cannot_re_enable_a_stronger_one,
    a_test_key_acts_in_the_test_environment_only,
    a_key_never_outlives_the_key_that_made_it,
    verify_with_a_present_but_empty_organization_is_invalid,
    timestamps_outside_1970_to_9999_are_invalid_on_every_backend,
    error_messages_show_no_more_of_a_pasted_key_than_its_public_prefix,
    invisible_and_direction_characters_are_refused,
    a_create_the_plan_refuses_costs_no_hash,
    only_accepted_calls_count_as_api_calls,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_metadata_gets_an_actionable_status_not_internal() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let mut c = app.client.clone();
    for size in [2 * 1024, 100 * 1024, 600 * 1024] {
        let bearer = "A".repeat(size);
        let e = c.list_scopes(with_bearer(pb::ListScopesRequest {}, &bearer)).await.unwrap_err();
        assert!(
            matches!(e.code(), Code::ResourceExhausted | Code::Unauthenticated),
            "{size}-byte bearer: {:?} {}",
            e.code(),
            e.message()
        );
        assert!(
            e.message().contains("authorization"),
            "{size}-byte bearer: the message says what to fix: {}",
            e.message()
        );
    }
    // Metadata other than the bearer counts too.
    let mut req = with_bearer(pb::ListScopesRequest {}, common::SERVICE_TOKEN);
    req.metadata_mut().insert("x-junk", "j".repeat(64 * 1024).parse().unwrap());
    let e = c.list_scopes(req).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    // The connection is still good.
    c.list_scopes(with_bearer(pb::ListScopesRequest {}, common::SERVICE_TOKEN)).await.unwrap();
}

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_database_and_its_wal_and_shm_files_are_owner_only() {
    let db = Arc::new(TestDb::new(Backend::Sqlite).await);
    let app = TestApp::spawn_on(db.clone(), common::serve_args).await;
    let mut c = app.client.clone();
    service_key(&mut c, custom(&["fleet.read"]), pb::Environment::Live, None).await;
    let file = std::path::PathBuf::from(db.url.strip_prefix("sqlite://").unwrap());
    for suffix in ["", "-wal", "-shm"] {
        let mut p = file.clone().into_os_string();
        p.push(suffix);
        assert_eq!(mode(std::path::Path::new(&p)), 0o600, "{p:?}");
    }
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pepper_file_others_can_read_stops_startup_naming_it() {
    use std::os::unix::fs::PermissionsExt;
    use takumo_keys::server::startup::Application;
    let dir = tempfile::tempdir().unwrap();

    // TAKUMO_PEPPER_FILE, group-readable.
    let pepper = dir.path().join("pepper");
    std::fs::write(&pepper, "a-pepper-of-enough-length-0123456789").unwrap();
    std::fs::set_permissions(&pepper, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut args = common::serve_args(&format!("sqlite://{}", dir.path().join("a.db").display()));
    args.store.pepper = None;
    args.store.pepper_file = Some(pepper.clone());
    let e = Application::build(&args).await.err().expect("startup refused").to_string();
    assert!(e.contains(&pepper.display().to_string()) && e.contains("0640"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
    std::fs::set_permissions(&pepper, std::fs::Permissions::from_mode(0o600)).unwrap();
    Application::build(&args).await.expect("an owner-only pepper file is accepted");

    // The embedded default's generated pepper, loosened afterwards.
    let db = dir.path().join("b.db");
    let mut args = common::serve_args(&format!("sqlite://{}", db.display()));
    args.store.pepper = None;
    drop(Application::build(&args).await.expect("first start generates the pepper"));
    let generated = dir.path().join("b.db.pepper");
    assert_eq!(mode(&generated), 0o600);
    std::fs::set_permissions(&generated, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Application::build(&args).await.err().expect("startup refused").to_string();
    assert!(e.contains("b.db.pepper") && e.contains("0644"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_pepper_keeps_old_keys_verifying_and_rehashes_them() {
    let db = Arc::new(TestDb::new(Backend::Sqlite).await);
    const NEW: &str = "the-new-pepper-0123456789abcdef";
    let before = TestApp::spawn_on(db.clone(), common::serve_args).await;
    let (k, key) = service_key(&mut before.client.clone(), custom(&["fleet.read"]), pb::Environment::Live, None).await;
    before.shutdown().await;

    // Only the new pepper: the old key's pepper is unknown, which is a
    // configuration error (INTERNAL), never "invalid key".
    let rotated_badly = TestApp::spawn_on(db.clone(), |url| {
        let mut a = common::serve_args(url);
        a.store.pepper = Some(takumo_keys::domain::secret::SecretString::new(NEW));
        a
    })
    .await;
    let e = rotated_badly.client.clone().verify_key(as_service(verify_req(&key), "gw")).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{}", e.message());
    rotated_badly.shutdown().await;

    // New pepper plus the old one in TAKUMO_PREVIOUS_PEPPERS: verifies, and is rehashed with the new one.
    let rotated = TestApp::spawn_on(db.clone(), |url| {
        let mut a = common::serve_args(url);
        a.store.pepper = Some(takumo_keys::domain::secret::SecretString::new(NEW));
        a.store.previous_peppers = Some(takumo_keys::domain::secret::SecretString::new(common::PEPPER));
        a
    })
    .await;
    assert!(rotated.client.clone().verify_key(as_service(verify_req(&key), "gw")).await.unwrap().into_inner().valid);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while rotated.metrics.argon2_rehashes.get() == 0 {
        assert!(std::time::Instant::now() < deadline, "not rehashed");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (_, stored) = rotated.store.get_key_with_hash(&k.id).await.unwrap().unwrap();
    assert_eq!(
        stored.pepper_id,
        takumo_keys::verify::hashing::pepper_id(&takumo_keys::domain::secret::SecretString::new(NEW))
    );
    rotated.shutdown().await;

    // The old pepper can now be dropped.
    let done = TestApp::spawn_on(db, |url| {
        let mut a = common::serve_args(url);
        a.store.pepper = Some(takumo_keys::domain::secret::SecretString::new(NEW));
        a
    })
    .await;
    assert!(done.client.clone().verify_key(as_service(verify_req(&key), "gw")).await.unwrap().into_inner().valid);
}

fn verify_req(key: &str) -> pb::VerifyKeyRequest {
    pb::VerifyKeyRequest { key: key.into(), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_configured_service_token_authenticates_including_rotations_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new, billing) = (
        "dashboard-old-token-0123456789abcdef",
        "dashboard-new-token-0123456789abcdef",
        "billing-token-0123456789abcdef0123",
    );
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("billing={billing}\n")).unwrap();
    let db = Arc::new(TestDb::new(Backend::Sqlite).await);
    let app = TestApp::spawn_on(db, |url| {
        let mut a = common::serve_args(url);
        a.service_tokens =
            Some(takumo_keys::domain::secret::SecretString::new(format!("dashboard={old},dashboard={new}")));
        a.service_tokens_file = Some(file.clone());
        a
    })
    .await;
    let mut c = app.client.clone();
    for (token, name) in [(old, "dashboard"), (new, "dashboard"), (billing, "billing")] {
        let mut req = with_bearer(
            pb::SetOrganizationPlanRequest { organization_id: "acme".into(), plan: pb::Plan::Pro as i32 },
            token,
        );
        req.metadata_mut().insert("x-takumo-actor", "ops".parse().unwrap());
        c.set_organization_plan(req).await.unwrap_or_else(|e| panic!("{name} token refused: {e:?}"));
        let events = app.store.list_audit_events("acme", &Default::default(), None, 1).await.unwrap();
        assert_eq!(events[0].principal, format!("service:{name}"));
    }
    let e = c.list_scopes(with_bearer(pb::ListScopesRequest {}, common::SERVICE_TOKEN)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "a token no longer configured");
}

async fn a_sane_request_id_is_recorded_and_any_other_is_replaced(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    let long = "r".repeat(128);
    let too_long = "r".repeat(129);
    for (sent, kept) in
        [("req-42", true), (long.as_str(), true), ("", false), (too_long.as_str(), false), ("has space", false)]
    {
        let mut req = as_service(
            pb::SetOrganizationPlanRequest { organization_id: "acme".into(), plan: pb::Plan::Pro as i32 },
            "billing",
        );
        req.metadata_mut().insert("x-request-id", sent.parse().unwrap());
        c.set_organization_plan(req).await.unwrap();
        let events = app.store.list_audit_events("acme", &Default::default(), None, 1).await.unwrap();
        let recorded = &events[0].request_id;
        if kept {
            assert_eq!(recorded, sent);
        } else {
            assert!(
                recorded.len() == 32 && recorded.bytes().all(|b| b.is_ascii_hexdigit()),
                "{sent:?} was recorded as {recorded:?}, not replaced by a generated id"
            );
        }
    }
}

async fn re_enabling_and_granting_stop_at_the_callers_own_power(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    enterprise(&mut c, "acme").await;
    let hour = now_plus(3600);
    let (_, caller) = service_key(&mut c, organization(), pb::Environment::Live, Some(hour)).await;
    let base = c.clone();
    let disabled = |expires_at: Option<Timestamp>| {
        let mut c = base.clone();
        async move {
            let (k, _) = service_key(&mut c, custom(&["fleet.read"]), pb::Environment::Live, expires_at).await;
            c.set_key_status(as_service(set_status(&k.id, pb::KeyStatus::Disabled), "admin")).await.unwrap();
            k.id
        }
    };
    // A key that would outlive the caller (never expires, or later) stays disabled.
    for later in [None, Some(now_plus(7200))] {
        let id = disabled(later).await;
        let e = c.set_key_status(with_bearer(set_status(&id, pb::KeyStatus::Active), &caller)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    }
    // Expiring sooner, or at the same moment, is fine.
    for sooner in [Some(now_plus(1800)), Some(hour)] {
        let id = disabled(sooner).await;
        c.set_key_status(with_bearer(set_status(&id, pb::KeyStatus::Active), &caller)).await.unwrap();
    }

    // Another member's key: managed with api_keys.manage_all.
    let (bobs, _) = {
        let req = pb::CreateKeyRequest {
            organization_id: "acme".into(),
            name: "bob's".into(),
            scopes: Some(custom(&["fleet.read"])),
            ..Default::default()
        };
        let r = c.create_key(as_service(req, "bob")).await.unwrap().into_inner();
        (r.key.unwrap(), r.secret)
    };
    let (_, admin) = service_key(&mut c, organization(), pb::Environment::Live, None).await;
    c.set_key_status(with_bearer(set_status(&bobs.id, pb::KeyStatus::Disabled), &admin))
        .await
        .expect("manage_all manages another member's key");

    // A key grants only scopes it holds.
    let (_, narrow) =
        service_key(&mut c, custom(&["api_keys.create", "fleet.read"]), pb::Environment::Live, None).await;
    let req =
        |scopes: &[&str]| pb::CreateKeyRequest { name: "n".into(), scopes: Some(custom(scopes)), ..Default::default() };
    c.create_key(with_bearer(req(&["fleet.read"]), &narrow)).await.expect("a scope it holds");
    let e = c.create_key(with_bearer(req(&["fleet.read", "fleet.manage"]), &narrow)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("fleet.manage"), "{}", e.message());
}
