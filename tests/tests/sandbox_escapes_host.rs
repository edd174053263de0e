//! Escape tests towards the host: each a sandboxed job (production identity) that tries to
//! cross a boundary and must fail with the specific error — see or touch host processes,
//! mount/unshare/setns, BPF, the keyring, TIOCSTI, raw sockets and its own network, writes
//! outside its own directories, airlock's files, the Docker socket, setuid binaries, and the
//! caller's environment.
//!
//! Probes run in the job with Debian's `/usr/bin/python3` (ctypes for raw syscalls) and print
//! `label=RESULT` lines, RESULT being `ok:...` or the errno's name (`EPERM`, `ENOENT`, ...).
//!
//! Every agent of this file keeps its temp tree under a host directory the job can see
//! (`/srv/al-test-<pid>`, not `/tmp`, which the job's own tmpfs would cover anyway), so it is
//! the sandbox's hide list, not an accident of layout, that keeps airlock's files from it.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;

const PY: &str = "/usr/bin/python3";
/// The first slot's user (uid 2000000 + slot).
const JOB_UID: &str = "2000000";

/// `/srv/al-test-<pid>` (or under `/opt`, `/var/lib`): a host directory the job sees
/// read-only, holding the agents' temp trees and the test's own host files. Shared by the
/// tests of one process (the temp-dir override is process-wide); removed by the last user.
#[derive(Debug)]
struct HostDir {
    path: PathBuf,
}

static HOST_DIR: Mutex<Weak<HostDir>> = Mutex::new(Weak::new());

impl HostDir {
    fn shared() -> Arc<HostDir> {
        let mut cur = HOST_DIR.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = cur.upgrade() {
            return d;
        }
        // Never under /tmp, /var/tmp, /run or /home: the job has its own tmpfs there.
        let base = ["/srv", "/opt", "/var/lib"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.is_dir())
            .expect("none of /srv, /opt, /var/lib exists on this host");
        let path = base.join(format!("al-test-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(&path) {
            panic!("cannot create {}: {e}", path.display());
        }
        set_mode(&path, 0o755);
        // Once per process; every later call names the same path.
        let _ = tempfile::env::override_temp_dir(&path);
        let d = Arc::new(HostDir { path });
        *cur = Arc::downgrade(&d);
        d
    }

    /// A fresh, unique path under this directory (not created).
    fn fresh(&self, what: &str) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        self.path
            .join(format!("{what}-{}", N.fetch_add(1, Ordering::Relaxed)))
    }
}

impl Drop for HostDir {
    fn drop(&mut self) {
        let cur = HOST_DIR.lock().unwrap_or_else(|p| p.into_inner());
        // Another test may already have taken the same path again.
        if cur.upgrade().is_none() {
            // A stopped agent leaves its netns directory bind-mounted on itself (as
            // iproute2 does with /run/netns): detach what is mounted under our tree first.
            for m in mounts_under(&self.path).iter().rev() {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Mount points at or under `dir`, from /proc/self/mountinfo (octal escapes decoded).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            let b = m.as_bytes();
            let mut out = Vec::with_capacity(b.len());
            let mut i = 0;
            while i < b.len() {
                let oct = b
                    .get(i + 1..i + 4)
                    .and_then(|o| u8::from_str_radix(std::str::from_utf8(o).ok()?, 8).ok());
                match (b[i], oct) {
                    (b'\\', Some(c)) => {
                        out.push(c);
                        i += 4;
                    }
                    (c, _) => {
                        out.push(c);
                        i += 1;
                    }
                }
            }
            PathBuf::from(String::from_utf8_lossy(&out).into_owned())
        })
        .filter(|m| m.starts_with(dir))
        .collect()
}

fn set_mode(path: &Path, mode: u32) {
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        panic!("cannot chmod {:o} {}: {e}", mode, path.display());
    }
}

/// A sandboxed stack whose agent lives under the shared host directory. Fields drop in
/// order: the agent stops before its directory goes.
#[derive(Debug)]
struct Fx {
    stack: Stack,
    host: Arc<HostDir>,
}

fn fixture() -> Fx {
    let host = HostDir::shared();
    let stack = Stack::sandboxed("");
    assert!(
        stack.agent.dir().starts_with(&host.path),
        "the agent's tree {} is not under {}",
        stack.agent.dir().display(),
        host.path.display()
    );
    Fx { stack, host }
}

impl Fx {
    /// Runs `script` with `/bin/sh -c` as a production job; asserts it exited 0.
    fn run(&self, script: &str) -> String {
        let out = self.stack.run_sh(&GithubJob::production().token(), script);
        self.stdout_of(&out)
    }

    fn stdout_of(&self, out: &Output) -> String {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("job stdout:\n{stdout}");
        assert!(
            out.status.success(),
            "the job failed ({}):\nstdout: {stdout}\nstderr: {}\nagent log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.stack.agent.log()
        );
        stdout
    }

    /// Runs the Python probe `body` (after [`PRELUDE`]) in a job: its `label=RESULT` lines.
    fn probe(&self, body: &str) -> Probes {
        let script = format!("{PY} - <<'AL_EOF'\n{PRELUDE}\n{body}\nAL_EOF\necho probe-done\n");
        let stdout = self.run(&script);
        assert!(
            stdout.lines().any(|l| l == "probe-done"),
            "the probe did not finish: {stdout}"
        );
        Probes::parse(&stdout)
    }
}

/// Shared by every probe: raw syscalls by name (x86_64 and aarch64 numbers), errno names.
const PRELUDE: &str = r#"
import ctypes, errno, os, platform, signal, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {
    "x86_64": dict(ioctl=16, ptrace=101, mount=165, umount2=166, unshare=272, setns=308,
                   bpf=321, add_key=248, request_key=249, keyctl=250, clone=56, clone3=435,
                   process_vm_readv=310),
    "aarch64": dict(ioctl=29, ptrace=117, mount=40, umount2=39, unshare=97, setns=268,
                    bpf=280, add_key=217, request_key=218, keyctl=219, clone=220, clone3=435,
                    process_vm_readv=270),
}[platform.machine()]
def ename(e):
    return errno.errorcode.get(e, str(e))
def arg(a):
    if a is None:
        return ctypes.c_void_p(None)
    if isinstance(a, bytes):
        return ctypes.c_char_p(a)
    if isinstance(a, int):
        return ctypes.c_long(a)
    return a
def sc(label, call, *args):
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(NR[call]), *[arg(a) for a in args])
    if rc == 0 and call in ("clone", "clone3"):
        os._exit(0)
    print(f"{label}=" + (ename(ctypes.get_errno()) if rc == -1 else f"ok:{rc}"), flush=True)
    return rc
def py(label, f):
    try:
        r = f()
        print(f"{label}=ok:{r!r}", flush=True)
    except OSError as e:
        print(f"{label}={ename(e.errno)}", flush=True)
"#;

/// `label -> result` from a probe's output.
#[derive(Debug)]
struct Probes {
    map: BTreeMap<String, String>,
    raw: String,
}

impl Probes {
    fn parse(stdout: &str) -> Probes {
        let map = stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Probes {
            map,
            raw: stdout.to_owned(),
        }
    }

    fn get(&self, label: &str) -> &str {
        match self.map.get(label) {
            Some(v) => v,
            None => panic!("probe {label} printed nothing; output:\n{}", self.raw),
        }
    }

    fn expect(&self, label: &str, want: &str) {
        assert_eq!(
            self.get(label),
            want,
            "probe {label}; all results:\n{}",
            self.raw
        );
    }
}

/// A process on the host (`sleep`), killed and reaped on drop.
#[derive(Debug)]
struct HostProcess(Child);

impl HostProcess {
    fn sleep() -> HostProcess {
        let child = Command::new("sleep")
            .arg("917")
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot start sleep on the host");
        HostProcess(child)
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
    fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A host file this test creates (only if absent) and removes on drop.
#[derive(Debug)]
struct HostFile(Option<PathBuf>);

impl Drop for HostFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[test]
fn a_job_sees_only_its_own_processes() {
    let fx = fixture();
    let mut host = HostProcess::sleep();
    let hostpid = host.pid();
    assert!(Path::new(&format!("/proc/{hostpid}")).exists());
    let script = format!(
        r#"{PY} - <<'AL_EOF'
import os
me = os.getpid()
for p in sorted(int(x) for x in os.listdir("/proc") if x.isdigit()):
    try:
        c = open(f"/proc/{{p}}/cmdline", "rb").read().hex()
    except OSError as e:
        c = f"<errno {{e.errno}}>"
    print(f"pid {{p}} {{'self' if p == me else c}}")
print("hostpid", os.path.exists("/proc/{hostpid}"))
AL_EOF
echo done"#
    );
    let stdout = fx.run(&script);
    let pids: Vec<(u32, String)> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("pid "))
        .filter_map(|l| l.split_once(' '))
        .map(|(p, c)| (p.parse().expect("a pid"), c.to_owned()))
        .collect();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let job_cmdline = hex(format!("/bin/sh\0-c\0{script}\0").as_bytes());
    assert_eq!(
        pids.first(),
        Some(&(1, job_cmdline.clone())),
        "pid 1 must be the job's own command; saw:\n{stdout}"
    );
    assert!(
        pids.iter().any(|(_, c)| c == "self"),
        "the probe must see itself: {stdout}"
    );
    // The job's sh, its python and at most a transient sh child (the here-document).
    for (pid, c) in &pids {
        assert!(
            c == "self" || *c == job_cmdline || c.is_empty(),
            "pid {pid} is not the job's (cmdline hex {c}):\n{stdout}"
        );
    }
    assert!(pids.len() <= 3, "more processes than the job's:\n{stdout}");
    assert!(
        stdout.lines().any(|l| l == "hostpid False"),
        "the host's sleep (pid {hostpid}) is visible in the job:\n{stdout}"
    );
    assert!(host.alive());
}

#[test]
fn a_job_cannot_signal_or_ptrace_a_host_process() {
    let fx = fixture();
    let mut host = HostProcess::sleep();
    let p = host.pid();
    let r = fx.probe(&format!(
        r#"
py("kill_0", lambda: os.kill({p}, 0))
py("kill_term", lambda: os.kill({p}, signal.SIGTERM))
py("kill_kill", lambda: os.kill({p}, signal.SIGKILL))
sc("ptrace_attach", "ptrace", 16, {p}, 0, 0)
sc("ptrace_seize", "ptrace", 0x4206, {p}, 0, 0)
sc("ptrace_attach_own_init", "ptrace", 16, 1, 0, 0)
sc("process_vm_readv", "process_vm_readv", {p}, None, 0, None, 0, 0)
"#
    ));
    // The host's pid does not exist in the job's pid namespace.
    r.expect("kill_0", "ESRCH");
    r.expect("kill_term", "ESRCH");
    r.expect("kill_kill", "ESRCH");
    // ptrace and cross-process memory access are refused outright (seccomp), whatever the pid.
    r.expect("ptrace_attach", "EPERM");
    r.expect("ptrace_seize", "EPERM");
    r.expect("ptrace_attach_own_init", "EPERM");
    r.expect("process_vm_readv", "EPERM");
    assert!(host.alive(), "the host's sleep died during the job");
}

#[test]
fn a_job_cannot_mount_unshare_or_setns() {
    let fx = fixture();
    let r = fx.probe(
        r#"
os.mkdir("/tmp/al-m")
sc("mount_tmpfs", "mount", b"tmpfs", b"/tmp/al-m", b"tmpfs", 0, None)
sc("mount_bind_root", "mount", b"/", b"/tmp/al-m", None, 0x1000 | 0x4000, None)
sc("mount_remount_root_rw", "mount", None, b"/", None, 0x20, None)
sc("umount_proc", "umount2", b"/proc", 2)
sc("unshare_user", "unshare", 0x10000000)
sc("unshare_mnt", "unshare", 0x00020000)
sc("unshare_net", "unshare", 0x40000000)
sc("unshare_pid", "unshare", 0x20000000)
fd = os.open("/proc/1/ns/net", os.O_RDONLY)
sc("setns_net", "setns", fd, 0)
fd = os.open("/proc/1/ns/mnt", os.O_RDONLY)
sc("setns_mnt", "setns", fd, 0)
sc("clone_newuser", "clone", 0x10000000 | 17, 0, 0, 0, 0)
sc("clone_newns", "clone", 0x00020000 | 17, 0, 0, 0, 0)
args = ctypes.create_string_buffer(struct.pack("=QQQQQQQQQQQ", 0x10000000, 0, 0, 0, 17, 0, 0, 0, 0, 0, 0))
sc("clone3_newuser", "clone3", args, 88)
import subprocess
u = subprocess.run(["unshare", "--user", "--map-root-user", "/bin/true"], capture_output=True, text=True)
print(f"unshare_cli={u.returncode}:{u.stderr.strip()}")
n = subprocess.run(["nsenter", "--target", "1", "--net", "/bin/true"], capture_output=True, text=True)
print(f"nsenter_cli={n.returncode}:{n.stderr.strip()}")
"#,
    );
    for label in [
        "mount_tmpfs",
        "mount_bind_root",
        "mount_remount_root_rw",
        "umount_proc",
        "unshare_user",
        "unshare_mnt",
        "unshare_net",
        "unshare_pid",
        "setns_net",
        "setns_mnt",
        "clone_newuser",
        "clone_newns",
    ] {
        r.expect(label, "EPERM");
    }
    // clone3's flags are out of seccomp's reach: answered ENOSYS so glibc falls back to clone.
    r.expect("clone3_newuser", "ENOSYS");
    let u = r.get("unshare_cli");
    assert!(
        u.starts_with("1:") && u.contains("Operation not permitted"),
        "unshare(1): {u}"
    );
    let n = r.get("nsenter_cli");
    assert!(
        n.starts_with("1:") && n.contains("Operation not permitted"),
        "nsenter(1): {n}"
    );
}

#[test]
fn a_job_cannot_load_bpf_or_use_the_kernel_keyring() {
    let fx = fixture();
    let r = fx.probe(
        r#"
# A valid socket-filter program (r0 = 0; exit) and a one-entry array map.
insns = ctypes.create_string_buffer(struct.pack("=BBhiBBhi", 0xb7, 0, 0, 0, 0x95, 0, 0, 0))
lic = ctypes.create_string_buffer(b"GPL")
attr = ctypes.create_string_buffer(struct.pack("=IIQQ", 1, 2, ctypes.addressof(insns), ctypes.addressof(lic)).ljust(128, b"\0"))
sc("bpf_prog_load", "bpf", 5, attr, 128)
mattr = ctypes.create_string_buffer(struct.pack("=IIII", 2, 4, 4, 1).ljust(128, b"\0"))
sc("bpf_map_create", "bpf", 0, mattr, 128)
KEY_SPEC_SESSION_KEYRING = -3
sc("add_key", "add_key", b"user", b"al-probe", b"x", 1, KEY_SPEC_SESSION_KEYRING)
sc("request_key", "request_key", b"user", b"al-probe", None, 0)
sc("keyctl_get_keyring_id", "keyctl", 0, KEY_SPEC_SESSION_KEYRING, 0)
sc("keyctl_join_session", "keyctl", 1, None)
sc("keyctl_read_user_keyring", "keyctl", 11, -4, None, 0)
"#,
    );
    for label in [
        "bpf_prog_load",
        "bpf_map_create",
        "add_key",
        "request_key",
        "keyctl_get_keyring_id",
        "keyctl_join_session",
        "keyctl_read_user_keyring",
    ] {
        r.expect(label, "EPERM");
    }
}

#[test]
fn a_job_cannot_push_input_into_a_terminal() {
    let fx = fixture();
    let r = fx.probe(
        r#"
import fcntl, termios
py("open_dev_tty", lambda: os.open("/dev/tty", os.O_RDWR))
master, slave = os.openpty()
print(f"openpty=ok:{os.ttyname(slave)}")
c = ctypes.c_char(b"x")
for name, fd in (("slave", slave), ("master", master)):
    sc(f"tiocsti_{name}", "ioctl", fd, termios.TIOCSTI, ctypes.byref(c))
# High bits that the kernel drops from the command must not smuggle TIOCSTI past the filter.
sc("tiocsti_high_bits", "ioctl", slave, (1 << 32) | termios.TIOCSTI, ctypes.byref(c))
sel = ctypes.c_char(b"\x0b")
sc("tioclinux", "ioctl", slave, 0x541C, ctypes.byref(sel))
py("tcgetattr_still_works", lambda: len(termios.tcgetattr(slave)))
"#,
    );
    // No controlling terminal (setsid): the agent's or runner's terminal is out of reach.
    r.expect("open_dev_tty", "ENXIO");
    assert!(r.get("openpty").starts_with("ok:/dev/pts/"), "{}", r.raw);
    r.expect("tiocsti_slave", "EPERM");
    r.expect("tiocsti_master", "EPERM");
    r.expect("tiocsti_high_bits", "EPERM");
    r.expect("tioclinux", "EPERM");
    // Other terminal ioctls are allowed: the EPERMs above are the TIOCSTI rule.
    r.expect("tcgetattr_still_works", "ok:7");
}

/// Netlink requests over `NETLINK_ROUTE`, answered with the kernel's ack (`ok` or errno).
const NETLINK: &str = r#"
def rta(t, data):
    a = struct.pack("=HH", 4 + len(data), t) + data
    return a + b"\0" * ((4 - len(a) % 4) % 4)
def nl(label, msgtype, body):
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    flags = 0x1 | 0x4 | 0x200 | 0x400  # REQUEST | ACK | EXCL | CREATE
    s.send(struct.pack("=IHHII", 16 + len(body), msgtype, flags, 1, 0) + body)
    data = s.recv(65536)
    t = struct.unpack("=H", data[4:6])[0]
    if t != 2:
        print(f"{label}=unexpected-type:{t}", flush=True)
        return
    err = struct.unpack("=i", data[16:20])[0]
    print(f"{label}=" + ("ok" if err == 0 else ename(-err)), flush=True)
AF_INET = 2
aton = socket.inet_aton
"#;

#[test]
fn a_job_cannot_open_raw_sockets_or_change_its_network() {
    let fx = fixture();
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).is_file());
    let mut body = format!(
        r#"{NETLINK}
py("raw_inet_icmp", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
py("raw_inet_raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW))
py("raw_inet6_icmp", lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6))
py("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0x0300))
py("vsock", lambda: socket.socket(40, socket.SOCK_STREAM, 0))
# RTM_NEWADDR 10.250.0.9/32 on lo (ifindex 1)
nl("nl_newaddr", 20, struct.pack("=BBBBI", AF_INET, 32, 0, 0, 1) + rta(2, aton("10.250.0.9")) + rta(1, aton("10.250.0.9")))
# RTM_NEWROUTE 10.250.1.0/24 dev lo, main table, static, link scope, unicast
nl("nl_newroute", 24, struct.pack("=BBBBBBBBI", AF_INET, 24, 0, 0, 254, 4, 253, 1, 0) + rta(1, aton("10.250.1.0")) + rta(4, struct.pack("=i", 1)))
# RTM_NEWROUTE default via lo
nl("nl_default_route", 24, struct.pack("=BBBBBBBBI", AF_INET, 0, 0, 0, 254, 4, 253, 1, 0) + rta(4, struct.pack("=i", 1)))
# RTM_NEWLINK: lo down (ifi_flags 0, ifi_change IFF_UP)
nl("nl_link_down", 16, struct.pack("=BBHiII", 0, 0, 0, 1, 0, 1))
# RTM_GETADDR is a read, which a job may do (glibc's getaddrinfo does): the socket works.
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
s.send(struct.pack("=IHHII", 16 + 8, 22, 0x1 | 0x300, 1, 0) + struct.pack("=BBBBI", AF_INET, 0, 0, 0, 0))
print("nl_getaddr=ok:" + str(len(s.recv(65536)) > 16), flush=True)
"#
    );
    if let Some(ip) = ip {
        body.push_str(&format!(
            r#"
import subprocess
for label, args in (("ip_addr_add", ["addr", "add", "10.250.0.9/32", "dev", "lo"]),
                    ("ip_route_add", ["route", "add", "10.250.1.0/24", "dev", "lo"]),
                    ("ip_link_down", ["link", "set", "lo", "down"])):
    p = subprocess.run(["{ip}", *args], capture_output=True, text=True)
    print(f"{{label}}={{p.returncode}}:{{p.stderr.strip()}}", flush=True)
"#
        ));
    }
    let r = fx.probe(&body);
    // No CAP_NET_RAW: the kernel refuses raw INET sockets; AF_PACKET and AF_VSOCK are the
    // seccomp filter's.
    for label in [
        "raw_inet_icmp",
        "raw_inet_raw",
        "raw_inet6_icmp",
        "packet",
        "vsock",
        "nl_newaddr",
        "nl_newroute",
        "nl_default_route",
        "nl_link_down",
    ] {
        r.expect(label, "EPERM");
    }
    r.expect("nl_getaddr", "ok:True");
    if ip.is_some() {
        for label in ["ip_addr_add", "ip_route_add", "ip_link_down"] {
            let v = r.get(label);
            assert!(
                v.starts_with("2:") && v.contains("Operation not permitted"),
                "{label}: {v}"
            );
        }
    }
}

#[test]
fn a_job_can_write_only_its_own_directories() {
    let fx = fixture();
    // World-writable on the host: only the read-only mount stops the job here.
    let open = fx.host.fresh("open");
    std::fs::create_dir(&open).expect("create the open dir");
    set_mode(&open, 0o1777);
    let name = format!("al-escape-{}", std::process::id());
    let refused: Vec<&str> = [
        "/etc",
        "/usr",
        "/usr/local",
        "/var/lib",
        "/opt",
        "/",
        "/root",
        open.to_str().unwrap(),
    ]
    .into_iter()
    .filter(|d| Path::new(d).is_dir())
    .collect();
    let writable = ["/tmp", "/var/tmp", "/run", "/home/job", "/home/job/work"];
    let mut body = format!("name = {name:?}\n");
    body.push_str(&format!(
        "print('env_home=' + os.environ['HOME'])\nprint('cwd=' + os.getcwd())\n\
         py('chmod_etc_passwd', lambda: os.chmod('/etc/passwd', 0o666))\n\
         py('unlink_etc_hostname', lambda: os.unlink('/etc/hostname'))\n\
         py('rename_open', lambda: os.rename({o:?}, {o:?} + '-moved'))\n",
        o = open.to_str().unwrap()
    ));
    for d in refused.iter().chain(writable.iter()) {
        body.push_str(&format!(
            "def w(d={d:?}):\n    with open(os.path.join(d, name), 'w') as f:\n        f.write('al')\n    return open(os.path.join(d, name)).read()\n\
             py('create:' + {d:?}, w)\n\
             py('mkdir:' + {d:?}, lambda d={d:?}: os.mkdir(os.path.join(d, name + '.d')))\n"
        ));
    }
    let r = fx.probe(&body);
    r.expect("env_home", "/home/job");
    r.expect("cwd", "/home/job/work");
    r.expect("chmod_etc_passwd", "EROFS");
    r.expect("unlink_etc_hostname", "EROFS");
    r.expect("rename_open", "EROFS");
    for d in refused {
        r.expect(&format!("create:{d}"), "EROFS");
        r.expect(&format!("mkdir:{d}"), "EROFS");
        if d != "/root" {
            assert!(
                !Path::new(d).join(&name).exists(),
                "{d}/{name} appeared on the host"
            );
        }
    }
    for d in writable {
        r.expect(&format!("create:{d}"), "ok:'al'");
        r.expect(&format!("mkdir:{d}"), "ok:None");
    }
    // The job's /tmp and /var/tmp are its own: nothing reached the host's.
    for d in ["/tmp", "/var/tmp"] {
        assert!(
            !Path::new(d).join(&name).exists(),
            "{d}/{name} appeared on the host"
        );
    }
}

/// The runners' own files are hidden in every sandbox, whatever a policy says: the
/// Buildkite agent's configuration (its registration token) and build path (every
/// pipeline's checkout), gitlab-runner's configuration (its runner token) and state. The
/// test puts a world-readable secret in each such directory the host does not have yet
/// (and removes them afterwards), so only the hiding keeps them from the job.
#[test]
fn the_runners_own_files_are_hidden_from_a_job() {
    let fx = fixture();
    let mut made = Vec::new();
    let mut files = Vec::new();
    for d in [
        "/etc/buildkite-agent",
        "/var/lib/buildkite-agent",
        "/etc/gitlab-runner",
        "/var/lib/gitlab-runner",
    ] {
        let dir = Path::new(d);
        if dir.exists() {
            continue;
        }
        std::fs::create_dir_all(dir).unwrap();
        set_mode(dir, 0o755);
        made.push(RemoveDir(dir.to_path_buf()));
        let f = dir.join("runner-secret");
        std::fs::write(&f, "RUNNER-TOKEN-NEVER-IN-A-JOB").unwrap();
        set_mode(&f, 0o644);
        files.push(f);
    }
    assert!(
        !files.is_empty(),
        "the host has every runner directory already: nothing to test with"
    );
    let list: Vec<String> = files
        .iter()
        .map(|f| format!("{:?}", f.display().to_string()))
        .collect();
    let r = fx.probe(&format!(
        r#"
for f in [{files}]:
    py("read:" + f, lambda f=f: open(f).read())
"#,
        files = list.join(", ")
    ));
    for f in &files {
        r.expect(&format!("read:{}", f.display()), "ENOENT");
    }
    drop(made);
}

/// Removes a directory the test made, with what is in it.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn airlocks_files_and_root_are_hidden_from_a_job() {
    let fx = fixture();
    let dir = fx.stack.agent.dir().to_path_buf();
    // On the host the agent's tree holds its config, state, audit log and control socket.
    for p in [
        "airlock.toml",
        "state",
        "audit.jsonl",
        "control.sock",
        "policies",
    ] {
        assert!(dir.join(p).exists(), "{} missing on the host", p);
    }
    // Something in /root on the host, so that "empty in the job" means hidden.
    let marker = PathBuf::from(format!("/root/al-escape-{}", std::process::id()));
    std::fs::write(&marker, "al").expect("write a marker in /root");
    let _marker = HostFile(Some(marker.clone()));
    let d = dir.to_str().unwrap();
    let r = fx.probe(&format!(
        r#"
d = {d:?}
py("list_agent_dir", lambda: os.listdir(d))
for f in ("airlock.toml", "audit.jsonl", "state", "policies", "jobs", "netns"):
    py("stat:" + f, lambda f=f: os.stat(os.path.join(d, f)).st_mode)
py("read_config", lambda: open(os.path.join(d, "airlock.toml")).read())
py("read_audit", lambda: open(os.path.join(d, "audit.jsonl")).read())
def connect(p):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(p)
py("connect_control", lambda: connect(os.path.join(d, "control.sock")))
py("write_agent_dir", lambda: open(os.path.join(d, "al-x"), "w"))
py("list_root", lambda: os.listdir("/root"))
py("stat_marker", lambda: os.stat({marker:?}))
py("write_root", lambda: open("/root/al-x", "w"))
"#,
        marker = marker.to_str().unwrap()
    ));
    // The agent's tree is under an empty read-only tmpfs: listable (not EACCES, which would
    // mean only its 0700 mode stood in the way), empty, unwritable.
    r.expect("list_agent_dir", "ok:[]");
    for f in [
        "airlock.toml",
        "audit.jsonl",
        "state",
        "policies",
        "jobs",
        "netns",
    ] {
        r.expect(&format!("stat:{f}"), "ENOENT");
    }
    r.expect("read_config", "ENOENT");
    r.expect("read_audit", "ENOENT");
    r.expect("connect_control", "ENOENT");
    r.expect("write_agent_dir", "EROFS");
    r.expect("list_root", "ok:[]");
    r.expect("stat_marker", "ENOENT");
    r.expect("write_root", "EROFS");
}

#[test]
fn a_job_cannot_reach_the_docker_socket() {
    let fx = fixture();
    let var_run_is_run = std::fs::canonicalize("/var/run").is_ok_and(|p| p == Path::new("/run"));
    let mut ours = Vec::new();
    let mut pre_existing = Vec::new();
    let mut guards = Vec::new();
    for p in ["/run/docker.sock", "/var/run/docker.sock"] {
        if p == "/var/run/docker.sock" && var_run_is_run {
            continue;
        }
        match std::fs::symlink_metadata(p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let l = UnixListener::bind(p).expect("bind a stand-in Docker socket");
                guards.push(HostFile(Some(PathBuf::from(p))));
                l.set_nonblocking(true).expect("nonblocking");
                ours.push(l);
            }
            _ => pre_existing.push(p),
        }
    }
    let r = fx.probe(
        r#"
def connect(p):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(p)
py("connect_run", lambda: connect("/run/docker.sock"))
py("connect_var_run", lambda: connect("/var/run/docker.sock"))
py("list_run", lambda: sorted(os.listdir("/run")))
"#,
    );
    for (label, p) in [
        ("connect_run", "/run/docker.sock"),
        ("connect_var_run", "/var/run/docker.sock"),
    ] {
        let pre = pre_existing.contains(&p)
            || (p == "/var/run/docker.sock" && pre_existing.contains(&"/run/docker.sock"));
        let got = r.get(label);
        if pre {
            // A real Docker socket is hidden under /dev/null (refused) if /run were the host's.
            assert!(
                got == "ENOENT" || got == "ECONNREFUSED",
                "{label} ({p}, present on the host): {got}"
            );
        } else {
            // The job's /run is its own tmpfs: the socket is not there at all.
            assert_eq!(got, "ENOENT", "{label} ({p}): {}", r.raw);
        }
    }
    // /run holds only what airlock put there: the token's directory.
    r.expect("list_run", "ok:['airlock']");
    for l in &ours {
        match l.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("the stand-in Docker socket saw a connection: {other:?}"),
        }
    }
    drop(guards);
}

#[test]
fn a_setuid_binary_does_not_raise_a_jobs_privileges() {
    let fx = fixture();
    let dir = fx.host.fresh("suid");
    std::fs::create_dir(&dir).expect("create the setuid dir");
    set_mode(&dir, 0o755);
    let id = dir.join("id");
    std::fs::copy("/usr/bin/id", &id).expect("copy /usr/bin/id");
    set_mode(&id, 0o6755);
    let meta = std::fs::metadata(&id).expect("stat the copy");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o6755);
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0);
    // On the host the copy does raise an unprivileged user to euid 0...
    let host = Command::new("setpriv")
        .args([
            "--reuid",
            JOB_UID,
            "--regid",
            JOB_UID,
            "--clear-groups",
            id.to_str().unwrap(),
            "-u",
        ])
        .output()
        .expect("run setpriv");
    assert_eq!(
        String::from_utf8_lossy(&host.stdout).trim(),
        "0",
        "the host-side control: {host:?}"
    );
    // ...in the job it does not (nosuid mount, no_new_privs).
    let id = id.to_str().unwrap();
    let stdout = fx.run(&format!(
        "echo \"euid=$({id} -u) ruid=$({id} -ru) egid=$({id} -g) plain=$(id -u)\"; \
         grep -E '^(NoNewPrivs|CapEff|CapPrm):' /proc/self/status | tr -s '\\t ' ' '; \
         {PY} -c 'import os\nfor f in (lambda: os.setuid(0), lambda: os.setresuid(0, 0, 0), lambda: os.setgid(0)):\n    try:\n        f(); print(\"setid=ok\")\n    except OSError as e:\n        print(\"setid=\" + str(e.errno))'"
    ));
    let want = format!("euid={JOB_UID} ruid={JOB_UID} egid=");
    let first = stdout.lines().next().unwrap_or_default();
    assert!(first.starts_with(&want), "{stdout}");
    assert!(first.ends_with(&format!("plain={JOB_UID}")), "{stdout}");
    assert!(
        !first.contains("egid=0 "),
        "the setgid bit worked: {stdout}"
    );
    assert!(stdout.contains("NoNewPrivs: 1"), "{stdout}");
    assert!(stdout.contains("CapEff: 0000000000000000"), "{stdout}");
    assert!(stdout.contains("CapPrm: 0000000000000000"), "{stdout}");
    let setid: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("setid="))
        .collect();
    assert_eq!(
        setid,
        ["1", "1", "1"],
        "setuid/setresuid/setgid must be EPERM: {stdout}"
    );
}

#[test]
fn a_jobs_environment_holds_only_allowed_and_airlock_variables() {
    let fx = fixture();
    let path = "/usr/local/bin:/usr/bin:/bin";
    let caller: &[(&str, &str)] = &[
        ("PATH", path),
        ("LANG", "C.UTF-8"),
        ("LC_ALL", "C.UTF-8"),
        ("TERM", "dumb"),
        ("TZ", "UTC"),
        ("CI", "true"),
        ("GITHUB_TOKEN", "al-secret-github"),
        ("ACTIONS_RUNTIME_TOKEN", "al-secret-actions"),
        ("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "al-secret-oidc"),
        ("RUNNER_TRACKING_ID", "al-secret-tracking"),
        ("AWS_ACCESS_KEY_ID", "AKIAALSECRETHOST0000"),
        ("AWS_SECRET_ACCESS_KEY", "al-secret-aws"),
        ("AWS_SESSION_TOKEN", "al-secret-session"),
        ("SSH_AUTH_SOCK", "/tmp/al-secret-agent.sock"),
    ];
    let token = fx.stack.agent.token_file(&GithubJob::production().token());
    let out = fx.stack.agent.cli_env(
        &[
            "run",
            "--oidc-token-file",
            token.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "cat /proc/1/environ; exit 0",
        ],
        caller,
    );
    fx.stdout_of(&out);
    let env: BTreeMap<String, String> = out
        .stdout
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| {
            let v = String::from_utf8_lossy(v);
            let (k, v) = v.split_once('=').unwrap_or((&v, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let raw = String::from_utf8_lossy(&out.stdout);
    assert!(
        !raw.contains("al-secret"),
        "a caller's secret leaked: {env:?}"
    );
    assert!(!raw.contains("AKIAALSECRETHOST"), "{env:?}");
    assert!(
        !raw.contains(fx.stack.moto.agent_secret_key()),
        "the agent's own secret leaked: {env:?}"
    );
    let non_aws: BTreeMap<&str, &str> = env
        .iter()
        .filter(|(k, _)| !k.starts_with("AWS_"))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let job_id = env.get("AIRLOCK_JOB_ID").cloned().unwrap_or_default();
    assert!(!job_id.is_empty(), "{env:?}");
    let want: BTreeMap<&str, &str> = [
        ("PATH", path),
        ("HOME", "/home/job"),
        ("USER", "job"),
        ("TMPDIR", "/tmp"),
        ("LANG", "C.UTF-8"),
        ("LC_ALL", "C.UTF-8"),
        ("TERM", "dumb"),
        ("TZ", "UTC"),
        ("CI", "true"),
        ("AIRLOCK_JOB_ID", job_id.as_str()),
    ]
    .into_iter()
    .collect();
    assert_eq!(non_aws, want);
    let airlock_aws = [
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CONFIG_FILE",
    ];
    for k in env.keys().filter(|k| k.starts_with("AWS_")) {
        assert!(
            airlock_aws.contains(&k.as_str()),
            "{k} is not one of airlock's variables: {env:?}"
        );
    }
    assert_eq!(
        env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
            .map(String::as_str),
        Some("http://169.254.170.2/v1/credentials")
    );
    assert_eq!(
        env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
            .map(String::as_str),
        Some("/run/airlock/token")
    );
}

/// runc's default masked paths (`libcontainer/specconv/example.go`) and the DMI ids.
const MASKED: [&str; 13] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/sys/class/dmi",
    "/sys/devices/virtual/dmi",
];
/// runc's default read-only paths.
const READ_ONLY: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];
/// The DMI ids that name the machine (on EC2 `board_asset_tag` is the instance id).
const DMI_IDS: [&str; 5] = [
    "board_asset_tag",
    "product_uuid",
    "product_serial",
    "board_serial",
    "chassis_asset_tag",
];

#[test]
fn kernel_paths_runc_masks_are_empty_or_read_only_in_a_job() {
    let fx = fixture();
    let r = fx.probe(
        &format!(
            r#"
masked = {masked:?}
read_only = {read_only:?}
dmi = {dmi:?}
mounts = {{}}
for line in open("/proc/self/mountinfo"):
    f = line.split(" ")
    mounts[f[4]] = f[5].split(",")
for p in masked:
    if not os.path.lexists(p):
        print(f"masked:{{p}}=absent")
        continue
    st = os.lstat(p)
    if os.path.isdir(p):
        kind = "dir"
        try:
            listing = os.listdir(p)
        except OSError as e:
            listing = ename(e.errno)
        ro = "ro" in mounts.get(p, [])
        print(f"masked:{{p}}=dir:{{listing!r}}:mounted={{p in mounts}}:ro={{ro}}")
    else:
        try:
            data = open(p, "rb").read()
        except OSError as e:
            data = ename(e.errno)
        dev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat_is_chr(st) else None
        print(f"masked:{{p}}=file:{{data!r}}:dev={{dev}}")
for p in read_only:
    if not os.path.lexists(p):
        print(f"ro:{{p}}=absent")
        continue
    print(f"ro:{{p}}=mounted={{p in mounts}}:ro={{'ro' in mounts.get(p, [])}}")
py("write_proc_sys", lambda: open("/proc/sys/kernel/hostname", "w").write("x"))
py("write_sysrq", lambda: open("/proc/sysrq-trigger", "w").write("h"))
for i in dmi:
    py("dmi:" + i, lambda i=i: open("/sys/class/dmi/id/" + i).read())
    py("dmi_dev:" + i, lambda i=i: open("/sys/devices/virtual/dmi/id/" + i).read())
"#,
            masked = MASKED,
            read_only = READ_ONLY,
            dmi = DMI_IDS,
        )
        .replace("stat_is_chr(st)", "__import__('stat').S_ISCHR(st.st_mode)"),
    );
    let mut checked = 0;
    for p in MASKED {
        let on_host = Path::new(p).exists();
        let got = r.get(&format!("masked:{p}"));
        if !on_host {
            assert_eq!(got, "absent", "{p} is not on the host but shows in the job");
            continue;
        }
        checked += 1;
        if Path::new(p).is_dir() {
            // An empty read-only tmpfs over it: listable, empty.
            assert_eq!(got, "dir:[]:mounted=True:ro=True", "{p}");
        } else {
            // /dev/null over it: reads as empty, and is /dev/null (1:3), not the kernel's file.
            assert_eq!(got, "file:b'':dev=(1, 3)", "{p}");
        }
    }
    for p in READ_ONLY {
        let got = r.get(&format!("ro:{p}"));
        if !Path::new(p).exists() {
            assert_eq!(got, "absent", "{p}");
            continue;
        }
        checked += 1;
        assert_eq!(
            got, "mounted=True:ro=True",
            "{p} is not a read-only mount in the job"
        );
    }
    // On any Linux host /proc/keys, /proc/timer_list (or sched_debug), /sys/firmware and
    // /proc/sys exist: the test is never vacuous.
    assert!(
        checked >= 5,
        "only {checked} of the paths exist on this host:\n{}",
        r.raw
    );
    // Writes fail on the read-only mount itself (EROFS), not only on the job's missing
    // privileges (which would be EACCES).
    r.expect("write_proc_sys", "EROFS");
    let sysrq = if Path::new("/proc/sysrq-trigger").exists() {
        "EROFS"
    } else {
        "ENOENT"
    };
    r.expect("write_sysrq", sysrq);
    // No DMI id is readable, whatever the host has.
    for i in DMI_IDS {
        r.expect(&format!("dmi:{i}"), "ENOENT");
        r.expect(&format!("dmi_dev:{i}"), "ENOENT");
    }
}

/// `docs/jobs.md`, "At a glance": what the page says a job can and cannot do, tried in a
/// job. When one of these changes, the page changes with it.
#[test]
fn what_docs_jobs_md_says_a_job_can_and_cannot_do() {
    let fx = fixture();
    let r = fx.probe(
        r#"
import resource
PERF = {"x86_64": 298, "aarch64": 241}[platform.machine()]
def write(p):
    with open(p, "w") as f:
        f.write("x")
    return "written"
def home_is_job_tmpfs():
    fs = {l.split()[4]: l.split(" - ")[1].split()[0] for l in open("/proc/self/mountinfo")}
    return (os.environ.get("HOME"), fs.get("/home"), fs.get("/tmp"))
py("write_home", lambda: write(os.path.join(os.environ["HOME"], "cache-file")))
py("write_usr", lambda: write("/usr/airlock-probe"))
py("write_etc", lambda: write("/etc/airlock-probe"))
py("home", home_is_job_tmpfs)
py("dev_fuse", lambda: os.stat("/dev/fuse"))
py("core_limit", lambda: resource.getrlimit(resource.RLIMIT_CORE))
sc("ptrace_traceme", "ptrace", 0, 0, 0, 0)
ctypes.set_errno(0)
rc = libc.syscall(ctypes.c_long(PERF), None, ctypes.c_long(0), ctypes.c_long(-1), ctypes.c_long(-1), ctypes.c_long(0))
print("perf_event_open=" + (ename(ctypes.get_errno()) if rc == -1 else "ok"), flush=True)
"#,
    );
    // The job's own space is writable, and it is the job's tmpfs (wiped with the job).
    r.expect("write_home", "ok:'written'");
    r.expect("home", "ok:('/home/job', 'tmpfs', 'tmpfs')");
    // The host's system directories are read-only: no `apt-get install`.
    r.expect("write_usr", "EROFS");
    r.expect("write_etc", "EROFS");
    // No FUSE device; no ptrace (gdb, strace), not even of itself; no perf.
    r.expect("dev_fuse", "ENOENT");
    r.expect("ptrace_traceme", "EPERM");
    r.expect("perf_event_open", "EPERM");
    // No core files: a core holds the job's credentials.
    r.expect("core_limit", "ok:(0, 0)");
}
