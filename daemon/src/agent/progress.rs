//! Live counters of one backup run, written by the pipeline threads and read by
//! whoever displays progress (the CLI's progress bar, later the admin API).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};

use super::autoscale::ScalerEvent;

#[derive(Debug, Default)]
pub struct Progress {
    /// Streams in use now.
    pub streams: AtomicU16,
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
}

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
        for c in [&self.bytes_read, &self.entries, &self.bytes_compressed, &self.bytes_acked] {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// The autoscaler's recorded decisions (every interval, holds included).
    pub fn scaler_events(&self) -> Vec<ScalerEvent> {
        self.scaler.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
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
