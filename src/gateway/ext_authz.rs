//! Envoy's external authorization over gRPC
//! (`envoy.service.auth.v3.Authorization/Check`), on the gRPC listener.
//!
//! - The calling proxy authenticates as a service: a service token in the
//!   call's own `authorization` metadata (Envoy's
//!   `grpc_service.initial_metadata`) or an mTLS service principal.
//! - The customer's key: `attributes.request.http.headers` (`authorization`
//!   bearer, else `x-api-key`; or `header_map` under `encode_raw_headers`).
//!   The route's settings: `attributes.context_extensions`
//!   `takumo.required_scopes` and `takumo.organization`.
//! - Every answer about the key is an OK call: allow (`status` OK, identity
//!   headers added, the key's headers removed), deny (`status`
//!   UNAUTHENTICATED or PERMISSION_DENIED, a 401 or 403 `denied_response`),
//!   or, when the store cannot answer, an `error_response` 503, so the
//!   proxy's `failure_mode_allow` decides. A gRPC error is returned only for
//!   a broken call (the proxy unauthenticated, a malformed route setting):
//!   Envoy reads any gRPC error as "authorization server down".

use super::{API_KEY_HEADER, CHALLENGE, Decision, MISSING_SCOPES_HEADER, decide, organization, required_scopes};
use crate::{
    api::auth::{Authenticator, Principal},
    verify::Verifier,
};
use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption,
    HttpResponse, HttpStatus, HttpStatusCode, OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use tonic::{Code, Request, Response, Status};

/// `context_extensions` keys a route sets in Envoy's per-route config.
pub const REQUIRED_SCOPES_EXTENSION: &str = "takumo.required_scopes";
pub const ORGANIZATION_EXTENSION: &str = "takumo.organization";

const PROTOCOL: &str = "ext_authz";

pub struct ExtAuthz {
    pub verifier: Verifier,
    pub auth: Authenticator,
}

/// A header for Envoy to set, replacing any value the client sent: a client
/// must not smuggle in its own `x-takumo-key-id`.
fn header(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: key.to_owned(), value, ..Default::default() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// The key the original request carries, from the merged header map or,
/// under `encode_raw_headers`, from `header_map`.
fn presented_key(req: &CheckRequest) -> Option<String> {
    let http = req.attributes.as_ref()?.request.as_ref()?.http.as_ref()?;
    let raw = |name: &str| {
        http.header_map.as_ref()?.headers.iter().find(|h| h.key.eq_ignore_ascii_case(name)).and_then(|h| {
            if h.raw_value.is_empty() { Some(h.value.clone()) } else { String::from_utf8(h.raw_value.clone()).ok() }
        })
    };
    let get = |name: &str| http.headers.get(name).cloned().or_else(|| raw(name));
    let (authorization, x_api_key) = (get("authorization"), get(API_KEY_HEADER));
    super::presented_key(authorization.as_deref(), x_api_key.as_deref()).map(str::to_owned)
}

fn status(code: Code, message: &str) -> Option<rpc::Status> {
    Some(rpc::Status { code: code as i32, message: message.to_owned(), details: vec![] })
}

/// The `CheckResponse` of a decision.
pub fn check_response(decision: &Decision) -> CheckResponse {
    let denied = |code: Code, http: HttpStatusCode, headers: Vec<HeaderValueOption>| CheckResponse {
        status: status(code, decision.body().trim_end()),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: http as i32 }),
            headers,
            body: decision.body(),
        })),
        ..Default::default()
    };
    match decision {
        Decision::Allow(identity) => CheckResponse {
            status: status(Code::Ok, ""),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: identity.headers().into_iter().map(|(k, v)| header(k, v)).collect(),
                headers_to_remove: vec!["authorization".into(), API_KEY_HEADER.into()],
                ..Default::default()
            })),
            ..Default::default()
        },
        Decision::Unauthenticated => denied(
            Code::Unauthenticated,
            HttpStatusCode::Unauthorized,
            vec![header("www-authenticate", CHALLENGE.into())],
        ),
        Decision::Forbidden { missing } => {
            let headers =
                if missing.is_empty() { vec![] } else { vec![header(MISSING_SCOPES_HEADER, missing.join(" "))] };
            denied(Code::PermissionDenied, HttpStatusCode::Forbidden, headers)
        }
        Decision::Unavailable => CheckResponse {
            status: status(Code::Unavailable, decision.body().trim_end()),
            http_response: Some(HttpResponse::ErrorResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: HttpStatusCode::ServiceUnavailable as i32 }),
                headers: vec![],
                body: decision.body(),
            })),
            ..Default::default()
        },
    }
}

impl ExtAuthz {
    async fn check(&self, req: Request<CheckRequest>) -> Result<CheckResponse, Status> {
        let metrics = self.verifier.metrics();
        // The proxy's own credential; an API key is not a proxy.
        match self.auth.authenticate(&req).await {
            Ok(caller) if matches!(caller.principal, Principal::Service { .. }) => {}
            Ok(_) => {
                metrics.gateway_decision(PROTOCOL, "proxy_unauthenticated");
                return Err(Status::permission_denied(
                    "ext_authz is for proxies: authenticate the call with a service token, not an API key",
                ));
            }
            Err(e) => {
                metrics.gateway_decision(PROTOCOL, "proxy_unauthenticated");
                return Err(e.into());
            }
        }
        let check = req.into_inner();
        let extensions = check.attributes.as_ref().map(|a| &a.context_extensions);
        let setting = |name: &str| extensions.and_then(|e| e.get(name)).map(String::as_str);
        let settings = required_scopes(setting(REQUIRED_SCOPES_EXTENSION).unwrap_or(""), REQUIRED_SCOPES_EXTENSION)
            .and_then(|s| Ok((s, organization(setting(ORGANIZATION_EXTENSION), ORGANIZATION_EXTENSION)?)));
        let (scopes, org) = match settings {
            Ok(s) => s,
            Err(e) => {
                metrics.gateway_decision(PROTOCOL, "bad_request");
                return Err(e.into());
            }
        };
        let key = presented_key(&check);
        let decision = decide(&self.verifier, key.as_deref(), &scopes, org.as_deref()).await.map_err(|e| {
            metrics.gateway_decision(PROTOCOL, "error");
            Status::from(e)
        })?;
        metrics.gateway_decision(PROTOCOL, decision.label());
        Ok(check_response(&decision))
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let start = std::time::Instant::now();
        let result = ExtAuthz::check(self, req).await.map(Response::new);
        let code = result.as_ref().err().map_or(Code::Ok, Status::code);
        self.verifier.metrics().observe_rpc("envoy.Check", code, start.elapsed());
        result
    }
}
