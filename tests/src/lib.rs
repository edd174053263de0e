//! Test harness for the end-to-end tests: start `airlockd` against a moto STS stand-in,
//! mint OIDC tokens, run the real AWS clients.
//!
//! Everything here is test-only; nothing may be linked into the agent.

pub mod agent;
pub mod clients;
pub mod fakedns;
pub mod internet;
pub mod jobprobe;
pub mod moto;
pub mod oidc;
pub mod packaged;
pub mod paths;
pub mod prereq;
pub mod stack;

/// The `key=value` lines of a job's output (the tests' probes print their findings so).
pub fn kv(stdout: &str) -> std::collections::BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
