//! Privileged tests of the per-job network (root; they never skip: a missing prerequisite
//! fails with what is missing). Every kernel object they make is named `airlock-<job>` or
//! `al-*` with a fresh random job id, and a guard removes it with `ip` even if a test fails.
//! Traffic stays inside namespaces the tests create, or on test links they create.

use airlock::jobs::new_job_id;
use airlock::sandbox::netns::{
    bind_in_netns, host_link_name, netns_name, Leftover, NetConfig, NetManager, NetMode,
    OrphanLink, OrphanNamespace, CONTAINER_ENDPOINT, ENDPOINT_ADDRS, IMDS_ENDPOINT,
};
use airlock_tests::internet::Internet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

fn prerequisites() {
    airlock_tests::prereq::require_root_and(
        "the sandbox network tests",
        &[
            ("ip", "iproute2"),
            ("python3", "python3"),
            ("setpriv", "util-linux"),
            ("nft", "nftables"),
        ],
    );
}

fn config(pool: &str) -> NetConfig {
    NetConfig {
        pool: pool.parse().unwrap(),
        ..NetConfig::default()
    }
}

/// Removes what a test made, with `ip`, whatever the code under test did.
#[derive(Default)]
struct Cleanup {
    links: Vec<String>,
    jobs: Vec<String>,
}

impl Cleanup {
    fn job(&mut self, job: &str) {
        self.jobs.push(job.to_string());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        for job in &self.jobs {
            quiet(&["link", "del", &host_link_name(job)]);
            quiet(&["netns", "del", &netns_name(job)]);
        }
        for link in &self.links {
            quiet(&["link", "del", link]);
        }
    }
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn in_ns(job: &str, cmd: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", &netns_name(job)])
        .args(cmd)
        .output()
        .unwrap()
}

/// A test link in the host namespace, `al-t<hex><suffix>`: a veth pair (the kernel may
/// have no dummy driver) whose peer has the same name plus `p`. Deleting either end
/// deletes both.
fn test_link(cleanup: &mut Cleanup, suffix: char) -> String {
    let name = format!("al-t{:08x}{suffix}", rand::random::<u32>());
    cleanup.links.push(name.clone());
    let peer = format!("{name}p");
    ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer]);
    name
}

/// Answers every connection with `HTTP/1.0 200` and `body`.
fn serve(listener: std::net::TcpListener, body: String) -> JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    })
}

async fn stop(servers: Vec<JoinHandle<()>>) {
    for s in servers {
        s.abort();
        let _ = s.await; // the listener is closed once the task is gone
    }
}

/// Connects to each target and prints `<target> ok <body>` or `<target> err <ERRNO>`.
const PROBE: &str = r#"
import errno, socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        s = socket.create_connection((host, int(port)), timeout=3)
        s.sendall(b"GET / HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        print(target, "ok", data.split(b"\r\n\r\n", 1)[-1].decode())
    except socket.timeout:
        print(target, "err", "TIMEOUT")
    except OSError as e:
        print(target, "err", errno.errorcode.get(e.errno, str(e)))
"#;

/// Runs [`PROBE`] inside the job's namespace; one result per target, in order.
async fn probe(job: &str, targets: &[String]) -> Vec<String> {
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", &netns_name(job), "python3", "-c", PROBE])
        .args(targets)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = stdout
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect();
    assert_eq!(lines.len(), targets.len(), "{stdout}");
    lines
}

async fn host_get(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_job_reaches_only_its_own_endpoint() {
    prerequisites();
    let mut cleanup = Cleanup::default();
    let mgr = NetManager::new(config("10.200.16.0/24")).unwrap();
    let (a, b) = (new_job_id(), new_job_id());
    cleanup.job(&a);
    cleanup.job(&b);
    let net_a = mgr.create(&a, NetMode::EndpointOnly).await.unwrap();
    let net_b = mgr.create(&b, NetMode::EndpointOnly).await.unwrap();
    // Endpoint-only jobs take no subnet and have no link to the host.
    assert_eq!(mgr.available_subnets(), 64);
    assert_eq!((net_a.job_addr(), net_b.job_addr()), (None, None));
    let links = ip(&["-o", "link", "show"]);
    for job in [&a, &b] {
        assert!(!links.contains(&host_link_name(job)), "{links}");
        let inside = String::from_utf8(in_ns(job, &["ip", "-o", "link", "show"]).stdout).unwrap();
        assert_eq!(inside.lines().count(), 1, "only lo:\n{inside}");
    }

    let mut servers = Vec::new();
    for (job, net) in [(&a, &net_a), (&b, &net_b)] {
        let listeners = bind_in_netns(&net.ns_path, &ENDPOINT_ADDRS).unwrap();
        assert_eq!(listeners.len(), 2);
        for l in listeners {
            let addr = l.local_addr().unwrap();
            servers.push(serve(l, format!("job={job} listener={addr}")));
        }
    }
    // The host's own services: one on loopback, one on every address, and a fake
    // "metadata service" on an address of a test link in the host namespace.
    let host_lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_lo_addr = host_lo.local_addr().unwrap();
    servers.push(serve(host_lo, "host loopback".into()));
    let host_any = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let any_port = host_any.local_addr().unwrap().port();
    servers.push(serve(host_any, "host any".into()));
    let fake = test_link(&mut cleanup, 'm');
    let meta_ip = format!("10.200.255.{}", 1 + rand::random::<u8>() % 250);
    ip(&["addr", "add", &format!("{meta_ip}/32"), "dev", &fake]);
    ip(&["link", "set", &fake, "up"]);
    let meta = std::net::TcpListener::bind(format!("{meta_ip}:0")).unwrap();
    let meta_addr = meta.local_addr().unwrap();
    servers.push(serve(meta, "host metadata".into()));
    let any_on_host: SocketAddr = format!("{meta_ip}:{any_port}").parse().unwrap();
    // Control: from the host, each of them answers.
    assert_eq!(host_get(host_lo_addr).await, "host loopback");
    assert_eq!(host_get(meta_addr).await, "host metadata");
    assert_eq!(host_get(any_on_host).await, "host any");

    for me in [&net_a, &net_b] {
        let targets = [
            CONTAINER_ENDPOINT.to_string(),
            IMDS_ENDPOINT.to_string(),
            host_lo_addr.to_string(),
            meta_addr.to_string(),
            any_on_host.to_string(),
        ];
        let got = probe(&me.job_id, &targets).await;
        let own = |ep: SocketAddr| format!("ok job={} listener={ep}", me.job_id);
        assert_eq!(
            got,
            [
                own(CONTAINER_ENDPOINT),
                own(IMDS_ENDPOINT),
                // No route to any address of the host (nor to another job: no link leaves
                // the namespace); the job's 127.0.0.1 is its own loopback, where nothing
                // listens.
                "err ECONNREFUSED".into(),
                "err ENETUNREACH".into(),
                "err ENETUNREACH".into(),
            ],
            "job {}",
            me.job_id
        );
    }

    stop(servers).await;
    for job in [&a, &b] {
        mgr.teardown(job).await.unwrap();
        assert_eq!(mgr.verify_gone(job).await.unwrap(), []);
    }
    assert_eq!(mgr.available_subnets(), 64);
    let namespaces = ip(&["netns", "list"]);
    let links = ip(&["-o", "link", "show"]);
    for job in [&a, &b] {
        assert!(!namespaces.contains(&netns_name(job)), "{namespaces}");
        assert!(!links.contains(&host_link_name(job)), "{links}");
    }
}

/// Runs `cmd` inside the job's namespace as nobody, without capabilities; `Err(stderr)`
/// when it fails.
fn unprivileged_in_ns(job: &str, cmd: &[&str]) -> Result<String, String> {
    let mut full = vec![
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ];
    full.extend_from_slice(cmd);
    let out = in_ns(job, &full);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_only_namespace_is_built_as_specified_and_the_job_cannot_change_it() {
    prerequisites();
    let mut cleanup = Cleanup::default();
    let mgr = NetManager::new(config("10.200.17.0/24")).unwrap();
    let job = new_job_id();
    cleanup.job(&job);
    let net = mgr.create(&job, NetMode::EndpointOnly).await.unwrap();
    assert_eq!(
        net.ns_path,
        std::path::Path::new("/run/netns").join(netns_name(&job))
    );
    assert_eq!((net.subnet, net.host_link.as_deref()), (None, None));

    assert!(ip(&["netns", "list"]).contains(&netns_name(&job)));
    let addrs = String::from_utf8(in_ns(&job, &["ip", "-o", "-4", "addr", "show"]).stdout).unwrap();
    for want in [
        "lo    inet 127.0.0.1/8",
        "lo    inet 169.254.170.2/32",
        "lo    inet 169.254.169.254/32",
    ] {
        assert!(addrs.contains(want), "{want:?} not in\n{addrs}");
    }
    assert_eq!(addrs.lines().count(), 3, "{addrs}");
    let routes = String::from_utf8(in_ns(&job, &["ip", "-4", "route", "show"]).stdout).unwrap();
    assert!(
        routes.trim().is_empty(),
        "endpoint-only has no route but loopback's:\n{routes}"
    );
    let v6 = in_ns(&job, &["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"]);
    assert_eq!(
        String::from_utf8_lossy(&v6.stdout).trim(),
        "1",
        "IPv6 off in the job"
    );

    // As an unprivileged user inside the namespace, nothing of it can be changed.
    let attempts: [&[&str]; 4] = [
        &["ip", "addr", "add", "10.9.9.9/32", "dev", "lo"],
        &["ip", "addr", "del", "169.254.170.2/32", "dev", "lo"],
        &["ip", "route", "add", "default", "dev", "lo"],
        &["ip", "link", "set", "lo", "down"],
    ];
    for cmd in attempts {
        let err = unprivileged_in_ns(&job, cmd).expect_err("succeeded unprivileged");
        assert!(err.contains("Operation not permitted"), "{cmd:?}: {err}");
    }
    // Control: the same change as root does work, so the refusal above is the privilege.
    let out = in_ns(&job, attempts[0]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    mgr.teardown(&job).await.unwrap();
    assert_eq!(mgr.verify_gone(&job).await.unwrap(), []);
    assert!(!ip(&["netns", "list"]).contains(&netns_name(&job)));
    // Teardown is idempotent.
    mgr.teardown(&job).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_namespace_has_a_veth_a_route_and_a_firewall_the_job_cannot_change() {
    prerequisites();
    let mut cleanup = Cleanup::default();
    let mgr = NetManager::new(config("10.200.22.0/24")).unwrap();
    let job = new_job_id();
    cleanup.job(&job);
    let net = mgr.create(&job, NetMode::Outbound).await.unwrap();
    assert_eq!(net.subnet.unwrap().to_string(), "10.200.22.0/30");
    assert_eq!(mgr.available_subnets(), 63);
    let host_link = net.host_link.clone().unwrap();
    assert_eq!(host_link, host_link_name(&job));

    let addrs = String::from_utf8(in_ns(&job, &["ip", "-o", "-4", "addr", "show"]).stdout).unwrap();
    assert!(addrs.contains("eth0    inet 10.200.22.2/30"), "{addrs}");
    let routes = String::from_utf8(in_ns(&job, &["ip", "-4", "route", "show"]).stdout).unwrap();
    assert!(
        routes.contains("default via 10.200.22.1 dev eth0"),
        "{routes}"
    );
    let host = ip(&["-o", "link", "show", &host_link]);
    assert!(host.contains(",UP"), "{host}");
    assert!(host.contains(&format!("alias airlock job {job}")), "{host}");
    assert!(ip(&["-o", "addr", "show", "dev", &host_link]).contains("inet 10.200.22.1/30"));
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap()
            .trim(),
        "1"
    );
    // The job's table, inside its namespace, and the host's.
    let inside = in_ns(&job, &["nft", "list", "table", "inet", "airlock"]);
    let inside = String::from_utf8_lossy(&inside.stdout);
    for want in [
        "set blocked4",
        "hook output",
        "169.254.0.0/16",
        "10.0.0.0/8",
    ] {
        assert!(inside.contains(want), "{want:?} not in\n{inside}");
    }
    let out = Command::new("nft")
        .args(["list", "table", "inet", "airlock"])
        .output()
        .unwrap();
    let on_host = String::from_utf8_lossy(&out.stdout);
    for want in [
        "hook input",
        "hook forward",
        "masquerade",
        "iifname \"al-*\"",
    ] {
        assert!(on_host.contains(want), "{want:?} not in\n{on_host}");
    }

    // Unprivileged inside the namespace: neither the firewall nor the link can be changed.
    let attempts: [&[&str]; 4] = [
        &["nft", "flush", "ruleset"],
        &["nft", "delete", "table", "inet", "airlock"],
        &["ip", "route", "del", "default"],
        &["ip", "addr", "add", "10.200.22.5/30", "dev", "eth0"],
    ];
    for cmd in attempts {
        let err = unprivileged_in_ns(&job, cmd).expect_err("succeeded unprivileged");
        assert!(err.contains("Operation not permitted"), "{cmd:?}: {err}");
    }
    let still = in_ns(&job, &["nft", "list", "table", "inet", "airlock"]);
    assert!(still.status.success());
    // A ruleset nft refuses comes back as an error with nft's own reason.
    let bad: nftables::schema::Nftables = serde_json::from_str(
        r#"{"nftables":[{"add":{"rule":{"family":"inet","table":"airlock","chain":"nosuchchain","expr":[{"drop":null}]}}}]}"#,
    )
    .unwrap();
    let err = airlock::sandbox::firewall::apply_in_netns(&net.ns_path, bad, "test ruleset")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("nft refused the test ruleset: ")
            && err.contains("No such file or directory"),
        "{err}"
    );

    mgr.teardown(&job).await.unwrap();
    assert_eq!(mgr.verify_gone(&job).await.unwrap(), []);
    assert!(!ip(&["-o", "link", "show"]).contains(&host_link));
    assert_eq!(mgr.available_subnets(), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_job_reaches_the_internet_but_not_the_host_metadata_private_ranges_or_jobs() {
    prerequisites();
    let mut cleanup = Cleanup::default();
    let mgr = NetManager::new(config("10.200.23.0/24")).unwrap();
    let (a, b) = (new_job_id(), new_job_id());
    cleanup.job(&a);
    cleanup.job(&b);
    let net_a = mgr.create(&a, NetMode::Outbound).await.unwrap();
    let net_b = mgr.create(&b, NetMode::Outbound).await.unwrap();
    let internet = Internet::new([203, 0, 113]);

    let mut servers = Vec::new();
    let web = internet.serve(8080, "internet");
    for l in bind_in_netns(&net_a.ns_path, &ENDPOINT_ADDRS).unwrap() {
        let addr = l.local_addr().unwrap();
        servers.push(serve(l, format!("job={a} listener={addr}")));
    }
    for l in bind_in_netns(&net_b.ns_path, &[SocketAddr::from(([0, 0, 0, 0], 8081))]).unwrap() {
        servers.push(serve(l, format!("job={b}")));
    }
    // The host: a service on every address (so also on its "public" address toward the
    // internet), and a fake metadata service and a private address on a test link.
    let host_any = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let any_port = host_any.local_addr().unwrap().port();
    servers.push(serve(host_any, "host any".into()));
    let fake = test_link(&mut cleanup, 'n');
    let link_local = format!(
        "169.254.{}.{}",
        1 + rand::random::<u8>() % 250,
        1 + rand::random::<u8>() % 250
    );
    let private = format!("10.200.254.{}", 1 + rand::random::<u8>() % 250);
    for addr in [&link_local, &private] {
        ip(&["addr", "add", &format!("{addr}/32"), "dev", &fake]);
    }
    ip(&["link", "set", &fake, "up"]);
    let meta = std::net::TcpListener::bind(format!("{link_local}:80")).unwrap();
    servers.push(serve(meta, "host metadata".into()));
    let private_l = std::net::TcpListener::bind(format!("{private}:80")).unwrap();
    servers.push(serve(private_l, "host private".into()));
    // Control: from the host, each answers.
    assert_eq!(
        host_get(web).await,
        format!("internet from {}", internet.host_addr)
    );
    assert_eq!(
        host_get(format!("{link_local}:80").parse().unwrap()).await,
        "host metadata"
    );
    assert_eq!(
        host_get(format!("{private}:80").parse().unwrap()).await,
        "host private"
    );
    let host_public: SocketAddr = format!("{}:{any_port}", internet.host_addr)
        .parse()
        .unwrap();
    assert_eq!(host_get(host_public).await, "host any");

    let b_addr = net_b.job_addr().unwrap();
    let gateway = net_a.subnet.unwrap().host_addr();
    let targets = [
        web.to_string(),
        CONTAINER_ENDPOINT.to_string(),
        IMDS_ENDPOINT.to_string(),
        format!("{link_local}:80"),
        format!("{private}:80"),
        format!("{b_addr}:8081"),
        format!("{gateway}:{any_port}"),
        host_public.to_string(),
    ];
    let got = probe(&a, &targets).await;
    let own = |ep: SocketAddr| format!("ok job={a} listener={ep}");
    assert_eq!(
        got,
        [
            // Masqueraded: the internet sees the host's address, not the job's.
            format!("ok internet from {}", internet.host_addr),
            // 169.254.169.254 and 169.254.170.2 are the job's own endpoint, on its loopback.
            own(CONTAINER_ENDPOINT),
            own(IMDS_ENDPOINT),
            // The job's table refuses link-local and private ranges (another job, the host's
            // side of its own link): connect fails at once.
            "err EHOSTUNREACH".into(),
            "err EHOSTUNREACH".into(),
            "err EHOSTUNREACH".into(),
            "err EHOSTUNREACH".into(),
            // The host's public address is not in a blocked range; the host's table
            // drops what arrives from a job link for the host itself.
            "err TIMEOUT".into(),
        ],
        "targets {targets:?}"
    );
    stop(servers).await;
    drop(internet);
    for job in [&a, &b] {
        mgr.teardown(job).await.unwrap();
        assert_eq!(mgr.verify_gone(job).await.unwrap(), []);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_leaves_orphans_that_are_found_and_reaped() {
    prerequisites();
    let mut cleanup = Cleanup::default();
    let job = new_job_id();
    cleanup.job(&job);
    {
        let first = NetManager::new(config("10.200.18.0/24")).unwrap();
        let net = first.create(&job, NetMode::Outbound).await.unwrap();
        drop(bind_in_netns(&net.ns_path, &ENDPOINT_ADDRS).unwrap());
        // The agent dies here: no teardown.
    }
    let stray = test_link(&mut cleanup, 'o');

    let mgr = NetManager::new(config("10.200.18.0/24")).unwrap();
    let orphans = mgr.list_orphans().await.unwrap();
    assert!(
        orphans.namespaces.contains(&OrphanNamespace {
            name: netns_name(&job),
            job_id: Some(job.clone()),
        }),
        "{orphans:?}"
    );
    assert!(
        orphans.links.contains(&OrphanLink {
            name: host_link_name(&job),
            job_id: Some(job.clone()),
        }),
        "{orphans:?}"
    );
    assert!(
        orphans.links.contains(&OrphanLink {
            name: stray.clone(),
            job_id: None,
        }),
        "{orphans:?}"
    );
    let ns_path = mgr.ns_path(&job);
    assert_eq!(
        mgr.verify_gone(&job).await.unwrap(),
        [
            Leftover::Link(host_link_name(&job)),
            Leftover::NamespaceFile(ns_path.clone()),
            Leftover::NamespaceMount(ns_path),
        ]
    );
    // A new job with the same id does not reuse or clobber the leftovers.
    let err = mgr.create(&job, NetMode::Outbound).await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(
        mgr.available_subnets(),
        64,
        "the failed create gave its subnet back"
    );
    assert_eq!(mgr.verify_gone(&job).await.unwrap().len(), 3);

    mgr.teardown(&job).await.unwrap();
    mgr.remove_orphan_link(&stray).await.unwrap();
    assert!(
        mgr.remove_orphan_link("lo").await.is_err(),
        "only al-* links"
    );
    assert!(mgr.remove_orphan_namespace("../x").is_err());
    assert_eq!(mgr.verify_gone(&job).await.unwrap(), []);
    let orphans = mgr.list_orphans().await.unwrap();
    assert!(
        !orphans
            .namespaces
            .iter()
            .any(|n| n.name == netns_name(&job)),
        "{orphans:?}"
    );
    assert!(
        !orphans
            .links
            .iter()
            .any(|l| l.name == host_link_name(&job) || l.name.starts_with(&stray)),
        "{orphans:?}"
    );
    assert!(!ip(&["netns", "list"]).contains(&netns_name(&job)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_gone_reports_a_process_left_in_the_namespace() {
    prerequisites();
    let mut cleanup = Cleanup::default();
    let mgr = NetManager::new(config("10.200.19.0/24")).unwrap();
    let job = new_job_id();
    cleanup.job(&job);
    let net = mgr.create(&job, NetMode::EndpointOnly).await.unwrap();
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", &netns_name(&job), "sleep", "60"])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap() as i32;
    let want = format!("net:[{}]", net.ns_inode);
    let mut entered = false;
    for _ in 0..100 {
        let now = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        if now.as_os_str() == want.as_str() {
            entered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(entered, "the child never entered the job's namespace");

    mgr.teardown(&job).await.unwrap();
    assert_eq!(
        mgr.verify_gone(&job).await.unwrap(),
        [Leftover::Process(pid)]
    );
    child.kill().await.unwrap();
    assert_eq!(mgr.verify_gone(&job).await.unwrap(), []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_in_something_that_is_not_a_network_namespace_fails() {
    prerequisites();
    let dir = tempfile::tempdir().unwrap();
    let not_ns = dir.path().join("plain");
    std::fs::write(&not_ns, "").unwrap();
    let err = bind_in_netns(&not_ns, &ENDPOINT_ADDRS).unwrap_err();
    assert!(
        err.to_string().contains("cannot enter network namespace"),
        "{err}"
    );
    let err = bind_in_netns(&dir.path().join("missing"), &ENDPOINT_ADDRS).unwrap_err();
    assert!(
        err.to_string().contains("cannot open network namespace"),
        "{err}"
    );
    let mgr = NetManager::new(config("10.200.20.0/24")).unwrap();
    let err = mgr
        .create("../../etc", NetMode::EndpointOnly)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not an airlock job id"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_jobs_at_once_each_get_their_own_network() {
    prerequisites();
    let mut cleanup = Cleanup::default();
    let mgr = std::sync::Arc::new(NetManager::new(config("10.200.21.0/24")).unwrap());
    let jobs: Vec<String> = (0..16).map(|_| new_job_id()).collect();
    for job in &jobs {
        cleanup.job(job);
    }
    let started = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for job in jobs.clone() {
        let mgr = mgr.clone();
        set.spawn(async move { mgr.create(&job, NetMode::Outbound).await });
    }
    let mut nets = Vec::new();
    while let Some(net) = set.join_next().await {
        nets.push(net.unwrap().unwrap());
    }
    eprintln!("16 job networks created in {:?}", started.elapsed());
    let mut subnets: Vec<_> = nets.iter().map(|n| n.subnet.unwrap()).collect();
    subnets.sort_by_key(|s| s.network());
    subnets.dedup();
    assert_eq!(subnets.len(), 16);

    let mut servers = Vec::new();
    for net in &nets {
        for l in bind_in_netns(&net.ns_path, &[CONTAINER_ENDPOINT]).unwrap() {
            servers.push(serve(l, format!("job={}", net.job_id)));
        }
    }
    let mut probes = tokio::task::JoinSet::new();
    for net in &nets {
        let job = net.job_id.clone();
        probes.spawn(async move {
            let got = probe(&job, &[CONTAINER_ENDPOINT.to_string()]).await;
            (job, got)
        });
    }
    while let Some(res) = probes.join_next().await {
        let (job, got) = res.unwrap();
        assert_eq!(got, [format!("ok job={job}")]);
    }

    stop(servers).await;
    let started = std::time::Instant::now();
    for job in &jobs {
        mgr.teardown(job).await.unwrap();
    }
    eprintln!("16 job networks torn down in {:?}", started.elapsed());
    for job in &jobs {
        assert_eq!(mgr.verify_gone(job).await.unwrap(), []);
    }
    assert_eq!(mgr.available_subnets(), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subnet_the_host_already_uses_is_skipped_and_a_pool_inside_a_host_network_refused() {
    prerequisites();
    let mut cleanup = Cleanup::default();
    // Another agent's job (or anything else) holds 10.200.28.1/30 on the host.
    let other = test_link(&mut cleanup, 'c');
    ip(&["addr", "add", "10.200.28.1/30", "dev", &other]);
    let mgr = NetManager::new(config("10.200.28.0/24")).unwrap();
    let job = new_job_id();
    cleanup.job(&job);
    let net = mgr.create(&job, NetMode::Outbound).await.unwrap();
    assert_eq!(net.subnet.unwrap().to_string(), "10.200.28.4/30");
    assert_eq!(
        mgr.available_subnets(),
        63,
        "the skipped subnet is free again"
    );
    mgr.teardown(&job).await.unwrap();
    assert_eq!(mgr.verify_gone(&job).await.unwrap(), []);

    // A pool inside a network the host has: no subnet is clear.
    let wide = test_link(&mut cleanup, 'w');
    ip(&["addr", "add", "10.200.29.1/24", "dev", &wide]);
    let mgr = NetManager::new(config("10.200.29.0/24")).unwrap();
    let job = new_job_id();
    cleanup.job(&job);
    let err = mgr.create(&job, NetMode::Outbound).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("10.200.29.1/24") && msg.contains(&wide) && msg.contains("address_pool"),
        "{msg}"
    );
    assert_eq!(mgr.available_subnets(), 64);
    assert_eq!(mgr.verify_gone(&job).await.unwrap(), []);
}
