//! `nbackup completions` and the hidden `nbackup man`: generated from the same clap
//! definition as the parser; the checked-in copies are kept fresh by a test.

use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs, ManArgs};
use crate::exit::Exit;

pub fn completions(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    clap_complete::generate(args.shell, &mut Cli::command(), "nbackup", &mut std::io::stdout());
    Ok(Exit::Ok.into())
}

pub fn man(args: ManArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
    let cmd = Cli::command();
    write_page(&args.dir, "nbackup", cmd.clone())?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("nbackup-{}", sub.get_name());
        write_page(&args.dir, &name, sub.clone().name(name.clone()))?;
        for subsub in sub.get_subcommands() {
            let name = format!("nbackup-{}-{}", sub.get_name(), subsub.get_name());
            write_page(&args.dir, &name, subsub.clone().name(name.clone()))?;
        }
    }
    Ok(Exit::Ok.into())
}

fn write_page(dir: &std::path::Path, name: &str, cmd: clap::Command) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut buf)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))
}
