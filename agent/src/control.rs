//! The control API: JSON over HTTP/1.1 on a root-only Unix socket.
//!
//! Runner integrations (and `airlock`) start, bind, end and list jobs here. The socket is
//! created mode 0600 (0660 with a configured group) in a 0755 directory, and every
//! connection's peer credentials are checked again: only root (or the control group)
//! gets an answer.
//!
//! | method and path              | body                         | answer            |
//! |------------------------------|------------------------------|-------------------|
//! | `POST /v1/jobs`              | [`StartRequest`]             | [`StartResponse`] |
//! | `POST /v1/jobs/<id>/bind`    | [`BindRequest`]              | [`StartResponse`] |
//! | `POST /v1/jobs/<id>/exec`    | [`JobCommand`]               | [`ExecResponse`]  |
//! | `POST /v1/jobs/<id>/run`     | [`RunRequest`] (upgrade)     | 101, then [`run_wire`] |
//! | `DELETE /v1/jobs/<id>`       | —                            | [`EndResponse`]   |
//! | `GET /v1/jobs`               | —                            | `[JobSummary]`    |
//! | `GET /v1/slots`              | —                            | `[TaintedSlot]`   |
//! | `DELETE /v1/slots/<n>`       | —                            | `TaintedSlot`     |
//! | `POST /v1/drain`             | [`DrainRequest`] (root only) | [`DrainStatus`]   |
//! | `GET /v1/drain`              | — (root only)                | [`DrainStatus`]   |
//! | `DELETE /v1/drain`           | — (root only)                | [`DrainStatus`]   |
//! | `GET /v1/issuers`            | —                            | [`IssuersAnswer`](crate::audience::IssuersAnswer) |
//!
//! Errors are `{"error": "...", "code": "..."}` with a 4xx/5xx status.
//!
//! Who may ask: root, and the members of the control group (primary or supplementary,
//! read from the caller's `/proc/<pid>/status`). A caller that is not root acts only on
//! the jobs it owns: every job it starts names its owner process (the caller or one of its
//! ancestors, of the caller's user), and it may end, bind, exec, run or list a job only
//! when that owner is the caller or one of its ancestors. So a job's step that reaches the
//! socket (a persistent GitHub runner's steps run as the runner's user) can touch its own
//! job at most, never another runner's.
//!
//! `run` is how a sandboxed command starts: the agent itself runs the sandbox init with the
//! caller's standard descriptors (passed over the socket), so no runner integration needs
//! root, and nothing a pipeline sets in a hook's environment (`PATH`, `LD_PRELOAD`) ever
//! reaches a root process.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};

use crate::secret::Secret;

/// Largest control request (a token or a claims document is a few KiB).
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create control socket {0}: {1}")]
    Bind(PathBuf, std::io::Error),
    #[error("cannot reach airlockd at {0}: {1} (is airlockd running, and are you root?)")]
    Connect(PathBuf, std::io::Error),
    #[error("control request failed: {0}")]
    Protocol(String),
    /// The agent answered with an error.
    #[error("{message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
}

/// Start a job. Exactly one of `oidc_token` and `claims`, or neither with `bind_later`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    #[serde(default, skip_serializing_if = "Option::is_none", with = "secret_opt")]
    pub oidc_token: Option<Secret<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// The identity arrives later through `bind` (e.g. GitHub's job-started hook).
    #[serde(default)]
    pub bind_later: bool,
    /// With `bind_later`: the job may bind once itself, with its endpoint token, through
    /// `POST /v1/bind` on its own endpoint (an ephemeral GitHub runner's job-started hook,
    /// which runs inside the sandbox and cannot reach this socket).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub endpoint_bind: bool,
    /// With `bind_later` and the sandbox: the network of the sandbox, built before any
    /// rule decides: `"egress-baseline"` (the policies' `[egress] baseline` only, block
    /// mode) or `"outbound"`. Absent: the agent's default (endpoint only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_network: Option<String>,
    /// Shorter lifetime than the agent's `[jobs] max_lifetime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_secs: Option<u64>,
    /// The command the job runs (`airlock run`): with `[sandbox]` enabled the agent writes
    /// the shim's spec for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<JobCommand>,
    /// The process the job belongs to: the caller itself or one of its ancestors, of the
    /// caller's user. The job ends when that process exits, and a caller that is not root
    /// may act on the job only from that process or its descendants. Required from callers
    /// that are not root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_pid: Option<i32>,
    /// More host paths to hide from the job's sandbox (absolute; at most
    /// [`MAX_EXTRA_HIDE`]): e.g. the Buildkite agent's build path, where other pipelines'
    /// checkouts are. Hiding can only take from what a job sees.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hide: Vec<PathBuf>,
}

/// Most extra paths a start request may hide.
pub const MAX_EXTRA_HIDE: usize = 16;

/// A job's command and the caller's environment (the agent keeps only the allowed part).
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobCommand {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
}

impl std::fmt::Debug for JobCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The caller's environment may hold anything: only its names are shown.
        f.debug_struct("JobCommand")
            .field("argv", &self.argv)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A sandboxed command the agent prepared, to be started with `run` (once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxStart {
    /// The name of the prepared command within its job (`spec`, `exec-2`, …).
    pub run: String,
}

/// `POST /v1/jobs/<id>/run`: start a prepared command with the caller's descriptors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    pub run: String,
}

/// A command to run in a started job's existing sandbox (`airlock job exec`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecResponse {
    pub job_id: String,
    /// The job's exec count, from 1 (also in the `job_exec` audit record).
    pub exec: u64,
    pub sandbox: SandboxStart,
}

/// Bind the identity of a job started with `bind_later` (once).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindRequest {
    #[serde(default, skip_serializing_if = "Option::is_none", with = "secret_opt")]
    pub oidc_token: Option<Secret<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StartResponse {
    pub job_id: String,
    /// Base URL of the job's endpoint.
    pub endpoint: String,
    #[serde(with = "secret_str")]
    pub token: Secret<String>,
    pub token_file: PathBuf,
    /// The variables the job's processes need (contains the token).
    #[serde(with = "secret_env")]
    pub env: Secret<BTreeMap<String, String>>,
    pub identity: Option<String>,
    /// The verified identity's repository (GitHub `owner/repo`, GitLab project path,
    /// Buildkite `organisation/pipeline`) and CI job id, for integrations that must check
    /// what their environment claims against what the token says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_job_id: Option<String>,
    pub rule: Option<String>,
    pub grants: Vec<String>,
    pub refused: Option<String>,
    pub flags: Vec<String>,
    /// Set when the job runs in a sandbox and a command was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxStart>,
    /// The job has a sandbox: its endpoint and environment are for processes inside it
    /// (`airlock run`, `airlock job exec`), not for the caller's own.
    #[serde(default)]
    pub sandboxed: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EndResponse {
    pub job_id: String,
    pub ended: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSummary {
    pub job_id: String,
    pub runner: Option<String>,
    pub identity: Option<String>,
    pub rule: Option<String>,
    pub grants: Vec<String>,
    pub refused: Option<String>,
    pub endpoint: String,
    pub created: String,
    pub deadline: String,
    /// The process the job belongs to, if it names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_pid: Option<i32>,
}

/// A sandbox slot that takes no job because a wipe left something behind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaintedSlot {
    pub slot: u32,
    /// What the wipe reported (JSON: the job and what was left).
    pub why: String,
}

/// `POST /v1/drain`: take no new job; the running ones go on until they end.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// Exit (status 0) once no job is left.
    #[serde(default)]
    pub stop: bool,
}

/// Whether the agent drains, and what it still waits for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainStatus {
    pub draining: bool,
    /// When the drain began (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// The agent exits once `remaining` is 0.
    pub stop: bool,
    /// Jobs still running plus starts admitted before the drain began.
    pub remaining: usize,
    /// Starts admitted before the drain began that are not jobs yet.
    pub starting: usize,
    /// The jobs still running.
    pub jobs: Vec<JobSummary>,
}

/// Who is asking, from the socket's peer credentials.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// An error answer of the control API.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

/// What the daemon does with control requests.
pub trait Handler: Send + Sync + 'static {
    /// A prepared command the caller may start (see [`Handler::prepare_run`]).
    type Run: Send + 'static;
    fn start(
        &self,
        req: StartRequest,
        peer: Peer,
    ) -> impl Future<Output = Result<StartResponse, ApiError>> + Send;
    fn bind(
        &self,
        job: &str,
        req: BindRequest,
        peer: Peer,
    ) -> impl Future<Output = Result<StartResponse, ApiError>> + Send;
    fn end(
        &self,
        job: &str,
        peer: Peer,
    ) -> impl Future<Output = Result<EndResponse, ApiError>> + Send;
    /// The jobs `peer` may see: all of them for root, its own otherwise.
    fn list(&self, peer: Peer) -> Vec<JobSummary>;
    /// Write a spec that runs a command in a started job's existing sandbox.
    fn exec(
        &self,
        job: &str,
        cmd: JobCommand,
        peer: Peer,
    ) -> impl Future<Output = Result<ExecResponse, ApiError>> + Send {
        let _ = (job, cmd, peer);
        async { Err(ApiError::new(404, "NotFound", "exec is not served here")) }
    }
    fn tainted(&self) -> Result<Vec<TaintedSlot>, ApiError>;
    /// Stop taking new jobs (root only).
    fn drain(
        &self,
        req: DrainRequest,
        peer: Peer,
    ) -> impl Future<Output = Result<DrainStatus, ApiError>> + Send {
        let _ = (req, peer);
        async { Err(ApiError::new(404, "NotFound", "drain is not served here")) }
    }
    /// Whether the agent drains and what it waits for (root only).
    fn drain_status(&self, peer: Peer) -> Result<DrainStatus, ApiError> {
        let _ = peer;
        Err(ApiError::new(404, "NotFound", "drain is not served here"))
    }
    /// Take new jobs again (root only).
    fn cancel_drain(&self, peer: Peer) -> Result<DrainStatus, ApiError> {
        let _ = peer;
        Err(ApiError::new(404, "NotFound", "drain is not served here"))
    }
    /// The trusted issuers and their audiences (nothing secret): what a hook requests its
    /// job's OIDC token for.
    fn issuers(&self) -> crate::audience::IssuersAnswer;
    fn clear_slot(&self, slot: u32, peer: Peer) -> Result<TaintedSlot, ApiError>;
    /// Check that `peer` may start the prepared command `run` of `job`, and take it (each
    /// runs once). Answered before the connection is handed over.
    fn prepare_run(&self, job: &str, run: &str, peer: Peer) -> Result<Self::Run, ApiError>;
    /// Serve a started `run` on the caller's connection ([`run_wire`]) until the command ends.
    fn run(&self, run: Self::Run, stream: UnixStream) -> impl Future<Output = ()> + Send;
}

/// Create the socket: directory 0755, socket 0600 (0660 with a group), stale socket replaced.
pub fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener, ControlError> {
    let err = |e| ControlError::Bind(path.into(), e);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    // The umask makes the socket private from the moment it exists.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = l.map_err(err)?;
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| err(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    }
    Ok(l)
}

/// Whether a connected peer may use the socket: root, or a member of `group` (its primary
/// group or a supplementary one, read from `/proc/<pid>/status` while it waits for us).
pub fn peer_allowed(peer: &Peer, group: Option<u32>, procs: &crate::procs::Procs) -> bool {
    if peer.uid == 0 {
        return true;
    }
    let Some(gid) = group else { return false };
    if peer.gid == gid {
        return true;
    }
    // SO_PEERCRED has the primary group only; `usermod -aG` adds a supplementary one. The
    // status must be the same user's, or the pid was reused since the connect.
    peer.pid
        .and_then(|pid| procs.credentials(pid))
        .is_some_and(|c| c.uid == peer.uid && c.in_group(gid))
}

/// Serve control connections until the task is aborted.
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>, group: Option<u32>) {
    let procs = crate::procs::Procs::default();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let peer = match stream.peer_cred() {
            Ok(c) => Peer {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            },
            Err(_) => continue,
        };
        if !peer_allowed(&peer, group, &procs) {
            tracing::warn!(
                uid = peer.uid,
                pid = peer.pid,
                "control connection refused: not root or the control group"
            );
            continue;
        }
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, std::convert::Infallible>(route(req, handler, peer).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

fn reply<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).expect("control answers always serialise"),
        )))
        .expect("static response parts are valid")
}

fn api_error(e: ApiError) -> Response<Full<Bytes>> {
    reply(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &serde_json::json!({"error": e.message, "code": e.code}),
    )
}

async fn read_json<T: for<'de> Deserialize<'de>>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            ApiError::new(
                413,
                "BadRequest",
                format!("request body unreadable or over {MAX_BODY} bytes: {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(400, "BadRequest", format!("invalid request: {e}")))
}

/// `POST /v1/jobs/<id>/run`: an HTTP upgrade (`Upgrade: airlock-run/1`). The request is
/// checked and the command taken before the 101; then the connection is the command's
/// ([`run_wire`]).
async fn start_run<H: Handler>(
    req: Request<Incoming>,
    handler: Arc<H>,
    job: &str,
    peer: Peer,
) -> Response<Full<Bytes>> {
    let upgrade_ok = req.headers().get(http::header::UPGRADE).is_some_and(|v| {
        v.as_bytes()
            .eq_ignore_ascii_case(run_wire::PROTOCOL.as_bytes())
    });
    if !upgrade_ok {
        return api_error(ApiError::new(
            400,
            "BadRequest",
            format!("run is an upgrade to {}", run_wire::PROTOCOL),
        ));
    }
    let mut req = req;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let r: RunRequest = match read_json(req).await {
        Ok(r) => r,
        Err(e) => return api_error(e),
    };
    let run = match handler.prepare_run(job, &r.run, peer) {
        Ok(run) => run,
        Err(e) => return api_error(e),
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => match upgraded.downcast::<TokioIo<UnixStream>>() {
                // The caller sends nothing before it reads the 101 and our ready byte, so
                // hyper has read nothing of the connection ahead of us.
                Ok(parts) if parts.read_buf.is_empty() => {
                    handler.run(run, parts.io.into_inner()).await
                }
                Ok(_) => tracing::warn!("run: the caller wrote before the upgrade; dropped"),
                Err(_) => tracing::error!("run: the upgraded connection is not a Unix socket"),
            },
            Err(e) => tracing::warn!(error = %e, "run: the upgrade did not complete"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, run_wire::PROTOCOL)
        .body(Full::new(Bytes::new()))
        .expect("static response parts are valid")
}

async fn route<H: Handler>(
    req: Request<Incoming>,
    handler: Arc<H>,
    peer: Peer,
) -> Response<Full<Bytes>> {
    let h = &*handler;
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let res = match (method, segs.as_slice()) {
        (Method::GET, ["v1", "jobs"]) => return reply(StatusCode::OK, &h.list(peer)),
        (Method::POST, ["v1", "jobs", id, "run"]) => {
            let id = id.to_string();
            return start_run(req, handler.clone(), &id, peer).await;
        }
        (Method::POST, ["v1", "jobs"]) => match read_json(req).await {
            Ok(r) => h
                .start(r, peer)
                .await
                .map(|r| reply(StatusCode::CREATED, &r)),
            Err(e) => Err(e),
        },
        (Method::POST, ["v1", "jobs", id, "bind"]) => match read_json(req).await {
            Ok(r) => h.bind(id, r, peer).await.map(|r| reply(StatusCode::OK, &r)),
            Err(e) => Err(e),
        },
        (Method::POST, ["v1", "jobs", id, "exec"]) => match read_json(req).await {
            Ok(c) => h.exec(id, c, peer).await.map(|r| reply(StatusCode::OK, &r)),
            Err(e) => Err(e),
        },
        (Method::GET, ["v1", "slots"]) => h.tainted().map(|r| reply(StatusCode::OK, &r)),
        (Method::GET, ["v1", "issuers"]) => return reply(StatusCode::OK, &h.issuers()),
        (Method::DELETE, ["v1", "slots", n]) => match n.parse::<u32>() {
            Ok(slot) => h.clear_slot(slot, peer).map(|r| reply(StatusCode::OK, &r)),
            Err(_) => Err(ApiError::new(400, "BadRequest", "a slot is a number")),
        },
        (Method::DELETE, ["v1", "jobs", id]) => {
            h.end(id, peer).await.map(|r| reply(StatusCode::OK, &r))
        }
        (Method::POST, ["v1", "drain"]) => match read_json(req).await {
            Ok(r) => h.drain(r, peer).await.map(|r| reply(StatusCode::OK, &r)),
            Err(e) => Err(e),
        },
        (Method::GET, ["v1", "drain"]) => h.drain_status(peer).map(|r| reply(StatusCode::OK, &r)),
        (Method::DELETE, ["v1", "drain"]) => {
            h.cancel_drain(peer).map(|r| reply(StatusCode::OK, &r))
        }
        _ => Err(ApiError::new(
            404,
            "NotFound",
            format!("no control route {path}"),
        )),
    };
    res.unwrap_or_else(api_error)
}

/// The client side, used by `airlock`.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    /// A connection to the agent, served in the background (upgrades allowed: `run`).
    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ControlError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| ControlError::Connect(self.socket.clone(), e))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ControlError::Protocol(e.to_string()))?;
        tokio::spawn(conn.with_upgrades());
        Ok(sender)
    }

    async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ControlError> {
        let mut sender = self.connect().await?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "airlockd")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ControlError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ControlError::Protocol(format!("airlockd closed the connection: {e} (was this user refused? only root or the control group may use the socket)")))?;
        if !resp.status().is_success() {
            return Err(refusal(resp).await);
        }
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ControlError::Protocol(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&bytes)
            .map_err(|e| ControlError::Protocol(format!("unexpected answer: {e}")))
    }

    /// `POST /v1/jobs/<job>/run` and the upgrade: the connection the prepared command
    /// `run` is served on ([`run_wire`]), after the agent's ready byte.
    pub async fn attach_run(&self, job: &str, run: &str) -> Result<UnixStream, ControlError> {
        use tokio::io::AsyncReadExt;
        let mut sender = self.connect().await?;
        let body = serde_json::to_vec(&RunRequest { run: run.into() })
            .map_err(|e| ControlError::Protocol(e.to_string()))?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("/v1/jobs/{job}/run"))
            .header(http::header::HOST, "airlockd")
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, run_wire::PROTOCOL)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ControlError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ControlError::Protocol(format!("airlockd closed the connection: {e}")))?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(refusal(resp).await);
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| ControlError::Protocol(format!("the run upgrade failed: {e}")))?;
        let parts = upgraded.downcast::<TokioIo<UnixStream>>().map_err(|_| {
            ControlError::Protocol("the run connection is not a Unix socket".into())
        })?;
        let mut stream = parts.io.into_inner();
        // The ready byte may have come in with the 101.
        let ready = match parts.read_buf.first() {
            Some(b) if parts.read_buf.len() == 1 => *b,
            Some(_) => {
                return Err(ControlError::Protocol(
                    "airlockd sent more than its ready byte".into(),
                ))
            }
            None => stream
                .read_u8()
                .await
                .map_err(|e| ControlError::Protocol(format!("no ready byte from airlockd: {e}")))?,
        };
        if ready != run_wire::READY {
            return Err(ControlError::Protocol(format!(
                "unexpected byte {ready:#x} from airlockd"
            )));
        }
        Ok(stream)
    }

    pub async fn start(&self, req: &StartRequest) -> Result<StartResponse, ControlError> {
        let body = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
        self.call(Method::POST, "/v1/jobs", Some(body)).await
    }

    pub async fn bind(&self, job: &str, req: &BindRequest) -> Result<StartResponse, ControlError> {
        let body = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
        self.call(Method::POST, &format!("/v1/jobs/{job}/bind"), Some(body))
            .await
    }

    pub async fn exec(&self, job: &str, cmd: &JobCommand) -> Result<ExecResponse, ControlError> {
        let body = serde_json::to_vec(cmd).map_err(|e| ControlError::Protocol(e.to_string()))?;
        self.call(Method::POST, &format!("/v1/jobs/{job}/exec"), Some(body))
            .await
    }

    pub async fn end(&self, job: &str) -> Result<EndResponse, ControlError> {
        self.call(Method::DELETE, &format!("/v1/jobs/{job}"), None)
            .await
    }

    pub async fn tainted(&self) -> Result<Vec<TaintedSlot>, ControlError> {
        self.call(Method::GET, "/v1/slots", None).await
    }

    pub async fn clear_slot(&self, slot: u32) -> Result<TaintedSlot, ControlError> {
        self.call(Method::DELETE, &format!("/v1/slots/{slot}"), None)
            .await
    }

    /// `GET /v1/issuers`: the issuers the agent trusts, with their audiences.
    pub async fn issuers(&self) -> Result<crate::audience::IssuersAnswer, ControlError> {
        self.call(Method::GET, "/v1/issuers", None).await
    }

    pub async fn list(&self) -> Result<Vec<JobSummary>, ControlError> {
        self.call(Method::GET, "/v1/jobs", None).await
    }

    pub async fn drain(&self, req: &DrainRequest) -> Result<DrainStatus, ControlError> {
        let body = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
        self.call(Method::POST, "/v1/drain", Some(body)).await
    }

    pub async fn drain_status(&self) -> Result<DrainStatus, ControlError> {
        self.call(Method::GET, "/v1/drain", None).await
    }

    pub async fn cancel_drain(&self) -> Result<DrainStatus, ControlError> {
        self.call(Method::DELETE, "/v1/drain", None).await
    }
}

/// The agent's error answer as a [`ControlError::Refused`].
async fn refusal(resp: Response<Incoming>) -> ControlError {
    let status = resp.status();
    let bytes = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return ControlError::Protocol(e.to_string()),
    };
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    ControlError::Refused {
        status: status.as_u16(),
        code: v["code"].as_str().unwrap_or("Error").to_string(),
        message: v["error"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| format!("airlockd answered {status}")),
    }
}

/// The `run` connection once upgraded.
///
/// 1. The agent writes [`READY`] (one byte).
/// 2. The caller sends one byte, [`FDS`], with its stdin, stdout and stderr attached
///    (`SCM_RIGHTS`, exactly three, none a directory or an `O_PATH` handle).
/// 3. The agent starts the sandbox init with them; the caller may then send lines
///    `signal <n>` (SIGINT, SIGTERM, SIGHUP, SIGQUIT), which the agent passes on.
/// 4. When the command has ended the agent writes one JSON line, [`RunStatus`], and closes.
///    If the caller's side closes first, the agent kills the command (the sandbox's pid
///    namespace goes with it), as a killed caller took its command with it before.
pub mod run_wire {
    use serde::{Deserialize, Serialize};
    use std::io::{IoSlice, IoSliceMut};
    use std::mem::MaybeUninit;
    use std::os::fd::{BorrowedFd, OwnedFd};
    use tokio::io::Interest;
    use tokio::net::UnixStream;

    pub const PROTOCOL: &str = "airlock-run/1";
    pub const READY: u8 = b'R';
    pub const FDS: u8 = b'F';
    /// The descriptors a caller passes: stdin, stdout, stderr.
    pub const STDIO: usize = 3;
    /// Signals a caller may pass on.
    pub const SIGNALS: [nix::sys::signal::Signal; 4] = [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGQUIT,
    ];

    /// How the command ended.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct RunStatus {
        /// As a shell shows it: the exit code, or 128 + the signal.
        pub code: i32,
        /// The sandbox could not be built (the shim said why on the caller's stderr).
        pub setup_failed: bool,
        /// The agent could not start it at all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub error: Option<String>,
    }

    /// Sends `fds` with one [`FDS`] byte.
    pub async fn send_fds(stream: &UnixStream, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        loop {
            stream.writable().await?;
            let sent = stream.try_io(Interest::WRITABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(STDIO))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(std::io::Error::other("too many descriptors"));
                }
                sendmsg(
                    stream,
                    &[IoSlice::new(&[FDS])],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives the [`FDS`] byte and the descriptors attached to it (at most `max`; more,
    /// or another byte, is an error and every received descriptor is closed).
    pub async fn recv_fds(stream: &UnixStream, max: usize) -> std::io::Result<Vec<OwnedFd>> {
        use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        loop {
            stream.readable().await?;
            let got = stream.try_io(Interest::READABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let mut byte = [0u8; 1];
                let r = recvmsg(
                    stream,
                    &mut [IoSliceMut::new(&mut byte)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)?;
                let mut fds = Vec::new();
                for msg in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(it) = msg {
                        fds.extend(it);
                    }
                }
                if r.bytes == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                if byte[0] != FDS
                    || fds.len() > max
                    || r.flags.contains(rustix::net::ReturnFlags::CTRUNC)
                {
                    return Err(std::io::Error::other(format!(
                        "expected {max} descriptors with one {:?} byte",
                        FDS as char
                    )));
                }
                Ok(fds)
            });
            match got {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

/// Secrets cross the control socket (to root only) but never reach Debug output.
mod secret_opt {
    use crate::secret::Secret;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Secret<String>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(t) => s.serialize_some(t.expose()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Secret<String>>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.map(Secret::new))
    }
}

mod secret_str {
    use crate::secret::Secret;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Secret<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.expose())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Secret<String>, D::Error> {
        Ok(Secret::new(String::deserialize(d)?))
    }
}

mod secret_env {
    use crate::secret::Secret;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(
        v: &Secret<BTreeMap<String, String>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        v.expose().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Secret<BTreeMap<String, String>>, D::Error> {
        Ok(Secret::new(BTreeMap::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, pid: i32) -> Peer {
        Peer {
            uid,
            gid,
            pid: Some(pid),
        }
    }

    #[test]
    fn root_the_primary_and_a_supplementary_control_group_may_ask() {
        let dir = tempfile::tempdir().unwrap();
        crate::procs::fake_tree(
            dir.path(),
            &[(100, "runner", 1, 5)],
            "Uid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t27 998\n",
        );
        let procs = crate::procs::Procs::at(dir.path());
        assert!(peer_allowed(&peer(0, 0, 100), None, &procs));
        assert!(!peer_allowed(&peer(1000, 1000, 100), None, &procs));
        assert!(peer_allowed(&peer(1000, 998, 100), Some(998), &procs));
        // `usermod -aG`: the group is a supplementary one.
        assert!(peer_allowed(&peer(1000, 1000, 100), Some(998), &procs));
        assert!(!peer_allowed(&peer(1000, 1000, 100), Some(5), &procs));
        // The pid's status is another user's (reused pid): refused.
        assert!(!peer_allowed(&peer(1001, 1001, 100), Some(998), &procs));
        // No such process: refused.
        assert!(!peer_allowed(&peer(1000, 1000, 101), Some(998), &procs));
    }
}
