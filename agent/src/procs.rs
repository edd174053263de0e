//! Reading other processes from `/proc`: who a process is (pid and start time, which
//! together name it across pid reuse), its parent, its name, its user and groups. Used to
//! tie a job to the process it belongs to (its owner) and to check that a control-socket
//! caller descends from that owner, and by the hooks to find their runner's process.
//!
//! Reads only; never signals or changes anything. The `/proc` root is a parameter so tests
//! can point it at a tree of their own.

use std::path::{Path, PathBuf};

/// Where the host's processes are.
pub const PROC: &str = "/proc";
/// Ancestor chains longer than this are cut (a loop in a damaged or fake tree, or a very
/// deep one: neither is a runner's).
const MAX_DEPTH: usize = 64;

/// One process as `/proc/<pid>/stat` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    /// `comm`: the executable's (or script's) base name, at most 15 bytes.
    pub comm: String,
    pub ppid: i32,
    /// Start time in clock ticks since boot: with the pid, it names this process and no
    /// later one that reuses the pid.
    pub start_ticks: u64,
}

/// A process named across pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcId {
    pub pid: i32,
    pub start_ticks: u64,
}

/// Parses `/proc/<pid>/stat`. `comm` may hold spaces and parentheses, so the fields after
/// it are found from the last `)`.
pub fn parse_stat(pid: i32, text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 2..)?.split(' ').collect();
    // rest[0] is the state (field 3), rest[1] the ppid (4), rest[19] the start time (22).
    Some(ProcStat {
        pid,
        comm,
        ppid: rest.get(1)?.parse().ok()?,
        start_ticks: rest.get(19)?.trim().parse().ok()?,
    })
}

/// A view of a `/proc` tree.
#[derive(Debug, Clone)]
pub struct Procs {
    root: PathBuf,
}

impl Default for Procs {
    fn default() -> Self {
        Procs::at(PROC)
    }
}

impl Procs {
    pub fn at(root: impl Into<PathBuf>) -> Procs {
        Procs { root: root.into() }
    }

    fn file(&self, pid: i32, name: &str) -> PathBuf {
        self.root.join(pid.to_string()).join(name)
    }

    /// The process `pid` now, or `None` when there is none.
    pub fn stat(&self, pid: i32) -> Option<ProcStat> {
        if pid <= 0 {
            return None;
        }
        parse_stat(pid, &std::fs::read_to_string(self.file(pid, "stat")).ok()?)
    }

    /// Whether `id` still names a running process (same pid, same start time).
    pub fn alive(&self, id: ProcId) -> bool {
        self.stat(id.pid)
            .is_some_and(|s| s.start_ticks == id.start_ticks)
    }

    /// `pid` itself first, then its parent, its parent's parent, … up to (not including)
    /// pid 1 and the kernel's threads (pid 0 and 2 as parents).
    pub fn lineage(&self, pid: i32) -> Vec<ProcStat> {
        let mut out: Vec<ProcStat> = Vec::new();
        let mut next = pid;
        while next > 1 && out.len() < MAX_DEPTH {
            let Some(s) = self.stat(next) else { break };
            if out.iter().any(|o| o.pid == s.pid) {
                break;
            }
            next = s.ppid;
            out.push(s);
        }
        out
    }

    /// Whether `owner` is `pid` itself or one of its ancestors (pid 1 never is).
    pub fn descends_from(&self, pid: i32, owner: ProcId) -> bool {
        self.lineage(pid)
            .iter()
            .any(|s| s.pid == owner.pid && s.start_ticks == owner.start_ticks)
    }

    /// The nearest of `pid` and its ancestors whose `comm` is `name` (a runner's per-job
    /// process: `Runner.Worker`, `buildkite-agent`).
    pub fn nearest_named(&self, pid: i32, name: &str) -> Option<ProcStat> {
        // `comm` is cut to 15 bytes.
        let want: String = name.chars().take(15).collect();
        self.lineage(pid).into_iter().find(|s| s.comm == want)
    }

    /// Real uid and every group (primary and supplementary) of `pid`, from
    /// `/proc/<pid>/status`.
    pub fn credentials(&self, pid: i32) -> Option<Credentials> {
        let text = std::fs::read_to_string(self.file(pid, "status")).ok()?;
        parse_status(&text)
    }
}

/// A process's user and groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (what `usermod -aG` adds).
    pub groups: Vec<u32>,
}

impl Credentials {
    /// Whether the process is in `gid`, as its primary or a supplementary group.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// The `Uid:`, `Gid:` and `Groups:` lines of `/proc/<pid>/status` (real ids: the first
/// column).
pub fn parse_status(text: &str) -> Option<Credentials> {
    let line = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    let first = |v: &str| v.split_whitespace().next()?.parse::<u32>().ok();
    let uid = first(line("Uid:")?)?;
    let gid = first(line("Gid:")?)?;
    let groups = line("Groups:")
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect();
    Some(Credentials { uid, gid, groups })
}

/// This process.
pub fn own_stat() -> Option<ProcStat> {
    Procs::default().stat(std::process::id() as i32)
}

impl From<&ProcStat> for ProcId {
    fn from(s: &ProcStat) -> ProcId {
        ProcId {
            pid: s.pid,
            start_ticks: s.start_ticks,
        }
    }
}

/// For tests of code that takes a `/proc` root: a fake tree with processes of the given
/// (pid, comm, ppid, start) and status text.
pub fn fake_tree(dir: &Path, procs: &[(i32, &str, i32, u64)], status: &str) {
    for (pid, comm, ppid, start) in procs {
        let d = dir.join(pid.to_string());
        std::fs::create_dir_all(&d).expect("fake /proc directory");
        // Fields 3.. as the kernel writes them; field 22 is the start time.
        let mut fields = vec!["S".to_string(), ppid.to_string()];
        fields.extend((5..22).map(|_| "0".to_string()));
        fields.push(start.to_string());
        fields.extend((23..=52).map(|_| "0".to_string()));
        std::fs::write(
            d.join("stat"),
            format!("{pid} ({comm}) {}\n", fields.join(" ")),
        )
        .expect("fake stat");
        std::fs::write(d.join("status"), status).expect("fake status");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_survives_odd_command_names() {
        let s = parse_stat(
            42,
            "42 (a) b (c) S 7 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 123456 0 0",
        )
        .unwrap();
        assert_eq!(s.comm, "a) b (c");
        assert_eq!(s.ppid, 7);
        assert_eq!(s.start_ticks, 123456);
        assert!(parse_stat(1, "garbage").is_none());
    }

    #[test]
    fn lineage_ancestry_and_names_follow_the_tree_and_its_start_times() {
        let dir = tempfile::tempdir().unwrap();
        fake_tree(
            dir.path(),
            &[
                (10, "buildkite-agent", 1, 100),
                (20, "buildkite-agent", 10, 200),
                (30, "bash", 20, 300),
                (40, "airlock", 30, 400),
                (50, "bash", 10, 500),
            ],
            "Uid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t27 998 \n",
        );
        let p = Procs::at(dir.path());
        let chain: Vec<i32> = p.lineage(40).iter().map(|s| s.pid).collect();
        assert_eq!(chain, [40, 30, 20, 10]);
        let owner = ProcId {
            pid: 20,
            start_ticks: 200,
        };
        assert!(p.descends_from(40, owner));
        assert!(p.descends_from(20, owner));
        // A sibling branch, and the same pid with another start time (reused), are not.
        assert!(!p.descends_from(50, owner));
        assert!(!p.descends_from(
            40,
            ProcId {
                pid: 20,
                start_ticks: 201
            }
        ));
        assert_eq!(p.nearest_named(40, "buildkite-agent").unwrap().pid, 20);
        assert!(p.nearest_named(50, "Runner.Worker").is_none());
        let c = p.credentials(40).unwrap();
        assert_eq!((c.uid, c.gid), (1000, 1000));
        assert!(c.in_group(998) && c.in_group(1000) && !c.in_group(5));
        assert!(p.alive(owner));
        assert!(!p.alive(ProcId {
            pid: 99,
            start_ticks: 1
        }));
    }

    #[test]
    fn a_loop_in_the_tree_ends_the_walk() {
        let dir = tempfile::tempdir().unwrap();
        fake_tree(dir.path(), &[(5, "a", 6, 1), (6, "b", 5, 2)], "");
        assert_eq!(Procs::at(dir.path()).lineage(5).len(), 2);
    }

    #[test]
    fn the_real_proc_knows_this_process() {
        let me = own_stat().unwrap();
        assert_eq!(me.pid, std::process::id() as i32);
        let p = Procs::default();
        assert!(p.descends_from(me.pid, ProcId::from(&me)));
        let c = p.credentials(me.pid).unwrap();
        assert_eq!(c.uid, nix::unistd::getuid().as_raw());
    }
}
