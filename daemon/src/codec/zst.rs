//! zstd with a frame boundary every [`FRAME`] uncompressed bytes.
//!
//! Compression runs on zstd's own worker threads (the same multithreaded compressor
//! as `zstd -T0`), in one context; ending the frame every 64 MiB and starting the
//! next lets a reader enter the archive there (the block index lists the frames) and
//! costs 0.1 % of size on the benchmark tree. A concatenation of frames is what
//! `zstd -d` and `tar --zstd` read as one stream.

use std::io::{self, Write};

use zstd::stream::raw::{CParameter, Encoder, InBuffer, Operation, OutBuffer};

/// Uncompressed bytes per frame.
pub const FRAME: usize = 64 << 20;

/// Multithreaded job size up to [`SMALL_JOB_MAX_LEVEL`], whose window is at most
/// 2 MiB; higher levels have larger windows and keep zstd's own sizing.
const SMALL_JOB: u32 = 4 << 20;
const SMALL_JOB_MAX_LEVEL: i32 = 5;

/// A `Write` that zstd-compresses into `W`.
pub struct FramedZstd<W: Write> {
    inner: W,
    encoder: Encoder<'static>,
    out: Vec<u8>,
    frame: usize,
    /// Bytes taken into the current frame.
    in_frame: usize,
    /// Compressed offset of each frame started.
    offsets: Vec<u64>,
    written: u64,
}

impl<W: Write> FramedZstd<W> {
    pub fn new(inner: W, level: i32, workers: usize) -> io::Result<Self> {
        Self::with_frame(inner, level, workers, FRAME)
    }

    fn with_frame(inner: W, level: i32, workers: usize, frame: usize) -> io::Result<Self> {
        let mut encoder = Encoder::new(level)?;
        encoder.set_parameter(CParameter::ChecksumFlag(true))?;
        if workers > 1 {
            encoder.set_parameter(CParameter::NbWorkers(workers as u32))?;
            if level <= SMALL_JOB_MAX_LEVEL {
                // zstd's own job size at these levels is 8 MiB (4 windows); with two
                // workers that held ~60 MiB. 4 MiB jobs that each start from the whole
                // window before them (overlap log 9) hold ~25 MiB and, on the benchmark
                // tree, come out 1-2 % *smaller* — for 5-30 % more compression CPU,
                // which the one-stream zstd case pays (docs/benchmarks.md).
                encoder.set_parameter(CParameter::JobSize(SMALL_JOB))?;
                encoder.set_parameter(CParameter::OverlapSizeLog(9))?;
            }
        }
        Ok(FramedZstd {
            inner,
            encoder,
            out: vec![0u8; zstd::zstd_safe::CCtx::out_size()],
            frame,
            in_frame: 0,
            offsets: Vec::new(),
            written: 0,
        })
    }

    fn emit(&mut self, n: usize) -> io::Result<()> {
        self.written += n as u64;
        self.inner.write_all(&self.out[..n])
    }

    fn end_frame(&mut self) -> io::Result<()> {
        loop {
            let mut out = OutBuffer::around(&mut self.out[..]);
            let left = self.encoder.finish(&mut out, true)?;
            let n = out.pos();
            self.emit(n)?;
            if left == 0 {
                break;
            }
        }
        self.encoder.reinit()?;
        self.in_frame = 0;
        Ok(())
    }

    /// Ends the last frame and returns the inner writer with each frame's compressed
    /// offset (frame `i` starts `i × FRAME` bytes into the input).
    pub fn finish(mut self) -> io::Result<(W, Vec<u64>)> {
        if self.in_frame > 0 || self.offsets.is_empty() {
            if self.offsets.is_empty() {
                self.offsets.push(0);
            }
            self.end_frame()?;
        }
        self.inner.flush()?;
        Ok((self.inner, self.offsets))
    }
}

impl<W: Write> Write for FramedZstd<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.in_frame == 0 {
            self.offsets.push(self.written);
        }
        let take = (self.frame - self.in_frame).min(buf.len());
        let mut input = InBuffer::around(&buf[..take]);
        while input.pos() < take {
            let mut out = OutBuffer::around(&mut self.out[..]);
            self.encoder.run(&mut input, &mut out)?;
            let n = out.pos();
            self.emit(n)?;
        }
        self.in_frame += take;
        if self.in_frame == self.frame {
            self.end_frame()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ (i / 4093) as u8).collect()
    }

    #[test]
    fn frames_start_where_the_offsets_say_and_the_whole_is_one_stream() {
        let frame = 256 * 1024;
        for len in [0, 1, frame - 1, frame, frame + 1, 3 * frame + 17] {
            let data = sample(len);
            let mut enc = FramedZstd::with_frame(Vec::new(), 3, 2, frame).expect("encoder");
            for piece in data.chunks(10_007) {
                enc.write_all(piece).expect("write");
            }
            let (z, offsets) = enc.finish().expect("finish");
            assert_eq!(offsets.len(), len.div_ceil(frame).max(1), "len {len}");
            let mut whole = Vec::new();
            zstd::stream::read::Decoder::new(&z[..]).expect("decoder").read_to_end(&mut whole).expect("decodes");
            assert_eq!(whole, data, "len {len}");
            for (i, &off) in offsets.iter().enumerate() {
                let from = zstd::stream::decode_all(&z[off as usize..]).expect("decodes from a frame start");
                assert_eq!(from, data[(i * frame).min(len)..], "len {len}, frame {i}");
            }
        }
    }
}
