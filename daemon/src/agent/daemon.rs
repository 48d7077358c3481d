//! The agent daemon (`nbackup agent`): runs each entry on its schedule, keeps the
//! results, talks to the server on a control channel, and serves the local admin API.
//!
//! * **Schedules.** One task computes every entry's next run in its time zone and
//!   sleeps until the earliest. A trigger — scheduled, operator (`run`), control
//!   channel, or catch-up — while the entry still runs is skipped and recorded.
//!   A run missed while the daemon was down is replayed once at start only with
//!   `catch_up: true` (the last handled occurrence is kept in the state file).
//! * **Runs.** Each run makes up to `retry.max_attempts` attempts with exponential
//!   backoff, each bounded by `retry.attempt_timeout`.
//! * **Reload** (SIGHUP, `POST /v1/reload`) re-reads the config; an invalid one is
//!   rejected and the old one stays; running backups finish with what they started
//!   with; new certificates take effect for new connections.
//! * **Shutdown** stops scheduling, cancels running backups (each tells the server
//!   with `Abort` at once) and returns within a bounded time.
//!
//! Time comes from a [`Clock`], so tests can run schedules faster than real time.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use nbackup_protocol::admin::{
    AgentReport, AgentStatus, ControlStatus, DaemonKind, EntryResult, EntryStatus, Event, EventKind, RunningBackup,
    Series,
};
use nbackup_protocol::config::{AgentConfig, BackupEntry};

use super::{BackupError, Connector, Progress};
use crate::state::{EventSpec, Events, Timeline, unix_now};

/// Where "now" comes from, and how to wait for a wall-clock time.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
    fn sleep_until(&self, at: DateTime<Utc>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The real clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock that starts at `origin` and runs `speed` times faster than real time —
/// for tests of schedules, without pausing the timers real I/O depends on.
pub struct FastClock {
    origin: DateTime<Utc>,
    started: Instant,
    speed: f64,
}

impl FastClock {
    pub fn new(origin: DateTime<Utc>, speed: f64) -> Self {
        FastClock { origin, started: Instant::now(), speed }
    }
}

impl Clock for FastClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = self.started.elapsed().as_secs_f64() * self.speed;
        self.origin + chrono::Duration::milliseconds((elapsed * 1000.0) as i64)
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let wait = (at - self.now()).to_std().unwrap_or_default().div_f64(self.speed);
        Box::pin(tokio::time::sleep(wait))
    }
}

/// What an agent daemon runs with besides its configuration: what every daemon
/// takes, and the clock its schedules read (a fast one in tests).
pub struct Options {
    pub daemon: crate::daemon::DaemonOptions,
    pub clock: Arc<dyn Clock>,
}

impl Default for Options {
    fn default() -> Self {
        Options { daemon: Default::default(), clock: Arc::new(SystemClock) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("state directory {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
    #[error("admin socket {path}: {source}")]
    Admin { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Notify(String),
}

/// A backup in progress.
struct Running {
    progress: Arc<Progress>,
    cancel: CancellationToken,
    attempt: u32,
    started: DateTime<Utc>,
}

#[derive(Default)]
struct EntryState {
    running: Option<Running>,
    last: Option<EntryResult>,
    next_run: Option<DateTime<Utc>>,
    deferred_until: Option<DateTime<Utc>>,
    /// The last scheduled occurrence handled (fired, skipped or deliberately missed).
    last_fire: Option<DateTime<Utc>>,
    /// The last committed run, for freshness.
    last_success: Option<DateTime<Utc>>,
    /// When this entry first appeared; bounds the freshness count before a success.
    known_since: Option<DateTime<Utc>>,
}

/// What survives a restart, in `<state_dir>/agent-state.json`.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Persisted {
    entries: BTreeMap<String, PersistedEntry>,
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct PersistedEntry {
    last: Option<EntryResult>,
    last_fire: Option<DateTime<Utc>>,
    #[serde(default)]
    last_success: Option<DateTime<Utc>>,
    #[serde(default)]
    known_since: Option<DateTime<Utc>>,
}

/// The control channel as the daemon sees it.
#[derive(Default)]
pub(super) struct ControlView {
    pub connected: bool,
    pub rtt_ms: Option<f64>,
    pub server_load1: Option<f64>,
    pub server_free_bytes: Option<u64>,
}

pub(super) struct Agentd {
    config: RwLock<Arc<AgentConfig>>,
    connector: RwLock<Arc<Connector>>,
    config_path: Option<PathBuf>,
    started: Instant,
    entries: Mutex<BTreeMap<String, EntryState>>,
    pub(super) events: Events,
    state_file: Option<PathBuf>,
    pub(super) timeline: Timeline,
    pub(super) control: Mutex<ControlView>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
    runs: TaskTracker,
    /// Wakes the scheduler when schedules change (reload, defer).
    schedule_changed: Notify,
    /// Signalled when runs start or end or the configuration changes, so the control
    /// channel reports at once rather than on its next tick.
    pub(super) report_now: Notify,
    /// Who is told about failures; replaced on reload.
    pub(super) notifier: Arc<crate::notify::Notifier>,
    /// When this agent's certificate and CA end.
    certs: crate::certwatch::CertWatch,
}

use crate::lock;

/// When a persisted last result is a success.
fn last_ok(last: Option<&EntryResult>) -> Option<DateTime<Utc>> {
    let l = last.filter(|l| l.ok)?;
    DateTime::parse_from_rfc3339(&l.finished).ok().map(|t| t.with_timezone(&Utc))
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn next_after(entry: &BackupEntry, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    next_in_zone(entry.schedule.as_ref()?, entry.timezone, after)
}

/// The next occurrence of `schedule` after `after`, read in `timezone` (local time
/// when `None`).
fn next_in_zone(
    schedule: &nbackup_protocol::config::Schedule,
    timezone: Option<chrono_tz::Tz>,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    match timezone {
        Some(tz) => schedule.next_after(&after.with_timezone(&tz)).map(|t| t.with_timezone(&Utc)),
        None => schedule.next_after(&after.with_timezone(&chrono::Local)).map(|t| t.with_timezone(&Utc)),
    }
}

fn prev_before(entry: &BackupEntry, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let schedule = entry.schedule.as_ref()?;
    match entry.timezone {
        Some(tz) => schedule.prev_before(&at.with_timezone(&tz)).map(|t| t.with_timezone(&Utc)),
        None => schedule.prev_before(&at.with_timezone(&chrono::Local)).map(|t| t.with_timezone(&Utc)),
    }
}

/// What became of a trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Triggered {
    Started,
    /// The entry was already running.
    Skipped,
    Unknown,
}

/// Runs the agent daemon until `shutdown`.
pub async fn run(config: AgentConfig, shutdown: CancellationToken, options: Options) -> Result<(), DaemonError> {
    let Options { daemon: mut options, clock } = options;
    let connector = Connector::new(&config)?;
    let state_dir = options.persist_state.then(|| config.state_dir.clone());
    let state_err = |source| DaemonError::State { path: config.state_dir.clone(), source };
    if let Some(dir) = &state_dir {
        std::fs::create_dir_all(dir).map_err(state_err)?;
    }
    let events = Events::open(state_dir.as_deref(), "agent-events.jsonl").map_err(state_err)?;
    let state_file = state_dir.as_ref().map(|d| d.join("agent-state.json"));
    let persisted: Persisted = state_file
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let mut entries = BTreeMap::new();
    for e in &config.backups {
        let p = persisted.entries.get(e.name.as_str());
        entries.insert(
            e.name.to_string(),
            EntryState {
                last: p.and_then(|p| p.last.clone()),
                last_fire: p.and_then(|p| p.last_fire),
                // A state file older than this field: a committed last result is
                // the best we know.
                last_success: p.and_then(|p| p.last_success.or_else(|| last_ok(p.last.as_ref()))),
                known_since: Some(p.and_then(|p| p.known_since).unwrap_or_else(|| clock.now())),
                ..Default::default()
            },
        );
    }
    let admin = options.admin.then(|| (config.admin.socket.clone(), config.admin.group.clone()));
    let targets = crate::notify::resolve(&config.notify).map_err(DaemonError::Notify)?;
    let d = Arc::new(Agentd {
        config: RwLock::new(Arc::new(config)),
        connector: RwLock::new(Arc::new(connector)),
        config_path: options.config_path.take(),
        started: Instant::now(),
        entries: Mutex::new(entries),
        events,
        state_file,
        timeline: Timeline::new(Timeline::DEFAULT_POINTS),
        control: Mutex::new(ControlView::default()),
        clock,
        shutdown: shutdown.clone(),
        runs: TaskTracker::new(),
        schedule_changed: Notify::new(),
        report_now: Notify::new(),
        notifier: crate::notify::Notifier::new(targets, DaemonKind::Agent),
        certs: crate::certwatch::CertWatch::default(),
    });
    let background = TaskTracker::new();
    crate::notify::spawn(d.notifier.clone(), d.events.subscribe(), &background, shutdown.clone());
    if let Some((socket, group)) = admin {
        let router = super::admin::router(d.clone());
        let events = d.clone();
        let audit: crate::admin::Audit =
            Arc::new(move |who, message| drop(events.events.record(EventKind::Operator, who, message)));
        crate::daemon::start_admin("agent", socket, group, router, audit, &background, &shutdown)
            .map_err(|(path, source)| DaemonError::Admin { path, source })?;
    }
    let config = d.config();
    info!(agent = %config.name, entries = config.backups.len(), server = %config.server.address, "agent daemon ready");
    d.events.record(
        EventKind::Started,
        d.who(None),
        format!("agent {} with {} entries", crate::VERSION, config.backups.len()),
    );
    d.catch_up();
    if let Some(ready) = options.ready.take() {
        let _ = ready.send(());
    }
    background.spawn(d.clone().scheduler());
    background.spawn(d.clone().sampler());
    background.spawn(d.clone().certificates());
    background.spawn(d.clone().restore_tester());
    background.spawn(super::control::run(d.clone()));
    background.spawn(crate::daemon::reload_loop(d.clone(), options.reload.take(), shutdown.clone()));
    shutdown.cancelled().await;
    info!("shutting down: no new runs; aborting running backups");
    d.runs.close();
    // Running backups watch `shutdown` (their tokens are its children) and abort.
    if tokio::time::timeout(Duration::from_secs(15), d.runs.wait()).await.is_err() {
        warn!("some backups did not stop within 15 s");
    }
    background.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), background.wait()).await;
    d.events.record(EventKind::Stopped, d.who(None), "agent stopped");
    Ok(())
}

impl Agentd {
    pub(super) fn config(&self) -> Arc<AgentConfig> {
        self.config.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub(super) fn connector(&self) -> Arc<Connector> {
        self.connector.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub(super) fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    fn who<'a>(&'a self, entry: Option<&'a str>) -> EventSpec<'a> {
        EventSpec { backup: entry, ..Default::default() }
    }

    fn save(&self) {
        let Some(path) = &self.state_file else { return };
        let p = Persisted {
            entries: lock(&self.entries)
                .iter()
                .map(|(k, v)| {
                    let p = PersistedEntry {
                        last: v.last.clone(),
                        last_fire: v.last_fire,
                        last_success: v.last_success,
                        known_since: v.known_since,
                    };
                    (k.clone(), p)
                })
                .collect(),
        };
        let json = serde_json::to_string_pretty(&p).unwrap_or_default();
        if let Err(e) = crate::fsutil::write_atomic(path, json.as_bytes()) {
            warn!("cannot save agent state {}: {e}", path.display());
        }
    }

    /// Replays, once, a scheduled run missed while the daemon was down — for entries
    /// with `catch_up`; for the others, only notes that it was missed.
    fn catch_up(self: &Arc<Self>) {
        let now = self.clock.now();
        let config = self.config();
        let mut due = Vec::new();
        {
            let mut entries = lock(&self.entries);
            for e in &config.backups {
                let Some(state) = entries.get_mut(e.name.as_str()) else { continue };
                let Some(prev) = prev_before(e, now) else { continue };
                match state.last_fire {
                    Some(last) if last < prev => {
                        if e.catch_up {
                            due.push(e.name.to_string());
                        } else {
                            self.events.record(
                                EventKind::Missed,
                                self.who(Some(e.name.as_str())),
                                format!("run of {} missed while the agent was down (catch_up is off)", rfc3339(prev)),
                            );
                        }
                        state.last_fire = Some(prev);
                    }
                    Some(_) => {}
                    // First start: nothing was missed, but remember where we are.
                    None => state.last_fire = Some(prev),
                }
            }
        }
        self.save();
        for name in due {
            info!(entry = %name, "catching up a run missed while the agent was down");
            self.trigger(&name, "catch-up");
        }
    }

    /// Starts a run of `entry` unless it is running (then the trigger is skipped).
    pub(super) fn trigger(self: &Arc<Self>, entry: &str, source: &str) -> Triggered {
        if self.shutdown.is_cancelled() {
            return Triggered::Skipped;
        }
        let config = self.config();
        let Some(spec) = config.backups.iter().find(|b| b.name.as_str() == entry).cloned() else {
            return Triggered::Unknown;
        };
        let progress = Arc::new(Progress::default());
        let cancel = self.shutdown.child_token();
        {
            let mut entries = lock(&self.entries);
            let state = entries.entry(entry.to_string()).or_default();
            if let Some(r) = &state.running {
                let msg = format!("{source} trigger skipped: still running since {}", rfc3339(r.started));
                info!(entry, "{msg}");
                self.events.record(EventKind::Skipped, self.who(Some(entry)), msg);
                return Triggered::Skipped;
            }
            state.running = Some(Running {
                progress: progress.clone(),
                cancel: cancel.clone(),
                attempt: 1,
                started: self.clock.now(),
            });
        }
        self.events.record(EventKind::RunStarted, self.who(Some(entry)), format!("{source} run"));
        self.report_now.notify_one();
        let d = self.clone();
        self.runs.spawn(async move { d.run_entry(spec, config, progress, cancel).await });
        Triggered::Started
    }

    async fn run_entry(
        self: Arc<Self>,
        entry: BackupEntry,
        config: Arc<AgentConfig>,
        progress: Arc<Progress>,
        cancel: CancellationToken,
    ) {
        let name = entry.name.to_string();
        let started = Instant::now();
        let connector = self.connector();
        // The ETA's total; the walk stops when the run does.
        let prescan = CancellationToken::new();
        let _stop_prescan = prescan.clone().drop_guard();
        super::archive::estimate_in_background(entry.sources.clone(), entry.exclude.clone(), progress.clone(), prescan);
        let on_retry = |attempt: u32, e: &BackupError, delay: Duration| {
            let msg = format!("attempt {attempt} failed: {e:#}; retrying in {:.0} s", delay.as_secs_f64());
            self.events.record(EventKind::Retry, self.who(Some(&name)), msg);
            if let Some(r) = lock(&self.entries).get_mut(&name).and_then(|s| s.running.as_mut()) {
                r.attempt = attempt + 1;
            }
        };
        let result = super::run_backup_with(&connector, &config, &entry, progress.clone(), cancel, &on_retry).await;
        let attempt = progress.attempt.load(Ordering::Relaxed).max(1);
        let finished = self.clock.now();
        let (archive, error, bytes_read, bytes_sent, skipped) = match &result {
            Ok(r) => (Some(r.archive.clone()), None, r.bytes_read, r.bytes_sent, r.skipped),
            Err(e) => (
                None,
                Some(e.to_string()),
                progress.bytes_read.load(Ordering::Relaxed),
                progress.bytes_acked.load(Ordering::Relaxed),
                0,
            ),
        };
        let record = EntryResult {
            entry: name.clone(),
            ok: result.is_ok(),
            archive,
            error,
            finished: rfc3339(finished),
            seconds: started.elapsed().as_secs_f64(),
            attempts: attempt,
            bytes_read,
            bytes_sent,
            skipped,
        };
        match &result {
            Ok(r) => self.events.record(
                EventKind::Committed,
                self.who(Some(&name)),
                format!("committed {} in {:.1} s", r.archive, r.seconds),
            ),
            Err(BackupError::Cancelled) => {
                self.events.record(EventKind::Aborted, self.who(Some(&name)), "run cancelled")
            }
            Err(e) => self.events.record(EventKind::Failed, self.who(Some(&name)), e.to_string()),
        };
        {
            let mut entries = lock(&self.entries);
            let state = entries.entry(name.clone()).or_default();
            state.running = None;
            if record.ok {
                state.last_success = Some(finished);
            }
            state.last = Some(record);
        }
        self.report_now.notify_one();
        self.save();
    }

    /// Stops a running entry.
    pub(super) fn abort(&self, entry: &str, reason: &str) -> bool {
        let entries = lock(&self.entries);
        match entries.get(entry).and_then(|s| s.running.as_ref()) {
            Some(r) => {
                r.cancel.cancel();
                self.events.record(EventKind::AbortRequested, self.who(Some(entry)), reason.to_string());
                true
            }
            None => false,
        }
    }

    /// Postpones the next scheduled run of `entry` by `seconds`.
    /// Postpones `entry`'s scheduled runs by `seconds`; the answer for the operator,
    /// or `None` for an unknown entry.
    pub(super) fn defer(&self, entry: &str, seconds: u64) -> Option<String> {
        let until = self.clock.now() + chrono::Duration::seconds(seconds as i64);
        let mut entries = lock(&self.entries);
        let state = entries.get_mut(entry)?;
        state.deferred_until = Some(until);
        drop(entries);
        self.events.record(
            EventKind::Deferred,
            self.who(Some(entry)),
            format!("next run not before {}", rfc3339(until)),
        );
        self.schedule_changed.notify_one();
        Some(format!("{entry}: no scheduled run before {}", rfc3339(until)))
    }
}

impl crate::daemon::Reloadable for Agentd {
    /// Re-reads the config; keeps the old one if the new one is invalid. Blocking.
    fn reload(&self) -> Result<String, String> {
        let Some(path) = &self.config_path else {
            return Err("this agent was started without a config file to re-read".into());
        };
        let result = (|| -> Result<String, String> {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let config = AgentConfig::parse(&text, path).map_err(|e| e.to_string())?;
            let connector = Connector::new(&config).map_err(|e| e.to_string())?;
            self.notifier.replace(crate::notify::resolve(&config.notify)?);
            {
                let mut entries = lock(&self.entries);
                for e in &config.backups {
                    entries
                        .entry(e.name.to_string())
                        .or_insert_with(|| EntryState { known_since: Some(self.clock.now()), ..Default::default() });
                }
                let names: Vec<String> = config.backups.iter().map(|b| b.name.to_string()).collect();
                entries.retain(|k, v| names.contains(k) || v.running.is_some());
            }
            let n = config.backups.len();
            *self.connector.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(connector);
            *self.config.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
            Ok(format!("configuration reloaded: {n} entries"))
        })();
        match &result {
            Ok(m) => {
                info!("{m}");
                self.events.record(EventKind::Reloaded, self.who(None), m.clone());
                self.schedule_changed.notify_one();
                self.report_now.notify_one();
            }
            Err(e) => {
                warn!("reload rejected, keeping the running configuration: {e}");
                self.events.record(EventKind::ReloadFailed, self.who(None), e.clone());
            }
        }
        result
    }
}

impl Agentd {
    /// Sleeps until the earliest next run, fires what is due, repeats.
    async fn scheduler(self: Arc<Self>) {
        loop {
            let now = self.clock.now();
            let config = self.config();
            let mut earliest: Option<DateTime<Utc>> = None;
            let mut due = Vec::new();
            {
                let mut entries = lock(&self.entries);
                for e in &config.backups {
                    let Some(state) = entries.get_mut(e.name.as_str()) else { continue };
                    // The next occurrence after the last one handled, never before a deferral.
                    let mut next = next_after(e, state.last_fire.unwrap_or(now));
                    if let (Some(n), Some(until)) = (next, state.deferred_until)
                        && n < until
                    {
                        next = next_after(e, until - chrono::Duration::milliseconds(1));
                    }
                    state.next_run = next;
                    match next {
                        Some(n) if n <= now => due.push((e.name.to_string(), n)),
                        Some(n) => earliest = Some(earliest.map_or(n, |x| x.min(n))),
                        None => {}
                    }
                }
                for (name, at) in &due {
                    if let Some(s) = entries.get_mut(name) {
                        s.last_fire = Some(*at);
                        s.deferred_until = None;
                    }
                }
            }
            if !due.is_empty() {
                self.save();
                for (name, at) in due {
                    info!(entry = %name, at = %rfc3339(at), "scheduled run");
                    self.trigger(&name, "scheduled");
                }
                continue;
            }
            let sleep = match earliest {
                Some(at) => self.clock.sleep_until(at),
                None => Box::pin(std::future::pending()),
            };
            tokio::select! {
                _ = sleep => {}
                _ = self.schedule_changed.notified() => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Runs each entry's `restore_test` on its schedule, one test at a time. A test
    /// missed while the agent was down is not replayed; a changed configuration is
    /// picked up within a minute.
    async fn restore_tester(self: Arc<Self>) {
        let mut last: std::collections::HashMap<String, DateTime<Utc>> = std::collections::HashMap::new();
        loop {
            let now = self.clock.now();
            let config = self.config();
            let mut earliest = now + chrono::Duration::seconds(60);
            let mut due = Vec::new();
            for e in &config.backups {
                let Some(t) = &e.restore_test else { continue };
                let after = *last.entry(e.name.to_string()).or_insert(now);
                match next_in_zone(&t.schedule, e.timezone, after) {
                    Some(n) if n <= now => due.push((e.clone(), n)),
                    Some(n) => earliest = earliest.min(n),
                    None => {}
                }
            }
            for (entry, at) in due {
                last.insert(entry.name.to_string(), at);
                self.restore_test(&config, &entry).await;
            }
            tokio::select! {
                _ = self.clock.sleep_until(earliest) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// One restore test of `entry`'s newest archive, recorded as an event.
    async fn restore_test(&self, config: &AgentConfig, entry: &BackupEntry) {
        let Some(test) = &entry.restore_test else { return };
        let client = super::fetch::RestoreClient::new((*self.connector()).clone(), config.name.clone(), config.retry);
        let who = self.who(Some(entry.name.as_str()));
        let result = async {
            let archives = client.list(&entry.storage, Some(&entry.name)).await.map_err(|e| e.to_string())?;
            let newest = archives.last().ok_or_else(|| "no archive on the server yet".to_string())?;
            // On the state directory's disk, not a small /tmp; removed after.
            super::restore::restore_test(&client, &entry.storage, newest, test.files, &config.state_dir, &self.shutdown)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(report) if report.ok() => {
                info!(entry = %entry.name, "{}", report.summary());
                self.events.record(EventKind::RestoreTested, who, report.summary());
            }
            Ok(report) => {
                warn!(entry = %entry.name, "{}", report.summary());
                self.events.record(EventKind::RestoreTestFailed, who, report.summary());
            }
            Err(e) if self.shutdown.is_cancelled() => info!(entry = %entry.name, "restore test stopped: {e}"),
            Err(e) => {
                warn!(entry = %entry.name, "restore test failed: {e}");
                self.events.record(EventKind::RestoreTestFailed, who, format!("restore test failed: {e}"));
            }
        }
    }

    /// Watches the agent's certificate: renews it over mutual TLS once less than
    /// `tls.renew_before` is left (retrying with backoff), installs the new pair and
    /// switches connections to it without a restart, and records `cert_expiring`
    /// (once a day) within `tls.warn_before` of the end.
    async fn certificates(self: Arc<Self>) {
        let mut retry = Duration::from_secs(300);
        loop {
            let config = self.config();
            let mut due = self.check_certificates(&config).await;
            let left = self.certs.not_after("agent").map(|end| end - unix_now() as i64);
            let renew = config.tls.renew_before > Duration::ZERO
                && left.is_some_and(|l| l < config.tls.renew_before.as_secs() as i64);
            let mut wait = crate::certwatch::CHECK_EVERY;
            if renew {
                match self.renew(&config).await {
                    // At most one renewal per check, even if `renew_before` is longer
                    // than the certificates the server issues.
                    Ok(()) => {
                        retry = Duration::from_secs(300);
                        due = self.check_certificates(&config).await;
                    }
                    Err(e) => {
                        warn!("certificate renewal failed (retrying in {retry:?}): {e}");
                        due = due.into_iter().map(|m| format!("{m}; renewal failed: {e}")).collect();
                        wait = retry;
                        retry = (retry * 2).min(crate::certwatch::CHECK_EVERY);
                    }
                }
            }
            for message in due {
                warn!("{message}");
                self.events.record(EventKind::CertExpiring, self.who(None), message);
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Re-reads the certificate files; returns the warnings due.
    async fn check_certificates(self: &Arc<Self>, config: &AgentConfig) -> Vec<String> {
        let d = self.clone();
        let tls = config.tls.clone();
        tokio::task::spawn_blocking(move || {
            let certs = [("agent", tls.cert.as_path()), ("ca", tls.ca_cert.as_path())];
            d.certs.check(&certs, tls.warn_before, unix_now() as i64)
        })
        .await
        .unwrap_or_default()
    }

    /// One renewal: a new key and certificate from the server, installed, and the
    /// connector rebuilt on them (connections already open keep the old pair).
    async fn renew(&self, config: &AgentConfig) -> Result<(), String> {
        let connector = self.connector();
        let creds = super::enroll::renew(&connector, &config.tls, &config.name).await.map_err(|e| e.to_string())?;
        let tls = config.tls.clone();
        let installed = creds.clone();
        tokio::task::spawn_blocking(move || super::enroll::install(&tls, &installed))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot install the new certificate: {e}"))?;
        let fresh = Connector::new(config).map_err(|e| format!("the new certificate does not load: {e}"))?;
        *self.connector.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(fresh);
        let message = format!("certificate renewed; valid until {}", creds.not_after);
        info!("{message}");
        self.events.record(EventKind::CertRenewed, self.who(None), message);
        Ok(())
    }

    /// Once a second: time series for charts.
    async fn sampler(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let (mut read, mut acked, mut last) = (0u64, 0u64, Instant::now());
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            let (mut r, mut a, mut streams, mut efficiency) = (0, 0, 0u16, None);
            for run in lock(&self.entries).values().filter_map(|s| s.running.as_ref()) {
                r += run.progress.bytes_read.load(Ordering::Relaxed);
                a += run.progress.bytes_acked.load(Ordering::Relaxed);
                streams += run.progress.streams.load(Ordering::Relaxed);
                efficiency = run.progress.scaler_events().last().map(|e| e.efficiency).or(efficiency);
                run.progress.sample_rates();
            }
            let secs = last.elapsed().as_secs_f64().max(1e-3);
            let now = unix_now();
            self.timeline.push("read_bps", now, r.saturating_sub(read) as f64 / secs);
            self.timeline.push("sent_bps", now, a.saturating_sub(acked) as f64 / secs);
            self.timeline.push("streams", now, f64::from(streams));
            if let Some(e) = efficiency {
                self.timeline.push("efficiency", now, e);
            }
            if let Some(rtt) = lock(&self.control).rtt_ms {
                self.timeline.push("rtt_ms", now, rtt);
            }
            (read, acked, last) = (r, a, Instant::now());
        }
    }

    pub(super) fn entry_statuses(&self) -> Vec<EntryStatus> {
        let config = self.config();
        let now = self.clock.now();
        let entries = lock(&self.entries);
        config
            .backups
            .iter()
            .map(|e| {
                let state = entries.get(e.name.as_str());
                let last = state.and_then(|s| s.last.clone());
                let last_age_secs = last.as_ref().and_then(|l| {
                    DateTime::parse_from_rfc3339(&l.finished)
                        .ok()
                        .map(|t| (now - t.with_timezone(&Utc)).num_seconds().max(0) as u64)
                });
                let facts = nbackup_protocol::freshness::Facts {
                    schedule: e.schedule.as_ref(),
                    timezone: e.timezone,
                    last_success: state.and_then(|s| s.last_success),
                    known_since: state.and_then(|s| s.known_since).unwrap_or(now),
                    running: state.is_some_and(|s| s.running.is_some()),
                };
                EntryStatus {
                    freshness: nbackup_protocol::freshness::assess(&facts, now),
                    name: e.name.to_string(),
                    storage: e.storage.to_string(),
                    schedule: e.schedule.as_ref().map(|s| s.as_str().to_string()),
                    timezone: e.timezone.map_or_else(|| "local".to_string(), |tz| tz.name().to_string()),
                    next_run: state.and_then(|s| s.next_run).map(rfc3339),
                    running: state.is_some_and(|s| s.running.is_some()),
                    last,
                    last_age_secs,
                }
            })
            .collect()
    }

    pub(super) fn running(&self) -> Vec<RunningBackup> {
        lock(&self.entries)
            .iter()
            .filter_map(|(name, s)| {
                let r = s.running.as_ref()?;
                let snap = r.progress.snapshot();
                Some(RunningBackup {
                    entry: name.clone(),
                    attempt: r.attempt,
                    started: rfc3339(r.started),
                    session: r.progress.session(),
                    bytes_read: snap.bytes_read,
                    bytes_compressed: snap.bytes_compressed,
                    bytes_acked: snap.bytes_acked,
                    entries: snap.entries,
                    estimate_bytes: snap.estimate.map(|e| e.0),
                    read_bps: r.progress.read_rate(),
                    acked_bps: r.progress.acked_rate(),
                    eta_secs: r.progress.eta().map(|d| d.as_secs_f64()),
                    streams: r.progress.streams.load(Ordering::Relaxed),
                    stream_table: r.progress.streams(),
                    scaler: r.progress.scaler_events(),
                    stages: Some(r.progress.stages()),
                })
            })
            .collect()
    }

    pub(super) fn status(&self) -> AgentStatus {
        let config = self.config();
        let control_channel = {
            let control = lock(&self.control);
            ControlStatus {
                enabled: config.control_channel.enabled,
                connected: control.connected,
                rtt_ms: control.rtt_ms,
                server_load1: control.server_load1,
                server_free_bytes: control.server_free_bytes,
            }
        };
        AgentStatus {
            daemon: DaemonKind::Agent,
            version: crate::VERSION.to_string(),
            agent: config.name.to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            server: config.server.address.clone(),
            control_channel,
            entries: self.entry_statuses(),
            running: self.running(),
            certificates: self.certs.snapshot(),
            config: self.config_path.as_ref().map(|p| p.display().to_string()),
        }
    }

    pub(super) fn report(&self) -> AgentReport {
        // One lock at a time: a guard in a struct literal lives to the end of it.
        let rtt_ms = lock(&self.control).rtt_ms;
        let last_results = lock(&self.entries).values().filter_map(|s| s.last.clone()).collect();
        AgentReport {
            version: crate::VERSION.to_string(),
            load1: crate::state::load1(),
            rtt_ms,
            running: self.running(),
            last_results,
            keepalive_ms: Some(self.config().control_channel.keepalive_interval.as_millis() as u64),
            entries: self.entry_statuses(),
        }
    }

    pub(super) fn events_since(&self, since: u64, limit: usize) -> Vec<Event> {
        self.events.since(since, limit)
    }

    pub(super) fn series(&self) -> Vec<Series> {
        self.timeline.snapshot()
    }
}
