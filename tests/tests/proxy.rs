//! Behind a corporate proxy (root): `airlockd` runs in a network namespace whose only
//! neighbour is the host's end of a veth, where a real tinyproxy listens; the agent has no
//! route anywhere else and no resolver. STS (moto) and the issuer's JWKS listen on the
//! host's loopback under names only tinyproxy can resolve (its own `/etc/hosts`, in a mount
//! namespace of its own), so a job gets credentials only if the agent tunnels its calls
//! through the proxy. tinyproxy runs on its own configuration with basic auth, and its log
//! shows each `CONNECT` it was asked for.

use airlock_tests::agent::{free_port, Agent, AgentOptions};
use airlock_tests::internet::Internet;
use airlock_tests::moto::MotoServer;
use airlock_tests::oidc::GithubJob;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TINYPROXY: &str = "/usr/bin/tinyproxy";
const STS_NAME: &str = "sts.proxy.test";
const JWKS_NAME: &str = "jwks.proxy.test";
const PROXY_USER: &str = "airlock-agent";
const PROXY_PASSWORD: &str = "Pr0xy-pw-7f3a";

/// Root, `ip`, `nsenter`, `unshare` and tinyproxy: missing, the test fails (never skips)
/// with what to install.
fn prerequisites() {
    airlock_tests::prereq::require_root_and(
        "the proxy tests",
        &[
            ("ip", "iproute2"),
            ("nsenter", "util-linux"),
            ("unshare", "util-linux"),
        ],
    );
    assert!(
        Path::new(TINYPROXY).is_file(),
        "the proxy tests need {TINYPROXY}: run scripts/setup-test-deps.sh as root \
         (Debian: apt-get install tinyproxy-bin)"
    );
}

/// A child killed and reaped on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "{what} not ready after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// tinyproxy in the foreground on `listen:port`, allowing `CONNECT` to `ports` only, with
/// basic auth, resolving `names` to the host's loopback.
struct Tinyproxy {
    dir: tempfile::TempDir,
    listen: Ipv4Addr,
    port: u16,
    _d: Daemon,
}

impl Tinyproxy {
    fn start(listen: Ipv4Addr, ports: &[u16], names: &[&str]) -> Tinyproxy {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port().unwrap();
        let log = dir.path().join("tinyproxy.log");
        let connect_ports: String = ports.iter().map(|p| format!("ConnectPort {p}\n")).collect();
        let conf = format!(
            "Port {port}\nListen {listen}\nTimeout 30\nMaxClients 20\nLogFile \"{}\"\n\
             LogLevel Connect\nDisableViaHeader Yes\nBasicAuth {PROXY_USER} {PROXY_PASSWORD}\n\
             {connect_ports}",
            log.display()
        );
        let conf_path = dir.path().join("tinyproxy.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(
            &hosts,
            format!("127.0.0.1 localhost\n127.0.0.1 {}\n", names.join(" ")),
        )
        .unwrap();
        // Its own /etc/hosts in a private mount namespace: nothing changes for the host.
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
            .arg(&hosts)
            .args([TINYPROXY, "-d", "-c"])
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .spawn()
            .expect("tinyproxy starts");
        let t = Tinyproxy {
            dir,
            listen,
            port,
            _d: Daemon(child),
        };
        wait_for("tinyproxy", Duration::from_secs(10), || {
            TcpStream::connect((t.listen, t.port)).is_ok()
        });
        t
    }

    fn url(&self, password: &str) -> String {
        format!(
            "http://{PROXY_USER}:{password}@{}:{}",
            self.listen, self.port
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tinyproxy.log")).unwrap_or_default()
    }

    /// The `CONNECT host:port` requests it logged, in order.
    fn connects(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| l.split_once("): CONNECT ").map(|(_, r)| r))
            .filter_map(|r| r.split_whitespace().next().map(str::to_owned))
            .collect()
    }
}

/// The fixture JWKS over plain http on the host's loopback, counting requests.
fn serve_jwks() -> (u16, Arc<AtomicUsize>) {
    let body = std::fs::read(airlock_tests::paths::oidc_fixtures().join("jwks.json")).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            h.fetch_add(1, Ordering::SeqCst);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    (port, hits)
}

struct World {
    net: Internet,
    moto: MotoServer,
    jwks_port: u16,
    jwks_hits: Arc<AtomicUsize>,
    proxy: Tinyproxy,
}

impl World {
    fn new() -> World {
        prerequisites();
        let moto = MotoServer::start().expect("moto_server starts");
        let (jwks_port, jwks_hits) = serve_jwks();
        // The agent's "host": a namespace whose only route is the /30 to the host's veth.
        let net = Internet::new([203, 0, 113]);
        let proxy = Tinyproxy::start(
            net.host_addr,
            &[moto.port(), jwks_port],
            &[STS_NAME, JWKS_NAME],
        );
        World {
            net,
            moto,
            jwks_port,
            jwks_hits,
            proxy,
        }
    }

    /// An agent in the namespace with the names as STS and JWKS, adjusted by `adjust`.
    fn agent(&self, adjust: impl FnOnce(AgentOptions) -> AgentOptions) -> Agent {
        let mut o = AgentOptions::new(
            &format!("http://{STS_NAME}:{}", self.moto.port()),
            self.moto.agent_access_key(),
            self.moto.agent_secret_key(),
        )
        .netns(&self.net.path());
        o.jwks_url = Some(format!("http://{JWKS_NAME}:{}/jwks.json", self.jwks_port));
        Agent::start(adjust(o)).expect("airlockd starts in its namespace")
    }
}

/// `airlock job start` for a production job: the CLI's output (success or not).
fn job_start(agent: &Agent) -> std::process::Output {
    let file = agent.token_file(&GithubJob::production().token());
    agent.cli(&["job", "start", "--oidc-token-file", &file.to_string_lossy()])
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn behind_a_proxy_jobs_get_credentials_only_through_it() {
    let w = World::new();
    let good = w.proxy.url(PROXY_PASSWORD);
    let sts_target = format!("{STS_NAME}:{}", w.moto.port());
    let jwks_target = format!("{JWKS_NAME}:{}", w.jwks_port);

    // (b) No proxy: the same job cannot even be verified (the JWKS is out of reach).
    let direct = w.agent(|o| o);
    let out = job_start(&direct);
    eprintln!("without a proxy: {}", text(&out));
    assert!(
        !out.status.success(),
        "a job started without the proxy: {}",
        text(&out)
    );
    assert!(
        text(&out).contains(JWKS_NAME),
        "the refusal names the JWKS it could not fetch: {}",
        text(&out)
    );
    assert!(
        direct.log().contains("no outbound proxy"),
        "{}",
        direct.log()
    );
    drop(direct);
    assert!(
        w.proxy.connects().is_empty(),
        "nothing went through the proxy without one configured: {:?}",
        w.proxy.connects()
    );
    assert_eq!(w.jwks_hits.load(Ordering::SeqCst), 0);

    // NO_PROXY naming the targets' domain sends them direct, and so fails the same way.
    let bypass = w.agent(|mut o| {
        o.env = env(&[("HTTP_PROXY", &good), ("NO_PROXY", ".proxy.test")]);
        o
    });
    let out = job_start(&bypass);
    assert!(
        !out.status.success(),
        "NO_PROXY was ignored: {}",
        text(&out)
    );
    drop(bypass);
    assert!(w.proxy.connects().is_empty(), "{:?}", w.proxy.connects());

    // (a) HTTP_PROXY/HTTPS_PROXY in the agent's environment (as a systemd drop-in sets
    // them): the job is verified and gets credentials, both calls tunnelled.
    let agent = w.agent(|mut o| {
        o.env = env(&[("HTTPS_PROXY", &good), ("http_proxy", &good)]);
        o.log_filter = Some("debug".into());
        o
    });
    let job = agent
        .start_job(&GithubJob::production().token())
        .unwrap_or_else(|e| {
            panic!(
                "a job through the proxy: {e}\nagent log:\n{}\ntinyproxy log:\n{}",
                agent.log(),
                w.proxy.log()
            )
        });
    assert_eq!(job.rule.as_deref(), Some("web-production"), "{:?}", job.raw);
    let j = job.clone();
    let (status, creds) =
        airlock::sandbox::netns::run_in_netns(&w.net.path(), move || j.credentials())
            .expect("the agent's namespace")
            .expect("the job's endpoint answers");
    assert_eq!(status, 200, "{creds}\nagent log:\n{}", agent.log());
    assert!(
        creds["AccessKeyId"].as_str().is_some_and(|k| !k.is_empty()),
        "{creds}"
    );
    let connects = w.proxy.connects();
    assert!(connects.contains(&jwks_target), "{connects:?}");
    assert!(connects.contains(&sts_target), "{connects:?}");
    assert!(w.jwks_hits.load(Ordering::SeqCst) >= 1);

    // (d) The proxy's password is never in the agent's output, not even at debug level;
    // the startup line names the proxy with the password as ***.
    let log = agent.log();
    assert!(
        !log.contains(PROXY_PASSWORD),
        "the proxy password is logged:\n{log}"
    );
    let shown = format!("http://***@{}:{}", w.proxy.listen, w.proxy.port);
    assert!(
        log.lines().any(|l| l.contains("outbound proxy")
            && l.contains(&shown)
            && l.contains("$HTTPS_PROXY")),
        "no startup line naming {shown}:\n{log}"
    );
    drop(agent);

    // The config key wins over the environment: a wrong password there fails the tunnel
    // although the environment's is right, and the error names the proxy without it.
    let wrong = "wr0ng-pw-c81d";
    let before = w.proxy.connects().len();
    let keyed = w.agent(|mut o| {
        o.env = env(&[("HTTPS_PROXY", &good), ("HTTP_PROXY", &good)]);
        o.agent_config = format!(
            "https_proxy = \"{u}\"\nhttp_proxy = \"{u}\"\n",
            u = w.proxy.url(wrong)
        );
        o
    });
    let out = job_start(&keyed);
    let said = text(&out);
    eprintln!("with a wrong proxy password: {said}");
    assert!(
        !out.status.success(),
        "a wrong proxy password worked: {said}"
    );
    assert!(
        said.contains(&format!("through proxy {shown}")),
        "the error names the proxy: {said}"
    );
    assert!(
        !said.contains(wrong),
        "the error shows the password: {said}"
    );
    let log = keyed.log();
    assert!(!log.contains(wrong), "the agent logs the password:\n{log}");
    assert!(log.contains("airlock.toml [agent]"), "{log}");
    drop(keyed);
    assert!(
        w.proxy.connects().len() > before,
        "the configured proxy was asked: {}",
        w.proxy.log()
    );
}

#[test]
fn a_bad_proxy_setting_stops_the_agent_naming_it_without_the_password() {
    let moto = MotoServer::start().expect("moto_server starts");
    let mut o = AgentOptions::new(
        moto.endpoint(),
        moto.agent_access_key(),
        moto.agent_secret_key(),
    );
    o.env = env(&[("HTTPS_PROXY", "socks5://user:S3cret-pw@proxy.corp:1080")]);
    let err = Agent::start(o).expect_err("airlockd refuses a socks proxy");
    let said = err.to_string();
    eprintln!("a socks proxy: {said}");
    assert!(said.contains("HTTPS_PROXY"), "{said}");
    assert!(!said.contains("S3cret-pw"), "{said}");
}
