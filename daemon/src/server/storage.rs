//! On-disk layout of a storage, commit and rotation.
//!
//! ```text
//! <base_dir>/<agent>/<backup>/<agent>-<backup>-<yyyymmddThhmmssZ>[-n].tar.gz   archive
//! <base_dir>/<agent>/<backup>/<archive>.json                                   manifest
//! <base_dir>/.incoming/<session>.part                                          upload
//! <base_dir>/.incoming/<archive>.rotated                          rotated out, being freed
//! ```
//!
//! Crash ordering of a commit: fsync the `.part` → read it back and verify it →
//! record the intent in the session journal → rename it to its final name (never
//! replacing an existing file) → fsync both directories → write the manifest
//! atomically → rotate → record completion. A crash leaves either the old set of
//! archives or the new one; an archive name only ever points at verified, durable
//! bytes. Rotation takes an archive out (a rename to `.incoming/<archive>.rotated`,
//! unlinked once the commit is answered) before its manifest, so an interrupted
//! rotation leaves at worst an orphan manifest, never an archive whose checksum
//! record is gone. An archive renamed into place but not yet given its manifest
//! (a commit in progress) is never rotated, whichever task rotates.
//!
//! **Order is not time.** Names carry the session's start time for people, but
//! "newest" means highest `commit_seq` in the manifest, one past the entry's highest
//! at each commit. Archives without a sequence (written before it existed, or whose
//! manifest is gone) count as older than every numbered one, among themselves in name
//! order. A clock stepped back, or archives stamped in the future, cannot make
//! rotation delete what was just committed.
//!
//! **Never overwrite.** The final rename is `renameat2(RENAME_NOREPLACE)`. Filesystems
//! without it (NFS, CIFS, some FUSE) are found by a probe at start and use
//! `link` + `unlink` instead, which fails just as surely when the name exists.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use nbackup_protocol::config::Storage;
use nbackup_protocol::manifest::Manifest;
use nbackup_protocol::wire::Compression;
use nbackup_protocol::{Name, SessionId};

use super::offsite::state::{self as offsite_state, Copies, Copy};
use crate::fsutil;

/// Name of the directory holding uploads in flight, inside `base_dir`.
pub const INCOMING: &str = ".incoming";

/// Recent commits, so that an agent whose connection died before it saw `Committed`
/// learns the outcome from `Status` — even after a server restart.
pub const COMMITTED_LOG: &str = "committed.log";
/// Suffix, in `.incoming`, of an archive rotated out and not yet unlinked.
pub const ROTATED: &str = ".rotated";

/// One line of [`COMMITTED_LOG`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommittedEntry {
    pub session: String,
    pub agent: String,
    pub archive: String,
    pub size: u64,
    pub sha256: String,
    /// Unix seconds.
    pub at: u64,
}

/// One storage's directory tree.
#[derive(Debug)]
pub struct StorageArea {
    pub cfg: Storage,
    /// How the final rename avoids replacing a file, probed by [`StorageArea::prepare`].
    rename: Mutex<fsutil::NoReplace>,
    /// Serialises appends to the committed log and its compaction: a compaction
    /// rewriting the file must not lose a line appended meanwhile.
    commit_log: Mutex<()>,
    /// Serialises read-modify-writes of the off-site sidecars.
    copies: Mutex<()>,
    /// Archives placed under their final name whose manifest is not written yet.
    /// Rotation runs from other tasks too (after an off-site copy): without its
    /// manifest such an archive would sort oldest and owe no bucket, so it must
    /// never be taken for an old one. A commit that fails in between stays here
    /// (kept) until the next start's recovery finishes it.
    settling: Mutex<std::collections::HashSet<PathBuf>>,
}

/// A committed archive found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveFile {
    pub name: String,
    pub path: PathBuf,
    /// `yyyymmddThhmmssZ` from the name.
    pub stamp: String,
    /// Collision suffix (`-2`, `-3`, …); 1 when absent.
    pub n: u32,
    pub size: u64,
    pub compression: Compression,
    /// The manifest, if it is there and readable.
    pub manifest: Option<Manifest>,
}

impl ArchiveFile {
    /// Position in the entry's commit order, from the manifest.
    pub fn seq(&self) -> Option<u64> {
        self.manifest.as_ref().and_then(|m| m.commit_seq)
    }

    /// Sort key of commit order (see the module docs).
    fn order(&self) -> (bool, u64, &str, u32) {
        (self.seq().is_some(), self.seq().unwrap_or(0), &self.stamp, self.n)
    }
}

impl StorageArea {
    pub fn new(cfg: Storage) -> Self {
        StorageArea {
            cfg,
            rename: Mutex::new(fsutil::NoReplace::Rename),
            commit_log: Mutex::new(()),
            copies: Mutex::new(()),
            settling: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// How this storage renames without replacing (after [`StorageArea::prepare`]).
    pub fn rename_mode(&self) -> fsutil::NoReplace {
        *crate::lock(&self.rename)
    }

    pub fn incoming_dir(&self) -> PathBuf {
        self.cfg.base_dir.join(INCOMING)
    }

    pub fn part_path(&self, session: SessionId) -> PathBuf {
        self.incoming_dir().join(format!("{session}.part"))
    }

    pub fn entry_dir(&self, agent: &Name, backup: &Name) -> PathBuf {
        self.cfg.base_dir.join(agent.as_str()).join(backup.as_str())
    }

    /// Creates `base_dir` and `.incoming` (mode 0700: uploads are nobody else's
    /// business) and probes how to rename without replacing.
    pub fn prepare(&self) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        fsutil::create_dir_all_durable(&self.incoming_dir())?;
        fs::set_permissions(self.incoming_dir(), fs::Permissions::from_mode(0o700))?;
        let mode = fsutil::probe_noreplace(&self.incoming_dir())?;
        if mode != fsutil::NoReplace::Rename {
            tracing::warn!(
                storage = %self.cfg.name, base_dir = %self.cfg.base_dir.display(),
                "this filesystem has no RENAME_NOREPLACE; committing with link + unlink instead"
            );
        }
        *crate::lock(&self.rename) = mode;
        Ok(())
    }

    pub fn disk_space(&self) -> io::Result<(u64, u64)> {
        fsutil::disk_space(&self.cfg.base_dir)
    }

    /// Archives of one entry, oldest first.
    pub fn list(&self, agent: &Name, backup: &Name) -> io::Result<Vec<ArchiveFile>> {
        let dir = self.entry_dir(agent, backup);
        let prefix = format!("{agent}-{backup}-");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            let Some((stamp, n, compression)) = parse_archive_name(&name, &prefix) else { continue };
            // Offload and rotation remove archives while a commit names its own:
            // one gone between the directory read and its stat is simply not listed.
            let meta = match entry.metadata() {
                Ok(m) if m.is_file() => m,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let path = entry.path();
            let manifest = fs::read_to_string(sidecar_path(&path)).ok().and_then(|t| Manifest::from_json(&t).ok());
            out.push(ArchiveFile { path, name, stamp, n, size: meta.len(), compression, manifest });
        }
        out.sort_by(|a, b| a.order().cmp(&b.order()));
        Ok(out)
    }

    /// (archives, bytes) over every entry, from names and sizes only.
    pub fn usage(&self) -> io::Result<(u64, u64)> {
        let (mut count, mut bytes) = (0, 0);
        for (agent, backup) in self.entries()? {
            let prefix = format!("{agent}-{backup}-");
            let Ok(files) = fs::read_dir(self.entry_dir(&agent, &backup)) else { continue };
            for f in files.flatten() {
                let name = f.file_name();
                let Some(name) = name.to_str() else { continue };
                if parse_archive_name(name, &prefix).is_some()
                    && let Ok(meta) = f.metadata()
                    && meta.is_file()
                {
                    count += 1;
                    bytes += meta.len();
                }
            }
        }
        Ok((count, bytes))
    }

    /// `(agent, backup)` directories of this storage, sorted.
    pub fn entries(&self) -> io::Result<Vec<(Name, Name)>> {
        let mut out = Vec::new();
        for a in fs::read_dir(&self.cfg.base_dir)?.flatten() {
            let Some(agent) = a.file_name().to_str().and_then(|n| Name::new(n).ok()) else { continue };
            let Ok(backups) = fs::read_dir(a.path()) else { continue };
            for b in backups.flatten() {
                if let Some(backup) = b.file_name().to_str().and_then(|n| Name::new(n).ok()) {
                    out.push((agent.clone(), backup));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The commit sequence the next archive of an entry gets.
    pub fn next_commit_seq(&self, agent: &Name, backup: &Name) -> io::Result<u64> {
        Ok(self.next_archive(agent, backup, Utc::now(), self.cfg.compression)?.1)
    }

    /// Bytes of archives `agent` keeps in this storage, over all its entries.
    pub fn agent_usage(&self, agent: &Name) -> io::Result<u64> {
        let dir = self.cfg.base_dir.join(agent.as_str());
        let backups = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut total = 0;
        for b in backups.flatten() {
            if let Some(backup) = b.file_name().to_str().and_then(|n| Name::new(n).ok()) {
                total += self.list(agent, &backup)?.iter().map(|a| a.size).sum::<u64>();
            }
        }
        Ok(total)
    }

    /// Refuses when `adding` more bytes would put `agent` over this storage's quota.
    pub fn check_quota(&self, agent: &Name, adding: u64) -> Result<(), nbackup_protocol::wire::Refusal> {
        use nbackup_protocol::wire::{Reason, Refusal};
        let Some(quota) = self.cfg.quota_per_agent else { return Ok(()) };
        let used = self.agent_usage(agent).map_err(|e| {
            Refusal::new(Reason::WriteError, format!("cannot sum the agent's archives for its quota: {e}"))
        })?;
        if used.saturating_add(adding) > quota {
            return Err(Refusal::new(
                Reason::QuotaExceeded,
                format!(
                    "agent {agent} keeps {used} bytes in storage {}; {adding} more would exceed its quota of {quota}",
                    self.cfg.name
                ),
            ));
        }
        Ok(())
    }

    /// The name and commit sequence the next archive of an entry gets, from one
    /// listing: the session's start time with a suffix one past the highest existing
    /// one of that second (never a freed lower one), and one past the highest
    /// sequence recorded.
    pub fn next_archive(
        &self,
        agent: &Name,
        backup: &Name,
        started: DateTime<Utc>,
        compression: Compression,
    ) -> io::Result<(String, u64)> {
        let archives = self.list(agent, backup)?;
        let stamp = started.format("%Y%m%dT%H%M%SZ").to_string();
        let n = archives.iter().filter(|a| a.stamp == stamp).map(|a| a.n + 1).max().unwrap_or(1);
        let suffix = if n == 1 { String::new() } else { format!("-{n}") };
        let seq = archives.iter().filter_map(ArchiveFile::seq).max().unwrap_or(0) + 1;
        Ok((format!("{agent}-{backup}-{stamp}{suffix}.{}", compression.extension()), seq))
    }

    fn fault(&self, point: &str) -> io::Result<()> {
        crate::fault::io(point, &self.cfg.base_dir.to_string_lossy())
    }

    /// Moves a verified, fsynced upload to its final name, never replacing a file.
    /// Returns the archive's path.
    pub fn place(&self, part_path: &Path, agent: &Name, backup: &Name, archive: &str) -> io::Result<PathBuf> {
        let dir = self.entry_dir(agent, backup);
        fsutil::create_dir_all_durable(&dir)?;
        let final_path = dir.join(archive);
        self.fault("commit:before-rename")?;
        // Marked before the name appears, so no rotation can see it unmarked.
        crate::lock(&self.settling).insert(final_path.clone());
        if let Err(e) = fsutil::rename_noreplace(part_path, &final_path, self.rename_mode()) {
            crate::lock(&self.settling).remove(&final_path);
            return Err(e);
        }
        self.fault("commit:after-rename")?;
        Ok(final_path)
    }

    /// Moves a session's verified catalog beside its placed archive, if there is one.
    /// The directory is made durable by the [`settle`](Self::settle) that follows.
    pub fn place_catalog(&self, incoming: &Path, archive: &Path) -> io::Result<()> {
        match fs::rename(incoming, catalog_path(archive)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Makes a placed archive's name durable and writes its manifest.
    pub fn settle(&self, archive: &Path, manifest: &Manifest) -> io::Result<()> {
        let dir = archive.parent().unwrap_or(Path::new("."));
        fsutil::fsync_dir(dir)?;
        fsutil::fsync_dir(&self.incoming_dir())?;
        self.fault("commit:manifest")?;
        // Owed to every bucket from the commit on; kept as it is when a recovery
        // settles again (a runner may already have started the upload).
        let owed = super::offsite::owed_by(self);
        if !owed.is_empty() && Copies::load(archive)?.is_none() {
            Copies::queued(owed, crate::state::unix_now()).store(archive)?;
        }
        self.write_manifest(archive, manifest)?;
        crate::lock(&self.settling).remove(archive);
        self.fault("commit:after-manifest")?;
        Ok(())
    }

    /// [`place`](Self::place), [`place_catalog`](Self::place_catalog) and
    /// [`settle`](Self::settle) together (recovery).
    pub fn install(
        &self,
        part_path: &Path,
        part: &File,
        agent: &Name,
        backup: &Name,
        manifest: &Manifest,
    ) -> io::Result<PathBuf> {
        part.sync_all()?;
        let path = self.place(part_path, agent, backup, &manifest.archive)?;
        self.place_catalog(&part_path.with_extension("catalog"), &path)?;
        self.settle(&path, manifest)?;
        Ok(path)
    }

    fn committed_log(&self) -> PathBuf {
        self.incoming_dir().join(COMMITTED_LOG)
    }

    /// Appends a commit to the log (durably: the session's journal is removed next).
    pub fn record_committed(&self, entry: &CommittedEntry) -> io::Result<()> {
        use std::io::Write;
        let _serial = crate::lock(&self.commit_log);
        self.fault("commit:log")?;
        let mut f = fs::OpenOptions::new().create(true).append(true).open(self.committed_log())?;
        let mut line = serde_json::to_string(entry).map_err(io::Error::other)?;
        line.push('\n');
        f.write_all(line.as_bytes())?;
        f.sync_data()
    }

    /// Commits younger than `max_age`, and rewrites the log without the older ones.
    /// Unreadable lines (a torn append) are dropped.
    pub fn recent_commits(&self, max_age: std::time::Duration) -> io::Result<Vec<CommittedEntry>> {
        let _serial = crate::lock(&self.commit_log);
        let text = match fs::read_to_string(self.committed_log()) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let now = crate::state::unix_now();
        let keep: Vec<CommittedEntry> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<CommittedEntry>(l).ok())
            .filter(|e| now.saturating_sub(e.at) < max_age.as_secs())
            .collect();
        let mut out = String::new();
        for e in &keep {
            out.push_str(&serde_json::to_string(e).map_err(io::Error::other)?);
            out.push('\n');
        }
        if keep.is_empty() {
            fsutil::remove_if_exists(&self.committed_log())?;
        } else if out != text {
            fsutil::write_atomic(&self.committed_log(), out.as_bytes())?;
        }
        Ok(keep)
    }

    /// Writes (or rewrites) an archive's manifest atomically.
    pub fn write_manifest(&self, archive: &Path, manifest: &Manifest) -> io::Result<()> {
        fsutil::write_atomic(&sidecar_path(archive), manifest.to_json().as_bytes())
    }

    /// How many archives of an entry stay on disk: `max_backups`, or fewer when an
    /// offload bucket holds the rest (the most any offload bucket asks to keep).
    pub fn local_keep(&self) -> u32 {
        use nbackup_protocol::config::BucketMode;
        let offload = self.cfg.buckets.iter().filter_map(|b| match b.mode {
            BucketMode::Offload { keep_local } => Some(keep_local),
            _ => None,
        });
        offload.max().map_or(self.cfg.max_backups, |k| k.min(self.cfg.max_backups))
    }

    /// Deletes the oldest archives (in commit order) of an entry beyond
    /// [`StorageArea::local_keep`], archive first, then its manifest; never `keep`,
    /// the archive just committed, nor one a bucket is still owed. Returns the names
    /// removed.
    pub fn rotate(&self, agent: &Name, backup: &Name, keep: Option<&str>) -> io::Result<Vec<String>> {
        // Held over the listing: an archive it sees without a manifest is either
        // still marked or was listed before the mark went, never between the two.
        let archives: Vec<ArchiveFile> = {
            let settling = crate::lock(&self.settling);
            self.list(agent, backup)?
                .into_iter()
                .filter(|a| Some(a.name.as_str()) != keep && !settling.contains(&a.path))
                .collect()
        };
        let keep_others = (self.local_keep() as usize).saturating_sub(usize::from(keep.is_some()));
        let excess = archives.len().saturating_sub(keep_others);
        let mut removed = Vec::new();
        for old in archives.into_iter().take(excess) {
            if let Err(why) = super::offsite::may_remove(self, &old.path) {
                if self.local_keep() < self.cfg.max_backups {
                    tracing::info!(archive = %old.name, "kept past keep_local: {why}");
                } else {
                    tracing::info!(archive = %old.name, "kept past max_backups: {why}");
                }
                continue;
            }
            // Out of the entry at once (a rename), freed by `purge_rotated` once the
            // commit has been answered: unlinking a large archive takes a third of a
            // second per 350 MB on ext4, which the agent would otherwise wait for.
            match fs::rename(&old.path, self.rotated_path(&old.name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            self.fault("rotate:after-delete")?;
            fsutil::remove_if_exists(&catalog_path(&old.path))?;
            fsutil::remove_if_exists(&sidecar_path(&old.path))?;
            fsutil::remove_if_exists(&offsite_state::path_for(&old.path))?;
            removed.push(old.name);
        }
        // Manifests whose archive is gone: what an interrupted rotation leaves.
        let dir = self.entry_dir(agent, backup);
        let prefix = format!("{agent}-{backup}-");
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(archive) = name
                    .strip_suffix(offsite_state::SUFFIX)
                    .or_else(|| name.strip_suffix(".json"))
                    .or_else(|| name.strip_suffix(".catalog"))
                    && parse_archive_name(archive, &prefix).is_some()
                    && !dir.join(archive).exists()
                {
                    fsutil::remove_if_exists(&e.path())?;
                }
            }
        }
        if !removed.is_empty() {
            fsutil::fsync_dir(&dir)?;
        }
        Ok(removed)
    }

    /// Records one bucket's copy of `archive` (the runners of several buckets share
    /// one file).
    pub fn update_copies(&self, archive: &Path, bucket: &str, copy: Copy) -> io::Result<()> {
        let _one = crate::lock(&self.copies);
        let mut all = Copies::load(archive)?.unwrap_or_default();
        all.buckets.insert(bucket.to_string(), copy);
        all.store(archive)
    }

    /// Takes `bucket`'s multipart upload out of `archive`'s off-site state (the copy
    /// is queued again) and returns it, in one step under the sidecar lock.
    pub fn take_upload(&self, archive: &Path, bucket: &str) -> io::Result<Option<super::offsite::state::Multipart>> {
        let _one = crate::lock(&self.copies);
        let Some(mut all) = Copies::load(archive)? else { return Ok(None) };
        let Some(copy) = all.buckets.get_mut(bucket) else { return Ok(None) };
        let Some(upload) = copy.upload.take() else { return Ok(None) };
        copy.state = super::offsite::state::CopyState::Queued;
        all.store(archive)?;
        Ok(Some(upload))
    }

    fn rotated_path(&self, archive: &str) -> PathBuf {
        self.incoming_dir().join(format!("{archive}{ROTATED}"))
    }

    /// Frees the space of the archives [`StorageArea::rotate`] took out; what a crash
    /// leaves here is removed at the next start with the other leftovers.
    pub fn purge_rotated(&self) {
        let Ok(entries) = fs::read_dir(self.incoming_dir()) else { return };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(ROTATED)
                && let Err(err) = fsutil::remove_if_exists(&e.path())
            {
                tracing::warn!(path = %e.path().display(), "cannot remove a rotated archive: {err}");
            }
        }
    }
}

/// `<archive>.catalog`: the archive's members, zstd-compressed JSON lines.
pub fn catalog_path(archive: &Path) -> PathBuf {
    let mut s = archive.as_os_str().to_owned();
    s.push(".catalog");
    PathBuf::from(s)
}

/// `<archive>.json`.
pub fn sidecar_path(archive: &Path) -> PathBuf {
    let mut s = archive.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

/// Splits `<prefix><yyyymmddThhmmssZ>[-n].tar.{gz,zst}` into its parts.
pub(crate) fn parse_archive_name(name: &str, prefix: &str) -> Option<(String, u32, Compression)> {
    let rest = name.strip_prefix(prefix)?;
    let (rest, compression) = if let Some(r) = rest.strip_suffix(".tar.gz") {
        (r, Compression::Gzip)
    } else {
        (rest.strip_suffix(".tar.zst")?, Compression::Zstd)
    };
    let stamp = rest.get(..16)?;
    let valid_stamp = stamp.len() == 16
        && stamp.as_bytes()[8] == b'T'
        && stamp.as_bytes()[15] == b'Z'
        && stamp.bytes().enumerate().all(|(i, b)| i == 8 || i == 15 || b.is_ascii_digit());
    if !valid_stamp {
        return None;
    }
    let n = match &rest[16..] {
        "" => 1,
        s => s.strip_prefix('-')?.parse().ok().filter(|n| *n >= 2)?,
    };
    Some((stamp.to_string(), n, compression))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nbackup_protocol::manifest::MANIFEST_FORMAT;

    fn area(dir: &Path, max: u32) -> StorageArea {
        StorageArea::new(Storage {
            name: Name::new("main").expect("name"),
            base_dir: dir.to_path_buf(),
            max_backups: max,
            compression: Compression::Gzip,
            level: 6,
            chunk_fsync: false,
            quota_per_agent: None,
            verify_rate: None,
            verify_schedule: None,
            buckets: Vec::new(),
        })
    }

    /// A manifest of archive `a`/`b` with nothing else said.
    pub(crate) fn manifest() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            archive: String::new(),
            agent: "a".into(),
            backup: "b".into(),
            storage: "main".into(),
            compression: Compression::Gzip,
            compression_level: 6,
            size: 1,
            sha256: String::new(),
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
        }
    }

    #[test]
    fn a_listing_skips_archives_removed_while_it_reads_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = area(dir.path(), 3);
        let (a, b) = (Name::new("a").expect("a"), Name::new("b").expect("b"));
        let entry = s.entry_dir(&a, &b);
        fs::create_dir_all(&entry).expect("mkdir");
        let paths: Vec<PathBuf> =
            (0..64).map(|i| entry.join(format!("a-b-20261202T0000{:02}Z.tar.gz", i % 60 + i / 60))).collect();
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            // What offload and rotation do beside a commit naming its archive.
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    for p in &paths {
                        let _ = fs::write(p, b"x");
                    }
                    for p in &paths {
                        let _ = fs::remove_file(p);
                    }
                }
            });
            for _ in 0..2000 {
                if let Err(e) = s.list(&a, &b) {
                    stop.store(true, Ordering::Relaxed);
                    panic!("listing failed while archives were removed: {e}");
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
    }

    fn commit_one(s: &StorageArea, started: DateTime<Utc>, body: &str) -> PathBuf {
        let (a, b) = (Name::new("a").expect("a"), Name::new("b").expect("b"));
        let part = s.incoming_dir().join(format!("{body}.part"));
        fs::write(&part, body).expect("part");
        let f = File::open(&part).expect("open");
        let mut m = manifest();
        let (name, seq) = s.next_archive(&a, &b, started, Compression::Gzip).expect("name");
        m.archive = name;
        m.commit_seq = Some(seq);
        s.install(&part, &f, &a, &b, &m).expect("install")
    }

    #[test]
    fn rotation_follows_commit_order_whatever_the_names_say() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = area(dir.path(), 2);
        s.prepare().expect("prepare");
        let (a, b) = (Name::new("a").expect("a"), Name::new("b").expect("b"));
        let t = |h: i64| {
            DateTime::parse_from_rfc3339("2026-11-22T02:00:00Z").expect("t").with_timezone(&Utc)
                + chrono::Duration::hours(h)
        };
        // A legacy archive (no sequence) stamped far in the future, then commits made
        // while the clock was an hour ahead, then one after it stepped back.
        let legacy = commit_one(&s, t(1000), "legacy");
        let mut m = Manifest::from_json(&fs::read_to_string(sidecar_path(&legacy)).expect("m")).expect("json");
        m.commit_seq = None;
        s.write_manifest(&legacy, &m).expect("strip seq");
        let ahead = commit_one(&s, t(1), "ahead");
        let stepped_back = commit_one(&s, t(0), "now");
        let order: Vec<String> = s.list(&a, &b).expect("list").into_iter().map(|x| x.name).collect();
        let name = |p: &PathBuf| p.file_name().expect("name").to_string_lossy().into_owned();
        assert_eq!(order, vec![name(&legacy), name(&ahead), name(&stepped_back)]);
        let removed = s.rotate(&a, &b, Some(&name(&stepped_back))).expect("rotate");
        assert_eq!(removed, vec![name(&legacy)]);
        assert!(stepped_back.exists() && ahead.exists());
        assert_eq!(s.next_commit_seq(&a, &b).expect("seq"), 3, "one past the highest recorded");
    }

    #[test]
    fn a_quota_counts_every_entry_of_the_agent_in_the_storage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = area(dir.path(), 5);
        s.cfg.quota_per_agent = Some(10);
        s.prepare().expect("prepare");
        let t = DateTime::parse_from_rfc3339("2026-11-22T02:00:00Z").expect("t").with_timezone(&Utc);
        commit_one(&s, t, "123456"); // 6 bytes of agent a, entry b
        let a = Name::new("a").expect("a");
        assert_eq!(s.agent_usage(&a).expect("usage"), 6);
        s.check_quota(&a, 4).expect("exactly at the quota");
        let r = s.check_quota(&a, 5).expect_err("over");
        assert_eq!(r.reason, nbackup_protocol::wire::Reason::QuotaExceeded);
        assert!(r.message.contains("quota of 10"), "{}", r.message);
        s.check_quota(&Name::new("other").expect("n"), 10).expect("another agent has its own");
    }

    /// A prepared area keeping `max`, entry a/b, and a start time.
    fn entry(max: u32) -> (tempfile::TempDir, StorageArea, Name, Name, DateTime<Utc>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = area(dir.path(), max);
        s.prepare().expect("prepare");
        let t = DateTime::parse_from_rfc3339("2026-11-22T02:00:00Z").expect("t").with_timezone(&Utc);
        (dir, s, Name::new("a").expect("a"), Name::new("b").expect("b"), t)
    }

    #[test]
    fn rotation_never_removes_the_archive_it_was_told_to_keep() {
        let (_dir, s, a, b, t) = entry(1);
        let first = commit_one(&s, t, "one");
        let second = commit_one(&s, t, "two");
        // Even with the sequence tampered so the new one looks older.
        let mut m = Manifest::from_json(&fs::read_to_string(sidecar_path(&first)).expect("m")).expect("json");
        m.commit_seq = Some(99);
        s.write_manifest(&first, &m).expect("tamper");
        let keep = second.file_name().expect("name").to_string_lossy().into_owned();
        s.rotate(&a, &b, Some(&keep)).expect("rotate");
        assert!(second.exists());
        assert!(!first.exists());
    }

    #[test]
    fn rotation_from_another_task_never_takes_an_archive_placed_but_not_settled() {
        let (_dir, s, a, b, t) = entry(1);
        let first = commit_one(&s, t, "one");
        // The next commit is renamed into place; its manifest is not written yet
        // when an off-site runner's rotation of the entry comes by.
        let part = s.incoming_dir().join("two.part");
        fs::write(&part, "two").expect("part");
        let mut m = manifest();
        (m.archive, _) = s.next_archive(&a, &b, t, Compression::Gzip).expect("name");
        m.commit_seq = Some(2);
        let second = s.place(&part, &a, &b, &m.archive).expect("place");
        assert_eq!(s.rotate(&a, &b, None).expect("rotate"), Vec::<String>::new());
        assert!(second.exists() && first.exists(), "neither is taken while the second settles");
        s.settle(&second, &m).expect("settle");
        s.rotate(&a, &b, None).expect("rotate");
        assert!(second.exists(), "settled, it is the newest");
        assert!(!first.exists());
    }

    #[test]
    fn parses_only_archive_names_of_the_entry() {
        let p = "web-01-etc-";
        assert_eq!(
            parse_archive_name("web-01-etc-20261122T020000Z.tar.gz", p),
            Some(("20261122T020000Z".into(), 1, Compression::Gzip))
        );
        assert_eq!(
            parse_archive_name("web-01-etc-20261122T020000Z-3.tar.zst", p),
            Some(("20261122T020000Z".into(), 3, Compression::Zstd))
        );
        for bad in [
            "web-01-etc-20261122T020000Z.tar.gz.json",
            "web-01-etc-20261122T020000Z-1.tar.gz",
            "web-01-etc-2026112xT020000Z.tar.gz",
            "web-01-etcx-20261122T020000Z.tar.gz",
            ".web-01-etc-20261122T020000Z.tar.gz.json.tmp",
        ] {
            assert_eq!(parse_archive_name(bad, p), None, "{bad}");
        }
    }

    #[test]
    fn same_second_commits_get_suffixes_and_never_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = area(dir.path(), 10);
        s.prepare().expect("prepare");
        let t = DateTime::parse_from_rfc3339("2026-11-22T02:00:00Z").expect("t").with_timezone(&Utc);
        let first = commit_one(&s, t, "one");
        let second = commit_one(&s, t, "two");
        assert!(first.to_string_lossy().ends_with("a-b-20261122T020000Z.tar.gz"));
        assert!(second.to_string_lossy().ends_with("a-b-20261122T020000Z-2.tar.gz"));
        assert_eq!(fs::read_to_string(&first).expect("first"), "one");
        assert!(sidecar_path(&second).exists());
        let m = Manifest::from_json(&fs::read_to_string(sidecar_path(&second)).expect("sidecar")).expect("json");
        assert_eq!(m.archive, "a-b-20261122T020000Z-2.tar.gz");
        assert_eq!(fs::read_dir(s.incoming_dir()).expect("ls").count(), 0);
    }

    #[test]
    fn rotation_keeps_the_newest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = area(dir.path(), 2);
        s.prepare().expect("prepare");
        let base = DateTime::parse_from_rfc3339("2026-11-22T02:00:00Z").expect("t").with_timezone(&Utc);
        for i in 0..4 {
            commit_one(&s, base + chrono::Duration::hours(i), &format!("b{i}"));
        }
        let (a, b) = (Name::new("a").expect("a"), Name::new("b").expect("b"));
        let removed = s.rotate(&a, &b, None).expect("rotate");
        assert_eq!(removed, vec!["a-b-20261122T020000Z.tar.gz", "a-b-20261122T030000Z.tar.gz"]);
        let left: Vec<String> = s.list(&a, &b).expect("list").into_iter().map(|x| x.name).collect();
        assert_eq!(left, vec!["a-b-20261122T040000Z.tar.gz", "a-b-20261122T050000Z.tar.gz"]);
        let files = fs::read_dir(s.entry_dir(&a, &b)).expect("ls").count();
        assert_eq!(files, 4, "two archives and their two manifests");
        let incoming = || {
            let mut names: Vec<String> = fs::read_dir(s.incoming_dir())
                .expect("ls")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .filter(|n| n != COMMITTED_LOG)
                .collect();
            names.sort();
            names
        };
        assert_eq!(incoming(), ["a-b-20261122T020000Z.tar.gz.rotated", "a-b-20261122T030000Z.tar.gz.rotated"]);
        s.purge_rotated();
        assert!(incoming().is_empty(), "{:?}", incoming());
    }

    #[test]
    fn rotation_keeps_what_a_bucket_is_owed_and_the_commit_queues_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = area(dir.path(), 1);
        s.cfg.buckets.push(super::super::offsite::tests::bucket());
        s.prepare().expect("prepare");
        let base = DateTime::parse_from_rfc3339("2026-11-22T02:00:00Z").expect("t").with_timezone(&Utc);
        let first = commit_one(&s, base, "a");
        let second = commit_one(&s, base + chrono::Duration::hours(1), "b");
        let owed = Copies::load(&first).expect("load").expect("the commit queued it");
        assert_eq!(owed.pending(), ["offsite"]);
        let (a, b) = (Name::new("a").expect("a"), Name::new("b").expect("b"));
        assert!(s.rotate(&a, &b, None).expect("rotate").is_empty(), "the first is not copied yet");
        assert!(first.exists());
        let mut copy = owed.buckets["offsite"].clone();
        copy.state = offsite_state::CopyState::Verified;
        s.update_copies(&first, "offsite", copy).expect("update");
        assert_eq!(s.rotate(&a, &b, None).expect("rotate"), [first.file_name().expect("n").to_string_lossy()]);
        assert!(!offsite_state::path_for(&first).exists(), "its sidecar went with it");
        assert!(second.exists() && offsite_state::path_for(&second).exists());
        // A bucket removed from the configuration is owed nothing.
        s.cfg.buckets.clear();
        commit_one(&s, base + chrono::Duration::hours(2), "c");
        assert_eq!(s.rotate(&a, &b, None).expect("rotate").len(), 1, "the second goes although never copied");
    }

    #[test]
    fn an_offload_bucket_leaves_only_keep_local_on_disk_once_copied() {
        use nbackup_protocol::config::BucketMode;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = area(dir.path(), 5);
        let mut b = super::super::offsite::tests::bucket();
        b.mode = BucketMode::Offload { keep_local: 1 };
        s.cfg.buckets.push(b);
        assert_eq!(s.local_keep(), 1);
        s.prepare().expect("prepare");
        let base = DateTime::parse_from_rfc3339("2026-11-22T02:00:00Z").expect("t").with_timezone(&Utc);
        let archives: Vec<PathBuf> =
            (0..3).map(|i| commit_one(&s, base + chrono::Duration::hours(i), &i.to_string())).collect();
        let (a, b) = (Name::new("a").expect("a"), Name::new("b").expect("b"));
        assert!(s.rotate(&a, &b, None).expect("rotate").is_empty(), "nothing is verified off-site yet");
        // The newest is copied first: it still stays (keep_local), the older two wait.
        for archive in &archives[1..] {
            let mut copy = Copies::load(archive).expect("load").expect("queued").buckets["offsite"].clone();
            copy.state = offsite_state::CopyState::Verified;
            s.update_copies(archive, "offsite", copy).expect("update");
        }
        let name = |p: &PathBuf| p.file_name().expect("n").to_string_lossy().into_owned();
        assert_eq!(s.rotate(&a, &b, None).expect("rotate"), [name(&archives[1])]);
        assert!(archives[0].exists(), "the oldest is not copied yet: it stays whatever keep_local says");
        assert!(archives[2].exists(), "keep_local keeps the newest");
        // A second offload bucket asking for more is what the disk keeps.
        let mut more = super::super::offsite::tests::bucket();
        more.name = Name::new("cold").expect("name");
        more.mode = BucketMode::Offload { keep_local: 3 };
        s.cfg.buckets.push(more);
        assert_eq!(s.local_keep(), 3);
        s.cfg.max_backups = 2;
        assert_eq!(s.local_keep(), 2, "never more than max_backups");
    }

    #[test]
    fn rotation_removes_manifests_left_by_an_interrupted_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = area(dir.path(), 5);
        s.prepare().expect("prepare");
        let t = DateTime::parse_from_rfc3339("2026-11-22T02:00:00Z").expect("t").with_timezone(&Utc);
        let kept = commit_one(&s, t, "kept");
        let gone = commit_one(&s, t, "gone");
        fs::remove_file(&gone).expect("archive deleted, crash before its manifest");
        let (a, b) = (Name::new("a").expect("a"), Name::new("b").expect("b"));
        s.rotate(&a, &b, None).expect("rotate");
        assert!(!sidecar_path(&gone).exists());
        assert!(sidecar_path(&kept).exists());
    }

    #[test]
    fn a_suffix_freed_by_rotation_is_not_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = area(dir.path(), 2);
        s.prepare().expect("prepare");
        let (a, b) = (Name::new("a").expect("a"), Name::new("b").expect("b"));
        let t = DateTime::parse_from_rfc3339("2026-11-22T02:00:00Z").expect("t").with_timezone(&Utc);
        for i in 0..3 {
            commit_one(&s, t, &format!("r{i}"));
            s.rotate(&a, &b, None).expect("rotate");
        }
        // Base name was rotated out after the third commit; the fourth must not take it.
        let fourth = commit_one(&s, t, "r3");
        assert!(fourth.to_string_lossy().ends_with("-4.tar.gz"), "{}", fourth.display());
        s.rotate(&a, &b, None).expect("rotate");
        let left: Vec<String> = s.list(&a, &b).expect("list").into_iter().map(|x| x.name).collect();
        assert_eq!(left, vec!["a-b-20261122T020000Z-3.tar.gz", "a-b-20261122T020000Z-4.tar.gz"]);
        assert_eq!(fs::read_to_string(&fourth).expect("newest kept"), "r3");
    }
}
