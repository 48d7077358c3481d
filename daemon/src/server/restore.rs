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
use object_store::ObjectStoreExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout;
use tracing::{info, warn};

use nbackup_protocol::Name;
use nbackup_protocol::admin::EventKind;
use nbackup_protocol::config::Bucket;
use nbackup_protocol::manifest::Manifest;
use nbackup_protocol::restore::{LIST_PAGE, Part, RemoteArchive, RestoreReply, RestoreRequest, Verdict};
use nbackup_protocol::wire::{Chunk, Frame, FrameType, Reason, Refusal};

use super::Server;
use super::handle::EntryArchives;
use super::handler::{blocking, json_request, refuse};
use super::listener::Conn;
use super::offsite::{client, objects};
use super::storage::{ArchiveFile, StorageArea, catalog_path, parse_archive_name};
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
    RemoteArchive {
        catalog: std::fs::metadata(catalog_path(&a.path)).ok().map(|m| m.len()),
        ..RemoteArchive::described(backup.clone(), a.name.clone(), a.size, a.compression, a.manifest.as_ref())
    }
}

/// Adds to `archives` (what the disk has) every archive of the agent that only the
/// storage's buckets hold, and puts each entry's archives back in commit order.
async fn add_from_buckets(area: &StorageArea, agent: &Name, backup: Option<&Name>, archives: &mut Vec<RemoteArchive>) {
    let known = archives.iter().map(|a| (a.backup.clone(), a.archive.clone())).collect();
    for e in objects::elsewhere(&area.cfg.buckets, agent, backup, known).await {
        let o = e.stored;
        archives.push(RemoteArchive {
            catalog: o.catalog,
            bucket: Some(e.bucket.to_string()),
            ..RemoteArchive::described(o.backup, o.name, o.size, o.compression, e.manifest.as_ref())
        });
    }
    archives.sort_by_cached_key(|a| {
        let prefix = format!("{agent}-{}-", a.backup);
        let (stamp, n) = parse_archive_name(&a.archive, &prefix).map_or((String::new(), 0), |(stamp, n, _)| (stamp, n));
        (a.backup.clone(), a.commit_seq.is_some(), a.commit_seq.unwrap_or(0), stamp, n)
    });
}

async fn list<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    area: Arc<StorageArea>,
    agent: Name,
    backup: Option<Name>,
) -> Result<(), Failed> {
    let (on_disk, agent_name, wanted) = (area.clone(), agent.clone(), backup.clone());
    let mut archives = blocking(move || {
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
    add_from_buckets(&on_disk, &agent_name, wanted.as_ref(), &mut archives).await;
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

/// Where a named archive of an entry is read from: the disk, or (when the disk no
/// longer has it) the first of the storage's buckets that does.
enum Found {
    Disk(Box<ArchiveFile>),
    Bucket(Box<InBucket>),
}

struct InBucket {
    bucket: Bucket,
    remote: client::Remote,
    /// The archive object's size, from the request that found it.
    size: u64,
    key: String,
    manifest: Option<Manifest>,
    compression: nbackup_protocol::wire::Compression,
}

async fn locate(entry: &Entry, archive: &str) -> Result<Found, Refusal> {
    let missing = match find(entry, archive).await {
        Ok(f) => return Ok(Found::Disk(Box::new(f))),
        Err(r) if r.reason == Reason::NotFound => r,
        Err(r) => return Err(r),
    };
    // Only a name that is one of this entry's archives ever becomes a key.
    let prefix = format!("{}-{}-", entry.agent, entry.backup);
    let Some((_, _, compression)) = parse_archive_name(archive, &prefix) else { return Err(missing) };
    let mut unreadable = None;
    for bucket in &entry.area.cfg.buckets {
        let remote = match client::connect(bucket) {
            Ok(r) => r,
            Err(e) => {
                unreadable = Some(format!("bucket {}: {e}", bucket.name));
                continue;
            }
        };
        let key = bucket.key(entry.agent.as_str(), entry.backup.as_str(), archive);
        let size = match remote.store.head(&object_store::path::Path::from(key.as_str())).await {
            Ok(meta) => meta.size,
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => {
                warn!(bucket = %bucket.name, %key, "cannot look for an archive to restore: {e}");
                unreadable = Some(format!("bucket {}: {e}", bucket.name));
                continue;
            }
        };
        let manifest = objects::manifest(&remote, &key).await.map_err(|e| {
            Refusal::new(Reason::Internal, format!("the manifest of {archive} in bucket {}: {e}", bucket.name))
        })?;
        return Ok(Found::Bucket(Box::new(InBucket {
            bucket: bucket.clone(),
            remote,
            size,
            key,
            manifest,
            compression,
        })));
    }
    Err(match unreadable {
        Some(why) => Refusal::new(Reason::Internal, format!("{archive} is not on the server's disk, and {why}")),
        None => missing,
    })
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
    let what = match part {
        Part::Archive => "archive",
        Part::Catalog => "catalog",
    };
    let no_catalog = || Refusal::new(Reason::NotFound, "this archive has no catalog");
    let (source, size, sha256, from) = match locate(&entry, archive).await? {
        Found::Disk(file) => {
            let (path, sha256) = match part {
                Part::Archive => (file.path.clone(), file.manifest.as_ref().map(|m| m.sha256.clone())),
                Part::Catalog => (catalog_path(&file.path), None),
            };
            let opened = blocking({
                let path = path.clone();
                move || {
                    let f = std::fs::File::open(&path).map_err(|e| match e.kind() {
                        std::io::ErrorKind::NotFound => no_catalog(),
                        _ => Refusal::new(Reason::Internal, format!("cannot open: {e}")),
                    })?;
                    let len =
                        f.metadata().map_err(|e| Refusal::new(Reason::Internal, format!("cannot stat: {e}")))?.len();
                    Ok((Arc::new(f), len))
                }
            })
            .await?;
            let (f, size) = opened;
            (Source::File(f, path), size, sha256, String::new())
        }
        Found::Bucket(b) => {
            let (key, known, sha256) = match part {
                Part::Archive => (b.key.clone(), Some(b.size), b.manifest.as_ref().map(|m| m.sha256.clone())),
                Part::Catalog => (format!("{}.catalog", b.key), None, None),
            };
            let (size, stream) =
                objects::read(&b.remote, &key, known, range.start, range.end).await.map_err(|e| match e {
                    object_store::Error::NotFound { .. } => no_catalog(),
                    e => {
                        Refusal::new(Reason::Internal, format!("cannot read {key} from bucket {}: {e}", b.bucket.name))
                    }
                })?;
            let from = format!(" from bucket {}", b.bucket.name);
            (Source::Object(stream, b.bucket.stall_timeout), size, sha256, from)
        }
    };
    let (offset, stop) = (range.start, range.end.min(size));
    if offset > stop {
        return Err(Refusal::new(
            Reason::Protocol,
            format!("offset {offset} is past the end ({stop} of {size} bytes)"),
        )
        .into());
    }
    info!(agent = %entry.agent, backup = %entry.backup, archive, what, offset, stop, size, peer = %conn.peer, from, "serving a restore");
    if part == Part::Archive {
        let who =
            EventSpec { agent: Some(entry.agent.as_str()), backup: Some(entry.backup.as_str()), ..Default::default() };
        let bytes = match (offset, stop < size) {
            (_, true) => format!(" bytes {offset}..{stop} of {size}"),
            (0, false) => String::new(),
            (_, false) => format!(" from byte {offset}"),
        };
        server.telemetry.events.record(
            EventKind::RestoreServed,
            who,
            format!("{archive}: fetched by {}{bytes}{from}", conn.peer),
        );
    }
    reply(writer, &RestoreReply::Fetching { size, sha256 }).await?;
    match source {
        Source::File(f, path) => send_file(writer, f, &path, what, offset..stop).await,
        Source::Object(stream, stall) => send_object(writer, stream, stall, what, offset..stop).await,
    }
}

enum Source {
    File(Arc<std::fs::File>, std::path::PathBuf),
    /// The requested range of an object, and how long it may stay silent.
    Object(futures_util::stream::BoxStream<'static, Result<Bytes, object_store::Error>>, std::time::Duration),
}

/// Sends `range` of a file as chunks, reading the next one while one is on the wire.
async fn send_file<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    f: Arc<std::fs::File>,
    path: &std::path::Path,
    what: &str,
    range: std::ops::Range<u64>,
) -> Result<(), Failed> {
    let stop = range.end;
    let read = |at: u64| {
        let f = f.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<Bytes> {
            let len = (stop - at).min(FETCH_CHUNK as u64) as usize;
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, at)?;
            Ok(Bytes::from(buf))
        })
    };
    let mut at = range.start;
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

/// Sends an object's bytes `range` as chunks of [`FETCH_CHUNK`], as they come from
/// the bucket; a bucket silent for its `stall_timeout` ends the fetch (the client
/// resumes from the byte it has).
async fn send_object<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    mut stream: futures_util::stream::BoxStream<'static, Result<Bytes, object_store::Error>>,
    stall: std::time::Duration,
    what: &str,
    range: std::ops::Range<u64>,
) -> Result<(), Failed> {
    use futures_util::StreamExt;
    let mut at = range.start;
    let mut pending = bytes::BytesMut::new();
    loop {
        let next = match timeout(stall, stream.next()).await {
            Ok(n) => n,
            Err(_) => {
                return Err(Refusal::new(Reason::Internal, format!("the bucket sent nothing for {stall:?}")).into());
            }
        };
        let done = match next {
            Some(Ok(data)) => {
                pending.extend_from_slice(&data);
                false
            }
            Some(Err(e)) => {
                return Err(Refusal::new(Reason::Internal, format!("reading the {what} from its bucket: {e}")).into());
            }
            None => true,
        };
        while pending.len() >= FETCH_CHUNK || (done && !pending.is_empty()) {
            let data = pending.split_to(pending.len().min(FETCH_CHUNK)).freeze();
            let chunk = Chunk::new(at / FETCH_CHUNK as u64, at, data);
            at += chunk.data.len() as u64;
            send(writer, &Frame::Chunk(chunk)).await?;
        }
        if done {
            break;
        }
    }
    if at != range.end {
        return Err(Refusal::new(
            Reason::Internal,
            format!("the bucket sent {} of {} bytes of the {what}", at - range.start, range.end - range.start),
        )
        .into());
    }
    Ok(())
}

async fn verify<W: AsyncWrite + Unpin>(
    server: &Arc<Server>,
    writer: &mut FrameWriter<W>,
    entry: Entry,
    archive: String,
) -> Result<(), Failed> {
    let s = server.clone();
    let checked = match locate(&entry, &archive).await? {
        Found::Disk(file) => {
            blocking(move || {
                let entry =
                    EntryArchives { area: entry.area, agent: entry.agent, backup: entry.backup, files: Vec::new() };
                verify::verify_now(&s, &entry, &file).ok_or_else(busy)
            })
            .await?
        }
        Found::Bucket(b) => {
            let InBucket { bucket, remote, size, key, manifest, compression } = *b;
            let Some(manifest) = manifest else {
                return reply(
                    writer,
                    &RestoreReply::Verified {
                        detail: format!("{archive}: not verified: no manifest beside it in bucket {}", bucket.name),
                        archive,
                        verdict: Verdict::Unverified,
                        quarantined: false,
                    },
                )
                .await;
            };
            let (_, stream) = objects::read(&remote, &key, Some(size), 0, u64::MAX)
                .await
                .map_err(|e| Refusal::new(Reason::Internal, format!("cannot read {key} from its bucket: {e}")))?;
            let (name, stall, bucket) = (archive.clone(), bucket.stall_timeout, bucket.name.to_string());
            let handle = tokio::runtime::Handle::current();
            blocking(move || {
                let who = EventSpec {
                    agent: Some(entry.agent.as_str()),
                    backup: Some(entry.backup.as_str()),
                    ..Default::default()
                };
                let input = BlockingStream { stream, left: Bytes::new(), handle, stall };
                verify::verify_object(&s, who, &name, &bucket, input, compression, &manifest).ok_or_else(busy)
            })
            .await?
        }
    };
    let (verdict, detail, quarantined) = match checked {
        Checked::Good(m) => (Verdict::Good, m, false),
        Checked::Corrupt { message, quarantined } => (Verdict::Corrupt, message, quarantined),
        Checked::Failed(m) => (Verdict::Unverified, m, false),
        Checked::Gone => return Err(Refusal::new(Reason::NotFound, format!("{archive} was rotated out")).into()),
    };
    reply(writer, &RestoreReply::Verified { archive, verdict, detail, quarantined }).await
}

fn busy() -> Refusal {
    Refusal::new(Reason::Busy, "a verification job is running on the server; try again when it is done")
}

/// An object's byte stream read from a blocking thread (the verifier's decoder is
/// synchronous): each read waits on the runtime for the next piece.
struct BlockingStream {
    stream: futures_util::stream::BoxStream<'static, Result<Bytes, object_store::Error>>,
    left: Bytes,
    handle: tokio::runtime::Handle,
    stall: std::time::Duration,
}

impl std::io::Read for BlockingStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use futures_util::StreamExt;
        while self.left.is_empty() {
            let next = self.handle.block_on(timeout(self.stall, self.stream.next()));
            match next {
                Ok(Some(Ok(data))) => self.left = data,
                Ok(Some(Err(e))) => return Err(std::io::Error::other(e)),
                Ok(None) => return Ok(0),
                Err(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the bucket sent nothing for {:?}", self.stall),
                    ));
                }
            }
        }
        let n = buf.len().min(self.left.len());
        buf[..n].copy_from_slice(&self.left.split_to(n));
        Ok(n)
    }
}
