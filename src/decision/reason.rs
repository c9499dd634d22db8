//! Reason codes: the stable, public vocabulary of why a call was denied.

use serde::{Serialize, Serializer};
use std::fmt;
use std::sync::Arc;

/// Why a request was denied. The names are a public interface (tests, dashboards and the
/// callers' error handling match on them): add codes, never rename them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReasonCode {
    // Stage 1: the request is well-formed and its names are known.
    PurposeNotDeclared,
    PurposeUnknown,
    CategoryNotDeclared,
    CategoryUnknown,
    ActionUnknown,
    CallerUnknown,
    RecipientUnknown,
    PurposeNotRegistered,
    RecipientNotAllowed,
    // Stage 2: casbin grants.
    NoGrant,
    DeniedByRule,
    // Stage 3: secrecy of communications (§5).
    SecrecyOfCommunications,
    // Stage 4: de-identification (§1(3), §4).
    IdentifiedDataForResearch,
    // Stage 5: the data subject's state (§1(2), §7).
    SubjectRequired,
    ConsentRequired,
    UseSuspended,
    ProvisionSuspended,
    DeletionRequested,
    SubjectStateUnavailable,
    // Anything the engine could not evaluate.
    PolicyUnavailable,
    // The sidecar: the gRPC method has no route in routes.yaml.
    RouteUnknown,
    // The call's metadata cannot be read as intended (answered `INVALID_ARGUMENT`).
    MetadataInvalid,
    // The `x-data-subject` metadata names other subjects than the request message does.
    SubjectMismatch,
    // The route's messages must be read (subjects, minimization) and this door cannot read
    // or rewrite them (Envoy `ext_authz`).
    MessageInspectionRequired,
    // The decision's audit record could not be written: an allow becomes this deny.
    AuditUnavailable,
}

impl ReasonCode {
    pub const ALL: [ReasonCode; 25] = [
        Self::PurposeNotDeclared,
        Self::PurposeUnknown,
        Self::CategoryNotDeclared,
        Self::CategoryUnknown,
        Self::ActionUnknown,
        Self::CallerUnknown,
        Self::RecipientUnknown,
        Self::PurposeNotRegistered,
        Self::RecipientNotAllowed,
        Self::NoGrant,
        Self::DeniedByRule,
        Self::SecrecyOfCommunications,
        Self::IdentifiedDataForResearch,
        Self::SubjectRequired,
        Self::ConsentRequired,
        Self::UseSuspended,
        Self::ProvisionSuspended,
        Self::DeletionRequested,
        Self::SubjectStateUnavailable,
        Self::PolicyUnavailable,
        Self::RouteUnknown,
        Self::MetadataInvalid,
        Self::SubjectMismatch,
        Self::MessageInspectionRequired,
        Self::AuditUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PurposeNotDeclared => "PURPOSE_NOT_DECLARED",
            Self::PurposeUnknown => "PURPOSE_UNKNOWN",
            Self::CategoryNotDeclared => "CATEGORY_NOT_DECLARED",
            Self::CategoryUnknown => "CATEGORY_UNKNOWN",
            Self::ActionUnknown => "ACTION_UNKNOWN",
            Self::CallerUnknown => "CALLER_UNKNOWN",
            Self::RecipientUnknown => "RECIPIENT_UNKNOWN",
            Self::PurposeNotRegistered => "PURPOSE_NOT_REGISTERED",
            Self::RecipientNotAllowed => "RECIPIENT_NOT_ALLOWED",
            Self::NoGrant => "NO_GRANT",
            Self::DeniedByRule => "DENIED_BY_RULE",
            Self::SecrecyOfCommunications => "SECRECY_OF_COMMUNICATIONS",
            Self::IdentifiedDataForResearch => "IDENTIFIED_DATA_FOR_RESEARCH",
            Self::SubjectRequired => "SUBJECT_REQUIRED",
            Self::ConsentRequired => "CONSENT_REQUIRED",
            Self::UseSuspended => "USE_SUSPENDED",
            Self::ProvisionSuspended => "PROVISION_SUSPENDED",
            Self::DeletionRequested => "DELETION_REQUESTED",
            Self::SubjectStateUnavailable => "SUBJECT_STATE_UNAVAILABLE",
            Self::PolicyUnavailable => "POLICY_UNAVAILABLE",
            Self::RouteUnknown => "ROUTE_UNKNOWN",
            Self::MetadataInvalid => "METADATA_INVALID",
            Self::SubjectMismatch => "SUBJECT_MISMATCH",
            Self::MessageInspectionRequired => "MESSAGE_INSPECTION_REQUIRED",
            Self::AuditUnavailable => "AUDIT_UNAVAILABLE",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ReasonCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One reason of a decision: the code, the clause of the privacy policy behind it, and a
/// sentence for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    pub code: ReasonCode,
    pub clause: Arc<str>,
    pub detail: Arc<str>,
}

impl Reason {
    pub fn new(code: ReasonCode, clause: impl Into<Arc<str>>, detail: impl Into<Arc<str>>) -> Self {
        Self {
            code,
            clause: clause.into(),
            detail: detail.into(),
        }
    }
}
