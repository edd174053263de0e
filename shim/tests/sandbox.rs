//! Privileged integration tests: each runs the real `airlock-shim` binary (as root, like the
//! agent does) with a small job — usually `shim-probe report`, which tries what a hostile
//! job would — and asserts the specific outcome. They never skip: without root they fail
//! and say so. Everything the shim mounts lives in its own mount namespace and disappears
//! with it; the job's tmpfs (mounted on the host, as the agent does), the directories,
//! cgroups and helper processes the tests create are removed by Drop guards, also on
//! failure.

use airlock_shim::{BindMount, Rlimits, SandboxSpec, SpecFile};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const SHIM: &str = env!("CARGO_BIN_EXE_airlock-shim");
/// Where the tests keep what a job must see: not under /tmp (the job's /tmp is a fresh
/// tmpfs that would cover it), and the target directory may itself lie under /tmp.
const BASE: &str = "/var/cache/airlock/shim-tests";

/// The probe binary, copied next to the tests' sandboxes so a job can run it.
fn probe() -> &'static str {
    static P: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        std::fs::create_dir_all(BASE).unwrap();
        std::fs::set_permissions(BASE, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dest = Path::new(BASE).join("shim-probe");
        // Atomic replace: concurrent test processes copy the same bytes.
        let tmp = Path::new(BASE).join(format!(".shim-probe.{}", std::process::id()));
        std::fs::copy(env!("CARGO_BIN_EXE_shim-probe"), &tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &dest).unwrap();
        dest.display().to_string()
    })
}
const JOB_UID: u32 = 65534;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "privileged test: run as root (CI runs the shim tests as root); the shim needs CAP_SYS_ADMIN"
    );
}

/// A tmpfs mounted on the host for a test, detached on drop (before its directory goes).
struct HostMount(PathBuf);

impl HostMount {
    fn tmpfs(at: &Path, options: &str) -> HostMount {
        std::fs::create_dir_all(at).unwrap();
        mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options),
        )
        .unwrap_or_else(|e| panic!("cannot mount a tmpfs at {at:?}: {e}"));
        HostMount(at.to_path_buf())
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

/// One job's sandbox: a private directory (visible to the job, read-only, because the host
/// is), the job's tmpfs in it (`fs`, laid out as the agent does: `tmp`, `run`, `home`), its
/// spec and the run. `fs` is declared first, so it is detached before the directory goes.
struct Sandbox {
    fs: HostMount,
    dir: tempfile::TempDir,
    spec: SandboxSpec,
}

impl Sandbox {
    fn new(argv: &[&str]) -> Self {
        require_root();
        // Not under /tmp: the job's /tmp is a fresh tmpfs that would cover it.
        let _ = probe();
        let dir = tempfile::Builder::new()
            .prefix("al-shim-")
            .tempdir_in(BASE)
            .expect("temp dir under /var/cache/airlock/shim-tests");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = dir.path().join("root");
        let home = dir.path().join("home");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&home).unwrap();
        let fs = HostMount::tmpfs(&dir.path().join("fs"), "size=8388608,mode=0755");
        for (sub, mode, owner) in [
            ("tmp", 0o1777, 0),
            ("run", 0o755, 0),
            ("home", 0o700, JOB_UID),
        ] {
            let d = fs.0.join(sub);
            std::fs::create_dir(&d).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
            std::os::unix::fs::chown(&d, Some(owner), Some(owner)).unwrap();
        }
        let bind = |sub: &str, target: &Path| BindMount {
            source: fs.0.join(sub),
            target: target.to_path_buf(),
        };
        let spec = SandboxSpec {
            job_id: "al-test".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::from([
                ("HOME".into(), home.display().to_string()),
                ("PATH".into(), "/usr/bin:/bin".into()),
            ]),
            cwd: "/".into(),
            uid: JOB_UID,
            gid: JOB_UID,
            root_dir: root,
            hostname: "al-job".into(),
            netns: None,
            cgroups: vec![],
            binds: vec![
                bind("tmp", Path::new("/tmp")),
                bind("run", Path::new("/run")),
                bind("home", &home),
            ],
            files: vec![],
            resolv_conf: None,
            hide: vec![],
            rlimits: Rlimits {
                nofile: Some(1024),
                nproc: None,
                core: None,
            },
            status_file: None,
        };
        Sandbox { fs, dir, spec }
    }

    fn probe() -> Self {
        Self::new(&[probe(), "report"])
    }

    fn command(&self) -> Command {
        let path = self.dir.path().join("spec.json");
        std::fs::write(&path, serde_json::to_vec(&self.spec).unwrap()).unwrap();
        let mut c = Command::new(SHIM);
        c.arg("--spec")
            .arg(path)
            .env("AL_AGENT_SECRET", "must-not-leak");
        c
    }

    fn run(&self) -> Output {
        self.command().output().expect("run airlock-shim")
    }

    /// Runs the probe and returns its report; the job must succeed.
    fn report(&self) -> HashMap<String, String> {
        let out = self.run();
        assert!(
            out.status.success(),
            "shim failed: {:?}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        parse(&out.stdout)
    }
}

fn parse(stdout: &[u8]) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let mut last = None;
    for line in String::from_utf8_lossy(stdout).lines() {
        match line.split_once('=') {
            Some((k, v)) if !k.contains(':') && !k.is_empty() => {
                map.insert(k.to_string(), v.to_string());
                last = Some(k.to_string());
            }
            // Continuation of a multi-line value (/proc/self/cgroup).
            _ => {
                if let Some(k) = &last {
                    let v: &mut String = map.get_mut(k).unwrap();
                    v.push('\n');
                    v.push_str(line);
                }
            }
        }
    }
    map
}

fn get<'a>(r: &'a HashMap<String, String>, k: &str) -> &'a str {
    r.get(k)
        .unwrap_or_else(|| panic!("probe did not report {k}: {r:?}"))
}

#[test]
fn job_is_pid_1_and_sees_no_host_process() {
    let r = Sandbox::probe().report();
    assert_eq!(get(&r, "pid"), "1");
    assert_eq!(get(&r, "procs"), "[1]");
    assert_eq!(get(&r, "hostname"), "al-job");
}

#[test]
fn job_runs_as_its_user_without_any_capability_under_seccomp() {
    let r = Sandbox::probe().report();
    for k in ["uid", "euid", "gid"] {
        assert_eq!(get(&r, k), JOB_UID.to_string(), "{k}");
    }
    assert_eq!(get(&r, "groups"), "[]");
    for k in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(get(&r, k), "0000000000000000", "{k}");
    }
    assert_eq!(get(&r, "NoNewPrivs"), "1");
    assert_eq!(get(&r, "Seccomp"), "2");
    assert_eq!(get(&r, "setuid0"), "EPERM");
}

#[test]
fn host_is_read_only_and_the_jobs_directories_are_empty_and_writable() {
    let sb = Sandbox::probe();
    let r = sb.report();
    assert_eq!(get(&r, "write_root"), "EROFS");
    assert_eq!(get(&r, "write_usr"), "EROFS");
    assert_eq!(get(&r, "tmp_entries"), "0");
    assert_eq!(get(&r, "write_tmp"), "ok");
    assert_eq!(get(&r, "home_entries"), "0");
    assert_eq!(get(&r, "write_home"), "ok");
    // The writes went to the job's tmpfs, not to the host's disk.
    let home = sb.dir.path().join("home");
    assert_eq!(std::fs::read_dir(&home).unwrap().count(), 0);
    assert!(!Path::new("/al-probe").exists() && !Path::new("/usr/al-probe").exists());
    assert!(sb.fs.0.join("tmp/al-probe").is_file());
    assert!(sb.fs.0.join("home/al-probe").is_file());
    // Bound nosuid and nodev, writable.
    for dir in ["/tmp".to_string(), home.display().to_string()] {
        let opts = get(&r, &format!("mount_options {dir}"));
        let opts: Vec<&str> = opts.split(',').collect();
        assert!(
            opts.contains(&"rw") && opts.contains(&"nosuid") && opts.contains(&"nodev"),
            "{dir}: {opts:?}"
        );
    }
    // A minimal /dev.
    assert_eq!(
        get(&r, "dev_entries"),
        "fd,full,null,ptmx,pts,random,shm,stderr,stdin,stdout,tty,urandom,zero"
    );
    assert_eq!(get(&r, "write_dev_null"), "ok");
}

#[test]
fn hidden_paths_are_empty_and_read_only() {
    let mut sb = Sandbox::probe();
    let secret_dir = sb.dir.path().join("state");
    std::fs::create_dir(&secret_dir).unwrap();
    std::fs::write(secret_dir.join("token"), "s3cr3t-in-dir").unwrap();
    let secret_file = sb.dir.path().join("audit.log");
    std::fs::write(&secret_file, "s3cr3t-in-file").unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    sb.spec.hide = vec![
        secret_dir.clone(),
        secret_file.clone(),
        "/nonexistent/al-hide".into(),
    ];
    for (k, v) in [
        ("PROBE_HIDDEN_DIR", &secret_dir),
        ("PROBE_HIDDEN_FILE", &secret_file),
    ] {
        sb.spec.env.insert(k.into(), v.display().to_string());
    }
    let r = sb.report();
    assert_eq!(get(&r, "hidden_dir_entries"), "0");
    assert_eq!(get(&r, "hidden_dir_write"), "EROFS");
    assert_eq!(get(&r, "hidden_file"), "");
    // Still there on the host, untouched.
    assert_eq!(
        std::fs::read_to_string(secret_dir.join("token")).unwrap(),
        "s3cr3t-in-dir"
    );
}

/// What the host has mounted under a hidden path or a job directory (another job's tmpfs,
/// a network namespace) is detached in the job's namespace, not only covered: a copy under
/// the cover would keep it alive for as long as the job runs.
#[test]
fn mounts_under_hidden_paths_and_job_directories_are_detached_not_only_covered() {
    let mut sb = Sandbox::probe();
    let state = sb.dir.path().join("state");
    let under_hidden = HostMount::tmpfs(&state.join("other-job-fs"), "size=65536");
    std::fs::write(under_hidden.0.join("token"), "s3cr3t").unwrap();
    let home = sb.dir.path().join("home");
    let under_home = HostMount::tmpfs(&home.join("al-inner"), "size=65536");
    sb.spec.hide = vec![state.clone()];
    sb.spec
        .env
        .insert("PROBE_HIDDEN_DIR".into(), state.display().to_string());
    let r = sb.report();
    assert_eq!(get(&r, "hidden_dir_entries"), "0");
    let points: Vec<&str> = get(&r, "mount_points").split(',').collect();
    let state = state.display().to_string();
    let home = home.display().to_string();
    let under = |p: &str, dir: &str| p == dir || p.starts_with(&format!("{dir}/"));
    // Exactly one mount at each (the cover, the job's home), nothing below.
    for dir in [&state, &home, &"/tmp".to_string(), &"/run".to_string()] {
        let here: Vec<&&str> = points.iter().filter(|p| under(p, dir)).collect();
        assert_eq!(
            here,
            [dir],
            "mounts at or under {dir} in the job: {points:?}"
        );
    }
    // Still mounted on the host.
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for m in [&under_hidden, &under_home] {
        assert!(host.contains(&m.0.display().to_string()), "{m:?}", m = m.0);
    }
}

#[test]
fn escapes_are_refused_with_the_specific_error() {
    let r = Sandbox::probe().report();
    for k in [
        "mount",
        "unshare_mnt",
        "unshare_user",
        "setns",
        "bpf",
        "keyctl",
        "add_key",
        "io_uring_setup",
        "ptrace",
        "vsock",
        "packet",
        "tiocsti",
    ] {
        assert_eq!(get(&r, k), "EPERM", "{k} must be refused by seccomp");
    }
    assert_eq!(
        get(&r, "clone3"),
        "ENOSYS",
        "clone3 must look unimplemented"
    );
    // Allowed by seccomp, refused by the kernel: no CAP_NET_RAW.
    assert_eq!(get(&r, "raw"), "EPERM");
    // What ordinary jobs need still works (clone without namespace flags, TCP, Unix).
    assert_eq!(get(&r, "fork"), "exit status: 0");
    assert_eq!(get(&r, "tcp"), "ok");
    assert_eq!(get(&r, "unix"), "ok");
}

/// Removes a file that the test made setuid root, also on failure.
struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_setuid_root_binary_does_not_escalate() {
    let mut sb = Sandbox::new(&[]);
    let suid = sb.dir.path().join("suid-probe");
    std::fs::copy(probe(), &suid).unwrap();
    let _guard = RemoveOnDrop(suid.clone());
    std::os::unix::fs::chown(&suid, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    // The bit is really set (so a euid of 65534 below means the sandbox stopped it).
    let meta = std::fs::metadata(&suid).unwrap();
    assert_eq!(meta.permissions().mode() & 0o4000, 0o4000);
    sb.spec.argv = vec![suid.display().to_string(), "euid".into()];
    let r = sb.report();
    assert_eq!(get(&r, "euid"), JOB_UID.to_string());
}

#[test]
fn the_jobs_files_are_written_into_its_tmpfs_for_it_alone() {
    let mut sb = Sandbox::new(&[
        "/bin/sh",
        "-c",
        "stat -c '%a %u' /run/airlock/token && cat /run/airlock/token",
    ]);
    sb.spec.files.push(SpecFile {
        path: "/run/airlock/token".into(),
        contents: "job-endpoint-token".into(),
        mode: 0o400,
    });
    let out = sb.run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("400 {JOB_UID}\njob-endpoint-token")
    );
    // Nothing reached the host's /run.
    assert!(!Path::new("/run/airlock/token").exists());
    // A file outside the job's tmpfs is refused before anything runs.
    sb.spec.files[0].path = "/etc/cron.d/al-evil".into();
    let out = sb.run();
    assert_eq!(out.status.code(), Some(125));
    assert!(!Path::new("/etc/cron.d/al-evil").exists());
}

#[test]
fn the_job_gets_its_own_read_only_resolv_conf() {
    let host_before = std::fs::read_to_string("/etc/resolv.conf").ok();
    let mut sb = Sandbox::new(&[
        "/bin/sh",
        "-c",
        "cat /etc/resolv.conf; stat -L -c 'mode=%a uid=%u' /etc/resolv.conf; \
         (echo x >> /etc/resolv.conf) 2>/dev/null && echo write=ok || echo write=refused",
    ]);
    sb.spec.resolv_conf = Some("nameserver 169.254.170.53\n".into());
    let out = sb.run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        "nameserver 169.254.170.53\nmode=644 uid=0\nwrite=refused\n"
    );
    // The host's file is untouched.
    assert_eq!(
        std::fs::read_to_string("/etc/resolv.conf").ok(),
        host_before
    );
    // Without it, the job reads the host's.
    sb.spec.resolv_conf = None;
    let out = sb.run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(host) = &host_before {
        assert!(stdout.starts_with(host.as_str()), "{stdout}");
    }
}

#[test]
fn the_environment_is_exactly_the_spec() {
    let mut sb = Sandbox::probe();
    sb.spec.env.insert(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI".into(),
        "http://169.254.170.2/v1".into(),
    );
    let r = sb.report();
    // The shim itself was started with AL_AGENT_SECRET set; the job must not see it.
    assert_eq!(
        get(&r, "env_keys"),
        "AWS_CONTAINER_CREDENTIALS_FULL_URI,HOME,PATH"
    );
}

#[test]
fn an_inherited_descriptor_is_closed_before_the_job_runs() {
    let mut sb = Sandbox::new(&[]);
    // Without O_CLOEXEC, so the shim inherits it.
    let fd = nix::fcntl::open(
        "/etc/hostname",
        nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    struct CloseOnDrop(i32);
    impl Drop for CloseOnDrop {
        fn drop(&mut self) {
            let _ = nix::unistd::close(self.0);
        }
    }
    let _close = CloseOnDrop(fd);
    sb.spec.env.insert("PROBE_FD".into(), fd.to_string());
    sb.spec.argv = vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("sleep 1; exec {} report", probe()),
    ];
    let child = sb
        .command()
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The shim's parent really holds it (so the probe's EBADF means something).
    let held = Path::new(&format!("/proc/{}/fd/{fd}", child.id())).exists();
    let out = child.wait_with_output().unwrap();
    assert!(
        held,
        "the shim did not inherit fd {fd}; the test proves nothing"
    );
    assert!(out.status.success());
    assert_eq!(get(&parse(&out.stdout), "inherited_fd"), "EBADF");
}

#[test]
fn the_jobs_exit_status_is_the_shims() {
    let sb = Sandbox::new(&[probe(), "exit", "7"]);
    assert_eq!(sb.run().status.code(), Some(7));
    let sb = Sandbox::new(&["/bin/sh", "-c", "exit 3"]);
    assert_eq!(sb.run().status.code(), Some(3));

    // Killed from outside (as the agent would): 128 + SIGKILL.
    let sb = Sandbox::new(&[probe(), "sleep", "30"]);
    let mut child = sb.command().spawn().unwrap();
    let children = format!("/proc/{0}/task/{0}/children", child.id());
    let deadline = Instant::now() + Duration::from_secs(5);
    let job = loop {
        let c = std::fs::read_to_string(&children).unwrap_or_default();
        if let Some(pid) = c.split_whitespace().next() {
            break pid.parse::<i32>().unwrap();
        }
        assert!(Instant::now() < deadline, "the shim never forked its job");
        std::thread::sleep(Duration::from_millis(10));
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(job), nix::sys::signal::SIGKILL).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(137));
}

/// The status file tells a sandbox the shim could not build from a command that ran,
/// whatever their exit statuses (both may be 125), for failures before the fork, in the
/// job's setup before and after its descriptors are closed, and not at all.
#[test]
fn the_status_file_tells_a_setup_failure_from_a_command_that_exits_125() {
    let status = |sb: &mut Sandbox| -> (Option<i32>, String) {
        let file = sb.dir.path().join("spec.status");
        sb.spec.status_file = Some(file.clone());
        let out = sb.run();
        (
            out.status.code(),
            std::fs::read_to_string(&file).unwrap_or_else(|e| format!("unreadable: {e}")),
        )
    };
    let mut ran = Sandbox::new(&["/bin/sh", "-c", "exit 125"]);
    assert_eq!(status(&mut ran), (Some(125), "exited 125\n".into()));
    let mut ok = Sandbox::new(&["/bin/true"]);
    assert_eq!(status(&mut ok), (Some(0), "exited 0\n".into()));
    // Refused before the fork (the spec check).
    let mut root = Sandbox::probe();
    root.spec.uid = 0;
    assert_eq!(status(&mut root), (Some(125), "setup-failed\n".into()));
    // In the job's setup, before its descriptors are closed (a bind) and after (the working
    // directory, the command itself).
    let mut bind = Sandbox::probe();
    bind.spec.binds.push(BindMount {
        source: bind.fs.0.join("tmp"),
        target: "/nonexistent/al-ws".into(),
    });
    assert_eq!(status(&mut bind), (Some(125), "setup-failed\n".into()));
    let mut cwd = Sandbox::probe();
    cwd.spec.cwd = "/nonexistent/al-cwd".into();
    assert_eq!(status(&mut cwd), (Some(125), "setup-failed\n".into()));
    let mut missing = Sandbox::new(&["/nonexistent/al-command"]);
    assert_eq!(status(&mut missing), (Some(125), "setup-failed\n".into()));
    // The job never holds the shim's status pipe or file: it starts with stdin, stdout and
    // stderr only.
    let mut probe = Sandbox::probe();
    probe.spec.status_file = Some(probe.dir.path().join("spec.status"));
    assert_eq!(get(&probe.report(), "open_fds"), "");
}

#[test]
fn a_setup_failure_exits_125_and_names_the_step() {
    let mut sb = Sandbox::probe();
    sb.spec.cwd = "/nonexistent/al-cwd".into();
    let out = sb.run();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("change to the working directory"), "{err}");
    assert!(out.stdout.is_empty(), "the job must not have run");

    let mut sb = Sandbox::probe();
    let source = sb.fs.0.join("tmp");
    sb.spec.binds.push(BindMount {
        source,
        target: "/nonexistent/al-ws".into(),
    });
    let out = sb.run();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bind the job's directories"), "{err}");
    assert!(err.contains("does not exist"), "{err}");

    // A job directory must come from a tmpfs: never the host's disk, writable.
    let mut sb = Sandbox::probe();
    sb.spec.binds[0].source = sb.dir.path().to_path_buf();
    let out = sb.run();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bind the job's directories"), "{err}");
    assert!(err.contains("must be a directory on a tmpfs"), "{err}");
    assert!(out.stdout.is_empty(), "the job must not have run");

    let mut sb = Sandbox::probe();
    sb.spec.uid = 0;
    let out = sb.run();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("never run as root"));
}

/// A cgroup v2 directory made for one test, removed (after its processes are gone) on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new() -> Self {
        let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.controllers").exists())
            .expect("no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified: mount cgroup2 there");
        let dir = root.join(format!(
            "al-shim-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create cgroup {dir:?}: {e}"));
        TestCgroup(dir)
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn the_shim_and_its_job_are_in_the_given_cgroup() {
    let cg = TestCgroup::new();
    let mut sb = Sandbox::new(&[
        "/bin/sh",
        "-c",
        &format!("sleep 1; exec {} report", probe()),
    ]);
    sb.spec.cgroups = vec![cg.0.clone()];
    let child = sb
        .command()
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let shim_pid = child.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut procs = String::new();
    while Instant::now() < deadline {
        procs = std::fs::read_to_string(cg.0.join("cgroup.procs")).unwrap();
        if procs.lines().count() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The shim's parent and the job (its child, pid 1 inside) are both in the cgroup.
    assert!(
        procs.lines().any(|l| l == shim_pid),
        "shim {shim_pid} not in {procs:?}"
    );
    assert!(
        procs.lines().count() >= 2,
        "job not in the cgroup: {procs:?}"
    );
    // The job's cgroup namespace is rooted at its cgroup.
    let r = parse(&out.stdout);
    assert!(get(&r, "cgroup").lines().any(|l| l == "0::/"), "{r:?}");
}

/// A helper process in a fresh network namespace (made with unshare(1)), killed on drop.
struct TestNetns(std::process::Child);

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_given_network_namespace_is_joined_otherwise_a_fresh_empty_one() {
    let host_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    let helper = TestNetns(
        Command::new("unshare")
            .args(["--net", "sleep", "60"])
            .spawn()
            .expect("unshare(1) from util-linux is needed for this test"),
    );
    let ns_path = PathBuf::from(format!("/proc/{}/ns/net", helper.0.id()));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut ns = host_ns.clone();
    while ns == host_ns && Instant::now() < deadline {
        ns = std::fs::read_link(&ns_path).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_ne!(
        ns, host_ns,
        "the helper never entered its own network namespace"
    );

    let mut sb = Sandbox::probe();
    sb.spec.netns = Some(ns_path);
    let r = sb.report();
    assert_eq!(get(&r, "netns"), ns.display().to_string());

    let r = Sandbox::probe().report();
    assert_ne!(get(&r, "netns"), host_ns.display().to_string());
    assert_ne!(get(&r, "netns"), ns.display().to_string());
    assert_eq!(get(&r, "net_devices"), "lo");
}
