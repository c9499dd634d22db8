//! The data plane's reading of messages, for routes that read them (`policy::inspect`):
//! gRPC's length-prefixed framing over HTTP/2 bodies, the request's subjects (every message
//! of a stream, each new subject decided before its message goes on), and responses with the
//! minimized categories' fields cleared (every message of a stream), and streamed records
//! decided one by one for the subject each names (`records`), dropped when denied.
//!
//! A message is handed on only whole and only once read: nothing of a message pdgate refuses
//! reaches the other side.

use crate::decision::DecisionId;
use crate::gate::{Admission, Ask, Call, Door, Gate, Peer, Policy};
use crate::message::compression::{self, CompressionError, Encoding};
use crate::message::frames::{FrameError, Frames, frame, framed};
use crate::message::{self, CategorySet, SubjectPath, wire::WireError};
use crate::policy::inspect::Inspection;
use crate::telemetry::CallSpan;
use crate::telemetry::metrics::Metrics;
use crate::transport::rescue;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::HeaderMap;
use http_body::Frame;
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use tonic::Status;
use tonic::body::Body;
use tonic::transport::CertificateDer;

/// A message that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("a message of {len} bytes is over pdgate's inspection limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error(transparent)]
    Compression(#[from] CompressionError),
    #[error("the message is not a valid protobuf message: {0}")]
    Wire(#[from] WireError),
    #[error("the body ends inside a message")]
    Truncated,
    #[error("the body cannot be read: {0}")]
    Body(String),
}

impl From<FrameError> for MessageError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { len, limit } => Self::TooLarge { len, limit },
        }
    }
}

/// What a request body held up to its first message.
pub struct FirstMessage {
    /// The first message as it came, when the body has one before its end, and whether it is
    /// compressed.
    pub message: Option<(bool, Bytes)>,
    /// The request's trailers, when the body ended with them.
    pub trailers: Option<HeaderMap>,
    pub ended: bool,
}

/// Reads `body` until its first whole message is in `frames` (or the body ends).
pub async fn first_message(
    body: &mut Body,
    frames: &mut Frames,
) -> Result<FirstMessage, MessageError> {
    let mut trailers = None;
    loop {
        if let Some(message) = frames.next_message()? {
            return Ok(FirstMessage {
                message: Some(message),
                trailers,
                ended: false,
            });
        }
        let next =
            std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut *body), cx)).await;
        match next {
            None => {
                if !frames.is_empty() {
                    return Err(MessageError::Truncated);
                }
                return Ok(FirstMessage {
                    message: None,
                    trailers,
                    ended: true,
                });
            }
            Some(Err(e)) => return Err(MessageError::Body(e.to_string())),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => frames.push(&data),
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
        }
    }
}

/// The subjects of one request message.
pub fn subjects_of(message: &[u8], path: &SubjectPath) -> Result<Vec<String>, MessageError> {
    Ok(message::subjects(message, path)?)
}

/// A refusal that ends a call in mid-stream, shared by its request and response bodies: the
/// request stops reaching the upstream, and the caller's response ends with this status.
#[derive(Clone, Default)]
pub struct Verdict(Arc<Mutex<Option<Status>>>);

impl Verdict {
    fn refuse(&self, status: Status) {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert(status);
    }

    /// The refusal, once there is one.
    pub fn refusal(&self) -> Option<Status> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// What a later message of a stream needs to be decided: the call as it arrived.
pub struct StreamCall {
    pub gate: Arc<Gate>,
    pub policy: Policy,
    pub path: Arc<str>,
    /// The call's metadata, without `x-data-subject` (which named the first message's).
    pub metadata: HeaderMap,
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The connection's address (mesh mode).
    pub remote: Option<std::net::IpAddr>,
    /// What the route reads of its requests: subjects, and on a write the categories set.
    pub inspection: Arc<Inspection>,
    /// The request's `grpc-encoding`.
    pub encoding: Encoding,
    /// Subjects the call has been decided for (and allowed).
    pub decided: BTreeSet<String>,
    /// The `minimize` categories the call may not have: a message that writes one is decided
    /// again, needing it.
    pub refused_writes: CategorySet,
}

impl StreamCall {
    /// A message's subjects and the `minimize` categories it writes.
    fn read(
        &self,
        message: (bool, &[u8]),
        limit: usize,
    ) -> Result<(Vec<String>, CategorySet), MessageError> {
        request_facts(message, &self.encoding, &self.inspection, limit)
    }

    /// Whether a message about `subjects` writing `writes` is covered by what the call was
    /// decided for.
    fn covers(&self, subjects: &[String], writes: CategorySet) -> bool {
        let subjects_decided = match self.inspection.request_subjects {
            Some(_) => !subjects.is_empty() && subjects.iter().all(|s| self.decided.contains(s)),
            None => true,
        };
        subjects_decided && writes & self.refused_writes == 0
    }
}

/// What pdgate reads of a request message: its subjects (when the route reads them) and the
/// `minimize` categories it sets (on a write that may minimize).
pub fn request_facts(
    (compressed, message): (bool, &[u8]),
    encoding: &Encoding,
    inspection: &Inspection,
    limit: usize,
) -> Result<(Vec<String>, CategorySet), MessageError> {
    let message = &*compression::readable(compressed, encoding, message, limit)?;
    let subjects = match &inspection.request_subjects {
        Some(path) => subjects_of(message, path)?,
        None => Vec::new(),
    };
    let writes = match &inspection.request {
        Some(plans) => message::categories_set(message, plans, Inspection::REQUEST)?,
        None => 0,
    };
    Ok((subjects, writes))
}

/// The request body as the upstream gets it on a route that reads its subjects: the first
/// message (already decided), then each later message once read whole — and, when it names a
/// subject the call was not decided for, once that subject is decided and allowed. A deny
/// ends the body with an error (the upstream stream is reset) and is kept in the
/// [`Verdict`].
pub struct InspectedRequest {
    head: Option<Bytes>,
    frames: Frames,
    rest: Option<Body>,
    trailers: Option<HeaderMap>,
    call: StreamCall,
    /// A message (framed as it came) waiting for its decision, and the categories it writes.
    waiting: Option<(Bytes, CategorySet, BoxFuture<'static, Admission>)>,
    verdict: Verdict,
}

impl InspectedRequest {
    pub fn new(
        first: FirstMessage,
        frames: Frames,
        rest: Body,
        call: StreamCall,
        verdict: Verdict,
    ) -> Self {
        Self {
            head: first.message.map(|(compressed, m)| framed(compressed, &m)),
            frames,
            rest: (!first.ended).then_some(rest),
            trailers: first.trailers,
            call,
            waiting: None,
            verdict,
        }
    }

    fn fail(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.verdict.refuse(status.clone());
        self.rest = None;
        self.trailers = None;
        Poll::Ready(Some(Err(status)))
    }
}

impl http_body::Body for InspectedRequest {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(head) = this.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        loop {
            if let Some((message, writes, decision)) = &mut this.waiting {
                let admission = ready!(decision.as_mut().poll(cx));
                let (message, writes) = (message.clone(), *writes);
                this.waiting = None;
                if !admission.allowed() {
                    return this.fail(rescue::refusal_status(&admission));
                }
                this.call
                    .decided
                    .extend(admission.request.subjects.iter().cloned());
                this.call.refused_writes &= !writes;
                return Poll::Ready(Some(Ok(Frame::data(message))));
            }
            match this.frames.next_message() {
                Err(e) => return this.fail(message_status(&e.into())),
                Ok(Some((compressed, message))) => {
                    let limit = this.frames.limit();
                    let (subjects, writes) = match this.call.read((compressed, &message), limit) {
                        Ok(facts) => facts,
                        Err(e) => return this.fail(message_status(&e)),
                    };
                    // Passed on as it came, compressed or not.
                    let message = framed(compressed, &message);
                    if this.call.covers(&subjects, writes) {
                        return Poll::Ready(Some(Ok(Frame::data(message))));
                    }
                    let decision = decide(&this.call, subjects, writes);
                    this.waiting = Some((message, writes, decision));
                    continue;
                }
                Ok(None) => {}
            }
            let Some(rest) = this.rest.as_mut() else {
                if !this.frames.is_empty() {
                    return this.fail(message_status(&MessageError::Truncated));
                }
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            };
            match ready!(Pin::new(rest).poll_frame(cx)) {
                None => this.rest = None,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.frames.push(&data),
                    Err(frame) => this.trailers = frame.into_trailers().ok(),
                },
            }
        }
    }
}

/// The decision for a later message of a stream, about `subjects` and writing `writes`:
/// audited like any call.
fn decide(
    call: &StreamCall,
    subjects: Vec<String>,
    writes: CategorySet,
) -> BoxFuture<'static, Admission> {
    let subjects = call
        .inspection
        .request_subjects
        .is_some()
        .then_some(subjects);
    let gate = call.gate.clone();
    let policy = call.policy.clone();
    let path = call.path.clone();
    let metadata = call.metadata.clone();
    let (certs, remote) = (call.certs.clone(), call.remote);
    Box::pin(async move {
        gate.admit(Call {
            policy,
            door: Door::DataPlane,
            ask: Ask::Method {
                path: &path,
                metadata: &metadata,
                message_subjects: subjects,
                message_writes: writes,
            },
            peer: Peer::of_connection(
                gate.identity(),
                certs.as_ref().and_then(|c| c.first()).map(AsRef::as_ref),
                remote,
                &metadata,
            ),
            trace: &metadata,
            started: std::time::Instant::now(),
        })
        .await
    })
}

/// The status of a message pdgate cannot read.
pub fn message_status(e: &MessageError) -> Status {
    match e {
        MessageError::TooLarge { .. }
        | MessageError::Compression(CompressionError::TooLarge { .. }) => {
            Status::resource_exhausted(e.to_string())
        }
        MessageError::Compression(CompressionError::Unsupported(_)) => {
            Status::unimplemented(e.to_string())
        }
        _ => Status::invalid_argument(e.to_string()),
    }
}

/// What a response stream's records are decided by (a route with `records`): the call as it
/// arrived, and the subjects decided so far.
pub struct RecordCall {
    pub gate: Arc<Gate>,
    pub policy: Policy,
    pub path: Arc<str>,
    /// The call's metadata: the caller, its purpose and recipient (its `x-data-subject`, if
    /// any, told the service whom to export; each record is decided on what it names).
    pub metadata: HeaderMap,
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The connection's address (mesh mode).
    pub remote: Option<std::net::IpAddr>,
    /// Where each record names its subject.
    pub records: SubjectPath,
    /// The call's own decision, which each record's decision names in its audit record.
    pub call: DecisionId,
}

/// The records of a response stream, decided one by one: a record about a subject the
/// call may have passes, one about a subject it may not is dropped (its deny is audited),
/// and the stream goes on. Each subject is decided once per call.
struct Records {
    call: RecordCall,
    allowed: BTreeSet<String>,
    refused: BTreeSet<String>,
    /// A record waiting for its subjects' decision, and those subjects.
    waiting: Option<(Bytes, Vec<String>, BoxFuture<'static, Admission>)>,
    dropped: u64,
}

/// Where a record stands once its subjects are read.
enum RecordFate {
    Pass,
    Drop,
    Decide(Vec<String>),
}

impl Records {
    fn fate(&self, record: &[u8]) -> Result<RecordFate, MessageError> {
        let subjects = subjects_of(record, &self.call.records)?;
        if subjects.iter().any(|s| self.refused.contains(s)) {
            return Ok(RecordFate::Drop);
        }
        if !subjects.is_empty() && subjects.iter().all(|s| self.allowed.contains(s)) {
            return Ok(RecordFate::Pass);
        }
        Ok(RecordFate::Decide(subjects))
    }

    fn decide(&self, subjects: Vec<String>) -> BoxFuture<'static, Admission> {
        let call = &self.call;
        let (gate, policy, path) = (call.gate.clone(), call.policy.clone(), call.path.clone());
        let (metadata, certs, of) = (call.metadata.clone(), call.certs.clone(), call.call);
        let remote = call.remote;
        Box::pin(async move {
            gate.admit(Call {
                policy,
                door: Door::DataPlane,
                ask: Ask::Record {
                    path: &path,
                    metadata: &metadata,
                    subjects,
                    of,
                },
                peer: Peer::of_connection(
                    gate.identity(),
                    certs.as_ref().and_then(|c| c.first()).map(AsRef::as_ref),
                    remote,
                    &metadata,
                ),
                trace: &metadata,
                started: std::time::Instant::now(),
            })
            .await
        })
    }

    /// Notes a record's decision; `Err` when it has no audit record, which ends the stream
    /// (a record is never delivered, nor silently dropped, without its decision's record).
    fn settle(&mut self, subjects: Vec<String>, admission: &Admission) -> Result<bool, Status> {
        if admission.allowed() {
            self.allowed.extend(subjects);
            return Ok(true);
        }
        if admission.decision_id().is_none() {
            return Err(rescue::refusal_status(admission));
        }
        // A record about one subject settles that subject for the rest of the stream; one
        // about several is decided again when it comes (another mix may be allowed).
        if let [one] = subjects.as_slice() {
            self.refused.insert(one.clone());
        }
        self.dropped += 1;
        tracing::debug!(path = %self.call.path, decision = %admission.decision.decision_id, subjects = ?subjects, "record dropped from the response");
        Ok(false)
    }
}

/// A response body as the caller gets it on a route that reads responses: the fields of the
/// minimized categories cleared from every message, every field the descriptors do not know
/// dropped, and (`records`) each record decided for its subject and dropped when denied;
/// trailers pass. The call's [`Verdict`], once a later request message was refused, ends it
/// with that status.
pub struct InspectedResponse {
    inner: Option<Body>,
    frames: Frames,
    inspection: Arc<Inspection>,
    clear: CategorySet,
    records: Option<Records>,
    /// The response's `grpc-encoding`.
    encoding: Encoding,
    verdict: Verdict,
    /// Where the fields cleared and dropped are counted.
    metrics: Arc<Metrics>,
    /// The call's span, ended with the response (when it is dropped), and what was left out
    /// of the response until then, recorded on it.
    span: Option<CallSpan>,
    fields_cleared: u64,
    unknown_fields: u64,
}

impl InspectedResponse {
    pub fn new(
        inner: Body,
        inspection: Arc<Inspection>,
        clear: CategorySet,
        verdict: Verdict,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Some(inner),
            frames: Frames::default(),
            inspection,
            clear,
            records: None,
            encoding: Encoding::Identity,
            verdict,
            metrics,
            span: None,
            fields_cleared: 0,
            unknown_fields: 0,
        }
    }

    /// Ends the call's span with the response, recording on it how many fields were cleared
    /// (`pdgate.fields_cleared`), how many unknown fields dropped (`pdgate.unknown_fields`)
    /// and how many records left out (`pdgate.records_dropped`).
    #[must_use]
    pub fn spanned(mut self, span: Option<CallSpan>) -> Self {
        self.span = span;
        self
    }

    /// Reads messages of at most `limit` bytes (`[limits] inspect_message_bytes`).
    #[must_use]
    pub fn limited(mut self, limit: usize) -> Self {
        self.frames = Frames::with_limit(limit);
        self
    }

    /// Reads the messages in the response's encoding (`grpc-encoding`).
    #[must_use]
    pub fn encoded(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// Decides each message of the stream as a record about the subject it names.
    #[must_use]
    pub fn with_records(mut self, call: RecordCall) -> Self {
        self.records = Some(Records {
            call,
            allowed: BTreeSet::new(),
            refused: BTreeSet::new(),
            waiting: None,
            dropped: 0,
        });
        self
    }

    /// Whether messages must be read whole (else the upstream's bytes pass as they come).
    fn reads_messages(&self) -> bool {
        self.inspection.response.is_some() || self.records.is_some()
    }

    fn end_with(&mut self, status: &Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.inner = None;
        if let Some(records) = &mut self.records {
            records.waiting = None;
        }
        let mut trailers = HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    /// A message as the caller gets it: its fields minimized (when the route minimizes).
    fn deliver(&mut self, message: &[u8]) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let Some(plans) = self.inspection.response.as_ref() else {
            return Poll::Ready(Some(Ok(Frame::data(frame(message)))));
        };
        match message::minimize(message, plans, Inspection::RESPONSE, self.clear) {
            Ok((out, done)) => {
                self.metrics.record_minimized(done.cleared, done.unknown);
                self.fields_cleared += u64::from(done.cleared);
                self.unknown_fields += u64::from(done.unknown);
                Poll::Ready(Some(Ok(Frame::data(frame(&out)))))
            }
            Err(e) => {
                let status = Status::internal(format!(
                    "the service's response is not a valid `{}`: {e}",
                    self.inspection.method
                ));
                self.end_with(&status)
            }
        }
    }
}

impl Drop for InspectedResponse {
    fn drop(&mut self) {
        if let Some(span) = &mut self.span {
            let dropped = self.records.as_ref().map(|r| r.dropped);
            span.record_response(self.fields_cleared, self.unknown_fields, dropped);
        }
    }
}

impl http_body::Body for InspectedResponse {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some(refusal) = this.verdict.refusal()
                && this.inner.is_some()
            {
                return this.end_with(&refusal);
            }
            if let Some(records) = &mut this.records
                && let Some((_, _, decision)) = &mut records.waiting
            {
                let admission = ready!(decision.as_mut().poll(cx));
                let Some((record, subjects, _)) = records.waiting.take() else {
                    continue;
                };
                match records.settle(subjects, &admission) {
                    Ok(true) => return this.deliver(&record),
                    Ok(false) => {
                        this.metrics.record_dropped_record();
                        continue;
                    }
                    Err(status) => return this.end_with(&status),
                }
            }
            match this.frames.next_message() {
                Err(e) => {
                    return this.end_with(&Status::internal(format!(
                        "the service's response cannot be inspected: {e}"
                    )));
                }
                Ok(Some((compressed, message))) => {
                    // Read decompressed, and handed on uncompressed (gRPC allows that per
                    // message, whatever the response's `grpc-encoding`).
                    let message = match compression::readable(
                        compressed,
                        &this.encoding,
                        &message,
                        this.frames.limit(),
                    ) {
                        // Not compressed: the message itself, not a copy.
                        Ok(Cow::Borrowed(_)) => message,
                        Ok(Cow::Owned(decompressed)) => Bytes::from(decompressed),
                        Err(e) => {
                            return this.end_with(&Status::internal(format!(
                                "the service's response cannot be inspected: {e}"
                            )));
                        }
                    };
                    let Some(records) = &mut this.records else {
                        return this.deliver(&message);
                    };
                    match records.fate(&message) {
                        Ok(RecordFate::Pass) => return this.deliver(&message),
                        Ok(RecordFate::Drop) => {
                            records.dropped += 1;
                            this.metrics.record_dropped_record();
                        }
                        Ok(RecordFate::Decide(subjects)) => {
                            let decision = records.decide(subjects.clone());
                            records.waiting = Some((message, subjects, decision));
                        }
                        Err(e) => {
                            return this.end_with(&Status::internal(format!(
                                "a record of the service's response cannot be read: {e}"
                            )));
                        }
                    }
                    continue;
                }
                Ok(None) => {}
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(Pin::new(inner).poll_frame(cx)) {
                None => {
                    this.inner = None;
                    if !this.frames.is_empty() {
                        return this.end_with(&Status::internal(
                            "the service's response ends inside a message",
                        ));
                    }
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(frame)) => match frame.into_data() {
                    // Nothing to read on this route (read only for a refusal of a later
                    // request message): the bytes pass as they came, neither buffered nor
                    // held to the inspection limit.
                    Ok(data) if !this.reads_messages() => {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(data) => this.frames.push(&data),
                    Err(frame) => {
                        // Trailers: the upstream's status, unless a refusal came first.
                        if let Some(refusal) = this.verdict.refusal() {
                            return this.end_with(&refusal);
                        }
                        this.inner = None;
                        if let Some(records) = &this.records
                            && records.dropped > 0
                        {
                            tracing::info!(path = %records.call.path, decision = %records.call.call, dropped = records.dropped, "records dropped from the response stream");
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_none()
            && self.frames.is_empty()
            && self.records.as_ref().is_none_or(|r| r.waiting.is_none())
    }
}
