//! rustls configurations and peer identity.
//!
//! Both sides speak TLS 1.3 only, with ALPN `nbkp/1`. The server requires a client
//! certificate chaining to the configured CA on every connection; the agent verifies
//! the server certificate against the same CA. An agent's identity is read from its
//! verified certificate (CN and DNS SANs), never from anything it sends.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use nbackup_protocol::config::{AgentTls, ServerTls};
use nbackup_protocol::wire::ALPN;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{what} {path} holds no PEM certificate")]
    NoCert { what: &'static str, path: PathBuf },
    #[error("{what} {path}: {detail}")]
    Invalid { what: &'static str, path: PathBuf, detail: String },
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

/// All certificates in a PEM buffer.
pub fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error> {
    CertificateDer::pem_slice_iter(pem).collect()
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = pem_certs(&read(what, path)?).map_err(|e| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert { what, path: path.to_path_buf() });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let what = "private key";
    // Deliberately no detail from the parser: it must never echo key material.
    PrivateKeyDer::from_pem_slice(&read(what, path)?).map_err(|_| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        detail: "no PEM private key found".into(),
    })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in load_certs("CA certificate", path)? {
        store.add(cert).map_err(|e| TlsError::Invalid {
            what: "CA certificate",
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    }
    Ok(Arc::new(store))
}

/// Builds the server's TLS configuration: TLS 1.3, client certificates required.
pub fn server_config(tls: &ServerTls) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder(roots(&tls.ca_cert)?).build()?;
    let mut cfg = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs("server certificate", &tls.cert)?, load_key(&tls.key)?)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // Session tickets would let a reconnecting agent skip the certificate check on
    // resumption; identity must come from a verified certificate on every connection.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Builds the agent's TLS configuration: TLS 1.3, its client certificate, the CA.
pub fn client_config(tls: &AgentTls) -> Result<Arc<ClientConfig>, TlsError> {
    let mut cfg = ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(roots(&tls.ca_cert)?)
        .with_client_auth_cert(load_certs("client certificate", &tls.cert)?, load_key(&tls.key)?)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// The name the agent expects in the server certificate.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.to_string()))
}

/// Identities a certificate vouches for: its subject CN, then its DNS SANs, without
/// duplicates. Empty if the certificate cannot be parsed.
pub fn cert_identities(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            out.push(s.to_string());
        }
    }
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name
                && !out.iter().any(|o| o == dns)
            {
                out.push((*dns).to_string());
            }
        }
    }
    out
}

/// The identities of the verified peer of a server-side connection.
pub fn peer_identities(conn: &rustls::ServerConnection) -> Vec<String> {
    conn.peer_certificates().and_then(|c| c.first()).map(cert_identities).unwrap_or_default()
}

/// The identities in the agent's own certificate file, so `nbackup` can tell a user
/// about a name mismatch before the server refuses it.
pub fn own_identities(cert_path: &Path) -> Result<Vec<String>, TlsError> {
    let certs = load_certs("client certificate", cert_path)?;
    Ok(cert_identities(&certs[0]))
}
