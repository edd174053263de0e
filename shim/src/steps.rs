//! The order of the sandbox setup, in one place. Each step names itself, so a failure says
//! where it happened; any failure ends the sequence (nothing after it runs, least of all
//! `execve`): the shim never fails open. `docs/sandbox.md` gives the reason for each step
//! and its place.

use crate::process::Forked;
use crate::syscalls::Syscalls;
use crate::{env, namespaces, rlimits, SandboxSpec, SetupError};
use nix::unistd::Pid;
use seccompiler::BpfProgram;
use std::fmt;
use std::path::Path;

/// The setup steps, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    CheckSpec,
    BuildCommand,
    CompileSeccomp,
    JoinCgroup,
    OomScore,
    JoinNetns,
    Unshare,
    Fork,
    MountsPrivate,
    BindHostRoot,
    ProcSys,
    MaskKernel,
    Dev,
    Binds,
    Files,
    Hide,
    PivotRoot,
    Hostname,
    Setsid,
    CloseFds,
    Rlimits,
    DropBoundingSet,
    ClearGroups,
    SetGid,
    SetUid,
    Pdeathsig,
    NoNewPrivs,
    DropCapabilities,
    Chdir,
    ResolveProgram,
    Seccomp,
    Exec,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Step::CheckSpec => "check the spec",
            Step::BuildCommand => "build argv and environment",
            Step::CompileSeccomp => "compile the seccomp filter",
            Step::JoinCgroup => "join the job's cgroup",
            Step::OomScore => "reset the OOM score adjustment",
            Step::JoinNetns => "join the job's network namespace",
            Step::Unshare => "unshare namespaces",
            Step::Fork => "fork the job's pid 1",
            Step::MountsPrivate => "make mounts private",
            Step::BindHostRoot => "bind the host's / read-only",
            Step::ProcSys => "mount /proc and /sys",
            Step::MaskKernel => "mask kernel paths in /proc and /sys",
            Step::Dev => "build /dev",
            Step::Binds => "bind the job's directories",
            Step::Files => "write the job's files",
            Step::Hide => "hide host paths",
            Step::PivotRoot => "pivot_root and detach the old root",
            Step::Hostname => "set the hostname",
            Step::Setsid => "setsid",
            Step::CloseFds => "close inherited descriptors",
            Step::Rlimits => "set resource limits",
            Step::DropBoundingSet => "drop the capability bounding set",
            Step::ClearGroups => "clear supplementary groups",
            Step::SetGid => "switch to the job's group",
            Step::SetUid => "switch to the job's user",
            Step::Pdeathsig => "set the parent-death signal",
            Step::NoNewPrivs => "set no_new_privs",
            Step::DropCapabilities => "drop every capability",
            Step::Chdir => "change to the working directory",
            Step::ResolveProgram => "find the command",
            Step::Seccomp => "install the seccomp filter",
            Step::Exec => "execve the command",
        };
        f.write_str(s)
    }
}

/// A setup failure and the step it happened in.
#[derive(Debug, thiserror::Error)]
#[error("sandbox setup failed at step \"{step}\": {source}")]
pub struct Failed {
    pub step: Step,
    #[source]
    pub source: SetupError,
}

/// How [`run`] ended without failing.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The shim's parent: wait for this pid and exit with its status.
    Parent(Pid),
    /// `execve` returned `Ok` (only a test double does that).
    Executed,
}

trait At<T> {
    fn at(self, step: Step) -> Result<T, Failed>;
}

impl<T, E: Into<SetupError>> At<T> for Result<T, E> {
    fn at(self, step: Step) -> Result<T, Failed> {
        self.map_err(|e| Failed {
            step,
            source: e.into(),
        })
    }
}

/// Runs the whole setup. In the real shim the parent returns [`Outcome::Parent`] and the
/// child ends in `execve`; on failure either returns the step that failed.
pub fn run<S: Syscalls>(sys: &mut S, spec: &SandboxSpec) -> Result<Outcome, Failed> {
    // Parse, check, then act: everything that can fail without privileges fails first.
    spec.check().at(Step::CheckSpec)?;
    let cmd = env::command(&spec.argv, &spec.env).at(Step::BuildCommand)?;
    let filter = crate::seccomp::job_filter().at(Step::CompileSeccomp)?;

    // Cgroups first: the cgroup namespace unshared next is rooted where the shim is then,
    // and everything forked later is inside.
    for dir in &spec.cgroups {
        sys.join_cgroup(dir).at(Step::JoinCgroup)?;
    }
    sys.reset_oom_score().at(Step::OomScore)?;
    if let Some(netns) = &spec.netns {
        sys.join_netns(netns).at(Step::JoinNetns)?;
    }
    sys.unshare(namespaces::flags(spec.netns.is_none()))
        .at(Step::Unshare)?;
    // The new pid namespace applies to children: the job must be the child, as its pid 1.
    if let Forked::Parent(pid) = sys.fork().at(Step::Fork)? {
        return Ok(Outcome::Parent(pid));
    }
    child(sys, spec, &cmd, &filter)
}

fn child<S: Syscalls>(
    sys: &mut S,
    spec: &SandboxSpec,
    cmd: &env::Command,
    filter: &BpfProgram,
) -> Result<Outcome, Failed> {
    let root = spec.root_dir.as_path();
    sys.make_mounts_private().at(Step::MountsPrivate)?;
    sys.bind_host_root(root).at(Step::BindHostRoot)?;
    sys.mount_proc_sys(root).at(Step::ProcSys)?;
    // Right after their mounts, before anything of the job's is bound: runc's masked and
    // read-only paths, and the DMI ids.
    for path in crate::rootfs::MASKED_PATHS {
        sys.mask_kernel_path(root, Path::new(path))
            .at(Step::MaskKernel)?;
    }
    for path in crate::rootfs::READONLY_PATHS {
        sys.read_only_kernel_path(root, Path::new(path))
            .at(Step::MaskKernel)?;
    }
    sys.build_dev(root).at(Step::Dev)?;
    // Parents before children, so one directory of the job may lie under another.
    let mut binds: Vec<_> = spec.binds.iter().collect();
    binds.sort_by_key(|b| b.target.components().count());
    for b in binds {
        sys.bind_job_dir(root, b).at(Step::Binds)?;
    }
    for f in &spec.files {
        sys.write_file(root, f, spec.uid, spec.gid)
            .at(Step::Files)?;
    }
    if let Some(conf) = &spec.resolv_conf {
        let dirs: Vec<_> = spec.binds.iter().map(|b| b.target.clone()).collect();
        sys.set_resolv_conf(root, conf, &dirs).at(Step::Files)?;
    }
    for path in &spec.hide {
        sys.hide(root, path).at(Step::Hide)?;
    }
    sys.pivot_root(root).at(Step::PivotRoot)?;
    sys.set_hostname(&spec.hostname).at(Step::Hostname)?;
    sys.setsid().at(Step::Setsid)?;
    sys.close_inherited_fds().at(Step::CloseFds)?;
    for (resource, value) in rlimits::plan(&spec.rlimits) {
        sys.set_rlimit(resource, value).at(Step::Rlimits)?;
    }
    // Needs CAP_SETPCAP, which the uid change takes away.
    sys.drop_bounding_set().at(Step::DropBoundingSet)?;
    sys.clear_groups().at(Step::ClearGroups)?;
    sys.set_gid(spec.gid).at(Step::SetGid)?;
    sys.set_uid(spec.uid, spec.gid).at(Step::SetUid)?;
    // After the uid change: the kernel clears the parent-death signal on credential changes.
    sys.set_pdeathsig().at(Step::Pdeathsig)?;
    sys.set_no_new_privs().at(Step::NoNewPrivs)?;
    sys.drop_all_caps().at(Step::DropCapabilities)?;
    sys.chdir(&spec.cwd).at(Step::Chdir)?;
    let path = spec.env.get("PATH").map(String::as_str);
    let file = sys
        .resolve_program(&spec.argv[0], path)
        .at(Step::ResolveProgram)?;
    // Last: from here on only execve and what the job itself does.
    sys.install_seccomp(filter).at(Step::Seccomp)?;
    sys.execve(&file, &cmd.argv, &cmd.env).at(Step::Exec)?;
    Ok(Outcome::Executed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::spec;
    use crate::BindMount;
    use nix::sched::CloneFlags;
    use nix::sys::resource::Resource;
    use std::ffi::{CStr, CString};
    use std::path::Path;

    /// Records every call; fails the call named `fail` with an error; forks as `forked`.
    struct Fake {
        calls: Vec<String>,
        fail: Option<&'static str>,
        forked: Forked,
    }

    impl Fake {
        fn new(forked: Forked) -> Self {
            Fake {
                calls: Vec::new(),
                fail: None,
                forked,
            }
        }
        fn call(&mut self, name: &'static str, detail: String) -> Result<(), SetupError> {
            self.calls.push(if detail.is_empty() {
                name.to_string()
            } else {
                format!("{name} {detail}")
            });
            if self.fail == Some(name) {
                return Err(crate::fds::Error::StillOpen(99).into());
            }
            Ok(())
        }
        fn pos(&self, name: &str) -> usize {
            self.calls
                .iter()
                .position(|c| c == name || c.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} not called: {:?}", self.calls))
        }
        fn names(&self) -> Vec<&str> {
            self.calls
                .iter()
                .map(|c| c.split(' ').next().unwrap())
                .collect()
        }
    }

    impl Syscalls for Fake {
        fn join_cgroup(&mut self, dir: &Path) -> Result<(), SetupError> {
            self.call("join_cgroup", dir.display().to_string())
        }
        fn reset_oom_score(&mut self) -> Result<(), SetupError> {
            self.call("reset_oom_score", String::new())
        }
        fn join_netns(&mut self, path: &Path) -> Result<(), SetupError> {
            self.call("join_netns", path.display().to_string())
        }
        fn unshare(&mut self, flags: CloneFlags) -> Result<(), SetupError> {
            let net = flags.contains(CloneFlags::CLONE_NEWNET);
            self.call("unshare", format!("net={net}"))
        }
        fn fork(&mut self) -> Result<Forked, SetupError> {
            self.call("fork", String::new())?;
            Ok(self.forked)
        }
        fn make_mounts_private(&mut self) -> Result<(), SetupError> {
            self.call("make_mounts_private", String::new())
        }
        fn bind_host_root(&mut self, root_dir: &Path) -> Result<(), SetupError> {
            self.call("bind_host_root", root_dir.display().to_string())
        }
        fn mount_proc_sys(&mut self, _: &Path) -> Result<(), SetupError> {
            self.call("mount_proc_sys", String::new())
        }
        fn mask_kernel_path(&mut self, _: &Path, path: &Path) -> Result<(), SetupError> {
            self.call("mask_kernel_path", path.display().to_string())
        }
        fn read_only_kernel_path(&mut self, _: &Path, path: &Path) -> Result<(), SetupError> {
            self.call("read_only_kernel_path", path.display().to_string())
        }
        fn build_dev(&mut self, _: &Path) -> Result<(), SetupError> {
            self.call("build_dev", String::new())
        }
        fn bind_job_dir(&mut self, _: &Path, b: &BindMount) -> Result<(), SetupError> {
            let (from, to) = (b.source.display(), b.target.display());
            self.call("bind_job_dir", format!("{from} -> {to}"))
        }
        fn write_file(
            &mut self,
            _: &Path,
            file: &crate::SpecFile,
            uid: u32,
            _: u32,
        ) -> Result<(), SetupError> {
            self.call("write_file", format!("{} uid={uid}", file.path.display()))
        }
        fn set_resolv_conf(
            &mut self,
            _: &Path,
            _: &str,
            _: &[std::path::PathBuf],
        ) -> Result<(), SetupError> {
            self.call("set_resolv_conf", String::new())
        }
        fn hide(&mut self, _: &Path, path: &Path) -> Result<(), SetupError> {
            self.call("hide", path.display().to_string())
        }
        fn pivot_root(&mut self, _: &Path) -> Result<(), SetupError> {
            self.call("pivot_root", String::new())
        }
        fn set_hostname(&mut self, name: &str) -> Result<(), SetupError> {
            self.call("set_hostname", name.to_string())
        }
        fn setsid(&mut self) -> Result<(), SetupError> {
            self.call("setsid", String::new())
        }
        fn close_inherited_fds(&mut self) -> Result<(), SetupError> {
            self.call("close_inherited_fds", String::new())
        }
        fn set_rlimit(&mut self, r: Resource, v: u64) -> Result<(), SetupError> {
            self.call("set_rlimit", format!("{r:?}={v}"))
        }
        fn drop_bounding_set(&mut self) -> Result<(), SetupError> {
            self.call("drop_bounding_set", String::new())
        }
        fn clear_groups(&mut self) -> Result<(), SetupError> {
            self.call("clear_groups", String::new())
        }
        fn set_gid(&mut self, gid: u32) -> Result<(), SetupError> {
            self.call("set_gid", gid.to_string())
        }
        fn set_uid(&mut self, uid: u32, _: u32) -> Result<(), SetupError> {
            self.call("set_uid", uid.to_string())
        }
        fn set_pdeathsig(&mut self) -> Result<(), SetupError> {
            self.call("set_pdeathsig", String::new())
        }
        fn set_no_new_privs(&mut self) -> Result<(), SetupError> {
            self.call("set_no_new_privs", String::new())
        }
        fn drop_all_caps(&mut self) -> Result<(), SetupError> {
            self.call("drop_all_caps", String::new())
        }
        fn chdir(&mut self, dir: &Path) -> Result<(), SetupError> {
            self.call("chdir", dir.display().to_string())
        }
        fn resolve_program(&mut self, argv0: &str, _: Option<&str>) -> Result<CString, SetupError> {
            self.call("resolve_program", argv0.to_string())?;
            Ok(CString::new(argv0).unwrap())
        }
        fn install_seccomp(&mut self, program: &BpfProgram) -> Result<(), SetupError> {
            let nonempty = !program.is_empty();
            self.call("install_seccomp", format!("nonempty={nonempty}"))
        }
        fn execve(
            &mut self,
            file: &CStr,
            argv: &[CString],
            env: &[CString],
        ) -> Result<(), SetupError> {
            self.call("execve", format!("{file:?} argv={argv:?} env={env:?}"))
        }
    }

    fn child_run(s: &SandboxSpec) -> (Fake, Result<Outcome, Failed>) {
        let mut fake = Fake::new(Forked::Child);
        let r = run(&mut fake, s);
        (fake, r)
    }

    #[test]
    fn the_child_runs_every_step_in_order() {
        let mut s = spec();
        let bind = |dir: &str| BindMount {
            source: format!("/var/lib/airlock/jobs/j-1/fs{dir}").into(),
            target: dir.into(),
        };
        s.binds.insert(0, bind("/home/job/work"));
        s.binds.push(bind("/home"));
        let (fake, r) = child_run(&s);
        assert_eq!(r.unwrap(), Outcome::Executed);
        assert_eq!(
            fake.names(),
            vec![
                "join_cgroup",
                "reset_oom_score",
                "unshare",
                "fork",
                "make_mounts_private",
                "bind_host_root",
                "mount_proc_sys",
                "mask_kernel_path",
                "mask_kernel_path",
                "mask_kernel_path",
                "mask_kernel_path",
                "mask_kernel_path",
                "mask_kernel_path",
                "mask_kernel_path",
                "mask_kernel_path",
                "mask_kernel_path",
                "mask_kernel_path",
                "mask_kernel_path",
                "mask_kernel_path",
                "mask_kernel_path",
                "read_only_kernel_path",
                "read_only_kernel_path",
                "read_only_kernel_path",
                "read_only_kernel_path",
                "read_only_kernel_path",
                "build_dev",
                "bind_job_dir",
                "bind_job_dir",
                "bind_job_dir",
                "write_file",
                "hide",
                "pivot_root",
                "set_hostname",
                "setsid",
                "close_inherited_fds",
                "set_rlimit",
                "set_rlimit",
                "drop_bounding_set",
                "clear_groups",
                "set_gid",
                "set_uid",
                "set_pdeathsig",
                "set_no_new_privs",
                "drop_all_caps",
                "chdir",
                "resolve_program",
                "install_seccomp",
                "execve",
            ]
        );
        // Parents are bound before children, whatever the spec's order.
        let binds: Vec<_> = fake
            .calls
            .iter()
            .filter(|c| c.starts_with("bind_job_dir"))
            .collect();
        assert_eq!(
            binds,
            [
                "bind_job_dir /var/lib/airlock/jobs/j-1/fs/tmp -> /tmp",
                "bind_job_dir /var/lib/airlock/jobs/j-1/fs/home -> /home",
                "bind_job_dir /var/lib/airlock/jobs/j-1/fs/home/job/work -> /home/job/work",
            ]
        );
        // A fresh network namespace when the agent gave none; core dumps off.
        assert!(fake.calls.contains(&"unshare net=true".to_string()));
        assert!(fake.calls.contains(&"set_rlimit RLIMIT_CORE=0".to_string()));
    }

    #[test]
    fn runcs_masked_and_read_only_paths_and_the_dmi_ids_are_covered() {
        let (f, _) = child_run(&spec());
        let args = |name: &str| -> Vec<String> {
            f.calls
                .iter()
                .filter_map(|c| c.strip_prefix(&format!("{name} ")).map(str::to_string))
                .collect()
        };
        assert_eq!(
            args("mask_kernel_path"),
            [
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/proc/scsi",
                "/sys/firmware",
                "/sys/devices/virtual/powercap",
                "/sys/class/dmi",
                "/sys/devices/virtual/dmi",
            ]
        );
        assert_eq!(
            args("read_only_kernel_path"),
            [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger"
            ]
        );
        // After the mounts they cover; before anything of the job is bound or run.
        assert!(f.pos("mount_proc_sys") < f.pos("mask_kernel_path"));
        assert!(f.pos("read_only_kernel_path") < f.pos("bind_job_dir"));
    }

    #[test]
    fn the_security_critical_orderings_hold() {
        let (f, _) = child_run(&spec());
        let before = |a: &str, b: &str| {
            assert!(
                f.pos(a) < f.pos(b),
                "{a} must come before {b}: {:?}",
                f.calls
            )
        };
        before("join_cgroup", "unshare"); // cgroup namespace rooted at the job's cgroup
        before("join_cgroup", "fork"); // every job process in the cgroup
        before("reset_oom_score", "fork"); // the job's pid 1 never has the agent's OOM protection
        before("unshare", "fork"); // the job is pid 1 of the new pid namespace
        before("make_mounts_private", "bind_host_root");
        before("bind_host_root", "bind_job_dir"); // the job's directories over the host's
        before("bind_job_dir", "write_file"); // the token lands in the job's tmpfs
        before("bind_job_dir", "hide"); // nothing bound re-exposes a hidden path
        before("hide", "pivot_root");
        before("pivot_root", "set_uid");
        before("setsid", "execve");
        before("close_inherited_fds", "execve");
        before("drop_bounding_set", "set_uid"); // needs CAP_SETPCAP
        before("clear_groups", "set_gid");
        before("set_gid", "set_uid");
        before("set_uid", "set_pdeathsig"); // a uid change clears it
        before("set_no_new_privs", "drop_all_caps");
        before("drop_all_caps", "install_seccomp");
        before("install_seccomp", "execve");
        assert_eq!(f.names().last(), Some(&"execve"));
        assert_eq!(f.names()[f.names().len() - 2], "install_seccomp");
    }

    #[test]
    fn execve_gets_exactly_the_spec_environment() {
        let (f, _) = child_run(&spec());
        let exec = &f.calls[f.pos("execve")];
        assert!(exec.contains("env=[\"HOME=/home/job\"]"), "{exec}");
    }

    #[test]
    fn a_joined_netns_is_not_replaced_by_a_fresh_one() {
        let mut s = spec();
        s.netns = Some("/run/netns/al-j1".into());
        let (f, _) = child_run(&s);
        assert!(f.pos("join_netns") < f.pos("unshare"));
        assert!(f.calls.contains(&"unshare net=false".to_string()));
    }

    #[test]
    fn the_parent_stops_after_fork() {
        let mut fake = Fake::new(Forked::Parent(Pid::from_raw(42)));
        assert_eq!(
            run(&mut fake, &spec()).unwrap(),
            Outcome::Parent(Pid::from_raw(42))
        );
        assert_eq!(
            fake.names(),
            vec!["join_cgroup", "reset_oom_score", "unshare", "fork"]
        );
    }

    #[test]
    fn a_failure_at_any_step_aborts_before_execve() {
        let (all, _) = child_run(&spec());
        let names: Vec<&'static str> = all
            .names()
            .into_iter()
            .map(|n| &*Box::leak(n.to_string().into_boxed_str()))
            .collect();
        for fail in names {
            let mut fake = Fake::new(Forked::Child);
            fake.fail = Some(fail);
            let err = run(&mut fake, &spec()).expect_err(fail);
            assert_eq!(
                fake.names().last(),
                Some(&fail),
                "nothing runs after {fail}"
            );
            if fail != "execve" {
                assert!(
                    !fake.names().contains(&"execve"),
                    "{fail} failed but exec ran"
                );
            }
            assert!(
                err.to_string().starts_with("sandbox setup failed at step"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_bad_spec_fails_before_any_call() {
        let mut s = spec();
        s.uid = 0;
        let (f, r) = child_run(&s);
        assert_eq!(r.unwrap_err().step, Step::CheckSpec);
        assert!(f.calls.is_empty());
    }
}
