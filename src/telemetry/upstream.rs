//! What the upstream made of the calls forwarded to it: a tower layer around the upstream
//! client that counts each call once, by the gRPC status it ended with
//! (`pdgate_upstream_responses_total{code}`). An allowed call is a decision; whether the
//! service then answered is this — an upstream that is down shows as `UNAVAILABLE` here,
//! not as one more allow.
//!
//! The status is in the response headers of a trailers-only answer, else in the trailers
//! after the last message: the body is watched until then. A call whose response ends without
//! a status counts `UNKNOWN`, a body error `UNKNOWN` too; one dropped before its status (the
//! caller's deadline passed, or it went away) `CANCELLED`. An HTTP error status is mapped as
//! gRPC clients map it.

use super::metrics::Metrics;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::Code;
use tonic::body::Body;
use tower::{Layer, Service};

#[derive(Clone)]
pub struct UpstreamOutcomeLayer {
    metrics: Arc<Metrics>,
}

impl UpstreamOutcomeLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for UpstreamOutcomeLayer {
    type Service = UpstreamOutcome<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UpstreamOutcome {
            inner,
            metrics: self.metrics.clone(),
            waiting: None,
        }
    }
}

pub struct UpstreamOutcome<S> {
    inner: S,
    metrics: Arc<Metrics>,
    /// A call waiting for the upstream client to be ready (a connection being made): counted
    /// `CANCELLED` if this service is dropped before the call is made, as the data plane
    /// drops the clone it forwards a call with when the call ends first.
    waiting: Option<Outcome>,
}

impl<S: Clone> Clone for UpstreamOutcome<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            metrics: self.metrics.clone(),
            waiting: None,
        }
    }
}

impl<S> UpstreamOutcome<S> {
    fn outcome(&self) -> Outcome {
        Outcome {
            metrics: Some(self.metrics.clone()),
        }
    }
}

impl<S> Service<http::Request<Body>> for UpstreamOutcome<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Counted<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let ready = self.inner.poll_ready(cx);
        match &ready {
            Poll::Pending if self.waiting.is_none() => self.waiting = Some(self.outcome()),
            // Not reached: the call will not be made.
            Poll::Ready(Err(_)) => self.outcome().end(Code::Unavailable),
            _ => {}
        }
        ready
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let outcome = self.waiting.take().unwrap_or_else(|| self.outcome());
        Counted {
            future: self.inner.call(request),
            outcome: Some(outcome),
        }
    }
}

/// Counts its call once: explicitly with [`Outcome::end`], or `CANCELLED` when dropped first.
struct Outcome {
    /// `None` once counted.
    metrics: Option<Arc<Metrics>>,
}

impl Outcome {
    fn end(mut self, code: Code) {
        if let Some(metrics) = self.metrics.take() {
            metrics.record_upstream(code);
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if let Some(metrics) = self.metrics.take() {
            metrics.record_upstream(Code::Cancelled);
        }
    }
}

pin_project_lite::pin_project! {
    /// The upstream client's response future, counting the call when it fails or hands the
    /// outcome on to the body.
    pub struct Counted<F> {
        #[pin]
        future: F,
        outcome: Option<Outcome>,
    }
}

impl<F, E> Future for Counted<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.future.poll(cx));
        let Some(outcome) = this.outcome.take() else {
            return Poll::Ready(result);
        };
        Poll::Ready(match result {
            Err(e) => {
                // Not reached (connection refused, reset, the channel's own timeout): the
                // caller hears UNAVAILABLE (transport::rescue).
                outcome.end(Code::Unavailable);
                Err(e)
            }
            Ok(response) => {
                if let Some(code) = status_in(response.headers()) {
                    outcome.end(code);
                    Ok(response)
                } else if response.status() != http::StatusCode::OK {
                    outcome.end(code_of_http(response.status()));
                    Ok(response)
                } else {
                    Ok(response.map(|body| {
                        Body::new(CountedBody {
                            body,
                            outcome: Some(outcome),
                        })
                    }))
                }
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts its call at its trailers (or its end, or its error).
    struct CountedBody {
        #[pin]
        body: Body,
        outcome: Option<Outcome>,
    }
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.body.poll_frame(cx));
        let code = match &frame {
            Some(Ok(frame)) => frame
                .trailers_ref()
                .map(|trailers| status_in(trailers).unwrap_or(Code::Unknown)),
            Some(Err(_)) | None => Some(Code::Unknown),
        };
        if let Some(code) = code
            && let Some(outcome) = this.outcome.take()
        {
            outcome.end(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The `grpc-status` in `headers`, if there is one; a value that is not a code is `UNKNOWN`.
fn status_in(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?;
    Some(
        std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .map_or(Code::Unknown, Code::from_i32),
    )
}

/// The gRPC code a client gives an HTTP error status (gRPC's "HTTP to gRPC status code
/// mapping").
fn code_of_http(status: http::StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}
