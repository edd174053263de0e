//! The audit writer: one thread owns the log file and appends what callers hand it, in
//! batches (group commit): everything that arrived while the last fsync ran goes in one
//! write and one fsync, then every caller of the batch is answered and the anchors get each
//! record's seq and hash.
//!
//! When a write or an fsync fails (a full disk, an I/O error) the batch is cut off the file
//! again, its callers are refused, and the log is *failing*: every later record is refused
//! (and counted) until a probe record, `audit_recovered`, tried every [`RETRY`], is durable.
//! That record names the outage and counts what was not written, so the chain says what it
//! lacks.
//!
//! Must never: answer a caller before its record is durable, leave part of a batch in the
//! file, run on (or be waited for by) a tokio worker, or let its queue grow without bound.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::anchor::{self, AnchorHandle};
use super::head;
use super::limit::{self, Limiter};
use super::{record_hash, render_record, AuditError, AuditOptions, GENESIS};

/// Records in one batch at most (one write, one fsync).
const MAX_BATCH: usize = 1024;
/// Records waiting for the writer at most; beyond, appends are refused rather than memory
/// growing (the per-job limit keeps jobs far below it).
const MAX_QUEUED: usize = 65_536;
/// While the log is failing, a probe record is tried this often.
pub const RETRY: Duration = Duration::from_secs(5);
/// The writer wakes at least this often (summaries due, probes).
const TICK: Duration = Duration::from_millis(250);
/// How much of the file's end is read at open to find the last record.
const TAIL: u64 = 256 * 1024;

/// The file as the writer uses it; a seam for tests that make the disk slow or fail.
pub(crate) trait Disk: Send {
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
    /// Cut the file back to `len` bytes (a batch that was not written whole).
    fn truncate(&mut self, len: u64) -> std::io::Result<()>;
}

impl Disk for File {
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.write_all(buf)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_data()
    }
    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)?;
        self.sync_data()
    }
}

/// Puts a test's disk around the log file.
pub(crate) type WrapDisk = Box<dyn FnOnce(File) -> Box<dyn Disk>>;

/// The audit's counters, registered by `metrics` as `airlock_audit_*`.
#[derive(Debug, Clone, Default)]
pub struct AuditStats {
    /// Records made durable.
    pub records: Counter,
    /// Batches written (one fsync each).
    pub batches: Counter,
    /// Records not written (refused while failing, or lost to a write error).
    pub write_failures: Counter,
    /// Job records over their job's limit (counted in `audit_dropped`).
    pub dropped: Counter,
    /// Anchors (journal, syslog, head file) that could not be sent or written.
    pub anchor_failures: Counter,
    /// 1 while the log cannot be written.
    pub failing: Gauge,
    /// The last durable record's seq.
    pub seq: Gauge,
}

/// The log's state, for `/healthz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditHealth {
    pub status: &'static str,
    pub path: PathBuf,
    /// The last durable record.
    pub seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AuditHealth {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// What callers and the writer share.
#[derive(Debug)]
pub(crate) struct Shared {
    path: PathBuf,
    queued: AtomicUsize,
    /// `(since, why)` while the log is failing.
    failure: Mutex<Option<(String, String)>>,
    pub(crate) stats: AuditStats,
    pub(crate) limiter: Limiter,
}

impl Shared {
    fn failure(&self) -> Option<(String, String)> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_failure(&self, f: Option<(String, String)>) {
        self.stats.failing.set(i64::from(f.is_some()));
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    pub(crate) fn failing_reason(&self) -> Option<String> {
        self.failure().map(|(since, why)| {
            format!(
                "the audit log {} cannot be written (since {since}): {why}",
                self.path.display()
            )
        })
    }

    pub(crate) fn health(&self) -> AuditHealth {
        let f = self.failure();
        AuditHealth {
            status: if f.is_some() { "failing" } else { "ok" },
            path: self.path.clone(),
            seq: u64::try_from(self.stats.seq.get()).unwrap_or(0),
            since: f.as_ref().map(|(s, _)| s.clone()),
            error: f.map(|(_, w)| w),
        }
    }

    fn unwritable(&self) -> AuditError {
        let (since, reason) = self
            .failure()
            .unwrap_or_else(|| (super::now_rfc3339(), "write failed".into()));
        AuditError::Unwritable {
            path: self.path.clone(),
            since,
            reason,
            retry_secs: RETRY.as_secs(),
        }
    }
}

type Reply = oneshot::Sender<Result<u64, AuditError>>;

pub(crate) struct Pending {
    event: String,
    job: Option<String>,
    fields: Map<String, Value>,
    /// `None`: submitted, nobody waits.
    reply: Option<Reply>,
}

pub(crate) enum Msg {
    Record(Pending),
    Flush(oneshot::Sender<()>),
    Shutdown,
}

/// The callers' side: a queue to the writer thread.
#[derive(Debug)]
pub(crate) struct Handle {
    tx: mpsc::Sender<Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
}

impl Handle {
    /// Queue a record; with `wait`, the receiver answers once it is durable (or refused).
    pub(crate) fn enqueue(
        &self,
        event: &str,
        job: Option<&str>,
        fields: Map<String, Value>,
        wait: bool,
    ) -> Result<Option<oneshot::Receiver<Result<u64, AuditError>>>, AuditError> {
        let queued = self.shared.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= MAX_QUEUED {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            self.shared.stats.write_failures.inc();
            return Err(AuditError::Overloaded {
                path: self.shared.path.clone(),
                queued,
            });
        }
        let (reply, rx) = if wait {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let p = Pending {
            event: event.to_string(),
            job: job.map(str::to_string),
            fields,
            reply,
        };
        if self.tx.send(Msg::Record(p)).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(AuditError::Closed(self.shared.path.clone()));
        }
        Ok(rx)
    }

    pub(crate) fn flush(&self) -> Option<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Flush(tx)).ok().map(|()| rx)
    }

    pub(crate) fn close(&self) {
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            let _ = self.tx.send(Msg::Shutdown);
            let _ = t.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.close();
    }
}

/// Open the log and start its writer (and its anchors).
pub(crate) fn start(
    path: &Path,
    opts: AuditOptions,
    disk: Option<WrapDisk>,
    retry: Duration,
) -> Result<(Handle, Arc<Shared>), AuditError> {
    let (file, len, seq, prev, repaired) = open_file(path)?;
    let mut first = Vec::new();
    if repaired > 0 {
        // A batch cut short by a crash: its callers were never answered, so nothing was
        // done on its records; they are removed, and that is recorded.
        tracing::warn!(path = %path.display(), bytes = repaired, "audit log ended in an incomplete record (a crash mid-write); removed it");
        first.push(("audit_tail_repaired", crate::fields! {"bytes" => repaired}));
    }
    let log_head = head::Head {
        seq,
        hash: prev.clone(),
    };
    // `accept-head` (no check) reads the head itself, whatever state it is in.
    if let (Some(hf), true) = (&opts.head_file, opts.check_head) {
        match head::read_head_file(hf)? {
            Some(h) => {
                if let Err(mismatch) = head::check_log(path, &h, &log_head) {
                    let err = head::HeadError::Mismatch(Box::new(head::Mismatch {
                        log: path.to_owned(),
                        head_file: hf.clone(),
                        head: h.clone(),
                        log_head: log_head.clone(),
                        detail: mismatch,
                    }));
                    tracing::error!(head = %h, log_head = %log_head, "{err}");
                    anchor::notify_mismatch(&opts.anchors, path, &h, &log_head, &err.to_string());
                    return Err(err.into());
                }
            }
            None if seq > 0 => {
                tracing::warn!(head_file = %hf.display(), "no audit head was kept for this log (first start of this version, or the file was removed): it is taken as it is");
                first.push((
                    "audit_head_created",
                    crate::fields! {
                        "head_file" => hf.display().to_string(),
                        "log_head" => serde_json::json!({"seq": seq, "hash": prev}),
                    },
                ));
            }
            None => {}
        }
    }
    let stats = AuditStats::default();
    stats.seq.set(i64::try_from(seq).unwrap_or(i64::MAX));
    let shared = Arc::new(Shared {
        path: path.to_owned(),
        queued: AtomicUsize::new(0),
        failure: Mutex::new(None),
        stats,
        limiter: Limiter::new(opts.job_limit),
    });
    let anchors = anchor::start(
        opts.anchors.clone(),
        opts.head_file.clone(),
        path,
        shared.stats.anchor_failures.clone(),
    )
    .map_err(|e| AuditError::Open(path.to_owned(), e))?;
    let disk: Box<dyn Disk> = match disk {
        Some(wrap) => wrap(file),
        None => Box::new(file),
    };
    let writer = Writer {
        shared: shared.clone(),
        disk,
        len,
        seq,
        prev,
        anchors,
        outage: None,
        retry,
    };
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || writer.run(rx))
        .map_err(|e| AuditError::Open(path.to_owned(), e))?;
    let handle = Handle {
        tx,
        thread: Mutex::new(Some(thread)),
        shared: shared.clone(),
    };
    for (event, fields) in first {
        handle.enqueue(event, None, fields, false)?;
    }
    Ok((handle, shared))
}

/// Open (or create, 0600, in a 0750 directory) and lock the log; find its last record. An
/// incomplete last line (a crash mid-batch) is cut off. Returns the file, its length, the
/// last seq and hash, and how many bytes were cut.
fn open_file(path: &Path) -> Result<(File, u64, u64, String, u64), AuditError> {
    let open_err = |e| AuditError::Open(path.to_owned(), e);
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(open_err)?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750));
        }
    }
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(open_err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(AuditError::Locked(path.into())),
        Err(std::fs::TryLockError::Error(e)) => return Err(open_err(e)),
    }
    let mut len = file.seek(SeekFrom::End(0)).map_err(open_err)?;
    if len == 0 {
        return Ok((file, 0, 0, GENESIS.to_string(), 0));
    }
    let start = len.saturating_sub(TAIL);
    file.seek(SeekFrom::Start(start)).map_err(open_err)?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).map_err(open_err)?;
    let damaged = |why: String| AuditError::DamagedTail(path.into(), 0, why);
    let mut repaired = 0;
    if tail.last() != Some(&b'\n') {
        let keep = match tail.iter().rposition(|b| *b == b'\n') {
            Some(i) => start + i as u64 + 1,
            None if start == 0 => 0,
            None => return Err(damaged("the last line is incomplete and too long".into())),
        };
        file.set_len(keep)
            .and_then(|()| file.sync_data())
            .map_err(open_err)?;
        repaired = len - keep;
        tail.truncate((keep - start) as usize);
        len = keep;
        if len == 0 {
            return Ok((file, 0, 0, GENESIS.to_string(), repaired));
        }
    }
    let text = String::from_utf8_lossy(&tail);
    let last = text
        .trim_end_matches('\n')
        .rsplit('\n')
        .next()
        .unwrap_or_default();
    let rec: Map<String, Value> =
        serde_json::from_str(last).map_err(|e| damaged(format!("not JSON: {e}")))?;
    let seq = rec
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or_else(|| damaged("no seq".into()))?;
    let hash = rec
        .get("hash")
        .and_then(Value::as_str)
        .ok_or_else(|| damaged("no hash".into()))?;
    let prev = rec.get("prev").and_then(Value::as_str).unwrap_or_default();
    if record_hash(prev, &rec) != hash {
        return Err(AuditError::DamagedTail(
            path.into(),
            seq as usize,
            "its hash does not match its content".into(),
        ));
    }
    Ok((file, len, seq, hash.to_string(), repaired))
}

/// What was not written during an outage, reported by `audit_recovered`.
struct Outage {
    since: String,
    error: String,
    /// Records whose callers were refused (what they describe was not done).
    refused: BTreeMap<String, u64>,
    /// Submitted records lost (what they describe had already happened).
    lost: BTreeMap<String, u64>,
    next_probe: Instant,
}

struct Writer {
    shared: Arc<Shared>,
    disk: Box<dyn Disk>,
    /// The file's length up to the last durable record.
    len: u64,
    seq: u64,
    prev: String,
    anchors: AnchorHandle,
    outage: Option<Outage>,
    /// How often a probe is tried while failing ([`RETRY`]).
    retry: Duration,
}

struct Written {
    reply: Option<Reply>,
    seq: u64,
    hash: String,
    event: String,
    job: Option<String>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut open = true;
        while open {
            match rx.recv_timeout(TICK) {
                Ok(first) => {
                    let mut batch = Vec::new();
                    let mut flushes = Vec::new();
                    let mut next = Some(first);
                    while let Some(m) = next.take() {
                        match m {
                            Msg::Record(p) => {
                                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                                batch.push(p);
                            }
                            Msg::Flush(f) => flushes.push(f),
                            Msg::Shutdown => {
                                open = false;
                                break;
                            }
                        }
                        if batch.len() >= MAX_BATCH {
                            break;
                        }
                        next = rx.try_recv().ok();
                    }
                    self.commit(batch);
                    for f in flushes {
                        let _ = f.send(());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
            self.housekeeping(Instant::now());
        }
        // Whatever the jobs still had to report, then the final head to the anchors.
        let rest = self.shared.limiter.drain();
        self.commit(summaries(rest));
        self.anchors.close(self.seq, &self.prev);
    }

    fn housekeeping(&mut self, now: Instant) {
        if let Some(o) = &self.outage {
            if now >= o.next_probe {
                self.probe(now);
            }
            // Summaries wait in the limiter until the log is back.
            return;
        }
        let due = self.shared.limiter.due(now);
        if !due.is_empty() {
            self.commit(summaries(due));
        }
    }

    /// Write the batch with one write and one fsync, then answer its callers.
    fn commit(&mut self, batch: Vec<Pending>) {
        if batch.is_empty() {
            return;
        }
        if self.outage.is_some() {
            for p in batch {
                self.not_written(p.event, p.reply);
            }
            return;
        }
        let mut buf = Vec::with_capacity(batch.len() * 512);
        let (mut seq, mut prev) = (self.seq, self.prev.clone());
        let mut written = Vec::with_capacity(batch.len());
        for p in batch {
            seq += 1;
            let (line, hash) = render_record(seq, &prev, &p.event, p.job.as_deref(), p.fields);
            buf.extend_from_slice(line.as_bytes());
            prev.clone_from(&hash);
            written.push(Written {
                reply: p.reply,
                seq,
                hash,
                event: p.event,
                job: p.job,
            });
        }
        match self.disk.append(&buf).and_then(|()| self.disk.sync()) {
            Ok(()) => {
                self.len += buf.len() as u64;
                self.seq = seq;
                self.prev = prev;
                self.shared.stats.batches.inc();
                self.shared.stats.records.inc_by(written.len() as u64);
                self.shared
                    .stats
                    .seq
                    .set(i64::try_from(seq).unwrap_or(i64::MAX));
                for w in written {
                    if let Some(r) = w.reply {
                        let _ = r.send(Ok(w.seq));
                    }
                    self.anchors
                        .record(w.seq, &w.hash, &w.event, w.job.as_deref());
                }
            }
            Err(e) => {
                // Whatever part of the batch reached the file goes again, so the chain
                // stays whole at the last durable record.
                if let Err(t) = self.disk.truncate(self.len) {
                    tracing::error!(error = %t, "cannot cut a failed audit batch off the log; the probe retries");
                }
                self.start_outage(&e);
                for w in written {
                    self.not_written(w.event, w.reply);
                }
            }
        }
    }

    fn start_outage(&mut self, e: &std::io::Error) {
        let since = super::now_rfc3339();
        let error = e.to_string();
        tracing::error!(path = %self.shared.path.display(), error = %error, retry_secs = self.retry.as_secs(), "the audit log cannot be written: no job starts and nothing is issued until it can; jobs keep what they were already issued");
        self.shared
            .set_failure(Some((since.clone(), error.clone())));
        self.outage = Some(Outage {
            since,
            error,
            refused: BTreeMap::new(),
            lost: BTreeMap::new(),
            next_probe: Instant::now() + self.retry,
        });
    }

    fn not_written(&mut self, event: String, reply: Option<Reply>) {
        self.shared.stats.write_failures.inc();
        let Some(o) = self.outage.as_mut() else {
            return;
        };
        match reply {
            Some(r) => {
                *o.refused.entry(event).or_insert(0) += 1;
                let _ = r.send(Err(self.shared.unwritable()));
            }
            None => *o.lost.entry(event).or_insert(0) += 1,
        }
    }

    /// Try to end the outage: cut the file back to its last durable record and make
    /// `audit_recovered` durable.
    fn probe(&mut self, now: Instant) {
        let Some(o) = self.outage.as_mut() else {
            return;
        };
        let map = |m: &BTreeMap<String, u64>| -> Map<String, Value> {
            m.iter().map(|(k, v)| (k.clone(), (*v).into())).collect()
        };
        let fields = crate::fields! {
            "since" => o.since,
            "error" => o.error,
            "refused" => map(&o.refused),
            "lost" => map(&o.lost),
        };
        let seq = self.seq + 1;
        let (line, hash) = render_record(seq, &self.prev, "audit_recovered", None, fields);
        let res = self
            .disk
            .truncate(self.len)
            .and_then(|()| self.disk.append(line.as_bytes()))
            .and_then(|()| self.disk.sync());
        match res {
            Ok(()) => {
                tracing::info!(path = %self.shared.path.display(), since = %o.since, "the audit log can be written again");
                self.outage = None;
                self.len += line.len() as u64;
                self.seq = seq;
                self.prev.clone_from(&hash);
                self.shared.set_failure(None);
                self.shared.stats.batches.inc();
                self.shared.stats.records.inc();
                self.shared
                    .stats
                    .seq
                    .set(i64::try_from(seq).unwrap_or(i64::MAX));
                self.anchors.record(seq, &hash, "audit_recovered", None);
            }
            Err(e) => {
                tracing::warn!(error = %e, "the audit log still cannot be written");
                o.next_probe = now + self.retry;
            }
        }
    }
}

fn summaries(due: Vec<(String, Map<String, Value>)>) -> Vec<Pending> {
    due.into_iter()
        .map(|(job, fields)| Pending {
            event: limit::SUMMARY_EVENT.into(),
            job: Some(job),
            fields,
            reply: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{verify, AuditLog};
    use std::sync::atomic::{AtomicBool, AtomicU64};

    /// A real file whose fsync takes `delay_ms` and whose writes fail with ENOSPC (after
    /// writing half the batch) while `full` is set; it counts fsyncs and knows how many bytes
    /// the last fsync made durable.
    #[derive(Default)]
    struct Ctl {
        delay_ms: AtomicU64,
        full: AtomicBool,
        syncs: AtomicU64,
        durable: AtomicU64,
    }

    struct TestDisk {
        file: File,
        ctl: Arc<Ctl>,
    }

    impl Disk for TestDisk {
        fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
            if self.ctl.full.load(Ordering::SeqCst) {
                self.file.write_all(&buf[..buf.len() / 2])?;
                return Err(std::io::Error::from_raw_os_error(28));
            }
            self.file.write_all(buf)
        }
        fn sync(&mut self) -> std::io::Result<()> {
            std::thread::sleep(Duration::from_millis(
                self.ctl.delay_ms.load(Ordering::SeqCst),
            ));
            self.file.sync_data()?;
            self.ctl.syncs.fetch_add(1, Ordering::SeqCst);
            let len = self.file.metadata()?.len();
            self.ctl.durable.store(len, Ordering::SeqCst);
            Ok(())
        }
        fn truncate(&mut self, len: u64) -> std::io::Result<()> {
            self.file.set_len(len)
        }
    }

    fn open(path: &Path, ctl: &Arc<Ctl>, retry: Duration) -> AuditLog {
        let c = ctl.clone();
        AuditLog::open_on(
            path,
            AuditOptions::default(),
            Box::new(move |file| Box::new(TestDisk { file, ctl: c })),
            retry,
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_share_fsyncs_and_each_is_durable_before_its_caller_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let ctl = Arc::new(Ctl::default());
        ctl.delay_ms.store(3, Ordering::SeqCst);
        let log = Arc::new(open(&path, &ctl, RETRY));
        let n = 400;
        let mut tasks = Vec::new();
        for i in 0..n {
            let (log, ctl, path) = (log.clone(), ctl.clone(), path.clone());
            tasks.push(tokio::spawn(async move {
                let seq = log
                    .append("job_started", Some(&format!("j-{i}")), Map::new())
                    .await
                    .unwrap();
                // What the last completed fsync covered already holds this record.
                let durable = ctl.durable.load(Ordering::SeqCst) as usize;
                let text = std::fs::read(&path).unwrap();
                let synced = String::from_utf8_lossy(&text[..durable.min(text.len())]).into_owned();
                assert!(
                    synced.contains(&format!("\"seq\":{seq},")),
                    "record {seq} was answered before an fsync covered it"
                );
                seq
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>());
        let syncs = ctl.syncs.load(Ordering::SeqCst);
        assert!(
            syncs < n as u64 / 2,
            "{syncs} fsyncs for {n} records: no group commit"
        );
        assert_eq!(log.stats().batches.get(), syncs);
        assert_eq!(log.stats().records.get(), n as u64);
        log.close();
        assert_eq!(verify(&path).unwrap().records, n as u64);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_fsync_never_stalls_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = Arc::new(Ctl::default());
        ctl.delay_ms.store(200, Ordering::SeqCst);
        let log = open(&dir.path().join("a.jsonl"), &ctl, RETRY);
        let ticks = Arc::new(AtomicU64::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                t.fetch_add(1, Ordering::SeqCst);
            }
        });
        log.append("job_started", Some("j-1"), Map::new())
            .await
            .unwrap();
        ticker.abort();
        // On one thread: had the append blocked it for its 200 ms fsync, nothing else ran.
        let n = ticks.load(Ordering::SeqCst);
        assert!(n >= 10, "only {n} ticks of 5 ms ran during a 200 ms fsync");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_refuses_every_record_until_a_probe_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let ctl = Arc::new(Ctl::default());
        let log = open(&path, &ctl, Duration::from_millis(300));
        log.append("job_started", Some("j-1"), Map::new())
            .await
            .unwrap();
        log.flush().await;
        let before = std::fs::read(&path).unwrap();
        ctl.full.store(true, Ordering::SeqCst);
        let err = log
            .append("job_started", Some("j-2"), Map::new())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("No space left on device"), "{err}");
        assert!(err.contains("cannot be written"), "{err}");
        // The half-written batch was cut off again: the file is what it was.
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(!log.health().ok());
        assert_eq!(log.stats().failing.get(), 1);
        // Refused at once while failing, and counted: refused (waited) and lost (submitted).
        log.submit("job_ended", Some("j-1"), Map::new());
        ctl.full.store(false, Ordering::SeqCst);
        let err = log
            .append("credentials_issued", Some("j-1"), Map::new())
            .await;
        assert!(err.is_err(), "refused until the probe succeeds");
        // Within the retry interval the probe makes the log writable again.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !log.health().ok() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(log.health().ok(), "{:?}", log.health());
        let seq = log
            .append("job_started", Some("j-3"), Map::new())
            .await
            .unwrap();
        assert_eq!(seq, 3, "1: j-1, 2: audit_recovered, 3: j-3");
        log.close();
        assert_eq!(verify(&path).unwrap().records, 3);
        let recs = crate::audit::query(&path, &crate::audit::Filter::default()).unwrap();
        let r = &recs[1];
        assert_eq!(r["event"], "audit_recovered");
        assert_eq!(r["refused"]["job_started"], 1);
        assert_eq!(r["refused"]["credentials_issued"], 1);
        assert_eq!(r["lost"]["job_ended"], 1);
        assert!(r["error"].as_str().unwrap().contains("No space left"));
        assert_eq!(log.stats().write_failures.get(), 3);
    }

    #[tokio::test]
    async fn a_jobs_flood_is_cut_to_its_limit_and_summarised_when_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let burst = crate::audit::JobLimit::default().burst as usize;
        let written = (0..1000)
            .filter(|_| log.job_event("bind_refused", "j-1", Map::new()))
            .count();
        assert!((burst..=burst + 1).contains(&written), "{written}");
        assert!(log.job_event("token_rejected", "j-2", Map::new()));
        log.job_done("j-1");
        log.close();
        let recs = crate::audit::query(&path, &crate::audit::Filter::default()).unwrap();
        assert_eq!(recs.len(), written + 2);
        let s = recs.last().unwrap();
        assert_eq!(s["event"], "audit_dropped");
        assert_eq!(s["job"], "j-1");
        assert_eq!(s["dropped"]["bind_refused"], 1000 - written);
        assert_eq!(s["job_ended"], true);
        assert_eq!(log.stats().dropped.get(), (1000 - written) as u64);
    }
}
