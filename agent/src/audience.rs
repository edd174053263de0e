//! Which audience a CI integration asks its provider to put in the job's OIDC token.
//!
//! The agent trusts, per `[[issuer]]`, a list of audiences; the runner-side hooks (GitHub's
//! job-started, Buildkite's command hook, the GitHub supervisor) must request one of them.
//! Instead of each side guessing, the hooks ask the agent (`GET /v1/issuers` on the control
//! socket, answered with [`IssuersAnswer`]) and pick with [`choose`]; `airlockd --check`
//! runs the same choice on the configuration ([`check`]) so a mismatch is found before a job
//! is refused with `WrongAudience`.
//!
//! This module owns the choice and its messages. It does no I/O and never sees a token.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Config, IssuerConfig};
use crate::identity::Provider;

/// The one audience airlock's integrations request and the shipped configuration trusts.
pub const DEFAULT_AUDIENCE: &str = "airlock";

/// The audience of AWS's own web-identity federation (`AssumeRoleWithWebIdentity`, e.g.
/// `aws-actions/configure-aws-credentials`). Trusting it lets a token minted for AWS be
/// replayed at airlock: see docs/identity.md, "Why a dedicated audience".
pub const AWS_STS_AUDIENCE: &str = "sts.amazonaws.com";

/// One trusted issuer as the control socket describes it: nothing secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuerInfo {
    pub issuer: String,
    pub provider: Provider,
    pub audiences: Vec<String>,
}

/// `GET /v1/issuers`: the agent's configuration file and the issuers it trusts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuersAnswer {
    /// The configuration file the issuers come from (named in messages: where to change).
    pub config: PathBuf,
    pub issuers: Vec<IssuerInfo>,
}

impl IssuerInfo {
    pub fn from_config(iss: &IssuerConfig) -> IssuerInfo {
        IssuerInfo {
            issuer: iss.issuer.clone(),
            provider: iss
                .provider
                .unwrap_or_else(|| crate::identity::claims::provider_for_issuer(&iss.issuer)),
            audiences: iss.audiences.clone(),
        }
    }
}

impl IssuersAnswer {
    pub fn from_config(cfg: &Config) -> IssuersAnswer {
        IssuersAnswer {
            config: cfg.source.clone(),
            issuers: cfg.issuers.iter().map(IssuerInfo::from_config).collect(),
        }
    }
}

/// Why no audience can be requested; `Display` is the message an operator or a workflow
/// author reads, with what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AudienceError {
    #[error(
        "airlockd ({config}) trusts no {provider} issuer: add an [[issuer]] with provider = \"{provider}\" and audiences = [\"{DEFAULT_AUDIENCE}\"] to {config}",
        config = .config.display(),
        provider = .provider.as_str()
    )]
    NoIssuer { config: PathBuf, provider: Provider },
    #[error(
        "the {provider} issuers of {config} ({issuers}) share no audience, and a hook cannot tell which of them will sign the job's token: give each of them the audience \"{DEFAULT_AUDIENCE}\"",
        config = .config.display(),
        provider = .provider.as_str(),
        issuers = .issuers.join(", ")
    )]
    NoCommon {
        config: PathBuf,
        provider: Provider,
        issuers: Vec<String>,
    },
    #[error(
        "the audience {wanted:?} ({source_of}) is not trusted for {provider} by airlockd: {config} trusts {trusted:?}; remove that setting to use a trusted one, or add {wanted:?} to the audiences of the {provider} [[issuer]] in {config}",
        config = .config.display(),
        provider = .provider.as_str()
    )]
    NotTrusted {
        config: PathBuf,
        provider: Provider,
        wanted: String,
        /// Where the unwanted audience came from, e.g. "`audience` in github-runners.toml".
        source_of: String,
        trusted: Vec<String>,
    },
}

/// The audiences every `provider` issuer in `answer` trusts, in the first issuer's order
/// (a hook cannot know which of several issuers of one provider signs the token).
fn common(answer: &IssuersAnswer, provider: Provider) -> Result<Vec<String>, AudienceError> {
    let mut of = answer.issuers.iter().filter(|i| i.provider == provider);
    let Some(first) = of.next() else {
        return Err(AudienceError::NoIssuer {
            config: answer.config.clone(),
            provider,
        });
    };
    let mut shared = first.audiences.clone();
    for other in of {
        shared.retain(|a| other.audiences.contains(a));
    }
    if shared.is_empty() {
        return Err(AudienceError::NoCommon {
            config: answer.config.clone(),
            provider,
            issuers: answer
                .issuers
                .iter()
                .filter(|i| i.provider == provider)
                .map(|i| i.issuer.clone())
                .collect(),
        });
    }
    Ok(shared)
}

/// The audience to request for a `provider` job: the operator's explicit `wanted` (with
/// where it was set, for the message) if the agent trusts it; otherwise
/// [`DEFAULT_AUDIENCE`] if trusted; otherwise the first audience the agent lists.
pub fn choose(
    answer: &IssuersAnswer,
    provider: Provider,
    wanted: Option<(&str, &str)>,
) -> Result<String, AudienceError> {
    let trusted = common(answer, provider)?;
    if let Some((wanted, source_of)) = wanted {
        return if trusted.iter().any(|a| a == wanted) {
            Ok(wanted.to_string())
        } else {
            Err(AudienceError::NotTrusted {
                config: answer.config.clone(),
                provider,
                wanted: wanted.to_string(),
                source_of: source_of.to_string(),
                trusted,
            })
        };
    }
    if trusted.iter().any(|a| a == DEFAULT_AUDIENCE) {
        return Ok(DEFAULT_AUDIENCE.to_string());
    }
    Ok(trusted[0].clone())
}

/// What `airlockd --check` finds about audiences: errors (the hooks could not request a
/// trusted audience) and warnings (a trusted audience that also opens the agent to tokens
/// minted for something else).
#[derive(Debug, Default)]
pub struct Findings {
    pub errors: Vec<AudienceError>,
    pub warnings: Vec<String>,
}

/// Check the configuration's issuers as the hooks will use them. `github_audience` is the
/// GitHub supervisor's `audience` setting with the file it comes from, when there is one.
pub fn check(answer: &IssuersAnswer, github_audience: Option<(&str, &Path)>) -> Findings {
    let mut f = Findings::default();
    for provider in [Provider::Github, Provider::Buildkite] {
        if !answer.issuers.iter().any(|i| i.provider == provider) {
            continue;
        }
        let wanted = match (provider, github_audience) {
            (Provider::Github, Some((aud, file))) => {
                Some((aud, format!("`audience` in {}", file.display())))
            }
            _ => None,
        };
        let wanted = wanted.as_ref().map(|(a, s)| (*a, s.as_str()));
        if let Err(e) = choose(answer, provider, wanted) {
            f.errors.push(e);
        }
    }
    for i in &answer.issuers {
        if i.audiences.iter().any(|a| a == AWS_STS_AUDIENCE) {
            f.warnings.push(format!(
                "[[issuer]] {} in {} trusts the audience \"{AWS_STS_AUDIENCE}\": tokens a job requests for AWS's own web-identity federation are then accepted by airlock too (docs/identity.md, \"Why a dedicated audience\"); prefer \"{DEFAULT_AUDIENCE}\"",
                i.issuer,
                answer.config.display()
            ));
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(issuers: &[(&str, Provider, &[&str])]) -> IssuersAnswer {
        IssuersAnswer {
            config: PathBuf::from("/etc/airlock/airlock.toml"),
            issuers: issuers
                .iter()
                .map(|(i, p, a)| IssuerInfo {
                    issuer: i.to_string(),
                    provider: *p,
                    audiences: a.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
        }
    }

    const GH: &str = "https://token.actions.githubusercontent.com";
    const BK: &str = "https://agent.buildkite.com";

    #[test]
    fn the_default_audience_is_preferred_when_trusted() {
        let a = answer(&[(GH, Provider::Github, &["other", "airlock"])]);
        assert_eq!(choose(&a, Provider::Github, None).unwrap(), "airlock");
    }

    #[test]
    fn without_the_default_the_agents_first_audience_is_asked_for() {
        let a = answer(&[(GH, Provider::Github, &["corp-ci", "x"])]);
        assert_eq!(choose(&a, Provider::Github, None).unwrap(), "corp-ci");
    }

    #[test]
    fn an_explicit_audience_must_be_trusted_and_the_refusal_says_where_to_change_it() {
        let a = answer(&[(GH, Provider::Github, &["airlock"])]);
        assert_eq!(
            choose(
                &a,
                Provider::Github,
                Some(("airlock", "AIRLOCK_OIDC_AUDIENCE"))
            )
            .unwrap(),
            "airlock"
        );
        let e = choose(
            &a,
            Provider::Github,
            Some(("sts.amazonaws.com", "AIRLOCK_OIDC_AUDIENCE")),
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(m.contains("\"sts.amazonaws.com\""), "{m}");
        assert!(m.contains("AIRLOCK_OIDC_AUDIENCE"), "{m}");
        assert!(m.contains("/etc/airlock/airlock.toml"), "{m}");
        assert!(m.contains("[\"airlock\"]"), "{m}");
    }

    #[test]
    fn issuers_of_one_provider_must_share_an_audience() {
        let a = answer(&[
            (GH, Provider::Github, &["a", "b"]),
            (
                "https://ghes.example.com/_services/token",
                Provider::Github,
                &["b"],
            ),
        ]);
        assert_eq!(choose(&a, Provider::Github, None).unwrap(), "b");
        let a = answer(&[
            (GH, Provider::Github, &["a"]),
            (
                "https://ghes.example.com/_services/token",
                Provider::Github,
                &["b"],
            ),
        ]);
        let m = choose(&a, Provider::Github, None).unwrap_err().to_string();
        assert!(
            m.contains("share no audience") && m.contains("ghes.example.com"),
            "{m}"
        );
    }

    #[test]
    fn no_issuer_of_the_provider_is_an_error_naming_the_file() {
        let a = answer(&[(GH, Provider::Github, &["airlock"])]);
        let m = choose(&a, Provider::Buildkite, None)
            .unwrap_err()
            .to_string();
        assert!(m.contains("no buildkite issuer"), "{m}");
        assert!(m.contains("/etc/airlock/airlock.toml"), "{m}");
    }

    #[test]
    fn check_refuses_a_supervisor_audience_the_issuer_does_not_trust() {
        let a = answer(&[
            (GH, Provider::Github, &["airlock"]),
            (BK, Provider::Buildkite, &["airlock"]),
        ]);
        let sup = Path::new("/etc/airlock/github-runners.toml");
        assert!(check(&a, Some(("airlock", sup))).errors.is_empty());
        let f = check(&a, Some(("corp", sup)));
        assert_eq!(f.errors.len(), 1);
        let m = f.errors[0].to_string();
        assert!(m.contains("/etc/airlock/github-runners.toml"), "{m}");
        assert!(m.contains("\"corp\""), "{m}");
    }

    #[test]
    fn check_warns_about_the_aws_audience_only_where_it_is_trusted() {
        let a = answer(&[(GH, Provider::Github, &["airlock"])]);
        assert!(check(&a, None).warnings.is_empty());
        let a = answer(&[(GH, Provider::Github, &["airlock", "sts.amazonaws.com"])]);
        let f = check(&a, None);
        assert!(f.errors.is_empty());
        assert_eq!(f.warnings.len(), 1);
        assert!(
            f.warnings[0].contains("docs/identity.md"),
            "{}",
            f.warnings[0]
        );
    }

    #[test]
    fn the_shipped_configuration_trusts_the_default_audience_and_not_aws() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/airlock.toml");
        let cfg = Config::load(&path).unwrap();
        let a = IssuersAnswer::from_config(&cfg);
        assert_eq!(
            choose(&a, Provider::Github, None).unwrap(),
            DEFAULT_AUDIENCE
        );
        let f = check(&a, None);
        assert!(f.errors.is_empty() && f.warnings.is_empty(), "{f:?}");
        assert!(a
            .issuers
            .iter()
            .all(|i| !i.audiences.iter().any(|x| x == AWS_STS_AUDIENCE)));
    }
}
