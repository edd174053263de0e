//! The shim's process steps: fork (so the job is pid 1 of its new pid namespace), the
//! parent's wait, `setsid` and the parent-death signal. The parent does nothing but wait
//! and hand the job's status on; it never execs and never touches the job's root.

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the shim has {0} threads; it must be single-threaded before fork (a bug in the shim)"
    )]
    Threads(usize),
    #[error("cannot count the shim's threads in /proc/self/task: {0}")]
    Tasks(#[source] std::io::Error),
    #[error("fork failed: {0}; check the host's pid limits")]
    Fork(#[source] nix::Error),
    #[error("waiting for the job (pid {0}) failed: {1}")]
    Wait(Pid, #[source] nix::Error),
    #[error("setsid failed: {0}")]
    Setsid(#[source] nix::Error),
    #[error("prctl(PR_SET_PDEATHSIG, SIGKILL) failed: {0}")]
    Pdeathsig(#[source] nix::Error),
    #[error("cannot reset the OOM score adjustment (/proc/self/oom_score_adj): {0}")]
    OomScore(#[source] std::io::Error),
}

/// The job's OOM score adjustment: the kernel's default. The shim is the agent's child and
/// inherits the agent's own protection (the packaged unit's `OOMScoreAdjust=-500`, so that
/// under memory pressure the kernel picks a job before the agent every job depends on); a
/// job must not keep it. Raising the value needs no privilege; everything forked later
/// inherits it.
pub fn reset_oom_score() -> Result<(), Error> {
    std::fs::write("/proc/self/oom_score_adj", "0").map_err(Error::OomScore)
}

/// Which side of the fork we are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    Parent(Pid),
    Child,
}

/// Forks. Refuses if the process has more than one thread: after a fork only the calling
/// thread exists, and a lock held by another thread would stay locked forever.
#[allow(unsafe_code)]
pub fn fork() -> Result<Forked, Error> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(Error::Tasks)?
        .count();
    if threads != 1 {
        return Err(Error::Threads(threads));
    }
    // SAFETY: the process is single-threaded (checked just above, and the shim never starts
    // a thread), so the child inherits no lock held by another thread; the child only makes
    // syscalls and allocates before it execs or exits.
    match unsafe { nix::unistd::fork() }.map_err(Error::Fork)? {
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
    }
}

/// Waits for the job and returns the status the shim exits with: the job's exit code, or
/// 128 + the signal number if it was killed (the shell's convention).
pub fn wait(child: Pid) -> Result<i32, Error> {
    loop {
        match waitpid(child, None) {
            Ok(status) => {
                if let Some(code) = exit_code(status) {
                    return Ok(code);
                }
            }
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(Error::Wait(child, e)),
        }
    }
}

/// The exit status for a final wait status; `None` for a stop/continue (keep waiting).
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// A new session without a controlling terminal: the job cannot push input into the
/// terminal it was started from (TIOCSTI needs a controlling terminal).
pub fn setsid() -> Result<(), Error> {
    nix::unistd::setsid().map(drop).map_err(Error::Setsid)
}

/// SIGKILL the job (pid 1 of its namespace, hence the whole namespace) if the shim's parent
/// process dies. Must come after the uid change: the kernel clears it on credential changes.
pub fn set_pdeathsig() -> Result<(), Error> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(Error::Pdeathsig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        let p = Pid::from_raw(7);
        assert_eq!(exit_code(WaitStatus::Exited(p, 3)), Some(3));
        assert_eq!(
            exit_code(WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(exit_code(WaitStatus::Stopped(p, Signal::SIGSTOP)), None);
    }

    #[test]
    fn fork_refuses_in_a_multithreaded_process() {
        // The test harness runs tests on threads, so this process has more than one.
        let _keep = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(1)));
        match fork() {
            Err(Error::Threads(n)) => assert!(n > 1),
            other => panic!("fork must refuse with several threads, got {other:?}"),
        }
    }
}
