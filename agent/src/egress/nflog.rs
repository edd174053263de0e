//! The kernel's reports of a job's blocked (and, in audit mode, new) connections, read from
//! NFLOG (`nfnetlink_log`).
//!
//! The job's nftables chain logs to a group (`log prefix "block" group 1`); the kernel hands
//! each logged packet to the one netlink socket bound to that group *in the namespace the
//! packet was logged in*. So the agent opens that socket inside the job's namespace, from a
//! helper thread that enters it and exits (as `sandbox::netns::bind_in_netns` does), and
//! reads it from the host namespace: the socket identifies the job, and the group number only
//! has to be unique within the namespace ([`DEFAULT_GROUP`] for every job). A second socket
//! for the same group in the same namespace is refused by the kernel; the group is free
//! again as soon as the socket that held it is closed.
//!
//! The socket asks for the first [`COPY_RANGE`] bytes of each packet, enough for the IP
//! header (IPv4 with the largest options, IPv6 with a short extension header chain) and the
//! ports; each report becomes an [`NflogEvent`]. The reader never waits for the consumer: an
//! event that does not fit in the channel is dropped and counted. Reports the kernel could
//! not hand over (the socket's buffer was full) are counted too, from the gaps in the
//! per-group sequence numbers the socket asks for, so every packet the kernel logged is
//! either delivered or counted in [`NflogReader::dropped`] once a later one has been read.
//!
//! The netlink wire format is `netlink-packet-netfilter`'s; the socket is `netlink-sys`'s
//! `TokioSocket`, created and registered with the runtime by the helper thread (tokio's own
//! `AsyncFd` constructors are `unsafe` or deprecated now, and the workspace forbids
//! `unsafe`). The IP and TCP/UDP headers are parsed here, every access bounds-checked: they
//! come from the job.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{
    config_request, ConfigCmd, ConfigFlags, ConfigMode, PacketNla, Timeout, ULogMessage,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::constants::NETLINK_NETFILTER;
use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket};
use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;
use tokio::sync::mpsc;

/// The NFLOG group of a job's rules. Groups are per network namespace, so every job uses
/// the same one.
pub const DEFAULT_GROUP: u16 = 1;

/// Bytes of each logged packet the kernel copies to the agent: an IPv4 header of up to 60
/// bytes and the 4 bytes of ports after it. (A rule's `snaplen` lowers it further; it never
/// raises it.)
pub const COPY_RANGE: u32 = 64;

/// How long the kernel may hold reports back to send several in one datagram (its default
/// is a second).
const FLUSH_TIMEOUT: Duration = Duration::from_millis(100);

/// Receive buffer of the socket (`SO_RCVBUFFORCE`; the kernel doubles it for bookkeeping).
/// The rules rate-limit what a job can make the kernel log; this absorbs a burst while the
/// reader is not scheduled.
const SOCKET_BUFFER: usize = 1 << 20;

/// Largest datagram the kernel sends: a batch is at most the group's buffer size
/// (`NLMSG_GOODSIZE`, at most 8 KiB, as this module leaves it), a single report with
/// [`COPY_RANGE`] bytes far less.
const DATAGRAM_MAX: usize = 64 * 1024;

/// How long configuring the group may take before the kernel is deemed not to answer.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(5);

/// Sequence number of the configuration request, to find its acknowledgement.
const CONFIG_SEQ: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum NflogError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}; is it a network namespace file?")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("cannot open an nfnetlink socket in network namespace {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error(
        "NFLOG group {group} in network namespace {path} is held by another socket (the kernel refused with EPERM, as it also does without CAP_NET_ADMIN)"
    )]
    GroupBusy { group: u16, path: PathBuf },
    #[error(
        "the kernel refused to bind NFLOG group {group} in network namespace {path}: {source}"
    )]
    Bind {
        group: u16,
        path: PathBuf,
        source: io::Error,
    },
    #[error("nfnetlink_log in network namespace {path} did not acknowledge the binding of group {group}: {source}")]
    NoAnswer {
        group: u16,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the helper thread for network namespace {0} could not start or panicked")]
    Thread(PathBuf),
    #[error("the NFLOG socket must be opened inside a tokio runtime")]
    NoRuntime,
}

/// Transport protocol of a logged packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    /// ICMP, or ICMPv6 in an IPv6 packet.
    Icmp,
    /// Any other IP protocol number; for IPv6, the first header that could not be looked
    /// past (an extension header cut off by [`COPY_RANGE`]).
    Other(u8),
}

impl Proto {
    fn from_number(n: u8) -> Proto {
        match n {
            IPPROTO_TCP => Proto::Tcp,
            IPPROTO_UDP => Proto::Udp,
            IPPROTO_ICMP | IPPROTO_ICMPV6 => Proto::Icmp,
            n => Proto::Other(n),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Proto::Tcp => f.write_str("tcp"),
            Proto::Udp => f.write_str("udp"),
            Proto::Icmp => f.write_str("icmp"),
            Proto::Other(n) => write!(f, "ip-proto-{n}"),
        }
    }
}

/// One packet a job's rules logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NflogEvent {
    /// The rule's `log prefix` (`block`, `conn`), empty if it has none.
    pub prefix: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Proto,
    /// TCP and UDP only, and only when the copied bytes hold them (not in a later fragment).
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

/// An NFLOG socket bound to its group inside a job's namespace, not read yet.
pub struct NflogSocket {
    socket: TokioSocket,
    rt: tokio::runtime::Handle,
    group: u16,
    ns_path: PathBuf,
    /// Datagrams of reports that arrived before the acknowledgement of the binding.
    early: Vec<Vec<u8>>,
}

impl fmt::Debug for NflogSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NflogSocket")
            .field("fd", &self.socket.as_raw_fd())
            .field("group", &self.group)
            .field("ns_path", &self.ns_path)
            .finish_non_exhaustive()
    }
}

/// Opens an NFLOG socket inside the network namespace at `ns_path`, from a dedicated thread
/// that enters it and exits, and binds it to `group` there: copy mode "packet" with
/// [`COPY_RANGE`] bytes, per-group sequence numbers, reports flushed after at most 100 ms.
/// Must be called inside a tokio runtime, which the socket is registered
/// with (and read on, see [`NflogSocket::spawn`]). Blocks briefly: one thread spawn and one
/// netlink round trip.
pub fn open_in_netns(ns_path: &Path, group: u16) -> Result<NflogSocket, NflogError> {
    let rt = tokio::runtime::Handle::try_current().map_err(|_| NflogError::NoRuntime)?;
    let path = ns_path.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("airlock-nflog".into())
        .spawn(move || {
            let ns = File::open(&path).map_err(|source| NflogError::Open {
                path: path.clone(),
                source,
            })?;
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|source| {
                NflogError::Enter {
                    path: path.clone(),
                    source,
                }
            })?;
            bind_group(path, group, rt)
        })
        .map_err(|_| NflogError::Thread(ns_path.to_path_buf()))?;
    thread
        .join()
        .map_err(|_| NflogError::Thread(ns_path.to_path_buf()))?
}

/// Runs inside the namespace: the socket is created here, so it belongs to it for good.
/// It is registered with tokio right away (netlink-sys's `TokioSocket`), but configured
/// with plain blocking calls: nothing drives the runtime from this thread.
fn bind_group(
    path: PathBuf,
    group: u16,
    rt: tokio::runtime::Handle,
) -> Result<NflogSocket, NflogError> {
    let socket_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| NflogError::Socket { path, source }
    };
    let mut socket = {
        let _rt = rt.enter();
        TokioSocket::new(NETLINK_NETFILTER).map_err(socket_err(&path))?
    };
    socket.socket_mut().bind_auto().map_err(socket_err(&path))?;
    let raw = socket.socket_ref();
    setsockopt(raw, sockopt::RcvBufForce, &SOCKET_BUFFER)
        .map_err(|e| socket_err(&path)(e.into()))?;
    raw.set_non_blocking(false).map_err(socket_err(&path))?;
    setsockopt(
        raw,
        sockopt::ReceiveTimeout,
        &TimeVal::new(CONFIG_TIMEOUT.as_secs() as _, 0),
    )
    .map_err(|e| socket_err(&path)(e.into()))?;

    // One request, one acknowledgement: the kernel creates the group's instance for this
    // socket (the command) and then applies the settings to it. The family of the request
    // matters only to the PF_BIND command, which nftables' `log group` does not need: its
    // rules name the NFLOG logger themselves.
    let mut request = config_request(
        NetfilterProtoFamily::Unspec,
        group,
        vec![
            ConfigCmd::Bind.into(),
            ConfigMode::new_packet(COPY_RANGE).into(),
            ConfigFlags::SEQ.into(),
            Timeout::from(FLUSH_TIMEOUT).into(),
        ],
    );
    request.header.sequence_number = CONFIG_SEQ;
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    raw.send(&buf, 0).map_err(socket_err(&path))?;

    let mut early = Vec::new();
    let mut datagram = Vec::with_capacity(DATAGRAM_MAX);
    loop {
        datagram.clear();
        if let Err(source) = raw.recv(&mut datagram, 0) {
            return Err(NflogError::NoAnswer {
                group,
                path,
                source,
            });
        }
        match ack_in(&datagram) {
            Some(Ok(())) => break,
            Some(Err(source)) if source.raw_os_error() == Some(Errno::EPERM as i32) => {
                return Err(NflogError::GroupBusy { group, path })
            }
            Some(Err(source)) => {
                return Err(NflogError::Bind {
                    group,
                    path,
                    source,
                })
            }
            // A report logged between the binding and its acknowledgement: keep it.
            None => early.push(datagram.clone()),
        }
    }
    raw.set_non_blocking(true).map_err(socket_err(&path))?;
    Ok(NflogSocket {
        socket,
        rt,
        group,
        ns_path: path,
        early,
    })
}

/// The answer to the configuration request in `datagram`, if it holds one.
fn ack_in(datagram: &[u8]) -> Option<io::Result<()>> {
    messages(datagram).find_map(|bytes| {
        let msg = NetlinkMessage::<NetfilterMessage>::deserialize(bytes).ok()?;
        match msg.payload {
            NetlinkPayload::Error(e) if msg.header.sequence_number == CONFIG_SEQ => {
                Some(match e.code {
                    None => Ok(()),
                    Some(_) => Err(e.to_io()),
                })
            }
            _ => None,
        }
    })
}

/// The netlink messages of a datagram, each as its own slice. Stops at the first one whose
/// length does not fit (a malformed or truncated datagram).
fn messages(datagram: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        let len = NetlinkBuffer::new_checked(rest).ok()?.length() as usize;
        let (msg, after) = rest.split_at(len);
        // Messages are aligned to 4 bytes; the last one may end without its padding.
        rest = after.get(len.next_multiple_of(4) - len..).unwrap_or(&[]);
        Some(msg)
    })
}

impl NflogSocket {
    /// The group this socket is bound to.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Reads the socket on the runtime [`open_in_netns`] ran in and sends each report to
    /// `tx` with `try_send`: when the channel is full the event is dropped and counted, so a
    /// flood never blocks the reader or the agent. The reader stops when the receiver is
    /// gone; the returned handle stops it when dropped, which closes the socket and frees
    /// the group.
    pub fn spawn(self, tx: mpsc::Sender<NflogEvent>) -> NflogReader {
        let NflogSocket {
            socket,
            rt,
            group,
            ns_path,
            early,
        } = self;
        let dropped = Arc::new(AtomicU64::new(0));
        let decoder = Decoder {
            tx,
            dropped: dropped.clone(),
            next_seq: 0,
        };
        let task = rt.spawn(read(socket, early, decoder, group, ns_path));
        NflogReader { task, dropped }
    }
}

/// A running reader; dropping it stops the reader and closes the socket.
#[derive(Debug)]
pub struct NflogReader {
    task: tokio::task::JoinHandle<()>,
    dropped: Arc<AtomicU64>,
}

impl NflogReader {
    /// Logged packets that did not become an event in the channel: the channel was full,
    /// the kernel could not hand the report over (counted when a later report arrives), or
    /// the packet was not IP.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for NflogReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read(
    socket: TokioSocket,
    early: Vec<Vec<u8>>,
    mut decoder: Decoder,
    group: u16,
    ns_path: PathBuf,
) {
    for datagram in &early {
        if decoder.datagram(datagram).is_break() {
            return;
        }
    }
    let mut datagram = Vec::with_capacity(DATAGRAM_MAX);
    loop {
        datagram.clear();
        match socket.recv(&mut datagram).await {
            Ok(()) => {
                if decoder.datagram(&datagram).is_break() {
                    return;
                }
            }
            // The socket's buffer overflowed: the lost reports show as a gap in the
            // sequence numbers of the next one.
            Err(e) if e.raw_os_error() == Some(Errno::ENOBUFS as i32) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!(
                    group,
                    ns = %ns_path.display(),
                    error = %e,
                    "NFLOG reader stopped: cannot read the socket"
                );
                return;
            }
        }
    }
}

/// Turns datagrams into events and keeps the count of those lost.
struct Decoder {
    tx: mpsc::Sender<NflogEvent>,
    dropped: Arc<AtomicU64>,
    /// Sequence number of the next report; the group's instance is ours from its creation,
    /// so the first one is 0.
    next_seq: u32,
}

impl Decoder {
    /// Breaks when nobody receives the events any more.
    fn datagram(&mut self, datagram: &[u8]) -> ControlFlow<()> {
        for bytes in messages(datagram) {
            // A message that does not parse still took its sequence number: the next one
            // counts it.
            let Ok(msg) = NetlinkMessage::<NetfilterMessage>::deserialize(bytes) else {
                continue;
            };
            if let NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
                ..
            }) = msg.payload
            {
                self.packet(nlas)?;
            }
        }
        ControlFlow::Continue(())
    }

    fn packet(&mut self, nlas: Vec<PacketNla>) -> ControlFlow<()> {
        let mut prefix = String::new();
        let mut payload = None;
        for nla in nlas {
            match nla {
                PacketNla::Prefix(p) => prefix = p.to_string_lossy().into_owned(),
                PacketNla::Payload(p) => payload = Some(p),
                PacketNla::Seq(seq) => {
                    let gap = seq.wrapping_sub(self.next_seq);
                    // A number behind the expected one (never seen) is not a loss.
                    if gap < u32::MAX / 2 {
                        self.lost(u64::from(gap));
                    }
                    self.next_seq = seq.wrapping_add(1);
                }
                _ => {}
            }
        }
        let Some(event) = payload.and_then(|p| event(prefix, &p)) else {
            self.lost(1);
            return ControlFlow::Continue(());
        };
        match self.tx.try_send(event) {
            Ok(()) => ControlFlow::Continue(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.lost(1);
                ControlFlow::Continue(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => ControlFlow::Break(()),
        }
    }

    fn lost(&self, n: u64) {
        if n > 0 {
            self.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }
}

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;

/// Extension headers looked past at most (a chain has a handful in practice).
const MAX_EXT_HEADERS: usize = 8;

/// The event for a logged packet whose copied bytes, starting at its IP header, are
/// `packet`; `None` if they do not hold a whole IPv4 or IPv6 header.
fn event(prefix: String, packet: &[u8]) -> Option<NflogEvent> {
    let (src, dst, proto, l4) = match packet.first()? >> 4 {
        4 => ipv4(packet)?,
        6 => ipv6(packet)?,
        _ => return None,
    };
    let ports = match proto {
        Proto::Tcp | Proto::Udp => l4.and_then(|l4| Some((be16(l4, 0)?, be16(l4, 2)?))),
        _ => None,
    };
    Some(NflogEvent {
        prefix,
        src,
        dst,
        proto,
        sport: ports.map(|p| p.0),
        dport: ports.map(|p| p.1),
    })
}

type Ip<'a> = (IpAddr, IpAddr, Proto, Option<&'a [u8]>);

/// Addresses, protocol and the bytes after the header (`None` for a fragment other than the
/// first, or when the options run past the copied bytes).
fn ipv4(p: &[u8]) -> Option<Ip<'_>> {
    let header_len = usize::from(p.first()? & 0x0f) * 4;
    if header_len < 20 {
        return None;
    }
    let src: [u8; 4] = p.get(12..16)?.try_into().ok()?;
    let dst: [u8; 4] = p.get(16..20)?.try_into().ok()?;
    let proto = *p.get(9)?;
    let fragment_offset = be16(p, 6)? & 0x1fff;
    let l4 = if fragment_offset == 0 {
        p.get(header_len..)
    } else {
        None
    };
    Some((
        IpAddr::V4(Ipv4Addr::from(src)),
        IpAddr::V4(Ipv4Addr::from(dst)),
        Proto::from_number(proto),
        l4,
    ))
}

/// As [`ipv4`], following the extension headers to the transport header.
fn ipv6(p: &[u8]) -> Option<Ip<'_>> {
    let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
    let dst: [u8; 16] = p.get(24..40)?.try_into().ok()?;
    let mut next = *p.get(6)?;
    let mut offset = 40;
    let mut l4 = None;
    for _ in 0..MAX_EXT_HEADERS {
        let len = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let Some(&units) = p.get(offset + 1) else {
                    break;
                };
                (usize::from(units) + 1) * 8
            }
            IPPROTO_AH => {
                let Some(&units) = p.get(offset + 1) else {
                    break;
                };
                (usize::from(units) + 2) * 4
            }
            IPPROTO_FRAGMENT => match (p.get(offset), be16(p, offset + 2)) {
                // A later fragment: its protocol is known, its transport header is not.
                (Some(&following), Some(fragment_offset)) if fragment_offset & 0xfff8 != 0 => {
                    next = following;
                    break;
                }
                (Some(_), Some(_)) => 8,
                _ => break,
            },
            _ => {
                l4 = p.get(offset..);
                break;
            }
        };
        // The whole extension header must be there for what follows it to be.
        if offset + len > p.len() {
            break;
        }
        next = p[offset];
        offset += len;
    }
    Some((
        IpAddr::V6(Ipv6Addr::from(src)),
        IpAddr::V6(Ipv6Addr::from(dst)),
        Proto::from_number(next),
        l4,
    ))
}

fn be16(p: &[u8], at: usize) -> Option<u16> {
    let b: [u8; 2] = p.get(at..at.checked_add(2)?)?.try_into().ok()?;
    Some(u16::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{ErrorMessage, NetlinkHeader};
    use netlink_packet_netfilter::NetfilterHeader;
    use std::ffi::CString;
    use std::num::NonZeroI32;

    fn ipv4_header(proto: u8, header_len: usize, fragment: u16) -> Vec<u8> {
        let mut p = vec![0u8; header_len];
        p[0] = 0x40 | (header_len / 4) as u8;
        p[6..8].copy_from_slice(&fragment.to_be_bytes());
        p[9] = proto;
        p[12..16].copy_from_slice(&[10, 200, 0, 2]);
        p[16..20].copy_from_slice(&[192, 0, 2, 1]);
        p
    }

    fn ports(sport: u16, dport: u16) -> Vec<u8> {
        [sport.to_be_bytes(), dport.to_be_bytes()].concat()
    }

    fn ipv6_header(next: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[6] = next;
        p[8..24].copy_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        p
    }

    fn ev(p: &[u8]) -> Option<NflogEvent> {
        event("block".into(), p)
    }

    #[test]
    fn ipv4_tcp_and_udp_give_addresses_and_ports() {
        let tcp = [ipv4_header(IPPROTO_TCP, 20, 0), ports(40000, 9)].concat();
        assert_eq!(
            ev(&tcp),
            Some(NflogEvent {
                prefix: "block".into(),
                src: "10.200.0.2".parse().unwrap(),
                dst: "192.0.2.1".parse().unwrap(),
                proto: Proto::Tcp,
                sport: Some(40000),
                dport: Some(9),
            })
        );
        // Options move the transport header: 60-byte header, the ports right after it, and
        // the 64 copied bytes still hold them.
        let udp = [ipv4_header(IPPROTO_UDP, 60, 0), ports(5353, 53)].concat();
        assert_eq!(udp.len(), COPY_RANGE as usize);
        let e = ev(&udp).unwrap();
        assert_eq!(
            (e.proto, e.sport, e.dport),
            (Proto::Udp, Some(5353), Some(53))
        );
    }

    #[test]
    fn ipv4_without_the_transport_header_has_no_ports() {
        // Cut off after the IP header, or half a port.
        let cut = ipv4_header(IPPROTO_TCP, 20, 0);
        let e = ev(&cut).unwrap();
        assert_eq!((e.proto, e.sport, e.dport), (Proto::Tcp, None, None));
        let half = [ipv4_header(IPPROTO_UDP, 20, 0), vec![0x9c]].concat();
        assert_eq!(ev(&half).unwrap().dport, None);
        // Options longer than what was copied.
        let long = ipv4_header(IPPROTO_TCP, 60, 0);
        assert_eq!(ev(&long[..40]).unwrap().sport, None);
        // A later fragment starts with payload, not ports; "more fragments" alone is fine.
        let later = [ipv4_header(IPPROTO_UDP, 20, 185), ports(1, 2)].concat();
        assert_eq!(ev(&later).unwrap().dport, None);
        let first = [ipv4_header(IPPROTO_UDP, 20, 0x2000), ports(1, 2)].concat();
        assert_eq!(ev(&first).unwrap().dport, Some(2));
        // ICMP has no ports.
        let icmp = [ipv4_header(IPPROTO_ICMP, 20, 0), ports(0x0800, 0)].concat();
        let e = ev(&icmp).unwrap();
        assert_eq!((e.proto, e.sport, e.dport), (Proto::Icmp, None, None));
        let sctp = [ipv4_header(132, 20, 0), ports(1, 2)].concat();
        assert_eq!(ev(&sctp).unwrap().proto, Proto::Other(132));
    }

    #[test]
    fn what_is_not_an_ip_header_is_no_event() {
        assert_eq!(ev(&[]), None);
        assert_eq!(ev(&ipv4_header(IPPROTO_TCP, 20, 0)[..19]), None);
        // An IHL below 5 words.
        let mut short_ihl = ipv4_header(IPPROTO_TCP, 20, 0);
        short_ihl[0] = 0x44;
        assert_eq!(ev(&short_ihl), None);
        let mut v5 = ipv4_header(IPPROTO_TCP, 20, 0);
        v5[0] = 0x55;
        assert_eq!(ev(&v5), None);
        assert_eq!(ev(&ipv6_header(IPPROTO_TCP)[..39]), None);
    }

    #[test]
    fn ipv6_follows_extension_headers() {
        let tcp = [ipv6_header(IPPROTO_TCP), ports(40000, 443)].concat();
        let e = ev(&tcp).unwrap();
        assert_eq!(e.src, "2001:db8::2".parse::<IpAddr>().unwrap());
        assert_eq!(e.dst, "2001:db8::1".parse::<IpAddr>().unwrap());
        assert_eq!(
            (e.proto, e.sport, e.dport),
            (Proto::Tcp, Some(40000), Some(443))
        );

        // Hop-by-hop options (8 bytes), then UDP.
        let mut hop = vec![0u8; 8];
        hop[0] = IPPROTO_UDP;
        let udp = [ipv6_header(IPPROTO_HOPOPTS), hop.clone(), ports(1000, 53)].concat();
        let e = ev(&udp).unwrap();
        assert_eq!(
            (e.proto, e.sport, e.dport),
            (Proto::Udp, Some(1000), Some(53))
        );

        // A destination options header longer than what was copied: its number is all
        // that is known.
        let mut long = vec![0u8; 88];
        long[0] = IPPROTO_UDP;
        long[1] = 10;
        let cut = [ipv6_header(IPPROTO_DSTOPTS), long].concat();
        let e = ev(&cut[..COPY_RANGE as usize]).unwrap();
        assert_eq!((e.proto, e.dport), (Proto::Other(IPPROTO_DSTOPTS), None));

        // A first fragment has the ports, a later one only the protocol.
        let mut frag = vec![0u8; 8];
        frag[0] = IPPROTO_UDP;
        let first = [ipv6_header(IPPROTO_FRAGMENT), frag.clone(), ports(1, 2)].concat();
        assert_eq!(ev(&first).unwrap().dport, Some(2));
        frag[2..4].copy_from_slice(&(1480u16).to_be_bytes());
        let later = [ipv6_header(IPPROTO_FRAGMENT), frag, ports(1, 2)].concat();
        let e = ev(&later).unwrap();
        assert_eq!((e.proto, e.dport), (Proto::Udp, None));

        // ICMPv6.
        assert_eq!(ev(&ipv6_header(IPPROTO_ICMPV6)).unwrap().proto, Proto::Icmp);

        // A chain longer than is followed ends as "other".
        let mut chain = ipv6_header(IPPROTO_DSTOPTS);
        for _ in 0..MAX_EXT_HEADERS + 1 {
            chain.extend_from_slice(&[IPPROTO_DSTOPTS, 0, 0, 0, 0, 0, 0, 0]);
        }
        assert_eq!(ev(&chain).unwrap().proto, Proto::Other(IPPROTO_DSTOPTS));
    }

    /// A report as the kernel sends it.
    fn report(seq: u32, prefix: &str, payload: Vec<u8>) -> Vec<u8> {
        let nlas = vec![
            PacketNla::Prefix(CString::new(prefix).unwrap()),
            PacketNla::Seq(seq),
            PacketNla::Payload(payload),
        ];
        let mut msg = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, DEFAULT_GROUP),
                ULogMessage::Packet(nlas),
            )),
        );
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    fn udp_to(dport: u16) -> Vec<u8> {
        [ipv4_header(IPPROTO_UDP, 20, 0), ports(1, dport)].concat()
    }

    #[test]
    fn datagrams_split_into_messages() {
        // 20-byte payload plus attributes: lengths that are not all multiples of 4 once the
        // prefix is odd; each message is padded to 4 bytes except possibly the last.
        let a = report(0, "abc", udp_to(1));
        let b = report(1, "block", udp_to(2));
        let both = [a.clone(), b.clone()].concat();
        let got: Vec<&[u8]> = messages(&both).collect();
        assert_eq!(got, vec![&a[..], &b[..]]);
        // A truncated last message is left out, not misread.
        let cut = &both[..both.len() - 3];
        assert_eq!(messages(cut).count(), 1);
        assert_eq!(messages(&[0u8; 8]).count(), 0);
    }

    #[test]
    fn every_report_is_delivered_or_counted() {
        let (tx, mut rx) = mpsc::channel(1);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut decoder = Decoder {
            tx,
            dropped: dropped.clone(),
            next_seq: 0,
        };
        // 0 is delivered; 1 finds the channel full; 2 and 3 never arrived (a gap the
        // kernel left when the socket's buffer was full); 4 is full again; 5 is no IP.
        let datagram = [
            report(0, "block", udp_to(53)),
            report(1, "block", udp_to(54)),
        ]
        .concat();
        assert!(decoder.datagram(&datagram).is_continue());
        assert!(decoder
            .datagram(&report(4, "conn", udp_to(55)))
            .is_continue());
        assert!(decoder
            .datagram(&report(5, "conn", vec![0; 20]))
            .is_continue());
        assert_eq!(dropped.load(Ordering::Relaxed), 5);
        let first = rx.try_recv().unwrap();
        assert_eq!((first.prefix.as_str(), first.dport), ("block", Some(53)));
        assert!(rx.try_recv().is_err());
        // A message that is not a readable report is skipped; its number shows as a gap.
        let mut broken = report(6, "conn", udp_to(56));
        broken[4] = 0xff; // message type: another subsystem, attributes still parse
        broken[5] = 0xff;
        assert!(decoder.datagram(&broken).is_continue());
        assert!(decoder
            .datagram(&report(7, "conn", udp_to(57)))
            .is_continue());
        assert_eq!(dropped.load(Ordering::Relaxed), 6);
        assert_eq!(rx.try_recv().unwrap().dport, Some(57));
        // Nobody listens any more: the reader stops.
        drop(rx);
        assert!(decoder.datagram(&report(8, "conn", udp_to(58))).is_break());
    }

    /// The kernel's answer to request `seq`: `code` 0 acknowledges, `-errno` refuses.
    fn answer(seq: u32, code: i32) -> Vec<u8> {
        let mut error = ErrorMessage::default();
        error.code = NonZeroI32::new(code);
        error.header = vec![0; 16];
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::<NetfilterMessage>::new(header, NetlinkPayload::Error(error));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    #[test]
    fn the_binding_is_answered_by_its_own_acknowledgement() {
        assert!(matches!(ack_in(&answer(CONFIG_SEQ, 0)), Some(Ok(()))));
        let refused = ack_in(&answer(CONFIG_SEQ, -(Errno::EPERM as i32)));
        assert_eq!(
            refused.unwrap().unwrap_err().raw_os_error(),
            Some(Errno::EPERM as i32)
        );
        // A report, or the answer to another request, is not it.
        assert!(ack_in(&report(0, "block", udp_to(9))).is_none());
        assert!(ack_in(&answer(CONFIG_SEQ + 1, 0)).is_none());
        let both = [report(0, "block", udp_to(9)), answer(CONFIG_SEQ, 0)].concat();
        assert!(matches!(ack_in(&both), Some(Ok(()))));
    }

    #[test]
    fn proto_names() {
        assert_eq!(Proto::Tcp.to_string(), "tcp");
        assert_eq!(Proto::Udp.to_string(), "udp");
        assert_eq!(Proto::Icmp.to_string(), "icmp");
        assert_eq!(Proto::Other(132).to_string(), "ip-proto-132");
    }
}
