//! Malformed and hostile HTTP to a job's endpoint gets a clear 4xx, never credentials, and
//! the agent keeps serving the job afterwards.

use airlock_tests::agent::{parse_response, raw_request, Job};
use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;

fn send(job: &Job, bytes: &[u8]) -> (u16, String) {
    let resp = raw_request(&job.addr(), bytes).expect("the endpoint answers");
    parse_response(&resp).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn hostile_requests_get_4xx_and_the_job_is_still_served() {
    let stack = Stack::start();
    let job = stack.job(&GithubJob::production());
    let addr = job.addr();
    let tok = &job.token;
    let imds_token = {
        let req = format!(
            "PUT /latest/api/token HTTP/1.1\r\nHost: {addr}\r\nx-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n"
        );
        let (status, body) = send(&job, req.as_bytes());
        assert_eq!(status, 200, "IMDS token PUT: {body}");
        body
    };
    let huge = "a".repeat(256 * 1024);
    let cases: Vec<(&str, Vec<u8>, Option<u16>)> = vec![
        (
            "no token",
            format!("GET /v1/credentials HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").into_bytes(),
            Some(401),
        ),
        (
            "wrong token",
            format!("GET /v1/credentials HTTP/1.1\r\nHost: {addr}\r\nAuthorization: x{tok}\r\nConnection: close\r\n\r\n").into_bytes(),
            Some(403),
        ),
        (
            "Bearer prefix",
            format!("GET /v1/credentials HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n").into_bytes(),
            None,
        ),
        (
            "token with CR/LF",
            format!("GET /v1/credentials HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {tok}\r\r\nConnection: close\r\n\r\n").into_bytes(),
            None,
        ),
        (
            "bad Host (DNS rebinding)",
            format!("GET /v1/credentials HTTP/1.1\r\nHost: attacker.example\r\nAuthorization: {tok}\r\nConnection: close\r\n\r\n").into_bytes(),
            None,
        ),
        (
            "IMDS credentials without a session token",
            format!("GET /latest/meta-data/iam/security-credentials/deploy HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").into_bytes(),
            Some(401),
        ),
        (
            "IMDS PUT with X-Forwarded-For",
            format!("PUT /latest/api/token HTTP/1.1\r\nHost: {addr}\r\nx-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 10.0.0.1\r\nConnection: close\r\n\r\n").into_bytes(),
            Some(403),
        ),
        (
            "IMDS PUT without a TTL",
            format!("PUT /latest/api/token HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").into_bytes(),
            Some(400),
        ),
        (
            "huge header",
            format!("GET /v1/credentials HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {tok}\r\nX-Big: {huge}\r\nConnection: close\r\n\r\n").into_bytes(),
            None,
        ),
        (
            "path traversal",
            format!("GET /v1/credentials/../../etc/passwd HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {tok}\r\nConnection: close\r\n\r\n").into_bytes(),
            None,
        ),
        ("garbage bytes", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n".to_vec(), None),
    ];
    let mut failures = Vec::new();
    for (name, bytes, want) in &cases {
        match raw_request(&addr, bytes).map(|r| parse_response(&r)) {
            Ok(Ok((status, body))) => {
                if body.contains("SecretAccessKey") {
                    failures.push(format!("{name}: credentials served!"));
                }
                match want {
                    Some(w) if status != *w => {
                        failures.push(format!("{name}: {status} (want {w}) {body}"))
                    }
                    None if !(400..500).contains(&status) => {
                        failures.push(format!("{name}: {status} (want 4xx) {body}"))
                    }
                    _ => {}
                }
            }
            // A connection closed without an answer is not a clear 4xx.
            other => failures.push(format!("{name}: no HTTP answer: {other:?}")),
        }
        let (status, body) = job.credentials().expect("endpoint still answers");
        if status != 200 {
            failures.push(format!(
                "after {name}: the job is no longer served: {status} {body}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The IMDS token obtained first still works: the agent kept its state.
    let req = format!(
        "GET /latest/meta-data/iam/security-credentials/deploy HTTP/1.1\r\nHost: {addr}\r\nx-aws-ec2-metadata-token: {imds_token}\r\nConnection: close\r\n\r\n"
    );
    let (status, body) = send(&job, req.as_bytes());
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"Code\":\"Success\"")
            || body.contains("\"Code\" : \"Success\"")
            || body.contains("Success"),
        "{body}"
    );
    assert_eq!(stack.agent.healthz(), Some(200));
}
