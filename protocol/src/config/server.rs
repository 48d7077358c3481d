//! `server.yaml`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::Source;
use super::{Admin, ByteSize, ConfigError, HumanDuration, Logging, RawAdmin, RawLogging, Schedule, base_dir, resolve};
use crate::limits::{MAX_STORAGES, MAX_STREAMS};
use crate::name::Name;
use crate::wire::Compression;

/// `server.yaml` as written.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerConfig {
    pub server: RawServerSection,
    pub tls: RawServerTls,
    pub storages: BTreeMap<String, RawStorage>,
    #[serde(default)]
    pub logging: RawLogging,
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub notify: Vec<super::RawNotify>,
    pub enrollment: Option<RawEnrollment>,
}

/// `enrollment:` — this server signs agents' certificates (`nbackup cert token`,
/// `nbackup setup agent`, automatic renewal).
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawEnrollment {
    pub ca_key: PathBuf,
    pub address: Option<String>,
    pub cert_lifetime: Option<HumanDuration>,
    pub token_ttl: Option<HumanDuration>,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerSection {
    pub listen: String,
    pub handshake_timeout: Option<HumanDuration>,
    pub session_ttl: Option<HumanDuration>,
    pub orphan_timeout: Option<HumanDuration>,
    pub stream_timeout: Option<HumanDuration>,
    pub max_streams_per_session: Option<u16>,
    pub max_handshakes: Option<u32>,
    pub max_sessions_per_agent: Option<u32>,
    pub max_streams_per_agent: Option<u32>,
    pub agent_silent_after: Option<HumanDuration>,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerTls {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub crl: Option<PathBuf>,
    pub warn_before: Option<HumanDuration>,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    pub base_dir: PathBuf,
    pub max_backups: u32,
    pub compression: Compression,
    pub compression_level: Option<i32>,
    pub chunk_fsync: Option<bool>,
    pub quota_per_agent: Option<ByteSize>,
    pub verify_rate: Option<ByteSize>,
    pub verify_schedule: Option<String>,
    #[serde(default)]
    pub buckets: Vec<super::RawBucket>,
}

/// Validated server configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Bound on each phase of a new connection: TLS handshake, preamble, first frame.
    pub handshake_timeout: Duration,
    /// A session with no traffic for this long is ended and its lock released.
    pub session_ttl: Duration,
    /// A session whose streams are all gone (agent killed, network down) is ended
    /// after this long unless the agent re-joins.
    pub orphan_timeout: Duration,
    /// A stream on which no byte arrives for this long is taken for a vanished peer
    /// (a host pulled off the network sends neither FIN nor RST). Agents send
    /// keepalives on idle streams (`resume.keepalive_interval`), so only silence
    /// counts.
    pub stream_timeout: Duration,
    pub max_streams_per_session: u16,
    /// Connections still in the TLS handshake or before their first frame; more are
    /// closed at once, so a flood cannot take every descriptor.
    pub max_handshakes: u32,
    /// Sessions (one per backup entry) one agent may have open at once.
    pub max_sessions_per_agent: u32,
    /// Streams one agent may have attached at once, over all its sessions.
    pub max_streams_per_agent: u32,
    /// An agent whose control channel has been gone this long is raised as
    /// `agent_silent`: a dead host cannot report its own failures.
    pub agent_silent_after: Duration,
    pub tls: ServerTls,
    pub storages: BTreeMap<Name, Storage>,
    pub logging: Logging,
    /// Where history and events are kept.
    pub state_dir: PathBuf,
    pub admin: Admin,
    /// Who is told about failures.
    pub notify: Vec<super::Notify>,
    pub enrollment: Option<Enrollment>,
}

/// Default directory for daemon state.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nbackup";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Revocation lists to honour besides the server's own (`<state_dir>/crl.pem`,
    /// written by `nbackup cert revoke`).
    pub crl: Option<PathBuf>,
    /// Record a `cert_expiring` event (and notify) once the server's own
    /// certificate, or its CA, has less than this left.
    pub warn_before: Duration,
    /// Accept handshakes without a client certificate, for `ENRL` connections only
    /// (set when `enrollment` is configured).
    pub allow_enrollment: bool,
}

/// How this server signs agents' certificates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enrollment {
    /// The CA's private key (PEM); readable by the server only.
    pub ca_key: PathBuf,
    /// `host:port` agents dial, as printed by `nbackup cert token`; `None`: the
    /// server certificate's first name and the listening port.
    pub address: Option<String>,
    /// How long an issued certificate is valid, in whole days.
    pub cert_days: u32,
    /// How long a token lives when `nbackup cert token` names no `--ttl`.
    pub token_ttl: Duration,
}

impl Enrollment {
    pub const DEFAULT_CERT_DAYS: u32 = 365;
    pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(30 * 60);
    /// The longest a token may live: enrollment is a moment, not a standing secret.
    pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 86_400);
}

/// One named storage: where archives go, how many to keep, how they are compressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Storage {
    pub name: Name,
    pub base_dir: PathBuf,
    pub max_backups: u32,
    pub compression: Compression,
    pub level: i32,
    /// fsync every chunk before acknowledging it (slower; survives power loss
    /// mid-upload without re-sending). The archive is always fsynced at commit.
    pub chunk_fsync: bool,
    /// Most bytes of archives one agent may keep in this storage (all its entries);
    /// `None`: no quota.
    pub quota_per_agent: Option<u64>,
    /// Most bytes per second a verification reads from this storage; `None`: as
    /// fast as the disk goes.
    pub verify_rate: Option<u64>,
    /// When to re-read every kept archive of this storage (server's local time).
    pub verify_schedule: Option<Schedule>,
    /// Off-site copies of every archive committed here.
    pub buckets: Vec<super::Bucket>,
}

impl ServerConfig {
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(3600);
    pub const DEFAULT_ORPHAN_TIMEOUT: Duration = Duration::from_secs(600);
    pub const DEFAULT_MAX_STREAMS: u16 = 16;
    pub const DEFAULT_STREAM_TIMEOUT: Duration = Duration::from_secs(60);
    pub const DEFAULT_MAX_HANDSHAKES: u32 = 256;
    pub const DEFAULT_MAX_SESSIONS_PER_AGENT: u32 = 16;
    pub const DEFAULT_MAX_STREAMS_PER_AGENT: u32 = 256;
    pub const DEFAULT_AGENT_SILENT_AFTER: Duration = Duration::from_secs(15 * 60);
    pub const DEFAULT_WARN_BEFORE: Duration = Duration::from_secs(14 * 86_400);

    /// The revocation list `nbackup cert revoke` maintains (always honoured when it
    /// exists).
    pub fn own_crl(&self) -> PathBuf {
        self.state_dir.join("crl.pem")
    }

    /// Parses and validates `text`, read from `file` (used in messages and to resolve
    /// relative paths).
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let src = Source { file, text };
        let raw: RawServerConfig = src.parse()?;
        Self::from_raw(raw, &src)
    }

    fn from_raw(raw: RawServerConfig, src: &Source<'_>) -> Result<Self, ConfigError> {
        let base = base_dir(src.file);
        let listen: SocketAddr = raw.server.listen.parse().map_err(|_| {
            src.error(
                Some("server.listen"),
                format!("{:?} is not an address:port", raw.server.listen),
                Some("write e.g. \"0.0.0.0:9847\" or \"[::]:9847\"".into()),
            )
        })?;
        let handshake_timeout = raw.server.handshake_timeout.map_or(Self::DEFAULT_HANDSHAKE_TIMEOUT, |d| d.0);
        if handshake_timeout < Duration::from_millis(100) {
            return Err(src.error(Some("server.handshake_timeout"), "must be at least 100ms", None));
        }
        let session_ttl = raw.server.session_ttl.map_or(Self::DEFAULT_SESSION_TTL, |d| d.0);
        if session_ttl < Duration::from_secs(1) {
            return Err(src.error(Some("server.session_ttl"), "must be at least 1s", None));
        }
        let orphan_timeout = raw.server.orphan_timeout.map_or(Self::DEFAULT_ORPHAN_TIMEOUT, |d| d.0);
        if orphan_timeout < Duration::from_millis(100) || orphan_timeout > session_ttl {
            return Err(src.error(
                Some("server.orphan_timeout"),
                format!("{} is out of range", HumanDuration(orphan_timeout)),
                Some(format!(
                    "use 100ms to session_ttl ({}); it should exceed the agents' retry.max_delay",
                    HumanDuration(session_ttl)
                )),
            ));
        }
        let max_streams = raw.server.max_streams_per_session.unwrap_or(Self::DEFAULT_MAX_STREAMS);
        if !(1..=MAX_STREAMS).contains(&max_streams) {
            return Err(src.error(
                Some("server.max_streams_per_session"),
                format!("{max_streams} is out of range"),
                Some(format!("use 1 to {MAX_STREAMS}")),
            ));
        }
        let stream_timeout = raw.server.stream_timeout.map_or(Self::DEFAULT_STREAM_TIMEOUT, |d| d.0);
        if stream_timeout < Duration::from_secs(1) || stream_timeout > session_ttl {
            return Err(src.error(
                Some("server.stream_timeout"),
                format!("{} is out of range", HumanDuration(stream_timeout)),
                Some(format!(
                    "use 1s to session_ttl ({}); it must exceed the agents' resume.keepalive_interval",
                    HumanDuration(session_ttl)
                )),
            ));
        }
        let positive = |key: &str, v: Option<u32>, default: u32| -> Result<u32, ConfigError> {
            match v.unwrap_or(default) {
                0 => Err(src.error(Some(&format!("server.{key}")), "must be at least 1", None)),
                n => Ok(n),
            }
        };
        let max_handshakes = positive("max_handshakes", raw.server.max_handshakes, Self::DEFAULT_MAX_HANDSHAKES)?;
        let agent_silent_after = raw.server.agent_silent_after.map_or(Self::DEFAULT_AGENT_SILENT_AFTER, |d| d.0);
        if agent_silent_after < Duration::from_secs(1) || agent_silent_after > Duration::from_secs(7 * 86_400) {
            return Err(src.error(
                Some("server.agent_silent_after"),
                format!("{} is out of range", HumanDuration(agent_silent_after)),
                Some("use 1s to 7d; well above the agents' control_channel.keepalive_interval".into()),
            ));
        }
        let max_sessions_per_agent = positive(
            "max_sessions_per_agent",
            raw.server.max_sessions_per_agent,
            Self::DEFAULT_MAX_SESSIONS_PER_AGENT,
        )?;
        let max_streams_per_agent =
            positive("max_streams_per_agent", raw.server.max_streams_per_agent, Self::DEFAULT_MAX_STREAMS_PER_AGENT)?;
        if raw.storages.is_empty() {
            return Err(src.error(
                Some("storages"),
                "no storages are defined",
                Some("define at least one, e.g. `storages: {main: {base_dir: /var/backups/nbackup, max_backups: 7, compression: gzip}}`".into()),
            ));
        }
        if raw.storages.len() > MAX_STORAGES {
            return Err(src.error(Some("storages"), format!("more than {MAX_STORAGES} storages"), None));
        }
        let enrollment = raw.enrollment.map(|e| enrollment_from_raw(e, src, &base)).transpose()?;
        let mut storages = BTreeMap::new();
        let mut dirs: BTreeMap<PathBuf, Name> = BTreeMap::new();
        for (key, s) in raw.storages {
            let at = format!("storages.{key}");
            let name = Name::new(key.clone())
                .map_err(|e| src.error(Some(&at), format!("invalid storage name {key:?}: {e}"), None))?;
            if s.max_backups == 0 {
                return Err(src.error(
                    Some(&format!("{at}.max_backups")),
                    "must be at least 1",
                    Some("it is how many archives to keep per agent and backup".into()),
                ));
            }
            let level = s.compression_level.unwrap_or(s.compression.default_level());
            let range = s.compression.level_range();
            if !range.contains(&level) {
                return Err(src.error(
                    Some(&format!("{at}.compression_level")),
                    format!("{level} is not a {} level", s.compression),
                    Some(format!("use {} to {}", range.start(), range.end())),
                ));
            }
            let verify_schedule = match &s.verify_schedule {
                None => None,
                Some(expr) => Some(Schedule::parse(expr).map_err(|e| {
                    src.error(
                        Some(&format!("{at}.verify_schedule")),
                        e,
                        Some(
                            "use 5 fields (minute hour day-of-month month day-of-week), e.g. \"0 4 * * 0\", or @weekly"
                                .into(),
                        ),
                    )
                })?),
            };
            let buckets = super::bucket::from_raw(s.buckets, &at, src, &base, s.max_backups)?;
            let base_dir = resolve(&base, s.base_dir);
            if let Some(other) = dirs.insert(base_dir.clone(), name.clone()) {
                return Err(src.error(
                    Some(&format!("{at}.base_dir")),
                    format!("storage {other} already uses {}", base_dir.display()),
                    Some("give every storage its own base_dir".into()),
                ));
            }
            storages.insert(
                name.clone(),
                Storage {
                    name,
                    base_dir,
                    max_backups: s.max_backups,
                    compression: s.compression,
                    level,
                    chunk_fsync: s.chunk_fsync.unwrap_or(false),
                    quota_per_agent: s.quota_per_agent.map(|q| q.0),
                    verify_rate: s.verify_rate.map(|q| q.0).filter(|r| *r > 0),
                    verify_schedule,
                    buckets,
                },
            );
        }
        Ok(ServerConfig {
            listen,
            handshake_timeout,
            session_ttl,
            orphan_timeout,
            stream_timeout,
            max_streams_per_session: max_streams,
            max_handshakes,
            max_sessions_per_agent,
            max_streams_per_agent,
            agent_silent_after,
            tls: ServerTls {
                ca_cert: resolve(&base, raw.tls.ca_cert),
                cert: resolve(&base, raw.tls.server_cert),
                key: resolve(&base, raw.tls.server_key),
                crl: raw.tls.crl.map(|p| resolve(&base, p)),
                warn_before: raw.tls.warn_before.map_or(Self::DEFAULT_WARN_BEFORE, |d| d.0),
                allow_enrollment: enrollment.is_some(),
            },
            storages,
            logging: Logging::from_raw(raw.logging, &base),
            state_dir: raw.state_dir.map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), |p| resolve(&base, p)),
            admin: Admin::from_raw(raw.admin, &base).map_err(|e| src.error(Some("admin.group"), e, None))?,
            notify: super::Notify::from_raw(raw.notify, src, &base)?,
            enrollment,
        })
    }
}

fn enrollment_from_raw(raw: RawEnrollment, src: &Source<'_>, base: &Path) -> Result<Enrollment, ConfigError> {
    if let Some(address) = &raw.address {
        let port = address.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
        if port.and_then(|p| p.parse::<u16>().ok()).is_none_or(|p| p == 0) {
            return Err(src.error(
                Some("enrollment.address"),
                format!("{address:?} is not host:port"),
                Some("write the name agents dial, e.g. \"backup.example.com:9847\"".into()),
            ));
        }
    }
    let lifetime =
        raw.cert_lifetime.map_or(Duration::from_secs(u64::from(Enrollment::DEFAULT_CERT_DAYS) * 86_400), |d| d.0);
    let days = lifetime.as_secs() / 86_400;
    if !lifetime.as_secs().is_multiple_of(86_400) || !(1..=3650).contains(&days) {
        return Err(src.error(
            Some("enrollment.cert_lifetime"),
            format!("{} is not a whole number of days from 1d to 3650d", HumanDuration(lifetime)),
            Some("e.g. 365d; agents renew on their own before it ends (tls.renew_before)".into()),
        ));
    }
    let token_ttl = raw.token_ttl.map_or(Enrollment::DEFAULT_TOKEN_TTL, |d| d.0);
    if token_ttl < Duration::from_secs(60) || token_ttl > Enrollment::MAX_TOKEN_TTL {
        return Err(src.error(
            Some("enrollment.token_ttl"),
            format!("{} is out of range", HumanDuration(token_ttl)),
            Some("use 1m to 7d".into()),
        ));
    }
    Ok(Enrollment { ca_key: resolve(base, raw.ca_key), address: raw.address, cert_days: days as u32, token_ttl })
}
