//! Faults of what the agent depends on, injected for real: an STS that refuses
//! connections, answers garbage, stalls or denies; an issuer whose JWKS cannot be fetched,
//! is garbage or never answers. Each refuses the job or the issue with a clear error and an
//! audit record, never serves anything it could not verify, and the agent keeps serving the
//! jobs that do not depend on the broken part. (The audit disk, nft, netlink and the
//! upstream resolver have their own fault tests beside the audit and egress tests.)

use airlock_tests::agent::{Agent, AgentOptions};
use airlock_tests::oidc::{mint_with, GithubJob, TestKey};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// A loopback HTTP server that answers every request with `reply` (raw bytes), or — with
/// `None` — accepts and never answers.
fn bad_server(reply: Option<&'static [u8]>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            let mut s = s;
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 8192];
            let _ = s.read(&mut buf);
            match reply {
                Some(r) => {
                    let _ = s.write_all(r);
                }
                None => held.push(s),
            }
        }
    });
    addr
}

/// A whole HTTP/1.1 answer with `body`.
fn reply(status: &str, content_type: &str, body: &str) -> &'static [u8] {
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    Box::leak(text.into_bytes().into_boxed_slice())
}

/// A port nothing listens on.
fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn agent_with_sts(endpoint: &str) -> Agent {
    Agent::start(AgentOptions::new(
        endpoint,
        "AKIAFAULTTESTKEY0001",
        "fault-test-secret-never-anywhere",
    ))
    .unwrap_or_else(|e| panic!("airlockd did not start: {e}"))
}

fn records(agent: &Agent, event: &str, job: &str) -> Vec<Value> {
    agent
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == event && r["job"] == job)
        .collect()
}

/// Each broken STS: the job's credential request gets a `{Code, Message}` error (5xx for an
/// outage, 403 for a refusal) within the SDKs' patience, an `sts_error` record says what
/// happened, nothing is issued or served, and the agent stays healthy.
#[test]
fn a_broken_sts_refuses_the_issue_with_an_audit_record_and_serves_nothing() {
    let garbage = reply("200 OK", "text/xml", "<not-an-sts-answer/> ok");
    let denied = reply(
        "403 Forbidden",
        "text/xml",
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>not authorized to perform sts:AssumeRole</Message></Error><RequestId>x</RequestId></ErrorResponse>",
    );
    let cases: [(&str, String, std::ops::RangeInclusive<u16>); 4] = [
        ("refused", format!("http://{}", closed_port()), 500..=599),
        (
            "garbage",
            format!("http://{}", bad_server(Some(garbage))),
            500..=599,
        ),
        ("stalled", format!("http://{}", bad_server(None)), 500..=599),
        (
            "denied",
            format!("http://{}", bad_server(Some(denied))),
            403..=403,
        ),
    ];
    for (what, endpoint, statuses) in cases {
        let agent = agent_with_sts(&endpoint);
        let job = agent
            .start_job(&GithubJob::production().token())
            .unwrap_or_else(|e| panic!("{what}: a job starts while STS is broken: {e}"));
        let started = Instant::now();
        let (status, body) = loop {
            let (status, body) = job.credentials().expect("the endpoint answers");
            if body["Code"] != "CredentialsPending" {
                break (status, body);
            }
            // The background fetch has not given up yet: the SDKs retry a 5xx like this.
            assert!(
                started.elapsed() < Duration::from_secs(40),
                "{what}: still pending: {body}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(statuses.contains(&status), "{what}: {status} {body}");
        assert!(
            body["Code"].is_string() && body["Message"].is_string(),
            "{what}: {body}"
        );
        assert!(body.get("AccessKeyId").is_none(), "{what}: {body}");
        // A record of what already happened: written by the audit's writer shortly after.
        let deadline = Instant::now() + Duration::from_secs(10);
        while records(&agent, "sts_error", &job.job_id).is_empty() {
            assert!(Instant::now() < deadline, "{what}: no sts_error record");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            records(&agent, "credentials_issued", &job.job_id).is_empty(),
            "{what}: something was issued"
        );
        assert_eq!(agent.healthz(), Some(200), "{what}");
        let audit = std::fs::read_to_string(agent.audit_path()).unwrap();
        assert!(
            !audit.contains("fault-test-secret-never-anywhere"),
            "{what}"
        );
        assert!(
            !agent.log().contains("fault-test-secret-never-anywhere"),
            "{what}"
        );
    }
}

const OTHER_ISSUER: &str = "https://gitlab.faults.example";

fn gitlab_token() -> String {
    let key = TestKey::Rsa;
    mint_with(
        &key.file(),
        key.kid(),
        key.alg(),
        OTHER_ISSUER,
        "airlock-faults",
        &json!({
            "sub": "project_path:acme/web:ref_type:branch:ref:main",
            "project_path": "acme/web",
            "namespace_path": "acme",
            "ref": "main",
            "ref_type": "branch",
            "pipeline_source": "push",
            "job_id": "4711",
        }),
        300,
    )
    .unwrap()
}

/// An issuer whose keys cannot be had — nothing listens, the answer is not a JWKS, or the
/// server never answers — refuses that issuer's jobs with a message naming the issuer and
/// the reason, within the fetch timeout, and a `job_refused` record; the other issuer's
/// jobs start and are served all the while.
#[test]
fn an_unfetchable_jwks_refuses_the_issuers_jobs_and_nothing_else() {
    let not_jwks = reply("200 OK", "application/json", "{\"keys\": \"no\"}");
    for (what, addr) in [
        ("nothing listens", closed_port()),
        ("not a JWKS", bad_server(Some(not_jwks))),
        ("never answers", bad_server(None)),
    ] {
        let moto = airlock_tests::moto::MotoServer::start().expect("moto starts");
        let mut opts = AgentOptions::new(
            moto.endpoint(),
            moto.agent_access_key(),
            moto.agent_secret_key(),
        );
        opts.extra_config = format!(
            "\n[[issuer]]\nissuer = \"{OTHER_ISSUER}\"\naudiences = [\"airlock-faults\"]\nprovider = \"gitlab\"\njwks_url = \"http://{addr}/jwks\"\nallow_http = true\n"
        );
        let agent = Agent::start(opts).unwrap_or_else(|e| panic!("{what}: {e}"));
        let token = gitlab_token();
        let f = agent.token_file(&token);
        let started = Instant::now();
        let out = agent.cli(&["job", "start", "--oidc-token-file", f.to_str().unwrap()]);
        let took = started.elapsed();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(77), "{what}: {err}");
        assert!(
            err.contains(OTHER_ISSUER) && err.contains("cannot fetch keys"),
            "{what}: {err}"
        );
        assert!(took < Duration::from_secs(20), "{what}: took {took:?}");
        let refused: Vec<Value> = agent
            .audit_records()
            .into_iter()
            .filter(|r| r["event"] == "job_refused")
            .collect();
        assert_eq!(refused.len(), 1, "{what}: {refused:?}");
        assert!(
            refused[0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("cannot fetch keys")),
            "{what}: {}",
            refused[0]
        );
        assert!(
            !agent.log().contains(&token),
            "{what}: the token is in the log"
        );
        assert!(
            !std::fs::read_to_string(agent.audit_path())
                .unwrap()
                .contains(&token),
            "{what}: the token is in the audit"
        );
        // The GitHub issuer's jobs are not affected.
        let job = agent
            .start_job(&GithubJob::production().token())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let (status, body) = job.credentials().unwrap();
        assert_eq!(status, 200, "{what}: {body}");
    }
}
