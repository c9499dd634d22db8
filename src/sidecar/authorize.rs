//! The data plane's door: per call, take a call slot, let the gate admit the call, then
//! forward it (with the metadata the gate stamps) or answer the refusal. A refused call never
//! reaches the inner (upstream) service.

use super::deadline::Bounded;
use super::messages::{
    InspectedRequest, InspectedResponse, MessageError, RecordCall, StreamCall, Verdict,
    first_message, request_facts,
};
use crate::gate::metadata::{MetadataError, SUBJECT};
use crate::gate::{Admission, Ask, Call, Door, Gate, Peer};
use crate::message::compression::Encoding;
use crate::message::frames::Frames;
use crate::telemetry::CallSpan;
use crate::transport::deadline::Deadline;
use crate::transport::limits::Limits;
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
    /// How long the upstream may take to answer a call without a deadline.
    response_timeout: std::time::Duration,
    /// The largest message read on a route that reads messages.
    inspect_bytes: usize,
}

impl AuthorizeLayer {
    pub fn new(gate: Arc<Gate>, max_calls: usize, limits: &Limits) -> Self {
        let slots = Arc::new(CallSlots::new(max_calls, limits.max_calls_per_caller));
        gate.telemetry()
            .metrics()
            .watch_call_slots(slots.semaphore.clone(), max_calls);
        Self {
            gate,
            slots,
            response_timeout: limits.response_timeout,
            inspect_bytes: limits.inspect_message_bytes,
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
            response_timeout: self.response_timeout,
            inspect_bytes: self.inspect_bytes,
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    gate: Arc<Gate>,
    slots: Arc<CallSlots>,
    response_timeout: std::time::Duration,
    inspect_bytes: usize,
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
        let response_timeout = self.response_timeout;
        let inspect_bytes = self.inspect_bytes;
        let inner = self.inner.clone();
        let deadline = request.extensions().get::<Deadline>().map(|d| d.0);
        Box::pin(async move {
            let started = std::time::Instant::now();
            // The slot travels with the response body: a call counts as in flight until its
            // last message (a stream) or its trailers are sent, or it is cancelled.
            let certs = peer_certificates(&request);
            let remote = remote_address(&request);
            let slot = match slots.take(caller_key(certs.as_deref(), request.headers())) {
                Ok(slot) => slot,
                Err(shed) => {
                    gate.telemetry().metrics().record_shed();
                    return Ok(match shed {
                        Shed::AllSlots => rescue::overloaded(slots.limit),
                        Shed::CallerShare => rescue::caller_overloaded(slots.per_caller),
                    });
                }
            };
            let policy = gate.policy();
            // The URI's own handle (a reference count), so that the path can be read while the
            // body is.
            let uri = request.uri().clone();
            let path = uri.path();
            let inspection = policy.inspection(path);
            let encoding = encoding_of(request.headers());
            // A route that reads its subjects: the first message, before anything is decided
            // (and before anything reaches the upstream).
            let mut first = None;
            let mut unreadable = not_grpc(&request);
            if unreadable.is_some() {
                // Refused whatever the route: its body is not read.
            } else if let Some(reading) = inspection.as_ref().filter(|i| i.reads_requests()) {
                let mut frames = Frames::with_limit(inspect_bytes);
                let read = tokio::time::timeout(
                    FIRST_MESSAGE_WAIT,
                    first_message(request.body_mut(), &mut frames),
                )
                .await
                .unwrap_or(Err(MessageError::Body(format!(
                    "no whole request message within {FIRST_MESSAGE_WAIT:?}"
                ))));
                match read.and_then(|message| {
                    let facts = match &message.message {
                        Some((compressed, m)) => {
                            request_facts((*compressed, m), &encoding, reading, inspect_bytes)?
                        }
                        None => (Vec::new(), 0),
                    };
                    Ok((message, facts))
                }) {
                    Ok((message, facts)) => first = Some((message, frames, facts)),
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
                    message_subjects: first
                        .as_ref()
                        .filter(|_| {
                            inspection
                                .as_ref()
                                .is_some_and(|i| i.request_subjects.is_some())
                        })
                        .map(|(_, _, (subjects, _))| subjects.clone()),
                    message_writes: first.as_ref().map_or(0, |(_, _, (_, writes))| *writes),
                },
            };
            let mut admission = gate
                .admit_overlapped(Call {
                    policy: policy.clone(),
                    door: Door::DataPlane,
                    ask,
                    peer: Peer::of_connection(
                        gate.identity(),
                        certs.as_ref().and_then(|c| c.first()).map(AsRef::as_ref),
                        remote,
                        request.headers(),
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
            if let (Some(inspection), Some((message, frames, _))) = (&inspection, first) {
                let mut metadata = request.headers().clone();
                if inspection.request_subjects.is_some() {
                    // It named the first message's subjects; a later message is decided on its
                    // own.
                    metadata.remove(SUBJECT);
                }
                let call = StreamCall {
                    gate: gate.clone(),
                    policy: policy.clone(),
                    path: Arc::from(path),
                    metadata,
                    certs: certs.clone(),
                    remote,
                    inspection: inspection.clone(),
                    encoding: encoding.clone(),
                    decided: admission.request.subjects.iter().cloned().collect(),
                    refused_writes: inspection.mask(&admission.decision.minimized),
                };
                let verdict = verdict.clone();
                request = request.map(|body| {
                    Body::new(InspectedRequest::new(message, frames, body, call, verdict))
                });
            }
            // A route whose streamed records are decided one by one: what they are decided
            // by, taken before the metadata is stamped for the upstream.
            let records = inspection
                .as_ref()
                .and_then(|i| i.records.clone())
                .map(|records| RecordCall {
                    gate: gate.clone(),
                    policy: policy.clone(),
                    path: Arc::from(path),
                    metadata: request.headers().clone(),
                    certs: certs.clone(),
                    remote,
                    records,
                    call: admission.decision.decision_id,
                });
            admission.stamp(request.headers_mut());
            if inspection
                .as_ref()
                .is_some_and(|i| i.response.is_some() || i.records.is_some())
            {
                // pdgate reads gzip, but rewrites cheaper what it need not decompress.
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
            let bounds = Bounds {
                deadline,
                response_timeout,
            };
            let outcome =
                match forward(inner, request, bounds, &mut admission, &gate, &mut span).await {
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
                    let response_encoding = encoding_of(response.headers());
                    let clear = inspection
                        .as_ref()
                        .map_or(0, |i| i.mask(&admission.decision.minimized));
                    Ok(response.map(|body| {
                        // Read to clear fields or decide records, or to end a client stream's
                        // response with the refusal of a later request message; otherwise
                        // passed untouched.
                        let body = match inspection {
                            Some(inspection)
                                if inspection.response.is_some()
                                    || inspection.client_streaming
                                    || records.is_some() =>
                            {
                                let inspected = InspectedResponse::new(
                                    body,
                                    inspection,
                                    clear,
                                    verdict,
                                    gate.telemetry().metrics().clone(),
                                )
                                .encoded(response_encoding)
                                .limited(inspect_bytes)
                                .spanned(span.take());
                                Body::new(match records {
                                    Some(records) => inspected.with_records(records),
                                    None => inspected,
                                })
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

/// What bounds a forwarded call: the caller's deadline, or without one the time the upstream
/// has to start its answer (a silent upstream would otherwise hold the call's slot forever).
struct Bounds {
    deadline: Option<tokio::time::Instant>,
    response_timeout: std::time::Duration,
}

/// How a bounded upstream call ended.
enum Forwarded<T> {
    Answered(T),
    DeadlinePassed,
    NoResponse,
}

/// Forwards an admitted call within its [`Bounds`]. An allowed read's record may still be on
/// its way to the disk: the call goes to the upstream meanwhile, and its outcome is used only
/// once the record is written ([`Admission::hold`]). `Err`: the answer instead —
/// `AUDIT_UNAVAILABLE` when the record could not be written (nothing of the upstream's answer
/// is used), `DEADLINE_EXCEEDED` when the deadline or the response bound passed first.
async fn forward<S>(
    inner: S,
    request: http::Request<Body>,
    bounds: Bounds,
    admission: &mut Admission,
    gate: &Gate,
    span: &mut Option<CallSpan>,
) -> Result<Result<S::Response, S::Error>, http::Response<Body>>
where
    S: Service<http::Request<Body>>,
{
    let forwarded = inner.oneshot(request);
    let Bounds {
        deadline,
        response_timeout,
    } = bounds;
    let bounded = async move {
        match deadline {
            Some(at) => match tokio::time::timeout_at(at, forwarded).await {
                Ok(outcome) => Forwarded::Answered(outcome),
                Err(_) => Forwarded::DeadlinePassed,
            },
            None => match tokio::time::timeout(response_timeout, forwarded).await {
                Ok(outcome) => Forwarded::Answered(outcome),
                Err(_) => Forwarded::NoResponse,
            },
        }
    };
    let id = admission.decision.decision_id;
    match admission.hold(gate, bounded).await {
        Some(Forwarded::Answered(outcome)) => Ok(outcome),
        Some(Forwarded::DeadlinePassed) => {
            mark(span, Code::DeadlineExceeded, &"deadline exceeded");
            Err(rescue::deadline_exceeded(id))
        }
        Some(Forwarded::NoResponse) => {
            mark(span, Code::DeadlineExceeded, &"no upstream response");
            Err(rescue::no_response(response_timeout, id))
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

/// The message encoding a request or response names (`grpc-encoding`).
fn encoding_of(headers: &http::HeaderMap) -> Encoding {
    Encoding::named(headers.get("grpc-encoding").and_then(|v| v.to_str().ok()))
}

/// A request message that cannot be read, as the gate records the refusal.
fn unreadable_message(e: MessageError) -> MetadataError {
    match e {
        MessageError::TooLarge { len, limit } => MetadataError::MessageTooLarge { len, limit },
        MessageError::Compression(e) => e.into(),
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

/// The address the connection comes from (mesh mode believes the mesh's header only from
/// the local proxy's).
fn remote_address(request: &http::Request<Body>) -> Option<std::net::IpAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
        .and_then(TcpConnectInfo::remote_addr)
        .map(|addr| addr.ip())
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
    _slot: CallSlot,
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

/// Calls in flight; a call that finds no slot left is shed (`RESOURCE_EXHAUSTED`), and so is
/// one whose caller already holds its share of them (`limits.max_calls_per_caller`): one
/// caller — or one connection's streams — cannot take every slot and starve the others.
struct CallSlots {
    semaphore: Arc<Semaphore>,
    limit: usize,
    per_caller: usize,
    /// Calls in flight per caller key ([`caller_key`]); an entry goes when its count is 0.
    callers: std::sync::Mutex<std::collections::HashMap<u64, usize>>,
    /// Keys the caller hash per process, so that no one can pick names that share a count.
    hasher: std::collections::hash_map::RandomState,
}

impl CallSlots {
    fn new(limit: usize, per_caller: usize) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(limit)),
            limit,
            per_caller,
            callers: std::sync::Mutex::default(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// A slot for a call of `caller` (its certificate, or its claimed name in the insecure
    /// mode: the caller is not authenticated yet, and this only shares out slots), or why the
    /// call is shed.
    fn take(self: &Arc<Self>, caller: &[u8]) -> Result<CallSlot, Shed> {
        use std::hash::BuildHasher;
        let key = self.hasher.hash_one(caller);
        let Ok(permit) = self.semaphore.clone().try_acquire_owned() else {
            return Err(Shed::AllSlots);
        };
        let mut callers = self
            .callers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let held = callers.entry(key).or_insert(0);
        if *held >= self.per_caller {
            return Err(Shed::CallerShare);
        }
        *held += 1;
        Ok(CallSlot {
            _permit: permit,
            key,
            slots: self.clone(),
        })
    }
}

/// Why a call found no slot.
enum Shed {
    AllSlots,
    CallerShare,
}

/// One call's slot, global and of its caller, until dropped.
struct CallSlot {
    _permit: OwnedSemaphorePermit,
    key: u64,
    slots: Arc<CallSlots>,
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        let mut callers = self
            .slots
            .callers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(held) = callers.get_mut(&self.key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                callers.remove(&self.key);
            }
        }
    }
}

/// Whose share a call counts against: the peer certificate (mTLS), else the `x-caller` it
/// claims (insecure mode); calls naming no caller share one key.
fn caller_key<'a>(
    certs: Option<&'a Vec<CertificateDer<'static>>>,
    headers: &'a http::HeaderMap,
) -> &'a [u8] {
    match certs.and_then(|c| c.first()) {
        Some(leaf) => leaf.as_ref(),
        None => headers
            .get("x-caller")
            .map_or(&[][..], http::HeaderValue::as_bytes),
    }
}
