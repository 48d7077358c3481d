//! The producer: a dedicated thread that archives the sources, compresses the tar
//! stream, cuts it into chunks, hashes it, and pushes the chunks into the window.
//!
//! All CPU and disk work of the agent happens here and on the compressor's worker
//! threads; the async runtime only moves chunks. The thread blocks on the window
//! when it is full, so reading the sources runs at the speed the network drains.

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use bytes::BytesMut;
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;

use nbackup_protocol::config::Excludes;
use nbackup_protocol::wire::{CatalogDigest, Chunk, Commit, Compression, SourceStats};

use super::archive::{ArchiveSummary, write_archive};
use super::progress::Progress;
use super::window::{Failure, Window};
use crate::codec::Encoder;

/// What the producer needs to know.
pub struct ProducerSpec {
    pub sources: Vec<PathBuf>,
    pub excludes: Excludes,
    pub compression: Compression,
    pub level: i32,
    pub chunk_size: u32,
    /// Compression threads.
    pub threads: usize,
}

/// Fails the transfer if the producer thread ends without having finished it — a
/// panic in the walker, tar or a compressor — so the run fails at once instead of
/// waiting for chunks that never come.
struct FailOnUnwind(Arc<Window>);

impl Drop for FailOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() && self.0.finished().is_none() {
            self.0.fail(Failure::Source("the archive thread panicked (a bug; see the agent's log)".into()));
        }
    }
}

/// Starts the producer thread. Its result is the archive summary; failures are also
/// reported to the window so the streams stop and tell the server.
pub fn spawn(
    spec: ProducerSpec,
    window: Arc<Window>,
    progress: Arc<Progress>,
    runtime: Handle,
    fault_scope: String,
) -> io::Result<JoinHandle<Result<ArchiveSummary, String>>> {
    std::thread::Builder::new().name("nbackup-archive".into()).spawn(move || {
        let _guard = FailOnUnwind(window.clone());
        if crate::fault::hit("producer:panic", &fault_scope) == Some(crate::fault::Action::Abort) {
            panic!("injected fault: producer:panic");
        }
        let sink = ChunkSink::new(window.clone(), spec.chunk_size as usize, progress.clone(), runtime);
        progress.producer_running(true);
        let produced = produce(&spec, sink, &progress);
        progress.producer_running(false);
        match produced {
            Ok((sink, summary)) => {
                let (total_len, chunks, sha256) = match sink.finish() {
                    Ok(x) => x,
                    Err(e) => return Err(stopped_or(&window, e)),
                };
                let catalog = CatalogDigest {
                    len: summary.catalog.len() as u64,
                    sha256: Sha256::digest(&summary.catalog).into(),
                };
                window.produced(
                    Commit {
                        total_len,
                        chunks,
                        sha256,
                        stats: SourceStats {
                            entries: summary.entries,
                            bytes_read: summary.bytes_read,
                            skipped: summary.skipped(),
                        },
                        catalog: Some(catalog),
                    },
                    summary.catalog.clone(),
                );
                Ok(summary)
            }
            Err(e) => Err(stopped_or(&window, e)),
        }
    })
}

/// If the transfer already ended (server refused, user cancelled), the producer's
/// error is only a consequence; otherwise it is the cause and fails the transfer.
fn stopped_or(window: &Window, e: io::Error) -> String {
    if window.finished().is_none() {
        window.fail(Failure::Source(e.to_string()));
    }
    e.to_string()
}

/// Bytes of small tar writes gathered before they reach the compressor.
const ENCODER_BUFFER: usize = 128 << 10;

fn produce(spec: &ProducerSpec, sink: ChunkSink, progress: &Arc<Progress>) -> io::Result<(ChunkSink, ArchiveSummary)> {
    let encoder = Encoder::new(sink, spec.compression, spec.level, spec.threads)?;
    // tar writes a member in three or more pieces (header, content, padding); each
    // call into zstd's multithreaded compressor costs more than a small file's bytes.
    // Larger writes (a big file's 256 KiB reads) pass straight through.
    let encoder = io::BufWriter::with_capacity(ENCODER_BUFFER, encoder);
    let (encoder, mut summary, catalog) = write_archive(&spec.sources, &spec.excludes, encoder, progress)?;
    let encoder = encoder.into_inner().map_err(io::IntoInnerError::into_error)?;
    let (sink, blocks) = encoder.finish()?;
    summary.catalog = catalog.finish(Some(&blocks))?;
    Ok((sink, summary))
}

/// Cuts the compressed stream into chunks, hashes it, and pushes chunks to the window.
pub struct ChunkSink {
    window: Arc<Window>,
    chunk_size: usize,
    buf: BytesMut,
    seq: u64,
    offset: u64,
    sha: Sha256,
    progress: Arc<Progress>,
    runtime: Handle,
}

impl ChunkSink {
    pub fn new(window: Arc<Window>, chunk_size: usize, progress: Arc<Progress>, runtime: Handle) -> Self {
        ChunkSink {
            window,
            chunk_size,
            buf: BytesMut::with_capacity(chunk_size),
            seq: 0,
            offset: 0,
            sha: Sha256::new(),
            progress,
            runtime,
        }
    }

    fn emit(&mut self, len: usize) -> io::Result<()> {
        let data = self.buf.split_to(len).freeze();
        self.sha.update(&data);
        let chunk = Chunk::new(self.seq, self.offset, data);
        self.seq += 1;
        self.offset += len as u64;
        self.progress.bytes_compressed.fetch_add(len as u64, Ordering::Relaxed);
        let waited = std::time::Instant::now();
        let pushed = self.runtime.block_on(self.window.push(chunk));
        self.progress.network_nanos.fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if !pushed {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "transfer ended"));
        }
        if self.buf.capacity() < self.chunk_size {
            self.buf.reserve(self.chunk_size);
        }
        Ok(())
    }

    /// Pushes the last partial chunk; returns (total length, chunk count, SHA-256).
    pub fn finish(mut self) -> io::Result<(u64, u64, [u8; 32])> {
        if !self.buf.is_empty() {
            let len = self.buf.len();
            self.emit(len)?;
        }
        Ok((self.offset, self.seq, self.sha.finalize().into()))
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.chunk_size - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk_size {
            self.emit(self.chunk_size)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
