//! How long one frame takes, per view, at 160×48 with 10 000 events and 200
//! sessions (the issue-9 budget is 10 ms): `cargo bench -p nbackup-tui --bench frame`.
//! Built from the captured fixture, multiplied; prints median and 99th percentile.

use std::time::Instant;

use nbackup_protocol::admin::DaemonKind;
use nbackup_protocol::admin::{AgentInfo, Event, HistoryRecord, ServerStatus, SessionInfo, WatchItem};
use nbackup_tui::console::app::{self, App, LinkEvent, Msg, Settings};
use nbackup_tui::console::view::Screen;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::layout::Rect;
use ratatui::widgets::Widget;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    captured_at: chrono::DateTime<chrono::Utc>,
    status: ServerStatus,
    sessions: Vec<SessionInfo>,
    agents: Vec<AgentInfo>,
    events: Vec<Event>,
    history: Vec<HistoryRecord>,
}

fn app() -> App {
    let f: Fixture = serde_json::from_str(include_str!("../tests/fixtures/server.json")).expect("fixture");
    let settings =
        Settings { readonly: false, color: true, tz: chrono::FixedOffset::east_opt(0).expect("tz"), user: "op".into() };
    let mut app = App::new(settings, f.captured_at);
    let feed = |app: &mut App, e| app::update(app, Msg::Link(e));
    feed(&mut app, LinkEvent::Connected(DaemonKind::Server));
    let sessions: Vec<SessionInfo> = (0..200)
        .map(|i| {
            let mut s = f.sessions[0].clone();
            s.id = format!("{i:032x}");
            s.agent = format!("host-{i:03}");
            s
        })
        .collect();
    let snapshot = WatchItem::ServerSnapshot { status: f.status.clone(), sessions, agents: f.agents.clone() };
    feed(&mut app, LinkEvent::Item(Box::new(snapshot)));
    let events: Vec<Event> = (0..10_000)
        .map(|i| {
            let mut e = f.events[i % f.events.len()].clone();
            e.seq = i as u64 + 1;
            e
        })
        .collect();
    feed(&mut app, LinkEvent::Backfill(events));
    let history: Vec<HistoryRecord> = (0..1000).map(|i| f.history[i % f.history.len()].clone()).collect();
    feed(&mut app, LinkEvent::History(history));
    app
}

fn main() {
    let mut app = app();
    let area = Rect::new(0, 0, 160, 48);
    println!("view        median    p99   (160x48, 10000 events, 200 sessions, 300 frames)");
    for (key, name) in
        [('1', "overview"), ('2', "sessions"), ('3', "agents"), ('4', "archives"), ('5', "history"), ('6', "events")]
    {
        app::update(&mut app, Msg::Key(KeyEvent::new(KeyCode::Char(key), KeyModifiers::NONE)));
        measure(&app, name, area);
    }
    // The worst case: a regex over every event's text, on every frame.
    for c in "/stream|commit".chars() {
        app::update(&mut app, Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)));
    }
    app::update(&mut app, Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE)));
    measure(&app, "searched", area);
    app::update(&mut app, Msg::Key(KeyEvent::new(KeyCode::Char('2'), KeyModifiers::NONE)));
    app::update(&mut app, Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE)));
    measure(&app, "session", area);
}

fn measure(app: &App, name: &str, area: Rect) {
    let mut times: Vec<f64> = (0..300)
        .map(|_| {
            let mut buf = Buffer::empty(area);
            let t = Instant::now();
            Screen(app).render(area, &mut buf);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    println!("{name:<10} {:>6.2} ms {:>6.2} ms", times[150], times[296]);
}
