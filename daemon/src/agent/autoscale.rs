//! How many streams a backup uses, decided from measurements.
//!
//! Every interval the backup measures the producer (compressed bytes produced per
//! second), the drain (bytes acknowledged per second), how full the window is and the
//! *backlog*: how many seconds of draining the window holds. It asks
//! [`Autoscaler::tick`] what to do:
//!
//! * **Network-bound** (window at least half full, or more than two intervals of data
//!   waiting — which also covers the final drain of a small archive through a slow
//!   link): add streams as a *probe*. After one interval to let them connect,
//!   compare: keep them if throughput rose by at least 5 % (`adaptive`), or if
//!   throughput per stream stayed within 5 % (`efficiency`); otherwise remove them
//!   again and wait longer before the next probe (2, 4, … 32 intervals: exponential
//!   back-off). Like TCP's slow start, a probe that paid off nearly in proportion
//!   doubles the next step (1, 2, 4 … streams); anything less resets it to one.
//! * **Producer-bound** (window under 10 % full and less than half an interval of data
//!   waiting, three intervals in a row): the extra streams idle; remove one.
//! * **Tail** (the producer has finished and little is left): hold.
//! * The gap between the two thresholds, the settle interval and the cooldowns are
//!   the hysteresis that keeps the count from flapping.
//!
//! The function is pure — samples in, decisions out — so tests drive it with
//! synthetic rates; every decision is recorded with the numbers behind it.

use std::collections::VecDeque;

use nbackup_protocol::config::ScaleMode;

/// Minimum gain that justifies keeping a probe stream.
pub const GAIN: f64 = 0.05;
/// Window fill at or above which the network is the bottleneck.
pub const HIGH_FILL: f64 = 0.5;
/// Window fill below which the producer is the bottleneck.
pub const LOW_FILL: f64 = 0.1;
/// Intervals of low fill before a stream is removed.
pub const IDLE_TICKS: u32 = 3;
/// Longest wait between probes, in intervals.
pub const MAX_COOLDOWN: u32 = 32;
/// Share of the bandwidth limit at which the limit, not the streams, sets the pace.
pub const AT_LIMIT: f64 = 0.9;
/// Decisions kept for display.
pub const HISTORY: usize = 600;

/// One measurement interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Compressed bytes produced per second.
    pub produce_bps: f64,
    /// Bytes acknowledged by the server per second.
    pub drain_bps: f64,
    /// Share of the window in use, 0 to 1.
    pub window_fill: f64,
    /// Seconds it would take to drain the window at the current drain rate.
    pub backlog_secs: f64,
    /// Streams in use.
    pub streams: u16,
    /// The producer has finished; only the tail is being sent.
    pub producer_done: bool,
    /// The bandwidth limit in force now, bytes per second, if any.
    pub limit_bps: Option<f64>,
}

pub use nbackup_protocol::admin::{Decision, ScalerEvent, ScalerState};

struct Probe {
    baseline: f64,
    baseline_streams: u16,
    added: u16,
    settling: bool,
}

pub struct Autoscaler {
    mode: ScaleMode,
    interval_secs: f64,
    min: u16,
    max: u16,
    probe: Option<Probe>,
    /// Streams the next probe adds.
    step: u16,
    cooldown: u32,
    backoff: u32,
    idle: u32,
    history: VecDeque<ScalerEvent>,
}

impl Autoscaler {
    pub fn new(mode: ScaleMode, min: u16, max: u16, interval: std::time::Duration) -> Self {
        Autoscaler {
            mode,
            interval_secs: interval.as_secs_f64(),
            min: min.max(1),
            max: max.max(min.max(1)),
            probe: None,
            step: 1,
            cooldown: 0,
            backoff: 0,
            idle: 0,
            history: VecDeque::new(),
        }
    }

    pub fn history(&self) -> impl Iterator<Item = &ScalerEvent> {
        self.history.iter()
    }

    /// Takes one sample, returns what to do, and records it.
    pub fn tick(&mut self, at_ms: u64, s: Sample) -> Decision {
        let (decision, state, reason) = self.decide(&s);
        let event = ScalerEvent {
            at_ms,
            streams: s.streams,
            produce_mbps: s.produce_bps / 1e6,
            drain_mbps: s.drain_bps / 1e6,
            window_fill: s.window_fill,
            efficiency: if s.produce_bps > 0.0 { s.drain_bps / s.produce_bps } else { 0.0 },
            state,
            decision,
            reason,
        };
        if matches!(decision, Decision::Hold) {
            tracing::debug!(
                streams = s.streams,
                drain_mbps = event.drain_mbps,
                produce_mbps = event.produce_mbps,
                window_fill = s.window_fill,
                backlog_secs = s.backlog_secs,
                "autoscaler: {}",
                event.reason
            );
        } else {
            tracing::info!(
                streams = s.streams,
                ?decision,
                drain_mbps = event.drain_mbps,
                produce_mbps = event.produce_mbps,
                window_fill = s.window_fill,
                "autoscaler: {}",
                event.reason
            );
        }
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(event);
        decision
    }

    fn decide(&mut self, s: &Sample) -> (Decision, ScalerState, String) {
        use Decision::*;
        use ScalerState::*;
        let mbps = |b: f64| b / 1e6;
        let network_bound = s.window_fill >= HIGH_FILL || s.backlog_secs >= 2.0 * self.interval_secs;
        if s.producer_done && s.backlog_secs < self.interval_secs {
            self.probe = None;
            return (Hold, Draining, "the producer finished; sending the rest".into());
        }
        if let Some(p) = &mut self.probe {
            if p.settling {
                p.settling = false;
                return (Hold, Probing, format!("letting {} new stream(s) connect", p.added));
            }
            let Probe { baseline, baseline_streams, added, .. } = *p;
            self.probe = None;
            let gain = if baseline > 0.0 { s.drain_bps / baseline - 1.0 } else { 1.0 };
            let keep = match self.mode {
                ScaleMode::Adaptive => gain >= GAIN,
                ScaleMode::Efficiency => {
                    let before = baseline / f64::from(baseline_streams.max(1));
                    let now = s.drain_bps / f64::from(s.streams.max(1));
                    now >= before * (1.0 - GAIN)
                }
            };
            return if keep {
                // Nearly proportional gain: the link has room; double the next step.
                let proportional = f64::from(added) / f64::from(baseline_streams.max(1));
                self.step = if gain >= 0.75 * proportional { added.saturating_mul(2).max(1) } else { 1 };
                self.backoff = 0;
                self.cooldown = 0;
                let why = format!(
                    "kept {added} stream(s), now {}: {:.1} MB/s against {:.1} MB/s with {baseline_streams} ({:+.0} %)",
                    s.streams,
                    mbps(s.drain_bps),
                    mbps(baseline),
                    gain * 100.0
                );
                (Hold, Steady, why)
            } else {
                self.step = 1;
                self.backoff = (self.backoff + 1).min(5);
                self.cooldown = (1u32 << self.backoff).min(MAX_COOLDOWN);
                let why = format!(
                    "{added} more stream(s) did not pay off ({:+.0} %); back to {baseline_streams}, next probe in {} intervals",
                    gain * 100.0,
                    self.cooldown
                );
                (Remove(added), Cooldown, why)
            };
        }
        if self.cooldown > 0 {
            self.cooldown -= 1;
            return (Hold, Cooldown, format!("cooling down ({} intervals left)", self.cooldown));
        }
        if network_bound {
            self.idle = 0;
            if let Some(limit) = s.limit_bps
                && s.drain_bps >= AT_LIMIT * limit
            {
                let why = format!("at the bandwidth limit of {:.1} MB/s: more streams cannot go faster", mbps(limit));
                return (Hold, Steady, why);
            }
            if s.streams < self.max {
                let added = self.step.min(self.max - s.streams).max(1);
                self.probe = Some(Probe { baseline: s.drain_bps, baseline_streams: s.streams, added, settling: true });
                let why = format!(
                    "window {:.0} % full, {:.1} s of data waiting: the network is the bottleneck; probing {} stream(s) more",
                    s.window_fill * 100.0,
                    s.backlog_secs,
                    added
                );
                return (Add(added), Probing, why);
            }
            return (Hold, Steady, format!("network-bound at the maximum of {} streams", self.max));
        }
        if s.window_fill < LOW_FILL && s.backlog_secs < 0.5 * self.interval_secs {
            self.idle += 1;
            if self.idle >= IDLE_TICKS && s.streams > self.min {
                self.idle = 0;
                self.cooldown = 2;
                let why = format!(
                    "window under {:.0} % for {IDLE_TICKS} intervals: the producer is the bottleneck; dropping stream {}",
                    LOW_FILL * 100.0,
                    s.streams
                );
                return (Remove(1), Cooldown, why);
            }
        } else {
            self.idle = 0;
        }
        (Hold, Steady, "balanced".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: std::time::Duration = std::time::Duration::from_secs(1);

    /// A sample whose backlog matches its fill: a 256 MB window drained at `drain`.
    fn sample(drain_mbps: f64, fill: f64, streams: u16) -> Sample {
        Sample {
            produce_bps: 200e6,
            drain_bps: drain_mbps * 1e6,
            window_fill: fill,
            backlog_secs: fill * 256.0 / drain_mbps,
            streams,
            producer_done: false,
            limit_bps: None,
        }
    }

    /// A link where each stream carries `per` MB/s up to `cap` MB/s in total.
    fn link(per: f64, cap: f64, streams: u16) -> Sample {
        let drain = (per * f64::from(streams)).min(cap);
        sample(drain, if drain < 200.0 { 0.9 } else { 0.05 }, streams)
    }

    fn run(scaler: &mut Autoscaler, ticks: u32, per: f64, cap: f64, mut streams: u16) -> u16 {
        for t in 0..ticks {
            match scaler.tick(u64::from(t) * 1000, link(per, cap, streams)) {
                Decision::Add(n) => streams += n,
                Decision::Remove(n) => streams -= n,
                Decision::Hold => {}
            }
        }
        streams
    }

    #[test]
    fn adds_streams_while_each_one_raises_throughput() {
        let mut s = Autoscaler::new(ScaleMode::Adaptive, 1, 8, SEC);
        // 10 MB/s per stream, link capped at 45 MB/s. Slow start: +1 (2), +2 (4),
        // then +4 (8) gains only 12 %: kept (≥ 5 %), step reset, and 8 is the maximum.
        let streams = run(&mut s, 60, 10.0, 45.0, 1);
        assert_eq!(kept(&s), vec![2, 4, 8]);
        assert!((8..=8).contains(&streams), "{streams}");
        let mut s = Autoscaler::new(ScaleMode::Efficiency, 1, 8, SEC);
        // The same link in efficiency mode stops where streams stop pulling their weight.
        run(&mut s, 60, 10.0, 45.0, 1);
        assert_eq!(kept(&s), vec![2, 4]);
    }

    #[test]
    fn slow_start_doubles_the_step_only_while_gains_are_proportional() {
        let mut s = Autoscaler::new(ScaleMode::Adaptive, 1, 32, SEC);
        // 1 MB/s per stream on a 100 MB/s link: 1 → 2 → 4 → 8 → 16 → 32.
        run(&mut s, 20, 1.0, 100.0, 1);
        assert_eq!(kept(&s), vec![2, 4, 8, 16, 32]);
    }

    fn kept(s: &Autoscaler) -> Vec<u16> {
        s.history().filter(|e| e.reason.starts_with("kept")).map(|e| e.streams).collect()
    }

    #[test]
    fn a_probe_that_does_not_pay_off_is_undone_and_backs_off() {
        let mut s = Autoscaler::new(ScaleMode::Adaptive, 1, 8, SEC);
        assert_eq!(s.tick(0, sample(50.0, 0.9, 2)), Decision::Add(1));
        assert_eq!(s.tick(1, sample(50.0, 0.9, 3)), Decision::Hold, "settling");
        assert_eq!(s.tick(2, sample(51.0, 0.9, 3)), Decision::Remove(1), "+2 % is below 5 %");
        // Back-off: the next probe waits 2 intervals, then 4 after another failure.
        assert_eq!(s.tick(3, sample(50.0, 0.9, 2)), Decision::Hold);
        assert_eq!(s.tick(4, sample(50.0, 0.9, 2)), Decision::Hold);
        assert_eq!(s.tick(5, sample(50.0, 0.9, 2)), Decision::Add(1));
        s.tick(6, sample(50.0, 0.9, 3));
        assert_eq!(s.tick(7, sample(50.0, 0.9, 3)), Decision::Remove(1));
        let waits = (8..20).take_while(|t| s.tick(*t, sample(50.0, 0.9, 2)) == Decision::Hold).count();
        assert_eq!(waits, 4);
    }

    #[test]
    fn removes_idle_streams_when_the_producer_is_the_bottleneck() {
        let mut s = Autoscaler::new(ScaleMode::Adaptive, 1, 8, SEC);
        assert_eq!(s.tick(0, sample(30.0, 0.05, 4)), Decision::Hold);
        assert_eq!(s.tick(1, sample(30.0, 0.05, 4)), Decision::Hold);
        assert_eq!(s.tick(2, sample(30.0, 0.05, 4)), Decision::Remove(1));
        let e = s.history().last().expect("event");
        assert!(e.reason.contains("producer is the bottleneck"), "{}", e.reason);
        // Hysteresis: a sample between the thresholds (fill 30 %, one interval of
        // data waiting) resets the idle count without triggering a probe.
        s.tick(3, sample(30.0, 0.05, 3));
        s.tick(4, sample(30.0, 0.05, 3));
        let between = Sample { window_fill: 0.3, backlog_secs: 1.0, ..sample(30.0, 0.3, 3) };
        assert_eq!(s.tick(5, between), Decision::Hold);
        s.tick(6, sample(30.0, 0.05, 3));
        assert_eq!(s.tick(7, sample(30.0, 0.05, 3)), Decision::Hold);
        assert_eq!(s.tick(8, sample(30.0, 0.05, 3)), Decision::Remove(1));
    }

    #[test]
    fn never_goes_below_the_minimum_or_above_the_maximum() {
        let mut s = Autoscaler::new(ScaleMode::Adaptive, 1, 3, SEC);
        assert_eq!(run(&mut s, 80, 10.0, 1000.0, 1), 3);
        let mut s = Autoscaler::new(ScaleMode::Adaptive, 1, 3, SEC);
        for t in 0..20 {
            assert!(!matches!(s.tick(t, sample(10.0, 0.01, 1)), Decision::Remove(_)));
        }
    }

    #[test]
    fn efficiency_mode_keeps_only_streams_that_pull_their_weight() {
        // 10 MB/s per stream but a 25 MB/s link: the third stream adds +25 % (adaptive
        // keeps it) but per-stream throughput falls from 10 to 8.3 MB/s.
        let mut adaptive = Autoscaler::new(ScaleMode::Adaptive, 1, 8, SEC);
        let mut efficient = Autoscaler::new(ScaleMode::Efficiency, 1, 8, SEC);
        run(&mut adaptive, 40, 10.0, 25.0, 1);
        run(&mut efficient, 40, 10.0, 25.0, 1);
        // Adaptive: 2 (+100 %), then 4 (+25 %, kept, step back to 1), 5 adds nothing.
        assert_eq!(kept(&adaptive), vec![2, 4]);
        // Efficiency: 2 streams at 10 MB/s each; 4 would carry only 6.25 each.
        assert_eq!(kept(&efficient), vec![2]);
    }

    #[test]
    fn holds_while_a_short_tail_drains() {
        let mut s = Autoscaler::new(ScaleMode::Adaptive, 1, 8, SEC);
        let mut x = sample(10.0, 0.01, 1);
        x.producer_done = true;
        assert_eq!(s.tick(0, x), Decision::Hold);
        assert_eq!(s.history().last().map(|e| e.state), Some(ScalerState::Draining));
    }

    #[test]
    fn scales_a_long_final_drain_through_a_slow_link() {
        // A small archive produced at once into a large window: 3 % full, but 8 s of
        // data waiting at 1 MB/s. More streams help even though the producer is done.
        let mut s = Autoscaler::new(ScaleMode::Adaptive, 1, 8, SEC);
        let x = Sample {
            produce_bps: 0.0,
            drain_bps: 1e6,
            window_fill: 0.03,
            backlog_secs: 8.0,
            streams: 1,
            producer_done: true,
            limit_bps: None,
        };
        assert_eq!(s.tick(0, x), Decision::Add(1));
    }

    #[test]
    fn holds_at_the_bandwidth_limit() {
        let mut s = Autoscaler::new(ScaleMode::Adaptive, 1, 8, SEC);
        let capped = Sample { limit_bps: Some(1.05e6), ..sample(1.0, 0.9, 2) };
        for t in 0..10 {
            assert_eq!(s.tick(t * 1000, capped), Decision::Hold);
        }
        assert!(s.history().last().is_some_and(|e| e.reason.contains("bandwidth limit")));
        // Below the limit the network is the bottleneck again: probe.
        let below = Sample { limit_bps: Some(10e6), ..sample(1.0, 0.9, 2) };
        assert_eq!(s.tick(10_000, below), Decision::Add(1));
    }
}
