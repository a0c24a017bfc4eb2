//! No key secret, service token or pepper reaches the logs, even at TRACE
//! level for every crate, through a full RPC flow with failures in it.

// Only part of the harness is used by this binary.
#[allow(dead_code)]
mod common;

use common::{Backend, PEPPER, SERVICE_TOKEN, TestApp, as_service, with_bearer};
use std::sync::{Arc, Mutex};
use takumo_keys::proto::pb::{self, create_key_request::Scopes};
use tonic::Code;
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

async fn flow(backend: Backend, secrets: &mut Vec<String>) {
    let app = TestApp::spawn(backend).await;
    let mut c = app.client.clone();
    let created = c
        .create_key(as_service(
            pb::CreateKeyRequest {
                organization_id: "acme".into(),
                name: "ci".into(),
                scopes: Some(Scopes::Preset(pb::ScopePreset::Organization as i32)),
                ..Default::default()
            },
            "alice",
        ))
        .await
        .unwrap()
        .into_inner();
    let key = created.key.unwrap();
    let secret = created.secret;
    secrets.push(secret.clone());
    // Each call's outcome is asserted: the test proves it ran the paths whose logs it reads.
    let valid = pb::VerifyCode::Valid as i32;
    for (required, want) in [
        (vec![], Ok(valid)),
        (vec!["fleet.read".to_string()], Ok(valid)),
        (vec!["no.such".to_string()], Err(Code::InvalidArgument)),
    ] {
        let got = c
            .verify_key(as_service(
                pb::VerifyKeyRequest { key: secret.clone(), required_scopes: required, organization_id: None },
                "a",
            ))
            .await
            .map(|r| r.into_inner().code)
            .map_err(|s| s.code());
        assert_eq!(got, want);
    }
    // A typo of the real key, and the key as a bearer on management calls.
    // The last character changed (to one it is not), so the checksum fails.
    let last = if secret.ends_with('0') { '1' } else { '0' };
    let typo = format!("{}{last}", &secret[..secret.len() - 1]);
    secrets.push(typo.clone());
    let r = c.verify_key(as_service(pb::VerifyKeyRequest { key: typo.clone(), ..Default::default() }, "a")).await;
    assert_eq!(r.unwrap().into_inner().code(), pb::VerifyCode::Malformed);
    c.list_keys(with_bearer(pb::ListKeysRequest::default(), &secret)).await.expect("the key lists");
    let e = c.list_keys(with_bearer(pb::ListKeysRequest::default(), &typo)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    c.get_key(with_bearer(pb::GetKeyRequest { id: key.id.clone() }, &secret)).await.expect("the key reads itself");
    let wrong_token = "wrong-service-token-that-is-long-enough-0123";
    secrets.push(wrong_token.into());
    let e = c.list_scopes(with_bearer(pb::ListScopesRequest {}, wrong_token)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    c.set_key_status(with_bearer(
        pb::SetKeyStatusRequest { id: key.id.clone(), status: pb::KeyStatus::Disabled as i32 },
        &secret,
    ))
    .await
    .expect("the key disables itself");
    let e = c.list_keys(with_bearer(pb::ListKeysRequest::default(), &secret)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "a disabled key is refused");
    c.revoke_key(as_service(pb::RevokeKeyRequest { id: key.id.clone() }, "a")).await.expect("revoked");
    c.delete_key(as_service(pb::DeleteKeyRequest { id: key.id.clone() }, "a")).await.expect("deleted");
    app.usage.flush().await.unwrap();
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_token_or_pepper_appears_in_trace_logs() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(captured.clone())
        .with_ansi(false)
        .try_init()
        .expect("this test binary installs the only subscriber");

    let mut secrets = vec![SERVICE_TOKEN.to_string(), PEPPER.to_string()];
    flow(Backend::Sqlite, &mut secrets).await;
    flow(Backend::Postgres, &mut secrets).await;

    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(logs.len() > 10_000, "TRACE logging captured too little ({} bytes) to prove anything", logs.len());
    assert!(logs.contains("key created"), "the flow's own events are in the capture");
    for s in &secrets {
        let needles: Vec<&str> = if s.starts_with("tk_") { vec![s.as_str(), &s[24..56]] } else { vec![s.as_str()] };
        for n in needles {
            assert!(!logs.contains(n), "a secret appears in the logs: {}…", &n[..8]);
        }
    }
}
