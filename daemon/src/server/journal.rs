//! The session journal, `<base_dir>/.incoming/<session>.journal`, beside the `.part`.
//!
//! It lets a restarted server take over uploads in flight and finish or undo commits
//! that a crash interrupted. One record per line, appended, never rewritten:
//!
//! ```text
//! open {"session":"…","agent":"…","storage":"…","backup":"…",…}   parameters
//! chunk <seq> <len> <crc32c hex>                                  written before its ack
//! commit {"archive":"…","manifest":{…}}                           intent, fsynced before the rename
//! committed {"archive":"…","size":…,"sha256":"…"}                 done, fsynced
//! ```
//!
//! A crash can tear the last line; a line without its newline is ignored, and cut off
//! when the journal is reopened, so the next record starts on a line of its own. Chunk
//! records carry the chunk's CRC32C, so adoption re-reads each chunk from the `.part`
//! and keeps only those that check out — after a power cut without `chunk_fsync`, a
//! record may be on disk while its data is not, or the reverse.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nbackup_protocol::manifest::Manifest;
use nbackup_protocol::wire::Compression;

/// Session parameters, the journal's first record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Header {
    pub session: String,
    pub agent: String,
    pub storage: String,
    pub backup: String,
    pub compression: Compression,
    pub level: i32,
    pub chunk_size: u32,
    pub max_streams: u16,
    pub agent_version: String,
    /// RFC 3339.
    pub started: String,
}

/// What a commit is about to do: written (and fsynced) before the rename.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Intent {
    pub archive: String,
    pub manifest: Manifest,
}

/// A finished commit, as answered to the agent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Done {
    pub archive: String,
    pub size: u64,
    pub sha256: String,
}

/// One chunk record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRecord {
    pub seq: u64,
    pub len: u32,
    pub crc32c: u32,
}

/// Everything a journal file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    pub header: Header,
    pub chunks: Vec<ChunkRecord>,
    pub intent: Option<Intent>,
    pub done: Option<Done>,
}

/// An open journal, appended to by one session.
#[derive(Debug)]
pub struct Journal {
    file: File,
}

fn bad(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}: {what}", path.display()))
}

impl Journal {
    pub fn path_for(part: &Path) -> PathBuf {
        part.with_extension("journal")
    }

    /// Creates the journal with its header, durably.
    pub fn create(path: &Path, header: &Header) -> io::Result<Journal> {
        let file = OpenOptions::new().append(true).create_new(true).mode(0o600).open(path)?;
        let mut j = Journal { file };
        j.append(&format!("open {}\n", serde_json::to_string(header).map_err(io::Error::other)?))?;
        j.file.sync_data()?;
        Ok(j)
    }

    /// Opens an existing journal to continue appending (after adoption or an
    /// interrupted commit). A torn last record — what a power cut mid-append leaves —
    /// is truncated first: appended to, it would swallow the next record.
    pub fn reopen(path: &Path) -> io::Result<Journal> {
        let text = std::fs::read(path)?;
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let file = OpenOptions::new().append(true).open(path)?;
        if whole < text.len() {
            file.set_len(whole as u64)?;
            file.sync_data()?;
        }
        Ok(Journal { file })
    }

    fn append(&mut self, line: &str) -> io::Result<()> {
        // One write per record: O_APPEND keeps records whole unless the machine dies.
        self.file.write_all(line.as_bytes())
    }

    pub fn chunk(&mut self, r: ChunkRecord) -> io::Result<()> {
        self.append(&format!("chunk {} {} {:08x}\n", r.seq, r.len, r.crc32c))
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn intent(&mut self, intent: &Intent) -> io::Result<()> {
        self.append(&format!("commit {}\n", serde_json::to_string(intent).map_err(io::Error::other)?))?;
        self.file.sync_data()
    }

    pub fn done(&mut self, done: &Done) -> io::Result<()> {
        self.append(&format!("committed {}\n", serde_json::to_string(done).map_err(io::Error::other)?))?;
        self.file.sync_data()
    }

    /// Parses a journal file.
    pub fn read(path: &Path) -> io::Result<Contents> {
        let text = std::fs::read_to_string(path)?;
        // Only complete lines count; a torn tail is what a crash mid-append leaves.
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        let mut lines = complete.lines();
        let header = lines
            .next()
            .and_then(|l| l.strip_prefix("open "))
            .ok_or_else(|| bad(path, "no header"))
            .and_then(|h| serde_json::from_str::<Header>(h).map_err(|e| bad(path, e)))?;
        let mut contents = Contents { header, chunks: Vec::new(), intent: None, done: None };
        for line in lines {
            let (tag, rest) = line.split_once(' ').ok_or_else(|| bad(path, format!("bad record {line:?}")))?;
            match tag {
                "chunk" => {
                    let mut f = rest.split(' ');
                    let rec = (|| {
                        Some(ChunkRecord {
                            seq: f.next()?.parse().ok()?,
                            len: f.next()?.parse().ok()?,
                            crc32c: u32::from_str_radix(f.next()?, 16).ok()?,
                        })
                    })()
                    .ok_or_else(|| bad(path, format!("bad chunk record {line:?}")))?;
                    contents.chunks.push(rec);
                }
                "commit" => contents.intent = Some(serde_json::from_str(rest).map_err(|e| bad(path, e))?),
                "committed" => contents.done = Some(serde_json::from_str(rest).map_err(|e| bad(path, e))?),
                other => return Err(bad(path, format!("unknown record {other:?}"))),
            }
        }
        Ok(contents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbackup_protocol::manifest::MANIFEST_FORMAT;

    fn header() -> Header {
        Header {
            session: "00".repeat(16),
            agent: "a".into(),
            storage: "s".into(),
            backup: "b".into(),
            compression: Compression::Gzip,
            level: 6,
            chunk_size: 65536,
            max_streams: 2,
            agent_version: "v".into(),
            started: "2026-11-22T00:00:00Z".into(),
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.journal");
        let mut j = Journal::create(&path, &header()).expect("create");
        j.chunk(ChunkRecord { seq: 0, len: 65536, crc32c: 0xdead_beef }).expect("chunk");
        j.chunk(ChunkRecord { seq: 2, len: 10, crc32c: 1 }).expect("chunk");
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            archive: "n".into(),
            agent: "a".into(),
            backup: "b".into(),
            storage: "s".into(),
            compression: Compression::Gzip,
            compression_level: 6,
            size: 1,
            sha256: "ab".into(),
            chunks: 1,
            chunk_size: 65536,
            entries: 0,
            bytes_read: 0,
            skipped: 0,
            started_at: String::new(),
            finished_at: String::new(),
            agent_version: String::new(),
            server_version: String::new(),
            session: String::new(),
            commit_seq: None,
        };
        j.intent(&Intent { archive: "n".into(), manifest }).expect("intent");
        // A crash in the middle of the next append.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open")
            .write_all(b"committed {\"arch")
            .expect("torn");
        let c = Journal::read(&path).expect("read");
        assert_eq!(c.header, header());
        assert_eq!(c.chunks.len(), 2);
        assert_eq!(c.chunks[0].crc32c, 0xdead_beef);
        assert_eq!(c.intent.as_ref().map(|i| i.archive.as_str()), Some("n"));
        assert!(c.done.is_none(), "the torn record does not count");
    }

    #[test]
    fn reopening_cuts_a_torn_record_and_keeps_every_whole_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.journal");
        let mut j = Journal::create(&path, &header()).expect("create");
        for seq in 0..3 {
            j.chunk(ChunkRecord { seq, len: 65536, crc32c: seq as u32 }).expect("chunk");
        }
        drop(j);
        // Power lost in the middle of the fourth record.
        std::fs::OpenOptions::new().append(true).open(&path).expect("open").write_all(b"chunk 3 655").expect("torn");
        let mut j = Journal::reopen(&path).expect("reopen");
        j.chunk(ChunkRecord { seq: 3, len: 65536, crc32c: 3 }).expect("chunk");
        drop(j);
        let c = Journal::read(&path).expect("read");
        let seqs: Vec<u64> = c.chunks.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [0, 1, 2, 3], "every complete record, and the new one readable");
        assert!(std::fs::read_to_string(&path).expect("text").ends_with("chunk 3 65536 00000003\n"));
    }

    #[test]
    fn rejects_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g.journal");
        std::fs::write(&path, "hello\n").expect("write");
        assert!(Journal::read(&path).is_err());
    }
}
