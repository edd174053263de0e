#![no_main]
//! The `policy` fuzz target: see fuzz/src/policy.rs for its input and the properties it checks.

libfuzzer_sys::fuzz_target!(
    init: airlock_fuzz::init(airlock_fuzz::policy::seeds, airlock_fuzz::policy::selftest),
    |data: &[u8]| airlock_fuzz::policy::run(data)
);
