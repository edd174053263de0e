//! Namespaces: the shim unshares mount, pid, ipc, uts and cgroup namespaces (and a fresh,
//! empty network namespace unless the agent prepared one, which it joins with `setns`), and
//! sets the hostname of its UTS namespace. Never touches the host's own namespaces.

use nix::sched::CloneFlags;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unshare({flags:?}) failed: {source}; the shim must run as root (CAP_SYS_ADMIN) on a kernel with these namespaces")]
    Unshare {
        flags: CloneFlags,
        #[source]
        source: nix::Error,
    },
    #[error("cannot open network namespace {0:?}: {1}; the agent must create it before starting the shim")]
    OpenNetns(PathBuf, #[source] std::io::Error),
    #[error("cannot join network namespace {0:?}: {1}")]
    JoinNetns(PathBuf, #[source] nix::Error),
    #[error("sethostname({0:?}) failed: {1}")]
    Hostname(String, #[source] nix::Error),
}

/// The namespaces the shim always creates. The pid namespace applies to the children of
/// the caller, which is why the shim forks after this.
pub fn flags(new_netns: bool) -> CloneFlags {
    let mut f = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWCGROUP;
    if new_netns {
        f |= CloneFlags::CLONE_NEWNET;
    }
    f
}

pub fn unshare(flags: CloneFlags) -> Result<(), Error> {
    nix::sched::unshare(flags).map_err(|source| Error::Unshare { flags, source })
}

/// Joins the network namespace at `path` (an nsfs file).
pub fn join_netns(path: &Path) -> Result<(), Error> {
    let f = std::fs::File::open(path).map_err(|e| Error::OpenNetns(path.to_path_buf(), e))?;
    nix::sched::setns(&f, CloneFlags::CLONE_NEWNET)
        .map_err(|e| Error::JoinNetns(path.to_path_buf(), e))
}

pub fn set_hostname(name: &str) -> Result<(), Error> {
    nix::unistd::sethostname(name).map_err(|e| Error::Hostname(name.to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_is_new_only_when_not_joined() {
        assert!(flags(true).contains(CloneFlags::CLONE_NEWNET));
        assert!(!flags(false).contains(CloneFlags::CLONE_NEWNET));
        for f in [flags(true), flags(false)] {
            assert!(f.contains(
                CloneFlags::CLONE_NEWNS
                    | CloneFlags::CLONE_NEWPID
                    | CloneFlags::CLONE_NEWIPC
                    | CloneFlags::CLONE_NEWUTS
                    | CloneFlags::CLONE_NEWCGROUP
            ));
            // The job never gets a user namespace: it would give it capabilities there.
            assert!(!f.contains(CloneFlags::CLONE_NEWUSER));
        }
    }

    #[test]
    fn join_netns_names_a_missing_namespace() {
        let err = join_netns(Path::new("/nonexistent/al-netns"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/al-netns"), "{err}");
    }
}
