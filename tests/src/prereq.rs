//! What the privileged tests need, checked up front so a missing piece fails with what to
//! install (under `CI=true` and everywhere else: these tests never skip).

use std::process::{Command, Stdio};

/// Whether this process runs as root (its effective uid, from `/proc/self/status`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Root, and each `(tool, Debian package)` on PATH; `who` names the tests in the message.
pub fn require_root_and(who: &str, tools: &[(&str, &str)]) {
    let root = is_root();
    assert!(
        root,
        "{who} need root (namespaces, cgroups, nftables); run them as root"
    );
    for (tool, package) in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(found, "{who} need `{tool}` (Debian package {package})");
    }
}
