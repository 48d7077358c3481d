//! What draws on top: help (generated from the key map), the palette, search,
//! the defer prompt, confirmations and the daemon's answers.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Widget, Wrap};

use super::super::app::{App, Overlay};
use super::super::keys::{BINDINGS, PALETTE, Scope};
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
    let mut lines = Vec::new();
    for (scope, heading) in [
        (Scope::Everywhere, "everywhere"),
        (Scope::Tables, "tables"),
        (Scope::Logs, "history and events"),
        (Scope::Action, "actions (each asks first)"),
    ] {
        if scope == Scope::Action && app.settings.readonly {
            lines.push(Line::styled("actions are off (--readonly)", theme.dim()));
            continue;
        }
        lines.push(Line::styled(heading.to_string(), theme.title()));
        for b in BINDINGS.iter().filter(|b| b.scope == scope) {
            let keys: Vec<String> = b.keys.iter().map(|k| k.label()).collect();
            lines.push(Line::raw(format!("  {:<16} {}", keys.join(" "), b.help)));
        }
    }
    lines.push(Line::styled("palette (:)".to_string(), theme.title()));
    let names: Vec<&str> = PALETTE.iter().map(|(n, _, _)| *n).collect();
    lines.push(Line::raw(format!("  {}", names.join(" "))));
    lines.push(Line::styled("freshness".to_string(), theme.title()));
    let legend: Vec<String> = Freshness::ALL.iter().map(|f| format!("{} {f}", freshness_glyph(*f))).collect();
    lines.push(Line::raw(format!("  {}", legend.join("  "))));
    lines.push(Line::styled("Esc, q or ? closes", theme.dim()));
    boxed("keys", lines, theme, area, buf, 70);
}
