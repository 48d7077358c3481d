//! Soak: a multi-GiB backup while a proxy resets the connection at random every few
//! seconds. Ignored by default; run it with
//!
//! ```sh
//! cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! `NBACKUP_SOAK_SIZE` (default `2G`) sets the dataset size, `NBACKUP_SOAK_DATA` a
//! directory to keep it in between runs, `NBACKUP_SOAK_CUTS` the interval between
//! cuts in milliseconds as `min,max` (default `1000,4000`), `NBACKUP_SOAK_COMPRESSION`
//! `gzip` (default) or `zstd`. It prints the bytes put on the wire divided
//! by the archive size — what resending after each cut costs.

#[path = "e2e/proxy.rs"]
mod proxy;
#[path = "e2e/support.rs"]
mod support;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nbackup_protocol::config::Excludes;

use proxy::Proxy;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long; run explicitly"]
async fn multi_gib_backup_through_random_connection_resets() {
    let size = std::env::var("NBACKUP_SOAK_SIZE").unwrap_or_else(|_| "2G".into());
    let (lo, hi) = std::env::var("NBACKUP_SOAK_CUTS")
        .ok()
        .and_then(|s| s.split_once(',').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?))))
        .unwrap_or((1000u64, 4000u64));
    let zstd_storage = std::env::var("NBACKUP_SOAK_COMPRESSION").is_ok_and(|c| c == "zstd");
    let tmp = tempfile::tempdir().expect("tempdir");
    let src: PathBuf = match std::env::var("NBACKUP_SOAK_DATA") {
        Ok(dir) if std::path::Path::new(&dir).join("text").exists() => dir.into(),
        Ok(dir) => dataset(std::path::Path::new(&dir), &size, 1),
        Err(_) => dataset(&tmp.path().join("data"), &size, 1),
    };
    let pki = Pki::new(&tmp.path().join("pki"));
    let storage = if zstd_storage { zstd("main") } else { gzip("main") };
    let server = TestServer::start(tmp.path(), &pki, &[storage]).await;
    let proxy = Proxy::start(server.addr).await;
    proxy.random_cuts(Duration::from_millis(lo), Duration::from_millis(hi));
    let tuning = Tuning {
        buffer: "256mb",
        chunk: "1mb",
        ack_timeout: "5s",
        attempts: 1000,
        initial_delay: "100ms",
        max_delay: "1s",
    };
    let cfg = agent_config_tuned(&pki, proxy.addr, &[entry("soak", "main", &[&src])], &tuning);
    let started = Instant::now();
    let report = backup(&cfg, 0).await.expect("the backup survives every cut");
    let secs = started.elapsed().as_secs_f64();
    let cuts = proxy.broken.load(Ordering::SeqCst);
    let overhead = report.bytes_transmitted as f64 / report.bytes_sent as f64;
    println!(
        "soak: {:.2} GB read, archive {:.2} GB, {} connections cut, {} chunks resent, \
         wire bytes / archive = {overhead:.3}, {secs:.0} s ({:.0} MB/s of source)",
        report.bytes_read as f64 / 1e9,
        report.bytes_sent as f64 / 1e9,
        cuts,
        report.resent_chunks,
        report.bytes_read as f64 / 1e6 / secs
    );
    assert!(cuts >= 1, "the proxy cut connections");
    let archive = &server.archives("main", "web-01", "soak")[0];
    check_manifest(archive);
    let restored = tmp.path().join("restored");
    gnu_extract(archive, &restored);
    assert_restored(&[src], &Excludes::none(), &restored);
    assert!(server.incoming("main").is_empty());
    server.stop().await;
}
