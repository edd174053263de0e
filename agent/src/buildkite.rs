//! Buildkite: the agent hooks (`airlock buildkite environment|command|pre-exit`, sourced
//! by the Buildkite agent from `integrations/buildkite/hooks/`) and the organisation-pin
//! check the daemon applies to every Buildkite identity. See `docs/buildkite.md`.
//!
//! - `environment` checks, before anything of the job runs, that the hooks can work: the
//!   agent's control socket answers, the hook runs as root (the sandbox init needs it) and
//!   `buildkite-agent` is there.
//! - `command` replaces Buildkite's command phase: it asks `buildkite-agent oidc
//!   request-token --audience <audience>` for the job's OIDC token (read from its stdout,
//!   held in memory and handed to the agent over the control socket only: never on a
//!   command line, in a file or in the job's environment), starts an airlock job with it,
//!   runs `BUILDKITE_COMMAND` with `bash -e -c` (Buildkite's default shell) inside the job's
//!   sandbox, ends the job and exits with the command's status. A refused job fails the
//!   step before the command runs.
//! - `pre-exit` ends the job if it is still running (a cancelled or killed command hook);
//!   ending it again is not an error.
//!
//! Every Buildkite organisation shares the issuer `https://agent.buildkite.com`, so a rule
//! that does not pin the organisation would hand its grants to any organisation's
//! pipeline. The policies' decision itself refuses a Buildkite identity such a rule
//! decides (`policy::decide`), so every path — start, bind, recovery, `airlock policy
//! explain` — applies it and no runner integration or job can get around it.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control::{Client, ControlError, JobCommand, StartRequest};
use crate::exit;
use crate::secret::Secret;

/// The audience asked for by default (`--audience`); it must be one of the Buildkite
/// issuer's `audiences` in `airlock.toml`.
pub const DEFAULT_AUDIENCE: &str = "airlock";
/// The issuer every Buildkite organisation shares.
pub const BUILDKITE_ISSUER: &str = "https://agent.buildkite.com";
/// The flag of a decision refused because its rule does not pin the organisation.
pub use crate::policy::decide::FLAG_ORG_NOT_PINNED;
/// Largest token accepted from `buildkite-agent` (the agent's own limit is 8 KiB too).
const MAX_TOKEN: usize = 8 * 1024;
/// Added to the step's `BUILDKITE_TIMEOUT` for the airlock job's lifetime.
const LIFETIME_MARGIN_SECS: u64 = 10 * 60;

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
    /// Audience of the job's OIDC token (one of the Buildkite issuer's `audiences`).
    #[arg(long, default_value = DEFAULT_AUDIENCE)]
    pub audience: String,
    /// Lifetime asked for the OIDC token, in seconds (`--lifetime` of
    /// `buildkite-agent oidc request-token`); 0: Buildkite's default.
    #[arg(long, default_value_t = 0)]
    pub token_lifetime: u64,
    /// The `buildkite-agent` binary (a path, or a name looked up in PATH).
    #[arg(long, default_value = "buildkite-agent")]
    pub buildkite_agent: PathBuf,
    /// Where the command hook records the airlock job of each Buildkite job, for
    /// pre-exit (default: `.airlock-buildkite` in the hook user's home directory).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Run steps that the policy grants nothing without AWS credentials instead of
    /// failing them (never a step refused for an unpinned organisation).
    #[arg(long)]
    pub allow_refused: bool,
    /// Copy the job's checkout (`BUILDKITE_BUILD_CHECKOUT_PATH`) into the sandbox's
    /// workspace before the command runs (the host's files are read-only in the sandbox).
    #[arg(long, default_value = "copy", value_parser = ["copy", "none"])]
    pub checkout: String,
}

/// The state directory: given, or the hook user's home (from the user database, not
/// `$HOME`, which a pipeline can set) plus `.airlock-buildkite`.
fn state_dir(args: &HookArgs) -> PathBuf {
    if let Some(d) = &args.state_dir {
        return d.clone();
    }
    let home = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.dir)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".airlock-buildkite")
}

/// `BUILDKITE_JOB_ID` as a file name: Buildkite's job ids are UUIDs.
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

fn record_path(dir: &Path, job: &str) -> PathBuf {
    dir.join(format!("{job}.job"))
}

/// Records the airlock job of a Buildkite job (0600 in a 0700 directory).
fn save_record(dir: &Path, job: &str, airlock_job: &str) -> Result<(), String> {
    use std::io::Write;
    let err = |e: std::io::Error| format!("cannot record the job in {}: {e}", dir.display());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    let tmp = dir.join(format!(".{job}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(airlock_job.as_bytes()).map_err(err)?;
    std::fs::rename(&tmp, record_path(dir, job)).map_err(err)
}

fn load_record(dir: &Path, job: &str) -> Result<Option<String>, String> {
    let path = record_path(dir, job);
    match std::fs::read_to_string(&path) {
        Ok(t) => {
            let id = t.trim();
            if crate::jobs::valid_job_id(id) {
                Ok(Some(id.to_string()))
            } else {
                Err(format!("{} does not name an airlock job", path.display()))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
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

/// The job's OIDC token from `buildkite-agent oidc request-token --audience A`
/// (its stdout; its stderr goes to the job's log).
pub async fn request_oidc_token(env: &Env, args: &HookArgs) -> Result<Secret<String>, HookError> {
    let mut cmd = tokio::process::Command::new(&args.buildkite_agent);
    cmd.args(["oidc", "request-token", "--audience", &args.audience]);
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
                    args.buildkite_agent.display()
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
                args.audience,
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
/// then the command as `AIRLOCK_STEP_COMMAND=…`. Through a pipe rather than argv or the
/// spec file, so the values never show in the host's process list.
fn step_input(env: &Env, command: &str) -> Vec<u8> {
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
    out
}

/// What runs in the sandbox: read the step's environment and command from stdin, copy
/// the checkout into the workspace, run the command the way Buildkite's default shell
/// does (`bash -e -c`), with stdin at end of file.
const STEP_SCRIPT: &str = r#"set -u
cmd=
have_cmd=
while IFS= read -r -d '' kv; do
  case $kv in
    AIRLOCK_STEP_COMMAND=*) cmd=${kv#AIRLOCK_STEP_COMMAND=}; have_cmd=1 ;;
    *=*) export "$kv" ;;
  esac
done
if [ -z "$have_cmd" ]; then
  echo "airlock: the step's command did not reach the sandbox" >&2
  exit 125
fi
src=$1
if [ -n "$src" ] && [ -d "$src" ]; then
  if ! cp -R "$src/." . ; then
    echo "airlock: cannot copy the checkout $src into the sandbox's workspace $PWD (every file must be readable by the sandbox's user; or run the hook with --checkout none)" >&2
    exit 1
  fi
  export BUILDKITE_BUILD_CHECKOUT_PATH="$PWD"
fi
exec bash -e -c "$cmd" </dev/null
"#;

fn step_argv(checkout: Option<&str>) -> Vec<String> {
    vec![
        "bash".into(),
        "-c".into(),
        STEP_SCRIPT.into(),
        "airlock-buildkite-step".into(),
        checkout.unwrap_or("").into(),
    ]
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
    if !nix::unistd::geteuid().is_root() {
        return Err(fail(
            exit::NOPERM,
            "airlock: the Buildkite agent must run as root on an airlock host: the command hook starts each step's sandbox (see docs/buildkite.md)",
        ));
    }
    let found = if args.buildkite_agent.components().count() > 1 {
        args.buildkite_agent.is_file()
    } else {
        var(env, "PATH").is_some_and(|p| {
            std::env::split_paths(p).any(|d| d.join(&args.buildkite_agent).is_file())
        })
    };
    if !found {
        return Err(fail(
            exit::UNAVAILABLE,
            format!(
                "airlock: {} not found: the command hook needs it for the job's OIDC token (--buildkite-agent)",
                args.buildkite_agent.display()
            ),
        ));
    }
    Client::new(socket)
        .list()
        .await
        .map_err(|e| fail(exit::UNAVAILABLE, format!("airlock: {}", agent_error(&e))))?;
    Ok(format!(
        "airlock: ready: {} runs in a sandbox with job-scoped AWS credentials",
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
    let dir = state_dir(args);
    let client = Client::new(socket);
    // A command hook that runs again for the same job replaces the first one's job.
    if let Ok(Some(old)) = load_record(&dir, bk_job) {
        let _ = client.end(&old).await;
        let _ = std::fs::remove_file(record_path(&dir, bk_job));
    }
    let token = request_oidc_token(env, args).await?;
    let lifetime = var(env, "BUILDKITE_TIMEOUT")
        .and_then(|t| t.parse::<u64>().ok())
        .map(|m| m * 60 + LIFETIME_MARGIN_SECS);
    let checkout = match args.checkout.as_str() {
        "copy" => var(env, "BUILDKITE_BUILD_CHECKOUT_PATH"),
        _ => None,
    };
    let started = client
        .start(&StartRequest {
            oidc_token: Some(token),
            runner: Some(format!(
                "buildkite {} job {bk_job}",
                var(env, "BUILDKITE_AGENT_NAME").unwrap_or("agent")
            )),
            max_lifetime_secs: lifetime,
            command: Some(JobCommand {
                argv: step_argv(checkout),
                env: command_env(env),
            }),
            ..Default::default()
        })
        .await
        .map_err(|e| match &e {
            ControlError::Refused { code, message, .. } if code == "InvalidIdentityToken" => fail(
                exit::NOPERM,
                format!(
                    "airlock: the job's Buildkite OIDC token was refused ({}): {message}; airlock.toml must trust the issuer {BUILDKITE_ISSUER} with the audience {:?}",
                    describe(env),
                    args.audience
                ),
            ),
            _ => fail(exit::UNAVAILABLE, format!("airlock: cannot start the job: {}", agent_error(&e))),
        })?;
    let id = started.job_id.clone();
    let end = |why: HookError| async {
        let _ = client.end(&id).await;
        why
    };
    if let Err(e) = save_record(&dir, bk_job, &id) {
        return Err(end(fail(exit::CANTCREAT, format!("airlock: {e}"))).await);
    }
    let forget = || {
        let _ = std::fs::remove_file(record_path(&dir, bk_job));
    };
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
            let e = end(fail(exit::NOPERM, msg)).await;
            forget();
            return Err(e);
        }
        eprintln!("airlock: this step runs without AWS credentials: {why}");
    }
    let Some(sandbox) = &started.sandbox else {
        let e = end(fail(
            exit::CONFIG,
            "airlock: airlockd runs without [sandbox]: the Buildkite hooks run every step in a sandbox ([sandbox] enabled = true)",
        ))
        .await;
        forget();
        return Err(e);
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
    let status = crate::shim_run::run(
        sandbox,
        crate::shim_run::Input::Bytes(step_input(env, step)),
    )
    .await;
    let ended = client.end(&id).await;
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            forget();
            return Err(fail(
                exit::OSERR,
                format!("airlock: cannot run the step: {e}"),
            ));
        }
    };
    match ended {
        Ok(_) => forget(),
        // pre-exit tries again; the job's lifetime ends it at the latest.
        Err(e) => eprintln!(
            "airlock: warning: could not end job {id}: {}",
            agent_error(&e)
        ),
    }
    let code = crate::shim_run::exit_code(status);
    if code == airlock_shim::EXIT_SETUP_FAILED {
        eprintln!("airlock: the step's sandbox could not be built (the message above says why)");
    }
    Ok(code)
}

/// `airlock buildkite pre-exit`: end the job's airlock job if it is still recorded.
pub async fn pre_exit(env: &Env, socket: &Path, args: &HookArgs) -> Result<String, HookError> {
    let bk_job = buildkite_job(env)?;
    let dir = state_dir(args);
    let Some(id) =
        load_record(&dir, bk_job).map_err(|e| fail(exit::DATAERR, format!("airlock: {e}")))?
    else {
        return Ok(format!(
            "airlock: no airlock job is running for Buildkite job {bk_job}"
        ));
    };
    let msg = match Client::new(socket).end(&id).await {
        Ok(_) => format!("airlock: job {id} ended; its sandbox is wiped"),
        Err(ControlError::Refused { status: 404, .. }) => {
            format!("airlock: job {id} had already ended")
        }
        Err(e) => {
            return Err(fail(
                exit::UNAVAILABLE,
                format!(
                    "airlock: cannot end airlock job {id}: {} (the agent ends it when its lifetime runs out)",
                    agent_error(&e)
                ),
            ))
        }
    };
    let _ = std::fs::remove_file(record_path(&dir, bk_job));
    Ok(msg)
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
        let input = step_input(&env, "echo hi");
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
            ]
        );
        let ce = command_env(&env);
        assert!(!ce
            .keys()
            .any(|k| k.starts_with("AWS_") || k == "BUILDKITE_AGENT_ACCESS_TOKEN"));
    }
}
