//! What draws on top: help (generated from the key map), the palette, search,
//! the defer prompt, confirmations and the daemon's answers.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Widget, Wrap};

use super::super::app::{App, Overlay};
use super::super::keys::{BINDINGS, Command, PALETTE, Scope};
use super::super::theme::{Theme, freshness_glyph};
use nbackup_protocol::admin::Freshness;

fn boxed(title: &str, lines: Vec<Line<'static>>, theme: Theme, screen: Rect, buf: &mut Buffer, width: u16) {
    let width = width.min(screen.width.saturating_sub(4));
    let inner_w = width.saturating_sub(2).max(1) as usize;
    // Wrapped height, so long consequences stay inside the box.
    let rows: usize = lines.iter().map(|l| l.width().max(1).div_ceil(inner_w)).sum();
    let height = (rows as u16 + 2).min(screen.height.saturating_sub(2));
    let area = Rect {
        x: screen.x + (screen.width - width) / 2,
        y: screen.y + (screen.height.saturating_sub(height)) / 2,
        width,
        height,
    };
    Clear.render(area, buf);
    let block = Block::new().borders(Borders::ALL).title(Span::styled(format!(" {title} "), theme.title()));
    Paragraph::new(lines).wrap(Wrap { trim: false }).block(block).render(area, buf);
}

pub fn render(app: &App, overlay: &Overlay, theme: Theme, area: Rect, buf: &mut Buffer) {
    match overlay {
        Overlay::Help => help(app, theme, area, buf),
        Overlay::Palette { input, error } => {
            let word = input.trim().to_lowercase();
            let mut lines = vec![Line::from(vec![Span::styled(":", theme.accent()), Span::raw(format!("{input}▏"))])];
            if let Some(e) = error {
                lines.push(Line::styled(e.clone(), theme.bad()));
            }
            let matching: Vec<String> = PALETTE
                .iter()
                .filter(|(n, a, _)| word.is_empty() || n.starts_with(&word) || a.iter().any(|a| a.starts_with(&word)))
                .map(|(n, a, _)| if a.is_empty() { n.to_string() } else { format!("{n} ({})", a.join(", ")) })
                .collect();
            lines.push(Line::styled(matching.join(" · "), theme.dim()));
            lines.push(Line::styled("Enter runs · Esc closes", theme.dim()));
            boxed("command", lines, theme, area, buf, 72);
        }
        Overlay::Search { input, error } => {
            let mut lines = vec![Line::from(vec![Span::styled("/", theme.accent()), Span::raw(format!("{input}▏"))])];
            if let Some(e) = error {
                lines.push(Line::styled(e.clone(), theme.bad()));
            }
            lines.push(Line::styled("regex, case-insensitive; ! first keeps what does not match", theme.dim()));
            lines.push(Line::styled("Enter applies (empty clears) · Esc closes", theme.dim()));
            boxed("search", lines, theme, area, buf, 64);
        }
        Overlay::DeferInput { target, next, input, error } => {
            let name = super::super::actions::target_name(target);
            let mut lines = vec![Line::raw(format!("Postpone {name}'s next run by (90s, 15m, 2h, 1d):"))];
            if let Some(n) = next {
                lines.push(Line::styled(format!("next run {n}"), theme.dim()));
            }
            lines.push(Line::from(vec![Span::styled("> ", theme.accent()), Span::raw(format!("{input}▏"))]));
            if let Some(e) = error {
                lines.push(Line::styled(e.clone(), theme.bad()));
            }
            lines.push(Line::styled("Enter continues · Esc backs out", theme.dim()));
            boxed("defer", lines, theme, area, buf, 64);
        }
        Overlay::Confirm(c) => {
            let mut lines: Vec<Line<'static>> = c.lines.iter().map(|l| Line::raw(l.clone())).collect();
            lines.push(Line::raw(""));
            lines.push(Line::from(vec![
                Span::styled("Enter/y", theme.title()),
                Span::raw(" confirm · "),
                Span::styled("Esc/n", theme.title()),
                Span::raw(" back out"),
            ]));
            boxed(&c.title, lines, theme, area, buf, 76);
        }
        Overlay::Answer { title, answer } => {
            let lines = match answer {
                None => vec![Line::raw("waiting for the daemon…"), Line::styled("Esc stops waiting", theme.dim())],
                Some(Ok(m)) => vec![
                    Line::from(vec![Span::styled("✓ done: ", theme.good()), Span::raw(m.clone())]),
                    Line::styled("any key closes", theme.dim()),
                ],
                Some(Err(e)) => vec![
                    Line::from(vec![Span::styled("✖ refused: ", theme.bad()), Span::raw(e.clone())]),
                    Line::styled("any key closes", theme.dim()),
                ],
            };
            boxed(title, lines, theme, area, buf, 72);
        }
    }
}

fn help(app: &App, theme: Theme, area: Rect, buf: &mut Buffer) {
    let section = |scope: Scope, heading: &str| {
        let mut lines = vec![Line::styled(heading.to_string(), theme.title())];
        let mut views = Vec::new();
        for b in BINDINGS.iter().filter(|b| b.scope == scope) {
            // The number keys read better as one line.
            if let Command::View(i) = b.command {
                views.push((i + 1).to_string());
                continue;
            }
            let keys: Vec<String> = b.keys.iter().map(|k| k.label()).collect();
            lines.push(Line::raw(format!(" {:<12} {}", keys.join(" "), b.help)));
        }
        if !views.is_empty() {
            lines.insert(1, Line::raw(format!(" {:<12} {}", views.join(""), "a view")));
        }
        lines
    };
    let mut left = section(Scope::Everywhere, "everywhere");
    left.extend(section(Scope::Tables, "tables"));
    let mut right = section(Scope::Logs, "history and events");
    if app.settings.readonly {
        right.push(Line::styled("actions are off (--readonly)", theme.dim()));
    } else {
        right.extend(section(Scope::Action, "actions (each asks first)"));
    }
    right.push(Line::styled("palette", theme.title()));
    right.push(Line::raw(" : then a view or action name"));
    right.push(Line::styled("freshness", theme.title()));
    let legend: Vec<String> = Freshness::ALL.iter().map(|f| format!("{} {f}", freshness_glyph(*f))).collect();
    for pair in legend.chunks(3) {
        right.push(Line::raw(format!(" {}", pair.join("  "))));
    }
    right.push(Line::styled("Esc, q or ? closes", theme.dim()));
    let width = 84.min(area.width.saturating_sub(2));
    let height = (left.len().max(right.len()) as u16 + 2).min(area.height);
    let boxed = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + area.height.saturating_sub(height) / 2,
        width,
        height,
    };
    Clear.render(boxed, buf);
    let block = Block::new().borders(Borders::ALL).title(Span::styled(" keys ", theme.title()));
    let inner = block.inner(boxed);
    block.render(boxed, buf);
    let [l, r] = ratatui::layout::Layout::horizontal([
        ratatui::layout::Constraint::Percentage(50),
        ratatui::layout::Constraint::Percentage(50),
    ])
    .areas(inner);
    Paragraph::new(left).render(l, buf);
    Paragraph::new(right).render(r, buf);
}
