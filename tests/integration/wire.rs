//! What generated clients send: gzip- or zstd-compressed requests (what
//! many gRPC clients and proxies send when compression is on) are accepted,
//! and a caller that accepts compression gets compressed answers.

use crate::common::{Backend, TestApp, as_service};
use takumo_keys::proto::pb::{self, api_key_service_client::ApiKeyServiceClient, create_key_request::Scopes};
use tonic::codec::CompressionEncoding;

async fn compressed_requests_are_accepted_and_answers_compressed(b: Backend) {
    let app = TestApp::spawn(b).await;
    let (_, secret) = app.create("acme", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32))).await;
    let channel = app.channel.clone();
    for (encoding, name) in [(CompressionEncoding::Gzip, "gzip"), (CompressionEncoding::Zstd, "zstd")] {
        let mut c = ApiKeyServiceClient::new(channel.clone()).send_compressed(encoding).accept_compressed(encoding);
        let req = pb::VerifyKeyRequest { key: secret.clone(), ..Default::default() };
        let r = c.verify_key(as_service(req, "gateway")).await.unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(r.metadata().get("grpc-encoding").map(|v| v.to_str().unwrap()), Some(name), "answer not {name}");
        assert!(r.into_inner().valid, "{name}");
    }
    // A caller that accepts no compression gets plain answers.
    let mut plain = ApiKeyServiceClient::new(channel);
    let req = pb::VerifyKeyRequest { key: secret, ..Default::default() };
    let r = plain.verify_key(as_service(req, "gateway")).await.unwrap();
    assert_eq!(r.metadata().get("grpc-encoding"), None);
}

crate::for_each_backend!(compressed_requests_are_accepted_and_answers_compressed);
