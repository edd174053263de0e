//! The AWS SDK for Rust (`aws-config`, rustls on ring) gets a job's credentials from airlock
//! through the container provider and through IMDSv2, then calls STS (moto) with them.
//!
//! One test function: `aws-config` reads the process environment, so the two phases set
//! it in turn rather than racing each other on threads.

use airlock_tests::agent::HOST_AWS_VARS;
use airlock_tests::clients::assumed_role_arn;
use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;
use aws_config::BehaviorVersion;
use aws_smithy_http_client::tls;
use std::collections::BTreeMap;

async fn caller_arn(sts_endpoint: &str) -> Result<String, String> {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let conf = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .endpoint_url(sts_endpoint)
        .load()
        .await;
    let sts = aws_sdk_sts::Client::new(&conf);
    let out = sts
        .get_caller_identity()
        .send()
        .await
        .map_err(|e| format!("{}", aws_sdk_sts::error::DisplayErrorContext(e)))?;
    out.arn()
        .map(str::to_owned)
        .ok_or_else(|| "no Arn in the answer".into())
}

fn set_job_env(env: &BTreeMap<String, String>) {
    for v in HOST_AWS_VARS {
        std::env::remove_var(v);
    }
    for (k, v) in env {
        std::env::set_var(k, v);
    }
}

#[test]
fn rust_sdk_gets_job_credentials_via_container_and_imds() {
    let stack = Stack::start_with(|o| o.imds(true));
    let job = stack.job(&GithubJob::production());
    assert_eq!(job.credentials().expect("endpoint answers").0, 200);
    let session = stack
        .agent
        .session_name(&job.job_id)
        .expect("session name audited");
    let want = assumed_role_arn("web-prod-deploy", &session);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    set_job_env(&job.container_env());
    let arn = rt.block_on(caller_arn(stack.sts()));
    assert_eq!(arn.as_deref(), Ok(want.as_str()), "container provider");

    set_job_env(&job.imds_env());
    assert!(std::env::var_os("AWS_CONTAINER_CREDENTIALS_FULL_URI").is_none());
    let arn = rt.block_on(caller_arn(stack.sts()));
    assert_eq!(arn.as_deref(), Ok(want.as_str()), "IMDSv2 provider");
}
