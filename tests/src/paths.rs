//! Where the end-to-end tests find the repository, the built binaries and the test clients.
//!
//! Owns path discovery only; it must never build or install anything (the Makefile and
//! `scripts/setup-test-deps.sh` do that, so a test run never downloads).

use std::path::{Path, PathBuf};

/// The workspace root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set (CI may keep it outside the
/// clone), else `<repo>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                repo_root().join(d)
            }
        }
        _ => repo_root().join("target"),
    }
}

/// A binary built by `cargo build --bins` (debug profile), or from `AIRLOCK_BIN_DIR` when set
/// (the benchmarks point it at release builds).
pub fn bin(name: &str) -> PathBuf {
    if let Some(d) = std::env::var_os("AIRLOCK_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join(name);
    }
    target_dir().join("debug").join(name)
}

/// The test clients' Python venv: `AIRLOCK_VENV`, or for root
/// `/var/cache/airlock/test-venv` (outside `/root`, so sandboxed jobs can run it), or
/// `~/.cache/airlock/venv` — the rule of `scripts/venv-path.sh`.
pub fn venv() -> PathBuf {
    if let Some(v) = std::env::var_os("AIRLOCK_VENV").filter(|v| !v.is_empty()) {
        return PathBuf::from(v);
    }
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return PathBuf::from("/var/cache/airlock/test-venv");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/airlock/venv")
}

/// A program inside the venv (`python`, `aws`, `moto_server`).
pub fn venv_bin(name: &str) -> PathBuf {
    venv().join("bin").join(name)
}

/// The npm project holding the pinned AWS SDK for JavaScript.
pub fn node_dir() -> PathBuf {
    repo_root().join("tests/node")
}

/// The OIDC fixture directory (keys and JWKS; test-only material).
pub fn oidc_fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/oidc")
}

/// A directory of the host's that jobs see, for a test's files a sandboxed job reads from the
/// host's (read-only) tree: not under `/tmp`, `/var/tmp`, `/run` or `/home`, which a job's
/// own tmpfs covers, nor under `/root`, which is hidden — so not under the target directory
/// either, since a clone may live anywhere. `/var/lib/airlock-tests/<name>`, mode 0755 on
/// the way (root tests only).
pub fn job_visible_dir(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let base = PathBuf::from("/var/lib/airlock-tests");
    let dir = base.join(name);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for d in [&base, &dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    }
    dir
}
