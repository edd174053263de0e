//! `airlock-bench`: the credential endpoint benchmark (`make bench`).
//!
//! Starts moto and `airlockd` (from `AIRLOCK_BIN_DIR`, release builds in `make bench`),
//! starts a production job, warms its cache, then runs the same closed-loop load — N
//! keep-alive connections each sending GETs back to back for a fixed time — against the
//! job's container endpoint and, in the same run, against a bare hyper server that returns
//! the same bytes. Also reads the agent's RSS idle and with 32 jobs.
//!
//! The last line is `key=value` pairs: throughput of both, their ratio, p50/p99 latency,
//! and memory. Targets (DESIGN.md): ratio ≥ 0.8, agent p99 ≤ 1 ms at 32 connections, idle
//! RSS ≤ 20 MiB, ≤ 64 MiB with 32 jobs.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

use airlock_tests::agent::{Agent, AgentOptions};
use airlock_tests::moto::MotoServer;
use airlock_tests::oidc::GithubJob;

const CONNECTIONS: usize = 32;

#[derive(Debug)]
struct Load {
    rps: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
}

/// One keep-alive connection sending `GET path` back to back until `until`.
async fn worker(
    addr: SocketAddr,
    path: Arc<str>,
    auth: Arc<str>,
    until: Instant,
) -> (Vec<u32>, u64) {
    let mut lat = Vec::with_capacity(100_000);
    let mut errors = 0;
    let Ok(stream) = TcpStream::connect(addr).await else {
        return (lat, 1);
    };
    let _ = stream.set_nodelay(true);
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return (lat, 1);
    };
    tokio::spawn(conn);
    let host = addr.to_string();
    while Instant::now() < until {
        let req = http::Request::get(&*path)
            .header(http::header::HOST, &host)
            .header(http::header::AUTHORIZATION, &*auth)
            .body(Empty::<Bytes>::new())
            .expect("static request");
        let t = Instant::now();
        match sender.send_request(req).await {
            Ok(resp) => {
                let ok = resp.status() == 200;
                let body = resp.into_body().collect().await;
                if !ok || body.is_err() {
                    errors += 1;
                }
            }
            Err(_) => {
                errors += 1;
                break;
            }
        }
        lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    (lat, errors)
}

async fn load(addr: SocketAddr, path: &str, auth: &str, secs: u64) -> Load {
    // A short warm-up so both targets start with open connections and warm caches.
    let warm = Instant::now() + Duration::from_millis(500);
    let (p, a): (Arc<str>, Arc<str>) = (path.into(), auth.into());
    let _ = futures_join(addr, p.clone(), a.clone(), warm).await;
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let results = futures_join(addr, p, a, until).await;
    let elapsed = start.elapsed().as_secs_f64();
    let mut all: Vec<u32> = Vec::new();
    let mut errors = 0;
    for (l, e) in results {
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let pct = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as u64
    };
    Load {
        rps: all.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        errors,
    }
}

async fn futures_join(
    addr: SocketAddr,
    path: Arc<str>,
    auth: Arc<str>,
    until: Instant,
) -> Vec<(Vec<u32>, u64)> {
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| tokio::spawn(worker(addr, path.clone(), auth.clone(), until)))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or_default());
    }
    out
}

/// A bare hyper server answering every request with `body`.
async fn bare_server(body: Bytes) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header(http::header::CONTENT_TYPE, "application/json")
                                .body(Full::new(body))
                                .expect("static response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() {
    let secs: u64 = std::env::var("AIRLOCK_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let moto = MotoServer::start().expect("moto_server (run scripts/setup-test-deps.sh)");
    let agent = Agent::start(AgentOptions::new(
        moto.endpoint(),
        moto.agent_access_key(),
        moto.agent_secret_key(),
    ))
    .expect("airlockd starts");
    let pid = agent.pid().expect("airlockd pid");
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss = rss_kib(pid);

    let job = agent
        .start_job(&GithubJob::production().token())
        .expect("production job starts");
    let url = job.env["AWS_CONTAINER_CREDENTIALS_FULL_URI"].clone();
    let rest = url.strip_prefix("http://").expect("http endpoint");
    let (hostport, path) = rest.split_at(rest.find('/').expect("a path"));
    let addr: SocketAddr = hostport.parse().expect("endpoint address");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // Wait for the prefetch, then take the exact bytes the agent serves.
        let mut body = Bytes::new();
        for _ in 0..100 {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
            tokio::spawn(conn);
            let req = http::Request::get(path)
                .header(http::header::HOST, hostport)
                .header(http::header::AUTHORIZATION, &job.token)
                .body(Empty::<Bytes>::new())
                .expect("request");
            let resp = s.send_request(req).await.expect("first GET");
            let ok = resp.status() == 200;
            body = resp.into_body().collect().await.expect("body").to_bytes();
            if ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(body.starts_with(b"{\"AccessKeyId\""), "the job did not get credentials: {}", String::from_utf8_lossy(&body));
        let bare = bare_server(body.clone()).await;
        let b = load(bare, path, &job.token, secs).await;
        let a = load(addr, path, &job.token, secs).await;
        println!("bare hyper : {:>9.0} req/s  p50 {:>5} us  p99 {:>5} us  errors {}", b.rps, b.p50_us, b.p99_us, b.errors);
        println!("airlockd   : {:>9.0} req/s  p50 {:>5} us  p99 {:>5} us  errors {}", a.rps, a.p50_us, a.p99_us, a.errors);

        // Memory with 32 jobs, each with cached credentials.
        let mut jobs = Vec::new();
        for _ in 0..31 {
            jobs.push(agent.start_job(&GithubJob::production().token()).expect("job starts"));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss32 = rss_kib(pid);
        println!("airlockd RSS: idle {idle_rss} KiB, with 32 jobs {rss32} KiB");
        let sandboxed = sandboxed_rss(&moto);
        println!(
            "connections={CONNECTIONS} secs={secs} agent_rps={:.0} bare_rps={:.0} ratio={:.3} agent_p50_us={} agent_p99_us={} bare_p50_us={} bare_p99_us={} agent_errors={} idle_rss_kib={idle_rss} rss_32_jobs_kib={rss32} rss_32_sandboxed_jobs_kib={sandboxed}",
            a.rps, b.rps, a.rps / b.rps, a.p50_us, a.p99_us, b.p50_us, b.p99_us, a.errors
        );
    });
}

/// As root: a second agent with `[sandbox] enabled = true` and 32 live jobs, each with its
/// cgroup, network namespace, endpoint listeners inside it and prefetched credentials
/// (`airlock job start` prepares the sandbox). Its RSS, in KiB. Target (issue 3): ≤ 64 MiB.
fn sandboxed_rss(moto: &MotoServer) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    assert!(
        root,
        "the sandboxed RSS figure needs root (make bench runs as root)"
    );
    let mut opts = AgentOptions::new(
        moto.endpoint(),
        moto.agent_access_key(),
        moto.agent_secret_key(),
    );
    opts.extra_config = format!(
        "[sandbox]\nenabled = true\nruntime_dir = \"jobs\"\nnetns_dir = \"netns\"\ncgroup_parent = \"al-bench-rss-{}\"\n[sandbox.users]\nmode = \"range\"\nfirst_uid = 2000000\nfirst_gid = 2000000\nslots = 32\n",
        std::process::id()
    );
    let mut agent = Agent::start(opts).expect("a sandboxed airlockd starts");
    let pid = agent.pid().expect("airlockd pid");
    let mut jobs = Vec::new();
    for _ in 0..32 {
        jobs.push(
            agent
                .start_job(&GithubJob::production().token())
                .expect("a sandboxed job starts"),
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss = rss_kib(pid);
    println!("sandboxed airlockd RSS with 32 live sandboxed jobs: {rss} KiB (target <= 65536)");
    let status = agent.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "the sandboxed agent did not stop cleanly: {status:?}"
    );
    rss
}
