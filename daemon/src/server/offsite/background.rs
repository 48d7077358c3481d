//! Off-site copies run behind ingestion. A part is read from disk and hashed on one
//! of a few threads of their own with a lower CPU priority (nice 10, which the I/O
//! scheduler reads as a lower I/O priority too), so the kernel serves the sessions'
//! writes and TLS streams first; and while the server is receiving a backup each bucket keeps
//! a single part in flight instead of its `concurrency` (see `upload`).
//!
//! Their own threads, because a thread's priority cannot be raised again without
//! `CAP_SYS_NICE`: lowering a thread of tokio's blocking pool would slow every later
//! task that ran on it, a session's chunk writes included.

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

/// Threads reading and hashing parts for every bucket of the server.
const THREADS: usize = 2;
/// Their CPU niceness (0 is the daemon's own, 19 the lowest).
pub const NICE: i32 = 10;

type Task = Box<dyn FnOnce() + Send>;

fn pool() -> &'static Mutex<mpsc::Sender<Task>> {
    static POOL: OnceLock<Mutex<mpsc::Sender<Task>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Task>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..THREADS {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("offsite-io-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        let task = match crate::lock(&rx).recv() {
                            Ok(t) => t,
                            Err(_) => return,
                        };
                        task();
                    }
                })
                .expect("an off-site I/O thread starts");
        }
        Mutex::new(tx)
    })
}

/// Runs `f` on a low-priority thread.
pub async fn run<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> std::io::Result<R> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task: Task = Box::new(move || {
        let _ = tx.send(f());
    });
    crate::lock(pool()).send(task).map_err(|_| std::io::Error::other("the off-site I/O threads are gone"))?;
    rx.await.map_err(|_| std::io::Error::other("an off-site I/O task panicked"))
}

/// Lowers the calling thread's CPU priority; Linux's I/O schedulers (BFQ, and
/// CFQ before it) derive a thread's best-effort I/O priority from it when none is
/// set, nice 10 giving level 6 of 7. Best effort: a sandbox that refuses leaves the
/// thread as it was (the one-part rule remains).
fn lower_priority() {
    // On Linux a thread id names one thread for PRIO_PROCESS: only this one moves.
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), NICE) {
        tracing::debug!("cannot lower the off-site I/O thread's priority: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_a_thread_of_lower_priority() {
        let nice_of_this_thread =
            || rustix::process::getpriority_process(Some(rustix::thread::gettid())).expect("getpriority");
        let (name, nice) = run(move || (std::thread::current().name().map(str::to_string), nice_of_this_thread()))
            .await
            .expect("runs");
        assert!(name.is_some_and(|n| n.starts_with("offsite-io-")));
        let ours = nice_of_this_thread();
        assert_eq!(nice, (ours + NICE).min(19), "lowered from the daemon's niceness");
        assert_eq!(run(|| 6 * 7).await.expect("runs"), 42);
    }
}
