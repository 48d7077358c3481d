//! `nbackup health`: one-shot server status.

use std::process::ExitCode;

use nbackup_daemon::agent::Connector;

use crate::cli::HealthArgs;
use crate::exit::{Exit, fail, for_connect_error};
use crate::logging::{self, Mode};

pub fn run(args: HealthArgs) -> anyhow::Result<ExitCode> {
    let config = super::load_agent_config(&args.config)?;
    let _guard = logging::init(&config.logging, Mode::Command { verbose: 0 })?;
    let connector = Connector::new(&config).map_err(|e| fail(Exit::Usage, e))?;
    let health = super::runtime()?.block_on(connector.health()).map_err(|e| fail(for_connect_error(&e), e))?;
    if args.json {
        let storages: Vec<_> = health
            .storages
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name.as_str(),
                    "compression": s.compression,
                    "free_bytes": s.free_bytes,
                    "total_bytes": s.total_bytes,
                })
            })
            .collect();
        let out = serde_json::json!({
            "server": connector.address(),
            "version": health.server_version,
            "uptime_secs": health.uptime_secs,
            "draining": health.draining,
            "active_sessions": health.active_sessions,
            "storages": storages,
        });
        println!("{out}");
    } else {
        let state = if health.draining { "shutting down" } else { "ok" };
        println!("server {}: {state}", connector.address());
        println!(
            "  version {}, up {}s, {} active session(s)",
            health.server_version, health.uptime_secs, health.active_sessions
        );
        for s in &health.storages {
            let pct = if s.total_bytes > 0 { 100.0 * s.free_bytes as f64 / s.total_bytes as f64 } else { 0.0 };
            println!(
                "  storage {:<16} {:<5} {} free of {} ({pct:.0}%)",
                s.name.as_str(),
                s.compression.to_string(),
                super::human_bytes(s.free_bytes),
                super::human_bytes(s.total_bytes)
            );
        }
    }
    Ok(if health.draining { Exit::Failed } else { Exit::Ok }.into())
}
