//! Block-parallel gzip, the way pigz does it: one ordinary gzip member that any
//! `gunzip`/`tar xzf` reads, produced by all cores.
//!
//! The input is cut into 128 KiB blocks. Each block is raw-deflated on a worker
//! thread with the previous block's last 32 KiB as preset dictionary (so the ratio
//! stays within a fraction of a percent of serial gzip) and ended with a sync flush,
//! which byte-aligns it so compressed blocks can simply be concatenated; the last block
//! ends the deflate stream. CRC-32s of the blocks are combined in order for the
//! trailer. At most `2 × workers` blocks are in flight, which bounds memory and makes
//! the writer block when the compressors are the bottleneck.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::{Compress, Compression, FlushCompress, Status};

const BLOCK: usize = 128 * 1024;
const DICT: usize = 32 * 1024;

struct Job {
    input: Vec<u8>,
    dict: Option<Vec<u8>>,
    last: bool,
    reply: SyncSender<io::Result<Block>>,
}

struct Block {
    data: Vec<u8>,
    crc: crc32fast::Hasher,
}

/// A `Write` that gzips into `W` using `workers` threads.
pub struct ParallelGz<W: Write> {
    inner: Option<W>,
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    in_flight: VecDeque<Receiver<io::Result<Block>>>,
    max_in_flight: usize,
    current: Vec<u8>,
    prev_tail: Option<Vec<u8>>,
    crc: crc32fast::Hasher,
    len: u64,
    header_written: bool,
}

impl<W: Write> ParallelGz<W> {
    pub fn new(inner: W, level: u32, workers: usize) -> Self {
        let workers_n = workers.max(1);
        let (tx, rx) = sync_channel::<Job>(workers_n * 2);
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..workers_n)
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("nbackup-gzip-{i}"))
                    .spawn(move || worker(&rx, level))
                    .expect("spawning a compression thread")
            })
            .collect();
        ParallelGz {
            inner: Some(inner),
            jobs: Some(tx),
            workers,
            in_flight: VecDeque::new(),
            max_in_flight: workers_n * 2,
            current: Vec::with_capacity(BLOCK),
            prev_tail: None,
            crc: crc32fast::Hasher::new(),
            len: 0,
            header_written: false,
        }
    }

    fn inner(&mut self) -> &mut W {
        self.inner.as_mut().expect("inner writer present until finish")
    }

    fn submit(&mut self, last: bool) -> io::Result<()> {
        if !self.header_written {
            // Magic, deflate, no flags, mtime 0 (reproducible), no extra flags, OS=Unix.
            self.inner().write_all(&[0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0x03])?;
            self.header_written = true;
        }
        let input = std::mem::replace(&mut self.current, Vec::with_capacity(if last { 0 } else { BLOCK }));
        self.len += input.len() as u64;
        let tail_start = input.len().saturating_sub(DICT);
        let next_tail = (!input.is_empty()).then(|| input[tail_start..].to_vec());
        let dict = std::mem::replace(&mut self.prev_tail, next_tail);
        let (reply, rx) = sync_channel(1);
        let job = Job { input, dict, last, reply };
        self.jobs
            .as_ref()
            .expect("job queue open until finish")
            .send(job)
            .map_err(|_| io::Error::other("gzip worker threads are gone"))?;
        self.in_flight.push_back(rx);
        while self.in_flight.len() > if last { 0 } else { self.max_in_flight } {
            self.collect_one()?;
        }
        Ok(())
    }

    fn collect_one(&mut self) -> io::Result<()> {
        let rx = self.in_flight.pop_front().expect("caller checked non-empty");
        let block = rx.recv().map_err(|_| io::Error::other("gzip worker died"))??;
        self.crc.combine(&block.crc);
        self.inner().write_all(&block.data)
    }

    /// Compresses what is left, writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.submit(true)?;
        let crc = std::mem::replace(&mut self.crc, crc32fast::Hasher::new()).finalize();
        let len = self.len as u32; // ISIZE is the length modulo 2^32 by definition
        let inner = self.inner();
        inner.write_all(&crc.to_le_bytes())?;
        inner.write_all(&len.to_le_bytes())?;
        inner.flush()?;
        Ok(self.inner.take().expect("inner writer present"))
    }
}

impl<W: Write> Write for ParallelGz<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = BLOCK - self.current.len();
        let n = room.min(buf.len());
        self.current.extend_from_slice(&buf[..n]);
        if self.current.len() == BLOCK {
            self.submit(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for ParallelGz<W> {
    fn drop(&mut self) {
        self.jobs = None; // closes the queue; workers exit
        self.in_flight.clear();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(jobs: &Mutex<Receiver<Job>>, level: u32) {
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        // A fresh stream per block: a reset zlib-rs stream does not always produce the
        // same bytes as a new one, and identical input should give identical archives
        // whatever worker compressed which block. The state costs ~10 µs against ~2 ms
        // of compression per block.
        let mut deflate = Compress::new(Compression::new(level), false);
        let result = compress_block(&mut deflate, &job);
        let _ = job.reply.send(result);
    }
}

fn compress_block(deflate: &mut Compress, job: &Job) -> io::Result<Block> {
    if let Some(dict) = &job.dict {
        deflate.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let flush = if job.last { FlushCompress::Finish } else { FlushCompress::Sync };
    let mut out = Vec::with_capacity(job.input.len() + job.input.len() / 8 + 64);
    let start_in = deflate.total_in();
    loop {
        let consumed = (deflate.total_in() - start_in) as usize;
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(4096));
        }
        let status = deflate.compress_vec(&job.input[consumed..], &mut out, flush).map_err(io::Error::other)?;
        let consumed = (deflate.total_in() - start_in) as usize;
        let room_left = out.capacity() > out.len();
        match status {
            Status::StreamEnd => break,
            // A sync flush is complete once all input is consumed and zlib left spare
            // room in the output (otherwise it may have more to emit).
            Status::Ok | Status::BufError if !job.last && consumed == job.input.len() && room_left => break,
            Status::Ok | Status::BufError => {}
        }
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&job.input);
    Ok(Block { data: out, crc })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gz(data: &[u8], workers: usize) -> Vec<u8> {
        let mut enc = ParallelGz::new(Vec::new(), 6, workers);
        // Odd write sizes exercise block boundaries.
        for piece in data.chunks(7919) {
            enc.write_all(piece).expect("write");
        }
        enc.finish().expect("finish")
    }

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(data).read_to_end(&mut out).expect("valid gzip");
        out
    }

    fn sample(len: usize) -> Vec<u8> {
        let mut x: u32 = 1;
        (0..len)
            .map(|i| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                if i % 3 == 0 { b"abcdefgh"[(x >> 16) as usize % 8] } else { (x >> 24) as u8 % 16 + b'a' }
            })
            .collect()
    }

    #[test]
    fn round_trips_at_every_size_around_block_boundaries() {
        for len in [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 2 * 1024 * 1024 + 3] {
            let data = sample(len);
            assert_eq!(gunzip(&gz(&data, 3)), data, "len {len}");
        }
    }

    #[test]
    fn output_is_a_single_member_and_deterministic() {
        let data = sample(5 * BLOCK);
        let a = gz(&data, 1);
        let b = gz(&data, 4);
        assert_eq!(a, b, "worker count does not change the bytes");
        let mut single = Vec::new();
        flate2::read::GzDecoder::new(&a[..]).read_to_end(&mut single).expect("single member");
        assert_eq!(single, data);
    }

    #[test]
    fn ratio_is_close_to_serial_gzip() {
        let data = sample(4 * 1024 * 1024);
        let parallel = gz(&data, 2).len() as f64;
        let mut serial = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        serial.write_all(&data).expect("write");
        let serial = serial.finish().expect("finish").len() as f64;
        assert!(parallel / serial < 1.01, "parallel {parallel} vs serial {serial}");
    }
}
