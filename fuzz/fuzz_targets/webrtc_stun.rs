//! The property is crier::fuzzing::check_webrtc_stun (src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| crier::fuzzing::check_webrtc_stun(data));
