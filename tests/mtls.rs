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

use common::{Harness, Options, call, reason};
use pdgate::config::{DEFAULT_URI_PREFIX, TlsFiles};
use pdgate::proto::demo::customer_data_client::CustomerDataClient;
use pdgate::proto::demo::{DisclosureRequest, GetBillingStatementRequest, GetProfileRequest};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use std::time::Duration;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate with these SANs: (cert PEM, key PEM).
    fn leaf(&self, sans: Vec<SanType>) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn uri(caller: &str) -> SanType {
    SanType::URI(format!("{DEFAULT_URI_PREFIX}{caller}").try_into().unwrap())
}

fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().unwrap())
}

struct Pki {
    ca: Ca,
}

impl Pki {
    async fn sidecar(&self) -> Harness {
        let (cert, key) = self.ca.leaf(vec![dns("localhost")]);
        Harness::with(Options {
            tls: Some(TlsFiles {
                cert_pem: cert.into_bytes(),
                key_pem: key.into_bytes(),
                client_ca_pem: self.ca.pem().into_bytes(),
                uri_prefix: DEFAULT_URI_PREFIX.to_owned(),
                dns_suffix: Some("callers.pdgate.local".to_owned()),
            }),
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

#[tokio::test]
async fn a_client_without_a_valid_certificate_is_refused() {
    let pki = Pki { ca: Ca::new() };
    let h = pki.sidecar().await;
    // No client certificate: the handshake fails, or the first call does.
    if let Ok(channel) = pki.channel(h.data_addr, None).await {
        let result = CustomerDataClient::new(channel)
            .get_billing_statement(billing("billing-service"))
            .await;
        assert!(result.is_err(), "a client without a certificate was served");
    }
    // A certificate from another CA.
    let stranger = Ca::new();
    if let Ok(channel) = pki
        .channel(
            h.data_addr,
            Some(stranger.leaf(vec![uri("billing-service")])),
        )
        .await
    {
        let result = CustomerDataClient::new(channel)
            .get_billing_statement(billing("billing-service"))
            .await;
        assert!(
            result.is_err(),
            "a client with a foreign certificate was served"
        );
    }
    // Plain HTTP/2 without TLS.
    if let Ok(channel) = Channel::from_shared(format!("http://{}", h.data_addr))
        .unwrap()
        .connect()
        .await
    {
        let result = CustomerDataClient::new(channel)
            .get_billing_statement(billing("billing-service"))
            .await;
        assert!(result.is_err(), "a cleartext client was served");
    }
    assert_eq!(h.service.calls(), 0);
}

#[tokio::test]
async fn the_api_port_requires_mtls_too() {
    let pki = Pki { ca: Ca::new() };
    let h = pki.sidecar().await;
    let channel = pki
        .channel(h.api_addr, Some(pki.ca.leaf(vec![uri("privacy-office")])))
        .await
        .unwrap();
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(status.get_ref().status(), ServingStatus::Serving);
    if let Ok(channel) = pki.channel(h.api_addr, None).await {
        assert!(
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new()
                })
                .await
                .is_err()
        );
    }
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
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut plain, &mut answer),
    )
    .await;
    assert!(!String::from_utf8_lossy(&answer).contains("pdgate_decisions_total"));

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
    if let Ok(channel) = pki.channel(h.api_addr, None).await {
        let request = http::Request::get("https://localhost/metrics")
            .body(tonic::body::Body::empty())
            .unwrap();
        assert!(
            channel.oneshot(request).await.is_err(),
            "a client without a certificate read the metrics"
        );
    }
}
