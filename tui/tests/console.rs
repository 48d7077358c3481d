//! The console without a terminal: `update` driven key by key and message by
//! message, and every view rendered through `TestBackend` into insta snapshots,
//! fed with JSON captured from real daemons (`fixtures/capture.sh`).

use chrono::{DateTime, FixedOffset, Utc};
use nbackup_protocol::admin::{
    AgentInfo, AgentStatus, ArchiveInfo, DaemonKind, Event, Freshness, HistoryRecord, Series, ServerStatus,
    SessionInfo, SessionPhase, WatchItem,
};
use nbackup_tui::client::EntryTarget;
use nbackup_tui::console::actions::Action;
use nbackup_tui::console::app::{self, App, Cmd, LinkEvent, Msg, Overlay, Settings, Tab};
use nbackup_tui::console::model::Link;
use nbackup_tui::console::view::{self, Screen};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::Color;
use serde::Deserialize;

#[derive(Deserialize)]
struct ServerFixture {
    captured_at: DateTime<Utc>,
    status: ServerStatus,
    sessions: Vec<SessionInfo>,
    agents: Vec<AgentInfo>,
    events: Vec<Event>,
    history: Vec<HistoryRecord>,
    archives: Vec<ArchiveInfo>,
    series: Vec<Series>,
}

#[derive(Deserialize)]
struct AgentFixture {
    captured_at: DateTime<Utc>,
    status: AgentStatus,
    events: Vec<Event>,
    series: Vec<Series>,
}

fn settings(color: bool) -> Settings {
    Settings { readonly: false, color, tz: FixedOffset::east_opt(0).expect("utc"), user: "op".into() }
}

fn feed(app: &mut App, e: LinkEvent) -> Option<Cmd> {
    app::update(app, Msg::Link(e))
}

/// The server console after connecting and backfilling, as a real one would be.
fn server_app(color: bool) -> App {
    let f: ServerFixture =
        serde_json::from_str(include_str!("fixtures/server.json")).expect("fixtures/server.json parses");
    let mut app = App::new(settings(color), f.captured_at);
    feed(&mut app, LinkEvent::Connected(DaemonKind::Server));
    feed(&mut app, LinkEvent::Series(f.series));
    let snapshot = WatchItem::ServerSnapshot { status: f.status, sessions: f.sessions, agents: f.agents };
    feed(&mut app, LinkEvent::Item(Box::new(snapshot)));
    feed(&mut app, LinkEvent::Backfill(f.events));
    feed(&mut app, LinkEvent::Archives(f.archives));
    feed(&mut app, LinkEvent::History(f.history));
    app
}

fn agent_app(color: bool) -> App {
    let f: AgentFixture =
        serde_json::from_str(include_str!("fixtures/agent.json")).expect("fixtures/agent.json parses");
    let mut app = App::new(settings(color), f.captured_at);
    feed(&mut app, LinkEvent::Connected(DaemonKind::Agent));
    feed(&mut app, LinkEvent::Series(f.series));
    feed(&mut app, LinkEvent::Item(Box::new(WatchItem::AgentSnapshot { status: f.status })));
    feed(&mut app, LinkEvent::Backfill(f.events));
    app
}

fn key(app: &mut App, code: KeyCode) -> Option<Cmd> {
    app::update(app, Msg::Key(KeyEvent::new(code, KeyModifiers::NONE)))
}

fn chars(app: &mut App, text: &str) {
    for c in text.chars() {
        key(app, KeyCode::Char(c));
    }
}

fn render(app: &App, w: u16, h: u16) -> Terminal<TestBackend> {
    let mut t = Terminal::new(TestBackend::new(w, h)).expect("terminal");
    t.draw(|f| f.render_widget(Screen(app), f.area())).expect("draw");
    t
}

fn text(app: &App, w: u16, h: u16) -> String {
    view::buffer_text(render(app, w, h).backend().buffer())
}

/// Both sizes of one state, in one snapshot each.
fn snap(name: &str, app: &App) {
    insta::assert_snapshot!(format!("{name}_80x24"), text(app, 80, 24));
    insta::assert_snapshot!(format!("{name}_160x48"), text(app, 160, 48));
}

#[test]
fn every_server_view_at_both_sizes() {
    let mut app = server_app(true);
    snap("server_overview", &app);
    for (n, name) in [
        ('2', "server_sessions"),
        ('3', "server_agents"),
        ('4', "server_archives"),
        ('5', "server_history"),
        ('6', "server_events"),
    ] {
        key(&mut app, KeyCode::Char(n));
        snap(name, &app);
    }
    key(&mut app, KeyCode::Char('2'));
    key(&mut app, KeyCode::Enter);
    assert!(app.detail.is_some(), "Enter opens the session");
    snap("server_session", &app);
    key(&mut app, KeyCode::Char('?'));
    snap("server_help", &app);
}

#[test]
fn every_agent_view_at_both_sizes() {
    let mut app = agent_app(true);
    assert_eq!(app.tabs(), [Tab::Overview, Tab::Sessions, Tab::Agents, Tab::Events]);
    snap("agent_overview", &app);
    for (n, name) in [('2', "agent_running"), ('3', "agent_entries"), ('4', "agent_events")] {
        key(&mut app, KeyCode::Char(n));
        snap(name, &app);
    }
    key(&mut app, KeyCode::Char('5'));
    assert_eq!(app.tab, Tab::Events, "the agent has no fifth view");
}

#[test]
fn each_confirmation_names_its_target_and_consequence() {
    let mut app = server_app(true);
    // Abort a session.
    key(&mut app, KeyCode::Char('2'));
    key(&mut app, KeyCode::Char('a'));
    let Some(Overlay::Confirm(c)) = &app.overlay else { panic!("a confirmation: {:?}", app.overlay) };
    assert!(c.lines.iter().any(|l| l.contains("Abort discards") && l.contains("stream")), "{c:?}");
    snap("confirm_abort_session", &app);
    key(&mut app, KeyCode::Esc);
    assert_eq!(app.overlay, None, "Esc backs out");
    // Rotate a stream, from the session's stream table.
    key(&mut app, KeyCode::Enter);
    key(&mut app, KeyCode::Char('j'));
    key(&mut app, KeyCode::Char('r'));
    snap("confirm_rotate", &app);
    let Some(Overlay::Confirm(c)) = app.overlay.clone() else { panic!("rotate confirmation") };
    assert!(matches!(c.action, Action::Rotate { stream: 1, .. }), "the selected stream: {c:?}");
    let cmd = key(&mut app, KeyCode::Enter);
    assert_eq!(cmd, Some(Cmd::Act(c.action.clone())), "Enter confirms");
    assert!(matches!(&app.overlay, Some(Overlay::Answer { answer: None, .. })), "the answer is awaited");
    snap("answer_waiting", &app);
    feed(&mut app, LinkEvent::Answer { title: c.action.title(), result: Ok("stream 1 closed".into()) });
    snap("answer_done", &app);
    key(&mut app, KeyCode::Char('x'));
    assert_eq!(app.overlay, None, "any key closes the answer");
    // Run now, defer, on the agents view; reload anywhere.
    key(&mut app, KeyCode::Esc);
    key(&mut app, KeyCode::Char('3'));
    key(&mut app, KeyCode::Char('n'));
    snap("confirm_run_now", &app);
    key(&mut app, KeyCode::Esc);
    key(&mut app, KeyCode::Char('d'));
    chars(&mut app, "2 weeks");
    key(&mut app, KeyCode::Enter);
    assert!(matches!(&app.overlay, Some(Overlay::DeferInput { error: Some(_), .. })), "a bad duration is refused");
    snap("defer_input_error", &app);
    for _ in 0..7 {
        key(&mut app, KeyCode::Backspace);
    }
    chars(&mut app, "2h");
    key(&mut app, KeyCode::Enter);
    snap("confirm_defer", &app);
    let Some(Overlay::Confirm(c)) = app.overlay.clone() else { panic!("defer confirmation") };
    assert!(matches!(c.action, Action::Defer { seconds: 7200, .. }), "{c:?}");
    key(&mut app, KeyCode::Char('n'));
    // Verify an archive from the archives view.
    key(&mut app, KeyCode::Char('4'));
    key(&mut app, KeyCode::Char('v'));
    let Some(Overlay::Confirm(c)) = app.overlay.clone() else { panic!("verify confirmation") };
    assert!(matches!(&c.action, Action::Verify { archive, .. } if archive.ends_with(".tar.gz")), "{c:?}");
    snap("confirm_verify", &app);
    key(&mut app, KeyCode::Esc);
    key(&mut app, KeyCode::Char('R'));
    snap("confirm_reload", &app);
    assert_eq!(key(&mut app, KeyCode::Char('y')), Some(Cmd::Act(Action::Reload)));
    feed(&mut app, LinkEvent::Answer { title: "reload".into(), result: Err("config.yaml:3: unknown key".into()) });
    snap("answer_refused", &app);
}

#[test]
fn the_disconnected_banner_keeps_the_data_and_says_how_old() {
    let mut app = server_app(true);
    let later = app.now + chrono::Duration::seconds(37);
    app::update(&mut app, Msg::Tick(later));
    feed(&mut app, LinkEvent::Down { error: "connection refused".into(), retry_in_secs: 4 });
    let banner = app.banner().expect("a banner");
    assert!(banner.starts_with("disconnected · data 37 s old · retry in 4 s"), "{banner}");
    snap("disconnected", &app);
    assert!(!app.data.sessions().is_empty(), "the last data stays");
    feed(&mut app, LinkEvent::Reconnecting);
    assert_eq!(app.link, Link::Connecting);
    feed(&mut app, LinkEvent::Connected(DaemonKind::Server));
    assert_eq!((app.link.clone(), app.banner()), (Link::Live, None));
}

#[test]
fn a_terminal_below_80x24_says_resize_and_q_still_quits() {
    let mut app = server_app(true);
    let t = text(&app, 60, 20);
    assert!(t.contains("needs 80×24") && t.contains("q to quit"), "{t}");
    key(&mut app, KeyCode::Char('q'));
    assert!(app.quit);
}

#[test]
fn without_colour_no_cell_has_one_and_states_stay_words() {
    let app = server_app(false);
    for (w, h) in [(80, 24), (160, 48)] {
        let t = render(&app, w, h);
        let buf = t.backend().buffer();
        for cell in buf.content() {
            assert_eq!((cell.fg, cell.bg), (Color::Reset, Color::Reset), "a coloured cell {cell:?}");
        }
    }
    let t = text(&app, 160, 48);
    assert!(t.contains("✖ missed") && t.contains("! overdue") && t.contains("○ down"), "{t}");
    // And with colour, the late rows are red or yellow, the live link green.
    let app = server_app(true);
    let t = render(&app, 160, 48);
    let colours: Vec<Color> = t.backend().buffer().content().iter().map(|c| c.fg).collect();
    assert!(colours.contains(&Color::Red) && colours.contains(&Color::Yellow) && colours.contains(&Color::Green));
}

#[test]
fn freshness_puts_late_entries_first() {
    let app = server_app(true);
    let rows = nbackup_tui::console::rows::entries(&app.data, Default::default());
    let states: Vec<Freshness> = rows.iter().map(|r| r.freshness().state).collect();
    assert_eq!(states[0], Freshness::Missed, "{states:?}");
    assert_eq!(states[1], Freshness::Overdue, "{states:?}");
    assert!(states[2..].iter().all(|s| !s.is_late()), "{states:?}");
}

#[test]
fn keys_move_switch_and_open() {
    let mut app = server_app(true);
    assert_eq!(key(&mut app, KeyCode::Tab), None);
    assert_eq!(app.tab, Tab::Sessions);
    assert_eq!(key(&mut app, KeyCode::Tab), None, "agents need no refresh");
    assert_eq!(key(&mut app, KeyCode::Tab), Some(Cmd::Refresh), "archives are fetched again on entry");
    key(&mut app, KeyCode::BackTab);
    key(&mut app, KeyCode::BackTab);
    assert_eq!(app.tab, Tab::Sessions);
    key(&mut app, KeyCode::Enter);
    assert!(app.detail.is_some(), "Enter opens");
    key(&mut app, KeyCode::Down);
    key(&mut app, KeyCode::Char('j'));
    assert_eq!(app.stream_selected, app.detail_session().expect("s").streams.len().min(3) - 1);
    key(&mut app, KeyCode::Char('g'));
    assert_eq!(app.stream_selected, 0);
    key(&mut app, KeyCode::Esc);
    assert_eq!(app.detail, None);
    key(&mut app, KeyCode::Char('h'));
    assert_eq!(app.tab, Tab::Overview, "h is previous view");
    key(&mut app, KeyCode::Char('l'));
    assert_eq!(app.tab, Tab::Sessions, "l is next view");
    // A session that ends while open says so instead of vanishing.
    key(&mut app, KeyCode::Enter);
    let id = app.detail.clone().expect("open again");
    let status = app.data.server_status().cloned().expect("status");
    let agents = app.data.agents().to_vec();
    feed(&mut app, LinkEvent::History(Vec::new()));
    feed(&mut app, LinkEvent::Item(Box::new(WatchItem::ServerSnapshot { status, sessions: Vec::new(), agents })));
    let t = text(&app, 80, 24);
    assert!(t.contains(&format!("session {} has ended", &id[..12])), "{t}");
}

#[test]
fn logs_follow_pause_filter_search_and_sort() {
    let mut app = server_app(true);
    key(&mut app, KeyCode::Char('6'));
    let n = app.row_count();
    assert!(n > 5, "the fixture has events");
    assert_eq!(app.selected(Tab::Events), n - 1, "following shows the newest");
    key(&mut app, KeyCode::Up);
    assert!(!app.follow, "moving pauses");
    assert_eq!(app.selected(Tab::Events), n - 2);
    key(&mut app, KeyCode::Char('f'));
    assert!(app.follow);
    // Level filter cycles warn → error → off.
    key(&mut app, KeyCode::Char('L'));
    let warns = app.row_count();
    assert!(warns < n);
    key(&mut app, KeyCode::Char('L'));
    key(&mut app, KeyCode::Char('L'));
    assert_eq!(app.row_count(), n);
    // Search, inverted search, a bad regex.
    key(&mut app, KeyCode::Char('/'));
    chars(&mut app, "committed");
    key(&mut app, KeyCode::Enter);
    let hits = app.row_count();
    assert!(hits > 0 && hits < n);
    key(&mut app, KeyCode::Char('/'));
    key(&mut app, KeyCode::Home);
    for _ in 0.."committed".len() {
        key(&mut app, KeyCode::Backspace);
    }
    chars(&mut app, "!committed");
    key(&mut app, KeyCode::Enter);
    assert_eq!(app.row_count(), n - hits, "! inverts");
    snap("events_filtered", &app);
    key(&mut app, KeyCode::Char('/'));
    for _ in 0.."!committed".len() {
        key(&mut app, KeyCode::Backspace);
    }
    chars(&mut app, "(unclosed");
    key(&mut app, KeyCode::Enter);
    assert!(matches!(&app.overlay, Some(Overlay::Search { error: Some(_), .. })), "a bad regex is shown, not applied");
    key(&mut app, KeyCode::Esc);
    key(&mut app, KeyCode::Char('c'));
    assert_eq!(app.row_count(), n, "c clears");
    // Sort by kind, reversed; following stops.
    key(&mut app, KeyCode::Char('s'));
    key(&mut app, KeyCode::Char('s'));
    key(&mut app, KeyCode::Char('S'));
    assert!(!app.follow);
    assert_eq!(app.table(Tab::Events).order.column, 2);
    // History: agent filter from the selected row.
    key(&mut app, KeyCode::Char('5'));
    key(&mut app, KeyCode::Char('A'));
    let agent = app.filter.agent.clone().expect("agent filter");
    assert!(app.data.history.iter().any(|h| h.agent == agent));
    let all = app.row_count();
    key(&mut app, KeyCode::Char('E'));
    let entry = app.filter.entry.clone().expect("entry filter");
    assert!(app.row_count() < all, "only {entry}'s sessions: {} of {all}", app.row_count());
}

#[test]
fn the_palette_takes_names_aliases_and_says_what_it_does_not_know() {
    let mut app = server_app(true);
    key(&mut app, KeyCode::Char(':'));
    chars(&mut app, "ev");
    key(&mut app, KeyCode::Enter);
    assert_eq!((app.tab, &app.overlay), (Tab::Events, &None));
    key(&mut app, KeyCode::Char(':'));
    snap("palette", &app);
    chars(&mut app, "frobnicate");
    key(&mut app, KeyCode::Enter);
    assert!(matches!(&app.overlay, Some(Overlay::Palette { error: Some(e), .. }) if e.contains("frobnicate")));
    key(&mut app, KeyCode::Esc);
    key(&mut app, KeyCode::Char(':'));
    chars(&mut app, "q");
    key(&mut app, KeyCode::Enter);
    assert!(app.quit);
}

#[test]
fn readonly_hides_and_refuses_actions() {
    let mut app = server_app(true);
    app.settings.readonly = true;
    key(&mut app, KeyCode::Char('2'));
    assert_eq!(key(&mut app, KeyCode::Char('a')), None);
    assert_eq!(app.overlay, None);
    assert!(app.notice.as_deref().is_some_and(|n| n.contains("read-only")));
    key(&mut app, KeyCode::Char('?'));
    let t = text(&app, 160, 48);
    assert!(t.contains("actions are off") && !t.contains("rotate the stream"), "{t}");
}

#[test]
fn a_committing_session_cannot_be_aborted_and_says_why() {
    let mut app = server_app(true);
    let mut f: ServerFixture = serde_json::from_str(include_str!("fixtures/server.json")).expect("fixture");
    f.sessions[0].phase = SessionPhase::Committing;
    let snapshot = WatchItem::ServerSnapshot { status: f.status, sessions: f.sessions, agents: f.agents };
    feed(&mut app, LinkEvent::Item(Box::new(snapshot)));
    key(&mut app, KeyCode::Char('2'));
    key(&mut app, KeyCode::Char('a'));
    assert_eq!(app.overlay, None);
    assert!(app.notice.as_deref().is_some_and(|n| n.contains("committing")), "{:?}", app.notice);
}

#[test]
fn events_from_the_stream_are_deduplicated_and_endings_refresh_history() {
    let mut app = server_app(true);
    let n = app.data.events.len();
    let last = app.data.events.back().cloned().expect("an event");
    feed(&mut app, LinkEvent::Item(Box::new(WatchItem::Event { event: last.clone() })));
    assert_eq!(app.data.events.len(), n, "a replayed event is not added twice");
    let mut new = last;
    new.seq += 1;
    new.kind = nbackup_protocol::admin::EventKind::Committed;
    let cmd = feed(&mut app, LinkEvent::Item(Box::new(WatchItem::Event { event: new })));
    assert_eq!(cmd, Some(Cmd::Refresh));
    assert_eq!(app.data.events.len(), n + 1);
    feed(&mut app, LinkEvent::Unreadable("bad line".into()));
    assert!(text(&app, 160, 48).contains("1 unreadable line(s)"));
}

#[test]
fn the_agent_daemon_targets_its_own_entries() {
    let mut app = agent_app(true);
    key(&mut app, KeyCode::Char('3'));
    key(&mut app, KeyCode::Char('n'));
    let Some(Overlay::Confirm(c)) = &app.overlay else { panic!("confirm") };
    assert!(matches!(&c.action, Action::Run(EntryTarget::Own(_))), "{c:?}");
}

#[test]
fn docs_list_every_key_and_palette_command() {
    let doc = include_str!("../../docs/console.md");
    for b in nbackup_tui::console::keys::BINDINGS {
        let keys: Vec<String> = b.keys.iter().map(|k| format!("`{}`", k.label())).collect();
        let row = format!("| {} | {}", keys.join(" "), b.help);
        assert!(doc.contains(&row), "docs/console.md lacks the key row {row:?}");
    }
    for (name, _, _) in nbackup_tui::console::keys::PALETTE {
        assert!(doc.contains(&format!("`{name}`")), "docs/console.md lacks the palette command {name}");
    }
}

#[test]
fn the_overview_shows_each_storages_buckets_and_whether_they_keep_up() {
    use nbackup_protocol::admin::BucketStatus;
    let mut app = server_app(false);
    let mut f: ServerFixture = serde_json::from_str(include_str!("fixtures/server.json")).expect("fixture");
    let bucket = |name: &str, owed: u64, failing: u64| BucketStatus {
        name: name.into(),
        provider: "s3".into(),
        bucket: "fleet-backups".into(),
        mode: "sync".into(),
        owed,
        failing,
        oldest_owed_secs: (owed > 0).then_some(5400),
        sent_bytes: 3 << 30,
        last_error: (failing > 0).then(|| "connection reset".into()),
    };
    f.status.storages[0].buckets = vec![bucket("offsite", 0, 0), bucket("dr", 3, 1)];
    let first = f.status.storages[0].name.clone();
    let snapshot = WatchItem::ServerSnapshot { status: f.status, sessions: f.sessions, agents: f.agents };
    feed(&mut app, LinkEvent::Item(Box::new(snapshot)));
    let t = text(&app, 160, 48);
    let line = |needle: &str| t.lines().find(|l| l.contains(needle)).unwrap_or_default().to_string();
    assert!(line("↳ offsite").contains("in step") && line("↳ offsite").contains("↑ 3.0 GiB"), "{t}");
    let dr = line("↳ dr");
    assert!(dr.contains("1/3 failing") && dr.contains("behind 1h") && dr.contains("s3:fleet-backups"), "{t}");
    assert!(text(&app, 80, 24).contains("↳ dr"), "the buckets fit the small screen too");
    // The storage rows are all still there, above their buckets.
    let storage = t.lines().position(|l| l.contains(&first)).unwrap_or(usize::MAX);
    assert!(storage < t.lines().position(|l| l.contains("↳ offsite")).expect("bucket row"), "{t}");
}
