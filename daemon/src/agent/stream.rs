//! One stream of a backup: a connection that sends whatever the window hands it and
//! reads the server's acknowledgements, and that reconnects with `Join` when lost.
//!
//! A stream never owns data: if its connection dies, the window takes back what it
//! had in flight and any stream (this one after reconnecting, or another) resends it.
//! A connection that stays open but stops acknowledging (a black hole) is detected by
//! the age of the oldest unacknowledged item and treated like a dead one; the limit is
//! 20 round trips (an EWMA of request/answer times), but never below
//! `resume.ack_timeout`.
//!
//! The acknowledgement deadline counts from when an item's last byte was written,
//! never from when it was taken: time waiting in the bandwidth limit does not count.
//! While the server reads a large upload back at commit it says `Committing` once a
//! second, which keeps the commit's deadline from expiring. A server's transient
//! refusal (`draining` during a restart, a passing shortage) is a lost connection:
//! re-join, within the run's retry budget, and carry on.
//!
//! When a re-join is refused because the server no longer has the session, the
//! stream asks `Status`: a session that was committed meanwhile (the answer to
//! `Commit` was lost with the connection) counts as committed, never re-sent; one the
//! server lost makes the backup start a fresh session.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use nbackup_protocol::SessionId;
use nbackup_protocol::admin::AgentStreamState;
use nbackup_protocol::wire::{CatalogPart, Frame, Reason, Refusal, SessionState};

use super::connect::{ConnectError, Connection, Connector, Reader, Writer};
use super::progress::Progress;
use super::retry::RetryBudget;
use super::window::{Failure, Finished, Item, Window};
use crate::conn::ConnError;
use crate::throttle::{self, Throttle};

/// How often the reader re-checks that deadline while waiting for frames.
const ACK_CHECK: Duration = Duration::from_millis(500);

/// How long a cancelled stream may take to finish its frame and send Abort.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// What all streams of one backup share.
pub struct StreamCtx {
    pub connector: Connector,
    pub session: SessionId,
    pub window: Arc<Window>,
    /// The run's one retry budget: a re-join draws from it like any other attempt.
    pub budget: Arc<RetryBudget>,
    /// A stream with nothing to send sends `Keepalive` this often.
    pub keepalive: Duration,
    pub progress: Arc<Progress>,
    pub cancel: CancellationToken,
    /// Smoothed RTT; with `resume.ack_timeout` it sets the no-acknowledgement limit.
    pub rtt: Rtt,
    /// Scope for injected faults: `agent/backup`.
    pub fault_scope: String,
    /// The entry's bandwidth limit, shared by all its streams; `None` if unlimited.
    pub throttle: Option<Arc<Throttle>>,
    /// Join generations, increasing across all streams of the session, so a stream id
    /// reused after its stream retired is never mistaken for a duplicate join.
    pub joins: AtomicU32,
    /// Streams still trying; when the last one gives up, the transfer fails.
    pub live: AtomicUsize,
}

/// Smoothed round-trip time (an EWMA with weight 1/8, as TCP's SRTT) and the
/// acknowledgement timeout derived from it.
#[derive(Debug)]
pub struct Rtt {
    srtt_us: AtomicU64,
    floor: Duration,
}

impl Rtt {
    /// How many round trips an acknowledgement may take before the stream is
    /// considered dead: generous, because a chunk queued behind others in socket
    /// buffers waits for their transmission too.
    const ACK_RTTS: u32 = 20;

    pub fn new(floor: Duration) -> Self {
        Rtt { srtt_us: AtomicU64::new(0), floor }
    }

    pub fn observe(&self, sample: Duration) {
        let us = sample.as_micros().min(u128::from(u64::MAX)) as u64;
        let _ = self.srtt_us.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some(if old == 0 { us.max(1) } else { (old * 7 + us) / 8 })
        });
    }

    pub fn smoothed(&self) -> Duration {
        Duration::from_micros(self.srtt_us.load(Ordering::Relaxed))
    }

    pub fn ack_timeout(&self) -> Duration {
        self.floor.max(self.smoothed() * Self::ACK_RTTS)
    }
}

impl StreamCtx {
    pub fn observe_rtt(&self, sample: Duration) {
        self.rtt.observe(sample);
    }

    pub fn ack_timeout(&self) -> Duration {
        self.rtt.ack_timeout()
    }

    /// After a refused re-join: did the session commit, fail, or vanish?
    async fn settle_lost_session(&self, refusal: Refusal) {
        match self.connector.status(self.session).await {
            Ok(SessionState::Committed(c)) => {
                info!(session = %self.session, archive = %c.archive, "the server had committed; the answer was lost");
                self.window.committed(c);
            }
            Ok(SessionState::Failed(r)) => self.window.fail(Failure::Server(r)),
            Ok(SessionState::Unknown) => self.window.fail(Failure::SessionLost(refusal.to_string())),
            Ok(SessionState::Open { .. }) | Err(_) => self.window.fail(Failure::Server(refusal)),
        }
    }
}

/// How a connection's life ended.
enum End {
    /// The transfer is over (committed or failed); nothing more to do.
    Finished,
    /// The stream was asked to retire and has drained.
    Retired,
    /// The connection is gone; reconnect.
    Lost(String),
    /// The server ended the session; no point reconnecting.
    Fatal(Failure),
}

/// Runs stream `stream` until the transfer finishes or `retire` is cancelled (then it
/// stops taking chunks, lets its in-flight ones be acknowledged, and closes). `first`
/// is an already open connection (stream 0 gets the one that opened the session).
pub async fn run(ctx: Arc<StreamCtx>, stream: u16, first: Option<Connection>, retire: CancellationToken) {
    let mut conn = first;
    let mut last_error = String::new();
    loop {
        if ctx.window.finished().is_some() || retire.is_cancelled() {
            break;
        }
        let c = match conn.take() {
            Some(c) => Some(c),
            None => {
                ctx.progress.update_stream(stream, |r| {
                    r.state =
                        if r.rtt_ms.is_some() { AgentStreamState::Reconnecting } else { AgentStreamState::Connecting };
                });
                let generation = ctx.joins.fetch_add(1, Ordering::Relaxed) + 1;
                let joined = tokio::select! {
                    r = ctx.connector.join(ctx.session, stream, generation) => r,
                    _ = ctx.window.wait_finished() => break,
                };
                match joined {
                    Ok((c, joined)) => {
                        ctx.observe_rtt(c.rtt);
                        let floor = ctx.window.floor();
                        if joined.contiguous < floor {
                            ctx.window.fail(Failure::SessionLost(format!(
                                "the server holds {} contiguous chunks but chunks below {floor} were already acknowledged and dropped",
                                joined.contiguous
                            )));
                            break;
                        }
                        info!(session = %ctx.session, stream, generation, "stream joined");
                        Some(c)
                    }
                    Err(ConnectError::Refused(r)) if r.reason == Reason::UnknownSession => {
                        ctx.settle_lost_session(r).await;
                        break;
                    }
                    Err(ConnectError::Refused(r)) if !r.reason.is_transient() => {
                        ctx.window.fail(Failure::Server(r));
                        break;
                    }
                    Err(e) if e.is_transient() => {
                        last_error = e.to_string();
                        None
                    }
                    Err(e) => {
                        ctx.window.fail(Failure::Connection(e.to_string()));
                        break;
                    }
                }
            }
        };
        if let Some(c) = c {
            let rtt_ms = c.rtt.as_secs_f64() * 1000.0;
            ctx.progress.update_stream(stream, |r| {
                if r.rtt_ms.is_some() {
                    r.reconnects += 1;
                }
                r.rtt_ms = Some(rtt_ms);
                r.state = AgentStreamState::Sending;
            });
            let end = drive(&ctx, stream, c, &retire).await;
            let requeued = ctx.window.requeue(stream) as u64;
            ctx.progress.update_stream(stream, |r| {
                r.requeued_chunks += requeued;
                r.state = AgentStreamState::Reconnecting;
            });
            match end {
                End::Finished | End::Retired => break,
                End::Fatal(f) => {
                    ctx.window.fail(f);
                    break;
                }
                // The session ended meanwhile (e.g. committed on another stream): the
                // server closing this connection is expected.
                End::Lost(_) if ctx.window.finished().is_some() => break,
                End::Lost(e) => {
                    if ctx.window.committing() {
                        // Likely the server closing its other streams after committing.
                        debug!(session = %ctx.session, stream, "connection closed during commit: {e}");
                    } else {
                        warn!(session = %ctx.session, stream, "connection lost: {e}");
                    }
                    last_error = e;
                }
            }
        }
        let Some(delay) = ctx.budget.failed() else {
            warn!(session = %ctx.session, stream, "giving up: retry budget spent: {last_error}");
            break;
        };
        debug!(session = %ctx.session, stream, "reconnecting in {delay:?}");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = ctx.window.wait_finished() => break,
        }
    }
    ctx.progress.update_stream(stream, |r| r.state = AgentStreamState::Closed);
    if ctx.live.fetch_sub(1, Ordering::AcqRel) == 1 && ctx.window.finished().is_none() {
        ctx.window.fail(Failure::Connection(last_error));
    }
}

/// Sends and receives on one connection until it ends.
async fn drive(ctx: &StreamCtx, stream: u16, conn: Connection, retire: &CancellationToken) -> End {
    let Connection { reader, writer, .. } = conn;
    let send = send_loop(ctx, stream, writer, retire);
    tokio::pin!(send);
    tokio::select! {
        end = &mut send => end,
        end = receive_loop(ctx, stream, reader) => end,
        _ = ctx.cancel.cancelled() => {
            ctx.window.fail(Failure::Cancelled);
            // The send loop finishes the frame it is writing (no longer throttled)
            // and then sends Abort, so the server frees the entry now rather than
            // after a timeout. Bounded, for a peer that stopped reading.
            let _ = timeout(CANCEL_GRACE, &mut send).await;
            End::Finished
        }
    }
}

async fn send_loop(ctx: &StreamCtx, stream: u16, mut writer: Writer, retire: &CancellationToken) -> End {
    loop {
        let next = tokio::select! {
            biased;
            _ = retire.cancelled() => None,
            item = ctx.window.next_item(stream) => Some(item),
            _ = tokio::time::sleep(ctx.keepalive) => {
                // Nothing to send for a while: say so, or the server takes the
                // silence for a vanished agent.
                if let Err(e) = writer.send(&Frame::Keepalive).await {
                    return End::Lost(format!("send failed: {e}"));
                }
                continue;
            }
        };
        let Some(next) = next else {
            // Retiring: take nothing more, let what is in flight be acknowledged.
            ctx.progress.update_stream(stream, |r| r.state = AgentStreamState::Retiring);
            ctx.window.wait_idle(stream).await;
            let _ = writer.shutdown().await;
            return End::Retired;
        };
        let item = match next {
            Ok(item) => item,
            Err(Finished::Committed(_)) => return End::Finished,
            Err(Finished::Failed(f)) => {
                // Tell the server at once so it frees the entry, unless it is the one
                // that ended the session.
                let reason = match &f {
                    Failure::Cancelled => Some(Reason::Cancelled),
                    Failure::Source(_) => Some(Reason::SourceFailed),
                    // The agent starts over; free the entry at once.
                    Failure::SessionLost(_) => Some(Reason::Cancelled),
                    Failure::Connection(_) | Failure::Server(_) => None,
                };
                if let Some(reason) = reason {
                    let abort = Frame::Abort(Refusal::new(reason, f.to_string()));
                    let _ = timeout(Duration::from_secs(2), writer.send(&abort)).await;
                }
                return End::Finished;
            }
        };
        let sent = match &item {
            Item::Chunk(c) => match crate::fault::hit("send-chunk", &ctx.fault_scope) {
                Some(crate::fault::Action::Drop) => Ok(()),
                Some(crate::fault::Action::Duplicate) => match send_chunk(ctx, &mut writer, c).await {
                    Ok(()) => send_chunk(ctx, &mut writer, c).await,
                    e => e,
                },
                _ => send_chunk(ctx, &mut writer, c).await,
            },
            Item::Commit(c) => {
                debug!(session = %ctx.session, stream, "sending catalog and commit");
                match send_catalog(&mut writer, ctx.window.catalog()).await {
                    Ok(()) => writer.send(&Frame::Commit(c.clone())).await,
                    e => e,
                }
            }
        };
        match (sent, &item) {
            (Err(e), _) => return End::Lost(format!("send failed: {e}")),
            (Ok(()), Item::Chunk(c)) => {
                ctx.window.written(stream, Some(c.seq));
                let len = c.data.len() as u64;
                ctx.progress.update_stream(stream, |r| r.bytes_sent += len);
            }
            (Ok(()), Item::Commit(_)) => ctx.window.written(stream, None),
        }
    }
}

/// Sends the whole catalog in `CatalogPart` frames of at most [`CATALOG_PART`] bytes.
async fn send_catalog(writer: &mut Writer, catalog: bytes::Bytes) -> std::io::Result<()> {
    let mut offset = 0;
    while offset < catalog.len() {
        let end = (offset + CATALOG_PART).min(catalog.len());
        let part = CatalogPart { offset: offset as u64, data: catalog.slice(offset..end) };
        writer.send(&Frame::CatalogPart(part)).await?;
        offset = end;
    }
    Ok(())
}

/// Bytes per `CatalogPart` frame.
const CATALOG_PART: usize = 1 << 20;

async fn send_chunk(
    ctx: &StreamCtx,
    writer: &mut Writer,
    chunk: &nbackup_protocol::wire::Chunk,
) -> std::io::Result<()> {
    match &ctx.throttle {
        Some(t) => {
            let paced = |n| async move {
                tokio::select! {
                    _ = t.acquire(n) => {}
                    _ = ctx.cancel.cancelled() => {}
                }
            };
            // Slices small enough that every stream sends something at least every
            // quarter second even when many share a low limit.
            let streams = ctx.live.load(Ordering::Relaxed).max(1) as u64;
            let rate = t.current_rate().unwrap_or(u64::MAX);
            let slice = (rate / 4 / streams).clamp(1024, throttle::SLICE as u64) as usize;
            writer.send_chunk_paced(chunk, slice, paced).await
        }
        None => writer.send_chunk(chunk).await,
    }
}

async fn receive_loop(ctx: &StreamCtx, stream: u16, mut reader: Reader) -> End {
    loop {
        let frame = match timeout(ACK_CHECK, reader.read_frame()).await {
            Err(_) => {
                let limit = ctx.ack_timeout();
                if let Some(oldest) = ctx.window.oldest_in_flight(stream)
                    && oldest.elapsed() > limit
                {
                    return End::Lost(format!("no acknowledgement for {limit:?}"));
                }
                continue;
            }
            Ok(Err(ConnError::Closed)) => return End::Lost("server closed the connection".into()),
            Ok(Err(e)) => return End::Lost(e.to_string()),
            Ok(Ok(f)) => f,
        };
        match frame {
            Frame::Ack(ack) => {
                if let Some(took) = ctx.window.ack(ack.seq) {
                    let sample = took.as_secs_f64() * 1000.0;
                    ctx.progress.update_stream(stream, |r| {
                        r.ack_ms = Some(r.ack_ms.map_or(sample, |a| a * 0.875 + sample * 0.125));
                    });
                }
                ctx.progress.bytes_acked.store(ctx.window.acked_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
                ctx.budget.progressed();
            }
            Frame::Committing(p) => {
                debug!(session = %ctx.session, stream, verified = p.verified, total = p.total, "server is committing");
                ctx.window.written(stream, None);
            }
            Frame::Committed(c) => {
                ctx.window.committed(c);
                return End::Finished;
            }
            Frame::Abort(r) | Frame::Refused(r) if r.reason.is_transient() => {
                info!(session = %ctx.session, stream, "server asks to retry: {r}");
                return End::Lost(r.to_string());
            }
            Frame::Abort(r) | Frame::Refused(r) => return End::Fatal(Failure::Server(r)),
            other => {
                return End::Lost(format!("unexpected {} frame from the server", other.frame_type().name()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_timeout_follows_the_smoothed_rtt_above_its_floor() {
        let rtt = Rtt::new(Duration::from_secs(1));
        assert_eq!(rtt.ack_timeout(), Duration::from_secs(1), "floor before any sample");
        rtt.observe(Duration::from_millis(10));
        assert_eq!(rtt.smoothed(), Duration::from_millis(10));
        assert_eq!(rtt.ack_timeout(), Duration::from_secs(1), "20 × 10 ms is below the floor");
        rtt.observe(Duration::from_millis(810));
        assert_eq!(rtt.smoothed(), Duration::from_millis(110), "(7 × 10 + 810) / 8");
        assert_eq!(rtt.ack_timeout(), Duration::from_millis(2200));
        for _ in 0..100 {
            rtt.observe(Duration::from_millis(500));
        }
        assert!(rtt.smoothed().abs_diff(Duration::from_millis(500)) < Duration::from_millis(2));
    }
}
