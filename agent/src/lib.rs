//! airlock: job-scoped cloud credentials for self-hosted CI runners.
//!
//! Data flows one way: a runner integration → [`control`] → [`jobs`] → [`identity`] →
//! [`policy`] (pure) → [`broker`] → [`endpoint`] → the job's SDK. [`audit`] is a sink that
//! everyone writes to and that nothing reads back.

pub mod admin;
pub mod audience;
pub mod audit;
pub mod broker;
pub mod buildkite;
pub mod childenv;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod drain;
pub mod egress;
pub mod endpoint;
pub mod exit;
pub mod fd_budget;
/// Entry points for the fuzz targets (`fuzz/`) into private parts; see the module.
#[doc(hidden)]
pub mod fuzzing;
pub mod github;
pub mod gitlab;
pub mod http_client;
pub mod identity;
pub mod jobs;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod procs;
pub mod proxy;
pub mod sandbox;
pub mod secret;
pub mod shim_run;
