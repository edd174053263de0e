//! The agent's core: the job lifecycle (start, bind, end, expire, recover) tying identity,
//! policy, broker, endpoint and audit together. Serves the control API.
//!
//! Every state change is audited before it takes effect for the job: a job whose start
//! cannot be audited does not start, and credentials are only minted (by the broker) after
//! their record is written.

use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::audit::AuditLog;
use crate::broker::{Broker, JobGrants};
use crate::config::Config;
use crate::control::{
    ApiError, BindRequest, EndResponse, Handler, JobSummary, Peer, StartRequest, StartResponse,
    TaintedSlot,
};
use crate::endpoint::{self, CredentialSource, JobEndpoint, Refusal, Served, CONTAINER_PATH};
use crate::identity::{JobIdentity, Verifier};
use crate::jobs::{self, JobRecord, Store};
use crate::metrics::Metrics;
use crate::policy::{Decision, PolicySet};
use crate::sandbox::job::{Sandboxes, JOB_TOKEN_FILE};
use crate::secret::Secret;

mod drain;
mod exec;
mod owner;
mod run;

pub use drain::{DRAINING_CODE, DRAINING_MESSAGE};

/// How often the agent looks for jobs past their deadline.
const REAP_INTERVAL: Duration = Duration::from_secs(5);
/// How long a stopping agent waits for the background reclaim of wiped jobs' files.
const RECLAIM_WAIT: Duration = Duration::from_secs(20);
/// The shortest lifetime a start request may ask for.
const MIN_JOB_LIFETIME_SECS: u64 = 10;

/// A sandboxed command prepared for a job: its run name and its spec.
type PreparedRun = (crate::control::SandboxStart, PathBuf);

/// The broker as the endpoint sees it, plus why refused jobs get nothing.
#[derive(Debug)]
pub struct BrokerSource {
    broker: Arc<Broker>,
    /// job → why it has no credentials (refused by policy, or not bound yet).
    refused: Mutex<HashMap<String, (String, String)>>,
    /// Who binds a job that binds through its own endpoint (`POST /v1/bind`).
    binder: std::sync::OnceLock<std::sync::Weak<Daemon>>,
}

impl CredentialSource for BrokerSource {
    async fn credentials(&self, job: &str, alias: Option<&str>) -> Result<Served, Refusal> {
        let refused = lock(&self.refused).get(job).cloned();
        if let Some((code, why)) = refused {
            return Err(Refusal {
                status: 403,
                code,
                message: why,
            });
        }
        match self.broker.credentials(job, alias).await {
            Ok(c) => Ok(Served {
                access_key_id: c.access_key_id.clone(),
                secret_access_key: c.secret_access_key.clone(),
                session_token: c.session_token.clone(),
                expiration: c.expiration,
                last_updated: c.last_updated,
                role_arn: c.role_arn.clone(),
                account_id: c.account_id.clone(),
            }),
            Err(e) => Err(Refusal {
                status: e.http_status(),
                code: e.code().to_string(),
                message: e.to_string(),
            }),
        }
    }

    fn aliases(&self, job: &str) -> Vec<String> {
        self.broker.aliases(job)
    }

    async fn bind(&self, job: &str, req: BindRequest) -> Result<Value, Refusal> {
        let Some(d) = self.binder.get().and_then(std::sync::Weak::upgrade) else {
            return Err(Refusal {
                status: 503,
                code: "Unavailable".into(),
                message: "the agent is stopping".into(),
            });
        };
        crate::github::bind_from_endpoint(&d, job, req).await
    }
}

#[derive(Debug)]
struct LiveJob {
    record: JobRecord,
    endpoint: Arc<JobEndpoint>,
    tasks: Vec<JoinHandle<()>>,
    /// The host-side token file of an unsandboxed job (a sandboxed job's lives in its tmpfs).
    token_file: Option<PathBuf>,
    /// A sandboxed job's: what `airlock job exec` needs to run commands in its sandbox.
    exec: Option<exec::ExecHandle>,
}

#[derive(Debug)]
pub struct Daemon {
    cfg: Config,
    policies: RwLock<Arc<PolicySet>>,
    verifier: Verifier,
    broker: Arc<Broker>,
    source: Arc<BrokerSource>,
    shared: Arc<endpoint::Shared<BrokerSource>>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    store: Store,
    token_dir: PathBuf,
    sandboxes: Option<Arc<Sandboxes>>,
    jobs: Mutex<HashMap<String, LiveJob>>,
    /// The host's processes: job owners and control callers are looked up here.
    procs: crate::procs::Procs,
    /// This daemon, for the tasks it spawns (a job's owner watch).
    me: std::sync::OnceLock<std::sync::Weak<Daemon>>,
    /// Serialises binds while their record becomes durable (see `bind_job`).
    binding: tokio::sync::Mutex<()>,
    /// `airlock drain`: whether new jobs are refused while the running ones finish.
    drain: drain::Drain,
}

/// A poisoned lock only means another task panicked mid-update of plain data; keep serving.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Audit without waiting: used where the action has already happened. A record that cannot
/// be written is logged and counted by the audit writer.
fn audit_best_effort(
    audit: &AuditLog,
    _metrics: &Metrics,
    event: &str,
    job: Option<&str>,
    f: serde_json::Map<String, Value>,
) {
    audit.submit(event, job, f);
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(500, "InternalError", e.to_string())
}

impl Daemon {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        policies: PolicySet,
        verifier: Verifier,
        broker: Arc<Broker>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        sandboxes: Option<Sandboxes>,
    ) -> Result<Arc<Daemon>, jobs::JobsError> {
        let store = Store::open(&cfg.agent.state_dir)?;
        let token_dir = cfg
            .agent
            .control_socket
            .parent()
            .unwrap_or(Path::new("/run/airlock"))
            .join("tokens");
        std::fs::create_dir_all(&token_dir)
            .and_then(|()| {
                std::fs::set_permissions(&token_dir, std::fs::Permissions::from_mode(0o711))
            })
            .map_err(|e| jobs::JobsError::CreateDir(token_dir.clone(), e))?;
        let source = Arc::new(BrokerSource {
            broker: broker.clone(),
            refused: Mutex::new(HashMap::new()),
            binder: std::sync::OnceLock::new(),
        });
        let shared = Arc::new(endpoint::Shared {
            source: source.clone(),
            metrics: metrics.clone(),
            audit: audit.clone(),
            conns: endpoint::ConnBudget::for_this_process(),
        });
        let sandboxes = sandboxes.map(|sb| {
            sb.count_reclaims_in(metrics.sandbox_reclaims_pending.clone());
            Arc::new(sb)
        });
        let daemon = Arc::new(Daemon {
            cfg,
            policies: RwLock::new(Arc::new(policies)),
            verifier,
            broker,
            source,
            shared,
            audit,
            metrics,
            store,
            token_dir,
            sandboxes,
            jobs: Mutex::new(HashMap::new()),
            procs: crate::procs::Procs::default(),
            me: std::sync::OnceLock::new(),
            binding: tokio::sync::Mutex::new(()),
            drain: drain::Drain::default(),
        });
        let _ = daemon.source.binder.set(Arc::downgrade(&daemon));
        let _ = daemon.me.set(Arc::downgrade(&daemon));
        Ok(daemon)
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn policy_rules(&self) -> usize {
        self.policies().len()
    }

    fn policies(&self) -> Arc<PolicySet> {
        self.policies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn insert_live(
        &self,
        record: JobRecord,
        endpoint: Arc<JobEndpoint>,
        tasks: Vec<JoinHandle<()>>,
        token_file: Option<PathBuf>,
    ) {
        lock(&self.jobs).insert(
            record.id.clone(),
            LiveJob {
                record,
                endpoint,
                tasks,
                token_file,
                exec: None,
            },
        );
        self.metrics.active_jobs.set(self.job_count() as i64);
    }

    fn sandboxes(&self) -> Result<&Sandboxes, ApiError> {
        self.sandboxes.as_deref().ok_or_else(|| {
            ApiError::new(
                409,
                "SandboxDisabled",
                "[sandbox] is not enabled on this agent",
            )
        })
    }

    /// Called when the agent stops. Sandboxed jobs are ended and wiped: nothing of them may
    /// run on without the agent that watches them. Unsandboxed jobs keep their records, so a
    /// restart serves them again. With no job left, the agent's cgroup parent goes too.
    pub async fn shutdown(&self) {
        let Some(sb) = &self.sandboxes else {
            return;
        };
        let sandboxed: Vec<String> = lock(&self.jobs)
            .values()
            .filter(|j| j.record.sandbox_slot.is_some())
            .map(|j| j.record.id.clone())
            .collect();
        for id in sandboxed {
            let _ = self.end_job(&id, "the agent is stopping").await;
        }
        if !sb.finish_reclaims(RECLAIM_WAIT).await {
            tracing::warn!("wiped jobs' files are still being freed; the kernel finishes that as the agent exits");
        }
        if self.job_count() == 0 {
            sb.remove_parent();
        }
    }

    pub fn job_count(&self) -> usize {
        lock(&self.jobs).len()
    }

    /// Load the policy directory again, against the issuers the agent started with; a bad
    /// policy keeps the old one.
    pub fn reload_policies(&self) -> Result<usize, String> {
        let issuers = crate::policy::TrustedIssuer::from_config(&self.cfg.issuers);
        match crate::policy::load_dir_with(&self.cfg.policy.dir, &issuers) {
            Ok(p) => {
                let n = p.len();
                for w in p.warnings() {
                    tracing::warn!("policy: {w}");
                }
                *self.policies.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(p);
                tracing::info!(rules = n, "policies reloaded");
                audit_best_effort(
                    &self.audit,
                    &self.metrics,
                    "policy_reloaded",
                    None,
                    crate::fields! {"rules" => n},
                );
                Ok(n)
            }
            Err(e) => {
                tracing::error!("policy reload failed, keeping the previous policies: {e}");
                audit_best_effort(
                    &self.audit,
                    &self.metrics,
                    "policy_reload_failed",
                    None,
                    crate::fields! {"error" => e.to_string()},
                );
                Err(e.to_string())
            }
        }
    }

    async fn resolve_identity(
        &self,
        token: Option<&Secret<String>>,
        claims: Option<serde_json::Map<String, Value>>,
    ) -> Result<JobIdentity, ApiError> {
        match (token, claims) {
            (Some(t), None) => self.verifier.verify(t.expose().trim()).await.map_err(|e| {
                ApiError::new(
                    403,
                    "InvalidIdentityToken",
                    format!("identity token refused: {e}"),
                )
            }),
            (None, Some(c)) => crate::identity::from_attested(c).map_err(|e| {
                ApiError::new(
                    400,
                    "InvalidClaims",
                    format!("attested claims refused: {e}"),
                )
            }),
            (Some(_), Some(_)) => Err(ApiError::new(
                400,
                "BadRequest",
                "give an OIDC token or attested claims, not both",
            )),
            (None, None) => Err(ApiError::new(
                400,
                "BadRequest",
                "an OIDC token or attested claims are required (or bind_later)",
            )),
        }
    }

    /// The policies' decision for a job (which refuses a Buildkite job decided by a rule
    /// that does not pin its organisation).
    fn decide(&self, id: &JobIdentity, now: OffsetDateTime) -> crate::policy::Decision {
        self.policies().decide(id, now)
    }

    fn refuse_reason(&self, job: &str, code: &str, why: String) {
        lock(&self.source.refused).insert(job.to_string(), (code.to_string(), why));
    }

    /// Apply a decision to a job: refusal reason for the endpoint, or grants for the broker.
    fn apply(
        &self,
        rec: &mut JobRecord,
        identity: &JobIdentity,
        token: Option<Secret<String>>,
        d: &Decision,
    ) {
        rec.rule = d.rule.clone();
        rec.aliases = d.grants.iter().map(|g| g.alias.clone()).collect();
        rec.refused = d.refused.clone();
        rec.flags = d.flags.clone();
        lock(&self.source.refused).remove(&rec.id);
        if let Some(why) = &d.refused {
            self.refuse_reason(
                &rec.id,
                "AccessDenied",
                format!("no credentials for this job: {why}"),
            );
        } else {
            self.broker.start_job(JobGrants {
                job_id: rec.id.clone(),
                identity: identity.clone(),
                oidc_token: token,
                rule: d.rule.clone(),
                grants: d.grants.clone(),
                deadline: rec.deadline,
            });
        }
    }

    fn decision_fields(
        rec: &JobRecord,
        identity: Option<&JobIdentity>,
    ) -> serde_json::Map<String, Value> {
        let mut f = crate::fields! {
            "runner" => rec.runner,
            "rule" => rec.rule,
            "grants" => rec.aliases,
            "refused" => rec.refused,
            "flags" => rec.flags,
            "endpoint" => rec.endpoint.to_string(),
            "deadline" => endpoint::aws_time(rec.deadline),
        };
        if let Some(id) = identity {
            f.insert("identity".into(), id.summary().into());
            f.insert("source".into(), id.field("source").into());
            f.insert("issuer".into(), id.issuer.clone().into());
            f.insert("repository".into(), id.repository.clone().into());
            f.insert("ref".into(), id.git_ref.clone().into());
            f.insert("environment".into(), id.environment.clone().into());
            f.insert("workflow".into(), id.workflow.clone().into());
            f.insert("ci_event".into(), id.event.clone().into());
            f.insert("run_id".into(), id.run_id.clone().into());
            f.insert("attempt".into(), id.attempt.clone().into());
        }
        f
    }

    fn write_token_file(&self, job: &str, token: &str, uid: u32) -> std::io::Result<PathBuf> {
        use std::io::Write;
        let path = self.token_dir.join(job);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(token.as_bytes())?;
        f.sync_all()?;
        if uid != 0 {
            nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(uid)), None)?;
        }
        Ok(path)
    }

    fn job_env(&self, rec: &JobRecord, token: &str, token_file: &Path) -> BTreeMap<String, String> {
        let (base, imds_base) = if rec.sandbox_slot.is_some() {
            // Inside the job's own namespace: the addresses the SDKs know, on port 80.
            let ecs = crate::sandbox::netns::CONTAINER_ENDPOINT.ip();
            let imds = crate::sandbox::netns::IMDS_ENDPOINT.ip();
            (format!("http://{ecs}"), format!("http://{imds}"))
        } else {
            let b = format!("http://{}", rec.endpoint);
            (b.clone(), b)
        };
        let region = &self.cfg.endpoint.region;
        let mut env = BTreeMap::new();
        env.insert(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI".into(),
            format!("{base}{CONTAINER_PATH}"),
        );
        env.insert(
            "AWS_CONTAINER_AUTHORIZATION_TOKEN".into(),
            token.to_string(),
        );
        env.insert(
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE".into(),
            token_file.display().to_string(),
        );
        if self.cfg.endpoint.imds {
            env.insert(
                "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
                format!("{imds_base}/"),
            );
            env.insert(
                "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE".into(),
                if rec.endpoint.is_ipv6() {
                    "IPv6"
                } else {
                    "IPv4"
                }
                .into(),
            );
        }
        env.insert("AWS_REGION".into(), region.clone());
        env.insert("AWS_DEFAULT_REGION".into(), region.clone());
        // Host credential files must not win over the job's credentials in the SDK chain.
        env.insert("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into());
        env.insert("AWS_CONFIG_FILE".into(), "/dev/null".into());
        env.insert("AIRLOCK_JOB_ID".into(), rec.id.clone());
        env
    }

    fn spawn_endpoint(
        &self,
        listeners: Vec<TcpListener>,
        rec: &JobRecord,
        token_sha256: [u8; 32],
    ) -> (Arc<JobEndpoint>, Vec<JoinHandle<()>>) {
        let mut ep = JobEndpoint::new(
            rec.id.clone(),
            token_sha256,
            rec.endpoint,
            self.cfg.endpoint.region.clone(),
            self.cfg.endpoint.imds,
        );
        if rec.sandbox_slot.is_some() {
            // Inside the job's namespace the SDKs use the IMDS address too, on port 80.
            let imds = crate::sandbox::netns::IMDS_ENDPOINT;
            ep.allow_host(imds.to_string());
            ep.allow_host(imds.ip().to_string());
        }
        let ep = Arc::new(ep);
        let tasks = listeners
            .into_iter()
            .map(|l| tokio::spawn(endpoint::serve(l, ep.clone(), self.shared.clone())))
            .collect();
        (ep, tasks)
    }

    fn response(
        &self,
        rec: &JobRecord,
        token: Secret<String>,
        token_file: PathBuf,
    ) -> StartResponse {
        let env = self.job_env(rec, token.expose(), &token_file);
        StartResponse {
            job_id: rec.id.clone(),
            endpoint: format!("http://{}", rec.endpoint),
            token,
            token_file,
            env: Secret::new(env),
            identity: rec.identity.as_ref().map(JobIdentity::summary),
            repository: rec.identity.as_ref().and_then(|i| i.repository.clone()),
            ci_job_id: rec.identity.as_ref().and_then(|i| i.job_id.clone()),
            rule: rec.rule.clone(),
            grants: rec.aliases.clone(),
            refused: rec.refused.clone(),
            flags: rec.flags.clone(),
            sandbox: None,
            sandboxed: rec.sandbox_slot.is_some(),
        }
    }

    pub async fn start_job(
        &self,
        req: StartRequest,
        peer: Peer,
    ) -> Result<StartResponse, ApiError> {
        if let Some(r) = &req.runner {
            if r.len() > 128 || r.chars().any(char::is_control) {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    "runner name: at most 128 printable characters",
                ));
            }
        }
        // A draining agent takes no new job; a start admitted here counts as running for
        // the drain until it has become a job or failed.
        let _admitted = self.admit_start(req.runner.as_deref())?;
        // A log that cannot be written refuses the start before anything is built for it.
        if let Some(why) = self.audit.failing() {
            let why = format!("{why}; no job starts until it can be written again");
            // Counted in the log's `audit_recovered` record (as not written).
            audit_best_effort(
                &self.audit,
                &self.metrics,
                "job_refused",
                None,
                crate::fields! {"runner" => req.runner, "reason" => why},
            );
            return Err(ApiError::new(503, "AuditUnavailable", why));
        }
        let owner = self.owner_of_new_job(req.owner_pid, &peer)?;
        let extra_hide = owner::checked_hide(&req.hide)?;
        if (req.endpoint_bind || req.runner_network.is_some()) && !req.bind_later {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "endpoint_bind and runner_network are for jobs started with bind_later",
            ));
        }
        let identity = if req.bind_later {
            if req.oidc_token.is_some() || req.claims.is_some() {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    "bind_later: give the identity with bind, not with start",
                ));
            }
            None
        } else {
            match self
                .resolve_identity(req.oidc_token.as_ref(), req.claims)
                .await
            {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::warn!(runner = req.runner.as_deref(), "job refused: {}", e.message);
                    audit_best_effort(
                        &self.audit,
                        &self.metrics,
                        "job_refused",
                        None,
                        crate::fields! {"runner" => req.runner, "reason" => e.message},
                    );
                    // The refusal answers once its record is written, as a job's end does.
                    self.audit.flush().await;
                    return Err(e);
                }
            }
        };
        let now = OffsetDateTime::now_utc();
        let mut lifetime = self.cfg.jobs.max_lifetime;
        if let Some(s) = req.max_lifetime_secs {
            lifetime = lifetime.min(Duration::from_secs(s.max(MIN_JOB_LIFETIME_SECS)));
        }
        let job_id = jobs::new_job_id();
        let decision = identity.as_ref().map(|id| self.decide(id, now));
        // A sandboxed job's endpoint lives inside its own network namespace; an
        // unsandboxed job's on a loopback port of its own.
        let (listeners, addr, prepared) = match &self.sandboxes {
            Some(sb) => {
                let settings = match &req.runner_network {
                    Some(n) => crate::github::runner_sandbox_settings(n, &self.policies())?,
                    None => self.sandbox_settings(decision.as_ref()),
                };
                let mut settings = settings;
                settings.hide = extra_hide.clone();
                let p = sb
                    .prepare(&job_id, &settings, &self.audit)
                    .await
                    .map_err(|e| {
                        tracing::error!(job = %job_id, "cannot build the job's sandbox: {e}");
                        // A job whose sandbox (or egress firewall) could not be built is
                        // refused, never run with less: the record says why.
                        audit_best_effort(
                            &self.audit,
                            &self.metrics,
                            "job_refused",
                            Some(&job_id),
                            crate::fields! {
                                "runner" => req.runner.clone(),
                                "reason" => format!("cannot build the job's sandbox: {e}"),
                            },
                        );
                        ApiError::new(
                            503,
                            "SandboxUnavailable",
                            format!("cannot build the job's sandbox: {e}"),
                        )
                    })?;
                let mut ls = Vec::new();
                for l in &p.listeners {
                    let l = l
                        .try_clone()
                        .and_then(TcpListener::from_std)
                        .map_err(internal)?;
                    ls.push(l);
                }
                (ls, crate::sandbox::netns::CONTAINER_ENDPOINT, Some(p))
            }
            None => {
                let l = TcpListener::bind(SocketAddr::new(self.cfg.endpoint.bind, 0))
                    .await
                    .map_err(|e| {
                        internal(format!("cannot open the job's endpoint listener: {e}"))
                    })?;
                let addr = l.local_addr().map_err(internal)?;
                (vec![l], addr, None)
            }
        };
        let token = Secret::new(endpoint::random_token());
        let token_sha256: [u8; 32] = sha2::Digest::finalize(
            <sha2::Sha256 as sha2::Digest>::new_with_prefix(token.expose()),
        )
        .into();
        let mut rec = JobRecord {
            id: job_id,
            runner: req.runner,
            created: now,
            deadline: now + lifetime,
            identity: identity.clone(),
            token_sha256: hex::encode(token_sha256),
            endpoint: addr,
            token_uid: peer.uid,
            rule: None,
            aliases: vec![],
            refused: None,
            flags: vec![],
            sandbox_slot: prepared.as_ref().map(|p| p.user.slot),
            owner,
        };
        if let Some(d) = &decision {
            rec.rule = d.rule.clone();
            rec.aliases = d.grants.iter().map(|g| g.alias.clone()).collect();
            rec.refused = d.refused.clone();
            rec.flags = d.flags.clone();
        }
        let started = self
            .begin(
                &rec,
                identity.as_ref(),
                prepared.as_ref(),
                &token,
                &req.command,
            )
            .await;
        let (token_file, sandbox) = match started {
            Ok(v) => v,
            Err(e) => {
                if let Some(sb) = &self.sandboxes {
                    drop(prepared);
                    let report = sb.wipe(&rec.id, rec.sandbox_slot).await;
                    tracing::warn!(
                        job = %rec.id,
                        processes_killed = report.processes_killed,
                        leftovers = %report.leftovers.join("; "),
                        millis = u64::try_from(report.millis).unwrap_or(u64::MAX),
                        "job start failed; its sandbox was wiped"
                    );
                }
                let _ = self.store.remove(&rec.id);
                return Err(e);
            }
        };
        match (&identity, &decision) {
            (Some(id), Some(d)) => self.apply(&mut rec, id, req.oidc_token, d),
            _ => self.refuse_reason(
                &rec.id,
                "IdentityNotBound",
                "this job has not bound its identity yet".into(),
            ),
        }
        let (ep, tasks) = self.spawn_endpoint(listeners, &rec, token_sha256);
        if req.endpoint_bind {
            ep.open_bind();
        }
        // Optional fields only when present, as plain strings (`Option<T: Value>` records
        // nothing for `None`): never `Some("…")` or `None` in a JSON log.
        tracing::info!(
            job = %rec.id,
            identity = rec.identity.as_ref().map(JobIdentity::summary).as_deref(),
            rule = rec.rule.as_deref(),
            refused = rec.refused.as_deref(),
            sandboxed = rec.sandbox_slot.is_some(),
            "job started"
        );
        let shown_token_file = token_file.clone().unwrap_or_else(|| JOB_TOKEN_FILE.into());
        let exec = prepared
            .as_ref()
            .map(|p| exec::ExecHandle::new(p.exec_context(), &token, sandbox.clone()));
        let mut resp = self.response(&rec, token, shown_token_file);
        resp.sandbox = sandbox.map(|(start, _)| start);
        let id = rec.id.clone();
        let owner = rec.owner;
        self.insert_live(rec, ep, tasks, token_file);
        if let Some(x) = exec {
            self.attach_exec(&id, x);
        }
        if let Some(o) = owner {
            self.watch_owner(&id, o);
        }
        Ok(resp)
    }

    /// How the sandbox of a job with this decision is built: the deciding rule's
    /// `[rule.sandbox]` over the agent's `[sandbox]` defaults. A refused job, or one not
    /// yet bound, gets the defaults (endpoint only): nothing a policy has not granted.
    fn sandbox_settings(
        &self,
        decision: Option<&crate::policy::Decision>,
    ) -> crate::sandbox::job::JobSettings {
        let policies = self.policies();
        let rule = decision
            .filter(|d| d.refused.is_none())
            .and_then(|d| d.rule.as_deref())
            .and_then(|name| policies.rule(name).map(|r| (name, r)));
        let sandbox = rule.and_then(|(_, r)| r.sandbox.clone());
        let egress = rule.and_then(|(name, _)| policies.egress_for(name));
        crate::sandbox::job::JobSettings::from_rule(sandbox.as_ref(), egress)
    }

    /// Persist and audit a new job, then write its token where the job will read it: a
    /// host file for an unsandboxed job, the shim's spec for a sandboxed one.
    async fn begin(
        &self,
        rec: &JobRecord,
        identity: Option<&JobIdentity>,
        prepared: Option<&crate::sandbox::job::Prepared>,
        token: &Secret<String>,
        command: &Option<crate::control::JobCommand>,
    ) -> Result<(Option<PathBuf>, Option<PreparedRun>), ApiError> {
        self.store.save(rec).map_err(internal)?;
        let mut fields = Self::decision_fields(rec, identity);
        if let Some(p) = prepared {
            fields.insert(
                "sandbox".into(),
                serde_json::json!({
                    "uid": p.user.uid,
                    "slot": p.user.slot,
                    "netns": p.net.ns_path,
                    "cgroup": p.cgroup.path(),
                    "network": p.net.mode.to_string(),
                    "job_addr": p.net.job_addr().map(|a| a.to_string()),
                    "job_addr6": p.net.job_addr6().map(|a| a.to_string()),
                    "pids_max": p.limits.pids_max,
                    "memory_max": p.limits.memory_max_bytes,
                    "tmpfs_size": p.tmpfs_size,
                    "cpu_max_us": p.limits.cpu_max.map(|c| format!("{} {}", c.quota_us, c.period_us)),
                    "cpu_weight": p.limits.cpu_weight,
                }),
            );
        }
        // The record of the start comes before anything is served for the job.
        if let Err(e) = self
            .audit
            .append("job_started", Some(&rec.id), fields)
            .await
        {
            return Err(ApiError::new(
                503,
                "AuditUnavailable",
                format!("the audit log cannot be written, so no job starts: {e}"),
            ));
        }
        let (Some(sb), Some(p)) = (&self.sandboxes, prepared) else {
            let f = self
                .write_token_file(&rec.id, token.expose(), rec.token_uid)
                .map_err(|e| internal(format!("cannot write the job's token file: {e}")))?;
            return Ok((Some(f), None));
        };
        let Some(cmd) = command else {
            return Ok((None, None));
        };
        if cmd.argv.is_empty() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the job's command is empty",
            ));
        }
        let airlock_env = self.job_env(rec, token.expose(), Path::new(JOB_TOKEN_FILE));
        let env = sb.job_env(&cmd.env, &airlock_env);
        let spec = sb
            .write_spec(&rec.id, p, cmd.argv.clone(), env, token.expose())
            .map_err(|e| ApiError::new(503, "SandboxUnavailable", e.to_string()))?;
        Ok((
            None,
            Some((
                crate::control::SandboxStart {
                    run: run::START_RUN.to_string(),
                },
                spec,
            )),
        ))
    }

    pub async fn bind_job(
        &self,
        job: &str,
        req: BindRequest,
        peer: Peer,
    ) -> Result<StartResponse, ApiError> {
        let bound = {
            let jobs = lock(&self.jobs);
            let live = jobs
                .get(job)
                .ok_or_else(|| ApiError::new(404, "NoSuchJob", format!("no job {job}")))?;
            live.record.identity.is_some()
        };
        if bound {
            audit_best_effort(
                &self.audit,
                &self.metrics,
                "bind_refused",
                Some(job),
                crate::fields! {"reason" => "the job's identity is already bound", "uid" => peer.uid},
            );
            return Err(ApiError::new(
                409,
                "AlreadyBound",
                "this job's identity is already bound; a job binds once",
            ));
        }
        let identity = match self
            .resolve_identity(req.oidc_token.as_ref(), req.claims)
            .await
        {
            Ok(i) => i,
            Err(e) => {
                audit_best_effort(
                    &self.audit,
                    &self.metrics,
                    "bind_refused",
                    Some(job),
                    crate::fields! {"reason" => e.message},
                );
                return Err(e);
            }
        };
        let now = OffsetDateTime::now_utc();
        let decision = self.decide(&identity, now);
        // One bind at a time from here to the record's update: the jobs lock cannot be held
        // while the audit record becomes durable.
        let _binding = self.binding.lock().await;
        let mut rec = {
            let jobs = lock(&self.jobs);
            let live = jobs
                .get(job)
                .ok_or_else(|| ApiError::new(404, "NoSuchJob", format!("no job {job}")))?;
            if live.record.identity.is_some() {
                return Err(ApiError::new(
                    409,
                    "AlreadyBound",
                    "this job's identity is already bound; a job binds once",
                ));
            }
            live.record.clone()
        };
        rec.identity = Some(identity.clone());
        rec.rule = decision.rule.clone();
        rec.aliases = decision.grants.iter().map(|g| g.alias.clone()).collect();
        rec.refused = decision.refused.clone();
        rec.flags = decision.flags.clone();
        self.store.save(&rec).map_err(internal)?;
        self.audit
            .append(
                "job_bound",
                Some(job),
                Self::decision_fields(&rec, Some(&identity)),
            )
            .await
            .map_err(|e| {
                ApiError::new(
                    503,
                    "AuditUnavailable",
                    format!("the audit log cannot be written: {e}"),
                )
            })?;
        let mut jobs = lock(&self.jobs);
        let live = jobs.get_mut(job).ok_or_else(|| {
            ApiError::new(
                404,
                "NoSuchJob",
                format!("job {job} ended while it was bound"),
            )
        })?;
        self.apply(&mut rec, &identity, req.oidc_token, &decision);
        live.record = rec.clone();
        // The token is not kept in memory; the caller already has it from start.
        let shown = live
            .token_file
            .clone()
            .unwrap_or_else(|| JOB_TOKEN_FILE.into());
        let mut resp = self.response(&rec, Secret::new(String::new()), shown);
        let mut env = resp.env.expose().clone();
        env.remove("AWS_CONTAINER_AUTHORIZATION_TOKEN");
        resp.env = Secret::new(env);
        Ok(resp)
    }

    /// End a job: nothing of it is served from this moment on.
    pub async fn end_job(&self, job: &str, reason: &str) -> Result<EndResponse, ApiError> {
        let live = lock(&self.jobs).remove(job).ok_or_else(|| {
            ApiError::new(404, "NoSuchJob", format!("no job {job} (already ended?)"))
        })?;
        live.endpoint.end();
        for t in &live.tasks {
            t.abort();
        }
        self.broker.end_job(job);
        lock(&self.source.refused).remove(job);
        let removed_token = live
            .token_file
            .as_ref()
            .map(|f| std::fs::remove_file(f).is_ok());
        if let (Some(sb), Some(slot)) = (&self.sandboxes, live.record.sandbox_slot) {
            self.wipe(sb, job, Some(slot)).await;
        }
        let store = self.store.remove(job);
        self.audit.job_done(job);
        audit_best_effort(
            &self.audit,
            &self.metrics,
            "job_ended",
            Some(job),
            crate::fields! {
                "reason" => reason,
                "repository" => live.record.identity.as_ref().and_then(|i| i.repository.clone()),
                "token_file_removed" => removed_token,
                "record_removed" => store.is_ok(),
            },
        );
        self.metrics.active_jobs.set(self.job_count() as i64);
        tracing::info!(job, reason, "job ended");
        // The caller is told the job ended once its records (the wipe's report, its last
        // `audit_dropped` summary, `job_ended`) are written: a script that reads or verifies
        // the log next finds them.
        self.audit.flush().await;
        store.map_err(internal)?;
        Ok(EndResponse {
            job_id: job.to_string(),
            ended: true,
        })
    }

    /// Wipe a job's sandbox and audit what was removed; a slot with leftovers stays taken.
    async fn wipe(&self, sb: &Sandboxes, job: &str, slot: Option<u32>) {
        let report = sb.wipe(job, slot).await;
        let fields = match serde_json::to_value(&report) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        audit_best_effort(&self.audit, &self.metrics, "job_wiped", Some(job), fields);
        if report.leftovers.is_empty() {
            tracing::info!(
                job,
                ms = u64::try_from(report.millis).unwrap_or(u64::MAX),
                killed = report.processes_killed,
                "job wiped"
            );
        } else {
            tracing::error!(job, leftovers = %report.leftovers.join("; "), "the job's wipe left something behind; its slot is tainted");
            audit_best_effort(
                &self.audit,
                &self.metrics,
                "slot_tainted",
                Some(job),
                crate::fields! {"slot" => slot, "leftovers" => report.leftovers},
            );
        }
    }

    /// The jobs `peer` may see: every job for root, the jobs it owns otherwise.
    pub fn list_jobs(&self, peer: &Peer) -> Vec<JobSummary> {
        let jobs = lock(&self.jobs);
        let mut v: Vec<JobSummary> = jobs
            .values()
            .filter(|j| self.may_act_on(&j.record, peer))
            .map(|j| JobSummary {
                job_id: j.record.id.clone(),
                runner: j.record.runner.clone(),
                identity: j.record.identity.as_ref().map(JobIdentity::summary),
                rule: j.record.rule.clone(),
                grants: j.record.aliases.clone(),
                refused: j.record.refused.clone(),
                endpoint: format!("http://{}", j.record.endpoint),
                created: endpoint::aws_time(j.record.created),
                deadline: endpoint::aws_time(j.record.deadline),
                owner_pid: j.record.owner.map(|o| o.pid),
            })
            .collect();
        v.sort_by(|a, b| a.created.cmp(&b.created).then(a.job_id.cmp(&b.job_id)));
        v
    }

    /// End every job past its deadline.
    pub async fn reap_expired(&self) {
        let now = OffsetDateTime::now_utc();
        let expired: Vec<String> = lock(&self.jobs)
            .values()
            .filter(|j| j.record.deadline <= now)
            .map(|j| j.record.id.clone())
            .collect();
        for id in expired {
            let _ = self
                .end_job(&id, "the job reached its maximum lifetime")
                .await;
        }
    }

    pub fn spawn_reaper(self: &Arc<Self>) -> JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REAP_INTERVAL).await;
                match me.upgrade() {
                    Some(d) => d.reap_expired().await,
                    None => return,
                }
            }
        })
    }

    /// After a restart: serve every recorded job again on its old address, or end it.
    pub async fn recover(&self) -> Result<usize, jobs::JobsError> {
        let (records, damaged) = self.store.load_all()?;
        for (path, why) in damaged {
            tracing::error!(file = %path.display(), "damaged job record left in place: {why}");
            audit_best_effort(
                &self.audit,
                &self.metrics,
                "job_record_damaged",
                None,
                crate::fields! {"file" => path.display().to_string(), "error" => why},
            );
        }
        let now = OffsetDateTime::now_utc();
        let mut n = 0;
        for mut rec in records {
            let token_file = self.token_dir.join(&rec.id);
            let fail = |me: &Self, rec: &JobRecord, why: String| {
                tracing::warn!(job = %rec.id, "not recovered: {why}");
                let _ = std::fs::remove_file(&token_file);
                let _ = me.store.remove(&rec.id);
                audit_best_effort(
                    &me.audit,
                    &me.metrics,
                    "job_ended",
                    Some(&rec.id),
                    crate::fields! {"reason" => why},
                );
            };
            if rec.sandbox_slot.is_some() {
                // A sandboxed job's processes, namespace and cgroup are reaped, never
                // resumed: nothing of it may outlive the agent that watched it.
                match &self.sandboxes {
                    Some(sb) => {
                        sb.reserve_slot(rec.sandbox_slot.unwrap_or_default());
                        self.wipe(sb, &rec.id, rec.sandbox_slot).await;
                    }
                    None => {
                        tracing::error!(job = %rec.id, "a sandboxed job is recorded but [sandbox] is disabled: enable it once so its sandbox is reaped")
                    }
                }
                fail(
                    self,
                    &rec,
                    "the agent restarted: sandboxed jobs are reaped".into(),
                );
                continue;
            }
            if rec.deadline <= now {
                fail(
                    self,
                    &rec,
                    "the job's lifetime ended while the agent was down".into(),
                );
                continue;
            }
            let Ok(sha) = hex::decode(&rec.token_sha256)
                .map_err(|_| ())
                .and_then(|v| <[u8; 32]>::try_from(v).map_err(|_| ()))
            else {
                fail(self, &rec, "the job record's token hash is damaged".into());
                continue;
            };
            let listener = match TcpListener::bind(rec.endpoint).await {
                Ok(l) => l,
                Err(e) => {
                    fail(
                        self,
                        &rec,
                        format!(
                            "cannot listen on the job's endpoint {} again: {e}",
                            rec.endpoint
                        ),
                    );
                    continue;
                }
            };
            if let Some(id) = rec.identity.clone() {
                let d = self.decide(&id, now);
                // The job's OIDC token is not kept across restarts: web-identity grants
                // cannot be renewed and report that clearly.
                self.apply(&mut rec, &id, None, &d);
            } else {
                self.refuse_reason(
                    &rec.id,
                    "IdentityNotBound",
                    "this job has not bound its identity yet".into(),
                );
            }
            let _ = self.store.save(&rec);
            let (ep, tasks) = self.spawn_endpoint(vec![listener], &rec, sha);
            audit_best_effort(
                &self.audit,
                &self.metrics,
                "job_recovered",
                Some(&rec.id),
                Self::decision_fields(&rec, rec.identity.as_ref()),
            );
            self.insert_live(rec, ep, tasks, Some(token_file));
            n += 1;
        }
        if let Some(sb) = &self.sandboxes {
            // Kernel objects of jobs no record knows (a crash between making them and
            // writing the record) are reaped too, before anything is served.
            let live: std::collections::HashSet<String> =
                lock(&self.jobs).keys().cloned().collect();
            let reaped = sb.reap_orphans(&live).await;
            if !reaped.is_empty() {
                tracing::warn!(reaped = %reaped.join("; "), "reaped orphaned sandbox objects");
                audit_best_effort(
                    &self.audit,
                    &self.metrics,
                    "orphans_reaped",
                    None,
                    crate::fields! {"objects" => reaped},
                );
            }
        }
        Ok(n)
    }
}

/// The control API's view of the daemon.
#[derive(Debug)]
pub struct Control(pub Arc<Daemon>);

impl Handler for Control {
    type Run = run::RunPlan;

    async fn drain(
        &self,
        req: crate::control::DrainRequest,
        peer: Peer,
    ) -> Result<crate::control::DrainStatus, ApiError> {
        self.0.begin_drain(req, &peer).await
    }

    fn drain_status(&self, peer: Peer) -> Result<crate::control::DrainStatus, ApiError> {
        self.0.get_drain(&peer)
    }

    fn cancel_drain(&self, peer: Peer) -> Result<crate::control::DrainStatus, ApiError> {
        self.0.cancel_drain(&peer)
    }

    fn prepare_run(&self, job: &str, run: &str, peer: Peer) -> Result<run::RunPlan, ApiError> {
        self.0.authorize(job, &peer)?;
        self.0.prepare_run(job, run, &peer)
    }

    async fn run(&self, plan: run::RunPlan, stream: tokio::net::UnixStream) {
        self.0.serve_run(plan, stream).await
    }

    async fn start(&self, req: StartRequest, peer: Peer) -> Result<StartResponse, ApiError> {
        self.0.start_job(req, peer).await
    }

    async fn bind(
        &self,
        job: &str,
        req: BindRequest,
        peer: Peer,
    ) -> Result<StartResponse, ApiError> {
        self.0.authorize(job, &peer)?;
        self.0.bind_job(job, req, peer).await
    }

    async fn end(&self, job: &str, peer: Peer) -> Result<EndResponse, ApiError> {
        self.0.authorize(job, &peer)?;
        self.0
            .end_job(job, &format!("ended by request (uid {})", peer.uid))
            .await
    }

    fn list(&self, peer: Peer) -> Vec<JobSummary> {
        self.0.list_jobs(&peer)
    }

    fn issuers(&self) -> crate::audience::IssuersAnswer {
        crate::audience::IssuersAnswer::from_config(&self.0.cfg)
    }

    async fn exec(
        &self,
        job: &str,
        cmd: crate::control::JobCommand,
        peer: Peer,
    ) -> Result<crate::control::ExecResponse, ApiError> {
        self.0.authorize(job, &peer)?;
        self.0.exec_job(job, cmd, peer).await
    }

    fn tainted(&self) -> Result<Vec<TaintedSlot>, ApiError> {
        let sb = self.0.sandboxes()?;
        Ok(sb
            .tainted()
            .into_iter()
            .map(|(slot, why)| TaintedSlot { slot, why })
            .collect())
    }

    fn clear_slot(&self, slot: u32, peer: Peer) -> Result<TaintedSlot, ApiError> {
        let sb = self.0.sandboxes()?;
        let why = sb
            .clear_taint(slot)
            .map_err(|_| ApiError::new(404, "NotTainted", format!("slot {slot} is not tainted")))?;
        audit_best_effort(
            &self.0.audit,
            &self.0.metrics,
            "slot_cleared",
            None,
            crate::fields! {"slot" => slot, "uid" => peer.uid, "was" => why},
        );
        Ok(TaintedSlot { slot, why })
    }
}
