//! The audit log: append-only JSON lines, each record hash-chained to the one before.
//!
//! Every record carries `seq`, `time`, `event`, `prev` (the previous record's hash) and
//! `hash` = SHA-256 over `prev` and the record's canonical JSON (sorted keys, without
//! `hash`). Editing, removing or reordering a record breaks the chain, and
//! [`verify`] says where. A record is written and fsynced before [`AuditLog::append`]
//! returns, so callers append *before* they hand out what the record describes: if the
//! audit cannot be written, nothing is issued.
//!
//! The audit is a sink: the agent never reads it back to make a decision. Records never
//! carry secrets; callers pass summaries and access key ids only.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("cannot write audit log {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("audit log {0} ends in a damaged record (line {1}): {2}; run `airlock audit verify {0}` and move the file aside to start a new chain")]
    DamagedTail(PathBuf, usize, String),
}

#[derive(Debug)]
struct Head {
    file: File,
    seq: u64,
    prev: String,
}

/// The writer side. One per agent; appends are serialised by a mutex.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    head: Mutex<Head>,
}

impl AuditLog {
    /// Open (or create, mode 0600) the log and continue its chain from the last record.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|e| AuditError::Open(path.into(), e))?;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750));
            }
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| AuditError::Open(path.into(), e))?;
        let (seq, prev) = last_record(&mut file, path)?;
        Ok(AuditLog {
            path: path.to_owned(),
            head: Mutex::new(Head { file, seq, prev }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one record and fsync it. `fields` must not contain secrets. Returns `seq`.
    pub fn append(
        &self,
        event: &str,
        job: Option<&str>,
        fields: Map<String, Value>,
    ) -> Result<u64, AuditError> {
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        let seq = head.seq + 1;
        let mut rec = fields;
        rec.insert("seq".into(), seq.into());
        rec.insert("time".into(), now_rfc3339().into());
        rec.insert("event".into(), event.into());
        if let Some(j) = job {
            rec.insert("job".into(), j.into());
        }
        rec.insert("prev".into(), head.prev.clone().into());
        let hash = record_hash(&head.prev, &rec);
        rec.insert("hash".into(), hash.clone().into());
        let mut line = serde_json::to_string(&rec).expect("a JSON map always serialises");
        line.push('\n');
        let res = head
            .file
            .write_all(line.as_bytes())
            .and_then(|()| head.file.sync_data());
        res.map_err(|e| AuditError::Write(self.path.clone(), e))?;
        head.seq = seq;
        head.prev = hash;
        Ok(seq)
    }
}

fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(now)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// SHA-256 over the previous hash, a newline, and the record's canonical JSON (serde_json's
/// default map keeps keys sorted) without its `hash` key.
fn record_hash(prev: &str, rec: &Map<String, Value>) -> String {
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

/// Sequence number and hash of the last record, reading only the file's tail.
fn last_record(file: &mut File, path: &Path) -> Result<(u64, String), AuditError> {
    let len = file
        .seek(SeekFrom::End(0))
        .map_err(|e| AuditError::Open(path.into(), e))?;
    if len == 0 {
        return Ok((0, GENESIS.to_string()));
    }
    let start = len.saturating_sub(256 * 1024);
    file.seek(SeekFrom::Start(start))
        .map_err(|e| AuditError::Open(path.into(), e))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)
        .map_err(|e| AuditError::Open(path.into(), e))?;
    let text = String::from_utf8_lossy(&tail);
    let damaged = |why: String| AuditError::DamagedTail(path.into(), 0, why);
    if !text.ends_with('\n') {
        return Err(damaged("the last line is incomplete".into()));
    }
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
    Ok((seq, hash.to_string()))
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

    fn log_with(n: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..n {
            log.append(
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
        assert_eq!(log.append("job_ended", Some("j-0"), Map::new()).unwrap(), 4);
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
        log.append(
            "credentials_issued",
            Some("j-1"),
            fields! {"repository" => "acme/web", "role_arn" => "arn:aws:iam::1:role/deploy"},
        )
        .unwrap();
        log.append(
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
