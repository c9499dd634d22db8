//! The data plane: the door every call to the protected service goes through. It reads the
//! call off HTTP/2, lets the gate admit it, and forwards it or answers the refusal.
//!
//! ```text
//! client ──h2──▶ data plane (tonic server, any method path)
//!                 └▶ Authorize: call slot → Gate::admit (decide, audit)
//!                      → refuse (transport::rescue)  |  forward ──h2──▶ upstream (pooled Channel)
//! ```
//!
//! Bodies, trailers and `grpc-status` stream through untouched, for unary and every streaming
//! kind — except on routes that read their messages ([`messages`]): there the request's
//! subjects are read from each message before it goes on, and responses lose the fields of
//! the categories the decision minimized.

pub mod authorize;
pub mod deadline;
pub mod messages;

use crate::gate::Gate;
use crate::transport::connections::Connections;
use crate::transport::limits::Limits;
use crate::transport::server_builder;
use crate::transport::tls::ServerTls;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};

/// A pooled HTTP/2 client to the upstream. Lazy: the sidecar starts while the upstream is
/// down, and answers `UNAVAILABLE` until it is up. HTTP/2 keepalive (`limits`) finds an
/// upstream that went away without closing its connection.
pub fn upstream_channel(
    upstream: &str,
    limits: &Limits,
) -> Result<Channel, tonic::transport::Error> {
    let uri = if upstream.contains("://") {
        upstream.to_owned()
    } else {
        format!("http://{upstream}")
    };
    Ok(Endpoint::from_shared(uri)?
        .tcp_nodelay(true)
        .connect_timeout(std::time::Duration::from_secs(2))
        .http2_keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// Serves the data plane on `listener` until `shutdown` completes, then stops accepting and
/// waits for calls in flight to finish. `max_calls` bounds the calls in flight: one more is
/// shed with `RESOURCE_EXHAUSTED`; `limits` bounds connections and one caller's share.
pub async fn serve_data_plane(
    listener: TcpListener,
    gate: Arc<Gate>,
    upstream: Channel,
    max_calls: usize,
    limits: &Limits,
    tls: Option<Arc<ServerTls>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let service = tower::ServiceBuilder::new()
        .layer(authorize::AuthorizeLayer::new(
            gate.clone(),
            max_calls,
            limits,
        ))
        .layer(crate::telemetry::upstream::UpstreamOutcomeLayer::new(
            gate.telemetry().metrics().clone(),
        ))
        .service(upstream);
    let connections = Connections::new(limits);
    let server = server_builder(limits, &connections)?;
    let accepted = connections.incoming(listener);
    match tls {
        None => {
            server
                .serve_with_incoming_shutdown(service, accepted, shutdown)
                .await
        }
        Some(tls) => {
            let handshaken =
                crate::transport::tls::handshaken(accepted, tls, limits.handshake_timeout);
            server
                .serve_with_incoming_shutdown(service, handshaken, shutdown)
                .await
        }
    }
}
