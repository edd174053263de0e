//! Real AWS clients that no one here wrote (AWS CLI, boto3, the AWS SDK for JavaScript) get
//! a job's credentials from airlock, through the container-credentials protocol and through
//! IMDSv2, and STS (moto) sees them as the job's own session of the granted role.

use airlock_tests::agent::Job;
use airlock_tests::clients::{self, assumed_role_arn, Client, ClientRun};
use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;
use std::collections::BTreeMap;

fn production_job(stack: &Stack) -> (Job, String) {
    let job = stack.job(&GithubJob::production());
    assert_eq!(job.refused, None, "production job refused: {:?}", job.raw);
    assert_eq!(job.rule.as_deref(), Some("web-production"));
    // The agent prefetches; the session name is what the audit log recorded for this job.
    let (status, _) = job.credentials().expect("endpoint answers");
    assert_eq!(status, 200);
    let session = stack.agent.session_name(&job.job_id).unwrap_or_else(|| {
        panic!(
            "no credentials_issued record with a session_name for {}",
            job.job_id
        )
    });
    (job, session)
}

fn run_ok(stack: &Stack, client: Client, env: &BTreeMap<String, String>) -> ClientRun {
    let run = clients::run(client, env, stack.sts());
    assert!(
        run.success,
        "{client:?} failed (exit {:?}):\nstdout: {}\nstderr: {}",
        run.code, run.stdout, run.stderr
    );
    run
}

fn assert_deploy_session(run: &ClientRun, session: &str) {
    assert_eq!(
        run.arn().as_deref(),
        Some(assumed_role_arn("web-prod-deploy", session).as_str()),
        "{:?} saw another identity: {}",
        run.client,
        run.stdout
    );
}

#[test]
fn aws_cli_gets_job_credentials_via_container_and_imds() {
    let stack = Stack::start_with(|o| o.imds(true));
    let (job, session) = production_job(&stack);
    let run = run_ok(&stack, Client::AwsCli, &job.container_env());
    assert_deploy_session(&run, &session);
    let run = run_ok(&stack, Client::AwsCli, &job.imds_env());
    assert_deploy_session(&run, &session);
}

#[test]
fn boto3_gets_job_credentials_via_container_and_imds() {
    let stack = Stack::start_with(|o| o.imds(true));
    let (job, session) = production_job(&stack);
    let run = run_ok(&stack, Client::Boto3, &job.container_env());
    assert_deploy_session(&run, &session);
    assert_eq!(run.json()["method"], "container-role", "{}", run.stdout);
    let run = run_ok(&stack, Client::Boto3, &job.imds_env());
    assert_deploy_session(&run, &session);
    assert_eq!(run.json()["method"], "iam-role", "{}", run.stdout);
}

#[test]
fn node_sdk_gets_job_credentials_via_container_and_imds() {
    let stack = Stack::start_with(|o| o.imds(true));
    let (job, session) = production_job(&stack);
    for mode in ["container", "http", "chain"] {
        let run = run_ok(&stack, Client::Node(mode), &job.container_env());
        assert_deploy_session(&run, &session);
    }
    for mode in ["imds", "chain"] {
        let run = run_ok(&stack, Client::Node(mode), &job.imds_env());
        assert_deploy_session(&run, &session);
    }
}

#[test]
fn container_token_file_is_what_the_sdks_read() {
    // With only the token file (no inline token), botocore and fromHttp must still work:
    // the file is the one the agent wrote for this job.
    let stack = Stack::start_with(|o| o.imds(true));
    let (job, session) = production_job(&stack);
    let mut env = job.container_env();
    env.remove("AWS_CONTAINER_AUTHORIZATION_TOKEN");
    let file = env
        .get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
        .expect("job env names a token file")
        .clone();
    assert_eq!(
        std::fs::read_to_string(&file)
            .expect("token file readable")
            .trim(),
        job.token
    );
    assert_deploy_session(&run_ok(&stack, Client::Boto3, &env), &session);
    assert_deploy_session(&run_ok(&stack, Client::Node("http"), &env), &session);
}
