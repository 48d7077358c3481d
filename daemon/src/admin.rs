//! The local admin API server: HTTP/1.1 + JSON on a Unix socket.
//!
//! The socket is created with mode 0660 (and the configured group), a stale socket
//! left by a dead daemon is replaced, a live one is not, and every request's peer
//! credentials (`SO_PEERCRED`) are checked: root, the daemon's own user, and members
//! of the configured group (primary or supplementary) are served; anyone else gets
//! 403. Group names are resolved from `/etc/group`.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use nbackup_protocol::admin::{Actor, ApiError};

use crate::state::EventSpec;

/// Who is on the other end of an admin connection.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
}

impl Connected<axum::serve::IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        let cred = stream.io().peer_cred().ok();
        Peer { uid: cred.map(|c| c.uid()), gid: cred.map(|c| c.gid()), pid: cred.and_then(|c| c.pid()) }
    }
}

/// Who may use the API.
#[derive(Clone, Debug)]
struct Access {
    own_uid: u32,
    group: Option<u32>,
}

/// The default socket for `daemon` (`agent` or `server`): under `/run/nbackup` as
/// root, else under `$XDG_RUNTIME_DIR/nbackup` (or the temp dir without one).
pub fn default_socket(daemon: &str) -> PathBuf {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    nbackup_protocol::admin::default_socket(
        daemon,
        rustix::process::geteuid().is_root(),
        runtime.as_deref(),
        &std::env::temp_dir(),
    )
}

/// Looks a group up in `/etc/group`.
pub fn group_id(name: &str) -> Option<u32> {
    id_of("/etc/group", name)
}

/// The id (third field) of `name` in a passwd-format file.
fn id_of(file: &str, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Supplementary groups of a process, from `/proc/<pid>/status`.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Groups:").map(|g| g.split_whitespace().filter_map(|x| x.parse().ok()).collect())
            })
        })
        .unwrap_or_default()
}

fn allowed(access: &Access, peer: &Peer) -> bool {
    let Some(uid) = peer.uid else { return false };
    if uid == 0 || uid == access.own_uid {
        return true;
    }
    match access.group {
        Some(g) => peer.gid == Some(g) || peer.pid.is_some_and(|pid| supplementary_groups(pid).contains(&g)),
        None => false,
    }
}

async fn check_peer(
    State(access): State<Access>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    if allowed(&access, &peer) {
        return next.run(request).await;
    }
    tracing::warn!(uid = ?peer.uid, pid = ?peer.pid, path = %request.uri().path(), "admin API: access denied");
    let body = ApiError { error: "access denied: root, the daemon's user or its admin group only".into() };
    (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
}

/// Records an operator's action: who (from the socket's credentials), what, and the
/// daemon's answer. Each daemon hands in how it records events.
pub type Audit = Arc<dyn Fn(EventSpec<'_>, String) + Send + Sync>;

/// A user name from `/etc/passwd`.
pub fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        (f.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_string())
    })
}

/// A user id from `/etc/passwd`.
pub fn user_id(name: &str) -> Option<u32> {
    id_of("/etc/passwd", name)
}

/// Who runs this process: the user name, or `uid N` without one.
pub fn current_user() -> String {
    let uid = rustix::process::geteuid().as_raw();
    user_name(uid).unwrap_or_else(|| format!("uid {uid}"))
}

/// An action's target in words, and the agent, entry and session it names, from
/// its path (`docs/admin-api.md`).
fn describe(path: &str) -> (String, Option<String>, Option<String>, Option<String>) {
    let parts: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    let own = |s: &str| Some(s.to_string());
    match parts.as_slice() {
        ["sessions", id, "abort"] => (format!("abort session {id}"), None, None, own(id)),
        ["sessions", id, "streams", n, "rotate"] => (format!("rotate stream {n} of session {id}"), None, None, own(id)),
        ["agents", a, "entries", e, verb] => (format!("{verb} {a}/{e}"), own(a), own(e), None),
        ["entries", e, verb] => (format!("{verb} {e}"), None, own(e), None),
        ["reload"] => ("reload the configuration".into(), None, None, None),
        ["verify"] => ("verify stored archives".into(), None, None, None),
        ["notify", target, "test"] => (format!("test notification to {target}"), None, None, None),
        _ => (path.to_string(), None, None, None),
    }
}

/// Answers with at most this much JSON are read back for the audit record.
const AUDIT_BODY_CAP: usize = 64 * 1024;

async fn audit(
    State(audit): State<Audit>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() != axum::http::Method::POST {
        return next.run(request).await;
    }
    let path = request.uri().path().to_string();
    let query = request.uri().query().map(str::to_string);
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, AUDIT_BODY_CAP).await else {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    };
    let reason = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_string));
    let response = next.run(Request::from_parts(parts, axum::body::Body::from(body))).await;
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, AUDIT_BODY_CAP).await.unwrap_or_default();
    let answer = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("message").or_else(|| v.get("error")).and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_else(|| parts.status.to_string());
    let (what, agent, backup, session) = describe(&path);
    let mut message = what;
    if let Some(q) = query {
        message.push_str(&format!(" ({q})"));
    }
    if let Some(r) = reason {
        message.push_str(&format!(" (reason: {r})"));
    }
    let verdict = if parts.status.is_success() { "done" } else { "refused" };
    message.push_str(&format!(": {verdict}: {answer}"));
    let actor = peer.uid.map(|uid| Actor { uid, user: user_name(uid) });
    let spec = EventSpec {
        agent: agent.as_deref(),
        backup: backup.as_deref(),
        session: session.as_deref(),
        actor,
        bucket: None,
    };
    audit(spec, message);
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// Binds `path`, replacing a stale socket but never a live one or another file.
pub fn bind(path: &Path, group: Option<&str>) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; not touching it", path.display()),
            ));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another daemon is already serving {}", path.display()),
                ));
            }
            Err(_) => {
                tracing::info!(path = %path.display(), "removing stale admin socket");
                std::fs::remove_file(path)?;
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(g) = group {
        let gid = group_id(g).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no group {g:?}")))?;
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    Ok(listener)
}

/// Serves `router` on `listener` until `shutdown`, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    group: Option<&str>,
    router: Router,
    audit_to: Audit,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let access = Access { own_uid: rustix::process::geteuid().as_raw(), group: group.and_then(group_id) };
    // Outermost, so refused attempts are on record too.
    let app = router
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint (see docs/admin-api.md)") })
        .layer(middleware::map_response(json_errors))
        .layer(middleware::from_fn_with_state(access, check_peer))
        .layer(middleware::from_fn_with_state(audit_to, audit));
    tracing::info!(socket = %path.display(), "admin API ready");
    let result = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    let _ = std::fs::remove_file(&path);
    result
}

/// Makes every error answer `{"error": …}`, including those axum writes itself (a
/// malformed query or body, a wrong method), so clients parse one shape.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_lowercase() } else { text };
    error(status, message)
}

/// A JSON error response.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(ApiError { error: message.into() })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rules() {
        let a = Access { own_uid: 1000, group: Some(500) };
        let p = |uid, gid| Peer { uid: Some(uid), gid: Some(gid), pid: None };
        assert!(allowed(&a, &p(0, 0)), "root");
        assert!(allowed(&a, &p(1000, 1000)), "the daemon's user");
        assert!(allowed(&a, &p(2000, 500)), "the admin group");
        assert!(!allowed(&a, &p(2000, 2000)), "anyone else");
        assert!(!allowed(&a, &Peer { uid: None, gid: None, pid: None }), "unknown peer");
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        let live = bind(&path, None).expect("stale socket replaced");
        assert_eq!(std::fs::metadata(&path).expect("socket").permissions().mode() & 0o777, 0o660);
        let err = bind(&path, None).expect_err("live socket kept");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(live);
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").expect("file");
        assert_eq!(bind(&file, None).expect_err("not a socket").kind(), io::ErrorKind::AlreadyExists);
    }
}

/// Prometheus text exposition, as both daemons' `/metrics` write it.
#[derive(Default)]
pub struct Exposition(String);

impl Exposition {
    /// One metric family: its help, type and samples (`labels` already braced).
    pub fn metric(&mut self, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
        use std::fmt::Write;
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(self.0, "{name}{labels} {value}");
        }
    }

    pub fn finish(self) -> String {
        self.0
    }
}

/// A label value escaped for the exposition format.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The `nbackup_cert_expiry_timestamp_seconds` family of a daemon's own certificates.
pub fn cert_expiry(out: &mut Exposition, certs: &[nbackup_protocol::admin::CertExpiry], whose: &str) {
    let samples: Vec<(String, f64)> =
        certs.iter().filter_map(|c| Some((format!("{{cert=\"{}\"}}", label(&c.cert)), c.not_after? as f64))).collect();
    let help = format!("Unix time the {whose}'s own certificate and its CA end (tls.warn_before warns).");
    out.metric("nbackup_cert_expiry_timestamp_seconds", "gauge", &help, &samples);
}
