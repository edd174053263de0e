//! The job's user: supplementary groups cleared, then gid, then uid (in that order: once
//! the uid is not 0 the process may no longer change its groups). Verified afterwards.

use nix::unistd::{Gid, Uid};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("setgroups([]) failed: {0}")]
    Setgroups(#[source] nix::Error),
    #[error("setresgid({0}) failed: {1}")]
    Setresgid(u32, #[source] nix::Error),
    #[error("setresuid({0}) failed: {1}")]
    Setresuid(u32, #[source] nix::Error),
    #[error("after the switch the process is uid {ruid}/{euid}/{suid} gid {rgid}/{egid}/{sgid} with {groups} supplementary groups, not {uid}:{gid} with none")]
    Verify {
        uid: u32,
        gid: u32,
        ruid: u32,
        euid: u32,
        suid: u32,
        rgid: u32,
        egid: u32,
        sgid: u32,
        groups: usize,
    },
    #[error("cannot read the process's ids to verify the switch: {0}")]
    Read(#[source] nix::Error),
}

pub fn clear_groups() -> Result<(), Error> {
    nix::unistd::setgroups(&[]).map_err(Error::Setgroups)
}

pub fn set_gid(gid: u32) -> Result<(), Error> {
    let g = Gid::from_raw(gid);
    nix::unistd::setresgid(g, g, g).map_err(|e| Error::Setresgid(gid, e))
}

/// Sets all three uids, then checks that real, effective and saved ids and the groups are
/// exactly the job's, so there is no way back to root.
pub fn set_uid(uid: u32, gid: u32) -> Result<(), Error> {
    let u = Uid::from_raw(uid);
    nix::unistd::setresuid(u, u, u).map_err(|e| Error::Setresuid(uid, e))?;
    let r = nix::unistd::getresuid().map_err(Error::Read)?;
    let g = nix::unistd::getresgid().map_err(Error::Read)?;
    let groups = nix::unistd::getgroups().map_err(Error::Read)?.len();
    let ids = [r.real, r.effective, r.saved].map(Uid::as_raw);
    let gids = [g.real, g.effective, g.saved].map(Gid::as_raw);
    if ids != [uid; 3] || gids != [gid; 3] || groups != 0 {
        return Err(Error::Verify {
            uid,
            gid,
            ruid: ids[0],
            euid: ids[1],
            suid: ids[2],
            rgid: gids[0],
            egid: gids[1],
            sgid: gids[2],
            groups,
        });
    }
    Ok(())
}
