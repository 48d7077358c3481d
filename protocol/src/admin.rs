//! Types of the local admin API (HTTP/1.1 + JSON on a Unix socket, under `/v1`),
//! shared by the daemons that serve it and the clients (`nbackup ctl`, the console)
//! that read it. Documented endpoint by endpoint in `docs/admin-api.md`.
//!
//! Times are RFC 3339 strings in UTC; sizes are bytes; rates are bytes per second.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where a daemon's admin socket is when the config does not say: `/run/nbackup` for
/// root, else `$XDG_RUNTIME_DIR/nbackup` (or `fallback_dir/nbackup`). `daemon` is
/// `agent` or `server`. Pure, so daemons and clients agree.
pub fn default_socket(daemon: &str, is_root: bool, runtime_dir: Option<&Path>, fallback_dir: &Path) -> PathBuf {
    let base =
        if is_root { PathBuf::from("/run/nbackup") } else { runtime_dir.unwrap_or(fallback_dir).join("nbackup") };
    base.join(format!("{daemon}.sock"))
}

use crate::wire::Compression;

/// An error answer: HTTP status plus this body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// The answer to a `POST` that acts (abort, rotate, run, reload).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionResult {
    pub ok: bool,
    pub message: String,
}

/// A recorded happening, numbered so clients can ask for what came `since`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub time: String,
    /// `started`, `stream_joined`, `stream_lost`, `stream_rejoined`, `committed`,
    /// `rotated`, `aborted`, `expired`, `failed`, `refused`, `disk_low`,
    /// `agent_connected`, `agent_disconnected`, `reloaded`, `scheduled`, `skipped`, …
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    pub message: String,
}

/// The terminal state of one session, as the server recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    pub session: String,
    pub agent: String,
    pub storage: String,
    pub backup: String,
    /// `committed`, `failed`, `aborted` or `expired`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub message: String,
    pub bytes: u64,
    pub started: String,
    pub finished: String,
}

/// `GET /v1/status` on the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub version: String,
    pub uptime_secs: u64,
    pub listen: String,
    pub draining: bool,
    pub active_sessions: usize,
    pub connected_agents: usize,
    pub storages: Vec<StorageStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StorageStatus {
    pub name: String,
    pub base_dir: String,
    pub compression: Compression,
    pub level: i32,
    pub max_backups: u32,
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub archives: u64,
    pub archive_bytes: u64,
}

/// A session in progress on the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: String,
    pub agent: String,
    pub storage: String,
    pub backup: String,
    /// `receiving`, or `waiting` when no stream is attached.
    pub phase: String,
    pub started: String,
    pub bytes_received: u64,
    /// Receive rate over the last few seconds.
    pub rate_bps: f64,
    /// Chunks held without a gap from the first.
    pub contiguous_chunks: u64,
    pub duplicate_chunks: u64,
    pub idle_secs: f64,
    /// Source bytes the agent expects to read (its pre-scan), if it reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_bytes: Option<u64>,
    /// Source bytes the agent has read so far, as it last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_bytes_read: Option<u64>,
    /// Seconds left at the agent's current read rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<f64>,
    pub streams: Vec<StreamInfo>,
}

/// One stream (connection) of a session, as the server sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamInfo {
    pub stream: u16,
    pub generation: u32,
    /// `receiving` (data in the last second), `idle`, or `closed` (lost or retired,
    /// not joined again yet).
    pub state: String,
    pub peer: String,
    pub bytes: u64,
    pub rate_bps: f64,
    /// Times this stream index was joined again after its first connection.
    pub reconnects: u32,
    /// Chunks received on this stream that the server already had (resends).
    pub resent_chunks: u64,
    /// Round trip of this stream's connection, as its agent measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

/// An agent known to the server through its control channel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub name: String,
    pub address: String,
    pub version: String,
    pub connected: bool,
    pub rtt_ms: Option<f64>,
    pub last_seen: String,
    /// The agent host's 1-minute load average.
    pub load1: Option<f64>,
    /// Sessions of this agent open on the server now.
    pub sessions: Vec<String>,
    /// What the agent last reported running.
    #[serde(default)]
    pub running: Vec<RunningBackup>,
    /// Last result per entry, as the agent reported it.
    pub last_results: Vec<EntryResult>,
}

/// The outcome of one run of an entry, as the agent saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntryResult {
    pub entry: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub finished: String,
    pub seconds: f64,
    /// Attempts made, the successful or last one included.
    #[serde(default)]
    pub attempts: u32,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    pub skipped: u64,
}

/// An archive on the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveInfo {
    pub storage: String,
    pub agent: String,
    pub backup: String,
    pub name: String,
    pub size: u64,
    /// `yyyymmddThhmmssZ` from the name.
    pub stamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Whether a manifest sits next to it.
    pub manifest: bool,
}

/// A short time series at one-second resolution, for charts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub name: String,
    /// `(unix seconds, value)`, oldest first.
    pub points: Vec<(u64, f64)>,
}

/// What the autoscaler decided at one measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Hold,
    /// Open this many more streams.
    Add(u16),
    /// Retire this many streams.
    Remove(u16),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScalerState {
    Steady,
    Probing,
    Cooldown,
    Draining,
}

/// A decision and the numbers behind it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScalerEvent {
    /// Milliseconds since the backup started.
    pub at_ms: u64,
    pub streams: u16,
    pub produce_mbps: f64,
    pub drain_mbps: f64,
    pub window_fill: f64,
    /// Drain rate over producer rate: 1 or more means the network keeps up.
    pub efficiency: f64,
    pub state: ScalerState,
    pub decision: Decision,
    pub reason: String,
}

/// `GET /v1/status` on the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub version: String,
    pub agent: String,
    pub uptime_secs: u64,
    pub server: String,
    pub control_channel: ControlStatus,
    pub entries: Vec<EntryStatus>,
    pub running: Vec<RunningBackup>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlStatus {
    pub enabled: bool,
    pub connected: bool,
    pub rtt_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_load1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_free_bytes: Option<u64>,
}

/// A backup entry on the agent, with its schedule and last outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntryStatus {
    pub name: String,
    pub storage: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    pub timezone: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<String>,
    pub running: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<EntryResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_age_secs: Option<u64>,
}

/// A backup running on the agent now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunningBackup {
    pub entry: String,
    pub attempt: u32,
    pub started: String,
    /// The server session, once one is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    pub bytes_read: u64,
    pub bytes_compressed: u64,
    pub bytes_acked: u64,
    pub entries: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_bytes: Option<u64>,
    /// Source read rate, smoothed over a few seconds.
    #[serde(default)]
    pub read_bps: f64,
    /// Compressed bytes acknowledged per second, smoothed likewise.
    #[serde(default)]
    pub acked_bps: f64,
    /// Seconds until the last byte is acknowledged at that rate, once the pre-scan
    /// knows the total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<f64>,
    /// Streams in use now.
    pub streams: u16,
    /// Every stream this run opened, by index.
    #[serde(default)]
    pub stream_table: Vec<AgentStreamInfo>,
    /// The autoscaler's decisions with the numbers behind them.
    pub scaler: Vec<ScalerEvent>,
}

/// One stream of a running backup, as the agent sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStreamInfo {
    pub stream: u16,
    /// `connecting`, `sending`, `retiring`, `reconnecting` or `closed`.
    pub state: String,
    /// Compressed bytes put on this stream, resends included.
    pub bytes_sent: u64,
    /// Round trip of the current connection's join handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Smoothed time from sending a chunk to its acknowledgement, so queueing in
    /// socket buffers and the server's disk write included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_ms: Option<f64>,
    /// Connections after the first.
    pub reconnects: u32,
    /// Chunks taken back from this stream to be resent elsewhere (its connection
    /// was lost).
    pub requeued_chunks: u64,
}

/// What an agent reports on its control channel (agent → server).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentReport {
    pub version: String,
    pub load1: Option<f64>,
    /// Round trip of the control channel as the agent measured it.
    pub rtt_ms: Option<f64>,
    pub running: Vec<RunningBackup>,
    pub last_results: Vec<EntryResult>,
    /// How often the agent pings on its control channel; the server takes three
    /// missed intervals of silence for a vanished agent.
    #[serde(default)]
    pub keepalive_ms: Option<u64>,
}

/// An operator command sent down a control channel (server → agent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "command")]
pub enum ControlCommand {
    /// Give up a running backup.
    Abort { entry: String, reason: String },
    /// Run an entry now, outside its schedule.
    RunNow { entry: String },
    /// Postpone an entry's next scheduled run by this many seconds.
    Defer { entry: String, seconds: u64 },
}

/// Body of `POST /v1/sessions/{id}/abort` and the agent's abort.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// One line of `GET /v1/watch` (NDJSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum WatchItem {
    /// The state, sent first and then every second.
    ServerSnapshot {
        status: ServerStatus,
        sessions: Vec<SessionInfo>,
        agents: Vec<AgentInfo>,
    },
    AgentSnapshot {
        status: AgentStatus,
    },
    /// A new event.
    Event {
        event: Event,
    },
}
