//! A client for the daemons' admin API: HTTP/1.1 over a Unix socket, one connection
//! per request (local sockets make that cheap), JSON bodies, and the NDJSON watch
//! stream.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use nbackup_protocol::admin::{
    AbortRequest, ActionResult, AgentInfo, AgentStatus, ApiError, ArchiveInfo, EntryStatus, Event, HistoryRecord,
    Series, ServerStatus, SessionInfo, VerifyRequest, WatchItem,
};

/// Bound on connecting and on one request/answer.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {socket}: {source}")]
    Unreachable { socket: PathBuf, source: std::io::Error },
    #[error("access denied by the daemon at {socket}: {message}")]
    Denied { socket: PathBuf, message: String },
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("bad answer from the daemon: {0}")]
    Protocol(String),
}

pub use nbackup_protocol::admin::DaemonKind;

/// Every admin API path, in one place: `nbackup ctl` and the console build their
/// requests here (`docs/admin-api.md`).
pub mod paths {
    pub const STATUS: &str = "/v1/status";
    pub const SESSIONS: &str = "/v1/sessions";
    pub const AGENTS: &str = "/v1/agents";
    pub const ENTRIES: &str = "/v1/entries";
    pub const SERIES: &str = "/v1/series";
    pub const WATCH: &str = "/v1/watch";
    pub const RELOAD: &str = "/v1/reload";
    pub const METRICS: &str = "/metrics";
    pub const VERIFY: &str = "/v1/verify";
    pub const TOKENS: &str = "/v1/enrollment/tokens";
    pub const SYNC: &str = "/v1/sync";
    pub const CERTIFICATES: &str = "/v1/certificates";
    pub const REVOKE: &str = "/v1/certificates/revoke";

    /// Percent-encodes a path segment or query value.
    pub fn q(v: &str) -> String {
        v.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.@+".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    pub fn session(id: &str) -> String {
        format!("/v1/sessions/{}", q(id))
    }

    pub fn abort_session(id: &str) -> String {
        format!("/v1/sessions/{}/abort", q(id))
    }

    pub fn rotate(id: &str, stream: u16) -> String {
        format!("/v1/sessions/{}/streams/{stream}/rotate", q(id))
    }

    /// An entry action (`run`, `abort`, `defer?seconds=N`): on the agent for its own
    /// entry, on the server through the agent's control channel.
    pub fn entry_action(target: &super::EntryTarget, action: &str) -> String {
        match target {
            super::EntryTarget::Own(e) => format!("/v1/entries/{}/{action}", q(e)),
            super::EntryTarget::Agent { agent, entry } => {
                format!("/v1/agents/{}/entries/{}/{action}", q(agent), q(entry))
            }
        }
    }

    pub fn history(agent: Option<&str>, limit: usize) -> String {
        match agent {
            Some(a) => format!("/v1/history?limit={limit}&agent={}", q(a)),
            None => format!("/v1/history?limit={limit}"),
        }
    }

    pub fn events(since: u64, limit: usize) -> String {
        format!("/v1/events?since={since}&limit={limit}")
    }

    pub fn archives(filter: &super::ArchiveQuery) -> String {
        let mut params: Vec<String> =
            [("agent", &filter.agent), ("backup", &filter.backup), ("storage", &filter.storage)]
                .into_iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", q(v))))
                .collect();
        if filter.buckets {
            params.push("buckets=true".into());
        }
        format!("/v1/archives?{}", params.join("&"))
    }
}

/// Whose entry an action names: the agent daemon's own, or one on an agent the
/// server reaches through its control channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryTarget {
    Own(String),
    Agent { agent: String, entry: String },
}

/// Which archives `/v1/archives` lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveQuery {
    pub agent: Option<String>,
    pub backup: Option<String>,
    pub storage: Option<String>,
    /// Also the archives only the storages' buckets hold (one listing request per
    /// entry and bucket on the provider: not for polling).
    pub buckets: bool,
}

/// A daemon's status, whichever daemon it is (serialised as the daemon's own).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Status {
    Server(ServerStatus),
    Agent(AgentStatus),
}

/// What the watch stream delivers.
#[derive(Clone, Debug, PartialEq)]
pub enum Watched {
    Item(Box<WatchItem>),
    /// A line this client could not read (a newer daemon, or a bug): shown, not
    /// silently dropped.
    Unreadable {
        error: String,
        line: String,
    },
}

#[derive(Clone, Debug)]
pub struct AdminClient {
    socket: PathBuf,
}

impl AdminClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        AdminClient { socket: socket.into() }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let unreachable = |source| ClientError::Unreachable { socket: self.socket.clone(), source };
        let stream = tokio::time::timeout(TIMEOUT, UnixStream::connect(&self.socket))
            .await
            .map_err(|_| unreachable(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
            .map_err(unreachable)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "nbackup")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = tokio::time::timeout(TIMEOUT, sender.send_request(req))
            .await
            .map_err(|_| ClientError::Protocol("the daemon did not answer in time".into()))?
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let message = serde_json::from_slice::<ApiError>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        if status == StatusCode::FORBIDDEN {
            return Err(ClientError::Denied { socket: self.socket.clone(), message });
        }
        Err(ClientError::Api { status: status.as_u16(), message })
    }

    async fn body(resp: hyper::Response<hyper::body::Incoming>) -> Result<Bytes, ClientError> {
        resp.into_body().collect().await.map(|b| b.to_bytes()).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// `GET path`, decoded as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let bytes = Self::body(self.send(Method::GET, path, None).await?).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// `GET path` as text (e.g. `/metrics`).
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let bytes = Self::body(self.send(Method::GET, path, None).await?).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// `POST path` with an optional JSON body, decoded as `T`.
    pub async fn post<T: DeserializeOwned, B: Serialize>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = body.map(|b| serde_json::to_vec(b)).transpose().map_err(|e| ClientError::Protocol(e.to_string()))?;
        let bytes = Self::body(self.send(Method::POST, path, body).await?).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Which daemon this is, from its status (`daemon`, or the fields of a daemon
    /// too old to say).
    pub async fn kind(&self) -> Result<DaemonKind, ClientError> {
        let v: serde_json::Value = self.get(paths::STATUS).await?;
        match v.get("daemon").and_then(|d| d.as_str()) {
            Some("server") => Ok(DaemonKind::Server),
            Some("agent") => Ok(DaemonKind::Agent),
            _ if v.get("agent").is_some() => Ok(DaemonKind::Agent),
            _ if v.get("listen").is_some() => Ok(DaemonKind::Server),
            _ => Err(ClientError::Protocol("unrecognised status".into())),
        }
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        let v: serde_json::Value = self.get(paths::STATUS).await?;
        let decode = |e: serde_json::Error| ClientError::Protocol(format!("status: {e}"));
        if v.get("daemon").and_then(|d| d.as_str()) == Some("agent") || v.get("agent").is_some() {
            serde_json::from_value(v).map(Status::Agent).map_err(decode)
        } else {
            serde_json::from_value(v).map(Status::Server).map_err(decode)
        }
    }

    pub async fn sessions(&self) -> Result<Vec<SessionInfo>, ClientError> {
        self.get(paths::SESSIONS).await
    }

    pub async fn session(&self, id: &str) -> Result<SessionInfo, ClientError> {
        self.get(&paths::session(id)).await
    }

    pub async fn agents(&self) -> Result<Vec<AgentInfo>, ClientError> {
        self.get(paths::AGENTS).await
    }

    pub async fn entries(&self) -> Result<Vec<EntryStatus>, ClientError> {
        self.get(paths::ENTRIES).await
    }

    pub async fn history(&self, agent: Option<&str>, limit: usize) -> Result<Vec<HistoryRecord>, ClientError> {
        self.get(&paths::history(agent, limit)).await
    }

    pub async fn events(&self, since: u64, limit: usize) -> Result<Vec<Event>, ClientError> {
        self.get(&paths::events(since, limit)).await
    }

    pub async fn archives(&self, filter: &ArchiveQuery) -> Result<Vec<ArchiveInfo>, ClientError> {
        self.get(&paths::archives(filter)).await
    }

    pub async fn series(&self) -> Result<Vec<Series>, ClientError> {
        self.get(paths::SERIES).await
    }

    pub async fn metrics(&self) -> Result<String, ClientError> {
        self.get_text(paths::METRICS).await
    }

    pub async fn abort_session(&self, id: &str, reason: Option<String>) -> Result<ActionResult, ClientError> {
        self.post(&paths::abort_session(id), Some(&AbortRequest { reason })).await
    }

    pub async fn rotate(&self, id: &str, stream: u16) -> Result<ActionResult, ClientError> {
        self.post::<_, ()>(&paths::rotate(id, stream), None).await
    }

    pub async fn run_entry(&self, target: &EntryTarget) -> Result<ActionResult, ClientError> {
        self.post::<_, ()>(&paths::entry_action(target, "run"), None).await
    }

    pub async fn abort_entry(&self, target: &EntryTarget, reason: Option<String>) -> Result<ActionResult, ClientError> {
        self.post(&paths::entry_action(target, "abort"), Some(&AbortRequest { reason })).await
    }

    pub async fn defer_entry(&self, target: &EntryTarget, seconds: u64) -> Result<ActionResult, ClientError> {
        self.post::<_, ()>(&paths::entry_action(target, &format!("defer?seconds={seconds}")), None).await
    }

    /// Starts re-reading stored archives (server); results arrive as events.
    pub async fn verify(&self, request: &VerifyRequest) -> Result<ActionResult, ClientError> {
        self.post(paths::VERIFY, Some(request)).await
    }

    /// Sends a test message to one `notify:` target.
    pub async fn notify_test(&self, target: &str) -> Result<ActionResult, ClientError> {
        self.post::<_, ()>(&format!("/v1/notify/{}/test", paths::q(target)), None).await
    }

    /// Queues what buckets lack (server; `nbackup ctl sync`).
    pub async fn sync(&self, request: &nbackup_protocol::admin::SyncRequest) -> Result<ActionResult, ClientError> {
        self.post(paths::SYNC, Some(request)).await
    }

    /// A one-time enrollment token (server).
    pub async fn mint_token(
        &self,
        request: &nbackup_protocol::admin::TokenRequest,
    ) -> Result<nbackup_protocol::admin::TokenIssued, ClientError> {
        self.post(paths::TOKENS, Some(request)).await
    }

    /// The certificates the server issued or revoked.
    pub async fn certificates(&self) -> Result<Vec<nbackup_protocol::admin::CertRecord>, ClientError> {
        self.get(paths::CERTIFICATES).await
    }

    pub async fn revoke(&self, request: &nbackup_protocol::admin::RevokeRequest) -> Result<ActionResult, ClientError> {
        self.post(paths::REVOKE, Some(request)).await
    }

    pub async fn reload(&self) -> Result<ActionResult, ClientError> {
        self.post::<_, ()>(paths::RELOAD, None).await
    }

    /// Follows `GET /v1/watch`: items arrive on the returned channel until the
    /// daemon closes the stream or the receiver is dropped. A line that does not
    /// parse arrives as [`Watched::Unreadable`].
    pub async fn watch(&self) -> Result<mpsc::Receiver<Watched>, ClientError> {
        let resp = self.send(Method::GET, paths::WATCH, None).await?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else { continue };
                buf.extend_from_slice(&data);
                while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    if tx.send(parse_watch_line(&line)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

fn parse_watch_line(line: &[u8]) -> Watched {
    match serde_json::from_slice::<WatchItem>(line) {
        Ok(item) => Watched::Item(Box::new(item)),
        Err(e) => {
            let text = String::from_utf8_lossy(line);
            Watched::Unreadable { error: e.to_string(), line: text.chars().take(200).collect() }
        }
    }
}

/// Sockets of daemons running here at their default places: the one that answers,
/// if exactly one does.
pub async fn discover(candidates: &[PathBuf]) -> Result<AdminClient, String> {
    let mut found = Vec::new();
    for c in candidates {
        if UnixStream::connect(c).await.is_ok() {
            found.push(c.clone());
        }
    }
    match found.len() {
        1 => Ok(AdminClient::new(found.remove(0))),
        0 => Err(format!(
            "no nbackup daemon answers at {}; start one or pass --socket",
            candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(" or ")
        )),
        _ => Err(format!(
            "both daemons run here ({}); pass --socket to choose",
            found.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_watch_line_is_reported_not_dropped() {
        let Watched::Unreadable { error, line } = parse_watch_line(b"{\"type\":\"surprise\"}\n") else {
            panic!("must not parse");
        };
        assert!(error.contains("surprise") || error.contains("variant"), "{error}");
        assert!(line.starts_with("{\"type\""), "{line}");
        let ok = parse_watch_line(br#"{"type":"event","event":{"seq":1,"time":"t","kind":"committed","message":"m"}}"#);
        assert!(matches!(ok, Watched::Item(_)), "{ok:?}");
    }

    #[test]
    fn paths_encode_what_they_are_given() {
        assert_eq!(paths::abort_session("a b/c"), "/v1/sessions/a%20b%2Fc/abort");
        let t = EntryTarget::Agent { agent: "web-1".into(), entry: "etc".into() };
        assert_eq!(paths::entry_action(&t, "defer?seconds=60"), "/v1/agents/web-1/entries/etc/defer?seconds=60");
        assert_eq!(paths::entry_action(&EntryTarget::Own("etc".into()), "run"), "/v1/entries/etc/run");
        let q = ArchiveQuery { agent: Some("web-1".into()), ..Default::default() };
        assert_eq!(paths::archives(&q), "/v1/archives?agent=web-1");
        let q = ArchiveQuery { buckets: true, ..q };
        assert_eq!(paths::archives(&q), "/v1/archives?agent=web-1&buckets=true");
    }

    #[tokio::test]
    async fn discovery_picks_the_one_daemon_that_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, agent) = (dir.path().join("server.sock"), dir.path().join("agent.sock"));
        let candidates = [server.clone(), agent.clone()];
        let none = discover(&candidates).await.expect_err("nothing listens");
        assert!(none.contains("no nbackup daemon answers") && none.contains("--socket"), "{none}");
        // A stale socket file (nobody accepting) does not count.
        drop(std::os::unix::net::UnixListener::bind(&server).expect("stale"));
        let _agent = tokio::net::UnixListener::bind(&agent).expect("agent");
        assert_eq!(discover(&candidates).await.expect("one").socket(), agent);
        std::fs::remove_file(&server).expect("rm stale");
        let _server = tokio::net::UnixListener::bind(&server).expect("server");
        let both = discover(&candidates).await.expect_err("ambiguous");
        assert!(both.contains("both daemons run here"), "{both}");
    }
}
