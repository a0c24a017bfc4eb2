//! Hostile requests: each gets the status it deserves, nothing panics, and
//! the store is exactly as it was afterwards.

use crate::common;

use common::{Backend, SERVICE_TOKEN, TestApp, as_service, with_bearer};
use rand::{Rng, RngCore};
use takumo_keys::proto::pb::{self, create_key_request::Scopes};
use tonic::{
    Code, Request,
    codegen::Bytes,
    metadata::{AsciiMetadataValue, MetadataValue},
};

fn create_req(org: &str, name: &str, scopes: Vec<String>) -> pb::CreateKeyRequest {
    pb::CreateKeyRequest {
        organization_id: org.into(),
        name: name.into(),
        scopes: Some(Scopes::Custom(pb::ScopeList { scopes })),
        ..Default::default()
    }
}

fn fleet() -> Vec<String> {
    vec!["fleet.read".into()]
}

/// Everything an attacker could have changed, as one comparable value.
async fn snapshot(app: &TestApp) -> (i64, i64, usize, usize) {
    let s = app.store.key_stats("acme", chrono::Utc::now()).await.unwrap();
    let keys = app.store.list_keys("acme", &Default::default(), None, 500).await.unwrap();
    let audit = app.store.list_audit_events("acme", &Default::default(), None, 500).await.unwrap();
    (s.total_keys, s.keys_counted, keys.len(), audit.len())
}

/// A metadata value with bytes that are not UTF-8 (HTTP/2 allows obs-text).
fn raw(bytes: &'static [u8]) -> AsciiMetadataValue {
    // SAFETY: obs-text bytes are legal in HTTP/2 header values; the server must cope.
    unsafe { MetadataValue::from_shared_unchecked(Bytes::from_static(bytes)) }
}

async fn hostile_requests_get_the_right_status_and_change_nothing(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut c = app.client.clone();
    // One legitimate key, so there is something to damage.
    let created = c.create_key(as_service(create_req("acme", "legit", fleet()), "alice")).await.unwrap().into_inner();
    let legit = created.secret;
    let before = snapshot(&app).await;

    let code = |r: Result<tonic::Response<pb::CreateKeyResponse>, tonic::Status>| {
        r.map(|_| Code::Ok).unwrap_or_else(|s| s.code())
    };
    let cases: Vec<(&str, pb::CreateKeyRequest, Code)> = vec![
        ("empty name", create_req("acme", "", fleet()), Code::InvalidArgument),
        ("1 MB name", create_req("acme", &"n".repeat(1 << 20), fleet()), Code::ResourceExhausted),
        ("control characters", create_req("acme", "ci\u{0}\u{1b}[2J", fleet()), Code::InvalidArgument),
        ("newline in name", create_req("acme", "line\nbreak", fleet()), Code::InvalidArgument),
        ("10,000 scopes", create_req("acme", "k", vec!["fleet.read".to_string(); 10_000]), Code::InvalidArgument),
        (
            "unknown scope with SQL",
            create_req("acme", "k", vec!["fleet.read'; DROP TABLE api_keys;--".into()]),
            Code::InvalidArgument,
        ),
        ("whitespace organization", create_req("ac me", "k", fleet()), Code::InvalidArgument),
        ("65-char organization", create_req(&"o".repeat(65), "k", fleet()), Code::InvalidArgument),
        ("oversized message", create_req("acme", "k", vec!["x".repeat(300 * 1024)]), Code::ResourceExhausted),
    ];
    for (what, req, want) in cases {
        assert_eq!(code(c.create_key(as_service(req, "alice")).await), want, "{what}");
    }

    // Metadata: missing, binary, huge, or not UTF-8.
    let mut r = Request::new(pb::ListScopesRequest {});
    r.metadata_mut().insert("authorization", raw(b"Bearer \xff\xfe\xfd"));
    assert_eq!(c.list_scopes(r).await.unwrap_err().code(), Code::Unauthenticated, "non-UTF-8 bearer");
    let mut r = as_service(create_req("acme", "k", fleet()), "alice");
    r.metadata_mut().insert("x-takumo-actor", raw(b"\xc3\x28"));
    assert_eq!(code(c.create_key(r).await), Code::InvalidArgument, "non-UTF-8 actor");
    let mut r = with_bearer(create_req("acme", "k", fleet()), SERVICE_TOKEN);
    r.metadata_mut().insert("x-takumo-actor", "a;DROP".parse().unwrap());
    assert_eq!(code(c.create_key(r).await), Code::Ok, "SQL metacharacters are just characters");
    let big = format!("tk_live_{}", "A".repeat(100 * 1024));
    // HTTP/2 refuses header lists this large before any handler runs.
    let e = c.list_scopes(with_bearer(pb::ListScopesRequest {}, &big)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "100 KB bearer: {}", e.message());
    assert!(!e.message().contains("AAAAAAAA"), "errors never echo what was presented");
    // A 2 KB one reaches the service, which refuses it without looking further.
    let e = c.list_scopes(with_bearer(pb::ListScopesRequest {}, &big[..2048])).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "2 KB bearer: {}", e.message());
    assert!(e.message().len() < 200, "errors never echo what was presented");

    // Random keys: random bytes (as text) and random well-formed-looking strings.
    let mut rng = rand::rng();
    for _ in 0..200 {
        let mut bytes = vec![0u8; rng.random_range(0..120)];
        rng.fill_bytes(&mut bytes);
        let key = String::from_utf8_lossy(&bytes).into_owned();
        let r = c.verify_key(as_service(pb::VerifyKeyRequest { key, ..Default::default() }, "a")).await.unwrap();
        assert_eq!(r.into_inner().code(), pb::VerifyCode::Malformed);
    }
    // Well-formed keys with real checksums, so the lookup path runs: random
    // ids, and the legitimate key's id with random secrets.
    const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut random = |n: usize| -> String { (0..n).map(|_| BASE62[rng.random_range(0..62)] as char).collect() };
    let legit_id = legit[8..24].to_string();
    let reads = app.metrics.store_key_reads.get();
    for i in 0..50 {
        let id = if i % 2 == 0 { random(16) } else { legit_id.clone() };
        let key = takumo_keys::domain::keys::compose(takumo_keys::domain::model::Environment::Live, &id, &random(32));
        let r = c.verify_key(as_service(pb::VerifyKeyRequest { key: key.into_exposed(), ..Default::default() }, "a"));
        assert_eq!(r.await.unwrap().into_inner().code(), pb::VerifyCode::NotFound);
    }
    let looked_up = app.metrics.store_key_reads.get() - reads;
    assert!(looked_up >= 25, "the well-formed keys reached the store lookup ({looked_up} reads)");
    // Hostile strings where ids and tokens go.
    for id in ["", "'; DELETE FROM api_keys; --", "\u{202e}evil", &"9".repeat(10_000)] {
        let e = c.get_key(as_service(pb::GetKeyRequest { id: id.into() }, "a")).await.unwrap_err();
        assert!(matches!(e.code(), Code::NotFound | Code::InvalidArgument), "{id:?}: {:?}", e.code());
        assert!(e.message().len() < 200);
    }
    let e = c
        .list_keys(as_service(
            pb::ListKeysRequest {
                organization_id: "acme".into(),
                page_token: "%00' OR 1=1".into(),
                ..Default::default()
            },
            "a",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // The legitimate key still works, and apart from the one deliberate
    // create (SQL characters in the actor) nothing changed.
    assert!(
        c.verify_key(as_service(pb::VerifyKeyRequest { key: legit, ..Default::default() }, "a"))
            .await
            .unwrap()
            .into_inner()
            .valid
    );
    let after = snapshot(&app).await;
    assert_eq!(after, (before.0 + 1, before.1 + 1, before.2 + 1, before.3 + 1));
}

for_each_backend!(hostile_requests_get_the_right_status_and_change_nothing);
