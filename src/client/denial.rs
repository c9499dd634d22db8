//! pdgate's refusals read back by the client: the `google.rpc.ErrorInfo` (domain `pdgate`)
//! that `transport::rescue` puts in `grpc-status-details-bin`.

use crate::decision::ReasonCode;
use crate::gate::metadata::DECISION_ID;
use tonic::metadata::MetadataMap;
use tonic_types::StatusExt;

/// The `ErrorInfo` domain of pdgate's refusals.
const DOMAIN: &str = "pdgate";

/// One reason of a refusal: a code of pdgate's vocabulary (docs/reference/reason-codes.md),
/// or a code this build does not know (a newer pdgate, or an admin refusal such as
/// `ADMIN_ROLE_REQUIRED`), kept as it was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenialReason {
    Known(ReasonCode),
    Other(String),
}

impl DenialReason {
    fn parse(code: &str) -> Self {
        ReasonCode::parse(code).map_or_else(|| Self::Other(code.to_owned()), Self::Known)
    }

    /// The code as pdgate sent it (`CONSENT_REQUIRED`).
    pub fn as_str(&self) -> &str {
        match self {
            Self::Known(code) => code.as_str(),
            Self::Other(code) => code,
        }
    }
}

/// Why pdgate refused a call, read from the status it answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Every reason, in the order pdgate's stages found them; never empty.
    pub reasons: Vec<DenialReason>,
    /// The clause of the privacy policy behind each reason, in the same order.
    pub clauses: Vec<String>,
    /// The audit record's id; absent when the decision could not be recorded
    /// (`AUDIT_UNAVAILABLE`) or for refusals that are not decisions.
    pub decision_id: Option<String>,
    /// The policy version that decided.
    pub policy_version: Option<String>,
}

impl Denial {
    /// The refusal carried by `status`, when it is one of pdgate's (an `ErrorInfo` of domain
    /// `pdgate`); `None` for any other error (the service's own, `UNAVAILABLE`, malformed
    /// metadata refused `INVALID_ARGUMENT`).
    pub fn from_status(status: &tonic::Status) -> Option<Self> {
        let details = status.get_error_details();
        let info = details.error_info().filter(|i| i.domain == DOMAIN)?;
        let list = |key: &str| -> Vec<String> {
            info.metadata
                .get(key)
                .map(|v| {
                    v.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut reasons: Vec<DenialReason> = list("reasons")
            .iter()
            .map(|c| DenialReason::parse(c))
            .collect();
        if reasons.is_empty() {
            // Admin refusals name their one reason only in `ErrorInfo.reason`.
            reasons.push(DenialReason::parse(&info.reason));
        }
        Some(Self {
            reasons,
            clauses: list("clauses"),
            decision_id: info.metadata.get("decision_id").cloned(),
            policy_version: info.metadata.get("policy_version").cloned(),
        })
    }

    /// Whether `code` is among the reasons.
    pub fn has(&self, code: ReasonCode) -> bool {
        self.reasons.contains(&DenialReason::Known(code))
    }

    /// The first reason: what pdgate's stages found first (`ErrorInfo.reason`).
    pub fn first(&self) -> Option<&DenialReason> {
        self.reasons.first()
    }
}

/// The decision id pdgate put on a response (`x-pdgate-decision-id`): on every answer of a
/// decided call, allowed or not, from the response's headers or the status's metadata.
pub fn decision_id(metadata: &MetadataMap) -> Option<&str> {
    metadata.get(DECISION_ID).and_then(|v| v.to_str().ok())
}
