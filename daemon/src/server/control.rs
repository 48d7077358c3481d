//! The server end of agents' control channels, and the registry of agents they
//! build: who is connected, from where, with which version, round-trip time and
//! load, and what each last reported; and the path for operator commands down to an
//! agent. Backups never depend on any of this.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tracing::{info, warn};

use nbackup_protocol::Name;
use nbackup_protocol::admin::{AgentInfo, AgentReport, ControlCommand, EventKind, RunningBackup};
use nbackup_protocol::wire::{CtlMessage, CtlPong, CtlResult, Frame};

use super::WRITE_TIMEOUT;
use super::handle::ControlHandle;
use super::listener::Conn;
use crate::conn::FrameReader;
use crate::conn::FrameWriter;

/// A control channel with no frame for this long is considered dead, until the
/// agent's first report says how often it pings (then three of its intervals).
const IDLE: Duration = Duration::from_secs(15 * 60);

/// How long an operator waits for an agent to answer a command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

struct Pending {
    command: ControlCommand,
    reply: oneshot::Sender<CtlResult>,
}

struct Entry {
    info: AgentInfo,
    commands: Option<mpsc::Sender<Pending>>,
    /// Increases per connection, so a stale connection cannot mark a newer one gone.
    epoch: u64,
}

/// Agents known from their control channels.
#[derive(Default)]
pub struct Agents {
    inner: Mutex<BTreeMap<String, Entry>>,
    epochs: std::sync::atomic::AtomicU64,
}

use crate::lock;

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl Agents {
    /// Agents known before a restart: listed, not connected, until they come back.
    pub fn restore(&self, known: Vec<AgentInfo>) {
        let mut agents = lock(&self.inner);
        for mut info in known {
            info.connected = false;
            info.sessions.clear();
            info.running.clear();
            agents.entry(info.name.clone()).or_insert(Entry { info, commands: None, epoch: 0 });
        }
    }

    pub fn list(&self) -> Vec<AgentInfo> {
        lock(&self.inner).values().map(|e| e.info.clone()).collect()
    }

    pub fn connected(&self) -> usize {
        lock(&self.inner).values().filter(|e| e.info.connected).count()
    }

    /// What `agent` last reported about the backup running in `session`.
    pub fn running(&self, agent: &str, session: &str) -> Option<RunningBackup> {
        let agents = lock(&self.inner);
        let e = agents.get(agent).filter(|e| e.info.connected)?;
        e.info.running.iter().find(|r| r.session.as_deref() == Some(session)).cloned()
    }

    pub fn disconnect_all(&self) {
        for e in lock(&self.inner).values_mut() {
            e.commands = None;
            e.info.connected = false;
        }
    }

    /// Sends `command` to `agent` and waits for its answer.
    pub async fn command(&self, agent: &str, command: ControlCommand) -> Result<CtlResult, String> {
        let tx = lock(&self.inner)
            .get(agent)
            .and_then(|e| e.commands.clone())
            .ok_or_else(|| format!("agent {agent} has no control channel connected"))?;
        let (reply, rx) = oneshot::channel();
        tx.send(Pending { command, reply }).await.map_err(|_| format!("agent {agent} disconnected"))?;
        match timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(format!("agent {agent} disconnected before answering")),
            Err(_) => Err(format!("agent {agent} did not answer within {COMMAND_TIMEOUT:?}")),
        }
    }
}

/// Serves one agent's control channel until it closes or the server stops.
pub async fn handle<R, W>(shared: ControlHandle, conn: Conn, mut reader: FrameReader<R>, mut writer: FrameWriter<W>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Some(agent) = conn.identities.iter().find(|i| Name::new(i.as_str()).is_ok()).cloned() else {
        warn!(peer = %conn.peer, "control channel refused: the certificate names no valid agent");
        return;
    };
    let epoch = shared.agents().epochs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Pending>(16);
    {
        let mut agents = lock(&shared.agents().inner);
        let entry = agents.entry(agent.clone()).or_insert_with(|| Entry {
            info: AgentInfo {
                name: agent.clone(),
                address: String::new(),
                version: String::new(),
                connected: false,
                rtt_ms: None,
                last_seen: now(),
                load1: None,
                sessions: Vec::new(),
                running: Vec::new(),
                last_results: Vec::new(),
                entries: Vec::new(),
                silent: false,
            },
            commands: None,
            epoch,
        });
        entry.info.connected = true;
        entry.info.address = conn.peer.to_string();
        entry.info.last_seen = now();
        entry.commands = Some(tx);
        entry.epoch = epoch;
    }
    info!(agent = %agent, peer = %conn.peer, "control channel connected");
    shared.record(EventKind::AgentConnected, &agent, format!("control channel from {}", conn.peer));
    let mut pending: HashMap<u64, oneshot::Sender<CtlResult>> = HashMap::new();
    let mut next_id = 0u64;
    let mut idle = IDLE;
    let why = loop {
        tokio::select! {
            frame = timeout(Duration::from_secs(1), reader.read_frame()) => {
                let frame = match frame {
                    Err(_) if reader.idle_for() > idle => {
                        break format!("silent for {:.1} s; the agent is gone or cut off", reader.idle_for().as_secs_f64());
                    }
                    Err(_) => continue,
                    Ok(Err(e)) => break e.to_string(),
                    Ok(Ok(f)) => f,
                };
                touch(&shared, &agent);
                let answer = match frame {
                    Frame::CtlPing(p) => {
                        let free_bytes = shared.min_free();
                        let load_milli = crate::state::load1().map_or(0, |l| (l * 1000.0) as u32);
                        Some(Frame::CtlPong(CtlPong { nonce: p.nonce, load_milli, free_bytes }))
                    }
                    Frame::CtlReport(m) => {
                        match serde_json::from_str::<AgentReport>(&m.json) {
                            Ok(report) => {
                                if let Some(ms) = report.keepalive_ms.filter(|ms| *ms > 0) {
                                    idle = Duration::from_millis(ms.saturating_mul(3)).max(Duration::from_secs(1));
                                }
                                apply_report(&shared, &agent, report);
                            }
                            Err(e) => warn!(agent = %agent, "unreadable control report: {e}"),
                        }
                        None
                    }
                    Frame::CtlResult(r) => {
                        if let Some(reply) = pending.remove(&r.id) {
                            let _ = reply.send(r);
                        }
                        None
                    }
                    other => break format!("unexpected {} frame", other.frame_type().name()),
                };
                if let Some(frame) = answer
                    && !matches!(timeout(WRITE_TIMEOUT, writer.send(&frame)).await, Ok(Ok(())))
                {
                    break "cannot send".to_string();
                }
            }
            Some(cmd) = rx.recv() => {
                next_id += 1;
                let json = match serde_json::to_string(&cmd.command) {
                    Ok(j) => j,
                    Err(e) => {
                        let _ = cmd.reply.send(CtlResult { id: 0, ok: false, message: format!("cannot encode: {e}") });
                        continue;
                    }
                };
                let frame = Frame::CtlCommand(CtlMessage { id: next_id, json });
                if !matches!(timeout(WRITE_TIMEOUT, writer.send(&frame)).await, Ok(Ok(()))) {
                    break "cannot send".to_string();
                }
                pending.insert(next_id, cmd.reply);
            }
            _ = shared.draining() => break "server shutting down".to_string(),
        }
    };
    // A connection replaced by a newer one of the same agent is not a disconnect.
    let current = {
        let mut agents = lock(&shared.agents().inner);
        match agents.get_mut(&agent).filter(|e| e.epoch == epoch) {
            Some(e) => {
                e.info.connected = false;
                e.commands = None;
                true
            }
            None => false,
        }
    };
    if current {
        info!(agent = %agent, "control channel closed: {why}");
        shared.record(EventKind::AgentDisconnected, &agent, why);
    } else {
        info!(agent = %agent, "superseded control channel closed: {why}");
    }
}

fn touch(shared: &ControlHandle, agent: &str) {
    if let Some(e) = lock(&shared.agents().inner).get_mut(agent) {
        e.info.last_seen = now();
    }
}

fn apply_report(shared: &ControlHandle, agent: &str, report: AgentReport) {
    if let Some(e) = lock(&shared.agents().inner).get_mut(agent) {
        e.info.version = report.version;
        e.info.load1 = report.load1;
        e.info.rtt_ms = report.rtt_ms;
        e.info.running = report.running;
        e.info.last_results = if report.last_results.is_empty() {
            report.entries.iter().filter_map(|e| e.last.clone()).collect()
        } else {
            report.last_results
        };
        e.info.entries = report.entries;
    }
}

/// Fills in each agent's open sessions from the server's own table.
pub fn with_sessions(mut agents: Vec<AgentInfo>, sessions: &[(String, String)]) -> Vec<AgentInfo> {
    for a in &mut agents {
        a.sessions = sessions.iter().filter(|(agent, _)| *agent == a.name).map(|(_, id)| id.clone()).collect();
    }
    agents
}
