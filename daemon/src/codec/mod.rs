//! The archive's compression, both ways: gzip as independent libdeflate members,
//! zstd as 64 MiB frames, each recording where its blocks start (the block index)
//! so that readers can decode blocks in parallel or start in the middle.

pub mod gzip;
pub mod zst;

use std::io::{self, BufRead, Read, Write};

use nbackup_protocol::restore::BlockIndex;
use nbackup_protocol::wire::Compression;

/// A compressing writer for either format.
pub enum Encoder<W: Write> {
    Gzip(gzip::ParallelGz<W>),
    Zstd(zst::FramedZstd<W>),
}

impl<W: Write> Encoder<W> {
    /// `level` is the format's own (gzip 1–9, zstd 1–19); `threads` compress.
    pub fn new(inner: W, compression: Compression, level: i32, threads: usize) -> io::Result<Self> {
        Ok(match compression {
            Compression::Gzip => Encoder::Gzip(gzip::ParallelGz::new(inner, level.clamp(1, 9) as u32, threads)?),
            Compression::Zstd => Encoder::Zstd(zst::FramedZstd::new(inner, level, threads)?),
        })
    }

    /// Ends the stream; returns the inner writer and where each block starts.
    pub fn finish(self) -> io::Result<(W, BlockIndex)> {
        let (inner, offsets, block) = match self {
            Encoder::Gzip(e) => e.finish().map(|(w, o)| (w, o, gzip::BLOCK))?,
            Encoder::Zstd(e) => e.finish().map(|(w, o)| (w, o, zst::FRAME))?,
        };
        Ok((inner, BlockIndex { block: block as u64, offsets }))
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }
}

/// A decompressing reader over buffered compressed bytes; gzip members are
/// inflated on `workers` threads. Any valid gzip or zstd stream reads, including
/// archives of other writers and older nbackup versions.
pub fn decoder<'r, R: BufRead + 'r>(
    input: R,
    compression: Compression,
    workers: usize,
) -> io::Result<Box<dyn Read + 'r>> {
    Ok(match compression {
        Compression::Gzip => Box::new(gzip::ParallelGunzip::new(input, workers)?),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(input)?),
    })
}
