//! The setup wizard's prompts (inquire). They only fill [`Answers`]: checking a
//! path, showing a schedule's next runs and planning are done by pure code
//! ([`nbackup_protocol::setup`], [`check_dir`], [`next_runs`]) that the answers
//! file (`nbackup setup --answers`) goes through too, so the prompts are a thin layer
//! tested once end to end in a terminal.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Local};
use inquire::validator::Validation;
use inquire::{Confirm, CustomType, InquireError, Select, Text};

use nbackup_protocol::config::Schedule;
use nbackup_protocol::setup::{
    AgentAnswers, Answers, BackupAnswers, CaChoice, EnrollAnswers, Existing, Role, ServerAnswers, StorageAnswers,
};
use nbackup_protocol::wire::Compression;
use nbackup_protocol::{Name, enroll};

/// Why the wizard stopped.
#[derive(Debug, thiserror::Error)]
pub enum WizardError {
    #[error("cancelled")]
    Cancelled,
    #[error("the terminal cannot be used: {0}")]
    Terminal(String),
}

impl From<InquireError> for WizardError {
    fn from(e: InquireError) -> Self {
        match e {
            InquireError::OperationCanceled | InquireError::OperationInterrupted => WizardError::Cancelled,
            other => WizardError::Terminal(other.to_string()),
        }
    }
}

/// The next `n` times `expr` fires after `after`, in this host's time zone, in words;
/// or why it is not a schedule.
pub fn next_runs(expr: &str, after: DateTime<Local>, n: usize) -> Result<String, String> {
    let schedule = Schedule::parse(expr)?;
    let mut at = after;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let Some(next) = schedule.next_after(&at) else { break };
        out.push(next.format("%a %-d %b %H:%M").to_string());
        at = next;
    }
    if out.is_empty() {
        return Err(format!("{expr:?} never fires"));
    }
    Ok(format!("{} — next: {}", schedule.describe(), out.join(", ")))
}

/// Whether `dir` can hold a storage: absolute, a directory (or creatable under one),
/// writable by this user; with its free space in words.
pub fn check_dir(dir: &Path) -> Result<String, String> {
    if !dir.is_absolute() {
        return Err(format!("{} is not an absolute path", dir.display()));
    }
    let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    if !existing.is_dir() {
        return Err(format!("{} is not a directory", existing.display()));
    }
    let fs = rustix::fs::statvfs(existing).map_err(|e| format!("{}: {e}", existing.display()))?;
    let free = fs.f_bavail.saturating_mul(fs.f_frsize);
    let total = fs.f_blocks.saturating_mul(fs.f_frsize).max(1);
    let writable = rustix::fs::access(existing, rustix::fs::Access::WRITE_OK).is_ok();
    let what = if existing == dir { "exists" } else { "will be created" };
    let note = if writable { "" } else { "; not writable by this user (the server's user needs write access)" };
    Ok(format!(
        "{what}; {:.1} GiB free of {:.1} GiB ({:.0} %){note}",
        free as f64 / f64::from(1u32 << 30),
        total as f64 / f64::from(1u32 << 30),
        free as f64 * 100.0 / total as f64
    ))
}

/// This host's name up to its first dot, if it has one.
pub fn short_hostname() -> Option<String> {
    let full = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    full.trim().split('.').next().filter(|s| !s.is_empty()).map(str::to_string)
}

fn hostname() -> String {
    short_hostname().unwrap_or_else(|| "web-01".into())
}

fn valid_name(s: &str) -> Result<Validation, inquire::CustomUserError> {
    Ok(match Name::new(s) {
        Ok(_) => Validation::Valid,
        Err(e) => Validation::Invalid(e.to_string().into()),
    })
}

fn list(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(str::to_string).collect()
}

/// Asks every question, with defaults from an earlier run in `existing`.
pub fn ask(dir: PathBuf, existing: &Existing) -> Result<Answers, WizardError> {
    let roles = ["server", "agent", "both"];
    let start = match (existing.server_yaml.is_some(), existing.agent_yaml.is_some()) {
        (true, true) => 2,
        (false, true) => 1,
        _ => 0,
    };
    let role = match Select::new("What is this host?", roles.to_vec())
        .with_starting_cursor(start)
        .with_help_message("server: receives backups · agent: sends them · both: a server that backs itself up")
        .prompt()?
    {
        "server" => Role::Server,
        "agent" => Role::Agent,
        _ => Role::Both,
    };
    let server = match role {
        Role::Agent => None,
        _ => Some(ask_server(existing)?),
    };
    let agent = match role {
        Role::Server => None,
        _ => Some(ask_agent(role, existing, server.as_ref())?),
    };
    let check = Confirm::new("Prove it at the end: a tiny backup, verified by the server and restored?")
        .with_default(true)
        .prompt()?;
    Ok(Answers { role, dir, server, agent, check })
}

fn ask_server(existing: &Existing) -> Result<ServerAnswers, WizardError> {
    let before = existing.server_answers();
    let listen_default = before.as_ref().map_or_else(|| "0.0.0.0:9847".to_string(), |b| b.listen.clone());
    let listen = Text::new("Listen on (address:port):")
        .with_default(&listen_default)
        .with_validator(|s: &str| {
            Ok(match s.parse::<std::net::SocketAddr>() {
                Ok(_) => Validation::Valid,
                Err(_) => Validation::Invalid("write e.g. 0.0.0.0:9847 or [::]:9847".into()),
            })
        })
        .prompt()?;
    let names_default = before.as_ref().and_then(|b| b.names.first().cloned()).unwrap_or_else(hostname);
    let names = list(
        &Text::new("Names agents dial (comma-separated; all go in the server certificate):")
            .with_default(&names_default)
            .with_validator(|s: &str| {
                Ok(if list(s).is_empty() { Validation::Invalid("name at least one".into()) } else { Validation::Valid })
            })
            .prompt()?,
    );
    let ca = if existing.ca {
        println!("  a CA is already there: it is kept");
        CaChoice::Reuse
    } else {
        CaChoice::Create
    };
    let enrollment = Confirm::new("Sign agents' certificates here (one-time tokens, automatic renewal)?")
        .with_default(before.as_ref().is_none_or(|b| b.enrollment))
        .prompt()?;
    let mut storages = Vec::new();
    let earlier = before.map(|b| b.storages).unwrap_or_default();
    loop {
        let prior = earlier.get(storages.len());
        storages.push(ask_storage(prior, storages.is_empty())?);
        let more = earlier.len() > storages.len();
        if !Confirm::new("Add another storage?").with_default(more).prompt()? {
            break;
        }
    }
    Ok(ServerAnswers { listen, names, ca, enrollment, storages })
}

/// One storage: name, directory (checked), retention, compression. `prior`: the
/// answers to change; `first`: offer `main` as the name.
pub fn ask_storage(prior: Option<&StorageAnswers>, first: bool) -> Result<StorageAnswers, WizardError> {
    let name_default = prior.map_or_else(|| if first { "main".into() } else { String::new() }, |p| p.name.clone());
    let name = Text::new("Storage name:").with_default(&name_default).with_validator(valid_name).prompt()?;
    let dir_default =
        prior.map_or_else(|| format!("/var/backups/nbackup/{name}"), |p| p.base_dir.to_string_lossy().into_owned());
    let base_dir = Text::new("  where its archives go:")
        .with_default(&dir_default)
        .with_validator(|s: &str| {
            Ok(match check_dir(Path::new(s)) {
                Ok(_) => Validation::Valid,
                Err(e) => Validation::Invalid(e.into()),
            })
        })
        .prompt()?;
    if let Ok(words) = check_dir(Path::new(&base_dir)) {
        println!("  {base_dir}: {words}");
    }
    let max_backups = CustomType::<u32>::new("  archives to keep per agent and entry:")
        .with_default(prior.map_or(7, |p| p.max_backups))
        .with_validator(|n: &u32| {
            Ok(if *n == 0 { Validation::Invalid("at least 1".into()) } else { Validation::Valid })
        })
        .prompt()?;
    let zstd_first = prior.is_none_or(|p| p.compression == Compression::Zstd);
    let choices = if zstd_first { vec!["zstd", "gzip"] } else { vec!["gzip", "zstd"] };
    let compression = match Select::new("  compression:", choices)
        .with_help_message("zstd: faster and smaller · gzip: readable everywhere (tar xzf)")
        .prompt()?
    {
        "gzip" => Compression::Gzip,
        _ => Compression::Zstd,
    };
    Ok(StorageAnswers {
        name,
        base_dir: PathBuf::from(base_dir),
        max_backups,
        compression,
        level: prior.and_then(|p| p.level),
    })
}

fn ask_agent(role: Role, existing: &Existing, server: Option<&ServerAnswers>) -> Result<AgentAnswers, WizardError> {
    let before = existing.agent_answers();
    let name_default = before.as_ref().map_or_else(hostname, |b| b.name.clone());
    let name = Text::new("This agent's name:").with_default(&name_default).with_validator(valid_name).prompt()?;
    let (address, enroll) = match role {
        Role::Both => (None, None),
        _ => {
            let default = before.as_ref().and_then(|b| b.server.clone()).unwrap_or_default();
            let address = Text::new("The server (host:port):")
                .with_default(&default)
                .with_validator(|s: &str| {
                    Ok(match nbackup_protocol::config::ServerEndpoint::parse(s, None) {
                        Ok(_) => Validation::Valid,
                        Err(_) => Validation::Invalid("write host:port, e.g. backup.example.com:9847".into()),
                    })
                })
                .prompt()?;
            let enroll = if existing.agent_cert {
                println!("  this agent already has a certificate: it is kept");
                None
            } else {
                println!("  on the server: nbackup cert token --config /etc/nbackup/server.yaml --agent {name}");
                let token = Text::new("Enrollment token:")
                    .with_validator(|s: &str| {
                        Ok(if enroll::token_is_well_formed(s.trim()) {
                            Validation::Valid
                        } else {
                            Validation::Invalid("nbk1- and 64 hex digits; paste it whole".into())
                        })
                    })
                    .prompt()?;
                let ca_pin = Text::new("CA pin (sha256:…):")
                    .with_validator(|s: &str| {
                        Ok(match enroll::CaPin::parse(s.trim()) {
                            Ok(_) => Validation::Valid,
                            Err(e) => Validation::Invalid(e.into()),
                        })
                    })
                    .prompt()?;
                Some(EnrollAnswers { token: token.trim().to_string(), ca_pin: ca_pin.trim().to_string() })
            };
            (Some(address), enroll)
        }
    };
    // What each storage does with an entry's archives: the server decides.
    let storages: Vec<(String, String)> = server
        .map(|s| {
            s.storages
                .iter()
                .map(|st| (st.name.clone(), format!("{}, keeps {} per entry", st.compression, st.max_backups)))
                .collect()
        })
        .unwrap_or_default();
    let earlier = before.map(|b| b.backups).unwrap_or_default();
    let mut backups = Vec::new();
    loop {
        let prior = earlier.get(backups.len());
        backups.push(ask_backup(prior, &storages, backups.is_empty())?);
        let more = earlier.len() > backups.len();
        if !Confirm::new("Add another backup entry?").with_default(more).prompt()? {
            break;
        }
    }
    Ok(AgentAnswers { name, server: address, enroll, backups })
}

/// One backup entry: name, storage (chosen from `storages` — name and what the
/// server does with it — when known), paths (checked), excludes, schedule (with its
/// next runs), streams, bandwidth.
pub fn ask_backup(
    prior: Option<&BackupAnswers>,
    storages: &[(String, String)],
    first: bool,
) -> Result<BackupAnswers, WizardError> {
    let name_default = prior.map_or_else(|| if first { "etc".into() } else { String::new() }, |p| p.name.clone());
    let entry = Text::new("Backup entry name:").with_default(&name_default).with_validator(valid_name).prompt()?;
    let storage = if storages.is_empty() {
        let default = prior.map_or_else(|| "main".to_string(), |p| p.storage.clone());
        Text::new("  storage on the server:").with_default(&default).with_validator(valid_name).prompt()?
    } else {
        let labels: Vec<String> = storages.iter().map(|(n, what)| format!("{n} ({what})")).collect();
        let at = Select::new("  storage (its compression and retention are the server's):", labels).raw_prompt()?.index;
        storages[at].0.clone()
    };
    let paths_default = prior.map_or_else(
        || "/etc".to_string(),
        |p| p.paths.iter().map(|x| x.to_string_lossy().into_owned()).collect::<Vec<_>>().join(", "),
    );
    let paths = list(
        &Text::new("  paths (comma-separated):")
            .with_default(&paths_default)
            .with_validator(|s: &str| {
                let missing: Vec<String> =
                    list(s).into_iter().filter(|p| !Path::new(p).is_absolute() || !Path::new(p).exists()).collect();
                Ok(match (list(s).is_empty(), missing.is_empty()) {
                    (true, _) => Validation::Invalid("name at least one path".into()),
                    (_, false) => {
                        Validation::Invalid(format!("not an existing absolute path: {}", missing.join(", ")).into())
                    }
                    _ => Validation::Valid,
                })
            })
            .prompt()?,
    );
    let exclude_default = prior.map(|p| p.exclude.join(", ")).unwrap_or_default();
    let exclude =
        list(&Text::new("  exclude (globs, comma-separated, may be empty):").with_default(&exclude_default).prompt()?);
    let schedule_default = prior.map_or_else(|| "0 2 * * *".to_string(), |p| p.schedule.clone().unwrap_or_default());
    let schedule = Text::new("  schedule (cron in this host's time, @daily, or empty for on demand):")
        .with_default(&schedule_default)
        .with_validator(|s: &str| {
            Ok(match s.trim() {
                "" => Validation::Valid,
                expr => match next_runs(expr, Local::now(), 3) {
                    Ok(_) => Validation::Valid,
                    Err(e) => Validation::Invalid(e.into()),
                },
            })
        })
        .prompt()?;
    let schedule = Some(schedule.trim().to_string()).filter(|s| !s.is_empty());
    match &schedule {
        Some(expr) => println!("  {}", next_runs(expr, Local::now(), 3).unwrap_or_default()),
        None => println!("  runs only when asked (nbackup backup, ctl run, the console)"),
    }
    let parallels = CustomType::<u16>::new("  parallel streams:")
        .with_default(prior.and_then(|p| p.parallels).unwrap_or(1))
        .with_help_message("more streams help on links with high latency; the autoscaler adjusts within this")
        .prompt()?;
    let bandwidth_default = prior.and_then(|p| p.bandwidth_limit.clone()).unwrap_or_default();
    let bandwidth = Text::new("  bandwidth limit per second (e.g. 50MiB; empty: none):")
        .with_default(&bandwidth_default)
        .with_validator(|s: &str| {
            Ok(match s.trim() {
                "" => Validation::Valid,
                v => match nbackup_protocol::config::ByteSize::parse(v) {
                    Ok(_) => Validation::Valid,
                    Err(e) => Validation::Invalid(e.into()),
                },
            })
        })
        .prompt()?;
    Ok(BackupAnswers {
        name: entry,
        storage,
        paths: paths.into_iter().map(PathBuf::from).collect(),
        exclude,
        schedule,
        parallels: Some(parallels).filter(|n| *n > 1),
        bandwidth_limit: Some(bandwidth.trim().to_string()).filter(|b| !b.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn schedules_are_shown_as_their_next_runs() {
        let at = Local.with_ymd_and_hms(2026, 12, 2, 10, 0, 0).single().expect("time");
        let words = next_runs("0 2 * * *", at, 3).expect("valid");
        assert!(words.contains("Thu 3 Dec 02:00, Fri 4 Dec 02:00, Sat 5 Dec 02:00"), "{words}");
        assert!(next_runs("every day", at, 3).is_err());
    }

    #[test]
    fn storage_directories_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(check_dir(dir.path()).expect("ok").starts_with("exists; "));
        assert!(check_dir(&dir.path().join("new/main")).expect("ok").starts_with("will be created"));
        assert!(check_dir(Path::new("relative")).is_err());
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("file");
        assert!(check_dir(&file.join("sub")).unwrap_err().contains("not a directory"));
    }
}
