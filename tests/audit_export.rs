//! `[telemetry] export_audit`: every audit record, once written, reaches an OTLP/gRPC
//! collector as a log record — here a real tonic server of opentelemetry-proto's
//! `LogsService` on 127.0.0.1:0 — whose fields are the record's (decision id, caller,
//! purpose, subjects, decision, reasons). A collector that is down never holds up or denies a
//! call; the records it did not get are counted in `pdgate_audit_export_failures_total`.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::ports::ClosedPort;
use common::{Harness, Options, call, decision_id};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use pdgate::proto::demo::GetBillingStatementRequest;
use pdgate::telemetry::TelemetrySettings;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Code;

/// The log records a collector received, with the `service.name` of their resource.
#[derive(Clone, Default)]
struct Collector {
    records: Arc<Mutex<Vec<(String, LogRecord)>>>,
}

#[tonic::async_trait]
impl LogsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_logs {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| text(a.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for scope in resource.scope_logs {
                assert_eq!(scope.scope.unwrap().name, "pdgate.audit");
                for record in scope.log_records {
                    self.records.lock().unwrap().push((service.clone(), record));
                }
            }
        }
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

impl Collector {
    async fn start() -> (Self, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Self::default();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(LogsServiceServer::new(collector.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (collector, addr)
    }

    /// The record whose `pdgate.decision_id` is `id`, once it has arrived (10 s at most:
    /// the export runs beside the calls, on a loaded machine).
    async fn record(&self, id: &str) -> (String, LogRecord) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self
                .records
                .lock()
                .unwrap()
                .iter()
                .find(|(_, r)| attribute(r, "pdgate.decision_id").as_deref() == Some(id))
                .cloned();
            if let Some(found) = found {
                return found;
            }
            assert!(Instant::now() < deadline, "no log record for decision {id}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn attribute(record: &LogRecord, key: &str) -> Option<String> {
    record
        .attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| text(a.value.as_ref()?.value.as_ref()?))
}

fn list(record: &LogRecord, key: &str) -> Vec<String> {
    let value = record
        .attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .unwrap_or_else(|| panic!("no attribute `{key}`"));
    match value {
        Value::ArrayValue(array) => array
            .values
            .iter()
            .filter_map(|v| text(v.value.as_ref()?))
            .collect(),
        other => panic!("`{key}` is not a list: {other:?}"),
    }
}

fn exporting_to(endpoint: SocketAddr) -> Options {
    Options {
        telemetry: TelemetrySettings {
            otlp_endpoint: Some(format!("http://{endpoint}")),
            service_name: "pdgate-audit-test".into(),
            metrics_interval: Duration::from_secs(60),
            export_audit: true,
        },
        ..Options::default()
    }
}

fn statement(customer: &str) -> GetBillingStatementRequest {
    GetBillingStatementRequest {
        customer_id: customer.into(),
        month: String::new(),
    }
}

#[tokio::test]
async fn each_written_record_reaches_the_collector_as_a_log_record() {
    let (collector, endpoint) = Collector::start().await;
    let mut h = Harness::with(exporting_to(endpoint)).await;
    let mut client = h.client().await;

    // Allowed: billing reads a customer's statement for billing.
    let response = client
        .get_billing_statement(call(
            statement("cust-1"),
            "billing-service",
            "service.billing",
            &["cust-1"],
        ))
        .await
        .unwrap();
    let allowed_id = decision_id(response.metadata()).unwrap();
    // Denied: marketing has no grant on billing data.
    let status = client
        .get_billing_statement(call(
            statement("cust-2"),
            "marketing-service",
            "marketing.email",
            &["cust-2"],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let denied_id = decision_id(status.metadata()).unwrap();

    let records = h.audit_records();
    for (id, decision) in [(&allowed_id, "allow"), (&denied_id, "deny")] {
        let audited = records.iter().find(|r| &r.body.decision_id == id).unwrap();
        let (service, exported) = collector.record(id).await;
        assert_eq!(service, "pdgate-audit-test");
        assert_eq!(
            attribute(&exported, "pdgate.decision").as_deref(),
            Some(decision)
        );
        assert_eq!(
            attribute(&exported, "pdgate.caller"),
            Some(audited.body.caller.clone())
        );
        assert_eq!(
            attribute(&exported, "pdgate.purpose"),
            Some(audited.body.purpose.clone())
        );
        assert_eq!(list(&exported, "pdgate.subjects"), audited.body.subjects);
        assert_eq!(
            list(&exported, "pdgate.categories"),
            audited.body.categories
        );
        assert_eq!(
            list(&exported, "pdgate.reasons"),
            audited
                .body
                .reasons
                .iter()
                .map(|r| r.code.clone())
                .collect::<Vec<_>>()
        );
        assert_eq!(exported.time_unix_nano, audited.body.time_us * 1000);
        assert_eq!(exported.event_name, "pdgate.audit");
        // The body is the record as written: it parses back to the same record.
        let Some(Value::StringValue(body)) = exported.body.and_then(|b| b.value) else {
            panic!("the body is the record's line");
        };
        let parsed: pdgate::audit::AuditRecord = serde_json::from_str(&body).unwrap();
        assert_eq!(&parsed, audited);
    }
    let (_, allowed) = collector.record(&allowed_id).await;
    assert_eq!(
        attribute(&allowed, "pdgate.caller").as_deref(),
        Some("billing-service")
    );
    assert_eq!(list(&allowed, "pdgate.subjects"), ["cust-1"]);
    let (_, denied) = collector.record(&denied_id).await;
    assert_eq!(denied.severity_text, "WARN");
    assert_eq!(list(&denied, "pdgate.reasons")[0], "NO_GRANT");

    let metrics = h.gate.telemetry().metrics().render_prometheus();
    assert!(
        metrics.contains("pdgate_audit_export_failures_total 0"),
        "{metrics}"
    );
    h.shutdown().await.unwrap();
}

/// A collector that is down: every call is answered as without export, and the records that
/// could not be exported are counted (they are in the local log).
#[tokio::test]
async fn a_collector_that_is_down_holds_up_no_call_and_is_counted() {
    let closed = ClosedPort::new();
    let mut h = Harness::with(exporting_to(closed.addr)).await;
    let mut client = h.client().await;
    for i in 0..5 {
        let started = Instant::now();
        let response = client
            .get_billing_statement(call(
                statement("cust-1"),
                "billing-service",
                "service.billing",
                &["cust-1"],
            ))
            .await;
        assert!(response.is_ok(), "call {i}: {response:?}");
        println!("call {i} answered in {:?}", started.elapsed());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = h.gate.telemetry().metrics().render_prometheus();
        let failures = metrics
            .lines()
            .find_map(|l| l.strip_prefix("pdgate_audit_export_failures_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if failures >= 5 {
            assert!(
                metrics.contains("pdgate_audit_exported_total 0"),
                "{metrics}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "failures not counted: {failures}\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.audit_records().len(), 5, "the local log has every record");
    h.shutdown().await.unwrap();
}

/// `export_audit` is off by default and needs a collector to export to.
#[test]
fn export_audit_is_off_by_default_and_needs_an_endpoint() {
    let policy = common::policy_dir();
    let resolve = |text: &str| {
        let text = format!("policy = {:?}\n{text}", policy.display().to_string());
        toml::from_str::<pdgate::config::FileConfig>(&text)
            .unwrap()
            .resolve("pdgate.toml")
    };
    assert!(!resolve("").unwrap().telemetry.export_audit);
    let on =
        resolve("[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\nexport_audit = true\n")
            .unwrap();
    assert!(on.telemetry.export_audit);
    let e = resolve("[telemetry]\nexport_audit = true\n").unwrap_err();
    assert_eq!(e.key, "telemetry.export_audit");
    assert!(e.message.contains("only with `otlp_endpoint`"), "{e}");
}
