//! Prometheus metrics, served by the admin listener at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StsLabels {
    pub action: String,
    pub outcome: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Endpoint requests by outcome (`ok`, `unauthorized`, `forbidden`, `not_found`, ...).
    pub requests: Family<OutcomeLabels, Counter>,
    /// STS calls by action and outcome.
    pub sts_calls: Family<StsLabels, Counter>,
    pub sts_latency: Histogram,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub active_jobs: Gauge,
    pub audit_failures: Counter,
    /// Wiped sandboxed jobs whose files the kernel is still freeing in the background.
    pub sandbox_reclaims_pending: Gauge,
    /// Handles of the endpoint outcomes, made once: the request path then costs one atomic
    /// add, not a label allocation and a map lookup.
    outcomes: Vec<(&'static str, Counter)>,
}

/// The outcomes the endpoint reports.
pub const OUTCOMES: &[&str] = &[
    "ok",
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "client_error",
    "error",
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Self::with_audit(&crate::audit::AuditStats::default())
    }

    /// The metrics, with the audit log's own counters (`airlock_audit_*`); its write
    /// failures are `airlock_audit_write_failures_total`.
    pub fn with_audit(audit: &crate::audit::AuditStats) -> Metrics {
        let mut registry = Registry::with_prefix("airlock");
        let requests = Family::<OutcomeLabels, Counter>::default();
        let sts_calls = Family::<StsLabels, Counter>::default();
        let sts_latency = Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        let cache_hits = Counter::default();
        let cache_misses = Counter::default();
        let active_jobs = Gauge::default();
        let audit_failures = audit.write_failures.clone();
        let sandbox_reclaims_pending = Gauge::default();
        registry.register(
            "endpoint_requests",
            "Credential endpoint requests by outcome",
            requests.clone(),
        );
        registry.register(
            "sts_calls",
            "STS calls by action and outcome",
            sts_calls.clone(),
        );
        registry.register(
            "sts_latency_seconds",
            "STS call latency in seconds",
            sts_latency.clone(),
        );
        registry.register(
            "credential_cache_hits",
            "Credential requests answered from the per-job cache",
            cache_hits.clone(),
        );
        registry.register(
            "credential_cache_misses",
            "Credential requests that had to wait for STS",
            cache_misses.clone(),
        );
        registry.register(
            "active_jobs",
            "Jobs currently known to the agent",
            active_jobs.clone(),
        );
        registry.register(
            "audit_write_failures",
            "Audit records that could not be written (nothing that needed them was done)",
            audit_failures.clone(),
        );
        registry.register(
            "audit_records",
            "Audit records made durable",
            audit.records.clone(),
        );
        registry.register(
            "audit_batches",
            "Audit batches written, one fsync each (group commit)",
            audit.batches.clone(),
        );
        registry.register(
            "audit_dropped",
            "Records of jobs' own actions over their job's limit (counted in audit_dropped records)",
            audit.dropped.clone(),
        );
        registry.register(
            "audit_anchor_failures",
            "Audit anchors (journal, syslog, head file) not sent or written",
            audit.anchor_failures.clone(),
        );
        registry.register(
            "audit_failing",
            "1 while the audit log cannot be written (no job starts, nothing is issued)",
            audit.failing.clone(),
        );
        registry.register(
            "audit_seq",
            "The last durable audit record's seq",
            audit.seq.clone(),
        );
        registry.register(
            "sandbox_reclaims_pending",
            "Wiped jobs whose tmpfs is still being freed in the background",
            sandbox_reclaims_pending.clone(),
        );
        let outcomes = OUTCOMES
            .iter()
            .map(|o| {
                let c = requests
                    .get_or_create(&OutcomeLabels {
                        outcome: o.to_string(),
                    })
                    .clone();
                (*o, c)
            })
            .collect();
        Metrics {
            outcomes,
            registry,
            requests,
            sts_calls,
            sts_latency,
            cache_hits,
            cache_misses,
            active_jobs,
            audit_failures,
            sandbox_reclaims_pending,
        }
    }

    pub fn request(&self, outcome: &str) {
        if let Some((_, c)) = self.outcomes.iter().find(|(o, _)| *o == outcome) {
            c.inc();
            return;
        }
        self.requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn sts_call(&self, action: &str, outcome: &str, latency: Duration) {
        self.sts_calls
            .get_or_create(&StsLabels {
                action: action.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        self.sts_latency.observe(latency.as_secs_f64());
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_counters_it_was_given() {
        let m = Metrics::new();
        m.request("ok");
        m.request("ok");
        m.sts_call("AssumeRole", "ok", Duration::from_millis(20));
        m.active_jobs.set(3);
        let text = m.encode();
        assert!(
            text.contains("airlock_endpoint_requests_total{outcome=\"ok\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("airlock_sts_calls_total{action=\"AssumeRole\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("airlock_active_jobs 3"), "{text}");
        assert!(
            text.contains("airlock_sandbox_reclaims_pending 0"),
            "{text}"
        );
    }
}
