//! The first screen. Server: storages with usage and headroom, freshness (late
//! first), agents, live sessions, fleet throughput, recent events. Agent: its
//! entries with next runs, running backups, throughput, events.

use nbackup_protocol::admin::{DaemonKind, StorageStatus};
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Sparkline, Widget};

use super::super::actions::short;
use super::super::app::App;
use super::super::fmt;
use super::super::model::Trace;
use super::super::rows::{self, Order};
use super::super::theme::{Theme, level_glyph};
use super::sessions::phase_word;
use super::tables::{Col, col, draw, freshness_word, span, styled};

pub fn render(app: &App, theme: Theme, area: Rect, buf: &mut Buffer) {
    match app.data.kind {
        Some(DaemonKind::Agent) => agent(app, theme, area, buf),
        _ => server(app, theme, area, buf),
    }
}

/// Free space in units of the newest archive of that storage: how many more
/// backups fit.
fn headroom(app: &App, s: &StorageStatus) -> String {
    let newest = app.data.archives.iter().filter(|a| a.storage == s.name).max_by(|a, b| a.stamp.cmp(&b.stamp));
    let unit = newest.map(|a| a.size).or_else(|| (s.archives > 0).then(|| s.archive_bytes / s.archives));
    match unit {
        Some(u) if u > 0 => format!("≈{} more", s.free_bytes / u),
        _ => "-".into(),
    }
}

const STORAGE_COLS: &[Col] = &[
    col("STORAGE", 12, 0),
    col("USED", 17, 0),
    col("FREE", 10, 0),
    col("OF", 10, 3),
    col("HEADROOM", 12, 1),
    col("ARCHIVES", 16, 2),
    col("KEEP", 4, 4),
    col("COMPRESSION", 11, 5),
];

const FRESH_COLS: &[Col] =
    &[col("AGENT/ENTRY", 22, 0), col("FRESHNESS", 13, 0), col("LAST SUCCESS", 14, 1), col("NEXT RUN", 20, 2)];

const AGENT_COLS: &[Col] =
    &[col("AGENT", 14, 0), col("CONTROL", 9, 0), col("RTT", 9, 1), col("LOAD", 5, 3), col("RUNNING", 8, 2)];

const LIVE_COLS: &[Col] = &[
    col("SESSION", 12, 3),
    col("AGENT/BACKUP", 22, 0),
    col("PHASE", 13, 0),
    col("RECEIVED", 10, 1),
    col("RATE", 10, 0),
    col("STREAMS", 7, 2),
];

/// A storage's bucket under it, in the storage table's columns: whether its copies
/// keep up (in step, owed, failing), what it has sent, its mode, how far behind the
/// oldest owed copy is, and where it goes.
fn bucket_row(b: &nbackup_protocol::admin::BucketStatus, theme: Theme) -> (Vec<Span<'static>>, Style) {
    let (state, style) = match (b.owed, b.failing) {
        (0, _) => ("in step".to_string(), theme.good()),
        (owed, 0) => (format!("{owed} owed"), theme.warn()),
        (owed, failing) => (format!("{failing}/{owed} failing"), theme.bad()),
    };
    let behind = b.oldest_owed_secs.map_or_else(String::new, |s| match s {
        s if s < 3600 => format!("behind {}m", s / 60),
        s if s < 86_400 => format!("behind {}h", s / 3600),
        s => format!("behind {}d", s / 86_400),
    });
    (
        vec![
            span(format!(" ↳ {}", b.name)),
            styled(state, style),
            span(format!("↑ {}", fmt::bytes(b.sent_bytes))),
            span(b.mode.clone()),
            span(behind),
            span(format!("{}:{}", b.provider, b.bucket)),
            span(String::new()),
            span(String::new()),
        ],
        Style::new(),
    )
}

fn server(app: &App, theme: Theme, area: Rect, buf: &mut Buffer) {
    let Some(status) = app.data.server_status() else {
        Paragraph::new(Span::styled(" waiting for the server's first snapshot…", theme.dim())).render(area, buf);
        return;
    };
    let sessions = app.data.sessions();
    let buckets: usize = status.storages.iter().map(|s| s.buckets.len()).sum();
    let storages_h = (status.storages.len() + buckets) as u16 + 2;
    let live_h = (sessions.len().max(1) as u16 + 2).min(8);
    let entry_rows = app.data.agents().iter().map(|a| a.entries.len()).sum::<usize>().max(app.data.agents().len());
    // Late entries come first and must be visible: the freshness panel grows first.
    let room = area.height.saturating_sub(storages_h.min(7) + live_h + 5).max(4);
    let middle_h = (entry_rows.max(1) as u16 + 2).clamp(4, room);
    let [stor, middle, live, bottom] = Layout::vertical([
        Constraint::Length(storages_h.min(7)),
        Constraint::Length(middle_h),
        Constraint::Length(live_h),
        Constraint::Min(5),
    ])
    .areas(area);

    let title = format!(
        "Storages · {} session(s) · {} agent(s) connected{}",
        status.active_sessions,
        status.connected_agents,
        if status.draining { " · SHUTTING DOWN" } else { "" }
    );
    let inner = super::section(&title, theme, stor, buf);
    let body = status
        .storages
        .iter()
        .flat_map(|s| {
            let used = 1.0 - s.free_bytes as f64 / s.total_bytes.max(1) as f64;
            let row = (
                vec![
                    span(s.name.clone()),
                    super::bar(used, 10, theme.usage(used)),
                    span(fmt::bytes(s.free_bytes)),
                    span(fmt::bytes(s.total_bytes)),
                    span(headroom(app, s)),
                    span(format!("{} ({})", s.archives, fmt::bytes(s.archive_bytes))),
                    span(s.max_backups.to_string()),
                    span(format!("{} {}", s.compression, s.level)),
                ],
                Style::new(),
            );
            std::iter::once(row).chain(s.buckets.iter().map(move |b| bucket_row(b, theme)))
        })
        .collect();
    draw(STORAGE_COLS, body, None, theme, inner, buf);

    let [fresh_area, agents_area] =
        Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(middle);
    let entries = rows::entries(&app.data, Order::default());
    let late = entries.iter().filter(|r| r.freshness().state.is_late()).count();
    let title = if late > 0 { format!("Freshness · {late} LATE") } else { "Freshness · all on time".into() };
    let inner = super::section(&title, theme, fresh_area, buf);
    let body = entries
        .iter()
        .map(|r| {
            let f = r.freshness();
            let last = f.age_secs.map_or_else(|| "never".to_string(), |a| format!("{} ago", fmt::span(a)));
            let next = r.entry.next_run.as_deref().map_or_else(|| "-".to_string(), |t| app.when(t));
            let style = if f.state.is_late() { theme.freshness(f.state) } else { Style::new() };
            (
                vec![
                    span(format!("{}/{}", r.agent_name(), r.entry.name)),
                    styled(freshness_word(f), theme.freshness(f.state)),
                    span(last),
                    span(next),
                ],
                style,
            )
        })
        .collect();
    draw(FRESH_COLS, body, None, theme, inner, buf);

    let agents = app.data.agents();
    let inner = super::section(&format!("Agents · {}", agents.len()), theme, agents_area, buf);
    let body = agents
        .iter()
        .map(|a| {
            let control = match (a.connected, a.silent) {
                (true, _) => styled("● up", theme.good()),
                (false, true) => styled("✖ silent", theme.bad()),
                (false, false) => styled("○ down", theme.warn()),
            };
            (
                vec![
                    span(a.name.clone()),
                    control,
                    span(fmt::ms(a.rtt_ms)),
                    span(a.load1.map_or_else(|| "-".into(), |l| format!("{l:.2}"))),
                    span(a.running.len().to_string()),
                ],
                Style::new(),
            )
        })
        .collect();
    draw(AGENT_COLS, body, None, theme, inner, buf);

    let inner = super::section(&format!("Live sessions · {}", sessions.len()), theme, live, buf);
    let body = rows::sessions(&app.data, Order::default())
        .iter()
        .map(|s| {
            (
                vec![
                    span(short(&s.id)),
                    span(format!("{}/{}", s.agent, s.backup)),
                    phase_word(s, theme),
                    span(fmt::bytes(s.bytes_received)),
                    span(fmt::rate(s.rate_bps)),
                    span(s.streams.len().to_string()),
                ],
                Style::new(),
            )
        })
        .collect();
    draw(LIVE_COLS, body, None, theme, inner, buf);
    throughput_and_events(app, "receive_bps", "received", theme, bottom, buf);
}

/// A sparkline of one fleet series over the last minutes, and the newest events.
fn throughput_and_events(app: &App, series: &str, word: &str, theme: Theme, area: Rect, buf: &mut Buffer) {
    let [spark_area, events_area] = Layout::vertical([Constraint::Length(3), Constraint::Min(1)]).areas(area);
    let empty = Trace::default();
    let trace = app.data.series.get(series).unwrap_or(&empty);
    let now = trace.last().unwrap_or(0.0);
    let peak = trace.0.iter().fold(0.0f64, |m, (_, v)| m.max(*v));
    let title = format!("Throughput · {word} {} now · peak {}", fmt::rate(now), fmt::rate(peak));
    let inner = super::section(&title, theme, spark_area, buf);
    let width = inner.width as usize;
    let points: Vec<u64> = trace.0.iter().rev().take(width).rev().map(|(_, v)| (*v / 1e3).max(0.0) as u64).collect();
    Sparkline::default().data(&points).style(theme.accent()).render(inner, buf);
    let inner = super::section("Recent events", theme, events_area, buf);
    let n = inner.height as usize;
    let lines: Vec<Line<'_>> = app
        .data
        .events
        .iter()
        .rev()
        .take(n)
        .rev()
        .map(|e| {
            let l = e.kind.level();
            Line::from(vec![
                span(format!("{} ", fmt::clock_secs(&e.time, app.now, app.settings.tz))),
                styled(format!("{} {:<18}", level_glyph(l), e.kind.as_str()), theme.level(l)),
                span(format!(" {}", e.message)),
                span(e.actor.as_ref().map_or_else(String::new, |a| format!(" — by {a}"))),
            ])
        })
        .collect();
    Paragraph::new(lines).render(inner, buf);
}

const ENTRY_COLS: &[Col] = &[
    col("ENTRY", 14, 0),
    col("FRESHNESS", 13, 0),
    col("SCHEDULE", 14, 2),
    col("NEXT RUN", 27, 0),
    col("LAST RESULT", 22, 1),
];

fn agent(app: &App, theme: Theme, area: Rect, buf: &mut Buffer) {
    let Some(status) = app.data.agent_status() else {
        Paragraph::new(Span::styled(" waiting for the agent's first snapshot…", theme.dim())).render(area, buf);
        return;
    };
    let entries_h = (status.entries.len() as u16 + 2).min(10);
    let runs_h = (status.running.len().max(1) as u16 + 2).min(6);
    let [info, entries_area, runs_area, bottom] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(entries_h),
        Constraint::Length(runs_h),
        Constraint::Min(5),
    ])
    .areas(area);
    let cc = &status.control_channel;
    let control = match (cc.enabled, cc.connected) {
        (false, _) => styled("control channel off", theme.dim()),
        (true, true) => styled(format!("● control channel up · RTT {}", fmt::ms(cc.rtt_ms)), theme.good()),
        (true, false) => styled("○ control channel down", theme.bad()),
    };
    let free = cc.server_free_bytes.map_or_else(String::new, |f| format!(" · server free {}", fmt::bytes(f)));
    Paragraph::new(Line::from(vec![span(format!(" server {} · ", status.server)), control, span(free)]))
        .render(info, buf);
    let inner = super::section(&format!("Entries · {}", status.entries.len()), theme, entries_area, buf);
    let body = rows::entries(&app.data, Order::default())
        .iter()
        .map(|r| {
            let e = r.entry;
            let next = e.next_run.as_deref().map_or_else(|| "-".to_string(), |t| app.when(t));
            let (last, style) = match &e.last {
                Some(l) if l.ok => (format!("ok · {}", app.when(&l.finished)), theme.good()),
                Some(l) => (format!("failed · {}", l.error.as_deref().unwrap_or("?")), theme.bad()),
                None => ("-".into(), theme.dim()),
            };
            (
                vec![
                    span(e.name.clone()),
                    styled(freshness_word(&e.freshness), theme.freshness(e.freshness.state)),
                    span(e.schedule.clone().unwrap_or_else(|| "on demand".into())),
                    span(if e.running { "running now".to_string() } else { next }),
                    styled(last, style),
                ],
                Style::new(),
            )
        })
        .collect();
    draw(ENTRY_COLS, body, None, theme, inner, buf);
    super::sessions::run_table(app, None, theme, runs_area, buf);
    throughput_and_events(app, "read_bps", "read", theme, bottom, buf);
}
