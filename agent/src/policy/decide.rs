//! Deciding: a job's identity and the time in, a [`Decision`] (or an [`Explanation`]) out.
//!
//! This module owns the matching semantics: the first rule whose scope and `match` match
//! decides, with no fall-through to later rules. A rule's issuer scope is checked before
//! any of its keys, so a token of another issuer never matches it, whatever its names. It
//! must never do I/O, read the clock or log: the caller passes `now` and records the
//! decision.

use super::{
    EgressPolicy, IssuerScope, Matcher, Method, Origin, OutsideWindow, PolicySet, Rule,
    RuleSandbox, FLAG_OUTSIDE_WINDOW,
};
use crate::identity::{IdentitySource, JobIdentity, Provider};
use serde::Serialize;

/// What a job gets. `refused.is_some()` implies `grants.is_empty()`; otherwise the default
/// grant is `grants[0]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The rule that decided; `None` when no rule matched.
    pub rule: Option<String>,
    pub origin: Option<Origin>,
    pub grants: Vec<super::Grant>,
    /// Why the job gets nothing (for the job's error message and the audit log).
    pub refused: Option<String>,
    /// Granted, but worth noting (e.g. [`FLAG_OUTSIDE_WINDOW`]).
    pub flags: Vec<String>,
}

impl Decision {
    fn refuse(rule: &Rule, reason: String) -> Decision {
        Decision {
            rule: Some(rule.name.clone()),
            origin: Some(rule.origin.clone()),
            grants: Vec::new(),
            refused: Some(reason),
            flags: Vec::new(),
        }
    }

    pub fn is_refused(&self) -> bool {
        self.refused.is_some()
    }
}

/// `airlock policy explain`: the decision and how every rule saw the job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    pub decision: Decision,
    pub rules: Vec<RuleVerdict>,
    /// The granting rule's `[rule.sandbox]` settings. `None` when the job is refused or its
    /// rule sets none: its sandbox is then built from the agent's `[sandbox]` defaults.
    pub sandbox: Option<RuleSandbox>,
    /// The granting rule's `[rule.egress]` merged with the baseline (entries marked
    /// `baseline`). `None` when the job is refused or its rule has no `[rule.egress]`.
    pub egress: Option<EgressPolicy>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleVerdict {
    pub rule: String,
    pub origin: Origin,
    /// The one issuer whose identities the rule may match.
    pub scope: IssuerScope,
    /// Whether attested identities are refused (`require_oidc`, the default); `false`: the
    /// rule also matches runner-attested identities of its scope's provider.
    pub require_oidc: bool,
    /// The rule's immutable-id pins, as written (`repository_owner_id = "500001"`).
    pub id_pins: Vec<String>,
    /// Whether the rule's scope and `match` table match the job (whether or not it
    /// decided).
    pub matched: bool,
    /// First whether the job is of the rule's issuer; then why it does not match (every
    /// failing key), or what it decided.
    pub reasons: Vec<String>,
}

impl PolicySet {
    pub fn decide(&self, id: &JobIdentity, now: time::OffsetDateTime) -> Decision {
        match self
            .rules
            .iter()
            .find(|r| mismatches(r, id, false).is_empty())
        {
            Some(rule)
                if rule.scope.provider == Provider::Buildkite
                    && !super::load::pins_buildkite_org(&rule.matchers) =>
            {
                org_not_pinned(rule, id)
            }
            Some(rule) => decide_rule(rule, id, now),
            None => no_match(self, id),
        }
    }

    pub fn explain(&self, id: &JobIdentity, now: time::OffsetDateTime) -> Explanation {
        let decision = self.decide(id, now);
        let mut decided = false;
        let rules = self
            .rules
            .iter()
            .map(|rule| {
                let scope = rule.scope.check(id);
                let reasons = mismatches(rule, id, true);
                let matched = reasons.is_empty();
                let mut reasons = if !matched {
                    reasons
                } else if decided {
                    vec![format!(
                        "matches, but rule {:?} came first and decided",
                        decision.rule.as_deref().unwrap_or("")
                    )]
                } else {
                    decided = true;
                    let keys: Vec<&str> = rule.matchers.iter().map(|m| m.field.as_str()).collect();
                    let what = if keys.is_empty() {
                        "matches every job (empty match table)".to_string()
                    } else {
                        format!("matches on {}", keys.join(", "))
                    };
                    let outcome = match &decision.refused {
                        Some(why) => format!("decides: refused: {why}"),
                        None => {
                            let aliases: Vec<&str> =
                                decision.grants.iter().map(|g| g.alias.as_str()).collect();
                            format!("decides: grants {}", aliases.join(", "))
                        }
                    };
                    vec![what, outcome]
                };
                // Out of scope, the scope's refusal is already the one reason.
                if let Ok(why) = scope {
                    reasons.insert(0, why);
                }
                RuleVerdict {
                    rule: rule.name.clone(),
                    origin: rule.origin.clone(),
                    scope: rule.scope.clone(),
                    require_oidc: rule.require_oidc,
                    id_pins: rule
                        .matchers
                        .iter()
                        .filter(|m| m.id_pin)
                        .map(Matcher::written)
                        .collect(),
                    matched,
                    reasons,
                }
            })
            .collect();
        let granting = decision.rule.as_deref().filter(|_| !decision.is_refused());
        let sandbox = granting
            .and_then(|name| self.rule(name))
            .and_then(|rule| rule.sandbox.clone());
        let egress = granting.and_then(|name| self.egress_for(name));
        Explanation {
            decision,
            rules,
            sandbox,
            egress,
        }
    }
}

fn no_match(set: &PolicySet, id: &JobIdentity) -> Decision {
    let hint = if set.rules.is_empty() {
        " (no policy rules are loaded)"
    } else {
        ""
    };
    Decision {
        rule: None,
        origin: None,
        grants: Vec::new(),
        refused: Some(format!("no policy rule matches {}{hint}", id.summary())),
        flags: Vec::new(),
    }
}

/// The flag of a Buildkite job's refusal by a rule that does not pin its organisation.
pub const FLAG_ORG_NOT_PINNED: &str = "buildkite-org-not-pinned";

/// A Buildkite job decided by a rule that could match any Buildkite organisation (they all
/// share one issuer): refused, naming the rule and what to add. `airlock policy check`
/// warns about such rules at load.
fn org_not_pinned(rule: &Rule, id: &JobIdentity) -> Decision {
    let org = id.owner.as_deref().unwrap_or("your-org");
    let mut d = Decision::refuse(
        rule,
        format!(
            "rule {:?} ({}) matches Buildkite jobs of any organisation: every Buildkite \
             organisation shares one issuer, so a rule must pin yours; add owner = {org:?} \
             (or repository = \"{org}/<pipeline>\", or organization_id = \"<its id>\") to its [rule.match] (this job's \
             organisation is {org:?})",
            rule.name, rule.origin
        ),
    );
    d.flags.push(FLAG_ORG_NOT_PINNED.to_string());
    d
}

fn decide_rule(rule: &Rule, id: &JobIdentity, now: time::OffsetDateTime) -> Decision {
    let attested = id.source == IdentitySource::Attested;
    if rule.require_oidc && attested {
        return Decision::refuse(
            rule,
            format!(
                "rule {:?} ({}) requires a verified OIDC identity and this job's identity is runner-attested; \
                 start the job with its CI OIDC token",
                rule.name, rule.origin
            ),
        );
    }
    let mut flags = Vec::new();
    if !rule.windows.is_empty() && !rule.windows.iter().any(|w| w.is_open(now)) {
        match rule.outside_window {
            OutsideWindow::Refuse => {
                let windows: Vec<String> = rule.windows.iter().map(ToString::to_string).collect();
                return Decision::refuse(
                    rule,
                    format!(
                        "rule {:?} ({}) grants only inside its windows ({}) and it is now {}",
                        rule.name,
                        rule.origin,
                        windows.join("; "),
                        utc_minute(now)
                    ),
                );
            }
            OutsideWindow::Flag => flags.push(FLAG_OUTSIDE_WINDOW.to_string()),
        }
    }
    if attested {
        if let Some(g) = rule.grants.iter().find(|g| g.method == Method::WebIdentity) {
            return Decision::refuse(
                rule,
                format!(
                    "rule {:?} ({}) grant {:?} uses via = \"web-identity\", which needs the job's OIDC token, \
                     and this job's identity is runner-attested",
                    rule.name, rule.origin, g.alias
                ),
            );
        }
    }
    Decision {
        rule: Some(rule.name.clone()),
        origin: Some(rule.origin.clone()),
        grants: rule.grants.clone(),
        refused: None,
        flags,
    }
}

/// `Saturday 23:00 UTC`: what a window check looked at, without the sub-second noise.
fn utc_minute(now: time::OffsetDateTime) -> String {
    let t = now.to_offset(time::UtcOffset::UTC);
    format!("{} {:02}:{:02} UTC", t.weekday(), t.hour(), t.minute())
}

/// Why `rule` does not match `id`: empty when it matches. The issuer scope comes first, and
/// an identity outside it gets that one reason: no other key is compared. With `all`
/// false, stops at the first reason (deciding needs only yes/no).
fn mismatches(rule: &Rule, id: &JobIdentity, all: bool) -> Vec<String> {
    if let Err(why) = rule.scope.check(id) {
        return vec![why];
    }
    let mut out = Vec::new();
    // Id pins hold for verified tokens only. A rule with one requires OIDC (checked at
    // load), so it refuses an attested identity it matches; skipping the pins keeps that
    // refusal final rather than letting production-shaped attested claims without ids
    // fall through to a later rule.
    let attested = id.source == IdentitySource::Attested;
    for m in rule.matchers.iter().filter(|m| !(attested && m.id_pin)) {
        if let Some(reason) = mismatch(m, id) {
            out.push(reason);
            if !all {
                break;
            }
        }
    }
    out
}

fn mismatch(m: &Matcher, id: &JobIdentity) -> Option<String> {
    let Some(value) = m.value(id) else {
        return Some(format!("{}: the job has none", m.field));
    };
    if m.matches(&value) {
        return None;
    }
    let patterns: Vec<String> = m
        .patterns
        .iter()
        .map(|p| format!("{:?}", p.as_str()))
        .collect();
    if m.id_pin {
        return Some(format!(
            "{} {value:?} is not the pinned id {}: an id stays with its owner when a name is renamed or re-registered",
            m.field,
            patterns.join(" or ")
        ));
    }
    Some(if patterns.len() == 1 {
        format!("{} {value:?} does not match {}", m.field, patterns[0])
    } else {
        format!(
            "{} {value:?} does not match any of {}",
            m.field,
            patterns.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Provider;
    use crate::policy::{load_dir_with, load_str, TrustedIssuer};
    use std::path::Path;
    use time::macros::datetime;

    /// A Wednesday inside the shipped production window, and a Saturday outside it.
    const WEEKDAY: time::OffsetDateTime = datetime!(2025-06-11 10:00 UTC);
    const SATURDAY: time::OffsetDateTime = datetime!(2025-06-14 23:00 UTC);

    fn shipped() -> PolicySet {
        load_dir_with(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies"),
            &TrustedIssuer::well_known(),
        )
        .unwrap()
    }

    fn github(repo: &str, git_ref: &str, env: Option<&str>, event: &str) -> JobIdentity {
        let mut claims = serde_json::Map::new();
        claims.insert(
            "job_workflow_ref".into(),
            format!("{repo}/.github/workflows/ci.yml@{git_ref}").into(),
        );
        // The ids the shipped policies pin for acme/web.
        claims.insert("repository_id".into(), "700001".into());
        claims.insert("repository_owner_id".into(), "500001".into());
        JobIdentity {
            source: IdentitySource::Oidc,
            provider: Provider::Github,
            issuer: "https://token.actions.githubusercontent.com".into(),
            subject: Some(format!("repo:{repo}:ref:{git_ref}")),
            repository: Some(repo.into()),
            owner: repo.split('/').next().map(str::to_string),
            git_ref: Some(git_ref.into()),
            ref_type: Some("branch".into()),
            environment: env.map(str::to_string),
            workflow: None,
            event: Some(event.into()),
            actor: Some("octocat".into()),
            run_id: Some("4242".into()),
            attempt: Some("1".into()),
            job_id: None,
            runner_environment: Some("self-hosted".into()),
            claims,
        }
    }

    fn aliases(d: &Decision) -> Vec<(&str, &str)> {
        d.grants
            .iter()
            .map(|g| {
                (
                    g.alias.as_str(),
                    g.role_arn.rsplit('/').next().unwrap_or(""),
                )
            })
            .collect()
    }

    #[test]
    fn production_push_gets_deploy_first_then_readonly() {
        let d = shipped().decide(
            &github("acme/web", "refs/heads/main", Some("production"), "push"),
            WEEKDAY,
        );
        assert_eq!(d.refused, None);
        assert_eq!(d.rule.as_deref(), Some("web-production"));
        assert_eq!(
            aliases(&d),
            [
                ("deploy", "web-prod-deploy"),
                ("readonly", "web-prod-readonly")
            ]
        );
        assert!(d.grants[0].default && d.flags.is_empty());
        assert!(d.origin.unwrap().file.ends_with("10-production.toml"));
    }

    #[test]
    fn outside_the_window_flag_grants_with_a_flag() {
        let d = shipped().decide(
            &github("acme/web", "refs/heads/main", Some("production"), "push"),
            SATURDAY,
        );
        assert_eq!(d.refused, None);
        assert_eq!(d.flags, [FLAG_OUTSIDE_WINDOW]);
        assert_eq!(d.grants.len(), 2);
    }

    #[test]
    fn outside_the_window_refuse_refuses() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/10-production.toml"),
        )
        .unwrap()
        .replace("outside_window = \"flag\"", "outside_window = \"refuse\"");
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/10-production.toml");
        let set = load_str(&path, &text).unwrap();
        let id = github("acme/web", "refs/heads/main", Some("production"), "push");
        let d = set.decide(&id, SATURDAY);
        assert!(d.grants.is_empty());
        let why = d.refused.unwrap();
        assert!(
            why.contains(
                "grants only inside its windows (mon,tue,wed,thu,fri 06:00-20:00 UTC+00:00) and it is now Saturday 23:00 UTC"
            ),
            "{why}"
        );
        // 05:59 and 20:00 are outside (end is exclusive), 06:00 inside.
        assert!(set
            .decide(&id, datetime!(2025-06-11 05:59 UTC))
            .is_refused());
        assert!(set
            .decide(&id, datetime!(2025-06-11 20:00 UTC))
            .is_refused());
        assert!(!set
            .decide(&id, datetime!(2025-06-11 06:00 UTC))
            .is_refused());
    }

    #[test]
    fn window_utc_offset_shifts_the_day_and_hour() {
        let text = "[[rule]]\nname = \"r\"\noutside_window = \"refuse\"\n[rule.match]\nprovider = \"github\"\n\
                    [[rule.window]]\ndays = [\"mon\"]\nstart = \"00:00\"\nend = \"02:00\"\nutc_offset = \"+02:00\"\n\
                    [[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n";
        let set = load_str(Path::new("p.toml"), text).unwrap();
        let id = github("acme/web", "refs/heads/main", None, "push");
        // Sunday 22:30 UTC is Monday 00:30 at +02:00.
        assert!(!set
            .decide(&id, datetime!(2025-06-15 22:30 UTC))
            .is_refused());
        assert!(set
            .decide(&id, datetime!(2025-06-16 00:30 UTC))
            .is_refused());
    }

    #[test]
    fn staging_gets_staging_and_never_the_production_role() {
        let set = shipped();
        for r in ["refs/heads/main", "refs/heads/feature/login"] {
            let d = set.decide(&github("acme/web", r, Some("staging"), "push"), WEEKDAY);
            assert_eq!(d.rule.as_deref(), Some("web-staging"), "{r}");
            assert_eq!(aliases(&d), [("deploy", "web-staging-deploy")]);
        }
        // Every staging-like identity, whatever else it claims, stays off production roles.
        for (r, event) in [
            ("refs/heads/main", "push"),
            ("refs/tags/v1", "push"),
            ("refs/heads/x", "workflow_dispatch"),
        ] {
            let d = set.decide(&github("acme/web", r, Some("staging"), event), WEEKDAY);
            assert!(
                d.grants.iter().all(|g| !g.role_arn.contains("prod")),
                "{r}: {d:?}"
            );
        }
    }

    #[test]
    fn pull_requests_and_other_events_do_not_reach_production() {
        let set = shipped();
        for event in ["pull_request", "pull_request_target", "schedule"] {
            let d = set.decide(
                &github("acme/web", "refs/heads/main", Some("production"), event),
                WEEKDAY,
            );
            assert_eq!(d.rule.as_deref(), Some("acme-ci-readonly"), "{event}");
            assert_eq!(aliases(&d), [("readonly", "ci-readonly")]);
        }
        let pr = set.decide(
            &github("acme/web", "refs/pull/7/merge", None, "pull_request"),
            WEEKDAY,
        );
        assert_eq!(aliases(&pr), [("readonly", "ci-readonly")]);
    }

    #[test]
    fn attested_identity_is_refused_by_production_without_fall_through() {
        let mut id = github("acme/web", "refs/heads/main", Some("production"), "push");
        id.source = IdentitySource::Attested;
        let d = shipped().decide(&id, WEEKDAY);
        assert_eq!(d.rule.as_deref(), Some("web-production"));
        assert!(d.grants.is_empty());
        assert!(d
            .refused
            .unwrap()
            .contains("requires a verified OIDC identity"));

        // The read-only rule accepts attested identities.
        let mut id = github("acme/tools", "refs/heads/main", None, "push");
        id.source = IdentitySource::Attested;
        assert_eq!(
            aliases(&shipped().decide(&id, WEEKDAY)),
            [("readonly", "ci-readonly")]
        );
    }

    #[test]
    fn attested_claims_without_ids_are_refused_by_an_id_pinned_rule_not_passed_on() {
        // Runner-attested claims carry no ids the policy can trust: the production rule
        // (which pins ids and requires OIDC) still decides them, and refuses.
        let mut id = github("acme/web", "refs/heads/main", Some("production"), "push");
        id.source = IdentitySource::Attested;
        id.claims.clear();
        let d = shipped().decide(&id, WEEKDAY);
        assert_eq!(d.rule.as_deref(), Some("web-production"));
        assert!(d.grants.is_empty());
        assert!(d
            .refused
            .unwrap()
            .contains("requires a verified OIDC identity"));
        // A token without the ids does not match it: the next rule decides.
        id.source = IdentitySource::Oidc;
        let d = shipped().decide(&id, WEEKDAY);
        assert_eq!(d.rule.as_deref(), Some("acme-ci-readonly"));
    }

    #[test]
    fn web_identity_grant_with_attested_identity_is_refused() {
        let text = "[[rule]]\nname = \"r\"\nrequire_oidc = false\n[rule.match]\nprovider = \"github\"\nowner = \"acme\"\n\
                    [[rule.grant]]\nalias = \"a\"\ndefault = true\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n\
                    [[rule.grant]]\nalias = \"w\"\nvia = \"web-identity\"\nrole_arn = \"arn:aws:iam::123456789012:role/w\"\n";
        let set = load_str(Path::new("p.toml"), text).unwrap();
        assert!(
            set.warnings().iter().any(|w| w.contains("web-identity")),
            "{:?}",
            set.warnings()
        );
        let mut id = github("acme/web", "refs/heads/main", None, "push");
        assert_eq!(set.decide(&id, WEEKDAY).grants.len(), 2);
        id.source = IdentitySource::Attested;
        let d = set.decide(&id, WEEKDAY);
        assert!(d.grants.is_empty());
        assert!(d
            .refused
            .unwrap()
            .contains("grant \"w\" uses via = \"web-identity\""));
    }

    #[test]
    fn no_match_is_refused_with_a_summary() {
        let d = shipped().decide(
            &github("evil/web", "refs/heads/main", Some("production"), "push"),
            WEEKDAY,
        );
        assert_eq!((d.rule, d.origin), (None, None));
        assert!(d.grants.is_empty());
        assert_eq!(
            d.refused.as_deref(),
            Some("no policy rule matches github evil/web refs/heads/main env=production run=4242 attempt=1")
        );
        let empty = PolicySet::empty().decide(
            &github("acme/web", "refs/heads/main", None, "push"),
            WEEKDAY,
        );
        assert!(empty
            .refused
            .unwrap()
            .starts_with("no policy rule matches github acme/web"));
    }

    #[test]
    fn globs_star_stays_in_a_segment_and_matching_is_case_sensitive() {
        let set = shipped();
        for repo in ["acme/team/web", "ACME/web", "acme-evil/web"] {
            let mut id = github(repo, "refs/heads/main", None, "push");
            id.owner = Some("acme".into());
            assert!(set.decide(&id, WEEKDAY).is_refused(), "{repo}");
        }
        // A tag does not match staging's refs/heads/**.
        let d = set.decide(
            &github("acme/web", "refs/tags/v1", Some("staging"), "push"),
            WEEKDAY,
        );
        assert_eq!(d.rule.as_deref(), Some("acme-ci-readonly"));
    }

    #[test]
    fn claims_match_and_missing_values_do_not() {
        let text = "[[rule]]\nname = \"r\"\n[rule.match]\nprovider = \"github\"\nenvironment = \"prod*\"\n[rule.match.claims]\n\
                    job_workflow_ref = \"acme/web/.github/workflows/*.yml@refs/heads/main\"\n\
                    [[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n";
        let set = load_str(Path::new("p.toml"), text).unwrap();
        assert!(!set
            .decide(
                &github("acme/web", "refs/heads/main", Some("production"), "push"),
                WEEKDAY
            )
            .is_refused());
        assert!(set
            .decide(
                &github("acme/web", "refs/heads/dev", Some("production"), "push"),
                WEEKDAY
            )
            .is_refused());
        assert!(set
            .decide(
                &github("acme/web", "refs/heads/main", None, "push"),
                WEEKDAY
            )
            .is_refused());
    }

    #[test]
    fn explain_shows_the_granting_rules_sandbox_only() {
        let text = "[[rule]]\nname = \"first\"\n[rule.match]\nprovider = \"github\"\nowner = \"acme\"\n\
                    [[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n\
                    [rule.sandbox]\nnetwork = \"outbound\"\nmemory = \"2G\"\npids = 512\ncpus = 1.5\n\
                    [[rule]]\nname = \"second\"\n[rule.match]\nprovider = \"github\"\n\
                    [[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n\
                    [rule.sandbox]\ntmpfs = \"1G\"\n";
        let set = load_str(Path::new("p.toml"), text).unwrap();
        let ex = set.explain(
            &github("acme/web", "refs/heads/main", None, "push"),
            WEEKDAY,
        );
        assert_eq!(ex.decision.rule.as_deref(), Some("first"));
        assert_eq!(
            ex.sandbox.map(|s| s.to_string()).as_deref(),
            Some("network=outbound memory=2147483648 pids=512 cpus=1.500")
        );
        let ex = set.explain(
            &github("other/web", "refs/heads/main", None, "push"),
            WEEKDAY,
        );
        assert_eq!(ex.decision.rule.as_deref(), Some("second"));
        assert_eq!(
            ex.sandbox.map(|s| s.to_string()).as_deref(),
            Some("tmpfs=1073741824")
        );
        // A refused job gets the agent's defaults, not the refusing rule's settings.
        let mut attested = github("acme/web", "refs/heads/main", None, "push");
        attested.source = IdentitySource::Attested;
        let ex = set.explain(&attested, WEEKDAY);
        assert_eq!(ex.decision.rule.as_deref(), Some("first"));
        assert!(ex.decision.is_refused());
        assert_eq!(ex.sandbox, None);
        // No rule decides: no rule's settings.
        let ex = PolicySet::empty().explain(
            &github("acme/web", "refs/heads/main", None, "push"),
            WEEKDAY,
        );
        assert_eq!(ex.sandbox, None);
    }

    #[test]
    fn explain_shows_the_granting_rules_egress_with_the_baseline_marked() {
        let text = "[egress]\nbaseline = [\"github.com:443\", \"*.actions.githubusercontent.com:443\"]\n\
                    [[rule]]\nname = \"first\"\n[rule.match]\nprovider = \"github\"\nowner = \"acme\"\n\
                    [[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n\
                    [rule.egress]\nallow = [\"registry.npmjs.org:443\", \"github.com:443\", \"203.0.113.0/24:8443\"]\n\
                    [[rule]]\nname = \"second\"\n[rule.match]\nprovider = \"github\"\n\
                    [[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n";
        let set = load_str(Path::new("p.toml"), text).unwrap();
        let ex = set.explain(
            &github("acme/web", "refs/heads/main", None, "push"),
            WEEKDAY,
        );
        let egress = ex.egress.clone().unwrap();
        assert_eq!(egress.mode, crate::policy::EgressMode::Block);
        let shown: Vec<(String, bool)> = egress
            .allow
            .iter()
            .map(|a| (a.to_string(), a.baseline))
            .collect();
        // The rule's entries first; github.com is the rule's own, so it is not repeated.
        assert_eq!(
            shown,
            [
                ("registry.npmjs.org:443".to_string(), false),
                ("github.com:443".to_string(), false),
                ("203.0.113.0/24:8443".to_string(), false),
                ("*.actions.githubusercontent.com:443".to_string(), true),
            ]
        );
        // [rule.egress] without a network key: the job runs outbound, narrowed by the list.
        assert_eq!(
            ex.sandbox.as_ref().map(|s| s.to_string()).as_deref(),
            Some("network=outbound")
        );
        let json = serde_json::to_value(&ex).unwrap();
        assert_eq!(json["egress"]["mode"], "block");
        assert_eq!(
            json["egress"]["allow"][3],
            serde_json::json!({"entry": "*.actions.githubusercontent.com:443", "baseline": true, "origin": "p.toml:2:31"})
        );
        assert_eq!(json["egress"]["allow"][0]["origin"], "p.toml:12:10");
        // A rule without [rule.egress] shows none, even with a baseline loaded.
        let ex = set.explain(
            &github("other/web", "refs/heads/main", None, "push"),
            WEEKDAY,
        );
        assert_eq!(ex.decision.rule.as_deref(), Some("second"));
        assert_eq!(ex.egress, None);
        assert!(serde_json::to_value(&ex).unwrap()["egress"].is_null());
        // Nor does a refused job.
        let mut attested = github("acme/web", "refs/heads/main", None, "push");
        attested.source = IdentitySource::Attested;
        let ex = set.explain(&attested, WEEKDAY);
        assert!(ex.decision.is_refused());
        assert_eq!(ex.egress, None);
    }

    #[test]
    fn explain_gives_every_rule_its_reasons() {
        let set = shipped();
        let ex = set.explain(
            &github("acme/web", "refs/heads/feature", None, "pull_request"),
            WEEKDAY,
        );
        assert_eq!(ex.decision.rule.as_deref(), Some("acme-ci-readonly"));
        let prod = &ex.rules[0];
        assert_eq!(
            (prod.rule.as_str(), prod.matched),
            ("web-production", false)
        );
        // The issuer first, then every failing key.
        let issuer = "issuer \"https://token.actions.githubusercontent.com\" is the rule's issuer";
        assert_eq!(
            prod.reasons,
            [
                issuer,
                "ref \"refs/heads/feature\" does not match \"refs/heads/main\"",
                "environment: the job has none",
                "event \"pull_request\" does not match any of \"push\", \"workflow_dispatch\"",
            ]
        );
        assert_eq!(
            prod.id_pins,
            [
                "repository_id = \"700001\"",
                "repository_owner_id = \"500001\""
            ]
        );
        assert_eq!(
            prod.scope.to_string(),
            "https://token.actions.githubusercontent.com (github)"
        );
        assert_eq!(prod.scope.written, "provider = \"github\"");
        assert_eq!(
            ex.rules[1].reasons,
            [issuer, "environment: the job has none"]
        );
        assert!(ex.rules[2].matched);
        assert_eq!(
            ex.rules[2].reasons,
            [
                issuer,
                "matches on owner, repository",
                "decides: grants readonly"
            ]
        );
        assert!(ex.rules[2].id_pins.is_empty());
        // The deciding rule's [rule.sandbox], as the shipped read-only rule writes it.
        assert_eq!(
            ex.sandbox.as_ref().map(ToString::to_string).as_deref(),
            Some("network=endpoint-only memory=4294967296 pids=1024 cpus=2.000 tmpfs=2147483648")
        );
        let json = serde_json::to_value(&ex).unwrap();
        assert_eq!(json["sandbox"]["network"], "endpoint-only");
        assert_eq!(json["sandbox"]["cpu_millis"], 2000);

        // A later matching rule is reported as shadowed.
        let ex = set.explain(
            &github("acme/web", "refs/heads/main", Some("staging"), "push"),
            WEEKDAY,
        );
        assert!(ex.rules[2].matched);
        assert_eq!(
            ex.rules[2].reasons,
            [
                issuer,
                "matches, but rule \"web-staging\" came first and decided"
            ]
        );
        // Staging's rule has no [rule.sandbox]: the agent's defaults, nothing to show.
        assert_eq!(ex.sandbox, None);
        assert_eq!(ex.egress, None);
        let json = serde_json::to_value(&ex).unwrap();
        assert_eq!(json["decision"]["grants"][0]["method"], "assume-role");
        assert_eq!(json["rules"][1]["matched"], true);
    }

    /// A verified token of `issuer`, read as `provider` reads its claims.
    fn token_of(provider: Provider, issuer: &str, claims: serde_json::Value) -> JobIdentity {
        let serde_json::Value::Object(claims) = claims else {
            panic!("claims must be an object")
        };
        crate::identity::normalise(provider, issuer, IdentitySource::Oidc, claims)
    }

    /// Buildkite's organisation `acme`, pipeline `web`: the names of GitHub's acme/web.
    fn buildkite_acme() -> JobIdentity {
        token_of(
            Provider::Buildkite,
            "https://agent.buildkite.com",
            serde_json::json!({
                "sub": "organization:acme:pipeline:web:ref:refs/heads/main:commit:abc:step:deploy",
                "organization_slug": "acme", "pipeline_slug": "web", "build_number": 7,
                "build_branch": "main", "job_id": "0190-aa",
                // Ids as a GitHub token of acme/web would carry them: names of one
                // issuer's claims mean nothing in another's tokens.
                "repository_id": "700001", "repository_owner_id": "500001",
            }),
        )
    }

    /// GitLab.com's group `acme`, project `web`, on main with environment production.
    fn gitlab_acme() -> JobIdentity {
        token_of(
            Provider::Gitlab,
            "https://gitlab.com",
            serde_json::json!({
                "sub": "project_path:acme/web:ref_type:branch:ref:main",
                "namespace_path": "acme", "namespace_id": "7", "project_path": "acme/web",
                "project_id": "22", "ref": "main", "ref_type": "branch",
                "environment": "production", "pipeline_source": "push", "pipeline_id": "4100",
                "repository_id": "700001", "repository_owner_id": "500001",
            }),
        )
    }

    /// The reproduced attack: a Buildkite organisation and a GitLab group called `acme`
    /// present tokens whose names are GitHub's acme/web's. No rule written for GitHub's
    /// acme grants them anything, and explain says why first.
    #[test]
    fn other_issuers_called_acme_never_match_rules_for_githubs_acme() {
        let set = shipped();
        for id in [buildkite_acme(), gitlab_acme()] {
            assert_eq!(id.owner.as_deref(), Some("acme"));
            assert_eq!(id.repository.as_deref(), Some("acme/web"));
            let d = set.decide(&id, WEEKDAY);
            assert_eq!((d.rule.as_deref(), d.grants.len()), (None, 0), "{d:?}");
            assert!(
                d.refused
                    .as_deref()
                    .unwrap()
                    .starts_with("no policy rule matches"),
                "{d:?}"
            );
            let ex = set.explain(&id, WEEKDAY);
            for v in &ex.rules {
                assert!(!v.matched, "{}: {v:?}", id.issuer);
                assert_eq!(v.reasons.len(), 1, "{v:?}");
                assert_eq!(
                    v.reasons[0],
                    format!(
                        "issuer {:?} is not the rule's issuer \"https://token.actions.githubusercontent.com\": \
                         tokens of another issuer never match, whatever their names (the rule's other keys \
                         are not compared)",
                        id.issuer
                    )
                );
            }
        }
        // The same names from GitHub's issuer still get what the rules say.
        let d = set.decide(
            &github("acme/web", "refs/heads/feature", None, "push"),
            WEEKDAY,
        );
        assert_eq!(d.rule.as_deref(), Some("acme-ci-readonly"));
        assert_eq!(d.grants.len(), 1);

        // Runner-attested claims have no issuer: the read-only rule (require_oidc = false)
        // takes attested claims of its provider only.
        let attested = |provider: &str, extra: serde_json::Value| {
            let mut c = serde_json::json!({"provider": provider});
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            crate::identity::from_attested_value(c).unwrap()
        };
        for id in [
            attested(
                "buildkite",
                serde_json::json!({"organization_slug": "acme", "pipeline_slug": "web",
                    "issuer": "https://token.actions.githubusercontent.com"}),
            ),
            attested(
                "gitlab",
                serde_json::json!({"namespace_path": "acme", "project_path": "acme/web"}),
            ),
        ] {
            let d = set.decide(&id, WEEKDAY);
            assert_eq!((d.rule, d.grants.len()), (None, 0), "{}", id.provider);
            let why = &set.explain(&id, WEEKDAY).rules[2].reasons[0];
            assert!(
                why.starts_with(&format!(
                    "runner-attested {} identity: the rule trusts only github identities, of \
                     https://token.actions.githubusercontent.com; its other keys are not compared",
                    id.provider
                )),
                "{why}"
            );
        }
        let gh = attested(
            "github",
            serde_json::json!({"repository_owner": "acme", "repository": "acme/web"}),
        );
        assert_eq!(
            set.decide(&gh, WEEKDAY).rule.as_deref(),
            Some("acme-ci-readonly")
        );
    }

    /// Issuers are compared exactly, as the verifier looks them up: one that differs by a
    /// trailing slash is another issuer.
    #[test]
    fn the_rules_issuer_is_compared_exactly() {
        let mut id = github("acme/tools", "refs/heads/main", None, "push");
        id.issuer.push('/');
        let d = shipped().decide(&id, WEEKDAY);
        assert_eq!((d.rule, d.grants.len()), (None, 0));
    }

    /// A rule that pins `repository_owner_id`: the organisation's name can be renamed and
    /// re-registered by someone else, its id cannot.
    #[test]
    fn an_id_pin_refuses_a_re_registered_organisation() {
        let text = "[[rule]]\nname = \"pinned\"\n[rule.match]\nprovider = \"github\"\nowner = \"acme\"\n\
                    repository_owner_id = \"500001\"\n\
                    [[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n";
        let set = load_str(Path::new("p.toml"), text).unwrap();
        let ours = github("acme/web", "refs/heads/main", None, "push");
        assert_eq!(set.decide(&ours, WEEKDAY).grants.len(), 1);

        let mut squatter = ours.clone();
        squatter
            .claims
            .insert("repository_owner_id".into(), "987654".into());
        let d = set.decide(&squatter, WEEKDAY);
        assert_eq!((d.rule.as_deref(), d.grants.len()), (None, 0), "{d:?}");
        let ex = set.explain(&squatter, WEEKDAY);
        assert_eq!(ex.rules[0].id_pins, ["repository_owner_id = \"500001\""]);
        assert_eq!(
            ex.rules[0].reasons[1],
            "repository_owner_id \"987654\" is not the pinned id \"500001\": an id stays with its owner \
             when a name is renamed or re-registered"
        );
        // Exact, not a prefix or a glob; a number in the token is compared as its text.
        squatter
            .claims
            .insert("repository_owner_id".into(), "5000010".into());
        assert!(set.decide(&squatter, WEEKDAY).is_refused());
        squatter
            .claims
            .insert("repository_owner_id".into(), serde_json::json!(500001));
        assert!(!set.decide(&squatter, WEEKDAY).is_refused());
        // A token without the claim does not match.
        squatter.claims.remove("repository_owner_id");
        let ex = set.explain(&squatter, WEEKDAY);
        assert_eq!(
            ex.rules[0].reasons[1],
            "repository_owner_id: the job has none"
        );
    }

    /// A rule whose provider has no configured issuer and that accepts attested claims
    /// matches attested identities of that provider and no token.
    #[test]
    fn an_attested_only_rule_matches_no_token() {
        let github_only = [crate::policy::TrustedIssuer {
            issuer: "https://token.actions.githubusercontent.com".into(),
            provider: Provider::Github,
        }];
        let text = "[[rule]]\nname = \"gl\"\nrequire_oidc = false\n[rule.match]\nprovider = \"gitlab\"\n\
                    owner = \"acme\"\n\
                    [[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n";
        let set = crate::policy::load_str_with(Path::new("p.toml"), text, &github_only).unwrap();
        assert_eq!(set.rules()[0].scope.issuer, None);
        assert!(set.warnings()[0].contains("matches only runner-attested gitlab identities"));
        let attested = crate::identity::from_attested_value(
            serde_json::json!({"provider": "gitlab", "namespace_path": "acme", "project_path": "acme/web"}),
        )
        .unwrap();
        assert_eq!(set.decide(&attested, WEEKDAY).grants.len(), 1);
        let token = gitlab_acme();
        assert!(set.decide(&token, WEEKDAY).rule.is_none());
        assert_eq!(
            set.explain(&token, WEEKDAY).rules[0].reasons,
            ["issuer \"https://gitlab.com\": the rule matches only runner-attested gitlab identities \
              (no gitlab issuer is configured)"]
        );
    }
}
