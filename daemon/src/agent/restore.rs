//! A restore from start to finish: choose the archive, plan from its catalog, fetch
//! it (resumably) while a blocking thread decompresses and extracts it, and check the
//! whole file's SHA-256 against the manifest.
//!
//! ```text
//! server ─RSTR─▶ fetch task (CRC, offset, SHA-256) ─▶ channel ─▶ extraction thread
//!                                                               (zstd/gzip ─▶ tar ─▶ safe writes)
//! ```

use std::io::{self, BufReader, Read as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use nbackup_protocol::restore::{BlockIndex, CatalogEntry, CatalogLine, EntryKind, Extent, Part, RemoteArchive};
use nbackup_protocol::wire::Compression;

use super::fetch::{ArchiveRef, ChannelReader, FETCH_BUFFER, FetchError, Fetched, RestoreClient};
use crate::restore::{
    Action, DirMeta, ExtractOptions, ExtractProgress, ExtractReport, Overwrite, Planned, Selection, plan,
};

/// What to restore, where, and how.
pub struct RestoreSpec {
    pub which: ArchiveRef,
    pub compression: Compression,
    /// The archive's size (from the listing).
    pub size: u64,
    pub dest: PathBuf,
    pub selection: Selection,
    pub overwrite: Overwrite,
    pub dry_run: bool,
}

impl RestoreSpec {
    /// The whole archive into a new directory: nothing overwritten, for real.
    pub fn everything(which: ArchiveRef, compression: Compression, size: u64, dest: PathBuf) -> Self {
        RestoreSpec {
            which,
            compression,
            size,
            dest,
            selection: Selection::all(),
            overwrite: Overwrite::Never,
            dry_run: false,
        }
    }
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
    /// How the archive was read; `None` for a dry run answered from the catalog.
    pub read: Option<Read>,
    pub dry_run: bool,
    pub seconds: f64,
}

/// How a restore read the archive.
#[derive(Debug, Clone)]
pub enum Read {
    /// All of it, its SHA-256 compared with the manifest's.
    Whole(Fetched),
    /// Only the blocks holding the selected members, each checked by its own checksum.
    Extents(Extents),
}

/// The blocks a restore read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extents {
    /// Ranges fetched.
    pub extents: u64,
    /// Compressed bytes fetched, of the archive's `of`.
    pub bytes: u64,
    pub of: u64,
    pub resumed: u32,
}

impl RestoreOutcome {
    /// Whether the whole archive matched the manifest's SHA-256; `None` when it was
    /// not read whole (a dry run, or a restore of some blocks).
    pub fn verified(&self) -> Option<bool> {
        match &self.read {
            Some(Read::Whole(f)) => Some(f.verified()),
            _ => None,
        }
    }

    /// The whole-archive fetch, if there was one.
    pub fn fetched(&self) -> Option<&Fetched> {
        match &self.read {
            Some(Read::Whole(f)) => Some(f),
            _ => None,
        }
    }

    /// Compressed bytes fetched.
    pub fn bytes_fetched(&self) -> u64 {
        match &self.read {
            Some(Read::Whole(f)) => f.size,
            Some(Read::Extents(x)) => x.bytes,
            None => 0,
        }
    }

    /// Connections the fetch took beyond the first (per range).
    pub fn resumed(&self) -> u32 {
        match &self.read {
            Some(Read::Whole(f)) => f.resumed,
            Some(Read::Extents(x)) => x.resumed,
            None => 0,
        }
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

/// Threads inflating gzip members: all cores, the restore is what this host is doing.
fn decode_workers() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
}

/// Bytes per block handed from the decompression thread to the extraction thread.
const DECODED_BLOCK: usize = 1 << 20;

/// Fetches `part` of `which` while `consume` reads it, in order, on a blocking
/// thread. When both fail, the consumer's error is the cause (a consumer that stops
/// reading stops the fetch); its message names the part that could not be read.
async fn fetch_with<T: Send + 'static>(
    client: &RestoreClient,
    which: &ArchiveRef,
    part: Part,
    range: std::ops::Range<u64>,
    received: &AtomicU64,
    cancel: &CancellationToken,
    consume: impl FnOnce(ChannelReader) -> io::Result<T> + Send + 'static,
) -> Result<(T, Fetched), RestoreError> {
    let what = match part {
        Part::Archive => "the archive cannot be read",
        Part::Catalog => "the catalog is unreadable",
    };
    let (tx, rx) = tokio::sync::mpsc::channel(FETCH_BUFFER);
    let consumer = tokio::task::spawn_blocking(move || consume(ChannelReader::new(rx)));
    let fetched = client.fetch_range(which, part, range, &tx, received, cancel).await;
    drop(tx);
    let consumed = consumer.await.map_err(|e| RestoreError::Task(e.to_string()))?;
    match (consumed, fetched) {
        (Ok(t), Ok(f)) => Ok((t, f)),
        (Err(e), Ok(_) | Err(FetchError::Cancelled)) => Err(RestoreError::Extract(format!("{what}: {e}"))),
        (_, Err(f)) => Err(RestoreError::Fetch(f)),
    }
}

/// An archive's catalog as read: its members in archive order and, for archives
/// made since block indexes were recorded, where the blocks start.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub entries: Vec<CatalogEntry>,
    pub blocks: Option<BlockIndex>,
}

/// Fetches and decodes an archive's catalog; `None` when it has none.
pub async fn catalog(
    client: &RestoreClient,
    archive: &RemoteArchive,
    storage: &nbackup_protocol::Name,
    cancel: &CancellationToken,
) -> Result<Option<Catalog>, RestoreError> {
    if archive.catalog.is_none() {
        return Ok(None);
    }
    let which =
        ArchiveRef { storage: storage.clone(), backup: archive.backup.clone(), archive: archive.archive.clone() };
    let received = AtomicU64::new(0);
    let parse = |raw: ChannelReader| -> io::Result<Catalog> {
        let lines = zstd::stream::read::Decoder::new(raw)?;
        let mut out = Catalog { entries: Vec::new(), blocks: None };
        for line in io::BufRead::lines(BufReader::new(lines)) {
            match CatalogLine::parse(&line?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
                CatalogLine::Entry(e) => out.entries.push(e),
                CatalogLine::Blocks(b) => out.blocks = Some(b),
            }
        }
        Ok(out)
    };
    let (catalog, _) = fetch_with(client, &which, Part::Catalog, 0..u64::MAX, &received, cancel, parse).await?;
    Ok(Some(catalog))
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
///
/// With a catalog that has a block index, a selection whose members sit in less
/// than half of the archive is restored by fetching only the blocks that hold them
/// (each block's own checksum is checked: gzip CRC-32, zstd frame checksum); the
/// whole archive is fetched otherwise, and then checked against the manifest's
/// SHA-256.
pub async fn restore(
    client: &RestoreClient,
    spec: RestoreSpec,
    catalog: Option<Arc<Catalog>>,
    progress: Arc<RestoreProgress>,
    mut on_entry: OnEntry,
    cancel: &CancellationToken,
) -> Result<RestoreOutcome, RestoreError> {
    let started = Instant::now();
    let plan = catalog.as_deref().and_then(|c| seek_plan(c, &spec.selection, spec.size));
    let (report, read) = match plan {
        Some((extents, known_dirs)) => {
            let members = catalog.as_deref().map_or(0, |c| c.entries.len() as u64);
            let (mut report, read) =
                restore_extents(client, &spec, extents, known_dirs, &progress, on_entry, cancel).await?;
            report.members = members;
            (report, read)
        }
        None => {
            let job = Unpack::of(&spec, Vec::new(), progress.clone());
            let whole = 0..u64::MAX;
            let consume = move |raw: ChannelReader| job.run(raw, 0, u64::MAX, &mut *on_entry);
            let (report, fetched) =
                fetch_with(client, &spec.which, Part::Archive, whole, &progress.received, cancel, consume).await?;
            (report, Read::Whole(fetched))
        }
    };
    Ok(RestoreOutcome {
        archive: spec.which.archive,
        report,
        read: Some(read),
        dry_run: spec.dry_run,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Compressed bytes between two wanted extents below which one read covers both.
const SEEK_GAP: u64 = 4 << 20;

/// The extents holding the members `selection` picks, and the catalog's metadata of
/// the directories above them; `None` when reading the whole archive is better (no
/// block index, everything selected, or the members span half the archive or more).
fn seek_plan(catalog: &Catalog, selection: &Selection, size: u64) -> Option<(Vec<Extent>, Vec<DirMeta>)> {
    let blocks = catalog.blocks.as_ref()?;
    let entries = &catalog.entries;
    if selection.is_all() || !entries.windows(2).all(|w| w[0].offset < w[1].offset) {
        return None;
    }
    let mut ranges = Vec::new();
    let mut parents = std::collections::BTreeSet::new();
    for (i, e) in entries.iter().enumerate().filter(|(_, e)| selection.matches(&e.path)) {
        // A member ends where the next one's first header starts.
        ranges.push((e.offset, entries.get(i + 1).map_or(u64::MAX, |next| next.offset)));
        parents.extend(std::path::Path::new(&e.path).ancestors().skip(1).map(std::path::Path::to_path_buf));
    }
    if ranges.is_empty() {
        return None;
    }
    let extents = blocks.extents(&ranges, size, SEEK_GAP)?;
    let bytes: u64 = extents.iter().map(|x| x.end - x.start).sum();
    if bytes.saturating_mul(2) >= size {
        return None;
    }
    let known_dirs = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Dir && parents.contains(std::path::Path::new(&e.path)))
        .map(DirMeta::from_catalog)
        .collect();
    Some((extents, known_dirs))
}

/// Fetches and extracts each extent in turn.
async fn restore_extents(
    client: &RestoreClient,
    spec: &RestoreSpec,
    extents: Vec<Extent>,
    known_dirs: Vec<DirMeta>,
    progress: &Arc<RestoreProgress>,
    mut on_entry: OnEntry,
    cancel: &CancellationToken,
) -> Result<(ExtractReport, Read), RestoreError> {
    let mut report = ExtractReport::default();
    let mut read = Extents { extents: extents.len() as u64, bytes: 0, of: spec.size, resumed: 0 };
    for x in extents {
        let job = Unpack::of(spec, known_dirs.clone(), progress.clone());
        let consume = move |raw: ChannelReader| {
            let r = job.run(raw, x.from - x.tar_offset, x.to.saturating_sub(x.from), &mut *on_entry);
            r.map(|r| (r, on_entry))
        };
        let received = AtomicU64::new(0);
        let ((part, back), fetched) =
            fetch_with(client, &spec.which, Part::Archive, x.start..x.end, &received, cancel, consume).await?;
        on_entry = back;
        progress.received.fetch_add(x.end - x.start, Ordering::Relaxed);
        read.bytes += x.end - x.start;
        read.resumed += fetched.resumed;
        report.add(part);
    }
    Ok((report, Read::Extents(read)))
}

/// One decompress-and-extract job: what it needs, owned, for its blocking thread.
struct Unpack {
    compression: Compression,
    dest: PathBuf,
    selection: Selection,
    overwrite: Overwrite,
    dry_run: bool,
    known_dirs: Vec<DirMeta>,
    progress: Arc<RestoreProgress>,
}

impl Unpack {
    fn of(spec: &RestoreSpec, known_dirs: Vec<DirMeta>, progress: Arc<RestoreProgress>) -> Self {
        Unpack {
            compression: spec.compression,
            dest: spec.dest.clone(),
            selection: spec.selection.clone(),
            overwrite: spec.overwrite,
            dry_run: spec.dry_run,
            known_dirs,
            progress,
        }
    }

    /// Decompresses `raw`, skips `skip` tar bytes, and extracts from the next `len`
    /// (`u64::MAX`: all); the rest is decompressed too, so every block's checksum is
    /// checked and the fetch can finish.
    fn run(
        self,
        raw: ChannelReader,
        skip: u64,
        len: u64,
        on_entry: &mut dyn FnMut(&Planned),
    ) -> io::Result<ExtractReport> {
        // Decompression and extraction on two threads, like `zstd -d | tar -x`: each
        // would otherwise wait for the other.
        let (decoded_tx, decoded_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(FETCH_BUFFER);
        let compression = self.compression;
        std::thread::scope(|scope| {
            let decoding = scope.spawn(move || -> io::Result<()> {
                let raw = BufReader::with_capacity(1 << 20, raw);
                let mut input = crate::codec::decoder(raw, compression, decode_workers())?;
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
                io::copy(&mut (&mut input).take(skip), &mut io::sink())?;
                let mut opts = ExtractOptions {
                    selection: &self.selection,
                    overwrite: self.overwrite,
                    dry_run: self.dry_run,
                    on_entry,
                    progress: Some(&self.progress.written),
                    known_dirs: self.known_dirs,
                };
                let report = if len == u64::MAX {
                    crate::restore::extract_stream(&mut input, &self.dest, &mut opts)?
                } else {
                    // The members wanted, then an end-of-archive marker of our own.
                    let wanted = (&mut input).take(len).chain(io::repeat(0).take(1024));
                    crate::restore::extract_stream(wanted, &self.dest, &mut opts)?
                };
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
    }
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
        let input = crate::codec::decoder(BufReader::with_capacity(1 << 20, raw), compression, decode_workers())?;
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
    Ok(fetch_with(client, which, Part::Archive, 0..u64::MAX, &received, cancel, walk).await?.0)
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
/// removes the directory. Only the blocks holding the chosen files are fetched when
/// the archive has a block index.
pub async fn restore_test(
    client: &RestoreClient,
    storage: &nbackup_protocol::Name,
    archive: &RemoteArchive,
    files: u32,
    workdir: &std::path::Path,
    cancel: &CancellationToken,
) -> Result<RestoreTestReport, RestoreError> {
    let started = Instant::now();
    let Some(catalog) = catalog(client, archive, storage, cancel).await?.map(Arc::new) else {
        return Err(RestoreError::Extract(format!(
            "{} has no catalog; restore tests need one (archives made by this version have it)",
            archive.archive
        )));
    };
    let mut candidates: Vec<&CatalogEntry> =
        catalog.entries.iter().filter(|m| m.kind == EntryKind::File && !m.lossy).collect();
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
    let which =
        ArchiveRef { storage: storage.clone(), backup: archive.backup.clone(), archive: archive.archive.clone() };
    let spec = RestoreSpec {
        selection: Selection::exact(&paths),
        ..RestoreSpec::everything(which, archive.compression, archive.size, dest.clone())
    };
    let progress = Arc::new(RestoreProgress::default());
    let restored = restore(client, spec, Some(catalog.clone()), progress, Box::new(|_| {}), cancel).await;
    let compared = restored.and_then(|outcome| {
        if outcome.verified() == Some(false) {
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
