//! The series `/metrics` gained for operators, each read over the real endpoint after real
//! calls through a sidecar: what the upstream answered (an unreachable upstream is
//! `UNAVAILABLE` there, not only one more allow), calls in flight and shed, the audit
//! writer's write and sync times, subject-registry reads, the process and the build. Every
//! scrape is read with a Prometheus text parser written apart from the encoder.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::wait::eventually;
use common::{Harness, Options, SubjectsChoice, billing_call};
use pdgate::proto::demo::GetProfileRequest;
use prometheus_parse::{LineInfo, Scrape, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpListener;

/// `/metrics` of the harness's API port, parsed. Every line must be a comment or a sample
/// the parser understands (it skips lines it does not, so they are checked first).
async fn scrape(h: &Harness) -> Scrape {
    let response = common::scrape(h).await;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {response}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The body may come chunked: the chunk-size lines are not part of the exposition.
    let text: String = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    for line in text.lines() {
        assert!(
            !matches!(LineInfo::parse(line), LineInfo::Ignored),
            "not Prometheus text: `{line}`"
        );
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

/// The value of the sample `metric` whose labels include `labels`; histograms give their
/// count (`_count` is its own sample).
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            Value::Summary(_) => f64::NAN,
        })
}

fn get(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    value(scrape, metric, labels).unwrap_or_else(|| {
        let names: Vec<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
        panic!("no `{metric}` {labels:?} among {names:?}")
    })
}

/// An HTTP/2 upstream that takes every call and never answers it; `calls` counts the calls
/// that reached it.
async fn silent_upstream(calls: Arc<AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = tower::service_fn(move |_: http::Request<tonic::body::Body>| {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<Result<http::Response<tonic::body::Body>, Infallible>>()
    });
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(
        service,
        tonic::transport::server::TcpIncoming::from(listener),
    ));
    addr
}

#[tokio::test]
async fn upstream_outcomes_registry_reads_audit_times_process_and_build_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::with(Options {
        subjects: SubjectsChoice::Sqlite(dir.path().join("subjects.db")),
        ..Options::default()
    })
    .await;
    let before = scrape(&h).await;
    assert_eq!(
        get(
            &before,
            "pdgate_upstream_responses_total",
            &[("code", "OK")]
        ),
        0.0
    );
    assert_eq!(get(&before, "pdgate_registry_reads_total", &[]), 0.0);
    let mut client = h.client().await;
    for subject in ["cust-1", "cust-2"] {
        client
            .get_billing_statement(billing_call(subject))
            .await
            .unwrap();
    }
    // Billing does not depend on the subject's state; marketing does (consent): its subject
    // is read from the registry (nothing recorded there: denied CONSENT_REQUIRED).
    let denied = client
        .get_profile(common::call(
            GetProfileRequest {
                customer_id: "cust-3".into(),
            },
            "marketing-service",
            "marketing.email",
            &["cust-3"],
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let after = scrape(&h).await;
    assert_eq!(
        get(&after, "pdgate_upstream_responses_total", &[("code", "OK")]),
        2.0
    );
    assert_eq!(
        get(
            &after,
            "pdgate_upstream_responses_total",
            &[("code", "UNAVAILABLE")]
        ),
        0.0
    );
    assert_eq!(get(&after, "pdgate_registry_reads_total", &[]), 1.0);
    assert_eq!(get(&after, "pdgate_registry_read_failures_total", &[]), 0.0);
    // One batch at least was written and synced (fsync = "batch", the default).
    assert!(get(&after, "pdgate_audit_write_seconds", &[]) >= 1.0);
    assert!(get(&after, "pdgate_audit_sync_seconds", &[]) >= 1.0);
    assert_eq!(get(&after, "pdgate_audit_queue_depth", &[]), 0.0);
    // Nothing in flight once the calls are answered; the limit is the configured one.
    assert_eq!(get(&after, "pdgate_calls_in_flight", &[]), 0.0);
    assert_eq!(
        get(&after, "pdgate_calls_in_flight_limit", &[]),
        Options::default().max_concurrent_calls as f64
    );
    assert!(get(&after, "process_resident_memory_bytes", &[]) > 1_000_000.0);
    assert!(get(&after, "process_open_fds", &[]) >= 3.0);
    assert!(get(&after, "process_max_fds", &[]) >= get(&after, "process_open_fds", &[]));
    assert!(get(&after, "process_cpu_seconds_total", &[]) > 0.0);
    assert!(get(&after, "process_start_time_seconds", &[]) > 1.7e9);
    assert_eq!(
        get(
            &after,
            "pdgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_upstream_is_counted_unavailable_besides_the_allow() {
    let mut h = Harness::with(Options {
        upstream_up: false,
        ..Options::default()
    })
    .await;
    let mut client = h.client().await;
    let status = client
        .get_billing_statement(billing_call("cust-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let s = scrape(&h).await;
    assert_eq!(
        get(
            &s,
            "pdgate_decisions_total",
            &[("decision", "allow"), ("purpose", "service.billing")]
        ),
        1.0
    );
    assert_eq!(
        get(
            &s,
            "pdgate_upstream_responses_total",
            &[("code", "UNAVAILABLE")]
        ),
        1.0
    );
    assert_eq!(
        get(&s, "pdgate_upstream_responses_total", &[("code", "OK")]),
        0.0
    );
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_call_waiting_on_the_upstream_is_in_flight_the_next_is_shed_and_a_cancel_is_counted() {
    let reached = Arc::new(AtomicUsize::new(0));
    let mut h = Harness::with(Options {
        upstream: Some(silent_upstream(reached.clone()).await),
        max_concurrent_calls: 1,
        ..Options::default()
    })
    .await;
    let mut waiting_client = h.client().await;
    let waiting = tokio::spawn(async move {
        waiting_client
            .get_billing_statement(billing_call("cust-1"))
            .await
    });
    eventually("the first call reaches the upstream", || async {
        reached.load(Ordering::SeqCst) == 1
    })
    .await;
    let s = scrape(&h).await;
    assert_eq!(get(&s, "pdgate_calls_in_flight", &[]), 1.0);
    let mut client = h.client().await;
    let shed = client
        .get_billing_statement(billing_call("cust-2"))
        .await
        .unwrap_err();
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted);
    let s = scrape(&h).await;
    assert_eq!(get(&s, "pdgate_calls_shed_total", &[]), 1.0);
    assert_eq!(
        reached.load(Ordering::SeqCst),
        1,
        "a shed call reached the upstream"
    );
    assert_eq!(
        get(
            &s,
            "pdgate_upstream_responses_total",
            &[("code", "CANCELLED")]
        ),
        0.0
    );
    // The caller gives up: its call ends before the upstream's status.
    waiting.abort();
    eventually(
        "the abandoned call is counted and its slot freed",
        || async {
            let s = scrape(&h).await;
            value(
                &s,
                "pdgate_upstream_responses_total",
                &[("code", "CANCELLED")],
            ) == Some(1.0)
                && value(&s, "pdgate_calls_in_flight", &[]) == Some(0.0)
        },
    )
    .await;
    h.shutdown().await.unwrap();
}
