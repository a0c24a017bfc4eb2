//! Arbitrary bytes decoded as every ApiKeyService request message, then run
//! through the pure checks the handlers apply to them: names and identifiers,
//! scope lists, enum conversions, timestamps, key ids and presented keys.
//! Nothing may panic, and prost must re-encode what it decoded losslessly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use takumo_keys::{
    domain::keys,
    proto::{self, pb},
    domain::scopes, domain::validate};

/// Decoding succeeded: encoding and decoding again gives the same message.
fn decode<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<M> {
    let m = M::decode(data).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("re-encoded message decodes");
    assert_eq!(m, again, "prost round trip changed the message");
    Some(m)
}

fn timestamp(field: &str, t: &Option<prost_types::Timestamp>) {
    if let Some(t) = t {
        if let Ok(dt) = proto::from_timestamp(field, t) {
            assert_eq!(proto::timestamp(dt), *t, "{field}: timestamp round trip");
        }
    }
}

fn id(v: &str) {
    if keys::is_valid_id(v) {
        assert_eq!(v.len(), keys::ID_LEN);
    }
}

fn organization(v: &str) {
    // Empty means "the caller's own" for API keys; otherwise it must be an identifier.
    let _ = validate::ident("organization_id", v);
}

fn scope_list(names: &[String], what: &str) {
    let validated = scopes::validate(names, what);
    match scopes::custom(names) {
        Ok(sorted) => {
            assert!(validated.is_ok(), "custom accepted what validate refused");
            assert!(sorted.is_sorted());
            assert_eq!(sorted.len(), names.len());
            assert!(sorted.iter().all(|s| scopes::is_known(s)));
            for preset in scopes::PRESETS {
                let held = scopes::expand_preset(preset);
                let missing = scopes::missing(&held, &sorted);
                assert!(missing.iter().all(|m| !held.contains(m)));
            }
        }
        Err(_) => assert!(names.is_empty() || validated.is_err(), "custom refused what validate accepted"),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(r) = decode::<pb::CreateKeyRequest>(data) {
        organization(&r.organization_id);
        let _ = validate::name("name", &r.name);
        match &r.scopes {
            Some(pb::create_key_request::Scopes::Preset(p)) => {
                if let Ok(preset) = proto::preset(*p) {
                    assert_eq!(pb::ScopePreset::from(preset) as i32, *p);
                    assert!(!scopes::expand_preset(preset).is_empty());
                }
            }
            Some(pb::create_key_request::Scopes::Custom(list)) => scope_list(&list.scopes, "custom scopes"),
            None => {}
        }
        // Unspecified decodes to None (the caller's own environment).
        if let Ok(Some(env)) = proto::environment(r.environment) {
            assert_eq!(pb::Environment::from(env) as i32, r.environment);
        }
        timestamp("expires_at", &r.expires_at);
    }
    if let Some(r) = decode::<pb::GetKeyRequest>(data) {
        id(&r.id);
    }
    if let Some(r) = decode::<pb::ListKeysRequest>(data) {
        organization(&r.organization_id);
        if let Some(s) = r.status {
            let _ = proto::key_status("status", s);
        }
        if let Some(member) = &r.created_by {
            let _ = validate::ident("created_by", member);
        }
    }
    if let Some(r) = decode::<pb::SetKeyStatusRequest>(data) {
        id(&r.id);
        if let Ok(Some(status)) = proto::key_status("status", r.status) {
            assert_eq!(pb::KeyStatus::from(status) as i32, r.status);
        }
    }
    if let Some(r) = decode::<pb::RevokeKeyRequest>(data) {
        id(&r.id);
    }
    if let Some(r) = decode::<pb::DeleteKeyRequest>(data) {
        id(&r.id);
    }
    if let Some(r) = decode::<pb::VerifyKeyRequest>(data) {
        if let Some(parsed) = keys::parse(&r.key) {
            let again = keys::compose(parsed.environment, parsed.id, parsed.secret());
            assert_eq!(again.expose(), r.key);
        }
        let _ = scopes::validate(&r.required_scopes, "required_scopes");
        if let Some(org) = &r.organization_id {
            organization(org);
        }
    }
    if let Some(r) = decode::<pb::GetKeyStatsRequest>(data) {
        organization(&r.organization_id);
    }
    let _ = decode::<pb::ListScopesRequest>(data);
    if let Some(r) = decode::<pb::SetOrganizationPlanRequest>(data) {
        organization(&r.organization_id);
        if let Ok(plan) = proto::plan(r.plan) {
            assert_eq!(pb::Plan::from(plan) as i32, r.plan);
        }
    }
    if let Some(r) = decode::<pb::ListAuditEventsRequest>(data) {
        organization(&r.organization_id);
        timestamp("since", &r.since);
        timestamp("until", &r.until);
        if let Some(a) = r.action {
            if let Ok(Some(action)) = proto::audit_action(a) {
                assert_eq!(pb::AuditAction::from(action) as i32, a);
            }
        }
    }
    if let Some(r) = decode::<pb::ExportAuditEventsRequest>(data) {
        organization(&r.organization_id);
        timestamp("since", &r.since);
        timestamp("until", &r.until);
    }
});
