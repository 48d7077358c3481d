//! Restores through the real path: `RSTR` over mutual TLS on loopback, the agent's own
//! identity, resumption after a cut, the safe extractor, and the `nbackup` commands
//! with their exit codes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use nbackup_daemon::agent::fetch::{ArchiveRef, RestoreClient};
use nbackup_daemon::agent::restore::{self as job, RestoreProgress, RestoreSpec};
use nbackup_daemon::agent::{BackupReport, Connector};
use nbackup_daemon::restore::{Overwrite, Selection};
use nbackup_protocol::Name;
use nbackup_protocol::config::{AgentConfig, Excludes};
use nbackup_protocol::wire::Reason;

use crate::proxy::{Fault, Proxy};
use crate::support::*;

fn name(s: &str) -> Name {
    Name::new(s).expect("name")
}

fn client(cfg: &AgentConfig) -> RestoreClient {
    RestoreClient::new(Connector::new(cfg).expect("connector"), cfg.name.clone(), cfg.retry)
}

fn server_events(root: &Path) -> String {
    fs::read_to_string(root.join("state/server-events.jsonl")).unwrap_or_default()
}

fn spec(cfg: &AgentConfig, report: &BackupReport, dest: &Path, paths: &[&str]) -> RestoreSpec {
    let paths: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
    RestoreSpec {
        which: ArchiveRef {
            storage: cfg.backups[0].storage.clone(),
            backup: cfg.backups[0].name.clone(),
            archive: report.archive.clone(),
        },
        compression: nbackup_protocol::wire::Compression::Zstd,
        size: report.bytes_sent,
        dest: dest.to_path_buf(),
        selection: Selection::new(&paths).expect("selection"),
        overwrite: Overwrite::Never,
        dry_run: false,
    }
}

#[tokio::test]
async fn a_restore_cut_mid_transfer_resumes_from_where_it_stopped_and_restores_byte_for_byte() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = TestServer::start_logged(tmp.path(), &pki, &[zstd("main")]).await;
    let src = noisy_source(tmp.path(), 6);
    let cfg = agent_config(&pki, server.addr, &[entry("data", "main", &[&src])]);
    let report = backup(&cfg, 0).await.expect("backup commits");

    // Through a proxy that cuts the first download after 2 MiB of the ~6 MiB archive.
    let proxy = Proxy::start(server.addr).await;
    proxy.fault(0, Fault::CutDownAfter(2 << 20));
    let via = agent_config(&pki, proxy.addr, &[entry("data", "main", &[&src])]);
    let dest = tmp.path().join("restored");
    let progress = Arc::new(RestoreProgress::default());
    let outcome = job::restore(
        &client(&via),
        spec(&via, &report, &dest, &[]),
        None,
        progress.clone(),
        Box::new(|_| {}),
        &CancellationToken::new(),
    )
    .await
    .expect("restore succeeds");

    assert_eq!(proxy.broken.load(std::sync::atomic::Ordering::SeqCst), 1, "the cut happened");
    assert_eq!(outcome.resumed(), 1, "one reconnection");
    assert_eq!(outcome.verified(), Some(true), "sha256 matches the manifest");
    let fetched = outcome.fetched().expect("fetched");
    assert_eq!(fetched.size, report.bytes_sent);
    assert_eq!(fetched.sha256, report.sha256);
    assert_eq!(outcome.report.restored, report.entries);
    assert_eq!(outcome.report.kept + outcome.report.refused + outcome.report.failed, 0);
    assert_restored(&[src], &Excludes::none(), &dest);
    // Resumed, not restarted: the second request asked for a byte past the cut.
    let events = server_events(tmp.path());
    let resumed_from: Vec<u64> = events
        .lines()
        .filter(|l| l.contains("restore_served"))
        .filter_map(|l| l.split("from byte ").nth(1))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    assert_eq!(resumed_from.len(), 1, "one resumed request: {events}");
    assert!(resumed_from[0] > 0 && resumed_from[0] <= 2 << 20, "resumed at {}", resumed_from[0]);
    server.stop().await;
}

#[tokio::test]
async fn an_agent_can_neither_list_nor_fetch_another_agents_archives() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = TestServer::start_logged(tmp.path(), &pki, &[zstd("main")]).await;
    let src = dataset(&tmp.path().join("data"), "200K", 5);
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src])]);
    let report = backup(&cfg, 0).await.expect("backup commits");

    // web-02, with its own valid certificate, claims to be web-01.
    let yaml = agent_yaml(&pki, "web-01", &pki.agent("web-02"), server.addr, &[entry("etc", "main", &[&src])], "");
    let impostor_cfg = AgentConfig::parse(&yaml, Path::new("agent.yaml")).expect("config");
    let impostor = client(&impostor_cfg);
    let refusal = |e: nbackup_daemon::agent::ConnectError| match e {
        nbackup_daemon::agent::ConnectError::Refused(r) => r,
        other => panic!("expected a refusal, got {other}"),
    };
    let listed = impostor.list(&name("main"), None).await.expect_err("refused");
    assert_eq!(refusal(listed).reason, Reason::IdentityMismatch);
    let which = ArchiveRef { storage: name("main"), backup: name("etc"), archive: report.archive.clone() };
    let verify = impostor.verify(&which).await.expect_err("refused");
    assert_eq!(refusal(verify).reason, Reason::IdentityMismatch);
    let (tx, _rx) = tokio::sync::mpsc::channel(4);
    let got = impostor
        .fetch(&which, nbackup_protocol::restore::Part::Archive, &tx, &Default::default(), &CancellationToken::new())
        .await;
    assert!(
        matches!(got, Err(nbackup_daemon::agent::fetch::FetchError::Connect(nbackup_daemon::agent::ConnectError::Refused(ref r))) if r.reason == Reason::IdentityMismatch),
        "{got:?}"
    );
    // Logged as refusals, with who asked.
    let events = server_events(tmp.path());
    assert!(events.matches("an agent reads only its own archives").count() >= 3, "{events}");

    // As itself, web-02 sees nothing of web-01's.
    let own = agent_config_named(&pki, "web-02", server.addr, &src);
    assert!(client(&own).list(&name("main"), None).await.expect("lists").is_empty());
    // And names that are not this agent's archives are not found, not read.
    let probe = ArchiveRef { storage: name("main"), backup: name("etc"), archive: "../../web-01/etc/x.tar.zst".into() };
    let e = client(&own).verify(&probe).await.expect_err("not found");
    assert_eq!(refusal(e).reason, Reason::NotFound);
    server.stop().await;
}

fn agent_config_named(pki: &Pki, agent: &str, addr: std::net::SocketAddr, src: &Path) -> AgentConfig {
    let yaml = agent_yaml(pki, agent, &pki.agent(agent), addr, &[entry("etc", "main", &[src])], "");
    AgentConfig::parse(&yaml, Path::new("agent.yaml")).expect("config")
}

fn nbackup() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nbackup"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("nbackup runs")
}

/// A server, an agent config file, and one committed backup of a small tree.
struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    config: PathBuf,
    src: PathBuf,
    server: TestServer,
}

async fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().to_path_buf();
    let pki = Pki::new(&root.join("pki"));
    let server = TestServer::start_logged(&root, &pki, &[zstd("main")]).await;
    let src = root.join("src");
    fs::create_dir_all(src.join("etc/nginx/sites")).expect("mkdir");
    fs::write(src.join("etc/hosts"), "127.0.0.1 localhost\n").expect("write");
    fs::write(src.join("etc/nginx/nginx.conf"), "worker_processes 2;\n").expect("write");
    fs::write(src.join("etc/nginx/sites/default.conf"), "server {}\n").expect("write");
    fs::write(src.join("etc/motd"), "hello\n").expect("write");
    std::os::unix::fs::symlink("nginx.conf", src.join("etc/nginx/current")).expect("symlink");
    let yaml = agent_yaml(&pki, "web-01", &pki.agent("web-01"), server.addr, &[entry("etc", "main", &[&src])], "");
    let config = root.join("agent.yaml");
    fs::write(&config, yaml).expect("config");
    let out = run(nbackup().args(["backup", "--config"]).arg(&config));
    assert!(out.status.success(), "backup: {}", text(&out.stderr));
    Fixture { _tmp: tmp, root, config, src, server }
}

// The binary runs synchronously: the in-process server needs other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_commands_list_select_by_glob_dry_run_and_refuse_to_overwrite() {
    let f = fixture().await;
    let member = |p: &str| format!("{}/{p}", f.src.strip_prefix("/").expect("absolute").display());

    // list: one archive, with a catalog.
    let out = run(nbackup().args(["list", "--json", "--config"]).arg(&f.config));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert!(list[0]["catalog"].as_u64().is_some_and(|n| n > 0), "committed with a catalog: {list}");
    assert_eq!(list[0]["storage"], "main");

    // ls answers from the catalog, filtered by glob.
    let glob = member("etc/**/*.conf");
    let out = run(nbackup().args(["ls", "--json", "--entry", "etc", "--config"]).arg(&f.config).arg(&glob));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    let mut paths: Vec<&str> = listed.iter().filter_map(|m| m["path"].as_str()).collect();
    paths.sort();
    assert_eq!(paths, [member("etc/nginx/nginx.conf"), member("etc/nginx/sites/default.conf")]);
    let out = run(nbackup().args(["ls", "--entry", "etc", "--config"]).arg(&f.config).arg(member("etc/nginx")));
    let ls = text(&out.stdout);
    assert!(ls.contains(&format!("{} -> nginx.conf", member("etc/nginx/current"))), "{ls}");
    assert!(ls.lines().any(|l| l.starts_with("-rw-") && l.ends_with("nginx.conf")), "{ls}");

    // --dry-run writes nothing and says what it would do.
    let dest = f.root.join("dest");
    let out = run(nbackup()
        .args(["restore", "--dry-run", "--entry", "etc", "--to"])
        .arg(&dest)
        .arg("--config")
        .arg(&f.config)
        .arg(&glob));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan = text(&out.stdout);
    assert!(plan.contains(&format!("create         - {}", member("etc/nginx/nginx.conf"))), "{plan}");
    assert!(!plan.contains("hosts"), "only the selection: {plan}");
    assert!(!dest.exists(), "a dry run creates nothing");

    // A selective restore by glob restores exactly that, verified.
    let out = run(nbackup()
        .args(["restore", "--json", "--entry", "etc", "--to"])
        .arg(&dest)
        .arg("--config")
        .arg(&f.config)
        .arg(&glob));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(result["verified"], true, "{result}");
    assert_eq!(result["report"]["restored"], 2, "{result}");
    assert!(result["size"].as_u64().is_some_and(|n| n == result["fetched_bytes"]), "{result}");
    let restored = dest.join(member("etc/nginx/nginx.conf"));
    assert_eq!(fs::read_to_string(&restored).expect("restored"), "worker_processes 2;\n");
    assert!(!dest.join(member("etc/hosts")).exists(), "outside the selection");

    // Again: the files exist, nothing is overwritten; exit 5 (none restored).
    fs::write(&restored, "changed locally\n").expect("edit");
    let out =
        run(nbackup().args(["restore", "--entry", "etc", "--to"]).arg(&dest).arg("--config").arg(&f.config).arg(&glob));
    assert_eq!(out.status.code(), Some(5), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(fs::read_to_string(&restored).expect("kept"), "changed locally\n");
    assert!(text(&out.stderr).contains("keep (exists)"), "{}", text(&out.stderr));

    // Everything, without overwriting: partial (exit 6), the local edit kept.
    let out = run(nbackup().args(["restore", "--entry", "etc", "--to"]).arg(&dest).arg("--config").arg(&f.config));
    assert_eq!(out.status.code(), Some(6), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(fs::read_to_string(&restored).expect("kept"), "changed locally\n");
    assert_eq!(fs::read_to_string(dest.join(member("etc/hosts"))).expect("restored"), "127.0.0.1 localhost\n");

    // --overwrite always replaces it; then the whole tree equals the source.
    let out = run(nbackup()
        .args(["restore", "--overwrite", "always", "--entry", "etc", "--to"])
        .arg(&dest)
        .arg("--config")
        .arg(&f.config));
    assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert_restored(std::slice::from_ref(&f.src), &Excludes::none(), &dest);

    // A selection that matches nothing: exit 5 before anything is fetched.
    let out = run(nbackup()
        .args(["restore", "--entry", "etc", "--to"])
        .arg(&dest)
        .arg("--config")
        .arg(&f.config)
        .arg("no/such/*"));
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));

    // verify: the server re-reads it now.
    let out = run(nbackup().args(["verify", "--entry", "etc", "--config"]).arg(&f.config));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("sha256 matches"), "{}", text(&out.stdout));

    // An unknown --at is a clear refusal.
    let out = run(nbackup()
        .args(["restore", "--at", "2001-01-01", "--entry", "etc", "--to"])
        .arg(&dest)
        .arg("--config")
        .arg(&f.config));
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no archive of etc matches --at 2001-01-01"), "{}", text(&out.stderr));
    f.server.stop().await;
}

// The binary runs synchronously: the in-process server needs other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_archive_fails_verify_with_exit_7_and_is_quarantined() {
    let f = fixture().await;
    let archive = f.server.archives("main", "web-01", "etc").pop().expect("archive");
    let mut bytes = fs::read(&archive).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&archive, bytes).expect("flip a byte");
    let out = run(nbackup().args(["verify", "--json", "--entry", "etc", "--config"]).arg(&f.config));
    assert_eq!(out.status.code(), Some(7), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["verdict"], "corrupt");
    assert_eq!(v["quarantined"], true);
    assert!(f.server.archives("main", "web-01", "etc").is_empty(), "moved aside as .corrupt");
    f.server.stop().await;
}

// The binary runs synchronously: the in-process server needs other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_of_a_damaged_archive_exits_7() {
    let f = fixture().await;
    let archive = f.server.archives("main", "web-01", "etc").pop().expect("archive");
    let mut bytes = fs::read(&archive).expect("read");
    let last = bytes.len() - 6;
    bytes[last] ^= 0x01;
    fs::write(&archive, bytes).expect("flip a byte in the zstd trailer");
    let dest = f.root.join("dest");
    let out = run(nbackup().args(["restore", "--entry", "etc", "--to"]).arg(&dest).arg("--config").arg(&f.config));
    assert_eq!(out.status.code(), Some(7), "{}\n{}", text(&out.stdout), text(&out.stderr));
    f.server.stop().await;
}

/// A tar member written raw, with any name, as an attacker would.
fn raw_member(b: &mut tar::Builder<Vec<u8>>, path: &str, kind: tar::EntryType, link: Option<&Path>, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    h.as_gnu_mut().expect("gnu").name[..path.len()].copy_from_slice(path.as_bytes());
    if let Some(l) = link {
        h.set_link_name(l).expect("link name");
    }
    h.set_cksum();
    b.append(&h, data).expect("member");
}

// The binary runs synchronously: the in-process server needs other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_archive_restores_nothing_outside_the_destination() {
    let f = fixture().await;
    let outside = f.root.join("outside");
    fs::create_dir(&outside).expect("outside");
    let mut b = tar::Builder::new(Vec::new());
    raw_member(&mut b, "ok.txt", tar::EntryType::Regular, None, b"fine");
    raw_member(&mut b, "../escaped.txt", tar::EntryType::Regular, None, b"pwned");
    let abs = format!("{}/abs.txt", outside.display());
    raw_member(&mut b, &abs, tar::EntryType::Regular, None, b"pwned");
    raw_member(&mut b, "a", tar::EntryType::Symlink, Some(&outside), b"");
    raw_member(&mut b, "a/through-link.txt", tar::EntryType::Regular, None, b"pwned");
    raw_member(&mut b, "hard", tar::EntryType::Link, Some(Path::new("../../etc/passwd")), b"");
    let tar = b.into_inner().expect("tar");
    let zst = zstd::encode_all(&tar[..], 3).expect("zstd");
    // Stored as if web-01 had committed it, with a manifest that matches.
    let dir = f.server.storage_dir("main").join("web-01/etc");
    let name = "web-01-etc-20300101T000000Z.tar.zst";
    fs::write(dir.join(name), &zst).expect("archive");
    let manifest = nbackup_protocol::manifest::Manifest {
        format: nbackup_protocol::manifest::MANIFEST_FORMAT,
        archive: name.into(),
        agent: "web-01".into(),
        backup: "etc".into(),
        storage: "main".into(),
        compression: nbackup_protocol::wire::Compression::Zstd,
        compression_level: 3,
        size: zst.len() as u64,
        sha256: nbackup_protocol::manifest::hex(&<sha2::Sha256 as sha2::Digest>::digest(&zst)),
        chunks: 1,
        chunk_size: 1 << 20,
        entries: 6,
        bytes_read: 0,
        skipped: 0,
        started_at: "2030-01-01T00:00:00Z".into(),
        finished_at: "2030-01-01T00:00:01Z".into(),
        agent_version: "test".into(),
        server_version: "test".into(),
        session: "00".repeat(16),
        commit_seq: Some(99),
    };
    fs::write(dir.join(format!("{name}.json")), manifest.to_json()).expect("manifest");

    // No catalog beside it: `ls` reads the archive itself, and says so.
    let out = run(nbackup().args(["ls", "--json", "--entry", "etc", "--at", name, "--config"]).arg(&f.config));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("has no catalog; reading the archive itself"), "{}", text(&out.stderr));
    let members: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(members.len(), 6, "{members:?}");
    assert_eq!(members[3]["type"], "symlink");

    let dest = f.root.join("dest");
    let out = run(nbackup()
        .args(["restore", "--json", "--entry", "etc", "--at", name, "--to"])
        .arg(&dest)
        .arg("--config")
        .arg(&f.config));
    assert_eq!(out.status.code(), Some(6), "partial: {}\n{}", text(&out.stdout), text(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(result["verified"], true, "{result}");
    assert_eq!(fs::read_to_string(dest.join("ok.txt")).expect("the good member"), "fine");
    assert_eq!(fs::read_dir(&outside).expect("ls").count(), 0, "nothing written outside: {result}");
    assert!(!f.root.join("escaped.txt").exists(), "no `..` escape");
    assert!(fs::symlink_metadata(dest.join("a")).expect("the link itself").file_type().is_symlink());
    assert!(!dest.join("hard").exists(), "no hard link to a path outside");
    let refused = result["report"]["refused"].as_u64().expect("count");
    assert_eq!(refused, 4, "`..`, absolute, through a symlink, hard link outside: {result}");
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_test_reports_changed_files_and_fails_on_a_file_that_differs_from_an_unchanged_source() {
    let f = fixture().await;
    let verify = |extra: &[&str]| {
        let out = run(nbackup().args(["verify", "--json", "--entry", "etc", "--config"]).arg(&f.config).args(extra));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.code(), v, text(&out.stderr))
    };
    let (code, v, err) = verify(&["--restore-test", "10"]);
    assert_eq!(code, Some(0), "{v} {err}");
    assert_eq!(v["restore_test"]["checked"], 4, "all four files: {v}");
    assert_eq!(v["restore_test"]["identical"], 4, "{v}");

    // An ordinary edit since the backup: reported, not a failure.
    fs::write(f.src.join("etc/motd"), "edited after the backup, longer\n").expect("edit");
    let (code, v, err) = verify(&["--restore-test", "10"]);
    assert_eq!(code, Some(0), "{v} {err}");
    let changed = v["restore_test"]["changed"].as_array().cloned().unwrap_or_default();
    assert_eq!(changed.len(), 1, "{v}");
    assert!(changed[0].as_str().is_some_and(|p| p.ends_with("etc/motd")), "{v}");

    // Same size, same mtime, other bytes: the backup and the source disagree.
    let hosts = f.src.join("etc/hosts");
    let mtime = fs::metadata(&hosts).expect("stat").modified().expect("mtime");
    fs::write(&hosts, "127.0.0.9 localhost\n").expect("same length");
    fs::File::options().write(true).open(&hosts).expect("open").set_modified(mtime).expect("keep mtime");
    let (code, v, err) = verify(&["--restore-test", "10"]);
    assert_eq!(code, Some(7), "{v} {err}");
    let differing = v["restore_test"]["differing"].as_array().cloned().unwrap_or_default();
    assert!(differing.iter().any(|p| p.as_str().is_some_and(|p| p.ends_with("etc/hosts"))), "{v}");
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_catalog_costs_the_plan_not_the_restore() {
    let f = fixture().await;
    let archive = f.server.archives("main", "web-01", "etc").pop().expect("archive");
    let mut catalog = archive.as_os_str().to_owned();
    catalog.push(".catalog");
    fs::write(&catalog, b"not zstd at all").expect("damage the catalog");
    let dest = f.root.join("dest");
    let out = run(nbackup().args(["restore", "--entry", "etc", "--to"]).arg(&dest).arg("--config").arg(&f.config));
    assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stderr).contains("the catalog is unreadable"), "{}", text(&out.stderr));
    assert_restored(std::slice::from_ref(&f.src), &Excludes::none(), &dest);
    let out = run(nbackup().args(["ls", "--entry", "etc", "--config"]).arg(&f.config));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("etc/hosts"), "{}", text(&out.stdout));
    f.server.stop().await;
}

// The binary runs synchronously: the in-process server needs other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_one_file_of_a_large_archive_reads_only_the_blocks_that_hold_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().to_path_buf();
    let pki = Pki::new(&root.join("pki"));
    let server = TestServer::start_logged(&root, &pki, &[gzip("main")]).await;
    // Twelve 1 MiB incompressible files (a dozen 1 MiB gzip members), one of them in
    // a directory with its own mode and mtime.
    let src = root.join("src");
    fs::create_dir_all(src.join("deep/dir")).expect("mkdir");
    for i in 0..12 {
        let at = if i == 7 { src.join("deep/dir/wanted.bin") } else { src.join(format!("f{i:02}.bin")) };
        fs::write(&at, noise(1 << 20, 100 + i)).expect("write");
    }
    fs::set_permissions(src.join("deep/dir"), std::os::unix::fs::PermissionsExt::from_mode(0o750)).expect("chmod");
    let when = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    fs::File::open(src.join("deep/dir")).expect("open").set_modified(when).expect("mtime");
    let yaml = agent_yaml(&pki, "web-01", &pki.agent("web-01"), server.addr, &[entry("etc", "main", &[&src])], "");
    let config = root.join("agent.yaml");
    fs::write(&config, yaml).expect("config");
    let out = run(nbackup().args(["backup", "--config"]).arg(&config));
    assert!(out.status.success(), "backup: {}", text(&out.stderr));
    let archive = server.archives("main", "web-01", "etc").pop().expect("archive");
    let size = fs::metadata(&archive).expect("archive").len();

    let wanted = src.join("deep/dir/wanted.bin");
    let member = wanted.strip_prefix("/").expect("absolute").display().to_string();
    let dest = root.join("dest");
    let restore = |dest: &Path| {
        run(nbackup()
            .args(["restore", "--json", "--entry", "etc", "--to"])
            .arg(dest)
            .arg("--config")
            .arg(&config)
            .arg(&member))
    };
    let out = restore(&dest);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(result["report"]["restored"], 1, "{result}");
    assert_eq!(result["ranges"], 1, "{result}");
    let fetched = result["fetched_bytes"].as_u64().expect("fetched bytes");
    // The file's 1 MiB lies in two or three members of ~1 MiB each, of a 12 MiB archive.
    assert!(fetched <= 3 * (1 << 20) + 4096 && fetched < size / 3, "fetched {fetched} of {size}: {result}");
    assert_eq!(result["verified"], serde_json::Value::Null, "not read whole: {result}");
    let copy = dest.join(&member);
    assert_eq!(fs::read(&copy).expect("restored"), fs::read(&wanted).expect("source"), "byte for byte");
    // Its directory, not in the blocks read, still gets its archived metadata (from the catalog).
    let dir = fs::metadata(copy.parent().expect("parent")).expect("dir");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&dir.permissions()) & 0o7777, 0o750);
    assert_eq!(dir.modified().expect("mtime"), when);
    assert!(!dest.join(src.join("f00.bin").strip_prefix("/").expect("abs")).exists(), "nothing else");
    let events = server_events(&root);
    assert!(events.contains(&format!(" of {size}")), "the server served a range: {events}");

    // A flipped byte inside one of those blocks is found by that block's CRC: exit 7.
    let mut bytes = fs::read(&archive).expect("read");
    let catalog_line =
        text(&run(nbackup().args(["ls", "--json", "--entry", "etc", "--config"]).arg(&config).arg(&member)).stdout);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&catalog_line).expect("json");
    let tar_offset = listed[0]["offset"].as_u64().expect("offset");
    // Member i of this archive starts near i MiB compressed (incompressible data).
    let at = ((tar_offset + (1 << 19)) as usize).min(bytes.len() - 100);
    bytes[at] ^= 0x20;
    fs::write(&archive, bytes).expect("flip");
    let out = restore(&root.join("dest2"));
    assert_eq!(out.status.code(), Some(7), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stderr).contains("gzip member"), "{}", text(&out.stderr));
    server.stop().await;
}
