//! Policies: which job gets which roles, and where it may connect. Pure: identity and time
//! in, a [`Decision`] out; a rule's name in, its [`EgressPolicy`] out.
//!
//! Loading (`load`) reads TOML files from a directory and checks everything once, so that a
//! loaded [`PolicySet`] cannot fail at decision time. Deciding (`decide`) does no I/O and
//! never looks at the clock itself: the caller passes `now`. Default deny: no matching rule,
//! no grants.
//!
//! Every rule trusts exactly one issuer (its [`IssuerScope`], resolved at load against the
//! agent's configured issuers): names alike from two issuers — a Buildkite organisation or a
//! GitLab group called like a GitHub organisation — never match one rule.

pub mod cases;
pub mod decide;
pub mod egress;
pub mod load;
pub mod suggest;

use crate::identity::{JobIdentity, Provider};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub use decide::{Decision, Explanation, RuleVerdict};
pub use egress::{EgressAllow, EgressMode, EgressPolicy, EgressTarget, RuleEgress};
pub use load::{load_dir_configured, load_dir_with, load_str, load_str_with, PolicyError};

/// An OIDC issuer the agent trusts, as the policy loader sees it: its exact `iss` and the
/// provider whose claim shape its tokens are read in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrustedIssuer {
    pub issuer: String,
    pub provider: Provider,
}

impl TrustedIssuer {
    /// The `[[issuer]]`s of the agent's configuration, each with the provider the verifier
    /// gives its tokens (written, or guessed from the URL).
    pub fn from_config(issuers: &[crate::config::IssuerConfig]) -> Vec<TrustedIssuer> {
        issuers
            .iter()
            .map(|cfg| TrustedIssuer {
                issuer: cfg.issuer.clone(),
                provider: crate::identity::configured_provider(cfg),
            })
            .collect()
    }

    /// The public issuers of GitHub Actions, GitLab.com and Buildkite: what [`load_str`]
    /// loads against, for tests and examples. The agent and the CLI load with the issuers
    /// of their configuration instead ([`TrustedIssuer::from_config`]).
    pub fn well_known() -> Vec<TrustedIssuer> {
        [
            (
                "https://token.actions.githubusercontent.com",
                Provider::Github,
            ),
            ("https://gitlab.com", Provider::Gitlab),
            ("https://agent.buildkite.com", Provider::Buildkite),
        ]
        .into_iter()
        .map(|(issuer, provider)| TrustedIssuer {
            issuer: issuer.to_string(),
            provider,
        })
        .collect()
    }
}

impl std::fmt::Display for TrustedIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.issuer, self.provider)
    }
}

/// Whose identities a rule may match: verified tokens of exactly one configured issuer and,
/// when the rule has `require_oidc = false`, runner-attested identities of that issuer's
/// provider (attested claims have no issuer). Resolved at load from the rule's `issuer` or
/// `provider` key; checked before any other key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IssuerScope {
    /// The exact `iss` of the rule's one issuer. `None` only for a rule with
    /// `require_oidc = false` whose provider has no configured issuer: it matches
    /// runner-attested identities of that provider and no token.
    pub issuer: Option<String>,
    pub provider: Provider,
    /// How the rule named it, e.g. `provider = "github"`.
    pub written: String,
}

impl IssuerScope {
    /// Why `id` is or is not of this scope: `Ok` and `Err` both say it in words, for
    /// `airlock policy explain` (the first reason of every rule).
    pub fn check(&self, id: &JobIdentity) -> Result<String, String> {
        use crate::identity::IdentitySource;
        match (id.source, &self.issuer) {
            (IdentitySource::Oidc, Some(iss)) if *iss == id.issuer => {
                Ok(format!("issuer {iss:?} is the rule's issuer"))
            }
            (IdentitySource::Oidc, Some(iss)) => Err(format!(
                "issuer {:?} is not the rule's issuer {iss:?}: tokens of another issuer never match, \
                 whatever their names (the rule's other keys are not compared)",
                id.issuer
            )),
            (IdentitySource::Oidc, None) => Err(format!(
                "issuer {:?}: the rule matches only runner-attested {} identities (no {} issuer is configured)",
                id.issuer, self.provider, self.provider
            )),
            (IdentitySource::Attested, _) if id.provider == self.provider => Ok(format!(
                "runner-attested {} identity: in the scope of the rule's provider (attested claims have no issuer)",
                id.provider
            )),
            (IdentitySource::Attested, _) => Err(format!(
                "runner-attested {} identity: the rule trusts only {} identities, of {}; its other keys \
                 are not compared",
                id.provider,
                self.provider,
                self.issuer.as_deref().unwrap_or("no issuer")
            )),
        }
    }
}

/// `https://token.actions.githubusercontent.com (github)`, or for an attested-only rule
/// `runner-attested gitlab identities only (no gitlab issuer is configured)`.
impl std::fmt::Display for IssuerScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.issuer {
            Some(iss) => write!(f, "{iss} ({})", self.provider),
            None => write!(
                f,
                "runner-attested {} identities only (no {} issuer is configured)",
                self.provider, self.provider
            ),
        }
    }
}

/// The flag a decision carries when a rule with `outside_window = "flag"` granted outside
/// all of its windows.
pub const FLAG_OUTSIDE_WINDOW: &str = "outside-window";

/// Every rule of every policy file, checked, in decision order (file name, then rule order).
///
/// Built only by [`load_dir_with`] / [`load_str_with`]; holds no handles, so deciding is
/// pure.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub(crate) rules: Vec<Rule>,
    pub(crate) warnings: Vec<String>,
    /// Every file's `[egress] baseline`, in file order, each target and port once.
    pub(crate) baseline: Vec<EgressAllow>,
    /// Where each grant's duration was written, for warnings that depend on the agent's
    /// configuration (`airlock policy check`).
    pub(crate) grant_origins: Vec<GrantOrigin>,
}

/// Where a grant's `duration` was written (or the grant itself, when it has none).
#[derive(Debug, Clone)]
pub(crate) struct GrantOrigin {
    pub(crate) rule: String,
    pub(crate) alias: String,
    pub(crate) duration: Origin,
}

impl PolicySet {
    /// No rules: every job is refused (default deny).
    pub fn empty() -> Self {
        PolicySet::default()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Rule names in decision order.
    pub fn rule_names(&self) -> Vec<&str> {
        self.rules.iter().map(|r| r.name.as_str()).collect()
    }

    /// Rules in decision order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// A rule by name (e.g. to read its `sandbox` settings).
    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// What the runner itself needs, from every policy file's `[egress] baseline`: merged
    /// into the allowlist of every rule that has one.
    pub fn baseline(&self) -> &[EgressAllow] {
        &self.baseline
    }

    /// The allowlist of a job this rule decides: the rule's mode and entries, then the
    /// baseline's entries the rule does not already list. `None` when there is no such rule
    /// or it has no `[rule.egress]`.
    pub fn egress_for(&self, rule_name: &str) -> Option<EgressPolicy> {
        let own = self.rule(rule_name)?.egress.as_ref()?;
        let mut allow = own.allow.clone();
        for b in &self.baseline {
            if !allow.iter().any(|a| a.same_entry(b)) {
                allow.push(b.clone());
            }
        }
        Some(EgressPolicy {
            mode: own.mode,
            allow,
        })
    }

    /// Load-time warnings, each starting with `<file>:<line>:<column>:`. The set is usable;
    /// the agent logs these and `airlock policy check` prints them.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// One warning (`<file>:<line>:<column>: …`, at the grant's `duration`) for every
    /// `assume-role` grant longer than `cap_secs`: what STS allows a session whose caller is
    /// itself a role session (role chaining, at most one hour; the broker clamps to it). `source` names the agent's
    /// credential source for the message. `web-identity` grants are not chained (the job's
    /// own token signs them) and are not reported.
    pub fn chained_session_warnings(&self, cap_secs: u32, source: &str) -> Vec<String> {
        let mut out = Vec::new();
        for rule in &self.rules {
            for g in &rule.grants {
                if g.method != Method::AssumeRole || g.duration_secs <= cap_secs {
                    continue;
                }
                let at = self
                    .grant_origins
                    .iter()
                    .find(|o| o.rule == rule.name && o.alias == g.alias)
                    .map_or_else(|| rule.origin.clone(), |o| o.duration.clone());
                out.push(format!(
                    "{at}: rule {:?} grant {:?}: duration {} s is longer than the {cap_secs} s STS allows a \
                     chained role session: the agent's own credentials ({source}) are themselves a role \
                     session, so jobs get {cap_secs} s sessions; write duration = \"1h\" or less, or give \
                     the agent credentials that are not a session",
                    rule.name, g.alias, g.duration_secs
                ));
            }
        }
        out
    }
}

/// One checked `[[rule]]`.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub description: Option<String>,
    pub origin: Origin,
    pub require_oidc: bool,
    pub outside_window: OutsideWindow,
    /// The one issuer whose identities the rule may match; checked before `matchers`.
    pub scope: IssuerScope,
    /// Every matcher must match; in file order. The `issuer` and `provider` keys are not
    /// among them: they make the `scope`.
    pub matchers: Vec<Matcher>,
    /// Empty: always open. Otherwise any open window = inside.
    pub windows: Vec<Window>,
    /// Default grant first, then the others in file order.
    pub grants: Vec<Grant>,
    /// `[rule.egress]`, checked, without the baseline (see [`PolicySet::egress_for`]).
    pub egress: Option<RuleEgress>,
    /// `[rule.sandbox]`, checked; `None` when the rule has none or sets nothing in it, so
    /// the job gets the agent's `[sandbox]` defaults. A rule with `[rule.egress]` always has
    /// `network` set: to `outbound` when it does not write it.
    pub sandbox: Option<RuleSandbox>,
}

/// `[rule.sandbox]`: how the sandbox of a job this rule decides is built. Unset fields take
/// the agent's `[sandbox]` defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RuleSandbox {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<RuleNetwork>,
    /// bytes
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    /// thousandths of a CPU
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    /// bytes: size cap of the job's writable tmpfs
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tmpfs_size: Option<u64>,
}

impl RuleSandbox {
    /// Nothing set: the agent's `[sandbox]` defaults throughout.
    pub fn is_empty(&self) -> bool {
        *self == RuleSandbox::default()
    }
}

/// `network=outbound memory=2147483648 pids=512 cpus=1.500`: the keys the rule sets, under
/// their policy names, in bytes and CPUs.
impl std::fmt::Display for RuleSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(n) = self.network {
            parts.push(format!("network={n}"));
        }
        if let Some(m) = self.memory_max {
            parts.push(format!("memory={m}"));
        }
        if let Some(p) = self.pids_max {
            parts.push(format!("pids={p}"));
        }
        if let Some(c) = self.cpu_millis {
            parts.push(format!("cpus={}.{:03}", c / 1000, c % 1000));
        }
        if let Some(t) = self.tmpfs_size {
            parts.push(format!("tmpfs={t}"));
        }
        f.write_str(&parts.join(" "))
    }
}

/// What a sandboxed job's network namespace reaches (see docs/network.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleNetwork {
    /// Only the job's own credential endpoint.
    EndpointOnly,
    /// Also the internet, except the metadata service, link-local and private ranges and
    /// the host's own addresses.
    Outbound,
}

impl RuleNetwork {
    /// The policy spelling: `endpoint-only`, `outbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleNetwork::EndpointOnly => "endpoint-only",
            RuleNetwork::Outbound => "outbound",
        }
    }
}

impl std::fmt::Display for RuleNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[rule.match]` key: the identity field (`repository`, `claims.<name>`) must match
/// any of the patterns.
#[derive(Debug, Clone)]
pub struct Matcher {
    pub field: String,
    pub patterns: Vec<glob::Pattern>,
    /// An immutable-id pin (`repository_owner_id`, …; see `identity::id_claims`): the
    /// token's claim of that name must equal one of the values exactly (they hold no glob).
    pub id_pin: bool,
}

impl Matcher {
    /// Glob options for every policy pattern: `*` stays within one `/` segment, `**` crosses
    /// segments, case matters.
    pub const OPTIONS: glob::MatchOptions = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };

    pub fn matches(&self, value: &str) -> bool {
        if self.id_pin {
            return self.patterns.iter().any(|p| p.as_str() == value);
        }
        self.patterns
            .iter()
            .any(|p| p.matches_with(value, Self::OPTIONS))
    }

    /// The job's value for this key: an id pin reads the raw claim of its name.
    pub fn value(&self, id: &JobIdentity) -> Option<String> {
        if self.id_pin {
            id.field(&format!("claims.{}", self.field))
        } else {
            id.field(&self.field)
        }
    }

    /// `repository_owner_id = "500001"` (or `= ["1", "2"]`): how `policy explain` shows a pin.
    pub fn written(&self) -> String {
        let values: Vec<String> = self
            .patterns
            .iter()
            .map(|p| format!("{:?}", p.as_str()))
            .collect();
        match values.as_slice() {
            [one] => format!("{} = {one}", self.field),
            _ => format!("{} = [{}]", self.field, values.join(", ")),
        }
    }
}

/// One `[[rule.window]]`: open on `days` from `start` (inclusive) to `end` (exclusive),
/// wall-clock time at `utc_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Monday = index 0.
    pub days: [bool; 7],
    /// Minutes since midnight.
    pub start: u16,
    pub end: u16,
    pub utc_offset: time::UtcOffset,
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Window {
    pub fn is_open(&self, now: time::OffsetDateTime) -> bool {
        let local = now.to_offset(self.utc_offset);
        let day = usize::from(local.weekday().number_days_from_monday());
        let minute = u16::from(local.hour()) * 60 + u16::from(local.minute());
        self.days[day] && self.start <= minute && minute < self.end
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let days: Vec<&str> = DAY_NAMES
            .iter()
            .zip(self.days)
            .filter(|(_, on)| *on)
            .map(|(d, _)| *d)
            .collect();
        let (h, m, _) = self.utc_offset.as_hms();
        write!(
            f,
            "{} {:02}:{:02}-{:02}:{:02} UTC{}{:02}:{:02}",
            days.join(","),
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60,
            if self.utc_offset.is_negative() {
                '-'
            } else {
                '+'
            },
            h.unsigned_abs(),
            m.unsigned_abs()
        )
    }
}

/// How a grant's role is assumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// `AssumeRole`, signed with the agent's own credentials.
    AssumeRole,
    /// `AssumeRoleWithWebIdentity` with the job's own OIDC token (needs an OIDC identity).
    WebIdentity,
}

/// One role a matching rule grants, under an alias. Checked at load time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Grant {
    /// Path segment of the container endpoint (`/v1/credentials/<alias>`) and IMDS role name.
    pub alias: String,
    /// The grant served at the default path; exactly one per rule.
    pub default: bool,
    pub role_arn: String,
    pub method: Method,
    /// Requested session length before clamping to STS limits and the job's lifetime.
    pub duration_secs: u32,
    /// Inline session policy (a file's content is read at load time); ≤ 2048 chars.
    pub session_policy: Option<String>,
    /// Managed session policy ARNs (≤ 10).
    pub policy_arns: Vec<String>,
    /// Session tag key → identity field name (see `identity::FIELDS`, or `claims.<name>`).
    pub session_tags: Vec<(String, String)>,
}

/// What to do with a job outside a rule's time windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutsideWindow {
    Refuse,
    Flag,
}

/// Where a rule came from, for messages and `policy explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}
