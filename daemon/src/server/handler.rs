//! The policy of a connection's first request: `Hello` (open a session: identity,
//! storage, capabilities, chunk size, space, quota, entry lock), `Join` (attach a
//! stream), `Status` (what became of a session), and the one-shot health `PING`.
//! Checks that touch a storage's disk run on blocking threads.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout;
use tracing::{debug, info, warn};

use nbackup_protocol::admin::EventKind;
use nbackup_protocol::limits::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use nbackup_protocol::wire::{Caps, Frame, FrameType, Health, Hello, Joined, Reason, Refusal, StorageHealth, Welcome};
use nbackup_protocol::{Name, SessionId};

use super::listener::Conn;
use super::registry::Outcome;
use super::session::{EntryKey, Session, SessionParams};
use super::storage::StorageArea;
use super::{Server, stream};
use crate::conn::{FrameReader, FrameWriter};
use crate::state::EventSpec;

/// Refuses a request: logs it, records an event, tells the peer, closes.
pub async fn refuse<W: AsyncWrite + Unpin>(
    server: &Server,
    conn: &Conn,
    writer: &mut FrameWriter<W>,
    refusal: Refusal,
) {
    warn!(peer = %conn.peer, identities = ?conn.identities, reason = %refusal.reason, "refused: {}", refusal.message);
    let agent = conn.identities.first().map(String::as_str);
    server.telemetry.events.record(EventKind::Refused, EventSpec { agent, ..Default::default() }, refusal.to_string());
    let _ = writer.send(&Frame::Refused(refusal)).await;
    let _ = writer.shutdown().await;
}

/// Runs blocking `f` on a blocking thread; a panic there becomes an internal refusal.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Refusal> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Refusal::new(Reason::Internal, format!("server task failed: {e}"))))
}

pub async fn ping<W: AsyncWrite + Unpin>(server: &Server, conn: &Conn, mut writer: FrameWriter<W>) {
    let storages = server
        .live()
        .storages
        .values()
        .map(|s| {
            let (free_bytes, total_bytes) = server.disk.space(&s.cfg.name).unwrap_or((0, 0));
            StorageHealth { name: s.cfg.name.clone(), compression: s.cfg.compression, free_bytes, total_bytes }
        })
        .collect();
    let health = Health {
        server_version: crate::VERSION.to_string(),
        uptime_secs: server.started.elapsed().as_secs(),
        draining: server.draining(),
        active_sessions: server.registry.count() as u32,
        storages,
    };
    debug!(peer = %conn.peer, identities = ?conn.identities, "health check");
    let _ = writer.send(&Frame::Health(health)).await;
    let _ = writer.shutdown().await;
}

/// Reads the first request of a connection, which must be of an `expected` type;
/// anything else is refused (and logged) and yields `None`.
pub(super) async fn first_frame<R, W>(
    server: &Server,
    conn: &Conn,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    expected: &[FrameType],
) -> Option<Frame>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let hs = server.live().config.handshake_timeout;
    match timeout(hs, reader.read_frame()).await {
        Ok(Ok(f)) if expected.contains(&f.frame_type()) => Some(f),
        Ok(Ok(other)) => {
            let names: Vec<&str> = expected.iter().map(|t| t.name()).collect();
            let msg = format!("expected {}, got {}", names.join(" or "), other.frame_type().name());
            refuse(server, conn, writer, Refusal::new(Reason::Protocol, msg)).await;
            None
        }
        Ok(Err(e)) => {
            warn!(peer = %conn.peer, identities = ?conn.identities, "refused: {e}");
            None
        }
        Err(_) => {
            warn!(peer = %conn.peer, identities = ?conn.identities, "refused: no request within {hs:?}");
            None
        }
    }
}

/// The first request of a `RSTR` or `ENRL` connection: a frame of type `ty` holding
/// JSON of a `T`; anything else is refused (and logged) and yields `None`.
pub(super) async fn json_request<T, R, W>(
    server: &Server,
    conn: &Conn,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    ty: FrameType,
    what: &str,
) -> Option<T>
where
    T: serde::de::DeserializeOwned,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let json = match first_frame(server, conn, reader, writer, &[ty]).await? {
        Frame::RestoreRequest(json) | Frame::EnrollRequest(json) => json,
        _ => return None,
    };
    match serde_json::from_str(&json) {
        Ok(r) => Some(r),
        Err(e) => {
            let r = Refusal::new(Reason::Protocol, format!("bad {what} request: {e}"));
            refuse(server, conn, writer, r).await;
            None
        }
    }
}

pub async fn backup<R, W>(
    server: Arc<Server>,
    conn: Conn,
    mut reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
    permit: OwnedSemaphorePermit,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Some(Frame::Hello(hello)) = first_frame(&server, &conn, &mut reader, &mut writer, &[FrameType::HELLO]).await
    else {
        return;
    };
    drop(permit);
    let session = match open(&server, &conn, &hello).await {
        Ok(s) => s,
        Err(r) => {
            refuse(&server, &conn, &mut writer, r).await;
            return;
        }
    };
    let p = session.params.clone();
    info!(
        session = %p.id, agent = %p.key.agent, backup = %p.key.backup, storage = %p.key.storage,
        peer = %conn.peer, compression = %p.compression, "session opened"
    );
    let welcome = Welcome { session: p.id, compression: p.compression, level: p.level, max_streams: p.max_streams };
    let limits = server.live().limits();
    let attached = server.registry.attach(p.id, 0, 0, |a| conn.owns(a), limits);
    let attached = match attached {
        Ok(a) => a,
        Err(r) => {
            refuse(&server, &conn, &mut writer, r).await;
            return;
        }
    };
    if let Err(e) = writer.send(&Frame::Welcome(welcome)).await {
        warn!(session = %p.id, "cannot send Welcome: {e}");
        let why = Refusal::new(Reason::Cancelled, "agent left before Welcome");
        let _ = server.registry.end(p.id, Outcome::Failed(why));
        return;
    }
    *crate::lock(&attached.stats.peer) = conn.peer.to_string();
    server.telemetry.session_event(
        &session,
        EventKind::Started,
        format!("session opened from {} ({})", conn.peer, p.compression),
    );
    stream::run(server, attached, 0, 0, reader, writer).await;
}

/// Checks a `Hello` against identity, storage, disk, quota and locks, and opens the
/// session.
async fn open(server: &Arc<Server>, conn: &Conn, hello: &Hello) -> Result<Arc<Session>, Refusal> {
    if !conn.owns(&hello.agent) {
        return Err(Refusal::new(
            Reason::IdentityMismatch,
            format!(
                "agent says it is {:?} but its certificate is for {}",
                hello.agent.as_str(),
                conn.identities.join(", ")
            ),
        ));
    }
    let live = server.live();
    let storage = live.storages.get(&hello.storage).cloned().ok_or_else(|| {
        let names: Vec<&str> = live.storages.keys().map(Name::as_str).collect();
        Refusal::new(
            Reason::UnknownStorage,
            format!("no storage {:?}; this server has: {}", hello.storage.as_str(), names.join(", ")),
        )
    })?;
    let compression = storage.cfg.compression;
    if !conn.caps.contains(Caps::for_compression(compression)) {
        return Err(Refusal::new(
            Reason::Unsupported,
            format!("storage {} needs {compression}, which this agent cannot produce", storage.cfg.name),
        ));
    }
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&hello.chunk_size) {
        return Err(Refusal::new(Reason::Protocol, format!("chunk size {} out of range", hello.chunk_size)));
    }
    let key = EntryKey { agent: hello.agent.clone(), storage: hello.storage.clone(), backup: hello.backup.clone() };
    let limits = live.limits();
    server.registry.may_open(&key, limits)?;
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| Refusal::new(Reason::Internal, format!("no randomness: {e}")))?;
    let params = SessionParams {
        id: SessionId(id),
        key,
        compression,
        level: storage.cfg.level,
        chunk_size: hello.chunk_size,
        max_streams: hello.streams.clamp(1, live.config.max_streams_per_session),
        agent_version: hello.agent_version.clone(),
        started: chrono::Utc::now(),
    };
    let session = blocking(move || {
        check_space(&storage, &params.key.agent, &params.key.backup)?;
        Session::create(params, storage).map(Arc::new)
    })
    .await?;
    session.touch();
    if let Err(r) = server.registry.open(session.clone(), limits) {
        // Lost a race with another Hello for the same entry.
        let s = session.clone();
        let _ = tokio::task::spawn_blocking(move || s.discard()).await;
        return Err(r);
    }
    Ok(session)
}

/// Refuses a session when the storage could not hold another archive as large as the
/// entry's newest one, or when the agent's quota could not.
fn check_space(storage: &StorageArea, agent: &Name, backup: &Name) -> Result<(), Refusal> {
    let (free, _) =
        storage.disk_space().map_err(|e| Refusal::new(Reason::WriteError, format!("cannot stat storage: {e}")))?;
    let newest = storage.list(agent, backup).ok().and_then(|v| v.last().map(|a| a.size)).unwrap_or(0);
    if free < newest || free == 0 {
        return Err(Refusal::new(
            Reason::DiskFull,
            format!(
                "storage {} has {} bytes free; the previous archive of this entry was {} bytes",
                storage.cfg.name, free, newest
            ),
        ));
    }
    storage.check_quota(agent, newest)
}

pub async fn join<R, W>(
    server: Arc<Server>,
    conn: Conn,
    mut reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
    permit: OwnedSemaphorePermit,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let expected = [FrameType::JOIN, FrameType::STATUS];
    let join = match first_frame(&server, &conn, &mut reader, &mut writer, &expected).await {
        Some(Frame::Join(join)) => join,
        Some(Frame::Status(status)) => {
            let answer = match server.registry.state(status.session, |a| conn.owns(a)) {
                Ok(state) => Frame::SessionState(state),
                Err(r) => Frame::Refused(r),
            };
            let _ = writer.send(&answer).await;
            let _ = writer.shutdown().await;
            return;
        }
        _ => return,
    };
    drop(permit);
    let limits = server.live().limits();
    let attached = match server.registry.attach(join.session, join.stream, join.generation, |a| conn.owns(a), limits) {
        Ok(a) => a,
        Err(r) => {
            refuse(&server, &conn, &mut writer, r).await;
            return;
        }
    };
    let joined = Joined { stream: join.stream, contiguous: attached.session.contiguous() };
    if writer.send(&Frame::Joined(joined)).await.is_err() {
        server.registry.detach(join.session, join.stream, join.generation);
        return;
    }
    info!(session = %join.session, stream = join.stream, generation = join.generation, peer = %conn.peer, "stream joined");
    *crate::lock(&attached.stats.peer) = conn.peer.to_string();
    let (kind, msg) = if attached.joins > 1 {
        (
            EventKind::StreamRejoined,
            format!("stream {} re-joined from {} ({} joins)", join.stream, conn.peer, attached.joins),
        )
    } else {
        (EventKind::StreamJoined, format!("stream {} joined from {}", join.stream, conn.peer))
    };
    server.telemetry.session_event(&attached.session, kind, msg);
    stream::run(server, attached, join.stream, join.generation, reader, writer).await;
}
