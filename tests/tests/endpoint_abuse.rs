//! Malformed and hostile HTTP to a job's endpoint gets a clear 4xx, never credentials, and
//! the agent keeps serving the job afterwards. A job that hoards connections to its
//! endpoint holds at most its cap of the agent's descriptors while other jobs, the control
//! socket and wipes go on. Unsandboxed agents serve no token-less IMDS unless asked.

use airlock_tests::agent::{parse_response, raw_request, Job};
use airlock_tests::jobprobe::{credential_latency, python};
use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;
use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn send(job: &Job, bytes: &[u8]) -> (u16, String) {
    let resp = raw_request(&job.addr(), bytes).expect("the endpoint answers");
    parse_response(&resp).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn hostile_requests_get_4xx_and_the_job_is_still_served() {
    let stack = Stack::start_with(|o| o.imds(true));
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

#[test]
fn unsandboxed_jobs_get_no_token_less_imds_unless_the_operator_asks() {
    // Default: [sandbox] enabled = false and no imds key.
    let stack = Stack::start();
    let job = stack.job(&GithubJob::production());
    assert!(
        !job.env.keys().any(|k| k.starts_with("AWS_EC2_METADATA")),
        "the job is pointed at IMDS: {:?}",
        job.env.keys()
    );
    // Any local process that found the job's port (this test, any user) asks for an IMDS
    // session token and then the role: there is no IMDS to ask.
    let addr = job.addr();
    let put = format!(
        "PUT /latest/api/token HTTP/1.1\r\nHost: {addr}\r\nx-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n"
    );
    let (status, body) = send(&job, put.as_bytes());
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("IMDS emulation is disabled"), "{body}");
    let get = format!(
        "GET /latest/meta-data/iam/security-credentials/deploy HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let (status, body) = send(&job, get.as_bytes());
    assert_eq!(status, 404, "{body}");
    assert!(!body.contains("SecretAccessKey"));
    // The container protocol, which needs the job's token, still serves the job.
    assert_eq!(job.credentials().expect("endpoint answers").0, 200);
    assert!(
        !stack
            .agent
            .log()
            .contains("imds = true with [sandbox] disabled"),
        "warned without imds = true"
    );

    // An explicit `imds = true` turns it on, with a warning at start.
    let stack = Stack::start_with(|o| o.imds(true));
    let job = stack.job(&GithubJob::production());
    assert!(job.env.contains_key("AWS_EC2_METADATA_SERVICE_ENDPOINT"));
    let addr = job.addr();
    let put = format!(
        "PUT /latest/api/token HTTP/1.1\r\nHost: {addr}\r\nx-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n"
    );
    let (status, body) = send(&job, put.as_bytes());
    assert_eq!(status, 200, "{body}");
    let log = stack.agent.log();
    assert!(
        log.contains("imds = true with [sandbox] disabled"),
        "no warning at start: {log}"
    );
}

/// Connections job A tries to open: far beyond its cap.
const HOARD: usize = 3000;
/// The per-job cap (agent/src/endpoint.rs `CONNECTIONS_PER_JOB`, docs/endpoint.md).
const CAP: usize = 64;

/// Job A: waits for `go`, opens [`HOARD`] connections to its endpoint and sends a cheap
/// request on each every 2 s (well inside the idle timeout) until `stop` appears (at most
/// 150 s), reporting how many connections were ever answered and how many the agent
/// closed.
const HOARDER: &str = r#"
import os, select, socket, sys, time
go, stop, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
host = "169.254.170.2"
print("started", flush=True)
while not os.path.exists(go):
    time.sleep(0.05)
socks = {}
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((host, 80))
    socks[s.fileno()] = s
poll = select.poll()
for fd in socks:
    poll.register(fd, select.POLLIN)
print("opened", len(socks), flush=True)
req = ("GET /hoard HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode()
answered, closed = set(), set()
end = time.time() + 150
while not os.path.exists(stop) and time.time() < end:
    for fd, s in socks.items():
        if fd not in closed:
            try:
                s.send(req)
            except OSError:
                pass
    until = time.time() + 2
    while time.time() < until:
        for fd, ev in poll.poll(200):
            try:
                data = socks[fd].recv(65536)
            except OSError:
                data = b""
            if data:
                answered.add(fd)
            else:
                closed.add(fd)
                poll.unregister(fd)
    print("answered=%d closed=%d" % (len(answered), len(closed)), flush=True)
print("done", flush=True)
"#;

/// Lines of a child's stdout, as they come, on a channel.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return l,
            Ok(_) => {}
            Err(e) => panic!("job A never printed {prefix:?}: {e}"),
        }
    }
}

/// Ends a background `airlock run` if the test fails before it does.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_job_hoarding_connections_holds_only_its_cap_and_starves_no_one() {
    airlock_tests::prereq::require_root_and("the connection hoarding test", &[]);
    let stack = Stack::sandboxed("");
    let dir = airlock_tests::paths::job_visible_dir(&format!("hoard-{}", std::process::id()));
    let (go, stop) = (dir.join("go"), dir.join("stop"));
    let _ = std::fs::remove_file(&go);
    let _ = std::fs::remove_file(&stop);

    let quiet = credential_latency(&stack, "quiet");
    assert_eq!(quiet.errors, 0, "{quiet:?}");
    let idle_fds = stack.agent.open_fds().expect("the agent's /proc/<pid>/fd");

    let mut a = Reap(stack.agent.spawn_run_sh(
        &GithubJob::production().token(),
        &python(
            HOARDER,
            &format!("{} {} {HOARD}", go.display(), stop.display()),
        ),
    ));
    let rx = lines_of(&mut a.0);
    wait_line(&rx, "started", Duration::from_secs(60));
    // Job A is running and holds no connection yet: what a job costs by itself.
    let a_fds = stack.agent.open_fds().expect("fds");
    std::fs::write(&go, "").expect("the go file");
    let opened = wait_line(&rx, "opened", Duration::from_secs(60));
    assert_eq!(opened, format!("opened {HOARD}"));
    // A has sent its requests a few times over: its connections are up and busy.
    for _ in 0..3 {
        wait_line(&rx, "answered=", Duration::from_secs(30));
    }
    let mut max_fds = 0;
    let sample = |max: &mut usize| {
        if let Some(n) = stack.agent.open_fds() {
            *max = (*max).max(n);
        }
    };
    sample(&mut max_fds);

    // Job B still gets its credentials quickly and without errors.
    let busy = credential_latency(&stack, "while A hoards");
    sample(&mut max_fds);
    assert_eq!((busy.errors, busy.n), (0, 40), "{busy:?}");
    // The SDKs give up after 1 s (JS) or 2 s (botocore); a quiet fetch takes a few ms.
    assert!(
        busy.p99_ms < 500.0,
        "job B's p99 {} ms while A hoards (quiet: {} ms)",
        busy.p99_ms,
        quiet.p99_ms
    );

    // The control socket answers: list, start and end a job.
    let list = stack.agent.cli(&["job", "list"]);
    assert!(list.status.success(), "{list:?}");
    let c = stack.job(&GithubJob::production());
    let end = stack.agent.end_job(&c.job_id);
    assert!(end.status.success(), "{end:?}");
    sample(&mut max_fds);
    // A third sandboxed job starts, runs and is wiped.
    let out = stack.run_sh(&GithubJob::production().token(), "echo third-ran");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("third-ran"),
        "{out:?}"
    );
    sample(&mut max_fds);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let third = stderr
        .find("airlock: job j-")
        .map(|at| {
            stderr[at + "airlock: job ".len()..]
                .chars()
                .take(18)
                .collect::<String>()
        })
        .unwrap_or_else(|| panic!("no job id in {stderr}"));
    let deadline = Instant::now() + Duration::from_secs(15);
    let wiped = loop {
        let r = stack
            .agent
            .audit_records()
            .into_iter()
            .find(|r| r["event"] == "job_wiped" && r["job"] == third.as_str());
        if let Some(r) = r {
            break r;
        }
        assert!(Instant::now() < deadline, "no job_wiped record for {third}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(wiped["leftovers"], serde_json::json!([]), "{wiped}");

    // A was answered on at most its cap of connections, and on (nearly) all of them: the
    // rest of its thousands wait in the kernel's queue.
    let last = wait_line(&rx, "answered=", Duration::from_secs(30));
    let answered: usize = last
        .trim_start_matches("answered=")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{last}"));
    eprintln!(
        "agent fds: idle {idle_fds}, with job A started {a_fds}, max while A hoards {max_fds}; A: {last}"
    );
    assert!(
        answered <= CAP,
        "job A was answered on {answered} connections: {last}"
    );
    assert!(
        answered >= CAP - 4,
        "the attack did not reach the cap: {last}"
    );
    // The agent's descriptors: A's connections are bounded by the cap; the slack is for B
    // and the third job's own (listeners, their setup and wipe) while they run.
    let bound = a_fds + CAP + 48;
    assert!(
        max_fds <= bound,
        "the agent had {max_fds} descriptors open while A hoarded (A started: {a_fds}, bound {bound})"
    );
    assert!(
        max_fds >= a_fds + CAP - 4,
        "A's connections did not show: {max_fds}"
    );

    std::fs::write(&stop, "").expect("the stop file");
    wait_line(&rx, "done", Duration::from_secs(30));
    let status = a.0.wait().expect("job A ends");
    assert!(status.success(), "job A: {status}");
    let _ = std::fs::remove_dir_all(&dir);
}
