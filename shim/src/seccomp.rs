//! The job's seccomp filter, modelled on Docker's default profile: an allowlist of what
//! ordinary CI jobs use (shells, compilers, python, node, git, curl), everything else
//! answered with EPERM. Installed as the very last step before `execve`, after
//! `PR_SET_NO_NEW_PRIVS`, and inherited by everything the job starts.
//!
//! Every rule has its reason next to it. The syscalls that are deliberately *not* allowed
//! are listed in [`DENIED`] with theirs, and a test checks that none of them slipped into
//! the allowlist. Other architectures' calls (e.g. 32-bit `int 0x80` on x86_64) fail the
//! architecture check and kill the process; x32 calls carry a high bit and match nothing.

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
    SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("architecture {0} has no seccomp profile; airlock supports x86_64 and aarch64")]
    Arch(&'static str),
    #[error("building the seccomp filter failed: {0}")]
    Build(String),
    #[error("installing the seccomp filter failed: {0}; the kernel must support seccomp filters and no_new_privs must be set")]
    Install(String),
}

use libc::*;

/// Allowed without conditions, grouped by what they are for.
const ALLOWED: &[(&str, &[c_long])] = &[
    ("file I/O on descriptors the job opened", &[
        SYS_read, SYS_write, SYS_readv, SYS_writev, SYS_pread64, SYS_pwrite64, SYS_preadv,
        SYS_pwritev, SYS_preadv2, SYS_pwritev2, SYS_lseek, SYS_close, SYS_close_range,
        SYS_dup, SYS_dup3, SYS_fcntl, SYS_flock, SYS_fsync, SYS_fdatasync, SYS_syncfs,
        SYS_sync_file_range, SYS_ftruncate, SYS_fallocate, SYS_fadvise64, SYS_readahead,
        SYS_sendfile, SYS_splice, SYS_tee, SYS_vmsplice, SYS_copy_file_range, SYS_sync,
    ]),
    ("paths: open, stat, create, rename, links, permissions (the kernel's own checks and the read-only mounts still apply)", &[
        SYS_openat, SYS_openat2, SYS_newfstatat, SYS_fstat, SYS_statx, SYS_statfs,
        SYS_fstatfs, SYS_faccessat, SYS_faccessat2, SYS_getdents64, SYS_getcwd, SYS_chdir,
        SYS_fchdir, SYS_mkdirat, SYS_mknodat, SYS_unlinkat, SYS_renameat, SYS_renameat2,
        SYS_linkat, SYS_symlinkat, SYS_readlinkat, SYS_fchmod, SYS_fchmodat, SYS_fchown,
        SYS_fchownat, SYS_utimensat, SYS_truncate, SYS_umask, SYS_name_to_handle_at,
    ]),
    ("extended attributes (tar, cp -a, rsync)", &[
        SYS_getxattr, SYS_lgetxattr, SYS_fgetxattr, SYS_setxattr, SYS_lsetxattr,
        SYS_fsetxattr, SYS_listxattr, SYS_llistxattr, SYS_flistxattr, SYS_removexattr,
        SYS_lremovexattr, SYS_fremovexattr,
    ]),
    ("memory management (every runtime and allocator)", &[
        SYS_brk, SYS_mmap, SYS_munmap, SYS_mprotect, SYS_mremap, SYS_madvise, SYS_msync,
        SYS_mincore, SYS_mlock, SYS_mlock2, SYS_munlock, SYS_mlockall, SYS_munlockall,
        SYS_membarrier, SYS_memfd_create, SYS_pkey_alloc, SYS_pkey_free, SYS_pkey_mprotect,
        SYS_get_mempolicy, SYS_set_mempolicy, SYS_mbind,
    ]),
    ("processes and threads (clone is allowed below, without namespace flags)", &[
        SYS_execve, SYS_execveat, SYS_exit, SYS_exit_group, SYS_wait4, SYS_waitid,
        SYS_set_tid_address, SYS_set_robust_list, SYS_get_robust_list, SYS_rseq,
        SYS_futex, SYS_futex_waitv, SYS_sched_yield, SYS_sched_getaffinity,
        SYS_sched_setaffinity, SYS_sched_getparam, SYS_sched_setparam,
        SYS_sched_getscheduler, SYS_sched_setscheduler, SYS_sched_get_priority_max,
        SYS_sched_get_priority_min, SYS_sched_rr_get_interval, SYS_sched_getattr,
        SYS_sched_setattr, SYS_getpriority, SYS_setpriority, SYS_ioprio_get,
        SYS_ioprio_set, SYS_prctl, SYS_getcpu, SYS_pidfd_open, SYS_pidfd_send_signal,
    ]),
    ("identity queries and changes the kernel permits an unprivileged user (to itself)", &[
        SYS_getpid, SYS_getppid, SYS_gettid, SYS_getuid, SYS_geteuid, SYS_getgid,
        SYS_getegid, SYS_getresuid, SYS_getresgid, SYS_getgroups, SYS_getpgid,
        SYS_setpgid, SYS_getsid, SYS_setsid, SYS_setuid, SYS_setgid, SYS_setreuid,
        SYS_setregid, SYS_setresuid, SYS_setresgid, SYS_setfsuid, SYS_setfsgid,
        SYS_setgroups, SYS_capget, SYS_capset, SYS_getrlimit, SYS_setrlimit,
        SYS_prlimit64, SYS_getrusage, SYS_times, SYS_uname, SYS_sysinfo,
    ]),
    ("signals (the pid namespace confines kill to the job's own processes)", &[
        SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_rt_sigreturn, SYS_rt_sigpending,
        SYS_rt_sigsuspend, SYS_rt_sigtimedwait, SYS_rt_sigqueueinfo,
        SYS_rt_tgsigqueueinfo, SYS_sigaltstack, SYS_kill, SYS_tkill, SYS_tgkill,
        SYS_signalfd4, SYS_restart_syscall,
    ]),
    ("time and timers (setting the clock needs CAP_SYS_TIME, which the job lacks)", &[
        SYS_clock_gettime, SYS_clock_getres, SYS_clock_nanosleep, SYS_gettimeofday,
        SYS_nanosleep, SYS_getitimer, SYS_setitimer, SYS_timer_create, SYS_timer_settime,
        SYS_timer_gettime, SYS_timer_getoverrun, SYS_timer_delete, SYS_timerfd_create,
        SYS_timerfd_settime, SYS_timerfd_gettime,
    ]),
    ("event loops, pipes and notifications (node, python asyncio, make -j)", &[
        SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_pwait, SYS_epoll_pwait2, SYS_ppoll,
        SYS_pselect6, SYS_eventfd2, SYS_pipe2, SYS_inotify_init1, SYS_inotify_add_watch,
        SYS_inotify_rm_watch,
    ]),
    ("sockets other than socket() itself (creating one is checked below); the job's network namespace decides what is reachable", &[
        SYS_socketpair, SYS_bind, SYS_listen, SYS_accept, SYS_accept4, SYS_connect,
        SYS_getsockname, SYS_getpeername, SYS_sendto, SYS_recvfrom, SYS_sendmsg,
        SYS_recvmsg, SYS_sendmmsg, SYS_recvmmsg, SYS_shutdown, SYS_setsockopt,
        SYS_getsockopt,
    ]),
    ("System V IPC and POSIX message queues (the IPC namespace is the job's own)", &[
        SYS_shmget, SYS_shmat, SYS_shmdt, SYS_shmctl, SYS_semget, SYS_semop,
        SYS_semtimedop, SYS_semctl, SYS_msgget, SYS_msgsnd, SYS_msgrcv, SYS_msgctl,
        SYS_mq_open, SYS_mq_unlink, SYS_mq_timedsend, SYS_mq_timedreceive, SYS_mq_notify,
        SYS_mq_getsetattr,
    ]),
    ("asynchronous I/O (libaio; io_uring is denied)", &[
        SYS_io_setup, SYS_io_destroy, SYS_io_submit, SYS_io_cancel, SYS_io_getevents,
    ]),
    ("randomness", &[SYS_getrandom]),
    ("self-restriction: a job may sandbox itself further (browsers, test runners)", &[
        SYS_seccomp, SYS_landlock_create_ruleset, SYS_landlock_add_rule,
        SYS_landlock_restrict_self,
    ]),
];

/// x86_64's legacy calls, which aarch64 never had.
#[cfg(target_arch = "x86_64")]
const ALLOWED_X86_64: &[(&str, &[c_long])] = &[
    (
        "legacy file calls still used by older binaries and static toolchains",
        &[
            SYS_open,
            SYS_creat,
            SYS_stat,
            SYS_lstat,
            SYS_access,
            SYS_getdents,
            SYS_mkdir,
            SYS_rmdir,
            SYS_unlink,
            SYS_rename,
            SYS_link,
            SYS_symlink,
            SYS_readlink,
            SYS_chmod,
            SYS_chown,
            SYS_lchown,
            SYS_utime,
            SYS_utimes,
            SYS_futimesat,
            SYS_mknod,
            SYS_dup2,
            SYS_pipe,
            SYS_poll,
            SYS_select,
            SYS_epoll_create,
            SYS_epoll_wait,
            SYS_eventfd,
            SYS_signalfd,
            SYS_inotify_init,
        ],
    ),
    (
        "legacy process calls (fork/vfork create no namespace)",
        &[
            SYS_fork,
            SYS_vfork,
            SYS_pause,
            SYS_alarm,
            SYS_time,
            SYS_getpgrp,
        ],
    ),
    ("thread-local storage setup by libc", &[SYS_arch_prctl]),
];
#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_X86_64: &[(&str, &[c_long])] = &[];

/// Namespace flags of clone(2): a job must not build namespaces (they are how containers
/// escape: a user namespace gives capabilities inside it).
pub const CLONE_NAMESPACE_FLAGS: u64 = (CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET) as u64;

/// Socket families a job may create: local sockets, IPv4, IPv6, and netlink (glibc's
/// getaddrinfo reads the job's addresses over NETLINK_ROUTE; changing them needs
/// CAP_NET_ADMIN, which the job lacks). Not AF_VSOCK (a channel to the hypervisor or host
/// outside the network namespace), AF_PACKET, AF_ALG, bluetooth or the rest.
pub const SOCKET_FAMILIES: [c_int; 4] = [AF_UNIX, AF_INET, AF_INET6, AF_NETLINK];

/// personality(2) values Docker allows: query (0xffffffff), PER_LINUX, UNAME26,
/// PER_LINUX32, PER_LINUX32|UNAME26. Not ADDR_NO_RANDOMIZE and friends.
pub const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// ioctl requests refused: TIOCSTI pushes input into a terminal, TIOCLINUX can do the same
/// on a virtual console (setsid already removes the controlling terminal; this is the
/// second lock).
// `Ioctl` is c_ulong on glibc but c_int elsewhere: the cast is needed there.
#[allow(clippy::unnecessary_cast)]
pub const IOCTL_DENIED: [u64; 2] = [TIOCSTI as u64, TIOCLINUX as u64];

/// Deliberately not allowed, with the reason. Answered with EPERM like everything not
/// allowed, except `clone3`, answered with ENOSYS.
pub const DENIED: &[(&str, &[c_long])] = &[
    ("mounting or changing the root: the job's view of the filesystem is fixed", &[
        SYS_mount, SYS_umount2, SYS_pivot_root, SYS_chroot, SYS_mount_setattr,
        SYS_move_mount, SYS_open_tree, SYS_fsopen, SYS_fsconfig, SYS_fsmount, SYS_fspick,
    ]),
    ("namespaces: creating or entering one is the first step of most container escapes", &[
        SYS_unshare, SYS_setns,
    ]),
    ("clone3: its flags are in memory that seccomp cannot inspect; ENOSYS makes libc fall back to clone, whose flags are checked", &[
        SYS_clone3,
    ]),
    ("eBPF: a large kernel attack surface, and programs that can read kernel memory", &[SYS_bpf]),
    ("tracing other processes, reading their memory, stealing their descriptors", &[
        SYS_ptrace, SYS_process_vm_readv, SYS_process_vm_writev, SYS_kcmp,
        SYS_pidfd_getfd,
    ]),
    ("the kernel keyring is not namespaced: keys could outlive the job or leak between jobs", &[
        SYS_keyctl, SYS_add_key, SYS_request_key,
    ]),
    ("perf events: kernel attack surface and side channels", &[SYS_perf_event_open]),
    ("userfaultfd: the classic tool for winning kernel races", &[SYS_userfaultfd]),
    ("kernel modules and kexec: replacing the kernel", &[
        SYS_init_module, SYS_finit_module, SYS_delete_module, SYS_kexec_load,
        SYS_kexec_file_load,
    ]),
    ("io_uring: a large, frequently exploited surface that also bypasses seccomp for the calls it performs", &[
        SYS_io_uring_setup, SYS_io_uring_enter, SYS_io_uring_register,
    ]),
    ("host administration: clock, swap, reboot, accounting, quotas, kernel log, handles", &[
        SYS_settimeofday, SYS_clock_settime, SYS_clock_adjtime, SYS_adjtimex, SYS_swapon,
        SYS_swapoff, SYS_reboot, SYS_acct, SYS_quotactl, SYS_syslog, SYS_sethostname,
        SYS_setdomainname, SYS_open_by_handle_at, SYS_vhangup, SYS_fanotify_init,
        SYS_move_pages, SYS_migrate_pages, SYS_lookup_dcookie,
    ]),
    ("personality, except the values in PERSONALITIES: the others (ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC) weaken ASLR and W^X", &[
        SYS_personality,
    ]),
];

/// The syscall argument rules, each a list of alternatives (any one matching allows).
fn conditional_rules() -> Result<Vec<(c_long, Vec<SeccompRule>)>, seccompiler::BackendError> {
    let dword = |arg, op, v| Cond::new(arg, Len::Dword, op, v);
    let mut out = Vec::new();
    // clone: threads and processes, but never with a namespace flag (arg 0 is the flags on
    // both x86_64 and aarch64; the kernel reads only the low 32 bits).
    out.push((
        SYS_clone,
        vec![SeccompRule::new(vec![dword(
            0,
            Op::MaskedEq(CLONE_NAMESPACE_FLAGS),
            0,
        )?])?],
    ));
    // socket: only the families in SOCKET_FAMILIES (arg 0 is an int: compare 32 bits).
    let mut families = Vec::new();
    for f in SOCKET_FAMILIES {
        families.push(SeccompRule::new(vec![dword(0, Op::Eq, f as u64)?])?);
    }
    out.push((SYS_socket, families));
    // personality: only the values in PERSONALITIES.
    let mut pers = Vec::new();
    for p in PERSONALITIES {
        pers.push(SeccompRule::new(vec![dword(0, Op::Eq, p)?])?);
    }
    out.push((SYS_personality, pers));
    // ioctl: anything but the requests in IOCTL_DENIED (the request is an unsigned int:
    // compare 32 bits, so high bits cannot smuggle it past).
    let mut not_denied = Vec::new();
    for r in IOCTL_DENIED {
        not_denied.push(dword(1, Op::Ne, r)?);
    }
    out.push((SYS_ioctl, vec![SeccompRule::new(not_denied)?]));
    Ok(out)
}

fn target_arch() -> Result<(TargetArch, u32), Error> {
    match std::env::consts::ARCH {
        "x86_64" => Ok((TargetArch::x86_64, AUDIT_ARCH_X86_64)),
        "aarch64" => Ok((TargetArch::aarch64, AUDIT_ARCH_AARCH64)),
        other => Err(Error::Arch(other)),
    }
}

const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
const AUDIT_ARCH_AARCH64: u32 = 183 | 0x8000_0000 | 0x4000_0000;

/// Compiles the job's filter: the ENOSYS answer for clone3 first, then the allowlist with
/// EPERM for everything else.
pub fn job_filter() -> Result<BpfProgram, Error> {
    let (arch, audit_arch) = target_arch()?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_why, calls) in ALLOWED.iter().chain(ALLOWED_X86_64) {
        for &nr in *calls {
            rules.insert(nr, vec![]);
        }
    }
    for (nr, alternatives) in conditional_rules().map_err(|e| Error::Build(e.to_string()))? {
        rules.insert(nr, alternatives);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(EPERM as u32),
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| Error::Build(e.to_string()))?;
    let allowlist: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Build(e.to_string()))?;
    // seccompiler gives one action per filter, so the one call answered differently is a
    // prefix of four instructions in front of its program: on this architecture, clone3
    // returns ENOSYS; anything else (or another architecture) falls through to the
    // allowlist, which checks the architecture again.
    let mut program = enosys_prefix(audit_arch, SYS_clone3 as u32);
    program.extend(allowlist);
    Ok(program)
}

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;

fn enosys_prefix(audit_arch: u32, nr: u32) -> Vec<sock_filter> {
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        // A = seccomp_data.arch; if not ours, skip to the allowlist (which kills).
        ins(BPF_LD_W_ABS, 0, 0, 4),
        ins(BPF_JEQ_K, 0, 3, audit_arch),
        // A = seccomp_data.nr; clone3 → ENOSYS, else on to the allowlist.
        ins(BPF_LD_W_ABS, 0, 0, 0),
        ins(BPF_JEQ_K, 0, 1, nr),
        ins(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | ENOSYS as u32),
    ]
}

/// Installs `program` on the calling (only) thread. Requires no_new_privs.
pub fn install(program: &BpfProgram) -> Result<(), Error> {
    seccompiler::apply_filter(program).map_err(|e| Error::Install(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classic-BPF interpreter for the instructions seccompiler emits, so the filter's
    /// answers are tested without installing it.
    fn run(prog: &[sock_filter], arch: u32, nr: i64, args: [u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend_from_slice(&(nr as i32).to_ne_bytes());
        data.extend_from_slice(&arch.to_ne_bytes());
        data.extend_from_slice(&0u64.to_ne_bytes());
        for a in args {
            data.extend_from_slice(&a.to_ne_bytes());
        }
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = &prog[pc];
            pc += 1;
            match i.code {
                0x20 => {
                    let o = i.k as usize;
                    a = u32::from_ne_bytes(data[o..o + 4].try_into().unwrap());
                }
                0x06 => return i.k,
                0x05 => pc += i.k as usize,
                0x54 => a &= i.k,
                0x15 | 0x25 | 0x35 | 0x45 => {
                    let t = match i.code {
                        0x15 => a == i.k,
                        0x25 => a > i.k,
                        0x35 => a >= i.k,
                        _ => a & i.k != 0,
                    };
                    pc += if t { i.jt } else { i.jf } as usize;
                }
                c => panic!("instruction {c:#x} not interpreted"),
            }
        }
    }

    const ALLOW: u32 = 0x7fff_0000;
    const EPERM_RET: u32 = SECCOMP_RET_ERRNO | EPERM as u32;
    const ENOSYS_RET: u32 = SECCOMP_RET_ERRNO | ENOSYS as u32;

    fn answer(nr: c_long, args: [u64; 6]) -> u32 {
        let (_, arch) = target_arch().unwrap();
        run(&job_filter().unwrap(), arch, nr, args)
    }

    #[test]
    fn ordinary_calls_are_allowed() {
        for nr in [
            SYS_read,
            SYS_write,
            SYS_openat,
            SYS_mmap,
            SYS_execve,
            SYS_futex,
            SYS_exit_group,
        ] {
            assert_eq!(answer(nr, [0; 6]), ALLOW, "syscall {nr}");
        }
    }

    #[test]
    fn every_denied_call_gets_eperm_and_clone3_enosys() {
        for (why, calls) in DENIED {
            for &nr in *calls {
                let want = if nr == SYS_clone3 {
                    ENOSYS_RET
                } else {
                    EPERM_RET
                };
                // personality is allowed for a few values; any other value is denied.
                assert_eq!(answer(nr, [0x40000; 6]), want, "syscall {nr} ({why})");
            }
        }
        assert_eq!(
            answer(9999, [0; 6]),
            EPERM_RET,
            "unknown syscalls are denied"
        );
    }

    #[test]
    fn no_denied_call_is_in_the_allowlist() {
        let allowed: Vec<c_long> = ALLOWED
            .iter()
            .chain(ALLOWED_X86_64)
            .flat_map(|(_, c)| c.iter().copied())
            .collect();
        for (why, calls) in DENIED {
            for nr in *calls {
                if *nr == SYS_personality {
                    continue; // allowed only with the arguments in PERSONALITIES
                }
                assert!(!allowed.contains(nr), "{nr} is denied ({why}) but allowed");
            }
        }
    }

    #[test]
    fn clone_with_a_namespace_flag_is_denied() {
        let thread = (CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD) as u64;
        assert_eq!(answer(SYS_clone, [thread, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(answer(SYS_clone, [SIGCHLD as u64, 0, 0, 0, 0, 0]), ALLOW);
        for ns in [
            CLONE_NEWUSER,
            CLONE_NEWNS,
            CLONE_NEWNET,
            CLONE_NEWPID,
            CLONE_NEWCGROUP,
        ] {
            let flags = SIGCHLD as u64 | ns as u64;
            assert_eq!(
                answer(SYS_clone, [flags, 0, 0, 0, 0, 0]),
                EPERM_RET,
                "{ns:#x}"
            );
        }
    }

    #[test]
    fn sockets_only_of_allowed_families() {
        for f in SOCKET_FAMILIES {
            assert_eq!(
                answer(SYS_socket, [f as u64, 1, 0, 0, 0, 0]),
                ALLOW,
                "family {f}"
            );
        }
        for f in [AF_VSOCK, AF_PACKET, AF_ALG, AF_BLUETOOTH] {
            assert_eq!(
                answer(SYS_socket, [f as u64, 1, 0, 0, 0, 0]),
                EPERM_RET,
                "family {f}"
            );
        }
        // High bits must not turn a forbidden family into an allowed comparison.
        let sneaky = (1u64 << 32) | AF_VSOCK as u64;
        assert_eq!(answer(SYS_socket, [sneaky, 1, 0, 0, 0, 0]), EPERM_RET);
    }

    #[test]
    fn tiocsti_is_denied_even_with_high_bits_set() {
        assert_eq!(
            answer(SYS_ioctl, [0, u64::from(TCGETS as u32), 0, 0, 0, 0]),
            ALLOW
        );
        for r in IOCTL_DENIED {
            assert_eq!(answer(SYS_ioctl, [0, r, 0, 0, 0, 0]), EPERM_RET);
            assert_eq!(answer(SYS_ioctl, [0, r | (1 << 40), 0, 0, 0, 0]), EPERM_RET);
        }
    }

    #[test]
    fn other_architectures_are_killed() {
        let prog = job_filter().unwrap();
        let i386 = 3 | 0x4000_0000;
        let ret = run(&prog, i386, SYS_read, [0; 6]);
        assert!(
            ret == 0x8000_0000 || ret == 0,
            "kill expected, got {ret:#x}"
        );
        // x32 numbers carry bit 30 and match nothing.
        let (_, arch) = target_arch().unwrap();
        assert_eq!(run(&prog, arch, 0x4000_0000 | SYS_read, [0; 6]), EPERM_RET);
    }
}
