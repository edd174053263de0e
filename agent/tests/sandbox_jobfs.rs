//! Privileged tests of the job's tmpfs on the host: the runtime directory's mount point, the
//! tmpfs's layout and size cap, the cheap detach while the agent's handle holds it, and the
//! background reclaim. They need root and never skip. Every mount they make lies in a
//! temporary directory of their own and is detached by a Drop guard, also on failure.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock::sandbox::jobfs::{self, JobFs, Reclaimer, BINDS, FS_DIR};

const UID: u32 = 2_000_123;
const GID: u32 = 2_000_124;
const MIB: u64 = 1 << 20;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the job filesystem tests need root (they mount tmpfs): run them as root"
    );
}

/// A temporary directory (canonical, as the agent's runtime directory is) whose mounts are
/// all detached before it is removed.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Scratch {
        require_root();
        Scratch(
            tempfile::Builder::new()
                .prefix("al-jobfs-")
                .tempdir_in("/var/tmp")
                .expect("a temp dir in /var/tmp"),
        )
    }

    fn path(&self) -> PathBuf {
        fs::canonicalize(self.0.path()).unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for _ in 0..8 {
            match jobfs::detach_all_under(&self.path()) {
                Ok(left) if left.is_empty() => return,
                _ => {}
            }
        }
    }
}

/// The mountinfo lines whose mount point is `dir`.
fn mount_lines(dir: &Path) -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap()))
        .map(str::to_string)
        .collect()
}

/// The `shared:N` peer group of a mountinfo line, if the mount is shared.
fn peer_group(line: &str) -> Option<String> {
    line.split(' ')
        .skip(6)
        .take_while(|f| *f != "-")
        .find_map(|f| f.strip_prefix("shared:"))
        .map(str::to_string)
}

#[test]
fn the_runtime_dir_becomes_a_shared_mount_point_of_its_own_and_is_released() {
    let s = Scratch::new();
    let dir = s.path().join("jobs");
    fs::create_dir(&dir).unwrap();
    assert!(
        jobfs::prepare_runtime_dir(&dir).unwrap(),
        "bound onto itself"
    );
    let lines = mount_lines(&dir);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let group = peer_group(&lines[0]).unwrap_or_else(|| panic!("not shared: {lines:?}"));
    // A group of its own: no other mount of the host is its peer.
    let peers: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| peer_group(l).as_deref() == Some(group.as_str()))
        .map(str::to_string)
        .collect();
    assert_eq!(peers, lines);
    // Found again after a crash: neither bound twice nor taken for the operator's.
    assert!(jobfs::prepare_runtime_dir(&dir).unwrap());
    assert_eq!(mount_lines(&dir), lines);
    // Not released while a job's tmpfs is in it; released once nothing is.
    let job = dir.join("j-0000000000000001");
    fs::create_dir(&job).unwrap();
    let jfs = JobFs::create("j-0000000000000001", &job, MIB, UID, GID).unwrap();
    jobfs::release_runtime_dir(&dir);
    assert_eq!(mount_lines(&dir).len(), 1);
    assert_eq!(
        jobfs::detach_all_under(&job).unwrap(),
        Vec::<PathBuf>::new()
    );
    drop(jfs);
    jobfs::release_runtime_dir(&dir);
    assert!(mount_lines(&dir).is_empty());

    // A mount of the operator's there is made shared and never released.
    let tmpfs = s.path().join("own");
    fs::create_dir(&tmpfs).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &tmpfs,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1M"),
    )
    .unwrap();
    assert!(!jobfs::prepare_runtime_dir(&tmpfs).unwrap());
    let lines = mount_lines(&tmpfs);
    assert!(peer_group(&lines[0]).is_some(), "{lines:?}");
}

#[test]
fn a_job_fs_is_laid_out_for_the_job_and_capped_as_a_whole() {
    let s = Scratch::new();
    let job = s.path().join("j-0000000000000002");
    fs::create_dir(&job).unwrap();
    let jfs = JobFs::create("j-0000000000000002", &job, 4 * MIB, UID, GID).unwrap();
    let root = job.join(FS_DIR);
    assert_eq!(jfs.path(), root);
    let line = &mount_lines(&root)[0];
    assert!(
        line.contains(" - tmpfs airlock-j-0000000000000002 "),
        "{line}"
    );
    let opts: Vec<&str> = line.split(' ').nth(5).unwrap().split(',').collect();
    assert!(
        opts.contains(&"nosuid") && opts.contains(&"nodev"),
        "{line}"
    );
    for (dir, mode, uid, gid) in [
        ("", 0o755, 0, 0),
        ("tmp", 0o1777, 0, 0),
        ("var", 0o755, 0, 0),
        ("var/tmp", 0o1777, 0, 0),
        ("run", 0o755, UID, GID),
        ("home", 0o755, UID, GID),
        ("home/job", 0o700, UID, GID),
        ("home/job/work", 0o700, UID, GID),
    ] {
        let m = fs::metadata(root.join(dir)).unwrap();
        assert!(m.is_dir(), "{dir}");
        assert_eq!(m.permissions().mode() & 0o7777, mode, "mode of {dir:?}");
        assert_eq!((m.uid(), m.gid()), (uid, gid), "owner of {dir:?}");
    }
    let binds = jfs.binds();
    assert_eq!(binds.len(), BINDS.len());
    for b in &binds {
        assert!(b.source.starts_with(&root) && b.source.is_dir(), "{b:?}");
    }
    // One cap for everything the job writes, wherever it writes it (root too is bound by
    // a tmpfs's size).
    let chunk = vec![0u8; 3 * MIB as usize];
    fs::write(root.join("tmp/a"), &chunk).unwrap();
    let err = fs::write(root.join("home/job/work/b"), &chunk).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(nix::errno::Errno::ENOSPC as i32),
        "{err}"
    );
    let err = fs::write(root.join("var/tmp/c"), &chunk).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(nix::errno::Errno::ENOSPC as i32),
        "{err}"
    );
}

#[test]
fn the_detach_leaves_the_files_to_the_held_handle_and_the_reclaim_frees_them() {
    let s = Scratch::new();
    let job = s.path().join("j-0000000000000003");
    fs::create_dir(&job).unwrap();
    let jfs = JobFs::create("j-0000000000000003", &job, 16 * MIB, UID, GID).unwrap();
    let root = job.join(FS_DIR);
    for i in 0..200 {
        fs::write(root.join(format!("tmp/f{i}")), b"x").unwrap();
    }
    // After a restart the agent finds the mounted tmpfs again and holds it.
    let found = jobfs::hold(&root).expect("a mounted job tmpfs is found");
    assert!(jobfs::hold(&s.path()).is_none(), "not a mount point");
    let hold = jfs.into_hold();
    assert_eq!(
        jobfs::detach_all_under(&job).unwrap(),
        Vec::<PathBuf>::new()
    );
    assert!(jobfs::mounts_under(&job).unwrap().is_empty());
    // No path leads there any more; the handle still reaches every file.
    assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
    let st = nix::sys::statfs::fstatfs(&hold).unwrap();
    assert_eq!(st.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC);
    let files = st.files() - st.files_free();
    assert!(files > 200, "{files} inodes in use");
    fs::remove_dir(&root).unwrap();
    let r = Reclaimer::new();
    r.reclaim("j-0000000000000003", hold);
    r.reclaim("j-0000000000000003", found);
    assert!(r.wait_idle(Duration::from_secs(10)));
    assert_eq!(r.pending(), 0);
}
