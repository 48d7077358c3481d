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

use crate::Name;
use crate::wire::Compression;

/// A closed set of words on the wire: serialised as its snake_case name, and read
/// back with an `Unknown` fallback so an older client reads a newer daemon.
macro_rules! words {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $v,)*
            /// A word this build does not know (sent by a newer daemon).
            #[serde(other, rename = "unknown")]
            Unknown,
        }

        impl $name {
            /// Every known value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$v,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$v => $s,)*
                    $name::Unknown => "unknown",
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

words! {
    /// Which daemon answers on an admin socket.
    pub enum DaemonKind {
        Server = "server",
        Agent = "agent",
    }
}

words! {
    /// Where a server session is in its life (`docs/admin-api.md`).
    pub enum SessionPhase {
        /// Found in `.incoming` at start and being re-checked.
        Recovering = "recovering",
        /// At least one stream attached.
        Receiving = "receiving",
        /// No stream attached: the agent is gone or reconnecting.
        Orphaned = "orphaned",
        /// Verifying and renaming; nothing can end it now.
        Committing = "committing",
    }
}

words! {
    /// A server-side stream of a session.
    pub enum StreamState {
        /// Data arrived in the last second.
        Receiving = "receiving",
        Idle = "idle",
        /// Lost or retired, not joined again yet.
        Closed = "closed",
    }
}

words! {
    /// A stream of a running backup, as the agent sees it.
    pub enum AgentStreamState {
        Connecting = "connecting",
        Sending = "sending",
        Retiring = "retiring",
        Reconnecting = "reconnecting",
        Closed = "closed",
    }
}

words! {
    /// How a server session ended.
    pub enum SessionOutcome {
        Committed = "committed",
        Failed = "failed",
        /// Cancelled by the agent or an operator, or by a draining server.
        Aborted = "aborted",
        /// Left without a stream longer than `resume.session_ttl`.
        Expired = "expired",
    }
}

impl SessionOutcome {
    /// Aborted and expired sessions are setbacks; a failure is an error.
    pub fn level(self) -> Level {
        match self {
            SessionOutcome::Committed => Level::Info,
            SessionOutcome::Aborted | SessionOutcome::Expired | SessionOutcome::Unknown => Level::Warn,
            SessionOutcome::Failed => Level::Error,
        }
    }
}

words! {
    /// What an event records. Both daemons draw from one list; `docs/admin-api.md`
    /// says which daemon records which.
    pub enum EventKind {
        Started = "started",
        Stopped = "stopped",
        Reloaded = "reloaded",
        ReloadFailed = "reload_failed",
        StreamJoined = "stream_joined",
        StreamRejoined = "stream_rejoined",
        StreamLost = "stream_lost",
        Committed = "committed",
        CommitIncomplete = "commit_incomplete",
        Rotated = "rotated",
        Aborted = "aborted",
        Expired = "expired",
        Failed = "failed",
        Refused = "refused",
        DiskLow = "disk_low",
        AgentConnected = "agent_connected",
        AgentDisconnected = "agent_disconnected",
        RunStarted = "run_started",
        Retry = "retry",
        Skipped = "skipped",
        Missed = "missed",
        AbortRequested = "abort_requested",
        Deferred = "deferred",
        ControlConnected = "control_connected",
        ControlLost = "control_lost",
        /// An operator acted through the admin API (the event names who).
        Operator = "operator",
        /// The server found an entry late against its schedule (`overdue` or
        /// `missed`): raised once per late spell.
        MissedBackup = "missed_backup",
        /// A late entry committed again.
        BackupRecovered = "backup_recovered",
        /// An agent's control channel has been gone longer than
        /// `server.agent_silent_after`.
        AgentSilent = "agent_silent",
        /// A stored archive was re-read and matches its manifest.
        Verified = "verified",
        /// A stored archive failed verification and was quarantined.
        ArchiveCorrupt = "archive_corrupt",
        /// An archive could not be verified (unreadable, no manifest).
        VerifyFailed = "verify_failed",
        /// A verification job ended (with its counts).
        VerifyDone = "verify_done",
        /// An agent fetched one of its archives (or its catalog) for a restore.
        RestoreServed = "restore_served",
        /// A restore test restored files of the newest archive and found them equal to
        /// the live source (or changed since the backup, which is reported).
        RestoreTested = "restore_tested",
        /// A restore test could not restore, or restored a file that differs from an
        /// unchanged source.
        RestoreTestFailed = "restore_test_failed",
        /// An archive's copy to a bucket was uploaded and verified (`docs/offsite.md`).
        OffsiteCopied = "offsite_copied",
        /// An archive's copy to a bucket failed three times in a row (it is still
        /// retried; the local archive is kept until it succeeds).
        OffsiteFailed = "offsite_failed",
        /// A bucket's oldest owed copy has waited longer than its `alert_after`
        /// (`bucket` names it); raised once until it catches up.
        OffsiteLagging = "offsite_lagging",
        /// A bucket that was lagging owes nothing older than its `alert_after` again.
        OffsiteCaughtUp = "offsite_caught_up",
        /// The server signed a first certificate for an agent (enrollment token).
        Enrolled = "enrolled",
        /// A certificate was renewed (server: signed; agent: installed and in use).
        CertRenewed = "cert_renewed",
        /// An operator revoked certificates (`nbackup cert revoke`).
        CertRevoked = "cert_revoked",
        /// The daemon's own certificate, or its CA, ends within `tls.warn_before`
        /// (or a renewal failed); raised at most once a day.
        CertExpiring = "cert_expiring",
    }
}

words! {
    /// Where one bucket's copy of an archive stands (`docs/offsite.md`).
    pub enum OffsiteState {
        Queued = "queued",
        Uploading = "uploading",
        Verified = "verified",
        /// The last attempt failed; it is retried.
        Failed = "failed",
        /// Not uploaded: the bucket's retention would delete it at once (newer
        /// archives of its entry are there or on their way). Owed nothing.
        NotKept = "not_kept",
    }
}

/// One bucket's copy of an archive, in [`ArchiveInfo`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsiteCopy {
    pub bucket: String,
    pub state: OffsiteState,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Parts the provider acknowledged of the upload in progress.
    #[serde(default)]
    pub parts_done: u64,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<u64>,
}

/// One bucket of a storage, in [`StorageStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketStatus {
    pub name: String,
    pub provider: String,
    pub bucket: String,
    pub mode: String,
    /// Archives whose copy is owed (queued, uploading or failing).
    pub owed: u64,
    /// Of those, how many failed their last attempt.
    pub failing: u64,
    /// Seconds since the oldest owed copy was queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_owed_secs: Option<u64>,
    /// Request bytes sent to the bucket since the server started.
    pub sent_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// How much an event matters, for filters and colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

impl EventKind {
    /// Errors lose or endanger a backup; warnings are setbacks the system recovers
    /// from on its own; the rest is information.
    pub fn level(self) -> Level {
        use EventKind::*;
        match self {
            Failed | CommitIncomplete | ReloadFailed | Missed | MissedBackup | AgentSilent | ArchiveCorrupt
            | RestoreTestFailed | OffsiteFailed | OffsiteLagging | CertExpiring => Level::Error,
            StreamLost | Aborted | Expired | Refused | DiskLow | AgentDisconnected | ControlLost | Retry | Skipped
            | AbortRequested | VerifyFailed | Unknown => Level::Warn,
            _ => Level::Info,
        }
    }
}

words! {
    /// Whether an entry's backups keep up with its schedule (`docs/console.md`).
    pub enum Freshness {
        /// No scheduled run has gone unanswered.
        Fresh = "fresh",
        /// A scheduled run is past its grace, and a run is in progress.
        Running = "running",
        /// One scheduled run is past its grace with no success since.
        Overdue = "overdue",
        /// Two or more scheduled runs passed with no success.
        Missed = "missed",
        /// Never succeeded, and no scheduled run is due yet.
        Never = "never",
        /// No schedule: runs only when asked.
        Unscheduled = "unscheduled",
    }
}

// `words!` derives the same list for every enum, so the default is written here.
#[allow(clippy::derivable_impls)]
impl Default for Freshness {
    fn default() -> Self {
        Freshness::Unknown
    }
}

#[allow(clippy::derivable_impls)]
impl Default for AgentStreamState {
    fn default() -> Self {
        AgentStreamState::Connecting
    }
}

impl Freshness {
    /// Whether an operator must look: a backup is late.
    pub fn is_late(self) -> bool {
        matches!(self, Freshness::Overdue | Freshness::Missed)
    }
}

/// An entry's freshness and the facts it was judged from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryFreshness {
    pub state: Freshness,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<String>,
    /// Seconds since the last success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_secs: Option<u64>,
    /// The first scheduled run no success has followed, once past its grace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_since: Option<String>,
    /// Scheduled runs past their grace since the last success (capped).
    #[serde(default)]
    pub missed_runs: u32,
    /// Since when the entry has been known, where no success bounds the count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_since: Option<String>,
}

/// Who did something through the admin API, from the socket's peer credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub uid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.user {
            Some(u) => write!(f, "{u} (uid {})", self.uid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

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
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The operator behind an [`EventKind::Operator`] event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<Actor>,
    /// The off-site bucket, `<storage>/<bucket>`, an event of a whole bucket concerns
    /// (`offsite_lagging`, `offsite_caught_up`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    pub message: String,
}

/// The terminal state of one session, as the server recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    pub session: String,
    pub agent: String,
    pub storage: String,
    pub backup: String,
    pub outcome: SessionOutcome,
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
    /// Always [`DaemonKind::Server`].
    pub daemon: DaemonKind,
    pub version: String,
    pub uptime_secs: u64,
    pub listen: String,
    pub draining: bool,
    pub active_sessions: usize,
    pub connected_agents: usize,
    pub storages: Vec<StorageStatus>,
    /// The server's own certificate and its CA.
    #[serde(default)]
    pub certificates: Vec<CertExpiry>,
    /// The config file it runs with (what a reload re-reads; the console's wizards
    /// edit it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

/// When one of a daemon's own certificates ends (`tls.warn_before` warns).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertExpiry {
    /// `server`, `agent` or `ca`.
    pub cert: String,
    pub subject: String,
    /// Unix seconds; `None` when the file could not be read (see `error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
    /// Off-site copies, per bucket (empty without buckets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<BucketStatus>,
}

/// A session in progress on the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: String,
    pub agent: String,
    pub storage: String,
    pub backup: String,
    pub phase: SessionPhase,
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
    /// Seconds the server spent writing this session's chunks to disk.
    #[serde(default)]
    pub disk_write_secs: f64,
    pub streams: Vec<StreamInfo>,
    /// The run behind this session as its agent last reported it on the control
    /// channel (progress in files, stage times, autoscaler decisions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_run: Option<RunningBackup>,
}

/// One stream (connection) of a session, as the server sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamInfo {
    pub stream: u16,
    pub generation: u32,
    pub state: StreamState,
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
    /// The agent's entries with their schedules; freshness judged by the server
    /// now, from the last report and the server's own commits.
    #[serde(default)]
    pub entries: Vec<EntryStatus>,
    /// Its control channel has been gone longer than `server.agent_silent_after`.
    #[serde(default)]
    pub silent: bool,
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
    /// Members of the tar archive (files, directories, links), from the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    /// Whether a manifest sits next to it.
    pub manifest: bool,
    /// Its copies to the storage's buckets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offsite: Vec<OffsiteCopy>,
    /// The bucket holding it, for an archive no longer on the server's disk (listed
    /// only when asked for with `buckets=true`); absent for one on disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
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

words! {
    pub enum ScalerState {
        Steady = "steady",
        Probing = "probing",
        Cooldown = "cooldown",
        Draining = "draining",
    }
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
    /// Always [`DaemonKind::Agent`].
    pub daemon: DaemonKind,
    pub version: String,
    pub agent: String,
    pub uptime_secs: u64,
    pub server: String,
    pub control_channel: ControlStatus,
    pub entries: Vec<EntryStatus>,
    pub running: Vec<RunningBackup>,
    /// The agent's own certificate and its CA.
    #[serde(default)]
    pub certificates: Vec<CertExpiry>,
    /// The config file it runs with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
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
    #[serde(default)]
    pub freshness: EntryFreshness,
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
    /// Where the archive thread's time went, for the console's bottleneck line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Stages>,
}

/// Where the archive thread's time went so far. What is neither reading the source
/// nor waiting for the network is tar framing and compression.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stages {
    pub elapsed_secs: f64,
    /// Inside `read` on source files.
    pub read_secs: f64,
    /// Blocked on a full send window, plus all the time since the archive was
    /// produced: the network or the server is what the run waits for.
    pub network_secs: f64,
}

impl Stages {
    pub fn compress_secs(&self) -> f64 {
        (self.elapsed_secs - self.read_secs - self.network_secs).max(0.0)
    }
}

/// One stream of a running backup, as the agent sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStreamInfo {
    pub stream: u16,
    pub state: AgentStreamState,
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
    /// Every entry with its schedule and freshness, so the server can tell when a
    /// silent agent's backups fall behind.
    #[serde(default)]
    pub entries: Vec<EntryStatus>,
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

/// Body of `POST /v1/sync`: which storage and bucket to bring up to date (both
/// optional: every storage, every bucket).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
}

/// Body of `POST /v1/enrollment/tokens`: a one-time token for `agent`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub agent: Name,
    /// Seconds the token lives; `None`: the server's `enrollment.token_ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// What agents dial, when the operator names it (else `enrollment.address` or
    /// the server certificate's first name and the listening port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// The answer to a [`TokenRequest`]: everything the agent's host needs. The token is
/// shown once; the server keeps only its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenIssued {
    pub agent: String,
    pub token: String,
    /// RFC 3339.
    pub expires_at: String,
    pub address: String,
    pub ca_pin: String,
    /// The command to run on the agent's host.
    pub command: String,
}

words! {
    /// How a certificate in the server's ledger came to be.
    pub enum CertOrigin {
        /// First enrollment with a token.
        Enrolled = "enrolled",
        /// Renewal over mutual TLS.
        Renewed = "renewed",
        /// Not issued by this server (named by `nbackup cert revoke --serial/--cert`).
        External = "external",
    }
}

/// One certificate the server issued or revoked (`GET /v1/certificates`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    /// Lowercase hex.
    pub serial: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    pub origin: CertOrigin,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

/// Body of `POST /v1/certificates/revoke`: every unexpired certificate of `agent` in
/// the ledger, or one `serial` (with what is known of it, for one the ledger lacks).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<i64>,
}

/// Body of `POST /v1/verify`: which stored archives to re-read (all filters
/// optional; by default each entry's newest archive).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// Every kept archive, not only each entry's newest.
    #[serde(default)]
    pub all: bool,
    /// Only the archive of this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_words_from_a_newer_daemon_as_unknown() {
        let phase: SessionPhase = serde_json::from_str(r#""teleporting""#).expect("fallback");
        assert_eq!(phase, SessionPhase::Unknown);
        let kind: EventKind = serde_json::from_str(r#""quantum_flux""#).expect("fallback");
        assert_eq!((kind, kind.level()), (EventKind::Unknown, Level::Warn));
        let event: Event = serde_json::from_str(
            r#"{"seq":1,"time":"2026-12-01T00:00:00Z","kind":"new_kind","message":"m","extra":1}"#,
        )
        .expect("an event with a new kind and field");
        assert_eq!(event.kind, EventKind::Unknown);
    }

    #[test]
    fn words_round_trip_by_their_wire_names() {
        for k in EventKind::ALL {
            let text = serde_json::to_string(k).expect("ser");
            assert_eq!(text, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<EventKind>(&text).expect("de"), *k);
        }
        for p in SessionPhase::ALL {
            assert_eq!(serde_json::from_str::<SessionPhase>(&format!("\"{p}\"")).expect("de"), *p);
        }
    }
}
