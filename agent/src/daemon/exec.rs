//! `POST /v1/jobs/<id>/exec` (`airlock job exec`): run another command in a started job's
//! existing sandbox — the same cgroup, network namespace, slot user and tmpfs, so what one
//! command leaves in `/tmp`, `/home` or `/run` the next one finds (a GitLab job's stages).
//!
//! The agent writes a new spec for the job and answers with the name of the prepared
//! command; the caller starts it with `run` (the agent runs the shim with the caller's
//! descriptors, see `run.rs`), as for `airlock run`. Each exec gets its own mount, pid, ipc, uts and cgroup
//! namespaces: when its command exits, the kernel kills whatever it left running, and the
//! job's wipe (`cgroup.kill`) reaches every exec of the job.
//!
//! Several execs of one job may run at once. They share only what the job owns already (its
//! user, cgroup limits, network, files and credentials), and a command of the job can fork
//! as many processes inside one exec; refusing would only add a lock that a crashed runner
//! could leave behind. Only the control socket's callers (root or the control group) can
//! exec, never the job.
//!
//! Refused: an unknown or ended job (404 `NoSuchJob`), an agent without `[sandbox]` or a job
//! without a sandbox (409 `NoSandbox`), an empty command (400). Every exec is audited
//! (`job_exec`: the exec's number, argv[0], the argument count and a SHA-256 fingerprint of
//! the whole argv — never the arguments themselves nor any environment value) before its
//! spec is written.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{lock, Daemon};
use crate::control::{ApiError, ExecResponse, JobCommand, Peer, SandboxStart};
use crate::sandbox::job::{ExecContext, JOB_TOKEN_FILE};
use crate::secret::Secret;

/// A sandboxed job's exec state, shared by its concurrent execs.
#[derive(Debug, Clone)]
pub(super) struct ExecHandle(Arc<Mutex<ExecState>>);

#[derive(Debug)]
pub(super) struct ExecState {
    ctx: ExecContext,
    /// The job's endpoint token: each exec's spec writes it into the job's tmpfs again and
    /// sets it in the environment. Kept in the agent's memory only, for the job's lifetime.
    token: Secret<String>,
    /// The job's tmpfs is mounted (by its first exec, or by `airlock run`'s spec).
    fs_mounted: bool,
    execs: u64,
    /// Prepared commands not started yet: run name → spec. Each starts once.
    pub(super) pending: HashMap<String, PathBuf>,
    /// Commands of the job running now (see `run::MAX_RUNS_PER_JOB`).
    pub(super) running: usize,
}

impl ExecHandle {
    /// `start`: the command the job was started with, if any (its tmpfs is then mounted).
    pub(super) fn new(
        ctx: ExecContext,
        token: &Secret<String>,
        start: Option<(SandboxStart, PathBuf)>,
    ) -> ExecHandle {
        let fs_mounted = start.is_some();
        let pending = start.into_iter().map(|(s, spec)| (s.run, spec)).collect();
        ExecHandle(Arc::new(Mutex::new(ExecState {
            ctx,
            token: token.clone(),
            fs_mounted,
            execs: 0,
            pending,
            running: 0,
        })))
    }

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, ExecState> {
        lock(&self.0)
    }
}

/// A fingerprint of a command line: SHA-256 over the arguments, each ended by a NUL.
pub(crate) fn argv_fingerprint(argv: &[String]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for a in argv {
        h.update(a.as_bytes());
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

/// What the audit shows of argv[0]: its text, cut to 256 characters.
fn shown_argv0(argv: &[String]) -> String {
    argv.first()
        .map(|a| a.chars().take(256).collect())
        .unwrap_or_default()
}

impl Daemon {
    pub(super) fn attach_exec(&self, job: &str, exec: ExecHandle) {
        if let Some(live) = lock(&self.jobs).get_mut(job) {
            live.exec = Some(exec);
        }
    }

    pub async fn exec_job(
        &self,
        job: &str,
        cmd: JobCommand,
        peer: Peer,
    ) -> Result<ExecResponse, ApiError> {
        let no_sandbox = |why: String| ApiError::new(409, "NoSandbox", why);
        let Some(sb) = self.sandboxes.as_deref() else {
            return Err(no_sandbox(
                "[sandbox] is not enabled on this agent: there is no sandbox to run a command in"
                    .into(),
            ));
        };
        if cmd.argv.is_empty() || cmd.argv[0].is_empty() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the command to run is empty",
            ));
        }
        let (record, handle) = {
            let jobs = lock(&self.jobs);
            let live = jobs.get(job).ok_or_else(|| {
                ApiError::new(404, "NoSuchJob", format!("no job {job} (already ended?)"))
            })?;
            (live.record.clone(), live.exec.clone())
        };
        let Some(handle) = handle else {
            return Err(no_sandbox(format!(
                "job {job} has no sandbox to run a command in"
            )));
        };
        let n = {
            let mut st = lock(&handle.0);
            st.execs += 1;
            st.execs
        };
        let mut fields = crate::fields! {
            "exec" => n,
            "argv0" => shown_argv0(&cmd.argv),
            "argc" => cmd.argv.len(),
            "argv_sha256" => argv_fingerprint(&cmd.argv),
            "uid" => peer.uid,
        };
        if let Some(pid) = peer.pid {
            fields.insert("pid".into(), pid.into());
        }
        // The record comes before the command can run.
        self.audit
            .append("job_exec", Some(job), fields)
            .await
            .map_err(|e| {
                ApiError::new(
                    503,
                    "AuditUnavailable",
                    format!("the audit log cannot be written, so nothing runs: {e}"),
                )
            })?;
        let unavailable = |e: crate::sandbox::job::SandboxError| {
            tracing::error!(job, exec = n, "cannot prepare the exec: {e}");
            ApiError::new(
                503,
                "SandboxUnavailable",
                format!("cannot run a command in job {job}'s sandbox: {e}"),
            )
        };
        let mut st = lock(&handle.0);
        if !st.fs_mounted {
            sb.mount_fs(job, &st.ctx).map_err(unavailable)?;
            st.fs_mounted = true;
        }
        let airlock_env = self.job_env(
            &record,
            st.token.expose(),
            std::path::Path::new(JOB_TOKEN_FILE),
        );
        let env = sb.job_env(&cmd.env, &airlock_env);
        let name = format!("exec-{n}");
        let spec = sb
            .write_spec_file(
                job,
                &st.ctx,
                &format!("{name}.json"),
                cmd.argv,
                env,
                st.token.expose(),
            )
            .map_err(unavailable)?;
        st.pending.insert(name.clone(), spec.clone());
        drop(st);
        // Ended meanwhile: its directory (and this spec) went with the wipe, or goes now.
        if !lock(&self.jobs).contains_key(job) {
            let _ = std::fs::remove_file(&spec);
            return Err(ApiError::new(
                404,
                "NoSuchJob",
                format!("job {job} ended while the command was being prepared"),
            ));
        }
        tracing::info!(job, exec = n, "exec prepared");
        Ok(ExecResponse {
            job_id: job.to_string(),
            exec: n,
            sandbox: SandboxStart { run: name },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_tells_argument_boundaries_apart() {
        let a = argv_fingerprint(&["sh".into(), "-c".into(), "ab".into()]);
        let b = argv_fingerprint(&["sh".into(), "-ca".into(), "b".into()]);
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(
            a,
            argv_fingerprint(&["sh".into(), "-c".into(), "ab".into()])
        );
    }

    #[test]
    fn argv0_is_cut_in_the_audit() {
        let long = "x".repeat(1000);
        assert_eq!(shown_argv0(&[long]).len(), 256);
        assert_eq!(shown_argv0(&["bash".into(), "secret".into()]), "bash");
    }
}
