//! Tables that fit any width: each column has a priority, and the least important
//! go first when the terminal is narrow. Plus the entries and archives views.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Rect};
use ratatui::style::Style;
use ratatui::text::Span;
use ratatui::widgets::{Cell, Paragraph, Row, StatefulWidget, Table, TableState, Widget};

use super::super::app::{App, Tab};
use super::super::fmt;
use super::super::rows;
use super::super::theme::{Theme, freshness_glyph};

/// A column: header, width in cells, and how much it matters (0 = never dropped).
#[derive(Clone, Copy, Debug)]
pub struct Col {
    pub title: &'static str,
    pub width: u16,
    pub priority: u8,
}

pub const fn col(title: &'static str, width: u16, priority: u8) -> Col {
    Col { title, width, priority }
}

/// Which columns fit in `width`: by priority, shown in their own order. The last
/// shown column takes the rest of the line; zero-width columns are never shown.
pub fn fit_columns(cols: &[Col], width: u16) -> Vec<usize> {
    let mut by_priority: Vec<usize> = (0..cols.len()).collect();
    by_priority.sort_by_key(|i| cols[*i].priority);
    let mut used = 0u16;
    let mut keep = Vec::new();
    for i in by_priority {
        if cols[i].width == 0 {
            continue;
        }
        let w = cols[i].width + 1;
        if used + w <= width || cols[i].priority == 0 {
            used += w;
            keep.push(i);
        }
    }
    keep.sort_unstable();
    keep
}

/// A table of `rows` (one cell per column in `cols`), the selection highlighted and
/// kept in view.
pub fn draw(
    cols: &[Col],
    rows: Vec<(Vec<Span<'static>>, Style)>,
    selected: Option<usize>,
    theme: Theme,
    area: Rect,
    buf: &mut Buffer,
) {
    let mut rows = rows;
    let n = rows.len();
    draw_window(cols, n, selected, theme, area, buf, |i| std::mem::take(&mut rows[i]));
}

/// Like [`draw`] for `count` rows, building only the rows that show: logs hold
/// thousands, a frame draws a screenful.
pub fn draw_window(
    cols: &[Col],
    count: usize,
    selected: Option<usize>,
    theme: Theme,
    area: Rect,
    buf: &mut Buffer,
    mut row: impl FnMut(usize) -> (Vec<Span<'static>>, Style),
) {
    let keep = fit_columns(cols, area.width);
    let header = Row::new(keep.iter().map(|i| Cell::from(Span::styled(cols[*i].title, theme.title()))));
    let last = keep.last().copied();
    let widths: Vec<Constraint> = keep
        .iter()
        .map(|i| if Some(*i) == last { Constraint::Min(cols[*i].width) } else { Constraint::Length(cols[*i].width) })
        .collect();
    if count == 0 {
        Widget::render(Table::new(Vec::<Row<'_>>::new(), widths).header(header), area, buf);
        if area.height > 1 {
            let r = Rect { y: area.y + 1, height: 1, ..area };
            Paragraph::new(Span::styled("  (none)", theme.dim())).render(r, buf);
        }
        return;
    }
    let visible = usize::from(area.height.saturating_sub(1)).max(1);
    let sel = selected.map(|s| s.min(count - 1));
    let start = sel.map_or(0, |s| (s + 1).saturating_sub(visible));
    let end = (start + visible).min(count);
    let body: Vec<Row<'_>> = (start..end)
        .map(|i| {
            let (cells, style) = row(i);
            let picked: Vec<Cell<'_>> =
                keep.iter().map(|c| Cell::from(cells.get(*c).cloned().unwrap_or_default())).collect();
            Row::new(picked).style(style)
        })
        .collect();
    let table = Table::new(body, widths).header(header).row_highlight_style(theme.selected()).column_spacing(1);
    let mut state = TableState::default().with_selected(sel.map(|s| s - start));
    StatefulWidget::render(table, area, buf, &mut state);
}

pub fn span(s: impl Into<String>) -> Span<'static> {
    Span::raw(s.into())
}

pub fn styled(s: impl Into<String>, style: Style) -> Span<'static> {
    Span::styled(s.into(), style)
}

const ENTRY_COLS: &[Col] = &[
    col("AGENT", 14, 0),
    col("CTRL", 8, 4),
    col("ENTRY", 14, 0),
    col("FRESHNESS", 13, 0),
    col("LAST SUCCESS", 13, 1),
    col("SCHEDULE", 14, 3),
    col("NEXT RUN", 27, 2),
    col("LAST RESULT", 20, 5),
    col("TRIES", 5, 6),
    col("STATE", 9, 2),
];

pub fn entries(app: &App, theme: Theme, area: Rect, buf: &mut Buffer) {
    let order = app.table(Tab::Agents).order;
    let list = rows::entries(&app.data, order);
    let body: Vec<(Vec<Span<'static>>, Style)> = list
        .iter()
        .map(|r| {
            let f = r.freshness();
            let ctrl = match r.agent {
                Some(a) if a.connected => styled("● up", theme.good()),
                Some(a) if a.silent => styled("✖ silent", theme.bad()),
                Some(_) => styled("○ down", theme.warn()),
                None => span("-"),
            };
            let fresh = styled(freshness_word(f), theme.freshness(f.state));
            let last_success = f.age_secs.map_or_else(|| "never".to_string(), |a| format!("{} ago", fmt::span(a)));
            let schedule = r.entry.schedule.clone().unwrap_or_else(|| "on demand".into());
            let next = r.entry.next_run.as_deref().map_or_else(|| "-".to_string(), |t| app.when(t));
            let (last, last_style) = match &r.entry.last {
                Some(l) if l.ok => (format!("ok {}", fmt::bytes(l.bytes_sent)), theme.good()),
                Some(l) => (format!("failed: {}", l.error.as_deref().unwrap_or("?")), theme.bad()),
                None => ("-".into(), theme.dim()),
            };
            let tries = r.entry.last.as_ref().map_or_else(|| "-".into(), |l| l.attempts.to_string());
            let state = if r.entry.running { styled("▶ running", theme.accent()) } else { span("idle") };
            let row_style = if f.state.is_late() { theme.freshness(f.state) } else { Style::new() };
            (
                vec![
                    span(r.agent_name()),
                    ctrl,
                    span(r.entry.name.clone()),
                    fresh,
                    span(last_success),
                    span(schedule),
                    span(next),
                    styled(last, last_style),
                    span(tries),
                    state,
                ],
                row_style,
            )
        })
        .collect();
    let title = format!(
        "{} · sorted by {}{}",
        if app.data.kind == Some(nbackup_protocol::admin::DaemonKind::Agent) {
            "Entries"
        } else {
            "Agents and entries"
        },
        rows::ENTRY_SORTS[order.column],
        if order.reverse { " (reversed)" } else { "" }
    );
    let inner = super::section(&title, theme, area, buf);
    let cols: Vec<Col> = if app.data.kind == Some(nbackup_protocol::admin::DaemonKind::Agent) {
        // The agent daemon's own entries: no agent columns.
        ENTRY_COLS
            .iter()
            .map(|c| if matches!(c.title, "AGENT" | "CTRL") { Col { width: 0, ..*c } } else { *c })
            .collect()
    } else {
        ENTRY_COLS.to_vec()
    };
    let selected = (!list.is_empty()).then(|| app.selected_of(Tab::Agents, list.len()));
    draw(&cols, body, selected, theme, inner, buf);
}

/// `✖ missed 3`, `! overdue`, `✓ fresh`.
pub fn freshness_word(f: &nbackup_protocol::admin::EntryFreshness) -> String {
    let g = freshness_glyph(f.state);
    match f.state {
        nbackup_protocol::admin::Freshness::Missed => format!("{g} missed {}", f.missed_runs),
        s => format!("{g} {s}"),
    }
}

const ARCHIVE_COLS: &[Col] = &[
    col("TIME", 16, 0),
    col("AGENT", 14, 0),
    col("BACKUP", 14, 0),
    col("STORAGE", 10, 3),
    col("SIZE", 10, 1),
    col("FILES", 7, 3),
    col("SHA-256", 16, 2),
    col("ARCHIVE", 30, 4),
];

pub fn archives(app: &App, theme: Theme, area: Rect, buf: &mut Buffer) {
    let order = app.table(Tab::Archives).order;
    let list = rows::archives(&app.data, order);
    let body = list
        .iter()
        .map(|a| {
            let time = stamp_time(&a.stamp);
            let sha = a.sha256.as_deref().map_or_else(|| "(no manifest)".to_string(), |s| fmt::fit(s, 16));
            (
                vec![
                    span(time),
                    span(a.agent.clone()),
                    span(a.backup.clone()),
                    span(a.storage.clone()),
                    span(fmt::bytes(a.size)),
                    span(a.files.map_or_else(|| "-".into(), |f| f.to_string())),
                    styled(sha, if a.manifest { theme.text() } else { theme.warn() }),
                    span(a.name.clone()),
                ],
                Style::new(),
            )
        })
        .collect();
    let total: u64 = list.iter().map(|a| a.size).sum();
    let title =
        format!("Archives · {} · {} · sorted by {}", list.len(), fmt::bytes(total), rows::ARCHIVE_SORTS[order.column]);
    let inner = super::section(&title, theme, area, buf);
    let selected = (!list.is_empty()).then(|| app.selected_of(Tab::Archives, list.len()));
    draw(ARCHIVE_COLS, body, selected, theme, inner, buf);
}

/// `20261201T020000Z` → `2026-12-01 02:00`.
fn stamp_time(stamp: &str) -> String {
    match chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ") {
        Ok(t) => t.format("%Y-%m-%d %H:%M").to_string(),
        Err(_) => stamp.to_string(),
    }
}
