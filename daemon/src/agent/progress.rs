//! Live counters of one backup run, written by the pipeline threads and read by
//! whoever displays progress (the CLI's progress bar, later the admin API).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nbackup_protocol::admin::{AgentStreamInfo, Stages};

use super::autoscale::ScalerEvent;
use crate::state::RateMeter;

#[derive(Debug, Default)]
pub struct Progress {
    /// Streams in use now.
    pub streams: AtomicU16,
    /// The attempt running now (1-based), set by the attempt loop.
    pub attempt: std::sync::atomic::AtomicU32,
    /// The autoscaler's decisions with the numbers behind them (newest last, bounded).
    pub scaler: Mutex<Vec<ScalerEvent>>,
    /// Bytes of file content read from the sources.
    pub bytes_read: AtomicU64,
    /// Archive members written.
    pub entries: AtomicU64,
    /// Compressed bytes produced.
    pub bytes_compressed: AtomicU64,
    /// Compressed bytes acknowledged by the server.
    pub bytes_acked: AtomicU64,
    /// From the pre-scan, if one ran: bytes and entries expected.
    pub estimate_bytes: AtomicU64,
    pub estimate_entries: AtomicU64,
    pub estimate_done: AtomicBool,
    /// The server session in use (hex), once one is open.
    pub session: Mutex<Option<String>>,
    /// Every stream opened in this session, by index.
    pub stream_table: Mutex<BTreeMap<u16, AgentStreamInfo>>,
    /// Nanoseconds the archive thread spent inside reads of source files.
    pub read_nanos: AtomicU64,
    /// Nanoseconds the archive thread was blocked on a full send window.
    pub network_nanos: AtomicU64,
    /// When the archive thread started and, once it did, ended.
    producer: Mutex<(Option<Instant>, Option<Instant>)>,
    read_rate: RateMeter,
    acked_rate: RateMeter,
}

use crate::lock;

impl Progress {
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
            bytes_compressed: self.bytes_compressed.load(Ordering::Relaxed),
            bytes_acked: self.bytes_acked.load(Ordering::Relaxed),
            estimate: self
                .estimate_done
                .load(Ordering::Acquire)
                .then(|| (self.estimate_bytes.load(Ordering::Relaxed), self.estimate_entries.load(Ordering::Relaxed))),
        }
    }

    /// Starts the counters over, when a backup restarts with a fresh session (the
    /// estimate stays valid).
    pub fn reset(&self) {
        for c in [
            &self.bytes_read,
            &self.entries,
            &self.bytes_compressed,
            &self.bytes_acked,
            &self.read_nanos,
            &self.network_nanos,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        *lock(&self.session) = None;
        lock(&self.stream_table).clear();
        self.read_rate.reset();
        self.acked_rate.reset();
    }

    /// Marks the archive thread's start (`true`) or end.
    pub fn producer_running(&self, running: bool) {
        let mut p = lock(&self.producer);
        if running {
            *p = (Some(Instant::now()), None);
        } else {
            p.1 = Some(Instant::now());
        }
    }

    /// Where the archive thread's time went so far.
    pub fn stages(&self) -> Stages {
        let (started, ended) = *lock(&self.producer);
        let now = Instant::now();
        let elapsed = started.map_or(Duration::ZERO, |s| now.duration_since(s));
        // Once the archive is all produced, what is left of the run is the network
        // (and the server) draining the send window.
        let draining = ended.map_or(Duration::ZERO, |e| now.duration_since(e));
        let secs = |n: &AtomicU64| n.load(Ordering::Relaxed) as f64 / 1e9;
        Stages {
            elapsed_secs: elapsed.as_secs_f64(),
            read_secs: secs(&self.read_nanos),
            network_secs: secs(&self.network_nanos) + draining.as_secs_f64(),
        }
    }

    pub fn set_session(&self, session: String) {
        *lock(&self.session) = Some(session);
    }

    pub fn session(&self) -> Option<String> {
        lock(&self.session).clone()
    }

    /// The autoscaler's log, to append to.
    pub fn scaler_log(&self) -> std::sync::MutexGuard<'_, Vec<ScalerEvent>> {
        lock(&self.scaler)
    }

    /// Changes stream `stream`'s row (creating it).
    pub fn update_stream(&self, stream: u16, f: impl FnOnce(&mut AgentStreamInfo)) {
        let mut table = lock(&self.stream_table);
        f(table.entry(stream).or_insert_with(|| AgentStreamInfo { stream, ..Default::default() }));
    }

    pub fn streams(&self) -> Vec<AgentStreamInfo> {
        lock(&self.stream_table).values().cloned().collect()
    }

    /// Folds the bytes read and acknowledged since the last call into the smoothed
    /// rates. Call about once a second.
    pub fn sample_rates(&self) {
        self.read_rate.sample(self.bytes_read.load(Ordering::Relaxed));
        self.acked_rate.sample(self.bytes_acked.load(Ordering::Relaxed));
    }

    /// Source bytes read per second, smoothed.
    pub fn read_rate(&self) -> f64 {
        self.read_rate.rate()
    }

    /// Compressed bytes acknowledged per second, smoothed.
    pub fn acked_rate(&self) -> f64 {
        self.acked_rate.rate()
    }

    /// Time until the last byte is acknowledged at the current rate, once the
    /// pre-scan knows the total: the compressed size is projected from the ratio so
    /// far, and is exact once everything is read.
    pub fn eta(&self) -> Option<Duration> {
        let snap = self.snapshot();
        let (total, _) = snap.estimate?;
        let rate = self.acked_rate();
        if rate <= 0.0 || snap.bytes_read == 0 {
            return None;
        }
        let total = total.max(snap.bytes_read);
        let projected = snap.bytes_compressed as f64 * total as f64 / snap.bytes_read as f64;
        let left = (projected - snap.bytes_acked as f64).max(0.0);
        Some(Duration::from_secs_f64(left / rate))
    }

    /// The autoscaler's recorded decisions (every interval, holds included).
    pub fn scaler_events(&self) -> Vec<ScalerEvent> {
        lock(&self.scaler).clone()
    }

    pub fn set_estimate(&self, entries: u64, bytes: u64) {
        self.estimate_bytes.store(bytes, Ordering::Relaxed);
        self.estimate_entries.store(entries, Ordering::Relaxed);
        self.estimate_done.store(true, Ordering::Release);
    }
}

/// A consistent-enough copy of [`Progress`] for display.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgressSnapshot {
    pub bytes_read: u64,
    pub entries: u64,
    pub bytes_compressed: u64,
    pub bytes_acked: u64,
    /// `(bytes, entries)` expected, once the pre-scan finished.
    pub estimate: Option<(u64, u64)>,
}
