//! The link task: the console's only I/O with the daemon. It owns the watch
//! stream, backfills what a fresh connection lacks (series for the charts, events
//! since the last one seen, history and archives), reconnects with backoff, and
//! carries out commands, each on its own task so a slow answer never holds up the
//! stream. Everything it learns goes to the UI as [`Msg::Link`].

use std::time::Duration;

use tokio::sync::mpsc;

use super::actions::Action;
use super::app::{Cmd, LinkEvent, Msg};
use crate::client::{AdminClient, ArchiveQuery, DaemonKind, Watched};
use nbackup_protocol::admin::WatchItem;

/// Reconnection backoff: doubles from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(15));
/// History rows fetched at once.
const HISTORY_LIMIT: usize = 1000;

/// Runs until the UI goes away (its receiver is dropped).
pub async fn run(client: AdminClient, ui: mpsc::Sender<Msg>, mut cmds: mpsc::Receiver<Cmd>) {
    let mut backoff = BACKOFF.0;
    let mut last_seq = 0u64;
    let mut kind = None;
    loop {
        let error = match connect(&client).await {
            Ok((k, mut items)) => {
                kind = Some(k);
                backoff = BACKOFF.0;
                if send(&ui, LinkEvent::Connected(k)).await.is_err() {
                    return;
                }
                tokio::spawn(backfill(client.clone(), ui.clone(), k, last_seq));
                loop {
                    tokio::select! {
                        item = items.recv() => match item {
                            Some(Watched::Item(item)) => {
                                if let WatchItem::Event { event } = item.as_ref() {
                                    last_seq = last_seq.max(event.seq);
                                }
                                if send(&ui, LinkEvent::Item(item)).await.is_err() {
                                    return;
                                }
                            }
                            Some(Watched::Unreadable { error, line }) => {
                                let _ = send(&ui, LinkEvent::Unreadable(format!("{error}: {line}"))).await;
                            }
                            None => break "the daemon closed the watch stream".to_string(),
                        },
                        cmd = cmds.recv() => match cmd {
                            Some(cmd) => execute(&client, &ui, kind, cmd),
                            None => return,
                        },
                    }
                }
            }
            Err(e) => e,
        };
        let retry = backoff;
        if send(&ui, LinkEvent::Down { error, retry_in_secs: retry.as_secs() }).await.is_err() {
            return;
        }
        let wait = tokio::time::sleep(retry);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = &mut wait => break,
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => execute(&client, &ui, kind, cmd),
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(BACKOFF.1);
        if send(&ui, LinkEvent::Reconnecting).await.is_err() {
            return;
        }
    }
}

async fn send(ui: &mpsc::Sender<Msg>, e: LinkEvent) -> Result<(), ()> {
    ui.send(Msg::Link(e)).await.map_err(|_| ())
}

async fn connect(client: &AdminClient) -> Result<(DaemonKind, mpsc::Receiver<Watched>), String> {
    let kind = client.kind().await.map_err(|e| e.to_string())?;
    let items = client.watch().await.map_err(|e| e.to_string())?;
    Ok((kind, items))
}

/// What a new connection lacks: chart history, missed events, history, archives.
async fn backfill(client: AdminClient, ui: mpsc::Sender<Msg>, kind: DaemonKind, since: u64) {
    if let Ok(series) = client.series().await {
        let _ = send(&ui, LinkEvent::Series(series)).await;
    }
    if let Ok(events) = client.events(since, super::model::EVENT_CAP).await {
        let _ = send(&ui, LinkEvent::Backfill(events)).await;
    }
    if kind == DaemonKind::Server {
        refresh(&client, &ui).await;
    }
}

/// Archives, then history: `--dump` takes the history as the last of the backfill.
async fn refresh(client: &AdminClient, ui: &mpsc::Sender<Msg>) {
    if let Ok(a) = client.archives(&ArchiveQuery::default()).await {
        let _ = send(ui, LinkEvent::Archives(a)).await;
    }
    if let Ok(h) = client.history(None, HISTORY_LIMIT).await {
        let _ = send(ui, LinkEvent::History(h)).await;
    }
}

fn execute(client: &AdminClient, ui: &mpsc::Sender<Msg>, kind: Option<DaemonKind>, cmd: Cmd) {
    let (client, ui) = (client.clone(), ui.clone());
    tokio::spawn(async move {
        match cmd {
            Cmd::Refresh => {
                if kind == Some(DaemonKind::Server) {
                    refresh(&client, &ui).await;
                }
            }
            Cmd::Act(action) => {
                let title = action.title();
                let result = act(&client, action).await.map(|r| r.message).map_err(|e| e.to_string());
                let _ = send(&ui, LinkEvent::Answer { title, result }).await;
            }
            // The console loop runs wizards itself: they need the terminal.
            Cmd::Wizard(_) => {}
        }
    });
}

async fn act(
    c: &AdminClient,
    action: Action,
) -> Result<nbackup_protocol::admin::ActionResult, crate::client::ClientError> {
    match action {
        Action::Rotate { session, stream } => c.rotate(&session, stream).await,
        Action::AbortSession { session, reason } => c.abort_session(&session, Some(reason)).await,
        Action::AbortEntry { target, reason } => c.abort_entry(&target, Some(reason)).await,
        Action::Run(target) => c.run_entry(&target).await,
        Action::Defer { target, seconds } => c.defer_entry(&target, seconds).await,
        Action::Reload => c.reload().await,
        Action::Verify { storage, agent, backup, archive } => {
            let request = nbackup_protocol::admin::VerifyRequest {
                storage: Some(storage),
                agent: Some(agent),
                backup: Some(backup),
                all: false,
                archive: Some(archive),
            };
            c.verify(&request).await
        }
    }
}
