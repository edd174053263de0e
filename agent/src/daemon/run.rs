//! `POST /v1/jobs/<id>/run`: the agent starts a prepared sandboxed command (the job's own,
//! or one of `airlock job exec`) itself, with the caller's stdin, stdout and stderr passed
//! over the control socket, and reports how it ended.
//!
//! This is what lets every runner integration run without root: the only root process on
//! the runner side is `airlockd`, whose environment is systemd's. Nothing a pipeline sets in
//! a hook's environment (`PATH`, `LD_PRELOAD`, `LD_LIBRARY_PATH`, `BASH_ENV`) reaches the
//! sandbox init: it is started by absolute path with an empty environment, and the only
//! things the caller hands it are three descriptors, checked (no directory, no `O_PATH`
//! handle: a job must never hold a handle on a host directory). The sandbox init closes
//! every other descriptor before the job's command runs.
//!
//! Bounds: each prepared command runs once; at most [`MAX_RUNS_PER_JOB`] of a job's
//! commands run at once; a caller has [`FDS_TIMEOUT`] to send its descriptors. A caller
//! that goes away takes its command with it (the shim is killed and its pid namespace with
//! it), as a killed caller did when it ran the shim itself.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::exec::ExecHandle;
use super::{lock, Daemon};
use crate::control::run_wire::{self, RunStatus};
use crate::control::{ApiError, Peer};

/// The run name of the command a job was started with.
pub(super) const START_RUN: &str = "spec";
/// A job's commands running at once (GitLab stages, `airlock job exec`): the processes the
/// agent starts for one job.
pub const MAX_RUNS_PER_JOB: usize = 16;
/// How long a caller has to send its descriptors once the agent is ready.
const FDS_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest line a caller may send (`signal 15`).
const MAX_LINE: usize = 64;

/// A started run: the command taken from the job's pending ones, holding one of the job's
/// run places until it is dropped.
#[derive(Debug)]
pub struct RunPlan {
    job: String,
    name: String,
    spec: PathBuf,
    shim: PathBuf,
    place: RunPlace,
}

/// One of a job's [`MAX_RUNS_PER_JOB`] places, given back when dropped.
#[derive(Debug)]
struct RunPlace(ExecHandle);

impl Drop for RunPlace {
    fn drop(&mut self) {
        let mut st = self.0.state();
        st.running = st.running.saturating_sub(1);
    }
}

impl Daemon {
    /// Takes the prepared command `name` of `job` (the caller is authorised already).
    pub(super) fn prepare_run(
        &self,
        job: &str,
        name: &str,
        peer: &Peer,
    ) -> Result<RunPlan, ApiError> {
        let sb = self.sandboxes()?;
        let handle = lock(&self.jobs)
            .get(job)
            .and_then(|live| live.exec.clone())
            .ok_or_else(|| {
                ApiError::new(
                    409,
                    "NoSandbox",
                    format!("job {job} has no sandbox to run a command in"),
                )
            })?;
        let mut st = handle.state();
        if st.running >= MAX_RUNS_PER_JOB {
            return Err(ApiError::new(
                429,
                "TooManyRuns",
                format!("job {job} runs {MAX_RUNS_PER_JOB} commands already; wait for one to end"),
            ));
        }
        let spec = st.pending.remove(name).ok_or_else(|| {
            ApiError::new(
                404,
                "NoSuchRun",
                format!("job {job} has no prepared command {name:?} (each runs once)"),
            )
        })?;
        st.running += 1;
        drop(st);
        tracing::info!(
            job,
            run = name,
            uid = peer.uid,
            pid = peer.pid,
            "run starting"
        );
        Ok(RunPlan {
            job: job.to_string(),
            name: name.to_string(),
            spec,
            shim: sb.shim().to_path_buf(),
            place: RunPlace(handle),
        })
    }

    /// Serves one run on the caller's upgraded connection ([`run_wire`]).
    pub(super) async fn serve_run(&self, plan: RunPlan, stream: UnixStream) {
        let job = plan.job.clone();
        let name = plan.name.clone();
        match serve(plan, stream).await {
            Ok(Some(status)) => {
                tracing::info!(
                    job,
                    run = name,
                    code = status.code,
                    setup_failed = status.setup_failed,
                    "run ended"
                )
            }
            Ok(None) => {
                tracing::info!(
                    job,
                    run = name,
                    "run ended: the caller went away, its command was killed"
                )
            }
            Err(e) => tracing::warn!(job, run = name, error = %e, "run failed"),
        }
    }
}

async fn serve(plan: RunPlan, mut stream: UnixStream) -> std::io::Result<Option<RunStatus>> {
    stream.write_all(&[run_wire::READY]).await?;
    let fds = match tokio::time::timeout(FDS_TIMEOUT, run_wire::recv_fds(&stream, run_wire::STDIO))
        .await
    {
        Ok(Ok(fds)) => fds,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the caller sent no descriptors",
            ))
        }
    };
    let stdio = match checked_stdio(fds) {
        Ok(s) => s,
        Err(why) => {
            let status = RunStatus {
                code: airlock_shim::EXIT_SETUP_FAILED,
                setup_failed: true,
                error: Some(why),
            };
            send_status(&mut stream, &status).await?;
            return Ok(Some(status));
        }
    };
    let [stdin, stdout, stderr] = stdio;
    let spawned = tokio::process::Command::new(&plan.shim)
        .arg("--spec")
        .arg(&plan.spec)
        .env_clear()
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let status = RunStatus {
                code: airlock_shim::EXIT_SETUP_FAILED,
                setup_failed: true,
                error: Some(format!(
                    "cannot start the sandbox init {}: {e}",
                    plan.shim.display()
                )),
            };
            send_status(&mut stream, &status).await?;
            return Ok(Some(status));
        }
    };
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(nix::unistd::Pid::from_raw);
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take_limited()).lines();
    let status = loop {
        tokio::select! {
            st = child.wait() => break st?,
            line = lines.next_line() => match line {
                Ok(Some(l)) => {
                    if let (Some(sig), Some(pid)) = (parse_signal(&l), pid) {
                        let _ = nix::sys::signal::kill(pid, sig);
                    }
                }
                // The caller is gone: its command goes too.
                _ => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return Ok(None);
                }
            },
        }
    };
    let code = crate::shim_run::exit_code(status);
    let setup_failed = setup_failed(&plan.spec, code);
    let st = RunStatus {
        code,
        setup_failed,
        error: None,
    };
    let mut line = serde_json::to_vec(&st).expect("a run status always serialises");
    line.push(b'\n');
    write.write_all(&line).await?;
    let _ = write.shutdown().await;
    drop(plan.place);
    Ok(Some(st))
}

async fn send_status(stream: &mut UnixStream, st: &RunStatus) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(st).expect("a run status always serialises");
    line.push(b'\n');
    stream.write_all(&line).await?;
    stream.shutdown().await
}

/// The caller's descriptors, in order, or why they are refused: exactly three, none a
/// directory and none an `O_PATH` handle.
fn checked_stdio(fds: Vec<OwnedFd>) -> Result<[OwnedFd; 3], String> {
    if fds.len() != run_wire::STDIO {
        return Err(format!(
            "expected stdin, stdout and stderr ({} descriptors), got {}",
            run_wire::STDIO,
            fds.len()
        ));
    }
    for (i, fd) in fds.iter().enumerate() {
        let flags =
            rustix::fs::fcntl_getfl(fd.as_fd()).map_err(|e| format!("descriptor {i}: {e}"))?;
        if flags.contains(rustix::fs::OFlags::PATH) {
            return Err(format!("descriptor {i} is an O_PATH handle"));
        }
        let st = rustix::fs::fstat(fd.as_fd()).map_err(|e| format!("descriptor {i}: {e}"))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
            return Err(format!(
                "descriptor {i} is a directory: a job never gets a handle on a host directory"
            ));
        }
    }
    let mut it = fds.into_iter();
    match (it.next(), it.next(), it.next()) {
        (Some(a), Some(b), Some(c)) => Ok([a, b, c]),
        _ => Err("three descriptors expected".into()),
    }
}

/// `signal <n>` for one of the signals a caller may pass on.
fn parse_signal(line: &str) -> Option<nix::sys::signal::Signal> {
    let n: i32 = line.trim().strip_prefix("signal ")?.trim().parse().ok()?;
    run_wire::SIGNALS.iter().copied().find(|s| *s as i32 == n)
}

/// Whether the sandbox could not be built, from the status file the shim writes beside its
/// spec (`exec-3.json` → `exec-3.status`). Without one — the shim ended before it could
/// write it (a bad spec, or it was killed) — the exit status decides: 125 is the shim's
/// own.
fn setup_failed(spec: &std::path::Path, code: i32) -> bool {
    match std::fs::read_to_string(spec.with_extension("status")) {
        Ok(s) if s.trim() == "setup-failed" => true,
        Ok(s) if s.starts_with("exited ") => false,
        _ => code == airlock_shim::EXIT_SETUP_FAILED,
    }
}

/// A reader that never buffers more than a caller's line is allowed to be.
trait TakeLimited: Sized {
    fn take_limited(self) -> tokio::io::Take<Self>;
}

impl TakeLimited for tokio::net::unix::OwnedReadHalf {
    fn take_limited(self) -> tokio::io::Take<Self> {
        use tokio::io::AsyncReadExt;
        // A caller passes a handful of signals at most; a few KiB covers any honest one.
        self.take((MAX_LINE * 64) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_forwardable_signals_are_passed_on() {
        assert_eq!(
            parse_signal("signal 15"),
            Some(nix::sys::signal::Signal::SIGTERM)
        );
        assert_eq!(
            parse_signal("signal 2\n"),
            Some(nix::sys::signal::Signal::SIGINT)
        );
        assert_eq!(parse_signal("signal 9"), None, "SIGKILL is the agent's own");
        assert_eq!(parse_signal("signal 19"), None, "SIGSTOP");
        assert_eq!(parse_signal("kill 15"), None);
        assert_eq!(parse_signal("signal x"), None);
    }

    #[test]
    fn directories_and_path_handles_are_refused_as_stdio() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let open = |p: &std::path::Path| OwnedFd::from(std::fs::File::open(p).unwrap());
        let ok = checked_stdio(vec![open(&file), open(&file), open(&file)]);
        assert!(ok.is_ok());
        let err = checked_stdio(vec![open(&file), open(dir.path()), open(&file)]).unwrap_err();
        assert!(err.contains("directory"), "{err}");
        let path = rustix::fs::open(
            &file,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let err = checked_stdio(vec![open(&file), open(&file), path]).unwrap_err();
        assert!(err.contains("O_PATH"), "{err}");
        let err = checked_stdio(vec![open(&file), open(&file)]).unwrap_err();
        assert!(err.contains("got 2"), "{err}");
    }

    #[test]
    fn the_status_file_tells_a_failed_setup_from_a_command_exiting_125() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("exec-1.json");
        assert!(setup_failed(&spec, 125), "no file: 125 is the shim's");
        assert!(!setup_failed(&spec, 1));
        std::fs::write(dir.path().join("exec-1.status"), "exited 125\n").unwrap();
        assert!(!setup_failed(&spec, 125));
        std::fs::write(dir.path().join("exec-1.status"), "setup-failed\n").unwrap();
        assert!(setup_failed(&spec, 125));
    }
}
