//! Filesystem operations with the durability and atomicity guarantees the rest of the
//! code relies on.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Bytes available to unprivileged writers and total size of the filesystem holding
/// `path`, from `statvfs`.
pub fn disk_space(path: &Path) -> io::Result<(u64, u64)> {
    crate::fault::io("statvfs", &path.to_string_lossy())?;
    let st = rustix::fs::statvfs(path).map_err(io::Error::from)?;
    Ok((st.f_bavail.saturating_mul(st.f_frsize), st.f_blocks.saturating_mul(st.f_frsize)))
}

/// Makes a directory's entries (created, renamed, removed names) durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// How a filesystem renames without replacing an existing name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoReplace {
    /// `renameat2(RENAME_NOREPLACE)`: one atomic step.
    Rename,
    /// `link(from, to)` (fails if `to` exists) then `unlink(from)`, for filesystems
    /// without `RENAME_NOREPLACE` (NFS, CIFS, some FUSE). A crash between the two
    /// leaves both names on the same inode, which [`rename_noreplace`] finishes.
    LinkUnlink,
}

/// Renames `from` to `to` unless `to` exists, so an archive is never overwritten even
/// by a racing commit.
pub fn rename_noreplace(from: &Path, to: &Path, mode: NoReplace) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match mode {
        NoReplace::Rename => {
            crate::fault::io("rename-noreplace", &from.to_string_lossy())?;
            renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE).map_err(io::Error::from)
        }
        NoReplace::LinkUnlink => {
            crate::fault::io("link", &from.to_string_lossy())?;
            match fs::hard_link(from, to) {
                Ok(()) => {}
                // A link made before a crash: both names on one inode.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && same_file(from, to)? => {}
                Err(e) => return Err(e),
            }
            fs::remove_file(from)
        }
    }
}

fn same_file(a: &Path, b: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (fs::symlink_metadata(a)?, fs::symlink_metadata(b)?);
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

/// Finds out, with two scratch files in `dir`, whether its filesystem supports
/// `RENAME_NOREPLACE`, else hard links. Neither is an error: nothing could commit
/// there without risking an overwrite.
pub fn probe_noreplace(dir: &Path) -> io::Result<NoReplace> {
    let a = dir.join(format!(".probe-{}-a", std::process::id()));
    let b = dir.join(format!(".probe-{}-b", std::process::id()));
    let cleanup = || {
        let _ = remove_if_exists(&a);
        let _ = remove_if_exists(&b);
    };
    cleanup();
    File::create(&a)?;
    File::create(&b)?;
    // `b` exists, so a working NOREPLACE must refuse with EEXIST.
    let result = match rename_noreplace(&a, &b, NoReplace::Rename) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(NoReplace::Rename),
        Err(e) if is_unsupported(&e) => {
            remove_if_exists(&b)?;
            match rename_noreplace(&a, &b, NoReplace::LinkUnlink) {
                Ok(()) => Ok(NoReplace::LinkUnlink),
                Err(e) if is_unsupported(&e) => Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "{} supports neither RENAME_NOREPLACE nor hard links ({e}); archives could be                          overwritten there, so it cannot be a storage",
                        dir.display()
                    ),
                )),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
        Ok(()) => Err(io::Error::other(format!(
            "{}: RENAME_NOREPLACE replaced an existing file; refusing to store archives there",
            dir.display()
        ))),
    };
    cleanup();
    result
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM))
}

/// Creates `dir` and any missing parents, fsyncing each parent whose entries changed,
/// so a freshly created archive directory survives a crash together with its content.
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_all_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// Writes `data` to `path` atomically and durably: a temp file in the same directory
/// with a name no other writer uses (process id and a counter), fsync, rename over
/// `path`, fsync the directory. Two writers of one path never share a temp file; the
/// last rename wins, and each wrote a whole document.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let written = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = remove_if_exists(&tmp);
    }
    written?;
    fsync_dir(dir)
}

/// Whether a temp file name is one [`write_atomic`] makes (stale after a crash).
pub fn is_atomic_temp(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// Removes a file, treating "already gone" as success.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether an I/O error is a passing shortage of the process or the system (file
/// descriptors, memory, kernel resources) rather than a fault of the storage: the
/// same operation can succeed a moment later, so nothing is thrown away for it.
pub fn is_resource_shortage(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN | libc::EINTR))
}

/// Raises the soft limit on open files to the hard limit: every stream is a socket
/// and every upload a file, and the default soft limit (often 1024) is a few hundred
/// agents. Returns the new limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if let Some(max) = limit.maximum
        && limit.current != Some(max)
    {
        limit.current = Some(max);
        setrlimit(Resource::Nofile, limit).map_err(io::Error::from)?;
    }
    Ok(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
}

/// Whether an I/O error means the filesystem is out of space (or quota).
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) || e.kind() == io::ErrorKind::StorageFull
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_noreplace_never_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, "a").expect("write a");
        fs::write(&b, "b").expect("write b");
        for mode in [NoReplace::Rename, NoReplace::LinkUnlink] {
            fs::write(&a, "a").expect("write a");
            fs::write(&b, "b").expect("write b");
            let err = rename_noreplace(&a, &b, mode).expect_err("must refuse");
            assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{mode:?}");
            assert_eq!(fs::read_to_string(&b).expect("b"), "b");
            fs::remove_file(&b).expect("rm b");
            rename_noreplace(&a, &b, mode).expect("rename");
            assert_eq!(fs::read_to_string(&b).expect("b"), "a");
            assert!(!a.exists(), "{mode:?}: the old name is gone");
        }
    }

    #[test]
    fn a_link_left_by_a_crash_is_finished_not_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, "a").expect("write a");
        fs::hard_link(&a, &b).expect("link, then the crash");
        rename_noreplace(&a, &b, NoReplace::LinkUnlink).expect("finish");
        assert!(!a.exists());
        assert_eq!(fs::read_to_string(&b).expect("b"), "a");
    }

    #[test]
    fn the_probe_falls_back_to_links_where_rename_noreplace_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(probe_noreplace(dir.path()).expect("probe"), NoReplace::Rename);
        let scope = dir.path().to_string_lossy().into_owned();
        {
            let _no_rename2 = crate::fault::inject(
                "rename-noreplace",
                scope.clone(),
                crate::fault::Action::Errno(libc::EINVAL),
                0,
                1,
            );
            assert_eq!(probe_noreplace(dir.path()).expect("probe"), NoReplace::LinkUnlink);
        }
        let _no_rename2 =
            crate::fault::inject("rename-noreplace", scope.clone(), crate::fault::Action::Errno(libc::EINVAL), 0, 1);
        let _no_links = crate::fault::inject("link", scope, crate::fault::Action::Errno(libc::EPERM), 0, 1);
        let err = probe_noreplace(dir.path()).expect_err("neither");
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        assert!(err.to_string().contains("cannot be a storage"), "{err}");
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 0, "scratch files removed");
    }

    #[test]
    fn disk_space_is_real() {
        let (free, total) = disk_space(Path::new("/")).expect("statvfs");
        assert!(total > 0 && free <= total);
    }

    #[test]
    fn write_atomic_replaces_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.json");
        write_atomic(&p, b"1").expect("first");
        write_atomic(&p, b"2").expect("second");
        assert_eq!(fs::read(&p).expect("read"), b"2");
        // Writers of one path in parallel never tear each other's document.
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let p = &p;
                s.spawn(move || write_atomic(p, &[b'a' + i; 4096]).expect("parallel write"));
            }
        });
        let last = fs::read(&p).expect("read");
        assert!(last.len() == 4096 && last.iter().all(|b| *b == last[0]), "one whole document");
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1, "no temp file left");
    }
}
