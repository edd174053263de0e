//! GitHub Actions integration end to end: the job hooks (`integrations/github/`) and the
//! ephemeral runner supervisor (`airlock github supervise`), run the way the Actions runner
//! runs them — its `.env` file, its environment variables, its `GITHUB_ENV` file — with a
//! fake runner script standing in for `run.sh`, a real `airlockd` and moto as STS.
//!
//! Privileged (root: cgroups, namespaces, nftables; the hooks-only runner runs as `nobody`).

use airlock_tests::agent::Agent;
use airlock_tests::oidc::GithubJob;
use airlock_tests::paths;
use airlock_tests::stack::Stack;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

/// The hooks-only runners' users: one per test, since job-completed kills every process of
/// its user started during the job (one runner per user account, as the docs say). Both
/// have the group `nogroup` (65534), which the agent's control_group names.
const RUNNER_UID_A: u32 = 65534;
const RUNNER_UID_B: u32 = 65533;
const RUNNER_UID_C: u32 = 65532;
const REQUEST_TOKEN: &str = "gh-request-token-7Yq2";

fn prereqs() {
    airlock_tests::prereq::require_root_and(
        "the GitHub Actions tests",
        &[
            ("setpriv", "util-linux"),
            ("curl", "curl"),
            ("ip", "iproute2"),
            ("nft", "nftables"),
        ],
    );
}

/// A loopback stand-in for `ACTIONS_ID_TOKEN_REQUEST_URL`: answers `{"value": token}` to
/// `GET /token?api-version=2.0&audience=…` with `Authorization: bearer REQUEST_TOKEN`, 401
/// otherwise, and records each request's query.
struct TokenServer {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
}

impl TokenServer {
    fn start(token: String) -> TokenServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/token?api-version=2.0", l.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let mut auth = String::new();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("authorization:") {
                        auth = v.trim().to_string();
                    }
                }
                let target = line.split(' ').nth(1).unwrap_or("").to_string();
                seen2.lock().unwrap().push(target.clone());
                let ok = auth == format!("bearer {}", REQUEST_TOKEN.to_ascii_lowercase())
                    && target.contains("audience=airlock-test");
                let (status, body) = if ok {
                    ("200 OK", serde_json::json!({ "value": token }).to_string())
                } else {
                    ("401 Unauthorized", "{}".to_string())
                };
                let mut s = s;
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        TokenServer { url, seen }
    }
}

/// Copies of the shipped hooks (`integrations/github/*`) in `dir/hooks`, calling `airlock`
/// (the built one, at `bin`) with `--socket` when given, instead of `/usr/bin/airlock`:
/// what an operator installing elsewhere edits.
fn github_hooks_with(dir: &Path, airlock: &Path, socket: Option<&Path>) -> PathBuf {
    let hooks = dir.join("hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    for entry in std::fs::read_dir(paths::repo_root().join("integrations/github")).unwrap() {
        let entry = entry.unwrap();
        let text = std::fs::read_to_string(entry.path()).unwrap();
        assert!(
            text.contains("exec /usr/bin/airlock github"),
            "{}: the binary's path is fixed",
            entry.path().display()
        );
        let call = match socket {
            Some(s) => format!("exec {} --socket {} github", airlock.display(), s.display()),
            None => format!("exec {} github", airlock.display()),
        };
        let text = text.replace("exec /usr/bin/airlock github", &call);
        let copy = hooks.join(entry.file_name());
        std::fs::write(&copy, text).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    hooks
}

fn github_hooks(dir: &Path, socket: Option<&Path>) -> PathBuf {
    github_hooks_with(dir, &paths::bin("airlock"), socket)
}

fn chown_r(p: &Path, uid: u32) {
    let st = Command::new("chown")
        .args(["-R", &format!("{uid}:65534")])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
}

/// The fake runner's per-job process, `bin/Runner.Worker` (the name the hooks look for):
/// loads `.env` as the runner does, runs the job-started hook with `bash -e`, then each step
/// with `GITHUB_ENV`'s variables, then the job-completed hook. `run.sh` starts it.
const FAKE_RUNNER: &str = r#"#!/bin/bash
set -u
cd "$(dirname "$0")/.."
while IFS= read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  export "$line"
done < .env
mkdir -p "$(dirname "$GITHUB_ENV")" && : > "$GITHUB_ENV"
echo "runner: set up runner"
if ! bash -e "$ACTIONS_RUNNER_HOOK_JOB_STARTED"; then
  echo "runner: the job-started hook failed; the job fails"
  bash -e "$ACTIONS_RUNNER_HOOK_JOB_COMPLETED" || true
  exit 1
fi
status=0
for step in steps/*.sh; do
  echo "runner: step $step"
  ( set -a; . "$GITHUB_ENV"; set +a; bash -e "$step" ) || { status=1; echo "runner: step $step failed"; break; }
done
bash -e "$ACTIONS_RUNNER_HOOK_JOB_COMPLETED" || status=1
exit $status
"#;

struct HooksOnlyRunner {
    _dir: tempfile::TempDir,
    uid: u32,
    root: PathBuf,
    home: PathBuf,
    work: PathBuf,
    out: PathBuf,
    github_env: PathBuf,
}

impl HooksOnlyRunner {
    /// A runner directory, its user's home and workspace, all owned by `nobody`.
    fn new(agent: &Agent, uid: u32, steps: &[(&str, &str)]) -> HooksOnlyRunner {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = dir.path().join("runner");
        let home = dir.path().join("home");
        let work = dir.path().join("work/web/web");
        let out = dir.path().join("out");
        for d in [
            &root.join("steps"),
            &home,
            &work,
            &out,
            &dir.path().join("temp"),
            &dir.path().join("state"),
        ] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/Runner.Worker"), FAKE_RUNNER).unwrap();
        std::fs::write(
            root.join("run.sh"),
            "#!/bin/bash\n\"$(dirname \"$0\")/bin/Runner.Worker\"\n",
        )
        .unwrap();
        for f in ["run.sh", "bin/Runner.Worker"] {
            std::fs::set_permissions(root.join(f), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let hooks = github_hooks(dir.path(), Some(&agent.socket_path()));
        let env = format!(
            "# written by config.sh\nLANG=C.UTF-8\nACTIONS_RUNNER_HOOK_JOB_STARTED={}\nACTIONS_RUNNER_HOOK_JOB_COMPLETED={}\nAIRLOCK_OIDC_AUDIENCE=airlock-test\nAIRLOCK_GITHUB_STATE_DIR={}\n",
            hooks.join("job-started.sh").display(),
            hooks.join("job-completed.sh").display(),
            dir.path().join("state").display(),
        );
        std::fs::write(root.join(".env"), env).unwrap();
        for (name, body) in steps {
            std::fs::write(root.join("steps").join(name), body).unwrap();
        }
        chown_r(dir.path(), uid);
        let github_env = dir.path().join("temp/_runner_file_commands/set_env");
        std::fs::create_dir_all(github_env.parent().unwrap()).unwrap();
        chown_r(&dir.path().join("temp"), uid);
        HooksOnlyRunner {
            uid,
            root,
            home,
            work,
            out,
            github_env,
            _dir: dir,
        }
    }

    /// Run the fake runner as its user with the environment the runner gives a job.
    fn run(&self, who: &GithubJob, token_url: Option<&str>) -> std::process::Output {
        let mut c = Command::new("setpriv");
        c.arg("--reuid")
            .arg(self.uid.to_string())
            .args(["--regid", "65534", "--clear-groups", "--"])
            .arg(self.root.join("run.sh"))
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &self.home)
            .env("OUT", &self.out)
            .env("GITHUB_ENV", &self.github_env)
            .env("GITHUB_WORKSPACE", &self.work)
            .env(
                "RUNNER_TEMP",
                self.github_env.parent().unwrap().parent().unwrap(),
            )
            .env("RUNNER_NAME", "hooks-only-1")
            .env("RUNNER_TRACKING_ID", "github_5b3a1c9e-test")
            .env("GITHUB_REPOSITORY", &who.repository)
            .env(
                "GITHUB_REPOSITORY_OWNER",
                who.repository.split('/').next().unwrap(),
            )
            .env("GITHUB_REF", &who.git_ref)
            .env("GITHUB_REF_TYPE", "branch")
            .env("GITHUB_EVENT_NAME", &who.event_name)
            .env("GITHUB_ACTOR", &who.actor)
            .env("GITHUB_RUN_ID", who.run_id.to_string())
            .env("GITHUB_RUN_ATTEMPT", "1")
            .env(
                "GITHUB_WORKFLOW_REF",
                format!(
                    "{}/.github/workflows/{}@{}",
                    who.repository, who.workflow, who.git_ref
                ),
            );
        if let Some(u) = token_url {
            c.env("ACTIONS_ID_TOKEN_REQUEST_URL", u)
                .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", REQUEST_TOKEN);
        }
        c.output().expect("run the fake runner")
    }
}

fn text(o: &std::process::Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// The step of a job that fetches credentials, leaves credential files and processes
/// behind (one with the runner's tracking id, one that unset it and left the session).
const HOOKS_ONLY_STEP: &str = r#"
curl -sS -o "$OUT/creds.json" -w '%{http_code}' -H "Authorization: $(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")" "$AWS_CONTAINER_CREDENTIALS_FULL_URI" > "$OUT/creds.status"
env | grep -E '^(AWS_|AIRLOCK_)' | sort > "$OUT/step-env"
cp "$GITHUB_ENV" "$OUT/github_env"
cp "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE" "$OUT/endpoint-token"
mkdir -p ~/.aws ~/.docker ~/.kube ~/.ssh
printf '[default]\naws_access_key_id = AKIALEFTOVER\n' > ~/.aws/credentials
echo '{"auths":{"ghcr.io":{"auth":"bGVmdDpvdmVy"}}}' > ~/.docker/config.json
echo '//registry.npmjs.org/:_authToken=npm_leftover' > ~/.npmrc
echo 'apiVersion: v1' > ~/.kube/config
printf '[user]\n\tname = ci\n[credential]\n\thelper = store\n[http "https://github.com/"]\n\textraheader = AUTHORIZATION: basic bGVmdA==\n' > ~/.gitconfig
mkdir -p "$GITHUB_WORKSPACE/.git" && printf '[http "https://github.com/"]\n\textraheader = AUTHORIZATION: basic bGVmdA==\n' > "$GITHUB_WORKSPACE/.git/config"
sleep 1000 & echo $! > "$OUT/tracked.pid"
env -u RUNNER_TRACKING_ID setsid sleep 1001 > /dev/null 2>&1 < /dev/null & echo $! > "$OUT/untracked.pid"
"#;

#[test]
fn hooks_only_job_gets_its_rules_credentials_and_job_completed_ends_kills_and_wipes() {
    prereqs();
    let mut stack = Stack::start();
    stack
        .agent
        .open_to_group("nogroup")
        .expect("airlockd restarts with control_group");
    let who = GithubJob::production().with_run_id(9_300_001);
    let oidc = who.token();
    let tokens = TokenServer::start(oidc.clone());
    let runner = HooksOnlyRunner::new(
        &stack.agent,
        RUNNER_UID_A,
        &[("10-deploy.sh", HOOKS_ONLY_STEP)],
    );
    let out = runner.run(&who, Some(&tokens.url));
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(
            "bound with the job's OIDC token: rule web-production, roles deploy, readonly"
        ),
        "{log}"
    );

    // The hook asked GitHub for the token with the configured audience and the bearer.
    let seen = tokens.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].starts_with("/token?api-version=2.0&audience=airlock-test"),
        "{seen:?}"
    );

    // The step found the job's endpoint through GITHUB_ENV and got the production role.
    let status = std::fs::read_to_string(runner.out.join("creds.status")).unwrap();
    assert_eq!(status, "200", "{log}");
    let creds: Value =
        serde_json::from_slice(&std::fs::read(runner.out.join("creds.json")).unwrap()).unwrap();
    assert!(
        creds["RoleArn"]
            .as_str()
            .unwrap()
            .ends_with(":role/web-prod-deploy"),
        "{creds}"
    );
    assert!(creds["AccessKeyId"].as_str().is_some_and(|k| !k.is_empty()));
    let step_env = std::fs::read_to_string(runner.out.join("step-env")).unwrap();
    assert!(
        step_env.contains("AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:"),
        "{step_env}"
    );
    assert!(
        step_env.contains("AWS_SHARED_CREDENTIALS_FILE=/dev/null"),
        "{step_env}"
    );
    let job_id = step_env
        .lines()
        .find_map(|l| l.strip_prefix("AIRLOCK_JOB_ID="))
        .expect("AIRLOCK_JOB_ID in the step's environment")
        .to_string();

    // After job-completed: the job's token is refused, the leftovers are gone.
    let endpoint = step_env
        .lines()
        .find_map(|l| l.strip_prefix("AWS_CONTAINER_CREDENTIALS_FULL_URI="))
        .unwrap()
        .to_string();
    let token = std::fs::read_to_string(runner.out.join("endpoint-token")).unwrap();
    let after = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg(format!("Authorization: {token}"))
        .arg(&endpoint)
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&after.stdout).to_string();
    assert_ne!(code, "200", "the ended job's token still works");
    let listed = stack.agent.cli(&["job", "list", "--json"]);
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains(&job_id),
        "the job is still listed"
    );
    for f in [".aws", ".docker/config.json", ".npmrc", ".kube"] {
        assert!(
            !runner.home.join(f).exists(),
            "~/{f} survived job-completed"
        );
    }
    let gitconfig = std::fs::read_to_string(runner.home.join(".gitconfig")).unwrap();
    assert!(gitconfig.contains("name = ci"), "{gitconfig}");
    assert!(
        !gitconfig.contains("helper") && !gitconfig.contains("extraheader"),
        "{gitconfig}"
    );
    assert!(
        !runner.work.join(".git").exists(),
        "the workspace survived job-completed"
    );
    for f in ["tracked.pid", "untracked.pid"] {
        let pid: i32 = std::fs::read_to_string(runner.out.join(f))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!pid_alive(pid), "{f}: process {pid} outlived the job");
    }

    // The OIDC token is in no log, no audit record, not in GITHUB_ENV; the audit shows the
    // start (OIDC source) and the end.
    let github_env = std::fs::read_to_string(runner.out.join("github_env")).unwrap();
    let audit = std::fs::read_to_string(stack.agent.audit_path()).unwrap();
    for (what, hay) in [
        ("runner output", &log),
        ("GITHUB_ENV", &github_env),
        ("audit log", &audit),
        ("agent log", &stack.agent.log()),
    ] {
        assert!(!hay.contains(&oidc), "the OIDC token is in the {what}");
        assert!(
            !hay.contains(REQUEST_TOKEN),
            "the token request bearer is in the {what}"
        );
    }
    assert!(
        github_env.contains(&format!("AIRLOCK_JOB_ID={job_id}")),
        "{github_env}"
    );
    let recs = stack.agent.audit_records();
    let started = recs
        .iter()
        .find(|r| r["event"] == "job_started" && r["job"] == job_id.as_str())
        .expect("job_started audited");
    assert_eq!(started["source"], "oidc", "{started}");
    assert_eq!(started["runner"], "hooks-only-1", "{started}");
    assert!(recs
        .iter()
        .any(|r| r["event"] == "job_ended" && r["job"] == job_id.as_str()));
}

#[test]
fn hooks_only_refused_job_fails_at_job_started_with_a_readable_message() {
    prereqs();
    let mut stack = Stack::start();
    stack
        .agent
        .open_to_group("nogroup")
        .expect("airlockd restarts with control_group");
    let who = GithubJob::feature_branch();
    let tokens = TokenServer::start(who.token());
    let step = "touch \"$OUT/step-ran\"\n";
    let runner = HooksOnlyRunner::new(&stack.agent, RUNNER_UID_B, &[("10-build.sh", step)]);
    let out = runner.run(&who, Some(&tokens.url));
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("the job-started hook failed; the job fails"),
        "{log}"
    );
    assert!(
        log.contains("::error::airlock: no AWS credentials for this job: no policy rule allows repository other-org/tool ref refs/heads/feature/login event push"),
        "{log}"
    );
    assert!(log.contains("Ask your platform team"), "{log}");
    assert!(
        !runner.out.join("step-ran").exists(),
        "a step ran after a refused bind"
    );
    let github_env = std::fs::read_to_string(&runner.github_env).unwrap_or_default();
    assert!(!github_env.contains("AWS_CONTAINER"), "{github_env}");

    // Without `id-token: write` the hook attests the job's claims from the runner's
    // variables: the production rule (require_oidc = true) refuses them, so acme/web main
    // gets only the read-only rule that accepts attested identities.
    let prod = GithubJob::production().with_run_id(9_300_002);
    let out = runner.run(&prod, None);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("bound with the job's runner-attested claims (the workflow has no `permissions: id-token: write`): rule acme-ci-readonly, roles readonly"),
        "{log}"
    );
    assert!(runner.out.join("step-ran").exists(), "{log}");
    let recs = stack.agent.audit_records();
    let attested = recs
        .iter()
        .find(|r| r["event"] == "job_started" && r["source"] == "attested")
        .expect("an attested job_started in the audit");
    assert_eq!(attested["repository"], "acme/web", "{attested}");
    assert_eq!(attested["rule"], "acme-ci-readonly", "{attested}");
    assert_eq!(
        tokens.seen.lock().unwrap().len(),
        1,
        "no token request without id-token: write"
    );
}

// ---------------------------------------------------------------------------------------
// Ephemeral mode: the supervisor
// ---------------------------------------------------------------------------------------

/// The fake `run.sh` of the ephemeral test, inside the slot's sandbox. Its "JIT config" is
/// the job message as GitHub would deliver it (`repo|ref|event|oidc token`), in the
/// `.credentials` file the slot unpacked from the encoded configuration, as the real runner
/// does with its registration. It serves the job's token on the sandbox's loopback as
/// GitHub's token service would, then runs the hooks and steps as the runner does. Its
/// first step looks for the encoded configuration in every process's command line and
/// environment, tries the bind route twice (claim and bind), and leaves things behind.
const FAKE_EPHEMERAL_RUNNER: &str = r#"#!/bin/bash
set -u
cd "$(dirname "$0")"
[ $# -eq 0 ] || { echo "fake runner: arguments given: $*"; exit 2; }
[ -f .runner ] && [ -f .credentials ] || { echo "fake runner: not configured"; exit 2; }
[ "$(stat -c %a .credentials)" = 600 ] || { echo "fake runner: .credentials is not 0600"; exit 2; }
IFS='|' read -r repo ref event oidc < .credentials
while IFS= read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  export "$line"
done < .env
if [ -e "$HOME/leftover-from-a-job" ]; then echo "fake runner: LEFTOVER SEEN"; fi
printf '%s' "$oidc" > "$HOME/.oidc" && chmod 600 "$HOME/.oidc"
/usr/bin/python3 - "$HOME/.oidc" <<'PY' &
import http.server, sys
tok = open(sys.argv[1]).read()
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        ok = self.headers.get("Authorization") == "bearer gh-request-token-7Yq2" and "audience=airlock-test" in self.path
        body = ('{"value": "%s"}' % tok if ok else "{}").encode()
        # A job whose "token" is FAIL stands for GitHub's token service failing.
        code = 500 if tok == "FAIL" else (200 if ok else 401)
        self.send_response(code); self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", 8089), H).serve_forever()
PY
for i in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:8089/ && break; sleep 0.1; done
export GITHUB_REPOSITORY="$repo" GITHUB_REF="$ref" GITHUB_EVENT_NAME="$event" GITHUB_RUN_ID=9300777 RUNNER_NAME=ephemeral
export ACTIONS_ID_TOKEN_REQUEST_URL="http://127.0.0.1:8089/token?api-version=2.0" ACTIONS_ID_TOKEN_REQUEST_TOKEN=gh-request-token-7Yq2
export GITHUB_ENV="$HOME/set_env"; : > "$GITHUB_ENV"
echo "fake runner: job $AIRLOCK_JOB_ID for $repo $ref"
if ! bash -e "$ACTIONS_RUNNER_HOOK_JOB_STARTED"; then
  echo "fake runner: the job-started hook failed; the job fails"
  # An `if: always()` step of the failed job tries to bind claims of its own choosing.
  claim=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H "Authorization: $AWS_CONTAINER_AUTHORIZATION_TOKEN" http://169.254.170.2/v1/bind/claim)
  echo "always-step: claim after a failed hook $claim"
  exit 1
fi
(
  set -a; . "$GITHUB_ENV"; set +a
  mark=$(cat jit-mark)
  seen=0
  for f in /proc/[0-9]*/cmdline /proc/[0-9]*/environ; do
    [ -r "$f" ] && seen=$((seen+1))
    if tr '\0' '\n' < "$f" 2>/dev/null | grep -q "$mark"; then echo "step: JIT CONFIG SEEN in $f"; fi
  done
  echo "step: looked into $seen process files for ${#mark} characters"
  code=$(curl -sS -o "$HOME/creds.json" -w '%{http_code}' -H "Authorization: $AWS_CONTAINER_AUTHORIZATION_TOKEN" "$AWS_CONTAINER_CREDENTIALS_FULL_URI")
  echo "step: credentials $code $(grep -o 'role/[a-z-]*' "$HOME/creds.json")"
  claim=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H "Authorization: $AWS_CONTAINER_AUTHORIZATION_TOKEN" http://169.254.170.2/v1/bind/claim)
  echo "step: second claim $claim"
  rebind=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H "Authorization: $AWS_CONTAINER_AUTHORIZATION_TOKEN" \
    -d '{"claims":{"provider":"github","repository":"acme/web","ref":"refs/heads/main"}}' http://169.254.170.2/v1/bind)
  echo "step: second bind $rebind"
  touch "$HOME/leftover-from-a-job"
  setsid sleep 1000 > /dev/null 2>&1 < /dev/null &
)
bash -e "$ACTIONS_RUNNER_HOOK_JOB_COMPLETED"
echo "fake runner: done"
"#;

/// Hooks-only hooks on a host whose agent sandboxes jobs: the job's endpoint would be inside
/// a sandbox the runner's steps never enter, so job-started fails and says what to change.
#[test]
fn hooks_only_on_a_sandboxing_agent_fails_at_job_started_and_says_why() {
    prereqs();
    let mut stack = Stack::sandboxed("");
    stack
        .agent
        .open_to_group("nogroup")
        .expect("airlockd restarts with control_group");
    let who = GithubJob::production().with_run_id(9_300_003);
    let tokens = TokenServer::start(who.token());
    let step = "touch \"$OUT/step-ran\"\n";
    let runner = HooksOnlyRunner::new(&stack.agent, RUNNER_UID_C, &[("10-build.sh", step)]);
    let out = runner.run(&who, Some(&tokens.url));
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("runs every job in a sandbox ([sandbox] enabled = true)")
            && log.contains("airlock github supervise"),
        "{log}"
    );
    assert!(!runner.out.join("step-ran").exists(), "{log}");
    let github_env = std::fs::read_to_string(&runner.github_env).unwrap_or_default();
    assert!(!github_env.contains("AWS_CONTAINER"), "{github_env}");
    // The job it started is ended at once (and wiped).
    let ended = stack
        .agent
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "job_wiped")
        .count();
    assert_eq!(ended, 1, "{log}");
}

#[test]
fn ephemeral_slots_bind_inside_the_sandbox_once_and_are_wiped_and_restarted() {
    prereqs();
    // The runner's hosts: an [egress] baseline, as a real policy directory would have.
    let stack = Stack::sandboxed_rule_tables(
        "",
        &[(
            "20-staging.toml",
            "\n[egress]\nbaseline = [\"github.com:443\", \"*.actions.githubusercontent.com:443\"]\n",
        )],
    );
    // Not under /tmp: a sandbox's /tmp is its own tmpfs. The runner directory is read
    // from the host's (read-only) filesystem.
    let base = paths::job_visible_dir("e2e-github");
    let dir = tempfile::tempdir_in(&base).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let runner_dir = dir.path().join("actions-runner");
    std::fs::create_dir_all(&runner_dir).unwrap();
    std::fs::write(runner_dir.join("run.sh"), FAKE_EPHEMERAL_RUNNER).unwrap();
    std::fs::set_permissions(
        runner_dir.join("run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();

    // Three jobs for the one slot: a production deploy, a feature branch no rule allows, and
    // a job whose job-started hook cannot get its OIDC token (GitHub's service fails).
    let prod = GithubJob::production().with_run_id(9_300_010);
    let feature = GithubJob::feature_branch();
    let prod_token = prod.token();
    let feature_token = feature.token();
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    // As `generate-jitconfig` encodes it: base64 of a JSON object of the runner's files.
    let encode = |job: &str| {
        let files = serde_json::json!({
            ".credentials": b64(job),
            ".runner": b64("{\"agentName\":\"ephemeral\",\"ephemeral\":true}"),
        });
        b64(&files.to_string())
    };
    let configs = [
        encode(&format!(
            "{}|{}|{}|{}",
            prod.repository, prod.git_ref, prod.event_name, prod_token
        )),
        encode(&format!(
            "{}|{}|{}|{}",
            feature.repository, feature.git_ref, feature.event_name, feature_token
        )),
        encode(&format!(
            "{}|{}|{}|FAIL",
            prod.repository, prod.git_ref, prod.event_name
        )),
    ];
    // What every encoded configuration starts with: found in no process's argv or
    // environment inside the sandbox.
    let mark = &configs[0][..20];
    assert!(configs.iter().all(|c| c.starts_with(mark)));
    // In a file (an environment variable holding it would be found by the search itself).
    std::fs::write(runner_dir.join(".env"), "LANG=C.UTF-8\n").unwrap();
    std::fs::write(runner_dir.join("jit-mark"), mark).unwrap();
    for (i, c) in configs.iter().enumerate() {
        std::fs::write(dir.path().join(format!("jit-{i}")), c).unwrap();
    }
    let jit = dir.path().join("mint-jitconfig");
    std::fs::write(
        &jit,
        format!(
            "#!/bin/sh\nd={}\nn=$(cat $d/count 2>/dev/null || echo 0)\necho $((n+1)) > $d/count\ncat $d/jit-$n\n",
            dir.path().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&jit, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The hooks and the airlock binary run inside the slot's sandbox: copies where jobs see
    // the host's tree (the clone and its target directory may be under /tmp).
    let airlock_bin = dir.path().join("airlock");
    if std::fs::hard_link(paths::bin("airlock"), &airlock_bin).is_err() {
        std::fs::copy(paths::bin("airlock"), &airlock_bin).unwrap();
    }
    let hooks_dir = github_hooks_with(dir.path(), &airlock_bin, None);
    let cfg = dir.path().join("github-runners.toml");
    std::fs::write(
        &cfg,
        format!(
            "[github]\nrunner_dir = \"{}\"\nslots = 1\njitconfig_command = [\"{}\"]\nhooks_dir = \"{}\"\nairlock_bin = \"{}\"\naudience = \"airlock-test\"\nmax_lifetime = \"5m\"\nrestart_delay = \"1s\"\nmax_jobs_per_slot = 3\n",
            runner_dir.display(),
            jit.display(),
            hooks_dir.display(),
            airlock_bin.display(),
        ),
    )
    .unwrap();
    let out = Command::new("timeout")
        .arg("180")
        .arg(paths::bin("airlock"))
        .arg("--config")
        .arg(stack.agent.config_path())
        .args(["github", "supervise", "--github-config"])
        .arg(&cfg)
        .env("AIRLOCK_LOG", "info")
        .output()
        .unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");

    // Job 1: bound in the sandbox through its endpoint with its OIDC token; the step got
    // the production role; a second bind by a step was refused.
    assert!(
        log.contains(
            "bound with the job's OIDC token: rule web-production, roles deploy, readonly"
        ),
        "{log}"
    );
    assert!(
        log.contains("step: credentials 200 role/web-prod-deploy"),
        "{log}"
    );
    assert!(log.contains("step: second claim 409"), "{log}");
    assert!(log.contains("step: second bind 409"), "{log}");
    assert!(
        !log.contains("JIT CONFIG SEEN") && log.contains("for 20 characters"),
        "a step found the runner's JIT configuration (or did not look): {log}"
    );
    // Job 3: its hook failed before it could bind (no OIDC token); the claim it made first
    // closed the route, so the `if: always()` step's claim is refused.
    assert!(
        log.contains("cannot get this job's OIDC token from GitHub"),
        "{log}"
    );
    assert!(
        log.contains("always-step: claim after a failed hook 409"),
        "{log}"
    );
    // Job 2: a fresh sandbox (nothing of job 1 left), refused with the readable message.
    assert!(
        !log.contains("LEFTOVER SEEN"),
        "the second job saw the first job's files: {log}"
    );
    assert!(
        log.contains(
            "no policy rule allows repository other-org/tool ref refs/heads/feature/login"
        ),
        "{log}"
    );
    assert!(
        log.contains("fake runner: the job-started hook failed; the job fails"),
        "{log}"
    );

    let recs = stack.agent.audit_records();
    let jobs: Vec<String> = recs
        .iter()
        .filter(|r| r["event"] == "job_started" && r["runner"] == "github-slot-0")
        .map(|r| r["job"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(jobs.len(), 3, "three slot starts: {jobs:?}");
    for j in &jobs {
        let started = recs
            .iter()
            .find(|r| r["event"] == "job_started" && r["job"] == j.as_str())
            .unwrap();
        assert_eq!(started["sandbox"]["network"], "egress-block", "{started}");
        assert!(
            started["identity"].is_null(),
            "a slot starts unbound: {started}"
        );
        let wiped = recs
            .iter()
            .find(|r| r["event"] == "job_wiped" && r["job"] == j.as_str());
        let wiped = wiped.unwrap_or_else(|| panic!("job {j} not wiped"));
        assert_eq!(wiped["leftovers"], serde_json::json!([]), "{wiped}");
    }
    let bound: Vec<&Value> = recs.iter().filter(|r| r["event"] == "job_bound").collect();
    assert_eq!(bound.len(), 2, "{bound:?}");
    assert_eq!(bound[0]["job"], jobs[0].as_str());
    assert_eq!(bound[0]["source"], "oidc");
    assert_eq!(bound[0]["rule"], "web-production");
    assert!(!bound[1]["refused"].is_null(), "{}", bound[1]);
    let refused: Vec<&Value> = recs
        .iter()
        .filter(|r| r["event"] == "bind_refused" && r["job"] == jobs[0].as_str())
        .collect();
    assert_eq!(
        refused.len(),
        2,
        "the step's claim and bind are audited: {refused:?}"
    );
    assert!(
        refused.iter().all(|r| r["via"] == "endpoint"),
        "{refused:?}"
    );
    // Job 3 never bound, and the always-step's claim is on record.
    assert!(
        !recs
            .iter()
            .any(|r| r["event"] == "job_bound" && r["job"] == jobs[2].as_str()),
        "job 3 bound"
    );
    assert!(
        recs.iter()
            .any(|r| r["event"] == "bind_refused" && r["job"] == jobs[2].as_str()),
        "the always-step's claim is audited"
    );

    // No token of the jobs in the supervisor's output, the agent's log or the audit.
    let audit = std::fs::read_to_string(stack.agent.audit_path()).unwrap();
    for t in [&prod_token, &feature_token] {
        for (what, hay) in [
            ("supervisor output", &log),
            ("audit log", &audit),
            ("agent log", &stack.agent.log()),
        ] {
            assert!(!hay.contains(t.as_str()), "an OIDC token is in the {what}");
        }
    }
    let mut s = String::new();
    let _ =
        std::fs::File::open(dir.path().join("count")).and_then(|mut f| f.read_to_string(&mut s));
    assert_eq!(s.trim(), "3", "one JIT config per slot start");
}
