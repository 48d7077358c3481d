//! The server's admin API routes (`docs/admin-api.md`). Handlers only read
//! snapshots of the server's state or send it commands; file-system work runs on
//! blocking threads, so nothing here slows the data path.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use nbackup_protocol::Name;
use nbackup_protocol::admin::{
    AbortRequest, ActionResult, AgentInfo, ArchiveInfo, ControlCommand, Event, HistoryRecord, Series, ServerStatus,
    SessionInfo, StorageStatus, StreamInfo, WatchItem,
};
use nbackup_protocol::wire::{Reason, Refusal};

use super::session::{Session, lock};
use super::{Outcome, Shared, control};
use crate::admin::error;

type S = State<Arc<Shared>>;

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/sessions", get(sessions))
        .route("/v1/sessions/{id}", get(session))
        .route("/v1/sessions/{id}/abort", post(abort))
        .route("/v1/sessions/{id}/streams/{n}/rotate", post(rotate))
        .route("/v1/agents", get(agents))
        .route("/v1/agents/{name}/entries/{entry}/run", post(agent_run))
        .route("/v1/agents/{name}/entries/{entry}/defer", post(agent_defer))
        .route("/v1/agents/{name}/entries/{entry}/abort", post(agent_abort))
        .route("/v1/history", get(history))
        .route("/v1/events", get(events))
        .route("/v1/archives", get(archives))
        .route("/v1/series", get(series))
        .route("/v1/watch", get(watch))
        .route("/v1/reload", post(reload))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

fn storage_status(shared: &Shared) -> Vec<StorageStatus> {
    shared
        .live()
        .storages
        .values()
        .map(|a| {
            let (free_bytes, total_bytes) = a.disk_space().unwrap_or((0, 0));
            let (mut archives, mut archive_bytes) = (0, 0);
            for (agent, backup) in entries_of(&a.cfg.base_dir) {
                for f in a.list(&agent, &backup).unwrap_or_default() {
                    archives += 1;
                    archive_bytes += f.size;
                }
            }
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
            }
        })
        .collect()
}

/// `(agent, backup)` directories under a storage.
fn entries_of(base: &std::path::Path) -> Vec<(Name, Name)> {
    let mut out = Vec::new();
    let Ok(agents) = std::fs::read_dir(base) else { return out };
    for a in agents.flatten() {
        let Some(agent) = a.file_name().to_str().and_then(|n| Name::new(n).ok()) else { continue };
        let Ok(backups) = std::fs::read_dir(a.path()) else { continue };
        for b in backups.flatten() {
            if let Some(backup) = b.file_name().to_str().and_then(|n| Name::new(n).ok()) {
                out.push((agent.clone(), backup));
            }
        }
    }
    out.sort();
    out
}

fn server_status(shared: &Shared) -> ServerStatus {
    ServerStatus {
        version: crate::VERSION.to_string(),
        uptime_secs: shared.started.elapsed().as_secs(),
        listen: shared.listen.to_string(),
        draining: shared.draining.load(Ordering::SeqCst),
        active_sessions: lock(&shared.registry).sessions.len(),
        connected_agents: shared.agents.connected(),
        storages: storage_status(shared),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Response> {
    tokio::task::spawn_blocking(f).await.map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn status(State(shared): S) -> Result<Json<ServerStatus>, Response> {
    Ok(Json(blocking(move || server_status(&shared)).await?))
}

/// A session as the server sees it, completed with what its agent last reported
/// over the control channel (expected size, ETA, per-stream round trips), if it has
/// one connected.
fn session_info(shared: &Shared, s: &Session) -> SessionInfo {
    let p = &s.params;
    let id = p.id.to_string();
    let reported = shared.agents.running(p.key.agent.as_str(), &id);
    let streams: Vec<StreamInfo> = s
        .streams()
        .into_iter()
        .map(|v| {
            let rate_bps = v.stats.rate.rate();
            let state = match (v.attached, v.stats.rate.active()) {
                (false, _) => "closed",
                (true, true) => "receiving",
                (true, false) => "idle",
            };
            let rtt_ms = reported
                .as_ref()
                .and_then(|r| r.stream_table.iter().find(|t| t.stream == v.stream))
                .and_then(|t| t.rtt_ms);
            StreamInfo {
                stream: v.stream,
                generation: v.generation,
                state: state.into(),
                peer: lock(&v.stats.peer).clone(),
                bytes: v.stats.bytes.load(Ordering::Relaxed),
                rate_bps,
                reconnects: v.joins.saturating_sub(1),
                resent_chunks: v.stats.resent.load(Ordering::Relaxed),
                rtt_ms,
            }
        })
        .collect();
    SessionInfo {
        id,
        agent: p.key.agent.to_string(),
        storage: p.key.storage.to_string(),
        backup: p.key.backup.to_string(),
        phase: if s.attached_streams() == 0 { "waiting" } else { "receiving" }.into(),
        started: p.started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        bytes_received: s.bytes_received.load(Ordering::Relaxed),
        rate_bps: s.rate(),
        contiguous_chunks: s.contiguous(),
        duplicate_chunks: s.duplicates.load(Ordering::Relaxed),
        idle_secs: s.idle_for().as_secs_f64(),
        estimate_bytes: reported.as_ref().and_then(|r| r.estimate_bytes),
        source_bytes_read: reported.as_ref().map(|r| r.bytes_read),
        eta_secs: reported.as_ref().and_then(|r| r.eta_secs),
        streams,
    }
}

fn session_list(shared: &Shared) -> Vec<SessionInfo> {
    let sessions: Vec<Arc<Session>> = lock(&shared.registry).sessions.values().cloned().collect();
    let mut v: Vec<SessionInfo> = sessions.iter().map(|s| session_info(shared, s)).collect();
    v.sort_by(|a, b| a.started.cmp(&b.started).then(a.id.cmp(&b.id)));
    v
}

fn agent_list(shared: &Shared) -> Vec<AgentInfo> {
    let open: Vec<(String, String)> = lock(&shared.registry)
        .sessions
        .values()
        .map(|s| (s.params.key.agent.to_string(), s.id().to_string()))
        .collect();
    control::with_sessions(shared.agents.list(), &open)
}

async fn sessions(State(shared): S) -> Json<Vec<SessionInfo>> {
    Json(session_list(&shared))
}

/// The open session `id`, or the status and message to answer with.
fn find(shared: &Shared, id: &str) -> Result<Arc<Session>, (StatusCode, String)> {
    let sid = nbackup_protocol::SessionId::from_hex(id)
        .ok_or_else(|| (StatusCode::BAD_REQUEST, format!("{id:?} is not a session id")))?;
    lock(&shared.registry)
        .sessions
        .get(&sid)
        .cloned()
        .ok_or_else(|| (StatusCode::NOT_FOUND, format!("no session {id} in progress")))
}

async fn session(State(shared): S, Path(id): Path<String>) -> Result<Json<SessionInfo>, Response> {
    let s = find(&shared, &id).map_err(|(code, msg)| error(code, msg))?;
    Ok(Json(session_info(&shared, &s)))
}

async fn abort(
    State(shared): S,
    Path(id): Path<String>,
    body: Option<Json<AbortRequest>>,
) -> Result<Json<ActionResult>, Response> {
    let s = find(&shared, &id).map_err(|(code, msg)| error(code, msg))?;
    let reason = body.and_then(|b| b.0.reason).unwrap_or_else(|| "no reason given".into());
    let refusal = Refusal::new(Reason::Cancelled, format!("aborted by the operator: {reason}"));
    shared.end_session(&s, Outcome::Failed(refusal));
    Ok(Json(ActionResult { ok: true, message: format!("session {id} aborted") }))
}

async fn rotate(State(shared): S, Path((id, n)): Path<(String, u16)>) -> Result<Json<ActionResult>, Response> {
    let s = find(&shared, &id).map_err(|(code, msg)| error(code, msg))?;
    if !s.rotate(n) {
        return Err(error(StatusCode::NOT_FOUND, format!("session {id} has no stream {n} attached")));
    }
    Ok(Json(ActionResult { ok: true, message: format!("stream {n} of session {id} closed; the agent re-joins it") }))
}

async fn agents(State(shared): S) -> Json<Vec<AgentInfo>> {
    Json(agent_list(&shared))
}

async fn send_command(shared: &Shared, agent: &str, command: ControlCommand) -> Result<Json<ActionResult>, Response> {
    match shared.agents.command(agent, command).await {
        Ok(r) if r.ok => Ok(Json(ActionResult { ok: true, message: r.message })),
        Ok(r) => Err(error(StatusCode::CONFLICT, r.message)),
        Err(e) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e)),
    }
}

async fn agent_run(
    State(shared): S,
    Path((name, entry)): Path<(String, String)>,
) -> Result<Json<ActionResult>, Response> {
    send_command(&shared, &name, ControlCommand::RunNow { entry }).await
}

async fn agent_abort(
    State(shared): S,
    Path((name, entry)): Path<(String, String)>,
    body: Option<Json<AbortRequest>>,
) -> Result<Json<ActionResult>, Response> {
    let reason = body.and_then(|Json(b)| b.reason).unwrap_or_else(|| "aborted by the operator".into());
    send_command(&shared, &name, ControlCommand::Abort { entry, reason }).await
}

#[derive(Deserialize)]
struct DeferQuery {
    seconds: u64,
}

async fn agent_defer(
    State(shared): S,
    Path((name, entry)): Path<(String, String)>,
    Query(q): Query<DeferQuery>,
) -> Result<Json<ActionResult>, Response> {
    send_command(&shared, &name, ControlCommand::Defer { entry, seconds: q.seconds }).await
}

#[derive(Deserialize)]
struct HistoryQuery {
    agent: Option<String>,
    limit: Option<usize>,
}

async fn history(State(shared): S, Query(q): Query<HistoryQuery>) -> Json<Vec<HistoryRecord>> {
    Json(shared.history.list(q.agent.as_deref(), q.limit.unwrap_or(100)))
}

#[derive(Deserialize)]
struct EventsQuery {
    since: Option<u64>,
    limit: Option<usize>,
}

async fn events(State(shared): S, Query(q): Query<EventsQuery>) -> Result<Json<Vec<Event>>, Response> {
    let (since, limit) = (q.since.unwrap_or(0), q.limit.unwrap_or(1000));
    Ok(Json(blocking(move || shared.events.since(since, limit)).await?))
}

#[derive(Deserialize)]
struct ArchivesQuery {
    agent: Option<String>,
    backup: Option<String>,
    storage: Option<String>,
}

async fn archives(State(shared): S, Query(q): Query<ArchivesQuery>) -> Result<Json<Vec<ArchiveInfo>>, Response> {
    Ok(Json(
        blocking(move || {
            let mut out = Vec::new();
            for area in shared.live().storages.values() {
                if q.storage.as_deref().is_some_and(|s| s != area.cfg.name.as_str()) {
                    continue;
                }
                for (agent, backup) in entries_of(&area.cfg.base_dir) {
                    if q.agent.as_deref().is_some_and(|a| a != agent.as_str())
                        || q.backup.as_deref().is_some_and(|b| b != backup.as_str())
                    {
                        continue;
                    }
                    for f in area.list(&agent, &backup).unwrap_or_default() {
                        let sidecar = super::storage::sidecar_path(&f.path);
                        let manifest = std::fs::read_to_string(&sidecar)
                            .ok()
                            .and_then(|t| nbackup_protocol::manifest::Manifest::from_json(&t).ok());
                        out.push(ArchiveInfo {
                            storage: area.cfg.name.to_string(),
                            agent: agent.to_string(),
                            backup: backup.to_string(),
                            name: f.name,
                            size: f.size,
                            stamp: f.stamp,
                            sha256: manifest.as_ref().map(|m| m.sha256.clone()),
                            manifest: manifest.is_some(),
                        });
                    }
                }
            }
            out
        })
        .await?,
    ))
}

async fn series(State(shared): S) -> Json<Vec<Series>> {
    Json(shared.timeline.snapshot())
}

fn snapshot(shared: &Shared) -> WatchItem {
    WatchItem::ServerSnapshot {
        status: server_status(shared),
        sessions: session_list(shared),
        agents: agent_list(shared),
    }
}

/// NDJSON: a snapshot at once and every second, and every event as it happens.
async fn watch(State(shared): S) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(64);
    let mut events = shared.events.subscribe();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let item = tokio::select! {
                _ = tick.tick() => {
                    let s = shared.clone();
                    match tokio::task::spawn_blocking(move || snapshot(&s)).await {
                        Ok(item) => item,
                        Err(_) => return,
                    }
                }
                e = events.recv() => match e {
                    Ok(event) => WatchItem::Event { event },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                },
            };
            let mut line = serde_json::to_string(&item).unwrap_or_default();
            line.push('\n');
            if tx.send(Ok(line)).await.is_err() {
                return; // the client went away
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response()
}

async fn reload(State(shared): S) -> Result<Json<ActionResult>, Response> {
    match blocking(move || shared.reload()).await? {
        Ok(message) => Ok(Json(ActionResult { ok: true, message })),
        Err(e) => Err(error(StatusCode::UNPROCESSABLE_ENTITY, e)),
    }
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Prometheus text exposition format.
fn render_metrics(shared: &Shared) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let sessions = lock(&shared.registry).sessions.len();
    metric("nbackup_sessions_active", "gauge", "Backup sessions in progress.", &[(String::new(), sessions as f64)]);
    metric(
        "nbackup_agents_connected",
        "gauge",
        "Agents with a control channel connected.",
        &[(String::new(), shared.agents.connected() as f64)],
    );
    metric(
        "nbackup_received_bytes_total",
        "counter",
        "Archive bytes received since the server started.",
        &[(String::new(), shared.metrics.bytes_received.load(Ordering::Relaxed) as f64)],
    );
    let live = shared.live();
    let per_storage = |m: &std::sync::Mutex<BTreeMap<String, u64>>| -> Vec<(String, f64)> {
        let m = lock(m);
        live.storages
            .keys()
            .map(|s| (format!("{{storage=\"{}\"}}", label(s.as_str())), m.get(s.as_str()).copied().unwrap_or(0) as f64))
            .collect()
    };
    metric(
        "nbackup_backups_committed_total",
        "counter",
        "Backups committed since the server started, per storage.",
        &per_storage(&shared.metrics.committed),
    );
    metric(
        "nbackup_backups_failed_total",
        "counter",
        "Sessions that ended without a commit since the server started, per storage.",
        &per_storage(&shared.metrics.failed),
    );
    let last: Vec<(String, f64)> = lock(&shared.metrics.last_success)
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
    for a in live.storages.values() {
        let (f, t) = a.disk_space().unwrap_or((0, 0));
        let l = format!("{{storage=\"{}\"}}", label(a.cfg.name.as_str()));
        free.push((l.clone(), f as f64));
        total.push((l, t as f64));
    }
    metric("nbackup_storage_free_bytes", "gauge", "Bytes available on each storage's filesystem.", &free);
    metric("nbackup_storage_size_bytes", "gauge", "Size of each storage's filesystem.", &total);
    out
}

async fn metrics(State(shared): S) -> Result<Response, Response> {
    let text = blocking(move || render_metrics(&shared)).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}
