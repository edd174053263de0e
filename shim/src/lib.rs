//! The sandbox spec: what the agent tells `airlock-shim` to build for one job.
//!
//! This crate is shared by the agent (which writes a spec) and the shim (which reads one
//! and ends in `execve`). It must never depend on the agent: the shim runs inside the
//! job's new namespaces and knows nothing but this spec. The shim binary itself arrives
//! with the sandbox issue; for now only the types live here.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Everything the shim needs to build one job's sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// The job this sandbox belongs to (for messages only).
    pub job_id: String,
    /// The command to `execve`, argv[0] first.
    pub argv: Vec<String>,
    /// The complete environment of the job: nothing is inherited.
    pub env: BTreeMap<String, String>,
    /// Working directory inside the new root.
    pub cwd: PathBuf,
    /// The unprivileged user and group the job runs as.
    pub uid: u32,
    pub gid: u32,
    /// Network namespace prepared by the agent (a path under /run/netns), if any.
    pub netns: Option<PathBuf>,
    /// Writable, size-capped tmpfs mounts of the job (home, /tmp, workspace, /run).
    pub tmpfs: Vec<TmpfsMount>,
    /// Host paths hidden from the job (replaced by empty read-only mounts).
    pub hide: Vec<PathBuf>,
    /// Resource limits set with setrlimit before exec.
    pub rlimits: Rlimits,
}

/// One writable tmpfs mount in the job's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TmpfsMount {
    pub target: PathBuf,
    pub size_bytes: u64,
    pub mode: u32,
}

/// Per-process limits; `None` keeps the host's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimits {
    pub nofile: Option<u64>,
    pub nproc: Option<u64>,
    pub core: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_and_rejects_unknown_fields() {
        let spec = SandboxSpec {
            job_id: "j-1".into(),
            argv: vec!["/bin/true".into()],
            env: BTreeMap::from([("HOME".into(), "/home/job".into())]),
            cwd: "/work".into(),
            uid: 60000,
            gid: 60000,
            netns: None,
            tmpfs: vec![TmpfsMount {
                target: "/tmp".into(),
                size_bytes: 1 << 30,
                mode: 0o1777,
            }],
            hide: vec!["/etc/airlock".into()],
            rlimits: Rlimits {
                nofile: Some(4096),
                ..Default::default()
            },
        };
        let text = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<SandboxSpec>(&text).unwrap(), spec);
        let bad = text.replacen("\"uid\"", "\"evil\":1,\"uid\"", 1);
        let err = serde_json::from_str::<SandboxSpec>(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `evil`"), "{err}");
    }
}
