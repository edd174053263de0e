//! Per-job egress control (issue 4).

pub mod dns;
pub mod job;
pub mod nflog;
pub mod nftset;
