//! The data plane's door: per call, take a call slot, let the gate admit the call, then
//! forward it (with the metadata the gate stamps) or answer the refusal. A refused call never
//! reaches the inner (upstream) service.

use super::deadline::Bounded;
use super::messages::{
    InspectedRequest, MessageError, MinimizedResponse, StreamCall, Verdict, first_message,
    subjects_of,
};
use crate::gate::metadata::{MetadataError, SUBJECT};
use crate::gate::{Admission, Ask, Call, Door, Gate, Peer};
use crate::message::frames::Frames;
use crate::telemetry::CallSpan;
use crate::transport::deadline::Deadline;
use crate::transport::rescue;
use futures_util::future::BoxFuture;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Code;
use tonic::body::Body;
use tonic::transport::CertificateDer;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service, ServiceExt};

#[derive(Clone)]
pub struct AuthorizeLayer {
    gate: Arc<Gate>,
    slots: Arc<CallSlots>,
}

/// Calls in flight; a call that finds no slot left is shed (`RESOURCE_EXHAUSTED`).
struct CallSlots {
    semaphore: Arc<Semaphore>,
    limit: usize,
}

impl AuthorizeLayer {
    pub fn new(gate: Arc<Gate>, max_calls: usize) -> Self {
        Self {
            gate,
            slots: Arc::new(CallSlots {
                semaphore: Arc::new(Semaphore::new(max_calls)),
                limit: max_calls,
            }),
        }
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            gate: self.gate.clone(),
            slots: self.slots.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    gate: Arc<Gate>,
    slots: Arc<CallSlots>,
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
        let gate = self.gate.clone();
        let slots = self.slots.clone();
        let inner = self.inner.clone();
        let deadline = request.extensions().get::<Deadline>().map(|d| d.0);
        Box::pin(async move {
            let started = std::time::Instant::now();
            // The slot travels with the response body: a call counts as in flight until its
            // last message (a stream) or its trailers are sent, or it is cancelled.
            let Ok(slot) = slots.semaphore.clone().try_acquire_owned() else {
                return Ok(rescue::overloaded(slots.limit));
            };
            let certs = peer_certificates(&request);
            let policy = gate.policy();
            // The URI's own handle (a reference count), so that the path can be read while the
            // body is.
            let uri = request.uri().clone();
            let path = uri.path();
            let inspection = policy.inspection(path);
            // A route that reads its subjects: the first message, before anything is decided
            // (and before anything reaches the upstream).
            let mut first = None;
            let mut unreadable = not_grpc(&request);
            if unreadable.is_some() {
                // Refused whatever the route: its body is not read.
            } else if let Some(subject_path) = inspection
                .as_ref()
                .and_then(|i| i.request_subjects.as_ref())
            {
                let mut frames = Frames::default();
                let read = tokio::time::timeout(
                    FIRST_MESSAGE_WAIT,
                    first_message(request.body_mut(), &mut frames),
                )
                .await
                .unwrap_or(Err(MessageError::Body(format!(
                    "no whole request message within {FIRST_MESSAGE_WAIT:?}"
                ))));
                match read.and_then(|message| {
                    let subjects = match &message.message {
                        Some(m) => subjects_of(m, subject_path)?,
                        None => Vec::new(),
                    };
                    Ok((message, subjects))
                }) {
                    Ok((message, subjects)) => first = Some((message, frames, subjects)),
                    Err(e) => unreadable = Some(unreadable_message(e)),
                }
            }
            let ask = match unreadable {
                Some(error) => Ask::Unreadable {
                    path: Some(path),
                    error,
                },
                None => Ask::Method {
                    path,
                    metadata: request.headers(),
                    message_subjects: first.as_ref().map(|(_, _, subjects)| subjects.clone()),
                },
            };
            let mut admission = gate
                .admit_overlapped(Call {
                    policy: policy.clone(),
                    door: Door::DataPlane,
                    ask,
                    peer: Peer::Certificate(
                        certs.as_ref().and_then(|c| c.first()).map(AsRef::as_ref),
                    ),
                    trace: request.headers(),
                    started,
                })
                .await;
            if !admission.allowed() {
                tracing::debug!(path = %path, decision = %admission.decision.decision_id, "refused");
                return Ok(rescue::refused(&admission));
            }
            // Later messages of a stream are read before they go on, and decided when they
            // name a subject the call was not decided for.
            let verdict = Verdict::default();
            if let (Some(inspection), Some((message, frames, _))) = (&inspection, first)
                && let Some(subject_path) = inspection.request_subjects.clone()
            {
                let mut metadata = request.headers().clone();
                // It named the first message's subjects; a later message is decided on its own.
                metadata.remove(SUBJECT);
                let call = StreamCall {
                    gate: gate.clone(),
                    policy,
                    path: Arc::from(path),
                    metadata,
                    certs: certs.clone(),
                    subject_path,
                    decided: admission.request.subjects.iter().cloned().collect(),
                };
                let verdict = verdict.clone();
                request = request.map(|body| {
                    Body::new(InspectedRequest::new(message, frames, body, call, verdict))
                });
            }
            admission.stamp(request.headers_mut());
            if inspection.as_ref().is_some_and(|i| i.response.is_some()) {
                // A compressed response could not be read: ask for it uncompressed.
                request.headers_mut().insert(
                    "grpc-accept-encoding",
                    http::HeaderValue::from_static("identity"),
                );
            }
            // The instant the caller's deadline passes, as `transport::deadline` read it when
            // the call arrived (the same instant bounds the whole call there).
            let deadline = deadline.or_else(|| {
                admission
                    .timeout
                    .and_then(|t| tokio::time::Instant::now().checked_add(t))
            });
            let mut span = admission.take_span();
            let id = admission.decision.decision_id;
            let outcome =
                match forward(inner, request, deadline, &mut admission, &gate, &mut span).await {
                    Ok(outcome) => outcome,
                    Err(answer) => return Ok(answer),
                };
            // A later message of the stream was refused: that is the answer, whatever the
            // upstream made of its reset stream.
            if let Some(refusal) = verdict.refusal() {
                mark(&mut span, refusal.code(), &refusal.message());
                return Ok(refusal.into_http());
            }
            match outcome {
                Ok(mut response) => {
                    rescue::tag(&mut response, id);
                    let clear = inspection
                        .as_ref()
                        .map_or(0, |i| i.mask(&admission.decision.minimized));
                    Ok(response.map(|body| {
                        // Read to clear fields, or to end a client stream's response with the
                        // refusal of a later request message; otherwise passed untouched.
                        let body = match inspection {
                            Some(inspection)
                                if inspection.response.is_some() || inspection.client_streaming =>
                            {
                                Body::new(MinimizedResponse::new(
                                    body,
                                    inspection,
                                    clear,
                                    verdict,
                                    gate.telemetry().metrics().clone(),
                                ))
                            }
                            _ => body,
                        };
                        Body::new(InFlight {
                            body: Bounded::new(body, deadline),
                            _slot: slot,
                            _span: span,
                        })
                    }))
                }
                // The upstream client bounds the call by the caller's `grpc-timeout` too, and
                // says so as an error: past the deadline, that is what it is.
                Err(_) if deadline.is_some_and(|at| tokio::time::Instant::now() >= at) => {
                    mark(&mut span, Code::DeadlineExceeded, &"deadline exceeded");
                    Ok(rescue::deadline_exceeded(id))
                }
                Err(e) => {
                    mark(&mut span, Code::Unavailable, &e);
                    Ok(rescue::upstream_unavailable(&e, id))
                }
            }
        })
    }
}

/// Forwards an admitted call, bounded by the caller's deadline. An allowed read's record may
/// still be on its way to the disk: the call goes to the upstream meanwhile, and its outcome
/// is used only once the record is written ([`Admission::hold`]). `Err`: the answer instead
/// — `AUDIT_UNAVAILABLE` when the record could not be written (nothing of the upstream's
/// answer is used), `DEADLINE_EXCEEDED` when the deadline passed first.
async fn forward<S>(
    inner: S,
    request: http::Request<Body>,
    deadline: Option<tokio::time::Instant>,
    admission: &mut Admission,
    gate: &Gate,
    span: &mut Option<CallSpan>,
) -> Result<Result<S::Response, S::Error>, http::Response<Body>>
where
    S: Service<http::Request<Body>>,
{
    let forwarded = inner.oneshot(request);
    let bounded = async move {
        match deadline {
            Some(at) => tokio::time::timeout_at(at, forwarded).await.ok(),
            None => Some(forwarded.await),
        }
    };
    match admission.hold(gate, bounded).await {
        Some(Some(outcome)) => Ok(outcome),
        Some(None) => {
            mark(span, Code::DeadlineExceeded, &"deadline exceeded");
            Err(rescue::deadline_exceeded(admission.decision.decision_id))
        }
        None => {
            mark(span, Code::PermissionDenied, &"audit unavailable");
            Err(rescue::refused(admission))
        }
    }
}

/// How long a call on a route that reads its subjects may take to send its first whole
/// message: the call holds a slot meanwhile, and is refused after it.
const FIRST_MESSAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a request is not a call the data plane forwards: only `POST` with the gRPC protobuf
/// content type is (an HTTP request of another kind would reach the upstream as whatever
/// it is, undecided by any route's meaning).
fn not_grpc(request: &http::Request<Body>) -> Option<MetadataError> {
    if request.method() != http::Method::POST {
        return Some(MetadataError::NotGrpc(format!(
            "method `{}`",
            request.method()
        )));
    }
    let Some(value) = request.headers().get(http::header::CONTENT_TYPE) else {
        return Some(MetadataError::NotGrpc("no content type".to_owned()));
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    match value.as_bytes() {
        b"application/grpc" | b"application/grpc+proto" => None,
        other if other.starts_with(b"application/grpc+") => {
            Some(MetadataError::UnsupportedCodec(text.into_owned()))
        }
        _ => Some(MetadataError::NotGrpc(format!("content type `{text}`"))),
    }
}

/// A request message that cannot be read, as the gate records the refusal.
fn unreadable_message(e: MessageError) -> MetadataError {
    match e {
        MessageError::TooLarge { len, limit } => MetadataError::MessageTooLarge { len, limit },
        MessageError::Compressed => MetadataError::MessageCompressed,
        other => MetadataError::MessageUnreadable(other.to_string()),
    }
}

/// The client certificates of an mTLS connection (leaf first), when it has any.
fn peer_certificates(request: &http::Request<Body>) -> Option<Arc<Vec<CertificateDer<'static>>>> {
    request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
}

/// Records a status pdgate answered with on the call's span, if there is one.
fn mark(span: &mut Option<CallSpan>, code: Code, message: &dyn std::fmt::Display) {
    if let Some(span) = span {
        span.record_status(code, &message.to_string());
    }
}

/// A response body that holds its call's slot, and its span, until it is finished
/// or dropped: the span ends with the call's last message, streams included.
struct InFlight {
    body: Bounded,
    _slot: OwnedSemaphorePermit,
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
