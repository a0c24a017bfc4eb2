//! The tower layer that puts API-key authentication in front of an internal service.
//!
//! Per request: the route's requirement (by URI path), the bearer key, a look in a short-lived
//! verdict cache, else `VerifyKey`. A valid key reaches the inner service with its
//! [`VerifiedKey`] in the extensions; everything else is answered here, as a trailers-only
//! gRPC error for gRPC requests and as 401/403/503 for plain HTTP. Nothing in the request path
//! panics: every failure becomes a response.

use super::{Denial, KeysClient, Verdict, VerifiedKey};
use crate::{domain::keys, domain::scopes, error::Result};
use futures::future::BoxFuture;
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderValue, Request, Response, StatusCode, header};
use moka::sync::Cache;
use sha2::Sha256;
use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tonic::{Code, Status};
use tower::{Layer, Service};

/// Longer `authorization` values are refused before any work, as the keys service does.
const MAX_BEARER_LEN: usize = 1024;

/// What a route asks of its callers.
#[derive(Debug, Clone)]
enum Rule {
    /// No key needed (health checks, login pages); nothing is verified.
    Public,
    /// A valid key holding every one of these scopes (sorted, deduplicated; may be empty).
    Scopes(Arc<[String]>),
}

/// Configures a [`VerifyLayer`]. Routes are URI paths: `/pkg.Service/Method` for gRPC, the
/// HTTP path otherwise. A path ending in `/` covers everything below it; the longest match
/// wins; unmatched paths need a valid key with the default scopes (none unless set).
pub struct VerifyLayerBuilder {
    client: KeysClient,
    rules: Vec<(String, Vec<String>, bool)>,
    default_scopes: Vec<String>,
    cache_ttl: Duration,
    cache_capacity: u64,
    timeout: Duration,
}

impl VerifyLayerBuilder {
    /// Requests to `path` need a key holding every one of `scopes`.
    pub fn require(mut self, path: impl Into<String>, scopes: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        self.rules.push((path.into(), scopes.into_iter().map(|s| s.as_ref().to_owned()).collect(), false));
        self
    }

    /// Requests to `path` pass without a key and without a [`VerifiedKey`].
    pub fn public(mut self, path: impl Into<String>) -> Self {
        self.rules.push((path.into(), vec![], true));
        self
    }

    /// Scopes for paths no rule matches. Default: none, so any valid key passes.
    pub fn default_scopes(mut self, scopes: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        self.default_scopes = scopes.into_iter().map(|s| s.as_ref().to_owned()).collect();
        self
    }

    /// How long a verdict, positive or negative, is reused (default 5 s). This bounds how long
    /// a disabled or revoked key keeps working here; zero turns the cache off.
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// Most verdicts kept (default 10 000).
    pub fn cache_capacity(mut self, capacity: u64) -> Self {
        self.cache_capacity = capacity;
        self
    }

    /// Longest wait for `VerifyKey` before answering UNAVAILABLE (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Checks every scope against the catalog now, so a typo fails at startup rather than
    /// turning every request of a route into an error.
    pub fn build(self) -> Result<VerifyLayer> {
        let scope_set = |what: &str, mut v: Vec<String>| -> Result<Arc<[String]>> {
            v.sort();
            v.dedup();
            scopes::validate(&v, what)?;
            Ok(v.into())
        };
        let mut rules = Vec::with_capacity(self.rules.len());
        for (path, scopes, public) in self.rules {
            let rule = if public { Rule::Public } else { Rule::Scopes(scope_set(&format!("route {path}"), scopes)?) };
            rules.push((path, rule));
        }
        let default = Rule::Scopes(scope_set("default scopes", self.default_scopes)?);
        let cache = (!self.cache_ttl.is_zero())
            .then(|| Cache::builder().max_capacity(self.cache_capacity).time_to_live(self.cache_ttl).build());
        let mac = Hmac::<Sha256>::new_from_slice(&rand::random::<[u8; 32]>())
            .map_err(|e| crate::Error::internal(anyhow::anyhow!("verdict cache key: {e}")))?;
        Ok(VerifyLayer {
            shared: Arc::new(Shared { client: self.client, rules, default, cache, mac, timeout: self.timeout }),
        })
    }
}

/// Verifies the API key of every request before the inner service sees it. Wrap a tonic
/// server (`Server::builder().layer(layer)`) or an axum router (`router.layer(layer)`).
#[derive(Clone)]
pub struct VerifyLayer {
    shared: Arc<Shared>,
}

impl VerifyLayer {
    pub fn builder(client: KeysClient) -> VerifyLayerBuilder {
        VerifyLayerBuilder {
            client,
            rules: vec![],
            default_scopes: vec![],
            cache_ttl: Duration::from_secs(5),
            cache_capacity: 10_000,
            timeout: Duration::from_secs(2),
        }
    }
}

impl std::fmt::Debug for VerifyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyLayer").field("rules", &self.shared.rules).field("default", &self.shared.default).finish()
    }
}

impl<S> Layer<S> for VerifyLayer {
    type Service = VerifyService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        VerifyService { inner, shared: self.shared.clone() }
    }
}

struct Shared {
    client: KeysClient,
    rules: Vec<(String, Rule)>,
    default: Rule,
    /// Verdicts by HMAC of (key, required scopes) under a random per-layer key: a heap dump
    /// yields neither a key nor a hash that can be checked offline. `None` when the TTL is zero.
    cache: Option<Cache<[u8; 32], Verdict>>,
    mac: Hmac<Sha256>,
    timeout: Duration,
}

impl Shared {
    fn rule(&self, path: &str) -> &Rule {
        self.rules
            .iter()
            .filter(|(p, _)| p == path || (p.ends_with('/') && path.starts_with(p.as_str())))
            .max_by_key(|(p, _)| p.len())
            .map_or(&self.default, |(_, r)| r)
    }

    fn fingerprint(&self, key: &str, scopes: &[String]) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(key.as_bytes());
        for s in scopes {
            mac.update(b"\0");
            mac.update(s.as_bytes());
        }
        mac.finalize().into_bytes().into()
    }

    /// The verdict for `key` against `scopes`, from the cache or the keys service. `Err` is
    /// the status to answer with when the keys service could not give one; it is not cached,
    /// so the next request asks again.
    async fn verdict(&self, key: &str, scopes: &[String]) -> Result<Verdict, Status> {
        let fp = self.fingerprint(key, scopes);
        if let Some(v) = self.cache.as_ref().and_then(|c| c.get(&fp)) {
            return Ok(v);
        }
        let answer = tokio::time::timeout(self.timeout, self.client.verify(key, scopes)).await;
        let verdict = match answer {
            Ok(Ok(v)) => v,
            Ok(Err(status)) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "VerifyKey failed");
                return Err(match status.code() {
                    // Transient: the caller may retry.
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::ResourceExhausted => {
                        Status::unavailable("the keys service is unavailable; retry with backoff")
                    }
                    // A refused service token or a rejected request: our configuration, not
                    // the caller's key, is wrong.
                    _ => Status::internal("the keys service refused to verify the key"),
                });
            }
            Err(_) => {
                tracing::warn!(timeout = ?self.timeout, "VerifyKey timed out");
                return Err(Status::unavailable("the keys service did not answer in time; retry with backoff"));
            }
        };
        if let Some(c) = &self.cache {
            c.insert(fp, verdict.clone());
        }
        Ok(verdict)
    }
}

/// The bearer key of a request, or the UNAUTHENTICATED status explaining what is wrong.
fn bearer_key(headers: &http::HeaderMap) -> Result<String, Status> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(Status::unauthenticated("missing API key: send `authorization: Bearer <API key>`"));
    };
    let malformed = || Status::unauthenticated("`authorization` must be `Bearer <API key>`");
    let value = value.to_str().map_err(|_| malformed())?;
    if value.len() > MAX_BEARER_LEN {
        return Err(malformed());
    }
    let (scheme, token) = value.split_at_checked(7).ok_or_else(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer ") || token.is_empty() {
        return Err(malformed());
    }
    // Checksummed keys let garbage be refused without a round trip.
    if keys::parse(token).is_none() {
        return Err(Denial::Malformed.to_status());
    }
    Ok(token.to_owned())
}

/// A response body the layer can answer rejections with: empty for gRPC (the status travels
/// in headers), a short text for plain HTTP. Implemented for tonic's and axum's bodies.
pub trait RejectionBody: Default {
    fn text(text: String) -> Self;
}

impl RejectionBody for tonic::body::Body {
    fn text(text: String) -> Self {
        Self::new(text)
    }
}

impl RejectionBody for axum::body::Body {
    fn text(text: String) -> Self {
        Self::from(text)
    }
}

/// gRPC callers get a trailers-only error; HTTP callers get the matching status code.
fn reject<B: RejectionBody>(status: Status, grpc: bool) -> Response<B> {
    if grpc {
        return status.into_http();
    }
    let code = match status.code() {
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut res = Response::new(B::text(format!("{}\n", status.message())));
    *res.status_mut() = code;
    let headers = res.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if code == StatusCode::UNAUTHORIZED {
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    res
}

/// The service [`VerifyLayer`] wraps around an inner service.
#[derive(Clone)]
pub struct VerifyService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B, ResBody> Service<Request<B>> for VerifyService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    ResBody: RejectionBody + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<ResBody>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // The clone is not ready; the service that was polled ready serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let scopes = match shared.rule(req.uri().path()) {
            Rule::Public => return Box::pin(inner.call(req)),
            Rule::Scopes(s) => s.clone(),
        };
        let grpc =
            req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let key = bearer_key(req.headers());
        Box::pin(async move {
            let verified = match key {
                Ok(key) => shared.verdict(&key, &scopes).await.and_then(Verdict::into_result),
                Err(status) => Err(status),
            };
            match verified {
                Ok(k) => {
                    req.extensions_mut().insert::<VerifiedKey>(k);
                    inner.call(req).await
                }
                Err(status) => Ok(reject(status, grpc)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::Environment;

    fn headers(authorization: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(header::AUTHORIZATION, authorization.parse().unwrap());
        h
    }

    #[test]
    fn the_bearer_key_is_read_strictly_and_refused_with_a_reason() {
        let key = keys::compose(Environment::Live, "0123456789ABCDEF", &"s".repeat(keys::SECRET_LEN));
        let key = key.expose();
        assert_eq!(bearer_key(&headers(&format!("Bearer {key}"))).unwrap(), key);
        assert_eq!(bearer_key(&headers(&format!("bearer   {key} "))).unwrap(), key, "scheme case and padding");
        let message = |h: &http::HeaderMap| bearer_key(h).unwrap_err().message().to_owned();
        assert!(message(&http::HeaderMap::new()).starts_with("missing API key"));
        assert!(message(&headers(&format!("Basic {key}"))).starts_with("`authorization` must be"));
        assert!(message(&headers("Bearer ")).starts_with("`authorization` must be"));
        assert_eq!(message(&headers("Bearer tk_live_garbage")), "the API key is malformed");
        // The length bound: at it, the value is read (and refused as a key);
        // past it, refused before anything else.
        let at_limit = format!("Bearer {}", "k".repeat(MAX_BEARER_LEN - "Bearer ".len()));
        assert_eq!(message(&headers(&at_limit)), "the API key is malformed");
        let past = format!("{at_limit}k");
        assert!(message(&headers(&past)).starts_with("`authorization` must be"));
    }

    async fn text_of<B>(res: Response<B>) -> (StatusCode, Option<String>, String)
    where
        B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let status = res.status();
        let challenge = res.headers().get(header::WWW_AUTHENTICATE).map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(axum::body::Body::new(res.into_body()), 1024).await.unwrap();
        (status, challenge, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn plain_http_callers_get_the_status_code_and_the_reason_in_either_body() {
        let refused = || Status::unauthenticated("the API key is revoked");
        let want = (StatusCode::UNAUTHORIZED, Some("Bearer".to_owned()), "the API key is revoked\n".to_owned());
        assert_eq!(text_of(reject::<tonic::body::Body>(refused(), false)).await, want);
        assert_eq!(text_of(reject::<axum::body::Body>(refused(), false)).await, want);
        let (code, challenge, _) = text_of(reject::<axum::body::Body>(Status::permission_denied("no"), false)).await;
        assert_eq!((code, challenge), (StatusCode::FORBIDDEN, None));
        let (code, _, _) = text_of(reject::<axum::body::Body>(Status::unavailable("down"), false)).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        // gRPC callers: a trailers-only answer, the status in the headers.
        let grpc = reject::<tonic::body::Body>(refused(), true);
        assert_eq!(grpc.headers().get("grpc-status").unwrap(), "16");
    }

    /// An inner service that is never ready: it reports an error from `poll_ready`.
    #[derive(Clone)]
    struct Down;

    impl Service<Request<axum::body::Body>> for Down {
        type Response = Response<axum::body::Body>;
        type Error = &'static str;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Err("inner service down"))
        }
        fn call(&mut self, _: Request<axum::body::Body>) -> Self::Future {
            std::future::ready(Err("called although not ready"))
        }
    }

    #[tokio::test]
    async fn the_inner_service_readiness_passes_through() {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let client =
            KeysClient::from_channel(channel, crate::domain::secret::SecretString::new("t".repeat(32))).unwrap();
        let mut svc = VerifyLayer::builder(client).build().unwrap().layer(Down);
        let ready = std::future::poll_fn(|cx| Service::<Request<axum::body::Body>>::poll_ready(&mut svc, cx)).await;
        assert_eq!(ready, Err("inner service down"));
    }
}
