//! `airlock-noisy-bench`: the noisy-neighbour benchmark of `make bench` (root only).
//!
//! One sandboxed `airlockd` (the binaries of `AIRLOCK_BIN_DIR`: release builds in `make
//! bench`), moto as STS and a fake upstream resolver. Two jobs of the same egress rule
//! (`*.bench.test:443` allowed): job A attacks the agent, job B is a well-behaved neighbour
//! that, from inside its own sandbox, fetches its credentials from its endpoint and resolves
//! an allowed name through its resolver, in a loop, timing each. B runs once quiet, then
//! once during each of A's attacks in turn:
//!
//! - `connections`: A holds thousands of connections to its endpoint and sends a cheap
//!   request on each every second (reopening what the agent closes);
//! - `refusals`: A floods its endpoint with bind claims, binds and wrong tokens (each a
//!   refusal the agent audits), from 8 threads;
//! - `dns`: A floods its resolver with random names under the allowed wildcard, from 8
//!   threads;
//! - `forks`: a fork bomb;
//! - `memory`: a process that allocates until the job's memory limit kills it, again and
//!   again.
//!
//! Printed for each: B's credential and lookup p99 (and B's quiet p99 measured just before
//! that attack, the reference: a shared machine's load drifts), B's errors, the agent's descriptors and RSS at most during the attack (A's cost:
//! their rise over the quiet figures), and the audit lines A's job added per minute. The
//! targets (issue 10): B's p99 ≤ 2× quiet and no error under every attack; the agent's
//! descriptors and RSS bounded by the documented per-job caps; A's audit growth bounded.
//! The last line is `key=value` pairs.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_tests::agent::Policies;
use airlock_tests::fakedns::{FakeDns, Zone};
use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;
use serde_json::Value;

/// The allowed name B resolves, answered by the fake upstream.
const NAME: &str = "victim.bench.test";
/// How long B measures, quiet and under each attack.
const MEASURE: Duration = Duration::from_secs(8);
/// Quiet and attacked windows per attack, in turn.
const ROUNDS: usize = 3;
/// How long an attack runs before B starts measuring.
const RAMP: Duration = Duration::from_secs(4);
/// The pause after an attack's job ends, before B's next quiet reference.
const SETTLE: Duration = Duration::from_secs(3);

const POLICY: &str = r#"
[egress]
baseline = []

[[rule]]
name = "bench"
[rule.match]
provider = "github"
repository = "acme/web"
[[rule.grant]]
alias = "deploy"
role_arn = "arn:aws:iam::123456789012:role/web-prod-deploy"
duration = "1h"
[rule.sandbox]
pids = 256
memory = "256M"
[rule.egress]
allow = ["*.bench.test:443"]
"#;

/// B's loop, inside its sandbox: a credential GET on a new connection (as botocore does)
/// and an A lookup, each timed, every 2 ms, for ARGV[1] seconds.
const PROBE: &str = r#"
import json, os, random, socket, struct, sys, time
dur = float(sys.argv[1]); name = sys.argv[2]
tok = open(os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]).read().strip()
host = "169.254.170.2"
cred, dns, errors = [], [], []
def get_creds():
    s = socket.create_connection((host, 80), timeout=5)
    s.sendall(("GET /v1/credentials HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\nConnection: close\r\n\r\n" % (host, tok)).encode())
    data = b""
    while True:
        b = s.recv(65536)
        if not b: break
        data += b
    s.close()
    if not data.startswith(b"HTTP/1.1 200"): raise Exception(data[:60])
def lookup():
    q = struct.pack(">HHHHHH", random.randrange(65536), 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    s.sendto(q, ("169.254.170.53", 53)); r = s.recv(4096); s.close()
    if r[3] & 0xf: raise Exception("rcode %d" % (r[3] & 0xf))
end = time.monotonic() + dur
while time.monotonic() < end:
    for kind, f, out in (("cred", get_creds, cred), ("dns", lookup, dns)):
        t = time.monotonic()
        try:
            f(); out.append(int((time.monotonic() - t) * 1e6))
        except Exception as e:
            errors.append("%s: %s" % (kind, str(e)[:100]))
    time.sleep(0.002)
print("PROBE " + json.dumps({"cred": cred, "dns": dns, "errors": errors}), flush=True)
"#;

const ATTACK_CONNECTIONS: &str = r#"
import resource, socket, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
N = 4000
socks = []
def conn():
    s = socket.create_connection(("169.254.170.2", 80), timeout=2); s.settimeout(2); return s
while True:
    while len(socks) < N:
        try: socks.append(conn())
        except Exception: break
    for s in list(socks):
        try:
            s.sendall(b"GET /nothing-here HTTP/1.1\r\nHost: 169.254.170.2\r\n\r\n"); s.recv(4096)
        except Exception:
            socks.remove(s); s.close()
    print("ATTACK holding %d" % len(socks), flush=True)
    time.sleep(1)
"#;

const ATTACK_REFUSALS: &str = r#"
import os, socket, threading
tok = open(os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]).read().strip()
reqs = [
    "POST /v1/bind/claim HTTP/1.1\r\nHost: 169.254.170.2\r\nAuthorization: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % tok,
    "POST /v1/bind HTTP/1.1\r\nHost: 169.254.170.2\r\nAuthorization: %s\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}" % tok,
    "GET /v1/credentials HTTP/1.1\r\nHost: 169.254.170.2\r\nAuthorization: wrong-token\r\nConnection: close\r\n\r\n",
]
def flood(i):
    while True:
        try:
            s = socket.create_connection(("169.254.170.2", 80), timeout=2)
            s.sendall(reqs[i % 3].encode()); s.recv(4096); s.close()
        except Exception:
            pass
        i += 1
for i in range(8): threading.Thread(target=flood, args=(i,), daemon=True).start()
print("ATTACK refusals", flush=True)
threading.Event().wait()
"#;

const ATTACK_DNS: &str = r#"
import os, random, socket, string, struct, threading
def flood():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.05)
    while True:
        label = "".join(random.choice(string.ascii_lowercase) for _ in range(12))
        q = struct.pack(">HHHHHH", random.randrange(65536), 0x0100, 1, 0, 0, 0)
        q += b"".join(bytes([len(l)]) + l.encode() for l in (label, "flood", "bench", "test")) + b"\0" + struct.pack(">HH", 1, 1)
        try:
            s.sendto(q, ("169.254.170.53", 53)); s.recv(4096)
        except Exception:
            pass
for _ in range(8): threading.Thread(target=flood, daemon=True).start()
print("ATTACK dns", flush=True)
threading.Event().wait()
"#;

const ATTACK_FORKS: &str = "echo ATTACK forks; b() { b | b & }; b; sleep 100000";

const ATTACK_MEMORY: &str = "echo ATTACK memory; while true; do python3 -c 'a = []\nwhile True: a.append(bytearray(64 << 20))' 2>/dev/null; done";

type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock-noisy-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The agent's CPU time so far (user + system), in clock ticks.
fn agent_cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.get(s.rfind(')')? + 2..)?.to_string();
            let f: Vec<&str> = rest.split(' ').collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// The agent's open descriptors and RSS (KiB) now.
fn agent_cost(pid: u32) -> (u64, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    (fds, rss)
}

/// Samples the agent's cost every 100 ms until stopped; returns the highest of each.
struct Sampler {
    stop: Arc<AtomicBool>,
    fds: Arc<AtomicU64>,
    rss: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let fds = Arc::new(AtomicU64::new(0));
        let rss = Arc::new(AtomicU64::new(0));
        let (s, f, r) = (stop.clone(), fds.clone(), rss.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let (a, b) = agent_cost(pid);
                f.fetch_max(a, Ordering::Relaxed);
                r.fetch_max(b, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler {
            stop,
            fds,
            rss,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.fds.load(Ordering::Relaxed),
            self.rss.load(Ordering::Relaxed),
        )
    }
}

/// A job running `argv` with `airlock run`, in the background; its job id from the CLI's
/// first line.
struct Background {
    child: Child,
    job: String,
}

fn start_background(stack: &Stack, token_file: &Path, argv: &[&str]) -> Res<Background> {
    let mut child = Command::new(airlock_tests::paths::bin("airlock"))
        .arg("--config")
        .arg(stack.agent.config_path())
        .arg("run")
        .arg("--oidc-token-file")
        .arg(token_file)
        .arg("--")
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("airlock run: {e}"))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("airlock: job ") {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
        }
    });
    let job = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| "the attacking job did not start".to_string())?;
    Ok(Background { child, job })
}

/// B's probe: its credential and lookup times (µs) and its errors.
#[derive(Default)]
struct Probe {
    cred: Vec<u64>,
    dns: Vec<u64>,
    errors: Vec<String>,
}

/// One measurement of B: its probe run in B's existing sandbox (`airlock job exec`), so
/// every run is the same long-lived job, its credentials cached and its name admitted.
fn probe(stack: &Stack, b_job: &str) -> Res<Probe> {
    let out = stack.agent.cli(&[
        "job",
        "exec",
        b_job,
        "--",
        "/usr/bin/python3",
        "-c",
        PROBE,
        &MEASURE.as_secs().to_string(),
        NAME,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PROBE "))
        .ok_or_else(|| {
            format!(
                "the probe printed no result ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let v: Value = serde_json::from_str(line).map_err(|e| format!("probe output: {e}"))?;
    let nums = |k: &str| -> Vec<u64> {
        v[k].as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    };
    Ok(Probe {
        cred: nums("cred"),
        dns: nums("dns"),
        errors: v["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

impl Probe {
    fn add(&mut self, more: Probe) {
        self.cred.extend(more.cred);
        self.dns.extend(more.dns);
        self.errors.extend(more.errors);
    }
}

fn p99(v: &[u64]) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    s[((s.len() - 1) * 99) / 100]
}

fn run() -> Res<()> {
    if !airlock_tests::prereq::is_root() {
        return Err("needs root (sandboxed jobs): run it through `make bench` as root".into());
    }
    let dns = FakeDns::start(Zone::default().a(NAME, [203, 0, 113, 10].into(), 300));
    let stack = Stack::sandboxed_with(
        &format!("[egress]\nupstreams = [\"{}\"]\n", dns.addr),
        Policies::Files(vec![("10-bench.toml".into(), POLICY.into())]),
    );
    let pid = stack.agent.pid().ok_or("the agent has no pid")?;
    let who = |n: u64| GithubJob::production().with_run_id(9_800_000 + n).token();
    let b = stack
        .agent
        .start_job(&who(1))
        .map_err(|e| format!("job B did not start: {e}"))?;
    let b_job = b.job_id;

    // Warm-up (first fetch from STS, first admission).
    probe(&stack, &b_job)?;
    let (fds0, rss0) = agent_cost(pid);
    let mut kv = Vec::new();
    let mut quiet_cred = Vec::new();
    let mut quiet_dns = Vec::new();
    let mut worst = 0f64;
    let mut b_errors = 0;
    let attacks: [(&str, Vec<&str>); 5] = [
        (
            "connections",
            vec!["/usr/bin/python3", "-c", ATTACK_CONNECTIONS],
        ),
        ("refusals", vec!["/usr/bin/python3", "-c", ATTACK_REFUSALS]),
        ("dns", vec!["/usr/bin/python3", "-c", ATTACK_DNS]),
        ("forks", vec!["/bin/bash", "-c", ATTACK_FORKS]),
        ("memory", vec!["/bin/bash", "-c", ATTACK_MEMORY]),
    ];
    for (i, (name, argv)) in attacks.iter().enumerate() {
        // B alone, then B beside the attack, ROUNDS times in turn: both reference and
        // attack see the same drift of a shared machine, and each p99 comes from every
        // round's samples together.
        let (mut quiet, mut under) = (Probe::default(), Probe::default());
        let (mut fds, mut rss, mut cpu_ticks, mut secs, mut a_lines) = (0, 0, 0, 0.0, 0);
        for round in 0..ROUNDS {
            // Whatever the last attack left (its wipe's background reclaim) settles first.
            std::thread::sleep(SETTLE);
            quiet.add(probe(&stack, &b_job)?);
            let a_token = stack
                .agent
                .token_file(&who(10 + (i * ROUNDS + round) as u64));
            let mut a = start_background(&stack, &a_token, argv)?;
            std::thread::sleep(RAMP);
            let sampler = Sampler::start(pid);
            let before = audit_lines(&stack, &a.job);
            let cpu0 = agent_cpu_ticks(pid);
            let t0 = Instant::now();
            let result = probe(&stack, &b_job);
            secs += t0.elapsed().as_secs_f64();
            cpu_ticks += agent_cpu_ticks(pid).saturating_sub(cpu0);
            a_lines += audit_lines(&stack, &a.job).saturating_sub(before);
            let (f, r) = sampler.finish();
            (fds, rss) = (fds.max(f), rss.max(r));
            // End A: its cgroup is killed, whatever it did to its signals.
            let _ = stack.agent.end_job(&a.job);
            let _ = a.child.wait();
            under.add(result?);
        }
        let (qc, qd) = (p99(&quiet.cred), p99(&quiet.dns));
        quiet_cred.push(qc);
        quiet_dns.push(qd);
        b_errors += quiet.errors.len();
        let r = under;
        let (c, d) = (p99(&r.cred), p99(&r.dns));
        // Clock ticks are 100 a second on Linux (USER_HZ).
        let cpu_pct = cpu_ticks as f64 / secs;
        let per_min = a_lines as f64 * 60.0 / secs;
        let (rc, rd) = (c as f64 / qc.max(1) as f64, d as f64 / qd.max(1) as f64);
        worst = worst.max(rc).max(rd);
        b_errors += r.errors.len();
        println!(
            "{name}: B's credential GET p99 {c} µs ({rc:.2}× its quiet {qc} µs in the same rounds), lookup p99 {d} µs ({rd:.2}× {qd} µs), {} errors{}; agent at most {fds} descriptors (+{}), RSS {rss} KiB (+{}), CPU {cpu_pct:.0}% of a core; A's audit {per_min:.0} lines/min",
            r.errors.len(),
            r.errors
                .first()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default(),
            fds.saturating_sub(fds0),
            rss.saturating_sub(rss0),
        );
        kv.push(format!("{name}_cred_p99_us={c}"));
        kv.push(format!("{name}_dns_p99_us={d}"));
        kv.push(format!("{name}_quiet_cred_p99_us={qc}"));
        kv.push(format!("{name}_quiet_dns_p99_us={qd}"));
        kv.push(format!("{name}_ratio={:.3}", rc.max(rd)));
        kv.push(format!("{name}_errors={}", r.errors.len()));
        kv.push(format!("{name}_agent_fds_max={fds}"));
        kv.push(format!("{name}_agent_rss_kib_max={rss}"));
        kv.push(format!("{name}_audit_lines_per_min={per_min:.0}"));
        kv.push(format!("{name}_agent_cpu_pct={cpu_pct:.0}"));
    }
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let (mq_cred, mq_dns) = (median(&mut quiet_cred), median(&mut quiet_dns));
    println!(
        "quiet (median of the {} references): B's credential GET p99 {mq_cred} µs, lookup p99 {mq_dns} µs; agent {fds0} descriptors, RSS {rss0} KiB",
        quiet_cred.len()
    );
    kv.splice(
        0..0,
        [
            format!("quiet_cred_p99_us={mq_cred}"),
            format!("quiet_dns_p99_us={mq_dns}"),
            format!("quiet_agent_fds={fds0}"),
            format!("quiet_agent_rss_kib={rss0}"),
        ],
    );
    let ok = worst <= 2.0 && b_errors == 0;
    println!(
        "worst p99 under attack: {worst:.2}× quiet (target <= 2.0), B's errors {b_errors} (target 0): {}",
        if ok { "met" } else { "NOT met" }
    );
    kv.push(format!("worst_p99_ratio={worst:.3}"));
    kv.push(format!("b_errors={b_errors}"));
    println!("{}", kv.join(" "));
    Ok(())
}

/// Audit records of `job` so far.
fn audit_lines(stack: &Stack, job: &str) -> usize {
    stack
        .agent
        .audit_records()
        .iter()
        .filter(|r| r["job"] == job)
        .count()
}
