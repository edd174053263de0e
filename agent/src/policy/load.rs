//! Loading policy files: TOML in, a checked [`PolicySet`] out.
//!
//! This module owns the policy file format and every load-time check; each error names the
//! file, line and column. It reads files only here, at load time (including
//! `session_policy_file`), so that deciding never does I/O. It must never return a partly
//! checked set: one error refuses the whole directory (the caller keeps its old set). It
//! checks on past an error, so that one run reports every error of every file (a TOML
//! syntax or unknown-key error ends its own file only), each once.
//!
//! Rules are checked against the issuers the agent trusts ([`TrustedIssuer`]): every rule
//! must resolve to exactly one of them (its `issuer`, or a `provider` that only one of them
//! has), and may pin only the immutable ids that issuer's tokens carry.

use super::egress::{self, EgressAllow, EgressMode, RuleEgress};
use super::{
    Grant, IssuerScope, Matcher, Method, Origin, OutsideWindow, PolicySet, Rule, RuleNetwork,
    RuleSandbox, TrustedIssuer, Window, DAY_NAMES,
};
use crate::config::line_col;
use crate::identity::{id_claims, Provider, FIELDS, PROVIDERS};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_spanned::Spanned;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// STS limits (AssumeRole): DurationSeconds, packed Policy, PolicyArns, Tags.
const MIN_DURATION: u64 = 900;
const MAX_DURATION: u64 = 43_200;
const DEFAULT_DURATION: u32 = 3600;
const MAX_SESSION_POLICY_CHARS: usize = 2048;
const MAX_POLICY_ARNS: usize = 10;
const MAX_TAGS: usize = 50;
/// botocore refreshes 15 min before expiry (mandatory at 10): shorter sessions make it
/// refetch on almost every call.
const SHORT_GRANT_WARNING: u32 = 1800;
/// `[rule.sandbox]` limits. The size minimums catch a missing suffix (`"16"` meant as
/// 16 MiB) before it starts a job that cannot run; pids up to the kernel's `PID_MAX_LIMIT`;
/// CPUs down to cgroup v2's least `cpu.max` quota (1 ms per 100 ms period, 0.01 CPU).
const MIN_SANDBOX_MEMORY: u64 = 16 << 20;
const MIN_SANDBOX_TMPFS: u64 = 1 << 20;
const MIN_SANDBOX_PIDS: u64 = 16;
const MAX_SANDBOX_PIDS: u64 = 4_194_304;
const MAX_SANDBOX_CPUS: f64 = 1024.0;
const MIN_SANDBOX_CPU_MILLIS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "{}: cannot read the policy directory: {source}; create it (an empty directory \
         loads no rules, so every job is refused)",
        dir.display()
    )]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:1:1: cannot read the policy file: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Anything wrong inside a policy file, at the place it is wrong.
    #[error("{origin}: {message}")]
    Invalid { origin: Origin, message: String },
    /// More than one error, in file order; each is shown on a line of its own.
    #[error("{}", Several(errors))]
    Several { errors: Vec<PolicyError> },
}

impl PolicyError {
    /// Every error this one stands for: itself, or each of [`PolicyError::Several`].
    pub fn errors(&self) -> Vec<&PolicyError> {
        match self {
            PolicyError::Several { errors } => errors.iter().flat_map(|e| e.errors()).collect(),
            e => vec![e],
        }
    }

    /// One error for `errors` (none: `None`; one: itself).
    fn from_all(mut errors: Vec<PolicyError>) -> Option<PolicyError> {
        match errors.len() {
            0 => None,
            1 => errors.pop(),
            _ => Some(PolicyError::Several { errors }),
        }
    }
}

struct Several<'a>(&'a [PolicyError]);

impl fmt::Display for Several<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        write!(f, "\n{} errors", self.0.len())
    }
}

/// Keeps the value of `r`, or its error in `errs` (so checking goes on past it).
fn keep<T>(errs: &mut Vec<PolicyError>, r: Result<T, PolicyError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(PolicyError::Several { errors }) => {
            errs.extend(errors);
            None
        }
        Err(e) => {
            errs.push(e);
            None
        }
    }
}

/// A file in the policy directory that is not loaded but is worth a warning: not `*.toml`
/// (a `policy.tml` or `policy.toml.bak` would otherwise be skipped in silence). Hidden files,
/// editor backups ending in `~`, editor swap files and the session policy JSON files rules
/// name are expected there and not reported.
fn ignored_with_warning(name: &str) -> bool {
    let quiet_suffix = [".json", "~", ".swp", ".swo", ".swx"];
    !(name.starts_with('.')
        || name.starts_with('#')
        || quiet_suffix.iter().any(|s| name.ends_with(s)))
}

/// Every `*.toml` file directly in `dir` (not recursive; names starting with `.` are
/// skipped, as editors leave such files behind), in file-name order, checked against the
/// issuers the agent trusts (`TrustedIssuer::from_config` of its `[[issuer]]`s). Other
/// files are warned about (see [`ignored_with_warning`]); subdirectories are not. Every
/// error of every file is reported, in file order.
pub fn load_dir_with(dir: &Path, issuers: &[TrustedIssuer]) -> Result<PolicySet, PolicyError> {
    load_dir_configured(dir, issuers, None)
}

/// [`load_dir_with`], with the issuers read from the configuration file `config`: the
/// advice to add an `[[issuer]]` names that file.
pub fn load_dir_configured(
    dir: &Path,
    issuers: &[TrustedIssuer],
    config: Option<&Path>,
) -> Result<PolicySet, PolicyError> {
    let read_dir_err = |source| PolicyError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_err)? {
        let path = entry.map_err(read_dir_err)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !path.is_file() || name.starts_with('.') {
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) == Some("toml") {
            files.push(path);
        } else if ignored_with_warning(name) {
            skipped.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    skipped.sort();
    let mut loader = Loader::new(issuers);
    if let Some(c) = config {
        loader.config = c.display().to_string();
    }
    for path in skipped {
        loader.set.warnings.push(format!(
            "{}: not loaded: only *.toml files in the policy directory are policies; rename it to \
             end in .toml if it is one, or move it out of the directory",
            path.display()
        ));
    }
    for path in files {
        match std::fs::read_to_string(&path) {
            Ok(text) => loader.file(&path, &text),
            Err(source) => loader.errors.push(PolicyError::ReadFile {
                path: path.clone(),
                source,
            }),
        }
    }
    loader.finish()
}

/// One policy file's text, as if it were the only file in its directory, checked against
/// `issuers`. `path` names the file in messages and anchors `session_policy_file`.
pub fn load_str_with(
    path: &Path,
    text: &str,
    issuers: &[TrustedIssuer],
) -> Result<PolicySet, PolicyError> {
    let mut loader = Loader::new(issuers);
    loader.file(path, text);
    loader.finish()
}

/// [`load_str_with`] against [`TrustedIssuer::well_known`] (GitHub Actions, GitLab.com,
/// Buildkite): for tests and examples, never for the agent.
pub fn load_str(path: &Path, text: &str) -> Result<PolicySet, PolicyError> {
    load_str_with(path, text, &TrustedIssuer::well_known())
}

// ---- the file format, as written --------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    /// The global `[egress]` table: only `baseline`.
    egress: Option<RawBaseline>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBaseline {
    #[serde(default)]
    baseline: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    description: Option<String>,
    #[serde(default = "yes")]
    require_oidc: bool,
    outside_window: Option<Spanned<OutsideWindow>>,
    #[serde(rename = "match")]
    matches: Option<Spanned<Ordered<RawMatch>>>,
    #[serde(default)]
    window: Vec<Spanned<RawWindow>>,
    #[serde(default)]
    grant: Vec<Spanned<RawGrant>>,
    egress: Option<Spanned<RawEgress>>,
    sandbox: Option<RawSandbox>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    mode: Option<Spanned<toml::Value>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
}

fn yes() -> bool {
    true
}

/// The TOML parser's message, or what to look for when it has none: a control character
/// in a comment, for one, fails without a message (found by the `policy` fuzz target).
fn toml_message(e: &toml::de::Error) -> String {
    match e.message().trim_end() {
        "" => "not valid TOML at this character (control characters are not allowed, even in comments)"
            .to_string(),
        m => m.to_string(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    days: Option<Spanned<Vec<Spanned<String>>>>,
    start: Spanned<String>,
    end: Spanned<String>,
    utc_offset: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    alias: Spanned<String>,
    default: Option<Spanned<bool>>,
    role_arn: Spanned<String>,
    #[serde(default = "assume_role")]
    via: Method,
    duration: Option<Spanned<toml::Value>>,
    session_policy: Option<Spanned<String>>,
    session_policy_file: Option<Spanned<String>>,
    policy_arns: Option<Spanned<Vec<Spanned<String>>>>,
    session_tags: Option<Spanned<Ordered<String>>>,
}

fn assume_role() -> Method {
    Method::AssumeRole
}

/// Values stay TOML values until checked, so that every message can name its key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    network: Option<Spanned<toml::Value>>,
    memory: Option<Spanned<toml::Value>>,
    pids: Option<Spanned<toml::Value>>,
    cpus: Option<Spanned<toml::Value>>,
    tmpfs: Option<Spanned<toml::Value>>,
}

/// A TOML table kept in file order with the span of every key (a `BTreeMap` would sort it,
/// and `toml::Table` loses the spans).
struct Ordered<V>(Vec<(Spanned<String>, Spanned<V>)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V2<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<Spanned<String>>()? {
                    out.push((k, map.next_value::<Spanned<V>>()?));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V2(std::marker::PhantomData))
    }
}

/// A `[rule.match]` value: one glob, a list of globs (any of), or (for `claims`) a table.
enum RawMatch {
    One(String),
    Any(Vec<Spanned<String>>),
    Table(Ordered<RawMatch>),
}

impl<'de> Deserialize<'de> for RawMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawMatch;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a glob string or an array of glob strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawMatch, E> {
                Ok(RawMatch::One(v.to_string()))
            }
            // Raw claims may be booleans or numbers (GitLab `ref_protected`); they match as text.
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawMatch, E> {
                Ok(RawMatch::One(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawMatch, E> {
                Ok(RawMatch::One(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawMatch, E> {
                Ok(RawMatch::One(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawMatch, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<Spanned<String>>()? {
                    out.push(s);
                }
                Ok(RawMatch::Any(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawMatch, A::Error> {
                Ordered::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawMatch::Table)
            }
        }
        d.deserialize_any(V)
    }
}

// ---- checking ----------------------------------------------------------------------------

struct Loader {
    set: PolicySet,
    names: HashMap<String, Origin>,
    issuers: Vec<TrustedIssuer>,
    /// Every error so far, in file order.
    errors: Vec<PolicyError>,
    /// The configuration the issuers came from, as messages name it.
    config: String,
}

/// One file being checked: turns spans into origins.
struct FileCtx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl FileCtx<'_> {
    fn origin(&self, span: &Range<usize>) -> Origin {
        let (line, column) = line_col(self.text, span.start);
        Origin {
            file: self.path.to_owned(),
            line,
            column,
        }
    }

    fn err<T>(&self, span: &Range<usize>, message: impl Into<String>) -> Result<T, PolicyError> {
        Err(PolicyError::Invalid {
            origin: self.origin(span),
            message: message.into(),
        })
    }
}

impl Loader {
    fn new(issuers: &[TrustedIssuer]) -> Loader {
        Loader {
            set: PolicySet::default(),
            names: HashMap::new(),
            issuers: issuers.to_vec(),
            errors: Vec::new(),
            config: "the agent's airlock.toml".into(),
        }
    }

    /// The set, or every error found.
    fn finish(self) -> Result<PolicySet, PolicyError> {
        match PolicyError::from_all(self.errors) {
            Some(e) => Err(e),
            None => Ok(self.set),
        }
    }

    /// One file; its errors go to `self.errors`. A TOML error ends the file (the parser
    /// cannot go on past it); any other error ends only its rule, or its baseline entry.
    fn file(&mut self, path: &Path, text: &str) {
        let cx = FileCtx { path, text };
        let raw: RawFile = match toml::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                self.errors.push(PolicyError::Invalid {
                    origin: cx.origin(&e.span().unwrap_or(0..0)),
                    message: toml_message(&e),
                });
                return;
            }
        };
        if let Some(b) = raw.egress {
            for e in entries(&cx, "[egress] baseline", b.baseline, true, &mut self.errors) {
                if !self.set.baseline.iter().any(|have| have.same_entry(&e)) {
                    self.set.baseline.push(e);
                }
            }
        }
        for raw_rule in raw.rule {
            let span = raw_rule.span();
            let mut errs = Vec::new();
            let rule = self.rule(&cx, span, raw_rule.into_inner(), &mut errs);
            // A rule's errors in the order of its lines.
            errs.sort_by_key(|e| match e {
                PolicyError::Invalid { origin, .. } => (origin.line, origin.column),
                _ => (0, 0),
            });
            match rule {
                Some(rule) if errs.is_empty() => self.set.rules.push(rule),
                _ => self.errors.append(&mut errs),
            }
        }
    }

    /// One rule, or `None` with its errors in `errs` (every independent part of the rule is
    /// checked, so one rule can report several errors).
    fn rule(
        &mut self,
        cx: &FileCtx,
        span: Range<usize>,
        raw: RawRule,
        errs: &mut Vec<PolicyError>,
    ) -> Option<Rule> {
        let r = self.rule_checked(cx, span, raw, errs);
        match r {
            Ok(Some(rule)) if errs.is_empty() => Some(rule),
            Ok(_) => None,
            Err(e) => keep::<Rule>(errs, Err(e)),
        }
    }

    fn rule_checked(
        &mut self,
        cx: &FileCtx,
        span: Range<usize>,
        raw: RawRule,
        errs: &mut Vec<PolicyError>,
    ) -> Result<Option<Rule>, PolicyError> {
        let name = raw.name.get_ref().clone();
        if name.trim().is_empty() {
            return cx.err(
                &raw.name.span(),
                "rule name is empty; give every rule a unique name",
            );
        }
        let origin = cx.origin(&span);
        let name_origin = cx.origin(&raw.name.span());
        if let Some(first) = self.names.get(&name) {
            return cx.err(
                &raw.name.span(),
                format!("rule name {name:?} is already used at {first}; rule names must be unique across all policy files"),
            );
        }
        self.names.insert(name.clone(), name_origin);

        let Some(raw_match) = raw.matches else {
            return cx.err(
                &raw.name.span(),
                format!("rule {name:?} has no [rule.match] table; add one (an empty table matches every job, so write that only on purpose)"),
            );
        };
        let match_span = raw_match.span();
        // The match keys, the scope and the id pins build on each other: the first error
        // of the three ends them. Windows, grants, egress and sandbox are checked apart.
        let matched = (|| {
            let mut parsed = matchers(cx, raw_match.into_inner())?;
            let scope = self.scope(cx, &name, &span, raw.require_oidc, &mut parsed)?;
            check_id_pins(cx, &name, &scope, raw.require_oidc, &parsed)?;
            Ok((scope, parsed))
        })();
        let matched = keep(errs, matched);
        let had_windows = !raw.window.is_empty();
        let windows: Vec<Window> = raw
            .window
            .into_iter()
            .filter_map(|w| keep(errs, window(cx, w)))
            .collect();
        let outside_window = match raw.outside_window {
            Some(ow) if !had_windows => {
                errs.push(PolicyError::Invalid {
                    origin: cx.origin(&ow.span()),
                    message: "outside_window has no effect without a [[rule.window]]; add a window or remove it".into(),
                });
                OutsideWindow::Refuse
            }
            Some(ow) => ow.into_inner(),
            None => OutsideWindow::Refuse,
        };
        let grants = grants(
            cx,
            &name,
            &span,
            raw.grant,
            errs,
            &mut self.set.grant_origins,
        );
        let egress = match raw.egress {
            Some(e) => {
                let r = self.egress(cx, &name, e, raw.sandbox.as_ref(), errs);
                keep(errs, r)
            }
            None => None,
        };
        let sandbox = raw.sandbox.map(|s| sandbox(cx, s));
        let mut sandbox = sandbox.and_then(|s| keep(errs, s));
        let Some((scope, parsed)) = matched else {
            return Ok(None);
        };
        let matchers = parsed.into_iter().map(|p| p.matcher).collect();
        if egress.is_some() {
            // The allowlist narrows outbound; without a network key the job would stay
            // endpoint-only and the list would mean nothing.
            sandbox
                .get_or_insert_with(RuleSandbox::default)
                .network
                .get_or_insert(RuleNetwork::Outbound);
        }

        let rule = Rule {
            name,
            description: raw.description,
            origin,
            require_oidc: raw.require_oidc,
            outside_window,
            scope,
            matchers,
            windows,
            grants,
            egress,
            sandbox: sandbox.filter(|s| !s.is_empty()),
        };
        self.warn(cx, &rule, &match_span);
        Ok(Some(rule))
    }

    fn warn(&mut self, cx: &FileCtx, rule: &Rule, match_span: &Range<usize>) {
        let at = &rule.origin;
        let name = &rule.name;
        if rule.matchers.is_empty() {
            self.set.warnings.push(format!(
                "{}: rule {name:?}: the [rule.match] table names only the rule's issuer, so this rule matches every job of {}",
                cx.origin(match_span),
                rule.scope
            ));
        }
        if rule.scope.provider == Provider::Buildkite && !pins_buildkite_org(&rule.matchers) {
            self.set.warnings.push(format!(
                "{at}: rule {name:?} can match Buildkite jobs without pinning `owner`, `repository` or \
                 `organization_id`; every Buildkite organisation shares the issuer {}, so pin the organisation",
                rule.scope.issuer.as_deref().unwrap_or("https://agent.buildkite.com")
            ));
        }
        if rule.scope.issuer.is_none() {
            let p = rule.scope.provider;
            self.set.warnings.push(format!(
                "{at}: rule {name:?} matches only runner-attested {p} identities: no {p} issuer is \
                 configured, so no token can match it; add an [[issuer]] for {p} to {} \
                 if its jobs have OIDC tokens",
                self.config
            ));
        }
        if rule
            .egress
            .as_ref()
            .is_some_and(|e| e.mode == EgressMode::Audit)
        {
            self.set.warnings.push(format!(
                "{at}: rule {name:?}: [rule.egress] mode = \"audit\" lets its jobs reach every address but the \
                 metadata service, private ranges and the host (each one recorded); once `airlock policy suggest` \
                 has written the allowlist, switch to mode = \"block\""
            ));
        }
        for a in rule.egress.iter().flat_map(|e| &e.allow) {
            if let super::egress::EgressTarget::Cidr {
                addr: IpAddr::V6(_),
                ..
            } = &a.target
            {
                self.set.warnings.push(format!(
                    "{}: rule {name:?}: [rule.egress] entry {a} takes effect only on agents whose [sandbox] \
                     ipv6_address_pool is set; elsewhere jobs have IPv6 off",
                    a.origin
                ));
            }
        }
        for g in &rule.grants {
            if g.duration_secs < SHORT_GRANT_WARNING {
                self.set.warnings.push(format!(
                    "{at}: rule {name:?} grant {:?}: duration {} s is under 30 minutes; botocore refreshes credentials \
                     15 minutes before expiry, so it would refetch on nearly every call",
                    g.alias, g.duration_secs
                ));
            }
            if g.method == Method::WebIdentity && !rule.require_oidc {
                self.set.warnings.push(format!(
                    "{at}: rule {name:?} grant {:?} uses via = \"web-identity\" but the rule sets require_oidc = false; \
                     runner-attested jobs that match it will be refused (they have no OIDC token)",
                    g.alias
                ));
            }
        }
    }

    /// The one issuer a rule trusts, from its `issuer` or `provider` key (both taken out of
    /// `parsed`: the scope replaces them). Every way a rule could match tokens of two
    /// issuers, or of none, is an error at the key (or at the rule, when it has neither).
    fn scope(
        &mut self,
        cx: &FileCtx,
        name: &str,
        rule_span: &Range<usize>,
        require_oidc: bool,
        parsed: &mut Vec<Parsed>,
    ) -> Result<IssuerScope, PolicyError> {
        let mut take = |key: &str| {
            let i = parsed.iter().position(|p| p.matcher.field == key)?;
            Some(parsed.remove(i))
        };
        let issuer = take("issuer");
        let provider = take("provider");
        let configured = configured_list(&self.issuers);
        let values = |p: &Parsed| -> Vec<String> {
            p.matcher
                .patterns
                .iter()
                .map(|g| g.as_str().to_string())
                .collect()
        };
        if let Some(p) = issuer {
            let v = values(&p);
            let [iss] = v.as_slice() else {
                return cx.err(
                    &p.value,
                    format!(
                        "rule {name:?}: issuer lists {} issuers, and a rule trusts exactly one: names alike \
                         from different issuers (a Buildkite organisation or GitLab group called like a GitHub \
                         organisation) are not the same owner; write one rule per issuer (configured: {configured})",
                        v.len()
                    ),
                );
            };
            if !literal(iss) {
                return cx.err(
                    &p.value,
                    format!(
                        "rule {name:?}: issuer {iss:?} is a glob, and a rule trusts exactly one issuer, written \
                         out; write one rule per issuer (configured: {configured})"
                    ),
                );
            }
            let Some(trusted) = self.issuers.iter().find(|t| t.issuer == *iss) else {
                let hint = self
                    .issuers
                    .iter()
                    .find(|t| t.issuer.trim_end_matches('/') == iss.trim_end_matches('/'))
                    .map(|t| {
                        format!(
                            " (did you mean {:?}? issuers are compared exactly)",
                            t.issuer
                        )
                    })
                    .unwrap_or_default();
                return cx.err(
                    &p.value,
                    format!(
                        "rule {name:?}: issuer {iss:?} is not configured, so this rule could never match{hint}; \
                         configured: {configured}; add an [[issuer]] for it to {} or name one of those",
                        self.config
                    ),
                );
            };
            if let Some(pm) = &provider {
                if !pm.matcher.matches(trusted.provider.as_str()) {
                    return cx.err(
                        &pm.value,
                        format!(
                            "rule {name:?}: {} contradicts issuer {iss:?}, a {} issuer, so this rule could \
                             never match; remove the provider key (the issuer decides it)",
                            pm.matcher.written(),
                            trusted.provider
                        ),
                    );
                }
            }
            return Ok(IssuerScope {
                issuer: Some(trusted.issuer.clone()),
                provider: trusted.provider,
                written: format!("issuer = {iss:?}"),
            });
        }
        let Some(p) = provider else {
            return cx.err(
                rule_span,
                format!(
                    "rule {name:?} does not say which issuer it trusts; add issuer = \"<issuer>\" or \
                     provider = \"<provider>\" to its [rule.match] (configured: {configured}): otherwise names \
                     alike from different issuers (a Buildkite organisation or GitLab group called like a GitHub \
                     organisation) would match it as one"
                ),
            );
        };
        let v = values(&p);
        let [wanted] = v.as_slice() else {
            return cx.err(
                &p.value,
                format!(
                    "rule {name:?}: provider lists {} providers, so it could match tokens of several issuers, \
                     and a rule trusts exactly one; write one rule per provider (configured: {configured})",
                    v.len()
                ),
            );
        };
        let Some(prov) = Provider::from_name(wanted) else {
            let what = if literal(wanted) {
                "is not a provider"
            } else {
                "is a glob, which could match tokens of several issuers"
            };
            let names: Vec<&str> = PROVIDERS.iter().map(|p| p.as_str()).collect();
            return cx.err(
                &p.value,
                format!(
                    "rule {name:?}: provider {wanted:?} {what}; write one of {} (a rule trusts exactly one issuer)",
                    names.join(", ")
                ),
            );
        };
        let of: Vec<&TrustedIssuer> = self.issuers.iter().filter(|t| t.provider == prov).collect();
        match of.as_slice() {
            [one] => Ok(IssuerScope {
                issuer: Some(one.issuer.clone()),
                provider: prov,
                written: format!("provider = {wanted:?}"),
            }),
            [] if !require_oidc => Ok(IssuerScope {
                issuer: None,
                provider: prov,
                written: format!("provider = {wanted:?}"),
            }),
            [] => cx.err(
                &p.value,
                format!(
                    "rule {name:?}: provider = {wanted:?} names no configured issuer, so this rule could never \
                     match (configured: {configured}); add an [[issuer]] with provider = {wanted:?} to \
                     {}, or write issuer = \"<one of the configured>\"",
                    self.config
                ),
            ),
            many => {
                let list: Vec<&str> = many.iter().map(|t| t.issuer.as_str()).collect();
                cx.err(
                    &p.value,
                    format!(
                        "rule {name:?}: provider = {wanted:?} could match tokens of {} configured issuers ({}), \
                         and a rule trusts exactly one; write issuer = {:?} (or another of them) instead, one \
                         rule per issuer",
                        many.len(),
                        list.join(", "),
                        list[0]
                    ),
                )
            }
        }
    }

    /// `[rule.egress]`: its mode and entries, duplicates dropped with a warning; an error
    /// when the rule also sets `network = "endpoint-only"`, which leaves nothing to allow.
    fn egress(
        &mut self,
        cx: &FileCtx,
        rule: &str,
        raw: Spanned<RawEgress>,
        sandbox: Option<&RawSandbox>,
        errs: &mut Vec<PolicyError>,
    ) -> Result<RuleEgress, PolicyError> {
        let table = cx.origin(&raw.span());
        let raw = raw.into_inner();
        if let Some(network) = sandbox.and_then(|s| s.network.as_ref()) {
            if network.get_ref().as_str() == Some("endpoint-only") {
                return cx.err(
                    &network.span(),
                    format!(
                        "rule {rule:?}: [rule.sandbox] network = \"endpoint-only\" contradicts its [rule.egress] at {table}: \
                         an endpoint-only job reaches nothing but its credential endpoint, so there is no egress to allow; \
                         remove one of them (with [rule.egress] the job runs outbound, narrowed by the allowlist)"
                    ),
                );
            }
        }
        let mode = match &raw.mode {
            None => EgressMode::Block,
            Some(v) => match v.get_ref().as_str() {
                Some("block") => EgressMode::Block,
                Some("audit") => EgressMode::Audit,
                _ => {
                    return cx.err(
                        &v.span(),
                        format!(
                            "[rule.egress] mode {} is not an egress mode; use \"block\" (the default) or \"audit\"",
                            v.get_ref()
                        ),
                    )
                }
            },
        };
        let mut allow: Vec<EgressAllow> = Vec::new();
        for e in entries(cx, "[rule.egress] allow", raw.allow, false, errs) {
            match allow.iter().find(|have| have.same_entry(&e)) {
                Some(first) => self.set.warnings.push(format!(
                    "{}: rule {rule:?}: [rule.egress] allow lists {e} again (first at {}); the duplicate is ignored",
                    e.origin, first.origin
                )),
                None => allow.push(e),
            }
        }
        Ok(RuleEgress { mode, allow })
    }
}

/// Allowlist entries (`[rule.egress] allow`, `[egress] baseline`), each checked at its own
/// place in the file.
fn entries(
    cx: &FileCtx,
    what: &str,
    raw: Vec<Spanned<String>>,
    baseline: bool,
    errs: &mut Vec<PolicyError>,
) -> Vec<EgressAllow> {
    let mut out = Vec::new();
    for text in raw {
        let entry = match egress::parse_entry(text.get_ref()) {
            Ok((target, port)) => Ok(EgressAllow {
                target,
                port,
                baseline,
                origin: cx.origin(&text.span()).to_string(),
            }),
            Err(why) => cx.err(
                &text.span(),
                format!("{what} entry {:?} {why}", text.get_ref()),
            ),
        };
        out.extend(keep(errs, entry));
    }
    out
}

/// One `[rule.match]` key as parsed, with its places for the checks that need the rule's
/// scope first.
struct Parsed {
    matcher: Matcher,
    key: Range<usize>,
    value: Range<usize>,
}

/// Every key of a `[rule.match]` table; an error names the first bad key, and the others
/// are still checked (a second error is appended to the first).
fn matchers(cx: &FileCtx, table: Ordered<RawMatch>) -> Result<Vec<Parsed>, PolicyError> {
    let mut errs = Vec::new();
    let mut out = Vec::new();
    for (key, value) in table.0 {
        if let Err(e) = match_key(cx, key, value, &mut out) {
            errs.push(e);
        }
    }
    match PolicyError::from_all(errs) {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn match_key(
    cx: &FileCtx,
    key: Spanned<String>,
    value: Spanned<RawMatch>,
    out: &mut Vec<Parsed>,
) -> Result<(), PolicyError> {
    let field = key.get_ref().as_str();
    if field == "claims" {
        let span = value.span();
        let RawMatch::Table(claims) = value.into_inner() else {
            return cx.err(
                &span,
                "`claims` must be a table of claim name = glob(s), e.g. [rule.match.claims]",
            );
        };
        for (claim, v) in claims.0 {
            let field = format!("claims.{}", claim.get_ref());
            out.push(matcher(cx, claim.span(), field, v, false)?);
        }
    } else if FIELDS.contains(&field) {
        out.push(matcher(cx, key.span(), field.to_string(), value, false)?);
    } else if is_id_claim(field) {
        out.push(matcher(cx, key.span(), field.to_string(), value, true)?);
    } else {
        let ids: Vec<&str> = PROVIDERS
            .iter()
            .flat_map(|p| id_claims(*p).iter().copied())
            .collect();
        return cx.err(
                &key.span(),
                format!(
                    "unknown match field {field:?}; use one of {}, an id pin ({}) or a raw claim under [rule.match.claims]",
                    FIELDS.join(", "),
                    ids.join(", ")
                ),
            );
    }
    Ok(())
}

/// Whether `name` is an immutable-id claim of some provider.
fn is_id_claim(name: &str) -> bool {
    PROVIDERS.iter().any(|p| id_claims(*p).contains(&name))
}

/// Neither empty nor a glob: a value that matches only itself.
fn literal(s: &str) -> bool {
    !s.is_empty() && !s.contains(['*', '?', '[', ']'])
}

/// `https://a (github), https://b (buildkite)`, or what to do when there are none.
fn configured_list(issuers: &[TrustedIssuer]) -> String {
    if issuers.is_empty() {
        return "none: the agent's configuration has no [[issuer]]".to_string();
    }
    let all: Vec<String> = issuers.iter().map(ToString::to_string).collect();
    all.join(", ")
}

/// Id pins (`repository_owner_id`, …): only ids the rule's issuer puts in its tokens, and
/// only in rules that refuse attested identities, whose claims could carry any id.
fn check_id_pins(
    cx: &FileCtx,
    name: &str,
    scope: &IssuerScope,
    require_oidc: bool,
    parsed: &[Parsed],
) -> Result<(), PolicyError> {
    for p in parsed.iter().filter(|p| p.matcher.id_pin) {
        let field = p.matcher.field.as_str();
        let ours = id_claims(scope.provider);
        if !ours.contains(&field) {
            let owner = PROVIDERS
                .iter()
                .find(|q| id_claims(**q).contains(&field))
                .map_or("another", |q| q.as_str());
            let instead = if ours.is_empty() {
                "tokens of that provider carry no id airlock knows; match one of their claims under [rule.match.claims]".to_string()
            } else {
                format!("its tokens' ids are {}", ours.join(", "))
            };
            return cx.err(
                &p.key,
                format!(
                    "rule {name:?}: {field} is an id of {owner} tokens, and the rule trusts {} ({}), so it \
                     could never match; {instead}",
                    scope, scope.written
                ),
            );
        }
        if !require_oidc {
            return cx.err(
                &p.key,
                format!(
                    "rule {name:?} pins {field} but sets require_oidc = false: runner-attested claims could \
                     carry any id, so a pin holds only for verified tokens; remove require_oidc = false, or \
                     the pin"
                ),
            );
        }
    }
    Ok(())
}

fn matcher(
    cx: &FileCtx,
    key: Range<usize>,
    field: String,
    value: Spanned<RawMatch>,
    id_pin: bool,
) -> Result<Parsed, PolicyError> {
    let span = value.span();
    let texts: Vec<(String, Range<usize>)> = match value.into_inner() {
        RawMatch::One(s) => vec![(s, span.clone())],
        RawMatch::Any(v) => v
            .into_iter()
            .map(|s| (s.get_ref().clone(), s.span()))
            .collect(),
        RawMatch::Table(_) => {
            return cx.err(
                &span,
                format!(
                    "match field {field:?} must be a glob string or an array of globs, not a table"
                ),
            )
        }
    };
    if texts.is_empty() {
        return cx.err(&span, format!("match field {field:?} is an empty array, which matches no job; remove the rule or list at least one glob"));
    }
    let mut patterns = Vec::new();
    for (text, span) in texts {
        if id_pin && !literal(&text) {
            return cx.err(
                &span,
                format!("match field {field:?}: an id pin is compared exactly, so {text:?} would match no token; write the id itself (e.g. \"500001\")"),
            );
        }
        match glob::Pattern::new(&text) {
            Ok(p) => patterns.push(p),
            Err(e) => {
                return cx.err(
                    &span,
                    format!("match field {field:?}: bad glob {text:?}: {} at character {}; `**` must be a whole path segment, `[` opens a character class", e.msg, e.pos),
                )
            }
        }
    }
    Ok(Parsed {
        matcher: Matcher {
            field,
            patterns,
            id_pin,
        },
        key,
        value: span,
    })
}

/// Whether a rule pins the Buildkite organisation: `owner` given only as literal names,
/// `repository` only as patterns whose organisation (before the first `/`) is a literal
/// name, or an `organization_id` / `pipeline_id` pin. All Buildkite organisations share one
/// issuer, so only this tells them apart.
pub(crate) fn pins_buildkite_org(matchers: &[Matcher]) -> bool {
    let field = |name: &str| matchers.iter().find(|m| m.field == name);
    let owner = field("owner").is_some_and(|m| m.patterns.iter().all(|p| literal(p.as_str())));
    let repository = field("repository").is_some_and(|m| {
        m.patterns.iter().all(|p| {
            p.as_str()
                .split_once('/')
                .is_some_and(|(org, _)| literal(org))
        })
    });
    let id = matchers
        .iter()
        .any(|m| m.id_pin && (m.field == "organization_id" || m.field == "pipeline_id"));
    owner || repository || id
}

fn window(cx: &FileCtx, raw: Spanned<RawWindow>) -> Result<Window, PolicyError> {
    let raw = raw.into_inner();
    let mut days = [false; 7];
    match raw.days {
        None => days = [true; 7],
        Some(list) => {
            if list.get_ref().is_empty() {
                return cx.err(&list.span(), "window days is empty, so the window never opens; list days (mon..sun) or remove `days` for every day");
            }
            for d in list.into_inner() {
                let Some(i) = DAY_NAMES.iter().position(|n| *n == d.get_ref().as_str()) else {
                    return cx.err(
                        &d.span(),
                        format!(
                            "unknown day {:?}; use {}",
                            d.get_ref(),
                            DAY_NAMES.join(", ")
                        ),
                    );
                };
                days[i] = true;
            }
        }
    }
    let start = hh_mm(cx, &raw.start, false)?;
    let end = hh_mm(cx, &raw.end, true)?;
    if start >= end {
        return cx.err(
            &raw.end.span(),
            format!(
                "window end {:?} is not after start {:?}; a window cannot cross midnight, split it in two",
                raw.end.get_ref(),
                raw.start.get_ref()
            ),
        );
    }
    let utc_offset = match &raw.utc_offset {
        None => time::UtcOffset::UTC,
        Some(o) => parse_offset(o.get_ref()).map_or_else(
            || {
                cx.err(
                    &o.span(),
                    format!(
                        "bad utc_offset {:?}; write +HH:MM or -HH:MM, e.g. \"+01:00\"",
                        o.get_ref()
                    ),
                )
            },
            Ok,
        )?,
    };
    Ok(Window {
        days,
        start,
        end,
        utc_offset,
    })
}

/// `HH:MM` as minutes since midnight; `24:00` only as an end.
fn hh_mm(cx: &FileCtx, s: &Spanned<String>, is_end: bool) -> Result<u16, PolicyError> {
    let text = s.get_ref();
    let parsed = text.split_once(':').and_then(|(h, m)| {
        if h.len() != 2 || m.len() != 2 {
            return None;
        }
        let (h, m) = (h.parse::<u16>().ok()?, m.parse::<u16>().ok()?);
        let ok = (h < 24 && m < 60) || (is_end && h == 24 && m == 0);
        ok.then_some(h * 60 + m)
    });
    parsed.map_or_else(
        || {
            cx.err(
                &s.span(),
                format!("bad time {text:?}; write HH:MM in 24-hour form, 00:00 to 23:59 (24:00 allowed as an end)"),
            )
        },
        Ok,
    )
}

fn parse_offset(s: &str) -> Option<time::UtcOffset> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1i8, &s[1..]),
        b'-' => (-1i8, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m) = (h.parse::<i8>().ok()?, m.parse::<i8>().ok()?);
    if h > 14 || m > 59 {
        return None;
    }
    time::UtcOffset::from_hms(sign * h, sign * m, 0).ok()
}

/// A rule's grants; every grant is checked, each error goes to `errs`. Where each grant's
/// duration was written (or the grant, without one) goes to `origins`.
fn grants(
    cx: &FileCtx,
    rule: &str,
    rule_span: &Range<usize>,
    raw: Vec<Spanned<RawGrant>>,
    errs: &mut Vec<PolicyError>,
    origins: &mut Vec<super::GrantOrigin>,
) -> Vec<Grant> {
    if raw.is_empty() {
        keep::<()>(
            errs,
            cx.err(
                rule_span,
                format!(
                    "rule {rule:?} has no [[rule.grant]]; add one (exactly one default grant per rule)"
                ),
            ),
        );
        return Vec::new();
    }
    let single = raw.len() == 1;
    let before = errs.len();
    let mut out: Vec<Grant> = Vec::new();
    let mut aliases: HashMap<String, Origin> = HashMap::new();
    for g in raw {
        let at = g.span();
        if let Some(grant) = keep(errs, grant(cx, rule, single, g, &mut aliases)) {
            let (grant, duration_at) = grant;
            origins.push(super::GrantOrigin {
                rule: rule.to_string(),
                alias: grant.alias.clone(),
                duration: cx.origin(&duration_at.unwrap_or(at)),
            });
            out.push(grant);
        }
    }
    if errs.len() > before {
        return out;
    }
    let defaults = out.iter().filter(|g| g.default).count();
    if defaults != 1 {
        keep::<()>(
            errs,
            cx.err(
                rule_span,
                format!(
                    "rule {rule:?} has {defaults} default grants; mark exactly one [[rule.grant]] with default = true"
                ),
            ),
        );
    }
    // The default grant first: callers serve `grants[0]` at the default path.
    out.sort_by_key(|g| !g.default);
    out
}

/// One `[[rule.grant]]`, with the place of its `duration` when written. Its independent
/// checks all run; their errors come back together.
fn grant(
    cx: &FileCtx,
    rule: &str,
    single: bool,
    g: Spanned<RawGrant>,
    aliases: &mut HashMap<String, Origin>,
) -> Result<(Grant, Option<Range<usize>>), PolicyError> {
    let g = g.into_inner();
    let mut errs = Vec::new();
    let alias = g.alias.get_ref().clone();
    if !valid_alias(&alias) {
        keep::<()>(
            &mut errs,
            cx.err(
                &g.alias.span(),
                format!("bad alias {alias:?}; use 1-64 characters of a-z A-Z 0-9 _ . -"),
            ),
        );
    } else if let Some(first) = aliases.get(&alias) {
        keep::<()>(&mut errs, cx.err(&g.alias.span(), format!("alias {alias:?} is already used in rule {rule:?} at {first}; aliases must be unique within a rule")));
    } else {
        aliases.insert(alias.clone(), cx.origin(&g.alias.span()));
    }
    let default = match &g.default {
        None => single,
        Some(d) if single && !*d.get_ref() => {
            keep::<()>(&mut errs, cx.err(&d.span(), format!("grant {alias:?} is the only grant of rule {rule:?}, so it is the default; remove default = false")));
            true
        }
        Some(d) => *d.get_ref(),
    };
    keep(&mut errs, check_role_arn(cx, &g.role_arn));
    let duration_at = g.duration.as_ref().map(Spanned::span);
    let duration_secs = keep(&mut errs, duration(cx, g.duration.as_ref()));
    let session_policy = keep(
        &mut errs,
        session_policy(cx, g.session_policy, g.session_policy_file),
    );
    let policy_arns = keep(&mut errs, policy_arns(cx, g.policy_arns));
    let session_tags = keep(&mut errs, session_tags(cx, g.session_tags));
    if let Some(e) = PolicyError::from_all(errs) {
        return Err(e);
    }
    let (Some(duration_secs), Some(session_policy), Some(policy_arns), Some(session_tags)) =
        (duration_secs, session_policy, policy_arns, session_tags)
    else {
        unreachable!("every check that gave no value left an error");
    };
    Ok((
        Grant {
            alias,
            default,
            role_arn: g.role_arn.into_inner(),
            method: g.via,
            duration_secs,
            session_policy,
            policy_arns,
            session_tags,
        },
        duration_at,
    ))
}

fn valid_alias(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// IAM names and paths: `[\w+=,.@-]` separated by `/`.
fn iam_path_name(s: &str) -> bool {
    let name = s.rsplit('/').next().unwrap_or("");
    (1..=64).contains(&name.len())
        && s.len() <= 512
        && !s.contains("//")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b))
}

/// `arn:<partition>:iam::<account>:<kind>/<path/name>` → `(account, path/name)`.
fn split_iam_arn<'a>(arn: &'a str, kind: &str) -> Option<(&'a str, &'a str)> {
    let rest = arn.strip_prefix("arn:aws")?;
    let (partition_tail, rest) = rest.split_once(':')?;
    if !partition_tail
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b == b'-')
    {
        return None;
    }
    let rest = rest.strip_prefix("iam::")?;
    let (account, resource) = rest.split_once(':')?;
    let name = resource.strip_prefix(kind)?.strip_prefix('/')?;
    Some((account, name))
}

fn is_account(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

fn check_role_arn(cx: &FileCtx, arn: &Spanned<String>) -> Result<(), PolicyError> {
    let ok = split_iam_arn(arn.get_ref(), "role")
        .is_some_and(|(acct, name)| is_account(acct) && iam_path_name(name));
    if ok {
        return Ok(());
    }
    cx.err(
        &arn.span(),
        format!(
            "bad role_arn {:?}; write arn:aws:iam::<12-digit account>:role/<path/name>",
            arn.get_ref()
        ),
    )
}

fn duration(cx: &FileCtx, raw: Option<&Spanned<toml::Value>>) -> Result<u32, PolicyError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_DURATION);
    };
    let secs = match raw.get_ref() {
        toml::Value::Integer(i) => u64::try_from(*i).ok(),
        toml::Value::String(s) => humantime::parse_duration(s).ok().map(|d| d.as_secs()),
        _ => None,
    };
    let Some(secs) = secs else {
        return cx.err(
            &raw.span(),
            "bad duration; write seconds (3600) or a length such as \"15m\", \"1h\", \"1h30m\"",
        );
    };
    if !(MIN_DURATION..=MAX_DURATION).contains(&secs) {
        return cx.err(
            &raw.span(),
            format!("duration {secs} s is outside the STS limits of 900 s (15m) to 43200 s (12h); note AWS also caps it at the role's MaxSessionDuration"),
        );
    }
    // In range 900..=43200, so it fits.
    Ok(u32::try_from(secs).unwrap_or(DEFAULT_DURATION))
}

fn session_policy(
    cx: &FileCtx,
    inline: Option<Spanned<String>>,
    file: Option<Spanned<String>>,
) -> Result<Option<String>, PolicyError> {
    let (text, span, what) = match (inline, file) {
        (None, None) => return Ok(None),
        (Some(_), Some(f)) => {
            return cx.err(
                &f.span(),
                "session_policy and session_policy_file are both set; keep one",
            )
        }
        (Some(s), None) => (s.get_ref().clone(), s.span(), "session_policy".to_string()),
        (None, Some(f)) => {
            let base = cx.path.parent().unwrap_or_else(|| Path::new("."));
            let path = base.join(f.get_ref());
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    return cx.err(
                        &f.span(),
                        format!("cannot read session_policy_file {}: {e} (paths are relative to the policy file)", path.display()),
                    )
                }
            };
            (
                text,
                f.span(),
                format!("session_policy_file {}", path.display()),
            )
        }
    };
    let value: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            return cx.err(&span, format!("{what} is not JSON: {e}"));
        }
    };
    if !value.is_object() {
        return cx.err(
            &span,
            format!("{what} must be a JSON object (an IAM policy document)"),
        );
    }
    let minified = serde_json::to_string(&value).unwrap_or_default();
    let chars = minified.chars().count();
    if chars > MAX_SESSION_POLICY_CHARS {
        return cx.err(
            &span,
            format!("{what} is {chars} characters after minifying; STS allows at most {MAX_SESSION_POLICY_CHARS}: split the grant or use policy_arns"),
        );
    }
    Ok(Some(minified))
}

fn policy_arns(
    cx: &FileCtx,
    raw: Option<Spanned<Vec<Spanned<String>>>>,
) -> Result<Vec<String>, PolicyError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    if raw.get_ref().len() > MAX_POLICY_ARNS {
        return cx.err(
            &raw.span(),
            format!(
                "{} policy_arns; STS allows at most {MAX_POLICY_ARNS} managed session policies",
                raw.get_ref().len()
            ),
        );
    }
    let mut out = Vec::new();
    for arn in raw.into_inner() {
        let ok = split_iam_arn(arn.get_ref(), "policy")
            .is_some_and(|(acct, name)| (acct == "aws" || is_account(acct)) && iam_path_name(name));
        if !ok {
            return cx.err(
                &arn.span(),
                format!(
                    "bad policy ARN {:?}; write arn:aws:iam::aws:policy/<name> or arn:aws:iam::<12-digit account>:policy/<path/name>",
                    arn.get_ref()
                ),
            );
        }
        out.push(arn.into_inner());
    }
    Ok(out)
}

/// STS tag keys: 1-128 characters of `[\p{L}\p{Z}\p{N}_.:/=+\-@]`, and not `aws:`.
fn valid_tag_key(s: &str) -> bool {
    let n = s.chars().count();
    (1..=128).contains(&n)
        && !s.to_ascii_lowercase().starts_with("aws:")
        && s.chars().all(|c| {
            c.is_alphabetic()
                || c.is_numeric()
                || (c.is_whitespace() && !c.is_control())
                || "_.:/=+-@".contains(c)
        })
}

fn session_tags(
    cx: &FileCtx,
    raw: Option<Spanned<Ordered<String>>>,
) -> Result<Vec<(String, String)>, PolicyError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    if raw.get_ref().0.len() > MAX_TAGS {
        return cx.err(
            &raw.span(),
            format!(
                "{} session_tags; STS allows at most {MAX_TAGS}",
                raw.get_ref().0.len()
            ),
        );
    }
    let mut out = Vec::new();
    for (key, field) in raw.into_inner().0 {
        if !valid_tag_key(key.get_ref()) {
            return cx.err(
                &key.span(),
                format!(
                    "bad session tag key {:?}; STS allows 1-128 letters, digits, spaces and _ . : / = + - @, not starting with aws:",
                    key.get_ref()
                ),
            );
        }
        let f = field.get_ref();
        let known = FIELDS.contains(&f.as_str())
            || f.strip_prefix("claims.").is_some_and(|c| !c.is_empty());
        if !known {
            return cx.err(
                &field.span(),
                format!("session tag {:?}: unknown identity field {f:?}; use one of {} or claims.<name>", key.get_ref(), FIELDS.join(", ")),
            );
        }
        out.push((key.into_inner(), field.into_inner()));
    }
    Ok(out)
}

fn sandbox(cx: &FileCtx, raw: RawSandbox) -> Result<RuleSandbox, PolicyError> {
    Ok(RuleSandbox {
        network: raw.network.map(|v| network(cx, &v)).transpose()?,
        memory_max: raw
            .memory
            .map(|v| size(cx, "memory", &v, MIN_SANDBOX_MEMORY))
            .transpose()?,
        pids_max: raw.pids.map(|v| pids(cx, &v)).transpose()?,
        cpu_millis: raw.cpus.map(|v| cpus(cx, &v)).transpose()?,
        tmpfs_size: raw
            .tmpfs
            .map(|v| size(cx, "tmpfs", &v, MIN_SANDBOX_TMPFS))
            .transpose()?,
    })
}

fn network(cx: &FileCtx, v: &Spanned<toml::Value>) -> Result<RuleNetwork, PolicyError> {
    match v.get_ref().as_str() {
        Some("endpoint-only") => Ok(RuleNetwork::EndpointOnly),
        Some("outbound") => Ok(RuleNetwork::Outbound),
        _ => cx.err(
            &v.span(),
            format!(
                "[rule.sandbox] network {} is not a network mode; use \"endpoint-only\" or \"outbound\"",
                v.get_ref()
            ),
        ),
    }
}

/// A size in bytes: an integer, or a string of a whole number with an optional binary
/// suffix (`"2G"`, `"512MiB"`, `"1048576"`), at least `min`.
fn size(cx: &FileCtx, key: &str, v: &Spanned<toml::Value>, min: u64) -> Result<u64, PolicyError> {
    let bytes = match v.get_ref() {
        toml::Value::Integer(i) => u64::try_from(*i).map_err(|_| "is negative"),
        toml::Value::String(s) => parse_size(s),
        toml::Value::Float(_) => Err("is not a whole number"),
        _ => Err("is not a size"),
    };
    match bytes {
        Ok(b) if b >= min => Ok(b),
        Ok(b) => {
            let shown = match v.get_ref() {
                toml::Value::Integer(_) => format!("{b} is"),
                other => format!("{other} is {b} bytes,"),
            };
            cx.err(
                &v.span(),
                format!(
                    "[rule.sandbox] {key} {shown} below the minimum of {} MiB ({min} bytes)",
                    min >> 20
                ),
            )
        }
        Err(why) => cx.err(
            &v.span(),
            format!(
                "[rule.sandbox] {key} {} {why}; write bytes or a whole number with K, M or G \
                 (or KiB, MiB, GiB; 1024-based), e.g. \"2G\" or \"1536M\"",
                v.get_ref()
            ),
        ),
    }
}

fn parse_size(s: &str) -> Result<u64, &'static str> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(end);
    if number.is_empty() {
        return Err(if s.starts_with('-') {
            "is negative"
        } else {
            "does not start with a number"
        });
    }
    let scale: u64 = match unit {
        "" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ if unit.starts_with(['.', ',']) => return Err("is not a whole number"),
        _ => return Err("has an unknown suffix"),
    };
    // Only digits: a parse error is an overflow.
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or("is too large (2^64 bytes or more)")
}

fn pids(cx: &FileCtx, v: &Spanned<toml::Value>) -> Result<u64, PolicyError> {
    let n = v
        .get_ref()
        .as_integer()
        .and_then(|i| u64::try_from(i).ok())
        .filter(|n| (MIN_SANDBOX_PIDS..=MAX_SANDBOX_PIDS).contains(n));
    n.map_or_else(
        || {
            cx.err(
                &v.span(),
                format!(
                    "[rule.sandbox] pids {} must be a whole number of processes from \
                     {MIN_SANDBOX_PIDS} to {MAX_SANDBOX_PIDS}",
                    v.get_ref()
                ),
            )
        },
        Ok,
    )
}

/// CPUs as thousandths of a CPU, rounded to the nearest.
fn cpus(cx: &FileCtx, v: &Spanned<toml::Value>) -> Result<u64, PolicyError> {
    let n = match v.get_ref() {
        toml::Value::Integer(i) => Some(*i as f64),
        toml::Value::Float(f) => Some(*f),
        _ => None,
    };
    let Some(n) = n.filter(|n| *n > 0.0 && *n <= MAX_SANDBOX_CPUS) else {
        return cx.err(
            &v.span(),
            format!(
                "[rule.sandbox] cpus {} must be a number of CPUs more than 0 and at most \
                 {MAX_SANDBOX_CPUS}, e.g. 1.5",
                v.get_ref()
            ),
        );
    };
    // In (0, 1024]: the product fits.
    let millis = (n * 1000.0).round() as u64;
    if millis < MIN_SANDBOX_CPU_MILLIS {
        return cx.err(
            &v.span(),
            format!(
                "[rule.sandbox] cpus {} is under 0.01 CPU, the least a cgroup can enforce",
                v.get_ref()
            ),
        );
    }
    Ok(millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::EgressTarget;

    const GRANT: &str =
        "[[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n";

    fn load(text: &str) -> Result<PolicySet, PolicyError> {
        load_str(Path::new("p.toml"), text)
    }

    /// The error's Display, which must start with `p.toml:<line>:<column>: `.
    fn err(text: &str) -> String {
        match load(text) {
            Ok(_) => panic!("expected a load error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    fn rule(body: &str) -> String {
        format!("[[rule]]\nname = \"r\"\n[rule.match]\nprovider = \"github\"\n{body}")
    }

    fn assert_err(text: &str, at: &str, needle: &str) {
        let e = err(text);
        assert!(e.starts_with(&format!("p.toml:{at}: ")), "wrong place: {e}");
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
    }

    #[test]
    fn a_valid_rule_loads_with_defaults() {
        let set = load(&rule(&format!("owner = \"acme\"\n{GRANT}"))).unwrap();
        assert_eq!(set.rule_names(), ["r"]);
        let r = &set.rules()[0];
        assert!(r.require_oidc, "require_oidc defaults to true");
        assert_eq!(r.outside_window, OutsideWindow::Refuse);
        assert_eq!(r.origin.line, 1);
        let g = &r.grants[0];
        assert!(g.default, "a single grant is the default");
        assert_eq!((g.method, g.duration_secs), (Method::AssumeRole, 3600));
        assert!(set.warnings().is_empty(), "{:?}", set.warnings());
    }

    #[test]
    fn toml_syntax_error_has_line_and_column() {
        assert_err("[[rule]]\nname = \"r\"\nbroken = \n", "3:10", "");
    }

    /// The `policy` fuzz target's input, cut down: the parser's own message is empty.
    #[test]
    fn a_control_character_in_a_comment_is_named() {
        let text =
            "[[rule]]\nname = \"r\"\n### x = \"y\"\u{1}[rule.match]\nprovider = \"github\"\n";
        assert_err(text, "3:12", "control characters are not allowed");
    }

    #[test]
    fn unknown_keys_are_refused_everywhere() {
        assert_err(
            &rule(&format!("{GRANT}colour = \"red\"\n")),
            "8:1",
            "unknown field `colour`",
        );
        assert_err(
            "[[rule]]\nname = \"r\"\nnmae = \"x\"\n",
            "3:1",
            "unknown field `nmae`",
        );
        assert_err("[[rules]]\nname = \"r\"\n", "1:3", "unknown field `rules`");
        assert_err(
            &rule(&format!(
                "[[rule.window]]\nstart = \"09:00\"\nend = \"10:00\"\nzone = \"x\"\n{GRANT}"
            )),
            "8:1",
            "unknown field `zone`",
        );
    }

    #[test]
    fn unknown_match_field() {
        assert_err(
            &rule(&format!("repo = \"acme/web\"\n{GRANT}")),
            "5:1",
            "unknown match field \"repo\"",
        );
    }

    #[test]
    fn claims_must_be_a_table_and_other_fields_not() {
        assert_err(
            &rule(&format!("claims = \"x\"\n{GRANT}")),
            "5:10",
            "`claims` must be a table",
        );
        assert_err(
            &rule(&format!("ref = {{ a = \"b\" }}\n{GRANT}")),
            "5:7",
            "not a table",
        );
        assert_err(&rule(&format!("ref = []\n{GRANT}")), "5:7", "empty array");
    }

    #[test]
    fn bad_glob_points_at_the_element() {
        assert_err(
            &rule(&format!(
                "ref = [\"refs/heads/main\", \"refs/[x\"]\n{GRANT}"
            )),
            "5:27",
            "bad glob \"refs/[x\"",
        );
        assert_err(
            &rule(&format!("[rule.match.claims]\nsha = \"a**b\"\n{GRANT}")),
            "6:7",
            "claims.sha",
        );
    }

    #[test]
    fn bad_role_and_policy_arns() {
        let g = "[[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::12345:role/r\"\n";
        assert_err(&rule(g), "7:12", "bad role_arn");
        let g = "[[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:user/r\"\n";
        assert_err(&rule(g), "7:12", "bad role_arn");
        let g = format!("{GRANT}policy_arns = [\"arn:aws:iam::aws:policy/ReadOnlyAccess\", \"arn:aws:iam::aws:role/x\"]\n");
        assert_err(
            &rule(&g),
            "8:58",
            "bad policy ARN \"arn:aws:iam::aws:role/x\"",
        );
        let arns = ["\"arn:aws:iam::aws:policy/ReadOnlyAccess\""; 11].join(",");
        assert_err(
            &rule(&format!("{GRANT}policy_arns = [{arns}]\n")),
            "8:15",
            "at most 10",
        );
        // Other partitions are fine.
        let g = "[[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws-us-gov:iam::123456789012:role/ci/deploy\"\n";
        assert!(load(&rule(g)).is_ok());
    }

    #[test]
    fn session_policy_is_checked_and_minified() {
        let g = format!("{GRANT}session_policy = '''{{ \"Version\": \"2012-10-17\",\n \"Statement\": [] }}'''\n");
        let set = load(&rule(&g)).unwrap();
        assert_eq!(
            set.rules()[0].grants[0].session_policy.as_deref(),
            Some(r#"{"Statement":[],"Version":"2012-10-17"}"#)
        );
        assert_err(
            &rule(&format!("{GRANT}session_policy = \"{{nope\"\n")),
            "8:18",
            "is not JSON",
        );
        let big = format!("{{\"Sid\": \"{}\"}}", "x".repeat(2040));
        assert_err(
            &rule(&format!("{GRANT}session_policy = '{big}'\n")),
            "8:18",
            "2050 characters after minifying",
        );
    }

    #[test]
    fn session_policy_file_is_read_relative_to_the_policy_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("s.json"),
            "{\n  \"Version\": \"2012-10-17\"\n}\n",
        )
        .unwrap();
        let path = dir.path().join("p.toml");
        let set = load_str(
            &path,
            &rule(&format!("{GRANT}session_policy_file = \"s.json\"\n")),
        )
        .unwrap();
        assert_eq!(
            set.rules()[0].grants[0].session_policy.as_deref(),
            Some(r#"{"Version":"2012-10-17"}"#)
        );

        let e = load_str(
            &path,
            &rule(&format!("{GRANT}session_policy_file = \"missing.json\"\n")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(&format!(
                "{}:8:23: cannot read session_policy_file",
                path.display()
            )),
            "{e}"
        );

        let both = format!("{GRANT}session_policy = \"{{}}\"\nsession_policy_file = \"s.json\"\n");
        assert_err(&rule(&both), "9:23", "both set");
    }

    #[test]
    fn duplicate_alias_and_default_count() {
        assert_err(
            &rule(&format!("{GRANT}default = true\n{GRANT}")),
            "10:9",
            "alias \"a\" is already used",
        );
        let two = "[[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n\
                   [[rule.grant]]\nalias = \"b\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n";
        assert_err(&rule(two), "1:1", "has 0 default grants");
        let both = two.replace("\"\n[[", "\"\ndefault = true\n[[") + "default = true\n";
        assert_err(&rule(&both), "1:1", "has 2 default grants");
        assert_err(
            "[[rule]]\nname = \"r\"\n[rule.match]\nprovider = \"github\"\n",
            "1:1",
            "has no [[rule.grant]]",
        );
        assert_err(
            &rule(&format!("{GRANT}default = false\n")),
            "8:11",
            "remove default = false",
        );
        assert_err(
            &rule(&GRANT.replace("\"a\"", "\"a/b\"")),
            "6:9",
            "bad alias",
        );
    }

    #[test]
    fn duplicate_rule_names_across_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), rule(GRANT)).unwrap();
        std::fs::write(dir.path().join("b.toml"), format!("\n\n{}", rule(GRANT))).unwrap();
        let e = load_dir_with(dir.path(), &TrustedIssuer::well_known())
            .unwrap_err()
            .to_string();
        let b = dir.path().join("b.toml");
        assert!(
            e.starts_with(&format!(
                "{}:4:8: rule name \"r\" is already used at ",
                b.display()
            )),
            "{e}"
        );
        assert!(e.contains("a.toml:2:8"), "{e}");
    }

    #[test]
    fn session_tags_are_checked() {
        let set = load(&rule(&format!(
            "{GRANT}session_tags = {{ Repository = \"repository\", Sha = \"claims.sha\" }}\n"
        )))
        .unwrap();
        assert_eq!(
            set.rules()[0].grants[0].session_tags,
            [
                ("Repository".to_string(), "repository".to_string()),
                ("Sha".to_string(), "claims.sha".to_string())
            ]
        );
        assert_err(
            &rule(&format!(
                "{GRANT}session_tags = {{ \"a!b\" = \"repository\" }}\n"
            )),
            "8:18",
            "bad session tag key \"a!b\"",
        );
        assert_err(
            &rule(&format!(
                "{GRANT}session_tags = {{ \"aws:x\" = \"repository\" }}\n"
            )),
            "8:18",
            "bad session tag key",
        );
        assert_err(
            &rule(&format!("{GRANT}session_tags = {{ Repo = \"repo\" }}\n")),
            "8:25",
            "unknown identity field \"repo\"",
        );
        let many: Vec<String> = (0..51).map(|i| format!("T{i} = \"run_id\"")).collect();
        assert_err(
            &rule(&format!(
                "{GRANT}session_tags = {{ {} }}\n",
                many.join(", ")
            )),
            "8:16",
            "at most 50",
        );
        // Unicode letters and spaces are allowed by STS.
        assert!(load(&rule(&format!(
            "{GRANT}session_tags = {{ \"Dépôt git\" = \"repository\" }}\n"
        )))
        .is_ok());
    }

    #[test]
    fn durations() {
        let d = |v: &str| {
            load(&rule(&format!("{GRANT}duration = {v}\n")))
                .map(|s| s.rules()[0].grants[0].duration_secs)
        };
        assert_eq!(d("\"15m\"").unwrap(), 900);
        assert_eq!(d("\"2h\"").unwrap(), 7200);
        assert_eq!(d("43200").unwrap(), 43200);
        assert_err(
            &rule(&format!("{GRANT}duration = \"10m\"\n")),
            "8:12",
            "outside the STS limits of 900 s",
        );
        assert_err(
            &rule(&format!("{GRANT}duration = 43201\n")),
            "8:12",
            "43200 s (12h)",
        );
        assert_err(
            &rule(&format!("{GRANT}duration = \"soon\"\n")),
            "8:12",
            "bad duration",
        );
    }

    #[test]
    fn bad_windows() {
        let w = |body: &str| rule(&format!("[[rule.window]]\n{body}\n{GRANT}"));
        assert_err(
            &w("days = [\"mon\", \"fry\"]\nstart = \"09:00\"\nend = \"10:00\""),
            "6:16",
            "unknown day \"fry\"",
        );
        assert_err(
            &w("start = \"9:00\"\nend = \"10:00\""),
            "6:9",
            "bad time \"9:00\"",
        );
        assert_err(&w("start = \"09:00\"\nend = \"24:30\""), "7:7", "bad time");
        assert_err(&w("start = \"24:00\"\nend = \"24:00\""), "6:9", "bad time");
        assert_err(
            &w("start = \"10:00\"\nend = \"09:00\""),
            "7:7",
            "not after start",
        );
        assert_err(
            &w("start = \"09:00\"\nend = \"10:00\"\nutc_offset = \"CET\""),
            "8:14",
            "bad utc_offset",
        );
        assert_err(
            &w("days = []\nstart = \"09:00\"\nend = \"10:00\""),
            "6:8",
            "never opens",
        );
        assert_err(
            &rule(GRANT).replace("[[rule]]\n", "[[rule]]\noutside_window = \"flag\"\n"),
            "2:18",
            "no effect without",
        );
        assert_err(
            &w("start = \"09:00\"\nend = \"10:00\"")
                .replace("[[rule]]\n", "[[rule]]\noutside_window = \"maybe\"\n"),
            "2:18",
            "unknown variant `maybe`",
        );
        let set = load(&w(
            "start = \"09:00\"\nend = \"24:00\"\nutc_offset = \"-05:30\"",
        ))
        .unwrap();
        let win = &set.rules()[0].windows[0];
        assert_eq!((win.start, win.end, win.days), (540, 1440, [true; 7]));
        assert_eq!(
            win.utc_offset,
            time::UtcOffset::from_hms(-5, -30, 0).unwrap()
        );
    }

    #[test]
    fn missing_match_table_is_an_error_and_an_issuer_only_one_a_warning() {
        assert_err(
            &format!("[[rule]]\nname = \"r\"\n{GRANT}"),
            "2:8",
            "no [rule.match] table",
        );
        // An empty table names no issuer: an error (see the scope tests). One that names
        // only the issuer matches every job of it: allowed, with a warning at the table.
        let set = load(&format!(
            "[[rule]]\nname = \"r\"\n[rule.match]\nprovider = \"github\"\n{GRANT}"
        ))
        .unwrap();
        assert_eq!(
            set.warnings(),
            ["p.toml:3:1: rule \"r\": the [rule.match] table names only the rule's issuer, so this rule \
              matches every job of https://token.actions.githubusercontent.com (github)"]
        );
    }

    #[test]
    fn warnings_for_buildkite_and_short_grants() {
        let bk = |m: &str| {
            let text = format!("[[rule]]\nname = \"r\"\n[rule.match]\n{m}\n{GRANT}");
            load(&text)
                .unwrap()
                .warnings()
                .iter()
                .any(|w| w.contains("Buildkite"))
        };
        assert!(bk("provider = \"buildkite\""));
        assert!(bk(
            "issuer = \"https://agent.buildkite.com\"\nrepository = \"*/deploy\""
        ));
        assert!(bk("provider = \"buildkite\"\nowner = \"acme-*\""));
        assert!(!bk("provider = \"buildkite\"\nowner = \"acme\""));
        assert!(!bk("provider = \"buildkite\"\nrepository = \"acme/*\""));
        // An organisation (or pipeline) id pins the organisation, whatever its slug.
        assert!(!bk(
            "provider = \"buildkite\"\norganization_id = \"0184990a-477b-4fa8-9968-496074483c77\""
        ));
        assert!(!bk(
            "provider = \"buildkite\"\npipeline_id = \"0184990a-4782\""
        ));
        assert!(!bk("provider = \"github\""));
        assert!(!bk(
            "issuer = \"https://token.actions.githubusercontent.com\""
        ));

        let set = load(&rule(&format!(
            "owner = \"acme\"\n{GRANT}duration = \"20m\"\n"
        )))
        .unwrap();
        assert_eq!(set.warnings().len(), 1);
        assert!(
            set.warnings()[0].starts_with("p.toml:1:1: rule \"r\" grant \"a\": duration 1200 s"),
            "{:?}",
            set.warnings()
        );
    }

    #[test]
    fn every_error_of_every_rule_and_file_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        // Rule "a": a bad alias and a bad duration in one grant, and a bad window day.
        let a = rule(
            "[[rule.window]]\ndays = [\"mon\", \"funday\"]\nstart = \"09:00\"\nend = \"17:00\"\n\
             [[rule.grant]]\nalias = \"no spaces\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\nduration = 60\n",
        );
        // Rule "b" is fine; rule "c" has an unknown match field and a bad role ARN.
        let b = rule(GRANT).replace("\"r\"", "\"b\"");
        let c = rule(
            "repo = \"acme/web\"\n[[rule.grant]]\nalias = \"x\"\nrole_arn = \"arn:aws:iam::12345:role/r\"\n",
        )
        .replace("\"r\"\n[rule.match]", "\"c\"\n[rule.match]");
        std::fs::write(
            dir.path().join("10-a.toml"),
            format!("{}{b}{c}", a.replace("\"r\"", "\"a\"")),
        )
        .unwrap();
        // A second file with a syntax error: reported too, at its place.
        std::fs::write(dir.path().join("20-b.toml"), "[[rule]\n").unwrap();
        let e = load_dir_with(dir.path(), &TrustedIssuer::well_known()).unwrap_err();
        let all: Vec<String> = e.errors().iter().map(ToString::to_string).collect();
        let text = e.to_string();
        for needle in [
            "unknown day \"funday\"",
            "bad alias \"no spaces\"",
            "duration 60 s is outside the STS limits",
            "unknown match field \"repo\"",
            "bad role_arn",
            "20-b.toml:1:",
        ] {
            let n = all.iter().filter(|m| m.contains(needle)).count();
            assert_eq!(n, 1, "{needle:?} should be reported once in {all:#?}");
            assert_eq!(text.matches(needle).count(), 1, "{text}");
        }
        assert_eq!(all.len(), 6, "{all:#?}");
        assert!(text.ends_with("6 errors"), "{text}");
        assert!(
            all.iter().all(|m| m.contains(".toml:")),
            "every error names its file and line: {all:#?}"
        );
        // The errors of one file come in the order of their lines.
        let lines: Vec<usize> = e
            .errors()
            .iter()
            .filter_map(|e| match e {
                PolicyError::Invalid { origin, .. } if origin.file.ends_with("10-a.toml") => {
                    Some(origin.line)
                }
                _ => None,
            })
            .collect();
        assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{lines:?}");
    }

    #[test]
    fn grants_longer_than_a_chained_session_are_warned_at_their_duration() {
        let text = rule(
            "[[rule.grant]]\nalias = \"long\"\ndefault = true\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\nduration = \"2h\"\n\
             [[rule.grant]]\nalias = \"hour\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\nduration = 3600\n\
             [[rule.grant]]\nalias = \"wi\"\nvia = \"web-identity\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\nduration = \"3h\"\n",
        );
        let set = load(&text).unwrap();
        let w = set.chained_session_warnings(3600, "source = \"imds\"");
        assert_eq!(w.len(), 1, "only the assume-role grant over an hour: {w:?}");
        assert!(
            w[0].starts_with("p.toml:9:12: "),
            "at the duration value: {w:?}"
        );
        assert!(
            w[0].contains("\"long\"") && w[0].contains("7200 s"),
            "{w:?}"
        );
        assert!(w[0].contains("source = \"imds\""), "{w:?}");
    }

    #[test]
    fn directory_order_and_missing_or_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            load_dir_with(dir.path(), &TrustedIssuer::well_known())
                .unwrap()
                .is_empty(),
            "an empty directory denies everything"
        );
        let two = |a: &str, b: &str| {
            format!(
                "{}{}",
                rule(GRANT).replace("\"r\"", a),
                rule(GRANT).replace("\"r\"", b)
            )
        };
        std::fs::write(dir.path().join("20-b.toml"), two("\"b1\"", "\"b2\"")).unwrap();
        std::fs::write(dir.path().join("10-a.toml"), two("\"a1\"", "\"a2\"")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a policy").unwrap();
        std::fs::write(dir.path().join(".#10-a.toml"), "garbage = ").unwrap();
        std::fs::create_dir(dir.path().join("sub.toml")).unwrap();
        assert_eq!(
            load_dir_with(dir.path(), &TrustedIssuer::well_known())
                .unwrap()
                .rule_names(),
            ["a1", "a2", "b1", "b2"]
        );

        let set = load_dir_with(dir.path(), &TrustedIssuer::well_known()).unwrap();
        let skipped: Vec<&String> = set
            .warnings()
            .iter()
            .filter(|w| w.contains("not loaded"))
            .collect();
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].contains("notes.txt"), "{skipped:?}");

        let missing = dir.path().join("nope");
        let e = load_dir_with(&missing, &TrustedIssuer::well_known()).unwrap_err();
        assert!(matches!(e, PolicyError::ReadDir { .. }), "{e}");
        assert!(
            e.to_string().contains("cannot read the policy directory"),
            "{e}"
        );
    }

    #[test]
    fn the_egress_and_sandbox_tables_are_both_checked() {
        let text = rule(&format!(
            "{GRANT}[rule.egress]\nallow = [\"github.com:443\"]\n[rule.sandbox]\nmemory = \"2G\"\n"
        ));
        let set = load(&text).unwrap();
        let r = set.rule("r").unwrap();
        let egress = r.egress.as_ref().unwrap();
        assert_eq!(egress.mode, EgressMode::Block);
        assert_eq!(egress.allow[0].to_string(), "github.com:443");
        // The allowlist narrows outbound: a rule that does not say so gets it.
        assert_eq!(
            r.sandbox,
            Some(RuleSandbox {
                network: Some(RuleNetwork::Outbound),
                memory_max: Some(2_147_483_648),
                ..RuleSandbox::default()
            })
        );
    }

    /// The rule's `[rule.egress]` (line 8), with `body` as its keys (line 9 onwards).
    fn egress_rule(body: &str) -> String {
        rule(&format!("{GRANT}[rule.egress]\n{body}\n"))
    }

    fn load_egress(body: &str) -> RuleEgress {
        load(&egress_rule(body))
            .unwrap_or_else(|e| panic!("{body}: {e}"))
            .rules()[0]
            .egress
            .clone()
            .unwrap()
    }

    #[test]
    fn egress_entries_of_every_form_load_in_order_with_their_place() {
        let e = load_egress(
            "mode = \"audit\"\nallow = [\n  \"GitHub.com.:443\",\n  \"*.githubusercontent.com:443\",\n  \
             \"203.0.113.0/24:8443\", # a comment\n  \"[2001:db8::/32]:443\",\n]",
        );
        assert_eq!(e.mode, EgressMode::Audit);
        let shown: Vec<(String, &str, bool)> = e
            .allow
            .iter()
            .map(|a| (a.to_string(), a.origin.as_str(), a.baseline))
            .collect();
        assert_eq!(
            shown,
            [
                ("github.com:443".to_string(), "p.toml:11:3", false),
                (
                    "*.githubusercontent.com:443".to_string(),
                    "p.toml:12:3",
                    false
                ),
                ("203.0.113.0/24:8443".to_string(), "p.toml:13:3", false),
                ("[2001:db8::/32]:443".to_string(), "p.toml:14:3", false),
            ]
        );
        assert_eq!(
            e.allow[1].target,
            EgressTarget::Wildcard("githubusercontent.com".into())
        );
        // Defaults: block mode; no entries (only the baseline, if any).
        let e = load_egress("");
        assert_eq!((e.mode, e.allow.len()), (EgressMode::Block, 0));
        assert_eq!(load_egress("mode = \"block\"").mode, EgressMode::Block);
    }

    #[test]
    fn egress_audit_mode_and_duplicates_are_warnings() {
        let set = load(&egress_rule(
            "mode = \"audit\"\nallow = [\"a.example.com:443\", \"A.example.com.:443\", \"a.example.com:80\"]",
        ))
        .unwrap();
        assert_eq!(set.rules()[0].egress.as_ref().unwrap().allow.len(), 2);
        // The third: the rule's [rule.match] names only its issuer.
        assert_eq!(set.warnings().len(), 3, "{:?}", set.warnings());
        assert!(
            set.warnings()[2].starts_with(
                "p.toml:1:1: rule \"r\": [rule.egress] mode = \"audit\" lets its jobs reach"
            ),
            "{:?}",
            set.warnings()
        );
        assert_eq!(
            set.warnings()[0],
            "p.toml:10:31: rule \"r\": [rule.egress] allow lists a.example.com:443 again (first at p.toml:10:10); \
             the duplicate is ignored"
        );
    }

    #[test]
    fn bad_egress_entries_are_errors_at_the_entry() {
        for (entry, why) in [
            ("", "is empty"),
            ("github.com :443", "contains a space"),
            ("https://github.com", "is a URL"),
            ("github.com", "has no port"),
            ("github.com:0", "has the port 0, outside 1 to 65535"),
            ("github.com:65536", "has the port 65536, outside 1 to 65535"),
            (
                "github.com:443-444",
                "has the port range 443-444; ranges are not supported",
            ),
            ("*:443", "is `*` alone"),
            ("*.com:443", "a wildcard needs at least two labels"),
            ("a.*.com:443", "`*` other than as the whole first label"),
            ("-a.example.com:443", "starts or ends with `-`"),
            ("a..example.com:443", "empty label"),
            ("192.0.2.1:443", "is an IP address; write it as a network"),
            ("[2001:db8::1]:443", "is an address, not a network"),
            ("2001:db8::/32:443", "write IPv6 networks in brackets"),
            ("203.0.113.1/24:443", "has host bits set"),
            ("203.0.113.0/33:443", "an IPv4 prefix length is 0 to 32"),
            ("[2001:db8::/129]:443", "an IPv6 prefix length is 0 to 128"),
            ("169.254.169.254/32:80", "which no job may reach"),
            ("0.0.0.0/0:443", "which no job may reach"),
        ] {
            let e = err(&egress_rule(&format!("allow = [{entry:?}]")));
            let want = format!("p.toml:9:10: [rule.egress] allow entry {entry:?} ");
            assert!(
                e.starts_with(&want),
                "{entry:?}: {e:?} does not start with {want:?}"
            );
            assert!(e.contains(why), "{entry:?}: {e:?} lacks {why:?}");
        }
        // A later entry is found at its own line and column.
        assert_err(
            &egress_rule("allow = [\n    \"github.com:443\",\n    \"*.com:443\",\n]"),
            "11:5",
            "[rule.egress] allow entry \"*.com:443\" is *.com",
        );
        assert_err(
            &egress_rule("allow = [\"github.com:443\", \"github.com:http\"]"),
            "9:28",
            "allow entry \"github.com:http\" has the port \"http\"",
        );
    }

    #[test]
    fn bad_egress_keys_and_values() {
        assert_err(
            &egress_rule("alow = [\"github.com:443\"]"),
            "9:1",
            "unknown field `alow`, expected `mode` or `allow`",
        );
        assert_err(
            &egress_rule("mode = \"deny\""),
            "9:8",
            "[rule.egress] mode \"deny\" is not an egress mode; use \"block\" (the default) or \"audit\"",
        );
        assert_err(&egress_rule("mode = true"), "9:8", "mode true is not");
        assert_err(
            &egress_rule("allow = \"github.com:443\""),
            "9:9",
            "invalid type: string \"github.com:443\", expected a sequence",
        );
        assert_err(
            &egress_rule("allow = [443]"),
            "9:10",
            "invalid type: integer `443`, expected a string",
        );
    }

    #[test]
    fn egress_with_endpoint_only_is_a_contradiction() {
        let text = rule(&format!(
            "{GRANT}[rule.egress]\nallow = [\"github.com:443\"]\n[rule.sandbox]\nnetwork = \"endpoint-only\"\n"
        ));
        assert_err(
            &text,
            "11:11",
            "rule \"r\": [rule.sandbox] network = \"endpoint-only\" contradicts its [rule.egress] at p.toml:8:1",
        );
        // Either order of the tables.
        let text = rule(&format!(
            "{GRANT}[rule.sandbox]\nnetwork = \"endpoint-only\"\n[rule.egress]\nmode = \"audit\"\n"
        ));
        assert_err(
            &text,
            "9:11",
            "contradicts its [rule.egress] at p.toml:10:1",
        );
        // Outbound is what an allowlist narrows.
        let text = rule(&format!(
            "{GRANT}[rule.sandbox]\nnetwork = \"outbound\"\npids = 64\n[rule.egress]\n"
        ));
        let set = load(&text).unwrap();
        let r = &set.rules()[0];
        assert_eq!(
            r.sandbox.as_ref().unwrap().network,
            Some(RuleNetwork::Outbound)
        );
        assert_eq!(r.sandbox.as_ref().unwrap().pids_max, Some(64));
        // Without [rule.egress], the sandbox stays as written.
        assert_eq!(load(&rule(GRANT)).unwrap().rules()[0].sandbox, None);
    }

    #[test]
    fn baselines_merge_across_files_once_each_and_only_into_rules_with_egress() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("00-base.toml"),
            "# what the runner needs\n[egress]\nbaseline = [\"github.com:443\", \"*.actions.githubusercontent.com:443\"]\n",
        )
        .unwrap();
        let with = rule(&format!(
            "{GRANT}[rule.egress]\nallow = [\"GITHUB.com:443\", \"registry.npmjs.org:443\"]\n"
        ));
        std::fs::write(
            dir.path().join("10-rules.toml"),
            format!(
                "[egress]\nbaseline = [\"github.com.:443\", \"api.github.com:443\"]\n{with}{}",
                rule(GRANT).replace("\"r\"", "\"plain\"")
            ),
        )
        .unwrap();
        let set = load_dir_with(dir.path(), &TrustedIssuer::well_known()).unwrap();
        let base: Vec<(String, bool, String)> = set
            .baseline()
            .iter()
            .map(|a| {
                let file = a.origin.rsplit('/').next().unwrap_or_default().to_string();
                (a.to_string(), a.baseline, file)
            })
            .collect();
        assert_eq!(
            base,
            [
                (
                    "github.com:443".to_string(),
                    true,
                    "00-base.toml:3:13".to_string()
                ),
                (
                    "*.actions.githubusercontent.com:443".to_string(),
                    true,
                    "00-base.toml:3:31".to_string()
                ),
                (
                    "api.github.com:443".to_string(),
                    true,
                    "10-rules.toml:2:32".to_string()
                ),
            ]
        );
        let p = set.egress_for("r").unwrap();
        let shown: Vec<(String, bool)> = p
            .allow
            .iter()
            .map(|a| (a.to_string(), a.baseline))
            .collect();
        assert_eq!(
            shown,
            [
                ("github.com:443".to_string(), false),
                ("registry.npmjs.org:443".to_string(), false),
                ("*.actions.githubusercontent.com:443".to_string(), true),
                ("api.github.com:443".to_string(), true),
            ]
        );
        assert_eq!(
            p.ports_for("pipelines.actions.githubusercontent.com"),
            [443]
        );
        assert!(!p.name_allowed("actions.githubusercontent.com"));
        assert_eq!(set.egress_for("plain"), None);
        assert_eq!(set.egress_for("nope"), None);
        // The rule keeps its own entries only.
        assert_eq!(
            set.rule("r").unwrap().egress.as_ref().unwrap().allow.len(),
            2
        );
    }

    #[test]
    fn bad_baselines_are_errors_at_their_place() {
        assert_err(
            "[egress]\nbaseline = [\"github.com:443\", \"*.com:443\"]\n",
            "2:31",
            "[egress] baseline entry \"*.com:443\" is *.com",
        );
        assert_err(
            "[egress]\nallow = [\"github.com:443\"]\n",
            "2:1",
            "unknown field `allow`, expected `baseline`",
        );
        assert_err(
            "[egress]\nmode = \"audit\"\n",
            "2:1",
            "unknown field `mode`, expected `baseline`",
        );
    }

    /// The rule's `[rule.sandbox]`, with `body` as its keys (line 9 onwards).
    fn sandbox_rule(body: &str) -> String {
        rule(&format!("{GRANT}[rule.sandbox]\n{body}\n"))
    }

    fn load_sandbox(body: &str) -> Option<RuleSandbox> {
        load(&sandbox_rule(body))
            .unwrap_or_else(|e| panic!("{body}: {e}"))
            .rules()[0]
            .sandbox
            .clone()
    }

    #[test]
    fn sandbox_section_parses_to_bytes_and_millis() {
        assert_eq!(
            load_sandbox(
                "network = \"outbound\"\nmemory = \"2G\"\npids = 512\ncpus = 1.5\ntmpfs = \"512MiB\""
            ),
            Some(RuleSandbox {
                network: Some(RuleNetwork::Outbound),
                memory_max: Some(2 << 30),
                pids_max: Some(512),
                cpu_millis: Some(1500),
                tmpfs_size: Some(512 << 20),
            })
        );
        let one = |body: &str| load_sandbox(body).unwrap();
        assert_eq!(
            one("network = \"endpoint-only\"").network,
            Some(RuleNetwork::EndpointOnly)
        );
        // Sizes: K, M, G and KiB, MiB, GiB are powers of 1024; bare numbers are bytes.
        for (v, bytes) in [
            ("\"16M\"", 16 << 20),
            ("\"16384K\"", 16 << 20),
            ("\"16384KiB\"", 16 << 20),
            ("\"1GiB\"", 1 << 30),
            ("\"4096M\"", 4 << 30),
            ("\"16777216\"", 16 << 20),
            ("16777216", 16 << 20),
        ] {
            assert_eq!(one(&format!("memory = {v}")).memory_max, Some(bytes), "{v}");
        }
        assert_eq!(one("tmpfs = \"1M\"").tmpfs_size, Some(1 << 20));
        assert_eq!(one("pids = 16").pids_max, Some(16));
        assert_eq!(one("pids = 4194304").pids_max, Some(4_194_304));
        // CPUs: integers too, rounded to the nearest thousandth, up to 1024.
        for (v, millis) in [
            ("2", 2000),
            ("0.01", 10),
            ("0.0125", 13),
            ("1.2344", 1234),
            ("1024", 1_024_000),
        ] {
            assert_eq!(one(&format!("cpus = {v}")).cpu_millis, Some(millis), "{v}");
        }
        // An empty table sets nothing: the agent's defaults, as without one.
        assert_eq!(load_sandbox(""), None);
    }

    #[test]
    fn bad_sandbox_values_name_the_key_and_the_place() {
        for (body, at, needle) in [
            ("swap = \"1G\"", "9:1", "unknown field `swap`"),
            (
                "network = \"internet\"",
                "9:11",
                "network \"internet\" is not a network mode",
            ),
            (
                "network = true",
                "9:11",
                "network true is not a network mode",
            ),
            (
                "memory = \"2X\"",
                "9:10",
                "memory \"2X\" has an unknown suffix",
            ),
            (
                "memory = \"2g\"",
                "9:10",
                "memory \"2g\" has an unknown suffix",
            ),
            (
                "memory = \"0\"",
                "9:10",
                "memory \"0\" is 0 bytes, below the minimum of 16 MiB",
            ),
            (
                "memory = 0",
                "9:10",
                "memory 0 is below the minimum of 16 MiB",
            ),
            (
                "memory = \"15M\"",
                "9:10",
                "below the minimum of 16 MiB (16777216 bytes)",
            ),
            ("memory = \"-1G\"", "9:10", "memory \"-1G\" is negative"),
            ("memory = -1", "9:10", "memory -1 is negative"),
            (
                "memory = \"1.5G\"",
                "9:10",
                "memory \"1.5G\" is not a whole number",
            ),
            ("memory = 2.5", "9:10", "memory 2.5 is not a whole number"),
            (
                "memory = \"G\"",
                "9:10",
                "memory \"G\" does not start with a number",
            ),
            (
                "memory = \"\"",
                "9:10",
                "memory \"\" does not start with a number",
            ),
            ("memory = \"2 G\"", "9:10", "has an unknown suffix"),
            ("memory = \"17179869184G\"", "9:10", "is too large"),
            ("memory = \"99999999999999999999\"", "9:10", "is too large"),
            ("memory = [1]", "9:10", "memory [1] is not a size"),
            (
                "pids = 3",
                "9:8",
                "pids 3 must be a whole number of processes from 16 to 4194304",
            ),
            ("pids = 4194305", "9:8", "pids 4194305 must be"),
            ("pids = -16", "9:8", "pids -16 must be"),
            ("pids = \"512\"", "9:8", "pids \"512\" must be"),
            (
                "cpus = 0",
                "9:8",
                "cpus 0 must be a number of CPUs more than 0",
            ),
            ("cpus = -1", "9:8", "cpus -1 must be"),
            ("cpus = 1024.5", "9:8", "at most 1024"),
            ("cpus = nan", "9:8", "cpus nan must be"),
            ("cpus = inf", "9:8", "cpus inf must be"),
            ("cpus = \"2\"", "9:8", "cpus \"2\" must be"),
            ("cpus = 0.004", "9:8", "cpus 0.004 is under 0.01 CPU"),
            (
                "tmpfs = \"1.5G\"",
                "9:9",
                "tmpfs \"1.5G\" is not a whole number",
            ),
            (
                "tmpfs = \"512K\"",
                "9:9",
                "tmpfs \"512K\" is 524288 bytes, below the minimum of 1 MiB",
            ),
        ] {
            let e = err(&sandbox_rule(body));
            assert!(
                e.starts_with(&format!("p.toml:{at}: ")),
                "{body}: wrong place: {e}"
            );
            assert!(e.contains(needle), "{body}: {e:?} lacks {needle:?}");
        }
        // A bad value later in the table is found too, at its own line.
        assert_err(
            &sandbox_rule("network = \"outbound\"\npids = 8"),
            "10:8",
            "[rule.sandbox] pids 8",
        );
    }

    #[test]
    fn the_shipped_commented_egress_example_loads_when_uncommented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/10-production.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let set = load_str(&path, &text).unwrap();
        assert_eq!(set.rule("web-production").unwrap().egress, None);
        let at = text.find("# [rule.egress]").expect("the commented example");
        let uncommented: String = text[at..]
            .lines()
            .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l)))
            .collect();
        let set = load_str(&path, &format!("{}{uncommented}", &text[..at])).unwrap();
        let p = set.egress_for("web-production").unwrap();
        assert_eq!(p.mode, EgressMode::Block);
        assert_eq!(p.ports_for("sts.us-east-1.amazonaws.com"), [443]);
        assert!(!p.name_allowed("amazonaws.com"));
        assert_eq!(p.ports_for("GitHub.com."), [443]);
    }

    #[test]
    fn shipped_policies_load_without_errors_or_warnings() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let set =
            load_dir_with(&dir, &TrustedIssuer::well_known()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            set.rule_names(),
            ["web-production", "web-staging", "acme-ci-readonly"]
        );
        assert!(set.warnings().is_empty(), "{:?}", set.warnings());
        let prod = set.rule("web-production").unwrap();
        let deploy = &prod.grants[0];
        assert_eq!((deploy.alias.as_str(), deploy.default), ("deploy", true));
        assert_eq!(
            deploy.role_arn,
            "arn:aws:iam::123456789012:role/web-prod-deploy"
        );
        let tags: Vec<&str> = deploy
            .session_tags
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(tags, ["Repository", "Run", "Attempt", "Environment"]);
        let policy = deploy.session_policy.as_deref().unwrap();
        assert!(!policy.contains('\n') && policy.contains("2012-10-17"));
        assert_eq!(prod.grants[1].method, Method::WebIdentity);
        let ro = &set.rule("acme-ci-readonly").unwrap().grants[0];
        assert_eq!((ro.duration_secs, ro.policy_arns.len()), (1800, 1));
    }

    const GH: &str = "https://token.actions.githubusercontent.com";
    const BK: &str = "https://agent.buildkite.com";
    const GL_A: &str = "https://gitlab.a.example";
    const GL_B: &str = "https://gitlab.b.example";

    /// An agent that trusts GitHub, Buildkite and two GitLab instances.
    fn four_issuers() -> Vec<TrustedIssuer> {
        [
            (GH, Provider::Github),
            (BK, Provider::Buildkite),
            (GL_A, Provider::Gitlab),
            (GL_B, Provider::Gitlab),
        ]
        .into_iter()
        .map(|(issuer, provider)| TrustedIssuer {
            issuer: issuer.into(),
            provider,
        })
        .collect()
    }

    /// A rule whose [rule.match] (line 4 on) is `keys`, loaded against [`four_issuers`].
    fn scoped(keys: &str, require_oidc: bool) -> Result<PolicySet, PolicyError> {
        // Line 3 holds require_oidc either way, so the keys start on line 4.
        let oidc = if require_oidc {
            "# oidc only"
        } else {
            "require_oidc = false"
        };
        let text = format!("[[rule]]\nname = \"r\"\n{oidc}\n[rule.match]\n{keys}\n{GRANT}");
        load_str_with(Path::new("p.toml"), &text, &four_issuers())
    }

    fn scoped_err(keys: &str, require_oidc: bool) -> String {
        match scoped(keys, require_oidc) {
            Ok(_) => panic!("expected a load error for:\n{keys}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_rule_trusts_exactly_one_configured_issuer() {
        let scope = |keys: &str| scoped(keys, true).unwrap().rules()[0].scope.clone();
        let s = scope("provider = \"github\"\nowner = \"acme\"");
        assert_eq!(
            (s.issuer.as_deref(), s.provider, s.written.as_str()),
            (Some(GH), Provider::Github, "provider = \"github\"")
        );
        let s = scope(&format!("issuer = \"{GL_B}\"\nowner = \"acme\""));
        assert_eq!(
            (s.issuer.as_deref(), s.provider),
            (Some(GL_B), Provider::Gitlab)
        );
        // The scope replaces the issuer and provider keys; a consistent provider may stay.
        let set = scoped(
            &format!("issuer = [\"{GL_A}\"]\nprovider = \"gitlab\"\nowner = \"acme\""),
            true,
        )
        .unwrap();
        assert_eq!(set.rules()[0].scope.issuer.as_deref(), Some(GL_A));
        let keys: Vec<&str> = set.rules()[0]
            .matchers
            .iter()
            .map(|m| m.field.as_str())
            .collect();
        assert_eq!(keys, ["owner"]);

        for (keys, at, needles) in [
            // Neither: at the rule, naming every configured issuer.
            (
                "owner = \"acme\"".to_string(),
                "1:1",
                vec![
                    "rule \"r\" does not say which issuer it trusts; add issuer = ",
                    "configured: https://token.actions.githubusercontent.com (github), https://agent.buildkite.com (buildkite), https://gitlab.a.example (gitlab), https://gitlab.b.example (gitlab)",
                    "a Buildkite organisation or GitLab group called like a GitHub organisation",
                ],
            ),
            // A provider two configured issuers have.
            (
                "provider = \"gitlab\"\nowner = \"acme\"".to_string(),
                "5:12",
                vec![
                    "provider = \"gitlab\" could match tokens of 2 configured issuers (https://gitlab.a.example, https://gitlab.b.example)",
                    "write issuer = \"https://gitlab.a.example\"",
                ],
            ),
            (
                "provider = [\"github\", \"buildkite\"]".to_string(),
                "5:12",
                vec!["provider lists 2 providers, so it could match tokens of several issuers"],
            ),
            (
                "provider = \"git*\"".to_string(),
                "5:12",
                vec!["provider \"git*\" is a glob, which could match tokens of several issuers"],
            ),
            (
                "provider = \"githb\"".to_string(),
                "5:12",
                vec!["provider \"githb\" is not a provider; write one of github, gitlab, buildkite, generic"],
            ),
            (
                format!("issuer = [\"{GH}\", \"{BK}\"]\nowner = \"acme\""),
                "5:10",
                vec!["issuer lists 2 issuers, and a rule trusts exactly one"],
            ),
            (
                "issuer = \"https://*.example\"".to_string(),
                "5:10",
                vec!["issuer \"https://*.example\" is a glob"],
            ),
            (
                "issuer = \"https://evil.example\"".to_string(),
                "5:10",
                vec!["issuer \"https://evil.example\" is not configured, so this rule could never match; configured: "],
            ),
            (
                format!("issuer = \"{GH}/\""),
                "5:10",
                vec!["(did you mean \"https://token.actions.githubusercontent.com\"? issuers are compared exactly)"],
            ),
            (
                format!("issuer = \"{GH}\"\nprovider = \"buildkite\""),
                "6:12",
                vec!["provider = \"buildkite\" contradicts issuer \"https://token.actions.githubusercontent.com\", a github issuer"],
            ),
            (
                "provider = \"generic\"".to_string(),
                "5:12",
                vec!["provider = \"generic\" names no configured issuer, so this rule could never match"],
            ),
        ] {
            let e = scoped_err(&keys, true);
            assert!(e.starts_with(&format!("p.toml:{at}: ")), "{keys}: wrong place: {e}");
            for n in needles {
                assert!(e.contains(n), "{keys}: {e:?} lacks {n:?}");
            }
        }
        // No configured issuer of the provider: with require_oidc = false the rule is
        // scoped to attested identities of that provider (and warned about).
        let set = scoped("provider = \"generic\"\nsubject = \"x\"", false).unwrap();
        assert_eq!(set.rules()[0].scope.issuer, None);
        assert!(
            set.warnings().iter().any(|w| w.starts_with(
                "p.toml:1:1: rule \"r\" matches only runner-attested generic identities"
            )),
            "{:?}",
            set.warnings()
        );
        // An agent without issuers loads no OIDC rule, and says why.
        let e = load_str_with(Path::new("p.toml"), &rule(GRANT), &[]).unwrap_err();
        assert!(
            e.to_string()
                .contains("configured: none: the agent's configuration has no [[issuer]]"),
            "{e}"
        );
    }

    #[test]
    fn id_pins_are_exact_ids_of_the_rules_issuer_in_oidc_rules() {
        let set = scoped(
            "provider = \"github\"\nrepository_id = 700001\nrepository_owner_id = [\"500001\", \"500002\"]",
            true,
        )
        .unwrap();
        let pins: Vec<String> = set.rules()[0]
            .matchers
            .iter()
            .filter(|m| m.id_pin)
            .map(Matcher::written)
            .collect();
        assert_eq!(
            pins,
            [
                "repository_id = \"700001\"",
                "repository_owner_id = [\"500001\", \"500002\"]"
            ]
        );
        assert!(scoped(
            &format!("issuer = \"{GL_A}\"\nproject_id = \"22\"\nnamespace_id = \"7\""),
            true
        )
        .is_ok());
        assert!(scoped(
            "provider = \"buildkite\"\norganization_id = \"0184990a-477b\"",
            true
        )
        .is_ok());

        for (keys, oidc, at, needle) in [
            (
                "provider = \"github\"\nrepository_owner_id = \"5*\"",
                true,
                "6:23",
                "match field \"repository_owner_id\": an id pin is compared exactly, so \"5*\" would match no token",
            ),
            (
                "provider = \"github\"\nrepository_id = [\"1\", \"\"]",
                true,
                "6:23",
                "an id pin is compared exactly",
            ),
            (
                "issuer = \"https://gitlab.a.example\"\nrepository_id = \"700001\"",
                true,
                "6:1",
                "repository_id is an id of github tokens, and the rule trusts https://gitlab.a.example (gitlab) \
                 (issuer = \"https://gitlab.a.example\"), so it could never match; its tokens' ids are project_id, namespace_id",
            ),
            (
                "provider = \"buildkite\"\nproject_id = \"22\"",
                true,
                "6:1",
                "its tokens' ids are organization_id, pipeline_id",
            ),
            (
                "provider = \"github\"\nrepository_owner_id = \"500001\"",
                false,
                "6:1",
                "rule \"r\" pins repository_owner_id but sets require_oidc = false: runner-attested claims could carry any id",
            ),
        ] {
            let e = scoped_err(keys, oidc);
            assert!(e.starts_with(&format!("p.toml:{at}: ")), "{keys}: wrong place: {e}");
            assert!(e.contains(needle), "{keys}: {e:?} lacks {needle:?}");
        }
        // Generic issuers have no ids airlock knows.
        let generic = [TrustedIssuer {
            issuer: "https://ci.example".into(),
            provider: Provider::Generic,
        }];
        let text =
            "[[rule]]\nname = \"r\"\n[rule.match]\nprovider = \"generic\"\nproject_id = \"1\"\n";
        let e = load_str_with(Path::new("p.toml"), &format!("{text}{GRANT}"), &generic)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("match one of their claims under [rule.match.claims]"),
            "{e}"
        );
    }

    #[test]
    fn the_configured_issuers_give_their_providers_as_the_verifier_does() {
        let cfg = crate::config::Config::parse(
            Path::new("a.toml"),
            "[[issuer]]\nissuer = \"https://token.actions.githubusercontent.com\"\naudiences = [\"a\"]\n\
             [[issuer]]\nissuer = \"https://gitlab.example.com\"\naudiences = [\"a\"]\n\
             [[issuer]]\nissuer = \"https://ci.example.com\"\naudiences = [\"a\"]\nprovider = \"buildkite\"\n",
        )
        .unwrap();
        let got: Vec<String> = TrustedIssuer::from_config(&cfg.issuers)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            [
                "https://token.actions.githubusercontent.com (github)",
                "https://gitlab.example.com (gitlab)",
                "https://ci.example.com (buildkite)"
            ]
        );
    }
}
