//! Re-reading stored archives: the whole file hashed against its manifest (size
//! and SHA-256), decompressed to the end (gzip CRCs, zstd checksum) and walked as
//! tar, every member read, the member count checked. An archive that fails is
//! **quarantined**: renamed `<name>.corrupt` (its manifest `<name>.corrupt.json`),
//! so listing and rotation no longer see it and rotation can never delete it.
//! A read error from the disk is reported, not taken for corruption.
//!
//! Jobs run on a blocking thread, one at a time, at most at `storage.verify_rate`
//! bytes per second (read from disk), and report through the event log:
//! `verified`, `archive_corrupt`, `verify_failed`, then one `verify_done`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Local};
use nbackup_protocol::admin::EventKind;
use nbackup_protocol::manifest::hex;
use nbackup_protocol::wire::Compression;
use sha2::{Digest, Sha256};

use super::Server;
use super::handle::{ArchiveFilter, EntryArchives};
use super::storage::{ArchiveFile, catalog_path, sidecar_path};
use crate::state::EventSpec;

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Good {
        members: u64,
        bytes: u64,
    },
    Corrupt(String),
    /// No manifest to check against: nothing is quarantined.
    Unchecked(String),
}

/// Hashes and counts what the decompressor reads, keeps the byte rate, and
/// remembers whether the disk itself failed.
struct Hashing<R> {
    inner: R,
    sha: Sha256,
    bytes: u64,
    rate: Option<u64>,
    started: Instant,
    disk_error: Option<io::Error>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            Err(e) => {
                let kind = e.kind();
                self.disk_error = Some(e);
                return Err(io::Error::new(kind, "the archive file could not be read"));
            }
        };
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        if let Some(rate) = self.rate {
            // Sleep until the bytes read so far are within the rate.
            let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(n)
    }
}

/// Checks one archive. Blocking.
pub fn check(
    path: &Path,
    compression: Compression,
    manifest: Option<&nbackup_protocol::manifest::Manifest>,
    rate: Option<u64>,
) -> io::Result<Verdict> {
    let Some(manifest) = manifest else { return Ok(Verdict::Unchecked("no manifest beside it".into())) };
    let file = File::open(path)?;
    check_stream(BufReader::with_capacity(1 << 20, file), compression, manifest, rate)
}

/// Checks an archive read from `input` (a file, or an object streamed back from a
/// bucket) against its manifest. Blocking. An error reading `input` is an `Err`
/// (the source failed), damage inside it a [`Verdict::Corrupt`].
pub fn check_stream<R: Read>(
    input: R,
    compression: Compression,
    manifest: &nbackup_protocol::manifest::Manifest,
    rate: Option<u64>,
) -> io::Result<Verdict> {
    let mut hashing =
        Hashing { inner: input, sha: Sha256::new(), bytes: 0, rate, started: Instant::now(), disk_error: None };
    let walked = walk(&mut hashing, compression);
    if let Some(e) = hashing.disk_error.take() {
        return Err(e);
    }
    let members = match walked {
        Ok(m) => m,
        Err(e) => return Ok(Verdict::Corrupt(format!("the compressed tar stream is damaged: {e}"))),
    };
    // Whatever follows the end of the compressed stream is part of the file too.
    let tail = io::copy(&mut hashing, &mut io::sink());
    if let Some(e) = hashing.disk_error.take() {
        return Err(e);
    }
    tail?;
    let digest = hex(&hashing.sha.finalize());
    Ok(if let Err(why) = crate::restore::matches_manifest(hashing.bytes, &digest, manifest) {
        Verdict::Corrupt(why)
    } else if members != manifest.entries {
        Verdict::Corrupt(format!("{members} tar members, the manifest says {}", manifest.entries))
    } else {
        Verdict::Good { members, bytes: hashing.bytes }
    })
}

fn walk<R: Read>(input: &mut R, compression: Compression) -> io::Result<u64> {
    // One inflating worker: verification is background work beside ingestion.
    let decoder = crate::codec::decoder(io::BufReader::new(input), compression, 1)?;
    let mut archive = tar::Archive::new(decoder);
    let mut members = 0u64;
    for entry in archive.entries()? {
        let mut entry = entry?;
        io::copy(&mut entry, &mut io::sink())?;
        members += 1;
    }
    // The end-of-archive blocks and any padding, so the decompressor checks its
    // trailer (gzip CRC and length, zstd checksum).
    io::copy(&mut archive.into_inner(), &mut io::sink())?;
    Ok(members)
}

/// `<archive>.corrupt`, and its manifest beside it as `<archive>.corrupt.json`.
pub fn quarantine(path: &Path) -> io::Result<PathBuf> {
    let mut target = path.as_os_str().to_owned();
    target.push(".corrupt");
    let target = PathBuf::from(target);
    std::fs::rename(path, &target)?;
    let catalog = catalog_path(path);
    if catalog.exists() {
        std::fs::rename(&catalog, catalog_path(&target))?;
    }
    let manifest = sidecar_path(path);
    if manifest.exists() {
        std::fs::rename(&manifest, sidecar_path(&target))?;
    }
    if let Some(dir) = path.parent() {
        crate::fsutil::fsync_dir(dir)?;
    }
    Ok(target)
}

/// Why a job did not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStarted {
    /// Another job runs (one at a time).
    Busy,
    NothingMatches,
}

/// Claims the one-job slot, selects what `filter` names (each entry's newest with
/// `newest`, only the one called `only`), and verifies it on a blocking thread.
/// Returns how many archives it checks and the job. Blocking (lists the storages).
pub fn start(
    server: &Arc<Server>,
    filter: &ArchiveFilter,
    newest: bool,
    only: Option<&str>,
) -> Result<(usize, tokio::task::JoinHandle<()>), NotStarted> {
    if server.verifying.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return Err(NotStarted::Busy);
    }
    let mut selected = filter.select(server);
    for e in &mut selected {
        if let Some(name) = only {
            e.files.retain(|f| f.name == name);
        }
        if newest {
            e.files = e.files.pop().into_iter().collect();
        }
    }
    let n = selected.iter().map(|e| e.files.len()).sum();
    if n == 0 {
        server.verifying.store(false, std::sync::atomic::Ordering::Release);
        return Err(NotStarted::NothingMatches);
    }
    let s = server.clone();
    let job = server.tracker.spawn_blocking(move || finish(&s, run_job(&s, &selected)));
    Ok((n, job))
}

/// Verifies the selected archives one after the other, recording each result.
/// Blocking.
fn run_job(server: &Server, selected: &[EntryArchives]) -> (u64, u64, u64) {
    let (mut good, mut corrupt, mut failed) = (0, 0, 0);
    for e in selected {
        for a in &e.files {
            match verify_one(server, e, a) {
                Checked::Good(_) => good += 1,
                Checked::Corrupt { .. } => corrupt += 1,
                Checked::Failed(_) => failed += 1,
                Checked::Gone => {}
            }
        }
    }
    (good, corrupt, failed)
}

/// What [`verify_one`] found, in words for the event and the asker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    Good(String),
    Corrupt {
        message: String,
        quarantined: bool,
    },
    /// Not verified (no manifest, or the disk failed): nothing is quarantined.
    Failed(String),
    /// Rotated out since it was listed.
    Gone,
}

/// Checks one archive of `entry`, quarantines it if corrupt, and records the event.
/// Blocking.
pub fn verify_one(server: &Server, entry: &EntryArchives, a: &ArchiveFile) -> Checked {
    let events = &server.telemetry.events;
    let who =
        EventSpec { agent: Some(entry.agent.as_str()), backup: Some(entry.backup.as_str()), ..Default::default() };
    match check(&a.path, a.compression, a.manifest.as_ref(), entry.area.cfg.verify_rate) {
        Ok(Verdict::Good { members, bytes }) => {
            let message = format!("{}: verified, {members} members, {bytes} bytes, sha256 matches", a.name);
            events.record(EventKind::Verified, who, message.clone());
            Checked::Good(message)
        }
        Ok(Verdict::Unchecked(why)) => {
            let message = format!("{}: not verified: {why}", a.name);
            events.record(EventKind::VerifyFailed, who, message.clone());
            Checked::Failed(message)
        }
        Ok(Verdict::Corrupt(why)) => {
            let (moved, quarantined) = match quarantine(&a.path) {
                Ok(p) => (
                    format!(
                        "quarantined as {}",
                        p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
                    ),
                    true,
                ),
                Err(e) => (format!("could not be quarantined: {e}"), false),
            };
            tracing::error!(archive = %a.path.display(), "archive corrupt: {why}; {moved}");
            let message = format!("{}: corrupt: {why}; {moved}", a.name);
            events.record(EventKind::ArchiveCorrupt, who, message.clone());
            Checked::Corrupt { message, quarantined }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Checked::Gone,
        Err(e) => {
            let message = format!("{}: could not be read: {e}", a.name);
            events.record(EventKind::VerifyFailed, who, message.clone());
            Checked::Failed(message)
        }
    }
}

/// Checks an archive that is only in a bucket, streamed from `input`, and records the
/// event; nothing is quarantined (the bucket's copy is left for the operator, and
/// the disk's copy, if it comes back, is checked on its own). Blocking; takes the
/// one-job slot like [`verify_now`] (`None` while a job runs).
pub fn verify_object<R: Read>(
    server: &Server,
    who: EventSpec<'_>,
    name: &str,
    bucket: &str,
    input: R,
    compression: Compression,
    manifest: &nbackup_protocol::manifest::Manifest,
) -> Option<Checked> {
    if server.verifying.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return None;
    }
    let events = &server.telemetry.events;
    let checked = match check_stream(BufReader::with_capacity(1 << 20, input), compression, manifest, None) {
        Ok(Verdict::Good { members, bytes }) => {
            let message =
                format!("{name}: verified in bucket {bucket}, {members} members, {bytes} bytes, sha256 matches");
            events.record(EventKind::Verified, who, message.clone());
            Checked::Good(message)
        }
        Ok(Verdict::Corrupt(why)) => {
            tracing::error!(archive = name, bucket, "archive corrupt in its bucket: {why}");
            let message = format!("{name}: corrupt in bucket {bucket}: {why}");
            events.record(EventKind::ArchiveCorrupt, who, message.clone());
            Checked::Corrupt { message, quarantined: false }
        }
        Ok(Verdict::Unchecked(why)) => Checked::Failed(format!("{name}: not verified: {why}")),
        Err(e) => {
            let message = format!("{name}: could not be read from bucket {bucket}: {e}");
            events.record(EventKind::VerifyFailed, who, message.clone());
            Checked::Failed(message)
        }
    };
    server.verifying.store(false, std::sync::atomic::Ordering::Release);
    Some(checked)
}

/// Verifies one archive now, in the one-job slot (`None` while a job runs), for a
/// restore connection's `Verify`. Blocking.
pub fn verify_now(server: &Server, entry: &EntryArchives, a: &ArchiveFile) -> Option<Checked> {
    if server.verifying.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return None;
    }
    let checked = verify_one(server, entry, a);
    server.verifying.store(false, std::sync::atomic::Ordering::Release);
    Some(checked)
}

/// Ends a job: frees the one-job slot first, then says so, so whoever saw
/// `verify_done` may start the next one at once.
fn finish(server: &Server, (good, corrupt, failed): (u64, u64, u64)) {
    server.verifying.store(false, std::sync::atomic::Ordering::Release);
    let message = format!("{good} verified, {corrupt} corrupt, {failed} not verified");
    server.telemetry.events.record(EventKind::VerifyDone, EventSpec::default(), message);
}

/// Storages whose `verify_schedule` fired in `(after, now]`. A clock stepping back
/// gives an empty window (nothing runs twice); one stepping forward fires each
/// storage once.
pub fn due(
    storages: &BTreeMap<nbackup_protocol::Name, Arc<super::storage::StorageArea>>,
    after: DateTime<Local>,
    now: DateTime<Local>,
) -> Vec<nbackup_protocol::Name> {
    storages
        .values()
        .filter(|a| a.cfg.verify_schedule.as_ref().and_then(|s| s.next_after(&after)).is_some_and(|t| t <= now))
        .map(|a| a.cfg.name.clone())
        .collect()
}

/// Runs each storage's `verify_schedule` (every kept archive) until `shutdown`.
/// Looks twice a minute, so reloads and clock steps are picked up.
pub async fn scheduled(server: Arc<Server>, shutdown: tokio_util::sync::CancellationToken) {
    let mut last = Local::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        let now = Local::now();
        for name in due(&server.live().storages, last, now) {
            let s = server.clone();
            let filter = ArchiveFilter { storage: Some(name.to_string()), ..Default::default() };
            match tokio::task::spawn_blocking(move || start(&s, &filter, false, None)).await {
                Ok(Ok((_, job))) => drop(job.await),
                Ok(Err(NotStarted::Busy)) => {
                    tracing::warn!(storage = %name, "scheduled verification skipped: another one is running");
                }
                Ok(Err(NotStarted::NothingMatches)) | Err(_) => {}
            }
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbackup_protocol::manifest::{MANIFEST_FORMAT, Manifest};

    /// A zstd tar of three files, and its manifest.
    fn archive(dir: &Path) -> (PathBuf, Manifest) {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, len) in [("a", 10_000usize), ("b/c", 70_000), ("d", 0)] {
            let mut h = tar::Header::new_gnu();
            h.set_size(len as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, &vec![b'x'; len][..]).expect("append");
        }
        let raw = tar.into_inner().expect("tar");
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd");
        enc.include_checksum(true).expect("checksum");
        io::Write::write_all(&mut enc, &raw).expect("write");
        let data = enc.finish().expect("finish");
        let path = dir.join("a-b-20261201T000000Z.tar.zst");
        std::fs::write(&path, &data).expect("write archive");
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            archive: "a-b-20261201T000000Z.tar.zst".into(),
            agent: "a".into(),
            backup: "b".into(),
            storage: "main".into(),
            compression: Compression::Zstd,
            compression_level: 3,
            size: data.len() as u64,
            sha256: hex(&Sha256::digest(&data)),
            chunks: 1,
            chunk_size: 1 << 20,
            entries: 3,
            bytes_read: 80_000,
            skipped: 0,
            started_at: String::new(),
            finished_at: String::new(),
            agent_version: String::new(),
            server_version: String::new(),
            session: String::new(),
            commit_seq: Some(1),
        };
        (path, manifest)
    }

    #[test]
    fn a_sound_archive_verifies_and_each_kind_of_damage_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, manifest) = archive(dir.path());
        let good = check(&path, Compression::Zstd, Some(&manifest), None).expect("check");
        assert_eq!(good, Verdict::Good { members: 3, bytes: manifest.size });
        // A manifest that claims another member count.
        let wrong = Manifest { entries: 4, ..manifest.clone() };
        let Verdict::Corrupt(why) = check(&path, Compression::Zstd, Some(&wrong), None).expect("check") else {
            panic!("member count")
        };
        assert!(why.contains("3 tar members"), "{why}");
        // Truncated: the zstd frame ends early.
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() - 7]).expect("truncate");
        let Verdict::Corrupt(why) = check(&path, Compression::Zstd, Some(&manifest), None).expect("check") else {
            panic!("truncation")
        };
        assert!(why.contains("damaged") || why.contains("bytes on disk"), "{why}");
        // No manifest: reported, never quarantined.
        assert!(matches!(check(&path, Compression::Zstd, None, None), Ok(Verdict::Unchecked(_))));
    }

    #[test]
    fn quarantine_moves_the_archive_and_its_manifest_out_of_sight() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, manifest) = archive(dir.path());
        std::fs::write(sidecar_path(&path), manifest.to_json()).expect("manifest");
        let moved = quarantine(&path).expect("quarantine");
        assert!(moved.to_string_lossy().ends_with(".tar.zst.corrupt"));
        assert!(!path.exists() && moved.exists() && sidecar_path(&moved).exists());
        assert!(!sidecar_path(&path).exists());
    }

    #[test]
    fn a_schedule_fires_once_for_its_window_and_never_when_the_clock_steps_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = nbackup_protocol::config::Storage {
            name: nbackup_protocol::Name::new("main").expect("name"),
            base_dir: dir.path().to_path_buf(),
            max_backups: 3,
            compression: Compression::Zstd,
            level: 3,
            chunk_fsync: false,
            quota_per_agent: None,
            verify_rate: None,
            verify_schedule: Some(nbackup_protocol::config::Schedule::parse("0 4 * * *").expect("cron")),
            buckets: Vec::new(),
        };
        let mut storages = BTreeMap::new();
        storages.insert(cfg.name.clone(), Arc::new(super::super::storage::StorageArea::new(cfg)));
        let at = |h: u32, m: u32| {
            use chrono::TimeZone;
            Local.with_ymd_and_hms(2026, 12, 1, h, m, 0).single().expect("time")
        };
        assert_eq!(due(&storages, at(3, 59), at(4, 0)).len(), 1, "04:00 is in (03:59, 04:00]");
        assert!(due(&storages, at(4, 0), at(4, 1)).is_empty(), "not again in the next window");
        assert!(due(&storages, at(4, 1), at(3, 0)).is_empty(), "a clock stepping back fires nothing");
        assert_eq!(due(&storages, at(1, 0), at(9, 0)).len(), 1, "a step forward over it fires once");
    }

    #[test]
    fn the_rate_limit_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, manifest) = archive(dir.path());
        let rate = manifest.size * 4; // a quarter of a second's worth at this rate
        let t = Instant::now();
        assert!(matches!(check(&path, Compression::Zstd, Some(&manifest), Some(rate)), Ok(Verdict::Good { .. })));
        assert!(t.elapsed() >= Duration::from_millis(200), "{:?}", t.elapsed());
    }
}
