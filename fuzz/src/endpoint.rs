//! Target `endpoint`: a job's credential endpoint, the real hyper server and routes
//! (`fuzzing::endpoint_connection`), fed raw HTTP/1.1 bytes over an in-memory pipe, with a
//! fake credential source as the endpoint's unit tests use.
//!
//! Input: one flags byte (bit 0: the job has ended; bit 1: IMDS emulation on; bit 2: the
//! one-time bind route is open; bit 3: first get an IMDS session token with a real `PUT`;
//! bit 4: first claim the open bind route with a real `POST /v1/bind/claim`, as the
//! job-started hook does), then the bytes the job sends on one connection (any number of
//! requests). `{IMDS}` in them is replaced by the IMDS session token of bit 3, `{TICKET}`
//! by the bind ticket of bit 4. The job's endpoint token is the fixed [`TOKEN`], which the
//! seeds carry.
//!
//! Properties, after every input:
//! - no container credentials without a request line `Authorization: <the job's exact
//!   token>`: the answers that carry the fake's secret key number at most such lines;
//! - no IMDS credentials without a `X-aws-ec2-metadata-token` line holding the session
//!   token, and none at all with IMDS off; nothing at all for an ended job;
//! - the bind reaches the credential source at most once, only when it was opened and
//!   claimed (the claim's ticket is random: bytes the job sends cannot guess it), and only
//!   with the token and a line holding the ticket;
//! - neither the answers nor the audit log ever contain the job's token, the IMDS token or
//!   the bind ticket, and the audit log never contains the credentials.

use crate::{contains, count, Seed};
use airlock::audit::AuditLog;
use airlock::control::BindRequest;
use airlock::endpoint::{CredentialSource, JobEndpoint, Refusal, Served, Shared};
use airlock::metrics::Metrics;
use airlock::secret::Secret;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The job's endpoint token (a test value).
pub const TOKEN: &str = "fuzz-job-token-4f1c2d9e8b7a6c5d";
const SECRET_KEY: &str = "FUZZ/SECRET/ACCESS/KEY/0123456789";
const SESSION_TOKEN: &str = "FUZZ-SESSION-TOKEN-abcdef";
/// Only IMDS answers carry this (the container protocol's JSON has no `Type`).
const IMDS_MARK: &str = "\"Type\":\"AWS-HMAC\"";
const ADDR: &str = "127.0.0.1:80";
/// How long (on the paused clock) the job waits for more answers.
const IDLE: Duration = Duration::from_secs(60);

/// The fake broker: two grants, and a bind that counts its calls.
#[derive(Debug, Default)]
struct Fake {
    binds: AtomicUsize,
}

impl CredentialSource for Fake {
    async fn credentials(&self, job: &str, alias: Option<&str>) -> Result<Served, Refusal> {
        match alias.unwrap_or("deploy") {
            "deploy" | "readonly" => Ok(Served {
                access_key_id: format!("ASIA{job}"),
                secret_access_key: Secret::new(SECRET_KEY.into()),
                session_token: Secret::new(SESSION_TOKEN.into()),
                expiration: time::macros::datetime!(2030-01-02 03:04:05 UTC),
                last_updated: time::macros::datetime!(2030-01-02 02:04:05 UTC),
                role_arn: "arn:aws:iam::123456789012:role/deploy".into(),
                account_id: Some("123456789012".into()),
            }),
            _ => Err(Refusal {
                status: 404,
                code: "NoSuchRole".into(),
                message: "no grant of that name".into(),
            }),
        }
    }

    fn aliases(&self, _job: &str) -> Vec<String> {
        vec!["deploy".into(), "readonly".into()]
    }

    async fn bind(&self, _job: &str, _req: BindRequest) -> Result<serde_json::Value, Refusal> {
        self.binds.fetch_add(1, Ordering::SeqCst);
        Ok(serde_json::json!({ "bound": true }))
    }
}

struct Harness {
    rt: tokio::runtime::Runtime,
    metrics: Arc<Metrics>,
    dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| Harness {
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a tokio runtime"),
        metrics: Arc::new(Metrics::new()),
        dir: crate::scratch_dir(),
    })
}

/// Send `input` on one connection, read what comes back until the server has nothing more
/// to say, hang up, and read the rest until it closes. Time is paused (the runtime's clock
/// jumps whenever every task waits), so waiting costs nothing and hyper's own timeouts fire
/// as they would.
async fn exchange(input: Vec<u8>, job: Arc<JobEndpoint>, shared: Arc<Shared<Fake>>) -> Vec<u8> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let served = tokio::spawn(airlock::fuzzing::endpoint_connection(server, job, shared));
    let (mut rd, mut wr) = tokio::io::split(client);
    let writer = tokio::spawn(async move {
        // The server may close first (a malformed request): a failed write is fine.
        let _ = wr.write_all(&input).await;
        wr
    });
    let mut out = Vec::new();
    // A server that keeps the connection open waits for the next request: stop reading when
    // nothing moves for a while (bytes read so far stay in `out`).
    let _ = tokio::time::timeout(IDLE, rd.read_to_end(&mut out)).await;
    if let Ok(mut wr) = writer.await {
        let _ = wr.shutdown().await;
    }
    let _ = tokio::time::timeout(IDLE, rd.read_to_end(&mut out)).await;
    tokio::time::timeout(IDLE, served)
        .await
        .expect("the endpoint kept the connection open after the job hung up")
        .expect("the connection task panicked");
    out
}

/// Header lines of `input` named `name` whose value is exactly `value`.
fn header_lines(input: &[u8], name: &str, value: &[u8]) -> usize {
    input
        .split(|&b| b == b'\n')
        .filter(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return false;
            };
            let (n, v) = (&line[..colon], &line[colon + 1..]);
            let v = v.trim_ascii();
            n.eq_ignore_ascii_case(name.as_bytes()) && v == value
        })
        .count()
}

pub fn run(data: &[u8]) {
    let _ = exercise(data);
}

/// What one input got, for the self-test.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    container_creds: usize,
    imds_creds: usize,
    binds: usize,
    /// The status of every answer, in order.
    statuses: Vec<u16>,
}

fn statuses(out: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(out);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

fn exercise(data: &[u8]) -> Option<Outcome> {
    let (&flags, rest) = data.split_first()?;
    let (ended, imds, bind_open, mint, claim) = (
        flags & 1 != 0,
        flags & 2 != 0,
        flags & 4 != 0,
        flags & 8 != 0,
        flags & 16 != 0,
    );
    let h = harness();
    let audit_path = h.dir.path().join("audit.jsonl");
    let _ = std::fs::remove_file(&audit_path);
    let source = Arc::new(Fake::default());
    let shared = Arc::new(Shared {
        source: source.clone(),
        metrics: h.metrics.clone(),
        audit: Arc::new(AuditLog::open(&audit_path).expect("open the audit log")),
        conns: airlock::endpoint::ConnBudget::for_this_process(),
    });
    let addr: SocketAddr = ADDR.parse().unwrap();
    let job = Arc::new(JobEndpoint::new(
        "j1".into(),
        Sha256::digest(TOKEN).into(),
        addr,
        "eu-west-1".into(),
        imds,
    ));
    let (out, imds_token, ticket, input) = h.rt.block_on(async {
        {
            let mut imds_token = None;
            if mint && imds {
                let put = b"PUT /latest/api/token HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                            X-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n";
                let answer = exchange(put.to_vec(), job.clone(), shared.clone()).await;
                let text = String::from_utf8_lossy(&answer).into_owned();
                assert!(
                    text.starts_with("HTTP/1.1 200"),
                    "the IMDS token PUT failed: {text}"
                );
                imds_token = text.split("\r\n\r\n").nth(1).map(str::to_string);
            }
            if ended {
                job.end();
            }
            if bind_open {
                job.open_bind();
            }
            let mut ticket = None;
            if claim && bind_open && !ended {
                let post = format!(
                    "POST /v1/bind/claim HTTP/1.1\r\nHost: {ADDR}\r\nAuthorization: {TOKEN}\r\n\
                     Content-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let answer = exchange(post.into_bytes(), job.clone(), shared.clone()).await;
                let text = String::from_utf8_lossy(&answer).into_owned();
                assert!(
                    text.starts_with("HTTP/1.1 200"),
                    "the bind claim failed: {text}"
                );
                let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
                let json: serde_json::Value =
                    serde_json::from_str(body).expect("the claim answers JSON");
                ticket = json["ticket"].as_str().map(str::to_string);
                assert!(ticket.is_some(), "the claim answered no ticket: {body}");
            }
            let mut input = match &imds_token {
                Some(t) => replace(rest, b"{IMDS}", t.as_bytes()),
                None => rest.to_vec(),
            };
            if let Some(t) = &ticket {
                input = replace(&input, b"{TICKET}", t.as_bytes());
            }
            let out = exchange(input.clone(), job.clone(), shared.clone()).await;
            (out, imds_token, ticket, input)
        }
    });
    drop(shared);

    let token_lines = header_lines(&input, "authorization", TOKEN.as_bytes());
    let imds_lines = imds_token.as_deref().map_or(0, |t| {
        header_lines(&input, "x-aws-ec2-metadata-token", t.as_bytes())
    });
    let all_creds = count(&out, SECRET_KEY.as_bytes());
    let imds_creds = count(&out, IMDS_MARK.as_bytes());
    let container_creds = all_creds.saturating_sub(imds_creds);
    assert!(
        container_creds <= token_lines,
        "{container_creds} container credential answers for {token_lines} requests with the token"
    );
    assert!(
        imds_creds <= imds_lines,
        "{imds_creds} IMDS credential answers for {imds_lines} requests with the session token"
    );
    if ended {
        assert_eq!(all_creds, 0, "credentials for an ended job");
    }
    if !imds {
        assert_eq!(imds_creds, 0, "IMDS credentials with IMDS off");
    }
    let binds = source.binds.load(Ordering::SeqCst);
    assert!(binds <= 1, "{binds} binds through a one-time route");
    assert!(binds <= token_lines, "a bind without the token");
    if !bind_open || ended {
        assert_eq!(binds, 0, "a bind that was not opened");
    }
    match &ticket {
        None => assert_eq!(binds, 0, "a bind without a claim's ticket"),
        Some(t) => assert!(
            binds <= header_lines(&input, "x-airlock-bind-ticket", t.as_bytes()),
            "a bind without the ticket"
        ),
    }
    assert!(
        !contains(&out, TOKEN.as_bytes()),
        "an answer echoed the job's token"
    );
    let audit = std::fs::read(&audit_path).unwrap_or_default();
    assert!(
        !contains(&audit, TOKEN.as_bytes()),
        "the audit log holds the job's token"
    );
    assert!(
        !contains(&audit, SECRET_KEY.as_bytes()),
        "the audit log holds a secret key"
    );
    assert!(
        !contains(&audit, SESSION_TOKEN.as_bytes()),
        "the audit log holds a session token"
    );
    for t in imds_token.iter().chain(ticket.iter()) {
        assert!(
            !contains(&out, t.as_bytes()),
            "an answer echoed the IMDS token or the bind ticket"
        );
        assert!(
            !contains(&audit, t.as_bytes()),
            "the audit log holds the IMDS token or the bind ticket"
        );
    }
    Some(Outcome {
        container_creds,
        imds_creds,
        binds,
        statuses: statuses(&out),
    })
}

/// The seeds get what they were written for: credentials where the token is right, and
/// the refusals where it is not.
pub fn selftest() {
    let seeds = seeds();
    let run = |name: &str| exercise(&crate::seed(&seeds, name)).expect("seeds are not empty");
    let outcome = |c, i, b, s: &[u16]| Outcome {
        container_creds: c,
        imds_creds: i,
        binds: b,
        statuses: s.to_vec(),
    };
    assert_eq!(
        run("container-default-and-alias"),
        outcome(2, 0, 0, &[200, 200, 404])
    );
    assert_eq!(
        run("container-refusals"),
        outcome(0, 0, 0, &[401, 403, 405, 404])
    );
    assert_eq!(run("ended-job"), outcome(0, 0, 0, &[403]));
    assert_eq!(run("imds-flow"), outcome(0, 1, 0, &[200, 200, 200, 200]));
    assert_eq!(
        run("imds-refusals"),
        outcome(0, 0, 0, &[403, 400, 200, 401])
    );
    assert_eq!(run("bind-once"), outcome(0, 0, 1, &[200, 409]));
    assert_eq!(run("bind-unclaimed"), outcome(0, 0, 0, &[200, 409]));
    assert_eq!(run("bad-host"), outcome(0, 0, 0, &[400]));
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

fn request(method: &str, path: &str, headers: &[&str], body: &str) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: {ADDR}\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    if !body.is_empty() {
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

pub fn seeds() -> Vec<Seed> {
    let auth = format!("Authorization: {TOKEN}");
    let ticket = "X-Airlock-Bind-Ticket: {TICKET}";
    let seed = |flags: u8, parts: Vec<Vec<u8>>| {
        let mut out = vec![flags];
        for p in parts {
            out.extend(p);
        }
        out
    };
    vec![
        (
            "container-default-and-alias",
            seed(
                0,
                vec![
                    request("GET", "/v1/credentials", &[&auth], ""),
                    request("GET", "/v1/credentials/readonly", &[&auth], ""),
                    request("GET", "/v1/credentials/nope", &[&auth], ""),
                ],
            ),
        ),
        (
            "container-refusals",
            seed(
                0,
                vec![
                    request("GET", "/v1/credentials", &[], ""),
                    request("GET", "/v1/credentials", &["Authorization: Bearer wrong"], ""),
                    request("POST", "/v1/credentials", &[&auth], "x"),
                    request("GET", "/v1/credentials/../../etc", &[&auth], ""),
                ],
            ),
        ),
        (
            "ended-job",
            seed(1, vec![request("GET", "/v1/credentials", &[&auth], "")]),
        ),
        (
            "imds-flow",
            seed(
                2 | 8,
                vec![
                    request("GET", "/latest/meta-data/iam/security-credentials/", &["X-aws-ec2-metadata-token: {IMDS}"], ""),
                    request("GET", "/latest/meta-data/iam/security-credentials/deploy", &["X-aws-ec2-metadata-token: {IMDS}"], ""),
                    request("GET", "/latest/meta-data/placement/region", &["X-aws-ec2-metadata-token: {IMDS}"], ""),
                    request("GET", "/latest/dynamic/instance-identity/document", &["X-aws-ec2-metadata-token: {IMDS}"], ""),
                ],
            ),
        ),
        (
            "imds-refusals",
            seed(
                2,
                vec![
                    request("PUT", "/latest/api/token", &["X-aws-ec2-metadata-token-ttl-seconds: 21600", "X-Forwarded-For: 1.2.3.4"], ""),
                    request("PUT", "/latest/api/token", &[], ""),
                    request("PUT", "/latest/api/token", &["X-aws-ec2-metadata-token-ttl-seconds: 30"], ""),
                    request("GET", "/latest/meta-data/iam/security-credentials/deploy", &[], ""),
                ],
            ),
        ),
        (
            "bind-once",
            seed(
                4 | 16,
                vec![
                    request("POST", "/v1/bind", &[&auth, ticket, "Content-Type: application/json"], r#"{"claims":{"repository":"acme/web"}}"#),
                    request("POST", "/v1/bind", &[&auth, ticket], r#"{"oidc_token":"a.b.c"}"#),
                ],
            ),
        ),
        (
            // A step that finds the route open claims it, then binds without a ticket.
            "bind-unclaimed",
            seed(
                4,
                vec![
                    request("POST", "/v1/bind/claim", &[&auth], ""),
                    request("POST", "/v1/bind", &[&auth, "X-Airlock-Bind-Ticket: guess"], r#"{"oidc_token":"a.b.c"}"#),
                ],
            ),
        ),
        (
            "chunked-bind",
            seed(
                4 | 16,
                vec![format!(
                    "POST /v1/bind HTTP/1.1\r\nHost: {ADDR}\r\n{auth}\r\n{ticket}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{{\"cla\r\n0\r\n\r\n"
                )
                .into_bytes()],
            ),
        ),
        (
            "bad-host",
            seed(
                0,
                vec![b"GET /v1/credentials HTTP/1.1\r\nHost: evil.example\r\n".to_vec(), format!("{auth}\r\n\r\n").into_bytes()],
            ),
        ),
    ]
}
