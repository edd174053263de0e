//! The caller's side of a sandboxed command: run the shim with the spec the agent wrote
//! (`airlock job exec`, the GitLab driver), forward the usual termination signals to it, and
//! report the command's status.

use std::process::{ExitStatus, Stdio};

use crate::control::SandboxStart;

/// What the command reads on its stdin.
#[derive(Debug)]
pub enum Input {
    /// The caller's own stdin.
    Inherit,
    /// These bytes through a pipe, then end of file: no handle on a host file enters the
    /// sandbox.
    Bytes(Vec<u8>),
}

/// Runs `<shim> --spec <spec>` with an empty environment (the spec holds the job's) and
/// waits for it, forwarding SIGINT, SIGTERM and SIGHUP.
pub async fn run(start: &SandboxStart, input: Input) -> std::io::Result<ExitStatus> {
    use nix::sys::signal::{kill, Signal};
    use tokio::io::AsyncWriteExt;
    use tokio::signal::unix::{signal, SignalKind};
    let mut c = tokio::process::Command::new(&start.shim);
    c.arg("--spec").arg(&start.spec).env_clear();
    if matches!(input, Input::Bytes(_)) {
        c.stdin(Stdio::piped());
    }
    let mut sint = signal(SignalKind::interrupt())?;
    let mut sterm = signal(SignalKind::terminate())?;
    let mut shup = signal(SignalKind::hangup())?;
    let mut child = c.spawn().map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot start the sandbox init {}: {e}",
                start.shim.display()
            ),
        )
    })?;
    let feed = match (input, child.stdin.take()) {
        (Input::Bytes(data), Some(mut stdin)) => Some(tokio::spawn(async move {
            // A command that exits without reading all of it is not an error here.
            let _ = stdin.write_all(&data).await;
            let _ = stdin.shutdown().await;
        })),
        _ => None,
    };
    let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let forward = |sig: Signal| {
        if let Some(pid) = pid {
            let _ = kill(pid, sig);
        }
    };
    let status = loop {
        tokio::select! {
            st = child.wait() => break st?,
            _ = sint.recv() => forward(Signal::SIGINT),
            _ = sterm.recv() => forward(Signal::SIGTERM),
            _ = shup.recv() => forward(Signal::SIGHUP),
        }
    };
    if let Some(f) = feed {
        f.abort();
    }
    Ok(status)
}

/// How a sandboxed command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The command ran and ended with this status (as [`exit_code`] gives it), whatever
    /// the number: a script may exit 125 itself.
    Exited(i32),
    /// The sandbox could not be built; the shim said why on stderr.
    SetupFailed,
}

/// Tells a sandbox that could not be built from a command that ran, by the status file the
/// shim writes beside its spec (`exec-3.json` → `exec-3.status`, in the agent's root-only
/// job directory). Without one — the shim ended before it could write it (a bad spec, or
/// it was killed) — the exit status decides: 125 is the shim's own.
pub fn outcome(start: &SandboxStart, status: ExitStatus) -> Outcome {
    let code = exit_code(status);
    match std::fs::read_to_string(start.spec.with_extension("status")) {
        Ok(s) if s.trim() == "setup-failed" => Outcome::SetupFailed,
        Ok(s) if s.starts_with("exited ") => Outcome::Exited(code),
        _ if code == airlock_shim::EXIT_SETUP_FAILED => Outcome::SetupFailed,
        _ => Outcome::Exited(code),
    }
}

/// A status as a shell reports it: the exit code, or 128 + the signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(1))
}
