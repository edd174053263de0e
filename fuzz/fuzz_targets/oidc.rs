#![no_main]
//! The `oidc` fuzz target: see fuzz/src/oidc.rs for its input and the properties it checks.

libfuzzer_sys::fuzz_target!(
    init: airlock_fuzz::init(airlock_fuzz::oidc::seeds, airlock_fuzz::oidc::selftest),
    |data: &[u8]| airlock_fuzz::oidc::run(data)
);
