//! The GitLab custom executor driver (`integrations/gitlab/*.sh`, `airlock gitlab`) run the
//! way gitlab-runner runs it — its environment (`BUILD_FAILURE_EXIT_CODE`,
//! `SYSTEM_FAILURE_EXIT_CODE`, `JOB_RESPONSE_FILE`, `CUSTOM_ENV_*`), the stage arguments and
//! script files — against a real `airlockd` with `[sandbox]` and moto as STS; and
//! `airlock job exec`, which the driver's stages use.
//!
//! Privileged (root: cgroups, namespaces, nftables).

use airlock_tests::oidc::{self, GithubJob, TestKey, TEST_AUDIENCE};
use airlock_tests::paths;
use airlock_tests::stack::Stack;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const GITLAB_ISSUER: &str = "https://gitlab.airlock.test";
/// Distinct from each other and from the shell's usual codes, so a test sees which was used.
const BUILD_FAILURE: i32 = 37;
const SYSTEM_FAILURE: i32 = 38;

fn prereqs() {
    airlock_tests::prereq::require_root_and(
        "the GitLab executor tests",
        &[
            ("bash", "bash"),
            ("curl", "curl"),
            ("ip", "iproute2"),
            ("nft", "nftables"),
        ],
    );
}

/// The GitLab group acme's read-only rule, appended to `20-staging.toml`: the repository's
/// `acme-ci-readonly` is GitHub's acme's, and a GitLab group of the same name is another
/// owner, so it needs a rule of its own (scoped to the GitLab issuer).
const GITLAB_RULE: &str = r#"
[[rule]]
name = "gitlab-acme-ci-readonly"
[rule.match]
provider = "gitlab"
owner = "acme"
repository = "acme/*"
namespace_id = "7"
[[rule.grant]]
alias = "readonly"
role_arn = "arn:aws:iam::123456789012:role/ci-readonly"
duration = "30m"
policy_arns = ["arn:aws:iam::aws:policy/ReadOnlyAccess"]
"#;

/// An agent with `[sandbox]`, the repository's policies plus [`GITLAB_RULE`] and a GitLab
/// issuer trusting the fixture keys. GitLab jobs of `acme/*` get `gitlab-acme-ci-readonly`.
fn stack() -> Stack {
    let jwks = paths::oidc_fixtures().join("jwks.json");
    Stack::sandboxed_rule_tables(
        &format!(
            "\n[[issuer]]\nissuer = \"{GITLAB_ISSUER}\"\naudiences = [\"{TEST_AUDIENCE}\"]\nprovider = \"gitlab\"\njwks_file = \"{}\"\n",
            jwks.display()
        ),
        &[("20-staging.toml", GITLAB_RULE)],
    )
}

/// A GitLab `id_tokens:` JWT for job `job_id` of `project`.
fn gitlab_token(project: &str, job_id: u64) -> String {
    let namespace = project.split('/').next().unwrap_or_default();
    let claims = json!({
        "sub": format!("project_path:{project}:ref_type:branch:ref:main"),
        "namespace_id": "7",
        "namespace_path": namespace,
        "project_id": "22",
        "project_path": project,
        "user_login": "alice",
        "pipeline_id": "4100",
        "pipeline_source": "push",
        "job_id": job_id.to_string(),
        "ref": "main",
        "ref_type": "branch",
        "ref_protected": "true",
        "ci_config_ref_uri": format!("gitlab.airlock.test/{project}//.gitlab-ci.yml@refs/heads/main"),
    });
    let key = TestKey::Rsa;
    oidc::mint_with(
        &key.file(),
        key.kid(),
        key.alg(),
        GITLAB_ISSUER,
        TEST_AUDIENCE,
        &claims,
        300,
    )
    .expect("minting a GitLab test token")
}

/// What gitlab-runner has for one job: its payload file, its `CUSTOM_ENV_*` variables and
/// the directory its stage scripts go to.
struct GitlabJob<'a> {
    stack: &'a Stack,
    dir: tempfile::TempDir,
    id: u64,
    custom_env: Vec<(String, String)>,
    scripts: std::cell::Cell<u32>,
}

impl<'a> GitlabJob<'a> {
    /// Job `id` whose payload holds `variables` (as GitLab sends them: the id token among
    /// them, masked) and the job token `job_token`.
    fn new(stack: &'a Stack, id: u64, variables: Value, job_token: &str) -> GitlabJob<'a> {
        let dir = tempfile::Builder::new()
            .prefix("gitlab-runner-")
            .tempdir()
            .unwrap();
        let payload = json!({
            "id": id,
            "token": job_token,
            "allow_git_fetch": true,
            "job_info": {"id": id, "name": "deploy", "stage": "deploy", "project_id": 22, "project_name": "web"},
            "git_info": {"repo_url": "https://gitlab-ci-token:x@gitlab.airlock.test/acme/web.git", "ref": "main", "sha": "0123abcd", "ref_type": "branch"},
            "runner_info": {"timeout": 3600},
            "variables": variables,
            "steps": [{"name": "script", "script": ["make deploy"], "timeout": 3600, "when": "on_success"}],
            "features": {"trace_sections": true},
        });
        std::fs::write(dir.path().join("response.json"), payload.to_string()).unwrap();
        GitlabJob {
            stack,
            dir,
            id,
            custom_env: vec![
                ("CUSTOM_ENV_CI_JOB_ID".into(), id.to_string()),
                ("CUSTOM_ENV_CI_RUNNER_ID".into(), "12".into()),
                ("CUSTOM_ENV_CI_PROJECT_PATH".into(), "acme/web".into()),
            ],
            scripts: std::cell::Cell::new(0),
        }
    }

    /// A job of `project` with its id token under `AIRLOCK_ID_TOKEN`.
    fn with_token(stack: &'a Stack, id: u64, project: &str) -> (GitlabJob<'a>, String) {
        let token = gitlab_token(project, id);
        let vars = json!([
            {"key": "CI_JOB_ID", "value": id.to_string(), "public": true, "masked": false},
            {"key": "CI_PROJECT_PATH", "value": project, "public": true, "masked": false},
            {"key": "AIRLOCK_ID_TOKEN", "value": token, "public": false, "masked": true},
        ]);
        (
            GitlabJob::new(stack, id, vars, &format!("glcbt-64_jobtoken{id}xyz")),
            token,
        )
    }

    fn custom_env(mut self, key: &str, value: &str) -> Self {
        self.custom_env
            .push((format!("CUSTOM_ENV_{key}"), value.into()));
        self
    }

    /// Runs `integrations/gitlab/<stage>.sh ARGS` with gitlab-runner's environment: a copy
    /// of the shipped script with the built `airlock` as its (fixed) binary, and the agent's
    /// `--config` in front of the stage's arguments, where config.toml's `*_args` put it.
    fn stage(&self, stage: &str, args: &[&str]) -> Output {
        let script = driver_script(self.dir.path(), stage);
        let config = self.stack.agent.config_path().display().to_string();
        let mut cmd = Command::new(&script);
        cmd.args(["--config", config.as_str()])
            .args(args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("BUILD_FAILURE_EXIT_CODE", BUILD_FAILURE.to_string())
            .env("SYSTEM_FAILURE_EXIT_CODE", SYSTEM_FAILURE.to_string())
            .env("JOB_RESPONSE_FILE", self.dir.path().join("response.json"))
            .envs(self.custom_env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()))
    }

    /// run_exec with a script file shaped like gitlab-runner's bash scripts.
    fn run(&self, stage: &str, body: &str) -> Output {
        let n = self.scripts.get() + 1;
        self.scripts.set(n);
        let path = self.dir.path().join(format!("script{n}.{stage}"));
        let quoted = body
            .replace('\\', "\\\\")
            .replace('\'', "\\'")
            .replace('\n', "\\n");
        std::fs::write(
            &path,
            format!(
                "#!/usr/bin/env bash\n\nset -eo pipefail\nset +o noclobber\n: | eval $'export CI_JOB_ID={}\\n{quoted}'\nexit 0\n",
                self.id
            ),
        )
        .unwrap();
        self.stage("run", &[path.to_str().unwrap(), stage])
    }
}

/// A copy of the shipped driver script `<stage>.sh` in `dir`, calling the built `airlock`
/// instead of `/usr/bin/airlock` (what an operator installing elsewhere edits).
fn driver_script(dir: &std::path::Path, stage: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let src = paths::repo_root()
        .join("integrations/gitlab")
        .join(format!("{stage}.sh"));
    let text = std::fs::read_to_string(&src).unwrap();
    assert!(
        text.contains("exec /usr/bin/airlock gitlab"),
        "{}: the binary's path is fixed",
        src.display()
    );
    let copy = dir.join(format!("driver-{stage}.sh"));
    std::fs::write(
        &copy,
        text.replace(
            "exec /usr/bin/airlock",
            &format!("exec {}", paths::bin("airlock").display()),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: &Output, stack: &Stack) -> String {
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\nagent log:\n{}",
        text(o),
        stack.agent.log()
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The job's `sandbox` section of its `job_started` record.
fn sandbox_of(stack: &Stack, job: &str) -> Value {
    stack
        .agent
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == "job_started" && r["job"] == job)
        .map(|r| r["sandbox"].clone())
        .unwrap_or_else(|| panic!("no job_started record for {job}"))
}

fn records(stack: &Stack, event: &str, job: &str) -> Vec<Value> {
    stack
        .agent
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == event && r["job"] == job)
        .collect()
}

fn live_jobs(stack: &Stack) -> Vec<String> {
    let out = stack.agent.cli(&["job", "list", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("job list JSON");
    v.as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap().to_string())
        .collect()
}

/// Every kernel object and file of `job` is gone, and its wipe left nothing.
fn assert_wiped(stack: &Stack, job: &str, cgroup: &Path) {
    let wiped = records(stack, "job_wiped", job);
    assert_eq!(wiped.len(), 1, "{wiped:?}");
    assert_eq!(wiped[0]["leftovers"], json!([]), "{}", wiped[0]);
    assert_eq!(wiped[0]["files_detached"], true, "{}", wiped[0]);
    assert!(!cgroup.exists(), "{} is left", cgroup.display());
    let job_dir = stack.agent.dir().join("jobs").join(job);
    assert!(!job_dir.exists(), "{} is left", job_dir.display());
    let ns = stack
        .agent
        .dir()
        .join("netns")
        .join(format!("airlock-{job}"));
    assert!(!ns.exists(), "{} is left", ns.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(job), "a mount of {job} is left:\n{mounts}");
}

/// The airlock job id a prepare printed.
fn airlock_job_of(prepare_stdout: &str) -> String {
    prepare_stdout
        .split("runs as airlock job ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .unwrap_or_else(|| panic!("no airlock job in {prepare_stdout:?}"))
        .to_string()
}

#[test]
fn a_multi_stage_job_shares_its_sandbox_gets_job_scoped_credentials_and_is_wiped() {
    prereqs();
    let stack = stack();
    let (job, token) = GitlabJob::with_token(&stack, 302, "acme/web");

    let config = ok(&job.stage("config", &[]), &stack);
    let config: Value = serde_json::from_str(&config).expect("config_exec prints JSON");
    assert_eq!(config["builds_dir_is_shared"], false, "{config}");
    assert_eq!(config["builds_dir"], "/home/job/work/builds", "{config}");
    assert_eq!(config["cache_dir"], "/home/job/work/cache", "{config}");
    assert_eq!(config["driver"]["name"], "airlock", "{config}");

    let prepared = job.stage("prepare", &[]);
    let out = ok(&prepared, &stack);
    assert!(out.contains("rule gitlab-acme-ci-readonly"), "{out}");
    let id = airlock_job_of(&out);
    let started = records(&stack, "job_started", &id);
    assert_eq!(started[0]["repository"], "acme/web", "{}", started[0]);
    assert_eq!(
        started[0]["runner"], "gitlab gitlab-job 302",
        "{}",
        started[0]
    );
    let cgroup = PathBuf::from(sandbox_of(&stack, &id)["cgroup"].as_str().unwrap());

    // Stage 1 leaves files in the workspace, /tmp and $HOME.
    let s1 = job.run(
        "get_sources",
        "mkdir -p /home/job/work/builds/acme/web && cd /home/job/work/builds/acme/web\n\
         echo built-in-stage-1 > artifact.txt\necho from-tmp > /tmp/shared\n\
         echo from-home > ~/.stage1\nid -u",
    );
    let uid1 = ok(&s1, &stack).trim().to_string();
    // Stage 2 finds them, as the same user, and gets the job's credentials from inside.
    let s2 = job.run(
        "build_script",
        "cat /home/job/work/builds/acme/web/artifact.txt /tmp/shared ~/.stage1\nid -u\n\
         curl -sS -H \"Authorization: $(cat \"$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE\")\" \"$AWS_CONTAINER_CREDENTIALS_FULL_URI\"; echo\n\
         echo \"runner-vars=${CUSTOM_ENV_CI_JOB_ID:-none}\"",
    );
    let out2 = ok(&s2, &stack);
    let lines: Vec<&str> = out2.lines().collect();
    assert_eq!(
        &lines[..4],
        &["built-in-stage-1", "from-tmp", "from-home", uid1.as_str()],
        "{out2}"
    );
    let creds: Value = serde_json::from_str(lines[4]).unwrap_or_else(|e| panic!("{e}: {out2}"));
    assert!(
        creds["AccessKeyId"]
            .as_str()
            .unwrap_or_default()
            .starts_with("ASIA"),
        "{creds}"
    );
    assert!(
        creds["RoleArn"]
            .as_str()
            .unwrap_or_default()
            .contains("ci-readonly"),
        "{creds}"
    );
    // The driver's CUSTOM_ENV_* never reach the job (its script sets what it needs).
    assert_eq!(lines[5], "runner-vars=none", "{out2}");
    let issued = records(&stack, "credentials_issued", &id);
    assert!(!issued.is_empty(), "no credentials_issued for {id}");

    // Each stage is audited as an exec, with argv[0] and a fingerprint only.
    let execs = records(&stack, "job_exec", &id);
    assert_eq!(
        execs.len(),
        3,
        "the sandbox check and two stages: {execs:?}"
    );
    assert_eq!(execs[0]["argv0"], "true");
    assert_eq!(execs[1]["argv0"], "bash");
    assert_eq!(execs[2]["exec"], 3);
    assert_eq!(execs[2]["argv_sha256"].as_str().unwrap().len(), 64);

    let cleaned = job.stage("cleanup", &[]);
    let out = ok(&cleaned, &stack);
    assert!(out.contains("ended"), "{out}");
    assert!(!live_jobs(&stack).contains(&id));
    assert_wiped(&stack, &id, &cgroup);
    // Cleanup is idempotent: a second one finds nothing and does not fail.
    let again = job.stage("cleanup", &[]);
    assert!(ok(&again, &stack).contains("nothing to clean up"));
    // A stage after cleanup is a system failure, not a run anywhere else.
    let late = job.run("after_script", "echo late");
    assert_eq!(late.status.code(), Some(SYSTEM_FAILURE), "{}", text(&late));

    // The OIDC token and the job token never reach the agent's log, the audit or the output.
    let audit = std::fs::read_to_string(stack.agent.audit_path()).unwrap();
    let log = stack.agent.log();
    for o in [&prepared, &s1, &s2, &cleaned] {
        let all = text(o);
        assert!(!all.contains(&token), "the id token was printed: {all}");
    }
    for secret in [
        token.as_str(),
        "glcbt-64_jobtoken302xyz",
        creds["SecretAccessKey"].as_str().unwrap(),
    ] {
        assert!(!audit.contains(secret), "a secret is in the audit log");
        assert!(!log.contains(secret), "a secret is in the agent's log");
    }
}

#[test]
fn a_failing_script_is_a_build_failure_and_the_next_stage_still_runs() {
    prereqs();
    let stack = stack();
    let (job, _) = GitlabJob::with_token(&stack, 410, "acme/web");
    ok(&job.stage("prepare", &[]), &stack);
    let failed = job.run("build_script", "echo before > /tmp/f\nexit 3\necho never");
    assert_eq!(
        failed.status.code(),
        Some(BUILD_FAILURE),
        "{}",
        text(&failed)
    );
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(
        err.contains("stage build_script: the script exited with 3"),
        "{err}"
    );
    // after_script runs in the same sandbox after a failure.
    let after = job.run("after_script", "cat /tmp/f");
    assert_eq!(ok(&after, &stack).trim(), "before");
    // 125 is also the shim's own status for a sandbox it could not build: a script that
    // exits 125 is still a build failure...
    let own_125 = job.run("build_script", "exit 125");
    assert_eq!(
        own_125.status.code(),
        Some(BUILD_FAILURE),
        "{}",
        text(&own_125)
    );
    assert!(
        String::from_utf8_lossy(&own_125.stderr).contains("the script exited with 125"),
        "{}",
        text(&own_125)
    );
    // ...and a sandbox that cannot be built a system failure: a stage that leaves a symlink
    // where the next stage's token file goes makes the next stage's setup fail.
    let plant = job.run(
        "build_script",
        "mv /run/airlock /run/old && ln -s /etc /run/airlock",
    );
    ok(&plant, &stack);
    let broken = job.run("after_script", "echo never");
    assert_eq!(
        broken.status.code(),
        Some(SYSTEM_FAILURE),
        "{}",
        text(&broken)
    );
    assert!(
        String::from_utf8_lossy(&broken.stderr).contains("could not be built"),
        "{}",
        text(&broken)
    );
    assert!(!String::from_utf8_lossy(&broken.stdout).contains("never"));
    ok(&job.stage("cleanup", &[]), &stack);
}

#[test]
fn a_policy_refusal_is_a_system_failure_that_says_why() {
    prereqs();
    let stack = stack();
    let (job, token) = GitlabJob::with_token(&stack, 520, "other-org/tool");
    let refused = job.stage("prepare", &[]);
    assert_eq!(
        refused.status.code(),
        Some(SYSTEM_FAILURE),
        "{}",
        text(&refused)
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("airlock: policy refused this job: no policy rule matches")
            && err.contains("other-org/tool"),
        "{err}"
    );
    assert!(!err.contains(&token));
    // The refused job was ended at once, and no stage can run.
    assert!(live_jobs(&stack).is_empty(), "{:?}", live_jobs(&stack));
    let run = job.run("build_script", "echo should-not-run");
    assert_eq!(run.status.code(), Some(SYSTEM_FAILURE), "{}", text(&run));
    assert!(!String::from_utf8_lossy(&run.stdout).contains("should-not-run"));
    assert!(String::from_utf8_lossy(&run.stderr).contains("no airlock job is recorded"));
    // Cleanup of a job prepare never started is fine.
    ok(&job.stage("cleanup", &[]), &stack);

    // Without an id token at all: a system failure naming what to add to .gitlab-ci.yml.
    let bare = GitlabJob::new(&stack, 521, json!([]), "glcbt-bare");
    let none = bare.stage("prepare", &[]);
    assert_eq!(none.status.code(), Some(SYSTEM_FAILURE), "{}", text(&none));
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(
        err.contains("has no id token AIRLOCK_ID_TOKEN") && err.contains("id_tokens:"),
        "{err}"
    );
    // The agent down: a system failure too.
    let (job3, _) = GitlabJob::with_token(&stack, 522, "acme/web");
    let down = Command::new(driver_script(job3.dir.path(), "prepare"))
        .arg("--socket")
        .arg(stack.agent.dir().join("no-such.sock"))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("BUILD_FAILURE_EXIT_CODE", BUILD_FAILURE.to_string())
        .env("SYSTEM_FAILURE_EXIT_CODE", SYSTEM_FAILURE.to_string())
        .env("JOB_RESPONSE_FILE", job3.dir.path().join("response.json"))
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(SYSTEM_FAILURE), "{}", text(&down));
    assert!(String::from_utf8_lossy(&down.stderr).contains("cannot reach airlockd"));
}

#[test]
fn a_job_cannot_choose_its_identity_or_sandbox_through_custom_env() {
    prereqs();
    let stack = stack();
    // Job 600 of acme/web runs; its sandbox gets a marker.
    let (victim, victim_token) = GitlabJob::with_token(&stack, 600, "acme/web");
    let victim_id = airlock_job_of(&ok(&victim.stage("prepare", &[]), &stack));
    ok(
        &victim.run("build_script", "echo victim > /tmp/marker"),
        &stack,
    );

    // Job 601 (another project, no id token in its payload) sets the victim's job id and
    // token in its own variables, which reach the driver as CUSTOM_ENV_*.
    let attacker = GitlabJob::new(
        &stack,
        601,
        json!([{"key": "CI_JOB_ID", "value": "600", "public": true}]),
        "glcbt-attacker",
    )
    .custom_env("CI_JOB_ID", "600")
    .custom_env("AIRLOCK_ID_TOKEN", &victim_token);
    let prep = attacker.stage("prepare", &[]);
    assert_eq!(prep.status.code(), Some(SYSTEM_FAILURE), "{}", text(&prep));
    assert!(String::from_utf8_lossy(&prep.stderr).contains("GitLab job 601 has no id token"));
    let run = attacker.run(
        "build_script",
        "cat /tmp/marker; echo attacker > /tmp/marker",
    );
    assert_eq!(run.status.code(), Some(SYSTEM_FAILURE), "{}", text(&run));
    assert!(!String::from_utf8_lossy(&run.stdout).contains("victim"));
    // A variable in the payload itself holding another job's token: refused, not replayed.
    let replay = GitlabJob::new(
        &stack,
        602,
        json!([{"key": "AIRLOCK_ID_TOKEN", "value": victim_token, "public": false, "masked": true}]),
        "glcbt-replay",
    );
    let prep = replay.stage("prepare", &[]);
    assert_eq!(prep.status.code(), Some(SYSTEM_FAILURE), "{}", text(&prep));
    let err = String::from_utf8_lossy(&prep.stderr);
    assert!(
        err.contains("was not issued for this job: its job_id claim is 600, this job is 602"),
        "{err}"
    );
    assert!(!err.contains(&victim_token));
    // Only the victim's job exists, untouched: its marker is its own.
    assert_eq!(live_jobs(&stack), vec![victim_id.clone()]);
    let check = victim.run("after_script", "cat /tmp/marker");
    assert_eq!(ok(&check, &stack).trim(), "victim");
    // A configured id token name is read instead of the default.
    let (custom, _) = GitlabJob::with_token(&stack, 603, "acme/web");
    let other_name = custom.stage("prepare", &["--id-token-variable", "VAULT_ID_TOKEN"]);
    assert_eq!(
        other_name.status.code(),
        Some(SYSTEM_FAILURE),
        "{}",
        text(&other_name)
    );
    assert!(String::from_utf8_lossy(&other_name.stderr).contains("no id token VAULT_ID_TOKEN"));
    ok(&victim.stage("cleanup", &[]), &stack);
}

// ---- airlock job exec ----

fn exec(stack: &Stack, job: &str, cmd: &[&str]) -> Output {
    let mut args = vec!["job", "exec", job, "--"];
    args.extend_from_slice(cmd);
    stack.agent.cli(&args)
}

#[test]
fn job_exec_keeps_the_jobs_files_between_execs_and_refuses_ended_jobs() {
    prereqs();
    let stack = stack();
    let job = stack.job(&GithubJob::production());
    let first = exec(
        &stack,
        &job.job_id,
        &[
            "/bin/sh",
            "-c",
            "echo one > /tmp/a; echo two > ~/b; echo $$; id -u",
        ],
    );
    let out1 = ok(&first, &stack);
    let second = exec(
        &stack,
        &job.job_id,
        &["/bin/sh", "-c", "cat /tmp/a ~/b; id -u; exit 7"],
    );
    // The command's own status is handed on.
    assert_eq!(second.status.code(), Some(7), "{}", text(&second));
    let out2 = String::from_utf8_lossy(&second.stdout);
    let l1: Vec<&str> = out1.lines().collect();
    let l2: Vec<&str> = out2.lines().collect();
    assert_eq!(
        l1[0], "1",
        "each exec's command is pid 1 of its own namespace"
    );
    assert_eq!(&l2[..3], &["one", "two", l1[1]], "{out2}");
    let execs = records(&stack, "job_exec", &job.job_id);
    assert_eq!(execs.len(), 2);
    assert_eq!(execs[0]["argv0"], "/bin/sh");
    assert_eq!(execs[0]["argc"], 3);
    // The script (argument 3) is in no record.
    let audit = std::fs::read_to_string(stack.agent.audit_path()).unwrap();
    assert!(!audit.contains("echo one"));

    let cgroup = PathBuf::from(sandbox_of(&stack, &job.job_id)["cgroup"].as_str().unwrap());
    assert!(stack.agent.end_job(&job.job_id).status.success());
    assert_wiped(&stack, &job.job_id, &cgroup);
    let late = exec(&stack, &job.job_id, &["true"]);
    assert_eq!(late.status.code(), Some(66), "{}", text(&late));
    assert!(
        String::from_utf8_lossy(&late.stderr).contains("no job"),
        "{}",
        text(&late)
    );
    let unknown = exec(&stack, "j-00000000000000ff", &["true"]);
    assert_eq!(unknown.status.code(), Some(66), "{}", text(&unknown));
    let malformed = exec(&stack, "j-zzzzzzzzzzzzzzzz", &["true"]);
    assert_eq!(malformed.status.code(), Some(65), "{}", text(&malformed));
    assert!(String::from_utf8_lossy(&malformed.stderr).contains("not a job id"));
}

#[test]
fn job_exec_needs_a_sandbox() {
    prereqs();
    let stack = Stack::start();
    let job = stack.job(&GithubJob::production());
    let out = exec(&stack, &job.job_id, &["true"]);
    assert_eq!(out.status.code(), Some(65), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[sandbox] is not enabled"),
        "{}",
        text(&out)
    );
    assert!(records(&stack, "job_exec", &job.job_id).is_empty());
}

/// `airlock job exec JOB -- /bin/sh -c SCRIPT`, running in the background.
fn spawn_exec(stack: &Stack, job: &str, script: &str) -> std::process::Child {
    Command::new(paths::bin("airlock"))
        .arg("--config")
        .arg(stack.agent.config_path())
        .args(["job", "exec", job, "--", "/bin/sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The processes in `cgroup`, and how many of them are `sleep`.
fn procs_and_sleeps(cgroup: &Path) -> (Vec<u32>, usize) {
    let procs: Vec<u32> = std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    let sleeps = procs
        .iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .starts_with("sleep\0")
        })
        .count();
    (procs, sleeps)
}

/// Waits until `cgroup` holds `n` sleeps; its processes then.
fn wait_for_sleeps(cgroup: &Path, n: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (procs, sleeps) = procs_and_sleeps(cgroup);
        if sleeps == n {
            return procs;
        }
        assert!(
            Instant::now() < deadline,
            "the exec's processes never showed up in {}: {procs:?}",
            cgroup.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn exec_d_processes_are_in_the_jobs_cgroup_and_die_at_the_wipe() {
    prereqs();
    let stack = stack();
    let job = stack.job(&GithubJob::production());
    let cgroup = PathBuf::from(sandbox_of(&stack, &job.job_id)["cgroup"].as_str().unwrap());
    let mut child = spawn_exec(&stack, &job.job_id, "sleep 300 & sleep 301");
    // The shim, its job's pid 1 and both sleeps are in the job's cgroup.
    let procs = wait_for_sleeps(&cgroup, 2);
    assert!(procs.len() >= 3, "{procs:?}");
    assert!(stack.agent.end_job(&job.job_id).status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "airlock job exec still runs after the wipe"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Killed with its cgroup: SIGKILL, 128 + 9.
    assert_eq!(status.code(), Some(137));
    // Gone, or a zombie waiting for whoever inherited it to reap it (killed all the same:
    // on some hosts pid 1 reaps orphans late).
    let alive = |p: u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while procs.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in procs {
        assert!(!alive(p), "process {p} survived the wipe");
    }
    assert_wiped(&stack, &job.job_id, &cgroup);
}

/// An egress-controlled job's every exec has the agent as its resolver and its allowlist in
/// force: the second stage resolves and reaches what the first did, and nothing else.
#[test]
fn every_exec_of_an_egress_job_resolves_through_the_agent_and_keeps_its_allowlist() {
    use airlock_tests::fakedns::{FakeDns, Zone};
    use airlock_tests::internet::Internet;
    prereqs();
    let web = Internet::new([203, 0, 113]);
    web.serve(8080, "web");
    let dns = FakeDns::start(Zone::default().a("allowed.test", web.addr, 60).a(
        "other.test",
        web.addr,
        60,
    ));
    let stack = Stack::sandboxed_production_tables(
        &format!("[egress]\nupstreams = [\"{}\"]\n", dns.addr),
        "[rule.egress]\nallow = [\"allowed.test:8080\"]\n",
    );
    let job = stack.job(&GithubJob::production());
    let probe = "grep -c '^nameserver 169.254.170.53$' /etc/resolv.conf; \
                 curl -sS -m 5 http://allowed.test:8080/; echo; \
                 curl -sS -m 5 http://other.test:8080/ >/dev/null 2>&1; echo other=$?";
    for stage in 1..=2 {
        let out = exec(&stack, &job.job_id, &["/bin/sh", "-c", probe]);
        let stdout = ok(&out, &stack);
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines,
            ["1", &format!("web from {}", web.host_addr), "other=6"],
            "stage {stage}: {}",
            text(&out)
        );
    }
    assert_eq!(dns.queries_for("other.test"), 0);
    let cgroup = PathBuf::from(sandbox_of(&stack, &job.job_id)["cgroup"].as_str().unwrap());
    assert!(stack.agent.end_job(&job.job_id).status.success());
    assert_wiped(&stack, &job.job_id, &cgroup);
}

/// gitlab-runner cancels a stage (a cancelled pipeline, a job timeout) with SIGTERM to the
/// `run_exec` process: the stage's processes go with it, the job and its files stay for the
/// next stage and cleanup.
#[test]
fn a_terminated_exec_takes_its_processes_with_it_and_the_job_stays() {
    prereqs();
    let stack = stack();
    let job = stack.job(&GithubJob::production());
    let cgroup = PathBuf::from(sandbox_of(&stack, &job.job_id)["cgroup"].as_str().unwrap());
    let child = spawn_exec(
        &stack,
        &job.job_id,
        "echo kept > /tmp/kept; sleep 302 & sleep 303",
    );
    wait_for_sleeps(&cgroup, 2);
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let out = child.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(10);
    while procs_and_sleeps(&cgroup).1 > 0 {
        assert!(
            Instant::now() < deadline,
            "the stage's processes outlived its cancellation: {:?}",
            procs_and_sleeps(&cgroup)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(live_jobs(&stack).contains(&job.job_id));
    let next = exec(&stack, &job.job_id, &["cat", "/tmp/kept"]);
    assert_eq!(ok(&next, &stack).trim(), "kept");
    assert!(stack.agent.end_job(&job.job_id).status.success());
    assert_wiped(&stack, &job.job_id, &cgroup);
}

/// A job that replaces a directory of its tmpfs by a symlink in one exec cannot make the
/// next exec's shim (root, with the host's tree still at `/`) write through it.
#[test]
fn a_symlink_left_by_one_exec_does_not_redirect_the_next_execs_files() {
    prereqs();
    let stack = stack();
    let job = stack.job(&GithubJob::production());
    let bait = stack.agent.dir().join("bait");
    std::fs::create_dir(&bait).unwrap();
    let plant = exec(
        &stack,
        &job.job_id,
        &[
            "/bin/sh",
            "-c",
            &format!(
                "mv /run/airlock /run/old && ln -s {} /run/airlock && ls -l /run",
                bait.display()
            ),
        ],
    );
    ok(&plant, &stack);
    let next = exec(&stack, &job.job_id, &["true"]);
    assert_eq!(next.status.code(), Some(125), "{}", text(&next));
    assert!(
        String::from_utf8_lossy(&next.stderr).contains("cannot write the job's file"),
        "{}",
        text(&next)
    );
    let written: Vec<_> = std::fs::read_dir(&bait).unwrap().flatten().collect();
    assert!(
        written.is_empty(),
        "the shim wrote through the job's symlink: {written:?}"
    );
    assert!(stack.agent.end_job(&job.job_id).status.success());
}
