//! Buildkite agent hooks end to end (`integrations/buildkite/hooks/`): each hook sourced by
//! bash with the variables the Buildkite agent sets, in the agent's order (environment,
//! command, pre-exit), with a fake `buildkite-agent` on PATH that prints a Buildkite-shaped
//! OIDC token signed with the test issuer's keys and records its arguments; a real
//! sandboxed `airlockd` and moto as STS.
//!
//! Privileged (root: cgroups, namespaces, nftables; the hooks run the sandbox init).

use airlock_tests::oidc::{mint_with, TestKey};
use airlock_tests::paths;
use airlock_tests::stack::Stack;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BUILDKITE_ISSUER: &str = "https://agent.buildkite.com";
/// The agent session token the Buildkite agent gives every job: never for the sandbox.
const AGENT_ACCESS_TOKEN: &str = "bkaccess-4Jq9ZzTq";
/// The host's own key, in the agent's environment: never for the sandbox.
const HOST_KEY: &str = "AKIAHOSTKEY0000000001";

/// Two Buildkite rules, appended to `20-staging.toml`: one pinned to the organisation
/// `bk-acme`, then one that matches the `deploy` pipeline of any organisation.
const RULES: &str = r#"
[[rule]]
name = "bk-acme-deploy"
[rule.match]
provider = "buildkite"
owner = "bk-acme"
repository = "bk-acme/deploy"
ref = "refs/heads/main"
[[rule.grant]]
alias = "deploy"
role_arn = "arn:aws:iam::123456789012:role/web-staging-deploy"
duration = "1h"

[[rule]]
name = "bk-any-deploy"
[rule.match]
provider = "buildkite"
repository = "*/deploy"
[[rule.grant]]
alias = "ci"
role_arn = "arn:aws:iam::123456789012:role/ci-readonly"
duration = "1h"
"#;

fn prereqs() {
    airlock_tests::prereq::require_root_and(
        "the Buildkite tests",
        &[("curl", "curl"), ("ip", "iproute2"), ("nft", "nftables")],
    );
}

/// A sandboxed agent that trusts the Buildkite issuer (test keys, audience `airlock`: the
/// hooks' default) with the two rules above.
fn stack() -> Stack {
    let jwks = paths::oidc_fixtures().join("jwks.json");
    let issuer = format!(
        "\n[[issuer]]\nissuer = \"{BUILDKITE_ISSUER}\"\naudiences = [\"airlock\"]\nprovider = \"buildkite\"\njwks_file = \"{}\"\n",
        jwks.display()
    );
    Stack::sandboxed_rule_tables(&issuer, &[("20-staging.toml", RULES)])
}

/// A Buildkite OIDC token as `buildkite-agent oidc request-token --audience airlock` gives
/// it (claims as in Buildkite's documentation), signed with the test key.
fn buildkite_token(org: &str, pipeline: &str, job: &str) -> String {
    let claims = json!({
        "sub": format!("organization:{org}:pipeline:{pipeline}:ref:refs/heads/main:commit:9f8e7d:step:deploy"),
        "organization_slug": org,
        "pipeline_slug": pipeline,
        "build_number": 42,
        "build_branch": "main",
        "build_commit": "9f8e7d",
        "build_source": "ui",
        "step_key": "deploy",
        "job_id": job,
        "agent_id": "0190a1b2-0000-4000-8000-00000000a9e1",
    });
    let key = TestKey::Rsa;
    mint_with(
        &key.file(),
        key.kid(),
        key.alg(),
        BUILDKITE_ISSUER,
        "airlock",
        &claims,
        300,
    )
    .expect("a Buildkite test token")
}

/// One Buildkite job's host side: the hooks (copied, pointed at the built `airlock` and
/// this agent), the fake `buildkite-agent`, the checkout, the hooks' state directory.
struct Host {
    dir: tempfile::TempDir,
    hooks: PathBuf,
    bin: PathBuf,
    checkout: PathBuf,
    state: PathBuf,
    args_file: PathBuf,
}

impl Host {
    fn new(stack: &Stack, token: &str) -> Host {
        // Not under /tmp, /run or /home: the sandbox's own directories cover those, and
        // the step copies the checkout from the host's (read-only) tree.
        let base = paths::job_visible_dir("buildkite-tests");
        let dir = tempfile::tempdir_in(&base).unwrap();
        let root = dir.path();
        let hooks = root.join("hooks");
        let bin = root.join("bin");
        let checkout = root.join("checkout");
        let state = root.join("state");
        for d in [&hooks, &bin, &checkout] {
            std::fs::create_dir_all(d).unwrap();
        }
        // The shipped hooks, with the binary's path and the test agent's config filled in
        // (what an operator installing elsewhere edits) and a state directory of the test's.
        let airlock = paths::bin("airlock");
        for h in ["environment", "command", "pre-exit"] {
            let src = paths::repo_root()
                .join("integrations/buildkite/hooks")
                .join(h);
            let text = std::fs::read_to_string(&src).unwrap();
            let call = format!("/usr/bin/airlock buildkite {h}");
            assert!(text.contains(&call), "{}: no `{call}`", src.display());
            let text = text.replace(
                &call,
                &format!(
                    "{} --config {} buildkite {h} --state-dir {}",
                    airlock.display(),
                    stack.agent.config_path().display(),
                    state.display()
                ),
            );
            std::fs::write(hooks.join(h), text).unwrap();
        }
        // The fake buildkite-agent: records its arguments, prints the pre-minted token.
        let token_file = root.join("token.jwt");
        std::fs::write(&token_file, token).unwrap();
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let args_file = root.join("buildkite-agent.args");
        let fake = bin.join("buildkite-agent");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"$@\" >> '{}'\nif [ \"$1 $2\" != \"oidc request-token\" ]; then echo 'fake buildkite-agent: unexpected command' >&2; exit 2; fi\ncat '{}'\n",
                args_file.display(),
                token_file.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The checkout: world-readable, as the sandbox's user copies it.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&checkout, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(checkout.join("checked-out.txt"), "from-the-checkout\n").unwrap();
        std::fs::set_permissions(
            checkout.join("checked-out.txt"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        Host {
            dir,
            hooks,
            bin,
            checkout,
            state,
            args_file,
        }
    }

    /// The variables the Buildkite agent gives the job's hooks (plus the host's own).
    fn env(&self, org: &str, pipeline: &str, job: &str, command: &str) -> Vec<(String, String)> {
        [
            (
                "PATH",
                format!(
                    "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    self.bin.display()
                ),
            ),
            ("HOME", "/root".into()),
            ("BUILDKITE", "true".into()),
            ("CI", "true".into()),
            ("BUILDKITE_AGENT_NAME", "bk-host-1".into()),
            ("BUILDKITE_AGENT_ACCESS_TOKEN", AGENT_ACCESS_TOKEN.into()),
            ("BUILDKITE_ORGANIZATION_SLUG", org.into()),
            ("BUILDKITE_PIPELINE_SLUG", pipeline.into()),
            ("BUILDKITE_BUILD_NUMBER", "42".into()),
            ("BUILDKITE_BRANCH", "main".into()),
            ("BUILDKITE_JOB_ID", job.into()),
            ("BUILDKITE_TIMEOUT", "10".into()),
            ("BUILDKITE_COMMAND", command.into()),
            (
                "BUILDKITE_BUILD_CHECKOUT_PATH",
                self.checkout.display().to_string(),
            ),
            ("STEP_GREETING", "hello from the step env".into()),
            ("AWS_ACCESS_KEY_ID", HOST_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", "host-secret-never-in-a-job".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A hook, sourced the way the Buildkite bootstrap sources it.
    fn hook_command(&self, hook: &str, env: &[(String, String)]) -> Command {
        let mut c = Command::new("bash");
        c.arg("-c")
            .arg(". \"$0\"")
            .arg(self.hooks.join(hook))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.checkout)
            .stdin(Stdio::null());
        c
    }

    fn hook(&self, hook: &str, env: &[(String, String)]) -> Output {
        self.hook_command(hook, env).output().unwrap()
    }

    fn fake_args(&self) -> String {
        std::fs::read_to_string(&self.args_file).unwrap_or_default()
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn records(stack: &Stack, event: &str, job: &str) -> Vec<Value> {
    stack
        .agent
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == event && r["job"] == job)
        .collect()
}

/// The airlock job the command hook printed (`… runs as airlock job <id>: …`).
fn airlock_job_of(stack: &Stack, buildkite_job: &str) -> String {
    let runner = format!("buildkite bk-host-1 job {buildkite_job}");
    stack
        .agent
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == "job_started" && r["runner"] == runner.as_str())
        .and_then(|r| r["job"].as_str().map(String::from))
        .unwrap_or_else(|| panic!("no job_started record for runner {runner}"))
}

fn assert_wiped(stack: &Stack, job: &str) {
    let wiped = records(stack, "job_wiped", job);
    assert_eq!(wiped.len(), 1, "{wiped:?}");
    assert_eq!(wiped[0]["leftovers"], json!([]), "{}", wiped[0]);
    let job_dir = stack.agent.dir().join("jobs").join(job);
    assert!(!job_dir.exists(), "{} is left", job_dir.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(job), "a mount of {job} is left");
}

fn assert_token_nowhere(stack: &Stack, token: &str, outputs: &[&Output]) {
    let audit = std::fs::read_to_string(stack.agent.audit_path()).unwrap();
    assert!(!audit.contains(token), "the token is in the audit log");
    assert!(
        !stack.agent.log().contains(token),
        "the token is in the agent's log"
    );
    for o in outputs {
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains(token),
            "token on stdout"
        );
        assert!(
            !String::from_utf8_lossy(&o.stderr).contains(token),
            "token on stderr"
        );
    }
}

/// A step of the pinned organisation runs in the sandbox with the job-scoped credentials
/// of its rule, its checkout and its variables but none of the host's secrets; its exit
/// status is the hook's; the job is ended and wiped; the token shows nowhere.
#[test]
fn pinned_org_step_runs_sandboxed_with_job_credentials() {
    prereqs();
    let stack = stack();
    let bk_job = "0190a1b2-1111-4000-8000-000000000001";
    let token = buildkite_token("bk-acme", "deploy", bk_job);
    let host = Host::new(&stack, &token);
    let step = r#"echo "greeting=$STEP_GREETING"
echo "agent_token=${BUILDKITE_AGENT_ACCESS_TOKEN:-unset}"
echo "host_key=${AWS_ACCESS_KEY_ID:-unset}"
echo "uid=$(id -u) pid=$$"
echo "checkout=$(cat checked-out.txt)"
curl -sS --max-time 10 -H "Authorization: $(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")" "$AWS_CONTAINER_CREDENTIALS_FULL_URI"
echo
exit 3"#;
    let env = host.env("bk-acme", "deploy", bk_job, step);

    let e = host.hook("environment", &env);
    assert_eq!(e.status.code(), Some(0), "{}", text(&e));
    assert!(
        String::from_utf8_lossy(&e.stdout).contains("ready"),
        "{}",
        text(&e)
    );

    let c = host.hook("command", &env);
    let out = String::from_utf8_lossy(&c.stdout).into_owned();
    assert_eq!(
        c.status.code(),
        Some(3),
        "the step's status is the hook's: {}",
        text(&c)
    );
    assert_eq!(
        host.fake_args(),
        "oidc\nrequest-token\n--audience\nairlock\n"
    );
    assert!(
        out.contains("greeting=hello from the step env"),
        "{}",
        text(&c)
    );
    assert!(out.contains("agent_token=unset"), "{}", text(&c));
    assert!(out.contains("host_key=unset"), "{}", text(&c));
    assert!(
        !out.contains(AGENT_ACCESS_TOKEN) && !out.contains(HOST_KEY),
        "{}",
        text(&c)
    );
    assert!(
        !out.contains("uid=0 "),
        "the step runs as the slot user: {}",
        text(&c)
    );
    assert!(
        out.contains(" pid=1\n") || out.contains("pid=1\n"),
        "pid namespace: {}",
        text(&c)
    );
    assert!(out.contains("checkout=from-the-checkout"), "{}", text(&c));
    let creds: Value = out
        .lines()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no credentials JSON: {}", text(&c)));
    assert!(
        creds["AccessKeyId"]
            .as_str()
            .is_some_and(|k| !k.is_empty() && k != HOST_KEY),
        "{creds}"
    );
    assert!(
        creds["Token"].as_str().is_some_and(|t| !t.is_empty()),
        "{creds}"
    );

    let job = airlock_job_of(&stack, bk_job);
    let started = &records(&stack, "job_started", &job)[0];
    assert_eq!(started["rule"], "bk-acme-deploy", "{started}");
    assert!(started["refused"].is_null(), "{started}");
    let issued = records(&stack, "credentials_issued", &job);
    assert!(!issued.is_empty(), "no credentials_issued for {job}");
    assert!(
        issued[0].to_string().contains("web-staging-deploy"),
        "the pinned rule's role: {}",
        issued[0]
    );
    // The command hook ended the job; pre-exit finds nothing left and says so.
    assert_wiped(&stack, &job);
    let p = host.hook("pre-exit", &env);
    assert_eq!(p.status.code(), Some(0), "{}", text(&p));
    assert!(
        String::from_utf8_lossy(&p.stdout).contains("no airlock job"),
        "{}",
        text(&p)
    );
    assert!(
        std::fs::read_dir(&host.state).unwrap().next().is_none(),
        "state left"
    );
    assert_token_nowhere(&stack, &token, &[&e, &c, &p]);
    drop(host.dir);
}

/// A token of another organisation whose only matching rule does not pin the
/// organisation: the step fails with a message naming the rule and what to add, the
/// command never runs, no credentials are issued, and the job is wiped.
#[test]
fn other_org_matching_an_unpinned_rule_is_refused_before_the_command_runs() {
    prereqs();
    let stack = stack();
    let bk_job = "0190a1b2-2222-4000-8000-000000000002";
    let token = buildkite_token("evil-org", "deploy", bk_job);
    let host = Host::new(&stack, &token);
    let env = host.env("evil-org", "deploy", bk_job, "echo STEP-RAN; exit 0");

    let c = host.hook("command", &env);
    let out = String::from_utf8_lossy(&c.stdout).into_owned();
    let err = String::from_utf8_lossy(&c.stderr).into_owned();
    assert_eq!(c.status.code(), Some(77), "{}", text(&c));
    assert!(
        !out.contains("STEP-RAN") && !err.contains("STEP-RAN"),
        "{}",
        text(&c)
    );
    assert!(err.contains("rule \"bk-any-deploy\""), "{}", text(&c));
    assert!(err.contains("owner = \"evil-org\""), "{}", text(&c));
    assert!(err.contains("any organisation"), "{}", text(&c));

    let job = airlock_job_of(&stack, bk_job);
    let started = &records(&stack, "job_started", &job)[0];
    assert_eq!(started["rule"], "bk-any-deploy", "{started}");
    assert!(
        started["refused"]
            .as_str()
            .is_some_and(|r| r.contains("any organisation")),
        "{started}"
    );
    assert!(records(&stack, "credentials_issued", &job).is_empty());
    assert_wiped(&stack, &job);
    let p = host.hook("pre-exit", &env);
    assert_eq!(p.status.code(), Some(0), "{}", text(&p));
    assert_token_nowhere(&stack, &token, &[&c, &p]);

    // The same refusal through the operator CLI: the daemon decides, not the hook.
    let f = stack.agent.token_file(&token);
    let run = stack
        .agent
        .cli(&["job", "start", "--oidc-token-file", f.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&run.stdout).unwrap_or_else(|_| panic!("{}", text(&run)));
    assert!(
        v["refused"]
            .as_str()
            .is_some_and(|r| r.contains("bk-any-deploy")),
        "{v}"
    );
    assert!(v["grants"].as_array().is_some_and(|g| g.is_empty()), "{v}");
    let end = stack.agent.end_job(v["job_id"].as_str().unwrap());
    assert!(end.status.success(), "{}", text(&end));
}

/// A command hook killed mid-step (a cancelled job: the agent kills its process group):
/// pre-exit ends the still-running job, which is wiped with everything the step started;
/// a second pre-exit is fine.
#[test]
fn pre_exit_ends_a_job_the_command_hook_left_running() {
    prereqs();
    let stack = stack();
    let bk_job = "0190a1b2-3333-4000-8000-000000000003";
    let token = buildkite_token("bk-acme", "deploy", bk_job);
    let host = Host::new(&stack, &token);
    let env = host.env("bk-acme", "deploy", bk_job, "echo step-started; sleep 300");
    let mut child = host
        .hook_command("command", &env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let record = host.state.join(format!("{bk_job}.job"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !record.exists() {
        assert!(
            Instant::now() < deadline,
            "the command hook recorded no job"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let job = std::fs::read_to_string(&record).unwrap().trim().to_string();
    // Let the step start inside the sandbox, then cancel the hook's whole process group.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("step-started") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the step started in its sandbox");
    let pgid = child.id();
    let k = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    assert!(k.success());
    let killed = child.wait().unwrap();
    assert!(!killed.success());
    let list = stack.agent.cli(&["job", "list", "--json"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains(&job),
        "the job still runs before pre-exit: {}",
        text(&list)
    );

    let p = host.hook("pre-exit", &env);
    assert_eq!(p.status.code(), Some(0), "{}", text(&p));
    assert!(
        String::from_utf8_lossy(&p.stdout).contains(&format!("job {job} ended")),
        "{}",
        text(&p)
    );
    assert!(!record.exists(), "pre-exit forgets the job");
    assert_wiped(&stack, &job);
    let list = stack.agent.cli(&["job", "list", "--json"]);
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&job),
        "{}",
        text(&list)
    );
    let again = host.hook("pre-exit", &env);
    assert_eq!(again.status.code(), Some(0), "idempotent: {}", text(&again));
    assert_token_nowhere(&stack, &token, &[&p, &again]);
}

/// Without a reachable agent the environment hook fails the job before anything runs,
/// saying what to check.
#[test]
fn environment_hook_fails_early_when_the_agent_is_unreachable() {
    prereqs();
    let mut stack = stack();
    let host = Host::new(&stack, "unused");
    let env = host.env(
        "bk-acme",
        "deploy",
        "0190a1b2-4444-4000-8000-000000000004",
        "true",
    );
    stack.agent.stop();
    let e = host.hook("environment", &env);
    assert_eq!(e.status.code(), Some(69), "{}", text(&e));
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(err.contains("cannot reach airlockd"), "{}", text(&e));
    assert!(err.contains("control_group"), "{}", text(&e));
}
