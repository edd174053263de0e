//! Target `audit`: the audit log reader (`audit::verify_reader`, `audit::query_reader`).
//!
//! Input: one mode byte, then
//! - mode 0: a whole log: it is verified and queried as it is;
//! - mode 1: edits of a valid log the harness wrote at start (with [`airlock::audit::AuditLog`]):
//!   a u16 cut length, then (u16 offset, u8 xor) triples, each changing one byte; the log is
//!   cut to that length (when it is shorter than the log) after the edits;
//! - mode 2: a filter (repository, role, job, event, since, until, separated by 0xFF; an
//!   empty field is no filter, a time that is not RFC 3339 none either), a 0xFE byte, then
//!   a log to query.
//!
//! Properties, after every input:
//! - a log that verifies has as many records as lines, and its last hash is the last
//!   record's `hash` (the genesis hash when empty);
//! - an edited log verifies only if every record still reads exactly as written (an edit of
//!   the bytes between records, such as a trailing space); a cut log verifies only as a
//!   prefix of whole records, and then its last hash is that record's hash in the original,
//!   so comparing with an anchored head finds the cut;
//! - a query returns only records that match every field of the filter, in log order.

use crate::Seed;
use airlock::audit::{query_reader, verify_reader, AuditLog, Filter, GENESIS};
use serde_json::{json, Map, Value};
use std::sync::OnceLock;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

struct Harness {
    /// A valid log, its records as written and each record's hash.
    log: Vec<u8>,
    records: Vec<Map<String, Value>>,
    hashes: Vec<String>,
}

fn fields(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!("fields are an object"),
    }
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let dir = crate::scratch_dir();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let records = [
            ("job_started", Some("j1"), json!({"repository": "acme/web", "provider": "github", "source": "oidc"})),
            ("credentials_issued", Some("j1"), json!({"role_arn": "arn:aws:iam::123456789012:role/web-prod-deploy", "alias": "deploy", "access_key_id": "ASIAFUZZ", "duration": 3600})),
            ("token_rejected", Some("j2"), json!({"reason": "wrong token", "code": "InvalidToken"})),
            ("dns", Some("j1"), json!({"name": "allowed.test", "verdict": "allowed", "answers": ["192.0.2.1", "2001:db8::1"], "ttl": 300})),
            ("policy_reloaded", None, json!({"rules": 3, "note": "ünïcødé \"quoted\" \\ back\nslash"})),
            ("job_ended", Some("j1"), json!({"reason": "finished", "nested": {"a": [1, 2.5, null, true]}})),
        ];
        for (event, job, f) in records {
            log.append_blocking(event, job, fields(f)).unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        let records: Vec<Map<String, Value>> = bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        let hashes = records
            .iter()
            .map(|r| r["hash"].as_str().unwrap().to_string())
            .collect();
        Harness {
            log: bytes,
            records,
            hashes,
        }
    })
}

/// The lines `BufRead::lines` yields, parsed where they parse.
fn parsed_lines(log: &[u8]) -> Vec<Option<Map<String, Value>>> {
    let mut lines: Vec<&[u8]> = log.split(|&b| b == b'\n').collect();
    if log.ends_with(b"\n") || log.is_empty() {
        lines.pop();
    }
    lines
        .into_iter()
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .map(|l| serde_json::from_slice(l).ok())
        .collect()
}

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => whole_log(rest),
        1 => edited_log(rest),
        _ => {
            query(rest);
        }
    }
}

fn whole_log(log: &[u8]) {
    let lines = parsed_lines(log);
    if let Ok(report) = verify_reader(log) {
        assert_eq!(report.records as usize, lines.len(), "records ≠ lines");
        let last = match lines.last() {
            None => GENESIS.to_string(),
            Some(rec) => {
                let rec = rec.as_ref().expect("a verified line parses");
                rec["hash"]
                    .as_str()
                    .expect("a verified record has a hash")
                    .to_string()
            }
        };
        assert_eq!(
            report.last_hash, last,
            "the head is not the last record's hash"
        );
    }
    let _ = query_reader(log, &Filter::default());
}

/// The seeds get what they were written for: the written log verifies, an edit is found,
/// a cut verifies as the prefix with that record's hash, a query finds its one record.
pub fn selftest() {
    let h = harness();
    assert_eq!(verify_reader(&h.log[..]).map(|r| r.records), Ok(6));
    let seeds = seeds();
    let mut edited = h.log.clone();
    edited[40] ^= 1;
    assert!(verify_reader(&edited[..]).is_err(), "an edit verifies");
    let cut = crate::seed(&seeds, "cut-after-two-records");
    let at = usize::from(u16::from_be_bytes([cut[1], cut[2]]));
    let report = verify_reader(&h.log[..at]).expect("a cut at a record's end verifies");
    assert_eq!((report.records, &report.last_hash), (2, &h.hashes[1]));
    let found = query(&crate::seed(&seeds, "query")[1..]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["event"], "credentials_issued");
    for (_, data) in &seeds {
        run(data);
    }
}

fn edited_log(edits: &[u8]) {
    let h = harness();
    let mut log = h.log.clone();
    let cut = edits.get(..2).map_or(usize::MAX, |c| {
        usize::from(u16::from_be_bytes([c[0], c[1]]))
    });
    for e in edits.get(2..).unwrap_or_default().chunks_exact(3) {
        let at = usize::from(u16::from_be_bytes([e[0], e[1]])) % log.len();
        log[at] ^= e[2];
    }
    log.truncate(cut);
    let Ok(report) = verify_reader(&log[..]) else {
        return;
    };
    let n = report.records as usize;
    assert!(n <= h.records.len(), "more records than were written");
    let lines = parsed_lines(&log);
    assert_eq!(lines.len(), n, "records ≠ lines");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            line.as_ref(),
            Some(&h.records[i]),
            "record {} was changed and the chain still verifies",
            i + 1
        );
    }
    let expected = if n == 0 {
        GENESIS
    } else {
        h.hashes[n - 1].as_str()
    };
    assert_eq!(
        report.last_hash, expected,
        "the head differs from the written chain's"
    );
}

/// The records the input's filter finds in its log, after the checks.
fn query(rest: &[u8]) -> Vec<Map<String, Value>> {
    let split = rest.iter().position(|&b| b == 0xFE).unwrap_or(rest.len());
    let (spec, log) = (&rest[..split], rest.get(split + 1..).unwrap_or_default());
    let mut parts = spec
        .split(|&b| b == 0xFF)
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let mut text = || parts.next().filter(|s| !s.is_empty());
    let (repository, role, job, event) = (text(), text(), text(), text());
    let mut at = || text().and_then(|s| OffsetDateTime::parse(&s, &Rfc3339).ok());
    let (since, until) = (at(), at());
    let filter = Filter {
        repository,
        role,
        job,
        event,
        since,
        until,
    };
    let found = query_reader(log, &filter);
    let lines: Vec<Map<String, Value>> = parsed_lines(log).into_iter().flatten().collect();
    assert!(found.len() <= lines.len(), "more records than lines");
    // In log order: each result is a later line than the one before.
    let mut next = 0;
    for rec in &found {
        let pos = lines[next..]
            .iter()
            .position(|l| l == rec)
            .expect("a result is a line of the log, in order");
        next += pos + 1;
        let s = |k: &str| rec.get(k).and_then(Value::as_str);
        for (key, want) in [
            ("repository", &filter.repository),
            ("job", &filter.job),
            ("event", &filter.event),
        ] {
            if let Some(w) = want {
                assert!(
                    s(key).is_some_and(|v| v.contains(w.as_str())),
                    "{key} does not match"
                );
            }
        }
        if let Some(role) = &filter.role {
            let hit = ["role_arn", "alias"]
                .iter()
                .any(|k| s(k).is_some_and(|v| v == role || v.ends_with(&format!("/{role}"))));
            assert!(hit, "role does not match");
        }
        if filter.since.is_some() || filter.until.is_some() {
            let t = s("time")
                .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
                .expect("a time-filtered result has a time");
            assert!(
                filter.since.is_none_or(|since| t >= since),
                "before --since"
            );
            assert!(filter.until.is_none_or(|until| t <= until), "after --until");
        }
    }
    found
}

pub fn seeds() -> Vec<Seed> {
    let h = harness();
    let mut whole = vec![0];
    whole.extend(&h.log);
    let mut edited = vec![1, 0xFF, 0xFF];
    edited.extend([0, 40, 1, 1, 0, 0x20]);
    let mut cut = vec![1];
    let two_records = h
        .log
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .nth(1)
        .unwrap()
        .0
        + 1;
    cut.extend(u16::try_from(two_records).unwrap().to_be_bytes());
    let mut query = vec![2];
    query.extend(b"\xFFweb-prod-deploy\xFFj1\xFFcredentials\xFF2020-01-01T00:00:00Z\xFF2999-01-01T00:00:00Z\xFE");
    query.extend(&h.log);
    let mut trailing_space = vec![1, 0xFF, 0xFF];
    let last_newline = u16::try_from(h.log.len() - 1).unwrap();
    trailing_space.extend(last_newline.to_be_bytes());
    trailing_space.push(b'\n' ^ b' ');
    vec![
        ("whole-log", whole),
        ("edited-log", edited),
        ("cut-after-two-records", cut),
        ("trailing-space", trailing_space),
        ("query", query),
        ("empty-log", vec![0]),
    ]
}
