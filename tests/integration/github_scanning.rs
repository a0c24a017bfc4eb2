//! GitHub's secret scanning partner endpoint, end to end over HTTP with a
//! P-256 key pair made here (never a real GitHub key): signed reports act
//! like ReportLeakedKeys; a forged, unsigned or oversized one changes nothing.

use crate::common;
use base64::{Engine, engine::general_purpose::STANDARD};
use common::{Backend, TestApp, TestDb};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair},
};
use std::sync::Arc;
use takumo_keys::proto::pb::{self, create_key_request::Scopes};

/// A P-256 key pair and GitHub's keys file listing its public half.
struct Github {
    pair: EcdsaKeyPair,
    _dir: tempfile::TempDir,
    file: std::path::PathBuf,
}

/// DER prefix of a P-256 SubjectPublicKeyInfo, before the 65-byte point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

impl Github {
    fn new() -> Self {
        Self::with_identifier("test-key-1")
    }

    fn with_identifier(identifier: &str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let spki = [P256_SPKI_PREFIX.as_slice(), pair.public_key().as_ref()].concat();
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", STANDARD.encode(spki));
        let doc = serde_json::json!({"public_keys": [{"key_identifier": identifier, "key": pem, "is_current": true}]});
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret_scanning.json");
        std::fs::write(&file, doc.to_string()).unwrap();
        Github { pair, _dir: dir, file }
    }

    fn sign(&self, body: &[u8]) -> String {
        STANDARD.encode(self.pair.sign(&SystemRandom::new(), body).unwrap().as_ref())
    }
}

async fn app_with(b: Backend, github: &Github) -> TestApp {
    let file = github.file.clone();
    TestApp::spawn_on(Arc::new(TestDb::new(b).await), move |url| {
        let mut a = common::serve_args(url);
        a.http_listen = Some("127.0.0.1:0".parse().unwrap());
        a.github_scanning_keys_file = Some(file);
        a
    })
    .await
}

async fn post(app: &TestApp, body: &[u8], headers: &[(&str, String)]) -> (u16, String) {
    let url = format!("http://{}/v1/secret-scanning/github", app.http_addr.unwrap());
    let mut req = reqwest::Client::new().post(url).body(body.to_vec());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = req.send().await.expect("post");
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn report_body(tokens: &[&str]) -> Vec<u8> {
    let items: Vec<_> = tokens
        .iter()
        .map(|t| serde_json::json!({"token": t, "type": "takumo_api_key", "url": "https://github.com/o/r/blob/c/.env", "source": "content"}))
        .collect();
    serde_json::Value::Array(items).to_string().into_bytes()
}

async fn a_signed_report_revokes_our_keys_and_labels_every_token(b: Backend) {
    let github = Github::new();
    let app = app_with(b, &github).await;
    let (_, secret) = app.create("acme", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32))).await;
    let body = report_body(&[&secret, "tk_live_not-ours"]);
    let headers = [
        ("Github-Public-Key-Identifier", "test-key-1".to_owned()),
        ("Github-Public-Key-Signature", github.sign(&body)),
    ];
    let (status, text) = post(&app, &body, &headers).await;
    assert_eq!(status, 200, "{text}");
    let feedback: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(feedback[0]["token_raw"], secret);
    assert_eq!(feedback[0]["label"], "true_positive");
    assert_eq!(feedback[0]["token_type"], "takumo_api_key");
    assert_eq!(feedback[1]["label"], "false_positive");
    let hash: String = ring::digest::digest(&ring::digest::SHA256, b"tk_live_not-ours")
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(feedback[1]["token_hash"], hash);
    assert!(feedback[1].get("token_raw").is_none(), "a false positive is not echoed");
    assert_eq!(app.verify(&secret, &[], None).await.code(), pb::VerifyCode::Revoked);
}

async fn forged_unsigned_or_unknown_key_reports_change_nothing(b: Backend) {
    let github = Github::new();
    let app = app_with(b, &github).await;
    let (_, secret) = app.create("acme", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32))).await;
    let body = report_body(&[&secret]);
    let other = report_body(&["something else"]);
    let id = || ("Github-Public-Key-Identifier", "test-key-1".to_owned());
    type Case<'a> = (Vec<u8>, Vec<(&'a str, String)>, u16);
    let cases: Vec<Case> = vec![
        // Signed by us, but over another body: forged.
        (body.clone(), vec![id(), ("Github-Public-Key-Signature", github.sign(&other))], 401),
        // A signature by another key pair.
        (body.clone(), vec![id(), ("Github-Public-Key-Signature", Github::new().sign(&body))], 401),
        (body.clone(), vec![id(), ("Github-Public-Key-Signature", "not base64!".into())], 401),
        (body.clone(), vec![id()], 401),
        (
            body.clone(),
            vec![
                ("Github-Public-Key-Identifier", "unknown".into()),
                ("Github-Public-Key-Signature", github.sign(&body)),
            ],
            400,
        ),
        (body.clone(), vec![("Github-Public-Key-Signature", github.sign(&body))], 400),
    ];
    for (body, headers, want) in cases {
        let (status, text) = post(&app, &body, &headers).await;
        assert_eq!(status, want, "{headers:?}: {text}");
    }
    assert!(app.verify(&secret, &[], None).await.valid, "a refused report changed the key");
}

/// The body limit is 1 MiB exactly: a signed report of 1 MiB is acted on,
/// one byte more is refused with 413 and changes nothing, however it is signed.
async fn a_report_of_one_mebibyte_is_read_and_one_byte_more_is_refused(b: Backend) {
    let github = Github::new();
    let app = app_with(b, &github).await;
    let (_, secret) = app.create("acme", Some(Scopes::Preset(pb::ScopePreset::ReadOnly as i32))).await;
    // JSON allows whitespace after the array: pad a real report to the size.
    let padded = |len: usize| {
        let mut body = report_body(&[&secret]);
        body.resize(len, b' ');
        body
    };
    let signed = |body: &[u8]| {
        [("Github-Public-Key-Identifier", "test-key-1".to_owned()), ("Github-Public-Key-Signature", github.sign(body))]
    };
    let over = padded(1024 * 1024 + 1);
    let (status, text) = post(&app, &over, &signed(&over)).await;
    assert_eq!(status, 413, "{text}");
    assert!(app.verify(&secret, &[], None).await.valid, "a refused report changed the key");
    let limit = padded(1024 * 1024);
    let (status, text) = post(&app, &limit, &signed(&limit)).await;
    assert_eq!(status, 200, "{text}");
    let feedback: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(feedback[0]["label"], "true_positive");
    assert_eq!(app.verify(&secret, &[], None).await.code(), pb::VerifyCode::Revoked);
}

/// GitHub rotates its keys: a rewritten keys file is read again, and a
/// report signed with the new key is accepted.
async fn a_rewritten_keys_file_is_read_again(b: Backend) {
    let github = Github::new();
    let app = app_with(b, &github).await;
    let body = report_body(&["tk_live_not-ours"]);
    let first = [
        ("Github-Public-Key-Identifier", "test-key-1".to_owned()),
        ("Github-Public-Key-Signature", github.sign(&body)),
    ];
    assert_eq!(post(&app, &body, &first).await.0, 200);
    let rotated = Github::with_identifier("test-key-rotated");
    std::fs::copy(&rotated.file, &github.file).unwrap();
    let second = [
        ("Github-Public-Key-Identifier", "test-key-rotated".to_owned()),
        ("Github-Public-Key-Signature", rotated.sign(&body)),
    ];
    assert_eq!(post(&app, &body, &second).await.0, 200);
    assert_eq!(post(&app, &body, &first).await.0, 400, "the retired key is gone (an unknown identifier)");
}

for_each_backend!(
    a_rewritten_keys_file_is_read_again,
    a_signed_report_revokes_our_keys_and_labels_every_token,
    a_report_of_one_mebibyte_is_read_and_one_byte_more_is_refused,
    forged_unsigned_or_unknown_key_reports_change_nothing,
);
