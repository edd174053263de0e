//! The broker against real STS stand-ins: moto (signatures and IAM enforced) and a small
//! scripted fake STS on 127.0.0.1 for failures moto cannot produce (5xx, throttling,
//! slowness, short sessions).

use airlock::audit::AuditLog;
use airlock::broker::own::OwnSource;
use airlock::broker::{Broker, BrokerOptions, IssuedCredentials, JobGrants, OwnCredentials};
use airlock::config::Config;
use airlock::http_client::HttpClient;
use airlock::identity::{IdentitySource, JobIdentity, Provider};
use airlock::metrics::Metrics;
use airlock::policy::{Grant, Method};
use airlock::secret::Secret;
use airlock_tests::moto::MotoServer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

const OIDC_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJyZXBvOmFjbWUvd2ViIn0.c2lnbmF0dXJlLXRlc3Q";

fn moto() -> MotoServer {
    match MotoServer::start() {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    }
}

fn config(endpoint: &str, max_attempts: u32, timeout_secs: u64) -> Config {
    let text = format!(
        "[sts]\nendpoint = \"{endpoint}\"\nallow_http = true\nregion = \"us-east-1\"\nmax_attempts = {max_attempts}\ntimeout = {timeout_secs}\n[credentials]\nsource = \"none\"\n"
    );
    Config::parse(Path::new("test.toml"), &text).unwrap()
}

fn identity(repo: &str, run: &str) -> JobIdentity {
    JobIdentity {
        source: IdentitySource::Oidc,
        provider: Provider::Github,
        issuer: "https://token.actions.githubusercontent.com".into(),
        subject: Some(format!("repo:{repo}:ref:refs/heads/main")),
        repository: Some(repo.into()),
        owner: repo.split('/').next().map(Into::into),
        git_ref: Some("refs/heads/main".into()),
        ref_type: Some("branch".into()),
        environment: Some("prod".into()),
        workflow: None,
        event: Some("push".into()),
        actor: Some("octocat".into()),
        run_id: Some(run.into()),
        attempt: Some("1".into()),
        job_id: None,
        runner_environment: Some("self-hosted".into()),
        claims: serde_json::Map::new(),
    }
}

fn grant(alias: &str, role_arn: &str, method: Method) -> Grant {
    Grant {
        alias: alias.into(),
        default: true,
        role_arn: role_arn.into(),
        method,
        duration_secs: 1800,
        session_policy: None,
        policy_arns: vec![],
        session_tags: vec![],
    }
}

fn job(id: &str, grants: Vec<Grant>) -> JobGrants {
    JobGrants {
        job_id: id.into(),
        identity: identity("acme/web", "4242"),
        oidc_token: None,
        rule: Some("web-prod".into()),
        grants,
        deadline: OffsetDateTime::now_utc() + time::Duration::hours(2),
    }
}

struct Setup {
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    audit: Arc<AuditLog>,
    audit_path: PathBuf,
    _dir: tempfile::TempDir,
}

async fn broker(cfg: &Config, own: OwnCredentials, opts: BrokerOptions) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    broker_with_audit(cfg, own, opts, dir, audit_path).await
}

async fn broker_with_audit(
    cfg: &Config,
    own: OwnCredentials,
    opts: BrokerOptions,
    dir: tempfile::TempDir,
    audit_path: PathBuf,
) -> Setup {
    let audit = Arc::new(AuditLog::open(&audit_path).unwrap());
    let metrics = Arc::new(Metrics::with_audit(audit.stats()));
    let opts = BrokerOptions {
        own_source: Some(OwnSource::Static(own)),
        ..opts
    };
    let broker = Broker::with_options(
        cfg,
        HttpClient::new().unwrap(),
        audit.clone(),
        metrics.clone(),
        opts,
    )
    .await
    .unwrap();
    Setup {
        broker,
        metrics,
        audit,
        audit_path,
        _dir: dir,
    }
}

/// The log's records, once its writer has written everything submitted so far.
async fn audit_records(
    audit: &AuditLog,
    path: &Path,
) -> Vec<serde_json::Map<String, serde_json::Value>> {
    audit.flush().await;
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Neither the issued secrets nor `extra` (own secret keys, OIDC tokens) are in the file.
/// Reads the log once its writer has written everything submitted so far; an empty log
/// would prove nothing.
async fn assert_no_secrets(
    audit: &AuditLog,
    path: &Path,
    issued: &[&IssuedCredentials],
    extra: &[&str],
) {
    audit.flush().await;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    assert!(!text.is_empty(), "{} holds no record", path.display());
    for c in issued {
        assert!(
            !text.contains(c.secret_access_key.expose().as_str()),
            "secret key in {}",
            path.display()
        );
        assert!(
            !text.contains(c.session_token.expose().as_str()),
            "session token in {}",
            path.display()
        );
    }
    for s in extra {
        assert!(!text.contains(s), "{s:?} in {}", path.display());
    }
}

fn sts_calls(m: &Metrics, action: &str, outcome: &str) -> u64 {
    let line = format!("airlock_sts_calls_total{{action=\"{action}\",outcome=\"{outcome}\"}} ");
    m.encode()
        .lines()
        .find_map(|l| l.strip_prefix(&line).and_then(|n| n.trim().parse().ok()))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Against moto

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn assume_role_is_signed_accepted_and_carries_policy_tags_source_identity() {
    let moto = moto();
    moto.start_recording().unwrap();
    let cfg = config(moto.endpoint(), 4, 5);
    let own = OwnCredentials::new(moto.agent_access_key(), moto.agent_secret_key(), None);
    let s = broker(&cfg, own, BrokerOptions::default()).await;
    let role = MotoServer::role_arn("web-prod-deploy");
    let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}]}"#;
    let mut g = grant("deploy", &role, Method::AssumeRole);
    g.session_policy = Some(policy.into());
    g.policy_arns = vec!["arn:aws:iam::aws:policy/ReadOnlyAccess".into()];
    g.session_tags = vec![
        ("repo".into(), "repository".into()),
        ("env".into(), "environment".into()),
    ];
    s.broker.start_job(job("job-1", vec![g]));

    let c = s.broker.credentials("job-1", None).await.unwrap();
    assert!(c.access_key_id.starts_with("ASIA"), "{}", c.access_key_id);
    assert_eq!(c.role_arn, role);
    assert_eq!(c.account_id.as_deref(), Some("123456789012"));
    let assumed = c.assumed_role_arn.as_deref().unwrap();
    assert!(
        assumed.starts_with(
            "arn:aws:sts::123456789012:assumed-role/web-prod-deploy/airlock.acme-web.4242.1."
        ),
        "{assumed}"
    );
    assert!(c.expiration > OffsetDateTime::now_utc() + time::Duration::minutes(25));
    assert_eq!(s.broker.aliases("job-1"), vec!["deploy".to_string()]);

    let reqs = moto.assume_role_requests().unwrap();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    let r = &reqs[0];
    assert_eq!(r.param("RoleArn"), Some(role.as_str()));
    assert_eq!(r.param("Policy"), Some(policy));
    assert_eq!(
        r.param("PolicyArns.member.1.arn"),
        Some("arn:aws:iam::aws:policy/ReadOnlyAccess")
    );
    assert_eq!(r.param("DurationSeconds"), Some("1800"));
    assert_eq!(r.param("SourceIdentity"), Some("acme-web@run-4242.1"));
    assert_eq!(r.param("RoleSessionName"), Some(c.session_name.as_str()));
    assert_eq!(
        r.tags(),
        vec![
            ("repo".into(), "acme/web".into()),
            ("env".into(), "prod".into())
        ]
    );
    let auth = r
        .headers
        .get("authorization")
        .map(String::as_str)
        .unwrap_or_default();
    assert!(
        auth.starts_with(&format!(
            "AWS4-HMAC-SHA256 Credential={}/",
            moto.agent_access_key()
        )),
        "{auth}"
    );

    let recs = audit_records(&s.audit, &s.audit_path).await;
    let issued = recs
        .iter()
        .find(|r| r["event"] == "credentials_issued")
        .unwrap();
    assert_eq!(issued["job"], "job-1");
    assert_eq!(issued["access_key_id"], c.access_key_id.as_str());
    assert_eq!(issued["source_identity"], "acme-web@run-4242.1");
    assert_eq!(issued["duration"], 1800);
    assert_eq!(issued["rule"], "web-prod");
    assert_eq!(issued["method"], "assume-role");
    assert_no_secrets(&s.audit, &s.audit_path, &[&c], &[moto.agent_secret_key()]).await;
    assert_eq!(sts_calls(&s.metrics, "AssumeRole", "ok"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_secret_key_reaches_the_job_as_signature_does_not_match_and_is_not_retried() {
    let moto = moto();
    moto.start_recording().unwrap();
    let cfg = config(moto.endpoint(), 4, 5);
    let own = OwnCredentials::new(
        moto.agent_access_key(),
        "not-the-secret-key-0123456789",
        None,
    );
    let s = broker(&cfg, own, BrokerOptions::default()).await;
    let role = MotoServer::role_arn("web-prod-deploy");
    s.broker.start_job(job(
        "job-1",
        vec![grant("deploy", &role, Method::AssumeRole)],
    ));

    let err = s.broker.credentials("job-1", None).await.unwrap_err();
    assert_eq!(
        (err.http_status(), err.code()),
        (403, "SignatureDoesNotMatch"),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("STS refused AssumeRole for role {role}")),
        "{msg}"
    );
    assert!(!msg.contains("not-the-secret-key"), "{msg}");
    assert_eq!(
        moto.assume_role_requests().unwrap().len(),
        1,
        "a 4xx must not be retried"
    );
    let recs = audit_records(&s.audit, &s.audit_path).await;
    let e = recs.iter().find(|r| r["event"] == "sts_error").unwrap();
    assert_eq!(e["code"], "SignatureDoesNotMatch");
    assert_eq!(e["role_arn"], role.as_str());
    assert_no_secrets(
        &s.audit,
        &s.audit_path,
        &[],
        &["not-the-secret-key-0123456789"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_web_identity_grant_passes_the_job_token_unsigned() {
    // moto cannot take unsigned calls while enforcing signatures; AWS does.
    let moto = match MotoServer::start_unauthenticated() {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    moto.start_recording().unwrap();
    let cfg = config(moto.endpoint(), 2, 5);
    // Own credentials that would fail: web identity must not need them.
    let own = OwnCredentials::new("AKIDNOTUSED", "not-used-secret-0123456789", None);
    let s = broker(&cfg, own, BrokerOptions::default()).await;
    let role = MotoServer::role_arn("ci-readonly");
    let mut j = job("job-w", vec![grant("ci", &role, Method::WebIdentity)]);
    j.oidc_token = Some(Secret::new(OIDC_TOKEN.to_string()));
    s.broker.start_job(j);
    let c = s.broker.credentials("job-w", Some("ci")).await.unwrap();
    assert_eq!(c.role_arn, role);
    let reqs = moto.recorded_action("AssumeRoleWithWebIdentity").unwrap();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].param("WebIdentityToken"), Some(OIDC_TOKEN));
    assert_eq!(
        reqs[0].param("RoleSessionName"),
        Some(c.session_name.as_str())
    );
    assert!(
        !reqs[0].headers.contains_key("authorization"),
        "{:?}",
        reqs[0].headers
    );
    assert!(moto.assume_role_requests().unwrap().is_empty());

    // The same grant for a job without a token: a clear 403, and STS is not asked.
    s.broker
        .start_job(job("job-nt", vec![grant("ci", &role, Method::WebIdentity)]));
    let err = s.broker.credentials("job-nt", None).await.unwrap_err();
    assert_eq!(
        (err.http_status(), err.code()),
        (403, "MissingWebIdentityToken"),
        "{err}"
    );
    assert_eq!(
        moto.recorded_action("AssumeRoleWithWebIdentity")
            .unwrap()
            .len(),
        1
    );
    assert_no_secrets(&s.audit, &s.audit_path, &[&c], &[OIDC_TOKEN]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_jobs_with_the_same_role_never_share_credentials() {
    let moto = moto();
    moto.start_recording().unwrap();
    let cfg = config(moto.endpoint(), 4, 5);
    let own = OwnCredentials::new(moto.agent_access_key(), moto.agent_secret_key(), None);
    let s = broker(&cfg, own, BrokerOptions::default()).await;
    let role = MotoServer::role_arn("web-staging-deploy");
    s.broker.start_job(job(
        "job-a",
        vec![grant("deploy", &role, Method::AssumeRole)],
    ));
    s.broker.start_job(job(
        "job-b",
        vec![grant("deploy", &role, Method::AssumeRole)],
    ));
    let a = s.broker.credentials("job-a", None).await.unwrap();
    let b = s.broker.credentials("job-b", None).await.unwrap();
    assert_ne!(a.access_key_id, b.access_key_id);
    assert_ne!(a.session_name, b.session_name);
    assert_ne!(a.secret_access_key.expose(), b.secret_access_key.expose());
    assert_eq!(moto.assume_role_requests().unwrap().len(), 2);
    // Ending one job leaves the other served, from its own cache.
    s.broker.end_job("job-a");
    assert_eq!(
        s.broker
            .credentials("job-b", None)
            .await
            .unwrap()
            .access_key_id,
        b.access_key_id
    );
    assert_no_secrets(
        &s.audit,
        &s.audit_path,
        &[&a, &b],
        &[moto.agent_secret_key()],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_callers_cause_one_assume_role() {
    let moto = moto();
    moto.start_recording().unwrap();
    let cfg = config(moto.endpoint(), 4, 5);
    let own = OwnCredentials::new(moto.agent_access_key(), moto.agent_secret_key(), None);
    let s = broker(&cfg, own, BrokerOptions::default()).await;
    let role = MotoServer::role_arn("web-prod-readonly");
    s.broker
        .start_job(job("job-1", vec![grant("ro", &role, Method::AssumeRole)]));
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let b = s.broker.clone();
            tokio::spawn(async move { b.credentials("job-1", None).await })
        })
        .collect();
    let mut keys = std::collections::HashSet::new();
    for c in calls {
        keys.insert(c.await.unwrap().unwrap().access_key_id.clone());
    }
    assert_eq!(keys.len(), 1);
    assert_eq!(moto.assume_role_requests().unwrap().len(), 1);
    assert_eq!(
        s.metrics.cache_hits.get() + s.metrics.cache_misses.get(),
        50
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn end_job_drops_the_cache_at_once() {
    let moto = moto();
    let cfg = config(moto.endpoint(), 4, 5);
    let own = OwnCredentials::new(moto.agent_access_key(), moto.agent_secret_key(), None);
    let s = broker(&cfg, own, BrokerOptions::default()).await;
    let role = MotoServer::role_arn("web-prod-deploy");
    s.broker.start_job(job(
        "job-1",
        vec![grant("deploy", &role, Method::AssumeRole)],
    ));
    s.broker.credentials("job-1", None).await.unwrap();
    s.broker.end_job("job-1");
    let t = Instant::now();
    let err = s.broker.credentials("job-1", None).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_millis(100));
    assert_eq!(
        (err.http_status(), err.code()),
        (403, "JobNotActive"),
        "{err}"
    );
    assert!(s.broker.aliases("job-1").is_empty());
    assert!(!s.broker.has_job("job-1"));
}

// ---------------------------------------------------------------------------------------
// Against a scripted fake STS

/// What the fake answers to the n-th request (0-based) with these form parameters.
type Script =
    Arc<dyn Fn(usize, &BTreeMap<String, String>) -> (u16, String, Duration) + Send + Sync>;

/// Each call the fake received: when, and its parameters.
type Calls = Arc<Mutex<Vec<(OffsetDateTime, BTreeMap<String, String>)>>>;

struct FakeSts {
    endpoint: String,
    calls: Calls,
}

impl FakeSts {
    fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

/// What a fake HTTP server answers to a request.
type Handler = Arc<dyn Fn(&http::request::Parts, &[u8]) -> (u16, String, Duration) + Send + Sync>;

/// A scripted HTTP/1 server on 127.0.0.1; returns its base URL.
async fn serve(handler: Handler) -> String {
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let (status, text, delay) = handler(&parts, &body);
                        tokio::time::sleep(delay).await;
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
                                .body(Full::new(bytes::Bytes::from(text)))
                                .unwrap(),
                        )
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// A fake STS: form parameters of each call, plus its `@authorization` and
/// `@x-amz-security-token` headers.
async fn fake_sts(script: Script) -> FakeSts {
    let calls: Calls = Arc::default();
    let recorded = calls.clone();
    let endpoint = serve(Arc::new(move |parts, body| {
        let mut params: BTreeMap<String, String> = form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        for h in ["authorization", "x-amz-security-token"] {
            if let Some(v) = parts.headers.get(h).and_then(|v| v.to_str().ok()) {
                params.insert(format!("@{h}"), v.to_string());
            }
        }
        let n = {
            let mut c = recorded.lock().unwrap();
            c.push((OffsetDateTime::now_utc(), params.clone()));
            c.len() - 1
        };
        script(n, &params)
    }))
    .await;
    FakeSts { endpoint, calls }
}

fn ok_xml(n: usize, valid_for: time::Duration) -> String {
    let exp = (OffsetDateTime::now_utc() + valid_for)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    format!(
        "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult>\
         <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/r/s</Arn><AssumedRoleId>AROA:s</AssumedRoleId></AssumedRoleUser>\
         <Credentials><AccessKeyId>ASIAFAKE{n:08}</AccessKeyId><SecretAccessKey>fake-secret-{n}-abcdefghijklmnop</SecretAccessKey>\
         <SessionToken>fake-token-{n}-qrstuvwxyz0123456789</SessionToken><Expiration>{exp}</Expiration></Credentials>\
         </AssumeRoleResult></AssumeRoleResponse>"
    )
}

fn err_xml(code: &str, message: &str) -> String {
    format!("<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>1</RequestId></ErrorResponse>")
}

fn fake_own() -> OwnCredentials {
    OwnCredentials::new("AKIDFAKEAGENT", "fake-agent-secret-0123456789", None)
}

const ROLE: &str = "arn:aws:iam::123456789012:role/web-prod-deploy";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_500_then_200_is_retried_and_succeeds() {
    let sts = fake_sts(Arc::new(|n, _| match n {
        0 => (500, err_xml("InternalFailure", "oops"), Duration::ZERO),
        n => (200, ok_xml(n, time::Duration::hours(1)), Duration::ZERO),
    }))
    .await;
    let s = broker(
        &config(&sts.endpoint, 4, 2),
        fake_own(),
        BrokerOptions::default(),
    )
    .await;
    s.broker
        .start_job(job("j", vec![grant("d", ROLE, Method::AssumeRole)]));
    let c = s.broker.credentials("j", None).await.unwrap();
    assert_eq!(c.access_key_id, "ASIAFAKE00000001");
    assert_eq!(sts.count(), 2);
    assert_eq!(sts_calls(&s.metrics, "AssumeRole", "retryable"), 1);
    assert_eq!(sts_calls(&s.metrics, "AssumeRole", "ok"), 1);
    assert_no_secrets(&s.audit, &s.audit_path, &[&c], &["fake-agent-secret"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throttling_is_retried() {
    let sts = fake_sts(Arc::new(|n, _| match n {
        0 | 1 => (400, err_xml("Throttling", "Rate exceeded"), Duration::ZERO),
        n => (200, ok_xml(n, time::Duration::hours(1)), Duration::ZERO),
    }))
    .await;
    let s = broker(
        &config(&sts.endpoint, 4, 2),
        fake_own(),
        BrokerOptions::default(),
    )
    .await;
    s.broker
        .start_job(job("j", vec![grant("d", ROLE, Method::AssumeRole)]));
    let c = s.broker.credentials("j", None).await.unwrap();
    assert_eq!(c.access_key_id, "ASIAFAKE00000002");
    assert_eq!(sts.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throttling_past_max_attempts_is_a_503() {
    let sts = fake_sts(Arc::new(|_, _| {
        (400, err_xml("Throttling", "Rate exceeded"), Duration::ZERO)
    }))
    .await;
    let s = broker(
        &config(&sts.endpoint, 2, 2),
        fake_own(),
        BrokerOptions::default(),
    )
    .await;
    s.broker
        .start_job(job("j", vec![grant("d", ROLE, Method::AssumeRole)]));
    let err = s.broker.credentials("j", None).await.unwrap_err();
    assert_eq!(
        (err.http_status(), err.code()),
        (503, "ServiceUnavailable"),
        "{err}"
    );
    assert_eq!(sts.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_denied_is_not_retried_and_is_remembered_briefly() {
    let sts = fake_sts(Arc::new(|_, _| {
        (
            403,
            err_xml(
                "AccessDenied",
                "User airlock-agent is not authorized to perform: sts:AssumeRole",
            ),
            Duration::ZERO,
        )
    }))
    .await;
    let s = broker(
        &config(&sts.endpoint, 4, 2),
        fake_own(),
        BrokerOptions::default(),
    )
    .await;
    s.broker
        .start_job(job("j", vec![grant("d", ROLE, Method::AssumeRole)]));
    let err = s.broker.credentials("j", None).await.unwrap_err();
    assert_eq!(
        (err.http_status(), err.code()),
        (403, "AccessDenied"),
        "{err}"
    );
    assert!(
        err.to_string().contains("not authorized to perform"),
        "{err}"
    );
    assert_eq!(sts.count(), 1);
    // A failing STS is not hammered by every request.
    for _ in 0..10 {
        assert_eq!(
            s.broker.credentials("j", None).await.unwrap_err().code(),
            "AccessDenied"
        );
    }
    assert_eq!(sts.count(), 1);
    let recs = audit_records(&s.audit, &s.audit_path).await;
    assert_eq!(recs.iter().filter(|r| r["event"] == "sts_error").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_sts_gives_a_timely_503_and_other_jobs_are_still_served() {
    let sts = fake_sts(Arc::new(|n, p| {
        let slow = p.get("RoleArn").is_some_and(|r| r.ends_with("/slow"));
        let delay = if slow {
            Duration::from_secs(4)
        } else {
            Duration::ZERO
        };
        (200, ok_xml(n, time::Duration::hours(1)), delay)
    }))
    .await;
    let s = broker(
        &config(&sts.endpoint, 1, 10),
        fake_own(),
        BrokerOptions::default(),
    )
    .await;
    s.broker.start_job(job(
        "slow-job",
        vec![grant(
            "d",
            "arn:aws:iam::123456789012:role/slow",
            Method::AssumeRole,
        )],
    ));
    s.broker.start_job(job(
        "fast-job",
        vec![grant(
            "d",
            "arn:aws:iam::123456789012:role/fast",
            Method::AssumeRole,
        )],
    ));
    let t = Instant::now();
    let err = s.broker.credentials("slow-job", None).await.unwrap_err();
    let waited = t.elapsed();
    assert_eq!(
        (err.http_status(), err.code()),
        (503, "CredentialsPending"),
        "{err}"
    );
    assert!(
        waited >= Duration::from_millis(1200) && waited < Duration::from_millis(2500),
        "{waited:?}"
    );
    let t = Instant::now();
    s.broker.credentials("fast-job", None).await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(500));
    // The slow fetch went on and lands in the cache: one STS call for it in all.
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.broker.credentials("slow-job", None).await.unwrap();
    let slow_calls = sts
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, p)| p["RoleArn"].ends_with("/slow"))
        .count();
    assert_eq!(slow_calls, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credentials_are_renewed_before_the_threshold() {
    let sts = fake_sts(Arc::new(|n, _| {
        (200, ok_xml(n, time::Duration::seconds(6)), Duration::ZERO)
    }))
    .await;
    let opts = BrokerOptions {
        renew_floor: Duration::from_secs(2),
        serve_floor: Duration::from_millis(500),
        ..BrokerOptions::default()
    };
    let s = broker(&config(&sts.endpoint, 1, 2), fake_own(), opts).await;
    s.broker
        .start_job(job("j", vec![grant("d", ROLE, Method::AssumeRole)]));
    let first = s.broker.credentials("j", None).await.unwrap();
    assert_eq!(sts.count(), 1);
    // 6 s sessions: renewed when 2 s are left, i.e. about 4 s after issue.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(sts.count(), 1, "renewed too early");
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(sts.count(), 2, "not renewed ahead of expiry");
    let renewed_at = sts.calls.lock().unwrap()[1].0;
    assert!(
        first.expiration - renewed_at >= time::Duration::seconds(1),
        "renewed at {renewed_at}, first expired {}",
        first.expiration
    );
    let second = s.broker.credentials("j", None).await.unwrap();
    assert_ne!(second.access_key_id, first.access_key_id);
    assert_no_secrets(
        &s.audit,
        &s.audit_path,
        &[&first, &second],
        &["fake-agent-secret"],
    )
    .await;
    s.broker.end_job("j");
    let n = sts.count();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(sts.count(), n, "renewal went on after end_job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_renewal_past_the_job_deadline() {
    let sts = fake_sts(Arc::new(|n, _| {
        (200, ok_xml(n, time::Duration::seconds(4)), Duration::ZERO)
    }))
    .await;
    let opts = BrokerOptions {
        renew_floor: Duration::from_secs(2),
        serve_floor: Duration::from_millis(500),
        ..BrokerOptions::default()
    };
    let s = broker(&config(&sts.endpoint, 1, 2), fake_own(), opts).await;
    let mut j = job("j", vec![grant("d", ROLE, Method::AssumeRole)]);
    j.deadline = OffsetDateTime::now_utc() + time::Duration::seconds(3);
    s.broker.start_job(j);
    s.broker.credentials("j", None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(sts.count(), 1);
    // Requested durations are clamped to the job's remaining life (then to STS's minimum).
    assert_eq!(sts.calls.lock().unwrap()[0].1["DurationSeconds"], "900");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_served_when_the_audit_cannot_be_written() {
    let sts = fake_sts(Arc::new(|n, _| {
        (200, ok_xml(n, time::Duration::hours(1)), Duration::ZERO)
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let s = broker_with_audit(
        &config(&sts.endpoint, 1, 2),
        fake_own(),
        BrokerOptions::default(),
        dir,
        PathBuf::from("/dev/full"),
    )
    .await;
    s.broker
        .start_job(job("j", vec![grant("d", ROLE, Method::AssumeRole)]));
    let err = s.broker.credentials("j", None).await.unwrap_err();
    assert_eq!(
        (err.http_status(), err.code()),
        (503, "AuditUnavailable"),
        "{err}"
    );
    assert!(s.metrics.audit_failures.get() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aliases_and_unknown_roles() {
    let sts = fake_sts(Arc::new(|n, _| {
        (200, ok_xml(n, time::Duration::hours(1)), Duration::ZERO)
    }))
    .await;
    let s = broker(
        &config(&sts.endpoint, 1, 2),
        fake_own(),
        BrokerOptions::default(),
    )
    .await;
    let mut ro = grant(
        "ro",
        "arn:aws:iam::123456789012:role/ro",
        Method::AssumeRole,
    );
    ro.default = false;
    s.broker.start_job(job(
        "j",
        vec![grant("deploy", ROLE, Method::AssumeRole), ro],
    ));
    assert_eq!(
        s.broker.aliases("j"),
        vec!["deploy".to_string(), "ro".to_string()]
    );
    let d = s.broker.credentials("j", None).await.unwrap();
    let r = s.broker.credentials("j", Some("ro")).await.unwrap();
    assert_eq!(d.role_arn, ROLE);
    assert_eq!(r.role_arn, "arn:aws:iam::123456789012:role/ro");
    let err = s.broker.credentials("j", Some("admin")).await.unwrap_err();
    assert_eq!(
        (err.http_status(), err.code()),
        (404, "NoSuchRole"),
        "{err}"
    );
    s.broker.start_job(job("none", vec![]));
    assert!(s.broker.aliases("none").is_empty());
    assert_eq!(
        s.broker
            .credentials("none", None)
            .await
            .unwrap_err()
            .http_status(),
        404
    );
    assert_eq!(
        s.broker
            .credentials("nobody", None)
            .await
            .unwrap_err()
            .http_status(),
        403
    );
}

const IMDS_TOKEN: &str = "imds-session-token-for-the-agent";

/// A fake IMDSv2 serving the instance profile `runner-role` with session credentials.
async fn fake_imds() -> String {
    serve(Arc::new(|parts, _| {
        let path = parts.uri.path();
        if parts.method == http::Method::PUT && path == "/latest/api/token" {
            if parts
                .headers
                .get("x-aws-ec2-metadata-token-ttl-seconds")
                .is_none()
            {
                return (400, "missing ttl".into(), Duration::ZERO);
            }
            return (200, IMDS_TOKEN.into(), Duration::ZERO);
        }
        let token = parts
            .headers
            .get("x-aws-ec2-metadata-token")
            .and_then(|v| v.to_str().ok());
        if token != Some(IMDS_TOKEN) {
            return (401, String::new(), Duration::ZERO);
        }
        match path {
            "/latest/meta-data/iam/security-credentials/" => {
                (200, "runner-role\n".into(), Duration::ZERO)
            }
            "/latest/meta-data/iam/security-credentials/runner-role" => {
                let exp = (OffsetDateTime::now_utc() + time::Duration::hours(6))
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap();
                let body = serde_json::json!({
                    "Code": "Success",
                    "LastUpdated": "2026-01-01T00:00:00Z",
                    "Type": "AWS-HMAC",
                    "AccessKeyId": "ASIAIMDSAGENT",
                    "SecretAccessKey": "imds-agent-secret-0123456789",
                    "Token": "imds-agent-session-token-0123456789",
                    "Expiration": exp,
                });
                (200, body.to_string(), Duration::ZERO)
            }
            _ => (404, String::new(), Duration::ZERO),
        }
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn imds_own_credentials_sign_assume_role_and_chaining_caps_the_duration() {
    let sts = fake_sts(Arc::new(|n, _| {
        (200, ok_xml(n, time::Duration::hours(1)), Duration::ZERO)
    }))
    .await;
    let imds = fake_imds().await;
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let audit = Arc::new(AuditLog::open(&audit_path).unwrap());
    let opts = BrokerOptions {
        own_source: Some(OwnSource::Imds { endpoint: imds }),
        ..BrokerOptions::default()
    };
    let cfg = config(&sts.endpoint, 1, 2);
    let broker = Broker::with_options(
        &cfg,
        HttpClient::new().unwrap(),
        audit.clone(),
        Arc::new(Metrics::new()),
        opts,
    )
    .await
    .unwrap();
    let mut g = grant("d", ROLE, Method::AssumeRole);
    g.duration_secs = 7200;
    broker.start_job(job("j", vec![g]));
    let c = broker.credentials("j", None).await.unwrap();
    let calls = sts.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    let p = &calls[0].1;
    assert!(
        p["@authorization"].contains("Credential=ASIAIMDSAGENT/"),
        "{}",
        p["@authorization"]
    );
    assert_eq!(
        p["@x-amz-security-token"],
        "imds-agent-session-token-0123456789"
    );
    assert_eq!(
        p["DurationSeconds"], "3600",
        "role chaining allows one hour at most"
    );
    assert_no_secrets(
        &audit,
        &audit_path,
        &[&c],
        &["imds-agent-secret", "imds-agent-session-token", IMDS_TOKEN],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn web_identity_own_credentials_come_from_the_token_file() {
    let sts = fake_sts(Arc::new(|n, _| {
        (200, ok_xml(n, time::Duration::hours(1)), Duration::ZERO)
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "agent-oidc-token-one\n").unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let audit = Arc::new(AuditLog::open(&audit_path).unwrap());
    let opts = BrokerOptions {
        own_source: Some(OwnSource::WebIdentity {
            token_file: token_file.clone(),
            role_arn: "arn:aws:iam::123456789012:role/airlock-agent".into(),
        }),
        ..BrokerOptions::default()
    };
    let broker = Broker::with_options(
        &config(&sts.endpoint, 1, 2),
        HttpClient::new().unwrap(),
        audit.clone(),
        Arc::new(Metrics::new()),
        opts,
    )
    .await
    .unwrap();
    broker.start_job(job("j", vec![grant("d", ROLE, Method::AssumeRole)]));
    let c = broker.credentials("j", None).await.unwrap();
    let calls = sts.calls.lock().unwrap().clone();
    let own = calls
        .iter()
        .find(|(_, p)| p["Action"] == "AssumeRoleWithWebIdentity")
        .unwrap();
    assert_eq!(own.1["WebIdentityToken"], "agent-oidc-token-one");
    assert_eq!(
        own.1["RoleArn"],
        "arn:aws:iam::123456789012:role/airlock-agent"
    );
    assert!(!own.1.contains_key("@authorization"));
    let assume = calls
        .iter()
        .find(|(_, p)| p["Action"] == "AssumeRole")
        .unwrap();
    // The fake issued ASIAFAKE00000000 to the agent, which then signs with it.
    assert!(
        assume.1["@authorization"].contains("Credential=ASIAFAKE00000000/"),
        "{:?}",
        assume.1
    );
    assert_ne!(c.access_key_id, "ASIAFAKE00000000");
    assert_no_secrets(
        &audit,
        &audit_path,
        &[&c],
        &["agent-oidc-token-one", "fake-secret-0-"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_own_credentials_assume_role_is_a_clear_503() {
    let sts = fake_sts(Arc::new(|n, _| {
        (200, ok_xml(n, time::Duration::hours(1)), Duration::ZERO)
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let audit = Arc::new(AuditLog::open(&dir.path().join("a.jsonl")).unwrap());
    let opts = BrokerOptions {
        own_source: Some(OwnSource::None),
        ..BrokerOptions::default()
    };
    let broker = Broker::with_options(
        &config(&sts.endpoint, 1, 2),
        HttpClient::new().unwrap(),
        audit.clone(),
        Arc::new(Metrics::new()),
        opts,
    )
    .await
    .unwrap();
    broker.start_job(job("j", vec![grant("d", ROLE, Method::AssumeRole)]));
    let err = broker.credentials("j", None).await.unwrap_err();
    assert_eq!(
        (err.http_status(), err.code()),
        (503, "AgentCredentialsUnavailable"),
        "{err}"
    );
    assert!(err.to_string().contains("source = \"none\""), "{err}");
    assert_eq!(sts.count(), 0);
}
