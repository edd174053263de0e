//! A `moto_server` STS/IAM stand-in on 127.0.0.1, bootstrapped by
//! `scripts/moto_bootstrap.py`, killed on drop.
//!
//! After the bootstrap moto checks SigV4 signatures and IAM permissions on every request
//! (`INITIAL_NO_AUTH_ACTION_COUNT` = the bootstrap's own IAM calls), so a badly signed or
//! unauthorised `AssumeRole` fails here as it would on AWS. Its recorder shows what each
//! request carried (moto does not enforce session policies, tags or source identities).
//! This module must never skip a test: without `moto_server` it fails loudly.

use base64::Engine;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The number of IAM calls `scripts/moto_bootstrap.py` makes (it reports the same number
/// as `bootstrap_actions`; the harness checks that they agree).
pub const BOOTSTRAP_ACTIONS: u32 = 11;
pub const ACCOUNT_ID: &str = "123456789012";
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    #[error("moto_server not found: run scripts/setup-test-deps.sh (or set AIRLOCK_MOTO_SERVER / AIRLOCK_VENV)")]
    NotFound,
    #[error("cannot start {0}: {1}")]
    Spawn(PathBuf, std::io::Error),
    #[error("moto_server on port {port} did not answer within {secs}s; its log:\n{log}")]
    NotReady { port: u16, secs: u64, log: String },
    #[error("moto bootstrap ({script}) failed: {reason}")]
    Bootstrap { script: PathBuf, reason: String },
    #[error("moto request {path} failed: {reason}")]
    Request { path: String, reason: String },
}

/// One request moto recorded: its headers and its form parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    pub headers: BTreeMap<String, String>,
    pub params: BTreeMap<String, String>,
}

impl RecordedRequest {
    pub fn action(&self) -> Option<&str> {
        self.param("Action")
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// `Tags.member.N.Key/Value` as pairs, in order.
    pub fn tags(&self) -> Vec<(String, String)> {
        (1..)
            .map_while(|i| {
                let k = self.param(&format!("Tags.member.{i}.Key"))?;
                let v = self.param(&format!("Tags.member.{i}.Value"))?;
                Some((k.to_string(), v.to_string()))
            })
            .collect()
    }
}

/// A running, bootstrapped moto_server.
#[derive(Debug)]
pub struct MotoServer {
    child: Child,
    port: u16,
    endpoint: String,
    access_key: String,
    secret_key: String,
    _log_dir: tempfile::TempDir,
}

impl MotoServer {
    /// moto with signatures and IAM permissions enforced after the bootstrap.
    pub fn start() -> Result<MotoServer, MotoError> {
        Self::launch(true)
    }

    /// moto without any authentication: only for calls moto cannot take while enforcing
    /// (moto 5.2.1 answers an unsigned `AssumeRoleWithWebIdentity` with a 500 then, though
    /// AWS accepts it unsigned).
    pub fn start_unauthenticated() -> Result<MotoServer, MotoError> {
        Self::launch(false)
    }

    fn launch(enforce: bool) -> Result<MotoServer, MotoError> {
        // The free port can be taken by a parallel test between our probe and moto's bind:
        // moto then exits at once, and it gets another port.
        let mut attempt = 0;
        loop {
            match Self::launch_once(enforce) {
                Err(MotoError::NotReady { log, .. })
                    if attempt < 4 && log.contains("Address already in use") =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn launch_once(enforce: bool) -> Result<MotoServer, MotoError> {
        let exe = find_moto_server().ok_or(MotoError::NotFound)?;
        let log_dir = tempfile::tempdir().map_err(|e| MotoError::Spawn(exe.clone(), e))?;
        let log_path = log_dir.path().join("moto.log");
        let port = free_port().map_err(|e| MotoError::Spawn(exe.clone(), e))?;
        let log = std::fs::File::create(&log_path).map_err(|e| MotoError::Spawn(exe.clone(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| MotoError::Spawn(exe.clone(), e))?;
        let mut cmd = Command::new(&exe);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            // The recorder writes to a relative file by default: one per server, so that
            // parallel tests never read each other's requests.
            .current_dir(log_dir.path())
            .env(
                "MOTO_RECORDER_FILEPATH",
                log_dir.path().join("recording.jsonl"),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // moto must not pick up the caller's AWS settings.
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN");
        if enforce {
            cmd.env(
                "INITIAL_NO_AUTH_ACTION_COUNT",
                BOOTSTRAP_ACTIONS.to_string(),
            );
        } else {
            cmd.env_remove("INITIAL_NO_AUTH_ACTION_COUNT");
        }
        let child = cmd.spawn().map_err(|e| MotoError::Spawn(exe.clone(), e))?;
        let mut moto = MotoServer {
            child,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key: String::new(),
            secret_key: String::new(),
            _log_dir: log_dir,
        };
        moto.wait_ready(&log_path)?;
        // A server that answered may be another test's moto on the same port: ours must
        // still be running.
        std::thread::sleep(Duration::from_millis(200));
        if let Ok(Some(status)) = moto.child.try_wait() {
            return Err(MotoError::NotReady {
                port,
                secs: 0,
                log: format!("(exited: {status})\n{}", read_tail(&log_path)),
            });
        }
        moto.bootstrap(&exe)?;
        Ok(moto)
    }

    fn wait_ready(&mut self, log: &Path) -> Result<(), MotoError> {
        let start = Instant::now();
        while start.elapsed() < START_TIMEOUT {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(MotoError::NotReady {
                    port: self.port,
                    secs: start.elapsed().as_secs(),
                    log: format!("(exited: {status})\n{}", read_tail(log)),
                });
            }
            // moto's own API is not an AWS action: probing it does not use up the
            // unauthenticated calls the bootstrap needs.
            if self.get("/moto-api/").is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(MotoError::NotReady {
            port: self.port,
            secs: START_TIMEOUT.as_secs(),
            log: read_tail(log),
        })
    }

    fn bootstrap(&mut self, moto_exe: &Path) -> Result<(), MotoError> {
        let script = bootstrap_script();
        let python = find_python(moto_exe);
        let fail = |reason: String| MotoError::Bootstrap {
            script: script.clone(),
            reason,
        };
        let out = Command::new(&python)
            .arg(&script)
            .arg(&self.endpoint)
            .stdin(Stdio::null())
            .env_remove("AWS_PROFILE")
            .output()
            .map_err(|e| fail(format!("cannot run {}: {e}", python.display())))?;
        if !out.status.success() {
            return Err(fail(format!(
                "{} exited {}: {}",
                python.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let v: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| fail(format!("its output is not JSON: {e}")))?;
        let field = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| fail(format!("its output lacks {k}")))
        };
        self.access_key = field("access_key_id")?;
        self.secret_key = field("secret_access_key")?;
        let actions = v.get("bootstrap_actions").and_then(Value::as_u64);
        if actions != Some(u64::from(BOOTSTRAP_ACTIONS)) {
            return Err(fail(format!(
                "it made {actions:?} IAM calls but the harness allows {BOOTSTRAP_ACTIONS} unauthenticated ones: update BOOTSTRAP_ACTIONS in tests/src/moto.rs"
            )));
        }
        Ok(())
    }

    /// `http://127.0.0.1:<port>`, the STS (and IAM) endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The access key id of the IAM user `airlock-agent`.
    pub fn agent_access_key(&self) -> &str {
        &self.access_key
    }

    pub fn agent_secret_key(&self) -> &str {
        &self.secret_key
    }

    /// `arn:aws:iam::123456789012:role/<name>` (roles: web-prod-deploy, web-prod-readonly,
    /// web-staging-deploy, ci-readonly).
    pub fn role_arn(name: &str) -> String {
        format!("arn:aws:iam::{ACCOUNT_ID}:role/{name}")
    }

    /// Forget what was recorded and record from now on.
    pub fn start_recording(&self) -> Result<(), MotoError> {
        self.post("/moto-api/recorder/reset-recording")?;
        self.post("/moto-api/recorder/start-recording")?;
        Ok(())
    }

    pub fn stop_recording(&self) -> Result<(), MotoError> {
        self.post("/moto-api/recorder/stop-recording").map(|_| ())
    }

    /// Every request recorded since [`MotoServer::start_recording`].
    pub fn recorded(&self) -> Result<Vec<RecordedRequest>, MotoError> {
        let path = "/moto-api/recorder/download-recording";
        let body = self.get(path)?;
        let fail = |reason: String| MotoError::Request {
            path: path.to_string(),
            reason,
        };
        let mut out = Vec::new();
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value =
                serde_json::from_str(line).map_err(|e| fail(format!("not JSON: {e}")))?;
            let raw = v.get("body").and_then(Value::as_str).unwrap_or_default();
            let bytes = if v.get("body_encoded").and_then(Value::as_bool) == Some(true) {
                base64::engine::general_purpose::STANDARD
                    .decode(raw)
                    .map_err(|e| fail(format!("body is not base64: {e}")))?
            } else {
                raw.as_bytes().to_vec()
            };
            let params = form_urlencoded::parse(&bytes)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            let headers = v
                .get("headers")
                .and_then(Value::as_object)
                .map(|h| {
                    h.iter()
                        .map(|(k, v)| {
                            (
                                k.to_ascii_lowercase(),
                                v.as_str().unwrap_or_default().to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(RecordedRequest {
                method: v
                    .get("method")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                headers,
                params,
            });
        }
        Ok(out)
    }

    /// The recorded requests of one STS action (`AssumeRole`, `AssumeRoleWithWebIdentity`).
    pub fn recorded_action(&self, action: &str) -> Result<Vec<RecordedRequest>, MotoError> {
        Ok(self
            .recorded()?
            .into_iter()
            .filter(|r| r.action() == Some(action))
            .collect())
    }

    /// The recorded `AssumeRole` requests.
    pub fn assume_role_requests(&self) -> Result<Vec<RecordedRequest>, MotoError> {
        self.recorded_action("AssumeRole")
    }

    fn get(&self, path: &str) -> Result<String, MotoError> {
        http(self.port, "GET", path)
    }

    fn post(&self, path: &str) -> Result<String, MotoError> {
        http(self.port, "POST", path)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `AIRLOCK_MOTO_SERVER`, else the test venv's (`AIRLOCK_VENV`), else `PATH`.
pub fn find_moto_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AIRLOCK_MOTO_SERVER").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let venv = crate::paths::venv_bin("moto_server");
    if venv.is_file() {
        return Some(venv);
    }
    on_path("moto_server")
}

/// The Python beside moto_server (its venv), else the venv's, else `python3` on `PATH`.
fn find_python(moto_exe: &Path) -> PathBuf {
    let beside = moto_exe.parent().map(|d| d.join("python"));
    if let Some(p) = beside.filter(|p| p.is_file()) {
        return p;
    }
    let venv = crate::paths::venv_bin("python");
    if venv.is_file() {
        return venv;
    }
    on_path("python3").unwrap_or_else(|| PathBuf::from("python3"))
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.is_file())
}

pub fn bootstrap_script() -> PathBuf {
    crate::paths::repo_root().join("scripts/moto_bootstrap.py")
}

fn free_port() -> std::io::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

fn read_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A one-shot HTTP/1.1 request to moto's own API (no body, `Connection: close`).
fn http(port: u16, method: &str, path: &str) -> Result<String, MotoError> {
    let fail = |reason: String| MotoError::Request {
        path: path.to_string(),
        reason,
    };
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map_err(|e| fail(e.to_string()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| fail(e.to_string()))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| fail(e.to_string()))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| fail("no HTTP header".into()))?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    if !status.starts_with('2') {
        return Err(fail(format!("HTTP {status}")));
    }
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }

    #[test]
    fn tags_are_read_in_order() {
        let r = RecordedRequest {
            method: "POST".into(),
            headers: BTreeMap::new(),
            params: [
                ("Tags.member.1.Key", "repo"),
                ("Tags.member.1.Value", "acme/web"),
                ("Tags.member.2.Key", "env"),
                ("Tags.member.2.Value", "prod"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        };
        assert_eq!(
            r.tags(),
            vec![
                ("repo".into(), "acme/web".into()),
                ("env".into(), "prod".into())
            ]
        );
    }
}
