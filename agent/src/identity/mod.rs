//! Who a job is: verified CI OIDC tokens and runner-attested claims, normalised into one
//! [`JobIdentity`].
//!
//! This module owns token verification (`oidc`) and claim normalisation (`claims`). It never
//! logs a token, and its errors never contain one.

pub mod claims;
pub mod oidc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

pub use claims::{
    configured_provider, from_attested, from_attested_value, normalise, provider_for_issuer,
};
pub use oidc::{IdentityError, Verifier};

/// How the identity was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentitySource {
    /// A CI provider's signed OIDC token, verified against the issuer's JWKS.
    Oidc,
    /// Claims supplied by the runner integration before any job code ran (weaker).
    Attested,
}

/// The CI system a job comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    Github,
    Gitlab,
    Buildkite,
    /// Any other issuer: only raw claims and `sub` are known.
    Generic,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Github => "github",
            Provider::Gitlab => "gitlab",
            Provider::Buildkite => "buildkite",
            Provider::Generic => "generic",
        }
    }
}

/// The immutable ids each provider's tokens carry, by claim name: what a policy pins so that
/// a renamed and re-registered organisation or project does not inherit its grants. Names
/// can be taken over; these ids cannot.
///
/// - GitHub Actions: `repository_id`, `repository_owner_id` (in every token).
/// - GitLab: `project_id`, `namespace_id` (in every `id_tokens:` token).
/// - Buildkite: `organization_id`, `pipeline_id` (UUIDs, only in tokens requested with
///   `buildkite-agent oidc request-token --claim organization_id,pipeline_id`; Buildkite's
///   docs, "Optional claims").
pub fn id_claims(provider: Provider) -> &'static [&'static str] {
    match provider {
        Provider::Github => &["repository_id", "repository_owner_id"],
        Provider::Gitlab => &["project_id", "namespace_id"],
        Provider::Buildkite => &["organization_id", "pipeline_id"],
        Provider::Generic => &[],
    }
}

/// Every provider, for messages that list them.
pub const PROVIDERS: [Provider; 4] = [
    Provider::Github,
    Provider::Gitlab,
    Provider::Buildkite,
    Provider::Generic,
];

impl Provider {
    /// `github` → [`Provider::Github`], and so on.
    pub fn from_name(name: &str) -> Option<Provider> {
        PROVIDERS.into_iter().find(|p| p.as_str() == name)
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One job's identity, the same shape for every CI provider.
///
/// Field names here are the names policies match on (see [`JobIdentity::field`]); raw
/// claims stay available as `claims.<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobIdentity {
    pub source: IdentitySource,
    pub provider: Provider,
    pub issuer: String,
    pub subject: Option<String>,
    /// GitHub `repository`, GitLab `project_path`, Buildkite `organization_slug/pipeline_slug`.
    pub repository: Option<String>,
    /// GitHub `repository_owner`, GitLab `namespace_path`, Buildkite `organization_slug`.
    pub owner: Option<String>,
    /// Full git ref, e.g. `refs/heads/main` (GitLab and Buildkite refs are normalised to this form).
    pub git_ref: Option<String>,
    /// `branch` or `tag`.
    pub ref_type: Option<String>,
    pub environment: Option<String>,
    /// GitHub `workflow_ref` (path@ref), GitLab `ci_config_ref_uri`, Buildkite pipeline slug.
    pub workflow: Option<String>,
    /// GitHub `event_name`, GitLab `pipeline_source`, Buildkite `build_source` where present.
    pub event: Option<String>,
    pub actor: Option<String>,
    /// GitHub `run_id`, GitLab `pipeline_id`, Buildkite `build_number`.
    pub run_id: Option<String>,
    /// GitHub `run_attempt`; GitLab `job_id` and Buildkite `job_id` identify the job instead.
    pub attempt: Option<String>,
    pub job_id: Option<String>,
    /// GitHub `runner_environment` (`self-hosted` / `github-hosted`).
    pub runner_environment: Option<String>,
    /// Every claim as received, for `claims.<name>` matching.
    pub claims: Map<String, Value>,
}

/// The identity field names policies may match on, besides `claims.<name>`.
pub const FIELDS: &[&str] = &[
    "source",
    "provider",
    "issuer",
    "subject",
    "repository",
    "owner",
    "ref",
    "ref_type",
    "environment",
    "workflow",
    "event",
    "actor",
    "run_id",
    "attempt",
    "job_id",
    "runner_environment",
];

impl JobIdentity {
    /// The value of a policy field: one of [`FIELDS`] or `claims.<name>` (strings, numbers
    /// and booleans of raw claims are rendered as text). `None` when the job has no value.
    pub fn field(&self, name: &str) -> Option<String> {
        if let Some(claim) = name.strip_prefix("claims.") {
            return match self.claims.get(claim)? {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                _ => None,
            };
        }
        let v = match name {
            "source" => {
                return Some(
                    match self.source {
                        IdentitySource::Oidc => "oidc",
                        IdentitySource::Attested => "attested",
                    }
                    .to_string(),
                )
            }
            "provider" => return Some(self.provider.as_str().to_string()),
            "issuer" => return Some(self.issuer.clone()),
            "subject" => &self.subject,
            "repository" => &self.repository,
            "owner" => &self.owner,
            "ref" => &self.git_ref,
            "ref_type" => &self.ref_type,
            "environment" => &self.environment,
            "workflow" => &self.workflow,
            "event" => &self.event,
            "actor" => &self.actor,
            "run_id" => &self.run_id,
            "attempt" => &self.attempt,
            "job_id" => &self.job_id,
            "runner_environment" => &self.runner_environment,
            _ => return None,
        };
        v.clone()
    }

    /// A one-line summary for logs and audit records (never contains a token).
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} {}",
            self.provider,
            self.repository.as_deref().unwrap_or("-")
        );
        if let Some(r) = &self.git_ref {
            s.push(' ');
            s.push_str(r);
        }
        if let Some(e) = &self.environment {
            s.push_str(" env=");
            s.push_str(e);
        }
        if let Some(r) = &self.run_id {
            s.push_str(" run=");
            s.push_str(r);
        }
        if let Some(a) = &self.attempt {
            s.push_str(" attempt=");
            s.push_str(a);
        }
        s
    }
}
