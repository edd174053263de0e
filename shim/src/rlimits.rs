//! Resource limits of the job's processes, set while the shim is still root (so they may
//! exceed the host's soft limits) and inherited across `execve`.

use crate::Rlimits;
use nix::sys::resource::Resource;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("setrlimit({resource:?}, {value}) failed: {source}")]
    Set {
        resource: Resource,
        value: u64,
        #[source]
        source: nix::Error,
    },
}

/// The limits to set, soft = hard. Core dumps are off unless the spec asks for them: a
/// dump of a job's memory holds its credentials and may land on the host.
pub fn plan(r: &Rlimits) -> Vec<(Resource, u64)> {
    let mut out = vec![(Resource::RLIMIT_CORE, r.core.unwrap_or(0))];
    if let Some(n) = r.nofile {
        out.push((Resource::RLIMIT_NOFILE, n));
    }
    if let Some(n) = r.nproc {
        out.push((Resource::RLIMIT_NPROC, n));
    }
    out
}

pub fn set(resource: Resource, value: u64) -> Result<(), Error> {
    nix::sys::resource::setrlimit(resource, value, value).map_err(|source| Error::Set {
        resource,
        value,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_is_always_limited_and_others_only_when_given() {
        assert_eq!(plan(&Rlimits::default()), vec![(Resource::RLIMIT_CORE, 0)]);
        let all = plan(&Rlimits {
            nofile: Some(1024),
            nproc: Some(512),
            core: Some(1),
        });
        assert_eq!(
            all,
            vec![
                (Resource::RLIMIT_CORE, 1),
                (Resource::RLIMIT_NOFILE, 1024),
                (Resource::RLIMIT_NPROC, 512)
            ]
        );
    }
}
