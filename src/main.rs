//! `nbackup`: the command line. Parses arguments, dispatches to one module per
//! subcommand, and turns the outcome into a stable exit code. All behaviour lives in
//! the `nbackup-daemon` and `nbackup-protocol` crates.

mod cli;
mod cmd;
mod exit;
mod logging;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};
use exit::{Exit, ExitError};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Cert(c) => cmd::cert::run(c),
        Command::Setup(c) => cmd::setup::run(c),
        Command::Server(a) => cmd::server::run(a),
        Command::Agent(a) => cmd::agent::run(a),
        Command::Backup(a) => cmd::backup::run(a),
        Command::Health(a) => cmd::health::run(a),
        Command::List(a) => cmd::restore::list(a),
        Command::Ls(a) => cmd::restore::ls(a),
        Command::Restore(a) => cmd::restore::restore(a),
        Command::Verify(a) => cmd::restore::verify(a),
        Command::Ctl(a) => cmd::ctl::run(a),
        Command::Console(a) => cmd::console::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Completions(a) => cmd::docs::completions(a),
        Command::Man(a) => cmd::docs::man(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let code = match e.downcast_ref::<ExitError>() {
                Some(x) => x.code,
                None if e.downcast_ref::<nbackup_protocol::config::ConfigError>().is_some() => Exit::Usage,
                None => Exit::Failed,
            };
            eprintln!("error: {e:#}");
            code.into()
        }
    }
}
