//! The job's root filesystem, assembled in the job's own mount namespace at `root_dir`:
//! the host's `/` bound read-only (recursively, nosuid, nodev), a fresh `/proc` for its pid
//! namespace, a fresh read-only `/sys` (with its own cgroup2 view), a minimal `/dev`, the
//! job's writable directories bound from its tmpfs on the host, hidden paths covered, then
//! `pivot_root` and the old root detached. Never writes to the host's filesystem: every
//! mount is made after all mounts were made private, and mount points are created only
//! inside the job's own tmpfs.
//!
//! Whatever a bind or a cover goes over is detached first, not only covered: the recursive
//! bind of the host's `/` copies every mount the host has, among them other jobs' tmpfs and
//! network namespaces, and a copy left under a cover would hold those alive for as long as
//! this job runs.

use crate::{BindMount, SpecFile};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

/// Device nodes bound from the host's `/dev`; everything else of `/dev` is hidden.
pub const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
/// Size of the job's `/dev/shm` (Docker's default).
pub const SHM_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mounting {what} at {target:?} failed: {source}")]
    Mount {
        what: &'static str,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("making {0:?} read-only, nosuid and nodev recursively (mount_setattr) failed: {1}; the kernel must be 5.12 or newer")]
    SetAttr(PathBuf, #[source] std::io::Error),
    #[error("cannot prepare {0:?} in the job's root: {1}")]
    Prepare(PathBuf, #[source] std::io::Error),
    #[error("mount point {0:?} does not exist: it must exist on the host or lie under another of the job's directories")]
    MountPoint(PathBuf, #[source] std::io::Error),
    #[error("the job's directory {0:?} must be a directory on a tmpfs (the job's own, made by the agent): a job never writes the host's disk")]
    NotTmpfs(PathBuf),
    #[error("cannot read the mount table {0:?}: {1}")]
    MountTable(PathBuf, #[source] std::io::Error),
    #[error("cannot detach {0:?} from the job's root: {1}")]
    Detach(PathBuf, #[source] nix::Error),
    #[error("{0:?} is still mounted in the job's root after detaching everything under {1:?}")]
    StillMounted(PathBuf, PathBuf),
    #[error("cannot write the job's file {0:?}: {1}")]
    WriteFile(PathBuf, #[source] std::io::Error),
    #[error("cannot resolve {0:?} on the host: {1}")]
    Resolve(PathBuf, #[source] std::io::Error),
    #[error("pivot_root into {0:?} failed at {1}: {2}")]
    Pivot(PathBuf, &'static str, #[source] nix::Error),
    #[error("cannot open {0:?} for pivot_root: {1}")]
    Open(PathBuf, #[source] std::io::Error),
}

fn mnt(
    what: &'static str,
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Error> {
    mount(source, target, fstype, flags, data).map_err(|source| Error::Mount {
        what,
        target: target.to_path_buf(),
        source,
    })
}

/// Every mount of the new mount namespace becomes private: nothing the shim mounts
/// propagates back to the host, and nothing the host mounts later appears in the job.
pub fn make_private() -> Result<(), Error> {
    mnt(
        "private propagation",
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )
}

/// Binds the host's `/` (with every submount) at `root_dir`, then makes the whole tree
/// read-only, nosuid and nodev in one atomic call.
pub fn bind_host_root(root_dir: &Path) -> Result<(), Error> {
    mnt(
        "the host's / (rbind)",
        Some(Path::new("/")),
        root_dir,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    set_attr_recursive(root_dir)
}

/// `struct mount_attr` of `<linux/mount.h>`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// mount_setattr(AT_FDCWD, path, AT_RECURSIVE, RDONLY|NOSUID|NODEV): unlike a remount per
/// submount, this covers every submount at once and cannot miss one.
#[allow(unsafe_code)]
fn set_attr_recursive(path: &Path) -> Result<(), Error> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        Error::SetAttr(
            path.to_path_buf(),
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        )
    })?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `c` is a valid NUL-terminated path and `attr` a properly laid out, initialised
    // `struct mount_attr` whose size is passed; both outlive the call, and the kernel only
    // reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(Error::SetAttr(
            path.to_path_buf(),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Where a host path lies in the job's root: its canonical host path (symlinks resolved on
/// the host, where they point) under `root_dir`. The part of `path` that does not exist on
/// the host is appended as is.
pub fn inside(root_dir: &Path, path: &Path) -> Result<PathBuf, Error> {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    let canonical = loop {
        match std::fs::canonicalize(&existing) {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match (existing.file_name(), existing.parent()) {
                    (Some(name), Some(parent)) => {
                        rest.push(name.to_os_string());
                        existing = parent.to_path_buf();
                    }
                    _ => return Err(Error::Resolve(path.to_path_buf(), e)),
                }
            }
            Err(e) => return Err(Error::Resolve(path.to_path_buf(), e)),
        }
    };
    let mut out = root_dir.join(canonical.strip_prefix("/").unwrap_or(&canonical));
    for name in rest.into_iter().rev() {
        out.push(name);
    }
    Ok(out)
}

/// Fresh `/proc` (for the job's pid namespace: it shows only the job's processes) and a
/// fresh read-only `/sys` with a read-only cgroup2 view rooted at the job's cgroup.
pub fn mount_proc_sys(root_dir: &Path) -> Result<(), Error> {
    let safe = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let proc_ = root_dir.join("proc");
    mnt(
        "proc",
        Some(Path::new("proc")),
        &proc_,
        Some("proc"),
        safe,
        None,
    )?;
    let sys = root_dir.join("sys");
    mnt(
        "sysfs",
        Some(Path::new("sysfs")),
        &sys,
        Some("sysfs"),
        safe | MsFlags::MS_RDONLY,
        None,
    )?;
    mnt(
        "cgroup2",
        Some(Path::new("cgroup2")),
        &sys.join("fs/cgroup"),
        Some("cgroup2"),
        safe | MsFlags::MS_RDONLY,
        None,
    )
}

/// Kernel interfaces in the job's fresh `/proc` and `/sys` that it must not read: runc's
/// default masked paths (`libcontainer/specconv/example.go`, `MaskedPaths`, the list Docker
/// and containerd ship too) — physical memory (`kcore`), kernel keys, timers and scheduler
/// internals that leak other processes' activity, firmware tables and power-capping
/// counters (RAPL, a known side channel) — and the DMI ids, which on EC2 hold the instance
/// id (`board_asset_tag`) and elsewhere the machine's serial numbers and UUID
/// (`product_uuid`, `product_serial`, `board_serial`, `chassis_asset_tag`). A directory goes
/// under an empty read-only tmpfs, a file under `/dev/null`.
pub const MASKED_PATHS: [&str; 13] = [
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
];

/// Kernel interfaces the job may read but never write: runc's default read-only paths
/// (`ReadonlyPaths` of the same file). Each is bound onto itself read-only, so even a
/// process that somehow regained privileges could not change a sysctl or trigger SysRq.
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// `path` (absolute, inside the job's `/proc` or `/sys`) in the job's root, as it is there:
/// no symlink on the host is resolved.
fn kernel_path(root_dir: &Path, path: &Path) -> PathBuf {
    root_dir.join(path.strip_prefix("/").unwrap_or(path))
}

/// Masks one of [`MASKED_PATHS`] in the job's root. `false` when the kernel has no such
/// file (not every machine has ACPI, sound, DMI or RAPL).
pub fn mask_kernel_path(root_dir: &Path, path: &Path) -> Result<bool, Error> {
    let target = kernel_path(root_dir, path);
    let meta = match std::fs::symlink_metadata(&target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::Resolve(path.to_path_buf(), e)),
    };
    cover(&target, meta.is_dir(), Cover::Masked)?;
    Ok(true)
}

/// Makes one of [`READONLY_PATHS`] read-only in the job's root (bound onto itself, then
/// remounted read-only, as runc does). `false` when the kernel has no such file.
pub fn read_only_kernel_path(root_dir: &Path, path: &Path) -> Result<bool, Error> {
    let target = kernel_path(root_dir, path);
    match std::fs::symlink_metadata(&target) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::Resolve(path.to_path_buf(), e)),
    }
    mnt(
        "a read-only kernel path (bind)",
        Some(&target),
        &target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    mnt(
        "a read-only kernel path (read-only)",
        None,
        &target,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None,
    )?;
    Ok(true)
}

/// A minimal `/dev`: a small tmpfs with the harmless device nodes bound from the host, a
/// private devpts instance, a `/dev/shm` tmpfs and the usual symlinks.
pub fn build_dev(root_dir: &Path) -> Result<(), Error> {
    let dev = root_dir.join("dev");
    mnt(
        "the /dev tmpfs",
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=65536"),
    )?;
    let prep = |p: &Path, r: std::io::Result<()>| r.map_err(|e| Error::Prepare(p.to_path_buf(), e));
    for name in DEVICES {
        let node = dev.join(name);
        prep(&node, std::fs::File::create(&node).map(drop))?;
        mnt(
            "a device node",
            Some(&Path::new("/dev").join(name)),
            &node,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    let pts = dev.join("pts");
    prep(&pts, std::fs::create_dir(&pts))?;
    mnt(
        "devpts",
        Some(Path::new("devpts")),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    let shm = dev.join("shm");
    prep(&shm, std::fs::create_dir(&shm))?;
    mnt(
        "/dev/shm",
        Some(Path::new("tmpfs")),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(&format!("mode=1777,size={SHM_BYTES}")),
    )?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let l = dev.join(link);
        prep(&l, symlink(to, &l))?;
    }
    Ok(())
}

/// Where this namespace's mount table is read (mount points relative to our root, which is
/// still the host's `/` copy until `pivot_root`).
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Mount points at or under `dir` in a mountinfo text, shallowest first. A point with
/// mounts stacked on it is listed once per mount.
pub fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_octal)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| p.components().count());
    found
}

/// A mountinfo path with its `\ooo` escapes (space, tab, newline, backslash) undone.
fn unescape_octal(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let byte = match b.get(i..i + 4) {
            Some([b'\\', d @ ..]) if d.iter().all(|c| (b'0'..=b'7').contains(c)) => {
                u8::try_from(d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'))).ok()
            }
            _ => None,
        };
        match byte {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Detaches (`MNT_DETACH`, which takes submounts along) every mount at or under `target`
/// in the job's root, then checks that none is left. The namespace is the job's own and
/// private, so nothing of this reaches the host.
pub fn detach_under(target: &Path) -> Result<(), Error> {
    let read = || {
        std::fs::read_to_string(MOUNTINFO)
            .map_err(|e| Error::MountTable(PathBuf::from(MOUNTINFO), e))
    };
    let found = mounts_under(&read()?, target);
    if found.is_empty() {
        return Ok(());
    }
    for m in found {
        match umount2(&m, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            // EINVAL, ENOENT: it went with a mount above it.
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(Error::Detach(m, e)),
        }
    }
    match mounts_under(&read()?, target).into_iter().next() {
        Some(left) => Err(Error::StillMounted(left, target.to_path_buf())),
        None => Ok(()),
    }
}

/// One of the job's writable directories: a directory of the job's tmpfs on the host, bound
/// over its target in the job's root (nosuid, nodev, writable) after whatever the root had
/// mounted there is detached.
pub fn bind_job_dir(root_dir: &Path, b: &BindMount) -> Result<(), Error> {
    let meta = std::fs::metadata(&b.source).map_err(|e| Error::Resolve(b.source.clone(), e))?;
    let fs = nix::sys::statfs::statfs(&b.source)
        .map_err(|e| Error::Resolve(b.source.clone(), e.into()))?;
    if !meta.is_dir() || fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        return Err(Error::NotTmpfs(b.source.clone()));
    }
    let target = inside(root_dir, &b.target)?;
    if !target.is_dir() {
        // Only possible under an earlier directory of the job; on the read-only host tree
        // this fails (EROFS), which is what we want: the shim never writes the host's disk.
        std::fs::create_dir_all(&target).map_err(|e| Error::MountPoint(b.target.clone(), e))?;
    }
    detach_under(&target)?;
    mnt(
        "a job directory (bind)",
        Some(&b.source),
        &target,
        None,
        MsFlags::MS_BIND,
        None,
    )?;
    mnt(
        "a job directory (nosuid, nodev)",
        None,
        &target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )
}

/// One of the job's files, written into its tmpfs (the spec check keeps it under a bind
/// target) and owned by the job's user. Created with its final mode, never readable by
/// others first, and renamed over whatever the path held: a job whose sandbox is entered
/// again (`airlock job exec`) finds its file rewritten, and a reader sees the old file or
/// the new one, never a half-written one.
///
/// The job's directories may hold what the job left in an earlier exec, and the shim runs
/// as root with the host's tree still at `/`: no symlink below `root_dir` is followed
/// (see [`open_dir_beneath`]), so a link the job planted cannot point a write at the host.
pub fn write_file(root_dir: &Path, f: &SpecFile, uid: u32, gid: u32) -> Result<(), Error> {
    let target = inside(root_dir, &f.path)?;
    let err = |e| Error::WriteFile(f.path.clone(), e);
    let (dir, name) = open_parent_beneath(root_dir, &target).map_err(err)?;
    replace_file(&dir, &name, f.contents.as_bytes(), f.mode, Some((uid, gid))).map_err(err)?;
    Ok(())
}

/// `target`'s parent directory, opened beneath `root_dir` without following a symlink
/// (missing directories are made, root's, 0755), and `target`'s file name.
fn open_parent_beneath(
    root_dir: &Path,
    target: &Path,
) -> std::io::Result<(std::os::fd::OwnedFd, std::ffi::OsString)> {
    let invalid = || std::io::Error::from(std::io::ErrorKind::InvalidInput);
    let rel = target.strip_prefix(root_dir).map_err(|_| invalid())?;
    let name = rel.file_name().ok_or_else(invalid)?.to_os_string();
    let parent = rel.parent().unwrap_or(Path::new(""));
    Ok((open_dir_beneath(root_dir, parent)?, name))
}

/// Opens the directory `rel` (normal components only) under `base` one component at a time,
/// each with `O_NOFOLLOW | O_DIRECTORY`, making missing ones (root's, 0755): a symlink
/// anywhere on the way fails (`ELOOP`/`ENOTDIR`) instead of leading elsewhere.
fn open_dir_beneath(base: &Path, rel: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    use std::os::fd::AsRawFd;
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    let mut dir = openat_owned(None, base, flags, Mode::empty())?;
    for c in rel.components() {
        let std::path::Component::Normal(name) = c else {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        };
        match nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), name, Mode::from_bits_truncate(0o755))
        {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        dir = openat_owned(Some(dir.as_raw_fd()), Path::new(name), flags, Mode::empty())?;
    }
    Ok(dir)
}

/// `openat(2)` with the descriptor owned.
#[allow(unsafe_code)]
fn openat_owned(
    dir: Option<std::os::fd::RawFd>,
    path: &Path,
    flags: nix::fcntl::OFlag,
    mode: nix::sys::stat::Mode,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let fd = nix::fcntl::openat(dir, path, flags, mode)?;
    // SAFETY: openat just returned this descriptor; nothing else owns or closes it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Writes `contents` to a new file in `dir` (`O_EXCL | O_NOFOLLOW`, with `mode`, then
/// `owner`), and renames it over `name`.
fn replace_file(
    dir: &std::os::fd::OwnedFd,
    name: &std::ffi::OsStr,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let mut tmp = std::ffi::OsString::from(".airlock-new-");
    tmp.push(name);
    let tmp = PathBuf::from(tmp);
    match nix::unistd::unlinkat(
        Some(dir.as_raw_fd()),
        &tmp,
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    ) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    let fd = openat_owned(
        Some(dir.as_raw_fd()),
        &tmp,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode & 0o777),
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(contents)?;
    if let Some((uid, gid)) = owner {
        nix::unistd::fchown(
            file.as_raw_fd(),
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )?;
    }
    // The umask may have narrowed the mode at creation.
    nix::sys::stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode & 0o777))?;
    drop(file);
    nix::fcntl::renameat(
        Some(dir.as_raw_fd()),
        &tmp,
        Some(dir.as_raw_fd()),
        Path::new(name),
    )?;
    Ok(())
}

/// Gives the job its own `/etc/resolv.conf` (see `SandboxSpec::resolv_conf`). `job_dirs`
/// are the job's writable directories (the bind targets). The file is root's, mode 0644:
/// the job reads it and cannot change it.
pub fn set_resolv_conf(root_dir: &Path, contents: &str, job_dirs: &[PathBuf]) -> Result<(), Error> {
    let etc_conf = Path::new("/etc/resolv.conf");
    let err = |e| Error::WriteFile(etc_conf.to_path_buf(), e);
    let in_root = inside(root_dir, etc_conf)?;
    // In the job's directories, which may hold what the job left in an earlier exec:
    // nothing below the root is followed (see `write_file`).
    let write = |path: &Path| -> Result<std::os::fd::OwnedFd, Error> {
        let (dir, name) = open_parent_beneath(root_dir, path).map_err(err)?;
        replace_file(&dir, &name, contents.as_bytes(), 0o644, None).map_err(err)?;
        openat_owned(
            Some(std::os::fd::AsRawFd::as_raw_fd(&dir)),
            Path::new(&name),
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(err)
    };
    match std::fs::symlink_metadata(&in_root) {
        Ok(m) if m.file_type().is_symlink() => {
            // Resolved by hand against the job's root: the host's target may not exist.
            let link = std::fs::read_link(&in_root).map_err(err)?;
            let target = if link.is_absolute() {
                link
            } else {
                Path::new("/etc").join(link)
            };
            let target = normalize(&target);
            if job_dirs.iter().any(|d| target.starts_with(d)) {
                return write(&inside(root_dir, &target)?).map(drop);
            }
            // A link elsewhere on the read-only host: bind over what it points to.
            bind_file(root_dir, &inside(root_dir, &target)?, write)
        }
        Ok(_) => bind_file(root_dir, &in_root, write),
        Err(e) => Err(err(e)),
    }
}

/// Writes `contents` to `/run/airlock/resolv.conf` in the job's root and binds it read-only
/// over `target` (a file that exists in the job's root).
fn bind_file(
    root_dir: &Path,
    target: &Path,
    write: impl Fn(&Path) -> Result<std::os::fd::OwnedFd, Error>,
) -> Result<(), Error> {
    let source = inside(root_dir, Path::new("/run/airlock/resolv.conf"))?;
    // Bound from the handle of the file just written, not from its path, which the job
    // could have changed since.
    let written = write(&source)?;
    let source = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&written)
    ));
    mnt(
        "the job's resolv.conf",
        Some(&source),
        target,
        None,
        MsFlags::MS_BIND,
        None,
    )?;
    mnt(
        "the job's resolv.conf (read-only)",
        None,
        target,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None,
    )
}

/// `..` and `.` removed lexically (the path is absolute).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// Hides a host path from the job: whatever is mounted at or under it in the job's root is
/// detached, then a directory goes under an empty read-only tmpfs, anything else (file,
/// socket, device) under a read-only `/dev/null`. Returns `false` when there is nothing to
/// hide (absent on the host, or not visible in the job's root).
pub fn hide(root_dir: &Path, path: &Path) -> Result<bool, Error> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::Resolve(path.to_path_buf(), e)),
        Ok(_) => {}
    }
    let target = inside(root_dir, path)?;
    match std::fs::symlink_metadata(&target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::Resolve(target, e)),
        Ok(_) => {}
    }
    detach_under(&target)?;
    let meta = match std::fs::metadata(&target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::Resolve(target, e)),
    };
    cover(&target, meta.is_dir(), Cover::Hidden)?;
    Ok(true)
}

/// Why a path is covered: hidden host paths and masked kernel paths get the same covers,
/// with their own names in errors (and kernel directories a mode without write bits).
#[derive(Debug, Clone, Copy)]
enum Cover {
    Hidden,
    Masked,
}

/// Covers `target`: a directory with an empty read-only tmpfs, anything else (file,
/// socket, device) with a read-only `/dev/null`.
fn cover(target: &Path, is_dir: bool, why: Cover) -> Result<(), Error> {
    let (dir, file, file_ro, mode) = match why {
        Cover::Hidden => (
            "an empty tmpfs over a hidden directory",
            "/dev/null over a hidden file",
            "/dev/null over a hidden file (read-only)",
            "size=4096,mode=0755",
        ),
        Cover::Masked => (
            "an empty tmpfs over a masked kernel directory",
            "/dev/null over a masked kernel file",
            "/dev/null over a masked kernel file (read-only)",
            "size=4096,mode=0555",
        ),
    };
    if is_dir {
        return mnt(
            dir,
            Some(Path::new("tmpfs")),
            target,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
            Some(mode),
        );
    }
    mnt(
        file,
        Some(Path::new("/dev/null")),
        target,
        None,
        MsFlags::MS_BIND,
        None,
    )?;
    mnt(
        file_ro,
        None,
        target,
        None,
        // Not nodev: the cover is /dev/null itself, which must stay openable.
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NOEXEC,
        None,
    )
}

/// `pivot_root(".", ".")` in `root_dir` and lazy unmount of the old root stacked on top (the
/// way runc does it: no put_old directory is needed in a read-only root). Afterwards no
/// path leads to the host's filesystem.
pub fn pivot(root_dir: &Path) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let open = |p: &Path| std::fs::File::open(p).map_err(|e| Error::Open(p.to_path_buf(), e));
    let old = open(Path::new("/"))?;
    let new = open(root_dir)?;
    let err = |at: &'static str| move |e| Error::Pivot(root_dir.to_path_buf(), at, e);
    nix::unistd::fchdir(new.as_raw_fd()).map_err(err("fchdir(new root)"))?;
    nix::unistd::pivot_root(".", ".").map_err(err("pivot_root"))?;
    nix::unistd::fchdir(old.as_raw_fd()).map_err(err("fchdir(old root)"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(err("umount2(old root, MNT_DETACH)"))?;
    nix::unistd::chdir("/").map_err(err("chdir(/)"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_resolves_symlinks_on_the_host_and_keeps_missing_parts() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        symlink(&real, dir.path().join("link")).unwrap();
        let root = Path::new("/jobroot");
        let canon = std::fs::canonicalize(&real).unwrap();
        let want = root.join(canon.strip_prefix("/").unwrap());
        assert_eq!(inside(root, &dir.path().join("link")).unwrap(), want);
        assert_eq!(
            inside(root, &dir.path().join("link/a/b")).unwrap(),
            want.join("a/b")
        );
        assert_eq!(inside(root, Path::new("/")).unwrap(), root);
    }

    #[test]
    fn mounts_under_a_dir_come_shallowest_first_unescaped_and_stacked() {
        let info = "27 1 254:0 / / rw - ext4 /dev/vda rw\n\
                    60 27 0:40 / /r/tmp/j/fs rw,nosuid - tmpfs airlock-j rw\n\
                    61 27 0:41 / /r/tmp rw - tmpfs tmpfs rw\n\
                    62 61 0:42 / /r/tmp rw - tmpfs tmpfs rw\n\
                    63 27 0:4 net:[4026532] /r/tmp/netns/airlock-j rw - nsfs nsfs rw\n\
                    64 27 0:43 / /r/tmp\\040x/y rw - tmpfs tmpfs rw\n\
                    65 27 0:44 / /r/tmpx rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mounts_under(info, Path::new("/r/tmp")),
            ["/r/tmp", "/r/tmp", "/r/tmp/j/fs", "/r/tmp/netns/airlock-j"].map(PathBuf::from)
        );
        assert_eq!(
            mounts_under(info, Path::new("/r/tmp x")),
            [PathBuf::from("/r/tmp x/y")]
        );
        assert!(mounts_under(info, Path::new("/r/run")).is_empty());
        assert_eq!(
            unescape_octal("a\\134b\\777c\\01"),
            PathBuf::from("a\\b\\777c\\01")
        );
    }

    #[test]
    fn a_job_file_replaces_what_was_there_and_never_follows_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let f = SpecFile {
            path: "/al-rootfs-test/sub/token".into(),
            contents: "first".into(),
            mode: 0o400,
        };
        write_file(root.path(), &f, uid, gid).unwrap();
        let written = root.path().join("al-rootfs-test/sub/token");
        assert_eq!(std::fs::read_to_string(&written).unwrap(), "first");
        // Written again (a later exec): replaced, with its mode.
        let again = SpecFile {
            contents: "second".into(),
            ..f.clone()
        };
        write_file(root.path(), &again, uid, gid).unwrap();
        assert_eq!(std::fs::read_to_string(&written).unwrap(), "second");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&written).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o400);
        // A directory on the way replaced by a symlink: refused, nothing written there.
        std::fs::remove_dir_all(root.path().join("al-rootfs-test/sub")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("al-rootfs-test/sub")).unwrap();
        assert!(write_file(root.path(), &again, uid, gid).is_err());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // The file itself a symlink: the link is replaced, its target untouched.
        std::fs::remove_file(root.path().join("al-rootfs-test/sub")).unwrap();
        std::fs::create_dir(root.path().join("al-rootfs-test/sub")).unwrap();
        let target = outside.path().join("victim");
        std::fs::write(&target, "host").unwrap();
        std::os::unix::fs::symlink(&target, &written).unwrap();
        write_file(root.path(), &again, uid, gid).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "host");
        assert!(!std::fs::symlink_metadata(&written)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn hide_skips_what_the_host_does_not_have() {
        let root = tempfile::tempdir().unwrap();
        assert!(!hide(root.path(), Path::new("/nonexistent/al-hide")).unwrap());
        // Present on the host but not in this (empty) root: nothing to cover.
        assert!(!hide(root.path(), Path::new("/etc")).unwrap());
    }
}
