//! The job's credential endpoint: the AWS container-credentials protocol and an IMDSv2
//! emulation, served on one listener per job.
//!
//! The listener a request arrives on identifies the job (today a loopback port per job; with
//! the sandbox, sockets bound inside the job's own network namespace). The container token
//! must also match that job's token, compared in constant time. The endpoint never decides
//! anything: it serves what its [`CredentialSource`] (the broker) holds for its job, and it
//! never reaches into policies or sandboxes.
//!
//! Every connection costs the agent a descriptor, so connections are bounded: at most
//! [`CONNECTIONS_PER_JOB`] per job (all its listeners together) and a global budget
//! ([`ConnBudget`], from `RLIMIT_NOFILE`, see `fd_budget`) that leaves headroom for the
//! control socket, recovery and wipes. At either bound the listener is simply not accepted
//! from: new connections wait in the kernel's accept queue, and the agent does no work for
//! them. A connection idle between requests for [`IDLE_TIMEOUT`], or whose response the job
//! does not read for [`WRITE_TIMEOUT`], is closed.

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::audit::AuditLog;
use crate::metrics::Metrics;
use crate::secret::Secret;

/// Base path of the container-credentials protocol; `/<alias>` selects a grant.
pub const CONTAINER_PATH: &str = "/v1/credentials";
/// IMDSv2 token lifetimes the real service accepts.
const IMDS_TTL_MAX: u64 = 21_600;
/// At most this many live IMDS tokens per job (each PUT makes one).
const IMDS_TOKENS_MAX: usize = 256;
/// Open connections one job may hold on its endpoint, all its listeners together. An SDK
/// uses one; the credential benchmark drives 32.
pub const CONNECTIONS_PER_JOB: usize = 64;
/// A keep-alive connection with no new request for this long is closed. It is hyper's
/// header read timeout, which runs from the moment a connection waits for a request head
/// until the head is complete: it also ends a head sent a byte at a time.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection whose response cannot be written for this long (the job does not read
/// it) is closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Answers that are not a success (refusals, wrong tokens, unknown paths) a job gets at
/// once per second, and in a burst: beyond that each waits its turn before it is sent, on
/// its connection. A job that floods the agent with refused requests therefore makes it do
/// about this much work a second, its connections wait (and with them, through the
/// connection cap, its new ones), and every other job's requests are not queued behind
/// its flood. A well-behaved job is never refused that often; successful answers are
/// never held.
pub const REFUSALS_PER_SECOND: f64 = 20.0;
pub const REFUSAL_BURST: f64 = 100.0;
/// A request body (`POST /v1/bind`) must arrive in full within this time.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Credentials as the endpoint serves them.
#[derive(Debug, Clone)]
pub struct Served {
    pub access_key_id: String,
    pub secret_access_key: Secret<String>,
    pub session_token: Secret<String>,
    pub expiration: OffsetDateTime,
    pub last_updated: OffsetDateTime,
    pub role_arn: String,
    pub account_id: Option<String>,
}

/// Why no credentials were served: becomes a 4xx/5xx `{Code, Message}`.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// Where the endpoint gets a job's credentials (the broker, or a fake in tests).
pub trait CredentialSource: Send + Sync + 'static {
    /// Credentials of `alias` (`None`: the default grant) for `job`.
    fn credentials(
        &self,
        job: &str,
        alias: Option<&str>,
    ) -> impl Future<Output = Result<Served, Refusal>> + Send;
    /// The job's grant aliases, default first.
    fn aliases(&self, job: &str) -> Vec<String>;
    /// Bind `job`'s identity from inside the job (`POST /v1/bind`, see [`JobEndpoint::open_bind`]):
    /// the source hands it to whoever binds jobs. Answers the bind's outcome as JSON.
    fn bind(
        &self,
        job: &str,
        req: crate::control::BindRequest,
    ) -> impl Future<Output = Result<serde_json::Value, Refusal>> + Send {
        let _ = (job, req);
        async {
            Err(Refusal {
                status: 404,
                code: "NotFound".into(),
                message: "this endpoint does not bind jobs".into(),
            })
        }
    }
}

/// Largest `POST /v1/bind` body (an OIDC token is at most 8 KiB, claims at most 16 KiB).
const MAX_BIND_BODY: usize = 32 * 1024;

/// One job's endpoint state.
#[derive(Debug)]
pub struct JobEndpoint {
    pub job_id: String,
    token_sha256: [u8; 32],
    /// Accepted `Host` header values (DNS-rebinding defence).
    hosts: Vec<String>,
    region: String,
    imds: bool,
    ended: AtomicBool,
    /// The job's one bind from inside (`POST /v1/bind/claim`, then `POST /v1/bind`), only
    /// if the job was started to bind that way.
    bind_route: Mutex<BindRoute>,
    imds_tokens: Mutex<HashMap<[u8; 32], Instant>>,
    /// The job's connection slots, shared by its listeners (made by the first `serve`).
    conn_slots: OnceLock<Arc<Semaphore>>,
    /// Connections of this job open now.
    live: Arc<AtomicUsize>,
    /// The refusal pacing bucket: tokens (may go below zero while answers wait) and when
    /// it was last refilled.
    refusal_pace: Mutex<(f64, Instant)>,
}

impl JobEndpoint {
    /// `token_sha256`: SHA-256 of the job's endpoint token (the token itself is not kept).
    pub fn new(
        job_id: String,
        token_sha256: [u8; 32],
        addr: SocketAddr,
        region: String,
        imds: bool,
    ) -> JobEndpoint {
        let mut hosts = vec![addr.to_string()];
        if addr.ip().is_loopback() {
            hosts.push(format!("localhost:{}", addr.port()));
        }
        if addr.port() == 80 {
            hosts.push(addr.ip().to_string());
        }
        JobEndpoint {
            job_id,
            token_sha256,
            hosts,
            region,
            imds,
            ended: AtomicBool::new(false),
            bind_route: Mutex::new(BindRoute::Closed),
            imds_tokens: Mutex::new(HashMap::new()),
            conn_slots: OnceLock::new(),
            live: Arc::new(AtomicUsize::new(0)),
            refusal_pace: Mutex::new((REFUSAL_BURST, Instant::now())),
        }
    }

    /// Connections of this job open now.
    pub fn open_connections(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    fn slots(&self, per_job: usize) -> Arc<Semaphore> {
        self.conn_slots
            .get_or_init(|| Arc::new(Semaphore::new(per_job)))
            .clone()
    }

    /// Also accept `host` (e.g. `169.254.170.2` inside a sandbox).
    pub fn allow_host(&mut self, host: String) {
        self.hosts.push(host);
    }

    /// From now on every request is refused, even on open connections.
    pub fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
    }

    /// Serve one bind from inside the job (started with `bind_later` and `endpoint_bind`):
    /// the first `POST /v1/bind/claim` with the job's token closes the route to everyone
    /// else and gets the one ticket `POST /v1/bind` then needs.
    pub fn open_bind(&self) {
        *self.bind_route.lock().unwrap_or_else(|p| p.into_inner()) = BindRoute::Open;
    }

    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    fn token_matches(&self, presented: &[u8]) -> bool {
        let h: [u8; 32] = Sha256::digest(presented).into();
        bool::from(h.ct_eq(&self.token_sha256))
    }

    fn new_imds_token(&self, ttl: Duration) -> String {
        let token = random_token();
        let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut toks = self.imds_tokens.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        toks.retain(|_, exp| *exp > now);
        if toks.len() >= IMDS_TOKENS_MAX {
            // Drop the one closest to expiry rather than growing without bound.
            if let Some(k) = toks.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k) {
                toks.remove(&k);
            }
        }
        toks.insert(h, now + ttl);
        token
    }

    /// How long the next answer that is not a success must wait (see
    /// [`REFUSALS_PER_SECOND`]); `None`: not at all. Takes its token now, so answers that
    /// wait line up one after the other.
    fn refusal_delay(&self, now: Instant) -> Option<Duration> {
        let mut b = self.refusal_pace.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(b.1).as_secs_f64();
        b.0 = (b.0 + elapsed * REFUSALS_PER_SECOND).min(REFUSAL_BURST);
        b.1 = now;
        b.0 -= 1.0;
        if b.0 >= 0.0 {
            None
        } else {
            Some(Duration::from_secs_f64(-b.0 / REFUSALS_PER_SECOND))
        }
    }

    fn imds_token_valid(&self, presented: &[u8]) -> bool {
        // Looking up the SHA-256 of the presented token reveals nothing useful about any
        // valid token through timing.
        let h: [u8; 32] = Sha256::digest(presented).into();
        let toks = self.imds_tokens.lock().unwrap_or_else(|p| p.into_inner());
        toks.get(&h).is_some_and(|exp| *exp > Instant::now())
    }
}

/// Where a job's bind from inside stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BindRoute {
    /// Not for this job, or used.
    Closed,
    /// Waiting for the job-started hook's claim.
    Open,
    /// Claimed: the SHA-256 of the ticket the claimant got. Whoever claimed and then failed
    /// (a hook that could not get its OIDC token) leaves it claimed: no later step can bind.
    Claimed([u8; 32]),
}

/// A new random endpoint token: 32 bytes from the OS, base64url (43 characters).
pub fn random_token() -> String {
    use base64::Engine;
    let mut b = [0u8; 32];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// The bounds on endpoint connections (the defaults are the documented ones; tests shorten
/// the timeouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub per_job: usize,
    pub idle: Duration,
    pub write: Duration,
    pub body: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            per_job: CONNECTIONS_PER_JOB,
            idle: IDLE_TIMEOUT,
            write: WRITE_TIMEOUT,
            body: BODY_TIMEOUT,
        }
    }
}

/// Connection slots of all jobs together, and the per-job bounds.
#[derive(Debug)]
pub struct ConnBudget {
    pub limits: ConnLimits,
    total: usize,
    global: Arc<Semaphore>,
    /// When the exhausted budget was last logged (at most once a minute).
    warned: Mutex<Option<Instant>>,
}

impl ConnBudget {
    pub fn new(limits: ConnLimits, total: usize) -> ConnBudget {
        ConnBudget {
            limits,
            total,
            global: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            warned: Mutex::new(None),
        }
    }

    /// The default bounds with the global budget derived from this process's
    /// `RLIMIT_NOFILE` (see [`crate::fd_budget::endpoint_connections`]).
    pub fn for_this_process() -> ConnBudget {
        let nofile = crate::fd_budget::current_nofile();
        ConnBudget::new(
            ConnLimits::default(),
            crate::fd_budget::endpoint_connections(nofile),
        )
    }

    /// Connection slots of all jobs together.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Slots taken now (by open connections, and one by each listener waiting to accept).
    pub fn in_use(&self) -> usize {
        self.total - self.global.available_permits().min(self.total)
    }

    fn warn_exhausted(&self) {
        let mut w = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if w.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
            *w = Some(Instant::now());
            tracing::warn!(
                budget = self.total,
                "every endpoint connection slot is taken: new connections of every job wait \
                 until one closes (raise LimitNOFILE to give the endpoints more)"
            );
        }
    }
}

/// Shared by every job's listener.
#[derive(Debug)]
pub struct Shared<S> {
    pub source: Arc<S>,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<AuditLog>,
    pub conns: ConnBudget,
}

/// Serve one job's listener until the task is aborted.
pub async fn serve<S: CredentialSource>(
    listener: TcpListener,
    job: Arc<JobEndpoint>,
    shared: Arc<Shared<S>>,
) {
    let limits = shared.conns.limits;
    let slots = job.slots(limits.per_job);
    loop {
        // Slots before `accept`: at a bound the listener is not polled at all, so new
        // connections wait in the kernel's accept queue and cost the agent nothing (no
        // descriptor, no accept-and-close loop a job could keep spinning).
        let Ok(job_slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let global_slot = match shared.conns.global.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                shared.conns.warn_exhausted();
                match shared.conns.global.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                }
            }
        };
        let (stream, _peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: wait, keeping the slots, rather than spin.
                tracing::warn!(job = %job.job_id, error = %e, "endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let live = LiveConn::new(job.live.clone());
        let io = WriteDeadline::new(stream, limits.write);
        let (job, shared) = (job.clone(), shared.clone());
        tokio::spawn(async move {
            let _slots = (job_slot, global_slot, live);
            serve_connection(io, job, shared).await;
        });
    }
}

/// One accepted connection of the job, served until it closes. Any byte stream will do: the
/// fuzz target feeds it raw HTTP/1.1 over an in-memory pipe ([`crate::fuzzing`]).
pub(crate) async fn serve_connection<S, I>(io: I, job: Arc<JobEndpoint>, shared: Arc<Shared<S>>)
where
    S: CredentialSource,
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let idle = shared.conns.limits.idle;
    let svc = service_fn(move |req| {
        let job = job.clone();
        let shared = shared.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(req, &job, &shared).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), svc);
    // Malformed requests end here with hyper's own 400/431, timeouts with the connection
    // closed; nothing else is affected.
    let _ = conn.await;
}

/// Counts one open connection of a job for as long as it lives.
struct LiveConn(Arc<AtomicUsize>);

impl LiveConn {
    fn new(n: Arc<AtomicUsize>) -> LiveConn {
        n.fetch_add(1, Ordering::SeqCst);
        LiveConn(n)
    }
}

impl Drop for LiveConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A stream whose writes fail with `TimedOut` once one has made no progress for `limit`:
/// a job that sends requests and never reads the answers cannot keep a connection (and
/// its task and buffers) for ever. Reads are left to hyper's header read timeout.
#[derive(Debug)]
pub struct WriteDeadline<T> {
    inner: T,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteDeadline<T> {
    pub fn new(inner: T, limit: Duration) -> WriteDeadline<T> {
        WriteDeadline {
            inner,
            limit,
            stalled: None,
        }
    }

    /// After a write that made progress (`ready`), forget the stall; after one that did
    /// not, time it.
    fn track<R>(
        &mut self,
        cx: &mut Context<'_>,
        res: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        match res {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let limit = self.limit;
                let sleep = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if sleep.as_mut().poll(cx).is_ready() {
                    self.stalled = None;
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the peer has not read its response within the write timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.track(cx, res)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.track(cx, res)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_flush(cx);
        this.track(cx, res)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.track(cx, res)
    }
}

type Resp = Response<Full<Bytes>>;

fn error(status: StatusCode, code: &str, message: &str) -> Resp {
    let body = json!({ "Code": code, "Message": message }).to_string();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn text(status: StatusCode, body: String) -> Resp {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn json_ok(body: String) -> Resp {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// RFC 3339 with whole seconds and `Z`, as the SDKs parse it.
pub fn aws_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn outcome_of(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200 => "ok",
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        s if s < 500 => "client_error",
        _ => "error",
    }
}

async fn handle<S: CredentialSource>(
    req: Request<Incoming>,
    job: &JobEndpoint,
    shared: &Shared<S>,
) -> Resp {
    let resp = route(req, job, shared).await;
    shared.metrics.request(outcome_of(resp.status()));
    if !resp.status().is_success() {
        if let Some(wait) = job.refusal_delay(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
    resp
}

fn header_bytes<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    h.get(name).map(|v| v.as_bytes())
}

async fn route<S: CredentialSource>(
    req: Request<Incoming>,
    job: &JobEndpoint,
    shared: &Shared<S>,
) -> Resp {
    if job.is_ended() {
        return refuse(
            job,
            shared,
            StatusCode::FORBIDDEN,
            "JobEnded",
            "this job has ended; its endpoint serves nothing",
            "ended",
        );
    }
    let host_ok = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| job.hosts.iter().any(|a| a.eq_ignore_ascii_case(h)));
    if !host_ok {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidHost",
            "the Host header does not name this endpoint",
        );
    }
    let path = req.uri().path().to_string();
    let path = path.as_str();
    if path == BIND_CLAIM_PATH {
        return claim_bind(&req, job, shared);
    }
    if path == BIND_PATH {
        return bind(req, job, shared).await;
    }
    let req = &req;
    if path == CONTAINER_PATH || path.starts_with("/v1/credentials/") {
        return container(req, path, job, shared).await;
    }
    if path.starts_with("/latest/") {
        if !job.imds {
            return error(
                StatusCode::NOT_FOUND,
                "NotFound",
                "IMDS emulation is disabled",
            );
        }
        return imds(req, path, job, shared).await;
    }
    error(StatusCode::NOT_FOUND, "NotFound", "no such path")
}

fn refuse<S>(
    job: &JobEndpoint,
    shared: &Shared<S>,
    status: StatusCode,
    code: &str,
    message: &str,
    why: &str,
) -> Resp {
    // The job's own requests: within its audit limit (the rest is counted).
    let rec = crate::fields! {"reason" => why, "code" => code};
    shared.audit.job_event("token_rejected", &job.job_id, rec);
    error(status, code, message)
}

/// The method, then the job's endpoint token in `Authorization` (compared in constant time):
/// the refusal of either as the response to send, or `None` when both are right; a missing
/// or wrong token is also audited. `missing_hint` ends the message for a missing header.
fn unauthorized<S: CredentialSource>(
    req: &Request<Incoming>,
    method: Method,
    job: &JobEndpoint,
    shared: &Shared<S>,
    missing_hint: &str,
) -> Option<Resp> {
    if req.method() != method {
        return Some(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("use {method}"),
        ));
    }
    let Some(presented) = header_bytes(req.headers(), "authorization") else {
        return Some(refuse(
            job,
            shared,
            StatusCode::UNAUTHORIZED,
            "MissingAuthorization",
            &format!(
                "the Authorization header with the job's endpoint token is missing{missing_hint}"
            ),
            "missing token",
        ));
    };
    if !job.token_matches(presented) {
        return Some(refuse(
            job,
            shared,
            StatusCode::FORBIDDEN,
            "InvalidToken",
            "the Authorization token is not this job's endpoint token",
            "wrong token",
        ));
    }
    None
}

async fn container<S: CredentialSource>(
    req: &Request<Incoming>,
    path: &str,
    job: &JobEndpoint,
    shared: &Shared<S>,
) -> Resp {
    if let Some(resp) = unauthorized(
        req,
        Method::GET,
        job,
        shared,
        " (set AWS_CONTAINER_AUTHORIZATION_TOKEN or _FILE)",
    ) {
        return resp;
    }
    let alias = match path.strip_prefix("/v1/credentials/") {
        None | Some("") => None,
        Some(a) => Some(a),
    };
    match shared.source.credentials(&job.job_id, alias).await {
        Ok(c) => {
            let body = ContainerCredentials {
                access_key_id: &c.access_key_id,
                secret_access_key: c.secret_access_key.expose(),
                token: c.session_token.expose(),
                expiration: aws_time(c.expiration),
                role_arn: &c.role_arn,
                account_id: c.account_id.as_deref(),
            };
            json_ok(serde_json::to_string(&body).expect("plain strings always serialise"))
        }
        Err(r) => error(status(r.status), &r.code, &r.message),
    }
}

/// Where a job binds its own identity (`POST`, the job's token, the claim's ticket in
/// [`BIND_TICKET_HEADER`], a `BindRequest` body).
pub const BIND_PATH: &str = "/v1/bind";
/// Where the job-started hook claims the job's one bind first (`POST`, the job's token):
/// answers `{"ticket": …}` once.
pub const BIND_CLAIM_PATH: &str = "/v1/bind/claim";
/// The header that carries the claim's ticket.
pub const BIND_TICKET_HEADER: &str = "x-airlock-bind-ticket";

/// Audits a refused bind or claim from inside the job.
fn bind_refused<S>(job: &JobEndpoint, shared: &Shared<S>, reason: &str) -> Resp {
    let rec = crate::fields! {"reason" => reason, "via" => "endpoint"};
    // Something the job's own requests produce: rate-limited per job (counted when dropped).
    shared.audit.job_event("bind_refused", &job.job_id, rec);
    error(
        StatusCode::CONFLICT,
        "AlreadyBound",
        "this job binds its identity once, claimed by its job-started hook before the first step; this request is refused and audited",
    )
}

/// `POST /v1/bind/claim`: the job-started hook's first request (before it asks GitHub for
/// the job's token, which may fail): it closes the route to every later request, so a step
/// running after a failed hook (`if: always()`) finds it closed.
fn claim_bind<S: CredentialSource>(
    req: &Request<Incoming>,
    job: &JobEndpoint,
    shared: &Shared<S>,
) -> Resp {
    if let Some(resp) = unauthorized(req, Method::POST, job, shared, "") {
        return resp;
    }
    let ticket = random_token();
    {
        let mut route = job.bind_route.lock().unwrap_or_else(|p| p.into_inner());
        if *route != BindRoute::Open {
            drop(route);
            return bind_refused(job, shared, "a bind claim after the job's one claim (or for a job not started to bind this way)");
        }
        *route = BindRoute::Claimed(Sha256::digest(ticket.as_bytes()).into());
    }
    json_ok(json!({ "ticket": ticket }).to_string())
}

/// `POST /v1/bind`: the job's one bind from inside, for jobs started with `bind_later` and
/// `endpoint_bind` (GitHub's job-started hook in an ephemeral runner's sandbox). The job's
/// token and the ticket of the route's claim are required; the route closes on the first
/// such request, whatever its outcome, so a later request (a step of the job) is refused
/// and audited.
async fn bind<S: CredentialSource>(
    req: Request<Incoming>,
    job: &JobEndpoint,
    shared: &Shared<S>,
) -> Resp {
    if let Some(resp) = unauthorized(&req, Method::POST, job, shared, "") {
        return resp;
    }
    let presented: Option<[u8; 32]> =
        header_bytes(req.headers(), BIND_TICKET_HEADER).map(|t| Sha256::digest(t).into());
    {
        let mut route = job.bind_route.lock().unwrap_or_else(|p| p.into_inner());
        let ok = match (*route, presented) {
            (BindRoute::Claimed(want), Some(got)) => bool::from(want.ct_eq(&got)),
            _ => false,
        };
        if !ok {
            drop(route);
            return bind_refused(job, shared, "a bind through the job's endpoint without the claim's ticket (after the job's one bind, or for a job not started to bind this way)");
        }
        *route = BindRoute::Closed;
    }
    use http_body_util::BodyExt;
    let collect = http_body_util::Limited::new(req.into_body(), MAX_BIND_BODY).collect();
    let body = match tokio::time::timeout(shared.conns.limits.body, collect).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) | Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BadRequest",
                "the bind request is unreadable, too large or too slow",
            )
        }
    };
    // The body may hold an OIDC token: serde's message names the position, never the value.
    let parsed: crate::control::BindRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!(
                    "invalid bind request at line {} column {}",
                    e.line(),
                    e.column()
                ),
            )
        }
    };
    match shared.source.bind(&job.job_id, parsed).await {
        Ok(v) => json_ok(v.to_string()),
        Err(r) => error(status(r.status), &r.code, &r.message),
    }
}

/// The container-credentials answer, in the field order the SDKs document.
#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerCredentials<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
    role_arn: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<&'a str>,
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

async fn imds<S: CredentialSource>(
    req: &Request<Incoming>,
    path: &str,
    job: &JobEndpoint,
    shared: &Shared<S>,
) -> Resp {
    if path == "/latest/api/token" {
        if req.method() != Method::PUT {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "use PUT",
            );
        }
        if req.headers().contains_key("x-forwarded-for") {
            // A proxied request: the real IMDS refuses these so a misconfigured proxy in the
            // job cannot hand tokens to the outside.
            return refuse(
                job,
                shared,
                StatusCode::FORBIDDEN,
                "Forbidden",
                "token requests through a proxy (X-Forwarded-For) are refused",
                "x-forwarded-for",
            );
        }
        let ttl = req
            .headers()
            .get("x-aws-ec2-metadata-token-ttl-seconds")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let Some(ttl) = ttl.filter(|t| (1..=IMDS_TTL_MAX).contains(t)) else {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "x-aws-ec2-metadata-token-ttl-seconds must be 1 to 21600",
            );
        };
        let token = job.new_imds_token(Duration::from_secs(ttl));
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain")
            .header("x-aws-ec2-metadata-token-ttl-seconds", ttl.to_string())
            .body(Full::new(Bytes::from(token)))
            .expect("static response parts are valid");
    }
    if req.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "use GET",
        );
    }
    let tok = header_bytes(req.headers(), "x-aws-ec2-metadata-token");
    if !tok.is_some_and(|t| job.imds_token_valid(t)) {
        // IMDSv1 (no token) is never served.
        return refuse(
            job,
            shared,
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "a valid x-aws-ec2-metadata-token is required (IMDSv2)",
            "imds token",
        );
    }
    const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
    match path {
        "/latest/meta-data/iam/security-credentials" | CREDS => {
            // Real IMDS lists exactly one role, and every SDK reads the whole body as one
            // role name: list the default grant only. The other aliases are still served
            // by name below.
            match shared.source.aliases(&job.job_id).into_iter().next() {
                Some(default) => text(StatusCode::OK, default),
                None => error(StatusCode::NOT_FOUND, "NotFound", "this job has no roles"),
            }
        }
        "/latest/meta-data/placement/region" => text(StatusCode::OK, job.region.clone()),
        "/latest/meta-data/placement/availability-zone" => {
            text(StatusCode::OK, format!("{}a", job.region))
        }
        "/latest/meta-data/instance-id" => text(StatusCode::OK, instance_id(&job.job_id)),
        "/latest/dynamic/instance-identity/document" => json_ok(
            json!({
                "region": job.region,
                "availabilityZone": format!("{}a", job.region),
                "instanceId": instance_id(&job.job_id),
                "version": "2017-09-30",
            })
            .to_string(),
        ),
        p if p.starts_with(CREDS) => {
            let alias = &p[CREDS.len()..];
            if !shared
                .source
                .aliases(&job.job_id)
                .iter()
                .any(|a| a == alias)
            {
                return error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "no such role for this job",
                );
            }
            match shared.source.credentials(&job.job_id, Some(alias)).await {
                Ok(c) => json_ok(
                    json!({
                        "Code": "Success",
                        "LastUpdated": aws_time(c.last_updated),
                        "Type": "AWS-HMAC",
                        "AccessKeyId": c.access_key_id,
                        "SecretAccessKey": c.secret_access_key.expose(),
                        "Token": c.session_token.expose(),
                        "Expiration": aws_time(c.expiration),
                    })
                    .to_string(),
                ),
                Err(r) => error(status(r.status), &r.code, &r.message),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "NotFound", "no such metadata path"),
    }
}

fn instance_id(job: &str) -> String {
    format!("i-airlock-{job}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fake;

    impl CredentialSource for Fake {
        async fn credentials(&self, job: &str, alias: Option<&str>) -> Result<Served, Refusal> {
            match alias.unwrap_or("deploy") {
                "deploy" | "readonly" => Ok(Served {
                    access_key_id: format!("ASIA{job}"),
                    secret_access_key: Secret::new("SECRETKEY".into()),
                    session_token: Secret::new("SESSIONTOKEN".into()),
                    expiration: time::macros::datetime!(2030-01-02 03:04:05.678 UTC),
                    last_updated: time::macros::datetime!(2030-01-02 02:04:05 UTC),
                    role_arn: "arn:aws:iam::123456789012:role/deploy".into(),
                    account_id: Some("123456789012".into()),
                }),
                _ => Err(Refusal {
                    status: 404,
                    code: "NoSuchRole".into(),
                    message: "no grant".into(),
                }),
            }
        }
        fn aliases(&self, _job: &str) -> Vec<String> {
            vec!["deploy".into(), "readonly".into()]
        }
    }

    const TOKEN: &str = "job-token-abc";

    async fn start() -> (SocketAddr, Arc<JobEndpoint>, tempfile::TempDir) {
        start_with(ConnLimits::default(), 1024).await
    }

    async fn start_with(
        limits: ConnLimits,
        total: usize,
    ) -> (SocketAddr, Arc<JobEndpoint>, tempfile::TempDir) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let job = Arc::new(JobEndpoint::new(
            "j1".into(),
            Sha256::digest(TOKEN).into(),
            addr,
            "eu-west-1".into(),
            true,
        ));
        let shared = Arc::new(Shared {
            source: Arc::new(Fake),
            metrics: Arc::new(Metrics::new()),
            audit: Arc::new(AuditLog::open(&dir.path().join("a.jsonl")).unwrap()),
            conns: ConnBudget::new(limits, total),
        });
        tokio::spawn(serve(listener, job.clone(), shared));
        (addr, job, dir)
    }

    /// Send raw bytes, return (status, headers+body text).
    async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, text)
    }

    fn get(addr: SocketAddr, path: &str, extra: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n")
            .into_bytes()
    }

    #[test]
    fn refusals_beyond_the_burst_wait_their_turn_and_the_rate_refills() {
        let job = JobEndpoint::new(
            "j1".into(),
            [0; 32],
            "127.0.0.1:80".parse().unwrap(),
            "eu-west-1".into(),
            true,
        );
        let t0 = Instant::now();
        let waits: Vec<Option<Duration>> = (0..REFUSAL_BURST as usize + 3)
            .map(|_| job.refusal_delay(t0))
            .collect();
        assert!(waits[..REFUSAL_BURST as usize].iter().all(Option::is_none));
        // Beyond the burst, at the same instant: one, two, three rate intervals.
        let step = 1.0 / REFUSALS_PER_SECOND;
        for (i, w) in waits[REFUSAL_BURST as usize..].iter().enumerate() {
            let w = w.expect("a refusal beyond the burst waits").as_secs_f64();
            assert!((w - step * (i + 1) as f64).abs() < 1e-6, "{i}: {w}");
        }
        // A second later the debt is paid and REFUSALS_PER_SECOND - 3 pass at once.
        let t1 = t0 + Duration::from_secs(1);
        let passed = (0..REFUSALS_PER_SECOND as usize)
            .filter(|_| job.refusal_delay(t1).is_none())
            .count();
        assert_eq!(passed, REFUSALS_PER_SECOND as usize - 3);
    }

    #[tokio::test]
    async fn a_flood_of_refused_requests_is_paced_while_good_ones_are_not() {
        let (addr, job, _dir) = start().await;
        // Use the burst up.
        for _ in 0..REFUSAL_BURST as usize {
            assert!(job.refusal_delay(Instant::now()).is_none());
        }
        let t = Instant::now();
        let (status, _) = raw(
            addr,
            &get(addr, "/v1/credentials", "Authorization: wrong\r\n"),
        )
        .await;
        assert_eq!(status, 403);
        assert!(
            t.elapsed() >= Duration::from_secs_f64(0.9 / REFUSALS_PER_SECOND),
            "{:?}",
            t.elapsed()
        );
        let t = Instant::now();
        let auth = format!("Authorization: {TOKEN}\r\n");
        let (status, _) = raw(addr, &get(addr, "/v1/credentials", &auth)).await;
        assert_eq!(status, 200);
        assert!(
            t.elapsed() < Duration::from_secs_f64(0.9 / REFUSALS_PER_SECOND),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn container_protocol_serves_the_sdk_shape() {
        let (addr, _job, _d) = start().await;
        let (st, body) = raw(
            addr,
            &get(
                addr,
                "/v1/credentials",
                &format!("Authorization: {TOKEN}\r\n"),
            ),
        )
        .await;
        assert_eq!(st, 200, "{body}");
        let json: serde_json::Value =
            serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(json["AccessKeyId"], "ASIAj1");
        assert_eq!(json["SecretAccessKey"], "SECRETKEY");
        assert_eq!(json["Token"], "SESSIONTOKEN");
        assert_eq!(json["Expiration"], "2030-01-02T03:04:05Z");
        assert_eq!(json["AccountId"], "123456789012");
        let (st, body) = raw(
            addr,
            &get(
                addr,
                "/v1/credentials/nope",
                &format!("Authorization: {TOKEN}\r\n"),
            ),
        )
        .await;
        assert_eq!(st, 404, "{body}");
        assert!(body.contains("\"Code\":\"NoSuchRole\""), "{body}");
    }

    #[tokio::test]
    async fn container_protocol_refuses_missing_wrong_and_ended_tokens() {
        let (addr, job, _d) = start().await;
        let (st, body) = raw(addr, &get(addr, "/v1/credentials", "")).await;
        assert_eq!(st, 401, "{body}");
        assert!(body.contains("MissingAuthorization"));
        let (st, _) = raw(
            addr,
            &get(addr, "/v1/credentials", "Authorization: job-token-abd\r\n"),
        )
        .await;
        assert_eq!(st, 403);
        let (st, _) = raw(
            addr,
            &get(
                addr,
                "/v1/credentials",
                &format!("Authorization: Bearer {TOKEN}\r\n"),
            ),
        )
        .await;
        assert_eq!(st, 403, "a Bearer prefix is not the raw token");
        job.end();
        let (st, body) = raw(
            addr,
            &get(
                addr,
                "/v1/credentials",
                &format!("Authorization: {TOKEN}\r\n"),
            ),
        )
        .await;
        assert_eq!(st, 403);
        assert!(body.contains("JobEnded"), "{body}");
    }

    #[tokio::test]
    async fn wrong_host_header_is_refused() {
        let (addr, _job, _d) = start().await;
        let req = format!("GET /v1/credentials HTTP/1.1\r\nHost: evil.example:80\r\nAuthorization: {TOKEN}\r\nConnection: close\r\n\r\n");
        let (st, body) = raw(addr, req.as_bytes()).await;
        assert_eq!(st, 400, "{body}");
        assert!(body.contains("InvalidHost"));
        let req = format!("GET /v1/credentials HTTP/1.1\r\nHost: localhost:{}\r\nAuthorization: {TOKEN}\r\nConnection: close\r\n\r\n", addr.port());
        assert_eq!(raw(addr, req.as_bytes()).await.0, 200);
    }

    #[tokio::test]
    async fn imds_v2_flow_and_its_refusals() {
        let (addr, _job, _d) = start().await;
        let put = |extra: &str| {
            format!("PUT /latest/api/token HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n{extra}\r\n").into_bytes()
        };
        let (st, resp) = raw(addr, &put("x-aws-ec2-metadata-token-ttl-seconds: 300\r\n")).await;
        assert_eq!(st, 200, "{resp}");
        assert!(
            resp.to_ascii_lowercase()
                .contains("x-aws-ec2-metadata-token-ttl-seconds: 300"),
            "{resp}"
        );
        let token = resp.split("\r\n\r\n").nth(1).unwrap().to_string();
        let h = format!("x-aws-ec2-metadata-token: {token}\r\n");
        let (st, body) = raw(
            addr,
            &get(addr, "/latest/meta-data/iam/security-credentials/", &h),
        )
        .await;
        assert_eq!(st, 200);
        assert!(
            body.ends_with("\r\n\r\ndeploy"),
            "only the default role is listed: {body}"
        );
        let (st, body) = raw(
            addr,
            &get(
                addr,
                "/latest/meta-data/iam/security-credentials/readonly",
                &h,
            ),
        )
        .await;
        assert_eq!(st, 200, "other aliases are served by name: {body}");
        let (st, body) = raw(
            addr,
            &get(
                addr,
                "/latest/meta-data/iam/security-credentials/deploy",
                &h,
            ),
        )
        .await;
        assert_eq!(st, 200, "{body}");
        assert!(
            body.contains("\"Code\":\"Success\"") && body.contains("\"Type\":\"AWS-HMAC\""),
            "{body}"
        );
        let (st, body) = raw(addr, &get(addr, "/latest/meta-data/placement/region", &h)).await;
        assert_eq!(st, 200);
        assert!(body.ends_with("eu-west-1"));
        let (st, body) = raw(
            addr,
            &get(addr, "/latest/dynamic/instance-identity/document", &h),
        )
        .await;
        assert!(
            st == 200 && body.contains("\"region\":\"eu-west-1\""),
            "{body}"
        );
        // IMDSv1, a made-up token, a proxied PUT and a bad TTL are all refused.
        assert_eq!(
            raw(
                addr,
                &get(addr, "/latest/meta-data/iam/security-credentials/", "")
            )
            .await
            .0,
            401
        );
        assert_eq!(
            raw(
                addr,
                &get(
                    addr,
                    "/latest/meta-data/iam/security-credentials/",
                    "x-aws-ec2-metadata-token: forged\r\n"
                )
            )
            .await
            .0,
            401
        );
        assert_eq!(
            raw(
                addr,
                &put("x-aws-ec2-metadata-token-ttl-seconds: 300\r\nX-Forwarded-For: 10.0.0.1\r\n")
            )
            .await
            .0,
            403
        );
        assert_eq!(
            raw(addr, &put("x-aws-ec2-metadata-token-ttl-seconds: 0\r\n"))
                .await
                .0,
            400
        );
        assert_eq!(
            raw(
                addr,
                &put("x-aws-ec2-metadata-token-ttl-seconds: 21601\r\n")
            )
            .await
            .0,
            400
        );
        assert_eq!(raw(addr, &put("")).await.0, 400);
    }

    #[tokio::test]
    async fn malformed_requests_get_4xx_and_the_endpoint_keeps_serving() {
        let (addr, _job, _d) = start().await;
        let (st, _) = raw(addr, b"\x16\x03\x01garbage\r\n\r\n").await;
        assert_eq!(st, 400);
        let huge = format!(
            "GET /v1/credentials HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let (st, _) = raw(addr, huge.as_bytes()).await;
        assert!(st == 431 || st == 400 || st == 0, "status {st}");
        let (st, _) = raw(addr, &format!("POST /v1/credentials HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes()).await;
        assert_eq!(st, 405);
        let (st, _) = raw(addr, &get(addr, "/etc/passwd", "")).await;
        assert_eq!(st, 404);
        let (st, _) = raw(
            addr,
            &get(
                addr,
                "/v1/credentials",
                &format!("Authorization: {TOKEN}\r\n"),
            ),
        )
        .await;
        assert_eq!(st, 200);
    }

    #[tokio::test]
    async fn refusals_are_audited_without_the_token_and_rate_limited() {
        let (addr, _job, dir) = start().await;
        let burst = crate::audit::JobLimit::default().burst as usize;
        for _ in 0..burst + 40 {
            raw(
                addr,
                &get(
                    addr,
                    "/v1/credentials",
                    "Authorization: stolen-token-value\r\n",
                ),
            )
            .await;
        }
        // Every refusal was handed to the writer before its answer; wait for the writes.
        let read = || std::fs::read_to_string(dir.path().join("a.jsonl")).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(5);
        while read().lines().count() < burst && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let audit = read();
        // The job's burst (plus at most the one more its rate refilled meanwhile).
        let n = audit.lines().count();
        assert!((burst..=burst + 2).contains(&n), "{n} records");
        assert!(audit.contains("token_rejected"));
        assert!(!audit.contains("stolen-token-value"));
    }

    /// Polls `cond` every 20 ms until it holds or `limit` passes.
    async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cond()
    }

    fn keep_alive_get(addr: SocketAddr) -> Vec<u8> {
        format!("GET /v1/credentials HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {TOKEN}\r\n\r\n")
            .into_bytes()
    }

    /// Reads one response (headers and a Content-Length body) from a kept-alive stream.
    async fn read_response(s: &mut tokio::net::TcpStream) -> String {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before a whole response");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_string)
                    })
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if body.len() >= len {
                    return text;
                }
            }
        }
    }

    #[tokio::test]
    async fn a_job_holds_at_most_its_cap_and_the_rest_wait_without_a_descriptor() {
        let limits = ConnLimits {
            per_job: 4,
            ..ConnLimits::default()
        };
        let (addr, job, _d) = start_with(limits, 1024).await;
        // Four connections kept busy with requests: all served.
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(&keep_alive_get(addr)).await.unwrap();
            assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
            held.push(s);
        }
        assert_eq!(job.open_connections(), 4);
        // A fifth connects (the kernel completes the handshake) but is not accepted: its
        // request gets no answer while the others are open.
        let mut fifth = tokio::net::TcpStream::connect(addr).await.unwrap();
        fifth.write_all(&keep_alive_get(addr)).await.unwrap();
        let mut byte = [0u8; 1];
        let waited = tokio::time::timeout(Duration::from_millis(500), fifth.read(&mut byte)).await;
        assert!(waited.is_err(), "a connection beyond the cap was served");
        assert_eq!(job.open_connections(), 4);
        // The busy ones keep being served meanwhile.
        held[0].write_all(&keep_alive_get(addr)).await.unwrap();
        assert!(read_response(&mut held[0])
            .await
            .starts_with("HTTP/1.1 200"));
        // One closes: the waiting one is accepted and answered.
        drop(held.pop());
        let answer = tokio::time::timeout(Duration::from_secs(3), read_response(&mut fifth))
            .await
            .expect("the waiting connection is served once a slot is free");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(eventually(Duration::from_secs(2), || job.open_connections() == 4).await);
    }

    #[tokio::test]
    async fn the_global_budget_bounds_all_jobs_together() {
        let (addr, job, _d) = start_with(ConnLimits::default(), 3).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(&keep_alive_get(addr)).await.unwrap();
            assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
            held.push(s);
        }
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        third.write_all(&keep_alive_get(addr)).await.unwrap();
        assert!(read_response(&mut third).await.starts_with("HTTP/1.1 200"));
        let mut fourth = tokio::net::TcpStream::connect(addr).await.unwrap();
        fourth.write_all(&keep_alive_get(addr)).await.unwrap();
        let mut byte = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(500), fourth.read(&mut byte))
                .await
                .is_err(),
            "a connection beyond the global budget was served"
        );
        assert_eq!(job.open_connections(), 3);
        drop(third);
        let answer = tokio::time::timeout(Duration::from_secs(3), read_response(&mut fourth))
            .await
            .expect("served once the budget has room");
        assert!(answer.starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
        let limits = ConnLimits {
            idle: Duration::from_millis(300),
            ..ConnLimits::default()
        };
        let (addr, job, _d) = start_with(limits, 1024).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&keep_alive_get(addr)).await.unwrap();
        assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
        assert_eq!(job.open_connections(), 1);
        // Idle: the agent closes it (EOF on our side) and frees its slot.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "an idle connection was kept open");
        assert!(eventually(Duration::from_secs(2), || job.open_connections() == 0).await);
        // A request head dribbled a byte at a time is cut off the same way.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        for b in b"GET /v1/credentials HTTP/1.1\r\n".iter() {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut rest)).await;
        assert!(started.elapsed() < Duration::from_secs(4));
        assert!(eventually(Duration::from_secs(2), || job.open_connections() == 0).await);
    }

    #[tokio::test]
    async fn a_job_that_never_reads_its_responses_loses_the_connection() {
        let limits = ConnLimits {
            write: Duration::from_millis(300),
            ..ConnLimits::default()
        };
        let (addr, job, _d) = start_with(limits, 1024).await;
        // A small receive window, and thousands of pipelined requests never read: the
        // agent's writes stall until the write timeout ends the connection.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(addr).await.unwrap();
        let burst: Vec<u8> = keep_alive_get(addr).repeat(200);
        let writer = tokio::spawn(async move {
            for _ in 0..500 {
                if tokio::time::timeout(Duration::from_secs(2), s.write_all(&burst))
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    break;
                }
            }
            s
        });
        assert!(
            eventually(Duration::from_secs(5), || job.open_connections() == 1).await,
            "the connection was never accepted"
        );
        assert!(
            eventually(Duration::from_secs(10), || job.open_connections() == 0).await,
            "a connection whose responses are never read is kept"
        );
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn write_deadline_fails_a_stalled_write_and_not_a_slow_one() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = WriteDeadline::new(a, Duration::from_millis(200));
        // Progress within the limit each time: fine, however long it takes overall.
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 64];
            while got < 640 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                got += b.read(&mut buf).await.unwrap();
            }
            b
        });
        w.write_all(&[7u8; 640]).await.unwrap();
        let _b = reader.await.unwrap();
        // Nobody reads: the write fails once it has stalled for the limit.
        let started = Instant::now();
        let err = w.write_all(&[7u8; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn aws_time_is_whole_seconds_zulu() {
        let t = time::macros::datetime!(2026-11-26 05:28:54.999 +02:00);
        assert_eq!(aws_time(t), "2026-11-26T03:28:54Z");
    }
}
