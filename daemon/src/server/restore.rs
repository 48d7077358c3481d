//! The server's side of a `RSTR` connection: list, fetch and verify an agent's own
//! archives (`protocol::restore`).
//!
//! The agent is the one its certificate names, on every connection: a request naming
//! another agent is refused, logged and recorded as a `refused` event, and paths are
//! only ever built from the identity, the storage's directory and a name that the
//! entry's own listing contains — never from the request's text alone.
//!
//! A fetch streams the file from the requested offset as `Chunk` frames of
//! [`FETCH_CHUNK`] bytes, each with its absolute offset and CRC32C, reading one chunk
//! ahead on a blocking thread while the previous one is on the wire; each send has
//! the stream timeout, so a client that stops reading is dropped, not waited for.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout;
use tracing::{info, warn};

use nbackup_protocol::Name;
use nbackup_protocol::admin::EventKind;
use nbackup_protocol::restore::{LIST_PAGE, Part, RemoteArchive, RestoreReply, RestoreRequest, Verdict};
use nbackup_protocol::wire::{Chunk, Frame, FrameType, Reason, Refusal};

use super::Server;
use super::handle::EntryArchives;
use super::handler::{blocking, json_request, refuse};
use super::listener::Conn;
use super::storage::{ArchiveFile, StorageArea, catalog_path};
use super::verify::{self, Checked};
use crate::conn::{FrameReader, FrameWriter};
use crate::state::EventSpec;

/// Bytes per `Chunk` frame of a fetch.
pub const FETCH_CHUNK: usize = 1 << 20;

pub async fn handle<R, W>(
    server: Arc<Server>,
    conn: Conn,
    mut reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
    permit: OwnedSemaphorePermit,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(request) = json_request::<RestoreRequest, _, _>(
        &server,
        &conn,
        &mut reader,
        &mut writer,
        FrameType::RESTORE_REQUEST,
        "restore",
    )
    .await
    else {
        return;
    };
    drop(permit);
    let area = match check(&server, &conn, &request) {
        Ok(area) => area,
        Err(r) => return refuse(&server, &conn, &mut writer, r).await,
    };
    let result = match request {
        RestoreRequest::List { agent, backup, .. } => list(&mut writer, area, agent, backup).await,
        RestoreRequest::Fetch { agent, backup, archive, part, offset, end, .. } => {
            let entry = Entry { area, agent, backup };
            fetch(&server, &conn, &mut writer, entry, &archive, part, offset..end.unwrap_or(u64::MAX)).await
        }
        RestoreRequest::Verify { agent, backup, archive, .. } => {
            verify(&server, &mut writer, Entry { area, agent, backup }, archive).await
        }
    };
    match result {
        Ok(()) => {
            let _ = writer.shutdown().await;
        }
        Err(Failed::Refused(r)) => refuse(&server, &conn, &mut writer, r).await,
        Err(Failed::Lost(e)) => info!(peer = %conn.peer, identities = ?conn.identities, "restore connection lost: {e}"),
    }
}

/// The identity owns the agent the request names, and the storage exists.
fn check(server: &Server, conn: &Conn, request: &RestoreRequest) -> Result<Arc<StorageArea>, Refusal> {
    let agent = request.agent();
    if !conn.owns(agent) {
        return Err(Refusal::new(
            Reason::IdentityMismatch,
            format!(
                "restore request for agent {:?} from a certificate for {}; an agent reads only its own archives",
                agent.as_str(),
                conn.identities.join(", ")
            ),
        ));
    }
    let live = server.live();
    live.storages.get(request.storage()).cloned().ok_or_else(|| {
        let names: Vec<&str> = live.storages.keys().map(Name::as_str).collect();
        Refusal::new(
            Reason::UnknownStorage,
            format!("no storage {:?}; this server has: {}", request.storage().as_str(), names.join(", ")),
        )
    })
}

enum Failed {
    Refused(Refusal),
    Lost(String),
}

impl From<Refusal> for Failed {
    fn from(r: Refusal) -> Self {
        Failed::Refused(r)
    }
}

struct Entry {
    area: Arc<StorageArea>,
    agent: Name,
    backup: Name,
}

async fn send<W: AsyncWrite + Unpin>(writer: &mut FrameWriter<W>, frame: &Frame) -> Result<(), Failed> {
    match timeout(SEND_TIMEOUT, writer.send(frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Failed::Lost(e.to_string())),
        Err(_) => Err(Failed::Lost(format!("the client read nothing for {SEND_TIMEOUT:?}"))),
    }
}

/// How long one frame may wait for the client to read.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn reply<W: AsyncWrite + Unpin>(writer: &mut FrameWriter<W>, reply: &RestoreReply) -> Result<(), Failed> {
    let json = serde_json::to_string(reply).map_err(|e| Refusal::new(Reason::Internal, e.to_string()))?;
    send(writer, &Frame::RestoreReply(json)).await
}

fn remote(backup: &Name, a: &ArchiveFile) -> RemoteArchive {
    let m = a.manifest.as_ref();
    RemoteArchive {
        backup: backup.clone(),
        archive: a.name.clone(),
        size: a.size,
        compression: a.compression,
        sha256: m.map(|m| m.sha256.clone()),
        entries: m.map(|m| m.entries),
        bytes_read: m.map(|m| m.bytes_read),
        finished_at: m.map(|m| m.finished_at.clone()),
        commit_seq: m.and_then(|m| m.commit_seq),
        catalog: std::fs::metadata(catalog_path(&a.path)).ok().map(|m| m.len()),
    }
}

async fn list<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    area: Arc<StorageArea>,
    agent: Name,
    backup: Option<Name>,
) -> Result<(), Failed> {
    let archives = blocking(move || {
        let cannot = |e: std::io::Error| Refusal::new(Reason::Internal, format!("cannot list: {e}"));
        // One entry's directory when the request names it; every entry of this agent's
        // otherwise (also ones its config no longer has).
        let backups = match backup {
            Some(b) => vec![b],
            None => area.entries().map_err(cannot)?.into_iter().filter(|(a, _)| *a == agent).map(|(_, b)| b).collect(),
        };
        let mut out = Vec::new();
        for b in backups {
            out.extend(area.list(&agent, &b).map_err(cannot)?.iter().map(|f| remote(&b, f)));
        }
        Ok(out)
    })
    .await?;
    let mut pages = archives.chunks(LIST_PAGE).peekable();
    if pages.peek().is_none() {
        return reply(writer, &RestoreReply::Archives { archives: Vec::new(), more: false }).await;
    }
    while let Some(page) = pages.next() {
        let more = pages.peek().is_some();
        reply(writer, &RestoreReply::Archives { archives: page.to_vec(), more }).await?;
    }
    Ok(())
}

/// The named archive of the entry, from its own listing (so only names that are
/// this agent's archives ever reach a path).
async fn find(entry: &Entry, archive: &str) -> Result<ArchiveFile, Refusal> {
    let (area, agent, backup, name) =
        (entry.area.clone(), entry.agent.clone(), entry.backup.clone(), archive.to_owned());
    blocking(move || {
        let files =
            area.list(&agent, &backup).map_err(|e| Refusal::new(Reason::Internal, format!("cannot list: {e}")))?;
        files.into_iter().find(|f| f.name == name).ok_or_else(|| {
            Refusal::new(
                Reason::NotFound,
                format!("{agent}/{backup} has no archive {name:?} in storage {}", area.cfg.name),
            )
        })
    })
    .await
}

async fn fetch<W: AsyncWrite + Unpin>(
    server: &Server,
    conn: &Conn,
    writer: &mut FrameWriter<W>,
    entry: Entry,
    archive: &str,
    part: Part,
    range: std::ops::Range<u64>,
) -> Result<(), Failed> {
    let file = find(&entry, archive).await?;
    let (path, sha256) = match part {
        Part::Archive => (file.path.clone(), file.manifest.as_ref().map(|m| m.sha256.clone())),
        Part::Catalog => (catalog_path(&file.path), None),
    };
    let opened = blocking({
        let path = path.clone();
        move || {
            let f = std::fs::File::open(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Refusal::new(Reason::NotFound, "this archive has no catalog"),
                _ => Refusal::new(Reason::Internal, format!("cannot open: {e}")),
            })?;
            let len = f.metadata().map_err(|e| Refusal::new(Reason::Internal, format!("cannot stat: {e}")))?.len();
            Ok((Arc::new(f), len))
        }
    })
    .await?;
    let (f, size) = opened;
    let (offset, stop) = (range.start, range.end.min(size));
    if offset > stop {
        return Err(Refusal::new(
            Reason::Protocol,
            format!("offset {offset} is past the end ({stop} of {size} bytes)"),
        )
        .into());
    }
    let what = match part {
        Part::Archive => "archive",
        Part::Catalog => "catalog",
    };
    info!(agent = %entry.agent, backup = %entry.backup, archive, what, offset, stop, size, peer = %conn.peer, "serving a restore");
    if part == Part::Archive {
        let who =
            EventSpec { agent: Some(entry.agent.as_str()), backup: Some(entry.backup.as_str()), ..Default::default() };
        let from = match (offset, stop < size) {
            (_, true) => format!(" bytes {offset}..{stop} of {size}"),
            (0, false) => String::new(),
            (_, false) => format!(" from byte {offset}"),
        };
        server.telemetry.events.record(
            EventKind::RestoreServed,
            who,
            format!("{archive}: fetched by {}{from}", conn.peer),
        );
    }
    reply(writer, &RestoreReply::Fetching { size, sha256 }).await?;
    let read = |at: u64| {
        let f = f.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<Bytes> {
            let len = (stop - at).min(FETCH_CHUNK as u64) as usize;
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, at)?;
            Ok(Bytes::from(buf))
        })
    };
    let mut at = offset;
    let mut next = (at < stop).then(|| read(at));
    while let Some(pending) = next.take() {
        let data = match pending.await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                warn!(path = %path.display(), "cannot read for a restore: {e}");
                return Err(Refusal::new(Reason::Internal, format!("the server cannot read the {what}: {e}")).into());
            }
            Err(e) => return Err(Refusal::new(Reason::Internal, format!("read task failed: {e}")).into()),
        };
        let chunk = Chunk::new(at / FETCH_CHUNK as u64, at, data);
        at += chunk.data.len() as u64;
        next = (at < stop).then(|| read(at));
        send(writer, &Frame::Chunk(chunk)).await?;
    }
    Ok(())
}

async fn verify<W: AsyncWrite + Unpin>(
    server: &Arc<Server>,
    writer: &mut FrameWriter<W>,
    entry: Entry,
    archive: String,
) -> Result<(), Failed> {
    let file = find(&entry, &archive).await?;
    let s = server.clone();
    let checked = blocking(move || {
        let entry = EntryArchives { area: entry.area, agent: entry.agent, backup: entry.backup, files: Vec::new() };
        verify::verify_now(&s, &entry, &file).ok_or_else(|| {
            Refusal::new(Reason::Busy, "a verification job is running on the server; try again when it is done")
        })
    })
    .await?;
    let (verdict, detail, quarantined) = match checked {
        Checked::Good(m) => (Verdict::Good, m, false),
        Checked::Corrupt { message, quarantined } => (Verdict::Corrupt, message, quarantined),
        Checked::Failed(m) => (Verdict::Unverified, m, false),
        Checked::Gone => return Err(Refusal::new(Reason::NotFound, format!("{archive} was rotated out")).into()),
    };
    reply(writer, &RestoreReply::Verified { archive, verdict, detail, quarantined }).await
}
