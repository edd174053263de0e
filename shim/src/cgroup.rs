//! Cgroup placement: the shim writes its own pid into each cgroup the agent made for the
//! job, before it forks, so the job and everything it forks are inside them (and a
//! `cgroup.kill` by the agent reaches them all). Works on cgroup v1 and v2 alike: the
//! directories are parameters. Never creates or configures a cgroup: that is the agent's.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot join cgroup {0:?} (writing our pid to its cgroup.procs): {1}; the agent must create the cgroup before starting the shim")]
    Join(PathBuf, #[source] std::io::Error),
}

/// Moves the calling process into the cgroup at `dir`.
pub fn join(dir: &Path) -> Result<(), Error> {
    let procs = dir.join("cgroup.procs");
    // One write of the decimal pid: the kernel moves the whole thread group.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .and_then(|mut f| f.write_all(std::process::id().to_string().as_bytes()))
        .map_err(|e| Error::Join(dir.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_writes_the_pid_and_names_the_cgroup_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        join(dir.path()).unwrap();
        let got = std::fs::read_to_string(dir.path().join("cgroup.procs")).unwrap();
        assert_eq!(got, std::process::id().to_string());

        let missing = dir.path().join("nope");
        let err = join(&missing).unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("must create"), "{err}");
    }
}
