//! mTLS identity: the caller is named by its client certificate (URI SAN or DNS name), an
//! `x-caller` header is ignored, and a client without a certificate from the client CA is
//! refused at the handshake. Certificates are made with rcgen for each test.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::tls::{Ca, dns, uri};
use common::{Harness, Options, call, reason};
use pdgate::proto::demo::customer_data_client::CustomerDataClient;
use pdgate::proto::demo::{DisclosureRequest, GetBillingStatementRequest, GetProfileRequest};
use std::time::Duration;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

struct Pki {
    ca: Ca,
}

impl Pki {
    async fn sidecar(&self) -> Harness {
        Harness::with(Options {
            tls: Some(self.ca.server_files("localhost")),
            ..Options::default()
        })
        .await
    }

    /// A TLS channel to `addr` presenting `client` (cert, key), or no certificate.
    async fn channel(
        &self,
        addr: std::net::SocketAddr,
        client: Option<(String, String)>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca.pem()))
            .domain_name("localhost");
        if let Some((cert, key)) = client {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
    }
}

fn billing(caller_header: &str) -> tonic::Request<GetBillingStatementRequest> {
    call(
        GetBillingStatementRequest {
            customer_id: "cust-1".into(),
            month: String::new(),
        },
        caller_header,
        "service.billing",
        &["cust-1"],
    )
}

#[tokio::test]
async fn the_certificate_names_the_caller_and_x_caller_is_ignored() {
    let pki = Pki { ca: Ca::new() };
    let h = pki.sidecar().await;
    let channel = pki
        .channel(h.data_addr, Some(pki.ca.leaf(vec![uri("billing-service")])))
        .await
        .unwrap();
    let mut client = CustomerDataClient::new(channel);
    // The header claims someone else; the certificate decides.
    let response = client
        .get_billing_statement(billing("privacy-office"))
        .await
        .unwrap();
    assert!(response.get_ref().amount_yen > 0);
    assert_eq!(
        h.service.last_metadata("x-pdgate-caller").as_deref(),
        Some("billing-service")
    );
    // Claiming to be the privacy office does not give its purposes.
    let status = client
        .disclose_held_data(call(
            DisclosureRequest {
                customer_id: "cust-1".into(),
            },
            "privacy-office",
            "subject_request.disclosure",
            &["cust-1"],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "PURPOSE_NOT_REGISTERED");
    assert_eq!(h.service.calls(), 1);
}

#[tokio::test]
async fn a_dns_name_names_the_caller_too() {
    let pki = Pki { ca: Ca::new() };
    let h = pki.sidecar().await;
    let channel = pki
        .channel(
            h.data_addr,
            Some(
                pki.ca
                    .leaf(vec![dns("marketing-service.callers.pdgate.local")]),
            ),
        )
        .await
        .unwrap();
    let status = CustomerDataClient::new(channel)
        .get_profile(call(
            GetProfileRequest {
                customer_id: "cust-1".into(),
            },
            "billing-service",
            "marketing.email",
            &["cust-1"],
        ))
        .await
        .unwrap_err();
    // Decided as marketing-service (consent is missing), not as the claimed billing-service.
    assert_eq!(reason(&status), "CONSENT_REQUIRED");
}

#[tokio::test]
async fn a_certificate_naming_no_known_caller_is_denied() {
    let pki = Pki { ca: Ca::new() };
    let h = pki.sidecar().await;
    let channel = pki
        .channel(h.data_addr, Some(pki.ca.leaf(vec![uri("eve")])))
        .await
        .unwrap();
    let status = CustomerDataClient::new(channel)
        .get_billing_statement(billing("billing-service"))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "CALLER_UNKNOWN");
    assert_eq!(h.service.calls(), 0);
}

/// Asserts that `connect` (then one call made with `call`) is refused at the transport, and
/// prints how: the TLS handshake fails, or — in TLS 1.3 the server checks the client's
/// certificate after the client has finished its handshake — the first call fails with a
/// transport error (UNKNOWN or UNAVAILABLE with a transport error as its source). Any gRPC
/// answer of the sidecar's, even a denial, fails the test. A crashed sidecar would be
/// refused too: the callers check [`still_serves`] afterwards.
async fn assert_refused<F, Fut>(
    what: &str,
    connect: Result<Channel, tonic::transport::Error>,
    call: F,
) where
    F: FnOnce(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let channel = match connect {
        Err(e) => {
            println!("{what}: refused at the handshake ({e})");
            return;
        }
        Ok(channel) => channel,
    };
    let status = match call(channel).await {
        Ok(()) => panic!("{what}: served"),
        Err(status) => status,
    };
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Unknown)
            && std::error::Error::source(&status).is_some(),
        "{what}: answered {:?} (`{}`) instead of being refused at the transport",
        status.code(),
        reason(&status)
    );
    println!(
        "{what}: refused at the first call ({:?}, transport error)",
        status.code()
    );
}

/// The sidecar still serves a client with a good certificate: a refusal above was the
/// sidecar's answer, not a crash.
async fn still_serves(pki: &Pki, h: &Harness) {
    let channel = pki
        .channel(h.data_addr, Some(pki.ca.leaf(vec![uri("billing-service")])))
        .await
        .expect("a client with a good certificate connects");
    CustomerDataClient::new(channel)
        .get_billing_statement(billing("billing-service"))
        .await
        .expect("a client with a good certificate is served");
}

async fn billing_call(channel: Channel) -> Result<(), tonic::Status> {
    CustomerDataClient::new(channel)
        .get_billing_statement(billing("billing-service"))
        .await
        .map(drop)
}

#[tokio::test]
async fn a_client_without_a_valid_certificate_is_refused() {
    let pki = Pki { ca: Ca::new() };
    let h = pki.sidecar().await;
    assert_refused(
        "no client certificate",
        pki.channel(h.data_addr, None).await,
        billing_call,
    )
    .await;
    let stranger = Ca::new();
    assert_refused(
        "a certificate from another CA",
        pki.channel(
            h.data_addr,
            Some(stranger.leaf(vec![uri("billing-service")])),
        )
        .await,
        billing_call,
    )
    .await;
    assert_refused(
        "cleartext HTTP/2",
        Channel::from_shared(format!("http://{}", h.data_addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await,
        billing_call,
    )
    .await;
    assert_eq!(
        h.service.calls(),
        0,
        "a refused client reached the upstream"
    );
    still_serves(&pki, &h).await;
    assert_eq!(h.service.calls(), 1);
}

#[tokio::test]
async fn the_api_port_requires_mtls_too() {
    let pki = Pki { ca: Ca::new() };
    let h = pki.sidecar().await;
    let health = |channel: Channel| async move {
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status())
    };
    let channel = pki
        .channel(h.api_addr, Some(pki.ca.leaf(vec![uri("privacy-office")])))
        .await
        .unwrap();
    assert_eq!(
        health(channel.clone()).await.unwrap(),
        ServingStatus::Serving
    );
    assert_refused(
        "no client certificate on the API port",
        pki.channel(h.api_addr, None).await,
        |channel| async move { health(channel).await.map(drop) },
    )
    .await;
    // Still up: the refusal was an answer.
    assert_eq!(health(channel).await.unwrap(), ServingStatus::Serving);
}

#[tokio::test]
async fn access_control_check_decides_for_the_peer_not_the_claimed_caller() {
    use pdgate::proto::v1::CheckRequest;
    use pdgate::proto::v1::access_control_client::AccessControlClient;
    let pki = Pki { ca: Ca::new() };
    let h = pki.sidecar().await;
    let channel = pki
        .channel(
            h.api_addr,
            Some(pki.ca.leaf(vec![uri("marketing-service")])),
        )
        .await
        .unwrap();
    let response = AccessControlClient::new(channel)
        .check(CheckRequest {
            caller: "billing-service".into(),
            purpose: "service.billing".into(),
            action: "read".into(),
            categories: vec!["customer.billing".into()],
            subjects: vec!["cust-1".into()],
            recipient: String::new(),
            minimizable: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !response.allowed,
        "marketing-service borrowed billing-service's identity"
    );
    assert_eq!(response.reasons[0].code, "PURPOSE_NOT_REGISTERED");
}

#[tokio::test]
async fn the_metrics_endpoint_is_behind_mtls_too() {
    use http_body::Body as _;
    use tower::ServiceExt;
    let pki = Pki { ca: Ca::new() };
    let h = pki.sidecar().await;
    // No plaintext: an HTTP/1 request to the TLS port gets no metrics.
    let mut plain = tokio::net::TcpStream::connect(h.api_addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut plain,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    // The TLS server answers cleartext with an alert and closes (or resets): either way the
    // read ends, and no HTTP answer came.
    let read = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::AsyncReadExt::read_to_end(&mut plain, &mut answer),
    )
    .await
    .expect("the TLS port closes a cleartext connection");
    println!(
        "cleartext HTTP/1 to the TLS API port: {read:?}, {} bytes back",
        answer.len()
    );
    assert!(
        !answer.starts_with(b"HTTP/"),
        "a cleartext request got an HTTP answer: {}",
        String::from_utf8_lossy(&answer)
    );

    // With a client certificate from the client CA, over HTTP/2 (TLS offers h2 only).
    let channel = pki
        .channel(h.api_addr, Some(pki.ca.leaf(vec![uri("billing-service")])))
        .await
        .unwrap();
    let request = http::Request::get("https://localhost/metrics")
        .body(tonic::body::Body::empty())
        .unwrap();
    let response = channel.oneshot(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        if let Ok(bytes) = frame.unwrap().into_data() {
            text.extend_from_slice(&bytes);
        }
    }
    assert!(
        String::from_utf8(text)
            .unwrap()
            .contains("# TYPE pdgate_decisions_total counter")
    );
    // Without a certificate: the handshake fails, or the request does, as for every API.
    let metrics = || {
        http::Request::get("https://localhost/metrics")
            .body(tonic::body::Body::empty())
            .unwrap()
    };
    match pki.channel(h.api_addr, None).await {
        Err(_) => println!("/metrics without a certificate: refused at the handshake"),
        Ok(channel) => match channel.oneshot(metrics()).await {
            Err(e) => {
                println!("/metrics without a certificate: refused at the first request ({e})")
            }
            Ok(response) => panic!(
                "a client without a certificate got an HTTP answer: {}",
                response.status()
            ),
        },
    }
    // Still up: the refusal was an answer.
    let channel = pki
        .channel(h.api_addr, Some(pki.ca.leaf(vec![uri("billing-service")])))
        .await
        .unwrap();
    assert_eq!(
        channel.oneshot(metrics()).await.unwrap().status(),
        http::StatusCode::OK
    );
}
