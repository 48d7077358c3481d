//! What the console knows: the daemon's last snapshot, the events and history it
//! collected, client-side traces for charts, and the link's state. Written only by
//! [`update`](super::app::update); read by the views.

use std::collections::{BTreeMap, HashMap, VecDeque};

use chrono::{DateTime, Utc};
use nbackup_protocol::admin::{
    AgentInfo, AgentStatus, ArchiveInfo, DaemonKind, Event, HistoryRecord, Series, ServerStatus, SessionInfo,
};

/// Events kept in memory (the daemon keeps more; `ctl events` reads them).
pub const EVENT_CAP: usize = 10_000;
/// One point a second for five minutes, like the daemons' own series.
pub const TRACE_POINTS: usize = 300;

/// The daemon's state as of its last snapshot.
#[derive(Clone, Debug, Default)]
pub enum Snapshot {
    #[default]
    Nothing,
    Server {
        status: ServerStatus,
        sessions: Vec<SessionInfo>,
        agents: Vec<AgentInfo>,
    },
    Agent {
        status: AgentStatus,
    },
}

/// The watch stream's state, for the banner.
#[derive(Clone, Debug, PartialEq)]
pub enum Link {
    Connecting,
    Live,
    Down { error: String, retry_at: DateTime<Utc> },
}

/// (unix seconds, value), oldest first, bounded.
#[derive(Clone, Debug, Default)]
pub struct Trace(pub VecDeque<(u64, f64)>);

impl Trace {
    pub fn push(&mut self, at: u64, v: f64) {
        if self.0.back().is_some_and(|(t, _)| *t == at) {
            self.0.pop_back();
        }
        if self.0.len() == TRACE_POINTS {
            self.0.pop_front();
        }
        self.0.push_back((at, v));
    }

    pub fn last(&self) -> Option<f64> {
        self.0.back().map(|(_, v)| *v)
    }

    /// Mean and standard deviation of the values of the last `n` points.
    pub fn spread(&self, n: usize) -> Option<(f64, f64)> {
        let vals: Vec<f64> = self.0.iter().rev().take(n).map(|(_, v)| *v).collect();
        if vals.len() < 3 {
            return None;
        }
        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (vals.len() - 1) as f64;
        Some((mean, var.sqrt()))
    }
}

/// What the console saw of one session over time.
#[derive(Clone, Debug, Default)]
pub struct SessionTrace {
    pub receive_bps: Trace,
    /// Mean of the streams' round trips.
    pub rtt_ms: Trace,
}

impl SessionTrace {
    pub fn observe(&mut self, at: u64, s: &SessionInfo) {
        self.receive_bps.push(at, s.rate_bps);
        let rtts: Vec<f64> = s.streams.iter().filter_map(|st| st.rtt_ms).collect();
        if !rtts.is_empty() {
            self.rtt_ms.push(at, rtts.iter().sum::<f64>() / rtts.len() as f64);
        }
    }
}

/// Everything the console holds.
#[derive(Debug, Default)]
pub struct Data {
    pub kind: Option<DaemonKind>,
    pub snapshot: Snapshot,
    /// When the last snapshot arrived.
    pub snapshot_at: Option<DateTime<Utc>>,
    pub events: VecDeque<Event>,
    pub last_seq: u64,
    pub history: Vec<HistoryRecord>,
    pub archives: Vec<ArchiveInfo>,
    /// The daemon's fleet series (backfilled), then extended from snapshots.
    pub series: BTreeMap<String, Trace>,
    pub traces: HashMap<String, SessionTrace>,
    /// Lines of the watch stream this console could not read.
    pub unreadable: u64,
    pub last_unreadable: Option<String>,
}

impl Data {
    pub fn sessions(&self) -> &[SessionInfo] {
        match &self.snapshot {
            Snapshot::Server { sessions, .. } => sessions,
            _ => &[],
        }
    }

    pub fn agents(&self) -> &[AgentInfo] {
        match &self.snapshot {
            Snapshot::Server { agents, .. } => agents,
            _ => &[],
        }
    }

    pub fn agent_status(&self) -> Option<&AgentStatus> {
        match &self.snapshot {
            Snapshot::Agent { status } => Some(status),
            _ => None,
        }
    }

    pub fn server_status(&self) -> Option<&ServerStatus> {
        match &self.snapshot {
            Snapshot::Server { status, .. } => Some(status),
            _ => None,
        }
    }

    /// Adds an event unless it was seen (backfill and the live stream overlap).
    pub fn add_event(&mut self, e: Event) {
        if e.seq <= self.last_seq {
            return;
        }
        self.last_seq = e.seq;
        if self.events.len() == EVENT_CAP {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    /// Takes the daemon's series: fleet ones by name, `session/<id>/<what>` into
    /// that session's trace.
    pub fn backfill(&mut self, series: Vec<Series>) {
        for s in series {
            let trace = match s.name.strip_prefix("session/").and_then(|r| r.split_once('/')) {
                Some((id, "receive_bps")) => &mut self.traces.entry(id.to_string()).or_default().receive_bps,
                Some((id, "rtt_ms")) => &mut self.traces.entry(id.to_string()).or_default().rtt_ms,
                Some(_) => continue,
                None => self.series.entry(s.name).or_default(),
            };
            for (t, v) in s.points {
                if trace.0.back().is_none_or(|(last, _)| t > *last) {
                    trace.push(t, v);
                }
            }
        }
    }

    /// Takes a new snapshot and extends the traces from it.
    pub fn observe(&mut self, snapshot: Snapshot, now: DateTime<Utc>) {
        let at = now.timestamp().max(0) as u64;
        match &snapshot {
            Snapshot::Server { sessions, agents, .. } => {
                let total: f64 = sessions.iter().map(|s| s.rate_bps).sum();
                self.series.entry("receive_bps".into()).or_default().push(at, total);
                self.series.entry("sessions".into()).or_default().push(at, sessions.len() as f64);
                let connected = agents.iter().filter(|a| a.connected).count();
                self.series.entry("agents_connected".into()).or_default().push(at, connected as f64);
                for s in sessions {
                    self.traces.entry(s.id.clone()).or_default().observe(at, s);
                }
                self.traces.retain(|id, _| sessions.iter().any(|s| s.id == *id));
            }
            Snapshot::Agent { status } => {
                let read: f64 = status.running.iter().map(|r| r.read_bps).sum();
                let sent: f64 = status.running.iter().map(|r| r.acked_bps).sum();
                self.series.entry("read_bps".into()).or_default().push(at, read);
                self.series.entry("sent_bps".into()).or_default().push(at, sent);
            }
            Snapshot::Nothing => {}
        }
        self.snapshot = snapshot;
        self.snapshot_at = Some(now);
    }
}
