//! What the doors share of gRPC transport: the TLS files pdgate serves with, the server
//! builder both ports use, and [`rescue`], the one place where pdgate's outcomes and errors
//! become gRPC statuses.

pub mod connections;
pub mod deadline;
pub mod limits;
pub mod rescue;
pub mod tls;

use connections::{CallsLayer, Connections};
use limits::Limits;
use tower::layer::util::{Identity as NoLayer, Stack};

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::TcpIncoming;

/// TLS files, read and checked.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Vec<u8>,
    pub uri_prefix: String,
    pub dns_suffix: Option<String>,
    /// Where the three files were read from, to be read again for rotation
    /// ([`tls::ServerTls::watch`]); `None`: these bytes serve for the process's life.
    pub reload: Option<tls::TlsReload>,
}

/// The server a port serves with: [`server_builder`]'s.
pub type PortServer =
    tonic::transport::Server<Stack<CallsLayer, Stack<deadline::DeadlineLayer, NoLayer>>>;

/// A tonic server builder. Every call is bounded by its `grpc-timeout` ([`deadline`]); each
/// connection by `limits` (streams, header size, keepalive) and by `connections` (serve it
/// [`serve_connections`]). TLS is not the builder's but the listener's ([`tls`]: certificates
/// rotate without a restart).
pub fn server_builder(
    limits: &Limits,
    connections: &Connections,
) -> Result<PortServer, tonic::transport::Error> {
    let builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_max_header_list_size(limits.max_header_bytes)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout));
    Ok(builder
        .layer(deadline::DeadlineLayer)
        .layer(connections.layer()))
}

/// The connections `listener` accepts (with `TCP_NODELAY`), for a server to serve. The
/// stream ends when the listener can no longer accept — its socket was shut down or closed —
/// so that the server ends, and pdgate with it (`server::run`), instead of running on with a
/// port that takes no calls. Other accept errors (a full file table, an aborted handshake)
/// pass, and the server goes on accepting.
pub fn incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .take_while(
            |accepted| !matches!(accepted, Err(e) if e.kind() == std::io::ErrorKind::InvalidInput),
        )
}
