//! Reading archives back: verify a stored archive against its manifest, extract it,
//! and compare a restored tree with its source, metadata included.
//!
//! Extraction refuses members that would land outside the destination (absolute
//! paths, `..`), recreates fifos and device nodes (tar-rs would write them as plain
//! files), and applies directory modes and mtimes last, deepest first, so that
//! creating children does not disturb them and read-only directories can be filled.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::EntryType;

use nbackup_protocol::config::Excludes;
use nbackup_protocol::manifest::{Manifest, hex};
use nbackup_protocol::wire::Compression;

/// A decompressing reader over an archive file.
pub fn open_archive(path: &Path, compression: Compression) -> io::Result<Box<dyn Read>> {
    let file = BufReader::with_capacity(1 << 20, File::open(path)?);
    Ok(match compression {
        // Multi-member aware: concatenated gzip streams are valid gzip.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(file)?),
    })
}

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
    let digest = hex(&sha.finalize());
    Ok(if size != manifest.size {
        Err(format!("size {size} differs from manifest {}", manifest.size))
    } else if digest != manifest.sha256 {
        Err(format!("sha256 {digest} differs from manifest {}", manifest.sha256))
    } else {
        Ok(())
    })
}

/// Whether this process may restore ownership (and create device nodes).
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// What an extraction wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RestoreStats {
    pub entries: u64,
    pub bytes: u64,
}

/// Joins a member path onto `dest`, refusing anything that could escape it.
fn safe_join(dest: &Path, member: &Path) -> io::Result<PathBuf> {
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

/// Extracts an archive into `dest` (created if missing). Ownership is restored when
/// running as root.
pub fn extract(archive: &Path, compression: Compression, dest: &Path) -> io::Result<RestoreStats> {
    fs::create_dir_all(dest)?;
    let as_root = running_as_root();
    let mut ar = tar::Archive::new(open_archive(archive, compression)?);
    ar.set_preserve_permissions(true);
    ar.set_preserve_mtime(true);
    ar.set_preserve_ownerships(as_root);
    ar.set_overwrite(false);
    let mut stats = RestoreStats::default();
    let mut dirs: Vec<(PathBuf, u32, i64, u32, u32)> = Vec::new();
    for entry in ar.entries()? {
        let mut entry = entry?;
        let header = entry.header().clone();
        let member = entry.path()?.into_owned();
        let target = safe_join(dest, &member)?;
        let mode = header.mode()? & 0o7777;
        let mtime = header.mtime()? as i64;
        let (uid, gid) = (header.uid()? as u32, header.gid()? as u32);
        match header.entry_type() {
            EntryType::Directory => {
                fs::create_dir_all(&target)?;
                dirs.push((target, mode, mtime, uid, gid));
            }
            kind @ (EntryType::Fifo | EntryType::Char | EntryType::Block) => {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent)?;
                }
                let file_type = match kind {
                    EntryType::Fifo => rustix::fs::FileType::Fifo,
                    EntryType::Char => rustix::fs::FileType::CharacterDevice,
                    _ => rustix::fs::FileType::BlockDevice,
                };
                let dev = rustix::fs::makedev(header.device_major()?.unwrap_or(0), header.device_minor()?.unwrap_or(0));
                rustix::fs::mknodat(rustix::fs::CWD, &target, file_type, rustix::fs::Mode::from_raw_mode(mode), dev)
                    .map_err(io::Error::from)?;
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
                if as_root {
                    std::os::unix::fs::lchown(&target, Some(uid), Some(gid))?;
                }
                set_mtime(&target, mtime)?;
            }
            _ => {
                stats.bytes += header.size()?;
                if !entry.unpack_in(dest)? {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("refusing member {} outside the destination", member.display()),
                    ));
                }
            }
        }
        stats.entries += 1;
    }
    // Deepest first, so a parent's mtime is set after its children were created.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0.components().count()));
    for (path, mode, mtime, uid, gid) in dirs {
        if as_root {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        set_mtime(&path, mtime)?;
    }
    Ok(stats)
}

fn set_mtime(path: &Path, secs: i64) -> io::Result<()> {
    use rustix::fs::{AtFlags, CWD, Timespec, Timestamps, utimensat};
    let t = Timespec { tv_sec: secs, tv_nsec: 0 };
    utimensat(CWD, path, &Timestamps { last_access: t, last_modification: t }, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(io::Error::from)
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

fn same_content(a: &Path, b: &Path) -> io::Result<bool> {
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

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_join_refuses_escapes() {
        let d = Path::new("/dest");
        assert_eq!(safe_join(d, Path::new("a/./b")).expect("ok"), Path::new("/dest/a/b"));
        assert!(safe_join(d, Path::new("../x")).is_err());
        assert!(safe_join(d, Path::new("/etc/passwd")).is_err());
        assert!(safe_join(d, Path::new("a/../../x")).is_err());
    }
}
