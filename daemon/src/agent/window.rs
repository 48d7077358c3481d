//! The agent's window: every chunk that is produced but not yet acknowledged, shared
//! by the producer thread and all streams of one backup.
//!
//! * The producer pushes chunks; each holds permits of a byte semaphore, so a full
//!   window blocks the producer (backpressure) and an acknowledged chunk frees its
//!   bytes simply by being dropped.
//! * The window starts small and grows — up to `resume.buffer_size` — only when the
//!   link needs it: about four times a second it compares its size with twice the
//!   bandwidth-delay product it measures (drain rate × the fastest acknowledgement
//!   seen). A server slower than the producer then costs a small window, not
//!   `buffer_size` of memory, while a long fat network still gets a full pipe.
//! * Streams take the lowest queued chunk, send it, and mark it in flight on that
//!   stream. When a stream dies, its in-flight chunks go back to the queue and any
//!   stream resends them — resume, re-join and rotation are all this one rule.
//! * Once the producer has finished and everything is acknowledged, the `Commit`
//!   becomes the next item; it too goes back to the queue if its stream dies before
//!   the answer, so it is retried until answered.
//!
//! One `std::sync::Mutex` guards the state; it is never held across an `.await`.
//! Streams wait on a `Notify` that is signalled on every change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use nbackup_protocol::wire::{Chunk, Commit, Committed, Refusal};

/// Why a backup's transfer ended without a commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The server refused or aborted the session.
    #[error("{0}")]
    Server(Refusal),
    /// Reading or compressing the sources failed.
    #[error("reading sources failed: {0}")]
    Source(String),
    /// No stream could reach the server within the retry budget.
    #[error("connection lost: {0}")]
    Connection(String),
    /// The server no longer has what this session needs (it forgot the session, or
    /// lost data the agent no longer holds): only a fresh session can help.
    #[error("session lost: {0}")]
    SessionLost(String),
    /// Stopped by the user or a shutdown.
    #[error("cancelled")]
    Cancelled,
}

/// What a stream should send next.
#[derive(Debug, Clone)]
pub enum Item {
    Chunk(Chunk),
    Commit(Commit),
}

/// The transfer is over; streams should stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    Committed(Committed),
    Failed(Failure),
}

enum Slot {
    Queued,
    /// Taken by `stream`; `sent` is when its last byte was written (`None` while it is
    /// still being written, e.g. paced by the bandwidth limit). The acknowledgement
    /// deadline counts from `sent`, so our own throttle never trips it.
    InFlight {
        stream: u16,
        sent: Option<Instant>,
    },
}

struct Pending {
    chunk: Chunk,
    slot: Slot,
    // Released when the chunk is acknowledged and this entry dropped.
    _permit: OwnedSemaphorePermit,
}

enum CommitState {
    /// Producer still running or chunks unacknowledged.
    Waiting,
    Ready(Commit),
    InFlight {
        commit: Commit,
        stream: u16,
        /// When it was written, or the server last said it is still committing.
        sent: Option<Instant>,
    },
}

/// What the window measures to decide whether to grow.
struct Growth {
    /// Fastest chunk acknowledgement seen (write finished → ack): the round trip
    /// without queueing.
    fastest_ack: Option<Duration>,
    since: Instant,
    acked_then: u64,
}

struct State {
    /// Sequence number the next pushed chunk gets.
    next_seq: u64,
    growth: Growth,
    pending: BTreeMap<u64, Pending>,
    queued: BTreeSet<u64>,
    produced: Option<Commit>,
    /// The archive's catalog, sent before every `Commit` (see [`Window::catalog`]).
    catalog: Bytes,
    commit: CommitState,
    finished: Option<Finished>,
}

pub struct Window {
    state: Mutex<State>,
    changed: Notify,
    budget: Arc<Semaphore>,
    /// Current size in bytes; only grows, up to `max`.
    capacity: AtomicU64,
    max: u64,
    /// Compressed bytes acknowledged by the server (resends not counted twice).
    pub acked_bytes: AtomicU64,
    /// Chunks sent again after a stream was lost.
    pub resent_chunks: AtomicU64,
    /// Compressed bytes put on the wire, resends included.
    pub sent_bytes: AtomicU64,
}

/// Where a backup's window starts (`resume.buffer_size` is where it may grow to).
pub const INITIAL: u64 = 16 << 20;

/// How often the window reconsiders its size.
const GROWTH_INTERVAL: Duration = Duration::from_millis(250);

impl Window {
    /// A window of `max` bytes from the start.
    pub fn new(max: u64) -> Arc<Self> {
        Self::growing(max, max)
    }

    /// A window of `initial` bytes that may grow to `max` when the link needs it.
    pub fn growing(initial: u64, max: u64) -> Arc<Self> {
        let max = max.min(Semaphore::MAX_PERMITS as u64);
        let capacity = initial.min(max);
        Arc::new(Window {
            state: Mutex::new(State {
                next_seq: 0,
                growth: Growth { fastest_ack: None, since: Instant::now(), acked_then: 0 },
                pending: BTreeMap::new(),
                queued: BTreeSet::new(),
                produced: None,
                catalog: Bytes::new(),
                commit: CommitState::Waiting,
                finished: None,
            }),
            changed: Notify::new(),
            budget: Arc::new(Semaphore::new(capacity as usize)),
            capacity: AtomicU64::new(capacity),
            max,
            acked_bytes: AtomicU64::new(0),
            resent_chunks: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn signal(&self) {
        self.changed.notify_waiters();
    }

    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Bytes currently held (queued or in flight).
    pub fn used(&self) -> u64 {
        self.capacity().saturating_sub(self.budget.available_permits() as u64)
    }

    /// Grows the window to twice the measured bandwidth-delay product when it is
    /// smaller (at least by a quarter, at most to `max`). Called with the state
    /// locked, on an acknowledgement that took `latency`.
    fn consider_growth(&self, st: &mut State, latency: Option<Duration>) {
        let g = &mut st.growth;
        if let Some(l) = latency {
            g.fastest_ack = Some(g.fastest_ack.map_or(l, |f| f.min(l)));
        }
        let elapsed = g.since.elapsed();
        if elapsed < GROWTH_INTERVAL {
            return;
        }
        let acked = self.acked_bytes.load(Ordering::Relaxed);
        let drain_bps = acked.saturating_sub(g.acked_then) as f64 / elapsed.as_secs_f64();
        (g.since, g.acked_then) = (Instant::now(), acked);
        let Some(rtt) = g.fastest_ack else { return };
        let needed = (2.0 * drain_bps * rtt.as_secs_f64()) as u64;
        let capacity = self.capacity();
        if needed <= capacity || capacity >= self.max {
            return;
        }
        let grown = needed.max(capacity + capacity / 4).min(self.max);
        self.budget.add_permits((grown - capacity) as usize);
        self.capacity.store(grown, Ordering::Relaxed);
        tracing::debug!(from = capacity, to = grown, drain_bps, rtt_ms = rtt.as_secs_f64() * 1e3, "window grown");
    }

    /// Adds a chunk, waiting while the window is full. Returns `false` if the transfer
    /// has ended (the producer should stop).
    pub async fn push(&self, chunk: Chunk) -> bool {
        let need = u32::try_from(chunk.data.len()).unwrap_or(u32::MAX);
        let Ok(permit) = self.budget.clone().acquire_many_owned(need).await else {
            return false;
        };
        let mut st = self.lock();
        if st.finished.is_some() {
            return false;
        }
        st.next_seq = st.next_seq.max(chunk.seq + 1);
        st.queued.insert(chunk.seq);
        st.pending.insert(chunk.seq, Pending { chunk, slot: Slot::Queued, _permit: permit });
        drop(st);
        self.signal();
        true
    }

    /// The producer is done: this is what to commit once everything is acknowledged.
    pub fn produced(&self, commit: Commit, catalog: Bytes) {
        let mut st = self.lock();
        st.produced = Some(commit);
        st.catalog = catalog;
        Self::update_commit(&mut st);
        drop(st);
        self.signal();
    }

    fn update_commit(st: &mut State) {
        if let (CommitState::Waiting, Some(c)) = (&st.commit, &st.produced)
            && st.pending.is_empty()
        {
            st.commit = CommitState::Ready(c.clone());
        }
    }

    /// Waits for the next item for `stream`, or `Err` once the transfer is over.
    pub async fn next_item(&self, stream: u16) -> Result<Item, Finished> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if let Some(f) = &st.finished {
                    return Err(f.clone());
                }
                if let Some(seq) = st.queued.pop_first() {
                    let p = st.pending.get_mut(&seq).expect("queued chunks are pending");
                    p.slot = Slot::InFlight { stream, sent: None };
                    let chunk = p.chunk.clone();
                    self.sent_bytes.fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
                    return Ok(Item::Chunk(chunk));
                }
                if let CommitState::Ready(c) = &st.commit {
                    let commit = c.clone();
                    st.commit = CommitState::InFlight { commit: commit.clone(), stream, sent: None };
                    return Ok(Item::Commit(commit));
                }
            }
            notified.await;
        }
    }

    /// Chunk `seq` is on disk at the server. Returns how long ago it was sent, if it
    /// was in flight.
    pub fn ack(&self, seq: u64) -> Option<Duration> {
        let mut st = self.lock();
        let p = st.pending.remove(&seq)?;
        st.queued.remove(&seq);
        self.acked_bytes.fetch_add(p.chunk.data.len() as u64, Ordering::Relaxed);
        let latency = match p.slot {
            Slot::InFlight { sent, .. } => sent.map(|t| t.elapsed()),
            Slot::Queued => None,
        };
        self.consider_growth(&mut st, latency);
        Self::update_commit(&mut st);
        drop(st);
        self.signal();
        latency
    }

    /// The lowest chunk the window still holds (or the next to be produced): every
    /// chunk below it was acknowledged and dropped. A server that holds fewer
    /// contiguous chunks than this has lost data the agent cannot resend.
    pub fn floor(&self) -> u64 {
        let st = self.lock();
        st.pending.keys().next().copied().unwrap_or(st.next_seq)
    }

    /// Whether `stream` has items sent but not answered, and since when.
    pub fn oldest_in_flight(&self, stream: u16) -> Option<Instant> {
        let st = self.lock();
        let chunks = st.pending.values().filter_map(|p| match p.slot {
            Slot::InFlight { stream: s, sent } if s == stream => sent,
            _ => None,
        });
        let oldest = chunks.min();
        match &st.commit {
            CommitState::InFlight { stream: s, sent: Some(sent), .. } if *s == stream => {
                Some(oldest.map_or(*sent, |o| o.min(*sent)))
            }
            _ => oldest,
        }
    }

    /// `stream` wrote the last byte of chunk `seq`, or of the `Commit` (`None`): its
    /// acknowledgement deadline starts now.
    pub fn written(&self, stream: u16, seq: Option<u64>) {
        let mut st = self.lock();
        let now = Some(Instant::now());
        match seq {
            Some(seq) => {
                if let Some(Pending { slot: Slot::InFlight { stream: s, sent }, .. }) = st.pending.get_mut(&seq)
                    && *s == stream
                {
                    *sent = now;
                }
            }
            None => {
                if let CommitState::InFlight { stream: s, sent, .. } = &mut st.commit
                    && *s == stream
                {
                    *sent = now;
                }
            }
        }
    }

    /// Whether `stream` has taken items it has not finished writing.
    pub fn writing(&self, stream: u16) -> bool {
        let st = self.lock();
        st.pending.values().any(|p| matches!(p.slot, Slot::InFlight { stream: s, sent: None } if s == stream))
    }

    /// The catalog the `Commit` describes; the stream that sends the `Commit` sends
    /// it first, whole, on the same connection, so a commit retried on another
    /// connection finds it complete.
    pub fn catalog(&self) -> Bytes {
        self.lock().catalog.clone()
    }

    /// Whether a `Commit` has been sent and not yet answered.
    pub fn committing(&self) -> bool {
        matches!(self.lock().commit, CommitState::InFlight { .. })
    }

    /// Whether the producer has finished (only the tail remains to be sent).
    pub fn producer_done(&self) -> bool {
        self.lock().produced.is_some()
    }

    /// Waits until `stream` has nothing sent and unanswered (a retiring stream lets
    /// its last chunks be acknowledged before it closes).
    pub async fn wait_idle(&self, stream: u16) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if (self.oldest_in_flight(stream).is_none() && !self.writing(stream)) || self.finished().is_some() {
                return;
            }
            notified.await;
        }
    }

    /// `stream` died: everything it had in flight goes back to the queue.
    /// Returns how many chunks it took back.
    pub fn requeue(&self, stream: u16) -> usize {
        let mut st = self.lock();
        let mut moved = Vec::new();
        for (seq, p) in st.pending.iter_mut() {
            if matches!(p.slot, Slot::InFlight { stream: s, .. } if s == stream) {
                p.slot = Slot::Queued;
                moved.push(*seq);
            }
        }
        let count = moved.len();
        self.resent_chunks.fetch_add(count as u64, Ordering::Relaxed);
        st.queued.extend(moved);
        if let CommitState::InFlight { commit, stream: s, .. } = &st.commit
            && *s == stream
        {
            st.commit = CommitState::Ready(commit.clone());
        }
        drop(st);
        self.signal();
        count
    }

    /// The server committed the archive.
    pub fn committed(&self, c: Committed) {
        self.finish(Finished::Committed(c));
    }

    /// The transfer failed; the first failure wins.
    pub fn fail(&self, f: Failure) {
        self.finish(Finished::Failed(f));
    }

    fn finish(&self, f: Finished) {
        let mut st = self.lock();
        if st.finished.is_none() {
            st.finished = Some(f);
            // Free the producer if it waits for room, and drop the data.
            self.budget.close();
            st.pending.clear();
            st.queued.clear();
        }
        drop(st);
        self.signal();
    }

    pub fn finished(&self) -> Option<Finished> {
        self.lock().finished.clone()
    }

    /// Waits until the transfer is over.
    pub async fn wait_finished(&self) -> Finished {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(f) = self.finished() {
                return f;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use nbackup_protocol::wire::SourceStats;

    fn chunk(seq: u64, len: usize) -> Chunk {
        Chunk::new(seq, seq * len as u64, Bytes::from(vec![seq as u8; len]))
    }

    fn commit(chunks: u64) -> Commit {
        Commit { total_len: 0, chunks, sha256: [0; 32], stats: SourceStats::default(), catalog: None }
    }

    /// Sends and acknowledges `n` chunks of `len` bytes starting at `seq`, each
    /// acknowledged `latency` after it was written.
    async fn round_trip(w: &Window, seq: u64, n: u64, len: usize, latency: Duration) {
        for s in seq..seq + n {
            assert!(w.push(chunk(s, len)).await);
            assert!(matches!(w.next_item(0).await, Ok(Item::Chunk(_))));
            w.written(0, Some(s));
        }
        tokio::time::sleep(latency).await;
        for s in seq..seq + n {
            w.ack(s);
        }
    }

    #[tokio::test]
    async fn the_window_grows_for_a_long_pipe_and_not_for_a_slow_server() {
        // Every chunk takes 100 ms to be acknowledged and the window is always full:
        // the bandwidth-delay product, not the server, limits the transfer.
        let pipe = Window::growing(1000, 100_000);
        for round in 0..3 {
            round_trip(&pipe, round * 10, 10, 100, Duration::from_millis(100)).await;
        }
        assert!(pipe.capacity() > 1000, "grown: {}", pipe.capacity());
        assert!(pipe.capacity() <= 100_000);
        // Acknowledged at once, then nothing for a while: a server (or producer) that
        // is slow, which a bigger window would only fill.
        let slow = Window::growing(1000, 100_000);
        for round in 0..3 {
            round_trip(&slow, round * 10, 10, 100, Duration::from_millis(1)).await;
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
        assert_eq!(slow.capacity(), 1000, "not grown");
        // Never past the maximum.
        let capped = Window::growing(1000, 1200);
        for round in 0..3 {
            round_trip(&capped, round * 10, 10, 100, Duration::from_millis(100)).await;
        }
        assert_eq!(capped.capacity(), 1200);
    }

    #[tokio::test]
    async fn full_window_blocks_the_producer_until_an_ack() {
        let w = Window::new(8);
        assert!(w.push(chunk(0, 4)).await);
        assert!(w.push(chunk(1, 4)).await);
        let w2 = w.clone();
        let third = tokio::spawn(async move { w2.push(chunk(2, 4)).await });
        tokio::task::yield_now().await;
        assert!(!third.is_finished());
        assert_eq!(w.used(), 8);
        w.ack(0);
        assert!(third.await.expect("push task"));
        assert_eq!(w.used(), 8);
    }

    #[tokio::test]
    async fn a_dead_streams_chunks_are_resent_by_another_in_order() {
        let w = Window::new(100);
        for s in 0..3 {
            w.push(chunk(s, 4)).await;
        }
        let Ok(Item::Chunk(a)) = w.next_item(0).await else { panic!("chunk") };
        let Ok(Item::Chunk(b)) = w.next_item(1).await else { panic!("chunk") };
        assert_eq!((a.seq, b.seq), (0, 1));
        w.requeue(0);
        let Ok(Item::Chunk(c)) = w.next_item(1).await else { panic!("chunk") };
        assert_eq!(c.seq, 0, "the lost chunk goes first");
        assert_eq!(w.resent_chunks.load(Ordering::Relaxed), 1);
        let Ok(Item::Chunk(d)) = w.next_item(1).await else { panic!("chunk") };
        assert_eq!(d.seq, 2);
        assert_eq!(w.floor(), 0);
        w.ack(0);
        assert_eq!(w.floor(), 1);
        w.ack(1);
        w.ack(2);
        assert_eq!(w.floor(), 3, "nothing held: the next chunk to be produced");
    }

    #[tokio::test]
    async fn commit_waits_for_all_acks_and_is_retried_on_another_stream() {
        let w = Window::new(100);
        w.push(chunk(0, 4)).await;
        w.produced(commit(1), Bytes::new());
        let Ok(Item::Chunk(_)) = w.next_item(0).await else { panic!("chunk") };
        let w2 = w.clone();
        let waiter = tokio::spawn(async move { w2.next_item(1).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "no commit before the last ack");
        w.ack(0);
        let Ok(Item::Commit(c)) = waiter.await.expect("task") else { panic!("commit") };
        assert_eq!(c.chunks, 1);
        assert!(w.oldest_in_flight(1).is_none(), "no deadline before it is written");
        w.written(1, None);
        assert!(w.oldest_in_flight(1).is_some());
        w.requeue(1);
        let Ok(Item::Commit(_)) = w.next_item(2).await else { panic!("commit again") };
    }

    #[tokio::test]
    async fn the_ack_deadline_starts_when_the_last_byte_is_written() {
        let w = Window::new(100);
        w.push(chunk(0, 4)).await;
        let Ok(Item::Chunk(c)) = w.next_item(0).await else { panic!("chunk") };
        // Taken, but still waiting for the bandwidth limit: no clock runs.
        assert!(w.oldest_in_flight(0).is_none());
        assert!(w.writing(0));
        tokio::time::sleep(Duration::from_millis(30)).await;
        w.written(0, Some(c.seq));
        let since = w.oldest_in_flight(0).expect("in flight");
        assert!(since.elapsed() < Duration::from_millis(30), "counted from the write, not the take");
        assert!(!w.writing(0));
        assert!(w.ack(0).expect("was sent") < Duration::from_millis(30));
    }

    #[tokio::test]
    async fn failure_releases_the_producer_and_stops_streams() {
        let w = Window::new(4);
        w.push(chunk(0, 4)).await;
        let w2 = w.clone();
        let blocked = tokio::spawn(async move { w2.push(chunk(1, 4)).await });
        w.fail(Failure::Cancelled);
        assert!(!blocked.await.expect("task"));
        assert_eq!(w.next_item(0).await.expect_err("over"), Finished::Failed(Failure::Cancelled));
        w.fail(Failure::Source("later".into()));
        assert_eq!(w.wait_finished().await, Finished::Failed(Failure::Cancelled), "first failure wins");
    }
}
