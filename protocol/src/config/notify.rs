//! `notify:` in both daemons' files: who is told about failures (and, when asked,
//! recoveries and successes), as a webhook, a command or an e-mail.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::HumanDuration;
use super::error::{ConfigError, Source};
use crate::name::Name;

/// One target as written.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    pub name: String,
    pub webhook: Option<RawWebhook>,
    /// argv of a program run with the event in `NBACKUP_*` environment variables.
    pub command: Option<Vec<String>>,
    pub email: Option<RawEmail>,
    pub on: Option<Vec<NotifyOn>>,
    pub timeout: Option<HumanDuration>,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    /// The URL, when it holds no secret.
    pub url: Option<String>,
    /// A file holding the URL (Slack and Gotify URLs carry tokens): read by the
    /// daemon at start and reload, never logged.
    pub url_file: Option<PathBuf>,
    pub format: Option<WebhookFormat>,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmail {
    /// `host[:port]` of the submission server.
    pub server: String,
    pub tls: Option<SmtpTls>,
    pub from: String,
    pub to: Vec<String>,
    pub username: Option<String>,
    /// A file holding the password (never in the YAML, never logged).
    pub password_file: Option<PathBuf>,
    /// A PEM file of extra trusted roots (a private mail relay's CA).
    pub ca_file: Option<PathBuf>,
}

/// How an SMTP connection is protected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS, required (port 587).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No TLS: only to a relay on this host (localhost, 127.0.0.0/8, ::1).
    None,
}

impl SmtpTls {
    pub fn default_port(self) -> u16 {
        match self {
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        }
    }
}

/// A validated e-mail target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Email {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub from: String,
    pub to: Vec<String>,
    /// With the file its password is read from.
    pub login: Option<(String, PathBuf)>,
    pub ca_file: Option<PathBuf>,
}

/// What a target hears about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyOn {
    /// A failed backup, a missed backup, a silent agent, a corrupt archive, an
    /// incomplete commit, a rejected reload.
    Failure,
    /// The first success after a failure (or a late entry on time again).
    Recovery,
    /// Every committed backup.
    Success,
}

/// The body a webhook gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// `{"class", "daemon", "host", "summary", "event": {…}}`.
    #[default]
    Generic,
    /// `{"text": …}` for Slack and Mattermost incoming webhooks.
    Slack,
    /// A text body with `Title`, `Priority` and `Tags` headers (ntfy.sh).
    Ntfy,
    /// `{"title", "message", "priority"}` (Gotify `/message?token=`).
    Gotify,
}

/// Where a webhook's URL comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum WebhookUrl {
    Inline(String),
    File(PathBuf),
}

impl std::fmt::Debug for WebhookUrl {
    /// Never the URL itself: paths and queries carry tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WebhookUrl::Inline(u) => write!(f, "Inline({})", redact(u)),
            WebhookUrl::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

/// `https://hooks.example.com/…`: scheme and host only.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host = host.rsplit('@').next().unwrap_or(host);
            format!("{scheme}://{host}/…")
        }
        None => "…".into(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotifyTarget {
    Webhook { url: WebhookUrl, format: WebhookFormat },
    Command { argv: Vec<String> },
    Email(Email),
}

/// A validated target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notify {
    pub name: Name,
    pub target: NotifyTarget,
    /// Sorted, without duplicates; never empty.
    pub on: Vec<NotifyOn>,
    /// Bound on one delivery attempt.
    pub timeout: Duration,
}

impl Notify {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Validates every target of a `notify:` list.
    pub(super) fn from_raw(raw: Vec<RawNotify>, src: &Source<'_>, base: &Path) -> Result<Vec<Notify>, ConfigError> {
        let mut out: Vec<Notify> = Vec::new();
        for (i, r) in raw.into_iter().enumerate() {
            let at = format!("notify[{i}]");
            let name = Name::new(r.name.clone())
                .map_err(|e| src.error(Some(&format!("{at}.name")), format!("invalid name {:?}: {e}", r.name), None))?;
            if out.iter().any(|n| n.name == name) {
                return Err(src.error(Some(&format!("{at}.name")), format!("{name} is used twice"), None));
            }
            let target = match (r.webhook, r.command, r.email) {
                (Some(w), None, None) => webhook(w, src, &at, base)?,
                (None, None, Some(e)) => email(e, src, &at, base)?,
                (None, Some(argv), None) => {
                    if argv.first().is_none_or(|p| !Path::new(p).is_absolute()) {
                        return Err(src.error(
                            Some(&format!("{at}.command")),
                            "needs the program's absolute path first",
                            Some("e.g. command: [/usr/local/bin/page-oncall, --quiet]".into()),
                        ));
                    }
                    NotifyTarget::Command { argv }
                }
                _ => {
                    return Err(src.error(
                        Some(&at),
                        "needs exactly one of webhook, command or email",
                        Some(
                            "a target is `webhook: {url: …}`, `command: [/path, args…]` or `email: {server: …, from: …, to: […]}`"
                                .into(),
                        ),
                    ));
                }
            };
            let mut on = r.on.unwrap_or_else(|| vec![NotifyOn::Failure, NotifyOn::Recovery]);
            on.sort();
            on.dedup();
            if on.is_empty() {
                return Err(src.error(
                    Some(&format!("{at}.on")),
                    "lists nothing",
                    Some("failure, recovery, success".into()),
                ));
            }
            let timeout = r.timeout.map_or(Self::DEFAULT_TIMEOUT, |t| t.0);
            if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&timeout) {
                return Err(src.error(
                    Some(&format!("{at}.timeout")),
                    format!("{} is out of range", HumanDuration(timeout)),
                    Some("use 1s to 5m".into()),
                ));
            }
            out.push(Notify { name, target, on, timeout });
        }
        Ok(out)
    }
}

fn email(e: RawEmail, src: &Source<'_>, at: &str, base: &Path) -> Result<NotifyTarget, ConfigError> {
    let key = |k: &str| format!("{at}.email.{k}");
    let tls = e.tls.unwrap_or_default();
    let bad_port = |p: &str| src.error(Some(&key("server")), format!("{p:?} is not a port number"), None);
    let parse_port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad_port(p));
    let (host, port) = if let Some(rest) = e.server.strip_prefix('[') {
        // [v6]:port or [v6]
        match rest.split_once(']') {
            Some((h, "")) => (h.to_string(), tls.default_port()),
            Some((h, p)) => (h.to_string(), parse_port(p.trim_start_matches(':'))?),
            None => (String::new(), 0),
        }
    } else {
        match e.server.matches(':').count() {
            0 => (e.server.clone(), tls.default_port()),
            1 => {
                let (h, p) = e.server.split_once(':').expect("one colon");
                (h.to_string(), parse_port(p)?)
            }
            // A bare IPv6 address.
            _ => (e.server.clone(), tls.default_port()),
        }
    };
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err(src.error(Some(&key("server")), format!("{:?} is not a host name", e.server), None));
    }
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if tls == SmtpTls::None && !loopback {
        return Err(src.error(
            Some(&key("tls")),
            format!("tls: none would send mail (and any password) to {host} in clear"),
            Some("use starttls (port 587) or tls (port 465); none is for a relay on this host only".into()),
        ));
    }
    let address = |k: &str, a: &str| -> Result<String, ConfigError> {
        let inner = a.rsplit_once('<').map_or(a, |(_, rest)| rest.trim_end_matches('>')).trim();
        let ok = !a.contains(['\r', '\n'])
            && inner.split_once('@').is_some_and(|(l, d)| !l.is_empty() && (d.contains('.') || d == "localhost"));
        if ok {
            Ok(a.trim().to_string())
        } else {
            Err(src.error(
                Some(&key(k)),
                format!("{a:?} is not an e-mail address"),
                Some("e.g. ops@example.com or \"nbackup <backup@example.com>\"".into()),
            ))
        }
    };
    let from = address("from", &e.from)?;
    if e.to.is_empty() {
        return Err(src.error(Some(&key("to")), "lists nobody", Some("to: [ops@example.com]".into())));
    }
    let to = e.to.iter().map(|t| address("to", t)).collect::<Result<Vec<_>, _>>()?;
    let login = match (e.username, e.password_file) {
        (Some(u), Some(p)) => Some((u, super::resolve(base, p))),
        (None, None) => None,
        _ => {
            return Err(src.error(
                Some(&format!("{at}.email")),
                "username and password_file go together",
                Some("the password is read from password_file, never written in the YAML".into()),
            ));
        }
    };
    let ca_file = e.ca_file.map(|p| super::resolve(base, p));
    Ok(NotifyTarget::Email(Email { host, port, tls, from, to, login, ca_file }))
}

fn webhook(w: RawWebhook, src: &Source<'_>, at: &str, base: &Path) -> Result<NotifyTarget, ConfigError> {
    let url = match (w.url, w.url_file) {
        (Some(u), None) => {
            let ok = (u.starts_with("http://") || u.starts_with("https://"))
                && u.split_once("://").is_some_and(|(_, rest)| !rest.is_empty() && !rest.starts_with('/'));
            if !ok {
                return Err(src.error(
                    Some(&format!("{at}.webhook.url")),
                    format!("{} is not an http:// or https:// URL", redact(&u)),
                    None,
                ));
            }
            WebhookUrl::Inline(u)
        }
        (None, Some(p)) => WebhookUrl::File(super::resolve(base, p)),
        _ => {
            return Err(src.error(
                Some(&format!("{at}.webhook")),
                "needs exactly one of url or url_file",
                Some("put a URL holding a token in a file readable by the daemon only: url_file".into()),
            ));
        }
    };
    Ok(NotifyTarget::Webhook { url, format: w.format.unwrap_or_default() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;

    fn email_target(email: &str) -> Result<Email, String> {
        let yaml = format!(
            "server:\n  listen: \"127.0.0.1:9847\"\ntls:\n  ca_cert: ca.crt\n  server_cert: s.crt\n  server_key: s.key\n\
             storages:\n  main:\n    base_dir: /tmp/x\n    max_backups: 3\n    compression: gzip\n\
             notify:\n  - name: mail\n    email:\n{email}"
        );
        let cfg = ServerConfig::parse(&yaml, Path::new("/etc/nbackup/server.yaml")).map_err(|e| e.to_string())?;
        match cfg.notify.into_iter().next().map(|n| n.target) {
            Some(NotifyTarget::Email(e)) => Ok(e),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn email_ports_follow_the_tls_mode_and_paths_resolve_beside_the_config() {
        let e = email_target("      server: smtp.example.com\n      from: a@example.com\n      to: [b@example.com]\n")
            .expect("parses");
        assert_eq!((e.host.as_str(), e.port, e.tls), ("smtp.example.com", 587, SmtpTls::Starttls));
        let e = email_target(
            "      server: smtp.example.com\n      tls: tls\n      from: \"nbackup <a@example.com>\"\n      to: [b@example.com]\n\
             \x20     username: a\n      password_file: smtp.pass\n",
        )
        .expect("parses");
        assert_eq!(e.port, 465);
        assert_eq!(e.login, Some(("a".into(), PathBuf::from("/etc/nbackup/smtp.pass"))));
        let e = email_target(
            "      server: \"[::1]:2525\"\n      tls: none\n      from: a@localhost\n      to: [b@example.com]\n",
        )
        .expect("a relay on this host may be plain");
        assert_eq!((e.host.as_str(), e.port), ("::1", 2525));
        let bad = email_target("      server: smtp.example.com\n      from: nobody\n      to: [b@example.com]\n");
        assert!(bad.expect_err("refused").contains("is not an e-mail address"));
        let header = email_target(
            "      server: smtp.example.com\n      from: \"a@example.com\\r\\nBcc: x@evil.com\"\n      to: [b@example.com]\n",
        );
        assert!(header.is_err(), "no header injection through an address");
    }
}
