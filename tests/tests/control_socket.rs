//! Who may use the control socket, and for which jobs, end to end: a real `airlockd` whose
//! `control_group` is `nogroup`, and callers that are not root (as runner users are: a
//! Buildkite agent, a persistent GitHub runner whose steps run as the same user). Each
//! caller is a long-lived shell of its own user — the process its jobs belong to — that runs
//! `airlock` commands as its children.
//!
//! Privileged (root: the agent, and switching to the callers' users).

use airlock_tests::oidc::GithubJob;
use airlock_tests::paths;
use airlock_tests::stack::Stack;
use serde_json::Value;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A runner user in the control group through a supplementary group only.
const RUNNER_UID: u32 = 65530;
/// A user outside it.
const STRANGER_UID: u32 = 65529;
const CONTROL_GID: u32 = 65534;

fn prereqs() {
    airlock_tests::prereq::require_root_and(
        "the control socket tests",
        &[("setpriv", "util-linux"), ("python3", "python3")],
    );
}

/// A shell of `uid` (primary group its own, `groups` supplementary) that runs the lines it
/// is given, one at a time, each with its output and status in files.
struct Shell {
    child: Child,
    dir: PathBuf,
    n: usize,
}

impl Shell {
    fn start(uid: u32, groups: &[u32], dir: &Path) -> Shell {
        let dir = dir.join(format!("shell-{uid}-{}", rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).unwrap();
        let mut c = Command::new("setpriv");
        c.arg("--reuid")
            .arg(uid.to_string())
            .arg("--regid")
            .arg(uid.to_string());
        if groups.is_empty() {
            c.arg("--clear-groups");
        } else {
            let g: Vec<String> = groups.iter().map(u32::to_string).collect();
            c.arg("--groups").arg(g.join(","));
        }
        let child = c
            .args([
                "--",
                "/bin/bash",
                "-c",
                "while IFS= read -r line; do eval \"$line\"; done",
            ])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Shell { child, dir, n: 0 }
    }

    /// The shell's pid: the process its jobs belong to.
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `cmd` in the shell; returns (status, stdout, stderr).
    fn run(&mut self, cmd: &str) -> (i32, String, String) {
        self.n += 1;
        let n = self.n;
        let line =
            format!("{cmd} > out.{n} 2> err.{n}; echo $? > rc.{n}.tmp; mv rc.{n}.tmp rc.{n}\n");
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.flush().unwrap();
        let rc = self.dir.join(format!("rc.{n}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !rc.exists() {
            assert!(Instant::now() < deadline, "`{cmd}` did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
        let read = |f: String| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        (
            read(format!("rc.{n}")).trim().parse().unwrap(),
            read(format!("out.{n}")),
            read(format!("err.{n}")),
        )
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::time::SystemTime;
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

/// The agent, with `nogroup` as its control group, and a directory the callers can read.
fn setup() -> (Stack, tempfile::TempDir, String) {
    prereqs();
    let mut stack = Stack::start();
    stack
        .agent
        .open_to_group("nogroup")
        .expect("airlockd restarts with a control group");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = format!(
        "{} --socket {}",
        paths::bin("airlock").display(),
        stack.agent.socket_path().display()
    );
    (stack, dir, base)
}

/// A token file the callers can read.
fn token_file(dir: &Path, who: &GithubJob, name: &str) -> PathBuf {
    let f = dir.join(name);
    std::fs::write(&f, who.token()).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    f
}

fn job_id(out: &str) -> String {
    let v: Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["job_id"].as_str().unwrap().to_string()
}

fn listed(stack: &Stack) -> Vec<String> {
    let o = stack.agent.cli(&["job", "list", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap().to_string())
        .collect()
}

/// The documented setup (`usermod -aG <control group> <runner user>`) gives the runner's
/// user the group as a supplementary one: it may use the socket. A user in neither group is
/// refused, whatever it asks.
#[test]
fn a_supplementary_control_group_is_enough_and_other_users_are_refused() {
    let (stack, dir, base) = setup();
    let mut member = Shell::start(RUNNER_UID, &[CONTROL_GID], dir.path());
    let (rc, out, err) = member.run(&format!("{base} job list --json"));
    assert_eq!(rc, 0, "{out}{err}");
    assert_eq!(out.trim(), "[]");
    let mut stranger = Shell::start(STRANGER_UID, &[], dir.path());
    // The socket's own mode (0660, the control group's) already keeps it out; an operator
    // who loosened that mode still has the agent's own check of every connection.
    let (rc, _, err) = stranger.run(&format!("{base} job list --json"));
    assert_ne!(rc, 0);
    assert!(err.contains("Permission denied"), "{err}");
    std::fs::set_permissions(
        stack.agent.socket_path(),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let (rc, out, err) = stranger.run(&format!("{base} job list --json"));
    assert_ne!(rc, 0, "{out}{err}");
    assert!(err.contains("only root or the control group"), "{err}");
    assert!(
        stack.agent.log().contains("control connection refused"),
        "{}",
        stack.agent.log()
    );
    member.kill();
    stranger.kill();
}

/// Two runners of the same user (a persistent GitHub runner's steps run as that user and
/// can reach the socket): each acts on its own jobs only. One cannot end, exec, bind or see
/// the other's job, nor claim the other's process as its job's owner; root can do all of it.
/// A job whose owner exits is ended by the agent.
#[test]
fn callers_act_only_on_the_jobs_of_their_own_owner_process() {
    let (stack, dir, base) = setup();
    let prod = token_file(dir.path(), &GithubJob::production(), "prod.jwt");
    let staging = token_file(dir.path(), &GithubJob::staging(), "staging.jwt");
    let mut a = Shell::start(RUNNER_UID, &[CONTROL_GID], dir.path());
    let mut b = Shell::start(RUNNER_UID, &[CONTROL_GID], dir.path());

    // Each starts a job; by default it belongs to the calling shell (the CLI's parent).
    let (rc, out, err) = a.run(&format!(
        "{base} job start --oidc-token-file {}",
        prod.display()
    ));
    assert_eq!(rc, 0, "{out}{err}");
    let job_a = job_id(&out);
    let (rc, out, err) = b.run(&format!(
        "{base} job start --oidc-token-file {}",
        staging.display()
    ));
    assert_eq!(rc, 0, "{out}{err}");
    let job_b = job_id(&out);
    let rec = |job: &str| {
        stack
            .agent
            .audit_records()
            .into_iter()
            .find(|r| r["event"] == "job_started" && r["job"] == job)
            .unwrap()
    };
    assert!(rec(&job_a).to_string().contains("web-production"));

    // B sees only its own job.
    let (rc, out, _) = b.run(&format!("{base} job list --json"));
    assert_eq!(rc, 0);
    assert!(out.contains(&job_b) && !out.contains(&job_a), "{out}");
    // B cannot end, exec in, or bind A's job.
    for cmd in [
        format!("{base} job end {job_a}"),
        format!("{base} job exec {job_a} -- true"),
        format!(
            "{base} job bind {job_a} --oidc-token-file {}",
            staging.display()
        ),
    ] {
        let (rc, out, err) = b.run(&cmd);
        assert_eq!(rc, 77, "`{cmd}`: {out}{err}");
        assert!(
            err.contains("does not belong to this caller"),
            "`{cmd}`: {err}"
        );
    }
    // Nor name A's shell as the owner of a job of its own (it is not B's ancestor).
    let (rc, out, err) = b.run(&format!(
        "{base} job start --owner-pid {} --oidc-token-file {}",
        a.pid(),
        staging.display()
    ));
    assert_eq!(rc, 77, "{out}{err}");
    assert!(err.contains("nor one of its ancestors"), "{err}");
    // Nor start a job without an owner at all (the raw API: the CLI always names one).
    let script = dir.path().join("raw-start.py");
    std::fs::write(
        &script,
        r#"import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
body = json.dumps({"oidc_token": open(sys.argv[2]).read().strip()})
s.sendall(("POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           "Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body).encode())
print(s.recv(65536).decode())
"#,
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let raw = format!(
        "/usr/bin/python3 {} {} {}",
        script.display(),
        stack.agent.socket_path().display(),
        staging.display()
    );
    let (_, out, err) = b.run(&raw);
    assert!(
        out.contains("400") && out.contains("OwnerRequired"),
        "{out}{err}"
    );
    // A's job is untouched by all of it; A ends its own.
    assert!(listed(&stack).contains(&job_a));
    let (rc, out, err) = a.run(&format!("{base} job end {job_a}"));
    assert_eq!(rc, 0, "{out}{err}");
    assert!(!listed(&stack).contains(&job_a));

    // B's shell exits: the agent ends its job.
    assert!(listed(&stack).contains(&job_b));
    b.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    while listed(&stack).contains(&job_b) {
        assert!(Instant::now() < deadline, "B's job outlived its owner");
        std::thread::sleep(Duration::from_millis(100));
    }
    let ended = stack
        .agent
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == "job_ended" && r["job"] == job_b.as_str())
        .unwrap();
    assert!(
        ended["reason"]
            .as_str()
            .is_some_and(|r| r.contains("owner process") && r.contains("exited")),
        "{ended}"
    );

    // Root acts on any job: a job of A's, ended by root.
    let (rc, out, err) = a.run(&format!(
        "{base} job start --oidc-token-file {}",
        prod.display()
    ));
    assert_eq!(rc, 0, "{out}{err}");
    let job_a2 = job_id(&out);
    let end = stack.agent.end_job(&job_a2);
    assert!(end.status.success(), "{end:?}");
    a.kill();
}

/// Draining is an operator's action: a member of the control group (a runner's user) may
/// neither drain the agent, nor see or cancel a drain, and the agent keeps taking its jobs.
#[test]
fn only_root_may_drain() {
    let (stack, dir, base) = setup();
    let prod = token_file(dir.path(), &GithubJob::production(), "prod.jwt");
    let mut member = Shell::start(RUNNER_UID, &[CONTROL_GID], dir.path());
    for args in [
        "--timeout 1s",
        "--stop --timeout 1s",
        "--status",
        "--cancel",
    ] {
        let (rc, out, err) = member.run(&format!("{base} drain {args}"));
        assert_eq!(rc, 77, "drain {args}: {out}{err}");
        assert!(err.contains("only root may"), "drain {args}: {err}");
    }
    let status = stack.agent.cli(&["drain", "--status"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["draining"], false, "{status}");
    let (rc, out, err) = member.run(&format!(
        "{base} job start --oidc-token-file {}",
        prod.display()
    ));
    assert_eq!(rc, 0, "the member's jobs still start: {out}{err}");
    assert!(
        !stack
            .agent
            .audit_records()
            .iter()
            .any(|r| r["event"] == "drain_started"),
        "a refused drain leaves no drain record"
    );
    member.kill();
}
