//! Revocation pushed to callers: `WatchKeyChanges` streams the changes a
//! replica hears of, and the Rust `VerifyLayer` subscribes, so a key revoked
//! through one replica is refused by a layer attached to another long before
//! its TTL.

use crate::common::{self, Backend, SERVICE_TOKEN, TestApp, TestDb, as_service, eventually, with_bearer};
use axum::{Router, body::Body as AxumBody, routing::get};
use std::{sync::Arc, time::Duration};
use takumo_keys::{
    client::{KeysClient, VerifyLayer},
    domain::secret::SecretString,
    proto::pb::{self, create_key_request::Scopes},
};
use tonic::{Code, Streaming};
use tower::ServiceExt;

fn read_only() -> Option<Scopes> {
    Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32))
}

async fn watch(app: &TestApp, organization: Option<&str>) -> Streaming<pb::KeyChange> {
    let req = pb::WatchKeyChangesRequest { organization_id: organization.map(str::to_owned) };
    app.client.clone().watch_key_changes(as_service(req, "gateway")).await.expect("watch").into_inner()
}

/// The next change naming a key other than `skip` (delivery is at least
/// once: the same change may come twice), within the RPC deadline.
async fn next_key(stream: &mut Streaming<pb::KeyChange>, skip: &str) -> pb::KeyChange {
    loop {
        let change = tokio::time::timeout(common::RPC_DEADLINE, stream.message())
            .await
            .expect("a change within the deadline")
            .expect("the stream is healthy")
            .expect("the stream is open");
        if !change.resync && change.key_id != skip {
            return change;
        }
    }
}

async fn revoke(app: &TestApp, id: &str) {
    app.client.clone().revoke_key(as_service(pb::RevokeKeyRequest { id: id.into() }, "alice")).await.expect("revoke");
}

async fn changes_stream_to_services_filtered_by_organization(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (acme1, secret) = app.create("acme", read_only()).await;
    let (acme2, _) = app.create("acme", read_only()).await;
    let (globex, _) = app.create("globex", read_only()).await;

    // Service tokens only; a malformed organization is the caller's mistake.
    let e = app.client.clone().watch_key_changes(with_bearer(pb::WatchKeyChangesRequest::default(), &secret)).await;
    assert_eq!(e.unwrap_err().code(), Code::PermissionDenied);
    let bad = pb::WatchKeyChangesRequest { organization_id: Some("ac me".into()) };
    let e = app.client.clone().watch_key_changes(as_service(bad, "gateway")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let mut all = watch(&app, None).await;
    let mut acme = watch(&app, Some("acme")).await;
    revoke(&app, &acme1.id).await;
    revoke(&app, &globex.id).await;
    revoke(&app, &acme2.id).await;

    let first = next_key(&mut all, "").await;
    assert_eq!((first.key_id.as_str(), first.organization_id.as_str()), (acme1.id.as_str(), "acme"));
    let second = next_key(&mut all, &acme1.id).await;
    assert_eq!((second.key_id.as_str(), second.organization_id.as_str()), (globex.id.as_str(), "globex"));
    assert_eq!(next_key(&mut all, &globex.id).await.key_id, acme2.id);

    assert_eq!(next_key(&mut acme, "").await.key_id, acme1.id);
    assert_eq!(next_key(&mut acme, &acme1.id).await.key_id, acme2.id, "another organization's change came through");
}

async fn change_streams_end_with_unavailable_when_the_replica_shuts_down(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut stream = watch(&app, None).await;
    app.shutdown().await;
    let end = tokio::time::timeout(common::RPC_DEADLINE, stream.message()).await.expect("the stream ends");
    let e = end.expect_err("the stream ends with a status");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("shutting down"), "{}", e.message());
}

/// The notice listener's connection is killed: when it reconnects, the
/// stream says `resync`, since changes of the gap were missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_told_to_resync_when_the_notice_listener_reconnects() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let mut stream = watch(&app, None).await;
    let admin = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(killed, [true], "exactly one listener connection");
    loop {
        let change = tokio::time::timeout(common::RPC_DEADLINE, stream.message())
            .await
            .expect("a resync within the deadline")
            .expect("the stream stays open through a short gap")
            .expect("open");
        if change.resync {
            assert!(change.key_id.is_empty());
            break;
        }
    }
}

/// An axum router behind a layer on `app` with a 10-minute TTL: only the
/// pushed change can make it refuse a key it has cached.
async fn layered(app: &TestApp) -> (VerifyLayer, Router) {
    let keys = KeysClient::connect(format!("http://{}", app.addr), SecretString::new(SERVICE_TOKEN)).await.unwrap();
    let layer = VerifyLayer::builder(keys).cache_ttl(Duration::from_secs(600)).build().unwrap();
    let router = Router::new().route("/fleet", get(|| async { "ok" })).layer(layer.clone());
    (layer, router)
}

async fn status(router: &Router, key: &str) -> u16 {
    let req = http::Request::get("/fleet").header("authorization", format!("Bearer {key}"));
    router.clone().oneshot(req.body(AxumBody::empty()).unwrap()).await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_on_one_replica_refuses_a_key_revoked_through_another_within_a_second() {
    let db = Arc::new(TestDb::new(Backend::Postgres).await);
    let a = TestApp::spawn_on(db.clone(), common::serve_args).await;
    let b = TestApp::spawn_on(db, common::serve_args).await;
    let (key, secret) = a.create("acme", read_only()).await;
    let (layer, router) = layered(&b).await;
    assert_eq!(status(&router, &secret).await, 200);
    eventually(10, "the layer's change stream is up", || {
        let up = layer.is_watching();
        async move { up }
    })
    .await;
    // Cached under the stream: the next answers do not ask replica B.
    assert_eq!(status(&router, &secret).await, 200);
    let asked = b.metrics.cache_hits.get() + b.metrics.cache_misses.get() + b.metrics.cache_refreshes.get();
    assert_eq!(status(&router, &secret).await, 200);
    let now = b.metrics.cache_hits.get() + b.metrics.cache_misses.get() + b.metrics.cache_refreshes.get();
    assert_eq!(now, asked, "a cached verdict asked the keys service again");

    revoke(&a, &key.id).await;
    eventually(1, "the layer refuses the revoked key", || {
        let router = router.clone();
        let secret = secret.clone();
        async move { status(&router, &secret).await == 401 }
    })
    .await;
}

crate::for_each_backend!(
    changes_stream_to_services_filtered_by_organization,
    change_streams_end_with_unavailable_when_the_replica_shuts_down,
);
