//! `agent.yaml`.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

use super::error::Source;
use super::{Admin, ByteSize, ConfigError, HumanDuration, Logging, RawAdmin, RawLogging, Schedule, base_dir, resolve};
use crate::limits::{MAX_CHUNK_SIZE, MAX_STREAMS, MIN_CHUNK_SIZE};
use crate::name::Name;

/// `agent.yaml` as written.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentConfig {
    pub agent: RawAgentSection,
    pub server: RawServerAddress,
    pub tls: RawAgentTls,
    pub backups: Vec<RawBackup>,
    #[serde(default)]
    pub resume: RawResume,
    #[serde(default)]
    pub retry: RawRetry,
    #[serde(default)]
    pub logging: RawLogging,
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub notify: Vec<super::RawNotify>,
    #[serde(default)]
    pub daemon: RawDaemon,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    #[serde(default)]
    pub control_channel: RawControlChannel,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawControlChannel {
    pub enabled: Option<bool>,
    pub keepalive_interval: Option<HumanDuration>,
    pub reconnect_delay: Option<HumanDuration>,
    pub max_reconnect_delay: Option<HumanDuration>,
}

/// The agent daemon's persistent control connection to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlChannel {
    pub enabled: bool,
    pub keepalive_interval: Duration,
    pub reconnect_delay: Duration,
    pub max_reconnect_delay: Duration,
}

impl Default for ControlChannel {
    fn default() -> Self {
        ControlChannel {
            enabled: true,
            keepalive_interval: Duration::from_secs(30),
            reconnect_delay: Duration::from_secs(5),
            max_reconnect_delay: Duration::from_secs(300),
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentSection {
    pub name: Name,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerAddress {
    pub address: String,
    pub server_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentTls {
    pub ca_cert: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub renew_before: Option<HumanDuration>,
    pub warn_before: Option<HumanDuration>,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackup {
    pub name: Name,
    pub storage: Name,
    pub schedule: Option<String>,
    pub sources: Vec<RawSource>,
    #[serde(default)]
    pub exclude: Vec<String>,
    pub parallels: Option<u16>,
    pub timezone: Option<String>,
    pub catch_up: Option<bool>,
    pub auto_scaler: Option<RawAutoScaler>,
    pub bandwidth_limit: Option<ByteSize>,
    /// `"HH:MM-HH:MM": rate` windows of local time.
    #[serde(default)]
    pub bandwidth_schedule: std::collections::BTreeMap<String, ByteSize>,
    pub restore_test: Option<RawRestoreTest>,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRestoreTest {
    pub schedule: String,
    pub files: Option<u32>,
}

/// Periodically restore a few random files of the newest archive and compare them
/// with the live source.
#[derive(Clone, Debug)]
pub struct RestoreTest {
    /// Read in the entry's time zone.
    pub schedule: Schedule,
    pub files: u32,
}

impl RestoreTest {
    pub const DEFAULT_FILES: u32 = 10;
    pub const MAX_FILES: u32 = 1000;
}

#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAutoScaler {
    pub enabled: Option<bool>,
    pub mode: Option<ScaleMode>,
    pub interval: Option<HumanDuration>,
}

/// How the autoscaler judges an added stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleMode {
    /// Keep a stream that raises total throughput by at least 5 %.
    #[default]
    Adaptive,
    /// Keep a stream only if throughput per stream stays within 5 % — every stream
    /// must pull its weight; fewer connections for the same speed.
    Efficiency,
}

/// Autoscaler settings of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoScaler {
    pub enabled: bool,
    pub mode: ScaleMode,
    /// How often throughput is measured and a decision taken.
    pub interval: Duration,
}

impl Default for AutoScaler {
    fn default() -> Self {
        AutoScaler { enabled: false, mode: ScaleMode::Adaptive, interval: Duration::from_secs(2) }
    }
}

/// Upload rate limits of an entry: a limit for named times of day, else a default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bandwidth {
    /// Bytes per second outside every window; `None` is unlimited.
    pub default: Option<u64>,
    /// (start minute of day, end minute of day, bytes per second); a window whose end
    /// is before its start wraps midnight.
    pub windows: Vec<(u16, u16, u64)>,
}

impl Bandwidth {
    /// Smallest limit accepted, in bytes per second.
    pub const MIN_RATE: u64 = 64 * 1024;

    /// The limit in force at `minute` of the local day (0..1440).
    pub fn rate_at(&self, minute: u16) -> Option<u64> {
        self.windows
            .iter()
            .find(
                |(start, end, _)| {
                    if start <= end { (*start..*end).contains(&minute) } else { minute >= *start || minute < *end }
                },
            )
            .map(|w| w.2)
            .or(self.default)
    }

    pub fn is_unlimited(&self) -> bool {
        self.default.is_none() && self.windows.is_empty()
    }
}

/// Parses `"HH:MM-HH:MM"` into minutes of the day.
pub fn parse_window(s: &str) -> Result<(u16, u16), String> {
    let minute = |t: &str| -> Option<u16> {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60).then_some(h * 60 + m)
    };
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?} is not a time window; write e.g. \"08:00-18:00\""))?;
    let (start, end) = (
        minute(a).ok_or_else(|| format!("{a:?} is not a time of day (HH:MM)"))?,
        minute(b).ok_or_else(|| format!("{b:?} is not a time of day (HH:MM)"))?,
    );
    if start == end {
        return Err(format!("{s:?} is empty"));
    }
    Ok((start, end))
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub path: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawResume {
    pub buffer_size: Option<ByteSize>,
    pub chunk_size: Option<ByteSize>,
    pub ack_timeout: Option<HumanDuration>,
    pub keepalive_interval: Option<HumanDuration>,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub max_attempts: Option<u32>,
    pub initial_delay: Option<HumanDuration>,
    pub max_delay: Option<HumanDuration>,
    pub attempt_timeout: Option<HumanDuration>,
}

/// Validated agent configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Must equal the identity in the agent's certificate; the server checks.
    pub name: Name,
    pub server: ServerEndpoint,
    pub tls: AgentTls,
    pub backups: Vec<BackupEntry>,
    pub resume: Resume,
    pub retry: Retry,
    pub logging: Logging,
    /// Where the agent daemon keeps results and events.
    pub state_dir: PathBuf,
    pub admin: Admin,
    pub control_channel: ControlChannel,
    /// Who is told about failures.
    pub notify: Vec<super::Notify>,
}

/// Where the server is and which name its certificate must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerEndpoint {
    /// `host:port` as configured, resolved at connect time.
    pub address: String,
    /// Name verified against the server certificate (a DNS name or an IP address).
    pub server_name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentTls {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Ask the server for a new certificate once the current one has less than this
    /// left; zero: never renew automatically.
    pub renew_before: Duration,
    /// Record a `cert_expiring` event (and notify) once less than this is left.
    pub warn_before: Duration,
}

impl AgentTls {
    pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);
    pub const DEFAULT_WARN_BEFORE: Duration = Duration::from_secs(14 * 86_400);
}

/// One backup entry: what to archive, where to, and when.
#[derive(Clone, Debug)]
pub struct BackupEntry {
    pub name: Name,
    pub storage: Name,
    /// `None`: the entry only runs on demand.
    pub schedule: Option<Schedule>,
    /// Time zone the schedule is read in; `None` is the host's local time.
    pub timezone: Option<chrono_tz::Tz>,
    /// Run once at start if a scheduled run was missed while the agent was down.
    pub catch_up: bool,
    /// Absolute source paths; archive members are these paths without the leading `/`.
    pub sources: Vec<PathBuf>,
    pub exclude: Excludes,
    /// Streams to use (1 to 64); with the autoscaler, the most it may open.
    pub parallels: u16,
    pub auto_scaler: AutoScaler,
    pub bandwidth: Bandwidth,
    pub restore_test: Option<RestoreTest>,
}

/// The in-memory window of unacknowledged data, the chunk size, and how long a
/// stream may go without acknowledgement before it is declared dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    pub buffer_size: u64,
    pub chunk_size: u32,
    /// Floor of the no-acknowledgement timeout; the effective timeout is the larger
    /// of this and 20 round trips. It counts from when a chunk's last byte was
    /// written, so time spent waiting in the bandwidth limit never counts.
    pub ack_timeout: Duration,
    /// A stream with nothing to send sends a keepalive this often, so the server can
    /// tell an idle agent from a vanished one (`server.stream_timeout`).
    pub keepalive_interval: Duration,
}

/// Reconnect and re-run policy: exponential backoff from `initial_delay`, doubling up
/// to `max_delay`, at most `max_attempts` tries in a row without progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// Bound on one attempt of a scheduled run.
    pub attempt_timeout: Duration,
}

impl Retry {
    /// Delay before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.initial_delay.saturating_mul(factor).min(self.max_delay)
    }
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: 5,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            attempt_timeout: Duration::from_secs(24 * 3600),
        }
    }
}

impl Default for Resume {
    fn default() -> Self {
        Resume {
            buffer_size: 256 * ByteSize::MIB,
            chunk_size: ByteSize::MIB as u32,
            ack_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(5),
        }
    }
}

/// Exclude patterns, matched the way people expect from tar and gitignore:
///
/// * a pattern without `/` matches an entry's own name at any depth (`*.log`,
///   `node_modules`, `.cache`);
/// * a pattern with `/` matches the path below the source root (`tmp/**`, `logs/*.gz`;
///   `**/x/*` at any depth);
/// * a pattern starting with `/` matches the absolute path (`/var/lib/mysql/**`).
///
/// `*` and `?` never cross `/`; `**` does. An excluded directory is not entered.
#[derive(Clone, Debug)]
pub struct Excludes {
    patterns: Vec<String>,
    names: GlobSet,
    relative: GlobSet,
    absolute: GlobSet,
}

impl Excludes {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, (usize, String)> {
        let mut names = GlobSetBuilder::new();
        let mut relative = GlobSetBuilder::new();
        let mut absolute = GlobSetBuilder::new();
        for (i, p) in patterns.iter().enumerate() {
            let p = p.as_ref();
            if p.is_empty() {
                return Err((i, "empty pattern".into()));
            }
            let glob = |s: &str| -> Result<Glob, (usize, String)> {
                GlobBuilder::new(s)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .build()
                    .map_err(|e| (i, format!("invalid pattern {p:?}: {}", e.kind())))
            };
            if p.starts_with('/') {
                absolute.add(glob(p)?);
            } else if p.contains('/') {
                relative.add(glob(p.trim_end_matches('/'))?);
            } else {
                names.add(glob(p)?);
            }
        }
        let build = |b: GlobSetBuilder| b.build().map_err(|e| (0, e.to_string()));
        Ok(Excludes {
            patterns: patterns.iter().map(|p| p.as_ref().to_string()).collect(),
            names: build(names)?,
            relative: build(relative)?,
            absolute: build(absolute)?,
        })
    }

    pub fn none() -> Self {
        Excludes::new::<&str>(&[]).expect("an empty set always builds")
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Whether the entry at `absolute` (named `name`, at `relative` below its source
    /// root) is excluded.
    pub fn is_excluded(&self, absolute: &Path, relative: &Path, name: &OsStr) -> bool {
        self.names.is_match(Path::new(name))
            || (!relative.as_os_str().is_empty() && self.relative.is_match(relative))
            || self.absolute.is_match(absolute)
    }
}

impl AgentConfig {
    pub const DEFAULT_PORT: u16 = 9847;

    /// Parses and validates `text`, read from `file` (used in messages and to resolve
    /// relative paths).
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let src = Source { file, text };
        let raw: RawAgentConfig = src.parse()?;
        Self::from_raw(raw, &src)
    }

    fn from_raw(raw: RawAgentConfig, src: &Source<'_>) -> Result<Self, ConfigError> {
        let base = base_dir(src.file);
        let server = endpoint(&raw.server, src)?;
        let resume = resume(&raw.resume, src)?;
        let retry = retry(&raw.retry, src)?;
        if raw.backups.is_empty() {
            return Err(src.error(
                Some("backups"),
                "no backup entries are defined",
                Some("add one: `backups: [{name: etc, storage: main, sources: [{path: /etc}]}]`".into()),
            ));
        }
        let mut seen = BTreeSet::new();
        let mut backups = Vec::with_capacity(raw.backups.len());
        for (i, b) in raw.backups.into_iter().enumerate() {
            let at = format!("backups[{i}]");
            if !seen.insert(b.name.clone()) {
                return Err(src.error(
                    Some(&format!("{at}.name")),
                    format!("backup entry {} is defined twice", b.name),
                    Some("entry names must be unique; the server keys archives by them".into()),
                ));
            }
            let schedule = match &b.schedule {
                None => None,
                Some(expr) => Some(Schedule::parse(expr).map_err(|e| {
                    src.error(
                        Some(&format!("{at}.schedule")),
                        e,
                        Some("use 5 fields (minute hour day-of-month month day-of-week), e.g. \"0 2 * * *\", or @daily/@hourly".into()),
                    )
                })?),
            };
            if b.sources.is_empty() {
                return Err(src.error(Some(&format!("{at}.sources")), "no sources", Some("add `- path: /etc`".into())));
            }
            let mut sources = Vec::with_capacity(b.sources.len());
            for (j, s) in b.sources.into_iter().enumerate() {
                if !s.path.is_absolute() {
                    return Err(src.error(
                        Some(&format!("{at}.sources[{j}].path")),
                        format!("{} is not an absolute path", s.path.display()),
                        Some("archive members are named after absolute source paths; write e.g. /etc".into()),
                    ));
                }
                sources.push(s.path);
            }
            for (j, s) in sources.iter().enumerate() {
                if let Some(k) = sources.iter().position(|o| o != s && s.starts_with(o)) {
                    return Err(src.error(
                        Some(&format!("{at}.sources[{j}].path")),
                        format!("{} is inside source {}", s.display(), sources[k].display()),
                        Some("it would be archived twice; remove one".into()),
                    ));
                }
                if sources[..j].contains(s) {
                    return Err(src.error(
                        Some(&format!("{at}.sources[{j}].path")),
                        format!("{} is listed twice", s.display()),
                        None,
                    ));
                }
            }
            let exclude = Excludes::new(&b.exclude).map_err(|(j, e)| {
                src.error(
                    Some(&format!("{at}.exclude[{j}]")),
                    e,
                    Some("globs: * and ? within a name, ** across directories, [abc] classes".into()),
                )
            })?;
            let parallels = match b.parallels {
                None | Some(0) => 1,
                Some(n) if n <= MAX_STREAMS => n,
                Some(n) => {
                    return Err(src.error(
                        Some(&format!("{at}.parallels")),
                        format!("{n} streams is more than the limit"),
                        Some(format!("use 1 to {MAX_STREAMS}")),
                    ));
                }
            };
            let needed = u64::from(parallels) * u64::from(resume.chunk_size) * 2;
            if resume.buffer_size < needed {
                return Err(src.error(
                    Some(&format!("{at}.parallels")),
                    format!(
                        "{parallels} streams need a window of at least {} (2 chunks of {} per stream), but resume.buffer_size is {}",
                        ByteSize(needed),
                        ByteSize(resume.chunk_size.into()),
                        ByteSize(resume.buffer_size)
                    ),
                    Some("raise resume.buffer_size or lower parallels".into()),
                ));
            }
            let timezone = match &b.timezone {
                None => None,
                Some(tz) => Some(tz.parse::<chrono_tz::Tz>().map_err(|_| {
                    src.error(
                        Some(&format!("{at}.timezone")),
                        format!("unknown time zone {tz:?}"),
                        Some("use an IANA name such as Europe/Lisbon or UTC".into()),
                    )
                })?),
            };
            if b.catch_up == Some(true) && schedule.is_none() {
                return Err(src.error(
                    Some(&format!("{at}.catch_up")),
                    "catch_up needs a schedule",
                    Some("add `schedule:` or remove catch_up".into()),
                ));
            }
            let auto_scaler = auto_scaler(b.auto_scaler.as_ref(), &at, src)?;
            let bandwidth = bandwidth(b.bandwidth_limit, &b.bandwidth_schedule, &at, src)?;
            let restore_test = match b.restore_test {
                None => None,
                Some(t) => {
                    let schedule = Schedule::parse(&t.schedule).map_err(|e| {
                        src.error(
                            Some(&format!("{at}.restore_test.schedule")),
                            e,
                            Some("a cron expression, e.g. \"0 6 * * 0\" (Sundays at 06:00)".into()),
                        )
                    })?;
                    let files = t.files.unwrap_or(RestoreTest::DEFAULT_FILES);
                    if !(1..=RestoreTest::MAX_FILES).contains(&files) {
                        return Err(src.error(
                            Some(&format!("{at}.restore_test.files")),
                            format!("{files} is out of range"),
                            Some(format!("1 to {}", RestoreTest::MAX_FILES)),
                        ));
                    }
                    Some(RestoreTest { schedule, files })
                }
            };
            backups.push(BackupEntry {
                name: b.name,
                storage: b.storage,
                schedule,
                timezone,
                catch_up: b.catch_up.unwrap_or(false),
                sources,
                exclude,
                parallels,
                auto_scaler,
                bandwidth,
                restore_test,
            });
        }
        Ok(AgentConfig {
            name: raw.agent.name,
            server,
            tls: AgentTls {
                ca_cert: resolve(&base, raw.tls.ca_cert),
                cert: resolve(&base, raw.tls.client_cert),
                key: resolve(&base, raw.tls.client_key),
                renew_before: raw.tls.renew_before.map_or(AgentTls::DEFAULT_RENEW_BEFORE, |d| d.0),
                warn_before: raw.tls.warn_before.map_or(AgentTls::DEFAULT_WARN_BEFORE, |d| d.0),
            },
            backups,
            resume,
            retry,
            logging: Logging::from_raw(raw.logging, &base),
            state_dir: raw
                .state_dir
                .map_or_else(|| PathBuf::from(super::server::DEFAULT_STATE_DIR), |p| resolve(&base, p)),
            admin: Admin::from_raw(raw.admin, &base).map_err(|e| src.error(Some("admin.group"), e, None))?,
            notify: super::Notify::from_raw(raw.notify, src, &base)?,
            control_channel: control_channel(&raw.daemon.control_channel, src)?,
        })
    }

    /// The entries named in `names`, in config order; all entries when `names` is
    /// empty. Unknown names are an error listing the valid ones.
    pub fn select(&self, names: &[String]) -> Result<Vec<&BackupEntry>, String> {
        if names.is_empty() {
            return Ok(self.backups.iter().collect());
        }
        for n in names {
            if !self.backups.iter().any(|b| b.name.as_str() == n) {
                let valid: Vec<_> = self.backups.iter().map(|b| b.name.as_str()).collect();
                return Err(format!("no backup entry named {n:?}; entries: {}", valid.join(", ")));
            }
        }
        Ok(self.backups.iter().filter(|b| names.iter().any(|n| n == b.name.as_str())).collect())
    }
}

/// Why a server address is not usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointError {
    /// `host:port` is malformed.
    Address(String),
    /// The name to verify is neither a DNS name nor an IP address.
    Name(String),
}

impl ServerEndpoint {
    /// `address` as `host:port` (IPv6 in brackets), verified as `server_name` or,
    /// when that is `None`, as the host.
    pub fn parse(address: &str, server_name: Option<&str>) -> Result<Self, EndpointError> {
        let (host, port) =
            address.rsplit_once(':').ok_or_else(|| EndpointError::Address(format!("{address:?} has no port")))?;
        port.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| EndpointError::Address(format!("{port:?} is not a port number")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(EndpointError::Address(format!("{address:?} has no host")));
        }
        let server_name = server_name.map_or_else(|| host.to_string(), str::to_string);
        if rustls_name_ok(&server_name).is_err() {
            return Err(EndpointError::Name(format!("{server_name:?} is neither a DNS name nor an IP address")));
        }
        Ok(ServerEndpoint { address: address.to_string(), server_name })
    }
}

fn endpoint(raw: &RawServerAddress, src: &Source<'_>) -> Result<ServerEndpoint, ConfigError> {
    ServerEndpoint::parse(&raw.address, raw.server_name.as_deref()).map_err(|e| match e {
        EndpointError::Address(msg) => src.error(
            Some("server.address"),
            msg,
            Some("write host:port, e.g. backup.example.com:9847 or [2001:db8::1]:9847".into()),
        ),
        EndpointError::Name(msg) => src.error(
            Some(if raw.server_name.is_some() { "server.server_name" } else { "server.address" }),
            msg,
            Some("set server.server_name to the name in the server certificate".into()),
        ),
    })
}

/// The server name must be something a certificate can carry: an IP or a DNS name.
fn rustls_name_ok(name: &str) -> Result<(), ()> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let labels_ok = name.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    });
    if name.len() <= 253 && labels_ok { Ok(()) } else { Err(()) }
}

fn auto_scaler(raw: Option<&RawAutoScaler>, at: &str, src: &Source<'_>) -> Result<AutoScaler, ConfigError> {
    let d = AutoScaler::default();
    let Some(raw) = raw else { return Ok(d) };
    let interval = raw.interval.map_or(d.interval, |i| i.0);
    if interval < Duration::from_millis(100) {
        return Err(src.error(
            Some(&format!("{at}.auto_scaler.interval")),
            "must be at least 100ms",
            Some("it is how often throughput is measured; 2s is typical".into()),
        ));
    }
    Ok(AutoScaler { enabled: raw.enabled.unwrap_or(true), mode: raw.mode.unwrap_or_default(), interval })
}

fn bandwidth(
    limit: Option<ByteSize>,
    schedule: &std::collections::BTreeMap<String, ByteSize>,
    at: &str,
    src: &Source<'_>,
) -> Result<Bandwidth, ConfigError> {
    let check = |rate: u64, key: &str| {
        if rate < Bandwidth::MIN_RATE {
            Err(src.error(
                Some(key),
                format!("{} per second is below the minimum", ByteSize(rate)),
                Some(format!("use at least {}; omit the key for no limit", ByteSize(Bandwidth::MIN_RATE))),
            ))
        } else {
            Ok(rate)
        }
    };
    let default = limit.map(|l| check(l.0, &format!("{at}.bandwidth_limit"))).transpose()?;
    let mut windows: Vec<(u16, u16, u64)> = Vec::new();
    for (window, rate) in schedule {
        let key = format!("{at}.bandwidth_schedule");
        let (start, end) = parse_window(window).map_err(|e| src.error(Some(&key), e, None))?;
        let rate = check(rate.0, &key)?;
        let minutes =
            |s: u16, e: u16| -> Vec<u16> { if s < e { (s..e).collect() } else { (s..1440).chain(0..e).collect() } };
        let mine = minutes(start, end);
        if let Some(other) = windows.iter().find(|(s, e, _)| minutes(*s, *e).iter().any(|m| mine.contains(m))) {
            return Err(src.error(
                Some(&key),
                format!(
                    "window {window:?} overlaps {:02}:{:02}-{:02}:{:02}",
                    other.0 / 60,
                    other.0 % 60,
                    other.1 / 60,
                    other.1 % 60
                ),
                Some("windows must not overlap".into()),
            ));
        }
        windows.push((start, end, rate));
    }
    Ok(Bandwidth { default, windows })
}

fn control_channel(raw: &RawControlChannel, src: &Source<'_>) -> Result<ControlChannel, ConfigError> {
    let d = ControlChannel::default();
    let c = ControlChannel {
        enabled: raw.enabled.unwrap_or(d.enabled),
        keepalive_interval: raw.keepalive_interval.map_or(d.keepalive_interval, |x| x.0),
        reconnect_delay: raw.reconnect_delay.map_or(d.reconnect_delay, |x| x.0),
        max_reconnect_delay: raw.max_reconnect_delay.map_or(d.max_reconnect_delay, |x| x.0),
    };
    let at = "daemon.control_channel";
    if c.keepalive_interval < Duration::from_millis(100) {
        return Err(src.error(Some(&format!("{at}.keepalive_interval")), "must be at least 100ms", None));
    }
    if c.reconnect_delay.is_zero() || c.reconnect_delay > c.max_reconnect_delay {
        return Err(src.error(
            Some(&format!("{at}.reconnect_delay")),
            format!(
                "reconnect_delay {} must be more than 0 and at most max_reconnect_delay {}",
                HumanDuration(c.reconnect_delay),
                HumanDuration(c.max_reconnect_delay)
            ),
            None,
        ));
    }
    Ok(c)
}

fn resume(raw: &RawResume, src: &Source<'_>) -> Result<Resume, ConfigError> {
    let defaults = Resume::default();
    let chunk = raw.chunk_size.map_or(u64::from(defaults.chunk_size), ByteSize::bytes);
    if !(u64::from(MIN_CHUNK_SIZE)..=u64::from(MAX_CHUNK_SIZE)).contains(&chunk) {
        return Err(src.error(
            Some("resume.chunk_size"),
            format!("{} is out of range", ByteSize(chunk)),
            Some(format!("use {} to {}", ByteSize(MIN_CHUNK_SIZE.into()), ByteSize(MAX_CHUNK_SIZE.into()))),
        ));
    }
    let buffer = raw.buffer_size.map_or(defaults.buffer_size, ByteSize::bytes);
    if buffer < 2 * chunk {
        return Err(src.error(
            Some("resume.buffer_size"),
            format!("{} cannot hold two chunks of {}", ByteSize(buffer), ByteSize(chunk)),
            Some("the window must be at least twice resume.chunk_size; 64mb to 1gb is typical".into()),
        ));
    }
    let ack_timeout = raw.ack_timeout.map_or(defaults.ack_timeout, |d| d.0);
    if ack_timeout < Duration::from_millis(100) {
        return Err(src.error(
            Some("resume.ack_timeout"),
            "must be at least 100ms",
            Some("a stream without acknowledgement for this long is reconnected; 30s is typical".into()),
        ));
    }
    let keepalive_interval = raw.keepalive_interval.map_or(defaults.keepalive_interval, |d| d.0);
    if keepalive_interval < Duration::from_millis(100) || keepalive_interval > Duration::from_secs(300) {
        return Err(src.error(
            Some("resume.keepalive_interval"),
            format!("{} is out of range", HumanDuration(keepalive_interval)),
            Some("use 100ms to 5m, well below the server's stream_timeout (60s by default); 5s is typical".into()),
        ));
    }
    Ok(Resume { buffer_size: buffer, chunk_size: chunk as u32, ack_timeout, keepalive_interval })
}

fn retry(raw: &RawRetry, src: &Source<'_>) -> Result<Retry, ConfigError> {
    let d = Retry::default();
    let r = Retry {
        max_attempts: raw.max_attempts.unwrap_or(d.max_attempts),
        initial_delay: raw.initial_delay.map_or(d.initial_delay, |x| x.0),
        max_delay: raw.max_delay.map_or(d.max_delay, |x| x.0),
        attempt_timeout: raw.attempt_timeout.map_or(d.attempt_timeout, |x| x.0),
    };
    if r.attempt_timeout < Duration::from_secs(1) {
        return Err(src.error(Some("retry.attempt_timeout"), "must be at least 1s", Some("e.g. 12h".into())));
    }
    if r.max_attempts == 0 {
        return Err(src.error(Some("retry.max_attempts"), "must be at least 1", None));
    }
    if r.initial_delay.is_zero() {
        return Err(src.error(Some("retry.initial_delay"), "must be more than 0", Some("e.g. 1s".into())));
    }
    if r.initial_delay > r.max_delay {
        return Err(src.error(
            Some("retry.initial_delay"),
            format!(
                "initial_delay {} is longer than max_delay {}",
                HumanDuration(r.initial_delay),
                HumanDuration(r.max_delay)
            ),
            None,
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(patterns: &[&str], abs: &str, root: &str) -> bool {
        let e = Excludes::new(patterns).expect("valid patterns");
        let abs = Path::new(abs);
        let rel = abs.strip_prefix(root).expect("abs below root");
        e.is_excluded(abs, rel, abs.file_name().expect("has a name"))
    }

    #[test]
    fn excludes_by_name_at_any_depth() {
        assert!(ex(&["*.log"], "/src/a/b/c.log", "/src"));
        assert!(ex(&["node_modules"], "/src/x/node_modules", "/src"));
        assert!(!ex(&["*.log"], "/src/a/c.log.gz", "/src"));
        assert!(!ex(&["a"], "/src/a/b", "/src"));
    }

    #[test]
    fn excludes_relative_paths_from_the_source_root() {
        assert!(ex(&["tmp/**"], "/src/tmp/x", "/src"));
        assert!(ex(&["tmp/**"], "/src/tmp/x/y", "/src"));
        assert!(!ex(&["tmp/**"], "/src/tmp", "/src"));
        assert!(!ex(&["tmp/**"], "/src/a/tmp/x", "/src"));
        assert!(ex(&["**/cache/*"], "/src/a/b/cache/f", "/src"));
        assert!(ex(&["logs/*.gz"], "/src/logs/a.gz", "/src"));
        assert!(!ex(&["logs/*.gz"], "/src/logs/sub/a.gz", "/src"));
        assert!(ex(&["tmp/"], "/src/tmp", "/src"));
    }

    #[test]
    fn excludes_absolute_paths() {
        assert!(ex(&["/var/lib/mysql/**"], "/var/lib/mysql/db/t.ibd", "/var"));
        assert!(!ex(&["/var/lib/mysql/**"], "/var/lib/other", "/var"));
    }

    #[test]
    fn rejects_bad_patterns() {
        assert_eq!(Excludes::new(&["ok", "[unclosed"]).unwrap_err().0, 1);
        assert_eq!(Excludes::new(&[""]).unwrap_err().0, 0);
    }

    #[test]
    fn bandwidth_windows_apply_by_time_of_day_and_wrap_midnight() {
        let b = Bandwidth {
            default: Some(100_000),
            windows: vec![(8 * 60, 18 * 60, 5_000_000), (22 * 60, 6 * 60, 50_000_000)],
        };
        assert_eq!(b.rate_at(7 * 60 + 59), Some(100_000));
        assert_eq!(b.rate_at(8 * 60), Some(5_000_000));
        assert_eq!(b.rate_at(17 * 60 + 59), Some(5_000_000));
        assert_eq!(b.rate_at(18 * 60), Some(100_000));
        assert_eq!(b.rate_at(23 * 60), Some(50_000_000));
        assert_eq!(b.rate_at(0), Some(50_000_000));
        assert_eq!(b.rate_at(6 * 60), Some(100_000));
        assert_eq!(Bandwidth::default().rate_at(0), None);
    }

    #[test]
    fn parses_time_windows() {
        assert_eq!(parse_window("08:00-18:30"), Ok((480, 1110)));
        assert_eq!(parse_window("22:00-06:00"), Ok((1320, 360)));
        assert!(parse_window("8-18").is_err());
        assert!(parse_window("24:00-01:00").is_err());
        assert!(parse_window("10:00-10:00").is_err());
    }

    #[test]
    fn retry_backs_off_exponentially_up_to_the_cap() {
        let r = Retry {
            max_attempts: 9,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(60),
        };
        let delays: Vec<u64> = (1..=5).map(|a| r.delay(a).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
        assert_eq!(r.delay(200), Duration::from_secs(5));
    }
}
