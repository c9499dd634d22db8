//! The plaintext probe listener (`admin_listen`, off unless configured): `GET /metrics`,
//! `/livez` and `/readyz` over HTTP/1.1 (h2c too), without TLS or a caller identity, so that
//! kubelet probes and a Prometheus scrape need no client certificate. It serves no gRPC and
//! nothing that changes or reveals more than the metrics already do; bind it to loopback or
//! the pod network only.
//!
//! - `/livez`: 200 while the process serves at all.
//! - `/readyz`: 200 when a valid policy is loaded (one that passed validation and, on a
//!   reload, its tests) and the audit log's last write succeeded; otherwise 503 with one line
//!   per unmet condition. A sidecar that is not ready denies every call, so it should get none.

use super::metrics;
use crate::gate::Gate;
use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::net::TcpListener;
use tonic::body::Body;
use tower::Service;

pub const LIVEZ: &str = "/livez";
pub const READYZ: &str = "/readyz";

/// Serves the probes on `listener` until `shutdown` completes.
pub async fn serve_probes(
    listener: TcpListener,
    gate: Arc<Gate>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .accept_http1(true)
        .serve_with_incoming_shutdown(
            Probes { gate },
            crate::transport::incoming(listener),
            shutdown,
        )
        .await
}

/// What `/readyz` checks, each unmet condition as a line of the 503's body.
pub fn unready(gate: &Gate) -> Vec<&'static str> {
    let mut unmet = Vec::new();
    if gate.decider().policy().is_none() {
        unmet.push("policy: no valid policy is loaded; every call is denied");
    }
    if !gate.audit().healthy() {
        unmet.push("audit: the last audit log write failed; every call is denied");
    }
    unmet
}

#[derive(Clone)]
struct Probes {
    gate: Arc<Gate>,
}

impl Service<http::Request<Body>> for Probes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if ![metrics::PATH, LIVEZ, READYZ].contains(&path) {
            return ready(Ok(text(http::StatusCode::NOT_FOUND, "not found\n".into())));
        }
        if request.method() != http::Method::GET {
            let mut r = text(http::StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
            r.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("GET"));
            return ready(Ok(r));
        }
        let response = match path {
            metrics::PATH => {
                let mut r = text(
                    http::StatusCode::OK,
                    self.gate.telemetry().metrics().render_prometheus(),
                );
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(metrics::CONTENT_TYPE),
                );
                r
            }
            READYZ => {
                let unmet = unready(&self.gate);
                if unmet.is_empty() {
                    text(http::StatusCode::OK, "ready\n".into())
                } else {
                    text(
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        unmet.iter().map(|u| format!("{u}\n")).collect(),
                    )
                }
            }
            _ => text(http::StatusCode::OK, "live\n".into()),
        };
        ready(Ok(response))
    }
}

fn text(status: http::StatusCode, body: String) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
