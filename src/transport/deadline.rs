//! The caller's deadline on both ports: a call whose `grpc-timeout` passes before it is
//! answered gets `DEADLINE_EXCEEDED`, as the gRPC spec has the server say, wherever it was —
//! admitting it, waiting for the upstream, in a method of pdgate's API.
//!
//! tonic's server enforces `grpc-timeout` too, outside every layer a server is given, and
//! answers `CANCELLED "Timeout expired"`. This layer reads the deadline first (in `call`, before
//! tonic starts its own timer), so it passes no later than tonic's, and the future it wraps is
//! polled first: pdgate's answer wins. It also hands the instant on ([`Deadline`], a request
//! extension), so that the data plane bounds the upstream call by the same instant and can
//! answer with the decision id.

use crate::gate::metadata;
use futures_util::future::BoxFuture;
use std::task::{Context, Poll};
use tokio::time::Instant;
use tower::{Layer, Service};

/// When the caller's deadline passes: set on each request that carries a `grpc-timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = Bounded<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Bounded { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Bounded<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Bounded<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // A malformed `grpc-timeout` is not bounded here: the gate refuses it
        // (`INVALID_ARGUMENT`), and the API's methods do not read it.
        let deadline = metadata::timeout(request.headers())
            .ok()
            .flatten()
            .and_then(|timeout| Instant::now().checked_add(timeout));
        if let Some(at) = deadline {
            request.extensions_mut().insert(Deadline(at));
        }
        let answered = self.inner.call(request);
        Box::pin(async move {
            match deadline {
                None => answered.await,
                Some(at) => match tokio::time::timeout_at(at, answered).await {
                    Ok(answer) => answer,
                    Err(_) => Ok(super::rescue::deadline_passed()),
                },
            }
        })
    }
}
