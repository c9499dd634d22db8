//! What the doors share of gRPC transport: the TLS files pdgate serves with, the server
//! builder both ports use, and [`rescue`], the one place where pdgate's outcomes and errors
//! become gRPC statuses.

pub mod deadline;
pub mod rescue;
pub mod tls;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

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

/// A tonic server builder, with mTLS when `tls` is given: pdgate's certificate, and client
/// certificates required and verified against the client CA. Every call is bounded by its
/// `grpc-timeout` ([`deadline`]).
pub fn server_builder(
    tls: Option<&TlsFiles>,
) -> Result<
    tonic::transport::Server<
        tower::layer::util::Stack<deadline::DeadlineLayer, tower::layer::util::Identity>,
    >,
    tonic::transport::Error,
> {
    let builder = tonic::transport::Server::builder().tcp_nodelay(true);
    let builder = match tls {
        None => builder,
        Some(tls) => builder.tls_config(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
                .client_ca_root(Certificate::from_pem(&tls.client_ca_pem))
                .client_auth_optional(false),
        )?,
    };
    Ok(builder.layer(deadline::DeadlineLayer))
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
