//! `nbackup server`: the server in the foreground, with its admin API.

use std::process::ExitCode;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::cli::ServerArgs;
use crate::exit::Exit;
use crate::logging::{self, Mode};

pub fn run(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let config = super::load_server_config(&args.config)?;
    let _guard = logging::init(&config.logging, Mode::Daemon)?;
    super::runtime()?.block_on(async move {
        let listener =
            TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
        let shutdown = super::shutdown_on_signals();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if ready_rx.await.is_ok() {
                super::notify_ready();
            }
        });
        let options = nbackup_daemon::server::Options {
            config_path: Some(args.config.clone()),
            admin: !args.no_admin,
            persist_state: true,
            reload: Some(super::reload_on_sighup()),
            ready: Some(ready_tx),
        };
        nbackup_daemon::server::run_with(config, listener, shutdown, options).await?;
        Ok(Exit::Ok.into())
    })
}
