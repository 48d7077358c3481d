//! Drawing. Every view takes `&App` and a buffer and cannot change anything; the
//! whole screen is one [`Screen`] widget, so the terminal, `--dump` and the
//! snapshot tests draw exactly the same thing.

mod logs;
mod overlay;
mod overview;
mod sessions;
mod tables;

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Widget};

use super::app::{App, Tab};
use super::model::Link;
use super::theme::Theme;

/// The smallest terminal the views are laid out for.
pub const MIN_WIDTH: u16 = 80;
pub const MIN_HEIGHT: u16 = 24;

pub struct Screen<'a>(pub &'a App);

impl Widget for Screen<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let app = self.0;
        let theme = Theme { color: app.settings.color };
        if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
            let text = vec![
                Line::styled("nbackup console", theme.title()),
                Line::raw(format!("needs {MIN_WIDTH}×{MIN_HEIGHT}; this terminal is {}×{}", area.width, area.height)),
                Line::raw("resize it, or press q to quit"),
            ];
            Paragraph::new(text).wrap(ratatui::widgets::Wrap { trim: true }).render(area, buf);
            return;
        }
        let banner = app.banner();
        let [head, banner_area, body, foot] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(u16::from(banner.is_some())),
            Constraint::Min(0),
            Constraint::Length(1),
        ])
        .areas(area);
        header(app, theme, head, buf);
        if let Some(text) = banner {
            Paragraph::new(format!(" ⚠ {text}")).style(theme.banner()).render(banner_area, buf);
        }
        match app.tab {
            Tab::Overview => overview::render(app, theme, body, buf),
            Tab::Sessions => sessions::render(app, theme, body, buf),
            Tab::Agents => tables::entries(app, theme, body, buf),
            Tab::Archives => tables::archives(app, theme, body, buf),
            Tab::History => logs::history(app, theme, body, buf),
            Tab::Events => logs::events(app, theme, body, buf),
        }
        footer(app, theme, foot, buf);
        if let Some(o) = &app.overlay {
            overlay::render(app, o, theme, area, buf);
        }
    }
}

fn header(app: &App, theme: Theme, area: Rect, buf: &mut Buffer) {
    let kind = app.data.kind;
    let who = match (app.data.server_status(), app.data.agent_status()) {
        (Some(s), _) => format!("server {} · {}", s.version, s.listen),
        (_, Some(a)) => format!("agent {} {}", a.agent, a.version),
        _ => "nbackup".into(),
    };
    let mut spans = Vec::new();
    for (i, t) in app.tabs().iter().enumerate() {
        let label = format!(" {} {} ", i + 1, t.title(kind));
        let style =
            if *t == app.tab { theme.selected().add_modifier(ratatui::style::Modifier::BOLD) } else { theme.text() };
        spans.push(Span::styled(label, style));
    }
    // Who this is, when the tabs and the link state leave room for it.
    let tabs_width: usize = spans.iter().map(|s| s.width()).sum();
    let who = format!(" {who} ");
    if tabs_width + who.chars().count() + 1 + 16 <= area.width as usize {
        spans.splice(0..0, [Span::styled(who, theme.title()), Span::raw("│")]);
    }
    let (glyph, word, style) = match app.link {
        Link::Live => ("●", "live", theme.good()),
        Link::Connecting => ("○", "connecting", theme.warn()),
        Link::Down { .. } => ("○", "disconnected", theme.bad()),
    };
    let right = Line::from(vec![Span::styled(format!("{glyph} {word} "), style)]).right_aligned();
    Paragraph::new(Line::from(spans)).render(area, buf);
    right.render(area, buf);
}

fn footer(app: &App, theme: Theme, area: Rect, buf: &mut Buffer) {
    let line = if let Some(n) = &app.notice {
        Line::styled(format!(" {n}"), theme.warn())
    } else {
        let mut hints = vec!["?:help", ":cmd", "Tab:view", "q:quit"];
        if app.tab.is_log() {
            hints.extend(["/:search", "f:follow", "L:level"]);
        }
        if !app.settings.readonly {
            match app.tab {
                Tab::Sessions if app.detail.is_some() => hints.extend(["r:rotate", "a:abort", "Esc:back"]),
                Tab::Sessions => hints.extend(["Enter:open", "a:abort"]),
                Tab::Agents => hints.extend(["n:run", "d:defer", "a:abort"]),
                Tab::Archives => hints.push("v:verify"),
                _ => {}
            }
        }
        let mut spans = vec![Span::styled(format!(" {}", hints.join("  ")), theme.dim())];
        if app.settings.readonly {
            spans.push(Span::styled("  [read-only]", theme.accent()));
        }
        if app.tab.is_log() && !app.filter.is_empty() {
            spans.push(Span::styled(format!("  filter: {}", app.filter.describe()), theme.accent()));
        }
        if app.tab == Tab::Events {
            spans.push(Span::styled(if app.follow { "  following" } else { "  paused" }, theme.accent()));
        }
        if app.data.unreadable > 0 {
            spans.push(Span::styled(format!("  {} unreadable line(s)", app.data.unreadable), theme.warn()));
        }
        Line::from(spans)
    };
    Paragraph::new(line).render(area, buf);
}

/// A section: a rule with a title, and the area under it.
fn section(title: &str, theme: Theme, area: Rect, buf: &mut Buffer) -> Rect {
    let block = Block::new()
        .borders(Borders::TOP)
        .border_style(theme.dim())
        .title(Span::styled(format!(" {title} "), theme.title()));
    let inner = block.inner(area);
    block.render(area, buf);
    inner
}

/// A one-line usage bar, `███████░░░ 71%`, its glyphs readable without colour.
fn bar(fraction: f64, width: usize, style: Style) -> Span<'static> {
    let f = fraction.clamp(0.0, 1.0);
    let full = (f * width as f64).round() as usize;
    Span::styled(format!("{}{} {:>3.0}%", "█".repeat(full), "░".repeat(width - full), f * 100.0), style)
}

/// Renders the whole screen into a buffer of `width`×`height` and returns it as
/// plain text lines (`--dump`, docs, tests).
pub fn to_text(app: &App, width: u16, height: u16) -> String {
    let area = Rect::new(0, 0, width, height);
    let mut buf = Buffer::empty(area);
    Screen(app).render(area, &mut buf);
    buffer_text(&buf)
}

pub fn buffer_text(buf: &Buffer) -> String {
    let area = buf.area;
    let mut out = String::new();
    for y in 0..area.height {
        let line: String = (0..area.width).map(|x| buf[(x, y)].symbol()).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
