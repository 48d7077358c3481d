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

mod admin;
mod control;
mod journal;
mod recovery;
mod session;
pub mod storage;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use nbackup_protocol::admin::HistoryRecord;
use nbackup_protocol::config::ServerConfig;
use nbackup_protocol::limits::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use nbackup_protocol::wire::{
    Caps, Chunk, ConnKind, Frame, FrameType, Health, Hello, Join, Joined, PROTOCOL_VERSION, Reason, Refusal,
    SessionState, Status, StorageHealth, Welcome,
};
use nbackup_protocol::{Name, SessionId};

use crate::conn::{ConnError, FrameReader, FrameWriter};
use crate::state::{EventSpec, Events, History, Timeline, unix_now};
use crate::tls;
pub use session::{EntryKey, Outcome};
use session::{Session, SessionParams, StreamStats, Written, lock};
use storage::StorageArea;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("storage {name} at {path}: {source}")]
    Storage { name: Name, path: std::path::PathBuf, source: std::io::Error },
    #[error("listener: {0}")]
    Listen(std::io::Error),
    #[error("state directory {path}: {source}")]
    State { path: std::path::PathBuf, source: std::io::Error },
    #[error("admin socket {path}: {source}")]
    Admin { path: std::path::PathBuf, source: std::io::Error },
}

/// How long shutdown waits for connections to finish after telling agents.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Finished sessions are remembered this long (across restarts, through the
/// committed log) so that an agent that lost the answer to its `Commit` learns the
/// outcome when it asks again instead of sending the backup twice.
const FINISHED_TTL: Duration = Duration::from_secs(3600);

/// Bound on sending one frame to an agent; a peer that stops reading is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an aborted stream keeps draining what the agent still sends, so the
/// Abort is read instead of lost to a connection reset.
const LINGER: Duration = Duration::from_secs(2);

/// Below this share of free space a storage is reported as low (event, metrics).
const DISK_LOW: f64 = 0.10;

/// What a server runs with besides its configuration.
#[derive(Default)]
pub struct Options {
    /// The file to re-read on reload (SIGHUP, `POST /v1/reload`).
    pub config_path: Option<PathBuf>,
    /// Serve the admin API on the configured (or default) socket.
    pub admin: bool,
    /// Keep history and events under `state_dir` (otherwise in memory only).
    pub persist_state: bool,
    /// Reload requests, e.g. from SIGHUP.
    pub reload: Option<mpsc::Receiver<()>>,
    /// Told once the server accepts connections (systemd readiness).
    pub ready: Option<oneshot::Sender<()>>,
}

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

/// What a reload replaces: configuration, storages, certificates.
struct Live {
    config: ServerConfig,
    storages: BTreeMap<Name, Arc<StorageArea>>,
    acceptor: TlsAcceptor,
}

/// Counters for `/metrics` since the server started.
#[derive(Default)]
struct Metrics {
    bytes_received: AtomicU64,
    committed: Mutex<BTreeMap<String, u64>>,
    failed: Mutex<BTreeMap<String, u64>>,
    /// (agent, backup) → unix time of the last committed archive.
    last_success: Mutex<BTreeMap<(String, String), u64>>,
}

/// State shared by all connections of one server.
struct Shared {
    live: RwLock<Arc<Live>>,
    config_path: Option<PathBuf>,
    listen: SocketAddr,
    /// One lock for the session table; held only for lookups and inserts.
    registry: Mutex<Registry>,
    started: Instant,
    draining: AtomicBool,
    tracker: TaskTracker,
    events: Events,
    history: History,
    agents: control::Agents,
    metrics: Metrics,
    timeline: Timeline,
    /// Storages last reported low on space, to warn once an hour.
    disk_warned: Mutex<HashMap<Name, Instant>>,
}

/// Runs a server on `listener` until `shutdown` is cancelled, then tells connected
/// agents, ends open sessions and returns once connections have closed (bounded).
pub async fn run(config: ServerConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<(), ServerError> {
    run_with(config, listener, shutdown, Options::default()).await
}

fn prepare_storages(
    config: &ServerConfig,
    previous: Option<&BTreeMap<Name, Arc<StorageArea>>>,
) -> Result<BTreeMap<Name, Arc<StorageArea>>, ServerError> {
    let mut storages = BTreeMap::new();
    for (name, cfg) in &config.storages {
        // An unchanged storage keeps its identity; sessions in progress keep theirs.
        if let Some(old) = previous.and_then(|p| p.get(name)).filter(|o| &o.cfg == cfg) {
            storages.insert(name.clone(), old.clone());
            continue;
        }
        let area = Arc::new(StorageArea::new(cfg.clone()));
        area.prepare().map_err(|source| ServerError::Storage {
            name: name.clone(),
            path: cfg.base_dir.clone(),
            source,
        })?;
        storages.insert(name.clone(), area);
    }
    Ok(storages)
}

/// [`run`] with options: admin API, persistent state, reload.
pub async fn run_with(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
    mut options: Options,
) -> Result<(), ServerError> {
    let acceptor = TlsAcceptor::from(tls::server_config(&config.tls)?);
    let storages = prepare_storages(&config, None)?;
    let mut registry = Registry { sessions: HashMap::new(), locks: HashMap::new(), finished: HashMap::new() };
    for area in storages.values() {
        let recovered = recovery::recover(area, FINISHED_TTL);
        for session in recovered.sessions {
            let session = Arc::new(session);
            registry.locks.insert(session.params.key.clone(), session.id());
            registry.sessions.insert(session.id(), session);
        }
        for (id, agent, outcome, age) in recovered.finished {
            let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            registry.finished.insert(id, Finished { agent, outcome, at });
        }
    }
    let state_dir = options.persist_state.then(|| config.state_dir.clone());
    let state_err = |source| ServerError::State { path: config.state_dir.clone(), source };
    let events = Events::open(state_dir.as_deref(), "server-events.jsonl").map_err(state_err)?;
    let history = History::open(state_dir.as_deref(), "server-history.jsonl").map_err(state_err)?;
    let metrics = Metrics::default();
    for r in history.list(None, usize::MAX).into_iter().rev().filter(|r| r.outcome == "committed") {
        let at = chrono::DateTime::parse_from_rfc3339(&r.finished).map_or(0, |t| t.timestamp().max(0) as u64);
        lock(&metrics.last_success).insert((r.agent, r.backup), at);
    }
    let admin_socket = config.admin.socket.clone().unwrap_or_else(|| crate::admin::default_socket("server"));
    let admin_group = config.admin.group.clone();
    let listen = listener.local_addr().map_err(ServerError::Listen)?;
    let shared = Arc::new(Shared {
        live: RwLock::new(Arc::new(Live { config, storages, acceptor })),
        config_path: options.config_path.take(),
        listen,
        registry: Mutex::new(registry),
        started: Instant::now(),
        draining: AtomicBool::new(false),
        tracker: TaskTracker::new(),
        events,
        history,
        agents: control::Agents::default(),
        metrics,
        timeline: Timeline::new(Timeline::DEFAULT_POINTS),
        disk_warned: Mutex::new(HashMap::new()),
    });
    if options.admin {
        let l = crate::admin::bind(&admin_socket, admin_group.as_deref())
            .map_err(|source| ServerError::Admin { path: admin_socket.clone(), source })?;
        let router = admin::router(shared.clone());
        let (path, token) = (admin_socket.clone(), shutdown.clone());
        shared.tracker.spawn(async move {
            if let Err(e) = crate::admin::serve(l, path, admin_group.as_deref(), router, token).await {
                warn!("admin API stopped: {e}");
            }
        });
    }
    info!(
        listen = %listen,
        storages = shared.live().storages.len(),
        version = crate::VERSION,
        "server ready"
    );
    shared.events.record("started", EventSpec::default(), format!("server {} listening on {listen}", crate::VERSION));
    if let Some(ready) = options.ready.take() {
        let _ = ready.send(());
    }
    shared.tracker.spawn(reaper(shared.clone(), shutdown.clone()));
    shared.tracker.spawn(sampler(shared.clone(), shutdown.clone()));
    let mut reload = options.reload.take();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(()) = async { match reload.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                let s = shared.clone();
                let _ = tokio::task::spawn_blocking(move || s.reload()).await;
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let shared2 = shared.clone();
                    let acceptor = shared.live().acceptor.clone();
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
    shared.agents.disconnect_all();
    shared.tracker.close();
    if timeout(DRAIN_TIMEOUT, shared.tracker.wait()).await.is_err() {
        warn!("some connections did not close within {DRAIN_TIMEOUT:?}");
    }
    shared.events.record("stopped", EventSpec::default(), "server stopped");
    info!("server stopped");
    Ok(())
}

/// Ends sessions idle for longer than `session_ttl`, or without any stream for longer
/// than `orphan_timeout`, releasing their locks; forgets old outcomes; compacts the
/// committed logs.
async fn reaper(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut compacted = Instant::now();
    let mut last = Instant::now() - Duration::from_secs(3600);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (ttl, orphan) = {
            let live = shared.live();
            (live.config.session_ttl, live.config.orphan_timeout)
        };
        // Check as often as a quarter of the shortest limit, at most every 30 s.
        let period = (orphan.min(ttl) / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        if last.elapsed() < period {
            continue;
        }
        last = Instant::now();
        if compacted.elapsed() >= FINISHED_TTL / 4 {
            compacted = Instant::now();
            let areas: Vec<Arc<StorageArea>> = shared.live().storages.values().cloned().collect();
            for area in areas {
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

/// Once a second: receive rates, time series; every 30 s: low-disk warnings.
async fn sampler(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut disk_check = Instant::now() - Duration::from_secs(30);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sessions: Vec<Arc<Session>> = lock(&shared.registry).sessions.values().cloned().collect();
        let mut rate = 0.0;
        for s in &sessions {
            s.sample();
            rate += s.rate();
        }
        let now = unix_now();
        shared.timeline.push("sessions", now, sessions.len() as f64);
        shared.timeline.push("receive_bps", now, rate);
        shared.timeline.push("agents_connected", now, shared.agents.connected() as f64);
        if disk_check.elapsed() >= Duration::from_secs(30) {
            disk_check = Instant::now();
            let s = shared.clone();
            let _ = tokio::task::spawn_blocking(move || s.check_disks()).await;
        }
    }
}

/// What ended a stream's read loop.
/// One connection's place in a session: which stream and join it is, how to stop
/// it, and its counters.
struct Slot {
    stream: u16,
    generation: u32,
    cancel: CancellationToken,
    stats: Arc<StreamStats>,
}

enum StreamEnd {
    Closed,
    Stopped,
    AgentAborted,
    Error(String),
}

impl Shared {
    fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Re-reads the config file and swaps storages, limits and certificates; open
    /// sessions keep the storage they started with. Blocking (reads files).
    fn reload(&self) -> Result<String, String> {
        let Some(path) = &self.config_path else {
            return Err("this server was started without a config file to re-read".into());
        };
        let result = (|| -> Result<String, String> {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let config = ServerConfig::parse(&text, path).map_err(|e| e.to_string())?;
            let acceptor = TlsAcceptor::from(tls::server_config(&config.tls).map_err(|e| e.to_string())?);
            let current = self.live();
            let storages = prepare_storages(&config, Some(&current.storages)).map_err(|e| e.to_string())?;
            let mut note = String::new();
            if config.listen != current.config.listen {
                note = format!("; server.listen changed to {} (takes effect after a restart)", config.listen);
            }
            let names: Vec<&str> = storages.keys().map(Name::as_str).collect();
            let message = format!("configuration reloaded: storages {}{note}", names.join(", "));
            *self.live.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Arc::new(Live { config, storages, acceptor });
            Ok(message)
        })();
        match &result {
            Ok(m) => {
                info!("{m}");
                self.events.record("reloaded", EventSpec::default(), m.clone());
            }
            Err(e) => {
                warn!("reload rejected, keeping the running configuration: {e}");
                self.events.record("reload_failed", EventSpec::default(), e.clone());
            }
        }
        result
    }

    /// Records storages under [`DISK_LOW`] free space, at most once an hour each.
    fn check_disks(&self) {
        for (name, area) in &self.live().storages {
            let Ok((free, total)) = area.disk_space() else { continue };
            if total == 0 || (free as f64) / (total as f64) >= DISK_LOW {
                continue;
            }
            let mut warned = lock(&self.disk_warned);
            if warned.get(name).is_some_and(|t| t.elapsed() < Duration::from_secs(3600)) {
                continue;
            }
            warned.insert(name.clone(), Instant::now());
            let msg = format!("storage {name} has {free} of {total} bytes free");
            warn!("{msg}");
            self.events.record("disk_low", EventSpec::default(), msg);
        }
    }

    /// Free bytes of the fullest storage.
    fn min_free(&self) -> u64 {
        self.live().storages.values().filter_map(|a| a.disk_space().ok()).map(|(f, _)| f).min().unwrap_or(0)
    }

    fn end_session(&self, session: &Arc<Session>, outcome: Outcome) {
        if !session.end(outcome.clone()) {
            return;
        }
        {
            let mut reg = lock(&self.registry);
            reg.sessions.remove(&session.id());
            if reg.locks.get(&session.params.key) == Some(&session.id()) {
                reg.locks.remove(&session.params.key);
            }
            reg.finished.insert(
                session.id(),
                Finished { agent: session.params.key.agent.clone(), outcome: outcome.clone(), at: Instant::now() },
            );
        }
        let p = &session.params;
        let id = p.id.to_string();
        let who =
            || EventSpec { agent: Some(p.key.agent.as_str()), backup: Some(p.key.backup.as_str()), session: Some(&id) };
        let storage = p.key.storage.to_string();
        let (kind, archive, reason, message) = match &outcome {
            Outcome::Committed(c) => {
                *lock(&self.metrics.committed).entry(storage.clone()).or_default() += 1;
                lock(&self.metrics.last_success)
                    .insert((p.key.agent.to_string(), p.key.backup.to_string()), unix_now());
                self.events.record("committed", who(), format!("committed {} ({} bytes)", c.archive, c.size));
                for old in session.rotated() {
                    self.events.record("rotated", who(), format!("rotated out {old}"));
                }
                ("committed", Some(c.archive.clone()), None, format!("{} bytes", c.size))
            }
            Outcome::Failed(r) => {
                *lock(&self.metrics.failed).entry(storage.clone()).or_default() += 1;
                let kind = match r.reason {
                    Reason::Cancelled | Reason::Draining => "aborted",
                    Reason::Expired => "expired",
                    _ => "failed",
                };
                self.events.record(kind, who(), r.to_string());
                (kind, None, Some(r.reason.to_string()), r.message.clone())
            }
        };
        self.history.record(HistoryRecord {
            session: id.clone(),
            agent: p.key.agent.to_string(),
            storage,
            backup: p.key.backup.to_string(),
            outcome: kind.to_string(),
            archive,
            reason,
            message,
            bytes: session.bytes_received.load(Ordering::Relaxed),
            started: p.started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            finished: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        });
    }

    /// Refuses a request: logs it, records an event, tells the peer, closes.
    async fn refuse<W: AsyncWrite + Unpin>(&self, conn: &Conn, writer: &mut FrameWriter<W>, refusal: Refusal) {
        warn!(peer = %conn.peer, identities = ?conn.identities, reason = %refusal.reason, "refused: {}", refusal.message);
        let agent = conn.identities.first().map(String::as_str);
        self.events.record("refused", EventSpec { agent, ..Default::default() }, refusal.to_string());
        let _ = writer.send(&Frame::Refused(refusal)).await;
        let _ = writer.shutdown().await;
    }

    async fn handle_connection(self: Arc<Self>, acceptor: TlsAcceptor, tcp: TcpStream, peer: SocketAddr) {
        let hs = self.live().config.handshake_timeout;
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
            ConnKind::Control => control::handle(self, conn, reader, writer).await,
        }
    }

    async fn handle_ping<W: AsyncWrite + Unpin>(&self, conn: &Conn, mut writer: FrameWriter<W>) {
        let storages = self
            .live()
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
        let hs = self.live().config.handshake_timeout;
        match timeout(hs, reader.read_frame()).await {
            Ok(Ok(f)) if expected.contains(&f.frame_type()) => Some(f),
            Ok(Ok(other)) => {
                let names: Vec<&str> = expected.iter().map(|t| t.name()).collect();
                let msg = format!("expected {}, got {}", names.join(" or "), other.frame_type().name());
                self.refuse(conn, writer, Refusal::new(Reason::Protocol, msg)).await;
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
                self.refuse(&conn, &mut writer, r).await;
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
        let (cancel, stats) = match session.attach(0, 0) {
            Ok(c) => c,
            Err(r) => {
                self.refuse(&conn, &mut writer, r).await;
                return;
            }
        };
        *lock(&stats.peer) = conn.peer.to_string();
        let id = p.id.to_string();
        let who =
            EventSpec { agent: Some(p.key.agent.as_str()), backup: Some(p.key.backup.as_str()), session: Some(&id) };
        self.events.record("started", who, format!("session opened from {} ({})", conn.peer, p.compression));
        self.clone().run_stream(session, Slot { stream: 0, generation: 0, cancel, stats }, reader, writer).await;
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
        let live = self.live();
        let storage = live.storages.get(&hello.storage).ok_or_else(|| {
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
            max_streams: hello.streams.clamp(1, live.config.max_streams_per_session),
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
        let (session, cancel, stats) = match self.join_session(&conn, &join) {
            Ok(x) => x,
            Err(r) => {
                self.refuse(&conn, &mut writer, r).await;
                return;
            }
        };
        let joined = Joined { stream: join.stream, contiguous: session.contiguous() };
        if writer.send(&Frame::Joined(joined)).await.is_err() {
            session.detach(join.stream, join.generation);
            return;
        }
        info!(session = %session.id(), stream = join.stream, generation = join.generation, peer = %conn.peer, "stream joined");
        *lock(&stats.peer) = conn.peer.to_string();
        let joins = session.streams().iter().find(|s| s.stream == join.stream).map_or(1, |s| s.joins);
        let (id, p) = (session.id().to_string(), &session.params);
        let who =
            EventSpec { agent: Some(p.key.agent.as_str()), backup: Some(p.key.backup.as_str()), session: Some(&id) };
        let (kind, msg) = if joins > 1 {
            ("stream_rejoined", format!("stream {} re-joined from {} ({} joins)", join.stream, conn.peer, joins))
        } else {
            ("stream_joined", format!("stream {} joined from {}", join.stream, conn.peer))
        };
        self.events.record(kind, who, msg);
        let slot = Slot { stream: join.stream, generation: join.generation, cancel, stats };
        self.clone().run_stream(session, slot, reader, writer).await;
    }

    fn join_session(
        &self,
        conn: &Conn,
        join: &Join,
    ) -> Result<(Arc<Session>, CancellationToken, Arc<StreamStats>), Refusal> {
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
        let (cancel, stats) = session.attach(join.stream, join.generation)?;
        session.touch();
        Ok((session, cancel, stats))
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
        slot: Slot,
        mut reader: FrameReader<R>,
        writer: FrameWriter<W>,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let Slot { stream, generation, cancel, stats } = slot;
        // Depths: a few acks/answers, and two chunks queued for the disk so reading the
        // next one overlaps writing the current one.
        let (out_tx, out_rx) = mpsc::channel::<Frame>(64);
        let (disk_tx, disk_rx) = mpsc::channel::<DiskJob>(2);
        let out_task = tokio::spawn(write_out(writer, out_rx));
        let disk_task = tokio::spawn(disk_loop(self.clone(), session.clone(), stats.clone(), disk_rx, out_tx.clone()));
        let ttl = self.live().config.session_ttl;
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
                    let len = chunk.data.len() as u64;
                    stats.bytes.fetch_add(len, Ordering::Relaxed);
                    self.metrics.bytes_received.fetch_add(len, Ordering::Relaxed);
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
                self.stream_lost(&session, stream, e);
                aborted = out_tx.send(Frame::Abort(Refusal::new(Reason::Protocol, e.clone()))).await.is_ok();
            }
            (StreamEnd::Closed, None) => {
                debug!(session = %session.id(), stream, "stream closed by agent");
                self.stream_lost(&session, stream, "closed by the agent");
            }
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

impl Shared {
    fn stream_lost(&self, session: &Session, stream: u16, why: &str) {
        let (id, p) = (session.id().to_string(), &session.params);
        let who =
            EventSpec { agent: Some(p.key.agent.as_str()), backup: Some(p.key.backup.as_str()), session: Some(&id) };
        self.events.record("stream_lost", who, format!("stream {stream}: {why}"));
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
    stats: Arc<StreamStats>,
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
        if result == Ok(Written::Duplicate) {
            stats.resent.fetch_add(1, Ordering::Relaxed);
        }
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
}
