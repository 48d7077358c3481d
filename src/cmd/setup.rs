//! `nbackup setup agent`: enrollment from a token, so a host gets its certificate
//! without its key ever leaving it and without an openssl recipe.

use std::process::ExitCode;

use nbackup_daemon::agent::Connector;
use nbackup_daemon::agent::enroll::{self, EnrollError};
use nbackup_protocol::Name;
use nbackup_protocol::config::{AgentConfig, ServerEndpoint};
use nbackup_protocol::enroll::{CaPin, token_is_well_formed};

use super::runtime;
use crate::cli::{SetupAgentArgs, SetupCommand};
use crate::exit::{Exit, fail};

pub fn run(cmd: SetupCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SetupCommand::Agent(args) => agent(args),
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
        let creds = enroll::enroll(&endpoint, &pin, &name, &args.token).await.map_err(|e| {
            let code = match &e {
                EnrollError::Connect(nbackup_daemon::agent::ConnectError::Refused(_)) => Exit::Refused,
                EnrollError::Connect(c) if c.is_transient() => Exit::Unreachable,
                _ => Exit::Failed,
            };
            fail(code, e)
        })?;
        nbackup_daemon::fsutil::write_atomic(&ca, creds.ca_pem.as_bytes())?;
        enroll::write_private(&key, creds.key_pem.as_bytes())?;
        nbackup_daemon::fsutil::write_atomic(&crt, creds.cert_pem.as_bytes())?;
        println!("enrolled {name} with {}: certificate valid until {}", endpoint.address, creds.not_after);
        println!("  {}\n  {}\n  {} (mode 0600; made here, never sent)", ca.display(), crt.display(), key.display());

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
        "# Written by `nbackup setup agent`. Reference: docs/configuration.md.\n\
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
