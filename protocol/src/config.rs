//! The configuration schema of both daemons.
//!
//! Parsing happens in two stages. `Raw*` structs mirror the YAML exactly and reject
//! unknown keys (`deny_unknown_fields`); domain values (sizes, durations, names,
//! compression) are checked while deserializing so their errors carry line and column.
//! The raw structs are then converted into validated configs with defaults applied,
//! relative paths resolved against the config file's directory, and cross-field rules
//! checked — those errors are located by key path.
//!
//! Key names follow the system nbackup replaces, so its users can move over.

mod agent;
mod bucket;
mod error;
mod notify;
mod server;
mod units;

use std::path::{Path, PathBuf};

pub use agent::{
    AgentConfig, AgentTls, AutoScaler, BackupEntry, Bandwidth, ControlChannel, EndpointError, Excludes, RawAgentConfig,
    RawAutoScaler, RawBackup, RawRestoreTest, RawResume, RawRetry, RawSource, RestoreTest, Resume, Retry, ScaleMode,
    ServerEndpoint,
};
pub use bucket::{Bucket, BucketMode, Provider, RawBucket};
pub use error::{ConfigError, ConfigErrorDetails};
pub use notify::{
    Email, Notify, NotifyOn, NotifyTarget, RawEmail, RawNotify, RawWebhook, SmtpTls, WebhookFormat, WebhookUrl, redact,
};
pub use server::{
    DEFAULT_STATE_DIR, Enrollment, RawEnrollment, RawServerConfig, RawStorage, ServerConfig, ServerTls, Storage,
};
pub use units::{ByteSize, HumanDuration};

/// Log verbosity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `logging:` as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogging {
    pub level: Option<LogLevel>,
    pub format: Option<LogFormat>,
    pub file: Option<PathBuf>,
}

/// Validated logging settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Logging {
    pub level: LogLevel,
    pub format: LogFormat,
    /// Log file; rotated daily as `<file>.<yyyy-mm-dd>` in the same directory. `None`
    /// logs to standard error.
    pub file: Option<PathBuf>,
}

impl Logging {
    fn from_raw(raw: RawLogging, base: &Path) -> Self {
        Logging {
            level: raw.level.unwrap_or_default(),
            format: raw.format.unwrap_or_default(),
            file: raw.file.map(|f| resolve(base, f)),
        }
    }
}

/// `admin:` as written, in both daemons' files.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub socket: Option<PathBuf>,
    pub group: Option<String>,
}

/// The local admin API: where its Unix socket lives and which group may use it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Admin {
    /// `None`: the default, `/run/nbackup/<daemon>.sock` as root, else
    /// `$XDG_RUNTIME_DIR/nbackup/<daemon>.sock` (chosen by the daemon at start).
    pub socket: Option<PathBuf>,
    /// Members of this group may use the API besides root and the daemon's own user.
    pub group: Option<String>,
}

impl Admin {
    fn from_raw(raw: RawAdmin, base: &Path) -> Result<Self, String> {
        if let Some(g) = &raw.group
            && (g.is_empty() || !g.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(format!("{g:?} is not a group name"));
        }
        Ok(Admin { socket: raw.socket.map(|p| resolve(base, p)), group: raw.group })
    }
}

/// A standard 5-field cron expression (`0 2 * * *`, `30 3 * * MON-FRI`) or a nickname
/// (`@daily`, `@hourly`, `@weekly`, `@monthly`, `@yearly`).
#[derive(Clone, Debug)]
pub struct Schedule {
    expr: String,
    cron: croner::Cron,
}

impl Schedule {
    pub fn parse(expr: &str) -> Result<Self, String> {
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .year(croner::parser::Year::Disallowed)
            .build();
        let trimmed = expr.trim();
        let cron = parser.parse(trimmed).map_err(|e| format!("invalid cron expression {expr:?}: {e}"))?;
        Ok(Schedule { expr: trimmed.to_string(), cron })
    }

    pub fn as_str(&self) -> &str {
        &self.expr
    }

    /// The next time strictly after `after` at which the schedule fires.
    pub fn next_after<Tz: chrono::TimeZone>(&self, after: &chrono::DateTime<Tz>) -> Option<chrono::DateTime<Tz>> {
        self.cron.find_next_occurrence(after, false).ok()
    }

    /// The last time at or before `at` at which the schedule fired.
    pub fn prev_before<Tz: chrono::TimeZone>(&self, at: &chrono::DateTime<Tz>) -> Option<chrono::DateTime<Tz>> {
        self.cron.find_previous_occurrence(at, true).ok()
    }

    /// The expression in English, e.g. "At 02:00".
    pub fn describe(&self) -> String {
        self.cron.describe()
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.expr == other.expr
    }
}

impl Eq for Schedule {}

/// Resolves `p` against the config file's directory when it is relative.
fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() { p } else { base.join(p) }
}

/// The directory relative paths in `file` are resolved against.
fn base_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
