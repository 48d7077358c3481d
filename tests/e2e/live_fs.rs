//! Live filesystems: files that grow, shrink or vanish while the backup reads them.
//!
//! The agent runs in-process, so the test sees the moment it opens a file in
//! `/proc/self/fd` and changes the file then — no sleeps, no luck.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nbackup_daemon::agent::NoticeKind;

use crate::proxy::Proxy;
use crate::support::*;

/// Runs a backup of `src` whose producer is provably in the middle of reading
/// `path` when `change` runs: a proxy holds back the upload once chunks flow, the
/// window fills and the archive thread blocks inside the (large) file; the test sees
/// the file open in `/proc/self/fd`, changes it, and lets the upload go on.
async fn backup_while_changing(
    tmp: &Path,
    src: &Path,
    storage: StorageSpec,
    path: PathBuf,
    change: impl FnOnce(&Path),
) -> (nbackup_daemon::agent::BackupReport, TestServer) {
    let pki = Pki::new(&tmp.join("pki"));
    let name = storage.name;
    let server = TestServer::start(tmp, &pki, &[storage]).await;
    let proxy = Proxy::start(server.addr).await;
    proxy.pause_after(64 * 1024);
    let cfg = agent_config(&pki, proxy.addr, &[entry("live", name, &[src])]);
    let run = tokio::spawn(async move { backup(&cfg, 0).await });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open = fs::read_dir("/proc/self/fd")
            .expect("procfs")
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t == path));
        // Open *and* stalled: only then is the archiver provably inside the file.
        if open && proxy.is_paused() {
            break;
        }
        assert!(Instant::now() < deadline, "{} was never opened while paused", path.display());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    change(&path);
    proxy.resume();
    let report = run.await.expect("task").expect("backup commits");
    (report, server)
}

/// Lists archive members with sizes using the system tar.
fn listing(archive: &Path) -> String {
    let z = if archive.to_string_lossy().ends_with(".zst") { "--zstd" } else { "--gzip" };
    let out = Command::new("tar").args([z, "-tvf"]).arg(archive).output().expect("tar runs");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const BIG: usize = 48 << 20;

#[tokio::test]
async fn a_file_that_grows_is_cut_at_its_size_when_opened() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("growing.bin"), noise(BIG, 1)).expect("write");
    fs::write(src.join("z-after.txt"), b"after\n").expect("write");
    let (report, server) = backup_while_changing(tmp.path(), &src, gzip("main"), src.join("growing.bin"), |p| {
        let mut f = fs::OpenOptions::new().append(true).open(p).expect("append");
        f.write_all(&[b'x'; 1 << 20]).expect("grow");
    })
    .await;
    let n: Vec<_> = report.notices.iter().filter(|n| n.path.ends_with("growing.bin")).collect();
    assert_eq!(n.len(), 1, "{:?}", report.notices);
    assert_eq!(n[0].kind, NoticeKind::Truncated);
    assert_eq!(report.skipped, 0);
    let archive = &server.archives("main", "web-01", "live")[0];
    let restored = tmp.path().join("restored");
    gnu_extract(archive, &restored);
    let base = restored.join(src.strip_prefix("/").expect("abs"));
    assert_eq!(fs::read(base.join("growing.bin")).expect("restored"), noise(BIG, 1), "exactly the original bytes");
    assert_eq!(fs::read(base.join("z-after.txt")).expect("later file"), b"after\n");
    server.stop().await;
}

#[tokio::test]
async fn a_file_that_shrinks_is_padded_and_the_archive_stays_valid() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("shrinking.bin"), noise(BIG, 2)).expect("write");
    fs::write(src.join("z-after.txt"), b"after\n").expect("write");
    let (report, server) = backup_while_changing(tmp.path(), &src, zstd("main"), src.join("shrinking.bin"), |p| {
        fs::OpenOptions::new().write(true).open(p).expect("open").set_len(4096).expect("truncate");
    })
    .await;
    let n: Vec<_> = report.notices.iter().filter(|n| n.path.ends_with("shrinking.bin")).collect();
    assert_eq!(n.len(), 1, "{:?}", report.notices);
    assert_eq!(n[0].kind, NoticeKind::Padded);
    let archive = &server.archives("main", "web-01", "live")[0];
    // The member keeps its announced size, and the members after it are intact.
    assert!(listing(archive).contains(&format!(" {BIG} ")), "{}", listing(archive));
    let restored = tmp.path().join("restored");
    gnu_extract(archive, &restored);
    let base = restored.join(src.strip_prefix("/").expect("abs"));
    let data = fs::read(base.join("shrinking.bin")).expect("restored");
    assert_eq!(data.len(), BIG);
    assert_eq!(&data[..4096], &noise(BIG, 2)[..4096], "what was there when read is kept");
    assert_eq!(fs::read(base.join("z-after.txt")).expect("later file"), b"after\n");
    server.stop().await;
}

#[tokio::test]
async fn files_and_directories_that_vanish_are_skipped_and_reported() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("c-dir/inner")).expect("mkdir");
    fs::write(src.join("a-big.bin"), noise(BIG, 3)).expect("write");
    // The archiver reads entries ahead of the tar writer (up to 256); these keep the
    // names that vanish out of its reach while it is stuck in a-big.bin.
    fs::create_dir_all(src.join("b-fill")).expect("mkdir");
    for i in 0..600 {
        fs::write(src.join(format!("b-fill/{i:04}")), b"x").expect("write");
    }
    fs::write(src.join("c-dir/inner/f.txt"), b"gone\n").expect("write");
    fs::write(src.join("d-vanish.txt"), b"gone\n").expect("write");
    fs::write(src.join("e-stays.txt"), b"stays\n").expect("write");
    let s = src.clone();
    let (report, server) = backup_while_changing(tmp.path(), &src, gzip("main"), src.join("a-big.bin"), move |_| {
        fs::remove_file(s.join("d-vanish.txt")).expect("rm file");
        fs::remove_dir_all(s.join("c-dir")).expect("rm dir");
    })
    .await;
    let skipped: Vec<&str> =
        report.notices.iter().filter(|n| n.kind == NoticeKind::Skipped).map(|n| n.path.as_str()).collect();
    assert!(skipped.iter().any(|p| p.ends_with("d-vanish.txt")), "{:?}", report.notices);
    assert!(skipped.iter().any(|p| p.ends_with("c-dir")), "{:?}", report.notices);
    assert!(report.notices.iter().all(|n| n.detail.contains("vanished")), "{:?}", report.notices);
    assert_eq!(report.skipped as usize, skipped.len());
    let restored = tmp.path().join("restored");
    gnu_extract(&server.archives("main", "web-01", "live")[0], &restored);
    let base = restored.join(src.strip_prefix("/").expect("abs"));
    assert_eq!(fs::read(base.join("e-stays.txt")).expect("kept"), b"stays\n");
    assert_eq!(fs::read(base.join("b-fill/0599")).expect("kept"), b"x");
    assert!(!base.join("d-vanish.txt").exists());
    server.stop().await;
}
