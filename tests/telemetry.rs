//! Telemetry over real sockets: an OTLP collector runs in-process (tonic servers of the OTLP
//! trace and metrics services, on 127.0.0.1:0) and receives, from a sidecar pointed at it, one
//! span per decision with the decision as attributes, parented on the caller's `traceparent`;
//! the upstream sees pdgate's span as its parent; the metrics arrive too; the spans and
//! metrics still buffered at shutdown are flushed (in-process and by `pdgate serve` on
//! SIGTERM). `GET /metrics` on the API port answers Prometheus text over HTTP/1 and HTTP/2,
//! counting the calls made.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::{Harness, Options, call, decision_id};
use envoy_types::ext_authz::v3::pb::CheckRequest as EnvoyCheckRequest;
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as NumberValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use pdgate::proto::demo::{GetBillingStatementRequest, GetProfileRequest};
use pdgate::proto::v1::CheckRequest;
use pdgate::proto::v1::access_control_client::AccessControlClient;
use pdgate::telemetry::TelemetrySettings;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;
use tonic::{Response, Status};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const BILLING: &str = "demo.customer.v1.CustomerData/GetBillingStatement";

// ---------------------------------------------------------------------------------------------
// The collector

/// An OTLP receiver that keeps everything it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
    /// `service.name` of every resource that sent spans.
    services: Arc<Mutex<Vec<String>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        for resource in request.into_inner().resource_spans {
            if let Some(name) = resource
                .resource
                .as_ref()
                .and_then(|r| string(&r.attributes, "service.name"))
            {
                self.services.lock().unwrap().push(name);
            }
            for scope in resource.scope_spans {
                self.spans.lock().unwrap().extend(scope.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Collector {
    /// Serves the OTLP services on 127.0.0.1:0 for the rest of the test.
    async fn start() -> (Self, SocketAddr) {
        let collector = Self::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpIncoming::from(listener));
        tokio::spawn(server);
        (collector, addr)
    }

    fn settings(addr: SocketAddr) -> TelemetrySettings {
        TelemetrySettings {
            otlp_endpoint: Some(format!("http://{addr}")),
            service_name: "pdgate-test".into(),
            metrics_interval: Duration::from_secs(60),
            export_audit: false,
        }
    }

    /// The span whose `pdgate.decision_id` is `id`.
    fn span(&self, id: &str) -> Span {
        let spans = self.spans.lock().unwrap();
        let found: Vec<&Span> = spans
            .iter()
            .filter(|s| string(&s.attributes, "pdgate.decision_id").as_deref() == Some(id))
            .collect();
        assert_eq!(found.len(), 1, "one span for decision {id} in {spans:#?}");
        found[0].clone()
    }

    /// The latest value of each data point of the sum `name`, by its attributes.
    fn sums(&self, name: &str) -> HashMap<Vec<(String, String)>, i64> {
        let mut points = HashMap::new();
        for request in self.metrics.lock().unwrap().iter() {
            let metrics = request
                .resource_metrics
                .iter()
                .flat_map(|r| &r.scope_metrics)
                .flat_map(|s| &s.metrics)
                .filter(|m| m.name == name);
            for metric in metrics {
                let Some(Data::Sum(sum)) = &metric.data else {
                    panic!("`{name}` is a sum: {metric:?}");
                };
                for point in &sum.data_points {
                    let mut labels: Vec<(String, String)> = point
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv)))
                        .collect();
                    labels.sort();
                    let Some(NumberValue::AsInt(value)) = point.value else {
                        panic!("`{name}` counts in integers: {point:?}");
                    };
                    points.insert(labels, value);
                }
            }
        }
        points
    }

    /// Data points of the latency histogram: the latest count.
    fn latency_count(&self) -> u64 {
        let mut count = 0;
        for request in self.metrics.lock().unwrap().iter() {
            for metric in request
                .resource_metrics
                .iter()
                .flat_map(|r| &r.scope_metrics)
                .flat_map(|s| &s.metrics)
                .filter(|m| m.name == "pdgate.decision.latency")
            {
                let Some(Data::Histogram(h)) = &metric.data else {
                    panic!("the latency is a histogram: {metric:?}");
                };
                count = h.data_points.iter().map(|p| p.count).sum();
            }
        }
        count
    }
}

/// A string attribute.
fn string(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

fn attribute<'a>(span: &'a Span, key: &str) -> &'a AnyValue {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .unwrap_or_else(|| panic!("span `{}` has no `{key}`: {:?}", span.name, span.attributes))
}

fn attr_str(span: &Span, key: &str) -> String {
    match attribute(span, key) {
        AnyValue::StringValue(s) => s.clone(),
        other => panic!("`{key}` is not a string: {other:?}"),
    }
}

fn attr_strings(span: &Span, key: &str) -> Vec<String> {
    match attribute(span, key) {
        AnyValue::ArrayValue(a) => a
            .values
            .iter()
            .map(|v| match v.value.as_ref() {
                Some(AnyValue::StringValue(s)) => s.clone(),
                other => panic!("`{key}` holds a non-string: {other:?}"),
            })
            .collect(),
        other => panic!("`{key}` is not an array: {other:?}"),
    }
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `(trace id, parent span id)` of a `traceparent` value.
fn parse_traceparent(value: &str) -> (String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent `{value}`");
    assert_eq!(parts[0], "00");
    (parts[1].to_owned(), parts[2].to_owned())
}

fn billing(subject: &str) -> tonic::Request<GetBillingStatementRequest> {
    call(
        GetBillingStatementRequest {
            customer_id: subject.into(),
            month: String::new(),
        },
        "billing-service",
        "service.billing",
        &[subject],
    )
}

fn marketing_profile() -> tonic::Request<GetProfileRequest> {
    call(
        GetProfileRequest {
            customer_id: "cust-1".into(),
        },
        "marketing-service",
        "marketing.email",
        &["cust-1"],
    )
}

fn with_traceparent<T>(mut request: tonic::Request<T>, span: &str) -> tonic::Request<T> {
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{span}-01").parse().unwrap(),
    );
    request
}

// ---------------------------------------------------------------------------------------------
// Spans

#[tokio::test]
async fn a_call_is_one_span_parented_on_the_caller_and_the_upstream_continues_it() {
    let (collector, addr) = Collector::start().await;
    let mut h = Harness::with(Options {
        telemetry: Collector::settings(addr),
        ..Options::default()
    })
    .await;
    let mut client = h.client().await;

    // Allowed, with the caller's trace context.
    let response = client
        .get_billing_statement(with_traceparent(billing("cust-1"), CALLER_SPAN))
        .await
        .unwrap();
    let allowed_id = decision_id(response.metadata()).unwrap();
    let upstream = h.service.last_metadata("traceparent").unwrap();
    let (upstream_trace, upstream_parent) = parse_traceparent(&upstream);
    assert_eq!(
        upstream_trace, TRACE,
        "the upstream continues the caller's trace"
    );
    assert_ne!(
        upstream_parent, CALLER_SPAN,
        "the upstream's parent is pdgate's span, not the caller's"
    );
    assert_eq!(
        h.service.last_metadata("tracestate"),
        None,
        "no empty tracestate"
    );

    // Denied: a span too, and the upstream never sees the call.
    let status = client
        .get_profile(with_traceparent(marketing_profile(), "1111111111111111"))
        .await
        .unwrap_err();
    let denied_id = decision_id(status.metadata()).unwrap();
    assert_eq!(h.service.calls(), 1);

    // Allowed, without a trace context: pdgate starts the trace and passes it on.
    let response = client
        .get_billing_statement(billing("cust-2"))
        .await
        .unwrap();
    let root_id = decision_id(response.metadata()).unwrap();
    let (root_trace, root_parent) =
        parse_traceparent(&h.service.last_metadata("traceparent").unwrap());
    assert_ne!(root_trace, TRACE);

    let records = h.audit_records();
    // Shutdown exports what the batch processor still holds.
    h.shutdown().await.unwrap();

    let span = collector.span(&allowed_id);
    assert_eq!(span.name, BILLING);
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(hex(&span.trace_id), TRACE, "same trace as the caller");
    assert_eq!(
        hex(&span.parent_span_id),
        CALLER_SPAN,
        "child of the caller's span"
    );
    assert_eq!(
        hex(&span.span_id),
        upstream_parent,
        "parent of the upstream's span"
    );
    assert_eq!(attr_str(&span, "pdgate.decision"), "allow");
    assert!(attr_strings(&span, "pdgate.reasons").is_empty());
    assert_eq!(attr_str(&span, "pdgate.caller"), "billing-service");
    assert_eq!(attr_str(&span, "pdgate.purpose"), "service.billing");
    assert_eq!(attr_str(&span, "pdgate.action"), "read");
    assert_eq!(
        attr_strings(&span, "pdgate.categories"),
        ["customer.billing"]
    );
    assert_eq!(attr_str(&span, "pdgate.policy_version").len(), 64);
    assert_eq!(attr_str(&span, "pdgate.decision_id"), allowed_id);
    assert!(matches!(
        attribute(&span, "pdgate.cache_hit"),
        AnyValue::BoolValue(false)
    ));
    assert_eq!(attr_str(&span, "rpc.method"), BILLING);
    assert_eq!(attr_str(&span, "rpc.system"), "grpc");
    assert_eq!(attr_str(&span, "pdgate.method"), format!("/{BILLING}"));
    // No data-subject ids in telemetry.
    assert!(
        span.attributes.iter().all(|kv| !text(kv).contains("cust-")),
        "{:?}",
        span.attributes
    );

    let denied = collector.span(&denied_id);
    assert_eq!(hex(&denied.trace_id), TRACE);
    assert_eq!(hex(&denied.parent_span_id), "1111111111111111");
    assert_eq!(attr_str(&denied, "pdgate.decision"), "deny");
    assert_eq!(
        attr_strings(&denied, "pdgate.reasons"),
        ["CONSENT_REQUIRED"]
    );
    assert_eq!(attr_str(&denied, "pdgate.caller"), "marketing-service");
    assert_eq!(attr_str(&denied, "pdgate.purpose"), "marketing.email");
    assert!(matches!(
        attribute(&denied, "rpc.grpc.status_code"),
        AnyValue::IntValue(7)
    ));

    let root = collector.span(&root_id);
    assert!(
        root.parent_span_id.is_empty(),
        "no caller context: a root span"
    );
    assert_eq!(hex(&root.trace_id), root_trace);
    assert_eq!(hex(&root.span_id), root_parent);
    // The second billing call's subject-independent decision came from the cache.
    assert!(matches!(
        attribute(&root, "pdgate.cache_hit"),
        AnyValue::BoolValue(true)
    ));

    let services = collector.services.lock().unwrap().clone();
    assert!(!services.is_empty(), "no export named a service");
    assert!(
        services.iter().all(|s| s == "pdgate-test"),
        "the configured service name: {services:?}"
    );

    // The audit record names pdgate's span, in the caller's trace.
    let record = records
        .iter()
        .find(|r| r.body.decision_id == allowed_id)
        .unwrap();
    assert_eq!(record.body.trace_id.as_deref(), Some(TRACE));
    assert_eq!(
        record.body.span_id.as_deref(),
        Some(upstream_parent.as_str())
    );
}

#[tokio::test]
async fn check_and_envoy_checks_are_spans_of_their_callers_traces() {
    let (collector, addr) = Collector::start().await;
    let mut h = Harness::with(Options {
        telemetry: Collector::settings(addr),
        ..Options::default()
    })
    .await;
    let channel = h.channel(h.api_addr).await;

    let mut access = AccessControlClient::new(channel.clone());
    let check = CheckRequest {
        caller: "marketing-service".into(),
        purpose: "marketing.email".into(),
        action: "read".into(),
        categories: vec!["customer.contact.email".into()],
        subjects: vec!["cust-1".into()],
        recipient: String::new(),
        minimizable: Vec::new(),
    };
    let answer = access
        .check(with_traceparent(
            tonic::Request::new(check),
            "2222222222222222",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.allowed);

    // Envoy without tracing of its own: the checked request's traceparent is the parent.
    let mut headers = HashMap::new();
    for (k, v) in [
        ("x-caller", "billing-service"),
        ("x-purpose", "service.billing"),
        ("x-data-subject", "cust-1"),
        ("traceparent", &format!("00-{TRACE}-3333333333333333-01")),
    ] {
        headers.insert(k.to_owned(), v.to_owned());
    }
    let envoy = EnvoyCheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: format!("/{BILLING}"),
                    protocol: "HTTP/2".into(),
                    headers,
                    // The first request message, as Envoy sends it (`with_request_body`):
                    // pdgate reads the subject there. Field 1, `customer_id`, is `cust-1`.
                    raw_body: [&[0u8, 0, 0, 0, 8, 0x0a, 6][..], b"cust-1"].concat(),
                    ..HttpRequest::default()
                }),
                ..Request::default()
            }),
            ..AttributeContext::default()
        }),
    };
    let answer = AuthorizationClient::new(channel)
        .check(envoy)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.status.map(|s| s.code), Some(0), "allowed");

    let records = h.audit_records();
    h.shutdown().await.unwrap();

    let check_span = collector.span(&answer_id(&records, "marketing-service"));
    assert_eq!(check_span.name, "pdgate.v1.AccessControl/Check");
    assert_eq!(hex(&check_span.trace_id), TRACE);
    assert_eq!(hex(&check_span.parent_span_id), "2222222222222222");
    assert_eq!(attr_str(&check_span, "pdgate.decision"), "deny");
    assert_eq!(
        attr_strings(&check_span, "pdgate.reasons"),
        ["CONSENT_REQUIRED"]
    );

    let envoy_span = collector.span(&answer_id(&records, "billing-service"));
    assert_eq!(envoy_span.name, "envoy.service.auth.v3.Authorization/Check");
    assert_eq!(hex(&envoy_span.trace_id), TRACE);
    assert_eq!(hex(&envoy_span.parent_span_id), "3333333333333333");
    assert_eq!(attr_str(&envoy_span, "pdgate.decision"), "allow");
    assert_eq!(
        attr_str(&envoy_span, "pdgate.method"),
        format!("/{BILLING}")
    );
}

/// The decision id of the only audit record of `caller`.
fn answer_id(records: &[pdgate::audit::AuditRecord], caller: &str) -> String {
    let found: Vec<_> = records.iter().filter(|r| r.body.caller == caller).collect();
    assert_eq!(found.len(), 1, "{records:?}");
    found[0].body.decision_id.clone()
}

// ---------------------------------------------------------------------------------------------
// Metrics

#[tokio::test]
async fn metrics_arrive_at_the_collector() {
    let (collector, addr) = Collector::start().await;
    let mut settings = Collector::settings(addr);
    settings.metrics_interval = Duration::from_secs(1);
    let mut h = Harness::with(Options {
        telemetry: settings,
        ..Options::default()
    })
    .await;
    let mut client = h.client().await;
    for subject in ["cust-1", "cust-2", "cust-3"] {
        client
            .get_billing_statement(billing(subject))
            .await
            .unwrap();
    }
    client.get_profile(marketing_profile()).await.unwrap_err();

    // Exported on the interval, while the sidecar runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while collector.latency_count() < 4 {
        assert!(Instant::now() < deadline, "no metrics within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.shutdown().await.unwrap();

    let decisions = collector.sums("pdgate.decisions");
    let labels = |decision: &str, purpose: &str, reason: &str| {
        vec![
            ("decision".to_owned(), decision.to_owned()),
            ("purpose".to_owned(), purpose.to_owned()),
            ("reason".to_owned(), reason.to_owned()),
        ]
    };
    assert_eq!(
        decisions.get(&labels("allow", "service.billing", "")),
        Some(&3),
        "{decisions:?}"
    );
    assert_eq!(
        decisions.get(&labels("deny", "marketing.email", "CONSENT_REQUIRED")),
        Some(&1),
        "{decisions:?}"
    );
    assert_eq!(collector.latency_count(), 4);
    let one = |name: &str| collector.sums(name).get(&Vec::new()).copied();
    assert_eq!(one("pdgate.decision_cache.hits"), Some(2));
    assert_eq!(one("pdgate.decision_cache.misses"), Some(2));
    assert_eq!(one("pdgate.audit.records_written"), Some(4));
    assert_eq!(one("pdgate.audit.write_failures"), Some(0));
    assert_eq!(one("pdgate.policy.reloads"), Some(0));
}

/// `GET path` over HTTP/1.1 on a fresh connection: (status line, headers, body).
async fn http1_get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .expect("the response within 5 s")
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    // A chunked body (hyper streams a body of unknown length): take the chunks' data.
    let body = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut data = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            data.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
        data
    } else {
        body.to_owned()
    };
    (status.to_owned(), headers.to_owned(), body)
}

/// `GET path` over HTTP/2 (h2c), the way a client already speaking gRPC to the port would.
async fn http2_get(channel: Channel, path: &str) -> (http::StatusCode, String) {
    use http_body::Body as _;
    use tower::ServiceExt;
    let request = http::Request::get(format!("http://pdgate{path}"))
        .body(tonic::body::Body::empty())
        .unwrap();
    let response = channel.oneshot(request).await.unwrap();
    let status = response.status();
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        if let Ok(bytes) = frame.unwrap().into_data() {
            data.extend_from_slice(&bytes);
        }
    }
    (status, String::from_utf8(data).unwrap())
}

#[tokio::test]
async fn the_metrics_endpoint_counts_the_calls_in_prometheus_text() {
    // Telemetry off: /metrics is served all the same.
    let mut h = Harness::start().await;
    let mut client = h.client().await;
    for subject in ["cust-1", "cust-2", "cust-3"] {
        client
            .get_billing_statement(billing(subject))
            .await
            .unwrap();
    }
    client.get_profile(marketing_profile()).await.unwrap_err();
    // A purpose the policy does not know is not a label value of its own.
    client
        .get_billing_statement(call(
            GetBillingStatementRequest {
                customer_id: "cust-1".into(),
                month: String::new(),
            },
            "billing-service",
            "no.such.purpose",
            &["cust-1"],
        ))
        .await
        .unwrap_err();

    let (status, headers, body) = http1_get(h.api_addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    for line in [
        "# TYPE pdgate_decisions_total counter",
        "pdgate_decisions_total{decision=\"allow\",purpose=\"service.billing\",reason=\"\"} 3",
        "pdgate_decisions_total{decision=\"deny\",purpose=\"marketing.email\",reason=\"CONSENT_REQUIRED\"} 1",
        "pdgate_decisions_total{decision=\"deny\",purpose=\"(unknown)\",reason=\"PURPOSE_UNKNOWN\"} 1",
        "# TYPE pdgate_decision_latency_seconds histogram",
        "pdgate_decision_latency_seconds_bucket{le=\"+Inf\"} 5",
        "pdgate_decision_latency_seconds_count 5",
        "pdgate_decision_cache_hits_total 2",
        "pdgate_decision_cache_misses_total 2",
        "pdgate_policy_reloads_total 0",
        "pdgate_policy_reload_failures_total 0",
        "# TYPE pdgate_audit_queue_depth gauge",
        "pdgate_audit_queue_depth 0",
        "pdgate_audit_records_written_total 5",
        "pdgate_audit_write_failures_total 0",
        "pdgate_audit_refused_total 0",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing `{line}` in\n{body}"
        );
    }
    assert!(!body.contains("no.such.purpose"));

    // Over HTTP/2 on the connection gRPC clients use, and gRPC still works next to it.
    let channel = h.channel(h.api_addr).await;
    let (status, body2) = http2_get(channel.clone(), "/metrics").await;
    assert_eq!(status, http::StatusCode::OK);
    assert!(body2.contains("pdgate_decisions_total{decision=\"allow\""));
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    // Only that one path is answered as HTTP: any other is a gRPC route (this one unknown:
    // UNIMPLEMENTED, as gRPC says it, in `grpc-status`).
    let (_, headers, body) = http1_get(h.api_addr, "/metricsx").await;
    assert!(headers.contains("grpc-status: 12"), "{headers}");
    assert!(!body.contains("pdgate_"), "{body}");
    h.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The binary

#[tokio::test]
async fn serve_exports_to_the_otlp_endpoint_and_flushes_on_sigterm() {
    let (collector, addr) = Collector::start().await;
    let upstream = common::ports::ClosedPort::new().to_string();
    let state = tempfile::tempdir().unwrap();
    let mut child = common::bin::serve(
        &common::policy_dir(),
        state.path(),
        &[
            "--upstream",
            &upstream,
            "--otlp-endpoint",
            &format!("http://{addr}"),
        ],
    )
    .spawn();
    let (_, api) = child.serving().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{api}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let answer = AccessControlClient::new(channel)
        .check(with_traceparent(
            tonic::Request::new(CheckRequest {
                caller: "billing-service".into(),
                purpose: "service.billing".into(),
                action: "read".into(),
                categories: vec!["customer.billing".into()],
                subjects: vec!["cust-1".into()],
                recipient: String::new(),
                minimizable: Vec::new(),
            }),
            "4444444444444444",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.allowed);

    // The batch processor holds the span (it exports every 5 s); SIGTERM must flush it.
    child.signal("TERM");
    let out = child.exit_within(Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let span = collector.span(&answer.decision_id);
    assert_eq!(hex(&span.trace_id), TRACE);
    assert_eq!(hex(&span.parent_span_id), "4444444444444444");
    assert_eq!(attr_str(&span, "pdgate.decision"), "allow");
    let services = collector.services.lock().unwrap().clone();
    assert!(!services.is_empty(), "no export named a service");
    assert!(services.iter().all(|s| s == "pdgate"), "{services:?}");
    // The final metric export went out at shutdown too.
    let decisions = collector.sums("pdgate.decisions");
    assert_eq!(decisions.values().sum::<i64>(), 1, "{decisions:?}");
}

// ---------------------------------------------------------------------------------------------
// A collector that is down

/// Calls through a sidecar exporting to `endpoint`, one after another, with a metrics export
/// due every 100 ms: each is answered, and the slowest answer is printed and bounded.
async fn calls_are_not_held_up_by(what: &str, endpoint: SocketAddr) {
    let mut h = Harness::with(Options {
        telemetry: TelemetrySettings {
            otlp_endpoint: Some(format!("http://{endpoint}")),
            service_name: "pdgate-test".into(),
            metrics_interval: Duration::from_millis(100),
            export_audit: false,
        },
        ..Options::default()
    })
    .await;
    let mut client = h.client().await;
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut calls = 0;
    // Past several metric exports and the span batch's own timeout.
    while started.elapsed() < Duration::from_secs(3) || calls < 50 {
        let call_started = Instant::now();
        client
            .get_billing_statement(call(
                GetBillingStatementRequest {
                    customer_id: "cust-1".into(),
                    month: String::new(),
                },
                "billing-service",
                "service.billing",
                &["cust-1"],
            ))
            .await
            .unwrap();
        slowest = slowest.max(call_started.elapsed());
        calls += 1;
    }
    println!("collector {what}: {calls} calls, the slowest answered in {slowest:?}");
    // The feature is the duration: an export that waited on the collector would hold a call
    // for the exporter's whole timeout (10 s, OTLP's default). Half of it holds on a loaded
    // 2-core machine; the figure is printed above.
    assert!(
        slowest < Duration::from_secs(5),
        "a call took {slowest:?} with the collector {what}"
    );
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_refuses_connections_never_holds_up_calls() {
    let down = common::ports::ClosedPort::new();
    calls_are_not_held_up_by("refusing connections", down.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_never_holds_up_calls() {
    // Listening but never accepting: connections complete in the backlog and hang there.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    calls_are_not_held_up_by("never answering", silent.local_addr().unwrap()).await;
    drop(silent);
}

fn attr_int(span: &Span, key: &str) -> i64 {
    match attribute(span, key) {
        AnyValue::IntValue(i) => *i,
        other => panic!("`{key}` is not an integer: {other:?}"),
    }
}

#[tokio::test]
async fn spans_say_what_a_response_left_out() {
    let (collector, addr) = Collector::start().await;
    let mut h = Harness::with(Options {
        telemetry: Collector::settings(addr),
        ..Options::default()
    })
    .await;
    let mut client = h.client().await;

    // §1(1) shipping: the profile comes without the contact fields logistics may not have.
    let profile = || GetProfileRequest {
        customer_id: "cust-1".into(),
    };
    let response = client
        .get_profile(call(
            profile(),
            "logistics-service",
            "service.shipping",
            &[],
        ))
        .await
        .unwrap();
    let read_id = decision_id(response.metadata()).unwrap();
    let direct = h
        .direct_client()
        .await
        .get_profile(profile())
        .await
        .unwrap()
        .into_inner();

    // §3, §7: an export to NTT East leaves out cust-4, who stopped third-party provision.
    let response = client
        .export_for_interconnect(call(
            pdgate::proto::demo::ExportRequest {
                recipient: "ntt-east".into(),
                delay_ms: 0,
            },
            "ntt-east",
            "third_party.interconnect",
            &["cust-1", "cust-4"],
        ))
        .await
        .unwrap();
    let export_id = decision_id(response.metadata()).unwrap();
    let mut stream = response.into_inner();
    let mut streamed = 0;
    while stream.message().await.unwrap().is_some() {
        streamed += 1;
    }
    assert_eq!(streamed, 1);

    let records = h.audit_records();
    h.shutdown().await.unwrap();

    let minimized = records
        .iter()
        .find(|r| r.body.decision_id == read_id)
        .unwrap()
        .body
        .minimized
        .clone();
    assert!(
        minimized.contains(&"customer.contact.email".to_owned()),
        "{minimized:?}"
    );
    let read = collector.span(&read_id);
    assert_eq!(attr_strings(&read, "pdgate.minimized"), minimized);
    // One field per minimized category, cleared where the service had set it.
    let set = |category: &str| match category {
        "customer.contact.email" => !direct.email.is_empty(),
        "customer.contact.address" => !direct.address.is_empty(),
        "customer.contact.phone" => !direct.phone.is_empty(),
        other => panic!("GetProfile minimizes no `{other}`"),
    };
    let cleared = minimized.iter().filter(|c| set(c)).count();
    assert!(cleared >= 1);
    assert_eq!(
        attr_int(&read, "pdgate.fields_cleared"),
        i64::try_from(cleared).unwrap()
    );
    assert_eq!(attr_int(&read, "pdgate.unknown_fields"), 0);

    let export = collector.span(&export_id);
    assert_eq!(attr_int(&export, "pdgate.records_dropped"), 1);
    assert!(
        export
            .attributes
            .iter()
            .all(|kv| kv.key != "pdgate.minimized"),
        "the export minimizes nothing: {:?}",
        export.attributes
    );
}
