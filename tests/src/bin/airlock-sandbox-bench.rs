//! `airlock-sandbox-bench`: the sandbox benchmarks of `make bench` (root only).
//!
//! 1. Lifecycle: a job's whole sandbox is created, runs `/bin/true` and is wiped, N times,
//!    against `bwrap --unshare-all --ro-bind / / --dev /dev --proc /proc --tmpfs /tmp true`
//!    in the same run (interleaved). airlock's path is what the daemon does per job, with
//!    the agent's own functions:
//!    - prepare: the job's cgroup with limits (`create_job`), its network namespace
//!      (`NetManager::create`), its endpoint sockets bound inside it (`bind_in_netns`), its
//!      directory with an empty root, its tmpfs (`JobFs::create`: mounted in the bench's
//!      runtime directory, which `prepare_runtime_dir` made a shared mount point of its
//!      own, laid out, its root held open) and its spec (`binds` from `JobFs::binds`);
//!    - run: `airlock-shim --spec FILE` builds the sandbox (cgroup join, setns, namespaces,
//!      read-only root, /proc, /sys, /dev, the binds of the job's directories and the token
//!      file, hidden paths, pivot_root, setsid, rlimits, user, capabilities, no_new_privs,
//!      seccomp) and execs `/bin/true`; the bench waits for the shim's exit;
//!    - wipe: cgroup teardown (kill, wait for `populated 0`, rmdir), endpoint sockets closed,
//!      network teardown, the job's tmpfs detached (`detach_all_under`) and its directory
//!      removed, then verified: no cgroup, link, namespace file or mount, process in the
//!      namespace, mount under the job's directory, or directory of the job remains. Then
//!      the held handle goes to the agent's background `Reclaimer`, as in the daemon.
//! 2. Wipe: a job fills its workspace with 100,000 small files (this binary, run inside the
//!    sandbox with `--fill`), says so on stdout and sleeps. Two figures per job, against the
//!    same for a job with an empty workspace:
//!    - the wipe: from its start until everything of the job is verified gone (cgroup,
//!      network, mounts, directory) — what the daemon waits for before it gives the slot
//!      back; from then on no path and no process reaches the job's files;
//!    - the reclaim: from the wipe's end until the kernel has freed the job's tmpfs in the
//!      background (the reclaim thread has dropped the handle and the host's `Shmem` is back
//!      near its level before the job). Nothing waits for it; it is measured so the
//!      memory's return is not hidden.
//!
//! The last line is `key=value` pairs; each figure is also printed in words above it.
//! Targets (issue 3): lifecycle ≤ 2.5× bubblewrap, wipe of 100k files ≤ 2× an empty one.
//! Everything it creates (cgroups, namespaces, links, mounts, directories) is removed on
//! success and on failure (a guard reaps every job still recorded, then the parent cgroup
//! and the runtime directory's mount).

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use airlock::jobs::new_job_id;
use airlock::sandbox::cgroup::{CgroupRoot, CpuMax, JobCgroup, Limits, ParentGroup};
use airlock::sandbox::job::{JOB_HOME, JOB_TOKEN_FILE, JOB_WORKSPACE};
use airlock::sandbox::jobfs::{self, JobFs, Reclaimer};
use airlock::sandbox::netns::{bind_in_netns, NetConfig, NetManager, NetMode, ENDPOINT_ADDRS};
use airlock_shim::{Rlimits, SandboxSpec, SpecFile};

/// The job's user: the first slot of the default range (`[sandbox.users]`).
const JOB_UID: u32 = 2_000_000;
/// Size cap of each job's tmpfs (`[sandbox] tmpfs_size`).
const FS_BYTES: u64 = 1024 * MIB;
/// Subnets of the bench's jobs; only ever inside their own namespaces.
const POOL: &str = "10.209.0.0/16";
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(20);
const BWRAP_ARGS: [&str; 10] = [
    "--unshare-all",
    "--ro-bind",
    "/",
    "/",
    "--dev",
    "/dev",
    "--proc",
    "/proc",
    "--tmpfs",
    "/tmp",
];
const MIB: u64 = 1 << 20;
/// Bytes in each file the filler writes.
const FILE_BYTES: usize = 64;

type Res<T> = Result<T, String>;

#[derive(Debug)]
struct Options {
    iterations: usize,
    wipe_runs: usize,
    files: usize,
}

fn usage() -> String {
    "usage: airlock-sandbox-bench [--iterations N (50)] [--wipe-runs N (5)] [--files N (100000)]\n\
     (runs as root; finds airlock-shim in AIRLOCK_BIN_DIR, else next to itself)"
        .to_string()
}

fn parse_options(args: &[String]) -> Res<Options> {
    let mut o = Options {
        iterations: 50,
        wipe_runs: 5,
        files: 100_000,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--iterations" => &mut o.iterations,
            "--wipe-runs" => &mut o.wipe_runs,
            "--files" => &mut o.files,
            _ => return Err(usage()),
        };
        *slot = it
            .next()
            .and_then(|v| v.parse().ok())
            .filter(|&v: &usize| v > 0)
            .ok_or_else(usage)?;
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--fill") {
        return match fill(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("airlock-sandbox-bench --fill: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let result = parse_options(&args).and_then(|o| run(&o));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock-sandbox-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Inside the sandbox: writes COUNT files of FILE_BYTES bytes under DIR (in 100
/// subdirectories), prints `ready COUNT`, then sleeps until it is killed.
fn fill(args: &[String]) -> Res<()> {
    let [dir, count] = args else {
        return Err("usage: --fill DIR COUNT".into());
    };
    let dir = Path::new(dir);
    let count: usize = count.parse().map_err(|_| format!("bad count {count:?}"))?;
    let body = [b'x'; FILE_BYTES];
    for d in 0..100 {
        let sub = dir.join(format!("d{d:02}"));
        fs::create_dir(&sub).map_err(|e| format!("mkdir {}: {e}", sub.display()))?;
    }
    for i in 0..count {
        let path = dir.join(format!("d{:02}/f{i}", i % 100));
        fs::write(&path, body).map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {count}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn require_root() -> Res<()> {
    if airlock_tests::prereq::is_root() {
        Ok(())
    } else {
        Err("must run as root: the sandbox needs cgroups, namespaces and mounts".to_string())
    }
}

/// `bwrap` on PATH, or an error that says how to get it.
fn find_bwrap() -> Res<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("bwrap"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "bwrap not found on PATH: install bubblewrap (scripts/setup-bench-deps.sh does, as root on Debian)".to_string()
        })
}

/// Where jobs can run the bench's own filler from: a copy of this program outside `/tmp`,
/// `/var/tmp`, `/run` and `/home` (a job's own tmpfs covers those, and a clone may live
/// under any of them) and outside `/root` (hidden from jobs).
fn job_visible_copy(exe: &Path) -> Res<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = Path::new("/var/lib/airlock-bench");
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let copy = dir.join(format!("airlock-sandbox-bench-{}", std::process::id()));
    fs::copy(exe, &copy)
        .map_err(|e| format!("copy {} to {}: {e}", exe.display(), copy.display()))?;
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", copy.display()))?;
    Ok(copy)
}

fn shim_path(me: &Path) -> Res<PathBuf> {
    let dir = match std::env::var_os("AIRLOCK_BIN_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => me
            .parent()
            .ok_or("the bench binary has no directory")?
            .to_path_buf(),
    };
    let shim = dir.join("airlock-shim");
    if shim.is_file() {
        Ok(shim)
    } else {
        Err(format!(
            "{} not found: build it first (cargo build --release -p airlock-shim) or set AIRLOCK_BIN_DIR",
            shim.display()
        ))
    }
}

/// `Shmem` of /proc/meminfo in bytes: what tmpfs (and shared memory) holds on the host.
fn shmem_bytes() -> Res<u64> {
    let info = fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("Shmem:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| "no Shmem line in /proc/meminfo".to_string())
}

/// One prepared job: everything the agent makes before the shim starts.
#[derive(Debug)]
struct Job {
    id: String,
    cgroup: JobCgroup,
    listeners: Vec<TcpListener>,
    dir: PathBuf,
    /// The handle on the job's tmpfs root that keeps it until the reclaim.
    hold: File,
    spec_path: PathBuf,
}

/// What a wipe took, part by part, and when it ended.
#[derive(Debug, Clone, Copy)]
struct Wiped {
    cgroup: Duration,
    network: Duration,
    /// The tmpfs detached and the directory removed.
    files: Duration,
    verify: Duration,
    end: Instant,
}

impl Wiped {
    fn total(&self) -> Duration {
        self.cgroup + self.network + self.files + self.verify
    }
}

/// The bench's host objects. Dropping it reaps every job still recorded in `live` and
/// removes the parent cgroup, so a failure leaves nothing behind.
struct Bench {
    rt: tokio::runtime::Runtime,
    net: NetManager,
    parent: ParentGroup,
    /// The jobs' directories (`<base>/<job id>`), like the daemon's runtime directory; a
    /// shared mount point of its own, as the agent makes it.
    base: tempfile::TempDir,
    /// `base`, canonical (it is compared with the mount table).
    runtime_dir: PathBuf,
    bound_runtime_dir: bool,
    reclaimer: Reclaimer,
    shim: PathBuf,
    me: PathBuf,
    bwrap: PathBuf,
    /// Jobs whose objects may exist.
    live: Vec<String>,
    /// The network of the jobs `prepare` makes.
    net_mode: NetMode,
}

impl Bench {
    fn new() -> Res<Bench> {
        require_root()?;
        let bwrap = find_bwrap()?;
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let shim = shim_path(&exe)?;
        let me = job_visible_copy(&exe)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let net = {
            let _enter = rt.enter();
            NetManager::new(NetConfig {
                pool: POOL.parse().map_err(|e| format!("pool {POOL}: {e}"))?,
                pool6: None,
                ..NetConfig::default()
            })
            .map_err(|e| e.to_string())?
        };
        let mount_root = std::env::var_os("AIRLOCK_CGROUP_ROOT")
            .map_or_else(|| PathBuf::from("/sys/fs/cgroup"), PathBuf::from);
        let cgroups = CgroupRoot::detect(&mount_root).map_err(|e| e.to_string())?;
        let parent = cgroups
            .open_parent(Path::new(&format!("al-bench-{}", std::process::id())))
            .map_err(|e| e.to_string())?;
        // On the host's disk; hidden from the job like the agent's runtime directory.
        let base = tempfile::Builder::new()
            .prefix("al-bench-")
            .tempdir_in("/var/tmp")
            .map_err(|e| format!("temp dir in /var/tmp: {e}"))?;
        let runtime_dir =
            fs::canonicalize(base.path()).map_err(|e| format!("{}: {e}", base.path().display()))?;
        let bound_runtime_dir =
            jobfs::prepare_runtime_dir(&runtime_dir).map_err(|e| e.to_string())?;
        Ok(Bench {
            rt,
            net,
            parent,
            base,
            runtime_dir,
            bound_runtime_dir,
            reclaimer: Reclaimer::new(),
            shim,
            me,
            bwrap,
            live: Vec::new(),
            net_mode: NetMode::EndpointOnly,
        })
    }

    /// What the daemon does before it starts the shim: cgroup, network, endpoint sockets,
    /// directory, tmpfs, spec.
    fn prepare(&mut self, argv: Vec<String>) -> Res<Job> {
        let id = new_job_id();
        self.live.push(id.clone());
        let limits = Limits {
            pids_max: Some(1024),
            memory_max_bytes: Some(2048 * MIB),
            cpu_max: Some(CpuMax::millicpus(2000)),
            cpu_weight: None,
        };
        let cgroup = self
            .parent
            .create_job(&id, &limits)
            .map_err(|e| e.to_string())?;
        let net = self
            .rt
            .block_on(self.net.create(&id, self.net_mode.clone()))
            .map_err(|e| e.to_string())?;
        let listeners = bind_in_netns(&net.ns_path, &ENDPOINT_ADDRS).map_err(|e| e.to_string())?;
        let dir = self.runtime_dir.join(&id);
        let root = dir.join("root");
        fs::create_dir_all(&root).map_err(|e| format!("mkdir {}: {e}", root.display()))?;
        let job_fs =
            JobFs::create(&id, &dir, FS_BYTES, JOB_UID, JOB_UID).map_err(|e| e.to_string())?;
        let spec = SandboxSpec {
            job_id: id.clone(),
            argv,
            env: [
                ("PATH", "/usr/local/bin:/usr/bin:/bin"),
                ("HOME", JOB_HOME),
                (
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    "http://169.254.170.2/",
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            cwd: JOB_WORKSPACE.into(),
            uid: JOB_UID,
            gid: JOB_UID,
            root_dir: root,
            hostname: "airlock-job".into(),
            netns: Some(net.ns_path.clone()),
            cgroups: cgroup.dirs().map(Path::to_path_buf).collect(),
            binds: job_fs.binds(),
            files: vec![SpecFile {
                path: JOB_TOKEN_FILE.into(),
                contents: format!("bench-token-{id}"),
                mode: 0o400,
            }],
            resolv_conf: None,
            hide: vec![
                "/root".into(),
                "/etc/airlock".into(),
                "/var/lib/airlock".into(),
                self.runtime_dir.clone(),
            ],
            rlimits: Rlimits {
                nofile: Some(1024),
                nproc: None,
                core: None,
            },
            status_file: None,
        };
        let spec_path = dir.join("spec.json");
        let text = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
        fs::write(&spec_path, text).map_err(|e| format!("{}: {e}", spec_path.display()))?;
        Ok(Job {
            id,
            cgroup,
            listeners,
            dir,
            hold: job_fs.into_hold(),
            spec_path,
        })
    }

    fn shim_command(&self, job: &Job) -> Command {
        let mut c = Command::new(&self.shim);
        c.arg("--spec")
            .arg(&job.spec_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    /// The job's end, as the daemon's wipe: kill and remove its cgroup, close its sockets,
    /// remove its network, detach its tmpfs and remove its directory, verify that none of
    /// it remains, then hand the tmpfs handle to the background reclaim.
    fn wipe(&mut self, job: Job) -> Res<Wiped> {
        let Job {
            id,
            cgroup,
            listeners,
            dir,
            hold,
            ..
        } = job;
        let t0 = Instant::now();
        cgroup
            .teardown(TEARDOWN_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let t1 = Instant::now();
        drop(listeners);
        self.rt
            .block_on(self.net.teardown(&id))
            .map_err(|e| e.to_string())?;
        let t2 = Instant::now();
        let mounted = jobfs::detach_all_under(&dir).map_err(|e| e.to_string())?;
        if !mounted.is_empty() {
            return Err(format!(
                "job {id}: mounts left after the detach: {mounted:?}"
            ));
        }
        fs::remove_dir_all(&dir).map_err(|e| format!("rm -r {}: {e}", dir.display()))?;
        let t3 = Instant::now();
        let mut left: Vec<String> = cgroup
            .verify_gone()
            .iter()
            .map(|l| format!("cgroup {} (pids {:?})", l.path.display(), l.pids))
            .collect();
        let net_left = self
            .rt
            .block_on(self.net.verify_gone(&id))
            .map_err(|e| e.to_string())?;
        left.extend(net_left.iter().map(ToString::to_string));
        let mounts = jobfs::mounts_under(&dir).map_err(|e| e.to_string())?;
        left.extend(mounts.iter().map(|m| format!("mount {}", m.display())));
        if dir.symlink_metadata().is_ok() {
            left.push(format!("directory {}", dir.display()));
        }
        if !left.is_empty() {
            return Err(format!("job {id}: the wipe left {}", left.join(", ")));
        }
        let t4 = Instant::now();
        self.live.retain(|j| j != &id);
        self.reclaimer.reclaim(&id, hold);
        Ok(Wiped {
            cgroup: t1 - t0,
            network: t2 - t1,
            files: t3 - t2,
            verify: t4 - t3,
            end: t4,
        })
    }

    /// One airlock lifecycle; returns prepare, shim run, and the wipe.
    fn lifecycle(&mut self) -> Res<(Duration, Duration, Wiped)> {
        let t0 = Instant::now();
        let job = self.prepare(vec!["/bin/true".into()])?;
        let t1 = Instant::now();
        let out = self
            .shim_command(&job)
            .output()
            .map_err(|e| format!("{}: {e}", self.shim.display()))?;
        if !out.status.success() {
            return Err(format!(
                "the shim ended with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let t2 = Instant::now();
        let wipe = self.wipe(job)?;
        Ok((t1 - t0, t2 - t1, wipe))
    }

    fn bwrap_once(&self) -> Res<Duration> {
        let t0 = Instant::now();
        let out = Command::new(&self.bwrap)
            .args(BWRAP_ARGS)
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("{}: {e}", self.bwrap.display()))?;
        let took = t0.elapsed();
        if !out.status.success() {
            return Err(format!(
                "bwrap ended with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(took)
    }

    /// A job that writes `files` files into its workspace and waits; returns the time of its
    /// wipe (until everything is verified gone) and of the background reclaim after it
    /// (until the reclaim thread is done and the host's Shmem is back near where it was
    /// before the job).
    fn timed_wipe(&mut self, files: usize) -> Res<(Duration, Duration)> {
        let argv = vec![
            self.me.display().to_string(),
            "--fill".into(),
            JOB_WORKSPACE.into(),
            files.to_string(),
        ];
        let job = self.prepare(argv)?;
        let before = shmem_bytes()?;
        let mut child = self
            .shim_command(&job)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: {e}", self.shim.display()))?;
        let ready = wait_ready(&mut child, Duration::from_secs(300));
        if let Err(e) = ready {
            let _ = job.cgroup.teardown(TEARDOWN_TIMEOUT);
            let stderr = child
                .wait_with_output()
                .map(|o| o.stderr)
                .unwrap_or_default();
            return Err(format!(
                "{e}; shim: {}",
                String::from_utf8_lossy(&stderr).trim()
            ));
        }
        let full = shmem_bytes()?;
        let expected = (files as u64) * 4096;
        if full.saturating_sub(before) < expected / 2 {
            let _ = child.kill();
            return Err(format!(
                "the job wrote {files} files but the host's Shmem rose by only {} KiB (expected about {} KiB): the workspace is not on the job's tmpfs",
                full.saturating_sub(before) / 1024,
                expected / 1024
            ));
        }
        // Freed means back within a quarter of the files' size (at least 32 MiB) of the
        // level before the job: other work on the host moves Shmem a little.
        let slack = (expected / 4).max(32 * MIB);
        let t0 = Instant::now();
        let wiped = self.wipe(job)?;
        let deadline = wiped.end + TEARDOWN_TIMEOUT;
        loop {
            let now = shmem_bytes()?;
            if now <= before + slack && self.reclaimer.pending() == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the job's tmpfs was not freed: Shmem {} KiB, {} KiB before the job; {} reclaim(s) pending",
                    now / 1024,
                    before / 1024,
                    self.reclaimer.pending()
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let reclaimed = wiped.end.elapsed();
        // The shim was killed with its job: reap it (not part of the wipe).
        let _ = child.wait();
        Ok((wiped.end - t0, reclaimed))
    }
}

/// Waits for the filler's `ready` line on the shim's stdout.
fn wait_ready(child: &mut Child, timeout: Duration) -> Res<()> {
    let stdout = child
        .stdout
        .take()
        .ok_or("the shim's stdout is not piped")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(line)) if line.starts_with("ready ") => Ok(()),
        Ok(Ok(line)) => Err(format!(
            "the filler job said {:?} instead of ready",
            line.trim()
        )),
        Ok(Err(e)) => Err(format!("reading the job's stdout: {e}")),
        Err(_) => Err(format!("the filler job was not ready after {timeout:?}")),
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.me);
        for id in std::mem::take(&mut self.live) {
            if let Ok(cg) = self.parent.job(&id) {
                if let Err(e) = cg.teardown(TEARDOWN_TIMEOUT) {
                    eprintln!("airlock-sandbox-bench: cleanup of job {id}'s cgroup: {e}");
                }
            }
            if let Err(e) = self.rt.block_on(self.net.teardown(&id)) {
                eprintln!("airlock-sandbox-bench: cleanup of job {id}'s network: {e}");
            }
            let dir = self.runtime_dir.join(&id);
            match jobfs::detach_all_under(&dir) {
                Ok(left) if left.is_empty() => {
                    if let Err(e) = fs::remove_dir_all(&dir) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            eprintln!("airlock-sandbox-bench: cleanup of {}: {e}", dir.display());
                        }
                    }
                }
                Ok(left) => eprintln!(
                    "airlock-sandbox-bench: cleanup of {}: still mounted: {left:?}",
                    dir.display()
                ),
                Err(e) => eprintln!("airlock-sandbox-bench: cleanup of {}: {e}", dir.display()),
            }
        }
        if let Err(e) = self.parent.remove() {
            eprintln!("airlock-sandbox-bench: cleanup of the parent cgroup: {e}");
        }
        if !self.reclaimer.wait_idle(TEARDOWN_TIMEOUT) {
            eprintln!("airlock-sandbox-bench: background reclaims still pending at exit");
        }
        if self.bound_runtime_dir {
            jobfs::release_runtime_dir(&self.runtime_dir);
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of `v` (sorted here), `p` in 0..=100.
fn percentile(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    let rank = (v.len() * p).div_ceil(100).max(1);
    v[rank - 1]
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn run(o: &Options) -> Res<()> {
    let mut b = Bench::new()?;
    println!(
        "sandbox benchmark: shim {}, bwrap {}, cgroup parent {}, jobs in {}",
        b.shim.display(),
        b.bwrap.display(),
        b.parent.path().display(),
        b.base.path().display()
    );

    // 1. Lifecycle, interleaved with bwrap so that both see the same machine.
    for _ in 0..3 {
        b.lifecycle()?;
        b.bwrap_once()?;
    }
    let (mut total, mut prep, mut shim, mut bw) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut wipe: [Vec<Duration>; 5] = Default::default();
    for _ in 0..o.iterations {
        let (p, s, w) = b.lifecycle()?;
        total.push(p + s + w.total());
        prep.push(p);
        shim.push(s);
        for (all, part) in wipe
            .iter_mut()
            .zip([w.total(), w.cgroup, w.network, w.files, w.verify])
        {
            all.push(part);
        }
        bw.push(b.bwrap_once()?);
    }
    let sandbox_median = ms(percentile(&mut total, 50));
    let sandbox_p90 = ms(percentile(&mut total, 90));
    let bwrap_median = ms(percentile(&mut bw, 50));
    let ratio = sandbox_median / bwrap_median;
    println!(
        "lifecycle, {} iterations: airlock sandbox (cgroup + netns + endpoint sockets + shim + /bin/true + wipe + verify) median {sandbox_median:.2} ms, p90 {sandbox_p90:.2} ms",
        o.iterations
    );
    let [w, wc, wn, wd, wv] = wipe.each_mut().map(|v| ms(percentile(v, 50)));
    println!(
        "  of which medians: prepare {:.2} ms, shim build + /bin/true {:.2} ms, wipe + verify {w:.2} ms",
        ms(percentile(&mut prep, 50)),
        ms(percentile(&mut shim, 50)),
    );
    println!(
        "  wipe medians: cgroup teardown {wc:.2} ms, network teardown {wn:.2} ms, tmpfs detach + directory {wd:.2} ms, verify {wv:.2} ms"
    );
    println!(
        "lifecycle: bwrap {} true median {bwrap_median:.2} ms",
        BWRAP_ARGS.join(" ")
    );
    println!(
        "lifecycle: airlock / bwrap = {ratio:.2} (target <= 2.5: {})",
        verdict(ratio <= 2.5)
    );

    // 2. Wipe with a full and an empty workspace, interleaved.
    let (mut full, mut empty) = (Vec::new(), Vec::new());
    let (mut full_reclaim, mut empty_reclaim) = (Vec::new(), Vec::new());
    for _ in 0..o.wipe_runs {
        let (w, r) = b.timed_wipe(0)?;
        empty.push(w);
        empty_reclaim.push(r);
        let (w, r) = b.timed_wipe(o.files)?;
        full.push(w);
        full_reclaim.push(r);
    }
    let wipe_full = ms(percentile(&mut full, 50));
    let wipe_empty = ms(percentile(&mut empty, 50));
    let wipe_ratio = wipe_full / wipe_empty;
    let reclaim_full = ms(percentile(&mut full_reclaim, 50));
    let reclaim_empty = ms(percentile(&mut empty_reclaim, 50));
    println!(
        "wipe (from its start until the job's cgroup, network, mounts and directory are verified gone), {} runs each: workspace with {} files of {FILE_BYTES} bytes median {wipe_full:.2} ms; empty workspace median {wipe_empty:.2} ms",
        o.wipe_runs, o.files
    );
    println!(
        "wipe: full / empty = {wipe_ratio:.2} (target <= 2: {})",
        verdict(wipe_ratio <= 2.0)
    );
    println!(
        "background reclaim (after the wipe, until the kernel has freed the job's tmpfs and the host's Shmem is back; nothing waits for it): {} files median {reclaim_full:.2} ms; empty workspace median {reclaim_empty:.2} ms",
        o.files
    );
    // 3. The same lifecycle for an outbound job (a rule with `network = "outbound"`: veth,
    // addresses, route, the job's and the host's nftables tables), against bwrap again.
    // No target: the target is for the default sandbox; this is what outbound adds.
    b.net_mode = NetMode::Outbound;
    b.lifecycle()?;
    let (mut out_total, mut out_bw, mut out_net) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..o.iterations.div_ceil(2) {
        let (p, s, w) = b.lifecycle()?;
        out_total.push(p + s + w.total());
        out_net.push(w.network);
        out_bw.push(b.bwrap_once()?);
    }
    let outbound_median = ms(percentile(&mut out_total, 50));
    let outbound_bwrap = ms(percentile(&mut out_bw, 50));
    let outbound_ratio = outbound_median / outbound_bwrap;
    println!(
        "lifecycle of an outbound job, {} iterations: median {outbound_median:.2} ms (network teardown median {:.2} ms); bwrap median {outbound_bwrap:.2} ms in the same runs; ratio {outbound_ratio:.2}",
        out_total.len(),
        ms(percentile(&mut out_net, 50))
    );
    drop(b);
    println!(
        "sandbox_median_ms={sandbox_median:.2} bwrap_median_ms={bwrap_median:.2} sandbox_ratio={ratio:.2} sandbox_p90_ms={sandbox_p90:.2} wipe_100k_ms={wipe_full:.2} wipe_empty_ms={wipe_empty:.2} wipe_ratio={wipe_ratio:.2} reclaim_100k_ms={reclaim_full:.2} reclaim_empty_ms={reclaim_empty:.2} outbound_median_ms={outbound_median:.2} outbound_bwrap_median_ms={outbound_bwrap:.2} outbound_ratio={outbound_ratio:.2}"
    );
    Ok(())
}
