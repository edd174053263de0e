//! Closing every descriptor the shim inherited above stderr, so the job cannot use an
//! agent socket, a host directory handle or another job's file that leaked into the shim.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("close_range(3, ~0) failed: {0}; the kernel must be 5.9 or newer")]
    CloseRange(#[source] std::io::Error),
    #[error("cannot list /proc/self/fd to verify inherited descriptors are closed: {0}")]
    List(#[source] std::io::Error),
    #[error("descriptor {0} is still open after close_range")]
    StillOpen(i32),
}

/// The shim's own status pipe (its write end, close-on-exec), kept open by
/// [`close_inherited`] so that a setup step failing after it can still report; -1: none.
/// The shim is single-threaded: set once in `main` before the setup runs.
pub static KEEP_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Closes fds 3 and up (but [`KEEP_FD`], which closes itself at `execve`), then verifies in
/// `/proc/self/fd` (the job's fresh /proc) that only 0, 1 and 2 (and that one) remain.
#[allow(unsafe_code)]
pub fn close_inherited() -> Result<(), Error> {
    let keep = KEEP_FD.load(std::sync::atomic::Ordering::SeqCst);
    let ranges: &[(u32, u32)] = if keep > 3 {
        &[(3, keep as u32 - 1), (keep as u32 + 1, u32::MAX)]
    } else if keep == 3 {
        &[(4, u32::MAX)]
    } else {
        &[(3, u32::MAX)]
    };
    for &(first, last) in ranges {
        // SAFETY: close_range only closes descriptors. The shim holds no Rust object owning
        // a descriptor above 2 at this point but the status pipe (the spec file and
        // directory handles are dropped before this step), which is left open, so nothing
        // will use or close a closed one again.
        let rc = unsafe { libc::close_range(first, last, 0) };
        if rc != 0 {
            return Err(Error::CloseRange(std::io::Error::last_os_error()));
        }
    }
    verify_keeping(std::path::Path::new("/proc/self/fd"), keep)
}

/// Fails if `dir` lists a descriptor above 2 other than the one reading it.
pub fn verify(dir: &std::path::Path) -> Result<(), Error> {
    verify_keeping(dir, -1)
}

/// [`verify`], allowing `keep` too.
fn verify_keeping(dir: &std::path::Path, keep: i32) -> Result<(), Error> {
    use nix::fcntl::OFlag;
    use std::os::fd::AsRawFd;
    let to_io = |e: nix::Error| Error::List(std::io::Error::from(e));
    let mut d = nix::dir::Dir::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(to_io)?;
    let own = d.as_raw_fd();
    for entry in d.iter() {
        let entry = entry.map_err(to_io)?;
        let fd = entry
            .file_name()
            .to_str()
            .ok()
            .and_then(|s| s.parse::<i32>().ok());
        if let Some(fd) = fd {
            if fd > 2 && fd != own && fd != keep {
                return Err(Error::StillOpen(fd));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_allows_only_std_streams() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["0", "1", "2", "x"] {
            std::fs::write(dir.path().join(n), "").unwrap();
        }
        verify(dir.path()).unwrap();
        std::fs::write(dir.path().join("4097"), "").unwrap();
        assert!(matches!(verify(dir.path()), Err(Error::StillOpen(4097))));
        verify_keeping(dir.path(), 4097).unwrap();
        std::fs::write(dir.path().join("5"), "").unwrap();
        assert!(matches!(
            verify_keeping(dir.path(), 4097),
            Err(Error::StillOpen(5))
        ));
    }
}
