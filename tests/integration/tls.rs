//! TLS on the listener, and mutual TLS where a mapped client certificate is a
//! service principal without any bearer token.

use crate::common;

use common::{Backend, SERVICE_TOKEN, TestApp, TestDb, with_bearer};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use std::{path::PathBuf, sync::Arc};
use takumo_keys::proto::pb::{self, api_key_service_client::ApiKeyServiceClient};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "takumo test ca");
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        Self { dir: tempfile::tempdir().unwrap(), ca_pem: ca.pem(), issuer: Issuer::new(params, key) }
    }

    /// Issues a certificate; returns (cert PEM, key PEM).
    fn issue(&self, cn: &str, sans: Vec<SanType>) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(&self, name: &str, pem: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    }

    fn server_files(&self) -> (PathBuf, PathBuf, PathBuf) {
        let (cert, key) = self.issue(
            "localhost",
            vec![SanType::DnsName("localhost".try_into().unwrap()), SanType::IpAddress([127, 0, 0, 1].into())],
        );
        (self.write("server.pem", &cert), self.write("server.key", &key), self.write("ca.pem", &self.ca_pem))
    }
}

async fn tls_client(
    app: &TestApp,
    pki: &Pki,
    identity: Option<(String, String)>,
) -> Result<ApiKeyServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_pem)).domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://127.0.0.1:{}", app.addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(ApiKeyServiceClient::new(channel))
}

fn set_plan_request() -> pb::SetOrganizationPlanRequest {
    pb::SetOrganizationPlanRequest { organization_id: "acme".into(), plan: pb::Plan::Pro as i32 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_bearer_callers_and_refuses_plaintext() {
    let pki = Pki::new();
    let (cert, key, _) = pki.server_files();
    let db = Arc::new(TestDb::new(Backend::Sqlite).await);
    let app = TestApp::spawn_on(db, |url| {
        let mut a = common::serve_args(url);
        a.tls_cert = Some(cert);
        a.tls_key = Some(key);
        a
    })
    .await;
    let mut c = tls_client(&app, &pki, None).await.expect("TLS handshake");
    c.list_scopes(with_bearer(pb::ListScopesRequest {}, SERVICE_TOKEN)).await.expect("call over TLS");
    let plain = app.client.clone().list_scopes(with_bearer(pb::ListScopesRequest {}, SERVICE_TOKEN)).await;
    assert!(plain.is_err(), "plaintext must not be served by a TLS listener");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapped_client_certificate_is_a_service_principal_under_mutual_tls() {
    let pki = Pki::new();
    let (cert, key, ca) = pki.server_files();
    let db = Arc::new(TestDb::new(Backend::Sqlite).await);
    let app = TestApp::spawn_on(db, |url| {
        let mut a = common::serve_args(url);
        a.tls_cert = Some(cert);
        a.tls_key = Some(key);
        a.tls_client_ca = Some(ca);
        a.mtls_services = Some("uri:spiffe://takumo/billing=billing,cn:dashboard=dashboard".into());
        a
    })
    .await;

    // A SAN URI mapped to "billing": no bearer token needed.
    let billing = pki.issue("billing-pod-7", vec![SanType::URI("spiffe://takumo/billing".try_into().unwrap())]);
    let mut c = tls_client(&app, &pki, Some(billing)).await.expect("mTLS handshake");
    let org = c.set_organization_plan(set_plan_request()).await.expect("certificate principal").into_inner();
    assert_eq!(org.plan(), pb::Plan::Pro);
    let events = app.store.list_audit_events("acme", &Default::default(), None, 10).await.unwrap();
    assert_eq!(events[0].principal, "service:billing");

    // A CN mapped to "dashboard".
    let dashboard = pki.issue("dashboard", vec![]);
    let mut c = tls_client(&app, &pki, Some(dashboard)).await.unwrap();
    c.list_scopes(pb::ListScopesRequest {}).await.expect("CN principal");

    // Names in the wrong field are not the identity they spell: a DNS SAN that
    // reads like the billing URI, or like `CN=dashboard`, is no principal.
    for impostor in ["spiffe://takumo/billing", "CN=dashboard"] {
        let cert = pki.issue("impostor", vec![SanType::DnsName(impostor.try_into().unwrap())]);
        let mut c = tls_client(&app, &pki, Some(cert)).await.unwrap();
        let e = c.set_organization_plan(set_plan_request()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "a DNS SAN {impostor:?} became a service principal");
    }

    // A valid certificate that maps to nothing is just a transport: it needs a bearer.
    let stranger = pki.issue("stranger", vec![SanType::DnsName("stranger.internal".try_into().unwrap())]);
    let mut c = tls_client(&app, &pki, Some(stranger)).await.unwrap();
    assert_eq!(c.set_organization_plan(set_plan_request()).await.unwrap_err().code(), Code::Unauthenticated);
    c.set_organization_plan(with_bearer(set_plan_request(), SERVICE_TOKEN)).await.expect("bearer over mTLS");

    // No client certificate: the handshake (or the first call) fails.
    let refused = match tls_client(&app, &pki, None).await {
        Err(_) => true,
        Ok(mut c) => c.list_scopes(with_bearer(pb::ListScopesRequest {}, SERVICE_TOKEN)).await.is_err(),
    };
    assert!(refused, "mutual TLS requires a client certificate");
}
