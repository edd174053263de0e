//! The audit log: append-only JSON lines, each record hash-chained to the one before.
//!
//! Every record carries `seq`, `time`, `event`, `prev` (the previous record's hash) and
//! `hash` = SHA-256 over `prev` and the record's canonical JSON (sorted keys, without
//! `hash`). Editing, removing or reordering a record breaks the chain, and [`verify`] says
//! where; a cut tail or a rewritten file is caught against a head kept elsewhere (the
//! agent's state directory, the journal, a remote syslog: [`head`], [`anchor`]).
//!
//! One writer thread owns the file ([`writer`]): callers hand it records and
//! [`AuditLog::append`] resolves once the record is durable (group commit: one fsync per
//! batch), so callers append *before* they hand out what the record describes, and no tokio
//! worker ever waits on a disk. If the log cannot be written (a full disk, an I/O error) the
//! log is *failing*: every append is refused until a probe record is durable again, so
//! nothing that needs a record is done meanwhile ([`AuditLog::health`] says why).
//!
//! Records a job's own actions can produce go through [`AuditLog::job_event`]: rate-limited
//! per job ([`limit`]), the dropped ones counted in `audit_dropped` records.
//!
//! The audit is a sink: the agent never reads it back to make a decision (opening it reads
//! its tail only to continue the chain and check it against the head). Records never carry
//! secrets; callers pass summaries and access key ids only.

pub mod anchor;
pub mod head;
pub mod limit;
mod writer;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub use anchor::{Anchors, SyslogTarget};
pub use head::Head;
pub use limit::JobLimit;
pub use writer::{AuditHealth, AuditStats};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The file beside the agent's state that keeps the log's last durable head.
pub const HEAD_FILE: &str = "audit-head.json";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {0}: {1}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("audit log {0} is in use by another process (is airlockd running? `airlock audit accept-head` needs it stopped)")]
    Locked(PathBuf),
    #[error("audit log {0} ends in a damaged record (line {1}): {2}; run `airlock audit verify {0}` and move the file aside to start a new chain")]
    DamagedTail(PathBuf, usize, String),
    #[error("audit log {path} cannot be written (since {since}): {reason}; nothing that needs an audit record is done until it can (the agent retries every {retry_secs} s: free space on its filesystem or fix the disk)")]
    Unwritable {
        path: PathBuf,
        since: String,
        reason: String,
        retry_secs: u64,
    },
    #[error("audit log {path}: {queued} records are waiting for the writer; this one is refused")]
    Overloaded { path: PathBuf, queued: usize },
    #[error("audit log {0} is closed (the agent is stopping)")]
    Closed(PathBuf),
    #[error(transparent)]
    Head(#[from] head::HeadError),
}

/// How [`AuditLog::open_with`] opens a log.
#[derive(Debug, Clone, Default)]
pub struct AuditOptions {
    /// Where the log's last durable head is kept (the agent's state directory), and so
    /// checked at open: a log that does not continue it is refused. `None`: no head (tools,
    /// tests).
    pub head_file: Option<PathBuf>,
    /// `false` only for `airlock audit accept-head`, which records that it accepted a log
    /// that does not continue the head (and then writes the new head).
    pub check_head: bool,
    /// Off-host copies of every record's seq and hash.
    pub anchors: Anchors,
    /// The limit of records a job's own actions produce.
    pub job_limit: JobLimit,
}

impl AuditOptions {
    /// The agent's options from its configuration.
    pub fn from_config(cfg: &crate::config::Config) -> AuditOptions {
        let a = &cfg.audit;
        AuditOptions {
            head_file: Some(cfg.agent.state_dir.join(HEAD_FILE)),
            check_head: true,
            anchors: Anchors {
                journal: a.journal.then(|| a.journal_socket.clone()),
                syslog: a
                    .syslog
                    .iter()
                    .filter_map(|s| s.parse::<SyslogTarget>().ok())
                    .collect(),
                facility: anchor::facility_code(&a.syslog_facility).unwrap_or(anchor::AUTHPRIV),
            },
            job_limit: JobLimit {
                per_second: a.job_records_per_second,
                burst: a.job_records_burst,
                summary_every: a.job_summary_interval,
            },
        }
    }
}

/// The writer side. One per agent (the file is locked while it is open).
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    writer: writer::Handle,
    shared: Arc<writer::Shared>,
}

impl AuditLog {
    /// Open (or create, mode 0600) the log and continue its chain from the last record, with
    /// no head, anchors off and the default job limit (tools and tests).
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        Self::open_with(path, AuditOptions::default())
    }

    /// Open (or create, mode 0600) and lock the log, check it against the head
    /// (`opts.head_file`), and start its writer.
    pub fn open_with(path: &Path, opts: AuditOptions) -> Result<AuditLog, AuditError> {
        let (writer, shared) = writer::start(path, opts, None, writer::RETRY)?;
        Ok(AuditLog {
            path: path.to_owned(),
            writer,
            shared,
        })
    }

    /// [`AuditLog::open_with`] on a disk that tests make slow or failing.
    #[cfg(test)]
    pub(crate) fn open_on(
        path: &Path,
        opts: AuditOptions,
        disk: writer::WrapDisk,
        retry: std::time::Duration,
    ) -> Result<AuditLog, AuditError> {
        let (writer, shared) = writer::start(path, opts, Some(disk), retry)?;
        Ok(AuditLog {
            path: path.to_owned(),
            writer,
            shared,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one record and wait (without blocking a thread) until it is durable. `fields`
    /// must not contain secrets. Returns `seq`. An error means the record is not in the log:
    /// the caller must not do what it describes.
    pub async fn append(
        &self,
        event: &str,
        job: Option<&str>,
        fields: Map<String, Value>,
    ) -> Result<u64, AuditError> {
        let rx = self.writer.enqueue(event, job, fields, true)?;
        match rx {
            Some(rx) => rx.await.unwrap_or_else(|_| Err(self.closed())),
            None => Err(self.closed()),
        }
    }

    /// [`AuditLog::append`] for threads outside the async runtime (the CLI's own records).
    /// Never call it from async code.
    pub fn append_blocking(
        &self,
        event: &str,
        job: Option<&str>,
        fields: Map<String, Value>,
    ) -> Result<u64, AuditError> {
        match self.writer.enqueue(event, job, fields, true)? {
            Some(rx) => rx.blocking_recv().unwrap_or_else(|_| Err(self.closed())),
            None => Err(self.closed()),
        }
    }

    /// Hand a record to the writer without waiting for it: for records of what has already
    /// happened (a job ended, a wipe's report). A record that cannot be written is logged and
    /// counted (`airlock_audit_write_failures_total`, and in the next `audit_recovered`).
    pub fn submit(&self, event: &str, job: Option<&str>, fields: Map<String, Value>) {
        if let Err(e) = self.writer.enqueue(event, job, fields, false) {
            self.shared.stats.write_failures.inc();
            tracing::error!(event, job, error = %e, "audit record not written");
        }
    }

    /// A record that `job`'s own actions produced (a refused endpoint request, a second
    /// bind): submitted within the job's limit ([`JobLimit`]), otherwise only counted, and
    /// the counts written in an `audit_dropped` record (at the latest every
    /// `summary_every` while the job floods, and when it ends). True when submitted.
    pub fn job_event(&self, event: &'static str, job: &str, fields: Map<String, Value>) -> bool {
        if !self.shared.limiter.admit(job, event) {
            self.shared.stats.dropped.inc();
            return false;
        }
        self.submit(event, Some(job), fields);
        true
    }

    /// The job has ended: its last `audit_dropped` record (if it had dropped records) is
    /// submitted and its limit forgotten.
    pub fn job_done(&self, job: &str) {
        if let Some(fields) = self.shared.limiter.finish(job) {
            self.submit(limit::SUMMARY_EVENT, Some(job), fields);
        }
    }

    /// Wait until every record handed over before this call is durable (or refused).
    pub async fn flush(&self) {
        if let Some(rx) = self.writer.flush() {
            let _ = rx.await;
        }
    }

    /// Whether the log can be written now, and why not.
    pub fn health(&self) -> AuditHealth {
        self.shared.health()
    }

    /// Why the log cannot be written, while it cannot.
    pub fn failing(&self) -> Option<String> {
        self.shared.failing_reason()
    }

    pub fn stats(&self) -> &AuditStats {
        &self.shared.stats
    }

    /// Write what is queued, the head file and the anchors, and stop the writer; later
    /// appends fail with [`AuditError::Closed`]. Blocks until done (call it from a
    /// blocking thread).
    pub fn close(&self) {
        self.writer.close();
    }

    fn closed(&self) -> AuditError {
        AuditError::Closed(self.path.clone())
    }
}

/// One record as its line (ending in a newline) and its hash.
pub(crate) fn render_record(
    seq: u64,
    prev: &str,
    event: &str,
    job: Option<&str>,
    fields: Map<String, Value>,
) -> (String, String) {
    let mut rec = fields;
    rec.insert("seq".into(), seq.into());
    rec.insert("time".into(), now_rfc3339().into());
    rec.insert("event".into(), event.into());
    if let Some(j) = job {
        rec.insert("job".into(), j.into());
    }
    rec.insert("prev".into(), prev.into());
    let hash = record_hash(prev, &rec);
    rec.insert("hash".into(), hash.clone().into());
    let mut line = serde_json::to_string(&rec).expect("a JSON map always serialises");
    line.push('\n');
    (line, hash)
}

pub(crate) fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(now)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// SHA-256 over the previous hash, a newline, and the record's canonical JSON (serde_json's
/// default map keeps keys sorted) without its `hash` key.
pub(crate) fn record_hash(prev: &str, rec: &Map<String, Value>) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    if rec.contains_key("hash") {
        let mut r = rec.clone();
        r.remove("hash");
        h.update(serde_json::to_vec(&r).expect("a JSON map always serialises"));
    } else {
        h.update(serde_json::to_vec(rec).expect("a JSON map always serialises"));
    }
    hex::encode(h.finalize())
}

/// What `verify` found in a good log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub last_hash: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("cannot read {0}: {1}")]
    Read(String, String),
    #[error("line {line}: {reason}")]
    Broken { line: usize, reason: String },
}

/// Check the whole chain: every line parses, `seq` counts up by one from 1, every `prev`
/// is the hash before it and every `hash` matches its record.
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    let f = File::open(path)
        .map_err(|e| VerifyError::Read(path.display().to_string(), e.to_string()))?;
    verify_reader(BufReader::new(f))
}

pub fn verify_reader(r: impl BufRead) -> Result<VerifyReport, VerifyError> {
    let mut prev = GENESIS.to_string();
    let mut n = 0u64;
    for (i, line) in r.lines().enumerate() {
        let lineno = i + 1;
        let broken = |reason: String| VerifyError::Broken {
            line: lineno,
            reason,
        };
        let line = line.map_err(|e| broken(format!("unreadable: {e}")))?;
        let rec: Map<String, Value> =
            serde_json::from_str(&line).map_err(|e| broken(format!("not a JSON record: {e}")))?;
        let seq = rec.get("seq").and_then(Value::as_u64);
        if seq != Some(n + 1) {
            return Err(broken(format!(
                "expected seq {}, found {} (a record was removed, inserted or reordered)",
                n + 1,
                seq.map_or("none".into(), |s| s.to_string())
            )));
        }
        let rprev = rec.get("prev").and_then(Value::as_str).unwrap_or_default();
        if rprev != prev {
            return Err(broken(
                "prev does not match the hash of the record before (a record was removed or reordered)".into(),
            ));
        }
        let hash = rec.get("hash").and_then(Value::as_str).unwrap_or_default();
        if record_hash(&prev, &rec) != hash {
            return Err(broken(
                "hash does not match the record's content (the record was edited)".into(),
            ));
        }
        prev = hash.to_string();
        n += 1;
    }
    Ok(VerifyReport {
        records: n,
        last_hash: prev,
    })
}

/// Which records `airlock audit query` prints.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub repository: Option<String>,
    pub role: Option<String>,
    pub job: Option<String>,
    pub event: Option<String>,
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
}

impl Filter {
    pub fn matches(&self, rec: &Map<String, Value>) -> bool {
        let s = |k: &str| rec.get(k).and_then(Value::as_str);
        let contains = |k: &str, want: &Option<String>| match want {
            None => true,
            Some(w) => s(k).is_some_and(|v| v == w || v.contains(w.as_str())),
        };
        if !contains("repository", &self.repository)
            || !contains("job", &self.job)
            || !contains("event", &self.event)
        {
            return false;
        }
        if let Some(role) = &self.role {
            let hit = ["role_arn", "alias"]
                .iter()
                .any(|k| s(k).is_some_and(|v| v == role || v.ends_with(&format!("/{role}"))));
            if !hit {
                return false;
            }
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(t) = s("time").and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok()) else {
                return false;
            };
            if self.since.is_some_and(|since| t < since) || self.until.is_some_and(|u| t > u) {
                return false;
            }
        }
        true
    }
}

/// Records of the log that match `filter`, in order. Unparseable lines are skipped here
/// (`verify` is the tool that reports them).
pub fn query(path: &Path, filter: &Filter) -> Result<Vec<Map<String, Value>>, VerifyError> {
    let f = File::open(path)
        .map_err(|e| VerifyError::Read(path.display().to_string(), e.to_string()))?;
    Ok(query_reader(BufReader::new(f), filter))
}

/// [`query`] of a log already open: the records of `r` that match `filter`, in order.
pub fn query_reader(r: impl BufRead, filter: &Filter) -> Vec<Map<String, Value>> {
    r.lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<Map<String, Value>>(&l).ok())
        .filter(|r| filter.matches(r))
        .collect()
}

/// Build a field map: `fields!{"role_arn" => arn, "duration" => 3600}`.
#[macro_export]
macro_rules! fields {
    ($($k:expr => $v:expr),* $(,)?) => {{
        #[allow(unused_mut)]
        let mut m = ::serde_json::Map::new();
        $( m.insert(($k).to_string(), ::serde_json::json!($v)); )*
        m
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn log_with(n: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..n {
            log.append_blocking(
                "job_started",
                Some(&format!("j-{i}")),
                fields! {"repository" => "acme/web"},
            )
            .unwrap();
        }
        (dir, path)
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn write(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    #[test]
    fn a_good_chain_verifies_and_continues_after_reopen() {
        let (_d, path) = log_with(3);
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(
            log.append_blocking("job_ended", Some("j-0"), Map::new())
                .unwrap(),
            4
        );
        let rep = verify(&path).unwrap();
        assert_eq!(rep.records, 4);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn an_edited_record_is_caught() {
        let (_d, path) = log_with(3);
        let mut l = lines(&path);
        l[1] = l[1].replace("acme/web", "acme/evil");
        write(&path, &l);
        let err = verify(&path).unwrap_err();
        assert!(
            matches!(&err, VerifyError::Broken { line: 2, reason } if reason.contains("edited")),
            "{err}"
        );
    }

    #[test]
    fn a_removed_record_is_caught() {
        let (_d, path) = log_with(3);
        let mut l = lines(&path);
        l.remove(1);
        write(&path, &l);
        let err = verify(&path).unwrap_err();
        assert!(matches!(err, VerifyError::Broken { line: 2, .. }), "{err}");
    }

    #[test]
    fn reordered_records_are_caught() {
        let (_d, path) = log_with(3);
        let mut l = lines(&path);
        l.swap(0, 1);
        write(&path, &l);
        assert!(matches!(
            verify(&path).unwrap_err(),
            VerifyError::Broken { line: 1, .. }
        ));
    }

    #[test]
    fn a_rewritten_seq_with_recomputed_hash_still_breaks_the_next_prev() {
        let (_d, path) = log_with(3);
        let mut l = lines(&path);
        // The attacker edits record 2 and recomputes its own hash, but record 3 still points
        // at the old one.
        let mut rec: Map<String, Value> = serde_json::from_str(&l[1]).unwrap();
        rec.insert("repository".into(), "acme/evil".into());
        let prev = rec["prev"].as_str().unwrap().to_string();
        let h = record_hash(&prev, &rec);
        rec.insert("hash".into(), h.into());
        l[1] = serde_json::to_string(&rec).unwrap();
        write(&path, &l);
        assert!(matches!(
            verify(&path).unwrap_err(),
            VerifyError::Broken { line: 3, .. }
        ));
    }

    #[test]
    fn an_incomplete_last_line_is_cut_off_and_recorded() {
        let (_d, path) = log_with(2);
        let mut text = std::fs::read_to_string(&path).unwrap();
        let partial = "{\"seq\":3,\"event\":\"job_sta";
        text.push_str(partial);
        std::fs::write(&path, &text).unwrap();
        let log = AuditLog::open(&path).unwrap();
        log.append_blocking("job_ended", Some("j-0"), Map::new())
            .unwrap();
        log.close();
        let rep = verify(&path).unwrap();
        assert_eq!(rep.records, 4);
        let recs = query(&path, &Filter::default()).unwrap();
        assert_eq!(recs[2]["event"], "audit_tail_repaired");
        assert_eq!(recs[2]["bytes"], partial.len());
    }

    #[test]
    fn a_second_writer_is_refused_while_the_log_is_open() {
        let (_d, path) = log_with(1);
        let log = AuditLog::open(&path).unwrap();
        let err = AuditLog::open(&path).unwrap_err();
        assert!(matches!(err, AuditError::Locked(_)), "{err}");
        drop(log);
        assert!(AuditLog::open(&path).is_ok());
    }

    #[test]
    fn opening_a_log_with_a_damaged_tail_fails_closed() {
        let (_d, path) = log_with(2);
        let mut l = lines(&path);
        l[1] = l[1].replace("acme/web", "acme/evil");
        write(&path, &l);
        let err = AuditLog::open(&path).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
    }

    #[test]
    fn query_filters_by_repository_role_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let log = AuditLog::open(&path).unwrap();
        log.append_blocking(
            "credentials_issued",
            Some("j-1"),
            fields! {"repository" => "acme/web", "role_arn" => "arn:aws:iam::1:role/deploy"},
        )
        .unwrap();
        log.append_blocking(
            "credentials_issued",
            Some("j-2"),
            fields! {"repository" => "acme/api", "role_arn" => "arn:aws:iam::1:role/read"},
        )
        .unwrap();
        let f = Filter {
            role: Some("deploy".into()),
            ..Default::default()
        };
        let hits = query(&path, &f).unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0]["job"], "j-1");
        let f = Filter {
            repository: Some("acme/api".into()),
            ..Default::default()
        };
        assert_eq!(query(&path, &f).unwrap()[0]["job"], "j-2");
        let f = Filter {
            since: Some(OffsetDateTime::now_utc() + time::Duration::hours(1)),
            ..Default::default()
        };
        assert!(query(&path, &f).unwrap().is_empty());
    }
}
