//! Test OIDC tokens: realistic GitHub Actions claim sets signed with the fixture keys in
//! `tests/fixtures/oidc/`.
//!
//! Owns minting only; it must never be linked into the agent, and its keys must never be
//! trusted outside tests.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The GitHub Actions issuer; the tests trust it with local keys through `jwks_file`.
pub const GITHUB_ISSUER: &str = "https://token.actions.githubusercontent.com";
/// The audience the test agent config accepts.
pub const TEST_AUDIENCE: &str = "airlock-test";

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("cannot read signing key {0}: {1}")]
    ReadKey(PathBuf, std::io::Error),
    #[error("signing key {0} is not a PKCS#8 PEM key for {1:?}: {2}")]
    BadKey(PathBuf, Algorithm, jsonwebtoken::errors::Error),
    #[error("algorithm {0:?} is not supported by the test minter (use RS256 or ES256)")]
    UnsupportedAlg(Algorithm),
    #[error("claims must be a JSON object, got {0}")]
    ClaimsNotObject(String),
    #[error("cannot sign the token: {0}")]
    Sign(jsonwebtoken::errors::Error),
}

/// One of the fixture keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestKey {
    /// `rsa.pem`, kid `test-rsa-1`, in `jwks.json`.
    Rsa,
    /// `ec.pem`, kid `test-ec-1`, in `jwks.json`.
    Ec,
    /// `rsa2.pem`, kid `test-rsa-2`, only in `jwks-rotated.json`.
    RsaRotated,
}

impl TestKey {
    pub fn file(self) -> PathBuf {
        let name = match self {
            TestKey::Rsa => "rsa.pem",
            TestKey::Ec => "ec.pem",
            TestKey::RsaRotated => "rsa2.pem",
        };
        crate::paths::oidc_fixtures().join(name)
    }

    pub fn kid(self) -> &'static str {
        match self {
            TestKey::Rsa => "test-rsa-1",
            TestKey::Ec => "test-ec-1",
            TestKey::RsaRotated => "test-rsa-2",
        }
    }

    pub fn alg(self) -> Algorithm {
        match self {
            TestKey::Ec => Algorithm::ES256,
            TestKey::Rsa | TestKey::RsaRotated => Algorithm::RS256,
        }
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs `claims` with a PEM key. `iss`, `aud`, `iat`, `nbf` and `exp` (now + `ttl`) are
/// set unless `claims` already carries them, so a test can mint an expired token by
/// giving its own `exp`.
pub fn mint_with(
    key_file: &Path,
    kid: &str,
    alg: Algorithm,
    issuer: &str,
    audience: &str,
    claims: &Value,
    ttl_secs: u64,
) -> Result<String, OidcError> {
    let mut body: Map<String, Value> = claims
        .as_object()
        .cloned()
        .ok_or_else(|| OidcError::ClaimsNotObject(claims.to_string()))?;
    let now = now();
    let defaults = [
        ("iss", json!(issuer)),
        ("aud", json!(audience)),
        ("iat", json!(now)),
        ("nbf", json!(now.saturating_sub(5))),
        ("exp", json!(now + ttl_secs)),
    ];
    for (k, v) in defaults {
        body.entry(k).or_insert(v);
    }
    let pem = std::fs::read(key_file).map_err(|e| OidcError::ReadKey(key_file.to_owned(), e))?;
    let key = match alg {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        other => return Err(OidcError::UnsupportedAlg(other)),
    }
    .map_err(|e| OidcError::BadKey(key_file.to_owned(), alg, e))?;
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &Value::Object(body), &key).map_err(OidcError::Sign)
}

/// Signs `claims` as the GitHub issuer for the test audience with a fixture key.
pub fn mint(key: TestKey, claims: &Value) -> String {
    match mint_with(
        &key.file(),
        key.kid(),
        key.alg(),
        GITHUB_ISSUER,
        TEST_AUDIENCE,
        claims,
        300,
    ) {
        Ok(t) => t,
        // The fixture keys are part of the repository; failing here is a broken checkout.
        Err(e) => panic!("minting a test token failed: {e}"),
    }
}

/// A token whose payload is `claims` as given (no defaults added), with a hand-made
/// header: for `alg: none`, HS256 and other tokens a real issuer never sends.
pub fn forge(header: &Value, claims: &Value, signature: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        b64.encode(header.to_string()),
        b64.encode(claims.to_string()),
        b64.encode(signature)
    )
}

/// The claims of a GitHub Actions job, as GitHub sends them.
#[derive(Debug, Clone)]
pub struct GithubJob {
    pub repository: String,
    pub git_ref: String,
    pub environment: Option<String>,
    pub event_name: String,
    pub actor: String,
    pub run_id: u64,
    pub workflow: String,
}

impl GithubJob {
    /// `acme/web`, `refs/heads/main`, environment `production`, a push: the
    /// `web-production` rule.
    pub fn production() -> Self {
        GithubJob {
            repository: "acme/web".into(),
            git_ref: "refs/heads/main".into(),
            environment: Some("production".into()),
            event_name: "push".into(),
            actor: "octocat".into(),
            run_id: 9_100_001,
            workflow: "deploy.yml".into(),
        }
    }

    /// `acme/web`, a release branch deploying to `staging`: the `web-staging` rule.
    pub fn staging() -> Self {
        GithubJob {
            git_ref: "refs/heads/release/1.4".into(),
            environment: Some("staging".into()),
            run_id: 9_100_002,
            ..Self::production()
        }
    }

    /// A pull request from a fork against `acme/web`: no environment, event
    /// `pull_request`, ref `refs/pull/N/merge`.
    pub fn fork_pull_request() -> Self {
        GithubJob {
            git_ref: "refs/pull/77/merge".into(),
            environment: None,
            event_name: "pull_request".into(),
            actor: "mallory".into(),
            run_id: 9_100_003,
            workflow: "ci.yml".into(),
            ..Self::production()
        }
    }

    /// A push to a feature branch of a repository that no example rule names.
    pub fn feature_branch() -> Self {
        GithubJob {
            repository: "other-org/tool".into(),
            git_ref: "refs/heads/feature/login".into(),
            environment: None,
            event_name: "push".into(),
            actor: "dev1".into(),
            run_id: 9_100_004,
            workflow: "ci.yml".into(),
        }
    }

    pub fn with_run_id(mut self, run_id: u64) -> Self {
        self.run_id = run_id;
        self
    }

    pub fn claims(&self) -> Value {
        let (owner, _) = self
            .repository
            .split_once('/')
            .unwrap_or((&self.repository, ""));
        let sub = match (&self.environment, self.event_name.as_str()) {
            (Some(env), _) => format!("repo:{}:environment:{env}", self.repository),
            (None, "pull_request") => format!("repo:{}:pull_request", self.repository),
            (None, _) => format!("repo:{}:ref:{}", self.repository, self.git_ref),
        };
        let workflow_ref = format!(
            "{}/.github/workflows/{}@{}",
            self.repository, self.workflow, self.git_ref
        );
        let mut c = json!({
            "jti": format!("jti-{}-{}", self.run_id, now()),
            "sub": sub,
            "repository": self.repository,
            "repository_id": "700001",
            "repository_owner": owner,
            "repository_owner_id": "500001",
            "repository_visibility": "private",
            "ref": self.git_ref,
            "ref_type": if self.git_ref.starts_with("refs/tags/") { "tag" } else { "branch" },
            "sha": "4f9c2d3b8a1e6f70c5d2b9a8e7f6c5d4b3a29180",
            "workflow": self.workflow,
            "workflow_ref": workflow_ref,
            "workflow_sha": "4f9c2d3b8a1e6f70c5d2b9a8e7f6c5d4b3a29180",
            "job_workflow_ref": workflow_ref,
            "event_name": self.event_name,
            "actor": self.actor,
            "actor_id": "1000001",
            "run_id": self.run_id.to_string(),
            "run_number": "42",
            "run_attempt": "1",
            "runner_environment": "self-hosted",
        });
        if let (Some(env), Some(map)) = (&self.environment, c.as_object_mut()) {
            map.insert("environment".into(), json!(env));
        }
        c
    }

    /// The claims signed with `test-rsa-1`.
    pub fn token(&self) -> String {
        mint(TestKey::Rsa, &self.claims())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn minted_tokens_verify_against_the_fixture_jwks() {
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(
            &std::fs::read(crate::paths::oidc_fixtures().join("jwks.json")).unwrap(),
        )
        .unwrap();
        for key in [TestKey::Rsa, TestKey::Ec] {
            let token = mint(key, &GithubJob::production().claims());
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert_eq!(header.kid.as_deref(), Some(key.kid()));
            let jwk = jwks.find(key.kid()).unwrap();
            let mut v = Validation::new(key.alg());
            v.set_audience(&[TEST_AUDIENCE]);
            v.set_issuer(&[GITHUB_ISSUER]);
            let data =
                jsonwebtoken::decode::<Value>(&token, &DecodingKey::from_jwk(jwk).unwrap(), &v)
                    .unwrap();
            assert_eq!(data.claims["repository"], "acme/web");
            assert_eq!(data.claims["environment"], "production");
        }
        assert!(jwks.find(TestKey::RsaRotated.kid()).is_none());
    }

    #[test]
    fn given_exp_is_kept_and_sub_follows_github() {
        let mut claims = GithubJob::fork_pull_request().claims();
        claims["exp"] = json!(1000);
        let token = mint(TestKey::Rsa, &claims);
        let payload = token.split('.').nth(1).unwrap();
        use base64::Engine as _;
        let body: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(body["exp"], 1000);
        assert_eq!(body["sub"], "repo:acme/web:pull_request");
        assert!(body.get("environment").is_none());
    }
}
