//! The one place where pdgate's outcomes become gRPC statuses: refusals (denials and
//! unreadable metadata), overload, an unreachable upstream, a passed deadline — for every
//! door alike, so that a refusal reads the same however it is asked for.

use crate::audit::AuditError;
use crate::decision::{Decision, DecisionId};
use crate::gate::metadata::{DECISION_ID, MetadataError};
use crate::gate::{Admission, CheckError, ReloadError};
use crate::identity::AdminRole;
use crate::registry::{InvalidChange, RegistryError};
use http::HeaderValue;
use std::collections::HashMap;
use tonic::body::Body;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

pub type Response = http::Response<Body>;

/// The answer to a call the gate refused: `INVALID_ARGUMENT` when its metadata could not be
/// read, else `PERMISSION_DENIED` (see [`refusal_status`]), with the decision id when the
/// decision is recorded.
pub fn refused(admission: &Admission) -> Response {
    let mut response = refusal_status(admission).into_http();
    if let Some(id) = admission.decision_id() {
        tag(&mut response, id);
    }
    response
}

/// The status of a refusal, for doors that answer in another shape than a gRPC response
/// (Envoy's `ext_authz`).
pub fn refusal_status(admission: &Admission) -> Status {
    match &admission.malformed {
        Some(
            error @ (MetadataError::MessageTooLarge { .. }
            | MetadataError::MessageExpandsTooLarge { .. }),
        ) => Status::resource_exhausted(error.to_string()),
        Some(
            error @ (MetadataError::MessageCompressed(_) | MetadataError::UnsupportedCodec(_)),
        ) => Status::unimplemented(error.to_string()),
        Some(error) => Status::invalid_argument(error.to_string()),
        None => denied_status(&admission.decision, admission.decision_id()),
    }
}

/// `PERMISSION_DENIED`, the reason codes and clauses in the message and, as a
/// `google.rpc.ErrorInfo` (reason = first code, domain `pdgate`), in `grpc-status-details-bin`;
/// the decision id there too when the decision is recorded (`id`).
fn denied_status(decision: &Decision, id: Option<DecisionId>) -> Status {
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
    if let Some(id) = id {
        metadata.insert("decision_id".to_owned(), id.to_string());
    }
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

/// `RESOURCE_EXHAUSTED`: too many calls in flight; the call was shed before any decision, so
/// the answer names none.
pub fn overloaded(limit: usize) -> Response {
    Status::resource_exhausted(format!(
        "pdgate is at its limit of {limit} concurrent calls; retry with backoff"
    ))
    .into_http()
}

/// `RESOURCE_EXHAUSTED`: the caller already holds its share of the call slots.
pub fn caller_overloaded(limit: usize) -> Response {
    Status::resource_exhausted(format!(
        "this caller has {limit} calls in flight, its share (`limits.max_calls_per_caller`); retry with backoff"
    ))
    .into_http()
}

/// `DEADLINE_EXCEEDED`: a call without a deadline whose upstream did not start its answer
/// within `limits.response_timeout_seconds`.
pub fn no_response(limit: std::time::Duration, id: DecisionId) -> Response {
    with_decision_id(
        Status::deadline_exceeded(format!(
            "the upstream did not answer within {}s (`limits.response_timeout_seconds`; the call set no deadline)",
            limit.as_secs()
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

/// `DEADLINE_EXCEEDED`: the caller's `grpc-timeout` passed before pdgate could answer (while it
/// admitted the call, or in a method of its API). No decision id: the call may not have one.
pub fn deadline_passed<B: Default>() -> http::Response<B> {
    Status::deadline_exceeded("deadline exceeded before pdgate could answer").into_http()
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

/// The `ErrorInfo` reason of an admin call refused for want of a role.
pub const ADMIN_ROLE_REQUIRED: &str = "ADMIN_ROLE_REQUIRED";
/// The `ErrorInfo` reasons of a refused policy change.
pub const POLICY_INVALID: &str = "POLICY_INVALID";
pub const POLICY_TESTS_FAILED: &str = "POLICY_TESTS_FAILED";
pub const POLICY_TESTS_MISSING: &str = "POLICY_TESTS_MISSING";
pub const POLICY_VERSION_UNKNOWN: &str = "POLICY_VERSION_UNKNOWN";
pub const POLICY_STORE_FAILED: &str = "POLICY_STORE_FAILED";

/// Why a method of pdgate's own API failed. Every service returns these; [`From`] below is
/// the one place they become statuses.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is wrong: which field, what is wrong, what is allowed.
    #[error("`{field}`: {message}")]
    InvalidField {
        field: &'static str,
        message: String,
    },
    /// The caller is not in `limits.check_callers`.
    #[error("{method} is open only to the callers in `limits.check_callers`; {who} is not one", who = who(.identity))]
    CallerNotAllowed {
        method: &'static str,
        identity: String,
    },
    /// The caller's identity does not hold a role the method needs.
    #[error("{method} needs the role {needed}; {who} does not hold it", needed = roles_text(.roles), who = who(.identity))]
    RoleRequired {
        method: &'static str,
        identity: String,
        roles: Vec<AdminRole>,
    },
    /// The action's audit record could not be written, so the action was not carried out.
    #[error("the action cannot be audited ({0}); it was not carried out")]
    NotAudited(#[source] AuditError),
    /// This sidecar decides on in-memory subjects: there is no registry to change.
    #[error(
        "this sidecar has no subject registry (in-memory subjects): start it with `pdgate serve`"
    )]
    NoRegistry,
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A policy change refused, or a version that cannot be found or kept.
    #[error(transparent)]
    Reload(#[from] ReloadError),
    #[error("the audit log cannot be read: {0}")]
    AuditRead(#[source] AuditError),
    /// A blocking task of the method (a query, a verify) did not finish.
    #[error("{what} did not finish: {source}")]
    Interrupted {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

fn roles_text(roles: &[AdminRole]) -> String {
    roles
        .iter()
        .map(|r| format!("`{r}`"))
        .collect::<Vec<_>>()
        .join(" or ")
}

fn who(identity: &str) -> String {
    if identity.is_empty() {
        "a caller with no identity".to_owned()
    } else {
        format!("`{identity}`")
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match &e {
            ApiError::InvalidField { field, message } => Status::with_error_details(
                Code::InvalidArgument,
                e.to_string(),
                ErrorDetails::with_bad_request_violation(*field, message.clone()),
            ),
            ApiError::CallerNotAllowed { .. } => Status::permission_denied(e.to_string()),
            ApiError::RoleRequired {
                identity, roles, ..
            } => {
                let mut details = HashMap::new();
                details.insert(
                    "required_roles".to_owned(),
                    roles
                        .iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                );
                details.insert("identity".to_owned(), identity.clone());
                Status::with_error_details(
                    Code::PermissionDenied,
                    e.to_string(),
                    ErrorDetails::with_error_info(ADMIN_ROLE_REQUIRED, "pdgate", details),
                )
            }
            ApiError::NotAudited(_) => Status::unavailable(e.to_string()),
            ApiError::NoRegistry => Status::failed_precondition(e.to_string()),
            ApiError::Registry(RegistryError::Invalid(invalid)) => invalid_change(invalid),
            ApiError::Registry(RegistryError::InvalidUrl(_)) => {
                Status::invalid_argument(e.to_string())
            }
            // A store that cannot be reached: retry. A record this version cannot read: ours.
            ApiError::Registry(RegistryError::Open { .. } | RegistryError::Unavailable { .. }) => {
                Status::unavailable(e.to_string())
            }
            ApiError::Registry(RegistryError::Migrate { .. } | RegistryError::Corrupt { .. }) => {
                Status::internal(e.to_string())
            }
            ApiError::Reload(reload) => reload_status(reload),
            ApiError::AuditRead(_) | ApiError::Interrupted { .. } => {
                Status::internal(e.to_string())
            }
        }
    }
}

impl From<InvalidChange> for ApiError {
    fn from(e: InvalidChange) -> Self {
        Self::Registry(RegistryError::Invalid(e))
    }
}

/// `INVALID_ARGUMENT` naming every field at fault, with a `BadRequest` detail per field.
fn invalid_change(e: &InvalidChange) -> Status {
    let violations = e
        .problems
        .iter()
        .map(|p| FieldViolation::new(p.field, p.message.clone()))
        .collect::<Vec<_>>();
    Status::with_error_details(
        Code::InvalidArgument,
        e.to_string(),
        ErrorDetails::with_bad_request(violations),
    )
}

/// The `ErrorInfo` reason of a refused policy change.
pub fn reload_reason(e: &ReloadError) -> &'static str {
    match e {
        ReloadError::Check(CheckError::TestsFailed { .. }) => POLICY_TESTS_FAILED,
        ReloadError::Check(CheckError::NoTests) => POLICY_TESTS_MISSING,
        ReloadError::Check(_) => POLICY_INVALID,
        ReloadError::Store(_) => POLICY_STORE_FAILED,
        ReloadError::UnknownVersion(_)
        | ReloadError::AmbiguousVersion(_)
        | ReloadError::BadVersion(_) => POLICY_VERSION_UNKNOWN,
    }
}

/// A rejected candidate is `FAILED_PRECONDITION` with every problem as a field violation
/// (`field` = `file:line`); an unknown version `NOT_FOUND`; a malformed one
/// `INVALID_ARGUMENT`; a store that cannot keep the policy `UNAVAILABLE` (the running policy
/// stays in every case).
fn reload_status(e: &ReloadError) -> Status {
    let code = match e {
        ReloadError::Check(_) => Code::FailedPrecondition,
        ReloadError::UnknownVersion(_) => Code::NotFound,
        ReloadError::AmbiguousVersion(_) | ReloadError::BadVersion(_) => Code::InvalidArgument,
        ReloadError::Store(_) => Code::Unavailable,
    };
    let mut details = ErrorDetails::with_error_info(reload_reason(e), "pdgate", HashMap::new());
    if let ReloadError::Check(check) = e {
        details.set_bad_request(
            check
                .problems()
                .into_iter()
                .map(|p| FieldViolation::new(p.location(), p.message))
                .collect::<Vec<_>>(),
        );
    }
    let message = match e {
        ReloadError::Check(_) => format!("{e}\nthe running policy is unchanged"),
        _ => e.to_string(),
    };
    Status::with_error_details(code, message, details)
}
