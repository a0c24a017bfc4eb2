//! The own client's calls: request builders, the check of a VerifyKey answer,
//! the jobs the load engine runs, and key creation.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};
use takumo_keys::{
    domain::keys::KEY_LEN,
    proto::pb::{self, CreateKeyRequest, VerifyCode, VerifyKeyRequest, api_key_service_client::ApiKeyServiceClient},
};
use tonic::{Code, Request, metadata::AsciiMetadataValue, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::support::{
    keygen::random_key,
    load::{Job, Outcome, admin_req, status_text},
};
use crate::{ORG, REQUIRED_SCOPE};

pub fn verify_req(key: &str) -> VerifyKeyRequest {
    VerifyKeyRequest { key: key.to_owned(), required_scopes: vec![REQUIRED_SCOPE.to_owned()], organization_id: None }
}

/// A request carrying `authorization: <auth>`.
pub fn authed<T>(msg: T, auth: &AsciiMetadataValue) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("authorization", auth.clone());
    req
}

/// The bare `Bearer …` value of the service token, for h2load's header.
pub fn bearer(auth: &AsciiMetadataValue) -> &str {
    auth.to_str().expect("ascii")
}

/// `n` keys named `<tag>-<i>`, created through CreateKey by `concurrency` tasks over `channels`.
pub async fn create_keys(
    channels: &[Channel],
    auth: &AsciiMetadataValue,
    n: usize,
    concurrency: usize,
    tag: &str,
) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let step = (n / 10).max(1000);
    let mut tasks = Vec::new();
    for t in 0..concurrency.max(1) {
        let mut client = ApiKeyServiceClient::new(channels[t % channels.len()].clone());
        let (auth, next, tag) = (auth.clone(), next.clone(), tag.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return out;
                }
                if i > 0 && i % step == 0 {
                    eprintln!("  creating {tag} keys: {i} of {n}");
                }
                let req = admin_req(create_key_req(&format!("{tag}-{i}")), &auth);
                let resp = client.create_key(req).await.unwrap_or_else(|s| panic!("CreateKey: {s}"));
                let secret = resp.into_inner().secret;
                assert_eq!(secret.len(), KEY_LEN, "unexpected key shape");
                out.push(secret);
            }
        }));
    }
    let mut keys = Vec::with_capacity(n);
    for t in tasks {
        keys.extend(t.await.expect("create task"));
    }
    keys
}

/// A workspace-preset key (every `*.read` scope plus everyday writes), so
/// that `fleet.read` is held and the response carries a realistic scope list.
pub fn create_key_req(name: &str) -> CreateKeyRequest {
    CreateKeyRequest {
        organization_id: ORG.into(),
        name: name.to_owned(),
        scopes: Some(pb::create_key_request::Scopes::Preset(pb::ScopePreset::Workspace as i32)),
        environment: pb::Environment::Live as i32,
        expires_at: None,
        ..Default::default()
    }
}

/// What a verification must answer for `check_verify` to count it as correct.
#[derive(Clone, Copy)]
pub enum Expect {
    Valid,
    Code(VerifyCode),
}

pub fn check_verify(r: Result<tonic::Response<pb::VerifyKeyResponse>, tonic::Status>, expect: Expect) -> Outcome {
    let r = match r {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == Code::ResourceExhausted => return Outcome::Shed,
        Err(s) => return Outcome::Error(status_text(&s)),
    };
    let (valid, code) = match expect {
        Expect::Valid => (true, VerifyCode::Valid),
        Expect::Code(c) => (false, c),
    };
    if r.valid == valid && r.code == code as i32 {
        Outcome::Ok
    } else {
        Outcome::Error(format!(
            "expected valid={valid} {}, got valid={} {}",
            code.as_str_name(),
            r.valid,
            VerifyCode::try_from(r.code).map_or("?", |c| c.as_str_name())
        ))
    }
}

pub struct HealthJob {
    pub client: HealthClient<Channel>,
}

impl Job for HealthJob {
    async fn call(&mut self) -> Option<Outcome> {
        let r = self.client.check(HealthCheckRequest { service: String::new() }).await;
        Some(match r {
            Ok(r) if r.get_ref().status() == ServingStatus::Serving => Outcome::Ok,
            Ok(r) => Outcome::Error(format!("health status {:?}", r.get_ref().status())),
            Err(s) => Outcome::Error(status_text(&s)),
        })
    }
}

pub struct VerifyJob {
    pub client: ApiKeyServiceClient<Channel>,
    pub auth: AsciiMetadataValue,
    pub reqs: Arc<[VerifyKeyRequest]>,
    pub next: usize,
    pub expect: Expect,
}

impl Job for VerifyJob {
    fn call(&mut self) -> impl Future<Output = Option<Outcome>> + Send + '_ {
        let body = self.reqs[self.next % self.reqs.len()].clone();
        self.next = self.next.wrapping_add(1);
        let req = authed(body, &self.auth);
        async move { Some(check_verify(self.client.verify_key(req).await, self.expect)) }
    }
}

pub struct ColdJob {
    pub client: ApiKeyServiceClient<Channel>,
    pub auth: AsciiMetadataValue,
    pub reqs: Arc<[VerifyKeyRequest]>,
    pub next: Arc<AtomicUsize>,
}

impl Job for ColdJob {
    fn call(&mut self) -> impl Future<Output = Option<Outcome>> + Send + '_ {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let req = self.reqs.get(i).cloned().map(|body| authed(body, &self.auth));
        async move {
            let req = req?;
            Some(check_verify(self.client.verify_key(req).await, Expect::Valid))
        }
    }
}

/// An attacker who knows key ids (they are half of the public prefix and
/// appear in listings) and guesses secrets: every request is a fresh,
/// well-formed key with a valid checksum and a random secret.
pub struct FloodJob {
    pub client: ApiKeyServiceClient<Channel>,
    pub auth: AsciiMetadataValue,
    pub ids: Arc<[String]>,
    pub next: usize,
    pub rng: rand::rngs::StdRng,
}

impl Job for FloodJob {
    fn call(&mut self) -> impl Future<Output = Option<Outcome>> + Send + '_ {
        let key = random_key(&mut self.rng, Some(&self.ids[self.next % self.ids.len()]));
        self.next = self.next.wrapping_add(1);
        let req = authed(verify_req(&key), &self.auth);
        async move { Some(check_verify(self.client.verify_key(req).await, Expect::Code(VerifyCode::NotFound))) }
    }
}
