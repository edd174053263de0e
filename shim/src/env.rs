//! The job's command line and environment: exactly `spec.argv` and `spec.env`, nothing
//! inherited from the agent. A bare command name is looked up in the spec's own `PATH`
//! (not the agent's), inside the job's new root, as the job's user.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Used when the spec's environment has no `PATH`.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("argument {0} contains a NUL byte")]
    NulArgument(usize),
    #[error("environment variable {0:?} contains a NUL byte or '=' in its name")]
    BadVariable(String),
    #[error("command {0:?} not found in the job's PATH (inside the sandbox, as the job's user)")]
    NotFound(String),
}

/// The argv and envp handed to `execve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
}

pub fn command(argv: &[String], env: &BTreeMap<String, String>) -> Result<Command, Error> {
    let argv = argv
        .iter()
        .enumerate()
        .map(|(i, a)| CString::new(a.as_str()).map_err(|_| Error::NulArgument(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let env = env
        .iter()
        .map(|(k, v)| {
            if k.contains('=') {
                return Err(Error::BadVariable(k.clone()));
            }
            // Never put the value in an error: it may be a secret.
            CString::new(format!("{k}={v}")).map_err(|_| Error::BadVariable(k.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Command { argv, env })
}

/// The file to exec for `argv0`: itself if it contains a '/', else the first entry of
/// `path` (the job's `PATH`) holding an executable of that name.
pub fn resolve(argv0: &str, path: Option<&str>) -> Result<CString, Error> {
    let found = if argv0.contains('/') {
        Some(PathBuf::from(argv0))
    } else {
        path.unwrap_or(DEFAULT_PATH)
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(argv0))
            .find(|p| is_executable(p))
    };
    found
        .and_then(|p| CString::new(p.as_os_str().as_bytes()).ok())
        .ok_or_else(|| Error::NotFound(argv0.to_string()))
}

fn is_executable(p: &Path) -> bool {
    p.is_file() && nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_is_exactly_the_spec() {
        let env = BTreeMap::from([
            ("A".to_string(), "1".to_string()),
            ("B".into(), "x y".into()),
        ]);
        let c = command(&["/bin/echo".into(), "hi".into()], &env).unwrap();
        assert_eq!(c.argv, vec![c"/bin/echo".to_owned(), c"hi".to_owned()]);
        assert_eq!(c.env, vec![c"A=1".to_owned(), c"B=x y".to_owned()]);
    }

    #[test]
    fn bad_variables_are_named_without_their_value() {
        let env = BTreeMap::from([("K".to_string(), "sec\0ret".to_string())]);
        let err = command(&["x".into()], &env).unwrap_err().to_string();
        assert!(err.contains("\"K\"") && !err.contains("sec"), "{err}");
        assert!(matches!(
            command(&["a".into(), "b\0".into()], &BTreeMap::new()),
            Err(Error::NulArgument(1))
        ));
    }

    #[test]
    fn resolve_uses_the_given_path_only() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("al-tool");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let path = format!("/nonexistent:{}", dir.path().display());
        assert_eq!(
            resolve("al-tool", Some(&path)).unwrap().to_str().unwrap(),
            bin.to_str().unwrap()
        );
        assert!(matches!(resolve("al-tool", None), Err(Error::NotFound(_))));
        assert_eq!(resolve("./x", None).unwrap(), c"./x".to_owned());
        assert_eq!(resolve("sh", None).unwrap(), c"/usr/bin/sh".to_owned());
    }
}
