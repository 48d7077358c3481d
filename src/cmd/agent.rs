//! `nbackup agent`: the agent daemon in the foreground.

use std::process::ExitCode;
use std::sync::Arc;

use nbackup_daemon::agent::daemon::{self, Options, SystemClock};
use nbackup_daemon::daemon::DaemonOptions;

use crate::cli::AgentArgs;
use crate::exit::{Exit, fail};
use crate::logging::{self, Mode};

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let config = super::load_agent_config(&args.config)?;
    let _guard = logging::init(&config.logging, Mode::Daemon)?;
    super::runtime()?.block_on(async move {
        let shutdown = super::shutdown_on_signals();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if ready_rx.await.is_ok() {
                super::notify_ready();
            }
        });
        let options = Options {
            daemon: DaemonOptions {
                config_path: Some(args.config.clone()),
                admin: !args.no_admin,
                persist_state: true,
                reload: Some(super::reload_on_sighup()),
                ready: Some(ready_tx),
            },
            clock: Arc::new(SystemClock),
        };
        daemon::run(config, shutdown, options).await.map_err(|e| fail(Exit::Failed, e))?;
        Ok(Exit::Ok.into())
    })
}
