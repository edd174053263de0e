//! The README's first command, `make demo`, runs `scripts/demo.sh`: this runs the script
//! itself (root: its third job is sandboxed) against the binaries and test clients the
//! suite already built, and checks that each of its jobs ended the way the demo says and
//! that a successful run shows no error.

use airlock_tests::paths;
use airlock_tests::prereq;
use std::process::Command;

#[test]
fn the_readme_demo_runs_to_the_end_and_each_job_ends_as_it_says() {
    prereq::require_root_and("the demo", &[("nft", "nftables"), ("curl", "curl")]);
    let out = Command::new("bash")
        .arg(paths::repo_root().join("scripts/demo.sh"))
        .env("CARGO_TARGET_DIR", paths::target_dir())
        // Piped, in a plain environment: no colour may reach a pipe.
        .env_remove("NO_COLOR")
        .env_remove("CLICOLOR_FORCE")
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

    // A successful demo shows no error: every grant of its jobs was issued (the audit
    // trail, printed in full for acme/web, has no sts_error), no line of its output or of
    // what its commands wrote to stderr is an error, and a pipe gets no colour escapes.
    assert!(stdout.contains("The audit trail"), "{ctx}");
    assert!(!stdout.contains("sts_error"), "{ctx}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stdout.lines().chain(stderr.lines()) {
        let l = line.to_ascii_lowercase();
        assert!(
            !l.contains("error") && !l.contains("http 500"),
            "an error in the demo's output: {line:?}\n{ctx}"
        );
        assert!(
            !line
                .split(|c: char| !c.is_ascii_alphanumeric())
                .any(|w| w == "None"),
            "a Python None in the demo's output: {line:?}\n{ctx}"
        );
    }
    assert!(
        !out.stdout.windows(2).any(|w| w == b"\x1b[")
            && !out.stderr.windows(2).any(|w| w == b"\x1b["),
        "colour escapes in the demo's piped output\n{ctx}"
    );
}
