//! Reading the sources ahead of the tar writer.
//!
//! The tar stream must be written in walk order, one member after another, but the
//! files need not be read that way: a pool of threads takes the walk's entries in
//! batches, `lstat`s them and reads small regular files whole, and the tar writer
//! takes the results in order. A cold cache then serves many reads at once instead
//! of one at a time (tar waits on one file at a time). What the pool found is only
//! a description of the file *as opened*: every notice the archiver gives (vanished,
//! shrank, grew, read error) keeps its meaning.

use std::collections::VecDeque;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::pool::Ordered;

/// Entries read ahead of the tar writer.
pub(super) const LOOK_AHEAD: usize = 256;
/// Entries per job of the read-ahead pool: fewer hand-offs between threads.
const BATCH: usize = 16;
/// Threads reading ahead; most of the time each waits for the disk.
const READERS: usize = 8;
/// Regular files up to this size are read whole by the read-ahead (at most
/// `LOOK_AHEAD × SMALL` = 4 MiB held); larger ones are read by the tar writer.
const SMALL: u64 = 16 * 1024;

/// What the read-ahead learned of one entry.
pub(super) struct Looked {
    /// `lstat`, as the walk lists it.
    pub lstat: io::Result<Metadata>,
    /// A small regular file, opened and read whole.
    pub small: Option<Opened<ReadAhead>>,
}

/// The walk's next item, in walk order.
#[allow(clippy::large_enum_variant)] // one lives at a time, on the stack; boxing would allocate per entry
pub(super) enum Walked {
    Entry(PathBuf, Looked),
    /// The walk could not read it (with the notice's detail).
    Failed(PathBuf, String),
}

/// A regular file opened for archiving: its metadata as opened, and its content
/// (a stream, or read ahead), or why it is skipped.
pub(super) enum Opened<T> {
    File { meta: Metadata, body: T },
    Skipped(String),
}

impl<T> Opened<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Opened<U> {
        match self {
            Opened::File { meta, body } => Opened::File { meta, body: f(body) },
            Opened::Skipped(why) => Opened::Skipped(why),
        }
    }
}

pub(super) struct ReadAhead {
    pub data: Vec<u8>,
    pub outcome: ReadOutcome,
}

/// How reading a file's content went.
pub(super) struct ReadOutcome {
    pub read: u64,
    pub error: Option<io::Error>,
    pub padded: bool,
    pub grew: bool,
}

/// Opens a regular file and describes it as opened, not as listed: it may have
/// changed in between.
pub(super) fn open_file(path: &Path) -> Opened<File> {
    let file = match open_regular(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Opened::Skipped("vanished before it could be read".into());
        }
        Err(e) => return Opened::Skipped(format!("cannot open: {e}")),
    };
    match file.metadata() {
        Ok(meta) if meta.is_file() => Opened::File { meta, body: file },
        Ok(_) => Opened::Skipped("changed type while being archived".into()),
        Err(e) => Opened::Skipped(format!("cannot stat: {e}")),
    }
}

/// Paths for the pool, and whether the listing says "regular file".
type Batch = Vec<(PathBuf, bool)>;

/// The walk's items and what the read-ahead pool found of them, in walk order.
pub(super) struct LookAhead {
    pool: Ordered<Batch, Vec<(PathBuf, Looked)>>,
    /// Walked and not yet settled, oldest first.
    items: VecDeque<Pending>,
    /// Paths not yet handed to the pool, and whether the listing says "regular file".
    batch: Batch,
    /// What the pool found of the oldest batch taken from it, in order (each path
    /// travels with its job and comes back with its result: no copy per entry).
    ready: VecDeque<(PathBuf, Looked)>,
}

enum Pending {
    Looking,
    Failed(PathBuf, String),
}

impl LookAhead {
    pub fn new() -> io::Result<Self> {
        let pool = Ordered::new(
            "nbackup-read",
            READERS,
            || (),
            |_, paths: Batch| {
                let mut parent = Parent::default();
                Ok(paths
                    .into_iter()
                    .map(|(p, file)| {
                        let looked = look(&p, file, &mut parent);
                        (p, looked)
                    })
                    .collect())
            },
        )?;
        Ok(LookAhead { pool, items: VecDeque::new(), batch: Vec::with_capacity(BATCH), ready: VecDeque::new() })
    }

    pub fn push(&mut self, item: Result<walkdir::DirEntry, walkdir::Error>, root: &Path) -> io::Result<()> {
        match item {
            Ok(entry) => {
                let file = entry.file_type().is_file();
                let path = entry.into_path();
                self.batch.push((path, file));
                self.items.push_back(Pending::Looking);
                if self.batch.len() == BATCH {
                    self.flush()?;
                }
            }
            Err(e) => {
                let path = e.path().map(Path::to_path_buf).unwrap_or_else(|| root.to_path_buf());
                let what = if e.depth() > 0 || e.io_error().is_some() { "cannot read" } else { "walk error" };
                let detail = match e.io_error() {
                    Some(io) if io.kind() == io::ErrorKind::NotFound => "vanished during the backup".to_string(),
                    Some(io) => format!("{what}: {io}"),
                    None => e.to_string(),
                };
                self.items.push_back(Pending::Failed(path, detail));
            }
        }
        Ok(())
    }

    /// Hands the paths walked so far to the pool.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.pool.push(std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH)))
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// The oldest item, waiting for the pool if need be. Only with `len() > 0`.
    pub fn next(&mut self) -> io::Result<Walked> {
        match self.items.pop_front().expect("caller checked len") {
            Pending::Failed(path, detail) => Ok(Walked::Failed(path, detail)),
            Pending::Looking => {
                if self.ready.is_empty() {
                    // Its batch is the oldest in the pool, or not handed over yet.
                    if self.pool.len() == 0 {
                        self.flush()?;
                    }
                    self.ready = self.pool.pop().expect("a batch in flight")?.into();
                }
                let (path, looked) = self.ready.pop_front().expect("one result per path");
                Ok(Walked::Entry(path, looked))
            }
        }
    }
}

/// What the read-ahead does for one entry: `lstat`, and read a small regular file
/// whole or ask the kernel to start reading a large one.
///
/// An entry the directory listing calls a regular file is opened straight away
/// (`O_NOFOLLOW | O_NONBLOCK`) and described by `fstat`: one path lookup instead of
/// two. Whatever else it has become by then is looked at with `lstat`, like every
/// other entry.
fn look(path: &Path, listed_as_file: bool, parent: &mut Parent) -> Looked {
    if listed_as_file {
        let opened = match (parent.of(path), path.file_name()) {
            (Some(dir), Some(name)) => open_regular_in(dir, name.as_ref()),
            _ => open_regular(path),
        };
        match opened {
            Ok(file) => {
                if let Ok(meta) = file.metadata()
                    && meta.is_file()
                {
                    let small = read_opened(file, meta.clone());
                    return Looked { lstat: Ok(meta), small };
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Looked { lstat: Err(e), small: None },
            // A symlink now (ELOOP), or unreadable: lstat says what it is and the
            // tar writer's own open reports why it cannot be read.
            Err(_) => {}
        }
    }
    Looked { lstat: std::fs::symlink_metadata(path), small: None }
}

/// The head of a large file the read-ahead asks the kernel to fetch early.
const WILL_NEED: u64 = 2 << 20;

/// Reads a small file whole: exactly its size as opened, less if it shrank. `None`
/// leaves the file to the tar writer: a large one (whose head the kernel is asked
/// to fetch meanwhile), or one with several links (read once, as its first name;
/// later names become hard links and need no content).
fn read_opened(file: File, meta: Metadata) -> Option<Opened<ReadAhead>> {
    if meta.nlink() > 1 {
        return None;
    }
    if meta.len() > SMALL {
        let head = std::num::NonZeroU64::new(meta.len().min(WILL_NEED));
        let _ = rustix::fs::fadvise(&file, 0, head, rustix::fs::Advice::WillNeed);
        return None;
    }
    let size = meta.len() as usize;
    // One byte more than the size as opened: a read that fills it shows the file grew,
    // and a short one is its end — no `fstat` after reading, no extra read for EOF.
    // Spare capacity, not `vec![0; n]`: nothing is zeroed only to be overwritten.
    let mut data = Vec::with_capacity(size + 1);
    let mut error = None;
    loop {
        match rustix::io::read(&file, rustix::buffer::spare_capacity(&mut data)) {
            Ok(0) => break,
            Ok(_) if data.len() >= size => break,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                error = Some(io::Error::from(e));
                break;
            }
        }
    }
    let grew = data.len() > size;
    data.truncate(size);
    let read = data.len();
    let padded = error.is_none() && read < size;
    let outcome = ReadOutcome { read: read as u64, error, padded, grew };
    Some(Opened::File { meta, body: ReadAhead { data, outcome } })
}
pub(super) fn grew(file: &File, size: u64) -> bool {
    file.metadata().map(|m| m.len() > size).unwrap_or(false)
}

/// The directory of the entries being looked at, opened once for the batch (whose
/// entries are mostly siblings in walk order): each file is then opened by its name in
/// it, one path component for the kernel to resolve instead of the whole path. Held
/// for one batch only, so a directory renamed meanwhile is seen as the walk saw it for
/// at most a batch of entries.
#[derive(Default)]
struct Parent {
    path: PathBuf,
    /// `None`: it could not be opened; its entries are opened by their whole paths,
    /// which then report what became of it.
    fd: Option<rustix::fd::OwnedFd>,
}

impl Parent {
    fn of(&mut self, path: &Path) -> Option<rustix::fd::BorrowedFd<'_>> {
        use rustix::fd::AsFd;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty())?;
        if self.path != dir {
            // Resolved as the whole path would be (symlinks before the last component
            // followed, as the walk followed its root); O_PATH reads nothing.
            let flags = rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC;
            self.fd = rustix::fs::open(dir, flags, rustix::fs::Mode::empty()).ok();
            self.path.clear();
            self.path.push(dir);
        }
        self.fd.as_ref().map(|fd| fd.as_fd())
    }
}

/// Opens a file for reading without following symlinks (a swap between listing and
/// opening cannot redirect us) and without blocking (a path replaced by a fifo would
/// otherwise hang the backup). Tries `O_NOATIME` first so backups do not touch atimes.
pub(super) fn open_regular(path: &Path) -> io::Result<File> {
    open_regular_in(rustix::fs::CWD, path)
}

/// [`open_regular`], `path` resolved from `dir`.
fn open_regular_in(dir: rustix::fd::BorrowedFd<'_>, path: &Path) -> io::Result<File> {
    use rustix::fs::OFlags;
    let base = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let open = |flags| rustix::fs::openat(dir, path, flags, rustix::fs::Mode::empty());
    match open(base | OFlags::NOATIME) {
        // O_NOATIME needs ownership or CAP_FOWNER.
        Err(rustix::io::Errno::PERM) => open(base),
        other => other,
    }
    .map(File::from)
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileTypeExt;

    /// Opens `content` as a file and reads it as the read-ahead does, after `change`
    /// has altered it between the `fstat` and the read.
    fn read_changed(content: &[u8], change: impl FnOnce(&mut File)) -> (Vec<u8>, ReadOutcome) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, content).expect("write");
        let file = open_regular(&path).expect("open");
        let meta = file.metadata().expect("fstat");
        let mut writer = std::fs::OpenOptions::new().write(true).open(&path).expect("open for writing");
        change(&mut writer);
        match read_opened(file, meta) {
            Some(Opened::File { body: ReadAhead { data, outcome }, .. }) => (data, outcome),
            _ => panic!("a small file is read ahead"),
        }
    }

    #[test]
    fn a_small_file_is_read_whole_at_its_size_as_opened() {
        for content in [&b""[..], b"x", &[7u8; 4096], &[9u8; SMALL as usize]] {
            let (data, outcome) = read_changed(content, |_| {});
            assert_eq!(data, content);
            assert_eq!(outcome.read, content.len() as u64);
            assert!(outcome.error.is_none() && !outcome.padded && !outcome.grew, "{} bytes", content.len());
        }
    }

    #[test]
    fn a_small_file_that_grew_keeps_its_size_as_opened_and_says_so() {
        for content in [&b""[..], b"abc", &[5u8; 8000]] {
            let (data, outcome) = read_changed(content, |f| {
                use std::io::Seek;
                f.seek(io::SeekFrom::End(0)).expect("seek");
                f.write_all(b"more").expect("grow");
            });
            assert_eq!(data, content, "exactly the bytes it had when opened");
            assert!(outcome.grew && !outcome.padded && outcome.error.is_none());
        }
    }

    #[test]
    fn a_small_file_that_shrank_is_marked_for_padding() {
        let (data, outcome) = read_changed(&[3u8; 5000], |f| f.set_len(1000).expect("truncate"));
        assert_eq!(data, [3u8; 1000]);
        assert_eq!(outcome.read, 1000);
        assert!(outcome.padded && !outcome.grew && outcome.error.is_none());
    }

    /// What one batch's reader finds of each path, all listed as regular files.
    fn look_all(paths: &[PathBuf]) -> Vec<Looked> {
        let mut parent = Parent::default();
        paths.iter().map(|p| look(p, true, &mut parent)).collect()
    }

    #[test]
    fn entries_are_opened_by_name_in_their_directory_as_their_whole_paths_would_be() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        std::fs::create_dir_all(real.join("sub")).expect("mkdir");
        std::fs::write(real.join("a"), b"alpha").expect("write");
        std::fs::write(real.join("sub/b"), b"beta").expect("write");
        std::fs::write(dir.path().join("outside"), b"secret").expect("write");
        // A source given through a symlinked directory is followed, as the walk follows its root.
        std::os::unix::fs::symlink(&real, dir.path().join("via")).expect("symlink");
        // Listed as files, then replaced: by a symlink (never followed) and by a fifo (never waited on).
        std::os::unix::fs::symlink(dir.path().join("outside"), real.join("swapped")).expect("symlink");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            real.join("fifo").as_path(),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        let via = dir.path().join("via");
        let paths = [
            via.join("a"),
            via.join("sub/b"),
            via.join("swapped"),
            via.join("fifo"),
            via.join("gone"),
            dir.path().join("no-such-dir/c"),
            real.join("a"),
        ];
        let looked = look_all(&paths);
        let content = |l: &Looked| match &l.small {
            Some(Opened::File { body, .. }) => Some(body.data.clone()),
            _ => None,
        };
        assert_eq!(content(&looked[0]).as_deref(), Some(&b"alpha"[..]));
        assert_eq!(content(&looked[1]).as_deref(), Some(&b"beta"[..]));
        assert!(looked[2].lstat.as_ref().expect("lstat").file_type().is_symlink());
        assert!(content(&looked[2]).is_none(), "a symlink's target is not read");
        assert!(looked[3].lstat.as_ref().expect("lstat").file_type().is_fifo());
        assert!(content(&looked[3]).is_none());
        for gone in &looked[4..6] {
            assert_eq!(gone.lstat.as_ref().err().map(io::Error::kind), Some(io::ErrorKind::NotFound));
        }
        assert_eq!(content(&looked[6]).as_deref(), Some(&b"alpha"[..]));
    }
}
