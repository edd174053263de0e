//! The agent's own AWS credentials, used only to sign `AssumeRole`: from the agent's
//! environment, the host's instance profile (IMDSv2) or a web-identity token file.
//!
//! Owns fetching, caching and refreshing them ahead of expiry. They never reach a job, a
//! log, an audit record or an error message; only [`OwnCredentials::access_key_id`] may be
//! named.

use super::sts::{AssumeRoleRequest, StsClient, StsError};
use crate::config::{Config, CredentialsKind};
use crate::http_client::HttpClient;
use crate::secret::Secret;
use bytes::Bytes;
use http_body_util::Full;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Refresh own credentials this long before they expire (EC2 rotates instance-profile
/// credentials well before that, so a fresh fetch gets a fresh set).
pub const REFRESH_AHEAD: Duration = Duration::from_secs(10 * 60);
const IMDS_TIMEOUT: Duration = Duration::from_secs(2);
const IMDS_TOKEN_TTL_SECS: &str = "21600";
/// Own web-identity sessions: an hour is the most role chaining allows downstream anyway.
const OWN_SESSION_SECS: u32 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum OwnError {
    #[error("the agent has no own AWS credentials ([credentials] source = \"none\"): grants with method assume-role cannot be served; use web-identity grants or configure a credentials source")]
    NoneConfigured,
    #[error("the agent's environment lacks {0}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for airlockd, or change [credentials] source")]
    EnvMissing(&'static str),
    #[error("instance metadata at {0}: {1}; check that the host has an instance profile and that IMDSv2 is reachable (hop limit)")]
    Imds(String, String),
    #[error("cannot read the web identity token file {0}: {1}")]
    TokenFile(PathBuf, std::io::Error),
    #[error("web identity token file {0} is empty")]
    EmptyTokenFile(PathBuf),
    #[error("the agent's own web-identity session failed: {0}")]
    Sts(#[from] StsError),
}

/// A set of AWS credentials. `Debug` shows the access key id only.
#[derive(Clone)]
pub struct OwnCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret<String>,
    pub session_token: Option<Secret<String>>,
    pub expiration: Option<OffsetDateTime>,
}

impl std::fmt::Debug for OwnCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field("session_token", &self.session_token)
            .field("expiration", &self.expiration)
            .finish()
    }
}

impl OwnCredentials {
    pub fn new(access_key_id: &str, secret_access_key: &str, session_token: Option<&str>) -> Self {
        OwnCredentials {
            access_key_id: access_key_id.to_string(),
            secret_access_key: Secret::new(secret_access_key.to_string()),
            session_token: session_token.map(|t| Secret::new(t.to_string())),
            expiration: None,
        }
    }

    /// Session credentials make every `AssumeRole` a role chain, which STS caps at 1 h.
    pub fn is_session(&self) -> bool {
        self.session_token.is_some()
    }

    /// The values to blank out of anything STS echoes back.
    pub(crate) fn secrets(&self) -> Vec<&str> {
        let mut v = vec![self.secret_access_key.expose().as_str()];
        if let Some(t) = &self.session_token {
            v.push(t.expose().as_str());
        }
        v
    }

    fn fresh(&self, now: OffsetDateTime) -> bool {
        self.expiration.is_none_or(|e| e - now > REFRESH_AHEAD)
    }
}

/// Where own credentials come from.
#[derive(Debug, Clone)]
pub enum OwnSource {
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` of the agent process.
    Env,
    /// IMDSv2 at this base URL (`http://169.254.169.254`).
    Imds {
        endpoint: String,
    },
    /// `AssumeRoleWithWebIdentity` with the token file, re-read on every refresh.
    WebIdentity {
        token_file: PathBuf,
        role_arn: String,
    },
    /// Fixed credentials (embedding and tests).
    Static(OwnCredentials),
    None,
}

impl OwnSource {
    pub fn from_config(cfg: &Config) -> OwnSource {
        let c = &cfg.credentials;
        match c.source {
            CredentialsKind::Env => OwnSource::Env,
            CredentialsKind::Imds => OwnSource::Imds {
                endpoint: c.imds_endpoint.trim_end_matches('/').to_string(),
            },
            CredentialsKind::WebIdentity => OwnSource::WebIdentity {
                token_file: c.web_identity_token_file.clone().unwrap_or_default(),
                role_arn: c.web_identity_role_arn.clone().unwrap_or_default(),
            },
            CredentialsKind::None => OwnSource::None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            OwnSource::Env => "env",
            OwnSource::Imds { .. } => "imds",
            OwnSource::WebIdentity { .. } => "web-identity",
            OwnSource::Static(_) => "static",
            OwnSource::None => "none",
        }
    }
}

/// Own credentials, cached and refreshed ahead of expiry. One refresh at a time: callers
/// queue on the mutex, then find the fresh set.
#[derive(Debug)]
pub struct OwnCredentialsProvider {
    source: OwnSource,
    http: HttpClient,
    sts: StsClient,
    cache: tokio::sync::Mutex<Option<OwnCredentials>>,
}

impl OwnCredentialsProvider {
    pub fn new(source: OwnSource, http: HttpClient, sts: StsClient) -> Self {
        OwnCredentialsProvider {
            source,
            http,
            sts,
            cache: tokio::sync::Mutex::new(None),
        }
    }

    pub fn source(&self) -> &OwnSource {
        &self.source
    }

    pub async fn get(&self) -> Result<OwnCredentials, OwnError> {
        let mut cache = self.cache.lock().await;
        let now = OffsetDateTime::now_utc();
        if let Some(c) = cache.as_ref().filter(|c| c.fresh(now)) {
            return Ok(c.clone());
        }
        let creds = match &self.source {
            OwnSource::None => return Err(OwnError::NoneConfigured),
            // Read each time: cheap, and nothing stale is kept.
            OwnSource::Env => return from_env(|k| std::env::var(k).ok()),
            OwnSource::Static(c) => return Ok(c.clone()),
            OwnSource::Imds { endpoint } => imds(&self.http, endpoint).await?,
            OwnSource::WebIdentity {
                token_file,
                role_arn,
            } => web_identity(&self.sts, token_file, role_arn).await?,
        };
        *cache = Some(creds.clone());
        Ok(creds)
    }
}

fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<OwnCredentials, OwnError> {
    let get = |k: &'static str| {
        var(k)
            .filter(|v| !v.is_empty())
            .ok_or(OwnError::EnvMissing(k))
    };
    let id = get("AWS_ACCESS_KEY_ID")?;
    let secret = get("AWS_SECRET_ACCESS_KEY")?;
    let token = var("AWS_SESSION_TOKEN").filter(|v| !v.is_empty());
    Ok(OwnCredentials::new(&id, &secret, token.as_deref()))
}

#[derive(Deserialize)]
struct ImdsCredentials {
    #[serde(rename = "Code", default)]
    code: Option<String>,
    #[serde(rename = "AccessKeyId")]
    access_key_id: String,
    #[serde(rename = "SecretAccessKey")]
    secret_access_key: String,
    #[serde(rename = "Token")]
    token: String,
    #[serde(rename = "Expiration")]
    expiration: String,
}

async fn imds(http: &HttpClient, base: &str) -> Result<OwnCredentials, OwnError> {
    let err = |m: String| OwnError::Imds(base.to_string(), m);
    let token_req = http::Request::builder()
        .method("PUT")
        .uri(format!("{base}/latest/api/token"))
        .header("x-aws-ec2-metadata-token-ttl-seconds", IMDS_TOKEN_TTL_SECS)
        .body(Full::new(Bytes::new()))
        .map_err(|e| err(e.to_string()))?;
    let resp = http
        .send(token_req, IMDS_TIMEOUT)
        .await
        .map_err(|e| err(e.to_string()))?;
    if !resp.status.is_success() {
        return Err(err(format!("token request answered HTTP {}", resp.status)));
    }
    let token = String::from_utf8(resp.body.to_vec())
        .map_err(|_| err("the session token is not text".into()))?;
    let token = Secret::new(token.trim().to_string());
    let get = |path: String| {
        let token = token.expose().clone();
        async move {
            let req = http::Request::builder()
                .method("GET")
                .uri(format!("{base}{path}"))
                .header("x-aws-ec2-metadata-token", token)
                .body(Full::new(Bytes::new()))
                .map_err(|e| err(e.to_string()))?;
            let resp = http
                .send(req, IMDS_TIMEOUT)
                .await
                .map_err(|e| err(e.to_string()))?;
            if !resp.status.is_success() {
                return Err(err(format!("GET {path} answered HTTP {}", resp.status)));
            }
            Ok(resp.body)
        }
    };
    const ROLES: &str = "/latest/meta-data/iam/security-credentials/";
    let roles = get(ROLES.to_string()).await?;
    let role = String::from_utf8_lossy(&roles)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
        .ok_or_else(|| err("no instance profile role is attached".into()))?;
    if role.contains(['/', '?', '#']) || role.contains("..") {
        return Err(err(format!("odd role name {role:?}")));
    }
    let body = get(format!("{ROLES}{role}")).await?;
    // serde_json's messages do not quote input, so a parse error cannot leak a key.
    let raw: ImdsCredentials = serde_json::from_slice(&body).map_err(|e| {
        err(format!(
            "credentials of role {role} are not the expected JSON: {e}"
        ))
    })?;
    if raw.code.as_deref().is_some_and(|c| c != "Success") {
        return Err(err(format!(
            "credentials of role {role} report Code {:?}",
            raw.code.unwrap_or_default()
        )));
    }
    let expiration = OffsetDateTime::parse(&raw.expiration, &Rfc3339)
        .map_err(|e| err(format!("Expiration {:?}: {e}", raw.expiration)))?;
    tracing::info!(role, access_key_id = %raw.access_key_id, %expiration, "own credentials from instance metadata");
    Ok(OwnCredentials {
        access_key_id: raw.access_key_id,
        secret_access_key: Secret::new(raw.secret_access_key),
        session_token: Some(Secret::new(raw.token)),
        expiration: Some(expiration),
    })
}

async fn web_identity(
    sts: &StsClient,
    token_file: &std::path::Path,
    role_arn: &str,
) -> Result<OwnCredentials, OwnError> {
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| OwnError::TokenFile(token_file.to_owned(), e))?;
    let token = Secret::new(token.trim().to_string());
    if token.expose().is_empty() {
        return Err(OwnError::EmptyTokenFile(token_file.to_owned()));
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let req = AssumeRoleRequest {
        role_arn: role_arn.to_string(),
        session_name: super::naming::agent_session_name(host),
        duration_secs: OWN_SESSION_SECS,
        ..Default::default()
    };
    let c = sts.assume_role_with_web_identity(&req, &token).await?;
    tracing::info!(role_arn, access_key_id = %c.access_key_id, expiration = %c.expiration, "own credentials from web identity");
    Ok(OwnCredentials {
        access_key_id: c.access_key_id,
        secret_access_key: c.secret_access_key,
        session_token: Some(c.session_token),
        expiration: Some(c.expiration),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn env_needs_id_and_secret_and_takes_an_optional_token() {
        let vars: HashMap<&str, &str> = [
            ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123"),
        ]
        .into();
        let c = from_env(|k| vars.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.access_key_id, "AKIAEXAMPLE");
        assert!(!c.is_session());
        let dbg = format!("{c:?}");
        assert!(
            dbg.contains("AKIAEXAMPLE") && !dbg.contains("s3cr3t"),
            "{dbg}"
        );

        let mut with_token = vars.clone();
        with_token.insert("AWS_SESSION_TOKEN", "tok-tok-tok-tok");
        let c = from_env(|k| with_token.get(k).map(|v| v.to_string())).unwrap();
        assert!(c.is_session());

        let only_id: HashMap<&str, &str> = [("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")].into();
        let err = from_env(|k| only_id.get(k).map(|v| v.to_string())).unwrap_err();
        assert!(
            matches!(err, OwnError::EnvMissing("AWS_SECRET_ACCESS_KEY")),
            "{err}"
        );
    }

    #[test]
    fn credentials_are_refreshed_ahead_of_expiry() {
        let now = OffsetDateTime::now_utc();
        let mut c = OwnCredentials::new("A", "B", Some("C"));
        assert!(c.fresh(now));
        c.expiration = Some(now + time::Duration::minutes(30));
        assert!(c.fresh(now));
        c.expiration = Some(now + time::Duration::minutes(9));
        assert!(!c.fresh(now));
    }
}
