//! `nbackup console`: the operator's terminal UI over a daemon's admin API.
//!
//! Structure (model → message → update → render): [`app::update`] is the only
//! code that changes the [`app::App`], and it is pure; [`link`] is the only code
//! that talks to the daemon; [`view`] only draws. The loop here feeds `update`
//! with keys, ticks and link reports, hands its commands to the link, and draws
//! after each burst of messages — so the UI never waits on I/O.
//!
//! The terminal is restored on every way out: normal exit, error, panic (the
//! hook `ratatui::try_init` installs), Ctrl-C (a key in raw mode), SIGTERM,
//! SIGINT and SIGHUP (the SSH session dropped).

pub mod actions;
pub mod app;
pub mod fmt;
pub mod keys;
pub mod link;
pub mod model;
pub mod rows;
pub mod theme;
pub mod view;
pub mod wizards;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ratatui::crossterm::event::{self, Event, KeyEventKind};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::client;
use app::{App, LinkEvent, Msg, Settings, Tab};

/// How the console was asked to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub settings: Settings,
    /// The view to start on (`overview`, `sessions`, …).
    pub view: Option<String>,
}

/// Picks a start view by its palette name.
fn start_view(app: &mut App, view: Option<&str>) -> Result<(), String> {
    let Some(v) = view else { return Ok(()) };
    if v == "session" {
        // The first session, opened: for captures of the detail view.
        app.tab = Tab::Sessions;
        app::update(app, Msg::Key(event::KeyEvent::from(event::KeyCode::Enter)));
        return Ok(());
    }
    match keys::palette(v) {
        Some(keys::Command::View(i)) => {
            app.tab = *app.tabs().get(i).unwrap_or(&Tab::Overview);
            Ok(())
        }
        _ => Err(format!("no view {v:?}: overview, sessions, session, agents, archives, history or events")),
    }
}

/// Runs the console on this terminal until the operator quits or a signal comes.
pub async fn run(client: client::AdminClient, options: Options) -> io::Result<()> {
    let (ui_tx, mut ui_rx) = mpsc::channel::<Msg>(1024);
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let mut app = App::new(options.settings.clone(), chrono::Utc::now());
    let view = options.view.clone();
    let mut terminal = ratatui::try_init()?;
    let gate = Arc::new(InputGate::default());
    let wizard_client = client.clone();
    let result = async {
        tokio::spawn(link::run(client, ui_tx.clone(), cmd_rx));
        spawn_input(ui_tx.clone(), gate.clone())?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut wanted_view = view;
        loop {
            terminal.draw(|f| f.render_widget(view::Screen(&app), f.area()))?;
            let first = tokio::select! {
                m = ui_rx.recv() => match m { Some(m) => m, None => break },
                _ = tick.tick() => Msg::Tick(chrono::Utc::now()),
                _ = term.recv() => break,
                _ = hup.recv() => break,
                _ = int.recv() => break,
            };
            // Apply everything that is waiting, then draw once.
            let mut next = Some(first);
            while let Some(msg) = next {
                let connected = matches!(msg, Msg::Link(LinkEvent::Connected(_)));
                match app::update(&mut app, msg) {
                    Some(app::Cmd::Wizard(w)) => {
                        // The wizard gets the terminal: input reading stops, the
                        // screen is restored, and both come back after.
                        gate.pause().await;
                        ratatui::restore();
                        let result = wizards::run(&wizard_client, w).await;
                        terminal = ratatui::try_init()?;
                        terminal.clear()?;
                        gate.resume();
                        let title = match w {
                            keys::Wizard::Enroll => "enroll an agent",
                            keys::Wizard::AddEntry => "add a backup entry",
                            _ => "add a storage",
                        };
                        let answer = LinkEvent::Answer { title: title.into(), result };
                        app.overlay = Some(app::Overlay::Answer { title: title.into(), answer: None });
                        app::update(&mut app, Msg::Link(answer));
                    }
                    Some(cmd) => {
                        let _ = cmd_tx.try_send(cmd);
                    }
                    None => {}
                }
                if connected && let Some(v) = wanted_view.take() {
                    start_view(&mut app, Some(&v)).map_err(io::Error::other)?;
                }
                next = ui_rx.try_recv().ok();
            }
            if app.quit {
                break;
            }
        }
        Ok(())
    }
    .await;
    ratatui::restore();
    result
}

/// Lets the loop take terminal input away from the input thread (for a wizard)
/// and give it back. The thread polls and reads only while holding `turn` and
/// after seeing `paused` clear under it, so once `pause` has held `turn` once, no
/// read can start until `resume`.
#[derive(Default)]
struct InputGate {
    paused: AtomicBool,
    turn: std::sync::Mutex<()>,
}

impl InputGate {
    async fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        loop {
            if self.turn.try_lock().is_ok() {
                return;
            }
            tokio::time::sleep(INPUT_POLL / 4).await;
        }
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

/// How long the input thread waits for a key before it looks at the gate again.
const INPUT_POLL: Duration = Duration::from_millis(40);

/// Terminal input on its own thread: crossterm's reads block, so it polls briefly
/// and honours the gate between polls.
fn spawn_input(tx: mpsc::Sender<Msg>, gate: Arc<InputGate>) -> io::Result<()> {
    std::thread::Builder::new().name("console-input".into()).spawn(move || {
        loop {
            let turn = gate.turn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if gate.paused.load(Ordering::SeqCst) {
                drop(turn);
                std::thread::sleep(INPUT_POLL);
                continue;
            }
            match event::poll(INPUT_POLL) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(_) => return,
            }
            let msg = match event::read() {
                Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => Msg::Key(k),
                Ok(Event::Resize(..)) => Msg::Resize,
                Ok(_) => continue,
                Err(_) => return,
            };
            drop(turn);
            if tx.blocking_send(msg).is_err() {
                return;
            }
        }
    })?;
    Ok(())
}

/// `--dump`: connects, waits until the first snapshot and the backfill are in (at
/// most `wait`), and returns one frame as plain text.
pub async fn dump(
    client: client::AdminClient,
    options: Options,
    width: u16,
    height: u16,
    wait: Duration,
) -> Result<String, String> {
    let (ui_tx, mut ui_rx) = mpsc::channel::<Msg>(1024);
    let (_cmd_tx, cmd_rx) = mpsc::channel(1);
    let mut app = App::new(options.settings.clone(), chrono::Utc::now());
    let link = tokio::spawn(link::run(client, ui_tx, cmd_rx));
    let deadline = tokio::time::Instant::now() + wait;
    let (mut snapshot, mut events, mut history) = (false, false, false);
    let mut down = None;
    while !(snapshot && events && (history || app.data.kind == Some(client::DaemonKind::Agent))) {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline, ui_rx.recv()).await else { break };
        match &msg {
            Msg::Link(LinkEvent::Item(i)) => {
                snapshot |= !matches!(i.as_ref(), nbackup_protocol::admin::WatchItem::Event { .. })
            }
            Msg::Link(LinkEvent::Backfill(_)) => events = true,
            Msg::Link(LinkEvent::History(_)) => history = true,
            Msg::Link(LinkEvent::Down { error, .. }) => down = Some(error.clone()),
            _ => {}
        }
        if let Some(e) = down.take()
            && !snapshot
        {
            link.abort();
            return Err(e);
        }
        app::update(&mut app, msg);
    }
    link.abort();
    start_view(&mut app, options.view.as_deref())?;
    app::update(&mut app, Msg::Tick(chrono::Utc::now()));
    Ok(view::to_text(&app, width, height))
}
