//! `airlock-shim --spec FILE`: builds one job's sandbox from a JSON [`SandboxSpec`] and
//! ends in `execve` of the job's command. Single-threaded by design (it forks).
//!
//! Exit status: the job's own status (128 + signal if it was killed), or 125 if the sandbox
//! could not be built, with a message on stderr naming the step that failed.

use airlock_shim::steps::{self, Outcome};
use airlock_shim::syscalls::Linux;
use airlock_shim::{process, SandboxSpec, EXIT_SETUP_FAILED};
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
    match steps::run(&mut Linux, &spec) {
        Ok(Outcome::Parent(pid)) => match process::wait(pid) {
            Ok(code) => std::process::exit(code),
            Err(e) => fail(&spec.job_id, e),
        },
        Ok(Outcome::Executed) => fail(&spec.job_id, "execve returned without an error"),
        Err(e) => fail(&spec.job_id, e),
    }
}
