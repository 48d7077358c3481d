//! A pool of worker threads whose results come back in the order the jobs went in:
//! what block-parallel compression and decompression need to stay a stream.

use std::collections::VecDeque;
use std::io;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

type Reply<O> = SyncSender<io::Result<O>>;

/// Jobs of type `I` run on `workers` threads (each with its own state, built once);
/// [`Ordered::pop`] returns results oldest first.
pub(crate) struct Ordered<I, O> {
    jobs: Option<SyncSender<(I, Reply<O>)>>,
    workers: Vec<JoinHandle<()>>,
    in_flight: VecDeque<Receiver<io::Result<O>>>,
}

impl<I: Send + 'static, O: Send + 'static> Ordered<I, O> {
    pub fn new<S, Init, Work>(name: &str, workers: usize, init: Init, work: Work) -> io::Result<Self>
    where
        Init: Fn() -> S + Send + Sync + 'static,
        Work: Fn(&mut S, I) -> io::Result<O> + Send + Sync + 'static,
    {
        let workers = workers.max(1);
        let (tx, rx) = sync_channel::<(I, Reply<O>)>(workers);
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new((init, work));
        let workers = (0..workers)
            .map(|i| {
                let rx = rx.clone();
                let shared = shared.clone();
                std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || {
                    let (init, work) = &*shared;
                    let mut state = init();
                    loop {
                        // The lock is held only while waiting for the next job.
                        let next = crate::lock(&rx).recv();
                        let Ok((job, reply)) = next else { return };
                        let _ = reply.send(work(&mut state, job));
                    }
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Ordered { jobs: Some(tx), workers, in_flight: VecDeque::new() })
    }

    /// Queues a job; blocks while every worker is busy and the queue is full.
    pub fn push(&mut self, job: I) -> io::Result<()> {
        let (reply, rx) = sync_channel(1);
        self.jobs
            .as_ref()
            .expect("the queue is open until drop")
            .send((job, reply))
            .map_err(|_| io::Error::other("the worker threads are gone"))?;
        self.in_flight.push_back(rx);
        Ok(())
    }

    /// Jobs pushed whose results have not been popped.
    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// The oldest job's result, waiting for it; `None` when nothing is in flight.
    pub fn pop(&mut self) -> Option<io::Result<O>> {
        let rx = self.in_flight.pop_front()?;
        Some(rx.recv().unwrap_or_else(|_| Err(io::Error::other("a worker thread panicked"))))
    }
}

impl<I, O> Drop for Ordered<I, O> {
    fn drop(&mut self) {
        self.jobs = None; // closes the queue: workers finish their job and exit
        self.in_flight.clear();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_submission_order_whatever_finishes_first() {
        let mut pool = Ordered::new(
            "test",
            4,
            || (),
            |_, n: u64| {
                // Later jobs finish first.
                std::thread::sleep(std::time::Duration::from_millis(20 - n * 2));
                Ok(n * 10)
            },
        )
        .expect("pool");
        for n in 0..8 {
            pool.push(n).expect("push");
        }
        let got: Vec<u64> = std::iter::from_fn(|| pool.pop()).map(|r| r.expect("job")).collect();
        assert_eq!(got, (0..8).map(|n| n * 10).collect::<Vec<_>>());
    }

    #[test]
    fn a_failed_job_is_its_own_result_and_the_pool_goes_on() {
        let mut pool =
            Ordered::new("test", 2, || (), |_, n: u32| if n == 1 { Err(io::Error::other("one")) } else { Ok(n) })
                .expect("pool");
        for n in 0..3 {
            pool.push(n).expect("push");
        }
        assert_eq!(pool.pop().expect("in flight").expect("ok"), 0);
        assert!(pool.pop().expect("in flight").is_err());
        assert_eq!(pool.pop().expect("in flight").expect("ok"), 2);
        assert!(pool.pop().is_none());
    }
}
