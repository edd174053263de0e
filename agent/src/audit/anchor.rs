//! Anchors: every durable record's seq and hash, sent off the log's file to where an
//! attacker who can rewrite the file cannot follow — the journal (journald's native
//! protocol, structured fields `AIRLOCK_AUDIT_SEQ`, `_HASH`, `_EVENT`, `_JOB`, `_LOG`), a
//! remote syslog (RFC 5424 over UDP or TCP, octet-counted framing) — and the head file in
//! the agent's state directory. Any later anchor pins every record before it (the chain), so
//! an anchor lost to a slow or absent receiver weakens nothing that the next one restores.
//!
//! Runs on its own thread, fed by the writer through a bounded queue that the writer never
//! waits on. Sends nothing but seq, hash, event name, job id and the log's path: never a
//! record's content, never a secret.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use super::head::{self, Head};

pub const F_SEQ: &str = "AIRLOCK_AUDIT_SEQ";
pub const F_HASH: &str = "AIRLOCK_AUDIT_HASH";
pub const F_EVENT: &str = "AIRLOCK_AUDIT_EVENT";
pub const F_JOB: &str = "AIRLOCK_AUDIT_JOB";
pub const F_LOG: &str = "AIRLOCK_AUDIT_LOG";
/// `record` for a record's anchor, `head_mismatch` for a refusal to continue a log.
pub const F_KIND: &str = "AIRLOCK_AUDIT_KIND";
/// journald's native socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// syslog facility `authpriv` (10), the default.
pub const AUTHPRIV: u8 = 10;

/// Anchors queued at most; beyond, they are dropped and counted.
const QUEUE: usize = 8192;
/// The head file is written at most this often (and when the writer stops).
const HEAD_EVERY: Duration = Duration::from_millis(250);
/// How long one send may block the anchor thread.
const SEND_TIMEOUT: Duration = Duration::from_millis(200);
/// A TCP syslog receiver that refused a connection is tried again after this long.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// A failing sink is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Where anchors go.
#[derive(Debug, Clone, Default)]
pub struct Anchors {
    /// journald's native socket, or `None` for no journal anchors.
    pub journal: Option<PathBuf>,
    pub syslog: Vec<SyslogTarget>,
    /// The syslog facility's number (`authpriv`: 10).
    pub facility: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// `udp://host:port` or `tcp://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogTarget {
    pub transport: Transport,
    /// `host:port`, resolved at each (re)connection.
    pub addr: String,
}

impl std::str::FromStr for SyslogTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<SyslogTarget, String> {
        let (transport, rest) = if let Some(r) = s.strip_prefix("udp://") {
            (Transport::Udp, r)
        } else if let Some(r) = s.strip_prefix("tcp://") {
            (Transport::Tcp, r)
        } else {
            return Err(format!(
                "syslog target {s:?}: write udp://HOST:PORT or tcp://HOST:PORT"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let port = rest
            .rsplit_once(':')
            .and_then(|(h, p)| (!h.is_empty()).then_some(p))
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|p| *p != 0);
        if port.is_none() {
            return Err(format!(
                "syslog target {s:?}: HOST:PORT is missing its port"
            ));
        }
        Ok(SyslogTarget {
            transport,
            addr: rest.to_string(),
        })
    }
}

/// A facility's number from its name.
pub fn facility_code(name: &str) -> Option<u8> {
    Some(match name {
        "auth" => 4,
        "authpriv" => 10,
        "daemon" => 3,
        "user" => 1,
        "local0" => 16,
        "local1" => 17,
        "local2" => 18,
        "local3" => 19,
        "local4" => 20,
        "local5" => 21,
        "local6" => 22,
        "local7" => 23,
        _ => return None,
    })
}

/// One record's anchor.
#[derive(Debug, Clone)]
struct Anchor {
    seq: u64,
    hash: String,
    event: String,
    job: Option<String>,
}

enum Cmd {
    Record(Anchor),
    Close(Head),
}

/// The writer's side.
#[derive(Debug)]
pub(crate) struct AnchorHandle {
    tx: SyncSender<Cmd>,
    thread: Option<JoinHandle<()>>,
    failures: Counter,
}

impl AnchorHandle {
    /// Queue a durable record's anchor; never waits.
    pub(crate) fn record(&self, seq: u64, hash: &str, event: &str, job: Option<&str>) {
        let a = Anchor {
            seq,
            hash: hash.to_string(),
            event: event.to_string(),
            job: job.map(str::to_string),
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.tx.try_send(Cmd::Record(a))
        {
            self.failures.inc();
        }
    }

    /// Send what is queued, write the final head, and stop.
    pub(crate) fn close(&mut self, seq: u64, hash: &str) {
        let _ = self.tx.send(Cmd::Close(Head {
            seq,
            hash: hash.to_string(),
        }));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start the anchor thread for the log at `log`.
pub(crate) fn start(
    cfg: Anchors,
    head_file: Option<PathBuf>,
    log: &Path,
    failures: Counter,
) -> std::io::Result<AnchorHandle> {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let mut sinks = Sinks::new(&cfg, log, failures.clone());
    let log = log.to_owned();
    let thread = std::thread::Builder::new()
        .name("audit-anchors".into())
        .spawn(move || {
            let mut pending: Option<Head> = None;
            let mut written = Instant::now() - HEAD_EVERY;
            loop {
                let cmd = rx.recv_timeout(HEAD_EVERY);
                let closing = match cmd {
                    Ok(Cmd::Record(a)) => {
                        sinks.send(&a);
                        pending = Some(Head {
                            seq: a.seq,
                            hash: a.hash,
                        });
                        false
                    }
                    Ok(Cmd::Close(h)) => {
                        pending = Some(h);
                        true
                    }
                    Err(RecvTimeoutError::Timeout) => false,
                    Err(RecvTimeoutError::Disconnected) => true,
                };
                let due = closing || written.elapsed() >= HEAD_EVERY;
                if let (true, Some(hf), Some(h)) = (due, &head_file, pending.as_ref()) {
                    // A log with no record has no head to keep.
                    if h.seq > 0 {
                        if let Err(e) = head::write_head_file(hf, h, &log) {
                            sinks.warn("head file", &e.to_string());
                        }
                    }
                    pending = None;
                    written = Instant::now();
                }
                if closing {
                    return;
                }
            }
        })?;
    Ok(AnchorHandle {
        tx,
        thread: Some(thread),
        failures,
    })
}

/// Tell the anchors (once, synchronously) that the agent refused to continue the log.
pub(crate) fn notify_mismatch(cfg: &Anchors, log: &Path, head: &Head, log_head: &Head, msg: &str) {
    let mut sinks = Sinks::new(cfg, log, Counter::default());
    let fields = vec![
        ("MESSAGE", msg.to_string()),
        ("PRIORITY", "2".to_string()),
        ("SYSLOG_IDENTIFIER", "airlockd".to_string()),
        (F_KIND, "head_mismatch".to_string()),
        (F_LOG, log.display().to_string()),
        ("AIRLOCK_AUDIT_HEAD_SEQ", head.seq.to_string()),
        ("AIRLOCK_AUDIT_HEAD_HASH", head.hash.clone()),
        ("AIRLOCK_AUDIT_LOG_SEQ", log_head.seq.to_string()),
        ("AIRLOCK_AUDIT_LOG_HASH", log_head.hash.clone()),
    ];
    let text = format!(
        "{F_KIND}=head_mismatch AIRLOCK_AUDIT_HEAD_SEQ={} AIRLOCK_AUDIT_HEAD_HASH={} AIRLOCK_AUDIT_LOG_SEQ={} AIRLOCK_AUDIT_LOG_HASH={}",
        head.seq, head.hash, log_head.seq, log_head.hash
    );
    sinks.send_raw(&fields, "audit-head", 2, &text);
}

/// journald's native protocol: `NAME=value\n`, or for a value with a newline `NAME\n`, its
/// length as 64-bit little endian, the value and `\n`.
pub fn journal_entry(fields: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in fields {
        out.extend_from_slice(k.as_bytes());
        if v.contains('\n') {
            out.push(b'\n');
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            out.extend_from_slice(v.as_bytes());
        } else {
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
        }
        out.push(b'\n');
    }
    out
}

/// An RFC 5424 message: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`.
pub fn syslog_message(
    facility: u8,
    severity: u8,
    hostname: &str,
    msgid: &str,
    msg: &str,
) -> String {
    let pri = u16::from(facility) * 8 + u16::from(severity);
    let now = time::OffsetDateTime::now_utc();
    let ts = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    );
    format!(
        "<{pri}>1 {ts} {hostname} airlockd {} {msgid} - {msg}",
        std::process::id()
    )
}

/// RFC 5424's HOSTNAME: printable ASCII without spaces, at most 255, `-` when empty.
fn syslog_hostname() -> String {
    let h = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let h: String = h
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    if h.is_empty() {
        "-".into()
    } else {
        h
    }
}

struct Sinks {
    log: String,
    journal: Option<(PathBuf, Option<UnixDatagram>)>,
    syslog: Vec<Syslog>,
    facility: u8,
    hostname: String,
    failures: Counter,
    warned: Vec<(String, Instant)>,
}

struct Syslog {
    target: SyslogTarget,
    udp: Option<UdpSocket>,
    tcp: Option<TcpStream>,
    retry_at: Option<Instant>,
}

impl Sinks {
    fn new(cfg: &Anchors, log: &Path, failures: Counter) -> Sinks {
        Sinks {
            log: log.display().to_string(),
            journal: cfg.journal.clone().map(|p| (p, None)),
            syslog: cfg
                .syslog
                .iter()
                .map(|t| Syslog {
                    target: t.clone(),
                    udp: None,
                    tcp: None,
                    retry_at: None,
                })
                .collect(),
            facility: cfg.facility,
            hostname: syslog_hostname(),
            failures,
            warned: Vec::new(),
        }
    }

    fn send(&mut self, a: &Anchor) {
        let job = a.job.clone().unwrap_or_else(|| "-".into());
        let mut fields = vec![
            (
                "MESSAGE",
                format!("audit record {} {} {}", a.seq, a.event, a.hash),
            ),
            ("PRIORITY", "6".to_string()),
            ("SYSLOG_IDENTIFIER", "airlockd".to_string()),
            (F_KIND, "record".to_string()),
            (F_SEQ, a.seq.to_string()),
            (F_HASH, a.hash.clone()),
            (F_EVENT, a.event.clone()),
            (F_LOG, self.log.clone()),
        ];
        if let Some(j) = &a.job {
            fields.push((F_JOB, j.clone()));
        }
        let text = format!(
            "{F_SEQ}={} {F_HASH}={} {F_EVENT}={} {F_JOB}={job}",
            a.seq, a.hash, a.event
        );
        self.send_raw(&fields, "audit", 6, &text);
    }

    fn send_raw(&mut self, fields: &[(&str, String)], msgid: &str, severity: u8, text: &str) {
        let journal_err = self.journal.as_mut().and_then(|(path, sock)| {
            let entry = journal_entry(fields);
            let res = (|| {
                if sock.is_none() {
                    let s = UnixDatagram::unbound()?;
                    s.set_write_timeout(Some(SEND_TIMEOUT))?;
                    *sock = Some(s);
                }
                let s = sock.as_ref().expect("set above");
                s.send_to(&entry, &*path).map(|_| ())
            })();
            res.err()
                .map(|e| (format!("journal {}", path.display()), e.to_string()))
        });
        if let Some((what, e)) = journal_err {
            self.fail(&what, &e);
        }
        if self.syslog.is_empty() {
            return;
        }
        let msg = syslog_message(self.facility, severity, &self.hostname, msgid, text);
        let mut errors = Vec::new();
        for s in &mut self.syslog {
            if let Err(e) = s.send(&msg) {
                errors.push((format!("syslog {}", s.target.addr), e.to_string()));
            }
        }
        for (what, e) in errors {
            self.fail(&what, &e);
        }
    }

    fn fail(&mut self, what: &str, error: &str) {
        self.failures.inc();
        self.warn(what, error);
    }

    fn warn(&mut self, what: &str, error: &str) {
        let now = Instant::now();
        match self.warned.iter_mut().find(|(w, _)| w == what) {
            Some((_, at)) if now.duration_since(*at) < WARN_EVERY => return,
            Some((_, at)) => *at = now,
            None => self.warned.push((what.to_string(), now)),
        }
        tracing::warn!(sink = what, error, "audit anchors cannot be sent (counted in airlock_audit_anchor_failures_total; later anchors still pin every earlier record)");
    }
}

impl Syslog {
    fn send(&mut self, msg: &str) -> std::io::Result<()> {
        match self.target.transport {
            Transport::Udp => {
                let addr = self
                    .target
                    .addr
                    .to_socket_addrs()?
                    .next()
                    .ok_or_else(|| std::io::Error::other("the name has no address"))?;
                if self.udp.is_none() {
                    let bind = if addr.is_ipv4() {
                        "0.0.0.0:0"
                    } else {
                        "[::]:0"
                    };
                    let s = UdpSocket::bind(bind)?;
                    s.set_write_timeout(Some(SEND_TIMEOUT))?;
                    self.udp = Some(s);
                }
                let s = self.udp.as_ref().expect("set above");
                s.send_to(msg.as_bytes(), addr).map(|_| ())
            }
            Transport::Tcp => {
                if self.tcp.is_none() {
                    if self.retry_at.is_some_and(|t| Instant::now() < t) {
                        return Err(std::io::Error::other("not connected (retrying shortly)"));
                    }
                    match self.connect() {
                        Ok(s) => self.tcp = Some(s),
                        Err(e) => {
                            self.retry_at = Some(Instant::now() + RECONNECT_AFTER);
                            return Err(e);
                        }
                    }
                }
                // RFC 6587 octet counting: the length, a space, the message.
                let framed = format!("{} {msg}", msg.len());
                let s = self.tcp.as_mut().expect("set above");
                if let Err(e) = s.write_all(framed.as_bytes()) {
                    self.tcp = None;
                    self.retry_at = Some(Instant::now() + RECONNECT_AFTER);
                    return Err(e);
                }
                Ok(())
            }
        }
    }

    fn connect(&self) -> std::io::Result<TcpStream> {
        let mut last = std::io::Error::other("the name has no address");
        for addr in self.target.addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, SEND_TIMEOUT * 5) {
                Ok(s) => {
                    s.set_write_timeout(Some(SEND_TIMEOUT))?;
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_say_why() {
        let t: SyslogTarget = "udp://127.0.0.1:514".parse().unwrap();
        assert_eq!(t.transport, Transport::Udp);
        assert_eq!(t.addr, "127.0.0.1:514");
        let t: SyslogTarget = "tcp://logs.example:6514".parse().unwrap();
        assert_eq!(t.transport, Transport::Tcp);
        assert!("logs:514".parse::<SyslogTarget>().is_err());
        assert!("udp://logs".parse::<SyslogTarget>().is_err());
        assert!("tcp://:514".parse::<SyslogTarget>().is_err());
        assert_eq!(facility_code("local3"), Some(19));
        assert_eq!(facility_code("kern"), None);
    }

    #[test]
    fn journal_entries_use_the_binary_form_for_newlines() {
        let e = journal_entry(&[("A", "x".into()), ("B", "1\n2".into())]);
        let mut want = b"A=x\nB\n".to_vec();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"1\n2\n");
        assert_eq!(e, want);
    }

    #[test]
    fn a_syslog_message_has_the_rfc5424_header() {
        let m = syslog_message(AUTHPRIV, 6, "host-1", "audit", "A=1");
        assert!(m.starts_with("<86>1 "), "{m}");
        let parts: Vec<&str> = m.splitn(8, ' ').collect();
        assert_eq!(parts[2], "host-1");
        assert_eq!(parts[3], "airlockd");
        assert_eq!(parts[4], std::process::id().to_string());
        assert_eq!(parts[5], "audit");
        assert_eq!(parts[6], "-");
        assert_eq!(parts[7], "A=1");
        assert!(time::OffsetDateTime::parse(
            parts[1],
            &time::format_description::well_known::Rfc3339
        )
        .is_ok());
    }
}
