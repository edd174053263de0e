//! Test harness for the end-to-end tests: start `airlockd` against a moto STS stand-in,
//! mint OIDC tokens, run the real AWS clients.
//!
//! Everything here is test-only; nothing may be linked into the agent.

pub mod agent;
pub mod clients;
pub mod fakedns;
pub mod internet;
pub mod moto;
pub mod oidc;
pub mod paths;
pub mod prereq;
pub mod stack;
