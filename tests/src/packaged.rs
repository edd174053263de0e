//! The configuration the packages install (`config/airlock.toml`, which the deb and the rpm
//! put at `/etc/airlock/airlock.toml`), made runnable on a test host by a short list of
//! named line substitutions. Each must match exactly one line of the shipped file, so a
//! change to that file fails here instead of being tested in some other shape; everything
//! else (the issuer, its audiences, the sandbox's users and limits, the endpoint) is tested
//! as shipped.
//!
//! Owns that list only; it starts nothing.

use std::path::{Path, PathBuf};

/// One change to the shipped file: the line that starts with `from` (after indentation)
/// becomes `to`.
#[derive(Debug, Clone)]
pub struct Substitution {
    pub from: &'static str,
    pub to: String,
    /// Why the test host needs it (shown when the line is missing).
    pub why: &'static str,
}

/// The shipped file.
pub fn shipped_path() -> PathBuf {
    crate::paths::repo_root().join("config/airlock.toml")
}

/// The substitutions for an agent of the harness ([`crate::agent::AgentOptions::config_template`]
/// placeholders): its own tree, admin port and STS (moto), the test issuer's keys, the built
/// shim, and the sandbox's per-agent directories, cgroup and address pool.
pub fn test_host(jwks: &Path, shim: &Path, cgroup_parent: &str, pool: &str) -> Vec<Substitution> {
    let s = |from, to: String, why| Substitution { from, to, why };
    vec![
        s("state_dir = \"/var/lib/airlock\"", "state_dir = \"{{ROOT}}/state\"".into(), "the agent's own tree"),
        s(
            "control_socket = \"/run/airlock/control.sock\"",
            "control_socket = \"{{ROOT}}/control.sock\"".into(),
            "the agent's own tree",
        ),
        s("path = \"/var/log/airlock/audit.jsonl\"", "path = \"{{ROOT}}/audit.jsonl\"".into(), "the agent's own tree"),
        s("journal = true", "journal = false".into(), "no journald on a test host"),
        s("dir = \"/etc/airlock/policies\"", "dir = \"{{ROOT}}/policies\"".into(), "the test's policies"),
        s("listen = \"127.0.0.1:9469\"", "listen = \"{{ADMIN}}\"".into(), "a free port per agent"),
        s(
            "# endpoint = \"https://sts.us-east-1.amazonaws.com\"",
            "endpoint = \"{{STS}}\"\nallow_http = true".into(),
            "moto stands in for STS",
        ),
        s("source = \"imds\"", "source = \"env\"".into(), "moto's keys, not an instance profile"),
        s(
            "provider = \"github\"",
            format!("provider = \"github\"\njwks_file = \"{}\"", jwks.display()),
            "the test issuer's keys (GitHub's discovery is not reachable)",
        ),
        s(
            "shim = \"/usr/libexec/airlock/airlock-shim\"",
            format!("shim = \"{}\"", shim.display()),
            "the built shim",
        ),
        s(
            "[sandbox]",
            format!(
                "[sandbox]\nruntime_dir = \"{{{{ROOT}}}}/jobs\"\nnetns_dir = \"{{{{ROOT}}}}/netns\"\ncgroup_parent = \"{cgroup_parent}\"\naddress_pool = \"{pool}\""
            ),
            "per-agent directories, cgroup and addresses (tests run in parallel)",
        ),
    ]
}

/// `text` with every substitution applied; an error names each one whose line is not
/// there exactly once.
pub fn apply(text: &str, subs: &[Substitution]) -> Result<String, String> {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut missing = Vec::new();
    for sub in subs {
        let at: Vec<usize> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.trim_start().starts_with(sub.from))
            .map(|(i, _)| i)
            .collect();
        match at.as_slice() {
            [i] => lines[*i] = sub.to.clone(),
            _ => missing.push(format!(
                "{:?} ({} lines; needed for: {})",
                sub.from,
                at.len(),
                sub.why
            )),
        }
    }
    if missing.is_empty() {
        Ok(lines.join("\n") + "\n")
    } else {
        Err(format!(
            "{}: expected exactly one line starting with each of {}",
            shipped_path().display(),
            missing.join(", ")
        ))
    }
}

/// The shipped file as a harness template for an agent with a sandbox of its own.
pub fn sandboxed_template(cgroup_parent: &str) -> String {
    let text = std::fs::read_to_string(shipped_path()).expect("config/airlock.toml");
    let subs = test_host(
        &crate::paths::oidc_fixtures().join("jwks.json"),
        &crate::paths::bin("airlock-shim"),
        cgroup_parent,
        &crate::stack::unique_pool(),
    );
    apply(&text, &subs).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_substitution_matches_the_shipped_file_once_and_the_audience_is_untouched() {
        let text = std::fs::read_to_string(shipped_path()).unwrap();
        let subs = test_host(
            Path::new("/k.json"),
            Path::new("/shim"),
            "cg",
            "10.0.0.0/16",
        );
        let out = apply(&text, &subs).unwrap();
        assert!(out.contains("audiences = [\"airlock\"]"), "{out}");
        assert!(out.contains("issuer = \"https://token.actions.githubusercontent.com\""));
        assert!(out.contains("runtime_dir = \"{{ROOT}}/jobs\""), "{out}");
        assert!(
            !out.contains("/var/lib/airlock") && !out.contains("9469"),
            "{out}"
        );
    }

    #[test]
    fn a_missing_line_is_an_error_naming_it() {
        let e = apply(
            "[agent]\n",
            &test_host(Path::new("/k"), Path::new("/s"), "c", "p"),
        )
        .unwrap_err();
        assert!(
            e.contains("source = \\\"imds\\\"") && e.contains("0 lines"),
            "{e}"
        );
    }
}
