//! `airlock policy suggest` and the egress part of `airlock policy explain`, run as an
//! operator would: an audit log written through the agent's own audit writer (a real hash
//! chain) with the egress records the agent writes, a policy directory with a baseline, the
//! suggestion pasted into the rule, and the result checked by `policy check`, `policy
//! explain` and the policy loader. Needs only the built `airlock` binary.

use airlock::audit::AuditLog;
use airlock::fields;
use airlock_tests::paths;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BASELINE: &str = "# What every runner needs.\n[egress]\n\
                        baseline = [\"github.com:443\", \"*.actions.githubusercontent.com:443\"]\n";

const RULE: &str = "[[rule]]\nname = \"web-ci\"\nrequire_oidc = false\n[rule.match]\n\
                    provider = \"github\"\nrepository = \"acme/web\"\n\
                    [[rule.grant]]\nalias = \"ci\"\nrole_arn = \"arn:aws:iam::123456789012:role/ci\"\n\
                    duration = \"1h\"\n";

const CONFIG: &str = "[[issuer]]\nissuer = \"https://token.actions.githubusercontent.com\"\n\
                      audiences = [\"sts.amazonaws.com\"]\n";

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// A policy directory (`policies/`), an agent configuration trusting GitHub's issuer
    /// and an audit log of two acme/web jobs in audit mode and one job of another
    /// repository.
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("temporary directory");
        let f = Fixture { dir };
        std::fs::create_dir(f.policies()).expect("policy directory");
        std::fs::write(f.policies().join("00-baseline.toml"), BASELINE).expect("baseline");
        std::fs::write(f.rule_file(), RULE).expect("rule");
        // The agent's configuration: its issuers are what every rule must name one of.
        std::fs::write(f.config(), CONFIG).expect("config");
        let log = AuditLog::open(&f.audit()).expect("audit log");
        let started = |job: &str, repo: &str, workflow: &str| {
            log.append_blocking(
                "job_started",
                Some(job),
                fields! {
                    "repository" => repo,
                    "workflow" => format!("{repo}/.github/workflows/{workflow}@refs/heads/main"),
                    "event" => "push",
                    "environment" => Value::Null,
                },
            )
            .expect("append");
        };
        let dns = |job: &str, name: &str, answers: &[&str]| {
            log.append_blocking(
                "egress_dns",
                Some(job),
                fields! {"name" => name, "qtype" => "A", "verdict" => "audit", "answers" => answers, "ttl" => 60},
            )
            .expect("append");
        };
        let conn = |event: &str, job: &str, dst: &str, port: u16, name: Option<&str>| {
            log.append_blocking(
                event,
                Some(job),
                fields! {"dst" => dst, "port" => port, "proto" => "tcp", "name" => name},
            )
            .expect("append");
        };
        started("j-1", "acme/web", "build.yml");
        started("j-2", "acme/web", "deploy.yml");
        started("j-9", "acme/other", "build.yml");
        dns("j-1", "registry.npmjs.org", &["104.16.1.34"]);
        conn(
            "egress_connect",
            "j-1",
            "104.16.1.34",
            443,
            Some("registry.npmjs.org"),
        );
        conn(
            "egress_connect",
            "j-1",
            "140.82.112.3",
            443,
            Some("github.com"),
        );
        conn("egress_connect", "j-1", "169.254.169.254", 80, None);
        conn(
            "egress_connect",
            "j-2",
            "52.216.1.1",
            443,
            Some("Artifacts.Example.COM."),
        );
        conn("egress_connect", "j-2", "203.0.113.7", 8443, None);
        conn(
            "egress_blocked",
            "j-2",
            "104.16.1.35",
            443,
            Some("registry.npmjs.org"),
        );
        conn(
            "egress_connect",
            "j-9",
            "198.51.100.1",
            443,
            Some("other.example.com"),
        );
        f
    }

    fn policies(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    fn rule_file(&self) -> PathBuf {
        self.policies().join("10-web.toml")
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("airlock.toml")
    }

    fn audit(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    fn cli(&self, args: &[&str]) -> Output {
        let airlock = paths::bin("airlock");
        match Command::new(&airlock)
            .arg("--config")
            .arg(self.config())
            .args(args)
            .output()
        {
            Ok(o) => o,
            Err(e) => panic!(
                "cannot run {}: {e} (run `cargo build --bins`)",
                airlock.display()
            ),
        }
    }

    fn suggest(&self, selectors: &[&str]) -> Output {
        let audit = self.audit();
        let policies = self.policies();
        let mut args = vec![
            "policy",
            "suggest",
            "--audit",
            path(&audit),
            "--dir",
            path(&policies),
        ];
        args.extend_from_slice(selectors);
        self.cli(&args)
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temporary path")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_suggestion_pasted_into_the_rule_allows_what_the_jobs_did() {
    let f = Fixture::new();
    let out = f.suggest(&["--repository", "acme/web"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for line in [
        "# Suggested by `airlock policy suggest` from 2 jobs (repository = \"acme/web\"): j-1, j-2.\n",
        "#   github.com:443  (1 connection, 1 job)\n",
        "#   169.254.169.254:80  (1 connection, 1 job)\n",
        "[rule.egress]\nmode = \"block\"\nallow = [\n",
        "    \"artifacts.example.com:443\", # 1 connection, 1 job\n",
        "    \"registry.npmjs.org:443\",    # 2 connections, 2 jobs\n",
        "    \"203.0.113.7/32:8443\",       # 1 connection, 1 job; no name: the job connected by address\n",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
    assert!(!text.contains("other.example.com"), "{text}");

    // Pasted into the rule, it loads, passes `policy check`, and allows what the jobs did.
    let rule = std::fs::read_to_string(f.rule_file()).expect("rule");
    std::fs::write(f.rule_file(), format!("{rule}{text}")).expect("rule");
    let check = f.cli(&["policy", "check", path(&f.policies())]);
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    assert!(
        stdout(&check).ends_with(": 1 rule(s), valid\n"),
        "{}",
        stdout(&check)
    );
    let issuers = airlock::config::Config::load(&f.config())
        .map(|c| airlock::policy::TrustedIssuer::from_config(&c.issuers))
        .unwrap_or_else(|e| panic!("{e}"));
    let set =
        airlock::policy::load_dir_with(&f.policies(), &issuers).unwrap_or_else(|e| panic!("{e}"));
    let egress = set
        .egress_for("web-ci")
        .expect("the rule has [rule.egress]");
    assert_eq!(egress.ports_for("registry.npmjs.org"), [443]);
    assert_eq!(egress.ports_for("artifacts.example.com"), [443]);
    assert_eq!(egress.ports_for("github.com"), [443]);
    assert!(!egress.name_allowed("other.example.com"));
    assert_eq!(
        egress.cidrs(),
        [("203.0.113.7".parse().expect("address"), 32, 8443)]
    );

    // `policy explain` shows the rule's egress with the baseline marked, as text and JSON.
    let claims = f.dir.path().join("claims.json");
    std::fs::write(
        &claims,
        json!({"provider": "github", "repository": "acme/web", "repository_owner": "acme",
               "ref": "refs/heads/main", "event_name": "push"})
        .to_string(),
    )
    .expect("claims");
    let policies = f.policies();
    let explain = |json: bool| {
        let mut args = vec![
            "policy",
            "explain",
            "--dir",
            path(&policies),
            "--claims-file",
            path(&claims),
        ];
        if json {
            args.push("--json");
        }
        let out = f.cli(&args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        stdout(&out)
    };
    let text = explain(false);
    assert!(text.contains("  sandbox: network=outbound\n"), "{text}");
    assert!(
        text.contains(
            "  egress: mode block, allow:\n    artifacts.example.com:443\n    registry.npmjs.org:443\n    \
             203.0.113.7/32:8443\n    github.com:443 (baseline)\n    *.actions.githubusercontent.com:443 (baseline)\n"
        ),
        "{text}"
    );
    let ex: Value = serde_json::from_str(&explain(true)).expect("JSON");
    assert_eq!(ex["egress"]["mode"], "block");
    assert_eq!(ex["egress"]["allow"][3]["entry"], "github.com:443");
    assert_eq!(ex["egress"]["allow"][3]["baseline"], true);
    assert!(ex["egress"]["allow"][3]["origin"]
        .as_str()
        .is_some_and(|o| o.ends_with("00-baseline.toml:3:13")));
}

#[test]
fn selectors_narrow_and_combine() {
    let f = Fixture::new();
    let out = f.suggest(&["--workflow", "deploy.yml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("from 1 job (workflow = \"deploy.yml\"): j-2."),
        "{text}"
    );
    assert!(text.contains("\"artifacts.example.com:443\""), "{text}");
    // The blocked attempt of j-2 counts too.
    assert!(text.contains("\"registry.npmjs.org:443\""), "{text}");

    let out = f.suggest(&["--repository", "acme/web", "--job", "j-1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("from 1 job (repository = \"acme/web\", job = \"j-1\")"),
        "{text}"
    );
    assert!(!text.contains("artifacts.example.com"), "{text}");
}

#[test]
fn usage_and_data_errors_have_their_exit_codes() {
    let f = Fixture::new();
    let out = f.suggest(&[]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("--repository, --workflow and/or --job"));

    let out = f.suggest(&["--repository", "acme/nope"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no job in the audit log matches repository = \"acme/nope\""),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());

    let mut log = std::fs::read_to_string(f.audit()).expect("audit");
    log.push_str("not json\n");
    std::fs::write(f.audit(), log).expect("audit");
    let out = f.suggest(&["--repository", "acme/web"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("audit.jsonl: line 12: not a JSON audit record"),
        "{}",
        stderr(&out)
    );

    let out = f.cli(&[
        "policy",
        "suggest",
        "--audit",
        path(&f.dir.path().join("missing.jsonl")),
        "--dir",
        path(&f.policies()),
        "--job",
        "j-1",
    ]);
    assert_eq!(out.status.code(), Some(66), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot read the audit log"));
}
