//! Audit records shipped off the pod (`[telemetry] export_audit = true`): every record, once
//! the audit writer has written it (and synced it, with `fsync = "batch"`), is sent to the
//! OTLP/gRPC collector as an OpenTelemetry log record, so that a collector keeps the trail
//! beyond the pod's volume.
//!
//! The exporter subscribes to the written batches the way `AuditLog.Tail --follow` does
//! ([`AuditLog::subscribe`]); the writer never waits for it. An export that fails — the
//! collector down, slow, refusing — never blocks or denies a call: the local, hash-chained log
//! is the record of truth. Each record that is not exported is counted
//! (`pdgate_audit_export_failures_total`) and logged; a collector that falls behind by more
//! than the subscription's backlog loses the records in between, counted the same way (the
//! sequence numbers show the gap).
//!
//! It talks to the collector through opentelemetry-proto's `LogsService` client, not the
//! SDK's batch log processor, because the processor reports no export outcome that could be
//! counted.
//!
//! Each log record: the record's JSON line as its body; its time; severity INFO (allowed) or
//! WARN (denied); its trace and span ids when it has them; event name `pdgate.audit`; and
//! the attributes `pdgate.audit.seq`, `pdgate.decision_id`, `pdgate.decision`,
//! `pdgate.caller`, `pdgate.purpose`, `pdgate.action`, `pdgate.categories`,
//! `pdgate.subjects`, `pdgate.reasons`, `pdgate.policy_version`, `pdgate.kind` (and
//! `pdgate.method`, `pdgate.recipient`, `pdgate.detail` when set). Unlike spans, these carry
//! data-subject ids: they are the audit trail.

use crate::audit::{AuditLog, AuditRecord, Published};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, oneshot};
use tonic::transport::Channel;

/// How long one export may take before its records count as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the last exports.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Counts of the export: counters of the metrics registry
/// ([`Metrics::audit_export_stats`](super::metrics::Metrics::audit_export_stats)).
#[derive(Debug, Clone, Default)]
pub struct ExportStats {
    pub exported: prometheus_client::metrics::counter::Counter,
    pub failures: prometheus_client::metrics::counter::Counter,
}

/// The running exporter. [`AuditExport::finish`] exports what is already written and stops it.
pub struct AuditExport {
    /// Tells the task to export what it has and end; sent by `finish`.
    stop: oneshot::Sender<()>,
    /// The export task; it ends after `stop`, or when the audit log is gone.
    task: tokio::task::JoinHandle<()>,
}

impl AuditExport {
    /// Subscribes to `audit` and starts exporting to `endpoint` (`http://HOST:PORT`, already
    /// checked by the configuration). Inside a tokio runtime.
    pub fn start(
        audit: &AuditLog,
        endpoint: &str,
        service_name: &str,
        stats: ExportStats,
    ) -> Result<Self, super::TelemetryError> {
        let channel = Channel::from_shared(endpoint.to_owned())
            .map_err(|e| super::TelemetryError::Exporter {
                endpoint: endpoint.to_owned(),
                message: e.to_string(),
            })?
            .connect_timeout(EXPORT_TIMEOUT)
            .connect_lazy();
        let exporter = Exporter {
            client: LogsServiceClient::new(channel),
            resource: Resource {
                attributes: vec![string("service.name", service_name)],
                ..Resource::default()
            },
            stats,
            next_seq: None,
        };
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(exporter.run(audit.subscribe(), stopped));
        Ok(Self { stop, task })
    }

    /// Exports the batches already written, then stops (within [`FINISH_TIMEOUT`]).
    pub async fn finish(self) {
        let _ = self.stop.send(());
        if tokio::time::timeout(FINISH_TIMEOUT, self.task)
            .await
            .is_err()
        {
            tracing::warn!("audit export: the last records were not exported before shutdown");
        }
    }
}

struct Exporter {
    client: LogsServiceClient<Channel>,
    resource: Resource,
    stats: ExportStats,
    /// The sequence number expected next; a batch that starts later shows records missed.
    next_seq: Option<u64>,
}

impl Exporter {
    async fn run(
        mut self,
        mut batches: broadcast::Receiver<Arc<Published>>,
        mut stop: oneshot::Receiver<()>,
    ) {
        loop {
            let batch = tokio::select! {
                batch = batches.recv() => batch,
                _ = &mut stop => {
                    // What is written already goes out; what comes later is in the local log.
                    while let Ok(batch) = batches.try_recv() {
                        self.export(&batch).await;
                    }
                    return;
                }
            };
            match batch {
                Ok(batch) => self.export(&batch).await,
                // The gap shows in the next batch's sequence numbers, and is counted there.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    async fn export(&mut self, batch: &Published) {
        if let Some(expected) = self.next_seq
            && batch.first_seq > expected
        {
            let missed = batch.first_seq - expected;
            self.stats.failures.inc_by(missed);
            tracing::warn!(
                missed,
                from_seq = expected,
                "audit export fell behind; these records are in the local audit log only"
            );
        }
        let mut records = Vec::new();
        for (seq, line) in batch.records() {
            self.next_seq = Some(seq + 1);
            match serde_json::from_str::<AuditRecord>(line) {
                Ok(record) => records.push(log_record(&record, line.trim_end())),
                Err(e) => {
                    self.stats.failures.inc();
                    tracing::warn!(seq, error = %e, "audit export: a written record does not parse");
                }
            }
        }
        if records.is_empty() {
            return;
        }
        let sent = records.len() as u64;
        let request = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(self.resource.clone()),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "pdgate.audit".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..InstrumentationScope::default()
                    }),
                    log_records: records,
                    ..ScopeLogs::default()
                }],
                ..ResourceLogs::default()
            }],
        };
        let mut request = tonic::Request::new(request);
        request.set_timeout(EXPORT_TIMEOUT);
        let outcome = tokio::time::timeout(EXPORT_TIMEOUT, self.client.export(request)).await;
        match outcome {
            Ok(Ok(response)) => {
                // A collector may accept part of a request and say how many it rejected.
                let rejected = response
                    .into_inner()
                    .partial_success
                    .map_or(0, |p| u64::try_from(p.rejected_log_records).unwrap_or(0))
                    .min(sent);
                self.stats.exported.inc_by(sent - rejected);
                if rejected > 0 {
                    self.stats.failures.inc_by(rejected);
                    tracing::warn!(rejected, "audit export: the collector rejected records");
                }
            }
            Ok(Err(status)) => {
                self.stats.failures.inc_by(sent);
                tracing::warn!(records = sent, code = ?status.code(), message = status.message(), "audit export failed; the records are in the local audit log");
            }
            Err(_) => {
                self.stats.failures.inc_by(sent);
                tracing::warn!(records = sent, timeout = ?EXPORT_TIMEOUT, "audit export timed out; the records are in the local audit log");
            }
        }
    }
}

/// The log record of one audit record (`line`, its JSON as written).
fn log_record(record: &AuditRecord, line: &str) -> LogRecord {
    let b = &record.body;
    let mut attributes = vec![
        KeyValue {
            key: "pdgate.audit.seq".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(
                    i64::try_from(record.seq).unwrap_or(i64::MAX),
                )),
            }),
            ..KeyValue::default()
        },
        string("pdgate.decision_id", &b.decision_id),
        string("pdgate.decision", &b.decision),
        string("pdgate.caller", &b.caller),
        string("pdgate.purpose", &b.purpose),
        string("pdgate.action", &b.action),
        strings("pdgate.categories", &b.categories),
        strings("pdgate.subjects", &b.subjects),
        strings(
            "pdgate.reasons",
            &b.reasons.iter().map(|r| r.code.clone()).collect::<Vec<_>>(),
        ),
    ];
    if let Some(kind) = b.kind
        && let Ok(serde_json::Value::String(kind)) = serde_json::to_value(kind)
    {
        attributes.push(string("pdgate.kind", &kind));
    }
    for (key, value) in [
        ("pdgate.policy_version", &b.policy_version),
        ("pdgate.method", &b.method),
        ("pdgate.recipient", &b.recipient),
        ("pdgate.detail", &b.detail),
    ] {
        if let Some(value) = value {
            attributes.push(string(key, value));
        }
    }
    let allowed = b.decision == "allow";
    LogRecord {
        time_unix_nano: b.time_us.saturating_mul(1000),
        observed_time_unix_nano: crate::audit::now_us().saturating_mul(1000),
        severity_number: if allowed {
            SeverityNumber::Info
        } else {
            SeverityNumber::Warn
        } as i32,
        severity_text: if allowed { "INFO" } else { "WARN" }.into(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(line.to_owned())),
        }),
        attributes,
        trace_id: b
            .trace_id
            .as_deref()
            .and_then(|t| hex::decode(t).ok())
            .filter(|t| t.len() == 16)
            .unwrap_or_default(),
        span_id: b
            .span_id
            .as_deref()
            .and_then(|s| hex::decode(s).ok())
            .filter(|s| s.len() == 8)
            .unwrap_or_default(),
        event_name: "pdgate.audit".into(),
        ..LogRecord::default()
    }
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..KeyValue::default()
    }
}

fn strings(key: &str, values: &[String]) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::ArrayValue(ArrayValue {
                values: values
                    .iter()
                    .map(|v| AnyValue {
                        value: Some(any_value::Value::StringValue(v.clone())),
                    })
                    .collect(),
            })),
        }),
        ..KeyValue::default()
    }
}
