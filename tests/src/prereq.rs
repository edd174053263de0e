//! What the privileged tests need, checked up front so a missing piece fails with what to
//! install (under `CI=true` and everywhere else: these tests never skip).

use std::process::{Command, Stdio};

/// Root, and each `(tool, Debian package)` on PATH; `who` names the tests in the message.
pub fn require_root_and(who: &str, tools: &[(&str, &str)]) {
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
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
