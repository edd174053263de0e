//! The agent's descriptor budget: how many open files the process may have
//! (`RLIMIT_NOFILE`, raised at start up to its hard limit) and how many of them the job
//! endpoints may spend on connections, so that jobs together can never take the descriptors
//! the control socket, crash recovery and wipes need.
//!
//! Owns the arithmetic and the one `setrlimit` at start. It never closes or counts anyone
//! else's descriptors; the endpoint enforces the budget (see `endpoint::ConnBudget`).

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Descriptors that endpoint connections never get, at the least: the control socket and
/// its clients, the audit log, the state directory, a job's start (namespace files, the
/// cgroup, `nft`'s pipes, the shim's pipes), its wipe (directory walks of its tmpfs), the
/// resolver's sockets and every job's listeners.
pub const MIN_RESERVE: u64 = 256;

/// The fraction of `RLIMIT_NOFILE` kept out of the endpoints' reach, when it is more than
/// [`MIN_RESERVE`]: one quarter.
pub const RESERVE_DIVISOR: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum FdBudgetError {
    #[error("cannot read RLIMIT_NOFILE: {0}")]
    Get(#[source] nix::Error),
    #[error("cannot raise RLIMIT_NOFILE from {from} to its hard limit {to}: {source}")]
    Raise {
        from: u64,
        to: u64,
        #[source]
        source: nix::Error,
    },
}

/// `RLIMIT_NOFILE` before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    pub before: u64,
    pub now: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (systemd starts services with a soft
/// limit of 1024 and a hard one of 524288; the soft limit exists for programs that still
/// use `select`, which the agent does not).
pub fn raise_nofile() -> Result<Raised, FdBudgetError> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(FdBudgetError::Get)?;
    if soft >= hard {
        return Ok(Raised {
            before: soft,
            now: soft,
        });
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|source| FdBudgetError::Raise {
        from: soft,
        to: hard,
        source,
    })?;
    Ok(Raised {
        before: soft,
        now: hard,
    })
}

/// The soft `RLIMIT_NOFILE` of this process now; 1024 (the kernel's default) if it cannot
/// be read.
pub fn current_nofile() -> u64 {
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// Descriptors kept for everything but endpoint connections, out of `nofile`.
pub fn reserve(nofile: u64) -> u64 {
    (nofile / RESERVE_DIVISOR).max(MIN_RESERVE)
}

/// How many endpoint connections all jobs together may hold: `nofile` less [`reserve`].
/// With 1024 that is 768, with systemd's 524288 it is 393216.
pub fn endpoint_connections(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(reserve(nofile))).unwrap_or(usize::MAX)
}

/// Descriptors this process has open now (`/proc/self/fd`), for the log and tests.
pub fn open_now() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_a_quarter_and_never_below_the_minimum() {
        assert_eq!(reserve(1024), 256);
        assert_eq!(endpoint_connections(1024), 768);
        assert_eq!(reserve(524_288), 131_072);
        assert_eq!(endpoint_connections(524_288), 393_216);
        assert_eq!(reserve(20_000), 5_000);
        // A tiny limit leaves the endpoints nothing rather than eating the reserve.
        assert_eq!(endpoint_connections(200), 0);
        assert_eq!(endpoint_connections(300), 44);
    }

    #[test]
    fn raising_reaches_the_hard_limit() {
        let r = raise_nofile().unwrap();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, hard);
        assert_eq!(r.now, soft);
        assert!(r.before <= r.now);
        assert_eq!(current_nofile(), soft);
        assert!(open_now().is_some_and(|n| n >= 3));
    }
}
