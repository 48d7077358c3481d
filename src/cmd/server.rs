//! `nbackup server`: the server in the foreground.

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
        nbackup_daemon::server::run(config, listener, shutdown).await?;
        Ok(Exit::Ok.into())
    })
}
