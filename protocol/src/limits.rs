//! Every size limit of the wire protocol, in one place.
//!
//! A decoder checks the relevant limit *before* it allocates or waits for more bytes,
//! so a peer can never make us buffer more than these numbers, whatever it sends.

/// Longest agent, storage or backup name, in bytes. Chosen so that the longest archive
/// file name (`<agent>-<backup>-<timestamp>-<n>.tar.gz.json`) stays under the 255-byte
/// limit of common filesystems.
pub const MAX_NAME_LEN: usize = 96;

/// Longest free-text string on the wire (refusal messages, versions, archive names).
pub const MAX_TEXT_LEN: usize = 1024;

/// Smallest and largest chunk of compressed archive data.
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;

/// Largest payload of a control frame (everything except `Chunk`).
pub const MAX_CONTROL_PAYLOAD: u32 = 64 * 1024;

/// Largest payload of a `Chunk` frame: its fixed header plus the largest chunk.
pub const MAX_CHUNK_PAYLOAD: u32 = crate::wire::CHUNK_HEADER_LEN as u32 + MAX_CHUNK_SIZE;

/// Most storages a `Health` reply may list.
pub const MAX_STORAGES: usize = 256;

/// Most parallel streams one session may use (stream ids are `0..MAX_STREAMS`).
pub const MAX_STREAMS: u16 = 64;
