//! The authorization layer: per call, build the context, read the current policy snapshot,
//! decide (cache, then engine), then deny or forward. A denied call never reaches the inner
//! (upstream) service.

use super::context::{self, AUTHENTICATED_CALLER, CallContext};
use super::deadline::{self, Bounded};
use super::rescue;
use super::{IdentityMode, Shared};
use crate::decision::{Decision, Reason, ReasonCode, Request};
use futures_util::future::BoxFuture;
use http::HeaderValue;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::OwnedSemaphorePermit;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service, ServiceExt};

#[derive(Clone)]
pub struct AuthorizeLayer {
    shared: Arc<Shared>,
}

impl AuthorizeLayer {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<http::Request<Body>> for Authorize<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display + Send + 'static,
{
    type Response = http::Response<Body>;
    // Every outcome, the upstream's errors included, becomes a gRPC status in `rescue`.
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness of the upstream is awaited per call, after the decision (`oneshot`
        // below): a call that is denied must not reserve an upstream slot, and the upstream
        // being down is an answer (`UNAVAILABLE`), not back-pressure on every caller.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            // The permit travels with the response body: a call counts as in flight until its
            // last message (a stream) or its trailers are sent, or it is cancelled.
            let Ok(permit) = shared.inflight.clone().try_acquire_owned() else {
                return Ok(rescue::overloaded(
                    shared.max_inflight,
                    shared.decider.next_id(),
                ));
            };
            let authenticated = match shared.identity {
                IdentityMode::InsecureHeader => None,
                // x-caller is ignored: only the verified certificate names the caller.
                IdentityMode::Mtls => Some(shared.caller_from_tls(&request)),
            };
            let deadline = match deadline::parse(request.headers()) {
                Ok(timeout) => timeout.map(|t| tokio::time::Instant::now() + t),
                Err(e) => return Ok(rescue::invalid_argument(&e, shared.decider.next_id())),
            };
            let ctx = match context::extract(request.headers(), authenticated) {
                Ok(ctx) => ctx,
                Err(e) => return Ok(rescue::invalid_argument(&e, shared.decider.next_id())),
            };
            let decision = shared.decide(request.uri().path(), ctx.clone());
            if !decision.allowed {
                tracing::debug!(path = request.uri().path(), decision = %decision.decision_id, "denied");
                return Ok(rescue::denied(&decision));
            }
            // The upstream learns the caller pdgate authorized and nothing a caller claimed:
            // any incoming x-pdgate-caller goes, and with mTLS so does x-caller.
            let headers = request.headers_mut();
            headers.remove(AUTHENTICATED_CALLER);
            if shared.identity == IdentityMode::Mtls {
                headers.remove(context::CALLER);
            }
            if let Ok(v) = HeaderValue::from_str(&ctx.caller) {
                headers.insert(AUTHENTICATED_CALLER, v);
            }
            let forwarded = inner.oneshot(request);
            let outcome = match deadline {
                Some(at) => match tokio::time::timeout_at(at, forwarded).await {
                    Ok(outcome) => outcome,
                    Err(_) => return Ok(rescue::deadline_exceeded(decision.decision_id)),
                },
                None => forwarded.await,
            };
            match outcome {
                Ok(mut response) => {
                    rescue::tag(&mut response, decision.decision_id);
                    Ok(response.map(|body| {
                        Body::new(InFlight {
                            body: Bounded::new(body, deadline),
                            _permit: permit,
                        })
                    }))
                }
                Err(e) => Ok(rescue::upstream_unavailable(&e, decision.decision_id)),
            }
        })
    }
}

/// A response body that holds its call's in-flight permit until it is finished or dropped.
struct InFlight {
    body: Bounded,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for InFlight {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Shared {
    /// The caller named by the peer's verified client certificate; empty when there is none
    /// (denied `CALLER_UNKNOWN`).
    fn caller_from_tls(&self, request: &http::Request<Body>) -> String {
        let certs = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs);
        let Some(leaf) = certs.as_ref().and_then(|c| c.first()) else {
            return String::new();
        };
        let policy = self.decider.policy();
        self.naming.caller(leaf.as_ref(), |name| {
            policy.as_ref().is_some_and(|p| p.caller(name).is_some())
        })
    }

    /// The decision for a call to `path` with context `ctx`: the route and the decision come
    /// from the same policy snapshot.
    pub fn decide(&self, path: &str, ctx: CallContext) -> Decision {
        let Some(snapshot) = self.decider.policy() else {
            return self
                .decider
                .deny(None, Reason::new(ReasonCode::PolicyUnavailable, "§1", ""));
        };
        let Some(route) = snapshot.route(path) else {
            return self.decider.deny(
                Some(&snapshot),
                Reason::new(
                    ReasonCode::RouteUnknown,
                    "§6(5)",
                    format!("method `{path}` has no route in routes.yaml; pdgate denies methods it does not know"),
                ),
            );
        };
        let request = Request {
            caller: ctx.caller,
            purpose: ctx.purpose,
            action: route.action.as_str().to_owned(),
            categories: route.categories.clone(),
            subjects: ctx.subjects,
            recipient: ctx.recipient,
        };
        self.decider
            .decide_under(&snapshot, &request, self.subjects.as_ref())
    }
}
