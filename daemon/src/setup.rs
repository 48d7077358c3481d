//! Carrying out a `nbackup setup` plan (`protocol::setup`): certificates, an
//! enrollment, config files, and the closing check — a tiny backup verified by the
//! server and restored. What each step did is told to `say` as it happens; the
//! caller decides where that goes (the terminal, for `nbackup setup`).

use std::path::{Path, PathBuf};

use nbackup_protocol::Name;
use nbackup_protocol::config::{AgentConfig, ServerConfig, ServerEndpoint};
use nbackup_protocol::enroll::CaPin;
use nbackup_protocol::setup::{Answers, CHECK_ENTRY, Layout, Role, Step};

use crate::agent::enroll::{self, EnrollError};
use crate::agent::{BackupError, Connector};
use crate::pki::{self, Leaf};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// An answer or a config cannot work; nothing further was done.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    #[error("check: the backup failed: {0}")]
    Backup(#[source] BackupError),
    /// The check's archive does not verify or restore as it was.
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Failed(String),
}

fn failed(e: impl std::fmt::Display) -> SetupError {
    SetupError::Failed(e.to_string())
}

/// Enrolls `name` and writes `ca.crt`, `agent.crt` and `agent.key` (0600) into `dir`.
pub async fn enroll_into(
    endpoint: &ServerEndpoint,
    pin: &CaPin,
    name: &Name,
    token: &str,
    dir: &Path,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<(), SetupError> {
    let creds = enroll::enroll(endpoint, pin, name, token).await?;
    let (ca, crt, key) = (dir.join("ca.crt"), dir.join("agent.crt"), dir.join("agent.key"));
    crate::fsutil::write_atomic(&ca, creds.ca_pem.as_bytes()).map_err(failed)?;
    enroll::write_private(&key, creds.key_pem.as_bytes()).map_err(failed)?;
    crate::fsutil::write_atomic(&crt, creds.cert_pem.as_bytes()).map_err(failed)?;
    say(format!("enrolled {name} with {}: certificate valid until {}", endpoint.address, creds.not_after));
    say(format!("  {}\n  {}\n  {} (mode 0600; made here, never sent)", ca.display(), crt.display(), key.display()));
    Ok(())
}

/// One step of a plan.
pub async fn carry_out(step: &Step, say: &mut (dyn FnMut(String) + Send)) -> Result<(), SetupError> {
    match step {
        Step::CreateCa { prefix } => {
            let ca = pki::new_ca("nbackup CA", 3650).map_err(failed)?;
            pki::write_pair(prefix, &ca, false).map_err(failed)?;
            share_key_with_server(prefix, say)?;
            let pin = pki::ca_pin(&ca.cert_pem).map_err(failed)?;
            say(format!("created the CA {}.crt (pin {pin})", prefix.display()));
        }
        Step::IssueServer { ca, names, prefix } => {
            let ca = pki::read_pair(ca).map_err(failed)?;
            let pair = pki::issue(&ca, &Leaf::Server(names.clone()), 825).map_err(failed)?;
            pki::write_pair(prefix, &pair, false).map_err(failed)?;
            share_key_with_server(prefix, say)?;
            say(format!("issued {}.crt for {}", prefix.display(), names.join(", ")));
        }
        Step::IssueAgent { ca, name, prefix } => {
            let ca = pki::read_pair(ca).map_err(failed)?;
            let pair = pki::issue(&ca, &Leaf::Agent(name.clone()), 825).map_err(failed)?;
            pki::write_pair(prefix, &pair, false).map_err(failed)?;
            say(format!("issued {}.crt for agent {name}", prefix.display()));
        }
        Step::Enroll { server, token, ca_pin, agent, dir } => {
            let endpoint =
                ServerEndpoint::parse(server, None).map_err(|e| SetupError::Invalid(format!("agent.server: {e:?}")))?;
            let pin = CaPin::parse(ca_pin).map_err(|e| SetupError::Invalid(format!("agent.enroll.ca_pin: {e}")))?;
            let name = Name::new(agent.as_str()).map_err(|e| SetupError::Invalid(format!("agent.name: {e}")))?;
            enroll_into(&endpoint, &pin, &name, token, dir, say).await?;
        }
        Step::Write { path, text, previous } => {
            if previous.as_deref() == Some(text.as_str()) {
                return Ok(());
            }
            crate::fsutil::write_atomic(path, text.as_bytes())
                .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
            say(format!("wrote {}", path.display()));
        }
    }
    Ok(())
}

/// The packaged server runs as the `nbackup` user: when run as root on a host with
/// that group, the keys the server reads (its own, and the CA's for enrollment)
/// become root:nbackup 0640 instead of root-only.
fn share_key_with_server(prefix: &Path, say: &mut (dyn FnMut(String) + Send)) -> Result<(), SetupError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let key = prefix.with_extension("key");
    let root = std::fs::metadata(&key).is_ok_and(|m| m.uid() == 0);
    let Some(gid) = crate::admin::group_id("nbackup").filter(|_| root) else { return Ok(()) };
    std::os::unix::fs::chown(&key, None, Some(gid))
        .and_then(|()| std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)))
        .map_err(|e| failed(format!("cannot give the nbackup group {}: {e}", key.display())))?;
    say(format!("  {} is readable by the nbackup group (the server's user)", key.display()));
    Ok(())
}

fn load<T>(
    path: &Path,
    parse: fn(&str, &Path) -> Result<T, nbackup_protocol::config::ConfigError>,
) -> Result<T, SetupError> {
    let text = std::fs::read_to_string(path).map_err(|e| failed(format!("cannot read {}: {e}", path.display())))?;
    parse(&text, path).map_err(|e| SetupError::Invalid(e.to_string()))
}

/// A JSON string is a YAML double-quoted scalar: any path or name survives.
pub fn yaml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// The closing check: a tiny tree backed up as the entry `setup-check` with the
/// configs just written, verified by the server and restored over `RSTR`, and the
/// restore compared with the tree. A server this host was set up as but that does
/// not answer yet is started in this process for it (and its storages are then
/// handed to the `nbackup` user when run as root). A server-only host checks with a
/// throwaway agent certificate from its CA, never written beside the configs.
pub async fn check(a: &Answers, say: &mut (dyn FnMut(String) + Send)) -> Result<(), SetupError> {
    let layout = Layout::new(&a.dir);
    let work = tempfile::tempdir().map_err(failed)?;
    let agent_cfg = match a.role {
        Role::Server => {
            let server = load(&layout.server_yaml, ServerConfig::parse)?;
            let ca = pki::read_pair(&layout.ca).map_err(failed)?;
            let pair = pki::issue(&ca, &Leaf::Agent(CHECK_ENTRY.into()), 1).map_err(failed)?;
            pki::write_pair(&work.path().join("agent"), &pair, false).map_err(failed)?;
            let storage = server.storages.keys().next().map(|n| n.to_string()).unwrap_or_default();
            // Dial this host, verifying the name agents use.
            let name = a.server.as_ref().map(|s| s.names[0].clone()).unwrap_or_default();
            let ip = match server.listen.ip() {
                std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
                ip => ip,
            };
            let yaml = format!(
                "agent:\n  name: {CHECK_ENTRY}\nserver:\n  address: {}\n  server_name: {}\n\
                 tls:\n  ca_cert: {}\n  client_cert: agent.crt\n  client_key: agent.key\n\
                 backups:\n  - name: {CHECK_ENTRY}\n    storage: {storage}\n    sources:\n      - path: /\n",
                yaml_string(&std::net::SocketAddr::new(ip, server.listen.port()).to_string()),
                yaml_string(&name),
                yaml_string(&layout.ca.with_extension("crt").to_string_lossy()),
            );
            AgentConfig::parse(&yaml, &work.path().join("agent.yaml")).map_err(failed)?
        }
        _ => load(&layout.agent_yaml, AgentConfig::parse)?,
    };
    let src = work.path().join(CHECK_ENTRY);
    std::fs::create_dir_all(src.join("dir")).map_err(failed)?;
    let proof = format!("nbackup setup check, {}\n", chrono::Utc::now().to_rfc3339());
    std::fs::write(src.join("dir/proof.txt"), proof).map_err(failed)?;
    let mut entry = agent_cfg.backups[0].clone();
    entry.name = Name::new(CHECK_ENTRY).map_err(failed)?;
    entry.sources = vec![src.clone()];
    entry.exclude = nbackup_protocol::config::Excludes::none();
    entry.parallels = 1;
    entry.restore_test = None;
    let connector = Connector::new(&agent_cfg).map_err(failed)?;
    // A server set up here but not running yet: run it for the check.
    let mut local = None;
    if a.role != Role::Agent && connector.health().await.is_err() {
        let cfg = load(&layout.server_yaml, ServerConfig::parse)?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| failed(format!("cannot listen on {} for the check: {e}", cfg.listen)))?;
        let dirs: Vec<PathBuf> = cfg.storages.values().map(|s| s.base_dir.clone()).collect();
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(crate::server::run(cfg, listener, stop.clone()));
        local = Some((stop, task, dirs));
        say("check: started the server here for the check".into());
    }
    let outcome = round_trip(&connector, &agent_cfg, &entry, &src, work.path()).await;
    if let Some((stop, task, dirs)) = local {
        stop.cancel();
        let _ = task.await;
        hand_to_server_user(&dirs);
    }
    let archive = outcome?;
    say(format!(
        "check: backed up {archive} as {CHECK_ENTRY}, verified by the server, restored and compared: the chain works"
    ));
    Ok(())
}

/// Backs `entry` up, has the server verify the archive, restores it into `work`
/// and compares it with `src`. Returns the archive's name.
async fn round_trip(
    connector: &Connector,
    agent_cfg: &AgentConfig,
    entry: &nbackup_protocol::config::BackupEntry,
    src: &Path,
    work: &Path,
) -> Result<String, SetupError> {
    use crate::agent::fetch::{ArchiveRef, RestoreClient};
    use crate::agent::restore::{self as restore_job, RestoreProgress, RestoreSpec};
    use crate::restore;
    let progress = std::sync::Arc::new(crate::agent::Progress::default());
    let report = crate::agent::run_backup(connector, agent_cfg, entry, progress, Default::default())
        .await
        .map_err(SetupError::Backup)?;
    let client = RestoreClient::new(connector.clone(), agent_cfg.name.clone(), agent_cfg.retry);
    let which =
        ArchiveRef { storage: entry.storage.clone(), backup: entry.name.clone(), archive: report.archive.clone() };
    let verdict = client.verify(&which).await.map_err(failed)?;
    if verdict.verdict != nbackup_protocol::restore::Verdict::Good {
        return Err(SetupError::Mismatch(format!("check: the server could not verify it: {}", verdict.detail)));
    }
    let listed = client.list(&entry.storage, Some(&entry.name)).await.map_err(failed)?;
    let remote = listed
        .iter()
        .find(|r| r.archive == report.archive)
        .ok_or_else(|| failed(format!("check: the server does not list {}", report.archive)))?;
    let dest = work.join("restored");
    let spec = RestoreSpec::everything(which, remote.compression, remote.size, dest.clone());
    let progress = std::sync::Arc::new(RestoreProgress::default());
    let done = restore_job::restore(&client, spec, None, progress, Box::new(|_| {}), &Default::default())
        .await
        .map_err(failed)?;
    let diffs = restore::compare_trees(
        std::slice::from_ref(&src.to_path_buf()),
        &entry.exclude,
        &dest,
        restore::running_as_root(),
        5,
    )
    .map_err(failed)?;
    if done.verified() != Some(true) || !diffs.is_empty() {
        return Err(SetupError::Mismatch(format!("check: the restore differs: {}", diffs.join("; "))));
    }
    Ok(report.archive)
}

/// After a check run as root, storages the in-process server created belong to the
/// packaged server's user, so `nbackup-server` can write them.
fn hand_to_server_user(dirs: &[PathBuf]) {
    fn chown_tree(p: &Path, uid: u32, gid: u32) {
        let _ = std::os::unix::fs::lchown(p, Some(uid), Some(gid));
        if p.is_dir() && !p.is_symlink() {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                chown_tree(&e.path(), uid, gid);
            }
        }
    }
    if !crate::restore::running_as_root() {
        return;
    }
    let (Some(uid), Some(gid)) = (crate::admin::user_id("nbackup"), crate::admin::group_id("nbackup")) else {
        return;
    };
    for d in dirs {
        chown_tree(d, uid, gid);
    }
}
