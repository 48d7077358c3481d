//! `nbackup console`: the terminal UI, or one frame of it as text (`--dump`).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use nbackup_tui::console::{self, Options, app::Settings};

use super::ctl::{client_for, err};
use super::runtime;
use crate::cli::ConsoleArgs;
use crate::exit::{Exit, fail};

/// How long `--dump` waits for the first snapshot and the backfill.
const DUMP_WAIT: Duration = Duration::from_secs(5);

pub fn run(args: ConsoleArgs) -> anyhow::Result<ExitCode> {
    let terminal = std::io::stdout().is_terminal() && std::io::stdin().is_terminal();
    if !args.dump && !terminal {
        return Err(fail(
            Exit::Usage,
            anyhow::anyhow!(
                "the console needs a terminal; for scripts use `nbackup ctl --json …`, \
                 or `nbackup console --dump` for one frame as text"
            ),
        ));
    }
    let no_color = args.no_color || std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let settings = Settings {
        readonly: args.readonly,
        color: !no_color,
        tz: console::fmt::local_offset(),
        user: nbackup_daemon::admin::current_user(),
    };
    let options = Options { settings, view: args.view };
    runtime()?.block_on(async move {
        let client = client_for(args.socket.as_deref()).await?;
        // Fail before taking the terminal over when nobody answers or access is denied.
        client.kind().await.map_err(err)?;
        if args.dump {
            let (w, h) = args.size;
            let text = console::dump(client, options, w, h, DUMP_WAIT)
                .await
                .map_err(|e| fail(Exit::Unreachable, anyhow::anyhow!(e)))?;
            print!("{text}");
            return Ok(Exit::Ok.into());
        }
        console::run(client, options).await.map_err(|e| fail(Exit::Failed, e))?;
        Ok(Exit::Ok.into())
    })
}
