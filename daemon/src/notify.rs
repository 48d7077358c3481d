//! Telling people: each event that matters goes to the `notify:` targets that
//! asked for its class — a failure, a recovery (the first success after a failure,
//! or a late entry on time again), a success. Webhooks get a JSON (or ntfy text)
//! body over HTTP or HTTPS (system roots); commands get the event in `NBACKUP_*`
//! environment variables; e-mail goes over SMTP (STARTTLS or TLS, system roots plus
//! an optional CA file, a password read from a file). Each delivery is retried with
//! backoff and bounded by the target's timeout; a URL is never logged beyond its
//! scheme and host, a password never at all.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use nbackup_protocol::admin::{DaemonKind, Event, EventKind, Level};
use nbackup_protocol::config::{Notify, NotifyOn, NotifyTarget, WebhookFormat, WebhookUrl, redact};
use serde_json::json;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Delays between attempts: four attempts in all.
const BACKOFF: [Duration; 3] = [Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(30)];

/// A target ready to deliver to: its URL or password read from its file, if it
/// has one.
#[derive(Clone)]
pub struct Target {
    pub cfg: Notify,
    url: Option<String>,
    /// The SMTP password.
    password: Option<String>,
    /// Extra trusted roots for SMTP, PEM.
    roots: Option<Vec<u8>>,
}

/// Reads what the targets need from disk (URL files). Blocking.
pub fn resolve(targets: &[Notify]) -> Result<Vec<Target>, String> {
    targets
        .iter()
        .map(|n| {
            let url = match &n.target {
                NotifyTarget::Webhook { url: WebhookUrl::Inline(u), .. } => Some(u.clone()),
                NotifyTarget::Webhook { url: WebhookUrl::File(p), .. } => {
                    let text = std::fs::read_to_string(p)
                        .map_err(|e| format!("notify {}: cannot read {}: {e}", n.name, p.display()))?;
                    let u = text.trim().to_string();
                    if !(u.starts_with("http://") || u.starts_with("https://")) {
                        return Err(format!("notify {}: {} holds no http(s) URL", n.name, p.display()));
                    }
                    Some(u)
                }
                NotifyTarget::Command { .. } | NotifyTarget::Email(_) => None,
            };
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| format!("notify {}: cannot read {}: {e}", n.name, p.display()))
            };
            let (mut password, mut roots) = (None, None);
            if let NotifyTarget::Email(e) = &n.target {
                if let Some((_, file)) = &e.login {
                    let text = String::from_utf8(read(file)?)
                        .map_err(|_| format!("notify {}: {} is not UTF-8", n.name, file.display()))?;
                    password = Some(text.trim_end_matches(['\r', '\n']).to_string());
                }
                if let Some(ca) = &e.ca_file {
                    let pem = read(ca)?;
                    lettre::transport::smtp::client::Certificate::from_pem(&pem)
                        .map_err(|e| format!("notify {}: {}: {e}", n.name, ca.display()))?;
                    roots = Some(pem);
                }
            }
            Ok(Target { cfg: n.clone(), url, password, roots })
        })
        .collect()
}

/// The targets in force, replaced on reload.
pub struct Notifier {
    targets: RwLock<Arc<Vec<Target>>>,
    daemon: DaemonKind,
    host: String,
}

impl Notifier {
    pub fn new(targets: Vec<Target>, daemon: DaemonKind) -> Arc<Self> {
        let host =
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        Arc::new(Notifier { targets: RwLock::new(Arc::new(targets)), daemon, host })
    }

    pub fn replace(&self, targets: Vec<Target>) {
        *self.targets.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(targets);
    }

    fn targets(&self) -> Arc<Vec<Target>> {
        self.targets.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// Why a test notification did not go out.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error("no notify target {0}")]
    Unknown(String),
    #[error("{0}")]
    Failed(String),
}

impl Notifier {
    /// Sends one test message to `name` now (one attempt) and says how it went.
    pub async fn test(&self, name: &str) -> Result<String, TestError> {
        let targets = self.targets();
        let target =
            targets.iter().find(|t| t.cfg.name.as_str() == name).ok_or_else(|| TestError::Unknown(name.into()))?;
        let m = Message::test(self.daemon, self.host.clone(), name);
        match tokio::time::timeout(target.cfg.timeout, send(target, &m)).await {
            Ok(Ok(())) => Ok(format!("test notification sent to {name}")),
            Ok(Err(e)) => Err(TestError::Failed(format!("{name}: {e}"))),
            Err(_) => Err(TestError::Failed(format!("{name}: timed out after {:?}", target.cfg.timeout))),
        }
    }
}

/// The answer of `POST /v1/notify/{name}/test`, for both daemons' routers.
pub async fn test_answer(notifier: &Notifier, name: &str) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    match notifier.test(name).await {
        Ok(message) => axum::Json(nbackup_protocol::admin::ActionResult { ok: true, message }).into_response(),
        Err(e @ TestError::Unknown(_)) => crate::admin::error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => crate::admin::error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// Which classes an event belongs to, tracking failures per agent/entry so the
/// first success after one is a recovery.
#[derive(Default)]
struct Classifier {
    failing: HashSet<(String, String)>,
}

impl Classifier {
    fn classes(&mut self, e: &Event) -> Vec<NotifyOn> {
        // A bucket's failures are its own, never mixed with an entry's.
        let key = match &e.bucket {
            Some(bucket) => ("bucket".to_string(), bucket.clone()),
            None => (e.agent.clone().unwrap_or_default(), e.backup.clone().unwrap_or_default()),
        };
        match e.kind {
            EventKind::Failed
            | EventKind::MissedBackup
            | EventKind::AgentSilent
            | EventKind::ArchiveCorrupt
            | EventKind::CommitIncomplete
            | EventKind::ReloadFailed
            | EventKind::RestoreTestFailed
            | EventKind::OffsiteFailed
            | EventKind::OffsiteLagging
            | EventKind::CertExpiring
            | EventKind::Missed => {
                self.failing.insert(key);
                vec![NotifyOn::Failure]
            }
            // Usually its commit was the recovery already; this covers the rest.
            EventKind::BackupRecovered
            | EventKind::RestoreTested
            | EventKind::OffsiteCopied
            | EventKind::OffsiteCaughtUp
            | EventKind::CertRenewed => {
                if self.failing.remove(&key) {
                    vec![NotifyOn::Recovery]
                } else {
                    Vec::new()
                }
            }
            EventKind::Committed => {
                if self.failing.remove(&key) {
                    vec![NotifyOn::Success, NotifyOn::Recovery]
                } else {
                    vec![NotifyOn::Success]
                }
            }
            _ => Vec::new(),
        }
    }
}

fn word(class: NotifyOn) -> &'static str {
    match class {
        NotifyOn::Failure => "failure",
        NotifyOn::Recovery => "recovery",
        NotifyOn::Success => "success",
    }
}

/// One line for people: `FAILURE web-01/etc: …`.
fn summary(e: &Event, class: NotifyOn) -> String {
    let who = [e.agent.as_deref(), e.backup.as_deref()].into_iter().flatten().collect::<Vec<_>>().join("/");
    let label = match class {
        NotifyOn::Failure => "FAILURE",
        NotifyOn::Recovery => "RECOVERED",
        NotifyOn::Success => "OK",
    };
    if who.is_empty() {
        format!("{label} {}: {}", e.kind, e.message)
    } else {
        format!("{label} {who} {}: {}", e.kind, e.message)
    }
}

/// Follows the event log until `shutdown`, spawning one delivery per matching
/// target and event.
pub fn spawn(
    notifier: Arc<Notifier>,
    mut events: broadcast::Receiver<Event>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    let t = tracker.clone();
    tracker.spawn(async move {
        let mut classifier = Classifier::default();
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = events.recv() => match e {
                    Ok(e) => e,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!("notifications: {n} events were skipped (too many at once)");
                        continue;
                    }
                    Err(_) => return,
                },
            };
            let classes = classifier.classes(&event);
            if classes.is_empty() {
                continue;
            }
            for target in notifier.targets().iter() {
                // A target that asked for both hears once, as the stronger class.
                let Some(class) = [NotifyOn::Failure, NotifyOn::Recovery, NotifyOn::Success]
                    .into_iter()
                    .find(|c| classes.contains(c) && target.cfg.on.contains(c))
                else {
                    continue;
                };
                let message = Message {
                    class,
                    summary: summary(&event, class),
                    event: event.clone(),
                    daemon: notifier.daemon,
                    host: notifier.host.clone(),
                };
                let (target, stop) = (target.clone(), shutdown.clone());
                t.spawn(async move { deliver(&target, &message, &stop).await });
            }
        }
    });
}

/// What one delivery says.
#[derive(Clone, Debug)]
pub struct Message {
    pub class: NotifyOn,
    pub summary: String,
    pub event: Event,
    pub daemon: DaemonKind,
    pub host: String,
}

impl Message {
    /// A test message (`ctl notify-test`).
    pub fn test(daemon: DaemonKind, host: String, target: &str) -> Message {
        let event = Event {
            seq: 0,
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            kind: EventKind::Operator,
            agent: None,
            backup: None,
            session: None,
            actor: None,
            bucket: None,
            message: format!("test notification to {target}"),
        };
        Message {
            class: NotifyOn::Failure,
            summary: format!("TEST nbackup {daemon} on {host}: notifications to {target} work"),
            event,
            daemon,
            host,
        }
    }
}

async fn deliver(target: &Target, m: &Message, stop: &CancellationToken) {
    let name = &target.cfg.name;
    for (attempt, delay) in std::iter::once(None).chain(BACKOFF.iter().map(Some)).enumerate() {
        if let Some(d) = delay {
            tokio::select! {
                _ = stop.cancelled() => return,
                () = tokio::time::sleep(*d) => {}
            }
        }
        match tokio::time::timeout(target.cfg.timeout, send(target, m)).await {
            Ok(Ok(())) => {
                info!(target = %name, class = word(m.class), "notification sent");
                return;
            }
            Ok(Err(e)) => warn!(target = %name, attempt = attempt + 1, "notification failed: {e}"),
            Err(_) => {
                warn!(target = %name, attempt = attempt + 1, "notification timed out after {:?}", target.cfg.timeout)
            }
        }
    }
    warn!(target = %name, "notification given up after {} attempts: {}", BACKOFF.len() + 1, m.summary);
}

/// One attempt, for `ctl notify-test` too.
pub async fn send(target: &Target, m: &Message) -> Result<(), String> {
    match &target.cfg.target {
        NotifyTarget::Command { argv } => command(argv, m).await,
        NotifyTarget::Webhook { format, .. } => {
            let url = target.url.as_deref().ok_or("no URL")?;
            webhook(url, *format, m).await
        }
        NotifyTarget::Email(e) => email(e, target, m).await,
    }
}

/// The subject and plain-text body of a notification e-mail.
pub fn mail_text(m: &Message) -> (String, String) {
    let e = &m.event;
    let subject = format!("[nbackup] {}", m.summary.chars().take(160).collect::<String>());
    let mut body = format!("{}\n\n", m.summary);
    for (k, v) in [
        ("class", word(m.class)),
        ("event", e.kind.as_str()),
        ("level", e.kind.level().as_str()),
        ("daemon", m.daemon.as_str()),
        ("host", m.host.as_str()),
        ("agent", e.agent.as_deref().unwrap_or("")),
        ("entry", e.backup.as_deref().unwrap_or("")),
        ("session", e.session.as_deref().unwrap_or("")),
        ("time", e.time.as_str()),
    ] {
        if !v.is_empty() {
            body.push_str(&format!("{k:<8} {v}\n"));
        }
    }
    body.push_str(&format!("\n{}\n", e.message));
    (subject, body)
}

async fn email(cfg: &nbackup_protocol::config::Email, target: &Target, m: &Message) -> Result<(), String> {
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
    use nbackup_protocol::config::SmtpTls;
    let (subject, body) = mail_text(m);
    let parse = |a: &str| a.parse::<lettre::message::Mailbox>().map_err(|e| format!("address {a:?}: {e}"));
    let mut message = lettre::Message::builder().from(parse(&cfg.from)?).subject(subject);
    for to in &cfg.to {
        message = message.to(parse(to)?);
    }
    let message = message
        .header(lettre::message::header::ContentType::TEXT_PLAIN)
        .body(body)
        .map_err(|e| format!("cannot build the message: {e}"))?;
    let params = || -> Result<TlsParameters, String> {
        let mut b = TlsParameters::builder(cfg.host.clone());
        if let Some(pem) = &target.roots {
            b = b.add_root_certificate(Certificate::from_pem(pem).map_err(|e| e.to_string())?);
        }
        b.build_rustls().map_err(|e| format!("TLS setup: {e}"))
    };
    let tls = match cfg.tls {
        SmtpTls::Starttls => Tls::Required(params()?),
        SmtpTls::Tls => Tls::Wrapper(params()?),
        SmtpTls::None => Tls::None,
    };
    let mut transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(cfg.host.as_str())
        .port(cfg.port)
        .tls(tls)
        .timeout(Some(target.cfg.timeout));
    if let (Some((user, _)), Some(password)) = (&cfg.login, &target.password) {
        transport = transport.credentials(Credentials::new(user.clone(), password.clone()));
    }
    let server = format!("{}:{}", cfg.host, cfg.port);
    transport.build().send(message).await.map(|_| ()).map_err(|e| format!("SMTP {server}: {e}"))
}

async fn command(argv: &[String], m: &Message) -> Result<(), String> {
    let e = &m.event;
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("NBACKUP_CLASS", word(m.class))
        .env("NBACKUP_EVENT", e.kind.as_str())
        .env("NBACKUP_LEVEL", e.kind.level().as_str())
        .env("NBACKUP_SUMMARY", &m.summary)
        .env("NBACKUP_MESSAGE", &e.message)
        .env("NBACKUP_TIME", &e.time)
        .env("NBACKUP_AGENT", e.agent.as_deref().unwrap_or(""))
        .env("NBACKUP_ENTRY", e.backup.as_deref().unwrap_or(""))
        .env("NBACKUP_SESSION", e.session.as_deref().unwrap_or(""))
        .env("NBACKUP_DAEMON", m.daemon.as_str())
        .env("NBACKUP_HOST", &m.host)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let out = cmd.output().await.map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(format!("{} exited with {}: {}", argv[0], out.status, err.trim().chars().take(200).collect::<String>()))
}

/// The body and extra headers of a webhook call.
pub fn payload(format: WebhookFormat, m: &Message) -> (Vec<u8>, &'static str, Vec<(&'static str, String)>) {
    let e = &m.event;
    let urgent = m.class == NotifyOn::Failure || e.kind.level() == Level::Error;
    match format {
        WebhookFormat::Generic => {
            let body =
                json!({"class": word(m.class), "daemon": m.daemon, "host": m.host, "summary": m.summary, "event": e});
            (body.to_string().into_bytes(), "application/json", Vec::new())
        }
        WebhookFormat::Slack => {
            let icon = match m.class {
                NotifyOn::Failure => ":rotating_light:",
                NotifyOn::Recovery => ":white_check_mark:",
                NotifyOn::Success => ":floppy_disk:",
            };
            let body = json!({"text": format!("{icon} *nbackup {}* on {}: {}", m.daemon, m.host, m.summary)});
            (body.to_string().into_bytes(), "application/json", Vec::new())
        }
        WebhookFormat::Ntfy => {
            let headers = vec![
                ("Title", format!("nbackup {} on {}: {}", m.daemon, m.host, word(m.class))),
                ("Priority", if urgent { "high".into() } else { "default".into() }),
                ("Tags", if urgent { "rotating_light".into() } else { "white_check_mark".into() }),
            ];
            (m.summary.clone().into_bytes(), "text/plain; charset=utf-8", headers)
        }
        WebhookFormat::Gotify => {
            let body = json!({
                "title": format!("nbackup {} on {}: {}", m.daemon, m.host, word(m.class)),
                "message": m.summary,
                "priority": if urgent { 8 } else { 4 },
            });
            (body.to_string().into_bytes(), "application/json", Vec::new())
        }
    }
}

async fn webhook(url: &str, format: WebhookFormat, m: &Message) -> Result<(), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{}: {e}", redact(url)))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or_else(|| format!("{}: no host", redact(url)))?.to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri.path_and_query().map_or("/".to_string(), |p| p.as_str().to_string());
    let (body, content_type, headers) = payload(format, m);
    let mut req = Request::post(path)
        .header("host", uri.authority().map_or(host.clone(), |a| a.to_string()))
        .header("content-type", content_type)
        .header("user-agent", concat!("nbackup/", env!("CARGO_PKG_VERSION")));
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let req = req.body(Full::new(Bytes::from(body))).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("{}: cannot connect: {e}", redact(url)))?;
    let status = if https {
        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(client_tls()?)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{}: TLS: {e}", redact(url)))?;
        post(TokioIo::new(tls), req).await?
    } else {
        post(TokioIo::new(tcp), req).await?
    };
    if status.is_success() { Ok(()) } else { Err(format!("{} answered {status}", redact(url))) }
}

async fn post<I>(io: I, req: Request<Full<Bytes>>) -> Result<hyper::StatusCode, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// TLS for webhooks: the system's roots, TLS 1.2 or 1.3 (public endpoints).
fn client_tls() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no system root certificates found (install ca-certificates)".into());
            }
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, agent: &str, backup: &str) -> Event {
        Event {
            seq: 1,
            time: "2026-12-01T00:00:00Z".into(),
            kind,
            agent: Some(agent.into()),
            backup: Some(backup.into()),
            session: None,
            actor: None,
            bucket: None,
            message: "m".into(),
        }
    }

    #[test]
    fn the_first_success_after_a_failure_is_a_recovery() {
        let mut c = Classifier::default();
        assert_eq!(c.classes(&event(EventKind::Committed, "a", "b")), [NotifyOn::Success]);
        assert_eq!(c.classes(&event(EventKind::Failed, "a", "b")), [NotifyOn::Failure]);
        assert_eq!(c.classes(&event(EventKind::Committed, "a", "other")), [NotifyOn::Success], "another entry");
        assert_eq!(c.classes(&event(EventKind::Committed, "a", "b")), [NotifyOn::Success, NotifyOn::Recovery]);
        assert_eq!(c.classes(&event(EventKind::Committed, "a", "b")), [NotifyOn::Success], "once");
        assert!(c.classes(&event(EventKind::StreamLost, "a", "b")).is_empty());
        assert_eq!(c.classes(&event(EventKind::MissedBackup, "a", "c")), [NotifyOn::Failure]);
        assert_eq!(c.classes(&event(EventKind::BackupRecovered, "a", "c")), [NotifyOn::Recovery]);
        assert_eq!(c.classes(&event(EventKind::MissedBackup, "a", "d")), [NotifyOn::Failure]);
        assert_eq!(c.classes(&event(EventKind::Committed, "a", "d")), [NotifyOn::Success, NotifyOn::Recovery]);
        assert!(
            c.classes(&event(EventKind::BackupRecovered, "a", "d")).is_empty(),
            "the commit already was the recovery"
        );
        // A bucket's lag is its own (its `bucket` field), not mixed with an entry's.
        let bucket = |kind, name: Option<&str>| Event {
            agent: None,
            backup: None,
            bucket: name.map(str::to_string),
            ..event(kind, "", "")
        };
        assert_eq!(c.classes(&bucket(EventKind::CertExpiring, None)), [NotifyOn::Failure]);
        assert_eq!(c.classes(&bucket(EventKind::OffsiteLagging, Some("main/s3"))), [NotifyOn::Failure]);
        assert!(c.classes(&bucket(EventKind::OffsiteCaughtUp, Some("main/gcs"))).is_empty(), "another bucket");
        assert_eq!(c.classes(&bucket(EventKind::OffsiteCaughtUp, Some("main/s3"))), [NotifyOn::Recovery]);
        assert_eq!(
            c.classes(&bucket(EventKind::CertRenewed, None)),
            [NotifyOn::Recovery],
            "the certificate's failure was still open"
        );
    }

    #[test]
    fn payloads_are_what_each_service_takes() {
        let m = Message {
            class: NotifyOn::Failure,
            summary: summary(&event(EventKind::MissedBackup, "web-01", "etc"), NotifyOn::Failure),
            event: event(EventKind::MissedBackup, "web-01", "etc"),
            daemon: DaemonKind::Server,
            host: "backup-1".into(),
        };
        assert_eq!(m.summary, "FAILURE web-01/etc missed_backup: m");
        let (body, ct, _) = payload(WebhookFormat::Slack, &m);
        assert_eq!(ct, "application/json");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert!(v["text"].as_str().is_some_and(|t| t.contains("backup-1") && t.contains("missed_backup")), "{v}");
        let (body, ct, headers) = payload(WebhookFormat::Ntfy, &m);
        assert!(ct.starts_with("text/plain") && body.starts_with(b"FAILURE"));
        assert!(headers.iter().any(|(k, v)| *k == "Priority" && v == "high"));
        let (body, _, _) = payload(WebhookFormat::Gotify, &m);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["priority"], 8);
        let (body, _, _) = payload(WebhookFormat::Generic, &m);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!((v["class"].as_str(), v["event"]["kind"].as_str()), (Some("failure"), Some("missed_backup")));
    }
}
