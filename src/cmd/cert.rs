//! `nbackup cert init-ca|issue`.

use std::process::ExitCode;

use nbackup_daemon::pki::{self, Leaf, PkiError};

use crate::cli::CertCommand;
use crate::exit::{Exit, fail};

pub fn run(cmd: CertCommand) -> anyhow::Result<ExitCode> {
    let usage = |e: PkiError| match e {
        PkiError::Exists(_) | PkiError::Invalid(_) => fail(Exit::Usage, e),
        other => anyhow::Error::new(other),
    };
    match cmd {
        CertCommand::InitCa { out, name, days, force } => {
            let ca = pki::new_ca(&name, days).map_err(usage)?;
            let (crt, key) = pki::write_pair(&out.join("ca"), &ca, force).map_err(usage)?;
            println!("CA certificate: {}", crt.display());
            println!("CA private key: {} (mode 0600; keep it offline if you can)", key.display());
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
    }
    Ok(Exit::Ok.into())
}
