//! The nbackup wire protocol: connection preamble and frames.
//!
//! Byte layouts are documented in `docs/protocol.md`; golden vectors in the tests below
//! pin them. Everything here is pure: bytes in, typed messages out, and back.
//!
//! * After the TLS handshake the client sends a 10-byte [`Preamble`]: a 4-byte
//!   connection kind, the protocol version (`u16`) and capability flags (`u32`).
//! * Then both sides exchange frames: `type: u8, len: u32, payload[len]`, integers
//!   big-endian. Strings are `u16`-length-prefixed UTF-8, names `u8`-length-prefixed.
//! * [`decode_frame`] distinguishes "need more bytes" (`Ok(None)`) from "invalid"
//!   (`Err`), checks the declared length against the per-type limit before anything is
//!   buffered, and rejects trailing bytes inside a frame.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::limits::{MAX_CHUNK_PAYLOAD, MAX_CONTROL_PAYLOAD, MAX_NAME_LEN, MAX_STORAGES, MAX_TEXT_LEN};
use crate::name::{Name, NameError, SessionId};

/// Version of the frame layouts below. Bumped on any incompatible change: 2 added
/// `Keepalive` and `Committing`, which a version-1 peer would take for garbage; 3
/// added the `RSTR` connection, its frames and `Commit`'s catalog.
pub const PROTOCOL_VERSION: u16 = 3;

/// TLS ALPN protocol id; both sides insist on it.
pub const ALPN: &[u8] = b"nbkp/1";

/// Length of a frame header: type byte plus `u32` length.
pub const FRAME_HEADER_LEN: usize = 5;

/// Length of the fixed part of a `Chunk` payload: seq, offset, crc32c.
pub const CHUNK_HEADER_LEN: usize = 8 + 8 + 4;

/// Length of the connection preamble.
pub const PREAMBLE_LEN: usize = 10;

/// What a new connection is for, chosen by its first four bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnKind {
    /// Open a backup session; the connection then becomes stream 0.
    Backup,
    /// Attach another (or a re-connected) stream to an existing session.
    Join,
    /// One-shot health query.
    Ping,
    /// The agent's persistent control channel.
    Control,
    /// List, fetch or verify this agent's own archives (restore).
    Restore,
    /// Obtain a certificate: a first enrollment with a one-time token (the only kind
    /// a client without a certificate may open), or a renewal over mutual TLS.
    Enroll,
}

impl ConnKind {
    pub fn magic(self) -> [u8; 4] {
        match self {
            ConnKind::Backup => *b"NBKP",
            ConnKind::Join => *b"JOIN",
            ConnKind::Ping => *b"PING",
            ConnKind::Control => *b"CTRL",
            ConnKind::Restore => *b"RSTR",
            ConnKind::Enroll => *b"ENRL",
        }
    }

    pub fn from_magic(magic: [u8; 4]) -> Option<Self> {
        match &magic {
            b"NBKP" => Some(ConnKind::Backup),
            b"JOIN" => Some(ConnKind::Join),
            b"PING" => Some(ConnKind::Ping),
            b"CTRL" => Some(ConnKind::Control),
            b"RSTR" => Some(ConnKind::Restore),
            b"ENRL" => Some(ConnKind::Enroll),
            _ => None,
        }
    }
}

/// Capability flags the client announces in its preamble.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caps(pub u32);

impl Caps {
    /// The client can produce gzip archives.
    pub const GZIP: Caps = Caps(1 << 0);
    /// The client can produce zstd archives.
    pub const ZSTD: Caps = Caps(1 << 1);

    pub fn contains(self, other: Caps) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn union(self, other: Caps) -> Caps {
        Caps(self.0 | other.0)
    }

    /// The capability a client needs to produce `compression`.
    pub fn for_compression(compression: Compression) -> Caps {
        match compression {
            Compression::Gzip => Caps::GZIP,
            Compression::Zstd => Caps::ZSTD,
        }
    }
}

/// First bytes on every connection, client to server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preamble {
    pub kind: ConnKind,
    pub version: u16,
    pub caps: Caps,
}

impl Preamble {
    pub fn new(kind: ConnKind, caps: Caps) -> Self {
        Preamble { kind, version: PROTOCOL_VERSION, caps }
    }

    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut out = [0u8; PREAMBLE_LEN];
        out[..4].copy_from_slice(&self.kind.magic());
        out[4..6].copy_from_slice(&self.version.to_be_bytes());
        out[6..].copy_from_slice(&self.caps.0.to_be_bytes());
        out
    }

    /// Decodes a preamble. The version is returned as sent; whether it is supported is
    /// the server's decision (it answers with a `BadVersion` refusal).
    pub fn decode(bytes: &[u8; PREAMBLE_LEN]) -> Result<Self, DecodeError> {
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&bytes[..4]);
        let kind = ConnKind::from_magic(magic).ok_or(DecodeError::UnknownConnKind(magic))?;
        let version = u16::from_be_bytes([bytes[4], bytes[5]]);
        let caps = Caps(u32::from_be_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]));
        Ok(Preamble { kind, version, caps })
    }
}

/// Archive compression, chosen by the server's storage and told to the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Gzip,
    Zstd,
}

impl Compression {
    fn code(self) -> u8 {
        match self {
            Compression::Gzip => 1,
            Compression::Zstd => 2,
        }
    }

    fn from_code(code: u8) -> Result<Self, DecodeError> {
        match code {
            1 => Ok(Compression::Gzip),
            2 => Ok(Compression::Zstd),
            other => Err(DecodeError::UnknownValue { field: "compression", value: other.into() }),
        }
    }

    /// File name extension of an archive with this compression.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Gzip => "tar.gz",
            Compression::Zstd => "tar.zst",
        }
    }

    /// The level used when a storage does not set one: what `gzip`/`pigz` and `zstd`
    /// use by default, so archives compare with the usual tools.
    pub fn default_level(self) -> i32 {
        match self {
            Compression::Gzip => 6,
            Compression::Zstd => 3,
        }
    }

    /// Levels the compressor accepts.
    pub fn level_range(self) -> std::ops::RangeInclusive<i32> {
        match self {
            Compression::Gzip => 1..=9,
            Compression::Zstd => 1..=19,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

/// Why a server refused or ended something, or why an agent gave up. Carried by
/// `Refused` and `Abort`; unknown codes from a newer peer are kept as `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    BadVersion,
    UnknownStorage,
    Busy,
    DiskFull,
    IdentityMismatch,
    NotAllowed,
    Draining,
    Protocol,
    UnknownSession,
    Unsupported,
    WriteError,
    VerifyFailed,
    Expired,
    Internal,
    TooManyStreams,
    Cancelled,
    SourceFailed,
    QuotaExceeded,
    NotFound,
    Other(u16),
}

impl Reason {
    pub fn code(self) -> u16 {
        match self {
            Reason::BadVersion => 0x0001,
            Reason::UnknownStorage => 0x0002,
            Reason::Busy => 0x0003,
            Reason::DiskFull => 0x0004,
            Reason::IdentityMismatch => 0x0005,
            Reason::NotAllowed => 0x0006,
            Reason::Draining => 0x0007,
            Reason::Protocol => 0x0008,
            Reason::UnknownSession => 0x0009,
            Reason::Unsupported => 0x000a,
            Reason::WriteError => 0x000b,
            Reason::VerifyFailed => 0x000c,
            Reason::Expired => 0x000d,
            Reason::Internal => 0x000e,
            Reason::TooManyStreams => 0x000f,
            Reason::Cancelled => 0x0010,
            Reason::SourceFailed => 0x0011,
            Reason::QuotaExceeded => 0x0012,
            Reason::NotFound => 0x0013,
            Reason::Other(code) => code,
        }
    }

    pub fn from_code(code: u16) -> Self {
        match code {
            0x0001 => Reason::BadVersion,
            0x0002 => Reason::UnknownStorage,
            0x0003 => Reason::Busy,
            0x0004 => Reason::DiskFull,
            0x0005 => Reason::IdentityMismatch,
            0x0006 => Reason::NotAllowed,
            0x0007 => Reason::Draining,
            0x0008 => Reason::Protocol,
            0x0009 => Reason::UnknownSession,
            0x000a => Reason::Unsupported,
            0x000b => Reason::WriteError,
            0x000c => Reason::VerifyFailed,
            0x000d => Reason::Expired,
            0x000e => Reason::Internal,
            0x000f => Reason::TooManyStreams,
            0x0010 => Reason::Cancelled,
            0x0011 => Reason::SourceFailed,
            0x0012 => Reason::QuotaExceeded,
            0x0013 => Reason::NotFound,
            other => Reason::Other(other),
        }
    }

    /// Whether trying the same thing again later can succeed without an operator.
    pub fn is_transient(self) -> bool {
        matches!(self, Reason::Busy | Reason::Draining | Reason::Expired | Reason::Internal)
    }

    /// The refusal in plain words, for people.
    pub fn describe(self) -> String {
        match self {
            Reason::BadVersion => "the server does not speak this protocol version".into(),
            Reason::UnknownStorage => "the server has no storage of that name".into(),
            Reason::Busy => "a backup of this entry is already running on the server".into(),
            Reason::DiskFull => "the server's storage is full".into(),
            Reason::IdentityMismatch => "the agent name does not match the identity in its certificate".into(),
            Reason::NotAllowed => "the server does not allow this for this agent".into(),
            Reason::Draining => "the server is shutting down".into(),
            Reason::Protocol => "protocol error".into(),
            Reason::UnknownSession => "the server does not know this session".into(),
            Reason::Unsupported => "the agent and server do not share a required feature".into(),
            Reason::WriteError => "the server could not write the archive".into(),
            Reason::VerifyFailed => "the archive failed verification on the server".into(),
            Reason::Expired => "the session expired on the server".into(),
            Reason::Internal => "internal server error".into(),
            Reason::TooManyStreams => "too many streams for this session".into(),
            Reason::Cancelled => "cancelled".into(),
            Reason::SourceFailed => "the agent could not read its sources".into(),
            Reason::QuotaExceeded => "the agent's quota on this storage is used up".into(),
            Reason::NotFound => "the server has no such archive for this agent".into(),
            Reason::Other(code) => format!("unknown reason 0x{code:04x}"),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Reason::BadVersion => "bad version",
            Reason::UnknownStorage => "unknown storage",
            Reason::Busy => "busy",
            Reason::DiskFull => "disk full",
            Reason::IdentityMismatch => "identity mismatch",
            Reason::NotAllowed => "not allowed",
            Reason::Draining => "draining",
            Reason::Protocol => "protocol error",
            Reason::UnknownSession => "unknown session",
            Reason::Unsupported => "unsupported",
            Reason::WriteError => "write error",
            Reason::VerifyFailed => "verify failed",
            Reason::Expired => "expired",
            Reason::Internal => "internal error",
            Reason::TooManyStreams => "too many streams",
            Reason::Cancelled => "cancelled",
            Reason::SourceFailed => "source failed",
            Reason::QuotaExceeded => "quota exceeded",
            Reason::NotFound => "not found",
            Reason::Other(code) => return write!(f, "reason 0x{code:04x}"),
        };
        f.write_str(s)
    }
}

/// Client → server: open a backup session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The agent's configured name; must match its certificate identity.
    pub agent: Name,
    pub storage: Name,
    pub backup: Name,
    /// The agent's software version, recorded in the manifest.
    pub agent_version: String,
    /// Size of every chunk but the last.
    pub chunk_size: u32,
    /// Most streams the agent intends to use.
    pub streams: u16,
}

/// Server → client: the session is open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub session: SessionId,
    pub compression: Compression,
    pub level: i32,
    /// Most streams the server allows for this session (at least 1).
    pub max_streams: u16,
}

/// Client → server: attach stream `stream` to `session`.
///
/// `generation` counts the agent's connection attempts for this stream. A join with a
/// higher generation than the attached one replaces it (the old connection may be
/// half-open and not yet noticed); an equal or lower one is a duplicate and refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Join {
    pub session: SessionId,
    pub stream: u16,
    pub generation: u32,
}

/// Server → client: the stream is attached.
///
/// `contiguous` is how many chunks from 0 the server holds without a gap. An agent
/// whose window no longer holds chunk `contiguous` (it was acknowledged and dropped,
/// then lost by the server, e.g. in a power cut without `chunk_fsync`) cannot resume
/// and starts a fresh session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    pub stream: u16,
    pub contiguous: u64,
}

/// Client → server (first frame of a `JOIN` connection): what became of `session`?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub session: SessionId,
}

/// Server → client: the answer to `Status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// The server does not know the session (never existed, or forgotten).
    Unknown,
    /// Still receiving; `contiguous` as in [`Joined`].
    Open { contiguous: u64 },
    /// Committed: the same answer `Commit` got.
    Committed(Committed),
    /// Ended without a commit.
    Failed(Refusal),
}

/// Client → server: one piece of the compressed archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub seq: u64,
    pub offset: u64,
    /// CRC32C of `data`, checked before the server writes anything.
    pub crc32c: u32,
    pub data: Bytes,
}

impl Chunk {
    pub fn new(seq: u64, offset: u64, data: Bytes) -> Self {
        Chunk { seq, offset, crc32c: crc32c::crc32c(&data), data }
    }

    pub fn crc_ok(&self) -> bool {
        crc32c::crc32c(&self.data) == self.crc32c
    }

    /// Writes the frame header and the chunk's fixed fields, but not `data`, so that
    /// a connection can send the payload from its own buffer without copying it.
    pub fn encode_head(&self, dst: &mut BytesMut) {
        let len = CHUNK_HEADER_LEN + self.data.len();
        dst.reserve(FRAME_HEADER_LEN + CHUNK_HEADER_LEN);
        dst.put_u8(FrameType::CHUNK.0);
        dst.put_u32(len as u32);
        dst.put_u64(self.seq);
        dst.put_u64(self.offset);
        dst.put_u32(self.crc32c);
    }
}

/// Server → client: chunk `seq` is written (and durable if the storage asks for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub seq: u64,
}

/// What the agent's archiver saw, recorded in the manifest sidecar.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Entries written to the archive (files, directories, links, …).
    pub entries: u64,
    /// Bytes of file content read from the source.
    pub bytes_read: u64,
    /// Entries skipped, each reported to the agent's user with its reason.
    pub skipped: u64,
}

/// Client → server: all chunks are sent; verify and commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    pub total_len: u64,
    pub chunks: u64,
    pub sha256: [u8; 32],
    pub stats: SourceStats,
    /// The archive's catalog, sent before the `Commit` as `CatalogPart` frames on the
    /// same connection; the server checks it and commits it beside the archive.
    pub catalog: Option<CatalogDigest>,
}

/// Length and SHA-256 of a catalog sent with `CatalogPart` frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatalogDigest {
    pub len: u64,
    pub sha256: [u8; 32],
}

/// Client → server before `Commit`: bytes of the catalog at `offset`. Positional, so
/// sending it again after a reconnect is harmless.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogPart {
    pub offset: u64,
    pub data: Bytes,
}

/// Server → client: the archive is committed under `archive`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub archive: String,
    pub size: u64,
    pub sha256: [u8; 32],
}

/// Server → agent while a commit runs (verifying the stored file can take minutes
/// for a large archive): how far the read-back has come. It keeps the agent's
/// deadline for the `Commit` from expiring while the server makes progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitProgress {
    /// Bytes of the stored upload read back and hashed so far.
    pub verified: u64,
    pub total: u64,
}

/// A refusal or abort with its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        let mut message = message.into();
        truncate_utf8(&mut message, MAX_TEXT_LEN);
        Refusal { reason, message }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{} ({})", self.reason.describe(), self.reason)
        } else {
            write!(f, "{} ({}): {}", self.reason.describe(), self.reason, self.message)
        }
    }
}

/// One storage in a `Health` reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageHealth {
    pub name: Name,
    pub compression: Compression,
    /// Bytes available to the server process (`statvfs` `f_bavail * f_frsize`).
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// Server → client: answer to a `PING` connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub server_version: String,
    pub uptime_secs: u64,
    pub draining: bool,
    pub active_sessions: u32,
    pub storages: Vec<StorageHealth>,
}

/// Control channel, agent → server: keep-alive; the server answers with `CtlPong`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtlPing {
    pub nonce: u64,
}

/// Control channel, server → agent: the answer to `CtlPing`, with the server's load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtlPong {
    pub nonce: u64,
    /// 1-minute load average × 1000.
    pub load_milli: u32,
    /// Free bytes of the fullest storage.
    pub free_bytes: u64,
}

/// Control channel: a JSON document (an `admin::AgentReport` going up, an
/// `admin::ControlCommand` coming down), numbered by `id` for commands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtlMessage {
    pub id: u64,
    pub json: String,
}

/// Control channel, agent → server: what became of command `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtlResult {
    pub id: u64,
    pub ok: bool,
    pub message: String,
}

/// Every frame of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    Refused(Refusal),
    Join(Join),
    Joined(Joined),
    Chunk(Chunk),
    Ack(Ack),
    Commit(Commit),
    Committed(Committed),
    Abort(Refusal),
    Health(Health),
    Status(Status),
    SessionState(SessionState),
    CtlPing(CtlPing),
    CtlPong(CtlPong),
    CtlReport(CtlMessage),
    CtlCommand(CtlMessage),
    CtlResult(CtlResult),
    /// Agent → server on a data stream with nothing to send, so silence means a
    /// vanished peer, never an idle one.
    Keepalive,
    Committing(CommitProgress),
    /// The request of a `RSTR` connection: a [`crate::restore::RestoreRequest`] as JSON.
    RestoreRequest(String),
    /// An answer on a `RSTR` connection: a [`crate::restore::RestoreReply`] as JSON.
    RestoreReply(String),
    CatalogPart(CatalogPart),
    /// The request of an `ENRL` connection: a [`crate::enroll::EnrollRequest`] as JSON.
    EnrollRequest(String),
    /// An answer on an `ENRL` connection: a [`crate::enroll::EnrollReply`] as JSON.
    EnrollReply(String),
}

/// The type byte of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameType(pub u8);

impl FrameType {
    pub const HELLO: FrameType = FrameType(0x01);
    pub const WELCOME: FrameType = FrameType(0x02);
    pub const REFUSED: FrameType = FrameType(0x03);
    pub const JOIN: FrameType = FrameType(0x04);
    pub const JOINED: FrameType = FrameType(0x05);
    pub const CHUNK: FrameType = FrameType(0x10);
    pub const ACK: FrameType = FrameType(0x11);
    pub const KEEPALIVE: FrameType = FrameType(0x12);
    pub const COMMIT: FrameType = FrameType(0x20);
    pub const COMMITTED: FrameType = FrameType(0x21);
    pub const STATUS: FrameType = FrameType(0x22);
    pub const SESSION_STATE: FrameType = FrameType(0x23);
    pub const COMMITTING: FrameType = FrameType(0x24);
    pub const ABORT: FrameType = FrameType(0x30);
    pub const HEALTH: FrameType = FrameType(0x40);
    pub const CTL_PING: FrameType = FrameType(0x50);
    pub const CTL_PONG: FrameType = FrameType(0x51);
    pub const CTL_REPORT: FrameType = FrameType(0x52);
    pub const CTL_COMMAND: FrameType = FrameType(0x53);
    pub const CTL_RESULT: FrameType = FrameType(0x54);
    pub const CATALOG_PART: FrameType = FrameType(0x25);
    pub const RESTORE_REQUEST: FrameType = FrameType(0x60);
    pub const RESTORE_REPLY: FrameType = FrameType(0x61);
    pub const ENROLL_REQUEST: FrameType = FrameType(0x70);
    pub const ENROLL_REPLY: FrameType = FrameType(0x71);

    /// Largest payload a frame of this type may declare, or `None` for unknown types.
    pub fn max_payload(self) -> Option<u32> {
        match self {
            FrameType::CHUNK | FrameType::CATALOG_PART => Some(MAX_CHUNK_PAYLOAD),
            FrameType::HELLO
            | FrameType::WELCOME
            | FrameType::REFUSED
            | FrameType::JOIN
            | FrameType::JOINED
            | FrameType::ACK
            | FrameType::KEEPALIVE
            | FrameType::COMMITTING
            | FrameType::COMMIT
            | FrameType::COMMITTED
            | FrameType::STATUS
            | FrameType::SESSION_STATE
            | FrameType::ABORT
            | FrameType::HEALTH
            | FrameType::CTL_PING
            | FrameType::CTL_PONG
            | FrameType::CTL_REPORT
            | FrameType::CTL_COMMAND
            | FrameType::CTL_RESULT
            | FrameType::RESTORE_REQUEST
            | FrameType::RESTORE_REPLY
            | FrameType::ENROLL_REQUEST
            | FrameType::ENROLL_REPLY => Some(MAX_CONTROL_PAYLOAD),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FrameType::HELLO => "Hello",
            FrameType::WELCOME => "Welcome",
            FrameType::REFUSED => "Refused",
            FrameType::JOIN => "Join",
            FrameType::JOINED => "Joined",
            FrameType::CHUNK => "Chunk",
            FrameType::ACK => "Ack",
            FrameType::KEEPALIVE => "Keepalive",
            FrameType::COMMITTING => "Committing",
            FrameType::COMMIT => "Commit",
            FrameType::COMMITTED => "Committed",
            FrameType::STATUS => "Status",
            FrameType::SESSION_STATE => "SessionState",
            FrameType::ABORT => "Abort",
            FrameType::HEALTH => "Health",
            FrameType::CTL_PING => "CtlPing",
            FrameType::CTL_PONG => "CtlPong",
            FrameType::CTL_REPORT => "CtlReport",
            FrameType::CTL_COMMAND => "CtlCommand",
            FrameType::CTL_RESULT => "CtlResult",
            FrameType::CATALOG_PART => "CatalogPart",
            FrameType::RESTORE_REQUEST => "RestoreRequest",
            FrameType::RESTORE_REPLY => "RestoreReply",
            FrameType::ENROLL_REQUEST => "EnrollRequest",
            FrameType::ENROLL_REPLY => "EnrollReply",
            _ => "unknown",
        }
    }
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::HELLO,
            Frame::Welcome(_) => FrameType::WELCOME,
            Frame::Refused(_) => FrameType::REFUSED,
            Frame::Join(_) => FrameType::JOIN,
            Frame::Joined(_) => FrameType::JOINED,
            Frame::Chunk(_) => FrameType::CHUNK,
            Frame::Ack(_) => FrameType::ACK,
            Frame::Commit(_) => FrameType::COMMIT,
            Frame::Committed(_) => FrameType::COMMITTED,
            Frame::Abort(_) => FrameType::ABORT,
            Frame::Health(_) => FrameType::HEALTH,
            Frame::Status(_) => FrameType::STATUS,
            Frame::SessionState(_) => FrameType::SESSION_STATE,
            Frame::CtlPing(_) => FrameType::CTL_PING,
            Frame::CtlPong(_) => FrameType::CTL_PONG,
            Frame::CtlReport(_) => FrameType::CTL_REPORT,
            Frame::CtlCommand(_) => FrameType::CTL_COMMAND,
            Frame::CtlResult(_) => FrameType::CTL_RESULT,
            Frame::Keepalive => FrameType::KEEPALIVE,
            Frame::Committing(_) => FrameType::COMMITTING,
            Frame::CatalogPart(_) => FrameType::CATALOG_PART,
            Frame::RestoreRequest(_) => FrameType::RESTORE_REQUEST,
            Frame::RestoreReply(_) => FrameType::RESTORE_REPLY,
            Frame::EnrollRequest(_) => FrameType::ENROLL_REQUEST,
            Frame::EnrollReply(_) => FrameType::ENROLL_REPLY,
        }
    }

    /// Appends the whole frame, header included, to `dst`.
    ///
    /// A field over its limit is an error, never cut short: a truncated document
    /// would only fail later, at the peer, far from its cause. On error `dst` is left
    /// as it was.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        if let Frame::Chunk(chunk) = self {
            if chunk.data.len() > crate::limits::MAX_CHUNK_SIZE as usize {
                return Err(EncodeError::TooLong {
                    frame: "Chunk",
                    field: "data",
                    len: chunk.data.len(),
                    max: crate::limits::MAX_CHUNK_SIZE as usize,
                });
            }
            chunk.encode_head(dst);
            dst.extend_from_slice(&chunk.data);
            return Ok(());
        }
        let start = dst.len();
        let result = self.encode_control(dst);
        if result.is_err() {
            dst.truncate(start);
        }
        result
    }

    fn encode_control(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let frame = self.frame_type().name();
        let start = dst.len();
        dst.put_u8(self.frame_type().0);
        dst.put_u32(0); // patched below once the payload length is known
        match self {
            Frame::Hello(m) => {
                put_name(dst, &m.agent);
                put_name(dst, &m.storage);
                put_name(dst, &m.backup);
                put_text(dst, frame, "agent_version", &m.agent_version)?;
                dst.put_u32(m.chunk_size);
                dst.put_u16(m.streams);
            }
            Frame::Welcome(m) => {
                dst.put_slice(&m.session.0);
                dst.put_u8(m.compression.code());
                dst.put_i32(m.level);
                dst.put_u16(m.max_streams);
            }
            Frame::Refused(m) | Frame::Abort(m) => {
                dst.put_u16(m.reason.code());
                put_text(dst, frame, "message", &m.message)?;
            }
            Frame::Join(m) => {
                dst.put_slice(&m.session.0);
                dst.put_u16(m.stream);
                dst.put_u32(m.generation);
            }
            Frame::Joined(m) => {
                dst.put_u16(m.stream);
                dst.put_u64(m.contiguous);
            }
            Frame::Status(m) => dst.put_slice(&m.session.0),
            Frame::CtlPing(m) => dst.put_u64(m.nonce),
            Frame::CtlPong(m) => {
                dst.put_u64(m.nonce);
                dst.put_u32(m.load_milli);
                dst.put_u64(m.free_bytes);
            }
            Frame::CtlReport(m) | Frame::CtlCommand(m) => {
                dst.put_u64(m.id);
                put_json(dst, frame, &m.json)?;
            }
            Frame::CtlResult(m) => {
                dst.put_u64(m.id);
                dst.put_u8(u8::from(m.ok));
                put_text(dst, frame, "message", &m.message)?;
            }
            Frame::SessionState(m) => match m {
                SessionState::Unknown => dst.put_u8(0),
                SessionState::Open { contiguous } => {
                    dst.put_u8(1);
                    dst.put_u64(*contiguous);
                }
                SessionState::Committed(c) => {
                    dst.put_u8(2);
                    put_text(dst, frame, "archive", &c.archive)?;
                    dst.put_u64(c.size);
                    dst.put_slice(&c.sha256);
                }
                SessionState::Failed(r) => {
                    dst.put_u8(3);
                    dst.put_u16(r.reason.code());
                    put_text(dst, frame, "message", &r.message)?;
                }
            },
            Frame::RestoreRequest(json)
            | Frame::RestoreReply(json)
            | Frame::EnrollRequest(json)
            | Frame::EnrollReply(json) => put_json(dst, frame, json)?,
            Frame::Ack(m) => dst.put_u64(m.seq),
            Frame::Keepalive => {}
            Frame::Committing(m) => {
                dst.put_u64(m.verified);
                dst.put_u64(m.total);
            }
            Frame::Commit(m) => {
                dst.put_u64(m.total_len);
                dst.put_u64(m.chunks);
                dst.put_slice(&m.sha256);
                dst.put_u64(m.stats.entries);
                dst.put_u64(m.stats.bytes_read);
                dst.put_u64(m.stats.skipped);
                match &m.catalog {
                    None => dst.put_u8(0),
                    Some(c) => {
                        dst.put_u8(1);
                        dst.put_u64(c.len);
                        dst.put_slice(&c.sha256);
                    }
                }
            }
            Frame::CatalogPart(m) => {
                if m.data.len() > crate::limits::MAX_CHUNK_SIZE as usize {
                    return Err(EncodeError::TooLong {
                        frame,
                        field: "data",
                        len: m.data.len(),
                        max: crate::limits::MAX_CHUNK_SIZE as usize,
                    });
                }
                dst.put_u64(m.offset);
                dst.put_slice(&m.data);
            }
            Frame::Committed(m) => {
                put_text(dst, frame, "archive", &m.archive)?;
                dst.put_u64(m.size);
                dst.put_slice(&m.sha256);
            }
            Frame::Health(m) => {
                put_text(dst, frame, "server_version", &m.server_version)?;
                dst.put_u64(m.uptime_secs);
                dst.put_u8(u8::from(m.draining));
                dst.put_u32(m.active_sessions);
                if m.storages.len() > MAX_STORAGES {
                    return Err(EncodeError::TooLong {
                        frame,
                        field: "storages",
                        len: m.storages.len(),
                        max: MAX_STORAGES,
                    });
                }
                dst.put_u16(m.storages.len() as u16);
                for s in &m.storages {
                    put_name(dst, &s.name);
                    dst.put_u8(s.compression.code());
                    dst.put_u64(s.free_bytes);
                    dst.put_u64(s.total_bytes);
                }
            }
            Frame::Chunk(_) => unreachable!("handled above"),
        }
        let len = (dst.len() - start - FRAME_HEADER_LEN) as u32;
        dst[start + 1..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    /// Convenience: the encoded frame as one buffer.
    pub fn to_bytes(&self) -> Result<BytesMut, EncodeError> {
        let mut out = BytesMut::new();
        self.encode(&mut out)?;
        Ok(out)
    }
}

/// Why bytes are not a valid frame or preamble.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown connection kind {0:02x?}")]
    UnknownConnKind([u8; 4]),
    #[error("unknown frame type 0x{0:02x}")]
    UnknownFrameType(u8),
    #[error("{frame} frame declares {len} bytes; the limit is {max}")]
    FrameTooLarge { frame: &'static str, len: u32, max: u32 },
    #[error("{frame} frame is truncated")]
    Truncated { frame: &'static str },
    #[error("{frame} frame has {extra} unexpected trailing bytes")]
    TrailingBytes { frame: &'static str, extra: usize },
    #[error("{frame} frame: invalid {field}: {error}")]
    BadName { frame: &'static str, field: &'static str, error: NameError },
    #[error("{frame} frame: {field} is not valid UTF-8")]
    BadUtf8 { frame: &'static str, field: &'static str },
    #[error("{frame} frame: {field} is {len} bytes; the limit is {max}")]
    TooLong { frame: &'static str, field: &'static str, len: usize, max: usize },
    #[error("unknown {field} value 0x{value:x}")]
    UnknownValue { field: &'static str, value: u32 },
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{frame} frame: {field} is {len} bytes; the limit is {max}")]
    TooLong { frame: &'static str, field: &'static str, len: usize, max: usize },
}

/// How many bytes `buf` must hold before [`decode_frame`] can make progress: the
/// header, then the whole frame. Already-validated, so safe to reserve.
pub fn bytes_needed(buf: &[u8]) -> Result<usize, DecodeError> {
    match check_header(buf)? {
        None => Ok(FRAME_HEADER_LEN),
        Some((_, len)) => Ok(FRAME_HEADER_LEN + len as usize),
    }
}

fn check_header(buf: &[u8]) -> Result<Option<(FrameType, u32)>, DecodeError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let ty = FrameType(buf[0]);
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let max = ty.max_payload().ok_or(DecodeError::UnknownFrameType(ty.0))?;
    if len > max {
        return Err(DecodeError::FrameTooLarge { frame: ty.name(), len, max });
    }
    Ok(Some((ty, len)))
}

/// Takes one whole frame off the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (nothing is consumed),
/// and an error as soon as the header or the payload is invalid. A `Chunk`'s data is
/// split off `buf` without copying.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
    let Some((ty, len)) = check_header(buf)? else {
        return Ok(None);
    };
    let total = FRAME_HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    frame.advance(FRAME_HEADER_LEN);
    decode_payload(ty, frame).map(Some)
}

fn decode_payload(ty: FrameType, payload: Bytes) -> Result<Frame, DecodeError> {
    let name = ty.name();
    if ty == FrameType::CHUNK {
        let mut r = Reader::new(name, &payload);
        let seq = r.u64()?;
        let offset = r.u64()?;
        let crc32c = r.u32()?;
        let data = payload.slice(CHUNK_HEADER_LEN..);
        return Ok(Frame::Chunk(Chunk { seq, offset, crc32c, data }));
    }
    if ty == FrameType::CATALOG_PART {
        let offset = Reader::new(name, &payload).u64()?;
        return Ok(Frame::CatalogPart(CatalogPart { offset, data: payload.slice(8..) }));
    }
    let mut r = Reader::new(name, &payload);
    let frame = match ty {
        FrameType::HELLO => Frame::Hello(Hello {
            agent: r.name("agent")?,
            storage: r.name("storage")?,
            backup: r.name("backup")?,
            agent_version: r.text("agent_version")?,
            chunk_size: r.u32()?,
            streams: r.u16()?,
        }),
        FrameType::WELCOME => Frame::Welcome(Welcome {
            session: SessionId(r.array()?),
            compression: Compression::from_code(r.u8()?)?,
            level: r.u32()? as i32,
            max_streams: r.u16()?,
        }),
        FrameType::REFUSED => Frame::Refused(r.refusal()?),
        FrameType::ABORT => Frame::Abort(r.refusal()?),
        FrameType::JOIN => Frame::Join(Join { session: SessionId(r.array()?), stream: r.u16()?, generation: r.u32()? }),
        FrameType::JOINED => Frame::Joined(Joined { stream: r.u16()?, contiguous: r.u64()? }),
        FrameType::STATUS => Frame::Status(Status { session: SessionId(r.array()?) }),
        FrameType::CTL_PING => Frame::CtlPing(CtlPing { nonce: r.u64()? }),
        FrameType::CTL_PONG => Frame::CtlPong(CtlPong { nonce: r.u64()?, load_milli: r.u32()?, free_bytes: r.u64()? }),
        FrameType::CTL_REPORT => Frame::CtlReport(CtlMessage { id: r.u64()?, json: r.json()? }),
        FrameType::CTL_COMMAND => Frame::CtlCommand(CtlMessage { id: r.u64()?, json: r.json()? }),
        FrameType::CTL_RESULT => {
            Frame::CtlResult(CtlResult { id: r.u64()?, ok: r.bool("ok")?, message: r.text("message")? })
        }
        FrameType::SESSION_STATE => Frame::SessionState(match r.u8()? {
            0 => SessionState::Unknown,
            1 => SessionState::Open { contiguous: r.u64()? },
            2 => SessionState::Committed(Committed { archive: r.text("archive")?, size: r.u64()?, sha256: r.array()? }),
            3 => SessionState::Failed(r.refusal()?),
            v => return Err(DecodeError::UnknownValue { field: "session state", value: v.into() }),
        }),
        FrameType::RESTORE_REQUEST => Frame::RestoreRequest(r.json()?),
        FrameType::RESTORE_REPLY => Frame::RestoreReply(r.json()?),
        FrameType::ENROLL_REQUEST => Frame::EnrollRequest(r.json()?),
        FrameType::ENROLL_REPLY => Frame::EnrollReply(r.json()?),
        FrameType::ACK => Frame::Ack(Ack { seq: r.u64()? }),
        FrameType::KEEPALIVE => Frame::Keepalive,
        FrameType::COMMITTING => Frame::Committing(CommitProgress { verified: r.u64()?, total: r.u64()? }),
        FrameType::COMMIT => Frame::Commit(Commit {
            total_len: r.u64()?,
            chunks: r.u64()?,
            sha256: r.array()?,
            stats: SourceStats { entries: r.u64()?, bytes_read: r.u64()?, skipped: r.u64()? },
            catalog: match r.u8()? {
                0 => None,
                1 => Some(CatalogDigest { len: r.u64()?, sha256: r.array()? }),
                v => return Err(DecodeError::UnknownValue { field: "catalog flag", value: v.into() }),
            },
        }),
        FrameType::COMMITTED => {
            Frame::Committed(Committed { archive: r.text("archive")?, size: r.u64()?, sha256: r.array()? })
        }
        FrameType::HEALTH => {
            let server_version = r.text("server_version")?;
            let uptime_secs = r.u64()?;
            let draining = r.bool("draining")?;
            let active_sessions = r.u32()?;
            let count = usize::from(r.u16()?);
            if count > MAX_STORAGES {
                return Err(DecodeError::TooLong { frame: name, field: "storages", len: count, max: MAX_STORAGES });
            }
            // Each entry is at least 18 bytes, so `count` is also bounded by the
            // payload actually present; no allocation larger than the frame happens.
            let mut storages = Vec::with_capacity(count.min(r.remaining() / 18));
            for _ in 0..count {
                storages.push(StorageHealth {
                    name: r.name("storage name")?,
                    compression: Compression::from_code(r.u8()?)?,
                    free_bytes: r.u64()?,
                    total_bytes: r.u64()?,
                });
            }
            Frame::Health(Health { server_version, uptime_secs, draining, active_sessions, storages })
        }
        other => return Err(DecodeError::UnknownFrameType(other.0)),
    };
    r.finish()?;
    Ok(frame)
}

fn put_name(dst: &mut BytesMut, name: &Name) {
    dst.put_u8(name.as_str().len() as u8);
    dst.put_slice(name.as_str().as_bytes());
}

fn put_text(dst: &mut BytesMut, frame: &'static str, field: &'static str, text: &str) -> Result<(), EncodeError> {
    if text.len() > MAX_TEXT_LEN {
        return Err(EncodeError::TooLong { frame, field, len: text.len(), max: MAX_TEXT_LEN });
    }
    dst.put_u16(text.len() as u16);
    dst.put_slice(text.as_bytes());
    Ok(())
}

/// Longest JSON document in a control-channel frame.
pub const MAX_JSON_LEN: usize = MAX_CONTROL_PAYLOAD as usize - 16;

fn put_json(dst: &mut BytesMut, frame: &'static str, json: &str) -> Result<(), EncodeError> {
    if json.len() > MAX_JSON_LEN {
        return Err(EncodeError::TooLong { frame, field: "json", len: json.len(), max: MAX_JSON_LEN });
    }
    dst.put_u32(json.len() as u32);
    dst.put_slice(json.as_bytes());
    Ok(())
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Cursor over one complete frame payload; running short here means the frame is
/// malformed (the length said the payload was complete).
struct Reader<'a> {
    frame: &'static str,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(frame: &'static str, buf: &'a [u8]) -> Self {
        Reader { frame, buf }
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated { frame: self.frame });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::UnknownValue { field, value: v.into() }),
        }
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn name(&mut self, field: &'static str) -> Result<Name, DecodeError> {
        let len = usize::from(self.u8()?);
        if len > MAX_NAME_LEN {
            return Err(DecodeError::TooLong { frame: self.frame, field, len, max: MAX_NAME_LEN });
        }
        let bytes = self.take(len)?;
        let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::BadUtf8 { frame: self.frame, field })?;
        Name::new(s).map_err(|error| DecodeError::BadName { frame: self.frame, field, error })
    }

    fn text(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = usize::from(self.u16()?);
        if len > MAX_TEXT_LEN {
            return Err(DecodeError::TooLong { frame: self.frame, field, len, max: MAX_TEXT_LEN });
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| DecodeError::BadUtf8 { frame: self.frame, field })
    }

    fn json(&mut self) -> Result<String, DecodeError> {
        let len = self.u32()? as usize;
        if len > MAX_JSON_LEN {
            return Err(DecodeError::TooLong { frame: self.frame, field: "json", len, max: MAX_JSON_LEN });
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8 { frame: self.frame, field: "json" })
    }

    fn refusal(&mut self) -> Result<Refusal, DecodeError> {
        Ok(Refusal { reason: Reason::from_code(self.u16()?), message: self.text("message")? })
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { frame: self.frame, extra: self.buf.len() })
        }
    }
}

#[cfg(test)]
mod tests;
