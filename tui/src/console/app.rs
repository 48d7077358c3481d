//! The console's model and its one transition function: `update(&mut App, Msg)`
//! is pure (no I/O, no clock — time arrives as `Msg::Tick`), so every key and
//! every daemon message is testable without a terminal or a daemon.

use chrono::{DateTime, FixedOffset, Utc};
use nbackup_protocol::admin::{ArchiveInfo, DaemonKind, Event, EventKind, HistoryRecord, Level, Series, WatchItem};
use ratatui::crossterm::event::KeyEvent;

use super::actions::{self, Action, Confirm};
use super::keys::{self, Command, Key, Scope};
use super::model::{Data, Link, Snapshot};
use super::rows::{self, LogFilter, Order, Search};
use crate::client::EntryTarget;

/// The views, in tab order. The agent daemon has no archives or history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tab {
    Overview,
    Sessions,
    Agents,
    Archives,
    History,
    Events,
}

impl Tab {
    pub fn all(kind: Option<DaemonKind>) -> &'static [Tab] {
        match kind {
            Some(DaemonKind::Agent) => &[Tab::Overview, Tab::Sessions, Tab::Agents, Tab::Events],
            _ => &[Tab::Overview, Tab::Sessions, Tab::Agents, Tab::Archives, Tab::History, Tab::Events],
        }
    }

    pub fn title(self, kind: Option<DaemonKind>) -> &'static str {
        let agent = kind == Some(DaemonKind::Agent);
        match self {
            Tab::Overview => "Overview",
            Tab::Sessions if agent => "Running",
            Tab::Sessions => "Sessions",
            Tab::Agents if agent => "Entries",
            Tab::Agents => "Agents",
            Tab::Archives => "Archives",
            Tab::History => "History",
            Tab::Events => "Events",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    pub fn sorts(self) -> &'static [&'static str] {
        match self {
            Tab::Overview => &[],
            Tab::Sessions => rows::SESSION_SORTS,
            Tab::Agents => rows::ENTRY_SORTS,
            Tab::Archives => rows::ARCHIVE_SORTS,
            Tab::History => rows::HISTORY_SORTS,
            Tab::Events => rows::EVENT_SORTS,
        }
    }

    pub fn is_log(self) -> bool {
        matches!(self, Tab::History | Tab::Events)
    }
}

/// What sits on top of the view, taking the keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Overlay {
    Help,
    Palette {
        input: String,
        error: Option<String>,
    },
    Search {
        input: String,
        error: Option<String>,
    },
    /// Asks how long to defer, then confirms.
    DeferInput {
        target: EntryTarget,
        next: Option<String>,
        input: String,
        error: Option<String>,
    },
    Confirm(Confirm),
    /// The daemon's answer (`None` while it is awaited).
    Answer {
        title: String,
        answer: Option<Result<String, String>>,
    },
}

/// Input to [`update`].
#[derive(Debug)]
pub enum Msg {
    Key(KeyEvent),
    /// The terminal changed size: draw again.
    Resize,
    /// The wall clock, about once a second.
    Tick(DateTime<Utc>),
    Link(LinkEvent),
}

/// What the link task reports.
#[derive(Debug)]
pub enum LinkEvent {
    Connected(DaemonKind),
    Item(Box<WatchItem>),
    /// Events since the last one seen, fetched after (re)connecting.
    Backfill(Vec<Event>),
    Series(Vec<Series>),
    History(Vec<HistoryRecord>),
    Archives(Vec<ArchiveInfo>),
    Unreadable(String),
    Down {
        error: String,
        retry_in_secs: u64,
    },
    /// The backoff ended; connecting again.
    Reconnecting,
    Answer {
        title: String,
        result: Result<String, String>,
    },
}

/// Output of [`update`]: work for the link task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cmd {
    Act(Action),
    /// Fetch history and archives again.
    Refresh,
    /// Suspend the console and run a wizard on the terminal.
    Wizard(super::keys::Wizard),
}

/// Settings from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    pub readonly: bool,
    pub color: bool,
    /// Times are shown in this zone.
    pub tz: FixedOffset,
    /// Who runs the console, for abort reasons.
    pub user: String,
}

/// Per-tab selection and order.
#[derive(Clone, Copy, Debug, Default)]
pub struct TableState {
    pub selected: usize,
    pub order: Order,
}

pub struct App {
    pub settings: Settings,
    pub data: Data,
    pub link: Link,
    pub now: DateTime<Utc>,
    pub tab: Tab,
    tables: [TableState; 6],
    /// The session open in detail (server), by id.
    pub detail: Option<String>,
    pub stream_selected: usize,
    pub filter: LogFilter,
    /// Logs show their newest rows as they come.
    pub follow: bool,
    pub overlay: Option<Overlay>,
    /// One line in the status bar (an error, a hint), until the next key.
    pub notice: Option<String>,
    pub quit: bool,
}

const PAGE: usize = 10;

impl App {
    pub fn new(settings: Settings, now: DateTime<Utc>) -> Self {
        App {
            settings,
            data: Data::default(),
            link: Link::Connecting,
            now,
            tab: Tab::Overview,
            tables: [TableState::default(); 6],
            detail: None,
            stream_selected: 0,
            filter: LogFilter::default(),
            follow: true,
            overlay: None,
            notice: None,
            quit: false,
        }
    }

    pub fn table(&self, tab: Tab) -> TableState {
        self.tables[tab.index()]
    }

    fn table_mut(&mut self) -> &mut TableState {
        &mut self.tables[self.tab.index()]
    }

    pub fn tabs(&self) -> &'static [Tab] {
        Tab::all(self.data.kind)
    }

    /// Rows in the current table, for moving the selection.
    pub fn row_count(&self) -> usize {
        let order = self.table(self.tab).order;
        match self.tab {
            Tab::Overview => 0,
            Tab::Sessions if self.detail.is_some() => self.detail_session().map_or(0, |s| s.streams.len()),
            Tab::Sessions if self.data.kind == Some(DaemonKind::Agent) => rows::runs(&self.data).len(),
            Tab::Sessions => self.data.sessions().len(),
            Tab::Agents => rows::entries(&self.data, order).len(),
            Tab::Archives => self.data.archives.len(),
            Tab::History => rows::history(&self.data, &self.filter, order).len(),
            Tab::Events => rows::events(&self.data, &self.filter, order).len(),
        }
    }

    /// The selection in the current table, kept inside it (following pins logs to
    /// their newest row).
    pub fn selected(&self, tab: Tab) -> usize {
        let count = if tab == self.tab { self.row_count() } else { 0 };
        self.selected_of(tab, count)
    }

    /// [`App::selected`] when the caller already has the rows (`count` of them).
    pub fn selected_of(&self, tab: Tab, count: usize) -> usize {
        let t = self.table(tab);
        if tab == Tab::Events && self.follow && t.order == Order::default() {
            return count.saturating_sub(1);
        }
        t.selected.min(count.saturating_sub(1))
    }

    pub fn detail_session(&self) -> Option<&nbackup_protocol::admin::SessionInfo> {
        let id = self.detail.as_ref()?;
        self.data.sessions().iter().find(|s| s.id == *id)
    }

    /// The disconnected banner's text, if the link is down.
    pub fn banner(&self) -> Option<String> {
        let age = self.data.snapshot_at.map(|t| (self.now - t).num_seconds().max(0));
        match &self.link {
            Link::Live => None,
            Link::Connecting => Some(match age {
                Some(a) => format!("reconnecting · data {a} s old"),
                None => "connecting…".into(),
            }),
            Link::Down { error, retry_at } => {
                let retry = (*retry_at - self.now).num_seconds().max(0);
                let data = age.map_or_else(|| "no data yet".to_string(), |a| format!("data {a} s old"));
                Some(format!("disconnected · {data} · retry in {retry} s · {error}"))
            }
        }
    }

    fn daemon_word(&self) -> &'static str {
        match self.data.kind {
            Some(DaemonKind::Agent) => "agent",
            _ => "server",
        }
    }

    /// Local time of an RFC 3339 string, in words.
    pub fn when(&self, t: &str) -> String {
        super::fmt::when(t, self.now, self.settings.tz)
    }
}

/// The one transition function.
pub fn update(app: &mut App, msg: Msg) -> Option<Cmd> {
    match msg {
        Msg::Tick(now) => {
            app.now = now;
            None
        }
        Msg::Link(e) => link_event(app, e),
        Msg::Resize => None,
        Msg::Key(k) => {
            let key = Key::from_event(&k)?;
            if app.overlay.is_some() {
                return overlay_key(app, key);
            }
            app.notice = None;
            let binding = keys::lookup(key)?;
            command(app, binding.command, binding.scope)
        }
    }
}

fn link_event(app: &mut App, e: LinkEvent) -> Option<Cmd> {
    match e {
        LinkEvent::Connected(kind) => {
            app.data.kind = Some(kind);
            app.link = Link::Live;
            if !app.tabs().contains(&app.tab) {
                app.tab = Tab::Overview;
            }
            None
        }
        LinkEvent::Item(item) => match *item {
            WatchItem::ServerSnapshot { status, sessions, agents } => {
                app.data.observe(Snapshot::Server { status, sessions, agents }, app.now);
                app.link = Link::Live;
                None
            }
            WatchItem::AgentSnapshot { status } => {
                app.data.observe(Snapshot::Agent { status }, app.now);
                app.link = Link::Live;
                None
            }
            WatchItem::Event { event } => {
                // A session's end changes the history and, when committed, the archives.
                let refresh = matches!(
                    event.kind,
                    EventKind::Committed
                        | EventKind::Failed
                        | EventKind::Aborted
                        | EventKind::Expired
                        | EventKind::Rotated
                ) && app.data.kind == Some(DaemonKind::Server);
                app.data.add_event(event);
                refresh.then_some(Cmd::Refresh)
            }
        },
        LinkEvent::Backfill(events) => {
            for e in events {
                app.data.add_event(e);
            }
            None
        }
        LinkEvent::Series(s) => {
            app.data.backfill(s);
            None
        }
        LinkEvent::History(h) => {
            app.data.history = h;
            None
        }
        LinkEvent::Archives(a) => {
            app.data.archives = a;
            None
        }
        LinkEvent::Unreadable(line) => {
            app.data.unreadable += 1;
            app.data.last_unreadable = Some(line);
            None
        }
        LinkEvent::Down { error, retry_in_secs } => {
            app.link = Link::Down { error, retry_at: app.now + chrono::Duration::seconds(retry_in_secs as i64) };
            None
        }
        LinkEvent::Reconnecting => {
            app.link = Link::Connecting;
            None
        }
        LinkEvent::Answer { title, result } => {
            // Only the answer awaited is shown; a late one after Esc is a notice.
            match &mut app.overlay {
                Some(Overlay::Answer { title: t, answer }) if *t == title => *answer = Some(result),
                _ => {
                    app.notice = Some(match result {
                        Ok(m) => format!("{title}: {m}"),
                        Err(e) => format!("{title} refused: {e}"),
                    })
                }
            }
            None
        }
    }
}

fn move_selection(app: &mut App, to: impl FnOnce(usize, usize) -> usize) {
    let count = app.row_count();
    if app.tab == Tab::Sessions && app.detail.is_some() {
        app.stream_selected = to(app.stream_selected.min(count.saturating_sub(1)), count);
        return;
    }
    let current = app.selected(app.tab);
    if app.tab == Tab::Events {
        app.follow = false;
    }
    app.table_mut().selected = to(current, count);
}

fn command(app: &mut App, cmd: Command, scope: Scope) -> Option<Cmd> {
    // Wizards change configs whichever way they are opened (key or palette).
    let acts = scope == Scope::Action || matches!(cmd, Command::Wizard(_));
    if acts && app.settings.readonly {
        app.notice = Some("read-only console: actions are off".into());
        return None;
    }
    if scope == Scope::Logs && !app.tab.is_log() {
        return None;
    }
    match cmd {
        Command::Quit => app.quit = true,
        Command::Help => app.overlay = Some(Overlay::Help),
        Command::Palette => app.overlay = Some(Overlay::Palette { input: String::new(), error: None }),
        Command::NextView | Command::PrevView => {
            let tabs = app.tabs();
            let i = tabs.iter().position(|t| *t == app.tab).unwrap_or(0);
            let n = tabs.len();
            let next = if cmd == Command::NextView { (i + 1) % n } else { (i + n - 1) % n };
            return switch(app, tabs[next]);
        }
        Command::View(i) => {
            if let Some(t) = app.tabs().get(i) {
                return switch(app, *t);
            }
        }
        Command::Up => move_selection(app, |s, _| s.saturating_sub(1)),
        Command::Down => move_selection(app, |s, n| (s + 1).min(n.saturating_sub(1))),
        Command::PageUp => move_selection(app, |s, _| s.saturating_sub(PAGE)),
        Command::PageDown => move_selection(app, |s, n| (s + PAGE).min(n.saturating_sub(1))),
        Command::Top => move_selection(app, |_, _| 0),
        Command::Bottom => {
            move_selection(app, |_, n| n.saturating_sub(1));
            if app.tab == Tab::Events {
                app.follow = true;
            }
        }
        Command::Open => {
            if app.tab == Tab::Sessions && app.detail.is_none() && app.data.kind != Some(DaemonKind::Agent) {
                let order = app.table(Tab::Sessions).order;
                let i = app.selected(Tab::Sessions);
                if let Some(s) = rows::sessions(&app.data, order).get(i) {
                    app.detail = Some(s.id.clone());
                    app.stream_selected = 0;
                }
            }
        }
        Command::Back => {
            if app.detail.take().is_none() && !app.filter.is_empty() && app.tab.is_log() {
                app.filter = LogFilter::default();
            }
        }
        Command::Search => {
            let input = app.filter.search.as_ref().map(|s| s.text.clone()).unwrap_or_default();
            app.overlay = Some(Overlay::Search { input, error: None });
        }
        Command::Follow => {
            app.follow = !app.follow;
            if app.follow {
                app.tables[Tab::Events.index()].order = Order::default();
            }
        }
        Command::Level => {
            app.filter.level = match app.filter.level {
                None => Some(Level::Warn),
                Some(Level::Info) => Some(Level::Warn),
                Some(Level::Warn) => Some(Level::Error),
                Some(Level::Error) => None,
            };
        }
        Command::FilterAgent | Command::FilterEntry => {
            let order = app.table(app.tab).order;
            let i = app.selected(app.tab);
            let (agent, entry) = match app.tab {
                Tab::History => rows::history(&app.data, &app.filter, order)
                    .get(i)
                    .map_or((None, None), |h| (Some(h.agent.clone()), Some(h.backup.clone()))),
                _ => rows::events(&app.data, &app.filter, order)
                    .get(i)
                    .map_or((None, None), |e| (e.agent.clone(), e.backup.clone())),
            };
            if cmd == Command::FilterAgent {
                app.filter.agent = agent;
            } else {
                app.filter.entry = entry;
            }
            app.table_mut().selected = 0;
        }
        Command::ClearFilters => app.filter = LogFilter::default(),
        Command::SortNext => {
            let n = app.tab.sorts().len();
            if n > 0 {
                let t = app.table_mut();
                t.order.column = (t.order.column + 1) % n;
                if app.tab == Tab::Events {
                    app.follow = false;
                }
            }
        }
        Command::SortReverse => {
            app.table_mut().order.reverse ^= true;
            if app.tab == Tab::Events {
                app.follow = false;
            }
        }
        Command::Rotate => start_rotate(app),
        Command::Abort => start_abort(app),
        Command::RunNow => start_run(app),
        Command::Defer => start_defer(app),
        Command::Verify => {
            if app.tab != Tab::Archives {
                app.notice = Some("verify works on the archives view".into());
                return None;
            }
            let order = app.table(Tab::Archives).order;
            match rows::archives(&app.data, order).get(app.selected(Tab::Archives)) {
                Some(a) => app.overlay = Some(Overlay::Confirm(actions::verify(a))),
                None => app.notice = Some("no archive selected".into()),
            }
        }
        Command::Reload => {
            let word = app.daemon_word();
            app.overlay = Some(Overlay::Confirm(actions::reload(word)));
        }
        Command::Wizard(w) => {
            use super::keys::Wizard;
            let server = app.data.kind == Some(DaemonKind::Server);
            let w = match w {
                Wizard::Add if server => Wizard::AddStorage,
                Wizard::Add => Wizard::AddEntry,
                other => other,
            };
            return match (w, server) {
                (Wizard::AddStorage | Wizard::Enroll, false) => {
                    app.notice = Some("storages and enrollment are the server's: open its console".into());
                    None
                }
                (Wizard::AddEntry, true) => {
                    app.notice = Some("backup entries are the agent's: open its console".into());
                    None
                }
                _ => Some(Cmd::Wizard(w)),
            };
        }
    }
    None
}

fn switch(app: &mut App, tab: Tab) -> Option<Cmd> {
    let changed = app.tab != tab;
    app.tab = tab;
    app.detail = None;
    (changed && matches!(tab, Tab::Archives | Tab::History)).then_some(Cmd::Refresh)
}

fn confirm_or_notice(app: &mut App, c: Result<Confirm, String>) {
    match c {
        Ok(c) => app.overlay = Some(Overlay::Confirm(c)),
        Err(e) => app.notice = Some(e),
    }
}

fn selected_session(app: &App) -> Option<&nbackup_protocol::admin::SessionInfo> {
    if app.detail.is_some() {
        return app.detail_session();
    }
    let order = app.table(Tab::Sessions).order;
    rows::sessions(&app.data, order).get(app.selected(Tab::Sessions)).copied()
}

/// The next scheduled run of an agent's entry, in words, from what it reported.
fn next_run_of(app: &App, agent: &str, entry: &str) -> Option<String> {
    let a = app.data.agents().iter().find(|a| a.name == agent)?;
    let e = a.entries.iter().find(|e| e.name == entry)?;
    e.next_run.as_deref().map(|t| app.when(t))
}

fn start_abort(app: &mut App) {
    let user = app.settings.user.clone();
    match app.tab {
        Tab::Sessions if app.data.kind == Some(DaemonKind::Agent) => {
            let runs = rows::runs(&app.data);
            let Some(run) = runs.get(app.selected(Tab::Sessions)) else { return };
            let Some(status) = app.data.agent_status() else { return };
            let Some(entry) = status.entries.iter().find(|e| e.name == run.entry) else { return };
            let row = rows::EntryRow { agent: None, entry };
            let c = actions::abort_entry(&row, EntryTarget::Own(run.entry.clone()), Some(run.bytes_read), &user);
            confirm_or_notice(app, c);
        }
        Tab::Sessions => {
            let Some(s) = selected_session(app) else {
                app.notice = Some("no session selected".into());
                return;
            };
            let next = next_run_of(app, &s.agent, &s.backup);
            let c = actions::abort_session(s, next, &user);
            confirm_or_notice(app, c);
        }
        Tab::Agents => {
            let Some((row, target)) = selected_entry(app) else { return };
            let read =
                row.agent.and_then(|a| a.running.iter().find(|r| r.entry == row.entry.name)).map(|r| r.bytes_read);
            let read = read.or_else(|| {
                app.data
                    .agent_status()
                    .and_then(|s| s.running.iter().find(|r| r.entry == row.entry.name))
                    .map(|r| r.bytes_read)
            });
            let c = actions::abort_entry(&row, target, read, &user);
            confirm_or_notice(app, c);
        }
        _ => app.notice = Some("abort works on the sessions and agents views".into()),
    }
}

fn start_rotate(app: &mut App) {
    if app.tab != Tab::Sessions || app.data.kind == Some(DaemonKind::Agent) {
        app.notice = Some("rotate works on a server session's streams".into());
        return;
    }
    let Some(s) = app.detail_session() else {
        app.notice = Some("open a session (Enter) and pick a stream to rotate".into());
        return;
    };
    let Some(st) = s.streams.get(app.stream_selected.min(s.streams.len().saturating_sub(1))) else {
        app.notice = Some("this session has no stream".into());
        return;
    };
    let c = actions::rotate(s, st.stream);
    confirm_or_notice(app, c);
}

fn selected_entry(app: &App) -> Option<(rows::EntryRow<'_>, EntryTarget)> {
    if app.tab != Tab::Agents {
        return None;
    }
    let order = app.table(Tab::Agents).order;
    let row = *rows::entries(&app.data, order).get(app.selected(Tab::Agents))?;
    let target = match row.agent {
        Some(a) => EntryTarget::Agent { agent: a.name.clone(), entry: row.entry.name.clone() },
        None => EntryTarget::Own(row.entry.name.clone()),
    };
    Some((row, target))
}

fn start_run(app: &mut App) {
    let Some((row, target)) = selected_entry(app) else {
        app.notice = Some("run works on the agents/entries view".into());
        return;
    };
    let next = row.entry.next_run.as_deref().map(|t| app.when(t));
    let c = actions::run_now(&row, target, next);
    app.overlay = Some(Overlay::Confirm(c));
}

fn start_defer(app: &mut App) {
    let Some((row, target)) = selected_entry(app) else {
        app.notice = Some("defer works on the agents/entries view".into());
        return;
    };
    if row.entry.schedule.is_none() {
        app.notice = Some(format!("{} has no schedule to defer", actions::target_name(&target)));
        return;
    }
    let next = row.entry.next_run.as_deref().map(|t| app.when(t));
    app.overlay = Some(Overlay::DeferInput { target, next, input: String::new(), error: None });
}

/// Keys while an overlay is up: text input, confirm, or close.
fn overlay_key(app: &mut App, key: Key) -> Option<Cmd> {
    let overlay = app.overlay.take()?;
    match overlay {
        Overlay::Help => {
            if !matches!(key, Key::Esc | Key::Char('q') | Key::Char('?') | Key::Enter | Key::Backspace) {
                app.overlay = Some(Overlay::Help);
            }
            None
        }
        Overlay::Answer { title, answer } => {
            // Any key closes an answer that came; Esc also stops waiting for one.
            if answer.is_none() && key != Key::Esc {
                app.overlay = Some(Overlay::Answer { title, answer });
            }
            None
        }
        Overlay::Confirm(c) => match key {
            Key::Enter | Key::Char('y') => {
                app.overlay = Some(Overlay::Answer { title: c.action.title(), answer: None });
                Some(Cmd::Act(c.action))
            }
            Key::Esc | Key::Char('n') | Key::Char('q') => None,
            _ => {
                app.overlay = Some(Overlay::Confirm(c));
                None
            }
        },
        Overlay::Palette { mut input, .. } => match edit(&mut input, key) {
            Edit::Cancel => None,
            Edit::Typing => {
                app.overlay = Some(Overlay::Palette { input, error: None });
                None
            }
            Edit::Done => match keys::palette(&input) {
                Some(cmd) => {
                    let scope = keys::BINDINGS.iter().find(|b| b.command == cmd).map_or(Scope::Everywhere, |b| b.scope);
                    // A log command from the palette applies even off the log views.
                    let scope = if scope == Scope::Logs { Scope::Everywhere } else { scope };
                    command(app, cmd, scope)
                }
                None => {
                    let error = Some(format!("no command {:?} (? lists them)", input.trim()));
                    app.overlay = Some(Overlay::Palette { input, error });
                    None
                }
            },
        },
        Overlay::Search { mut input, .. } => match edit(&mut input, key) {
            Edit::Cancel => None,
            Edit::Typing => {
                app.overlay = Some(Overlay::Search { input, error: None });
                None
            }
            Edit::Done if input.is_empty() => {
                app.filter.search = None;
                None
            }
            Edit::Done => match Search::parse(&input) {
                Ok(s) => {
                    app.filter.search = Some(s);
                    app.table_mut().selected = 0;
                    None
                }
                Err(e) => {
                    app.overlay = Some(Overlay::Search { input, error: Some(e) });
                    None
                }
            },
        },
        Overlay::DeferInput { target, next, mut input, .. } => match edit(&mut input, key) {
            Edit::Cancel => None,
            Edit::Typing => {
                app.overlay = Some(Overlay::DeferInput { target, next, input, error: None });
                None
            }
            Edit::Done => match actions::parse_duration(&input) {
                Ok(secs) => {
                    app.overlay = Some(Overlay::Confirm(actions::defer(target, secs, next)));
                    None
                }
                Err(e) => {
                    app.overlay = Some(Overlay::DeferInput { target, next, input, error: Some(e) });
                    None
                }
            },
        },
    }
}

enum Edit {
    Typing,
    Done,
    Cancel,
}

fn edit(input: &mut String, key: Key) -> Edit {
    match key {
        Key::Esc => Edit::Cancel,
        Key::Enter => Edit::Done,
        Key::Backspace => {
            input.pop();
            Edit::Typing
        }
        Key::Char(c) if input.chars().count() < 200 => {
            input.push(c);
            Edit::Typing
        }
        _ => Edit::Typing,
    }
}
