//! `notify:` in both daemons' files: who is told about failures (and, when asked,
//! recoveries and successes), as a webhook or a command.

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
            let target = match (r.webhook, r.command) {
                (Some(w), None) => webhook(w, src, &at, base)?,
                (None, Some(argv)) => {
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
                        "needs exactly one of webhook or command",
                        Some("a target is either `webhook: {url: …}` or `command: [/path, args…]`".into()),
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
