//! What the server and the agent daemon share as daemons: their start options, the
//! admin socket's start, the reload loop and the admin API's reload and NDJSON watch
//! answers. Written once, used by both.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use nbackup_protocol::admin::{ActionResult, Event, WatchItem};

/// What a daemon runs with besides its configuration.
#[derive(Default)]
pub struct DaemonOptions {
    /// The file to re-read on reload (SIGHUP, `POST /v1/reload`).
    pub config_path: Option<PathBuf>,
    /// Serve the admin API on the configured (or default) socket.
    pub admin: bool,
    /// Keep history, events and results under `state_dir` (otherwise in memory only).
    pub persist_state: bool,
    /// Reload requests, e.g. from SIGHUP.
    pub reload: Option<mpsc::Receiver<()>>,
    /// Told once the daemon serves (systemd readiness).
    pub ready: Option<oneshot::Sender<()>>,
}

/// A daemon whose configuration can be re-read while it runs.
pub trait Reloadable: Send + Sync + 'static {
    /// Re-reads the configuration file and swaps it in whole, or keeps the running
    /// one and says why. Blocking (reads files, builds TLS contexts).
    fn reload(&self) -> Result<String, String>;
}

/// Reloads on every request from `requests` (SIGHUP) until `shutdown`.
pub async fn reload_loop<R: Reloadable>(
    daemon: Arc<R>,
    requests: Option<mpsc::Receiver<()>>,
    shutdown: CancellationToken,
) {
    let Some(mut requests) = requests else { return };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = requests.recv() => {
                if r.is_none() {
                    return;
                }
                let d = daemon.clone();
                let _ = tokio::task::spawn_blocking(move || d.reload()).await;
            }
        }
    }
}

/// `POST /v1/reload`.
pub async fn reload_answer<R: Reloadable>(daemon: Arc<R>) -> Result<Json<ActionResult>, Response> {
    match tokio::task::spawn_blocking(move || daemon.reload()).await {
        Ok(Ok(message)) => Ok(Json(ActionResult { ok: true, message })),
        Ok(Err(e)) => Err(crate::admin::error(StatusCode::UNPROCESSABLE_ENTITY, e)),
        Err(e) => Err(crate::admin::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// Binds the admin socket (`socket`, or the default one for `daemon`) and serves
/// `router` on it until `shutdown`, tracked by `tracker`.
pub fn start_admin(
    daemon: &str,
    socket: Option<PathBuf>,
    group: Option<String>,
    router: Router,
    audit: crate::admin::Audit,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), (PathBuf, std::io::Error)> {
    let path = socket.unwrap_or_else(|| crate::admin::default_socket(daemon));
    let listener = crate::admin::bind(&path, group.as_deref()).map_err(|e| (path.clone(), e))?;
    let token = shutdown.clone();
    tracker.spawn(async move {
        if let Err(e) = crate::admin::serve(listener, path, group.as_deref(), router, audit, token).await {
            tracing::warn!("admin API stopped: {e}");
        }
    });
    Ok(())
}

/// `GET /v1/watch`: NDJSON, a snapshot at once and every second (taken on a
/// blocking thread by `snapshot`), and every event as it happens.
pub fn watch_stream<F>(snapshot: F, mut events: broadcast::Receiver<Event>) -> Response
where
    F: Fn() -> WatchItem + Send + Sync + 'static,
{
    let snapshot = Arc::new(snapshot);
    let (tx, rx) = mpsc::channel::<Result<String, std::io::Error>>(64);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let item = tokio::select! {
                _ = tick.tick() => {
                    let s = snapshot.clone();
                    match tokio::task::spawn_blocking(move || s()).await {
                        Ok(item) => item,
                        Err(_) => return,
                    }
                }
                e = events.recv() => match e {
                    Ok(event) => WatchItem::Event { event },
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                },
            };
            let line = match serde_json::to_string(&item) {
                Ok(mut line) => {
                    line.push('\n');
                    line
                }
                Err(e) => {
                    tracing::warn!("watch: cannot encode an item: {e}");
                    continue;
                }
            };
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
