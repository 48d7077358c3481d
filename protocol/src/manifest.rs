//! The manifest sidecar written next to every committed archive
//! (`<archive>.json`): what the archive is and how to check it without the server.

use crate::wire::Compression;

/// Version of the manifest layout.
pub const MANIFEST_FORMAT: u32 = 1;

/// Contents of `<archive>.json`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// Archive file name (same directory).
    pub archive: String,
    pub agent: String,
    pub backup: String,
    pub storage: String,
    pub compression: Compression,
    pub compression_level: i32,
    /// Archive size in bytes.
    pub size: u64,
    /// SHA-256 of the archive file, lowercase hex.
    pub sha256: String,
    pub chunks: u64,
    pub chunk_size: u32,
    /// Entries in the tar archive (files, directories, links, …).
    pub entries: u64,
    /// Bytes of file content the agent read.
    pub bytes_read: u64,
    /// Entries the agent skipped (each reported with its reason on the agent).
    pub skipped: u64,
    /// RFC 3339 UTC.
    pub started_at: String,
    pub finished_at: String,
    pub agent_version: String,
    pub server_version: String,
    /// Session id, to find the session in logs and history.
    pub session: String,
    /// Position of this archive in its entry's commit order (1, 2, …). Rotation and
    /// "newest" follow it, never the time stamp in the name: clocks step. Absent in
    /// manifests written before it existed; those archives count as older than every
    /// numbered one, in name order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_seq: Option<u64>,
}

impl Manifest {
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a manifest always serializes");
        s.push('\n');
        s
    }

    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// The bytes of hex text (either case); `None` for an odd length or a non-hex digit.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_and_complete() {
        assert_eq!(hex(&[0x00, 0xab, 0x0f, 0xff]), "00ab0fff");
    }

    #[test]
    fn manifest_round_trips_and_rejects_unknown_keys() {
        let m = Manifest {
            format: MANIFEST_FORMAT,
            archive: "a-b-20260101T000000Z.tar.gz".into(),
            agent: "a".into(),
            backup: "b".into(),
            storage: "main".into(),
            compression: Compression::Gzip,
            compression_level: 6,
            size: 10,
            sha256: "00".repeat(32),
            chunks: 1,
            chunk_size: 1 << 20,
            entries: 3,
            bytes_read: 100,
            skipped: 0,
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: "2026-01-01T00:00:01Z".into(),
            agent_version: "0.1.0".into(),
            server_version: "0.1.0".into(),
            session: "00".repeat(16),
            commit_seq: Some(3),
        };
        assert_eq!(Manifest::from_json(&m.to_json()).expect("parses"), m);
        let extra = m.to_json().replacen('{', "{\"surprise\": 1,", 1);
        assert!(Manifest::from_json(&extra).is_err());
    }
}
