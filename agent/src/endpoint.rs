//! The job's credential endpoint: the AWS container-credentials protocol and an IMDSv2
//! emulation, served on one listener per job.
//!
//! The listener a request arrives on identifies the job (today a loopback port per job; with
//! the sandbox, sockets bound inside the job's own network namespace). The container token
//! must also match that job's token, compared in constant time. The endpoint never decides
//! anything: it serves what its [`CredentialSource`] (the broker) holds for its job, and it
//! never reaches into policies or sandboxes.

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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tokio::net::TcpListener;

use crate::audit::AuditLog;
use crate::metrics::Metrics;
use crate::secret::Secret;

/// Base path of the container-credentials protocol; `/<alias>` selects a grant.
pub const CONTAINER_PATH: &str = "/v1/credentials";
/// IMDSv2 token lifetimes the real service accepts.
const IMDS_TTL_MAX: u64 = 21_600;
/// At most this many live IMDS tokens per job (each PUT makes one).
const IMDS_TOKENS_MAX: usize = 256;
/// Refusal records per job per minute, so a flood cannot fill the disk.
const AUDIT_REFUSALS_PER_MINUTE: u32 = 10;

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
    /// `POST /v1/bind` is served once, and only if the job was started to bind that way.
    bind_open: AtomicBool,
    imds_tokens: Mutex<HashMap<[u8; 32], Instant>>,
    refusals: Mutex<(Instant, u32)>,
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
            bind_open: AtomicBool::new(false),
            imds_tokens: Mutex::new(HashMap::new()),
            refusals: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Also accept `host` (e.g. `169.254.170.2` inside a sandbox).
    pub fn allow_host(&mut self, host: String) {
        self.hosts.push(host);
    }

    /// From now on every request is refused, even on open connections.
    pub fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
    }

    /// Serve one `POST /v1/bind` (a job started with `bind_later` and `endpoint_bind`):
    /// the first request with the job's token uses it up, whatever its outcome.
    pub fn open_bind(&self) {
        self.bind_open.store(true, Ordering::SeqCst);
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

    fn imds_token_valid(&self, presented: &[u8]) -> bool {
        // Looking up the SHA-256 of the presented token reveals nothing useful about any
        // valid token through timing.
        let h: [u8; 32] = Sha256::digest(presented).into();
        let toks = self.imds_tokens.lock().unwrap_or_else(|p| p.into_inner());
        toks.get(&h).is_some_and(|exp| *exp > Instant::now())
    }

    /// True when this refusal may be audited (rate limit per job).
    fn may_audit_refusal(&self) -> bool {
        let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        if r.0.elapsed() > Duration::from_secs(60) {
            *r = (Instant::now(), 0);
        }
        r.1 += 1;
        r.1 <= AUDIT_REFUSALS_PER_MINUTE
    }
}

/// A new random endpoint token: 32 bytes from the OS, base64url (43 characters).
pub fn random_token() -> String {
    use base64::Engine;
    let mut b = [0u8; 32];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Shared by every job's listener.
#[derive(Debug)]
pub struct Shared<S> {
    pub source: Arc<S>,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<AuditLog>,
}

/// Serve one job's listener until the task is aborted.
pub async fn serve<S: CredentialSource>(
    listener: TcpListener,
    job: Arc<JobEndpoint>,
    shared: Arc<Shared<S>>,
) {
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(job = %job.job_id, error = %e, "endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(stream, job.clone(), shared.clone()));
    }
}

/// One accepted connection of the job, served until it closes. Any byte stream will do: the
/// fuzz target feeds it raw HTTP/1.1 over an in-memory pipe ([`crate::fuzzing`]).
pub(crate) async fn serve_connection<S, I>(io: I, job: Arc<JobEndpoint>, shared: Arc<Shared<S>>)
where
    S: CredentialSource,
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let job = job.clone();
        let shared = shared.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(req, &job, &shared).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), svc);
    // Malformed requests end here with hyper's own 400/431; nothing else is affected.
    let _ = conn.await;
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
    if job.may_audit_refusal() {
        let rec = crate::fields! {"reason" => why, "code" => code};
        if let Err(e) = shared
            .audit
            .append("token_rejected", Some(&job.job_id), rec)
        {
            tracing::error!(error = %e, "cannot audit a refused endpoint request");
            shared.metrics.audit_failures.inc();
        }
    }
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

/// Where a job binds its own identity (`POST`, the job's token, a `BindRequest` body).
pub const BIND_PATH: &str = "/v1/bind";

/// `POST /v1/bind`: the job's one bind from inside, for jobs started with `bind_later` and
/// `endpoint_bind` (GitHub's job-started hook in an ephemeral runner's sandbox). The job's
/// token is required; the first such request closes the route whatever its outcome, so a
/// later request (a step of the job) is refused and audited.
async fn bind<S: CredentialSource>(
    req: Request<Incoming>,
    job: &JobEndpoint,
    shared: &Shared<S>,
) -> Resp {
    if let Some(resp) = unauthorized(&req, Method::POST, job, shared, "") {
        return resp;
    }
    if !job.bind_open.swap(false, Ordering::SeqCst) {
        let rec = crate::fields! {
            "reason" => "a bind through the job's endpoint after its one bind (or for a job not started to bind this way)",
            "via" => "endpoint",
        };
        if let Err(e) = shared.audit.append("bind_refused", Some(&job.job_id), rec) {
            tracing::error!(error = %e, "cannot audit a refused bind");
            shared.metrics.audit_failures.inc();
        }
        return error(
            StatusCode::CONFLICT,
            "AlreadyBound",
            "this job binds its identity once, before its first step; this bind is refused and audited",
        );
    }
    use http_body_util::BodyExt;
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BIND_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BadRequest",
                "the bind request is unreadable or too large",
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
        for _ in 0..30 {
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
        let audit = std::fs::read_to_string(dir.path().join("a.jsonl")).unwrap();
        assert_eq!(audit.lines().count(), AUDIT_REFUSALS_PER_MINUTE as usize);
        assert!(audit.contains("token_rejected"));
        assert!(!audit.contains("stolen-token-value"));
    }

    #[test]
    fn aws_time_is_whole_seconds_zulu() {
        let t = time::macros::datetime!(2026-11-26 05:28:54.999 +02:00);
        assert_eq!(aws_time(t), "2026-11-26T03:28:54Z");
    }
}
