//! The resource bounds pdgate serves with: `[limits]` in `pdgate.toml`, checked by `config`.
//! They live here, below `config`, because the transport (server builder, connections), the
//! data plane's call slots and the `AccessControl` API all read them.
//!
//! Every bound has a default that keeps one caller, one connection or one silent peer from
//! holding what the others need (DESIGN §3: bounded everything); `Limits::default()` is what a
//! configuration without `[limits]` runs with.

use std::time::Duration;

/// The checked `[limits]` section (besides `max_concurrent_calls` and `shutdown_grace`, which
/// predate it and stay on `Config`). To add a bound: a field here with its default in
/// [`Limits::default`], its key in `config::LimitsSection`, its check in `config`, and a line in
/// the README's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `response_timeout_seconds` (30): how long the upstream may take to start its response
    /// to a call that carries no deadline (`grpc-timeout`). Past it the call is answered
    /// `DEADLINE_EXCEEDED` and its slot freed: a silent upstream cannot hold slots forever.
    pub response_timeout: Duration,
    /// `keepalive_interval_seconds` (30): HTTP/2 PINGs on otherwise quiet connections, to
    /// clients and to the upstream, so that a peer that went away is noticed.
    pub keepalive_interval: Duration,
    /// `keepalive_timeout_seconds` (10): a PING unanswered this long closes the connection.
    pub keepalive_timeout: Duration,
    /// `max_streams_per_connection` (100): `SETTINGS_MAX_CONCURRENT_STREAMS` on both ports.
    pub max_streams_per_connection: u32,
    /// `max_calls_per_caller` (a quarter of `max_concurrent_calls`): the share of the data
    /// plane's call slots one caller may hold, so that one caller cannot starve the others.
    pub max_calls_per_caller: usize,
    /// `idle_timeout_seconds` (300): a connection with no call in flight for this long is
    /// closed.
    pub idle_timeout: Duration,
    /// `handshake_timeout_seconds` (10): from accept to the first call's headers (TLS
    /// handshake and HTTP/2 preface included); a connection that takes longer is closed.
    pub handshake_timeout: Duration,
    /// `max_connections` (1024): open connections per port; one more is closed at accept.
    pub max_connections: usize,
    /// `max_header_bytes` (16384): the request header block (HTTP/2 `MAX_HEADER_LIST_SIZE`).
    pub max_header_bytes: u32,
    /// `inspect_message_bytes` (4 MiB): the largest message pdgate reads on a route that reads
    /// messages, decompressed; a larger one is `RESOURCE_EXHAUSTED`. (Envoy's door keeps the
    /// 4 MiB default: Envoy's own `max_request_bytes` bounds what it sends.)
    pub inspect_message_bytes: usize,
    /// `check_callers` (absent: every identified caller): who may call `AccessControl`
    /// Check/BatchCheck. Its answers reveal subjects' consent state.
    pub check_callers: Option<Vec<String>>,
    /// `check_max_categories` (32): categories in one Check request.
    pub check_max_categories: usize,
    /// `check_max_subjects` (64): subjects in one Check request.
    pub check_max_subjects: usize,
    /// `check_max_batch` (100): requests in one BatchCheck.
    pub check_max_batch: usize,
    /// `check_max_value_bytes` (256): one caller, purpose, recipient, category or subject id
    /// in a Check request. With the counts above it bounds the audit record a Check writes.
    pub check_max_value_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            response_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_streams_per_connection: 100,
            max_calls_per_caller: 256,
            idle_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_header_bytes: 16 * 1024,
            inspect_message_bytes: crate::message::frames::MAX_MESSAGE_BYTES,
            check_callers: None,
            check_max_categories: 32,
            check_max_subjects: 64,
            check_max_batch: 100,
            check_max_value_bytes: 256,
        }
    }
}
