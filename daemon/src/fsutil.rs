//! Filesystem operations with the durability and atomicity guarantees the rest of the
//! code relies on.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Bytes available to unprivileged writers and total size of the filesystem holding
/// `path`, from `statvfs`.
pub fn disk_space(path: &Path) -> io::Result<(u64, u64)> {
    let st = rustix::fs::statvfs(path).map_err(io::Error::from)?;
    Ok((st.f_bavail.saturating_mul(st.f_frsize), st.f_blocks.saturating_mul(st.f_frsize)))
}

/// Makes a directory's entries (created, renamed, removed names) durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Renames `from` to `to` unless `to` exists (`renameat2(RENAME_NOREPLACE)`), so an
/// archive is never overwritten even by a racing commit.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE).map_err(io::Error::from)
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

/// Writes `data` to `path` atomically and durably: temp file in the same directory,
/// fsync, rename over `path`, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// Removes a file, treating "already gone" as success.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
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
        let err = rename_noreplace(&a, &b).expect_err("must refuse");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read_to_string(&b).expect("b"), "b");
        fs::remove_file(&b).expect("rm b");
        rename_noreplace(&a, &b).expect("rename");
        assert_eq!(fs::read_to_string(&b).expect("b"), "a");
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
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1, "no temp file left");
    }
}
