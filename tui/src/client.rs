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

use nbackup_protocol::admin::{ApiError, WatchItem};

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

/// Which daemon answers on a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonKind {
    Agent,
    Server,
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

    /// Which daemon this is, from its status.
    pub async fn kind(&self) -> Result<DaemonKind, ClientError> {
        let v: serde_json::Value = self.get("/v1/status").await?;
        if v.get("agent").is_some() {
            Ok(DaemonKind::Agent)
        } else if v.get("listen").is_some() {
            Ok(DaemonKind::Server)
        } else {
            Err(ClientError::Protocol("unrecognised status".into()))
        }
    }

    /// Follows `GET /v1/watch`: items arrive on the returned channel until the
    /// daemon closes the stream or the receiver is dropped.
    pub async fn watch(&self) -> Result<mpsc::Receiver<WatchItem>, ClientError> {
        let resp = self.send(Method::GET, "/v1/watch", None).await?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else { continue };
                buf.extend_from_slice(&data);
                while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    if let Ok(item) = serde_json::from_slice::<WatchItem>(&line)
                        && tx.send(item).await.is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(rx)
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
