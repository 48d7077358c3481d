//! Commit, rotation, health and shutdown as seen from the outside.

use std::fs;
use std::time::Duration;

use nbackup_daemon::agent::Connector;

use crate::support::*;

#[tokio::test]
async fn rotation_keeps_the_newest_archives_with_their_manifests() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 4);
    let mut spec = gzip("main");
    spec.max_backups = 2;
    let server = TestServer::start(tmp.path(), &pki, &[spec]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src])]);
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(backup(&cfg, 0).await.expect("backup").archive);
    }
    let unique: std::collections::HashSet<_> = names.iter().collect();
    assert_eq!(unique.len(), 4, "every run has its own archive name: {names:?}");
    let left: Vec<String> = server
        .archives("main", "web-01", "etc")
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, names[2..].to_vec(), "the two newest remain");
    let dir = server.storage_dir("main").join("web-01/etc");
    assert_eq!(fs::read_dir(&dir).expect("ls").count(), 6, "two archives, their manifests and catalogs");
    for a in server.archives("main", "web-01", "etc") {
        check_manifest(&a);
    }
    let storage = server.storage_dir("main");
    server.stop().await;
    // Freed after each commit was answered, by a task shutdown waits for.
    assert!(rotated_out(&storage).is_empty(), "not freed: {:?}", rotated_out(&storage));
    assert!(leftovers(&storage).is_empty(), "{:?}", leftovers(&storage));
}

#[tokio::test]
async fn health_reports_real_disk_space_per_storage() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main"), zstd("cold")]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[tmp.path()])]);
    let health = Connector::new(&cfg).expect("connector").health().await.expect("health");
    assert_eq!(health.server_version, nbackup_daemon::VERSION);
    assert!(!health.draining);
    let names: Vec<&str> = health.storages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["cold", "main"]);
    let (free, total) = nbackup_daemon::fsutil::disk_space(&server.storage_dir("main")).expect("statvfs");
    let main = &health.storages[1];
    assert_eq!(main.total_bytes, total);
    assert!(main.free_bytes.abs_diff(free) < 256 << 20, "free {} vs {}", main.free_bytes, free);
    server.stop().await;
}

#[tokio::test]
async fn a_graceful_restart_mid_backup_keeps_the_upload_and_the_agent_resumes_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    // Incompressible data so the backup takes a while.
    fs::write(src.join("noise.bin"), noise(96 << 20, 7)).expect("write");
    let mut server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let tuning = Tuning { attempts: 30, initial_delay: "100ms", max_delay: "300ms", ..Tuning::default() };
    let cfg = agent_config_tuned(&pki, server.addr, &[entry("etc", "main", &[&src])], &tuning);
    let incoming = server.storage_dir("main").join(".incoming");
    let run = tokio::spawn(async move { backup(&cfg, 0).await });
    // Wait until a few MiB are on the server's disk.
    let part_len = || {
        fs::read_dir(&incoming)
            .ok()
            .and_then(|d| d.flatten().find(|e| e.path().extension().is_some_and(|x| x == "part")))
            .and_then(|e| e.metadata().ok())
            .map_or(0, |m| m.len())
    };
    while part_len() < 4 << 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.restart().await;
    let report = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("agent ends")
        .expect("task")
        .expect("the backup carries on after the restart");
    // Resumed, not started over: the bytes before the restart were not sent again
    // (at most the window's worth).
    assert!(
        report.bytes_transmitted < report.bytes_sent + (16 << 20) + (1 << 20),
        "sent {} for an archive of {}",
        report.bytes_transmitted,
        report.bytes_sent
    );
    let archives = server.archives("main", "web-01", "etc");
    assert_eq!(archives.len(), 1);
    check_manifest(&archives[0]);
    assert!(server.incoming("main").is_empty(), "nothing left in .incoming");
    server.stop().await;
}
