//! The agent end of the control channel: a persistent mTLS connection that pings the
//! server (round-trip time as an EWMA, the server's load and free space in the
//! answer), reports progress and results, and executes operator commands (run now,
//! abort, defer). It reconnects with exponential backoff. Backups never depend on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use nbackup_protocol::admin::{AgentReport, ControlCommand, EventKind};
use nbackup_protocol::wire::{CtlMessage, CtlPing, CtlResult, Frame, MAX_JSON_LEN};

use super::daemon::{Agentd, Triggered};
use crate::state::EventSpec;

/// How often progress is reported while something runs.
const REPORT_BUSY: Duration = Duration::from_secs(2);

/// How often the report is refreshed when idle (round-trip time, load).
const REPORT_IDLE: Duration = Duration::from_secs(30);

pub(super) async fn run(d: Arc<Agentd>) {
    let mut failures: u32 = 0;
    loop {
        let cfg = d.config().control_channel;
        if !cfg.enabled {
            // Wait for a reload that might enable it.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                _ = d.shutdown().cancelled() => return,
            }
        }
        let connector = d.connector();
        let connected = tokio::select! {
            c = connector.control() => c,
            _ = d.shutdown().cancelled() => return,
        };
        match connected {
            Ok(conn) => {
                info!("control channel connected");
                d.events.record(EventKind::ControlConnected, EventSpec::default(), "control channel connected");
                d.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner).connected = true;
                let why = session(&d, conn).await;
                {
                    let mut c = d.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    c.connected = false;
                }
                if d.shutdown().is_cancelled() {
                    return;
                }
                warn!("control channel lost: {why}");
                d.events.record(EventKind::ControlLost, EventSpec::default(), why);
                failures = 0;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                debug!("control channel: {e}");
            }
        }
        let factor = 1u32.checked_shl(failures.saturating_sub(1)).unwrap_or(u32::MAX);
        let delay = cfg.reconnect_delay.saturating_mul(factor).min(cfg.max_reconnect_delay);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = d.shutdown().cancelled() => return,
        }
    }
}

async fn session(d: &Arc<Agentd>, conn: super::connect::Connection) -> String {
    let super::connect::Connection { mut reader, mut writer, .. } = conn;
    let keepalive = d.config().control_channel.keepalive_interval;
    let mut ping = tokio::time::interval(keepalive);
    let mut silence = tokio::time::interval(keepalive / 4);
    let mut report = tokio::time::interval(REPORT_BUSY);
    // The first report goes out with the first round-trip time, the rest on change,
    // every REPORT_BUSY while a backup runs, and every REPORT_IDLE otherwise.
    let mut reported: Option<Instant> = None;
    let mut rtt_reported = false;
    let mut pings: std::collections::HashMap<u64, Instant> = std::collections::HashMap::new();
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            _ = d.shutdown().cancelled() => return "shutting down".into(),
            _ = silence.tick() => {
                // Measured from the last byte, checked four times an interval, so a
                // dead server is noticed within three intervals of its last answer.
                if reader.idle_for() > keepalive * 11 / 4 {
                    return format!("no answer for {:.1} s; the server is gone or cut off", reader.idle_for().as_secs_f64());
                }
            }
            _ = ping.tick() => {
                nonce += 1;
                pings.insert(nonce, Instant::now());
                pings.retain(|n, _| nonce - n < 16);
                if let Err(e) = writer.send(&Frame::CtlPing(CtlPing { nonce })).await {
                    return e.to_string();
                }
            }
            changed = async {
                tokio::select! {
                    _ = d.report_now.notified() => true,
                    _ = report.tick() => false,
                }
            } => {
                let report = d.report();
                let due = reported.is_none_or(|at| {
                    let every = if report.running.is_empty() { REPORT_IDLE } else { REPORT_BUSY };
                    at.elapsed() >= every
                });
                let rtt_news = !rtt_reported && report.rtt_ms.is_some();
                if changed || due || rtt_news {
                    reported = Some(Instant::now());
                    rtt_reported |= report.rtt_ms.is_some();
                    match report_json(report) {
                        Ok(json) => {
                            if let Err(e) = writer.send(&Frame::CtlReport(CtlMessage { id: 0, json })).await {
                                return e.to_string();
                            }
                        }
                        Err(e) => warn!("control report not sent: {e}"),
                    }
                }
            }
            frame = reader.read_frame() => {
                let frame = match frame {
                    Err(e) => return e.to_string(),
                    Ok(f) => f,
                };
                match frame {
                    Frame::CtlPong(p) => {
                        if let Some(sent) = pings.remove(&p.nonce) {
                            let sample = sent.elapsed().as_secs_f64() * 1000.0;
                            let mut c = d.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            c.rtt_ms = Some(c.rtt_ms.map_or(sample, |r| r * 0.875 + sample * 0.125));
                            c.server_load1 = Some(f64::from(p.load_milli) / 1000.0);
                            c.server_free_bytes = Some(p.free_bytes);
                        }
                    }
                    Frame::CtlCommand(m) => {
                        let result = execute(d, m.id, &m.json);
                        if let Err(e) = writer.send(&Frame::CtlResult(result)).await {
                            return e.to_string();
                        }
                    }
                    other => return format!("unexpected {} frame", other.frame_type().name()),
                }
            }
        }
    }
}

/// Autoscaler decisions a report carries per running backup: the recent ones. The
/// whole history stays in the agent's own admin API.
const REPORT_DECISIONS: usize = 32;

/// The report as JSON that fits one control frame however long a backup has run:
/// only recent autoscaler decisions, fewer if needed, then no stream tables and no
/// separate last results. A
/// report that still does not fit is an error, never a truncated document.
fn report_json(mut report: AgentReport) -> Result<String, String> {
    let encode = |r: &AgentReport| serde_json::to_string(r).map_err(|e| e.to_string());
    for keep in [REPORT_DECISIONS, 4, 0] {
        for r in &mut report.running {
            let excess = r.scaler.len().saturating_sub(keep);
            r.scaler.drain(..excess);
        }
        let json = encode(&report)?;
        if json.len() <= MAX_JSON_LEN {
            return Ok(json);
        }
    }
    for r in &mut report.running {
        r.stream_table.clear();
    }
    // The entries carry their last results too.
    report.last_results.clear();
    let json = encode(&report)?;
    if json.len() <= MAX_JSON_LEN {
        return Ok(json);
    }
    Err(format!("the report is {} bytes even without history; the limit is {MAX_JSON_LEN}", json.len()))
}

fn execute(d: &Arc<Agentd>, id: u64, json: &str) -> CtlResult {
    let command: ControlCommand = match serde_json::from_str(json) {
        Ok(c) => c,
        Err(e) => return CtlResult { id, ok: false, message: format!("unknown command: {e}") },
    };
    info!(?command, "operator command from the server");
    let (ok, message) = match command {
        ControlCommand::RunNow { entry } => match d.trigger(&entry, "operator") {
            Triggered::Started => (true, format!("{entry} started")),
            Triggered::Skipped => (false, format!("{entry} is already running")),
            Triggered::Unknown => (false, format!("no entry {entry}")),
        },
        ControlCommand::Abort { entry, reason } => {
            if d.abort(&entry, &reason) {
                (true, format!("{entry} aborting"))
            } else {
                (false, format!("{entry} is not running"))
            }
        }
        ControlCommand::Defer { entry, seconds } => match d.defer(&entry, seconds) {
            Some(message) => (true, message),
            None => (false, format!("no entry {entry}")),
        },
    };
    CtlResult { id, ok, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbackup_protocol::admin::{Decision, RunningBackup, ScalerEvent, ScalerState};

    #[test]
    fn a_report_stays_under_the_frame_limit_however_long_the_backup_ran() {
        let event = ScalerEvent {
            at_ms: 1,
            decision: Decision::Hold,
            streams: 4,
            produce_mbps: 100.0,
            drain_mbps: 90.0,
            efficiency: 0.9,
            window_fill: 0.5,
            state: ScalerState::Steady,
            reason: "a long explanation of why nothing changed this interval".into(),
        };
        let running = RunningBackup {
            entry: "etc".into(),
            attempt: 1,
            started: String::new(),
            session: None,
            bytes_read: 0,
            bytes_compressed: 0,
            bytes_acked: 0,
            entries: 0,
            estimate_bytes: None,
            read_bps: 0.0,
            acked_bps: 0.0,
            eta_secs: None,
            streams: 4,
            stream_table: Vec::new(),
            scaler: vec![event; 5000],
            stages: None,
        };
        let report = AgentReport {
            version: "v".into(),
            load1: None,
            rtt_ms: None,
            running: vec![running],
            last_results: Vec::new(),
            keepalive_ms: None,
            entries: Vec::new(),
        };
        assert!(serde_json::to_string(&report).expect("json").len() > MAX_JSON_LEN, "the test needs a big one");
        let json = report_json(report).expect("fits");
        assert!(json.len() <= MAX_JSON_LEN);
        let back: AgentReport = serde_json::from_str(&json).expect("a whole document");
        assert_eq!(back.running[0].scaler.len(), REPORT_DECISIONS, "the recent decisions are kept");
    }
}
