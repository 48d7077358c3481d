//! `nbackup cert init-ca|issue|token|list|revoke|renew`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nbackup_daemon::pki::{self, CertInfo, Leaf, PkiError};
use nbackup_protocol::Name;
use nbackup_protocol::admin::{CertRecord, RevokeRequest, TokenRequest};
use nbackup_protocol::config::{Admin, HumanDuration};
use nbackup_tui::client::AdminClient;

use super::ctl::{err, print_json, table};
use super::{load_agent_config, load_server_config, runtime};
use crate::cli::CertCommand;
use crate::exit::{Exit, fail};

fn usage(e: PkiError) -> anyhow::Error {
    match e {
        PkiError::Exists(_) | PkiError::Invalid(_) => fail(Exit::Usage, e),
        other => anyhow::Error::new(other),
    }
}

pub fn run(cmd: CertCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CertCommand::InitCa { out, name, days, force } => {
            let ca = pki::new_ca(&name, days).map_err(usage)?;
            let (crt, key) = pki::write_pair(&out.join("ca"), &ca, force).map_err(usage)?;
            println!("CA certificate: {}", crt.display());
            println!("CA private key: {} (mode 0600; keep it offline if you can)", key.display());
            println!("pin for enrollment: {}", pki::ca_pin(&ca.cert_pem).map_err(usage)?);
        }
        CertCommand::Issue { ca, server, agent, out, days, force } => {
            let ca_pair = pki::read_pair(&ca.join("ca")).map_err(usage)?;
            let leaf = match agent {
                Some(name) => Leaf::Agent(name),
                None => Leaf::Server(server),
            };
            let pair = pki::issue(&ca_pair, &leaf, days).map_err(usage)?;
            let (crt, key) = pki::write_pair(&out, &pair, force).map_err(usage)?;
            match &leaf {
                Leaf::Agent(name) => println!("agent certificate for {name}: {}", crt.display()),
                Leaf::Server(names) => println!("server certificate for {}: {}", names.join(", "), crt.display()),
            }
            println!("private key: {} (mode 0600)", key.display());
        }
        CertCommand::Token { config, agent, ttl, address, json } => token(&config, agent, ttl, address, json)?,
        CertCommand::List { config, files, json } => list(config.as_deref(), &files, json)?,
        CertCommand::Revoke { config, agent, serial, cert } => revoke(&config, agent, serial, cert)?,
        CertCommand::Renew { config } => return renew(&config),
    }
    Ok(Exit::Ok.into())
}

fn admin_client(admin: &Admin, daemon: &str) -> AdminClient {
    AdminClient::new(admin.socket.clone().unwrap_or_else(|| nbackup_daemon::admin::default_socket(daemon)))
}

fn token(config: &Path, agent: String, ttl: Option<String>, address: Option<String>, json: bool) -> anyhow::Result<()> {
    let cfg = load_server_config(config)?;
    if cfg.enrollment.is_none() {
        return Err(fail(
            Exit::Usage,
            anyhow::anyhow!(
                "{} has no `enrollment` section: add `enrollment: {{ca_key: /etc/nbackup/ca.key}}` and reload the server",
                config.display()
            ),
        ));
    }
    let agent = Name::new(agent).map_err(|e| fail(Exit::Usage, anyhow::anyhow!("invalid agent name: {e}")))?;
    let ttl_secs = ttl
        .map(|t| HumanDuration::parse(&t).map(|d| d.0.as_secs()))
        .transpose()
        .map_err(|e| fail(Exit::Usage, anyhow::anyhow!("--ttl: {e}")))?;
    let client = admin_client(&cfg.admin, "server");
    let issued = runtime()?.block_on(client.mint_token(&TokenRequest { agent, ttl_secs, address })).map_err(err)?;
    if json {
        print_json(&issued);
    } else {
        println!("token for {} (single use, until {}); on the agent's host run:\n", issued.agent, issued.expires_at);
        println!("  {}\n", issued.command);
    }
    Ok(())
}

fn date(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0).map(|d| d.format("%Y-%m-%d").to_string()).unwrap_or_default()
}

fn when(unix: Option<i64>) -> String {
    let Some(t) = unix else { return "-".into() };
    let date = date(t);
    let days = (t - nbackup_daemon::state::unix_now() as i64).div_euclid(86_400);
    match days {
        d if d < 0 => format!("{date} (expired)"),
        d => format!("{date} ({d} days)"),
    }
}

#[derive(serde::Serialize)]
struct Listed {
    file: PathBuf,
    label: String,
    subject: String,
    names: Vec<String>,
    serial: String,
    issuer: String,
    not_before: i64,
    not_after: i64,
    is_ca: bool,
}

fn describe(label: &str, path: &Path) -> anyhow::Result<Vec<Listed>> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| fail(Exit::Usage, anyhow::anyhow!("cannot read {}: {e}", path.display())))?;
    let infos = pki::describe_pem(&pem).map_err(|e| fail(Exit::Usage, anyhow::anyhow!("{}: {e}", path.display())))?;
    Ok(infos
        .into_iter()
        .map(|i: CertInfo| Listed {
            file: path.to_path_buf(),
            label: label.to_string(),
            subject: i.subject,
            names: i.names,
            serial: i.serial,
            issuer: i.issuer,
            not_before: i.not_before,
            not_after: i.not_after,
            is_ca: i.is_ca,
        })
        .collect())
}

fn list(config: Option<&Path>, files: &[PathBuf], json: bool) -> anyhow::Result<()> {
    let mut own = Vec::new();
    let mut ledger: Option<Result<Vec<CertRecord>, String>> = None;
    if let Some(path) = config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail(Exit::Usage, anyhow::anyhow!("cannot read {}: {e}", path.display())))?;
        let is_server =
            serde_yaml::from_str::<serde_yaml::Value>(&text).ok().and_then(|v| v.get("storages").map(|_| ())).is_some();
        if is_server {
            let cfg = load_server_config(path)?;
            own.extend(describe("server", &cfg.tls.cert)?);
            own.extend(describe("ca", &cfg.tls.ca_cert)?);
            let client = admin_client(&cfg.admin, "server");
            ledger = Some(runtime()?.block_on(client.certificates()).map_err(|e| e.to_string()));
        } else {
            let cfg = load_agent_config(path)?;
            own.extend(describe("agent", &cfg.tls.cert)?);
            own.extend(describe("ca", &cfg.tls.ca_cert)?);
        }
    }
    for f in files {
        own.extend(describe("file", f)?);
    }
    if own.is_empty() {
        return Err(fail(Exit::Usage, anyhow::anyhow!("name a config (--config) or certificate files")));
    }
    if json {
        let ledger = match &ledger {
            Some(Ok(v)) => serde_json::to_value(v).unwrap_or_default(),
            _ => serde_json::Value::Null,
        };
        print_json(&serde_json::json!({ "certificates": own, "issued": ledger }));
        return Ok(());
    }
    let rows = own
        .iter()
        .map(|c| {
            let names = if c.names.is_empty() { "-".into() } else { c.names.join(",") };
            vec![c.label.clone(), c.subject.clone(), names, c.serial.clone(), when(Some(c.not_after))]
        })
        .collect();
    table(&["CERT", "SUBJECT", "NAMES", "SERIAL", "EXPIRES"], rows);
    match ledger {
        None => {}
        Some(Err(e)) => println!("\nissued by this server: not available ({e})"),
        Some(Ok(records)) => {
            println!("\nissued by this server:");
            let rows = records
                .iter()
                .map(|r| {
                    vec![
                        r.agent.clone().unwrap_or_else(|| "-".into()),
                        r.serial.clone(),
                        r.origin.to_string(),
                        when(r.not_after),
                        r.revoked_at.map_or_else(|| "no".into(), |t| format!("yes ({})", date(t))),
                    ]
                })
                .collect();
            table(&["AGENT", "SERIAL", "ORIGIN", "EXPIRES", "REVOKED"], rows);
        }
    }
    Ok(())
}

fn revoke(config: &Path, agent: Option<String>, serial: Option<String>, cert: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = load_server_config(config)?;
    let agent =
        agent.map(Name::new).transpose().map_err(|e| fail(Exit::Usage, anyhow::anyhow!("invalid agent name: {e}")))?;
    let (serial, not_after) = match (serial, cert) {
        (Some(s), _) => (Some(s), None),
        (None, Some(path)) => {
            let c = describe("file", &path)?.remove(0);
            (Some(c.serial), Some(c.not_after))
        }
        (None, None) => (None, None),
    };
    let client = admin_client(&cfg.admin, "server");
    let answer = runtime()?.block_on(client.revoke(&RevokeRequest { agent, serial, not_after })).map_err(err)?;
    println!("{}", answer.message);
    Ok(())
}

fn renew(config: &Path) -> anyhow::Result<ExitCode> {
    let cfg = load_agent_config(config)?;
    runtime()?.block_on(async {
        let connector = nbackup_daemon::agent::Connector::new(&cfg).map_err(|e| fail(Exit::Usage, e))?;
        let creds = nbackup_daemon::agent::enroll::renew(&connector, &cfg.tls, &cfg.name).await.map_err(|e| {
            use nbackup_daemon::agent::enroll::EnrollError;
            let code = match &e {
                EnrollError::Connect(c) if c.is_transient() => Exit::Unreachable,
                EnrollError::Connect(nbackup_daemon::agent::ConnectError::Refused(_)) => Exit::Refused,
                _ => Exit::Failed,
            };
            fail(code, e)
        })?;
        nbackup_daemon::agent::enroll::install(&cfg.tls, &creds)
            .map_err(|e| anyhow::anyhow!("cannot install the new certificate: {e}"))?;
        println!("certificate renewed: {} (valid until {})", cfg.tls.cert.display(), creds.not_after);
        // A running agent daemon switches to the new pair on reload.
        match admin_client(&cfg.admin, "agent").reload().await {
            Ok(_) => println!("the agent daemon reloaded and uses it"),
            Err(_) => println!("no agent daemon answered on its admin socket; it uses the new pair when it starts"),
        }
        Ok(Exit::Ok.into())
    })
}
