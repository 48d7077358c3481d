//! `nbackup backup`: run entries once, report each, exit 0 only if all committed.

use std::process::ExitCode;
use std::sync::Arc;

use indicatif::ProgressBar;
use tokio_util::sync::CancellationToken;

use nbackup_daemon::agent::{self, BackupError, BackupReport, Connector, NoticeKind, Progress};
use nbackup_protocol::config::{AgentConfig, BackupEntry};

use crate::cli::BackupArgs;
use crate::exit::{Exit, fail, for_backup_error};
use crate::logging::{self, Mode};

pub fn run(args: BackupArgs) -> anyhow::Result<ExitCode> {
    let config = super::load_agent_config(&args.config)?;
    let _guard = logging::init(&config.logging, Mode::Command { verbose: args.verbose })?;
    let entries: Vec<BackupEntry> =
        config.select(&args.entries).map_err(|e| fail(Exit::Usage, anyhow::anyhow!(e)))?.into_iter().cloned().collect();
    check_identity(&config)?;
    let connector = Connector::new(&config).map_err(|e| fail(Exit::Usage, e))?;
    let rt = super::runtime()?;
    rt.block_on(async move {
        let cancel = super::shutdown_on_signals();
        let mut codes = Vec::new();
        for entry in &entries {
            if cancel.is_cancelled() {
                codes.push(Exit::Interrupted);
                break;
            }
            let progress = Arc::new(Progress::default());
            let bar = args.progress.then(|| start_bar(entry, &progress));
            let result = agent::run_backup(&connector, &config, entry, progress.clone(), cancel.clone()).await;
            if let Some((bar, ticker)) = bar {
                ticker.cancel();
                bar.finish_and_clear();
            }
            match result {
                Ok(report) => {
                    print_report(&report, args.json);
                    codes.push(Exit::Ok);
                }
                Err(e) => {
                    print_failure(entry, &e, args.json);
                    codes.push(for_backup_error(&e));
                }
            }
        }
        Ok(overall(&codes).into())
    })
}

/// One failure reason for the whole run: the shared one, or plain failure if mixed.
fn overall(codes: &[Exit]) -> Exit {
    let failed: Vec<Exit> = codes.iter().copied().filter(|c| *c != Exit::Ok).collect();
    match failed.first() {
        None => Exit::Ok,
        Some(first) if failed.iter().all(|c| c == first) => *first,
        Some(_) if failed.contains(&Exit::Interrupted) => Exit::Interrupted,
        Some(_) => Exit::Failed,
    }
}

/// Tells the user about a name/certificate mismatch before the server refuses it.
pub(crate) fn check_identity(config: &AgentConfig) -> anyhow::Result<()> {
    let ids = nbackup_daemon::tls::own_identities(&config.tls.cert).map_err(|e| fail(Exit::Usage, e))?;
    if !ids.iter().any(|i| i == config.name.as_str()) {
        return Err(fail(
            Exit::Usage,
            anyhow::anyhow!(
                "agent.name is {:?} but the certificate {} is for {}; the server would refuse it \
                 (issue one with `nbackup cert issue --agent {}`)",
                config.name.as_str(),
                config.tls.cert.display(),
                ids.join(", "),
                config.name.as_str()
            ),
        ));
    }
    Ok(())
}

fn start_bar(entry: &BackupEntry, progress: &Arc<Progress>) -> (ProgressBar, CancellationToken) {
    let p = progress.clone();
    let (bar, ticker) = super::progress_bar(
        None,
        entry.name.to_string(),
        "{prefix:.bold} [{elapsed_precise}] {wide_bar:.cyan/blue} {bytes}/{total_bytes} read · {msg} · ETA {eta}",
        move |b, secs| {
            let s = p.snapshot();
            if let Some((bytes, _)) = s.estimate {
                b.set_length(bytes.max(s.bytes_read));
            }
            b.set_position(s.bytes_read);
            b.set_message(format!(
                "{} sent · {:.1} MB/s · {:.0} files/s",
                super::human_bytes(s.bytes_acked),
                super::mb_per_s(s.bytes_read, secs),
                s.entries as f64 / secs
            ));
        },
    );
    agent::archive::estimate_in_background(
        entry.sources.clone(),
        entry.exclude.clone(),
        progress.clone(),
        ticker.clone(),
    );
    (bar, ticker)
}

fn print_report(r: &BackupReport, json: bool) {
    if json {
        let skipped: Vec<_> = r
            .notices
            .iter()
            .filter(|n| n.kind == NoticeKind::Skipped)
            .map(|n| serde_json::json!({"path": n.path, "reason": n.detail}))
            .collect();
        let warnings: Vec<_> = r
            .notices
            .iter()
            .filter(|n| n.kind != NoticeKind::Skipped)
            .map(|n| serde_json::json!({"path": n.path, "kind": n.kind, "detail": n.detail}))
            .collect();
        let out = serde_json::json!({
            "entry": r.entry,
            "ok": true,
            "archive": r.archive,
            "storage": r.storage,
            "session": r.session,
            "compression": r.compression,
            "bytes_read": r.bytes_read,
            "bytes_sent": r.bytes_sent,
            "bytes_transmitted": r.bytes_transmitted,
            "resent_chunks": r.resent_chunks,
            "files": r.entries,
            "excluded": r.excluded,
            "skipped": skipped,
            "warnings": warnings,
            "sha256": r.sha256,
            "streams": r.streams,
            "streams_final": r.streams_final,
            "scaler_decisions": r.scaler_decisions,
            "seconds": r.seconds,
        });
        println!("{out}");
        return;
    }
    println!("{}: committed {}", r.entry, r.archive);
    let ratio = if r.bytes_sent > 0 { r.bytes_read as f64 / r.bytes_sent as f64 } else { 0.0 };
    println!(
        "  read {} in {} entries, sent {} ({}, {ratio:.2}x) in {:.1}s: {:.1} MB/s",
        super::human_bytes(r.bytes_read),
        r.entries,
        super::human_bytes(r.bytes_sent),
        r.compression,
        r.seconds,
        super::mb_per_s(r.bytes_read, r.seconds)
    );
    if r.excluded > 0 {
        println!("  excluded {} entries by pattern", r.excluded);
    }
    if r.resent_chunks > 0 {
        println!("  resent {} chunks after connection loss", r.resent_chunks);
    }
    if !r.notices.is_empty() {
        println!("  {} skipped, {} stored differently than found:", r.skipped, r.notices.len() as u64 - r.skipped);
        for n in &r.notices {
            let kind = match n.kind {
                NoticeKind::Skipped => "skipped",
                NoticeKind::Truncated => "truncated",
                NoticeKind::Padded => "padded",
                NoticeKind::ReadError => "read error",
            };
            println!("    {kind}: {}: {}", n.path, n.detail);
        }
    }
    println!("  sha256 {}", r.sha256);
}

fn print_failure(entry: &BackupEntry, e: &BackupError, json: bool) {
    if json {
        let reason = e.refusal().map(|r| r.reason.to_string());
        let out = serde_json::json!({
            "entry": entry.name.as_str(),
            "ok": false,
            "error": e.to_string(),
            "reason": reason,
            "retryable": e.is_transient(),
        });
        println!("{out}");
    } else {
        eprintln!("{}: FAILED: {e}", entry.name);
    }
}
