//! GitHub Actions: the job hooks (`airlock github job-started` / `job-completed`, run by the
//! runner through `ACTIONS_RUNNER_HOOK_JOB_STARTED` / `_COMPLETED`) and the supervisor of
//! ephemeral runner slots (`airlock github supervise`). See `docs/github-actions.md`.
//!
//! Two modes, told apart by the hook's environment:
//!
//! - **ephemeral** (the hook runs inside a sandbox the supervisor started with `bind_later`
//!   and `endpoint_bind`: `AIRLOCK_JOB_ID` and `AWS_CONTAINER_CREDENTIALS_FULL_URI` are set):
//!   the hook binds the job's identity through its own endpoint (`POST /v1/bind`, the job's
//!   endpoint token), once; the control socket is never exposed to a job. The supervisor
//!   ends the job and wipes the sandbox when the runner exits after its one job.
//! - **hooks-only** (a persistent runner, no sandbox): the hook starts the job through the
//!   control socket with the identity, and the job-completed hook ends it, kills what the
//!   job left running and wipes the workspace and known credential locations. Weaker: see
//!   the docs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::control::{ApiError, BindRequest, Client, ControlError, StartRequest, StartResponse};
use crate::daemon::Daemon;
use crate::endpoint::{Refusal, BIND_CLAIM_PATH, BIND_PATH, BIND_TICKET_HEADER, CONTAINER_PATH};
use crate::exit;
use crate::policy::{EgressMode, EgressPolicy, PolicySet};
use crate::sandbox::job::JobSettings;
use crate::secret::Secret;

/// The audience the hooks request when airlockd trusts it. Which audience is requested is
/// asked of airlockd ([`crate::audience::choose`]): by the hooks-only hook over the control
/// socket, and for ephemeral slots by the supervisor, which writes its choice as
/// `AIRLOCK_OIDC_AUDIENCE` into the slot runner's `.env`.
pub use crate::audience::DEFAULT_AUDIENCE;
/// The runner's per-job process: a hooks-only job belongs to it.
pub const RUNNER_WORKER: &str = "Runner.Worker";
/// The variables the hook appends to `GITHUB_ENV`, so every later step's SDK finds the
/// job's endpoint.
pub const JOB_ENV_KEYS: &[&str] = &[
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AIRLOCK_JOB_ID",
];

/// A hook's failure: its exit code and the message the workflow author reads (in the
/// runner's "Set up runner" log). Never holds a token.
#[derive(Debug)]
pub struct HookError {
    pub code: i32,
    pub message: String,
}

impl HookError {
    fn new(code: i32, message: impl Into<String>) -> HookError {
        HookError {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for HookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

// ---------------------------------------------------------------------------------------
// Agent side
// ---------------------------------------------------------------------------------------

/// The sandbox of a runner slot, built before any rule decides (`runner_network`).
pub fn runner_sandbox_settings(
    network: &str,
    policies: &PolicySet,
) -> Result<JobSettings, ApiError> {
    match network {
        "egress-baseline" => {
            if policies.baseline().is_empty() {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    "runner_network \"egress-baseline\": no policy file has an [egress] baseline (list the hosts the runner needs, docs/github-actions.md)",
                ));
            }
            let policy = EgressPolicy {
                mode: EgressMode::Block,
                allow: policies.baseline().to_vec(),
            };
            Ok(JobSettings::from_rule(None, Some(policy)))
        }
        "outbound" => Ok(JobSettings::from_rule(
            Some(&crate::policy::RuleSandbox {
                network: Some(crate::policy::RuleNetwork::Outbound),
                ..Default::default()
            }),
            None,
        )),
        other => Err(ApiError::new(
            400,
            "BadRequest",
            format!("runner_network {other:?}: use \"egress-baseline\" or \"outbound\""),
        )),
    }
}

/// `POST /v1/bind` on a job's endpoint, after the endpoint checked the job's token and
/// used up the job's one endpoint bind: bind as the control API would, and answer what the
/// job may know (no token, no environment: the job already has both).
pub async fn bind_from_endpoint(d: &Daemon, job: &str, req: BindRequest) -> Result<Value, Refusal> {
    // Not a control-socket caller: the endpoint checked the job's token and the ticket.
    let peer = crate::control::Peer {
        uid: u32::MAX,
        gid: u32::MAX,
        pid: None,
    };
    match d.bind_job(job, req, peer).await {
        Ok(r) => Ok(json!({
            "job_id": r.job_id,
            "identity": r.identity,
            "rule": r.rule,
            "grants": r.grants,
            "refused": r.refused,
            "flags": r.flags,
        })),
        Err(e) => Err(Refusal {
            status: e.status,
            code: e.code.to_string(),
            message: e.message,
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Hooks
// ---------------------------------------------------------------------------------------

/// The hook's environment (a snapshot: tests hand in their own).
pub type Env = BTreeMap<String, String>;

fn var<'a>(env: &'a Env, k: &str) -> Option<&'a str> {
    env.get(k).map(String::as_str).filter(|v| !v.is_empty())
}

/// Whether the hook runs inside an airlock job (an ephemeral slot's sandbox).
fn in_job(env: &Env) -> bool {
    var(env, "AIRLOCK_JOB_ID").is_some() && var(env, "AWS_CONTAINER_CREDENTIALS_FULL_URI").is_some()
}

/// What the job looks like from GitHub's variables, for messages.
fn describe(env: &Env) -> String {
    let mut s = format!(
        "repository {} ref {}",
        var(env, "GITHUB_REPOSITORY").unwrap_or("?"),
        var(env, "GITHUB_REF").unwrap_or("?")
    );
    if let Some(e) = var(env, "GITHUB_EVENT_NAME") {
        s.push_str(&format!(" event {e}"));
    }
    if let Some(w) = var(env, "GITHUB_WORKFLOW_REF") {
        s.push_str(&format!(" workflow {w}"));
    }
    s
}

/// Runner-attested claims from the job's `GITHUB_*` variables, in GitHub's claim shape
/// (docs/identity.md). Weaker than the OIDC token: policies refuse them unless a rule says
/// `require_oidc = false`.
pub fn attested_claims(env: &Env) -> Result<Map<String, Value>, HookError> {
    let mut c = Map::new();
    c.insert("provider".into(), "github".into());
    let issuer = match var(env, "RUNNER_NAME") {
        Some(r) => format!("attested:github-runner:{r}"),
        None => "attested:github-runner".into(),
    };
    c.insert("issuer".into(), issuer.into());
    let repo = var(env, "GITHUB_REPOSITORY").ok_or_else(|| {
        HookError::new(
            exit::USAGE,
            "airlock: GITHUB_REPOSITORY is not set: is this hook run by the GitHub Actions runner (ACTIONS_RUNNER_HOOK_JOB_STARTED)?",
        )
    })?;
    c.insert("repository".into(), repo.into());
    for (claim, name) in [
        ("repository_owner", "GITHUB_REPOSITORY_OWNER"),
        ("ref", "GITHUB_REF"),
        ("ref_type", "GITHUB_REF_TYPE"),
        ("workflow_ref", "GITHUB_WORKFLOW_REF"),
        ("job_workflow_ref", "GITHUB_WORKFLOW_REF"),
        ("event_name", "GITHUB_EVENT_NAME"),
        ("actor", "GITHUB_ACTOR"),
        ("run_id", "GITHUB_RUN_ID"),
        ("run_attempt", "GITHUB_RUN_ATTEMPT"),
        ("sha", "GITHUB_SHA"),
    ] {
        if let Some(v) = var(env, name) {
            c.insert(claim.into(), v.into());
        }
    }
    if !c.contains_key("repository_owner") {
        if let Some((owner, _)) = repo.split_once('/') {
            c.insert("repository_owner".into(), owner.into());
        }
    }
    c.insert("runner_environment".into(), "self-hosted".into());
    Ok(c)
}

/// Whether GitHub gives this job an OIDC token (`permissions: id-token: write`).
fn can_request_oidc(env: &Env) -> bool {
    var(env, "ACTIONS_ID_TOKEN_REQUEST_URL").is_some()
        && var(env, "ACTIONS_ID_TOKEN_REQUEST_TOKEN").is_some()
}

/// Where an explicit audience of the hooks-only hook comes from, for messages.
const AUDIENCE_VAR: &str = "AIRLOCK_OIDC_AUDIENCE (the runner's .env)";

/// The audience a hooks-only hook requests: asked of airlockd over the control socket;
/// `AIRLOCK_OIDC_AUDIENCE`, when set, must be one it trusts.
async fn hooks_only_audience(env: &Env, client: &Client) -> Result<String, HookError> {
    let answer = client.issuers().await.map_err(|e| control_error(env, e))?;
    let wanted = var(env, "AIRLOCK_OIDC_AUDIENCE").map(|a| (a, AUDIENCE_VAR));
    crate::audience::choose(&answer, crate::identity::Provider::Github, wanted).map_err(|e| {
        HookError::new(
            exit::CONFIG,
            format!("airlock: no OIDC token requested: {e} (ask your platform team)"),
        )
    })
}

/// The job's OIDC token from GitHub: `GET $ACTIONS_ID_TOKEN_REQUEST_URL&audience=<aud>`
/// with `Authorization: bearer $ACTIONS_ID_TOKEN_REQUEST_TOKEN`, answer `{"value": ...}`.
/// `None` when the job has no `id-token: write` (the variables are absent).
pub async fn request_oidc_token(
    env: &Env,
    audience: &str,
) -> Result<Option<Secret<String>>, HookError> {
    let (Some(url), Some(bearer)) = (
        var(env, "ACTIONS_ID_TOKEN_REQUEST_URL"),
        var(env, "ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
    ) else {
        return Ok(None);
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let full = format!(
        "{url}{sep}audience={}",
        form_urlencoded::byte_serialize(audience.as_bytes()).collect::<String>()
    );
    // GitHub's token service, through the runner's proxy when it has one (the supervisor
    // passes `childenv::PROXY` to the runner, and the runner to its hooks).
    let proxy = crate::proxy::ProxySettings::from_env()
        .map_err(|e| HookError::new(exit::CONFIG, format!("airlock: proxy: {e}")))?;
    let client = crate::http_client::HttpClient::with_proxy(&proxy)
        .map_err(|e| HookError::new(exit::SOFTWARE, format!("airlock: {e}")))?;
    let mut last = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
        }
        let req = http::Request::get(&full)
            .header(http::header::AUTHORIZATION, format!("bearer {bearer}"))
            .header(http::header::ACCEPT, "application/json; api-version=2.0")
            .body(Full::new(Bytes::new()))
            .map_err(|_| {
                HookError::new(
                    exit::DATAERR,
                    "airlock: ACTIONS_ID_TOKEN_REQUEST_URL is not a valid URL",
                )
            })?;
        match client.send(req, Duration::from_secs(10)).await {
            Ok(r) if r.status.is_success() => {
                let v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
                return match v.get("value").and_then(Value::as_str) {
                    Some(t) if !t.is_empty() => Ok(Some(Secret::new(t.to_string()))),
                    _ => Err(HookError::new(
                        exit::UNAVAILABLE,
                        "airlock: GitHub's OIDC token answer has no \"value\"",
                    )),
                };
            }
            // The error message is the URL without its query (which may carry tokens).
            Ok(r) => {
                last = format!(
                    "{} answered {}",
                    crate::http_client::redact_url(url),
                    r.status
                );
                if r.status.is_client_error() {
                    break;
                }
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(HookError::new(
        exit::UNAVAILABLE,
        format!("airlock: cannot get this job's OIDC token from GitHub: {last}"),
    ))
}

/// Where the hooks-only hooks keep the job they started (the runner user's own directory).
fn state_file(env: &Env) -> PathBuf {
    let dir = match var(env, "AIRLOCK_GITHUB_STATE_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(var(env, "HOME").unwrap_or("/tmp")).join(".airlock-github"),
    };
    let runner = var(env, "RUNNER_NAME").unwrap_or("runner");
    let safe: String = runner
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{safe}.json"))
}

/// What job-started leaves for job-completed (hooks-only mode).
#[derive(Debug, Serialize, Deserialize)]
struct HookState {
    job_id: String,
    /// The job-started hook's own start time (clock ticks since boot): processes of the
    /// runner's user started later than this are the job's.
    since_ticks: u64,
    tracking_id: Option<String>,
    workspace: Option<String>,
}

/// Append `vars` to the `GITHUB_ENV` file (`NAME=value` lines; values are single-line).
fn write_github_env(env: &Env, vars: &BTreeMap<String, String>) -> Result<(), HookError> {
    use std::io::Write;
    let Some(path) = var(env, "GITHUB_ENV") else {
        return Err(HookError::new(
            exit::USAGE,
            "airlock: GITHUB_ENV is not set: is this hook run by the GitHub Actions runner?",
        ));
    };
    let mut text = String::new();
    for k in JOB_ENV_KEYS {
        if let Some(v) = vars.get(*k) {
            if v.contains('\n') || v.contains('\r') {
                return Err(HookError::new(
                    exit::SOFTWARE,
                    format!("airlock: the value of {k} spans lines"),
                ));
            }
            text.push_str(&format!("{k}={v}\n"));
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| {
            HookError::new(
                exit::CANTCREAT,
                format!("airlock: cannot write GITHUB_ENV {path}: {e}"),
            )
        })?;
    f.write_all(text.as_bytes()).map_err(|e| {
        HookError::new(
            exit::IOERR,
            format!("airlock: cannot write GITHUB_ENV {path}: {e}"),
        )
    })
}

/// The policy's answer for a job, as the workflow author should read it.
fn refused_message(env: &Env, why: &str) -> String {
    format!(
        "airlock: no AWS credentials for this job: no policy rule allows {} ({why}). \
         Ask your platform team to add or change a rule; `airlock policy explain` on the runner \
         host shows which rules were tried and why they did not match.",
        describe(env)
    )
}

fn bound_message(job: &str, rule: Option<&str>, grants: &[String], source: &str) -> String {
    format!(
        "airlock: job {job} bound with the job's {source}: rule {}, roles {}",
        rule.unwrap_or("-"),
        if grants.is_empty() {
            "-".to_string()
        } else {
            grants.join(", ")
        }
    )
}

/// `airlock github job-started`. Returns the line to print on success.
pub async fn job_started(env: &Env, socket: &Path) -> Result<String, HookError> {
    // In a sandbox, claim the job's one bind before anything that can fail: a step that
    // runs after a failed hook (`if: always()`) must find the route closed.
    let ticket = if in_job(env) {
        Some(claim_bind(env).await?)
    } else {
        None
    };
    // Ephemeral: the supervisor asked airlockd and wrote its choice into the runner's .env
    // (the sandbox has no control socket). Hooks-only: ask airlockd now.
    let audience = if !can_request_oidc(env) {
        String::new()
    } else if ticket.is_some() {
        var(env, "AIRLOCK_OIDC_AUDIENCE")
            .unwrap_or(DEFAULT_AUDIENCE)
            .to_string()
    } else {
        hooks_only_audience(env, &Client::new(socket)).await?
    };
    let token = request_oidc_token(env, &audience).await?;
    let (token, claims, source) = match token {
        Some(t) => (Some(t), None, "OIDC token"),
        None => (
            None,
            Some(attested_claims(env)?),
            "runner-attested claims (the workflow has no `permissions: id-token: write`)",
        ),
    };
    let fail_on_refused = var(env, "AIRLOCK_GITHUB_ON_REFUSED") != Some("warn");
    if let Some(ticket) = ticket {
        let answer = bind_through_endpoint(
            env,
            &ticket,
            BindRequest {
                oidc_token: token,
                claims,
            },
        )
        .await?;
        let job = answer["job_id"].as_str().unwrap_or("?").to_string();
        if let Some(why) = answer["refused"].as_str() {
            let msg = refused_message(env, why);
            if fail_on_refused {
                return Err(HookError::new(exit::NOPERM, msg));
            }
            return Ok(format!("::warning::{msg}"));
        }
        let vars: BTreeMap<String, String> = JOB_ENV_KEYS
            .iter()
            .filter_map(|k| env.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        write_github_env(env, &vars)?;
        let grants: Vec<String> = answer["grants"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|g| g.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        return Ok(bound_message(
            &job,
            answer["rule"].as_str(),
            &grants,
            source,
        ));
    }
    // Hooks-only: start the job through the control socket.
    let state = state_file(env);
    if let Ok(text) = std::fs::read_to_string(&state) {
        // A job-completed that never ran (a runner crash): end that job first.
        if let Ok(old) = serde_json::from_str::<HookState>(&text) {
            let _ = Client::new(socket).end(&old.job_id).await;
        }
        let _ = std::fs::remove_file(&state);
    }
    let client = Client::new(socket);
    // The job belongs to this job's Runner.Worker: the agent ends it when the worker exits,
    // and a step (which runs as this user and may reach the socket) can act on its own job
    // only, never another runner's.
    let worker = crate::procs::Procs::default()
        .nearest_named(std::process::id() as i32, RUNNER_WORKER)
        .ok_or_else(|| {
            HookError::new(
                exit::USAGE,
                format!("airlock: no {RUNNER_WORKER} process above this hook: job-started is run by the GitHub Actions runner (ACTIONS_RUNNER_HOOK_JOB_STARTED)"),
            )
        })?;
    let resp: StartResponse = client
        .start(&StartRequest {
            oidc_token: token,
            claims,
            runner: var(env, "RUNNER_NAME").map(String::from),
            owner_pid: Some(worker.pid),
            ..Default::default()
        })
        .await
        .map_err(|e| control_error(env, e))?;
    if resp.sandboxed {
        // Its endpoint lives inside a sandbox this runner's steps do not run in.
        let _ = client.end(&resp.job_id).await;
        return Err(HookError::new(
            exit::CONFIG,
            "airlock: this runner host's agent runs every job in a sandbox ([sandbox] enabled = true), \
             and a persistent runner's steps run outside it: run the runner through \
             `airlock github supervise` (ephemeral mode), or set [sandbox] enabled = false for \
             hooks-only mode (see docs/github-actions.md; ask your platform team)"
                .to_string(),
        ));
    }
    let record = HookState {
        job_id: resp.job_id.clone(),
        since_ticks: own_start_ticks().unwrap_or(0),
        tracking_id: var(env, "RUNNER_TRACKING_ID").map(String::from),
        workspace: var(env, "GITHUB_WORKSPACE").map(String::from),
    };
    if let Some(dir) = state.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let saved = serde_json::to_vec(&record)
        .map_err(|e| e.to_string())
        .and_then(|b| std::fs::write(&state, b).map_err(|e| e.to_string()));
    if let Err(e) = saved {
        let _ = client.end(&resp.job_id).await;
        return Err(HookError::new(
            exit::CANTCREAT,
            format!("airlock: cannot record the job in {}: {e}", state.display()),
        ));
    }
    if let Some(why) = &resp.refused {
        let msg = refused_message(env, why);
        if fail_on_refused {
            return Err(HookError::new(exit::NOPERM, msg));
        }
        return Ok(format!("::warning::{msg}"));
    }
    write_github_env(env, resp.env.expose())?;
    Ok(bound_message(
        &resp.job_id,
        resp.rule.as_deref(),
        &resp.grants,
        source,
    ))
}

fn control_error(env: &Env, e: ControlError) -> HookError {
    match e {
        ControlError::Connect(p, err) => HookError::new(
            exit::UNAVAILABLE,
            format!("airlock: cannot reach airlockd at {} ({err}): is airlockd running, and is the runner's user in the agent's control_group? (ask your platform team)", p.display()),
        ),
        ControlError::Refused { code, message, .. } if code == crate::daemon::DRAINING_CODE => HookError::new(
            exit::UNAVAILABLE,
            format!("airlock: {message} (this runner's agent is being stopped or upgraded; re-run the job)"),
        ),
        ControlError::Refused { status, message, .. } => HookError::new(
            if status == 403 { exit::NOPERM } else { exit::DATAERR },
            format!("airlock: this job's identity was refused ({}): {message} (ask your platform team)", describe(env)),
        ),
        other => HookError::new(exit::SOFTWARE, format!("airlock: {other}")),
    }
}

/// The job's endpoint token: the file (re-read) or the variable.
fn endpoint_token(env: &Env) -> Result<Secret<String>, HookError> {
    if let Some(f) = var(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
        if let Ok(t) = std::fs::read_to_string(f) {
            return Ok(Secret::new(t.trim().to_string()));
        }
    }
    var(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN")
        .map(|t| Secret::new(t.to_string()))
        .ok_or_else(|| {
            HookError::new(
                exit::SOFTWARE,
                "airlock: this job has no endpoint token (AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)",
            )
        })
}

/// `POST` to the job's own endpoint at `path` with the job's token (and the bind ticket).
async fn post_to_endpoint(
    env: &Env,
    path: &str,
    ticket: Option<&Secret<String>>,
    body: Vec<u8>,
) -> Result<crate::http_client::Response, HookError> {
    let full = var(env, "AWS_CONTAINER_CREDENTIALS_FULL_URI").unwrap_or_default();
    let base = full.strip_suffix(CONTAINER_PATH).unwrap_or(full);
    let url = format!("{base}{path}");
    let token = endpoint_token(env)?;
    let client = crate::http_client::HttpClient::new()
        .map_err(|e| HookError::new(exit::SOFTWARE, format!("airlock: {e}")))?;
    let mut b = http::Request::post(&url)
        .header(http::header::AUTHORIZATION, token.expose().as_str())
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(t) = ticket {
        b = b.header(BIND_TICKET_HEADER, t.expose().as_str());
    }
    let http_req = b
        .body(Full::new(Bytes::from(body)))
        .map_err(|_| HookError::new(exit::SOFTWARE, format!("airlock: bad endpoint URL {url}")))?;
    client
        .send(http_req, Duration::from_secs(20))
        .await
        .map_err(|e| {
            HookError::new(
                exit::UNAVAILABLE,
                format!("airlock: cannot reach this job's airlock endpoint: {e}"),
            )
        })
}

/// Claims the job's one bind (`POST /v1/bind/claim`): the ticket the bind needs.
async fn claim_bind(env: &Env) -> Result<Secret<String>, HookError> {
    let r = post_to_endpoint(env, BIND_CLAIM_PATH, None, Vec::new()).await?;
    let v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
    match v.get("ticket").and_then(Value::as_str) {
        Some(t) if r.status.is_success() => Ok(Secret::new(t.to_string())),
        _ => Err(HookError::new(
            exit::NOPERM,
            format!(
                "airlock: this job's bind was claimed already ({}): job-started runs once per job, before the first step; the refusal is audited",
                v["Code"].as_str().unwrap_or("refused")
            ),
        )),
    }
}

async fn bind_through_endpoint(
    env: &Env,
    ticket: &Secret<String>,
    req: BindRequest,
) -> Result<Value, HookError> {
    let body =
        serde_json::to_vec(&req).map_err(|e| HookError::new(exit::SOFTWARE, e.to_string()))?;
    let r = post_to_endpoint(env, BIND_PATH, Some(ticket), body).await?;
    let v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
    if !r.status.is_success() {
        let code = v["Code"].as_str().unwrap_or("Error");
        let msg = v["Message"].as_str().unwrap_or("no message");
        return Err(HookError::new(
            if r.status.as_u16() == 403 { exit::NOPERM } else { exit::DATAERR },
            format!("airlock: this job's identity was refused ({}): {code}: {msg} (ask your platform team)", describe(env)),
        ));
    }
    Ok(v)
}

/// `airlock github job-completed`.
pub async fn job_completed(env: &Env, socket: &Path) -> Result<String, HookError> {
    if in_job(env) {
        return Ok(format!(
            "airlock: job {}: the runner exits after this job and the supervisor ends and wipes its sandbox",
            var(env, "AIRLOCK_JOB_ID").unwrap_or("?")
        ));
    }
    let state = state_file(env);
    let record: Option<HookState> = std::fs::read_to_string(&state)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let mut notes = Vec::new();
    let mut failed = Vec::new();
    if let Some(rec) = &record {
        match Client::new(socket).end(&rec.job_id).await {
            Ok(_) => notes.push(format!("job {} ended", rec.job_id)),
            Err(ControlError::Refused { status: 404, .. }) => {
                notes.push(format!("job {} had already ended", rec.job_id))
            }
            Err(e) => failed.push(format!("ending job {}: {e}", rec.job_id)),
        }
    } else {
        notes.push("no job recorded by job-started".into());
    }
    let tracking = record
        .as_ref()
        .and_then(|r| r.tracking_id.clone())
        .or_else(|| var(env, "RUNNER_TRACKING_ID").map(String::from));
    let since = record.as_ref().map(|r| r.since_ticks);
    let killed = kill_leftovers(tracking.as_deref(), since);
    notes.push(format!("{killed} leftover processes killed"));
    let workspace = record
        .as_ref()
        .and_then(|r| r.workspace.clone())
        .or_else(|| var(env, "GITHUB_WORKSPACE").map(String::from));
    let home = var(env, "HOME").map(PathBuf::from);
    let (wiped, errs) = wipe_job_files(
        workspace.as_deref().map(Path::new),
        home.as_deref(),
        var(env, "RUNNER_TEMP").map(Path::new),
    );
    notes.push(format!("{wiped} paths wiped"));
    failed.extend(errs);
    let _ = std::fs::remove_file(&state);
    if failed.is_empty() {
        Ok(format!("airlock: {}", notes.join("; ")))
    } else {
        Err(HookError::new(
            exit::SOFTWARE,
            format!(
                "airlock: {}; FAILED: {}",
                notes.join("; "),
                failed.join("; ")
            ),
        ))
    }
}

/// This process's start time in clock ticks since boot (`/proc/self/stat` field 22).
fn own_start_ticks() -> Option<u64> {
    start_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

fn start_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

fn ppid_of(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// Kill what the job left running: every process of this user carrying the job's
/// `RUNNER_TRACKING_ID`, and — when the hook does not run as root — every process of this
/// user started after the job-started hook (a job can unset `RUNNER_TRACKING_ID`), except
/// this hook and its ancestors (the runner). Not a guarantee: see docs/github-actions.md.
fn kill_leftovers(tracking: Option<&str>, since: Option<u64>) -> usize {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let me = std::process::id() as i32;
    let uid = nix::unistd::getuid().as_raw();
    let mut ancestors = std::collections::HashSet::new();
    let mut p = me;
    while p > 1 && ancestors.insert(p) {
        match std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| ppid_of(&s))
        {
            Some(pp) => p = pp,
            None => break,
        }
    }
    let want = tracking.map(|t| format!("RUNNER_TRACKING_ID={t}").into_bytes());
    let mut total = 0;
    // Twice more than once: a process forked while we walked is caught on the next round.
    for _ in 0..5 {
        let mut round = 0;
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return total;
        };
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if ancestors.contains(&pid) {
                continue;
            }
            let Ok(meta) = std::fs::metadata(e.path()) else {
                continue;
            };
            if std::os::unix::fs::MetadataExt::uid(&meta) != uid {
                continue;
            }
            let tagged = want.as_ref().is_some_and(|w| {
                std::fs::read(e.path().join("environ"))
                    .map(|env| env.split(|b| *b == 0).any(|kv| kv == w.as_slice()))
                    .unwrap_or(false)
            });
            let late = uid != 0
                && since.is_some_and(|s| {
                    s > 0
                        && std::fs::read_to_string(e.path().join("stat"))
                            .ok()
                            .and_then(|st| start_ticks(&st))
                            .is_some_and(|t| t >= s)
                });
            if (tagged || late) && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                round += 1;
            }
        }
        total += round;
        if round == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    total
}

/// Credential locations a job may leave in the runner user's home (hooks-only mode).
pub const HOME_CREDENTIALS: &[&str] = &[
    ".aws",
    ".docker/config.json",
    ".npmrc",
    ".yarnrc.yml",
    ".pypirc",
    ".netrc",
    ".kube",
    ".git-credentials",
    ".config/git/credentials",
    ".config/gh/hosts.yml",
    ".gnupg",
    ".ssh/agent",
];

/// Remove the workspace's contents, the runner temp's contents, the home's credential
/// files, git's global credential helpers and extra headers, and ssh-agent sockets in
/// `/tmp` of this user. Returns (paths removed, errors).
fn wipe_job_files(
    workspace: Option<&Path>,
    home: Option<&Path>,
    temp: Option<&Path>,
) -> (usize, Vec<String>) {
    let n = std::cell::Cell::new(0usize);
    let mut errs = Vec::new();
    let remove = |p: &Path, errs: &mut Vec<String>| match std::fs::symlink_metadata(p) {
        Ok(m) => {
            let r = if m.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
            match r {
                Ok(()) => n.set(n.get() + 1),
                Err(e) => errs.push(format!("{}: {e}", p.display())),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errs.push(format!("{}: {e}", p.display())),
    };
    for dir in [workspace, temp].into_iter().flatten() {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                remove(&e.path(), &mut errs);
            }
        }
    }
    if let Some(h) = home {
        for rel in HOME_CREDENTIALS {
            remove(&h.join(rel), &mut errs);
        }
        let gitconfig = h.join(".gitconfig");
        if gitconfig.exists() {
            match scrub_gitconfig(&gitconfig) {
                Ok(true) => n.set(n.get() + 1),
                Ok(false) => {}
                Err(e) => errs.push(format!("{}: {e}", gitconfig.display())),
            }
        }
    }
    let uid = nix::unistd::getuid().as_raw();
    if let Ok(rd) = std::fs::read_dir("/tmp") {
        for e in rd.flatten() {
            let name = e.file_name();
            let is_agent = name.to_str().is_some_and(|s| s.starts_with("ssh-"));
            let mine = e
                .metadata()
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == uid)
                .unwrap_or(false);
            if is_agent && mine && uid != 0 {
                remove(&e.path(), &mut errs);
            }
        }
    }
    (n.get(), errs)
}

/// Drop `[credential…]` sections, `[http…] extraheader` and `[url…] insteadOf` keys (which
/// can carry tokens) and `[include]`s from a git config file. True when it changed.
fn scrub_gitconfig(path: &Path) -> std::io::Result<bool> {
    let text = std::fs::read_to_string(path)?;
    let mut out = String::new();
    let mut section = String::new();
    let mut changed = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            section = t
                .trim_start_matches('[')
                .split([']', ' ', '"'])
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            if section == "credential" || section == "include" || section == "includeif" {
                changed = true;
                continue;
            }
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let key = t
            .split('=')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let drop = section == "credential"
            || section == "include"
            || section == "includeif"
            || (section == "http" && key == "extraheader")
            || (section == "url" && (key == "insteadof" || key == "pushinsteadof"));
        if drop {
            changed = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if changed {
        std::fs::write(path, out)?;
    }
    Ok(changed)
}

// ---------------------------------------------------------------------------------------
// Supervisor
// ---------------------------------------------------------------------------------------

/// `/etc/airlock/github-runners.toml`: the supervisor's own file (read by
/// `airlock github supervise`, never by airlockd).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorFile {
    pub github: SupervisorConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorConfig {
    /// The unpacked Actions runner (`run.sh`, `bin/`, `externals/`); copied into each
    /// slot's sandbox, whose host filesystem is read-only.
    pub runner_dir: PathBuf,
    /// How many runners run at once.
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// Run once per slot start; prints one JIT runner configuration (`encoded_jit_config`
    /// of `POST .../actions/runners/generate-jitconfig`) on stdout. Gets `AIRLOCK_SLOT`.
    pub jitconfig_command: Vec<String>,
    /// `egress-baseline` (default: the policies' `[egress] baseline`, block mode) or
    /// `outbound`.
    #[serde(default = "default_network")]
    pub network: String,
    /// Where `job-started` and `job-completed` are (`.sh` names are what the runner runs).
    #[serde(default = "default_hooks_dir")]
    pub hooks_dir: PathBuf,
    /// The `airlock` binary the hooks run inside the sandbox.
    #[serde(default = "default_airlock_bin")]
    pub airlock_bin: PathBuf,
    /// The audience of the job's OIDC token; it must be one of the GitHub issuer's
    /// `audiences` in airlockd's configuration. Default: asked of airlockd at start
    /// ("airlock" when it trusts that, else the first audience it lists).
    #[serde(default)]
    pub audience: Option<String>,
    /// `fail` (default): a job no rule grants anything fails at its job-started hook;
    /// `warn`: it runs without AWS credentials.
    #[serde(default = "default_on_refused")]
    pub on_refused: String,
    /// Longest a slot's job may run, e.g. "6h" (at most the agent's `[jobs] max_lifetime`).
    #[serde(default, with = "humantime_opt")]
    pub max_lifetime: Option<Duration>,
    /// Pause before a slot starts again after a failure.
    #[serde(default = "default_restart_delay", with = "humantime_req")]
    pub restart_delay: Duration,
    /// Stop after this many jobs per slot (tests; 0: never).
    #[serde(default)]
    pub max_jobs_per_slot: u32,
    /// The file this configuration was read from (for messages).
    #[serde(skip)]
    pub source: PathBuf,
}

fn default_slots() -> u32 {
    1
}
fn default_network() -> String {
    "egress-baseline".into()
}
fn default_hooks_dir() -> PathBuf {
    "/usr/share/airlock/integrations/github".into()
}
fn default_airlock_bin() -> PathBuf {
    "/usr/bin/airlock".into()
}
fn default_on_refused() -> String {
    "fail".into()
}
fn default_restart_delay() -> Duration {
    Duration::from_secs(5)
}

mod humantime_opt {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<std::time::Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

mod humantime_req {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        humantime::parse_duration(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl SupervisorConfig {
    pub fn load(path: &Path) -> Result<SupervisorConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let f: SupervisorFile =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut c = f.github;
        c.source = path.to_path_buf();
        if c.slots == 0 || c.slots > 64 {
            return Err(format!("{}: [github] slots: 1 to 64", path.display()));
        }
        if c.jitconfig_command.is_empty() {
            return Err(format!(
                "{}: [github] jitconfig_command is empty",
                path.display()
            ));
        }
        if !matches!(c.network.as_str(), "egress-baseline" | "outbound") {
            return Err(format!(
                "{}: [github] network: \"egress-baseline\" or \"outbound\"",
                path.display()
            ));
        }
        if !matches!(c.on_refused.as_str(), "fail" | "warn") {
            return Err(format!(
                "{}: [github] on_refused: \"fail\" or \"warn\"",
                path.display()
            ));
        }
        if !c.runner_dir.join("run.sh").is_file() {
            return Err(format!(
                "{}: [github] runner_dir {}: no run.sh there",
                path.display(),
                c.runner_dir.display()
            ));
        }
        if !Path::new(&c.jitconfig_command[0]).is_absolute() {
            return Err(format!(
                "{}: [github] jitconfig_command: {:?} is not an absolute path (the supervisor looks no program up in PATH)",
                path.display(),
                c.jitconfig_command[0]
            ));
        }
        for p in [&c.hooks_dir, &c.airlock_bin, &c.runner_dir] {
            if !p.is_absolute() {
                return Err(format!(
                    "{}: {} is not an absolute path",
                    path.display(),
                    p.display()
                ));
            }
        }
        Ok(c)
    }
}

/// What runs in each slot's sandbox: copy the runner into the job's home (the host's
/// filesystem is read-only there), point its `.env` at the hooks, unpack the JIT
/// configuration arriving on stdin into the runner's own files (what the runner does itself
/// with `--jitconfig`, so the configuration is never in an argv or an environment a step
/// could read in `/proc`, nor on disk outside the sandbox or in the agent's records), and
/// run the runner.
const SLOT_SCRIPT: &str = r#"set -eu
src=$1; hooks=$2; airlock=$3; audience=$4; on_refused=$5
dst="$HOME/runner"
mkdir -p "$dst"
cp -a "$src/." "$dst/"
cd "$dst"
{
  printf '\n'
  printf 'ACTIONS_RUNNER_HOOK_JOB_STARTED=%s\n' "$hooks/job-started.sh"
  printf 'ACTIONS_RUNNER_HOOK_JOB_COMPLETED=%s\n' "$hooks/job-completed.sh"
  printf 'AIRLOCK_OIDC_AUDIENCE=%s\n' "$audience"
  printf 'AIRLOCK_GITHUB_ON_REFUSED=%s\n' "$on_refused"
} >> .env
"$airlock" github unpack-jitconfig --dir "$dst"
exec ./run.sh
"#;

/// Most files a JIT configuration may hold, and the largest of them.
const JIT_MAX_FILES: usize = 8;
const JIT_MAX_FILE: usize = 64 * 1024;

/// `airlock github unpack-jitconfig`: the encoded JIT configuration on stdin (one line:
/// base64 of a JSON object of file name → base64 contents, as
/// `POST .../actions/runners/generate-jitconfig` returns it) written as those files
/// (`.runner`, `.credentials`, `.credentials_rsaparams`) into the runner directory `dir`,
/// mode 0600 — which is what the runner itself does when it is given `--jitconfig`.
pub fn unpack_jitconfig(dir: &Path, encoded: &str) -> Result<Vec<String>, String> {
    use base64::Engine;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let b64 = base64::engine::general_purpose::STANDARD;
    let json = b64
        .decode(encoded.trim())
        .map_err(|_| "the JIT configuration is not base64".to_string())?;
    let files: BTreeMap<String, String> = serde_json::from_slice(&json)
        .map_err(|_| "the JIT configuration is not a JSON object of file names".to_string())?;
    if files.is_empty() || files.len() > JIT_MAX_FILES {
        return Err(format!(
            "the JIT configuration holds {} files (1 to {JIT_MAX_FILES})",
            files.len()
        ));
    }
    let mut written = Vec::new();
    for (name, contents) in &files {
        let plain = name.starts_with('.')
            && name.len() <= 64
            && name != "."
            && name != ".."
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !plain {
            return Err(format!("the JIT configuration names a file {name:?}"));
        }
        let data = b64
            .decode(contents)
            .map_err(|_| format!("the JIT configuration's {name} is not base64"))?;
        if data.len() > JIT_MAX_FILE {
            return Err(format!("the JIT configuration's {name} is too large"));
        }
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc_o_nofollow())
            .open(&path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        f.write_all(&data)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(name.clone());
    }
    Ok(written)
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// The audience the slots' hooks request, asked of airlockd before any slot starts: the
/// file's `audience` if airlockd trusts it for GitHub, else the one airlockd prefers. An
/// exit code and the message when there is none.
pub async fn supervisor_audience(
    cfg: &SupervisorConfig,
    client: &Client,
) -> Result<String, (i32, String)> {
    let answer = client.issuers().await.map_err(|e| {
        (
            exit::UNAVAILABLE,
            format!("cannot ask airlockd which OIDC audiences it trusts: {e}"),
        )
    })?;
    let source = format!("`audience` in {}", cfg.source.display());
    let wanted = cfg.audience.as_deref().map(|a| (a, source.as_str()));
    match crate::audience::choose(&answer, crate::identity::Provider::Github, wanted) {
        Ok(a) => {
            tracing::info!(audience = %a, "jobs request their OIDC token for this audience");
            Ok(a)
        }
        // Without a GitHub issuer only runner-attested claims can work: not a reason to
        // stop, unless the operator asked for an audience explicitly.
        Err(e @ crate::audience::AudienceError::NoIssuer { .. }) if cfg.audience.is_none() => {
            tracing::warn!("{e}; jobs with `id-token: write` will be refused");
            Ok(DEFAULT_AUDIENCE.to_string())
        }
        Err(e) => Err((exit::CONFIG, format!("not starting: {e}"))),
    }
}

/// `airlock github supervise`: keep `slots` runners going, one job each, each in a fresh
/// sandbox. Returns when every slot stopped (`max_jobs_per_slot`) or on SIGTERM/SIGINT.
pub async fn supervise(cfg: SupervisorConfig, socket: PathBuf) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for slot in 0..cfg.slots {
        let cfg = cfg.clone();
        let client = Client::new(&socket);
        let stop = stop_rx.clone();
        tasks.spawn(async move { run_slot(slot, cfg, client, stop).await });
    }
    loop {
        tokio::select! {
            r = tasks.join_next() => match r {
                None => return Ok(()),
                Some(_) => continue,
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping: ending every slot's job");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn run_slot(
    slot: u32,
    cfg: SupervisorConfig,
    client: Client,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut jobs = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        let outcome = one_job(slot, &cfg, &client, &mut stop).await;
        jobs += 1;
        let pause = match &outcome {
            Ok(code) => {
                tracing::info!(
                    slot,
                    code,
                    "runner exited; its sandbox was wiped; the slot starts again"
                );
                Duration::from_millis(200)
            }
            Err(e) => {
                tracing::error!(slot, "slot failed: {e}");
                cfg.restart_delay
            }
        };
        if cfg.max_jobs_per_slot > 0 && jobs >= cfg.max_jobs_per_slot {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One runner: start a bind-later job with a sandbox, get a JIT config, run the runner in
/// it, end (and so wipe) the job when the runner exits. Returns the runner's exit code.
async fn one_job(
    slot: u32,
    cfg: &SupervisorConfig,
    client: &Client,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<i32, String> {
    let argv = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        SLOT_SCRIPT.into(),
        "airlock-slot".into(),
        cfg.runner_dir.display().to_string(),
        cfg.hooks_dir.display().to_string(),
        cfg.airlock_bin.display().to_string(),
        cfg.audience
            .clone()
            .unwrap_or_else(|| DEFAULT_AUDIENCE.to_string()),
        cfg.on_refused.clone(),
    ];
    let job = client
        .start(&StartRequest {
            runner: Some(format!("github-slot-{slot}")),
            bind_later: true,
            endpoint_bind: true,
            runner_network: Some(cfg.network.clone()),
            max_lifetime_secs: cfg.max_lifetime.map(|d| d.as_secs()),
            command: Some(crate::control::JobCommand {
                argv,
                env: BTreeMap::new(),
            }),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot start the slot's job: {e}"))?;
    let Some(sb) = &job.sandbox else {
        let _ = client.end(&job.job_id).await;
        return Err("airlockd runs without [sandbox]: ephemeral runner slots need it".into());
    };
    // The runner is registered only for a job the agent took: a draining agent refuses the
    // start above, and no runner is registered with GitHub that could never run.
    let jit = match jit_config(slot, cfg).await {
        Ok(j) => j,
        Err(e) => {
            let _ = client.end(&job.job_id).await;
            return Err(e);
        }
    };
    tracing::info!(slot, job = %job.job_id, "runner starting in a fresh sandbox");
    let mut line = jit.expose().clone();
    line.push('\n');
    let run = crate::shim_run::run(
        client,
        &job.job_id,
        sb,
        crate::shim_run::Input::Bytes(line.into_bytes()),
    );
    let status = tokio::select! {
        s = run => s.map(|s| s.code).map_err(|e| e.to_string()),
        // Ending the job below kills the runner with its cgroup.
        _ = stop.changed() => Err("stopped".to_string()),
    };
    // Ending the job kills whatever is left in its cgroup and wipes the sandbox.
    let ended = client.end(&job.job_id).await;
    if let Err(e) = &ended {
        tracing::error!(slot, job = %job.job_id, "cannot end the slot's job: {e}");
    }
    let code = status?;
    ended.map_err(|e| format!("cannot end job {}: {e}", job.job_id))?;
    Ok(code)
}

/// What `jitconfig_command` gets of the supervisor's environment besides `PATH` and
/// `AIRLOCK_SLOT` (and the proxy settings): where it may write, its language.
const JITCONFIG_ENV: &[&str] = &["HOME", "LANG"];

async fn jit_config(slot: u32, cfg: &SupervisorConfig) -> Result<Secret<String>, String> {
    // An environment of our own: the supervisor's variables (systemd's) are not the
    // command's business, and nothing reaches a program path through them.
    let pass: Vec<&str> = JITCONFIG_ENV
        .iter()
        .chain(crate::childenv::PROXY)
        .copied()
        .collect();
    let mut cmd = crate::childenv::command(Path::new(&cfg.jitconfig_command[0]), &pass, |k| {
        std::env::var(k).ok()
    })
    .map_err(|e| format!("jitconfig_command: {e}"))?;
    cmd.args(&cfg.jitconfig_command[1..])
        .env("AIRLOCK_SLOT", slot.to_string());
    let out = cmd
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .map_err(|_| "jitconfig_command took longer than 60 s".to_string())?
        .map_err(|e| {
            format!(
                "cannot run jitconfig_command {}: {e}",
                cfg.jitconfig_command[0]
            )
        })?;
    if !out.status.success() {
        return Err(format!("jitconfig_command exited with {}", out.status));
    }
    let text = String::from_utf8(out.stdout)
        .map_err(|_| "jitconfig_command printed non-UTF-8".to_string())?;
    let jit = text.trim();
    if jit.is_empty() || jit.contains('\n') {
        return Err(
            "jitconfig_command must print exactly one line (the encoded JIT config)".into(),
        );
    }
    Ok(Secret::new(jit.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_configuration_loads_once_runner_dir_has_a_runner() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/github-runners.toml");
        let text = std::fs::read_to_string(&example).unwrap();
        // As shipped it names /opt/actions-runner, which this machine has no runner in.
        let err = {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("gh.toml");
            std::fs::write(
                &p,
                text.replace("/opt/actions-runner", "/nonexistent/runner"),
            )
            .unwrap();
            SupervisorConfig::load(&p).unwrap_err()
        };
        assert!(err.contains("no run.sh there"), "{err}");
        let runner = tempfile::tempdir().unwrap();
        std::fs::write(runner.path().join("run.sh"), "#!/bin/sh\n").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gh.toml");
        std::fs::write(
            &p,
            text.replace("/opt/actions-runner", &runner.path().display().to_string()),
        )
        .unwrap();
        let c = SupervisorConfig::load(&p).unwrap();
        assert_eq!(c.slots, 2);
        assert_eq!(c.network, "egress-baseline");
        assert_eq!(c.on_refused, "fail");
        assert_eq!(c.jitconfig_command, vec!["/usr/local/bin/mint-jit-config"]);
    }

    #[test]
    fn a_jit_configuration_unpacks_into_the_runners_files_and_nothing_else() {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let dir = tempfile::tempdir().unwrap();
        let config = b64(&serde_json::json!({
            ".runner": b64("{\"agentId\": 7}"),
            ".credentials": b64("{\"scheme\": \"OAuth\"}"),
        })
        .to_string());
        let files = unpack_jitconfig(dir.path(), &format!("{config}\n")).unwrap();
        assert_eq!(files, [".credentials", ".runner"]);
        let runner = std::fs::read_to_string(dir.path().join(".runner")).unwrap();
        assert_eq!(runner, "{\"agentId\": 7}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(".credentials"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        for (bad, why) in [
            (
                b64(&serde_json::json!({"../x": b64("a")}).to_string()),
                "names a file",
            ),
            (
                b64(&serde_json::json!({"run.sh": b64("a")}).to_string()),
                "names a file",
            ),
            (
                b64(&serde_json::json!({".runner": "%%%"}).to_string()),
                "not base64",
            ),
            ("not base64 at all".to_string(), "not base64"),
            (b64("[1, 2]"), "JSON object"),
        ] {
            let e = unpack_jitconfig(dir.path(), &bad).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn a_draining_agent_is_not_reported_as_a_refused_identity() {
        let env = Env::new();
        let e = control_error(
            &env,
            ControlError::Refused {
                status: 503,
                code: crate::daemon::DRAINING_CODE.into(),
                message: crate::daemon::DRAINING_MESSAGE.into(),
            },
        );
        assert_eq!(e.code, exit::UNAVAILABLE);
        assert!(
            e.message.contains(crate::daemon::DRAINING_MESSAGE),
            "{}",
            e.message
        );
        assert!(e.message.contains("re-run the job"), "{}", e.message);
        assert!(!e.message.contains("identity was refused"), "{}", e.message);
    }

    #[test]
    fn start_ticks_survive_odd_command_names() {
        let stat =
            "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(start_ticks(stat), Some(98765));
        assert_eq!(ppid_of(stat), Some(1));
    }

    #[test]
    fn attested_claims_take_githubs_shape() {
        let env: Env = [
            ("GITHUB_REPOSITORY", "acme/web"),
            ("GITHUB_REF", "refs/heads/main"),
            ("GITHUB_EVENT_NAME", "push"),
            ("GITHUB_RUN_ID", "7"),
            ("RUNNER_NAME", "r1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = attested_claims(&env).unwrap();
        assert_eq!(c["repository_owner"], "acme");
        assert_eq!(c["issuer"], "attested:github-runner:r1");
        let id = crate::identity::from_attested(c).unwrap();
        assert_eq!(id.repository.as_deref(), Some("acme/web"));
        assert_eq!(id.git_ref.as_deref(), Some("refs/heads/main"));
        assert!(attested_claims(&Env::new()).is_err());
    }

    #[test]
    fn gitconfig_loses_credentials_and_extraheaders_only() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(".gitconfig");
        std::fs::write(
            &p,
            "[user]\n\tname = ci\n[credential]\n\thelper = store\n[http \"https://github.com/\"]\n\textraheader = AUTHORIZATION: basic abc\n\tsslVerify = true\n[url \"https://x:tok@github.com/\"]\n\tinsteadOf = https://github.com/\n",
        )
        .unwrap();
        assert!(scrub_gitconfig(&p).unwrap());
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(t.contains("name = ci") && t.contains("sslVerify"), "{t}");
        assert!(
            !t.contains("helper") && !t.contains("extraheader") && !t.contains("insteadOf"),
            "{t}"
        );
        assert!(!scrub_gitconfig(&p).unwrap());
    }
}

// ---------------------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------------------

/// `airlock github …`
#[derive(Debug, clap::Subcommand)]
pub enum GithubCmd {
    /// The runner's job-started hook: bind the job's identity (OIDC token when the workflow
    /// has `id-token: write`, else runner-attested claims) and append the AWS environment to
    /// GITHUB_ENV. A refusal fails the job.
    JobStarted,
    /// The runner's job-completed hook: end the job (its credentials stop working); in
    /// hooks-only mode also kill what the job left running and wipe its files.
    JobCompleted,
    /// Keep [github] slots ephemeral runners going, each in a fresh sandbox, wiped and
    /// restarted after its one job.
    Supervise {
        /// The supervisor's configuration.
        #[arg(long, default_value = "/etc/airlock/github-runners.toml")]
        github_config: PathBuf,
    },
    /// Inside an ephemeral slot's sandbox: read the runner's encoded JIT configuration on
    /// stdin and write its files into the runner directory (as the runner does with
    /// --jitconfig), so it is never in a command line or an environment.
    UnpackJitconfig {
        /// The runner directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

/// The control socket: `--socket`, else the agent's configuration (when readable), else the
/// default path.
pub fn socket_path(socket: Option<PathBuf>, config: &Path) -> PathBuf {
    socket.unwrap_or_else(|| {
        crate::config::Config::load(config)
            .map(|c| c.agent.control_socket)
            .unwrap_or_else(|_| "/run/airlock/control.sock".into())
    })
}

/// Run `airlock github …`; returns the exit code (messages go to stdout/stderr).
pub async fn run_cli(cmd: GithubCmd, socket: Option<PathBuf>, config: &Path) -> i32 {
    let env: Env = std::env::vars().collect();
    let socket = socket_path(socket, config);
    let r = match cmd {
        GithubCmd::JobStarted => job_started(&env, &socket).await,
        GithubCmd::JobCompleted => job_completed(&env, &socket).await,
        GithubCmd::UnpackJitconfig { dir } => {
            let mut line = String::new();
            let read = std::io::Read::read_to_string(
                &mut std::io::Read::take(std::io::stdin(), 1 << 20),
                &mut line,
            );
            return match read
                .map_err(|e| format!("cannot read the JIT configuration on stdin: {e}"))
                .and_then(|_| unpack_jitconfig(&dir, &line))
            {
                Ok(files) => {
                    eprintln!("airlock: runner configured ({})", files.join(", "));
                    exit::OK
                }
                Err(e) => {
                    eprintln!("airlock: {e}");
                    exit::DATAERR
                }
            };
        }
        GithubCmd::Supervise { github_config } => {
            let cfg = match SupervisorConfig::load(&github_config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("airlock: {e}");
                    return exit::CONFIG;
                }
            };
            let mut cfg = cfg;
            match supervisor_audience(&cfg, &Client::new(&socket)).await {
                // From here on, the audience every slot's runner requests.
                Ok(a) => cfg.audience = Some(a),
                Err((code, msg)) => {
                    eprintln!("airlock: {msg}");
                    return code;
                }
            }
            return match supervise(cfg, socket).await {
                Ok(()) => exit::OK,
                Err(e) => {
                    eprintln!("airlock: {e}");
                    exit::SOFTWARE
                }
            };
        }
    };
    match r {
        Ok(line) => {
            println!("{line}");
            exit::OK
        }
        Err(e) => {
            // The runner shows stdout in the job's log; `::error::` makes it an annotation.
            println!("::error::{}", e.message);
            eprintln!("{}", e.message);
            e.code
        }
    }
}
