//! What the server tells operators: the event log, session history, counters for
//! `/metrics`, one-second time series — and the two background loops that feed them
//! and keep the registry tidy (sampler, reaper).
//!
//! Nothing here is on the data path's critical section: recording is an append to a
//! JSONL file and a broadcast; loops touch storages only on blocking threads.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use nbackup_protocol::Name;
use nbackup_protocol::admin::{EventKind, HistoryRecord, SessionOutcome};
use nbackup_protocol::wire::Reason;

use super::Server;
use super::registry::{FINISHED_TTL, Outcome};
use super::session::Session;
use crate::state::{EventSpec, Events, History, Timeline, unix_now};

/// Below this share of free space a storage is reported as low (event, metrics).
const DISK_LOW: f64 = 0.10;

/// Counters for `/metrics` since the server started.
#[derive(Default)]
pub struct Metrics {
    pub bytes_received: AtomicU64,
    pub committed: Mutex<BTreeMap<String, u64>>,
    pub failed: Mutex<BTreeMap<String, u64>>,
    /// (agent, backup) → unix time of the last committed archive.
    pub last_success: Mutex<BTreeMap<(String, String), u64>>,
    /// Commits whose steps after the rename failed (finished at the next start).
    pub incomplete: AtomicU64,
}

pub struct Telemetry {
    pub events: Events,
    pub history: History,
    pub metrics: Metrics,
    pub timeline: Timeline,
    /// Storages last reported low on space, to warn once an hour.
    disk_warned: Mutex<HashMap<Name, Instant>>,
}

/// The kind of a session's end in history and events.
pub fn end_kind(outcome: &Outcome) -> SessionOutcome {
    match outcome {
        Outcome::Committed(_) => SessionOutcome::Committed,
        Outcome::Failed(r) => match r.reason {
            Reason::Cancelled | Reason::Draining => SessionOutcome::Aborted,
            Reason::Expired => SessionOutcome::Expired,
            _ => SessionOutcome::Failed,
        },
    }
}

/// The event that records an outcome.
fn end_event(outcome: SessionOutcome) -> EventKind {
    match outcome {
        SessionOutcome::Committed => EventKind::Committed,
        SessionOutcome::Aborted => EventKind::Aborted,
        SessionOutcome::Expired => EventKind::Expired,
        SessionOutcome::Failed | SessionOutcome::Unknown => EventKind::Failed,
    }
}

impl Telemetry {
    pub fn new(events: Events, history: History) -> Self {
        let metrics = Metrics::default();
        for r in history.list(None, usize::MAX).into_iter().rev().filter(|r| r.outcome == SessionOutcome::Committed) {
            let at = chrono::DateTime::parse_from_rfc3339(&r.finished).map_or(0, |t| t.timestamp().max(0) as u64);
            crate::lock(&metrics.last_success).insert((r.agent, r.backup), at);
        }
        Telemetry {
            events,
            history,
            metrics,
            timeline: Timeline::new(Timeline::DEFAULT_POINTS),
            disk_warned: Mutex::new(HashMap::new()),
        }
    }

    /// An event about one session.
    pub fn session_event(&self, session: &Session, kind: EventKind, message: String) {
        let p = &session.params;
        let id = p.id.to_string();
        let who = EventSpec {
            agent: Some(p.key.agent.as_str()),
            backup: Some(p.key.backup.as_str()),
            session: Some(&id),
            ..Default::default()
        };
        self.events.record(kind, who, message);
    }

    /// Records how a session ended: history, events, counters. Called once per
    /// session, by the registry's one end transition.
    pub fn session_ended(&self, session: &Session, outcome: &Outcome, rotated: &[String], incomplete: Option<&str>) {
        let p = &session.params;
        let storage = p.key.storage.to_string();
        let kind = end_kind(outcome);
        let (archive, reason, message) = match outcome {
            Outcome::Committed(c) => {
                *crate::lock(&self.metrics.committed).entry(storage.clone()).or_default() += 1;
                crate::lock(&self.metrics.last_success)
                    .insert((p.key.agent.to_string(), p.key.backup.to_string()), unix_now());
                self.session_event(session, end_event(kind), format!("committed {} ({} bytes)", c.archive, c.size));
                for old in rotated {
                    self.session_event(session, EventKind::Rotated, format!("rotated out {old}"));
                }
                if let Some(why) = incomplete {
                    self.metrics.incomplete.fetch_add(1, Ordering::Relaxed);
                    self.session_event(
                        session,
                        EventKind::CommitIncomplete,
                        format!("{} is committed, but {why}; the next start finishes it", c.archive),
                    );
                }
                (Some(c.archive.clone()), None, format!("{} bytes", c.size))
            }
            Outcome::Failed(r) => {
                *crate::lock(&self.metrics.failed).entry(storage.clone()).or_default() += 1;
                self.session_event(session, end_event(kind), r.to_string());
                (None, Some(r.reason.to_string()), r.message.clone())
            }
        };
        self.history.record(HistoryRecord {
            session: p.id.to_string(),
            agent: p.key.agent.to_string(),
            storage,
            backup: p.key.backup.to_string(),
            outcome: kind,
            archive,
            reason,
            message,
            bytes: session.bytes_received.load(Ordering::Relaxed),
            started: p.started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            finished: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        });
    }

    /// Records a storage under [`DISK_LOW`] free space, at most once an hour.
    fn disk_check(&self, name: &Name, free: u64, total: u64) {
        if total == 0 || (free as f64) / (total as f64) >= DISK_LOW {
            return;
        }
        let mut warned = crate::lock(&self.disk_warned);
        if warned.get(name).is_some_and(|t| t.elapsed() < Duration::from_secs(3600)) {
            return;
        }
        warned.insert(name.clone(), Instant::now());
        let msg = format!("storage {name} has {free} of {total} bytes free");
        tracing::warn!("{msg}");
        self.events.record(EventKind::DiskLow, EventSpec::default(), msg);
    }
}

/// Free space and archive totals per storage, refreshed on blocking threads, so that
/// `PING`, control-channel pongs and the admin API answer from memory and never wait
/// on a slow or frozen disk. At most one probe per storage is in flight.
#[derive(Default)]
pub struct DiskCache {
    inner: Mutex<HashMap<Name, Probe>>,
}

#[derive(Default, Clone, Copy)]
struct Probe {
    space: Option<(u64, u64)>,
    usage: Option<(u64, u64)>,
    probing: bool,
}

impl DiskCache {
    /// (free, total) bytes of a storage's filesystem, as last measured.
    pub fn space(&self, name: &Name) -> Option<(u64, u64)> {
        crate::lock(&self.inner).get(name).and_then(|p| p.space)
    }

    /// (archives, bytes) kept in a storage, as last counted.
    pub fn usage(&self, name: &Name) -> Option<(u64, u64)> {
        crate::lock(&self.inner).get(name).and_then(|p| p.usage)
    }

    /// Free bytes of the fullest storage that answered.
    pub fn min_free(&self) -> u64 {
        crate::lock(&self.inner).values().filter_map(|p| p.space).map(|(f, _)| f).min().unwrap_or(0)
    }

    /// Claims the probe of `name`; false while one is still running (a frozen disk).
    fn claim(&self, name: &Name) -> bool {
        let mut m = crate::lock(&self.inner);
        let p = m.entry(name.clone()).or_default();
        !std::mem::replace(&mut p.probing, true)
    }

    fn record(&self, name: &Name, space: Option<(u64, u64)>, usage: Option<(u64, u64)>) {
        let mut m = crate::lock(&self.inner);
        let p = m.entry(name.clone()).or_default();
        p.probing = false;
        p.space = space.or(p.space);
        p.usage = usage.or(p.usage);
    }

    /// Measures every storage now, each on its own blocking thread; returns the
    /// probes so a caller may wait for them.
    pub(crate) fn refresh(server: &Arc<Server>, with_disk_low: bool) -> Vec<tokio::task::JoinHandle<()>> {
        let mut probes = Vec::new();
        for area in server.live().storages.values().cloned() {
            if !server.disk.claim(&area.cfg.name) {
                continue;
            }
            let s = server.clone();
            probes.push(server.tracker.spawn_blocking(move || {
                let space = area.disk_space().ok();
                let usage = area.usage().ok();
                s.disk.record(&area.cfg.name, space, usage);
                if let (true, Some((free, total))) = (with_disk_low, space) {
                    s.telemetry.disk_check(&area.cfg.name, free, total);
                }
            }));
        }
        probes
    }
}

/// Ends sessions idle for longer than `session_ttl`, or without any stream for longer
/// than `orphan_timeout`; forgets old outcomes; compacts the committed logs.
pub(crate) async fn reaper(server: Arc<Server>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut compacted = Instant::now();
    let mut last = Instant::now() - Duration::from_secs(3600);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (ttl, orphan) = {
            let live = server.live();
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
            for area in server.live().storages.values() {
                let area = area.clone();
                // Each on its own blocking thread: a frozen storage delays only itself.
                server.tracker.spawn_blocking(move || area.recent_commits(FINISHED_TTL));
            }
        }
        server.registry.expire(ttl, orphan);
    }
}

/// Once a second: receive rates, time series; every 5 s: free space and totals per
/// storage (low-space warnings every 30 s).
pub(crate) async fn sampler(server: Arc<Server>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut disk_check = Instant::now() - Duration::from_secs(30);
    let mut disk_refresh = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sessions = server.registry.sessions();
        let mut rate = 0.0;
        for v in &sessions {
            if let Some(s) = &v.session {
                s.sample();
                rate += s.rate.rate();
            }
            for st in v.streams.iter().filter(|s| s.attached) {
                st.stats.rate.sample(st.stats.bytes.load(Ordering::Relaxed));
            }
        }
        let now = unix_now();
        let t = &server.telemetry;
        t.timeline.push("sessions", now, sessions.len() as f64);
        t.timeline.push("receive_bps", now, rate);
        t.timeline.push("agents_connected", now, server.agents.connected() as f64);
        // Per-session series, so a console opening a session has its charts at once.
        let mut live = Vec::with_capacity(sessions.len() * 2);
        for v in &sessions {
            let Some(s) = &v.session else { continue };
            let id = v.params.id.to_string();
            let name = format!("session/{id}/receive_bps");
            t.timeline.push(&name, now, s.rate.rate());
            live.push(name);
            let rtts: Vec<f64> = server
                .agents
                .running(v.params.key.agent.as_str(), &id)
                .map(|r| r.stream_table.iter().filter_map(|st| st.rtt_ms).collect())
                .unwrap_or_default();
            if !rtts.is_empty() {
                let name = format!("session/{id}/rtt_ms");
                t.timeline.push(&name, now, rtts.iter().sum::<f64>() / rtts.len() as f64);
                live.push(name);
            }
        }
        t.timeline.retain(|name| !name.starts_with("session/") || live.iter().any(|l| l == name));
        let warn = disk_check.elapsed() >= Duration::from_secs(30);
        if warn || disk_refresh.elapsed() >= Duration::from_secs(5) {
            disk_refresh = Instant::now();
            if warn {
                disk_check = Instant::now();
            }
            drop(DiskCache::refresh(&server, warn));
        }
    }
}
