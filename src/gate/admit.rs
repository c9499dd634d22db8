//! The admission pipeline: one call, from what a door read of it to what the door must answer.
//!
//! ```text
//! door ─ Call ─▶ Gate::admit: caller (peer) → snapshot, loaded once → metadata → route
//!                  → decide (cache, engine; subjects read once if the registry must be asked,
//!                    stage 5 finished again, same id) → audit record, written before the answer
//!                  → metrics, span ─▶ Admission ─▶ door: forward | refuse (transport::rescue)
//! ```
//!
//! Every answer that carries a decision id has its audit record, refusals of unreadable
//! metadata included; a decision whose record cannot be written becomes `AUDIT_UNAVAILABLE`
//! and its answer carries no decision id.
//!
//! The data plane overlaps an allowed read's record with the upstream call
//! ([`Gate::admit_overlapped`], [`Admission::hold`]): a read has no effect of its own, so it
//! may go ahead while the record is on its way to the disk, as long as nothing of its answer
//! is released before the record is written. A write or a delete is recorded, then forwarded:
//! its effect must never exist without its record.

use super::Gate;
use super::metadata::{
    self, AUTHENTICATED_CALLER, CALLER, DECISION_ID, MetadataError, PDGATE_PREFIX,
};
use crate::audit::{self, AuditError, Receipt, RecordBody, RecordKind};
use crate::decision::{Decision, DecisionId, Pending, Reason, ReasonCode, Request};
use crate::identity::{IdentityMode, MeshRefusal};
use crate::message::CategorySet;
use crate::policy::Action;
use crate::policy::Snapshot;
use crate::policy::inspect::Inspection;
use crate::telemetry::CallSpan;
use crate::telemetry::metrics::{PURPOSE_NONE, PURPOSE_UNKNOWN};
use futures_util::future::{Either, select};
use http::{HeaderMap, HeaderName, HeaderValue};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The door a call came through: it names the call's span and the kind of its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// The data plane: the call itself passes through pdgate.
    DataPlane,
    /// Envoy's `ext_authz`: Envoy asks about a call and forwards it itself.
    Envoy,
    /// `AccessControl.Check`: a service asks about a request.
    Check,
    /// One request of an `AccessControl.BatchCheck`.
    BatchCheck,
}

/// Who is at the other end, as the transport verified it. Read only in mTLS and mesh modes;
/// in the insecure development mode the caller names itself (`x-caller`, or the Check
/// request).
#[derive(Debug, Clone, Copy)]
pub enum Peer<'a> {
    /// The client certificate (leaf, DER) of the connection; `None` when it has none.
    Certificate(Option<&'a [u8]>),
    /// A peer that a proxy verified and named (Envoy's `source.principal`).
    Principal(&'a str),
    /// Mesh mode: the connection's address (the local mesh proxy's, or not) and the call's
    /// headers, which carry the proxy's verified-peer header.
    Mesh {
        remote: Option<IpAddr>,
        headers: &'a HeaderMap,
    },
}

impl<'a> Peer<'a> {
    /// The peer of a connection, as the identity mode reads it: in mesh mode its address and
    /// the call's headers, else its client certificate.
    pub fn of_connection(
        mode: IdentityMode,
        leaf: Option<&'a [u8]>,
        remote: Option<IpAddr>,
        headers: &'a HeaderMap,
    ) -> Self {
        match mode {
            IdentityMode::Mesh => Self::Mesh { remote, headers },
            IdentityMode::Mtls | IdentityMode::InsecureHeader => Self::Certificate(leaf),
        }
    }
}

/// What a call asks.
#[derive(Debug)]
pub enum Ask<'a> {
    /// A call to a method of the protected service: the route says what it does, the
    /// metadata who asks and for what purpose. About whom: the request message's subjects
    /// when the route reads them (`message_subjects`, read by the door; `None` when it could
    /// not), else the metadata's.
    Method {
        path: &'a str,
        metadata: &'a HeaderMap,
        message_subjects: Option<Vec<String>>,
        /// On a write that may minimize: the route's `minimize` categories (bits of
        /// [`Inspection::minimizable`]) whose fields the request message sets. The call needs
        /// them: a caller may not write what it may not have.
        message_writes: CategorySet,
    },
    /// A call the door could not read as one (an Envoy check without HTTP attributes, or
    /// whose headers are not text): refused `INVALID_ARGUMENT`, and audited.
    Unreadable {
        path: Option<&'a str>,
        error: MetadataError,
    },
    /// `AccessControl.Check`: the request names what it asks.
    Check(Request),
    /// One record of a response stream on a route that decides records one by one
    /// (`records` in routes.yaml): the call's own decision was `of`, this one is about the
    /// `subjects` the record names. A deny drops the record; the stream goes on.
    Record {
        path: &'a str,
        metadata: &'a HeaderMap,
        subjects: Vec<String>,
        of: DecisionId,
    },
}

/// Whose data a call to a route is about, as the door read it.
enum Found {
    /// The request message's subjects (`None`: the route reads none, or the door could not),
    /// and the `minimize` categories it writes.
    Request(Option<Vec<String>>, CategorySet),
    /// A response record's.
    Record(Vec<String>),
}

/// A call, as a door hands it to [`Gate::admit`].
pub struct Call<'a> {
    /// The policy the call is decided under, loaded once by the door ([`Gate::policy`]):
    /// the route the door read the message by and the decision come from the same version.
    pub policy: Policy,
    pub door: Door,
    pub ask: Ask<'a>,
    pub peer: Peer<'a>,
    /// The metadata holding the trace context the call continues (`traceparent`).
    pub trace: &'a HeaderMap,
    /// When the call arrived: its decision latency counts from here.
    pub started: Instant,
}

/// The active policy, as a door loads it once per call ([`Gate::policy`]).
#[derive(Clone)]
pub struct Policy(Option<Arc<Snapshot>>);

impl Policy {
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.0.as_deref()
    }

    /// What the route of `path` reads of its messages, when it reads them.
    pub fn inspection(&self, path: &str) -> Option<Arc<Inspection>> {
        self.snapshot()?.route(path)?.inspection.clone()
    }
}

/// The gate's answer: the decision, and what the door needs to carry it out.
pub struct Admission {
    pub decision: Decision,
    /// The request as decided: the caller as verified, the route's action and categories.
    pub request: Request,
    /// Why the call could not be read, when it could not: the door answers
    /// `INVALID_ARGUMENT` (the refusal is recorded).
    pub malformed: Option<MetadataError>,
    /// The caller's deadline (`grpc-timeout`).
    pub timeout: Option<Duration>,
    /// Whether the decision's record was written; when not, the decision is an
    /// `AUDIT_UNAVAILABLE` deny.
    recorded: bool,
    mtls: bool,
    /// The call's span (OTLP on): the door keeps it until the call ends.
    span: Option<CallSpan>,
    /// An allowed read's record, queued but not yet written ([`Gate::admit_overlapped`]):
    /// [`Admission::hold`] waits for it, and counts the decision in the metrics then.
    unsettled: Option<Unsettled>,
}

/// What [`Admission::hold`] needs to finish an overlapped admission.
struct Unsettled {
    receipt: Receipt,
    /// The purpose's metrics label, as [`Gate::observe`] chose it at admission.
    label: Label,
    started: Instant,
}

/// The purpose label a decision is counted under (see [`Gate::observe`]).
#[derive(Clone, Copy)]
enum Label {
    None,
    Unknown,
    Declared,
}

impl Gate {
    /// The active policy, for one call.
    pub fn policy(&self) -> Policy {
        Policy(self.decider.policy())
    }

    /// Admits or refuses one call. Never fails: whatever cannot be evaluated is a deny, and
    /// the answer is audited before it is returned.
    pub async fn admit(&self, call: Call<'_>) -> Admission {
        self.admit_with(call, false).await
    }

    /// Admits or refuses one call like [`Gate::admit`], except that an allowed read returns
    /// as soon as its record is queued, not written: the door forwards the call meanwhile
    /// and must pass the upstream call through [`Admission::hold`], which releases its
    /// outcome only once the record is written. Refusals, writes and deletes are recorded
    /// before this returns, as with [`Gate::admit`].
    pub async fn admit_overlapped(&self, call: Call<'_>) -> Admission {
        self.admit_with(call, true).await
    }

    async fn admit_with(&self, call: Call<'_>, overlap: bool) -> Admission {
        let Call {
            policy,
            door,
            ask,
            peer,
            trace,
            started,
        } = call;
        let snapshot = policy.snapshot();
        let method = match &ask {
            Ask::Method { path, .. } | Ask::Record { path, .. } => Some(*path),
            Ask::Unreadable { path, .. } => *path,
            Ask::Check(_) => None,
        };
        let mut span = self.telemetry.start_span(trace, door.rpc(method));
        let (authenticated, refused) = match self.authenticate(peer, snapshot) {
            Ok(caller) => (caller, None),
            // Denied as a caller not identified, with the mesh's reason (below).
            Err(refusal) => (Some(String::new()), Some(refusal)),
        };

        let mut malformed = None;
        let mut timeout = None;
        let mut detail = None;
        let (pending, request) = match ask {
            Ask::Method {
                path,
                metadata,
                message_subjects,
                message_writes,
            } => match metadata::extract(metadata, authenticated.as_deref()) {
                Ok(context) => {
                    timeout = context.timeout;
                    let found = Found::Request(message_subjects, message_writes);
                    let routed = self.route(snapshot, path, context, found, door);
                    if routed.0.is_per_record() {
                        detail = Some(
                            "the call's subjects are decided one by one, per record of its response"
                                .to_owned(),
                        );
                    }
                    routed
                }
                Err(error) => self.unreadable(snapshot, authenticated, error, &mut malformed),
            },
            Ask::Record {
                path,
                metadata,
                subjects,
                of,
            } => match metadata::extract(metadata, authenticated.as_deref()) {
                Ok(context) => {
                    detail = Some(format!("a record of the response to decision {of}"));
                    self.route(snapshot, path, context, Found::Record(subjects), door)
                }
                Err(error) => self.unreadable(snapshot, authenticated, error, &mut malformed),
            },
            Ask::Unreadable { error, .. } => {
                self.unreadable(snapshot, authenticated, error, &mut malformed)
            }
            Ask::Check(mut request) => {
                if let Some(caller) = authenticated {
                    request.caller = caller;
                }
                (self.decider.begin(snapshot, &request), request)
            }
        };
        let mut decision = self.finish(&pending, &request).await;
        if let Some(refusal) = &refused {
            refuse_mesh_peer(&mut decision, refusal);
        }
        if decision.allowed && !door.clears_response_fields() && !decision.minimized.is_empty() {
            // This door forwards the response as the service sends it: a call that needs
            // fields cleared cannot go that way.
            decision.allowed = false;
            decision.reasons = vec![Reason::new(
                ReasonCode::MessageInspectionRequired,
                "§6(5)",
                format!(
                    "the response must go without `{}`, and Envoy's ext_authz cannot clear fields; send the call through pdgate's data plane",
                    decision.minimized.join("`, `")
                ),
            )];
            decision.minimized.clear();
        }

        let mut body = audit::body_of(&decision, &request, door.record_kind());
        body.method = method.map(str::to_owned);
        body.detail = malformed.as_ref().map(ToString::to_string).or(detail);
        if let Some(refusal) = &refused {
            body.detail = Some(format!("mesh identity refused: {refusal}"));
        }
        // pdgate's own span when it makes one (same trace as the caller's), else the caller's
        // span as its traceparent names it.
        if let Some((trace_id, span_id)) = span
            .as_ref()
            .and_then(CallSpan::ids)
            .or_else(|| traceparent(trace))
        {
            body.trace_id = Some(trace_id);
            body.span_id = Some(span_id);
        }
        body.latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        // Only a read may go ahead of its record: it changes nothing at the upstream.
        let overlap = overlap && decision.allowed && request.action == "read";
        let (decision, recorded, receipt) = self.record(decision, body, overlap).await;
        if !recorded {
            malformed = None;
        }

        let label = label(&request.purpose, snapshot);
        let unsettled = receipt.map(|receipt| Unsettled {
            receipt,
            label,
            started,
        });
        if unsettled.is_none() {
            self.observe(&decision, label.of(&request.purpose), started);
        }
        if let Some(span) = &mut span {
            span.record_decision(&decision, &request, method);
            if let Some(error) = &malformed {
                span.record_status(tonic::Code::InvalidArgument, &error.to_string());
            }
        }
        Admission {
            decision,
            request,
            malformed,
            timeout,
            recorded,
            mtls: self.identity.verified(),
            span,
            unsettled,
        }
    }

    /// The caller the transport vouches for: `None` in the insecure mode (the call names
    /// itself); in mTLS mode the peer's name, empty when it has none (`CALLER_UNKNOWN`); in
    /// mesh mode the name in the mesh proxy's header, or why it is not believed.
    fn authenticate(
        &self,
        peer: Peer<'_>,
        snapshot: Option<&Snapshot>,
    ) -> Result<Option<String>, MeshRefusal> {
        Ok(match (self.identity, peer) {
            (IdentityMode::InsecureHeader, _) => None,
            (IdentityMode::Mesh, Peer::Mesh { remote, headers }) => {
                Some(self.mesh_caller(remote, headers)?)
            }
            // A door without a connection of its own to read (Envoy's ext_authz names the
            // peer Envoy saw): in mesh mode nobody.
            (IdentityMode::Mesh, _) => Some(String::new()),
            (IdentityMode::Mtls, peer) => Some(match peer {
                Peer::Certificate(None) | Peer::Mesh { .. } => String::new(),
                Peer::Certificate(Some(leaf)) => self.naming.caller(leaf, |name| {
                    snapshot.is_some_and(|p| p.caller(name).is_some())
                }),
                Peer::Principal(principal) => self.naming.caller_from_name(principal),
            }),
        })
    }

    /// The request a call to `path` makes under `snapshot`: the route's action and
    /// categories, and its subjects — the request message's when the route reads them (the
    /// metadata, when given, must name exactly the same, else `SUBJECT_MISMATCH`; on a client
    /// stream it may name more, all decided). A method without a route is denied
    /// `ROUTE_UNKNOWN`.
    ///
    /// On a route that decides its response's records one by one (`records`), a call whose
    /// request names no subject is decided without them (stage 5 waits for the records;
    /// `x-data-subject` then only tells the service whom to export), and each record is
    /// decided for the subjects it names ([`Found::Record`]).
    fn route<'s>(
        &self,
        snapshot: Option<&'s Snapshot>,
        path: &str,
        context: metadata::CallContext,
        found: Found,
        door: Door,
    ) -> (Pending<'s>, Request) {
        let mut request = Request {
            caller: context.caller,
            purpose: context.purpose,
            action: String::new(),
            categories: Vec::new(),
            subjects: context.subjects,
            recipient: context.recipient,
            minimizable: Vec::new(),
        };
        let Some(snapshot) = snapshot else {
            return (self.decider.begin(None, &request), request);
        };
        let Some(route) = snapshot.route(path) else {
            let reason = Reason::new(
                ReasonCode::RouteUnknown,
                "§6(5)",
                format!(
                    "method `{path}` has no route in routes.yaml; pdgate denies methods it does not know"
                ),
            );
            return (self.decider.refuse(Some(snapshot), reason), request);
        };
        route.action.as_str().clone_into(&mut request.action);
        request.categories.clone_from(&route.categories);
        request.minimizable.clone_from(&route.minimize);
        let message_subjects = match found {
            Found::Request(subjects, writes) => {
                if route.action != Action::Read && writes != 0 {
                    // What the message writes, the call needs.
                    request.minimizable.clear();
                    for (bit, category) in route.minimize.iter().enumerate() {
                        if bit < 64 && writes & (1 << bit) != 0 {
                            request.categories.push(category.clone());
                        } else {
                            request.minimizable.push(category.clone());
                        }
                    }
                }
                subjects
            }
            Found::Record(subjects) => {
                request.subjects = subjects;
                return (self.decider.begin(Some(snapshot), &request), request);
            }
        };
        let per_record = route
            .inspection
            .as_ref()
            .is_some_and(|i| i.records.is_some() && i.request_subjects.is_none());
        if per_record {
            if !door.clears_response_fields() {
                let reason = Reason::new(
                    ReasonCode::MessageInspectionRequired,
                    "§6(5)",
                    format!(
                        "`{path}` streams records that are decided one by one, and this door cannot drop records from a response; send the call through pdgate's data plane"
                    ),
                );
                return (self.decider.refuse(Some(snapshot), reason), request);
            }
            request.subjects.clear();
            return (
                self.decider.begin(Some(snapshot), &request).per_record(),
                request,
            );
        }
        let reads_subjects = route
            .inspection
            .as_ref()
            .filter(|i| i.request_subjects.is_some());
        if let Some(inspection) = reads_subjects {
            let Some(found) = message_subjects else {
                let reason = Reason::new(
                    ReasonCode::MessageInspectionRequired,
                    "§6(5)",
                    format!(
                        "`{path}` is decided on the subjects its request message names, and this door cannot read the message; send the call through pdgate's data plane"
                    ),
                );
                return (self.decider.refuse(Some(snapshot), reason), request);
            };
            if inspection.client_streaming {
                // A stream's metadata may name the subjects of all its messages: the call is
                // decided for those and the first message's; a later message naming another
                // is decided before it goes on.
                for subject in found {
                    if !request.subjects.contains(&subject) {
                        request.subjects.push(subject);
                    }
                }
                return (self.decider.begin(Some(snapshot), &request), request);
            }
            if !request.subjects.is_empty() && !same_subjects(&request.subjects, &found) {
                let reason = Reason::new(
                    ReasonCode::SubjectMismatch,
                    "§6(5)",
                    format!(
                        "`x-data-subject` names `{}`, the request message `{}`; the metadata must name exactly the message's subjects",
                        request.subjects.join("`, `"),
                        found.join("`, `")
                    ),
                );
                request.subjects = found;
                return (self.decider.refuse(Some(snapshot), reason), request);
            }
            request.subjects = found;
        }
        (self.decider.begin(Some(snapshot), &request), request)
    }

    /// The refusal of a call whose metadata cannot be read: denied `METADATA_INVALID`,
    /// recorded with the caller the transport vouches for (if any).
    fn unreadable<'s>(
        &self,
        snapshot: Option<&'s Snapshot>,
        authenticated: Option<String>,
        error: MetadataError,
        malformed: &mut Option<MetadataError>,
    ) -> (Pending<'s>, Request) {
        let reason = Reason::new(ReasonCode::MetadataInvalid, "§6(5)", error.to_string());
        *malformed = Some(error);
        let request = Request {
            caller: authenticated.unwrap_or_default(),
            ..Request::default()
        };
        (self.decider.refuse(snapshot, reason), request)
    }

    /// Stage 5 against the subjects' state. When the decision found a subject the registry's
    /// cache cannot answer for, that state is read and stage 5 finished again — the same
    /// decision, id and cache lookup: a decision that needs no subject never waits for the
    /// registry.
    async fn finish(&self, pending: &Pending<'_>, request: &Request) -> Decision {
        let states = self.subjects.states();
        let decision = self.decider.finish(pending, request, states);
        if let Some(cache) = self.subjects.registry()
            && cache.wants_load(&decision, &request.subjects)
        {
            cache.load(&request.subjects).await;
            return self.decider.finish(pending, request, states);
        }
        decision
    }

    /// Writes the decision's audit record and waits until it is written — or, with
    /// `overlap`, only until it is queued, returning the receipt to wait on. If it cannot be
    /// written (or queued), the decision becomes an `AUDIT_UNAVAILABLE` deny: no call goes
    /// through, and no answer names a decision, without its record.
    async fn record(
        &self,
        mut decision: Decision,
        mut body: RecordBody,
        overlap: bool,
    ) -> (Decision, bool, Option<Receipt>) {
        body.latency_us = body.latency_us.max(1);
        // A shadow policy that decided otherwise: recorded and counted here, once per call.
        body.shadow_decision = decision.shadow_decision();
        self.decider.count_shadow_difference(&decision);
        let written = match self.audit.submit(body).await {
            Ok(receipt) if overlap => return (decision, true, Some(receipt)),
            Ok(receipt) => receipt.written().await,
            Err(e) => Err(e),
        };
        match written {
            Ok(_) => (decision, true, None),
            Err(e) => {
                unaudited(&mut decision, &e);
                (decision, false, None)
            }
        }
    }

    /// Counts a final decision in the metrics under `purpose` (its [`Label`]), with the time
    /// since the call arrived.
    fn observe(&self, decision: &Decision, purpose: &str, started: Instant) {
        self.telemetry
            .record_decision(decision, purpose, started.elapsed());
    }
}

/// The purpose label of a call's metrics: the declared purpose only when the policy defines
/// it, so callers cannot make new series by sending new names.
fn label(purpose: &str, snapshot: Option<&Snapshot>) -> Label {
    if purpose.is_empty() {
        Label::None
    } else if snapshot.is_some_and(|p| p.purposes().id(purpose).is_some()) {
        Label::Declared
    } else {
        Label::Unknown
    }
}

impl Label {
    fn of(self, purpose: &str) -> &str {
        match self {
            Self::None => PURPOSE_NONE,
            Self::Unknown => PURPOSE_UNKNOWN,
            Self::Declared => purpose,
        }
    }
}

/// `decision` as it stands when its record cannot be written: an `AUDIT_UNAVAILABLE` deny.
fn unaudited(decision: &mut Decision, e: &AuditError) {
    tracing::error!(error = %e, decision = %decision.decision_id, allowed = decision.allowed, "audit record not written; answering AUDIT_UNAVAILABLE");
    decision.allowed = false;
    decision.reasons = vec![Reason::new(
        ReasonCode::AuditUnavailable,
        "§6(3)",
        format!("the decision cannot be audited ({e}); calls are refused until it can"),
    )];
}

impl Door {
    /// The RPC the call's span is named after (`rpc.method`).
    fn rpc(self, method: Option<&str>) -> &str {
        match self {
            Self::DataPlane => method.map_or("", |m| m.strip_prefix('/').unwrap_or(m)),
            Self::Envoy => "envoy.service.auth.v3.Authorization/Check",
            Self::Check => "pdgate.v1.AccessControl/Check",
            Self::BatchCheck => "pdgate.v1.AccessControl/BatchCheck",
        }
    }

    /// Whether the call's response passes through pdgate, which can clear fields of it
    /// (Envoy forwards it itself; a Check's caller is told what to leave out).
    fn clears_response_fields(self) -> bool {
        !matches!(self, Self::Envoy)
    }

    fn record_kind(self) -> RecordKind {
        match self {
            // Envoy forwards the call pdgate allows: it is an access like any other.
            Self::DataPlane | Self::Envoy => RecordKind::Access,
            Self::Check | Self::BatchCheck => RecordKind::Check,
        }
    }
}

impl Admission {
    pub fn allowed(&self) -> bool {
        self.decision.allowed
    }

    /// The decision id the answer carries: `None` when the decision has no record.
    pub fn decision_id(&self) -> Option<DecisionId> {
        self.recorded.then_some(self.decision.decision_id)
    }

    /// Whether the upstream must not see metadata `name` as the client sent it: pdgate's own
    /// (`x-pdgate-*`), and in mTLS and mesh modes `x-caller`, which names no one there.
    pub fn strips(&self, name: &str) -> bool {
        name.starts_with(PDGATE_PREFIX) || (self.mtls && name == CALLER)
    }

    /// The metadata pdgate sets on an allowed call for the upstream: the caller it
    /// authorized and the decision id.
    pub fn upstream_metadata(&self) -> Vec<(HeaderName, HeaderValue)> {
        let mut set = Vec::with_capacity(2);
        if let Ok(caller) = HeaderValue::from_str(&self.request.caller) {
            set.push((HeaderName::from_static(AUTHENTICATED_CALLER), caller));
        }
        if let Some(id) = self.decision_id()
            && let Ok(id) = HeaderValue::from_str(&id.to_string())
        {
            set.push((HeaderName::from_static(DECISION_ID), id));
        }
        set
    }

    /// Rewrites an allowed call's metadata for the upstream: what [`Admission::strips`]
    /// names goes, [`Admission::upstream_metadata`] is set, and with a span the upstream
    /// continues the trace as pdgate's child (without one, the caller's `traceparent` passes
    /// through untouched).
    pub fn stamp(&self, headers: &mut HeaderMap) {
        let stripped: Vec<HeaderName> = headers
            .keys()
            .filter(|name| self.strips(name.as_str()))
            .cloned()
            .collect();
        for name in stripped {
            headers.remove(name);
        }
        for (name, value) in self.upstream_metadata() {
            headers.insert(name, value);
        }
        if let Some(span) = &self.span {
            span.inject(headers);
        }
    }

    /// The call's span, for the door to end when the call ends (a stream's last message).
    pub fn take_span(&mut self) -> Option<CallSpan> {
        self.span.take()
    }

    /// Runs `forward` — the call to the upstream — while the record of an overlapped
    /// admission ([`Gate::admit_overlapped`]) is written, and gives its outcome only once the
    /// record is written. When the record cannot be written, the outcome is dropped unread
    /// (at once, cancelling the upstream call, if the write fails first): nothing of the
    /// upstream's answer reaches the caller, the decision becomes `AUDIT_UNAVAILABLE` with no
    /// decision id, and `None` is returned. With no record pending, this is `forward` itself.
    pub async fn hold<F: Future>(&mut self, gate: &Gate, forward: F) -> Option<F::Output> {
        let Some(Unsettled {
            receipt,
            label,
            started,
        }) = self.unsettled.take()
        else {
            return Some(forward.await);
        };
        let written = std::pin::pin!(receipt.written());
        let forward = std::pin::pin!(forward);
        let (written, outcome) = match select(written, forward).await {
            Either::Left((Ok(_), forward)) => (Ok(()), Some(forward.await)),
            Either::Left((Err(e), _)) => (Err(e), None),
            Either::Right((outcome, written)) => (written.await.map(|_| ()), Some(outcome)),
        };
        let outcome = match written {
            Ok(()) => outcome,
            Err(e) => {
                unaudited(&mut self.decision, &e);
                self.recorded = false;
                None
            }
        };
        gate.observe(&self.decision, label.of(&self.request.purpose), started);
        outcome
    }
}

/// Whether two lists name the same subjects (order and repeats aside).
fn same_subjects(a: &[String], b: &[String]) -> bool {
    fn set(v: &[String]) -> std::collections::BTreeSet<&str> {
        v.iter().map(String::as_str).collect()
    }
    set(a) == set(b)
}

/// The trace and parent span ids of a W3C `traceparent` header (`00-<trace>-<span>-<flags>`).
fn traceparent(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let mut parts = value.split('-');
    let (_version, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(trace, 32) && hex(span, 16)).then(|| (trace.to_owned(), span.to_owned()))
}

/// A call whose mesh identity is not believed is denied `CALLER_UNKNOWN`, whatever else stage
/// 1 found, with the mesh's reason as the detail the client reads and the record keeps.
fn refuse_mesh_peer(decision: &mut Decision, refusal: &MeshRefusal) {
    decision.allowed = false;
    decision.minimized.clear();
    let reason = Reason::new(
        ReasonCode::CallerUnknown,
        "§6(5)",
        format!("mesh identity refused: {refusal}"),
    );
    match decision
        .reasons
        .iter_mut()
        .find(|r| r.code == ReasonCode::CallerUnknown)
    {
        Some(existing) => *existing = reason,
        None => decision.reasons.insert(0, reason),
    }
}
