//! Sessions (server) or running backups (agent), and one session in detail:
//! streams, progress, an honest ETA, the bottleneck line, and charts.

use nbackup_protocol::admin::{DaemonKind, Decision, SessionInfo, SessionPhase, StreamState};
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Chart, Dataset, GraphType, Paragraph, Sparkline, Widget};

use super::super::actions::short;
use super::super::app::{App, Tab};
use super::super::fmt;
use super::super::model::Trace;
use super::super::rows::{self, Eta};
use super::super::theme::Theme;
use super::tables::{Col, col, draw, span, styled};

pub fn render(app: &App, theme: Theme, area: Rect, buf: &mut Buffer) {
    if app.data.kind == Some(DaemonKind::Agent) {
        return runs(app, theme, area, buf);
    }
    match app.detail_session() {
        Some(s) => detail(app, s, theme, area, buf),
        None if app.detail.is_some() => {
            let inner = super::section("Session", theme, area, buf);
            let id = app.detail.as_deref().unwrap_or_default();
            let ended = app.data.history.iter().find(|h| h.session == id);
            let text = match ended {
                Some(h) => format!("session {} ended: {} — {}  (Esc: back)", short(id), h.outcome, h.message),
                None => format!("session {} has ended (Esc: back)", short(id)),
            };
            Paragraph::new(text).render(inner, buf);
        }
        None => list(app, theme, area, buf),
    }
}

pub fn phase_word(s: &SessionInfo, theme: Theme) -> Span<'static> {
    match s.phase {
        SessionPhase::Receiving => styled("▶ receiving", theme.good()),
        SessionPhase::Orphaned => styled("… orphaned", theme.warn()),
        SessionPhase::Committing => styled("◆ committing", theme.accent()),
        SessionPhase::Recovering => styled("↺ recovering", theme.accent()),
        SessionPhase::Unknown => styled("? unknown", theme.warn()),
    }
}

/// `42% · 1.2 GiB of 2.9 GiB read` when the agent's pre-scan gave a total.
fn progress(s: &SessionInfo) -> String {
    match (s.estimate_bytes, s.source_bytes_read) {
        (Some(t), Some(r)) if t > 0 => format!("{} of {}", fmt::pct(r as f64, t as f64), fmt::bytes(t)),
        (_, Some(r)) => format!("{} read", fmt::bytes(r)),
        _ => "-".into(),
    }
}

pub fn eta_words(e: &Eta) -> String {
    match e {
        Eta::Unknown => "-".into(),
        Eta::Done => "finishing".into(),
        Eta::Stalled(s) => format!("stalled {s} s"),
        Eta::Range { low, high } if high.saturating_sub(*low) < 10 => fmt::span(*low),
        Eta::Range { low, high } => format!("{}–{}", fmt::span(*low), fmt::span(*high)),
    }
}

fn eta_of(app: &App, s: &SessionInfo) -> Eta {
    let empty = Trace::default();
    let trace = app.data.traces.get(&s.id).map_or(&empty, |t| &t.receive_bps);
    rows::eta(s, trace)
}

const SESSION_COLS: &[Col] = &[
    col("SESSION", 12, 3),
    col("AGENT", 14, 0),
    col("BACKUP", 12, 0),
    col("STORAGE", 10, 5),
    col("PHASE", 13, 0),
    col("PROGRESS", 16, 2),
    col("RECEIVED", 10, 1),
    col("RATE", 10, 1),
    col("ETA", 14, 2),
    col("STREAMS", 7, 4),
    col("IDLE", 6, 6),
];

fn list(app: &App, theme: Theme, area: Rect, buf: &mut Buffer) {
    let order = app.table(Tab::Sessions).order;
    let list = rows::sessions(&app.data, order);
    let body = list
        .iter()
        .map(|s| {
            let eta = eta_of(app, s);
            let eta_style = if matches!(eta, Eta::Stalled(_)) { theme.warn() } else { theme.text() };
            let attached = s.streams.iter().filter(|st| st.state != StreamState::Closed).count();
            (
                vec![
                    span(short(&s.id)),
                    span(s.agent.clone()),
                    span(s.backup.clone()),
                    span(s.storage.clone()),
                    phase_word(s, theme),
                    span(progress(s)),
                    span(fmt::bytes(s.bytes_received)),
                    span(fmt::rate(s.rate_bps)),
                    styled(eta_words(&eta), eta_style),
                    span(format!("{attached}/{}", s.streams.len())),
                    span(format!("{:.0} s", s.idle_secs)),
                ],
                Style::new(),
            )
        })
        .collect();
    let title = format!("Sessions · {} live · sorted by {}", list.len(), rows::SESSION_SORTS[order.column]);
    let inner = super::section(&title, theme, area, buf);
    let selected = (!list.is_empty()).then(|| app.selected_of(Tab::Sessions, list.len()));
    draw(SESSION_COLS, body, selected, theme, inner, buf);
}

const RUN_COLS: &[Col] = &[
    col("ENTRY", 14, 0),
    col("SESSION", 12, 3),
    col("TRY", 4, 4),
    col("READ", 18, 0),
    col("SENT", 10, 1),
    col("READ RATE", 10, 1),
    col("SEND RATE", 10, 2),
    col("STREAMS", 7, 2),
    col("FILES", 8, 5),
    col("ETA", 10, 1),
];

fn runs(app: &App, theme: Theme, area: Rect, buf: &mut Buffer) {
    let list = rows::runs(&app.data);
    let [table_area, stage_area] = Layout::vertical([Constraint::Min(3), Constraint::Length(2)]).areas(area);
    let selected = (!list.is_empty()).then(|| app.selected_of(Tab::Sessions, list.len()));
    run_table(app, selected, theme, table_area, buf);
    if let Some(r) = list.get(app.selected(Tab::Sessions)).and_then(|r| r.stages.map(|s| (r, s))) {
        let (r, st) = r;
        let e = st.elapsed_secs.max(1e-9);
        let line = format!(
            " {} · archive thread: source read {} · compress {} · network wait {}",
            r.entry,
            fmt::pct(st.read_secs, e),
            fmt::pct(st.compress_secs(), e),
            fmt::pct(st.network_secs, e)
        );
        Paragraph::new(line).style(theme.dim()).render(stage_area, buf);
    }
}

/// The agent daemon's running backups, as a titled table (also on its overview).
pub fn run_table(app: &App, selected: Option<usize>, theme: Theme, area: Rect, buf: &mut Buffer) {
    let list = rows::runs(&app.data);
    let body = list
        .iter()
        .map(|r| {
            let read = match r.estimate_bytes {
                Some(t) if t > 0 => format!("{} {}", fmt::bytes(r.bytes_read), fmt::pct(r.bytes_read as f64, t as f64)),
                _ => fmt::bytes(r.bytes_read),
            };
            (
                vec![
                    span(r.entry.clone()),
                    span(r.session.as_deref().map_or("-", short).to_string()),
                    span(r.attempt.to_string()),
                    span(read),
                    span(fmt::bytes(r.bytes_acked)),
                    span(fmt::rate(r.read_bps)),
                    span(fmt::rate(r.acked_bps)),
                    span(r.streams.to_string()),
                    span(r.entries.to_string()),
                    span(r.eta_secs.map_or_else(|| "-".into(), |e| fmt::span(e as u64))),
                ],
                Style::new(),
            )
        })
        .collect();
    let inner = super::section(&format!("Running backups · {}", list.len()), theme, area, buf);
    draw(RUN_COLS, body, selected, theme, inner, buf);
}

const STREAM_COLS: &[Col] = &[
    col("STREAM", 6, 0),
    col("STATE", 11, 0),
    col("PEER", 21, 4),
    col("BYTES", 10, 0),
    col("RATE", 10, 1),
    col("RTT", 9, 1),
    col("ACK", 9, 3),
    col("RECONNECTS", 10, 2),
    col("RESENT", 7, 2),
];

fn detail(app: &App, s: &SessionInfo, theme: Theme, area: Rect, buf: &mut Buffer) {
    let charts = area.height >= 20;
    let streams_h = (s.streams.len() as u16 + 2).clamp(3, 10);
    let [info, table_area, chart_area] = Layout::vertical([
        Constraint::Length(5),
        Constraint::Length(streams_h),
        Constraint::Min(if charts { 6 } else { 0 }),
    ])
    .areas(area);
    let inner = super::section(&format!("Session {} · {}/{}", short(&s.id), s.agent, s.backup), theme, info, buf);
    let run = s.agent_run.as_ref();
    let files = run.map_or_else(|| "-".to_string(), |r| format!("{} files", r.entries));
    let started = app.when(&s.started);
    let eta = eta_of(app, s);
    let mut lines = vec![
        Line::from(vec![
            phase_word(s, theme),
            span(format!(" · storage {} · started {started} · id {}", s.storage, s.id)),
        ]),
        Line::raw(format!(
            "progress {} · {} · received {} at {} · {} duplicate chunks",
            progress(s),
            files,
            fmt::bytes(s.bytes_received),
            fmt::rate(s.rate_bps),
            s.duplicate_chunks
        )),
        Line::from(vec![
            span("ETA "),
            styled(eta_words(&eta), if matches!(eta, Eta::Stalled(_)) { theme.warn() } else { theme.accent() }),
            span(run.map_or_else(String::new, |r| format!(" · attempt {} · {} streams in use", r.attempt, r.streams))),
        ]),
    ];
    lines.push(match rows::bottleneck(s, app.now) {
        Some(b) => Line::from(vec![
            span("time: "),
            span(format!(
                "source read {:.0}% · compress {:.0}% · network wait {:.0}% │ server disk {:.0}% → ",
                b.read * 100.0,
                b.compress * 100.0,
                b.network * 100.0,
                b.disk * 100.0
            )),
            styled(b.verdict, theme.title()),
        ]),
        None => Line::styled("time: (the agent has not reported stage times)", theme.dim()),
    });
    Paragraph::new(lines).render(inner, buf);
    let stream_table = super::section("Streams", theme, table_area, buf);
    let body = s
        .streams
        .iter()
        .map(|st| {
            let state = match st.state {
                StreamState::Receiving => styled("▶ receiving", theme.good()),
                StreamState::Idle => styled("· idle", theme.text()),
                StreamState::Closed => styled("✖ closed", theme.warn()),
                StreamState::Unknown => styled("? unknown", theme.warn()),
            };
            let ack = run.and_then(|r| r.stream_table.iter().find(|t| t.stream == st.stream)).and_then(|t| t.ack_ms);
            (
                vec![
                    span(st.stream.to_string()),
                    state,
                    span(st.peer.clone()),
                    span(fmt::bytes(st.bytes)),
                    span(fmt::rate(st.rate_bps)),
                    span(fmt::ms(st.rtt_ms)),
                    span(fmt::ms(ack)),
                    span(st.reconnects.to_string()),
                    span(st.resent_chunks.to_string()),
                ],
                Style::new(),
            )
        })
        .collect();
    let sel = (!s.streams.is_empty()).then(|| app.stream_selected.min(s.streams.len() - 1));
    draw(STREAM_COLS, body, sel, theme, stream_table, buf);
    if !charts || chart_area.height < 6 {
        return;
    }
    let trace = app.data.traces.get(&s.id);
    let wide = chart_area.width >= 120;
    let parts: Vec<Constraint> = if wide { vec![Constraint::Ratio(1, 3); 3] } else { vec![Constraint::Ratio(1, 2); 2] };
    let cells = Layout::horizontal(parts).split(chart_area);
    let empty = Trace::default();
    let rate = trace.map_or(&empty, |t| &t.receive_bps);
    line_chart("received MB/s", &[("MB/s", rate, 1e-6, theme.good())], theme, cells[0], buf);
    let mut next = 1;
    if wide {
        let rtt = trace.map_or(&empty, |t| &t.rtt_ms);
        line_chart("RTT ms", &[("ms", rtt, 1.0, theme.accent())], theme, cells[1], buf);
        next = 2;
    }
    scaler_chart(s, theme, cells[next], buf);
}

/// A line chart of traces (scaled by their factor) over their common time range.
fn line_chart(title: &str, traces: &[(&str, &Trace, f64, Style)], theme: Theme, area: Rect, buf: &mut Buffer) {
    let inner = super::section(title, theme, area, buf);
    let points: Vec<Vec<(f64, f64)>> =
        traces.iter().map(|(_, t, k, _)| t.0.iter().map(|(x, y)| (*x as f64, y * k)).collect()).collect();
    let all = points.iter().flatten();
    let (x0, x1) = all.clone().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(*x), b.max(*x)));
    let ymax = all.fold(0.0f64, |m, (_, y)| m.max(*y));
    if x0 >= x1 {
        Paragraph::new(Span::styled("collecting…", theme.dim())).render(inner, buf);
        return;
    }
    let datasets: Vec<Dataset<'_>> = traces
        .iter()
        .zip(&points)
        .map(|((name, _, _, style), p)| {
            Dataset::default().name(*name).marker(Marker::Braille).graph_type(GraphType::Line).style(*style).data(p)
        })
        .collect();
    let top = if ymax > 0.0 { ymax * 1.1 } else { 1.0 };
    Chart::new(datasets)
        .x_axis(
            Axis::default().bounds([x0, x1]).labels([Span::raw(format!("-{} s", (x1 - x0) as u64)), Span::raw("now")]),
        )
        .y_axis(Axis::default().bounds([0.0, top]).labels([Span::raw("0"), Span::raw(format!("{top:.1}"))]))
        .legend_position(None)
        .render(inner, buf);
}

/// The autoscaler: producer and drain rates (a line and dots, told apart without
/// colour), its add/remove decisions as blocks; streams, state and efficiency in
/// the title.
fn scaler_chart(s: &SessionInfo, theme: Theme, area: Rect, buf: &mut Buffer) {
    let events = s.agent_run.as_ref().map(|r| r.scaler.as_slice()).unwrap_or_default();
    let title = match events.last() {
        Some(e) => format!(
            "autoscaler · {} streams · {} · eff {:.2} · ⠤ produce • drain █ decision",
            e.streams, e.state, e.efficiency
        ),
        None => "autoscaler".into(),
    };
    let inner = super::section(&title, theme, area, buf);
    if events.len() < 2 {
        Paragraph::new(Span::styled("no decisions yet", theme.dim())).render(inner, buf);
        return;
    }
    let secs = |ms: u64| ms as f64 / 1000.0;
    let produce: Vec<(f64, f64)> = events.iter().map(|e| (secs(e.at_ms), e.produce_mbps)).collect();
    let drain: Vec<(f64, f64)> = events.iter().map(|e| (secs(e.at_ms), e.drain_mbps)).collect();
    let ymax = produce.iter().chain(&drain).fold(1.0f64, |m, (_, y)| m.max(*y)) * 1.1;
    let marks: Vec<(f64, f64)> = events
        .iter()
        .filter(|e| !matches!(e.decision, Decision::Hold))
        .map(|e| (secs(e.at_ms), e.drain_mbps))
        .collect();
    let (x0, x1) = (produce[0].0, produce[produce.len() - 1].0.max(produce[0].0 + 1.0));
    // Active streams and efficiency under the chart, one decision per column.
    let [chart_area, streams_area, eff_area] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(1), Constraint::Length(1)]).areas(inner);
    let label_w = 11u16;
    let tail = |a: Rect| {
        (
            Rect { width: label_w.min(a.width), ..a },
            Rect { x: a.x + label_w, width: a.width.saturating_sub(label_w), ..a },
        )
    };
    let (l, r) = tail(streams_area);
    let shown = usize::from(r.width);
    let recent = &events[events.len().saturating_sub(shown)..];
    let max_streams = recent.iter().map(|e| e.streams).max().unwrap_or(1);
    Paragraph::new(Span::styled(format!("streams {max_streams:>2} "), theme.dim())).render(l, buf);
    let streams: Vec<u64> = recent.iter().map(|e| u64::from(e.streams)).collect();
    Sparkline::default().data(&streams).max(u64::from(max_streams).max(1)).style(theme.accent()).render(r, buf);
    let (l, r) = tail(eff_area);
    let last_eff = recent.last().map_or(0.0, |e| e.efficiency);
    Paragraph::new(Span::styled(format!("eff {last_eff:>5.2} "), theme.dim())).render(l, buf);
    let eff: Vec<u64> = recent.iter().map(|e| (e.efficiency.clamp(0.0, 1.5) * 100.0) as u64).collect();
    Sparkline::default().data(&eff).max(150).style(theme.warn()).render(r, buf);
    let datasets = vec![
        Dataset::default().marker(Marker::Braille).graph_type(GraphType::Line).style(theme.accent()).data(&produce),
        Dataset::default().marker(Marker::Dot).graph_type(GraphType::Scatter).style(theme.good()).data(&drain),
        Dataset::default().marker(Marker::Block).graph_type(GraphType::Scatter).style(theme.bad()).data(&marks),
    ];
    Chart::new(datasets)
        .x_axis(
            Axis::default().bounds([x0, x1]).labels([Span::raw(format!("{x0:.0} s")), Span::raw(format!("{x1:.0} s"))]),
        )
        .y_axis(Axis::default().bounds([0.0, ymax]).labels([Span::raw("0"), Span::raw(format!("{ymax:.0} MB/s"))]))
        .legend_position(None)
        .render(chart_area, buf);
}
