//! Forwarding in the host namespace, which outbound jobs need, without making the host a
//! router: `net.ipv4.ip_forward = 1` forwards between *every* pair of the host's networks,
//! so on a multi-homed host it would route between networks that were kept apart. When
//! airlock is the one that turned forwarding on, the host's table (`firewall::host_ruleset`)
//! drops every forwarded packet that neither comes from nor goes to a job link.
//!
//! A host that forwarded before airlock (a Docker host, a router) keeps forwarding as it
//! did: airlock records that *it* turned a family's forwarding on in the state directory
//! (`forwarding.ipv4`, `forwarding.ipv6`), and only then drops the rest. `[sandbox]
//! other_forwarding` overrides the guess. Owns those two marker files; it never turns
//! forwarding off (jobs of other agents, and the host, may rely on it).

use serde::Deserialize;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::firewall::{self, FirewallError};

/// Marker of IPv4 forwarding turned on by airlock, in the state directory.
pub const MARKER_V4: &str = "forwarding.ipv4";
/// Marker of IPv6 forwarding turned on by airlock, in the state directory.
pub const MARKER_V6: &str = "forwarding.ipv6";

/// `[sandbox] other_forwarding`: what happens to forwarded traffic that is not a job's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OtherForwarding {
    /// Dropped for a family whose forwarding airlock turned on (its marker is in the state
    /// directory); left alone where the host forwarded before airlock.
    #[default]
    Auto,
    /// Always dropped: the host must never route between its other networks.
    Drop,
    /// Never dropped: the host routes for others too (say, Docker was installed after
    /// airlock turned forwarding on).
    Allow,
}

/// How the agent handles forwarding (`NetConfig::forwarding`).
#[derive(Debug, Clone, Default)]
pub struct ForwardingConfig {
    pub other: OtherForwarding,
    /// Where the markers go; `None` (tests of the network alone): nothing is recorded, so
    /// only forwarding turned on by this process counts as airlock's.
    pub state_dir: Option<PathBuf>,
}

/// Which families' forwarded traffic that is not a job's the host table drops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropOther {
    pub ipv4: bool,
    pub ipv6: bool,
}

fn read_knob(path: &Path) -> Result<bool, FirewallError> {
    let v = std::fs::read_to_string(path).map_err(|source| FirewallError::Forwarding {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(v.trim() == "1")
}

/// Writes a marker durably (before forwarding is turned on, so a crash in between still
/// finds it).
fn record(path: &Path) -> Result<(), FirewallError> {
    let err = |source| FirewallError::Forwarding {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    f.write_all(b"forwarding was turned on by airlock for outbound jobs\n")
        .and_then(|()| f.sync_all())
        .map_err(err)
}

/// Is this family's forwarding airlock's? `on`: forwarding is on now; `will_turn_on`: the
/// caller is about to turn it on. A marker is written when airlock turns it on.
fn owned(
    cfg: &ForwardingConfig,
    marker: &str,
    on: bool,
    will_turn_on: bool,
) -> Result<bool, FirewallError> {
    let path = cfg.state_dir.as_ref().map(|d| d.join(marker));
    if !on && will_turn_on {
        if let Some(p) = &path {
            record(p)?;
        }
        return Ok(true);
    }
    Ok(path.is_some_and(|p| p.exists()))
}

/// Decides, before an outbound job's forwarding is turned on, whose forwarding is whose:
/// records airlock's where it is about to turn a family on (IPv6 only for jobs with
/// IPv6), and returns which families' other forwarding the host table must drop.
pub fn plan(
    cfg: &ForwardingConfig,
    proc_dir: &Path,
    ipv6: bool,
) -> Result<DropOther, FirewallError> {
    let v4_on = read_knob(&proc_dir.join("sys/net/ipv4/ip_forward"))?;
    let v4 = owned(cfg, MARKER_V4, v4_on, true)?;
    let v6_on = read_knob(&proc_dir.join("sys/net/ipv6/conf/all/forwarding")).unwrap_or(false);
    let v6 = owned(cfg, MARKER_V6, v6_on, ipv6)?;
    Ok(match cfg.other {
        OtherForwarding::Auto => DropOther { ipv4: v4, ipv6: v6 },
        OtherForwarding::Drop => DropOther {
            ipv4: true,
            ipv6: true,
        },
        OtherForwarding::Allow => DropOther::default(),
    })
}

/// An outbound job's forwarding: decide ([`plan`]), apply the host's table with that
/// decision, then turn forwarding on, in that order, so there is no moment in which the
/// host forwards without the table. Blocking (it runs `nft`).
pub fn apply_host_table_and_forward(
    cfg: &ForwardingConfig,
    proc_dir: &Path,
    ipv6: bool,
) -> Result<DropOther, FirewallError> {
    let drop = plan(cfg, proc_dir, ipv6)?;
    firewall::apply(&firewall::host_ruleset(drop), "host's ruleset")?;
    if firewall::enable_forwarding(proc_dir)? {
        tracing::info!(
            drop_other_forwarding = drop.ipv4,
            "turned on IPv4 forwarding (net.ipv4.ip_forward=1) for outbound jobs; it stays on"
        );
    }
    if ipv6 {
        if let Some(kept) = firewall::enable_forwarding6(proc_dir)? {
            tracing::info!(
                accept_ra_2 = %kept.join(","),
                drop_other_forwarding = drop.ipv6,
                "turned on IPv6 forwarding (net.ipv6.conf.all.forwarding=1) for jobs with IPv6; it stays on. \
                 Interfaces that took router advertisements still do (accept_ra=2)"
            );
        }
    }
    Ok(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake procfs with the two knobs.
    fn proc(v4: &str, v6: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("sys/net/ipv4")).unwrap();
        std::fs::create_dir_all(d.path().join("sys/net/ipv6/conf/all")).unwrap();
        std::fs::write(d.path().join("sys/net/ipv4/ip_forward"), v4).unwrap();
        std::fs::write(d.path().join("sys/net/ipv6/conf/all/forwarding"), v6).unwrap();
        d
    }

    fn cfg(other: OtherForwarding, state: &Path) -> ForwardingConfig {
        ForwardingConfig {
            other,
            state_dir: Some(state.to_path_buf()),
        }
    }

    #[test]
    fn forwarding_airlock_turns_on_is_recorded_and_the_rest_dropped() {
        let p = proc("0\n", "0\n");
        let state = tempfile::tempdir().unwrap();
        let c = cfg(OtherForwarding::Auto, state.path());
        let d = plan(&c, p.path(), false).unwrap();
        assert_eq!(
            d,
            DropOther {
                ipv4: true,
                ipv6: false
            }
        );
        assert!(state.path().join(MARKER_V4).is_file());
        assert!(!state.path().join(MARKER_V6).exists());
        // Later (forwarding on now, airlock's marker there): still airlock's.
        std::fs::write(p.path().join("sys/net/ipv4/ip_forward"), "1\n").unwrap();
        assert!(plan(&c, p.path(), false).unwrap().ipv4);
        // A job with IPv6 turns IPv6 forwarding on too.
        let d = plan(&c, p.path(), true).unwrap();
        assert!(d.ipv6 && state.path().join(MARKER_V6).is_file());
    }

    #[test]
    fn a_host_that_forwarded_before_airlock_keeps_forwarding() {
        let p = proc("1\n", "1\n");
        let state = tempfile::tempdir().unwrap();
        let c = cfg(OtherForwarding::Auto, state.path());
        assert_eq!(plan(&c, p.path(), true).unwrap(), DropOther::default());
        assert!(!state.path().join(MARKER_V4).exists());
        assert!(!state.path().join(MARKER_V6).exists());
    }

    #[test]
    fn the_setting_overrides_the_guess() {
        let p = proc("1\n", "0\n");
        let state = tempfile::tempdir().unwrap();
        let all = DropOther {
            ipv4: true,
            ipv6: true,
        };
        assert_eq!(
            plan(&cfg(OtherForwarding::Drop, state.path()), p.path(), false).unwrap(),
            all
        );
        std::fs::write(p.path().join("sys/net/ipv4/ip_forward"), "0\n").unwrap();
        assert_eq!(
            plan(&cfg(OtherForwarding::Allow, state.path()), p.path(), false).unwrap(),
            DropOther::default()
        );
    }

    #[test]
    fn a_marker_that_cannot_be_written_refuses_the_job() {
        let p = proc("0\n", "0\n");
        let c = cfg(OtherForwarding::Auto, Path::new("/nonexistent/al-state"));
        let e = plan(&c, p.path(), false).unwrap_err().to_string();
        assert!(e.contains("forwarding.ipv4"), "{e}");
    }
}
