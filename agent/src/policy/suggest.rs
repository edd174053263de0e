//! `airlock policy suggest`: an allowlist written from what chosen jobs did.
//!
//! Reads audit records — `job_started` and `job_bound` to know whose job each is, and the
//! agent's `egress_dns`, `egress_connect` (audit mode) and `egress_blocked` (block mode) —
//! and writes a `[rule.egress]` section that would have let the selected jobs make the same
//! connections in block mode. It never widens on its own: every entry is a name or an
//! address a selected job used, on the port it used; addresses no job may reach are
//! reported in comments and never suggested. The caller reads the file; this module only
//! reads the lines it is given.

use super::egress::{parse_entry, EgressAllow, EgressMode, EgressPolicy, EgressTarget};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::BufRead;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The audit events this module reads.
pub const EVENT_DNS: &str = "egress_dns";
pub const EVENT_CONNECT: &str = "egress_connect";
pub const EVENT_BLOCKED: &str = "egress_blocked";
const IDENTITY_EVENTS: [&str; 2] = ["job_started", "job_bound"];
/// Job ids shown in the header before "and N more".
const SHOWN_JOBS: usize = 10;

/// Which jobs to learn from; every selector given must match (AND).
#[derive(Debug, Clone, Default)]
pub struct JobSelector {
    /// The job's repository, exactly.
    pub repository: Option<String>,
    /// The job's workflow: exactly, or its path without `@ref` (GitHub's `workflow_ref`,
    /// GitLab's `ci_config_ref_uri`) equal to or ending in `/` and this, so `deploy.yml`
    /// selects `acme/web/.github/workflows/deploy.yml@refs/heads/main`.
    pub workflow: Option<String>,
    /// The job id, exactly.
    pub job: Option<String>,
}

impl JobSelector {
    pub fn is_empty(&self) -> bool {
        self.repository.is_none() && self.workflow.is_none() && self.job.is_none()
    }

    /// Whether a `job_started` / `job_bound` record is of a selected job.
    fn matches(&self, rec: &Map<String, Value>) -> bool {
        let field = |k: &str| rec.get(k).and_then(Value::as_str);
        self.job.as_deref().is_none_or(|j| field("job") == Some(j))
            && self
                .repository
                .as_deref()
                .is_none_or(|r| field("repository") == Some(r))
            && self
                .workflow
                .as_deref()
                .is_none_or(|w| field("workflow").is_some_and(|v| workflow_matches(v, w)))
    }
}

/// `repository = "acme/web", workflow = "deploy.yml"`.
impl fmt::Display for JobSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = [
            ("repository", &self.repository),
            ("workflow", &self.workflow),
            ("job", &self.job),
        ]
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k} = {v:?}")))
        .collect();
        f.write_str(&parts.join(", "))
    }
}

fn workflow_matches(value: &str, want: &str) -> bool {
    let path = value.split_once('@').map_or(value, |(p, _)| p);
    value == want || path == want || path.ends_with(&format!("/{want}"))
}

#[derive(Debug, thiserror::Error)]
pub enum SuggestError {
    #[error("cannot read the audit log: {0}")]
    Read(std::io::Error),
    #[error("line {line}: {message}")]
    Parse { line: usize, message: String },
    #[error(
        "no job in the audit log matches {0}; jobs are found by their job_started and job_bound \
         records (`airlock audit query --event job_started` lists them)"
    )]
    NoJob(String),
}

/// What to write: the section and the comments around it. Its `Display` is the text to paste.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggestion {
    /// The selector, as text, for the header.
    pub selector: String,
    /// The selected jobs, in the order the log first names them.
    pub jobs: Vec<String>,
    /// Connection records of the selected jobs, all of them.
    pub connections: u64,
    /// The entries to paste, sorted (names, then networks; by port within).
    pub allow: Vec<Suggested>,
    /// What the baseline already allows, left out.
    pub in_baseline: Vec<Suggested>,
    /// Destinations no entry can admit.
    pub skipped: Vec<Skipped>,
    /// Names looked up and never connected to, not allowed by the suggestion nor the
    /// baseline, with the last DNS verdict.
    pub unconnected: Vec<(String, String)>,
}

/// One entry, with what it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggested {
    /// Canonical form, as `EgressAllow` prints it.
    pub entry: String,
    pub connections: u64,
    pub jobs: usize,
    /// Why an address, not a name.
    pub note: Option<String>,
}

/// A destination that is never suggested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub dst: IpAddr,
    pub port: u16,
    pub name: Option<String>,
    pub class: AddrClass,
    pub connections: u64,
    pub jobs: usize,
}

/// Why an address is never suggested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddrClass {
    /// Metadata and link-local: no entry may cover them (the loader refuses).
    Never,
    /// Private, loopback, multicast and other reserved ranges: a name never admits them
    /// (the firewall refuses them whatever the DNS said); a network entry can, on purpose.
    Private,
}

/// Where a connection went, as an entry would name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Dest {
    Name(String, u16),
    /// No usable name; the names the agent recorded that no entry can hold, if any.
    Addr(IpAddr, u16),
    Skip(AddrClass, IpAddr, u16, Option<String>),
}

#[derive(Default)]
struct JobLog {
    /// Address -> the name whose answer last held it.
    answers: HashMap<IpAddr, String>,
    dests: HashMap<Dest, u64>,
    /// Names that were not plain host names, by address.
    odd_names: HashMap<IpAddr, BTreeSet<String>>,
    lookups: BTreeMap<String, String>,
    connections: u64,
}

/// Read audit lines, keep the selected jobs' egress, and suggest. `baseline` entries (from
/// `PolicySet::baseline`) are left out of the suggestion.
pub fn suggest(
    audit: impl BufRead,
    selector: &JobSelector,
    baseline: &[EgressAllow],
) -> Result<Suggestion, SuggestError> {
    let mut jobs: HashMap<String, JobLog> = HashMap::new();
    let mut selected: Vec<String> = Vec::new();
    for (i, line) in audit.lines().enumerate() {
        let lineno = i + 1;
        let bad = |message: String| SuggestError::Parse {
            line: lineno,
            message,
        };
        let line = match line {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(bad("not UTF-8 text".into()))
            }
            Err(e) => return Err(SuggestError::Read(e)),
        };
        if line.trim().is_empty() {
            continue;
        }
        let rec: Map<String, Value> = serde_json::from_str(&line)
            .map_err(|e| bad(format!("not a JSON audit record: {e}")))?;
        let Some(event) = rec.get("event").and_then(Value::as_str) else {
            continue;
        };
        let job = rec.get("job").and_then(Value::as_str);
        if IDENTITY_EVENTS.contains(&event) {
            if let Some(j) = job.filter(|_| selector.matches(&rec)) {
                if !selected.iter().any(|s| s == j) {
                    selected.push(j.to_string());
                }
            }
            continue;
        }
        if ![EVENT_DNS, EVENT_CONNECT, EVENT_BLOCKED].contains(&event) {
            continue;
        }
        let Some(job) = job else {
            return Err(bad(format!("{event} record without a \"job\"")));
        };
        let log = jobs.entry(job.to_string()).or_default();
        if event == EVENT_DNS {
            dns(log, &rec).map_err(|m| bad(format!("{event} record: {m}")))?;
        } else {
            connection(log, &rec).map_err(|m| bad(format!("{event} record: {m}")))?;
        }
    }
    if selected.is_empty() {
        return Err(SuggestError::NoJob(selector.to_string()));
    }
    Ok(summarise(selector, selected, &jobs, baseline))
}

fn dns(log: &mut JobLog, rec: &Map<String, Value>) -> Result<(), String> {
    let name = rec
        .get("name")
        .and_then(Value::as_str)
        .ok_or("no \"name\"")?;
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let verdict = rec.get("verdict").and_then(Value::as_str).unwrap_or("");
    // Answers are addresses; anything else (a future CNAME entry) says nothing about
    // where a connection went.
    for a in rec
        .get("answers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(ip) = a.as_str().and_then(|a| a.parse::<IpAddr>().ok()) {
            log.answers.insert(ip, name.clone());
        }
    }
    log.lookups.insert(name, verdict.to_string());
    Ok(())
}

fn connection(log: &mut JobLog, rec: &Map<String, Value>) -> Result<(), String> {
    let dst: IpAddr = rec
        .get("dst")
        .and_then(Value::as_str)
        .and_then(|d| d.parse().ok())
        .ok_or("no \"dst\" address")?;
    // A packet without ports (ICMP, a later fragment) says nothing an allowlist could name.
    if rec.get("port").is_none_or(Value::is_null) {
        return Ok(());
    }
    let port = rec
        .get("port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or("no \"port\" from 1 to 65535")?;
    // The name the agent recorded; failing that, the name whose DNS answer held the
    // address, as in block mode the job's connection would be admitted through it.
    let name = rec
        .get("name")
        .and_then(Value::as_str)
        .map(|n| n.strip_suffix('.').unwrap_or(n).to_ascii_lowercase())
        .or_else(|| log.answers.get(&dst).cloned());
    let dest = if let Some(class) = addr_class(dst) {
        Dest::Skip(class, dst, port, name)
    } else {
        match name {
            Some(n)
                if matches!(
                    parse_entry(&format!("{n}:{port}")),
                    Ok((EgressTarget::Host(_), _))
                ) =>
            {
                Dest::Name(n, port)
            }
            Some(n) => {
                log.odd_names.entry(dst).or_default().insert(n);
                Dest::Addr(dst, port)
            }
            None => Dest::Addr(dst, port),
        }
    };
    *log.dests.entry(dest).or_default() += 1;
    log.connections += 1;
    Ok(())
}

/// Addresses no entry suggests: [`AddrClass::Never`] for metadata and link-local, and
/// [`AddrClass::Private`] for the ranges the firewall refuses to outbound jobs
/// (docs/network.md) and their IPv6 counterparts.
pub fn addr_class(ip: IpAddr) -> Option<AddrClass> {
    match ip {
        IpAddr::V4(a) => v4_class(a),
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return v4_class(v4);
            }
            let s = a.segments();
            if a == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) || s[0] & 0xffc0 == 0xfe80 {
                Some(AddrClass::Never)
            } else if a.is_unspecified()
                || a.is_loopback()
                || s[0] & 0xfe00 == 0xfc00
                || s[0] & 0xff00 == 0xff00
            {
                Some(AddrClass::Private)
            } else {
                None
            }
        }
    }
}

fn v4_class(a: Ipv4Addr) -> Option<AddrClass> {
    const PRIVATE: [(Ipv4Addr, u8); 11] = [
        (Ipv4Addr::new(0, 0, 0, 0), 8),
        (Ipv4Addr::new(10, 0, 0, 0), 8),
        (Ipv4Addr::new(100, 64, 0, 0), 10),
        (Ipv4Addr::new(127, 0, 0, 0), 8),
        (Ipv4Addr::new(172, 16, 0, 0), 12),
        (Ipv4Addr::new(192, 0, 0, 0), 24),
        (Ipv4Addr::new(192, 88, 99, 0), 24),
        (Ipv4Addr::new(192, 168, 0, 0), 16),
        (Ipv4Addr::new(198, 18, 0, 0), 15),
        (Ipv4Addr::new(224, 0, 0, 0), 4),
        (Ipv4Addr::new(240, 0, 0, 0), 4),
    ];
    let inside =
        |net: Ipv4Addr, len: u8| u32::from(a) >> (32 - len) == u32::from(net) >> (32 - len);
    if inside(Ipv4Addr::new(169, 254, 0, 0), 16) {
        Some(AddrClass::Never)
    } else if PRIVATE.iter().any(|(n, l)| inside(*n, *l)) {
        Some(AddrClass::Private)
    } else {
        None
    }
}

#[derive(Default)]
struct Tally {
    connections: u64,
    jobs: BTreeSet<String>,
}

fn summarise(
    selector: &JobSelector,
    selected: Vec<String>,
    jobs: &HashMap<String, JobLog>,
    baseline: &[EgressAllow],
) -> Suggestion {
    let mut dests: BTreeMap<&Dest, Tally> = BTreeMap::new();
    let mut odd_names: HashMap<IpAddr, BTreeSet<&str>> = HashMap::new();
    let mut lookups: BTreeMap<&str, &str> = BTreeMap::new();
    let mut connections = 0;
    for id in &selected {
        let Some(log) = jobs.get(id) else { continue };
        connections += log.connections;
        for (d, n) in &log.dests {
            let t = dests.entry(d).or_default();
            t.connections += n;
            t.jobs.insert(id.clone());
        }
        for (ip, names) in &log.odd_names {
            odd_names
                .entry(*ip)
                .or_default()
                .extend(names.iter().map(String::as_str));
        }
        lookups.extend(log.lookups.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    }
    let base = EgressPolicy {
        mode: EgressMode::Block,
        allow: baseline.to_vec(),
    };
    let mut allow: Vec<(EgressAllow, Suggested)> = Vec::new();
    let mut in_baseline = Vec::new();
    let mut skipped = Vec::new();
    for (dest, t) in dests {
        let (target, port, covered, note) = match dest {
            Dest::Name(n, port) => (
                EgressTarget::Host(n.clone()),
                *port,
                base.ports_for(n).contains(port),
                None,
            ),
            Dest::Addr(ip, port) => {
                let note = match odd_names.get(ip) {
                    Some(names) => format!(
                        "no usable name: {} cannot be an entry",
                        names
                            .iter()
                            .map(|n| format!("{n:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    None => "no name: the job connected by address".to_string(),
                };
                (
                    EgressTarget::Cidr {
                        addr: *ip,
                        prefix: if ip.is_ipv4() { 32 } else { 128 },
                    },
                    *port,
                    baseline.iter().any(|b| b.covers_addr(*ip, *port)),
                    Some(note),
                )
            }
            Dest::Skip(class, dst, port, name) => {
                skipped.push(Skipped {
                    dst: *dst,
                    port: *port,
                    name: name.clone(),
                    class: *class,
                    connections: t.connections,
                    jobs: t.jobs.len(),
                });
                continue;
            }
        };
        let entry = EgressAllow {
            target,
            port,
            baseline: false,
            origin: String::new(),
        };
        let s = Suggested {
            entry: entry.to_string(),
            connections: t.connections,
            jobs: t.jobs.len(),
            note,
        };
        if covered {
            in_baseline.push(s);
        } else {
            allow.push((entry, s));
        }
    }
    allow.sort_by(|(a, _), (b, _)| (&a.target, a.port).cmp(&(&b.target, b.port)));
    skipped.sort_by_key(|a| (a.class, a.dst, a.port));
    let mut suggested = base;
    suggested.allow.extend(allow.iter().map(|(e, _)| e.clone()));
    let unconnected = lookups
        .into_iter()
        .filter(|(name, _)| !suggested.name_allowed(name))
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    Suggestion {
        selector: selector.to_string(),
        jobs: selected,
        connections,
        allow: allow.into_iter().map(|(_, s)| s).collect(),
        in_baseline,
        skipped,
        unconnected,
    }
}

fn count(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

fn covers(connections: u64, jobs: usize) -> String {
    format!(
        "{}, {}",
        count(connections, "connection", "connections"),
        count(jobs as u64, "job", "jobs")
    )
}

/// The text to paste: comments saying what was learnt from and what was left out, then the
/// `[rule.egress]` section, one entry per line with what it covers.
impl fmt::Display for Suggestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<&str> = self
            .jobs
            .iter()
            .take(SHOWN_JOBS)
            .map(String::as_str)
            .collect();
        let more = self.jobs.len().saturating_sub(SHOWN_JOBS);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        writeln!(
            f,
            "# Suggested by `airlock policy suggest` from {} ({}): {}{more}.",
            count(self.jobs.len() as u64, "job", "jobs"),
            self.selector,
            shown.join(", ")
        )?;
        writeln!(
            f,
            "# {} recorded; review every entry before pasting this section into the rule.",
            count(self.connections, "connection", "connections")
        )?;
        if self.connections == 0 && self.unconnected.is_empty() {
            writeln!(
                f,
                "# No egress records for these jobs: they made no connection, or they ran without \
                 [rule.egress] (only egress-controlled jobs are recorded; use mode = \"audit\" first)."
            )?;
        }
        if !self.in_baseline.is_empty() {
            writeln!(f, "# Left out: the [egress] baseline allows them already.")?;
            for s in &self.in_baseline {
                writeln!(f, "#   {}  ({})", s.entry, covers(s.connections, s.jobs))?;
            }
        }
        let skipped = |class| self.skipped.iter().filter(move |s| s.class == class);
        let skip_line = |f: &mut fmt::Formatter<'_>, s: &Skipped| {
            let dst = match s.dst {
                IpAddr::V4(a) => format!("{a}:{}", s.port),
                IpAddr::V6(a) => format!("[{a}]:{}", s.port),
            };
            let name = s
                .name
                .as_ref()
                .map(|n| format!(" as {n}"))
                .unwrap_or_default();
            writeln!(f, "#   {dst}{name}  ({})", covers(s.connections, s.jobs))
        };
        if skipped(AddrClass::Never).next().is_some() {
            writeln!(
                f,
                "# Not suggested: the metadata service and link-local addresses, which no job may reach."
            )?;
            for s in skipped(AddrClass::Never) {
                skip_line(f, s)?;
            }
        }
        if let Some(first) = skipped(AddrClass::Private).next() {
            writeln!(
                f,
                "# Not suggested: private and reserved addresses, which an allowed name never admits."
            )?;
            for s in skipped(AddrClass::Private) {
                skip_line(f, s)?;
            }
            let example = EgressAllow {
                target: EgressTarget::Cidr {
                    addr: first.dst,
                    prefix: if first.dst.is_ipv4() { 32 } else { 128 },
                },
                port: first.port,
                baseline: false,
                origin: String::new(),
            };
            writeln!(
                f,
                "# If a job needs one, add it by hand as a network, e.g. \"{example}\"."
            )?;
        }
        if !self.unconnected.is_empty() {
            writeln!(
                f,
                "# Looked up but never connected to (no port to allow; add name:port if the job needs them):"
            )?;
            for (name, verdict) in &self.unconnected {
                writeln!(f, "#   {name}  (DNS: {verdict})")?;
            }
        }
        writeln!(f, "[rule.egress]")?;
        writeln!(f, "mode = \"block\"")?;
        if self.allow.is_empty() {
            return writeln!(f, "allow = []");
        }
        writeln!(f, "allow = [")?;
        let width = self.allow.iter().map(|s| s.entry.len()).max().unwrap_or(0) + 3;
        for s in &self.allow {
            let quoted = format!("\"{}\",", s.entry);
            let note = s
                .note
                .as_ref()
                .map(|n| format!("; {n}"))
                .unwrap_or_default();
            writeln!(
                f,
                "    {quoted:<width$} # {}{note}",
                covers(s.connections, s.jobs)
            )?;
        }
        writeln!(f, "]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load_str;
    use serde_json::json;
    use std::path::Path;

    const RULE: &str = "[[rule]]\nname = \"web\"\n[rule.match]\nprovider = \"github\"\nrepository = \"acme/web\"\n\
                        [[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n";
    const BASELINE: &str =
        "[egress]\nbaseline = [\"github.com:443\", \"*.actions.githubusercontent.com:443\"]\n";

    /// Audit lines as the agent writes them (`seq`, `time`, `prev`, `hash` do not matter
    /// here).
    fn lines(records: &[Value]) -> String {
        records.iter().map(|r| format!("{r}\n")).collect()
    }

    fn started(job: &str, repo: &str, workflow: &str) -> Value {
        json!({"event": "job_started", "job": job, "repository": repo,
               "workflow": format!("{repo}/.github/workflows/{workflow}@refs/heads/main"),
               "event_name": "push", "environment": null})
    }

    fn dns(job: &str, name: &str, answers: &[&str]) -> Value {
        json!({"event": "egress_dns", "job": job, "name": name, "qtype": "A",
               "verdict": "audit", "answers": answers, "ttl": 60})
    }

    fn conn(job: &str, dst: &str, port: u16, name: Option<&str>) -> Value {
        json!({"event": "egress_connect", "job": job, "dst": dst, "port": port,
               "proto": "tcp", "name": name})
    }

    fn baseline() -> Vec<EgressAllow> {
        load_str(Path::new("00-base.toml"), BASELINE)
            .unwrap()
            .baseline()
            .to_vec()
    }

    fn run(records: &[Value], sel: &JobSelector) -> Result<Suggestion, SuggestError> {
        suggest(lines(records).as_bytes(), sel, &baseline())
    }

    fn repo(r: &str) -> JobSelector {
        JobSelector {
            repository: Some(r.into()),
            ..JobSelector::default()
        }
    }

    /// Two acme/web jobs in audit mode and one of another repository.
    fn audit() -> Vec<Value> {
        vec![
            started("j-1", "acme/web", "build.yml"),
            started("j-9", "acme/other", "build.yml"),
            dns("j-1", "Registry.NPMJS.org.", &["104.16.1.34"]),
            conn("j-1", "104.16.1.34", 443, Some("registry.npmjs.org")),
            conn("j-1", "104.16.1.34", 443, Some("registry.npmjs.org")),
            // The agent lost the name; the job's DNS answer still says whose address it is.
            conn("j-1", "104.16.1.34", 443, None),
            conn("j-1", "140.82.112.3", 443, Some("github.com")),
            conn(
                "j-1",
                "185.199.108.133",
                443,
                Some("pipelines.actions.githubusercontent.com"),
            ),
            conn("j-1", "203.0.113.7", 8443, None),
            conn("j-1", "169.254.169.254", 80, None),
            conn("j-1", "10.1.2.3", 5432, Some("db.internal.example")),
            dns("j-1", "telemetry.example.net", &[]),
            started("j-2", "acme/web", "deploy.yml"),
            conn("j-2", "104.16.1.35", 443, Some("registry.npmjs.org")),
            conn(
                "j-2",
                "52.216.1.1",
                443,
                Some("acme-artifacts.s3.amazonaws.com"),
            ),
            json!({"event": "egress_blocked", "job": "j-2", "dst": "2001:db8::5", "port": 443,
                   "proto": "tcp", "name": null}),
            conn("j-2", "198.51.100.9", 22, Some("odd_name.example")),
            conn("j-9", "198.51.100.1", 443, Some("other.example.com")),
            json!({"event": "credentials_issued", "job": "j-1", "alias": "a"}),
        ]
    }

    #[test]
    fn a_logged_packet_without_ports_is_skipped_not_an_error() {
        let mut records = audit();
        records.push(
            json!({"event": "egress_blocked", "job": "j-1", "dst": "192.0.2.1",
                            "port": null, "proto": "icmp", "name": null}),
        );
        let with = run(&records, &repo("acme/web")).unwrap();
        let without = run(&audit(), &repo("acme/web")).unwrap();
        assert_eq!(with.to_string(), without.to_string());
    }

    #[test]
    fn suggests_what_the_selected_jobs_did_and_nothing_else() {
        let s = run(&audit(), &repo("acme/web")).unwrap();
        assert_eq!(s.jobs, ["j-1", "j-2"]);
        assert_eq!(s.connections, 12);
        let entries: Vec<(&str, u64, usize)> = s
            .allow
            .iter()
            .map(|a| (a.entry.as_str(), a.connections, a.jobs))
            .collect();
        assert_eq!(
            entries,
            [
                ("acme-artifacts.s3.amazonaws.com:443", 1, 1),
                ("registry.npmjs.org:443", 4, 2),
                ("198.51.100.9/32:22", 1, 1),
                ("203.0.113.7/32:8443", 1, 1),
                ("[2001:db8::5/128]:443", 1, 1),
            ]
        );
        assert_eq!(s.allow[0].note, None);
        assert_eq!(
            s.allow[2].note.as_deref(),
            Some("no usable name: \"odd_name.example\" cannot be an entry")
        );
        assert_eq!(
            s.allow[3].note.as_deref(),
            Some("no name: the job connected by address")
        );
        let left_out: Vec<&str> = s.in_baseline.iter().map(|a| a.entry.as_str()).collect();
        assert_eq!(
            left_out,
            [
                "github.com:443",
                "pipelines.actions.githubusercontent.com:443"
            ]
        );
        let skipped: Vec<(AddrClass, String, Option<&str>)> = s
            .skipped
            .iter()
            .map(|k| (k.class, format!("{}:{}", k.dst, k.port), k.name.as_deref()))
            .collect();
        assert_eq!(
            skipped,
            [
                (AddrClass::Never, "169.254.169.254:80".into(), None),
                (
                    AddrClass::Private,
                    "10.1.2.3:5432".into(),
                    Some("db.internal.example")
                ),
            ]
        );
        assert_eq!(
            s.unconnected,
            [("telemetry.example.net".to_string(), "audit".to_string())]
        );
        let text = s.to_string();
        assert!(!text.contains("other.example.com"), "{text}");
        assert!(
            text.contains("    \"registry.npmjs.org:443\",              # 4 connections, 2 jobs\n"),
            "{text}"
        );
        assert!(
            text.contains("#   github.com:443  (1 connection, 1 job)\n"),
            "{text}"
        );
        assert!(
            text.contains("#   169.254.169.254:80  (1 connection, 1 job)\n"),
            "{text}"
        );
        assert!(
            text.contains("#   10.1.2.3:5432 as db.internal.example  (1 connection, 1 job)\n"),
            "{text}"
        );
        assert!(
            text.contains("#   telemetry.example.net  (DNS: audit)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "# If a job needs one, add it by hand as a network, e.g. \"10.1.2.3/32:5432\".\n"
            ),
            "{text}"
        );
        assert!(text.starts_with(
            "# Suggested by `airlock policy suggest` from 2 jobs (repository = \"acme/web\"): j-1, j-2.\n"
        ));
    }

    #[test]
    fn the_suggestion_loads_in_a_rule_and_allows_what_the_jobs_did() {
        let s = run(&audit(), &repo("acme/web")).unwrap();
        let text = format!("{BASELINE}{RULE}{s}");
        let set = load_str(Path::new("p.toml"), &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let rule = set.rule("web").unwrap().egress.clone().unwrap();
        assert_eq!(rule.mode, EgressMode::Block);
        assert_eq!(rule.allow.len(), 5);
        let p = set.egress_for("web").unwrap();
        assert_eq!(p.ports_for("registry.npmjs.org"), [443]);
        assert_eq!(p.ports_for("acme-artifacts.s3.amazonaws.com"), [443]);
        // From the baseline, not the suggestion.
        assert_eq!(p.ports_for("github.com"), [443]);
        assert_eq!(
            p.ports_for("pipelines.actions.githubusercontent.com"),
            [443]
        );
        assert!(!p.name_allowed("other.example.com"));
        assert!(!p.name_allowed("telemetry.example.net"));
        assert!(!p.name_allowed("db.internal.example"));
        assert_eq!(
            p.cidrs(),
            [
                ("198.51.100.9".parse().unwrap(), 32, 22),
                ("203.0.113.7".parse().unwrap(), 32, 8443),
                ("2001:db8::5".parse().unwrap(), 128, 443),
            ]
        );
        // Nothing to suggest still loads.
        let quiet = run(
            &[started("j-3", "acme/quiet", "x.yml")],
            &repo("acme/quiet"),
        )
        .unwrap();
        let text = quiet.to_string();
        assert!(text.contains("No egress records for these jobs"), "{text}");
        assert!(
            text.ends_with("[rule.egress]\nmode = \"block\"\nallow = []\n"),
            "{text}"
        );
        let set = load_str(Path::new("p.toml"), &format!("{RULE}{text}")).unwrap();
        assert!(set.egress_for("web").unwrap().allow.is_empty());
    }

    #[test]
    fn selectors_combine_and_workflows_match_by_file() {
        let jobs = |sel: JobSelector| run(&audit(), &sel).map(|s| s.jobs);
        let wf = |w: &str| JobSelector {
            workflow: Some(w.into()),
            ..JobSelector::default()
        };
        assert_eq!(jobs(wf("build.yml")).unwrap(), ["j-1", "j-9"]);
        assert_eq!(jobs(wf(".github/workflows/deploy.yml")).unwrap(), ["j-2"]);
        assert_eq!(
            jobs(wf("acme/web/.github/workflows/deploy.yml@refs/heads/main")).unwrap(),
            ["j-2"]
        );
        assert!(matches!(jobs(wf("ploy.yml")), Err(SuggestError::NoJob(_))));
        let both = JobSelector {
            repository: Some("acme/web".into()),
            workflow: Some("build.yml".into()),
            job: None,
        };
        assert_eq!(jobs(both).unwrap(), ["j-1"]);
        let job = JobSelector {
            job: Some("j-2".into()),
            ..JobSelector::default()
        };
        assert_eq!(jobs(job).unwrap(), ["j-2"]);
        // Repositories match exactly, not as a prefix.
        assert!(matches!(jobs(repo("acme/we")), Err(SuggestError::NoJob(_))));
        let e = run(&audit(), &repo("acme/nope")).unwrap_err().to_string();
        assert!(
            e.starts_with("no job in the audit log matches repository = \"acme/nope\""),
            "{e}"
        );
    }

    #[test]
    fn a_bound_job_is_selected_by_its_bound_identity() {
        let records = [
            json!({"event": "job_started", "job": "j-5", "repository": null}),
            json!({"event": "job_bound", "job": "j-5", "repository": "acme/web"}),
            conn("j-5", "198.51.100.2", 443, Some("api.example.com")),
        ];
        let s = run(&records, &repo("acme/web")).unwrap();
        assert_eq!(s.jobs, ["j-5"]);
        assert_eq!(s.allow[0].entry, "api.example.com:443");
    }

    #[test]
    fn unreadable_records_are_errors_with_their_line() {
        let err = |text: &str| {
            suggest(text.as_bytes(), &repo("acme/web"), &[])
                .unwrap_err()
                .to_string()
        };
        let start = format!("{}\n", started("j-1", "acme/web", "b.yml"));
        assert_eq!(
            err(&format!("{start}{{not json\n")).split(':').next(),
            Some("line 2")
        );
        assert!(err(&format!("{start}[1]\n")).contains("not a JSON audit record"));
        for (rec, needle) in [
            (
                json!({"event": "egress_connect", "dst": "1.2.3.4", "port": 1}),
                "without a \"job\"",
            ),
            (
                json!({"event": "egress_connect", "job": "j-1", "dst": "x", "port": 1}),
                "no \"dst\" address",
            ),
            (
                json!({"event": "egress_blocked", "job": "j-1", "dst": "1.2.3.4", "port": 0}),
                "no \"port\" from 1 to 65535",
            ),
            (
                json!({"event": "egress_blocked", "job": "j-1", "dst": "1.2.3.4", "port": 70000}),
                "no \"port\"",
            ),
            (
                json!({"event": "egress_dns", "job": "j-1", "answers": []}),
                "egress_dns record: no \"name\"",
            ),
        ] {
            let e = err(&format!("{start}{rec}\n"));
            assert!(e.starts_with("line 2: "), "{e}");
            assert!(e.contains(needle), "{e:?} lacks {needle:?}");
        }
        let bytes = [start.as_bytes(), b"\xff\xfe\n"].concat();
        let e = suggest(&bytes[..], &repo("acme/web"), &[]).unwrap_err();
        assert_eq!(e.to_string(), "line 2: not UTF-8 text");
    }

    #[test]
    fn address_classes() {
        for (ip, class) in [
            ("169.254.169.254", Some(AddrClass::Never)),
            ("169.254.170.2", Some(AddrClass::Never)),
            ("fd00:ec2::254", Some(AddrClass::Never)),
            ("fe80::1", Some(AddrClass::Never)),
            ("::ffff:169.254.169.254", Some(AddrClass::Never)),
            ("10.0.0.1", Some(AddrClass::Private)),
            ("172.31.255.255", Some(AddrClass::Private)),
            ("192.168.1.1", Some(AddrClass::Private)),
            ("100.64.0.1", Some(AddrClass::Private)),
            ("127.0.0.53", Some(AddrClass::Private)),
            ("224.0.0.251", Some(AddrClass::Private)),
            ("255.255.255.255", Some(AddrClass::Private)),
            ("::1", Some(AddrClass::Private)),
            ("fd12::1", Some(AddrClass::Private)),
            ("ff02::1", Some(AddrClass::Private)),
            ("::ffff:10.0.0.1", Some(AddrClass::Private)),
            ("172.32.0.1", None),
            ("140.82.112.3", None),
            ("203.0.113.7", None),
            ("2606:4700::1", None),
        ] {
            assert_eq!(addr_class(ip.parse().unwrap()), class, "{ip}");
        }
    }
}
