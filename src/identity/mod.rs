//! Who is calling: how the sidecar learns a caller's identity ([`IdentityMode`]), how a client
//! certificate names one ([`CallerNaming`]), how a service mesh's proxy names one
//! ([`MeshIdentity`]), and the administrative roles identities may hold ([`AdminRoles`]). Both
//! the configuration and the doors read these, so they live below both.

pub mod mesh;
mod naming;
mod roles;

pub use mesh::{MeshHeader, MeshIdentity, MeshRefusal};
pub use naming::CallerNaming;
pub use roles::{AdminRole, AdminRoles, INCOMPATIBLE};

/// How the sidecar learns who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityMode {
    /// The caller names itself in `x-caller`. Development only: anyone can claim anything.
    InsecureHeader,
    /// The caller is named by its TLS client certificate; `x-caller` is ignored.
    Mtls,
    /// The caller is named by the service mesh's proxy in the pod, in its verified-peer header
    /// (`[mesh]`, [`MeshIdentity`]), on connections from that proxy only; `x-caller` is ignored.
    Mesh,
}

impl IdentityMode {
    /// The configuration's spelling: `insecure-header`, `mtls`, `mesh`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InsecureHeader => "insecure-header",
            Self::Mtls => "mtls",
            Self::Mesh => "mesh",
        }
    }

    /// Whether the caller is named by something the transport verified (a certificate, the
    /// mesh's proxy), so that `x-caller` names no one.
    pub fn verified(self) -> bool {
        !matches!(self, Self::InsecureHeader)
    }
}
