//! Build script: records the commit the binaries are built from, for `--version`
//! (`AIRLOCK_COMMIT`, read by `airlock::cli::VERSION`).
//!
//! Where the commit comes from, first that answers:
//! 1. the environment variable `AIRLOCK_COMMIT` (a package built from a source tarball, or
//!    inside another project's git tree, names its commit itself);
//! 2. `git rev-parse --short=12 HEAD` of the checkout this crate is in, with `-dirty` when
//!    tracked files differ from it;
//! 3. `unknown`.
//!
//! It reruns only when what it read can have changed: the variable, the checkout's HEAD and
//! the branch it points to, and this crate's sources and manifest (for `-dirty`). It never
//! forces a rebuild on an unchanged tree.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=AIRLOCK_COMMIT");
    let commit = match std::env::var("AIRLOCK_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => from_git().unwrap_or_else(|| "unknown".to_string()),
    };
    println!("cargo:rustc-env=AIRLOCK_COMMIT={commit}");
}

fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")?;
    let out = Command::new("git")
        .arg("-C")
        .arg(&dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_string())
}

fn from_git() -> Option<String> {
    // Absolute paths; in a linked worktree `.git` is a file, HEAD is in the worktree's own
    // git directory and the branches are in the common one.
    let git_dir = PathBuf::from(git(&["rev-parse", "--path-format=absolute", "--git-dir"])?);
    let common = PathBuf::from(git(&[
        "rev-parse",
        "--path-format=absolute",
        "--git-common-dir",
    ])?);
    watch(&git_dir.join("HEAD"));
    if let Ok(head) = std::fs::read_to_string(git_dir.join("HEAD")) {
        if let Some(r) = head.trim().strip_prefix("ref: ") {
            watch(&common.join(r));
            watch(&git_dir.join(r));
        }
    }
    watch(&common.join("packed-refs"));
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=Cargo.toml");

    let hash = git(&["rev-parse", "--short=12", "HEAD"])?;
    if hash.is_empty() {
        return None;
    }
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .map(|s| !s.is_empty())
        .unwrap_or(false);
    Some(if dirty { format!("{hash}-dirty") } else { hash })
}

/// Reruns when `path` changes. Only paths that exist: Cargo reruns a script on every build
/// while one of its watched paths is missing (a branch kept only in packed-refs has no file
/// of its own, and packed-refs itself may not exist).
fn watch(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
