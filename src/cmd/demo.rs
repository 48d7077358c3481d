//! `nbackup demo [PATH]`: the whole system on loopback in one command.
//!
//! Creates a throwaway CA, server and agent certificates, writes real config files
//! and loads them through the same validation as `nbackup server`/`backup`, starts the
//! server in-process on 127.0.0.1, backs up PATH (or a generated sample tree), checks
//! the stored archive against its manifest by hand and has the server re-read it,
//! restores it over `RSTR` as `nbackup restore` does, and compares the restore with
//! the source, metadata included.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use nbackup_daemon::agent::fetch::{ArchiveRef, RestoreClient};
use nbackup_daemon::agent::restore::{self as restore_job, RestoreProgress, RestoreSpec};
use nbackup_daemon::agent::{self, Connector, Progress};
use nbackup_daemon::pki::{self, Leaf};
use nbackup_daemon::restore;
use nbackup_protocol::config::{Excludes, Logging};
use nbackup_protocol::manifest::Manifest;
use nbackup_protocol::wire::Compression;

use super::{human_bytes, mb_per_s};
use crate::cli::{DemoArgs, DemoCompression};
use crate::exit::{Exit, fail, for_backup_error};
use crate::logging::{self, Mode};

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let _guard = logging::init(&Logging::default(), Mode::Command { verbose: 0 })?;
    let temp;
    let work = match &args.keep {
        Some(dir) => {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            if fs::read_dir(dir)?.next().is_some() {
                return Err(fail(Exit::Usage, anyhow::anyhow!("--keep {} must be an empty directory", dir.display())));
            }
            dir.canonicalize()?
        }
        None => {
            temp = tempfile::Builder::new().prefix("nbackup-demo-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let compression = match args.compression {
        DemoCompression::Gzip => Compression::Gzip,
        DemoCompression::Zstd => Compression::Zstd,
    };
    println!("nbackup demo: throwaway PKI, server and agent on 127.0.0.1");
    println!("  workdir   {}", work.display());
    let source = match &args.path {
        Some(p) => {
            let p = p.canonicalize().with_context(|| format!("cannot open {}", p.display()))?;
            println!("  source    {}", p.display());
            p
        }
        None => {
            let dir = work.join("source");
            let (files, bytes) = make_sample(&dir).context("cannot generate the sample tree")?;
            println!("  source    {} (generated: {files} entries, {})", dir.display(), human_bytes(bytes));
            dir
        }
    };
    let outcome = super::runtime()?.block_on(demo(&work, &source, compression, args.parallels))?;
    if args.keep.is_some() {
        println!("kept everything in {}", work.display());
    }
    Ok(outcome.into())
}

async fn demo(work: &Path, source: &Path, compression: Compression, parallels: u16) -> anyhow::Result<Exit> {
    // PKI: a CA, a server certificate for 127.0.0.1, an agent certificate.
    let t = Instant::now();
    let pki_dir = work.join("pki");
    let ca = pki::new_ca("nbackup demo CA", 1)?;
    pki::write_pair(&pki_dir.join("ca"), &ca, false)?;
    let server_pair = pki::issue(&ca, &Leaf::Server(vec!["127.0.0.1".into(), "localhost".into()]), 1)?;
    pki::write_pair(&pki_dir.join("server"), &server_pair, false)?;
    let agent_pair = pki::issue(&ca, &Leaf::Agent("demo-agent".into()), 1)?;
    pki::write_pair(&pki_dir.join("demo-agent"), &agent_pair, false)?;
    println!("  pki       CA, server (127.0.0.1) and agent demo-agent certificates, ECDSA P-256 ({:.0} ms)", ms(t));

    // Real config files, loaded through the same validation as the daemons.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server_yaml = work.join("server.yaml");
    fs::write(
        &server_yaml,
        format!(
            "server:\n  listen: \"{addr}\"\ntls:\n  ca_cert: pki/ca.crt\n  server_cert: pki/server.crt\n  server_key: pki/server.key\n\
             storages:\n  demo:\n    base_dir: storage\n    max_backups: 3\n    compression: {compression}\n"
        ),
    )?;
    let agent_yaml = work.join("agent.yaml");
    let src = source.display().to_string().replace('"', "\\\"");
    fs::write(
        &agent_yaml,
        format!(
            "agent:\n  name: demo-agent\nserver:\n  address: \"{addr}\"\ntls:\n  ca_cert: pki/ca.crt\n  client_cert: pki/demo-agent.crt\n  client_key: pki/demo-agent.key\n\
             backups:\n  - name: sample\n    storage: demo\n    parallels: {parallels}\n    sources:\n      - path: \"{src}\"\n\
             resume:\n  buffer_size: {}mb\n",
            64.max(u32::from(parallels) * 4)
        ),
    )?;
    let server_cfg = super::load_server_config(&server_yaml)?;
    let agent_cfg = super::load_agent_config(&agent_yaml)?;
    let storage_dir = server_cfg.storages.values().next().map(|s| s.base_dir.clone()).context("demo storage")?;
    let level = server_cfg.storages.values().next().map_or(0, |s| s.level);
    println!("  server    {addr}, storage demo ({compression} level {level}), {parallels} stream(s)");

    let shutdown = CancellationToken::new();
    let server = tokio::spawn(nbackup_daemon::server::run(server_cfg, listener, shutdown.clone()));

    // Backup.
    let connector = Connector::new(&agent_cfg)?;
    let entry = agent_cfg.backups[0].clone();
    let progress = Arc::new(Progress::default());
    let result = agent::run_backup(&connector, &agent_cfg, &entry, progress, CancellationToken::new()).await;
    let outcome = match result {
        Ok(report) => check_and_restore(work, source, &storage_dir, &agent_cfg, &connector, report).await,
        Err(e) => {
            eprintln!("backup    FAILED: {e}");
            Ok(for_backup_error(&e))
        }
    };
    shutdown.cancel();
    server.await.context("server task")??;
    outcome
}

/// Verifies the committed archive (by hand and by the server), restores it over
/// `RSTR` as `nbackup restore` does, and compares the result with the source.
async fn check_and_restore(
    work: &Path,
    source: &Path,
    storage_dir: &Path,
    agent_cfg: &nbackup_protocol::config::AgentConfig,
    connector: &Connector,
    report: agent::BackupReport,
) -> anyhow::Result<Exit> {
    let ratio = report.bytes_read as f64 / report.bytes_sent.max(1) as f64;
    println!(
        "backup    committed {}: {} read, {} stored ({ratio:.2}x) in {:.2}s, {:.1} MB/s of source data",
        report.archive,
        human_bytes(report.bytes_read),
        human_bytes(report.bytes_sent),
        report.seconds,
        mb_per_s(report.bytes_read, report.seconds)
    );
    for n in &report.notices {
        println!("          note: {}: {}", n.path, n.detail);
    }

    // Verify the stored archive against its manifest, independently of the server.
    let t = Instant::now();
    let archive = storage_dir.join("demo-agent").join("sample").join(&report.archive);
    let manifest_path = nbackup_daemon::server::storage::sidecar_path(&archive);
    let manifest = Manifest::from_json(&fs::read_to_string(&manifest_path)?)
        .with_context(|| format!("bad manifest {}", manifest_path.display()))?;
    if let Err(e) = restore::verify_against_manifest(&archive, &manifest)? {
        eprintln!("verify    FAILED: {e}");
        return Ok(Exit::Failed);
    }
    println!("verify    sha256 {}… and size match the manifest ({:.0} ms)", &manifest.sha256[..16], ms(t));
    let client = RestoreClient::new(connector.clone(), agent_cfg.name.clone(), agent_cfg.retry);
    let entry = &agent_cfg.backups[0];
    let which =
        ArchiveRef { storage: entry.storage.clone(), backup: entry.name.clone(), archive: report.archive.clone() };
    let t = Instant::now();
    let verdict = client.verify(&which).await?;
    if verdict.verdict != nbackup_protocol::restore::Verdict::Good {
        eprintln!("verify    FAILED on the server: {}", verdict.detail);
        return Ok(Exit::Mismatch);
    }
    println!("verify    the server re-read it: decompressed, every tar member read ({:.0} ms)", ms(t));

    // Restore over the network, as `nbackup restore` does, and compare.
    let restore_dir = work.join("restore");
    let spec = RestoreSpec::everything(which, manifest.compression, manifest.size, restore_dir.clone());
    let progress = Arc::new(RestoreProgress::default());
    let outcome =
        restore_job::restore(&client, spec, None, progress, Box::new(|_| {}), &CancellationToken::new()).await?;
    let stats = &outcome.report;
    if outcome.verified() != Some(true) || stats.kept + stats.refused + stats.failed > 0 {
        eprintln!("restore   FAILED: verified {:?}, problems {:?}", outcome.verified(), stats.problems);
        return Ok(Exit::Failed);
    }
    println!(
        "restore   {} entries, {} into {} in {:.2}s ({:.1} MB/s), sha256 matches the manifest",
        stats.restored,
        human_bytes(stats.bytes),
        restore_dir.display(),
        outcome.seconds,
        mb_per_s(stats.bytes, outcome.seconds)
    );
    let as_root = restore::running_as_root();
    let diffs = restore::compare_trees(&[source.to_path_buf()], &Excludes::none(), &restore_dir, as_root, 20)?;
    let skipped_paths: Vec<&str> = report.notices.iter().map(|n| n.path.as_str()).collect();
    let real: Vec<&String> = diffs.iter().filter(|d| !skipped_paths.iter().any(|p| d.starts_with(p))).collect();
    if real.is_empty() {
        let owners = if as_root { "owners, " } else { "" };
        println!("compare   restore equals the source: contents, modes, mtimes, {owners}symlinks, hard links");
        Ok(Exit::Ok)
    } else {
        for d in &real {
            eprintln!("compare   DIFFERENT: {d}");
        }
        Ok(Exit::Failed)
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// A small tree with what a backup must get right: compressible text, incompressible
/// data, nested and empty directories, empty files, symlinks (one dangling), a hard
/// link, names with spaces, UTF-8 and long paths, and varied permissions.
fn make_sample(root: &Path) -> anyhow::Result<(u64, u64)> {
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut entries, mut bytes) = (0u64, 0u64);
    let mut write = |rel: &str, data: &[u8], mode: u32| -> anyhow::Result<()> {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().context("sample path has a parent")?)?;
        fs::File::create(&p)?.write_all(data)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        entries += 1;
        bytes += data.len() as u64;
        Ok(())
    };
    let words = ["backup", "stream", "chunk", "server", "agent", "commit", "retry", "ok", "GET /api", "200"];
    for i in 0..24 {
        let mut text = String::new();
        while text.len() < 96 * 1024 + i * 4096 {
            let w = words[(next() % words.len() as u64) as usize];
            text.push_str(&format!(
                "2026-11-22T02:{:02}:{:02}Z [{}] {w} id={}\n",
                i % 60,
                next() % 60,
                next() % 97,
                next() % 1000
            ));
        }
        write(&format!("logs/app{}/day-{i:02}.log", i % 3), text.as_bytes(), 0o640)?;
    }
    for i in 0..3 {
        let data: Vec<u8> = (0..(512 * 1024)).map(|_| next() as u8).collect();
        write(&format!("media/blob-{i}.bin"), &data, 0o644)?;
    }
    for i in 0..60 {
        let conf = format!("# service {i}\nlisten = 0.0.0.0:{}\nworkers = {}\n", 8000 + i, i % 8 + 1);
        write(&format!("etc/conf.d/svc-{i:03}.conf"), conf.as_bytes(), if i % 5 == 0 { 0o600 } else { 0o644 })?;
    }
    write("etc/name with spaces.conf", b"spaces\n", 0o644)?;
    write("etc/naïve-ünïcödé-名前.txt", "unicode\n".as_bytes(), 0o644)?;
    write("etc/empty-file", b"", 0o644)?;
    write("bin/run.sh", b"#!/bin/sh\necho hello\n", 0o755)?;
    let deep: String = (0..12).map(|i| format!("level-{i:02}-directory/")).collect();
    write(&format!("deep/{deep}leaf.txt"), b"a path longer than 100 bytes\n", 0o644)?;
    write(&format!("long/{}", "n".repeat(255)), b"a 255-byte name\n", 0o644)?;
    fs::create_dir_all(root.join("empty-dir"))?;
    std::os::unix::fs::symlink("run.sh", root.join("bin/link-to-run.sh"))?;
    std::os::unix::fs::symlink("does-not-exist", root.join("bin/dangling"))?;
    fs::hard_link(root.join("bin/run.sh"), root.join("bin/hardlink-to-run.sh"))?;
    Ok((entries + 4, bytes))
}
