//! nftables rules for jobs whose policy gives them outbound network access.
//!
//! Two places hold rules, both built as libnftables JSON with the `nftables` crate and
//! applied atomically by `nft -j -f -` (one transaction per call):
//!
//! - **Inside each outbound job's network namespace**, table `inet airlock`: its `output`
//!   chain lets the job reach its own endpoint on loopback and drops every packet to the
//!   metadata service, link-local, private, loopback, shared (CGNAT), benchmarking,
//!   multicast and reserved IPv4 ranges, and all IPv6 (refused, see below). The job has no capability in that
//!   namespace, so it cannot change the table; the table dies with the namespace, so the
//!   wipe has nothing extra to remove. A refused packet fails the job's `connect` at once
//!   with `EHOSTUNREACH` ("administratively prohibited").
//! - **In the host namespace**, table `inet airlock` (shared by all jobs, made again on every
//!   outbound job start so a flushed ruleset cannot fail open): nothing from a job's link
//!   (`al-*`) is delivered to the host itself, whatever address it is sent to (this is what
//!   keeps the host's own public addresses out of reach); jobs never reach each other's
//!   links; the same ranges are dropped again when forwarded — except a job's explicit
//!   `CIDR:port` entries, which the set `exceptions` holds for that job's link alone (added
//!   with the link, deleted at its teardown); connections into a job are
//!   refused unless they answer its own; and what jobs send out is masqueraded behind the
//!   host's address. The table stays when the agent stops: it matches only job links, and
//!   a crashed or restarted agent must not leave a window without it. Remove it by hand
//!   with `nft delete table inet airlock` after uninstalling.
//!
//! The egress issue adds per-job allowlists on top of this; see docs/network.md.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, CT,
};
use nftables::schema::{
    Chain, FlushObject, NfCmd, NfListObject, Nftables, Rule, Set, SetFlag, SetType, SetTypeValue,
    Table,
};
use nftables::stmt::{Counter, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::netns::LINK_PREFIX;

/// Name of airlock's table, in the host namespace and inside each outbound job's.
pub const TABLE: &str = "airlock";

/// IPv4 ranges an outbound job never reaches (IANA special-purpose registry, RFC 6890 and
/// its updates), whatever the job asks for: the ones that lead to the host, its network or
/// the cloud's metadata service, and the ones no internet host lives in. The documentation
/// ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) are not in it: nothing on the
/// internet answers there, and the tests use them as "the internet".
pub const BLOCKED_V4: [(&str, u8); 12] = [
    ("0.0.0.0", 8),      // "this network"
    ("10.0.0.0", 8),     // private (RFC 1918)
    ("100.64.0.0", 10),  // shared address space / CGNAT (RFC 6598)
    ("127.0.0.0", 8),    // loopback
    ("169.254.0.0", 16), // link-local: the metadata service (169.254.169.254), ECS (169.254.170.2)
    ("172.16.0.0", 12),  // private
    ("192.0.0.0", 24),   // IETF protocol assignments
    ("192.88.99.0", 24), // deprecated 6to4 relay anycast
    ("192.168.0.0", 16), // private
    ("198.18.0.0", 15),  // benchmarking
    ("224.0.0.0", 4),    // multicast
    ("240.0.0.0", 4),    // reserved, and the limited broadcast address
];

/// IPv6 ranges a job never reaches (IANA IPv6 special-purpose registry), for jobs that have
/// IPv6 (`[sandbox] ipv6_address_pool`). `::/8` holds loopback, the unspecified and the
/// IPv4-mapped addresses and the NAT64 prefixes (64:ff9b::/96 and 64:ff9b:1::/48: through a
/// NAT64 gateway `64:ff9b::a9fe:a9fe` *is* 169.254.169.254); 6to4 and Teredo embed IPv4
/// addresses too. `fc00::/7` holds the other jobs, AWS's metadata service `fd00:ec2::254`
/// and most hosts' private networks. The documentation range 2001:db8::/32 is not in it,
/// like the IPv4 ones (the tests use it as "the internet").
pub const BLOCKED_V6: [(&str, u8); 8] = [
    ("::", 8),      // loopback, unspecified, IPv4-mapped/compatible, NAT64
    ("100::", 64),  // discard-only
    ("2001::", 23), // IETF protocol assignments: Teredo, benchmarking, ORCHID
    ("2002::", 16), // 6to4 (an IPv4 address inside)
    ("fc00::", 7),  // unique local: the job links, fd00:ec2::254, private networks
    ("fe80::", 10), // link-local
    ("fec0::", 10), // deprecated site-local
    ("ff00::", 8),  // multicast
];

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error(
        "cannot run nft ({program}): {source}; install nftables (Debian: apt-get install nftables)"
    )]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("nft refused the {what}: {message}")]
    Apply { what: &'static str, message: String },
    #[error("{0}")]
    Namespace(String),
    #[error("cannot turn on forwarding ({path}): {source}")]
    Forwarding {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn s(v: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(v.to_string()))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn field(protocol: &str, name: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Owned(protocol.to_string()),
            field: Cow::Owned(name.to_string()),
        },
    )))
}

fn prefix(addr: &str, len: u8) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(addr)),
        len: u32::from(len),
    }))
}

fn is(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn is_not(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::NEQ,
    })
}

fn in_set(left: Expression<'static>, set: &str) -> Statement<'static> {
    is(left, s(&format!("@{set}")))
}

fn counter() -> Statement<'static> {
    Statement::Counter(Counter::Anonymous(None))
}

fn drop() -> Statement<'static> {
    Statement::Drop(None)
}

/// Refuses a job's own packet with ICMP "administratively prohibited": its `connect` fails
/// at once with `EHOSTUNREACH` instead of waiting for a timeout. (A plain drop in `output`
/// no longer fails a TCP connect: the kernel retransmits the SYN until it gives up.)
fn reject() -> Statement<'static> {
    Statement::Reject(Some(nftables::stmt::Reject {
        _type: Some(nftables::stmt::RejectType::ICMPX),
        expr: Some(nftables::types::RejectCode::AdminProhibited),
    }))
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

/// Jobs' host links: `al-*` (nft matches a trailing `*` in an interface name as a prefix).
fn job_links() -> Expression<'static> {
    s(&format!("{LINK_PREFIX}*"))
}

struct Builder {
    cmds: Vec<NfCmd<'static>>,
}

impl Builder {
    fn new() -> Builder {
        Builder { cmds: Vec::new() }
    }

    fn add(&mut self, obj: NfListObject<'static>) {
        self.cmds.push(NfCmd::Add(obj));
    }

    fn table(&mut self) {
        self.add(NfListObject::Table(Table {
            family: NfFamily::INet,
            name: TABLE.into(),
            handle: None,
        }));
    }

    fn base_chain(&mut self, name: &str, kind: NfChainType, hook: NfHook, prio: i32) {
        self.add(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: Cow::Owned(name.to_string()),
            newname: None,
            handle: None,
            _type: Some(kind),
            hook: Some(hook),
            prio: Some(prio),
            dev: None,
            policy: Some(NfChainPolicy::Accept),
        }));
    }

    fn base_chain_with_policy(&mut self, name: &str, hook: NfHook, policy: NfChainPolicy) {
        self.add(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: Cow::Owned(name.to_string()),
            newname: None,
            handle: None,
            _type: Some(NfChainType::Filter),
            hook: Some(hook),
            prio: Some(0),
            dev: None,
            policy: Some(policy),
        }));
    }

    fn exceptions_set(&mut self) {
        self.add(NfListObject::Set(Box::new(Set {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: EXCEPTIONS_SET.into(),
            handle: None,
            set_type: SetTypeValue::Concatenated(Cow::Owned(vec![
                SetType::Ifname,
                SetType::Ipv4Addr,
                SetType::InetService,
            ])),
            policy: None,
            flags: Some([SetFlag::Interval].into_iter().collect()),
            elem: None,
            timeout: None,
            gc_interval: None,
            size: None,
            comment: None,
        })));
    }

    /// The sets `blocked4` and `blocked6` ([`BLOCKED_V4`], [`BLOCKED_V6`]).
    fn blocked_set(&mut self) {
        for (name, kind, ranges) in [
            ("blocked4", SetType::Ipv4Addr, &BLOCKED_V4[..]),
            ("blocked6", SetType::Ipv6Addr, &BLOCKED_V6[..]),
        ] {
            let elem: Vec<Expression<'static>> = ranges
                .iter()
                .map(|&(addr, len)| prefix(addr, len))
                .collect();
            self.add(NfListObject::Set(Box::new(Set {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: name.into(),
                handle: None,
                set_type: SetTypeValue::Single(kind),
                policy: None,
                flags: Some([SetFlag::Interval].into_iter().collect()),
                elem: Some(Cow::Owned(elem)),
                timeout: None,
                gc_interval: None,
                size: None,
                comment: None,
            })));
        }
    }

    /// The job's (address, port) set of one family, filled from DNS answers.
    fn allowed_set(&mut self, name: &str, kind: SetType) {
        self.add(NfListObject::Set(Box::new(Set {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: Cow::Owned(name.to_string()),
            handle: None,
            set_type: SetTypeValue::Concatenated(Cow::Owned(vec![kind, SetType::InetService])),
            policy: None,
            flags: Some([SetFlag::Timeout].into_iter().collect()),
            elem: None,
            timeout: None,
            gc_interval: None,
            size: Some(MAX_ADMITTED_PAIRS as u32),
            comment: None,
        })));
    }

    fn rule(&mut self, chain: &str, expr: Vec<Statement<'static>>) {
        self.add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: TABLE.into(),
            chain: Cow::Owned(chain.to_string()),
            expr: Cow::Owned(expr),
            handle: None,
            index: None,
            comment: None,
        }));
    }

    fn build(self) -> Nftables<'static> {
        Nftables {
            objects: Cow::Owned(
                self.cmds
                    .into_iter()
                    .map(nftables::schema::NfObject::CmdObject)
                    .collect(),
            ),
        }
    }
}

/// Neighbour discovery on the job's link, which IPv6 needs to reach its gateway: only the
/// kernel sends these (a job has no raw sockets), and `hoplimit 255` keeps them on the link.
fn neighbour_discovery() -> Vec<Statement<'static>> {
    vec![
        is(
            field("icmpv6", "type"),
            Expression::Named(NamedExpression::Set(vec![
                nftables::expr::SetItem::Element(s("nd-neighbor-solicit")),
                nftables::expr::SetItem::Element(s("nd-neighbor-advert")),
            ])),
        ),
        is(field("ip6", "hoplimit"), Expression::Number(255)),
        accept(),
    ]
}

/// The ruleset inside an outbound job's namespace (applied to a fresh namespace, before the
/// job's link comes up). `ipv6`: the job has an IPv6 address (`[sandbox]
/// ipv6_address_pool`); without it all IPv6 is refused.
pub fn job_ruleset(ipv6: bool) -> Nftables<'static> {
    let mut b = Builder::new();
    b.table();
    b.blocked_set();
    b.base_chain("output", NfChainType::Filter, NfHook::Output, 0);
    // The job's own endpoint (169.254.170.2, 169.254.169.254) lives on its loopback.
    b.rule(
        "output",
        vec![is(meta(MetaKey::Oifname), s("lo")), accept()],
    );
    b.rule(
        "output",
        vec![
            in_set(field("ip", "daddr"), "blocked4"),
            counter(),
            reject(),
        ],
    );
    if ipv6 {
        b.rule("output", neighbour_discovery());
        b.rule(
            "output",
            vec![
                in_set(field("ip6", "daddr"), "blocked6"),
                counter(),
                reject(),
            ],
        );
    } else {
        // IPv6 is off in the namespace; this keeps it off should it ever come up.
        b.rule(
            "output",
            vec![is(meta(MetaKey::Nfproto), s("ipv6")), counter(), reject()],
        );
    }
    b.build()
}

/// How an egress-controlled job's table is built (issue 4). Addresses a DNS answer allowed
/// are added to the sets later, by the agent over nf_tables netlink (`egress::nftset`); the
/// `nft` batches [`add_addresses`] and [`admit_addresses`] do the same with a process, for
/// tests and as the benchmark's reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRules {
    /// Audit mode: everything but the blocked ranges is allowed and every new connection
    /// is logged; block mode: only the allowed sets, the rest is logged and refused.
    pub audit: bool,
    /// Explicit IPv4 `CIDR:port` entries of the policy (they may name a blocked range on
    /// purpose, so they are checked before the blocked ranges).
    pub static_v4: Vec<(Ipv4Addr, u8, u16)>,
    /// Explicit IPv6 `CIDR:port` entries (global unicast only: the policy loader refuses
    /// the blocked IPv6 ranges). They take effect for jobs that have IPv6.
    pub static_v6: Vec<(Ipv6Addr, u8, u16)>,
    /// The NFLOG group the agent listens on inside the job's namespace.
    pub log_group: u16,
}

/// The host's set of (job link, network, port): a job's explicit `CIDR:port` entries, which
/// the host's own rules would otherwise drop (private ranges, the host's addresses).
pub const EXCEPTIONS_SET: &str = "exceptions";
/// The sets of (address, port) pairs DNS answers admitted, with a timeout per element.
pub const ALLOWED_SET: &str = "allowed4";
/// The `size` of each allowed set: the most elements the kernel holds in it. The agent
/// admits at most this many pairs per job, both sets together (`egress::job`), so the kernel
/// refusing a full set is a backstop, not the bound a job meets.
pub const MAX_ADMITTED_PAIRS: usize = 8192;
pub const ALLOWED_SET6: &str = "allowed6";
/// Log prefixes the agent's NFLOG reader tells apart.
pub const LOG_BLOCKED: &str = "block";
pub const LOG_CONNECT: &str = "conn";
/// Rate of logged packets per job (the agent rate-limits the audit again).
const LOG_RATE_PER_SECOND: u32 = 20;

fn log(prefix: &str, group: u16) -> Statement<'static> {
    Statement::Log(Some(nftables::stmt::Log {
        prefix: Some(Cow::Owned(prefix.to_string())),
        group: Some(u32::from(group)),
        snaplen: Some(64),
        queue_threshold: None,
        level: None,
        flags: None,
    }))
}

fn limited() -> Statement<'static> {
    Statement::Limit(nftables::stmt::Limit {
        rate: LOG_RATE_PER_SECOND,
        rate_unit: None,
        per: Some("second".into()),
        burst: Some(2 * LOG_RATE_PER_SECOND),
        burst_unit: None,
        inv: None,
    })
}

fn concat(parts: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(parts))
}

fn ct_state(states: &[&str]) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::CT(CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        right: Expression::List(states.iter().map(|v| s(v)).collect()),
        op: Operator::IN,
    })
}

/// The table inside an egress-controlled job's namespace (instead of [`job_ruleset`]), its
/// `output` chain in this order, with policy drop:
///
/// 1. `lo` accepted (the job's endpoint and its resolver, 169.254.170.53);
/// 2. replies to the job's own connections accepted;
/// 3. without `ipv6`, all IPv6 refused (it is off in the namespace); with it, neighbour
///    discovery on the link accepted;
/// 4. DNS (port 53, TCP or UDP) anywhere else logged and refused: the agent is the only
///    resolver;
/// 5. explicit `CIDR:port` entries accepted (before 6, so a rule can name a private IPv4
///    range);
/// 6. the blocked ranges of both families (metadata, link-local, private, NAT64, ...)
///    logged and refused, in audit mode too — an allowed name that resolves there (DNS
///    rebinding) gains nothing;
/// 7. block mode: (address, port) pairs admitted from DNS answers (`allowed4`, `allowed6`)
///    accepted, everything else logged and refused; audit mode: new connections logged,
///    everything accepted.
///
/// Logging and refusing are separate rules: an exceeded `limit` makes its whole rule not
/// match, so a limited "log and refuse" rule would let a flood through.
pub fn job_egress_ruleset(rules: &EgressRules, ipv6: bool) -> Nftables<'static> {
    let mut b = Builder::new();
    b.table();
    b.blocked_set();
    b.allowed_set(ALLOWED_SET, SetType::Ipv4Addr);
    b.allowed_set(ALLOWED_SET6, SetType::Ipv6Addr);
    b.base_chain_with_policy("output", NfHook::Output, NfChainPolicy::Drop);
    let g = rules.log_group;
    b.rule(
        "output",
        vec![is(meta(MetaKey::Oifname), s("lo")), accept()],
    );
    b.rule(
        "output",
        vec![ct_state(&["established", "related"]), accept()],
    );
    if ipv6 {
        b.rule("output", neighbour_discovery());
    } else {
        b.rule(
            "output",
            vec![is(meta(MetaKey::Nfproto), s("ipv6")), counter(), reject()],
        );
    }
    // DNS (TCP or UDP port 53) to anything but the agent.
    let dns_elsewhere = || {
        vec![
            is(
                meta(MetaKey::L4proto),
                Expression::Named(NamedExpression::Set(vec![
                    nftables::expr::SetItem::Element(s("tcp")),
                    nftables::expr::SetItem::Element(s("udp")),
                ])),
            ),
            is(field("th", "dport"), Expression::Number(53)),
        ]
    };
    b.rule(
        "output",
        [dns_elsewhere(), vec![limited(), log(LOG_BLOCKED, g)]].concat(),
    );
    b.rule(
        "output",
        [dns_elsewhere(), vec![counter(), reject()]].concat(),
    );
    let statics = rules
        .static_v4
        .iter()
        .map(|&(net, len, port)| ("ip", net.to_string(), len, port))
        .chain(
            rules
                .static_v6
                .iter()
                .map(|&(net, len, port)| ("ip6", net.to_string(), len, port)),
        );
    for (family, net, len, port) in statics {
        b.rule(
            "output",
            vec![
                is(field(family, "daddr"), prefix(&net, len)),
                is(field("th", "dport"), Expression::Number(u32::from(port))),
                accept(),
            ],
        );
    }
    // A `limit` that is exceeded makes its whole rule not match, so the logging (limited)
    // and the refusal (never limited) are separate rules: a flood is refused all the same.
    for (family, set) in [("ip", "blocked4"), ("ip6", "blocked6")] {
        b.rule(
            "output",
            vec![
                in_set(field(family, "daddr"), set),
                limited(),
                log(LOG_BLOCKED, g),
            ],
        );
        b.rule(
            "output",
            vec![in_set(field(family, "daddr"), set), counter(), reject()],
        );
    }
    if rules.audit {
        b.rule(
            "output",
            vec![ct_state(&["new"]), limited(), log(LOG_CONNECT, g)],
        );
        b.rule("output", vec![accept()]);
    } else {
        for (family, set) in [("ip", ALLOWED_SET), ("ip6", ALLOWED_SET6)] {
            b.rule(
                "output",
                vec![
                    in_set(
                        concat(vec![field(family, "daddr"), field("th", "dport")]),
                        set,
                    ),
                    accept(),
                ],
            );
        }
        b.rule("output", vec![limited(), log(LOG_BLOCKED, g)]);
        b.rule("output", vec![counter(), reject()]);
    }
    b.build()
}

/// The elements of `pairs` of one family, for the job's allowed set of that family, each
/// with `timeout` when given.
fn allowed_elements(
    pairs: &[(IpAddr, u16)],
    v6: bool,
    timeout: Option<u32>,
) -> Vec<Expression<'static>> {
    pairs
        .iter()
        .filter(|(addr, _)| addr.is_ipv6() == v6)
        .map(|&(addr, port)| {
            let val = concat(vec![
                s(&addr.to_string()),
                Expression::Number(u32::from(port)),
            ]);
            match timeout {
                Some(t) => Expression::Named(NamedExpression::Elem(nftables::expr::Elem {
                    val: Box::new(val),
                    timeout: Some(t),
                    expires: None,
                    comment: None,
                    counter: None,
                })),
                None => val,
            }
        })
        .collect()
}

/// For each family of `pairs`: the set's name and its elements (with `timeout`, if given).
fn allowed_batches(
    pairs: &[(IpAddr, u16)],
    timeout: Option<u32>,
) -> Vec<nftables::schema::Element<'static>> {
    [(ALLOWED_SET, false), (ALLOWED_SET6, true)]
        .into_iter()
        .map(|(name, v6)| nftables::schema::Element {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.into(),
            elem: Cow::Owned(allowed_elements(pairs, v6, timeout)),
        })
        .filter(|e| !e.elem.is_empty())
        .collect()
}

/// Adds (address, port) pairs that are not in the job's allowed sets yet, each for
/// `ttl_secs`. (`add` keeps an element that is already there with its old timeout: use
/// [`admit_addresses`] to restart the timeout of pairs that may be there.)
pub fn add_addresses(pairs: &[(IpAddr, u16)], ttl_secs: u32) -> Nftables<'static> {
    let mut b = Builder::new();
    for e in allowed_batches(pairs, Some(ttl_secs)) {
        b.add(NfListObject::Element(e));
    }
    b.build()
}

/// Puts (address, port) pairs into the job's allowed sets, each for `ttl_secs` from now,
/// whether or not they are there already: the batch adds (so that each exists), deletes
/// and adds again, in one transaction. Slower than [`add_addresses`] (the kernel waits for
/// the deleted elements to be freed before the transaction's socket closes, ~10 ms).
pub fn admit_addresses(pairs: &[(IpAddr, u16)], ttl_secs: u32) -> Nftables<'static> {
    let mut b = Builder::new();
    for e in allowed_batches(pairs, Some(ttl_secs)) {
        b.add(NfListObject::Element(e));
    }
    for e in allowed_batches(pairs, None) {
        b.cmds.push(NfCmd::Delete(NfListObject::Element(e)));
    }
    for e in allowed_batches(pairs, Some(ttl_secs)) {
        b.add(NfListObject::Element(e));
    }
    b.build()
}

/// The host's table. `flush` first, so applying it again replaces the rules rather than
/// adding a second copy; the whole batch is one transaction. `other`: the families whose
/// forwarded traffic that neither comes from nor goes to a job link is dropped (see
/// `forwarding`: a host that airlock made forward must not route between its other
/// networks).
pub fn host_ruleset(other: super::forwarding::DropOther) -> Nftables<'static> {
    let mut b = Builder::new();
    b.table();
    b.blocked_set();
    b.exceptions_set();
    // Before the usual filter priority, so a job's packet meets these rules first.
    b.base_chain("input", NfChainType::Filter, NfHook::Input, -10);
    b.base_chain("forward", NfChainType::Filter, NfHook::Forward, -10);
    b.base_chain("postrouting", NfChainType::NAT, NfHook::Postrouting, 100);
    // The chains' rules are replaced; the sets keep their elements (the exceptions of the
    // jobs running now).
    for chain in ["input", "forward", "postrouting"] {
        b.cmds.push(NfCmd::Flush(FlushObject::Chain(Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: chain.into(),
            newname: None,
            handle: None,
            _type: None,
            hook: None,
            prio: None,
            dev: None,
            policy: None,
        })));
    }
    // A job's explicit `CIDR:port` entries (which may name a private range or the host).
    let exception = || {
        in_set(
            concat(vec![
                meta(MetaKey::Iifname),
                field("ip", "daddr"),
                field("th", "dport"),
            ]),
            EXCEPTIONS_SET,
        )
    };
    b.rule("input", vec![exception(), accept()]);
    // A job with IPv6 finds its gateway's link-layer address by neighbour discovery.
    b.rule(
        "input",
        [
            vec![is(meta(MetaKey::Iifname), job_links())],
            neighbour_discovery(),
        ]
        .concat(),
    );
    // Nothing else a job sends is for the host itself: not its public address, not the
    // job's gateway, not a service listening on any of the host's addresses.
    b.rule(
        "input",
        vec![is(meta(MetaKey::Iifname), job_links()), counter(), drop()],
    );
    b.rule("forward", vec![exception(), accept()]);
    // Jobs never reach each other.
    b.rule(
        "forward",
        vec![
            is(meta(MetaKey::Iifname), job_links()),
            is(meta(MetaKey::Oifname), job_links()),
            counter(),
            drop(),
        ],
    );
    // The job's own table drops these already; this holds should that table be missing.
    for (family, set) in [("ip", "blocked4"), ("ip6", "blocked6")] {
        b.rule(
            "forward",
            vec![
                is(meta(MetaKey::Iifname), job_links()),
                in_set(field(family, "daddr"), set),
                counter(),
                drop(),
            ],
        );
    }
    // Into a job only what answers the job's own connections.
    b.rule(
        "forward",
        vec![
            is(meta(MetaKey::Oifname), job_links()),
            // `in` tests the state's flags (`ct state established,related`); `==` would
            // compare with both flags at once and never match.
            Statement::Match(Match {
                left: Expression::Named(NamedExpression::CT(CT {
                    key: "state".into(),
                    family: None,
                    dir: None,
                })),
                right: Expression::List(vec![s("established"), s("related")]),
                op: Operator::IN,
            }),
            accept(),
        ],
    );
    b.rule(
        "forward",
        vec![is(meta(MetaKey::Oifname), job_links()), counter(), drop()],
    );
    // Forwarding airlock turned on is for jobs only: the host's other networks are not
    // routed to each other through it.
    for (on, family) in [(other.ipv4, "ipv4"), (other.ipv6, "ipv6")] {
        if on {
            b.rule(
                "forward",
                vec![
                    is(meta(MetaKey::Nfproto), s(family)),
                    is_not(meta(MetaKey::Iifname), job_links()),
                    is_not(meta(MetaKey::Oifname), job_links()),
                    counter(),
                    drop(),
                ],
            );
        }
    }
    // Out to anywhere but a job link: masqueraded behind the host's address. Matched on the
    // job links rather than the pool, so every agent on the host writes the same table.
    b.rule(
        "postrouting",
        vec![
            is(meta(MetaKey::Iifname), job_links()),
            is_not(meta(MetaKey::Oifname), job_links()),
            Statement::Masquerade(None),
        ],
    );
    b.build()
}

fn exception_elems(link: &str, entries: &[(Ipv4Addr, u8, u16)]) -> Vec<Expression<'static>> {
    entries
        .iter()
        .map(|&(net, len, port)| {
            concat(vec![
                s(link),
                prefix(&net.to_string(), len),
                Expression::Number(u32::from(port)),
            ])
        })
        .collect()
}

fn exceptions(link: &str, entries: &[(Ipv4Addr, u8, u16)]) -> nftables::schema::Element<'static> {
    nftables::schema::Element {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: EXCEPTIONS_SET.into(),
        elem: Cow::Owned(exception_elems(link, entries)),
    }
}

/// Adds a job's explicit entries to the host's exceptions, for its host link.
pub fn add_exceptions(link: &str, entries: &[(Ipv4Addr, u8, u16)]) -> Nftables<'static> {
    let mut b = Builder::new();
    b.add(NfListObject::Element(exceptions(link, entries)));
    b.build()
}

/// Removes a job's entries from the host's exceptions (added first, so that removing ones
/// already gone is not an error).
pub fn delete_exceptions(link: &str, entries: &[(Ipv4Addr, u8, u16)]) -> Nftables<'static> {
    let mut b = Builder::new();
    b.add(NfListObject::Element(exceptions(link, entries)));
    b.cmds.push(NfCmd::Delete(NfListObject::Element(exceptions(
        link, entries,
    ))));
    b.build()
}

/// One element of the host's exceptions set: (link, network, prefix length, port).
pub type Exception = (String, Ipv4Addr, u8, u16);

/// The elements of the host's exceptions set (`nft -j list set`). Empty when the table or
/// the set does not exist.
pub fn list_exceptions() -> Result<Vec<Exception>, FirewallError> {
    let out = match std::process::Command::new(nft_program())
        .args(["-j", "list", "set", "inet", TABLE, EXCEPTIONS_SET])
        .output()
    {
        Ok(out) => out,
        // Without nft no job ever had exceptions.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(FirewallError::Spawn {
                program: nft_program().to_string(),
                source,
            })
        }
    };
    if !out.status.success() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| FirewallError::Apply {
            what: "listing of the host's exceptions",
            message: e.to_string(),
        })?;
    let mut found = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        for elem in item["set"]["elem"].as_array().into_iter().flatten() {
            let parts = &elem["concat"];
            let link = parts[0].as_str();
            // A /32 is listed as a plain address, anything wider as a prefix.
            let (addr, len) = match &parts[1] {
                serde_json::Value::String(a) => (a.parse().ok(), Some(32)),
                p => (
                    p["prefix"]["addr"].as_str().and_then(|a| a.parse().ok()),
                    p["prefix"]["len"]
                        .as_u64()
                        .and_then(|l| u8::try_from(l).ok()),
                ),
            };
            let port = parts[2].as_u64().and_then(|p| u16::try_from(p).ok());
            if let (Some(link), Some(addr), Some(len), Some(port)) = (link, addr, len, port) {
                found.push((link.to_string(), addr, len, port));
            }
        }
    }
    Ok(found)
}

/// Entries of one port nested in another's network would be conflicting intervals in the
/// set: keep the widest.
pub fn widest(entries: &[(Ipv4Addr, u8, u16)]) -> Vec<(Ipv4Addr, u8, u16)> {
    let range = |&(a, len, _): &(Ipv4Addr, u8, u16)| {
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        };
        let start = u32::from(a) & mask;
        (start, start | !mask)
    };
    let mut out: Vec<(Ipv4Addr, u8, u16)> = Vec::new();
    for e in entries {
        let (a, b) = range(e);
        let covered = entries.iter().any(|o| {
            let (c, d) = range(o);
            o.2 == e.2 && c <= a && b <= d && (c, d) != (a, b)
        });
        if !covered && !out.iter().any(|o| o.2 == e.2 && range(o) == (a, b)) {
            out.push(*e);
        }
    }
    out
}

/// The `nft` program: `/usr/sbin/nft` where Debian and Fedora install it, else from PATH.
fn nft_program() -> &'static str {
    if Path::new("/usr/sbin/nft").exists() {
        "/usr/sbin/nft"
    } else {
        "nft"
    }
}

/// Applies `ruleset` in the calling thread's network namespace (`nft` is a child of this
/// thread, so it inherits the thread's namespace). Runs `nft -j -f -` itself rather than
/// through the crate's helper so that nft's own error message reaches the caller.
pub fn apply(ruleset: &Nftables<'_>, what: &'static str) -> Result<(), FirewallError> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let program = nft_program();
    let payload = serde_json::to_vec(ruleset).expect("an nftables ruleset always serialises");
    let spawn_err = |source| FirewallError::Spawn {
        program: program.to_string(),
        source,
    };
    let mut child = Command::new(program)
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(&payload));
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        if let Some(Err(e)) = written {
            return Err(spawn_err(e));
        }
        return Ok(());
    }
    let message = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    Err(FirewallError::Apply {
        what,
        message: if message.is_empty() {
            format!("nft exited with {}", out.status)
        } else {
            message
        },
    })
}

/// Applies `ruleset` inside the network namespace at `ns_path`, from a thread that enters
/// it and exits afterwards.
pub fn apply_in_netns(
    ns_path: &Path,
    ruleset: Nftables<'static>,
    what: &'static str,
) -> Result<(), FirewallError> {
    super::netns::run_in_netns(ns_path, move || apply(&ruleset, what))
        .map_err(|e| FirewallError::Namespace(e.to_string()))?
}

/// Turns on IPv4 forwarding in the host namespace, which outbound jobs need (as Docker
/// does, it stays on). `Ok(true)` when it was off.
pub fn enable_forwarding(proc_dir: &Path) -> Result<bool, FirewallError> {
    let path = proc_dir.join("sys/net/ipv4/ip_forward");
    let err = |source| FirewallError::Forwarding {
        path: path.clone(),
        source,
    };
    let now = std::fs::read_to_string(&path).map_err(err)?;
    if now.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(&path, "1").map_err(err)?;
    Ok(true)
}

/// Turns on IPv6 forwarding (`net.ipv6.conf.all.forwarding`) for jobs with IPv6; true
/// when it was off. A forwarding host ignores router advertisements on interfaces with
/// `accept_ra = 1`, so each interface (and `default`, for those made later) with
/// `accept_ra = 1` is set to 2 first — "accept them even when forwarding", which is what
/// it did before — and each change is returned for the log. Job links are left alone.
pub fn enable_forwarding6(proc_dir: &Path) -> Result<Option<Vec<String>>, FirewallError> {
    let conf = proc_dir.join("sys/net/ipv6/conf");
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FirewallError::Forwarding { path, source }
    };
    let all = conf.join("all/forwarding");
    if std::fs::read_to_string(&all).map_err(err(&all))?.trim() == "1" {
        return Ok(None);
    }
    let mut changed = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(&conf)
        .map_err(err(&conf))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n != "all" && !n.starts_with(super::netns::LINK_PREFIX))
        .collect();
    names.sort();
    for name in names {
        let knob = conf.join(&name).join("accept_ra");
        match std::fs::read_to_string(&knob) {
            Ok(v) if v.trim() == "1" => {
                std::fs::write(&knob, "2").map_err(err(&knob))?;
                changed.push(name);
            }
            // Gone since the listing, or no such knob: nothing to keep.
            _ => {}
        }
    }
    std::fs::write(&all, "1").map_err(err(&all))?;
    Ok(Some(changed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(n: &Nftables<'_>) -> String {
        serde_json::to_string(n).unwrap()
    }

    #[test]
    fn the_job_table_blocks_metadata_private_and_ipv6_but_not_its_loopback() {
        let j = json(&job_ruleset(false));
        assert!(!j.contains("nd-neighbor-solicit"), "{j}");
        for (addr, len) in [("169.254.0.0", 16), ("10.0.0.0", 8), ("192.168.0.0", 16)] {
            assert!(
                j.contains(&format!(r#"{{"prefix":{{"addr":"{addr}","len":{len}}}}}"#)),
                "{j}"
            );
        }
        assert!(j.contains(r#""right":"lo""#), "{j}");
        assert!(j.contains(r#""right":"ipv6""#), "{j}");
        assert!(j.contains(r#""hook":"output""#), "{j}");
    }

    #[test]
    fn blocked_ranges_cover_the_metadata_addresses_and_not_the_documentation_ranges() {
        let covers = |ip: Ipv4Addr| {
            BLOCKED_V4.iter().any(|&(net, len)| {
                let net: Ipv4Addr = net.parse().unwrap();
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                u32::from(ip) & mask == u32::from(net) & mask
            })
        };
        for ip in [
            "169.254.169.254",
            "169.254.170.2",
            "10.200.0.1",
            "127.0.0.1",
            "100.100.1.1",
        ] {
            assert!(covers(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["203.0.113.7", "198.51.100.1", "1.1.1.1", "8.8.8.8"] {
            assert!(!covers(ip.parse().unwrap()), "{ip}");
        }
    }

    fn covers6(ip: &str) -> bool {
        let ip: Ipv6Addr = ip.parse().unwrap();
        BLOCKED_V6.iter().any(|&(net, len)| {
            let net: Ipv6Addr = net.parse().unwrap();
            let mask = u128::MAX << (128 - u32::from(len));
            u128::from(ip) & mask == u128::from(net) & mask
        })
    }

    #[test]
    fn blocked_ipv6_ranges_cover_metadata_nat64_and_embedded_ipv4() {
        for ip in [
            "fd00:ec2::254",          // EC2 metadata
            "fd00:ec2::23",           // EC2 container credentials (legacy)
            "64:ff9b::a9fe:a9fe",     // NAT64 of 169.254.169.254
            "64:ff9b:1::a00:1",       // local-use NAT64
            "::ffff:169.254.169.254", // IPv4-mapped
            "::1",
            "::",
            "fe80::1",
            "ff02::1",
            "2002:a9fe:a9fe::1",     // 6to4 of the metadata address
            "2001:0:a9fe:a9fe::1",   // Teredo
            "fd61:6972:6c6b::ac8:2", // another job
        ] {
            assert!(covers6(ip), "{ip}");
        }
        for ip in [
            "2001:db8::1",
            "2606:4700::1111",
            "2a05:d014::1",
            "2600:1f18::1",
        ] {
            assert!(!covers6(ip), "{ip}");
        }
    }

    #[test]
    fn with_ipv6_the_job_tables_refuse_the_blocked_ipv6_ranges_instead_of_all_ipv6() {
        let outbound = json(&job_ruleset(true));
        assert!(!outbound.contains(r#""right":"ipv6""#), "{outbound}");
        assert!(outbound.contains(r#""right":"@blocked6""#), "{outbound}");
        assert!(outbound.contains("nd-neighbor-solicit"), "{outbound}");
        let rules = EgressRules {
            audit: false,
            static_v4: vec![],
            static_v6: vec![("2001:db8:1::".parse().unwrap(), 48, 443)],
            log_group: 7,
        };
        let off = json(&job_egress_ruleset(&rules, false));
        let on = json(&job_egress_ruleset(&rules, true));
        assert!(off.contains(r#""right":"ipv6""#), "{off}");
        assert!(!on.contains(r#""right":"ipv6""#), "{on}");
        for j in [&off, &on] {
            assert!(j.contains(r#""right":"@allowed6""#), "{j}");
            assert!(j.contains(r#""right":"@blocked6""#), "{j}");
            assert!(
                j.contains(r#"{"prefix":{"addr":"2001:db8:1::","len":48}}"#),
                "{j}"
            );
        }
    }

    #[test]
    fn admitted_pairs_go_to_the_set_of_their_family() {
        let pairs: Vec<(IpAddr, u16)> = vec![
            ("203.0.113.5".parse().unwrap(), 443),
            ("2001:db8::5".parse().unwrap(), 443),
        ];
        let add = json(&add_addresses(&pairs, 60));
        assert!(
            add.contains(
                r#""name":"allowed4","elem":[{"elem":{"val":{"concat":["203.0.113.5",443]}"#
            ),
            "{add}"
        );
        assert!(
            add.contains(
                r#""name":"allowed6","elem":[{"elem":{"val":{"concat":["2001:db8::5",443]}"#
            ),
            "{add}"
        );
        let only4 = json(&admit_addresses(&pairs[..1], 60));
        assert!(!only4.contains("allowed6"), "{only4}");
        assert_eq!(only4.matches(r#""name":"allowed4""#).count(), 3, "{only4}");
    }

    #[test]
    fn ipv6_forwarding_keeps_router_advertisements_where_they_were_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("sys/net/ipv6/conf");
        for (name, ra) in [
            ("all", "1"),
            ("default", "1"),
            ("eth0", "1"),
            ("eth1", "0"),
            ("al-0123456789h", "1"),
        ] {
            std::fs::create_dir_all(conf.join(name)).unwrap();
            std::fs::write(conf.join(name).join("accept_ra"), ra).unwrap();
        }
        std::fs::write(conf.join("all/forwarding"), "0\n").unwrap();
        let changed = enable_forwarding6(dir.path()).unwrap();
        assert_eq!(
            changed,
            Some(vec!["default".to_string(), "eth0".to_string()])
        );
        let read = |p: &str| std::fs::read_to_string(conf.join(p)).unwrap();
        assert_eq!(read("all/forwarding"), "1");
        assert_eq!(read("eth0/accept_ra"), "2");
        assert_eq!(read("default/accept_ra"), "2");
        assert_eq!(read("eth1/accept_ra"), "0");
        assert_eq!(read("al-0123456789h/accept_ra"), "1");
        // Already on: nothing is touched again.
        std::fs::write(conf.join("eth1/accept_ra"), "1").unwrap();
        assert_eq!(enable_forwarding6(dir.path()).unwrap(), None);
        assert_eq!(read("eth1/accept_ra"), "1");
    }

    #[test]
    fn the_host_table_drops_other_forwarding_only_for_the_families_asked() {
        use super::super::forwarding::DropOther;
        let rule = |family: &str| {
            format!(
                r#"{{"match":{{"left":{{"meta":{{"key":"nfproto"}}}},"right":"{family}","op":"=="}}}},{{"match":{{"left":{{"meta":{{"key":"iifname"}}}},"right":"al-*","op":"!="}}}},{{"match":{{"left":{{"meta":{{"key":"oifname"}}}},"right":"al-*","op":"!="}}}},{{"counter":null}},{{"drop":null}}"#
            )
        };
        let none = json(&host_ruleset(DropOther::default()));
        assert!(!none.contains("nfproto"), "{none}");
        let v4 = json(&host_ruleset(DropOther {
            ipv4: true,
            ipv6: false,
        }));
        assert!(v4.contains(&rule("ipv4")), "{v4}");
        assert!(!v4.contains(&rule("ipv6")), "{v4}");
        let both = json(&host_ruleset(DropOther {
            ipv4: true,
            ipv6: true,
        }));
        assert!(both.contains(&rule("ipv4")) && both.contains(&rule("ipv6")));
    }

    #[test]
    fn the_host_table_is_flushed_before_its_rules_so_reapplying_replaces_them() {
        let j = json(&host_ruleset(Default::default()));
        let flush = j.find(r#"{"flush":"#).expect("flush");
        let first_rule = j.find(r#"{"add":{"rule":"#).expect("rule");
        assert!(flush < first_rule, "{j}");
        assert!(j.contains(r#""masquerade":null"#), "{j}");
        assert!(j.contains(r#""right":"al-*""#), "{j}");
    }
}
