//! The failures nobody can report: an entry late against its own schedule, and an
//! agent whose control channel went quiet — a dead host tells no one. Every few
//! seconds the vigil judges every known agent's entries (`protocol::freshness`,
//! with the server's clock and its own commits), raises `missed_backup` once per
//! late spell and `backup_recovered` when it ends, `agent_silent` once per silence,
//! and keeps what it knows in `state_dir/agents.json` so a restart forgets neither
//! the agents nor what was already raised.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nbackup_protocol::admin::{AgentInfo, EventKind};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Server;
use super::handle::ServerHandle;
use crate::state::EventSpec;

/// How often the vigil looks.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// What survives a restart.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    /// Every agent as last known (connected ones included, shown as not connected
    /// after a restart until they come back).
    pub agents: Vec<AgentInfo>,
    /// `agent/entry` → the first unanswered run of the late spell already raised.
    #[serde(default)]
    pub late: BTreeMap<String, String>,
    /// Agents whose silence was raised (and not ended by a reconnect).
    #[serde(default)]
    pub silent: BTreeSet<String>,
}

fn file(server: &Server) -> Option<PathBuf> {
    server.state_dir.as_ref().map(|d| d.join("agents.json"))
}

/// Reads what the last run knew. Blocking; called before readiness.
pub fn load(server: &Server) -> Persisted {
    let Some(path) = file(server) else { return Persisted::default() };
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
            warn!("ignoring {}: {e}", path.display());
            Persisted::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
        Err(e) => {
            warn!("cannot read {}: {e}", path.display());
            Persisted::default()
        }
    }
}

/// Watches until `shutdown`, starting from what [`load`] read.
pub async fn run(server: Arc<Server>, known: Persisted, shutdown: CancellationToken) {
    let handle = ServerHandle::new(server.clone());
    let mut state = Watch { late: known.late, silent: known.silent, written: None };
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let agents = handle.agents();
        state.judge(&server, &agents);
        let snapshot = Persisted { agents, late: state.late.clone(), silent: state.silent.clone() };
        state.save(&server, &snapshot, false).await;
    }
    // One last write, so a graceful stop keeps the latest reports.
    let snapshot = Persisted { agents: handle.agents(), late: state.late.clone(), silent: state.silent.clone() };
    state.save(&server, &snapshot, true).await;
}

/// An unchanged state is written again this often, so `last_seen` on disk is
/// never much older than the last ping (a crash loses at most this much of it).
const REFRESH: Duration = Duration::from_secs(60);

/// `snapshot` without what moves by itself (pings, ages), for comparing.
fn stable(snapshot: &Persisted) -> Persisted {
    let mut p = snapshot.clone();
    for a in &mut p.agents {
        a.last_seen.clear();
        (a.rtt_ms, a.load1) = (None, None);
        for e in &mut a.entries {
            (e.freshness.age_secs, e.last_age_secs) = (None, None);
        }
    }
    p
}

struct Watch {
    late: BTreeMap<String, String>,
    silent: BTreeSet<String>,
    /// What was last written (without what moves by itself) and when, so an
    /// unchanged state is written only to keep `last_seen` fresh.
    written: Option<(Persisted, std::time::Instant)>,
}

impl Watch {
    fn judge(&mut self, server: &Server, agents: &[AgentInfo]) {
        let events = &server.telemetry.events;
        for a in agents {
            for e in &a.entries {
                let key = format!("{}/{}", a.name, e.name);
                let f = &e.freshness;
                let who = EventSpec { agent: Some(&a.name), backup: Some(&e.name), ..Default::default() };
                match (f.state.is_late(), self.late.get(&key)) {
                    (true, Some(due)) if f.due_since.as_deref() == Some(due.as_str()) => {}
                    (true, _) => {
                        let due = f.due_since.clone().unwrap_or_default();
                        let last = f.last_success.as_deref().unwrap_or("never");
                        let runs = if f.missed_runs == 1 {
                            "1 scheduled run".to_string()
                        } else {
                            format!("{} scheduled runs", f.missed_runs)
                        };
                        let message = format!(
                            "{key}: {runs} without a success since {due} (schedule {}, last success {last})",
                            e.schedule.as_deref().unwrap_or("-"),
                        );
                        warn!(agent = %a.name, entry = %e.name, "{message}");
                        events.record(EventKind::MissedBackup, who, message);
                        self.late.insert(key, due);
                    }
                    (false, Some(_)) => {
                        let last = f.last_success.as_deref().unwrap_or("-");
                        events.record(
                            EventKind::BackupRecovered,
                            who,
                            format!("{key} is on time again (last success {last})"),
                        );
                        self.late.remove(&key);
                    }
                    (false, None) => {}
                }
            }
            match (a.silent, self.silent.contains(&a.name)) {
                (true, false) => {
                    let message = format!("{}: no control channel since {}", a.name, a.last_seen);
                    warn!(agent = %a.name, "{message}");
                    events.record(
                        EventKind::AgentSilent,
                        EventSpec { agent: Some(&a.name), ..Default::default() },
                        message,
                    );
                    self.silent.insert(a.name.clone());
                }
                (false, true) if a.connected => {
                    self.silent.remove(&a.name);
                }
                _ => {}
            }
        }
        // Entries that went away (removed from the agent's config) end their spell.
        let known: BTreeSet<String> =
            agents.iter().flat_map(|a| a.entries.iter().map(move |e| format!("{}/{}", a.name, e.name))).collect();
        self.late.retain(|k, _| known.contains(k));
    }

    /// Writes `snapshot` if it changed, is due a refresh, or `force`.
    async fn save(&mut self, server: &Server, snapshot: &Persisted, force: bool) {
        let Some(path) = file(server) else { return };
        let key = stable(snapshot);
        if let Some((last, at)) = &self.written
            && !force
            && *last == key
            && at.elapsed() < REFRESH
        {
            return;
        }
        let Ok(json) = serde_json::to_vec_pretty(snapshot) else { return };
        let written = tokio::task::spawn_blocking(move || crate::fsutil::write_atomic(&path, &json)).await;
        match written {
            Ok(Ok(())) => self.written = Some((key, std::time::Instant::now())),
            Ok(Err(e)) => warn!("cannot save the agents' state: {e}"),
            Err(e) => warn!("cannot save the agents' state: {e}"),
        }
    }
}
