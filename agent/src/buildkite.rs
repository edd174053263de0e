//! Buildkite: the agent hooks (`airlock buildkite environment|command|pre-exit`, sourced
//! by the Buildkite agent from `integrations/buildkite/hooks/`) and the organisation-pin
//! check the daemon applies to every Buildkite identity. See `docs/buildkite.md`.
//!
//! The Buildkite agent runs as its own user, not root: the hooks reach airlockd through
//! its control socket (the agent's user is in `[agent] control_group`), and airlockd itself
//! starts each step's sandbox. A step's `env:` reaches every hook, so nothing here takes a
//! program, a socket or a configuration from a variable: `buildkite-agent` and `tar` are run
//! by absolute path with an environment of our own making, and the socket comes from the
//! hook's flags or the agent's configuration file.
//!
//! - `environment` checks, before anything of the job runs, that the hooks can work: the
//!   agent's control socket answers and `buildkite-agent` is there.
//! - `command` replaces Buildkite's command phase: it asks airlockd which audiences it
//!   trusts for the Buildkite issuer (`GET /v1/issuers`; `--audience`, when given, must be
//!   one of them), then `buildkite-agent oidc request-token --audience <that audience>`
//!   for the job's OIDC token (read from its stdout,
//!   held in memory and handed to the agent over the control socket only: never on a
//!   command line, in a file or in the job's environment), starts an airlock job with it
//!   that belongs to this Buildkite job's bootstrap process (the nearest ancestor named
//!   `buildkite-agent`), streams this job's checkout into the sandbox (read by the hook
//!   with the agent user's own permissions, so the build path can stay private), runs
//!   `BUILDKITE_COMMAND` with `bash -e -c` (Buildkite's default shell) inside the job's
//!   sandbox, ends the job and exits with the command's status. A refused job fails the
//!   step before the command runs.
//! - `pre-exit` ends the airlock jobs of this Buildkite job's bootstrap if any is still
//!   running (a cancelled or killed command hook); airlockd also ends a job whose bootstrap
//!   has exited. No state file: the agent knows whose job is whose.
//!
//! Every Buildkite organisation shares the issuer `https://agent.buildkite.com`, so a rule
//! that does not pin the organisation would hand its grants to any organisation's
//! pipeline. The policies' decision itself refuses a Buildkite identity such a rule
//! decides (`policy::decide`), so every path — start, bind, recovery, `airlock policy
//! explain` — applies it and no runner integration or job can get around it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control::{Client, ControlError, JobCommand, StartRequest};
use crate::exit;
use crate::secret::Secret;

/// The audience asked for when airlockd trusts it (see [`crate::audience::choose`]).
pub use crate::audience::DEFAULT_AUDIENCE;
/// The issuer every Buildkite organisation shares.
pub const BUILDKITE_ISSUER: &str = "https://agent.buildkite.com";
/// The flag of a decision refused because its rule does not pin the organisation.
pub use crate::policy::decide::FLAG_ORG_NOT_PINNED;
/// Largest token accepted from `buildkite-agent` (the agent's own limit is 8 KiB too).
const MAX_TOKEN: usize = 8 * 1024;
/// Added to the step's `BUILDKITE_TIMEOUT` for the airlock job's lifetime.
const LIFETIME_MARGIN_SECS: u64 = 10 * 60;
/// Where Buildkite's packages install the agent.
pub const DEFAULT_BUILDKITE_AGENT: &str = "/usr/bin/buildkite-agent";
/// The name of the Buildkite agent's per-job bootstrap process (and of the agent).
pub const BOOTSTRAP_NAME: &str = "buildkite-agent";
/// The archiver that streams the checkout into the sandbox (GNU tar, in `/bin` on every
/// distribution, merged `/usr` or not).
const TAR: &str = "/bin/tar";
/// What `buildkite-agent oidc request-token` needs of the job's environment (its session
/// token, endpoint and job); with the host's proxy settings, nothing else of it.
const AGENT_ENV: &[&str] = &[
    "BUILDKITE_AGENT_ACCESS_TOKEN",
    "BUILDKITE_AGENT_ENDPOINT",
    "BUILDKITE_JOB_ID",
    "BUILDKITE_AGENT_DEBUG",
];

// ---------------------------------------------------------------------------------------
// Agent side: the organisation pin
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Hooks
// ---------------------------------------------------------------------------------------

/// The hook's environment (a snapshot: tests hand in their own).
pub type Env = BTreeMap<String, String>;

fn var<'a>(env: &'a Env, k: &str) -> Option<&'a str> {
    env.get(k).map(String::as_str).filter(|v| !v.is_empty())
}

/// A hook's failure: its exit code and what the pipeline author reads in the job's log.
/// Never holds a token.
#[derive(Debug)]
pub struct HookError {
    pub code: i32,
    pub message: String,
}

fn fail(code: i32, message: impl Into<String>) -> HookError {
    HookError {
        code,
        message: message.into(),
    }
}

/// The hooks' settings: flags in the hook scripts, which the operator owns. Never read
/// from the job's environment, which the pipeline sets (`env:` of a step).
#[derive(Debug, Clone, clap::Args)]
pub struct HookArgs {
    /// Audience of the job's OIDC token; it must be one of the Buildkite issuer's
    /// `audiences` in airlockd's configuration. Default: asked of airlockd ("airlock" when
    /// it trusts that, else the first audience it lists).
    #[arg(long)]
    pub audience: Option<String>,
    /// Lifetime asked for the OIDC token, in seconds (`--lifetime` of
    /// `buildkite-agent oidc request-token`); 0: Buildkite's default.
    #[arg(long, default_value_t = 0)]
    pub token_lifetime: u64,
    /// The `buildkite-agent` binary: an absolute path (a name looked up in `PATH` is
    /// refused: a step's `env:` sets the hooks' `PATH`).
    #[arg(long, default_value = DEFAULT_BUILDKITE_AGENT)]
    pub buildkite_agent: PathBuf,
    /// Run steps that the policy grants nothing without AWS credentials instead of
    /// failing them (never a step refused for an unpinned organisation).
    #[arg(long)]
    pub allow_refused: bool,
    /// Copy the job's checkout (`BUILDKITE_BUILD_CHECKOUT_PATH`) into the sandbox's
    /// workspace before the command runs (the host's files are read-only in the sandbox).
    #[arg(long, default_value = "copy", value_parser = ["copy", "none"])]
    pub checkout: String,
}

/// `BUILDKITE_JOB_ID`, for messages: a step's `env:` could set it, so it never names
/// anything the hooks act on; the job's verified token does.
fn buildkite_job(env: &Env) -> Result<&str, HookError> {
    let id = var(env, "BUILDKITE_JOB_ID").ok_or_else(|| {
        fail(
            exit::USAGE,
            "airlock: BUILDKITE_JOB_ID is not set: the airlock hooks are run by the Buildkite agent (see docs/buildkite.md)",
        )
    })?;
    if id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(fail(
            exit::DATAERR,
            format!("airlock: BUILDKITE_JOB_ID {id:?} is not a Buildkite job id"),
        ));
    }
    Ok(id)
}

/// The `buildkite-agent` binary, refused unless it is an absolute path to a file.
fn agent_program(args: &HookArgs) -> Result<&Path, HookError> {
    let p = args.buildkite_agent.as_path();
    if !p.is_absolute() {
        return Err(fail(
            exit::CONFIG,
            format!(
                "airlock: --buildkite-agent {:?} is not an absolute path: a pipeline sets the hooks' PATH, so the hooks never look a program up in it (give /usr/bin/buildkite-agent or where yours is)",
                p.display()
            ),
        ));
    }
    if !p.is_file() {
        return Err(fail(
            exit::UNAVAILABLE,
            format!(
                "airlock: {} not found: the command hook needs it for the job's OIDC token (--buildkite-agent)",
                p.display()
            ),
        ));
    }
    Ok(p)
}

/// This Buildkite job's bootstrap process: the nearest of the hook's ancestors named
/// `buildkite-agent`. The airlock job belongs to it.
fn bootstrap() -> Result<crate::procs::ProcStat, HookError> {
    crate::procs::Procs::default()
        .nearest_named(std::process::id() as i32, BOOTSTRAP_NAME)
        .ok_or_else(|| {
            fail(
                exit::USAGE,
                "airlock: no buildkite-agent process above this hook: the airlock hooks are run by the Buildkite agent's bootstrap (see docs/buildkite.md)",
            )
        })
}

fn agent_error(e: &ControlError) -> String {
    match e {
        ControlError::Connect(p, err) => format!(
            "cannot reach airlockd at {} ({err}): is airlockd running, and does the Buildkite agent run as root or in its control_group?",
            p.display()
        ),
        ControlError::Refused { message, .. } => format!("airlockd refused: {message}"),
        other => format!("talking to airlockd failed: {other}"),
    }
}

/// What the job is, from Buildkite's variables, for messages.
fn describe(env: &Env) -> String {
    format!(
        "{}/{} build {} job {}",
        var(env, "BUILDKITE_ORGANIZATION_SLUG").unwrap_or("?"),
        var(env, "BUILDKITE_PIPELINE_SLUG").unwrap_or("?"),
        var(env, "BUILDKITE_BUILD_NUMBER").unwrap_or("?"),
        var(env, "BUILDKITE_JOB_ID").unwrap_or("?")
    )
}

/// The audience to request: `--audience` if airlockd trusts it for the Buildkite issuer,
/// else the one airlockd prefers. Refused, with what to change, when there is none.
pub async fn audience(client: &Client, args: &HookArgs) -> Result<String, HookError> {
    let answer = client
        .issuers()
        .await
        .map_err(|e| fail(exit::UNAVAILABLE, format!("airlock: {}", agent_error(&e))))?;
    let wanted = args
        .audience
        .as_deref()
        .map(|a| (a, "--audience in the airlock buildkite hook"));
    crate::audience::choose(&answer, crate::identity::Provider::Buildkite, wanted)
        .map_err(|e| fail(exit::CONFIG, format!("airlock: {e}")))
}

/// The job's OIDC token from `buildkite-agent oidc request-token --audience A`
/// (its stdout; its stderr goes to the job's log).
pub async fn request_oidc_token(
    env: &Env,
    args: &HookArgs,
    audience: &str,
) -> Result<Secret<String>, HookError> {
    let program = agent_program(args)?;
    let pass: Vec<&str> = AGENT_ENV
        .iter()
        .chain(crate::childenv::PROXY)
        .copied()
        .collect();
    let mut cmd = crate::childenv::command(program, &pass, |k| var(env, k).map(String::from))
        .map_err(|e| fail(exit::CONFIG, format!("airlock: --buildkite-agent {e}")))?;
    cmd.args(["oidc", "request-token", "--audience", audience]);
    if args.token_lifetime > 0 {
        cmd.args(["--lifetime", &args.token_lifetime.to_string()]);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .map_err(|_| {
            fail(
                exit::UNAVAILABLE,
                "airlock: `buildkite-agent oidc request-token` took longer than 60 s",
            )
        })?
        .map_err(|e| {
            fail(
                exit::UNAVAILABLE,
                format!(
                    "airlock: cannot run {} ({e}): is the Buildkite agent installed (--buildkite-agent)?",
                    program.display()
                ),
            )
        })?;
    // The token never reaches a message: only the status and the size are shown.
    let stdout = Secret::new(out.stdout);
    if !out.status.success() {
        return Err(fail(
            exit::UNAVAILABLE,
            format!(
                "airlock: `buildkite-agent oidc request-token --audience {}` failed ({}) for {}: see its message above",
                audience,
                out.status,
                describe(env)
            ),
        ));
    }
    let text = std::str::from_utf8(stdout.expose()).map_err(|_| {
        fail(
            exit::DATAERR,
            "airlock: `buildkite-agent oidc request-token` printed something that is not text",
        )
    })?;
    let token = text.trim();
    if token.is_empty() || token.len() > MAX_TOKEN || token.contains(char::is_whitespace) {
        return Err(fail(
            exit::DATAERR,
            format!(
                "airlock: `buildkite-agent oidc request-token` did not print one token ({} bytes)",
                text.len()
            ),
        ));
    }
    Ok(Secret::new(token.to_string()))
}

/// Names never handed to the step: the host's AWS settings (the job gets its own from
/// airlock), airlock's and the Buildkite agent's secrets, and what the sandbox sets itself
/// or bash refuses to export.
fn passed_to_step(name: &str) -> bool {
    let valid = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    valid
        && !name.starts_with("AWS_")
        && !name.starts_with("AIRLOCK")
        && !matches!(
            name,
            "BUILDKITE_AGENT_ACCESS_TOKEN"
                | "BUILDKITE_AGENT_TOKEN"
                | "HOME"
                | "USER"
                | "LOGNAME"
                | "SHELL"
                | "PWD"
                | "OLDPWD"
                | "SHLVL"
                | "TMPDIR"
                | "PATH"
                | "BASHOPTS"
                | "SHELLOPTS"
                | "BASH_ENV"
                | "ENV"
                | "UID"
                | "EUID"
                | "PPID"
                | "SSH_AUTH_SOCK"
                | "DBUS_SESSION_BUS_ADDRESS"
                | "XDG_RUNTIME_DIR"
                | "LD_PRELOAD"
                | "LD_LIBRARY_PATH"
                | "GOOGLE_APPLICATION_CREDENTIALS"
                | "KUBECONFIG"
                | "DOCKER_HOST"
                | "DOCKER_CONFIG"
        )
}

/// The step's environment, as the sandbox's stdin: NUL-separated `NAME=value` entries,
/// then the command as `AIRLOCK_STEP_COMMAND=…`, then `AIRLOCK_STEP_CHECKOUT=tar` (a tar
/// stream of the checkout follows) or `=none`. Through a pipe rather than argv or the spec
/// file, so the values never show in the host's process list.
fn step_input(env: &Env, command: &str, checkout: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in env {
        if passed_to_step(k) && !v.contains('\0') {
            out.extend_from_slice(k.as_bytes());
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
    }
    out.extend_from_slice(b"AIRLOCK_STEP_COMMAND=");
    out.extend_from_slice(command.as_bytes());
    out.push(0);
    out.extend_from_slice(if checkout {
        b"AIRLOCK_STEP_CHECKOUT=tar\0"
    } else {
        b"AIRLOCK_STEP_CHECKOUT=none\0"
    });
    out
}

/// What runs in the sandbox: read the step's environment and command from stdin, unpack
/// the checkout that follows them into the workspace, run the command the way Buildkite's
/// default shell does (`bash -e -c`), with stdin at end of file. (`read` takes a pipe one
/// byte at a time, so the archive after the last entry is left for tar.)
const STEP_SCRIPT: &str = r#"set -u
cmd=
have_cmd=
checkout=
while IFS= read -r -d '' kv; do
  case $kv in
    AIRLOCK_STEP_COMMAND=*) cmd=${kv#AIRLOCK_STEP_COMMAND=}; have_cmd=1 ;;
    AIRLOCK_STEP_CHECKOUT=*) checkout=${kv#AIRLOCK_STEP_CHECKOUT=}; break ;;
    *=*) export "$kv" ;;
  esac
done
if [ -z "$have_cmd" ] || [ -z "$checkout" ]; then
  echo "airlock: the step's command did not reach the sandbox" >&2
  exit 125
fi
if [ "$checkout" = tar ]; then
  if ! tar -x -f - ; then
    echo "airlock: cannot unpack the checkout into the sandbox's workspace $PWD (its message is above; or run the hook with --checkout none)" >&2
    exit 1
  fi
  export BUILDKITE_BUILD_CHECKOUT_PATH="$PWD"
fi
exec bash -e -c "$cmd" </dev/null
"#;

fn step_argv() -> Vec<String> {
    vec![
        "bash".into(),
        "-c".into(),
        STEP_SCRIPT.into(),
        "airlock-buildkite-step".into(),
    ]
}

/// The job's checkout, if it is this pipeline's: under the agent's build path (which a
/// pipeline cannot set: Buildkite protects `BUILDKITE_BUILD_PATH`) and ending in the
/// organisation and pipeline of the job's verified token. A step's `env:` may set
/// `BUILDKITE_BUILD_CHECKOUT_PATH` to another pipeline's checkout, which the agent's user
/// can read: that is refused here.
fn checkout_dir(env: &Env, repository: Option<&str>) -> Result<Option<PathBuf>, String> {
    let Some(path) = var(env, "BUILDKITE_BUILD_CHECKOUT_PATH") else {
        return Ok(None);
    };
    let path = Path::new(path);
    if !path.is_dir() {
        return Ok(None);
    }
    let build = var(env, "BUILDKITE_BUILD_PATH")
        .ok_or("BUILDKITE_BUILD_PATH is not set: the checkout cannot be told apart from another pipeline's")?;
    let canon = |p: &Path| std::fs::canonicalize(p).map_err(|e| format!("{}: {e}", p.display()));
    let (dir, build) = (canon(path)?, canon(Path::new(build))?);
    let Some((org, pipeline)) = repository.and_then(|r| r.split_once('/')) else {
        return Err("the job's token names no organisation and pipeline".into());
    };
    let own = Path::new(org).join(pipeline);
    if dir.starts_with(&build) && dir != build && dir.ends_with(&own) {
        Ok(Some(dir))
    } else {
        Err(format!(
            "the checkout {} is not this pipeline's ({} under the build path {})",
            dir.display(),
            own.display(),
            build.display()
        ))
    }
}

/// `tar` of the checkout's contents on its stdout, run with the hook user's own
/// permissions, by absolute path and with an environment of our own (`TAR_OPTIONS` from a
/// pipeline must not reach it). Symbolic links are archived as links, never followed.
fn tar_checkout(dir: &Path) -> Result<tokio::process::Child, HookError> {
    crate::childenv::command(Path::new(TAR), &[], |_| None)
        .map_err(|e| fail(exit::SOFTWARE, format!("airlock: {e}")))?
        .arg("-C")
        .arg(dir)
        .args(["--one-file-system", "-c", "-f", "-", "."])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            fail(
                exit::UNAVAILABLE,
                format!("airlock: cannot run {TAR} to copy the checkout: {e}"),
            )
        })
}

/// Ends every airlock job of this Buildkite job's bootstrap. Returns the jobs ended.
async fn end_jobs_of(client: &Client, boot: i32) -> Result<Vec<String>, ControlError> {
    let mut ended = Vec::new();
    for j in client.list().await? {
        if j.owner_pid == Some(boot) {
            match client.end(&j.job_id).await {
                Ok(_) | Err(ControlError::Refused { status: 404, .. }) => ended.push(j.job_id),
                Err(e) => return Err(e),
            }
        }
    }
    Ok(ended)
}

/// The environment handed to the agent with the command: the agent keeps only its
/// `[sandbox] pass_env` names of it.
fn command_env(env: &Env) -> BTreeMap<String, String> {
    env.iter()
        .filter(|(k, _)| {
            !k.starts_with("AWS_")
                && k.as_str() != "BUILDKITE_AGENT_ACCESS_TOKEN"
                && k.as_str() != "BUILDKITE_AGENT_TOKEN"
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// `airlock buildkite environment`: fail the job early, with a clear message, when the
/// hooks cannot work on this host.
pub async fn environment(env: &Env, socket: &Path, args: &HookArgs) -> Result<String, HookError> {
    buildkite_job(env)?;
    agent_program(args)?;
    bootstrap()?;
    let client = Client::new(socket);
    client
        .list()
        .await
        .map_err(|e| fail(exit::UNAVAILABLE, format!("airlock: {}", agent_error(&e))))?;
    // The audience the command hook will request must be one airlockd trusts.
    let audience = audience(&client, args).await?;
    Ok(format!(
        "airlock: ready: {} runs in a sandbox with job-scoped AWS credentials (OIDC audience {audience:?})",
        describe(env)
    ))
}

/// `airlock buildkite command`: returns the step's exit code.
pub async fn command(env: &Env, socket: &Path, args: &HookArgs) -> Result<i32, HookError> {
    let bk_job = buildkite_job(env)?;
    let Some(step) = env
        .get("BUILDKITE_COMMAND")
        .filter(|c| !c.trim().is_empty())
    else {
        println!("airlock: this step has no command: nothing to run");
        return Ok(0);
    };
    let boot = bootstrap()?;
    let client = Client::new(socket);
    // A command hook that runs again for the same Buildkite job replaces the first one's.
    end_jobs_of(&client, boot.pid)
        .await
        .map_err(|e| fail(exit::UNAVAILABLE, format!("airlock: {}", agent_error(&e))))?;
    let audience = audience(&client, args).await?;
    let token = request_oidc_token(env, args, &audience).await?;
    let lifetime = var(env, "BUILDKITE_TIMEOUT")
        .and_then(|t| t.parse::<u64>().ok())
        .map(|m| m * 60 + LIFETIME_MARGIN_SECS);
    // Other pipelines' checkouts are under the agent's build path: hidden from the step.
    let hide: Vec<PathBuf> = var(env, "BUILDKITE_BUILD_PATH")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .into_iter()
        .collect();
    let started = client
        .start(&StartRequest {
            oidc_token: Some(token),
            runner: Some(format!(
                "buildkite {} job {bk_job}",
                var(env, "BUILDKITE_AGENT_NAME").unwrap_or("agent")
            )),
            max_lifetime_secs: lifetime,
            command: Some(JobCommand {
                argv: step_argv(),
                env: command_env(env),
            }),
            owner_pid: Some(boot.pid),
            hide,
            ..Default::default()
        })
        .await
        .map_err(|e| match &e {
            ControlError::Refused { code, message, .. } if code == "InvalidIdentityToken" => fail(
                exit::NOPERM,
                format!(
                    "airlock: the job's Buildkite OIDC token was refused ({}): {message}; airlock.toml must trust the issuer {BUILDKITE_ISSUER} with the audience {:?}",
                    describe(env),
                    audience
                ),
            ),
            _ => fail(exit::UNAVAILABLE, format!("airlock: cannot start the job: {}", agent_error(&e))),
        })?;
    let id = started.job_id.clone();
    let end = |why: HookError| async {
        let _ = client.end(&id).await;
        why
    };
    if started.ci_job_id.as_deref().is_some_and(|j| j != bk_job) {
        return Err(end(fail(
            exit::DATAERR,
            format!(
                "airlock: the job's token is for Buildkite job {} but BUILDKITE_JOB_ID says {bk_job}: refused",
                started.ci_job_id.as_deref().unwrap_or("?")
            ),
        ))
        .await);
    }
    if let Some(why) = &started.refused {
        let org_pin = started.flags.iter().any(|f| f == FLAG_ORG_NOT_PINNED);
        if org_pin || !args.allow_refused {
            let msg = if org_pin {
                format!(
                    "airlock: refused to run this step ({}): {why}. Ask your platform team to pin the organisation in that rule; `airlock policy check` on the agent host lists every such rule.",
                    describe(env)
                )
            } else {
                format!(
                    "airlock: no AWS credentials for this step ({}): {why}. The step did not run. Ask your platform team to add or change a rule; `airlock policy explain` on the agent host shows why no rule matched.",
                    describe(env)
                )
            };
            return Err(end(fail(exit::NOPERM, msg)).await);
        }
        eprintln!("airlock: this step runs without AWS credentials: {why}");
    }
    let Some(sandbox) = &started.sandbox else {
        return Err(end(fail(
            exit::CONFIG,
            "airlock: airlockd runs without [sandbox]: the Buildkite hooks run every step in a sandbox ([sandbox] enabled = true)",
        ))
        .await);
    };
    let checkout = match args.checkout.as_str() {
        "copy" => match checkout_dir(env, started.repository.as_deref()) {
            Ok(dir) => dir,
            Err(why) => {
                return Err(end(fail(
                    exit::NOPERM,
                    format!("airlock: the checkout is not copied into the sandbox: {why}"),
                ))
                .await)
            }
        },
        _ => None,
    };
    println!(
        "airlock: Buildkite job {bk_job} runs as airlock job {id}: {}; rule {}; roles {}",
        started.identity.as_deref().unwrap_or("-"),
        started.rule.as_deref().unwrap_or("-"),
        if started.grants.is_empty() {
            "-".to_string()
        } else {
            started.grants.join(", ")
        }
    );
    let head = std::io::Cursor::new(step_input(env, step, checkout.is_some()));
    let mut tar = None;
    let input = match &checkout {
        Some(dir) => {
            let mut child = match tar_checkout(dir) {
                Ok(c) => c,
                Err(e) => return Err(end(e).await),
            };
            let out = child.stdout.take();
            tar = Some(child);
            match out {
                Some(out) => crate::shim_run::Input::Stream(Box::pin(
                    tokio::io::AsyncReadExt::chain(head, out),
                )),
                None => crate::shim_run::Input::Stream(Box::pin(head)),
            }
        }
        None => crate::shim_run::Input::Stream(Box::pin(head)),
    };
    let status = crate::shim_run::run(&client, &id, sandbox, input).await;
    if let Some(mut t) = tar {
        let _ = t.start_kill();
        let _ = t.wait().await;
    }
    let ended = client.end(&id).await;
    let status =
        status.map_err(|e| fail(exit::OSERR, format!("airlock: cannot run the step: {e}")))?;
    if let Err(e) = ended {
        // pre-exit tries again; the job's lifetime (or its bootstrap's exit) ends it at the latest.
        eprintln!(
            "airlock: warning: could not end job {id}: {}",
            agent_error(&e)
        );
    }
    if status.setup_failed {
        eprintln!("airlock: the step's sandbox could not be built (the message above says why)");
    }
    Ok(status.code)
}

/// `airlock buildkite pre-exit`: end this Buildkite job's airlock jobs still running.
pub async fn pre_exit(env: &Env, socket: &Path, _args: &HookArgs) -> Result<String, HookError> {
    let bk_job = buildkite_job(env)?;
    let boot = bootstrap()?;
    let ended = end_jobs_of(&Client::new(socket), boot.pid)
        .await
        .map_err(|e| {
            fail(
                exit::UNAVAILABLE,
                format!(
                    "airlock: cannot end the airlock jobs of Buildkite job {bk_job}: {} (the agent ends them when their bootstrap exits)",
                    agent_error(&e)
                ),
            )
        })?;
    Ok(if ended.is_empty() {
        format!("airlock: no airlock job is running for Buildkite job {bk_job}")
    } else {
        format!(
            "airlock: job {} ended; its sandbox is wiped",
            ended.join(", ")
        )
    })
}

// ---------------------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------------------

/// `airlock buildkite …`
#[derive(Debug, clap::Subcommand)]
pub enum BuildkiteCmd {
    /// The agent's environment hook: check that airlockd answers and the hooks can work.
    Environment {
        #[command(flatten)]
        args: HookArgs,
    },
    /// The agent's command hook: run BUILDKITE_COMMAND in an airlock sandbox with the
    /// job's credentials; exit with its status.
    Command {
        #[command(flatten)]
        args: HookArgs,
    },
    /// The agent's pre-exit hook: end the job's airlock job if it still runs.
    PreExit {
        #[command(flatten)]
        args: HookArgs,
    },
}

/// Run `airlock buildkite …`; returns the exit code (messages go to stdout/stderr, which
/// the Buildkite agent shows in the job's log).
pub async fn run_cli(cmd: BuildkiteCmd, socket: Option<PathBuf>, config: &Path) -> i32 {
    let env: Env = std::env::vars().collect();
    let socket = crate::github::socket_path(socket, config);
    let done = match cmd {
        BuildkiteCmd::Environment { args } => environment(&env, &socket, &args).await.map(|m| {
            println!("{m}");
            exit::OK
        }),
        BuildkiteCmd::Command { args } => command(&env, &socket, &args).await,
        BuildkiteCmd::PreExit { args } => pre_exit(&env, &socket, &args).await.map(|m| {
            println!("{m}");
            exit::OK
        }),
    };
    match done {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", e.message);
            e.code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::JobIdentity;
    use crate::policy::PolicySet;

    fn policies(rules: &str) -> PolicySet {
        crate::policy::load_str(Path::new("/p/50-bk.toml"), rules).unwrap()
    }

    fn rule(matcher: &str) -> String {
        format!(
            "[[rule]]\nname = \"r\"\n[rule.match]\n{matcher}\n[[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/x\"\n"
        )
    }

    /// The pin test agrees with the loader's warning for every shape of rule.
    #[test]
    fn pin_check_agrees_with_the_loader_warning() {
        for (m, pinned) in [
            ("provider = \"buildkite\"", false),
            ("provider = \"buildkite\"\nowner = \"acme\"", true),
            (
                "provider = \"buildkite\"\nowner = [\"acme\", \"acme-ops\"]",
                true,
            ),
            ("provider = \"buildkite\"\nowner = \"acme-*\"", false),
            ("provider = \"buildkite\"\nowner = [\"acme\", \"*\"]", false),
            ("provider = \"buildkite\"\nrepository = \"acme/*\"", true),
            ("provider = \"buildkite\"\nrepository = \"*/deploy\"", false),
            (
                "provider = \"buildkite\"\nrepository = \"ac?e/deploy\"",
                false,
            ),
            (
                "issuer = \"https://agent.buildkite.com\"\nsubject = \"organization:acme:*\"",
                false,
            ),
            (
                "provider = \"buildkite\"\norganization_id = \"0184990a-477b\"",
                true,
            ),
        ] {
            let p = policies(&rule(m));
            let warned = p.warnings().iter().any(|w| w.contains("Buildkite"));
            assert_eq!(
                crate::policy::load::pins_buildkite_org(&p.rules()[0].matchers),
                pinned,
                "{m}"
            );
            assert_eq!(warned, !pinned, "{m}: {:?}", p.warnings());
        }
    }

    fn bk_identity(org: &str) -> JobIdentity {
        let claims = serde_json::json!({
            "iss": BUILDKITE_ISSUER,
            "sub": format!("organization:{org}:pipeline:deploy:ref:refs/heads/main:commit:abc:step:"),
            "organization_slug": org,
            "pipeline_slug": "deploy",
            "build_number": 7,
            "build_branch": "main",
            "job_id": "0190-aa",
        });
        crate::identity::from_attested({
            let mut c = claims.as_object().unwrap().clone();
            c.insert("provider".into(), "buildkite".into());
            c
        })
        .unwrap()
    }

    #[test]
    fn unpinned_rules_refuse_buildkite_jobs_and_say_what_to_add() {
        let p = policies(
            &rule("provider = \"buildkite\"\nrepository = \"*/deploy\"").replacen(
                "[rule.match]",
                "require_oidc = false\n[rule.match]",
                1,
            ),
        );
        let id = bk_identity("evil-org");
        let d = p.decide(&id, time::OffsetDateTime::now_utc());
        assert_eq!(d.rule.as_deref(), Some("r"));
        let why = d.refused.as_deref().unwrap();
        assert!(d.grants.is_empty());
        assert!(why.contains("rule \"r\""), "{why}");
        assert!(why.contains("owner = \"evil-org\""), "{why}");
        assert_eq!(d.flags, vec![FLAG_ORG_NOT_PINNED.to_string()]);
        // `airlock policy explain` shows the same refusal.
        let ex = p.explain(&id, time::OffsetDateTime::now_utc());
        assert_eq!(ex.decision, d);
        assert!(
            ex.rules[0]
                .reasons
                .iter()
                .any(|r| r.contains("decides: refused")),
            "{:?}",
            ex.rules
        );
    }

    #[test]
    fn pinned_rules_and_other_providers_are_untouched() {
        let p = policies(
            &rule("provider = \"buildkite\"\nowner = \"acme\"").replacen(
                "[rule.match]",
                "require_oidc = false\n[rule.match]",
                1,
            ),
        );
        let id = bk_identity("acme");
        let d = p.decide(&id, time::OffsetDateTime::now_utc());
        assert!(d.refused.is_none() && d.grants.len() == 1, "{d:?}");

        let p = policies(
            &rule("provider = \"github\"\nrepository = \"*/web\"").replacen(
                "[rule.match]",
                "require_oidc = false\n[rule.match]",
                1,
            ),
        );
        let mut c = serde_json::Map::new();
        c.insert("provider".into(), "github".into());
        c.insert("repository".into(), "acme/web".into());
        let gh = crate::identity::from_attested(c).unwrap();
        let d = p.decide(&gh, time::OffsetDateTime::now_utc());
        assert!(d.refused.is_none() && d.flags.is_empty(), "{d:?}");
    }

    #[test]
    fn the_step_never_gets_host_credentials_or_agent_tokens() {
        let env: Env = [
            ("AWS_ACCESS_KEY_ID", "AKIAHOST"),
            ("AWS_SECRET_ACCESS_KEY", "hostsecret"),
            ("BUILDKITE_AGENT_ACCESS_TOKEN", "bkaccess"),
            ("AIRLOCK_SOCKET", "/x"),
            ("BUILDKITE_BRANCH", "main"),
            ("MY_VAR", "a b\nc"),
            ("HOME", "/var/lib/buildkite-agent"),
            ("bad-name", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let input = step_input(&env, "echo hi", false);
        let entries: Vec<&[u8]> = input.split(|b| *b == 0).filter(|e| !e.is_empty()).collect();
        let text: Vec<String> = entries
            .iter()
            .map(|e| String::from_utf8_lossy(e).into_owned())
            .collect();
        assert_eq!(
            text,
            vec![
                "BUILDKITE_BRANCH=main".to_string(),
                "MY_VAR=a b\nc".to_string(),
                "AIRLOCK_STEP_COMMAND=echo hi".to_string(),
                "AIRLOCK_STEP_CHECKOUT=none".to_string(),
            ]
        );
        let ce = command_env(&env);
        assert!(!ce
            .keys()
            .any(|k| k.starts_with("AWS_") || k == "BUILDKITE_AGENT_ACCESS_TOKEN"));
    }
}
