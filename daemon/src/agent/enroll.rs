//! The agent's side of `ENRL` (`protocol::enroll`): a first enrollment with a token
//! and a CA pin (`nbackup setup agent`), renewal over mutual TLS (the daemon, before
//! its certificate ends), and installing the result without a window in which key
//! and certificate disagree.

use std::io;
use std::path::{Path, PathBuf};

use nbackup_protocol::Name;
use nbackup_protocol::config::{AgentTls, ServerEndpoint};
use nbackup_protocol::enroll::{CaPin, EnrollRequest};

use super::connect::{ConnectError, Connector};
use crate::pki;

/// What an enrollment or renewal yields: PEM texts and the certificate's end.
#[derive(Clone)]
pub struct Credentials {
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
    /// RFC 3339, as the server sent it.
    pub not_after: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("not_after", &self.not_after).field("key_pem", &"<redacted>").finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Invalid(String),
}

/// Checks that what the server issued is for our key and our name.
fn accept(
    agent: &Name,
    key_pem: String,
    ca_pem: String,
    cert_pem: String,
    not_after: String,
) -> Result<Credentials, EnrollError> {
    let info = pki::describe_pem(&cert_pem).map_err(|e| EnrollError::Invalid(format!("the server's answer: {e}")))?;
    if !info[0].names.iter().any(|n| n == agent.as_str()) {
        return Err(EnrollError::Invalid(format!(
            "the server issued a certificate for {:?}, not {agent}",
            info[0].names
        )));
    }
    if !pki::key_matches(&cert_pem, &key_pem).map_err(|e| EnrollError::Invalid(e.to_string()))? {
        return Err(EnrollError::Invalid("the server issued a certificate for another key".into()));
    }
    Ok(Credentials { key_pem, cert_pem, ca_pem, not_after })
}

/// A first enrollment: a fresh key made here, the server's CA checked against `pin`
/// (and its certificate against that CA, for the name in `endpoint`) before the
/// token is sent.
pub async fn enroll(
    endpoint: &ServerEndpoint,
    pin: &CaPin,
    agent: &Name,
    token: &str,
) -> Result<Credentials, EnrollError> {
    let connector = Connector::for_enrollment(endpoint).map_err(|e| EnrollError::Invalid(e.to_string()))?;
    let (key_pem, csr) = pki::request(agent.as_str()).map_err(|e| EnrollError::Invalid(e.to_string()))?;
    let request = EnrollRequest::Enroll { agent: agent.clone(), token: token.to_string(), csr };
    let name = connector.server_name().clone();
    let (ca, cert, not_after) =
        connector.enroll(&request, |ca, chain| crate::tls::check_pinned(chain, ca, pin, &name)).await?;
    accept(agent, key_pem, ca, cert, not_after)
}

/// A renewal over the agent's usual connection: the server must still present the
/// CA this agent trusts (a CA is never replaced by a renewal).
pub async fn renew(connector: &Connector, tls: &AgentTls, agent: &Name) -> Result<Credentials, EnrollError> {
    let (key_pem, csr) = pki::request(agent.as_str()).map_err(|e| EnrollError::Invalid(e.to_string()))?;
    let ours = std::fs::read_to_string(&tls.ca_cert)
        .map_err(|e| EnrollError::Invalid(format!("cannot read {}: {e}", tls.ca_cert.display())))?;
    let our_pin = pki::ca_pin(&ours).map_err(|e| EnrollError::Invalid(e.to_string()))?;
    let (ca, cert, not_after) = connector
        .enroll(&EnrollRequest::Renew { csr }, |ca, _| match pki::ca_pin(ca) {
            Ok(pin) if pin == our_pin => Ok(()),
            _ => Err("the server's CA is not the one this agent trusts; renewal refused".into()),
        })
        .await?;
    accept(agent, key_pem, ca, cert, not_after)
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Replaces the agent's key and certificate. Both are written beside the old ones
/// as `.new`, made durable, then renamed key first, certificate last: a crash
/// anywhere leaves either the old pair or the `.new` files that
/// [`finish_install`] completes at the next start.
pub fn install(tls: &AgentTls, creds: &Credentials) -> io::Result<()> {
    let key_new = sibling(&tls.key, ".new");
    let cert_new = sibling(&tls.cert, ".new");
    crate::fsutil::remove_if_exists(&cert_new)?;
    write_private(&key_new, creds.key_pem.as_bytes())?;
    crate::fsutil::write_atomic(&cert_new, creds.cert_pem.as_bytes())?;
    finish_install(tls).map(|_| ())
}

/// Completes an [`install`] a crash interrupted; returns whether there was one.
/// A `.new` certificate means both files were complete; a `.new` key alone means
/// the crash came before the certificate was written, and it is dropped.
pub fn finish_install(tls: &AgentTls) -> io::Result<bool> {
    let key_new = sibling(&tls.key, ".new");
    let cert_new = sibling(&tls.cert, ".new");
    if !cert_new.exists() {
        let stale = key_new.exists();
        crate::fsutil::remove_if_exists(&key_new)?;
        return Ok(stale);
    }
    if key_new.exists() {
        std::fs::rename(&key_new, &tls.key)?;
    }
    std::fs::rename(&cert_new, &tls.cert)?;
    for dir in [tls.key.parent(), tls.cert.parent()].into_iter().flatten() {
        crate::fsutil::fsync_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir })?;
    }
    Ok(true)
}

/// Creates `path` 0600 (never briefly readable by others) with `data`, durably.
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    crate::fsutil::remove_if_exists(path)?;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_in(dir: &Path) -> AgentTls {
        AgentTls {
            ca_cert: dir.join("ca.crt"),
            cert: dir.join("agent.crt"),
            key: dir.join("agent.key"),
            renew_before: AgentTls::DEFAULT_RENEW_BEFORE,
            warn_before: AgentTls::DEFAULT_WARN_BEFORE,
        }
    }

    fn creds(key: &str, cert: &str) -> Credentials {
        Credentials { key_pem: key.into(), cert_pem: cert.into(), ca_pem: String::new(), not_after: String::new() }
    }

    #[test]
    fn an_install_replaces_both_files_and_a_crash_is_completed_or_undone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = tls_in(dir.path());
        std::fs::write(&tls.key, "old key").expect("key");
        std::fs::write(&tls.cert, "old cert").expect("cert");
        install(&tls, &creds("new key", "new cert")).expect("install");
        assert_eq!(std::fs::read_to_string(&tls.key).expect("key"), "new key");
        assert_eq!(std::fs::read_to_string(&tls.cert).expect("cert"), "new cert");
        assert_eq!(std::fs::metadata(&tls.key).expect("key").permissions().mode() & 0o777, 0o600);
        assert!(!finish_install(&tls).expect("nothing pending"));

        // A crash between the renames: the key is new, the certificate still old.
        std::fs::write(sibling(&tls.cert, ".new"), "newer cert").expect("pending cert");
        std::fs::write(&tls.key, "newer key").expect("renamed key");
        assert!(finish_install(&tls).expect("completed"));
        assert_eq!(std::fs::read_to_string(&tls.cert).expect("cert"), "newer cert");

        // A crash before the certificate was written: the old pair stays.
        write_private(&sibling(&tls.key, ".new"), b"orphan key").expect("orphan");
        assert!(finish_install(&tls).expect("dropped"));
        assert_eq!(std::fs::read_to_string(&tls.key).expect("key"), "newer key");
        assert!(!sibling(&tls.key, ".new").exists());
    }
}
