//! Draining: the agent takes no new job while the running ones finish, so that it can be
//! stopped or upgraded without ending them (`airlock drain`).
//!
//! Owns the draining flag and the count of starts admitted before it was set. It never
//! ends a job, and it changes nothing for a running one: its credentials, endpoint, binds
//! and execs go on until the job ends. Only root may drain (`POST /v1/drain`), see the
//! drain state (`GET /v1/drain`) or take jobs again (`DELETE /v1/drain`); a restart of the
//! agent takes jobs again too (the flag lives in memory only).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;

use super::{audit_best_effort, lock, Daemon};
use crate::control::{ApiError, DrainRequest, DrainStatus, Peer};

/// What a job start is told while the agent drains (HTTP 503, code [`DRAINING_CODE`]).
pub const DRAINING_MESSAGE: &str =
    "airlockd is draining for a stop or upgrade; run the job on another runner";
/// The error code of a start refused while the agent drains.
pub const DRAINING_CODE: &str = "Draining";
/// How often a draining agent asked to stop looks whether its last job has ended.
const STOP_POLL: Duration = Duration::from_millis(200);
/// How long a drained agent asked to stop goes on answering before it exits, so that
/// `airlock drain --stop` (which asks every half second) sees that no job is left and
/// tells an exit of the drain from a stop by someone else.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Since when, by whom, and whether the agent exits once no job is left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draining {
    pub since: OffsetDateTime,
    pub uid: u32,
    pub stop: bool,
}

/// The draining flag and the starts in flight.
///
/// A start is admitted (or refused) under the same lock that sets the flag, so once
/// [`Drain::begin`] returns no start is admitted any more, and every start admitted before
/// is counted in [`Drain::starting`] until it has become a job or failed.
#[derive(Debug, Default)]
pub struct Drain {
    state: Mutex<Option<Draining>>,
    starting: Arc<AtomicUsize>,
}

/// A start admitted before any drain; counted until dropped.
#[derive(Debug)]
pub struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drain {
    /// Admit a new job's start, or say since when and by whom the agent drains.
    pub fn admit(&self) -> Result<Admitted, Draining> {
        let state = lock(&self.state);
        if let Some(d) = &*state {
            return Err(d.clone());
        }
        self.starting.fetch_add(1, Ordering::SeqCst);
        Ok(Admitted(self.starting.clone()))
    }

    /// Start draining (or keep draining: `stop` is kept once asked for). Returns the state
    /// and whether it is new.
    pub fn begin(&self, uid: u32, stop: bool, now: OffsetDateTime) -> (Draining, bool) {
        let mut state = lock(&self.state);
        match &mut *state {
            Some(d) => {
                d.stop |= stop;
                (d.clone(), false)
            }
            None => {
                let d = Draining {
                    since: now,
                    uid,
                    stop,
                };
                *state = Some(d.clone());
                (d, true)
            }
        }
    }

    /// Take new jobs again; returns the drain that was cancelled.
    pub fn cancel(&self) -> Option<Draining> {
        lock(&self.state).take()
    }

    pub fn state(&self) -> Option<Draining> {
        lock(&self.state).clone()
    }

    /// Starts admitted before the drain that have not become a job (or failed) yet.
    pub fn starting(&self) -> usize {
        self.starting.load(Ordering::SeqCst)
    }
}

impl Daemon {
    /// The start of a job while the agent drains: refused, audited, and told where to go.
    pub(super) fn admit_start(&self, runner: Option<&str>) -> Result<Admitted, ApiError> {
        self.drain.admit().map_err(|d| {
            tracing::info!(runner = ?runner, "job refused: the agent is draining");
            audit_best_effort(
                &self.audit,
                &self.metrics,
                "job_refused",
                None,
                crate::fields! {
                    "runner" => runner,
                    "reason" => DRAINING_MESSAGE,
                    "draining_since" => crate::endpoint::aws_time(d.since),
                },
            );
            ApiError::new(503, DRAINING_CODE, DRAINING_MESSAGE)
        })
    }

    /// Jobs still running plus starts admitted before the drain.
    fn remaining(&self) -> usize {
        self.job_count() + self.drain.starting()
    }

    fn drain_status(&self, peer: &Peer) -> DrainStatus {
        let state = self.drain.state();
        let jobs = self.list_jobs(peer);
        DrainStatus {
            draining: state.is_some(),
            since: state.as_ref().map(|d| crate::endpoint::aws_time(d.since)),
            stop: state.as_ref().is_some_and(|d| d.stop),
            remaining: self.remaining(),
            starting: self.drain.starting(),
            jobs,
        }
    }

    /// `POST /v1/drain`: stop taking new jobs (root only). Audited before it takes effect.
    pub async fn begin_drain(
        &self,
        req: DrainRequest,
        peer: &Peer,
    ) -> Result<DrainStatus, ApiError> {
        root_only(peer, "drain the agent")?;
        let before = self.drain.state();
        if before.is_none() {
            self.audit
                .append(
                    "drain_started",
                    None,
                    crate::fields! {
                        "uid" => peer.uid,
                        "stop" => req.stop,
                        "jobs" => self.remaining(),
                    },
                )
                .await
                .map_err(|e| {
                    ApiError::new(
                        503,
                        "AuditUnavailable",
                        format!(
                            "the audit log cannot be written, so the agent does not drain: {e}"
                        ),
                    )
                })?;
        }
        let (d, _) = self
            .drain
            .begin(peer.uid, req.stop, OffsetDateTime::now_utc());
        if before.is_some_and(|b| !b.stop) && d.stop {
            // A drain already running is now asked to stop the agent too.
            audit_best_effort(
                &self.audit,
                &self.metrics,
                "drain_started",
                None,
                crate::fields! {
                    "uid" => peer.uid,
                    "stop" => true,
                    "jobs" => self.remaining(),
                    "draining_since" => crate::endpoint::aws_time(d.since),
                },
            );
        }
        tracing::warn!(
            uid = peer.uid,
            stop = d.stop,
            jobs = self.remaining(),
            "draining: no new job is taken until the agent restarts or the drain is cancelled"
        );
        Ok(self.drain_status(peer))
    }

    /// `GET /v1/drain` (root only).
    pub fn get_drain(&self, peer: &Peer) -> Result<DrainStatus, ApiError> {
        root_only(peer, "see the drain state")?;
        Ok(self.drain_status(peer))
    }

    /// `DELETE /v1/drain`: take new jobs again (root only).
    pub fn cancel_drain(&self, peer: &Peer) -> Result<DrainStatus, ApiError> {
        root_only(peer, "cancel a drain")?;
        if let Some(d) = self.drain.cancel() {
            audit_best_effort(
                &self.audit,
                &self.metrics,
                "drain_cancelled",
                None,
                crate::fields! {
                    "uid" => peer.uid,
                    "since" => crate::endpoint::aws_time(d.since),
                    "jobs" => self.remaining(),
                },
            );
            tracing::warn!(
                uid = peer.uid,
                "drain cancelled: the agent takes new jobs again"
            );
        }
        Ok(self.drain_status(peer))
    }

    /// Resolves once a drain asked the agent to stop and no job has been left for
    /// [`STOP_GRACE`] (`airlock drain --stop`); never otherwise.
    pub async fn drained_for_stop(&self) {
        let mut drained_since: Option<std::time::Instant> = None;
        loop {
            if self.drain.state().is_some_and(|d| d.stop) && self.remaining() == 0 {
                let since = *drained_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= STOP_GRACE {
                    return;
                }
            } else {
                drained_since = None;
            }
            tokio::time::sleep(STOP_POLL).await;
        }
    }
}

fn root_only(peer: &Peer, what: &str) -> Result<(), ApiError> {
    if peer.uid == 0 {
        return Ok(());
    }
    tracing::warn!(uid = peer.uid, pid = ?peer.pid, "control request refused: {what} is for root");
    Err(ApiError::new(
        403,
        "NotRoot",
        format!("only root may {what} (an operator's action): run it as root, e.g. with sudo"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH
    }

    #[test]
    fn a_drain_refuses_new_starts_and_counts_the_ones_admitted_before_it() {
        let d = Drain::default();
        let a = d.admit().expect("not draining: admitted");
        let b = d.admit().expect("not draining: admitted");
        assert_eq!(d.starting(), 2);
        let (state, new) = d.begin(0, false, t0());
        assert!(new);
        assert_eq!(
            d.admit().unwrap_err(),
            state,
            "a start after the drain began is refused with the drain's state"
        );
        assert_eq!(d.starting(), 2, "a refused start is not counted");
        drop(a);
        assert_eq!(d.starting(), 1);
        drop(b);
        assert_eq!(d.starting(), 0);
    }

    #[test]
    fn stop_is_kept_once_asked_and_cancel_takes_jobs_again() {
        let d = Drain::default();
        let (s, new) = d.begin(0, true, t0());
        assert!(new && s.stop);
        let later = t0() + time::Duration::seconds(5);
        let (s, new) = d.begin(0, false, later);
        assert!(!new);
        assert!(
            s.stop,
            "a second drain without --stop does not undo the first one's"
        );
        assert_eq!(s.since, t0(), "the drain keeps its first start time");
        assert_eq!(d.cancel(), Some(s));
        assert!(d.state().is_none());
        assert!(
            d.admit().is_ok(),
            "after a cancel, starts are admitted again"
        );
        assert_eq!(d.cancel(), None, "cancelling twice is harmless");
    }
}
