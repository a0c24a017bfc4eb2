//! The authorization matrix: every RPC × every kind of caller, each cell
//! asserting the exact status code. An RPC added to the proto without a row
//! here fails `every_rpc_of_the_service_is_in_the_matrix`.

use crate::common;

use common::{Backend, SERVICE_TOKEN, TestApp, as_service, with_bearer};
use prost::Message;
use takumo_keys::proto::{
    FILE_DESCRIPTOR_SET,
    pb::{self, create_key_request::Scopes},
};
use tonic::{Code, Request};

const ORG: &str = "acme";
const OTHER: &str = "globex";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    NoCredentials,
    MalformedToken,
    UnknownServiceToken,
    ServiceToken,
    KeyLackingScope,
    KeyWithScope,
    KeyOfOtherOrganization,
    DisabledKey,
    RevokedKey,
    ExpiredKey,
    /// Holds every scope of the catalog except the one the RPC's rule names:
    /// tells which scope each RPC needs, not just that it needs one.
    KeyLackingOnlyTheRequiredScope,
    /// Same organization, another member, every scope but `api_keys.manage_all`.
    OtherMemberWithoutManageAll,
}

const EVERYONE: [Who; 12] = [
    Who::NoCredentials,
    Who::MalformedToken,
    Who::UnknownServiceToken,
    Who::ServiceToken,
    Who::KeyLackingScope,
    Who::KeyWithScope,
    Who::KeyOfOtherOrganization,
    Who::DisabledKey,
    Who::RevokedKey,
    Who::ExpiredKey,
    Who::KeyLackingOnlyTheRequiredScope,
    Who::OtherMemberWithoutManageAll,
];

/// The scope the authorization table names for `rpc`, if any.
fn required_scope(rpc: &str) -> Option<&'static str> {
    Some(match rpc {
        "CreateKey" | "UpdateKey" => "api_keys.create",
        "GetKey" | "ListKeys" | "GetKeyStats" => "api_keys.read",
        // RollKey needs api_keys.create too (a unit test of auth.rs covers that half).
        "SetKeyStatus" | "RevokeKey" | "DeleteKey" | "RollKey" => "api_keys.revoke",
        "ListAuditEvents" => "audit.read",
        "ExportAuditEvents" => "audit.export",
        _ => return None,
    })
}

const RPCS: [&str; 16] = [
    "CreateKey",
    "GetKey",
    "ListKeys",
    "SetKeyStatus",
    "RevokeKey",
    "DeleteKey",
    "VerifyKey",
    "GetKeyStats",
    "ListScopes",
    "SetOrganizationPlan",
    "ListAuditEvents",
    "ExportAuditEvents",
    "UpdateKey",
    "RollKey",
    "ReportLeakedKeys",
    "WatchKeyChanges",
];

/// The expected outcome of one cell.
fn expected(rpc: &str, who: Who) -> Code {
    match who {
        Who::NoCredentials
        | Who::MalformedToken
        | Who::UnknownServiceToken
        | Who::DisabledKey
        | Who::RevokedKey
        | Who::ExpiredKey => Code::Unauthenticated,
        Who::ServiceToken => Code::Ok,
        _ if rpc == "ListScopes" => Code::Ok,
        _ if matches!(rpc, "VerifyKey" | "SetOrganizationPlan" | "ReportLeakedKeys" | "WatchKeyChanges") => {
            Code::PermissionDenied
        }
        Who::KeyLackingScope | Who::KeyLackingOnlyTheRequiredScope => Code::PermissionDenied,
        // Managing a key another member created needs `api_keys.manage_all`.
        Who::OtherMemberWithoutManageAll
            if matches!(rpc, "SetKeyStatus" | "RevokeKey" | "DeleteKey" | "UpdateKey" | "RollKey") =>
        {
            Code::PermissionDenied
        }
        Who::OtherMemberWithoutManageAll => Code::Ok,
        Who::KeyWithScope => Code::Ok,
        // Another organization's keys and data do not exist for this caller.
        Who::KeyOfOtherOrganization => Code::NotFound,
    }
}

struct Callers {
    /// The whole scope catalog, as ListScopes gives it.
    catalog: Vec<String>,
    other_member: String,
    lacking: String,
    with_scope: String,
    other_org: String,
    disabled: String,
    revoked: String,
    expired: String,
}

async fn key(app: &TestApp, org: &str, scopes: Scopes) -> (String, String) {
    key_of(app, org, scopes, "alice").await
}

async fn key_of(app: &TestApp, org: &str, scopes: Scopes, member: &str) -> (String, String) {
    let r = app
        .client
        .clone()
        .create_key(as_service(
            pb::CreateKeyRequest {
                organization_id: org.into(),
                name: "caller".into(),
                scopes: Some(scopes),
                ..Default::default()
            },
            member,
        ))
        .await
        .unwrap()
        .into_inner();
    (r.key.unwrap().id, r.secret)
}

fn custom(scopes: impl IntoIterator<Item = String>) -> Scopes {
    Scopes::Custom(pb::ScopeList { scopes: scopes.into_iter().collect() })
}

fn preset(p: pb::ScopePreset) -> Scopes {
    Scopes::Preset(p as i32)
}

async fn callers(app: &TestApp) -> Callers {
    let mut c = app.client.clone();
    let (_, lacking) = key(app, ORG, Scopes::Custom(pb::ScopeList { scopes: vec!["fleet.read".into()] })).await;
    let (_, with_scope) = key(app, ORG, preset(pb::ScopePreset::Organization)).await;
    let (_, other_org) = key(app, OTHER, preset(pb::ScopePreset::Organization)).await;
    let (id, disabled) = key(app, ORG, preset(pb::ScopePreset::Organization)).await;
    c.set_key_status(as_service(pb::SetKeyStatusRequest { id, status: pb::KeyStatus::Disabled as i32 }, "a"))
        .await
        .unwrap();
    let (id, revoked) = key(app, ORG, preset(pb::ScopePreset::Organization)).await;
    c.revoke_key(as_service(pb::RevokeKeyRequest { id }, "a")).await.unwrap();
    let expired = common::expired_key(app, ORG).await;
    let catalog: Vec<String> = c
        .list_scopes(as_service(pb::ListScopesRequest {}, "a"))
        .await
        .unwrap()
        .into_inner()
        .groups
        .into_iter()
        .flat_map(|g| g.scopes.into_iter().map(|s| s.name))
        .collect();
    assert!(catalog.contains(&"api_keys.manage_all".to_string()));
    let all_but_manage_all = catalog.iter().filter(|s| *s != "api_keys.manage_all").cloned();
    let (_, other_member) = key_of(app, ORG, custom(all_but_manage_all), "bob").await;
    Callers { catalog, other_member, lacking, with_scope, other_org, disabled, revoked, expired }
}

/// `lacking_only` is the key of [`Who::KeyLackingOnlyTheRequiredScope`] for this call.
fn request_as<T>(msg: T, who: Who, callers: &Callers, lacking_only: &str) -> Request<T> {
    let token = match who {
        Who::KeyLackingOnlyTheRequiredScope => lacking_only,
        Who::OtherMemberWithoutManageAll => &callers.other_member,
        Who::KeyLackingScope => &callers.lacking,
        Who::KeyWithScope => &callers.with_scope,
        Who::KeyOfOtherOrganization => &callers.other_org,
        Who::DisabledKey => &callers.disabled,
        Who::RevokedKey => &callers.revoked,
        Who::ExpiredKey => &callers.expired,
        _ => "",
    };
    match who {
        Who::NoCredentials => Request::new(msg),
        Who::MalformedToken => {
            let mut r = Request::new(msg);
            r.metadata_mut().insert("authorization", "Bearer".parse().unwrap());
            r
        }
        Who::UnknownServiceToken => with_bearer(msg, "an-unknown-service-token-0123456789abcdef"),
        Who::ServiceToken => {
            let mut r = with_bearer(msg, SERVICE_TOKEN);
            r.metadata_mut().insert("x-takumo-actor", "alice".parse().unwrap());
            r
        }
        _ => with_bearer(msg, token),
    }
}

fn code<T>(r: Result<T, tonic::Status>) -> (Code, String) {
    r.map_or_else(|s| (s.code(), s.message().to_owned()), |_| (Code::Ok, String::new()))
}

/// Calls `rpc` as `who` on resources of ORG; a fresh target key per call,
/// so destructive cells do not affect each other. Returns the code and message.
async fn call(app: &TestApp, rpc: &str, who: Who, callers: &Callers) -> (Code, String) {
    let mut c = app.client.clone();
    let (target, target_secret) = key(app, ORG, preset(pb::ScopePreset::ReadOnly)).await;
    let lacking_only = if who == Who::KeyLackingOnlyTheRequiredScope {
        let all_but = callers.catalog.iter().filter(|s| Some(s.as_str()) != required_scope(rpc)).cloned();
        key(app, ORG, custom(all_but)).await.1
    } else {
        String::new()
    };
    // Builds each request as `who`, with this call's lacking-only key.
    macro_rules! request {
        ($msg:expr, $who:expr, $callers:expr $(,)?) => {
            request_as($msg, $who, $callers, &lacking_only)
        };
    }
    // An API key names its own organization by leaving it empty; the
    // other-organization key names ORG explicitly, as an attacker would.
    let org = || ORG.to_string();
    match rpc {
        "CreateKey" => code(
            c.create_key(request!(
                pb::CreateKeyRequest {
                    organization_id: org(),
                    name: "made".into(),
                    scopes: Some(preset(pb::ScopePreset::ReadOnly)),
                    ..Default::default()
                },
                who,
                callers,
            ))
            .await,
        ),
        "GetKey" => code(c.get_key(request!(pb::GetKeyRequest { id: target }, who, callers)).await),
        "ListKeys" => code(
            c.list_keys(request!(pb::ListKeysRequest { organization_id: org(), ..Default::default() }, who, callers))
                .await,
        ),
        "SetKeyStatus" => code(
            c.set_key_status(request!(
                pb::SetKeyStatusRequest { id: target, status: pb::KeyStatus::Disabled as i32 },
                who,
                callers,
            ))
            .await,
        ),
        "RevokeKey" => code(c.revoke_key(request!(pb::RevokeKeyRequest { id: target }, who, callers)).await),
        "ReportLeakedKeys" => code(
            c.report_leaked_keys(request!(
                pb::ReportLeakedKeysRequest {
                    leaks: vec![pb::LeakedKey {
                        key: target_secret,
                        source_url: "https://example.com/leak".into(),
                        source: "matrix".into(),
                    }],
                },
                who,
                callers,
            ))
            .await,
        ),
        "RollKey" => {
            code(c.roll_key(request!(pb::RollKeyRequest { id: target, grace_period: None }, who, callers)).await)
        }
        "UpdateKey" => code(
            c.update_key(request!(
                pb::UpdateKeyRequest {
                    key: Some(pb::ApiKey { id: target, name: "renamed".into(), ..Default::default() }),
                    update_mask: Some(prost_types::FieldMask { paths: vec!["name".into()] }),
                },
                who,
                callers,
            ))
            .await,
        ),
        "DeleteKey" => code(c.delete_key(request!(pb::DeleteKeyRequest { id: target }, who, callers)).await),
        "VerifyKey" => code(
            c.verify_key(request!(pb::VerifyKeyRequest { key: target_secret, ..Default::default() }, who, callers))
                .await,
        ),
        "GetKeyStats" => {
            code(c.get_key_stats(request!(pb::GetKeyStatsRequest { organization_id: org() }, who, callers)).await)
        }
        "ListScopes" => code(c.list_scopes(request!(pb::ListScopesRequest {}, who, callers)).await),
        "SetOrganizationPlan" => code(
            c.set_organization_plan(request!(
                pb::SetOrganizationPlanRequest { organization_id: org(), plan: pb::Plan::Enterprise as i32 },
                who,
                callers,
            ))
            .await,
        ),
        "ListAuditEvents" => code(
            c.list_audit_events(request!(
                pb::ListAuditEventsRequest { organization_id: org(), ..Default::default() },
                who,
                callers,
            ))
            .await,
        ),
        // The stream is opened and dropped: only the opening is authorized.
        "WatchKeyChanges" => code(
            c.watch_key_changes(request!(pb::WatchKeyChangesRequest { organization_id: None }, who, callers)).await,
        ),
        "ExportAuditEvents" => {
            let req =
                request!(pb::ExportAuditEventsRequest { organization_id: org(), ..Default::default() }, who, callers);
            match c.export_audit_events(req).await {
                Err(s) => (s.code(), s.message().to_owned()),
                Ok(stream) => match common::read_to_end(&mut stream.into_inner()).await {
                    Ok(_) => (Code::Ok, String::new()),
                    Err(s) => (s.code(), s.message().to_owned()),
                },
            }
        }
        other => panic!("no call for {other}: add it to the matrix"),
    }
}

async fn every_cell_of_the_matrix_has_its_exact_status(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    c.set_organization_plan(as_service(
        pb::SetOrganizationPlanRequest { organization_id: ORG.into(), plan: pb::Plan::Enterprise as i32 },
        "billing",
    ))
    .await
    .unwrap();
    let callers = callers(&app).await;
    let mut wrong = vec![];
    for rpc in RPCS {
        for who in EVERYONE {
            let (got, message) = call(&app, rpc, who, &callers).await;
            let want = expected(rpc, who);
            if got != want {
                wrong.push(format!("{rpc} as {who:?}: got {got:?} ({message}), want {want:?}"));
            }
            // A refusal for a missing scope names the scope the rule needs.
            if who == Who::KeyLackingOnlyTheRequiredScope
                && let Some(scope) = required_scope(rpc)
                && !message.contains(scope)
            {
                wrong.push(format!("{rpc} as {who:?}: the refusal does not name `{scope}`: {message}"));
            }
            if who == Who::OtherMemberWithoutManageAll
                && matches!(rpc, "SetKeyStatus" | "RevokeKey" | "DeleteKey" | "UpdateKey" | "RollKey")
                && !message.contains("manage_all")
            {
                wrong.push(format!("{rpc} as {who:?}: the refusal does not name `api_keys.manage_all`: {message}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{} cells wrong:\n{}", wrong.len(), wrong.join("\n"));
}

#[test]
fn every_rpc_of_the_service_is_in_the_matrix() {
    let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
    let methods: Vec<String> = fds
        .file
        .iter()
        .flat_map(|f| f.service.iter())
        .filter(|s| s.name() == "ApiKeyService")
        .flat_map(|s| s.method.iter().map(|m| m.name().to_owned()))
        .collect();
    assert!(!methods.is_empty());
    for m in &methods {
        assert!(RPCS.contains(&m.as_str()), "{m} is not in the authorization matrix");
    }
    assert_eq!(methods.len(), RPCS.len());
}

for_each_backend!(every_cell_of_the_matrix_has_its_exact_status);
