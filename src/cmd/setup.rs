//! `nbackup setup`: the wizard (prompts in `nbackup_tui::wizard`, or an answers
//! file; the plan from `nbackup_protocol::setup`, carried out here), and `setup
//! agent`: enrollment from a token, so a host gets its certificate without its key
//! ever leaving it and without an openssl recipe.

use std::path::Path;
use std::process::ExitCode;

use nbackup_daemon::agent::Connector;
use nbackup_daemon::agent::enroll::{self, EnrollError};
use nbackup_protocol::Name;
use nbackup_protocol::config::{AgentConfig, ServerEndpoint};
use nbackup_protocol::enroll::{CaPin, token_is_well_formed};

use super::runtime;
use crate::cli::{SetupAgentArgs, SetupArgs, SetupCommand};
use crate::exit::{Exit, fail};

pub fn run(args: SetupArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(SetupCommand::Agent(a)) => agent(a),
        None => wizard(args),
    }
}

fn usage(msg: impl std::fmt::Display) -> anyhow::Error {
    fail(Exit::Usage, anyhow::anyhow!("{msg}"))
}

/// The host name up to its first dot.
fn short_hostname() -> Option<String> {
    let full = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    full.trim().split('.').next().filter(|s| !s.is_empty()).map(str::to_string)
}

fn agent(args: SetupAgentArgs) -> anyhow::Result<ExitCode> {
    let pin = CaPin::parse(&args.ca_pin).map_err(|e| usage(format!("--ca-pin: {e}")))?;
    if !token_is_well_formed(&args.token) {
        return Err(usage("--token: not an enrollment token (nbk1- and 64 hex digits); copy it whole"));
    }
    let name = match args.name.clone().or_else(short_hostname) {
        Some(n) => Name::new(n).map_err(|e| usage(format!("agent name: {e}; pass --name")))?,
        None => return Err(usage("cannot read this host's name; pass --name")),
    };
    let endpoint = ServerEndpoint::parse(&args.server, args.server_name.as_deref()).map_err(|e| {
        usage(match e {
            nbackup_protocol::config::EndpointError::Address(m) | nbackup_protocol::config::EndpointError::Name(m) => {
                format!("--server: {m}")
            }
        })
    })?;
    let dir = &args.dir;
    let (ca, crt, key, yaml) =
        (dir.join("ca.crt"), dir.join("agent.crt"), dir.join("agent.key"), dir.join("agent.yaml"));
    for p in [&ca, &crt, &key] {
        if p.exists() && !args.force {
            return Err(usage(format!(
                "{} exists; pass --force to enroll again (replaces key and certificates)",
                p.display()
            )));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| usage(format!("cannot create {}: {e}", dir.display())))?;
    runtime()?.block_on(async {
        enroll_into(&endpoint, &pin, &name, &args.token, dir).await?;

        if yaml.exists() {
            println!("kept the existing {}", yaml.display());
            return Ok(Exit::Ok.into());
        }
        // Prove the chain with the new certificate, and learn the storages.
        let text = agent_yaml(&name, &endpoint, args.server_name.as_deref(), "main", &args.paths, &args.schedule);
        let probe =
            AgentConfig::parse(&text, &yaml).map_err(|e| usage(format!("the agent.yaml this would write: {e}")))?;
        let health = Connector::new(&probe)?
            .health()
            .await
            .map_err(|e| anyhow::anyhow!("enrolled, but the first connection with the new certificate failed: {e}"))?;
        let storage = match &args.storage {
            Some(s) if health.storages.iter().any(|h| h.name.as_str() == s) => s.clone(),
            Some(s) => {
                let names: Vec<&str> = health.storages.iter().map(|h| h.name.as_str()).collect();
                return Err(usage(format!("the server has no storage {s:?}; it has {}", names.join(", "))));
            }
            None => health
                .storages
                .first()
                .map(|h| h.name.to_string())
                .ok_or_else(|| anyhow::anyhow!("the server reports no storages"))?,
        };
        let text = agent_yaml(&name, &endpoint, args.server_name.as_deref(), &storage, &args.paths, &args.schedule);
        AgentConfig::parse(&text, &yaml).map_err(|e| usage(format!("the agent.yaml this would write: {e}")))?;
        nbackup_daemon::fsutil::write_atomic(&yaml, text.as_bytes())?;
        println!(
            "wrote {} (one entry, {storage}, {}); the server answered (version {})",
            yaml.display(),
            args.schedule,
            health.server_version
        );
        println!("next: nbackup backup --config {}   (or start the agent daemon)", yaml.display());
        Ok(Exit::Ok.into())
    })
}

/// Enrolls and writes `ca.crt`, `agent.crt` and `agent.key` (0600) into `dir`.
async fn enroll_into(
    endpoint: &ServerEndpoint,
    pin: &CaPin,
    name: &Name,
    token: &str,
    dir: &Path,
) -> anyhow::Result<()> {
    let creds = enroll::enroll(endpoint, pin, name, token).await.map_err(|e| {
        let code = match &e {
            EnrollError::Connect(nbackup_daemon::agent::ConnectError::Refused(_)) => Exit::Refused,
            EnrollError::Connect(c) if c.is_transient() => Exit::Unreachable,
            _ => Exit::Failed,
        };
        fail(code, e)
    })?;
    let (ca, crt, key) = (dir.join("ca.crt"), dir.join("agent.crt"), dir.join("agent.key"));
    nbackup_daemon::fsutil::write_atomic(&ca, creds.ca_pem.as_bytes())?;
    enroll::write_private(&key, creds.key_pem.as_bytes())?;
    nbackup_daemon::fsutil::write_atomic(&crt, creds.cert_pem.as_bytes())?;
    println!("enrolled {name} with {}: certificate valid until {}", endpoint.address, creds.not_after);
    println!("  {}\n  {}\n  {} (mode 0600; made here, never sent)", ca.display(), crt.display(), key.display());
    Ok(())
}

/// The wizard: answers (asked, or from a file), the plan, the diff, then the steps.
fn wizard(args: SetupArgs) -> anyhow::Result<ExitCode> {
    use nbackup_protocol::setup::{self, Answers, Existing, Layout, Role};
    if args.print_answers {
        print!("{}", setup::ANSWERS_TEMPLATE);
        return Ok(Exit::Ok.into());
    }
    let existing_in = |dir: &Path, role: Option<Role>, agent: Option<&str>| {
        let layout = Layout::new(dir);
        let read = |p: &Path| std::fs::read_to_string(p).ok();
        let pair = |prefix: &Path| prefix.with_extension("crt").exists() && prefix.with_extension("key").exists();
        let agent_cert = match (role, agent) {
            (Some(r), Some(name)) => pair(&Layout::agent_cert(dir, r, name)),
            _ => false,
        };
        Existing {
            server_yaml: read(&layout.server_yaml),
            agent_yaml: read(&layout.agent_yaml),
            ca: pair(&layout.ca),
            server_cert: pair(&layout.server_cert),
            agent_cert,
        }
    };
    let interactive = args.answers.is_none();
    let answers: Answers = match &args.answers {
        Some(file) => {
            let text =
                std::fs::read_to_string(file).map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
            serde_yaml::from_str(&text).map_err(|e| usage(format!("{}: {e}", file.display())))?
        }
        None => {
            use std::io::IsTerminal;
            if !std::io::stdin().is_terminal() {
                return Err(usage("standard input is not a terminal: use --answers FILE (see --print-answers)"));
            }
            let dir = std::path::absolute(&args.dir).unwrap_or_else(|_| args.dir.clone());
            let probe = existing_in(&dir, None, None);
            nbackup_tui::wizard::ask(dir, &probe).map_err(|e| match e {
                nbackup_tui::wizard::WizardError::Cancelled => usage("cancelled; nothing was written"),
                other => fail(Exit::Failed, other),
            })?
        }
    };
    let existing = existing_in(&answers.dir, Some(answers.role), answers.agent.as_ref().map(|a| a.name.as_str()));
    let plan = setup::plan(&answers, &existing).map_err(usage)?;
    show(&plan);
    if args.dry_run {
        println!("\n--dry-run: nothing was changed");
        return Ok(Exit::Ok.into());
    }
    if interactive
        && !inquire::Confirm::new("Do this?").with_default(true).prompt().map_err(|e| fail(Exit::Failed, e))?
    {
        return Err(usage("declined; nothing was written"));
    }
    std::fs::create_dir_all(&answers.dir)
        .map_err(|e| fail(Exit::Failed, anyhow::anyhow!("cannot create {}: {e}", answers.dir.display())))?;
    for step in &plan.steps {
        carry_out(step)?;
    }
    if interactive {
        offer_units(&answers)?;
    }
    if answers.check {
        runtime()?.block_on(check(&answers))?;
    }
    next_steps(&answers);
    Ok(Exit::Ok.into())
}

/// On a host run by systemd with the packaged units, offers to enable and start
/// (or, when running, reload) the daemons just configured.
fn offer_units(a: &nbackup_protocol::setup::Answers) -> anyhow::Result<()> {
    use nbackup_protocol::setup::Role;
    if !Path::new("/run/systemd/system").is_dir() || a.dir != Path::new(nbackup_protocol::setup::DEFAULT_DIR) {
        return Ok(());
    }
    let units: &[&str] = match a.role {
        Role::Server => &["nbackup-server"],
        Role::Agent => &["nbackup-agent"],
        Role::Both => &["nbackup-server", "nbackup-agent"],
    };
    for unit in units {
        if !Path::new("/lib/systemd/system").join(format!("{unit}.service")).exists() {
            continue;
        }
        let active = std::process::Command::new("systemctl")
            .args(["is-active", "--quiet", unit])
            .status()
            .is_ok_and(|s| s.success());
        let (question, args): (String, &[&str]) = if active {
            (format!("{unit} is running: reload it with the new configuration?"), &["reload"])
        } else {
            (format!("Enable {unit} at boot and start it now?"), &["enable", "--now"])
        };
        if inquire::Confirm::new(&question).with_default(true).prompt().map_err(|e| fail(Exit::Failed, e))? {
            let ok = std::process::Command::new("systemctl").args(args).arg(unit).status()?;
            if !ok.success() {
                return Err(fail(
                    Exit::Failed,
                    anyhow::anyhow!("systemctl {} {unit} failed; see journalctl -u {unit}", args.join(" ")),
                ));
            }
        }
    }
    Ok(())
}

/// The closing proof: a tiny tree backed up as the entry `setup-check` with the
/// configs just written, verified by the server and restored over `RSTR`, and the
/// restore compared with the tree. A server this host was set up as but that does
/// not answer yet is started in this process for it (and its storages are then
/// handed to the `nbackup` user when run as root). A server-only host proves with a
/// throwaway agent certificate from its CA, never written to disk.
async fn check(a: &nbackup_protocol::setup::Answers) -> anyhow::Result<()> {
    use nbackup_daemon::agent::fetch::{ArchiveRef, RestoreClient};
    use nbackup_daemon::agent::restore::{self as restore_job, RestoreProgress, RestoreSpec};
    use nbackup_daemon::restore::{self, Overwrite, Selection};
    use nbackup_protocol::setup::{CHECK_ENTRY, Layout, Role};
    let layout = Layout::new(&a.dir);
    let work = tempfile::tempdir()?;
    let agent_cfg = match a.role {
        Role::Server => {
            let server = super::load_server_config(&layout.server_yaml)?;
            let ca = nbackup_daemon::pki::read_pair(&layout.ca)?;
            let pair = nbackup_daemon::pki::issue(&ca, &nbackup_daemon::pki::Leaf::Agent(CHECK_ENTRY.into()), 1)?;
            nbackup_daemon::pki::write_pair(&work.path().join("agent"), &pair, false)?;
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
                q(&std::net::SocketAddr::new(ip, server.listen.port()).to_string()),
                q(&name),
                q(&layout.ca.with_extension("crt").to_string_lossy()),
            );
            AgentConfig::parse(&yaml, &work.path().join("agent.yaml")).map_err(|e| fail(Exit::Failed, e))?
        }
        _ => super::load_agent_config(&layout.agent_yaml)?,
    };
    let src = work.path().join("setup-check");
    std::fs::create_dir_all(src.join("dir"))?;
    std::fs::write(src.join("dir/proof.txt"), format!("nbackup setup check, {}\n", chrono::Utc::now().to_rfc3339()))?;
    let mut entry = agent_cfg.backups[0].clone();
    entry.name = Name::new(CHECK_ENTRY).map_err(|e| anyhow::anyhow!("{e}"))?;
    entry.sources = vec![src.clone()];
    entry.exclude = nbackup_protocol::config::Excludes::none();
    entry.parallels = 1;
    entry.restore_test = None;
    let connector = Connector::new(&agent_cfg)?;
    // A server set up here but not running yet: run it for the proof.
    let mut local = None;
    if a.role != Role::Agent && connector.health().await.is_err() {
        let cfg = super::load_server_config(&layout.server_yaml)?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| fail(Exit::Failed, anyhow::anyhow!("cannot listen on {} for the check: {e}", cfg.listen)))?;
        let dirs: Vec<std::path::PathBuf> = cfg.storages.values().map(|s| s.base_dir.clone()).collect();
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(nbackup_daemon::server::run(cfg, listener, stop.clone()));
        local = Some((stop, task, dirs));
        println!("check: started the server here for the check");
    }
    let outcome = async {
        let progress = std::sync::Arc::new(nbackup_daemon::agent::Progress::default());
        let report = nbackup_daemon::agent::run_backup(&connector, &agent_cfg, &entry, progress, Default::default())
            .await
            .map_err(|e| fail(crate::exit::for_backup_error(&e), anyhow::anyhow!("check: the backup failed: {e}")))?;
        let client = RestoreClient::new(connector.clone(), agent_cfg.name.clone(), agent_cfg.retry);
        let which =
            ArchiveRef { storage: entry.storage.clone(), backup: entry.name.clone(), archive: report.archive.clone() };
        let verdict = client.verify(&which).await?;
        if verdict.verdict != nbackup_protocol::restore::Verdict::Good {
            return Err(fail(
                Exit::Mismatch,
                anyhow::anyhow!("check: the server could not verify it: {}", verdict.detail),
            ));
        }
        let listed = client.list(&entry.storage, Some(&entry.name)).await?;
        let remote = listed
            .iter()
            .find(|r| r.archive == report.archive)
            .ok_or_else(|| anyhow::anyhow!("check: the server does not list {}", report.archive))?;
        let dest = work.path().join("restored");
        let spec = RestoreSpec {
            which,
            compression: remote.compression,
            size: remote.size,
            dest: dest.clone(),
            selection: Selection::all(),
            overwrite: Overwrite::Never,
            dry_run: false,
        };
        let done = restore_job::restore(
            &client,
            spec,
            None,
            std::sync::Arc::new(RestoreProgress::default()),
            Box::new(|_| {}),
            &Default::default(),
        )
        .await?;
        let diffs =
            restore::compare_trees(std::slice::from_ref(&src), &entry.exclude, &dest, restore::running_as_root(), 5)?;
        if done.verified() != Some(true) || !diffs.is_empty() {
            return Err(fail(Exit::Failed, anyhow::anyhow!("check: the restore differs: {}", diffs.join("; "))));
        }
        println!(
            "check: backed up {} as {CHECK_ENTRY}, verified by the server, restored and compared: the chain works",
            report.archive
        );
        Ok(())
    }
    .await;
    if let Some((stop, task, dirs)) = local {
        stop.cancel();
        let _ = task.await;
        hand_to_server_user(&dirs);
    }
    outcome
}

/// After a check run as root, storages the in-process server created belong to the
/// packaged server's user, so `nbackup-server` can write them.
fn hand_to_server_user(dirs: &[std::path::PathBuf]) {
    fn chown_tree(p: &Path, uid: u32, gid: u32) {
        let _ = std::os::unix::fs::lchown(p, Some(uid), Some(gid));
        if p.is_dir() && !p.is_symlink() {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                chown_tree(&e.path(), uid, gid);
            }
        }
    }
    if !nbackup_daemon::restore::running_as_root() {
        return;
    }
    let (Some(uid), Some(gid)) =
        (nbackup_daemon::admin::user_id("nbackup"), nbackup_daemon::admin::group_id("nbackup"))
    else {
        return;
    };
    for d in dirs {
        chown_tree(d, uid, gid);
    }
}

/// What the plan will do, with a diff for each file it changes.
fn show(plan: &nbackup_protocol::setup::Plan) {
    use nbackup_protocol::setup::Step;
    println!("The plan:");
    for step in &plan.steps {
        match step {
            Step::CreateCa { prefix } => println!("  create a CA: {}.crt, {}.key", prefix.display(), prefix.display()),
            Step::IssueServer { names, prefix, .. } => {
                println!("  issue the server certificate for {}: {}.crt", names.join(", "), prefix.display());
            }
            Step::IssueAgent { name, prefix, .. } => {
                println!("  issue the agent certificate for {name}: {}.crt", prefix.display());
            }
            Step::Enroll { server, agent, .. } => println!("  enroll {agent} with {server} (token and pinned CA)"),
            Step::Write { path, text, previous: None } => {
                println!("  write {} ({} lines)", path.display(), text.lines().count());
            }
            Step::Write { path, text, previous: Some(old) } if old == text => {
                println!("  {} is unchanged", path.display())
            }
            Step::Write { path, text, previous: Some(old) } => {
                println!("  change {}:", path.display());
                let diff = similar::TextDiff::from_lines(old.as_str(), text.as_str());
                for line in diff.unified_diff().context_radius(2).to_string().lines() {
                    println!("    {line}");
                }
            }
        }
    }
}

fn carry_out(step: &nbackup_protocol::setup::Step) -> anyhow::Result<()> {
    use nbackup_daemon::pki::{self, Leaf};
    use nbackup_protocol::setup::Step;
    let failed = |e: pki::PkiError| fail(Exit::Failed, e);
    match step {
        Step::CreateCa { prefix } => {
            let ca = pki::new_ca("nbackup CA", 3650).map_err(failed)?;
            pki::write_pair(prefix, &ca, false).map_err(failed)?;
            share_key_with_server(prefix)?;
            println!("created the CA {}.crt (pin {})", prefix.display(), pki::ca_pin(&ca.cert_pem).map_err(failed)?);
        }
        Step::IssueServer { ca, names, prefix } => {
            let ca = pki::read_pair(ca).map_err(failed)?;
            let pair = pki::issue(&ca, &Leaf::Server(names.clone()), 825).map_err(failed)?;
            pki::write_pair(prefix, &pair, false).map_err(failed)?;
            share_key_with_server(prefix)?;
            println!("issued {}.crt for {}", prefix.display(), names.join(", "));
        }
        Step::IssueAgent { ca, name, prefix } => {
            let ca = pki::read_pair(ca).map_err(failed)?;
            let pair = pki::issue(&ca, &Leaf::Agent(name.clone()), 825).map_err(failed)?;
            pki::write_pair(prefix, &pair, false).map_err(failed)?;
            println!("issued {}.crt for agent {name}", prefix.display());
        }
        Step::Enroll { server, token, ca_pin, agent, dir } => {
            let endpoint = ServerEndpoint::parse(server, None).map_err(|e| usage(format!("agent.server: {e:?}")))?;
            let pin = CaPin::parse(ca_pin).map_err(|e| usage(format!("agent.enroll.ca_pin: {e}")))?;
            let name = Name::new(agent.as_str()).map_err(|e| usage(format!("agent.name: {e}")))?;
            runtime()?.block_on(enroll_into(&endpoint, &pin, &name, token, dir))?;
        }
        Step::Write { path, text, previous } => {
            if previous.as_deref() == Some(text.as_str()) {
                return Ok(());
            }
            nbackup_daemon::fsutil::write_atomic(path, text.as_bytes())
                .map_err(|e| fail(Exit::Failed, anyhow::anyhow!("cannot write {}: {e}", path.display())))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// The packaged server runs as the `nbackup` user: when run as root on a host with
/// that group, the keys the server reads (its own, and the CA's for enrollment)
/// become root:nbackup 0640 instead of root-only.
fn share_key_with_server(prefix: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let key = prefix.with_extension("key");
    let root = std::fs::metadata(&key).map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false);
    let Some(gid) = nbackup_daemon::admin::group_id("nbackup").filter(|_| root) else { return Ok(()) };
    std::os::unix::fs::chown(&key, None, Some(gid))
        .and_then(|()| std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)))
        .map_err(|e| fail(Exit::Failed, anyhow::anyhow!("cannot give the nbackup group {}: {e}", key.display())))?;
    println!("  {} is readable by the nbackup group (the server's user)", key.display());
    Ok(())
}

fn next_steps(a: &nbackup_protocol::setup::Answers) {
    use nbackup_protocol::setup::Role;
    let layout = nbackup_protocol::setup::Layout::new(&a.dir);
    println!();
    if a.role != Role::Agent {
        println!(
            "next: systemctl enable --now nbackup-server   (or: nbackup server --config {})",
            layout.server_yaml.display()
        );
        if a.server.as_ref().is_some_and(|s| s.enrollment) {
            println!(
                "      nbackup cert token --config {} --agent NAME   for each agent",
                layout.server_yaml.display()
            );
        }
    }
    if a.role != Role::Server {
        println!(
            "next: systemctl enable --now nbackup-agent    (or: nbackup backup --config {})",
            layout.agent_yaml.display()
        );
    }
}

/// A JSON string is a YAML double-quoted scalar: any path or name survives.
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

fn agent_yaml(
    name: &Name,
    endpoint: &ServerEndpoint,
    server_name: Option<&str>,
    storage: &str,
    paths: &[std::path::PathBuf],
    schedule: &str,
) -> String {
    let sources: String = paths.iter().map(|p| format!("      - path: {}\n", q(&p.to_string_lossy()))).collect();
    let server_name = server_name.map(|n| format!("  server_name: {}\n", q(n))).unwrap_or_default();
    format!(
        "# Written by `nbackup setup agent`. Every key: /etc/nbackup/agent.example.yaml.\n\
         # After editing: `nbackup ctl reload` (or SIGHUP) on a running agent daemon.\n\
         agent:\n  name: {name}\n\
         server:\n  address: {address}\n{server_name}\
         tls:\n  ca_cert: ca.crt\n  client_cert: agent.crt\n  client_key: agent.key\n\
         \x20 # The agent renews its certificate on its own this long before it ends.\n  renew_before: 30d\n\
         backups:\n  - name: {entry}\n    storage: {storage}\n    schedule: {schedule}\n    sources:\n{sources}",
        name = q(name.as_str()),
        address = q(&endpoint.address),
        entry = q(&entry_name(paths)),
        storage = q(storage),
        schedule = q(schedule),
    )
}

/// `etc` for `/etc`, `data` for several paths.
fn entry_name(paths: &[std::path::PathBuf]) -> String {
    match paths {
        [one] => one
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| Name::new(n).ok())
            .map_or_else(|| "data".to_string(), |n| n.to_string()),
        _ => "data".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_written_config_loads_with_hostile_looking_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoint = ServerEndpoint::parse("[::1]:9847", None).expect("endpoint");
        let paths = vec![Path::new("/srv/a \"quoted\": dir").to_path_buf()];
        let text = agent_yaml(
            &Name::new("web-02").expect("name"),
            &endpoint,
            Some("backup.example"),
            "main",
            &paths,
            "0 2 * * *",
        );
        let cfg = AgentConfig::parse(&text, &dir.path().join("agent.yaml")).expect("loads");
        assert_eq!(cfg.server.server_name, "backup.example");
        assert_eq!(cfg.backups[0].name.as_str(), "data");
        assert_eq!(cfg.tls.key, dir.path().join("agent.key"));
        assert_eq!(entry_name(&[Path::new("/etc").to_path_buf()]), "etc");
    }
}
