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

/// Which field of a client certificate an entry of `TAKUMO_MTLS_SERVICES` matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    /// A DNS subject alternative name (compared without regard to ASCII case).
    Dns,
    /// A URI subject alternative name, e.g. `spiffe://takumo/billing` (exact).
    Uri,
    /// The subject's common name, when the subject has exactly one (exact).
    Cn,
}

/// Client-certificate identities that are service principals:
/// `dns:NAME=service,uri:URI=service,cn:NAME=service`. Each entry is typed and
/// matches only that field of the certificate: a DNS name that reads
/// `spiffe://…`, or a SAN that reads `CN=…`, is not the identity it spells.
#[derive(Debug, Clone, Default)]
pub struct CertServices {
    entries: Vec<(Field, String, String)>,
}

impl CertServices {
    pub fn parse(spec: &str) -> Result<Self> {
        let mut entries = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = |why: &str| {
                Error::invalid(format!(
                    "TAKUMO_MTLS_SERVICES: entry {part:?} {why}; write dns:NAME=service, uri:URI=service or \
                     cn:NAME=service"
                ))
            };
            let (field, rest) = match part.split_once(':') {
                Some(("dns", rest)) => (Field::Dns, rest),
                Some(("uri", rest)) => (Field::Uri, rest),
                Some(("cn", rest)) => (Field::Cn, rest),
                _ => return Err(bad("has no type")),
            };
            // The service name has no '='; the identity (a URI) may.
            let Some((identity, name)) = rest.rsplit_once('=') else {
                return Err(bad("names no service"));
            };
            let (identity, name) = (identity.trim(), name.trim());
            if identity.is_empty() || name.is_empty() {
                return Err(bad("has an empty identity or service name"));
            }
            crate::domain::validate::ident("TAKUMO_MTLS_SERVICES service name", name)?;
            entries.push((field, identity.to_owned(), name.to_owned()));
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
        let (mut dns, mut uris) = (Vec::new(), Vec::new());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns.push(*d),
                    GeneralName::URI(u) => uris.push(*u),
                    _ => {}
                }
            }
        }
        // A subject with several CNs is ambiguous: it matches no `cn:` entry.
        let cns: Vec<_> = cert.subject().iter_common_name().collect();
        let cn = match cns.as_slice() {
            [one] => one.as_str().ok(),
            _ => None,
        };
        self.entries
            .iter()
            .find(|(field, id, _)| match field {
                Field::Dns => dns.iter().any(|d| d.eq_ignore_ascii_case(id)),
                Field::Uri => uris.iter().any(|u| u == id),
                Field::Cn => cn == Some(id.as_str()),
            })
            .map(|(_, _, n)| n.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn cert(cns: &[&str], sans: Vec<SanType>) -> Vec<u8> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        for (i, cn) in cns.iter().enumerate() {
            // rcgen keeps one value per attribute type: a second CN goes in
            // under its raw OID (2.5.4.3), which encodes the same attribute.
            let ty = if i == 0 { DnType::CommonName } else { DnType::CustomDnType(vec![2, 5, 4, 3]) };
            dn.push(ty, *cn);
        }
        p.distinguished_name = dn;
        p.subject_alt_names = sans;
        p.self_signed(&KeyPair::generate().unwrap()).unwrap().der().to_vec()
    }

    fn dns(s: &str) -> SanType {
        SanType::DnsName(s.try_into().unwrap())
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn services() -> CertServices {
        CertServices::parse("dns:dashboard.internal=dashboard, uri:spiffe://takumo/billing=billing, cn:support=support")
            .unwrap()
    }

    #[test]
    fn each_typed_entry_matches_its_own_field() {
        let s = services();
        assert_eq!(s.service_for(&cert(&["x"], vec![dns("Dashboard.Internal")])), Some("dashboard"));
        assert_eq!(s.service_for(&cert(&["x"], vec![uri("spiffe://takumo/billing")])), Some("billing"));
        assert_eq!(s.service_for(&cert(&["support"], vec![])), Some("support"));
    }

    #[test]
    fn a_name_in_the_wrong_field_is_not_the_identity_it_spells() {
        let s = CertServices::parse("cn:dashboard=dashboard, uri:spiffe://takumo/billing=billing").unwrap();
        // A DNS name or a URI that reads `CN=dashboard` is no common name.
        assert_eq!(s.service_for(&cert(&["x"], vec![dns("CN=dashboard")])), None);
        assert_eq!(s.service_for(&cert(&["x"], vec![uri("CN=dashboard")])), None);
        assert_eq!(s.service_for(&cert(&["x"], vec![dns("dashboard")])), None);
        // A DNS name that reads like the URI is not the URI.
        assert_eq!(s.service_for(&cert(&["x"], vec![dns("spiffe://takumo/billing")])), None);
        // A common name that reads like the URI is not the URI either.
        assert_eq!(s.service_for(&cert(&["spiffe://takumo/billing"], vec![])), None);
    }

    #[test]
    fn a_subject_with_two_common_names_matches_no_cn_entry() {
        let s = services();
        assert_eq!(s.service_for(&cert(&["support", "other"], vec![])), None);
        assert_eq!(s.service_for(&cert(&["other", "support"], vec![])), None);
    }

    #[test]
    fn an_untyped_entry_is_refused_naming_it() {
        for spec in ["CN=dashboard=dashboard", "spiffe://takumo/billing=billing", "dashboard.internal=dashboard"] {
            let e = CertServices::parse(spec).unwrap_err().to_string();
            assert!(e.contains(spec), "{e}");
            assert!(e.contains("dns:NAME=service"), "{e}");
        }
        assert!(CertServices::parse("dns:=x").is_err());
        assert!(CertServices::parse("uri:spiffe://takumo/billing").is_err());
    }
}
