//! The programs the runner integrations start themselves (`buildkite-agent`, `tar`, a
//! GitHub supervisor's `jitconfig_command`): each by an absolute path from the operator's
//! files, never looked up in `PATH`, and with an environment of our own making — a fixed
//! `PATH` and only the variables a caller names — because the integrations run with
//! variables a pipeline sets (`PATH`, `LD_PRELOAD`, `TAR_OPTIONS`, …).
//!
//! Never inherits the caller's environment; never takes a program from a variable.

use std::path::Path;

/// The only `PATH` such a program gets.
pub const FIXED_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The host's proxy settings, which a program that talks to the network may need.
pub const PROXY: &[&str] = &[
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
];

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an absolute path: programs are never looked up in PATH here")]
pub struct NotAbsolute(pub std::path::PathBuf);

/// `program` (absolute) with an empty environment but `PATH` = [`FIXED_PATH`] and the
/// variables of `pass` that `lookup` has.
pub fn command(
    program: &Path,
    pass: &[&str],
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<tokio::process::Command, NotAbsolute> {
    if !program.is_absolute() {
        return Err(NotAbsolute(program.to_path_buf()));
    }
    let mut c = tokio::process::Command::new(program);
    c.env_clear().env("PATH", FIXED_PATH);
    for k in pass {
        if let Some(v) = lookup(k).filter(|v| !v.is_empty()) {
            c.env(k, v);
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_named_variables_and_the_fixed_path_reach_the_program() {
        let env = |k: &str| match k {
            "KEEP" => Some("kept".to_string()),
            "HTTPS_PROXY" => Some("http://proxy:3128".to_string()),
            _ => None,
        };
        let out = command(
            Path::new("/usr/bin/env"),
            &["KEEP", "HTTPS_PROXY", "ABSENT"],
            env,
        )
        .unwrap()
        .env_remove("NOTHING")
        .output()
        .await
        .unwrap();
        let mut lines: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        lines.sort();
        assert_eq!(
            lines,
            [
                "HTTPS_PROXY=http://proxy:3128".to_string(),
                "KEEP=kept".into(),
                format!("PATH={FIXED_PATH}"),
            ]
        );
        assert!(command(Path::new("env"), &[], env).is_err());
    }
}
