//! One job's sandbox from the agent's side, end to end: a user slot, a cgroup, a network
//! namespace with the job's endpoint listeners bound inside it, the job's tmpfs, the shim's
//! spec — and the wipe that removes all of it and checks that nothing is left.
//!
//! The order of a wipe matters: the cgroup is killed first (nothing of the job runs any
//! more, so its mount namespace is gone and with it every mount of its tmpfs but the
//! host's), then the network objects, then the tmpfs is detached (cheap: the agent's handle
//! still holds it, and the kernel frees its files when a background reclaim drops that
//! handle, so the wipe costs the same whatever the job left) and the job's directory
//! removed; only then is the slot given back — unless something was left, in which case
//! the slot stays taken (tainted) and the audit says what remained.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_shim::{Rlimits, SandboxSpec, SpecFile};

use super::cgroup::{CgroupError, CgroupRoot, CpuMax, JobCgroup, Limits, ParentGroup};
use super::jobfs::{self, Holds, JobFs, JobFsError, Reclaimer};
use super::netns::{self, JobNet, NetConfig, NetManager, NetMode, NetnsError};
use super::users::{JobUser, RunnerIds, UserPool, UsersError};
use crate::audit::AuditLog;
use crate::config::Config;
use crate::egress::job::JobEgress;
use crate::policy::{EgressMode, EgressPolicy, RuleNetwork, RuleSandbox};
use crate::sandbox::firewall::EgressRules;

/// Inside the job: its home, its workspace and its token file.
pub const JOB_HOME: &str = "/home/job";
pub const JOB_WORKSPACE: &str = "/home/job/work";
pub const JOB_TOKEN_FILE: &str = "/run/airlock/token";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Open files per process of a job (soft and hard): what container runtimes give, far from
/// the agent's own raised limit, which the sandbox init would otherwise pass on.
pub const JOB_NOFILE: u64 = 65_536;
/// [`JOB_NOFILE`], or the agent's own hard limit if that is lower (the shim may lower a
/// hard limit, and raising one needs a capability not every host gives root).
pub fn job_nofile() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(JOB_NOFILE, |(_, hard)| JOB_NOFILE.min(hard))
}

/// How long a cgroup may take to empty after `cgroup.kill`.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox cgroups: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("sandbox network: {0}")]
    Net(#[from] NetnsError),
    #[error("sandbox users: {0}")]
    Users(#[from] UsersError),
    #[error("sandbox directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("sandbox files: {0}")]
    Fs(#[from] JobFsError),
    #[error("the sandbox init {0} is missing or not executable: install airlock-shim or set [sandbox] shim")]
    NoShim(PathBuf),
    #[error("[sandbox] {0}")]
    Config(String),
}

/// How one job's sandbox is built: the deciding rule's `[rule.sandbox]`; what it leaves
/// unset comes from the agent's `[sandbox]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSettings {
    pub network: NetMode,
    pub memory_max: Option<u64>,
    pub pids_max: Option<u64>,
    pub cpu_millis: Option<u64>,
    pub tmpfs_size: Option<u64>,
    /// The rule's `[rule.egress]` merged with the baseline: the job's network is then
    /// egress-controlled, with the agent as its resolver.
    pub egress: Option<EgressPolicy>,
    /// Host paths hidden from this job besides the agent's list (the caller's: e.g. the
    /// Buildkite agent's build path).
    pub hide: Vec<PathBuf>,
}

impl Default for JobSettings {
    /// Endpoint only, the agent's limits.
    fn default() -> JobSettings {
        JobSettings {
            network: NetMode::EndpointOnly,
            memory_max: None,
            pids_max: None,
            cpu_millis: None,
            tmpfs_size: None,
            egress: None,
            hide: Vec::new(),
        }
    }
}

impl JobSettings {
    /// `egress`: the rule's egress policy (with the baseline), if it has `[rule.egress]`;
    /// it decides the network whatever `[rule.sandbox] network` says (the policy loader
    /// refuses `endpoint-only` beside it).
    pub fn from_rule(rule: Option<&RuleSandbox>, egress: Option<EgressPolicy>) -> JobSettings {
        let r = rule.cloned().unwrap_or_default();
        let network = match (&egress, r.network) {
            (Some(p), _) => NetMode::Egress(EgressRules {
                audit: p.mode == EgressMode::Audit,
                static_v4: p
                    .cidrs()
                    .into_iter()
                    .filter_map(|(addr, prefix, port)| match addr {
                        std::net::IpAddr::V4(v4) => Some((v4, prefix, port)),
                        std::net::IpAddr::V6(_) => None,
                    })
                    .collect(),
                static_v6: p
                    .cidrs()
                    .into_iter()
                    .filter_map(|(addr, prefix, port)| match addr {
                        std::net::IpAddr::V6(v6) => Some((v6, prefix, port)),
                        std::net::IpAddr::V4(_) => None,
                    })
                    .collect(),
                log_group: crate::egress::nflog::DEFAULT_GROUP,
            }),
            (None, Some(RuleNetwork::Outbound)) => NetMode::Outbound,
            (None, Some(RuleNetwork::EndpointOnly) | None) => NetMode::EndpointOnly,
        };
        JobSettings {
            network,
            memory_max: r.memory_max,
            pids_max: r.pids_max,
            cpu_millis: r.cpu_millis,
            tmpfs_size: r.tmpfs_size,
            egress,
            hide: Vec::new(),
        }
    }
}

/// What a prepared job sandbox holds until it is wiped.
#[derive(Debug)]
pub struct Prepared {
    pub user: JobUser,
    pub cgroup: JobCgroup,
    /// The cgroup limits the job got (its rule's over the agent's).
    pub limits: Limits,
    /// Size cap of the job's tmpfs (its rule's, else the agent's).
    pub tmpfs_size: u64,
    /// The job's own `/etc/resolv.conf`, when the agent is its resolver.
    pub resolv_conf: Option<String>,
    pub net: JobNet,
    /// The job's endpoint sockets, bound inside its namespace (container, then IMDS).
    pub listeners: Vec<std::net::TcpListener>,
    pub dir: PathBuf,
    /// The job's own hidden paths (from its start request), besides the agent's.
    pub hide: Vec<PathBuf>,
}

/// What later commands of a job need of its sandbox (`airlock job exec`): the agent keeps
/// it for the job's lifetime, while the kernel objects it names live.
#[derive(Debug, Clone)]
pub struct ExecContext {
    pub uid: u32,
    pub gid: u32,
    /// The job's root-only directory (`<runtime_dir>/<job>`).
    pub dir: PathBuf,
    /// The job's own hidden paths, besides the agent's.
    pub hide: Vec<PathBuf>,
    pub netns: PathBuf,
    /// The directories the shim joins.
    pub cgroups: Vec<PathBuf>,
    /// The job's cgroup (v2), whose `cgroup.procs` lists every process of the job.
    pub cgroup: PathBuf,
    pub resolv_conf: Option<String>,
    pub tmpfs_size: u64,
}

impl Prepared {
    pub fn exec_context(&self) -> ExecContext {
        ExecContext {
            uid: self.user.uid,
            gid: self.user.gid,
            dir: self.dir.clone(),
            hide: self.hide.clone(),
            netns: self.net.ns_path.clone(),
            cgroups: self.cgroup.dirs().map(Path::to_path_buf).collect(),
            cgroup: self.cgroup.path().to_path_buf(),
            resolv_conf: self.resolv_conf.clone(),
            tmpfs_size: self.tmpfs_size,
        }
    }
}

/// What a wipe removed, and what it could not.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WipeReport {
    pub processes_killed: usize,
    pub cgroup_removed: bool,
    pub network_removed: bool,
    /// The job's tmpfs is detached: no path leads to its files, which a background reclaim
    /// frees.
    pub files_detached: bool,
    pub dir_removed: bool,
    /// Anything of the job still there after the wipe: the slot is tainted.
    pub leftovers: Vec<String>,
    pub millis: u128,
}

#[derive(Debug)]
pub struct Sandboxes {
    shim: PathBuf,
    /// Canonical (it is compared with the mount table), a shared mount point of its own.
    runtime_dir: PathBuf,
    /// `runtime_dir` is a bind of itself (this agent's, or one's before a crash): taken
    /// away at shutdown.
    bound_runtime_dir: bool,
    limits: Limits,
    /// Size cap of each job's tmpfs, for the job as a whole.
    tmpfs_size: u64,
    /// Handles on live jobs' tmpfs roots, until their wipe.
    holds: Holds,
    reclaimer: Reclaimer,
    hide: Vec<PathBuf>,
    pass_env: Vec<String>,
    /// One file per tainted slot (`<state>/tainted/<slot>`): kept across restarts until an
    /// operator clears it.
    taint_dir: PathBuf,
    parent: ParentGroup,
    net: NetManager,
    users: Mutex<UserPool>,
    /// Where egress-controlled jobs' names are forwarded (`[egress]`).
    egress_cfg: crate::config::EgressSection,
    /// The running resolver and NFLOG reader of each egress-controlled job, until its wipe.
    egress: Mutex<HashMap<String, JobEgress>>,
}

impl Sandboxes {
    /// Checks and opens everything a sandboxed job needs; call inside the tokio runtime.
    pub fn new(cfg: &Config, config_path: &Path) -> Result<Sandboxes, SandboxError> {
        let s = &cfg.sandbox;
        let shim = match &s.shim {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("airlock-shim")))
                .unwrap_or_else(|| "/usr/libexec/airlock/airlock-shim".into()),
        };
        if !shim.is_file() {
            return Err(SandboxError::NoShim(shim));
        }
        let runner = RunnerIds {
            uid: s.runner_uid.unwrap_or(0),
            gid: s.runner_gid.unwrap_or(0),
        };
        s.users.validate(runner)?;
        s.users.check_host(Path::new("/etc"))?;
        let users = UserPool::new(s.users.clone(), runner)?;
        let taint_dir = cfg.agent.state_dir.join("tainted");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&taint_dir)
            .map_err(|e| SandboxError::Dir(taint_dir.clone(), e))?;
        for (slot, why) in read_taints(&taint_dir) {
            tracing::warn!(
                slot,
                "slot {slot} is tainted and takes no job until `airlock slot clear {slot}`: {why}"
            );
            let _ = users.reserve(slot);
        }
        let limits = Limits {
            pids_max: Some(s.pids_max),
            memory_max_bytes: Some(s.memory_max),
            cpu_max: s.cpu_millis.map(CpuMax::millicpus),
            cpu_weight: Some(s.cpu_weight),
        };
        limits.validate()?;
        let parent = CgroupRoot::detect(&s.cgroup_root)?.open_parent(&s.cgroup_parent)?;
        let pool = s
            .address_pool
            .parse()
            .map_err(|e| SandboxError::Config(format!("address_pool: {e}")))?;
        let pool6 = s
            .ipv6_address_pool
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e| SandboxError::Config(format!("ipv6_address_pool: {e}")))?;
        let net = NetManager::new(NetConfig {
            netns_dir: s.netns_dir.clone(),
            pool,
            pool6,
            proc_dir: "/proc".into(),
            forwarding: super::forwarding::ForwardingConfig {
                other: s.other_forwarding,
                state_dir: Some(cfg.agent.state_dir.clone()),
            },
        })?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&s.runtime_dir)
            .map_err(|e| SandboxError::Dir(s.runtime_dir.clone(), e))?;
        let runtime_dir = std::fs::canonicalize(&s.runtime_dir)
            .map_err(|e| SandboxError::Dir(s.runtime_dir.clone(), e))?;
        let bound_runtime_dir = jobfs::prepare_runtime_dir(&runtime_dir)?;
        // airlock's own files (and mounts: the shim detaches what lies under a hidden path)
        // are never visible to a job, whatever the operator lists.
        let mut hide: Vec<PathBuf> = vec![
            "/root".into(),
            "/var/run/docker.sock".into(),
            "/run/docker.sock".into(),
            "/run/containerd".into(),
            "/var/lib/docker".into(),
            "/var/lib/containerd".into(),
            // The runners' own configuration, tokens and build trees: another job's
            // checkout, the agent's registration token.
            "/etc/buildkite-agent".into(),
            "/var/lib/buildkite-agent".into(),
            "/etc/gitlab-runner".into(),
            "/var/lib/gitlab-runner".into(),
            cfg.agent.state_dir.clone(),
            runtime_dir.clone(),
            s.netns_dir.clone(),
        ];
        for p in [
            config_path.parent(),
            cfg.audit.path.parent(),
            cfg.agent.control_socket.parent(),
        ]
        .into_iter()
        .flatten()
        {
            hide.push(p.to_path_buf());
        }
        hide.extend(s.hide.iter().cloned());
        hide.retain(|p| p.is_absolute() && p != Path::new("/"));
        hide.sort();
        hide.dedup();
        Ok(Sandboxes {
            shim,
            runtime_dir,
            bound_runtime_dir,
            limits,
            tmpfs_size: s.tmpfs_size,
            holds: Holds::default(),
            reclaimer: Reclaimer::new(),
            hide,
            pass_env: s.pass_env.clone(),
            taint_dir,
            parent,
            net,
            users: Mutex::new(users),
            egress_cfg: {
                // Upstreams written in the config must parse; the host's resolv.conf is read
                // again at each egress job's start (it may change), so only warn about it.
                match cfg.egress.dns_config() {
                    Ok(_) => {}
                    Err(e)
                        if !cfg.egress.upstreams.is_empty()
                            || cfg.egress.min_admission_ttl_secs().is_err() =>
                    {
                        return Err(SandboxError::Config(e));
                    }
                    Err(e) => tracing::warn!(
                        "egress-controlled jobs cannot start until this is fixed: {e}"
                    ),
                }
                cfg.egress.clone()
            },
            egress: Mutex::new(HashMap::new()),
        })
    }

    pub fn shim(&self) -> &Path {
        &self.shim
    }

    /// Warnings about limits this host cannot enforce (logged once by the cgroup module).
    pub fn warnings(&self) -> Vec<String> {
        self.parent
            .warnings()
            .iter()
            .map(|w| w.to_string())
            .collect()
    }

    fn users(&self) -> std::sync::MutexGuard<'_, UserPool> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn egress_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, JobEgress>> {
        self.egress.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn job_dir(&self, job: &str) -> PathBuf {
        self.runtime_dir.join(job)
    }

    /// Build a job's sandbox on the host side. Anything made is undone on failure.
    pub async fn prepare(
        &self,
        job: &str,
        settings: &JobSettings,
        audit: &Arc<AuditLog>,
    ) -> Result<Prepared, SandboxError> {
        let limits = Limits {
            pids_max: settings.pids_max.or(self.limits.pids_max),
            memory_max_bytes: settings.memory_max.or(self.limits.memory_max_bytes),
            cpu_max: settings
                .cpu_millis
                .map(CpuMax::millicpus)
                .or(self.limits.cpu_max),
            cpu_weight: self.limits.cpu_weight,
        };
        limits.validate()?;
        let user = self.users().acquire()?;
        let undo_user = |me: &Self| {
            let _ = me.users().release(user.slot);
        };
        let cgroup = match self.parent.create_job(job, &limits) {
            Ok(c) => c,
            Err(e) => {
                undo_user(self);
                return Err(e.into());
            }
        };
        let fail = |me: &Self, cgroup: &JobCgroup| {
            let _ = cgroup.teardown(KILL_TIMEOUT);
            undo_user(me);
        };
        let net = match self.net.create(job, settings.network.clone()).await {
            Ok(n) => n,
            Err(e) => {
                fail(self, &cgroup);
                return Err(e.into());
            }
        };
        let listeners = match netns::bind_in_netns(&net.ns_path, &netns::ENDPOINT_ADDRS) {
            Ok(l) => l,
            Err(e) => {
                let _ = self.net.teardown(job).await;
                let _ = self.net.verify_gone(job).await;
                fail(self, &cgroup);
                return Err(e.into());
            }
        };
        let dir = self.job_dir(job);
        let made = std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .and_then(|()| {
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(dir.join("root"))
            });
        if let Err(e) = made {
            drop(listeners);
            let _ = self.net.teardown(job).await;
            let _ = self.net.verify_gone(job).await;
            fail(self, &cgroup);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(SandboxError::Dir(dir, e));
        }
        let mut resolv_conf = None;
        if let Some(policy) = &settings.egress {
            let started = match self.egress_cfg.dns_config() {
                Ok(dns_cfg) => JobEgress::start(
                    job,
                    &net.ns_path,
                    policy.clone(),
                    dns_cfg,
                    net.subnet6.is_some(),
                    audit.clone(),
                )
                .await
                .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match started {
                Ok(eg) => {
                    self.egress_map().insert(job.to_string(), eg);
                    resolv_conf = Some(crate::egress::job::resolv_conf());
                }
                Err(e) => {
                    drop(listeners);
                    let _ = self.net.teardown(job).await;
                    let _ = self.net.verify_gone(job).await;
                    fail(self, &cgroup);
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(SandboxError::Config(format!(
                        "cannot start the job's egress control: {e}"
                    )));
                }
            }
        }
        Ok(Prepared {
            user,
            cgroup,
            limits,
            tmpfs_size: settings.tmpfs_size.unwrap_or(self.tmpfs_size),
            resolv_conf,
            net,
            listeners,
            dir,
            hide: settings.hide.clone(),
        })
    }

    /// The job's environment: the allowed part of the caller's, then airlock's own.
    pub fn job_env(
        &self,
        caller: &BTreeMap<String, String>,
        airlock: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = caller
            .iter()
            .filter(|(k, _)| self.pass_env.iter().any(|p| p == *k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        env.insert("HOME".into(), JOB_HOME.into());
        env.insert("USER".into(), "job".into());
        env.insert("TMPDIR".into(), "/tmp".into());
        env.extend(airlock.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }

    /// Mount the job's tmpfs (`<job dir>/fs`, held until the wipe) and write the shim's spec
    /// for `argv` (0600, in the job's root-only directory). On failure the wipe removes
    /// what was made.
    pub fn write_spec(
        &self,
        job: &str,
        p: &Prepared,
        argv: Vec<String>,
        env: BTreeMap<String, String>,
        token: &str,
    ) -> Result<PathBuf, SandboxError> {
        let ctx = p.exec_context();
        self.mount_fs(job, &ctx)?;
        self.write_spec_file(job, &ctx, "spec.json", argv, env, token)
    }

    /// Mount the job's tmpfs (`<job dir>/fs`), held until the wipe. Once per job.
    pub fn mount_fs(&self, job: &str, ctx: &ExecContext) -> Result<(), SandboxError> {
        let fs = JobFs::create(job, &ctx.dir, ctx.tmpfs_size, ctx.uid, ctx.gid)?;
        self.holds.insert(job, fs.into_hold());
        Ok(())
    }

    /// Write a spec (`<job dir>/<name>`, 0600, a new file) that runs `argv` in the job's
    /// existing sandbox: its cgroup, network namespace, user and tmpfs (mounted already).
    pub fn write_spec_file(
        &self,
        job: &str,
        ctx: &ExecContext,
        name: &str,
        argv: Vec<String>,
        env: BTreeMap<String, String>,
        token: &str,
    ) -> Result<PathBuf, SandboxError> {
        let p = ctx;
        let binds = jobfs::binds(&ctx.dir.join(jobfs::FS_DIR));
        let spec = SandboxSpec {
            job_id: job.to_string(),
            argv,
            env,
            cwd: JOB_WORKSPACE.into(),
            uid: p.uid,
            gid: p.gid,
            root_dir: p.dir.join("root"),
            hostname: "airlock-job".into(),
            netns: Some(p.netns.clone()),
            cgroups: p.cgroups.clone(),
            binds,
            files: vec![SpecFile {
                path: JOB_TOKEN_FILE.into(),
                contents: token.to_string(),
                mode: 0o400,
            }],
            resolv_conf: p.resolv_conf.clone(),
            hide: {
                let mut h = self.hide.clone();
                h.extend(ctx.hide.iter().cloned());
                h.sort();
                h.dedup();
                h
            },
            rlimits: Rlimits {
                // The agent raises its own limit for its connections; its children (the
                // shim) would pass that on. Jobs get a fixed one instead.
                nofile: Some(job_nofile()),
                nproc: None,
                core: Some(0),
            },
            // Beside the spec: `spec.status` for `spec.json`, `exec-2.status` for
            // `exec-2.json` (see `crate::shim_run::outcome`).
            status_file: Some(p.dir.join(Path::new(name).with_extension("status"))),
        };
        spec.check()
            .map_err(|e| SandboxError::Config(format!("the job's sandbox spec is invalid: {e}")))?;
        let path = p.dir.join(name);
        let data = serde_json::to_vec(&spec).expect("a sandbox spec always serialises");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(&data)?;
            f.sync_all()
        };
        write().map_err(|e| SandboxError::Dir(path.clone(), e))?;
        Ok(path)
    }

    /// Remove everything of the job and check that nothing is left. The slot is given back
    /// only when nothing was.
    pub async fn wipe(&self, job: &str, slot: Option<u32>) -> WipeReport {
        let started = std::time::Instant::now();
        let mut report = WipeReport::default();
        match self.parent.job(job) {
            Ok(cg) => {
                let cg2 = cg.clone();
                let torn = tokio::task::spawn_blocking(move || cg2.teardown(KILL_TIMEOUT)).await;
                match torn {
                    Ok(Ok(r)) => {
                        report.processes_killed = r.processes_killed;
                        report.cgroup_removed = !r.removed.is_empty();
                    }
                    Ok(Err(e)) => report.leftovers.push(format!("cgroup: {e}")),
                    Err(e) => report.leftovers.push(format!("cgroup teardown: {e}")),
                }
                report
                    .leftovers
                    .extend(cg.verify_gone().iter().map(|l| format!("cgroup: {l:?}")));
            }
            Err(e) => report.leftovers.push(format!("cgroup: {e}")),
        }
        // The resolver's and NFLOG sockets live in the job's namespace: closed first.
        let egress = self.egress_map().remove(job);
        if let Some(eg) = egress {
            eg.stop().await;
        }
        match self.net.teardown(job).await {
            Ok(()) => report.network_removed = true,
            Err(e) => report.leftovers.push(format!("network: {e}")),
        }
        match self.net.verify_gone(job).await {
            Ok(left) => report
                .leftovers
                .extend(left.iter().map(|l| format!("network: {l:?}"))),
            Err(e) => report.leftovers.push(format!("network check: {e}")),
        }
        // The job's files: with nothing of the job running, only the host's mount of its
        // tmpfs and the agent's handle hold it. The detach is cheap and leaves no path to the
        // files; the kernel frees them when the reclaim drops the handle, off this path.
        let dir = self.job_dir(job);
        let hold = self
            .holds
            .take(job)
            .or_else(|| jobfs::hold(&dir.join(jobfs::FS_DIR)));
        match jobfs::detach_all_under(&dir) {
            Ok(left) if left.is_empty() => report.files_detached = true,
            Ok(left) => report
                .leftovers
                .extend(left.iter().map(|m| format!("mount {}", m.display()))),
            Err(e) => report.leftovers.push(format!("mounts: {e}")),
        }
        if !report.files_detached {
            // Removing the directory would walk into what is still mounted in it.
            report.leftovers.push(format!(
                "{} not removed: a mount in it is left",
                dir.display()
            ));
        } else {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => report.dir_removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => report.dir_removed = true,
                Err(e) => report.leftovers.push(format!("{}: {e}", dir.display())),
            }
            if dir.exists() {
                report
                    .leftovers
                    .push(format!("{} still exists", dir.display()));
            }
        }
        if let Some(hold) = hold {
            self.reclaimer.reclaim(job, hold);
        }
        if let Some(slot) = slot {
            if report.leftovers.is_empty() {
                let _ = self.users().release(slot);
            } else {
                let note = serde_json::json!({"job": job, "leftovers": report.leftovers});
                if let Err(e) =
                    std::fs::write(self.taint_dir.join(slot.to_string()), note.to_string())
                {
                    tracing::error!(slot, "cannot record the taint of slot {slot}: {e}");
                }
            }
        }
        report.millis = started.elapsed().as_millis();
        report
    }

    /// At agent shutdown with no jobs left: remove the agent's own (empty) cgroup parent
    /// and the bind mounts of its namespace and runtime directories.
    pub fn remove_parent(&self) {
        if let Err(e) = self.parent.remove() {
            tracing::debug!("cgroup parent not removed: {e}");
        }
        self.net.release_dir();
        if self.bound_runtime_dir {
            jobfs::release_runtime_dir(&self.runtime_dir);
        }
    }

    /// Keep `gauge` at the number of wiped jobs whose files are still being freed.
    pub fn count_reclaims_in(&self, gauge: prometheus_client::metrics::gauge::Gauge) {
        self.reclaimer.count_in(gauge);
    }

    /// At agent shutdown: wait up to `timeout` for the background reclaims; `true` when
    /// none is left. (Were the agent to exit first, the kernel would finish them in its
    /// exit instead.)
    pub async fn finish_reclaims(&self, timeout: Duration) -> bool {
        let r = self.reclaimer.clone();
        tokio::task::spawn_blocking(move || r.wait_idle(timeout))
            .await
            .unwrap_or(false)
    }

    /// Tainted slots and why.
    pub fn tainted(&self) -> Vec<(u32, String)> {
        read_taints(&self.taint_dir)
    }

    /// An operator has dealt with what a wipe left: the slot takes jobs again.
    pub fn clear_taint(&self, slot: u32) -> Result<String, SandboxError> {
        let path = self.taint_dir.join(slot.to_string());
        let why = std::fs::read_to_string(&path).map_err(|e| SandboxError::Dir(path.clone(), e))?;
        std::fs::remove_file(&path).map_err(|e| SandboxError::Dir(path.clone(), e))?;
        let _ = self.users().release(slot);
        Ok(why)
    }

    /// Keep a recorded job's slot taken (after a restart, before its wipe).
    pub fn reserve_slot(&self, slot: u32) {
        let _ = self.users().reserve(slot);
    }

    /// Every airlock-owned cgroup, namespace and link of a job not in `keep`, removed.
    pub async fn reap_orphans(&self, keep: &HashSet<String>) -> Vec<String> {
        let mut reaped = Vec::new();
        if let Ok(groups) = self.parent.list_orphans() {
            for g in groups {
                if keep.contains(g.job_id()) {
                    continue;
                }
                let id = g.job_id().to_string();
                let _ = tokio::task::spawn_blocking(move || g.teardown(KILL_TIMEOUT)).await;
                reaped.push(format!("cgroup of {id}"));
            }
        }
        if let Ok(orphans) = self.net.list_orphans().await {
            for ns in orphans.namespaces {
                if ns.job_id.as_ref().is_some_and(|j| keep.contains(j)) {
                    continue;
                }
                let _ = match &ns.job_id {
                    Some(j) => match self.net.teardown(j).await {
                        Ok(()) => self.net.verify_gone(j).await.map(|_| ()),
                        Err(e) => Err(e),
                    },
                    None => self.net.remove_orphan_namespace(&ns.name),
                };
                reaped.push(format!("network namespace {}", ns.name));
            }
            // Links are not reaped one by one: a job's veth goes with its namespace, so a
            // link whose namespace still lives belongs to someone (another agent's test, an
            // operator's) and is not ours to remove.
        }
        // Exceptions in the host's table whose link is gone (jobs of a crashed agent).
        match self.net.remove_stale_exceptions().await {
            Ok(0) => {}
            Ok(n) => reaped.push(format!(
                "{n} stale exception(s) in the host's nftables table"
            )),
            Err(e) => tracing::warn!("cannot check the host's nftables exceptions: {e}"),
        }
        if let Ok(entries) = std::fs::read_dir(&self.runtime_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if !crate::jobs::valid_job_id(&name) || keep.contains(&name) {
                    continue;
                }
                // The job's tmpfs first, as in a wipe: removing the directory would walk
                // into it file by file.
                let dir = e.path();
                let hold = jobfs::hold(&dir.join(jobfs::FS_DIR));
                match jobfs::detach_all_under(&dir) {
                    Ok(left) if left.is_empty() => {
                        let _ = std::fs::remove_dir_all(&dir);
                        reaped.push(format!("directory {}", dir.display()));
                    }
                    Ok(left) => tracing::error!(
                        dir = %dir.display(),
                        mounts = %left.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
                        "an orphaned job directory keeps mounts that cannot be detached; left in place"
                    ),
                    Err(e) => {
                        tracing::error!(dir = %dir.display(), "orphaned job directory left in place: {e}")
                    }
                }
                if let Some(hold) = hold {
                    self.reclaimer.reclaim(&name, hold);
                }
            }
        }
        reaped
    }
}

/// `(slot, why)` of every taint file in `dir`.
fn read_taints(dir: &Path) -> Vec<(u32, String)> {
    let mut v: Vec<(u32, String)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let slot = e.file_name().to_str()?.parse().ok()?;
            Some((slot, std::fs::read_to_string(e.path()).unwrap_or_default()))
        })
        .collect();
    v.sort();
    v
}
