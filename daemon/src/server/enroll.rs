//! The server as a certificate authority for its agents (`protocol::enroll`):
//! one-time tokens, the `ENRL` connection, the ledger of what it issued, and
//! revocation.
//!
//! One owner: [`Enroller`] holds tokens and ledger behind one mutex and is the only
//! writer of `<state_dir>/enrollment.json` and of `<state_dir>/crl.pem`. A token is
//! kept only as its SHA-256; redeeming removes it first, so it works once whatever
//! the outcome, and a refusal says nothing about which check failed beyond what the
//! operator needs (logged and recorded as a `refused` event).
//!
//! Wall-clock time decides token expiry and certificate validity: a clock stepped
//! forward expires tokens early (mint another), one stepped back cannot outlive
//! [`nbackup_protocol::config::Enrollment::MAX_TOKEN_TTL`] by more than the step.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tracing::info;

use nbackup_protocol::Name;
use nbackup_protocol::admin::{CertOrigin, CertRecord, EventKind, RevokeRequest, TokenIssued};
use nbackup_protocol::enroll::{EnrollReply, EnrollRequest, TOKEN_BYTES, TOKEN_PREFIX, token_is_well_formed};
use nbackup_protocol::manifest::hex;
use nbackup_protocol::wire::{Frame, FrameType, Reason, Refusal};

use super::Server;
use super::handle::HandleError;
use super::handler::{blocking, json_request, refuse};
use super::listener::Conn;
use crate::conn::{FrameReader, FrameWriter};
use crate::pki::{self, CertPair};
use crate::state::EventSpec;

/// Tokens that were never redeemed stay in the file this long past their expiry,
/// so a late attempt is logged as "expired" rather than "unknown".
const EXPIRED_KEPT_SECS: i64 = 86_400;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Book {
    #[serde(default)]
    tokens: Vec<Token>,
    #[serde(default)]
    certificates: Vec<CertRecord>,
    /// The number of the last revocation list written.
    #[serde(default)]
    crl_number: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Token {
    /// SHA-256 of the token text, hex.
    sha256: String,
    agent: Name,
    created_at: i64,
    expires_at: i64,
}

/// Tokens, the ledger and the revocation list of one server.
pub struct Enroller {
    book: Mutex<Book>,
    /// `None`: a server without persistent state (tests); the book lives in memory.
    file: Option<PathBuf>,
}

fn now() -> i64 {
    crate::state::unix_now() as i64
}

fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

impl Enroller {
    /// Loads `<state_dir>/enrollment.json`; a missing file is an empty book, an
    /// unreadable one an error (the ledger of revocations must not silently vanish).
    pub fn open(state_dir: Option<&std::path::Path>) -> std::io::Result<Self> {
        let file = state_dir.map(|d| d.join("enrollment.json"));
        let book = match &file {
            None => Book::default(),
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => serde_json::from_str(&text).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Book::default(),
                Err(e) => return Err(e),
            },
        };
        Ok(Enroller { book: Mutex::new(book), file })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        crate::lock(&self.book)
    }

    /// Writes the book; called with the lock held so two changes never interleave.
    /// Blocking.
    fn save(&self, book: &Book) -> Result<(), String> {
        let Some(path) = &self.file else { return Ok(()) };
        let text = serde_json::to_vec_pretty(book).map_err(|e| e.to_string())?;
        crate::fsutil::write_atomic(path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// A new token for `agent`, living `ttl_secs`. Blocking.
    fn mint(&self, agent: Name, ttl_secs: u64) -> Result<(String, i64), String> {
        let mut bytes = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| format!("no randomness: {e}"))?;
        let token = format!("{TOKEN_PREFIX}{}", hex(&bytes));
        let now = now();
        let expires_at = now + ttl_secs as i64;
        let mut book = self.lock();
        book.tokens.retain(|t| t.expires_at + EXPIRED_KEPT_SECS > now);
        book.tokens.push(Token { sha256: token_hash(&token), agent, created_at: now, expires_at });
        self.save(&book)?;
        Ok((token, expires_at))
    }

    /// Consumes `token` (whatever the outcome) and checks it was minted for `agent`
    /// and has not expired. Blocking.
    fn redeem(&self, agent: &Name, token: &str) -> Result<(), Refusal> {
        let refused = |why: String| Refusal::new(Reason::NotAllowed, format!("enrollment of {agent} refused: {why}"));
        let hash = token_hash(token);
        let mut book = self.lock();
        let Some(i) = book.tokens.iter().position(|t| t.sha256 == hash) else {
            return Err(refused("the token is unknown or was already used".into()));
        };
        let t = book.tokens.remove(i);
        self.save(&book).map_err(|e| Refusal::new(Reason::Internal, e))?;
        if &t.agent != agent {
            return Err(refused(format!("the token was minted for {}, not {agent}; it is now spent", t.agent)));
        }
        if t.expires_at <= now() {
            return Err(refused(format!("the token expired at {}", rfc3339(t.expires_at))));
        }
        Ok(())
    }

    fn record(&self, cert: &pki::CertInfo, agent: &Name, origin: CertOrigin) -> Result<(), String> {
        let mut book = self.lock();
        book.certificates.push(CertRecord {
            serial: cert.serial.clone(),
            agent: Some(agent.to_string()),
            origin,
            issued_at: Some(now()),
            not_after: Some(cert.not_after),
            revoked_at: None,
        });
        self.save(&book)
    }

    pub fn certificates(&self) -> Vec<CertRecord> {
        self.lock().certificates.clone()
    }

    /// Marks what `request` names revoked and writes a new revocation list of every
    /// revoked certificate still within its validity. Returns the serials newly
    /// revoked. Blocking.
    fn revoke(
        &self,
        ca: &CertPair,
        crl: &std::path::Path,
        request: &RevokeRequest,
    ) -> Result<Vec<String>, HandleError> {
        let now = now();
        let mut book = self.lock();
        let mut newly = Vec::new();
        match (&request.agent, &request.serial) {
            (Some(agent), None) => {
                for c in book.certificates.iter_mut().filter(|c| c.agent.as_deref() == Some(agent.as_str())) {
                    if c.revoked_at.is_none() && c.not_after.is_none_or(|t| t > now) {
                        c.revoked_at = Some(now);
                        newly.push(c.serial.clone());
                    }
                }
                if newly.is_empty() {
                    return Err(HandleError::NotFound(format!(
                        "no unexpired, unrevoked certificate of {agent} in this server's ledger; revoke one by --serial or --cert"
                    )));
                }
            }
            (None, Some(serial)) => {
                let serial = pki::parse_serial(serial)
                    .ok_or_else(|| HandleError::BadId(format!("{serial:?} is not a certificate serial")))?;
                match book.certificates.iter_mut().find(|c| c.serial == serial) {
                    Some(c) if c.revoked_at.is_some() => {
                        return Err(HandleError::Conflict(format!("{serial} is already revoked")));
                    }
                    Some(c) => c.revoked_at = Some(now),
                    None => book.certificates.push(CertRecord {
                        serial: serial.clone(),
                        agent: None,
                        origin: CertOrigin::External,
                        issued_at: None,
                        not_after: request.not_after,
                        revoked_at: Some(now),
                    }),
                }
                newly.push(serial);
            }
            _ => return Err(HandleError::BadId("name either an agent or a serial".into())),
        }
        let listed: Vec<pki::Revoked> = book
            .certificates
            .iter()
            .filter(|c| c.not_after.is_none_or(|t| t > now))
            .filter_map(|c| c.revoked_at.map(|at| pki::Revoked { serial: c.serial.clone(), at }))
            .collect();
        let pem = pki::revocation_list(ca, &listed, book.crl_number + 1)
            .map_err(|e| HandleError::Unavailable(format!("cannot sign the revocation list: {e}")))?;
        crate::fsutil::write_atomic(crl, pem.as_bytes())
            .map_err(|e| HandleError::Unavailable(format!("cannot write {}: {e}", crl.display())))?;
        book.crl_number += 1;
        self.save(&book).map_err(HandleError::Unavailable)?;
        Ok(newly)
    }
}

fn read(p: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(p).map_err(|err| format!("cannot read {}: {err}", p.display()))
}

/// The CA certificate, when this server signs enrollments. Blocking.
fn read_ca_cert(server: &Server) -> Result<String, String> {
    let live = server.live();
    live.config.enrollment.as_ref().ok_or("this server does not sign certificates (no `enrollment` section)")?;
    read(&live.config.tls.ca_cert)
}

/// The CA certificate and its key, to sign with. Blocking.
fn read_ca(server: &Server) -> Result<CertPair, String> {
    let live = server.live();
    let e =
        live.config.enrollment.as_ref().ok_or("this server does not sign certificates (no `enrollment` section)")?;
    Ok(CertPair { cert_pem: read(&live.config.tls.ca_cert)?, key_pem: read(&e.ca_key)? })
}

/// `POST /v1/enrollment/tokens`. Blocking.
pub(super) fn mint(
    server: &Server,
    request: nbackup_protocol::admin::TokenRequest,
) -> Result<TokenIssued, HandleError> {
    let live = server.live();
    let Some(e) = &live.config.enrollment else {
        return Err(HandleError::Unavailable(
            "this server does not sign certificates: add an `enrollment` section with ca_key and reload".into(),
        ));
    };
    let ttl = request.ttl_secs.unwrap_or(e.token_ttl.as_secs());
    if ttl == 0 || ttl > nbackup_protocol::config::Enrollment::MAX_TOKEN_TTL.as_secs() {
        return Err(HandleError::BadId(format!("a token lives 1 s to 7 days, not {ttl} s")));
    }
    let address = match request.address.clone().or_else(|| e.address.clone()) {
        Some(a) => a,
        None => {
            let pem = std::fs::read_to_string(&live.config.tls.cert).map_err(|err| {
                HandleError::Unavailable(format!("cannot read {}: {err}", live.config.tls.cert.display()))
            })?;
            let info = pki::describe_pem(&pem).map_err(|err| HandleError::Unavailable(err.to_string()))?;
            let host = info[0].names.first().cloned().unwrap_or_else(|| "localhost".into());
            let host = if host.contains(':') { format!("[{host}]") } else { host };
            format!("{host}:{}", server.listen.port())
        }
    };
    let ca = std::fs::read_to_string(&live.config.tls.ca_cert)
        .map_err(|err| HandleError::Unavailable(format!("cannot read {}: {err}", live.config.tls.ca_cert.display())))?;
    let pin = pki::ca_pin(&ca).map_err(|err| HandleError::Unavailable(err.to_string()))?;
    let (token, expires_at) = server.enroller.mint(request.agent.clone(), ttl).map_err(HandleError::Unavailable)?;
    let agent = request.agent.to_string();
    info!(%agent, expires = %rfc3339(expires_at), "enrollment token minted");
    let command = format!("nbackup setup agent --name {agent} --server {address} --token {token} --ca-pin {pin}");
    Ok(TokenIssued { agent, token, expires_at: rfc3339(expires_at), address, ca_pin: pin.to_string(), command })
}

/// `POST /v1/certificates/revoke`: revokes, then swaps the TLS configuration so the
/// next handshake already checks the new list. Blocking.
pub(super) fn revoke(server: &Server, request: &RevokeRequest) -> Result<String, HandleError> {
    let ca = read_ca(server).map_err(HandleError::Unavailable)?;
    let crl = server.live().config.own_crl();
    let serials = server.enroller.revoke(&ca, &crl, request)?;
    server.refresh_tls().map_err(HandleError::Unavailable)?;
    let message = match &request.agent {
        Some(agent) => format!("revoked {} certificate(s) of {agent}: {}", serials.len(), serials.join(", ")),
        None => format!("revoked certificate {}", serials.join(", ")),
    };
    let spec = EventSpec { agent: request.agent.as_ref().map(Name::as_str), ..Default::default() };
    server.telemetry.events.record(EventKind::CertRevoked, spec, message.clone());
    Ok(message)
}

/// An `ENRL` connection: send the CA, read one request, answer with a certificate.
pub async fn handle<R, W>(
    server: Arc<Server>,
    conn: Conn,
    authenticated: bool,
    mut reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
    permit: OwnedSemaphorePermit,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let s = server.clone();
    // Only the certificate now: the key is read once a request has earned a signature.
    let ca = match blocking(move || read_ca_cert(&s).map_err(|e| Refusal::new(Reason::Unsupported, e))).await {
        Ok(ca) => ca,
        Err(r) => {
            // The server's own configuration: logged, not recorded against a peer.
            tracing::warn!(peer = %conn.peer, "enrollment refused: {}", r.message);
            let _ = writer.send(&Frame::Refused(r)).await;
            return;
        }
    };
    let authority = serde_json::to_string(&EnrollReply::Authority { ca }).unwrap_or_default();
    if writer.send(&Frame::EnrollReply(authority)).await.is_err() {
        return;
    }
    let Some(request) = json_request::<EnrollRequest, _, _>(
        &server,
        &conn,
        &mut reader,
        &mut writer,
        FrameType::ENROLL_REQUEST,
        "enrollment",
    )
    .await
    else {
        return;
    };
    drop(permit);
    let s = server.clone();
    let identity = conn.identities.first().cloned();
    let issued = blocking(move || {
        let days = s.live().config.enrollment.as_ref().map_or(1, |e| e.cert_days);
        let (agent, csr, origin) = match request {
            EnrollRequest::Enroll { agent, token, csr } => {
                if !token_is_well_formed(&token) {
                    return Err(Refusal::new(
                        Reason::NotAllowed,
                        format!("enrollment of {agent} refused: the token is malformed (truncated when pasted?)"),
                    ));
                }
                s.enroller.redeem(&agent, &token)?;
                (agent, csr, CertOrigin::Enrolled)
            }
            EnrollRequest::Renew { csr } => {
                let agent = match (authenticated, identity) {
                    (true, Some(id)) => Name::new(id).map_err(|e| {
                        Refusal::new(Reason::NotAllowed, format!("this certificate names no valid agent: {e}"))
                    })?,
                    _ => {
                        return Err(Refusal::new(
                            Reason::NotAllowed,
                            "a renewal is made with the certificate being renewed; enroll with a token instead",
                        ));
                    }
                };
                (agent, csr, CertOrigin::Renewed)
            }
        };
        let ca = read_ca(&s).map_err(|e| Refusal::new(Reason::Unsupported, e))?;
        let signed = pki::sign_request(&ca, &csr, agent.as_str(), days)
            .map_err(|e| Refusal::new(Reason::Protocol, format!("{agent}: {e}")))?;
        s.enroller.record(&signed.info, &agent, origin).map_err(|e| Refusal::new(Reason::Internal, e))?;
        Ok((agent, origin, signed))
    })
    .await;
    let (agent, origin, signed) = match issued {
        Ok(v) => v,
        Err(r) => return refuse(&server, &conn, &mut writer, r).await,
    };
    let until = rfc3339(signed.info.not_after);
    let (kind, verb) = match origin {
        CertOrigin::Renewed => (EventKind::CertRenewed, "renewed"),
        _ => (EventKind::Enrolled, "enrolled"),
    };
    let message =
        format!("{agent} {verb} from {}: certificate {} valid until {until}", conn.peer.ip(), signed.info.serial);
    info!(%agent, peer = %conn.peer, serial = %signed.info.serial, "certificate {verb}");
    server.telemetry.events.record(kind, EventSpec { agent: Some(agent.as_str()), ..Default::default() }, message);
    let reply =
        serde_json::to_string(&EnrollReply::Issued { cert: signed.cert_pem, not_after: until }).unwrap_or_default();
    let _ = writer.send(&Frame::EnrollReply(reply)).await;
    let _ = writer.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).expect("name")
    }

    #[test]
    fn a_token_works_once_for_its_agent_and_is_stored_hashed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = Enroller::open(Some(dir.path())).expect("open");
        let (token, _) = e.mint(name("web-02"), 600).expect("mint");
        assert!(token_is_well_formed(&token));
        let stored = std::fs::read_to_string(dir.path().join("enrollment.json")).expect("book");
        assert!(!stored.contains(&token[TOKEN_PREFIX.len()..]), "only the hash is stored");
        assert!(e.redeem(&name("web-02"), &token).is_ok());
        let again = e.redeem(&name("web-02"), &token).expect_err("single use");
        assert!(again.message.contains("already used"), "{again}");

        let (token, _) = e.mint(name("web-02"), 600).expect("mint");
        let wrong = e.redeem(&name("web-03"), &token).expect_err("bound to its agent");
        assert!(wrong.message.contains("minted for web-02"), "{wrong}");
        assert!(e.redeem(&name("web-02"), &token).is_err(), "a misbound attempt spends it");

        let (token, _) = e.mint(name("web-02"), 0).expect("mint");
        let late = e.redeem(&name("web-02"), &token).expect_err("expired");
        assert!(late.message.contains("expired"), "{late}");
        // The book survives a restart.
        let (kept, _) = e.mint(name("db-01"), 600).expect("mint");
        drop(e);
        let e = Enroller::open(Some(dir.path())).expect("reopen");
        assert!(e.redeem(&name("db-01"), &kept).is_ok());
    }

    #[test]
    fn revocation_lists_what_the_ledger_knows_and_refuses_nonsense() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = pki::new_ca("test CA", 30).expect("ca");
        let e = Enroller::open(Some(dir.path())).expect("open");
        let (_, csr) = pki::request("web-02").expect("csr");
        let signed = pki::sign_request(&ca, &csr, "web-02", 30).expect("sign");
        e.record(&signed.info, &name("web-02"), CertOrigin::Enrolled).expect("record");
        let crl = dir.path().join("crl.pem");
        let by_agent = RevokeRequest { agent: Some(name("web-02")), ..Default::default() };
        assert_eq!(e.revoke(&ca, &crl, &by_agent).expect("revoke"), vec![signed.info.serial.clone()]);
        assert!(std::fs::read_to_string(&crl).expect("crl").contains("BEGIN X509 CRL"));
        assert!(matches!(e.revoke(&ca, &crl, &by_agent), Err(HandleError::NotFound(_))), "nothing left to revoke");
        let by_serial = RevokeRequest { serial: Some(signed.info.serial.clone()), ..Default::default() };
        assert!(matches!(e.revoke(&ca, &crl, &by_serial), Err(HandleError::Conflict(_))));
        let bad = RevokeRequest { serial: Some("xyz".into()), ..Default::default() };
        assert!(matches!(e.revoke(&ca, &crl, &bad), Err(HandleError::BadId(_))));
        let external = RevokeRequest { serial: Some("0a:0b".into()), ..Default::default() };
        assert_eq!(e.revoke(&ca, &crl, &external).expect("external"), vec!["0a0b".to_string()]);
        assert_eq!(e.certificates().len(), 2);
    }
}
