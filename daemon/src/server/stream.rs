//! One data stream of a session: three tasks joined by bounded channels — this
//! reader, a disk task that writes chunks on blocking threads and queues acks, and a
//! writer that sends acks and answers. Backpressure flows back to TCP: a slow disk
//! stops the reader, which stops the agent's window.
//!
//! **Silence.** Agents send `Keepalive` on streams with nothing to send, so a stream
//! on which no byte arrives for `server.stream_timeout` belongs to a vanished peer (a
//! host pulled off the network sends neither FIN nor RST); it is dropped and the
//! session orphaned, free for a new run after `orphan_timeout`. Bytes count, not
//! frames: a large chunk paced by the agent's bandwidth limit is still progress.
//!
//! **Commit.** The first `Commit` starts the commit as its own task (a stream dying
//! meanwhile does not stop it); every stream that sends `Commit` waits for the one
//! answer, and tells its agent `Committing` once a second while the server reads the
//! upload back, so the agent keeps waiting instead of giving up and uploading again.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use nbackup_protocol::admin::EventKind;
use nbackup_protocol::wire::{Ack, CatalogPart, Chunk, Commit, CommitProgress, Frame, Reason, Refusal};

use super::registry::{Attached, CommitAnswer, CommitStart, NotEnded, Outcome};
use super::session::{CommitFailure, Session, Written};
use super::{Server, WRITE_TIMEOUT};
use crate::conn::{ConnError, FrameReader, FrameWriter};

/// How long an aborted stream keeps draining what the agent still sends, so the
/// Abort is read instead of lost to a connection reset.
const LINGER: Duration = Duration::from_secs(2);

/// How often a stream waiting on a commit tells its agent, and how often a reader
/// checks for silence.
const TICK: Duration = Duration::from_secs(1);

/// What ended a stream's read loop.
enum StreamEnd {
    /// The agent closed the connection.
    Closed,
    /// Told to stop: replaced, rotated, the session ended, or answered.
    Stopped,
    /// The server is shutting down.
    Draining,
    AgentAborted,
    /// Nothing arrived for `stream_timeout`.
    Silent(Duration),
    /// The connection failed.
    Lost(String),
    /// The agent broke the protocol.
    Protocol(String),
}

enum DiskJob {
    Write(Chunk),
    /// A piece of the catalog, written in order with the chunks before the `Commit`.
    Catalog(CatalogPart),
    Barrier(oneshot::Sender<()>),
}

/// Receives chunks and the commit on one stream until the stream closes, the session
/// ends, a newer connection replaces this stream, or the server drains.
pub async fn run<R, W>(
    server: Arc<Server>,
    attached: Attached,
    stream: u16,
    generation: u32,
    mut reader: FrameReader<R>,
    writer: FrameWriter<W>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Attached { session, cancel, stats, .. } = attached;
    let id = session.id();
    // Depths: a few acks/answers, and two chunks queued for the disk so reading the
    // next one overlaps writing the current one.
    let (out_tx, out_rx) = mpsc::channel::<Frame>(64);
    let (disk_tx, disk_rx) = mpsc::channel::<DiskJob>(2);
    let out_task = tokio::spawn(write_out(writer, out_rx));
    let disk_task = tokio::spawn(disk_loop(server.clone(), session.clone(), stats.clone(), disk_rx, out_tx.clone()));
    let silence = server.live().config.stream_timeout;
    let end = loop {
        let frame = tokio::select! {
            biased;
            _ = cancel.cancelled() => break StreamEnd::Stopped,
            _ = server.drain.cancelled() => break StreamEnd::Draining,
            r = timeout(TICK, reader.read_frame()) => r,
        };
        let frame = match frame {
            Err(_) if reader.idle_for() > silence => break StreamEnd::Silent(reader.idle_for()),
            Err(_) => continue,
            Ok(Err(ConnError::Closed)) => break StreamEnd::Closed,
            Ok(Err(ConnError::Decode(e))) => break StreamEnd::Protocol(e.to_string()),
            Ok(Err(e)) => break StreamEnd::Lost(e.to_string()),
            Ok(Ok(f)) => f,
        };
        session.touch();
        match frame {
            Frame::Chunk(chunk) => {
                let len = chunk.data.len() as u64;
                stats.bytes.fetch_add(len, Ordering::Relaxed);
                server.telemetry.metrics.bytes_received.fetch_add(len, Ordering::Relaxed);
                if !chunk.crc_ok() {
                    break StreamEnd::Protocol(format!("chunk {} failed its CRC32C check", chunk.seq));
                }
                if disk_tx.send(DiskJob::Write(chunk)).await.is_err() {
                    break StreamEnd::Stopped;
                }
            }
            Frame::Keepalive => {}
            Frame::CatalogPart(part) => {
                if disk_tx.send(DiskJob::Catalog(part)).await.is_err() {
                    break StreamEnd::Stopped;
                }
            }
            Frame::Commit(commit) => {
                // Let this stream's queued writes finish before verifying.
                let (tx, rx) = oneshot::channel();
                if disk_tx.send(DiskJob::Barrier(tx)).await.is_err() || rx.await.is_err() {
                    break StreamEnd::Stopped;
                }
                let answer = commit_on_stream(&server, &session, commit, &out_tx).await;
                let scope = session.storage.cfg.base_dir.to_string_lossy().into_owned();
                match answer {
                    CommitAnswer::Committed(c) => {
                        if crate::fault::hit("commit:answer", &scope) != Some(crate::fault::Action::Drop) {
                            let _ = out_tx.send(Frame::Committed(c)).await;
                        }
                    }
                    CommitAnswer::Failed(r) | CommitAnswer::Retry(r) => {
                        let _ = out_tx.send(Frame::Refused(r)).await;
                    }
                }
                break StreamEnd::Stopped;
            }
            Frame::Abort(r) => {
                let refusal = Refusal::new(r.reason, format!("agent aborted: {}", r.message));
                if server.registry.end(id, Outcome::Failed(refusal)) == Err(NotEnded::Committing) {
                    info!(session = %id, stream, "agent's abort ignored: the session is committing");
                }
                break StreamEnd::AgentAborted;
            }
            other => {
                break StreamEnd::Protocol(format!("unexpected {} frame on a stream", other.frame_type().name()));
            }
        }
    };
    drop(disk_tx);
    let _ = disk_task.await;
    let mut aborted = false;
    let lost =
        |why: &str| server.telemetry.session_event(&session, EventKind::StreamLost, format!("stream {stream}: {why}"));
    match (&end, server.registry.outcome(id)) {
        (StreamEnd::AgentAborted, _) => {}
        // The session failed (disk full, expired, aborted, …): tell the agent why.
        (_, Some(Outcome::Failed(r))) => aborted = out_tx.send(Frame::Abort(r)).await.is_ok(),
        (_, Some(Outcome::Committed(_))) => {}
        (StreamEnd::Draining, None) => {
            let r = Refusal::new(Reason::Draining, "server restarting; the upload is kept, re-join to resume");
            aborted = out_tx.send(Frame::Abort(r)).await.is_ok();
        }
        (StreamEnd::Protocol(e), None) => {
            warn!(session = %id, stream, "stream closed: {e}");
            lost(e);
            aborted = out_tx.send(Frame::Abort(Refusal::new(Reason::Protocol, e.clone()))).await.is_ok();
        }
        (StreamEnd::Silent(d), None) => {
            let why = format!("nothing received for {:.1} s; the agent is gone or cut off", d.as_secs_f64());
            warn!(session = %id, stream, "stream dropped: {why}");
            lost(&why);
        }
        (StreamEnd::Lost(e), None) => {
            warn!(session = %id, stream, "stream lost: {e}");
            lost(e);
        }
        (StreamEnd::Closed, None) => {
            debug!(session = %id, stream, "stream closed by agent");
            lost("closed by the agent");
        }
        (StreamEnd::Stopped, None) => {}
    }
    drop(out_tx);
    let _ = out_task.await;
    if aborted {
        // Lingering close: the agent may be in the middle of sending chunks. Closing
        // a socket with unread data makes the kernel answer with a reset, which can
        // destroy the Abort before the agent reads it. So keep reading (and
        // discarding) until the agent closes, for a bounded time.
        let _ = timeout(LINGER, async { while reader.read_frame().await.is_ok() {} }).await;
    }
    server.registry.detach(id, stream, generation);
}

/// Starts or joins the session's commit and waits for its answer, telling the agent
/// how far the read-back has come once a second.
async fn commit_on_stream(
    server: &Arc<Server>,
    session: &Arc<Session>,
    commit: Commit,
    out: &mpsc::Sender<Frame>,
) -> CommitAnswer {
    let id = session.id();
    let mut answer: watch::Receiver<Option<CommitAnswer>> = match server.registry.begin_commit(id) {
        CommitStart::Done(a) => return same_archive(a, &commit),
        CommitStart::Wait(rx) => rx,
        CommitStart::Run(s, rx) => {
            let (srv, c) = (server.clone(), commit.clone());
            // On the tracker: shutdown waits for a commit, and this stream dying does not stop it.
            server.tracker.spawn(async move {
                let (area, key) = (s.storage.clone(), s.params.key.clone());
                let result = tokio::task::spawn_blocking(move || s.commit(&c)).await.unwrap_or_else(|e| {
                    Err(CommitFailure::Reject(Refusal::new(Reason::Internal, format!("commit task failed: {e}"))))
                });
                if let Ok(done) = &result {
                    let path = area.entry_dir(&key.agent, &key.backup).join(&done.committed.archive);
                    srv.offsite.committed(&key.storage, &path);
                }
                srv.registry.commit_finished(id, result);
                // After the answer: the agent does not wait for the space to be freed.
                let _ = tokio::task::spawn_blocking(move || area.purge_rotated()).await;
            });
            rx
        }
    };
    let mut tick = tokio::time::interval(TICK);
    tick.tick().await;
    loop {
        if let Some(a) = answer.borrow_and_update().clone() {
            return same_archive(a, &commit);
        }
        tokio::select! {
            changed = answer.changed() => if changed.is_err() {
                return CommitAnswer::Failed(Refusal::new(Reason::Internal, "the commit ended without an answer"));
            },
            _ = tick.tick() => {
                let progress = CommitProgress { verified: session.verified.load(Ordering::Relaxed), total: commit.total_len };
                let _ = out.send(Frame::Committing(progress)).await;
            }
        }
    }
}

/// A repeated `Commit` for a different archive than the one committed is refused.
fn same_archive(answer: CommitAnswer, commit: &Commit) -> CommitAnswer {
    match answer {
        CommitAnswer::Committed(c) if c.sha256 != commit.sha256 => {
            CommitAnswer::Failed(Refusal::new(Reason::VerifyFailed, "a different archive was already committed"))
        }
        other => other,
    }
}

/// Writes chunks in arrival order on blocking threads and acknowledges each after
/// its write returned. A write failure ends the whole session.
async fn disk_loop(
    server: Arc<Server>,
    session: Arc<Session>,
    stats: Arc<super::registry::StreamStats>,
    mut jobs: mpsc::Receiver<DiskJob>,
    out: mpsc::Sender<Frame>,
) {
    while let Some(job) = jobs.recv().await {
        let chunk = match job {
            DiskJob::Write(c) => c,
            DiskJob::Barrier(done) => {
                let _ = done.send(());
                continue;
            }
            DiskJob::Catalog(part) => {
                let s = session.clone();
                let result = tokio::task::spawn_blocking(move || s.write_catalog(&part))
                    .await
                    .unwrap_or_else(|e| Err(Refusal::new(Reason::Internal, format!("write task failed: {e}"))));
                if let Err(r) = result {
                    let _ = server.registry.end(session.id(), Outcome::Failed(r));
                    return;
                }
                continue;
            }
        };
        let seq = chunk.seq;
        let s = session.clone();
        let written = tokio::task::spawn_blocking(move || s.write_chunk(&chunk)).await;
        let result = written.unwrap_or_else(|e| Err(Refusal::new(Reason::Internal, format!("write task failed: {e}"))));
        match result {
            Ok(written) => {
                if written == Written::Duplicate {
                    stats.resent.fetch_add(1, Ordering::Relaxed);
                }
                if out.send(Frame::Ack(Ack { seq })).await.is_err() {
                    return;
                }
                if written == Written::New {
                    // Hash the grown prefix, off the ack path.
                    let (s, srv) = (session.clone(), server.clone());
                    server.tracker.spawn_blocking(move || {
                        if let Err(r) = s.hash_forward() {
                            let _ = srv.registry.end(s.id(), Outcome::Failed(r));
                        }
                    });
                }
            }
            // Out of descriptors or memory: keep the upload, drop this stream; the
            // agent re-joins and resends.
            Err(r) if r.reason == Reason::Internal => {
                warn!(session = %session.id(), "chunk {seq} not written: {}", r.message);
                let _ = out.send(Frame::Refused(r)).await;
                return;
            }
            Err(refusal) => {
                let _ = server.registry.end(session.id(), Outcome::Failed(refusal));
                return;
            }
        }
    }
}

/// Sends queued frames until every sender is gone, then closes the write side. A peer
/// that does not take a frame within [`WRITE_TIMEOUT`] is dropped.
async fn write_out<W: AsyncWrite + Unpin>(mut writer: FrameWriter<W>, mut frames: mpsc::Receiver<Frame>) {
    while let Some(frame) = frames.recv().await {
        match timeout(WRITE_TIMEOUT, writer.send(&frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!("cannot send {}: {e}", frame.frame_type().name());
                return;
            }
            Err(_) => {
                warn!("agent stopped reading for {WRITE_TIMEOUT:?}; dropping the connection");
                return;
            }
        }
    }
    let _ = timeout(WRITE_TIMEOUT, writer.shutdown()).await;
}
