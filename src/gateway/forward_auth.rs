//! HTTP forward-auth: `/v1/authz` and everything below it, any method, no
//! body, on `TAKUMO_HTTP_LISTEN`. The proxy sends the original request's
//! headers plus its own service token and the route's settings:
//!
//! | request header | meaning |
//! |---|---|
//! | `X-Takumo-Service-Token` | the proxy's service token (required) |
//! | `Authorization: Bearer …` or `X-Api-Key` | the customer's key |
//! | `X-Takumo-Required-Scopes` | scopes the route needs, comma or space separated |
//! | `X-Takumo-Organization` | the organization the route is confined to (optional) |
//!
//! Answers: 200 with the identity headers ([`super::Identity::headers`]);
//! 401 with `WWW-Authenticate: Bearer realm="takumo"` for no usable key; 403
//! with `X-Takumo-Missing-Scopes` for missing scopes (or the wrong
//! organization); 400 for a configuration mistake in the route's settings;
//! 401 without a challenge when the proxy itself is not authenticated
//! (nothing is verified); 503 when the store cannot answer.

use super::{CHALLENGE, Decision, MISSING_SCOPES_HEADER, decide, organization, presented_key, required_scopes};
use crate::{api::auth::ServiceTokens, verify::Verifier};
use axum::{
    body::Body,
    extract::State,
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::Response,
};
use std::sync::Arc;

pub const SERVICE_TOKEN_HEADER: &str = "x-takumo-service-token";
pub const REQUIRED_SCOPES_HEADER: &str = "x-takumo-required-scopes";
pub const ROUTE_ORGANIZATION_HEADER: &str = "x-takumo-organization";

const PROTOCOL: &str = "http";

pub struct ForwardAuth {
    pub verifier: Verifier,
    pub tokens: ServiceTokens,
}

fn text(status: StatusCode, body: String) -> Response {
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The handler of `/v1/authz` and everything below it.
pub async fn check(State(auth): State<Arc<ForwardAuth>>, headers: HeaderMap) -> Response {
    let metrics = auth.verifier.metrics();
    let proxy = header_str(&headers, SERVICE_TOKEN_HEADER).and_then(|t| auth.tokens.find(t.trim()));
    if proxy.is_none() {
        metrics.gateway_decision(PROTOCOL, "proxy_unauthenticated");
        return text(
            StatusCode::UNAUTHORIZED,
            format!("the proxy must send its service token in {SERVICE_TOKEN_HEADER}\n"),
        );
    }
    // The route's settings come from the proxy's configuration: a mistake
    // there is a 400 for the operator, never a verdict on the key.
    let settings = (|| {
        let scopes = match headers.get(REQUIRED_SCOPES_HEADER) {
            None => vec![],
            Some(v) => {
                let v = v
                    .to_str()
                    .map_err(|_| crate::Error::invalid(format!("{REQUIRED_SCOPES_HEADER} is not printable ASCII")))?;
                required_scopes(v, REQUIRED_SCOPES_HEADER)?
            }
        };
        let org = organization(header_str(&headers, ROUTE_ORGANIZATION_HEADER), ROUTE_ORGANIZATION_HEADER)?;
        Ok::<_, crate::Error>((scopes, org))
    })();
    let (scopes, org) = match settings {
        Ok(s) => s,
        Err(e) => {
            metrics.gateway_decision(PROTOCOL, "bad_request");
            return text(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
    };
    let key = presented_key(header_str(&headers, "authorization"), header_str(&headers, super::API_KEY_HEADER));
    let decision = match decide(&auth.verifier, key, &scopes, org.as_deref()).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %crate::error::error_chain(&e), "forward-auth check failed");
            metrics.gateway_decision(PROTOCOL, "error");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n".into());
        }
    };
    metrics.gateway_decision(PROTOCOL, decision.label());
    respond(&decision)
}

/// The HTTP answer of a decision.
fn respond(decision: &Decision) -> Response {
    match decision {
        Decision::Allow(identity) => {
            let mut res = Response::new(Body::empty());
            for (name, value) in identity.headers() {
                // Identifiers are validated printable text; bytes beyond ASCII
                // travel as HTTP's obs-text. Nothing here can hold a newline.
                match HeaderValue::from_bytes(value.as_bytes()) {
                    Ok(v) => {
                        res.headers_mut().insert(HeaderName::from_static(name), v);
                    }
                    Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n".into()),
                }
            }
            res
        }
        Decision::Unauthenticated => {
            let mut res = text(StatusCode::UNAUTHORIZED, decision.body());
            res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(CHALLENGE));
            res
        }
        Decision::Forbidden { missing } => {
            let mut res = text(StatusCode::FORBIDDEN, decision.body());
            if !missing.is_empty()
                && let Ok(v) = HeaderValue::from_str(&missing.join(" "))
            {
                res.headers_mut().insert(HeaderName::from_static(MISSING_SCOPES_HEADER), v);
            }
            res
        }
        Decision::Unavailable => text(StatusCode::SERVICE_UNAVAILABLE, decision.body()),
    }
}
