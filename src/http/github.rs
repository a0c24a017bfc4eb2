//! GitHub's secret scanning partner protocol: GitHub POSTs the tokens it
//! found in public (a JSON array of `{token, type, url, source}`), signed
//! with ECDSA P-256 / SHA-256 over the raw body (`Github-Public-Key-Signature`,
//! base64 DER) by the key `Github-Public-Key-Identifier` names. The public
//! keys come from a file in the format GitHub publishes at
//! `meta/public_keys/secret_scanning`, re-read when it changes. The answer is
//! GitHub's feedback array; our keys are handled like `ReportLeakedKeys`.

use crate::{
    api::leaks::{Leak, LeakIntake},
    domain::model::AuditContext,
    error::{Error, Result},
};
use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use sha2::{Digest, Sha256};
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

/// Largest body accepted (GitHub sends at most 1,000 tokens).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// `token_type` in the feedback: the name registered with GitHub.
const TOKEN_TYPE: &str = "takumo_api_key";
const KEY_ID_HEADER: &str = "github-public-key-identifier";
const SIGNATURE_HEADER: &str = "github-public-key-signature";

/// GitHub's public keys by identifier: uncompressed P-256 points.
type Keys = HashMap<String, Vec<u8>>;

/// The endpoint's state: the intake and GitHub's public keys.
pub struct GithubScanning {
    intake: LeakIntake,
    keys_file: Option<PathBuf>,
    /// The keys file as last read: its modification time and length (a
    /// change of either means a new file), and the keys by identifier.
    keys: Mutex<Option<((SystemTime, u64), Keys)>>,
}

impl GithubScanning {
    pub fn new(intake: LeakIntake, keys_file: Option<PathBuf>) -> Self {
        Self { intake, keys_file, keys: Mutex::new(None) }
    }

    /// The uncompressed P-256 point of key `id`, reading the file again when
    /// it changed since the last read.
    fn public_key(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let Some(path) = &self.keys_file else {
            return Err(Error::Unavailable {
                message: "TAKUMO_GITHUB_SCANNING_KEYS_FILE is not set: no GitHub key to check signatures with".into(),
                source: None,
            });
        };
        let meta = std::fs::metadata(path).map_err(Error::internal)?;
        let version = (meta.modified().map_err(Error::internal)?, meta.len());
        let mut cached = self.keys.lock().expect("keys lock");
        if cached.as_ref().is_none_or(|(seen, _)| *seen != version) {
            let text = std::fs::read_to_string(path).map_err(Error::internal)?;
            *cached = Some((version, parse_keys(&text)?));
        }
        Ok(cached.as_ref().and_then(|(_, keys)| keys.get(id).cloned()))
    }
}

/// GitHub's `{"public_keys": [{"key_identifier", "key" (PEM), "is_current"}]}`.
fn parse_keys(text: &str) -> Result<Keys> {
    let bad = |why: &str| Error::internal(anyhow::anyhow!("the GitHub scanning keys file {why}"));
    let doc: serde_json::Value = serde_json::from_str(text).map_err(|_| bad("is not JSON"))?;
    let list = doc.get("public_keys").and_then(|v| v.as_array()).ok_or_else(|| bad("has no public_keys array"))?;
    let mut keys = HashMap::new();
    for k in list {
        let (Some(id), Some(pem)) =
            (k.get("key_identifier").and_then(|v| v.as_str()), k.get("key").and_then(|v| v.as_str()))
        else {
            return Err(bad("has an entry without key_identifier or key"));
        };
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = STANDARD.decode(b64.trim()).map_err(|_| bad("has a key that is not PEM"))?;
        use x509_parser::prelude::FromDer;
        let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&der)
            .map_err(|_| bad("has a key that is not a SubjectPublicKeyInfo"))?;
        keys.insert(id.to_owned(), spki.subject_public_key.data.to_vec());
    }
    Ok(keys)
}

fn plain(status: StatusCode, message: &str) -> Response {
    (status, format!("{message}\n")).into_response()
}

/// `POST /v1/secret-scanning/github`.
pub async fn report(State(s): State<Arc<GithubScanning>>, headers: HeaderMap, body: Bytes) -> Response {
    if body.len() > MAX_BODY_BYTES {
        return plain(StatusCode::PAYLOAD_TOO_LARGE, "the body is over 1 MiB");
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    // The contract's codes: a missing or bad signature is 401, a missing or
    // unknown key identifier 400, a body over 1 MiB 413.
    let Some(signature) = header(SIGNATURE_HEADER) else {
        return plain(StatusCode::UNAUTHORIZED, "Github-Public-Key-Signature is required");
    };
    let Some(key_id) = header(KEY_ID_HEADER) else {
        return plain(StatusCode::BAD_REQUEST, "Github-Public-Key-Identifier is required");
    };
    let point = match s.public_key(key_id) {
        Ok(Some(point)) => point,
        Ok(None) => return plain(StatusCode::BAD_REQUEST, "unknown Github-Public-Key-Identifier"),
        Err(e) => {
            tracing::error!(error = %crate::error::error_chain(&e), "cannot read GitHub's public keys");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "the keys to check the signature with are unavailable");
        }
    };
    let verified = STANDARD.decode(signature).ok().is_some_and(|sig| {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, &point)
            .verify(&body, &sig)
            .is_ok()
    });
    if !verified {
        return plain(StatusCode::UNAUTHORIZED, "the signature does not match the body");
    }
    let Ok(serde_json::Value::Array(items)) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return plain(StatusCode::BAD_REQUEST, "the body must be a JSON array of {token, type, url, source}");
    };
    let text = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_owned();
    let leaks: Vec<Leak> = items
        .iter()
        .map(|i| Leak { key: text(i, "token"), source_url: text(i, "url"), source: text(i, "source") })
        .collect();
    if let Err(e) = LeakIntake::validate("body", &leaks) {
        return plain(StatusCode::BAD_REQUEST, tonic::Status::from(e).message());
    }
    let tokens: Vec<String> = leaks.iter().map(|l| l.key.clone()).collect();
    let audit = AuditContext {
        actor: "service:github-secret-scanning".into(),
        principal: "service:github-secret-scanning".into(),
        request_id: String::new(),
        peer: None,
    };
    let found = match s.intake.report(leaks, &audit).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %crate::error::error_chain(&e), "GitHub report not processed");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "the key store is unavailable; retry");
        }
    };
    let feedback: Vec<serde_json::Value> = tokens
        .into_iter()
        .zip(found)
        .map(|(token, key)| match key {
            Some(_) => serde_json::json!({"token_raw": token, "token_type": TOKEN_TYPE, "label": "true_positive"}),
            None => serde_json::json!({
                "token_hash": hex(&Sha256::digest(token.as_bytes())),
                "token_type": TOKEN_TYPE,
                "label": "false_positive",
            }),
        })
        .collect();
    let json = serde_json::Value::Array(feedback).to_string();
    ([(axum::http::header::CONTENT_TYPE, "application/json")], json).into_response()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
