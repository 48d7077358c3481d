//! The agent: turns a backup entry into a committed archive on the server.
//!
//! ```text
//! producer thread:  walk ─▶ tar ─▶ gzip/zstd (worker threads) ─▶ chunks + SHA-256 ─▶ window
//! async streams:    window ─▶ stream 0..N-1 (TLS) ─▶ server ─▶ acks ─▶ window
//! ```
//!
//! [`run_backup`] is the one attempt loop: it opens a session, starts the producer
//! and the streams, and waits until the server has committed the archive or the
//! transfer has failed; then it decides, from the error's [class](retry::ErrorClass)
//! and the run's one [`RetryBudget`](retry::RetryBudget), whether to try again.

mod admin;
pub mod archive;
pub mod autoscale;
pub mod connect;
mod control;
pub mod daemon;
pub mod enroll;
pub mod fetch;
pub mod producer;
pub mod progress;
mod readahead;
pub mod restore;
pub mod retry;
pub mod stream;
pub mod window;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use nbackup_protocol::config::{AgentConfig, BackupEntry};
use nbackup_protocol::manifest::hex;
use nbackup_protocol::wire::{Compression, Hello, Refusal};

pub use archive::{Notice, NoticeKind};
pub use connect::{ConnectError, Connector};
pub use progress::{Progress, ProgressSnapshot};
use window::{Failure, Finished, Window};

/// The streams of one backup: started, retired and finally awaited here.
struct StreamSet {
    ctx: Arc<stream::StreamCtx>,
    max: u16,
    tasks: tokio::task::JoinSet<()>,
    /// Active streams by id, with the token that retires each.
    active: std::collections::BTreeMap<u16, CancellationToken>,
    peak: u16,
}

impl StreamSet {
    fn new(ctx: Arc<stream::StreamCtx>, max: u16) -> Self {
        StreamSet { ctx, max, tasks: tokio::task::JoinSet::new(), active: Default::default(), peak: 0 }
    }

    fn active(&self) -> u16 {
        self.active.len() as u16
    }

    /// Starts a stream on `conn`, or joining with a new connection; false at the limit.
    fn add(&mut self, conn: Option<connect::Connection>) -> bool {
        let Some(id) = (0..self.max).find(|i| !self.active.contains_key(i)) else { return false };
        let retire = CancellationToken::new();
        self.active.insert(id, retire.clone());
        self.ctx.live.fetch_add(1, Ordering::AcqRel);
        self.tasks.spawn(stream::run(self.ctx.clone(), id, conn, retire));
        self.peak = self.peak.max(self.active());
        self.ctx.progress.streams.store(self.active(), Ordering::Relaxed);
        true
    }

    /// Retires the newest stream, never the last one.
    fn retire(&mut self) -> bool {
        if self.active.len() <= 1 {
            return false;
        }
        let Some((_, token)) = self.active.pop_last() else { return false };
        token.cancel();
        self.ctx.progress.streams.store(self.active(), Ordering::Relaxed);
        true
    }

    /// Waits (bounded) for the streams to deliver their last frames, then stops them.
    async fn shutdown(&mut self) {
        let tasks = &mut self.tasks;
        let _ =
            tokio::time::timeout(Duration::from_secs(3), async { while tasks.join_next().await.is_some() {} }).await;
        self.tasks.abort_all();
    }
}

/// The autoscaler's loop: measure every `interval`, apply the decision, until the
/// transfer is over; hands the stream set back.
async fn scale(
    mut scaler: autoscale::Autoscaler,
    mut set: StreamSet,
    interval: Duration,
    window: Arc<Window>,
    progress: Arc<Progress>,
) -> StreamSet {
    let start = Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    let (mut acked, mut produced, mut last) =
        (window.acked_bytes.load(Ordering::Relaxed), progress.bytes_compressed.load(Ordering::Relaxed), Instant::now());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = window.wait_finished() => return set,
        }
        let now = Instant::now();
        let secs = now.duration_since(last).as_secs_f64().max(1e-3);
        let (a, p) = (window.acked_bytes.load(Ordering::Relaxed), progress.bytes_compressed.load(Ordering::Relaxed));
        let drain_bps = a.saturating_sub(acked) as f64 / secs;
        let used = window.used() as f64;
        let sample = autoscale::Sample {
            produce_bps: p.saturating_sub(produced) as f64 / secs,
            drain_bps,
            window_fill: used / window.capacity().max(1) as f64,
            // Nothing drained yet while data waits counts as a long backlog.
            backlog_secs: if drain_bps > 0.0 {
                used / drain_bps
            } else if used > 0.0 {
                f64::INFINITY
            } else {
                0.0
            },
            streams: set.active(),
            producer_done: window.producer_done(),
            limit_bps: set.ctx.throttle.as_ref().and_then(|t| t.current_rate()).map(|r| r as f64),
        };
        (acked, produced, last) = (a, p, now);
        match scaler.tick(start.elapsed().as_millis() as u64, sample) {
            autoscale::Decision::Add(n) => {
                for _ in 0..n {
                    set.add(None);
                }
            }
            autoscale::Decision::Remove(n) => {
                for _ in 0..n {
                    set.retire();
                }
            }
            autoscale::Decision::Hold => {}
        }
        if let Some(e) = scaler.history().last() {
            let mut log = progress.scaler_log();
            if log.len() >= autoscale::HISTORY {
                log.remove(0);
            }
            log.push(e.clone());
        }
    }
}

/// The outcome of one successful backup run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupReport {
    pub entry: String,
    pub storage: String,
    /// Archive file name on the server.
    pub archive: String,
    pub session: String,
    pub compression: Compression,
    /// Bytes of file content read from the sources.
    pub bytes_read: u64,
    /// Archive size, i.e. compressed bytes committed.
    pub bytes_sent: u64,
    /// Compressed bytes put on the wire, including resends.
    pub bytes_transmitted: u64,
    pub resent_chunks: u64,
    pub entries: u64,
    pub excluded: u64,
    pub skipped: u64,
    /// Every entry that was skipped or stored differently than found, with why.
    pub notices: Vec<Notice>,
    pub sha256: String,
    /// Most streams used at once.
    pub streams: u16,
    /// Streams in use at the end.
    pub streams_final: u16,
    /// What the autoscaler changed and why (empty when it is off).
    pub scaler_decisions: Vec<autoscale::ScalerEvent>,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("server refused: {0}")]
    Refused(Refusal),
    #[error(transparent)]
    Transfer(Failure),
    #[error("cancelled")]
    Cancelled,
    #[error("the attempt did not finish within {0:?} (retry.attempt_timeout)")]
    AttemptTimeout(Duration),
    #[error("cannot start the archive thread")]
    Spawn(#[source] std::io::Error),
    #[error("a backup task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl BackupError {
    /// What this failure means for the run (see [`retry`]).
    pub fn class(&self) -> retry::ErrorClass {
        use nbackup_protocol::wire::Reason;
        use retry::ErrorClass::*;
        match self {
            BackupError::Connect(e) if e.is_transient() => Transient,
            BackupError::Connect(_) => Permanent,
            BackupError::Refused(r) | BackupError::Transfer(Failure::Server(r)) => match r.reason {
                Reason::VerifyFailed => FreshSession,
                r if r.is_transient() => Transient,
                _ => Permanent,
            },
            BackupError::Transfer(Failure::Connection(_)) => Transient,
            BackupError::Transfer(Failure::SessionLost(_)) => FreshSession,
            BackupError::Transfer(Failure::Source(_) | Failure::Cancelled) | BackupError::Cancelled => Permanent,
            BackupError::AttemptTimeout(_) | BackupError::Spawn(_) | BackupError::Task(_) => Transient,
        }
    }

    /// Whether running the entry again later can succeed unchanged.
    pub fn is_transient(&self) -> bool {
        self.class() != retry::ErrorClass::Permanent
    }

    /// The server's refusal, if that is what this is.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            BackupError::Refused(r) | BackupError::Transfer(Failure::Server(r)) => Some(r),
            BackupError::Connect(ConnectError::Refused(r)) => Some(r),
            _ => None,
        }
    }
}

/// Compression threads to use: every core.
pub fn compression_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Called before each retry with the attempt that failed, its error and the delay.
pub type OnRetry<'a> = &'a (dyn Fn(u32, &BackupError, Duration) + Send + Sync);

/// Runs one backup entry to completion, retrying per `retry.*` (see [`retry`]).
pub async fn run_backup(
    connector: &Connector,
    config: &AgentConfig,
    entry: &BackupEntry,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<BackupReport, BackupError> {
    run_backup_with(connector, config, entry, progress, cancel, &|_, _, _| {}).await
}

/// [`run_backup`], telling `on_retry` about every retry.
pub async fn run_backup_with(
    connector: &Connector,
    config: &AgentConfig,
    entry: &BackupEntry,
    progress: Arc<Progress>,
    cancel: CancellationToken,
    on_retry: OnRetry<'_>,
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    let budget = Arc::new(retry::RetryBudget::new(config.retry));
    loop {
        let attempt = budget.attempts();
        progress.attempt.store(attempt, Ordering::Relaxed);
        // Each attempt has its own token, so a timeout cancels it properly (the
        // server is told, the archive thread stops) rather than abandoning it.
        let attempt_cancel = cancel.child_token();
        let run = run_session(connector, config, entry, &progress, &attempt_cancel, started, &budget);
        tokio::pin!(run);
        let result = tokio::select! {
            r = &mut run => r,
            _ = tokio::time::sleep(config.retry.attempt_timeout) => {
                attempt_cancel.cancel();
                let _ = run.await;
                Err(BackupError::AttemptTimeout(config.retry.attempt_timeout))
            }
        };
        let error = match result {
            Ok(report) => return Ok(report),
            Err(e) if cancel.is_cancelled() => return Err(e),
            Err(e) if e.class() == retry::ErrorClass::Permanent => return Err(e),
            Err(e) => e,
        };
        let Some(delay) = budget.failed() else {
            warn!(entry = %entry.name, attempt, "giving up after {attempt} attempts: {error:#}");
            return Err(error);
        };
        warn!(entry = %entry.name, attempt, "attempt failed: {error:#}; retrying in {delay:?}");
        on_retry(attempt, &error, delay);
        progress.reset();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return Err(BackupError::Cancelled),
        }
    }
}

async fn run_session(
    connector: &Connector,
    config: &AgentConfig,
    entry: &BackupEntry,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
    started: Instant,
    budget: &Arc<retry::RetryBudget>,
) -> Result<BackupReport, BackupError> {
    let hello = Hello {
        agent: config.name.clone(),
        storage: entry.storage.clone(),
        backup: entry.name.clone(),
        agent_version: crate::VERSION.to_string(),
        chunk_size: config.resume.chunk_size,
        streams: entry.parallels,
    };
    let (conn, welcome) = tokio::select! {
        r = connector.open_session(hello) => r.map_err(|e| match e {
            ConnectError::Refused(r) => BackupError::Refused(r),
            e => BackupError::Connect(e),
        })?,
        _ = cancel.cancelled() => return Err(BackupError::Cancelled),
    };
    let max_streams = entry.parallels.min(welcome.max_streams).max(1);
    let scaling = entry.auto_scaler.enabled && max_streams > 1;
    let first_streams = if scaling { 1 } else { max_streams };
    info!(
        entry = %entry.name, session = %welcome.session, compression = %welcome.compression,
        level = welcome.level, streams = first_streams, max_streams, autoscaler = scaling, "session open"
    );
    progress.set_session(welcome.session.to_string());
    // Small to begin with (whatever the producer's speed, a slower server should not
    // cost `buffer_size` of memory); it grows when the link's bandwidth-delay product
    // needs more. Two chunks per stream at least, so every stream has work.
    let initial = window::INITIAL.max(2 * u64::from(config.resume.chunk_size) * u64::from(max_streams));
    let window = Window::growing(initial, config.resume.buffer_size);
    let producer = producer::spawn(
        producer::ProducerSpec {
            sources: entry.sources.clone(),
            excludes: entry.exclude.clone(),
            compression: welcome.compression,
            level: welcome.level,
            chunk_size: config.resume.chunk_size,
            threads: compression_threads(),
        },
        window.clone(),
        progress.clone(),
        tokio::runtime::Handle::current(),
        format!("{}/{}", config.name, entry.name),
    )
    .map_err(BackupError::Spawn)?;
    let throttle =
        (!entry.bandwidth.is_unlimited()).then(|| Arc::new(crate::throttle::Throttle::new(entry.bandwidth.clone())));
    let ctx = Arc::new(stream::StreamCtx {
        connector: connector.clone(),
        session: welcome.session,
        window: window.clone(),
        budget: budget.clone(),
        keepalive: config.resume.keepalive_interval,
        progress: progress.clone(),
        cancel: cancel.clone(),
        rtt: stream::Rtt::new(config.resume.ack_timeout),
        fault_scope: format!("{}/{}", config.name, entry.name),
        throttle,
        joins: AtomicU32::new(0),
        live: AtomicUsize::new(0),
    });
    ctx.observe_rtt(conn.rtt);
    let mut set = StreamSet::new(ctx.clone(), max_streams);
    set.add(Some(conn));
    for _ in 1..first_streams {
        set.add(None);
    }
    // With the autoscaler on, its task owns the stream set until the transfer ends.
    let (set, scaler_task) = if scaling {
        let scaler = autoscale::Autoscaler::new(entry.auto_scaler.mode, 1, max_streams, entry.auto_scaler.interval);
        let task = tokio::spawn(scale(scaler, set, entry.auto_scaler.interval, window.clone(), progress.clone()));
        (None, Some(task))
    } else {
        (Some(set), None)
    };
    let finished = tokio::select! {
        f = window.wait_finished() => f,
        _ = cancel.cancelled() => {
            window.fail(Failure::Cancelled);
            window.wait_finished().await
        }
    };
    // Let streams deliver their Abort (bounded), then stop them.
    let mut set = match (set, scaler_task) {
        (Some(set), _) => set,
        (None, Some(task)) => task.await.map_err(BackupError::Task)?,
        (None, None) => unreachable!("the stream set is either here or with the autoscaler"),
    };
    let peak = set.peak;
    let streams_final = set.active();
    set.shutdown().await;
    let summary = tokio::task::spawn_blocking(move || producer.join()).await.map_err(BackupError::Task)?;
    let committed = match finished {
        Finished::Committed(c) => c,
        Finished::Failed(Failure::Cancelled) => return Err(BackupError::Cancelled),
        Finished::Failed(f) => return Err(BackupError::Transfer(f)),
    };
    // The window only commits after the producer finished, so neither can fail here.
    let summary = summary
        .map_err(|_| BackupError::Transfer(Failure::Source("the archive thread panicked".into())))?
        .map_err(|e| BackupError::Transfer(Failure::Source(e)))?;
    let report = BackupReport {
        entry: entry.name.to_string(),
        storage: entry.storage.to_string(),
        archive: committed.archive,
        session: welcome.session.to_string(),
        compression: welcome.compression,
        bytes_read: summary.bytes_read,
        bytes_sent: committed.size,
        bytes_transmitted: window.sent_bytes.load(Ordering::Relaxed),
        resent_chunks: window.resent_chunks.load(Ordering::Relaxed),
        entries: summary.entries,
        excluded: summary.excluded,
        skipped: summary.skipped(),
        notices: summary.notices,
        sha256: hex(&committed.sha256),
        streams: peak,
        streams_final,
        scaler_decisions: progress
            .scaler_events()
            .into_iter()
            .filter(|e| e.decision != autoscale::Decision::Hold)
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
    };
    info!(
        entry = %report.entry, archive = %report.archive, bytes_read = report.bytes_read,
        bytes_sent = report.bytes_sent, skipped = report.skipped, seconds = report.seconds, "backup committed"
    );
    Ok(report)
}
