//! Calls below tonic's client: gRPC framing by hand, raw HTTP/2 requests, and an upstream
//! that never answers — for tests of what pdgate does when a peer misbehaves.

use pdgate::proto::demo::GetBillingStatementRequest;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tonic::body::Body;

/// The request of billing's statement for `customer`.
pub fn billing(customer: &str) -> GetBillingStatementRequest {
    GetBillingStatementRequest {
        customer_id: customer.into(),
        month: String::new(),
    }
}

/// `message` as one uncompressed gRPC frame.
pub fn frame(message: &impl prost::Message) -> bytes::Bytes {
    let bytes = message.encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&bytes);
    framed.into()
}

/// An upstream that accepts every call and never answers it, and how many calls it holds.
pub async fn silent_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(AtomicUsize::new(0));
    let counter = held.clone();
    let silent = tower::service_fn(move |_request: http::Request<Body>| {
        counter.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<Result<http::Response<Body>, Infallible>>()
    });
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(
        silent,
        tonic::transport::server::TcpIncoming::from(listener),
    ));
    (addr, held)
}
