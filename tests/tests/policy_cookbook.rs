//! Every example of `docs/policy-cookbook.md` loads: each directory under
//! `policies/cookbook/` passes `airlock policy check` with the shipped `config/airlock.toml`
//! (its issuers), and the page quotes each file verbatim (so the page cannot drift from
//! what is checked).

use airlock_tests::paths;
use std::process::Command;

#[test]
fn every_cookbook_policy_loads_and_the_page_quotes_it_verbatim() {
    let root = paths::repo_root();
    let page = std::fs::read_to_string(root.join("docs/policy-cookbook.md")).unwrap();
    let mut dirs: Vec<_> = std::fs::read_dir(root.join("policies/cookbook"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 5, "{dirs:?}");
    for dir in dirs {
        // Checked against the issuers of the configuration the packages ship.
        let out = Command::new(paths::bin("airlock"))
            .arg("--config")
            .arg(root.join("config/airlock.toml"))
            .args(["policy", "check"])
            .arg(&dir)
            .output()
            .expect("run airlock (cargo build --bins)");
        assert!(
            out.status.success(),
            "{}: {}{}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
        let text = std::fs::read_to_string(dir.join("policy.toml")).unwrap();
        assert!(
            page.contains(&format!("```toml\n{text}```")),
            "docs/policy-cookbook.md does not quote {} verbatim",
            dir.display()
        );
    }
}

/// For `pull_request`, GitHub runs the workflow of the merge commit: a pull request from a
/// branch of the repository can edit it, so its `workflow_ref` (under `refs/pull/…`) says
/// what the pull request wrote. With the cookbook's per-environment rules loaded before its
/// pull-request rule, a pull request that names the deploy workflow (or claims the
/// production environment) still gets the pull-request role only, never the deploy role.
/// The cases are `policies/cases/cookbook-pull-requests.toml`, run by `airlock policy test`
/// as the cookbook shows, and quoted by the page verbatim.
#[test]
fn a_pull_request_gets_only_the_pull_request_role_whatever_workflow_it_names() {
    let root = paths::repo_root();
    let page = std::fs::read_to_string(root.join("docs/policy-cookbook.md")).unwrap();
    assert!(
        !page.contains("a PR cannot swap in a workflow of its own"),
        "the cookbook must not claim a pull request runs the base branch's workflow"
    );
    let pr =
        std::fs::read_to_string(root.join("policies/cookbook/pull-requests/policy.toml")).unwrap();
    assert!(
        !pr.contains("workflow_ref = "),
        "pinning a workflow path trusts nothing for pull_request: {pr}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        root.join("policies/cookbook/per-environment/policy.toml"),
        dir.path().join("10-per-environment.toml"),
    )
    .unwrap();
    std::fs::write(dir.path().join("20-pull-requests.toml"), &pr).unwrap();
    let cases = root.join("policies/cases/cookbook-pull-requests.toml");
    let out = Command::new(paths::bin("airlock"))
        .arg("--config")
        .arg(root.join("config/airlock.toml"))
        .args(["policy", "test"])
        .arg(&cases)
        .arg("--dir")
        .arg(dir.path())
        .output()
        .expect("run airlock (cargo build --bins)");
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{t}");
    for case in [
        "ok    a pull request that names the deploy workflow gets only the PR role: rule web-pull-requests granting pr-readonly",
        "ok    a pull request that claims the production environment gets only the PR role: rule web-pull-requests granting pr-readonly",
        "ok    a fork's pull request, runner-attested, is refused",
    ] {
        assert!(t.contains(case), "{case:?} in:\n{t}");
    }
    assert!(
        !t.contains("web-deploy"),
        "no deploy role for a pull request:\n{t}"
    );

    // The deploy workflow under refs/pull, explained one by one: never the deploy rule.
    let claims = serde_json::json!({
        "repository": "acme/web",
        "repository_owner": "acme",
        "event_name": "pull_request",
        "ref": "refs/pull/12/merge",
        "environment": "production",
        "workflow_ref": "acme/web/.github/workflows/deploy.yml@refs/pull/12/merge",
        "job_workflow_ref": "acme/web/.github/workflows/deploy.yml@refs/pull/12/merge",
    });
    let file = dir.path().join("claims.json");
    std::fs::write(&file, claims.to_string()).unwrap();
    let out = Command::new(paths::bin("airlock"))
        .arg("--config")
        .arg(root.join("config/airlock.toml"))
        .args([
            "policy",
            "explain",
            "--json",
            "--as-verified",
            "github",
            "--expect",
        ])
        .arg("web-pull-requests")
        .arg("--claims-file")
        .arg(&file)
        .arg("--dir")
        .arg(dir.path())
        .output()
        .expect("run airlock");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stderr));
    });
    assert_eq!(out.status.code(), Some(0), "{v}");
    let roles: Vec<&str> = v["decision"]["grants"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["role_arn"].as_str())
        .collect();
    assert_eq!(
        roles,
        ["arn:aws:iam::222222222222:role/web-pr-readonly"],
        "{v}"
    );

    let quoted = std::fs::read_to_string(&cases).unwrap();
    assert!(
        page.contains(&format!("```toml\n{quoted}```")),
        "docs/policy-cookbook.md does not quote {} verbatim",
        cases.display()
    );
}
