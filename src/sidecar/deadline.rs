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
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tonic::body::Body;

pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// A `grpc-timeout` value that is not `1`–`8` digits followed by a unit (`H M S m u n`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metadata `grpc-timeout` is `{0}`; expected 1 to 8 digits and a unit (H, M, S, m, u, n)")]
pub struct BadTimeout(pub String);

/// Reads `grpc-timeout` (gRPC over HTTP/2: `TimeoutValue TimeoutUnit`).
pub fn parse(headers: &HeaderMap) -> Result<Option<Duration>, BadTimeout> {
    let Some(value) = headers.get(GRPC_TIMEOUT) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| BadTimeout(String::from_utf8_lossy(value.as_bytes()).into_owned()))?;
    let bad = || BadTimeout(text.to_owned());
    let (digits, unit) = text.split_at(text.len().saturating_sub(1));
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let duration = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    };
    Ok(Some(duration))
}

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
        if let Poll::Ready(frame) = Pin::new(body).poll_frame(cx) {
            return Poll::Ready(frame);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(GRPC_TIMEOUT, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse(&with("2H")), Ok(Some(Duration::from_secs(7200))));
        assert_eq!(parse(&with("3M")), Ok(Some(Duration::from_secs(180))));
        assert_eq!(parse(&with("10S")), Ok(Some(Duration::from_secs(10))));
        assert_eq!(parse(&with("250m")), Ok(Some(Duration::from_millis(250))));
        assert_eq!(parse(&with("7u")), Ok(Some(Duration::from_micros(7))));
        assert_eq!(
            parse(&with("99999999n")),
            Ok(Some(Duration::from_nanos(99_999_999)))
        );
        assert_eq!(parse(&HeaderMap::new()), Ok(None));
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in ["", "S", "10", "10s", "123456789S", "-1S", "1.5S"] {
            assert!(parse(&with(bad)).is_err(), "{bad}");
        }
    }
}
