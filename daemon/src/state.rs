//! What the daemons remember: an event log and (on the server) the session history,
//! as JSON lines under `state_dir`, plus short in-memory time series for charts.
//!
//! Each log is capped: past [`LOG_CAP`] bytes the file is renamed to `<name>.1`
//! (replacing the previous one) and a new one begins, so at most twice the cap is
//! kept. Appends are single small writes; readers get the recent tail from memory.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;

use nbackup_protocol::admin::{Actor, Event, EventKind, HistoryRecord, Series};

/// Size at which a log file is rotated.
pub const LOG_CAP: u64 = 8 << 20;

/// Entries kept in memory for quick answers.
const RECENT: usize = 1000;

use crate::lock;

/// An append-only JSON-lines file with a size cap.
pub struct JsonlLog {
    path: PathBuf,
    cap: u64,
    file: Mutex<Option<(File, u64)>>,
}

impl JsonlLog {
    pub fn open(path: PathBuf, cap: u64) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        Ok(JsonlLog { path, cap, file: Mutex::new(None) })
    }

    fn rotated(&self) -> PathBuf {
        let mut p = self.path.as_os_str().to_owned();
        p.push(".1");
        PathBuf::from(p)
    }

    pub fn append<T: Serialize>(&self, item: &T) -> io::Result<()> {
        let mut line = serde_json::to_string(item).map_err(io::Error::other)?;
        line.push('\n');
        let mut slot = lock(&self.file);
        if slot.is_none() {
            let f = OpenOptions::new().create(true).append(true).open(&self.path)?;
            let len = f.metadata()?.len();
            *slot = Some((f, len));
        }
        if let Some((_, len)) = slot.as_ref()
            && *len + line.len() as u64 > self.cap
        {
            *slot = None;
            fs::rename(&self.path, self.rotated())?;
            let f = OpenOptions::new().create(true).append(true).open(&self.path)?;
            *slot = Some((f, 0));
        }
        let (f, len) = slot.as_mut().expect("opened above");
        f.write_all(line.as_bytes())?;
        *len += line.len() as u64;
        Ok(())
    }

    /// Every readable entry, oldest first (the rotated file, then the current one).
    /// Lines that do not parse — a torn last write — are skipped.
    pub fn read_all<T: DeserializeOwned>(&self) -> Vec<T> {
        let mut out = Vec::new();
        for path in [self.rotated(), self.path.clone()] {
            let Ok(f) = File::open(&path) else { continue };
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                if let Ok(item) = serde_json::from_str(&line) {
                    out.push(item);
                }
            }
        }
        out
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The event log: numbered events, persisted, kept in memory and broadcast to
/// watchers (`/v1/watch`).
pub struct Events {
    log: Option<JsonlLog>,
    recent: Mutex<VecDeque<Event>>,
    next: AtomicU64,
    tx: broadcast::Sender<Event>,
}

/// What happened, to whom.
#[derive(Default)]
pub struct EventSpec<'a> {
    pub agent: Option<&'a str>,
    pub backup: Option<&'a str>,
    pub session: Option<&'a str>,
    /// The operator behind the event, for [`EventKind::Operator`].
    pub actor: Option<Actor>,
    /// `<storage>/<bucket>`, for an event of a whole bucket.
    pub bucket: Option<&'a str>,
}

impl Events {
    /// Opens `<state_dir>/<name>` and continues its numbering; `None` keeps events in
    /// memory only.
    pub fn open(state_dir: Option<&Path>, name: &str) -> io::Result<Self> {
        let log = state_dir.map(|d| JsonlLog::open(d.join(name), LOG_CAP)).transpose()?;
        let past: Vec<Event> = log.as_ref().map(|l| l.read_all()).unwrap_or_default();
        let next = past.last().map_or(1, |e| e.seq + 1);
        let recent: VecDeque<Event> = past.into_iter().rev().take(RECENT).rev().collect();
        let (tx, _) = broadcast::channel(256);
        Ok(Events { log, recent: Mutex::new(recent), next: AtomicU64::new(next), tx })
    }

    pub fn record(&self, kind: EventKind, who: EventSpec<'_>, message: impl Into<String>) -> Event {
        let event = Event {
            seq: self.next.fetch_add(1, Ordering::Relaxed),
            time: now_rfc3339(),
            kind,
            agent: who.agent.map(str::to_string),
            backup: who.backup.map(str::to_string),
            session: who.session.map(str::to_string),
            actor: who.actor,
            bucket: who.bucket.map(str::to_string),
            message: message.into(),
        };
        if let Some(log) = &self.log
            && let Err(e) = log.append(&event)
        {
            tracing::warn!("cannot write the event log: {e}");
        }
        {
            let mut recent = lock(&self.recent);
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        let _ = self.tx.send(event.clone());
        event
    }

    /// Events with a number above `since`, oldest first, at most `limit`.
    pub fn since(&self, since: u64, limit: usize) -> Vec<Event> {
        let recent = lock(&self.recent);
        // Memory holds everything asked for when its oldest event is at most `since + 1`.
        let from_memory = recent.front().is_none_or(|e| e.seq <= since + 1);
        if from_memory || self.log.is_none() {
            return recent.iter().filter(|e| e.seq > since).take(limit).cloned().collect();
        }
        drop(recent);
        self.log
            .as_ref()
            .map(|l| l.read_all::<Event>().into_iter().filter(|e| e.seq > since).take(limit).collect())
            .unwrap_or_default()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

/// Terminal states of sessions (server).
pub struct History {
    log: Option<JsonlLog>,
    recent: Mutex<VecDeque<HistoryRecord>>,
}

impl History {
    pub fn open(state_dir: Option<&Path>, name: &str) -> io::Result<Self> {
        let log = state_dir.map(|d| JsonlLog::open(d.join(name), LOG_CAP)).transpose()?;
        let past: Vec<HistoryRecord> = log.as_ref().map(|l| l.read_all()).unwrap_or_default();
        let recent = past.into_iter().rev().take(RECENT).rev().collect();
        Ok(History { log, recent: Mutex::new(recent) })
    }

    pub fn record(&self, r: HistoryRecord) {
        if let Some(log) = &self.log
            && let Err(e) = log.append(&r)
        {
            tracing::warn!("cannot write the history: {e}");
        }
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(r);
    }

    /// Newest first, at most `limit`, optionally for one agent.
    pub fn list(&self, agent: Option<&str>, limit: usize) -> Vec<HistoryRecord> {
        lock(&self.recent).iter().rev().filter(|r| agent.is_none_or(|a| r.agent == a)).take(limit).cloned().collect()
    }
}

/// (unix seconds, value), oldest first.
type Points = VecDeque<(u64, f64)>;

/// A few minutes of one-second samples per named series, for charts in a console
/// that connects late.
pub struct Timeline {
    capacity: usize,
    series: Mutex<Vec<(String, Points)>>,
}

impl Timeline {
    /// Five minutes at one sample a second.
    pub const DEFAULT_POINTS: usize = 300;

    pub fn new(capacity: usize) -> Self {
        Timeline { capacity, series: Mutex::new(Vec::new()) }
    }

    pub fn push(&self, name: &str, unix_secs: u64, value: f64) {
        let mut all = lock(&self.series);
        let idx = match all.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                all.push((name.to_string(), VecDeque::new()));
                all.len() - 1
            }
        };
        let points = &mut all[idx].1;
        if points.back().is_some_and(|(t, _)| *t == unix_secs) {
            points.pop_back();
        }
        if points.len() == self.capacity {
            points.pop_front();
        }
        points.push_back((unix_secs, value));
    }

    /// Keeps only the series whose names pass `keep`.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        lock(&self.series).retain(|(name, _)| keep(name));
    }

    pub fn snapshot(&self) -> Vec<Series> {
        lock(&self.series)
            .iter()
            .map(|(name, points)| Series { name: name.clone(), points: points.iter().copied().collect() })
            .collect()
    }
}

/// The host's 1-minute load average.
pub fn load1() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A smoothed rate of a growing counter, sampled about once a second: an EWMA with
/// weight 1/4 per sample, so the last few seconds count and one empty second (a
/// large chunk still in transit) does not read as a stall.
#[derive(Debug, Default)]
pub struct RateMeter {
    inner: Mutex<MeterState>,
}

#[derive(Debug, Default)]
struct MeterState {
    last: Option<(Instant, u64)>,
    bps: f64,
    /// Samples in a row without growth.
    quiet: u32,
}

impl RateMeter {
    pub fn sample(&self, count: u64) {
        self.sample_at(Instant::now(), count);
    }

    fn sample_at(&self, now: Instant, count: u64) {
        let mut m = lock(&self.inner);
        if let Some((at, before)) = m.last {
            let secs = now.duration_since(at).as_secs_f64();
            if secs <= 0.0 {
                return;
            }
            let delta = count.saturating_sub(before);
            let rate = delta as f64 / secs;
            m.bps = if m.bps > 0.0 { m.bps * 0.75 + rate * 0.25 } else { rate };
            m.quiet = if delta == 0 { m.quiet.saturating_add(1) } else { 0 };
        }
        m.last = Some((now, count));
    }

    /// Bytes (or whatever is counted) per second.
    pub fn rate(&self) -> f64 {
        lock(&self.inner).bps
    }

    /// Whether the counter grew within the last few samples.
    pub fn active(&self) -> bool {
        let m = lock(&self.inner);
        m.last.is_some() && m.quiet < 3
    }

    /// Forgets the rate (a stream that closed).
    pub fn stop(&self) {
        let mut m = lock(&self.inner);
        m.bps = 0.0;
        m.quiet = u32::MAX;
    }

    pub fn reset(&self) {
        *lock(&self.inner) = MeterState::default();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_rate_meter_smooths_and_notices_silence() {
        let m = RateMeter::default();
        let t0 = Instant::now();
        m.sample_at(t0, 0);
        assert_eq!(m.rate(), 0.0);
        m.sample_at(t0 + Duration::from_secs(1), 1000);
        assert_eq!(m.rate(), 1000.0, "the first interval seeds the average");
        m.sample_at(t0 + Duration::from_secs(2), 1000);
        assert_eq!(m.rate(), 750.0, "one empty second lowers it by a quarter");
        assert!(m.active());
        m.sample_at(t0 + Duration::from_secs(3), 1000);
        m.sample_at(t0 + Duration::from_secs(4), 1000);
        assert!(!m.active(), "three empty seconds: quiet");
        m.sample_at(t0 + Duration::from_secs(5), 3000);
        assert!(m.active());
        assert_eq!(m.rate(), 421.875 * 0.75 + 2000.0 * 0.25);
        m.stop();
        assert_eq!(m.rate(), 0.0);
        assert!(!m.active());
    }

    #[test]
    fn events_survive_a_restart_and_keep_numbering() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let ev = Events::open(Some(dir.path()), "events.jsonl").expect("open");
            ev.record(EventKind::Started, EventSpec { agent: Some("a"), ..Default::default() }, "one");
            ev.record(EventKind::Committed, EventSpec::default(), "two");
        }
        let ev = Events::open(Some(dir.path()), "events.jsonl").expect("reopen");
        let e = ev.record(EventKind::Started, EventSpec::default(), "three");
        assert_eq!(e.seq, 3);
        let since: Vec<String> = ev.since(1, 10).into_iter().map(|e| e.message).collect();
        assert_eq!(since, ["two", "three"]);
    }

    #[test]
    fn logs_rotate_at_their_cap_and_keep_one_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = JsonlLog::open(dir.path().join("h.jsonl"), 200).expect("open");
        for i in 0..100u32 {
            log.append(&i).expect("append");
        }
        let total: u64 = fs::read_dir(dir.path()).expect("ls").flatten().map(|e| e.metadata().expect("m").len()).sum();
        assert!(total <= 400, "at most twice the cap: {total}");
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 2);
        let kept: Vec<u32> = log.read_all();
        assert_eq!(kept.last(), Some(&99));
        assert!(kept.windows(2).all(|w| w[1] == w[0] + 1), "oldest first, contiguous");
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = JsonlLog::open(dir.path().join("t.jsonl"), LOG_CAP).expect("open");
        log.append(&1u32).expect("append");
        OpenOptions::new()
            .append(true)
            .open(dir.path().join("t.jsonl"))
            .expect("open")
            .write_all(b"{\"tor")
            .expect("torn");
        assert_eq!(log.read_all::<u32>(), vec![1]);
    }

    #[test]
    fn timelines_keep_the_last_points_one_per_second() {
        let t = Timeline::new(3);
        for s in 0..5 {
            t.push("rtt", s, s as f64);
        }
        t.push("rtt", 4, 9.0);
        let s = t.snapshot();
        assert_eq!(s[0].points, vec![(2, 2.0), (3, 3.0), (4, 9.0)]);
    }
}
