//! Certificate rotation without a restart, over real files and a real TLS client: the
//! certificate, key and client CA live in a directory laid out as Kubernetes mounts a Secret
//! (`tls.crt` → `..data/tls.crt`, `..data` → a timestamped directory, swapped in one rename).
//! After a swap the next handshake gets the new certificate while a connection opened before
//! goes on working; a broken new set is refused and counted, and the previous certificate
//! keeps serving; a new client CA admits its clients and no longer the old CA's.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::tls::{Ca, dns, uri};
use common::wait::eventually;
use common::{Harness, Options};
use pdgate::config::{DEFAULT_URI_PREFIX, TlsFiles};
use pdgate::transport::tls::TlsReload;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// A Secret-like mount: `dir/{tls.crt,tls.key,ca.crt}` → `..data/…` → `..<n>/…`.
struct Mount {
    dir: tempfile::TempDir,
    version: u32,
}

impl Mount {
    fn new(cert: &str, key: &str, ca: &str) -> Self {
        let mut mount = Self {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        };
        mount.swap(cert, key, ca);
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), mount.path(name)).unwrap();
        }
        mount
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a new version beside the old one and points `..data` at it in one rename, as
    /// the kubelet does.
    fn swap(&mut self, cert: &str, key: &str, ca: &str) {
        self.version += 1;
        let version = format!("..{}", self.version);
        let dir = self.path(&version);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("tls.crt"), cert).unwrap();
        std::fs::write(dir.join("tls.key"), key).unwrap();
        std::fs::write(dir.join("ca.crt"), ca).unwrap();
        let tmp = self.path("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.path("..data")).unwrap();
    }

    fn files(&self) -> TlsFiles {
        TlsFiles {
            cert_pem: std::fs::read(self.path("tls.crt")).unwrap(),
            key_pem: std::fs::read(self.path("tls.key")).unwrap(),
            client_ca_pem: std::fs::read(self.path("ca.crt")).unwrap(),
            uri_prefix: DEFAULT_URI_PREFIX.to_owned(),
            dns_suffix: None,
            reload: Some(TlsReload {
                cert: self.path("tls.crt"),
                key: self.path("tls.key"),
                client_ca: self.path("ca.crt"),
                interval: Duration::from_millis(100),
            }),
        }
    }
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// A TLS connection to `addr` as a client holding `(cert, key)`, trusting `server_ca`, asking
/// for HTTP/2.
async fn connect(
    addr: SocketAddr,
    server_ca: &Ca,
    client: &(String, String),
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(&server_ca.pem())).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![der(&client.0)],
            PrivateKeyDer::from_pem_slice(client.1.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The certificate the server presented on a new connection.
async fn served_certificate(
    addr: SocketAddr,
    server_ca: &Ca,
    client: &(String, String),
) -> Vec<u8> {
    let tls = connect(addr, server_ca, client).await.unwrap();
    let (_, session) = tls.get_ref();
    session.peer_certificates().unwrap()[0].to_vec()
}

/// An HTTP/2 connection over `tls`; its driver runs on a task of its own.
async fn h2(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
) -> Result<h2::client::SendRequest<bytes::Bytes>, h2::Error> {
    let (send, connection) = h2::client::handshake(tls).await?;
    tokio::spawn(connection);
    Ok(send)
}

/// `GET /metrics` on an HTTP/2 connection: the exposition text.
async fn metrics(send: &h2::client::SendRequest<bytes::Bytes>) -> Result<String, h2::Error> {
    let request = http::Request::get("https://localhost/metrics")
        .body(())
        .unwrap();
    let (response, _) = send.clone().ready().await?.send_request(request, true)?;
    let mut body = response.await?.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8(text).unwrap())
}

fn counter(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn mounted_harness(mount: &Mount) -> Harness {
    Harness::with(Options {
        tls: Some(mount.files()),
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn a_swapped_certificate_serves_the_next_handshake_and_open_connections_go_on() {
    let ca = Ca::new();
    let client = ca.leaf(vec![uri("prometheus")]);
    let first = ca.leaf(vec![dns("localhost")]);
    let mut mount = Mount::new(&first.0, &first.1, &ca.pem());
    let mut h = mounted_harness(&mount).await;
    let api = h.api_addr;

    assert_eq!(
        served_certificate(api, &ca, &client).await,
        der(&first.0).to_vec()
    );
    assert_eq!(
        served_certificate(h.data_addr, &ca, &client).await,
        der(&first.0).to_vec()
    );
    // A connection opened before the swap.
    let open = h2(connect(api, &ca, &client).await.unwrap()).await.unwrap();
    let before = metrics(&open).await.unwrap();
    assert_eq!(
        counter(&before, "pdgate_tls_reloads_total"),
        Some(0),
        "{before}"
    );

    let second = ca.leaf(vec![dns("localhost")]);
    mount.swap(&second.0, &second.1, &ca.pem());
    eventually("the next handshake gets the new certificate", || async {
        served_certificate(api, &ca, &client).await == der(&second.0).to_vec()
    })
    .await;
    // Both ports: one configuration.
    assert_eq!(
        served_certificate(h.data_addr, &ca, &client).await,
        der(&second.0).to_vec()
    );
    // The connection opened before still works, on its own certificate.
    let after = metrics(&open).await.unwrap();
    assert_eq!(
        counter(&after, "pdgate_tls_reloads_total"),
        Some(1),
        "{after}"
    );
    assert_eq!(counter(&after, "pdgate_tls_reload_failures_total"), Some(0));

    // A broken rotation: a key that is not the certificate's, then one that is not PEM. Each
    // is refused and counted once; the second certificate goes on serving.
    let third = ca.leaf(vec![dns("localhost")]);
    mount.swap(&third.0, &second.1, &ca.pem());
    eventually("the mismatched key is refused", || async {
        let text = metrics(&open).await.unwrap();
        counter(&text, "pdgate_tls_reload_failures_total") == Some(1)
    })
    .await;
    mount.swap(&third.0, "not a key", &ca.pem());
    eventually("the unreadable key is refused", || async {
        let text = metrics(&open).await.unwrap();
        counter(&text, "pdgate_tls_reload_failures_total") == Some(2)
    })
    .await;
    assert_eq!(
        served_certificate(api, &ca, &client).await,
        der(&second.0).to_vec()
    );
    let text = metrics(&open).await.unwrap();
    assert_eq!(counter(&text, "pdgate_tls_reloads_total"), Some(1));

    // A new client CA: its clients get in, the old CA's no longer do.
    let new_ca = Ca::new();
    let new_client = new_ca.leaf(vec![uri("prometheus")]);
    mount.swap(&third.0, &third.1, &new_ca.pem());
    eventually("the new certificate and client CA are taken", || async {
        served_certificate(api, &ca, &new_client).await == der(&third.0).to_vec()
    })
    .await;
    let refused = async {
        let tls = connect(api, &ca, &client).await?;
        let send = h2(tls).await.map_err(std::io::Error::other)?;
        metrics(&send).await.map_err(std::io::Error::other)
    }
    .await;
    assert!(
        refused.is_err(),
        "a client of the old CA was served: {refused:?}"
    );
    h.shutdown().await.unwrap();
}
