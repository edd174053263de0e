//! The OIDC audience the integrations request lines up with the one the agent trusts:
//! the control socket's `GET /v1/issuers`; `airlockd --check`, `airlock github supervise`
//! and the hooks-only hook refusing an audience the agent does not trust, with messages that
//! say where to change it; and (root) the packaged configuration with the packaged GitHub
//! hooks giving a job credentials, while a token minted for `sts.amazonaws.com` is refused.

use airlock_tests::agent::Policies;
use airlock_tests::oidc::{mint, GithubJob, TestKey, GITHUB_ISSUER, TEST_AUDIENCE};
use airlock_tests::packaged;
use airlock_tests::paths;
use airlock_tests::stack::Stack;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `airlockd --check --config <dir>/airlock.toml`, with the packaged configuration (its
/// `audiences` line replaced by `audiences` when given) and `runners` as
/// `github-runners.toml` beside it when given.
fn check_packaged(audiences: Option<&str>, runners: Option<&str>) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    for e in std::fs::read_dir(paths::repo_root().join("policies")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.path().join("policies").join(p.file_name().unwrap())).unwrap();
        }
    }
    let mut t = packaged::sandboxed_template("al-check");
    if let Some(a) = audiences {
        let old = "audiences = [\"airlock\"]";
        assert!(t.contains(old), "the packaged issuer trusts \"airlock\"");
        t = t.replace(old, &format!("audiences = {a}"));
    }
    let root = dir.path().to_string_lossy().to_string();
    let cfg = t
        .replace("{{ROOT}}", &root)
        .replace("{{ADMIN}}", "127.0.0.1:1")
        .replace("{{STS}}", "http://127.0.0.1:1");
    std::fs::write(dir.path().join("airlock.toml"), cfg).unwrap();
    if let Some(r) = runners {
        std::fs::write(dir.path().join("github-runners.toml"), r).unwrap();
    }
    let out = Command::new(paths::bin("airlockd"))
        .arg("--check")
        .arg("--config")
        .arg(dir.path().join("airlock.toml"))
        .output()
        .expect("run airlockd (cargo build --bins first)");
    (out, dir)
}

#[test]
fn check_passes_the_packaged_configuration_without_warnings() {
    let (out, _dir) = check_packaged(None, None);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(!log.contains("warning"), "{log}");
}

#[test]
fn check_warns_when_an_issuer_trusts_the_aws_audience() {
    let (out, _dir) = check_packaged(Some("[\"airlock\", \"sts.amazonaws.com\"]"), None);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("warning:"), "{log}");
    assert!(log.contains("\"sts.amazonaws.com\""), "{log}");
    assert!(log.contains("docs/identity.md"), "{log}");
}

#[test]
fn check_refuses_a_supervisor_audience_the_github_issuer_does_not_trust() {
    // The configuration shipped before: AWS's audience only, while the supervisor's file
    // asks for airlock's.
    let runners = "[github]\nrunner_dir = \"/opt/actions-runner\"\njitconfig_command = [\"/usr/local/bin/mint\"]\naudience = \"airlock\"\n";
    let (out, dir) = check_packaged(Some("[\"sts.amazonaws.com\"]"), Some(runners));
    let log = text(&out);
    assert_eq!(out.status.code(), Some(78), "{log}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let runners_path = dir.path().join("github-runners.toml");
    assert!(
        stderr.contains(&format!("`audience` in {}", runners_path.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains(&dir.path().join("airlock.toml").display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("[\"sts.amazonaws.com\"]"), "{stderr}");
    assert!(stderr.contains("\"airlock\""), "{stderr}");

    // The same file with an audience the issuer trusts passes.
    let ok = runners.replace("audience = \"airlock\"", "audience = \"sts.amazonaws.com\"");
    let (out, _dir) = check_packaged(Some("[\"sts.amazonaws.com\"]"), Some(&ok));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn check_refuses_github_issuers_with_no_audience_in_common() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("p")).unwrap();
    let jwks = paths::oidc_fixtures().join("jwks.json");
    let cfg = format!(
        "[policy]\ndir = \"p\"\n[sandbox]\nenabled = false\n\
         [[issuer]]\nissuer = \"{GITHUB_ISSUER}\"\naudiences = [\"a\"]\nprovider = \"github\"\njwks_file = \"{j}\"\n\
         [[issuer]]\nissuer = \"https://ghes.example.com/_services/token\"\naudiences = [\"b\"]\nprovider = \"github\"\njwks_file = \"{j}\"\n",
        j = jwks.display()
    );
    std::fs::write(dir.path().join("airlock.toml"), cfg).unwrap();
    let out = Command::new(paths::bin("airlockd"))
        .args(["--check", "--config"])
        .arg(dir.path().join("airlock.toml"))
        .output()
        .unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(78), "{log}");
    assert!(log.contains("share no audience"), "{log}");
    assert!(log.contains("ghes.example.com"), "{log}");
}

#[test]
fn the_issuers_route_answers_each_issuer_with_its_audiences_and_nothing_more() {
    let jwks = paths::oidc_fixtures().join("jwks.json");
    let stack = Stack::start_with(|mut o| {
        o.extra_config = format!(
            "[[issuer]]\nissuer = \"https://agent.buildkite.com\"\naudiences = [\"airlock\", \"bk-extra\"]\nprovider = \"buildkite\"\njwks_file = \"{}\"\n",
            jwks.display()
        );
        o
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = airlock::control::Client::new(stack.agent.socket_path());
    let answer = rt.block_on(client.issuers()).expect("GET /v1/issuers");
    assert_eq!(answer.config.as_path(), stack.agent.config_path());
    let got: Vec<(String, &str, Vec<String>)> = answer
        .issuers
        .iter()
        .map(|i| (i.issuer.clone(), i.provider.as_str(), i.audiences.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                GITHUB_ISSUER.to_string(),
                "github",
                vec![TEST_AUDIENCE.to_string()]
            ),
            (
                "https://agent.buildkite.com".to_string(),
                "buildkite",
                vec!["airlock".to_string(), "bk-extra".to_string()]
            ),
        ]
    );
    // The raw answer holds those fields only (no key material, no key file paths).
    let raw = Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(stack.agent.socket_path())
        .arg("http://airlockd/v1/issuers")
        .output();
    if let Ok(raw) = raw {
        let body = String::from_utf8_lossy(&raw.stdout);
        assert!(body.contains("\"audiences\""), "{body}");
        assert!(!body.contains("jwks"), "{body}");
    }
}

/// A runner directory with a `run.sh` (never run here) and the supervisor file naming it.
fn supervisor_file(dir: &Path, audience: Option<&str>) -> std::path::PathBuf {
    let runner = dir.join("runner");
    std::fs::create_dir_all(&runner).unwrap();
    std::fs::write(runner.join("run.sh"), "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(
        runner.join("run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let file = dir.join("github-runners.toml");
    let mut t = format!(
        "[github]\nrunner_dir = \"{}\"\njitconfig_command = [\"/bin/false\"]\nmax_jobs_per_slot = 1\nrestart_delay = \"1s\"\n",
        runner.display()
    );
    if let Some(a) = audience {
        t.push_str(&format!("audience = \"{a}\"\n"));
    }
    std::fs::write(&file, t).unwrap();
    file
}

#[test]
fn supervise_refuses_to_start_with_an_audience_the_agent_does_not_trust() {
    let stack = Stack::start();
    let dir = tempfile::tempdir().unwrap();
    // What an operator who kept the old default would have: "airlock", on an agent that
    // trusts only the test audience.
    let file = supervisor_file(dir.path(), Some("airlock"));
    let out = Command::new("timeout")
        .arg("60")
        .arg(paths::bin("airlock"))
        .arg("--config")
        .arg(stack.agent.config_path())
        .args(["github", "supervise", "--github-config"])
        .arg(&file)
        .output()
        .unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(78), "{log}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not starting"), "{stderr}");
    assert!(
        stderr.contains(&format!("`audience` in {}", file.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains(&stack.agent.config_path().display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("[\"airlock-test\"]"), "{stderr}");
    // No slot was started.
    assert!(
        !stack
            .agent
            .audit_records()
            .iter()
            .any(|r| r["event"] == "job_started"),
        "a slot started"
    );
}

#[test]
fn hooks_only_hook_refuses_an_untrusted_audience_before_asking_github() {
    let stack = Stack::start();
    // A token service that counts connections: the hook must not reach it.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let url = format!("http://{}/token?api-version=2.0", l.local_addr().unwrap());
    let out = Command::new(paths::bin("airlock"))
        .arg("--socket")
        .arg(stack.agent.socket_path())
        .args(["github", "job-started"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("GITHUB_REPOSITORY", "acme/web")
        .env("GITHUB_REF", "refs/heads/main")
        .env("ACTIONS_ID_TOKEN_REQUEST_URL", &url)
        .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "gh-request-token-x")
        .env("AIRLOCK_OIDC_AUDIENCE", "sts.amazonaws.com")
        .output()
        .unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(78), "{log}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("::error::"), "{log}");
    assert!(stdout.contains("\"sts.amazonaws.com\""), "{log}");
    assert!(stdout.contains("AIRLOCK_OIDC_AUDIENCE"), "{log}");
    assert!(stdout.contains("[\"airlock-test\"]"), "{log}");
    assert!(
        stdout.contains(&stack.agent.config_path().display().to_string()),
        "{log}"
    );
    assert!(l.accept().is_err(), "the hook asked GitHub for a token");
    assert!(!log.contains("gh-request-token-x"), "{log}");
}

// ---------------------------------------------------------------------------------------
// Root: the packaged configuration with the packaged hooks
// ---------------------------------------------------------------------------------------

/// The fake runner's `run.sh` in the slot's sandbox: serves, as GitHub's token service
/// does, a token for the audience the hook asks for (`.credentials` holds `audience token`
/// lines, as minted by the test), records which audience was asked for, then runs the
/// job-started hook and a step that fetches the job's credentials.
const FAKE_RUNNER: &str = r#"#!/bin/bash
set -u
cd "$(dirname "$0")"
while IFS= read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  export "$line"
done < .env
cp .credentials "$HOME/.tokens" && chmod 600 "$HOME/.tokens"
/usr/bin/python3 - "$HOME/.tokens" <<'PY' &
import http.server, sys, urllib.parse
toks = dict(l.split(" ", 1) for l in open(sys.argv[1]).read().splitlines() if l)
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        aud = q.get("audience", [""])[0]
        ok = self.headers.get("Authorization") == "bearer gh-request-token-7Yq2" and aud in toks
        print("token service: audience=%s" % aud, flush=True)
        body = ('{"value": "%s"}' % toks[aud] if ok else "{}").encode()
        self.send_response(200 if ok else 401); self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", 8089), H).serve_forever()
PY
for i in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:8089/ && break; sleep 0.1; done
export GITHUB_REPOSITORY=acme/web GITHUB_REF=refs/heads/main GITHUB_EVENT_NAME=push GITHUB_RUN_ID=9300888 RUNNER_NAME=packaged
export ACTIONS_ID_TOKEN_REQUEST_URL="http://127.0.0.1:8089/token?api-version=2.0" ACTIONS_ID_TOKEN_REQUEST_TOKEN=gh-request-token-7Yq2
export GITHUB_ENV="$HOME/set_env"; : > "$GITHUB_ENV"
if ! bash -e "$ACTIONS_RUNNER_HOOK_JOB_STARTED"; then
  echo "fake runner: the job-started hook failed; the job fails"
  exit 1
fi
(
  set -a; . "$GITHUB_ENV"; set +a
  code=$(curl -sS -o "$HOME/creds.json" -w '%{http_code}' -H "Authorization: $AWS_CONTAINER_AUTHORIZATION_TOKEN" "$AWS_CONTAINER_CREDENTIALS_FULL_URI")
  echo "step: credentials $code $(grep -o 'role/[a-z-]*' "$HOME/creds.json")"
)
bash -e "$ACTIONS_RUNNER_HOOK_JOB_COMPLETED"
echo "fake runner: done"
"#;

#[test]
fn packaged_configuration_with_packaged_hooks_gives_a_job_credentials_and_refuses_aws_tokens() {
    airlock_tests::prereq::require_root_and(
        "the packaged-configuration test",
        &[
            ("curl", "curl"),
            ("ip", "iproute2"),
            ("nft", "nftables"),
            ("python3", "python3"),
        ],
    );
    // The repository's policies, with the runner's hosts as an [egress] baseline (a slot's
    // default network).
    let mut files = Vec::new();
    for e in std::fs::read_dir(paths::repo_root().join("policies")).unwrap() {
        let p = e.unwrap().path();
        if !p.is_file() {
            continue;
        }
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let mut t = std::fs::read_to_string(&p).unwrap();
        if name == "20-staging.toml" {
            t.push_str("\n[egress]\nbaseline = [\"github.com:443\"]\n");
        }
        files.push((name, t));
    }
    let cgroup = format!("al-e2e-packaged-{}", std::process::id());
    let stack = Stack::start_with(|mut o| {
        o.config_template = Some(packaged::sandboxed_template(&cgroup));
        o.policies = Policies::Files(files);
        o
    });

    let who = GithubJob::production().with_run_id(9_300_888);
    let with_aud = |aud: &str| {
        let mut c = who.claims();
        c["aud"] = serde_json::json!(aud);
        mint(TestKey::Rsa, &c)
    };
    let airlock_token = with_aud("airlock");
    let aws_token = with_aud("sts.amazonaws.com");

    // A token minted for AWS's own federation: refused by the stock configuration.
    let refused = stack.agent.start_job(&aws_token);
    let msg = format!("{:?}", refused.as_ref().map(|j| j.job_id.clone()));
    assert!(
        refused.is_err(),
        "the stock config accepted an AWS token: {msg}"
    );
    let msg = refused.err().unwrap().to_string();
    assert!(msg.contains("sts.amazonaws.com"), "{msg}");
    assert!(msg.contains("[\"airlock\"]"), "{msg}");
    assert!(!msg.contains(&aws_token), "the token is echoed: {msg}");

    // The packaged hooks, in an ephemeral slot run by the supervisor with no `audience`.
    let base = paths::job_visible_dir("e2e-packaged");
    let dir = tempfile::tempdir_in(&base).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let runner_dir = dir.path().join("actions-runner");
    std::fs::create_dir_all(&runner_dir).unwrap();
    std::fs::write(runner_dir.join("run.sh"), FAKE_RUNNER).unwrap();
    std::fs::set_permissions(
        runner_dir.join("run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(runner_dir.join(".env"), "LANG=C.UTF-8\n").unwrap();
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    // Tokens for both audiences: which one the hook gets is the one it asks for.
    let creds = format!("airlock {airlock_token}\nsts.amazonaws.com {aws_token}\n");
    let jit = b64(&serde_json::json!({
        ".credentials": b64(&creds),
        ".runner": b64("{\"agentName\":\"packaged\",\"ephemeral\":true}"),
    })
    .to_string());
    std::fs::write(dir.path().join("jit"), &jit).unwrap();
    let mint_cmd = dir.path().join("mint-jitconfig");
    std::fs::write(
        &mint_cmd,
        format!("#!/bin/sh\ncat {}\n", dir.path().join("jit").display()),
    )
    .unwrap();
    std::fs::set_permissions(&mint_cmd, std::fs::Permissions::from_mode(0o755)).unwrap();
    let airlock_bin = dir.path().join("airlock");
    if std::fs::hard_link(paths::bin("airlock"), &airlock_bin).is_err() {
        std::fs::copy(paths::bin("airlock"), &airlock_bin).unwrap();
    }
    // The packaged hooks, with only the binary's fixed path pointed at the built one.
    let hooks = dir.path().join("hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    for e in std::fs::read_dir(paths::repo_root().join("integrations/github")).unwrap() {
        let e = e.unwrap();
        let t = std::fs::read_to_string(e.path()).unwrap();
        assert!(
            t.contains("exec /usr/bin/airlock github"),
            "{}",
            e.path().display()
        );
        let t = t.replace(
            "exec /usr/bin/airlock github",
            &format!("exec {} github", airlock_bin.display()),
        );
        let copy = hooks.join(e.file_name());
        std::fs::write(&copy, t).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let cfg = dir.path().join("github-runners.toml");
    std::fs::write(
        &cfg,
        format!(
            "[github]\nrunner_dir = \"{}\"\nslots = 1\njitconfig_command = [\"{}\"]\nhooks_dir = \"{}\"\nairlock_bin = \"{}\"\nmax_lifetime = \"5m\"\nmax_jobs_per_slot = 1\n",
            runner_dir.display(),
            mint_cmd.display(),
            hooks.display(),
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
    assert!(log.contains("token service: audience=airlock\n"), "{log}");
    assert!(!log.contains("audience=sts.amazonaws.com"), "{log}");
    assert!(
        log.contains("bound with the job's OIDC token: rule web-production"),
        "{log}"
    );
    assert!(
        log.contains("step: credentials 200 role/web-prod-deploy"),
        "{log}"
    );
    assert!(!log.contains("WrongAudience"), "{log}");
    let agent_log = stack.agent.log();
    assert!(!agent_log.contains("WrongAudience"), "{agent_log}");
    for t in [&airlock_token, &aws_token] {
        assert!(
            !log.contains(t.as_str()),
            "a token is in the supervisor's output"
        );
        assert!(
            !agent_log.contains(t.as_str()),
            "a token is in the agent's log"
        );
    }
    let bound = stack
        .agent
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == "job_bound")
        .expect("job_bound audited");
    assert_eq!(bound["source"], "oidc", "{bound}");
    assert_eq!(bound["rule"], "web-production", "{bound}");
}
