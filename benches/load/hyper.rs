//! A candidate forwarder for the data plane, measured by the load harness against tonic's
//! `Channel` (issue #13, target 4): hyper-util's pooled HTTP/2 client, called straight from
//! the call's task. tonic's `Channel` puts a `Buffer` in front of its connection — one more
//! task per call; this client hands the request to the connection's own task directly. On
//! this 2-core machine it was *not* leaner (see docs/performance.md), so pdgate still
//! forwards with the `Channel`; the row stays so that a leaner forwarder can be compared.
//!
//! Lazy like the `Channel`: nothing is connected until the first call. One HTTP/2 connection
//! multiplexes the calls; a broken one is replaced on the next call.

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use pdgate::transport::limits::Limits;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::body::Body;

/// How long connecting to the upstream may take (the `Channel`'s was the same).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The upstream address pdgate was given is not one it can call.
#[derive(Debug, thiserror::Error)]
#[error("not an http:// URI with a host ({message})")]
pub struct UpstreamError {
    message: String,
}

/// A pooled HTTP/2 client to one upstream; cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Body>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
}

impl Upstream {
    /// A client for `upstream` (`HOST:PORT` or `http://HOST:PORT`); connects on first use.
    pub fn new(upstream: &str, limits: &Limits) -> Result<Self, UpstreamError> {
        let invalid = |message: String| UpstreamError { message };
        let uri: http::Uri = if upstream.contains("://") {
            upstream.parse()
        } else {
            format!("http://{upstream}").parse()
        }
        .map_err(|e: http::uri::InvalidUri| invalid(e.to_string()))?;
        let scheme = uri.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP);
        if scheme != http::uri::Scheme::HTTP {
            return Err(invalid(format!("scheme `{scheme}` (only http)")));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| invalid("no host".to_owned()))?;
        let mut connector = HttpConnector::new();
        // Small gRPC messages would otherwise wait on Nagle.
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .http2_keep_alive_interval(limits.keepalive_interval)
            .http2_keep_alive_timeout(limits.keepalive_timeout)
            .http2_keep_alive_while_idle(true)
            // Keepalive needs a timer (without one hyper panics), and so does the pool's idle
            // sweep.
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(Self {
            client,
            scheme,
            authority,
        })
    }
}

impl tower::Service<http::Request<Body>> for Upstream {
    type Response = http::Response<Body>;
    type Error = CallError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pool is always ready: a connection is found (or made) per call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The server hands on a path-only URI; the client needs the upstream's authority.
        let mut parts = std::mem::take(request.uri_mut()).into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        match http::Uri::from_parts(parts) {
            Ok(uri) => *request.uri_mut() = uri,
            // Not reached: scheme, authority and path are each valid on their own. Left as it
            // was, the URI makes the client fail the call (`UNAVAILABLE`).
            Err(e) => tracing::warn!(error = %e, "upstream URI not built"),
        }
        ResponseFuture(self.client.request(request))
    }
}

/// The upstream's answer, its body as a tonic [`Body`].
pub struct ResponseFuture(hyper_util::client::legacy::ResponseFuture);

impl Future for ResponseFuture {
    type Output = Result<http::Response<Body>, CallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|outcome| outcome.map(|r| r.map(Body::new)).map_err(CallError))
    }
}

/// A call the upstream did not answer (not connected, reset, refused). Shown with its causes:
/// the client's own message alone says only "client error (Connect)".
#[derive(Debug)]
pub struct CallError(hyper_util::client::legacy::Error);

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(&self.0);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl std::error::Error for CallError {}
