//! The narrow handle through which the admin API reaches the server: snapshots to
//! read and commands to send, each answering with API types. It never exposes the
//! registry, sessions or telemetry themselves. Snapshots are built from atomics and
//! caches, so they answer at once even while a storage is frozen.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use nbackup_protocol::admin::{
    AgentInfo, ArchiveInfo, ControlCommand, DaemonKind, Event, EventKind, HistoryRecord, Series, ServerStatus,
    SessionInfo, StorageStatus, StreamInfo, StreamState, WatchItem,
};
use nbackup_protocol::wire::{Reason, Refusal};
use nbackup_protocol::{Name, SessionId};

use super::Server;
use super::control;
use super::registry::{NotEnded, Outcome, SessionView};
use super::storage::{ArchiveFile, StorageArea};
use crate::daemon::Reloadable;

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("{0:?} is not a session id")]
    BadId(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Which archives to list.
#[derive(Debug, Default, Clone)]
pub struct ArchiveFilter {
    pub storage: Option<String>,
    pub agent: Option<String>,
    pub backup: Option<String>,
}

/// One entry's archives in commit order, as a filter selected them.
pub struct EntryArchives {
    pub area: Arc<StorageArea>,
    pub agent: Name,
    pub backup: Name,
    pub files: Vec<ArchiveFile>,
}

impl ArchiveFilter {
    /// Every matching entry of every matching storage, with its archives. Blocking.
    pub(crate) fn select(&self, server: &Server) -> Vec<EntryArchives> {
        let mut out = Vec::new();
        for area in server.live().storages.values() {
            if self.storage.as_deref().is_some_and(|s| s != area.cfg.name.as_str()) {
                continue;
            }
            for (agent, backup) in area.entries().unwrap_or_default() {
                if self.agent.as_deref().is_some_and(|a| a != agent.as_str())
                    || self.backup.as_deref().is_some_and(|b| b != backup.as_str())
                {
                    continue;
                }
                let files = area.list(&agent, &backup).unwrap_or_default();
                out.push(EntryArchives { area: area.clone(), agent, backup, files });
            }
        }
        out
    }
}

#[derive(Clone)]
pub struct ServerHandle(Arc<Server>);

impl ServerHandle {
    pub(crate) fn new(server: Arc<Server>) -> Self {
        ServerHandle(server)
    }

    pub fn status(&self) -> ServerStatus {
        let s = &self.0;
        let storages = s
            .live()
            .storages
            .values()
            .map(|a| {
                let (free_bytes, total_bytes) = s.disk.space(&a.cfg.name).unwrap_or((0, 0));
                let (archives, archive_bytes) = s.disk.usage(&a.cfg.name).unwrap_or((0, 0));
                StorageStatus {
                    name: a.cfg.name.to_string(),
                    base_dir: a.cfg.base_dir.display().to_string(),
                    compression: a.cfg.compression,
                    level: a.cfg.level,
                    max_backups: a.cfg.max_backups,
                    free_bytes,
                    total_bytes,
                    archives,
                    archive_bytes,
                    buckets: s.offsite.status(&a.cfg.name),
                }
            })
            .collect();
        ServerStatus {
            daemon: DaemonKind::Server,
            version: crate::VERSION.to_string(),
            uptime_secs: s.started.elapsed().as_secs(),
            listen: s.listen.to_string(),
            draining: s.draining(),
            active_sessions: s.registry.count(),
            connected_agents: s.agents.connected(),
            storages,
            certificates: s.certs.snapshot(),
            config: s.config_path.as_ref().map(|p| p.display().to_string()),
        }
    }

    /// A session as the server sees it, completed with what its agent last reported
    /// over the control channel (expected size, ETA, per-stream round trips).
    fn session_info(&self, v: &SessionView) -> SessionInfo {
        let p = &v.params;
        let id = p.id.to_string();
        let reported = self.0.agents.running(p.key.agent.as_str(), &id);
        let streams: Vec<StreamInfo> = v
            .streams
            .iter()
            .map(|st| {
                let state = match (st.attached, st.stats.rate.active()) {
                    (false, _) => StreamState::Closed,
                    (true, true) => StreamState::Receiving,
                    (true, false) => StreamState::Idle,
                };
                let rtt_ms = reported
                    .as_ref()
                    .and_then(|r| r.stream_table.iter().find(|t| t.stream == st.stream))
                    .and_then(|t| t.rtt_ms);
                StreamInfo {
                    stream: st.stream,
                    generation: st.generation,
                    state,
                    peer: crate::lock(&st.stats.peer).clone(),
                    bytes: st.stats.bytes.load(Ordering::Relaxed),
                    rate_bps: st.stats.rate.rate(),
                    reconnects: st.joins.saturating_sub(1),
                    resent_chunks: st.stats.resent.load(Ordering::Relaxed),
                    rtt_ms,
                }
            })
            .collect();
        let s = v.session.as_ref();
        SessionInfo {
            id,
            agent: p.key.agent.to_string(),
            storage: p.key.storage.to_string(),
            backup: p.key.backup.to_string(),
            phase: v.phase.word(),
            started: p.started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            bytes_received: s.map_or(0, |s| s.bytes_received.load(Ordering::Relaxed)),
            rate_bps: s.map_or(0.0, |s| s.rate.rate()),
            contiguous_chunks: s.map_or(0, |s| s.contiguous()),
            duplicate_chunks: s.map_or(0, |s| s.duplicates.load(Ordering::Relaxed)),
            idle_secs: s.map_or(0.0, |s| s.idle_for().as_secs_f64()),
            estimate_bytes: reported.as_ref().and_then(|r| r.estimate_bytes),
            source_bytes_read: reported.as_ref().map(|r| r.bytes_read),
            eta_secs: reported.as_ref().and_then(|r| r.eta_secs),
            disk_write_secs: s.map_or(0.0, |s| s.disk_nanos.load(Ordering::Relaxed) as f64 / 1e9),
            streams,
            agent_run: reported,
        }
    }

    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.0.registry.sessions().iter().map(|v| self.session_info(v)).collect()
    }

    fn find(&self, id: &str) -> Result<SessionView, HandleError> {
        let sid = SessionId::from_hex(id).ok_or_else(|| HandleError::BadId(id.to_string()))?;
        self.0
            .registry
            .sessions()
            .into_iter()
            .find(|v| v.params.id == sid)
            .ok_or_else(|| HandleError::NotFound(format!("no session {id} in progress")))
    }

    pub fn session(&self, id: &str) -> Result<SessionInfo, HandleError> {
        Ok(self.session_info(&self.find(id)?))
    }

    /// Ends a session at the operator's request; a committing one cannot be.
    pub fn abort(&self, id: &str, reason: &str) -> Result<String, HandleError> {
        let v = self.find(id)?;
        let refusal = Refusal::new(Reason::Cancelled, format!("aborted by the operator: {reason}"));
        match self.0.registry.end(v.params.id, Outcome::Failed(refusal)) {
            Ok(()) => Ok(format!("session {id} aborted")),
            Err(NotEnded::Committing) => {
                Err(HandleError::Conflict(format!("session {id} is committing; its commit decides how it ends")))
            }
            Err(NotEnded::Gone) => Err(HandleError::NotFound(format!("session {id} ended meanwhile"))),
        }
    }

    pub fn rotate(&self, id: &str, stream: u16) -> Result<String, HandleError> {
        let v = self.find(id)?;
        if !self.0.registry.rotate(v.params.id, stream) {
            return Err(HandleError::NotFound(format!("session {id} has no stream {stream} attached")));
        }
        Ok(format!("stream {stream} of session {id} closed; the agent re-joins it"))
    }

    pub fn agents(&self) -> Vec<AgentInfo> {
        let open: Vec<(String, String)> = self
            .0
            .registry
            .sessions()
            .iter()
            .map(|v| (v.params.key.agent.to_string(), v.params.id.to_string()))
            .collect();
        let mut agents = control::with_sessions(self.0.agents.list(), &open);
        let committed = crate::lock(&self.0.telemetry.metrics.last_success).clone();
        let now = chrono::Utc::now();
        let silent_after = chrono::Duration::from_std(self.0.live().config.agent_silent_after).unwrap_or_default();
        for a in &mut agents {
            let seen = chrono::DateTime::parse_from_rfc3339(&a.last_seen).map(|t| t.with_timezone(&chrono::Utc));
            a.silent = !a.connected && seen.is_ok_and(|t| now - t > silent_after);
            for e in &mut a.entries {
                let ours = committed
                    .get(&(a.name.clone(), e.name.clone()))
                    .and_then(|t| chrono::DateTime::from_timestamp(*t as i64, 0));
                e.running &= a.connected;
                e.freshness = nbackup_protocol::freshness::reassess(e, ours, e.running, now);
            }
        }
        agents
    }

    /// Sends an operator command to an agent over its control channel.
    pub async fn agent_command(&self, agent: &str, command: ControlCommand) -> Result<String, HandleError> {
        match self.0.agents.command(agent, command).await {
            Ok(r) if r.ok => Ok(r.message),
            Ok(r) => Err(HandleError::Conflict(r.message)),
            Err(e) => Err(HandleError::Unavailable(e)),
        }
    }

    pub fn history(&self, agent: Option<&str>, limit: usize) -> Vec<HistoryRecord> {
        self.0.telemetry.history.list(agent, limit)
    }

    pub fn events(&self, since: u64, limit: usize) -> Vec<Event> {
        self.0.telemetry.events.since(since, limit)
    }

    pub fn series(&self) -> Vec<Series> {
        self.0.telemetry.timeline.snapshot()
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.0.telemetry.events.subscribe()
    }

    pub fn snapshot(&self) -> WatchItem {
        WatchItem::ServerSnapshot { status: self.status(), sessions: self.sessions(), agents: self.agents() }
    }

    /// Archives in commit order, read from the storages. Blocking.
    pub fn archives(&self, q: &ArchiveFilter) -> Vec<ArchiveInfo> {
        let mut out = Vec::new();
        for e in q.select(&self.0) {
            for f in e.files {
                let offsite = offsite_copies(&e.area.entry_dir(&e.agent, &e.backup).join(&f.name));
                out.push(ArchiveInfo {
                    storage: e.area.cfg.name.to_string(),
                    agent: e.agent.to_string(),
                    backup: e.backup.to_string(),
                    name: f.name,
                    size: f.size,
                    stamp: f.stamp,
                    sha256: f.manifest.as_ref().map(|m| m.sha256.clone()),
                    files: f.manifest.as_ref().map(|m| m.entries),
                    manifest: f.manifest.is_some(),
                    offsite,
                    bucket: None,
                });
            }
        }
        out
    }

    /// The archives of the entries `q` selects that only the storages' buckets hold
    /// (offloaded, kept by an archive bucket, or lost from disk), each named once,
    /// described from the manifest beside it. A bucket that cannot be listed is
    /// logged and left out.
    pub async fn bucket_archives(&self, q: &ArchiveFilter, on_disk: &[ArchiveInfo]) -> Vec<ArchiveInfo> {
        let server = self.0.clone();
        let filter = q.clone();
        let entries = tokio::task::spawn_blocking(move || {
            filter.select(&server).into_iter().map(|e| (e.area, e.agent, e.backup)).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut out = Vec::new();
        for (area, agent, backup) in entries {
            let storage = area.cfg.name.to_string();
            let known = on_disk
                .iter()
                .filter(|a| a.storage == storage && a.agent == agent.as_str() && a.backup == backup.as_str())
                .map(|a| (backup.clone(), a.name.clone()))
                .collect();
            for e in super::offsite::objects::elsewhere(&area.cfg.buckets, &agent, Some(&backup), known).await {
                let (o, m) = (e.stored, e.manifest);
                out.push(ArchiveInfo {
                    storage: storage.clone(),
                    agent: agent.to_string(),
                    backup: backup.to_string(),
                    name: o.name,
                    size: o.size,
                    stamp: o.stamp,
                    sha256: m.as_ref().map(|m| m.sha256.clone()),
                    files: m.as_ref().map(|m| m.entries),
                    manifest: m.is_some(),
                    offsite: Vec::new(),
                    bucket: Some(e.bucket.to_string()),
                });
            }
        }
        out
    }

    /// Re-reads the configuration. Blocking.
    pub fn reload(&self) -> Result<String, String> {
        self.0.reload()
    }

    pub(crate) fn reloadable(&self) -> Arc<Server> {
        self.0.clone()
    }

    /// Starts verifying what `q` selects; the results go to the event log. One job
    /// at a time. Blocking (lists the storages).
    pub fn verify(&self, q: nbackup_protocol::admin::VerifyRequest) -> Result<String, HandleError> {
        let filter = ArchiveFilter { storage: q.storage, agent: q.agent, backup: q.backup };
        // Naming one archive looks through all of them.
        let newest = !q.all && q.archive.is_none();
        match super::verify::start(&self.0, &filter, newest, q.archive.as_deref()) {
            Ok((n, _job)) => Ok(format!(
                "verifying {n} archive(s); results in the event log (verified, archive_corrupt, verify_done)"
            )),
            Err(super::verify::NotStarted::Busy) => {
                Err(HandleError::Conflict("a verification is already running".into()))
            }
            Err(super::verify::NotStarted::NothingMatches) => Err(HandleError::NotFound("no archive matches".into())),
        }
    }

    /// Queues what buckets lack (`nbackup ctl sync`). Blocking.
    pub fn sync(&self, request: &nbackup_protocol::admin::SyncRequest) -> Result<String, HandleError> {
        let report = self.0.offsite.sync(&self.0, request.storage.as_deref(), request.bucket.as_deref())?;
        if report.is_empty() {
            return Err(HandleError::NotFound("no storage has buckets configured".into()));
        }
        let parts: Vec<String> = report
            .iter()
            .map(|(storage, bucket, queued, owed)| {
                format!("{storage}/{bucket}: {queued} archive(s) queued, {owed} already owed")
            })
            .collect();
        Ok(format!(
            "{}; an archive already in its bucket (same size and SHA-256) is verified, not uploaded again",
            parts.join("; ")
        ))
    }

    /// A one-time enrollment token (`nbackup cert token`). Blocking.
    pub fn mint_token(
        &self,
        request: nbackup_protocol::admin::TokenRequest,
    ) -> Result<nbackup_protocol::admin::TokenIssued, HandleError> {
        super::enroll::mint(&self.0, request)
    }

    /// The certificates this server issued or revoked, oldest first.
    pub fn certificates(&self) -> Vec<nbackup_protocol::admin::CertRecord> {
        self.0.enroller.certificates()
    }

    /// Revokes and reloads the TLS configuration (`nbackup cert revoke`). Blocking.
    pub fn revoke(&self, request: &nbackup_protocol::admin::RevokeRequest) -> Result<String, HandleError> {
        super::enroll::revoke(&self.0, request)
    }

    pub fn notifier(&self) -> Arc<crate::notify::Notifier> {
        self.0.notifier.clone()
    }

    /// Prometheus text exposition format.
    pub fn metrics(&self) -> String {
        let s = &self.0;
        let m = &s.telemetry.metrics;
        let mut out = crate::admin::Exposition::default();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            out.metric(name, kind, help, samples);
        };
        let one = |v: f64| [(String::new(), v)];
        metric("nbackup_sessions_active", "gauge", "Backup sessions in progress.", &one(s.registry.count() as f64));
        metric(
            "nbackup_agents_connected",
            "gauge",
            "Agents with a control channel connected.",
            &one(s.agents.connected() as f64),
        );
        metric(
            "nbackup_received_bytes_total",
            "counter",
            "Archive bytes received since the server started.",
            &one(m.bytes_received.load(Ordering::Relaxed) as f64),
        );
        let live = s.live();
        let per_storage = |c: &std::sync::Mutex<BTreeMap<String, u64>>| -> Vec<(String, f64)> {
            let c = crate::lock(c);
            live.storages.keys().map(|n| (storage_label(n), c.get(n.as_str()).copied().unwrap_or(0) as f64)).collect()
        };
        metric(
            "nbackup_backups_committed_total",
            "counter",
            "Backups committed since the server started, per storage.",
            &per_storage(&m.committed),
        );
        metric(
            "nbackup_backups_failed_total",
            "counter",
            "Sessions that ended without a commit since the server started, per storage.",
            &per_storage(&m.failed),
        );
        metric(
            "nbackup_commits_incomplete_total",
            "counter",
            "Commits whose steps after the rename failed and are finished at the next start.",
            &one(m.incomplete.load(Ordering::Relaxed) as f64),
        );
        let last: Vec<(String, f64)> = crate::lock(&m.last_success)
            .iter()
            .map(|((a, b), t)| (format!("{{agent=\"{}\",backup=\"{}\"}}", label(a), label(b)), *t as f64))
            .collect();
        metric(
            "nbackup_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the last committed archive per agent and backup.",
            &last,
        );
        let (mut free, mut total) = (Vec::new(), Vec::new());
        for n in live.storages.keys() {
            let (f, t) = s.disk.space(n).unwrap_or((0, 0));
            free.push((storage_label(n), f as f64));
            total.push((storage_label(n), t as f64));
        }
        metric("nbackup_storage_free_bytes", "gauge", "Bytes available on each storage's filesystem.", &free);
        metric("nbackup_storage_size_bytes", "gauge", "Size of each storage's filesystem.", &total);
        let (mut owed, mut failing, mut oldest, mut sent) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for n in live.storages.keys() {
            for b in s.offsite.status(n) {
                let l = format!("{{storage=\"{}\",bucket=\"{}\"}}", label(n.as_str()), label(&b.name));
                owed.push((l.clone(), b.owed as f64));
                failing.push((l.clone(), b.failing as f64));
                oldest.push((l.clone(), b.oldest_owed_secs.unwrap_or(0) as f64));
                sent.push((l, b.sent_bytes as f64));
            }
        }
        metric("nbackup_offsite_owed", "gauge", "Archives whose copy to a bucket is owed (docs/offsite.md).", &owed);
        metric("nbackup_offsite_failing", "gauge", "Owed copies whose last attempt failed.", &failing);
        metric(
            "nbackup_offsite_oldest_owed_seconds",
            "gauge",
            "Age of the oldest owed copy per bucket (0: none owed).",
            &oldest,
        );
        metric("nbackup_offsite_sent_bytes_total", "counter", "Request bytes sent to each bucket.", &sent);

        let agents = self.agents();
        let (mut late, mut runs, mut silent) = (Vec::new(), Vec::new(), Vec::new());
        for a in &agents {
            silent.push((format!("{{agent=\"{}\"}}", label(&a.name)), f64::from(u8::from(a.silent))));
            for e in &a.entries {
                let l = format!("{{agent=\"{}\",backup=\"{}\"}}", label(&a.name), label(&e.name));
                late.push((l.clone(), f64::from(u8::from(e.freshness.state.is_late()))));
                runs.push((l, f64::from(e.freshness.missed_runs)));
            }
        }
        metric(
            "nbackup_entry_late",
            "gauge",
            "1 while an entry is overdue or missed against its schedule (docs/console.md, Freshness).",
            &late,
        );
        metric(
            "nbackup_entry_missed_runs",
            "gauge",
            "Scheduled runs past their grace since the entry's last success.",
            &runs,
        );
        metric(
            "nbackup_agent_silent",
            "gauge",
            "1 while an agent's control channel has been gone longer than server.agent_silent_after.",
            &silent,
        );
        crate::admin::cert_expiry(&mut out, &s.certs.snapshot(), "server");
        out.finish()
    }
}

/// What the control channel's code may reach: the agents table it owns, the event
/// log, the cached free space, and the drain signal — nothing else of the server.
pub(crate) struct ControlHandle(Arc<Server>);

impl ControlHandle {
    pub(crate) fn new(server: Arc<Server>) -> Self {
        ControlHandle(server)
    }

    pub fn agents(&self) -> &control::Agents {
        &self.0.agents
    }

    /// Free bytes of the fullest storage, from the disk cache.
    pub fn min_free(&self) -> u64 {
        self.0.disk.min_free()
    }

    pub fn record(&self, kind: EventKind, agent: &str, message: String) {
        let who = crate::state::EventSpec { agent: Some(agent), ..Default::default() };
        self.0.telemetry.events.record(kind, who, message);
    }

    /// Resolves when the server starts shutting down.
    pub async fn draining(&self) {
        self.0.drain.cancelled().await
    }
}

use crate::admin::label;

fn storage_label(n: &Name) -> String {
    format!("{{storage=\"{}\"}}", label(n.as_str()))
}

/// What an archive's sidecar says of its copies (nothing if it has none or it is
/// unreadable: listing never fails on it).
fn offsite_copies(archive: &std::path::Path) -> Vec<nbackup_protocol::admin::OffsiteCopy> {
    let Ok(Some(c)) = super::offsite::state::Copies::load(archive) else { return Vec::new() };
    c.buckets
        .into_iter()
        .map(|(bucket, c)| nbackup_protocol::admin::OffsiteCopy {
            bucket,
            state: c.state,
            attempts: c.attempts,
            error: c.error,
            parts_done: c.upload.map_or(0, |u| u.parts.len() as u64),
            verified_at: c.verified_at,
        })
        .collect()
}
