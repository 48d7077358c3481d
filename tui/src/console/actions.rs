//! Operator actions: what each one does to which target, and the confirmation that
//! says so before anything is sent.

use nbackup_protocol::admin::{SessionInfo, SessionPhase};

use super::fmt;
use super::rows::EntryRow;
use crate::client::EntryTarget;

/// An action the link task carries out against the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Rotate { session: String, stream: u16 },
    AbortSession { session: String, reason: String },
    AbortEntry { target: EntryTarget, reason: String },
    Run(EntryTarget),
    Defer { target: EntryTarget, seconds: u64 },
    Reload,
    Verify { storage: String, agent: String, backup: String, archive: String },
}

impl Action {
    /// A short name for the answer's title.
    pub fn title(&self) -> String {
        match self {
            Action::Rotate { session, stream } => format!("rotate stream {stream} of {}", short(session)),
            Action::AbortSession { session, .. } => format!("abort session {}", short(session)),
            Action::AbortEntry { target, .. } => format!("abort {}", target_name(target)),
            Action::Run(t) => format!("run {} now", target_name(t)),
            Action::Defer { target, seconds } => format!("defer {} by {}", target_name(target), fmt::span(*seconds)),
            Action::Reload => "reload".into(),
            Action::Verify { archive, .. } => format!("verify {archive}"),
        }
    }
}

pub fn target_name(t: &EntryTarget) -> String {
    match t {
        EntryTarget::Own(e) => e.clone(),
        EntryTarget::Agent { agent, entry } => format!("{agent}/{entry}"),
    }
}

/// The first 12 characters of a session id: enough to tell sessions apart.
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// A confirmation: the target, the consequence, and the action once confirmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirm {
    pub action: Action,
    pub title: String,
    pub lines: Vec<String>,
}

pub fn abort_session(s: &SessionInfo, next_run: Option<String>, user: &str) -> Result<Confirm, String> {
    if s.phase == SessionPhase::Committing {
        return Err(format!(
            "{} is committing: it can no longer be aborted (the commit decides its outcome)",
            short(&s.id)
        ));
    }
    let streams = s.streams.len();
    let mut lines = vec![
        format!("{}/{} on storage {}, session {}", s.agent, s.backup, s.storage, short(&s.id)),
        format!(
            "Abort discards {} sent on {streams} stream{}; nothing is committed.",
            fmt::bytes(s.bytes_received),
            if streams == 1 { "" } else { "s" }
        ),
    ];
    lines.push(match next_run {
        Some(n) => format!("The agent is told at once; its next scheduled run is {n}."),
        None => "The agent is told at once; it runs again only when scheduled or asked.".into(),
    });
    Ok(Confirm {
        action: Action::AbortSession { session: s.id.clone(), reason: format!("aborted from the console by {user}") },
        title: format!("Abort session {}?", short(&s.id)),
        lines,
    })
}

pub fn rotate(s: &SessionInfo, stream: u16) -> Result<Confirm, String> {
    let st = s.streams.iter().find(|st| st.stream == stream).ok_or_else(|| format!("no stream {stream}"))?;
    Ok(Confirm {
        action: Action::Rotate { session: s.id.clone(), stream },
        title: format!("Rotate stream {stream} of {}?", short(&s.id)),
        lines: vec![
            format!("Closes stream {stream} ({}, {} received).", st.peer, fmt::bytes(st.bytes)),
            "The agent re-joins it and resends what was not acknowledged; nothing is lost.".into(),
        ],
    })
}

pub fn run_now(row: &EntryRow<'_>, target: EntryTarget, next: Option<String>) -> Confirm {
    let name = target_name(&target);
    let mut lines = vec![format!("Starts {name} now, outside its schedule.")];
    if row.entry.running {
        lines.push("It is running now: the trigger will be skipped and recorded.".into());
    }
    if let Some(n) = next {
        lines.push(format!("The next scheduled run stays at {n}."));
    }
    if row.agent.is_some_and(|a| !a.connected) {
        lines.push("The agent's control channel is down: the command cannot reach it.".into());
    }
    Confirm { action: Action::Run(target), title: format!("Run {name} now?"), lines }
}

pub fn abort_entry(row: &EntryRow<'_>, target: EntryTarget, read: Option<u64>, user: &str) -> Result<Confirm, String> {
    let name = target_name(&target);
    if !row.entry.running {
        return Err(format!("{name} is not running"));
    }
    let mut lines = vec![format!("Stops the running backup of {name}; the server discards its upload.")];
    if let Some(r) = read {
        lines.push(format!("{} of source read so far is lost; the next run starts over.", fmt::bytes(r)));
    }
    Ok(Confirm {
        action: Action::AbortEntry { target, reason: format!("aborted from the console by {user}") },
        title: format!("Abort the run of {name}?"),
        lines,
    })
}

pub fn defer(target: EntryTarget, seconds: u64, next: Option<String>) -> Confirm {
    let name = target_name(&target);
    let mut lines = vec![format!("Postpones {name}'s next scheduled run by {}.", fmt::span(seconds))];
    if let Some(n) = next {
        lines.push(format!("It was due {n}."));
    }
    Confirm { action: Action::Defer { target, seconds }, title: format!("Defer {name}?"), lines }
}

pub fn reload(daemon: &str) -> Confirm {
    Confirm {
        action: Action::Reload,
        title: format!("Reload the {daemon}'s configuration?"),
        lines: vec![
            "Re-reads the configuration file; an invalid one is rejected and the running one kept.".into(),
            "Running backups finish with what they started with.".into(),
        ],
    }
}

pub fn verify(a: &nbackup_protocol::admin::ArchiveInfo) -> Confirm {
    Confirm {
        action: Action::Verify {
            storage: a.storage.clone(),
            agent: a.agent.clone(),
            backup: a.backup.clone(),
            archive: a.name.clone(),
        },
        title: format!("Verify {}?", a.name),
        lines: vec![
            format!(
                "Re-reads {} on the server (at the storage's verify_rate) against its manifest: size, SHA-256, \
                 every tar member.",
                fmt::bytes(a.size)
            ),
            "A corrupt archive is quarantined as .corrupt: out of listing and rotation, never deleted.".into(),
            "The result comes as an event (verified / archive_corrupt).".into(),
        ],
    }
}

/// `90`, `90s`, `15m`, `2h`, `1d` → seconds.
pub fn parse_duration(input: &str) -> Result<u64, String> {
    let t = input.trim().to_lowercase();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num.parse().map_err(|_| format!("{input:?}: a number with s, m, h or d, like 2h"))?;
    let mult = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit {other:?}: use s, m, h or d")),
    };
    match n.checked_mul(mult) {
        Some(s) if s > 0 && s <= 30 * 86_400 => Ok(s),
        _ => Err("between 1 second and 30 days".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration(" 2h "), Ok(7200));
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("31d").is_err());
    }
}
