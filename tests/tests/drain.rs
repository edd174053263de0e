//! `airlock drain` end to end: a real `airlockd` with a running job, the CLI as an operator
//! runs it. A draining agent refuses new jobs with its own error while the running job keeps
//! its credentials; the drain ends when the job does (and with `--stop` the agent exits 0),
//! or times out naming the job left; `--cancel` and a restart take jobs again. (A caller
//! that is not root is refused: `control_socket.rs`.)

use airlock_tests::agent::Job;
use airlock_tests::oidc::{self, GithubJob};
use airlock_tests::paths;
use airlock_tests::stack::Stack;
use serde_json::Value;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const DRAINING: &str = "airlockd is draining for a stop or upgrade; run the job on another runner";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `airlock drain ARGS…` against the stack's agent, left running.
fn spawn_drain(stack: &Stack, args: &[&str]) -> Child {
    Command::new(paths::bin("airlock"))
        .arg("--config")
        .arg(stack.agent.config_path())
        .arg("drain")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run airlock drain (cargo build --bins)")
}

fn drain_status(stack: &Stack) -> Value {
    let out = stack.agent.cli(&["drain", "--status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for `child` to exit; returns its output.
fn finish(child: Child, timeout: Duration) -> Output {
    let mut child = child;
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("airlock drain did not return: {}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// `airlock job start` for `who`; the raw output (a refusal is an answer too).
fn try_start(stack: &Stack, who: &GithubJob) -> Output {
    let f = stack.agent.token_file(&who.token());
    stack
        .agent
        .cli(&["job", "start", "--oidc-token-file", &f.to_string_lossy()])
}

fn assert_gets_production_credentials(job: &Job) {
    let (status, body) = job.credentials().expect("the job's endpoint answers");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["RoleArn"].as_str(),
        Some("arn:aws:iam::123456789012:role/web-prod-deploy")
    );
}

#[test]
fn a_drain_refuses_new_jobs_waits_for_the_running_one_and_then_stops_the_agent() {
    let mut stack = Stack::start();
    let running = stack.job(&GithubJob::production());
    assert_gets_production_credentials(&running);

    let drain = spawn_drain(&stack, &["--stop", "--timeout", "2m"]);
    wait_until("the agent to drain", Duration::from_secs(10), || {
        drain_status(&stack)["draining"] == true
    });
    let status = drain_status(&stack);
    assert_eq!(status["stop"], true, "{status}");
    assert_eq!(status["remaining"], 1, "{status}");
    assert_eq!(
        status["jobs"][0]["job_id"],
        running.job_id.as_str(),
        "{status}"
    );

    // A new job is refused with the drain's own error (503: `airlock` exits 69)...
    let out = try_start(&stack, &GithubJob::production().with_run_id(oidc::now()));
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    assert!(text(&out).contains(DRAINING), "{}", text(&out));
    // ...while the running job keeps its credentials, and the drain keeps waiting for it.
    assert_gets_production_credentials(&running);
    std::thread::sleep(Duration::from_millis(1500));
    assert_gets_production_credentials(&running);
    assert!(stack.agent.pid().is_some());
    let mut drain = drain;
    assert!(
        drain.try_wait().unwrap().is_none(),
        "the drain returned with a job running"
    );

    let end = stack.agent.cli(&["job", "end", &running.job_id]);
    assert_eq!(end.status.code(), Some(0), "{}", text(&end));
    let out = finish(drain, Duration::from_secs(40));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("airlockd is drained and has stopped"),
        "{}",
        text(&out)
    );
    let exit = stack.agent.wait_exit(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|s| s.success()),
        "airlockd exits 0 once drained with --stop: {exit:?}\n{}",
        stack.agent.log()
    );

    let records = stack.agent.audit_records();
    let event = |e: &str| {
        records
            .iter()
            .filter(|r| r["event"] == e)
            .collect::<Vec<_>>()
    };
    let started = event("drain_started");
    assert_eq!(started.len(), 1, "{records:?}");
    assert_eq!(started[0]["uid"], 0);
    assert_eq!(started[0]["stop"], true);
    assert_eq!(started[0]["jobs"], 1);
    assert!(
        event("job_refused").iter().any(|r| r["reason"] == DRAINING),
        "the refused start is audited: {records:?}"
    );
    assert_eq!(event("agent_stopped").len(), 1, "{records:?}");

    // A restart takes jobs again: draining lives in the running agent only.
    stack.agent.restart().expect("airlockd starts again");
    assert_eq!(drain_status(&stack)["draining"], false);
    let job = stack.job(&GithubJob::production().with_run_id(oidc::now()));
    assert_gets_production_credentials(&job);
}

#[test]
fn a_drain_that_times_out_names_the_job_left_and_cancel_takes_jobs_again() {
    let stack = Stack::start();
    let running = stack.job(&GithubJob::production());

    let started = Instant::now();
    let out = finish(
        spawn_drain(&stack, &["--timeout", "1s"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    assert!(started.elapsed() >= Duration::from_secs(1));
    let said = text(&out);
    assert!(
        said.contains("timed out after 1s: 1 job(s) still running")
            && said.contains(&running.job_id)
            && said.contains("acme/web"),
        "{said}"
    );
    assert!(said.contains("airlock drain --cancel"), "{said}");
    assert!(
        !said.contains(&running.token),
        "no token in what drain says"
    );

    // Still draining after the timeout: the job runs, new ones are refused.
    assert_eq!(drain_status(&stack)["draining"], true);
    assert_gets_production_credentials(&running);
    let out = try_start(&stack, &GithubJob::staging());
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    assert!(text(&out).contains(DRAINING), "{}", text(&out));

    // The operator changed their mind.
    let out = stack.agent.cli(&["drain", "--cancel"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("takes new jobs again"),
        "{}",
        text(&out)
    );
    assert_eq!(drain_status(&stack)["draining"], false);
    let out = try_start(&stack, &GithubJob::staging());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        stack
            .agent
            .audit_records()
            .iter()
            .any(|r| r["event"] == "drain_cancelled" && r["uid"] == 0),
        "the cancel is audited"
    );
    // The agent did not stop: drain without --stop leaves it running.
    assert_eq!(stack.agent.healthz(), Some(200));
}

/// `airlockd --help` and docs/operations.md say the same of the signals: what SIGTERM ends,
/// what it keeps, and that a drain comes first to end nothing.
#[test]
fn airlockd_help_and_the_operations_guide_agree_on_the_signals() {
    let flat = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let help = Command::new(paths::bin("airlockd"))
        .arg("--help")
        .output()
        .expect("run airlockd --help (cargo build --bins)");
    assert_eq!(help.status.code(), Some(0));
    let help = flat(&String::from_utf8_lossy(&help.stdout));
    let guide =
        flat(&std::fs::read_to_string(paths::repo_root().join("docs/operations.md")).unwrap());
    for said in [
        "SIGTERM",
        "SIGINT",
        "SIGHUP",
        "every sandboxed job is ended and wiped first (its processes killed, its files, network and credentials gone)",
        "an unsandboxed job keeps its record, and a restart serves it again",
        "a bad policy keeps the old ones (logged, audited policy_reload_failed)",
        "keeps the network and egress allowlist it started with",
        "airlock drain",
    ] {
        let said = flat(said);
        assert!(help.contains(&said), "airlockd --help lacks {said:?}:\n{help}");
        let in_guide = said.replace("policy_reload_failed", "`policy_reload_failed`");
        assert!(
            guide.contains(&said) || guide.contains(&in_guide),
            "docs/operations.md lacks {said:?}"
        );
    }
    // The old, wrong claim is gone: SIGTERM does not keep sandboxed jobs.
    assert!(!help.contains("keeping job records so a restart serves running jobs again"));
}

/// The case upgrades are for: a sandboxed job fetches its credentials from inside its
/// namespace all through a drain, ends on its own (not wiped by a stop), and only then does
/// the drained agent exit.
#[test]
fn a_sandboxed_job_keeps_its_credentials_through_a_drain_and_ends_on_its_own() {
    let mut stack = Stack::sandboxed("");
    let run = stack.agent.spawn_run_sh(
        &GithubJob::production().token(),
        r#"for i in $(seq 1 20); do \
             curl -sS -o /dev/null -w '%{http_code}\n' \
               -H "Authorization: $(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")" \
               "$AWS_CONTAINER_CREDENTIALS_FULL_URI"; \
             sleep 0.3; \
           done"#,
    );
    wait_until(
        "the sandboxed job to start",
        Duration::from_secs(30),
        || {
            let out = stack.agent.cli(&["job", "list", "--json"]);
            serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() == 1))
        },
    );
    let drain = spawn_drain(&stack, &["--stop", "--timeout", "2m"]);
    wait_until("the agent to drain", Duration::from_secs(10), || {
        drain_status(&stack)["draining"] == true
    });
    let out = try_start(&stack, &GithubJob::staging());
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    assert!(text(&out).contains(DRAINING), "{}", text(&out));

    let run = run.wait_with_output().expect("airlock run ends");
    assert_eq!(run.status.code(), Some(0), "{}", text(&run));
    let codes: Vec<String> = String::from_utf8_lossy(&run.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        codes,
        vec!["200".to_string(); 20],
        "every fetch served: {}",
        text(&run)
    );

    let out = finish(drain, Duration::from_secs(40));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let exit = stack.agent.wait_exit(Duration::from_secs(20));
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}\n{}",
        stack.agent.log()
    );
    let records = stack.agent.audit_records();
    let ended: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "job_ended")
        .collect();
    assert_eq!(ended.len(), 1, "{records:?}");
    assert!(
        ended[0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("ended by request")),
        "the job ended on its own, not by the agent's stop: {}",
        ended[0]
    );
    let at = |e: &str| {
        records
            .iter()
            .position(|r| r["event"] == e)
            .unwrap_or_else(|| panic!("no {e}: {records:?}"))
    };
    assert!(
        at("drain_started") < at("job_ended") && at("job_ended") < at("agent_stopped"),
        "{records:?}"
    );
}
