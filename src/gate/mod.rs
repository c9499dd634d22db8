//! The gate: pdgate's running core, transport-neutral. Every door — the data plane
//! (`sidecar`), `AccessControl.Check` and Envoy's `ext_authz` (`api`) — hands the gate what it
//! read of a call and gets back what it must do ([`Gate::admit`], in [`admit`]); nothing about
//! deciding, auditing, metrics or spans happens in a door.
//!
//! Beside the admission pipeline lives the policy lifecycle of a running sidecar: the
//! [`manager`] (reload, history, rollback, shadow), where a policy is kept ([`store`], and
//! [`fleet`] in PostgreSQL), the policy [`bundle`] (files and their tests) and the [`watch`].

mod admit;
pub mod bundle;
pub mod fleet;
pub mod manager;
pub mod metadata;
pub mod store;
pub mod watch;

pub use admit::{Admission, Ask, Call, Door, Peer, Policy};
pub use bundle::{Bundle, CheckError, Checked, TestFile};
pub use fleet::PostgresPolicyStore;
pub use manager::{Applied, PolicyManager, ReloadError, Status, VersionInfo};
pub use metadata::{CallContext, MetadataError};
pub use store::{FileStore, MemoryStore, Origin, Persisted, PolicyStore, StoreError};

use crate::audit::AuditLog;
use crate::decision::Decider;
use crate::identity::{AdminRoles, CallerNaming, IdentityMode, MeshIdentity, MeshRefusal};
use crate::registry::SubjectCache;
use crate::subjects::SubjectStates;
use crate::telemetry::Telemetry;
use std::sync::Arc;

/// Where decisions read the data subjects' state.
#[derive(Clone)]
pub enum Subjects {
    /// A fixed set, in memory (the demo, tests, `pdgate check`).
    Fixed(Arc<dyn SubjectStates>),
    /// The subject registry, through its cache: a decision that needs a subject the cache
    /// cannot answer for reads it from the store first.
    Registry(Arc<SubjectCache>),
}

impl Subjects {
    pub fn states(&self) -> &dyn SubjectStates {
        match self {
            Self::Fixed(states) => states.as_ref(),
            Self::Registry(cache) => cache.as_ref(),
        }
    }

    /// The registry, when decisions read one (`SubjectRights` changes it).
    pub fn registry(&self) -> Option<&Arc<SubjectCache>> {
        match self {
            Self::Fixed(_) => None,
            Self::Registry(cache) => Some(cache),
        }
    }
}

/// What a [`Gate`] is made of: the running parts, built by `server` from the configuration.
pub struct GateParts {
    /// The policy lifecycle, and through it the [`Decider`] that holds the active snapshot.
    pub policies: Arc<PolicyManager>,
    pub subjects: Subjects,
    /// Every decision is written here before it is answered.
    pub audit: AuditLog,
    /// Metrics, and spans when OTLP is on. Its exporters are stopped by `server::run` once
    /// the servers have stopped.
    pub telemetry: Telemetry,
    pub identity: IdentityMode,
    /// How certificate names map to callers (mTLS mode).
    pub naming: CallerNaming,
    /// Which proxy's header names callers, and from where (mesh mode).
    pub mesh: Option<MeshIdentity>,
    /// Who may call the admin services (`PolicyAdmin`, `AuditLog`, `SubjectRights`).
    pub admin_roles: AdminRoles,
}

/// The state every door shares, fixed at start; the policy inside it changes by whole
/// snapshots ([`PolicyManager`]).
pub struct Gate {
    decider: Arc<Decider>,
    policies: Arc<PolicyManager>,
    subjects: Subjects,
    audit: AuditLog,
    telemetry: Telemetry,
    identity: IdentityMode,
    naming: CallerNaming,
    mesh: Option<MeshIdentity>,
    admin_roles: AdminRoles,
}

impl Gate {
    pub fn new(parts: GateParts) -> Self {
        let GateParts {
            policies,
            subjects,
            audit,
            telemetry,
            identity,
            naming,
            mesh,
            admin_roles,
        } = parts;
        Self {
            decider: policies.decider().clone(),
            policies,
            subjects,
            audit,
            telemetry,
            identity,
            naming,
            mesh,
            admin_roles,
        }
    }

    pub fn decider(&self) -> &Arc<Decider> {
        &self.decider
    }

    pub fn policies(&self) -> &Arc<PolicyManager> {
        &self.policies
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    pub fn identity(&self) -> IdentityMode {
        self.identity
    }

    pub fn naming(&self) -> &CallerNaming {
        &self.naming
    }

    /// The caller the mesh proxy names for a call from `remote` (mesh mode), or why it is not
    /// believed; refused in any other mode, where no mesh is configured.
    pub fn mesh_caller(
        &self,
        remote: Option<std::net::IpAddr>,
        headers: &http::HeaderMap,
    ) -> Result<String, MeshRefusal> {
        match &self.mesh {
            Some(mesh) => mesh.caller(remote, headers),
            None => Err(MeshRefusal::NotConfigured),
        }
    }

    pub fn admin_roles(&self) -> &AdminRoles {
        &self.admin_roles
    }
}
