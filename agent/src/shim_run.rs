//! The caller's side of a sandboxed command (`airlock run`, `airlock job exec`, the GitLab
//! driver, the Buildkite command hook, the GitHub supervisor): hand the agent this
//! process's standard descriptors over the control socket, so that the agent starts the
//! sandbox init with them (`control::run_wire`), pass on the usual termination signals, and
//! report how the command ended. The caller needs no root and starts no program of its own
//! for it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::process::ExitStatus;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};

use crate::control::run_wire::{self, RunStatus};
use crate::control::{Client, ControlError, SandboxStart};

/// What the command reads on its stdin.
pub enum Input {
    /// The caller's own stdin.
    Inherit,
    /// These bytes through a pipe, then end of file: no handle on a host file enters the
    /// sandbox.
    Bytes(Vec<u8>),
    /// Whatever this reader gives, through a pipe, then end of file.
    Stream(Pin<Box<dyn AsyncRead + Send>>),
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Inherit => f.write_str("Inherit"),
            Input::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Input::Stream(_) => f.write_str("Stream"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot pass this process's descriptors to airlockd: {0}")]
    Pass(#[source] std::io::Error),
    #[error("airlockd went away while the command ran (restarted or stopped?): its sandbox is wiped when it starts again")]
    AgentGone,
    #[error("airlockd could not start the command: {0}")]
    Refused(String),
}

/// Starts the prepared command `start` of `job` with this process's stdout and stderr and
/// `input` as stdin, passes on SIGINT, SIGTERM and SIGHUP, and returns how it ended.
pub async fn run(
    client: &Client,
    job: &str,
    start: &SandboxStart,
    input: Input,
) -> Result<RunStatus, RunError> {
    use tokio::signal::unix::{signal, SignalKind};
    let stream = client.attach_run(job, &start.run).await?;
    let (pipe_read, feed): (Option<OwnedFd>, Option<tokio::task::JoinHandle<()>>) = match input {
        Input::Inherit => (None, None),
        Input::Bytes(data) => {
            let (r, w) = pipe().map_err(RunError::Pass)?;
            (Some(r), Some(feed(w, Box::pin(std::io::Cursor::new(data)))))
        }
        Input::Stream(reader) => {
            let (r, w) = pipe().map_err(RunError::Pass)?;
            (Some(r), Some(feed(w, reader)))
        }
    };
    {
        let stdin = std::io::stdin();
        let stdout = std::io::stdout();
        let stderr = std::io::stderr();
        let fd0: BorrowedFd<'_> = match &pipe_read {
            Some(r) => r.as_fd(),
            None => stdin.as_fd(),
        };
        run_wire::send_fds(&stream, &[fd0, stdout.as_fd(), stderr.as_fd()])
            .await
            .map_err(RunError::Pass)?;
    }
    // The agent's shim holds the read end now.
    drop(pipe_read);
    let (mut sint, mut sterm, mut shup) = (
        signal(SignalKind::interrupt()).map_err(RunError::Pass)?,
        signal(SignalKind::terminate()).map_err(RunError::Pass)?,
        signal(SignalKind::hangup()).map_err(RunError::Pass)?,
    );
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let forward = |n: i32| format!("signal {n}\n");
    let result = loop {
        let sig = tokio::select! {
            line = lines.next_line() => break line,
            _ = sint.recv() => libc_sig(nix::sys::signal::Signal::SIGINT),
            _ = sterm.recv() => libc_sig(nix::sys::signal::Signal::SIGTERM),
            _ = shup.recv() => libc_sig(nix::sys::signal::Signal::SIGHUP),
        };
        // A lost signal is not an error: the command runs on, and the agent kills it if
        // this process goes away.
        let _ = write.write_all(forward(sig).as_bytes()).await;
    };
    if let Some(f) = feed {
        f.abort();
    }
    let line = match result {
        Ok(Some(l)) => l,
        _ => return Err(RunError::AgentGone),
    };
    let status: RunStatus = serde_json::from_str(&line)
        .map_err(|e| RunError::Refused(format!("unreadable status from airlockd: {e}")))?;
    if let Some(e) = &status.error {
        return Err(RunError::Refused(e.clone()));
    }
    Ok(status)
}

fn libc_sig(s: nix::sys::signal::Signal) -> i32 {
    s as i32
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

/// Copies `reader` into the pipe's write end, then closes it (end of file for the job).
fn feed(w: OwnedFd, mut reader: Pin<Box<dyn AsyncRead + Send>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut tx) = tokio::net::unix::pipe::Sender::from_owned_fd(w) else {
            return;
        };
        // A command that exits without reading all of it is not an error here.
        let _ = tokio::io::copy(&mut reader, &mut tx).await;
        let _ = tx.shutdown().await;
    })
}

/// A status as a shell reports it: the exit code, or 128 + the signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(1))
}
