//! The seam between the order of the sandbox setup ([`crate::steps`]) and the privileged
//! calls that carry it out (youki's `Syscall` idea): [`Linux`] makes the real calls, and the
//! tests drive the same sequence through a recording fake, without root.

use crate::process::Forked;
use crate::{capabilities, cgroup, env, fds, namespaces, process, rlimits, rootfs};
use crate::{seccomp, user, BindMount, SetupError, SpecFile};
use nix::sched::CloneFlags;
use nix::sys::resource::Resource;
use seccompiler::BpfProgram;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

/// The privileged calls of the shim, one per setup step.
pub trait Syscalls {
    fn join_cgroup(&mut self, dir: &Path) -> Result<(), SetupError>;
    fn reset_oom_score(&mut self) -> Result<(), SetupError>;
    fn join_netns(&mut self, path: &Path) -> Result<(), SetupError>;
    fn unshare(&mut self, flags: CloneFlags) -> Result<(), SetupError>;
    fn fork(&mut self) -> Result<Forked, SetupError>;
    fn make_mounts_private(&mut self) -> Result<(), SetupError>;
    fn bind_host_root(&mut self, root_dir: &Path) -> Result<(), SetupError>;
    fn mount_proc_sys(&mut self, root_dir: &Path) -> Result<(), SetupError>;
    /// Masks one of `rootfs::MASKED_PATHS` in the job's `/proc` or `/sys`.
    fn mask_kernel_path(&mut self, root_dir: &Path, path: &Path) -> Result<(), SetupError>;
    /// Makes one of `rootfs::READONLY_PATHS` read-only in the job's `/proc`.
    fn read_only_kernel_path(&mut self, root_dir: &Path, path: &Path) -> Result<(), SetupError>;
    fn build_dev(&mut self, root_dir: &Path) -> Result<(), SetupError>;
    fn bind_job_dir(&mut self, root_dir: &Path, bind: &BindMount) -> Result<(), SetupError>;
    fn write_file(
        &mut self,
        root_dir: &Path,
        file: &SpecFile,
        uid: u32,
        gid: u32,
    ) -> Result<(), SetupError>;
    fn set_resolv_conf(
        &mut self,
        root_dir: &Path,
        contents: &str,
        job_dirs: &[PathBuf],
    ) -> Result<(), SetupError>;
    fn hide(&mut self, root_dir: &Path, path: &Path) -> Result<(), SetupError>;
    fn pivot_root(&mut self, root_dir: &Path) -> Result<(), SetupError>;
    fn set_hostname(&mut self, name: &str) -> Result<(), SetupError>;
    fn setsid(&mut self) -> Result<(), SetupError>;
    fn close_inherited_fds(&mut self) -> Result<(), SetupError>;
    fn set_rlimit(&mut self, resource: Resource, value: u64) -> Result<(), SetupError>;
    fn drop_bounding_set(&mut self) -> Result<(), SetupError>;
    fn clear_groups(&mut self) -> Result<(), SetupError>;
    fn set_gid(&mut self, gid: u32) -> Result<(), SetupError>;
    fn set_uid(&mut self, uid: u32, gid: u32) -> Result<(), SetupError>;
    fn set_pdeathsig(&mut self) -> Result<(), SetupError>;
    fn set_no_new_privs(&mut self) -> Result<(), SetupError>;
    fn drop_all_caps(&mut self) -> Result<(), SetupError>;
    fn chdir(&mut self, dir: &Path) -> Result<(), SetupError>;
    fn resolve_program(&mut self, argv0: &str, path: Option<&str>) -> Result<CString, SetupError>;
    fn install_seccomp(&mut self, program: &BpfProgram) -> Result<(), SetupError>;
    /// Replaces the process; returns only on failure (the real one never returns `Ok`).
    fn execve(&mut self, file: &CStr, argv: &[CString], env: &[CString]) -> Result<(), SetupError>;
}

/// The real calls.
#[derive(Debug, Default)]
pub struct Linux;

/// Errors of the few calls made directly here.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("prctl(PR_SET_NO_NEW_PRIVS) failed: {0}; the job must not start without it")]
    NoNewPrivs(#[source] nix::Error),
    #[error("chdir({0:?}) as the job's user failed: {1}")]
    Chdir(std::path::PathBuf, #[source] nix::Error),
    #[error("execve({0:?}) failed: {1}")]
    Exec(CString, #[source] nix::Error),
}

impl From<Error> for SetupError {
    fn from(e: Error) -> Self {
        SetupError::Call(e)
    }
}

impl Syscalls for Linux {
    fn reset_oom_score(&mut self) -> Result<(), SetupError> {
        Ok(crate::process::reset_oom_score()?)
    }
    fn join_cgroup(&mut self, dir: &Path) -> Result<(), SetupError> {
        Ok(cgroup::join(dir)?)
    }
    fn join_netns(&mut self, path: &Path) -> Result<(), SetupError> {
        Ok(namespaces::join_netns(path)?)
    }
    fn unshare(&mut self, flags: CloneFlags) -> Result<(), SetupError> {
        Ok(namespaces::unshare(flags)?)
    }
    fn fork(&mut self) -> Result<Forked, SetupError> {
        Ok(process::fork()?)
    }
    fn make_mounts_private(&mut self) -> Result<(), SetupError> {
        Ok(rootfs::make_private()?)
    }
    fn bind_host_root(&mut self, root_dir: &Path) -> Result<(), SetupError> {
        Ok(rootfs::bind_host_root(root_dir)?)
    }
    fn mount_proc_sys(&mut self, root_dir: &Path) -> Result<(), SetupError> {
        Ok(rootfs::mount_proc_sys(root_dir)?)
    }
    fn mask_kernel_path(&mut self, root_dir: &Path, path: &Path) -> Result<(), SetupError> {
        rootfs::mask_kernel_path(root_dir, path)?;
        Ok(())
    }
    fn read_only_kernel_path(&mut self, root_dir: &Path, path: &Path) -> Result<(), SetupError> {
        rootfs::read_only_kernel_path(root_dir, path)?;
        Ok(())
    }
    fn build_dev(&mut self, root_dir: &Path) -> Result<(), SetupError> {
        Ok(rootfs::build_dev(root_dir)?)
    }
    fn bind_job_dir(&mut self, root_dir: &Path, bind: &BindMount) -> Result<(), SetupError> {
        Ok(rootfs::bind_job_dir(root_dir, bind)?)
    }
    fn write_file(
        &mut self,
        root_dir: &Path,
        file: &SpecFile,
        uid: u32,
        gid: u32,
    ) -> Result<(), SetupError> {
        Ok(rootfs::write_file(root_dir, file, uid, gid)?)
    }
    fn set_resolv_conf(
        &mut self,
        root_dir: &Path,
        contents: &str,
        job_dirs: &[PathBuf],
    ) -> Result<(), SetupError> {
        Ok(rootfs::set_resolv_conf(root_dir, contents, job_dirs)?)
    }
    fn hide(&mut self, root_dir: &Path, path: &Path) -> Result<(), SetupError> {
        rootfs::hide(root_dir, path)?;
        Ok(())
    }
    fn pivot_root(&mut self, root_dir: &Path) -> Result<(), SetupError> {
        Ok(rootfs::pivot(root_dir)?)
    }
    fn set_hostname(&mut self, name: &str) -> Result<(), SetupError> {
        Ok(namespaces::set_hostname(name)?)
    }
    fn setsid(&mut self) -> Result<(), SetupError> {
        Ok(process::setsid()?)
    }
    fn close_inherited_fds(&mut self) -> Result<(), SetupError> {
        Ok(fds::close_inherited()?)
    }
    fn set_rlimit(&mut self, resource: Resource, value: u64) -> Result<(), SetupError> {
        Ok(rlimits::set(resource, value)?)
    }
    fn drop_bounding_set(&mut self) -> Result<(), SetupError> {
        Ok(capabilities::drop_bounding()?)
    }
    fn clear_groups(&mut self) -> Result<(), SetupError> {
        Ok(user::clear_groups()?)
    }
    fn set_gid(&mut self, gid: u32) -> Result<(), SetupError> {
        Ok(user::set_gid(gid)?)
    }
    fn set_uid(&mut self, uid: u32, gid: u32) -> Result<(), SetupError> {
        Ok(user::set_uid(uid, gid)?)
    }
    fn set_pdeathsig(&mut self) -> Result<(), SetupError> {
        Ok(process::set_pdeathsig()?)
    }
    fn set_no_new_privs(&mut self) -> Result<(), SetupError> {
        nix::sys::prctl::set_no_new_privs().map_err(Error::NoNewPrivs)?;
        Ok(())
    }
    fn drop_all_caps(&mut self) -> Result<(), SetupError> {
        Ok(capabilities::drop_all()?)
    }
    fn chdir(&mut self, dir: &Path) -> Result<(), SetupError> {
        nix::unistd::chdir(dir).map_err(|e| Error::Chdir(dir.to_path_buf(), e))?;
        Ok(())
    }
    fn resolve_program(&mut self, argv0: &str, path: Option<&str>) -> Result<CString, SetupError> {
        Ok(env::resolve(argv0, path)?)
    }
    fn install_seccomp(&mut self, program: &BpfProgram) -> Result<(), SetupError> {
        Ok(seccomp::install(program)?)
    }
    fn execve(&mut self, file: &CStr, argv: &[CString], env: &[CString]) -> Result<(), SetupError> {
        let e = nix::unistd::execve(file, argv, env).unwrap_err();
        Err(Error::Exec(file.to_owned(), e).into())
    }
}
