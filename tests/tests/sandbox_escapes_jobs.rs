//! Escapes between sandboxed jobs and across a job's end: the host's real metadata service,
//! a concurrent job's endpoint, processes, files and mounts, a background process that
//! outlives the job, files left for the next job, a wiped job's tmpfs kept alive, fork
//! bombs, memory exhaustion and a full tmpfs, an agent killed mid-job, and 16 jobs fetching
//! credentials at once. Each test asserts the specific
//! failure (errno, status code, the exact absence), never only a non-zero exit.
//!
//! Tests run as root. Whatever a test makes on the host (a dummy link, a live job) is
//! removed by a Drop guard, also when the test fails.

use airlock_tests::agent::{Agent, HOST_AWS_VARS};
use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The job's Python (Debian's): the caller's PATH may start with a pyenv shim under the
/// hidden `/root`.
const PY: &str = "/usr/bin/python3";

/// Python helpers every probe starts with: `conn` answers how a TCP connect ended, by errno
/// name (or `connected:<first bytes of the answer>`), `err` an OSError's errno name.
const PY_PRELUDE: &str = r#"
import errno, os, socket, sys
def err(e):
    return errno.errorcode.get(e.errno, str(e.errno))
def conn(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((host, port))
        s.sendall(b"GET / HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
        data = s.recv(4096)
        return "connected:" + data.decode(errors="replace").replace("\r", " ").replace("\n", " ")[:300]
    except TimeoutError:
        return "timeout"
    except OSError as e:
        return err(e)
    finally:
        s.close()
"#;

/// A shell fragment that writes `body` (a Python program after [`PY_PRELUDE`]) to `file`.
fn py_file(file: &str, body: &str) -> String {
    format!("cat > {file} <<'PYEOF'\n{PY_PRELUDE}\n{body}\nPYEOF\n")
}

// ---------------------------------------------------------------------------------------
// Helpers: jobs, audit, /proc, cgroups.
// ---------------------------------------------------------------------------------------

/// A per-test nonce for markers, so parallel tests never see each other's.
fn nonce() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}x{t:08x}", std::process::id())
}

/// The job id `airlock run` printed on stderr (`airlock: job j-… (rule …`).
fn job_id_in(stderr: &str) -> Option<String> {
    let at = stderr.find("airlock: job j-")? + "airlock: job ".len();
    let id: String = stderr[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    (id.len() > 2).then_some(id)
}

fn out_text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

use airlock_tests::kv;

fn record(agent: &Agent, event: &str, job: &str) -> Option<Value> {
    agent
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == event && r["job"] == job)
}

/// The access key ids the agent issued to `job`, from its `credentials_issued` records.
fn issued_keys(agent: &Agent, job: &str) -> BTreeSet<String> {
    agent
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "credentials_issued" && r["job"] == job)
        .filter_map(|r| r["access_key_id"].as_str().map(str::to_owned))
        .collect()
}

/// The job's `sandbox` fields from its `job_started` record (uid, slot, netns, cgroup,
/// network, job_addr for outbound jobs, limits).
fn sandbox_of(agent: &Agent, job: &str) -> Value {
    match record(agent, "job_started", job) {
        Some(r) if r["sandbox"].is_object() => r["sandbox"].clone(),
        other => panic!(
            "no job_started record with a sandbox for {job}: {other:?}\naudit: {:?}",
            agent.audit_records()
        ),
    }
}

/// The `job_wiped` record of `job`, waiting a little: `airlock run` may return while the
/// agent still writes it.
fn wiped_record(agent: &Agent, job: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(r) = record(agent, "job_wiped", job) {
            return r;
        }
        if Instant::now() > deadline {
            panic!(
                "no job_wiped record for {job}; audit: {:?}\nagent log:\n{}",
                agent.audit_records(),
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Debug, Clone)]
struct Proc {
    pid: u32,
    uid: u32,
    cmdline: String,
    cgroup: String,
    start: u64,
    /// `R`, `S`, `Z`, ... from `/proc/<pid>/stat`.
    state: char,
}

/// Every process on the host (zombies have an empty cmdline and no cgroup).
fn procs() -> Vec<Proc> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let dir = e.path();
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok())
            .unwrap_or(u32::MAX);
        let cmdline = std::fs::read(dir.join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let cgroup = std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        // Fields after the name start at field 3 (state); starttime is field 22.
        let after: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, a)| a.split_whitespace().collect())
            .unwrap_or_default();
        let state = after.first().and_then(|s| s.chars().next()).unwrap_or('?');
        let start = after.get(19).and_then(|s| s.parse().ok()).unwrap_or(0);
        v.push(Proc {
            pid,
            uid,
            cmdline,
            cgroup,
            start,
            state,
        });
    }
    v
}

/// `Shmem` of the host's /proc/meminfo in bytes: what its tmpfs mounts hold.
fn shmem_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Shmem:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .expect("a Shmem line in /proc/meminfo")
}

/// The mount table of every mount namespace on the host: `(a pid in it, its mountinfo)`.
fn all_mount_tables() -> Vec<(u32, String)> {
    let mut seen = BTreeSet::new();
    let mut tables = Vec::new();
    for p in procs() {
        let Ok(ns) = std::fs::read_link(format!("/proc/{}/ns/mnt", p.pid)) else {
            continue;
        };
        if seen.insert(ns) {
            if let Ok(t) = std::fs::read_to_string(format!("/proc/{}/mountinfo", p.pid)) {
                tables.push((p.pid, t));
            }
        }
    }
    tables
}

/// Leaves out zombies: a killed process that its parent has not reaped yet runs nothing
/// and holds nothing but its pid (the kernel has already taken it out of its cgroup).
fn running(v: Vec<Proc>) -> Vec<Proc> {
    v.into_iter().filter(|p| p.state != 'Z').collect()
}

/// Host processes in any cgroup of `job`.
fn procs_of_job(job: &str) -> Vec<Proc> {
    let leaf = format!("/job-{job}");
    procs()
        .into_iter()
        .filter(|p| p.cgroup.lines().any(|l| l.ends_with(&leaf)))
        .collect()
}

fn procs_with(marker: &str) -> Vec<Proc> {
    procs()
        .into_iter()
        .filter(|p| p.cmdline.contains(marker))
        .collect()
}

/// Every directory of the job's cgroups that exists, in v2 and in every v1 hierarchy,
/// given the v2 path from its `job_started` record.
fn job_cgroup_dirs(v2: &Path) -> Vec<PathBuf> {
    let (Some(leaf), Some(parent)) = (
        v2.file_name(),
        v2.parent().and_then(Path::file_name).map(PathBuf::from),
    ) else {
        panic!("unexpected cgroup path {}", v2.display());
    };
    let mut found = Vec::new();
    if v2.exists() {
        found.push(v2.to_path_buf());
    }
    let root = Path::new("/sys/fs/cgroup");
    let mut tops = vec![root.to_path_buf()];
    tops.extend(
        std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir()),
    );
    for top in tops {
        let d = top.join(&parent).join(leaf);
        if d.is_dir() && !found.contains(&d) {
            found.push(d);
        }
    }
    found
}

/// Every `job-*` group under the agent's cgroup parent, in any hierarchy.
fn job_groups_under_parent(parent_name: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut tops = vec![root.to_path_buf()];
    tops.extend(
        std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir()),
    );
    let mut v = Vec::new();
    for top in tops {
        for e in std::fs::read_dir(top.join(parent_name))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with("job-") && e.path().is_dir() {
                v.push(e.path());
            }
        }
    }
    v
}

/// `key N` from the first of `dirs` holding `file` (e.g. `pids.events`, `max`).
fn cgroup_counter(dirs: &[PathBuf], file: &str, key: &str) -> Option<u64> {
    dirs.iter().find_map(|d| {
        std::fs::read_to_string(d.join(file))
            .ok()?
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(char::is_whitespace)?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
    })
}

/// Host links whose alias names `job`.
fn links_of_job(job: &str) -> Vec<String> {
    let alias = format!("airlock job {job}");
    std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("ifalias")).is_ok_and(|a| a.trim() == alias)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Polls the agent's `/healthz` every 50 ms until dropped; counts the answers that were
/// not 200.
struct HealthWatch<'a> {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    polls: Arc<AtomicUsize>,
    scope_handle: Option<std::thread::ScopedJoinHandle<'a, ()>>,
}

impl<'a> HealthWatch<'a> {
    fn start<'env>(s: &'a std::thread::Scope<'a, 'env>, agent: &'env Agent) -> HealthWatch<'a> {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let polls = Arc::new(AtomicUsize::new(0));
        let (st, fl, pl) = (stop.clone(), failures.clone(), polls.clone());
        let h = s.spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let t = Instant::now();
                match agent.healthz() {
                    Some(200) => {}
                    other => fl
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("{other:?} after {:?}", t.elapsed())),
                }
                pl.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        HealthWatch {
            stop,
            failures,
            polls,
            scope_handle: Some(h),
        }
    }

    /// Stops polling: `(polls, failures)`.
    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.scope_handle.take() {
            let _ = h.join();
        }
        let f = self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (self.polls.load(Ordering::Relaxed), f)
    }
}

impl Drop for HealthWatch<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `airlock run -- /bin/sh -c SCRIPT` as a child process, with its stdin, stdout and stderr
/// in the test's hands. Dropping it ends the job through the agent (`airlock job end`)
/// and then kills the CLI, so a failing test leaves no job behind.
struct LiveJob {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    job_id: String,
    config: PathBuf,
}

impl LiveJob {
    fn start(agent: &Agent, token: &str, script: &str) -> LiveJob {
        let file = agent.token_file(token);
        let airlock = airlock_tests::paths::bin("airlock");
        let mut cmd = Command::new(&airlock);
        cmd.arg("--config")
            .arg(agent.config_path())
            .arg("run")
            .arg("--oidc-token-file")
            .arg(&file)
            .args(["--", "/bin/sh", "-c", script]);
        for v in HOST_AWS_VARS {
            cmd.env_remove(v);
        }
        let mut child = match cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!("cannot run {}: {e}", airlock.display()),
        };
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let all = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                all.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(line.clone());
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let e2 = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                e2.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut job = LiveJob {
            child: Some(child),
            stdin,
            lines: rx,
            stdout,
            stderr,
            job_id: String::new(),
            config: agent.config_path().to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(id) = job_id_in(&job.stderr_text()) {
                job.job_id = id;
                return job;
            }
            let exited = job.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "`airlock run` did not start the job ({exited:?}); stderr: {}\nagent log:\n{}",
                    job.stderr_text(),
                    agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn stdout_text(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    /// Everything the job printed so far, for failure messages.
    fn transcript(&self) -> String {
        format!(
            "job {} stdout:\n{}\nstderr:\n{}",
            self.job_id,
            self.stdout_text(),
            self.stderr_text()
        )
    }

    /// The next stdout line that starts with `prefix` (earlier lines are skipped), or
    /// `None` if the job's stdout ended or `limit` passed first.
    fn wait_line(&self, prefix: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return Some(l),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Writes a line to the job's stdin (the job's `read` returns).
    fn release(&mut self) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(b"go\n");
            let _ = stdin.flush();
        }
    }

    /// Waits for `airlock run` to exit.
    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                // Let the reader threads take the last output.
                std::thread::sleep(Duration::from_millis(100));
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LiveJob {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // The agent wipes the job (cgroup.kill); the CLI then sees the shim exit.
        let _ = Command::new(airlock_tests::paths::bin("airlock"))
            .arg("--config")
            .arg(&self.config)
            .args(["job", "end", &self.job_id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Runs `/bin/sh -c script` as a sandboxed job to its end: `(job id, stdout, stderr,
/// exit status)`.
fn run_job(stack: &Stack, who: &GithubJob, script: &str) -> (String, String, String, Output) {
    let out = stack.run_sh(&who.token(), script);
    let (stdout, stderr) = out_text(&out);
    let Some(id) = job_id_in(&stderr) else {
        panic!(
            "`airlock run` started no job: {}\nstdout: {stdout}\nstderr: {stderr}\nagent log:\n{}",
            out.status,
            stack.agent.log()
        );
    };
    (id, stdout, stderr, out)
}

/// A job that fetches its default credentials through the container endpoint: its access
/// key id, asserting that it got one.
fn fetch_credentials_in_a_job(stack: &Stack, who: &GithubJob) -> (String, String) {
    let (id, stdout, stderr, out) = run_job(
        stack,
        who,
        r#"curl -sS --max-time 20 -H "Authorization: $(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")" "$AWS_CONTAINER_CREDENTIALS_FULL_URI""#,
    );
    assert!(
        out.status.success() && stdout.starts_with("{\"AccessKeyId\":\"ASIA"),
        "a concurrent job got no credentials ({}): stdout: {stdout}\nstderr: {stderr}\nagent log:\n{}",
        out.status,
        stack.agent.log()
    );
    let v: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    let key = v["AccessKeyId"].as_str().unwrap_or_default().to_string();
    assert!(
        issued_keys(&stack.agent, &id).contains(&key),
        "the concurrent job {id} got {key}, which the audit does not show as issued to it"
    );
    (id, key)
}

// ---------------------------------------------------------------------------------------
// A fake of the host's real metadata service.
// ---------------------------------------------------------------------------------------

const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const HOST_ANSWER: &str = "HOST-METADATA";

fn ip(args: &[&str]) -> Output {
    match Command::new("ip").args(args).stdin(Stdio::null()).output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run `ip {}`: {e}", args.join(" ")),
    }
}

/// A dummy link `al-md<pid % 1000>` (a veth pair where the kernel has no dummy module) in
/// the host's namespace holding 169.254.169.254/32,
/// with an HTTP server on it answering `HOST-METADATA` on port 8169 (or a free one) and on
/// port 80 when that is free. Dropping it stops the servers and deletes the link, and with
/// it the address.
struct FakeHostMetadata {
    link: String,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    /// The high port (8169 unless taken) and, if it was free, 80.
    ports: Vec<u16>,
}

impl FakeHostMetadata {
    fn start() -> FakeHostMetadata {
        let link = format!("al-md{}", std::process::id() % 1000);
        // A leftover of an earlier run of this test that had the same pid.
        let _ = ip(&["link", "del", &link]);
        let mut me = FakeHostMetadata {
            link: link.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            ports: Vec::new(),
        };
        // A dummy link where the kernel has the module, else a veth pair whose both ends
        // stay in the host's namespace (the peer goes away with the link).
        let peer = format!("{link}p");
        let made = ip(&["link", "add", &link, "type", "dummy"]);
        let mut steps = Vec::new();
        if !made.status.success() {
            steps.push(vec![
                "link", "add", &link, "type", "veth", "peer", "name", &peer,
            ]);
            steps.push(vec!["link", "set", &peer, "up"]);
        }
        steps.push(vec!["addr", "add", "169.254.169.254/32", "dev", &link]);
        steps.push(vec!["link", "set", &link, "up"]);
        for args in steps {
            let out = ip(&args);
            assert!(
                out.status.success(),
                "`ip {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let high = TcpListener::bind((METADATA_IP, 8169))
            .or_else(|_| TcpListener::bind((METADATA_IP, 0)))
            .unwrap_or_else(|e| panic!("cannot bind the fake metadata server: {e}"));
        let mut listeners = vec![high];
        if let Ok(l) = TcpListener::bind((METADATA_IP, 80)) {
            listeners.push(l);
        }
        for l in listeners {
            let port = l.local_addr().map(|a| a.port()).unwrap_or_default();
            me.ports.push(port);
            l.set_nonblocking(true).expect("non-blocking listener");
            let stop = me.stop.clone();
            me.servers.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                            let mut buf = [0u8; 2048];
                            let _ = s.read(&mut buf);
                            let _ = write!(
                                s,
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{HOST_ANSWER}",
                                HOST_ANSWER.len()
                            );
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }));
        }
        me
    }

    /// What the host itself gets from the fake on `port`: proof that it is up.
    fn answer_from_host(&self, port: u16) -> String {
        let mut s =
            match TcpStream::connect_timeout(&(METADATA_IP, port).into(), Duration::from_secs(5)) {
                Ok(s) => s,
                Err(e) => return format!("connect: {e}"),
            };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(b"GET / HTTP/1.0\r\nHost: 169.254.169.254\r\n\r\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    }
}

impl Drop for FakeHostMetadata {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.servers.drain(..) {
            let _ = h.join();
        }
        let _ = ip(&["link", "del", &self.link]);
        // Never leave 169.254.169.254 on the host: say so loudly if it is still there.
        let left = ip(&["-4", "-o", "addr", "show", "dev", &self.link]);
        if left.status.success() && !left.stdout.is_empty() {
            eprintln!(
                "WARNING: {} still holds {}",
                self.link,
                String::from_utf8_lossy(&left.stdout)
            );
        }
    }
}

#[test]
fn a_job_reaches_only_its_own_metadata_endpoint_never_the_hosts() {
    // Production runs outbound here: the mode with a route off the job's namespace.
    let stack = Stack::sandboxed_outbound_production("");
    let fake = FakeHostMetadata::start();
    let high = fake.ports[0];
    for &p in &fake.ports {
        let a = fake.answer_from_host(p);
        assert!(
            a.contains(HOST_ANSWER),
            "the fake host metadata server on port {p} does not answer the host itself: {a}"
        );
    }
    let ports: Vec<String> = fake.ports.iter().map(u16::to_string).collect();
    let script = format!(
        r#"code=$(curl -s -o /tmp/body -w '%{{http_code}}' http://169.254.169.254/latest/meta-data/iam/security-credentials/)
echo "imds_unauth_status=$code"
echo "imds_unauth_body=$(tr '\n' ' ' < /tmp/body)"
t=$(curl -sS -X PUT -H 'x-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
echo "imds_roles=$(curl -sS -H "x-aws-ec2-metadata-token: $t" http://169.254.169.254/latest/meta-data/iam/security-credentials/ | tr '\n' ' ')"
{py}{PY} /tmp/probe.py {ports}
"#,
        py = py_file(
            "/tmp/probe.py",
            r#"for p in sys.argv[1:]:
    print(f"port_{p}=" + conn("169.254.169.254", int(p)))"#,
        ),
        ports = ports.join(" "),
    );
    let (id, stdout, stderr, out) = run_job(&stack, &GithubJob::production(), &script);
    let had_port_80 = fake.ports.len() > 1;
    drop(fake);
    let k = kv(&stdout);
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        out.status.success(),
        "job {id} failed: {}\n{ctx}",
        out.status
    );
    assert!(
        !stdout.contains(HOST_ANSWER),
        "the job reached the host's metadata service:\n{ctx}"
    );
    // The job's own IMDS emulation answers at 169.254.169.254:80: 401 without a token...
    assert_eq!(
        k.get("imds_unauth_status").map(String::as_str),
        Some("401"),
        "{ctx}"
    );
    // ...and its own role with one.
    assert_eq!(
        k.get("imds_roles").map(String::as_str),
        Some("deploy"),
        "{ctx}"
    );
    // The host's port: nothing listens on 169.254.169.254 in the job's namespace but the
    // agent's endpoint, so the connect is refused there and never leaves it.
    assert_eq!(
        k.get(&format!("port_{high}")).map(String::as_str),
        Some("ECONNREFUSED"),
        "{ctx}"
    );
    if had_port_80 {
        let p80 = k.get("port_80").cloned().unwrap_or_default();
        assert!(
            p80.starts_with("connected:HTTP/1.0 404")
                && p80.contains(r#"{"Code":"NotFound","Message":"no such path"}"#)
                && !p80.contains(HOST_ANSWER),
            "port 80 must be the job's own endpoint: {p80}\n{ctx}"
        );
    }
    let wiped = wiped_record(&stack.agent, &id);
    assert_eq!(wiped["leftovers"], serde_json::json!([]), "{wiped}");
}

// ---------------------------------------------------------------------------------------
// A concurrent job.
// ---------------------------------------------------------------------------------------

/// Job A: writes markers into its /tmp and $HOME, prints its endpoint token, then waits
/// (`sleep 30` in the background) until the test lets it go. Its processes carry a marker
/// in their command line that its script never spells out whole.
struct JobA {
    job: LiveJob,
    token: String,
    marker: String,
    /// A's own (unprivileged) processes, seen from the host.
    pids: Vec<Proc>,
    job_addr: Ipv4Addr,
    uid: u64,
}

fn start_job_a(stack: &Stack) -> JobA {
    let n = nonce();
    let (m1, m2) = ("amark", format!("-{n}"));
    let marker = format!("{m1}{m2}");
    let script = format!(
        r#"m={m1}; m="$m{m2}"
echo "secret of A" > /tmp/al-a-marker
echo "secret of A" > "$HOME/al-a-marker"
/bin/sh -c "sleep 30; : $m" &
echo "token=$(cat /run/airlock/token)"
echo "ready"
read _
kill $! 2>/dev/null
exit 0
"#
    );
    let job = LiveJob::start(&stack.agent, &GithubJob::production().token(), &script);
    assert!(
        job.wait_line("ready", Duration::from_secs(30)).is_some(),
        "job A did not start\n{}\nagent log:\n{}",
        job.transcript(),
        stack.agent.log()
    );
    let token = kv(&job.stdout_text())
        .get("token")
        .cloned()
        .unwrap_or_default();
    assert!(
        token.len() >= 16
            && token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
        "job A's token is not a plain token: {token:?}\n{}",
        job.transcript()
    );
    let sb = sandbox_of(&stack.agent, &job.job_id);
    let uid = sb["uid"].as_u64().unwrap_or_default();
    let job_addr: Ipv4Addr = sb["job_addr"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no job_addr in {sb}"));
    // The marked process must exist before anyone looks for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let pids = loop {
        let mine: Vec<Proc> = procs_of_job(&job.job_id)
            .into_iter()
            .filter(|p| u64::from(p.uid) == uid)
            .collect();
        if mine.iter().any(|p| p.cmdline.contains(&marker)) {
            break mine;
        }
        assert!(
            Instant::now() < deadline,
            "job A's marked process never appeared in its cgroup: {mine:?}\n{}",
            job.transcript()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    JobA {
        job,
        token,
        marker,
        pids,
        job_addr,
        uid,
    }
}

#[test]
fn a_job_cannot_reach_a_concurrent_jobs_endpoint_processes_or_files() {
    // A (production) is an outbound job, so it has an address and a link to the host;
    // B (staging) is endpoint-only.
    let stack = Stack::sandboxed_outbound_production("");
    let mut a = start_job_a(&stack);
    let a_pids: Vec<String> = a.pids.iter().map(|p| p.pid.to_string()).collect();
    let host_end = Ipv4Addr::from(u32::from(a.job_addr) - 1);
    let (half1, half2) = a.marker.split_at(3);
    let script = format!(
        r#"{py}{PY} /tmp/probe.py {addr} {host_end} {pids} {half1} {half2}
echo "own_token_is_a=$( [ "$(cat /run/airlock/token)" = '{token}' ] && echo yes || echo no)"
echo "a_token_status=$(curl -s -o /tmp/b -w '%{{http_code}}' -H 'Authorization: {token}' http://169.254.170.2/v1/credentials)"
echo "a_token_body=$(tr '\n' ' ' < /tmp/b)"
echo "own_creds=$(curl -s -H "Authorization: $(cat /run/airlock/token)" http://169.254.170.2/v1/credentials | cut -c1-20)"
"#,
        py = py_file(
            "/tmp/probe.py",
            r#"addr, host_end, pids, marker = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4] + sys.argv[5]
print("a_job_addr=" + conn(addr, 80))
print("a_host_end=" + conn(host_end, 80))
mine = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print("proc_count=" + str(len(mine)))
print("proc_has_pid1=" + ("yes" if 1 in mine else "no"))
print("a_pids_visible=" + ",".join(p for p in pids if int(p) in mine))
seen = []
for p in mine:
    try:
        if marker in open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace"):
            seen.append(str(p))
    except OSError:
        pass
print("a_marker_seen=" + ",".join(seen))
for f in ("/tmp/al-a-marker", "/home/job/al-a-marker", f"/proc/{pids[0]}/root/tmp/al-a-marker", f"/proc/{pids[0]}/environ"):
    try:
        data = open(f, "rb").read()
        print(f"read {f}=READ:{data[:40]!r}")
    except OSError as e:
        print(f"read {f}=" + err(e))"#,
        ),
        addr = a.job_addr,
        pids = a_pids.join(","),
        token = a.token,
    );
    let (id_b, stdout, stderr, out) = run_job(&stack, &GithubJob::staging(), &script);
    let k = kv(&stdout);
    let ctx = format!(
        "A = {} (uid {}, pids {a_pids:?}, addr {})\nB stdout:\n{stdout}\nB stderr:\n{stderr}",
        a.job.job_id, a.uid, a.job_addr
    );
    let get = |key: &str| k.get(key).map(String::as_str);
    assert!(out.status.success(), "job B failed: {}\n{ctx}", out.status);
    assert_ne!(id_b, a.job.job_id);
    // A's namespace is not B's: no route to A's address nor to A's host end.
    assert_eq!(get("a_job_addr"), Some("ENETUNREACH"), "{ctx}");
    assert_eq!(get("a_host_end"), Some("ENETUNREACH"), "{ctx}");
    // B's 169.254.170.2 is B's own endpoint: A's token is refused there, B's is accepted.
    assert_eq!(get("own_token_is_a"), Some("no"), "{ctx}");
    assert_eq!(get("a_token_status"), Some("403"), "{ctx}");
    assert!(
        get("a_token_body").is_some_and(|b| b.contains("InvalidToken")),
        "{ctx}"
    );
    assert_eq!(get("own_creds"), Some("{\"AccessKeyId\":\"ASIA"), "{ctx}");
    // /proc: only B's own processes.
    assert_eq!(get("proc_has_pid1"), Some("yes"), "{ctx}");
    assert_eq!(get("a_pids_visible"), Some(""), "{ctx}");
    assert_eq!(get("a_marker_seen"), Some(""), "{ctx}");
    // A's files: not in B's /tmp or home, and no /proc path to A's root or environment.
    let p0 = &a_pids[0];
    for f in [
        "/tmp/al-a-marker".to_string(),
        "/home/job/al-a-marker".to_string(),
        format!("/proc/{p0}/root/tmp/al-a-marker"),
        format!("/proc/{p0}/environ"),
    ] {
        assert_eq!(
            get(&format!("read {f}")),
            Some("ENOENT"),
            "B must not find {f}\n{ctx}"
        );
    }
    // A is untouched and still running.
    assert!(
        a.job
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None))),
        "job A ended while B ran\n{}",
        a.job.transcript()
    );
    a.job.release();
    let st = a.job.wait(Duration::from_secs(30));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", a.job.transcript());
    for job in [&a.job.job_id, &id_b] {
        let wiped = wiped_record(&stack.agent, job);
        assert_eq!(wiped["leftovers"], serde_json::json!([]), "{wiped}");
    }
}

#[test]
fn a_job_cannot_signal_a_concurrent_jobs_processes() {
    let stack = Stack::sandboxed_outbound_production("");
    let mut a = start_job_a(&stack);
    let before: Vec<(u32, u64)> = a.pids.iter().map(|p| (p.pid, p.start)).collect();
    let a_pids: Vec<String> = a.pids.iter().map(|p| p.pid.to_string()).collect();
    let script = format!(
        r#"{py}{PY} /tmp/probe.py {pids}
"#,
        py = py_file(
            "/tmp/probe.py",
            r#"for p in sys.argv[1].split(","):
    for sig in (9, 0):
        try:
            os.kill(int(p), sig)
            print(f"kill_{sig}_{p}=DELIVERED")
        except OSError as e:
            print(f"kill_{sig}_{p}=" + err(e))"#,
        ),
        pids = a_pids.join(","),
    );
    let (_, stdout, stderr, out) = run_job(&stack, &GithubJob::staging(), &script);
    let k = kv(&stdout);
    let ctx = format!(
        "A's pids {a_pids:?} (uid {})\nB stdout:\n{stdout}\nB stderr:\n{stderr}",
        a.uid
    );
    assert!(out.status.success(), "job B failed: {}\n{ctx}", out.status);
    for p in &a_pids {
        for sig in [9, 0] {
            assert_eq!(
                k.get(&format!("kill_{sig}_{p}")).map(String::as_str),
                Some("ESRCH"),
                "kill({p}, {sig}) from B\n{ctx}"
            );
        }
    }
    // Every one of A's processes is still alive, the same process as before.
    let now: BTreeSet<(u32, u64)> = running(procs()).iter().map(|p| (p.pid, p.start)).collect();
    for (pid, start) in &before {
        assert!(
            now.contains(&(*pid, *start)),
            "A's process {pid} is gone after B's kill\n{ctx}\n{}",
            a.job.transcript()
        );
    }
    a.job.release();
    let st = a.job.wait(Duration::from_secs(30));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", a.job.transcript());
}

/// The shim's new mount namespace starts as a copy of the host's, and the job's root as a
/// recursive bind of `/`: without care, job B would hold copies of job A's tmpfs and
/// network namespace mounts (hidden under B's own `/tmp` or `/run`), and keep them alive
/// after A's wipe for as long as B runs.
#[test]
fn a_job_holds_no_mount_of_another_job_and_a_wiped_jobs_tmpfs_is_freed() {
    const BIG: u64 = 256 << 20;
    let stack = Stack::sandboxed("");
    let before = shmem_bytes();
    let mut a = LiveJob::start(
        &stack.agent,
        &GithubJob::production().token(),
        &format!("head -c {BIG} /dev/zero > /home/job/work/al-big && echo wrote\necho ready\nread _\nexit 0\n"),
    );
    assert!(
        a.wait_line("ready", Duration::from_secs(60)).is_some(),
        "job A did not start\n{}\nagent log:\n{}",
        a.transcript(),
        stack.agent.log()
    );
    assert!(a.stdout_text().contains("wrote"), "{}", a.transcript());
    let full = shmem_bytes();
    assert!(
        full.saturating_sub(before) >= BIG * 3 / 4,
        "A wrote {BIG} bytes but the host's Shmem rose by {}: its workspace is not on a host tmpfs",
        full.saturating_sub(before)
    );
    // A's mounts on the host: its tmpfs (named after it) and its network namespace.
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let a_source = format!(" - tmpfs airlock-{} ", a.job_id);
    let a_fs = host
        .lines()
        .find(|l| l.contains(&a_source))
        .unwrap_or_else(|| panic!("A's tmpfs is not mounted on the host:\n{host}"));
    let a_dev = a_fs.split(' ').nth(2).unwrap().to_string();
    let a_ns = sandbox_of(&stack.agent, &a.job_id)["netns"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        host.lines()
            .any(|l| l.split(' ').nth(4) == Some(a_ns.as_str())),
        "A's namespace {a_ns} is not mounted on the host"
    );
    let a_ns_root = format!(
        "net:[{}]",
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&a_ns).unwrap())
    );
    // By A's id (mount points, the tmpfs's name), device or namespace inode.
    let of_a = |table: &str| -> Vec<String> {
        table
            .lines()
            .filter(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                l.contains(&a.job_id)
                    || f.get(2) == Some(&&*a_dev)
                    || f.get(3) == Some(&&*a_ns_root)
            })
            .map(str::to_string)
            .collect()
    };

    let mut b = LiveJob::start(
        &stack.agent,
        &GithubJob::staging().token(),
        "echo ready\nread _\nexit 0\n",
    );
    assert!(
        b.wait_line("ready", Duration::from_secs(30)).is_some(),
        "{}",
        b.transcript()
    );
    let b_pid = running(procs_of_job(&b.job_id))
        .first()
        .map(|p| p.pid)
        .unwrap_or_else(|| panic!("no process of B in its cgroup\n{}", b.transcript()));
    let b_table = std::fs::read_to_string(format!("/proc/{b_pid}/mountinfo")).unwrap();
    // The table is B's: its own tmpfs is bound over its /tmp.
    let b_source = format!(" - tmpfs airlock-{} ", b.job_id);
    assert!(
        b_table
            .lines()
            .any(|l| l.contains(&b_source) && l.split(' ').nth(4) == Some("/tmp")),
        "B's /tmp is not its tmpfs:\n{b_table}"
    );
    assert_eq!(
        of_a(&b_table),
        Vec::<String>::new(),
        "B's namespace holds mounts of A's"
    );

    // A ends while B runs: A's wipe detaches its tmpfs, and nothing else holds it.
    a.release();
    let st = a.wait(Duration::from_secs(30));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", a.transcript());
    let wiped = wiped_record(&stack.agent, &a.job_id);
    assert_eq!(wiped["leftovers"], serde_json::json!([]), "{wiped}");
    assert_eq!(wiped["files_detached"], true, "{wiped}");
    // No mount namespace of the host has a copy left (by A's id only: its device number
    // and namespace inode are free for reuse now).
    for (pid, table) in all_mount_tables() {
        let left: Vec<&str> = table.lines().filter(|l| l.contains(&a.job_id)).collect();
        assert!(
            left.is_empty(),
            "the mount namespace of pid {pid} still holds A's mounts: {left:?}"
        );
    }
    // Its memory comes back in the background (B still running).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = shmem_bytes();
        if full.saturating_sub(now) >= BIG * 3 / 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's tmpfs was not freed after its wipe: Shmem {now} bytes, {full} with A's file"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        b.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None))),
        "B ended early\n{}",
        b.transcript()
    );
    b.release();
    let st = b.wait(Duration::from_secs(30));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", b.transcript());
}

// ---------------------------------------------------------------------------------------
// Across a job's end.
// ---------------------------------------------------------------------------------------

#[test]
fn a_double_forked_background_process_does_not_outlive_its_job() {
    let stack = Stack::sandboxed("");
    let n = nonce();
    let (m1, m2) = ("albg", format!("-{n}"));
    let marker = format!("{m1}{m2}");
    let script = format!(
        r#"m={m1}; m="$m{m2}"
export RUNNER_TRACKING_ID=github_{n}
( setsid /bin/sh -c "sleep 300; : $m-tracked" & ) &
( unset RUNNER_TRACKING_ID; ( setsid /bin/sh -c "sleep 300; : $m-untracked" & ) & )
env -u RUNNER_TRACKING_ID {PY} -c '
import os, sys
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", [sys.argv[1] + "-daemon", "300"])
    os._exit(0)
' "$m"
echo spawned
read _
exit 0
"#
    );
    let mut job = LiveJob::start(&stack.agent, &GithubJob::production().token(), &script);
    assert!(
        job.wait_line("spawned", Duration::from_secs(30)).is_some(),
        "{}",
        job.transcript()
    );
    let uid = sandbox_of(&stack.agent, &job.job_id)["uid"]
        .as_u64()
        .unwrap_or_default();
    // All three detached processes are running, as the job's user, in its cgroup.
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let seen = procs_with(&marker);
        let kinds: BTreeSet<&str> = ["tracked", "untracked", "daemon"]
            .into_iter()
            .filter(|k| {
                seen.iter()
                    .any(|p| p.cmdline.contains(&format!("{marker}-{k}")))
            })
            .collect();
        if kinds.len() == 3 {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "the job's background processes never appeared: {seen:?}\n{}",
            job.transcript()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let leaf = format!("/job-{}", job.job_id);
    for p in &seen {
        assert_eq!(u64::from(p.uid), uid, "{p:?}");
        assert!(p.cgroup.lines().any(|l| l.ends_with(&leaf)), "{p:?}");
    }
    job.release();
    let st = job.wait(Duration::from_secs(30));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", job.transcript());
    // `airlock run` has returned: nothing of the job runs on the host any more.
    let left = running(procs_with(&marker));
    assert!(
        left.is_empty(),
        "background processes survived the job: {left:?}"
    );
    let left: Vec<Proc> = running(procs_of_job(&job.job_id));
    assert!(
        left.is_empty(),
        "processes left in the job's cgroup: {left:?}"
    );
    let before: BTreeSet<(u32, u64)> = seen.iter().map(|p| (p.pid, p.start)).collect();
    let survivors: Vec<Proc> = running(procs())
        .into_iter()
        .filter(|p| before.contains(&(p.pid, p.start)))
        .collect();
    assert!(survivors.is_empty(), "{survivors:?}");
    let wiped = wiped_record(&stack.agent, &job.job_id);
    assert_eq!(wiped["leftovers"], serde_json::json!([]), "{wiped}");
    assert!(
        record(&stack.agent, "slot_tainted", &job.job_id).is_none(),
        "{:?}",
        stack.agent.audit_records()
    );
}

#[test]
fn the_next_job_on_the_same_slot_finds_none_of_the_previous_jobs_files() {
    let stack = Stack::sandboxed("");
    let places = [
        "/tmp/al-marker",
        "/var/tmp/al-marker",
        "/home/job/al-marker",
        "/home/job/work/al-marker",
        "/dev/shm/al-marker",
    ];
    let write: String = places
        .iter()
        .map(|p| format!("echo 'left by job 1' > {p} && echo wrote={p}\n"))
        .collect();
    let (id1, out1, err1, st1) = run_job(
        &stack,
        &GithubJob::production(),
        &format!("echo uid=$(id -u)\n{write}"),
    );
    assert!(st1.status.success(), "job 1: {out1}\n{err1}");
    assert_eq!(
        out1.lines().filter(|l| l.starts_with("wrote=")).count(),
        places.len(),
        "job 1 could not write its markers: {out1}\n{err1}"
    );
    let wiped = wiped_record(&stack.agent, &id1);
    assert_eq!(wiped["leftovers"], serde_json::json!([]), "{wiped}");
    let probe = py_file(
        "/tmp/probe.py",
        r#"for f in sys.argv[1:]:
    try:
        print(f"file {f}=READ:" + open(f).read().strip())
    except OSError as e:
        print(f"file {f}=" + err(e))
for d in ("/tmp", "/var/tmp", "/home/job", "/home/job/work", "/dev/shm"):
    print(f"dir {d}=" + ",".join(sorted(x for x in os.listdir(d) if x != "probe.py")))"#,
    );
    let (id2, out2, err2, st2) = run_job(
        &stack,
        &GithubJob::staging(),
        &format!(
            "echo uid=$(id -u)\n{probe}{PY} /tmp/probe.py {}\n",
            places.join(" ")
        ),
    );
    let ctx = format!("job 1 {id1}:\n{out1}\njob 2 {id2}:\n{out2}\n{err2}");
    assert!(st2.status.success(), "{ctx}");
    let (k1, k2) = (kv(&out1), kv(&out2));
    // The same slot, so the same user: the only thing the two jobs share.
    assert_eq!(k1.get("uid"), k2.get("uid"), "{ctx}");
    assert_eq!(k2.get("uid").map(String::as_str), Some("2000000"), "{ctx}");
    for p in places {
        assert_eq!(
            k2.get(&format!("file {p}")).map(String::as_str),
            Some("ENOENT"),
            "{ctx}"
        );
    }
    for (d, want) in [
        ("/tmp", ""),
        ("/var/tmp", ""),
        ("/home/job", "work"),
        ("/home/job/work", ""),
        ("/dev/shm", ""),
    ] {
        assert_eq!(
            k2.get(&format!("dir {d}")).map(String::as_str),
            Some(want),
            "{d}\n{ctx}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Resource exhaustion.
// ---------------------------------------------------------------------------------------

/// `[sandbox] tmpfs_size` caps the job's files as a whole: /tmp, /var/tmp, /run, its home
/// and its workspace are one tmpfs.
#[test]
fn the_tmpfs_size_caps_the_job_as_a_whole() {
    let stack = Stack::sandboxed("tmpfs_size = 16777216\n");
    let probe = py_file(
        "/tmp/probe.py",
        r#"MIB = 1 << 20
def write(path, n):
    try:
        with open(path, "wb") as f:
            f.write(b"x" * (n * MIB))
        return "ok"
    except OSError as e:
        return err(e)
dirs = ("/tmp", "/var/tmp", "/run", "/home/job", "/home/job/work")
print("sizes=" + ",".join(str(os.statvfs(d).f_blocks * os.statvfs(d).f_frsize) for d in dirs))
print("devices=" + str(len({os.stat(d).st_dev for d in dirs})))
print("tmp_10m=" + write("/tmp/a", 10))
print("work_10m=" + write("/home/job/work/b", 10))
print("var_tmp_1m=" + write("/var/tmp/c", 1))
print("run_1m=" + write("/run/d", 1))
for f in ("/tmp/a", "/home/job/work/b", "/var/tmp/c", "/run/d"):
    if os.path.exists(f):
        os.unlink(f)
print("run_12m_after_rm=" + write("/run/e", 12))"#,
    );
    let (_, stdout, stderr, out) = run_job(
        &stack,
        &GithubJob::production(),
        &format!("{probe}{PY} /tmp/probe.py\n"),
    );
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(out.status.success(), "{}\n{ctx}", out.status);
    let k = kv(&stdout);
    let get = |key: &str| k.get(key).map(String::as_str);
    let cap = "16777216";
    assert_eq!(get("sizes"), Some([cap; 5].join(",").as_str()), "{ctx}");
    assert_eq!(get("devices"), Some("1"), "one filesystem\n{ctx}");
    assert_eq!(get("tmp_10m"), Some("ok"), "{ctx}");
    // 10 MiB in /tmp leave less than 10 for everything else.
    assert_eq!(get("work_10m"), Some("ENOSPC"), "{ctx}");
    assert_eq!(get("var_tmp_1m"), Some("ENOSPC"), "{ctx}");
    assert_eq!(get("run_1m"), Some("ENOSPC"), "{ctx}");
    assert_eq!(get("run_12m_after_rm"), Some("ok"), "{ctx}");
}

#[test]
fn a_fork_bomb_hits_the_jobs_pids_limit_without_hurting_the_agent_or_other_jobs() {
    let stack = Stack::sandboxed("pids_max = 64\n");
    let script = format!(
        r#"{py}{PY} /tmp/bomb.py
"#,
        py = py_file(
            "/tmp/bomb.py",
            r#"import time
kids, e_no = [], None
while len(kids) < 100000:
    try:
        pid = os.fork()
    except OSError as e:
        e_no = e.errno
        break
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    kids.append(pid)
print(f"fork_error={errno.errorcode.get(e_no, e_no)}", flush=True)
print(f"forked={len(kids)}", flush=True)
print("holding", flush=True)
sys.stdin.readline()
for k in kids:
    os.kill(k, 9)
sys.exit(3 if e_no == errno.EAGAIN else 4)"#,
        ),
    );
    std::thread::scope(|s| {
        let health = HealthWatch::start(s, &stack.agent);
        let mut bomb = LiveJob::start(&stack.agent, &GithubJob::staging().token(), &script);
        assert!(
            bomb.wait_line("holding", Duration::from_secs(60)).is_some(),
            "{}\nagent log:\n{}",
            bomb.transcript(),
            stack.agent.log()
        );
        let k = kv(&bomb.stdout_text());
        assert_eq!(
            k.get("fork_error").map(String::as_str),
            Some("EAGAIN"),
            "{}",
            bomb.transcript()
        );
        let forked: u64 = k.get("forked").and_then(|f| f.parse().ok()).unwrap_or(0);
        assert!(
            (1..64).contains(&forked),
            "forked {forked}: the limit is 64 pids\n{}",
            bomb.transcript()
        );
        // The host sees the job's group at its limit, with refused forks counted.
        let cg = sandbox_of(&stack.agent, &bomb.job_id)["cgroup"]
            .as_str()
            .map(PathBuf::from)
            .unwrap_or_default();
        let dirs = job_cgroup_dirs(&cg);
        assert!(
            cgroup_counter(&dirs, "pids.events", "max").is_some_and(|n| n >= 1),
            "no refused fork counted in {dirs:?}"
        );
        // While the bomb holds all its pids: the agent answers, another job gets its
        // credentials.
        assert_eq!(stack.agent.healthz(), Some(200));
        fetch_credentials_in_a_job(&stack, &GithubJob::production());
        bomb.release();
        let st = bomb.wait(Duration::from_secs(30));
        assert_eq!(st.and_then(|s| s.code()), Some(3), "{}", bomb.transcript());
        let (polls, failures) = health.finish();
        assert!(
            polls > 0 && failures.is_empty(),
            "/healthz: {polls} polls, failures {failures:?}"
        );
        let wiped = wiped_record(&stack.agent, &bomb.job_id);
        assert_eq!(wiped["leftovers"], serde_json::json!([]), "{wiped}");
    });
}

#[test]
fn memory_exhaustion_is_oom_killed_in_the_job_without_hurting_the_agent_or_other_jobs() {
    let stack = Stack::sandboxed("memory_max = 67108864\n");
    let script = format!(
        r#"{PY} -c 'x = b"x" * (512 << 20); print("allocated", len(x), flush=True)'
rc=$?
echo "alloc_exit=$rc"
read _
exit $rc
"#
    );
    std::thread::scope(|s| {
        let health = HealthWatch::start(s, &stack.agent);
        let mut hog = LiveJob::start(&stack.agent, &GithubJob::staging().token(), &script);
        let cg = sandbox_of(&stack.agent, &hog.job_id)["cgroup"]
            .as_str()
            .map(PathBuf::from)
            .unwrap_or_default();
        let line = hog.wait_line("alloc_exit=", Duration::from_secs(60));
        match &line {
            // The memory controller killed the allocating process (v1, or v2 without
            // memory.oom.group): the job's shell saw SIGKILL, and the host counts the kill.
            Some(l) => {
                assert_eq!(l, "alloc_exit=137", "{}", hog.transcript());
                let dirs = job_cgroup_dirs(&cg);
                let kills = cgroup_counter(&dirs, "memory.events", "oom_kill")
                    .or_else(|| cgroup_counter(&dirs, "memory.oom_control", "oom_kill"));
                assert!(
                    kills.is_some_and(|n| n >= 1),
                    "no OOM kill counted in {dirs:?}: {kills:?}"
                );
            }
            // memory.oom.group: the whole job was killed at once.
            None => {
                let st = hog.wait(Duration::from_secs(30));
                assert_eq!(
                    st.and_then(|s| s.code()),
                    Some(137),
                    "the job neither reported its allocation's end nor was OOM-killed\n{}",
                    hog.transcript()
                );
            }
        }
        assert!(
            !hog.stdout_text().contains("allocated"),
            "512 MiB fit under a 64 MiB limit\n{}",
            hog.transcript()
        );
        assert_eq!(stack.agent.healthz(), Some(200));
        fetch_credentials_in_a_job(&stack, &GithubJob::production());
        if line.is_some() {
            // The job survived its process's OOM kill and hands on its status.
            hog.release();
            let st = hog.wait(Duration::from_secs(30));
            assert_eq!(st.and_then(|s| s.code()), Some(137), "{}", hog.transcript());
        }
        let (polls, failures) = health.finish();
        assert!(
            polls > 0 && failures.is_empty(),
            "/healthz: {polls} polls, failures {failures:?}"
        );
        let wiped = wiped_record(&stack.agent, &hog.job_id);
        assert_eq!(wiped["leftovers"], serde_json::json!([]), "{wiped}");
    });
}

// ---------------------------------------------------------------------------------------
// The agent killed during a job.
// ---------------------------------------------------------------------------------------

#[test]
fn sigkill_of_airlockd_during_a_job_leaves_nothing_after_the_restart() {
    // An egress-controlled job: it has the most to leave behind (a veth on the host, its
    // firewall, its resolver's and NFLOG sockets in the agent).
    let mut stack = Stack::sandboxed_production_tables(
        "[egress]\nupstreams = [\"127.0.0.1:9\"]\n",
        "[rule.egress]\nallow = [\"example.test:443\"]\n",
    );
    let n = nonce();
    let (m1, m2) = ("alkill", format!("-{n}"));
    let marker = format!("{m1}{m2}");
    let script = format!(
        r#"m={m1}; m="$m{m2}"
echo data > /tmp/al-marker
/bin/sh -c "sleep 60; : $m" &
echo running
wait
"#
    );
    let mut job = LiveJob::start(&stack.agent, &GithubJob::production().token(), &script);
    assert!(
        job.wait_line("running", Duration::from_secs(30)).is_some(),
        "{}",
        job.transcript()
    );
    let id = job.job_id.clone();
    let sb = sandbox_of(&stack.agent, &id);
    assert_eq!(sb["network"], "egress-block", "{sb}");
    let cg = PathBuf::from(sb["cgroup"].as_str().unwrap_or_default());
    let parent_name = cg
        .parent()
        .and_then(Path::file_name)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert!(parent_name.starts_with("al-e2e-"), "{sb}");
    let job_dir = stack.agent.dir().join("jobs").join(&id);
    let netns_dir = stack.agent.dir().join("netns");
    // Everything of the job exists before the crash.
    let deadline = Instant::now() + Duration::from_secs(10);
    let before_crash = loop {
        let p = procs_of_job(&id);
        if p.iter().any(|p| p.cmdline.contains(&marker)) {
            break p;
        }
        assert!(Instant::now() < deadline, "{p:?}\n{}", job.transcript());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!job_cgroup_dirs(&cg).is_empty());
    assert!(job_dir.is_dir(), "{}", job_dir.display());
    assert!(netns_dir.join(format!("airlock-{id}")).exists());
    assert_eq!(links_of_job(&id).len(), 1, "{:?}", links_of_job(&id));

    assert!(stack.agent.signal("KILL"), "cannot SIGKILL airlockd");
    if let Err(e) = stack.agent.restart() {
        panic!("airlockd did not come back: {e}");
    }
    // Reaping happens before the agent serves; the CLI's shim dies with the job's cgroup.
    let st = job.wait(Duration::from_secs(30));
    assert!(
        st.is_some(),
        "`airlock run` still runs after the restart\n{}",
        job.transcript()
    );
    let started: BTreeSet<(u32, u64)> = before_crash.iter().map(|p| (p.pid, p.start)).collect();
    let alive: Vec<Proc> = running(procs())
        .into_iter()
        .filter(|p| {
            started.contains(&(p.pid, p.start))
                || p.cmdline.contains(&marker)
                || p.cgroup.contains(&format!("/job-{id}"))
        })
        .collect();
    assert!(alive.is_empty(), "processes of the job survived: {alive:?}");
    let ns: Vec<String> = std::fs::read_dir(&netns_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        ns.is_empty(),
        "network namespaces left in {}: {ns:?}",
        netns_dir.display()
    );
    assert_eq!(links_of_job(&id), Vec::<String>::new());
    let groups = job_groups_under_parent(&parent_name);
    assert!(groups.is_empty(), "job cgroups left: {groups:?}");
    assert!(!job_dir.exists(), "{} is still there", job_dir.display());
    let wiped = wiped_record(&stack.agent, &id);
    assert_eq!(wiped["leftovers"], serde_json::json!([]), "{wiped}");
    let verify = stack.agent.cli(&["audit", "verify"]);
    let (vout, verr) = out_text(&verify);
    assert!(
        verify.status.success() && vout.contains("chain intact"),
        "audit verify: {}\n{vout}\n{verr}",
        verify.status
    );
    // The restarted agent releases the namespace directory's bind its predecessor made.
    let status = stack.agent.stop();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(stack.agent.dir().to_str().unwrap()))
        .collect();
    assert!(
        left.is_empty(),
        "still mounted after the agent stopped: {left:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Concurrency.
// ---------------------------------------------------------------------------------------

/// A 5xx from the agent (its STS, moto, overloaded by the other tests running beside this
/// one) is retried by the fetch, as the SDKs' credential providers do; a wrong or missing
/// key after that is an error.
#[test]
fn sixteen_concurrent_jobs_each_only_ever_get_their_own_credentials() {
    const JOBS: u64 = 16;
    const FETCHES: u32 = 20;
    let stack = Stack::sandboxed("");
    let script = format!(
        r#"t=$(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
i=0
while [ $i -lt {FETCHES} ]; do
  curl -sS --max-time 30 --retry 3 --retry-delay 1 -o /tmp/c$i -H "Authorization: $t" "$AWS_CONTAINER_CREDENTIALS_FULL_URI" 2>/tmp/ce$i &
  ( tok=$(curl -sS -f --max-time 30 --retry 3 --retry-delay 1 -X PUT -H 'x-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token) &&
    r=$(curl -sS -f --max-time 30 --retry 3 --retry-delay 1 -H "x-aws-ec2-metadata-token: $tok" http://169.254.169.254/latest/meta-data/iam/security-credentials/ | head -n1) &&
    curl -sS -f --max-time 30 --retry 3 --retry-delay 1 -o /tmp/i$i -H "x-aws-ec2-metadata-token: $tok" "http://169.254.169.254/latest/meta-data/iam/security-credentials/$r" ) 2>/tmp/ie$i &
  i=$((i+1))
done
wait
{py}{PY} /tmp/collect.py {FETCHES}
"#,
        py = py_file(
            "/tmp/collect.py",
            r#"import json
out = {"container": [], "imds": [], "errors": []}
for i in range(int(sys.argv[1])):
    for kind, body, errf in (("container", f"/tmp/c{i}", f"/tmp/ce{i}"), ("imds", f"/tmp/i{i}", f"/tmp/ie{i}")):
        try:
            out[kind].append(json.load(open(body))["AccessKeyId"])
        except Exception as e:
            try:
                detail = open(errf).read().strip() + " body: " + open(body).read()[:200]
            except OSError:
                detail = ""
            out["errors"].append(f"{kind} {i}: {e!r} {detail}")
print("RESULT " + json.dumps(out))"#,
        ),
    );
    let results: Vec<(bool, String, String, String, Output)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..JOBS)
            .map(|i| {
                let (stack, script) = (&stack, &script);
                s.spawn(move || {
                    let prod = i % 2 == 0;
                    let who = if prod {
                        GithubJob::production()
                    } else {
                        GithubJob::staging()
                    }
                    .with_run_id(9_100_000 + i);
                    let (id, stdout, stderr, out) = run_job(stack, &who, script);
                    (prod, id, stdout, stderr, out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let mut all_issued: BTreeMap<String, String> = BTreeMap::new();
    let records = stack.agent.audit_records();
    for (prod, id, stdout, stderr, out) in &results {
        let ctx = format!("job {id} (production: {prod})\nstdout:\n{stdout}\nstderr:\n{stderr}");
        assert!(out.status.success(), "{}\n{ctx}", out.status);
        let Some(result) = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .and_then(|r| serde_json::from_str::<Value>(r).ok())
        else {
            panic!("no result\n{ctx}");
        };
        assert_eq!(result["errors"], serde_json::json!([]), "{ctx}");
        let issued: Vec<&Value> = records
            .iter()
            .filter(|r| r["event"] == "credentials_issued" && r["job"] == id.as_str())
            .collect();
        let keys: BTreeSet<String> = issued
            .iter()
            .filter_map(|r| r["access_key_id"].as_str().map(str::to_owned))
            .collect();
        assert!(!keys.is_empty(), "no credentials_issued for {id}\n{ctx}");
        let want_role = if *prod {
            "arn:aws:iam::123456789012:role/web-prod-deploy"
        } else {
            "arn:aws:iam::123456789012:role/web-staging-deploy"
        };
        for r in &issued {
            assert_eq!(r["role_arn"], want_role, "{r}\n{ctx}");
        }
        for kind in ["container", "imds"] {
            let got: Vec<&str> = result[kind]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            assert_eq!(got.len(), FETCHES as usize, "{kind}\n{ctx}");
            for key in got {
                assert!(
                    keys.contains(key),
                    "job {id} received {key} through {kind}, not one of its own {keys:?}; \
                     it was issued to {:?}\n{ctx}",
                    all_issued_owner(&records, key)
                );
            }
        }
        for key in keys {
            if let Some(other) = all_issued.insert(key.clone(), id.clone()) {
                panic!("{key} was issued to both {other} and {id}");
            }
        }
        let wiped = wiped_record(&stack.agent, id);
        assert_eq!(wiped["leftovers"], serde_json::json!([]), "{wiped}");
    }
    let ids: BTreeSet<&String> = results.iter().map(|r| &r.1).collect();
    assert_eq!(
        ids.len(),
        JOBS as usize,
        "job ids are not distinct: {ids:?}"
    );
}

fn all_issued_owner(records: &[Value], key: &str) -> Vec<String> {
    records
        .iter()
        .filter(|r| r["event"] == "credentials_issued" && r["access_key_id"] == key)
        .filter_map(|r| r["job"].as_str().map(str::to_owned))
        .collect()
}
