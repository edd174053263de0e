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
