//! A restore from start to finish: choose the archive, plan from its catalog, fetch
//! it (resumably) while a blocking thread decompresses and extracts it, and check the
//! whole file's SHA-256 against the manifest.
//!
//! ```text
//! server ─RSTR─▶ fetch task (CRC, offset, SHA-256) ─▶ channel ─▶ extraction thread
//!                                                               (zstd/gzip ─▶ tar ─▶ safe writes)
//! ```

use std::io::{self, BufReader};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use nbackup_protocol::restore::{CatalogEntry, Part, RemoteArchive};
use nbackup_protocol::wire::Compression;

use super::fetch::{ArchiveRef, ChannelReader, FETCH_BUFFER, FetchError, Fetched, RestoreClient};
use crate::restore::{
    Action, ExtractOptions, ExtractProgress, ExtractReport, Overwrite, Planned, Selection, decompress, plan,
};

/// What to restore, where, and how.
pub struct RestoreSpec {
    pub which: ArchiveRef,
    pub compression: Compression,
    pub dest: PathBuf,
    pub selection: Selection,
    pub overwrite: Overwrite,
    pub dry_run: bool,
}

/// Counters a progress display reads while a restore runs.
#[derive(Default)]
pub struct RestoreProgress {
    /// Compressed bytes received.
    pub received: AtomicU64,
    /// Members and bytes of file content written.
    pub written: ExtractProgress,
}

/// How a restore ended.
#[derive(Debug, Clone)]
pub struct RestoreOutcome {
    pub archive: String,
    pub report: ExtractReport,
    /// How the archive arrived; `None` for a dry run answered from the catalog.
    pub fetched: Option<Fetched>,
    pub dry_run: bool,
    pub seconds: f64,
}

impl RestoreOutcome {
    /// Whether the whole archive matched the manifest's SHA-256 (`None`: not fetched).
    pub fn verified(&self) -> Option<bool> {
        self.fetched.as_ref().map(Fetched::verified)
    }

    /// Connections the fetch took beyond the first.
    pub fn resumed(&self) -> u32 {
        self.fetched.as_ref().map_or(0, |f| f.resumed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The archive stream is damaged (decompression or tar failed), or the
    /// destination could not be used.
    #[error("{0}")]
    Extract(String),
    #[error("the extraction thread failed: {0}")]
    Task(String),
}

/// Called for every selected member (on the extraction thread).
pub type OnEntry = Box<dyn FnMut(&Planned) + Send>;

/// Bytes per block handed from the decompression thread to the extraction thread.
const DECODED_BLOCK: usize = 1 << 20;

/// Fetches `part` of `which` while `consume` reads it, in order, on a blocking
/// thread. When both fail, the consumer's error is the cause (a consumer that stops
/// reading stops the fetch); `what` says what could not be read.
async fn fetch_with<T: Send + 'static>(
    client: &RestoreClient,
    which: &ArchiveRef,
    part: Part,
    received: &AtomicU64,
    cancel: &CancellationToken,
    what: &'static str,
    consume: impl FnOnce(ChannelReader) -> io::Result<T> + Send + 'static,
) -> Result<(T, Fetched), RestoreError> {
    let (tx, rx) = tokio::sync::mpsc::channel(FETCH_BUFFER);
    let consumer = tokio::task::spawn_blocking(move || consume(ChannelReader::new(rx)));
    let fetched = client.fetch(which, part, &tx, received, cancel).await;
    drop(tx);
    let consumed = consumer.await.map_err(|e| RestoreError::Task(e.to_string()))?;
    match (consumed, fetched) {
        (Ok(t), Ok(f)) => Ok((t, f)),
        (Err(e), Ok(_) | Err(FetchError::Cancelled)) => Err(RestoreError::Extract(format!("{what}: {e}"))),
        (_, Err(f)) => Err(RestoreError::Fetch(f)),
    }
}

/// Fetches and decodes an archive's catalog; `None` when it has none.
pub async fn catalog(
    client: &RestoreClient,
    archive: &RemoteArchive,
    storage: &nbackup_protocol::Name,
    cancel: &CancellationToken,
) -> Result<Option<Vec<CatalogEntry>>, RestoreError> {
    if archive.catalog.is_none() {
        return Ok(None);
    }
    let which =
        ArchiveRef { storage: storage.clone(), backup: archive.backup.clone(), archive: archive.archive.clone() };
    let received = AtomicU64::new(0);
    let parse = |raw: ChannelReader| -> io::Result<Vec<CatalogEntry>> {
        let lines = zstd::stream::read::Decoder::new(raw)?;
        let mut out = Vec::new();
        for line in io::BufRead::lines(BufReader::new(lines)) {
            out.push(serde_json::from_str(&line?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?);
        }
        Ok(out)
    };
    let what = "the catalog is unreadable";
    let (entries, _) = fetch_with(client, &which, Part::Catalog, &received, cancel, what, parse).await?;
    Ok(Some(entries))
}

/// What a restore of `entries` into `spec.dest` would do, from the catalog alone.
pub fn plan_from_catalog(spec: &RestoreSpec, entries: &[CatalogEntry], on_entry: &mut OnEntry) -> ExtractReport {
    let mut report = ExtractReport { members: entries.len() as u64, ..Default::default() };
    for e in entries.iter().filter(|e| spec.selection.matches(&e.path)) {
        let rel = std::path::Path::new(&e.path);
        let action = match crate::restore::safe_join(&spec.dest, rel) {
            Err(why) => Action::Refuse(why.to_string()),
            Ok(_) => plan(&spec.dest, rel, e.kind, e.mtime, spec.overwrite),
        };
        let planned = Planned { path: e.path.clone(), kind: e.kind, size: e.size, action };
        report.count(&planned);
        on_entry(&planned);
    }
    report
}

/// Fetches the archive and extracts (or, dry, plans) the selected members.
pub async fn restore(
    client: &RestoreClient,
    spec: RestoreSpec,
    progress: Arc<RestoreProgress>,
    mut on_entry: OnEntry,
    cancel: &CancellationToken,
) -> Result<RestoreOutcome, RestoreError> {
    let started = Instant::now();
    let RestoreSpec { which, compression, dest, selection, overwrite, dry_run } = spec;
    let p = progress.clone();
    let unpack = move |raw: ChannelReader| -> io::Result<ExtractReport> {
        // Decompression and extraction on two threads, like `zstd -d | tar -x`: each
        // would otherwise wait for the other.
        let (decoded_tx, decoded_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(FETCH_BUFFER);
        std::thread::scope(|scope| {
            let decoding = scope.spawn(move || -> io::Result<()> {
                let mut input = decompress(BufReader::with_capacity(1 << 20, raw), compression)?;
                loop {
                    let mut block = vec![0u8; DECODED_BLOCK];
                    let n = crate::restore::read_full(&mut input, &mut block)?;
                    block.truncate(n);
                    if n == 0 || decoded_tx.blocking_send(block.into()).is_err() {
                        return Ok(());
                    }
                }
            });
            let extracted = (|| {
                let mut input = ChannelReader::new(decoded_rx);
                let mut opts = ExtractOptions {
                    selection: &selection,
                    overwrite,
                    dry_run,
                    on_entry: &mut *on_entry,
                    progress: Some(&p.written),
                };
                let report = crate::restore::extract_stream(&mut input, &dest, &mut opts)?;
                // The end-of-archive blocks and the compressor's trailer, so a damaged
                // tail (gzip CRC, zstd checksum) is found and the fetch can finish.
                io::copy(&mut input, &mut io::sink())?;
                Ok(report)
            })();
            let decoded =
                decoding.join().unwrap_or_else(|_| Err(io::Error::other("the decompression thread panicked")));
            // A decompression error is the cause of whatever the extraction then saw.
            decoded.and(extracted)
        })
    };
    let what = "the archive cannot be read";
    let (report, fetched) = fetch_with(client, &which, Part::Archive, &progress.received, cancel, what, unpack).await?;
    Ok(RestoreOutcome {
        archive: which.archive,
        report,
        fetched: Some(fetched),
        dry_run,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Reads an archive's members from the archive itself (for archives without a
/// catalog): every header, no content kept.
pub async fn members_from_archive(
    client: &RestoreClient,
    which: &ArchiveRef,
    compression: Compression,
    cancel: &CancellationToken,
) -> Result<Vec<CatalogEntry>, RestoreError> {
    let walk = move |raw: ChannelReader| -> io::Result<Vec<CatalogEntry>> {
        let input = decompress(BufReader::with_capacity(1 << 20, raw), compression)?;
        let mut ar = tar::Archive::new(input);
        let mut out = Vec::new();
        for entry in ar.entries()? {
            let entry = entry?;
            let h = entry.header();
            let path = entry.path()?.to_string_lossy().into_owned();
            out.push(CatalogEntry {
                lossy: false,
                path,
                kind: crate::restore::kind_of(h.entry_type()),
                size: h.size()?,
                mtime: h.mtime()? as i64,
                mode: h.mode()? & 0o7777,
                uid: h.uid()?,
                gid: h.gid()?,
                link: entry.link_name()?.map(|l| l.to_string_lossy().into_owned()),
                offset: entry.raw_header_position(),
            });
        }
        io::copy(&mut ar.into_inner(), &mut io::sink())?;
        Ok(out)
    };
    let received = AtomicU64::new(0);
    let what = "the archive cannot be read";
    Ok(fetch_with(client, which, Part::Archive, &received, cancel, what, walk).await?.0)
}

/// What a restore test found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreTestReport {
    pub archive: String,
    /// Files restored and compared.
    pub checked: u64,
    /// Restored equal to the live file.
    pub identical: u64,
    /// Changed on the source since the backup (size or mtime): reported, not failures.
    pub changed: Vec<String>,
    /// Gone from the source since the backup.
    pub gone: Vec<String>,
    /// Restored different from a live file whose size and mtime are unchanged: the
    /// backup (or the source) is damaged. A failure.
    pub differing: Vec<String>,
    pub seconds: f64,
}

impl RestoreTestReport {
    pub fn ok(&self) -> bool {
        self.differing.is_empty()
    }

    /// One line for the event log.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "restore test of {}: {} files restored, {} identical to the source",
            self.archive, self.checked, self.identical
        );
        let list = |v: &[String]| v.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        if !self.changed.is_empty() {
            s += &format!(", {} changed since the backup ({})", self.changed.len(), list(&self.changed));
        }
        if !self.gone.is_empty() {
            s += &format!(", {} gone from the source ({})", self.gone.len(), list(&self.gone));
        }
        if !self.differing.is_empty() {
            s += &format!(", {} DIFFER from an unchanged source ({})", self.differing.len(), list(&self.differing));
        }
        s
    }
}

/// Restores `files` random regular files of `archive` (which must have a catalog)
/// into a fresh directory below `workdir`, compares each with the live file, and
/// removes the directory. The archive is fetched and decompressed whole (it is a
/// stream); only the chosen files are written.
pub async fn restore_test(
    client: &RestoreClient,
    storage: &nbackup_protocol::Name,
    archive: &RemoteArchive,
    files: u32,
    workdir: &std::path::Path,
    cancel: &CancellationToken,
) -> Result<RestoreTestReport, RestoreError> {
    let started = Instant::now();
    let Some(members) = catalog(client, archive, storage, cancel).await? else {
        return Err(RestoreError::Extract(format!(
            "{} has no catalog; restore tests need one (archives made by this version have it)",
            archive.archive
        )));
    };
    let mut candidates: Vec<&CatalogEntry> =
        members.iter().filter(|m| m.kind == nbackup_protocol::restore::EntryKind::File && !m.lossy).collect();
    let chosen = sample(&mut candidates, files as usize);
    let mut report = RestoreTestReport { archive: archive.archive.clone(), ..Default::default() };
    if chosen.is_empty() {
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).map_err(|e| RestoreError::Extract(format!("no randomness: {e}")))?;
    let dest = workdir.join(format!("restore-test-{}-{}", archive.backup, nbackup_protocol::manifest::hex(&suffix)));
    let paths: Vec<String> = chosen.iter().map(|m| m.path.clone()).collect();
    let spec = RestoreSpec {
        which: ArchiveRef {
            storage: storage.clone(),
            backup: archive.backup.clone(),
            archive: archive.archive.clone(),
        },
        compression: archive.compression,
        dest: dest.clone(),
        selection: Selection::exact(&paths),
        overwrite: Overwrite::Never,
        dry_run: false,
    };
    let restored = restore(client, spec, Arc::new(RestoreProgress::default()), Box::new(|_| {}), cancel).await;
    let compared = restored.and_then(|outcome| {
        if outcome.verified() != Some(true) {
            return Err(RestoreError::Extract(format!("{}: sha256 differs from the manifest", archive.archive)));
        }
        for m in &chosen {
            let live = std::path::Path::new("/").join(&m.path);
            let copy = dest.join(&m.path);
            report.checked += 1;
            match compare_with_live(&live, &copy, m) {
                Ok(Compared::Identical) => report.identical += 1,
                Ok(Compared::Changed) => report.changed.push(live.display().to_string()),
                Ok(Compared::Gone) => report.gone.push(live.display().to_string()),
                Ok(Compared::Differs) => report.differing.push(live.display().to_string()),
                Err(e) => report.differing.push(format!("{} ({e})", live.display())),
            }
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dest);
    compared?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

enum Compared {
    Identical,
    Changed,
    Gone,
    Differs,
}

fn compare_with_live(live: &std::path::Path, copy: &std::path::Path, m: &CatalogEntry) -> io::Result<Compared> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(live) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Compared::Gone),
        Err(e) => return Err(e),
    };
    if !meta.is_file() || meta.len() != m.size || meta.mtime() != m.mtime {
        return Ok(Compared::Changed);
    }
    Ok(if crate::restore::same_content(copy, live)? { Compared::Identical } else { Compared::Differs })
}

/// Up to `n` of `items`, chosen uniformly at random (a partial Fisher–Yates shuffle).
fn sample<'a, T>(items: &mut [&'a T], n: usize) -> Vec<&'a T> {
    let n = n.min(items.len());
    for i in 0..n {
        let mut r = [0u8; 8];
        let _ = getrandom::fill(&mut r);
        let j = i + (u64::from_le_bytes(r) % (items.len() - i) as u64) as usize;
        items.swap(i, j);
    }
    items[..n].to_vec()
}
