//! The nbackup server: accepts agents over mutual TLS, receives archives in chunks,
//! verifies and commits them, rotates old ones.
//!
//! Each connection runs in its own task. Every phase before a session is established
//! (TLS handshake, preamble, first frame) has a deadline, so a slow or silent peer
//! costs one task for at most `handshake_timeout`. A stream is three tasks joined by
//! bounded channels: a reader that decodes frames, a disk task that writes chunks
//! (on blocking threads) and queues acks, and a writer that sends acks and answers.
//! Backpressure flows back to TCP: a slow disk stops the reader, which stops the
//! agent's window.

mod journal;
mod recovery;
mod session;
pub mod storage;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use nbackup_protocol::config::ServerConfig;
use nbackup_protocol::limits::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use nbackup_protocol::wire::{
    Caps, Chunk, ConnKind, Frame, FrameType, Health, Hello, Join, Joined, PROTOCOL_VERSION, Reason, Refusal,
    SessionState, Status, StorageHealth, Welcome,
};
use nbackup_protocol::{Name, SessionId};

use crate::conn::{ConnError, FrameReader, FrameWriter};
use crate::tls;
pub use session::{EntryKey, Outcome};
use session::{Session, SessionParams, Written, lock};
use storage::StorageArea;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("storage {name} at {path}: {source}")]
    Storage { name: Name, path: std::path::PathBuf, source: std::io::Error },
    #[error("listener: {0}")]
    Listen(std::io::Error),
}

/// How long shutdown waits for connections to finish after telling agents.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Finished sessions are remembered this long (across restarts, through their
/// journals) so that an agent that lost the answer to its `Commit` learns the outcome
/// when it asks again instead of sending the backup twice.
const FINISHED_TTL: Duration = Duration::from_secs(3600);

/// Bound on sending one frame to an agent; a peer that stops reading is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an aborted stream keeps draining what the agent still sends, so the
/// Abort is read instead of lost to a connection reset.
const LINGER: Duration = Duration::from_secs(2);

struct Finished {
    agent: Name,
    outcome: Outcome,
    at: Instant,
}

struct Registry {
    sessions: HashMap<SessionId, Arc<Session>>,
    locks: HashMap<EntryKey, SessionId>,
    finished: HashMap<SessionId, Finished>,
}

/// State shared by all connections of one server.
struct Shared {
    config: ServerConfig,
    storages: BTreeMap<Name, Arc<StorageArea>>,
    /// One lock for the session table; held only for lookups and inserts.
    registry: Mutex<Registry>,
    started: Instant,
    draining: AtomicBool,
    tracker: TaskTracker,
}

/// Runs a server on `listener` until `shutdown` is cancelled, then tells connected
/// agents, ends open sessions and returns once connections have closed (bounded).
pub async fn run(config: ServerConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<(), ServerError> {
    let acceptor = TlsAcceptor::from(tls::server_config(&config.tls)?);
    let mut storages = BTreeMap::new();
    let mut registry = Registry { sessions: HashMap::new(), locks: HashMap::new(), finished: HashMap::new() };
    for (name, cfg) in &config.storages {
        let area = Arc::new(StorageArea::new(cfg.clone()));
        area.prepare().map_err(|source| ServerError::Storage {
            name: name.clone(),
            path: cfg.base_dir.clone(),
            source,
        })?;
        let recovered = recovery::recover(&area, FINISHED_TTL);
        for session in recovered.sessions {
            let session = Arc::new(session);
            registry.locks.insert(session.params.key.clone(), session.id());
            registry.sessions.insert(session.id(), session);
        }
        for (id, agent, outcome, age) in recovered.finished {
            let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            registry.finished.insert(id, Finished { agent, outcome, at });
        }
        storages.insert(name.clone(), area);
    }
    let shared = Arc::new(Shared {
        config,
        storages,
        registry: Mutex::new(registry),
        started: Instant::now(),
        draining: AtomicBool::new(false),
        tracker: TaskTracker::new(),
    });
    info!(
        listen = %listener.local_addr().map_err(ServerError::Listen)?,
        storages = shared.storages.len(),
        version = crate::VERSION,
        "server ready"
    );
    shared.tracker.spawn(reaper(shared.clone(), shutdown.clone()));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let shared2 = shared.clone();
                    let acceptor = acceptor.clone();
                    shared.tracker.spawn(async move { shared2.handle_connection(acceptor, tcp, peer).await });
                }
                // Out of file descriptors or similar: back off briefly instead of spinning.
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    info!("shutting down: refusing new sessions and aborting open ones");
    shared.draining.store(true, Ordering::SeqCst);
    drop(listener);
    let open: Vec<Arc<Session>> = lock(&shared.registry).sessions.values().cloned().collect();
    for s in open {
        shared.end_session(&s, Outcome::Failed(Refusal::new(Reason::Draining, "server shutting down")));
    }
    shared.tracker.close();
    if timeout(DRAIN_TIMEOUT, shared.tracker.wait()).await.is_err() {
        warn!("some connections did not close within {DRAIN_TIMEOUT:?}");
    }
    info!("server stopped");
    Ok(())
}

/// Ends sessions idle for longer than `session_ttl`, or without any stream for longer
/// than `orphan_timeout`, releasing their locks; forgets old outcomes.
async fn reaper(shared: Arc<Shared>, shutdown: CancellationToken) {
    let ttl = shared.config.session_ttl;
    let orphan = shared.config.orphan_timeout;
    let period = (orphan.min(ttl) / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
    let mut tick = tokio::time::interval(period);
    let mut compacted = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if compacted.elapsed() >= FINISHED_TTL / 4 {
            compacted = Instant::now();
            for area in shared.storages.values() {
                let area = area.clone();
                let _ = tokio::task::spawn_blocking(move || area.recent_commits(FINISHED_TTL)).await;
            }
        }
        let sessions: Vec<Arc<Session>> = lock(&shared.registry).sessions.values().cloned().collect();
        for s in sessions {
            if s.idle_for() > ttl {
                let msg = format!("no traffic for {}s", s.idle_for().as_secs());
                shared.end_session(&s, Outcome::Failed(Refusal::new(Reason::Expired, msg)));
            } else if let Some(gone) = s.orphaned_for().filter(|d| *d > orphan) {
                let msg = format!("the agent's connections were gone for {}s", gone.as_secs());
                shared.end_session(&s, Outcome::Failed(Refusal::new(Reason::Expired, msg)));
            }
        }
        lock(&shared.registry).finished.retain(|_, f| f.at.elapsed() < FINISHED_TTL);
    }
}

/// What ended a stream's read loop.
enum StreamEnd {
    Closed,
    Stopped,
    AgentAborted,
    Error(String),
}

impl Shared {
    fn end_session(&self, session: &Arc<Session>, outcome: Outcome) {
        if !session.end(outcome.clone()) {
            return;
        }
        let mut reg = lock(&self.registry);
        reg.sessions.remove(&session.id());
        if reg.locks.get(&session.params.key) == Some(&session.id()) {
            reg.locks.remove(&session.params.key);
        }
        reg.finished
            .insert(session.id(), Finished { agent: session.params.key.agent.clone(), outcome, at: Instant::now() });
    }

    async fn handle_connection(self: Arc<Self>, acceptor: TlsAcceptor, tcp: TcpStream, peer: SocketAddr) {
        let hs = self.config.handshake_timeout;
        let _ = tcp.set_nodelay(true);
        let tls = match timeout(hs, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                warn!(%peer, "TLS handshake refused: {e}");
                return;
            }
            Err(_) => {
                warn!(%peer, "TLS handshake timed out after {hs:?}");
                return;
            }
        };
        let (identities, alpn_ok) = {
            let conn = tls.get_ref().1;
            (tls::peer_identities(conn), conn.alpn_protocol() == Some(nbackup_protocol::wire::ALPN))
        };
        let (r, w) = tokio::io::split(tls);
        let mut reader = FrameReader::new(r);
        let mut writer = FrameWriter::new(w);
        if !alpn_ok {
            warn!(%peer, "refused: client did not negotiate ALPN nbkp/1");
            return;
        }
        let preamble = match timeout(hs, reader.read_preamble()).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                warn!(%peer, ?identities, "refused: bad preamble: {e}");
                return;
            }
            Err(_) => {
                warn!(%peer, ?identities, "refused: no preamble within {hs:?}");
                return;
            }
        };
        if preamble.version != PROTOCOL_VERSION {
            let r = Refusal::new(
                Reason::BadVersion,
                format!("server speaks protocol {PROTOCOL_VERSION}, client {}", preamble.version),
            );
            warn!(%peer, ?identities, "refused: {r}");
            let _ = writer.send(&Frame::Refused(r)).await;
            return;
        }
        let conn = Conn { peer, identities, caps: preamble.caps };
        match preamble.kind {
            ConnKind::Ping => self.handle_ping(&conn, writer).await,
            ConnKind::Backup => self.handle_backup(conn, reader, writer).await,
            ConnKind::Join => self.handle_join(conn, reader, writer).await,
        }
    }

    async fn handle_ping<W: AsyncWrite + Unpin>(&self, conn: &Conn, mut writer: FrameWriter<W>) {
        let storages = self
            .storages
            .values()
            .map(|s| {
                let (free_bytes, total_bytes) = s.disk_space().unwrap_or((0, 0));
                StorageHealth { name: s.cfg.name.clone(), compression: s.cfg.compression, free_bytes, total_bytes }
            })
            .collect();
        let health = Health {
            server_version: crate::VERSION.to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            draining: self.draining.load(Ordering::SeqCst),
            active_sessions: lock(&self.registry).sessions.len() as u32,
            storages,
        };
        debug!(peer = %conn.peer, identities = ?conn.identities, "health check");
        let _ = writer.send(&Frame::Health(health)).await;
        let _ = writer.shutdown().await;
    }

    /// Reads the first request of a connection, which must be of type `expected`;
    /// anything else is refused (and logged) and yields `None`.
    async fn first_frame<R, W>(
        &self,
        conn: &Conn,
        reader: &mut FrameReader<R>,
        writer: &mut FrameWriter<W>,
        expected: &[FrameType],
    ) -> Option<Frame>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let hs = self.config.handshake_timeout;
        match timeout(hs, reader.read_frame()).await {
            Ok(Ok(f)) if expected.contains(&f.frame_type()) => Some(f),
            Ok(Ok(other)) => {
                let names: Vec<&str> = expected.iter().map(|t| t.name()).collect();
                let msg = format!("expected {}, got {}", names.join(" or "), other.frame_type().name());
                conn.refuse(writer, Refusal::new(Reason::Protocol, msg)).await;
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

    async fn handle_backup<R, W>(self: Arc<Self>, conn: Conn, mut reader: FrameReader<R>, mut writer: FrameWriter<W>)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let Some(Frame::Hello(hello)) = self.first_frame(&conn, &mut reader, &mut writer, &[FrameType::HELLO]).await
        else {
            return;
        };
        let session = match self.open_session(&conn, &hello) {
            Ok(s) => s,
            Err(r) => {
                conn.refuse(&mut writer, r).await;
                return;
            }
        };
        let p = &session.params;
        info!(
            session = %p.id, agent = %p.key.agent, backup = %p.key.backup, storage = %p.key.storage,
            peer = %conn.peer, compression = %p.compression, "session opened"
        );
        let welcome = Welcome { session: p.id, compression: p.compression, level: p.level, max_streams: p.max_streams };
        if let Err(e) = writer.send(&Frame::Welcome(welcome)).await {
            warn!(session = %p.id, "cannot send Welcome: {e}");
            self.end_session(&session, Outcome::Failed(Refusal::new(Reason::Cancelled, "agent left before Welcome")));
            return;
        }
        let cancel = match session.attach(0, 0) {
            Ok(c) => c,
            Err(r) => {
                conn.refuse(&mut writer, r).await;
                return;
            }
        };
        self.run_stream(session, 0, 0, cancel, reader, writer).await;
    }

    /// Checks a `Hello` against identity, storage, disk and locks, and opens the session.
    fn open_session(&self, conn: &Conn, hello: &Hello) -> Result<Arc<Session>, Refusal> {
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
        if self.draining.load(Ordering::SeqCst) {
            return Err(Refusal::new(Reason::Draining, "server is shutting down"));
        }
        let storage = self.storages.get(&hello.storage).ok_or_else(|| {
            let names: Vec<&str> = self.storages.keys().map(Name::as_str).collect();
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
        check_space(storage, &hello.agent, &hello.backup)?;
        let key = EntryKey { agent: hello.agent.clone(), storage: hello.storage.clone(), backup: hello.backup.clone() };
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| Refusal::new(Reason::Internal, format!("no randomness: {e}")))?;
        let params = SessionParams {
            id: SessionId(id),
            key: key.clone(),
            compression,
            level: storage.cfg.level,
            chunk_size: hello.chunk_size,
            max_streams: hello.streams.clamp(1, self.config.max_streams_per_session),
            agent_version: hello.agent_version.clone(),
            started: chrono::Utc::now(),
        };
        // Take the entry lock before creating files; supersede a session whose agent is
        // gone (no stream attached): the same agent starting the same entry again means
        // it has given up on the old one, e.g. after being killed.
        let stale = {
            let reg = lock(&self.registry);
            match reg.locks.get(&key).and_then(|id| reg.sessions.get(id)) {
                Some(old) if old.attached_streams() > 0 => {
                    return Err(Refusal::new(
                        Reason::Busy,
                        format!(
                            "session {} for this entry started at {} is still running",
                            old.id(),
                            old.params.started.format("%Y-%m-%d %H:%M:%S UTC")
                        ),
                    ));
                }
                other => other.cloned(),
            }
        };
        if let Some(old) = stale {
            info!(session = %old.id(), "superseded by a new session from the same agent");
            self.end_session(&old, Outcome::Failed(Refusal::new(Reason::Cancelled, "superseded by a new session")));
        }
        let session = Arc::new(Session::create(params, storage.clone())?);
        session.touch();
        let mut reg = lock(&self.registry);
        if reg.locks.contains_key(&key) {
            // Lost a race with another Hello for the same entry.
            drop(reg);
            session.end(Outcome::Failed(Refusal::new(Reason::Busy, "raced")));
            return Err(Refusal::new(Reason::Busy, "another session for this entry just started"));
        }
        reg.locks.insert(key, session.id());
        reg.sessions.insert(session.id(), session.clone());
        Ok(session)
    }

    async fn handle_join<R, W>(self: Arc<Self>, conn: Conn, mut reader: FrameReader<R>, mut writer: FrameWriter<W>)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let join = match self.first_frame(&conn, &mut reader, &mut writer, &[FrameType::JOIN, FrameType::STATUS]).await
        {
            Some(Frame::Join(join)) => join,
            Some(Frame::Status(status)) => {
                let answer = match self.session_state(&conn, status) {
                    Ok(state) => Frame::SessionState(state),
                    Err(r) => Frame::Refused(r),
                };
                let _ = writer.send(&answer).await;
                let _ = writer.shutdown().await;
                return;
            }
            _ => return,
        };
        let (session, cancel) = match self.join_session(&conn, &join) {
            Ok(x) => x,
            Err(r) => {
                conn.refuse(&mut writer, r).await;
                return;
            }
        };
        let joined = Joined { stream: join.stream, contiguous: session.contiguous() };
        if writer.send(&Frame::Joined(joined)).await.is_err() {
            session.detach(join.stream, join.generation);
            return;
        }
        info!(session = %session.id(), stream = join.stream, generation = join.generation, peer = %conn.peer, "stream joined");
        self.run_stream(session, join.stream, join.generation, cancel, reader, writer).await;
    }

    fn join_session(&self, conn: &Conn, join: &Join) -> Result<(Arc<Session>, CancellationToken), Refusal> {
        let session = {
            let reg = lock(&self.registry);
            match reg.sessions.get(&join.session) {
                Some(s) => s.clone(),
                None => {
                    let msg = match reg.finished.get(&join.session) {
                        Some(f) if !conn.owns(&f.agent) => {
                            return Err(Refusal::new(Reason::NotAllowed, "session belongs to another agent"));
                        }
                        Some(Finished { outcome: Outcome::Committed(c), .. }) => {
                            format!("session already committed as {}", c.archive)
                        }
                        Some(Finished { outcome: Outcome::Failed(r), .. }) => format!("session already ended: {r}"),
                        None => "no such session".to_string(),
                    };
                    return Err(Refusal::new(Reason::UnknownSession, msg));
                }
            }
        };
        if !conn.owns(&session.params.key.agent) {
            return Err(Refusal::new(Reason::NotAllowed, "session belongs to another agent"));
        }
        let cancel = session.attach(join.stream, join.generation)?;
        session.touch();
        Ok((session, cancel))
    }

    /// What became of a session, for an agent that lost its connection.
    fn session_state(&self, conn: &Conn, status: Status) -> Result<SessionState, Refusal> {
        let reg = lock(&self.registry);
        let not_yours = || Refusal::new(Reason::NotAllowed, "session belongs to another agent");
        if let Some(s) = reg.sessions.get(&status.session) {
            if !conn.owns(&s.params.key.agent) {
                return Err(not_yours());
            }
            return Ok(SessionState::Open { contiguous: s.contiguous() });
        }
        Ok(match reg.finished.get(&status.session) {
            Some(f) if !conn.owns(&f.agent) => return Err(not_yours()),
            Some(Finished { outcome: Outcome::Committed(c), .. }) => SessionState::Committed(c.clone()),
            Some(Finished { outcome: Outcome::Failed(r), .. }) => SessionState::Failed(r.clone()),
            None => SessionState::Unknown,
        })
    }

    /// Receives chunks and the commit on one stream of a session until the stream
    /// closes, the session ends, or a newer connection replaces this stream.
    async fn run_stream<R, W>(
        self: Arc<Self>,
        session: Arc<Session>,
        stream: u16,
        generation: u32,
        cancel: CancellationToken,
        mut reader: FrameReader<R>,
        writer: FrameWriter<W>,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        // Depths: a few acks/answers, and two chunks queued for the disk so reading the
        // next one overlaps writing the current one.
        let (out_tx, out_rx) = mpsc::channel::<Frame>(64);
        let (disk_tx, disk_rx) = mpsc::channel::<DiskJob>(2);
        let out_task = tokio::spawn(write_out(writer, out_rx));
        let disk_task = tokio::spawn(disk_loop(self.clone(), session.clone(), disk_rx, out_tx.clone()));
        let ttl = self.config.session_ttl;
        let end = loop {
            let frame = tokio::select! {
                biased;
                _ = cancel.cancelled() => break StreamEnd::Stopped,
                r = timeout(ttl, reader.read_frame()) => r,
            };
            let frame = match frame {
                Err(_) => break StreamEnd::Error(format!("no frame for {ttl:?}")),
                Ok(Err(ConnError::Closed)) => break StreamEnd::Closed,
                Ok(Err(e)) => break StreamEnd::Error(e.to_string()),
                Ok(Ok(f)) => f,
            };
            session.touch();
            match frame {
                Frame::Chunk(chunk) => {
                    if !chunk.crc_ok() {
                        break StreamEnd::Error(format!("chunk {} failed its CRC32C check", chunk.seq));
                    }
                    if disk_tx.send(DiskJob::Write(chunk)).await.is_err() {
                        break StreamEnd::Stopped;
                    }
                }
                Frame::Commit(commit) => {
                    // Let this stream's queued writes finish before verifying.
                    let (tx, rx) = oneshot::channel();
                    if disk_tx.send(DiskJob::Barrier(tx)).await.is_err() || rx.await.is_err() {
                        break StreamEnd::Stopped;
                    }
                    let s = session.clone();
                    let result = tokio::task::spawn_blocking(move || s.commit(&commit))
                        .await
                        .unwrap_or_else(|e| Err(Refusal::new(Reason::Internal, format!("commit task failed: {e}"))));
                    match result {
                        Ok(committed) => {
                            let scope = session.storage.cfg.base_dir.to_string_lossy();
                            if crate::fault::hit("commit:answer", &scope) != Some(crate::fault::Action::Drop) {
                                let _ = out_tx.send(Frame::Committed(committed.clone())).await;
                            }
                            self.end_session(&session, Outcome::Committed(committed));
                        }
                        Err(refusal) => {
                            let _ = out_tx.send(Frame::Refused(refusal.clone())).await;
                            self.end_session(&session, Outcome::Failed(refusal));
                        }
                    }
                    break StreamEnd::Stopped;
                }
                Frame::Abort(r) => {
                    let refusal = Refusal::new(r.reason, format!("agent aborted: {}", r.message));
                    self.end_session(&session, Outcome::Failed(refusal));
                    break StreamEnd::AgentAborted;
                }
                other => {
                    break StreamEnd::Error(format!("unexpected {} frame on a stream", other.frame_type().name()));
                }
            }
        };
        drop(disk_tx);
        let _ = disk_task.await;
        let mut aborted = false;
        match (&end, session.outcome()) {
            (StreamEnd::AgentAborted, _) => {}
            // The session failed (disk full, expired, shutdown, …): tell the agent why.
            (_, Some(Outcome::Failed(r))) => {
                aborted = out_tx.send(Frame::Abort(r)).await.is_ok();
            }
            (StreamEnd::Error(e), None) => {
                warn!(session = %session.id(), stream, "stream closed: {e}");
                aborted = out_tx.send(Frame::Abort(Refusal::new(Reason::Protocol, e.clone()))).await.is_ok();
            }
            (StreamEnd::Closed, None) => debug!(session = %session.id(), stream, "stream closed by agent"),
            _ => {}
        }
        drop(out_tx);
        let _ = out_task.await;
        if aborted {
            // Lingering close: the agent may be in the middle of sending chunks. Closing
            // a socket with unread data makes the kernel answer with a reset, which can
            // destroy the Abort before the agent reads it. So keep reading (and
            // discarding) until the agent closes, for a bounded time.
            let _ = timeout(LINGER, async { while reader.read_frame().await.is_ok() {} }).await;
        }
        session.detach(stream, generation);
    }
}

enum DiskJob {
    Write(Chunk),
    Barrier(oneshot::Sender<()>),
}

/// Writes chunks in arrival order on blocking threads and acknowledges each after
/// its write returned. A write failure ends the whole session.
async fn disk_loop(
    shared: Arc<Shared>,
    session: Arc<Session>,
    mut jobs: mpsc::Receiver<DiskJob>,
    out: mpsc::Sender<Frame>,
) {
    while let Some(job) = jobs.recv().await {
        let chunk = match job {
            DiskJob::Write(c) => c,
            DiskJob::Barrier(done) => {
                let _ = done.send(());
                continue;
            }
        };
        if session.ended.is_cancelled() {
            return;
        }
        let seq = chunk.seq;
        let s = session.clone();
        let result = tokio::task::spawn_blocking(move || s.write_chunk(&chunk))
            .await
            .unwrap_or_else(|e| Err(Refusal::new(Reason::Internal, format!("write task failed: {e}"))));
        match result {
            Ok(Written::New | Written::Duplicate) => {
                if out.send(Frame::Ack(nbackup_protocol::wire::Ack { seq })).await.is_err() {
                    return;
                }
            }
            Err(refusal) => {
                shared.end_session(&session, Outcome::Failed(refusal));
                return;
            }
        }
    }
}

/// Sends queued frames until every sender is gone, then closes the write side. A peer
/// that does not take a frame within [`WRITE_TIMEOUT`] is dropped.
async fn write_out<W: AsyncWrite + Unpin>(mut writer: FrameWriter<W>, mut frames: mpsc::Receiver<Frame>) {
    while let Some(frame) = frames.recv().await {
        match timeout(WRITE_TIMEOUT, writer.send(&frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                warn!("agent stopped reading for {WRITE_TIMEOUT:?}; dropping the connection");
                return;
            }
        }
    }
    let _ = timeout(WRITE_TIMEOUT, writer.shutdown()).await;
}

/// Refuses a session when the storage could not hold another archive as large as the
/// entry's newest one.
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
    Ok(())
}

/// What the server knows about a connection before its first frame.
struct Conn {
    peer: SocketAddr,
    identities: Vec<String>,
    caps: Caps,
}

impl Conn {
    /// Whether this connection's certificate vouches for `agent`.
    fn owns(&self, agent: &Name) -> bool {
        self.identities.iter().any(|i| i == agent.as_str())
    }

    async fn refuse<W: AsyncWrite + Unpin>(&self, writer: &mut FrameWriter<W>, refusal: Refusal) {
        warn!(peer = %self.peer, identities = ?self.identities, reason = %refusal.reason, "refused: {}", refusal.message);
        let _ = writer.send(&Frame::Refused(refusal)).await;
        let _ = writer.shutdown().await;
    }
}
