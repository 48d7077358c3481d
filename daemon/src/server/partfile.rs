//! An upload's `.part` file, written and read back around the page cache.
//!
//! A buffered `pwrite` copies every byte into the page cache and leaves the kernel
//! to write it back later: on the benchmark that copy was 41 % of the server's
//! samples, for data the server never reads again except to verify it. Chunks are
//! therefore written with `O_DIRECT` from a block-aligned buffer (the device reads
//! them straight from it), and the read-backs — the commit's check of every chunk
//! against its CRC32C, a chunk hashed out of order, an adopted upload — read with
//! `O_DIRECT` as well, so they check what the device holds rather than the pages
//! the server itself just wrote.
//!
//! Direct I/O needs offsets and lengths in whole blocks: a chunk size that is not a
//! multiple of [`BLOCK`] leaves the file buffered, the last chunk is written padded
//! with zeros (the commit cuts the file to its length), and a filesystem that
//! refuses `O_DIRECT` (at open or at the first transfer, `EINVAL`) is written
//! buffered from then on, with one warning. Both ways give the same bytes.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The alignment direct transfers use: the page size, a multiple of every
/// logical block size Linux devices have.
pub const BLOCK: usize = 4096;
// The frame reader aligns chunk data for these writes.
const _: () = assert!(crate::conn::DATA_ALIGN.is_multiple_of(BLOCK));

#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

/// A buffer whose start is [`BLOCK`]-aligned, as `O_DIRECT` needs.
#[derive(Default)]
pub struct Buffer(Vec<Block>);

impl Buffer {
    /// The first `len` bytes, growing the buffer to whole blocks covering them.
    fn blocks_mut(&mut self, len: usize) -> &mut [u8] {
        let blocks = len.div_ceil(BLOCK);
        if self.0.len() < blocks {
            self.0.resize(blocks, Block([0; BLOCK]));
        }
        &mut bytemuck::cast_slice_mut(&mut self.0)[..blocks * BLOCK]
    }
}

pub struct PartFile {
    /// Buffered: fsync, length, advice, and every transfer when direct I/O is off.
    file: File,
    /// The same file opened with `O_DIRECT`, while the filesystem takes it.
    direct: Option<File>,
    direct_on: AtomicBool,
    /// Buffers of finished writes, for the next ones (one per stream at a time).
    spare: Mutex<Vec<Buffer>>,
}

impl PartFile {
    /// Creates `path` exclusively, mode 0600.
    pub fn create(path: &Path, chunk_size: u32) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path)?;
        Ok(Self::with(file, path, chunk_size))
    }

    /// Opens an existing upload.
    pub fn open(path: &Path, chunk_size: u32) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Self::with(file, path, chunk_size))
    }

    fn with(file: File, path: &Path, chunk_size: u32) -> Self {
        let direct = match chunk_size as usize % BLOCK {
            0 => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .inspect_err(|e| tracing::debug!(path = %path.display(), "no direct I/O, writing buffered: {e}"))
                .ok(),
            _ => None,
        };
        let direct_on = AtomicBool::new(direct.is_some());
        PartFile { file, direct, direct_on, spare: Mutex::new(Vec::new()) }
    }

    /// The buffered descriptor, for `fsync`, `set_len` and advice.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether transfers go around the page cache (until the filesystem refuses one).
    pub fn is_direct(&self) -> bool {
        self.direct_file().is_some()
    }

    fn direct_file(&self) -> Option<&File> {
        self.direct.as_ref().filter(|_| self.direct_on.load(Ordering::Relaxed))
    }

    /// Direct I/O refused (`EINVAL`: the filesystem or this transfer's alignment):
    /// buffered from now on.
    fn refused(&self, e: &io::Error) -> bool {
        if e.raw_os_error() != Some(libc::EINVAL) {
            return false;
        }
        if self.direct_on.swap(false, Ordering::Relaxed) {
            tracing::warn!("the storage refused direct I/O ({e}); this upload is written through the page cache");
        }
        true
    }

    /// Writes `data` at `offset`. A write that does not end on a block boundary (the
    /// last chunk) is padded with zeros to one; [`set_len`](File::set_len) at commit
    /// cuts them off.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = self.direct_file()
            && offset.is_multiple_of(BLOCK as u64)
        {
            // Data received at a block boundary (see `conn::DATA_ALIGN`) in whole blocks
            // goes to the device from where it is; anything else through an aligned copy.
            let written = if (data.as_ptr() as usize).is_multiple_of(BLOCK) && data.len().is_multiple_of(BLOCK) {
                direct.write_all_at(data, offset)
            } else {
                let mut buf = crate::lock(&self.spare).pop().unwrap_or_default();
                let blocks = buf.blocks_mut(data.len());
                blocks[..data.len()].copy_from_slice(data);
                blocks[data.len()..].fill(0);
                let written = direct.write_all_at(blocks, offset);
                crate::lock(&self.spare).push(buf);
                written
            };
            match written {
                Err(e) if self.refused(&e) => {}
                other => return other,
            }
        }
        self.file.write_all_at(data, offset)
    }

    /// Reads `len` bytes at `offset` into `buf`; fails with `UnexpectedEof` if the
    /// file ends before them.
    pub fn read_at<'b>(&self, buf: &'b mut Buffer, offset: u64, len: usize) -> io::Result<&'b [u8]> {
        if let Some(direct) = self.direct_file()
            && offset.is_multiple_of(BLOCK as u64)
        {
            match read_direct(direct, buf.blocks_mut(len), offset, len) {
                Err(e) if self.refused(&e) => {}
                Err(e) => return Err(e),
                Ok(()) => return Ok(&buf.blocks_mut(len)[..len]),
            }
        }
        let bytes = &mut buf.blocks_mut(len)[..len];
        self.file.read_exact_at(bytes, offset)?;
        Ok(bytes)
    }
}

/// Reads whole blocks until `len` bytes are in (the file may end inside the last).
fn read_direct(file: &File, blocks: &mut [u8], offset: u64, len: usize) -> io::Result<()> {
    let mut got = 0;
    while got < len {
        match file.read_at(&mut blocks[got..], offset + got as u64) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the upload ends before this chunk")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        // A transfer that ended inside a block means the end of the file.
        if !got.is_multiple_of(BLOCK) && got < len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the upload ends before this chunk"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn chunks_read_back_as_written_whole_and_padded_tail_cut_at_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.part");
        let cs = 64 * 1024;
        let f = PartFile::create(&path, cs as u32).expect("create");
        assert!(f.is_direct(), "the test directory's filesystem takes O_DIRECT");
        let (a, b, tail) = (pattern(cs, 1), pattern(cs, 2), pattern(1000, 3));
        // Out of order, the short last chunk first.
        f.write_at(&tail, 2 * cs as u64).expect("tail");
        f.write_at(&a, 0).expect("a");
        f.write_at(&b, cs as u64).expect("b");
        let total = 2 * cs as u64 + 1000;
        assert_eq!(f.file().metadata().expect("stat").len(), 2 * cs as u64 + BLOCK as u64, "padded to a block");
        f.file().set_len(total).expect("cut");
        let mut buf = Buffer::default();
        assert_eq!(f.read_at(&mut buf, 0, cs).expect("read a"), &a[..]);
        assert_eq!(f.read_at(&mut buf, cs as u64, cs).expect("read b"), &b[..]);
        assert_eq!(f.read_at(&mut buf, 2 * cs as u64, 1000).expect("read tail"), &tail[..]);
        let past = f.read_at(&mut buf, 2 * cs as u64, 1001).expect_err("past the end");
        assert_eq!(past.kind(), io::ErrorKind::UnexpectedEof);
        let mut whole = a.clone();
        whole.extend_from_slice(&b);
        whole.extend_from_slice(&tail);
        assert_eq!(std::fs::read(&path).expect("read"), whole, "the bytes a buffered reader sees");
        assert!(f.is_direct());
    }

    #[test]
    fn data_at_a_block_boundary_is_written_from_where_it_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.part");
        let cs = 64 * 1024;
        let f = PartFile::create(&path, cs as u32).expect("create");
        let (a, b) = (pattern(cs, 4), pattern(cs, 5));
        let mut aligned = Buffer::default();
        aligned.blocks_mut(cs).copy_from_slice(&a);
        f.write_at(aligned.blocks_mut(cs), 0).expect("aligned");
        assert!(crate::lock(&f.spare).is_empty(), "no bounce buffer was needed");
        // The same bytes one past a block boundary go through the bounce buffer.
        let mut shifted = vec![0u8; cs + 1];
        shifted[1..].copy_from_slice(&b);
        f.write_at(&shifted[1..], cs as u64).expect("unaligned");
        assert_eq!(crate::lock(&f.spare).len(), 1);
        assert!(f.is_direct());
        let mut whole = a;
        whole.extend_from_slice(&b);
        assert_eq!(std::fs::read(&path).expect("read"), whole);
    }

    #[test]
    fn a_refused_direct_transfer_falls_back_to_the_page_cache_for_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.part");
        let f = PartFile::create(&path, 64 * 1024).expect("create");
        assert!(f.is_direct());
        // What a filesystem without direct I/O answers: EINVAL, here the kernel's own
        // (a misaligned transfer on the direct descriptor).
        let mut buf = Buffer::default();
        let misaligned = &buf.blocks_mut(2 * BLOCK)[1..BLOCK + 1];
        let e = f.direct.as_ref().expect("direct").write_at(misaligned, 0).expect_err("refused");
        assert!(f.refused(&e), "{e}");
        assert!(!f.is_direct());
        assert!(!f.refused(&io::Error::from_raw_os_error(libc::EIO)), "only EINVAL means unsupported");
        let data = pattern(5000, 9);
        f.write_at(&data, 0).expect("buffered write");
        assert_eq!(f.read_at(&mut buf, 0, 5000).expect("read"), &data[..]);
        assert_eq!(f.file().metadata().expect("stat").len(), 5000, "no padding when buffered");
    }

    #[test]
    fn a_chunk_size_off_the_block_size_is_written_buffered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.part");
        let f = PartFile::create(&path, 65_537).expect("create");
        assert!(!f.is_direct());
        let data = pattern(65_537, 4);
        f.write_at(&data, 65_537).expect("write");
        let mut buf = Buffer::default();
        assert_eq!(f.read_at(&mut buf, 65_537, 65_537).expect("read"), &data[..]);
    }
}
