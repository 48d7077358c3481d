//! After backups that meet faults — a cut connection, a frozen one, a full disk, a
//! passing shortage of descriptors, a lost commit answer, a slow commit — and a
//! server shutdown, nothing is left behind: no upload or journal, no
//! entry lock, no tokio task, no file descriptor. A binary of its own, so no other
//! test shares the process while counting.

#[path = "e2e/proxy.rs"]
mod proxy;
#[path = "e2e/support.rs"]
mod support;

use std::time::{Duration, Instant};

use nbackup_daemon::fault::{self, Action};
use nbackup_protocol::wire::Reason;

use proxy::{Fault, Proxy};
use support::*;

async fn settle<F: Fn() -> bool>(what: &str, done: F) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what} did not settle");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_backups_leave_no_uploads_locks_tasks_or_descriptors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join("src");
    dataset(&src, "8M", 41);
    let metrics = tokio::runtime::Handle::current().metrics();
    let fds_before = open_fds();
    {
        let server = TestServer::start_with(tmp.path(), &pki, &[gzip("main")], "  stream_timeout: 1s\n").await;
        let proxy = Proxy::start(server.addr).await;
        proxy.fault(0, Fault::CutAfter(1 << 20));
        let tuning = Tuning { attempts: 5, ack_timeout: "1s", ..Tuning::default() };
        let cfg = agent_config_tuned(&pki, proxy.addr, &[entry("a", "main", &[&src])], &tuning);
        backup(&cfg, 0).await.expect("resumed backup");

        let scope = server.storage_dir("main").to_string_lossy().into_owned();
        {
            let _full = fault::inject("chunk-write", scope.clone(), Action::Errno(libc::ENOSPC), 2, 1);
            let err = backup(&cfg, 0).await.expect_err("disk full");
            assert_eq!(err.refusal().map(|r| r.reason), Some(Reason::DiskFull));
        }
        {
            let _lost = fault::inject("commit:answer", scope.clone(), Action::Drop, 0, 1);
            backup(&cfg, 0).await.expect("committed despite the lost answer");
        }
        {
            let _emfile = fault::inject("chunk-write", scope.clone(), Action::Errno(libc::EMFILE), 3, 1);
            let _slow = fault::inject("commit:verify", scope, Action::Delay(Duration::from_millis(100)), 0, 20);
            backup(&cfg, 0).await.expect("committed after a shortage and a slow commit");
        }
        {
            // A connection that goes silent: the agent moves on, the server drops it.
            let frozen = Proxy::start(server.addr).await;
            frozen.fault(0, Fault::FreezeAfter(1 << 20));
            let cfg = agent_config_tuned(&pki, frozen.addr, &[entry("a", "main", &[&src])], &tuning);
            backup(&cfg, 0).await.expect("resumed past the frozen connection");
            frozen.stop();
        }
        // The entry lock is free: an immediate run is accepted.
        backup(&cfg, 0).await.expect("entry free");
        assert!(server.incoming("main").is_empty(), "left behind: {:?}", server.incoming("main"));
        proxy.stop();
        server.stop().await;
    }
    settle("tokio tasks", || metrics.num_alive_tasks() == 0).await;
    settle("file descriptors", || open_fds() <= fds_before).await;
}
