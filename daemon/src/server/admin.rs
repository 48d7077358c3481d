//! The server's admin API routes (`docs/admin-api.md`): thin adapters from HTTP to
//! the [`ServerHandle`]. File-system reads run on blocking threads.

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use nbackup_protocol::admin::{
    AbortRequest, ActionResult, AgentInfo, ArchiveInfo, CertRecord, ControlCommand, Event, HistoryRecord,
    RevokeRequest, Series, ServerStatus, SessionInfo, SyncRequest, TokenIssued, TokenRequest, VerifyRequest,
};

use super::handle::{ArchiveFilter, HandleError, ServerHandle};
use crate::admin::error;

type S = State<ServerHandle>;

pub(super) fn router(handle: ServerHandle) -> Router {
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
        .route("/v1/verify", post(verify))
        .route("/v1/notify/{name}/test", post(notify_test))
        .route("/v1/sync", post(sync))
        .route("/v1/enrollment/tokens", post(mint_token))
        .route("/v1/certificates", get(certificates))
        .route("/v1/certificates/revoke", post(revoke))
        .route("/metrics", get(metrics))
        .with_state(handle)
}

/// The JSON error answer for a command the handle did not carry out.
struct Refused(HandleError);

impl From<HandleError> for Refused {
    fn from(e: HandleError) -> Self {
        Refused(e)
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let code = match &self.0 {
            HandleError::BadId(_) => StatusCode::BAD_REQUEST,
            HandleError::NotFound(_) => StatusCode::NOT_FOUND,
            HandleError::Conflict(_) => StatusCode::CONFLICT,
            HandleError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        error(code, self.0.to_string())
    }
}

fn answer(r: Result<String, HandleError>) -> Result<Json<ActionResult>, Refused> {
    r.map(|message| Json(ActionResult { ok: true, message })).map_err(Refused::from)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Response> {
    tokio::task::spawn_blocking(f).await.map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn status(State(h): S) -> Json<ServerStatus> {
    Json(h.status())
}

async fn sessions(State(h): S) -> Json<Vec<SessionInfo>> {
    Json(h.sessions())
}

async fn session(State(h): S, Path(id): Path<String>) -> Result<Json<SessionInfo>, Refused> {
    Ok(Json(h.session(&id)?))
}

async fn abort(
    State(h): S,
    Path(id): Path<String>,
    body: Option<Json<AbortRequest>>,
) -> Result<Json<ActionResult>, Refused> {
    let reason = body.and_then(|b| b.0.reason).unwrap_or_else(|| "no reason given".into());
    answer(h.abort(&id, &reason))
}

async fn rotate(State(h): S, Path((id, n)): Path<(String, u16)>) -> Result<Json<ActionResult>, Refused> {
    answer(h.rotate(&id, n))
}

async fn agents(State(h): S) -> Json<Vec<AgentInfo>> {
    Json(h.agents())
}

async fn agent_run(State(h): S, Path((name, entry)): Path<(String, String)>) -> Result<Json<ActionResult>, Refused> {
    answer(h.agent_command(&name, ControlCommand::RunNow { entry }).await)
}

async fn agent_abort(
    State(h): S,
    Path((name, entry)): Path<(String, String)>,
    body: Option<Json<AbortRequest>>,
) -> Result<Json<ActionResult>, Refused> {
    let reason = body.and_then(|Json(b)| b.reason).unwrap_or_else(|| "aborted by the operator".into());
    answer(h.agent_command(&name, ControlCommand::Abort { entry, reason }).await)
}

#[derive(Deserialize)]
struct DeferQuery {
    seconds: u64,
}

async fn agent_defer(
    State(h): S,
    Path((name, entry)): Path<(String, String)>,
    Query(q): Query<DeferQuery>,
) -> Result<Json<ActionResult>, Refused> {
    answer(h.agent_command(&name, ControlCommand::Defer { entry, seconds: q.seconds }).await)
}

#[derive(Deserialize)]
struct HistoryQuery {
    agent: Option<String>,
    limit: Option<usize>,
}

async fn history(State(h): S, Query(q): Query<HistoryQuery>) -> Json<Vec<HistoryRecord>> {
    Json(h.history(q.agent.as_deref(), q.limit.unwrap_or(100)))
}

#[derive(Deserialize)]
struct EventsQuery {
    since: Option<u64>,
    limit: Option<usize>,
}

async fn events(State(h): S, Query(q): Query<EventsQuery>) -> Result<Json<Vec<Event>>, Response> {
    let (since, limit) = (q.since.unwrap_or(0), q.limit.unwrap_or(1000));
    Ok(Json(blocking(move || h.events(since, limit)).await?))
}

#[derive(Deserialize)]
struct ArchivesQuery {
    agent: Option<String>,
    backup: Option<String>,
    storage: Option<String>,
    /// Also what only the buckets hold (a listing request per entry and bucket).
    buckets: Option<bool>,
}

async fn archives(State(h): S, Query(q): Query<ArchivesQuery>) -> Result<Json<Vec<ArchiveInfo>>, Response> {
    let filter = ArchiveFilter { storage: q.storage, agent: q.agent, backup: q.backup };
    let (on_disk, f, handle) = (filter.clone(), filter.clone(), h.clone());
    let mut all = blocking(move || handle.archives(&on_disk)).await?;
    if q.buckets == Some(true) {
        let more = h.bucket_archives(&f, &all).await;
        all.extend(more);
        // Each entry's archives together, by time stamp and same-second suffix.
        all.sort_by_cached_key(|a| {
            let prefix = format!("{}-{}-", a.agent, a.backup);
            let n = super::storage::parse_archive_name(&a.name, &prefix).map_or(0, |(_, n, _)| n);
            (a.storage.clone(), a.agent.clone(), a.backup.clone(), a.stamp.clone(), n)
        });
    }
    Ok(Json(all))
}

async fn series(State(h): S) -> Json<Vec<Series>> {
    Json(h.series())
}

async fn watch(State(h): S) -> Response {
    let events = h.subscribe();
    crate::daemon::watch_stream(move || h.snapshot(), events)
}

async fn verify(State(h): S, body: Option<Json<VerifyRequest>>) -> Result<(StatusCode, Json<ActionResult>), Response> {
    let request = body.map(|Json(b)| b).unwrap_or_default();
    let message = blocking(move || h.verify(request)).await?.map_err(|e| Refused(e).into_response())?;
    Ok((StatusCode::ACCEPTED, Json(ActionResult { ok: true, message })))
}

async fn sync(State(h): S, body: Option<Json<SyncRequest>>) -> Result<Json<ActionResult>, Response> {
    let request = body.map(|Json(b)| b).unwrap_or_default();
    let message = blocking(move || h.sync(&request)).await?.map_err(|e| Refused(e).into_response())?;
    Ok(Json(ActionResult { ok: true, message }))
}

async fn mint_token(State(h): S, Json(request): Json<TokenRequest>) -> Result<Json<TokenIssued>, Response> {
    blocking(move || h.mint_token(request)).await?.map(Json).map_err(|e| Refused(e).into_response())
}

async fn certificates(State(h): S) -> Json<Vec<CertRecord>> {
    Json(h.certificates())
}

async fn revoke(State(h): S, Json(request): Json<RevokeRequest>) -> Result<Json<ActionResult>, Response> {
    let message = blocking(move || h.revoke(&request)).await?.map_err(|e| Refused(e).into_response())?;
    Ok(Json(ActionResult { ok: true, message }))
}

async fn notify_test(State(h): S, Path(name): Path<String>) -> Response {
    crate::notify::test_answer(&h.notifier(), &name).await
}

async fn reload(State(h): S) -> Result<Json<ActionResult>, Response> {
    crate::daemon::reload_answer(h.reloadable()).await
}

async fn metrics(State(h): S) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.metrics()).into_response()
}
