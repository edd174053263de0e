//! The log's head (`seq` and `hash` of its last durable record) kept outside the log: in the
//! agent's state directory (written by the anchor thread), and read back from the journal.
//! A log that does not reach the head, or whose record at the head's seq has another hash,
//! was cut or rewritten: the agent refuses to continue it and `airlock audit verify --head`
//! says so, until an operator accepts it ([`accept`], itself the first record of what follows).
//!
//! Owns the head file's format, the check of a log against a head, and reading the newest
//! anchor back from the journal; it never writes the log except through [`accept`], and never
//! repairs one.

use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{record_hash, AuditError, AuditLog, AuditOptions, GENESIS};

/// Where journalctl lives on Debian, Ubuntu, Fedora and RHEL (never looked up on `PATH`).
pub const JOURNALCTL: &str = "/usr/bin/journalctl";

/// A record's place in the chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq {} hash {}", self.seq, self.hash)
    }
}

impl std::str::FromStr for Head {
    type Err = String;
    /// `SEQ:HASH`, as `airlock audit verify --head` takes it.
    fn from_str(s: &str) -> Result<Head, String> {
        let (seq, hash) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not SEQ:HASH"))?;
        let seq: u64 = seq
            .trim()
            .parse()
            .map_err(|_| format!("{seq:?} is not a record number"))?;
        let hash = hash.trim().to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{hash:?} is not a SHA-256 hash (64 hex digits)"));
        }
        Ok(Head { seq, hash })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("cannot read the audit head {0}: {1}; if the log is intact (`airlock audit verify`), `airlock audit accept-head` writes a new head")]
    Read(PathBuf, String),
    #[error("{0}")]
    Mismatch(Box<Mismatch>),
    #[error("audit log {log} is not intact ({detail}): it cannot be accepted as it is; move it aside (keep it as evidence) and accept the empty log that replaces it")]
    NotIntact { log: PathBuf, detail: String },
}

/// A log that does not continue the head kept for it.
#[derive(Debug, thiserror::Error)]
#[error("audit log {log} does not continue the agent's last audit head: {detail}. The agent's head ({head_file}): {head}; the log's head: {log_head}. Nothing was written. Find out what happened (the journal and a remote syslog have every record's seq and hash: `journalctl AIRLOCK_AUDIT_SEQ={seq}`); to go on with the log as it is, run `airlock audit accept-head --reason TEXT` (recorded in the log)", seq = head.seq)]
pub struct Mismatch {
    pub log: PathBuf,
    pub head_file: PathBuf,
    pub head: Head,
    pub log_head: Head,
    pub detail: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct HeadFile {
    seq: u64,
    hash: String,
    log: PathBuf,
    time: String,
}

/// The head kept in `path`, or `None` when there is none yet.
pub fn read_head_file(path: &Path) -> Result<Option<Head>, HeadError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(HeadError::Read(path.into(), e.to_string())),
    };
    let f: HeadFile =
        serde_json::from_str(&text).map_err(|e| HeadError::Read(path.into(), e.to_string()))?;
    Ok(Some(Head {
        seq: f.seq,
        hash: f.hash,
    }))
}

/// Replace the head file atomically (a temporary file, fsync, rename, fsync of the directory).
pub fn write_head_file(path: &Path, head: &Head, log: &Path) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec(&HeadFile {
        seq: head.seq,
        hash: head.hash.clone(),
        log: log.to_owned(),
        time: super::now_rfc3339(),
    })
    .map_err(std::io::Error::other)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&body)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Whether the log at `path`, whose last record is `log_head`, continues `head`: it reaches
/// `head.seq`, its record there has `head.hash`, and the records after it chain on from it.
/// `Err` says how it does not.
pub fn check_log(path: &Path, head: &Head, log_head: &Head) -> Result<(), String> {
    if log_head.seq < head.seq {
        return Err(format!(
            "it ends at seq {}, before the head's seq {}: records were cut off its end, or it was replaced",
            log_head.seq, head.seq
        ));
    }
    if head.seq == 0 {
        return Ok(());
    }
    if log_head.seq == head.seq {
        return if log_head.hash == head.hash {
            Ok(())
        } else {
            Err(format!(
                "its record {} has hash {}, not the head's: it was rewritten or replaced",
                head.seq, log_head.hash
            ))
        };
    }
    let mut f = File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let offset = offset_of_seq(&mut f, head.seq)?.ok_or_else(|| {
        format!(
            "it has no record {}: it was rewritten or replaced",
            head.seq
        )
    })?;
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| format!("cannot read it: {e}"))?;
    let mut prev = head.hash.clone();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| format!("cannot read it: {e}"))?;
        let seq = head.seq + i as u64;
        let rec: Map<String, Value> = serde_json::from_str(&line)
            .map_err(|e| format!("its record {seq} is not JSON: {e}"))?;
        let hash = rec.get("hash").and_then(Value::as_str).unwrap_or_default();
        if i == 0 {
            if hash != head.hash {
                return Err(format!(
                    "its record {} has hash {hash}, not the head's: it was rewritten or replaced",
                    head.seq
                ));
            }
            let p = rec.get("prev").and_then(Value::as_str).unwrap_or_default();
            if record_hash(p, &rec) != hash {
                return Err(format!("its record {seq} was edited"));
            }
            continue;
        }
        let ok = rec.get("seq").and_then(Value::as_u64) == Some(seq)
            && rec.get("prev").and_then(Value::as_str) == Some(prev.as_str())
            && record_hash(&prev, &rec) == hash;
        if !ok {
            return Err(format!(
                "its records after the head do not chain on from it (record {seq})"
            ));
        }
        prev = hash.to_string();
    }
    Ok(())
}

/// The byte offset of the line whose `seq` is `seq`, scanning back from the end (the head
/// is near the end: it lags the log by at most a moment).
fn offset_of_seq(f: &mut File, seq: u64) -> Result<Option<u64>, String> {
    const CHUNK: u64 = 64 * 1024;
    let err = |e: std::io::Error| format!("cannot read it: {e}");
    let mut pos = f.seek(SeekFrom::End(0)).map_err(err)?;
    // The start of a line that began before `pos`, with its newline.
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let start = pos.saturating_sub(CHUNK);
        let mut buf = vec![0u8; (pos - start) as usize];
        f.seek(SeekFrom::Start(start)).map_err(err)?;
        f.read_exact(&mut buf).map_err(err)?;
        buf.extend_from_slice(&carry);
        let mut lines = Vec::new();
        let mut begin = 0;
        for (i, c) in buf.iter().enumerate() {
            if *c == b'\n' {
                lines.push((begin, i));
                begin = i + 1;
            }
        }
        // The first line began before `start` unless `start` is the file's beginning.
        let first_whole = usize::from(start != 0);
        for &(b, e) in lines.iter().skip(first_whole).rev() {
            match line_seq(&buf[b..e]) {
                Some(s) if s == seq => return Ok(Some(start + b as u64)),
                Some(s) if s < seq => return Ok(None),
                _ => {}
            }
        }
        if start == 0 {
            return Ok(None);
        }
        carry = match lines.first() {
            Some(&(_, e)) => buf[..=e].to_vec(),
            None => buf,
        };
        pos = start;
    }
}

fn line_seq(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?.trim();
    if text.is_empty() {
        return None;
    }
    serde_json::from_str::<Map<String, Value>>(text)
        .ok()?
        .get("seq")
        .and_then(Value::as_u64)
}

/// What `airlock audit accept-head` did.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The head the agent had kept (`None`: none, or unreadable).
    pub previous: Option<Head>,
    /// The log's own head before the acceptance.
    pub log_head: Head,
    /// The acceptance record's seq (the new head).
    pub seq: u64,
}

/// Accept the log as it is: it must verify whole; `audit_head_accepted` (with both heads,
/// `reason` and the operator's `uid`) is appended and becomes the new head. The agent must
/// be stopped (the log is locked while it runs).
pub fn accept(
    path: &Path,
    opts: AuditOptions,
    reason: &str,
    uid: u32,
) -> Result<Accepted, AuditError> {
    let head_file = opts.head_file.clone();
    let previous = match &head_file {
        Some(hf) => read_head_file(hf).map_err(|e| e.to_string()),
        None => Ok(None),
    };
    let log = AuditLog::open_with(
        path,
        AuditOptions {
            check_head: false,
            ..opts
        },
    )?;
    // Verified under the lock: the agent cannot write meanwhile.
    let report = match std::fs::metadata(path) {
        Ok(m) if m.len() == 0 => super::VerifyReport {
            records: 0,
            last_hash: GENESIS.into(),
        },
        _ => super::verify(path).map_err(|e| HeadError::NotIntact {
            log: path.into(),
            detail: e.to_string(),
        })?,
    };
    let log_head = Head {
        seq: report.records,
        hash: report.last_hash,
    };
    let prev_json = match &previous {
        Ok(Some(h)) => serde_json::json!({"seq": h.seq, "hash": h.hash}),
        Ok(None) => Value::Null,
        Err(e) => serde_json::json!({"unreadable": e}),
    };
    let seq = log.append_blocking(
        "audit_head_accepted",
        None,
        crate::fields! {
            "previous_head" => prev_json,
            "log_head" => serde_json::json!({"seq": log_head.seq, "hash": log_head.hash}),
            "reason" => reason,
            "uid" => uid,
        },
    )?;
    log.close();
    Ok(Accepted {
        previous: previous.ok().flatten(),
        log_head,
        seq,
    })
}

/// The newest record anchor of the log at `log` in the journal (`namespace`: a journald
/// namespace), read with journalctl; `None` when the journal has none.
pub fn journal_head(log: &Path, namespace: Option<&str>) -> Result<Option<Head>, String> {
    let mut cmd = Command::new(JOURNALCTL);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .args(["--no-pager", "-o", "json", "-r", "-n", "1"])
        .arg("--output-fields=AIRLOCK_AUDIT_SEQ,AIRLOCK_AUDIT_HASH");
    if let Some(ns) = namespace {
        cmd.arg(format!("--namespace={ns}"));
    }
    cmd.arg(format!("{}=record", super::anchor::F_KIND))
        .arg(format!("{}={}", super::anchor::F_LOG, log.display()))
        .stdin(Stdio::null());
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {JOURNALCTL}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{JOURNALCTL} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().find(|l| l.starts_with('{')) else {
        return Ok(None);
    };
    let v: Map<String, Value> =
        serde_json::from_str(line).map_err(|e| format!("journalctl printed no JSON: {e}"))?;
    let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let seq = field("AIRLOCK_AUDIT_SEQ")
        .and_then(|s| s.parse().ok())
        .ok_or("the journal's newest anchor has no AIRLOCK_AUDIT_SEQ")?;
    let hash = field("AIRLOCK_AUDIT_HASH").ok_or("the journal's newest anchor has no hash")?;
    Ok(Some(Head { seq, hash }))
}

/// The log's last record as a head (for `verify --head`, which checks a whole log first).
pub fn check_against(path: &Path, report: &super::VerifyReport, head: &Head) -> Result<(), String> {
    check_log(
        path,
        head,
        &Head {
            seq: report.records,
            hash: report.last_hash.clone(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(dir: &Path, n: usize) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..n {
            log.append_blocking("job_started", Some(&format!("j-{i}")), Map::new())
                .unwrap();
        }
        log.close();
        path
    }

    fn heads(path: &Path) -> Vec<Head> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                Head {
                    seq: v["seq"].as_u64().unwrap(),
                    hash: v["hash"].as_str().unwrap().into(),
                }
            })
            .collect()
    }

    #[test]
    fn a_head_parses_from_seq_colon_hash() {
        let h: Head = format!("12:{}", "AB".repeat(32)).parse().unwrap();
        assert_eq!(h.seq, 12);
        assert_eq!(h.hash, "ab".repeat(32));
        assert!("12".parse::<Head>().is_err());
        assert!("x:ab".parse::<Head>().is_err());
        assert!("1:abc".parse::<Head>().is_err());
    }

    #[test]
    fn every_record_of_a_log_is_found_from_the_end() {
        let d = tempfile::tempdir().unwrap();
        // Long records, so the backward scan crosses chunk boundaries.
        let path = d.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..300 {
            log.append_blocking(
                "job_started",
                Some(&format!("j-{i}")),
                crate::fields! {"pad" => "x".repeat(i * 7 % 1500)},
            )
            .unwrap();
        }
        log.close();
        let hs = heads(&path);
        let last = hs.last().unwrap().clone();
        for h in &hs {
            assert_eq!(check_log(&path, h, &last), Ok(()), "{h}");
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut f = File::open(&path).unwrap();
        for (i, line_start) in std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .take(300)
            .enumerate()
        {
            assert_eq!(
                offset_of_seq(&mut f, i as u64 + 1).unwrap(),
                Some(line_start as u64)
            );
        }
        assert_eq!(offset_of_seq(&mut f, 301).unwrap(), None);
    }

    #[test]
    fn a_cut_log_and_a_rewritten_log_do_not_continue_the_head() {
        let d = tempfile::tempdir().unwrap();
        let path = log_with(d.path(), 10);
        let hs = heads(&path);
        let head = hs[9].clone();
        // Cut: the last 5 records gone.
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text.lines().take(5).collect();
        std::fs::write(&path, kept.join("\n") + "\n").unwrap();
        let e = check_log(&path, &head, &hs[4]).unwrap_err();
        assert!(e.contains("ends at seq 5, before the head's seq 10"), "{e}");
        // Rewritten: a new chain of the same length (and a longer one).
        let d2 = tempfile::tempdir().unwrap();
        let other = log_with(d2.path(), 12);
        let ohs = heads(&other);
        let e = check_log(&other, &head, &ohs[11]).unwrap_err();
        assert!(e.contains("rewritten"), "{e}");
        let e = check_log(&other, &head, &Head { ..ohs[9].clone() }).unwrap_err();
        assert!(e.contains("rewritten"), "{e}");
    }

    #[test]
    fn records_after_the_head_must_chain_on_from_it() {
        let d = tempfile::tempdir().unwrap();
        let path = log_with(d.path(), 6);
        let hs = heads(&path);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        lines[4] = lines[4].replace("j-4", "j-X");
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let e = check_log(&path, &hs[2], &hs[5]).unwrap_err();
        assert!(e.contains("do not chain"), "{e}");
    }

    #[test]
    fn accept_records_both_heads_and_takes_an_unreadable_head_too() {
        let d = tempfile::tempdir().unwrap();
        let path = log_with(d.path(), 4);
        let hf = d.path().join("audit-head.json");
        std::fs::write(&hf, "garbage").unwrap();
        let opts = AuditOptions {
            head_file: Some(hf.clone()),
            check_head: true,
            ..Default::default()
        };
        // Refused as it is...
        let e = AuditLog::open_with(&path, opts.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains("accept-head"), "{e}");
        // ... accepted on purpose.
        let a = accept(&path, opts.clone(), "head file lost", 0).unwrap();
        assert_eq!((a.previous, a.log_head.seq, a.seq), (None, 4, 5));
        let last: Value = serde_json::from_str(
            std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .last()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(last["event"], "audit_head_accepted");
        assert!(last["previous_head"]["unreadable"].is_string(), "{last}");
        assert_eq!(last["log_head"]["seq"], 4);
        assert_eq!(read_head_file(&hf).unwrap().map(|h| h.seq), Some(5));
        // Now the log continues its head.
        AuditLog::open_with(&path, opts).unwrap();
    }

    #[test]
    fn accept_refuses_a_broken_log() {
        let d = tempfile::tempdir().unwrap();
        let path = log_with(d.path(), 3);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("j-1", "j-X", 1)).unwrap();
        let e = accept(&path, AuditOptions::default(), "x", 0).unwrap_err();
        assert!(
            matches!(e, AuditError::Head(HeadError::NotIntact { .. })),
            "{e}"
        );
    }

    #[test]
    fn the_head_file_round_trips_and_garbage_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("state/audit-head.json");
        assert_eq!(read_head_file(&f).unwrap(), None);
        let h = Head {
            seq: 3,
            hash: "a".repeat(64),
        };
        write_head_file(&f, &h, Path::new("/x/audit.jsonl")).unwrap();
        assert_eq!(read_head_file(&f).unwrap(), Some(h));
        std::fs::write(&f, "{not json").unwrap();
        assert!(read_head_file(&f)
            .unwrap_err()
            .to_string()
            .contains("accept-head"));
    }
}
