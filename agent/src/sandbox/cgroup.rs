//! Per-job cgroups on the host: create a job's group with its limits, tell the shim where to
//! put itself, kill everything in it at job end and check that nothing is left.
//!
//! Owns the directories under the configured parent group: `<v2>/<parent>/job-<id>` in the
//! cgroup v2 hierarchy and, on hybrid hosts whose v2 hierarchy has no controllers, the same
//! path in the v1 `pids`, `memory` and `cpu` hierarchies. It never touches a group outside
//! its parent, never reuses a job group that already exists, and only signals pids it read
//! from its own groups' `cgroup.procs`. Every host path is a parameter, so tests can point it
//! at a temporary parent group. All calls block (they poll the kernel while a group dies):
//! async callers run them on a blocking thread.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::jobs::valid_job_id;

/// Job groups are `job-<job id>` inside the parent group.
const JOB_PREFIX: &str = "job-";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 hierarchy at {0}/cgroup.controllers or {0}/unified/cgroup.controllers: \
         mount cgroup2 there (Debian 12, Ubuntu 22.04 and later do by default)"
    )]
    NoCgroup2(PathBuf),
    #[error(
        "cgroup parent {0:?} must be a non-empty relative path of plain names, e.g. \"airlock\""
    )]
    BadParent(PathBuf),
    #[error("{0:?} is not a job id (j- and 16 hex digits); refusing to use it in a cgroup path")]
    BadJobId(String),
    #[error("limit {limit} = {value} is invalid: {why}")]
    BadLimit {
        limit: &'static str,
        value: u64,
        why: &'static str,
    },
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, #[source] io::Error),
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create cgroup {0}: {1} (airlockd must run as root with the cgroup hierarchy mounted read-write)")]
    Create(PathBuf, #[source] io::Error),
    #[error("cgroup {0} already exists: a previous run left it behind; reap orphaned groups (list_orphans) before starting jobs")]
    Exists(PathBuf),
    #[error("cannot send SIGKILL to pid {pid} of {path}: {source}")]
    Kill {
        path: PathBuf,
        pid: u32,
        #[source]
        source: Errno,
    },
    #[error("processes {pids:?} are still in {path} after {timeout:?} (stuck in uninterruptible sleep?); the slot must be marked tainted")]
    StillPopulated {
        path: PathBuf,
        pids: Vec<u32>,
        timeout: Duration,
    },
    #[error("cannot remove cgroup {0}: {1}; the slot must be marked tainted")]
    Remove(PathBuf, #[source] io::Error),
}

/// The controllers airlock sets limits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Controller {
    Pids,
    Memory,
    Cpu,
}

impl Controller {
    pub const ALL: [Controller; 3] = [Controller::Pids, Controller::Memory, Controller::Cpu];

    /// The controller's name in `cgroup.controllers` and its v1 mount directory.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Pids => "pids",
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
        }
    }

    /// The v2 file of the limit, which is how operators and warnings name it.
    pub fn limit_name(self) -> &'static str {
        match self {
            Controller::Pids => "pids.max",
            Controller::Memory => "memory.max",
            Controller::Cpu => "cpu.max",
        }
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a controller's limit is enforced for the jobs of a parent group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// In the job's v2 group.
    V2,
    /// In a job group in this controller's v1 hierarchy; the path is the parent group there.
    V1(PathBuf),
    /// Nowhere: the limit is not enforced (and a warning says why).
    Unavailable,
}

/// How the host mounts cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v2 only, at the mount root (`/sys/fs/cgroup`).
    Unified,
    /// v1 controllers at `<root>/<controller>`, cgroup v2 at `<root>/unified`.
    Hybrid,
}

/// A limit the host cannot enforce (or enforces more weakly), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitWarning {
    /// The limit, named by its v2 file (`pids.max`, `memory.oom.group`, `cgroup.kill`, …).
    pub limit: &'static str,
    pub reason: String,
}

impl fmt::Display for LimitWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.limit, self.reason)
    }
}

/// Each distinct warning is logged once per process, however often a parent is opened.
fn warn_once(w: &LimitWarning) {
    static SEEN: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let text = w.to_string();
    let first = SEEN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(text.clone());
    if first {
        tracing::warn!(limit = w.limit, "cgroup limit not fully enforced: {text}");
    }
}

/// `cpu.max`: `quota_us` of CPU time in every `period_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuMax {
    pub quota_us: u64,
    pub period_us: u64,
}

impl CpuMax {
    /// A limit of `millicpus / 1000` CPUs over the kernel's default 100 ms period.
    pub fn millicpus(millicpus: u64) -> CpuMax {
        CpuMax {
            quota_us: millicpus.saturating_mul(100),
            period_us: 100_000,
        }
    }
}

/// The kernel's default `cpu.weight` (and systemd's `CPUWeight=`): what every other
/// cgroup on the host has unless someone set it.
pub const DEFAULT_CPU_WEIGHT: u64 = 100;

/// `cpu.shares` (cgroup v1) for a `cpu.weight`: the default weight 100 is v1's default
/// 1024 shares, proportionally, as systemd converts `CPUWeight=` (v1 takes 2..=262144).
pub fn weight_to_shares(weight: u64) -> u64 {
    (weight.saturating_mul(1024) / DEFAULT_CPU_WEIGHT).clamp(2, 262_144)
}

/// A job's limits; `None` leaves the kernel's default (no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub pids_max: Option<u64>,
    pub memory_max_bytes: Option<u64>,
    pub cpu_max: Option<CpuMax>,
    /// The job's share of CPU time when CPUs are contended (`cpu.weight`, 1..=10000; v1:
    /// `cpu.shares`). A share, not a cap: an idle host gives a job every CPU. It is what
    /// keeps a job's CPU burners from starving the agent: the scheduler shares CPU between
    /// groups by weight, not between processes, so a thousand busy processes of one job
    /// weigh no more than one.
    pub cpu_weight: Option<u64>,
}

impl Limits {
    /// Values the kernel would take but that break every job are refused here.
    pub fn validate(&self) -> Result<(), CgroupError> {
        let bad = |limit, value, why| Err(CgroupError::BadLimit { limit, value, why });
        if let Some(p) = self.pids_max {
            if p < 2 {
                return bad(
                    "pids.max",
                    p,
                    "a job needs at least 2 processes (the shim's command and one child)",
                );
            }
        }
        if let Some(m) = self.memory_max_bytes {
            if m < 4 << 20 {
                return bad("memory.max", m, "below 4 MiB not even a shell starts");
            }
        }
        if let Some(c) = self.cpu_max {
            if !(1_000..=1_000_000).contains(&c.period_us) {
                return bad(
                    "cpu.max",
                    c.period_us,
                    "the period must be 1000..=1000000 µs",
                );
            }
            if c.quota_us < 1_000 {
                return bad("cpu.max", c.quota_us, "the quota must be at least 1000 µs");
            }
        }
        if let Some(w) = self.cpu_weight {
            if !(1..=10_000).contains(&w) {
                return bad(
                    "cpu.weight",
                    w,
                    "the weight must be 1..=10000 (default 100)",
                );
            }
        }
        Ok(())
    }
}

/// The host's cgroup mounts, found by looking (nothing is created or changed).
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    mount_root: PathBuf,
    v2: PathBuf,
    layout: Layout,
}

impl CgroupRoot {
    /// Finds cgroup v2 at `mount_root` (pure v2) or `mount_root/unified` (hybrid).
    pub fn detect(mount_root: &Path) -> Result<CgroupRoot, CgroupError> {
        let (v2, layout) = if mount_root.join("cgroup.controllers").is_file() {
            (mount_root.to_path_buf(), Layout::Unified)
        } else if mount_root.join("unified/cgroup.controllers").is_file() {
            (mount_root.join("unified"), Layout::Hybrid)
        } else {
            return Err(CgroupError::NoCgroup2(mount_root.to_path_buf()));
        };
        Ok(CgroupRoot {
            mount_root: mount_root.to_path_buf(),
            v2,
            layout,
        })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The root of the v2 hierarchy.
    pub fn v2(&self) -> &Path {
        &self.v2
    }

    /// Creates the parent group (`parent` is relative, e.g. `airlock`) in v2 and, on a
    /// hybrid host, in the v1 hierarchy of each controller v2 lacks; enables pids, memory
    /// and cpu for its children where it can; and logs, once, each limit it cannot enforce.
    pub fn open_parent(&self, parent: &Path) -> Result<ParentGroup, CgroupError> {
        let rel = check_relative(parent)?;
        let mut levels = vec![self.v2.clone()];
        for c in rel.components() {
            let next = levels[levels.len() - 1].join(c);
            levels.push(next);
        }
        for dir in &levels[1..] {
            mkdir_existing_ok(dir)?;
        }
        let v2_parent = levels[levels.len() - 1].clone();

        let root_controllers = read_list(&self.v2.join("cgroup.controllers"))?;
        let mut v2_status = BTreeMap::new();
        for c in Controller::ALL {
            let status = if root_controllers.contains(c.name()) {
                enable_down(&levels, c)
            } else {
                Err(format!(
                    "the {c} controller is not in {}",
                    self.v2.join("cgroup.controllers").display()
                ))
            };
            v2_status.insert(c, status);
        }

        let mut v1_parents = BTreeMap::new();
        if self.layout == Layout::Hybrid {
            for (c, status) in &v2_status {
                let v1_root = self.mount_root.join(c.name());
                if status.is_err() && is_v1_hierarchy(&v1_root) {
                    let mut dir = v1_root;
                    for comp in rel.components() {
                        dir.push(comp);
                        mkdir_existing_ok(&dir)?;
                    }
                    v1_parents.insert(*c, dir);
                }
            }
        }

        let files = ParentFiles {
            kill: v2_parent.join("cgroup.kill").is_file(),
            freeze: v2_parent.join("cgroup.freeze").is_file(),
            swap_max: v2_parent.join("memory.swap.max").is_file(),
            oom_group: v2_parent.join("memory.oom.group").is_file(),
            v1_memsw: v1_parents
                .get(&Controller::Memory)
                .is_some_and(|d| d.join("memory.memsw.limit_in_bytes").is_file()),
        };
        let (backends, warnings) = plan(self.layout, &v2_status, &v1_parents, &files);
        for w in &warnings {
            warn_once(w);
        }
        Ok(ParentGroup {
            v2: v2_parent,
            backends,
            files,
            warnings,
        })
    }
}

/// Which interface files the kernel offers below the parent group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ParentFiles {
    kill: bool,
    freeze: bool,
    swap_max: bool,
    oom_group: bool,
    v1_memsw: bool,
}

/// Decides, per controller, where its limit goes, and what to warn about. Pure, so the
/// decision is unit-tested for every host shape without root.
fn plan(
    layout: Layout,
    v2_status: &BTreeMap<Controller, Result<(), String>>,
    v1_parents: &BTreeMap<Controller, PathBuf>,
    files: &ParentFiles,
) -> (BTreeMap<Controller, Backend>, Vec<LimitWarning>) {
    let mut backends = BTreeMap::new();
    let mut warnings = Vec::new();
    for c in Controller::ALL {
        let backend = match (v2_status.get(&c), v1_parents.get(&c)) {
            (Some(Ok(())), _) => Backend::V2,
            (_, Some(dir)) => Backend::V1(dir.clone()),
            (status, None) => {
                let why = match status {
                    Some(Err(why)) => why.clone(),
                    _ => format!("the {c} controller was not checked"),
                };
                let fallback = match layout {
                    Layout::Hybrid => format!(" and no v1 {c} hierarchy is mounted"),
                    Layout::Unified => String::new(),
                };
                warnings.push(LimitWarning {
                    limit: c.limit_name(),
                    reason: format!("not enforced: {why}{fallback}; jobs run without this limit"),
                });
                Backend::Unavailable
            }
        };
        backends.insert(c, backend);
    }
    match &backends[&Controller::Memory] {
        Backend::V2 => {
            if !files.swap_max {
                warnings.push(LimitWarning {
                    limit: "memory.swap.max",
                    reason:
                        "not enforced: the kernel does not account swap (boot with swapaccount=1); \
                             on a host with swap a job may use swap beyond memory.max"
                            .into(),
                });
            }
            if !files.oom_group {
                warnings.push(LimitWarning {
                    limit: "memory.oom.group",
                    reason:
                        "not available (kernel older than 4.19): an out-of-memory job loses one \
                             process, not all of them"
                            .into(),
                });
            }
        }
        Backend::V1(_) => {
            warnings.push(LimitWarning {
                limit: "memory.oom.group",
                reason:
                    "weaker on the v1 memory controller: an out-of-memory job loses its largest \
                         process, not all of them"
                        .into(),
            });
            if !files.v1_memsw {
                warnings.push(LimitWarning {
                    limit: "memory.swap.max",
                    reason:
                        "not enforced: no memory.memsw.limit_in_bytes (boot with swapaccount=1); \
                             on a host with swap a job may use swap beyond its memory limit"
                            .into(),
                });
            }
        }
        Backend::Unavailable => {}
    }
    if !files.kill {
        warnings.push(LimitWarning {
            limit: "cgroup.kill",
            reason: "not available (kernel older than 5.14): teardown freezes the group and kills \
                     its processes one by one, which a fast-forking job can race"
                .into(),
        });
    }
    (backends, warnings)
}

/// The parent of all job groups (`<root>/airlock` by default).
#[derive(Debug, Clone)]
pub struct ParentGroup {
    v2: PathBuf,
    backends: BTreeMap<Controller, Backend>,
    files: ParentFiles,
    warnings: Vec<LimitWarning>,
}

impl ParentGroup {
    /// Limits this host cannot enforce or enforces more weakly; each was logged once.
    pub fn warnings(&self) -> &[LimitWarning] {
        &self.warnings
    }

    pub fn backend(&self, c: Controller) -> &Backend {
        &self.backends[&c]
    }

    /// The parent group's directory in v2.
    pub fn path(&self) -> &Path {
        &self.v2
    }

    /// A handle on a job's groups, whether or not they exist (recovery, reaping).
    pub fn job(&self, job_id: &str) -> Result<JobCgroup, CgroupError> {
        if !valid_job_id(job_id) {
            return Err(CgroupError::BadJobId(job_id.to_string()));
        }
        let name = format!("{JOB_PREFIX}{job_id}");
        let mut v1 = Vec::new();
        for c in Controller::ALL {
            if let Backend::V1(dir) = &self.backends[&c] {
                v1.push((c, dir.join(&name)));
            }
        }
        Ok(JobCgroup {
            job_id: job_id.to_string(),
            v2: self.v2.join(&name),
            v1,
            backends: self.backends.clone(),
            files: self.files,
        })
    }

    /// Creates the job's groups and writes its limits, before any of its processes exist.
    /// An existing group is an error (it may hold a previous job's processes). On failure
    /// nothing is left behind.
    pub fn create_job(&self, job_id: &str, limits: &Limits) -> Result<JobCgroup, CgroupError> {
        limits.validate()?;
        let job = self.job(job_id)?;
        let mut created: Vec<PathBuf> = Vec::new();
        let result = (|| {
            for dir in job.dirs() {
                match fs::create_dir(dir) {
                    Ok(()) => created.push(dir.to_path_buf()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return Err(CgroupError::Exists(dir.to_path_buf()))
                    }
                    Err(e) => return Err(CgroupError::Create(dir.to_path_buf(), e)),
                }
            }
            job.write_limits(limits)
        })();
        if let Err(e) = result {
            for dir in created.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
            return Err(e);
        }
        Ok(job)
    }

    /// Job groups that exist under the parent (in v2 or any v1 hierarchy), sorted by job id.
    /// At start the daemon reaps each: none of them can belong to a live job of this process.
    pub fn list_orphans(&self) -> Result<Vec<JobCgroup>, CgroupError> {
        let mut parents = vec![self.v2.clone()];
        parents.extend(self.backends.values().filter_map(|b| match b {
            Backend::V1(dir) => Some(dir.clone()),
            _ => None,
        }));
        let mut ids = BTreeSet::new();
        for parent in &parents {
            let entries = match fs::read_dir(parent) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(CgroupError::Read(parent.clone(), e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| CgroupError::Read(parent.clone(), e))?;
                let name = entry.file_name();
                let Some(id) = name.to_str().and_then(|n| n.strip_prefix(JOB_PREFIX)) else {
                    continue;
                };
                if valid_job_id(id) && entry.path().is_dir() {
                    ids.insert(id.to_string());
                }
            }
        }
        ids.iter().map(|id| self.job(id)).collect()
    }

    /// Removes the parent group itself (uninstall, tests). Fails while job groups remain.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut dirs = vec![self.v2.clone()];
        dirs.extend(self.backends.values().filter_map(|b| match b {
            Backend::V1(dir) => Some(dir.clone()),
            _ => None,
        }));
        for dir in dirs {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(CgroupError::Remove(dir, e)),
            }
        }
        Ok(())
    }
}

/// How a teardown killed the job's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillMethod {
    /// The groups were already empty.
    NothingToKill,
    /// `cgroup.kill`: the kernel kills every process, including those forked meanwhile.
    CgroupKill,
    /// Freeze (where possible) and SIGKILL each listed process until the groups are empty.
    LoopKill,
}

/// What a teardown did, for the audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeardownReport {
    pub method: KillMethod,
    /// Processes found in the groups just before the kill.
    pub processes_killed: usize,
    /// Group directories removed.
    pub removed: Vec<PathBuf>,
    pub elapsed: Duration,
}

/// Something of a job's cgroup that is still there after its teardown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub path: PathBuf,
    pub pids: Vec<u32>,
}

/// Counters a job's groups keep, for the audit of how a job ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobStats {
    pub pids_current: Option<u64>,
    /// Forks refused because the job was at pids.max.
    pub pids_limit_hits: Option<u64>,
    /// Processes the kernel's OOM killer killed in the job.
    pub oom_kills: Option<u64>,
}

/// One job's groups: its v2 group and, on hybrid hosts, its v1 groups.
#[derive(Debug, Clone)]
pub struct JobCgroup {
    job_id: String,
    v2: PathBuf,
    v1: Vec<(Controller, PathBuf)>,
    backends: BTreeMap<Controller, Backend>,
    files: ParentFiles,
}

impl JobCgroup {
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The job's v2 group.
    pub fn path(&self) -> &Path {
        &self.v2
    }

    /// The same groups, torn down as on a kernel without `cgroup.kill` (older than 5.14),
    /// so that the loop kill is tested on current kernels too.
    #[doc(hidden)]
    pub fn without_cgroup_kill(mut self) -> JobCgroup {
        self.files.kill = false;
        self
    }

    /// Every directory of the job's groups, v2 first.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.v2.as_path()).chain(self.v1.iter().map(|(_, d)| d.as_path()))
    }

    /// Every `cgroup.procs` the shim must write its own pid into before it builds the
    /// sandbox (and before its `execve`): being in all of them is what puts the job under
    /// every limit and under the teardown's kill.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Moves a process into every group of the job (the agent's side of placement).
    pub fn place(&self, pid: u32) -> Result<(), CgroupError> {
        for file in self.procs_files() {
            write_file(&file, &pid.to_string())?;
        }
        Ok(())
    }

    /// The pids in any of the job's groups (groups that do not exist count as empty).
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let mut pids = BTreeSet::new();
        for dir in self.dirs() {
            pids.extend(read_procs(dir)?);
        }
        Ok(pids.into_iter().collect())
    }

    fn controller_dir(&self, c: Controller) -> Option<&Path> {
        match &self.backends[&c] {
            Backend::V2 => Some(&self.v2),
            Backend::V1(_) => self
                .v1
                .iter()
                .find(|(vc, _)| *vc == c)
                .map(|(_, d)| d.as_path()),
            Backend::Unavailable => None,
        }
    }

    fn write_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        let v1 = |c| matches!(self.backends[&c], Backend::V1(_));
        if let (Some(max), Some(dir)) = (limits.pids_max, self.controller_dir(Controller::Pids)) {
            write_file(&dir.join("pids.max"), &max.to_string())?;
        }
        if let (Some(max), Some(dir)) = (
            limits.memory_max_bytes,
            self.controller_dir(Controller::Memory),
        ) {
            if v1(Controller::Memory) {
                write_file(&dir.join("memory.limit_in_bytes"), &max.to_string())?;
                // memsw is memory + swap: equal to the memory limit means no swap. It must be
                // written after limit_in_bytes, which it may never be below.
                if self.files.v1_memsw {
                    write_file(&dir.join("memory.memsw.limit_in_bytes"), &max.to_string())?;
                }
            } else {
                write_file(&dir.join("memory.max"), &max.to_string())?;
                if self.files.swap_max {
                    write_file(&dir.join("memory.swap.max"), "0")?;
                }
                if self.files.oom_group {
                    write_file(&dir.join("memory.oom.group"), "1")?;
                }
            }
        }
        if let (Some(weight), Some(dir)) = (limits.cpu_weight, self.controller_dir(Controller::Cpu))
        {
            if v1(Controller::Cpu) {
                write_file(
                    &dir.join("cpu.shares"),
                    &weight_to_shares(weight).to_string(),
                )?;
            } else {
                write_file(&dir.join("cpu.weight"), &weight.to_string())?;
            }
        }
        if let (Some(cpu), Some(dir)) = (limits.cpu_max, self.controller_dir(Controller::Cpu)) {
            if v1(Controller::Cpu) {
                write_file(&dir.join("cpu.cfs_period_us"), &cpu.period_us.to_string())?;
                write_file(&dir.join("cpu.cfs_quota_us"), &cpu.quota_us.to_string())?;
            } else {
                write_file(
                    &dir.join("cpu.max"),
                    &format!("{} {}", cpu.quota_us, cpu.period_us),
                )?;
            }
        }
        Ok(())
    }

    /// Counters of the job's groups; `None` where the host has no such counter.
    pub fn stats(&self) -> JobStats {
        let pids = self.controller_dir(Controller::Pids);
        let oom = self.controller_dir(Controller::Memory).map(|d| {
            if matches!(self.backends[&Controller::Memory], Backend::V1(_)) {
                d.join("memory.oom_control")
            } else {
                d.join("memory.events")
            }
        });
        JobStats {
            pids_current: pids.and_then(|d| read_u64(&d.join("pids.current"))),
            pids_limit_hits: pids.and_then(|d| read_key(&d.join("pids.events"), "max")),
            oom_kills: oom.and_then(|f| read_key(&f, "oom_kill")),
        }
    }

    /// Kills every process of the job, waits until the groups are empty, and removes them.
    /// Groups (or processes) that are already gone are fine. On error the caller marks the
    /// slot tainted and audits [`JobCgroup::verify_gone`].
    pub fn teardown(&self, timeout: Duration) -> Result<TeardownReport, CgroupError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let before = self.pids()?;
        let mut method = KillMethod::NothingToKill;

        if self.v2.is_dir() && v2_populated(&self.v2)? {
            let emptied = if self.files.kill {
                write_file(&self.v2.join("cgroup.kill"), "1")?;
                method = KillMethod::CgroupKill;
                wait_until(deadline, || Ok(!v2_populated(&self.v2)?))?
            } else {
                method = KillMethod::LoopKill;
                // A frozen v2 task cannot fork but still dies on SIGKILL.
                if self.files.freeze {
                    write_file(&self.v2.join("cgroup.freeze"), "1")?;
                }
                wait_until(deadline, || {
                    kill_listed(&self.v2)?;
                    Ok(!v2_populated(&self.v2)?)
                })?
            };
            if !emptied {
                return Err(self.still_populated(&self.v2, timeout));
            }
        }
        // v1 groups hold the same processes, so they are normally empty by now. A process that
        // is only in a v1 group (a placement cut short) is loop-killed: v1 has no group kill.
        for (_, dir) in &self.v1 {
            if !read_procs(dir)?.is_empty() {
                if method == KillMethod::NothingToKill {
                    method = KillMethod::LoopKill;
                }
                let emptied = wait_until(deadline, || {
                    kill_listed(dir)?;
                    Ok(read_procs(dir)?.is_empty())
                })?;
                if !emptied {
                    return Err(self.still_populated(dir, timeout));
                }
            }
        }

        let mut removed = Vec::new();
        for dir in self.dirs() {
            if remove_tree(dir, deadline)? {
                removed.push(dir.to_path_buf());
            }
        }
        Ok(TeardownReport {
            method,
            processes_killed: before.len(),
            removed,
            elapsed: start.elapsed(),
        })
    }

    fn still_populated(&self, dir: &Path, timeout: Duration) -> CgroupError {
        CgroupError::StillPopulated {
            path: dir.to_path_buf(),
            pids: read_procs(dir).unwrap_or_default(),
            timeout,
        }
    }

    /// What remains of the job's groups; empty means the job's cgroups are gone.
    pub fn verify_gone(&self) -> Vec<Leftover> {
        self.dirs()
            .filter(|d| d.exists())
            .map(|d| Leftover {
                path: d.to_path_buf(),
                pids: read_procs(d).unwrap_or_default(),
            })
            .collect()
    }
}

/// Polls `done` with a short backoff until it holds or the deadline passes.
fn wait_until(
    deadline: Instant,
    mut done: impl FnMut() -> Result<bool, CgroupError>,
) -> Result<bool, CgroupError> {
    let mut pause = Duration::from_millis(1);
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// SIGKILLs every pid listed in `dir/cgroup.procs`. A pid that exited meanwhile is fine.
fn kill_listed(dir: &Path) -> Result<(), CgroupError> {
    for pid in read_procs(dir)? {
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        match kill(Pid::from_raw(raw), Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(source) => {
                return Err(CgroupError::Kill {
                    path: dir.to_path_buf(),
                    pid,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// `populated` from a v2 group's `cgroup.events`; a group that is gone is not populated.
fn v2_populated(dir: &Path) -> Result<bool, CgroupError> {
    let path = dir.join("cgroup.events");
    match fs::read_to_string(&path) {
        Ok(text) => Ok(parse_key(&text, "populated") != Some(0)),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !dir.exists() => Ok(false),
        Err(e) => Err(CgroupError::Read(path, e)),
    }
}

/// Removes a group and any groups below it (a job cannot create them, but a leftover
/// must not block the wipe). Returns whether it existed. `EBUSY` right after a kill is
/// retried until the deadline.
fn remove_tree(dir: &Path, deadline: Instant) -> Result<bool, CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(CgroupError::Read(dir.to_path_buf(), e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| CgroupError::Read(dir.to_path_buf(), e))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path(), deadline)?;
        }
    }
    let mut pause = Duration::from_millis(1);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e)
                if e.raw_os_error() == Some(Errno::EBUSY as i32) && Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(CgroupError::Remove(dir.to_path_buf(), e)),
        }
    }
}

/// Enables `c` in `cgroup.subtree_control` at every level from the v2 root down to the
/// parent group, so that job groups get its interface files.
fn enable_down(levels: &[PathBuf], c: Controller) -> Result<(), String> {
    for level in levels {
        let file = level.join("cgroup.subtree_control");
        let enabled = read_list(&file).map_err(|e| e.to_string())?;
        if enabled.contains(c.name()) {
            continue;
        }
        if let Err(e) = write_file(&file, &format!("+{}", c.name())) {
            return Err(format!(
                "{e} (a cgroup that holds processes cannot hand controllers to its children: \
                 use a parent group outside airlockd's own service cgroup)"
            ));
        }
    }
    Ok(())
}

/// A v1 hierarchy is a directory with `tasks` and without v2's `cgroup.controllers`.
fn is_v1_hierarchy(dir: &Path) -> bool {
    dir.join("tasks").is_file() && !dir.join("cgroup.controllers").exists()
}

fn check_relative(parent: &Path) -> Result<PathBuf, CgroupError> {
    let ok = parent.components().count() > 0
        && parent
            .components()
            .all(|c| matches!(c, Component::Normal(n) if n.to_str().is_some_and(|s| !s.starts_with(JOB_PREFIX))));
    if ok {
        Ok(parent.to_path_buf())
    } else {
        Err(CgroupError::BadParent(parent.to_path_buf()))
    }
}

fn mkdir_existing_ok(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::Create(dir.to_path_buf(), e)),
    }
}

/// Writes an interface file in one `write`, without creating it: a missing file is an error.
fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    let err = |source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    };
    let mut f = fs::OpenOptions::new().write(true).open(path).map_err(err)?;
    f.write_all(value.as_bytes()).map_err(err)
}

/// A space-separated list file (`cgroup.controllers`, `cgroup.subtree_control`).
fn read_list(path: &Path) -> Result<BTreeSet<String>, CgroupError> {
    let text = fs::read_to_string(path).map_err(|e| CgroupError::Read(path.to_path_buf(), e))?;
    Ok(text.split_whitespace().map(str::to_string).collect())
}

/// The pids in `dir/cgroup.procs`; a group that is gone has none.
fn read_procs(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    let path = dir.join("cgroup.procs");
    match fs::read_to_string(&path) {
        Ok(text) => Ok(parse_pids(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        // rmdir racing with the read.
        Err(e) if e.raw_os_error() == Some(Errno::ENODEV as i32) => Ok(Vec::new()),
        Err(e) => Err(CgroupError::Read(path, e)),
    }
}

fn parse_pids(text: &str) -> Vec<u32> {
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The value of `key` in a flat-keyed file (`populated 1`, `oom_kill 3`, `max 0`).
fn parse_key(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn read_key(path: &Path, key: &str) -> Option<u64> {
    parse_key(&fs::read_to_string(path).ok()?, key)
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_all() -> BTreeMap<Controller, Result<(), String>> {
        Controller::ALL.iter().map(|c| (*c, Ok(()))).collect()
    }

    fn none_all(why: &str) -> BTreeMap<Controller, Result<(), String>> {
        Controller::ALL
            .iter()
            .map(|c| (*c, Err(why.to_string())))
            .collect()
    }

    const FULL: ParentFiles = ParentFiles {
        kill: true,
        freeze: true,
        swap_max: true,
        oom_group: true,
        v1_memsw: true,
    };

    #[test]
    fn pure_v2_with_every_controller_warns_about_nothing() {
        let (b, w) = plan(Layout::Unified, &ok_all(), &BTreeMap::new(), &FULL);
        assert!(b.values().all(|b| *b == Backend::V2), "{b:?}");
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn hybrid_without_v2_controllers_falls_back_to_v1_and_says_what_is_weaker() {
        let v1: BTreeMap<_, _> = [
            (Controller::Pids, PathBuf::from("/cg/pids/airlock")),
            (Controller::Memory, PathBuf::from("/cg/memory/airlock")),
        ]
        .into();
        let (b, w) = plan(
            Layout::Hybrid,
            &none_all("not in cgroup.controllers"),
            &v1,
            &FULL,
        );
        assert_eq!(b[&Controller::Pids], Backend::V1("/cg/pids/airlock".into()));
        assert_eq!(
            b[&Controller::Memory],
            Backend::V1("/cg/memory/airlock".into())
        );
        assert_eq!(b[&Controller::Cpu], Backend::Unavailable);
        let limits: Vec<_> = w.iter().map(|w| w.limit).collect();
        assert_eq!(limits, ["cpu.max", "memory.oom.group"], "{w:?}");
        assert!(
            w[0].reason.contains("not in cgroup.controllers"),
            "{}",
            w[0]
        );
        assert!(w[0].reason.contains("no v1 cpu hierarchy"), "{}", w[0]);
    }

    #[test]
    fn each_missing_piece_is_named_once() {
        let mut status = ok_all();
        status.insert(Controller::Pids, Err("EBUSY".into()));
        let files = ParentFiles {
            kill: false,
            freeze: true,
            swap_max: false,
            oom_group: false,
            v1_memsw: false,
        };
        let (b, w) = plan(Layout::Unified, &status, &BTreeMap::new(), &files);
        assert_eq!(b[&Controller::Pids], Backend::Unavailable);
        let limits: Vec<_> = w.iter().map(|w| w.limit).collect();
        assert_eq!(
            limits,
            [
                "pids.max",
                "memory.swap.max",
                "memory.oom.group",
                "cgroup.kill"
            ]
        );
        assert!(
            w[0].to_string()
                .starts_with("pids.max: not enforced: EBUSY"),
            "{}",
            w[0]
        );
        // Logging the same warnings again is harmless (deduplicated per process).
        for x in &w {
            warn_once(x);
            warn_once(x);
        }
    }

    #[test]
    fn flat_keyed_files_and_pid_lists_parse() {
        assert_eq!(parse_key("populated 1\nfrozen 0\n", "populated"), Some(1));
        assert_eq!(parse_key("populated 0\nfrozen 0\n", "frozen"), Some(0));
        assert_eq!(parse_key("oom 2\noom_kill 3\n", "oom_kill"), Some(3));
        assert_eq!(parse_key("oom_kill_disable 0\n", "oom_kill"), None);
        assert_eq!(parse_pids("12\n345\n\n"), vec![12, 345]);
    }

    #[test]
    fn parent_and_job_names_are_checked_before_they_touch_a_path() {
        for bad in ["", "/sys/fs/cgroup/x", "../x", "a/../b", "job-x"] {
            assert!(check_relative(Path::new(bad)).is_err(), "{bad:?}");
        }
        assert!(check_relative(Path::new("airlock")).is_ok());
        assert!(check_relative(Path::new("airlock.slice/jobs")).is_ok());
        let parent = ParentGroup {
            v2: "/cg/airlock".into(),
            backends: Controller::ALL.iter().map(|c| (*c, Backend::V2)).collect(),
            files: FULL,
            warnings: vec![],
        };
        for bad in ["../../etc", "j-../../x", "j-0123", ""] {
            assert!(
                matches!(parent.job(bad), Err(CgroupError::BadJobId(_))),
                "{bad:?}"
            );
        }
        let job = parent.job("j-0123456789abcdef").unwrap();
        assert_eq!(job.path(), Path::new("/cg/airlock/job-j-0123456789abcdef"));
        assert_eq!(
            job.procs_files(),
            [PathBuf::from(
                "/cg/airlock/job-j-0123456789abcdef/cgroup.procs"
            )]
        );
    }

    #[test]
    fn limits_that_break_every_job_are_refused() {
        assert!(Limits::default().validate().is_ok());
        let ok = Limits {
            pids_max: Some(512),
            memory_max_bytes: Some(2 << 30),
            cpu_max: Some(CpuMax::millicpus(1500)),
            cpu_weight: Some(DEFAULT_CPU_WEIGHT),
        };
        assert!(ok.validate().is_ok());
        assert_eq!(ok.cpu_max.unwrap().quota_us, 150_000);
        for bad in [
            Limits {
                pids_max: Some(1),
                ..ok
            },
            Limits {
                memory_max_bytes: Some(1 << 20),
                ..ok
            },
            Limits {
                cpu_max: Some(CpuMax {
                    quota_us: 10,
                    period_us: 100_000,
                }),
                ..ok
            },
            Limits {
                cpu_max: Some(CpuMax {
                    quota_us: 10_000,
                    period_us: 10,
                }),
                ..ok
            },
            Limits {
                cpu_weight: Some(0),
                ..ok
            },
            Limits {
                cpu_weight: Some(10_001),
                ..ok
            },
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.starts_with("limit "), "{e}");
        }
    }

    #[test]
    fn cpu_weights_map_to_v1_shares_proportionally() {
        assert_eq!(weight_to_shares(DEFAULT_CPU_WEIGHT), 1024);
        assert_eq!(weight_to_shares(50), 512);
        assert_eq!(weight_to_shares(1), 10);
        assert_eq!(weight_to_shares(10_000), 102_400);
    }

    #[test]
    fn detect_finds_pure_and_hybrid_layouts_and_says_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let err = CgroupRoot::detect(dir.path()).unwrap_err().to_string();
        assert!(err.contains("mount cgroup2"), "{err}");
        fs::create_dir(dir.path().join("unified")).unwrap();
        fs::write(dir.path().join("unified/cgroup.controllers"), "").unwrap();
        let root = CgroupRoot::detect(dir.path()).unwrap();
        assert_eq!(root.layout(), Layout::Hybrid);
        assert_eq!(root.v2(), dir.path().join("unified"));
        fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        assert_eq!(
            CgroupRoot::detect(dir.path()).unwrap().layout(),
            Layout::Unified
        );
    }

    #[test]
    fn v1_hierarchies_are_told_apart_from_v2_groups_of_the_same_name() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        fs::create_dir(&pids).unwrap();
        assert!(!is_v1_hierarchy(&pids));
        fs::write(pids.join("tasks"), "").unwrap();
        assert!(is_v1_hierarchy(&pids));
        fs::write(pids.join("cgroup.controllers"), "").unwrap();
        assert!(!is_v1_hierarchy(&pids));
    }
}
