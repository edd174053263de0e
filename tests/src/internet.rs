//! A stand-in for the internet, for tests of outbound jobs (root only): a network namespace
//! `alti<hex>` behind a veth from the host, with a random /30 of a documentation range
//! (not in airlock's blocked ranges, routed nowhere real), and plain HTTP servers in it.
//!
//! The names are neither `airlock-*` nor `al-*`: airlock treats those as its own objects.
//! Everything is removed on drop.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("`ip` runs (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Debug)]
pub struct Internet {
    pub name: String,
    /// The host's address on the link: what a masqueraded job shows to the internet.
    pub host_addr: Ipv4Addr,
    /// The internet host's address.
    pub addr: Ipv4Addr,
    /// The same two ends over IPv6, in 2001:db8::/32 (documentation, outside airlock's
    /// blocked IPv6 ranges), made from the IPv4 /30 so they are as unique.
    pub host_addr6: Ipv6Addr,
    pub addr6: Ipv6Addr,
}

impl Internet {
    /// `range` is the first three octets of a /24 the caller alone uses (e.g. one of
    /// 198.51.100.0/24 and 203.0.113.0/24 per test binary); a random /30 of it is taken.
    pub fn new(range: [u8; 3]) -> Internet {
        let tag: u32 = rand_u32();
        let name = format!("alti{tag:08x}");
        let [a, b, c] = range;
        // A /30 no other test process has on the host right now: chosen and taken under a
        // lock shared by every test process, so two cannot pick the same one.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/airlock-tests-internet.lock")
            .expect("the test internet's lock file");
        lock.lock().expect("the test internet's lock");
        let taken = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut k = 4 * (tag % 64) as u8;
        for _ in 0..64 {
            if !taken.contains(&format!("inet {a}.{b}.{c}.{}/", k + 1)) {
                break;
            }
            k = k.wrapping_add(4) % 252;
        }
        let host_addr = Ipv4Addr::new(a, b, c, k + 1);
        let addr = Ipv4Addr::new(a, b, c, k + 2);
        let net6 = Ipv6Addr::new(
            0x2001,
            0xdb8,
            u16::from(a),
            u16::from(b),
            u16::from(c),
            u16::from(k),
            0,
            0,
        );
        let host_addr6 = Ipv6Addr::from(u128::from(net6) + 1);
        let addr6 = Ipv6Addr::from(u128::from(net6) + 2);
        ip(&["netns", "add", &name]);
        let me = Internet {
            name,
            host_addr,
            addr,
            host_addr6,
            addr6,
        };
        ip(&[
            "link", "add", &me.name, "type", "veth", "peer", "name", "eth0", "netns", &me.name,
        ]);
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &me.name]);
        ip(&[
            "addr",
            "add",
            &format!("{host_addr6}/112"),
            "dev",
            &me.name,
            "nodad",
        ]);
        drop(lock);
        ip(&["link", "set", &me.name, "up"]);
        let inside = |args: &[&str]| {
            let mut full = vec!["netns", "exec", &me.name, "ip"];
            full.extend_from_slice(args);
            ip(&full);
        };
        inside(&["addr", "add", &format!("{addr}/30"), "dev", "eth0"]);
        inside(&[
            "addr",
            "add",
            &format!("{addr6}/112"),
            "dev",
            "eth0",
            "nodad",
        ]);
        inside(&["link", "set", "eth0", "up"]);
        inside(&["link", "set", "lo", "up"]);
        me
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// An HTTP server on `addr:port` in the internet namespace that answers every request
    /// with `200` and `<body> from <peer address>`, on a thread of its own, for the life of
    /// the process (the namespace's removal ends it).
    pub fn serve(&self, port: u16, body: &str) -> SocketAddr {
        self.serve_on(SocketAddr::from((self.addr, port)), body)
    }

    /// [`Internet::serve`] on the internet host's IPv6 address.
    pub fn serve6(&self, port: u16, body: &str) -> SocketAddr {
        self.serve_on(SocketAddr::from((self.addr6, port)), body)
    }

    fn serve_on(&self, addr: SocketAddr, body: &str) -> SocketAddr {
        let listener = airlock::sandbox::netns::bind_in_netns(&self.path(), &[addr])
            .expect("a listener in the internet namespace")
            .pop()
            .expect("one listener");
        listener.set_nonblocking(false).expect("blocking listener");
        let body = body.to_string();
        std::thread::spawn(move || serve(listener, &body));
        addr
    }
}

fn serve(listener: TcpListener, body: &str) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { return };
        let peer = conn
            .peer_addr()
            .map(|p| p.ip().to_string())
            .unwrap_or_default();
        let mut buf = [0u8; 2048];
        let _ = conn.read(&mut buf);
        let text = format!("{body} from {peer}");
        let reply = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        );
        let _ = conn.write_all(reply.as_bytes());
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("/dev/urandom");
    u32::from_ne_bytes(b)
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
