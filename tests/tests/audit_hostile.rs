//! The audit log holds when a job attacks it, and when the disk fails under it:
//!
//! - a sandboxed job that floods its endpoint with binds gets its refusals paced (at most
//!   the endpoint's refusal burst plus its rate over the flood), writes a bounded number of
//!   records, every refused bind is either written or counted in an `audit_dropped` record,
//!   and another job's credential fetches stay fast meanwhile (measured);
//! - a full audit filesystem refuses new jobs with a clear error and issues nothing, while a
//!   running job keeps its cached credentials; the log recovers once space returns.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use airlock::endpoint::{REFUSALS_PER_SECOND, REFUSAL_BURST};
use airlock_tests::agent::Job;
use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;
use serde_json::Value;

/// Floods `POST /v1/bind` with the job's own token from 4 connections for `secs` seconds;
/// prints how many requests were answered and with what.
const BIND_FLOOD: &str = r#"
import http.client, os, sys, threading, time
tok = open(os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]).read().strip()
secs = float(sys.argv[1])
end = time.time() + secs
counts = {}
lock = threading.Lock()
def worker():
    c = http.client.HTTPConnection("169.254.170.2", 80, timeout=5)
    while time.time() < end:
        try:
            c.request("POST", "/v1/bind", body=b"{}", headers={"Authorization": tok, "Content-Type": "application/json"})
            r = c.getresponse(); r.read()
            with lock: counts[r.status] = counts.get(r.status, 0) + 1
        except Exception:
            with lock: counts["error"] = counts.get("error", 0) + 1
            c.close(); c = http.client.HTTPConnection("169.254.170.2", 80, timeout=5)
ts = [threading.Thread(target=worker) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
print("job=%s" % os.environ["AIRLOCK_JOB_ID"])
print("requests=%d" % sum(v for k, v in counts.items() if k != "error"))
print("conflicts=%d" % counts.get(409, 0))
print("errors=%d" % counts.get("error", 0))
"#;

/// Fetches the job's credentials `n` times, a new connection each (as the SDKs do); prints
/// the latency percentiles in milliseconds and the failures.
const FETCH_LATENCY: &str = r#"
import http.client, os, sys, time
tok = open(os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]).read().strip()
n = int(sys.argv[1])
lat, errors = [], 0
for _ in range(n):
    t = time.perf_counter()
    try:
        c = http.client.HTTPConnection("169.254.170.2", 80, timeout=5)
        c.request("GET", "/v1/credentials", headers={"Authorization": tok})
        r = c.getresponse(); body = r.read(); c.close()
        if r.status != 200 or b"AccessKeyId" not in body: errors += 1
    except Exception:
        errors += 1
    lat.append((time.perf_counter() - t) * 1000)
lat.sort()
print("p50=%.2f" % lat[len(lat) // 2])
print("p99=%.2f" % lat[min(len(lat) - 1, int(len(lat) * 0.99))])
print("max=%.2f" % lat[-1])
print("errors=%d" % errors)
"#;

const PY: &str = "/usr/bin/python3";

fn kv_of(out: &std::process::Output, what: &str, stack: &Stack) -> BTreeMap<String, String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {stdout}\nstderr: {}\nagent log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        stack.agent.log()
    );
    airlock_tests::kv(&stdout)
}

fn num(kv: &BTreeMap<String, String>, k: &str) -> f64 {
    kv.get(k)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{k} missing in {kv:?}"))
}

fn fetch_latency(stack: &Stack, n: usize) -> BTreeMap<String, String> {
    let script = format!("{PY} -c '{FETCH_LATENCY}' {n}");
    let out = stack.run_sh(&GithubJob::production().token(), &script);
    kv_of(&out, "the credential fetches", stack)
}

#[test]
fn a_jobs_bind_flood_is_bounded_and_counted_and_another_jobs_fetches_stay_fast() {
    airlock_tests::prereq::require_root_and("the bind flood test", &[("nft", "nftables")]);
    assert!(Path::new(PY).is_file(), "{PY} is needed inside the sandbox");
    let stack = Stack::sandboxed_then("", |o| {
        o.audit_config(
            "job_records_per_second = 2.0\njob_records_burst = 20\njob_summary_interval = \"2s\"\n",
        )
    });
    // Job B, alone: the reference.
    let quiet = fetch_latency(&stack, 300);
    // Job A floods for 8 s; B measures again while it does.
    let flood = std::thread::scope(|s| {
        let a = s.spawn(|| {
            let script = format!("{PY} -c '{BIND_FLOOD}' 8");
            stack.run_sh(&GithubJob::production().token(), &script)
        });
        std::thread::sleep(Duration::from_secs(2));
        let under = fetch_latency(&stack, 300);
        let a = a.join().expect("the flood's thread");
        (kv_of(&a, "the bind flood", &stack), under)
    });
    let (a, under) = flood;
    let requests = num(&a, "requests") as u64;
    let conflicts = num(&a, "conflicts") as u64;
    let flood_job = a["job"].clone();
    eprintln!(
        "bind flood: {requests} requests in 8 s ({conflicts} refused 409); job B credential fetch p50/p99/max ms: quiet {}/{}/{}, under flood {}/{}/{}",
        quiet["p50"], quiet["p99"], quiet["max"], under["p50"], under["p99"], under["max"]
    );
    // The endpoint paces a job's refusals: its burst, then its rate, over the 8 s of the
    // flood (and the second the job takes to start).
    let paced = (REFUSAL_BURST + REFUSALS_PER_SECOND * 9.0) as u64;
    assert!(
        requests <= paced,
        "{requests} refused binds in 8 s: not paced (at most {paced}): {a:?}"
    );
    // Still more than the audit's bound for the job, so that bound shows.
    assert!(
        requests > 20 + 2 * 12 + 50,
        "the flood was too weak to show anything: {a:?}"
    );
    assert_eq!(conflicts, requests, "every bind is refused: {a:?}");
    // Job A's end (its last summary) is written once its run returns; wait for the writer.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (written, summaries) = loop {
        let recs = stack.agent.audit_records();
        let of_a = |ev: &str| -> Vec<Value> {
            recs.iter()
                .filter(|r| r["job"] == flood_job.as_str() && r["event"] == ev)
                .cloned()
                .collect()
        };
        let (w, s) = (of_a("bind_refused"), of_a("audit_dropped"));
        let ended = s.iter().any(|r| r["job_ended"] == true);
        if ended || Instant::now() > deadline {
            break (w, s);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let dropped: u64 = summaries
        .iter()
        .map(|r| r["dropped"]["bind_refused"].as_u64().unwrap_or(0))
        .sum();
    eprintln!(
        "bind flood: {} bind_refused records, {} audit_dropped records counting {dropped}",
        written.len(),
        summaries.len()
    );
    // Bounded: the burst plus the rate over the flood (and the job's start), not per request.
    assert!(
        written.len() <= 20 + 2 * 12,
        "{} bind_refused records for {requests} requests",
        written.len()
    );
    // Every refused bind is accounted for: written, or counted in a summary.
    assert_eq!(
        written.len() as u64 + dropped,
        requests,
        "records {} + counted {dropped} != requests {requests}; summaries: {summaries:?}",
        written.len()
    );
    // Periodic summaries while it flooded (every 2 s), then the last one at its end.
    assert!(summaries.len() >= 3, "audit_dropped records: {summaries:?}");
    assert!(summaries.iter().any(|r| r["job_ended"] == true));
    assert!(summaries.iter().any(|r| r["job_ended"] == false));
    // Job B was served throughout, and fast.
    assert_eq!(num(&quiet, "errors"), 0.0, "{quiet:?}");
    assert_eq!(num(&under, "errors"), 0.0, "{under:?}");
    let (q99, f99) = (num(&quiet, "p99"), num(&under, "p99"));
    assert!(
        f99 <= (q99 * 5.0).max(q99 + 50.0),
        "job B's p99 went from {q99} ms to {f99} ms under the flood"
    );
    let verify = stack.agent.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "{verify:?}");
}

/// A tmpfs of `size` mounted on a new directory, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempfile::Builder::new()
            .prefix("airlock-audit-fs-")
            .tempdir()
            .expect("a directory");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0750")])
            .arg("tmpfs")
            .arg(dir.path())
            .status()
            .expect("mount(8)");
        assert!(
            st.success(),
            "cannot mount a tmpfs on {}",
            dir.path().display()
        );
        SmallFs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let f = self.path().join("filler");
        let mut file = std::fs::File::create(&f).expect("the filler");
        let chunk = vec![0u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        f
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn creds(job: &Job) -> (u16, Value) {
    job.credentials().expect("the endpoint answers")
}

#[test]
fn a_full_audit_disk_refuses_new_jobs_keeps_issued_credentials_and_recovers() {
    airlock_tests::prereq::require_root_and("the full-disk test (mount)", &[]);
    let fs = SmallFs::mount("512k");
    let audit = fs.path().join("audit.jsonl");
    let stack = Stack::start_with(|o| o.audit_path(&audit));
    let running = stack.job(&GithubJob::production());
    let (status, before) = creds(&running);
    assert_eq!(status, 200, "{before}");
    let key = before["AccessKeyId"].as_str().unwrap().to_string();

    let filler = fs.fill();
    // The log's last page may still hold a record or two; the first record that does not
    // fit turns the log failing, and that start is refused.
    let mut refused = None;
    for _ in 0..20 {
        if let Err(e) = stack.agent.start_job(&GithubJob::production().token()) {
            refused = Some(e);
            break;
        }
    }
    let msg = refused
        .expect("a job started whatever the audit disk held")
        .to_string();
    assert!(
        msg.contains("audit log") && msg.contains("No space left on device"),
        "{msg}"
    );
    assert!(
        msg.contains("no job starts"),
        "the error says what it means: {msg}"
    );
    // From here on nothing may reach STS (a prefetch begun before is let through first).
    std::thread::sleep(Duration::from_millis(500));
    stack.moto.start_recording().expect("moto recorder");
    // Refused again, at once, while failing.
    let again = stack
        .agent
        .start_job(&GithubJob::production().token())
        .expect_err("still refused")
        .to_string();
    assert!(
        again.contains("AuditUnavailable") || again.contains("cannot be written"),
        "{again}"
    );
    // The running job keeps its cached credentials.
    for _ in 0..5 {
        let (status, body) = creds(&running);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["AccessKeyId"], key.as_str());
    }
    // The agent says why.
    let (code, health) = stack.agent.admin_get("/healthz").expect("healthz");
    assert_eq!(code, 503, "{health}");
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "audit_failing");
    assert!(
        health["audit"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left")),
        "{health}"
    );
    let metrics = stack.agent.metrics().unwrap_or_default();
    assert!(metrics.contains("airlock_audit_failing 1"), "{metrics}");
    assert!(stack
        .agent
        .log()
        .contains("the audit log cannot be written"));
    // Nothing was minted meanwhile.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        stack
            .moto
            .assume_role_requests()
            .unwrap_or_default()
            .is_empty(),
        "STS was called while the audit could not be written"
    );

    // Space returns: the log recovers within its retry interval and says what it lacks.
    std::fs::remove_file(&filler).expect("remove the filler");
    let deadline = Instant::now() + Duration::from_secs(15);
    while stack.agent.healthz() != Some(200) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(stack.agent.healthz(), Some(200), "{}", stack.agent.log());
    let later = stack.job(&GithubJob::production());
    let (status, body) = creds(&later);
    assert_eq!(status, 200, "{body}");
    let recs = stack.agent.audit_records();
    let recovered = recs
        .iter()
        .find(|r| r["event"] == "audit_recovered")
        .expect("an audit_recovered record");
    // What was refused (the record that failed first) and the starts refused after it.
    assert!(
        recovered["refused"]
            .as_object()
            .is_some_and(|m| !m.is_empty()),
        "{recovered}"
    );
    assert!(
        recovered["lost"]["job_refused"].as_u64().unwrap_or(0) >= 1,
        "{recovered}"
    );
    // Every key any job got is in a credentials_issued record.
    for k in [&key, &body["AccessKeyId"].as_str().unwrap().to_string()] {
        assert!(
            recs.iter()
                .any(|r| r["event"] == "credentials_issued" && r["access_key_id"] == k.as_str()),
            "{k} was served without its record"
        );
    }
    let verify = stack.agent.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "{verify:?}");
}
