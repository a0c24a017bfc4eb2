//! Running it in production: the metrics endpoint, health that follows the
//! store, graceful shutdown on SIGTERM, and OpenTelemetry export.

use crate::common;

use common::{Backend, ServerProcess, TestApp, TestDb, as_service};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use takumo_keys::proto::pb;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

async fn create(client: &mut common::Client) -> String {
    common::create_read_only(client, "acme", None).await.unwrap().secret
}

fn verify_req(key: &str) -> tonic::Request<pb::VerifyKeyRequest> {
    as_service(
        pb::VerifyKeyRequest { key: key.into(), required_scopes: vec!["fleet.read".into()], organization_id: None },
        "svc",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_exposes_rpc_verify_cache_and_pool_metrics() {
    let db = Arc::new(TestDb::new(Backend::Postgres).await);
    let app = TestApp::spawn_on(db, |url| {
        let mut a = common::serve_args(url);
        a.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        a
    })
    .await;
    let mut c = app.client.clone();
    let key = create(&mut c).await;
    for _ in 0..3 {
        assert!(c.verify_key(verify_req(&key)).await.unwrap().into_inner().valid);
    }
    c.verify_key(verify_req("tk_live_garbage")).await.unwrap();
    let _ = c.get_key(as_service(pb::GetKeyRequest { id: "0000000000000000".into() }, "a")).await;

    let url = format!("http://{}/metrics", app.metrics_addr.expect("metrics enabled"));
    // Content negotiation: OpenMetrics when asked for (as Prometheus asks),
    // the Prometheus text format otherwise; the samples are the same.
    let plain = reqwest::get(&url).await.expect("scrape");
    assert!(plain.status().is_success());
    assert!(plain.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = plain.text().await.unwrap();
    assert!(text.contains("# TYPE takumo_keys_verify_outcomes_total counter"), "{text}");
    let resp = reqwest::Client::new()
        .get(&url)
        .header("accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        .send()
        .await
        .expect("scrape");
    assert!(resp.status().is_success());
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let body = resp.text().await.unwrap();
    assert!(body.contains("# TYPE takumo_keys_verify_outcomes counter") && body.ends_with("# EOF\n"), "{body}");
    for needle in [
        r#"takumo_keys_rpc_requests_total{method="VerifyKey",code="OK"} 4"#,
        r#"takumo_keys_rpc_requests_total{method="GetKey",code="NotFound"} 1"#,
        r#"takumo_keys_rpc_duration_seconds_bucket{le="#,
        r#"takumo_keys_verify_outcomes_total{code="valid"} 3"#,
        r#"takumo_keys_verify_outcomes_total{code="malformed"} 1"#,
        "takumo_keys_cache_hits_total 2",
        "takumo_keys_cache_hit_ratio ",
        "takumo_keys_argon2_queue_depth 0",
        "takumo_keys_usage_flush_lag_seconds ",
        "takumo_keys_db_pool_in_use ",
        "takumo_keys_db_pool_idle ",
        "takumo_keys_change_notices_flowing 1",
    ] {
        assert!(body.contains(needle), "metrics lack {needle:?}:\n{body}");
    }
    assert!(!body.contains(&key[24..56]), "no secret in metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_store_and_recovers_without_a_restart() {
    let db = Arc::new(TestDb::new(Backend::Postgres).await);
    let app = TestApp::spawn_on(db.clone(), common::serve_args).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.addr)).unwrap().connect_lazy();
    let mut health = HealthClient::new(channel);
    let status = |h: &mut HealthClient<_>| {
        let mut h = h.clone();
        async move { h.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status() }
    };
    assert_eq!(status(&mut health).await, ServingStatus::Serving);

    // Cut the service off its database: refuse new connections, end the open ones.
    db.allow_connections(false).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(&mut health).await != ServingStatus::NotServing {
        assert!(Instant::now() < deadline, "health stayed SERVING with the store gone");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Management calls say UNAVAILABLE, never a wrong answer.
    let e = app
        .client
        .clone()
        .list_keys(as_service(pb::ListKeysRequest { organization_id: "acme".into(), ..Default::default() }, "a"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{}", e.message());

    db.allow_connections(true).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(&mut health).await != ServingStatus::Serving {
        assert!(Instant::now() < deadline, "health did not recover once the store came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.client
        .clone()
        .list_keys(as_service(pb::ListKeysRequest { organization_id: "acme".into(), ..Default::default() }, "a"))
        .await
        .expect("calls succeed again without a restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_flushes_usage_and_exits_zero() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut server = ServerProcess::start(
        &db.url,
        &[
            // Creates take real argon2 time (OWASP's memory-hard setting), so
            // they are truly in flight at the signal.
            ("TAKUMO_ARGON2_MEMORY_KIB", "19456"),
            ("TAKUMO_ARGON2_ITERATIONS", "2"),
            ("TAKUMO_USAGE_FLUSH_INTERVAL_MS", "600000"),
            ("TAKUMO_SHUTDOWN_DELAY_MS", "300"),
            // The drain bound is this test's setting, not the machine's speed:
            // far above what the in-flight creates can take even on two busy
            // cores, so every one of them must complete.
            ("TAKUMO_SHUTDOWN_TIMEOUT_MS", "120000"),
        ],
    )
    .await;
    let mut c = server.client().await;
    c.set_organization_plan(as_service(
        pb::SetOrganizationPlanRequest { organization_id: "acme".into(), plan: pb::Plan::Enterprise as i32 },
        "billing",
    ))
    .await
    .unwrap();
    let key = create(&mut c).await;
    let mut verified = 0;
    for _ in 0..50 {
        assert!(c.verify_key(verify_req(&key)).await.unwrap().into_inner().valid);
        verified += 1;
    }

    // A batch of slow calls (two per hashing thread), then SIGTERM while they run.
    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move { create(&mut c).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    server.terminate();
    // During the shutdown delay health already says NOT_SERVING.
    let mut health = HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect_lazy(),
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match health.check(HealthCheckRequest { service: String::new() }).await.map(|r| r.into_inner().status()) {
            Ok(ServingStatus::Serving) => {
                assert!(Instant::now() < deadline, "health stayed SERVING after SIGTERM");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(ServingStatus::NotServing) => break,
            other => panic!("health should turn NOT_SERVING before the listener closes, got {other:?}"),
        }
    }
    for call in in_flight {
        let secret = call.await.expect("every in-flight call completes");
        assert!(secret.starts_with("tk_live_"));
    }
    let status = server.wait_for(Duration::from_secs(130)).await;
    assert!(status.success(), "exit status {status:?}");

    // Every completed verification was counted, though the flush interval never came.
    let store = takumo_keys::store::connect(&db.url, &Default::default()).await.unwrap();
    let stats = store.key_stats("acme", chrono::Utc::now()).await.unwrap();
    assert_eq!(stats.api_calls_24h, verified);
    assert_eq!(stats.total_keys, 5);
}

/// An exported span: trace id, name, and the service.name of its resource.
type ExportedSpan = (Vec<u8>, String, Vec<String>);

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ExportedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service: Vec<String> = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .filter(|kv| kv.key == "service.name")
                .map(|kv| format!("{:?}", kv.value))
                .collect();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push((s.trace_id, s.name, service.clone()));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_spans_continue_the_callers_w3c_trace() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let svc = TraceServiceServer::new(collector.clone());
    tokio::spawn(tonic::transport::Server::builder().add_service(svc).serve_with_incoming(tokio_stream_shim(listener)));

    let db = TestDb::new(Backend::Sqlite).await;
    let endpoint = format!("http://{otlp}");
    let mut server = ServerProcess::start(
        &db.url,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(pb::ListScopesRequest {});
    req.metadata_mut().insert("authorization", format!("Bearer {}", common::SERVICE_TOKEN).parse().unwrap());
    req.metadata_mut().insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap());
    server.client().await.list_scopes(req).await.unwrap();
    server.terminate();
    assert!(server.wait().await.success());

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = collector
            .spans
            .lock()
            .unwrap()
            .iter()
            .find(|(t, name, _)| hex(t) == trace_id && name.contains("ListScopes"))
            .cloned();
        if let Some((_, _, service)) = found {
            assert!(service.iter().any(|s| s.contains("takumo-keys")), "{service:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no exported span carries the caller's trace id");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A listener as the stream of connections tonic serves.
fn tokio_stream_shim(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}
