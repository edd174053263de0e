//! A cut or rewritten audit log is caught: the agent keeps the log's head in its state
//! directory and refuses to continue a log that does not reach it; `airlock audit verify`
//! checks against a head given to it or read back from the journal; and every record's seq
//! and hash reach a real journald (a namespace of its own) and a real rsyslog over UDP and
//! TCP, started by the test on loopback.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use airlock::audit::AuditLog;
use airlock_tests::agent::{free_port, HarnessError};
use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;
use serde_json::Value;

const JOURNALD: &str = "/lib/systemd/systemd-journald";
const JOURNALCTL: &str = "/usr/bin/journalctl";
const RSYSLOGD: &str = "/usr/sbin/rsyslogd";

/// `(seq, hash)` of every record of the log.
fn heads(path: &Path) -> BTreeMap<u64, String> {
    std::fs::read_to_string(path)
        .expect("the audit log")
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a record");
            (
                v["seq"].as_u64().expect("seq"),
                v["hash"].as_str().expect("hash").to_string(),
            )
        })
        .collect()
}

fn some_jobs(stack: &Stack, n: usize) {
    for _ in 0..n {
        let job = stack.job(&GithubJob::production());
        let out = stack.agent.end_job(&job.job_id);
        assert!(out.status.success(), "{out:?}");
    }
}

fn cut_last(path: &Path, n: usize) {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let kept = &lines[..lines.len() - n];
    std::fs::write(path, kept.join("\n") + "\n").unwrap();
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn agent_head(stack: &Stack) -> (u64, String) {
    let f = stack.agent.dir().join("state/audit-head.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&f).expect("the head file"))
        .expect("head JSON");
    (
        v["seq"].as_u64().unwrap(),
        v["hash"].as_str().unwrap().into(),
    )
}

/// The agent refuses to start on `log`'s state, naming both heads.
fn assert_refused(stack: &mut Stack, head: &(u64, String), log_head: &(u64, String), why: &str) {
    match stack.agent.restart() {
        Err(HarnessError::ExitedEarly { status, log }) => {
            assert!(status.contains("65"), "{status}: {log}");
            for want in [
                format!("seq {} hash {}", head.0, head.1),
                format!("seq {} hash {}", log_head.0, log_head.1),
                why.to_string(),
                "airlock audit accept-head".to_string(),
            ] {
                assert!(log.contains(&want), "{want:?} not in:\n{log}");
            }
        }
        other => panic!("the agent continued a {why} log: {other:?}"),
    }
}

#[test]
fn a_cut_or_rewritten_log_is_refused_by_the_agent_and_by_verify_until_accepted() {
    let mut stack = Stack::start();
    some_jobs(&stack, 3);
    stack.agent.stop();
    let log = stack.agent.audit_path();
    let all = heads(&log);
    let head = agent_head(&stack);
    let last = all
        .iter()
        .next_back()
        .map(|(s, h)| (*s, h.clone()))
        .unwrap();
    assert_eq!(
        head, last,
        "a stopped agent's head is its log's last record"
    );

    // The last 5 records cut.
    cut_last(&log, 5);
    let cut = (head.0 - 5, all[&(head.0 - 5)].clone());
    assert_refused(&mut stack, &head, &cut, "records were cut off its end");
    // The chain alone still verifies; against the agent's head, or a head kept elsewhere,
    // it does not.
    let log_s = log.to_string_lossy().to_string();
    let alone = stack.agent.cli(&["audit", "verify", &log_s]);
    assert!(alone.status.success(), "{}", text(&alone));
    let verify = stack.agent.cli(&["audit", "verify"]);
    assert_eq!(verify.status.code(), Some(65), "{}", text(&verify));
    assert!(
        text(&verify).contains("the agent's head"),
        "{}",
        text(&verify)
    );
    let given = format!("{}:{}", head.0, head.1);
    let verify = stack
        .agent
        .cli(&["audit", "verify", &log_s, "--head", &given]);
    assert_eq!(verify.status.code(), Some(65), "{}", text(&verify));
    assert!(
        text(&verify).contains(&format!(
            "ends at seq {}, before the head's seq {}",
            cut.0, head.0
        )),
        "{}",
        text(&verify)
    );
    // An older head it does reach passes.
    let older = format!("{}:{}", cut.0 - 1, all[&(cut.0 - 1)]);
    let verify = stack
        .agent
        .cli(&["audit", "verify", &log_s, "--head", &older]);
    assert!(verify.status.success(), "{}", text(&verify));

    // The operator accepts it: recorded in the log, which then continues.
    let accept = stack.agent.cli(&[
        "audit",
        "accept-head",
        "--reason",
        "restored from the 09:00 backup",
    ]);
    assert!(accept.status.success(), "{}", text(&accept));
    stack
        .agent
        .restart()
        .expect("the agent continues the accepted log");
    let recs = stack.agent.audit_records();
    let acc = recs
        .iter()
        .find(|r| r["event"] == "audit_head_accepted")
        .expect("the acceptance record");
    assert_eq!(acc["seq"], cut.0 + 1);
    assert_eq!(acc["previous_head"]["seq"], head.0);
    assert_eq!(acc["previous_head"]["hash"], head.1.as_str());
    assert_eq!(acc["log_head"]["seq"], cut.0);
    assert_eq!(acc["log_head"]["hash"], cut.1.as_str());
    assert_eq!(acc["reason"], "restored from the 09:00 backup");
    assert_eq!(acc["uid"], 0);
    let verify = stack.agent.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify));

    // Rewritten whole: a new, longer chain that verifies on its own.
    some_jobs(&stack, 1);
    stack.agent.stop();
    let head = agent_head(&stack);
    let forged_dir = tempfile::tempdir().unwrap();
    let forged = forged_dir.path().join("audit.jsonl");
    {
        let w = AuditLog::open(&forged).unwrap();
        for i in 0..head.0 + 3 {
            w.append_blocking("policy_reloaded", None, airlock::fields! {"rules" => i})
                .unwrap();
        }
    }
    std::fs::copy(&forged, &log).unwrap();
    let forged_heads = heads(&log);
    let fh = forged_heads
        .iter()
        .next_back()
        .map(|(s, h)| (*s, h.clone()))
        .unwrap();
    assert_refused(&mut stack, &head, &fh, "rewritten or replaced");
    let given = format!("{}:{}", head.0, head.1);
    let verify = stack
        .agent
        .cli(&["audit", "verify", &log_s, "--head", &given]);
    assert_eq!(verify.status.code(), Some(65), "{}", text(&verify));
    assert!(text(&verify).contains("rewritten"), "{}", text(&verify));
    let accept = stack
        .agent
        .cli(&["audit", "accept-head", "--reason", "test"]);
    assert!(accept.status.success(), "{}", text(&accept));
    stack.agent.restart().expect("accepted");
}

/// A process started by this test, killed (by its pid) on drop.
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
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

/// systemd-journald in a namespace of its own (`/run/systemd/journal.NS/socket`, read back
/// with `journalctl --namespace=NS`); its journal files are removed on drop.
struct Journald {
    ns: String,
    _d: Daemon,
}

impl Journald {
    fn start() -> Journald {
        let ns = format!("airlock-test-{}", std::process::id());
        let child = Command::new(JOURNALD)
            .arg(&ns)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-journald starts");
        let j = Journald {
            ns,
            _d: Daemon(child),
        };
        let sock = j.socket();
        wait_for("journald's socket", Duration::from_secs(10), || {
            sock.exists()
        });
        j
    }

    fn socket(&self) -> PathBuf {
        PathBuf::from(format!("/run/systemd/journal.{}/socket", self.ns))
    }

    /// `seq → hash` of the anchors of `log`.
    fn anchors(&self, log: &Path) -> BTreeMap<u64, String> {
        let out = Command::new(JOURNALCTL)
            .arg(format!("--namespace={}", self.ns))
            .args(["--no-pager", "-o", "json"])
            .arg("AIRLOCK_AUDIT_KIND=record")
            .arg(format!("AIRLOCK_AUDIT_LOG={}", log.display()))
            .output()
            .expect("journalctl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| {
                Some((
                    v["AIRLOCK_AUDIT_SEQ"].as_str()?.parse().ok()?,
                    v["AIRLOCK_AUDIT_HASH"].as_str()?.to_string(),
                ))
            })
            .collect()
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        let id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
        let _ = std::fs::remove_dir_all(format!("/var/log/journal/{}.{}", id.trim(), self.ns));
        let _ = std::fs::remove_dir_all(format!("/run/log/journal/{}.{}", id.trim(), self.ns));
        let _ = std::fs::remove_dir_all(format!("/run/systemd/journal.{}", self.ns));
    }
}

/// rsyslogd with the test's own configuration: RFC 5424 over UDP and TCP on loopback, each
/// input written to its own file as `protocol-version|app-name|msgid|msg` (fields rsyslog
/// only fills from a message it parsed as RFC 5424).
struct Rsyslog {
    dir: tempfile::TempDir,
    udp: u16,
    tcp: u16,
    _d: Daemon,
}

impl Rsyslog {
    fn start() -> Rsyslog {
        let dir = tempfile::tempdir().unwrap();
        let (udp, tcp) = (free_udp_port(), free_port().unwrap());
        let d = dir.path().display();
        let conf = format!(
            r#"global(workDirectory="{d}")
module(load="imudp")
module(load="imtcp")
template(name="anchor" type="string" string="%protocol-version%|%app-name%|%msgid%|%msg%\n")
ruleset(name="udp") {{ action(type="omfile" file="{d}/udp.log" template="anchor") }}
ruleset(name="tcp") {{ action(type="omfile" file="{d}/tcp.log" template="anchor") }}
input(type="imudp" address="127.0.0.1" port="{udp}" ruleset="udp")
input(type="imtcp" address="127.0.0.1" port="{tcp}" ruleset="tcp")
"#
        );
        let conf_path = dir.path().join("rsyslog.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(&conf_path)
            .arg("-i")
            .arg(dir.path().join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .spawn()
            .expect("rsyslogd starts");
        let r = Rsyslog {
            dir,
            udp,
            tcp,
            _d: Daemon(child),
        };
        wait_for("rsyslogd's TCP input", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", r.tcp)).is_ok()
        });
        r
    }

    /// `seq → hash` of the anchors received on `input` (udp or tcp), from messages rsyslog
    /// parsed as RFC 5424 with app-name airlockd and msgid audit.
    fn anchors(&self, input: &str) -> BTreeMap<u64, String> {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{input}.log")))
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut p = l.splitn(4, '|');
                let (ver, app, msgid, msg) = (p.next()?, p.next()?, p.next()?, p.next()?);
                if (ver, app, msgid) != ("1", "airlockd", "audit") {
                    return None;
                }
                let kv = airlock_tests::kv(&msg.replace(' ', "\n"));
                Some((
                    kv.get("AIRLOCK_AUDIT_SEQ")?.parse().ok()?,
                    kv.get("AIRLOCK_AUDIT_HASH")?.clone(),
                ))
            })
            .collect()
    }
}

#[test]
fn every_record_reaches_a_real_journald_and_rsyslog_and_verify_reads_the_journal() {
    airlock_tests::prereq::require_root_and("the audit anchor test", &[]);
    for tool in [JOURNALD, JOURNALCTL, RSYSLOGD] {
        assert!(
            Path::new(tool).is_file(),
            "{tool} is missing: scripts/setup-test-deps.sh installs systemd and rsyslog"
        );
    }
    let journald = Journald::start();
    let rsyslog = Rsyslog::start();
    let keys = format!(
        "journal_socket = \"{}\"\nsyslog = [\"udp://127.0.0.1:{}\", \"tcp://127.0.0.1:{}\"]\n",
        journald.socket().display(),
        rsyslog.udp,
        rsyslog.tcp
    );
    let mut stack = Stack::start_with(|o| o.audit_config(&keys));
    some_jobs(&stack, 3);
    stack.agent.stop();
    let log = stack.agent.audit_path();
    let want = heads(&log);
    assert!(want.len() >= 8, "{want:?}");
    let check = |name: &str, got: &dyn Fn() -> BTreeMap<u64, String>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = got();
        while seen != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            seen = got();
        }
        assert_eq!(seen, want, "{name} did not get every record's seq and hash");
    };
    check("journald", &|| journald.anchors(&log));
    check("rsyslog over UDP", &|| rsyslog.anchors("udp"));
    check("rsyslog over TCP", &|| rsyslog.anchors("tcp"));

    // verify reads the newest anchor back from the journal...
    let ns = format!("--journal-namespace={}", journald.ns);
    let verify = stack.agent.cli(&["audit", "verify", "--journal", &ns]);
    assert!(verify.status.success(), "{}", text(&verify));
    let newest = want.iter().next_back().unwrap();
    assert!(
        text(&verify).contains(&format!(
            "the journal's newest anchor: seq {} hash {}",
            newest.0, newest.1
        )),
        "{}",
        text(&verify)
    );
    // ... and a cut log does not reach it (checked without the agent's own head file).
    std::fs::remove_file(stack.agent.dir().join("state/audit-head.json")).unwrap();
    cut_last(&log, 5);
    let verify = stack.agent.cli(&["audit", "verify", "--journal", &ns]);
    assert_eq!(verify.status.code(), Some(65), "{}", text(&verify));
    assert!(
        text(&verify).contains("the journal's newest anchor"),
        "{}",
        text(&verify)
    );
    // Without its head file the agent takes the log as it is, and says so in the log.
    stack.agent.restart().expect("the agent starts");
    assert!(
        stack
            .agent
            .audit_records()
            .iter()
            .any(|r| r["event"] == "audit_head_created"),
        "no audit_head_created record"
    );
}
