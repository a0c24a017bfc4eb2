//! Generated gRPC types and the conversions between them and domain types.
//! Above the domain, below everything that serves or stores: may import only
//! [`crate::domain`] and [`crate::error`].

use crate::{
    domain::model::{self, ApiKey, AuditAction, AuditEvent, Environment, KeyStatus, Plan},
    domain::scopes::Preset,
    error::{Error, Result},
};
use chrono::{DateTime, Utc};

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("takumo.apikeys.v1");
}

/// The descriptor set gRPC reflection serves, so grpcurl needs no proto files.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("takumo_apikeys_v1_descriptor");

/// Envoy's `envoy.service.auth.v3` (ext_authz) and everything it imports, for
/// reflection: compiled by build.rs from the files `envoy-types` ships.
pub const ENVOY_EXT_AUTHZ_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("envoy_ext_authz_descriptor");

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// Earliest and latest instants accepted from callers (1970-01-01T00:00:00Z
/// to 9999-12-31T23:59:59.999999Z): a range both backends store exactly, so a
/// far-off value is INVALID_ARGUMENT at the edge, never a database error.
pub const MIN_SECONDS: i64 = 0;
pub const MAX_SECONDS: i64 = 253_402_300_799;

/// Whether `t` lies in the range every backend stores.
pub fn in_storable_range(t: DateTime<Utc>) -> bool {
    (MIN_SECONDS..=MAX_SECONDS).contains(&t.timestamp())
}

pub fn from_timestamp(field: &str, t: &prost_types::Timestamp) -> Result<DateTime<Utc>> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Error::invalid(format!("{field}: nanos must be within 0..1e9")));
    }
    DateTime::from_timestamp(t.seconds, t.nanos as u32).filter(|t| in_storable_range(*t)).ok_or_else(|| {
        Error::invalid(format!("{field}: must be between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z"))
    })
}

impl From<KeyStatus> for pb::KeyStatus {
    fn from(s: KeyStatus) -> Self {
        match s {
            KeyStatus::Active => Self::Active,
            KeyStatus::Disabled => Self::Disabled,
            KeyStatus::Revoked => Self::Revoked,
        }
    }
}

impl From<Environment> for pb::Environment {
    fn from(e: Environment) -> Self {
        match e {
            Environment::Live => Self::Live,
            Environment::Test => Self::Test,
        }
    }
}

impl From<Plan> for pb::Plan {
    fn from(p: Plan) -> Self {
        match p {
            Plan::Free => Self::Free,
            Plan::Developer => Self::Developer,
            Plan::Pro => Self::Pro,
            Plan::Enterprise => Self::Enterprise,
        }
    }
}

impl From<Preset> for pb::ScopePreset {
    fn from(p: Preset) -> Self {
        match p {
            Preset::Workspace => Self::Workspace,
            Preset::Organization => Self::Organization,
            Preset::ReadOnly => Self::ReadOnly,
        }
    }
}

/// Decodes a proto enum field, naming the field and its allowed values on error.
fn enum_field<T: TryFrom<i32>>(field: &str, v: i32, allowed: &str) -> Result<T> {
    T::try_from(v).map_err(|_| Error::invalid(format!("{field}: unknown value {v}; use {allowed}")))
}

pub fn plan(v: i32) -> Result<Plan> {
    const ALLOWED: &str = "PLAN_FREE, PLAN_DEVELOPER, PLAN_PRO or PLAN_ENTERPRISE";
    match enum_field::<pb::Plan>("plan", v, ALLOWED)? {
        pb::Plan::Unspecified => Err(Error::invalid(format!("plan is required: {ALLOWED}"))),
        pb::Plan::Free => Ok(Plan::Free),
        pb::Plan::Developer => Ok(Plan::Developer),
        pb::Plan::Pro => Ok(Plan::Pro),
        pb::Plan::Enterprise => Ok(Plan::Enterprise),
    }
}

/// `None` when unspecified: the caller's own environment, live for services.
pub fn environment(v: i32) -> Result<Option<Environment>> {
    match enum_field::<pb::Environment>("environment", v, "ENVIRONMENT_LIVE or ENVIRONMENT_TEST")? {
        pb::Environment::Unspecified => Ok(None),
        pb::Environment::Live => Ok(Some(Environment::Live)),
        pb::Environment::Test => Ok(Some(Environment::Test)),
    }
}

pub fn key_status(field: &str, v: i32) -> Result<Option<KeyStatus>> {
    Ok(match enum_field::<pb::KeyStatus>(field, v, "KEY_STATUS_ACTIVE, KEY_STATUS_DISABLED or KEY_STATUS_REVOKED")? {
        pb::KeyStatus::Unspecified => None,
        pb::KeyStatus::Active => Some(KeyStatus::Active),
        pb::KeyStatus::Disabled => Some(KeyStatus::Disabled),
        pb::KeyStatus::Revoked => Some(KeyStatus::Revoked),
    })
}

pub fn preset(v: i32) -> Result<Preset> {
    const ALLOWED: &str = "SCOPE_PRESET_WORKSPACE, SCOPE_PRESET_ORGANIZATION or SCOPE_PRESET_READ_ONLY";
    match enum_field::<pb::ScopePreset>("preset", v, ALLOWED)? {
        pb::ScopePreset::Unspecified => Err(Error::invalid(format!("preset must be one of {ALLOWED}"))),
        pb::ScopePreset::Workspace => Ok(Preset::Workspace),
        pb::ScopePreset::Organization => Ok(Preset::Organization),
        pb::ScopePreset::ReadOnly => Ok(Preset::ReadOnly),
    }
}

impl From<ApiKey> for pb::ApiKey {
    fn from(k: ApiKey) -> Self {
        Self {
            id: k.id,
            organization_id: k.organization_id,
            name: k.name,
            prefix: k.prefix,
            status: pb::KeyStatus::from(k.status) as i32,
            scopes: k.scopes,
            created_by: k.created_by,
            created_at: Some(timestamp(k.created_at)),
            last_used_at: k.last_used_at.map(timestamp),
            expires_at: k.expires_at.map(timestamp),
            environment: pb::Environment::from(k.environment) as i32,
            metadata: k.metadata.into_iter().collect(),
            rotated_from: k.rotated_from.unwrap_or_default(),
            rotated_to: k.rotated_to.unwrap_or_default(),
        }
    }
}

pub fn organization(o: model::Organization) -> pb::Organization {
    pb::Organization { id: o.id, plan: pb::Plan::from(o.plan) as i32, key_limit: o.plan.key_limit().unwrap_or(0) }
}

impl From<AuditAction> for pb::AuditAction {
    fn from(a: AuditAction) -> Self {
        match a {
            AuditAction::KeyCreated => Self::KeyCreated,
            AuditAction::KeyStatusChanged => Self::KeyStatusChanged,
            AuditAction::KeyRevoked => Self::KeyRevoked,
            AuditAction::KeyDeleted => Self::KeyDeleted,
            AuditAction::PlanChanged => Self::PlanChanged,
            AuditAction::Bootstrap => Self::Bootstrap,
            AuditAction::KeyUpdated => Self::KeyUpdated,
            AuditAction::KeyRolled => Self::KeyRolled,
            AuditAction::KeyLeaked => Self::KeyLeaked,
        }
    }
}

/// A filter value; UNSPECIFIED means no filter.
pub fn audit_action(v: i32) -> Result<Option<AuditAction>> {
    Ok(match enum_field::<pb::AuditAction>("action", v, "an AUDIT_ACTION_* value")? {
        pb::AuditAction::Unspecified => None,
        pb::AuditAction::KeyCreated => Some(AuditAction::KeyCreated),
        pb::AuditAction::KeyStatusChanged => Some(AuditAction::KeyStatusChanged),
        pb::AuditAction::KeyRevoked => Some(AuditAction::KeyRevoked),
        pb::AuditAction::KeyDeleted => Some(AuditAction::KeyDeleted),
        pb::AuditAction::PlanChanged => Some(AuditAction::PlanChanged),
        pb::AuditAction::Bootstrap => Some(AuditAction::Bootstrap),
        pb::AuditAction::KeyUpdated => Some(AuditAction::KeyUpdated),
        pb::AuditAction::KeyRolled => Some(AuditAction::KeyRolled),
        pb::AuditAction::KeyLeaked => Some(AuditAction::KeyLeaked),
    })
}

impl From<AuditEvent> for pb::AuditEvent {
    fn from(e: AuditEvent) -> Self {
        let status = |s: Option<KeyStatus>| s.map_or(pb::KeyStatus::Unspecified, pb::KeyStatus::from) as i32;
        Self {
            id: e.id.to_string(),
            occurred_at: Some(timestamp(e.occurred_at)),
            organization_id: e.organization_id,
            actor: e.actor,
            principal: e.principal,
            action: pb::AuditAction::from(e.action) as i32,
            key_id: e.key_id.unwrap_or_default(),
            key_prefix: e.key_prefix.unwrap_or_default(),
            status_before: status(e.status_before),
            status_after: status(e.status_after),
            request_id: e.request_id,
            peer: e.peer.unwrap_or_default(),
            detail: e.detail.unwrap_or_default(),
        }
    }
}
