//! Who is calling: how the sidecar learns a caller's identity ([`IdentityMode`]), how a client
//! certificate names one ([`CallerNaming`]), and the administrative roles identities may hold
//! ([`AdminRoles`]). Both the configuration and the doors read these, so they live below both.

mod naming;
mod roles;

pub use naming::CallerNaming;
pub use roles::{AdminRole, AdminRoles, INCOMPATIBLE};

/// How the sidecar learns who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityMode {
    /// The caller names itself in `x-caller`. Development only: anyone can claim anything.
    InsecureHeader,
    /// The caller is named by its TLS client certificate; `x-caller` is ignored.
    Mtls,
}

impl IdentityMode {
    /// The configuration's spelling: `insecure-header`, `mtls`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InsecureHeader => "insecure-header",
            Self::Mtls => "mtls",
        }
    }
}
