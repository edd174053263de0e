//! What a job can do to the host and the agent through shared resources, and what the
//! agent does to the host: a job that burns every CPU does not starve the agent or another
//! job (its cgroup's CPU share), and the IPv4 forwarding the agent turns on for outbound
//! jobs does not make the host a router between its other networks.

use airlock_tests::jobprobe::credential_latency;
use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// Ends a background `airlock run` if the test fails before it does.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (busy, total) jiffies of every CPU, from the first line of /proc/stat.
fn cpu_times() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle and iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Where the host enforces the job's CPU share: `(file, value)` of its v2 `cpu.weight`
/// or, on a hybrid host whose cpu controller is bound to v1, its v1 `cpu.shares`.
fn cpu_share_of(v2_group: &Path) -> (PathBuf, u64) {
    let weight = v2_group.join("cpu.weight");
    let read = |p: &Path| -> u64 {
        std::fs::read_to_string(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    if weight.is_file() {
        return (weight.clone(), read(&weight));
    }
    let rel = v2_group
        .strip_prefix("/sys/fs/cgroup/unified")
        .unwrap_or_else(|_| {
            panic!(
                "no cpu.weight in {} and not a hybrid host",
                v2_group.display()
            )
        });
    let shares = Path::new("/sys/fs/cgroup/cpu").join(rel).join("cpu.shares");
    (shares.clone(), read(&shares))
}

#[test]
fn a_job_burning_every_cpu_starves_neither_the_agent_nor_another_job() {
    airlock_tests::prereq::require_root_and("the CPU share test", &[("timeout", "coreutils")]);
    // Half the default weight, so the test also shows the setting reaches the kernel.
    let stack = Stack::sandboxed("cpu_weight = 50\n");
    let quiet = credential_latency(&stack, "quiet");
    assert_eq!(quiet.errors, 0, "{quiet:?}");
    let t = Instant::now();
    let list = stack.agent.cli(&["job", "list"]);
    let control_quiet = t.elapsed();
    assert!(list.status.success(), "{list:?}");

    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let burners = 32 * cpus;
    let dir = airlock_tests::paths::job_visible_dir(&format!("burn-{}", std::process::id()));
    let stop = dir.join("stop");
    let _ = std::fs::remove_file(&stop);
    // Each burner spins until the stop file appears (at most 120 s).
    let script = format!(
        "i=0; while [ $i -lt {burners} ]; do timeout 120 sh -c 'while [ ! -e {stop} ]; do :; done' & i=$((i+1)); done; echo burning; wait; echo stopped",
        stop = stop.display()
    );
    let mut a = Reap(
        stack
            .agent
            .spawn_run_sh(&GithubJob::production().token(), &script),
    );
    let mut lines = BufReader::new(a.0.stdout.take().expect("piped stdout")).lines();
    match lines.next() {
        Some(Ok(l)) if l == "burning" => {}
        other => panic!(
            "the burner job did not start: {other:?}\n{}",
            stack.agent.log()
        ),
    }
    let burner_job = stack
        .agent
        .audit_records()
        .into_iter()
        .rfind(|r| r["event"] == "job_started")
        .expect("the burner job's job_started record");
    let group = PathBuf::from(
        burner_job["sandbox"]["cgroup"]
            .as_str()
            .expect("the job's cgroup in its job_started record"),
    );
    assert_eq!(burner_job["sandbox"]["cpu_weight"], 50, "{burner_job}");
    let (file, value) = cpu_share_of(&group);
    let want = if file.ends_with("cpu.weight") {
        50
    } else {
        512
    };
    assert_eq!(value, want, "{}", file.display());
    std::thread::sleep(Duration::from_secs(2));

    let (busy0, total0) = cpu_times();
    let busy = credential_latency(&stack, &format!("while {burners} burners spin"));
    let t = Instant::now();
    let list = stack.agent.cli(&["job", "list"]);
    let control_busy = t.elapsed();
    let (busy1, total1) = cpu_times();
    let used = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64;
    eprintln!(
        "CPUs busy {:.0}% while measured; control request {control_quiet:?} quiet, {control_busy:?} under load",
        used * 100.0
    );
    assert!(list.status.success(), "{list:?}");
    assert!(
        list.stdout.windows(2).any(|w| w == b"j-"),
        "job list does not show the burner job: {}",
        String::from_utf8_lossy(&list.stdout)
    );
    // The attack is real: the CPUs were saturated while B measured.
    assert!(
        used > 0.85,
        "the burners left the CPUs {:.0}% idle",
        (1.0 - used) * 100.0
    );
    assert_eq!((busy.errors, busy.n), (0, 40), "{busy:?}");
    // The SDKs give up after 1 s (JS) or 2 s (botocore); a quiet fetch takes a few ms.
    assert!(
        busy.p99_ms < 500.0,
        "job B's p99 {} ms under {burners} burners (quiet {} ms)",
        busy.p99_ms,
        quiet.p99_ms
    );
    assert!(
        control_busy < Duration::from_secs(3),
        "`airlock job list` took {control_busy:?} under load ({control_quiet:?} quiet)"
    );

    std::fs::write(&stop, "").expect("the stop file");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(rest, ["stopped"]);
    let status = a.0.wait().expect("the burner job ends");
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A host of the test's own (a network namespace the agent runs in) with two other
/// networks, A and B, each a namespace behind a veth of the host's, routed through it.
/// Documentation ranges (outside airlock's blocked ones, so jobs may reach them), in
/// namespaces only: nothing of it touches the real host's network. Removed on drop.
struct Networks {
    host: String,
    a: String,
    b: String,
    a_addr: std::net::Ipv4Addr,
    b_addr: std::net::Ipv4Addr,
    host_b_addr: std::net::Ipv4Addr,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("`ip` runs (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Networks {
    /// `forwarding`: the host's `net.ipv4.ip_forward` before airlock starts.
    fn new(forwarding: bool) -> Networks {
        let mut b = [0u8; 3];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").expect("/dev/urandom"),
            &mut b,
        )
        .expect("random bytes");
        let tag = format!("{:02x}{:02x}{:02x}", b[0], b[1], b[2]);
        let k = 4 * (b[0] % 60);
        let n = Networks {
            host: format!("alfh{tag}"),
            a: format!("alfa{tag}"),
            b: format!("alfb{tag}"),
            a_addr: [198, 51, 100, k + 2].into(),
            b_addr: [203, 0, 113, k + 2].into(),
            host_b_addr: [203, 0, 113, k + 1].into(),
        };
        for ns in [&n.host, &n.a, &n.b] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for (other, net, link) in [
            (&n.a, [198, 51, 100], format!("alfa{tag}x")),
            (&n.b, [203, 0, 113], format!("alfb{tag}x")),
        ] {
            ip(&[
                "link", "add", &link, "netns", &n.host, "type", "veth", "peer", "name", "eth0",
                "netns", other,
            ]);
            let [p, q, r] = net;
            let host_addr = format!("{p}.{q}.{r}.{}", k + 1);
            let other_addr = format!("{p}.{q}.{r}.{}", k + 2);
            ip(&[
                "-n",
                &n.host,
                "addr",
                "add",
                &format!("{host_addr}/30"),
                "dev",
                &link,
            ]);
            ip(&["-n", &n.host, "link", "set", &link, "up"]);
            ip(&[
                "-n",
                other,
                "addr",
                "add",
                &format!("{other_addr}/30"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", other, "link", "set", "eth0", "up"]);
            ip(&["-n", other, "route", "add", "default", "via", &host_addr]);
        }
        n.set_forwarding(forwarding);
        n
    }

    fn path(ns: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(ns)
    }

    fn set_forwarding(&self, on: bool) {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.host, "sysctl", "-qw"])
            .arg(format!("net.ipv4.ip_forward={}", u8::from(on)))
            .output()
            .expect("sysctl runs");
        assert!(out.status.success(), "{out:?}");
    }

    fn forwarding(&self) -> bool {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.host,
                "cat",
                "/proc/sys/net/ipv4/ip_forward",
            ])
            .output()
            .expect("cat runs");
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    }

    /// A server in `ns` on `addr:port` answering `<name> from <peer>` to every connection.
    fn serve(ns: &str, addr: std::net::Ipv4Addr, port: u16, name: &'static str) {
        let listener = airlock::sandbox::netns::bind_in_netns(
            &Self::path(ns),
            &[std::net::SocketAddr::from((addr, port))],
        )
        .expect("a listener in the namespace")
        .pop()
        .expect("one listener");
        listener.set_nonblocking(false).expect("blocking listener");
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let peer = conn
                    .peer_addr()
                    .map(|p| p.ip().to_string())
                    .unwrap_or_default();
                let _ =
                    std::io::Write::write_all(&mut conn, format!("{name} from {peer}").as_bytes());
            }
        });
    }

    /// What a connection from namespace `ns` to `to` reads, or its error.
    fn connect_from(ns: &str, to: std::net::SocketAddr) -> Result<String, String> {
        airlock::sandbox::netns::run_in_netns(&Self::path(ns), move || {
            let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
                .map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out).map_err(|e| e.to_string())?;
            Ok(out)
        })
        .map_err(|e| e.to_string())?
    }
}

impl Drop for Networks {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b, &self.host] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

/// An agent running in `net`'s host namespace, whose production jobs are outbound.
fn outbound_agent_in(net: &Networks) -> Stack {
    Stack::sandboxed_rule_tables_with(
        "",
        &[(
            "10-production.toml",
            "[rule.sandbox]\nnetwork = \"outbound\"\n",
        )],
        |o| o.netns(&Networks::path(&net.host)),
    )
}

/// An outbound job connecting to `to`: what it read.
fn job_connects(stack: &Stack, to: std::net::SocketAddr) -> String {
    let script = format!(
        "/usr/bin/python3 -c 'import socket; s = socket.create_connection((\"{}\", {}), timeout=5); print(\"reply=\" + s.recv(200).decode())'",
        to.ip(),
        to.port()
    );
    let out = stack.run_sh(&GithubJob::production().token(), &script);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the outbound job failed: {stdout}\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.agent.log()
    );
    stdout
}

#[test]
fn forwarding_airlock_turns_on_routes_jobs_and_not_the_hosts_other_networks() {
    airlock_tests::prereq::require_root_and(
        "the forwarding tests",
        &[
            ("ip", "iproute2"),
            ("nsenter", "util-linux"),
            ("nft", "nftables"),
        ],
    );
    let net = Networks::new(false);
    let (to_a, to_b) = (
        std::net::SocketAddr::from((net.a_addr, 8081)),
        std::net::SocketAddr::from((net.b_addr, 8082)),
    );
    Networks::serve(&net.a, net.a_addr, 8081, "hello-a");
    Networks::serve(&net.b, net.b_addr, 8082, "hello-b");
    // The host does not forward yet: A and B do not reach each other.
    assert!(Networks::connect_from(&net.a, to_b).is_err());

    let stack = outbound_agent_in(&net);
    let stdout = job_connects(&stack, to_b);
    // The job reached B, masqueraded behind the host's address on B's network.
    assert!(
        stdout.contains(&format!("reply=hello-b from {}", net.host_b_addr)),
        "{stdout}"
    );
    assert!(net.forwarding(), "the agent did not turn forwarding on");
    let marker = stack.agent.dir().join("state").join("forwarding.ipv4");
    assert!(
        marker.is_file(),
        "no record that airlock turned forwarding on"
    );

    // Forwarding is on now, yet the host routes nothing between A and B.
    let a_to_b = Networks::connect_from(&net.a, to_b);
    assert!(a_to_b.is_err(), "A reached B through the host: {a_to_b:?}");
    let b_to_a = Networks::connect_from(&net.b, to_a);
    assert!(b_to_a.is_err(), "B reached A through the host: {b_to_a:?}");
    // And jobs still reach their destinations.
    let again = job_connects(&stack, to_a);
    assert!(again.contains("reply=hello-a from"), "{again}");

    // A restarted agent finds its record and keeps A and B apart.
    let mut stack = stack;
    stack.agent.restart().expect("the agent restarts");
    let _ = job_connects(&stack, to_b);
    assert!(Networks::connect_from(&net.a, to_b).is_err());
}

#[test]
fn a_host_that_forwarded_before_airlock_keeps_routing() {
    airlock_tests::prereq::require_root_and(
        "the forwarding tests",
        &[
            ("ip", "iproute2"),
            ("nsenter", "util-linux"),
            ("nft", "nftables"),
        ],
    );
    let net = Networks::new(true);
    let to_b = std::net::SocketAddr::from((net.b_addr, 8082));
    Networks::serve(&net.b, net.b_addr, 8082, "hello-b");
    let before = Networks::connect_from(&net.a, to_b);
    assert!(
        before
            .as_deref()
            .is_ok_and(|r| r.starts_with("hello-b from")),
        "the host does not route A to B to begin with: {before:?}"
    );

    let stack = outbound_agent_in(&net);
    let stdout = job_connects(&stack, to_b);
    assert!(stdout.contains("reply=hello-b from"), "{stdout}");
    assert!(!stack.agent.dir().join("state/forwarding.ipv4").exists());
    // The router the host was keeps working: A still reaches B (not masqueraded: A's own
    // address).
    let after = Networks::connect_from(&net.a, to_b);
    assert_eq!(after, Ok(format!("hello-b from {}", net.a_addr)));
}
