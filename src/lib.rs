//! pdgate: a gRPC access-control sidecar for personal-data stores.
//!
//! It decides, from casbin purpose-based rules, whether a caller may do an action on categories
//! of personal data for the purpose of use it declares, within the secrecy of communications
//! and the data subject's consent and requests; it caches decisions and audits every one.
//!
//! # Layout
//!
//! - [`policy`]: a policy directory (`model.conf`, `policy.csv`, `taxonomy.toml`) is read,
//!   validated whole and compiled into an immutable, versioned [`policy::Snapshot`]; the policy
//!   tests in `policy/tests/` run against it ([`policy::fixtures`]), and
//!   [`policy::reference`] builds the plain casbin enforcer that the compiled index is checked
//!   against.
//! - [`decision`]: the staged semantics of a decision ([`decision::evaluate`],
//!   [`decision::finish`]) and [`decision::Decider`], which holds the current snapshot and the
//!   moka decision cache. Deciding never fails: what cannot be evaluated is a deny.
//! - [`subjects`]: the data subject's consent and requests, as decisions read them.
//! - [`registry`]: the persistent subject registry with the history of every change, in a
//!   SQLite file (embedded default) or PostgreSQL (fleet), and [`registry::Preloaded`], which
//!   reads a request's subjects before the (synchronous) decision.
//! - [`telemetry`]: the metrics registry (`GET /metrics` on the API port) and, with an OTLP
//!   endpoint configured, one span per decision parented on the caller's `traceparent`, and
//!   spans and metrics exported over OTLP/gRPC.
//! - [`replay`]: what-if replay of an audit log under a candidate policy (`pdgate policy diff`).
//! - [`cli`]: the `pdgate` command line; `main.rs` only calls [`cli::main`].
//! - [`proto`]: the gRPC types generated from `proto/`.
//!
//! Dependencies point one way: the CLI and (later) the transport know the engine; the engine
//! knows nothing of either.

pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod decision;
pub mod demo;
pub mod policy;
pub mod proto;
pub mod registry;
pub mod replay;
pub mod server;
pub mod sidecar;
pub mod subjects;
pub mod telemetry;
