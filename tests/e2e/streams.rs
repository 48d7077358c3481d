//! Several streams, the autoscaler, and the bandwidth limit, through the real path.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nbackup_daemon::agent::autoscale::Decision;
use nbackup_protocol::config::Excludes;

use crate::proxy::{Fault, Proxy};
use crate::support::*;

#[tokio::test]
async fn a_dead_streams_chunks_are_carried_by_the_other_streams() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    // 32 MiB: enough that every stream carries well over 512 KiB even when the joins
    // are slow (a loaded CI box once finished 12 MiB before stream 1 reached the cut).
    let src = noisy_source(tmp.path(), 32);
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let proxy = Proxy::start(server.addr).await;
    // Connection 1 is one of the joined streams: it dies after 512 KiB, and from the
    // fourth connection on nothing gets through, so it can never re-join; only the
    // other streams can deliver what it had in flight.
    proxy.fault(1, Fault::CutAfter(512 << 10));
    proxy.refuse_from(3);
    let mut spec = entry("par", "main", &[&src]);
    spec.parallels = 3;
    let tuning = Tuning { attempts: 3, ack_timeout: "2s", ..Tuning::default() };
    let cfg = config_with(&pki, proxy.addr, spec, "", &tuning);
    let report = backup(&cfg, 0).await.expect("the remaining streams finish the backup");
    assert_eq!(report.streams, 3);
    assert!(proxy.broken.load(Ordering::SeqCst) >= 1, "the cut happened");
    assert!(report.resent_chunks > 0, "the dead stream's chunks were resent");
    // The cut happened; whether the dead stream's re-join was refused before the
    // others finished depends on its backoff, so it is not asserted.
    assert!(proxy.broken.load(Ordering::SeqCst) >= 1);
    let restored = tmp.path().join("restored");
    gnu_extract(&server.archives("main", "web-01", "par")[0], &restored);
    assert_restored(std::slice::from_ref(&src), &Excludes::none(), &restored);
    assert!(server.incoming("main").is_empty());
    server.stop().await;
}

#[tokio::test]
async fn the_bandwidth_limit_holds_for_all_streams_together() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = noisy_source(tmp.path(), 3);
    let server = TestServer::start(tmp.path(), &pki, &[zstd("main")]).await;
    let mut spec = entry("slow", "main", &[&src]);
    spec.parallels = 3;
    let cfg = config_with(&pki, server.addr, spec, "    bandwidth_limit: 1mb\n", &Tuning::default());
    assert_eq!(cfg.backups[0].bandwidth.default, Some(1 << 20));
    let started = Instant::now();
    let report = backup(&cfg, 0).await.expect("backup");
    let secs = started.elapsed().as_secs_f64();
    // Not a speed check: a correctness bound. 3 MiB of incompressible data cannot
    // pass a 1 MiB/s limit in much under three seconds, however many streams.
    let floor = report.bytes_sent as f64 / f64::from(1 << 20) * 0.9;
    assert!(secs >= floor, "{} bytes in {secs:.2} s beat the limit", report.bytes_sent);
    let restored = tmp.path().join("restored");
    gnu_extract(&server.archives("main", "web-01", "slow")[0], &restored);
    assert_restored(std::slice::from_ref(&src), &Excludes::none(), &restored);
    server.stop().await;
}

#[tokio::test]
async fn the_autoscaler_adds_streams_when_the_network_is_the_bottleneck() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = noisy_source(tmp.path(), 8);
    let server = TestServer::start(tmp.path(), &pki, &[zstd("main")]).await;
    let proxy = Proxy::start(server.addr).await;
    // Each connection is slow (latency per read), so more connections carry more.
    proxy.shape(Duration::from_millis(10), 0);
    let mut spec = entry("scaled", "main", &[&src]);
    spec.parallels = 4;
    let tuning = Tuning { buffer: "4mb", ..Tuning::default() };
    let cfg =
        config_with(&pki, proxy.addr, spec, "    auto_scaler:\n      enabled: true\n      interval: 300ms\n", &tuning);
    let report = backup(&cfg, 0).await.expect("backup");
    let adds = report.scaler_decisions.iter().filter(|e| matches!(e.decision, Decision::Add(_))).count();
    assert!(adds >= 1, "{:#?}", report.scaler_decisions);
    assert!(report.streams >= 2, "peak streams {}", report.streams);
    assert!(
        report.scaler_decisions.iter().any(|e| e.reason.contains("network is the bottleneck")),
        "{:#?}",
        report.scaler_decisions
    );
    let restored = tmp.path().join("restored");
    gnu_extract(&server.archives("main", "web-01", "scaled")[0], &restored);
    assert_restored(std::slice::from_ref(&src), &Excludes::none(), &restored);
    assert!(server.incoming("main").is_empty());
    server.stop().await;
}
