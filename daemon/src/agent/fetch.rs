//! The agent's side of a `RSTR` connection: list its archives, ask the server to
//! verify one, and fetch one — resuming from the first missing byte when the
//! connection is cut, never starting over.
//!
//! A fetch hands the bytes, in order, to a bounded channel that a blocking reader
//! ([`ChannelReader`]) drains, so decompression and extraction run on their own
//! thread while the network task keeps the next chunks coming. Every chunk's CRC32C
//! and offset are checked as it arrives; the whole file's SHA-256 is compared with the
//! manifest's at the end, and the verdict is the fetch's result.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use nbackup_protocol::Name;
use nbackup_protocol::config::Retry;
use nbackup_protocol::manifest::hex;
use nbackup_protocol::restore::{Part, RemoteArchive, RestoreReply, RestoreRequest, Verdict};
use nbackup_protocol::wire::Frame;

use super::connect::{ConnectError, Connector};
use crate::conn::ConnError;

/// How long a fetch waits for the next chunk before it takes the connection for dead.
pub const FETCH_IDLE: Duration = Duration::from_secs(60);

/// Which archive of which entry.
#[derive(Clone, Debug)]
pub struct ArchiveRef {
    pub storage: Name,
    pub backup: Name,
    pub archive: String,
}

/// The server's verdict on one archive.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Verification {
    pub archive: String,
    pub verdict: Verdict,
    pub detail: String,
    pub quarantined: bool,
}

/// How a fetch ended when every byte arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    pub size: u64,
    pub sha256: String,
    /// The manifest's SHA-256, when the server has one.
    pub expected: Option<String>,
    /// Connections it took beyond the first.
    pub resumed: u32,
}

impl Fetched {
    /// Whether the bytes are the archive the manifest describes.
    pub fn verified(&self) -> bool {
        self.expected.as_deref() == Some(self.sha256.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the restore was stopped")]
    Cancelled,
    #[error("gave up after {attempts} connections: {last}")]
    GaveUp { attempts: u32, last: String },
}

/// Lists, verifies and fetches this agent's archives.
#[derive(Clone)]
pub struct RestoreClient {
    connector: Connector,
    agent: Name,
    retry: Retry,
}

impl RestoreClient {
    pub fn new(connector: Connector, agent: Name, retry: Retry) -> Self {
        RestoreClient { connector, agent, retry }
    }

    /// This agent's archives in `storage` (of `backup`, or all), oldest first.
    pub async fn list(&self, storage: &Name, backup: Option<&Name>) -> Result<Vec<RemoteArchive>, ConnectError> {
        let request =
            RestoreRequest::List { agent: self.agent.clone(), storage: storage.clone(), backup: backup.cloned() };
        let (mut conn, mut reply) = self.connector.restore(&request).await?;
        let mut out = Vec::new();
        loop {
            match reply {
                RestoreReply::Archives { archives, more } => {
                    out.extend(archives);
                    if !more {
                        return Ok(out);
                    }
                }
                other => return Err(self.unexpected("Archives", &other)),
            }
            let frame = timeout(FETCH_IDLE, conn.reader.read_frame()).await.map_err(|_| self.silent())?;
            reply = self.connector.restore_reply(&frame.map_err(|e| self.lost(e))?)?;
        }
    }

    /// Asks the server to verify one archive now.
    pub async fn verify(&self, which: &ArchiveRef) -> Result<Verification, ConnectError> {
        let request = RestoreRequest::Verify {
            agent: self.agent.clone(),
            storage: which.storage.clone(),
            backup: which.backup.clone(),
            archive: which.archive.clone(),
        };
        match self.connector.restore(&request).await?.1 {
            RestoreReply::Verified { archive, verdict, detail, quarantined } => {
                Ok(Verification { archive, verdict, detail, quarantined })
            }
            other => Err(self.unexpected("Verified", &other)),
        }
    }

    /// Fetches `part` of an archive into `out`, reconnecting from the first missing
    /// byte after a cut (within the `retry` budget). `received` counts bytes as they
    /// arrive. Ends with the SHA-256 of everything fetched.
    pub async fn fetch(
        &self,
        which: &ArchiveRef,
        part: Part,
        out: &tokio::sync::mpsc::Sender<Bytes>,
        received: &AtomicU64,
        cancel: &CancellationToken,
    ) -> Result<Fetched, FetchError> {
        self.fetch_range(which, part, 0..u64::MAX, out, received, cancel).await
    }

    /// [`RestoreClient::fetch`] of bytes `range` only (clamped to the file); the
    /// size and SHA-256 are then those of the bytes fetched, with no manifest digest.
    pub async fn fetch_range(
        &self,
        which: &ArchiveRef,
        part: Part,
        range: std::ops::Range<u64>,
        out: &tokio::sync::mpsc::Sender<Bytes>,
        received: &AtomicU64,
        cancel: &CancellationToken,
    ) -> Result<Fetched, FetchError> {
        let mut sha = Sha256::new();
        let mut at = range.start;
        let end = (range.end != u64::MAX).then_some(range.end);
        let mut attempts = 0u32;
        let mut connections = 0u32;
        loop {
            attempts += 1;
            connections += 1;
            let request = RestoreRequest::Fetch {
                agent: self.agent.clone(),
                storage: which.storage.clone(),
                backup: which.backup.clone(),
                archive: which.archive.clone(),
                part,
                offset: at,
                end,
            };
            let attempt = tokio::select! {
                r = self.fetch_from(&request, at, &mut sha, out, received) => r,
                _ = cancel.cancelled() => return Err(FetchError::Cancelled),
            };
            let error = match attempt {
                Ok((size, expected)) => {
                    let sha256 = hex(&sha.finalize());
                    // For a range, the bytes fetched (and the manifest's SHA-256 is not theirs).
                    let (size, expected) = match end {
                        Some(end) => (end.min(size) - range.start, None),
                        None => (size, expected),
                    };
                    return Ok(Fetched { size, sha256, expected, resumed: connections - 1 });
                }
                Err(Attempt::Stopped) => return Err(FetchError::Cancelled),
                Err(Attempt::Failed(e)) if !e.is_transient() => return Err(FetchError::Connect(e)),
                Err(Attempt::Failed(e)) => e,
                Err(Attempt::Cut { at: reached, why }) => {
                    // Progress resets the budget: a link that keeps delivering is not failing.
                    if reached > at {
                        attempts = 0;
                    }
                    at = reached;
                    ConnectError::Lost { address: self.connector.address().into(), detail: why }
                }
            };
            if attempts >= self.retry.max_attempts.max(1) {
                return Err(FetchError::GaveUp { attempts, last: error.to_string() });
            }
            let delay = self.retry.delay(attempts.max(1));
            warn!(archive = %which.archive, offset = at, "restore connection lost ({error}); resuming in {delay:?}");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => return Err(FetchError::Cancelled),
            }
        }
    }

    /// One connection of a fetch, from `at` (the bytes before it are in `sha`).
    async fn fetch_from(
        &self,
        request: &RestoreRequest,
        mut at: u64,
        sha: &mut Sha256,
        out: &tokio::sync::mpsc::Sender<Bytes>,
        received: &AtomicU64,
    ) -> Result<(u64, Option<String>), Attempt> {
        let (mut conn, reply) = self.connector.restore(request).await.map_err(Attempt::Failed)?;
        let (size, expected) = match reply {
            RestoreReply::Fetching { size, sha256 } => (size, sha256),
            other => return Err(Attempt::Failed(self.unexpected("Fetching", &other))),
        };
        if at > 0 {
            info!(offset = at, size, "restore resumed");
        }
        let cut = |at: u64, why: String| Attempt::Cut { at, why };
        let stop = match request {
            RestoreRequest::Fetch { end: Some(end), .. } => (*end).min(size),
            _ => size,
        };
        while at < stop {
            let frame = match timeout(FETCH_IDLE, conn.reader.read_frame()).await {
                Err(_) => return Err(cut(at, format!("no data for {FETCH_IDLE:?}"))),
                Ok(Err(e)) => return Err(cut(at, e.to_string())),
                Ok(Ok(f)) => f,
            };
            let chunk = match frame {
                Frame::Chunk(c) => c,
                Frame::Refused(r) => return Err(Attempt::Failed(ConnectError::Refused(r))),
                other => return Err(cut(at, format!("unexpected {} frame", other.frame_type().name()))),
            };
            if chunk.offset != at || !chunk.crc_ok() || at + chunk.data.len() as u64 > stop || chunk.data.is_empty() {
                return Err(cut(at, format!("chunk at {} failed its checks (expected offset {at})", chunk.offset)));
            }
            sha.update(&chunk.data);
            at += chunk.data.len() as u64;
            received.store(at, Ordering::Relaxed);
            if out.send(chunk.data).await.is_err() {
                return Err(Attempt::Stopped);
            }
        }
        Ok((size, expected))
    }

    fn unexpected(&self, wanted: &str, got: &RestoreReply) -> ConnectError {
        ConnectError::Protocol {
            address: self.connector.address().into(),
            detail: format!("expected {wanted}, got {got:?}"),
        }
    }

    fn silent(&self) -> ConnectError {
        ConnectError::Timeout {
            address: self.connector.address().into(),
            phase: "waiting for the listing",
            after: FETCH_IDLE,
        }
    }

    fn lost(&self, e: ConnError) -> ConnectError {
        ConnectError::Lost { address: self.connector.address().into(), detail: e.to_string() }
    }
}

enum Attempt {
    /// Could not start, or refused: whether to retry is the error's call.
    Failed(ConnectError),
    /// Cut after `at` bytes: resume from there.
    Cut { at: u64, why: String },
    /// The consumer went away.
    Stopped,
}

/// A blocking `Read` over the fetched bytes, for the extraction thread.
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Self {
        ChannelReader { rx, current: Bytes::new() }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        bytes::Buf::advance(&mut self.current, n);
        Ok(n)
    }
}

/// Chunks buffered between the network and the extraction thread (1 MiB each).
pub const FETCH_BUFFER: usize = 16;
