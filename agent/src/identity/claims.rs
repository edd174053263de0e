//! Claim normalisation: maps each CI provider's claim names onto one [`JobIdentity`], and
//! turns runner-attested claims into an identity marked [`IdentitySource::Attested`].
//!
//! Pure functions, no I/O. This module never verifies anything: it trusts its caller to have
//! checked a token's signature (or to mark the identity as attested), and it must never
//! upgrade attested claims to [`IdentitySource::Oidc`].

use super::{IdentityError, IdentitySource, JobIdentity, Provider};
use serde_json::{Map, Value};

/// Largest runner-attested claim object accepted (serialised JSON).
pub const MAX_ATTESTED_BYTES: usize = 16 * 1024;

const GITHUB_ISSUER: &str = "https://token.actions.githubusercontent.com";
const BUILDKITE_ISSUER: &str = "https://agent.buildkite.com";

/// Build the identity of a job from its claims, read in `provider`'s claim shape.
///
/// Numbers given as JSON numbers or strings both become text; absent, null and empty
/// claims become `None`. Every claim is kept as received in `claims`.
pub fn normalise(
    provider: Provider,
    issuer: &str,
    source: IdentitySource,
    claims: Map<String, Value>,
) -> JobIdentity {
    let text = |name: &str| claims.get(name).and_then(as_text);
    let mut id = JobIdentity {
        source,
        provider,
        issuer: issuer.to_string(),
        subject: text("sub"),
        repository: None,
        owner: None,
        git_ref: None,
        ref_type: None,
        environment: None,
        workflow: None,
        event: None,
        actor: None,
        run_id: None,
        attempt: None,
        job_id: None,
        runner_environment: None,
        claims: Map::new(),
    };
    match provider {
        Provider::Github => {
            id.repository = text("repository");
            id.owner = text("repository_owner");
            id.git_ref = text("ref");
            id.ref_type = text("ref_type");
            id.environment = text("environment");
            id.workflow = text("workflow_ref");
            id.event = text("event_name");
            id.actor = text("actor");
            id.run_id = text("run_id");
            id.attempt = text("run_attempt");
            id.runner_environment = text("runner_environment");
        }
        Provider::Gitlab => {
            id.repository = text("project_path");
            id.owner = text("namespace_path");
            id.ref_type = text("ref_type");
            id.git_ref = full_ref(text("ref"), id.ref_type.as_deref());
            id.environment = text("environment");
            id.workflow = text("ci_config_ref_uri");
            id.event = text("pipeline_source");
            id.actor = text("user_login");
            id.run_id = text("pipeline_id");
            id.job_id = text("job_id");
        }
        Provider::Buildkite => {
            let org = text("organization_slug");
            let pipeline = text("pipeline_slug");
            if let (Some(o), Some(p)) = (&org, &pipeline) {
                id.repository = Some(format!("{o}/{p}"));
            }
            id.owner = org;
            // A tag build also carries the branch it was cut from; the tag is the more
            // specific ref, so it wins.
            if let Some(tag) = text("build_tag") {
                id.git_ref = full_ref(Some(tag), Some("tag"));
                id.ref_type = Some("tag".into());
            } else if let Some(branch) = text("build_branch") {
                id.git_ref = full_ref(Some(branch), Some("branch"));
                id.ref_type = Some("branch".into());
            }
            id.workflow = pipeline;
            id.event = text("build_source");
            id.run_id = text("build_number");
            id.job_id = text("job_id");
        }
        Provider::Generic => {}
    }
    id.claims = claims;
    id
}

/// The provider of a configured issuer: the one it names, or else the one its URL suggests.
/// The verifier reads the issuer's tokens in this provider's claim shape, and the policy
/// loader maps a rule's `provider` onto the issuers it gives.
pub fn configured_provider(cfg: &crate::config::IssuerConfig) -> Provider {
    cfg.provider
        .unwrap_or_else(|| provider_for_issuer(&cfg.issuer))
}

/// The provider whose claim shape an issuer uses, for issuers configured without one.
pub fn provider_for_issuer(iss: &str) -> Provider {
    let is = |base: &str| {
        iss.strip_prefix(base)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    if is(GITHUB_ISSUER) {
        return Provider::Github;
    }
    if is(BUILDKITE_ISSUER) {
        return Provider::Buildkite;
    }
    if host_of(iss).is_some_and(|h| h.to_ascii_lowercase().contains("gitlab")) {
        return Provider::Gitlab;
    }
    Provider::Generic
}

/// Runner-attested claims given as any JSON value: refuses anything but an object, then
/// reads it as [`from_attested`] does.
pub fn from_attested_value(value: Value) -> Result<JobIdentity, IdentityError> {
    match value {
        Value::Object(map) => from_attested(map),
        other => Err(IdentityError::AttestedNotObject(json_kind(&other))),
    }
}

/// Claims attested by the runner integration before any job code ran.
///
/// The object needs a `provider` (github, gitlab, buildkite or generic); `issuer` is
/// optional (default `attested:<provider>`); the other keys are read in that provider's
/// claim shape. The result is always marked [`IdentitySource::Attested`].
pub fn from_attested(mut claims: Map<String, Value>) -> Result<JobIdentity, IdentityError> {
    let size = serde_json::to_vec(&claims)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_ATTESTED_BYTES {
        return Err(IdentityError::AttestedTooLarge {
            size,
            max: MAX_ATTESTED_BYTES,
        });
    }
    let provider = match claims.remove("provider") {
        None | Some(Value::Null) => return Err(IdentityError::AttestedMissingProvider),
        Some(Value::String(p)) => match p.as_str() {
            "github" => Provider::Github,
            "gitlab" => Provider::Gitlab,
            "buildkite" => Provider::Buildkite,
            "generic" => Provider::Generic,
            _ => return Err(IdentityError::AttestedUnknownProvider(shorten(&p))),
        },
        Some(other) => {
            return Err(IdentityError::AttestedUnknownProvider(format!(
                "<a JSON {}>",
                json_kind(&other)
            )))
        }
    };
    let issuer = match claims.remove("issuer") {
        None | Some(Value::Null) => format!("attested:{provider}"),
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        Some(_) => return Err(IdentityError::AttestedBadIssuer),
    };
    Ok(normalise(
        provider,
        &issuer,
        IdentitySource::Attested,
        claims,
    ))
}

/// A claim as text: strings as they are, numbers and booleans printed; empty strings,
/// null, arrays and objects are no value.
fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `refs/heads/X` or `refs/tags/X`. An unknown ref type gives no ref at all, so that a
/// policy pinned to a branch can never match a ref of unknown kind.
fn full_ref(name: Option<String>, ref_type: Option<&str>) -> Option<String> {
    let name = name?;
    if name.starts_with("refs/") {
        return Some(name);
    }
    match ref_type {
        Some("branch") => Some(format!("refs/heads/{name}")),
        Some("tag") => Some(format!("refs/tags/{name}")),
        _ => None,
    }
}

fn host_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = host.split(':').next()?;
    (!host.is_empty()).then_some(host)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Bound runner-supplied text before it goes into an error message.
fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn github_claims() -> Map<String, Value> {
        obj(json!({
            "jti": "example-id",
            "sub": "repo:octo-org/octo-repo:environment:prod",
            "environment": "prod",
            "aud": "sts.amazonaws.com",
            "ref": "refs/heads/main",
            "sha": "example-sha",
            "repository": "octo-org/octo-repo",
            "repository_owner": "octo-org",
            "actor_id": "12",
            "repository_visibility": "private",
            "repository_id": "74",
            "repository_owner_id": "65",
            "run_id": "example-run-id",
            "run_number": "10",
            "run_attempt": "2",
            "runner_environment": "self-hosted",
            "actor": "octocat",
            "workflow": "example-workflow",
            "head_ref": "",
            "base_ref": "",
            "event_name": "workflow_dispatch",
            "ref_type": "branch",
            "job_workflow_ref": "octo-org/octo-automation/.github/workflows/oidc.yml@refs/heads/main",
            "workflow_ref": "octo-org/octo-repo/.github/workflows/deploy.yml@refs/heads/main",
            "iss": "https://token.actions.githubusercontent.com",
            "nbf": 1632492967,
            "exp": 1632493867,
            "iat": 1632493567
        }))
    }

    #[test]
    fn github_claims_map_to_identity_fields() {
        let id = normalise(
            Provider::Github,
            GITHUB_ISSUER,
            IdentitySource::Oidc,
            github_claims(),
        );
        assert_eq!(id.repository.as_deref(), Some("octo-org/octo-repo"));
        assert_eq!(id.owner.as_deref(), Some("octo-org"));
        assert_eq!(id.git_ref.as_deref(), Some("refs/heads/main"));
        assert_eq!(id.ref_type.as_deref(), Some("branch"));
        assert_eq!(id.environment.as_deref(), Some("prod"));
        assert_eq!(
            id.workflow.as_deref(),
            Some("octo-org/octo-repo/.github/workflows/deploy.yml@refs/heads/main")
        );
        assert_eq!(id.event.as_deref(), Some("workflow_dispatch"));
        assert_eq!(id.actor.as_deref(), Some("octocat"));
        assert_eq!(id.run_id.as_deref(), Some("example-run-id"));
        assert_eq!(id.attempt.as_deref(), Some("2"));
        assert_eq!(id.runner_environment.as_deref(), Some("self-hosted"));
        assert_eq!(
            id.subject.as_deref(),
            Some("repo:octo-org/octo-repo:environment:prod")
        );
        assert_eq!(id.job_id, None);
        assert_eq!(id.source, IdentitySource::Oidc);
        // Raw claims stay whole, empty ones included.
        assert_eq!(id.claims.len(), github_claims().len());
        assert_eq!(id.field("claims.sha").as_deref(), Some("example-sha"));
        assert_eq!(id.field("claims.head_ref").as_deref(), Some(""));
    }

    #[test]
    fn gitlab_claims_map_to_identity_fields() {
        let claims = obj(json!({
            "namespace_id": "72",
            "namespace_path": "my-group",
            "project_id": "20",
            "project_path": "my-group/my-project",
            "user_id": "1",
            "user_login": "sample-user",
            "user_email": "sample-user@example.com",
            "pipeline_id": 574,
            "pipeline_source": "push",
            "job_id": "302",
            "ref": "feature-branch-1",
            "ref_type": "branch",
            "ref_path": "refs/heads/feature-branch-1",
            "ref_protected": "false",
            "environment": "test-environment2",
            "environment_protected": "false",
            "runner_id": 1,
            "runner_environment": "self-hosted",
            "ci_config_ref_uri": "gitlab.example.com/my-group/my-project//.gitlab-ci.yml@refs/heads/main",
            "jti": "235b3a54-b797-45c7-ae9a-f72d7bc6ef5b",
            "iss": "https://gitlab.example.com",
            "iat": 1681395193,
            "nbf": 1681395188,
            "exp": 1681398793,
            "sub": "project_path:my-group/my-project:ref_type:branch:ref:feature-branch-1",
            "aud": "https://vault.example.com"
        }));
        let id = normalise(
            Provider::Gitlab,
            "https://gitlab.example.com",
            IdentitySource::Oidc,
            claims,
        );
        assert_eq!(id.repository.as_deref(), Some("my-group/my-project"));
        assert_eq!(id.owner.as_deref(), Some("my-group"));
        assert_eq!(id.git_ref.as_deref(), Some("refs/heads/feature-branch-1"));
        assert_eq!(id.ref_type.as_deref(), Some("branch"));
        assert_eq!(id.environment.as_deref(), Some("test-environment2"));
        assert_eq!(
            id.workflow.as_deref(),
            Some("gitlab.example.com/my-group/my-project//.gitlab-ci.yml@refs/heads/main")
        );
        assert_eq!(id.event.as_deref(), Some("push"));
        assert_eq!(id.actor.as_deref(), Some("sample-user"));
        assert_eq!(id.run_id.as_deref(), Some("574"), "number becomes text");
        assert_eq!(id.job_id.as_deref(), Some("302"));
        assert_eq!(id.attempt, None);
        // GitLab's runner_environment is not mapped: only GitHub's claim is documented as such.
        assert_eq!(id.runner_environment, None);
        assert_eq!(id.field("claims.ref_protected").as_deref(), Some("false"));
    }

    #[test]
    fn gitlab_tags_become_refs_tags_and_unknown_ref_types_give_no_ref() {
        let tag = normalise(
            Provider::Gitlab,
            "https://gitlab.com",
            IdentitySource::Oidc,
            obj(json!({"ref": "v1.2.0", "ref_type": "tag"})),
        );
        assert_eq!(tag.git_ref.as_deref(), Some("refs/tags/v1.2.0"));
        let unknown = normalise(
            Provider::Gitlab,
            "https://gitlab.com",
            IdentitySource::Oidc,
            obj(json!({"ref": "main"})),
        );
        assert_eq!(unknown.git_ref, None);
        assert_eq!(unknown.field("claims.ref").as_deref(), Some("main"));
    }

    #[test]
    fn buildkite_claims_map_to_identity_fields() {
        let claims = obj(json!({
            "iss": "https://agent.buildkite.com",
            "sub": "organization:acme-inc:pipeline:super-duper-app:ref:refs/heads/main:commit:9f3182061f1e2cca4702c368cbc039b7dc9d4485:step:build",
            "aud": "https://buildkite.com/acme-inc",
            "iat": 1669014898,
            "nbf": 1669014898,
            "exp": 1669015198,
            "organization_slug": "acme-inc",
            "pipeline_slug": "super-duper-app",
            "build_number": 1,
            "build_branch": "main",
            "build_tag": null,
            "build_commit": "9f3182061f1e2cca4702c368cbc039b7dc9d4485",
            "build_source": "ui",
            "step_key": "build",
            "job_id": "0184990a-477b-4fa8-9968-496074483cee",
            "agent_id": "0184990a-4782-42b5-afc1-16715b10b8ff"
        }));
        let id = normalise(
            Provider::Buildkite,
            BUILDKITE_ISSUER,
            IdentitySource::Oidc,
            claims,
        );
        assert_eq!(id.repository.as_deref(), Some("acme-inc/super-duper-app"));
        assert_eq!(id.owner.as_deref(), Some("acme-inc"));
        assert_eq!(id.git_ref.as_deref(), Some("refs/heads/main"));
        assert_eq!(id.ref_type.as_deref(), Some("branch"));
        assert_eq!(id.workflow.as_deref(), Some("super-duper-app"));
        assert_eq!(id.event.as_deref(), Some("ui"));
        assert_eq!(id.run_id.as_deref(), Some("1"));
        assert_eq!(
            id.job_id.as_deref(),
            Some("0184990a-477b-4fa8-9968-496074483cee")
        );
        assert_eq!(id.environment, None);
    }

    #[test]
    fn buildkite_tag_builds_use_the_tag() {
        let id = normalise(
            Provider::Buildkite,
            BUILDKITE_ISSUER,
            IdentitySource::Oidc,
            obj(json!({"organization_slug": "acme", "build_branch": "main", "build_tag": "v2"})),
        );
        assert_eq!(id.git_ref.as_deref(), Some("refs/tags/v2"));
        assert_eq!(id.ref_type.as_deref(), Some("tag"));
        // Without a pipeline the repository is unknown rather than half-filled.
        assert_eq!(id.repository, None);
    }

    #[test]
    fn generic_issuers_only_know_the_subject() {
        let id = normalise(
            Provider::Generic,
            "https://ci.example.com",
            IdentitySource::Oidc,
            obj(json!({"sub": "job:42", "repository": "a/b"})),
        );
        assert_eq!(id.subject.as_deref(), Some("job:42"));
        assert_eq!(id.repository, None);
        assert_eq!(id.field("claims.repository").as_deref(), Some("a/b"));
    }

    #[test]
    fn providers_are_guessed_from_the_issuer_host() {
        assert_eq!(provider_for_issuer(GITHUB_ISSUER), Provider::Github);
        assert_eq!(
            provider_for_issuer("https://token.actions.githubusercontent.com/my-enterprise"),
            Provider::Github
        );
        assert_eq!(
            provider_for_issuer("https://token.actions.githubusercontent.com.evil.example"),
            Provider::Generic
        );
        assert_eq!(provider_for_issuer(BUILDKITE_ISSUER), Provider::Buildkite);
        assert_eq!(provider_for_issuer("https://gitlab.com"), Provider::Gitlab);
        assert_eq!(
            provider_for_issuer("https://GitLab.example.com:8443/"),
            Provider::Gitlab
        );
        assert_eq!(
            provider_for_issuer("https://ci.example.com/gitlab"),
            Provider::Generic,
            "only the host counts"
        );
        assert_eq!(provider_for_issuer("not a url"), Provider::Generic);
    }

    #[test]
    fn attested_claims_are_marked_attested() {
        let mut claims = github_claims();
        claims.insert("provider".into(), json!("github"));
        let id = from_attested(claims).unwrap();
        assert_eq!(id.source, IdentitySource::Attested);
        assert_eq!(id.provider, Provider::Github);
        assert_eq!(id.issuer, "attested:github");
        assert_eq!(id.repository.as_deref(), Some("octo-org/octo-repo"));
        assert!(!id.claims.contains_key("provider"));

        let id = from_attested(obj(json!({
            "provider": "gitlab",
            "issuer": "attested:runner-7",
            "project_path": "g/p",
            "job_id": 99
        })))
        .unwrap();
        assert_eq!(id.issuer, "attested:runner-7");
        assert_eq!(id.repository.as_deref(), Some("g/p"));
        assert_eq!(id.job_id.as_deref(), Some("99"));
    }

    #[test]
    fn attested_claims_are_refused_when_malformed() {
        let err = from_attested(obj(json!({"repository": "a/b"}))).unwrap_err();
        assert!(
            matches!(err, IdentityError::AttestedMissingProvider),
            "{err}"
        );
        assert!(err.to_string().contains("provider"), "{err}");

        let err = from_attested(obj(json!({"provider": "jenkins"}))).unwrap_err();
        assert!(
            matches!(&err, IdentityError::AttestedUnknownProvider(p) if p == "jenkins"),
            "{err}"
        );
        assert!(
            err.to_string().contains("github, gitlab, buildkite"),
            "{err}"
        );

        let err = from_attested(obj(json!({"provider": ["github"]}))).unwrap_err();
        assert!(
            matches!(err, IdentityError::AttestedUnknownProvider(_)),
            "{err}"
        );

        let err = from_attested(obj(json!({"provider": "github", "issuer": 3}))).unwrap_err();
        assert!(matches!(err, IdentityError::AttestedBadIssuer), "{err}");

        let err = from_attested_value(json!(["provider", "github"])).unwrap_err();
        assert!(
            matches!(err, IdentityError::AttestedNotObject("array")),
            "{err}"
        );

        let big = "x".repeat(MAX_ATTESTED_BYTES);
        let err = from_attested(obj(json!({"provider": "github", "actor": big}))).unwrap_err();
        assert!(
            matches!(
                err,
                IdentityError::AttestedTooLarge {
                    max: MAX_ATTESTED_BYTES,
                    ..
                }
            ),
            "{err}"
        );
        // Just under the cap is fine.
        let fits = "x".repeat(MAX_ATTESTED_BYTES - 100);
        from_attested(obj(json!({"provider": "github", "actor": fits}))).unwrap();
    }
}
