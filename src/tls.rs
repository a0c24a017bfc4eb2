//! Transport security: TLS for the gRPC listener (rustls) and, optionally,
//! mutual TLS, where a client certificate whose subject is mapped to a
//! service name makes the connection a service principal without a bearer
//! token.

use crate::error::{Error, Result};
use std::path::Path;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Reads the listener's TLS settings. `client_ca` makes client certificates
/// required and verified against that CA bundle.
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerTlsConfig> {
    let read =
        |what: &str, p: &Path| std::fs::read(p).map_err(|e| Error::invalid(format!("{what} {}: {e}", p.display())));
    let identity = Identity::from_pem(read("TAKUMO_TLS_CERT", cert)?, read("TAKUMO_TLS_KEY", key)?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = client_ca {
        config = config.client_ca_root(Certificate::from_pem(read("TAKUMO_TLS_CLIENT_CA", ca)?));
    }
    Ok(config)
}

/// Client-certificate subjects that are service principals:
/// `subject=service,subject=service`, where a subject is a DNS or URI
/// subject alternative name (e.g. `spiffe://takumo/billing`) or `CN=<name>`.
#[derive(Debug, Clone, Default)]
pub struct CertServices {
    entries: Vec<(String, String)>,
}

impl CertServices {
    pub fn parse(spec: &str) -> Result<Self> {
        let mut entries = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            // The subject may itself contain '=' (CN=…), so split at the last one.
            let Some((subject, name)) = part.rsplit_once('=') else {
                return Err(Error::invalid("TAKUMO_MTLS_SERVICES: each entry must be subject=service"));
            };
            let (subject, name) = (subject.trim(), name.trim());
            if subject.is_empty() || name.is_empty() {
                return Err(Error::invalid("TAKUMO_MTLS_SERVICES: empty subject or service name"));
            }
            entries.push((subject.to_owned(), name.to_owned()));
        }
        Ok(Self { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The service a verified client certificate (DER) stands for, if any.
    pub fn service_for(&self, der: &[u8]) -> Option<&str> {
        if self.entries.is_empty() {
            return None;
        }
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let mut subjects: Vec<String> = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => subjects.push((*d).to_owned()),
                    GeneralName::URI(u) => subjects.push((*u).to_owned()),
                    _ => {}
                }
            }
        }
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                subjects.push(format!("CN={cn}"));
            }
        }
        self.entries.iter().find(|(s, _)| subjects.iter().any(|c| c == s)).map(|(_, n)| n.as_str())
    }
}
