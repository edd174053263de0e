//! Egress allowlists: where a job may connect, by host name, wildcard or network, and on
//! which port.
//!
//! This module owns the entry syntax of `[rule.egress] allow` and `[egress] baseline`
//! (`host:port`, `*.suffix:port`, `CIDR:port`) and what a name matches. It is pure: it never
//! resolves a name or touches the firewall; the agent's resolver asks [`EgressPolicy`] which
//! ports a name may be reached on, and the firewall takes [`EgressPolicy::cidrs`] as they are.

use serde::{Serialize, Serializer};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest DNS name in text form, without the trailing dot (RFC 1035 §2.3.4).
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// Networks no entry may cover, not even by CIDR: every cloud's instance metadata service
/// and the container credential service live on IPv4 link-local addresses, AWS's IPv6
/// metadata address is `fd00:ec2::254`, and an IPv4-mapped IPv6 network is an IPv4 network
/// in disguise (write that instead).
const NEVER_V4: [(Ipv4Addr, u8, &str); 1] = [(
    Ipv4Addr::new(169, 254, 0, 0),
    16,
    "link-local, where the cloud metadata and container credential services are",
)];
const NEVER_V6: [(Ipv6Addr, u8, &str); 3] = [
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10, "link-local"),
    (
        Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
        128,
        "the EC2 instance metadata service",
    ),
    (
        Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0),
        96,
        "IPv4-mapped; write the IPv4 network instead",
    ),
];

/// `[rule.egress] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EgressMode {
    /// Only the allowed names and networks, on their ports; everything else is dropped and
    /// recorded.
    Block,
    /// Everything but the metadata service, private ranges and the host, every name and
    /// connection recorded: the first stage of writing an allowlist.
    Audit,
}

impl EgressMode {
    /// The policy spelling: `block`, `audit`.
    pub fn as_str(self) -> &'static str {
        match self {
            EgressMode::Block => "block",
            EgressMode::Audit => "audit",
        }
    }
}

impl fmt::Display for EgressMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an entry allows, before its port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EgressTarget {
    /// Exactly this name: lowercase, no trailing dot.
    Host(String),
    /// Any name strictly below this suffix (written `*.suffix`), at any depth; not the
    /// suffix itself. Lowercase, no trailing dot, at least two labels.
    Wildcard(String),
    /// A network (host bits clear), for the rare job that connects by address.
    Cidr { addr: IpAddr, prefix: u8 },
}

/// One checked entry of an allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressAllow {
    pub target: EgressTarget,
    pub port: u16,
    /// It came from a policy file's `[egress] baseline`, not from the rule.
    pub baseline: bool,
    /// Where it is written: `<file>:<line>:<column>`.
    pub origin: String,
}

impl EgressAllow {
    /// The same target and port, wherever either is written.
    pub fn same_entry(&self, other: &EgressAllow) -> bool {
        self.target == other.target && self.port == other.port
    }

    /// Whether a connection to `addr` (no name known) on `port` is allowed by this entry.
    pub fn covers_addr(&self, addr: IpAddr, port: u16) -> bool {
        match self.target {
            EgressTarget::Cidr { addr: net, prefix } => {
                self.port == port && in_network(addr, net, prefix)
            }
            _ => false,
        }
    }
}

/// The entry in its canonical written form: `github.com:443`, `*.example.com:443`,
/// `10.0.0.0/8:443`, `[2001:db8::/32]:443`. Loading it again gives the same entry.
impl fmt::Display for EgressAllow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            EgressTarget::Host(h) => write!(f, "{h}:{}", self.port),
            EgressTarget::Wildcard(s) => write!(f, "*.{s}:{}", self.port),
            EgressTarget::Cidr {
                addr: IpAddr::V4(a),
                prefix,
            } => write!(f, "{a}/{prefix}:{}", self.port),
            EgressTarget::Cidr {
                addr: IpAddr::V6(a),
                prefix,
            } => write!(f, "[{a}/{prefix}]:{}", self.port),
        }
    }
}

/// `{"entry": "github.com:443", "baseline": false, "origin": "p.toml:9:5"}`: the written
/// form is what people compare against their policy files.
impl Serialize for EgressAllow {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Entry<'a> {
            entry: String,
            baseline: bool,
            origin: &'a str,
        }
        Entry {
            entry: self.to_string(),
            baseline: self.baseline,
            origin: &self.origin,
        }
        .serialize(s)
    }
}

/// A rule's `[rule.egress]`, as written (checked, duplicates dropped), without the baseline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleEgress {
    pub mode: EgressMode,
    pub allow: Vec<EgressAllow>,
}

/// What a job's egress is checked against: its rule's mode, the rule's entries and then the
/// baseline's, each target and port once (a rule entry wins over the same baseline entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EgressPolicy {
    pub mode: EgressMode,
    pub allow: Vec<EgressAllow>,
}

impl EgressPolicy {
    /// The ports a DNS name may be reached on: every entry whose Host equals the name or
    /// whose Wildcard suffix the name is a strict subdomain of. Case-insensitive; a trailing
    /// dot is ignored. Empty: the name is not allowed — as is every name that is not a plain
    /// host name (an empty label, or a character other than letters, digits, `-` and `_`).
    pub fn ports_for(&self, name: &str) -> Vec<u16> {
        let Some(name) = normalize_query(name) else {
            return Vec::new();
        };
        let mut ports: Vec<u16> = self
            .allow
            .iter()
            .filter(|a| match &a.target {
                EgressTarget::Host(h) => *h == name,
                EgressTarget::Wildcard(suffix) => is_strictly_below(&name, suffix),
                EgressTarget::Cidr { .. } => false,
            })
            .map(|a| a.port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    pub fn name_allowed(&self, name: &str) -> bool {
        !self.ports_for(name).is_empty()
    }

    /// Explicit CIDR entries: (network, prefix length, port).
    pub fn cidrs(&self) -> Vec<(IpAddr, u8, u16)> {
        self.allow
            .iter()
            .filter_map(|a| match a.target {
                EgressTarget::Cidr { addr, prefix } => Some((addr, prefix, a.port)),
                _ => None,
            })
            .collect()
    }
}

/// A queried name in the form entries are stored in, or `None` when it is no plain host name
/// and so matches nothing. Underscores are let through (`_dmarc`-style labels exist in DNS);
/// entries cannot contain them, so such a name can only match a wildcard above it.
fn normalize_query(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let plain = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= MAX_LABEL
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    plain.then_some(name)
}

/// `a.example.com` and `a.b.example.com` are below `example.com`; `example.com` and
/// `badexample.com` are not.
fn is_strictly_below(name: &str, suffix: &str) -> bool {
    name.len() > suffix.len() + 1
        && name.ends_with(suffix)
        && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
}

/// Whether `addr` is inside `net/prefix` (the same family only).
fn in_network(addr: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => mask4(u32::from(a), prefix) == u32::from(n),
        (IpAddr::V6(a), IpAddr::V6(n)) => mask6(u128::from(a), prefix) == u128::from(n),
        _ => false,
    }
}

fn mask4(bits: u32, prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        bits & (u32::MAX << (32 - u32::from(prefix)))
    }
}

fn mask6(bits: u128, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        bits & (u128::MAX << (128 - u32::from(prefix)))
    }
}

/// Whether two networks share any address: the shorter prefix decides.
fn overlaps(a: IpAddr, a_len: u8, b: IpAddr, b_len: u8) -> bool {
    let len = a_len.min(b_len);
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => mask4(u32::from(a), len) == mask4(u32::from(b), len),
        (IpAddr::V6(a), IpAddr::V6(b)) => mask6(u128::from(a), len) == mask6(u128::from(b), len),
        _ => false,
    }
}

/// One written entry, checked: its target and port, or what is wrong with it (the caller
/// says where). Names come back lowercase and without a trailing dot.
pub fn parse_entry(text: &str) -> Result<(EgressTarget, u16), String> {
    const WRITE: &str = "write host:port (\"github.com:443\"), *.suffix:port \
                         (\"*.githubusercontent.com:443\") or network:port (\"203.0.113.0/24:443\", \
                         \"[2001:db8::/32]:443\")";
    if text.is_empty() {
        return Err(format!("is empty; {WRITE}"));
    }
    if text.chars().any(char::is_whitespace) {
        return Err(format!("contains a space; {WRITE}"));
    }
    if text.contains("://") {
        return Err(
            "is a URL; give only the host and the port, e.g. \"github.com:443\" for https://github.com"
                .into(),
        );
    }
    let (target, port) = if let Some(rest) = text.strip_prefix('[') {
        let Some((inner, after)) = rest.split_once(']') else {
            return Err(
                "opens `[` without a closing `]`; write IPv6 networks as [2001:db8::/32]:443"
                    .into(),
            );
        };
        let Some(port) = after.strip_prefix(':') else {
            return Err(format!("has no port after `]`; write [{inner}]:443"));
        };
        (ipv6_network(inner)?, port)
    } else {
        let Some((host, port)) = text.rsplit_once(':') else {
            if text.parse::<IpAddr>().is_ok() {
                return Err(format!(
                    "is an address without a port; write a network and a port, e.g. \"{text}/32:443\""
                ));
            }
            return Err(format!(
                "has no port; write \"{text}:443\" (one entry per port)"
            ));
        };
        if host.contains(':') {
            return Err(
                "looks like an IPv6 address; write IPv6 networks in brackets with a prefix \
                 length and then the port, e.g. [2001:db8::/32]:443"
                    .into(),
            );
        }
        let target = if host.contains('/') {
            ipv4_network(host)?
        } else {
            host_name(host)?
        };
        (target, port)
    };
    let port = port_number(port)?;
    if port == 53 {
        return Err(
            "names port 53 (DNS): a job's only resolver is the agent, which refuses DNS to              anywhere else; allow the names the job looks up instead"
                .into(),
        );
    }
    Ok((target, port))
}

fn port_number(p: &str) -> Result<u16, String> {
    if p.is_empty() {
        return Err("has no port after `:`; add one from 1 to 65535".into());
    }
    if let Some((a, b)) = p.split_once('-') {
        if !a.is_empty() && !b.is_empty() && (a.to_owned() + b).bytes().all(|c| c.is_ascii_digit())
        {
            return Err(format!(
                "has the port range {p}; ranges are not supported, write one entry per port"
            ));
        }
    }
    if !p.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "has the port {p:?}, which is not a number from 1 to 65535"
        ));
    }
    match p.parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        _ => Err(format!("has the port {p}, outside 1 to 65535")),
    }
}

fn prefix_len(p: &str, max: u8) -> Result<u8, String> {
    let n = (!p.is_empty() && p.len() <= 3 && p.bytes().all(|c| c.is_ascii_digit()))
        .then(|| p.parse::<u8>().ok())
        .flatten();
    match n {
        Some(n) if n <= max => Ok(n),
        _ => Err(format!(
            "has the prefix length /{p}; an IPv{} prefix length is 0 to {max}",
            if max == 32 { 4 } else { 6 }
        )),
    }
}

/// `a.b.c.d/len`, host bits clear, clear of the networks no job may reach.
fn ipv4_network(text: &str) -> Result<EgressTarget, String> {
    let (addr, len) = text.split_once('/').unwrap_or((text, ""));
    let Ok(addr) = addr.parse::<Ipv4Addr>() else {
        return Err(format!(
            "has {addr:?} before the `/`, which is not an IPv4 address; write a network such as 203.0.113.0/24"
        ));
    };
    let prefix = prefix_len(len, 32)?;
    let net = Ipv4Addr::from(mask4(u32::from(addr), prefix));
    if net != addr {
        return Err(format!(
            "has host bits set: {addr}/{prefix} is inside the network {net}/{prefix}; write that, or {addr}/32 for the one address"
        ));
    }
    network(IpAddr::V4(addr), prefix)
}

/// `addr/len` inside brackets.
fn ipv6_network(text: &str) -> Result<EgressTarget, String> {
    let Some((addr, len)) = text.split_once('/') else {
        return Err(match text.parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) => {
                format!("is an address, not a network; write [{a}/128] for the one address")
            }
            _ => format!(
                "has [{text}], which is not an IPv6 network; write e.g. [2001:db8::/32]:443"
            ),
        });
    };
    let Ok(addr) = addr.parse::<Ipv6Addr>() else {
        return Err(if addr.parse::<Ipv4Addr>().is_ok() {
            "is an IPv4 network in brackets; write IPv4 networks without them, e.g. 203.0.113.0/24:443".into()
        } else {
            format!("has {addr:?} before the `/`, which is not an IPv6 address")
        });
    };
    let prefix = prefix_len(len, 128)?;
    let net = Ipv6Addr::from(mask6(u128::from(addr), prefix));
    if net != addr {
        return Err(format!(
            "has host bits set: {addr}/{prefix} is inside the network {net}/{prefix}; write that, or [{addr}/128] for the one address"
        ));
    }
    network(IpAddr::V6(addr), prefix)
}

fn network(addr: IpAddr, prefix: u8) -> Result<EgressTarget, String> {
    let never = NEVER_V4
        .iter()
        .map(|(a, l, why)| (IpAddr::V4(*a), *l, *why))
        .chain(
            NEVER_V6
                .iter()
                .map(|(a, l, why)| (IpAddr::V6(*a), *l, *why)),
        );
    for (n, l, why) in never {
        if overlaps(addr, prefix, n, l) {
            return Err(format!(
                "covers {n}/{l} ({why}), which no job may reach; narrow the network"
            ));
        }
    }
    if addr.is_ipv6() {
        // Jobs never reach these over IPv6, and no exception is made for a job's explicit
        // entry (unlike IPv4's private ranges): see `BLOCKED_V6`.
        for (net, len) in crate::sandbox::firewall::BLOCKED_V6 {
            let n: Ipv6Addr = net.parse().expect("BLOCKED_V6 holds addresses");
            if overlaps(addr, prefix, IpAddr::V6(n), len) {
                return Err(format!(
                    "covers {n}/{len}, which jobs never reach over IPv6 (loopback and NAT64, 6to4, Teredo, \
                     unique local, link-local, multicast); IPv6 entries name global unicast networks"
                ));
            }
        }
    }
    Ok(EgressTarget::Cidr { addr, prefix })
}

/// A DNS name or `*.` and a DNS name of at least two labels, lowercased, one trailing dot
/// dropped.
fn host_name(host: &str) -> Result<EgressTarget, String> {
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if name.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "is an IP address; write it as a network: \"{name}/32:443\" for the one address"
        ));
    }
    if name == "*" {
        return Err("is `*` alone, which would allow every name; use mode = \"audit\" to see which names a job needs".into());
    }
    let (wildcard, rest) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name.as_str()),
    };
    if rest.contains('*') {
        return Err("has `*` other than as the whole first label; write *.example.com to allow every name below example.com".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "has a name of {} characters; DNS names have at most {MAX_NAME}",
            name.len()
        ));
    }
    if rest.is_empty() {
        return Err("has no host name before the port".into());
    }
    for label in rest.split('.') {
        if label.is_empty() {
            return Err("has an empty label (two dots in a row, or a leading dot)".into());
        }
        if label.len() > MAX_LABEL {
            return Err(format!(
                "has the label {label:?} of {} characters; DNS labels have at most {MAX_LABEL}",
                label.len()
            ));
        }
        if !label.is_ascii() {
            return Err(format!(
                "has the label {label:?}, which is not ASCII; write internationalised names in their xn-- form"
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "has the label {label:?}; host names are letters, digits and `-`"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "has the label {label:?}, which starts or ends with `-`"
            ));
        }
    }
    let last = rest.rsplit('.').next().unwrap_or(rest);
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "ends in the all-digit label {last:?}, which no host name has (resolvers read it as an address); \
             write addresses as a network, e.g. \"192.0.2.1/32:443\""
        ));
    }
    if wildcard {
        if !rest.contains('.') {
            return Err(format!(
                "is *.{rest}, which would allow every name under a top-level domain; \
                 a wildcard needs at least two labels after `*.` (*.example.{rest})"
            ));
        }
        return Ok(EgressTarget::Wildcard(rest.to_string()));
    }
    Ok(EgressTarget::Host(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(text: &str) -> EgressAllow {
        let (target, port) = parse_entry(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        EgressAllow {
            target,
            port,
            baseline: false,
            origin: "p.toml:1:1".into(),
        }
    }

    fn policy(entries: &[&str]) -> EgressPolicy {
        EgressPolicy {
            mode: EgressMode::Block,
            allow: entries.iter().map(|e| entry(e)).collect(),
        }
    }

    #[test]
    fn every_valid_form_parses_and_prints_canonically() {
        for (written, canonical, target) in [
            (
                "github.com:443",
                "github.com:443",
                EgressTarget::Host("github.com".into()),
            ),
            (
                "GitHub.COM.:443",
                "github.com:443",
                EgressTarget::Host("github.com".into()),
            ),
            (
                "localhost:8080",
                "localhost:8080",
                EgressTarget::Host("localhost".into()),
            ),
            (
                "a-1.b2.example:1",
                "a-1.b2.example:1",
                EgressTarget::Host("a-1.b2.example".into()),
            ),
            (
                "*.githubusercontent.com:443",
                "*.githubusercontent.com:443",
                EgressTarget::Wildcard("githubusercontent.com".into()),
            ),
            (
                "*.Example.Co.UK.:65535",
                "*.example.co.uk:65535",
                EgressTarget::Wildcard("example.co.uk".into()),
            ),
            (
                "203.0.113.0/24:443",
                "203.0.113.0/24:443",
                EgressTarget::Cidr {
                    addr: "203.0.113.0".parse().unwrap(),
                    prefix: 24,
                },
            ),
            (
                "10.0.0.0/8:5432",
                "10.0.0.0/8:5432",
                EgressTarget::Cidr {
                    addr: "10.0.0.0".parse().unwrap(),
                    prefix: 8,
                },
            ),
            (
                "192.0.2.7/32:22",
                "192.0.2.7/32:22",
                EgressTarget::Cidr {
                    addr: "192.0.2.7".parse().unwrap(),
                    prefix: 32,
                },
            ),
            (
                "[2001:db8::/32]:443",
                "[2001:db8::/32]:443",
                EgressTarget::Cidr {
                    addr: "2001:db8::".parse().unwrap(),
                    prefix: 32,
                },
            ),
            (
                "[2001:DB8:0:0::1/128]:443",
                "[2001:db8::1/128]:443",
                EgressTarget::Cidr {
                    addr: "2001:db8::1".parse().unwrap(),
                    prefix: 128,
                },
            ),
        ] {
            let e = entry(written);
            assert_eq!(e.target, target, "{written}");
            assert_eq!(e.to_string(), canonical, "{written}");
            // The canonical form reads back as the same entry.
            assert!(entry(canonical).same_entry(&e), "{canonical}");
        }
        // 253 characters is the longest name; 63 the longest label.
        let label = "a".repeat(63);
        let long = format!("{label}.{label}.{label}.{}", "b".repeat(61));
        assert_eq!(long.len(), 253);
        assert_eq!(
            entry(&format!("{long}:443")).target,
            EgressTarget::Host(long)
        );
    }

    #[test]
    fn every_bad_form_says_what_is_wrong() {
        for (text, needle) in [
            ("", "is empty"),
            (" github.com:443", "contains a space"),
            ("github.com :443", "contains a space"),
            ("github.com:\t443", "contains a space"),
            ("https://github.com:443", "is a URL"),
            ("https://github.com", "is a URL"),
            ("github.com", "has no port; write \"github.com:443\""),
            ("github.com:", "has no port after `:`"),
            ("github.com:0", "has the port 0, outside 1 to 65535"),
            ("github.com:65536", "has the port 65536, outside 1 to 65535"),
            ("github.com:99999999999", "outside 1 to 65535"),
            ("github.com:https", "has the port \"https\", which is not a number"),
            ("github.com:+443", "which is not a number"),
            ("github.com:443-445", "port range 443-445"),
            ("github.com:443/x", "which is not a number"),
            ("*:443", "is `*` alone"),
            ("*.com:443", "a wildcard needs at least two labels"),
            ("*.com.:443", "a wildcard needs at least two labels"),
            ("*.:443", "is `*` alone"),
            ("*.*.example.com:443", "has `*` other than as the whole first label"),
            ("a*.example.com:443", "has `*` other than"),
            ("api.*.example.com:443", "has `*` other than"),
            ("**.example.com:443", "has `*` other than"),
            ("*example.com:443", "has `*` other than"),
            (":443", "has no host name"),
            (".:443", "has no host name"),
            ("..:443", "has an empty label"),
            ("a..b:443", "has an empty label"),
            (".github.com:443", "has an empty label"),
            ("github.com..:443", "has an empty label"),
            ("-github.com:443", "starts or ends with `-`"),
            ("github-.com:443", "starts or ends with `-`"),
            ("git_hub.com:443", "host names are letters, digits and `-`"),
            ("gith\u{fc}b.com:443", "not ASCII"),
            ("github.com/path:443", "which is not an IPv4 address"),
            ("192.0.2.1:443", "is an IP address; write it as a network: \"192.0.2.1/32:443\""),
            ("192.0.2.1", "is an address without a port"),
            ("1.2.3:443", "all-digit label \"3\""),
            ("2001:db8::1:443", "looks like an IPv6 address"),
            ("2001:db8::/32:443", "looks like an IPv6 address"),
            ("[2001:db8::1]:443", "is an address, not a network; write [2001:db8::1/128]"),
            ("[2001:db8::/32]", "has no port after `]`"),
            ("[2001:db8::/32]443", "has no port after `]`"),
            ("[2001:db8::/32:443", "without a closing `]`"),
            ("[github.com]:443", "not an IPv6 network"),
            ("[203.0.113.0/24]:443", "IPv4 network in brackets"),
            ("[2001:db8::/129]:443", "prefix length /129; an IPv6 prefix length is 0 to 128"),
            ("[2001:db8::1/32]:443", "host bits set: 2001:db8::1/32 is inside the network 2001:db8::/32"),
            ("203.0.113.0/33:443", "prefix length /33; an IPv4 prefix length is 0 to 32"),
            ("203.0.113.0/:443", "prefix length /;"),
            ("203.0.113.0/x:443", "prefix length /x"),
            ("203.0.113.0/0024:443", "prefix length /0024"),
            ("203.0.113.1/24:443", "host bits set: 203.0.113.1/24 is inside the network 203.0.113.0/24; write that, or 203.0.113.1/32"),
            ("203.0.113/24:443", "not an IPv4 address"),
            ("169.254.169.254/32:80", "covers 169.254.0.0/16 (link-local"),
            ("169.254.0.0/16:80", "covers 169.254.0.0/16"),
            ("0.0.0.0/0:443", "covers 169.254.0.0/16"),
            ("128.0.0.0/1:443", "covers 169.254.0.0/16"),
            ("[fd00:ec2::254/128]:80", "the EC2 instance metadata service"),
            ("[fd00::/8]:80", "the EC2 instance metadata service"),
            ("[fe80::/64]:80", "link-local"),
            ("[::/0]:443", "which no job may reach"),
            ("[::ffff:0:0/96]:443", "IPv4-mapped"),
            ("[::ffff:203.0.113.7/128]:443", "IPv4-mapped"),
        ] {
            match parse_entry(text) {
                Ok(ok) => panic!("{text:?} parsed as {ok:?}"),
                Err(e) => assert!(e.contains(needle), "{text:?}: {e:?} lacks {needle:?}"),
            }
        }
        let label = "a".repeat(64);
        assert!(parse_entry(&format!("{label}.com:443"))
            .unwrap_err()
            .contains("of 64 characters; DNS labels have at most 63"));
        let name = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(62));
        assert!(parse_entry(&format!("{name}:443"))
            .unwrap_err()
            .contains("a name of 254 characters"));
        // Allowed near the forbidden networks: they do not overlap.
        assert!(parse_entry("169.255.0.0/16:443").is_ok());
        assert!(parse_entry("169.253.0.0/16:443").is_ok());
        // Beside the metadata address is still unique local space, which jobs never reach
        // over IPv6.
        assert!(parse_entry("[fd00:ec2::253/128]:443")
            .unwrap_err()
            .contains("global unicast"));
        assert!(parse_entry("[2600:1f18::/32]:443").is_ok());
    }

    #[test]
    fn a_wildcard_covers_subdomains_at_any_depth_but_not_its_suffix() {
        let p = policy(&["*.example.com:443"]);
        assert_eq!(p.ports_for("a.example.com"), [443]);
        assert_eq!(p.ports_for("a.b.example.com"), [443]);
        assert!(!p.name_allowed("example.com"));
        assert!(!p.name_allowed("badexample.com"));
        assert!(!p.name_allowed("a.badexample.com"));
        assert!(!p.name_allowed("example.com.evil.net"));
        assert!(!p.name_allowed(".example.com"));
        assert!(!p.name_allowed("com"));
        // The bare suffix only when listed too.
        let p = policy(&["*.example.com:443", "example.com:80"]);
        assert_eq!(p.ports_for("example.com"), [80]);
        assert_eq!(p.ports_for("www.example.com"), [443]);
    }

    #[test]
    fn names_match_case_insensitively_and_ignore_a_trailing_dot() {
        let p = policy(&[
            "GitHub.com:443",
            "github.com:22",
            "*.GitHubUserContent.com.:443",
        ]);
        for name in ["github.com", "GITHUB.COM", "GitHub.Com.", "github.com."] {
            assert_eq!(p.ports_for(name), [22, 443], "{name}");
        }
        assert_eq!(p.ports_for("Raw.GitHubUserContent.COM."), [443]);
        // One trailing dot, not two; and no other decoration.
        for name in [
            "github.com..",
            "",
            ".",
            "github.com:443",
            " github.com",
            "git hub.com",
            "api..github.com",
        ] {
            assert!(!p.name_allowed(name), "{name:?}");
        }
        // An exact entry does not cover subdomains.
        assert!(!p.name_allowed("api.github.com"));
        // Underscore labels are DNS names too: only a wildcard above them matches.
        assert_eq!(p.ports_for("_x.raw.githubusercontent.com"), [443]);
    }

    #[test]
    fn ports_are_sorted_and_once_and_cidrs_listed_separately() {
        let p = policy(&[
            "*.example.com:8443",
            "api.example.com:443",
            "*.example.com:443",
            "203.0.113.0/24:443",
            "[2001:db8::/32]:443",
        ]);
        assert_eq!(p.ports_for("api.example.com"), [443, 8443]);
        assert_eq!(
            p.cidrs(),
            [
                ("203.0.113.0".parse().unwrap(), 24, 443),
                ("2001:db8::".parse().unwrap(), 32, 443)
            ]
        );
        assert!(p.allow[3].covers_addr("203.0.113.99".parse().unwrap(), 443));
        assert!(!p.allow[3].covers_addr("203.0.114.1".parse().unwrap(), 443));
        assert!(!p.allow[3].covers_addr("203.0.113.99".parse().unwrap(), 80));
        assert!(p.allow[4].covers_addr("2001:db8:1::1".parse().unwrap(), 443));
        // An address is never a name.
        assert!(!p.name_allowed("203.0.113.1"));
    }

    #[test]
    fn json_gives_the_written_form() {
        let mut e = entry("*.example.com.:443");
        e.baseline = true;
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"entry": "*.example.com:443", "baseline": true, "origin": "p.toml:1:1"})
        );
        assert_eq!(
            serde_json::to_value(EgressMode::Audit).unwrap(),
            serde_json::json!("audit")
        );
    }
}

#[cfg(test)]
mod dns_and_ipv6_tests {
    use super::*;
    use crate::policy::load_str;
    use std::path::Path;

    #[test]
    fn port_53_is_refused_because_the_agent_is_the_only_resolver() {
        for entry in ["dns.google:53", "*.example.com:53", "8.8.8.8/32:53"] {
            let err = parse_entry(entry).unwrap_err();
            assert!(err.contains("port 53"), "{entry}: {err}");
        }
        assert!(parse_entry("dns.google:853").is_ok());
    }

    #[test]
    fn ipv6_entries_outside_global_unicast_are_refused() {
        for (entry, want) in [
            ("[64:ff9b::/96]:443", "64:ff9b"),
            ("[::/0]:443", "::/"),
            ("[fd12:3456::/32]:443", "fc00::/7"),
            ("[2002::/16]:443", "2002::/16"),
            ("[ff02::1/128]:443", "ff00::/8"),
        ] {
            let err = parse_entry(entry).unwrap_err();
            assert!(
                err.contains("global unicast") || err.contains(want),
                "{entry}: {err}"
            );
            assert!(err.contains(want) || err.contains("::/8"), "{entry}: {err}");
        }
        assert!(parse_entry("[2001:db8::/32]:443").is_ok());
        assert!(parse_entry("[2606:4700::/32]:443").is_ok());
    }

    #[test]
    fn an_ipv6_entry_loads_with_a_warning_that_it_needs_the_ipv6_pool() {
        let text = "[[rule]]\nname = \"web\"\n[rule.match]\nprovider = \"github\"\nrepository = \"acme/web\"\n\
                    [[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n\
                    [rule.egress]\nallow = [\"[2001:db8::/32]:443\", \"github.com:443\"]\n";
        let set = load_str(Path::new("p.toml"), text).unwrap();
        let w: Vec<&String> = set
            .warnings()
            .iter()
            .filter(|w| w.contains("ipv6_address_pool"))
            .collect();
        assert_eq!(w.len(), 1, "{:?}", set.warnings());
        assert!(w[0].starts_with("p.toml:"), "{}", w[0]);
        assert!(w[0].contains("[2001:db8::/32]:443"), "{}", w[0]);
    }
}
