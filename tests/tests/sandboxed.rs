//! Jobs run by `airlock run` with `[sandbox]` enabled: each in its own namespaces, cgroup
//! and network namespace, reaching its credentials at 169.254.170.2 / 169.254.169.254 from
//! inside, and wiped when it ends.

use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;

#[test]
fn a_sandboxed_job_gets_its_credentials_from_inside_its_namespace() {
    let stack = Stack::sandboxed("");
    let out = stack.run_sh(
        &GithubJob::production().token(),
        r#"id -u; echo "$AWS_CONTAINER_CREDENTIALS_FULL_URI"; \
           curl -sS -H "Authorization: $(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")" "$AWS_CONTAINER_CREDENTIALS_FULL_URI"; echo; \
           t=$(curl -sS -X PUT -H 'x-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token); \
           r=$(curl -sS -H "x-aws-ec2-metadata-token: $t" http://169.254.169.254/latest/meta-data/iam/security-credentials/); \
           echo "role=$r"; curl -sS -H "x-aws-ec2-metadata-token: $t" "http://169.254.169.254/latest/meta-data/iam/security-credentials/$r""#,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {stderr}\nagent log:\n{}",
        stack.agent.log()
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "2000000", "the job runs as its slot's user");
    assert_eq!(lines[1], "http://169.254.170.2/v1/credentials");
    assert!(lines[2].starts_with("{\"AccessKeyId\":\"ASIA"), "{stdout}");
    assert_eq!(lines[3], "role=deploy");
    assert!(lines[4].contains("\"Code\":\"Success\""), "{stdout}");
    let events: Vec<String> = stack
        .agent
        .audit_records()
        .iter()
        .map(|r| r["event"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(events.contains(&"job_wiped".to_string()), "{events:?}");
    let wiped = stack
        .agent
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == "job_wiped")
        .unwrap();
    assert_eq!(wiped["leftovers"], serde_json::json!([]), "{wiped}");
}
