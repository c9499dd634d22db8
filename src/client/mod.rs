//! Client helpers for services that call through pdgate (docs/clients.md).
//!
//! - [`Declaration`]: what a call declares to pdgate — its purpose, the data subjects it is
//!   about, the company receiving the data — written into the call's metadata (`x-purpose`,
//!   `x-data-subject`, `x-recipient`), either directly ([`Declaration::apply`]) or per call by
//!   the tower layer [`DeclareLayer`] in front of a tonic `Channel`.
//! - [`Denial`]: pdgate's answer to a refused call read back from the status's
//!   `grpc-status-details-bin` (the `google.rpc.ErrorInfo` that `transport::rescue` writes):
//!   the reason codes, their clauses, the decision id and the policy version.
//!
//! Nothing here is needed to call through pdgate — any gRPC client that sets the metadata
//! works; these save each Rust caller from re-learning pdgate's metadata rules.

mod declare;
mod denial;

pub use declare::{ClientError, Declaration, DeclareLayer, DeclareService};
pub use denial::{Denial, DenialReason, decision_id};
