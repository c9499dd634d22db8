//! `GET /metrics` on the API port: the metrics registry in the Prometheus text format.
//!
//! A tower layer around the API's gRPC routes answers that one path itself and passes every
//! other request on, so the gRPC services are untouched. The API server accepts HTTP/1 for it
//! (a Prometheus scrape); with mTLS the endpoint is behind the same client-certificate check
//! as the gRPC APIs, and TLS offers HTTP/2 only (ALPN `h2`).

use crate::telemetry::metrics::Metrics;
use futures_util::future::Either;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;
use tower::{Layer, Service};

pub const PATH: &str = "/metrics";
/// The Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone)]
pub struct MetricsEndpointLayer {
    metrics: Arc<Metrics>,
}

impl MetricsEndpointLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for MetricsEndpointLayer {
    type Service = MetricsEndpoint<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsEndpoint {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MetricsEndpoint<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Service<http::Request<Body>> for MetricsEndpoint<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Answering /metrics does not use the inner service: it stays ready for the next call.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != PATH {
            return Either::Right(self.inner.call(request));
        }
        let mut response = if request.method() == http::Method::GET {
            http::Response::new(Body::new(self.metrics.render_prometheus()))
        } else {
            let mut r = http::Response::new(Body::new(String::from("GET only\n")));
            *r.status_mut() = http::StatusCode::METHOD_NOT_ALLOWED;
            r.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("GET"));
            r
        };
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(CONTENT_TYPE),
        );
        Either::Left(ready(Ok(response)))
    }
}
