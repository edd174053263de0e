//! Runs `airlockd` and `airlock` as an operator would: a temporary config, state dir,
//! control socket, audit log and policy dir; the agent's stderr captured to a file; the
//! daemon killed on drop.
//!
//! Owns process lifecycle only; it must never reach into the agent's memory or files to
//! make a test pass (tests look at what a user could see: exit codes, output, the audit log).

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The host variables that must never reach the agent or a job by accident.
pub const HOST_AWS_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_STS",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
];

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{0} is not built: run `cargo build --bins` first (make test does)")]
    NotBuilt(PathBuf),
    #[error("cannot prepare the agent's temp tree at {0}: {1}")]
    Prepare(PathBuf, std::io::Error),
    #[error("cannot spawn {0}: {1}")]
    Spawn(PathBuf, std::io::Error),
    #[error("airlockd exited early ({status}) before it was ready; its log:\n{log}")]
    ExitedEarly { status: String, log: String },
    #[error("airlockd was not ready within {0:?} (control socket + /healthz); its log:\n{1}")]
    NotReady(Duration, String),
    #[error("`airlock {args}` failed ({status}): {stderr}")]
    Cli {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("`airlock {0}` printed output that is not the expected JSON: {1}: {2}")]
    CliOutput(String, serde_json::Error, String),
}

/// Where the agent gets its policies from.
#[derive(Debug, Clone)]
pub enum Policies {
    /// A copy of the repository's `policies/` (rules and the files they name).
    Repo,
    /// `(file name, TOML text)` pairs.
    Files(Vec<(String, String)>),
}

/// What the agent talks to and how it is configured.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub sts_endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub policies: Policies,
    /// The JWKS the test issuer is verified with.
    pub jwks_file: PathBuf,
    /// TOML appended to the generated config (extra sections or issuers).
    pub extra_config: String,
    /// `AIRLOCK_LOG` for the daemon, when the test wants more (e.g. debug) output.
    pub log_filter: Option<String>,
    /// `[endpoint] imds`; `None` leaves it unset (on with the sandbox, off without).
    pub imds: Option<bool>,
    /// Run the daemon in this network namespace (`nsenter --net`), as if it were the
    /// host's: tests of what the agent does to the host's network make a host of their own.
    /// Its STS and the admin listener are then inside that namespace too (the harness
    /// reaches the admin listener there; STS stays unreachable, which job starts do not
    /// need).
    pub netns: Option<PathBuf>,
    /// The audit log's path (default: `audit.jsonl` in the agent's tree).
    pub audit_path: Option<PathBuf>,
    /// TOML keys added to the `[agent]` table (its proxy keys, say).
    pub agent_config: String,
    /// TOML keys added to the `[audit]` table (anchors, job limits).
    pub audit_config: String,
    /// A shell script that stands in for `/usr/sbin/nft` for this agent alone (fault
    /// injection): the agent runs in a private mount namespace of its own where the script
    /// is bind-mounted over `/usr/sbin/nft`; nothing changes for the rest of the host. Only
    /// for tests whose jobs never run a command (the sandbox's mounts stay in that
    /// namespace too), such as a job the agent must refuse.
    pub nft_stub: Option<String>,
    /// `--log-format` for the daemon (`plain` when `None`).
    pub log_format: Option<String>,
    /// A whole configuration file instead of the generated one (see
    /// [`crate::packaged`]): `{{ROOT}}` stands for the agent's temporary tree (where the
    /// harness expects `state/`, `control.sock`, `audit.jsonl`, `policies/`), `{{ADMIN}}` for
    /// the admin listener's address and `{{STS}}` for the STS endpoint, each as a TOML
    /// string's contents.
    pub config_template: Option<String>,
    /// The test issuer's JWKS fetched from this URL (`jwks_url`, plain http allowed)
    /// instead of read from [`AgentOptions::jwks_file`].
    pub jwks_url: Option<String>,
    /// Variables set in the daemon's environment (`HTTPS_PROXY`, …). The proxy variables of
    /// the test's own environment never reach the daemon.
    pub env: Vec<(String, String)>,
}

impl AgentOptions {
    pub fn new(sts_endpoint: &str, access_key: &str, secret_key: &str) -> Self {
        AgentOptions {
            sts_endpoint: sts_endpoint.to_owned(),
            access_key: access_key.to_owned(),
            secret_key: secret_key.to_owned(),
            policies: Policies::Repo,
            jwks_file: crate::paths::oidc_fixtures().join("jwks.json"),
            extra_config: String::new(),
            log_filter: None,
            imds: None,
            netns: None,
            audit_path: None,
            audit_config: String::new(),
            agent_config: String::new(),
            nft_stub: None,
            log_format: None,
            config_template: None,
            jwks_url: None,
            env: Vec::new(),
        }
    }

    /// Runs the agent with `script` in place of `/usr/sbin/nft` (see [`AgentOptions::nft_stub`]).
    pub fn nft_stub(mut self, script: &str) -> Self {
        self.nft_stub = Some(script.to_owned());
        self
    }

    /// The audit log at `path` instead of the agent's tree (a small filesystem, say).
    pub fn audit_path(mut self, path: &Path) -> Self {
        self.audit_path = Some(path.to_owned());
        self
    }

    /// `keys` (TOML lines) added to the `[audit]` table.
    pub fn audit_config(mut self, keys: &str) -> Self {
        self.audit_config = keys.to_owned();
        self
    }

    /// Runs the daemon in the network namespace at `path` (see [`AgentOptions::netns`]).
    pub fn netns(mut self, path: &Path) -> Self {
        self.netns = Some(path.to_owned());
        self
    }

    /// Sets `[endpoint] imds` (unsandboxed tests of the IMDS emulation turn it on).
    pub fn imds(mut self, on: bool) -> Self {
        self.imds = Some(on);
        self
    }

    pub fn policies(mut self, policies: Policies) -> Self {
        self.policies = policies;
        self
    }

    pub fn log_filter(mut self, filter: &str) -> Self {
        self.log_filter = Some(filter.to_owned());
        self
    }

    /// The daemon's `--log-format` (`plain` or `json`).
    pub fn log_format(mut self, format: &str) -> Self {
        self.log_format = Some(format.to_owned());
        self
    }
}

/// A running `airlockd` in its own temporary tree.
#[derive(Debug)]
pub struct Agent {
    opts: AgentOptions,
    dir: tempfile::TempDir,
    config: PathBuf,
    admin: SocketAddr,
    child: Option<Child>,
    /// Bumped on each (re)start so each run's log is kept.
    runs: u32,
}

/// A started job, as `airlock job start` printed it.
#[derive(Debug, Clone)]
pub struct Job {
    pub job_id: String,
    pub endpoint: String,
    pub token: String,
    pub token_file: PathBuf,
    pub env: BTreeMap<String, String>,
    pub rule: Option<String>,
    pub grants: Vec<String>,
    pub refused: Option<String>,
    pub raw: Value,
}

impl Job {
    pub fn from_json(v: Value) -> Option<Job> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        Some(Job {
            job_id: s("job_id")?,
            endpoint: s("endpoint")?,
            token: s("token")?,
            token_file: PathBuf::from(s("token_file")?),
            env: v
                .get("env")?
                .as_object()?
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect(),
            rule: s("rule"),
            grants: v
                .get("grants")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            refused: s("refused"),
            raw: v,
        })
    }

    /// `host:port` of the job's listener.
    pub fn addr(&self) -> String {
        self.endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    /// `GET path` on the job's listener with `Authorization: token`: `(status, body)`.
    pub fn get_with_token(&self, path: &str, token: &str) -> std::io::Result<(u16, String)> {
        let addr = self.addr();
        let raw = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n"
        );
        parse_response(&raw_request(&addr, raw.as_bytes())?)
    }

    /// The job's default credentials over the container protocol: `(status, JSON body)`.
    pub fn credentials(&self) -> std::io::Result<(u16, Value)> {
        let (status, body) = self.get_with_token("/v1/credentials", &self.token)?;
        Ok((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
    }

    /// The job's environment with only the container-credentials provider set (the
    /// IMDS variables removed), as SDK tests want it.
    pub fn container_env(&self) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        env.retain(|k, _| !k.starts_with("AWS_EC2_METADATA"));
        env
    }

    /// The job's environment with the container variables removed, so the SDK's chain
    /// falls through to IMDS at the job's endpoint.
    pub fn imds_env(&self) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        env.retain(|k, _| !k.starts_with("AWS_CONTAINER_"));
        env
    }
}

pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Agent {
    pub fn start(opts: AgentOptions) -> Result<Agent, HarnessError> {
        let airlockd = crate::paths::bin("airlockd");
        if !airlockd.is_file() {
            return Err(HarnessError::NotBuilt(airlockd));
        }
        let dir = tempfile::Builder::new()
            .prefix("airlock-e2e-")
            .tempdir()
            .map_err(|e| HarnessError::Prepare(std::env::temp_dir(), e))?;
        let root = dir.path().to_path_buf();
        let prep = |r: std::io::Result<()>| r.map_err(|e| HarnessError::Prepare(root.clone(), e));
        let policy_dir = root.join("policies");
        prep(std::fs::create_dir_all(&policy_dir))?;
        prep(std::fs::create_dir_all(root.join("state")))?;
        match &opts.policies {
            Policies::Repo => {
                // Every file, not only *.toml: rules may name session-policy files beside them.
                let src = crate::paths::repo_root().join("policies");
                for entry in
                    prep_read_dir(&src).map_err(|e| HarnessError::Prepare(src.clone(), e))?
                {
                    if let (true, Some(name)) = (entry.is_file(), entry.file_name()) {
                        prep(std::fs::copy(&entry, policy_dir.join(name)).map(|_| ()))?;
                    }
                }
            }
            Policies::Files(files) => {
                for (name, text) in files {
                    prep(std::fs::write(policy_dir.join(name), text))?;
                }
            }
        }
        let port = free_port().map_err(|e| HarnessError::Prepare(root.clone(), e))?;
        let admin: SocketAddr = ([127, 0, 0, 1], port).into();
        let config = root.join("airlock.toml");
        prep(std::fs::write(&config, render_config(&root, admin, &opts)))?;
        let mut agent = Agent {
            opts,
            dir,
            config,
            admin,
            child: None,
            runs: 0,
        };
        // The free port can be taken by a parallel test between our probe and the agent's
        // bind: then the agent exits saying so, and it gets another port.
        for attempt in 0.. {
            match agent.spawn() {
                Ok(()) => break,
                Err(HarnessError::ExitedEarly { log, .. })
                    if attempt < 4 && log.contains("cannot listen on [admin]") =>
                {
                    let port = free_port().map_err(|e| HarnessError::Prepare(root.clone(), e))?;
                    agent.admin = ([127, 0, 0, 1], port).into();
                    prep(std::fs::write(
                        &agent.config,
                        render_config(&root, agent.admin, &agent.opts),
                    ))?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        let airlockd = crate::paths::bin("airlockd");
        self.runs += 1;
        let log_path = self.log_path(self.runs);
        let log = std::fs::File::create(&log_path)
            .map_err(|e| HarnessError::Prepare(log_path.clone(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| HarnessError::Prepare(log_path.clone(), e))?;
        // The daemon, in the test's network namespace when it names one.
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(ns) = &self.opts.netns {
            // nsenter execs airlockd in place: the child's pid is the daemon's.
            argv.push("nsenter".into());
            argv.push(format!("--net={}", ns.display()).into());
            argv.push("--".into());
        }
        argv.push(airlockd.clone().into());
        let mut cmd = match &self.opts.nft_stub {
            None => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
            Some(script) => {
                use std::os::unix::fs::PermissionsExt;
                let stub = self.dir.path().join("nft-stub");
                std::fs::write(&stub, script)
                    .and_then(|()| {
                        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755))
                    })
                    .map_err(|e| HarnessError::Prepare(stub.clone(), e))?;
                // `unshare` runs the shell in the new namespace without forking, and the
                // shell execs the agent: the child's pid is the agent's.
                let mut cmd = Command::new("unshare");
                cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
                    .arg("mount --bind \"$0\" /usr/sbin/nft && exec \"$@\"")
                    .arg(&stub)
                    .args(&argv);
                cmd
            }
        };
        cmd.arg("--config").arg(&self.config);
        if let Some(f) = &self.opts.log_format {
            cmd.arg("--log-format").arg(f);
        }
        for v in HOST_AWS_VARS {
            cmd.env_remove(v);
        }
        // The agent's own credentials exist only in the daemon's environment.
        for v in airlock::childenv::PROXY {
            cmd.env_remove(v);
        }
        cmd.envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        cmd.env("AWS_ACCESS_KEY_ID", &self.opts.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.opts.secret_key)
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log);
        // airlockd reads its level from AIRLOCK_LOG.
        cmd.env_remove("RUST_LOG");
        match &self.opts.log_filter {
            Some(f) => cmd.env("AIRLOCK_LOG", f),
            None => cmd.env_remove("AIRLOCK_LOG"),
        };
        let child = cmd
            .spawn()
            .map_err(|e| HarnessError::Spawn(airlockd.clone(), e))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30))
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + limit;
        let socket = self.socket_path();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(HarnessError::ExitedEarly {
                        status: status.to_string(),
                        log: self.log(),
                    });
                }
            }
            if UnixStream::connect(&socket).is_ok() && self.healthz().is_some_and(|s| s == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::NotReady(limit, self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET path` on the admin listener (from the daemon's network namespace): `(status,
    /// body)`.
    pub fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        let admin = self.admin;
        match &self.opts.netns {
            None => http_get(admin, path).ok(),
            Some(ns) => {
                let path = path.to_owned();
                airlock::sandbox::netns::run_in_netns(ns, move || http_get(admin, &path).ok())
                    .ok()
                    .flatten()
            }
        }
    }

    /// Status of `GET /healthz` on the admin listener, `None` if it does not answer.
    pub fn healthz(&self) -> Option<u16> {
        let (status, _) = self.admin_get("/healthz")?;
        Some(status)
    }

    /// Body of `GET /metrics`.
    pub fn metrics(&self) -> Option<String> {
        self.admin_get("/metrics").map(|(_, b)| b)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn config_path(&self) -> &Path {
        &self.config
    }
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }
    pub fn audit_path(&self) -> PathBuf {
        self.opts
            .audit_path
            .clone()
            .unwrap_or_else(|| self.dir.path().join("audit.jsonl"))
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policies")
    }
    pub fn sts_endpoint(&self) -> &str {
        &self.opts.sts_endpoint
    }
    fn log_path(&self, run: u32) -> PathBuf {
        self.dir.path().join(format!("airlockd.{run}.log"))
    }

    /// Everything the daemon wrote to stdout and stderr, over all its runs.
    pub fn log(&self) -> String {
        (1..=self.runs)
            .filter_map(|r| std::fs::read(self.log_path(r)).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect::<Vec<_>>()
            .join("")
    }

    /// The audit records, parsed (unparseable lines are skipped).
    pub fn audit_records(&self) -> Vec<Value> {
        std::fs::read_to_string(self.audit_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal by name (`HUP`, `TERM`) with kill(1).
    pub fn signal(&self, sig: &str) -> bool {
        self.pid().is_some_and(|pid| {
            Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .status()
                .is_ok_and(|s| s.success())
        })
    }

    /// Kills the daemon (SIGKILL: no chance to clean up) and starts it again with the same
    /// config and state.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill();
        self.spawn()
    }

    /// Lets `group`'s members use the control socket (`[agent] control_group`), restarts
    /// the agent with it, and lets other users reach the socket in the agent's tree.
    pub fn open_to_group(&mut self, group: &str) -> Result<(), HarnessError> {
        use std::os::unix::fs::PermissionsExt;
        let text = std::fs::read_to_string(&self.config)
            .map_err(|e| HarnessError::Prepare(self.config.clone(), e))?;
        std::fs::write(
            &self.config,
            text.replacen(
                "[agent]\n",
                &format!("[agent]\ncontrol_group = \"{group}\"\n"),
                1,
            ),
        )
        .map_err(|e| HarnessError::Prepare(self.config.clone(), e))?;
        self.restart()?;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o711))
            .map_err(|e| HarnessError::Prepare(self.dir.path().to_path_buf(), e))
    }

    /// Stops the daemon with SIGTERM and waits for it; returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Waits up to `timeout` for the daemon to exit by itself (after `airlock drain
    /// --stop`); returns its exit status, or `None` while it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.child.as_mut()?.try_wait().ok().flatten();
            if let Some(s) = status {
                self.child = None;
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `airlock --config FILE ARGS...` with the host's AWS variables removed.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_env(args, &[])
    }

    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let airlock = crate::paths::bin("airlock");
        let mut cmd = Command::new(&airlock);
        cmd.arg("--config").arg(&self.config).args(args);
        for v in HOST_AWS_VARS {
            cmd.env_remove(v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        match cmd.stdin(Stdio::null()).output() {
            Ok(o) => o,
            Err(e) => panic!(
                "cannot run {}: {e} (run `cargo build --bins`)",
                airlock.display()
            ),
        }
    }

    /// Descriptors the daemon has open now (entries of `/proc/<pid>/fd`).
    pub fn open_fds(&self) -> Option<usize> {
        let pid = self.pid()?;
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()
            .map(|d| d.count())
    }

    /// `airlock run --oidc-token-file <token> -- /bin/sh -c <script>`, started and left
    /// running: stdout and stderr are piped, stdin is closed.
    pub fn spawn_run_sh(&self, oidc_token: &str, script: &str) -> Child {
        let f = self.token_file(oidc_token);
        let airlock = crate::paths::bin("airlock");
        let mut cmd = Command::new(&airlock);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("run")
            .arg("--oidc-token-file")
            .arg(&f)
            .args(["--", "/bin/sh", "-c", script]);
        for v in HOST_AWS_VARS {
            cmd.env_remove(v);
        }
        match cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot run {}: {e} (run `cargo build --bins`)",
                airlock.display()
            ),
        }
    }

    /// Writes `token` to a file in the agent's tree and returns the path.
    pub fn token_file(&self, token: &str) -> PathBuf {
        // A process-wide counter, not a directory listing: concurrent callers (tests that
        // start jobs from several threads) must never get the same file.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.path().join(format!("oidc-{n}.jwt"));
        if let Err(e) = std::fs::write(&path, token) {
            panic!("cannot write {}: {e}", path.display());
        }
        path
    }

    /// `airlock job start --oidc-token-file F`: the parsed job, or the CLI's failure.
    pub fn start_job(&self, oidc_token: &str) -> Result<Job, HarnessError> {
        let file = self.token_file(oidc_token);
        let file = file.to_string_lossy();
        self.job_start_args(&["job", "start", "--oidc-token-file", &file])
    }

    /// `airlock job start --claims-file F` (attested claims).
    pub fn start_job_claims(&self, claims: &Value) -> Result<Job, HarnessError> {
        let path = self.token_file(&claims.to_string());
        let path = path.to_string_lossy();
        self.job_start_args(&["job", "start", "--claims-file", &path])
    }

    fn job_start_args(&self, args: &[&str]) -> Result<Job, HarnessError> {
        let out = self.cli(args);
        let joined = args.join(" ");
        if !out.status.success() {
            return Err(HarnessError::Cli {
                args: joined,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| HarnessError::CliOutput(joined.clone(), e, text.clone()))?;
        Job::from_json(v).ok_or_else(|| {
            HarnessError::CliOutput(
                joined,
                serde_json::Error::io(std::io::Error::other("missing job fields")),
                text,
            )
        })
    }

    /// `airlock job end ID`.
    pub fn end_job(&self, job_id: &str) -> Output {
        self.cli(&["job", "end", job_id])
    }

    /// The session name the agent used for `job`'s credentials, from the audit log.
    pub fn session_name(&self, job_id: &str) -> Option<String> {
        self.audit_records().into_iter().find_map(|r| {
            (r["job"] == job_id && r["event"] == "credentials_issued")
                .then(|| r["session_name"].as_str().map(str::to_owned))
                .flatten()
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM first: a stopping agent with no jobs removes its cgroup parent.
        self.stop();
    }
}

fn prep_read_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

fn toml_str(s: &str) -> String {
    toml_escape(s)
}

fn toml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render_config(root: &Path, admin: SocketAddr, opts: &AgentOptions) -> String {
    if let Some(t) = &opts.config_template {
        let inner = |s: &str| {
            let q = toml_str(s);
            q[1..q.len() - 1].to_string()
        };
        return t
            .replace("{{ROOT}}", &inner(&root.to_string_lossy()))
            .replace("{{ADMIN}}", &admin.to_string())
            .replace("{{STS}}", &inner(&opts.sts_endpoint));
    }
    let p = |name: &str| toml_str(&root.join(name).to_string_lossy());
    format!(
        r#"# Written by the airlock end-to-end harness.
[agent]
state_dir = {state}
control_socket = {socket}
{agent_config}

[audit]
path = {audit}
{audit_config}

[policy]
dir = {policies}

[endpoint]
bind = "127.0.0.1"
region = "us-east-1"
{imds}
[admin]
listen = "{admin}"

[sts]
endpoint = {sts}
allow_http = true
region = "us-east-1"
timeout = "5s"
max_attempts = 2

[credentials]
source = "env"

[[issuer]]
issuer = {issuer}
audiences = [{aud}]
provider = "github"
{jwks}

{sandbox}{extra}"#,
        state = p("state"),
        socket = p("control.sock"),
        audit = match &opts.audit_path {
            Some(a) => toml_str(&a.to_string_lossy()),
            None => p("audit.jsonl"),
        },
        audit_config = opts.audit_config,
        agent_config = opts.agent_config,
        policies = p("policies"),
        sts = toml_str(&opts.sts_endpoint),
        issuer = toml_str(crate::oidc::GITHUB_ISSUER),
        aud = toml_str(crate::oidc::TEST_AUDIENCE),
        jwks = match &opts.jwks_url {
            Some(url) => format!("jwks_url = {}\nallow_http = true", toml_str(url)),
            None => format!(
                "jwks_file = {}",
                toml_str(&opts.jwks_file.to_string_lossy())
            ),
        },
        imds = opts
            .imds
            .map_or(String::new(), |on| format!("imds = {on}\n")),
        // Jobs of these tests run unsandboxed on loopback unless a test brings its own
        // [sandbox] table (Stack::sandboxed).
        sandbox = if opts.extra_config.contains("[sandbox]") {
            ""
        } else {
            "[sandbox]\nenabled = false\n\n"
        },
        extra = opts.extra_config,
    )
}

/// A minimal HTTP/1.1 GET over loopback: `(status, body)`.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let resp = raw_request(&addr.to_string(), raw.as_bytes())?;
    parse_response(&resp)
}

/// Sends `bytes` as-is to `addr` and returns everything read back until close (or 5 s).
pub fn raw_request(addr: &str, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    // No half-close after writing: hyper drops a connection whose read side ends before it
    // answers. The requests say `Connection: close`, so the server ends the exchange.
    s.write_all(bytes)?;
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => Ok(out),
        // A server that closes with unread input sends RST; what came before still counts.
        Err(_) if !out.is_empty() => Ok(out),
        Err(e) => Err(e),
    }
}

/// Status and body of a raw HTTP/1.1 response (chunked bodies are left as sent).
pub fn parse_response(resp: &[u8]) -> std::io::Result<(u16, String)> {
    let text = String::from_utf8_lossy(resp);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_renders_and_escapes() {
        let mut o = AgentOptions::new("http://127.0.0.1:1", "AKIA", "sec\"ret");
        o.extra_config = "[jobs]\nmax_lifetime = \"1h\"\n".into();
        let text = render_config(Path::new("/tmp/a b"), ([127, 0, 0, 1], 9).into(), &o);
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(v["audit"]["path"].as_str(), Some("/tmp/a b/audit.jsonl"));
        assert_eq!(v["admin"]["listen"].as_str(), Some("127.0.0.1:9"));
        assert_eq!(
            v["issuer"][0]["audiences"][0].as_str(),
            Some("airlock-test")
        );
        assert_eq!(v["jobs"]["max_lifetime"].as_str(), Some("1h"));
        // The agent's secret never goes into the config file.
        assert!(!text.contains("sec\"ret") && !text.contains("sec\\\"ret"));
    }

    #[test]
    fn job_env_splits_container_and_imds() {
        let job = Job::from_json(serde_json::json!({
            "job_id": "j1", "endpoint": "http://127.0.0.1:4000/", "token": "t",
            "token_file": "/tmp/t", "rule": "r", "grants": ["deploy"], "refused": null,
            "env": {"AWS_CONTAINER_CREDENTIALS_FULL_URI": "u", "AWS_EC2_METADATA_SERVICE_ENDPOINT": "e",
                    "AWS_REGION": "us-east-1"}
        }))
        .unwrap();
        assert_eq!(job.addr(), "127.0.0.1:4000");
        assert!(job
            .imds_env()
            .contains_key("AWS_EC2_METADATA_SERVICE_ENDPOINT"));
        assert!(!job
            .imds_env()
            .contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"));
        assert!(!job
            .container_env()
            .contains_key("AWS_EC2_METADATA_SERVICE_ENDPOINT"));
        assert_eq!(job.container_env()["AWS_REGION"], "us-east-1");
    }
}
