//! Domain types. They know nothing of sqlx or tonic: the store and the gRPC
//! layer convert at their own edges.

use chrono::{DateTime, Utc};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyStatus {
    Active,
    Disabled,
    Revoked,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Disabled => "disabled",
            Self::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => Self::Active,
            "disabled" => Self::Disabled,
            "revoked" => Self::Revoked,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Environment {
    Live,
    Test,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Test => "test",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "live" => Self::Live,
            "test" => Self::Test,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Plan {
    /// An organization the service has never seen is on Free.
    #[default]
    Free,
    Developer,
    Pro,
    Enterprise,
}

impl Plan {
    /// Maximum keys counted against the plan (active + disabled); `None` is unlimited.
    pub fn key_limit(self) -> Option<i64> {
        match self {
            Self::Free => Some(3),
            Self::Developer => Some(10),
            Self::Pro => Some(20),
            Self::Enterprise => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Developer => "developer",
            Self::Pro => "pro",
            Self::Enterprise => "enterprise",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "free" => Self::Free,
            "developer" => Self::Developer,
            "pro" => Self::Pro,
            "enterprise" => Self::Enterprise,
            _ => return None,
        })
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Free => "Free",
            Self::Developer => "Developer",
            Self::Pro => "Pro",
            Self::Enterprise => "Enterprise",
        })
    }
}

impl std::str::FromStr for Plan {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s).ok_or_else(|| format!("unknown plan `{s}`: use free, developer, pro or enterprise"))
    }
}

/// A key as stored, without its hash.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub id: String,
    pub organization_id: String,
    pub name: String,
    pub prefix: String,
    pub status: KeyStatus,
    /// Expanded and sorted.
    pub scopes: Vec<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub environment: Environment,
    /// The caller's labels, validated by `validate::metadata`; never a secret.
    pub metadata: Metadata,
    /// The key this one replaced, and the one that replaced it (RollKey).
    pub rotated_from: Option<String>,
    pub rotated_to: Option<String>,
    /// When the record last changed (usage counts aside): its version. A
    /// change notice carries it, so a read from a lagging standby can tell
    /// an older record from the announced one.
    pub updated_at: DateTime<Utc>,
}

/// A key's metadata: labels sorted by name.
pub type Metadata = std::collections::BTreeMap<String, String>;

impl ApiKey {
    /// An active live key of `acme` created by alice, with no scopes: the
    /// unit tests' starting point (they override the fields they are about).
    #[cfg(test)]
    pub(crate) fn for_test(id: &str) -> Self {
        Self {
            id: id.into(),
            organization_id: "acme".into(),
            name: "k".into(),
            prefix: "tk_live_".into(),
            status: KeyStatus::Active,
            scopes: vec![],
            created_by: "alice".into(),
            created_at: Utc::now(),
            last_used_at: None,
            expires_at: None,
            environment: Environment::Live,
            metadata: Default::default(),
            rotated_from: None,
            rotated_to: None,
            updated_at: Utc::now(),
        }
    }

    /// This key's position in `ListKeys` order, where the next page starts after.
    pub fn cursor(&self) -> Cursor {
        Cursor { created_at: self.created_at, id: self.id.clone() }
    }

    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// Everything the store needs to insert a key; the hash is a PHC string.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: String,
    pub organization_id: String,
    pub name: String,
    pub prefix: String,
    pub scopes: Vec<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub environment: Environment,
    pub metadata: Metadata,
    /// Set by RollKey: the key this one replaces.
    pub rotated_from: Option<String>,
    pub secret_hash: StoredHash,
}

/// What a reported leak of one of our keys does (`TAKUMO_LEAK_ACTION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeakAction {
    /// GitHub's practice: a key found in public is compromised.
    #[default]
    Revoke,
    Disable,
    /// Audit only.
    Report,
}

impl LeakAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Revoke => "revoke",
            Self::Disable => "disable",
            Self::Report => "report",
        }
    }
}

impl std::fmt::Display for LeakAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LeakAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Revoke, Self::Disable, Self::Report]
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown leak action `{s}`: use revoke, disable or report"))
    }
}

/// What UpdateKey changes: each field `Some` is set (for `expires_at`,
/// `Some(None)` clears it); validated already.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyUpdate {
    pub name: Option<String>,
    pub metadata: Option<Metadata>,
    pub expires_at: Option<Option<DateTime<Utc>>>,
}

impl KeyUpdate {
    /// The names of the fields this update sets, for the audit log (never
    /// their values: metadata is the caller's, and names may be too).
    pub fn fields(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if self.name.is_some() {
            f.push("name");
        }
        if self.metadata.is_some() {
            f.push("metadata");
        }
        if self.expires_at.is_some() {
            f.push("expires_at");
        }
        f
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Organization {
    pub id: String,
    pub plan: Plan,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyStats {
    pub total_keys: i64,
    pub active_keys: i64,
    pub keys_counted: i64,
    pub api_calls_24h: i64,
    pub last_call_at: Option<DateTime<Utc>>,
    pub plan: Plan,
}

impl KeyStats {
    /// Stats of an organization the store has never seen: Free, no keys, no calls.
    pub fn unseen() -> Self {
        Self { total_keys: 0, active_keys: 0, keys_counted: 0, api_calls_24h: 0, last_call_at: None, plan: Plan::Free }
    }
}

/// Filters and position for `ListKeys`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<KeyStatus>,
    pub created_by: Option<String>,
    /// Set for API-key callers: a key sees only keys of its own environment.
    pub environment: Option<Environment>,
}

/// Keyset cursor: the last row of the previous page, in (created_at, id) order.
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub id: String,
}

/// Calls counted for one key in one minute, as the usage flusher hands them over.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageDelta {
    pub key_id: String,
    pub organization_id: String,
    /// Start of the minute bucket.
    pub minute: DateTime<Utc>,
    pub calls: i64,
    pub last_used_at: DateTime<Utc>,
}

/// Who made a change and from where, recorded with it in the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditContext {
    /// The member acting (`created_by` of new keys).
    pub actor: String,
    /// The credential used: `service:<name>`, `key:<id>` or `operator:cli`.
    pub principal: String,
    pub request_id: String,
    pub peer: Option<String>,
}

impl AuditContext {
    /// The operator's `bootstrap` command, which writes to the store directly.
    pub fn operator(actor: &str) -> Self {
        Self {
            actor: actor.to_owned(),
            principal: OPERATOR_PRINCIPAL.to_owned(),
            request_id: String::new(),
            peer: None,
        }
    }

    pub fn is_operator(&self) -> bool {
        self.principal == OPERATOR_PRINCIPAL
    }
}

pub const OPERATOR_PRINCIPAL: &str = "operator:cli";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditAction {
    KeyCreated,
    KeyStatusChanged,
    KeyRevoked,
    KeyDeleted,
    PlanChanged,
    Bootstrap,
    KeyUpdated,
    KeyRolled,
    KeyLeaked,
}

impl AuditAction {
    pub const ALL: [AuditAction; 9] = [
        Self::KeyCreated,
        Self::KeyStatusChanged,
        Self::KeyRevoked,
        Self::KeyDeleted,
        Self::PlanChanged,
        Self::Bootstrap,
        Self::KeyUpdated,
        Self::KeyRolled,
        Self::KeyLeaked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeyCreated => "key.created",
            Self::KeyStatusChanged => "key.status_changed",
            Self::KeyRevoked => "key.revoked",
            Self::KeyDeleted => "key.deleted",
            Self::PlanChanged => "organization.plan_changed",
            Self::Bootstrap => "bootstrap",
            Self::KeyUpdated => "key.updated",
            Self::KeyRolled => "key.rolled",
            Self::KeyLeaked => "key.leaked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub id: i64,
    pub occurred_at: DateTime<Utc>,
    pub organization_id: String,
    pub actor: String,
    pub principal: String,
    pub action: AuditAction,
    pub key_id: Option<String>,
    pub key_prefix: Option<String>,
    pub status_before: Option<KeyStatus>,
    pub status_after: Option<KeyStatus>,
    pub request_id: String,
    pub peer: Option<String>,
    /// Free text for what the fields above do not hold (a plan change).
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub action: Option<AuditAction>,
}

/// A stored hash and the id of the pepper that keyed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHash {
    pub phc: String,
    pub pepper_id: String,
}
