//! `nbackup list`, `ls`, `restore` and `verify`: an agent reading its own archives
//! back over its own certificate (`RSTR`).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::anyhow;
use indicatif::ProgressBar;
use tokio_util::sync::CancellationToken;

use nbackup_daemon::agent::fetch::{ArchiveRef, FetchError, RestoreClient};
use nbackup_daemon::agent::restore::{
    self as job, Catalog, OnEntry, Read, RestoreError, RestoreOutcome, RestoreProgress, RestoreSpec,
};
use nbackup_daemon::agent::{ConnectError, Connector};
use nbackup_daemon::restore::{Action, ExtractReport, Overwrite, Planned, Selection};
use nbackup_protocol::config::{AgentConfig, BackupEntry};
use nbackup_protocol::restore::{At, CatalogEntry, RemoteArchive, Verdict};

use crate::cli::{ArchiveArgs, ListArgs, LsArgs, OverwriteArg, RestoreArgs, VerifyArgs};
use crate::exit::{Exit, fail, for_connect_error};
use crate::logging::{self, Mode};
use tracing_appender::non_blocking::WorkerGuard;

struct Agent {
    config: AgentConfig,
    client: RestoreClient,
}

fn agent(path: &std::path::Path, verbose: u8) -> anyhow::Result<(Agent, Option<WorkerGuard>)> {
    let config = super::load_agent_config(path)?;
    let guard = logging::init(&config.logging, Mode::Command { verbose })?;
    super::backup::check_identity(&config)?;
    let connector = Connector::new(&config).map_err(|e| fail(Exit::Usage, e))?;
    let client = RestoreClient::new(connector, config.name.clone(), config.retry);
    Ok((Agent { config, client }, guard))
}

fn entry<'a>(config: &'a AgentConfig, name: &str) -> anyhow::Result<&'a BackupEntry> {
    let found = config.select(&[name.to_owned()]).map_err(|e| fail(Exit::Usage, anyhow!(e)))?;
    Ok(found[0])
}

fn connect_failure(e: ConnectError) -> anyhow::Error {
    fail(for_connect_error(&e), e)
}

fn fetch_failure(e: FetchError) -> anyhow::Error {
    match e {
        FetchError::Connect(c) => connect_failure(c),
        FetchError::Cancelled => fail(Exit::Interrupted, anyhow!("interrupted")),
        e @ FetchError::GaveUp { .. } => fail(Exit::Unreachable, e),
    }
}

fn restore_failure(e: RestoreError) -> anyhow::Error {
    match e {
        RestoreError::Fetch(f) => fetch_failure(f),
        e @ RestoreError::Extract(_) => fail(Exit::Mismatch, e),
        e @ RestoreError::Task(_) => fail(Exit::Failed, e),
    }
}

/// The archive `args` names, with its entry's storage.
async fn choose(agent: &Agent, args: &ArchiveArgs) -> anyhow::Result<(ArchiveRef, RemoteArchive)> {
    let entry = entry(&agent.config, &args.entry)?;
    let at = At::parse(&args.at).map_err(|e| fail(Exit::Usage, anyhow!("--at: {e}")))?;
    let archives = agent.client.list(&entry.storage, Some(&entry.name)).await.map_err(connect_failure)?;
    let Some(chosen) = at.choose(&archives).cloned() else {
        let what = if archives.is_empty() {
            format!("entry {} has no archives on the server (storage {})", entry.name, entry.storage)
        } else {
            format!(
                "no archive of {} matches --at {}; `nbackup list --entry {}` shows the {} there are",
                entry.name,
                args.at,
                entry.name,
                archives.len()
            )
        };
        return Err(fail(Exit::Refused, anyhow!(what)));
    };
    let which =
        ArchiveRef { storage: entry.storage.clone(), backup: entry.name.clone(), archive: chosen.archive.clone() };
    Ok((which, chosen))
}

/// The archive's catalog; `None` when it has none, or when it cannot be read (said
/// on standard error: the archive itself still restores, only without a plan).
async fn catalog(
    agent: &Agent,
    chosen: &RemoteArchive,
    which: &ArchiveRef,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<Catalog>> {
    match job::catalog(&agent.client, chosen, &which.storage, cancel).await {
        Ok(c) => Ok(c),
        Err(e @ RestoreError::Extract(_)) => {
            eprintln!("warning: {e}; going by the archive itself");
            Ok(None)
        }
        Err(RestoreError::Fetch(FetchError::Connect(ConnectError::Refused(r))))
            if r.reason == nbackup_protocol::wire::Reason::NotFound =>
        {
            eprintln!(
                "warning: the catalog of {} is gone from the server; going by the archive itself",
                chosen.archive
            );
            Ok(None)
        }
        Err(e) => Err(restore_failure(e)),
    }
}

pub fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let (agent, _guard) = agent(&args.config, 0)?;
    let entries: Vec<&BackupEntry> = match &args.entry {
        Some(e) => vec![entry(&agent.config, e)?],
        None => agent.config.backups.iter().collect(),
    };
    super::runtime()?.block_on(async {
        let mut rows: Vec<(String, RemoteArchive)> = Vec::new();
        // Each storage once, all its entries of this agent (also ones no longer in
        // the config), unless one entry was asked for.
        let mut storages: Vec<&nbackup_protocol::Name> = entries.iter().map(|e| &e.storage).collect();
        storages.sort();
        storages.dedup();
        for storage in storages {
            let backup = args.entry.as_ref().map(|_| &entries[0].name);
            let archives = agent.client.list(storage, backup).await.map_err(connect_failure)?;
            rows.extend(archives.into_iter().map(|a| (storage.to_string(), a)));
        }
        if args.json {
            let out: Vec<_> = rows
                .iter()
                .map(|(storage, a)| {
                    let mut v = serde_json::to_value(a).expect("serializable");
                    v["storage"] = serde_json::Value::String(storage.clone());
                    v
                })
                .collect();
            println!("{}", serde_json::Value::Array(out));
            return Ok(Exit::Ok.into());
        }
        if rows.is_empty() {
            eprintln!("no archives of agent {} on the server", agent.config.name);
            return Ok(Exit::Ok.into());
        }
        println!(
            "{:<12} {:<10} {:<44} {:<20} {:>10} {:>8}  {:<7}  WHERE",
            "ENTRY", "STORAGE", "ARCHIVE", "FINISHED", "SIZE", "FILES", "CATALOG"
        );
        for (storage, a) in &rows {
            println!(
                "{:<12} {:<10} {:<44} {:<20} {:>10} {:>8}  {:<7}  {}",
                a.backup.as_str(),
                storage,
                a.archive,
                a.finished_at.as_deref().unwrap_or("-").replace('T', " ").trim_end_matches('Z'),
                super::human_bytes(a.size),
                a.entries.map_or("-".into(), |n| n.to_string()),
                if a.catalog.is_some() { "yes" } else { "no" },
                a.bucket.as_ref().map_or_else(|| "disk".to_string(), |b| format!("bucket {b}"))
            );
        }
        Ok(Exit::Ok.into())
    })
}

pub fn ls(args: LsArgs) -> anyhow::Result<ExitCode> {
    let (agent, _guard) = agent(&args.archive.config, 0)?;
    let selection = Selection::new(&args.paths).map_err(|e| fail(Exit::Usage, anyhow!(e)))?;
    super::runtime()?.block_on(async {
        let cancel = super::shutdown_on_signals();
        let (which, chosen) = choose(&agent, &args.archive).await?;
        let members = match catalog(&agent, &chosen, &which, &cancel).await? {
            Some(c) => c.entries,
            None => {
                eprintln!(
                    "{} has no catalog; reading the archive itself ({})",
                    chosen.archive,
                    super::human_bytes(chosen.size)
                );
                job::members_from_archive(&agent.client, &which, chosen.compression, &cancel)
                    .await
                    .map_err(restore_failure)?
            }
        };
        let shown: Vec<&CatalogEntry> = members.iter().filter(|m| selection.matches(&m.path)).collect();
        if args.json {
            println!("{}", serde_json::to_string(&shown).expect("serializable"));
        } else {
            for m in &shown {
                println!("{}", ls_line(m));
            }
            eprintln!("{} of {} members in {}", shown.len(), members.len(), chosen.archive);
        }
        Ok(if shown.is_empty() && !selection.is_all() { Exit::NoneRestored } else { Exit::Ok }.into())
    })
}

/// `ls -l`-like: type and mode, numeric owner, size, mtime (UTC), path, link.
fn ls_line(m: &CatalogEntry) -> String {
    let mut mode = String::with_capacity(10);
    mode.push(m.kind.letter());
    for shift in [6u32, 3, 0] {
        let bits = (m.mode >> shift) & 7;
        mode.push(if bits & 4 != 0 { 'r' } else { '-' });
        mode.push(if bits & 2 != 0 { 'w' } else { '-' });
        mode.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    let when = chrono::DateTime::from_timestamp(m.mtime, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| m.mtime.to_string());
    let link = match (&m.link, m.kind) {
        (Some(l), nbackup_protocol::restore::EntryKind::HardLink) => format!(" link to {l}"),
        (Some(l), _) => format!(" -> {l}"),
        (None, _) => String::new(),
    };
    format!("{mode} {:>5}/{:<5} {:>12} {when} {}{link}", m.uid, m.gid, m.size, m.path)
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let (agent, _guard) = agent(&args.archive.config, args.verbose)?;
    let selection = Selection::new(&args.paths).map_err(|e| fail(Exit::Usage, anyhow!(e)))?;
    let overwrite = match args.overwrite {
        OverwriteArg::Never => Overwrite::Never,
        OverwriteArg::Older => Overwrite::Older,
        OverwriteArg::Always => Overwrite::Always,
    };
    let dest = std::path::absolute(&args.to).map_err(|e| fail(Exit::Usage, anyhow!("--to: {e}")))?;
    super::runtime()?.block_on(async {
        let cancel = super::shutdown_on_signals();
        let (which, chosen) = choose(&agent, &args.archive).await?;
        let spec = RestoreSpec {
            which: which.clone(),
            compression: chosen.compression,
            size: chosen.size,
            dest: dest.clone(),
            selection,
            overwrite,
            dry_run: args.dry_run,
        };
        let (json, dry) = (args.json, args.dry_run);
        let planned = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = planned.clone();
        let mut on_entry: OnEntry = Box::new(move |p: &Planned| {
            if dry && !json {
                println!("{}", plan_line(p));
            } else if !p.action.restored() && !json {
                eprintln!("not restored: {}", plan_line(p));
            }
            if json && (dry || !p.action.restored()) {
                sink.lock().expect("not poisoned").push(p.clone());
            }
        });
        let catalog = catalog(&agent, &chosen, &which, &cancel).await?.map(Arc::new);
        if let Some(members) = catalog.as_deref().map(|c| &c.entries) {
            if args.dry_run {
                let report = job::plan_from_catalog(&spec, members, &mut on_entry);
                let outcome =
                    RestoreOutcome { archive: chosen.archive.clone(), report, read: None, dry_run: true, seconds: 0.0 };
                return finish(&outcome, &planned, json, &dest);
            }
            let (count, bytes) = members
                .iter()
                .filter(|m| spec.selection.matches(&m.path))
                .fold((0u64, 0u64), |(n, b), m| (n + 1, b + m.size));
            if count == 0 {
                return Err(fail(
                    Exit::NoneRestored,
                    anyhow!("no member of {} matches {:?}", chosen.archive, args.paths),
                ));
            }
            if !json {
                eprintln!(
                    "restoring {count} of {} members ({}) from {} into {}",
                    members.len(),
                    super::human_bytes(bytes),
                    chosen.archive,
                    dest.display()
                );
            }
        }
        let progress = Arc::new(RestoreProgress::default());
        let bar = args.progress.then(|| start_bar(&chosen, &progress));
        let result = job::restore(&agent.client, spec, catalog, progress.clone(), on_entry, &cancel).await;
        if let Some((bar, ticker)) = bar {
            ticker.cancel();
            bar.finish_and_clear();
        }
        let outcome = result.map_err(restore_failure)?;
        finish(&outcome, &planned, json, &dest)
    })
}

fn plan_line(p: &Planned) -> String {
    let what = match &p.action {
        Action::Create => "create".to_string(),
        Action::Merge => "merge".to_string(),
        Action::Replace => "replace".to_string(),
        Action::Keep => "keep (exists)".to_string(),
        Action::Refuse(why) => format!("refuse ({why})"),
        Action::Fail(why) => format!("fail ({why})"),
    };
    format!("{what:<14} {} {}", p.kind.letter(), p.path)
}

/// Prints the outcome and turns it into the exit code.
fn finish(
    outcome: &RestoreOutcome,
    planned: &std::sync::Mutex<Vec<Planned>>,
    json: bool,
    dest: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let r: &ExtractReport = &outcome.report;
    let code = if outcome.verified() == Some(false) {
        Exit::Mismatch
    } else if r.restored == 0 {
        Exit::NoneRestored
    } else if r.kept + r.refused + r.failed > 0 {
        Exit::Partial
    } else {
        Exit::Ok
    };
    if json {
        let mut v = serde_json::json!({
            "archive": outcome.archive,
            "destination": dest.display().to_string(),
            "report": r,
            "verified": outcome.verified(),
            "resumed": outcome.resumed(),
            "dry_run": outcome.dry_run,
            "seconds": outcome.seconds,
            "exit": code as u8,
            "members": &*planned.lock().expect("not poisoned"),
        });
        if let Some(f) = outcome.fetched() {
            v["sha256"] = serde_json::Value::String(f.sha256.clone());
            v["size"] = serde_json::Value::from(f.size);
        }
        if outcome.read.is_some() {
            v["fetched_bytes"] = serde_json::Value::from(outcome.bytes_fetched());
        }
        if let Some(Read::Extents(x)) = &outcome.read {
            v["ranges"] = serde_json::Value::from(x.extents);
            v["size"] = serde_json::Value::from(x.of);
        }
        println!("{v}");
        return Ok(code.into());
    }
    let verb = if outcome.dry_run { "would restore" } else { "restored" };
    let mut line = format!(
        "{verb} {} of {} selected members ({}) into {}",
        r.restored,
        r.selected,
        super::human_bytes(r.bytes),
        dest.display()
    );
    if r.kept > 0 {
        line += &format!("; {} kept (exist; --overwrite older|always replaces them)", r.kept);
    }
    if r.refused + r.failed > 0 {
        line += &format!("; {} refused, {} failed", r.refused, r.failed);
    }
    if let Some(read) = &outcome.read {
        line += &format!(
            "; {} in {:.1} s ({:.1} MB/s)",
            super::human_bytes(outcome.bytes_fetched()),
            outcome.seconds,
            super::mb_per_s(r.bytes, outcome.seconds)
        );
        if let Read::Extents(x) = read {
            line += &format!(" — {} range(s) of the {} archive", x.extents, super::human_bytes(x.of));
        }
        if outcome.resumed() > 0 {
            line += &format!(", resumed {} time(s)", outcome.resumed());
        }
    }
    println!("{line}");
    match &outcome.read {
        Some(Read::Whole(f)) if f.verified() => println!("sha256 {} matches the manifest", f.sha256),
        Some(Read::Whole(f)) => eprintln!(
            "error: the archive's sha256 {} differs from the manifest's ({}); the restored files must not be trusted",
            f.sha256,
            f.expected.as_deref().unwrap_or("none")
        ),
        Some(Read::Extents(_)) => println!("every block read passed its checksum (gzip CRC-32 / zstd XXH64)"),
        None => {}
    }
    for p in &r.problems {
        eprintln!("  {p}");
    }
    Ok(code.into())
}

fn start_bar(archive: &RemoteArchive, progress: &Arc<RestoreProgress>) -> (ProgressBar, CancellationToken) {
    let p = progress.clone();
    super::progress_bar(
        Some(archive.size),
        archive.backup.to_string(),
        "{prefix:.bold} [{elapsed_precise}] {wide_bar:.cyan/blue} {bytes}/{total_bytes} fetched · {msg} · ETA {eta}",
        move |b, secs| {
            let written = p.written.bytes.load(std::sync::atomic::Ordering::Relaxed);
            let files = p.written.members.load(std::sync::atomic::Ordering::Relaxed);
            b.set_position(p.received.load(std::sync::atomic::Ordering::Relaxed));
            b.set_message(format!(
                "{} in {files} files written · {:.1} MB/s · {:.0} files/s",
                super::human_bytes(written),
                super::mb_per_s(written, secs),
                files as f64 / secs
            ));
        },
    )
}

pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let (agent, _guard) = agent(&args.archive.config, 0)?;
    super::runtime()?.block_on(async {
        let (which, chosen) = choose(&agent, &args.archive).await?;
        let v = agent.client.verify(&which).await.map_err(connect_failure)?;
        let mut code = match v.verdict {
            Verdict::Good => Exit::Ok,
            Verdict::Corrupt => Exit::Mismatch,
            Verdict::Unverified => Exit::Failed,
        };
        if !args.json {
            if v.verdict == Verdict::Good {
                println!("{}", v.detail);
            } else {
                eprintln!("error: {}", v.detail);
            }
        }
        let mut test = None;
        if let (Some(files), Exit::Ok) = (args.restore_test, code) {
            let cancel = super::shutdown_on_signals();
            let report =
                job::restore_test(&agent.client, &which.storage, &chosen, files, &std::env::temp_dir(), &cancel)
                    .await
                    .map_err(restore_failure)?;
            if !report.ok() {
                code = Exit::Mismatch;
            }
            if !args.json {
                let line = report.summary();
                if report.ok() { println!("{line}") } else { eprintln!("error: {line}") }
            }
            test = Some(report);
        }
        if args.json {
            let mut out = serde_json::to_value(&v).expect("serializable");
            if let Some(t) = test {
                out["restore_test"] = serde_json::to_value(t).expect("serializable");
            }
            println!("{out}");
        }
        Ok(code.into())
    })
}
