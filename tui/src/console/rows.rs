//! The rows each table shows, derived from the model: filtered, sorted, and in
//! the order the selection indexes. One place, used by the views to draw and by
//! `update` to know what the selection points at.

use chrono::{DateTime, Utc};
use nbackup_protocol::admin::{
    AgentInfo, ArchiveInfo, EntryFreshness, EntryStatus, Event, Freshness, HistoryRecord, Level, RunningBackup,
    SessionInfo,
};
use regex::Regex;

use super::model::Data;

/// How a table is ordered: an index into its tab's sort columns (`SESSION_SORTS`, …), and the direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Order {
    pub column: usize,
    pub reverse: bool,
}

/// A regex search over the log views, `!` first to invert.
#[derive(Clone, Debug)]
pub struct Search {
    pub text: String,
    pub regex: Regex,
    pub invert: bool,
}

impl Search {
    pub fn parse(input: &str) -> Result<Search, String> {
        let (invert, pattern) = match input.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, input),
        };
        let regex = regex::RegexBuilder::new(pattern)
            .case_insensitive(true)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Search { text: input.to_string(), regex, invert })
    }

    /// Whether a row whose text is these fields stays: a match in any of them.
    pub fn keeps(&self, fields: &[&str]) -> bool {
        fields.iter().any(|f| self.regex.is_match(f)) != self.invert
    }
}

/// Filters of the history and events views.
#[derive(Clone, Debug, Default)]
pub struct LogFilter {
    /// At least this level.
    pub level: Option<Level>,
    pub agent: Option<String>,
    /// An entry (backup) name.
    pub entry: Option<String>,
    pub search: Option<Search>,
}

impl LogFilter {
    pub fn is_empty(&self) -> bool {
        self.level.is_none() && self.agent.is_none() && self.entry.is_none() && self.search.is_none()
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(l) = self.level {
            parts.push(format!("level ≥ {}", l.as_str()));
        }
        if let Some(a) = &self.agent {
            parts.push(format!("agent {a}"));
        }
        if let Some(e) = &self.entry {
            parts.push(format!("entry {e}"));
        }
        if let Some(s) = &self.search {
            parts.push(format!("/{}", s.text));
        }
        parts.join(" · ")
    }
}

pub const SESSION_SORTS: &[&str] = &["started", "agent", "backup", "phase", "received", "rate"];
pub const ENTRY_SORTS: &[&str] = &["freshness", "agent", "entry", "next run", "last result"];
pub const ARCHIVE_SORTS: &[&str] = &["time", "agent", "backup", "size"];
pub const HISTORY_SORTS: &[&str] = &["finished", "agent", "backup", "outcome", "size"];
pub const EVENT_SORTS: &[&str] = &["time", "level", "kind", "agent"];

fn ordered<T>(mut rows: Vec<T>, order: Order, cmp: impl Fn(&T, &T, usize) -> std::cmp::Ordering) -> Vec<T> {
    rows.sort_by(|a, b| cmp(a, b, order.column));
    if order.reverse {
        rows.reverse();
    }
    rows
}

pub fn sessions(data: &Data, order: Order) -> Vec<&SessionInfo> {
    ordered(data.sessions().iter().collect(), order, |a, b, c| match c {
        1 => a.agent.cmp(&b.agent),
        2 => a.backup.cmp(&b.backup),
        3 => a.phase.cmp(&b.phase),
        4 => b.bytes_received.cmp(&a.bytes_received),
        5 => b.rate_bps.total_cmp(&a.rate_bps),
        _ => a.started.cmp(&b.started),
    })
}

/// An agent daemon's running backups.
pub fn runs(data: &Data) -> Vec<&RunningBackup> {
    data.agent_status().map(|s| s.running.iter().collect()).unwrap_or_default()
}

/// How urgent a freshness state is: late first.
pub fn severity(f: Freshness) -> u8 {
    match f {
        Freshness::Missed => 0,
        Freshness::Overdue => 1,
        Freshness::Unknown => 2,
        Freshness::Running => 3,
        Freshness::Never => 4,
        Freshness::Fresh => 5,
        Freshness::Unscheduled => 6,
    }
}

/// One entry of one agent (the agent daemon's own entries have no agent).
#[derive(Clone, Copy, Debug)]
pub struct EntryRow<'a> {
    pub agent: Option<&'a AgentInfo>,
    pub entry: &'a EntryStatus,
}

impl EntryRow<'_> {
    pub fn freshness(&self) -> &EntryFreshness {
        &self.entry.freshness
    }

    pub fn agent_name(&self) -> &str {
        self.agent.map_or("", |a| a.name.as_str())
    }
}

pub fn entries(data: &Data, order: Order) -> Vec<EntryRow<'_>> {
    let rows: Vec<EntryRow<'_>> = match data.agent_status() {
        Some(s) => s.entries.iter().map(|entry| EntryRow { agent: None, entry }).collect(),
        None => data
            .agents()
            .iter()
            .flat_map(|a| a.entries.iter().map(move |entry| EntryRow { agent: Some(a), entry }))
            .collect(),
    };
    ordered(rows, order, |a, b, c| match c {
        1 => a.agent_name().cmp(b.agent_name()).then(a.entry.name.cmp(&b.entry.name)),
        2 => a.entry.name.cmp(&b.entry.name),
        3 => a.entry.next_run.cmp(&b.entry.next_run),
        4 => a.entry.last.as_ref().map(|l| l.ok).cmp(&b.entry.last.as_ref().map(|l| l.ok)),
        _ => severity(a.freshness().state)
            .cmp(&severity(b.freshness().state))
            .then(b.freshness().missed_runs.cmp(&a.freshness().missed_runs))
            .then(b.freshness().age_secs.cmp(&a.freshness().age_secs))
            .then(a.agent_name().cmp(b.agent_name()))
            .then(a.entry.name.cmp(&b.entry.name)),
    })
}

pub fn archives(data: &Data, order: Order) -> Vec<&ArchiveInfo> {
    ordered(data.archives.iter().collect(), order, |a, b, c| match c {
        1 => a.agent.cmp(&b.agent).then(b.stamp.cmp(&a.stamp)),
        2 => a.backup.cmp(&b.backup).then(b.stamp.cmp(&a.stamp)),
        3 => b.size.cmp(&a.size),
        _ => b.stamp.cmp(&a.stamp),
    })
}

pub fn history<'a>(data: &'a Data, filter: &LogFilter, order: Order) -> Vec<&'a HistoryRecord> {
    let rows = data
        .history
        .iter()
        .filter(|h| filter.level.is_none_or(|l| h.outcome.level() >= l))
        .filter(|h| filter.agent.as_ref().is_none_or(|a| h.agent == *a))
        .filter(|h| filter.entry.as_ref().is_none_or(|e| h.backup == *e))
        .filter(|h| {
            filter.search.as_ref().is_none_or(|s| {
                s.keeps(&[
                    &h.agent,
                    &h.backup,
                    h.outcome.as_str(),
                    h.archive.as_deref().unwrap_or(""),
                    h.reason.as_deref().unwrap_or(""),
                    &h.message,
                ])
            })
        })
        .collect();
    ordered(rows, order, |a, b, c| match c {
        1 => a.agent.cmp(&b.agent).then(b.finished.cmp(&a.finished)),
        2 => a.backup.cmp(&b.backup).then(b.finished.cmp(&a.finished)),
        3 => a.outcome.cmp(&b.outcome).then(b.finished.cmp(&a.finished)),
        4 => b.bytes.cmp(&a.bytes),
        _ => b.finished.cmp(&a.finished),
    })
}

/// Events, newest last in time order (so following shows the bottom).
pub fn events<'a>(data: &'a Data, filter: &LogFilter, order: Order) -> Vec<&'a Event> {
    let rows = data
        .events
        .iter()
        .filter(|e| filter.level.is_none_or(|l| e.kind.level() >= l))
        .filter(|e| filter.agent.as_ref().is_none_or(|a| e.agent.as_ref() == Some(a)))
        .filter(|e| filter.entry.as_ref().is_none_or(|b| e.backup.as_ref() == Some(b)))
        .filter(|e| {
            filter.search.as_ref().is_none_or(|s| {
                s.keeps(&[
                    e.kind.as_str(),
                    e.agent.as_deref().unwrap_or(""),
                    e.backup.as_deref().unwrap_or(""),
                    &e.message,
                ])
            })
        })
        .collect();
    if order.column == 0 && !order.reverse {
        return rows;
    }
    ordered(rows, order, |a, b, c| match c {
        1 => b.kind.level().cmp(&a.kind.level()).then(a.seq.cmp(&b.seq)),
        2 => a.kind.cmp(&b.kind).then(a.seq.cmp(&b.seq)),
        3 => a.agent.cmp(&b.agent).then(a.seq.cmp(&b.seq)),
        _ => a.seq.cmp(&b.seq),
    })
}

/// An honest time left: the compressed bytes still to come (projected from the
/// compression ratio so far, exact once the source is read) over the receive
/// rate's spread in the last 30 s — a range — or how long nothing has moved.
#[derive(Clone, Debug, PartialEq)]
pub enum Eta {
    Unknown,
    Stalled(u64),
    Range { low: u64, high: u64 },
    Done,
}

pub fn eta(s: &SessionInfo, receive_bps: &super::model::Trace) -> Eta {
    if s.idle_secs >= 5.0 {
        return Eta::Stalled(s.idle_secs as u64);
    }
    let (Some(run), Some(total)) = (s.agent_run.as_ref(), s.estimate_bytes) else { return Eta::Unknown };
    if run.bytes_read == 0 {
        return Eta::Unknown;
    }
    let projected = if run.bytes_read >= total {
        run.bytes_compressed as f64
    } else {
        run.bytes_compressed as f64 * total as f64 / run.bytes_read as f64
    };
    let left = projected - s.bytes_received as f64;
    if left <= 0.0 {
        return Eta::Done;
    }
    let Some((mean, sd)) = receive_bps.spread(30) else {
        return s.eta_secs.map_or(Eta::Unknown, |e| Eta::Range { low: e as u64, high: e as u64 });
    };
    if mean <= 0.0 {
        return Eta::Unknown;
    }
    let fast = mean + sd;
    let slow = (mean - sd).max(mean / 4.0);
    Eta::Range { low: (left / fast) as u64, high: (left / slow) as u64 }
}

/// Where the time of a session went: the agent's archive thread and the server's
/// disk. Shares of elapsed time, with the largest named.
#[derive(Clone, Debug, PartialEq)]
pub struct Bottleneck {
    pub read: f64,
    pub compress: f64,
    pub network: f64,
    pub disk: f64,
    pub verdict: &'static str,
}

pub fn bottleneck(s: &SessionInfo, now: DateTime<Utc>) -> Option<Bottleneck> {
    let stages = s.agent_run.as_ref()?.stages?;
    if stages.elapsed_secs <= 0.0 {
        return None;
    }
    let e = stages.elapsed_secs;
    let server_elapsed = super::fmt::age(&s.started, now).map_or(e, |a| (a as f64).max(1.0));
    let b = Bottleneck {
        read: stages.read_secs / e,
        compress: stages.compress_secs() / e,
        network: stages.network_secs / e,
        disk: s.disk_write_secs / server_elapsed,
        verdict: "",
    };
    let verdict = if b.network >= b.read.max(b.compress) {
        if b.disk >= 0.5 { "server disk-bound" } else { "network-bound" }
    } else if b.read >= b.compress {
        "source-read-bound"
    } else {
        "compression-bound"
    };
    Some(Bottleneck { verdict, ..b })
}
