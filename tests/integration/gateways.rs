//! Proxies enforcing keys by configuration alone: HTTP forward-auth on the
//! HTTP listener (`/v1/authz`, as nginx `auth_request` calls it) and Envoy's
//! ext_authz (`envoy.service.auth.v3.Authorization/Check`) through a tonic
//! client built from `envoy-types`. Every row of both contracts; the real
//! nginx in front of the endpoint is in `nginx.rs`.

use crate::common::{self, Backend, SERVICE_TOKEN, TestApp, TestDb, as_service, cluster::PgCluster, with_bearer};
use envoy_types::pb::envoy::{
    config::core::v3::{HeaderMap, HeaderValue},
    service::auth::v3::{
        AttributeContext, CheckRequest, CheckResponse, attribute_context, authorization_client::AuthorizationClient,
        check_response::HttpResponse,
    },
};
use std::{collections::HashMap, sync::Arc};
use takumo_keys::proto::pb::{self, create_key_request::Scopes};
use tonic::{Code, transport::Channel};

const REALM: &str = "Bearer realm=\"takumo\"";

fn scopes(s: &[&str]) -> Option<Scopes> {
    Some(Scopes::Custom(pb::ScopeList { scopes: s.iter().map(|s| s.to_string()).collect() }))
}

async fn app_on(db: Arc<TestDb>) -> TestApp {
    TestApp::spawn_on(db, |url| {
        let mut a = common::serve_args(url);
        a.http_listen = Some("127.0.0.1:0".parse().unwrap());
        a.usage_flush_interval_ms = 60_000;
        a.store.db_acquire_timeout_ms = 1_000;
        a
    })
    .await
}

async fn app(b: Backend) -> TestApp {
    app_on(Arc::new(TestDb::new(b).await)).await
}

/// A forward-auth answer: status, headers, body.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

async fn authz(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> Answer {
    let url = format!("http://{}{path}", app.http_addr.unwrap());
    let mut req = reqwest::Client::new().get(url).timeout(common::RPC_DEADLINE);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.expect("forward-auth request");
    let (status, headers) = (res.status().as_u16(), res.headers().clone());
    Answer { status, headers, body: res.text().await.unwrap() }
}

async fn set_status(app: &TestApp, id: &str, status: pb::KeyStatus) {
    let req = pb::SetKeyStatusRequest { id: id.into(), status: status as i32 };
    app.client.clone().set_key_status(as_service(req, "alice")).await.expect("set status");
}

async fn revoke(app: &TestApp, id: &str) {
    app.client.clone().revoke_key(as_service(pb::RevokeKeyRequest { id: id.into() }, "alice")).await.expect("revoke");
}

/// Keys in every state a refusal can come from, each in `acme`.
struct Keys {
    reader: (String, String),
    auditor: String,
    disabled: String,
    revoked: String,
    expired: String,
    unknown: String,
}

async fn keys(app: &TestApp) -> Keys {
    app.set_plan("acme", pb::Plan::Enterprise).await;
    let (reader, reader_secret) = app.create("acme", scopes(&["fleet.read", "api_keys.read"])).await;
    let (_, auditor) = app.create("acme", scopes(&["audit.read"])).await;
    let workspace = Some(Scopes::Preset(pb::ScopePreset::Workspace as i32));
    let (d, disabled) = app.create("acme", workspace.clone()).await;
    set_status(app, &d.id, pb::KeyStatus::Disabled).await;
    let (r, revoked) = app.create("acme", workspace).await;
    revoke(app, &r.id).await;
    let expired = common::expired_key(app, "acme").await;
    // Our shape and checksum, but no such key.
    let unknown = takumo_keys::domain::keys::compose(
        takumo_keys::domain::model::Environment::Live,
        "ZZZZZZZZZZZZZZZZ",
        &"s".repeat(takumo_keys::domain::keys::SECRET_LEN),
    )
    .expose()
    .to_owned();
    Keys { reader: (reader.id, reader_secret), auditor, disabled, revoked, expired, unknown }
}

/// The count of one gateway decision in the metrics.
fn decisions(app: &TestApp, protocol: &str, decision: &str) -> u64 {
    let want = format!("takumo_keys_gateway_decisions_total{{protocol=\"{protocol}\",decision=\"{decision}\"}} ");
    app.metrics.encode().lines().find_map(|l| l.strip_prefix(&want)).map_or(0, |v| v.parse().unwrap())
}

/// Every decision a protocol made in a test, by label.
fn assert_decisions_counted(app: &TestApp, protocol: &str, labels: &[&str]) {
    for label in labels {
        assert!(decisions(app, protocol, label) > 0, "no {protocol} decision {label} counted");
    }
}

fn valid_outcomes(app: &TestApp) -> u64 {
    let encoded = app.metrics.encode();
    encoded
        .lines()
        .find(|l| l.starts_with("takumo_keys_verify_outcomes_total{code=\"valid\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse().unwrap())
}

async fn forward_auth_answers_every_row_of_its_contract(b: Backend) {
    let app = app(b).await;
    let k = keys(&app).await;
    let token = ("x-takumo-service-token", SERVICE_TOKEN);
    let (reader_id, reader) = (&k.reader.0, k.reader.1.as_str());
    let bearer = format!("Bearer {reader}");

    // The proxy itself must authenticate; without that nothing is verified.
    let before = app.metrics.cache_misses.get() + app.metrics.cache_hits.get();
    for proxy in [vec![], vec![("x-takumo-service-token", "not-a-configured-token-0123456789abcdef")]] {
        let mut h = proxy;
        h.push(("authorization", &bearer));
        let a = authz(&app, "/v1/authz", &h).await;
        assert_eq!(a.status, 401, "{}", a.body);
        assert_eq!(a.header("www-authenticate"), None, "a proxy's mistake is no challenge to the client");
        assert!(a.body.contains("x-takumo-service-token"), "{}", a.body);
    }
    assert_eq!(app.metrics.cache_misses.get() + app.metrics.cache_hits.get(), before, "a key was verified");

    // Allowed: the identity headers for the upstream, from a bearer or X-Api-Key,
    // on /v1/authz and any path below it.
    let needs = ("x-takumo-required-scopes", "fleet.read, api_keys.read");
    for (path, key_header) in
        [("/v1/authz", ("authorization", bearer.as_str())), ("/v1/authz/fleet/instances?x=1", ("x-api-key", reader))]
    {
        let a = authz(&app, path, &[token, key_header, needs, ("x-takumo-organization", "acme")]).await;
        assert_eq!(a.status, 200, "{path}: {}", a.body);
        assert_eq!(a.header("x-takumo-key-id"), Some(reader_id.as_str()));
        assert_eq!(a.header("x-takumo-organization"), Some("acme"));
        assert_eq!(a.header("x-takumo-environment"), Some("live"));
        assert_eq!(a.header("x-takumo-scopes"), Some("api_keys.read fleet.read"));
    }
    // Any method.
    let url = format!("http://{}/v1/authz", app.http_addr.unwrap());
    let posted = reqwest::Client::new()
        .post(&url)
        .header(token.0, token.1)
        .header("authorization", &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status().as_u16(), 200);

    // 401 with the challenge, one body for every bad key.
    let mut bodies = vec![];
    for (what, key) in [
        ("missing", None),
        ("malformed", Some("tk_live_garbage")),
        ("unknown", Some(k.unknown.as_str())),
        ("disabled", Some(k.disabled.as_str())),
        ("revoked", Some(k.revoked.as_str())),
        ("expired", Some(k.expired.as_str())),
    ] {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut h = vec![token];
        if let Some(a) = &auth {
            h.push(("authorization", a));
        }
        let a = authz(&app, "/v1/authz", &h).await;
        assert_eq!(a.status, 401, "{what}: {}", a.body);
        assert_eq!(a.header("www-authenticate"), Some(REALM), "{what}");
        assert_eq!(a.header("x-takumo-key-id"), None, "{what}");
        bodies.push(a.body);
    }
    bodies.dedup();
    assert_eq!(bodies.len(), 1, "refusals tell keys apart: {bodies:?}");

    // 403: the scopes missing, or the wrong organization.
    let a =
        authz(&app, "/v1/authz", &[token, ("x-api-key", &k.auditor), ("x-takumo-required-scopes", "fleet.read")]).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(a.header("x-takumo-missing-scopes"), Some("fleet.read"));
    let a = authz(&app, "/v1/authz", &[token, ("authorization", &bearer), ("x-takumo-organization", "globex")]).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("another organization"), "{}", a.body);

    // 400: the proxy's configuration names a scope that does not exist.
    let a = authz(&app, "/v1/authz", &[token, ("authorization", &bearer), ("x-takumo-required-scopes", "fleet.raed")])
        .await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.contains("fleet.raed"), "{}", a.body);
    let a = authz(&app, "/v1/authz", &[token, ("authorization", &bearer), ("x-takumo-organization", "ac me")]).await;
    assert_eq!(a.status, 400, "{}", a.body);

    // The same path as VerifyKey: counted as a valid verification and as the key's API call.
    let valid = valid_outcomes(&app);
    let a = authz(&app, "/v1/authz", &[token, ("authorization", &bearer)]).await;
    assert_eq!(a.status, 200);
    assert_eq!(valid_outcomes(&app), valid + 1, "forward-auth is not counted as a verification");
    app.usage.flush().await.unwrap();
    let stats = app.store.key_stats("acme", chrono::Utc::now()).await.unwrap();
    assert!(stats.api_calls_24h >= 4, "forward-auth calls were not counted as API calls: {stats:?}");
    let labels = ["proxy_unauthenticated", "allow", "unauthenticated", "forbidden", "bad_request"];
    assert_decisions_counted(&app, "http", &labels);
    assert_eq!(decisions(&app, "ext_authz", "allow"), 0, "counted under the wrong protocol");
}

fn check_request(headers: &[(&str, &str)], extensions: &[(&str, &str)]) -> CheckRequest {
    let http = attribute_context::HttpRequest {
        method: "GET".into(),
        path: "/fleet/instances".into(),
        headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request { http: Some(http), ..Default::default() }),
            context_extensions: extensions.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }),
    }
}

async fn envoy(app: &TestApp) -> AuthorizationClient<Channel> {
    AuthorizationClient::new(app.channel.clone())
}

/// Check as Envoy calls it: the service token in the call's own metadata.
async fn check(c: &mut AuthorizationClient<Channel>, req: CheckRequest) -> CheckResponse {
    c.check(with_bearer(req, SERVICE_TOKEN)).await.expect("Check is an OK call").into_inner()
}

fn headers_of(opts: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]) -> HashMap<String, String> {
    opts.iter().filter_map(|o| o.header.as_ref()).map(|h| (h.key.clone(), h.value.clone())).collect()
}

fn denied(r: &CheckResponse) -> (i32, u32, HashMap<String, String>, String) {
    let Some(HttpResponse::DeniedResponse(d)) = &r.http_response else { panic!("no denied_response: {r:?}") };
    let code = r.status.as_ref().unwrap().code;
    (code, d.status.as_ref().unwrap().code as u32, headers_of(&d.headers), d.body.clone())
}

async fn ext_authz_answers_every_row_of_its_contract(b: Backend) {
    let app = app(b).await;
    let k = keys(&app).await;
    let mut c = envoy(&app).await;
    let (reader_id, reader) = (&k.reader.0, k.reader.1.as_str());
    let bearer = format!("Bearer {reader}");
    let route = [("takumo.required_scopes", "fleet.read api_keys.read"), ("takumo.organization", "acme")];

    // The proxy itself: no credential, or an API key, is a broken call.
    let e = c.check(check_request(&[("authorization", &bearer)], &route)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = c.check(with_bearer(check_request(&[("authorization", &bearer)], &route), reader)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Allowed: identity headers set (overwriting what a client sent), the key's headers removed.
    for key_header in [("authorization", bearer.as_str()), ("x-api-key", reader)] {
        let r = check(&mut c, check_request(&[key_header, ("x-takumo-key-id", "forged")], &route)).await;
        assert_eq!(r.status.as_ref().unwrap().code, Code::Ok as i32, "{r:?}");
        let Some(HttpResponse::OkResponse(ok)) = &r.http_response else { panic!("no ok_response: {r:?}") };
        let h = headers_of(&ok.headers);
        assert_eq!(h["x-takumo-key-id"], *reader_id);
        assert_eq!(h["x-takumo-organization"], "acme");
        assert_eq!(h["x-takumo-environment"], "live");
        assert_eq!(h["x-takumo-scopes"], "api_keys.read fleet.read");
        let overwrite = envoy_types::ext_authz::v3::pb::HeaderAppendAction::OverwriteIfExistsOrAdd as i32;
        assert!(ok.headers.iter().all(|o| o.append_action == overwrite), "a client could add its own identity");
        assert_eq!(ok.headers_to_remove, ["authorization", "x-api-key"]);
    }
    // Raw headers (`encode_raw_headers`) carry the key in `header_map`.
    let mut raw = check_request(&[], &route);
    let http = raw.attributes.as_mut().unwrap().request.as_mut().unwrap().http.as_mut().unwrap();
    http.header_map = Some(HeaderMap {
        headers: vec![HeaderValue {
            key: "authorization".into(),
            raw_value: bearer.clone().into(),
            ..Default::default()
        }],
    });
    assert_eq!(check(&mut c, raw).await.status.unwrap().code, Code::Ok as i32);

    // Denied 401, with the challenge and one body for every bad key.
    let mut bodies = vec![];
    for key in [None, Some("tk_live_garbage"), Some(&k.unknown), Some(&k.disabled), Some(&k.revoked), Some(&k.expired)]
    {
        let auth = key.map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let (code, http, h, body) = denied(&check(&mut c, check_request(&headers, &route)).await);
        assert_eq!((code, http), (Code::Unauthenticated as i32, 401), "{key:?}");
        assert_eq!(h.get("www-authenticate").map(String::as_str), Some(REALM));
        bodies.push(body);
    }
    bodies.dedup();
    assert_eq!(bodies.len(), 1, "denials tell keys apart: {bodies:?}");

    // Denied 403: missing scopes, wrong organization.
    let r = check(&mut c, check_request(&[("x-api-key", &k.auditor)], &route[..1])).await;
    let (code, http, h, _) = denied(&r);
    assert_eq!((code, http), (Code::PermissionDenied as i32, 403));
    assert_eq!(h["x-takumo-missing-scopes"], "api_keys.read fleet.read");
    let r = check(&mut c, check_request(&[("authorization", &bearer)], &[("takumo.organization", "globex")])).await;
    let (code, http, _, body) = denied(&r);
    assert_eq!((code, http), (Code::PermissionDenied as i32, 403));
    assert!(body.contains("another organization"), "{body}");

    // A route setting naming no real scope: a broken call, not a denial.
    let bad = check_request(&[("authorization", &bearer)], &[("takumo.required_scopes", "fleet.raed")]);
    let e = c.check(with_bearer(bad, SERVICE_TOKEN)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("fleet.raed"), "{}", e.message());
    let labels = ["proxy_unauthenticated", "allow", "unauthenticated", "forbidden", "bad_request"];
    assert_decisions_counted(&app, "ext_authz", &labels);
}

/// With the store down and nothing cached, both protocols say "cannot
/// decide" (503 / error_response), never "denied"; a key cached before the
/// outage is still allowed (fail static).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_store_down_gateways_get_503_for_uncached_keys_and_allow_cached_ones() {
    let pg = PgCluster::start();
    let app = app_on(Arc::new(TestDb::external(pg.url("postgres")))).await;
    let (_, cached) = app.create("acme", scopes(&["fleet.read"])).await;
    let (_, cold) = app.create("acme", scopes(&["fleet.read"])).await;
    let token = ("x-takumo-service-token", SERVICE_TOKEN);
    let cached_auth = format!("Bearer {cached}");
    assert_eq!(authz(&app, "/v1/authz", &[token, ("authorization", &cached_auth)]).await.status, 200);
    let mut c = envoy(&app).await;
    pg.stop();

    let a = authz(&app, "/v1/authz", &[token, ("x-api-key", &cold)]).await;
    assert_eq!(a.status, 503, "{}", a.body);
    let r = check(&mut c, check_request(&[("x-api-key", &cold)], &[])).await;
    assert_eq!(r.status.as_ref().unwrap().code, Code::Unavailable as i32);
    let Some(HttpResponse::ErrorResponse(e)) = &r.http_response else { panic!("no error_response: {r:?}") };
    assert_eq!(e.status.as_ref().unwrap().code, 503);

    assert_eq!(authz(&app, "/v1/authz", &[token, ("authorization", &cached_auth)]).await.status, 200);
    let r = check(&mut c, check_request(&[("authorization", &cached_auth)], &[])).await;
    assert_eq!(r.status.unwrap().code, Code::Ok as i32);
    assert_decisions_counted(&app, "http", &["unavailable"]);
    assert_decisions_counted(&app, "ext_authz", &["unavailable"]);
}

/// grpcurl finds ext_authz through reflection, with the message types it needs.
async fn ext_authz_is_listed_in_reflection_with_its_messages(b: Backend) {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let app = app(b).await;
    let channel = Channel::from_shared(format!("http://{}", app.addr)).unwrap().connect().await.unwrap();
    let mut refl = ServerReflectionClient::new(channel);
    let reqs = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "envoy.service.auth.v3.AttributeContext.HttpRequest".into(),
            )),
        },
    ];
    let mut stream = refl.server_reflection_info(futures::stream::iter(reqs)).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("no list")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"envoy.service.auth.v3.Authorization".to_string()), "{names:?}");
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("the request attributes' file is not served")
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

crate::for_each_backend!(
    forward_auth_answers_every_row_of_its_contract,
    ext_authz_answers_every_row_of_its_contract,
    ext_authz_is_listed_in_reflection_with_its_messages,
);
