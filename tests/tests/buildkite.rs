//! Buildkite agent hooks end to end (`integrations/buildkite/hooks/`), run the way the
//! Buildkite agent runs them: by a (fake) `buildkite-agent bootstrap` process, as the agent's
//! own unprivileged user (in airlockd's control group through a supplementary group), with
//! the variables the agent sets and a pipeline's `env:` on top. The fake `buildkite-agent`
//! prints a Buildkite-shaped OIDC token signed with the test issuer's keys. A real sandboxed
//! `airlockd` and moto as STS.
//!
//! Privileged (root: cgroups, namespaces, nftables; airlockd starts each step's sandbox).

use airlock_tests::oidc::{mint_with, TestKey};
use airlock_tests::paths;
use airlock_tests::stack::Stack;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BUILDKITE_ISSUER: &str = "https://agent.buildkite.com";
/// The agent session token the Buildkite agent gives every job: never for the sandbox.
const AGENT_ACCESS_TOKEN: &str = "bkaccess-4Jq9ZzTq";
/// The host's own key, in the agent's environment: never for the sandbox.
const HOST_KEY: &str = "AKIAHOSTKEY0000000001";
/// The Buildkite agent's user: unprivileged, no passwd entry needed; its primary group is
/// its own and `nogroup` (65534), which the agent's `control_group` names, is a
/// supplementary group (as `usermod -aG` makes it).
const AGENT_UID: u32 = 65531;
const CONTROL_GID: u32 = 65534;

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
name = "bk-acme-web"
[rule.match]
provider = "buildkite"
owner = "bk-acme"
repository = "bk-acme/web"
[[rule.grant]]
alias = "ci"
role_arn = "arn:aws:iam::123456789012:role/ci-readonly"
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
        &[
            ("curl", "curl"),
            ("ip", "iproute2"),
            ("nft", "nftables"),
            ("setpriv", "util-linux"),
            ("tar", "tar"),
            ("gcc", "gcc"),
        ],
    );
}

/// A sandboxed agent that trusts the Buildkite issuer (test keys, audience `airlock`: the
/// hooks' default) with the rules above, its control socket open to `nogroup`.
fn stack() -> Stack {
    let jwks = paths::oidc_fixtures().join("jwks.json");
    let issuer = format!(
        "\n[[issuer]]\nissuer = \"{BUILDKITE_ISSUER}\"\naudiences = [\"airlock\"]\nprovider = \"buildkite\"\njwks_file = \"{}\"\n",
        jwks.display()
    );
    let mut stack = Stack::sandboxed_rule_tables(&issuer, &[("20-staging.toml", RULES)]);
    stack
        .agent
        .open_to_group("nogroup")
        .expect("airlockd restarts with a control group");
    stack
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

/// The fake `buildkite-agent`: `oidc request-token` records its arguments and prints the
/// host's current token; `bootstrap HOOK...` sources each hook in a bash child the way the
/// agent's bootstrap does, staying their parent (it is the process the airlock job belongs
/// to); `bootstrap-cancel` starts the command hook in a process group of its own, kills that
/// group once the step has printed `step-started` (a cancelled job), then runs pre-exit.
const FAKE_AGENT: &str = r#"#!/bin/bash
here=$(dirname "$0")
case "$1" in
  oidc)
    printf '%s\n' "$@" >> "$here/../buildkite-agent.args"
    [ "$2" = request-token ] || { echo "fake buildkite-agent: unexpected command" >&2; exit 2; }
    cat "$here/../token.jwt"
    ;;
  bootstrap)
    shift
    code=0
    for h in "$@"; do
      bash -c '. "$0"' "$here/../hooks/$h"
      st=$?
      echo "bootstrap: hook $h exited $st"
      if [ "$h" = command ]; then code=$st; fi
      if [ "$h" = environment ] && [ $st -ne 0 ]; then exit $st; fi
    done
    exit $code
    ;;
  bootstrap-cancel)
    out=$(mktemp -p "$here/..")
    setsid bash -c '. "$0"' "$here/../hooks/command" > "$out" 2>&1 &
    hook=$!
    for _ in $(seq 600); do grep -q step-started "$out" && break; sleep 0.1; done
    cat "$out"
    kill -KILL -- "-$hook"
    wait "$hook"
    echo "bootstrap: command hook killed"
    bash -c '. "$0"' "$here/../hooks/pre-exit"
    echo "bootstrap: hook pre-exit exited $?"
    bash -c '. "$0"' "$here/../hooks/pre-exit"
    echo "bootstrap: hook pre-exit exited $?"
    ;;
  *) echo "fake buildkite-agent: $1?" >&2; exit 2 ;;
esac
"#;

/// One runner host: the hooks (pointed at the built `airlock`, this agent's socket and the
/// fake agent by absolute path, as an operator's hook files are), the fake agent, and the
/// agent's private build path with one pipeline's checkout.
struct Host {
    dir: tempfile::TempDir,
    bin: PathBuf,
    build_path: PathBuf,
}

impl Host {
    fn new(stack: &Stack) -> Host {
        // Where jobs could see it if it were not hidden: not under /tmp, /run or /home,
        // which a sandbox's own directories cover.
        let base = paths::job_visible_dir("buildkite-tests");
        let dir = tempfile::tempdir_in(&base).unwrap();
        let root = dir.path();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let hooks = root.join("hooks");
        let bin = root.join("bin");
        let build_path = root.join("builds");
        for d in [&hooks, &bin, &build_path] {
            std::fs::create_dir_all(d).unwrap();
        }
        let airlock = paths::bin("airlock");
        let fake = bin.join("buildkite-agent");
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
                    "{} --socket {} buildkite {h} --buildkite-agent {}",
                    airlock.display(),
                    stack.agent.socket_path().display(),
                    fake.display(),
                ),
            );
            std::fs::write(hooks.join(h), text).unwrap();
        }
        std::fs::write(&fake, FAKE_AGENT).unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The build path belongs to the agent's user and nobody else reads it: the hook
        // streams the checkout with the agent user's own permissions.
        chown_r(root, AGENT_UID);
        std::fs::set_permissions(&build_path, std::fs::Permissions::from_mode(0o700)).unwrap();
        Host {
            dir,
            bin,
            build_path,
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A pipeline's checkout under the build path, as the agent lays it out
    /// (`<build path>/<agent name>/<organisation>/<pipeline>`), with `files`.
    fn checkout(&self, org: &str, pipeline: &str, files: &[(&str, &str)]) -> PathBuf {
        let c = self.build_path.join("bk-host-1").join(org).join(pipeline);
        std::fs::create_dir_all(&c).unwrap();
        for (name, body) in files {
            let p = c.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, body).unwrap();
        }
        chown_r(&self.build_path, AGENT_UID);
        // Private files: only the agent's user reads them.
        Command::new("chmod")
            .args(["-R", "go-rwx"])
            .arg(&self.build_path)
            .status()
            .unwrap();
        c
    }

    /// The token `oidc request-token` prints from now on.
    fn set_token(&self, token: &str) {
        let f = self.root().join("token.jwt");
        std::fs::write(&f, token).unwrap();
        std::os::unix::fs::chown(&f, Some(AGENT_UID), Some(AGENT_UID)).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn fake_args(&self) -> String {
        std::fs::read_to_string(self.root().join("buildkite-agent.args")).unwrap_or_default()
    }

    /// The variables the Buildkite agent gives the job's hooks (plus the host's own).
    fn env(
        &self,
        org: &str,
        pipeline: &str,
        job: &str,
        command: &str,
        checkout: &Path,
    ) -> Vec<(String, String)> {
        [
            (
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ),
            ("HOME", "/var/lib/buildkite-agent".into()),
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
                "BUILDKITE_BUILD_PATH",
                self.build_path.display().to_string(),
            ),
            (
                "BUILDKITE_BUILD_CHECKOUT_PATH",
                checkout.display().to_string(),
            ),
            ("STEP_GREETING", "hello from the step env".into()),
            ("AWS_ACCESS_KEY_ID", HOST_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", "host-secret-never-in-a-job".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// `buildkite-agent <mode> ARGS…` as the agent's user, its primary group its own and
    /// `nogroup` supplementary, with the job's variables. The variables are set by `env`
    /// after the user switch: no root process of the test ever gets a pipeline's variables.
    fn bootstrap_command(&self, mode: &[&str], env: &[(String, String)], cwd: &Path) -> Command {
        let mut c = Command::new("setpriv");
        c.arg("--reuid")
            .arg(AGENT_UID.to_string())
            .arg("--regid")
            .arg(AGENT_UID.to_string())
            .arg("--groups")
            .arg(CONTROL_GID.to_string())
            .args(["--", "/usr/bin/env", "-i"])
            .args(env.iter().map(|(k, v)| format!("{k}={v}")))
            .arg(self.bin.join("buildkite-agent"))
            .args(mode)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .current_dir(cwd)
            .stdin(Stdio::null());
        c
    }

    fn bootstrap(&self, hooks: &[&str], env: &[(String, String)], cwd: &Path) -> Output {
        let mut mode = vec!["bootstrap"];
        mode.extend_from_slice(hooks);
        self.bootstrap_command(&mode, env, cwd).output().unwrap()
    }
}

fn chown_r(p: &Path, uid: u32) {
    let st = Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}")])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
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

/// The airlock job started for a Buildkite job (its `job_started` record's runner).
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
    let deadline = Instant::now() + Duration::from_secs(30);
    let wiped = loop {
        let w = records(stack, "job_wiped", job);
        if !w.is_empty() || Instant::now() > deadline {
            break w;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
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
/// of its rule, its (private) checkout and its variables but none of the host's secrets;
/// its exit status is the hook's; the job is ended and wiped; the token shows nowhere. The
/// hooks run as the agent's unprivileged user, reaching airlockd through a supplementary
/// group.
#[test]
fn pinned_org_step_runs_sandboxed_with_job_credentials() {
    prereqs();
    let stack = stack();
    let host = Host::new(&stack);
    let bk_job = "0190a1b2-1111-4000-8000-000000000001";
    let token = buildkite_token("bk-acme", "deploy", bk_job);
    host.set_token(&token);
    let checkout = host.checkout(
        "bk-acme",
        "deploy",
        &[("checked-out.txt", "from-the-checkout\n")],
    );
    let step = r#"echo "greeting=$STEP_GREETING"
echo "agent_token=${BUILDKITE_AGENT_ACCESS_TOKEN:-unset}"
echo "host_key=${AWS_ACCESS_KEY_ID:-unset}"
echo "uid=$(id -u) pid=$$"
echo "checkout=$(cat checked-out.txt) at $BUILDKITE_BUILD_CHECKOUT_PATH"
curl -sS --max-time 10 -H "Authorization: $(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")" "$AWS_CONTAINER_CREDENTIALS_FULL_URI"
echo
exit 3"#;
    let env = host.env("bk-acme", "deploy", bk_job, step, &checkout);

    let b = host.bootstrap(&["environment", "command", "pre-exit"], &env, &checkout);
    let out = String::from_utf8_lossy(&b.stdout).into_owned();
    assert!(out.contains("airlock: ready"), "{}", text(&b));
    assert_eq!(
        b.status.code(),
        Some(3),
        "the step's status is the hook's: {}",
        text(&b)
    );
    assert_eq!(
        host.fake_args(),
        "oidc\nrequest-token\n--audience\nairlock\n"
    );
    assert!(
        out.contains("greeting=hello from the step env"),
        "{}",
        text(&b)
    );
    assert!(out.contains("agent_token=unset"), "{}", text(&b));
    assert!(out.contains("host_key=unset"), "{}", text(&b));
    assert!(
        !out.contains(AGENT_ACCESS_TOKEN) && !out.contains(HOST_KEY),
        "{}",
        text(&b)
    );
    assert!(
        !out.contains("uid=0 ") && !out.contains(&format!("uid={AGENT_UID} ")),
        "the step runs as the slot user: {}",
        text(&b)
    );
    assert!(out.contains(" pid=1\n"), "pid namespace: {}", text(&b));
    assert!(
        out.contains("checkout=from-the-checkout at /home/job/work"),
        "{}",
        text(&b)
    );
    let creds: Value = out
        .lines()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no credentials JSON: {}", text(&b)));
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
    // The command hook ended the job; pre-exit found nothing left and said so.
    assert_wiped(&stack, &job);
    assert!(out.contains("no airlock job is running"), "{}", text(&b));
    assert_token_nowhere(&stack, &token, &[&b]);
}

/// A token of another organisation whose only matching rule does not pin the
/// organisation: the step fails with a message naming the rule and what to add, the
/// command never runs, no credentials are issued, and the job is wiped.
#[test]
fn other_org_matching_an_unpinned_rule_is_refused_before_the_command_runs() {
    prereqs();
    let stack = stack();
    let host = Host::new(&stack);
    let bk_job = "0190a1b2-2222-4000-8000-000000000002";
    let token = buildkite_token("evil-org", "deploy", bk_job);
    host.set_token(&token);
    let checkout = host.checkout("evil-org", "deploy", &[]);
    let env = host.env(
        "evil-org",
        "deploy",
        bk_job,
        "echo STEP-RAN; exit 0",
        &checkout,
    );

    let b = host.bootstrap(&["command", "pre-exit"], &env, &checkout);
    let out = String::from_utf8_lossy(&b.stdout).into_owned();
    let err = String::from_utf8_lossy(&b.stderr).into_owned();
    assert_eq!(b.status.code(), Some(77), "{}", text(&b));
    assert!(
        !out.contains("STEP-RAN") && !err.contains("STEP-RAN"),
        "{}",
        text(&b)
    );
    assert!(err.contains("rule \"bk-any-deploy\""), "{}", text(&b));
    assert!(err.contains("owner = \"evil-org\""), "{}", text(&b));
    assert!(err.contains("any organisation"), "{}", text(&b));

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
    assert_token_nowhere(&stack, &token, &[&b]);

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
    let end = stack.agent.end_job(v["job_id"].as_str().unwrap());
    assert!(end.status.success(), "{}", text(&end));
}

/// The reproduced attack, and its class: a pipeline commits `bin/buildkite-agent` (and a
/// `tar`) and puts its directory first on the step's `PATH`, and sets `LD_PRELOAD`,
/// `LD_LIBRARY_PATH` and `BASH_ENV` in its `env:`. None of it runs as root: the planted
/// programs never run at all (the hooks run `buildkite-agent` and `tar` by absolute path
/// with an environment of their own), and the preloaded library is loaded only by
/// processes of the agent's own user — never by airlockd, the sandbox init or anything
/// else of uid 0. The step itself still runs and gets its credentials.
#[test]
fn a_pipelines_path_and_preload_never_reach_a_root_process() {
    prereqs();
    let stack = stack();
    let host = Host::new(&stack);
    let bk_job = "0190a1b2-5555-4000-8000-000000000005";
    let token = buildkite_token("bk-acme", "deploy", bk_job);
    host.set_token(&token);
    let markers = host.root().join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    std::fs::set_permissions(&markers, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let planted = format!(
        "#!/bin/sh\necho \"planted $0 ran as uid $(id -u)\" >> {}/planted\nexit 0\n",
        markers.display()
    );
    let checkout = host.checkout(
        "bk-acme",
        "deploy",
        &[
            ("bin/buildkite-agent", planted.as_str()),
            ("bin/tar", planted.as_str()),
            ("bin/airlock-shim", planted.as_str()),
            ("checked-out.txt", "from-the-checkout\n"),
        ],
    );
    for p in ["bin/buildkite-agent", "bin/tar", "bin/airlock-shim"] {
        std::fs::set_permissions(checkout.join(p), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // A library whose constructor records the uid and program of every process loading it.
    let src = host.root().join("preload.c");
    std::fs::write(
        &src,
        format!(
            r#"#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void mark(void) {{
  char exe[256] = {{0}};
  if (readlink("/proc/self/exe", exe, sizeof exe - 1) < 0) exe[0] = '?';
  FILE *f = fopen("{}/preloaded", "a");
  if (f) {{ fprintf(f, "uid=%d euid=%d exe=%s\n", (int)getuid(), (int)geteuid(), exe); fclose(f); }}
}}
"#,
            markers.display()
        ),
    )
    .unwrap();
    let lib = host.root().join("libmark.so");
    let cc = Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .unwrap();
    assert!(cc.status.success(), "{}", text(&cc));
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bash_env = host.root().join("bash_env");
    std::fs::write(
        &bash_env,
        format!(
            "echo \"BASH_ENV sourced as uid $(id -u)\" >> {}/bash_env\n",
            markers.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&bash_env, std::fs::Permissions::from_mode(0o644)).unwrap();

    let step = "echo step-ran; cat checked-out.txt; curl -sS -o /dev/null -w 'creds %{http_code}\\n' --max-time 10 -H \"Authorization: $(cat \"$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE\")\" \"$AWS_CONTAINER_CREDENTIALS_FULL_URI\"";
    let mut env = host.env("bk-acme", "deploy", bk_job, step, &checkout);
    for (k, v) in env.iter_mut() {
        if k == "PATH" {
            *v = format!("{}:{v}", checkout.join("bin").display());
        }
    }
    env.push(("LD_PRELOAD".into(), lib.display().to_string()));
    env.push((
        "LD_LIBRARY_PATH".into(),
        checkout.join("bin").display().to_string(),
    ));
    env.push(("BASH_ENV".into(), bash_env.display().to_string()));

    let b = host.bootstrap(&["environment", "command", "pre-exit"], &env, &checkout);
    let out = String::from_utf8_lossy(&b.stdout).into_owned();
    assert_eq!(b.status.code(), Some(0), "{}", text(&b));
    assert!(
        out.contains("step-ran\nfrom-the-checkout\ncreds 200"),
        "{}",
        text(&b)
    );
    assert_eq!(
        host.fake_args(),
        "oidc\nrequest-token\n--audience\nairlock\n",
        "the real buildkite-agent (absolute path) was asked"
    );
    let planted_ran = std::fs::read_to_string(markers.join("planted")).unwrap_or_default();
    assert!(
        planted_ran.is_empty(),
        "a planted program ran: {planted_ran}"
    );
    // The library reached the agent user's own processes (the test would prove nothing
    // otherwise), and no process of uid 0.
    let preloaded = std::fs::read_to_string(markers.join("preloaded")).unwrap_or_default();
    assert!(
        preloaded.contains(&format!("uid={AGENT_UID} ")),
        "the preload was never loaded at all: {preloaded}"
    );
    for line in preloaded.lines() {
        assert!(
            !line.contains("uid=0 ") && !line.contains("euid=0 "),
            "a root process loaded the pipeline's library: {line}\n{preloaded}"
        );
    }
    let sourced = std::fs::read_to_string(markers.join("bash_env")).unwrap_or_default();
    assert!(
        !sourced.contains("uid 0"),
        "a root shell sourced the pipeline's BASH_ENV: {sourced}"
    );
    // airlockd's own environment never had any of it.
    let agent_env = std::fs::read(format!("/proc/{}/environ", stack.agent.pid().unwrap())).unwrap();
    assert!(!String::from_utf8_lossy(&agent_env).contains("LD_PRELOAD"));
    assert_wiped(&stack, &airlock_job_of(&stack, bk_job));
}

/// A step sees only its own pipeline's checkout: the agent's build path, where every
/// other pipeline's checkout is, is hidden in its sandbox; a step that points
/// `BUILDKITE_BUILD_CHECKOUT_PATH` at another pipeline's checkout is refused before it
/// runs; and a token for another Buildkite job than `BUILDKITE_JOB_ID` is refused.
#[test]
fn another_pipelines_checkout_is_neither_visible_nor_copied() {
    prereqs();
    let stack = stack();
    let host = Host::new(&stack);
    let secret = host.checkout(
        "bk-acme",
        "deploy",
        &[("deploy-secret.txt", "DEPLOY-CHECKOUT-SECRET\n")],
    );
    let web = host.checkout("bk-acme", "web", &[("web.txt", "web-checkout\n")]);
    // Readable by every user, as many hosts' build paths are: only the hiding keeps the
    // other checkout from the step.
    let st = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&host.build_path)
        .status()
        .unwrap();
    assert!(st.success());

    // Job of the web pipeline: reads its own checkout; the other one is not there.
    let job = "0190a1b2-6666-4000-8000-000000000006";
    host.set_token(&buildkite_token("bk-acme", "web", job));
    let step = format!(
        "cat web.txt; cat {}/deploy-secret.txt 2>&1 || echo OTHER-CHECKOUT-UNREADABLE; echo \"build path: $(ls -A {} 2>&1 | tr '\\n' ' ')\"",
        secret.display(),
        host.build_path.display()
    );
    let env = host.env("bk-acme", "web", job, &step, &web);
    let b = host.bootstrap(&["command"], &env, &web);
    let out = String::from_utf8_lossy(&b.stdout).into_owned();
    assert_eq!(b.status.code(), Some(0), "{}", text(&b));
    assert!(out.contains("web-checkout"), "{}", text(&b));
    assert!(!out.contains("DEPLOY-CHECKOUT-SECRET"), "{}", text(&b));
    assert!(out.contains("OTHER-CHECKOUT-UNREADABLE"), "{}", text(&b));
    assert!(
        out.contains("build path: \n") || out.contains("build path:  \n"),
        "the build path is hidden (empty): {}",
        text(&b)
    );

    // The same pipeline pointing its checkout path at the deploy pipeline's checkout.
    let job = "0190a1b2-7777-4000-8000-000000000007";
    host.set_token(&buildkite_token("bk-acme", "web", job));
    let env = host.env(
        "bk-acme",
        "web",
        job,
        "cat deploy-secret.txt; echo STEP-RAN",
        &secret,
    );
    let b = host.bootstrap(&["command"], &env, &web);
    let all = text(&b);
    assert_eq!(b.status.code(), Some(77), "{all}");
    assert!(
        !all.contains("DEPLOY-CHECKOUT-SECRET") && !all.contains("STEP-RAN"),
        "{all}"
    );
    assert!(all.contains("is not this pipeline's"), "{all}");
    assert_wiped(&stack, &airlock_job_of(&stack, job));

    // BUILDKITE_JOB_ID naming another job than the token's.
    let job = "0190a1b2-8888-4000-8000-000000000008";
    host.set_token(&buildkite_token("bk-acme", "web", job));
    let env = host.env(
        "bk-acme",
        "web",
        "0190a1b2-9999-4000-8000-000000000009",
        "echo STEP-RAN",
        &web,
    );
    let b = host.bootstrap(&["command"], &env, &web);
    let all = text(&b);
    assert_eq!(b.status.code(), Some(65), "{all}");
    assert!(!all.contains("STEP-RAN"), "{all}");
    assert!(all.contains("BUILDKITE_JOB_ID says"), "{all}");
}

/// A cancelled job (the agent kills the command hook's process group mid-step): pre-exit,
/// run by the same bootstrap, ends the still-running airlock job, which is wiped with
/// everything the step started; a second pre-exit is fine.
#[test]
fn pre_exit_ends_a_job_the_command_hook_left_running() {
    prereqs();
    let stack = stack();
    let host = Host::new(&stack);
    let bk_job = "0190a1b2-3333-4000-8000-000000000003";
    let token = buildkite_token("bk-acme", "deploy", bk_job);
    host.set_token(&token);
    let checkout = host.checkout("bk-acme", "deploy", &[]);
    let env = host.env(
        "bk-acme",
        "deploy",
        bk_job,
        "echo step-started; sleep 300",
        &checkout,
    );
    let b = host
        .bootstrap_command(&["bootstrap-cancel"], &env, &checkout)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&b.stdout).into_owned();
    assert!(out.contains("step-started"), "{}", text(&b));
    assert!(
        out.contains("bootstrap: command hook killed"),
        "{}",
        text(&b)
    );
    let job = airlock_job_of(&stack, bk_job);
    assert!(
        out.contains(&format!("job {job} ended")),
        "pre-exit ended the job: {}",
        text(&b)
    );
    assert!(
        out.contains("no airlock job is running"),
        "the second pre-exit: {}",
        text(&b)
    );
    assert_eq!(
        out.matches("hook pre-exit exited 0").count(),
        2,
        "{}",
        text(&b)
    );
    assert_wiped(&stack, &job);
    let ended = records(&stack, "job_ended", &job);
    assert!(
        ended[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ended by request")),
        "{ended:?}"
    );
    assert_token_nowhere(&stack, &token, &[&b]);
}

/// The agent ends a job whose Buildkite bootstrap is gone (killed with everything it ran,
/// so no pre-exit ran either): nothing of the job stays served.
#[test]
fn a_job_whose_bootstrap_is_killed_is_ended_by_the_agent() {
    prereqs();
    let stack = stack();
    let host = Host::new(&stack);
    let bk_job = "0190a1b2-aaaa-4000-8000-00000000000a";
    host.set_token(&buildkite_token("bk-acme", "deploy", bk_job));
    let checkout = host.checkout("bk-acme", "deploy", &[]);
    let env = host.env("bk-acme", "deploy", bk_job, "sleep 300", &checkout);
    let mut child = host
        .bootstrap_command(&["bootstrap", "command"], &env, &checkout)
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let started = stack.agent.audit_records().into_iter().find(|r| {
            r["event"] == "job_started" && r["runner"].as_str().is_some_and(|x| x.ends_with(bk_job))
        });
        if let Some(r) = started {
            break r["job"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no job started");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(500));
    let k = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    assert!(k.success());
    let _ = child.wait();
    assert_wiped(&stack, &job);
    let ended = records(&stack, "job_ended", &job);
    assert!(
        ended[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("owner process") && r.contains("exited")),
        "{ended:?}"
    );
}

/// Without a reachable agent the environment hook fails the job before anything runs,
/// saying what to check.
#[test]
fn environment_hook_fails_early_when_the_agent_is_unreachable() {
    prereqs();
    let mut stack = stack();
    let host = Host::new(&stack);
    let checkout = host.checkout("bk-acme", "deploy", &[]);
    let env = host.env(
        "bk-acme",
        "deploy",
        "0190a1b2-4444-4000-8000-000000000004",
        "true",
        &checkout,
    );
    stack.agent.stop();
    let b = host.bootstrap(&["environment"], &env, &checkout);
    assert_eq!(b.status.code(), Some(69), "{}", text(&b));
    let err = String::from_utf8_lossy(&b.stderr);
    assert!(err.contains("cannot reach airlockd"), "{}", text(&b));
    assert!(err.contains("control_group"), "{}", text(&b));
}

/// An `--audience` in the hook files that airlockd does not trust for Buildkite's issuer
/// fails the job at the environment hook, and the command hook never asks Buildkite for a
/// token: both name the configuration file and the audiences it trusts.
#[test]
fn an_audience_the_agent_does_not_trust_fails_the_job_before_a_token_is_requested() {
    prereqs();
    let stack = stack();
    let host = Host::new(&stack);
    for h in ["environment", "command"] {
        let p = host.root().join("hooks").join(h);
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(t.contains(" --buildkite-agent "), "{t}");
        let t = t.replace(
            " --buildkite-agent ",
            " --audience sts.amazonaws.com --buildkite-agent ",
        );
        std::fs::write(&p, t).unwrap();
    }
    let checkout = host.checkout("bk-acme", "deploy", &[]);
    let env = host.env(
        "bk-acme",
        "deploy",
        "0190a1b2-4444-4000-8000-000000000005",
        "echo STEP RAN",
        &checkout,
    );
    let config = stack.agent.config_path().display().to_string();
    for hooks in [&["environment"][..], &["command"][..]] {
        let b = host.bootstrap(hooks, &env, &checkout);
        let log = text(&b);
        assert_eq!(b.status.code(), Some(78), "{hooks:?}: {log}");
        assert!(log.contains("\"sts.amazonaws.com\""), "{log}");
        assert!(
            log.contains("--audience in the airlock buildkite hook"),
            "{log}"
        );
        assert!(log.contains("[\"airlock\"]"), "{log}");
        assert!(log.contains(&config), "{log}");
        assert!(!log.contains("STEP RAN"), "{log}");
    }
    assert!(
        !host.fake_args().contains("request-token"),
        "a token was requested: {}",
        host.fake_args()
    );
}
