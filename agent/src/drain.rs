//! `airlock drain`: the operator's side of a drain (the agent's is in `daemon/drain.rs`).
//!
//! Asks the agent to take no new job, then waits until no job is left or the timeout
//! passes, and says which jobs still run. It never ends a job: on timeout the agent keeps
//! draining, and what happens to the jobs left is the operator's next step. Every request
//! to the agent is bounded, so a package upgrade that runs this never hangs on it.

use std::time::{Duration, Instant};

use crate::control::{Client, ControlError, DrainRequest, DrainStatus, JobSummary};
use crate::exit;

/// The longest the agent may take to answer one request.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How often the agent is asked what is left.
const POLL: Duration = Duration::from_millis(500);
/// How long an agent that is drained and asked to stop may take to exit.
const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// Stop taking new jobs, wait for the running ones (with a timeout), optionally stop the
/// agent. Only root may drain. Exit 0 once no job is left; 75 when the timeout passed
/// first (the jobs still running are listed; the agent keeps refusing new jobs); 69 when
/// the agent cannot be reached or does not know drain; 77 when not root.
#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    /// How long to wait for the running jobs, e.g. 30m, 2h, 90s (0: only look once).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30m")]
    pub timeout: Duration,
    /// Once no job is left, the agent exits (status 0, which systemd does not restart
    /// with the packaged unit's Restart=on-failure); `systemctl start airlockd` starts it
    /// again. This command returns once it has exited.
    #[arg(long, conflicts_with_all = ["cancel", "status"])]
    pub stop: bool,
    /// Take new jobs again (the agent was draining and is not to be stopped after all).
    #[arg(long, conflicts_with_all = ["status", "timeout"])]
    pub cancel: bool,
    /// Print whether the agent drains and which jobs run, as JSON, without changing it.
    #[arg(long, conflicts_with = "timeout")]
    pub status: bool,
}

/// A failure with its exit code and what to say.
pub type Failure = (i32, String);

/// Runs `airlock drain`; returns the exit code on success (0) or a failure.
pub async fn run(args: DrainArgs, client: &Client) -> Result<i32, Failure> {
    if args.status {
        let s = ask(client.drain_status()).await?;
        let text = serde_json::to_string_pretty(&s).map_err(|e| (exit::SOFTWARE, e.to_string()))?;
        println!("{text}");
        return Ok(exit::OK);
    }
    if args.cancel {
        let s = ask(client.cancel_drain()).await?;
        println!(
            "airlockd takes new jobs again ({} job(s) running)",
            s.remaining
        );
        return Ok(exit::OK);
    }
    let deadline = Instant::now() + args.timeout;
    let mut status = ask(client.drain(&DrainRequest { stop: args.stop })).await?;
    eprintln!(
        "airlock: airlockd refuses new jobs now; waiting up to {} for {} job(s)",
        humantime::format_duration(args.timeout),
        status.remaining
    );
    let mut shown: Vec<String> = Vec::new();
    while status.remaining > 0 {
        let now: Vec<String> = status.jobs.iter().map(describe).collect();
        if now != shown {
            for j in &now {
                eprintln!("airlock:   still running: {j}");
            }
            shown = now;
        }
        if Instant::now() >= deadline {
            return Err((exit::TEMPFAIL, timed_out(&args, &status)));
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
        status =
            match client_answer(client.drain_status()).await {
                Ok(s) => s,
                // A drained agent asked to stop answers for a while before it exits: one
                // that is gone while this command still saw jobs was stopped otherwise.
                Err(ControlError::Connect(..)) => return Err((
                    exit::UNAVAILABLE,
                    "airlockd went away while jobs were still running (stopped or restarted by \
                     someone else?): a stop ended and wiped its sandboxed jobs (see job_ended \
                     in the audit log); a restarted agent takes new jobs again"
                        .into(),
                )),
                Err(e) => return Err(failure(e)),
            };
        if !status.draining {
            return Err((
                exit::TEMPFAIL,
                "the drain was cancelled (airlock drain --cancel, or airlockd restarted): \
                 airlockd takes new jobs again"
                    .into(),
            ));
        }
    }
    if !args.stop {
        println!(
            "airlockd is drained: no job is running, and it takes no new job until it \
             restarts or `airlock drain --cancel`"
        );
        return Ok(exit::OK);
    }
    // The agent exits by itself once drained; its socket stops answering when it has.
    let exit_by = Instant::now() + EXIT_WITHIN;
    loop {
        match client_answer(client.drain_status()).await {
            Err(ControlError::Connect(..)) => break,
            _ if Instant::now() >= exit_by => {
                return Err((
                    exit::TEMPFAIL,
                    format!(
                        "airlockd is drained but has not exited within {}s; see its log \
                         (journalctl -u airlockd)",
                        EXIT_WITHIN.as_secs()
                    ),
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    println!("airlockd is drained and has stopped; `systemctl start airlockd` starts it again");
    Ok(exit::OK)
}

/// One job, as the operator needs to find it (no token, no credentials).
fn describe(j: &JobSummary) -> String {
    let mut s = j.job_id.clone();
    let mut about = Vec::new();
    if let Some(r) = &j.runner {
        about.push(format!("runner {r}"));
    }
    match &j.identity {
        Some(i) => about.push(i.clone()),
        None => about.push("identity not bound yet".into()),
    }
    about.push(format!("since {}", j.created));
    s.push_str(&format!(" ({})", about.join(", ")));
    s
}

fn timed_out(args: &DrainArgs, s: &DrainStatus) -> String {
    let mut jobs: Vec<String> = s.jobs.iter().map(describe).collect();
    if s.starting > 0 {
        jobs.push(format!("{} job start(s) in progress", s.starting));
    }
    format!(
        "timed out after {}: {} job(s) still running: {}. airlockd still refuses new jobs: run \
         `airlock drain` again to wait longer, `airlock drain --cancel` to take new jobs again, \
         or stop airlockd (systemctl stop airlockd) to end and wipe them",
        humantime::format_duration(args.timeout),
        s.remaining,
        jobs.join("; ")
    )
}

/// One request, bounded by [`ANSWER_WITHIN`].
async fn client_answer<T>(
    call: impl std::future::Future<Output = Result<T, ControlError>>,
) -> Result<T, ControlError> {
    match tokio::time::timeout(ANSWER_WITHIN, call).await {
        Ok(r) => r,
        Err(_) => Err(ControlError::Protocol(format!(
            "airlockd did not answer within {}s",
            ANSWER_WITHIN.as_secs()
        ))),
    }
}

async fn ask<T>(
    call: impl std::future::Future<Output = Result<T, ControlError>>,
) -> Result<T, Failure> {
    client_answer(call).await.map_err(failure)
}

fn failure(e: ControlError) -> Failure {
    match e {
        ControlError::Refused { status: 403, .. } => (exit::NOPERM, e.to_string()),
        ControlError::Refused { status: 404, .. } => (
            exit::UNAVAILABLE,
            "this airlockd does not know drain (it is older than this airlock): stopping it \
             ends and wipes its sandboxed jobs"
                .into(),
        ),
        ControlError::Connect(..) => (exit::UNAVAILABLE, e.to_string()),
        other => (exit::UNAVAILABLE, other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(runner: Option<&str>, identity: Option<&str>) -> JobSummary {
        JobSummary {
            job_id: "job-1".into(),
            runner: runner.map(String::from),
            identity: identity.map(String::from),
            rule: None,
            grants: vec![],
            refused: None,
            endpoint: "http://127.0.0.1:1".into(),
            created: "2026-01-01T00:00:00Z".into(),
            deadline: "2026-01-01T01:00:00Z".into(),
            owner_pid: None,
        }
    }

    #[test]
    fn a_timeout_names_each_job_left_and_what_to_do_next() {
        let args = DrainArgs {
            timeout: Duration::from_secs(1),
            stop: false,
            cancel: false,
            status: false,
        };
        let s = DrainStatus {
            draining: true,
            since: None,
            stop: false,
            remaining: 3,
            starting: 1,
            jobs: vec![
                job(Some("gh-1"), Some("acme/web@refs/heads/main")),
                job(None, None),
            ],
        };
        let m = timed_out(&args, &s);
        assert!(
            m.starts_with("timed out after 1s: 3 job(s) still running: "),
            "{m}"
        );
        assert!(
            m.contains("job-1 (runner gh-1, acme/web@refs/heads/main, since 2026-01-01T00:00:00Z)"),
            "{m}"
        );
        assert!(m.contains("job-1 (identity not bound yet, since"), "{m}");
        assert!(m.contains("1 job start(s) in progress"), "{m}");
        assert!(
            m.contains("airlock drain --cancel") && m.contains("end and wipe"),
            "{m}"
        );
    }
}
