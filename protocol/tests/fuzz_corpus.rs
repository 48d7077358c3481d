//! Replays the fuzz corpus (`protocol/fuzz/corpus/<target>/`) through the same entry
//! points the fuzz targets use, so every input the fuzzer kept — including any that
//! once crashed — is a regression test on stable Rust in CI.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("corpus file");
        if let Err(panic) = std::panic::catch_unwind(|| run(&data)) {
            panic!("{} panics: {panic:?}", path.display());
        }
        n += 1;
    }
    n
}

#[test]
fn frame_corpus_decodes_without_panics() {
    assert!(replay("frames", nbackup_protocol::fuzzing::frames) > 10);
}

#[test]
fn preamble_corpus_decodes_without_panics() {
    assert!(replay("preamble", nbackup_protocol::fuzzing::preamble) >= 3);
}

#[test]
fn config_corpus_parses_without_panics() {
    assert!(replay("config", nbackup_protocol::fuzzing::config) > 10);
}
