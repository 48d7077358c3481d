//! What travels on a `RSTR` connection, and the catalog recorded beside each archive.
//!
//! A restore connection carries one request and its answer. The request and the
//! answers' headers are JSON documents in `RestoreRequest` / `RestoreReply` frames
//! (see [`crate::wire`]); archive bytes come back as ordinary `Chunk` frames — each
//! with its absolute offset and CRC32C — so a client cut off mid-transfer asks again
//! from the first byte it lacks. The agent is always the one its certificate names:
//! `agent` in a request must be that identity, and only its own archives are listed
//! or served.
//!
//! The **catalog** (`<archive>.catalog`, zstd-compressed JSON lines of
//! [`CatalogEntry`]) is written by the agent while it archives and committed with the
//! archive, so listing an archive's contents, or planning a selective restore, never
//! reads the archive itself.

use serde::{Deserialize, Serialize};

use crate::Name;
use crate::wire::Compression;

/// Client → server, the only request of a `RSTR` connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum RestoreRequest {
    /// This agent's archives in `storage`, of one backup or all, oldest first.
    List { agent: Name, storage: Name, backup: Option<Name> },
    /// Stream one archive (or its catalog) from byte `offset` to `end` (exclusive;
    /// the end of the file when absent).
    Fetch {
        agent: Name,
        storage: Name,
        backup: Name,
        archive: String,
        part: Part,
        offset: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        end: Option<u64>,
    },
    /// Re-read one stored archive against its manifest now; a corrupt one is
    /// quarantined as `verify` does.
    Verify { agent: Name, storage: Name, backup: Name, archive: String },
}

impl RestoreRequest {
    pub fn agent(&self) -> &Name {
        match self {
            RestoreRequest::List { agent, .. }
            | RestoreRequest::Fetch { agent, .. }
            | RestoreRequest::Verify { agent, .. } => agent,
        }
    }

    pub fn storage(&self) -> &Name {
        match self {
            RestoreRequest::List { storage, .. }
            | RestoreRequest::Fetch { storage, .. }
            | RestoreRequest::Verify { storage, .. } => storage,
        }
    }
}

/// Which file of an archive a `Fetch` wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    Archive,
    Catalog,
}

/// Server → client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum RestoreReply {
    /// A page of the listing; `more` says another page follows.
    Archives { archives: Vec<RemoteArchive>, more: bool },
    /// The file is `size` bytes (SHA-256 `sha256` for an archive); `Chunk` frames
    /// from the requested offset to the requested end (or `size`) follow, in order,
    /// then the server closes.
    Fetching { size: u64, sha256: Option<String> },
    /// The answer to `Verify`.
    Verified { archive: String, verdict: Verdict, detail: String, quarantined: bool },
}

/// What a verification found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Matches its manifest, decompresses to the end, every member read.
    Good,
    /// Differs from its manifest or does not decompress (quarantined).
    Corrupt,
    /// Could not be checked (no manifest, unreadable).
    Unverified,
}

/// One archive as the restore side sees it: enough to choose it and check it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteArchive {
    pub backup: Name,
    pub archive: String,
    pub size: u64,
    pub compression: Compression,
    /// SHA-256 from the manifest; `None` for an archive without a readable one.
    pub sha256: Option<String>,
    /// Tar members, from the manifest.
    pub entries: Option<u64>,
    pub bytes_read: Option<u64>,
    /// RFC 3339 UTC, from the manifest.
    pub finished_at: Option<String>,
    pub commit_seq: Option<u64>,
    /// Size of the catalog beside it, if it has one.
    pub catalog: Option<u64>,
    /// The off-site bucket it is read from when it is no longer on the server's disk
    /// (offloaded, rotated out of the disk but kept by an archive bucket, or lost);
    /// absent for an archive on disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
}

impl RemoteArchive {
    /// One archive of `backup` as its manifest (if it has a readable one) describes
    /// it; the catalog's size and the bucket are the caller's to add.
    pub fn described(
        backup: Name,
        archive: String,
        size: u64,
        compression: Compression,
        manifest: Option<&crate::manifest::Manifest>,
    ) -> Self {
        RemoteArchive {
            backup,
            archive,
            size,
            compression,
            sha256: manifest.map(|m| m.sha256.clone()),
            entries: manifest.map(|m| m.entries),
            bytes_read: manifest.map(|m| m.bytes_read),
            finished_at: manifest.map(|m| m.finished_at.clone()),
            commit_seq: manifest.and_then(|m| m.commit_seq),
            catalog: None,
            bucket: None,
        }
    }
}

/// Archives per `Archives` page: each is under 600 bytes of JSON, so a page stays
/// well inside one control frame.
pub const LIST_PAGE: usize = 64;

/// Where an archive can be entered without decompressing what comes before: block
/// `i` holds uncompressed (tar) bytes `[i × block, (i + 1) × block)` and starts at
/// compressed offset `offsets[i]` — a gzip member or a zstd frame that decodes alone.
/// The last line of a catalog (`{"blocks": …}`) when the agent recorded one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockIndex {
    pub block: u64,
    pub offsets: Vec<u64>,
}

/// A compressed byte range to fetch, and the tar bytes wanted from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Compressed bytes `[start, end)` of the archive: whole blocks.
    pub start: u64,
    pub end: u64,
    /// Offset in the tar stream of the first byte `start` decompresses to.
    pub tar_offset: u64,
    /// The tar bytes `[from, to)` wanted (`to` is `u64::MAX` for "to the end").
    pub from: u64,
    pub to: u64,
}

impl BlockIndex {
    /// The blocks holding tar bytes `[from, to)` (`to == u64::MAX`: to the end);
    /// `archive_len` ends the last block. `None` outside the index.
    pub fn extent(&self, from: u64, to: u64, archive_len: u64) -> Option<Extent> {
        if self.block == 0 || from >= to {
            return None;
        }
        let first = usize::try_from(from / self.block).ok()?;
        let start = *self.offsets.get(first)?;
        let end = match to {
            u64::MAX => archive_len,
            to => {
                let last = usize::try_from((to - 1) / self.block).ok()?;
                self.offsets.get(last + 1).copied().unwrap_or(archive_len)
            }
        };
        (start < end && end <= archive_len).then_some(Extent {
            start,
            end,
            tar_offset: first as u64 * self.block,
            from,
            to,
        })
    }

    /// The fewest extents covering tar ranges `ranges` (sorted by start): ranges
    /// whose blocks are within `gap` compressed bytes of each other are read as one,
    /// as reading through is cheaper than another request.
    pub fn extents(&self, ranges: &[(u64, u64)], archive_len: u64, gap: u64) -> Option<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        for &(from, to) in ranges {
            let next = self.extent(from, to, archive_len)?;
            match out.last_mut() {
                Some(prev) if next.start <= prev.end.saturating_add(gap) && next.from >= prev.from => {
                    prev.end = prev.end.max(next.end);
                    prev.to = prev.to.max(next.to);
                }
                _ => out.push(next),
            }
        }
        Some(out)
    }
}

/// One line of a catalog file, as written and read.
pub enum CatalogLine {
    Entry(CatalogEntry),
    Blocks(BlockIndex),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlocksLine {
    blocks: BlockIndex,
}

/// The same line for writing, without copying the offsets.
#[derive(Serialize)]
struct BlocksLineRef<'a> {
    blocks: &'a BlockIndex,
}

impl CatalogLine {
    pub fn parse(line: &str) -> Result<Self, serde_json::Error> {
        if line.starts_with("{\"blocks\"") {
            serde_json::from_str::<BlocksLine>(line).map(|l| CatalogLine::Blocks(l.blocks))
        } else {
            serde_json::from_str(line).map(CatalogLine::Entry)
        }
    }

    pub fn blocks_line(blocks: &BlockIndex) -> String {
        serde_json::to_string(&BlocksLineRef { blocks }).expect("serializable")
    }
}

/// One line of a catalog: a tar member as the agent wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// Member name (the source path without its leading `/`); non-UTF-8 bytes are
    /// replaced, and `lossy` says so (match such members against the archive itself).
    pub path: String,
    #[serde(rename = "type")]
    pub kind: EntryKind,
    pub size: u64,
    pub mtime: i64,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Symlink target, or the member a hard link points at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Offset of the member's first header block in the uncompressed tar stream.
    pub offset: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lossy: bool,
}

/// Kinds of tar members nbackup writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    HardLink,
    Fifo,
    CharDevice,
    BlockDevice,
    Other,
}

impl EntryKind {
    /// The `ls -l` type letter.
    pub fn letter(self) -> char {
        match self {
            EntryKind::File => '-',
            EntryKind::Dir => 'd',
            EntryKind::Symlink => 'l',
            EntryKind::HardLink => 'h',
            EntryKind::Fifo => 'p',
            EntryKind::CharDevice => 'c',
            EntryKind::BlockDevice => 'b',
            EntryKind::Other => '?',
        }
    }
}

/// Which archive `--at` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum At {
    Latest,
    /// An archive file name.
    Name(String),
    /// The newest archive finished at or before this instant.
    Time(chrono::DateTime<chrono::Utc>),
}

impl At {
    /// `latest`, an archive name (`….tar.gz` / `….tar.zst`), an RFC 3339 time, or a
    /// local `YYYY-MM-DD[ HH:MM[:SS]]` (a date alone means the end of that day).
    pub fn parse(s: &str) -> Result<At, String> {
        use chrono::{Local, NaiveDate, NaiveDateTime, TimeZone};
        let s = s.trim();
        if s.eq_ignore_ascii_case("latest") {
            return Ok(At::Latest);
        }
        if s.ends_with(".tar.gz") || s.ends_with(".tar.zst") {
            return Ok(At::Name(s.to_owned()));
        }
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
            return Ok(At::Time(t.with_timezone(&chrono::Utc)));
        }
        let local = |naive: NaiveDateTime| {
            Local
                .from_local_datetime(&naive)
                .earliest()
                .map(|t| At::Time(t.with_timezone(&chrono::Utc)))
                .ok_or_else(|| format!("{s:?} does not exist in the local time zone"))
        };
        for format in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"] {
            if let Ok(naive) = NaiveDateTime::parse_from_str(s, format) {
                return local(naive);
            }
        }
        if let Ok(day) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
            return local(day.and_hms_opt(23, 59, 59).expect("a valid time"));
        }
        Err(format!("{s:?} is not `latest`, an archive name, or a time (2026-12-01, \"2026-12-01 14:30\", RFC 3339)"))
    }

    /// The archive this names among `archives` (one entry's, oldest first).
    pub fn choose<'a>(&self, archives: &'a [RemoteArchive]) -> Option<&'a RemoteArchive> {
        match self {
            At::Latest => archives.last(),
            At::Name(name) => archives.iter().find(|a| a.archive == *name),
            At::Time(t) => archives.iter().rev().find(|a| {
                a.finished_at
                    .as_deref()
                    .and_then(|f| chrono::DateTime::parse_from_rfc3339(f).ok())
                    .is_some_and(|f| f <= *t)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(name: &str, finished: &str) -> RemoteArchive {
        RemoteArchive {
            backup: Name::new("etc").expect("name"),
            archive: name.into(),
            size: 1,
            compression: Compression::Zstd,
            sha256: None,
            entries: None,
            bytes_read: None,
            finished_at: Some(finished.into()),
            commit_seq: None,
            catalog: None,
            bucket: None,
        }
    }

    #[test]
    fn at_chooses_latest_by_name_or_by_time() {
        let list = [
            archive("a-1.tar.zst", "2026-11-29T02:00:00Z"),
            archive("a-2.tar.zst", "2026-11-30T02:00:00Z"),
            archive("a-3.tar.zst", "2026-12-01T02:00:00Z"),
        ];
        assert_eq!(At::parse("latest").expect("parses").choose(&list).map(|a| a.archive.as_str()), Some("a-3.tar.zst"));
        let by_name = At::parse("a-1.tar.zst").expect("parses");
        assert_eq!(by_name.choose(&list).map(|a| a.archive.as_str()), Some("a-1.tar.zst"));
        let by_time = At::parse("2026-11-30T12:00:00Z").expect("parses");
        assert_eq!(by_time.choose(&list).map(|a| a.archive.as_str()), Some("a-2.tar.zst"));
        assert_eq!(At::parse("2026-11-01T00:00:00Z").expect("parses").choose(&list), None, "nothing that old");
        assert!(matches!(At::parse("2026-11-30").expect("a day"), At::Time(_)));
        assert!(At::parse("yesterday-ish").is_err());
    }

    #[test]
    fn requests_and_replies_have_a_stable_json_shape() {
        let req = RestoreRequest::Fetch {
            agent: Name::new("web-01").expect("name"),
            storage: Name::new("main").expect("name"),
            backup: Name::new("etc").expect("name"),
            archive: "web-01-etc-20261201T000000Z.tar.zst".into(),
            part: Part::Archive,
            offset: 1024,
            end: None,
        };
        let json = serde_json::to_string(&req).expect("json");
        assert_eq!(
            json,
            r#"{"op":"fetch","agent":"web-01","storage":"main","backup":"etc","archive":"web-01-etc-20261201T000000Z.tar.zst","part":"archive","offset":1024}"#
        );
        assert_eq!(serde_json::from_str::<RestoreRequest>(&json).expect("back"), req);
        let ranged = json.replace(r#""offset":1024"#, r#""offset":1024,"end":4096"#);
        match serde_json::from_str::<RestoreRequest>(&ranged).expect("a range") {
            RestoreRequest::Fetch { offset: 1024, end: Some(4096), .. } => {}
            other => panic!("{other:?}"),
        }
        let bad = r#"{"op":"list","agent":"../x","storage":"main","backup":null}"#;
        assert!(serde_json::from_str::<RestoreRequest>(bad).is_err(), "names are validated");
        let reply = RestoreReply::Fetching { size: 7, sha256: None };
        assert_eq!(serde_json::to_string(&reply).expect("json"), r#"{"reply":"fetching","size":7,"sha256":null}"#);
    }

    #[test]
    fn extents_cover_whole_blocks_and_merge_when_close() {
        // Four blocks of 100 tar bytes at compressed offsets 0, 40, 90, 130; 170 bytes in all.
        let ix = BlockIndex { block: 100, offsets: vec![0, 40, 90, 130] };
        let x = ix.extent(150, 160, 170).expect("inside");
        assert_eq!((x.start, x.end, x.tar_offset, x.from, x.to), (40, 90, 100, 150, 160));
        // A member ending exactly on a block boundary does not pull in the next block.
        assert_eq!(ix.extent(100, 200, 170).map(|x| (x.start, x.end)), Some((40, 90)));
        // Spanning blocks, and "to the end".
        assert_eq!(ix.extent(50, 250, 170).map(|x| (x.start, x.end)), Some((0, 130)));
        assert_eq!(ix.extent(310, u64::MAX, 170).map(|x| (x.start, x.end, x.tar_offset)), Some((130, 170, 300)));
        assert_eq!(ix.extent(400, 410, 170), None, "past the index");
        assert_eq!(ix.extent(10, 10, 170), None, "empty");
        // Blocks 0 and 3 are 90 compressed bytes apart: separate with a small gap, one read with a big one.
        let ranges = [(10, 20), (310, 320)];
        assert_eq!(ix.extents(&ranges, 170, 10).expect("extents").len(), 2);
        let one = ix.extents(&ranges, 170, 90).expect("extents");
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].start, one[0].end, one[0].from, one[0].to), (0, 170, 10, 320));
        // An index whose offsets lie past the archive is not trusted.
        assert_eq!(ix.extent(310, 320, 100), None);
    }

    #[test]
    fn catalog_lines_tell_entries_from_the_block_index() {
        let ix = BlockIndex { block: 1 << 20, offsets: vec![0, 51_234] };
        let line = CatalogLine::blocks_line(&ix);
        assert_eq!(line, r#"{"blocks":{"block":1048576,"offsets":[0,51234]}}"#);
        assert!(matches!(CatalogLine::parse(&line), Ok(CatalogLine::Blocks(b)) if b == ix));
        let entry = r#"{"path":"etc/hosts","type":"file","size":1,"mtime":0,"mode":420,"uid":0,"gid":0,"offset":0}"#;
        assert!(matches!(CatalogLine::parse(entry), Ok(CatalogLine::Entry(e)) if e.path == "etc/hosts"));
        assert!(CatalogLine::parse(r#"{"blocks":{"block":1}}"#).is_err(), "offsets are required");
    }

    #[test]
    fn catalog_lines_are_compact() {
        let e = CatalogEntry {
            path: "etc/hosts".into(),
            kind: EntryKind::File,
            size: 12,
            mtime: 1,
            mode: 0o644,
            uid: 0,
            gid: 0,
            link: None,
            offset: 512,
            lossy: false,
        };
        assert_eq!(
            serde_json::to_string(&e).expect("json"),
            r#"{"path":"etc/hosts","type":"file","size":12,"mtime":1,"mode":420,"uid":0,"gid":0,"offset":512}"#
        );
    }
}
