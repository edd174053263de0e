//! Job users: which uid and gid a job's processes run as.
//!
//! Either one configured user for every job, or one uid/gid per slot from a range
//! (`first_uid + slot`), so that concurrent jobs and the next job on another slot share no
//! owner. Never root (uid or gid 0), never the runner's own uid or gid: a job that ran as
//! the runner could rewrite the runner's files and credentials. The ids need not exist in
//! `/etc/passwd` or `/etc/group` (nothing here edits them): the kernel only needs numbers,
//! and the agent sets `HOME` (and `USER`) itself. This module does no privileged work; the
//! shim switches to the uid/gid it is given.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("job users: slots must be at least 1")]
    NoSlots,
    #[error("job users: {what} range {first}..={last} does not fit in 32 bits (the last id, 4294967295, means \"no id\" to the kernel); lower first_{what}")]
    Overflow {
        what: &'static str,
        first: u32,
        last: u64,
    },
    #[error("job users: {what} range {first}..={last} contains 0 (root); jobs must never run as root — pick ids such as 2000000 and up")]
    Root {
        what: &'static str,
        first: u32,
        last: u32,
    },
    #[error("job users: {what} range {first}..={last} contains the runner's own {what} {runner}; jobs must never run as the runner — pick ids the runner does not use")]
    Runner {
        what: &'static str,
        first: u32,
        last: u32,
        runner: u32,
    },
    #[error("job users: {what} range {first}..={last} overlaps {owner} in {file}; a job would own that account's files — pick unused ids")]
    HostOverlap {
        what: &'static str,
        first: u32,
        last: u32,
        owner: String,
        file: PathBuf,
    },
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, #[source] io::Error),
    #[error("all {0} job slots are in use; the job must wait or be refused")]
    Exhausted(u32),
    #[error("job slot {slot} does not exist (slots are 0..{slots})")]
    NoSuchSlot { slot: u32, slots: u32 },
    #[error("job slot {0} is already in use")]
    InUse(u32),
    #[error("job slot {0} is not in use")]
    NotInUse(u32),
}

/// `[sandbox.users]` in the agent's config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum JobUsersConfig {
    /// Every job runs as this uid/gid (weaker: concurrent jobs share an owner, and with it
    /// per-user limits such as RLIMIT_NPROC and any host file that user may write).
    Single { uid: u32, gid: u32, slots: u32 },
    /// Slot `n` runs as `first_uid + n`, group `first_gid + n`.
    Range {
        first_uid: u32,
        first_gid: u32,
        slots: u32,
    },
}

impl Default for JobUsersConfig {
    fn default() -> Self {
        JobUsersConfig::Range {
            first_uid: 2_000_000,
            first_gid: 2_000_000,
            slots: 16,
        }
    }
}

/// The runner's own ids, which no job may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerIds {
    pub uid: u32,
    pub gid: u32,
}

/// The user one job runs as, on one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobUser {
    pub slot: u32,
    pub uid: u32,
    pub gid: u32,
}

impl JobUsersConfig {
    fn slots(&self) -> u32 {
        match self {
            JobUsersConfig::Single { slots, .. } | JobUsersConfig::Range { slots, .. } => *slots,
        }
    }

    /// The uids and gids jobs may get (one of each in single mode).
    fn ranges(&self) -> Result<(RangeInclusive<u32>, RangeInclusive<u32>), UsersError> {
        let (first_uid, first_gid, count) = match *self {
            JobUsersConfig::Single { uid, gid, .. } => (uid, gid, 1),
            JobUsersConfig::Range {
                first_uid,
                first_gid,
                slots,
            } => (first_uid, first_gid, slots),
        };
        let span = |what, first: u32| {
            let last = u64::from(first) + u64::from(count) - 1;
            match u32::try_from(last) {
                Ok(l) if l < u32::MAX => Ok(first..=l),
                _ => Err(UsersError::Overflow { what, first, last }),
            }
        };
        Ok((span("uid", first_uid)?, span("gid", first_gid)?))
    }

    /// Checks the config against root and the runner's ids.
    pub fn validate(&self, runner: RunnerIds) -> Result<(), UsersError> {
        if self.slots() == 0 {
            return Err(UsersError::NoSlots);
        }
        let (uids, gids) = self.ranges()?;
        for (what, range, runner_id) in [("uid", &uids, runner.uid), ("gid", &gids, runner.gid)] {
            let (first, last) = (*range.start(), *range.end());
            if range.contains(&0) {
                return Err(UsersError::Root { what, first, last });
            }
            if range.contains(&runner_id) {
                return Err(UsersError::Runner {
                    what,
                    first,
                    last,
                    runner: runner_id,
                });
            }
        }
        Ok(())
    }

    /// Checks that a range of ids belongs to nobody on this host: no account in
    /// `<etc>/passwd` or group in `<etc>/group` (range mode only: a single configured user
    /// is expected to exist), and no subordinate range in `<etc>/subuid` or `<etc>/subgid`
    /// (another user's containers map onto those ids). Missing files are fine.
    pub fn check_host(&self, etc: &Path) -> Result<(), UsersError> {
        let (uids, gids) = self.ranges()?;
        let range_mode = matches!(self, JobUsersConfig::Range { .. });
        for (what, range, ids_file, sub_file) in [
            ("uid", &uids, "passwd", "subuid"),
            ("gid", &gids, "group", "subgid"),
        ] {
            let (first, last) = (*range.start(), *range.end());
            let overlap = |owner: String, file: &str| UsersError::HostOverlap {
                what,
                first,
                last,
                owner,
                file: etc.join(file),
            };
            if range_mode {
                for (name, id) in read_id_file(&etc.join(ids_file))? {
                    if range.contains(&id) {
                        return Err(overlap(format!("{name} ({what} {id})"), ids_file));
                    }
                }
            }
            for (name, start, count) in read_sub_file(&etc.join(sub_file))? {
                let end = start + count.saturating_sub(1);
                if count > 0 && start <= u64::from(last) && u64::from(first) <= end {
                    return Err(overlap(format!("{name}'s range {start}..={end}"), sub_file));
                }
            }
        }
        Ok(())
    }
}

/// `name:x:id:...` lines of passwd or group.
fn read_id_file(path: &Path) -> Result<Vec<(String, u32)>, UsersError> {
    Ok(read_optional(path)?
        .lines()
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            let id = f.nth(1)?.parse().ok()?;
            Some((name.to_string(), id))
        })
        .collect())
}

/// `name:start:count` lines of subuid or subgid.
fn read_sub_file(path: &Path) -> Result<Vec<(String, u64, u64)>, UsersError> {
    Ok(read_optional(path)?
        .lines()
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            let start = f.next()?.trim().parse().ok()?;
            let count = f.next()?.trim().parse().ok()?;
            Some((name.to_string(), start, count))
        })
        .collect())
}

fn read_optional(path: &Path) -> Result<String, UsersError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(UsersError::Read(path.to_path_buf(), e)),
    }
}

/// Hands out job slots and their users. A slot whose wipe could not be verified is simply
/// not released until an operator clears it, so it takes no new job.
#[derive(Debug)]
pub struct UserPool {
    config: JobUsersConfig,
    in_use: Mutex<BTreeSet<u32>>,
}

impl UserPool {
    pub fn new(config: JobUsersConfig, runner: RunnerIds) -> Result<UserPool, UsersError> {
        config.validate(runner)?;
        Ok(UserPool {
            config,
            in_use: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn slots(&self) -> u32 {
        self.config.slots()
    }

    /// The user of a slot (whether or not it is in use).
    pub fn user(&self, slot: u32) -> Result<JobUser, UsersError> {
        if slot >= self.slots() {
            return Err(UsersError::NoSuchSlot {
                slot,
                slots: self.slots(),
            });
        }
        Ok(match self.config {
            JobUsersConfig::Single { uid, gid, .. } => JobUser { slot, uid, gid },
            // validate() proved first + slots - 1 fits.
            JobUsersConfig::Range {
                first_uid,
                first_gid,
                ..
            } => JobUser {
                slot,
                uid: first_uid + slot,
                gid: first_gid + slot,
            },
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<u32>> {
        self.in_use.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the lowest free slot.
    pub fn acquire(&self) -> Result<JobUser, UsersError> {
        let mut in_use = self.lock();
        let slot = (0..self.slots())
            .find(|s| !in_use.contains(s))
            .ok_or(UsersError::Exhausted(self.slots()))?;
        let user = self.user(slot)?;
        in_use.insert(slot);
        Ok(user)
    }

    /// Takes a given slot: a job recovered after a restart keeps the slot on its record.
    pub fn reserve(&self, slot: u32) -> Result<JobUser, UsersError> {
        let user = self.user(slot)?;
        if !self.lock().insert(slot) {
            return Err(UsersError::InUse(slot));
        }
        Ok(user)
    }

    /// Gives a slot back once its job's wipe has been verified.
    pub fn release(&self, slot: u32) -> Result<(), UsersError> {
        if !self.lock().remove(&slot) {
            return Err(UsersError::NotInUse(slot));
        }
        Ok(())
    }

    pub fn in_use(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNNER: RunnerIds = RunnerIds {
        uid: 1001,
        gid: 1001,
    };

    fn range(first: u32, slots: u32) -> JobUsersConfig {
        JobUsersConfig::Range {
            first_uid: first,
            first_gid: first,
            slots,
        }
    }

    #[test]
    fn slots_map_to_their_own_ids_and_come_back() {
        let pool = UserPool::new(range(2_000_000, 3), RUNNER).unwrap();
        let a = pool.acquire().unwrap();
        let b = pool.acquire().unwrap();
        assert_eq!((a.slot, a.uid, a.gid), (0, 2_000_000, 2_000_000));
        assert_eq!((b.slot, b.uid, b.gid), (1, 2_000_001, 2_000_001));
        let c = pool.acquire().unwrap();
        assert_eq!(c.uid, 2_000_002);
        let e = pool.acquire().unwrap_err();
        assert!(matches!(e, UsersError::Exhausted(3)), "{e}");
        pool.release(b.slot).unwrap();
        assert_eq!(
            pool.acquire().unwrap(),
            b,
            "the freed slot is handed out again"
        );
        assert!(matches!(pool.release(7), Err(UsersError::NotInUse(7))));
        pool.release(a.slot).unwrap();
        assert!(matches!(pool.release(a.slot), Err(UsersError::NotInUse(0))));
        assert_eq!(pool.in_use(), 2);
    }

    #[test]
    fn recovered_jobs_keep_their_slot() {
        let pool = UserPool::new(range(2_000_000, 4), RUNNER).unwrap();
        assert_eq!(pool.reserve(2).unwrap().uid, 2_000_002);
        assert!(matches!(pool.reserve(2), Err(UsersError::InUse(2))));
        assert!(matches!(
            pool.reserve(4),
            Err(UsersError::NoSuchSlot { .. })
        ));
        let got: Vec<_> = (0..3).map(|_| pool.acquire().unwrap().slot).collect();
        assert_eq!(got, [0, 1, 3]);
    }

    #[test]
    fn a_single_user_serves_every_slot() {
        let cfg = JobUsersConfig::Single {
            uid: 60_000,
            gid: 60_001,
            slots: 2,
        };
        let pool = UserPool::new(cfg, RUNNER).unwrap();
        let (a, b) = (pool.acquire().unwrap(), pool.acquire().unwrap());
        assert_eq!(
            (a.uid, a.gid, b.uid, b.gid),
            (60_000, 60_001, 60_000, 60_001)
        );
        assert_ne!(a.slot, b.slot);
        assert!(pool.acquire().is_err());
    }

    #[test]
    fn root_and_the_runner_are_refused() {
        let cases = [
            (range(0, 4), "contains 0 (root)"),
            (
                JobUsersConfig::Range {
                    first_uid: 2_000_000,
                    first_gid: 0,
                    slots: 1,
                },
                "gid range 0..=0 contains 0",
            ),
            (range(1000, 4), "contains the runner's own uid 1001"),
            (
                JobUsersConfig::Single {
                    uid: 0,
                    gid: 5000,
                    slots: 1,
                },
                "uid range 0..=0 contains 0",
            ),
            (
                JobUsersConfig::Single {
                    uid: 1001,
                    gid: 5000,
                    slots: 1,
                },
                "runner's own uid 1001",
            ),
            (
                JobUsersConfig::Single {
                    uid: 5000,
                    gid: 1001,
                    slots: 1,
                },
                "runner's own gid 1001",
            ),
            (range(2_000_000, 0), "at least 1"),
            (range(u32::MAX - 2, 3), "does not fit in 32 bits"),
        ];
        for (cfg, want) in cases {
            let e = UserPool::new(cfg.clone(), RUNNER).unwrap_err().to_string();
            assert!(e.contains(want), "{cfg:?}: {e}");
        }
        // The top of the range may touch u32::MAX - 1, never u32::MAX ((uid_t)-1).
        assert!(UserPool::new(range(u32::MAX - 3, 3), RUNNER).is_ok());
        // A root runner (uid 0) is covered by the root check.
        let e = UserPool::new(range(2_000_000, 4), RunnerIds { uid: 0, gid: 0 });
        assert!(
            e.is_ok(),
            "a range away from 0 is fine whoever the runner is"
        );
    }

    #[test]
    fn config_parses_both_modes_and_refuses_unknown_fields() {
        let r: JobUsersConfig =
            toml::from_str("mode = \"range\"\nfirst_uid = 2000000\nfirst_gid = 2000000\nslots = 8")
                .unwrap();
        assert_eq!(r, range(2_000_000, 8));
        let s: JobUsersConfig =
            toml::from_str("mode = \"single\"\nuid = 60000\ngid = 60000\nslots = 4").unwrap();
        assert!(matches!(s, JobUsersConfig::Single { uid: 60000, .. }));
        let e = toml::from_str::<JobUsersConfig>(
            "mode = \"single\"\nuid = 1\ngid = 1\nslots = 1\nuser = \"x\"",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field"), "{e}");
        assert_eq!(JobUsersConfig::default(), range(2_000_000, 16));
    }

    #[test]
    fn ids_that_belong_to_host_accounts_or_subordinate_ranges_are_refused() {
        let etc = tempfile::tempdir().unwrap();
        // No files at all: nothing to overlap.
        range(2_000_000, 16).check_host(etc.path()).unwrap();
        fs::write(
            etc.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/bash\nci:x:2000005:2000005::/home/ci:/bin/sh\n",
        )
        .unwrap();
        fs::write(etc.path().join("subuid"), "ci:100000:65536\n").unwrap();
        let e = range(2_000_000, 16)
            .check_host(etc.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ci (uid 2000005)") && e.contains("passwd"),
            "{e}"
        );
        range(2_000_006, 16).check_host(etc.path()).unwrap();
        let e = range(150_000, 4)
            .check_host(etc.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ci's range 100000..=165535") && e.contains("subuid"),
            "{e}"
        );
        // A single configured user is expected to be in passwd, but not in a subuid range.
        let single = |uid| JobUsersConfig::Single {
            uid,
            gid: 3_000_000,
            slots: 1,
        };
        single(2_000_005).check_host(etc.path()).unwrap();
        assert!(single(165_535).check_host(etc.path()).is_err());
        fs::write(etc.path().join("subgid"), "ci:3000000:10\n").unwrap();
        let e = single(2_000_005)
            .check_host(etc.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("gid range") && e.contains("subgid"), "{e}");
    }
}
