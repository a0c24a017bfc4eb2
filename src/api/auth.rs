//! Who is calling, and what each RPC lets them do.
//!
//! Every `ApiKeyService` RPC authenticates the bearer token into a
//! [`Principal`], then [`authorize`] checks it against [`rule`], the one table
//! that says which principals may call which RPC. Organization and ownership
//! checks that need the target key live on [`Caller`], next to the table.

use crate::{
    api::tls::CertServices,
    domain::keys,
    domain::model::{ApiKey, AuditContext, Environment},
    domain::scopes,
    domain::secret::SecretString,
    domain::validate,
    error::{Error, Result},
    verify::{Denial, Purpose, Verdict, Verifier},
};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

/// The member named in `x-takumo-actor`, if any.
fn actor(md: &MetadataMap) -> Result<Option<String>> {
    let Some(v) = md.get(ACTOR_HEADER) else { return Ok(None) };
    let a = v.to_str().map_err(|_| Error::invalid(format!("`{ACTOR_HEADER}` metadata is not printable ASCII")))?;
    validate::ident(ACTOR_HEADER, a)?;
    Ok(Some(a.to_owned()))
}

/// Metadata entry carrying the caller's request id, recorded in the audit log.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The caller's request id when it is a sane one (1–128 visible ASCII
/// characters), else a fresh random one.
fn request_id(md: &MetadataMap) -> String {
    md.get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| {
            use rand::Rng;
            format!("{:032x}", rand::rng().random::<u128>())
        })
}

/// Metadata entry naming the member a service token acts for.
pub const ACTOR_HEADER: &str = "x-takumo-actor";
/// Shortest service token accepted at startup.
pub const MIN_SERVICE_TOKEN_LEN: usize = 32;
/// Longer bearer values are refused before any work.
const MAX_BEARER_LEN: usize = 1024;

#[derive(Debug, Clone)]
pub enum Principal {
    /// An internal backend, by its configured name.
    Service { name: String },
    /// A Takumo API key, proven, active and unexpired.
    Key(std::sync::Arc<ApiKey>),
}

/// An authenticated caller and, for service tokens, the member it acts for.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    actor: Option<String>,
    /// `x-request-id` of the call, or one made up here, for the audit log.
    pub request_id: String,
    pub peer: Option<String>,
}

/// The `ApiKeyService` RPCs, named once: [`Rpc::name`] is the proto's method
/// name, used for metrics and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rpc {
    CreateKey,
    GetKey,
    ListKeys,
    SetKeyStatus,
    RevokeKey,
    DeleteKey,
    VerifyKey,
    GetKeyStats,
    ListScopes,
    SetOrganizationPlan,
    ListAuditEvents,
    ExportAuditEvents,
    UpdateKey,
    RollKey,
    ReportLeakedKeys,
    WatchKeyChanges,
}

impl Rpc {
    /// Every RPC, in the proto's order (the unit test holds them to it).
    #[cfg(test)]
    const ALL: [Rpc; 16] = [
        Rpc::CreateKey,
        Rpc::GetKey,
        Rpc::ListKeys,
        Rpc::SetKeyStatus,
        Rpc::RevokeKey,
        Rpc::DeleteKey,
        Rpc::VerifyKey,
        Rpc::GetKeyStats,
        Rpc::ListScopes,
        Rpc::SetOrganizationPlan,
        Rpc::ListAuditEvents,
        Rpc::ExportAuditEvents,
        Rpc::UpdateKey,
        Rpc::RollKey,
        Rpc::ReportLeakedKeys,
        Rpc::WatchKeyChanges,
    ];

    /// The method name in `takumo.apikeys.v1.ApiKeyService`.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::CreateKey => "CreateKey",
            Rpc::GetKey => "GetKey",
            Rpc::ListKeys => "ListKeys",
            Rpc::SetKeyStatus => "SetKeyStatus",
            Rpc::RevokeKey => "RevokeKey",
            Rpc::DeleteKey => "DeleteKey",
            Rpc::VerifyKey => "VerifyKey",
            Rpc::GetKeyStats => "GetKeyStats",
            Rpc::ListScopes => "ListScopes",
            Rpc::SetOrganizationPlan => "SetOrganizationPlan",
            Rpc::ListAuditEvents => "ListAuditEvents",
            Rpc::ExportAuditEvents => "ExportAuditEvents",
            Rpc::UpdateKey => "UpdateKey",
            Rpc::RollKey => "RollKey",
            Rpc::ReportLeakedKeys => "ReportLeakedKeys",
            Rpc::WatchKeyChanges => "WatchKeyChanges",
        }
    }
}

/// What an API key needs to call an RPC; service tokens may call every RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAccess {
    /// Service tokens only.
    Denied,
    /// Any authenticated key.
    Authenticated,
    /// A key holding this scope.
    Scope(&'static str),
    /// A key holding every one of these scopes.
    Scopes(&'static [&'static str]),
}

/// The authorization table: what an API key needs for each RPC. A new `Rpc`
/// variant does not compile until it is given a row here.
pub fn rule(rpc: Rpc) -> KeyAccess {
    match rpc {
        // Editing a key is making it anew: the same scope, and (in the
        // handler) the manage_all rule and scopes covering the target's.
        Rpc::CreateKey | Rpc::UpdateKey => KeyAccess::Scope(scopes::API_KEYS_CREATE),
        Rpc::GetKey | Rpc::ListKeys | Rpc::GetKeyStats => KeyAccess::Scope(scopes::API_KEYS_READ),
        Rpc::SetKeyStatus | Rpc::RevokeKey | Rpc::DeleteKey => KeyAccess::Scope(scopes::API_KEYS_REVOKE),
        // Rolling creates a key and ends another.
        Rpc::RollKey => KeyAccess::Scopes(&[scopes::API_KEYS_CREATE, scopes::API_KEYS_REVOKE]),
        Rpc::ListScopes => KeyAccess::Authenticated,
        // What every key of every organization does is for the services that
        // enforce keys, not for a customer's key.
        Rpc::VerifyKey | Rpc::SetOrganizationPlan | Rpc::ReportLeakedKeys | Rpc::WatchKeyChanges => KeyAccess::Denied,
        Rpc::ListAuditEvents => KeyAccess::Scope(scopes::AUDIT_READ),
        Rpc::ExportAuditEvents => KeyAccess::Scope(scopes::AUDIT_EXPORT),
    }
}

/// Checks `caller` against the table for `rpc`.
pub fn authorize(caller: &Caller, rpc: Rpc) -> Result<()> {
    let Principal::Key(key) = &caller.principal else {
        return Ok(());
    };
    match rule(rpc) {
        KeyAccess::Denied => Err(Error::PermissionDenied(format!(
            "{} is for internal services: call it with a service token, not an API key",
            rpc.name()
        ))),
        KeyAccess::Authenticated => Ok(()),
        KeyAccess::Scope(s) if key.scopes.iter().any(|k| k == s) => Ok(()),
        KeyAccess::Scope(s) => Err(Error::PermissionDenied(format!("this API key lacks the `{s}` scope"))),
        KeyAccess::Scopes(needed) => match needed.iter().find(|s| !key.scopes.iter().any(|k| k == *s)) {
            None => Ok(()),
            Some(s) => Err(Error::PermissionDenied(format!(
                "this API key lacks the `{s}` scope ({} needs {})",
                rpc.name(),
                needed.join(" and ")
            ))),
        },
    }
}

impl Caller {
    /// The organization a request acts on. Service tokens must name it; an
    /// API key acts in its own, and another organization looks absent.
    pub fn organization(&self, requested: &str) -> Result<String> {
        match &self.principal {
            Principal::Service { .. } => {
                validate::ident("organization_id", requested)?;
                Ok(requested.to_owned())
            }
            Principal::Key(key) if requested.is_empty() || requested == key.organization_id => {
                Ok(key.organization_id.clone())
            }
            Principal::Key(_) => {
                validate::ident("organization_id", requested)?;
                Err(Error::not_found(format!("organization {requested} not found")))
            }
        }
    }

    /// Whether the caller may see `key` at all; if not, it is NOT_FOUND. An
    /// API key sees its own organization's keys of its own environment only:
    /// a test key cannot reach live keys (as in Stripe's test mode).
    pub fn can_see(&self, key: &ApiKey) -> bool {
        match &self.principal {
            Principal::Service { .. } => true,
            Principal::Key(own) => own.organization_id == key.organization_id && own.environment == key.environment,
        }
    }

    /// The environment an API-key caller is confined to; `None` for services.
    pub fn environment(&self) -> Option<Environment> {
        match &self.principal {
            Principal::Service { .. } => None,
            Principal::Key(own) => Some(own.environment),
        }
    }

    /// The environment of a new key: what was asked for, else the caller's
    /// own (live for service tokens). An API key cannot create a key of the
    /// other environment.
    pub fn new_key_environment(&self, requested: Option<Environment>) -> Result<Environment> {
        match (self.environment(), requested) {
            (None, r) => Ok(r.unwrap_or(Environment::Live)),
            (Some(own), None) => Ok(own),
            (Some(own), Some(r)) if r == own => Ok(r),
            (Some(own), Some(r)) => Err(Error::PermissionDenied(format!(
                "an API key acts in its own environment only: this {} key cannot create {} keys",
                own.as_str(),
                r.as_str()
            ))),
        }
    }

    /// The expiry of a new key. A key made by an API key never outlives it:
    /// with none requested it inherits the caller key's expiry, and a later
    /// one is refused.
    pub fn new_key_expiry(&self, requested: Option<DateTime<Utc>>) -> Result<Option<DateTime<Utc>>> {
        let Principal::Key(own) = &self.principal else {
            return Ok(requested);
        };
        match (own.expires_at, requested) {
            (None, r) => Ok(r),
            (Some(limit), None) => Ok(Some(limit)),
            (Some(limit), Some(r)) if r <= limit => Ok(Some(r)),
            (Some(limit), Some(_)) => Err(Error::invalid(format!(
                "expires_at must not be later than the calling key's own expiry ({}): a key cannot outlive the key \
                 that made it",
                limit.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ))),
        }
    }

    /// Setting a key ACTIVE grants its power again, so an API key may do it
    /// only for a key it could have created: the same grant rule as
    /// CreateKey for its scopes, and the target does not outlive it.
    pub fn ensure_can_enable(&self, target: &ApiKey) -> Result<()> {
        let Principal::Key(own) = &self.principal else {
            return Ok(());
        };
        self.ensure_can_grant(&target.scopes)?;
        if let Some(limit) = own.expires_at
            && target.expires_at.is_none_or(|t| t > limit)
        {
            return Err(Error::PermissionDenied(format!(
                "re-enabling key {} would let it outlive this API key, which expires at {}",
                target.id,
                limit.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )));
        }
        Ok(())
    }

    /// A key may manage keys its own member created; others need `api_keys.manage_all`.
    pub fn ensure_can_manage(&self, target: &ApiKey) -> Result<()> {
        match &self.principal {
            Principal::Service { .. } => Ok(()),
            Principal::Key(own) if own.created_by == target.created_by => Ok(()),
            Principal::Key(own) if own.scopes.iter().any(|s| s == scopes::API_KEYS_MANAGE_ALL) => Ok(()),
            Principal::Key(_) => Err(Error::PermissionDenied(format!(
                "key {} was created by another member; managing it needs the `{}` scope",
                target.id,
                scopes::API_KEYS_MANAGE_ALL
            ))),
        }
    }

    /// A key can never grant a scope it does not hold.
    pub fn ensure_can_grant(&self, requested: &[String]) -> Result<()> {
        let Principal::Key(own) = &self.principal else {
            return Ok(());
        };
        let missing = scopes::missing(&own.scopes, requested);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!(
                "an API key cannot grant scopes it does not hold: {}",
                missing.join(", ")
            )))
        }
    }

    /// Who is changing something, for the audit log. A service token that
    /// names no member is recorded as itself.
    pub fn audit(&self) -> AuditContext {
        let (principal, actor) = match &self.principal {
            Principal::Service { name } => {
                let p = format!("service:{name}");
                (p.clone(), self.actor.clone().unwrap_or(p))
            }
            Principal::Key(k) => (format!("key:{}", k.id), k.created_by.clone()),
        };
        AuditContext { actor, principal, request_id: self.request_id.clone(), peer: self.peer.clone() }
    }

    /// The member acting: `x-takumo-actor` for service tokens, the creator of
    /// the calling key for API keys.
    pub fn actor(&self) -> Result<String> {
        match (&self.principal, &self.actor) {
            (Principal::Key(k), _) => Ok(k.created_by.clone()),
            (Principal::Service { .. }, Some(a)) => Ok(a.clone()),
            (Principal::Service { .. }, None) => {
                Err(Error::invalid(format!("a service token must name the acting member in `{ACTOR_HEADER}` metadata")))
            }
        }
    }
}

/// Configured service tokens, held as SHA-256 digests so a lookup compares
/// fixed-length values in constant time and never keeps the token around.
#[derive(Clone, Default)]
pub struct ServiceTokens {
    entries: Vec<(String, [u8; 32])>,
}

impl std::fmt::Debug for ServiceTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.entries.iter().map(|(n, _)| n)).finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl ServiceTokens {
    /// Parses `name=token,name=token`. Several tokens may share a name, which
    /// is how a token is rotated: add the new one, roll clients, drop the old.
    pub fn parse(spec: &SecretString) -> Result<Self> {
        let mut entries = Vec::new();
        for part in spec.expose().split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, token)) = part.split_once('=') else {
                return Err(Error::invalid("TAKUMO_SERVICE_TOKENS: each entry must be name=token"));
            };
            let (name, token) = (name.trim(), token.trim());
            validate::ident("TAKUMO_SERVICE_TOKENS service name", name)?;
            if token.len() < MIN_SERVICE_TOKEN_LEN {
                return Err(Error::invalid(format!(
                    "TAKUMO_SERVICE_TOKENS: the token of `{name}` is shorter than {MIN_SERVICE_TOKEN_LEN} characters"
                )));
            }
            if keys::looks_like_key(token) {
                return Err(Error::invalid(format!(
                    "TAKUMO_SERVICE_TOKENS: the token of `{name}` must not start like an API key (tk_live_/tk_test_)"
                )));
            }
            entries.push((name.to_owned(), digest(token)));
        }
        Ok(Self { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The service name for `token`. Every entry is compared, so the time
    /// taken does not depend on which one (if any) matched.
    pub fn find(&self, token: &str) -> Option<&str> {
        let d = digest(token);
        let mut found = None;
        for (name, want) in &self.entries {
            if bool::from(want.ct_eq(&d)) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

#[derive(Clone)]
pub struct Authenticator {
    tokens: ServiceTokens,
    cert_services: CertServices,
    verifier: Verifier,
}

impl Authenticator {
    pub fn new(tokens: ServiceTokens, cert_services: CertServices, verifier: Verifier) -> Self {
        Self { tokens, cert_services, verifier }
    }

    /// Under mutual TLS, a verified client certificate mapped to a service.
    fn certificate_service<T>(&self, req: &tonic::Request<T>) -> Option<Principal> {
        let certs = req.peer_certs()?;
        let leaf = certs.first()?;
        self.cert_services.service_for(leaf).map(|name| Principal::Service { name: name.to_owned() })
    }

    pub async fn authenticate<T>(&self, req: &tonic::Request<T>) -> Result<Caller> {
        let md = req.metadata();
        let unauth = |m: &str| Error::Unauthenticated(m.to_owned());
        let peer = req.remote_addr().map(|a| a.to_string());
        let Some(value) = md.get("authorization") else {
            if let Some(principal) = self.certificate_service(req) {
                return Ok(Caller { principal, actor: actor(md)?, request_id: request_id(md), peer });
            }
            return Err(unauth(
                "missing `authorization` metadata: send `authorization: Bearer <service token or API key>`",
            ));
        };
        let value = value.to_str().map_err(|_| unauth("`authorization` metadata is not printable ASCII"))?;
        if value.len() > MAX_BEARER_LEN {
            return Err(unauth("`authorization` metadata is too long to be a credential"));
        }
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauth("`authorization` metadata must be `Bearer <token>`"))?;

        let principal = if keys::looks_like_key(token) {
            match self.verifier.verify(token, Purpose::Credential).await? {
                Verdict::Valid { key, .. } => Principal::Key(key),
                // Not told apart for a credential: both are "not a key of ours".
                Verdict::Denied { denial: Denial::Malformed | Denial::NotFound, .. } => {
                    return Err(unauth(&Denial::NotFound.reason()));
                }
                Verdict::Denied { denial, .. } => return Err(Error::Unauthenticated(denial.reason())),
            }
        } else {
            match self.tokens.find(token) {
                Some(name) => Principal::Service { name: name.to_owned() },
                None => return Err(unauth("unknown service token")),
            }
        };

        Ok(Caller { principal, actor: actor(md)?, request_id: request_id(md), peer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_names_are_the_proto_method_names() {
        use prost::Message;
        let fds = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let declared: Vec<&str> = fds
            .file
            .iter()
            .flat_map(|f| f.service.iter())
            .filter(|s| s.name() == "ApiKeyService")
            .flat_map(|s| s.method.iter().map(|m| m.name()))
            .collect();
        let ours: Vec<&str> = Rpc::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(ours, declared, "Rpc::ALL must list the proto's RPCs, in its order");
    }

    #[test]
    fn an_rpc_needing_two_scopes_names_the_one_missing() {
        let key = |scopes: &[&str]| Caller {
            principal: Principal::Key(std::sync::Arc::new(ApiKey {
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                ..ApiKey::for_test("0123456789ABCDEF")
            })),
            actor: None,
            request_id: "r".into(),
            peer: None,
        };
        let refusal = |c: &Caller| authorize(c, Rpc::RollKey).unwrap_err().to_string();
        let lacks = |s: &str| format!("lacks the `{s}` scope");
        assert!(refusal(&key(&[scopes::API_KEYS_CREATE])).contains(&lacks(scopes::API_KEYS_REVOKE)));
        assert!(refusal(&key(&[scopes::API_KEYS_REVOKE])).contains(&lacks(scopes::API_KEYS_CREATE)));
        assert!(authorize(&key(&[scopes::API_KEYS_CREATE, scopes::API_KEYS_REVOKE]), Rpc::RollKey).is_ok());
    }

    #[test]
    fn service_tokens_must_be_long_enough() {
        let short = SecretString::new("billing=short");
        assert!(ServiceTokens::parse(&short).is_err());
        let ok = SecretString::new("billing=0123456789abcdef0123456789abcdef, dash=fedcba9876543210fedcba9876543210");
        let t = ServiceTokens::parse(&ok).unwrap();
        assert_eq!(t.find("0123456789abcdef0123456789abcdef"), Some("billing"));
        assert_eq!(t.find("fedcba9876543210fedcba9876543210"), Some("dash"));
        assert_eq!(t.find("nope"), None);
        assert!(!t.is_empty());
        assert!(ServiceTokens::parse(&SecretString::new("")).unwrap().is_empty(), "no tokens: startup warns");
        // Debug names the services, never a token.
        let shown = format!("{t:?}");
        assert!(shown.contains("billing") && shown.contains("dash") && !shown.contains("0123"), "{shown}");
    }
}
