//! The sidecar: the data plane that every call to the protected service goes through, and
//! pdgate's own API port.
//!
//! ```text
//! client ──h2──▶ data plane (tonic server, any method path)
//!                 └▶ Authorize: context → snapshot → decision cache → decide
//!                      → deny (PERMISSION_DENIED)  |  forward ──h2──▶ upstream (pooled Channel)
//! ```
//!
//! Messages are never decoded: bodies, trailers and `grpc-status` stream through untouched,
//! for unary and every streaming kind.

pub mod authorize;
pub mod context;
pub mod deadline;
pub mod rescue;

use crate::decision::Decider;
use crate::subjects::SubjectStates;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};

/// How the sidecar learns who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityMode {
    /// The caller names itself in `x-caller`. Development only: anyone can claim anything.
    InsecureHeader,
}

/// State shared by every call of the data plane.
pub struct Shared {
    pub decider: Arc<Decider>,
    pub subjects: Arc<dyn SubjectStates>,
    pub identity: IdentityMode,
    /// Calls in flight; a call that finds none left is shed (`RESOURCE_EXHAUSTED`).
    pub inflight: Arc<Semaphore>,
    pub max_inflight: usize,
}

impl Shared {
    pub fn new(
        decider: Arc<Decider>,
        subjects: Arc<dyn SubjectStates>,
        identity: IdentityMode,
        max_inflight: usize,
    ) -> Self {
        Self {
            decider,
            subjects,
            identity,
            inflight: Arc::new(Semaphore::new(max_inflight)),
            max_inflight,
        }
    }
}

/// A pooled HTTP/2 client to the upstream. Lazy: the sidecar starts while the upstream is
/// down, and answers `UNAVAILABLE` until it is up.
pub fn upstream_channel(upstream: &str) -> Result<Channel, tonic::transport::Error> {
    let uri = if upstream.contains("://") {
        upstream.to_owned()
    } else {
        format!("http://{upstream}")
    };
    Ok(Endpoint::from_shared(uri)?
        .tcp_nodelay(true)
        .connect_timeout(std::time::Duration::from_secs(2))
        .connect_lazy())
}

/// Serves the data plane on `listener` until `shutdown` completes, then stops accepting and
/// waits for calls in flight to finish.
pub async fn serve_data_plane(
    listener: TcpListener,
    shared: Arc<Shared>,
    upstream: Channel,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let service = tower::ServiceBuilder::new()
        .layer(authorize::AuthorizeLayer::new(shared))
        .service(upstream);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .serve_with_incoming_shutdown(service, TcpIncoming::from(listener), shutdown)
        .await
}
