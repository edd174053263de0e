//! Privileged tests of per-job cgroups: real groups, real processes, real limits.
//!
//! They need root and a cgroup hierarchy at `/sys/fs/cgroup` (or `AIRLOCK_CGROUP_ROOT`);
//! without them they fail and say what is missing, never skip. Each test works in its own
//! parent group `al-test-<pid>-<name>`, which a Drop guard reaps (kill, rmdir) even when the
//! test fails. On a pure v2 host the limits go through v2; on a hybrid host whose v2 has no
//! controllers, through the v1 pids/memory/cpu fallback.

use std::fs;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use airlock::sandbox::cgroup::{
    Backend, CgroupError, CgroupRoot, Controller, JobCgroup, KillMethod, Limits, ParentGroup,
};

const TEARDOWN: Duration = Duration::from_secs(10);

fn mount_root() -> PathBuf {
    std::env::var_os("AIRLOCK_CGROUP_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

/// The test's parent group; dropping it kills and removes everything below it.
struct TestParent {
    parent: ParentGroup,
}

impl TestParent {
    fn new(name: &str) -> TestParent {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the cgroup tests need root (they create cgroups and kill processes): run them as root"
        );
        let root = CgroupRoot::detect(&mount_root())
            .unwrap_or_else(|e| panic!("cgroup tests need cgroup v2: {e}"));
        let rel = format!("al-test-{}-{name}", std::process::id());
        let parent = root
            .open_parent(Path::new(&rel))
            .unwrap_or_else(|e| panic!("cannot create the test parent group: {e}"));
        TestParent { parent }
    }

    fn parent_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.parent.path().to_path_buf()];
        for c in Controller::ALL {
            if let Backend::V1(d) = self.parent.backend(c) {
                dirs.push(d.clone());
            }
        }
        dirs
    }

    fn job_id(&self, n: u32) -> String {
        format!("j-{:08x}{n:08x}", std::process::id())
    }
}

impl Drop for TestParent {
    fn drop(&mut self) {
        if let Ok(jobs) = self.parent.list_orphans() {
            for job in jobs {
                if let Err(e) = job.teardown(TEARDOWN) {
                    eprintln!("cleanup: {e}");
                }
            }
        }
        // Whatever else a test made below the parent (plain directories only).
        for dir in self.parent_dirs() {
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        let _ = fs::remove_dir(e.path());
                    }
                }
            }
        }
        if let Err(e) = self.parent.remove() {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Starts `script` inside the job's groups the way the shim will: the child writes its own
/// pid into every `cgroup.procs` before it `exec`s the job, so nothing it forks is outside.
fn spawn_in(job: &JobCgroup, script: &str) -> Child {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(r#"for f in "$@"; do echo $$ > "$f" || exit 99; done; exec /bin/sh -c "$JOB""#)
        .arg("sh")
        .args(job.procs_files())
        .env("JOB", script)
        .env("RUNNER_TRACKING_ID", "github_airlock_test")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn /bin/sh")
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the job did not end in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `/proc/<pid>/stat` fields after the command name.
fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => panic!("/proc/{pid}/stat: {e}"),
    };
    let rest = &stat[stat.rfind(')').expect("stat has a comm") + 2..];
    let mut f = rest.split(' ');
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Dead: gone, or a zombie waiting for its (possibly non-reaping) init to collect it.
fn is_dead(pid: u32) -> bool {
    matches!(proc_state(pid), None | Some(('Z', _)))
}

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn has_tracking_id(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/environ"))
        .map(|env| {
            env.split(|b| *b == 0)
                .any(|v| v.starts_with(b"RUNNER_TRACKING_ID="))
        })
        .unwrap_or(false)
}

fn assert_removed(job: &JobCgroup) {
    let left = job.verify_gone();
    assert!(left.is_empty(), "left behind: {left:?}");
    for dir in job.dirs() {
        assert!(!dir.exists(), "{} still exists", dir.display());
    }
}

#[test]
fn teardown_kills_every_process_including_double_forked_escapees() {
    let t = TestParent::new("kill");
    let job = t
        .parent
        .create_job(&t.job_id(1), &Limits::default())
        .unwrap();
    let script = "sleep 101 & sleep 102 & (setsid sleep 103 &); \
                  (unset RUNNER_TRACKING_ID; setsid sh -c 'sleep 104 & exit 0' &); \
                  exec sleep 105";
    let mut child = spawn_in(&job, script);
    let sleeps = || {
        job.pids()
            .unwrap()
            .into_iter()
            .filter(|p| comm(*p) == "sleep")
            .collect::<Vec<_>>()
    };
    wait_for(
        "five sleeps in the job's group",
        Duration::from_secs(10),
        || sleeps().len() == 5,
    );
    let pids = job.pids().unwrap();
    // The escapees are real: re-parented away from the job and (one) without the tracking id.
    let escaped: Vec<_> = pids
        .iter()
        .filter(|p| proc_state(**p).is_some_and(|(_, ppid)| ppid != child.id()))
        .filter(|p| *p != &child.id())
        .collect();
    assert!(escaped.len() >= 2, "expected escapees among {pids:?}");
    assert!(
        pids.iter().any(|p| !has_tracking_id(*p)),
        "expected a process without RUNNER_TRACKING_ID"
    );

    let report = job.teardown(TEARDOWN).unwrap();
    assert_ne!(report.method, KillMethod::NothingToKill);
    assert!(report.processes_killed >= 5, "{report:?} for {pids:?}");
    let status = wait_child(&mut child, Duration::from_secs(5));
    assert_eq!(status.signal(), Some(9), "{status:?}");
    for pid in &pids {
        assert!(is_dead(*pid), "pid {pid} ({}) survived", comm(*pid));
    }
    assert_removed(&job);
    assert_eq!(report.removed.len(), job.dirs().count());
}

#[test]
fn loop_kill_without_cgroup_kill_still_takes_everything() {
    let t = TestParent::new("loop");
    let job = t
        .parent
        .create_job(&t.job_id(1), &Limits::default())
        .unwrap()
        .without_cgroup_kill();
    let script = "for i in 1 2 3 4 5 6 7 8; do sleep 100 & done; \
                  (unset RUNNER_TRACKING_ID; setsid sh -c 'sleep 100 & exit 0' &); \
                  exec sleep 100";
    let mut child = spawn_in(&job, script);
    wait_for(
        "ten sleeps in the job's group",
        Duration::from_secs(10),
        || {
            job.pids()
                .unwrap()
                .into_iter()
                .filter(|p| comm(*p) == "sleep")
                .count()
                == 10
        },
    );
    let pids = job.pids().unwrap();
    let report = job.teardown(TEARDOWN).unwrap();
    assert_eq!(report.method, KillMethod::LoopKill);
    assert_eq!(
        wait_child(&mut child, Duration::from_secs(5)).signal(),
        Some(9)
    );
    for pid in &pids {
        assert!(is_dead(*pid), "pid {pid} ({}) survived", comm(*pid));
    }
    assert_removed(&job);
}

#[test]
fn pids_limit_stops_a_fork_loop() {
    let t = TestParent::new("pids");
    assert_ne!(
        *t.parent.backend(Controller::Pids),
        Backend::Unavailable,
        "this host cannot enforce pids.max: {:?}",
        t.parent.warnings()
    );
    let limits = Limits {
        pids_max: Some(16),
        ..Limits::default()
    };
    let job = t.parent.create_job(&t.job_id(1), &limits).unwrap();
    let mut child = spawn_in(
        &job,
        "i=0; while [ $i -lt 200 ]; do sleep 100 & i=$((i+1)); done; exec sleep 100",
    );
    wait_for("a refused fork", Duration::from_secs(10), || {
        job.stats().pids_limit_hits.unwrap_or(0) > 0
    });
    let stats = job.stats();
    let in_group = job.pids().unwrap().len();
    assert!(
        in_group <= 16,
        "{in_group} processes in a group limited to 16"
    );
    assert!(stats.pids_current.is_some_and(|n| n <= 16), "{stats:?}");
    assert!(
        in_group >= 10,
        "the loop should have got close to the limit: {in_group}"
    );

    job.teardown(TEARDOWN).unwrap();
    wait_child(&mut child, Duration::from_secs(5));
    assert_removed(&job);
}

#[test]
fn memory_limit_kills_the_job_not_the_agent() {
    let t = TestParent::new("mem");
    assert_ne!(
        *t.parent.backend(Controller::Memory),
        Backend::Unavailable,
        "this host cannot enforce memory.max: {:?}",
        t.parent.warnings()
    );
    let limits = Limits {
        memory_max_bytes: Some(64 << 20),
        pids_max: Some(64),
        ..Limits::default()
    };
    let job = t.parent.create_job(&t.job_id(1), &limits).unwrap();
    // `tail` keeps its whole input when it holds no newline: 256 MiB against a 64 MiB limit.
    let mut child = spawn_in(&job, "head -c 268435456 /dev/zero | tail; exit $?");
    let status = wait_child(&mut child, Duration::from_secs(60));
    // v1 kills the largest process (tail, so sh exits 137); v2 with memory.oom.group kills
    // the whole job, sh included.
    assert!(
        status.code() == Some(137) || status.signal() == Some(9),
        "the job should have been OOM-killed: {status:?}"
    );
    let stats = job.stats();
    assert!(stats.oom_kills.is_some_and(|n| n >= 1), "{stats:?}");
    // The agent (this test process) is not in the job's group and is still here.
    assert!(!job.pids().unwrap().contains(&std::process::id()));
    assert!(proc_state(std::process::id()).is_some());

    job.teardown(TEARDOWN).unwrap();
    assert_removed(&job);
}

#[test]
fn orphaned_groups_are_found_and_reaped() {
    let t = TestParent::new("orphan");
    let id = t.job_id(7);
    let mut child = {
        let job = t.parent.create_job(&id, &Limits::default()).unwrap();
        let child = spawn_in(&job, "exec sleep 100");
        wait_for("the job's process", Duration::from_secs(5), || {
            job.pids().unwrap() == [child.id()]
        });
        child
        // The handle is dropped, as after an agent crash.
    };
    // Not job groups: ignored.
    fs::create_dir(t.parent.path().join("not-a-job")).unwrap();
    fs::create_dir(t.parent.path().join("job-zzz")).unwrap();

    let orphans = t.parent.list_orphans().unwrap();
    let ids: Vec<_> = orphans.iter().map(|j| j.job_id().to_string()).collect();
    assert_eq!(ids, [id]);
    let report = orphans[0].teardown(TEARDOWN).unwrap();
    assert_eq!(report.processes_killed, 1);
    assert_eq!(
        wait_child(&mut child, Duration::from_secs(5)).signal(),
        Some(9)
    );
    assert!(is_dead(child.id()));
    assert_removed(&orphans[0]);
    assert!(t.parent.list_orphans().unwrap().is_empty());
    fs::remove_dir(t.parent.path().join("not-a-job")).unwrap();
    fs::remove_dir(t.parent.path().join("job-zzz")).unwrap();
}

#[test]
fn teardown_of_an_empty_or_missing_group_is_fine() {
    let t = TestParent::new("empty");
    let job = t
        .parent
        .create_job(&t.job_id(1), &Limits::default())
        .unwrap();
    let mut child = spawn_in(&job, "exit 3");
    assert_eq!(
        wait_child(&mut child, Duration::from_secs(5)).code(),
        Some(3)
    );
    let report = job.teardown(TEARDOWN).unwrap();
    assert_eq!(report.method, KillMethod::NothingToKill);
    assert_eq!(report.removed.len(), job.dirs().count());
    assert_removed(&job);
    // Again, with everything already gone.
    let again = job.teardown(TEARDOWN).unwrap();
    assert!(again.removed.is_empty(), "{again:?}");
}

#[test]
fn an_existing_group_is_never_reused_and_a_failed_create_leaves_nothing() {
    let t = TestParent::new("exists");
    let id = t.job_id(1);
    let job = t.parent.create_job(&id, &Limits::default()).unwrap();
    let e = t.parent.create_job(&id, &Limits::default()).unwrap_err();
    assert!(matches!(e, CgroupError::Exists(_)), "{e}");
    assert!(job.path().is_dir(), "the first job's group is untouched");
    job.teardown(TEARDOWN).unwrap();

    // A limit the kernel refuses after the directories exist: pids.max must stay below
    // PID_MAX_LIMIT + 1 (4194305), in v1 and v2 alike.
    assert_ne!(*t.parent.backend(Controller::Pids), Backend::Unavailable);
    let other = t.job_id(2);
    let bad = Limits {
        pids_max: Some(10_000_000),
        ..Limits::default()
    };
    let e = t.parent.create_job(&other, &bad).unwrap_err();
    assert!(e.to_string().contains("cannot write \"10000000\""), "{e}");
    assert_removed(&t.parent.job(&other).unwrap());
}

#[test]
fn the_agent_can_place_a_running_process() {
    let t = TestParent::new("place");
    let job = t
        .parent
        .create_job(&t.job_id(1), &Limits::default())
        .unwrap();
    let mut child = Command::new("sleep").arg("100").spawn().unwrap();
    job.place(child.id()).unwrap();
    assert_eq!(job.pids().unwrap(), [child.id()]);
    for file in job.procs_files() {
        let text = fs::read_to_string(&file).unwrap();
        assert_eq!(text.trim(), child.id().to_string(), "{}", file.display());
    }
    job.teardown(TEARDOWN).unwrap();
    assert_eq!(
        wait_child(&mut child, Duration::from_secs(5)).signal(),
        Some(9)
    );
    assert_removed(&job);
}
