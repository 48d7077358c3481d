//! Frame I/O over any async byte stream: the layer between sockets and the codec.
//!
//! The reader buffers at most one frame: it asks the codec how many bytes the frame
//! in progress needs (after the codec has checked the declared length against its
//! limit) and reserves only that. Deadlines are applied by callers with
//! `tokio::time::timeout`, because only they know which phase they are in.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use nbackup_protocol::wire::{
    self, CHUNK_HEADER_LEN, Chunk, DecodeError, FRAME_HEADER_LEN, Frame, FrameType, PREAMBLE_LEN, Preamble,
};

/// Where a chunk's data lands in memory: at a multiple of this, so that the server's
/// `O_DIRECT` write takes it from the buffer it arrived in instead of copying it into
/// an aligned one first.
pub const DATA_ALIGN: usize = 4096;
/// Chunks smaller than this are read where they fall: the copy the alignment saves is
/// not worth a buffer of their own.
const ALIGN_FROM: usize = 64 * 1024;
/// Where a chunk's data starts in its frame.
const CHUNK_DATA_AT: usize = FRAME_HEADER_LEN + CHUNK_HEADER_LEN;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection closed by peer")]
    Closed,
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("invalid frame from peer: {0}")]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads frames from `R`. Cancel-safe: bytes already read stay buffered.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    /// When the last byte arrived (or the reader was made): silence is measured in
    /// bytes, not frames, so a large chunk trickling in is still a live peer.
    last_byte: std::time::Instant,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner, buf: BytesMut::with_capacity(8 * 1024), last_byte: std::time::Instant::now() }
    }

    /// How long since a byte last arrived.
    pub fn idle_for(&self) -> std::time::Duration {
        self.last_byte.elapsed()
    }

    /// The next frame; `Err(Closed)` on a clean end of stream between frames.
    pub async fn read_frame(&mut self) -> Result<Frame, ConnError> {
        loop {
            if let Some(frame) = wire::decode_frame(&mut self.buf)? {
                return Ok(frame);
            }
            let needed = wire::bytes_needed(&self.buf)?;
            if needed >= ALIGN_FROM && self.buf[0] == FrameType::CHUNK.0 && !data_aligned(&self.buf) {
                self.buf = aligned_for_chunk(&self.buf, needed);
            }
            self.buf.reserve(needed.saturating_sub(self.buf.len()));
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return Err(if self.buf.is_empty() { ConnError::Closed } else { ConnError::Truncated });
            }
            self.last_byte = std::time::Instant::now();
        }
    }

    /// Reads the 10-byte connection preamble (server side, first thing).
    pub async fn read_preamble(&mut self) -> Result<Preamble, ConnError> {
        while self.buf.len() < PREAMBLE_LEN {
            self.buf.reserve(PREAMBLE_LEN - self.buf.len());
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return Err(if self.buf.is_empty() { ConnError::Closed } else { ConnError::Truncated });
            }
        }
        let head = self.buf.split_to(PREAMBLE_LEN);
        let mut bytes = [0u8; PREAMBLE_LEN];
        bytes.copy_from_slice(&head);
        Ok(Preamble::decode(&bytes)?)
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

/// Whether a chunk frame starting at the front of `buf` would have its data at a
/// [`DATA_ALIGN`] boundary.
fn data_aligned(buf: &BytesMut) -> bool {
    (buf.as_ptr() as usize + CHUNK_DATA_AT).is_multiple_of(DATA_ALIGN)
}

/// A buffer for a chunk frame of `total` bytes whose data starts at a [`DATA_ALIGN`]
/// boundary, holding the frame's first bytes (`prefix`, at most what one read brought).
fn aligned_for_chunk(prefix: &[u8], total: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(total + DATA_ALIGN);
    let data_at = buf.as_ptr() as usize + CHUNK_DATA_AT;
    let pad = (DATA_ALIGN - data_at % DATA_ALIGN) % DATA_ALIGN;
    buf.resize(pad, 0);
    buf.advance(pad);
    buf.extend_from_slice(prefix);
    buf
}

/// Writes frames to `W`, flushing after each so acks and control frames are not held
/// back by TLS record buffering.
pub struct FrameWriter<W> {
    inner: W,
    scratch: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter { inner, scratch: BytesMut::with_capacity(256) }
    }

    pub async fn send(&mut self, frame: &Frame) -> io::Result<()> {
        if let Frame::Chunk(chunk) = frame {
            return self.send_chunk(chunk).await;
        }
        self.scratch.clear();
        frame.encode(&mut self.scratch).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.inner.write_all(&self.scratch).await?;
        self.inner.flush().await
    }

    /// Sends a chunk without copying its data into a frame buffer.
    pub async fn send_chunk(&mut self, chunk: &Chunk) -> io::Result<()> {
        self.scratch.clear();
        chunk.encode_head(&mut self.scratch);
        self.inner.write_all(&self.scratch).await?;
        self.inner.write_all(&chunk.data).await?;
        self.inner.flush().await
    }

    /// Sends a chunk in slices of `slice` bytes, awaiting `before(len)` ahead of each
    /// (a bandwidth limiter), so a large chunk never goes out as one burst.
    pub async fn send_chunk_paced<F, Fut>(&mut self, chunk: &Chunk, slice: usize, mut before: F) -> io::Result<()>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        self.scratch.clear();
        chunk.encode_head(&mut self.scratch);
        before(self.scratch.len()).await;
        self.inner.write_all(&self.scratch).await?;
        for piece in chunk.data.chunks(slice.max(1)) {
            before(piece.len()).await;
            self.inner.write_all(piece).await?;
            self.inner.flush().await?;
        }
        self.inner.flush().await
    }

    pub async fn send_preamble(&mut self, preamble: &Preamble) -> io::Result<()> {
        self.inner.write_all(&preamble.encode()).await?;
        self.inner.flush().await
    }

    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.inner.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbackup_protocol::wire::Ack;

    #[tokio::test]
    async fn reads_frames_across_partial_reads() {
        let (client, server) = tokio::io::duplex(3);
        let mut w = FrameWriter::new(client);
        let mut r = FrameReader::new(server);
        let send = tokio::spawn(async move {
            for seq in 0..5 {
                w.send(&Frame::Ack(Ack { seq })).await.expect("send");
            }
        });
        for seq in 0..5 {
            assert_eq!(r.read_frame().await.expect("frame"), Frame::Ack(Ack { seq }));
        }
        send.await.expect("sender");
        assert!(matches!(r.read_frame().await, Err(ConnError::Closed)));
    }

    #[tokio::test]
    async fn rejects_oversized_frame_without_reading_it() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(&[0x10, 0xff, 0xff, 0xff, 0xff]).await.expect("write");
        let mut r = FrameReader::new(server);
        assert!(matches!(r.read_frame().await, Err(ConnError::Decode(DecodeError::FrameTooLarge { .. }))));
        assert!(r.buf.capacity() < 64 * 1024, "no large buffer was reserved");
    }

    #[tokio::test]
    async fn a_large_chunk_arrives_with_its_data_block_aligned_and_intact() {
        let (client, server) = tokio::io::duplex(5000);
        let mut w = FrameWriter::new(client);
        let mut r = FrameReader::new(server);
        let data: Vec<u8> = (0..1_048_576u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let send = tokio::spawn(async move {
            // A small frame first, so the chunk does not start at the front of a fresh buffer.
            w.send(&Frame::Ack(Ack { seq: 7 })).await.expect("send");
            for seq in 0..3 {
                w.send(&Frame::Chunk(Chunk::new(seq, seq << 20, sent.clone().into()))).await.expect("send");
            }
            w.send(&Frame::Chunk(Chunk::new(3, 3 << 20, bytes::Bytes::from_static(b"tail")))).await.expect("send");
        });
        assert_eq!(r.read_frame().await.expect("frame"), Frame::Ack(Ack { seq: 7 }));
        for seq in 0..3 {
            let Frame::Chunk(chunk) = r.read_frame().await.expect("frame") else { panic!("a chunk") };
            assert_eq!((chunk.seq, chunk.offset), (seq, seq << 20));
            assert!((chunk.data.as_ptr() as usize).is_multiple_of(DATA_ALIGN), "chunk {seq} aligned");
            assert_eq!(chunk.data, data);
            assert_eq!(chunk.crc32c, crc32c::crc32c(&data));
        }
        let Frame::Chunk(tail) = r.read_frame().await.expect("frame") else { panic!("a chunk") };
        assert_eq!(&tail.data[..], b"tail");
        send.await.expect("sender");
    }

    #[tokio::test]
    async fn reports_truncation_mid_frame() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(&[0x11, 0, 0, 0, 8, 1, 2]).await.expect("write");
        drop(client);
        let mut r = FrameReader::new(server);
        assert!(matches!(r.read_frame().await, Err(ConnError::Truncated)));
    }
}
