//! Test-only probe for the shim's privileged integration tests: run inside a sandbox, it
//! tries what a hostile job would and prints `key=value` lines (`ok` or the errno name).
//! Never installed; it escalates nothing by itself.
//!
//! `shim-probe report` | `shim-probe euid` | `shim-probe exit N` | `shim-probe sleep SECS`

use nix::mount::{mount, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use std::path::Path;

fn res<T>(r: nix::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("{e:?}"),
    }
}

fn io<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(n) => format!("{:?}", nix::Error::from_raw(n)),
            None => e.kind().to_string(),
        },
    }
}

/// A raw syscall with harmless arguments (null pointers and zeros), for calls nix does not
/// wrap. The answer tells the filter apart from the kernel: seccomp answers before the
/// kernel would look at the (invalid) arguments.
#[allow(unsafe_code)]
fn raw(nr: libc::c_long, a: [libc::c_long; 3]) -> String {
    // SAFETY: every argument is 0, a small integer or a null pointer; the kernel validates
    // them and fails with EFAULT/EINVAL rather than touching our memory.
    let rc = unsafe { libc::syscall(nr, a[0], a[1], a[2]) };
    if rc < 0 {
        format!("{:?}", nix::Error::last())
    } else {
        "ok".into()
    }
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "missing".into())
}

fn entries(p: &Path) -> String {
    match std::fs::read_dir(p) {
        Ok(d) => d.count().to_string(),
        Err(e) => io::<()>(Err(e)),
    }
}

fn report() {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: String| out.push((k.to_string(), v));

    // Descriptors above stderr the job started with, found without opening one.
    let open: Vec<String> = (3..1024)
        .filter(|&fd| nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok())
        .map(|fd| fd.to_string())
        .collect();
    put("open_fds", open.join(","));

    put("pid", std::process::id().to_string());
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    put("procs", format!("{pids:?}"));
    put("uid", nix::unistd::getuid().to_string());
    put("euid", nix::unistd::geteuid().to_string());
    put("gid", nix::unistd::getgid().to_string());
    put(
        "groups",
        format!("{:?}", nix::unistd::getgroups().unwrap_or_default()),
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for k in [
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
        "Seccomp",
    ] {
        put(k, status_field(&status, k));
    }
    put(
        "hostname",
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    put(
        "cgroup",
        std::fs::read_to_string("/proc/self/cgroup")
            .unwrap_or_default()
            .trim()
            .to_string(),
    );
    put(
        "netns",
        std::fs::read_link("/proc/self/ns/net")
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    );
    put(
        "net_devices",
        std::fs::read_dir("/sys/class/net")
            .map(|d| {
                let mut v: Vec<String> = d
                    .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect();
                v.sort();
                v.join(",")
            })
            .unwrap_or_default(),
    );

    // Filesystem: the host is read-only, the job's tmpfs are empty and writable.
    put("write_root", io(std::fs::write("/al-probe", "x")));
    put("write_usr", io(std::fs::write("/usr/al-probe", "x")));
    put("tmp_entries", entries(Path::new("/tmp")));
    put("write_tmp", io(std::fs::write("/tmp/al-probe", "x")));
    let home = std::env::var("HOME").unwrap_or_default();
    put("home_entries", entries(Path::new(&home)));
    put(
        "write_home",
        io(std::fs::write(Path::new(&home).join("al-probe"), "x")),
    );
    put("dev_entries", {
        let mut v: Vec<String> = std::fs::read_dir("/dev")
            .map(|d| {
                d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v.join(",")
    });
    put("write_dev_null", io(std::fs::write("/dev/null", "x")));
    // The job's mount table: every mount point, and the options of /tmp's and home's.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounts: Vec<(&str, &str)> = mountinfo
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ').skip(4);
            Some((f.next()?, f.next()?))
        })
        .collect();
    let mut points: Vec<&str> = mounts.iter().map(|(p, _)| *p).collect();
    points.sort_unstable();
    put("mount_points", points.join(","));
    for dir in ["/tmp", home.as_str()] {
        if let Some((_, opts)) = mounts.iter().rev().find(|(p, _)| *p == dir) {
            put(&format!("mount_options {dir}"), opts.to_string());
        }
    }
    if let Ok(dir) = std::env::var("PROBE_HIDDEN_DIR") {
        put("hidden_dir_entries", entries(Path::new(&dir)));
        put(
            "hidden_dir_write",
            io(std::fs::write(Path::new(&dir).join("x"), "x")),
        );
    }
    if let Ok(file) = std::env::var("PROBE_HIDDEN_FILE") {
        put(
            "hidden_file",
            std::fs::read_to_string(&file).unwrap_or_else(|e| io::<()>(Err(e))),
        );
    }

    // Escapes: each must fail, with the specific error.
    put(
        "mount",
        res(mount(
            Some("tmpfs"),
            "/tmp",
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )),
    );
    put(
        "unshare_mnt",
        res(nix::sched::unshare(CloneFlags::CLONE_NEWNS)),
    );
    put(
        "unshare_user",
        res(nix::sched::unshare(CloneFlags::CLONE_NEWUSER)),
    );
    put(
        "setns",
        match std::fs::File::open("/proc/self/ns/net") {
            Ok(f) => res(nix::sched::setns(&f, CloneFlags::CLONE_NEWNET)),
            Err(e) => io::<()>(Err(e)),
        },
    );
    put("bpf", raw(libc::SYS_bpf, [0, 0, 0]));
    put("keyctl", raw(libc::SYS_keyctl, [0, -3, 0])); // KEYCTL_GET_KEYRING_ID(session)
    put("add_key", raw(libc::SYS_add_key, [0, 0, 0]));
    put("clone3", raw(libc::SYS_clone3, [0, 0, 0]));
    put("io_uring_setup", raw(libc::SYS_io_uring_setup, [1, 0, 0]));
    put(
        "ptrace",
        raw(
            libc::SYS_ptrace,
            [libc::PTRACE_TRACEME as libc::c_long, 0, 0],
        ),
    );
    put(
        "vsock",
        res(socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )),
    );
    put(
        "packet",
        res(socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::empty(),
            None,
        )),
    );
    put(
        "raw",
        res(socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::empty(),
            nix::sys::socket::SockProtocol::Icmp,
        )),
    );
    put(
        "tcp",
        res(socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )),
    );
    put(
        "unix",
        res(socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )),
    );
    put(
        "tiocsti",
        raw(libc::SYS_ioctl, [0, libc::TIOCSTI as libc::c_long, 0]),
    );
    put(
        "setuid0",
        res(nix::unistd::setuid(nix::unistd::Uid::from_raw(0))),
    );
    put(
        "fork",
        match std::process::Command::new("/bin/true").status() {
            Ok(s) => format!("{s}"),
            Err(e) => io::<()>(Err(e)),
        },
    );

    // Environment and descriptors.
    let mut keys: Vec<String> = std::env::vars_os()
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .collect();
    keys.sort();
    put("env_keys", keys.join(","));
    if let Ok(fd) = std::env::var("PROBE_FD") {
        let fd: i32 = fd.parse().unwrap_or(-1);
        put(
            "inherited_fd",
            res(nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)),
        );
    }
    for (k, v) in out {
        println!("{k}={v}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["report"] => report(),
        ["euid"] => println!("euid={}", nix::unistd::geteuid()),
        ["exit", n] => std::process::exit(n.parse().unwrap_or(1)),
        ["sleep", s] => {
            std::thread::sleep(std::time::Duration::from_secs_f64(s.parse().unwrap_or(1.0)))
        }
        _ => {
            eprintln!("usage: shim-probe report | euid | exit N | sleep SECS");
            std::process::exit(2)
        }
    }
}
