//! What-if evaluation: claims decided as if an issuer had verified them, and tables of such
//! cases (`airlock policy test CASES.toml`) that a policy repository's CI can gate on.
//!
//! This module owns the cases file format and the comparison of a decision with what a case
//! expects. Like deciding, it is pure: text and the time in, results out. It never checks a
//! signature and never claims to: every identity it builds is a what-if, and the CLI says so.

use super::{Decision, PolicySet, TrustedIssuer};
use crate::config::line_col;
use crate::identity::{self, IdentitySource, JobIdentity};
use serde::Deserialize;
use serde_json::{Map, Value};
use serde_spanned::Spanned;
use std::path::Path;

/// What `--expect refused` and `expect = "refused"` are written as.
pub const REFUSED: &str = "refused";

/// The one configured issuer `wanted` names: its exact `iss`, or a provider (`github`) that
/// exactly one configured issuer has.
pub fn resolve_issuer<'a>(
    issuers: &'a [TrustedIssuer],
    wanted: &str,
) -> Result<&'a TrustedIssuer, String> {
    if let Some(i) = issuers.iter().find(|i| i.issuer == wanted) {
        return Ok(i);
    }
    let list = || {
        if issuers.is_empty() {
            "none".to_string()
        } else {
            issuers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    if let Some(p) = identity::Provider::from_name(wanted) {
        let of: Vec<&TrustedIssuer> = issuers.iter().filter(|i| i.provider == p).collect();
        return match of.as_slice() {
            [one] => Ok(one),
            [] => Err(format!(
                "no configured issuer is of provider {wanted:?} (configured: {})",
                list()
            )),
            _ => Err(format!(
                "{} configured issuers are of provider {wanted:?}; name one by its URL (configured: {})",
                of.len(),
                list()
            )),
        };
    }
    Err(format!(
        "issuer {wanted:?} is not configured (configured: {}); give one of them, or a provider name",
        list()
    ))
}

/// The identity a token of `issuer` with these claims would give once verified: what the
/// verifier builds, without the verifying. For what-ifs only.
pub fn as_verified(issuer: &TrustedIssuer, claims: Map<String, Value>) -> JobIdentity {
    identity::normalise(
        issuer.provider,
        &issuer.issuer,
        IdentitySource::Oidc,
        claims,
    )
}

/// Whether `decision` is what `expect` (a rule name, or [`REFUSED`]) says: a rule name is met
/// only by a grant of that rule, `refused` by any refusal. `Err` says what happened instead.
pub fn check_expect(decision: &Decision, expect: &str) -> Result<(), String> {
    let got = outcome(decision);
    let met = if expect == REFUSED {
        decision.is_refused()
    } else {
        !decision.is_refused() && decision.rule.as_deref() == Some(expect)
    };
    if met {
        Ok(())
    } else {
        let wanted = if expect == REFUSED {
            "a refusal".to_string()
        } else {
            format!("rule {expect} to grant")
        };
        Err(format!("expected {wanted}, got {got}"))
    }
}

/// A decision in one line: `rule R grants a, b` or `refused (rule R): why`.
pub fn outcome(d: &Decision) -> String {
    match (&d.refused, &d.rule) {
        (Some(why), Some(rule)) => format!("refused by rule {rule}: {why}"),
        (Some(why), None) => format!("refused: {why}"),
        (None, Some(rule)) => format!(
            "rule {rule} granting {}",
            d.grants
                .iter()
                .map(|g| g.alias.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        (None, None) => "nothing".to_string(),
    }
}

/// A cases file, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCases {
    #[serde(default)]
    case: Vec<Spanned<RawCase>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    /// A configured issuer's URL or a provider name; not with `attested = true`.
    issuer: Option<Spanned<String>>,
    /// Runner-attested claims (with a `provider` claim) instead of a token's.
    #[serde(default)]
    attested: bool,
    claims: Spanned<toml::Table>,
    expect: Spanned<String>,
    /// Exactly these grants, by alias or role ARN, in any order.
    grants: Option<Vec<String>>,
    /// Text the refusal reason must contain (with `expect = "refused"`).
    reason: Option<String>,
    /// The time to decide at (RFC 3339), for rules with windows; default: now.
    at: Option<Spanned<String>>,
}

/// One checked case.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    /// `<file>:<line>:<column>` of its `[[case]]`.
    pub origin: String,
    pub identity: JobIdentity,
    pub expect: String,
    pub grants: Option<Vec<String>>,
    pub reason: Option<String>,
    pub at: Option<time::OffsetDateTime>,
}

/// A case's result: `Ok` with the outcome, or `Err` with what differs.
#[derive(Debug)]
pub struct CaseResult<'a> {
    pub case: &'a Case,
    pub outcome: Result<String, Vec<String>>,
}

/// Reads a cases file against the configured issuers. Every error is reported, each as
/// `<file>:<line>:<column>: …`.
pub fn parse_cases(
    path: &Path,
    text: &str,
    issuers: &[TrustedIssuer],
) -> Result<Vec<Case>, Vec<String>> {
    let at = |span: std::ops::Range<usize>| {
        let (l, c) = line_col(text, span.start);
        format!("{}:{l}:{c}", path.display())
    };
    let raw: RawCases = toml::from_str(text).map_err(|e| {
        vec![format!(
            "{}: {}",
            at(e.span().unwrap_or(0..0)),
            e.message().trim_end()
        )]
    })?;
    let mut cases = Vec::new();
    let mut errors = Vec::new();
    if raw.case.is_empty() {
        errors.push(format!(
            "{}: no [[case]]; write at least one (name, issuer, expect, [case.claims])",
            at(0..0)
        ));
    }
    for c in raw.case {
        let origin = at(c.span());
        let c = c.into_inner();
        let claims = match serde_json::to_value(c.claims.get_ref()) {
            Ok(Value::Object(m)) => m,
            _ => {
                errors.push(format!(
                    "{}: case {:?}: claims cannot be read as JSON claims",
                    at(c.claims.span()),
                    c.name
                ));
                continue;
            }
        };
        let identity = match (&c.issuer, c.attested) {
            (Some(i), true) => {
                errors.push(format!(
                    "{}: case {:?}: attested = true takes no issuer (attested claims have none); remove one",
                    at(i.span()),
                    c.name
                ));
                continue;
            }
            (None, true) => match identity::from_attested(claims) {
                Ok(id) => id,
                Err(e) => {
                    errors.push(format!("{}: case {:?}: {e}", at(c.claims.span()), c.name));
                    continue;
                }
            },
            (Some(i), false) => match resolve_issuer(issuers, i.get_ref()) {
                Ok(iss) => as_verified(iss, claims),
                Err(e) => {
                    errors.push(format!("{}: case {:?}: {e}", at(i.span()), c.name));
                    continue;
                }
            },
            (None, false) => {
                errors.push(format!(
                    "{origin}: case {:?}: say whose token the claims are: issuer = \"<configured issuer or provider>\", or attested = true",
                    c.name
                ));
                continue;
            }
        };
        if c.expect.get_ref().trim().is_empty() {
            errors.push(format!(
                "{}: case {:?}: expect is empty; write a rule name or \"refused\"",
                at(c.expect.span()),
                c.name
            ));
            continue;
        }
        if c.reason.is_some() && c.expect.get_ref() != REFUSED {
            errors.push(format!(
                "{}: case {:?}: reason is for expect = \"refused\" only",
                at(c.expect.span()),
                c.name
            ));
            continue;
        }
        if c.grants.is_some() && c.expect.get_ref() == REFUSED {
            errors.push(format!(
                "{}: case {:?}: a refused job has no grants; remove grants",
                at(c.expect.span()),
                c.name
            ));
            continue;
        }
        let when = match &c.at {
            None => None,
            Some(s) => match time::OffsetDateTime::parse(
                s.get_ref(),
                &time::format_description::well_known::Rfc3339,
            ) {
                Ok(t) => Some(t),
                Err(e) => {
                    errors.push(format!(
                        "{}: case {:?}: at {:?} is not an RFC 3339 time (e.g. 2026-12-01T10:00:00Z): {e}",
                        at(s.span()),
                        c.name,
                        s.get_ref()
                    ));
                    continue;
                }
            },
        };
        if let Some(first) = cases.iter().find(|k: &&Case| k.name == c.name) {
            errors.push(format!(
                "{origin}: case name {:?} is already used at {}; names must be unique",
                c.name, first.origin
            ));
            continue;
        }
        cases.push(Case {
            name: c.name,
            origin,
            identity,
            expect: c.expect.into_inner(),
            grants: c.grants,
            reason: c.reason,
            at: when,
        });
    }
    if errors.is_empty() {
        Ok(cases)
    } else {
        Err(errors)
    }
}

/// Decides every case at its `at` (or `now`) and compares.
pub fn run_cases<'a>(
    policies: &PolicySet,
    cases: &'a [Case],
    now: time::OffsetDateTime,
) -> Vec<CaseResult<'a>> {
    cases
        .iter()
        .map(|case| {
            let d = policies.decide(&case.identity, case.at.unwrap_or(now));
            let mut diffs = Vec::new();
            if case.expect != REFUSED && policies.rule(&case.expect).is_none() {
                diffs.push(format!(
                    "expect names rule {:?}, which the policies do not have; got {}",
                    case.expect,
                    outcome(&d)
                ));
            }
            if diffs.is_empty() {
                if let Err(e) = check_expect(&d, &case.expect) {
                    diffs.push(e);
                }
            }
            if let (Some(want), Some(why)) = (&case.reason, &d.refused) {
                if !why.contains(want.as_str()) {
                    diffs.push(format!("refusal reason {why:?} does not contain {want:?}"));
                }
            }
            if let Some(want) = &case.grants {
                if !d.is_refused() {
                    let named =
                        |w: &String| d.grants.iter().any(|g| &g.alias == w || &g.role_arn == w);
                    let missing: Vec<&String> = want.iter().filter(|w| !named(w)).collect();
                    let extra: Vec<&str> = d
                        .grants
                        .iter()
                        .filter(|g| !want.iter().any(|w| w == &g.alias || w == &g.role_arn))
                        .map(|g| g.alias.as_str())
                        .collect();
                    if !missing.is_empty() {
                        diffs.push(format!("expected grants not granted: {missing:?}"));
                    }
                    if !extra.is_empty() {
                        diffs.push(format!("granted but not expected: {extra:?}"));
                    }
                }
            }
            CaseResult {
                case,
                outcome: if diffs.is_empty() {
                    Ok(outcome(&d))
                } else {
                    Err(diffs)
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load_str;

    const POLICY: &str = r#"
[[rule]]
name = "deploy"
[rule.match]
provider = "github"
repository = "acme/web"
ref = "refs/heads/main"
[[rule.grant]]
alias = "deploy"
role_arn = "arn:aws:iam::123456789012:role/deploy"
"#;

    fn issuers() -> Vec<TrustedIssuer> {
        TrustedIssuer::well_known()
    }

    #[test]
    fn issuers_resolve_by_url_or_by_a_provider_only_one_has() {
        let i = issuers();
        assert_eq!(
            resolve_issuer(&i, "github").unwrap().issuer,
            "https://token.actions.githubusercontent.com"
        );
        assert_eq!(
            resolve_issuer(&i, "https://gitlab.com").unwrap().issuer,
            "https://gitlab.com"
        );
        let e = resolve_issuer(&i, "https://evil.example").unwrap_err();
        assert!(
            e.contains("not configured") && e.contains("gitlab.com"),
            "{e}"
        );
    }

    #[test]
    fn cases_pass_fail_and_name_their_place() {
        let set = load_str(Path::new("p.toml"), POLICY).unwrap();
        let text = r#"
[[case]]
name = "main deploys"
issuer = "github"
expect = "deploy"
grants = ["arn:aws:iam::123456789012:role/deploy"]
claims = { repository = "acme/web", ref = "refs/heads/main" }

[[case]]
name = "a branch is refused"
issuer = "github"
expect = "refused"
reason = "no policy rule matches"
claims = { repository = "acme/web", ref = "refs/heads/x" }

[[case]]
name = "wrong on purpose"
issuer = "github"
expect = "refused"
claims = { repository = "acme/web", ref = "refs/heads/main" }
"#;
        let cases = parse_cases(Path::new("c.toml"), text, &issuers()).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let results = run_cases(&set, &cases, now);
        assert!(results[0].outcome.is_ok(), "{:?}", results[0].outcome);
        assert!(results[1].outcome.is_ok(), "{:?}", results[1].outcome);
        let diff = results[2].outcome.as_ref().unwrap_err().join("; ");
        assert!(
            diff.contains("expected a refusal, got rule deploy granting deploy"),
            "{diff}"
        );
        assert_eq!(results[2].case.origin, "c.toml:16:1");

        let bad =
            "[[case]]\nname = \"x\"\nissuer = \"https://nope\"\nexpect = \"deploy\"\nclaims = {}\n\
                   [[case]]\nname = \"y\"\nexpect = \"deploy\"\nclaims = {}\n";
        let errs = parse_cases(Path::new("c.toml"), bad, &issuers()).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("c.toml:3:10: ") && errs[0].contains("not configured"));
        assert!(errs[1].starts_with("c.toml:6:1: ") && errs[1].contains("attested = true"));
    }
}
