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
use crate::sidecar::{IdentityMode, Shared};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The reason code of a refused admin call.
pub const ADMIN_ROLE_REQUIRED: &str = "ADMIN_ROLE_REQUIRED";

/// An administrative role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AdminRole {
    PolicyAdmin,
    Auditor,
    Operator,
    PrivacyOffice,
}

impl AdminRole {
    pub const ALL: [AdminRole; 4] = [
        Self::PolicyAdmin,
        Self::Auditor,
        Self::Operator,
        Self::PrivacyOffice,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PolicyAdmin => "policy-admin",
            Self::Auditor => "auditor",
            Self::Operator => "operator",
            Self::PrivacyOffice => "privacy-office",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for AdminRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which identities hold which roles. Empty by default: nobody may administer anything until
/// the configuration says so.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminRoles {
    by_identity: BTreeMap<String, BTreeSet<AdminRole>>,
}

/// Roles that one identity must not hold together: whoever changes the policy must not also
/// be the one who reads the trail of what it did.
pub const INCOMPATIBLE: [(AdminRole, AdminRole); 1] =
    [(AdminRole::PolicyAdmin, AdminRole::Auditor)];

impl AdminRoles {
    /// From `role -> identities`, as configured. Returns the identities that hold two
    /// incompatible roles, if any, as an error naming them.
    pub fn new<'a>(
        grants: impl IntoIterator<Item = (AdminRole, &'a [String])>,
    ) -> Result<Self, String> {
        let mut by_identity: BTreeMap<String, BTreeSet<AdminRole>> = BTreeMap::new();
        for (role, identities) in grants {
            for identity in identities {
                by_identity
                    .entry(identity.clone())
                    .or_default()
                    .insert(role);
            }
        }
        for (identity, roles) in &by_identity {
            for (a, b) in INCOMPATIBLE {
                if roles.contains(&a) && roles.contains(&b) {
                    return Err(format!(
                        "`{identity}` holds both `{a}` and `{b}`; separation of duties requires two identities"
                    ));
                }
            }
        }
        Ok(Self { by_identity })
    }

    pub fn has(&self, identity: &str, role: AdminRole) -> bool {
        self.by_identity
            .get(identity)
            .is_some_and(|roles| roles.contains(&role))
    }

    /// Whether the identity holds any role.
    pub fn knows(&self, identity: &str) -> bool {
        self.by_identity.contains_key(identity)
    }

    pub fn roles_of(&self, identity: &str) -> impl Iterator<Item = AdminRole> + '_ {
        self.by_identity
            .get(identity)
            .into_iter()
            .flatten()
            .copied()
    }
}

/// An admin call whose identity holds the role the method needs.
#[derive(Debug, Clone)]
pub struct Admin {
    /// The verified identity: the actor recorded in audit records and histories.
    pub identity: String,
    pub role: AdminRole,
    /// The full gRPC method, `/pdgate.v1.PolicyAdmin/Apply`.
    pub method: &'static str,
}

/// The identity calling an admin method: the mTLS peer, or `x-caller` in the insecure mode.
/// Empty when there is none.
pub fn identity_of<T>(shared: &Shared, request: &tonic::Request<T>) -> String {
    match shared.identity {
        IdentityMode::InsecureHeader => request
            .metadata()
            .get("x-caller")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .trim()
            .to_owned(),
        IdentityMode::Mtls => request
            .peer_certs()
            .and_then(|certs| certs.first().cloned())
            .map_or_else(String::new, |leaf| {
                shared
                    .naming
                    .caller(leaf.as_ref(), |name| shared.admin_roles.knows(name))
            }),
    }
}

/// Lets the call through when its identity holds `role`; otherwise audits the refusal and
/// returns `PERMISSION_DENIED` (reason `ADMIN_ROLE_REQUIRED`, with the role in the details).
pub async fn authorize<T>(
    shared: &Shared,
    request: &tonic::Request<T>,
    method: &'static str,
    role: AdminRole,
) -> Result<Admin, Status> {
    authorize_any(shared, request, method, &[role]).await
}

/// Like [`authorize`], for a method that any of `roles` may call.
pub async fn authorize_any<T>(
    shared: &Shared,
    request: &tonic::Request<T>,
    method: &'static str,
    roles: &[AdminRole],
) -> Result<Admin, Status> {
    let identity = identity_of(shared, request);
    if let Some(role) = roles
        .iter()
        .copied()
        .find(|r| !identity.is_empty() && shared.admin_roles.has(&identity, *r))
    {
        return Ok(Admin {
            identity,
            role,
            method,
        });
    }
    let needed = roles
        .iter()
        .map(|r| format!("`{r}`"))
        .collect::<Vec<_>>()
        .join(" or ");
    let who = if identity.is_empty() {
        "a caller with no identity".to_owned()
    } else {
        format!("`{identity}`")
    };
    let message = format!("{method} needs the role {needed}; {who} does not hold it");
    let mut body = admin_body(&identity, method, shared);
    body.decision = "deny".into();
    body.reasons = vec![RecordReason {
        code: ADMIN_ROLE_REQUIRED.into(),
        clause: "§6(3)".into(),
    }];
    body.detail = Some(message.clone());
    // A refusal stays a refusal whether or not its record could be written.
    if let Err(e) = shared.audit.record(body).await {
        tracing::error!(error = %e, %method, "audit record of a refused admin call not written");
    }
    let mut details = std::collections::HashMap::new();
    details.insert(
        "required_roles".to_owned(),
        roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(","),
    );
    details.insert("identity".to_owned(), identity);
    Err(Status::with_error_details(
        Code::PermissionDenied,
        message,
        ErrorDetails::with_error_info(ADMIN_ROLE_REQUIRED, "pdgate", details),
    ))
}

impl Admin {
    /// Writes the audit record of this action, allowed, before it takes effect. `fill` adds
    /// what the action concerns (subjects, purpose, `detail`, `policy_version`). When the record
    /// cannot be written the caller must not act: the error is `UNAVAILABLE`.
    pub async fn record(
        &self,
        shared: &Shared,
        fill: impl FnOnce(&mut RecordBody),
    ) -> Result<(), Status> {
        let mut body = admin_body(&self.identity, self.method, shared);
        body.decision = "allow".into();
        fill(&mut body);
        shared.audit.record(body).await.map(|_| ()).map_err(|e| {
            tracing::error!(error = %e, method = %self.method, "admin action not audited; not carried out");
            Status::unavailable(format!(
                "the action cannot be audited ({e}); it was not carried out"
            ))
        })
    }
}

/// A record of kind `admin`: the actor in `caller`, the RPC name (`Apply`) in `action`, the
/// full method in `method`, the active policy version.
fn admin_body(identity: &str, method: &str, shared: &Shared) -> RecordBody {
    RecordBody {
        time_us: crate::audit::now_us(),
        kind: Some(RecordKind::Admin),
        decision_id: shared.decider.next_id().to_string(),
        caller: identity.to_owned(),
        action: method.rsplit('/').next().unwrap_or(method).to_owned(),
        method: Some(method.to_owned()),
        policy_version: shared.decider.policy().map(|p| p.version().to_string()),
        latency_us: 1,
        ..RecordBody::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_granted_per_identity_and_incompatible_ones_refused() {
        let admins = vec!["sec-alice".to_owned()];
        let auditors = vec!["audit-bob".to_owned()];
        let roles = AdminRoles::new([
            (AdminRole::PolicyAdmin, admins.as_slice()),
            (AdminRole::Auditor, auditors.as_slice()),
        ])
        .unwrap();
        assert!(roles.has("sec-alice", AdminRole::PolicyAdmin));
        assert!(!roles.has("sec-alice", AdminRole::Auditor));
        assert!(!roles.has("mallory", AdminRole::Operator));
        assert!(roles.knows("audit-bob") && !roles.knows("mallory"));

        let err = AdminRoles::new([
            (AdminRole::PolicyAdmin, admins.as_slice()),
            (AdminRole::Auditor, admins.as_slice()),
        ])
        .unwrap_err();
        assert!(err.contains("sec-alice"), "{err}");
    }

    #[test]
    fn role_names_round_trip() {
        for role in AdminRole::ALL {
            assert_eq!(AdminRole::parse(role.as_str()), Some(role));
        }
        assert_eq!(AdminRole::parse("admin"), None);
    }
}
