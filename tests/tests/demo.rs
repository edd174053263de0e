//! The README's first command, `make demo`, runs `scripts/demo.sh`: this runs the script
//! itself (root: its third job is sandboxed) against the binaries and test clients the
//! suite already built, and checks that each of its jobs ended the way the demo says.

use airlock_tests::paths;
use airlock_tests::prereq;
use std::process::Command;

#[test]
fn the_readme_demo_runs_to_the_end_and_each_job_ends_as_it_says() {
    prereq::require_root_and("the demo", &[("nft", "nftables"), ("curl", "curl")]);
    let out = Command::new("bash")
        .arg(paths::repo_root().join("scripts/demo.sh"))
        .env("CARGO_TARGET_DIR", paths::target_dir())
        .output()
        .expect("bash runs scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ctx = format!(
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{ctx}");
    for expected in [
        // Job 1: the production job's AWS CLI call is answered with the deploy role.
        "assumed-role/web-prod-deploy/",
        // Job 2: no rule matches the feature branch; its SDK gets nothing.
        "refused:  no policy rule matches github other-org/tool",
        "the job's SDK gets no credentials at all",
        // Job 3: the same job in a sandbox; its SDK finds the credentials there, and the
        // host is out of its reach.
        "the SDK found access key",
        "is out of reach: endpoint-only network",
        // The audit trail verifies.
        "chain intact",
        "What happened",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing\n{ctx}");
    }
    assert!(!stdout.contains("reached the host!"), "{ctx}");
}
