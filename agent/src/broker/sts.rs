//! STS over its Query API: `AssumeRole` (SigV4-signed with the agent's own credentials) and
//! `AssumeRoleWithWebIdentity` (unsigned; carries a job's OIDC token).
//!
//! Owns request encoding, signing, response parsing and the retry policy: throttling, 5xx,
//! connect errors and timeouts are retried with exponential backoff and full jitter; any
//! other 4xx (AccessDenied, SignatureDoesNotMatch, ...) is final at once. It never logs or
//! returns a secret key, session token or OIDC token: errors carry STS's code and a
//! scrubbed, shortened message only.

use super::own::OwnCredentials;
use crate::http_client::{HttpClient, HttpError};
use crate::metrics::Metrics;
use crate::secret::Secret;
use bytes::Bytes;
use http_body_util::Full;
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub const API_VERSION: &str = "2011-06-15";
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(3);
/// STS messages reach jobs and the audit: keep them short.
const MESSAGE_MAX: usize = 400;

#[derive(Debug, thiserror::Error)]
pub enum StsError {
    /// STS answered with a final 4xx: not retried.
    #[error("STS refused {action} for role {role_arn}: {code}: {message}")]
    Refused {
        action: &'static str,
        role_arn: String,
        status: u16,
        code: String,
        message: String,
    },
    /// Throttling, 5xx, timeouts or connection errors, still failing after every attempt.
    #[error("STS is unavailable for {action} of role {role_arn} after {attempts} attempt(s): {reason}; check [sts] endpoint and the network, the agent retries later")]
    Unavailable {
        action: &'static str,
        role_arn: String,
        attempts: u32,
        reason: String,
    },
    #[error(
        "STS answered {action} for role {role_arn} with a response that cannot be read: {reason}"
    )]
    BadResponse {
        action: &'static str,
        role_arn: String,
        reason: String,
    },
    #[error("cannot sign {action} for role {role_arn}: {reason}")]
    Sign {
        action: &'static str,
        role_arn: String,
        reason: String,
    },
}

/// What to ask STS for. Tags and the source identity apply to `AssumeRole` only where STS
/// says so (`SourceIdentity` is not sent with web identity: the token's claims carry it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssumeRoleRequest {
    pub role_arn: String,
    pub session_name: String,
    pub duration_secs: u32,
    pub policy: Option<String>,
    pub policy_arns: Vec<String>,
    pub tags: Vec<(String, String)>,
    pub source_identity: Option<String>,
}

/// Temporary credentials as STS issued them.
#[derive(Debug, Clone)]
pub struct StsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret<String>,
    pub session_token: Secret<String>,
    pub expiration: OffsetDateTime,
    pub assumed_role_arn: Option<String>,
}

/// An STS client for one endpoint and region.
#[derive(Debug, Clone)]
pub struct StsClient {
    http: HttpClient,
    endpoint: String,
    region: String,
    timeout: Duration,
    max_attempts: u32,
    metrics: Arc<Metrics>,
}

enum Attempt {
    Done(StsCredentials),
    Retry(String),
    Fail(StsError),
}

impl StsClient {
    pub fn new(
        http: HttpClient,
        sts: &crate::config::StsSection,
        metrics: Arc<Metrics>,
    ) -> StsClient {
        let mut endpoint = sts.endpoint_url();
        // SigV4 signs the path: "https://host" and "https://host/" must be the same request.
        if !endpoint[endpoint.find("://").map_or(0, |i| i + 3)..].contains('/') {
            endpoint.push('/');
        }
        StsClient {
            http,
            endpoint,
            region: sts.region.clone(),
            timeout: sts.timeout,
            max_attempts: sts.max_attempts.max(1),
            metrics,
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `AssumeRole`, signed with `own`.
    pub async fn assume_role(
        &self,
        req: &AssumeRoleRequest,
        own: &OwnCredentials,
    ) -> Result<StsCredentials, StsError> {
        let body = encode("AssumeRole", req, None);
        let secrets = own.secrets();
        self.call("AssumeRole", &req.role_arn, body, Some(own), &secrets)
            .await
    }

    /// `AssumeRoleWithWebIdentity`, unsigned: the OIDC token is the credential.
    pub async fn assume_role_with_web_identity(
        &self,
        req: &AssumeRoleRequest,
        token: &Secret<String>,
    ) -> Result<StsCredentials, StsError> {
        let body = encode("AssumeRoleWithWebIdentity", req, Some(token));
        let secrets = [token.expose().as_str()];
        self.call(
            "AssumeRoleWithWebIdentity",
            &req.role_arn,
            body,
            None,
            &secrets,
        )
        .await
    }

    async fn call(
        &self,
        action: &'static str,
        role_arn: &str,
        body: String,
        signer: Option<&OwnCredentials>,
        secrets: &[&str],
    ) -> Result<StsCredentials, StsError> {
        let mut last = String::new();
        for attempt in 1..=self.max_attempts {
            if attempt > 1 {
                tokio::time::sleep(backoff(attempt - 1)).await;
            }
            let started = Instant::now();
            let outcome = self.attempt(action, role_arn, &body, signer, secrets).await;
            let label = match &outcome {
                Attempt::Done(_) => "ok",
                // The last attempt's failure is final: it counts as an error.
                Attempt::Retry(_) if attempt == self.max_attempts => "error",
                Attempt::Retry(_) => "retryable",
                Attempt::Fail(StsError::Refused { .. }) => "refused",
                Attempt::Fail(_) => "error",
            };
            self.metrics.sts_call(action, label, started.elapsed());
            match outcome {
                Attempt::Done(c) => return Ok(c),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(reason) => {
                    tracing::warn!(action, role_arn, attempt, %reason, "STS call failed, will retry");
                    last = reason;
                }
            }
        }
        Err(StsError::Unavailable {
            action,
            role_arn: role_arn.to_string(),
            attempts: self.max_attempts,
            reason: last,
        })
    }

    async fn attempt(
        &self,
        action: &'static str,
        role_arn: &str,
        body: &str,
        signer: Option<&OwnCredentials>,
        secrets: &[&str],
    ) -> Attempt {
        let req = match self.build(body, signer) {
            Ok(r) => r,
            Err(reason) => {
                return Attempt::Fail(StsError::Sign {
                    action,
                    role_arn: role_arn.to_string(),
                    reason,
                })
            }
        };
        let resp = match self.http.send(req, self.timeout).await {
            Ok(r) => r,
            Err(e @ (HttpError::Timeout(..) | HttpError::Connect(..) | HttpError::Body(..))) => {
                return Attempt::Retry(e.to_string())
            }
            Err(e @ HttpError::Tls(_)) => {
                return Attempt::Fail(StsError::Unavailable {
                    action,
                    role_arn: role_arn.to_string(),
                    attempts: 1,
                    reason: e.to_string(),
                })
            }
        };
        let status = resp.status.as_u16();
        let text = String::from_utf8_lossy(&resp.body);
        if resp.status.is_success() {
            return match parse_credentials(&text) {
                Ok(c) => Attempt::Done(c),
                Err(reason) => Attempt::Fail(StsError::BadResponse {
                    action,
                    role_arn: role_arn.to_string(),
                    reason,
                }),
            };
        }
        let (code, message) = parse_error(&text).unwrap_or_else(|| {
            (
                format!("HTTP{status}"),
                format!("STS answered HTTP {status} without an error document"),
            )
        });
        let message = scrub(&message, secrets);
        if is_retryable(status, &code) {
            return Attempt::Retry(if code == format!("HTTP{status}") {
                message
            } else {
                format!("HTTP {status} {code}: {message}")
            });
        }
        Attempt::Fail(StsError::Refused {
            action,
            role_arn: role_arn.to_string(),
            status,
            code,
            message,
        })
    }

    fn build(
        &self,
        body: &str,
        signer: Option<&OwnCredentials>,
    ) -> Result<http::Request<Full<Bytes>>, String> {
        const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
        let mut req = http::Request::builder()
            .method("POST")
            .uri(&self.endpoint)
            .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
            .header(http::header::ACCEPT, "text/xml")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| format!("bad STS endpoint {:?}: {e}", self.endpoint))?;
        if let Some(own) = signer {
            use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
            let identity = aws_credential_types::Credentials::new(
                own.access_key_id.clone(),
                own.secret_access_key.expose().clone(),
                own.session_token.as_ref().map(|t| t.expose().clone()),
                None,
                "airlock-own",
            )
            .into();
            let params = aws_sigv4::sign::v4::SigningParams::builder()
                .identity(&identity)
                .region(&self.region)
                .name("sts")
                .time(SystemTime::now())
                .settings(SigningSettings::default())
                .build()
                .map_err(|e| e.to_string())?
                .into();
            let signable = SignableRequest::new(
                "POST",
                &self.endpoint,
                [("content-type", CONTENT_TYPE)].into_iter(),
                SignableBody::Bytes(body.as_bytes()),
            )
            .map_err(|e| e.to_string())?;
            let (instructions, _) = sign(signable, &params)
                .map_err(|e| e.to_string())?
                .into_parts();
            instructions.apply_to_request_http1x(&mut req);
        }
        Ok(req)
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(cap, base·2^n)].
fn backoff(retry: u32) -> Duration {
    use rand::Rng;
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << retry.min(16))
        .min(BACKOFF_CAP);
    let ms = rand::thread_rng().gen_range(0..=ceiling.as_millis() as u64);
    Duration::from_millis(ms)
}

fn is_retryable(status: u16, code: &str) -> bool {
    status >= 500
        || status == 429
        || matches!(
            code,
            "Throttling"
                | "ThrottlingException"
                | "RequestLimitExceeded"
                | "TooManyRequestsException"
                | "IDPCommunicationError"
        )
}

/// Form body of a call, encoded as the AWS SDKs do: everything but `A-Za-z0-9-_.~` is
/// percent-encoded (`*` and spaces included). STS hashes the raw body, but stand-ins such as
/// moto re-encode the parameters this way before they check the signature.
fn encode(action: &str, req: &AssumeRoleRequest, token: Option<&Secret<String>>) -> String {
    let mut pairs: Vec<(String, &str)> = vec![
        ("Action".into(), action),
        ("Version".into(), API_VERSION),
        ("RoleArn".into(), &req.role_arn),
        ("RoleSessionName".into(), &req.session_name),
    ];
    let duration = req.duration_secs.to_string();
    pairs.push(("DurationSeconds".into(), &duration));
    if let Some(p) = &req.policy {
        pairs.push(("Policy".into(), p));
    }
    for (i, arn) in req.policy_arns.iter().enumerate() {
        pairs.push((format!("PolicyArns.member.{}.arn", i + 1), arn));
    }
    match token {
        Some(t) => pairs.push(("WebIdentityToken".into(), t.expose())),
        None => {
            for (i, (k, v)) in req.tags.iter().enumerate() {
                pairs.push((format!("Tags.member.{}.Key", i + 1), k));
                pairs.push((format!("Tags.member.{}.Value", i + 1), v));
            }
            if let Some(s) = &req.source_identity {
                pairs.push(("SourceIdentity".into(), s));
            }
        }
    }
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// No Debug on the raw shapes: they hold the secret key and session token as plain strings
// for the instant between parsing and wrapping.
#[derive(Deserialize)]
struct RawResponse {
    #[serde(rename = "AssumeRoleResult", alias = "AssumeRoleWithWebIdentityResult")]
    result: RawResult,
}

#[derive(Deserialize)]
struct RawResult {
    #[serde(rename = "Credentials")]
    credentials: RawCredentials,
    #[serde(rename = "AssumedRoleUser", default)]
    assumed_role_user: Option<RawUser>,
}

#[derive(Deserialize)]
struct RawCredentials {
    #[serde(rename = "AccessKeyId")]
    access_key_id: String,
    #[serde(rename = "SecretAccessKey")]
    secret_access_key: String,
    #[serde(rename = "SessionToken")]
    session_token: String,
    #[serde(rename = "Expiration")]
    expiration: String,
}

#[derive(Deserialize)]
struct RawUser {
    #[serde(rename = "Arn")]
    arn: Option<String>,
}

fn parse_credentials(xml: &str) -> Result<StsCredentials, String> {
    // quick-xml's messages can quote the document, and the document holds secrets.
    let raw: RawResponse = quick_xml::de::from_str(xml)
        .map_err(|_| "not an AssumeRole response with Credentials".to_string())?;
    let c = raw.result.credentials;
    let expiration = OffsetDateTime::parse(c.expiration.trim(), &Rfc3339)
        .map_err(|e| format!("Expiration {:?} is not RFC 3339: {e}", c.expiration))?;
    if c.access_key_id.is_empty() || c.secret_access_key.is_empty() || c.session_token.is_empty() {
        return Err("Credentials are incomplete".into());
    }
    Ok(StsCredentials {
        access_key_id: c.access_key_id,
        secret_access_key: Secret::new(c.secret_access_key),
        session_token: Secret::new(c.session_token),
        expiration,
        assumed_role_arn: raw.result.assumed_role_user.and_then(|u| u.arn),
    })
}

#[derive(Debug, Deserialize)]
struct RawErrorDoc {
    /// AWS: `<ErrorResponse><Error>`.
    #[serde(rename = "Error", default)]
    error: Option<RawError>,
    /// moto and older services: `<ErrorResponse><Errors><Error>` / `<Response><Errors>`.
    #[serde(rename = "Errors", default)]
    errors: Option<RawErrors>,
}

#[derive(Debug, Deserialize)]
struct RawErrors {
    #[serde(rename = "Error", default)]
    error: Vec<RawError>,
}

#[derive(Debug, Deserialize)]
struct RawError {
    #[serde(rename = "Code", default)]
    code: Option<String>,
    #[serde(rename = "Message", default)]
    message: Option<String>,
}

/// `Code` and `Message` of an STS error document.
pub fn parse_error(xml: &str) -> Option<(String, String)> {
    let doc: RawErrorDoc = quick_xml::de::from_str(xml).ok()?;
    let e = doc
        .error
        .or_else(|| doc.errors.and_then(|es| es.error.into_iter().next()))?;
    let code = e.code?.trim().to_string();
    if code.is_empty() {
        return None;
    }
    Some((code, e.message.unwrap_or_default().trim().to_string()))
}

/// Cut an STS message to its first paragraph (AWS appends canonical requests to some
/// signature errors) and a bounded length, and blank out any secret it might echo.
fn scrub(message: &str, secrets: &[&str]) -> String {
    let mut m = message.split("\n\n").next().unwrap_or_default().to_string();
    for s in secrets.iter().filter(|s| s.len() >= 8) {
        m = m.replace(s, "***");
    }
    let mut m: String = m
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if m.chars().count() > MESSAGE_MAX {
        m = m.chars().take(MESSAGE_MAX).collect::<String>() + "…";
    }
    m
}

/// The account of an ARN (`arn:aws:sts::123456789012:assumed-role/...` → `123456789012`).
pub fn account_of(arn: &str) -> Option<String> {
    let acct = arn.split(':').nth(4)?;
    (acct.len() == 12 && acct.bytes().all(|b| b.is_ascii_digit())).then(|| acct.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <SourceIdentity>acme-web@run-1.1</SourceIdentity>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/deploy/airlock.x</Arn>
      <AssumedRoleId>ARO123EXAMPLE123:airlock.x</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>ASIAIOSFODNN7EXAMPLE</AccessKeyId>
      <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>
      <SessionToken>AQoDYXdzEPT//////////wEXAMPLEtc764</SessionToken>
      <Expiration>2026-11-26T06:06:27.877324Z</Expiration>
    </Credentials>
    <PackedPolicySize>6</PackedPolicySize>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>c6104cbe</RequestId></ResponseMetadata>
</AssumeRoleResponse>"#;

    #[test]
    fn parses_assume_role_and_web_identity_responses() {
        let c = parse_credentials(OK).unwrap();
        assert_eq!(c.access_key_id, "ASIAIOSFODNN7EXAMPLE");
        assert_eq!(
            c.session_token.expose(),
            "AQoDYXdzEPT//////////wEXAMPLEtc764"
        );
        assert_eq!(c.expiration.unix_timestamp(), 1795673187);
        assert_eq!(
            c.assumed_role_arn.as_deref(),
            Some("arn:aws:sts::123456789012:assumed-role/deploy/airlock.x")
        );
        let web = OK
            .replace("AssumeRoleResult", "AssumeRoleWithWebIdentityResult")
            .replace("AssumeRoleResponse", "AssumeRoleWithWebIdentityResponse");
        assert_eq!(
            parse_credentials(&web).unwrap().access_key_id,
            "ASIAIOSFODNN7EXAMPLE"
        );
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("wJalrXUtnFEMI") && !dbg.contains("AQoDYXdzEPT"),
            "{dbg}"
        );
    }

    #[test]
    fn a_broken_response_never_quotes_its_secrets() {
        let broken = OK.replace("<Expiration>", "<Expiration>soon");
        let err = parse_credentials(&broken).unwrap_err();
        assert!(err.contains("soon"), "{err}");
        let truncated = &OK[..OK.find("</SecretAccessKey>").unwrap()];
        let err = parse_credentials(truncated).unwrap_err();
        assert!(!err.contains("wJalrXUtnFEMI"), "{err}");
    }

    #[test]
    fn parses_both_error_shapes() {
        let aws = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>User is not authorized</Message></Error><RequestId>x</RequestId></ErrorResponse>"#;
        assert_eq!(
            parse_error(aws),
            Some(("AccessDenied".into(), "User is not authorized".into()))
        );
        let moto = r#"<?xml version="1.0" encoding="utf-8"?>
<ErrorResponse><Errors><Error><Code>InvalidClientTokenId</Code><Message>The security token included in the request is invalid.</Message><Type>Sender</Type></Error></Errors></ErrorResponse>"#;
        assert_eq!(parse_error(moto).unwrap().0, "InvalidClientTokenId");
        assert_eq!(parse_error("<html>500</html>"), None);
        assert_eq!(parse_error("not xml"), None);
    }

    #[test]
    fn retries_only_throttling_and_server_errors() {
        assert!(is_retryable(500, "InternalFailure"));
        assert!(is_retryable(503, "ServiceUnavailable"));
        assert!(is_retryable(400, "Throttling"));
        assert!(is_retryable(400, "RequestLimitExceeded"));
        assert!(!is_retryable(403, "AccessDenied"));
        assert!(!is_retryable(403, "SignatureDoesNotMatch"));
        assert!(!is_retryable(400, "ValidationError"));
    }

    #[test]
    fn backoff_is_bounded_full_jitter() {
        for n in 0..40 {
            assert!(backoff(n) <= BACKOFF_CAP);
        }
        assert!(backoff(1) <= BACKOFF_BASE * 2);
    }

    #[test]
    fn encodes_every_parameter() {
        let req = AssumeRoleRequest {
            role_arn: "arn:aws:iam::123456789012:role/r".into(),
            session_name: "airlock.a.1".into(),
            duration_secs: 900,
            policy: Some("{\"Version\":\"2012-10-17\"}".into()),
            policy_arns: vec!["arn:aws:iam::aws:policy/ReadOnlyAccess".into()],
            tags: vec![("repo".into(), "acme/web & co".into())],
            source_identity: Some("acme-web@run-1.1".into()),
        };
        let body = encode("AssumeRole", &req, None);
        let pairs: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let get = |k: &str| pairs.iter().find(|(p, _)| p == k).map(|(_, v)| v.as_str());
        assert_eq!(get("Action"), Some("AssumeRole"));
        assert_eq!(get("Version"), Some(API_VERSION));
        assert_eq!(get("DurationSeconds"), Some("900"));
        assert_eq!(get("Policy"), Some("{\"Version\":\"2012-10-17\"}"));
        assert_eq!(
            get("PolicyArns.member.1.arn"),
            Some("arn:aws:iam::aws:policy/ReadOnlyAccess")
        );
        assert_eq!(get("Tags.member.1.Key"), Some("repo"));
        assert_eq!(get("Tags.member.1.Value"), Some("acme/web & co"));
        assert_eq!(get("SourceIdentity"), Some("acme-web@run-1.1"));
        let web = encode(
            "AssumeRoleWithWebIdentity",
            &req,
            Some(&Secret::new("eyJ.tok".into())),
        );
        assert!(web.contains("WebIdentityToken=eyJ.tok"));
        assert_eq!(percent_encode("a b*c/é~"), "a%20b%2Ac%2F%C3%A9~");
        assert!(!web.contains("SourceIdentity") && !web.contains("Tags.member"));
    }

    #[test]
    fn messages_are_cut_and_scrubbed() {
        let m = scrub(
            "The request signature we calculated does not match.\n\nThe Canonical String was\nx-amz-security-token:SECRETTOKEN123",
            &["SECRETTOKEN123"],
        );
        assert_eq!(m, "The request signature we calculated does not match.");
        assert_eq!(
            scrub("token SECRETTOKEN123 here", &["SECRETTOKEN123"]),
            "token *** here"
        );
        assert!(scrub(&"x".repeat(1000), &[]).chars().count() <= MESSAGE_MAX + 1);
    }

    #[test]
    fn account_comes_from_the_arn() {
        assert_eq!(
            account_of("arn:aws:sts::123456789012:assumed-role/r/s").as_deref(),
            Some("123456789012")
        );
        assert_eq!(account_of("arn:aws:iam::aws:policy/x"), None);
        assert_eq!(account_of("garbage"), None);
    }
}
