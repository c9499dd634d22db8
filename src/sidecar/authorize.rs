//! The authorization layer: per call, build the context, read the current policy snapshot,
//! decide (cache, then engine), then deny or forward. A denied call never reaches the inner
//! (upstream) service.

use super::context::{self, AUTHENTICATED_CALLER, CallContext};
use super::deadline::{self, Bounded};
use super::rescue;
use super::{IdentityMode, Shared};
use crate::audit::{self, RecordBody, RecordKind};
use crate::decision::{Decision, Reason, ReasonCode, Request};
use crate::telemetry::CallSpan;
use futures_util::future::BoxFuture;
use http::HeaderValue;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::OwnedSemaphorePermit;
use tonic::Code;
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
            let started = std::time::Instant::now();
            // The permit travels with the response body: a call counts as in flight until its
            // last message (a stream) or its trailers are sent, or it is cancelled.
            let Ok(permit) = shared.inflight.clone().try_acquire_owned() else {
                return Ok(rescue::overloaded(
                    shared.max_inflight,
                    shared.decider.next_id(),
                ));
            };
            // The call's span, with OTLP on; `None` (and nothing allocated) otherwise.
            let path = request.uri().path();
            let mut span = shared
                .telemetry
                .start_span(request.headers(), path.strip_prefix('/').unwrap_or(path));
            let authenticated = match shared.identity {
                IdentityMode::InsecureHeader => None,
                // x-caller is ignored: only the verified certificate names the caller.
                IdentityMode::Mtls => Some(shared.caller_from_tls(&request)),
            };
            let deadline = match deadline::parse(request.headers()) {
                Ok(timeout) => timeout.map(|t| tokio::time::Instant::now() + t),
                Err(e) => {
                    mark(&mut span, Code::InvalidArgument, &e);
                    return Ok(rescue::invalid_argument(&e, shared.decider.next_id()));
                }
            };
            let ctx = match context::extract(request.headers(), authenticated) {
                Ok(ctx) => ctx,
                Err(e) => {
                    mark(&mut span, Code::InvalidArgument, &e);
                    return Ok(rescue::invalid_argument(&e, shared.decider.next_id()));
                }
            };
            let (decision, decided) = shared.decide_call_loaded(request.uri().path(), ctx).await;
            let mut body = audit::body_of(&decision, &decided, RecordKind::Access);
            body.method = Some(request.uri().path().to_owned());
            // pdgate's own span when it makes one (same trace as the caller's), else the
            // caller's span as its traceparent names it.
            let trace = span
                .as_ref()
                .and_then(CallSpan::ids)
                .or_else(|| traceparent(request.headers()));
            if let Some((trace, span)) = trace {
                body.trace_id = Some(trace);
                body.span_id = Some(span);
            }
            body.latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let decision = shared.audited(decision, body).await;
            shared.observe(&decision, &decided.purpose, started);
            if let Some(span) = &mut span {
                span.record_decision(&decision, &decided, Some(request.uri().path()));
            }
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
            if let Ok(v) = HeaderValue::from_str(&decided.caller) {
                headers.insert(AUTHENTICATED_CALLER, v);
            }
            // With a span, the upstream continues the trace as pdgate's child; without one,
            // the caller's traceparent passes through untouched.
            if let Some(span) = &span {
                span.inject(headers);
            }
            let forwarded = inner.oneshot(request);
            let outcome = match deadline {
                Some(at) => match tokio::time::timeout_at(at, forwarded).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        mark(&mut span, Code::DeadlineExceeded, &"deadline exceeded");
                        return Ok(rescue::deadline_exceeded(decision.decision_id));
                    }
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
                            _span: span,
                        })
                    }))
                }
                Err(e) => {
                    mark(&mut span, Code::Unavailable, &e);
                    Ok(rescue::upstream_unavailable(&e, decision.decision_id))
                }
            }
        })
    }
}

/// The trace and parent span ids of a W3C `traceparent` header (`00-<trace>-<span>-<flags>`).
fn traceparent(headers: &http::HeaderMap) -> Option<(String, String)> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let mut parts = value.split('-');
    let (_version, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(trace, 32) && hex(span, 16)).then(|| (trace.to_owned(), span.to_owned()))
}

/// Records a status pdgate answered with on the call's span, if there is one.
fn mark(span: &mut Option<CallSpan>, code: Code, message: &dyn std::fmt::Display) {
    if let Some(span) = span {
        span.record_status(code, &message.to_string());
    }
}

/// A response body that holds its call's in-flight permit, and its span, until it is finished
/// or dropped: the span ends with the call's last message, streams included.
struct InFlight {
    body: Bounded,
    _permit: OwnedSemaphorePermit,
    _span: Option<CallSpan>,
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
        self.decide_call(path, ctx).0
    }

    /// The decision and the request it decided (for the audit record). A method without a
    /// route is decided with no action and no categories.
    pub fn decide_call(&self, path: &str, ctx: CallContext) -> (Decision, Request) {
        let mut request = Request {
            caller: ctx.caller,
            purpose: ctx.purpose,
            action: String::new(),
            categories: Vec::new(),
            subjects: ctx.subjects,
            recipient: ctx.recipient,
        };
        let Some(snapshot) = self.decider.policy() else {
            let reason = Reason::new(ReasonCode::PolicyUnavailable, "§1", "");
            return (self.decider.deny(None, reason), request);
        };
        let Some(route) = snapshot.route(path) else {
            let reason = Reason::new(
                ReasonCode::RouteUnknown,
                "§6(5)",
                format!(
                    "method `{path}` has no route in routes.yaml; pdgate denies methods it does not know"
                ),
            );
            return (self.decider.deny(Some(&snapshot), reason), request);
        };
        route.action.as_str().clone_into(&mut request.action);
        request.categories.clone_from(&route.categories);
        let decision = self
            .decider
            .decide_under(&snapshot, &request, self.subjects.as_ref());
        (decision, request)
    }

    /// Writes the decision's audit record and waits until it is written. If it cannot be
    /// written, an allow becomes a deny (`AUDIT_UNAVAILABLE`): no call goes through unaudited.
    pub async fn audited(&self, mut decision: Decision, mut body: RecordBody) -> Decision {
        body.latency_us = body.latency_us.max(1);
        // A shadow policy that decided otherwise: recorded and counted here, once per call.
        body.shadow_decision = decision.shadow_decision();
        self.decider.count_shadow_difference(&decision);
        match self.audit.record(body).await {
            Ok(_) => decision,
            Err(e) => {
                tracing::error!(error = %e, decision = %decision.decision_id, allowed = decision.allowed, "audit record not written");
                if decision.allowed {
                    decision.allowed = false;
                    decision.reasons = vec![Reason::new(
                        ReasonCode::AuditUnavailable,
                        "§6(3)",
                        format!(
                            "the decision cannot be audited ({e}); calls are denied until it can"
                        ),
                    )];
                }
                decision
            }
        }
    }
}
