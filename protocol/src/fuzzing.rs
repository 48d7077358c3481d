//! Entry points for the fuzz targets in `protocol/fuzz`, shared with the test that
//! replays their corpus (`protocol/tests/fuzz_corpus.rs`) so CI runs the same code.
//! Each function must never panic, whatever bytes it gets, except on a real bug.

use std::path::Path;

use bytes::BytesMut;

use crate::config::{AgentConfig, ServerConfig};
use crate::wire::{PREAMBLE_LEN, Preamble, decode_frame};

/// Decodes frames back to back; every frame that decodes must encode to bytes that
/// decode to the same frame.
pub fn frames(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decode_frame(&mut buf) {
        let mut again = frame.to_bytes().expect("a decoded frame re-encodes");
        let decoded = decode_frame(&mut again);
        assert_eq!(decoded, Ok(Some(frame)), "re-encoded frame differs");
        assert!(again.is_empty());
    }
}

/// Decodes a connection preamble.
pub fn preamble(data: &[u8]) {
    if let Some(bytes) = data.get(..PREAMBLE_LEN) {
        let mut p = [0u8; PREAMBLE_LEN];
        p.copy_from_slice(bytes);
        if let Ok(decoded) = Preamble::decode(&p) {
            assert_eq!(decoded.encode(), p);
        }
    }
}

/// Parses both config formats; errors are fine, panics are not.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = AgentConfig::parse(text, Path::new("fuzz/agent.yaml"));
        let _ = ServerConfig::parse(text, Path::new("fuzz/server.yaml"));
    }
}
