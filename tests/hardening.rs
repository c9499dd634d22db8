//! Hardening (#14), over real sockets: metadata taken byte for byte, only gRPC calls forwarded,
//! deadlines answered `DEADLINE_EXCEEDED` wherever they pass, and a policy lifecycle that
//! cannot be tricked (a bundle without tests, failing tests at start, a change to `tests/`).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::{Harness, Options, call};
use pdgate::proto::demo::GetBillingStatementRequest;
use std::convert::Infallible;
use std::net::SocketAddr;
use tonic::Code;
use tonic::body::Body;
use tonic::metadata::MetadataValue;

fn billing(customer: &str) -> GetBillingStatementRequest {
    GetBillingStatementRequest {
        customer_id: customer.into(),
        month: String::new(),
    }
}

/// The reason codes of the audit record of the decision `id`.
fn recorded_reasons(h: &Harness, id: &str) -> Vec<String> {
    h.audit_records()
        .into_iter()
        .find(|r| r.body.decision_id == id)
        .map(|r| r.body.reasons.into_iter().map(|r| r.code).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn metadata_with_surrounding_whitespace_is_invalid_and_never_forwarded() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    // Each value is what an allowed call sends, with one space or tab around it.
    let cases: [(&str, &str); 6] = [
        ("x-caller", " billing-service"),
        ("x-purpose", "service.billing "),
        ("x-purpose", "\tservice.billing"),
        ("x-data-subject", "cust-1 "),
        ("x-data-subject", "cust-2, cust-1"),
        ("x-recipient", " ntt-east"),
    ];
    for (key, value) in cases {
        let mut request = call(billing("cust-1"), "billing-service", "service.billing", &[]);
        let md = request.metadata_mut();
        md.remove(key);
        md.insert(key, MetadataValue::try_from(value).unwrap());
        let status = client.get_billing_statement(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{key}: {value:?}");
        let id = common::decision_id(status.metadata()).expect("the refusal is recorded");
        assert_eq!(recorded_reasons(&h, &id), ["METADATA_INVALID"], "{key}");
    }
    assert_eq!(h.service.calls(), 0, "no refused call reached the upstream");
    // The same call without the whitespace is allowed: the refusals were the whitespace's.
    client
        .get_billing_statement(call(
            billing("cust-1"),
            "billing-service",
            "service.billing",
            &["cust-1"],
        ))
        .await
        .unwrap();
    assert_eq!(h.service.calls(), 1);
}

/// A gRPC message frame: uncompressed, length, bytes.
fn frame(message: &impl prost::Message) -> bytes::Bytes {
    let bytes = message.encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&bytes);
    framed.into()
}

/// Sends one request over raw HTTP/2 — what a non-gRPC client sends, or a gRPC client that
/// does not enforce its own deadline — and returns the gRPC status of the answer (from the
/// headers of a trailers-only answer, else from the trailers).
async fn raw_h2(addr: SocketAddr, request: http::Request<()>, body: bytes::Bytes) -> tonic::Status {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    send.send_data(body, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    tonic::Status::from_header_map(&trailers).expect("a grpc-status")
}

/// An allowed call's request (billing-service reads cust-1's statement), as raw HTTP/2.
fn billing_request(method: http::Method, content_type: Option<&str>) -> http::request::Builder {
    let mut request = http::Request::builder()
        .method(method)
        .uri("http://pdgate/demo.customer.v1.CustomerData/GetBillingStatement")
        .header("te", "trailers")
        .header("x-caller", "billing-service")
        .header("x-purpose", "service.billing")
        .header("x-data-subject", "cust-1");
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    request
}

async fn raw(h: &Harness, method: http::Method, content_type: Option<&str>) -> tonic::Status {
    raw_h2(
        h.data_addr,
        billing_request(method, content_type).body(()).unwrap(),
        frame(&billing("cust-1")),
    )
    .await
}

#[tokio::test]
async fn only_grpc_posts_are_forwarded() {
    let h = Harness::start().await;
    for (method, content_type, expected) in [
        (
            http::Method::GET,
            Some("application/grpc"),
            Code::InvalidArgument,
        ),
        (
            http::Method::PUT,
            Some("application/grpc"),
            Code::InvalidArgument,
        ),
        (http::Method::POST, None, Code::InvalidArgument),
        (
            http::Method::POST,
            Some("application/json"),
            Code::InvalidArgument,
        ),
        (
            http::Method::POST,
            Some("text/plain"),
            Code::InvalidArgument,
        ),
        (
            http::Method::POST,
            Some("application/grpc+json"),
            Code::Unimplemented,
        ),
        (
            http::Method::POST,
            Some("application/grpc-web"),
            Code::InvalidArgument,
        ),
    ] {
        let status = raw(&h, method.clone(), content_type).await;
        assert_eq!(status.code(), expected, "{method} {content_type:?}");
    }
    assert_eq!(h.service.calls(), 0, "no refused call reached the upstream");
    // Both gRPC protobuf content types go through.
    for content_type in ["application/grpc", "application/grpc+proto"] {
        let status = raw(&h, http::Method::POST, Some(content_type)).await;
        assert_eq!(status.code(), Code::Ok, "{content_type}: {status:?}");
    }
    assert_eq!(h.service.calls(), 2);
}

/// An upstream that accepts every call and never answers it.
async fn silent_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tower::service_fn(|_request: http::Request<Body>| {
        std::future::pending::<Result<http::Response<Body>, Infallible>>()
    });
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(
        silent,
        tonic::transport::server::TcpIncoming::from(listener),
    ));
    addr
}

#[tokio::test]
async fn a_deadline_that_passes_before_the_upstream_answers_is_deadline_exceeded() {
    let h = Harness::with(Options {
        upstream: Some(silent_upstream().await),
        ..Options::default()
    })
    .await;
    // A tonic client enforces its deadline itself (and calls it `CANCELLED`): these calls
    // come over raw HTTP/2, so that the answer is pdgate's. 1 ms passes while pdgate admits
    // the call, 300 ms while the upstream is silent.
    for timeout in ["1m", "300m"] {
        let request = billing_request(http::Method::POST, Some("application/grpc"))
            .header("grpc-timeout", timeout)
            .body(())
            .unwrap();
        let status = raw_h2(h.data_addr, request, frame(&billing("cust-1"))).await;
        assert_eq!(
            status.code(),
            Code::DeadlineExceeded,
            "{timeout}: {status:?}"
        );
    }
}
