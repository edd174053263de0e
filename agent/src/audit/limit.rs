//! The per-job limit of audit records that a job's own actions produce (a refused endpoint
//! request, a second bind, an STS error its requests set off): a token bucket per job, and
//! per event the count of what the bucket refused, reported in `audit_dropped` records.
//!
//! Owns the buckets and the counts only; it never writes (the writer asks it which summaries
//! are due, [`crate::audit::AuditLog::job_done`] takes a job's last one) and never blocks:
//! its lock is held for a map lookup, never across I/O. The egress records of a job have a
//! bucket of their own (`egress::job`).

use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// The summary record's event.
pub const SUMMARY_EVENT: &str = "audit_dropped";
/// A bucket with nothing to report and no record for this long is forgotten (a job that
/// ended without `job_done`, a refusal after the end).
const IDLE_FORGET: Duration = Duration::from_secs(600);

/// Records per job: `per_second` on average, `burst` at once; what exceeds them is counted
/// and reported at least every `summary_every` while the job goes on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobLimit {
    pub per_second: f64,
    pub burst: u32,
    pub summary_every: Duration,
}

impl Default for JobLimit {
    fn default() -> Self {
        JobLimit {
            per_second: 1.0,
            burst: 30,
            summary_every: Duration::from_secs(60),
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Refused records by event since `since`.
    dropped: BTreeMap<&'static str, u64>,
    /// When the first record of this report was refused (wall clock for the record, and
    /// monotonic for the interval).
    since: Option<(OffsetDateTime, Instant)>,
    last_seen: Instant,
}

/// Every job's bucket.
#[derive(Debug)]
pub(crate) struct Limiter {
    limit: JobLimit,
    jobs: Mutex<HashMap<String, Bucket>>,
}

impl Limiter {
    pub(crate) fn new(limit: JobLimit) -> Limiter {
        Limiter {
            limit,
            jobs: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bucket>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `job` may write one more record of `event` now; if not, it is counted.
    pub(crate) fn admit(&self, job: &str, event: &'static str) -> bool {
        self.admit_at(job, event, Instant::now())
    }

    fn admit_at(&self, job: &str, event: &'static str, now: Instant) -> bool {
        let burst = f64::from(self.limit.burst.max(1));
        let mut jobs = self.lock();
        let b = match jobs.get_mut(job) {
            Some(b) => b,
            None => jobs.entry(job.to_string()).or_insert(Bucket {
                tokens: burst,
                at: now,
                dropped: BTreeMap::new(),
                since: None,
                last_seen: now,
            }),
        };
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.limit.per_second).min(burst);
        b.at = now;
        b.last_seen = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return true;
        }
        *b.dropped.entry(event).or_insert(0) += 1;
        if b.since.is_none() {
            b.since = Some((OffsetDateTime::now_utc(), now));
        }
        false
    }

    /// The job's last summary (if it dropped anything since the last one); forgets the job.
    pub(crate) fn finish(&self, job: &str) -> Option<Map<String, Value>> {
        let b = self.lock().remove(job)?;
        self.summary(b, true)
    }

    /// Summaries due now: jobs whose first unreported drop is `summary_every` old, and
    /// forgotten idle jobs that still had something to report. Buckets idle for long are
    /// forgotten.
    pub(crate) fn due(&self, now: Instant) -> Vec<(String, Map<String, Value>)> {
        let mut out = Vec::new();
        let mut jobs = self.lock();
        let mut forget = Vec::new();
        for (job, b) in jobs.iter_mut() {
            let idle = now.saturating_duration_since(b.last_seen) >= IDLE_FORGET;
            let due = b.since.is_some_and(|(_, at)| {
                now.saturating_duration_since(at) >= self.limit.summary_every
            });
            if due || idle {
                let report = Bucket {
                    tokens: 0.0,
                    at: b.at,
                    dropped: std::mem::take(&mut b.dropped),
                    since: b.since.take(),
                    last_seen: b.last_seen,
                };
                if let Some(f) = self.summary(report, false) {
                    out.push((job.clone(), f));
                }
            }
            if idle {
                forget.push(job.clone());
            }
        }
        for j in forget {
            jobs.remove(&j);
        }
        out
    }

    /// Summaries of every job with something to report (the agent is stopping).
    pub(crate) fn drain(&self) -> Vec<(String, Map<String, Value>)> {
        let mut jobs = self.lock();
        jobs.drain()
            .filter_map(|(job, b)| self.summary(b, false).map(|f| (job, f)))
            .collect()
    }

    fn summary(&self, b: Bucket, last: bool) -> Option<Map<String, Value>> {
        let (since, _) = b.since?;
        let total: u64 = b.dropped.values().sum();
        let dropped: Map<String, Value> = b
            .dropped
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        Some(crate::fields! {
            "dropped" => dropped,
            "total" => total,
            "since" => since.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "rate_per_second" => self.limit.per_second,
            "burst" => self.limit.burst,
            "job_ended" => last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> Limiter {
        Limiter::new(JobLimit {
            per_second: 2.0,
            burst: 5,
            summary_every: Duration::from_secs(10),
        })
    }

    #[test]
    fn a_burst_then_the_rate_and_the_rest_counted_per_event() {
        let l = limiter();
        let t0 = Instant::now();
        let admitted = (0..20)
            .filter(|_| l.admit_at("j-1", "bind_refused", t0))
            .count();
        assert_eq!(admitted, 5);
        // One second later: two more.
        let t1 = t0 + Duration::from_secs(1);
        assert!(l.admit_at("j-1", "token_rejected", t1));
        assert!(l.admit_at("j-1", "token_rejected", t1));
        assert!(!l.admit_at("j-1", "token_rejected", t1));
        // Another job has its own bucket.
        assert!(l.admit_at("j-2", "bind_refused", t1));
        let f = l.finish("j-1").expect("a summary");
        assert_eq!(f["dropped"]["bind_refused"], 15);
        assert_eq!(f["dropped"]["token_rejected"], 1);
        assert_eq!(f["total"], 16);
        assert_eq!(f["job_ended"], true);
        // Forgotten: nothing more to report.
        assert!(l.finish("j-1").is_none());
        assert!(l.finish("j-2").is_none(), "j-2 dropped nothing");
    }

    #[test]
    fn a_flood_is_summarised_every_interval_while_it_lasts() {
        let l = limiter();
        let t0 = Instant::now();
        for _ in 0..10 {
            l.admit_at("j-1", "bind_refused", t0);
        }
        assert!(l.due(t0 + Duration::from_secs(9)).is_empty());
        let d = l.due(t0 + Duration::from_secs(10));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].1["dropped"]["bind_refused"], 5);
        assert_eq!(d[0].1["job_ended"], false);
        // Counted afresh after a summary.
        assert!(l.due(t0 + Duration::from_secs(11)).is_empty());
        let t2 = t0 + Duration::from_secs(12);
        for _ in 0..10 {
            l.admit_at("j-1", "bind_refused", t2);
        }
        assert!(l.due(t2 + Duration::from_secs(9)).is_empty());
        assert_eq!(
            l.due(t2 + Duration::from_secs(10))[0].1["dropped"]["bind_refused"],
            5,
            "the bucket refilled to its burst of 5"
        );
    }

    #[test]
    fn idle_buckets_are_forgotten_with_their_report() {
        let l = limiter();
        let t0 = Instant::now();
        for _ in 0..6 {
            l.admit_at("j-1", "bind_refused", t0);
        }
        l.admit_at("j-2", "bind_refused", t0);
        let d = l.due(t0 + IDLE_FORGET);
        assert_eq!(d.len(), 1, "only j-1 had something to report");
        assert!(l.lock().is_empty(), "both buckets forgotten");
    }
}
