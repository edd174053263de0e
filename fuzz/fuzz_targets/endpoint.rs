#![no_main]
//! The `endpoint` fuzz target: see fuzz/src/endpoint.rs for its input and the properties it checks.

libfuzzer_sys::fuzz_target!(
    init: airlock_fuzz::init(airlock_fuzz::endpoint::seeds, airlock_fuzz::endpoint::selftest),
    |data: &[u8]| airlock_fuzz::endpoint::run(data)
);
