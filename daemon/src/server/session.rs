//! One upload session on the server: the `.part` file, which chunks it holds, the
//! running SHA-256 of its contiguous prefix, its attached streams and its lifecycle.
//!
//! Chunk geometry is fixed by the `Hello`: chunk `seq` lives at `seq * chunk_size` and
//! is exactly `chunk_size` long, except the last, which may be shorter. That makes a
//! write idempotent and the set of received chunks a bitmap.
//!
//! Hashing follows the contiguous prefix: a chunk that extends it is hashed from
//! memory; a chunk that arrives early is written and hashed later, read back from the
//! file when the prefix reaches it. So the server never buffers out-of-order data and
//! its memory does not grow with the agent's window.
//!
//! Every chunk is recorded in the session journal after its write and before its
//! ack, so a restarted server can adopt the upload ([`Session::adopt`]).
//!
//! Locks: `chunks` guards the bitmap, the hasher and the journal and is held while hashing one
//! chunk (≈1 ms per MiB); `commit` serialises commits so a repeated `Commit` waits for
//! and returns the first one's result; `streams` is a short-lived table. None is held
//! across an `.await`: all methods here are blocking and run on blocking threads.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use nbackup_protocol::manifest::{MANIFEST_FORMAT, Manifest, hex};
use nbackup_protocol::wire::{Chunk, Commit, Committed, Compression, Reason, Refusal};
use nbackup_protocol::{Name, SessionId};

use super::journal::{self, ChunkRecord, Journal};
use super::storage::StorageArea;
use crate::fsutil;
use crate::state::RateMeter;

/// Most chunks one session may have: 2^24 chunks, i.e. 1 TiB at the smallest chunk
/// size and 256 TiB at the largest; the bitmap stays ≤ 2 MiB.
pub const MAX_CHUNKS: u64 = 1 << 24;

/// Identifies the entry a session writes; at most one session per key at a time.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EntryKey {
    pub agent: Name,
    pub storage: Name,
    pub backup: Name,
}

/// Parameters fixed when a session opens.
#[derive(Clone, Debug)]
pub struct SessionParams {
    pub id: SessionId,
    pub key: EntryKey,
    pub compression: Compression,
    pub level: i32,
    pub chunk_size: u32,
    pub max_streams: u16,
    pub agent_version: String,
    pub started: DateTime<Utc>,
}

/// What happened to a chunk handed to [`Session::write_chunk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    New,
    /// Already held (a resend after a reconnect); acknowledged again, not rewritten.
    Duplicate,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Committed(Committed),
    Failed(Refusal),
}

pub struct Session {
    pub params: SessionParams,
    pub storage: Arc<StorageArea>,
    pub part_path: PathBuf,
    file: File,
    chunks: Mutex<ChunkState>,
    commit: Mutex<Option<Result<Committed, Refusal>>>,
    /// Archives the commit's rotation removed.
    rotated: Mutex<Vec<String>>,
    streams: Mutex<HashMap<u16, StreamSlot>>,
    /// Streams lost or retired and not joined again, with their last counters.
    closed: Mutex<HashMap<u16, (u32, Arc<StreamStats>)>>,
    /// How often each stream index has been joined (for "reconnects").
    joins: Mutex<HashMap<u16, u32>>,
    /// Receive rate, sampled by the server's sampler.
    rate: RateMeter,
    /// Since when no stream has been attached (the agent may be gone).
    orphaned_since: Mutex<Option<Instant>>,
    outcome: Mutex<Option<Outcome>>,
    /// Cancelled when the session ends, for whatever reason; stream tasks watch it.
    pub ended: CancellationToken,
    created: Instant,
    last_activity_ms: AtomicU64,
    pub bytes_received: AtomicU64,
    pub duplicates: AtomicU64,
}

struct StreamSlot {
    generation: u32,
    cancel: CancellationToken,
    stats: Arc<StreamStats>,
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

/// One attached stream, for the admin API.
#[derive(Debug, Clone)]
pub struct StreamView {
    pub stream: u16,
    pub generation: u32,
    pub joins: u32,
    /// False for a stream lost or retired and not joined again.
    pub attached: bool,
    pub stats: Arc<StreamStats>,
}

struct ChunkState {
    received: Vec<u64>,
    count: u64,
    /// The chunk shorter than `chunk_size`, which must be the last one.
    short: Option<(u64, u32)>,
    highest: Option<u64>,
    hasher: Sha256,
    /// Chunks `0..next_hash` are hashed.
    next_hash: u64,
    hashed_bytes: u64,
    readback: Vec<u8>,
    journal: Journal,
}

impl ChunkState {
    fn new(journal: Journal) -> Self {
        ChunkState {
            received: Vec::new(),
            count: 0,
            short: None,
            highest: None,
            hasher: Sha256::new(),
            next_hash: 0,
            hashed_bytes: 0,
            readback: Vec::new(),
            journal,
        }
    }

    fn has(&self, seq: u64) -> bool {
        self.received.get((seq / 64) as usize).is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    fn set(&mut self, seq: u64) {
        let word = (seq / 64) as usize;
        if self.received.len() <= word {
            self.received.resize(word + 1, 0);
        }
        self.received[word] |= 1 << (seq % 64);
        self.count += 1;
        self.highest = Some(self.highest.map_or(seq, |h| h.max(seq)));
    }
}

fn refuse(reason: Reason, message: impl Into<String>) -> Refusal {
    Refusal::new(reason, message)
}

impl Session {
    /// Creates the session's `.part` file (exclusively, mode 0600) and its journal.
    pub fn create(params: SessionParams, storage: Arc<StorageArea>) -> Result<Self, Refusal> {
        use std::os::unix::fs::OpenOptionsExt;
        let part_path = storage.part_path(params.id);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&part_path)
            .map_err(|e| write_refusal(&e, "cannot create upload file"))?;
        let header = journal::Header {
            session: params.id.to_string(),
            agent: params.key.agent.to_string(),
            storage: params.key.storage.to_string(),
            backup: params.key.backup.to_string(),
            compression: params.compression,
            level: params.level,
            chunk_size: params.chunk_size,
            max_streams: params.max_streams,
            agent_version: params.agent_version.clone(),
            started: params.started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        let journal = match Journal::create(&Journal::path_for(&part_path), &header) {
            Ok(j) => j,
            Err(e) => {
                let _ = fsutil::remove_if_exists(&part_path);
                return Err(write_refusal(&e, "cannot create session journal"));
            }
        };
        Ok(Self::assemble(params, storage, part_path, file, ChunkState::new(journal), None))
    }

    fn assemble(
        params: SessionParams,
        storage: Arc<StorageArea>,
        part_path: PathBuf,
        file: File,
        chunks: ChunkState,
        orphaned_since: Option<Instant>,
    ) -> Self {
        Session {
            params,
            storage,
            part_path,
            file,
            chunks: Mutex::new(chunks),
            commit: Mutex::new(None),
            rotated: Mutex::new(Vec::new()),
            streams: Mutex::new(HashMap::new()),
            closed: Mutex::new(HashMap::new()),
            joins: Mutex::new(HashMap::new()),
            rate: RateMeter::default(),
            orphaned_since: Mutex::new(orphaned_since),
            outcome: Mutex::new(None),
            ended: CancellationToken::new(),
            created: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
        }
    }

    /// Takes over an upload from a previous run of the server: re-reads every
    /// journaled chunk from the `.part`, keeps those whose CRC32C checks out, and
    /// re-hashes the contiguous prefix. The session starts with no stream attached,
    /// waiting for its agent to re-join.
    pub fn adopt(contents: &journal::Contents, storage: Arc<StorageArea>) -> std::io::Result<Self> {
        let h = &contents.header;
        let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        let id = SessionId::from_hex(&h.session).ok_or_else(|| bad(format!("bad session id {:?}", h.session)))?;
        let name = |s: &str| Name::new(s).map_err(|e| bad(format!("bad name {s:?}: {e}")));
        let started = DateTime::parse_from_rfc3339(&h.started)
            .map_err(|e| bad(format!("bad start time: {e}")))?
            .with_timezone(&Utc);
        if !(nbackup_protocol::limits::MIN_CHUNK_SIZE..=nbackup_protocol::limits::MAX_CHUNK_SIZE)
            .contains(&h.chunk_size)
        {
            return Err(bad(format!("bad chunk size {}", h.chunk_size)));
        }
        let params = SessionParams {
            id,
            key: EntryKey { agent: name(&h.agent)?, storage: name(&h.storage)?, backup: name(&h.backup)? },
            compression: h.compression,
            level: h.level,
            chunk_size: h.chunk_size,
            max_streams: h.max_streams.max(1),
            agent_version: h.agent_version.clone(),
            started,
        };
        let part_path = storage.part_path(id);
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&part_path)?;
        let journal = Journal::reopen(&Journal::path_for(&part_path))?;
        let mut st = ChunkState::new(journal);
        let cs = u64::from(h.chunk_size);
        let mut buf = Vec::new();
        let mut bytes = 0u64;
        for r in &contents.chunks {
            if r.seq >= MAX_CHUNKS || u64::from(r.len) > cs || r.len == 0 || st.has(r.seq) {
                continue;
            }
            buf.resize(r.len as usize, 0);
            if file.read_exact_at(&mut buf, r.seq * cs).is_err() || crc32c::crc32c(&buf) != r.crc32c {
                continue; // The record outlived its data (power cut): the agent resends it.
            }
            if check_geometry(&st, r.seq, u64::from(r.len), cs).is_err() {
                continue;
            }
            st.set(r.seq);
            if u64::from(r.len) < cs {
                st.short = Some((r.seq, r.len));
            }
            bytes += u64::from(r.len);
        }
        let session = Self::assemble(params, storage, part_path, file, st, Some(Instant::now()));
        session.bytes_received.store(bytes, Ordering::Relaxed);
        {
            let mut st = lock(&session.chunks);
            session.hash_forward(&mut st).map_err(|r| bad(r.message))?;
        }
        session.touch();
        Ok(session)
    }

    pub fn id(&self) -> SessionId {
        self.params.id
    }

    pub fn touch(&self) {
        self.last_activity_ms.store(self.created.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the last frame on any stream of this session.
    pub fn idle_for(&self) -> std::time::Duration {
        let last = std::time::Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        self.created.elapsed().saturating_sub(last)
    }

    pub fn outcome(&self) -> Option<Outcome> {
        lock(&self.outcome).clone()
    }

    /// Writes one chunk at its offset and extends the hashed prefix. Blocking.
    ///
    /// Refusals with `Protocol` mean the agent broke the chunk geometry; with
    /// `DiskFull`/`WriteError` the storage failed. Either way nothing is acknowledged.
    pub fn write_chunk(&self, chunk: &Chunk) -> Result<Written, Refusal> {
        let cs = u64::from(self.params.chunk_size);
        let len = chunk.data.len() as u64;
        if chunk.seq >= MAX_CHUNKS {
            return Err(refuse(Reason::Protocol, format!("chunk {} is beyond the limit of {MAX_CHUNKS}", chunk.seq)));
        }
        if chunk.offset != chunk.seq * cs {
            return Err(refuse(
                Reason::Protocol,
                format!("chunk {} claims offset {}, expected {}", chunk.seq, chunk.offset, chunk.seq * cs),
            ));
        }
        if len == 0 || len > cs {
            return Err(refuse(Reason::Protocol, format!("chunk {} has {len} bytes; chunk size is {cs}", chunk.seq)));
        }
        {
            let st = lock(&self.chunks);
            if st.has(chunk.seq) {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                return Ok(Written::Duplicate);
            }
            check_geometry(&st, chunk.seq, len, cs)?;
        }
        crate::fault::io("chunk-write", &self.storage.cfg.base_dir.to_string_lossy())
            .and_then(|()| self.file.write_all_at(&chunk.data, chunk.offset))
            .map_err(|e| write_refusal(&e, &format!("writing chunk {}", chunk.seq)))?;
        let mut st = lock(&self.chunks);
        if st.has(chunk.seq) {
            // Another stream wrote the same chunk meanwhile; same bytes, same place.
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(Written::Duplicate);
        }
        check_geometry(&st, chunk.seq, len, cs)?;
        let record = ChunkRecord { seq: chunk.seq, len: len as u32, crc32c: chunk.crc32c };
        st.journal.chunk(record).map_err(|e| write_refusal(&e, "writing the session journal"))?;
        if self.storage.cfg.chunk_fsync {
            self.file.sync_data().map_err(|e| write_refusal(&e, "fsync"))?;
            st.journal.sync().map_err(|e| write_refusal(&e, "fsync journal"))?;
        }
        st.set(chunk.seq);
        if len < cs {
            st.short = Some((chunk.seq, len as u32));
        }
        self.bytes_received.fetch_add(len, Ordering::Relaxed);
        if st.next_hash == chunk.seq {
            st.hasher.update(&chunk.data);
            st.hashed_bytes += len;
            st.next_hash += 1;
            self.hash_forward(&mut st)?;
        }
        Ok(Written::New)
    }

    /// Hashes chunks that arrived early once the prefix reaches them, reading them
    /// back from the file.
    fn hash_forward(&self, st: &mut ChunkState) -> Result<(), Refusal> {
        let cs = u64::from(self.params.chunk_size);
        while st.has(st.next_hash) {
            let seq = st.next_hash;
            let len = match st.short {
                Some((s, l)) if s == seq => u64::from(l),
                _ => cs,
            };
            let mut buf = std::mem::take(&mut st.readback);
            buf.resize(len as usize, 0);
            self.file
                .read_exact_at(&mut buf, seq * cs)
                .map_err(|e| refuse(Reason::WriteError, format!("reading back chunk {seq}: {e}")))?;
            st.hasher.update(&buf);
            st.readback = buf;
            st.hashed_bytes += len;
            st.next_hash += 1;
        }
        Ok(())
    }

    /// Verifies the upload against `commit` and moves it to its final name. Blocking.
    ///
    /// Idempotent: a repeated `Commit` (the agent retries until answered) gets the
    /// first one's result, even while that one is still running on another stream.
    pub fn commit(&self, commit: &Commit) -> Result<Committed, Refusal> {
        let mut slot = lock(&self.commit);
        if let Some(done) = slot.as_ref() {
            return match done {
                Ok(c) if c.sha256 == commit.sha256 => Ok(c.clone()),
                Ok(_) => Err(refuse(Reason::VerifyFailed, "a different archive was already committed")),
                Err(r) => Err(r.clone()),
            };
        }
        let result = self.verify(commit).and_then(|()| self.finalize(commit));
        *slot = Some(result.clone());
        result
    }

    fn verify(&self, commit: &Commit) -> Result<(), Refusal> {
        let cs = u64::from(self.params.chunk_size);
        let st = lock(&self.chunks);
        if commit.chunks == 0 {
            return Err(refuse(Reason::VerifyFailed, "commit of an empty archive"));
        }
        if st.count != commit.chunks || st.next_hash != commit.chunks {
            let missing: Vec<u64> = (0..commit.chunks).filter(|s| !st.has(*s)).take(8).collect();
            return Err(refuse(
                Reason::VerifyFailed,
                format!("agent sent {} chunks, server holds {} (first missing: {missing:?})", commit.chunks, st.count),
            ));
        }
        let last_len = match st.short {
            Some((seq, len)) if seq + 1 == commit.chunks => u64::from(len),
            Some((seq, _)) => {
                return Err(refuse(Reason::VerifyFailed, format!("short chunk {seq} is not the last")));
            }
            None => cs,
        };
        let expected_len = (commit.chunks - 1) * cs + last_len;
        if expected_len != commit.total_len || st.hashed_bytes != commit.total_len {
            return Err(refuse(
                Reason::VerifyFailed,
                format!("agent says {} bytes, server holds {expected_len}", commit.total_len),
            ));
        }
        let ours: [u8; 32] = st.hasher.clone().finalize().into();
        if ours != commit.sha256 {
            return Err(refuse(
                Reason::VerifyFailed,
                format!("sha256 mismatch: server {}, agent {}", hex(&ours), hex(&commit.sha256)),
            ));
        }
        Ok(())
    }

    fn finalize(&self, commit: &Commit) -> Result<Committed, Refusal> {
        let p = &self.params;
        let scope = self.storage.cfg.base_dir.to_string_lossy().into_owned();
        let fail = |e: std::io::Error| write_refusal(&e, "committing archive");
        crate::fault::io("commit:before-intent", &scope).map_err(fail)?;
        let mut manifest = Manifest {
            format: MANIFEST_FORMAT,
            archive: self.storage.next_name(&p.key.agent, &p.key.backup, p.started, p.compression).map_err(fail)?,
            agent: p.key.agent.to_string(),
            backup: p.key.backup.to_string(),
            storage: p.key.storage.to_string(),
            compression: p.compression,
            compression_level: p.level,
            size: commit.total_len,
            sha256: hex(&commit.sha256),
            chunks: commit.chunks,
            chunk_size: p.chunk_size,
            entries: commit.stats.entries,
            bytes_read: commit.stats.bytes_read,
            skipped: commit.stats.skipped,
            started_at: p.started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            finished_at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            agent_version: p.agent_version.clone(),
            server_version: crate::VERSION.to_string(),
            session: p.id.to_string(),
        };
        let mut st = lock(&self.chunks);
        st.journal
            .intent(&journal::Intent { archive: manifest.archive.clone(), manifest: manifest.clone() })
            .map_err(fail)?;
        let path =
            self.storage.install(&self.part_path, &self.file, &p.key.agent, &p.key.backup, &manifest).map_err(fail)?;
        manifest.archive = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        tracing::info!(
            session = %p.id, agent = %p.key.agent, backup = %p.key.backup, storage = %p.key.storage,
            archive = %path.display(), bytes = commit.total_len, "committed"
        );
        *lock(&self.rotated) = rotate_logged(&self.storage, &p.key.agent, &p.key.backup);
        let done = Committed { archive: manifest.archive, size: commit.total_len, sha256: commit.sha256 };
        st.journal.done(&done_record(&done)).map_err(fail)?;
        self.storage.record_committed(&committed_entry(&p.id, &p.key.agent, &done)).map_err(fail)?;
        drop(st);
        // The outcome is in the committed log now; the journal has served its purpose.
        let _ = fsutil::remove_if_exists(&self.journal_path());
        Ok(done)
    }

    /// Attaches a stream. A higher generation replaces the attached connection (which
    /// is told to stop); an equal or lower one is a duplicate.
    pub fn attach(&self, stream: u16, generation: u32) -> Result<(CancellationToken, Arc<StreamStats>), Refusal> {
        if stream >= self.params.max_streams {
            return Err(refuse(
                Reason::TooManyStreams,
                format!("stream {stream} is beyond this session's {} streams", self.params.max_streams),
            ));
        }
        let mut streams = lock(&self.streams);
        if let Some(slot) = streams.get(&stream) {
            if generation <= slot.generation {
                return Err(refuse(
                    Reason::Busy,
                    format!("stream {stream} is already attached (generation {})", slot.generation),
                ));
            }
            slot.cancel.cancel();
        }
        let cancel = self.ended.child_token();
        let stats = Arc::new(StreamStats::default());
        streams.insert(stream, StreamSlot { generation, cancel: cancel.clone(), stats: stats.clone() });
        lock(&self.closed).remove(&stream);
        *lock(&self.joins).entry(stream).or_insert(0) += 1;
        *lock(&self.orphaned_since) = None;
        Ok((cancel, stats))
    }

    /// Detaches a stream if `generation` is still the attached one.
    pub fn detach(&self, stream: u16, generation: u32) {
        let mut streams = lock(&self.streams);
        if streams.get(&stream).is_some_and(|s| s.generation == generation) {
            if let Some(slot) = streams.remove(&stream) {
                slot.stats.rate.stop();
                lock(&self.closed).insert(stream, (slot.generation, slot.stats));
            }
            if streams.is_empty() {
                *lock(&self.orphaned_since) = Some(Instant::now());
            }
        }
    }

    /// How long the session has had no stream attached, if it has none.
    pub fn orphaned_for(&self) -> Option<Duration> {
        lock(&self.orphaned_since).map(|t| t.elapsed())
    }

    /// Archives removed by the rotation after this session's commit.
    pub fn rotated(&self) -> Vec<String> {
        lock(&self.rotated).clone()
    }

    pub fn journal_path(&self) -> PathBuf {
        Journal::path_for(&self.part_path)
    }

    /// Chunks held without a gap from chunk 0.
    pub fn contiguous(&self) -> u64 {
        lock(&self.chunks).next_hash
    }

    pub fn attached_streams(&self) -> usize {
        lock(&self.streams).len()
    }

    /// The streams, attached or not, by index.
    pub fn streams(&self) -> Vec<StreamView> {
        let joins = lock(&self.joins).clone();
        let view = |stream: u16, generation: u32, attached: bool, stats: &Arc<StreamStats>| StreamView {
            stream,
            generation,
            joins: joins.get(&stream).copied().unwrap_or(1),
            attached,
            stats: stats.clone(),
        };
        let mut v: Vec<StreamView> =
            lock(&self.streams).iter().map(|(i, s)| view(*i, s.generation, true, &s.stats)).collect();
        v.extend(lock(&self.closed).iter().map(|(i, (generation, stats))| view(*i, *generation, false, stats)));
        v.sort_by_key(|s| s.stream);
        v
    }

    /// Closes one stream's connection; the agent re-joins and resends what it had
    /// in flight (operator "rotate"). False if no such stream is attached.
    pub fn rotate(&self, stream: u16) -> bool {
        match lock(&self.streams).get(&stream) {
            Some(slot) => {
                slot.cancel.cancel();
                true
            }
            None => false,
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate.rate()
    }

    /// Updates receive rates (the session's and its streams'); about once a second.
    pub fn sample(&self) {
        self.rate.sample(self.bytes_received.load(Ordering::Relaxed));
        for s in lock(&self.streams).values() {
            s.stats.rate.sample(s.stats.bytes.load(Ordering::Relaxed));
        }
    }

    /// Ends the session once: records the outcome, stops its streams, and removes the
    /// upload unless it was committed. Returns false if it had already ended.
    pub fn end(&self, outcome: Outcome) -> bool {
        {
            let mut slot = lock(&self.outcome);
            if slot.is_some() {
                return false;
            }
            *slot = Some(outcome.clone());
        }
        if let Outcome::Failed(r) = &outcome {
            let p = &self.params;
            tracing::warn!(
                session = %p.id, agent = %p.key.agent, backup = %p.key.backup, reason = %r.reason,
                "session ended: {}", r.message
            );
            for path in [self.part_path.clone(), Journal::path_for(&self.part_path)] {
                if let Err(e) = fsutil::remove_if_exists(&path) {
                    tracing::warn!(path = %path.display(), "cannot remove upload: {e}");
                }
            }
        }
        self.ended.cancel();
        true
    }
}

fn check_geometry(st: &ChunkState, seq: u64, len: u64, cs: u64) -> Result<(), Refusal> {
    if let Some((short, _)) = st.short {
        if seq > short {
            return Err(refuse(Reason::Protocol, format!("chunk {seq} follows the final short chunk {short}")));
        }
        if len < cs && seq != short {
            return Err(refuse(Reason::Protocol, format!("second short chunk {seq} (first: {short})")));
        }
    }
    if len < cs && st.highest.is_some_and(|h| h > seq) {
        return Err(refuse(Reason::Protocol, format!("short chunk {seq} is not the last")));
    }
    Ok(())
}

/// Rotates an entry after a commit; a failure only keeps an extra old archive.
/// Returns the names removed.
pub(crate) fn rotate_logged(storage: &StorageArea, agent: &Name, backup: &Name) -> Vec<String> {
    match storage.rotate(agent, backup) {
        Ok(removed) => {
            for name in &removed {
                tracing::info!(%agent, %backup, archive = %name, "rotated out");
            }
            removed
        }
        Err(e) => {
            tracing::warn!(%agent, %backup, "rotation failed: {e}");
            Vec::new()
        }
    }
}

pub(crate) fn committed_entry(id: &SessionId, agent: &Name, c: &Committed) -> super::storage::CommittedEntry {
    super::storage::CommittedEntry {
        session: id.to_string(),
        agent: agent.to_string(),
        archive: c.archive.clone(),
        size: c.size,
        sha256: hex(&c.sha256),
        at: super::storage::unix_now(),
    }
}

pub(crate) fn done_record(c: &Committed) -> journal::Done {
    journal::Done { archive: c.archive.clone(), size: c.size, sha256: hex(&c.sha256) }
}

fn write_refusal(e: &std::io::Error, what: &str) -> Refusal {
    if fsutil::is_disk_full(e) {
        refuse(Reason::DiskFull, format!("{what}: {e}"))
    } else {
        refuse(Reason::WriteError, format!("{what}: {e}"))
    }
}

/// Locks a mutex, recovering from poisoning: every critical section here leaves its
/// state consistent before anything that could panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use nbackup_protocol::config::Storage;
    use nbackup_protocol::wire::SourceStats;

    fn session(dir: &std::path::Path, cs: u32) -> Session {
        let area = StorageArea::new(Storage {
            name: Name::new("main").expect("name"),
            base_dir: dir.to_path_buf(),
            max_backups: 3,
            compression: Compression::Zstd,
            level: 3,
            chunk_fsync: false,
        });
        area.prepare().expect("prepare");
        let params = SessionParams {
            id: SessionId([7; 16]),
            key: EntryKey {
                agent: Name::new("a").expect("a"),
                storage: Name::new("main").expect("s"),
                backup: Name::new("b").expect("b"),
            },
            compression: Compression::Zstd,
            level: 3,
            chunk_size: cs,
            max_streams: 4,
            agent_version: "test".into(),
            started: Utc::now(),
        };
        Session::create(params, Arc::new(area)).expect("create")
    }

    fn chunks_of(data: &[u8], cs: usize) -> Vec<Chunk> {
        data.chunks(cs)
            .enumerate()
            .map(|(i, c)| Chunk::new(i as u64, (i * cs) as u64, Bytes::copy_from_slice(c)))
            .collect()
    }

    fn commit_for(data: &[u8], chunks: u64) -> Commit {
        Commit {
            total_len: data.len() as u64,
            chunks,
            sha256: Sha256::digest(data).into(),
            stats: SourceStats::default(),
        }
    }

    #[test]
    fn out_of_order_and_duplicate_chunks_commit_the_right_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = session(dir.path(), 4);
        let data = b"0123456789abcdefXY";
        let chunks = chunks_of(data, 4);
        for i in [3usize, 0, 4, 1, 1, 2, 0] {
            s.write_chunk(&chunks[i]).expect("write");
        }
        assert_eq!(s.duplicates.load(Ordering::Relaxed), 2);
        let done = s.commit(&commit_for(data, 5)).expect("commit");
        let stored = std::fs::read(s.storage.entry_dir(&s.params.key.agent, &s.params.key.backup).join(&done.archive))
            .expect("archive");
        assert_eq!(stored, data);
        // Idempotent: a retried commit returns the same answer.
        assert_eq!(s.commit(&commit_for(data, 5)), Ok(done));
    }

    #[test]
    fn rejects_bad_geometry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = session(dir.path(), 4);
        let err = |c: Chunk| s.write_chunk(&c).expect_err("must refuse").reason;
        assert_eq!(err(Chunk::new(1, 5, Bytes::from_static(b"abcd"))), Reason::Protocol);
        assert_eq!(err(Chunk::new(0, 0, Bytes::from_static(b"abcde"))), Reason::Protocol);
        assert_eq!(err(Chunk::new(0, 0, Bytes::new())), Reason::Protocol);
        assert_eq!(err(Chunk::new(MAX_CHUNKS, MAX_CHUNKS * 4, Bytes::from_static(b"a"))), Reason::Protocol);
        s.write_chunk(&Chunk::new(2, 8, Bytes::from_static(b"ab"))).expect("short last chunk");
        assert_eq!(err(Chunk::new(3, 12, Bytes::from_static(b"abcd"))), Reason::Protocol);
        assert_eq!(err(Chunk::new(1, 4, Bytes::from_static(b"a"))), Reason::Protocol);
    }

    #[test]
    fn refuses_commit_with_missing_chunks_or_wrong_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = session(dir.path(), 4);
        let data = b"0123456789ab";
        let chunks = chunks_of(data, 4);
        s.write_chunk(&chunks[0]).expect("write");
        s.write_chunk(&chunks[2]).expect("write");
        let r = s.commit(&commit_for(data, 3)).expect_err("missing chunk");
        assert_eq!(r.reason, Reason::VerifyFailed);
        assert!(r.message.contains("first missing: [1]"), "{}", r.message);

        let s = session(&dir.path().join("x"), 4);
        for c in &chunks {
            s.write_chunk(c).expect("write");
        }
        let mut bad = commit_for(data, 3);
        bad.sha256[0] ^= 1;
        let r = s.commit(&bad).expect_err("bad hash");
        assert!(r.message.contains("sha256 mismatch"), "{}", r.message);
    }

    #[test]
    fn a_newer_generation_replaces_a_stream_and_duplicates_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = session(dir.path(), 4);
        let (first, _) = s.attach(1, 1).expect("attach");
        assert_eq!(s.attach(1, 1).expect_err("duplicate").reason, Reason::Busy);
        let (second, _) = s.attach(1, 2).expect("rejoin");
        assert_eq!(s.streams()[0].joins, 2);
        assert!(first.is_cancelled() && !second.is_cancelled());
        assert_eq!(s.attach(4, 1).expect_err("too many").reason, Reason::TooManyStreams);
        s.detach(1, 1);
        assert_eq!(s.attached_streams(), 1, "stale detach does not remove the new stream");
        assert!(s.end(Outcome::Failed(refuse(Reason::Cancelled, "test"))));
        assert!(second.is_cancelled());
        assert!(!s.part_path.exists());
        assert!(!s.end(Outcome::Failed(refuse(Reason::Cancelled, "again"))));
    }
}
