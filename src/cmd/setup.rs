//! `nbackup setup`: the wizard (prompts in `nbackup_tui::wizard`, or an answers
//! file; the plan from `nbackup_protocol::setup`, carried out here), and `setup
//! agent`: enrollment from a token, so a host gets its certificate without its key
//! ever leaving it and without an openssl recipe.

use std::path::Path;
use std::process::ExitCode;

use nbackup_daemon::agent::Connector;
use nbackup_daemon::agent::enroll::EnrollError;
use nbackup_daemon::setup::yaml_string;
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

/// Prints what a setup step did, as it happens.
fn say(line: String) {
    println!("{line}");
}

/// A setup step's failure as an error carrying its exit code.
fn setup_error(e: nbackup_daemon::setup::SetupError) -> anyhow::Error {
    use nbackup_daemon::setup::SetupError;
    let code = match &e {
        SetupError::Invalid(_) => Exit::Usage,
        SetupError::Enroll(EnrollError::Connect(nbackup_daemon::agent::ConnectError::Refused(_))) => Exit::Refused,
        SetupError::Enroll(EnrollError::Connect(c)) if c.is_transient() => Exit::Unreachable,
        SetupError::Backup(b) => crate::exit::for_backup_error(b),
        SetupError::Mismatch(_) => Exit::Mismatch,
        SetupError::Enroll(_) | SetupError::Failed(_) => Exit::Failed,
    };
    fail(code, e)
}

fn usage(msg: impl std::fmt::Display) -> anyhow::Error {
    fail(Exit::Usage, anyhow::anyhow!("{msg}"))
}

fn agent(args: SetupAgentArgs) -> anyhow::Result<ExitCode> {
    let pin = CaPin::parse(&args.ca_pin).map_err(|e| usage(format!("--ca-pin: {e}")))?;
    if !token_is_well_formed(&args.token) {
        return Err(usage("--token: not an enrollment token (nbk1- and 64 hex digits); copy it whole"));
    }
    let name = match args.name.clone().or_else(nbackup_tui::wizard::short_hostname) {
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
        nbackup_daemon::setup::enroll_into(&endpoint, &pin, &name, &args.token, dir, &mut say)
            .await
            .map_err(setup_error)?;

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
    let rt = runtime()?;
    rt.block_on(async {
        for step in &plan.steps {
            nbackup_daemon::setup::carry_out(step, &mut say).await?;
        }
        Ok::<_, nbackup_daemon::setup::SetupError>(())
    })
    .map_err(setup_error)?;
    if interactive {
        offer_units(&answers)?;
    }
    if answers.check {
        rt.block_on(nbackup_daemon::setup::check(&answers, &mut say)).map_err(setup_error)?;
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
fn agent_yaml(
    name: &Name,
    endpoint: &ServerEndpoint,
    server_name: Option<&str>,
    storage: &str,
    paths: &[std::path::PathBuf],
    schedule: &str,
) -> String {
    let sources: String =
        paths.iter().map(|p| format!("      - path: {}\n", yaml_string(&p.to_string_lossy()))).collect();
    let server_name = server_name.map(|n| format!("  server_name: {}\n", yaml_string(n))).unwrap_or_default();
    format!(
        "# Written by `nbackup setup agent`. Every key: /etc/nbackup/agent.example.yaml.\n\
         # After editing: `nbackup ctl reload` (or SIGHUP) on a running agent daemon.\n\
         agent:\n  name: {name}\n\
         server:\n  address: {address}\n{server_name}\
         tls:\n  ca_cert: ca.crt\n  client_cert: agent.crt\n  client_key: agent.key\n\
         \x20 # The agent renews its certificate on its own this long before it ends.\n  renew_before: 30d\n\
         backups:\n  - name: {entry}\n    storage: {storage}\n    schedule: {schedule}\n    sources:\n{sources}",
        name = yaml_string(name.as_str()),
        address = yaml_string(&endpoint.address),
        entry = yaml_string(&entry_name(paths)),
        storage = yaml_string(storage),
        schedule = yaml_string(schedule),
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
