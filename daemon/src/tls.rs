//! rustls configurations and peer identity.
//!
//! Both sides speak TLS 1.3 only, with ALPN `nbkp/1`. The server requires a client
//! certificate chaining to the configured CA on every connection; the agent verifies
//! the server certificate against the same CA. An agent's identity is read from its
//! verified certificate (CN and DNS SANs), never from anything it sends.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use nbackup_protocol::config::{AgentTls, ServerConfig};
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

fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let what = "revocation list";
    let crls: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&read(what, path)?)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid { what, path: path.to_path_buf(), detail: e.to_string() })?;
    if crls.is_empty() {
        return Err(TlsError::Invalid { what, path: path.to_path_buf(), detail: "no PEM X509 CRL in it".into() });
    }
    Ok(crls)
}

/// Builds the server's TLS configuration: TLS 1.3, client certificates required and
/// checked against the revocation lists. With enrollment on, a handshake without a
/// client certificate is accepted too; the listener then lets it open nothing but
/// an `ENRL` connection.
pub fn server_config(config: &ServerConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let tls = &config.tls;
    // The configured list, then ours once `nbackup cert revoke` has written one.
    let mut crls = Vec::new();
    if let Some(path) = &tls.crl {
        crls.extend(load_crls(path)?);
    }
    let own = config.own_crl();
    if own.exists() {
        crls.extend(load_crls(&own)?);
    }
    // Revocation is decided by our CA's lists; a list from another issuer must not
    // lock every agent out, so a status no list speaks for is not an error.
    let mut verifier = WebPkiClientVerifier::builder(roots(&tls.ca_cert)?)
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status();
    if tls.allow_enrollment {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier.build()?;
    let mut cfg = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
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

/// The TLS configuration of a first enrollment, when the agent does not know the CA
/// yet: the handshake proves the server holds the key of the certificate it shows
/// (signatures are checked), but whether that certificate is trusted is decided after
/// the handshake, by [`check_pinned`] against the CA the server sends and the pin
/// the operator gave. No client certificate.
pub fn enrollment_client_config() -> Arc<ClientConfig> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported by the default provider")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(DeferredTrust { provider }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Arc::new(cfg)
}

/// Accepts any certificate chain during the handshake but verifies the handshake
/// signatures with it; trust is checked afterwards ([`check_pinned`]).
#[derive(Debug)]
struct DeferredTrust {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for DeferredTrust {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Whether the chain a server presented during an enrollment handshake is trusted:
/// `ca_pem` (as the server sent it) must match `pin`, and the chain must verify
/// against that CA for `server_name`, as an ordinary connection would check it.
pub fn check_pinned(
    chain: &[CertificateDer<'static>],
    ca_pem: &str,
    pin: &nbackup_protocol::enroll::CaPin,
    server_name: &ServerName<'static>,
) -> Result<(), String> {
    let actual = crate::pki::ca_pin(ca_pem).map_err(|e| format!("the server sent no usable CA certificate: {e}"))?;
    if &actual != pin {
        return Err(format!(
            "the server's CA is {actual}, not the pinned {pin}; nothing was sent (wrong server, or a machine in the middle)"
        ));
    }
    let (leaf, intermediates) = chain.split_first().ok_or("the server presented no certificate")?;
    let mut store = RootCertStore::empty();
    for cert in pem_certs(ca_pem.as_bytes()).map_err(|e| e.to_string())? {
        store.add(cert).map_err(|e| format!("the server's CA certificate is not usable: {e}"))?;
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder(Arc::new(store)).build().map_err(|e| e.to_string())?;
    verifier
        .verify_server_cert(leaf, intermediates, server_name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| format!("the server's certificate does not verify against the pinned CA: {e}"))
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
