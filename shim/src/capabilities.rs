//! Capabilities: every set emptied — bounding, ambient, inheritable, effective, permitted —
//! and verified empty. The bounding set is dropped while the shim is still root (dropping
//! from it needs CAP_SETPCAP, which the uid change takes away); the rest after the uid
//! change and `PR_SET_NO_NEW_PRIVS`, as the last step before seccomp.

use caps::CapSet;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot clear the {0:?} capability set: {1}")]
    Clear(CapSet, #[source] caps::errors::CapsError),
    #[error("cannot read the {0:?} capability set to verify it: {1}")]
    Read(CapSet, #[source] caps::errors::CapsError),
    #[error("the {set:?} capability set still holds {caps} after clearing it")]
    NotEmpty { set: CapSet, caps: String },
    #[error("cannot read /proc/self/status to verify the capability sets: {0}")]
    Status(#[source] std::io::Error),
    #[error("/proc/self/status shows {field} {value} after every capability was dropped (a capability this build does not know?)")]
    StatusNotEmpty { field: String, value: String },
}

const ALL: [CapSet; 5] = [
    CapSet::Bounding,
    CapSet::Ambient,
    CapSet::Inheritable,
    CapSet::Effective,
    CapSet::Permitted,
];

/// Empties the bounding set, so no later `execve` (of a file with capabilities, or a setuid
/// root binary) can give any capability back.
pub fn drop_bounding() -> Result<(), Error> {
    clear_and_verify(CapSet::Bounding)?;
    verify_status(&read_status()?, &["CapBnd"])
}

/// Empties every set and verifies all five are empty, both through capget/prctl and in
/// `/proc/self/status` (which also shows capabilities newer than this build knows).
pub fn drop_all() -> Result<(), Error> {
    for set in ALL {
        clear_and_verify(set)?;
    }
    verify_status(
        &read_status()?,
        &["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"],
    )
}

fn read_status() -> Result<String, Error> {
    std::fs::read_to_string("/proc/self/status").map_err(Error::Status)
}

/// Fails unless every named field of a `/proc/PID/status` text is present and all zero.
pub fn verify_status(status: &str, fields: &[&str]) -> Result<(), Error> {
    for field in fields {
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .map(str::trim);
        match value {
            Some(v) if !v.is_empty() && v.bytes().all(|b| b == b'0') => {}
            other => {
                return Err(Error::StatusNotEmpty {
                    field: field.to_string(),
                    value: other.unwrap_or("(missing)").to_string(),
                })
            }
        }
    }
    Ok(())
}

fn clear_and_verify(set: CapSet) -> Result<(), Error> {
    caps::clear(None, set).map_err(|e| Error::Clear(set, e))?;
    let left = caps::read(None, set).map_err(|e| Error::Read(set, e))?;
    if left.is_empty() {
        Ok(())
    } else {
        let mut names: Vec<String> = left.iter().map(|c| c.to_string()).collect();
        names.sort();
        Err(Error::NotEmpty {
            set,
            caps: names.join(","),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_verification_needs_every_field_present_and_zero() {
        let good = "Name:\tx\nCapInh:\t0000000000000000\nCapBnd:\t0000000000000000\n";
        verify_status(good, &["CapInh", "CapBnd"]).unwrap();
        let err = verify_status(good, &["CapAmb"]).unwrap_err().to_string();
        assert!(err.contains("CapAmb") && err.contains("missing"), "{err}");
        let bad = "CapBnd:\t0000010000000000\n";
        let err = verify_status(bad, &["CapBnd"]).unwrap_err().to_string();
        assert!(err.contains("0000010000000000"), "{err}");
    }
}
