//! The session registry: the one owner of every session's phase, streams, entry lock
//! and outcome. Nothing else changes a phase.
//!
//! ```text
//!                 adopted                 join
//!   Recovering ───────────▶ Orphaned ◀──────────▶ Receiving ◀── open (Hello)
//!       │                      │   last stream gone   │
//!       │ interrupted commit   │                      │ Commit
//!       │ finished             ▼                      ▼
//!       │                   Ended ◀───────────── Committing ──▶ (retry) Receiving
//!       └─────────────────▶ (outcome)    done / rejected
//! ```
//!
//! * **One outcome.** A session ends exactly once, through [`Registry::end`] or a
//!   finished commit, and that one transition frees the entry lock, records history
//!   and events, stops its streams and (unless committed) discards the upload. A
//!   session that is `Committing` cannot be ended by anything else — operator abort,
//!   an agent's `Abort` on another stream, the reaper, shutdown — so history never
//!   says `aborted` for an archive that was committed.
//! * **One commit.** The first `Commit` runs it; a repeated one (the agent retries
//!   until answered, possibly on another stream) waits for the same answer.
//! * **Short critical sections.** One `std::sync::Mutex` guards the table; it is
//!   never held across I/O or an `.await`. Telemetry and file removal happen after it
//!   is released.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use nbackup_protocol::admin::SessionPhase;
use nbackup_protocol::wire::{Committed, Reason, Refusal, SessionState};
use nbackup_protocol::{Name, SessionId};

use super::session::{CommitDone, CommitFailure, EntryKey, Session, SessionParams};
use super::telemetry::Telemetry;
use crate::state::RateMeter;

/// Finished sessions are remembered this long (across restarts, through the
/// committed log) so that an agent that lost the answer to its `Commit` learns the
/// outcome when it asks again instead of sending the backup twice.
pub const FINISHED_TTL: Duration = Duration::from_secs(3600);

/// Where a live session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Found in `.incoming` at start; being re-checked (after readiness).
    Recovering,
    /// At least one stream attached.
    Receiving,
    /// No stream attached since this instant: the agent may be gone, or reconnecting.
    Orphaned { since: Instant },
    /// Verifying and renaming; nothing else may end it now.
    Committing,
}

impl Phase {
    pub fn word(self) -> SessionPhase {
        match self {
            Phase::Recovering => SessionPhase::Recovering,
            Phase::Receiving => SessionPhase::Receiving,
            Phase::Orphaned { .. } => SessionPhase::Orphaned,
            Phase::Committing => SessionPhase::Committing,
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Committed(Committed),
    Failed(Refusal),
}

/// What a `Commit` gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitAnswer {
    Committed(Committed),
    Failed(Refusal),
    /// Nothing was renamed and the session lives on: send `Commit` again later.
    Retry(Refusal),
}

/// What [`Registry::begin_commit`] found.
pub enum CommitStart {
    /// This caller runs the commit and reports it with [`Registry::commit_finished`];
    /// the answer also arrives on the receiver.
    Run(Arc<Session>, watch::Receiver<Option<CommitAnswer>>),
    /// Another stream's commit is running; its answer arrives here.
    Wait(watch::Receiver<Option<CommitAnswer>>),
    Done(CommitAnswer),
}

/// Why [`Registry::end`] ended nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotEnded {
    /// The session is committing; its commit decides.
    Committing,
    /// No such live session (it ended already, or never existed).
    Gone,
}

/// Counters of one stream, shared with its task and read by the admin API.
#[derive(Debug, Default)]
pub struct StreamStats {
    pub bytes: AtomicU64,
    pub resent: AtomicU64,
    /// Receive rate, sampled by the server's sampler.
    pub rate: RateMeter,
    pub peer: Mutex<String>,
}

/// A stream's place in a session, handed to its task.
pub struct Attached {
    pub session: Arc<Session>,
    /// Cancelled when a newer connection replaces this stream, an operator rotates
    /// it, or the session ends.
    pub cancel: CancellationToken,
    pub stats: Arc<StreamStats>,
    /// How often this stream index has been joined, this one included.
    pub joins: u32,
}

/// One stream, for snapshots.
#[derive(Debug, Clone)]
pub struct StreamView {
    pub stream: u16,
    pub generation: u32,
    pub joins: u32,
    /// False for a stream lost or retired and not joined again.
    pub attached: bool,
    pub stats: Arc<StreamStats>,
}

/// One live session, for snapshots.
#[derive(Clone)]
pub struct SessionView {
    pub params: SessionParams,
    pub phase: Phase,
    /// `None` while recovering.
    pub session: Option<Arc<Session>>,
    pub streams: Vec<StreamView>,
}

struct Slot {
    generation: u32,
    cancel: CancellationToken,
    stats: Arc<StreamStats>,
}

struct Live {
    session: Arc<Session>,
    phase: Phase,
    streams: BTreeMap<u16, Slot>,
    /// Streams lost or retired and not joined again, with their last counters.
    closed: BTreeMap<u16, (u32, Arc<StreamStats>)>,
    joins: HashMap<u16, u32>,
    /// While committing: where the answer is published.
    commit: Option<watch::Sender<Option<CommitAnswer>>>,
    /// Cancelled when the session ends; parent of its streams' tokens.
    ended: CancellationToken,
}

impl Live {
    /// A session with no stream attached yet, waiting for its agent.
    fn waiting(session: Arc<Session>) -> Self {
        Live {
            session,
            phase: Phase::Orphaned { since: Instant::now() },
            streams: BTreeMap::new(),
            closed: BTreeMap::new(),
            joins: HashMap::new(),
            commit: None,
            ended: CancellationToken::new(),
        }
    }
}

struct Finished {
    agent: Name,
    outcome: Outcome,
    at: Instant,
}

#[derive(Default)]
struct Table {
    live: HashMap<SessionId, Live>,
    /// Found at start and being re-checked: adopted uploads and interrupted commits.
    recovering: HashMap<SessionId, SessionParams>,
    locks: HashMap<EntryKey, SessionId>,
    finished: HashMap<SessionId, Finished>,
    draining: bool,
}

/// A session that just ended, for what follows outside the lock.
struct Ended {
    session: Arc<Session>,
    outcome: Outcome,
    ended: CancellationToken,
    rotated: Vec<String>,
    incomplete: Option<String>,
}

/// Limits a new session or stream is checked against (from the live config).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub sessions_per_agent: u32,
    pub streams_per_agent: u32,
}

pub struct Registry {
    table: Mutex<Table>,
    telemetry: Arc<Telemetry>,
}

fn refusal(reason: Reason, message: impl Into<String>) -> Refusal {
    Refusal::new(reason, message)
}

impl Registry {
    pub fn new(telemetry: Arc<Telemetry>) -> Self {
        Registry { table: Mutex::new(Table::default()), telemetry }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        crate::lock(&self.table)
    }

    /// Registers a session found in `.incoming` that recovery is about to re-check;
    /// its entry stays locked until then.
    pub fn recovering(&self, params: SessionParams) {
        let mut t = self.table();
        t.locks.insert(params.key.clone(), params.id);
        t.recovering.insert(params.id, params);
    }

    /// An adopted upload is re-checked: it waits for its agent, orphaned.
    pub fn adopted(&self, session: Session) {
        let session = Arc::new(session);
        let mut t = self.table();
        t.recovering.remove(&session.id());
        t.locks.insert(session.params.key.clone(), session.id());
        t.live.insert(session.id(), Live::waiting(session));
    }

    /// Recovery is done with a session: it finished an interrupted commit
    /// (`Some(outcome)`), or found nothing usable (`None`). Frees the entry.
    pub fn recovery_finished(&self, id: SessionId, outcome: Option<(Name, Outcome, Duration)>) {
        let mut t = self.table();
        if let Some(p) = t.recovering.remove(&id)
            && t.locks.get(&p.key) == Some(&id)
        {
            t.locks.remove(&p.key);
        }
        if let Some((agent, outcome, age)) = outcome {
            let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            t.finished.insert(id, Finished { agent, outcome, at });
        }
    }

    /// Refuses early (before any file is created) what [`Registry::open`] would.
    pub fn may_open(&self, key: &EntryKey, limits: Limits) -> Result<(), Refusal> {
        let t = self.table();
        Self::check_open(&t, key, limits).map(|_| ())
    }

    /// The session holding `key` that a new one would supersede, or why not.
    fn check_open(t: &Table, key: &EntryKey, limits: Limits) -> Result<Option<SessionId>, Refusal> {
        if t.draining {
            return Err(refusal(Reason::Draining, "server is shutting down; retry after it restarts"));
        }
        let agent_sessions = t.live.values().filter(|l| l.session.params.key.agent == key.agent).count()
            + t.recovering.values().filter(|p| p.key.agent == key.agent).count();
        let stale = match t.locks.get(key) {
            None => None,
            Some(id) if t.recovering.contains_key(id) => {
                return Err(refusal(Reason::Busy, format!("session {id} of this entry is being recovered")));
            }
            Some(id) => match t.live.get(id) {
                // The same agent starting the same entry again while the old session
                // has no stream means it gave up on it (e.g. it was killed).
                Some(l) if matches!(l.phase, Phase::Orphaned { .. }) => Some(*id),
                Some(l) => {
                    return Err(refusal(
                        Reason::Busy,
                        format!(
                            "session {id} for this entry started at {} is still running ({})",
                            l.session.params.started.format("%Y-%m-%d %H:%M:%S UTC"),
                            l.phase.word()
                        ),
                    ));
                }
                None => None,
            },
        };
        let counted = agent_sessions - usize::from(stale.is_some());
        if counted >= limits.sessions_per_agent as usize {
            return Err(refusal(
                Reason::Busy,
                format!("agent {} already has {counted} sessions open (server.max_sessions_per_agent)", key.agent),
            ));
        }
        Ok(stale)
    }

    /// Adds a new session, receiving on stream 0 (not yet attached), superseding an
    /// orphaned one of the same entry.
    pub fn open(&self, session: Arc<Session>, limits: Limits) -> Result<(), Refusal> {
        let key = session.params.key.clone();
        let superseded = {
            let mut t = self.table();
            let stale = Self::check_open(&t, &key, limits)?;
            let superseded = stale.and_then(|old| {
                let why = refusal(Reason::Cancelled, "superseded by a new session of the same entry");
                Self::end_locked(&mut t, old, Outcome::Failed(why), None).ok()
            });
            t.locks.insert(key, session.id());
            t.live.insert(session.id(), Live::waiting(session.clone()));
            superseded
        };
        if let Some(old) = superseded {
            tracing::info!(session = %old.session.id(), "superseded by a new session from the same agent");
            self.after_end(old);
        }
        Ok(())
    }

    /// Attaches stream `stream` of `id` for `agent` (already checked against its
    /// certificate). A higher generation replaces the attached connection, which is
    /// told to stop; an equal or lower one is a duplicate.
    pub fn attach(
        &self,
        id: SessionId,
        stream: u16,
        generation: u32,
        owns: impl Fn(&Name) -> bool,
        limits: Limits,
    ) -> Result<Attached, Refusal> {
        let mut t = self.table();
        if t.draining {
            return Err(refusal(Reason::Draining, "server is shutting down; retry after it restarts"));
        }
        if let Some(p) = t.recovering.get(&id) {
            if !owns(&p.key.agent) {
                return Err(not_yours());
            }
            return Err(refusal(Reason::Busy, "the server is re-checking this upload after a restart; retry shortly"));
        }
        let agent_streams = |t: &Table, agent: &Name| -> usize {
            t.live.values().filter(|l| &l.session.params.key.agent == agent).map(|l| l.streams.len()).sum()
        };
        let Some(live) = t.live.get(&id) else {
            return Err(Self::gone(&t, id, &owns));
        };
        let agent = live.session.params.key.agent.clone();
        if !owns(&agent) {
            return Err(not_yours());
        }
        let max = live.session.params.max_streams;
        if stream >= max {
            return Err(refusal(
                Reason::TooManyStreams,
                format!("stream {stream} is beyond this session's {max} streams"),
            ));
        }
        let replacing = live.streams.contains_key(&stream);
        if !replacing && agent_streams(&t, &agent) >= limits.streams_per_agent as usize {
            return Err(refusal(
                Reason::TooManyStreams,
                format!(
                    "agent {agent} has {} streams attached (server.max_streams_per_agent)",
                    limits.streams_per_agent
                ),
            ));
        }
        let live = t.live.get_mut(&id).expect("looked up above");
        if let Some(slot) = live.streams.get(&stream) {
            if generation <= slot.generation {
                return Err(refusal(
                    Reason::Busy,
                    format!("stream {stream} is already attached (generation {})", slot.generation),
                ));
            }
            slot.cancel.cancel();
        }
        let cancel = live.ended.child_token();
        let stats = Arc::new(StreamStats::default());
        live.streams.insert(stream, Slot { generation, cancel: cancel.clone(), stats: stats.clone() });
        live.closed.remove(&stream);
        let joins = live.joins.entry(stream).or_insert(0);
        *joins += 1;
        let joins = *joins;
        if matches!(live.phase, Phase::Orphaned { .. }) {
            live.phase = Phase::Receiving;
        }
        live.session.touch();
        Ok(Attached { session: live.session.clone(), cancel, stats, joins })
    }

    /// Detaches a stream if `generation` is still the attached one; the session is
    /// orphaned when its last stream goes.
    pub fn detach(&self, id: SessionId, stream: u16, generation: u32) {
        let mut t = self.table();
        let Some(live) = t.live.get_mut(&id) else { return };
        if live.streams.get(&stream).is_some_and(|s| s.generation == generation)
            && let Some(slot) = live.streams.remove(&stream)
        {
            slot.stats.rate.stop();
            live.closed.insert(stream, (slot.generation, slot.stats));
            if live.streams.is_empty() && live.phase == Phase::Receiving {
                live.phase = Phase::Orphaned { since: Instant::now() };
            }
        }
    }

    /// Closes one stream's connection; the agent re-joins and resends what it had in
    /// flight (operator "rotate"). False if no such stream is attached.
    pub fn rotate(&self, id: SessionId, stream: u16) -> bool {
        let t = self.table();
        match t.live.get(&id).and_then(|l| l.streams.get(&stream)) {
            Some(slot) => {
                slot.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Starts the commit of `id`, joins one in progress, or reports how it ended.
    pub fn begin_commit(&self, id: SessionId) -> CommitStart {
        let mut t = self.table();
        if let Some(live) = t.live.get_mut(&id) {
            return match (&live.phase, &live.commit) {
                (Phase::Committing, Some(tx)) => CommitStart::Wait(tx.subscribe()),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    live.phase = Phase::Committing;
                    live.commit = Some(tx);
                    CommitStart::Run(live.session.clone(), rx)
                }
            };
        }
        CommitStart::Done(match t.finished.get(&id) {
            Some(Finished { outcome: Outcome::Committed(c), .. }) => CommitAnswer::Committed(c.clone()),
            Some(Finished { outcome: Outcome::Failed(r), .. }) => CommitAnswer::Failed(r.clone()),
            None => CommitAnswer::Failed(refusal(Reason::UnknownSession, "no such session")),
        })
    }

    /// Reports the commit started by [`Registry::begin_commit`]; returns the answer
    /// every waiting stream gets.
    pub fn commit_finished(&self, id: SessionId, result: Result<CommitDone, CommitFailure>) -> CommitAnswer {
        let mut t = self.table();
        let Some(live) = t.live.get_mut(&id) else {
            return CommitAnswer::Failed(refusal(Reason::Internal, "the session vanished while committing"));
        };
        let tx = live.commit.take();
        let (answer, ended) = match result {
            Ok(done) => {
                let answer = CommitAnswer::Committed(done.committed.clone());
                let CommitDone { committed, rotated, incomplete } = done;
                let ended = Self::end_locked(&mut t, id, Outcome::Committed(committed), Some((rotated, incomplete)));
                (answer, ended.ok())
            }
            Err(CommitFailure::Reject(r)) => {
                let ended = Self::end_locked(&mut t, id, Outcome::Failed(r.clone()), None);
                (CommitAnswer::Failed(r), ended.ok())
            }
            Err(CommitFailure::Retry(r)) => {
                live.phase =
                    if live.streams.is_empty() { Phase::Orphaned { since: Instant::now() } } else { Phase::Receiving };
                tracing::warn!(session = %id, "commit deferred: {}", r.message);
                (CommitAnswer::Retry(r), None)
            }
        };
        drop(t);
        if let Some(tx) = tx {
            let _ = tx.send(Some(answer.clone()));
        }
        if let Some(ended) = ended {
            self.after_end(ended);
        }
        answer
    }

    /// Ends a live session with `outcome` (abort, expiry, failure). A committing
    /// session cannot be ended this way.
    pub fn end(&self, id: SessionId, outcome: Outcome) -> Result<(), NotEnded> {
        let ended = {
            let mut t = self.table();
            match t.live.get(&id) {
                None => return Err(NotEnded::Gone),
                Some(l) if l.phase == Phase::Committing => return Err(NotEnded::Committing),
                Some(_) => {}
            }
            Self::end_locked(&mut t, id, outcome, None)?
        };
        self.after_end(ended);
        Ok(())
    }

    /// The one transition to "ended": out of the table, lock freed, outcome kept.
    /// Callers have checked the phase ([`Registry::end`] refuses a committing session;
    /// [`Registry::commit_finished`] is the commit itself).
    fn end_locked(
        t: &mut Table,
        id: SessionId,
        outcome: Outcome,
        commit: Option<(Vec<String>, Option<String>)>,
    ) -> Result<Ended, NotEnded> {
        let live = t.live.remove(&id).ok_or(NotEnded::Gone)?;
        let key = &live.session.params.key;
        if t.locks.get(key) == Some(&id) {
            t.locks.remove(key);
        }
        t.finished.insert(id, Finished { agent: key.agent.clone(), outcome: outcome.clone(), at: Instant::now() });
        let (rotated, incomplete) = commit.unwrap_or_default();
        Ok(Ended { session: live.session, outcome, ended: live.ended, rotated, incomplete })
    }

    /// What follows an end, outside the lock: streams told, telemetry recorded, the
    /// upload discarded unless committed (on a blocking thread: the disk may be slow).
    fn after_end(&self, e: Ended) {
        e.ended.cancel();
        self.telemetry.session_ended(&e.session, &e.outcome, &e.rotated, e.incomplete.as_deref());
        if let Outcome::Failed(r) = &e.outcome {
            let p = &e.session.params;
            tracing::warn!(
                session = %p.id, agent = %p.key.agent, backup = %p.key.backup, reason = %r.reason,
                "session ended: {}", r.message
            );
            let session = e.session.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(h) => drop(h.spawn_blocking(move || session.discard())),
                Err(_) => session.discard(),
            }
        }
    }

    /// The outcome of a session that ended, if it is remembered.
    pub fn outcome(&self, id: SessionId) -> Option<Outcome> {
        self.table().finished.get(&id).map(|f| f.outcome.clone())
    }

    /// What became of a session, for an agent that lost its connection.
    pub fn state(&self, id: SessionId, owns: impl Fn(&Name) -> bool) -> Result<SessionState, Refusal> {
        let t = self.table();
        if let Some(l) = t.live.get(&id) {
            if !owns(&l.session.params.key.agent) {
                return Err(not_yours());
            }
            return Ok(SessionState::Open { contiguous: l.session.contiguous() });
        }
        if let Some(p) = t.recovering.get(&id) {
            if !owns(&p.key.agent) {
                return Err(not_yours());
            }
            return Ok(SessionState::Open { contiguous: 0 });
        }
        Ok(match t.finished.get(&id) {
            Some(f) if !owns(&f.agent) => return Err(not_yours()),
            Some(Finished { outcome: Outcome::Committed(c), .. }) => SessionState::Committed(c.clone()),
            Some(Finished { outcome: Outcome::Failed(r), .. }) => SessionState::Failed(r.clone()),
            None => SessionState::Unknown,
        })
    }

    /// The refusal for a join to a session that is not live.
    fn gone(t: &Table, id: SessionId, owns: &impl Fn(&Name) -> bool) -> Refusal {
        let msg = match t.finished.get(&id) {
            Some(f) if !owns(&f.agent) => return not_yours(),
            Some(Finished { outcome: Outcome::Committed(c), .. }) => {
                format!("session already committed as {}", c.archive)
            }
            Some(Finished { outcome: Outcome::Failed(r), .. }) => format!("session already ended: {r}"),
            None => "no such session".to_string(),
        };
        refusal(Reason::UnknownSession, msg)
    }

    /// Stops accepting sessions and streams. Sessions are not ended: their uploads
    /// stay on disk, journaled, for the next start to adopt (a restart must lose no
    /// more than a crash).
    pub fn drain(&self) {
        self.table().draining = true;
    }

    pub fn draining(&self) -> bool {
        self.table().draining
    }

    /// Ends sessions idle past `ttl` or orphaned past `orphan`; forgets old outcomes.
    pub fn expire(&self, ttl: Duration, orphan: Duration) {
        let due: Vec<(SessionId, String)> = {
            let mut t = self.table();
            t.finished.retain(|_, f| f.at.elapsed() < FINISHED_TTL);
            t.live
                .iter()
                .filter_map(|(id, l)| {
                    let idle = l.session.idle_for();
                    match l.phase {
                        Phase::Committing | Phase::Recovering => None,
                        _ if idle > ttl => Some((*id, format!("no traffic for {}s", idle.as_secs()))),
                        Phase::Orphaned { since } if since.elapsed() > orphan => {
                            Some((*id, format!("the agent's connections were gone for {}s", since.elapsed().as_secs())))
                        }
                        _ => None,
                    }
                })
                .collect()
        };
        for (id, why) in due {
            let _ = self.end(id, Outcome::Failed(refusal(Reason::Expired, why)));
        }
    }

    /// Every live session (recovering ones included), oldest first.
    pub fn sessions(&self) -> Vec<SessionView> {
        let t = self.table();
        let mut v: Vec<SessionView> = t
            .live
            .values()
            .map(|l| {
                let joins = |s: &u16| l.joins.get(s).copied().unwrap_or(1);
                let mut streams: Vec<StreamView> = l
                    .streams
                    .iter()
                    .map(|(s, slot)| StreamView {
                        stream: *s,
                        generation: slot.generation,
                        joins: joins(s),
                        attached: true,
                        stats: slot.stats.clone(),
                    })
                    .collect();
                streams.extend(l.closed.iter().map(|(s, (generation, stats))| StreamView {
                    stream: *s,
                    generation: *generation,
                    joins: joins(s),
                    attached: false,
                    stats: stats.clone(),
                }));
                streams.sort_by_key(|s| s.stream);
                SessionView {
                    params: l.session.params.clone(),
                    phase: l.phase,
                    session: Some(l.session.clone()),
                    streams,
                }
            })
            .collect();
        v.extend(t.recovering.values().map(|p| SessionView {
            params: p.clone(),
            phase: Phase::Recovering,
            session: None,
            streams: Vec::new(),
        }));
        v.sort_by(|a, b| a.params.started.cmp(&b.params.started).then(a.params.id.cmp(&b.params.id)));
        v
    }

    /// Live sessions, for the sampler.
    pub fn live_sessions(&self) -> Vec<Arc<Session>> {
        self.table().live.values().map(|l| l.session.clone()).collect()
    }

    /// Sessions receiving or committing a backup now (off-site uploads yield to them).
    pub fn receiving(&self) -> usize {
        self.table().live.values().filter(|l| matches!(l.phase, Phase::Receiving | Phase::Committing)).count()
    }

    pub fn count(&self) -> usize {
        let t = self.table();
        t.live.len() + t.recovering.len()
    }
}

fn not_yours() -> Refusal {
    refusal(Reason::NotAllowed, "session belongs to another agent")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Events, History};
    use bytes::Bytes;
    use nbackup_protocol::wire::{Chunk, Commit, SourceStats};
    use sha2::{Digest, Sha256};

    const LIMITS: Limits = Limits { sessions_per_agent: 4, streams_per_agent: 8 };

    fn setup(dir: &std::path::Path) -> (Registry, Arc<Telemetry>, Arc<Session>) {
        let telemetry = Arc::new(Telemetry::new(
            Events::open(None, "e").expect("events"),
            History::open(None, "h").expect("history"),
        ));
        let session = Arc::new(crate::server::session::test_session(dir, 1 << 16));
        let registry = Registry::new(telemetry.clone());
        registry.open(session.clone(), LIMITS).expect("open");
        (registry, telemetry, session)
    }

    fn kinds(t: &Telemetry) -> Vec<&'static str> {
        t.history.list(None, 100).into_iter().map(|r| r.outcome.as_str()).collect()
    }

    #[tokio::test]
    async fn a_committing_session_cannot_be_ended_by_anything_but_its_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (registry, telemetry, session) = setup(dir.path());
        let id = session.id();
        let data = Bytes::from(vec![7u8; 1000]);
        session.write_chunk(&Chunk::new(0, 0, data.clone())).expect("write");
        let commit = Commit {
            total_len: 1000,
            chunks: 1,
            sha256: Sha256::digest(&data).into(),
            stats: SourceStats::default(),
            catalog: None,
        };
        let CommitStart::Run(s, mut answer) = registry.begin_commit(id) else { panic!("first commit runs") };
        assert!(matches!(registry.begin_commit(id), CommitStart::Wait(_)), "a repeated Commit waits");
        // Operator abort, an agent's Abort on another stream, expiry, all at once.
        let abort = Outcome::Failed(Refusal::new(Reason::Cancelled, "operator"));
        assert_eq!(registry.end(id, abort), Err(NotEnded::Committing));
        registry.expire(Duration::ZERO, Duration::ZERO);
        registry.drain();
        assert_eq!(registry.sessions()[0].phase, Phase::Committing);
        let result = s.commit(&commit);
        let got = registry.commit_finished(id, result);
        assert!(matches!(got, CommitAnswer::Committed(_)), "{got:?}");
        answer.changed().await.expect("published");
        assert_eq!(answer.borrow().clone(), Some(got));
        assert_eq!(kinds(&telemetry), ["committed"], "one outcome, and it is the commit");
        assert!(matches!(registry.outcome(id), Some(Outcome::Committed(_))));
        assert!(matches!(registry.begin_commit(id), CommitStart::Done(CommitAnswer::Committed(_))));
        assert_eq!(registry.end(id, Outcome::Failed(Refusal::new(Reason::Cancelled, "late"))), Err(NotEnded::Gone));
        assert_eq!(kinds(&telemetry), ["committed"]);
    }

    #[tokio::test]
    async fn a_passing_shortage_keeps_the_session_and_ending_twice_records_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (registry, telemetry, session) = setup(dir.path());
        let id = session.id();
        let CommitStart::Run(..) = registry.begin_commit(id) else { panic!("runs") };
        let shortage = Refusal::new(Reason::Internal, "EMFILE");
        let got = registry.commit_finished(id, Err(CommitFailure::Retry(shortage)));
        assert!(matches!(got, CommitAnswer::Retry(_)));
        assert!(matches!(registry.sessions()[0].phase, Phase::Orphaned { .. }), "back to waiting for its agent");
        assert!(kinds(&telemetry).is_empty());
        let attached = registry.attach(id, 0, 1, |_| true, LIMITS).expect("attach");
        assert_eq!(registry.sessions()[0].phase, Phase::Receiving);
        registry.end(id, Outcome::Failed(Refusal::new(Reason::Cancelled, "operator"))).expect("ended");
        assert!(attached.cancel.is_cancelled(), "its streams are told");
        assert_eq!(registry.end(id, Outcome::Failed(Refusal::new(Reason::Expired, "again"))), Err(NotEnded::Gone));
        assert_eq!(kinds(&telemetry), ["aborted"]);
        assert_eq!(registry.count(), 0, "the entry lock is free");
        registry.may_open(&session.params.key, LIMITS).expect("the entry can run again");
    }
}
