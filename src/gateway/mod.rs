//! Key enforcement by proxies, with no glue code: the decision both gateway
//! protocols share, over the same verification path, cache and usage
//! counting as `VerifyKey` ([`Verifier::verify`] with [`Purpose::VerifyKey`]).
//!
//! - [`forward_auth`]: HTTP forward-auth on `TAKUMO_HTTP_LISTEN` (`/v1/authz`):
//!   nginx `auth_request`, ingress-nginx `auth-url`, Traefik ForwardAuth,
//!   Caddy `forward_auth`, Envoy's HTTP mode.
//! - [`ext_authz`]: `envoy.service.auth.v3.Authorization/Check` on the gRPC
//!   listener: Envoy, Istio `CUSTOM` policies, Contour, Envoy Gateway, Gloo.
//!
//! The calling proxy authenticates as a service (a service token, or an mTLS
//! service principal for ext_authz); the customer's key travels in the
//! original request's `Authorization: Bearer …` or `X-Api-Key` header.
//! A surface like [`crate::api`], whose caller authentication it shares.

pub mod ext_authz;
pub mod forward_auth;

use crate::{
    domain::scopes,
    domain::validate,
    error::{Error, Result},
    verify::{Denial, Purpose, Verdict, Verifier},
};

/// Headers a proxy passes upstream on an allowed request (lower case, as
/// HTTP/2 and Envoy spell them).
pub const KEY_ID_HEADER: &str = "x-takumo-key-id";
pub const ORGANIZATION_HEADER: &str = "x-takumo-organization";
pub const ENVIRONMENT_HEADER: &str = "x-takumo-environment";
pub const SCOPES_HEADER: &str = "x-takumo-scopes";
/// On a 403 for insufficient scope: the scopes the key lacks, space separated.
pub const MISSING_SCOPES_HEADER: &str = "x-takumo-missing-scopes";
/// The original request's headers that may carry the customer's key; a proxy
/// removes both before the request goes upstream.
pub const API_KEY_HEADER: &str = "x-api-key";
/// The challenge of every 401 for a customer's key.
pub const CHALLENGE: &str = "Bearer realm=\"takumo\"";

/// Who a verified key is, for the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub key_id: String,
    pub organization_id: String,
    pub environment: &'static str,
    /// The key's full, expanded scope set.
    pub scopes: Vec<String>,
}

impl Identity {
    /// The headers to add to the upstream request.
    pub fn headers(&self) -> [(&'static str, String); 4] {
        [
            (KEY_ID_HEADER, self.key_id.clone()),
            (ORGANIZATION_HEADER, self.organization_id.clone()),
            (ENVIRONMENT_HEADER, self.environment.to_owned()),
            (SCOPES_HEADER, self.scopes.join(" ")),
        ]
    }
}

/// What the proxy is told about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Identity),
    /// No usable key: missing, malformed, unknown, disabled, revoked or
    /// expired. One answer for all, so a client cannot tell keys apart.
    Unauthenticated,
    /// A genuine, usable key that may not make this request: `missing` holds
    /// the scopes it lacks (empty when it belongs to another organization).
    Forbidden {
        missing: Vec<String>,
    },
    /// The store cannot answer and nothing cached can stand in for it.
    Unavailable,
}

impl Decision {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Allow(_) => "allow",
            Decision::Unauthenticated => "unauthenticated",
            Decision::Forbidden { .. } => "forbidden",
            Decision::Unavailable => "unavailable",
        }
    }

    /// The plain-text body of a refusal. Nothing in it tells one bad key
    /// from another; a 403 may say why, since the key itself was proven.
    pub fn body(&self) -> String {
        match self {
            Decision::Allow(_) => String::new(),
            Decision::Unauthenticated => "a valid Takumo API key is required\n".into(),
            Decision::Forbidden { missing } if missing.is_empty() => {
                "the API key belongs to another organization\n".into()
            }
            Decision::Forbidden { missing } => {
                format!("the API key lacks the scope(s) this request needs: {}\n", missing.join(", "))
            }
            Decision::Unavailable => "the key service cannot verify keys right now; retry with backoff\n".into(),
        }
    }
}

/// The customer's key a request carries: `Authorization: Bearer <key>`
/// (scheme case-insensitive), else `X-Api-Key: <key>`. `None` when neither
/// holds a non-empty value.
pub fn presented_key<'a>(authorization: Option<&'a str>, x_api_key: Option<&'a str>) -> Option<&'a str> {
    let bearer = authorization.and_then(|v| {
        let (scheme, token) = v.split_at_checked(7)?;
        scheme.eq_ignore_ascii_case("bearer ").then(|| token.trim())
    });
    bearer.or(x_api_key.map(str::trim)).filter(|k| !k.is_empty())
}

/// The required scopes of a route as a proxy's configuration spells them:
/// comma or space separated. An unknown name is the operator's mistake, so
/// it is an error (INVALID_ARGUMENT, HTTP 400), never a refusal of the key.
pub fn required_scopes(spec: &str, source: &str) -> Result<Vec<String>> {
    let mut wanted: Vec<String> =
        spec.split(|c: char| c == ',' || c.is_whitespace()).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    wanted.sort();
    wanted.dedup();
    scopes::validate(&wanted, source)?;
    Ok(wanted)
}

/// The organization a route is confined to, if its configuration names one.
pub fn organization(value: Option<&str>, source: &str) -> Result<Option<String>> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(o) => {
            validate::ident(source, o)?;
            Ok(Some(o.to_owned()))
        }
    }
}

/// The decision for one request, once the proxy is authenticated and the
/// route's settings are read. `Err` only for what is neither the key's nor
/// the store's availability (a bug, a corrupt record).
pub async fn decide(
    verifier: &Verifier,
    key: Option<&str>,
    required: &[String],
    organization: Option<&str>,
) -> Result<Decision> {
    let Some(key) = key else {
        return Ok(Decision::Unauthenticated);
    };
    let verdict = match verifier.verify(key, Purpose::VerifyKey { required, organization }).await {
        Ok(v) => v,
        Err(Error::Unavailable { .. }) => return Ok(Decision::Unavailable),
        Err(e) => return Err(e),
    };
    Ok(match verdict {
        Verdict::Valid { key, .. } => Decision::Allow(Identity {
            key_id: key.id.clone(),
            organization_id: key.organization_id.clone(),
            environment: key.environment.as_str(),
            scopes: key.scopes.clone(),
        }),
        Verdict::Denied { denial: Denial::InsufficientScope(missing), .. } => Decision::Forbidden { missing },
        Verdict::Denied { denial: Denial::WrongOrganization, .. } => Decision::Forbidden { missing: vec![] },
        Verdict::Denied {
            denial: Denial::Malformed | Denial::NotFound | Denial::Revoked | Denial::Disabled | Denial::Expired,
            ..
        } => Decision::Unauthenticated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_comes_from_a_bearer_authorization_else_from_x_api_key() {
        assert_eq!(presented_key(Some("Bearer tk_1"), None), Some("tk_1"));
        assert_eq!(presented_key(Some("bearer  tk_1 "), Some("tk_2")), Some("tk_1"), "bearer wins, trimmed");
        assert_eq!(presented_key(Some("Basic dXNlcg=="), Some("tk_2")), Some("tk_2"), "not a bearer: X-Api-Key");
        assert_eq!(presented_key(None, Some(" tk_2 ")), Some("tk_2"));
        assert_eq!(presented_key(Some("Bearer "), None), None);
        assert_eq!(presented_key(None, Some("")), None);
        assert_eq!(presented_key(Some("Bear"), None), None, "shorter than the scheme");
    }

    #[test]
    fn required_scopes_split_on_commas_and_spaces_and_refuse_unknown_names() {
        assert_eq!(
            required_scopes("fleet.read, api_keys.read  fleet.read", "h").unwrap(),
            ["api_keys.read", "fleet.read"]
        );
        assert!(required_scopes("", "h").unwrap().is_empty());
        let err = required_scopes("fleet.read,fleet.raed", "X-Takumo-Required-Scopes").unwrap_err().to_string();
        assert!(err.contains("fleet.raed") && err.contains("X-Takumo-Required-Scopes"), "{err}");
    }

    #[test]
    fn an_organization_is_optional_but_must_be_an_identifier_when_given() {
        assert_eq!(organization(None, "o").unwrap(), None);
        assert_eq!(organization(Some(" "), "o").unwrap(), None);
        assert_eq!(organization(Some("acme"), "o").unwrap().as_deref(), Some("acme"));
        assert!(organization(Some("ac me"), "o").is_err());
    }

    #[test]
    fn refusal_bodies_do_not_tell_bad_keys_apart() {
        assert_eq!(Decision::Unauthenticated.body(), "a valid Takumo API key is required\n");
        let scopes = Decision::Forbidden { missing: vec!["fleet.write".into()] };
        assert!(scopes.body().contains("fleet.write"));
        assert!(Decision::Forbidden { missing: vec![] }.body().contains("another organization"));
    }
}
