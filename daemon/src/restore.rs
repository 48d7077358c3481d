//! Reading archives back: verify a stored archive against its manifest, extract it,
//! and compare a restored tree with its source, metadata included.
//!
//! Extraction never leaves its destination: members with absolute paths or `..` are
//! refused, and every parent directory is opened from the destination with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, one component at a time, so a
//! crafted archive that plants `a -> /etc` and then sends `a/x` is refused instead of
//! writing into `/etc`. It recreates fifos and device nodes (tar-rs would write them
//! as plain files), and applies directory modes and mtimes last, deepest first, so
//! that creating children does not disturb them and read-only directories can be
//! filled.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::EntryType;

use nbackup_protocol::config::Excludes;
use nbackup_protocol::manifest::{Manifest, hex};
use nbackup_protocol::restore::EntryKind;

/// Recomputes an archive's SHA-256 and size and checks them against its manifest.
pub fn verify_against_manifest(archive: &Path, manifest: &Manifest) -> io::Result<Result<(), String>> {
    let mut f = File::open(archive)?;
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        size += n as u64;
    }
    Ok(matches_manifest(size, &hex(&sha.finalize()), manifest))
}

/// Whether a size and a hex SHA-256 are the manifest's.
pub fn matches_manifest(size: u64, sha256: &str, manifest: &Manifest) -> Result<(), String> {
    if size != manifest.size {
        Err(format!("size {size} differs from manifest {}", manifest.size))
    } else if sha256 != manifest.sha256 {
        Err(format!("sha256 {sha256} differs from manifest {}", manifest.sha256))
    } else {
        Ok(())
    }
}

/// Whether this process may restore ownership (and create device nodes).
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Joins a member path onto `dest`, refusing anything that could escape it.
pub(crate) fn safe_join(dest: &Path, member: &Path) -> io::Result<PathBuf> {
    let mut out = dest.to_path_buf();
    for c in member.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("refusing member {} outside the destination", member.display()),
                ));
            }
        }
    }
    Ok(out)
}

fn escape(member: &Path, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("refusing member {}: {why}", member.display()))
}

/// Opens (creating what is missing, mode 0700 until its own entry sets it) the
/// directory `rel` below `root`, never through a symlink and never outside `root`.
fn dir_beneath(root: &fs::File, rel: &Path, member: &Path) -> io::Result<rustix::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags, mkdirat, openat2};
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let mut dir = openat2(root, ".", flags, Mode::empty(), resolve).map_err(io::Error::from)?;
    for c in rel.components() {
        let Component::Normal(name) = c else {
            if c == Component::CurDir {
                continue;
            }
            return Err(escape(member, "outside the destination"));
        };
        match mkdirat(&dir, name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        dir = match openat2(&dir, name, flags, Mode::empty(), resolve) {
            Ok(d) => d,
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::XDEV) => {
                return Err(escape(member, &format!("its parent {} is a symbolic link", rel.display())));
            }
            Err(rustix::io::Errno::NOTDIR) => {
                let link = rustix::fs::statat(&dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Symlink);
                let what = if link { "a symbolic link" } else { "not a directory" };
                return Err(escape(member, &format!("its parent {} is {what}", rel.display())));
            }
            Err(e) => return Err(e.into()),
        };
    }
    Ok(dir)
}

/// What to do with a member whose target already exists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overwrite {
    /// Leave it, and report the member as not restored (the default).
    #[default]
    Never,
    /// Replace it when it is older (mtime) than the member.
    Older,
    /// Replace it.
    Always,
}

/// Which members a restore wants: plain paths (the member and everything below it)
/// and globs (`*` and `?` stay within one path component, `**` crosses them), matched
/// against the member name or any of its parent directories. A leading `/` is
/// ignored: members are stored without it. Empty means everything.
#[derive(Clone, Debug)]
pub struct Selection {
    paths: Vec<String>,
    globs: globset::GlobSet,
    has_globs: bool,
}

impl Selection {
    pub fn all() -> Self {
        Selection { paths: Vec::new(), globs: globset::GlobSet::empty(), has_globs: false }
    }

    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let mut paths = Vec::new();
        let mut globs = globset::GlobSetBuilder::new();
        let mut has_globs = false;
        for p in patterns {
            let p = p.trim_start_matches('/').trim_end_matches('/');
            if p.is_empty() {
                return Ok(Selection::all());
            }
            if p.contains(['*', '?', '[', '{']) {
                let glob = globset::GlobBuilder::new(p)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| format!("bad pattern {p:?}: {e}"))?;
                globs.add(glob);
                has_globs = true;
            } else {
                paths.push(p.to_owned());
            }
        }
        let globs = globs.build().map_err(|e| format!("bad patterns: {e}"))?;
        Ok(Selection { paths, globs, has_globs })
    }

    /// Exactly these member names (and what is below them), never read as globs.
    pub fn exact(paths: &[String]) -> Self {
        let paths = paths.iter().map(|p| p.trim_start_matches('/').trim_end_matches('/').to_owned()).collect();
        Selection { paths, globs: globset::GlobSet::empty(), has_globs: false }
    }

    pub fn is_all(&self) -> bool {
        self.paths.is_empty() && !self.has_globs
    }

    /// Whether `member` (a stored name, no leading `/`) is selected.
    pub fn matches(&self, member: &str) -> bool {
        if self.is_all() {
            return true;
        }
        let member = member.trim_end_matches('/');
        if self.paths.iter().any(|p| member == p || member.strip_prefix(p.as_str()).is_some_and(|r| r.starts_with('/')))
        {
            return true;
        }
        if !self.has_globs {
            return false;
        }
        // The member itself or a parent directory of it.
        let mut candidate = member;
        loop {
            if self.globs.is_match(candidate) {
                return true;
            }
            match candidate.rfind('/') {
                Some(i) => candidate = &candidate[..i],
                None => return false,
            }
        }
    }
}

/// What a restore does with one selected member.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "action", content = "reason", rename_all = "snake_case")]
pub enum Action {
    /// Nothing there: created.
    Create,
    /// A directory that exists: kept, its metadata set from the archive.
    Merge,
    /// Something there, replaced (`--overwrite older|always`).
    Replace,
    /// Something there, left alone (`--overwrite never`, or it is newer).
    Keep,
    /// Not restored, and why (outside the destination, through a symlink, …).
    Refuse(String),
    /// Could not be written (permissions, a missing hard-link target, …).
    Fail(String),
}

impl Action {
    pub fn restored(&self) -> bool {
        matches!(self, Action::Create | Action::Merge | Action::Replace)
    }
}

/// One selected member and what became (or, dry, would become) of it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Planned {
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    #[serde(flatten)]
    pub action: Action,
}

/// How to extract.
pub struct ExtractOptions<'a> {
    pub selection: &'a Selection,
    pub overwrite: Overwrite,
    /// Decide and report every member, write nothing.
    pub dry_run: bool,
    /// Told about every selected member, in archive order.
    pub on_entry: &'a mut dyn FnMut(&Planned),
    /// What has been written so far, for progress displays.
    pub progress: Option<&'a ExtractProgress>,
    /// Directories not in `input` whose metadata a parent made for a selected member
    /// should get (a restore that reads only some blocks knows them from the catalog).
    pub known_dirs: Vec<DirMeta>,
}

/// Counters an extraction advances as it goes.
#[derive(Debug, Default)]
pub struct ExtractProgress {
    /// Members restored.
    pub members: std::sync::atomic::AtomicU64,
    /// Bytes of file content written.
    pub bytes: std::sync::atomic::AtomicU64,
}

/// What an extraction did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExtractReport {
    /// Members in the archive.
    pub members: u64,
    /// Members the selection chose.
    pub selected: u64,
    pub restored: u64,
    /// Bytes of file content restored.
    pub bytes: u64,
    pub kept: u64,
    pub refused: u64,
    pub failed: u64,
    /// The first problems, in words (at most [`PROBLEMS_KEPT`]).
    pub problems: Vec<String>,
}

/// Problems an [`ExtractReport`] keeps in words.
pub const PROBLEMS_KEPT: usize = 20;

impl Planned {
    /// Bytes of file content this member restores.
    pub fn content_bytes(&self) -> u64 {
        if self.kind == EntryKind::File && self.action.restored() { self.size } else { 0 }
    }
}

impl ExtractReport {
    /// Counts one selected member by what became of it.
    pub fn count(&mut self, p: &Planned) {
        self.selected += 1;
        self.bytes += p.content_bytes();
        let why = match &p.action {
            a if a.restored() => {
                self.restored += 1;
                return;
            }
            Action::Keep => {
                self.kept += 1;
                return;
            }
            Action::Refuse(why) => {
                self.refused += 1;
                why
            }
            Action::Fail(why) => {
                self.failed += 1;
                why
            }
            Action::Create | Action::Merge | Action::Replace => return,
        };
        if self.problems.len() < PROBLEMS_KEPT {
            self.problems.push(why.clone());
        }
    }

    /// Adds the counts of another extraction of the same restore.
    pub fn add(&mut self, other: ExtractReport) {
        self.members += other.members;
        self.selected += other.selected;
        self.restored += other.restored;
        self.bytes += other.bytes;
        self.kept += other.kept;
        self.refused += other.refused;
        self.failed += other.failed;
        let room = PROBLEMS_KEPT.saturating_sub(self.problems.len());
        self.problems.extend(other.problems.into_iter().take(room));
    }
}

/// The catalog's kind of a tar entry type.
pub fn kind_of(t: EntryType) -> EntryKind {
    match t {
        EntryType::Regular | EntryType::Continuous => EntryKind::File,
        EntryType::Directory => EntryKind::Dir,
        EntryType::Symlink => EntryKind::Symlink,
        EntryType::Link => EntryKind::HardLink,
        EntryType::Fifo => EntryKind::Fifo,
        EntryType::Char => EntryKind::CharDevice,
        EntryType::Block => EntryKind::BlockDevice,
        _ => EntryKind::Other,
    }
}

/// What restoring a member of `kind` with `mtime` at `dest/rel` would do, from what
/// is there now. Pure apart from one `lstat`; shared by the dry run (from the
/// catalog or the archive) and the extraction.
pub fn plan(dest: &Path, rel: &Path, kind: EntryKind, mtime: i64, overwrite: Overwrite) -> Action {
    let existing = match fs::symlink_metadata(dest.join(rel)) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Action::Create,
        // A parent that is a file, say: the write will say what is wrong.
        Err(_) => return Action::Create,
    };
    let is_dir = existing.file_type().is_dir();
    if kind == EntryKind::Dir && is_dir {
        return Action::Merge;
    }
    let replace = match overwrite {
        Overwrite::Never => false,
        Overwrite::Older => existing.mtime() < mtime,
        Overwrite::Always => true,
    };
    if !replace {
        Action::Keep
    } else if is_dir {
        Action::Refuse("a directory is in the way (not replaced by a non-directory)".into())
    } else {
        Action::Replace
    }
}

/// A directory's archived metadata, applied after its contents are written.
#[derive(Clone, Debug)]
pub struct DirMeta {
    /// Relative to the destination.
    path: PathBuf,
    mode: u32,
    mtime: i64,
    uid: u32,
    gid: u32,
}

impl DirMeta {
    pub fn from_catalog(e: &nbackup_protocol::restore::CatalogEntry) -> Self {
        DirMeta { path: PathBuf::from(&e.path), mode: e.mode, mtime: e.mtime, uid: e.uid as u32, gid: e.gid as u32 }
    }
}

/// Extracts the tar stream `input` (already decompressed) into `dest`, created if
/// missing: the selected members, never outside `dest`, existing files per
/// `overwrite`. A member that cannot be restored is reported and skipped; only a
/// damaged stream ends the extraction with an error. Ownership is restored when
/// running as root; directory metadata last, deepest first.
pub fn extract_stream<R: Read>(input: R, dest: &Path, opts: &mut ExtractOptions<'_>) -> io::Result<ExtractReport> {
    if !opts.dry_run {
        fs::create_dir_all(dest)?;
    }
    let mut root = if opts.dry_run { None } else { Some(Beneath::open(dest)?) };
    let as_root = running_as_root();
    let mut ar = tar::Archive::new(input);
    let mut report = ExtractReport::default();
    let mut dirs: Vec<DirMeta> = Vec::new();
    // Directories the selection left out, in case a selected member needs them made.
    let mut unselected_dirs: HashMap<PathBuf, DirMeta> =
        opts.known_dirs.drain(..).map(|d| (d.path.clone(), d)).collect();
    let mut made: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    for entry in ar.entries()? {
        let mut entry = entry?;
        report.members += 1;
        let header = entry.header().clone();
        let member = entry.path()?.into_owned();
        let name = member.to_string_lossy().into_owned();
        let kind = kind_of(header.entry_type());
        let size = header.size()?;
        let mtime = header.mtime()? as i64;
        let meta = |path: PathBuf| -> io::Result<DirMeta> {
            Ok(DirMeta {
                path,
                mode: header.mode()? & 0o7777,
                mtime,
                uid: header.uid()? as u32,
                gid: header.gid()? as u32,
            })
        };
        if !opts.selection.matches(&name) {
            if kind == EntryKind::Dir
                && let Ok(target) = safe_join(dest, &member)
                && let Ok(rel) = target.strip_prefix(dest)
            {
                unselected_dirs.insert(rel.to_path_buf(), meta(rel.to_path_buf())?);
            }
            continue;
        }
        let action = match safe_join(dest, &member) {
            Err(e) => Action::Refuse(e.to_string()),
            Ok(target) => {
                let rel = target.strip_prefix(dest).unwrap_or(&target).to_path_buf();
                let action = plan(dest, &rel, kind, mtime, opts.overwrite);
                match (&mut root, &action) {
                    (Some(root), Action::Create | Action::Merge | Action::Replace) => {
                        // Parents this member makes that the archive describes get their
                        // metadata too.
                        let mut parents = Vec::new();
                        for anc in rel.ancestors().skip(1) {
                            if anc.as_os_str().is_empty() || made.contains(anc) {
                                break;
                            }
                            made.insert(anc.to_path_buf());
                            if unselected_dirs.contains_key(anc) && fs::symlink_metadata(dest.join(anc)).is_err() {
                                parents.push(anc.to_path_buf());
                            }
                        }
                        let replace = action == Action::Replace;
                        match write_member(root, &mut entry, &header, &member, &rel, replace, as_root) {
                            Ok(()) => {
                                dirs.extend(parents.iter().filter_map(|p| unselected_dirs.remove(p)));
                                if kind == EntryKind::Dir {
                                    dirs.push(meta(rel)?);
                                }
                                action
                            }
                            Err(e) if e.kind() == io::ErrorKind::InvalidData => Action::Refuse(e.to_string()),
                            Err(e) => Action::Fail(format!("{}: {e}", member.display())),
                        }
                    }
                    _ => action,
                }
            }
        };
        let planned = Planned { path: name, kind, size, action };
        report.count(&planned);
        if let Some(p) = opts.progress.filter(|_| planned.action.restored()) {
            p.members.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            p.bytes.fetch_add(planned.content_bytes(), std::sync::atomic::Ordering::Relaxed);
        }
        (opts.on_entry)(&planned);
    }
    // Deepest first, so a parent's mtime is set after its children were created.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.path.components().count()));
    if let Some(at) = &root {
        for d in dirs {
            if let Err(e) = set_dir_meta(&at.root, &d, as_root) {
                report.failed += 1;
                if report.problems.len() < PROBLEMS_KEPT {
                    report.problems.push(format!("{}: cannot set its metadata: {e}", d.path.display()));
                }
            }
        }
    }
    Ok(report)
}

/// Sets a restored directory's owner, mode and mtime through a descriptor opened
/// beneath the destination without following a symlink.
fn set_dir_meta(root: &fs::File, d: &DirMeta, as_root: bool) -> io::Result<()> {
    use rustix::fs::{Mode, OFlags, ResolveFlags, Timespec, Timestamps};
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let rel = if d.path.as_os_str().is_empty() { Path::new(".") } else { &d.path };
    let fd = rustix::fs::openat2(root, rel, flags, Mode::empty(), resolve).map_err(io::Error::from)?;
    if as_root {
        rustix::fs::fchown(&fd, Some(rustix::fs::Uid::from_raw(d.uid)), Some(rustix::fs::Gid::from_raw(d.gid)))
            .map_err(io::Error::from)?;
    }
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(d.mode)).map_err(io::Error::from)?;
    let t = Timespec { tv_sec: d.mtime, tv_nsec: 0 };
    rustix::fs::futimens(&fd, &Timestamps { last_access: t, last_modification: t }).map_err(io::Error::from)
}

/// The destination and the directory the last member was written in: archives list
/// members in walk order, so most share their predecessor's parent and the
/// component-by-component open beneath the root happens once per directory, not
/// once per file. A cached descriptor names the directory itself, so nothing the
/// archive does to names later can redirect it.
struct Beneath {
    root: fs::File,
    path: PathBuf,
    parent: Option<(PathBuf, rustix::fd::OwnedFd)>,
}

impl Beneath {
    fn open(dest: &Path) -> io::Result<Self> {
        Ok(Beneath { root: fs::File::open(dest)?, parent: None, path: dest.to_path_buf() })
    }

    fn root_path(&self) -> &Path {
        &self.path
    }

    fn parent_of(&mut self, rel: &Path, member: &Path) -> io::Result<&rustix::fd::OwnedFd> {
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        if self.parent.as_ref().is_none_or(|(p, _)| p != parent_rel) {
            let fd = dir_beneath(&self.root, parent_rel, member)?;
            self.parent = Some((parent_rel.to_path_buf(), fd));
        }
        Ok(&self.parent.as_ref().expect("just set").1)
    }
}

/// Bytes per write of a restored file's content.
const WRITE_BLOCK: usize = 256 * 1024;

/// Writes one member below the destination, every name created relative to a
/// parent opened without following a symlink (`O_EXCL`/`O_NOFOLLOW`, `*at` calls),
/// metadata set through the new file's own descriptor. Refusals come back as
/// `InvalidData`.
fn write_member<R: Read>(
    at: &mut Beneath,
    entry: &mut tar::Entry<'_, R>,
    header: &tar::Header,
    member: &Path,
    rel: &Path,
    replace: bool,
    as_root: bool,
) -> io::Result<()> {
    use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};
    let name = rel.file_name().ok_or_else(|| escape(member, "no name"))?.to_owned();
    let mode = Mode::from_raw_mode(header.mode()? & 0o7777);
    let t = Timespec { tv_sec: header.mtime()? as i64, tv_nsec: 0 };
    let times = Timestamps { last_access: t, last_modification: t };
    let owner = as_root.then(|| -> io::Result<_> {
        Ok((
            Some(rustix::fs::Uid::from_raw(header.uid()? as u32)),
            Some(rustix::fs::Gid::from_raw(header.gid()? as u32)),
        ))
    });
    let owner = owner.transpose()?;
    let kind = header.entry_type();
    // A hard link's source must be inside too, reached without symlinks.
    let link_source = match kind {
        EntryType::Link => {
            let link = entry.link_name()?.ok_or_else(|| escape(member, "a hard link without a target"))?;
            let source = safe_join(at.root_path(), &link)?;
            let source_rel = source.strip_prefix(at.root_path()).map_err(|_| escape(member, "link outside"))?;
            let source_name = source_rel.file_name().ok_or_else(|| escape(member, "link to no name"))?.to_owned();
            let dir = dir_beneath(&at.root, source_rel.parent().unwrap_or(Path::new("")), member)?;
            Some((dir, source_name))
        }
        _ => None,
    };
    if kind == EntryType::Directory {
        if replace {
            let parent = at.parent_of(rel, member)?;
            rustix::fs::unlinkat(parent, &name, AtFlags::empty()).map_err(io::Error::from)?;
        }
        dir_beneath(&at.root, rel, member)?;
        return Ok(());
    }
    let parent = at.parent_of(rel, member)?;
    if replace {
        // Removes the name (a file or a symlink, never what a symlink points at).
        rustix::fs::unlinkat(parent, &name, AtFlags::empty()).map_err(io::Error::from)?;
    }
    let set_by_name = |parent: &rustix::fd::OwnedFd| -> io::Result<()> {
        if let Some((uid, gid)) = owner {
            rustix::fs::chownat(parent, &name, uid, gid, AtFlags::SYMLINK_NOFOLLOW).map_err(io::Error::from)?;
        }
        rustix::fs::utimensat(parent, &name, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(io::Error::from)
    };
    match kind {
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let fd = rustix::fs::openat(parent, &name, flags, Mode::from_raw_mode(0o600)).map_err(io::Error::from)?;
            let mut file = fs::File::from(fd);
            copy_content(entry, &mut file)?;
            if let Some((uid, gid)) = owner {
                rustix::fs::fchown(&file, uid, gid).map_err(io::Error::from)?;
            }
            // After chown, which clears set-id bits.
            rustix::fs::fchmod(&file, mode).map_err(io::Error::from)?;
            rustix::fs::futimens(&file, &times).map_err(io::Error::from)
        }
        EntryType::Symlink => {
            let target = entry.link_name()?.ok_or_else(|| escape(member, "a symlink without a target"))?;
            rustix::fs::symlinkat(target.as_ref(), parent, &name).map_err(io::Error::from)?;
            set_by_name(parent)
        }
        EntryType::Link => {
            let (dir, source_name) = link_source.expect("set above for links");
            rustix::fs::linkat(&dir, &source_name, parent, &name, AtFlags::empty()).map_err(io::Error::from)
        }
        EntryType::Fifo | EntryType::Char | EntryType::Block => {
            let file_type = match kind {
                EntryType::Fifo => rustix::fs::FileType::Fifo,
                EntryType::Char => rustix::fs::FileType::CharacterDevice,
                _ => rustix::fs::FileType::BlockDevice,
            };
            let dev = rustix::fs::makedev(header.device_major()?.unwrap_or(0), header.device_minor()?.unwrap_or(0));
            rustix::fs::mknodat(parent, &name, file_type, mode, dev).map_err(io::Error::from)?;
            // The node was just made by us, so it is not a symlink to follow.
            rustix::fs::chmodat(parent, &name, mode, AtFlags::empty()).map_err(io::Error::from)?;
            set_by_name(parent)
        }
        other => Err(escape(member, &format!("unsupported member type {other:?}"))),
    }
}

/// Copies a member's content in large writes.
fn copy_content<R: Read>(entry: &mut R, file: &mut fs::File) -> io::Result<()> {
    use std::io::Write;
    let mut buf = vec![0u8; WRITE_BLOCK];
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        file.write_all(&buf[..n])?;
    }
}

/// Compares the trees at `sources` with their restored copies under `restored` (where
/// `/a/b` is found at `restored/a/b`): type, permission bits, mtime (seconds),
/// ownership (when `check_owner`), content, symlink targets, device numbers and the
/// hard-link structure; and reports anything extra in the copy. Sockets and excluded
/// entries are expected to be absent. Returns the differences, at most `limit`.
pub fn compare_trees(
    sources: &[PathBuf],
    excludes: &Excludes,
    restored: &Path,
    check_owner: bool,
    limit: usize,
) -> io::Result<Vec<String>> {
    let mut diffs = Vec::new();
    let mut expected: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    // Source inode → restored path of its first name, to check hard-link structure.
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    for root in sources {
        let walker = walkdir::WalkDir::new(root).follow_links(false).into_iter().filter_entry(|e| {
            e.depth() == 0
                || !excludes.is_excluded(e.path(), e.path().strip_prefix(root).unwrap_or(e.path()), e.file_name())
        });
        for item in walker {
            let entry = item.map_err(io::Error::other)?;
            let src = entry.path();
            let meta = entry.metadata().map_err(io::Error::other)?;
            if meta.file_type().is_socket() {
                continue;
            }
            let rel = src.strip_prefix("/").unwrap_or(src);
            let copy = restored.join(rel);
            expected.insert(copy.clone());
            if diffs.len() >= limit {
                return Ok(diffs);
            }
            if let Some(d) = compare_entry(src, &meta, &copy, check_owner, &mut links)? {
                diffs.push(d);
            }
        }
    }
    // Anything in the copy that the source does not have.
    for root in sources {
        let rel = root.strip_prefix("/").unwrap_or(root);
        let copy_root = restored.join(rel);
        if !copy_root.exists() {
            continue;
        }
        for item in walkdir::WalkDir::new(&copy_root).follow_links(false) {
            let entry = item.map_err(io::Error::other)?;
            if !expected.contains(entry.path()) && diffs.len() < limit {
                diffs.push(format!("{}: not in the source", entry.path().display()));
            }
        }
    }
    Ok(diffs)
}

fn compare_entry(
    src: &Path,
    meta: &fs::Metadata,
    copy: &Path,
    check_owner: bool,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<Option<String>> {
    let name = src.display();
    let cmeta = match fs::symlink_metadata(copy) {
        Ok(m) => m,
        Err(_) => return Ok(Some(format!("{name}: missing from the restore"))),
    };
    let (ft, cft) = (meta.file_type(), cmeta.file_type());
    let kind = |t: fs::FileType| {
        if t.is_dir() {
            "directory"
        } else if t.is_symlink() {
            "symlink"
        } else if t.is_file() {
            "file"
        } else if t.is_fifo() {
            "fifo"
        } else if t.is_char_device() {
            "char device"
        } else if t.is_block_device() {
            "block device"
        } else {
            "other"
        }
    };
    if kind(ft) != kind(cft) {
        return Ok(Some(format!("{name}: {} restored as {}", kind(ft), kind(cft))));
    }
    if ft.is_symlink() {
        let (a, b) = (fs::read_link(src)?, fs::read_link(copy)?);
        if a != b {
            return Ok(Some(format!("{name}: symlink to {} restored as {}", a.display(), b.display())));
        }
    } else if meta.mode() & 0o7777 != cmeta.mode() & 0o7777 {
        return Ok(Some(format!("{name}: mode {:o} restored as {:o}", meta.mode() & 0o7777, cmeta.mode() & 0o7777)));
    }
    if meta.mtime() != cmeta.mtime() {
        return Ok(Some(format!("{name}: mtime {} restored as {}", meta.mtime(), cmeta.mtime())));
    }
    if check_owner && (meta.uid(), meta.gid()) != (cmeta.uid(), cmeta.gid()) {
        return Ok(Some(format!(
            "{name}: owner {}:{} restored as {}:{}",
            meta.uid(),
            meta.gid(),
            cmeta.uid(),
            cmeta.gid()
        )));
    }
    if (ft.is_char_device() || ft.is_block_device()) && meta.rdev() != cmeta.rdev() {
        return Ok(Some(format!("{name}: device {} restored as {}", meta.rdev(), cmeta.rdev())));
    }
    if ft.is_file() {
        if meta.nlink() > 1 {
            match links.get(&(meta.dev(), meta.ino())) {
                Some(first) => {
                    let f = fs::symlink_metadata(first)?;
                    if (f.dev(), f.ino()) != (cmeta.dev(), cmeta.ino()) {
                        return Ok(Some(format!(
                            "{name}: hard link to {} restored as a separate file",
                            first.display()
                        )));
                    }
                }
                None => {
                    links.insert((meta.dev(), meta.ino()), copy.to_path_buf());
                }
            }
        }
        if meta.len() != cmeta.len() {
            return Ok(Some(format!("{name}: {} bytes restored as {}", meta.len(), cmeta.len())));
        }
        if !same_content(src, copy)? {
            return Ok(Some(format!("{name}: content differs")));
        }
    }
    Ok(None)
}

/// Whether two files hold the same bytes (read side by side, 64 KiB at a time).
pub(crate) fn same_content(a: &Path, b: &Path) -> io::Result<bool> {
    let (mut fa, mut fb) = (BufReader::new(File::open(a)?), BufReader::new(File::open(b)?));
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the input ends; returns how much it read.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbackup_protocol::wire::Compression;

    /// Extracts a whole archive file into `dest`, any member that cannot be restored
    /// failing it; returns the members restored.
    fn extract(archive: &Path, compression: Compression, dest: &Path) -> io::Result<u64> {
        let selection = Selection::all();
        let mut opts = ExtractOptions {
            selection: &selection,
            overwrite: Overwrite::Never,
            dry_run: false,
            on_entry: &mut |_| {},
            progress: None,
            known_dirs: Vec::new(),
        };
        let input = crate::codec::decoder(BufReader::new(File::open(archive)?), compression, 2)?;
        let report = extract_stream(input, dest, &mut opts)?;
        match report.problems.first() {
            Some(problem) => Err(io::Error::new(io::ErrorKind::InvalidData, problem.clone())),
            None => Ok(report.restored),
        }
    }

    #[test]
    fn safe_join_refuses_escapes() {
        let d = Path::new("/dest");
        assert_eq!(safe_join(d, Path::new("a/./b")).expect("ok"), Path::new("/dest/a/b"));
        assert!(safe_join(d, Path::new("../x")).is_err());
        assert!(safe_join(d, Path::new("/etc/passwd")).is_err());
        assert!(safe_join(d, Path::new("a/../../x")).is_err());
    }

    fn header(kind: EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    }

    /// A tar with `a -> <outside>`, then one member below `a`.
    fn crafted(outside: &Path, path: &str, kind: EntryType) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(EntryType::Symlink);
        b.append_link(&mut h, "a", outside).expect("symlink");
        {
            let mut h = header(kind);
            let data: &[u8] = if kind == EntryType::Regular { b"pwned" } else { b"" };
            h.set_size(data.len() as u64);
            // `append_data` would refuse nothing here; write the name raw as an attacker would.
            h.as_gnu_mut().expect("gnu").name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).expect("member");
        }
        b.into_inner().expect("tar")
    }

    #[test]
    fn extraction_never_writes_through_a_symlink_the_archive_planted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).expect("outside");
        let cases = [
            ("a/x", EntryType::Regular),
            ("a/d", EntryType::Directory),
            ("a/f", EntryType::Fifo),
            ("a/d/y", EntryType::Regular),
        ];
        for (i, (path, kind)) in cases.into_iter().enumerate() {
            let tar = crafted(&outside, path, kind);
            let archive = dir.path().join(format!("evil{i}.tar.zst"));
            fs::write(&archive, zstd::encode_all(&tar[..], 3).expect("zstd")).expect("write");
            let dest = dir.path().join(format!("dest{i}"));
            let err = extract(&archive, Compression::Zstd, &dest).expect_err("must refuse");
            assert!(err.to_string().contains("symbolic link"), "{path}: {err}");
            assert_eq!(fs::read_dir(&outside).expect("ls").count(), 0, "{path}: nothing written outside");
            assert!(fs::symlink_metadata(dest.join("a")).expect("the link itself").file_type().is_symlink());
        }
    }
}
