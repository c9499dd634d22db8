//! Deadlines: the caller's `grpc-timeout` bounds the whole call through pdgate, streams
//! included. tonic's server only bounds the wait for response headers, so a stream past its
//! deadline would otherwise run on; here it is cut with `DEADLINE_EXCEEDED` and the upstream
//! call is dropped (which cancels it upstream).

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::time::{Instant, Sleep};
use tonic::body::Body;

/// A response body cut off at a deadline with `grpc-status: 4` trailers.
pub struct Bounded {
    body: Option<Body>,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Bounded {
    pub fn new(body: Body, deadline: Option<Instant>) -> Self {
        Self {
            body: Some(body),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        }
    }
}

impl http_body::Body for Bounded {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(body).poll_frame(cx) {
            // The upstream broke off its answer (a reset stream, a closed connection): the
            // caller gets a status that says so, in trailers, instead of a reset of its own
            // stream, which its client would read as `CANCELLED` (as if it had cancelled) or
            // as an h2 protocol error.
            Poll::Ready(Some(Err(status))) => {
                self.body = None;
                let broke_off = tonic::Status::internal(format!(
                    "the service's response broke off: {}",
                    status.message()
                ));
                let mut trailers = HeaderMap::new();
                if broke_off.add_header(&mut trailers).is_err() {
                    trailers.insert("grpc-status", HeaderValue::from_static("13"));
                }
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            Poll::Ready(frame) => return Poll::Ready(frame),
            Poll::Pending => {}
        }
        let expired = self
            .deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready());
        if !expired {
            return Poll::Pending;
        }
        // Dropping the upstream body resets the upstream stream.
        self.body = None;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("4"));
        trailers.insert(
            "grpc-message",
            HeaderValue::from_static("deadline%20exceeded%20(pdgate)"),
        );
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.body
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }
}
