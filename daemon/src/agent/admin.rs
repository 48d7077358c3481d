//! The agent daemon's admin API routes (`docs/admin-api.md`).

use std::sync::Arc;

use axum::Json;
use axum::Router;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;

use nbackup_protocol::admin::{AbortRequest, ActionResult, AgentStatus, EntryStatus, Event, Series, WatchItem};

use super::daemon::{Agentd, Triggered};
use crate::admin::error;

type S = State<Arc<Agentd>>;

pub(super) fn router(d: Arc<Agentd>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/entries", get(entries))
        .route("/v1/entries/{name}", get(entry))
        .route("/v1/entries/{name}/run", post(run))
        .route("/v1/entries/{name}/abort", post(abort))
        .route("/v1/entries/{name}/defer", post(defer))
        .route("/v1/events", get(events))
        .route("/v1/series", get(series))
        .route("/v1/watch", get(watch))
        .route("/v1/reload", post(reload))
        .route("/v1/notify/{name}/test", post(notify_test))
        .route("/metrics", get(metrics))
        .with_state(d)
}

/// Prometheus text: per entry, the last success, whether it is late and whether it
/// runs; the agent's certificates.
async fn metrics(State(d): S) -> Response {
    use crate::admin::{Exposition, label};
    use axum::response::IntoResponse;
    let status = d.status();
    let mut out = Exposition::default();
    let (mut last, mut late, mut running) = (Vec::new(), Vec::new(), Vec::new());
    for e in &status.entries {
        let l = format!("{{backup=\"{}\"}}", label(&e.name));
        let success = e.freshness.last_success.as_deref().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        if let Some(t) = success {
            last.push((l.clone(), t.timestamp() as f64));
        }
        late.push((l.clone(), f64::from(u8::from(e.freshness.state.is_late()))));
        running.push((l, f64::from(u8::from(e.running))));
    }
    out.metric(
        "nbackup_last_success_timestamp_seconds",
        "gauge",
        "Unix time of each entry's last committed backup.",
        &last,
    );
    out.metric("nbackup_entry_late", "gauge", "1 while an entry is overdue or missed against its schedule.", &late);
    out.metric("nbackup_entry_running", "gauge", "1 while an entry's backup runs.", &running);
    crate::admin::cert_expiry(&mut out, &status.certificates, "agent");
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out.finish()).into_response()
}

async fn status(State(d): S) -> Json<AgentStatus> {
    Json(d.status())
}

async fn entries(State(d): S) -> Json<Vec<EntryStatus>> {
    Json(d.entry_statuses())
}

async fn entry(State(d): S, Path(name): Path<String>) -> Result<Json<EntryStatus>, Response> {
    d.entry_statuses()
        .into_iter()
        .find(|e| e.name == name)
        .map(Json)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("no entry {name}")))
}

async fn run(State(d): S, Path(name): Path<String>) -> Result<(StatusCode, Json<ActionResult>), Response> {
    match d.trigger(&name, "operator") {
        Triggered::Started => {
            Ok((StatusCode::ACCEPTED, Json(ActionResult { ok: true, message: format!("{name} started") })))
        }
        Triggered::Skipped => Err(error(StatusCode::CONFLICT, format!("{name} is already running; trigger skipped"))),
        Triggered::Unknown => Err(error(StatusCode::NOT_FOUND, format!("no entry {name}"))),
    }
}

async fn abort(
    State(d): S,
    Path(name): Path<String>,
    body: Option<Json<AbortRequest>>,
) -> Result<Json<ActionResult>, Response> {
    let reason = body.and_then(|b| b.0.reason).unwrap_or_else(|| "aborted by the operator".into());
    if d.abort(&name, &reason) {
        Ok(Json(ActionResult { ok: true, message: format!("{name} aborting") }))
    } else {
        Err(error(StatusCode::CONFLICT, format!("{name} is not running")))
    }
}

#[derive(Deserialize)]
struct DeferQuery {
    seconds: u64,
}

async fn defer(
    State(d): S,
    Path(name): Path<String>,
    Query(q): Query<DeferQuery>,
) -> Result<Json<ActionResult>, Response> {
    match d.defer(&name, q.seconds) {
        Some(message) => Ok(Json(ActionResult { ok: true, message })),
        None => Err(error(StatusCode::NOT_FOUND, format!("no entry {name}"))),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    since: Option<u64>,
    limit: Option<usize>,
}

async fn events(State(d): S, Query(q): Query<EventsQuery>) -> Json<Vec<Event>> {
    Json(d.events_since(q.since.unwrap_or(0), q.limit.unwrap_or(1000)))
}

async fn series(State(d): S) -> Json<Vec<Series>> {
    Json(d.series())
}

async fn notify_test(State(d): S, Path(name): Path<String>) -> Response {
    crate::notify::test_answer(&d.notifier, &name).await
}

async fn reload(State(d): S) -> Result<Json<ActionResult>, Response> {
    crate::daemon::reload_answer(d).await
}

async fn watch(State(d): S) -> Response {
    let events = d.events.subscribe();
    crate::daemon::watch_stream(move || WatchItem::AgentSnapshot { status: d.status() }, events)
}
