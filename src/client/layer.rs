//! The tower layer that puts API-key authentication in front of an internal service.
//!
//! Per request: the route's requirement (by URI path), the bearer key, a look in the verdict
//! cache, else `VerifyKey`. A valid key reaches the inner service with its [`VerifiedKey`] in
//! the extensions; everything else is answered here, as a trailers-only gRPC error for gRPC
//! requests and as 401/403/503 for plain HTTP. Nothing in the request path panics: every
//! failure becomes a response.
//!
//! Revocation is pushed: the layer holds a `WatchKeyChanges` stream to the keys service. While
//! it is up, a verdict is kept until a change of its key arrives (at most the maximum age,
//! default 5 minutes); a change, a resync or a reconnect voids the verdicts it concerns. While
//! the stream is down, verdicts live for the short TTL only (default 5 s) and the stream is
//! retried with backoff. The stream and `VerifyKey` share the client's channel, so both reach
//! the same replica when the channel is one connection (the usual case).

use super::{Denial, KeysClient, Verdict, VerifiedKey};
use crate::{domain::keys, domain::scopes, error::Result};
use futures::future::BoxFuture;
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderValue, Request, Response, StatusCode, header};
use moka::sync::Cache;
use sha2::Sha256;
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
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
    max_age: Duration,
    watch_changes: bool,
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

    /// How long a verdict, positive or negative, is reused while the change stream is down
    /// (default 5 s): what bounds how long a disabled or revoked key keeps working here when
    /// changes cannot be pushed. Zero turns the cache off.
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// How long a verdict is kept while the change stream is up (default 5 minutes): a change
    /// of its key voids it at once; this bounds what a lost change could cost.
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// Whether to subscribe to `WatchKeyChanges` (default true). Without it every verdict
    /// lives for the TTL only.
    pub fn watch_changes(mut self, watch: bool) -> Self {
        self.watch_changes = watch;
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
        let watching = self.watch_changes && !self.cache_ttl.is_zero();
        let lifetime = if watching { self.cache_ttl.max(self.max_age) } else { self.cache_ttl };
        let cache = (!self.cache_ttl.is_zero())
            .then(|| Cache::builder().max_capacity(self.cache_capacity).time_to_live(lifetime).build());
        let mac = Hmac::<Sha256>::new_from_slice(&rand::random::<[u8; 32]>())
            .map_err(|e| crate::Error::internal(anyhow::anyhow!("verdict cache key: {e}")))?;
        let freshness = Arc::new(Freshness::new(self.cache_ttl, self.max_age));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let watcher = watching.then(|| Watcher {
            client: self.client.clone(),
            freshness: freshness.clone(),
            stopped: std::sync::Mutex::new(Some(stopped)),
            started: std::sync::atomic::AtomicBool::new(false),
        });
        let shared = Arc::new(Shared {
            client: self.client,
            rules,
            default,
            cache,
            mac,
            timeout: self.timeout,
            freshness,
            watcher,
            _stop: stop,
        });
        // Inside a runtime the stream opens now (so `is_watching` can gate
        // readiness); outside one, on the first request.
        if let (Some(w), Ok(_)) = (&shared.watcher, tokio::runtime::Handle::try_current()) {
            w.start();
        }
        Ok(VerifyLayer { shared })
    }
}

/// Verifies the API key of every request before the inner service sees it. Wrap a tonic
/// server (`Server::builder().layer(layer)`) or an axum router (`router.layer(layer)`).
#[derive(Clone)]
pub struct VerifyLayer {
    shared: Arc<Shared>,
}

impl VerifyLayer {
    /// True while the change stream is up, i.e. while a revocation reaches this layer's
    /// verdicts as soon as the keys service hears of it (for readiness checks and tests).
    pub fn is_watching(&self) -> bool {
        self.shared.freshness.session.load(Ordering::Acquire) != 0
    }

    pub fn builder(client: KeysClient) -> VerifyLayerBuilder {
        VerifyLayerBuilder {
            client,
            rules: vec![],
            default_scopes: vec![],
            cache_ttl: Duration::from_secs(5),
            max_age: Duration::from_secs(300),
            watch_changes: true,
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
    cache: Option<Cache<[u8; 32], Cached>>,
    mac: Hmac<Sha256>,
    timeout: Duration,
    freshness: Arc<Freshness>,
    /// The change stream, started when the layer is built inside a runtime, else on the first
    /// request; `None` when not watching.
    watcher: Option<Watcher>,
    /// Dropped with the last clone of the layer: the watcher task then ends.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// A cached verdict and what it was cached under.
#[derive(Clone)]
struct Cached {
    verdict: Verdict,
    mark: Mark,
    at: Instant,
}

/// Stripes of per-key change counters: a change voids the verdicts of its stripe's keys only.
const STRIPES: usize = 1024;

/// Where changes stood when a verdict was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    /// Bumped by every resync and (re)connect of the stream.
    global: u64,
    /// The key's stripe counter, bumped by every change of a key in the stripe.
    stripe: u64,
    /// The stream session the verdict was asked under (0: the stream was down).
    session: u64,
}

/// What decides whether a cached verdict may still be used: the change counters the stream
/// moves, and the two lifetimes.
struct Freshness {
    global: AtomicU64,
    stripes: Box<[AtomicU64]>,
    /// The current stream session, 0 while the stream is down.
    session: AtomicU64,
    sessions: AtomicU64,
    ttl: Duration,
    max_age: Duration,
}

impl Freshness {
    fn new(ttl: Duration, max_age: Duration) -> Self {
        Self {
            global: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            session: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            ttl,
            max_age,
        }
    }

    fn stripe(&self, key_id: &str) -> &AtomicU64 {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(key_id);
        &self.stripes[(h % STRIPES as u64) as usize]
    }

    /// Read before asking the keys service: a change that arrives while the question is in
    /// flight moves a counter, and the answer is then never trusted past the first look.
    fn mark(&self, key_id: &str) -> Mark {
        Mark {
            global: self.global.load(Ordering::Acquire),
            stripe: self.stripe(key_id).load(Ordering::Acquire),
            session: self.session.load(Ordering::Acquire),
        }
    }

    fn usable(&self, c: &Cached, key_id: &str) -> bool {
        let now = self.mark(key_id);
        if c.mark.global != now.global || c.mark.stripe != now.stripe {
            return false;
        }
        let pushed = c.mark.session != 0 && c.mark.session == now.session;
        c.at.elapsed() < if pushed { self.max_age } else { self.ttl }
    }

    /// One message of the change stream.
    fn apply(&self, change: &crate::proto::pb::KeyChange) {
        if change.resync { self.resync() } else { self.changed(&change.key_id) }
    }

    fn changed(&self, key_id: &str) {
        self.stripe(key_id).fetch_add(1, Ordering::AcqRel);
    }

    fn resync(&self) {
        self.global.fetch_add(1, Ordering::AcqRel);
    }

    /// The stream is (re)connected: verdicts asked from now on are kept until a change.
    /// Those asked before belong to no session or an older one, so they keep living by the
    /// TTL only: changes made while the stream was down may have been missed, and the TTL is
    /// what bounds a verdict then. (Voiding them would turn the cache cold for nothing, and
    /// take away what a layer can still serve if the keys service goes down next.)
    fn connected(&self) {
        let session = self.sessions.fetch_add(1, Ordering::AcqRel) + 1;
        self.session.store(session, Ordering::Release);
    }

    fn disconnected(&self) {
        self.session.store(0, Ordering::Release);
    }
}

/// Backoff between attempts to (re)open the change stream.
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(100);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// When to try opening the change stream again, and whether a failure is worth a log line.
struct Retry {
    backoff: Duration,
    /// Failures to open are logged once per streak, not once per attempt.
    failing: bool,
}

impl Retry {
    fn new() -> Self {
        Self { backoff: WATCH_BACKOFF_MIN, failing: false }
    }

    /// The stream opened: the next loss starts again from the shortest pause, and its
    /// first failure is logged.
    fn opened(&mut self) {
        *self = Self::new();
    }

    /// An attempt to open failed; true if it is the first of its streak (log it).
    fn failed(&mut self) -> bool {
        !std::mem::replace(&mut self.failing, true)
    }

    /// The pause before the next attempt, drawn from [backoff/2, backoff) so a fleet of
    /// layers does not reconnect in step after a deploy; each pause doubles the next, up
    /// to the maximum.
    fn pause(&mut self, unit: f64) -> Duration {
        let pause = self.backoff.mul_f64(0.5 + unit / 2.0);
        self.backoff = (self.backoff * 2).min(WATCH_BACKOFF_MAX);
        pause
    }
}

struct Watcher {
    client: KeysClient,
    freshness: Arc<Freshness>,
    /// Taken by the task when it starts.
    stopped: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    /// Set once the task is started: the per-request check is one load.
    started: std::sync::atomic::AtomicBool,
}

impl Watcher {
    /// Starts the watch task once, from inside a runtime.
    fn start(&self) {
        if self.started.load(Ordering::Acquire) {
            return;
        }
        let Some(stopped) = self.stopped.lock().ok().and_then(|mut s| s.take()) else { return };
        self.started.store(true, Ordering::Release);
        tokio::spawn(watch(self.client.clone(), self.freshness.clone(), stopped));
    }
}

/// Holds the change stream open until the layer is dropped, reconnecting with backoff.
async fn watch(client: KeysClient, freshness: Arc<Freshness>, mut stopped: tokio::sync::oneshot::Receiver<()>) {
    let mut retry = Retry::new();
    loop {
        let request = crate::proto::pb::WatchKeyChangesRequest { organization_id: None };
        let mut raw = client.raw();
        let opened = tokio::select! {
            _ = &mut stopped => return,
            r = raw.watch_key_changes(request) => r,
        };
        match opened {
            Ok(response) => {
                let mut stream = response.into_inner();
                freshness.connected();
                retry.opened();
                tracing::info!("key change stream up: verdicts are kept until their key changes");
                let ended = loop {
                    let message = tokio::select! {
                        _ = &mut stopped => return,
                        m = stream.message() => m,
                    };
                    match message {
                        Ok(Some(change)) => freshness.apply(&change),
                        Ok(None) => break Status::unavailable("the keys service ended the change stream"),
                        Err(status) => break status,
                    }
                };
                freshness.disconnected();
                tracing::warn!(
                    code = ?ended.code(),
                    message = ended.message(),
                    "key change stream lost: verdicts fall back to the TTL"
                );
            }
            Err(status) => {
                freshness.disconnected();
                if retry.failed() {
                    tracing::warn!(
                        code = ?status.code(),
                        message = status.message(),
                        "cannot open the key change stream: verdicts live for the TTL only; retrying with backoff"
                    );
                }
            }
        }
        let pause = retry.pause(rand::random::<f64>());
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
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
        if let Some(w) = &self.watcher {
            w.start();
        }
        // Only keys `bearer_key` parsed get here; the id is what changes name.
        let key_id = key.get(keys::ID_RANGE).unwrap_or_default();
        let fp = self.fingerprint(key, scopes);
        if let Some(c) = self.cache.as_ref().and_then(|c| c.get(&fp))
            && self.freshness.usable(&c, key_id)
        {
            return Ok(c.verdict);
        }
        let mark = self.freshness.mark(key_id);
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
            c.insert(fp, Cached { verdict: verdict.clone(), mark, at: Instant::now() });
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

    fn cached(f: &Freshness, key_id: &str, age: Duration) -> Cached {
        Cached {
            verdict: Verdict::Denied(Denial::NotFound),
            mark: f.mark(key_id),
            at: Instant::now().checked_sub(age).unwrap(),
        }
    }

    #[test]
    fn verdicts_live_until_a_change_while_watching_and_for_the_ttl_otherwise() {
        let f = Freshness::new(Duration::from_secs(5), Duration::from_secs(300));
        // No stream: the TTL decides.
        assert!(f.usable(&cached(&f, "k1", Duration::from_secs(4)), "k1"));
        assert!(!f.usable(&cached(&f, "k1", Duration::from_secs(6)), "k1"));
        let old = cached(&f, "k1", Duration::ZERO);
        f.connected();
        // Pushed: kept up to the maximum age.
        assert!(f.usable(&cached(&f, "k1", Duration::from_secs(60)), "k1"));
        assert!(!f.usable(&cached(&f, "k1", Duration::from_secs(301)), "k1"));
        assert!(f.usable(&old, "k1"), "a verdict from before the stream still lives by the TTL");
        // A change voids its key's verdicts, not another stripe's.
        let (k1, k2) = (cached(&f, "k1", Duration::ZERO), cached(&f, "k2", Duration::ZERO));
        f.changed("k1");
        assert!(!f.usable(&k1, "k1"), "a changed key's verdict survived");
        let same_stripe = std::ptr::eq(f.stripe("k1"), f.stripe("k2"));
        assert_eq!(f.usable(&k2, "k2"), !same_stripe);
        // A change during the question: the answer is not trusted.
        let asked = cached(&f, "k3", Duration::ZERO);
        f.changed("k3");
        assert!(!f.usable(&asked, "k3"));
        // A resync voids everything.
        let k4 = cached(&f, "k4", Duration::ZERO);
        f.resync();
        assert!(!f.usable(&k4, "k4"));
        // The stream lost: pushed verdicts fall back to the TTL.
        let pushed = cached(&f, "k5", Duration::from_secs(60));
        assert!(f.usable(&pushed, "k5"));
        f.disconnected();
        assert!(!f.usable(&pushed, "k5"), "a pushed verdict outlived the TTL with the stream down");
        assert!(f.usable(&cached(&f, "k5", Duration::from_secs(1)), "k5"));
        // A new session does not revive verdicts of the old one.
        f.connected();
        assert!(!f.usable(&pushed, "k5"));
    }

    fn unreachable_client() -> KeysClient {
        // Port 9 (discard) has no keys service: the stream can never open.
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        KeysClient::from_channel(channel, crate::domain::secret::SecretString::new("t".repeat(32))).unwrap()
    }

    #[tokio::test]
    async fn the_change_stream_is_watched_only_when_asked_for_and_there_is_a_cache() {
        let watcher = |b: VerifyLayerBuilder| b.build().unwrap().shared.watcher.is_some();
        assert!(watcher(VerifyLayer::builder(unreachable_client())));
        assert!(!watcher(VerifyLayer::builder(unreachable_client()).watch_changes(false)));
        assert!(!watcher(VerifyLayer::builder(unreachable_client()).cache_ttl(Duration::ZERO)));
    }

    #[tokio::test]
    async fn a_layer_whose_stream_is_not_up_says_it_is_not_watching() {
        let layer = VerifyLayer::builder(unreachable_client()).build().unwrap();
        // Its watch task is trying (and failing) to open the stream meanwhile.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!layer.is_watching());
    }

    #[test]
    fn a_resync_message_voids_every_verdict_and_a_change_only_its_keys() {
        use crate::proto::pb::KeyChange;
        let f = Freshness::new(Duration::from_secs(5), Duration::from_secs(300));
        let change = |key_id: &str| KeyChange { key_id: key_id.into(), ..Default::default() };
        let (k1, k2) = (cached(&f, "k1", Duration::ZERO), cached(&f, "k2", Duration::ZERO));
        let k2_other_stripe = !std::ptr::eq(f.stripe("k1"), f.stripe("k2"));
        assert!(k2_other_stripe, "the test needs two keys on different stripes");
        f.apply(&change("k1"));
        assert!(!f.usable(&k1, "k1"));
        assert!(f.usable(&k2, "k2"), "a change of k1 voided k2");
        f.apply(&KeyChange { resync: true, ..Default::default() });
        assert!(!f.usable(&k2, "k2"), "a resync left a verdict standing");
    }

    #[test]
    fn reconnecting_backs_off_with_jitter_and_logs_a_failure_once_per_streak() {
        let mut retry = Retry::new();
        assert!(retry.failed(), "the first failure is logged");
        assert!(!retry.failed() && !retry.failed(), "later ones of the streak are not");
        // Pauses are drawn from [backoff/2, backoff) and double up to the maximum.
        assert_eq!(retry.pause(0.0), WATCH_BACKOFF_MIN / 2);
        assert_eq!(retry.pause(1.0), WATCH_BACKOFF_MIN * 2);
        assert_eq!(retry.pause(0.5), WATCH_BACKOFF_MIN * 3);
        for _ in 0..20 {
            retry.pause(0.0);
        }
        assert_eq!(retry.pause(1.0), WATCH_BACKOFF_MAX);
        retry.opened();
        assert_eq!(retry.pause(1.0), WATCH_BACKOFF_MIN, "an open stream resets the backoff");
        assert!(retry.failed(), "and the next streak's first failure is logged");
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
        let mut svc = VerifyLayer::builder(unreachable_client()).build().unwrap().layer(Down);
        let ready = std::future::poll_fn(|cx| Service::<Request<axum::body::Body>>::poll_ready(&mut svc, cx)).await;
        assert_eq!(ready, Err("inner service down"));
    }
}
