//! Runs the real AWS clients (AWS CLI, boto3, the AWS SDK for JavaScript) with a job's
//! environment, the way a CI step would.
//!
//! Owns client invocation only; it must never hand a client credentials by any other way
//! than the job's environment (that is what is under test).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// A real client the tests drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// `aws sts get-caller-identity` from the venv (AWS CLI v1 on botocore).
    AwsCli,
    /// `tests/clients/get_identity.py` on boto3.
    Boto3,
    /// `tests/node/get-identity.js <mode>` on `@aws-sdk/credential-providers`.
    Node(&'static str),
}

/// What a client printed.
#[derive(Debug)]
pub struct ClientRun {
    pub client: Client,
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl ClientRun {
    /// stdout parsed as JSON (`Null` when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or(serde_json::Value::Null)
    }

    /// The caller ARN the client got from STS.
    pub fn arn(&self) -> Option<String> {
        self.json()["Arn"].as_str().map(str::to_owned)
    }
}

fn missing(what: &str, path: &std::path::Path) -> ! {
    panic!(
        "{what} {} is missing: run scripts/setup-test-deps.sh (make test does)",
        path.display()
    )
}

/// Runs `client` with exactly the job's `env` (plus PATH/HOME and the STS endpoint):
/// nothing of the host's AWS configuration leaks in.
pub fn run(client: Client, env: &BTreeMap<String, String>, sts_endpoint: &str) -> ClientRun {
    let (program, args): (PathBuf, Vec<String>) = match client {
        Client::AwsCli => (
            crate::paths::venv_bin("aws"),
            ["sts", "get-caller-identity", "--output", "json"]
                .map(String::from)
                .to_vec(),
        ),
        Client::Boto3 => (
            crate::paths::venv_bin("python"),
            vec![crate::paths::repo_root()
                .join("tests/clients/get_identity.py")
                .to_string_lossy()
                .into_owned()],
        ),
        Client::Node(mode) => (
            PathBuf::from("node"),
            vec![
                crate::paths::node_dir()
                    .join("get-identity.js")
                    .to_string_lossy()
                    .into_owned(),
                mode.to_owned(),
            ],
        ),
    };
    if matches!(client, Client::AwsCli | Client::Boto3) && !program.is_file() {
        missing("test client", &program);
    }
    if matches!(client, Client::Node(_)) {
        let sdk = crate::paths::node_dir().join("node_modules/@aws-sdk/credential-providers");
        if !sdk.is_dir() {
            missing("AWS SDK for JavaScript", &sdk);
        }
    }
    let mut cmd = Command::new(&program);
    cmd.args(&args).env_clear();
    for keep in ["PATH", "HOME", "LANG", "TMPDIR"] {
        if let Some(v) = std::env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
    cmd.envs(env)
        .env("AWS_ENDPOINT_URL_STS", sts_endpoint)
        // Retries would hide a refusal behind a slow test; a refusal must be immediate.
        .env("AWS_MAX_ATTEMPTS", "1")
        .env("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "1")
        .env("AWS_METADATA_SERVICE_TIMEOUT", "3")
        .stdin(Stdio::null());
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run {}: {e}", program.display()),
    };
    ClientRun {
        client,
        success: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The ARN STS (moto) reports for a session of `role` named `session`.
pub fn assumed_role_arn(role: &str, session: &str) -> String {
    format!("arn:aws:sts::123456789012:assumed-role/{role}/{session}")
}
