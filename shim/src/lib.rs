//! The sandbox spec and the sandbox init, `airlock-shim`.
//!
//! The spec types are shared by the agent (which writes a spec) and the shim (which reads
//! one and ends in `execve`). This crate must never depend on the agent: the shim runs
//! inside the job's new namespaces and knows nothing but its spec.
//!
//! The shim is one module per privileged step (see `docs/sandbox.md` for the order and the
//! reasons); [`steps`] runs them in order through the [`syscalls::Syscalls`] seam, so the
//! order is a unit test that needs no root.

pub mod capabilities;
pub mod cgroup;
pub mod env;
pub mod fds;
pub mod namespaces;
pub mod process;
pub mod rlimits;
pub mod rootfs;
pub mod seccomp;
pub mod steps;
pub mod syscalls;
pub mod user;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// Exit status of the shim when the sandbox could not be built (the job never ran).
/// Distinct from the job's own codes in the usual range, like `docker run`'s 125.
pub const EXIT_SETUP_FAILED: i32 = 125;

/// Everything the shim needs to build one job's sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// The job this sandbox belongs to (for messages only).
    pub job_id: String,
    /// The command to `execve`, argv[0] first. A bare name is looked up in `env`'s `PATH`.
    pub argv: Vec<String>,
    /// The complete environment of the job: nothing is inherited.
    pub env: BTreeMap<String, String>,
    /// Working directory inside the new root.
    pub cwd: PathBuf,
    /// The unprivileged user and group the job runs as (never 0).
    pub uid: u32,
    pub gid: u32,
    /// Host directory, empty, in which the job's root is assembled (it stays empty on the
    /// host: everything is mounted in the job's own mount namespace).
    pub root_dir: PathBuf,
    /// Hostname inside the job's UTS namespace.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Network namespace prepared by the agent (a path under /run/netns or /proc/PID/ns/net).
    /// `None`: the shim creates a fresh, empty one (loopback only, down).
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Cgroup directories the shim joins (writes its pid to `cgroup.procs`) before anything
    /// else, so every process of the job is in them. One on a pure cgroup v2 host; on a
    /// hybrid host one per hierarchy that carries a limit (e.g. v1 pids, v1 memory, and the
    /// v2 group used for `cgroup.kill`).
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// The job's writable directories (/tmp, /var/tmp, /run, /home): each a directory of the
    /// job's own size-capped tmpfs, which the agent mounted on the host, bound over its
    /// target in the job's root. Whatever the job's root had mounted at or under a target is
    /// detached first.
    pub binds: Vec<BindMount>,
    /// Files written into the job's directories before it starts (its endpoint token), owned
    /// by the job's user. Each must lie under one of the `binds` targets, so it lives in the
    /// job's tmpfs and goes with it.
    #[serde(default)]
    pub files: Vec<SpecFile>,
    /// The job's `/etc/resolv.conf` (an egress-controlled job's resolver is the agent).
    /// `None`: the host's file, as the read-only root shows it. The shim writes it into the
    /// job's `/run` and binds it read-only over `/etc/resolv.conf`; where the host's
    /// `/etc/resolv.conf` is a symlink into one of the job's directories (systemd-resolved's
    /// `/run/systemd/resolve/stub-resolv.conf`), it writes it at the link's target instead.
    #[serde(default)]
    pub resolv_conf: Option<String>,
    /// Host paths hidden from the job: whatever is mounted at or under one in the job's root
    /// is detached, then a directory is covered by an empty read-only tmpfs, anything else by
    /// a read-only `/dev/null`. Paths absent on the host are skipped.
    pub hide: Vec<PathBuf>,
    /// Resource limits set with setrlimit before exec.
    pub rlimits: Rlimits,
    /// Host file (in the agent's root-only job directory) where the shim records how the
    /// sandbox ended: `exited <code>` once the job's command ran, `setup-failed` when the
    /// sandbox could not be built. The exit status alone cannot tell a setup failure (125)
    /// from a command that exits 125 itself; a caller that must (the GitLab driver) reads
    /// this. `None`: nothing is recorded.
    #[serde(default)]
    pub status_file: Option<PathBuf>,
}

fn default_hostname() -> String {
    "airlock-job".to_string()
}

/// One writable directory of the job: `source`, a directory of the job's tmpfs on the host,
/// bound (nosuid, nodev) over `target` in the job's root. The shim refuses a source that
/// is not on a tmpfs: a job never gets write access to the host's disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
}

/// Where the shim mounts filesystems of its own: no bind may land there.
pub const SHIM_OWNED: [&str; 3] = ["/proc", "/sys", "/dev"];

/// A file the shim writes into the job's tmpfs. Its contents may be a secret: `Debug` shows
/// only the length.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    pub path: PathBuf,
    pub contents: String,
    pub mode: u32,
}

impl std::fmt::Debug for SpecFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpecFile")
            .field("path", &self.path)
            .field("contents", &format_args!("<{} bytes>", self.contents.len()))
            .field("mode", &format_args!("{:o}", self.mode))
            .finish()
    }
}

/// Per-process limits; `None` keeps the host's value, except `core`, which is 0 unless
/// given (a core dump of a job holds its credentials).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimits {
    pub nofile: Option<u64>,
    pub nproc: Option<u64>,
    pub core: Option<u64>,
}

/// Why a spec was refused before anything privileged happened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("argv is empty: the spec must name the command to run")]
    EmptyArgv,
    #[error("argument {0} contains a NUL byte")]
    NulInArgument(usize),
    #[error("environment variable {0:?}: names must be non-empty, without '=' or NUL, and values without NUL")]
    BadEnv(String),
    #[error("{field} {path:?} must be an absolute path without `..`")]
    NotAbsolute { field: &'static str, path: PathBuf },
    #[error("uid and gid must not be 0: jobs never run as root (got uid {uid}, gid {gid})")]
    Root { uid: u32, gid: u32 },
    #[error("bind target {0:?} is listed twice, is `/`, or lies in /proc, /sys or /dev, which the shim builds itself")]
    BadBindTarget(PathBuf),
    #[error("hostname {0:?} must be 1 to 64 bytes of letters, digits, '-' and '.'")]
    BadHostname(String),
    #[error(
        "file {0:?} must lie under one of the job's bind targets and have a mode of at most 0o777"
    )]
    BadFile(PathBuf),
}

impl SandboxSpec {
    /// Checks everything that can be checked without touching the system, so a bad spec
    /// fails before the first privileged step.
    pub fn check(&self) -> Result<(), SpecError> {
        if self.argv.is_empty() {
            return Err(SpecError::EmptyArgv);
        }
        if let Some(i) = self.argv.iter().position(|a| a.contains('\0')) {
            return Err(SpecError::NulInArgument(i));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(SpecError::BadEnv(k.clone()));
            }
        }
        if self.uid == 0 || self.gid == 0 {
            return Err(SpecError::Root {
                uid: self.uid,
                gid: self.gid,
            });
        }
        let h = &self.hostname;
        if h.is_empty()
            || h.len() > 64
            || !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(SpecError::BadHostname(h.clone()));
        }
        absolute("cwd", &self.cwd)?;
        absolute("root_dir", &self.root_dir)?;
        if let Some(n) = &self.netns {
            absolute("netns", n)?;
        }
        for c in &self.cgroups {
            absolute("cgroup", c)?;
        }
        for p in &self.hide {
            absolute("hide", p)?;
        }
        if let Some(p) = &self.status_file {
            absolute("status_file", p)?;
        }
        let mut seen = Vec::new();
        for b in &self.binds {
            absolute("bind source", &b.source)?;
            absolute("bind target", &b.target)?;
            let shim_owned = SHIM_OWNED.iter().any(|d| b.target.starts_with(d));
            if b.target == Path::new("/") || shim_owned || seen.contains(&&b.target) {
                return Err(SpecError::BadBindTarget(b.target.clone()));
            }
            seen.push(&b.target);
        }
        for f in &self.files {
            absolute("file", &f.path)?;
            let under_bind = self
                .binds
                .iter()
                .any(|b| f.path.starts_with(&b.target) && f.path != b.target);
            if !under_bind || f.mode > 0o777 {
                return Err(SpecError::BadFile(f.path.clone()));
            }
        }
        Ok(())
    }
}

fn absolute(field: &'static str, path: &Path) -> Result<(), SpecError> {
    let ok = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(SpecError::NotAbsolute {
            field,
            path: path.to_path_buf(),
        })
    }
}

/// Any failure of a setup step, by module. Rolled up with `#[from]`; [`steps::Failed`] adds
/// the step's name.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    #[error(transparent)]
    Namespaces(#[from] namespaces::Error),
    #[error(transparent)]
    Process(#[from] process::Error),
    #[error(transparent)]
    Rootfs(#[from] rootfs::Error),
    #[error(transparent)]
    Fds(#[from] fds::Error),
    #[error(transparent)]
    Rlimits(#[from] rlimits::Error),
    #[error(transparent)]
    User(#[from] user::Error),
    #[error(transparent)]
    Capabilities(#[from] capabilities::Error),
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
    #[error(transparent)]
    Env(#[from] env::Error),
    #[error(transparent)]
    Call(syscalls::Error),
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    pub fn spec() -> SandboxSpec {
        SandboxSpec {
            job_id: "j-1".into(),
            argv: vec!["/bin/true".into()],
            env: BTreeMap::from([("HOME".into(), "/home/job".into())]),
            cwd: "/work".into(),
            uid: 60000,
            gid: 60000,
            root_dir: "/var/lib/airlock/jobs/j-1/root".into(),
            hostname: default_hostname(),
            netns: None,
            cgroups: vec!["/sys/fs/cgroup/airlock/j-1".into()],
            binds: vec![BindMount {
                source: "/var/lib/airlock/jobs/j-1/fs/tmp".into(),
                target: "/tmp".into(),
            }],
            files: vec![SpecFile {
                path: "/tmp/airlock/token".into(),
                contents: "secret-token".into(),
                mode: 0o400,
            }],
            resolv_conf: None,
            hide: vec!["/etc/airlock".into()],
            rlimits: Rlimits {
                nofile: Some(4096),
                ..Default::default()
            },
            status_file: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::spec;
    use super::*;

    #[test]
    fn files_must_lie_in_a_job_directory_and_their_contents_never_show_in_debug() {
        let mut s = spec();
        s.check().unwrap();
        assert!(!format!("{s:?}").contains("secret-token"));
        s.files[0].path = "/etc/cron.d/evil".into();
        assert_eq!(
            s.check(),
            Err(SpecError::BadFile("/etc/cron.d/evil".into()))
        );
        s.files[0].path = "/tmp".into();
        assert!(matches!(s.check(), Err(SpecError::BadFile(_))));
        s.files[0].path = "/tmp/../etc/x".into();
        assert!(matches!(s.check(), Err(SpecError::NotAbsolute { .. })));
    }

    #[test]
    fn spec_round_trips_and_rejects_unknown_fields() {
        let spec = spec();
        let text = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<SandboxSpec>(&text).unwrap(), spec);
        let bad = text.replacen("\"uid\"", "\"evil\":1,\"uid\"", 1);
        let err = serde_json::from_str::<SandboxSpec>(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `evil`"), "{err}");
    }

    #[test]
    fn optional_fields_default() {
        let mut v = serde_json::to_value(spec()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("hostname");
        o.remove("netns");
        o.remove("cgroups");
        let s: SandboxSpec = serde_json::from_value(v).unwrap();
        assert_eq!(s.hostname, "airlock-job");
        assert!(s.netns.is_none() && s.cgroups.is_empty());
    }

    #[test]
    fn check_accepts_a_good_spec_and_refuses_bad_ones() {
        assert_eq!(spec().check(), Ok(()));
        type Mutate = fn(&mut SandboxSpec);
        let cases: Vec<(Mutate, &str)> = vec![
            (|s| s.argv.clear(), "argv is empty"),
            (|s| s.argv.push("a\0b".into()), "argument 1"),
            (
                |s| {
                    s.env.insert("A=B".into(), "x".into());
                },
                "\"A=B\"",
            ),
            (|s| s.uid = 0, "never run as root"),
            (|s| s.gid = 0, "never run as root"),
            (|s| s.cwd = "work".into(), "cwd"),
            (|s| s.root_dir = "/a/../b".into(), "root_dir"),
            (|s| s.hide.push("/etc/../root".into()), "hide"),
            (|s| s.cgroups.push("rel".into()), "cgroup"),
            (|s| s.netns = Some("x".into()), "netns"),
            (|s| s.binds[0].source = "fs/tmp".into(), "bind source"),
            (|s| s.binds[0].source = "/a/../etc".into(), "bind source"),
            (|s| s.binds[0].target = "tmp".into(), "bind target"),
            (|s| s.binds[0].target = "/".into(), "is `/`"),
            (
                |s| s.binds[0].target = "/proc/1".into(),
                "/proc, /sys or /dev",
            ),
            (|s| s.binds[0].target = "/dev".into(), "/proc, /sys or /dev"),
            (
                |s| s.binds[0].target = "/sys/fs".into(),
                "/proc, /sys or /dev",
            ),
            (
                |s| {
                    let b = s.binds[0].clone();
                    s.binds.push(b)
                },
                "twice",
            ),
            (|s| s.hostname = "a b".into(), "hostname"),
            (|s| s.hostname = String::new(), "hostname"),
        ];
        for (mutate, want) in cases {
            let mut s = spec();
            mutate(&mut s);
            let err = s.check().expect_err(want).to_string();
            assert!(err.contains(want), "{err} should contain {want}");
        }
    }

    #[test]
    fn env_errors_name_the_variable_but_never_the_value() {
        let mut s = spec();
        s.env.insert("TOKEN".into(), "sec\0ret".into());
        let err = s.check().unwrap_err().to_string();
        assert!(err.contains("TOKEN") && !err.contains("sec"), "{err}");
    }
}
