#![no_main]
//! The `dns` fuzz target: see fuzz/src/dns.rs for its input and the properties it checks.

libfuzzer_sys::fuzz_target!(
    init: airlock_fuzz::init(airlock_fuzz::dns::seeds, airlock_fuzz::dns::selftest),
    |data: &[u8]| airlock_fuzz::dns::run(data)
);
