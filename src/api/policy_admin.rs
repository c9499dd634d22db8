//! `pdgate.v1.PolicyAdmin`: the security team's policy lifecycle on the API port — validate,
//! apply, roll back, status, explain, shadow. The work is the [`PolicyManager`]'s; this file
//! checks roles, audits and turns outcomes into gRPC answers (its errors become statuses in
//! [`crate::transport::rescue`]).
//!
//! Roles (see `api::admin`): `policy-admin` for every method; `operator` for Status and
//! Explain. Status is also open to `policy-admin`: it is read-only, and after a push the
//! policy admin needs it (last error, history to roll back to).
//!
//! Every call is audited as an admin action (kind `admin`, the actor in `caller`). An action
//! that changes something is audited after its candidate was checked and *before* it takes
//! effect: when the record cannot be written nothing changes (`UNAVAILABLE`). A rejected
//! candidate is audited as a `deny` with its reason code.

use super::admin::{self, Admin};
use crate::audit::RecordReason;
use crate::decision::{Request, StageReport};
use crate::gate::{
    Bundle, CheckError, Gate, Origin, Persisted, PolicyManager, ReloadError, TestFile, VersionInfo,
};
use crate::identity::AdminRole;
use crate::policy::{DescriptorFile, PolicySource};
use crate::proto::v1::policy_admin_server::{PolicyAdmin, PolicyAdminServer};
use crate::proto::v1::{
    ApplyRequest, ApplyResponse, ClearShadowRequest, ClearShadowResponse, ExplainRequest,
    ExplainResponse, PolicyBundle, PolicyProblem, PolicyVersionInfo, RollbackRequest, StageOutcome,
    StatusRequest, StatusResponse, ValidateRequest, ValidateResponse,
};
use crate::subjects::{InMemorySubjects, SubjectState};
use crate::transport::rescue::{self, ApiError};
use std::sync::Arc;
use tonic::{Request as GrpcRequest, Response, Status};

const VALIDATE: &str = "/pdgate.v1.PolicyAdmin/Validate";
const APPLY: &str = "/pdgate.v1.PolicyAdmin/Apply";
const ROLLBACK: &str = "/pdgate.v1.PolicyAdmin/Rollback";
const STATUS: &str = "/pdgate.v1.PolicyAdmin/Status";
const EXPLAIN: &str = "/pdgate.v1.PolicyAdmin/Explain";
const SET_SHADOW: &str = "/pdgate.v1.PolicyAdmin/SetShadow";
const CLEAR_SHADOW: &str = "/pdgate.v1.PolicyAdmin/ClearShadow";

/// Reason codes of a rejected candidate (`google.rpc.ErrorInfo.reason` and the audit record).
pub use crate::transport::rescue::{
    POLICY_INVALID, POLICY_STORE_FAILED, POLICY_TESTS_FAILED, POLICY_VERSION_UNKNOWN,
};

pub struct PolicyAdminService {
    gate: Arc<Gate>,
}

impl PolicyAdminService {
    pub fn new(gate: Arc<Gate>) -> Self {
        Self { gate }
    }

    pub fn into_server(self) -> PolicyAdminServer<Self> {
        PolicyAdminServer::new(self)
    }

    fn manager(&self) -> &PolicyManager {
        self.gate.policies()
    }

    /// Audits a rejected change (`deny`, with its reason code); the rejection is answered
    /// whether or not the record could be written.
    async fn audit_rejected(&self, admin: &Admin, error: &ReloadError, version: Option<String>) {
        let code = rescue::reload_reason(error);
        let detail = format!("rejected: {error}");
        let _ = admin
            .record(&self.gate, |body| {
                body.decision = "deny".into();
                body.reasons = vec![RecordReason {
                    code: code.into(),
                    clause: String::new(),
                }];
                if version.is_some() {
                    body.policy_version = version;
                }
                body.detail = Some(detail);
            })
            .await;
    }

    /// The shared path of Apply and Rollback: check (lock held), audit, keep and swap.
    async fn change(
        &self,
        admin: Admin,
        bundle: Bundle,
        comment: String,
        what: &str,
    ) -> Result<Response<ApplyResponse>, Status> {
        let version = bundle.version();
        let staged = match self.manager().stage(bundle).await {
            Ok(staged) => staged,
            Err(e) => {
                self.audit_rejected(&admin, &e, Some(version.to_string()))
                    .await;
                return Err(ApiError::from(e).into());
            }
        };
        let previous = staged.previous();
        let tests = staged.cases();
        let detail = format!(
            "{what} version {version} (was {}); {tests} policy test cases passed; comment: {comment}",
            previous.map_or_else(|| "none".to_owned(), |v| v.to_string()),
        );
        admin
            .record(&self.gate, |body| {
                body.policy_version = Some(version.to_string());
                body.detail = Some(detail);
            })
            .await?;
        let applied = staged
            .commit(Origin::Admin(admin.identity.clone()), &comment)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ApplyResponse {
            version: applied.version.to_string(),
            previous_version: applied.previous.map(|v| v.to_string()).unwrap_or_default(),
            changed: applied.changed,
            not_persisted: match applied.persisted {
                Persisted::Yes => String::new(),
                Persisted::No(why) => why,
            },
            tests_run: u32::try_from(tests).unwrap_or(u32::MAX),
        }))
    }
}

#[tonic::async_trait]
impl PolicyAdmin for PolicyAdminService {
    async fn validate(
        &self,
        request: GrpcRequest<ValidateRequest>,
    ) -> Result<Response<ValidateResponse>, Status> {
        let admin =
            admin::authorize(&self.gate, &request, VALIDATE, AdminRole::PolicyAdmin).await?;
        let bundle = bundle_of(request.into_inner().bundle)?;
        let version = bundle.version();
        let response = match self.manager().validate(&bundle).await {
            Ok(checked) => ValidateResponse {
                valid: true,
                version: version.to_string(),
                problems: Vec::new(),
                rules: count(checked.snapshot.rule_count()),
                routes: count(checked.snapshot.route_count()),
                tests_run: count(checked.cases),
                tests_failed: 0,
            },
            Err(e) => {
                let (tests_run, tests_failed) = match &e {
                    CheckError::TestsFailed { failures, cases } => {
                        (count(*cases), count(failures.len()))
                    }
                    _ => (0, 0),
                };
                ValidateResponse {
                    valid: false,
                    // The version is only meaningful for a policy that compiles.
                    version: if matches!(e, CheckError::Invalid(_)) {
                        String::new()
                    } else {
                        version.to_string()
                    },
                    problems: problems_of(&e),
                    rules: 0,
                    routes: 0,
                    tests_run,
                    tests_failed,
                }
            }
        };
        let detail = if response.valid {
            format!(
                "validate version {version}: valid, {} test cases passed",
                response.tests_run
            )
        } else {
            format!(
                "validate version {version}: invalid, {} problems",
                response.problems.len()
            )
        };
        admin
            .record(&self.gate, |body| {
                body.policy_version = Some(version.to_string());
                body.detail = Some(detail);
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn apply(
        &self,
        request: GrpcRequest<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let admin = admin::authorize(&self.gate, &request, APPLY, AdminRole::PolicyAdmin).await?;
        let message = request.into_inner();
        let bundle = bundle_of(message.bundle)?;
        self.change(admin, bundle, message.comment, "apply").await
    }

    async fn rollback(
        &self,
        request: GrpcRequest<RollbackRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let admin =
            admin::authorize(&self.gate, &request, ROLLBACK, AdminRole::PolicyAdmin).await?;
        let message = request.into_inner();
        let bundle = match self.manager().find(&message.version) {
            Ok(bundle) => bundle,
            Err(e) => {
                self.audit_rejected(&admin, &e, None).await;
                return Err(ApiError::from(e).into());
            }
        };
        self.change(admin, bundle, message.comment, "roll back to")
            .await
    }

    async fn status(
        &self,
        request: GrpcRequest<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let admin = admin::authorize_any(
            &self.gate,
            &request,
            STATUS,
            &[AdminRole::Operator, AdminRole::PolicyAdmin],
        )
        .await?;
        let status = self.manager().status();
        admin
            .record(&self.gate, |body| {
                body.detail = Some("status".into());
            })
            .await?;
        let (last_error, last_error_at_us) = status.last_error.unwrap_or_default();
        Ok(Response::new(StatusResponse {
            active: status.active.as_ref().map(info_message),
            last_error,
            last_error_at_us,
            history: status.history.iter().map(info_message).collect(),
            shadow: status.shadow.as_ref().map(info_message),
            shadow_differences: status.shadow_differences,
            store: status.store.to_owned(),
        }))
    }

    async fn explain(
        &self,
        request: GrpcRequest<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        let admin = admin::authorize_any(
            &self.gate,
            &request,
            EXPLAIN,
            &[AdminRole::PolicyAdmin, AdminRole::Operator],
        )
        .await?;
        let message = request.into_inner();
        let Some(check) = message.request else {
            return Err(ApiError::InvalidField {
                field: "request",
                message: "required: the CheckRequest to explain".into(),
            }
            .into());
        };
        let request = Request::from(check);
        let explanation = if message.subjects.is_empty() {
            // The registry, as a call would read it (loading what the cache does not hold).
            if let Some(cache) = self.gate.subjects().registry() {
                cache.load(&request.subjects).await;
            }
            self.gate
                .decider()
                .explain(&request, self.gate.subjects().states())
        } else {
            let inline = inline_subjects(&message.subjects)?;
            self.gate.decider().explain(&request, &inline)
        };
        let decision = &explanation.decision;
        let detail = format!(
            "explain: `{}` {} {} for `{}` -> {}{}",
            request.caller,
            request.action,
            request.categories.join(","),
            request.purpose,
            if decision.allowed { "allow" } else { "deny" },
            if decision.reasons.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    decision
                        .reasons
                        .iter()
                        .map(|r| r.code.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
        );
        let subjects = request.subjects.clone();
        let purpose = request.purpose.clone();
        let categories = request.categories.clone();
        admin
            .record(&self.gate, |body| {
                body.subjects = subjects;
                body.purpose = purpose;
                body.categories = categories;
                body.detail = Some(detail);
            })
            .await?;
        Ok(Response::new(ExplainResponse {
            decision: Some(crate::proto::v1::CheckResponse::from(decision)),
            stages: explanation.stages.iter().map(stage_message).collect(),
        }))
    }

    async fn set_shadow(
        &self,
        request: GrpcRequest<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let admin =
            admin::authorize(&self.gate, &request, SET_SHADOW, AdminRole::PolicyAdmin).await?;
        let message = request.into_inner();
        let bundle = bundle_of(message.bundle)?;
        let version = bundle.version();
        let checked = match self.manager().validate(&bundle).await {
            Ok(checked) => checked,
            Err(e) => {
                let e = ReloadError::Check(e);
                self.audit_rejected(&admin, &e, Some(version.to_string()))
                    .await;
                return Err(ApiError::from(e).into());
            }
        };
        let tests = checked.cases;
        let active = self.gate.decider().policy().map(|p| p.version());
        let detail = format!(
            "shadow version {version} (active {}); {tests} policy test cases passed; comment: {}",
            active.map_or_else(|| "none".to_owned(), |v| v.to_string()),
            message.comment
        );
        admin
            .record(&self.gate, |body| {
                body.policy_version = Some(version.to_string());
                body.detail = Some(detail);
            })
            .await?;
        let info = self.manager().set_shadow(
            checked,
            &Origin::Admin(admin.identity.clone()),
            &message.comment,
        );
        Ok(Response::new(ApplyResponse {
            version: info.version.to_string(),
            previous_version: active.map(|v| v.to_string()).unwrap_or_default(),
            changed: true,
            not_persisted: "a shadow is kept in memory only".into(),
            tests_run: count(tests),
        }))
    }

    async fn clear_shadow(
        &self,
        request: GrpcRequest<ClearShadowRequest>,
    ) -> Result<Response<ClearShadowResponse>, Status> {
        let admin =
            admin::authorize(&self.gate, &request, CLEAR_SHADOW, AdminRole::PolicyAdmin).await?;
        let shadow = self.gate.decider().shadow();
        let detail = match shadow {
            Some((version, differences)) => {
                format!("clear shadow version {version} ({differences} differences)")
            }
            None => "clear shadow: none was loaded".to_owned(),
        };
        admin
            .record(&self.gate, |body| {
                body.policy_version = shadow.map(|(v, _)| v.to_string());
                body.detail = Some(detail);
            })
            .await?;
        let cleared = self.manager().clear_shadow();
        Ok(Response::new(ClearShadowResponse {
            version: cleared.map(|(v, _)| v.to_string()).unwrap_or_default(),
            differences: cleared.map_or(0, |(_, d)| d),
        }))
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A bundle from its message: `bundle` required, test names plain and unique.
fn bundle_of(bundle: Option<PolicyBundle>) -> Result<Bundle, ApiError> {
    let Some(b) = bundle else {
        return Err(ApiError::InvalidField {
            field: "bundle",
            message: "required: the policy files (model, policy, taxonomy, routes) and tests"
                .into(),
        });
    };
    let mut tests: Vec<TestFile> = b
        .tests
        .into_iter()
        .map(|t| TestFile {
            name: t.name,
            content: t.content,
        })
        .collect();
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(pair) = tests.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(ApiError::InvalidField {
            field: "bundle.tests",
            message: format!(
                "the name `{}` is given twice; test file names must be unique",
                pair[0].name
            ),
        });
    }
    if let Some(bad) = tests
        .iter()
        .find(|t| !crate::gate::bundle::is_test_name(&t.name))
    {
        return Err(ApiError::InvalidField {
            field: "bundle.tests",
            message: format!(
                "`{}` is not allowed; a test file name is a plain name ending in `.yaml` or `.yml`",
                bad.name
            ),
        });
    }
    Ok(Bundle {
        source: PolicySource {
            origin: "bundle".into(),
            model: b.model,
            policy: b.policy,
            taxonomy: b.taxonomy,
            routes: (!b.routes.is_empty()).then_some(b.routes),
            descriptors: b
                .descriptors
                .into_iter()
                .map(|d| DescriptorFile {
                    name: d.name,
                    content: d.content,
                })
                .collect(),
        },
        tests,
    })
}

fn problems_of(e: &CheckError) -> Vec<PolicyProblem> {
    e.problems()
        .into_iter()
        .map(|p| PolicyProblem {
            location: p.location(),
            message: p.message,
        })
        .collect()
}

fn info_message(info: &VersionInfo) -> PolicyVersionInfo {
    PolicyVersionInfo {
        version: info.version.to_string(),
        applied_at_us: info.applied_at_us,
        applied_by: info.applied_by.clone(),
        comment: info.comment.clone(),
        rules: count(info.rules),
        not_persisted: info.not_persisted.clone().unwrap_or_default(),
    }
}

fn stage_message(stage: &StageReport) -> StageOutcome {
    StageOutcome {
        stage: stage.stage.as_str().to_owned(),
        outcome: stage.outcome.as_str().to_owned(),
        reasons: stage
            .reasons
            .iter()
            .map(|r| crate::proto::v1::Reason {
                code: r.code.as_str().to_owned(),
                clause: r.clause.to_string(),
                detail: r.detail.to_string(),
            })
            .collect(),
    }
}

/// The subjects' state given in an Explain request, instead of the registry's.
fn inline_subjects(
    subjects: &[crate::proto::v1::ExplainSubject],
) -> Result<InMemorySubjects, ApiError> {
    if let Some(blank) = subjects.iter().find(|s| s.subject.trim().is_empty()) {
        return Err(ApiError::InvalidField {
            field: "subjects",
            message: format!(
                "an entry has no `subject` id (consent {:?}); name the data subject",
                blank.consent
            ),
        });
    }
    Ok(subjects
        .iter()
        .map(|s| {
            (
                s.subject.clone(),
                SubjectState {
                    consent: s.consent.iter().cloned().collect(),
                    comms_consent: s.comms_consent.iter().cloned().collect(),
                    use_suspended: s.use_suspended,
                    provision_suspended: s.provision_suspended,
                    deletion_requested: s.deletion_requested,
                },
            )
        })
        .collect())
}
