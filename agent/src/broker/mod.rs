//! The broker: the agent's own credentials ([`own`]), STS calls ([`sts`]), what CloudTrail
//! shows ([`naming`]) and the per-job credential cache (here).
//!
//! Credentials are cached per (job, alias) and never shared across jobs, even for the same
//! role. Every grant is prefetched when a job starts and renewed in the background, so the
//! endpoint answers from the cache; a request that finds nothing waits a bounded time for
//! the one in-flight fetch. Every issue is audited *before* it is cached or served, and an
//! audit failure means nothing is served. The broker must never hand one job's credentials
//! to another, outlive a job's deadline with a renewal, or put a secret key, session token
//! or OIDC token into a log, an audit record or an error.

pub mod naming;
pub mod own;
pub mod sts;

use crate::audit::AuditLog;
use crate::config::Config;
use crate::http_client::HttpClient;
use crate::identity::JobIdentity;
use crate::metrics::Metrics;
use crate::policy::{Grant, Method};
use crate::secret::Secret;
use own::{OwnCredentialsProvider, OwnSource};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use sts::{AssumeRoleRequest, StsClient, StsError};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use own::OwnCredentials;

/// STS session limits.
pub const MIN_DURATION_SECS: u32 = 900;
pub const MAX_DURATION_SECS: u32 = 43200;
/// Role chaining (own credentials are themselves a session) caps sessions at one hour.
pub const CHAINED_MAX_DURATION_SECS: u32 = 3600;
/// A failing fetch is retried in the background no faster than this, doubling up to
/// [`MAX_RETRY_INTERVAL`].
const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(60);

/// What a job was granted.
#[derive(Debug, Clone)]
pub struct JobGrants {
    pub job_id: String,
    pub identity: JobIdentity,
    /// For web-identity grants; kept in memory only, dropped with the job.
    pub oidc_token: Option<Secret<String>>,
    pub rule: Option<String>,
    /// Default grant first.
    pub grants: Vec<Grant>,
    /// The job's end of life: no credential outlives it.
    pub deadline: OffsetDateTime,
}

/// Credentials issued to one job for one grant.
#[derive(Debug, Clone)]
pub struct IssuedCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret<String>,
    pub session_token: Secret<String>,
    pub expiration: OffsetDateTime,
    /// The role granted.
    pub role_arn: String,
    /// From STS `AssumedRoleUser.Arn`.
    pub assumed_role_arn: Option<String>,
    pub account_id: Option<String>,
    pub session_name: String,
    pub last_updated: OffsetDateTime,
}

/// Everything that can go wrong when a job asks for credentials. [`BrokerError::http_status`]
/// and [`BrokerError::code`] map each to what the job sees; `Display` is the message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "job {0} is not active (unknown or ended): credentials are served only while a job runs"
    )]
    UnknownJob(String),
    #[error("job {job} passed its deadline {deadline}: no credentials are issued after it")]
    JobExpired { job: String, deadline: String },
    #[error("job {0} was granted no role: no policy rule matched its identity (see `airlock policy explain`)")]
    NoGrants(String),
    #[error("job {job} has no role {alias:?}; granted: {granted}")]
    NoSuchAlias {
        job: String,
        alias: String,
        granted: String,
    },
    #[error("STS refused {action} for role {role_arn}: {code}: {message}")]
    StsRefused {
        action: &'static str,
        role_arn: String,
        code: String,
        message: String,
    },
    /// `reason` is the whole STS error, which already names the role.
    #[error("{reason}")]
    StsUnavailable { role_arn: String, reason: String },
    #[error("role {role_arn} is granted through web identity but job {job} has no OIDC token; start the job with its CI OIDC token, or grant the role with method = \"assume-role\"")]
    NoWebIdentityToken { job: String, role_arn: String },
    #[error("the agent's own AWS credentials are unavailable, so role {role_arn} cannot be assumed: {reason}")]
    OwnCredentials { role_arn: String, reason: String },
    #[error("credentials for role {role_arn} were not served because the audit record could not be written: {reason}")]
    AuditFailed { role_arn: String, reason: String },
    #[error("credentials for role {role_arn} of job {job} are still being fetched from STS; retry in a moment")]
    Pending { job: String, role_arn: String },
    #[error("internal error while issuing role {role_arn}: {reason}")]
    Internal { role_arn: String, reason: String },
}

/// STS error codes passed through to the job as they are.
const STS_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "SignatureDoesNotMatch",
    "InvalidClientTokenId",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidIdentityToken",
    "IDPRejectedClaim",
    "MalformedPolicyDocument",
    "PackedPolicyTooLarge",
    "RegionDisabledException",
    "ValidationError",
    "InvalidParameterValue",
    "InvalidParameterCombination",
    "MissingParameter",
    "InvalidAction",
    "OptInRequired",
];

impl BrokerError {
    pub fn http_status(&self) -> u16 {
        match self {
            BrokerError::UnknownJob(_)
            | BrokerError::JobExpired { .. }
            | BrokerError::StsRefused { .. }
            | BrokerError::NoWebIdentityToken { .. } => 403,
            BrokerError::NoGrants(_) | BrokerError::NoSuchAlias { .. } => 404,
            BrokerError::StsUnavailable { .. }
            | BrokerError::OwnCredentials { .. }
            | BrokerError::AuditFailed { .. }
            | BrokerError::Pending { .. } => 503,
            BrokerError::Internal { .. } => 500,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            BrokerError::UnknownJob(_) => "JobNotActive",
            BrokerError::JobExpired { .. } => "JobExpired",
            BrokerError::NoGrants(_) | BrokerError::NoSuchAlias { .. } => "NoSuchRole",
            BrokerError::StsRefused { code, .. } => STS_CODES
                .iter()
                .find(|c| *c == code)
                .copied()
                .unwrap_or("StsRefused"),
            BrokerError::StsUnavailable { .. } => "ServiceUnavailable",
            BrokerError::NoWebIdentityToken { .. } => "MissingWebIdentityToken",
            BrokerError::OwnCredentials { .. } => "AgentCredentialsUnavailable",
            BrokerError::AuditFailed { .. } => "AuditUnavailable",
            BrokerError::Pending { .. } => "CredentialsPending",
            BrokerError::Internal { .. } => "InternalError",
        }
    }

    fn from_sts(e: StsError) -> BrokerError {
        match e {
            StsError::Refused {
                action,
                role_arn,
                code,
                message,
                ..
            } => BrokerError::StsRefused {
                action,
                role_arn,
                code,
                message,
            },
            StsError::Unavailable { ref role_arn, .. }
            | StsError::BadResponse { ref role_arn, .. } => BrokerError::StsUnavailable {
                role_arn: role_arn.clone(),
                reason: e.to_string(),
            },
            StsError::Sign { ref role_arn, .. } => BrokerError::Internal {
                role_arn: role_arn.clone(),
                reason: e.to_string(),
            },
        }
    }
}

/// Timings of the cache; the defaults are the production values, tests shorten them.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Own credentials; `None` takes `[credentials]` of the config.
    pub own_source: Option<OwnSource>,
    /// How long a request waits for an in-flight fetch before it gets `CredentialsPending`
    /// (SDK clients give up after 1–2 s).
    pub request_wait: Duration,
    /// How long a failed fetch answers requests before STS is asked again.
    pub failure_memory: Duration,
    /// Renew when less than max(this, lifetime/3) is left: SDKs re-fetch credentials with
    /// less than 15 minutes left, so served credentials keep well more than that.
    pub renew_floor: Duration,
    /// Never serve credentials with less than this left; wait for fresh ones instead.
    pub serve_floor: Duration,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            own_source: None,
            request_wait: Duration::from_millis(1500),
            failure_memory: Duration::from_secs(5),
            renew_floor: Duration::from_secs(20 * 60),
            serve_floor: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Default)]
struct SlotState {
    current: Option<Arc<IssuedCredentials>>,
    in_flight: bool,
    failure: Option<(BrokerError, Instant)>,
    failures_in_row: u32,
    ended: bool,
}

/// One (job, grant) cache entry. `changed` ticks after every fetch and at the job's end.
#[derive(Debug)]
struct Slot {
    state: Mutex<SlotState>,
    changed: watch::Sender<u64>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tick(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }
}

#[derive(Debug)]
struct Job {
    grants: JobGrants,
    /// Parallel to `grants.grants`.
    slots: Vec<Slot>,
    renewals: Mutex<Vec<JoinHandle<()>>>,
}

impl Job {
    fn slot_index(&self, alias: Option<&str>) -> Result<usize, BrokerError> {
        let grants = &self.grants.grants;
        if grants.is_empty() {
            return Err(BrokerError::NoGrants(self.grants.job_id.clone()));
        }
        let Some(alias) = alias else {
            return Ok(grants.iter().position(|g| g.default).unwrap_or(0));
        };
        grants
            .iter()
            .position(|g| g.alias == alias)
            .ok_or_else(|| BrokerError::NoSuchAlias {
                job: self.grants.job_id.clone(),
                alias: alias.to_string(),
                granted: grants
                    .iter()
                    .map(|g| g.alias.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

#[derive(Debug)]
struct Inner {
    sts: StsClient,
    own: OwnCredentialsProvider,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    opts: BrokerOptions,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
}

/// The per-job credential cache in front of STS.
#[derive(Debug)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl Broker {
    pub async fn new(
        cfg: &Config,
        http: HttpClient,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Broker>, BrokerError> {
        Self::with_options(cfg, http, audit, metrics, BrokerOptions::default()).await
    }

    pub async fn with_options(
        cfg: &Config,
        http: HttpClient,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        opts: BrokerOptions,
    ) -> Result<Arc<Broker>, BrokerError> {
        let sts = StsClient::new(http.clone(), &cfg.sts, metrics.clone());
        let source = opts
            .own_source
            .clone()
            .unwrap_or_else(|| OwnSource::from_config(cfg));
        let own = OwnCredentialsProvider::new(source, http, sts.clone());
        // Learn early whether own credentials work; jobs with web-identity grants are still
        // served when they do not, so this only warns.
        match own.get().await {
            Ok(c) => {
                tracing::info!(source = own.source().kind(), access_key_id = %c.access_key_id, "own AWS credentials loaded")
            }
            Err(e) => {
                tracing::warn!(source = own.source().kind(), error = %e, "own AWS credentials unavailable: assume-role grants will fail until this is fixed")
            }
        }
        Ok(Arc::new(Broker {
            inner: Arc::new(Inner {
                sts,
                own,
                audit,
                metrics,
                opts,
                jobs: Mutex::new(HashMap::new()),
            }),
        }))
    }

    /// Register a job: prefetch every grant in the background and keep them renewed until
    /// [`Broker::end_job`] or the job's deadline. A job id already known is replaced.
    pub fn start_job(self: &Arc<Self>, job: JobGrants) {
        let id = job.job_id.clone();
        let slots = job
            .grants
            .iter()
            .map(|_| Slot {
                state: Mutex::new(SlotState::default()),
                changed: watch::channel(0).0,
            })
            .collect();
        let job = Arc::new(Job {
            grants: job,
            slots,
            renewals: Mutex::new(Vec::new()),
        });
        let old = self.inner.jobs_lock().insert(id.clone(), job.clone());
        if let Some(old) = old {
            tracing::warn!(job = %id, "job started twice: the earlier registration is dropped");
            stop(&old);
        }
        let handles = (0..job.slots.len())
            .map(|idx| tokio::spawn(renew_loop(self.inner.clone(), job.clone(), idx)))
            .collect();
        *job.renewals.lock().unwrap_or_else(|p| p.into_inner()) = handles;
    }

    /// The job's credentials for `alias` (`None`: the default grant), from the cache when
    /// they are there; otherwise wait up to `request_wait` for the one fetch in flight.
    pub async fn credentials(
        &self,
        job_id: &str,
        alias: Option<&str>,
    ) -> Result<Arc<IssuedCredentials>, BrokerError> {
        let inner = &self.inner;
        let job = inner
            .jobs_lock()
            .get(job_id)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownJob(job_id.to_string()))?;
        let idx = job.slot_index(alias)?;
        let slot = &job.slots[idx];
        let started = Instant::now();
        let mut rx = slot.changed.subscribe();
        {
            let mut st = slot.lock();
            if st.ended {
                return Err(BrokerError::UnknownJob(job_id.to_string()));
            }
            let now = OffsetDateTime::now_utc();
            if let Some(c) = inner.servable(&st, now) {
                inner.metrics.cache_hits.inc();
                // Belt and braces beside the renewal task: a stale-ish hit starts a fetch.
                if inner.renew_due(&job, &c, now) && !st.in_flight && !inner.failing(&st) {
                    inner.begin_fetch(&job, idx, &mut st);
                }
                return Ok(c);
            }
            inner.metrics.cache_misses.inc();
            if let Some((e, _)) = st.failure.as_ref().filter(|_| inner.failing(&st)) {
                return Err(e.clone());
            }
            if !st.in_flight {
                inner.begin_fetch(&job, idx, &mut st);
            }
        }
        let deadline = tokio::time::Instant::from_std(started + inner.opts.request_wait);
        loop {
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Err(_) => {
                    return Err(BrokerError::Pending {
                        job: job_id.to_string(),
                        role_arn: job.grants.grants[idx].role_arn.clone(),
                    })
                }
                Ok(Err(_)) => return Err(BrokerError::UnknownJob(job_id.to_string())),
                Ok(Ok(())) => {
                    let st = slot.lock();
                    if st.ended {
                        return Err(BrokerError::UnknownJob(job_id.to_string()));
                    }
                    if let Some(c) = inner.servable(&st, OffsetDateTime::now_utc()) {
                        return Ok(c);
                    }
                    if let Some((e, at)) = &st.failure {
                        if *at >= started {
                            return Err(e.clone());
                        }
                    }
                }
            }
        }
    }

    /// The job's grant aliases, default first; empty for an unknown job or no grants.
    pub fn aliases(&self, job_id: &str) -> Vec<String> {
        let Some(job) = self.inner.jobs_lock().get(job_id).cloned() else {
            return Vec::new();
        };
        let mut out: Vec<String> = Vec::with_capacity(job.grants.grants.len());
        if let Ok(d) = job.slot_index(None) {
            out.push(job.grants.grants[d].alias.clone());
        }
        for g in &job.grants.grants {
            if !out.contains(&g.alias) {
                out.push(g.alias.clone());
            }
        }
        out
    }

    /// Forget the job at once: its cached credentials and token are dropped, renewals stop,
    /// and every later or waiting request fails with `JobNotActive`.
    pub fn end_job(&self, job_id: &str) {
        let job = self.inner.jobs_lock().remove(job_id);
        if let Some(job) = job {
            stop(&job);
        }
    }

    /// Whether the broker holds the job (for recovery checks and tests).
    pub fn has_job(&self, job_id: &str) -> bool {
        self.inner.jobs_lock().contains_key(job_id)
    }
}

fn stop(job: &Job) {
    for slot in &job.slots {
        {
            let mut st = slot.lock();
            st.ended = true;
            st.current = None;
            st.failure = None;
        }
        slot.tick();
    }
    for h in job
        .renewals
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
    {
        h.abort();
    }
}

/// `min(requested, time left to the deadline)`, within STS's 900 s – 12 h (1 h when
/// chaining). STS has no session shorter than 900 s, so a job in its last 15 minutes gets
/// 900 s; `end_job` still drops them from the cache at once.
pub fn clamp_duration(requested: u32, secs_to_deadline: i64, chained: bool) -> u32 {
    let max = if chained {
        CHAINED_MAX_DURATION_SECS
    } else {
        MAX_DURATION_SECS
    };
    let to_deadline = u32::try_from(secs_to_deadline.max(0)).unwrap_or(u32::MAX);
    requested.min(to_deadline).max(MIN_DURATION_SECS).min(max)
}

impl Inner {
    fn jobs_lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn servable(&self, st: &SlotState, now: OffsetDateTime) -> Option<Arc<IssuedCredentials>> {
        st.current
            .as_ref()
            .filter(|c| c.expiration - now > self.opts.serve_floor)
            .cloned()
    }

    /// The last fetch failed recently: answer with its error rather than asking STS again.
    fn failing(&self, st: &SlotState) -> bool {
        st.failure
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < self.opts.failure_memory)
    }

    /// When `c` should be replaced: less than max(renew_floor, lifetime/3) left, but not
    /// before half its lifetime (short sessions), and `None` when it outlives the job.
    fn renew_at(&self, job: &Job, c: &IssuedCredentials) -> Option<OffsetDateTime> {
        if c.expiration >= job.grants.deadline {
            return None;
        }
        let lifetime = c.expiration - c.last_updated;
        let ahead = lifetime / 3;
        let floor = time::Duration::try_from(self.opts.renew_floor).unwrap_or(time::Duration::MAX);
        let ahead = if ahead > floor { ahead } else { floor };
        Some((c.expiration - ahead).max(c.last_updated + lifetime / 2))
    }

    fn renew_due(&self, job: &Job, c: &IssuedCredentials, now: OffsetDateTime) -> bool {
        self.renew_at(job, c).is_some_and(|at| at <= now)
    }

    /// Start the slot's one fetch. The caller holds the slot lock and checked `in_flight`.
    fn begin_fetch(self: &Arc<Self>, job: &Arc<Job>, idx: usize, st: &mut SlotState) {
        st.in_flight = true;
        let (inner, job) = (self.clone(), job.clone());
        tokio::spawn(async move {
            let result = inner.issue(&job, idx).await;
            let slot = &job.slots[idx];
            {
                let mut st = slot.lock();
                st.in_flight = false;
                match result {
                    // A job that ended meanwhile never gets them cached.
                    Ok(c) if !st.ended => {
                        st.current = Some(c);
                        st.failure = None;
                        st.failures_in_row = 0;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        st.failure = Some((e, Instant::now()));
                        st.failures_in_row = st.failures_in_row.saturating_add(1);
                    }
                }
            }
            slot.tick();
        });
    }

    /// One STS call for one grant, audited before anything is returned.
    async fn issue(&self, job: &Job, idx: usize) -> Result<Arc<IssuedCredentials>, BrokerError> {
        let g = &job.grants;
        let grant = &g.grants[idx];
        let now = OffsetDateTime::now_utc();
        let left = (g.deadline - now).whole_seconds();
        if left <= 0 {
            return Err(BrokerError::JobExpired {
                job: g.job_id.clone(),
                deadline: rfc3339(g.deadline),
            });
        }
        // Nothing is minted that could not be recorded.
        if let Some(why) = self.audit.failing() {
            return Err(BrokerError::AuditFailed {
                role_arn: grant.role_arn.clone(),
                reason: why,
            });
        }
        let session_name = naming::session_name(&g.identity, &g.job_id);
        let mut req = AssumeRoleRequest {
            role_arn: grant.role_arn.clone(),
            session_name: session_name.clone(),
            duration_secs: 0,
            policy: grant.session_policy.clone(),
            policy_arns: grant.policy_arns.clone(),
            tags: Vec::new(),
            source_identity: None,
        };
        let result = match grant.method {
            Method::AssumeRole => {
                let own = self.own.get().await.map_err(|e| {
                    tracing::warn!(job = %g.job_id, role_arn = %grant.role_arn, error = %e, "own credentials unavailable");
                    BrokerError::OwnCredentials {
                        role_arn: grant.role_arn.clone(),
                        reason: e.to_string(),
                    }
                })?;
                req.duration_secs = clamp_duration(grant.duration_secs, left, own.is_session());
                req.tags = naming::session_tags(grant, &g.identity);
                req.source_identity = Some(naming::source_identity(&g.identity, &g.job_id));
                self.sts.assume_role(&req, &own).await
            }
            Method::WebIdentity => {
                let token =
                    g.oidc_token
                        .as_ref()
                        .ok_or_else(|| BrokerError::NoWebIdentityToken {
                            job: g.job_id.clone(),
                            role_arn: grant.role_arn.clone(),
                        })?;
                req.duration_secs = clamp_duration(grant.duration_secs, left, false);
                self.sts.assume_role_with_web_identity(&req, token).await
            }
        };
        let method = match grant.method {
            Method::AssumeRole => "assume-role",
            Method::WebIdentity => "web-identity",
        };
        let creds = match result {
            Ok(c) => c,
            Err(e) => {
                let err = BrokerError::from_sts(e);
                let code = match &err {
                    BrokerError::StsRefused { code, .. } => code.clone(),
                    other => other.code().to_string(),
                };
                tracing::warn!(job = %g.job_id, alias = %grant.alias, role_arn = %grant.role_arn, %code, error = %err, "STS call failed");
                let rec = crate::fields! {
                    "repository" => g.identity.repository,
                    "alias" => grant.alias,
                    "role_arn" => grant.role_arn,
                    "method" => method,
                    "code" => code,
                    "message" => err.to_string(),
                };
                // A job's requests can set off STS calls: its limit applies.
                self.audit.job_event("sts_error", &g.job_id, rec);
                return Err(err);
            }
        };
        let issued = IssuedCredentials {
            account_id: creds
                .assumed_role_arn
                .as_deref()
                .and_then(sts::account_of)
                .or_else(|| sts::account_of(&grant.role_arn)),
            access_key_id: creds.access_key_id,
            secret_access_key: creds.secret_access_key,
            session_token: creds.session_token,
            expiration: creds.expiration,
            role_arn: grant.role_arn.clone(),
            assumed_role_arn: creds.assumed_role_arn,
            session_name,
            last_updated: now,
        };
        let rec = crate::fields! {
            "repository" => g.identity.repository,
            "rule" => g.rule,
            "alias" => grant.alias,
            "role_arn" => grant.role_arn,
            "assumed_role_arn" => issued.assumed_role_arn,
            "session_name" => issued.session_name,
            "source_identity" => req.source_identity,
            "access_key_id" => issued.access_key_id,
            "expiration" => rfc3339(issued.expiration),
            "duration" => req.duration_secs,
            "method" => method,
            "session_tags" => req.tags.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        };
        if let Err(e) = self
            .audit
            .append("credentials_issued", Some(&g.job_id), rec)
            .await
        {
            tracing::error!(job = %g.job_id, role_arn = %grant.role_arn, error = %e, "audit write failed: credentials withheld");
            return Err(BrokerError::AuditFailed {
                role_arn: grant.role_arn.clone(),
                reason: e.to_string(),
            });
        }
        tracing::info!(job = %g.job_id, alias = %grant.alias, role_arn = %grant.role_arn, access_key_id = %issued.access_key_id, expiration = %rfc3339(issued.expiration), "credentials issued");
        Ok(Arc::new(issued))
    }
}

/// Keep one slot fetched and renewed until the job ends or passes its deadline.
async fn renew_loop(inner: Arc<Inner>, job: Arc<Job>, idx: usize) {
    let slot = &job.slots[idx];
    let mut rx = slot.changed.subscribe();
    loop {
        let next: Option<Instant> = {
            let mut st = slot.lock();
            let now = OffsetDateTime::now_utc();
            if st.ended || now >= job.grants.deadline {
                return;
            }
            let at = if st.in_flight {
                None
            } else if let Some((_, failed_at)) = &st.failure {
                let exp = st.failures_in_row.saturating_sub(1).min(8);
                let pause = inner
                    .opts
                    .failure_memory
                    .saturating_mul(1 << exp)
                    .min(MAX_RETRY_INTERVAL);
                Some(*failed_at + pause)
            } else if let Some(c) = &st.current {
                inner.renew_at(&job, c).map(|at| {
                    let wait = at - now;
                    Instant::now() + Duration::try_from(wait).unwrap_or(Duration::ZERO)
                })
            } else {
                Some(Instant::now())
            };
            match at {
                Some(at) if at <= Instant::now() => {
                    inner.begin_fetch(&job, idx, &mut st);
                    None
                }
                other => other,
            }
        };
        // Wake at the renewal time or on any change (fetch done, job ended).
        let changed = async {
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => true,
                        r = rx.changed() => r.is_ok(),
                    }
                }
                None => rx.changed().await.is_ok(),
            }
        };
        if !changed.await {
            return;
        }
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_clamped_to_sts_and_the_job() {
        assert_eq!(clamp_duration(3600, 100_000, false), 3600);
        assert_eq!(clamp_duration(3600, 1200, false), 1200);
        assert_eq!(clamp_duration(3600, 300, false), MIN_DURATION_SECS);
        assert_eq!(clamp_duration(60, 100_000, false), MIN_DURATION_SECS);
        assert_eq!(clamp_duration(86_400, 100_000, false), MAX_DURATION_SECS);
        assert_eq!(
            clamp_duration(43_200, 100_000, true),
            CHAINED_MAX_DURATION_SECS
        );
        assert_eq!(clamp_duration(1800, -5, true), MIN_DURATION_SECS);
    }

    #[test]
    fn every_error_has_a_status_and_code() {
        let refused = BrokerError::StsRefused {
            action: "AssumeRole",
            role_arn: "arn:aws:iam::1:role/r".into(),
            code: "SignatureDoesNotMatch".into(),
            message: "bad".into(),
        };
        assert_eq!(
            (refused.http_status(), refused.code()),
            (403, "SignatureDoesNotMatch")
        );
        let odd = BrokerError::StsRefused {
            action: "AssumeRole",
            role_arn: "r".into(),
            code: "SomethingNew".into(),
            message: "m".into(),
        };
        assert_eq!(odd.code(), "StsRefused");
        assert!(odd.to_string().contains("SomethingNew"));
        let none = BrokerError::NoSuchAlias {
            job: "j".into(),
            alias: "x".into(),
            granted: "a".into(),
        };
        assert_eq!((none.http_status(), none.code()), (404, "NoSuchRole"));
        assert_eq!(BrokerError::UnknownJob("j".into()).http_status(), 403);
        let pending = BrokerError::Pending {
            job: "j".into(),
            role_arn: "r".into(),
        };
        assert_eq!(
            (pending.http_status(), pending.code()),
            (503, "CredentialsPending")
        );
    }

    #[test]
    fn issued_credentials_debug_hides_secrets() {
        let now = OffsetDateTime::now_utc();
        let c = IssuedCredentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI-secret".into()),
            session_token: Secret::new("FQoGZXIvYXdz-token".into()),
            expiration: now,
            role_arn: "arn:aws:iam::123456789012:role/r".into(),
            assumed_role_arn: None,
            account_id: None,
            session_name: "s".into(),
            last_updated: now,
        };
        let dbg = format!("{c:?}");
        assert!(dbg.contains("ASIAEXAMPLE"));
        assert!(
            !dbg.contains("wJalrXUtnFEMI") && !dbg.contains("FQoGZXIvYXdz"),
            "{dbg}"
        );
    }
}
