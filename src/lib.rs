//! pdgate: a gRPC access-control sidecar for personal-data stores.
//!
//! It decides, from casbin purpose-based rules, whether a caller may do an action on categories
//! of personal data for the purpose of use it declares, within the secrecy of communications
//! and the data subject's consent and requests; it caches decisions and audits every one.
//!
//! # Layout
//!
//! In the order a call flows through them; each imports only what is listed before it
//! (`tests/layers.rs` keeps it so).
//!
//! - [`policy`]: a policy directory (`model.conf`, `policy.csv`, `taxonomy.toml`,
//!   `routes.yaml`) read, validated whole and compiled into an immutable, versioned
//!   [`policy::Snapshot`]. Pure: files in, a snapshot or every problem out.
//! - [`decision`]: the staged semantics of a decision and [`decision::Decider`], which holds
//!   the active snapshot and the moka decision cache; the policy test runner
//!   ([`decision::fixtures`]). Deciding never fails: what cannot be evaluated is a deny.
//! - [`gate`]: the running core. [`gate::Gate::admit`] takes a call as a door read it and
//!   returns what the door must do: the snapshot loaded once, the route, the decision, the
//!   audit record written, metrics and the span. Beside it, the policy lifecycle: manager,
//!   stores (the policy directory, PostgreSQL for a fleet), the watch, bundles.
//! - The doors, which only translate their transport to a [`gate::Call`] and the
//!   [`gate::Admission`] back: [`sidecar`] (the data plane, a tower layer in front of the
//!   upstream) and [`api`] (`AccessControl`, Envoy `ext_authz`, and the admin services
//!   `PolicyAdmin`, `SubjectRights`, `AuditLog`, health, reflection, `/metrics`; and the
//!   optional plaintext probe listener, `/livez`, `/readyz`, `/metrics`).
//!   [`transport`] holds what they share: TLS, the server builder, and [`transport::rescue`],
//!   where every outcome becomes a gRPC status.
//! - [`server`]: the listeners, the gate built from the configuration, shutdown.
//! - [`cli`]: the `pdgate` command line; `main.rs` only calls [`cli::main`].
//!
//! Beside them: [`subjects`] (a data subject's consent and requests, as decisions read them),
//! [`registry`] (the subject registry, SQLite or PostgreSQL, behind a cache), [`audit`] (the
//! hash-chained audit log: writer, reader, retention, index), [`telemetry`] (metrics, and
//! OTLP spans), [`identity`] (identity modes, certificate naming, admin roles), [`config`]
//! (`pdgate.toml`), [`proto`] (the generated gRPC types), [`replay`] (what-if replay of an
//! audit log, `pdgate policy diff`), [`demo`] (a customer-data service to try it on) and
//! [`client`] (for callers: the metadata a call declares, pdgate's denials read back).

pub mod api;
pub mod audit;
pub mod cli;
pub mod client;
pub mod config;
pub mod decision;
pub mod demo;
pub mod gate;
pub mod identity;
pub mod message;
pub mod policy;
pub mod proto;
pub mod registry;
pub mod replay;
pub mod server;
pub mod sidecar;
pub mod subjects;
pub mod telemetry;
pub mod transport;
