//! The one place where the data plane's outcomes become gRPC statuses: denials, malformed
//! metadata, overload and an unreachable upstream.

use super::context::DECISION_ID;
use crate::decision::{Decision, DecisionId};
use http::HeaderValue;
use std::collections::HashMap;
use tonic::body::Body;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub type Response = http::Response<Body>;

/// `PERMISSION_DENIED`, the reason codes and clauses in the message and, as a
/// `google.rpc.ErrorInfo` (reason = first code, domain `pdgate`), in `grpc-status-details-bin`.
pub fn denied(decision: &Decision) -> Response {
    with_decision_id(denied_status(decision), decision.decision_id)
}

/// The status of a denial, for callers that answer in another shape than a gRPC response
/// (the Envoy ext_authz server), so that a denial reads the same however it is asked for.
pub fn denied_status(decision: &Decision) -> Status {
    let reasons: Vec<String> = decision
        .reasons
        .iter()
        .map(|r| format!("{} {}: {}", r.code, r.clause, r.detail))
        .collect();
    let message = format!("denied by pdgate: {}", reasons.join("; "));
    let mut metadata = HashMap::new();
    metadata.insert(
        "reasons".to_owned(),
        decision
            .reasons
            .iter()
            .map(|r| r.code.as_str())
            .collect::<Vec<_>>()
            .join(","),
    );
    metadata.insert(
        "clauses".to_owned(),
        decision
            .reasons
            .iter()
            .map(|r| r.clause.to_string())
            .collect::<Vec<_>>()
            .join(","),
    );
    metadata.insert("decision_id".to_owned(), decision.decision_id.to_string());
    if let Some(v) = decision.policy_version {
        metadata.insert("policy_version".to_owned(), v.to_string());
    }
    let first = decision
        .reasons
        .first()
        .map_or("DENIED", |r| r.code.as_str());
    Status::with_error_details(
        Code::PermissionDenied,
        message,
        ErrorDetails::with_error_info(first, "pdgate", metadata),
    )
}

/// `INVALID_ARGUMENT`: the call's metadata cannot be read as intended.
pub fn invalid_argument(error: &impl std::fmt::Display, id: DecisionId) -> Response {
    with_decision_id(invalid_argument_status(error), id)
}

/// The status of malformed metadata, for the Envoy ext_authz server (see [`denied_status`]).
pub fn invalid_argument_status(error: &impl std::fmt::Display) -> Status {
    Status::invalid_argument(error.to_string())
}

/// `RESOURCE_EXHAUSTED`: too many calls in flight; the call was shed before any decision.
pub fn overloaded(limit: usize, id: DecisionId) -> Response {
    with_decision_id(
        Status::resource_exhausted(format!(
            "pdgate is at its limit of {limit} concurrent calls; retry with backoff"
        )),
        id,
    )
}

/// `UNAVAILABLE`: the call was allowed but the upstream could not be reached.
pub fn upstream_unavailable(error: &dyn std::fmt::Display, id: DecisionId) -> Response {
    with_decision_id(
        Status::unavailable(format!("upstream unavailable: {error}")),
        id,
    )
}

/// `DEADLINE_EXCEEDED`: the caller's `grpc-timeout` passed before the upstream answered.
pub fn deadline_exceeded(id: DecisionId) -> Response {
    with_decision_id(
        Status::deadline_exceeded("deadline exceeded before the upstream answered"),
        id,
    )
}

/// Adds the decision id header to any response.
pub fn tag(response: &mut Response, id: DecisionId) {
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert(DECISION_ID, v);
    }
}

fn with_decision_id(status: Status, id: DecisionId) -> Response {
    let mut response = status.into_http();
    tag(&mut response, id);
    response
}
