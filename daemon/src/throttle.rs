//! Bandwidth limits: one token bucket shared by every connection it governs (all
//! streams of a backup on the agent; all uploads to one bucket on the server).
//!
//! Streams take tokens for every slice of a chunk they send (64 KiB at a time, see
//! [`SLICE`]), so the limit holds for the aggregate of all connections and bursts
//! last at most a tenth of a second's worth of the rate. The rate can change with the
//! time of day (`bandwidth_schedule`); it is re-read once a second.
//!
//! Time comes from `tokio::time`, so tests can pause it.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use nbackup_protocol::config::Bandwidth;

/// Bytes sent per token request: small enough to keep bursts short at the lowest
/// rate (64 KiB/s), large enough to cost nothing at high rates.
pub const SLICE: usize = 64 * 1024;

/// How often the schedule is consulted.
const RECHECK: Duration = Duration::from_secs(1);

pub struct Throttle {
    policy: Bandwidth,
    /// Minute of the local day, for the schedule; replaceable in tests.
    clock: Box<dyn Fn() -> u16 + Send + Sync>,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    /// Bytes per second now in force; `None` is unlimited.
    rate: Option<u64>,
    tokens: f64,
    last: Instant,
    checked: Instant,
}

fn local_minute() -> u16 {
    use chrono::Timelike;
    let now = chrono::Local::now();
    (now.hour() * 60 + now.minute()) as u16
}

impl Throttle {
    pub fn new(policy: Bandwidth) -> Self {
        Self::with_clock(policy, Box::new(local_minute))
    }

    pub fn with_clock(policy: Bandwidth, clock: Box<dyn Fn() -> u16 + Send + Sync>) -> Self {
        let now = Instant::now();
        let rate = policy.rate_at(clock());
        Throttle { policy, clock, bucket: Mutex::new(Bucket { rate, tokens: 0.0, last: now, checked: now }) }
    }

    /// Whether this throttle can ever limit anything.
    pub fn is_unlimited(&self) -> bool {
        self.policy.is_unlimited()
    }

    /// The limit now in force, bytes per second.
    pub fn current_rate(&self) -> Option<u64> {
        self.bucket.lock().unwrap_or_else(std::sync::PoisonError::into_inner).rate
    }

    /// Waits until `bytes` may be sent.
    pub async fn acquire(&self, bytes: usize) {
        let need = bytes as f64;
        loop {
            let wait = {
                let mut b = self.bucket.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = Instant::now();
                if now.duration_since(b.checked) >= RECHECK {
                    b.checked = now;
                    b.rate = self.policy.rate_at((self.clock)());
                }
                let Some(rate) = b.rate else {
                    b.last = now;
                    return;
                };
                let rate = rate as f64;
                // Burst allowance: a tenth of a second, but at least one slice.
                let capacity = (rate / 10.0).max(SLICE as f64);
                b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(capacity);
                b.last = now;
                if b.tokens >= need.min(capacity) {
                    b.tokens -= need;
                    return;
                }
                Duration::from_secs_f64((need.min(capacity) - b.tokens) / rate)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU16, Ordering};

    fn limited(rate: u64) -> Bandwidth {
        Bandwidth { default: Some(rate), windows: Vec::new() }
    }

    #[tokio::test(start_paused = true)]
    async fn the_average_rate_stays_within_one_percent_of_the_limit() {
        let t = Throttle::new(limited(1 << 20));
        let start = Instant::now();
        let mut sent = 0usize;
        while sent < 60 << 20 {
            t.acquire(SLICE).await;
            sent += SLICE;
        }
        let secs = start.elapsed().as_secs_f64();
        let rate = sent as f64 / secs;
        assert!((rate / f64::from(1 << 20) - 1.0).abs() < 0.01, "{rate} B/s over {secs} s");
    }

    #[tokio::test(start_paused = true)]
    async fn streams_share_one_budget() {
        let t = Arc::new(Throttle::new(limited(4 << 20)));
        let start = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                tokio::spawn(async move {
                    for _ in 0..(16 << 20) / SLICE {
                        t.acquire(SLICE).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        // 4 × 16 MiB at 4 MiB/s: 16 s, not 4 s.
        let secs = start.elapsed().as_secs_f64();
        assert!((secs - 16.0).abs() < 0.5, "{secs} s");
    }

    #[tokio::test(start_paused = true)]
    async fn bursts_are_bounded_by_a_tenth_of_a_second() {
        let t = Throttle::new(limited(10 << 20));
        tokio::time::sleep(Duration::from_secs(60)).await;
        // After a long idle period only ~1 MiB (0.1 s) may go at once.
        let start = Instant::now();
        let mut sent = 0;
        while start.elapsed().is_zero() {
            t.acquire(SLICE).await;
            sent += SLICE;
        }
        assert!(sent <= (1 << 20) + 2 * SLICE, "burst of {sent} bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn the_schedule_changes_the_rate_with_the_time_of_day() {
        let minute = Arc::new(AtomicU16::new(7 * 60));
        let m = minute.clone();
        let policy = Bandwidth { default: None, windows: vec![(8 * 60, 18 * 60, 1 << 20)] };
        let t = Throttle::with_clock(policy, Box::new(move || m.load(Ordering::Relaxed)));
        assert_eq!(t.current_rate(), None);
        let start = Instant::now();
        for _ in 0..1000 {
            t.acquire(SLICE).await;
        }
        assert!(start.elapsed() < Duration::from_millis(1), "unlimited outside the window");
        minute.store(9 * 60, Ordering::Relaxed);
        tokio::time::sleep(RECHECK).await;
        let start = Instant::now();
        for _ in 0..(8 << 20) / SLICE {
            t.acquire(SLICE).await;
        }
        assert_eq!(t.current_rate(), Some(1 << 20));
        let secs = start.elapsed().as_secs_f64();
        assert!((secs - 8.0).abs() < 0.3, "{secs} s inside the window");
    }
}
