//! `pdgate.v1.SubjectRights`: the data subject's consent and requests (§7), on the API port,
//! for the `privacy-office` role.
//!
//! Each call is authorized ([`admin::authorize`]), its input validated (`INVALID_ARGUMENT`
//! naming the field, with a `BadRequest` detail per field), then audited (kind `admin`) before
//! it takes effect — reads too: reading a subject's state or history is an access to it. The
//! actor recorded in the subject's history is the verified identity of the caller, never a
//! field of the request; `source` is the request's.
//!
//! A change is applied through the sidecar's subject cache, so this sidecar's next call
//! honours it; the other sidecars of a fleet hear of it by NOTIFY, and a sidecar on the same
//! SQLite file by its poll.
//!
//! A consent to a purpose the active policy does not define is refused (`INVALID_ARGUMENT`,
//! field `purpose`): it could never match a call and is almost always a typo. A withdrawal is
//! not checked, so that a consent recorded under an older policy can still be withdrawn. With
//! no policy loaded, nothing can be checked and the consent is recorded.

use super::admin::{self, Admin};
use crate::gate::Gate;
use crate::identity::AdminRole;
use crate::proto::v1::subject_rights_server::{SubjectRights, SubjectRightsServer};
use crate::proto::v1::{
    ConsentRequest, GetSubjectRequest, SubjectChangeRequest, SubjectEvent, SubjectHistoryResponse,
    SubjectStateResponse,
};
use crate::registry::{
    Action, Change, InvalidChange, SubjectCache, SubjectRecord, validate_subject,
};
use crate::transport::rescue::ApiError;
use std::sync::Arc;
use std::time::UNIX_EPOCH;
use tonic::{Request, Response, Status};

const SET_CONSENT: &str = "/pdgate.v1.SubjectRights/SetConsent";
const WITHDRAW_CONSENT: &str = "/pdgate.v1.SubjectRights/WithdrawConsent";
const SUSPEND_USE: &str = "/pdgate.v1.SubjectRights/SuspendUse";
const RESUME_USE: &str = "/pdgate.v1.SubjectRights/ResumeUse";
const SUSPEND_PROVISION: &str = "/pdgate.v1.SubjectRights/SuspendProvision";
const RESUME_PROVISION: &str = "/pdgate.v1.SubjectRights/ResumeProvision";
const REQUEST_DELETION: &str = "/pdgate.v1.SubjectRights/RequestDeletion";
const GET: &str = "/pdgate.v1.SubjectRights/Get";
const HISTORY: &str = "/pdgate.v1.SubjectRights/History";

pub struct SubjectRightsService {
    gate: Arc<Gate>,
}

impl SubjectRightsService {
    pub fn new(gate: Arc<Gate>) -> Self {
        Self { gate }
    }

    pub fn into_server(self) -> SubjectRightsServer<Self> {
        SubjectRightsServer::new(self)
    }

    /// The registry, or `FAILED_PRECONDITION` when this sidecar runs on in-memory subjects
    /// (tests, the demo): there is nothing to change.
    fn cache(&self) -> Result<&Arc<SubjectCache>, ApiError> {
        self.gate.subjects().registry().ok_or(ApiError::NoRegistry)
    }

    /// Validates, audits, applies one change; answers the state it produced.
    async fn change<T>(
        &self,
        request: Request<T>,
        method: &'static str,
        read: impl FnOnce(T) -> (String, Action, String),
    ) -> Result<Response<SubjectStateResponse>, Status> {
        let admin =
            admin::authorize(&self.gate, &request, method, AdminRole::PrivacyOffice).await?;
        let cache = self.cache()?;
        let (subject, action, source) = read(request.into_inner());
        let change = Change {
            subject,
            action,
            actor: admin.identity.clone(),
            source: (!source.is_empty()).then_some(source),
        };
        change.validate().map_err(ApiError::from)?;
        if let Action::Consent { purpose, .. } = &change.action {
            self.check_purpose(purpose)?;
        }
        record(&admin, &self.gate, &change).await?;
        let record = cache.apply(&change).await.map_err(ApiError::from)?;
        tracing::info!(subject = %change.subject, change = change.action.name(), actor = %change.actor, version = record.version, "subject change recorded");
        Ok(Response::new(state_response(
            &change.subject,
            Some(&record),
        )))
    }

    /// A consent must name a purpose of the active policy (when one is loaded).
    fn check_purpose(&self, purpose: &str) -> Result<(), ApiError> {
        if self.gate.decider().policy().is_none() || self.gate.decider().knows_purpose(purpose) {
            return Ok(());
        }
        Err(InvalidChange {
            problems: vec![crate::registry::Problem {
                field: "purpose",
                message: format!(
                    "`{purpose}` is not a purpose of the active policy (taxonomy.toml); a consent to it could never match a call"
                ),
            }],
        }
        .into())
    }

    /// Authorizes, validates and audits a read of `subject`.
    async fn read_access<T>(
        &self,
        request: &Request<T>,
        method: &'static str,
        subject: &str,
    ) -> Result<(), ApiError> {
        let admin = admin::authorize(&self.gate, request, method, AdminRole::PrivacyOffice).await?;
        validate_subject(subject)?;
        admin
            .record(&self.gate, |b| {
                b.subjects = vec![subject.to_owned()];
                b.detail = Some(format!(
                    "read the {} of `{subject}`",
                    if method == HISTORY {
                        "history"
                    } else {
                        "state"
                    }
                ));
            })
            .await
    }
}

/// The audit record of a change, written before it is applied.
async fn record(admin: &Admin, gate: &Gate, change: &Change) -> Result<(), ApiError> {
    let source = change
        .source
        .as_deref()
        .map_or_else(String::new, |s| format!(", source {s}"));
    let what = match &change.action {
        Action::Consent {
            purpose,
            communications,
        }
        | Action::Withdraw {
            purpose,
            communications,
        } => format!(
            "{} {purpose} (communications: {communications})",
            change.action.name()
        ),
        other => other.name().to_owned(),
    };
    admin
        .record(gate, |b| {
            b.subjects = vec![change.subject.clone()];
            if let Some((purpose, _)) = change.action.purpose() {
                purpose.clone_into(&mut b.purpose);
            }
            b.detail = Some(format!("{what}{source}"));
        })
        .await
}

fn state_response(subject: &str, record: Option<&SubjectRecord>) -> SubjectStateResponse {
    let none = SubjectRecord::default();
    let r = record.unwrap_or(&none);
    SubjectStateResponse {
        subject: subject.to_owned(),
        consent: r.state.consent.iter().cloned().collect(),
        comms_consent: r.state.comms_consent.iter().cloned().collect(),
        use_suspended: r.state.use_suspended,
        provision_suspended: r.state.provision_suspended,
        deletion_requested: r.state.deletion_requested,
        version: r.version,
    }
}

#[tonic::async_trait]
impl SubjectRights for SubjectRightsService {
    async fn set_consent(
        &self,
        request: Request<ConsentRequest>,
    ) -> Result<Response<SubjectStateResponse>, Status> {
        self.change(request, SET_CONSENT, |r| {
            let action = Action::Consent {
                purpose: r.purpose,
                communications: r.communications,
            };
            (r.subject, action, r.source)
        })
        .await
    }

    async fn withdraw_consent(
        &self,
        request: Request<ConsentRequest>,
    ) -> Result<Response<SubjectStateResponse>, Status> {
        self.change(request, WITHDRAW_CONSENT, |r| {
            let action = Action::Withdraw {
                purpose: r.purpose,
                communications: r.communications,
            };
            (r.subject, action, r.source)
        })
        .await
    }

    async fn suspend_use(
        &self,
        request: Request<SubjectChangeRequest>,
    ) -> Result<Response<SubjectStateResponse>, Status> {
        self.change(request, SUSPEND_USE, |r| {
            (r.subject, Action::SuspendUse, r.source)
        })
        .await
    }

    async fn resume_use(
        &self,
        request: Request<SubjectChangeRequest>,
    ) -> Result<Response<SubjectStateResponse>, Status> {
        self.change(request, RESUME_USE, |r| {
            (r.subject, Action::ResumeUse, r.source)
        })
        .await
    }

    async fn suspend_provision(
        &self,
        request: Request<SubjectChangeRequest>,
    ) -> Result<Response<SubjectStateResponse>, Status> {
        self.change(request, SUSPEND_PROVISION, |r| {
            (r.subject, Action::SuspendProvision, r.source)
        })
        .await
    }

    async fn resume_provision(
        &self,
        request: Request<SubjectChangeRequest>,
    ) -> Result<Response<SubjectStateResponse>, Status> {
        self.change(request, RESUME_PROVISION, |r| {
            (r.subject, Action::ResumeProvision, r.source)
        })
        .await
    }

    async fn request_deletion(
        &self,
        request: Request<SubjectChangeRequest>,
    ) -> Result<Response<SubjectStateResponse>, Status> {
        self.change(request, REQUEST_DELETION, |r| {
            (r.subject, Action::RequestDeletion, r.source)
        })
        .await
    }

    async fn get(
        &self,
        request: Request<GetSubjectRequest>,
    ) -> Result<Response<SubjectStateResponse>, Status> {
        let subject = request.get_ref().subject.clone();
        self.read_access(&request, GET, &subject).await?;
        let record = self.cache()?.get(&subject).await.map_err(ApiError::from)?;
        Ok(Response::new(state_response(&subject, record.as_ref())))
    }

    async fn history(
        &self,
        request: Request<GetSubjectRequest>,
    ) -> Result<Response<SubjectHistoryResponse>, Status> {
        let subject = request.get_ref().subject.clone();
        self.read_access(&request, HISTORY, &subject).await?;
        let events = self
            .cache()?
            .history(&subject)
            .await
            .map_err(ApiError::from)?;
        let events = events
            .into_iter()
            .map(|e| {
                let (purpose, communications) = e.action.purpose().unzip();
                SubjectEvent {
                    version: e.version,
                    at_us: e
                        .at
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                    actor: e.actor,
                    source: e.source.unwrap_or_default(),
                    change: e.action.name().to_owned(),
                    purpose: purpose.map(str::to_owned).unwrap_or_default(),
                    communications: communications.unwrap_or(false),
                }
            })
            .collect();
        Ok(Response::new(SubjectHistoryResponse { subject, events }))
    }
}
