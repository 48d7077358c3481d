//! History and events: scrollable, filtered, searched, sorted.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::Style;

use super::super::app::{App, Tab};
use super::super::fmt;
use super::super::rows;
use super::super::theme::{Theme, level_glyph};
use nbackup_protocol::admin::{Event, HistoryRecord};

use super::tables::{Col, col, draw_window, span, styled};

fn outcome_glyph(o: nbackup_protocol::admin::SessionOutcome) -> &'static str {
    use nbackup_protocol::admin::SessionOutcome as O;
    match o {
        O::Committed => "✓",
        O::Failed => "✖",
        O::Aborted | O::Expired | O::Unknown => "!",
    }
}

const HISTORY_COLS: &[Col] = &[
    col("FINISHED", 12, 0),
    col("AGENT", 14, 0),
    col("BACKUP", 12, 0),
    col("OUTCOME", 11, 0),
    col("SIZE", 10, 1),
    col("TOOK", 9, 2),
    col("STORAGE", 10, 4),
    col("ARCHIVE / REASON", 30, 0),
];

pub fn history(app: &App, theme: Theme, area: Rect, buf: &mut Buffer) {
    let order = app.table(Tab::History).order;
    let list = rows::history(&app.data, &app.filter, order);
    let row = |i: usize| {
        let h: &HistoryRecord = list[i];
        {
            let level = h.outcome.level();
            let took = match (fmt::parse_time(&h.started), fmt::parse_time(&h.finished)) {
                (Some(a), Some(b)) => fmt::span((b - a).num_seconds().max(0) as u64),
                _ => "-".into(),
            };
            let detail = h.archive.clone().unwrap_or_else(|| match &h.reason {
                Some(r) => format!("{r}: {}", h.message),
                None => h.message.clone(),
            });
            (
                vec![
                    span(fmt::clock(&h.finished, app.now, app.settings.tz)),
                    span(h.agent.clone()),
                    span(h.backup.clone()),
                    styled(format!("{} {}", outcome_glyph(h.outcome), h.outcome), theme.level(level)),
                    span(fmt::bytes(h.bytes)),
                    span(took),
                    span(h.storage.clone()),
                    span(detail),
                ],
                Style::new(),
            )
        }
    };
    let title = format!(
        "History · {} of {} · sorted by {}{}",
        list.len(),
        app.data.history.len(),
        rows::HISTORY_SORTS[order.column],
        if order.reverse { " (reversed)" } else { "" }
    );
    let inner = super::section(&title, theme, area, buf);
    let selected = (!list.is_empty()).then(|| app.selected_of(Tab::History, list.len()));
    draw_window(HISTORY_COLS, list.len(), selected, theme, inner, buf, row);
}

const EVENT_COLS: &[Col] =
    &[col("TIME", 9, 0), col("", 1, 0), col("KIND", 18, 0), col("WHO", 18, 1), col("MESSAGE", 20, 0)];

pub fn events(app: &App, theme: Theme, area: Rect, buf: &mut Buffer) {
    let order = app.table(Tab::Events).order;
    let list = rows::events(&app.data, &app.filter, order);
    let row = |i: usize| {
        let e: &Event = list[i];
        {
            let level = e.kind.level();
            let who = [e.agent.as_deref(), e.backup.as_deref()].into_iter().flatten().collect::<Vec<_>>().join("/");
            let message = match &e.actor {
                Some(a) => format!("{} — by {a}", e.message),
                None => e.message.clone(),
            };
            (
                vec![
                    span(fmt::clock_secs(&e.time, app.now, app.settings.tz)),
                    styled(level_glyph(level), theme.level(level)),
                    styled(e.kind.as_str(), theme.level(level)),
                    span(who),
                    span(message),
                ],
                Style::new(),
            )
        }
    };
    let title = format!(
        "Events · {} of {} · {}",
        list.len(),
        app.data.events.len(),
        if app.follow { "following".to_string() } else { format!("sorted by {}", rows::EVENT_SORTS[order.column]) }
    );
    let inner = super::section(&title, theme, area, buf);
    let selected = (!list.is_empty()).then(|| app.selected_of(Tab::Events, list.len()));
    draw_window(EVENT_COLS, list.len(), selected, theme, inner, buf, row);
}
