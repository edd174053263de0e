//! Target `policy`: the policy loader (`policy::load_str`), then deciding with what it
//! loaded.
//!
//! Input: a policy file's text (invalid UTF-8 replaced). It is loaded as `fuzz.toml` in a
//! scratch directory that also holds `web-prod-deploy.json`, for `session_policy_file`.
//!
//! Properties, after every input:
//! - a refusal is `Invalid` and names this file, a line within the text (1 to one past its
//!   last newline) and a column ≥ 1;
//! - a loaded set keeps every load-time check: rule names unique and non-empty; per rule at
//!   most one default grant, first; aliases unique; role ARNs are IAM role ARNs; durations
//!   within STS's 900–43200 s; session policies ≤ 2048 characters of JSON; ≤ 10 policy ARNs
//!   and ≤ 50 session tags; every warning names the file;
//! - deciding for a few identities never panics, a refusal carries no grants, a grant is
//!   the deciding rule's own grants with its default first, and `explain` decides the same.

use crate::Seed;
use airlock::identity::{normalise, IdentitySource, JobIdentity, Provider};
use airlock::policy::{load_str, PolicyError, PolicySet};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::OnceLock;

struct Harness {
    path: PathBuf,
    identities: Vec<JobIdentity>,
    times: Vec<time::OffsetDateTime>,
    _dir: tempfile::TempDir,
}

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn identity(
    provider: Provider,
    issuer: &str,
    source: IdentitySource,
    claims: Value,
) -> JobIdentity {
    let Value::Object(claims) = claims else {
        unreachable!("claims are an object")
    };
    normalise(provider, issuer, source, claims)
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let dir = crate::scratch_dir();
        std::fs::copy(
            repo("policies/web-prod-deploy.json"),
            dir.path().join("web-prod-deploy.json"),
        )
        .unwrap();
        let gh = "https://token.actions.githubusercontent.com";
        let identities = vec![
            identity(
                Provider::Github,
                gh,
                IdentitySource::Oidc,
                json!({
                    "repository": "acme/web", "repository_owner": "acme",
                    "repository_id": "700001", "repository_owner_id": "500001",
                    "ref": "refs/heads/main", "ref_type": "branch",
                    "environment": "production", "event_name": "push",
                    "workflow_ref": "acme/web/.github/workflows/deploy.yml@refs/heads/main",
                    "actor": "octocat", "run_id": "7", "sub": "repo:acme/web:environment:production",
                }),
            ),
            identity(
                Provider::Github,
                gh,
                IdentitySource::Attested,
                json!({
                    "repository": "acme/web", "repository_owner": "acme",
                    "ref": "refs/heads/feature", "event_name": "pull_request",
                }),
            ),
            identity(
                Provider::Gitlab,
                "https://gitlab.com",
                IdentitySource::Oidc,
                json!({
                    "project_path": "acme/web", "namespace_path": "acme",
                    "project_id": "5", "namespace_id": "6", "ref": "main",
                    "ref_type": "branch", "environment": "staging",
                    "pipeline_source": "push",
                }),
            ),
            identity(
                Provider::Buildkite,
                "https://agent.buildkite.com",
                IdentitySource::Oidc,
                json!({
                    "organization_slug": "acme", "pipeline_slug": "web",
                    "build_branch": "main", "build_number": 3,
                }),
            ),
        ];
        let times = vec![
            // A Tuesday at noon and a Sunday at night, for the windows.
            time::macros::datetime!(2026-01-06 12:00 UTC),
            time::macros::datetime!(2026-01-11 23:30 UTC),
        ];
        Harness {
            path: dir.path().join("fuzz.toml"),
            identities,
            times,
            _dir: dir,
        }
    })
}

pub fn run(data: &[u8]) {
    let _ = loaded(data);
}

/// The set loaded from `data`, after the checks; `None` when it was refused.
fn loaded(data: &[u8]) -> Option<PolicySet> {
    let h = harness();
    let text = String::from_utf8_lossy(data);
    match load_str(&h.path, &text) {
        Ok(set) => {
            check_loaded(h, &set);
            Some(set)
        }
        Err(e) => {
            // Every error of the file, each once, in file order, each at a place in it.
            let errors = e.errors();
            assert!(!errors.is_empty(), "an error that stands for none: {e}");
            let lines = text.matches('\n').count() + 1;
            let mut places = Vec::new();
            for one in &errors {
                let PolicyError::Invalid { origin, message } = one else {
                    panic!("load_str failed without a place in the file: {one}");
                };
                assert_eq!(origin.file, h.path, "an error names the file");
                assert!(
                    (1..=lines).contains(&origin.line),
                    "line {} outside the text's {lines} lines: {message}",
                    origin.line
                );
                assert!(origin.column >= 1, "column 0: {message}");
                assert!(!message.is_empty(), "an empty message");
                places.push((origin.line, origin.column, message.clone()));
            }
            let mut sorted = places.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(places.len(), sorted.len(), "an error reported twice: {e}");
            None
        }
    }
}

/// Every seed loads; the production policy grants the production identity its rule at
/// noon on a Tuesday, and a broken copy is refused at the right line.
pub fn selftest() {
    let h = harness();
    let seeds = seeds();
    for (name, data) in &seeds {
        let set = loaded(data).unwrap_or_else(|| {
            let e = load_str(&h.path, &String::from_utf8_lossy(data)).err();
            panic!("seed {name} does not load: {e:?}")
        });
        assert!(!set.rules().is_empty(), "seed {name} has no rules");
    }
    let set = loaded(&crate::seed(&seeds, "production")).unwrap();
    let d = set.decide(&h.identities[0], h.times[0]);
    assert_eq!(d.rule.as_deref(), Some("web-production"), "{d:?}");
    assert!(!d.is_refused(), "{d:?}");
    let broken = b"[[rule]]\nname = \"r\"\nbroken = \n";
    assert!(loaded(broken).is_none(), "a broken policy loaded");
}

fn is_role_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "iam"
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && parts[5].starts_with("role/")
        && parts[5].len() > "role/".len()
}

fn check_loaded(h: &Harness, set: &PolicySet) {
    let file = h.path.display().to_string();
    for w in set.warnings() {
        assert!(w.starts_with(&file), "a warning without its place: {w}");
    }
    let mut names = std::collections::HashSet::new();
    for rule in set.rules() {
        assert!(!rule.name.is_empty(), "a rule without a name");
        assert!(
            names.insert(rule.name.as_str()),
            "rule {:?} twice",
            rule.name
        );
        assert!(
            rule.grants.iter().filter(|g| g.default).count() <= 1,
            "rule {:?} has two default grants",
            rule.name
        );
        if let Some(first) = rule.grants.first() {
            assert!(
                first.default,
                "rule {:?}: the default grant is not first",
                rule.name
            );
        }
        let mut aliases = std::collections::HashSet::new();
        for g in &rule.grants {
            assert!(
                aliases.insert(g.alias.as_str()),
                "alias {:?} twice",
                g.alias
            );
            assert!(is_role_arn(&g.role_arn), "not a role ARN: {:?}", g.role_arn);
            assert!(
                (900..=43_200).contains(&g.duration_secs),
                "duration {} outside STS's limits",
                g.duration_secs
            );
            if let Some(p) = &g.session_policy {
                assert!(p.chars().count() <= 2048, "session policy too long");
                let v: Value = serde_json::from_str(p).expect("a session policy is JSON");
                assert!(v.is_object(), "a session policy is an object");
            }
            assert!(g.policy_arns.len() <= 10, "more than 10 policy ARNs");
            assert!(g.session_tags.len() <= 50, "more than 50 session tags");
        }
        let _ = set.egress_for(&rule.name);
    }
    for id in &h.identities {
        for &now in &h.times {
            let d = set.decide(id, now);
            if d.is_refused() {
                assert!(d.grants.is_empty(), "a refusal with grants");
            } else if let Some(name) = &d.rule {
                let rule = set.rule(name).expect("the deciding rule exists");
                assert_eq!(d.grants, rule.grants, "grants are the deciding rule's");
                assert!(!d.grants.is_empty(), "a grant without grants");
                assert!(d.grants[0].default, "the default grant comes first");
            } else {
                assert!(d.grants.is_empty(), "grants without a rule");
            }
            assert_eq!(set.explain(id, now).decision, d, "explain decides the same");
        }
    }
}

pub fn seeds() -> Vec<Seed> {
    let mut out = Vec::new();
    for (name, path) in [
        ("production", "policies/10-production.toml"),
        ("staging", "policies/20-staging.toml"),
        ("ci-readonly", "policies/30-ci-readonly.toml"),
        (
            "cookbook-deploy-window",
            "policies/cookbook/deploy-window/policy.toml",
        ),
        (
            "cookbook-egress-audit",
            "policies/cookbook/egress-audit/policy.toml",
        ),
        (
            "cookbook-egress-block",
            "policies/cookbook/egress-block/policy.toml",
        ),
        (
            "cookbook-per-environment",
            "policies/cookbook/per-environment/policy.toml",
        ),
        (
            "cookbook-pull-requests",
            "policies/cookbook/pull-requests/policy.toml",
        ),
    ] {
        let text = std::fs::read(repo(path)).unwrap();
        // Comments only cost the fuzzer time.
        let lean: Vec<u8> = String::from_utf8(text)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .flat_map(|l| format!("{l}\n").into_bytes())
            .collect();
        out.push((name, lean));
    }
    out.push((
        "sandbox-and-inline-policy",
        br#"[egress]
baseline = ["github.com:443"]
[[rule]]
name = "r"
require_oidc = false
outside_window = "refuse"
[rule.match]
provider = "github"
repository = ["acme/*", "other/x"]
ref = "refs/heads/main"
[[rule.window]]
days = ["sat", "sun"]
start = "20:00"
end = "23:59"
utc_offset = "-05:30"
[[rule.grant]]
alias = "a"
default = true
role_arn = "arn:aws:iam::123456789012:role/path/r"
duration = 900
session_policy = '{"Version":"2012-10-17","Statement":[]}'
policy_arns = ["arn:aws:iam::aws:policy/ReadOnlyAccess"]
session_tags = { Repo = "repository", Claim = "claims.sub" }
[rule.sandbox]
memory = "512M"
pids = 256
cpus = 1.5
tmpfs = "64M"
[rule.egress]
mode = "block"
allow = ["*.example.com:443", "10.0.0.0/8:22", "[2001:db8::1/128]:443"]
"#
        .to_vec(),
    ));
    out
}
