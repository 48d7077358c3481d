//! What goes in comes out: contents and metadata, awkward names and file types.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nbackup_daemon::agent::NoticeKind;
use nbackup_protocol::config::Excludes;

use crate::support::*;

fn set_mtime(p: &Path, secs: i64) {
    use rustix::fs::{AtFlags, CWD, Timespec, Timestamps, utimensat};
    let t = Timespec { tv_sec: secs, tv_nsec: 0 };
    utimensat(CWD, p, &Timestamps { last_access: t, last_modification: t }, AtFlags::SYMLINK_NOFOLLOW)
        .expect("utimensat");
}

/// A tree with every kind of entry and name a backup must keep.
fn tricky_tree(root: &Path) {
    let w = |rel: &str, data: &[u8], mode: u32| {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, data).expect("write");
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
    };
    w("plain.txt", b"hello\n", 0o640);
    w("exec.sh", b"#!/bin/sh\n", 0o755);
    w("name with spaces.txt", b"s\n", 0o644);
    w("naïve-ünïcödé-名前.txt", b"u\n", 0o644);
    w("empty-file", b"", 0o600);
    w("big.bin", &(0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>(), 0o644);
    let bad = root.join(std::ffi::OsStr::from_bytes(b"non-utf8-\xff\xfe.bin"));
    fs::write(&bad, b"latin1 name\n").expect("non-utf8 name");
    let deep: String = (0..10).map(|i| format!("directory-level-{i:02}/")).collect();
    w(&format!("{deep}leaf.txt"), b"deep\n", 0o644);
    w(&format!("long/{}", "x".repeat(255)), b"255-byte name\n", 0o644);
    fs::create_dir_all(root.join("empty-dir")).expect("empty dir");
    fs::set_permissions(root.join("empty-dir"), fs::Permissions::from_mode(0o700)).expect("chmod");
    std::os::unix::fs::symlink("plain.txt", root.join("link")).expect("symlink");
    std::os::unix::fs::symlink("nowhere/at/all", root.join("dangling")).expect("dangling");
    std::os::unix::fs::symlink("empty-dir", root.join("dir-link")).expect("dir symlink");
    std::os::unix::fs::symlink("t".repeat(150), root.join("long-target")).expect("long target");
    w("h1", b"linked\n", 0o644);
    fs::hard_link(root.join("h1"), root.join("h2")).expect("hard link");
    fs::create_dir_all(root.join("sub")).expect("sub");
    fs::hard_link(root.join("h1"), root.join("sub/h3")).expect("hard link 3");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .expect("mkfifo");
    w("ro-dir/inside.txt", b"in a read-only dir\n", 0o644);
    fs::set_permissions(root.join("ro-dir"), fs::Permissions::from_mode(0o555)).expect("chmod ro");
    if nbackup_daemon::restore::running_as_root() {
        w("setuid", b"s\n", 0o4755);
        let dev = rustix::fs::makedev(1, 3);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("null-dev"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            dev,
        )
        .expect("mknod");
        w("owned", b"o\n", 0o644);
        std::os::unix::fs::chown(root.join("owned"), Some(1234), Some(5678)).expect("chown");
        std::os::unix::fs::lchown(root.join("link"), Some(4321), Some(8765)).expect("lchown");
    }
    let _sock = std::os::unix::net::UnixListener::bind(root.join("daemon.sock")).expect("socket");
    std::mem::forget(_sock);
    // Old, distinct mtimes last, so creating entries does not disturb them.
    for (i, rel) in ["plain.txt", "exec.sh", "h1", "empty-file", "link", "dangling", "fifo"].iter().enumerate() {
        set_mtime(&root.join(rel), 1_000_000_000 + i as i64 * 3600);
    }
    for dir in ["empty-dir", "sub", "long", "ro-dir", ""] {
        set_mtime(&root.join(dir), 1_100_000_000);
    }
}

async fn round_trip(storage: StorageSpec, parallels: u16) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src_a = tmp.path().join("src-a");
    let src_b = tmp.path().join("src/b");
    tricky_tree(&src_a);
    dataset(&src_b, "6M", 7);
    let name = storage.name;
    let server = TestServer::start(tmp.path(), &pki, &[storage]).await;
    let mut e = entry("tricky", name, &[&src_a, &src_b]);
    e.parallels = parallels;
    let cfg = agent_config(&pki, server.addr, &[e]);
    let report = backup(&cfg, 0).await.expect("backup commits");

    let socket: Vec<_> = report.notices.iter().filter(|n| n.path.ends_with("daemon.sock")).collect();
    assert_eq!(socket.len(), 1, "the socket is reported: {:?}", report.notices);
    assert_eq!(socket[0].kind, NoticeKind::Skipped);
    assert!(socket[0].detail.contains("socket"));
    assert_eq!(report.skipped, 1, "only the socket is skipped: {:?}", report.notices);

    let archives = server.archives(name, "web-01", "tricky");
    assert_eq!(archives.len(), 1);
    let manifest = check_manifest(&archives[0]);
    assert_eq!(manifest.sha256, report.sha256);
    assert_eq!(manifest.size, report.bytes_sent);
    assert_eq!(manifest.entries, report.entries);
    let restored = tmp.path().join("restored");
    gnu_extract(&archives[0], &restored);
    let src_b2 = src_b.clone();
    assert_restored(&[src_a.clone(), src_b], &Excludes::none(), &restored);
    // Hard links come back as links, not copies.
    let rel = src_a.strip_prefix("/").expect("absolute");
    let ino =
        |p: &str| std::os::unix::fs::MetadataExt::ino(&fs::metadata(restored.join(rel).join(p)).expect("restored"));
    assert_eq!(ino("h1"), ino("h2"));
    assert_eq!(ino("h1"), ino("sub/h3"));

    // And the same through `nbackup restore`'s path: RSTR, SHA-256, our extractor.
    let ours = tmp.path().join("restored-by-nbackup");
    let client = nbackup_daemon::agent::fetch::RestoreClient::new(
        nbackup_daemon::agent::Connector::new(&cfg).expect("connector"),
        cfg.name.clone(),
        cfg.retry,
    );
    let which = nbackup_daemon::agent::fetch::ArchiveRef {
        storage: cfg.backups[0].storage.clone(),
        backup: cfg.backups[0].name.clone(),
        archive: report.archive.clone(),
    };
    let spec = nbackup_daemon::agent::restore::RestoreSpec::everything(
        which,
        manifest.compression,
        manifest.size,
        ours.clone(),
    );
    let progress = std::sync::Arc::new(nbackup_daemon::agent::restore::RestoreProgress::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    let outcome = nbackup_daemon::agent::restore::restore(&client, spec, None, progress, Box::new(|_| {}), &cancel)
        .await
        .expect("restores");
    assert_eq!(outcome.verified(), Some(true));
    assert!(outcome.report.problems.is_empty(), "{:?}", outcome.report.problems);
    assert_eq!(outcome.report.restored, report.entries);
    assert_restored(&[src_a.clone(), src_b2], &Excludes::none(), &ours);
    let ino = |p: &str| std::os::unix::fs::MetadataExt::ino(&fs::metadata(ours.join(rel).join(p)).expect("restored"));
    assert_eq!(ino("h1"), ino("h2"));
    assert_eq!(ino("h1"), ino("sub/h3"));
    assert!(server.incoming(name).is_empty(), "no upload left behind");
    server.stop().await;
}

#[tokio::test]
async fn gzip_archive_restores_with_gnu_tar_byte_for_byte() {
    round_trip(gzip("main"), 1).await;
}

#[tokio::test]
async fn zstd_archive_restores_with_gnu_tar_byte_for_byte() {
    round_trip(zstd("fast"), 1).await;
}

#[tokio::test]
async fn several_streams_produce_the_same_archive_contents() {
    round_trip(gzip("main"), 4).await;
}

#[tokio::test]
async fn excludes_leave_out_names_paths_and_subtrees() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join("src");
    for rel in [
        "keep.txt",
        "app.log",
        "a/b/deep.log",
        "cache/x/y.bin",
        "a/cache/kept.txt",
        "node_modules/m.js",
        "a/node_modules/n.js",
        "logs/old.gz",
        "logs/sub/new.gz",
    ] {
        let p = src.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, rel).expect("write");
    }
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let mut e = entry("web", "main", &[&src]);
    e.exclude = vec!["*.log", "cache/**", "node_modules", "logs/*.gz"];
    let patterns = e.exclude.clone();
    let cfg = agent_config(&pki, server.addr, &[e]);
    let report = backup(&cfg, 0).await.expect("backup");
    assert!(report.excluded >= 5, "excluded {}", report.excluded);
    let restored = tmp.path().join("restored");
    gnu_extract(&server.archives("main", "web-01", "web")[0], &restored);
    let base = restored.join(src.strip_prefix("/").expect("absolute"));
    for gone in ["app.log", "a/b/deep.log", "cache/x", "node_modules", "a/node_modules", "logs/old.gz"] {
        assert!(!base.join(gone).exists(), "{gone} should be excluded");
    }
    for kept in ["keep.txt", "a/cache/kept.txt", "logs/sub/new.gz", "cache"] {
        assert!(base.join(kept).exists(), "{kept} should be kept");
    }
    assert_restored(&[src], &Excludes::new(&patterns).expect("patterns"), &restored);
    server.stop().await;
}

#[tokio::test]
async fn dataset_from_the_shared_generator_round_trips_in_both_formats() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src: PathBuf = dataset(&tmp.path().join("data"), "24M", 1);
    let server = TestServer::start(tmp.path(), &pki, &[gzip("gz"), zstd("zs")]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("data-gz", "gz", &[&src]), entry("data-zs", "zs", &[&src])]);
    let (a, b) = tokio::join!(backup(&cfg, 0), backup(&cfg, 1));
    let (a, b) = (a.expect("gzip entry"), b.expect("zstd entry"));
    assert_eq!(a.bytes_read, b.bytes_read);
    for (storage, entry_name) in [("gz", "data-gz"), ("zs", "data-zs")] {
        let archive = &server.archives(storage, "web-01", entry_name)[0];
        check_manifest(archive);
        let restored = tmp.path().join(format!("restored-{storage}"));
        gnu_extract(archive, &restored);
        assert_restored(std::slice::from_ref(&src), &Excludes::none(), &restored);
    }
    server.stop().await;
}
