//! The `client` feature end to end: `KeysClient` and `VerifyLayer` against the real server,
//! in front of the downstream service of `examples/protected_service.rs` (the same code,
//! included below) and in front of an axum router.

use crate::common;
#[path = "../../examples/protected_service.rs"]
#[allow(dead_code)]
mod protected_service;

use axum::{Extension, Router, body::Body as AxumBody, routing::get};
use common::{Backend, SERVICE_TOKEN, TestApp, as_service};
use std::time::{Duration, Instant};
use takumo_keys::{
    client::{Denial, KeysClient, Verdict, VerifiedKey, VerifyLayer},
    domain::model::Environment,
    domain::secret::SecretString,
    proto::pb::{self, create_key_request::Scopes},
};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{Code, Request, Status, metadata::MetadataValue, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tower::ServiceExt;

/// Not a key at all: the layer refuses it without asking the keys service.
const GARBAGE: &str = "tk_live_not-a-key";

/// Creates a key of org `acme` holding exactly `scopes`; returns its id and secret.
async fn create_key(app: &TestApp, scopes: &[&str]) -> (String, String) {
    let req = pb::CreateKeyRequest {
        organization_id: "acme".into(),
        name: "downstream".into(),
        scopes: Some(Scopes::Custom(pb::ScopeList { scopes: scopes.iter().map(|s| s.to_string()).collect() })),
        ..Default::default()
    };
    let r = app.client.clone().create_key(as_service(req, "alice")).await.expect("create key").into_inner();
    (r.key.expect("key").id, r.secret)
}

async fn keys_client(app: &TestApp) -> KeysClient {
    KeysClient::connect(format!("http://{}", app.addr), SecretString::new(SERVICE_TOKEN)).await.expect("connect")
}

/// The example's service on an ephemeral port, stopped when dropped.
struct Downstream {
    channel: Channel,
    _stop: oneshot::Sender<()>,
}

impl Downstream {
    async fn spawn(app: &TestApp, cache_ttl: Duration) -> Self {
        let layer = protected_service::routes(keys_client(app).await).cache_ttl(cache_ttl).build().expect("layer");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(protected_service::serve(listener, layer, async {
            let _ = rx.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        Self { channel, _stop: tx }
    }

    /// `grpc.health.v1.Health/Check`, which needs `fleet.read`.
    async fn check(&self, auth: Option<&str>) -> Result<ServingStatus, Status> {
        let r = HealthClient::new(self.channel.clone()).check(request(HealthCheckRequest::default(), auth)).await?;
        Ok(r.into_inner().status())
    }

    /// `demo.v1.Whoami/Get`, which any valid key may call and which echoes what the handler saw.
    async fn whoami(&self, auth: Option<&str>) -> Result<String, Status> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
        let path = http::uri::PathAndQuery::from_static(protected_service::WHOAMI_PATH);
        let codec = tonic_prost::ProstCodec::<(), String>::default();
        Ok(grpc.unary(request((), auth), path, codec).await?.into_inner())
    }
}

fn request<T>(msg: T, auth: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(a) = auth {
        r.metadata_mut().insert("authorization", MetadataValue::try_from(a).unwrap());
    }
    r
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_client_tells_valid_keys_from_denials_and_signs_raw_calls_with_the_service_token() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (id, secret) = create_key(&app, &["fleet.read"]).await;
    let keys = keys_client(&app).await;

    let Verdict::Valid(k) = keys.verify(&secret, &["fleet.read"]).await.unwrap() else { panic!("valid key denied") };
    assert_eq!((k.key_id.as_str(), k.organization_id.as_str(), k.created_by.as_str()), (id.as_str(), "acme", "alice"));
    assert_eq!(
        (k.scopes, k.environment, k.name.as_str()),
        (vec!["fleet.read".to_string()], Environment::Live, "downstream")
    );

    let Verdict::Denied(d) = keys.verify(&secret, &["fleet.read", "audit.export"]).await.unwrap() else {
        panic!("a missing scope verified")
    };
    assert_eq!(
        (d.code(), &d),
        (pb::VerifyCode::InsufficientScope, &Denial::InsufficientScope(vec!["audit.export".into()]))
    );
    assert_eq!(d.to_status().code(), Code::PermissionDenied);
    let garbage = keys.verify(GARBAGE, &[] as &[&str]).await.unwrap();
    assert_eq!(garbage.into_result().unwrap_err().code(), Code::Unauthenticated);

    // The raw client carries the service token too.
    let scopes = keys.raw().list_scopes(pb::ListScopesRequest {}).await.expect("raw call").into_inner();
    assert!(!scopes.groups.is_empty());

    // A refused service token is an error, never a denial of the key.
    let wrong = KeysClient::connect(format!("http://{}", app.addr), SecretString::new("x".repeat(40))).await.unwrap();
    assert_eq!(wrong.verify(&secret, &["fleet.read"]).await.unwrap_err().code(), Code::Unauthenticated);
    assert!(!format!("{wrong:?}").contains("xxxx"), "the service token leaked into Debug");

    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let err = KeysClient::connect(format!("http://{closed}"), SecretString::new(SERVICE_TOKEN)).await.unwrap_err();
    assert!(matches!(err, takumo_keys::Error::Unavailable { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_callers_need_a_valid_key_holding_the_routes_scopes() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (reader_id, reader) = create_key(&app, &["fleet.read"]).await;
    let (_, auditor) = create_key(&app, &["audit.read"]).await;
    let svc = Downstream::spawn(&app, Duration::from_secs(5)).await;
    let bad_checksum = format!("{}{}", &reader[..reader.len() - 1], if reader.ends_with('A') { 'B' } else { 'A' });

    for (auth, want) in [
        (None, "missing API key"),
        (Some("Basic dXNlcjpwYXNz".to_string()), "Bearer <API key>"),
        (Some("Bearer ".to_string()), "Bearer <API key>"),
        (Some(bearer(GARBAGE)), "malformed"),
        (Some(bearer(&bad_checksum)), "malformed"),
    ] {
        let err = svc.check(auth.as_deref()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{auth:?}: {}", err.message());
        assert!(err.message().contains(want), "{auth:?}: {}", err.message());
    }
    // Well-formed but never issued: only the keys service can tell.
    let unknown = takumo_keys::domain::keys::generate(takumo_keys::domain::model::Environment::Live);
    let err = svc.check(Some(&bearer(unknown.full.expose()))).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "the API key is invalid"));

    let err = svc.check(Some(&bearer(&auditor))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("fleet.read"), "{}", err.message());
    assert_eq!(svc.check(Some(&bearer(&reader))).await.unwrap(), ServingStatus::Serving);
    // Twice: the second answer comes from the layer's cache and must be the same.
    assert_eq!(svc.check(Some(&bearer(&reader))).await.unwrap(), ServingStatus::Serving);
    assert_eq!(svc.check(Some(&bearer(&auditor))).await.unwrap_err().code(), Code::PermissionDenied);

    // Whoami needs no scope, and its handler sees who called.
    assert_eq!(svc.whoami(Some(&bearer(&reader))).await.unwrap(), format!("{reader_id} acme alice"));
    assert_eq!(svc.whoami(Some(&format!("bearer  {reader} "))).await.unwrap(), format!("{reader_id} acme alice"));
    assert!(svc.whoami(Some(&bearer(&auditor))).await.is_ok());
    assert_eq!(svc.whoami(None).await.unwrap_err().code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_key_is_refused_once_the_layers_cache_ttl_has_passed() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (id, secret) = create_key(&app, &["fleet.read"]).await;
    let svc = Downstream::spawn(&app, Duration::from_millis(200)).await;
    assert_eq!(svc.check(Some(&bearer(&secret))).await.unwrap(), ServingStatus::Serving);

    let disable = pb::SetKeyStatusRequest { id, status: pb::KeyStatus::Disabled as i32 };
    app.client.clone().set_key_status(as_service(disable, "alice")).await.expect("disable");
    let deadline = Instant::now() + Duration::from_secs(5);
    let err = loop {
        match svc.check(Some(&bearer(&secret))).await {
            Err(e) => break e,
            Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(_) => panic!("the disabled key still passes after 5 s"),
        }
    };
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "the API key is disabled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_keys_service_is_unavailable_never_an_invalid_key() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (_, cached) = create_key(&app, &["fleet.read"]).await;
    let (_, uncached) = create_key(&app, &["fleet.read"]).await;
    let svc = Downstream::spawn(&app, Duration::from_secs(60)).await;
    let http = axum_app(&app).await;
    assert_eq!(svc.check(Some(&bearer(&cached))).await.unwrap(), ServingStatus::Serving);

    app.shutdown().await;
    let err = svc.check(Some(&bearer(&uncached))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    let (status, _, _) = call(&http, "/fleet", Some(&uncached)).await;
    assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE);
    // A verdict the layer already holds keeps serving through the outage.
    assert_eq!(svc.check(Some(&bearer(&cached))).await.unwrap(), ServingStatus::Serving);
}

/// An axum router behind the layer: `/fleet` needs `fleet.read` and echoes the key id,
/// `/healthz` is public.
async fn axum_app(app: &TestApp) -> Router {
    let layer = VerifyLayer::builder(keys_client(app).await)
        .require("/fleet", ["fleet.read"])
        .public("/healthz")
        .build()
        .expect("layer");
    Router::new()
        .route("/fleet", get(|Extension(k): Extension<VerifiedKey>| async move { k.key_id }))
        .route("/healthz", get(|| async { "ok" }))
        .layer(layer)
}

/// Sends a GET over plain HTTP; returns status, `WWW-Authenticate` and body.
async fn call(router: &Router, path: &str, key: Option<&str>) -> (http::StatusCode, Option<String>, String) {
    let mut req = http::Request::get(path);
    if let Some(k) = key {
        req = req.header("authorization", bearer(k));
    }
    let res = router.clone().oneshot(req.body(AxumBody::empty()).unwrap()).await.unwrap();
    let www = res.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
    let status = res.status();
    let body = axum::body::to_bytes(res.into_body(), 64 * 1024).await.unwrap();
    (status, www, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_callers_get_401_or_403_and_handlers_get_the_verified_key() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (id, reader) = create_key(&app, &["fleet.read"]).await;
    let (_, auditor) = create_key(&app, &["audit.read"]).await;
    let router = axum_app(&app).await;

    let (status, www, body) = call(&router, "/fleet", None).await;
    assert_eq!((status, www.as_deref()), (http::StatusCode::UNAUTHORIZED, Some("Bearer")));
    assert!(body.contains("missing API key"), "{body}");
    let (status, www, _) = call(&router, "/fleet", Some(GARBAGE)).await;
    assert_eq!((status, www.as_deref()), (http::StatusCode::UNAUTHORIZED, Some("Bearer")));
    let (status, www, body) = call(&router, "/fleet", Some(&auditor)).await;
    assert_eq!((status, www), (http::StatusCode::FORBIDDEN, None));
    assert!(body.contains("fleet.read"), "{body}");
    assert_eq!(call(&router, "/fleet", Some(&reader)).await, (http::StatusCode::OK, None, id));
    assert_eq!(call(&router, "/healthz", None).await, (http::StatusCode::OK, None, "ok".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_matching_route_decides_which_scopes_are_needed() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (_, reader) = create_key(&app, &["fleet.read"]).await;
    let (_, manager) = create_key(&app, &["fleet.read", "fleet.manage"]).await;
    // Declared shortest first and longest first: the order must not matter.
    for longest_first in [false, true] {
        let mut builder = VerifyLayer::builder(keys_client(&app).await);
        let rules: [(&str, &[&str]); 2] = [("/fleet/", &["fleet.read"]), ("/fleet/drain", &["fleet.manage"])];
        for (path, scopes) in if longest_first { [rules[1], rules[0]] } else { rules } {
            builder = builder.require(path, scopes.iter().copied());
        }
        let router = Router::new()
            .route("/fleet/status", get(|| async { "status" }))
            .route("/fleet/drain", get(|| async { "drained" }))
            .layer(builder.build().expect("layer"));
        assert_eq!(call(&router, "/fleet/status", Some(&reader)).await.0, http::StatusCode::OK);
        let (status, _, body) = call(&router, "/fleet/drain", Some(&reader)).await;
        assert_eq!(status, http::StatusCode::FORBIDDEN, "a fleet.read key reached a fleet.manage route");
        assert!(body.contains("fleet.manage"), "{body}");
        assert_eq!(call(&router, "/fleet/drain", Some(&manager)).await.0, http::StatusCode::OK);
    }
}
