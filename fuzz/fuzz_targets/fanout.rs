//! The property is crier::fuzzing::check_fanout (src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| crier::fuzzing::check_fanout(data));
