//! A small certificate authority for nbackup: ECDSA P-256 keys, a CA, and server and
//! agent certificates signed by it (`nbackup cert …`, the demo, the tests).
//!
//! Agent certificates carry the agent name as CN and as a DNS SAN and are only valid
//! for client authentication; server certificates carry their host names/IPs as SANs
//! and are only valid for server authentication. So a leaked server certificate cannot
//! pose as an agent, and vice versa.

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nbackup_protocol::manifest::unhex;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};

/// A certificate and its private key, PEM-encoded. `Debug` never prints the key.
#[derive(Clone)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for CertPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertPair").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

/// What a leaf certificate is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leaf {
    /// A server reachable under these DNS names and/or IP addresses.
    Server(Vec<String>),
    /// An agent with this name.
    Agent(String),
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} already exists; pass --force to overwrite")]
    Exists(PathBuf),
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // Backdate a little so hosts with slightly slow clocks accept a fresh certificate.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

fn serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| PkiError::Invalid(format!("no randomness: {e}")))?;
    bytes[0] &= 0x7f; // keep the serial positive in DER
    Ok(SerialNumber::from_slice(&bytes))
}

/// Creates a new self-signed CA valid for `days`.
pub fn new_ca(common_name: &str, days: u32) -> Result<CertPair, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "nbackup");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(serial()?);
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    Ok(CertPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Issues a leaf certificate signed by `ca`, valid for `days`.
pub fn issue(ca: &CertPair, leaf: &Leaf, days: u32) -> Result<CertPair, PkiError> {
    let issuer = issuer(ca)?;
    let key = KeyPair::generate()?;
    let cert = leaf_params(leaf, days)?.signed_by(&key, &issuer)?;
    Ok(CertPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

fn issuer(ca: &CertPair) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    Ok(Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?)
}

/// A fresh key for `agent` and a certificate signing request for it, both PEM. The
/// request only carries the public key to the CA: the CA decides the certificate's
/// names and uses ([`sign_request`]).
pub fn request(agent: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, agent);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// A certificate signed by `ca`.
#[derive(Clone, Debug)]
pub struct Signed {
    pub cert_pem: String,
    pub info: CertInfo,
}

/// Signs the public key of `csr_pem` (whose own signature must verify) into an
/// agent certificate for `agent`, valid for `days`. Nothing else of the request is
/// used: names, key usages and validity are the CA's, so a crafted request cannot
/// obtain a server or CA certificate or another name.
pub fn sign_request(ca: &CertPair, csr_pem: &str, agent: &str, days: u32) -> Result<Signed, PkiError> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| PkiError::Invalid(format!("the certificate request is not acceptable: {e}")))?;
    let cert = leaf_params(&Leaf::Agent(agent.to_string()), days)?.signed_by(&csr.public_key, &issuer(ca)?)?;
    let info = describe(cert.der())?;
    Ok(Signed { cert_pem: cert.pem(), info })
}

/// The pin of a CA certificate (PEM, the first certificate in it): the SHA-256 of
/// its DER.
pub fn ca_pin(ca_pem: &str) -> Result<nbackup_protocol::enroll::CaPin, PkiError> {
    use sha2::Digest;
    let certs = crate::tls::pem_certs(ca_pem.as_bytes()).map_err(|e| PkiError::Invalid(e.to_string()))?;
    let first = certs.first().ok_or_else(|| PkiError::Invalid("no certificate in the CA file".into()))?;
    Ok(nbackup_protocol::enroll::CaPin(sha2::Sha256::digest(first.as_ref()).into()))
}

/// What `nbackup cert list` shows of a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject's common name (empty if it has none).
    pub subject: String,
    /// Every identity it vouches for (CN, DNS and IP SANs).
    pub names: Vec<String>,
    /// Lowercase hex, no separators.
    pub serial: String,
    pub issuer: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub is_ca: bool,
}

/// Parses one DER certificate.
pub fn describe(der: &[u8]) -> Result<CertInfo, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Invalid(format!("not a certificate: {e}")))?;
    let cn = |name: &X509Name<'_>| {
        name.iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or_default().to_string()
    };
    let mut names = crate::tls::cert_identities(&rustls::pki_types::CertificateDer::from(der.to_vec()));
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::IPAddress(bytes) = name {
                let ip = match bytes.len() {
                    4 => <[u8; 4]>::try_from(*bytes).map(|b| IpAddr::from(b).to_string()).ok(),
                    16 => <[u8; 16]>::try_from(*bytes).map(|b| IpAddr::from(b).to_string()).ok(),
                    _ => None,
                };
                names.extend(ip);
            }
        }
    }
    Ok(CertInfo {
        subject: cn(cert.subject()),
        names,
        serial: nbackup_protocol::manifest::hex(cert.raw_serial()),
        issuer: cn(cert.issuer()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca: cert.is_ca(),
    })
}

/// Whether the first certificate in `cert_pem` is for the public key of `key_pem`.
pub fn key_matches(cert_pem: &str, key_pem: &str) -> Result<bool, PkiError> {
    use rcgen::PublicKeyData;
    use x509_parser::prelude::*;
    let key = KeyPair::from_pem(key_pem)?;
    let certs = crate::tls::pem_certs(cert_pem.as_bytes()).map_err(|e| PkiError::Invalid(e.to_string()))?;
    let first = certs.first().ok_or_else(|| PkiError::Invalid("no certificate".into()))?;
    let (_, cert) =
        X509Certificate::from_der(first.as_ref()).map_err(|e| PkiError::Invalid(format!("not a certificate: {e}")))?;
    Ok(cert.public_key().raw == key.subject_public_key_info().as_slice())
}

/// Every certificate in a PEM file, described.
pub fn describe_pem(pem: &str) -> Result<Vec<CertInfo>, PkiError> {
    let certs = crate::tls::pem_certs(pem.as_bytes()).map_err(|e| PkiError::Invalid(e.to_string()))?;
    if certs.is_empty() {
        return Err(PkiError::Invalid("no PEM certificate in it".into()));
    }
    certs.iter().map(|c| describe(c.as_ref())).collect()
}

/// A certificate to list as revoked: its serial (hex, as [`CertInfo::serial`]) and
/// when it was revoked (unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    pub serial: String,
    pub at: i64,
}

/// A revocation list signed by `ca` (PEM), numbered `number` (each new list a
/// higher number), valid for a year: the server honours it whatever its age, and
/// the next revocation replaces it.
pub fn revocation_list(ca: &CertPair, revoked: &[Revoked], number: u64) -> Result<String, PkiError> {
    let now = time::OffsetDateTime::now_utc();
    let mut certs = Vec::with_capacity(revoked.len());
    for r in revoked {
        let bytes = unhex(&r.serial).ok_or_else(|| PkiError::Invalid(format!("{:?} is not a serial", r.serial)))?;
        certs.push(rcgen::RevokedCertParams {
            serial_number: SerialNumber::from_slice(&bytes),
            revocation_time: time::OffsetDateTime::from_unix_timestamp(r.at).unwrap_or(now),
            reason_code: Some(rcgen::RevocationReason::CessationOfOperation),
            invalidity_date: None,
        });
    }
    let params = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::hours(1),
        next_update: now + time::Duration::days(365),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&issuer(ca)?)?.pem()?)
}

/// Parses a serial as [`CertInfo::serial`] prints it; colons (as `openssl` prints
/// them) are accepted.
pub fn parse_serial(text: &str) -> Option<String> {
    let plain: String = text.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    unhex(&plain).filter(|b| !b.is_empty() && b.len() <= 20).map(|_| plain)
}

fn leaf_params(leaf: &Leaf, days: u32) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    match leaf {
        Leaf::Server(names) => {
            if names.is_empty() {
                return Err(PkiError::Invalid("a server certificate needs at least one name or IP".into()));
            }
            dn.push(DnType::CommonName, names[0].as_str());
            for n in names {
                params.subject_alt_names.push(match n.parse::<IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(
                        n.as_str().try_into().map_err(|_| PkiError::Invalid(format!("{n:?} is not a DNS name")))?,
                    ),
                });
            }
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
        Leaf::Agent(name) => {
            nbackup_protocol::Name::new(name.as_str())
                .map_err(|e| PkiError::Invalid(format!("invalid agent name {name:?}: {e}")))?;
            dn.push(DnType::CommonName, name.as_str());
            params.subject_alt_names.push(SanType::DnsName(
                name.as_str().try_into().map_err(|_| PkiError::Invalid(format!("{name:?} is not a DNS name")))?,
            ));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    dn.push(DnType::OrganizationName, "nbackup");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial()?);
    validity(&mut params, days);
    Ok(params)
}

/// Where a pair is stored: `<prefix>.crt` and `<prefix>.key`.
pub fn pair_paths(prefix: &Path) -> (PathBuf, PathBuf) {
    let mut crt = prefix.as_os_str().to_owned();
    crt.push(".crt");
    let mut key = prefix.as_os_str().to_owned();
    key.push(".key");
    (PathBuf::from(crt), PathBuf::from(key))
}

/// Reads `<prefix>.crt` and `<prefix>.key`.
pub fn read_pair(prefix: &Path) -> Result<CertPair, PkiError> {
    let (crt, key) = pair_paths(prefix);
    Ok(CertPair {
        cert_pem: fs::read_to_string(&crt).map_err(io_err(&crt))?,
        key_pem: fs::read_to_string(&key).map_err(io_err(&key))?,
    })
}

/// Writes `<prefix>.crt` (0644) and `<prefix>.key` (0600), refusing to overwrite
/// unless `force`. The key file is created with its final mode, never world-readable.
pub fn write_pair(prefix: &Path, pair: &CertPair, force: bool) -> Result<(PathBuf, PathBuf), PkiError> {
    let (crt, key) = pair_paths(prefix);
    if let Some(dir) = prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    for p in [&crt, &key] {
        if !force && p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    write_file(&key, pair.key_pem.as_bytes(), 0o600)?;
    write_file(&crt, pair.cert_pem.as_bytes(), 0o644)?;
    Ok((crt, key))
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    // Remove first so a pre-existing file with a laxer mode is not reused.
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_server_and_agent_certificates_with_identities() {
        let ca = new_ca("test CA", 30).expect("ca");
        let server = issue(&ca, &Leaf::Server(vec!["localhost".into(), "127.0.0.1".into()]), 30).expect("server");
        let agent = issue(&ca, &Leaf::Agent("web-01".into()), 30).expect("agent");
        let der = crate::tls::pem_certs(agent.cert_pem.as_bytes()).expect("pem")[0].clone();
        assert_eq!(crate::tls::cert_identities(&der), vec!["web-01".to_string()]);
        assert!(server.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{agent:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn a_signed_request_gets_the_cas_terms_not_its_own() {
        use x509_parser::prelude::*;
        let ca = new_ca("test CA", 30).expect("ca");
        // A request asking to be a CA, a server, and someone else.
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["backup.example.com".to_string()]).expect("params");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr = params.serialize_request(&key).expect("csr").pem().expect("pem");
        let signed = sign_request(&ca, &csr, "web-02", 30).expect("signed");
        assert_eq!(signed.info.names, vec!["web-02".to_string()]);
        assert!(!signed.info.is_ca);
        let der = crate::tls::pem_certs(signed.cert_pem.as_bytes()).expect("pem")[0].clone();
        let (_, cert) = X509Certificate::from_der(der.as_ref()).expect("der");
        let eku = cert.extended_key_usage().expect("eku").expect("present").value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(key_matches(&signed.cert_pem, &key.serialize_pem()).expect("compare"));

        // A request whose signature does not verify is refused.
        let (_, good) = request("web-02").expect("csr");
        // Change one base64 digit of the last body line: the signature's bytes.
        let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
        let i = lines.len() - 2;
        let c = lines[i].remove(0);
        lines[i].insert(0, if c == 'A' { 'B' } else { 'A' });
        let tampered = lines.join("\n");
        assert!(matches!(sign_request(&ca, &tampered, "web-02", 30), Err(PkiError::Invalid(_))));
        assert!(matches!(sign_request(&ca, "not a request", "web-02", 30), Err(PkiError::Invalid(_))));
    }

    #[test]
    fn rejects_hostile_agent_names() {
        let ca = new_ca("test CA", 30).expect("ca");
        assert!(matches!(issue(&ca, &Leaf::Agent("../x".into()), 30), Err(PkiError::Invalid(_))));
    }

    #[test]
    fn writes_keys_private_and_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = new_ca("test CA", 30).expect("ca");
        let (crt, key) = write_pair(&dir.path().join("ca"), &ca, false).expect("write");
        assert_eq!(fs::metadata(&key).expect("key").permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&crt).expect("crt").permissions().mode() & 0o777, 0o644);
        assert!(matches!(write_pair(&dir.path().join("ca"), &ca, false), Err(PkiError::Exists(_))));
        assert!(write_pair(&dir.path().join("ca"), &ca, true).is_ok());
        assert_eq!(read_pair(&dir.path().join("ca")).expect("read").cert_pem, ca.cert_pem);
    }
}
