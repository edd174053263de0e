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

/// A status as a shell reports it: the exit code, or 128 + the signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(1))
}
