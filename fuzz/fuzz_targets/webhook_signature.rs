//! The property is crier::fuzzing::check_webhook_signature (src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| crier::fuzzing::check_webhook_signature(data));
