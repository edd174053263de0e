//! Jobs run by `airlock run` with `[sandbox]` enabled: each in its own namespaces, cgroup
//! and network namespace, reaching its credentials at 169.254.170.2 / 169.254.169.254 from
//! inside, and wiped when it ends.

use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;

#[test]
fn a_sandboxed_job_gets_its_credentials_from_inside_its_namespace() {
    let stack = Stack::sandboxed("");
    let out = stack.run_sh(
        &GithubJob::production().token(),
        r#"id -u; echo "$AWS_CONTAINER_CREDENTIALS_FULL_URI"; \
           curl -sS -H "Authorization: $(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")" "$AWS_CONTAINER_CREDENTIALS_FULL_URI"; echo; \
           t=$(curl -sS -X PUT -H 'x-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token); \
           r=$(curl -sS -H "x-aws-ec2-metadata-token: $t" http://169.254.169.254/latest/meta-data/iam/security-credentials/); \
           echo "role=$r"; curl -sS -H "x-aws-ec2-metadata-token: $t" "http://169.254.169.254/latest/meta-data/iam/security-credentials/$r"; \
           echo; echo "token=$AWS_CONTAINER_AUTHORIZATION_TOKEN""#,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {stderr}\nagent log:\n{}",
        stack.agent.log()
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "2000000", "the job runs as its slot's user");
    assert_eq!(lines[1], "http://169.254.170.2/v1/credentials");
    assert!(lines[2].starts_with("{\"AccessKeyId\":\"ASIA"), "{stdout}");
    assert_eq!(lines[3], "role=deploy");
    assert!(lines[4].contains("\"Code\":\"Success\""), "{stdout}");
    // The secrets the job held never reached the agent's log, its audit or its records.
    let creds: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
    let endpoint_token = lines[5].strip_prefix("token=").unwrap().to_string();
    let secrets = [
        creds["SecretAccessKey"].as_str().unwrap().to_string(),
        creds["Token"].as_str().unwrap().to_string(),
        endpoint_token,
    ];
    let audit = std::fs::read_to_string(stack.agent.audit_path()).unwrap();
    let log = stack.agent.log();
    for secret in &secrets {
        assert!(secret.len() > 20);
        assert!(!audit.contains(secret.as_str()) && !log.contains(secret.as_str()));
    }
    let events: Vec<String> = stack
        .agent
        .audit_records()
        .iter()
        .map(|r| r["event"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(events.contains(&"job_wiped".to_string()), "{events:?}");
    let wiped = stack
        .agent
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == "job_wiped")
        .unwrap();
    assert_eq!(wiped["leftovers"], serde_json::json!([]), "{wiped}");
}

/// A wipe that cannot remove everything taints the slot: it takes no job until an
/// operator clears it.
#[test]
fn a_wipe_that_leaves_something_taints_the_slot_until_cleared() {
    let stack = Stack::sandboxed("");
    let netns_dir = stack.agent.dir().join("netns");
    // While the job runs, the test pins its network namespace from the host side, like a
    // stray process an operator must look at.
    let token = GithubJob::staging().token();
    let mut holder: Option<std::process::Child> = None;
    let out = std::thread::scope(|s| {
        let job = s.spawn(|| stack.run_sh(&token, "id -u; sleep 3"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline && holder.is_none() {
            if let Some(ns) = std::fs::read_dir(&netns_dir)
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| e.ok())
            {
                holder = std::process::Command::new("nsenter")
                    .arg(format!("--net={}", ns.path().display()))
                    .args(["sleep", "60"])
                    .spawn()
                    .ok();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        job.join().unwrap()
    });
    let mut holder = holder.expect("the job's namespace appeared and was pinned");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2000000");
    let recs = stack.agent.audit_records();
    let tainted = recs
        .iter()
        .find(|r| r["event"] == "slot_tainted")
        .unwrap_or_else(|| panic!("no slot_tainted record: {recs:?}"));
    assert_eq!(tainted["slot"], 0);
    assert!(
        tainted["leftovers"].to_string().contains("Process"),
        "{tainted}"
    );
    let list = stack.agent.cli(&["slot", "list"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).starts_with("slot 0: "),
        "{list:?}"
    );
    // The tainted slot takes no job: the next one runs as slot 1.
    let out = stack.run_sh(&token, "id -u");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2000001");
    // The operator deals with the leftover and clears the slot.
    let _ = holder.kill();
    let _ = holder.wait();
    let cleared = stack.agent.cli(&["slot", "clear", "0"]);
    assert!(cleared.status.success(), "{cleared:?}");
    assert!(stack
        .agent
        .audit_records()
        .iter()
        .any(|r| r["event"] == "slot_cleared" && r["slot"] == 0));
    let out = stack.run_sh(&token, "id -u");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2000000");
    let again = stack.agent.cli(&["slot", "clear", "0"]);
    assert_eq!(again.status.code(), Some(66), "{again:?}");
}

/// A real SDK inside the sandbox: boto3 finds the job's credentials through the container
/// provider and, with those variables gone, through IMDSv2 — both the job's own keys.
#[test]
fn boto3_inside_the_sandbox_finds_the_jobs_credentials_both_ways() {
    let stack = Stack::sandboxed("");
    let python = airlock_tests::paths::venv_bin("python");
    let probe = r#"
import os, boto3
def key():
    c = boto3.Session().get_credentials()
    return c.get_frozen_credentials().access_key, c.method
print(*key())
for v in ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"):
    os.environ.pop(v)
print(*key())
"#;
    let script = format!(
        "exec {} -c '{}'",
        python.display(),
        probe.replace('\'', "\"")
    );
    let out = stack.run_sh(&GithubJob::production().token(), &script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let issued: Vec<String> = stack
        .agent
        .audit_records()
        .iter()
        .filter(|r| r["event"] == "credentials_issued" && r["alias"] == "deploy")
        .map(|r| r["access_key_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(issued.len(), 1, "{issued:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        vec![
            format!("{} container-role", issued[0]).as_str(),
            format!("{} iam-role", issued[0]).as_str(),
        ]
    );
}

/// Stopping the agent ends and wipes its sandboxed jobs: none runs on unwatched.
#[test]
fn stopping_the_agent_wipes_its_sandboxed_jobs() {
    let mut stack = Stack::sandboxed("");
    let token = GithubJob::staging().token();
    let out = std::thread::scope(|s| {
        let job = s.spawn(|| stack.run_sh(&token, "echo started; exec sleep 60"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !stack
            .agent
            .audit_records()
            .iter()
            .any(|r| r["event"] == "credentials_issued")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the job never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(stack.agent.signal("TERM"));
        job.join().unwrap()
    });
    // The job's sleep was killed with its cgroup (SIGKILL: 128 + 9).
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "started\n");
    // The agent finishes its wipes before it exits.
    let status = stack.agent.stop();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let recs = stack.agent.audit_records();
    let wiped = recs
        .iter()
        .find(|r| r["event"] == "job_wiped")
        .unwrap_or_else(|| panic!("no job_wiped: {recs:?}"));
    assert_eq!(wiped["leftovers"], serde_json::json!([]));
    assert!(
        wiped["processes_killed"].as_u64().unwrap_or(0) >= 1,
        "{wiped}"
    );
    assert!(recs
        .iter()
        .any(|r| r["event"] == "job_ended" && r["reason"] == "the agent is stopping"));
    assert!(std::fs::read_dir(stack.agent.dir().join("netns"))
        .map(|d| d.count() == 0)
        .unwrap_or(true));
}

/// `[rule.sandbox]` limits reach the job: the deciding rule's, not the agent's defaults.
#[test]
fn a_rules_sandbox_section_sets_the_jobs_limits() {
    let stack = Stack::sandboxed_production_rule(
        "",
        "pids = 64\nmemory = \"96M\"\ntmpfs = \"8M\"\ncpus = 0.5\n",
    );
    // 8 MiB for the whole job: 6 MiB fit in /tmp, 3 more in the workspace do not.
    let out = stack.run_sh(
        &GithubJob::production().token(),
        "df -k /tmp | tail -1 | awk '{print \"tmp_kib=\" $2}'; \
         head -c 6291456 /dev/zero > /tmp/a && echo six=ok; \
         head -c 3145728 /dev/zero > \"$HOME/work/b\" 2>/dev/null && echo three=ok || echo three=ENOSPC",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ctx = format!(
        "stdout:\n{stdout}\nstderr:\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.agent.log()
    );
    assert!(out.status.success(), "{ctx}");
    assert!(stdout.contains("tmp_kib=8192\n"), "{ctx}");
    assert!(stdout.contains("six=ok\n"), "{ctx}");
    assert!(stdout.contains("three=ENOSPC\n"), "{ctx}");
    let started = stack
        .agent
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == "job_started")
        .unwrap();
    let sb = &started["sandbox"];
    assert_eq!(sb["pids_max"], 64, "{started}");
    assert_eq!(sb["memory_max"], 96 * 1024 * 1024, "{started}");
    assert_eq!(sb["tmpfs_size"], 8 * 1024 * 1024, "{started}");
    assert_eq!(sb["cpu_max_us"], "50000 100000", "{started}");
    assert_eq!(sb["network"], "endpoint-only", "{started}");
    // The staging job (its rule has no [rule.sandbox]) gets the agent's defaults.
    let out = stack.run_sh(&GithubJob::staging().token(), "true");
    assert!(out.status.success());
    let staging = stack
        .agent
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "job_started")
        .nth(1)
        .unwrap();
    assert_ne!(staging["sandbox"]["pids_max"], 64, "{staging}");
    assert_ne!(
        staging["sandbox"]["tmpfs_size"],
        8 * 1024 * 1024,
        "{staging}"
    );
}

/// The agent starts each job's sandbox init, so the job could inherit what the agent set
/// for itself: its OOM score adjustment (the packaged unit's `OOMScoreAdjust=-500`) and
/// its raised descriptor limit. It inherits neither: the kernel's default OOM score, and
/// the jobs' own fixed `RLIMIT_NOFILE` (at most the agent's hard limit).
#[test]
fn a_job_inherits_neither_the_agents_oom_protection_nor_its_descriptor_limit() {
    let stack = Stack::sandboxed("");
    let pid = stack.agent.pid().expect("the agent runs");
    // The packaged unit lowers it (-500); lowering needs CAP_SYS_RESOURCE, which a test
    // host may not give even root, so the test moves it the other way: what matters is
    // that the job does not keep the agent's value.
    std::fs::write(format!("/proc/{pid}/oom_score_adj"), "300").unwrap();
    let out = stack.run_sh(
        &GithubJob::production().token(),
        "cat /proc/self/oom_score_adj; ulimit -n; ulimit -Hn",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent inherits the harness's limits, so the job's comes out the same here.
    let want = format!("0\n{n}\n{n}\n", n = airlock::sandbox::job::job_nofile());
    assert_eq!(stdout, want);
    let agent = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    assert_eq!(agent.trim(), "300", "the agent keeps its own");
}
