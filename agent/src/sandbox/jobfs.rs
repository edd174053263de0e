//! A job's files on the host side: one size-capped tmpfs per job, mounted by the agent at
//! `<job dir>/fs` in the host's mount namespace and laid out for the job (`tmp`, `var/tmp`,
//! `run`, `home`, `home/job`, `home/job/work`); the shim binds its directories over `/tmp`,
//! `/var/tmp`, `/run` and `/home` in the job's root.
//!
//! Why on the host and not in the job's own mount namespace: when the last mount of a tmpfs
//! goes, the kernel frees its inodes one by one, and for a mount of the job's namespace it
//! does so in the job's last exiting process, before its cgroup reads `populated 0` — a
//! wipe would wait for every file the job left. Here the agent keeps a handle open on the
//! tmpfs root for the job's lifetime: the wipe detaches the mount (cheap, the handle still
//! holds the filesystem) and hands the handle to a background [`Reclaimer`], whose drop of
//! it is where the kernel frees the files. From the detach on, nothing reaches them: no
//! path leads there and no process of the job is left.
//!
//! The runtime directory the job directories live in is made a mount point of its own,
//! shared in a peer group of its own ([`prepare_runtime_dir`], the way iproute2 treats
//! `/run/netns`): a job's tmpfs then appears in mount namespaces that are slaves of the
//! host's (a runner started in one still finds it for the shim), and its detach reaches
//! them too, so no copy there keeps the tmpfs alive after the wipe. The job's own namespace
//! is private; the shim detaches every copy of airlock's mounts from it.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use airlock_shim::BindMount;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use prometheus_client::metrics::gauge::Gauge;

/// The job's tmpfs, inside its job directory.
pub const FS_DIR: &str = "fs";

/// One directory of the job's tmpfs.
#[derive(Debug, Clone, Copy)]
struct Dir {
    path: &'static str,
    mode: u32,
    /// Owned by the job's user (otherwise by root).
    job_owned: bool,
}

const fn dir(path: &'static str, mode: u32, job_owned: bool) -> Dir {
    Dir {
        path,
        mode,
        job_owned,
    }
}

/// The layout, parents first: `/run` and `/home` belong to the job, `home/job` is its
/// `$HOME`, `home/job/work` its workspace; `/tmp` and `/var/tmp` are world-writable with the
/// sticky bit; the tmpfs root (0755) and `var` are root's.
const LAYOUT: [Dir; 7] = [
    dir("tmp", 0o1777, false),
    dir("var", 0o755, false),
    dir("var/tmp", 0o1777, false),
    dir("run", 0o755, true),
    dir("home", 0o755, true),
    dir("home/job", 0o700, true),
    dir("home/job/work", 0o700, true),
];

/// Which directory of the tmpfs the job sees where: the shim binds each over its target.
pub const BINDS: [(&str, &str); 4] = [
    ("tmp", "/tmp"),
    ("var/tmp", "/var/tmp"),
    ("run", "/run"),
    ("home", "/home"),
];

const MOUNTINFO: &str = "/proc/self/mountinfo";

#[derive(Debug, thiserror::Error)]
pub enum JobFsError {
    #[error("cannot make {0} a shared mount point of its own for the jobs' filesystems: {1}; airlockd must run as root (CAP_SYS_ADMIN)")]
    RuntimeDir(PathBuf, nix::Error),
    #[error("cannot mount the job's tmpfs at {0}: {1}")]
    Mount(PathBuf, nix::Error),
    #[error("cannot lay out the job's tmpfs at {0}: {1}")]
    Layout(PathBuf, std::io::Error),
    #[error("cannot read the mount table {MOUNTINFO}: {0}")]
    MountTable(std::io::Error),
    #[error("cannot detach {0}: {1}")]
    Detach(PathBuf, nix::Error),
}

/// Makes `dir` (which must exist, canonical) a mount point, shared in a peer group of its
/// own, unless it is one already. `true` when it is a bind of `dir` onto itself — made
/// here, or by an agent before a crash — which [`release_runtime_dir`] takes away again at
/// shutdown; `false` for a mount of the operator's (made shared, left in place).
pub fn prepare_runtime_dir(dir: &Path) -> Result<bool, JobFsError> {
    let err = |e| JobFsError::RuntimeDir(dir.to_path_buf(), e);
    let propagation =
        |flags: MsFlags| nix::mount::mount(None::<&str>, dir, None::<&str>, flags, None::<&str>);
    match propagation(MsFlags::MS_SHARED) {
        Ok(()) => Ok(bound_onto_itself(dir)),
        // Not a mount point yet. Bound onto itself it would join the peer group of the mount
        // it lies in (and every job mount would propagate back under it): private first,
        // then shared, gives it a group of its own.
        Err(Errno::EINVAL) => {
            nix::mount::mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(err)?;
            propagation(MsFlags::MS_PRIVATE)
                .and_then(|()| propagation(MsFlags::MS_SHARED))
                .map_err(err)?;
            Ok(true)
        }
        Err(e) => Err(err(e)),
    }
}

/// Whether the mount at `dir` shows the very directory it covers: the same device and
/// inode through the mount (`stat`) as underneath it (the parent's directory entry).
pub(crate) fn bound_onto_itself(dir: &Path) -> bool {
    use std::os::unix::fs::{DirEntryExt, MetadataExt};
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return false;
    };
    let (Ok(top), Ok(up)) = (std::fs::metadata(dir), std::fs::metadata(parent)) else {
        return false;
    };
    let under = std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| e.file_name() == name)
        .map(|e| e.ino());
    top.dev() == up.dev() && under == Some(top.ino())
}

/// At agent shutdown: takes away the bind [`prepare_runtime_dir`] made, when nothing is
/// mounted under it any more.
pub fn release_runtime_dir(dir: &Path) {
    match mounts_under(dir) {
        Ok(m) if m.iter().all(|p| p == dir) => {
            if let Err(e) = nix::mount::umount2(dir, MntFlags::MNT_DETACH) {
                tracing::debug!(dir = %dir.display(), "runtime directory not unmounted: {e}");
            }
        }
        Ok(m) => {
            tracing::debug!(dir = %dir.display(), mounts = %m.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "), "runtime directory stays mounted: jobs' filesystems are still in it")
        }
        Err(e) => tracing::debug!(dir = %dir.display(), "runtime directory not unmounted: {e}"),
    }
}

/// A job's mounted tmpfs and the handle on its root that keeps it alive until its reclaim.
#[derive(Debug)]
pub struct JobFs {
    path: PathBuf,
    root: File,
}

impl JobFs {
    /// Mounts the job's tmpfs at `<job_dir>/fs` (`size` bytes for the job as a whole,
    /// nosuid, nodev) and lays it out, the job's directories owned by `uid`/`gid`.
    /// `job_dir` must be root-only: the directories are made by path. On failure nothing
    /// stays mounted.
    pub fn create(
        job: &str,
        job_dir: &Path,
        size: u64,
        uid: u32,
        gid: u32,
    ) -> Result<JobFs, JobFsError> {
        let path = job_dir.join(FS_DIR);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| JobFsError::Layout(path.clone(), e))?;
        nix::mount::mount(
            Some(format!("airlock-{job}").as_str()),
            &path,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("size={size},mode=0755").as_str()),
        )
        .map_err(|e| JobFsError::Mount(path.clone(), e))?;
        let made = File::open(&path).and_then(|root| {
            for d in LAYOUT {
                let p = path.join(d.path);
                std::fs::DirBuilder::new().mode(0o700).create(&p)?;
                // Explicitly, whatever the umask: the sticky bit and 0755 included.
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(d.mode))?;
                if d.job_owned {
                    std::os::unix::fs::lchown(&p, Some(uid), Some(gid))?;
                }
            }
            Ok(root)
        });
        match made {
            Ok(root) => Ok(JobFs { path, root }),
            Err(e) => {
                // Empty but for a few directories: the detach frees it at once.
                let _ = nix::mount::umount2(&path, MntFlags::MNT_DETACH);
                Err(JobFsError::Layout(path, e))
            }
        }
    }

    /// Where it is mounted on the host.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shim's binds of it, as [`BINDS`] says.
    pub fn binds(&self) -> Vec<BindMount> {
        binds(&self.path)
    }

    /// The handle that keeps the tmpfs alive: give it to [`Reclaimer::reclaim`] after the
    /// wipe detached the mount.
    pub fn into_hold(self) -> File {
        self.root
    }
}

/// The shim's binds of a job tmpfs mounted at `fs`.
pub fn binds(fs: &Path) -> Vec<BindMount> {
    BINDS
        .iter()
        .map(|(sub, target)| BindMount {
            source: fs.join(sub),
            target: target.into(),
        })
        .collect()
}

/// A handle on the tmpfs mounted at `fs`, when one is (after an agent restart, before a
/// wipe: the reclaim then stays off the wipe's path, as for a job of this agent).
pub fn hold(fs: &Path) -> Option<File> {
    match mounts_under(fs) {
        Ok(m) if m.iter().any(|p| p == fs) => File::open(fs).ok(),
        _ => None,
    }
}

/// Mount points at or under `dir` in the agent's (the host's) mount namespace, shallowest
/// first. `dir` must be canonical, as the mount table is.
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>, JobFsError> {
    let text = std::fs::read_to_string(MOUNTINFO).map_err(JobFsError::MountTable)?;
    Ok(airlock_shim::rootfs::mounts_under(&text, dir))
}

/// Detaches every mount at or under `dir` and returns what is still mounted there
/// afterwards (empty: nothing). A mount whose files are held by a [`JobFs`] handle goes
/// at once; one that is not is freed in this call.
pub fn detach_all_under(dir: &Path) -> Result<Vec<PathBuf>, JobFsError> {
    let found = mounts_under(dir)?;
    if found.is_empty() {
        return Ok(found);
    }
    for m in found {
        match nix::mount::umount2(&m, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            // It went with a mount above it.
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(JobFsError::Detach(m, e)),
        }
    }
    mounts_under(dir)
}

/// A wiped job's tmpfs, waiting for its last handle to be dropped.
#[derive(Debug)]
struct Reclaim {
    job: String,
    hold: File,
}

#[derive(Debug, Default)]
struct Pending {
    count: Mutex<usize>,
    idle: Condvar,
    gauge: OnceLock<Gauge>,
}

impl Pending {
    fn add(&self, n: isize) {
        let mut count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        *count = count.saturating_add_signed(n);
        if let Some(g) = self.gauge.get() {
            g.set(*count as i64);
        }
        if *count == 0 {
            self.idle.notify_all();
        }
    }
}

/// Drops wiped jobs' tmpfs handles on a thread of its own (`airlock-reclaim`), one after
/// the other: the kernel frees a tmpfs's files when its last reference goes, which costs
/// about 4 µs per file, and none of that is on a wipe's path. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Reclaimer {
    /// `None` when the thread could not start: handles are then dropped where they are
    /// handed over.
    tx: Option<mpsc::Sender<Reclaim>>,
    pending: Arc<Pending>,
}

impl Default for Reclaimer {
    fn default() -> Self {
        Self::new()
    }
}

impl Reclaimer {
    pub fn new() -> Reclaimer {
        let pending = Arc::new(Pending::default());
        let (tx, rx) = mpsc::channel::<Reclaim>();
        let theirs = pending.clone();
        let spawned = std::thread::Builder::new()
            .name("airlock-reclaim".into())
            .spawn(move || {
                for r in rx {
                    let started = Instant::now();
                    drop(r.hold);
                    tracing::debug!(
                        job = %r.job,
                        ms = started.elapsed().as_millis() as u64,
                        "the wiped job's filesystem is reclaimed"
                    );
                    theirs.add(-1);
                }
            });
        let tx = match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(
                    "no reclaim thread ({e}): wiped jobs' files are freed inside the wipe"
                );
                None
            }
        };
        Reclaimer { tx, pending }
    }

    /// Frees the job's tmpfs in the background. Call only after its mounts are detached
    /// and nothing of the job runs: the handle is then the last thing that holds it.
    pub fn reclaim(&self, job: &str, hold: File) {
        self.pending.add(1);
        let r = Reclaim {
            job: job.to_string(),
            hold,
        };
        if let Some(tx) = &self.tx {
            if let Err(mpsc::SendError(r)) = tx.send(r) {
                drop(r.hold);
                self.pending.add(-1);
            }
        } else {
            drop(r);
            self.pending.add(-1);
        }
    }

    /// Reclaims handed over and not finished yet.
    pub fn pending(&self) -> usize {
        *self.pending.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (blocking) until no reclaim is pending or `timeout` passed; `true`: none is.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let count = self.pending.count.lock().unwrap_or_else(|p| p.into_inner());
        let (count, _) = self
            .pending
            .idle
            .wait_timeout_while(count, timeout, |c| *c > 0)
            .unwrap_or_else(|p| p.into_inner());
        *count == 0
    }

    /// Keeps `gauge` at the number of pending reclaims (one gauge, the first given).
    pub fn count_in(&self, gauge: Gauge) {
        gauge.set(self.pending() as i64);
        let _ = self.pending.gauge.set(gauge);
    }
}

/// Held tmpfs handles of live jobs, by job id.
#[derive(Debug, Default)]
pub struct Holds(Mutex<HashMap<String, File>>);

impl Holds {
    pub fn insert(&self, job: &str, hold: File) {
        self.lock().insert(job.to_string(), hold);
    }

    pub fn take(&self, job: &str) -> Option<File> {
        self.lock().remove(job)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, File>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_parents_first_and_binds_only_what_it_lays_out() {
        for (i, d) in LAYOUT.iter().enumerate() {
            if let Some((parent, _)) = d.path.rsplit_once('/') {
                assert!(
                    LAYOUT[..i].iter().any(|p| p.path == parent),
                    "{} before its parent",
                    d.path
                );
            }
        }
        for (sub, target) in BINDS {
            assert!(LAYOUT.iter().any(|d| d.path == sub), "{sub}");
            assert!(target.starts_with('/'));
        }
        let b = binds(Path::new("/run/airlock/jobs/j-1/fs"));
        assert_eq!(b[0].source, Path::new("/run/airlock/jobs/j-1/fs/tmp"));
        assert_eq!(b[0].target, Path::new("/tmp"));
        // What belongs to the job; the rest (and the tmpfs root) is root's.
        let owned: Vec<&str> = LAYOUT
            .iter()
            .filter(|d| d.job_owned)
            .map(|d| d.path)
            .collect();
        assert_eq!(owned, ["run", "home", "home/job", "home/job/work"]);
        // The job's paths in job.rs lie in what is bound.
        for p in [
            crate::sandbox::job::JOB_HOME,
            crate::sandbox::job::JOB_WORKSPACE,
        ] {
            assert!(
                BINDS.iter().any(|(_, t)| Path::new(p).starts_with(t)),
                "{p}"
            );
        }
    }

    #[test]
    fn a_reclaimer_counts_what_is_pending_and_drains() {
        let r = Reclaimer::new();
        let gauge = Gauge::default();
        r.count_in(gauge.clone());
        assert!(r.wait_idle(Duration::from_millis(1)));
        // Stale on purpose: each reclaim's start and end set it again.
        gauge.set(99);
        for i in 0..3 {
            r.reclaim(&format!("j-{i}"), File::open("/").unwrap());
        }
        assert!(r.wait_idle(Duration::from_secs(10)));
        assert_eq!(r.pending(), 0);
        assert_eq!(gauge.get(), 0);
    }
}
