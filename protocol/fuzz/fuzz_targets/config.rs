#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nbackup_protocol::fuzzing::config(data));
