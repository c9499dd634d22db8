//! The metrics registry: pdgate's own counters and latency histogram, kept in atomics, plus the
//! counters other parts already keep (the decision cache's [`CacheStats`], the audit log's
//! queue and [`AuditStats`](crate::audit::AuditStats)), read when asked. It is the one source
//! of truth for both outputs: `GET /metrics` on the API port renders it as Prometheus text
//! ([`Metrics::render_prometheus`]), and with OTLP on, observable instruments read the same
//! values ([`register`]).
//!
//! | Prometheus | OTLP instrument | what |
//! |---|---|---|
//! | `pdgate_decisions_total{decision, purpose, reason}` | `pdgate.decisions` (counter) | decisions; `reason` is the first reason code (`""` when allowed) |
//! | `pdgate_decision_latency_seconds` | `pdgate.decision.latency` (histogram, s) | from a call's arrival until its decision is final (audit record written) |
//! | `pdgate_decision_cache_hits_total`, `..._misses_total` | `pdgate.decision_cache.hits`, `.misses` | lookups of the decision cache |
//! | `pdgate_policy_reloads_total`, `pdgate_policy_reload_failures_total` | `pdgate.policy.reloads`, `.reload_failures` | policy reloads swapped in, and rejected (the running policy kept) |
//! | `pdgate_shadow_differences_total{active, shadow}` | `pdgate.shadow.differences` | calls a shadow policy decided otherwise than the active one (`allow`/`deny` each) |
//! | `pdgate_audit_queue_depth` | `pdgate.audit.queue_depth` (gauge) | records waiting for the audit writer |
//! | `pdgate_audit_records_written_total` | `pdgate.audit.records_written` | records written |
//! | `pdgate_audit_write_failures_total` | `pdgate.audit.write_failures` | records whose write failed (their calls denied) |
//! | `pdgate_audit_refused_total` | `pdgate.audit.refused` | records refused because the queue was full (their calls denied) |
//! | `pdgate_response_fields_cleared_total` | `pdgate.response.fields_cleared` | response fields cleared because their category was minimized |
//! | `pdgate_response_fields_unknown_total` | `pdgate.response.fields_unknown` | response fields dropped because the service's descriptors do not know them (a newer service version?) |
//!
//! The OTLP names follow OpenTelemetry's conventions; a collector that exports to Prometheus
//! turns them into exactly the names of the first column.
//!
//! Label values are bounded: `decision` has two values, `reason` one per reason code, and
//! `purpose` is a purpose the policy defines, `(none)` when the call declared none or
//! `(unknown)` when the policy does not know it — a caller cannot create series at will.

use crate::audit::AuditLog;
use crate::decision::{CacheStats, ReasonCode, ShadowStats};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Histogram, Meter};
use rustc_hash::FxHashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

/// Upper bounds, in seconds, of the latency histogram's buckets (`+Inf` follows). A decision
/// costs microseconds; the audit write before the answer (a sync per batch by default) is
/// what reaches milliseconds.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

/// The `purpose` label of a call that declared no purpose.
pub const PURPOSE_NONE: &str = "(none)";
/// The `purpose` label of a purpose the policy does not define (or no policy is loaded).
pub const PURPOSE_UNKNOWN: &str = "(unknown)";

/// The `reason` label of a denial without a reason code (never made by pdgate; kept so that
/// such a denial would still be counted).
const REASON_NONE: &str = "DENIED";

/// Slot 0: allowed; slot 1: denied without a code; slot 2 + i: denied, first code `ALL[i]`.
const SLOTS: usize = 2 + ReasonCode::ALL.len();

/// The registry. Recording a decision takes a shared read lock and two atomic additions; the
/// write lock is taken once per new purpose.
pub struct Metrics {
    /// Per `purpose` label, the decisions by outcome slot.
    decisions: RwLock<FxHashMap<Box<str>, Box<[AtomicU64; SLOTS]>>>,
    latency: LatencyHistogram,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    fields_cleared: AtomicU64,
    fields_unknown: AtomicU64,
    cache: Arc<CacheStats>,
    shadow: Arc<ShadowStats>,
    audit: AuditLog,
}

/// Non-cumulative bucket counts (the last is `+Inf`) and the sum, in nanoseconds.
struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// One series of `pdgate_decisions_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionSeries {
    pub decision: &'static str,
    pub purpose: String,
    /// The first reason code; `""` when allowed.
    pub reason: &'static str,
    pub count: u64,
}

impl Metrics {
    /// A registry that also reports the cache's and the audit log's own counters.
    pub fn new(cache: Arc<CacheStats>, audit: AuditLog) -> Self {
        Self {
            decisions: RwLock::default(),
            latency: LatencyHistogram {
                buckets: std::array::from_fn(|_| AtomicU64::new(0)),
                sum_ns: AtomicU64::new(0),
            },
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            fields_cleared: AtomicU64::new(0),
            fields_unknown: AtomicU64::new(0),
            cache,
            shadow: Arc::default(),
            audit,
        }
    }

    /// Reports `stats` (the decider's shadow differences) as `pdgate_shadow_differences_total`.
    #[must_use]
    pub fn with_shadow_stats(mut self, stats: Arc<ShadowStats>) -> Self {
        self.shadow = stats;
        self
    }

    /// `(active, shadow, count)` for both kinds of difference.
    pub fn shadow_differences(&self) -> [(&'static str, &'static str, u64); 2] {
        [
            (
                "allow",
                "deny",
                self.shadow.allow_deny.load(Ordering::Relaxed),
            ),
            (
                "deny",
                "allow",
                self.shadow.deny_allow.load(Ordering::Relaxed),
            ),
        ]
    }

    /// Counts one decision and its latency. `purpose` must be a bounded label value (see the
    /// module documentation).
    pub fn record_decision(
        &self,
        allowed: bool,
        purpose: &str,
        first_reason: Option<ReasonCode>,
        latency: Duration,
    ) {
        let slot = match (allowed, first_reason) {
            (true, _) => 0,
            (false, None) => 1,
            (false, Some(code)) => ReasonCode::ALL
                .iter()
                .position(|c| *c == code)
                .map_or(1, |i| 2 + i),
        };
        let add = |counts: &[AtomicU64; SLOTS]| {
            if let Some(counter) = counts.get(slot) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        };
        {
            let map = self
                .decisions
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(counts) = map.get(purpose) {
                add(counts);
                drop(map);
                self.latency.observe(latency);
                return;
            }
        }
        {
            let mut map = self
                .decisions
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            add(map
                .entry(purpose.into())
                .or_insert_with(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0)))));
        }
        self.latency.observe(latency);
    }

    /// Counts a policy reload that was swapped in (`gate::manager`).
    pub fn record_reload(&self) {
        self.reloads.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts what minimizing a response message did: fields cleared for their category, and
    /// fields the descriptors do not know, dropped.
    pub fn record_minimized(&self, cleared: u32, unknown: u32) {
        if cleared > 0 {
            self.fields_cleared
                .fetch_add(u64::from(cleared), Ordering::Relaxed);
        }
        if unknown > 0 {
            self.fields_unknown
                .fetch_add(u64::from(unknown), Ordering::Relaxed);
        }
    }

    /// Counts a policy reload that was rejected (the last good policy stays).
    pub fn record_reload_failure(&self) {
        self.reload_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Every series of `pdgate_decisions_total` with a count, sorted by purpose, decision and
    /// reason.
    pub fn decisions(&self) -> Vec<DecisionSeries> {
        let map = self
            .decisions
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut series = Vec::new();
        for (purpose, counts) in map.iter() {
            for (slot, counter) in counts.iter().enumerate() {
                let count = counter.load(Ordering::Relaxed);
                if count == 0 {
                    continue;
                }
                let (decision, reason) = match slot {
                    0 => ("allow", ""),
                    1 => ("deny", REASON_NONE),
                    n => (
                        "deny",
                        ReasonCode::ALL
                            .get(n - 2)
                            .map_or(REASON_NONE, |c| c.as_str()),
                    ),
                };
                series.push(DecisionSeries {
                    decision,
                    purpose: purpose.to_string(),
                    reason,
                    count,
                });
            }
        }
        series.sort_by(|a, b| {
            (&a.purpose, a.decision, a.reason).cmp(&(&b.purpose, b.decision, b.reason))
        });
        series
    }

    /// The whole registry in the Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        header(
            &mut out,
            "pdgate_decisions_total",
            "counter",
            "Access decisions, by decision, purpose and first reason code.",
        );
        for s in self.decisions() {
            let _ = writeln!(
                out,
                "pdgate_decisions_total{{decision=\"{}\",purpose=\"{}\",reason=\"{}\"}} {}",
                s.decision,
                escape(&s.purpose),
                s.reason,
                s.count
            );
        }
        header(
            &mut out,
            "pdgate_decision_latency_seconds",
            "histogram",
            "Time from a call's arrival until its decision is final, audit record written.",
        );
        let (buckets, sum, count) = self.latency.read();
        let mut cumulative = 0;
        for (bound, n) in LATENCY_BUCKETS.iter().zip(buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "pdgate_decision_latency_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "pdgate_decision_latency_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             pdgate_decision_latency_seconds_sum {sum}\n\
             pdgate_decision_latency_seconds_count {count}"
        );
        for (name, kind, help, value) in self.scalars() {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        header(
            &mut out,
            "pdgate_shadow_differences_total",
            "counter",
            "Calls a shadow policy decided otherwise than the active (enforced) policy.",
        );
        for (active, shadow, count) in self.shadow_differences() {
            let _ = writeln!(
                out,
                "pdgate_shadow_differences_total{{active=\"{active}\",shadow=\"{shadow}\"}} {count}"
            );
        }
        out
    }

    /// The unlabelled series: (Prometheus name, type, help, value).
    fn scalars(&self) -> [(&'static str, &'static str, &'static str, u64); 10] {
        let audit = self.audit.stats();
        [
            (
                "pdgate_decision_cache_hits_total",
                "counter",
                "Decision cache lookups that found the decision.",
                self.cache.hits.load(Ordering::Relaxed),
            ),
            (
                "pdgate_decision_cache_misses_total",
                "counter",
                "Decision cache lookups that computed the decision.",
                self.cache.misses.load(Ordering::Relaxed),
            ),
            (
                "pdgate_policy_reloads_total",
                "counter",
                "Policy reloads swapped in (file watch, Apply, Rollback).",
                self.reloads.load(Ordering::Relaxed),
            ),
            (
                "pdgate_policy_reload_failures_total",
                "counter",
                "Policy reloads rejected, the last good policy kept.",
                self.reload_failures.load(Ordering::Relaxed),
            ),
            (
                "pdgate_audit_queue_depth",
                "gauge",
                "Audit records waiting for the writer.",
                u64::try_from(self.audit.queue_depth()).unwrap_or(u64::MAX),
            ),
            (
                "pdgate_audit_records_written_total",
                "counter",
                "Audit records written.",
                audit.written.load(Ordering::Relaxed),
            ),
            (
                "pdgate_audit_write_failures_total",
                "counter",
                "Audit records whose write failed; their calls were denied (AUDIT_UNAVAILABLE).",
                audit.write_failures.load(Ordering::Relaxed),
            ),
            (
                "pdgate_audit_refused_total",
                "counter",
                "Audit records refused because the writer's queue was full; their calls were denied (AUDIT_UNAVAILABLE).",
                audit.refused_full.load(Ordering::Relaxed),
            ),
            (
                "pdgate_response_fields_cleared_total",
                "counter",
                "Response fields cleared because the decision minimized their category.",
                self.fields_cleared.load(Ordering::Relaxed),
            ),
            (
                "pdgate_response_fields_unknown_total",
                "counter",
                "Response fields dropped because the service's descriptors do not know them.",
                self.fields_unknown.load(Ordering::Relaxed),
            ),
        ]
    }
}

impl LatencyHistogram {
    fn observe(&self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        if let Some(counter) = self.buckets.get(bucket) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The finite buckets (not cumulative), the sum in seconds and the count.
    fn read(&self) -> ([u64; LATENCY_BUCKETS.len()], f64, u64) {
        let all: [u64; LATENCY_BUCKETS.len() + 1] =
            std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        let finite = std::array::from_fn(|i| all[i]);
        let count = all.iter().sum();
        let sum = Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed)).as_secs_f64();
        (finite, sum, count)
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Registers the OTLP instruments on `meter`: observable ones that read `metrics` at each
/// collection, and the latency histogram, which has no observable form and so is recorded as
/// decisions are made (returned, for [`super::Telemetry`] to record into). Its buckets are the
/// registry's.
pub fn register(metrics: &Arc<Metrics>, meter: &Meter) -> Histogram<f64> {
    let m = metrics.clone();
    let _ = meter
        .u64_observable_counter("pdgate.decisions")
        .with_description("Access decisions, by decision, purpose and first reason code.")
        .with_unit("{decision}")
        .with_callback(move |observer| {
            for s in m.decisions() {
                observer.observe(
                    s.count,
                    &[
                        KeyValue::new("decision", s.decision),
                        KeyValue::new("purpose", s.purpose),
                        KeyValue::new("reason", s.reason),
                    ],
                );
            }
        })
        .build();
    let m = metrics.clone();
    let _ = meter
        .u64_observable_counter("pdgate.shadow.differences")
        .with_description(
            "Calls a shadow policy decided otherwise than the active (enforced) policy.",
        )
        .with_unit("{call}")
        .with_callback(move |observer| {
            for (active, shadow, count) in m.shadow_differences() {
                observer.observe(
                    count,
                    &[
                        KeyValue::new("active", active),
                        KeyValue::new("shadow", shadow),
                    ],
                );
            }
        })
        .build();
    let otlp_names = [
        "pdgate.decision_cache.hits",
        "pdgate.decision_cache.misses",
        "pdgate.policy.reloads",
        "pdgate.policy.reload_failures",
        "pdgate.audit.queue_depth",
        "pdgate.audit.records_written",
        "pdgate.audit.write_failures",
        "pdgate.audit.refused",
        "pdgate.response.fields_cleared",
        "pdgate.response.fields_unknown",
    ];
    for (index, ((_, kind, help, _), name)) in
        metrics.scalars().into_iter().zip(otlp_names).enumerate()
    {
        let m = metrics.clone();
        let read = move || m.scalars().get(index).map_or(0, |s| s.3);
        if kind == "gauge" {
            let _ = meter
                .u64_observable_gauge(name)
                .with_description(help)
                .with_unit("{record}")
                .with_callback(move |observer| observer.observe(read(), &[]))
                .build();
        } else {
            let _ = meter
                .u64_observable_counter(name)
                .with_description(help)
                .with_callback(move |observer| observer.observe(read(), &[]))
                .build();
        }
    }
    meter
        .f64_histogram("pdgate.decision.latency")
        .with_description(
            "Time from a call's arrival until its decision is final, audit record written.",
        )
        .with_unit("s")
        .with_boundaries(LATENCY_BUCKETS.to_vec())
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditSettings;

    fn registry() -> (Metrics, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (audit, _writer, _) = AuditLog::open(AuditSettings::new(dir.path())).unwrap();
        (Metrics::new(Arc::default(), audit), dir)
    }

    #[test]
    fn decisions_are_counted_by_label_and_rendered_in_text_format() {
        let (m, _dir) = registry();
        let ms = Duration::from_millis;
        m.record_decision(true, "service.billing", None, ms(0));
        m.record_decision(true, "service.billing", None, ms(3));
        m.record_decision(
            false,
            "marketing.email",
            Some(ReasonCode::ConsentRequired),
            ms(30),
        );
        m.record_decision(
            false,
            PURPOSE_UNKNOWN,
            Some(ReasonCode::AuditUnavailable),
            ms(9000),
        );
        let text = m.render_prometheus();
        for line in [
            "pdgate_decisions_total{decision=\"allow\",purpose=\"service.billing\",reason=\"\"} 2",
            "pdgate_decisions_total{decision=\"deny\",purpose=\"marketing.email\",reason=\"CONSENT_REQUIRED\"} 1",
            "pdgate_decisions_total{decision=\"deny\",purpose=\"(unknown)\",reason=\"AUDIT_UNAVAILABLE\"} 1",
            "pdgate_decision_latency_seconds_bucket{le=\"0.00005\"} 1",
            "pdgate_decision_latency_seconds_bucket{le=\"0.005\"} 2",
            "pdgate_decision_latency_seconds_bucket{le=\"0.05\"} 3",
            "pdgate_decision_latency_seconds_bucket{le=\"2.5\"} 3",
            "pdgate_decision_latency_seconds_bucket{le=\"+Inf\"} 4",
            "pdgate_decision_latency_seconds_sum 9.033",
            "pdgate_decision_latency_seconds_count 4",
            "# TYPE pdgate_audit_queue_depth gauge",
            "pdgate_policy_reloads_total 0",
            "pdgate_decision_cache_hits_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        // Every sample line is `name{labels} value` or `name value` with a numeric value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad sample: {line}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
