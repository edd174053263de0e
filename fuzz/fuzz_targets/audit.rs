#![no_main]
//! The `audit` fuzz target: see fuzz/src/audit.rs for its input and the properties it checks.

libfuzzer_sys::fuzz_target!(
    init: airlock_fuzz::init(airlock_fuzz::audit::seeds, airlock_fuzz::audit::selftest),
    |data: &[u8]| airlock_fuzz::audit::run(data)
);
