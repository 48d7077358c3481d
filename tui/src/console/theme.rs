//! Colours and their absence. Sixteen ANSI colours on the terminal's own
//! background; with `NO_COLOR`/`--no-color` only bold, dim and reverse remain, and
//! every state is also a word or glyph so nothing is told by colour alone.

use nbackup_protocol::admin::{Freshness, Level};
use ratatui::style::{Color, Modifier, Style};

#[derive(Clone, Copy, Debug)]
pub struct Theme {
    pub color: bool,
}

impl Theme {
    fn fg(self, c: Color) -> Style {
        if self.color { Style::new().fg(c) } else { Style::new() }
    }

    pub fn text(self) -> Style {
        Style::new()
    }

    pub fn dim(self) -> Style {
        Style::new().add_modifier(Modifier::DIM)
    }

    pub fn title(self) -> Style {
        Style::new().add_modifier(Modifier::BOLD)
    }

    pub fn accent(self) -> Style {
        self.fg(Color::Cyan)
    }

    pub fn good(self) -> Style {
        self.fg(Color::Green)
    }

    pub fn warn(self) -> Style {
        self.fg(Color::Yellow).add_modifier(Modifier::BOLD)
    }

    pub fn bad(self) -> Style {
        self.fg(Color::Red).add_modifier(Modifier::BOLD)
    }

    pub fn selected(self) -> Style {
        Style::new().add_modifier(Modifier::REVERSED)
    }

    pub fn banner(self) -> Style {
        if self.color {
            Style::new().fg(Color::Black).bg(Color::Yellow).add_modifier(Modifier::BOLD)
        } else {
            Style::new().add_modifier(Modifier::REVERSED | Modifier::BOLD)
        }
    }

    pub fn level(self, l: Level) -> Style {
        match l {
            Level::Info => self.text(),
            Level::Warn => self.warn(),
            Level::Error => self.bad(),
        }
    }

    pub fn freshness(self, f: Freshness) -> Style {
        match f {
            Freshness::Missed => self.bad(),
            Freshness::Overdue | Freshness::Unknown => self.warn(),
            Freshness::Fresh => self.good(),
            Freshness::Running => self.accent(),
            Freshness::Never | Freshness::Unscheduled => self.dim(),
        }
    }

    /// A usage bar's colour by how full it is.
    pub fn usage(self, used_fraction: f64) -> Style {
        if used_fraction >= 0.9 {
            self.bad()
        } else if used_fraction >= 0.75 {
            self.warn()
        } else {
            self.good()
        }
    }
}

/// A glyph for each freshness state, so it reads without colour.
pub fn freshness_glyph(f: Freshness) -> &'static str {
    match f {
        Freshness::Missed => "✖",
        Freshness::Overdue => "!",
        Freshness::Running => "▶",
        Freshness::Fresh => "✓",
        Freshness::Never => "·",
        Freshness::Unscheduled => "-",
        Freshness::Unknown => "?",
    }
}

pub fn level_glyph(l: Level) -> &'static str {
    match l {
        Level::Info => " ",
        Level::Warn => "!",
        Level::Error => "✖",
    }
}
