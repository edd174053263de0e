//! Admission of answered addresses into an egress-controlled job's allowed sets
//! (`allowed4`, `allowed6` of table `inet airlock` in the job's namespace) over nf_tables
//! netlink: no process per address.
//!
//! Each job has one `NETLINK_NETFILTER` socket, made inside its namespace by a helper thread
//! that enters it and exits (as `nflog::open_in_netns` and `netns::run_in_netns` do): the
//! socket belongs to that namespace for good, so what it changes is the job's table and no
//! other. One call of [`SetSocket::admit`] is one NFNL batch (`NFNL_MSG_BATCH_BEGIN`,
//! `NFT_MSG_NEWSETELEM` / `NFT_MSG_DELSETELEM` messages, `NFNL_MSG_BATCH_END`), which the
//! kernel applies as one transaction: all of it or nothing. Every element message asks for
//! an acknowledgement, and the call returns only once the kernel has acknowledged each of
//! them, or with the first error it reported; so a failed admission is known before the
//! resolver releases the answer, and a failed batch changed nothing.
//!
//! A pair that may already be in the set has its timeout restarted by "add, delete, add" in
//! the same batch: `add` alone keeps an existing element's old timeout on kernels before
//! 6.10's element timeout updates.
//!
//! The wire format is `netlink-packet-netfilter`'s (its `nftables` messages); the socket is
//! `netlink-sys`'s `TokioSocket`. This module never builds or changes the table, its chains
//! or its rules (`sandbox::firewall` does, once, when the namespace is made), never starts a
//! process, and decides nothing about which pairs to admit (`egress::job` does).

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::{
    DataAttribute, ListAttribute, NfTablesMessage, SetElementAttribute, SetElementList,
    SetElementMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::constants::NETLINK_NETFILTER;
use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket};
use nix::errno::Errno;
use nix::sched::CloneFlags;

use crate::sandbox::firewall::{ALLOWED_SET, ALLOWED_SET6, TABLE};

/// `NFNL_SUBSYS_NFTABLES`: the batch's subsystem, in the `res_id` of its begin and end.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// How long the kernel has to acknowledge a batch. It applies a batch inside the `send`
/// itself, so its acknowledgements are queued before `send` returns; this only bounds a
/// kernel that does not answer at all.
const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest datagram read: an acknowledgement is 36 bytes (`NETLINK_CAP_ACK`), an error with
/// the kernel's extended message a few hundred.
const DATAGRAM_MAX: usize = 8 * 1024;
/// The most (address, port) pairs one batch may carry. With the worst case of a refresh
/// (add, delete, add) of IPv6 pairs, 120 bytes each, a batch stays under the socket's
/// default send buffer (212,992 bytes), which a netlink `send` must fit in whole.
pub const MAX_PAIRS_PER_BATCH: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}; is it a network namespace file?")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("cannot open an nf_tables netlink socket in network namespace {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("the helper thread for network namespace {0} could not start or panicked")]
    Thread(PathBuf),
    #[error("the nf_tables socket must be opened inside a tokio runtime")]
    NoRuntime,
    #[error("{pairs} (address, port) pairs in one admission, more than {MAX_PAIRS_PER_BATCH}")]
    TooMany { pairs: usize },
    #[error("cannot send the admission batch to nf_tables: {0}")]
    Send(#[source] io::Error),
    #[error("cannot read nf_tables' answer to the admission batch: {0}")]
    Receive(#[source] io::Error),
    #[error("nf_tables did not acknowledge the admission batch within {0:?}")]
    NoAnswer(Duration),
    #[error(
        "nf_tables refused the admission into set {set} ({}): {source}",
        hint(source)
    )]
    Refused {
        /// `allowed4`, `allowed6`, or `batch` when the kernel refused the batch as a whole.
        set: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What an errno from nf_tables means for the job's sets.
fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENFILE) => "the set is full",
        Some(Errno::ENOENT) => "the job's table or set is missing",
        Some(Errno::EPERM) => "the agent lacks CAP_NET_ADMIN in the job's namespace",
        Some(Errno::EMSGSIZE) => "the batch is larger than the socket takes",
        _ => "the transaction was aborted, nothing changed",
    }
}

/// One (address, port) pair to admit for `timeout_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    pub addr: IpAddr,
    pub port: u16,
    pub timeout_secs: u32,
    /// The pair may be in the set already: restart its timeout (add, delete, add) rather
    /// than only add it.
    pub refresh: bool,
}

/// A job's nf_tables socket, made inside its namespace. Admissions through it are
/// serialised (one batch and its acknowledgements at a time).
pub struct SetSocket {
    inner: tokio::sync::Mutex<Inner>,
    ns_path: PathBuf,
}

struct Inner {
    socket: TokioSocket,
    next_seq: u32,
}

impl std::fmt::Debug for SetSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetSocket")
            .field("ns_path", &self.ns_path)
            .finish_non_exhaustive()
    }
}

/// Opens the job's nf_tables socket inside the network namespace at `ns_path`, from a
/// thread that enters it and exits. Must be called inside a tokio runtime, which the socket
/// is registered with. Blocks briefly (one thread spawn).
pub fn open_in_netns(ns_path: &Path) -> Result<SetSocket, SetError> {
    let rt = tokio::runtime::Handle::try_current().map_err(|_| SetError::NoRuntime)?;
    let path = ns_path.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("airlock-nftset".into())
        .spawn(move || {
            let ns = File::open(&path).map_err(|source| SetError::Open {
                path: path.clone(),
                source,
            })?;
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|source| SetError::Enter {
                path: path.clone(),
                source,
            })?;
            let socket_err = |source| SetError::Socket {
                path: path.clone(),
                source,
            };
            let mut socket = {
                let _rt = rt.enter();
                TokioSocket::new(NETLINK_NETFILTER).map_err(socket_err)?
            };
            socket.socket_mut().bind_auto().map_err(socket_err)?;
            // Acknowledgements carry the request's header only, not the whole batch.
            socket.socket_ref().set_cap_ack(true).map_err(socket_err)?;
            Ok(socket)
        })
        .map_err(|_| SetError::Thread(ns_path.to_path_buf()))?;
    let socket = thread
        .join()
        .map_err(|_| SetError::Thread(ns_path.to_path_buf()))??;
    Ok(SetSocket {
        inner: tokio::sync::Mutex::new(Inner {
            socket,
            next_seq: 1,
        }),
        ns_path: ns_path.to_path_buf(),
    })
}

impl SetSocket {
    /// The namespace the socket was made in.
    pub fn ns_path(&self) -> &Path {
        &self.ns_path
    }

    /// Puts `pairs` into the job's allowed sets in one transaction, and returns once the
    /// kernel acknowledged every message of it, or with the first error (then nothing of
    /// the batch was applied).
    pub async fn admit(&self, pairs: &[Pair]) -> Result<(), SetError> {
        if pairs.is_empty() {
            return Ok(());
        }
        if pairs.len() > MAX_PAIRS_PER_BATCH {
            return Err(SetError::TooMany { pairs: pairs.len() });
        }
        let mut inner = self.inner.lock().await;
        let first = inner.next_seq;
        let (bytes, acked) = batch(pairs, first);
        // One more for the begin and the end; a reply to an earlier, abandoned batch (its
        // caller gave up waiting) carries a sequence number outside this range.
        let count = acked.len() as u32 + 2;
        inner.next_seq = first.wrapping_add(count);
        inner.socket.send(&bytes).await.map_err(SetError::Send)?;
        tokio::time::timeout(
            ACK_TIMEOUT,
            acknowledged(&inner.socket, first, count, &acked),
        )
        .await
        .map_err(|_| SetError::NoAnswer(ACK_TIMEOUT))?
    }
}

/// Reads the kernel's acknowledgements until every message in `acked` (sequence number,
/// set) has its own, or an error arrives. Errors of the begin message (the kernel refused
/// the batch before looking at its messages) name no set.
async fn acknowledged(
    socket: &TokioSocket,
    first: u32,
    count: u32,
    acked: &[(u32, &'static str)],
) -> Result<(), SetError> {
    let mut pending: Vec<u32> = acked.iter().map(|&(seq, _)| seq).collect();
    let mut datagram = Vec::with_capacity(DATAGRAM_MAX);
    while !pending.is_empty() {
        datagram.clear();
        socket
            .recv(&mut datagram)
            .await
            .map_err(SetError::Receive)?;
        for bytes in messages(&datagram) {
            let Ok(msg) = NetlinkMessage::<NetfilterMessage>::deserialize(bytes) else {
                continue;
            };
            let seq = msg.header.sequence_number;
            if seq.wrapping_sub(first) >= count {
                continue;
            }
            let NetlinkPayload::Error(e) = msg.payload else {
                continue;
            };
            if e.code.is_some() {
                let set = acked
                    .iter()
                    .find(|&&(s, _)| s == seq)
                    .map_or("batch", |&(_, set)| set);
                return Err(SetError::Refused {
                    set,
                    source: e.to_io(),
                });
            }
            pending.retain(|&s| s != seq);
        }
    }
    Ok(())
}

/// The netlink messages of a datagram, each as its own slice.
fn messages(datagram: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        let len = NetlinkBuffer::new_checked(rest).ok()?.length() as usize;
        if len == 0 || len > rest.len() {
            return None;
        }
        let (msg, after) = rest.split_at(len);
        rest = after.get(len.next_multiple_of(4) - len..).unwrap_or(&[]);
        Some(msg)
    })
}

/// The set element key of a pair: the address, then the port in a 4-byte register (an
/// `ipv4_addr . inet_service` key is 8 bytes, `ipv6_addr . inet_service` 20), network order.
fn key(addr: IpAddr, port: u16) -> Vec<u8> {
    let mut key = match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    key.extend_from_slice(&port.to_be_bytes());
    key.extend_from_slice(&[0, 0]);
    key
}

fn element(pair: &Pair, with_timeout: bool) -> ListAttribute<SetElementAttribute> {
    let mut attrs = vec![SetElementAttribute::Key(DataAttribute::Value(key(
        pair.addr, pair.port,
    )))];
    if with_timeout {
        // Milliseconds, big-endian (NFTA_SET_ELEM_TIMEOUT).
        attrs.push(SetElementAttribute::Timeout(
            u64::from(pair.timeout_secs) * 1000,
        ));
    }
    ListAttribute::Element(attrs)
}

fn message(
    inner: NfTablesMessage,
    family: NetfilterProtoFamily,
    res_id: u16,
    flags: u16,
    seq: u32,
) -> NetlinkMessage<NetfilterMessage> {
    let mut msg = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(family, 0, res_id),
        inner,
    ));
    msg.header.flags = flags;
    msg.header.sequence_number = seq;
    msg.finalize();
    msg
}

fn control(inner: ControlMessage, seq: u32) -> NetlinkMessage<NetfilterMessage> {
    let mut msg = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
        inner,
    ));
    msg.header.flags = NLM_F_REQUEST;
    msg.header.sequence_number = seq;
    msg.finalize();
    msg
}

fn set_elements(set: &str, elems: Vec<ListAttribute<SetElementAttribute>>) -> SetElementMessage {
    SetElementMessage {
        attributes: vec![
            SetElementList::Table(TABLE.to_string()),
            SetElementList::Set(set.to_string()),
            SetElementList::Elements(elems),
        ],
    }
}

/// The batch for `pairs`, its messages numbered from `first`, and the sequence numbers
/// (with their set) that must be acknowledged. Per family: add every pair (with its
/// timeout); then delete the pairs to refresh and add them again.
fn batch(pairs: &[Pair], first: u32) -> (Vec<u8>, Vec<(u32, &'static str)>) {
    let mut seq = first;
    let mut next = || {
        let s = seq;
        seq = seq.wrapping_add(1);
        s
    };
    let mut msgs = vec![control(ControlMessage::BatchBegin, next())];
    let mut acked = Vec::new();
    for (set, v6) in [(ALLOWED_SET, false), (ALLOWED_SET6, true)] {
        let family: Vec<&Pair> = pairs.iter().filter(|p| p.addr.is_ipv6() == v6).collect();
        if family.is_empty() {
            continue;
        }
        let refresh: Vec<&Pair> = family.iter().copied().filter(|p| p.refresh).collect();
        let mut steps = vec![(
            true,
            family.iter().map(|p| element(p, true)).collect::<Vec<_>>(),
        )];
        if !refresh.is_empty() {
            steps.push((false, refresh.iter().map(|p| element(p, false)).collect()));
            steps.push((true, refresh.iter().map(|p| element(p, true)).collect()));
        }
        for (add, elems) in steps {
            let s = next();
            let (inner, flags) = if add {
                (
                    NfTablesMessage::NewSetElement(set_elements(set, elems)),
                    NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK,
                )
            } else {
                (
                    NfTablesMessage::DeleteSetElement(set_elements(set, elems)),
                    NLM_F_REQUEST | NLM_F_ACK,
                )
            };
            msgs.push(message(inner, NetfilterProtoFamily::Inet, 0, flags, s));
            acked.push((s, set));
        }
    }
    msgs.push(control(ControlMessage::BatchEnd, next()));
    let len: usize = msgs.iter().map(|m| m.buffer_len()).sum();
    let mut bytes = vec![0u8; len];
    let mut at = 0;
    for m in &msgs {
        let n = m.buffer_len();
        m.serialize(&mut bytes[at..at + n]);
        at += n;
    }
    (bytes, acked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(addr: &str, port: u16, refresh: bool) -> Pair {
        Pair {
            addr: addr.parse().unwrap(),
            port,
            timeout_secs: 125,
            refresh,
        }
    }

    #[test]
    fn keys_are_address_then_port_in_a_register() {
        assert_eq!(
            key("203.0.113.5".parse().unwrap(), 443),
            [203, 0, 113, 5, 0x01, 0xbb, 0, 0]
        );
        let k6 = key("2001:db8::5".parse().unwrap(), 8080);
        assert_eq!(k6.len(), 20);
        assert_eq!(&k6[16..], [0x1f, 0x90, 0, 0]);
    }

    /// One message of a batch: (message type, flags, set name, element count, timeouts).
    type Seen = (u16, u16, Option<String>, usize, Vec<u64>);

    fn walk(bytes: &[u8]) -> Vec<Seen> {
        messages(bytes)
            .map(|m| {
                let msg = NetlinkMessage::<NetfilterMessage>::deserialize(m).unwrap();
                let (set, elems, timeouts) = match &msg.payload {
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner:
                            netlink_packet_netfilter::NetfilterMessageInner::NfTables(
                                NfTablesMessage::NewSetElement(e)
                                | NfTablesMessage::DeleteSetElement(e),
                            ),
                        ..
                    }) => {
                        let mut set = None;
                        let mut count = 0;
                        let mut timeouts = Vec::new();
                        for a in &e.attributes {
                            match a {
                                SetElementList::Set(s) => set = Some(s.clone()),
                                SetElementList::Elements(list) => {
                                    count = list.len();
                                    for l in list {
                                        if let ListAttribute::Element(attrs) = l {
                                            for attr in attrs {
                                                if let SetElementAttribute::Timeout(t) = attr {
                                                    timeouts.push(*t);
                                                }
                                            }
                                        }
                                    }
                                }
                                _ => {}
                            }
                        }
                        (set, count, timeouts)
                    }
                    _ => (None, 0, Vec::new()),
                };
                (
                    msg.header.message_type,
                    msg.header.flags,
                    set,
                    elems,
                    timeouts,
                )
            })
            .collect()
    }

    #[test]
    fn one_batch_adds_new_pairs_and_re_adds_refreshed_ones() {
        let pairs = [
            pair("203.0.113.5", 443, false),
            pair("203.0.113.6", 443, true),
            pair("2001:db8::5", 443, false),
        ];
        let (bytes, acked) = batch(&pairs, 7);
        let seen = walk(&bytes);
        const NEW: u16 = 0x0a0c;
        const DEL: u16 = 0x0a0e;
        let ack = NLM_F_REQUEST | NLM_F_ACK;
        let summary: Vec<(u16, u16, Option<&str>, usize)> = seen
            .iter()
            .map(|(t, f, s, n, _)| (*t, *f, s.as_deref(), *n))
            .collect();
        assert_eq!(
            summary,
            [
                (0x10, NLM_F_REQUEST, None, 0),
                (NEW, ack | NLM_F_CREATE, Some("allowed4"), 2),
                (DEL, ack, Some("allowed4"), 1),
                (NEW, ack | NLM_F_CREATE, Some("allowed4"), 1),
                (NEW, ack | NLM_F_CREATE, Some("allowed6"), 1),
                (0x11, NLM_F_REQUEST, None, 0),
            ]
        );
        // Timeouts in milliseconds on the adds, none on the delete.
        assert_eq!(seen[1].4, [125_000, 125_000]);
        assert!(seen[2].4.is_empty());
        assert_eq!(
            acked,
            [
                (8, "allowed4"),
                (9, "allowed4"),
                (10, "allowed4"),
                (11, "allowed6")
            ]
        );
    }

    #[test]
    fn sequence_numbers_wrap() {
        let (_, acked) = batch(&[pair("203.0.113.5", 443, true)], u32::MAX - 1);
        assert_eq!(
            acked.iter().map(|a| a.0).collect::<Vec<_>>(),
            [u32::MAX, 0, 1]
        );
    }

    #[test]
    fn errors_say_what_the_errno_means() {
        let e = SetError::Refused {
            set: "allowed4",
            source: io::Error::from_raw_os_error(Errno::ENFILE as i32),
        };
        assert!(e.to_string().contains("the set is full"), "{e}");
    }
}
