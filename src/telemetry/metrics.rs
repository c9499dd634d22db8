//! The metrics registry: pdgate's own counters and latency histogram, kept in atomics, plus the
//! counters other parts already keep (the decision cache's [`CacheStats`], the audit log's
//! queue and [`AuditStats`](crate::audit::AuditStats), the subject registry's reads), read when
//! asked. It is the one source of truth for both outputs: `GET /metrics` (API port and probe
//! listener) renders it in the Prometheus text format through `prometheus-client`'s encoder
//! ([`Metrics::render_prometheus`]), and with OTLP on, observable instruments read the same
//! values ([`register`]; the series added for the platform team below the first table are
//! Prometheus-only so far).
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
//!
//! Prometheus only:
//!
//! | Prometheus | what |
//! |---|---|
//! | `pdgate_upstream_responses_total{code}` | calls forwarded upstream, by the gRPC status they ended with (`UNAVAILABLE`: the upstream could not be reached; `CANCELLED`: the call ended — deadline, caller gone — before the upstream's status) |
//! | `pdgate_calls_in_flight`, `pdgate_calls_in_flight_limit` | data-plane calls holding a slot, and `max_concurrent_calls` |
//! | `pdgate_calls_shed_total` | data-plane calls refused `RESOURCE_EXHAUSTED` because every slot was taken |
//! | `pdgate_response_records_dropped_total` | records of a response stream left out because their subject was denied (`records` routes) |
//! | `pdgate_audit_write_seconds`, `pdgate_audit_sync_seconds` (histograms) | one audit batch's write, one sync of the segment |
//! | `pdgate_registry_reads_total`, `pdgate_registry_read_failures_total` | subject-registry reads on the decision path, and those that failed or timed out (their calls denied `SUBJECT_STATE_UNAVAILABLE`) |
//! | `pdgate_tls_reloads_total`, `pdgate_tls_reload_failures_total` | certificate/key/client-CA changes taken, and changed files refused (the previous ones kept) |
//! | `pdgate_audit_exported_total`, `pdgate_audit_export_failures_total` | audit records exported as OTLP log records (`[telemetry] export_audit`), and those not exported (they stay in the local log) |
//! | `process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`, `process_start_time_seconds` | the process, read from `/proc/self` at each scrape (Linux; absent elsewhere) |
//! | `pdgate_build_info{version, profile, os, arch}` | always 1 |
//!
//! The OTLP names follow OpenTelemetry's conventions; a collector that exports to Prometheus
//! turns them into exactly the names of the first column.
//!
//! Label values are bounded: `decision` has two values, `reason` one per reason code, and
//! `purpose` is a purpose the policy defines, `(none)` when the call declared none or
//! `(unknown)` when the policy does not know it — a caller cannot create series at will.

use crate::audit::AuditLog;
use crate::decision::{CacheStats, ReasonCode, ShadowStats};
use crate::registry::ReadStats;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Histogram, Meter};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
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

/// The `code` label values of `pdgate_upstream_responses_total`, indexed by the gRPC code's
/// number (as `tonic::Code` numbers them).
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The registry. Recording a decision takes a shared read lock and two atomic additions; the
/// write lock is taken once per new purpose. The other per-call records are one atomic
/// addition on a counter made at start (no label is built per call).
pub struct Metrics {
    state: Arc<State>,
    /// What `/metrics` encodes: the library's own metrics below, and [`Observed`], which reads
    /// [`State`] at each scrape.
    registry: Registry,
    reloads: Counter,
    reload_failures: Counter,
    fields_cleared: Counter,
    fields_unknown: Counter,
    /// One counter per gRPC code, indexed as [`GRPC_CODES`].
    upstream: [Counter; 17],
    shed: Counter,
    records_dropped: Counter,
    tls_reloads: Counter,
    tls_reload_failures: Counter,
    /// Kept by the audit export (`[telemetry] export_audit`), at 0 without it.
    audit_export: crate::telemetry::audit_export::ExportStats,
}

/// What the scrape-time collector reads: atomics of pdgate's own, and of the parts that keep
/// their own counters. Parts that come after the registry is built (the call slots, the
/// subject registry, a shadow policy's counters) are set once.
struct State {
    /// Per `purpose` label, the decisions by outcome slot.
    decisions: RwLock<FxHashMap<Box<str>, Box<[AtomicU64; SLOTS]>>>,
    latency: LatencyHistogram,
    cache: Arc<CacheStats>,
    shadow: OnceLock<Arc<ShadowStats>>,
    audit: AuditLog,
    reads: OnceLock<Arc<ReadStats>>,
    slots: OnceLock<(Arc<tokio::sync::Semaphore>, usize)>,
}

/// The collector registered for [`State`].
#[derive(Clone)]
struct Observed(Arc<State>);

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
        let state = Arc::new(State {
            decisions: RwLock::default(),
            latency: LatencyHistogram {
                buckets: std::array::from_fn(|_| AtomicU64::new(0)),
                sum_ns: AtomicU64::new(0),
            },
            cache,
            shadow: OnceLock::new(),
            audit: audit.clone(),
            reads: OnceLock::new(),
            slots: OnceLock::new(),
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Observed(state.clone())));
        // `_total` is the encoder's: counters are registered without it.
        // The library ends every help text with a period of its own.
        let mut counter = |name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help.trim_end_matches('.'), counter.clone());
            counter
        };
        let reloads = counter(
            "pdgate_policy_reloads",
            "Policy reloads swapped in (file watch, Apply, Rollback).",
        );
        let reload_failures = counter(
            "pdgate_policy_reload_failures",
            "Policy reloads rejected, the last good policy kept.",
        );
        let fields_cleared = counter(
            "pdgate_response_fields_cleared",
            "Response fields cleared because the decision minimized their category.",
        );
        let fields_unknown = counter(
            "pdgate_response_fields_unknown",
            "Response fields dropped because the service's descriptors do not know them.",
        );
        let records_dropped = counter(
            "pdgate_response_records_dropped",
            "Records of a response stream left out because the decision for their subject was a deny.",
        );
        let shed = counter(
            "pdgate_calls_shed",
            "Data-plane calls refused RESOURCE_EXHAUSTED because max_concurrent_calls were in flight.",
        );
        let tls_reloads = counter(
            "pdgate_tls_reloads",
            "Changed TLS files (certificate, key, client CA) taken for new connections.",
        );
        let tls_reload_failures = counter(
            "pdgate_tls_reload_failures",
            "Changed TLS files refused (unreadable, unparsable, key not matching); the previous ones kept.",
        );
        let audit_export = crate::telemetry::audit_export::ExportStats {
            exported: counter(
                "pdgate_audit_exported",
                "Audit records exported to the OTLP collector as log records ([telemetry] export_audit).",
            ),
            failures: counter(
                "pdgate_audit_export_failures",
                "Audit records not exported (collector down, slow or refusing, or fallen behind); they are in the local audit log.",
            ),
        };
        let upstream_family = Family::<[(&'static str, &'static str); 1], Counter>::default();
        // Every code's series exists from the start (at 0), so that a rate over it is defined
        // before the first failure.
        let upstream = std::array::from_fn(|i| {
            upstream_family
                .get_or_create(&[("code", GRPC_CODES[i])])
                .clone()
        });
        registry.register(
            "pdgate_upstream_responses",
            "Calls forwarded to the upstream, by the gRPC status they ended with (UNAVAILABLE: not reached; CANCELLED: ended before the upstream's status)",
            upstream_family,
        );
        let audit_stats = audit.stats();
        registry.register(
            "pdgate_audit_write_seconds",
            "Time to write one batch of audit records",
            audit_stats.write_seconds.clone(),
        );
        registry.register(
            "pdgate_audit_sync_seconds",
            "Time to sync the audit segment to disk (per batch, at rotation, or on the interval)",
            audit_stats.sync_seconds.clone(),
        );
        registry.register(
            "pdgate_build",
            "pdgate's version and build; always 1",
            Info::new([
                ("version", env!("CARGO_PKG_VERSION")),
                (
                    "profile",
                    if cfg!(debug_assertions) {
                        "debug"
                    } else {
                        "release"
                    },
                ),
                ("os", std::env::consts::OS),
                ("arch", std::env::consts::ARCH),
            ]),
        );
        Self {
            state,
            registry,
            reloads,
            reload_failures,
            fields_cleared,
            fields_unknown,
            upstream,
            shed,
            records_dropped,
            tls_reloads,
            tls_reload_failures,
            audit_export,
        }
    }

    /// The counters the audit export keeps (`pdgate_audit_exported_total`,
    /// `pdgate_audit_export_failures_total`).
    pub fn audit_export_stats(&self) -> crate::telemetry::audit_export::ExportStats {
        self.audit_export.clone()
    }

    /// Reports `stats` (the decider's shadow differences) as `pdgate_shadow_differences_total`.
    #[must_use]
    pub fn with_shadow_stats(self, stats: Arc<ShadowStats>) -> Self {
        let _ = self.state.shadow.set(stats);
        self
    }

    /// Reports `stats` (the subject registry's reads on the decision path) as
    /// `pdgate_registry_reads_total` and `pdgate_registry_read_failures_total`.
    pub fn report_registry_reads(&self, stats: Arc<ReadStats>) {
        let _ = self.state.reads.set(stats);
    }

    /// Reports the data plane's call slots as `pdgate_calls_in_flight` (slots taken) and
    /// `pdgate_calls_in_flight_limit`. Read at each scrape: nothing is counted per call. The
    /// first data plane of this registry is the one reported.
    pub fn watch_call_slots(&self, slots: Arc<tokio::sync::Semaphore>, limit: usize) {
        let _ = self.state.slots.set((slots, limit));
    }

    /// `(active, shadow, count)` for both kinds of difference.
    pub fn shadow_differences(&self) -> [(&'static str, &'static str, u64); 2] {
        self.state.shadow_differences()
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
        let decisions = &self.state.decisions;
        {
            let map = decisions.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(counts) = map.get(purpose) {
                add(counts);
                drop(map);
                self.state.latency.observe(latency);
                return;
            }
        }
        {
            let mut map = decisions.write().unwrap_or_else(PoisonError::into_inner);
            add(map
                .entry(purpose.into())
                .or_insert_with(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0)))));
        }
        self.state.latency.observe(latency);
    }

    /// Counts a policy reload that was swapped in (`gate::manager`).
    pub fn record_reload(&self) {
        self.reloads.inc();
    }

    /// Counts what minimizing a response message did: fields cleared for their category, and
    /// fields the descriptors do not know, dropped.
    pub fn record_minimized(&self, cleared: u32, unknown: u32) {
        if cleared > 0 {
            self.fields_cleared.inc_by(u64::from(cleared));
        }
        if unknown > 0 {
            self.fields_unknown.inc_by(u64::from(unknown));
        }
    }

    /// Counts a policy reload that was rejected (the last good policy stays).
    pub fn record_reload_failure(&self) {
        self.reload_failures.inc();
    }

    /// Counts a forwarded call's end by the gRPC status it ended with.
    pub fn record_upstream(&self, code: tonic::Code) {
        let index = usize::try_from(code as i32).unwrap_or(2);
        if let Some(counter) = self.upstream.get(index) {
            counter.inc();
        }
    }

    /// Counts a record of a response stream left out (its subject's decision was a deny).
    pub fn record_dropped_record(&self) {
        self.records_dropped.inc();
    }

    /// Counts a data-plane call shed because every call slot was taken.
    pub fn record_shed(&self) {
        self.shed.inc();
    }

    /// Counts a change of the TLS files: taken (`true`) or refused.
    pub fn record_tls_reload(&self, taken: bool) {
        if taken {
            self.tls_reloads.inc();
        } else {
            self.tls_reload_failures.inc();
        }
    }

    /// Every series of `pdgate_decisions_total` with a count, sorted by purpose, decision and
    /// reason.
    pub fn decisions(&self) -> Vec<DecisionSeries> {
        self.state.decisions()
    }

    /// The whole registry in the Prometheus text exposition format (version 0.0.4, the
    /// `Content-Type` of [`prometheus_client::encoding::prometheus_text::CONTENT_TYPE`]).
    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing into a String fails only if an encoder reports an error of its own; what was
        // written until then is served.
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::warn!(error = %e, "metrics exposition cut short");
        }
        out
    }

    /// The unlabelled series reported over OTLP as well: (Prometheus name, type, help, value).
    fn scalars(&self) -> [(&'static str, &'static str, &'static str, u64); 10] {
        let state = &self.state;
        let audit = state.audit.stats();
        [
            (
                "pdgate_decision_cache_hits_total",
                "counter",
                HELP_CACHE_HITS,
                state.cache.hits.load(Ordering::Relaxed),
            ),
            (
                "pdgate_decision_cache_misses_total",
                "counter",
                HELP_CACHE_MISSES,
                state.cache.misses.load(Ordering::Relaxed),
            ),
            (
                "pdgate_policy_reloads_total",
                "counter",
                "Policy reloads swapped in (file watch, Apply, Rollback).",
                self.reloads.get(),
            ),
            (
                "pdgate_policy_reload_failures_total",
                "counter",
                "Policy reloads rejected, the last good policy kept.",
                self.reload_failures.get(),
            ),
            (
                "pdgate_audit_queue_depth",
                "gauge",
                HELP_QUEUE_DEPTH,
                state.queue_depth(),
            ),
            (
                "pdgate_audit_records_written_total",
                "counter",
                HELP_WRITTEN,
                audit.written.load(Ordering::Relaxed),
            ),
            (
                "pdgate_audit_write_failures_total",
                "counter",
                HELP_WRITE_FAILURES,
                audit.write_failures.load(Ordering::Relaxed),
            ),
            (
                "pdgate_audit_refused_total",
                "counter",
                HELP_REFUSED,
                audit.refused_full.load(Ordering::Relaxed),
            ),
            (
                "pdgate_response_fields_cleared_total",
                "counter",
                "Response fields cleared because the decision minimized their category.",
                self.fields_cleared.get(),
            ),
            (
                "pdgate_response_fields_unknown_total",
                "counter",
                "Response fields dropped because the service's descriptors do not know them.",
                self.fields_unknown.get(),
            ),
        ]
    }
}

const HELP_DECISIONS: &str = "Access decisions, by decision, purpose and first reason code.";
const HELP_LATENCY: &str =
    "Time from a call's arrival until its decision is final, audit record written.";
const HELP_CACHE_HITS: &str = "Decision cache lookups that found the decision.";
const HELP_CACHE_MISSES: &str = "Decision cache lookups that computed the decision.";
const HELP_QUEUE_DEPTH: &str = "Audit records waiting for the writer.";
const HELP_WRITTEN: &str = "Audit records written.";
const HELP_WRITE_FAILURES: &str =
    "Audit records whose write failed; their calls were denied (AUDIT_UNAVAILABLE).";
const HELP_REFUSED: &str = "Audit records refused because the writer's queue was full; their calls were denied (AUDIT_UNAVAILABLE).";
const HELP_SHADOW: &str =
    "Calls a shadow policy decided otherwise than the active (enforced) policy.";

impl State {
    fn shadow_differences(&self) -> [(&'static str, &'static str, u64); 2] {
        let (allow_deny, deny_allow) = self.shadow.get().map_or((0, 0), |s| {
            (
                s.allow_deny.load(Ordering::Relaxed),
                s.deny_allow.load(Ordering::Relaxed),
            )
        });
        [("allow", "deny", allow_deny), ("deny", "allow", deny_allow)]
    }

    fn queue_depth(&self) -> u64 {
        u64::try_from(self.audit.queue_depth()).unwrap_or(u64::MAX)
    }

    fn decisions(&self) -> Vec<DecisionSeries> {
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
}

impl std::fmt::Debug for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed").finish_non_exhaustive()
    }
}

impl Collector for Observed {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = &self.0;
        {
            let mut metric = encoder.encode_descriptor(
                "pdgate_decisions",
                HELP_DECISIONS,
                None,
                MetricType::Counter,
            )?;
            for s in state.decisions() {
                let labels = [
                    ("decision", s.decision),
                    ("purpose", s.purpose.as_str()),
                    ("reason", s.reason),
                ];
                ConstCounter::new(s.count).encode(metric.encode_family(&labels)?)?;
            }
        }
        {
            let (buckets, sum, count) = state.latency.read();
            encoder
                .encode_descriptor(
                    "pdgate_decision_latency_seconds",
                    HELP_LATENCY,
                    None,
                    MetricType::Histogram,
                )?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        let audit = state.audit.stats();
        let counters = [
            (
                "pdgate_decision_cache_hits",
                HELP_CACHE_HITS,
                state.cache.hits.load(Ordering::Relaxed),
            ),
            (
                "pdgate_decision_cache_misses",
                HELP_CACHE_MISSES,
                state.cache.misses.load(Ordering::Relaxed),
            ),
            (
                "pdgate_audit_records_written",
                HELP_WRITTEN,
                audit.written.load(Ordering::Relaxed),
            ),
            (
                "pdgate_audit_write_failures",
                HELP_WRITE_FAILURES,
                audit.write_failures.load(Ordering::Relaxed),
            ),
            (
                "pdgate_audit_refused",
                HELP_REFUSED,
                audit.refused_full.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            ConstCounter::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        gauge(
            &mut encoder,
            "pdgate_audit_queue_depth",
            HELP_QUEUE_DEPTH,
            state.queue_depth(),
        )?;
        {
            let mut metric = encoder.encode_descriptor(
                "pdgate_shadow_differences",
                HELP_SHADOW,
                None,
                MetricType::Counter,
            )?;
            for (active, shadow, count) in state.shadow_differences() {
                let labels = [("active", active), ("shadow", shadow)];
                ConstCounter::new(count).encode(metric.encode_family(&labels)?)?;
            }
        }
        if let Some(reads) = state.reads.get() {
            ConstCounter::new(reads.reads.load(Ordering::Relaxed)).encode(
                encoder.encode_descriptor(
                    "pdgate_registry_reads",
                    "Subject-registry reads on the decision path (a subject not in the cache, or stale).",
                    None,
                    MetricType::Counter,
                )?,
            )?;
            ConstCounter::new(reads.failures.load(Ordering::Relaxed)).encode(
                encoder.encode_descriptor(
                    "pdgate_registry_read_failures",
                    "Subject-registry reads that failed or timed out; their calls were denied (SUBJECT_STATE_UNAVAILABLE).",
                    None,
                    MetricType::Counter,
                )?,
            )?;
        }
        if let Some((slots, limit)) = state.slots.get() {
            let limit = u64::try_from(*limit).unwrap_or(u64::MAX);
            let free = u64::try_from(slots.available_permits()).unwrap_or(0);
            gauge(
                &mut encoder,
                "pdgate_calls_in_flight",
                "Data-plane calls in flight (each holds a slot until its response ends).",
                limit.saturating_sub(free),
            )?;
            gauge(
                &mut encoder,
                "pdgate_calls_in_flight_limit",
                "The most data-plane calls in flight at once (max_concurrent_calls).",
                limit,
            )?;
        }
        super::process::encode(&mut encoder)
    }
}

/// Encodes one unlabelled gauge.
pub(super) fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let value = i64::try_from(value).unwrap_or(i64::MAX);
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
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

    /// Every bucket as `(upper bound, count in it)`, not cumulative, `+Inf` last; the sum in
    /// seconds and the count.
    fn read(&self) -> ([(f64, u64); LATENCY_BUCKETS.len() + 1], f64, u64) {
        let buckets: [(f64, u64); LATENCY_BUCKETS.len() + 1] = std::array::from_fn(|i| {
            (
                LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY),
                self.buckets[i].load(Ordering::Relaxed),
            )
        });
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed)).as_secs_f64();
        (buckets, sum, count)
    }
}

/// Registers the OTLP instruments on `meter`: observable ones that read `metrics` at each
/// collection, and the latency histogram, which has no observable form and so is recorded as
/// decisions are made (returned, for [`super::Telemetry`] to record into). Its buckets are the
/// registry's.
pub fn register(metrics: &Arc<Metrics>, meter: &Meter) -> Histogram<f64> {
    let m = metrics.clone();
    let _ = meter
        .u64_observable_counter("pdgate.decisions")
        .with_description(HELP_DECISIONS)
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
        .with_description(HELP_SHADOW)
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
        .with_description(HELP_LATENCY)
        .with_unit("s")
        .with_boundaries(LATENCY_BUCKETS.to_vec())
        .build()
}

#[cfg(test)]
mod tests;
