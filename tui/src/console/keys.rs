//! The key map is data: [`update`](super::app::update) looks keys up here, and the
//! `?` help and `:` palette are generated from the same tables, so they cannot
//! drift from what the keys do.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// What a key (or a palette command) asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Quit,
    Help,
    Palette,
    NextView,
    PrevView,
    View(usize),
    Up,
    Down,
    PageUp,
    PageDown,
    Top,
    Bottom,
    Open,
    Back,
    Search,
    Follow,
    Level,
    FilterAgent,
    FilterEntry,
    ClearFilters,
    SortNext,
    SortReverse,
    Rotate,
    Abort,
    RunNow,
    Defer,
    Reload,
    Verify,
    /// Hand the terminal to a setup wizard.
    Wizard(Wizard),
}

/// The wizards the console opens (`nbackup_tui::wizard`, the same prompts as
/// `nbackup setup`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wizard {
    /// A storage in the server's config, then a reload.
    AddStorage,
    /// A backup entry in the agent's config, then a reload.
    AddEntry,
    /// A one-time token and the command that enrolls an agent with it.
    Enroll,
    /// Whichever "add" the daemon has: a storage on a server, an entry on an agent.
    Add,
}

/// Where a binding applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Everywhere,
    /// Tables: sessions, agents, entries, archives, history, events.
    Tables,
    /// History and events.
    Logs,
    /// An action; hidden with `--readonly`.
    Action,
}

pub struct Binding {
    pub keys: &'static [Key],
    pub command: Command,
    pub scope: Scope,
    pub help: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Ctrl(char),
    Up,
    Down,
    PageUp,
    PageDown,
    Home,
    End,
    Enter,
    Esc,
    Tab,
    BackTab,
    Backspace,
}

impl Key {
    pub fn from_event(e: &KeyEvent) -> Option<Key> {
        Some(match e.code {
            KeyCode::Char(c) if e.modifiers.contains(KeyModifiers::CONTROL) => Key::Ctrl(c.to_ascii_lowercase()),
            KeyCode::Char(c) => Key::Char(c),
            KeyCode::Up => Key::Up,
            KeyCode::Down => Key::Down,
            KeyCode::PageUp => Key::PageUp,
            KeyCode::PageDown => Key::PageDown,
            KeyCode::Home => Key::Home,
            KeyCode::End => Key::End,
            KeyCode::Enter => Key::Enter,
            KeyCode::Esc => Key::Esc,
            KeyCode::Tab => Key::Tab,
            KeyCode::BackTab => Key::BackTab,
            KeyCode::Backspace => Key::Backspace,
            _ => return None,
        })
    }

    pub fn label(self) -> String {
        match self {
            Key::Char(' ') => "Space".into(),
            Key::Char(c) => c.to_string(),
            Key::Ctrl(c) => format!("Ctrl-{c}"),
            Key::Up => "↑".into(),
            Key::Down => "↓".into(),
            Key::PageUp => "PgUp".into(),
            Key::PageDown => "PgDn".into(),
            Key::Home => "Home".into(),
            Key::End => "End".into(),
            Key::Enter => "Enter".into(),
            Key::Esc => "Esc".into(),
            Key::Tab => "Tab".into(),
            Key::BackTab => "Shift-Tab".into(),
            Key::Backspace => "Bksp".into(),
        }
    }
}

use Command as C;
use Key as K;
use Scope as S;

pub const BINDINGS: &[Binding] = &[
    Binding { keys: &[K::Char('q'), K::Ctrl('c')], command: C::Quit, scope: S::Everywhere, help: "quit" },
    Binding { keys: &[K::Char('?')], command: C::Help, scope: S::Everywhere, help: "this help" },
    Binding { keys: &[K::Char(':')], command: C::Palette, scope: S::Everywhere, help: "command palette" },
    Binding { keys: &[K::Tab, K::Char('l')], command: C::NextView, scope: S::Everywhere, help: "next view" },
    Binding { keys: &[K::BackTab, K::Char('h')], command: C::PrevView, scope: S::Everywhere, help: "previous view" },
    Binding { keys: &[K::Char('1')], command: C::View(0), scope: S::Everywhere, help: "view 1 (overview)" },
    Binding { keys: &[K::Char('2')], command: C::View(1), scope: S::Everywhere, help: "view 2" },
    Binding { keys: &[K::Char('3')], command: C::View(2), scope: S::Everywhere, help: "view 3" },
    Binding { keys: &[K::Char('4')], command: C::View(3), scope: S::Everywhere, help: "view 4" },
    Binding { keys: &[K::Char('5')], command: C::View(4), scope: S::Everywhere, help: "view 5" },
    Binding { keys: &[K::Char('6')], command: C::View(5), scope: S::Everywhere, help: "view 6" },
    Binding { keys: &[K::Up, K::Char('k')], command: C::Up, scope: S::Tables, help: "move up" },
    Binding { keys: &[K::Down, K::Char('j')], command: C::Down, scope: S::Tables, help: "move down" },
    Binding { keys: &[K::PageUp, K::Ctrl('b')], command: C::PageUp, scope: S::Tables, help: "page up" },
    Binding { keys: &[K::PageDown, K::Ctrl('f')], command: C::PageDown, scope: S::Tables, help: "page down" },
    Binding { keys: &[K::Home, K::Char('g')], command: C::Top, scope: S::Tables, help: "first row" },
    Binding { keys: &[K::End, K::Char('G')], command: C::Bottom, scope: S::Tables, help: "last row" },
    Binding { keys: &[K::Enter], command: C::Open, scope: S::Tables, help: "open the session" },
    Binding { keys: &[K::Esc, K::Backspace], command: C::Back, scope: S::Everywhere, help: "back / close" },
    Binding { keys: &[K::Char('/')], command: C::Search, scope: S::Logs, help: "regex search (! inverts)" },
    Binding { keys: &[K::Char('f')], command: C::Follow, scope: S::Logs, help: "follow / pause" },
    Binding { keys: &[K::Char('L')], command: C::Level, scope: S::Logs, help: "level filter" },
    Binding { keys: &[K::Char('A')], command: C::FilterAgent, scope: S::Logs, help: "only the row's agent" },
    Binding { keys: &[K::Char('E')], command: C::FilterEntry, scope: S::Logs, help: "only the row's entry" },
    Binding { keys: &[K::Char('c')], command: C::ClearFilters, scope: S::Logs, help: "clear filters" },
    Binding { keys: &[K::Char('s')], command: C::SortNext, scope: S::Tables, help: "sort by next column" },
    Binding { keys: &[K::Char('S')], command: C::SortReverse, scope: S::Tables, help: "reverse the sort" },
    Binding { keys: &[K::Char('r')], command: C::Rotate, scope: S::Action, help: "rotate the stream" },
    Binding { keys: &[K::Char('a')], command: C::Abort, scope: S::Action, help: "abort session or run" },
    Binding { keys: &[K::Char('n')], command: C::RunNow, scope: S::Action, help: "run the entry now" },
    Binding { keys: &[K::Char('d')], command: C::Defer, scope: S::Action, help: "defer the entry" },
    Binding { keys: &[K::Char('v')], command: C::Verify, scope: S::Action, help: "verify the archive" },
    Binding { keys: &[K::Char('R')], command: C::Reload, scope: S::Action, help: "reload the config" },
    Binding { keys: &[K::Char('+')], command: C::Wizard(Wizard::Add), scope: S::Action, help: "add storage or entry" },
];

/// Palette commands: a name, its aliases, what it does.
pub const PALETTE: &[(&str, &[&str], Command)] = &[
    ("overview", &["o", "1"], C::View(0)),
    ("sessions", &["s", "2"], C::View(1)),
    ("agents", &["entries", "3"], C::View(2)),
    ("archives", &["ar", "4"], C::View(3)),
    ("history", &["hi", "5"], C::View(4)),
    ("events", &["ev", "log", "6"], C::View(5)),
    ("help", &["h", "?"], C::Help),
    ("quit", &["q", "exit"], C::Quit),
    ("follow", &["f", "pause"], C::Follow),
    ("level", &["lvl"], C::Level),
    ("clear", &["c", "nofilter"], C::ClearFilters),
    ("search", &["find", "grep"], C::Search),
    ("rotate", &[], C::Rotate),
    ("abort", &["kill", "cancel"], C::Abort),
    ("run", &["now", "start"], C::RunNow),
    ("defer", &["postpone", "snooze"], C::Defer),
    ("reload", &["hup"], C::Reload),
    ("verify", &["check"], C::Verify),
    ("add-storage", &["storage+"], C::Wizard(Wizard::AddStorage)),
    ("add-entry", &["entry+"], C::Wizard(Wizard::AddEntry)),
    ("enroll", &["token"], C::Wizard(Wizard::Enroll)),
];

/// The binding for a key, if any.
pub fn lookup(key: Key) -> Option<&'static Binding> {
    BINDINGS.iter().find(|b| b.keys.contains(&key))
}

/// A palette entry by its name or an alias (a unique prefix of a name also works).
pub fn palette(input: &str) -> Option<Command> {
    let word = input.trim().to_lowercase();
    if word.is_empty() {
        return None;
    }
    if let Some((_, _, c)) = PALETTE.iter().find(|(n, aliases, _)| *n == word || aliases.contains(&word.as_str())) {
        return Some(*c);
    }
    let mut prefixed = PALETTE.iter().filter(|(n, _, _)| n.starts_with(&word));
    match (prefixed.next(), prefixed.next()) {
        (Some((_, _, c)), None) => Some(*c),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_key_is_bound_twice() {
        let mut seen = Vec::new();
        for b in BINDINGS {
            for k in b.keys {
                assert!(!seen.contains(k), "{k:?} bound twice");
                seen.push(*k);
            }
        }
    }

    #[test]
    fn palette_takes_names_aliases_and_unique_prefixes() {
        assert_eq!(palette("events"), Some(Command::View(5)));
        assert_eq!(palette("log"), Some(Command::View(5)));
        assert_eq!(palette("arc"), Some(Command::View(3)));
        assert_eq!(palette("rel"), Some(Command::Reload));
        assert_eq!(palette("r"), None, "rotate, run and reload: ambiguous");
        assert_eq!(palette("bogus"), None);
    }
}
