//! The property is crier::fuzzing::check_channel_pattern (src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| crier::fuzzing::check_channel_pattern(data));
