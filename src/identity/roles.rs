//! Administrative roles, granted to identities in `pdgate.toml` (`[admin.roles]`) and never in
//! the policy: a policy author must not be able to grant themselves the auditor's or the
//! privacy office's rights by pushing a policy. What each role may call is enforced by the
//! admin services (`api::admin`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

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
