//! Whose job is it: a job's owner process, who may act on a job through the control
//! socket, and the end of a job whose owner exited.
//!
//! A control caller that is not root (a runner's user in the control group) names the
//! process its job belongs to when it starts it: itself or one of its ancestors, of its own
//! user (the Buildkite job's bootstrap, a GitHub runner's `Runner.Worker`). The agent checks
//! that ancestry itself (`/proc`), records the owner by pid and start time, and from then on
//! lets such a caller end, bind, exec, run or list the job only from the owner or its
//! descendants. A persistent runner's steps run as the runner's user and may reach the
//! socket: they descend from their own job's owner and from no other's. Root may act on
//! every job. The job ends when its owner exits (a killed hook, a crashed runner): nothing
//! of it stays served for a process that is gone.

use std::path::{Path, PathBuf};

use super::{lock, Daemon};
use crate::control::{ApiError, Peer, MAX_EXTRA_HIDE};
use crate::jobs::{self, JobRecord};
use crate::procs::ProcId;

/// Longest extra hidden path a start request may name.
const MAX_HIDE_LEN: usize = 4096;

/// The extra paths a start request hides, checked: absolute, normal (no `.` or `..`), not
/// `/`, at most [`MAX_EXTRA_HIDE`].
pub(super) fn checked_hide(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ApiError> {
    if paths.len() > MAX_EXTRA_HIDE {
        return Err(ApiError::new(
            400,
            "BadRequest",
            format!("hide: at most {MAX_EXTRA_HIDE} paths"),
        ));
    }
    paths
        .iter()
        .map(|p| {
            let normal = p.is_absolute()
                && p != Path::new("/")
                && p.as_os_str().len() <= MAX_HIDE_LEN
                && p.components().all(|c| {
                    matches!(
                        c,
                        std::path::Component::RootDir | std::path::Component::Normal(_)
                    )
                });
            if normal {
                Ok(p.clone())
            } else {
                Err(ApiError::new(
                    400,
                    "BadRequest",
                    format!(
                        "hide: {:?} is not an absolute path without . or .. (and not /)",
                        p.display()
                    ),
                ))
            }
        })
        .collect()
}

impl Daemon {
    /// The owner a start request names, checked against the caller: required from callers
    /// that are not root; the caller itself or an ancestor, of the caller's own user, never
    /// pid 1.
    pub(super) fn owner_of_new_job(
        &self,
        owner_pid: Option<i32>,
        peer: &Peer,
    ) -> Result<Option<ProcId>, ApiError> {
        let Some(pid) = owner_pid else {
            if peer.uid == 0 {
                return Ok(None);
            }
            return Err(ApiError::new(
                400,
                "OwnerRequired",
                "a caller that is not root names the process its job belongs to (owner_pid: itself or one of its ancestors)",
            ));
        };
        let refused = |why: String| ApiError::new(403, "BadOwner", why);
        let caller = peer
            .pid
            .ok_or_else(|| refused("the caller's pid is unknown".into()))?;
        if pid <= 1 {
            return Err(refused(format!(
                "owner_pid {pid}: not a process a job can belong to"
            )));
        }
        let Some(found) = self
            .procs
            .lineage(caller)
            .into_iter()
            .find(|s| s.pid == pid)
        else {
            return Err(refused(format!(
                "owner_pid {pid} is neither the caller (pid {caller}) nor one of its ancestors"
            )));
        };
        if peer.uid != 0 {
            let uid = self.procs.credentials(pid).map(|c| c.uid);
            if uid != Some(peer.uid) {
                return Err(refused(format!(
                    "owner_pid {pid} runs as another user than the caller (uid {})",
                    peer.uid
                )));
            }
        }
        Ok(Some(ProcId::from(&found)))
    }

    /// Whether `peer` may act on a job with this record.
    pub(super) fn may_act_on(&self, rec: &JobRecord, peer: &Peer) -> bool {
        if peer.uid == 0 {
            return true;
        }
        match (rec.owner, peer.pid) {
            (Some(owner), Some(pid)) => self.procs.descends_from(pid, owner),
            _ => false,
        }
    }

    /// The control API's check before a caller touches a job: a job id, a live job, and
    /// (for callers that are not root) one of the caller's own.
    pub(super) fn authorize(&self, job: &str, peer: &Peer) -> Result<(), ApiError> {
        if !jobs::valid_job_id(job) {
            return Err(ApiError::new(400, "BadRequest", "not a job id"));
        }
        let jobs = lock(&self.jobs);
        let Some(live) = jobs.get(job) else {
            return Err(ApiError::new(
                404,
                "NoSuchJob",
                format!("no job {job} (already ended?)"),
            ));
        };
        if self.may_act_on(&live.record, peer) {
            return Ok(());
        }
        tracing::warn!(
            job,
            uid = peer.uid,
            pid = peer.pid,
            "control request refused: the caller does not own the job"
        );
        Err(ApiError::new(
            403,
            "NotOwner",
            format!(
                "job {job} does not belong to this caller: a caller that is not root acts only on jobs started for it or one of its ancestors"
            ),
        ))
    }

    /// Ends `job` when its owner exits (or at once if it already has).
    pub(super) fn watch_owner(&self, job: &str, owner: ProcId) {
        let Some(me) = self.me.get().cloned() else {
            return;
        };
        let procs = self.procs.clone();
        let job_id = job.to_string();
        let job = job_id.clone();
        let task = tokio::spawn(async move {
            wait_for_exit(owner, &procs).await;
            // The job's end aborts the job's tasks, this one among them: it runs apart.
            tokio::spawn(async move {
                if let Some(d) = me.upgrade() {
                    let why = format!("its owner process {} exited", owner.pid);
                    if d.end_job(&job, &why).await.is_ok() {
                        tracing::info!(job, owner = owner.pid, "job ended: its owner exited");
                    }
                }
            });
        });
        match lock(&self.jobs).get_mut(&job_id) {
            Some(live) => live.tasks.push(task),
            None => task.abort(),
        }
    }
}

/// Returns when the process `owner` names has exited (at once if it is not there).
async fn wait_for_exit(owner: ProcId, procs: &crate::procs::Procs) {
    use rustix::process::{pidfd_open, Pid, PidfdFlags};
    let Some(pid) = Pid::from_raw(owner.pid) else {
        return;
    };
    let fd = match pidfd_open(pid, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(_) => return,
    };
    // The pid may name a newer process since we looked: the pidfd is of whatever has it now.
    if !procs.alive(owner) {
        return;
    }
    // Deprecated for descriptors the AsyncFd does not own (tokio#8587); this one owns its
    // pidfd (an `OwnedFd`) for its whole life, which is what the unsafe replacement asks
    // its caller to promise.
    #[allow(deprecated)]
    let registered = tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::READABLE);
    match registered {
        // A pidfd becomes readable when its process exits.
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            if !procs.alive(owner) {
                return;
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_hidden_paths_must_be_plain_absolute_paths() {
        let ok = checked_hide(&["/var/lib/buildkite-agent/builds".into()]).unwrap();
        assert_eq!(ok, vec![PathBuf::from("/var/lib/buildkite-agent/builds")]);
        for bad in ["relative/path", "/", "/a/../etc", "//", "a"] {
            let e = checked_hide(&[bad.into()]).unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
            assert!(e.message.contains("hide"), "{bad}: {}", e.message);
        }
        let many: Vec<PathBuf> = (0..=MAX_EXTRA_HIDE)
            .map(|i| format!("/x{i}").into())
            .collect();
        assert!(checked_hide(&many).is_err());
    }
}
