//! The GitLab custom executor driver (`airlock gitlab config|prepare|run|cleanup`, wired
//! into gitlab-runner by `integrations/gitlab/`; see `docs/gitlab.md`).
//!
//! - `config` prints the executor's settings: the builds and cache directories inside the
//!   job's sandbox, not shared between jobs.
//! - `prepare` starts an airlock job with the identity of the GitLab job's `id_tokens:` JWT,
//!   read from `$JOB_RESPONSE_FILE` (the job payload gitlab-runner received from GitLab),
//!   never from the job-controlled `CUSTOM_ENV_*` variables; runs `true` in the job's new
//!   sandbox to check that it works; and records the airlock job for the later stages.
//! - `run <script> <stage>` runs the stage's script (the host file gitlab-runner wrote,
//!   piped to the shell's stdin) in that job's sandbox with `airlock job exec`: every stage
//!   of one GitLab job shares the sandbox's files, network and credentials.
//! - `cleanup` ends the airlock job, which wipes its sandbox. A job already gone is fine.
//!
//! Which airlock job belongs to a GitLab job: the record `<state dir>/<key>.json`, where
//! the key is the payload's own job `id` and a fingerprint of the payload's job `token`.
//! Both come from GitLab through gitlab-runner; a job can set `CI_JOB_ID` and friends in
//! `CUSTOM_ENV_*` but not in the payload's top-level fields, so a job cannot make its stages
//! run in another job's sandbox. The token fingerprint keeps two GitLab instances' equal job
//! ids apart.
//!
//! Exit codes: a script that fails exits with `$BUILD_FAILURE_EXIT_CODE`; anything else that
//! goes wrong (agent down, token or policy refusal, sandbox failure) with
//! `$SYSTEM_FAILURE_EXIT_CODE`, with a message on stderr that gitlab-runner shows in the
//! job's log.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::control::{Client, ControlError, JobCommand, StartRequest};
use crate::secret::Secret;

/// The id token variable read when none is configured.
pub const DEFAULT_ID_TOKEN_VARIABLE: &str = "AIRLOCK_ID_TOKEN";
/// Largest job payload and stage script read.
const MAX_RESPONSE: u64 = 16 << 20;
const MAX_SCRIPT: u64 = 64 << 20;
/// Added to GitLab's job timeout for the airlock job's lifetime (the stages around the
/// script, artifacts upload).
const LIFETIME_MARGIN_SECS: u64 = 15 * 60;

/// A failed stage: the code to exit with and what the pipeline author is told.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

/// The exit codes gitlab-runner asks for.
#[derive(Debug, Clone, Copy)]
pub struct Exits {
    pub build: i32,
    pub system: i32,
}

impl Exits {
    /// From `BUILD_FAILURE_EXIT_CODE` and `SYSTEM_FAILURE_EXIT_CODE`.
    pub fn from_env() -> Result<Exits, String> {
        let get = |name: &str| -> Result<i32, String> {
            let v = std::env::var(name).map_err(|_| {
                format!("{name} is not set: `airlock gitlab` is run by gitlab-runner's custom executor (see docs/gitlab.md)")
            })?;
            v.trim()
                .parse::<i32>()
                .ok()
                .filter(|c| (1..=255).contains(c))
                .ok_or_else(|| format!("{name}={v:?} is not an exit code from 1 to 255"))
        };
        Ok(Exits {
            build: get("BUILD_FAILURE_EXIT_CODE")?,
            system: get("SYSTEM_FAILURE_EXIT_CODE")?,
        })
    }

    fn system(&self, message: impl Into<String>) -> Failure {
        Failure {
            code: self.system,
            message: message.into(),
        }
    }
}

/// What the driver is told, stage by stage.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `id_tokens:` name whose JWT is the job's identity.
    pub id_token_variable: String,
    /// Where each GitLab job's airlock job is recorded (root-only).
    pub state_dir: PathBuf,
    /// Runner name shown in the audit log (with the GitLab job id).
    pub runner: String,
    /// Run jobs that the policy grants nothing (they get no credentials) instead of failing
    /// them.
    pub allow_refused: bool,
    /// The shell that reads each stage's script on stdin.
    pub shell: String,
}

#[derive(Deserialize)]
struct RawVariable {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize, Default)]
struct RawRunnerInfo {
    #[serde(default)]
    timeout: Option<u64>,
}

#[derive(Deserialize, Default)]
struct RawJobInfo {
    #[serde(default)]
    project_id: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawResponse {
    id: u64,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    variables: Vec<RawVariable>,
    #[serde(default)]
    runner_info: RawRunnerInfo,
    #[serde(default)]
    job_info: RawJobInfo,
}

/// The parts of GitLab's job payload (`$JOB_RESPONSE_FILE`) the driver trusts.
pub struct JobResponse {
    pub id: u64,
    token: Option<Secret<String>>,
    variables: Vec<(String, Secret<String>)>,
    pub timeout_secs: Option<u64>,
    pub project_id: Option<String>,
}

impl std::fmt::Debug for JobResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobResponse")
            .field("id", &self.id)
            .field("variables", &self.variables.len())
            .finish_non_exhaustive()
    }
}

fn text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl JobResponse {
    pub fn parse(data: &[u8]) -> Result<JobResponse, String> {
        // serde's messages name the field and position, never a value.
        let raw: RawResponse =
            serde_json::from_slice(data).map_err(|e| format!("not a GitLab job payload: {e}"))?;
        Ok(JobResponse {
            id: raw.id,
            token: raw.token.filter(|t| !t.is_empty()).map(Secret::new),
            variables: raw
                .variables
                .into_iter()
                .map(|v| (v.key, Secret::new(v.value)))
                .collect(),
            timeout_secs: raw.runner_info.timeout,
            project_id: raw.job_info.project_id.as_ref().and_then(text),
        })
    }

    /// `$JOB_RESPONSE_FILE`.
    pub fn from_env() -> Result<JobResponse, String> {
        let path = std::env::var_os("JOB_RESPONSE_FILE").ok_or(
            "JOB_RESPONSE_FILE is not set: gitlab-runner 13.7 or newer sets it for the custom executor",
        )?;
        Self::load(Path::new(&path))
    }

    pub fn load(path: &Path) -> Result<JobResponse, String> {
        use std::io::Read;
        let f = std::fs::File::open(path)
            .map_err(|e| format!("cannot read the job payload {}: {e}", path.display()))?;
        let mut data = Vec::new();
        f.take(MAX_RESPONSE + 1)
            .read_to_end(&mut data)
            .map_err(|e| format!("cannot read the job payload {}: {e}", path.display()))?;
        if data.len() as u64 > MAX_RESPONSE {
            return Err(format!(
                "the job payload {} is larger than {} MiB",
                path.display(),
                MAX_RESPONSE >> 20
            ));
        }
        Self::parse(&data).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The value of the variable `key`; an error when the payload holds it more than once.
    pub fn variable(&self, key: &str) -> Result<Option<&Secret<String>>, String> {
        let mut found = self.variables.iter().filter(|(k, _)| k == key);
        let first = found.next().map(|(_, v)| v);
        if found.next().is_some() {
            return Err(format!(
                "the job defines the variable {key} more than once; airlock will not guess which is the id token"
            ));
        }
        Ok(first.filter(|v| !v.expose().is_empty()))
    }

    /// The job's key in the state directory: the payload's job id and a fingerprint of its
    /// job token.
    pub fn state_key(&self) -> String {
        use sha2::Digest;
        match &self.token {
            Some(t) => {
                let h = sha2::Sha256::new_with_prefix(b"airlock-gitlab\0")
                    .chain_update(t.expose().as_bytes())
                    .finalize();
                format!("{}-{}", self.id, &hex::encode(h)[..16])
            }
            None => self.id.to_string(),
        }
    }
}

/// The id token's `job_id` (and `project_id`, when both are known) must name this very
/// job: a token minted for another job (leaked, or handed in through a variable) is not
/// accepted here. The claims are read unverified; the agent verifies the same bytes' signature.
pub fn check_token_binding(var: &str, token: &str, job: &JobResponse) -> Result<(), String> {
    use base64::Engine;
    let payload = token
        .trim()
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p.trim_end_matches('='))
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&b).ok())
        .ok_or_else(|| format!("the id token {var} is not a JWT"))?;
    let job_id = payload.get("job_id").and_then(text);
    if job_id.as_deref() != Some(job.id.to_string().as_str()) {
        return Err(format!(
            "the id token {var} was not issued for this job: its job_id claim is {}, this job is {}",
            job_id.as_deref().unwrap_or("missing"),
            job.id
        ));
    }
    if let (Some(claim), Some(ours)) = (payload.get("project_id").and_then(text), &job.project_id) {
        if &claim != ours {
            return Err(format!(
                "the id token {var} was not issued for this project: its project_id claim is {claim}, this job's project is {ours}"
            ));
        }
    }
    Ok(())
}

/// `config_exec`'s answer.
pub fn config_json(builds_dir: &str, cache_dir: &str) -> serde_json::Value {
    serde_json::json!({
        "driver": {"name": "airlock", "version": env!("CARGO_PKG_VERSION")},
        "builds_dir": builds_dir,
        "cache_dir": cache_dir,
        "builds_dir_is_shared": false,
        "hostname": "airlock-job",
    })
}

/// The record of which airlock job runs which GitLab job.
#[derive(Debug)]
pub struct State {
    dir: PathBuf,
}

#[derive(serde::Serialize, Deserialize)]
struct StateRecord {
    airlock_job: String,
    gitlab_job: u64,
}

impl State {
    pub fn new(dir: PathBuf) -> State {
        State { dir }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    pub fn save(&self, key: &str, gitlab_job: u64, airlock_job: &str) -> Result<(), String> {
        use std::io::Write;
        let err =
            |e: std::io::Error| format!("cannot record the job in {}: {e}", self.dir.display());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(err)?;
        let data = serde_json::to_vec(&StateRecord {
            airlock_job: airlock_job.to_string(),
            gitlab_job,
        })
        .map_err(|e| e.to_string())?;
        let tmp = self.dir.join(format!(".{key}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(&data)
            .and_then(|()| f.sync_all())
            .map_err(err)?;
        std::fs::rename(&tmp, self.path(key)).map_err(err)
    }

    /// The airlock job of `key`, if one is recorded.
    pub fn load(&self, key: &str) -> Result<Option<String>, String> {
        let path = self.path(key);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let rec: StateRecord = serde_json::from_slice(&data)
            .map_err(|e| format!("{} is damaged: {e}", path.display()))?;
        if !crate::jobs::valid_job_id(&rec.airlock_job) {
            return Err(format!("{} does not name an airlock job", path.display()));
        }
        Ok(Some(rec.airlock_job))
    }

    pub fn remove(&self, key: &str) {
        let _ = std::fs::remove_file(self.path(key));
    }
}

fn agent_error(e: &ControlError) -> String {
    match e {
        ControlError::Connect(..) => format!("{e}"),
        ControlError::Refused { message, .. } => format!("airlockd refused: {message}"),
        _ => format!("talking to airlockd failed: {e}"),
    }
}

/// The variables of the driver's own environment a stage may pass on (the agent keeps only
/// its `[sandbox] pass_env` ones): never the job-controlled `CUSTOM_ENV_*`, nor the
/// runner's own.
fn passed_env() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| {
            !k.starts_with("CUSTOM_ENV_")
                && !matches!(
                    k.as_str(),
                    "JOB_RESPONSE_FILE" | "BUILD_FAILURE_EXIT_CODE" | "SYSTEM_FAILURE_EXIT_CODE"
                )
        })
        .collect()
}

/// `prepare_exec`.
pub async fn prepare(
    client: &Client,
    exits: Exits,
    job: &JobResponse,
    opts: &Options,
) -> Result<i32, Failure> {
    let var = &opts.id_token_variable;
    let token = job
        .variable(var)
        .map_err(|e| exits.system(e))?
        .ok_or_else(|| {
            exits.system(format!(
                "GitLab job {} has no id token {var}: add to the job in .gitlab-ci.yml\n  id_tokens:\n    {var}:\n      aud: airlock   # or another audience of airlock's [[issuer]] for your GitLab",
                job.id
            ))
        })?;
    check_token_binding(var, token.expose(), job).map_err(|e| exits.system(e))?;
    let state = State::new(opts.state_dir.clone());
    let key = job.state_key();
    // A prepare that runs again for the same job (a retry) replaces the first one's job.
    if let Ok(Some(old)) = state.load(&key) {
        let _ = client.end(&old).await;
        state.remove(&key);
    }
    // A gitlab-runner that is not root is in the agent's control group: its jobs belong to
    // its own process (the stages' common ancestor), as the control socket requires.
    let owner_pid = if nix::unistd::geteuid().is_root() {
        None
    } else {
        let runner = crate::procs::Procs::default()
            .nearest_named(std::process::id() as i32, "gitlab-runner")
            .ok_or_else(|| {
                exits.system("no gitlab-runner process above this driver: `airlock gitlab` is run by gitlab-runner's custom executor (docs/gitlab.md)")
            })?;
        Some(runner.pid)
    };
    let started = client
        .start(&StartRequest {
            oidc_token: Some(Secret::new(token.expose().trim().to_string())),
            runner: Some(format!("{} gitlab-job {}", opts.runner, job.id)),
            max_lifetime_secs: job.timeout_secs.map(|t| t + LIFETIME_MARGIN_SECS),
            owner_pid,
            ..Default::default()
        })
        .await
        .map_err(|e| match &e {
            ControlError::Refused { code, message, .. } if code == "InvalidIdentityToken" => {
                exits.system(format!("the job's id token {var} was refused: {message}"))
            }
            _ => exits.system(format!("cannot start the job: {}", agent_error(&e))),
        })?;
    let id = started.job_id.clone();
    let abandon = |why: String| async move {
        let _ = client.end(&id).await;
        exits.system(why)
    };
    if let Some(why) = &started.refused {
        if !opts.allow_refused {
            return Err(abandon(format!("policy refused this job: {why}")).await);
        }
        eprintln!("airlock: this job gets no credentials: {why}");
    }
    // The sandbox must work before any script is handed to it.
    let probe = JobCommand {
        argv: vec!["true".into()],
        env: BTreeMap::new(),
    };
    let checked = match client.exec(&started.job_id, &probe).await {
        Ok(x) => crate::shim_run::run(
            client,
            &started.job_id,
            &x.sandbox,
            crate::shim_run::Input::Bytes(Vec::new()),
        )
        .await
        .map_err(|e| e.to_string())
        .and_then(|st| match st.code {
            0 => Ok(()),
            c => Err(format!(
                "the sandbox check exited with {c} (the message above says why)"
            )),
        }),
        Err(ControlError::Refused { code, message, .. }) if code == "NoSandbox" => Err(format!(
            "{message}; the GitLab driver runs every job in a sandbox ([sandbox] enabled = true)"
        )),
        Err(e) => Err(agent_error(&e)),
    };
    if let Err(why) = checked {
        return Err(abandon(format!("the job's sandbox does not work: {why}")).await);
    }
    if let Err(e) = state.save(&key, job.id, &started.job_id) {
        return Err(abandon(e).await);
    }
    println!(
        "airlock: GitLab job {} runs as airlock job {}: {}; rule {}; roles {}",
        job.id,
        started.job_id,
        started.identity.as_deref().unwrap_or("-"),
        started.rule.as_deref().unwrap_or("-"),
        if started.grants.is_empty() {
            "-".to_string()
        } else {
            started.grants.join(", ")
        }
    );
    Ok(0)
}

/// The airlock job prepare recorded for `job`.
fn recorded_job(exits: Exits, job: &JobResponse, opts: &Options) -> Result<String, Failure> {
    State::new(opts.state_dir.clone())
        .load(&job.state_key())
        .map_err(|e| exits.system(e))?
        .ok_or_else(|| {
            exits.system(format!(
                "no airlock job is recorded for GitLab job {} (did prepare_exec run and succeed?)",
                job.id
            ))
        })
}

/// `run_exec <script> <stage>`.
pub async fn run(
    client: &Client,
    exits: Exits,
    job: &JobResponse,
    opts: &Options,
    script: &Path,
    stage: &str,
) -> Result<i32, Failure> {
    use std::io::Read;
    let airlock_job = recorded_job(exits, job, opts)?;
    let mut data = Vec::new();
    std::fs::File::open(script)
        .and_then(|f| f.take(MAX_SCRIPT + 1).read_to_end(&mut data))
        .map_err(|e| {
            exits.system(format!(
                "cannot read the script of stage {stage} ({}): {e}",
                script.display()
            ))
        })?;
    if data.len() as u64 > MAX_SCRIPT {
        return Err(exits.system(format!(
            "the script of stage {stage} is larger than {} MiB",
            MAX_SCRIPT >> 20
        )));
    }
    let x = client
        .exec(
            &airlock_job,
            &JobCommand {
                argv: vec![opts.shell.clone()],
                env: passed_env(),
            },
        )
        .await
        .map_err(|e| match &e {
            ControlError::Refused { status: 404, .. } => exits.system(format!(
                "airlock job {airlock_job} has ended (its lifetime ran out, or it was ended): stage {stage} cannot run"
            )),
            _ => exits.system(format!("cannot run stage {stage}: {}", agent_error(&e))),
        })?;
    let status = crate::shim_run::run(
        client,
        &airlock_job,
        &x.sandbox,
        crate::shim_run::Input::Bytes(data),
    )
    .await
    .map_err(|e| exits.system(format!("cannot run stage {stage}: {e}")))?;
    match status {
        s if s.setup_failed => Err(exits.system(format!(
            "the sandbox for stage {stage} could not be built (the message above says why)"
        ))),
        s if s.code == 0 => Ok(0),
        s => Err(Failure {
            code: exits.build,
            message: format!("stage {stage}: the script exited with {}", s.code),
        }),
    }
}

/// `cleanup_exec`: ends the job (the agent wipes its sandbox). A job that is already gone,
/// or that prepare never started, is not an error.
pub async fn cleanup(
    client: &Client,
    exits: Exits,
    job: &JobResponse,
    opts: &Options,
) -> Result<i32, Failure> {
    let state = State::new(opts.state_dir.clone());
    let key = job.state_key();
    let Some(airlock_job) = state.load(&key).map_err(|e| exits.system(e))? else {
        println!(
            "airlock: no airlock job for GitLab job {}: nothing to clean up",
            job.id
        );
        return Ok(0);
    };
    match client.end(&airlock_job).await {
        Ok(_) => println!("airlock: job {airlock_job} ended; its sandbox is wiped"),
        Err(ControlError::Refused { status: 404, .. }) => {
            println!("airlock: job {airlock_job} had already ended")
        }
        Err(e) => {
            return Err(exits.system(format!(
                "cannot end airlock job {airlock_job}: {} (the agent ends it when its lifetime runs out)",
                agent_error(&e)
            )))
        }
    }
    state.remove(&key);
    Ok(0)
}

/// `airlock gitlab`'s options, shared by the stages that talk to the agent.
#[derive(Debug, clap::Args)]
pub struct StageArgs {
    /// The `id_tokens:` name whose JWT is the job's identity.
    #[arg(long, default_value = DEFAULT_ID_TOKEN_VARIABLE)]
    id_token_variable: String,
    /// Where each GitLab job's airlock job is recorded (default: `gitlab` beside the
    /// control socket, a directory jobs never see).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Runner name for the audit log (the GitLab job id is added).
    #[arg(long, default_value = "gitlab")]
    runner: String,
    /// Run jobs that the policy grants nothing, without credentials, instead of failing
    /// them.
    #[arg(long)]
    allow_refused: bool,
    /// The shell that reads each stage's script on stdin.
    #[arg(long, default_value = "bash")]
    shell: String,
}

#[derive(Debug, clap::Subcommand)]
pub enum GitlabCmd {
    /// config_exec: print the executor's settings as JSON.
    Config {
        /// The builds directory inside the job's sandbox.
        #[arg(long, default_value = "/home/job/work/builds")]
        builds_dir: String,
        /// The cache directory inside the job's sandbox.
        #[arg(long, default_value = "/home/job/work/cache")]
        cache_dir: String,
    },
    /// prepare_exec: start the job and its sandbox with the identity of its id token
    /// (from $JOB_RESPONSE_FILE).
    Prepare {
        #[command(flatten)]
        args: StageArgs,
    },
    /// run_exec: run a stage's script in the job's sandbox.
    Run {
        #[command(flatten)]
        args: StageArgs,
        /// The script gitlab-runner wrote for the stage.
        script: PathBuf,
        /// The stage's name.
        stage: String,
    },
    /// cleanup_exec: end the job; its sandbox is wiped.
    Cleanup {
        #[command(flatten)]
        args: StageArgs,
    },
}

/// The control socket: given, or the configuration's (the defaults when the default file
/// does not exist).
fn socket_path(socket: Option<PathBuf>, config: &Path) -> Result<PathBuf, String> {
    if let Some(s) = socket {
        return Ok(s);
    }
    let cfg = if !config.exists() && config == Path::new(crate::config::DEFAULT_PATH) {
        crate::config::Config::parse(config, "")
    } else {
        crate::config::Config::load(config)
    };
    cfg.map(|c| c.agent.control_socket)
        .map_err(|e| e.to_string())
}

enum Stage {
    Prepare,
    Run(PathBuf, String),
    Cleanup,
}

/// Runs one stage; messages go to stderr (gitlab-runner shows them in the job's log).
pub async fn run_cli(cmd: GitlabCmd, socket: Option<PathBuf>, config: &Path) -> i32 {
    let (args, stage) = match cmd {
        GitlabCmd::Config {
            builds_dir,
            cache_dir,
        } => {
            println!("{}", config_json(&builds_dir, &cache_dir));
            return 0;
        }
        GitlabCmd::Prepare { args } => (args, Stage::Prepare),
        GitlabCmd::Run {
            args,
            script,
            stage,
        } => (args, Stage::Run(script, stage)),
        GitlabCmd::Cleanup { args } => (args, Stage::Cleanup),
    };
    let exits = match Exits::from_env() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("airlock: {e}");
            return crate::exit::USAGE;
        }
    };
    let setup = socket_path(socket, config).and_then(|sock| {
        let job = JobResponse::from_env()?;
        Ok((sock, job))
    });
    let (sock, job) = match setup {
        Ok(v) => v,
        Err(e) => {
            eprintln!("airlock: {e}");
            return exits.system;
        }
    };
    let opts = Options {
        id_token_variable: args.id_token_variable,
        state_dir: args.state_dir.unwrap_or_else(|| {
            sock.parent()
                .unwrap_or(Path::new("/run/airlock"))
                .join("gitlab")
        }),
        runner: args.runner,
        allow_refused: args.allow_refused,
        shell: args.shell,
    };
    let client = Client::new(sock);
    let done = match stage {
        Stage::Prepare => prepare(&client, exits, &job, &opts).await,
        Stage::Run(script, stage) => run(&client, exits, &job, &opts, &script, &stage).await,
        Stage::Cleanup => cleanup(&client, exits, &job, &opts).await,
    };
    match done {
        Ok(code) => code,
        Err(f) => {
            eprintln!("airlock: {}", f.message);
            f.code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn jwt(claims: serde_json::Value) -> String {
        let b = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.c2ln",
            b(br#"{"alg":"RS256","kid":"k"}"#),
            b(claims.to_string().as_bytes())
        )
    }

    fn payload(vars: serde_json::Value) -> JobResponse {
        JobResponse::parse(
            serde_json::json!({
                "id": 302, "token": "glcbt-secret", "variables": vars,
                "runner_info": {"timeout": 3600}, "job_info": {"project_id": 22, "name": "x"},
                "steps": [], "unknown_field": true
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn the_payload_gives_the_token_variable_and_refuses_duplicates() {
        let p = payload(serde_json::json!([
            {"key": "AIRLOCK_ID_TOKEN", "value": "a.b.c", "public": false, "masked": true},
            {"key": "CI_JOB_ID", "value": "302", "public": true, "masked": false},
        ]));
        assert_eq!(
            p.variable("AIRLOCK_ID_TOKEN").unwrap().unwrap().expose(),
            "a.b.c"
        );
        assert!(p.variable("OTHER").unwrap().is_none());
        assert_eq!(p.timeout_secs, Some(3600));
        assert_eq!(p.project_id.as_deref(), Some("22"));
        let dup = payload(serde_json::json!([
            {"key": "T", "value": "a"}, {"key": "T", "value": "b"}
        ]));
        assert!(dup.variable("T").unwrap_err().contains("more than once"));
        assert!(!format!("{p:?}").contains("a.b.c"));
        assert!(!format!("{p:?}").contains("glcbt"));
    }

    #[test]
    fn the_state_key_is_the_payload_id_and_a_token_fingerprint() {
        let p = payload(serde_json::json!([]));
        let k = p.state_key();
        assert!(k.starts_with("302-"), "{k}");
        assert_eq!(k.len(), "302-".len() + 16);
        assert!(!k.contains("glcbt"));
        let mut other = payload(serde_json::json!([]));
        other.token = Some(Secret::new("another".into()));
        assert_ne!(other.state_key(), k);
    }

    #[test]
    fn a_token_for_another_job_or_project_is_refused() {
        let p = payload(serde_json::json!([]));
        check_token_binding(
            "T",
            &jwt(serde_json::json!({"job_id": "302", "project_id": "22"})),
            &p,
        )
        .unwrap();
        check_token_binding("T", &jwt(serde_json::json!({"job_id": 302})), &p).unwrap();
        let e =
            check_token_binding("T", &jwt(serde_json::json!({"job_id": "301"})), &p).unwrap_err();
        assert!(e.contains("job_id claim is 301"), "{e}");
        let e = check_token_binding(
            "T",
            &jwt(serde_json::json!({"job_id": "302", "project_id": "23"})),
            &p,
        )
        .unwrap_err();
        assert!(e.contains("project_id claim is 23"), "{e}");
        let e = check_token_binding("T", "not-a-jwt", &p).unwrap_err();
        assert!(e.contains("not a JWT"), "{e}");
        let e = check_token_binding("T", &jwt(serde_json::json!({})), &p).unwrap_err();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn the_state_round_trips_and_refuses_damage() {
        let d = tempfile::tempdir().unwrap();
        let s = State::new(d.path().join("gitlab"));
        assert_eq!(s.load("k").unwrap(), None);
        let id = crate::jobs::new_job_id();
        s.save("k", 302, &id).unwrap();
        assert_eq!(s.load("k").unwrap(), Some(id));
        std::fs::write(
            d.path().join("gitlab/k.json"),
            r#"{"airlock_job":"../x","gitlab_job":1}"#,
        )
        .unwrap();
        assert!(s.load("k").unwrap_err().contains("does not name"));
        s.remove("k");
        assert_eq!(s.load("k").unwrap(), None);
    }

    #[test]
    fn config_names_the_sandbox_dirs_and_is_not_shared() {
        let v = config_json("/home/job/work/builds", "/home/job/work/cache");
        assert_eq!(v["builds_dir_is_shared"], false);
        assert_eq!(v["builds_dir"], "/home/job/work/builds");
        assert_eq!(v["driver"]["name"], "airlock");
    }
}
