//! Failures, injected: dropped and black-holed connections, lost answers, chunks lost
//! or duplicated on the wire, a server killed mid-upload or mid-commit, full and failing
//! disks, an agent killed mid-backup. Every test ends with the archive extracted by
//! the system tar and compared with the source, and nothing left in `.incoming`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nbackup_daemon::agent::BackupError;
use nbackup_daemon::agent::window::Failure;
use nbackup_daemon::fault::{self, Action};
use nbackup_protocol::config::Excludes;
use nbackup_protocol::wire::Reason;

use crate::proxy::{Fault, Proxy};
use crate::support::*;

/// Extracts the entry's only archive and compares it with `src`.
fn assert_single_archive_restores(server_storage: &Path, entry: &str, src: &Path, restored: &Path) -> PathBuf {
    let dir = server_storage.join("web-01").join(entry);
    let archives: Vec<PathBuf> =
        fs::read_dir(&dir).expect("entry dir").flatten().map(|e| e.path()).filter(|p| is_archive(p)).collect();
    assert_eq!(archives.len(), 1, "exactly one archive, never sent twice: {archives:?}");
    check_manifest(&archives[0]);
    gnu_extract(&archives[0], restored);
    assert_restored(&[src.to_path_buf()], &Excludes::none(), restored);
    assert!(leftovers(server_storage).is_empty(), "left behind: {:?}", leftovers(server_storage));
    archives[0].clone()
}

fn source(tmp: &Path) -> PathBuf {
    let src = tmp.join("src");
    dataset(&src.join("data"), "12M", 21);
    // Some incompressible bytes so the archive spans many chunks.
    fs::write(src.join("noise.bin"), noise(6 << 20, 5)).expect("noise");
    src
}

/// Runs a backup through a proxy that applies `fault` to the first connection;
/// returns how many chunks were resent.
async fn through_proxy(fault: Fault, tuning: Tuning) -> u64 {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = source(tmp.path());
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let proxy = Proxy::start(server.addr).await;
    proxy.fault(0, fault);
    let cfg = agent_config_tuned(&pki, proxy.addr, &[entry("data", "main", &[&src])], &tuning);
    let report = backup(&cfg, 0).await.expect("the backup survives the fault");
    assert!(proxy.broken.load(std::sync::atomic::Ordering::SeqCst) >= 1, "the fault happened");
    assert!(proxy.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2, "the agent reconnected");
    assert_single_archive_restores(&server.storage_dir("main"), "data", &src, &tmp.path().join("restored"));
    server.stop().await;
    report.resent_chunks
}

#[tokio::test]
async fn a_cut_connection_resumes_and_resends_only_unacknowledged_chunks() {
    let resent = through_proxy(Fault::CutAfter(3 << 20), Tuning { attempts: 5, ..Tuning::default() }).await;
    // Only what was in flight goes again: at most a window (16 MiB / 256 KiB chunks).
    assert!(resent <= 64, "resent {resent} chunks");
}

#[tokio::test]
async fn a_reset_connection_resumes() {
    let resent = through_proxy(Fault::ResetAfter(2 << 20), Tuning { attempts: 5, ..Tuning::default() }).await;
    assert!(resent <= 64);
}

#[tokio::test]
async fn a_black_holed_stream_is_detected_and_re_established() {
    let started = Instant::now();
    let tuning = Tuning { attempts: 5, ack_timeout: "1s", ..Tuning::default() };
    let resent = through_proxy(Fault::BlackholeDownAfter(2 << 20), tuning).await;
    assert!(resent > 0, "chunks whose acks vanished were sent again");
    assert!(started.elapsed() < Duration::from_secs(60), "no long hang");
}

#[tokio::test]
async fn chunks_lost_or_duplicated_on_the_wire_are_recovered() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = source(tmp.path());
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let _drop = fault::inject("send-chunk", "web-01/wire", Action::Drop, 5, 1);
    let _dup = fault::inject("send-chunk", "web-01/wire", Action::Duplicate, 10, 3);
    let tuning = Tuning { attempts: 5, ack_timeout: "1s", ..Tuning::default() };
    let cfg = agent_config_tuned(&pki, server.addr, &[entry("wire", "main", &[&src])], &tuning);
    let report = backup(&cfg, 0).await.expect("backup");
    assert!(report.resent_chunks > 0, "the dropped chunk was sent again");
    assert_single_archive_restores(&server.storage_dir("main"), "wire", &src, &tmp.path().join("restored"));
    server.stop().await;
}

#[tokio::test]
async fn the_last_chunk_lost_during_the_final_drain_is_resent_before_commit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join("small");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("one.txt"), b"a single chunk archive\n").expect("write");
    let server = TestServer::start(tmp.path(), &pki, &[zstd("main")]).await;
    // The archive is one chunk: dropping chunk 0 drops the last one, after the
    // producer finished.
    let _drop = fault::inject("send-chunk", "web-01/drain", Action::Drop, 0, 1);
    let tuning = Tuning { attempts: 5, ack_timeout: "500ms", ..Tuning::default() };
    let cfg = agent_config_tuned(&pki, server.addr, &[entry("drain", "main", &[&src])], &tuning);
    let report = backup(&cfg, 0).await.expect("backup");
    assert_eq!(report.resent_chunks, 1);
    assert_single_archive_restores(&server.storage_dir("main"), "drain", &src, &tmp.path().join("restored"));
    server.stop().await;
}

#[tokio::test]
async fn a_lost_commit_answer_is_settled_by_status_and_never_sent_twice() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = source(tmp.path());
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let scope = server.storage_dir("main").to_string_lossy().into_owned();
    let _lost = fault::inject("commit:answer", scope, Action::Drop, 0, 1);
    let tuning = Tuning { attempts: 5, ack_timeout: "1s", ..Tuning::default() };
    let cfg = agent_config_tuned(&pki, server.addr, &[entry("data", "main", &[&src])], &tuning);
    let report = backup(&cfg, 0).await.expect("committed, even though the answer was lost");
    let archive = assert_single_archive_restores(&server.storage_dir("main"), "data", &src, &tmp.path().join("r"));
    assert_eq!(archive.file_name().expect("name").to_string_lossy(), report.archive);
    server.stop().await;
}

#[tokio::test]
async fn status_of_another_agents_session_is_refused_and_a_committed_one_is_reported() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    pki.agent("web-02");
    let src = source(tmp.path());
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("data", "main", &[&src])]);
    let report = backup(&cfg, 0).await.expect("backup");
    let session = nbackup_protocol::SessionId::from_hex(&report.session).expect("id");
    let mine = nbackup_daemon::agent::Connector::new(&cfg).expect("connector");
    match mine.status(session).await.expect("status") {
        nbackup_protocol::wire::SessionState::Committed(c) => assert_eq!(c.archive, report.archive),
        other => panic!("expected committed, got {other:?}"),
    }
    // A join racing (here: after) the commit is refused and says why.
    match mine.join(session, 1, 1).await {
        Err(nbackup_daemon::agent::ConnectError::Refused(r)) => {
            assert_eq!(r.reason, Reason::UnknownSession);
            assert!(r.message.contains("already committed"), "{}", r.message);
        }
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("joining a committed session must be refused"),
    }
    let yaml = agent_yaml(&pki, "web-02", &pki.agent("web-02"), server.addr, &[entry("data", "main", &[&src])], "");
    let other_cfg = nbackup_protocol::config::AgentConfig::parse(&yaml, Path::new("b.yaml")).expect("cfg");
    let theirs = nbackup_daemon::agent::Connector::new(&other_cfg).expect("connector");
    match theirs.status(session).await {
        Err(nbackup_daemon::agent::ConnectError::Refused(r)) => assert_eq!(r.reason, Reason::NotAllowed),
        other => panic!("another agent must not learn about the session: {:?}", other.map(|_| ())),
    }
    server.stop().await;
}

#[tokio::test]
async fn a_full_disk_fails_fast_removes_the_upload_and_spares_other_storages() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = source(tmp.path());
    let small = tmp.path().join("storage/small");
    fs::create_dir_all(&small).expect("mkdir");
    // A really full filesystem when we may mount one; otherwise the injected errno.
    let mount = Tmpfs::mount(&small, "3m");
    let mounted = mount.is_some();
    let server = TestServer::start(tmp.path(), &pki, &[gzip("small"), gzip("big")]).await;
    let _full =
        (!mounted).then(|| fault::inject("chunk-write", small.to_string_lossy(), Action::Errno(libc::ENOSPC), 4, 1));
    let cfg = agent_config(&pki, server.addr, &[entry("data", "small", &[&src]), entry("other", "big", &[&src])]);
    let started = Instant::now();
    let err = backup(&cfg, 0).await.expect_err("disk full");
    let refusal = err.refusal().unwrap_or_else(|| panic!("typed refusal expected, got {err}")).clone();
    assert_eq!(refusal.reason, Reason::DiskFull, "{refusal}");
    assert!(err.to_string().contains("the server's storage is full"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "fails fast");
    assert!(leftovers(&small).is_empty(), "upload removed: {:?}", leftovers(&small));
    // The other storage keeps working.
    backup(&cfg, 1).await.expect("another storage is unaffected");
    server.stop().await;
}

#[tokio::test]
async fn a_write_error_is_typed_and_old_archives_stay_untouched() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = source(tmp.path());
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("data", "main", &[&src])]);
    let first = backup(&cfg, 0).await.expect("first backup");
    let scope = server.storage_dir("main").to_string_lossy().into_owned();
    let _eio = fault::inject("chunk-write", scope, Action::Errno(libc::EIO), 3, 1);
    let err = backup(&cfg, 0).await.expect_err("EIO");
    assert_eq!(err.refusal().map(|r| r.reason), Some(Reason::WriteError), "{err}");
    let archives = server.archives("main", "web-01", "data");
    assert_eq!(archives.len(), 1);
    assert!(archives[0].ends_with(&first.archive));
    check_manifest(&archives[0]);
    assert!(leftovers(&server.storage_dir("main")).is_empty());
    server.stop().await;
}

/// Starts a child-process server, runs a backup of `noise_mib` MiB against it, and
/// SIGKILLs the server once `kill_at` bytes of the upload are on its disk; `meanwhile`
/// runs while it is down. The server is then restarted and the backup must complete.
async fn kill_server_mid_upload(noise_mib: usize, kill_at: u64, meanwhile: impl FnOnce(&Path)) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("noise.bin"), noise(noise_mib << 20, 9)).expect("noise");
    let (config, addr) = ServerChild::configure(tmp.path(), &pki, &[gzip("main")], "");
    let mut server = ServerChild::start(&config, addr, "");
    let storage = tmp.path().join("storage/main");
    let tuning =
        Tuning { attempts: 30, initial_delay: "100ms", max_delay: "300ms", ack_timeout: "2s", ..Tuning::default() };
    let cfg = agent_config_tuned(&pki, addr, &[entry("data", "main", &[&src])], &tuning);
    let run = tokio::spawn(async move { backup(&cfg, 0).await });
    while !fs::read_dir(storage.join(".incoming")).is_ok_and(|d| {
        d.flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "part") && e.metadata().is_ok_and(|m| m.len() > kill_at))
    }) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill9();
    meanwhile(&storage);
    let server = ServerChild::start(&config, addr, "");
    let report = run.await.expect("task").expect("the backup completes after the restart");
    assert_eq!(report.bytes_read, (noise_mib as u64) << 20);
    assert_single_archive_restores(&storage, "data", &src, &tmp.path().join("restored"));
    server.terminate();
}

#[tokio::test]
async fn an_upload_survives_a_server_killed_with_sigkill() {
    kill_server_mid_upload(64, 8 << 20, |storage| {
        let kept = leftovers(storage);
        assert!(kept.iter().any(|p| p.extension().is_some_and(|x| x == "part")), "upload survives the kill");
        assert!(kept.iter().any(|p| p.extension().is_some_and(|x| x == "journal")), "journal survives the kill");
    })
    .await;
}

#[tokio::test]
async fn a_session_the_server_forgot_is_restarted_fresh() {
    // The upload is lost entirely while the server is down (as if its disk had been
    // replaced): the agent learns the session is unknown and starts a fresh one,
    // reading the sources again from the start.
    kill_server_mid_upload(32, 2 << 20, |storage| {
        for p in leftovers(storage) {
            fs::remove_file(p).expect("rm");
        }
    })
    .await;
}

/// Kills the server at one step of the commit and checks the archives on disk, before
/// and after a restart.
async fn crash_during_commit(point: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join("src");
    dataset(&src, "2M", 31);
    let mut spec = gzip("main");
    spec.max_backups = 2;
    let (config, addr) = ServerChild::configure(tmp.path(), &pki, &[spec], "");
    let storage = tmp.path().join("storage/main");
    let entry_dir = storage.join("web-01/data");
    let tuning =
        Tuning { attempts: 40, initial_delay: "100ms", max_delay: "200ms", ack_timeout: "2s", ..Tuning::default() };
    let cfg = agent_config_tuned(&pki, addr, &[entry("data", "main", &[&src])], &tuning);
    // Two good archives to start with.
    let server = ServerChild::start(&config, addr, "");
    let mut before = Vec::new();
    for _ in 0..2 {
        before.push(backup(&cfg, 0).await.expect("setup backup").archive);
    }
    server.terminate();

    let faults = format!("{point}@{}=abort", storage.display());
    let mut server = ServerChild::start(&config, addr, &faults);
    let cfg2 = cfg.clone();
    let run = tokio::spawn(async move { backup(&cfg2, 0).await });
    let status = server.wait_exit().await;
    assert!(!status.success(), "the server died at {point}");
    // Invariants while the server is down.
    let archives = archives_in(&entry_dir);
    assert!(archives.len() <= 3, "{point}: never more than max_backups + 1: {archives:?}");
    for a in &archives {
        if nbackup_daemon::server::storage::sidecar_path(a).exists() {
            check_manifest(a);
        }
    }
    let good_before = archives.iter().filter(|a| before.iter().any(|b| a.ends_with(b))).count();
    assert!(good_before >= 1, "{point}: the newest earlier archive is still there");

    let server = ServerChild::start(&config, addr, "");
    let report = run.await.expect("task").expect("the backup is committed after the restart");
    let archives = archives_in(&entry_dir);
    assert_eq!(archives.len(), 2, "{point}: rotated to max_backups: {archives:?}");
    assert!(archives.iter().any(|a| a.ends_with(&report.archive)), "{point}: the new archive is there");
    assert!(archives.iter().any(|a| a.ends_with(&before[1])), "{point}: the previous newest is kept");
    for a in &archives {
        check_manifest(a);
    }
    let restored = tmp.path().join("restored");
    gnu_extract(&entry_dir.join(&report.archive), &restored);
    assert_restored(std::slice::from_ref(&src), &Excludes::none(), &restored);
    let manifests = fs::read_dir(&entry_dir)
        .expect("ls")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .count();
    assert_eq!(manifests, 2, "{point}: no orphan manifests");
    assert!(leftovers(&storage).is_empty(), "{point}: left behind: {:?}", leftovers(&storage));
    server.terminate();
    assert!(rotated_out(&storage).is_empty(), "{point}: not freed: {:?}", rotated_out(&storage));
}

fn archives_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| is_archive(p)).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test]
async fn sigkill_before_the_commit_intent_is_recovered() {
    crash_during_commit("commit:before-intent").await;
}

#[tokio::test]
async fn sigkill_before_the_rename_is_recovered() {
    crash_during_commit("commit:before-rename").await;
}

#[tokio::test]
async fn sigkill_after_the_rename_is_recovered() {
    crash_during_commit("commit:after-rename").await;
}

#[tokio::test]
async fn sigkill_after_the_manifest_is_recovered() {
    crash_during_commit("commit:after-manifest").await;
}

#[tokio::test]
async fn sigkill_in_the_middle_of_rotation_is_recovered() {
    crash_during_commit("rotate:after-delete").await;
}

#[tokio::test]
async fn an_agent_killed_mid_backup_frees_its_entry() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("noise.bin"), noise(96 << 20, 13)).expect("noise");
    let server = TestServer::start_with(tmp.path(), &pki, &[gzip("main")], "  orphan_timeout: 500ms\n").await;
    let storage = server.storage_dir("main");
    let yaml = agent_yaml(&pki, "web-01", &pki.agent("web-01"), server.addr, &[entry("data", "main", &[&src])], "");
    let cfg_path = tmp.path().join("agent.yaml");
    fs::write(&cfg_path, yaml).expect("write");
    let mut agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_nbackup"))
        .args(["backup", "--config"])
        .arg(&cfg_path)
        .spawn()
        .expect("agent starts");
    while !fs::read_dir(storage.join(".incoming"))
        .is_ok_and(|d| d.flatten().any(|e| fs::metadata(e.path()).is_ok_and(|m| m.len() > 1 << 20)))
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    agent.start_kill().expect("SIGKILL");
    agent.wait().await.expect("reaped");
    let killed = Instant::now();
    // The server notices the dead connections and ends the session within the orphan
    // timeout, removing the upload.
    while !leftovers(&storage).is_empty() {
        assert!(killed.elapsed() < Duration::from_secs(10), "session not ended: {:?}", leftovers(&storage));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the entry is free: the next run is accepted at once.
    let cfg = agent_config(&pki, server.addr, &[entry("data", "main", &[&src])]);
    backup(&cfg, 0).await.expect("next run accepted");
    let restored = tmp.path().join("restored");
    gnu_extract(&server.archives("main", "web-01", "data")[0], &restored);
    assert_restored(std::slice::from_ref(&src), &Excludes::none(), &restored);
    server.stop().await;
}

#[test]
fn transfer_failures_are_classified_for_retry() {
    use nbackup_daemon::agent::retry::ErrorClass;
    use nbackup_protocol::wire::Refusal;
    let lost = BackupError::Transfer(Failure::SessionLost("gone".into()));
    assert_eq!(lost.class(), ErrorClass::FreshSession);
    let full = BackupError::Transfer(Failure::Server(Refusal::new(Reason::DiskFull, "")));
    assert_eq!(full.class(), ErrorClass::Permanent);
    let draining = BackupError::Refused(Refusal::new(Reason::Draining, "restarting"));
    assert_eq!(draining.class(), ErrorClass::Transient, "a server restarting is waited for, not an exit 4");
    let changed = BackupError::Transfer(Failure::Server(Refusal::new(Reason::VerifyFailed, "chunk 3 changed")));
    assert_eq!(changed.class(), ErrorClass::FreshSession);
}
