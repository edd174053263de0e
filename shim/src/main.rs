//! `airlock-shim --spec FILE`: builds one job's sandbox from a JSON [`SandboxSpec`] and
//! ends in `execve` of the job's command. Single-threaded by design (it forks).
//!
//! Exit status: the job's own status (128 + signal if it was killed), or 125 if the sandbox
//! could not be built, with a message on stderr naming the step that failed. The spec's
//! `status_file`, when given, tells the two apart (`exited <code>` or `setup-failed`).

use airlock_shim::steps::{self, Outcome};
use airlock_shim::syscalls::Linux;
use airlock_shim::{fds, process, SandboxSpec, EXIT_SETUP_FAILED};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

fn usage() -> ! {
    eprintln!("usage: airlock-shim --spec FILE   (FILE: the job's sandbox spec, JSON)");
    std::process::exit(EXIT_SETUP_FAILED)
}

fn fail(job: &str, msg: impl std::fmt::Display) -> ! {
    eprintln!("airlock-shim: job {job}: {msg}");
    std::process::exit(EXIT_SETUP_FAILED)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = match args.as_slice() {
        [flag, path] if flag == "--spec" => PathBuf::from(path),
        _ => usage(),
    };
    let spec: SandboxSpec = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => fail("?", format_args!("cannot parse the spec {path:?}: {e}")),
        },
        Err(e) => fail("?", format_args!("cannot read the spec {path:?}: {e}")),
    };
    let me = nix::unistd::getpid();
    // Opened now, in the host's mount namespace: the shim's own view changes once it sets up
    // the sandbox, so the record is written through this handle.
    let record_to = spec.status_file.as_ref().map(|file| {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(file)
            .unwrap_or_else(|e| fail(&spec.job_id, format_args!("cannot open {file:?}: {e}")))
    });
    let record = |what: &str| {
        if let Some(mut f) = record_to.as_ref() {
            if let Err(e) = f.write_all(format!("{what}\n").as_bytes()) {
                eprintln!(
                    "airlock-shim: job {}: cannot record how it ended: {e}",
                    spec.job_id
                );
            }
        }
    };
    // With a status file: a pipe whose write end the job's pid 1 keeps until `execve` closes
    // it (close-on-exec). Its setup writes one byte there if it fails, so after the job has
    // ended the pipe holds a byte for a setup failure and nothing for a command that ran,
    // whatever either's exit status.
    let status =
        spec.status_file
            .as_ref()
            .map(|_| match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
                Ok((r, w)) => {
                    fds::KEEP_FD.store(w.as_raw_fd(), std::sync::atomic::Ordering::SeqCst);
                    (std::fs::File::from(r), std::fs::File::from(w))
                }
                Err(e) => {
                    record("setup-failed");
                    fail(
                        &spec.job_id,
                        format_args!("cannot make the status pipe: {e}"),
                    )
                }
            });
    let outcome = steps::run(&mut Linux, &spec);
    // The job's pid 1 (pid 1 of its new pid namespace) comes back here only on a failure.
    let in_job = nix::unistd::getpid() != me;
    match outcome {
        Ok(Outcome::Parent(pid)) => {
            let read_end = status.map(|(r, w)| {
                drop(w);
                r
            });
            match process::wait(pid) {
                Ok(code) => {
                    let setup_failed = read_end.is_some_and(|r| {
                        let mut b = [0u8; 1];
                        matches!((&r).read(&mut b), Ok(1))
                    });
                    if setup_failed {
                        record("setup-failed");
                    } else {
                        record(&format!("exited {code}"));
                    }
                    std::process::exit(code)
                }
                Err(e) => {
                    record("setup-failed");
                    fail(&spec.job_id, e)
                }
            }
        }
        Ok(Outcome::Executed) => fail(&spec.job_id, "execve returned without an error"),
        Err(e) => {
            match &status {
                Some((_, w)) if in_job => {
                    let _ = (&*w).write_all(b"x");
                }
                _ => record("setup-failed"),
            }
            fail(&spec.job_id, e)
        }
    }
}
