//! The TLS pdgate serves with on both ports, with certificate rotation: each new connection
//! is handshaken with the configuration built from the certificate, key and client CA read
//! last, so short-lived certificates (cert-manager, SPIFFE) rotate without a restart and
//! without touching open connections, which keep the certificate they were handshaken with.
//!
//! The files are polled ([`ServerTls::watch`]): their bytes are read again and compared, so a
//! Kubernetes Secret's symlink swap (`..data` pointing at a new directory) is seen like an
//! edit. A change that does not make a usable configuration — a file unreadable, a PEM that
//! does not parse, a key that is not the certificate's — is refused whole, logged and counted
//! (`pdgate_tls_reload_failures_total`); the previous configuration goes on serving. A half
//! written rotation (the certificate replaced, the key not yet) is refused once, then taken
//! at the next poll that finds both.
//!
//! The handshake is pdgate's own (tokio-rustls, the same rustls and ring as tonic's) rather
//! than tonic's `ServerTlsConfig`, which is fixed for the server's life; the connections it
//! yields carry tonic's `TlsConnectInfo`, so callers are named from their certificates as
//! before.

use super::TlsFiles;
use crate::telemetry::metrics::Metrics;
use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Where [`TlsFiles`] were read from, to read them again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsReload {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// How often the files are read again (`[tls] reload_interval_ms`).
    pub interval: Duration,
}

/// The default of `[tls] reload_interval_ms`.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} is not PEM pdgate can read")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the {0} holds no certificate")]
    Empty(&'static str),
    #[error("the client CA certificate cannot be used")]
    ClientCa(#[source] rustls::Error),
    #[error("the client certificate verifier cannot be built")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("the certificate and key cannot be used together")]
    CertifiedKey(#[source] rustls::Error),
}

/// The live TLS configuration of the listeners; see the module documentation.
pub struct ServerTls {
    current: ArcSwap<ServerConfig>,
    /// The bytes of (cert, key, client CA) last looked at — taken or refused — so that one
    /// broken rotation is reported once, not at every poll.
    seen: Mutex<[Vec<u8>; 3]>,
    reload: Option<TlsReload>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("reload", &self.reload)
            .finish_non_exhaustive()
    }
}

/// Handshakes in progress at once per listener; a connection beyond waits to be accepted.
const MAX_HANDSHAKES: usize = 128;

/// A server configuration from PEM bytes: pdgate's certificate chain and key, client
/// certificates required and verified against the client CA, HTTP/2 offered (ALPN `h2`, as
/// tonic's own TLS does).
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: &[u8],
) -> Result<ServerConfig, TlsError> {
    let pem = |what| move |source| TlsError::Pem { what, source };
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem("certificate"))?;
    if chain.is_empty() {
        return Err(TlsError::Empty("certificate file"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(pem("key"))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(client_ca_pem) {
        roots
            .add(ca.map_err(pem("client CA"))?)
            .map_err(TlsError::ClientCa)?;
    }
    if roots.is_empty() {
        return Err(TlsError::Empty("client CA file"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(TlsError::Verifier)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::CertifiedKey)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsError::CertifiedKey)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

impl ServerTls {
    /// The configuration of `files`, to be read again from `files.reload` if given.
    pub fn new(files: &TlsFiles) -> Result<Arc<Self>, TlsError> {
        let config = server_config(&files.cert_pem, &files.key_pem, &files.client_ca_pem)?;
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(config),
            seen: Mutex::new([
                files.cert_pem.clone(),
                files.key_pem.clone(),
                files.client_ca_pem.clone(),
            ]),
            reload: files.reload.clone(),
        }))
    }

    /// Reads the files again. `Ok(true)`: they changed and the new configuration serves the
    /// next connections; `Ok(false)`: nothing changed since the last look (or they are not
    /// watched); `Err`: they changed and were refused, the previous configuration stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let Some(paths) = &self.reload else {
            return Ok(false);
        };
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.clone(),
                source,
            })
        };
        let now = [
            read(&paths.cert)?,
            read(&paths.key)?,
            read(&paths.client_ca)?,
        ];
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if *seen == now {
            return Ok(false);
        }
        let built = server_config(&now[0], &now[1], &now[2]);
        *seen = now;
        self.current.store(Arc::new(built?));
        Ok(true)
    }

    /// Polls the files every `reload.interval` until `stop` completes (nothing to do when
    /// they are not watched); counts and logs what changed. An unreadable file is reported
    /// once until it is readable again.
    pub async fn watch(self: Arc<Self>, metrics: Arc<Metrics>, stop: impl Future<Output = ()>) {
        let Some(interval) = self.reload.as_ref().map(|r| r.interval) else {
            return;
        };
        let polls = async {
            let mut unreadable = false;
            loop {
                tokio::time::sleep(interval).await;
                let this = self.clone();
                let reloaded = tokio::task::spawn_blocking(move || this.reload()).await;
                match reloaded {
                    Ok(Ok(false)) => unreadable = false,
                    Ok(Ok(true)) => {
                        unreadable = false;
                        metrics.record_tls_reload(true);
                        tracing::info!(
                            "TLS certificate, key or client CA changed: new connections use them"
                        );
                    }
                    Ok(Err(e @ TlsError::Read { .. })) => {
                        if !unreadable {
                            metrics.record_tls_reload(false);
                            tracing::error!(error = %error_chain(&e), "TLS files changed but cannot be read; the previous ones stay in use");
                        }
                        unreadable = true;
                    }
                    Ok(Err(e)) => {
                        unreadable = false;
                        metrics.record_tls_reload(false);
                        tracing::error!(error = %error_chain(&e), "TLS files changed but cannot be used; the previous ones stay in use");
                    }
                    Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
                }
            }
        };
        tokio::select! {
            () = polls => {}
            () = stop => {}
        }
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

/// The TLS connections of `accepted` (a listener's connections, [`super::incoming`] or
/// [`super::connections::Connections::incoming`]): each handshaken with the configuration
/// current when it arrived, several at once (a slow client does not hold back the others). A
/// failed handshake, or one that takes longer than `timeout` (`[limits]
/// handshake_timeout_seconds`), is logged and skipped. Ends when `accepted` does.
pub fn handshaken<IO>(
    accepted: impl Stream<Item = std::io::Result<IO>>,
    tls: Arc<ServerTls>,
    timeout: Duration,
) -> impl Stream<Item = std::io::Result<TlsStream<IO>>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Connected<ConnectInfo = TcpConnectInfo>,
{
    let handshakes = accepted.map(move |accepted| {
        let acceptor = tls.acceptor();
        async move {
            let io = match accepted {
                Ok(io) => io,
                Err(e) => return Some(Err(e)),
            };
            let peer = io.connect_info().remote_addr();
            match tokio::time::timeout(timeout, acceptor.accept(io)).await {
                Ok(Ok(stream)) => Some(Ok(stream)),
                Ok(Err(e)) => {
                    tracing::debug!(?peer, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(?peer, "TLS handshake timed out");
                    None
                }
            }
        }
    });
    futures_util::StreamExt::buffer_unordered(handshakes, MAX_HANDSHAKES)
        .filter_map(std::convert::identity)
}

/// An error and its sources, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
