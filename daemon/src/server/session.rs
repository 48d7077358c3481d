//! One upload on the server: the `.part` file, which chunks it holds and their
//! checksums, and the commit that turns it into an archive. Its lifecycle (phase,
//! streams, outcome) belongs to the [registry](super::registry), not to this type.
//!
//! Chunk geometry is fixed by the `Hello`: chunk `seq` lives at `seq * chunk_size` and
//! is exactly `chunk_size` long, except the last, which may be shorter. That makes a
//! write idempotent and the set of received chunks a bitmap.
//!
//! **What is committed is what was verified.** A chunk's CRC32C is checked on arrival
//! and kept. The SHA-256 is computed over the *file*, not over what passed through
//! memory: as the contiguous prefix grows, its chunks are read back from the `.part`
//! (checked against their CRC32C again) and hashed on another blocking thread, after
//! the ack, overlapped with the transfer. At
//! commit the upload is made durable and every chunk is read back once more and
//! checked against the CRC32C it arrived with, on two threads. A byte that changed on
//! the server's disk after it was received fails the commit naming its chunk and
//! offset, and nothing unverified is ever renamed to an archive name.
//!
//! Every chunk is recorded in the session journal after its write and before its
//! ack, so a restarted server can adopt the upload ([`Session::adopt`]).
//!
//! All methods are blocking and run on blocking threads. `chunks` guards the bitmap
//! and the journal, `hash` the running SHA-256; neither is held across a data write,
//! an fsync or a rename, and `chunks` never across a read-back. What the admin API reads
//! (bytes, contiguous chunks, commit progress) are atomics.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use nbackup_protocol::manifest::{MANIFEST_FORMAT, Manifest, hex};
use nbackup_protocol::wire::{CatalogDigest, CatalogPart, Chunk, Commit, Committed, Compression, Reason, Refusal};
use nbackup_protocol::{Name, SessionId};

use super::journal::{self, ChunkRecord, Journal};
use super::partfile::{Buffer, PartFile};
use super::storage::StorageArea;
use crate::fsutil;
use crate::state::RateMeter;

/// Most chunks one session may have: 2^24 chunks, i.e. 1 TiB at the smallest chunk
/// size and 256 TiB at the largest; the bitmap stays ≤ 2 MiB and the checksums ≤ 64 MiB.
pub const MAX_CHUNKS: u64 = 1 << 24;

/// Largest catalog a session accepts: ~20 bytes a member, so room for 10⁸ members.
pub const MAX_CATALOG_LEN: u64 = 2 << 30;

/// Identifies the entry a session writes; at most one session per key at a time.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

impl SessionParams {
    /// The parameters a journal's header records, checked as a `Hello` would be.
    pub fn from_header(h: &journal::Header) -> io::Result<Self> {
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let name = |s: &str| Name::new(s).map_err(|e| bad(format!("bad name {s:?}: {e}")));
        if !(nbackup_protocol::limits::MIN_CHUNK_SIZE..=nbackup_protocol::limits::MAX_CHUNK_SIZE)
            .contains(&h.chunk_size)
        {
            return Err(bad(format!("bad chunk size {}", h.chunk_size)));
        }
        Ok(SessionParams {
            id: SessionId::from_hex(&h.session).ok_or_else(|| bad(format!("bad session id {:?}", h.session)))?,
            key: EntryKey { agent: name(&h.agent)?, storage: name(&h.storage)?, backup: name(&h.backup)? },
            compression: h.compression,
            level: h.level,
            chunk_size: h.chunk_size,
            max_streams: h.max_streams.max(1),
            agent_version: h.agent_version.clone(),
            started: DateTime::parse_from_rfc3339(&h.started)
                .map_err(|e| bad(format!("bad start time: {e}")))?
                .with_timezone(&Utc),
        })
    }
}

/// What happened to a chunk handed to [`Session::write_chunk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    New,
    /// Already held (a resend after a reconnect); acknowledged again, not rewritten.
    Duplicate,
}

/// A commit that renamed the upload to its archive name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitDone {
    pub committed: Committed,
    /// Archives the rotation after it removed.
    pub rotated: Vec<String>,
    /// A step after the rename that failed (directory fsync, manifest, rotation,
    /// commit log). The archive is committed all the same; the journal is kept so the
    /// next start finishes the step.
    pub incomplete: Option<String>,
}

/// Why a commit did not rename anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitFailure {
    /// A passing shortage (descriptors, memory): the upload is intact and the agent
    /// may send `Commit` again.
    Retry(Refusal),
    /// The upload cannot become this archive; the session ends.
    Reject(Refusal),
}

impl CommitFailure {
    pub fn refusal(&self) -> &Refusal {
        match self {
            CommitFailure::Retry(r) | CommitFailure::Reject(r) => r,
        }
    }
}

pub struct Session {
    pub params: SessionParams,
    pub storage: Arc<StorageArea>,
    pub part_path: PathBuf,
    file: PartFile,
    chunks: Mutex<ChunkState>,
    hash: Mutex<HashState>,
    /// Chunks written and not yet hashed, kept for the hasher (bounded).
    early: Mutex<Early>,
    /// Set by whoever finds the hasher busy; the hasher looks again before it stops.
    rehash: AtomicBool,
    /// Receive rate, sampled by the server's sampler.
    pub rate: RateMeter,
    created: Instant,
    last_activity_ms: AtomicU64,
    pub bytes_received: AtomicU64,
    pub duplicates: AtomicU64,
    /// Chunks held without a gap from chunk 0 (published copy of the chunk state's).
    contiguous: AtomicU64,
    /// Bytes read back and checked by the commit in progress.
    pub verified: AtomicU64,
    /// Nanoseconds spent in chunk writes (and their fsyncs), for the console's
    /// bottleneck line.
    pub disk_nanos: AtomicU64,
}

struct ChunkState {
    received: Vec<u64>,
    /// CRC32C of every chunk as it arrived, by seq (checked again at commit).
    crcs: Vec<u32>,
    count: u64,
    /// The chunk shorter than `chunk_size`, which must be the last one.
    short: Option<(u64, u32)>,
    highest: Option<u64>,
    contiguous: u64,
    journal: Journal,
}

/// Bytes of written chunks held for the hasher. A chunk that arrives ahead of the
/// hashed prefix waits here for its turn rather than being read back from the disk
/// then; past this bound (a stream far behind the others) it is read back.
const EARLY_MAX: usize = 32 << 20;

/// Chunks written and not yet hashed, by seq, with the CRC32C they arrived with.
#[derive(Default)]
struct Early {
    chunks: std::collections::BTreeMap<u64, (u32, bytes::Bytes)>,
    bytes: usize,
}

impl Early {
    fn keep(&mut self, chunk: &Chunk) {
        if self.bytes + chunk.data.len() <= EARLY_MAX
            && self.chunks.insert(chunk.seq, (chunk.crc32c, chunk.data.clone())).is_none()
        {
            self.bytes += chunk.data.len();
        }
    }

    /// Chunk `seq` if held with the CRC32C recorded for it; drops anything older
    /// (hashed meanwhile from the file, or refused after it was written).
    fn take(&mut self, seq: u64, crc32c: u32) -> Option<bytes::Bytes> {
        while let Some(entry) = self.chunks.first_entry()
            && *entry.key() <= seq
        {
            let (key, (crc, data)) = entry.remove_entry();
            self.bytes -= data.len();
            if key == seq && crc == crc32c {
                return Some(data);
            }
        }
        None
    }
}

/// SHA-256 of chunks `0..hashed`. Its own lock, so hashing (off the ack path, on
/// another blocking thread) never holds up a write.
struct HashState {
    hasher: Sha256,
    hashed: u64,
    readback: Buffer,
}

impl ChunkState {
    fn new(journal: Journal) -> Self {
        ChunkState {
            received: Vec::new(),
            crcs: Vec::new(),
            count: 0,
            short: None,
            highest: None,
            contiguous: 0,
            journal,
        }
    }

    fn has(&self, seq: u64) -> bool {
        self.received.get((seq / 64) as usize).is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    fn set(&mut self, seq: u64, crc: u32) {
        let word = (seq / 64) as usize;
        if self.received.len() <= word {
            self.received.resize(word + 1, 0);
        }
        self.received[word] |= 1 << (seq % 64);
        if self.crcs.len() <= seq as usize {
            self.crcs.resize(seq as usize + 1, 0);
        }
        self.crcs[seq as usize] = crc;
        self.count += 1;
        self.highest = Some(self.highest.map_or(seq, |h| h.max(seq)));
        while self.has(self.contiguous) {
            self.contiguous += 1;
        }
    }
}

fn refuse(reason: Reason, message: impl Into<String>) -> Refusal {
    Refusal::new(reason, message)
}

impl Session {
    /// Creates the session's `.part` file (exclusively, mode 0600) and its journal.
    pub fn create(params: SessionParams, storage: Arc<StorageArea>) -> Result<Self, Refusal> {
        let part_path = storage.part_path(params.id);
        let file =
            PartFile::create(&part_path, params.chunk_size).map_err(|e| io_refusal(&e, "cannot create upload file"))?;
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
                return Err(io_refusal(&e, "cannot create session journal"));
            }
        };
        Ok(Self::assemble(params, storage, part_path, file, ChunkState::new(journal)))
    }

    fn assemble(
        params: SessionParams,
        storage: Arc<StorageArea>,
        part_path: PathBuf,
        file: PartFile,
        chunks: ChunkState,
    ) -> Self {
        Session {
            params,
            storage,
            part_path,
            file,
            chunks: Mutex::new(chunks),
            hash: Mutex::new(HashState { hasher: Sha256::new(), hashed: 0, readback: Buffer::default() }),
            early: Mutex::default(),
            rehash: AtomicBool::new(false),
            rate: RateMeter::default(),
            created: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            contiguous: AtomicU64::new(0),
            verified: AtomicU64::new(0),
            disk_nanos: AtomicU64::new(0),
        }
    }

    /// Takes over an upload from a previous run of the server: re-reads every
    /// journaled chunk from the `.part` and keeps those whose CRC32C checks out (after
    /// a power cut without `chunk_fsync` a record may outlive its data; the agent
    /// resends what is dropped). Reads the whole upload: runs after readiness.
    pub fn adopt(contents: &journal::Contents, storage: Arc<StorageArea>) -> io::Result<Self> {
        let h = &contents.header;
        let params = SessionParams::from_header(h)?;
        let id = params.id;
        let part_path = storage.part_path(id);
        let file = PartFile::open(&part_path, h.chunk_size)?;
        let journal = Journal::reopen(&Journal::path_for(&part_path))?;
        let mut st = ChunkState::new(journal);
        let cs = u64::from(h.chunk_size);
        let mut buf = Buffer::default();
        let mut bytes = 0u64;
        for r in &contents.chunks {
            if r.seq >= MAX_CHUNKS || u64::from(r.len) > cs || r.len == 0 || st.has(r.seq) {
                continue;
            }
            if file.read_at(&mut buf, r.seq * cs, r.len as usize).map(crc32c::crc32c).ok() != Some(r.crc32c) {
                continue;
            }
            if check_geometry(&st, r.seq, u64::from(r.len), cs).is_err() {
                continue;
            }
            st.set(r.seq, r.crc32c);
            if u64::from(r.len) < cs {
                st.short = Some((r.seq, r.len));
            }
            bytes += u64::from(r.len);
        }
        let session = Self::assemble(params, storage, part_path, file, st);
        session.bytes_received.store(bytes, Ordering::Relaxed);
        session.publish(&crate::lock(&session.chunks));
        session.hash_prefix().map_err(|r| io::Error::new(io::ErrorKind::InvalidData, r.message))?;
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
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        self.created.elapsed().saturating_sub(last)
    }

    /// Chunks held without a gap from chunk 0.
    pub fn contiguous(&self) -> u64 {
        self.contiguous.load(Ordering::Relaxed)
    }

    fn publish(&self, st: &ChunkState) {
        self.contiguous.store(st.contiguous, Ordering::Relaxed);
    }

    /// Writes one chunk at its offset. Blocking.
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
            let st = crate::lock(&self.chunks);
            if st.has(chunk.seq) {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                return Ok(Written::Duplicate);
            }
            check_geometry(&st, chunk.seq, len, cs)?;
        }
        let scope = self.storage.cfg.base_dir.to_string_lossy();
        let writing = Instant::now();
        crate::fault::io("chunk-write", &scope)
            .and_then(|()| self.file.write_at(&chunk.data, chunk.offset))
            .map_err(|e| io_refusal(&e, &format!("writing chunk {}", chunk.seq)))?;
        if self.storage.cfg.chunk_fsync {
            self.file.file().sync_data().map_err(|e| io_refusal(&e, "fsync"))?;
        } else if !self.file.is_direct() {
            // Starts the chunk's writeback now (DONTNEED writes dirty pages back
            // asynchronously and keeps them cached while they are under writeback), so
            // the commit's fsync waits for the last few chunks rather than the whole
            // archive: 0.6 s of a 5 s zstd backup on the benchmark. Advice only.
            let _ = rustix::fs::fadvise(
                self.file.file(),
                chunk.offset,
                std::num::NonZeroU64::new(len),
                rustix::fs::Advice::DontNeed,
            );
        }
        self.disk_nanos.fetch_add(writing.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let mut st = crate::lock(&self.chunks);
        if st.has(chunk.seq) {
            // Another stream wrote the same chunk meanwhile; same bytes, same place.
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(Written::Duplicate);
        }
        check_geometry(&st, chunk.seq, len, cs)?;
        // Held before it counts as received, so the hasher never passes it unheld.
        crate::lock(&self.early).keep(chunk);
        let record = ChunkRecord { seq: chunk.seq, len: len as u32, crc32c: chunk.crc32c };
        st.journal.chunk(record).map_err(|e| io_refusal(&e, "writing the session journal"))?;
        if self.storage.cfg.chunk_fsync {
            st.journal.sync().map_err(|e| io_refusal(&e, "fsync journal"))?;
        }
        st.set(chunk.seq, chunk.crc32c);
        if len < cs {
            st.short = Some((chunk.seq, len as u32));
        }
        self.publish(&st);
        self.bytes_received.fetch_add(len, Ordering::Relaxed);
        Ok(Written::New)
    }

    /// Hashes the contiguous prefix as far as it reaches, unless another thread is
    /// hashing it already (that one then goes on as far as it reaches now). Called
    /// after each chunk is acknowledged, off the ack path: at most one blocking
    /// thread per session hashes, the others return at once.
    pub fn hash_forward(&self) -> Result<(), Refusal> {
        // Announced before trying: a hasher about to stop sees it and looks again.
        self.rehash.store(true, Ordering::SeqCst);
        loop {
            let mut hs = match self.hash.try_lock() {
                Ok(hs) => hs,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
            };
            while self.rehash.swap(false, Ordering::SeqCst) {
                self.hash_locked(&mut hs)?;
            }
            drop(hs);
            if !self.rehash.load(Ordering::SeqCst) {
                return Ok(());
            }
        }
    }

    /// Hashes the whole contiguous prefix, waiting for a hasher at work. Blocking.
    fn hash_prefix(&self) -> Result<(), Refusal> {
        let mut hs = crate::lock(&self.hash);
        self.hash_locked(&mut hs)
    }

    /// A chunk is hashed from the buffer it arrived in (its CRC32C was checked on
    /// arrival, and the commit reads the whole file back against the CRC32Cs); one
    /// not held in memory (adopted from an earlier run, or past [`EARLY_MAX`]) is
    /// read back from the file and checked against the CRC32C it arrived with.
    fn hash_locked(&self, hs: &mut HashState) -> Result<(), Refusal> {
        let cs = u64::from(self.params.chunk_size);
        loop {
            let seq = hs.hashed;
            let (len, want) = {
                let st = crate::lock(&self.chunks);
                if seq >= st.contiguous {
                    return Ok(());
                }
                let len = match st.short {
                    Some((s, l)) if s == seq => u64::from(l),
                    _ => cs,
                };
                (len, st.crcs[seq as usize])
            };
            if let Some(data) = crate::lock(&self.early).take(seq, want) {
                hs.hasher.update(&data);
                hs.hashed += 1;
                continue;
            }
            let mut buf = std::mem::take(&mut hs.readback);
            let bytes = self
                .file
                .read_at(&mut buf, seq * cs, len as usize)
                .map_err(|e| io_refusal(&e, &format!("reading back chunk {seq}")))?;
            let got = crc32c::crc32c(bytes);
            if got != want {
                return Err(changed(seq, seq * cs, got, want));
            }
            hs.hasher.update(bytes);
            hs.readback = buf;
            hs.hashed += 1;
        }
    }

    /// `.incoming/<session>.catalog`, where the catalog's parts are written.
    pub fn catalog_path(&self) -> PathBuf {
        self.part_path.with_extension("catalog")
    }

    /// Writes one piece of the catalog at its offset (idempotent, like chunks).
    pub fn write_catalog(&self, part: &CatalogPart) -> Result<(), Refusal> {
        use std::os::unix::fs::OpenOptionsExt;
        let end = part.offset.saturating_add(part.data.len() as u64);
        if end > MAX_CATALOG_LEN {
            return Err(refuse(Reason::Protocol, format!("catalog past {MAX_CATALOG_LEN} bytes")));
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.catalog_path())
            .map_err(|e| io_refusal(&e, "cannot create the catalog file"))?;
        file.write_all_at(&part.data, part.offset).map_err(|e| io_refusal(&e, "writing the catalog"))
    }

    /// Keeps the catalog file if it is exactly what the agent describes (made
    /// durable), removes it if not. A bad catalog never fails a good archive: the archive is
    /// committed without one (and listed by reading it).
    fn check_catalog(&self, digest: &CatalogDigest) {
        let path = self.catalog_path();
        let checked = (|| -> io::Result<Result<(), String>> {
            let bytes = std::fs::read(&path)?;
            if bytes.len() as u64 != digest.len {
                return Ok(Err(format!("{} bytes, the agent sent {}", bytes.len(), digest.len)));
            }
            if <[u8; 32]>::from(Sha256::digest(&bytes)) != digest.sha256 {
                return Ok(Err("sha256 differs from the agent's".into()));
            }
            File::open(&path)?.sync_all()?;
            Ok(Ok(()))
        })();
        let why = match checked {
            Ok(Ok(())) => return,
            Ok(Err(why)) => why,
            Err(e) => e.to_string(),
        };
        tracing::warn!(session = %self.params.id, "committing without a catalog: {why}");
        let _ = fsutil::remove_if_exists(&path);
    }

    /// Verifies the upload against `commit` and moves it to its final name. Blocking;
    /// the registry makes sure only one runs per session.
    pub fn commit(&self, commit: &Commit) -> Result<CommitDone, CommitFailure> {
        let (crcs, total, sha) = self.check_complete(commit).map_err(CommitFailure::Reject)?;
        if sha != commit.sha256 {
            return Err(CommitFailure::Reject(refuse(
                Reason::VerifyFailed,
                format!("sha256 mismatch: stored file {}, agent {}", hex(&sha), hex(&commit.sha256)),
            )));
        }
        let scope = self.storage.cfg.base_dir.to_string_lossy().into_owned();
        let fail = |e: io::Error, what: &str| classify_commit_error(&e, what);
        crate::fault::io("commit:before-intent", &scope).map_err(|e| fail(e, "committing archive"))?;
        // Durable first, then read back: the hash must describe what the disk holds.
        // Direct writes pad the last chunk to a whole block.
        let cut = match self.file.file().metadata() {
            Ok(m) if m.len() > total => self.file.file().set_len(total),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        cut.map_err(|e| fail(e, "cutting the upload to its length"))?;
        self.file.file().sync_all().map_err(|e| fail(e, "fsync of the upload"))?;
        self.verify_stored(&crcs, total)?;
        match &commit.catalog {
            Some(digest) => self.check_catalog(digest),
            None => {
                let _ = fsutil::remove_if_exists(&self.catalog_path());
            }
        }
        let p = &self.params;
        let (agent, backup) = (&p.key.agent, &p.key.backup);
        let (name, seq) = self
            .storage
            .next_archive(agent, backup, p.started, p.compression)
            .map_err(|e| fail(e, "naming the archive"))?;
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            archive: name,
            agent: agent.to_string(),
            backup: backup.to_string(),
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
            commit_seq: Some(seq),
        };
        self.storage.check_quota(agent, commit.total_len).map_err(CommitFailure::Reject)?;
        crate::lock(&self.chunks)
            .journal
            .intent(&journal::Intent { archive: manifest.archive.clone(), manifest: manifest.clone() })
            .map_err(|e| fail(e, "writing the commit intent"))?;
        let path =
            self.storage.place(&self.part_path, agent, backup, &manifest.archive).map_err(|e| fail(e, "rename"))?;
        tracing::info!(
            session = %p.id, agent = %agent, backup = %backup, storage = %p.key.storage,
            archive = %path.display(), bytes = commit.total_len, seq, "committed"
        );
        let committed = Committed { archive: manifest.archive.clone(), size: commit.total_len, sha256: commit.sha256 };
        // The archive exists under its name: from here on it is committed, whatever
        // fails next. A failed step is reported and finished at the next start.
        let (rotated, incomplete) = match self.settle(&path, &manifest, &committed) {
            Ok(rotated) => (rotated, None),
            Err((rotated, why)) => {
                tracing::warn!(session = %p.id, archive = %manifest.archive, "commit finished incompletely: {why}");
                (rotated, Some(why))
            }
        };
        Ok(CommitDone { committed, rotated, incomplete })
    }

    /// Every chunk present, geometry and length as the agent says; the checksums to
    /// verify against.
    fn check_complete(&self, commit: &Commit) -> Result<(Vec<u32>, u64, [u8; 32]), Refusal> {
        let cs = u64::from(self.params.chunk_size);
        let st = crate::lock(&self.chunks);
        if commit.chunks == 0 {
            return Err(refuse(Reason::VerifyFailed, "commit of an empty archive"));
        }
        if st.count != commit.chunks || st.contiguous != commit.chunks {
            let missing: Vec<u64> = (0..commit.chunks).filter(|s| !st.has(*s)).take(8).collect();
            return Err(refuse(
                Reason::VerifyFailed,
                format!("agent sent {} chunks, server holds {} (first missing: {missing:?})", commit.chunks, st.count),
            ));
        }
        let last_len = match st.short {
            Some((seq, len)) if seq + 1 == commit.chunks => u64::from(len),
            Some((seq, _)) => return Err(refuse(Reason::VerifyFailed, format!("short chunk {seq} is not the last"))),
            None => cs,
        };
        let total = (commit.chunks - 1) * cs + last_len;
        if total != commit.total_len {
            return Err(refuse(
                Reason::VerifyFailed,
                format!("agent says {} bytes, server holds {total}", commit.total_len),
            ));
        }
        let crcs = st.crcs[..commit.chunks as usize].to_vec();
        drop(st);
        self.hash_prefix()?;
        let hs = crate::lock(&self.hash);
        if hs.hashed != commit.chunks {
            return Err(refuse(Reason::Internal, format!("{} of {} chunks hashed", hs.hashed, commit.chunks)));
        }
        let sha: [u8; 32] = hs.hasher.clone().finalize().into();
        Ok((crcs, total, sha))
    }

    /// Reads the durable upload back, every chunk against the CRC32C it arrived with,
    /// on [`VERIFY_THREADS`] threads (each takes every n-th chunk). The first bad chunk
    /// (lowest) is the one reported.
    fn verify_stored(&self, crcs: &[u32], total: u64) -> Result<(), CommitFailure> {
        let cs = u64::from(self.params.chunk_size);
        let scope = self.storage.cfg.base_dir.to_string_lossy().into_owned();
        self.verified.store(0, Ordering::Relaxed);
        let check = |lane: usize| -> Result<(), (u64, CommitFailure)> {
            let mut buf = Buffer::default();
            for seq in (lane..crcs.len()).step_by(VERIFY_THREADS) {
                let offset = seq as u64 * cs;
                let len = cs.min(total - offset) as usize;
                let read =
                    crate::fault::io("commit:verify", &scope).and_then(|()| self.file.read_at(&mut buf, offset, len));
                let bytes = read.map_err(|e| (seq as u64, classify_commit_error(&e, "reading back")))?;
                let got = crc32c::crc32c(bytes);
                if got != crcs[seq] {
                    return Err((seq as u64, CommitFailure::Reject(changed(seq as u64, offset, got, crcs[seq]))));
                }
                self.verified.fetch_add(len as u64, Ordering::Relaxed);
            }
            Ok(())
        };
        let results: Vec<Result<(), (u64, CommitFailure)>> = std::thread::scope(|s| {
            let lanes: Vec<_> = (0..VERIFY_THREADS).map(|lane| s.spawn(move || check(lane))).collect();
            lanes.into_iter().map(|h| h.join().unwrap_or_else(|_| Err((0, panicked())))).collect()
        });
        match results.into_iter().filter_map(Result::err).min_by_key(|(seq, _)| *seq) {
            Some((_, failure)) => Err(failure),
            None => Ok(()),
        }
    }

    /// What follows the rename: directories durable, manifest, rotation, completion
    /// in the journal and the commit log, journal removed. Returns what rotation
    /// removed; on error also the step that failed.
    fn settle(
        &self,
        archive: &std::path::Path,
        manifest: &Manifest,
        committed: &Committed,
    ) -> Result<Vec<String>, (Vec<String>, String)> {
        let p = &self.params;
        let step = |e: io::Error, what: &str| format!("{what}: {e}");
        self.storage.place_catalog(&self.catalog_path(), archive).map_err(|e| (Vec::new(), step(e, "catalog")))?;
        self.storage.settle(archive, manifest).map_err(|e| (Vec::new(), step(e, "writing the manifest")))?;
        let rotated = self
            .storage
            .rotate(&p.key.agent, &p.key.backup, Some(&manifest.archive))
            .map_err(|e| (Vec::new(), step(e, "rotation")))?;
        for name in &rotated {
            tracing::info!(agent = %p.key.agent, backup = %p.key.backup, archive = %name, "rotated out");
        }
        let done = done_record(committed);
        let logged = crate::lock(&self.chunks)
            .journal
            .done(&done)
            .and_then(|()| self.storage.record_committed(&committed_entry(&p.id, &p.key.agent, committed)));
        logged.map_err(|e| (rotated.clone(), step(e, "recording the commit")))?;
        // The outcome is in the committed log now; the journal has served its purpose.
        let _ = fsutil::remove_if_exists(&Journal::path_for(&self.part_path));
        Ok(rotated)
    }

    /// Removes the upload and its journal (a session that ended without a commit).
    pub fn discard(&self) {
        for path in [self.part_path.clone(), Journal::path_for(&self.part_path), self.catalog_path()] {
            if let Err(e) = fsutil::remove_if_exists(&path) {
                tracing::warn!(path = %path.display(), "cannot remove upload: {e}");
            }
        }
    }

    /// Updates the receive rate; about once a second.
    pub fn sample(&self) {
        self.rate.sample(self.bytes_received.load(Ordering::Relaxed));
    }
}

/// Threads reading an upload back at commit: page-cache reads and CRC32C are cheap
/// enough that two saturate what the commit's tail should cost.
const VERIFY_THREADS: usize = 2;

fn changed(seq: u64, offset: u64, got: u32, want: u32) -> Refusal {
    refuse(
        Reason::VerifyFailed,
        format!(
            "chunk {seq} at offset {offset} changed on the server's disk after it was received \
             (crc32c {got:08x}, received {want:08x})"
        ),
    )
}

fn panicked() -> CommitFailure {
    CommitFailure::Reject(refuse(Reason::Internal, "a verification thread panicked"))
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

pub(crate) fn committed_entry(id: &SessionId, agent: &Name, c: &Committed) -> super::storage::CommittedEntry {
    super::storage::CommittedEntry {
        session: id.to_string(),
        agent: agent.to_string(),
        archive: c.archive.clone(),
        size: c.size,
        sha256: hex(&c.sha256),
        at: crate::state::unix_now(),
    }
}

pub(crate) fn done_record(c: &Committed) -> journal::Done {
    journal::Done { archive: c.archive.clone(), size: c.size, sha256: hex(&c.sha256) }
}

/// A refusal for an I/O error: out of space, out of descriptors or memory (passing,
/// so `Internal`, which agents retry), or a write error.
pub(crate) fn io_refusal(e: &io::Error, what: &str) -> Refusal {
    if fsutil::is_disk_full(e) {
        refuse(Reason::DiskFull, format!("{what}: {e}"))
    } else if fsutil::is_resource_shortage(e) {
        refuse(Reason::Internal, format!("{what}: {e} (a passing shortage on the server; retry)"))
    } else {
        refuse(Reason::WriteError, format!("{what}: {e}"))
    }
}

fn classify_commit_error(e: &io::Error, what: &str) -> CommitFailure {
    let refusal = io_refusal(e, what);
    if fsutil::is_resource_shortage(e) { CommitFailure::Retry(refusal) } else { CommitFailure::Reject(refusal) }
}

/// A session of agent `a`, entry `b`, in a fresh storage at `dir` (tests).
#[cfg(test)]
pub(crate) fn test_session(dir: &std::path::Path, chunk_size: u32) -> Session {
    let area = StorageArea::new(nbackup_protocol::config::Storage {
        name: Name::new("main").expect("name"),
        base_dir: dir.to_path_buf(),
        max_backups: 3,
        compression: Compression::Zstd,
        level: 3,
        chunk_fsync: false,
        quota_per_agent: None,
        verify_rate: None,
        verify_schedule: None,
        buckets: Vec::new(),
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
        chunk_size,
        max_streams: 4,
        agent_version: "test".into(),
        started: Utc::now(),
    };
    Session::create(params, Arc::new(area)).expect("create")
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use nbackup_protocol::wire::SourceStats;

    fn session(dir: &std::path::Path, cs: u32) -> Session {
        test_session(dir, cs)
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
            catalog: None,
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
        assert_eq!(s.contiguous(), 5);
        let done = s.commit(&commit_for(data, 5)).expect("commit");
        assert_eq!(done.incomplete, None);
        let dir = s.storage.entry_dir(&s.params.key.agent, &s.params.key.backup);
        assert_eq!(std::fs::read(dir.join(&done.committed.archive)).expect("archive"), data);
        let m = Manifest::from_json(
            &std::fs::read_to_string(dir.join(format!("{}.json", done.committed.archive))).expect("m"),
        )
        .expect("manifest");
        assert_eq!(m.commit_seq, Some(1));
        assert_eq!(s.verified.load(Ordering::Relaxed), data.len() as u64);
    }

    #[test]
    fn chunks_hashed_by_racing_threads_in_any_order_hash_the_archive_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cs = 64 * 1024;
        let s = session(dir.path(), cs as u32);
        let data: Vec<u8> = (0..cs * 40 + 123).map(|i| (i * 7 % 251) as u8).collect();
        let chunks = chunks_of(&data, cs);
        // Four "streams", each writing every fourth chunk, each hashing after every
        // write, as the disk loops do.
        std::thread::scope(|scope| {
            for lane in 0..4 {
                let (s, chunks) = (&s, &chunks);
                scope.spawn(move || {
                    for c in chunks.iter().skip(lane).step_by(4).rev() {
                        s.write_chunk(c).expect("write");
                        s.hash_forward().expect("hash");
                    }
                });
            }
        });
        let hs = crate::lock(&s.hash);
        assert_eq!(hs.hashed, chunks.len() as u64, "the last hasher went as far as the prefix reached");
        assert_eq!(<[u8; 32]>::from(hs.hasher.clone().finalize()), <[u8; 32]>::from(Sha256::digest(&data)));
        drop(hs);
        assert_eq!(crate::lock(&s.early).bytes, 0, "nothing left held");
        s.commit(&commit_for(&data, chunks.len() as u64)).expect("commit");
    }

    #[test]
    fn held_chunks_are_bounded_and_only_taken_with_their_recorded_crc() {
        let chunk = |seq: u64, len: usize| Chunk::new(seq, 0, Bytes::from(vec![seq as u8; len]));
        let mut early = Early::default();
        let big = EARLY_MAX / 2;
        early.keep(&chunk(3, big));
        early.keep(&chunk(5, big));
        early.keep(&chunk(6, 1));
        assert_eq!(early.bytes, EARLY_MAX, "the third is past the bound: read back when its turn comes");
        assert_eq!(early.take(6, chunk(6, 1).crc32c), None);
        assert_eq!(early.bytes, 0, "taking 6 dropped the older ones");
        early.keep(&chunk(7, 10));
        assert_eq!(early.take(7, 0xdead), None, "a different CRC32C is recorded for 7: not these bytes");
        early.keep(&chunk(8, 10));
        assert_eq!(early.take(8, chunk(8, 10).crc32c), Some(Bytes::from(vec![8u8; 10])));
        assert_eq!((early.chunks.len(), early.bytes), (0, 0));
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
        assert_eq!(r.refusal().reason, Reason::VerifyFailed);
        assert!(r.refusal().message.contains("first missing: [1]"), "{r:?}");

        let s = session(&dir.path().join("x"), 4);
        for c in &chunks {
            s.write_chunk(c).expect("write");
        }
        let mut bad = commit_for(data, 3);
        bad.sha256[0] ^= 1;
        let r = s.commit(&bad).expect_err("bad hash");
        assert!(matches!(&r, CommitFailure::Reject(r) if r.message.contains("sha256 mismatch")), "{r:?}");
    }

    #[test]
    fn a_byte_changed_on_disk_after_receipt_fails_the_commit_naming_its_chunk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = session(dir.path(), 4);
        let data = b"0123456789ab";
        for c in &chunks_of(data, 4) {
            s.write_chunk(c).expect("write");
        }
        // Something else on the server writes into the upload file.
        std::fs::OpenOptions::new().write(true).open(&s.part_path).expect("open").write_all_at(b"X", 5).expect("poke");
        let r = s.commit(&commit_for(data, 3)).expect_err("corrupt");
        let CommitFailure::Reject(r) = r else { panic!("must reject: {r:?}") };
        assert_eq!(r.reason, Reason::VerifyFailed);
        assert!(r.message.contains("chunk 1 at offset 4"), "{}", r.message);
        let entry = s.storage.entry_dir(&s.params.key.agent, &s.params.key.backup);
        assert!(!entry.exists() || std::fs::read_dir(&entry).expect("ls").count() == 0, "nothing renamed");
    }
}
