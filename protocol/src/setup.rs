//! `nbackup setup`: the wizard's answers and the plan they make. Pure: the prompts
//! (`nbackup setup`), an answers file (`--answers`) and the console fill the same
//! [`Answers`]; [`plan`] turns them into ordered steps — certificates to make, config
//! files to write — and every config it writes has already passed the same
//! validation as loading. Files and certificates are the caller's business.
//!
//! Re-running edits: an existing config is read as YAML and only the keys the wizard
//! asks about are replaced (a storage's `buckets`, `notify:` targets, tuning and
//! everything else stay), so the caller can show a diff and ask before writing.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

use crate::config::{AgentConfig, ServerConfig};
use crate::wire::Compression;

pub const DEFAULT_DIR: &str = "/etc/nbackup";
pub const DEFAULT_PORT: u16 = 9847;

/// What this host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Server,
    Agent,
    /// A server that also backs itself up: its agent's certificate comes from the
    /// local CA.
    Both,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answers {
    pub role: Role,
    /// Where configs and certificates go.
    #[serde(default = "default_dir")]
    pub dir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerAnswers>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentAnswers>,
    /// End by proving the chain: a tiny backup as the entry `setup-check`, verified by
    /// the server and restored.
    #[serde(default = "yes")]
    pub check: bool,
}

/// The entry name the closing proof backs up as.
pub const CHECK_ENTRY: &str = "setup-check";

fn default_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DIR)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerAnswers {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Names (DNS or IP) agents dial; the server certificate carries them all.
    pub names: Vec<String>,
    /// `create` a CA in `<dir>/pki`, or `reuse` the one there.
    #[serde(default)]
    pub ca: CaChoice,
    /// Sign agents' certificates (`nbackup cert token`, automatic renewal).
    #[serde(default = "yes")]
    pub enrollment: bool,
    pub storages: Vec<StorageAnswers>,
}

fn default_listen() -> String {
    format!("0.0.0.0:{DEFAULT_PORT}")
}

fn yes() -> bool {
    true
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaChoice {
    #[default]
    Create,
    Reuse,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageAnswers {
    pub name: String,
    pub base_dir: PathBuf,
    #[serde(default = "default_keep")]
    pub max_backups: u32,
    #[serde(default = "default_compression")]
    pub compression: Compression,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<i32>,
}

fn default_keep() -> u32 {
    7
}

fn default_compression() -> Compression {
    Compression::Zstd
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentAnswers {
    pub name: String,
    /// `host:port` of the server; for `both`, the server's first name and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// For `agent`: the token and pin `nbackup cert token` printed on the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll: Option<EnrollAnswers>,
    pub backups: Vec<BackupAnswers>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollAnswers {
    pub token: String,
    pub ca_pin: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupAnswers {
    pub name: String,
    pub storage: String,
    pub paths: Vec<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Cron (5 fields) or `@daily` and friends; `None`: on demand only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallels: Option<u16>,
    /// E.g. `50MiB` (per second, all streams together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<String>,
}

/// What is already on disk, as the caller found it.
#[derive(Clone, Debug, Default)]
pub struct Existing {
    pub server_yaml: Option<String>,
    pub agent_yaml: Option<String>,
    /// `<dir>/pki/ca.crt` and `ca.key` exist.
    pub ca: bool,
    pub server_cert: bool,
    /// The agent's certificate and key exist.
    pub agent_cert: bool,
}

impl Existing {
    /// What an earlier run (or a hand-written config) answered, as defaults for the
    /// prompts: best effort, `None` where a config is absent or unreadable.
    pub fn server_answers(&self) -> Option<ServerAnswers> {
        let raw: crate::config::RawServerConfig = serde_yaml::from_str(self.server_yaml.as_deref()?).ok()?;
        let names = raw
            .enrollment
            .as_ref()
            .and_then(|e| e.address.as_ref())
            .and_then(|a| a.rsplit_once(':'))
            .map(|(h, _)| vec![h.trim_start_matches('[').trim_end_matches(']').to_string()])
            .unwrap_or_default();
        Some(ServerAnswers {
            listen: raw.server.listen,
            names,
            ca: if self.ca { CaChoice::Reuse } else { CaChoice::Create },
            enrollment: raw.enrollment.is_some(),
            storages: raw
                .storages
                .into_iter()
                .map(|(name, st)| StorageAnswers {
                    name,
                    base_dir: st.base_dir,
                    max_backups: st.max_backups,
                    compression: st.compression,
                    level: st.compression_level,
                })
                .collect(),
        })
    }

    pub fn agent_answers(&self) -> Option<AgentAnswers> {
        let raw: crate::config::RawAgentConfig = serde_yaml::from_str(self.agent_yaml.as_deref()?).ok()?;
        Some(AgentAnswers {
            name: raw.agent.name.to_string(),
            server: Some(raw.server.address),
            enroll: None,
            backups: raw
                .backups
                .into_iter()
                .map(|b| BackupAnswers {
                    name: b.name.to_string(),
                    storage: b.storage.to_string(),
                    paths: b.sources.into_iter().map(|s| s.path).collect(),
                    exclude: b.exclude,
                    schedule: b.schedule,
                    parallels: b.parallels,
                    bandwidth_limit: b.bandwidth_limit.map(|l| l.to_string()),
                })
                .collect(),
        })
    }
}

/// One thing to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A new CA: `<prefix>.crt`, `<prefix>.key`.
    CreateCa { prefix: PathBuf },
    /// A server certificate from the CA at `ca` (prefix) for `names`.
    IssueServer { ca: PathBuf, names: Vec<String>, prefix: PathBuf },
    /// An agent certificate from the local CA.
    IssueAgent { ca: PathBuf, name: String, prefix: PathBuf },
    /// Enrollment with a token (as `nbackup setup agent`): writes `ca.crt`,
    /// `agent.crt` and `agent.key` into `dir`.
    Enroll { server: String, token: String, ca_pin: String, agent: String, dir: PathBuf },
    /// A config file; `previous` is what it replaces (for a diff), if anything.
    Write { path: PathBuf, text: String, previous: Option<String> },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
}

impl Plan {
    /// The config files it writes.
    pub fn writes(&self) -> impl Iterator<Item = (&Path, &str, Option<&str>)> {
        self.steps.iter().filter_map(|s| match s {
            Step::Write { path, text, previous } => Some((path.as_path(), text.as_str(), previous.as_deref())),
            _ => None,
        })
    }
}

/// Paths of the layout `plan` uses under `dir`.
pub struct Layout {
    pub server_yaml: PathBuf,
    pub agent_yaml: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Self {
        Layout {
            server_yaml: dir.join("server.yaml"),
            agent_yaml: dir.join("agent.yaml"),
            ca: dir.join("pki/ca"),
            server_cert: dir.join("pki/server"),
        }
    }

    /// Where an agent's certificate lives: beside the CA for `both`, in `dir`
    /// itself when enrolled (as `nbackup setup agent` writes it).
    pub fn agent_cert(dir: &Path, role: Role, name: &str) -> PathBuf {
        match role {
            Role::Both => dir.join("pki").join(name),
            _ => dir.join("agent"),
        }
    }
}

/// The plan for `a`, given what exists. Errors name the answer at fault.
pub fn plan(a: &Answers, existing: &Existing) -> Result<Plan, String> {
    let dir = &a.dir;
    if !dir.is_absolute() {
        return Err(format!("dir: {} is not an absolute path", dir.display()));
    }
    let layout = Layout::new(dir);
    let mut steps = Vec::new();
    let server = match (a.role, &a.server) {
        (Role::Server | Role::Both, None) => return Err("server: the questions for a server are unanswered".into()),
        (Role::Agent, Some(_)) => return Err("server: answered, but the role is agent".into()),
        (_, s) => s.as_ref(),
    };
    let agent = match (a.role, &a.agent) {
        (Role::Agent | Role::Both, None) => return Err("agent: the questions for an agent are unanswered".into()),
        (Role::Server, Some(_)) => return Err("agent: answered, but the role is server".into()),
        (_, ag) => ag.as_ref(),
    };
    let mut port = DEFAULT_PORT;
    if let Some(s) = server {
        if s.names.is_empty() {
            return Err("server.names: name at least one host name or IP address agents dial".into());
        }
        port = s
            .listen
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| format!("server.listen: {:?} is not address:port", s.listen))?;
        match (s.ca, existing.ca) {
            (CaChoice::Create, false) => steps.push(Step::CreateCa { prefix: layout.ca.clone() }),
            (CaChoice::Create, true) => {} // made by an earlier run: kept, never replaced
            (CaChoice::Reuse, true) => {}
            (CaChoice::Reuse, false) => {
                return Err(format!("server.ca: reuse, but {}.crt and .key are not there", layout.ca.display()));
            }
        }
        if !existing.server_cert {
            steps.push(Step::IssueServer {
                ca: layout.ca.clone(),
                names: s.names.clone(),
                prefix: layout.server_cert.clone(),
            });
        }
        let text = server_yaml(s, existing.server_yaml.as_deref(), port)?;
        ServerConfig::parse(&text, &layout.server_yaml).map_err(|e| format!("the server.yaml it makes: {e}"))?;
        steps.push(Step::Write { path: layout.server_yaml.clone(), text, previous: existing.server_yaml.clone() });
    }
    if let Some(ag) = agent {
        let address = match (&ag.server, server) {
            (Some(addr), _) => addr.clone(),
            (None, Some(s)) => format!("{}:{port}", bracket(&s.names[0])),
            (None, None) => return Err("agent.server: name the server's host:port".into()),
        };
        let cert = Layout::agent_cert(dir, a.role, &ag.name);
        match (a.role, &ag.enroll) {
            (Role::Both, Some(_)) => {
                return Err("agent.enroll: a server's own agent gets its certificate from the local CA".into());
            }
            (Role::Agent, None) if !existing.agent_cert => {
                return Err("agent.enroll: give the token and ca_pin `nbackup cert token` printed on the server".into());
            }
            (Role::Agent, Some(e)) if !existing.agent_cert => steps.push(Step::Enroll {
                server: address.clone(),
                token: e.token.clone(),
                ca_pin: e.ca_pin.clone(),
                agent: ag.name.clone(),
                dir: dir.clone(),
            }),
            (Role::Both, None) if !existing.agent_cert => {
                steps.push(Step::IssueAgent { ca: layout.ca.clone(), name: ag.name.clone(), prefix: cert.clone() });
            }
            _ => {}
        }
        let ca_cert = match a.role {
            Role::Both => "pki/ca.crt",
            _ => "ca.crt",
        };
        let rel = cert.strip_prefix(dir).unwrap_or(&cert).to_string_lossy().into_owned();
        let text = agent_yaml(ag, &address, ca_cert, &rel, existing.agent_yaml.as_deref())?;
        AgentConfig::parse(&text, &layout.agent_yaml).map_err(|e| format!("the agent.yaml it makes: {e}"))?;
        steps.push(Step::Write { path: layout.agent_yaml.clone(), text, previous: existing.agent_yaml.clone() });
    }
    Ok(Plan { steps })
}

fn bracket(host: &str) -> String {
    if host.contains(':') { format!("[{host}]") } else { host.to_string() }
}

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

fn path(p: &Path) -> Value {
    Value::String(p.to_string_lossy().into_owned())
}

/// The mapping at `key` in `m`, made one if absent or not a mapping.
fn section<'a>(m: &'a mut Mapping, key: &str) -> &'a mut Mapping {
    let slot = m.entry(s(key)).or_insert_with(|| Value::Mapping(Mapping::new()));
    if !slot.is_mapping() {
        *slot = Value::Mapping(Mapping::new());
    }
    slot.as_mapping_mut().expect("just made a mapping")
}

fn parse_existing(text: Option<&str>, file: &str) -> Result<Option<Mapping>, String> {
    match text {
        None => Ok(None),
        Some(t) => match serde_yaml::from_str::<Value>(t) {
            Ok(Value::Mapping(m)) => Ok(Some(m)),
            Ok(_) => Err(format!("the existing {file} is not a YAML mapping; move it away to start afresh")),
            Err(e) => Err(format!("the existing {file} is not valid YAML ({e}); fix or move it away")),
        },
    }
}

const SERVER_HEADER: &str = "\
# Written by `nbackup setup`; re-run it to change what it asked, or edit by hand.
# Every key: configs/server.example.yaml (/etc/nbackup/server.example.yaml).
# Apply changes to a running server: `systemctl reload nbackup-server`.
";

const AGENT_HEADER: &str = "\
# Written by `nbackup setup`; re-run it to change what it asked, or edit by hand.
# Every key: configs/agent.example.yaml (/etc/nbackup/agent.example.yaml).
# Apply changes to a running agent: `systemctl reload nbackup-agent`.
";

/// The comment block a file starts with (kept on an edit), or `fresh`'s. Comments
/// further down do not survive an edit: the file is rewritten from its YAML.
fn header(existing: Option<&str>, fresh: &str) -> String {
    match existing {
        None => fresh.to_string(),
        Some(text) => text.lines().take_while(|l| l.starts_with('#')).map(|l| format!("{l}\n")).collect(),
    }
}

fn server_yaml(a: &ServerAnswers, existing: Option<&str>, port: u16) -> Result<String, String> {
    let fresh = existing.is_none();
    let mut root = parse_existing(existing, "server.yaml")?.unwrap_or_default();
    section(&mut root, "server").insert(s("listen"), s(&a.listen));
    let tls = section(&mut root, "tls");
    tls.insert(s("ca_cert"), s("pki/ca.crt"));
    tls.insert(s("server_cert"), s("pki/server.crt"));
    tls.insert(s("server_key"), s("pki/server.key"));
    if a.enrollment {
        let e = section(&mut root, "enrollment");
        e.insert(s("ca_key"), s("pki/ca.key"));
        e.insert(s("address"), s(&format!("{}:{port}", bracket(&a.names[0]))));
    } else {
        root.remove(s("enrollment"));
    }
    if a.storages.is_empty() {
        return Err("server.storages: define at least one".into());
    }
    for st in &a.storages {
        set_storage(&mut root, st);
    }
    if fresh {
        // The packaged server runs without a login session: its socket must be
        // where `nbackup ctl` looks for it.
        section(&mut root, "admin").insert(s("socket"), s("/run/nbackup/server.sock"));
    }
    let body = serde_yaml::to_string(&Value::Mapping(root)).map_err(|e| e.to_string())?;
    Ok(format!("{}{body}", header(existing, SERVER_HEADER)))
}

fn set_storage(root: &mut Mapping, st: &StorageAnswers) {
    let m = section(section(root, "storages"), &st.name);
    m.insert(s("base_dir"), path(&st.base_dir));
    m.insert(s("max_backups"), Value::from(st.max_backups));
    m.insert(s("compression"), s(&st.compression.to_string()));
    match st.level {
        Some(l) => m.insert(s("compression_level"), Value::from(l)),
        None => m.remove(s("compression_level")),
    };
}

/// `server.yaml` at `file` (its text `existing`) with `storage` added or changed,
/// validated as loading would (the console's "add a storage").
pub fn with_storage(existing: &str, file: &Path, storage: &StorageAnswers) -> Result<String, String> {
    let mut root = parse_existing(Some(existing), "server.yaml")?.unwrap_or_default();
    set_storage(&mut root, storage);
    let body = serde_yaml::to_string(&Value::Mapping(root)).map_err(|e| e.to_string())?;
    let text = format!("{}{body}", header(Some(existing), SERVER_HEADER));
    ServerConfig::parse(&text, file).map_err(|e| format!("the server.yaml it makes: {e}"))?;
    Ok(text)
}

/// `agent.yaml` at `file` with `backup` added or changed, validated (the console's
/// "add a backup entry").
pub fn with_backup(existing: &str, file: &Path, backup: &BackupAnswers) -> Result<String, String> {
    let mut root = parse_existing(Some(existing), "agent.yaml")?.unwrap_or_default();
    set_backup(&mut root, backup)?;
    let body = serde_yaml::to_string(&Value::Mapping(root)).map_err(|e| e.to_string())?;
    let text = format!("{}{body}", header(Some(existing), AGENT_HEADER));
    AgentConfig::parse(&text, file).map_err(|e| format!("the agent.yaml it makes: {e}"))?;
    Ok(text)
}

fn agent_yaml(
    a: &AgentAnswers,
    address: &str,
    ca_cert: &str,
    cert: &str,
    existing: Option<&str>,
) -> Result<String, String> {
    let fresh = existing.is_none();
    let mut root = parse_existing(existing, "agent.yaml")?.unwrap_or_default();
    section(&mut root, "agent").insert(s("name"), s(&a.name));
    section(&mut root, "server").insert(s("address"), s(address));
    let tls = section(&mut root, "tls");
    tls.insert(s("ca_cert"), s(ca_cert));
    tls.insert(s("client_cert"), s(&format!("{cert}.crt")));
    tls.insert(s("client_key"), s(&format!("{cert}.key")));
    if a.backups.is_empty() {
        return Err("agent.backups: define at least one".into());
    }
    for b in &a.backups {
        set_backup(&mut root, b)?;
    }
    if fresh {
        section(&mut root, "admin").insert(s("socket"), s("/run/nbackup/agent.sock"));
    }
    let body = serde_yaml::to_string(&Value::Mapping(root)).map_err(|e| e.to_string())?;
    Ok(format!("{}{body}", header(existing, AGENT_HEADER)))
}

fn set_backup(root: &mut Mapping, b: &BackupAnswers) -> Result<(), String> {
    let slot = root.entry(s("backups")).or_insert_with(|| Value::Sequence(Vec::new()));
    if !slot.is_sequence() {
        *slot = Value::Sequence(Vec::new());
    }
    let list = slot.as_sequence_mut().expect("just made a sequence");
    let i = match list.iter().position(|e| e.get("name").and_then(Value::as_str) == Some(b.name.as_str())) {
        Some(i) => i,
        None => {
            list.push(Value::Mapping(Mapping::new()));
            list.len() - 1
        }
    };
    let Some(m) = list[i].as_mapping_mut() else {
        return Err(format!("the existing agent.yaml's backup entry {} is not a mapping", b.name));
    };
    m.insert(s("name"), s(&b.name));
    m.insert(s("storage"), s(&b.storage));
    match &b.schedule {
        Some(c) => m.insert(s("schedule"), s(c)),
        None => m.remove(s("schedule")),
    };
    let sources: Vec<Value> = b
        .paths
        .iter()
        .map(|p| {
            let mut src = Mapping::new();
            src.insert(s("path"), path(p));
            Value::Mapping(src)
        })
        .collect();
    m.insert(s("sources"), Value::Sequence(sources));
    if b.exclude.is_empty() {
        m.remove(s("exclude"));
    } else {
        m.insert(s("exclude"), Value::Sequence(b.exclude.iter().map(|e| s(e)).collect()));
    }
    match b.parallels {
        Some(n) => m.insert(s("parallels"), Value::from(n)),
        None => m.remove(s("parallels")),
    };
    match &b.bandwidth_limit {
        Some(l) => m.insert(s("bandwidth_limit"), s(l)),
        None => m.remove(s("bandwidth_limit")),
    };
    Ok(())
}

/// `nbackup setup --print-answers`: every question, commented, with the defaults.
/// Parses as [`Answers`] as printed (role `both`, so both halves are shown).
pub const ANSWERS_TEMPLATE: &str = "\
# Answers for `nbackup setup --answers FILE [--dry-run]`: the questions the wizard
# asks, with their defaults. Delete the half you do not need (`server:` or `agent:`).

# server: this host receives backups; agent: it sends them; both: a server that
# also backs itself up (its agent certificate comes from the local CA).
role: both
# Where configs and certificates are written (server.yaml, agent.yaml, pki/).
dir: /etc/nbackup
# End by proving it works: a tiny backup (entry setup-check, kept as the proof),
# verified by the server and restored. A server not yet running is started for it.
check: true

server:
  # Address and port to listen on.
  listen: 0.0.0.0:9847
  # Names agents dial; the server certificate carries every one (DNS or IP).
  names: [backup.example.com]
  # create: a new CA in <dir>/pki (kept on later runs); reuse: the one there.
  ca: create
  # Sign agents' certificates with one-time tokens (`nbackup cert token`), and let
  # agents renew on their own.
  enrollment: true
  # Where archives go. Each: name, base_dir (free space and permissions are checked),
  # max_backups (archives kept per agent and entry), compression (gzip or zstd),
  # level (optional; gzip 1-9, zstd 1-19).
  storages:
    - name: main
      base_dir: /var/backups/nbackup/main
      max_backups: 7
      compression: zstd

agent:
  # This agent's name (its certificate's); letters, digits, . _ - @ +.
  name: web-01
  # The server's host:port. For role both, leave it out: the server's first name.
  # server: backup.example.com:9847
  # For role agent: the token and pin `nbackup cert token` printed on the server.
  # enroll:
  #   token: nbk1-...
  #   ca_pin: sha256:...
  # What to back up. Each: name, storage (the server's), paths (absolute; each is
  # checked), exclude (globs), schedule (cron in this host's time, or @daily; the
  # next three runs are shown; leave it out for on-demand only), parallels
  # (streams), bandwidth_limit (e.g. 50MiB, per second).
  backups:
    - name: etc
      storage: main
      paths: [/etc]
      exclude: []
      schedule: \"0 2 * * *\"
";

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Answers {
        serde_yaml::from_str(ANSWERS_TEMPLATE).expect("the template parses")
    }

    #[test]
    fn the_template_plans_a_server_that_backs_itself_up() {
        let mut a = template();
        a.dir = PathBuf::from("/tmp/nb-setup");
        let plan = plan(&a, &Existing::default()).expect("plans");
        let kinds: Vec<&str> = plan
            .steps
            .iter()
            .map(|s| match s {
                Step::CreateCa { .. } => "ca",
                Step::IssueServer { .. } => "server cert",
                Step::IssueAgent { .. } => "agent cert",
                Step::Enroll { .. } => "enroll",
                Step::Write { .. } => "write",
            })
            .collect();
        assert_eq!(kinds, ["ca", "server cert", "write", "agent cert", "write"]);
        let (server, agent) = {
            let mut w = plan.writes();
            (w.next().expect("server").1.to_string(), w.next().expect("agent").1.to_string())
        };
        let s = ServerConfig::parse(&server, Path::new("/tmp/nb-setup/server.yaml")).expect("loads");
        assert_eq!(s.enrollment.as_ref().and_then(|e| e.address.clone()).as_deref(), Some("backup.example.com:9847"));
        assert_eq!(s.tls.key, Path::new("/tmp/nb-setup/pki/server.key"));
        let g = AgentConfig::parse(&agent, Path::new("/tmp/nb-setup/agent.yaml")).expect("loads");
        assert_eq!(g.server.address, "backup.example.com:9847");
        assert_eq!(g.tls.cert, Path::new("/tmp/nb-setup/pki/web-01.crt"));
        assert!(server.starts_with("# Written by `nbackup setup`"));
    }

    #[test]
    fn a_rerun_keeps_what_it_did_not_ask_and_makes_no_certificates_again() {
        let mut a = template();
        a.dir = PathBuf::from("/tmp/nb-setup");
        let first = plan(&a, &Existing::default()).expect("plans");
        let mut texts = first.writes().map(|(_, t, _)| t.to_string());
        let (server, agent) = (texts.next().expect("server"), texts.next().expect("agent"));
        // The operator added a bucket-less tuning key and a notify target by hand.
        let server = server.replace("    compression: zstd\n", "    compression: zstd\n    verify_rate: 50MiB\n")
            + "notify:\n- name: ops\n  webhook:\n    url: https://hooks.example.com/x\n";
        let agent = agent.replace("  schedule: 0 2 * * *\n", "  schedule: 0 2 * * *\n  catch_up: true\n");
        assert!(agent.contains("catch_up"), "{agent}");
        let existing = Existing {
            server_yaml: Some(server.clone()),
            agent_yaml: Some(agent.clone()),
            ca: true,
            server_cert: true,
            agent_cert: true,
        };
        a.server.as_mut().expect("server").storages[0].max_backups = 14;
        a.agent.as_mut().expect("agent").backups.push(BackupAnswers {
            name: "home".into(),
            storage: "main".into(),
            paths: vec!["/home".into()],
            exclude: vec!["*.cache".into()],
            schedule: Some("@daily".into()),
            parallels: Some(2),
            bandwidth_limit: Some("20MiB".into()),
        });
        let back = existing.server_answers().expect("read back");
        assert_eq!(
            (back.names.clone(), back.ca, back.storages.len()),
            (vec!["backup.example.com".to_string()], CaChoice::Reuse, 1)
        );
        let back = existing.agent_answers().expect("read back");
        assert_eq!(back.backups[0].paths, vec![PathBuf::from("/etc")]);
        let again = plan(&a, &existing).expect("plans");
        assert!(again.steps.iter().all(|s| matches!(s, Step::Write { .. })), "no certificate made twice");
        let writes: Vec<_> = again.writes().collect();
        assert_eq!(writes[0].2, Some(server.as_str()), "the previous text, for the diff");
        assert!(writes[0].1.contains("verify_rate: 50MiB") && writes[0].1.contains("hooks.example.com"));
        assert!(writes[0].1.contains("max_backups: 14"));
        assert!(writes[1].1.contains("catch_up: true") && writes[1].1.contains("name: home"));
    }

    #[test]
    fn one_storage_or_entry_is_added_to_a_config_as_it_stands() {
        let mut a = template();
        a.dir = PathBuf::from("/tmp/nb-setup");
        let first = plan(&a, &Existing::default()).expect("plans");
        let mut texts = first.writes().map(|(_, t, _)| t.to_string());
        let (server, agent) = (texts.next().expect("server"), texts.next().expect("agent"));
        let file = Path::new("/tmp/nb-setup/server.yaml");
        let st = StorageAnswers {
            name: "offsite-disk".into(),
            base_dir: "/mnt/usb/nbackup".into(),
            max_backups: 30,
            compression: Compression::Gzip,
            level: Some(9),
        };
        let text = with_storage(&server, file, &st).expect("adds");
        let cfg = ServerConfig::parse(&text, file).expect("loads");
        assert_eq!(cfg.storages.len(), 2);
        assert!(text.starts_with("# Written by"), "the header stays");
        let bad = StorageAnswers { base_dir: "/var/backups/nbackup/main".into(), ..st };
        assert!(with_storage(&server, file, &bad).unwrap_err().contains("already uses"), "validated as loading");
        let file = Path::new("/tmp/nb-setup/agent.yaml");
        let b = BackupAnswers {
            name: "www".into(),
            storage: "main".into(),
            paths: vec!["/var/www".into()],
            exclude: vec![],
            schedule: Some("30 3 * * *".into()),
            parallels: None,
            bandwidth_limit: None,
        };
        let cfg = AgentConfig::parse(&with_backup(&agent, file, &b).expect("adds"), file).expect("loads");
        assert_eq!(cfg.backups.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(), ["etc", "www"]);
    }

    #[test]
    fn answers_that_cannot_work_say_which_answer() {
        let mut a = template();
        a.dir = PathBuf::from("relative");
        assert!(plan(&a, &Existing::default()).unwrap_err().starts_with("dir:"));
        let mut a = template();
        a.dir = PathBuf::from("/tmp/x");
        a.role = Role::Agent;
        assert!(plan(&a, &Existing::default()).unwrap_err().starts_with("server: answered"));
        a.server = None;
        assert!(plan(&a, &Existing::default()).unwrap_err().starts_with("agent.server"));
        a.agent.as_mut().expect("agent").server = Some("backup.example.com:9847".into());
        assert!(plan(&a, &Existing::default()).unwrap_err().starts_with("agent.enroll"));
        let mut a = template();
        a.dir = PathBuf::from("/tmp/x");
        a.agent.as_mut().expect("agent").backups[0].schedule = Some("every day".into());
        let e = plan(&a, &Existing::default()).unwrap_err();
        assert!(e.contains("agent.yaml") && e.contains("schedule"), "{e}");
        let mut a = template();
        a.dir = PathBuf::from("/tmp/x");
        a.server.as_mut().expect("server").storages[0].name = "../x".into();
        assert!(plan(&a, &Existing::default()).unwrap_err().contains("storage name"));
        assert!(serde_yaml::from_str::<Answers>("role: server\nsever: {}\n").is_err(), "unknown keys are errors");
    }
}
