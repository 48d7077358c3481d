//! The nbackup server: accepts agents over mutual TLS, receives archives in chunks,
//! verifies and commits them, rotates old ones.
//!
//! | module | concern |
//! |---|---|
//! | `listener` | accept, TLS handshake, per-phase deadlines, handshake cap, dispatch by connection kind |
//! | `handler` | policy of the first request: open (`Hello`), join, status, ping |
//! | `stream` | one data stream: read, CRC, disk, ack, commit, keepalive and silence |
//! | `registry` | every session's phase, streams, lock and outcome — the only place a phase changes |
//! | `session` | one upload's data: the `.part`, its chunks, the verified commit |
//! | `storage`, `journal`, `recovery` | on-disk layout, crash safety, restart adoption |
//! | `telemetry` | events, history, metrics, time series, sampler, reaper |
//! | `handle` | the narrow handle admin and control code use: snapshots and commands |
//!
//! Blocking filesystem work (open, write, fsync, rename, statvfs, readdir, unlink)
//! runs on blocking threads, never on the runtime, and no lock async code waits on is
//! held across it: a slow or frozen storage stalls only its own sessions.

mod admin;
mod control;
mod enroll;
pub mod handle;
mod handler;
mod journal;
mod listener;
pub mod offsite;
mod partfile;
mod recovery;
pub mod registry;
mod restore;
pub mod session;
pub mod storage;
mod stream;
pub mod telemetry;
mod verify;
mod vigil;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use nbackup_protocol::Name;
use nbackup_protocol::admin::EventKind;
use nbackup_protocol::config::ServerConfig;

use crate::daemon::{DaemonOptions, Reloadable};
use crate::state::{EventSpec, Events, History};
use crate::tls;
pub use registry::{Outcome, Phase};
pub use session::EntryKey;
use storage::StorageArea;
use telemetry::{DiskCache, Telemetry};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("storage {name} at {path}: {source}")]
    Storage { name: Name, path: PathBuf, source: std::io::Error },
    #[error("listener: {0}")]
    Listen(#[source] std::io::Error),
    #[error("state directory {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
    #[error("admin socket {path}: {source}")]
    Admin { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Notify(String),
}

/// How long shutdown waits for connections and commits to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on sending one frame to an agent; a peer that stops reading is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a server runs with besides its configuration.
pub type Options = DaemonOptions;

/// What a reload replaces: configuration, storages, certificates.
pub(crate) struct Live {
    pub config: ServerConfig,
    pub storages: BTreeMap<Name, Arc<StorageArea>>,
    pub acceptor: TlsAcceptor,
}

impl Live {
    fn limits(&self) -> registry::Limits {
        registry::Limits {
            sessions_per_agent: self.config.max_sessions_per_agent,
            streams_per_agent: self.config.max_streams_per_agent,
        }
    }
}

/// One server's state. Each part has one owner: the registry owns sessions, the
/// telemetry owns what is recorded, `agents` owns control channels, `live` is
/// replaced whole on reload.
pub(crate) struct Server {
    live: RwLock<Arc<Live>>,
    config_path: Option<PathBuf>,
    pub listen: SocketAddr,
    pub started: Instant,
    pub registry: registry::Registry,
    pub telemetry: Arc<Telemetry>,
    pub agents: control::Agents,
    pub disk: DiskCache,
    /// Where history, events and the agents' state live (`None`: memory only).
    pub state_dir: Option<PathBuf>,
    pub tracker: TaskTracker,
    /// Cancelled at shutdown: streams tell their agents `draining` and close.
    pub drain: CancellationToken,
    /// Connections still before their first frame (`server.max_handshakes`).
    pub handshakes: Arc<Semaphore>,
    /// A verification job is running (one at a time).
    pub verifying: std::sync::atomic::AtomicBool,
    /// Who is told about failures; replaced on reload.
    pub notifier: Arc<crate::notify::Notifier>,
    /// The off-site copy runners; reconciled with the configuration on reload.
    pub offsite: offsite::Offsite,
    /// Cancelled at shutdown; the parent of every runner's token.
    pub shutdown: CancellationToken,
    /// Enrollment tokens and the ledger of issued certificates.
    pub enroller: enroll::Enroller,
    /// When the server's own certificate and CA end.
    pub certs: crate::certwatch::CertWatch,
}

impl Server {
    pub fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Rebuilds the TLS configuration from the running one (after a revocation, so
    /// the next handshake checks the new list). Blocking (reads files).
    pub fn refresh_tls(&self) -> Result<(), String> {
        let current = self.live();
        let acceptor = TlsAcceptor::from(tls::server_config(&current.config).map_err(|e| e.to_string())?);
        let mut live = self.live.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A reload in between read the new list itself; keep what it built.
        if Arc::ptr_eq(&live, &current) {
            *live = Arc::new(Live { config: current.config.clone(), storages: current.storages.clone(), acceptor });
        }
        Ok(())
    }
}

/// Runs a server on `listener` until `shutdown` is cancelled, then tells connected
/// agents and returns once connections have closed (bounded). Uploads in progress
/// stay on disk, journaled, for the next start.
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

/// [`run`] with options: admin API, persistent state, reload, readiness.
pub async fn run_with(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
    mut options: Options,
) -> Result<(), ServerError> {
    match crate::fsutil::raise_nofile_limit() {
        Ok(n) => tracing::debug!(limit = n, "open files limit"),
        Err(e) => warn!("cannot raise the open files limit: {e}"),
    }
    let acceptor = TlsAcceptor::from(tls::server_config(&config)?);
    let storages = prepare_storages(&config, None)?;
    let notify_targets = crate::notify::resolve(&config.notify).map_err(ServerError::Notify)?;
    let state_dir = options.persist_state.then(|| config.state_dir.clone());
    let state_err = |source| ServerError::State { path: config.state_dir.clone(), source };
    let events = Events::open(state_dir.as_deref(), "server-events.jsonl").map_err(state_err)?;
    let history = History::open(state_dir.as_deref(), "server-history.jsonl").map_err(state_err)?;
    let telemetry = Arc::new(Telemetry::new(events, history));
    let enroller = enroll::Enroller::open(state_dir.as_deref()).map_err(state_err)?;
    let listen = listener.local_addr().map_err(ServerError::Listen)?;
    let handshakes = Arc::new(Semaphore::new(config.max_handshakes as usize));
    let admin = options.admin.then(|| (config.admin.socket.clone(), config.admin.group.clone()));
    let server = Arc::new(Server {
        live: RwLock::new(Arc::new(Live { config, storages, acceptor })),
        config_path: options.config_path.take(),
        listen,
        started: Instant::now(),
        registry: registry::Registry::new(telemetry.clone()),
        telemetry,
        agents: control::Agents::default(),
        disk: DiskCache::default(),
        state_dir,
        tracker: TaskTracker::new(),
        drain: CancellationToken::new(),
        handshakes,
        verifying: std::sync::atomic::AtomicBool::new(false),
        notifier: crate::notify::Notifier::new(notify_targets, nbackup_protocol::admin::DaemonKind::Server),
        offsite: offsite::Offsite::default(),
        shutdown: shutdown.clone(),
        enroller,
        certs: crate::certwatch::CertWatch::default(),
    });
    crate::notify::spawn(
        server.notifier.clone(),
        server.telemetry.events.subscribe(),
        &server.tracker,
        shutdown.clone(),
    );
    // What `.incoming` holds is registered now (cheap: journals only) and re-checked
    // after readiness, however large: a start never waits on it.
    let pending = recovery::scan(&server);
    let known = vigil::load(&server);
    server.agents.restore(known.agents.clone());
    // First figures before readiness, so the first PING has them; a storage that does
    // not answer within a second is reported later.
    let probes = DiskCache::refresh(&server, true);
    let _ = timeout(Duration::from_secs(1), async {
        for p in probes {
            let _ = p.await;
        }
    })
    .await;
    if let Some((socket, group)) = admin {
        let router = admin::router(handle::ServerHandle::new(server.clone()));
        let events = server.clone();
        let audit: crate::admin::Audit =
            Arc::new(move |who, message| drop(events.telemetry.events.record(EventKind::Operator, who, message)));
        crate::daemon::start_admin("server", socket, group, router, audit, &server.tracker, &shutdown)
            .map_err(|(path, source)| ServerError::Admin { path, source })?;
    }
    info!(listen = %listen, storages = server.live().storages.len(), version = crate::VERSION, "server ready");
    server.telemetry.events.record(
        EventKind::Started,
        EventSpec::default(),
        format!("server {} listening on {listen}", crate::VERSION),
    );
    if let Some(ready) = options.ready.take() {
        let _ = ready.send(());
    }
    server.tracker.spawn(recovery::run(server.clone(), pending));
    server.offsite.start(&server);
    server.tracker.spawn(telemetry::reaper(server.clone(), shutdown.clone()));
    server.tracker.spawn(telemetry::sampler(server.clone(), shutdown.clone()));
    server.tracker.spawn(vigil::run(server.clone(), known, shutdown.clone()));
    server.tracker.spawn(verify::scheduled(server.clone(), shutdown.clone()));
    server.tracker.spawn(watch_certificates(server.clone(), shutdown.clone()));
    let reload = crate::daemon::reload_loop(server.clone(), options.reload.take(), shutdown.clone());
    server.tracker.spawn(reload);
    listener::accept_loop(server.clone(), listener, shutdown.clone()).await;

    info!("shutting down: refusing new sessions; uploads in progress stay resumable");
    server.registry.drain();
    server.drain.cancel();
    server.agents.disconnect_all();
    server.tracker.close();
    if timeout(DRAIN_TIMEOUT, server.tracker.wait()).await.is_err() {
        warn!("some connections or commits did not finish within {DRAIN_TIMEOUT:?}");
    }
    server.telemetry.events.record(EventKind::Stopped, EventSpec::default(), "server stopped");
    info!("server stopped");
    Ok(())
}

/// Re-reads the server's certificate and CA every hour (and after a reload swaps
/// them); records `cert_expiring` once a day within `tls.warn_before` of an end.
async fn watch_certificates(server: Arc<Server>, shutdown: CancellationToken) {
    loop {
        let s = server.clone();
        let due = tokio::task::spawn_blocking(move || {
            let tls = s.live().config.tls.clone();
            let certs = [("server", tls.cert.as_path()), ("ca", tls.ca_cert.as_path())];
            s.certs.check(&certs, tls.warn_before, crate::state::unix_now() as i64)
        })
        .await
        .unwrap_or_default();
        for message in due {
            warn!("{message}");
            server.telemetry.events.record(EventKind::CertExpiring, EventSpec::default(), message);
        }
        tokio::select! {
            _ = tokio::time::sleep(crate::certwatch::CHECK_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

impl Reloadable for Server {
    /// Re-reads the config file and swaps storages, limits and certificates; open
    /// sessions keep the storage they started with. Blocking (reads files).
    fn reload(&self) -> Result<String, String> {
        let Some(path) = &self.config_path else {
            return Err("this server was started without a config file to re-read".into());
        };
        let result = (|| -> Result<String, String> {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let config = ServerConfig::parse(&text, path).map_err(|e| e.to_string())?;
            let acceptor = TlsAcceptor::from(tls::server_config(&config).map_err(|e| e.to_string())?);
            let current = self.live();
            let storages = prepare_storages(&config, Some(&current.storages)).map_err(|e| e.to_string())?;
            let targets = crate::notify::resolve(&config.notify)?;
            self.notifier.replace(targets);
            let mut note = String::new();
            if config.listen != current.config.listen {
                note = format!("; server.listen changed to {} (takes effect after a restart)", config.listen);
            }
            if config.max_handshakes != current.config.max_handshakes {
                note.push_str("; server.max_handshakes takes effect after a restart");
            }
            let names: Vec<&str> = storages.keys().map(Name::as_str).collect();
            let message = format!("configuration reloaded: storages {}{note}", names.join(", "));
            *self.live.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Arc::new(Live { config, storages, acceptor });
            self.offsite.reconcile(self);
            Ok(message)
        })();
        let events = &self.telemetry.events;
        match &result {
            Ok(m) => {
                info!("{m}");
                events.record(EventKind::Reloaded, EventSpec::default(), m.clone());
            }
            Err(e) => {
                warn!("reload rejected, keeping the running configuration: {e}");
                events.record(EventKind::ReloadFailed, EventSpec::default(), e.clone());
            }
        }
        result
    }
}
