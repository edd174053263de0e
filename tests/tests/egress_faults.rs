//! Egress control under faults, end to end (root): the real `airlockd` with a fault
//! injected where the agent depends on the host, and what a pipeline sees.
//!
//! - `nft` fails when an egress-controlled job's table is made: the agent runs in a private
//!   mount namespace of its own where `/usr/sbin/nft` is a script that fails
//!   (`AgentOptions::nft_stub`). The job is refused with an error that names the cause, a
//!   `job_refused` record says why, nothing of it is left, and it never runs with less than
//!   its rules; a job that needs no `nft` still starts.
//!
//! The other faults (netlink admission, the upstream resolver down or answering garbage)
//! are tested inside the agent: `agent/tests/egress_admission.rs` and
//! `agent/tests/egress_dns.rs`.

use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;

const FAILING_NFT: &str =
    "#!/bin/sh\necho 'Error: injected failure (airlock test): nft cannot apply anything' >&2\nexit 1\n";

#[test]
fn an_egress_job_is_refused_when_nft_fails_and_nothing_is_left() {
    airlock_tests::prereq::require_root_and(
        "the egress fault tests",
        &[
            ("nft", "nftables"),
            ("unshare", "util-linux"),
            ("ip", "iproute2"),
        ],
    );
    let stack = Stack::sandboxed_rule_tables_with(
        "[egress]\nupstreams = [\"127.0.0.1:53\"]\n",
        &[(
            "10-production.toml",
            "[rule.egress]\nallow = [\"allowed.test:443\"]\n",
        )],
        |o| o.nft_stub(FAILING_NFT),
    );
    let out = stack.run_sh(
        &GithubJob::production().token(),
        "echo the-job-ran; curl -sS -m 3 http://198.51.100.1/ || true",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = format!(
        "stdout:\n{stdout}\nstderr:\n{stderr}\nagent log:\n{}",
        stack.agent.log()
    );
    assert!(!out.status.success(), "{ctx}");
    assert!(!stdout.contains("the-job-ran"), "the job ran: {ctx}");
    // The error names what failed and why.
    assert!(stderr.contains("cannot build the job's sandbox"), "{ctx}");
    assert!(stderr.contains("nft"), "{ctx}");
    assert!(stderr.contains("injected failure"), "{ctx}");

    let records = stack.agent.audit_records();
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["event"] == "job_refused")
        .collect();
    assert_eq!(refused.len(), 1, "{records:?}");
    let reason = refused[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("nft") && reason.contains("injected failure"),
        "{reason}"
    );
    let job = refused[0]["job"].as_str().expect("the refused job's id");
    // Nothing was issued or started for it.
    for event in ["job_started", "credentials_issued"] {
        assert!(
            !records
                .iter()
                .any(|r| r["event"] == event && r["job"] == job),
            "{event} for a refused job: {records:?}"
        );
    }
    // Nothing of it is left: no namespace file, no link, no job directory.
    for dir in ["netns", "jobs"] {
        let left: Vec<_> = std::fs::read_dir(stack.agent.dir().join(dir))
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{dir}/ holds {left:?} after the refusal");
    }
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let link = airlock::sandbox::netns::host_link_name(job);
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&link),
        "the refused job's link {link} is left"
    );

    // The agent keeps serving: a job whose rule needs no firewall (endpoint-only) starts
    // and gets its credentials.
    let staging = stack.job(&GithubJob::staging());
    assert!(
        staging.refused.is_none(),
        "the staging job was refused: {:?}",
        staging.raw
    );
    let out = stack.agent.end_job(&staging.job_id);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
