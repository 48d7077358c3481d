//! The server runtime's rules (issue 8), each through the real path: commit order
//! against a stepped clock, one outcome per session, a slow disk that stalls only its
//! own sessions, silent peers, our own throttle, resource limits, filesystems without
//! `RENAME_NOREPLACE`, and commits that verify what is on disk.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nbackup_daemon::agent::{Connector, Progress};
use nbackup_daemon::fault::{self, Action};
use nbackup_protocol::manifest::Manifest;
use nbackup_protocol::wire::{Reason, SessionState};
use tokio_util::sync::CancellationToken;

use crate::proxy::{Fault, Proxy};
use crate::support::*;

fn manifest_of(archive: &Path) -> Manifest {
    let text = fs::read_to_string(format!("{}.json", archive.display())).expect("manifest");
    Manifest::from_json(&text).expect("manifest json")
}

/// Waits (bounded, as a guard against hanging) for `cond`.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(60), "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn rotation_follows_commit_order_when_the_clock_stepped_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 1);
    let spec = StorageSpec { max_backups: 2, ..zstd("main") };
    let server = TestServer::start(tmp.path(), &pki, &[spec]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src])]);
    // Two archives committed while the clock ran an hour ahead.
    let first = backup(&cfg, 0).await.expect("first");
    let second = backup(&cfg, 0).await.expect("second");
    let dir = server.storage_dir("main").join("web-01").join("etc");
    let ahead = (chrono::Utc::now() + chrono::Duration::hours(1)).format("%Y%m%dT%H%M%SZ").to_string();
    for (i, old) in [&first, &second].into_iter().enumerate() {
        let name = format!("web-01-etc-{ahead}{}.tar.zst", if i == 0 { String::new() } else { "-2".into() });
        let mut m = manifest_of(&dir.join(&old.archive));
        fs::rename(dir.join(&old.archive), dir.join(&name)).expect("rename");
        fs::remove_file(format!("{}.json", dir.join(&old.archive).display())).expect("old manifest");
        m.archive = name.clone();
        fs::write(format!("{}.json", dir.join(&name).display()), m.to_json()).expect("manifest");
    }
    // Now (the clock stepped back an hour) a third commit sorts first by name.
    let third = backup(&cfg, 0).await.expect("third");
    assert!(dir.join(&third.archive).exists(), "the committed answer names a file that exists");
    assert_eq!(manifest_of(&dir.join(&third.archive)).commit_seq, Some(3));
    let left: Vec<String> = server
        .archives("main", "web-01", "etc")
        .iter()
        .map(|p| p.file_name().expect("n").to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2);
    assert!(left.contains(&third.archive), "the newest commit survives its own rotation: {left:?}");
    assert!(left.contains(&format!("web-01-etc-{ahead}-2.tar.zst")), "the second commit is kept: {left:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_failure_after_the_rename_is_a_commit_finished_at_the_next_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 2);
    let mut server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let scope = server.storage_dir("main").to_string_lossy().into_owned();
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src])]);
    let report = {
        let _eio = fault::inject("commit:manifest", scope, Action::Errno(libc::EIO), 0, 1);
        backup(&cfg, 0).await.expect("committed, whatever failed after the rename")
    };
    let archive = server.storage_dir("main").join("web-01").join("etc").join(&report.archive);
    assert!(archive.exists());
    assert!(!Path::new(&format!("{}.json", archive.display())).exists(), "the manifest write failed");
    assert_eq!(server.incoming("main").len(), 1, "the journal is kept to finish the commit");
    server.restart().await;
    until("the manifest", || Path::new(&format!("{}.json", archive.display())).exists()).await;
    check_manifest(&archive);
    until("an empty .incoming", || server.incoming("main").is_empty()).await;
    server.stop().await;
}

#[tokio::test]
async fn a_slow_disk_stalls_only_its_own_sessions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = noisy_source(tmp.path(), 6);
    let server = TestServer::start(tmp.path(), &pki, &[gzip("slow"), gzip("fast")]).await;
    let scope = server.storage_dir("slow").to_string_lossy().into_owned();
    // Every chunk read back at commit takes 500 ms (about 6 s for the archive on two
    // threads), and free-space checks on that storage hang for 5 s.
    let _slow = fault::inject("commit:verify", scope.clone(), Action::Delay(Duration::from_millis(500)), 0, u32::MAX);
    let _stat = fault::inject("statvfs", scope, Action::Delay(Duration::from_secs(5)), 0, u32::MAX);
    let tuning = Tuning { ack_timeout: "1s", ..Tuning::default() };
    let cfg =
        agent_config_tuned(&pki, server.addr, &[entry("etc", "slow", &[&src]), entry("www", "fast", &[&src])], &tuning);
    let (logs, _guard) = Logs::capture();
    let progress = Arc::new(Progress::default());
    let slow_run = {
        let (cfg, progress) = (cfg.clone(), progress.clone());
        tokio::spawn(async move {
            let connector = Connector::new(&cfg).expect("connector");
            nbackup_daemon::agent::run_backup(&connector, &cfg, &cfg.backups[0], progress, CancellationToken::new())
                .await
        })
    };
    logs.wait_for("server is committing").await;
    let connector = Connector::new(&cfg).expect("connector");
    let t = Instant::now();
    let health = connector.health().await.expect("PING answers");
    let ping = t.elapsed();
    assert!(!health.draining);
    let session = progress.session().expect("session id");
    let t = Instant::now();
    let id = nbackup_protocol::SessionId::from_hex(&session).expect("id");
    let state = connector.status(id).await.expect("Status answers");
    let status = t.elapsed();
    assert!(matches!(state, SessionState::Open { .. }), "{state:?}");
    let t = Instant::now();
    backup(&cfg, 1).await.expect("a backup to another storage commits meanwhile");
    let other = t.elapsed();
    assert!(!slow_run.is_finished(), "the slow commit was still running throughout");
    eprintln!("during a slow commit: PING {ping:?}, Status {status:?}, a backup to another storage {other:?}");
    // A third of the stall: blocked answers would take most of it.
    assert!(ping < Duration::from_secs(2) && status < Duration::from_secs(2), "{ping:?} {status:?}");
    let report = slow_run.await.expect("task").expect("the slow backup commits too");
    assert_eq!(report.resent_chunks, 0, "the agent kept waiting; nothing was uploaded again");
    assert!(!logs.text().contains("no acknowledgement"), "the commit's deadline never expired");
    server.stop().await;
}

#[tokio::test]
async fn a_peer_that_vanishes_without_fin_is_found_and_its_entry_runs_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = noisy_source(tmp.path(), 24);
    let extra = "  stream_timeout: 1s\n  orphan_timeout: 500ms\n";
    let server = TestServer::start_with(tmp.path(), &pki, &[gzip("main")], extra).await;
    let proxy = Proxy::start(server.addr).await;
    // The vanishing agent: frozen after 2 MiB, and slow to notice itself.
    proxy.fault(0, Fault::FreezeAfter(2 << 20));
    let tuning = Tuning { ack_timeout: "10m", ..Tuning::default() };
    let lost_cfg = agent_config_tuned(&pki, proxy.addr, &[entry("etc", "main", &[&src])], &tuning);
    let lost = tokio::spawn(async move { backup(&lost_cfg, 0).await });
    until("the freeze", || proxy.broken.load(Ordering::SeqCst) > 0).await;
    let frozen = Instant::now();
    // The same entry from the same agent, directly: busy while the server still
    // believes in the frozen stream, accepted once it noticed the silence.
    let tuning = Tuning { attempts: 100, initial_delay: "100ms", max_delay: "100ms", ..Tuning::default() };
    let cfg = agent_config_tuned(&pki, server.addr, &[entry("etc", "main", &[&src])], &tuning);
    let report = backup(&cfg, 0).await.expect("the entry runs again");
    eprintln!("silence found and the entry free again {:?} after the freeze", frozen.elapsed());
    assert!(!report.archive.is_empty());
    lost.abort();
    server.stop().await;
}

#[tokio::test]
async fn our_own_throttle_never_trips_our_own_ack_deadline() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = noisy_source(tmp.path(), 1);
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    // Two streams share 128 KiB/s: one 512 KiB chunk takes ~8 s on the wire, far
    // beyond the 1 s acknowledgement deadline, which counts only after its last byte.
    let tuning = Tuning { ack_timeout: "1s", chunk: "512kb", buffer: "4mb", ..Tuning::default() };
    let spec = EntrySpec { parallels: 2, ..entry("slow", "main", &[&src]) };
    let cfg = config_with(&pki, server.addr, spec, "    bandwidth_limit: 128kb\n", &tuning);
    let report = backup(&cfg, 0).await.expect("commits");
    assert_eq!(report.resent_chunks, 0, "no stream was declared dead");
    let restored = tmp.path().join("restored");
    gnu_extract(&server.archives("main", "web-01", "slow")[0], &restored);
    assert_restored(&[src], &nbackup_protocol::config::Excludes::none(), &restored);
    server.stop().await;
}

#[tokio::test]
async fn connections_in_the_handshake_and_sessions_per_agent_are_capped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 3);
    let extra = "  max_handshakes: 2\n  max_sessions_per_agent: 1\n";
    let server = TestServer::start_with(tmp.path(), &pki, &[gzip("main")], extra).await;
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src]), entry("www", "main", &[&src])]);
    let connector = Connector::new(&cfg).expect("connector");
    // Two silent TCP connections fill the handshake slots; a third is closed at once.
    let idle: Vec<tokio::net::TcpStream> = {
        let mut v = Vec::new();
        for _ in 0..2 {
            v.push(tokio::net::TcpStream::connect(server.addr).await.expect("connect"));
        }
        v
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(connector.health().await.is_err(), "no room in the handshake");
    drop(idle);
    let mut ok = false;
    for _ in 0..50 {
        if connector.health().await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "slots are freed when those connections go");
    // One session per agent: a second entry waits its turn.
    let (held, _) = connector.open_session(hello("web-01", "main", "etc")).await.expect("first session");
    let err = backup(&cfg, 1).await.expect_err("over the agent's session limit");
    assert_eq!(err.refusal().map(|r| r.reason), Some(Reason::Busy), "{err}");
    assert!(err.to_string().contains("max_sessions_per_agent"), "{err}");
    drop(held);
    server.stop().await;
}

#[tokio::test]
async fn running_out_of_descriptors_loses_no_upload() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "2M", 4);
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let scope = server.storage_dir("main").to_string_lossy().into_owned();
    let _emfile = fault::inject("chunk-write", scope, Action::Errno(libc::EMFILE), 2, 2);
    let cfg = agent_config_tuned(
        &pki,
        server.addr,
        &[entry("etc", "main", &[&src])],
        &Tuning { attempts: 5, ..Tuning::default() },
    );
    let report = backup(&cfg, 0).await.expect("commits after the shortage");
    assert!(report.resent_chunks >= 1, "the refused chunks were sent again");
    let archives = server.archives("main", "web-01", "etc");
    assert_eq!(archives.len(), 1);
    check_manifest(&archives[0]);
    server.stop().await;
}

#[tokio::test]
async fn a_storage_without_rename_noreplace_commits_with_links_and_never_overwrites() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 5);
    let storage = tmp.path().join("storage").join("main");
    let _no_rename2 = fault::inject(
        "rename-noreplace",
        storage.to_string_lossy().into_owned(),
        Action::Errno(libc::EINVAL),
        0,
        u32::MAX,
    );
    let (logs, _guard) = Logs::capture();
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src])]);
    let first = backup(&cfg, 0).await.expect("commits with link + unlink");
    logs.wait_for("committing with link + unlink").await;
    let second = backup(&cfg, 0).await.expect("again");
    assert_ne!(first.archive, second.archive);
    let archives = server.archives("main", "web-01", "etc");
    assert_eq!(archives.len(), 2);
    for a in &archives {
        check_manifest(a);
    }
    assert!(server.incoming("main").is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_byte_changed_on_the_servers_disk_is_never_committed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = noisy_source(tmp.path(), 4);
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let proxy = Proxy::start(server.addr).await;
    proxy.pause_after(2 << 20);
    let tuning = Tuning { attempts: 3, ..Tuning::default() };
    let cfg = agent_config_tuned(&pki, proxy.addr, &[entry("etc", "main", &[&src])], &tuning);
    let (logs, _guard) = Logs::capture();
    let run = tokio::spawn(async move { backup(&cfg, 0).await });
    until("the pause", || proxy.is_paused()).await;
    // Something on the server scribbles over the first chunk of the upload.
    let incoming = server.storage_dir("main").join(".incoming");
    let part = fs::read_dir(&incoming)
        .expect("ls")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "part"))
        .expect("upload");
    until("chunk 0 on disk", || fs::metadata(&part).is_ok_and(|m| m.len() > 1 << 20)).await;
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().read(true).write(true).open(&part).expect("open");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 100).expect("read");
        f.write_all_at(&[b[0] ^ 0xff], 100).expect("poke");
    }
    proxy.resume();
    let report = run.await.expect("task").expect("a fresh session commits the true bytes");
    let text = logs.text();
    assert!(text.contains("chunk 0 at offset 0 changed on the server's disk"), "the refusal names the chunk");
    let archives = server.archives("main", "web-01", "etc");
    assert_eq!(archives.len(), 1, "only the verified archive was ever renamed");
    check_manifest(&archives[0]);
    assert!(text.contains("starting a fresh session") || text.contains("attempt failed"), "a fresh session re-sent it");
    assert_eq!(report.sha256, manifest_of(&archives[0]).sha256);
    let restored = tmp.path().join("restored");
    gnu_extract(&archives[0], &restored);
    assert_restored(&[src], &nbackup_protocol::config::Excludes::none(), &restored);
    server.stop().await;
}

#[tokio::test]
async fn a_panic_on_the_archive_thread_fails_the_run_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 6);
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    // Retrying would not help a bug; a fresh timeout would hide it: the run ends now.
    let tuning = Tuning { ack_timeout: "10m", ..Tuning::default() };
    // An entry of its own: the fault is process-wide, and other tests back up web-01/etc.
    let cfg = agent_config_tuned(&pki, server.addr, &[entry("panics", "main", &[&src])], &tuning);
    let _panic = fault::inject("producer:panic", "web-01/panics", Action::Abort, 0, 1);
    let err = tokio::time::timeout(Duration::from_secs(30), backup(&cfg, 0))
        .await
        .expect("fails at once, not after a timeout")
        .expect_err("the run fails");
    assert!(err.to_string().contains("panicked"), "{err}");
    until("the server to end the session", || server.incoming("main").is_empty()).await;
    server.stop().await;
}
