//! Separation of duties on the API port: who may administer what.
//!
//! Four roles, each granted to identities in `pdgate.toml` (`[admin.roles]`), never in the
//! policy itself: a policy author must not be able to grant themselves the auditor's or the
//! privacy office's rights by pushing a policy.
//!
//! | role | may call |
//! |---|---|
//! | `policy-admin` | `PolicyAdmin` Validate, Apply, Rollback, SetShadow, ClearShadow, Explain |
//! | `auditor` | `AuditLog` Query, Tail, Verify |
//! | `operator` | `PolicyAdmin` Status, Explain (a `policy-admin` may call these too) |
//! | `privacy-office` | `SubjectRights` (every method) |
//!
//! The identity is the mTLS peer (the same certificate naming as callers of the data plane), or
//! `x-caller` in the insecure development mode. A call without the role is refused with
//! `PERMISSION_DENIED` (reason `ADMIN_ROLE_REQUIRED`) and the refusal is audited. An allowed
//! action is audited *before* it takes effect ([`Admin::record`]): when the record cannot be
//! written the action does not happen (`UNAVAILABLE`), exactly as an access is denied when its
//! record cannot be written.

use crate::audit::{RecordBody, RecordKind, RecordReason};
use crate::gate::Gate;
use crate::identity::{AdminRole, IdentityMode};
pub use crate::transport::rescue::ADMIN_ROLE_REQUIRED;
use crate::transport::rescue::ApiError;

/// An admin call whose identity holds the role the method needs.
#[derive(Debug, Clone)]
pub struct Admin {
    /// The verified identity: the actor recorded in audit records and histories.
    pub identity: String,
    pub role: AdminRole,
    /// The full gRPC method, `/pdgate.v1.PolicyAdmin/Apply`.
    pub method: &'static str,
}

/// The identity calling an admin method: the mTLS peer, the mesh's (mesh mode), or
/// `x-caller` in the insecure mode. Empty when there is none (or the mesh's is not believed).
pub fn identity_of<T>(gate: &Gate, request: &tonic::Request<T>) -> String {
    match gate.identity() {
        IdentityMode::InsecureHeader => request
            .metadata()
            .get("x-caller")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .trim()
            .to_owned(),
        IdentityMode::Mesh => gate
            .mesh_caller(
                request.remote_addr().map(|a| a.ip()),
                request.metadata().as_ref(),
            )
            .unwrap_or_default(),
        IdentityMode::Mtls => request
            .peer_certs()
            .and_then(|certs| certs.first().cloned())
            .map_or_else(String::new, |leaf| {
                gate.naming()
                    .caller(leaf.as_ref(), |name| gate.admin_roles().knows(name))
            }),
    }
}

/// Lets the call through when its identity holds `role`; otherwise audits the refusal and
/// refuses it ([`ApiError::RoleRequired`]: `PERMISSION_DENIED`, reason
/// `ADMIN_ROLE_REQUIRED`, with the roles in the details).
pub async fn authorize<T>(
    gate: &Gate,
    request: &tonic::Request<T>,
    method: &'static str,
    role: AdminRole,
) -> Result<Admin, ApiError> {
    authorize_any(gate, request, method, &[role]).await
}

/// Like [`authorize`], for a method that any of `roles` may call.
pub async fn authorize_any<T>(
    gate: &Gate,
    request: &tonic::Request<T>,
    method: &'static str,
    roles: &[AdminRole],
) -> Result<Admin, ApiError> {
    let identity = identity_of(gate, request);
    if let Some(role) = roles
        .iter()
        .copied()
        .find(|r| !identity.is_empty() && gate.admin_roles().has(&identity, *r))
    {
        return Ok(Admin {
            identity,
            role,
            method,
        });
    }
    let mut body = admin_body(&identity, method, gate);
    let refusal = ApiError::RoleRequired {
        method,
        identity,
        roles: roles.to_vec(),
    };
    body.decision = "deny".into();
    body.reasons = vec![RecordReason {
        code: ADMIN_ROLE_REQUIRED.into(),
        clause: "§6(3)".into(),
    }];
    body.detail = Some(refusal.to_string());
    // A refusal stays a refusal whether or not its record could be written.
    if let Err(e) = gate.audit().record(body).await {
        tracing::error!(error = %e, %method, "audit record of a refused admin call not written");
    }
    Err(refusal)
}

impl Admin {
    /// Writes the audit record of this action, allowed, before it takes effect. `fill` adds
    /// what the action concerns (subjects, purpose, `detail`, `policy_version`). When the record
    /// cannot be written the caller must not act ([`ApiError::NotAudited`], `UNAVAILABLE`).
    pub async fn record(
        &self,
        gate: &Gate,
        fill: impl FnOnce(&mut RecordBody),
    ) -> Result<(), ApiError> {
        let mut body = admin_body(&self.identity, self.method, gate);
        body.decision = "allow".into();
        fill(&mut body);
        gate.audit().record(body).await.map(|_| ()).map_err(|e| {
            tracing::error!(error = %e, method = %self.method, "admin action not audited; not carried out");
            ApiError::NotAudited(e)
        })
    }
}

/// A record of kind `admin`: the actor in `caller`, the RPC name (`Apply`) in `action`, the
/// full method in `method`, the active policy version.
fn admin_body(identity: &str, method: &str, gate: &Gate) -> RecordBody {
    RecordBody {
        time_us: crate::audit::now_us(),
        kind: Some(RecordKind::Admin),
        decision_id: gate.decider().next_id().to_string(),
        caller: identity.to_owned(),
        action: method.rsplit('/').next().unwrap_or(method).to_owned(),
        method: Some(method.to_owned()),
        policy_version: gate.decider().policy().map(|p| p.version().to_string()),
        latency_us: 1,
        ..RecordBody::default()
    }
}
