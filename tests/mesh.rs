//! `identity = "mesh"` over real sockets: the caller is taken from the mesh proxy's
//! verified-peer header — Envoy/Istio's `x-forwarded-client-cert`, Linkerd's `l5d-client-id`,
//! shaped as those proxies send them — only on connections from a configured proxy address.
//! The client binds its socket to a loopback address of its choosing (127.0.0.6 is where
//! Istio's sidecar connects from), so "from the proxy" and "from anywhere else" are two real
//! connections. Every refusal is `PERMISSION_DENIED` with reason `CALLER_UNKNOWN`, a decision
//! id, and an audit record saying why; nothing refused reaches the service.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::raw::{billing, frame};
use common::{Harness, Options};
use pdgate::config::FileConfig;
use pdgate::identity::{MeshHeader, MeshIdentity};
use std::net::{IpAddr, SocketAddr};
use tonic::Code;

const XFCC: &str = "x-forwarded-client-cert";
const L5D: &str = "l5d-client-id";
const ISTIO_PROXY: &str = "127.0.0.6";

fn istio() -> MeshIdentity {
    MeshIdentity {
        header: MeshHeader::ForwardedClientCert,
        proxies: vec![ISTIO_PROXY.parse().unwrap()],
        uri_prefix: Some("spiffe://cluster.local/ns/shop/sa/".into()),
        dns_suffix: None,
    }
}

fn linkerd() -> MeshIdentity {
    MeshIdentity {
        header: MeshHeader::LinkerdClientId,
        proxies: vec!["127.0.0.1".parse().unwrap()],
        uri_prefix: None,
        dns_suffix: Some("shop.serviceaccount.identity.linkerd.cluster.local".into()),
    }
}

/// The header Istio's sidecar sets on an inbound request (`forward_client_cert_details:
/// APPEND_FORWARD`): the element it appends last, naming the workload (`By`), the peer
/// certificate's hash, its subject (empty for Istio's certificates) and its URI SAN.
fn istio_xfcc(service_account: &str) -> String {
    format!(
        "By=spiffe://cluster.local/ns/shop/sa/customer-data;Hash=8a8f5b2e3c1d7f9a0b4c6e2d1f3a5b7c9e0d2f4a6b8c0e1d3f5a7b9c1e3d5f7a;Subject=\"\";URI=spiffe://cluster.local/ns/shop/sa/{service_account}"
    )
}

/// One gRPC call (billing-service's statement of cust-1, purpose `service.billing`) to `to`,
/// over a TCP connection bound to `source`, with `headers` besides the call's own. Returns
/// the status and the decision id pdgate answered with.
async fn call_from(
    source: &str,
    to: SocketAddr,
    headers: &[(&str, &str)],
) -> (tonic::Status, Option<String>) {
    let (status, id, _) = grpc_from(
        source,
        to,
        "/demo.customer.v1.CustomerData/GetBillingStatement",
        headers,
        frame(&billing("cust-1")),
    )
    .await;
    (status, id)
}

/// One unary gRPC call of `method` with the framed `message`, over a TCP connection bound to
/// `source`: the status, the decision id and the response body.
async fn grpc_from(
    source: &str,
    to: SocketAddr,
    method: &str,
    headers: &[(&str, &str)],
    message: bytes::Bytes,
) -> (tonic::Status, Option<String>, Vec<u8>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    let tcp = socket.connect(to).await.unwrap();
    assert_eq!(
        tcp.local_addr().unwrap().ip(),
        source.parse::<IpAddr>().unwrap()
    );
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://pdgate{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-purpose", "service.billing")
        .header("x-data-subject", "cust-1");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut send) = client
        .send_request(request.body(()).unwrap(), false)
        .unwrap();
    send.send_data(message, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let id = response
        .headers()
        .get("x-pdgate-decision-id")
        .map(|v| v.to_str().unwrap().to_owned());
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return (status, id, Vec::new());
    }
    let mut body = response.into_body();
    let mut received = Vec::new();
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
        received.extend_from_slice(&data);
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    (
        tonic::Status::from_header_map(&trailers).unwrap(),
        id,
        received,
    )
}

async fn harness(mesh: MeshIdentity) -> Harness {
    Harness::with(Options {
        mesh: Some(mesh),
        ..Options::default()
    })
    .await
}

/// The audit record of decision `id`.
fn record(h: &Harness, id: &str) -> pdgate::audit::RecordBody {
    h.audit_records()
        .into_iter()
        .find(|r| r.body.decision_id == id)
        .unwrap_or_else(|| panic!("no audit record for {id}"))
        .body
}

#[tokio::test]
async fn istio_header_from_the_proxy_names_the_caller_and_from_elsewhere_is_refused() {
    let mut h = harness(istio()).await;
    let header = istio_xfcc("billing-service");

    // From the proxy's address: the caller is the URI SAN's service account.
    let (status, id) = call_from(ISTIO_PROXY, h.data_addr, &[(XFCC, &header)]).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    let allowed = record(&h, &id.unwrap());
    assert_eq!(allowed.caller, "billing-service");
    assert_eq!(allowed.decision, "allow");
    assert_eq!(h.service.calls(), 1);

    // The same header from another local address: not the proxy, whatever it claims.
    let (status, id) = call_from("127.0.0.2", h.data_addr, &[(XFCC, &header)]).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(common::reason(&status), "CALLER_UNKNOWN");
    assert!(
        status.message().contains("127.0.0.2"),
        "{}",
        status.message()
    );
    let refused = record(&h, &id.expect("a refusal has a decision id"));
    assert_eq!(refused.decision, "deny");
    assert_eq!(refused.caller, "");
    assert!(
        refused
            .detail
            .as_deref()
            .unwrap()
            .contains("not a configured mesh proxy"),
        "{refused:?}"
    );
    // x-caller names no one in mesh mode, from anywhere.
    let (status, _) = call_from(
        "127.0.0.2",
        h.data_addr,
        &[(XFCC, &header), ("x-caller", "billing-service")],
    )
    .await;
    assert_eq!(status.code(), Code::PermissionDenied);
    let (status, _) = call_from(ISTIO_PROXY, h.data_addr, &[("x-caller", "billing-service")]).await;
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(h.service.calls(), 1, "no refused call reached the service");
    h.shutdown().await.unwrap();
}

/// `AccessControl.Check` on the API port: the decision is for the peer the mesh names,
/// whatever the request says, and from anywhere but the proxy for nobody.
#[tokio::test]
async fn check_decides_for_the_mesh_peer_only_from_the_proxy() {
    use pdgate::proto::v1::{CheckRequest, CheckResponse};
    use prost::Message;
    let mut h = harness(istio()).await;
    let request = CheckRequest {
        caller: "fraud-service".into(),
        purpose: "service.billing".into(),
        action: "read".into(),
        categories: vec!["customer.billing".into()],
        subjects: vec!["cust-1".into()],
        ..Default::default()
    };
    let check = |source: &'static str, headers: Vec<(&'static str, String)>| {
        let (request, api) = (request.clone(), h.api_addr);
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let (status, _, body) = grpc_from(
                source,
                api,
                "/pdgate.v1.AccessControl/Check",
                &headers,
                frame(&request),
            )
            .await;
            assert_eq!(status.code(), Code::Ok, "{status:?}");
            CheckResponse::decode(&body[5..]).unwrap()
        }
    };
    let from_proxy = check(ISTIO_PROXY, vec![(XFCC, istio_xfcc("billing-service"))]).await;
    assert!(from_proxy.allowed, "{from_proxy:?}");
    assert_eq!(
        record(&h, &from_proxy.decision_id).caller,
        "billing-service"
    );

    let elsewhere = check("127.0.0.2", vec![(XFCC, istio_xfcc("billing-service"))]).await;
    assert!(!elsewhere.allowed);
    assert_eq!(elsewhere.reasons[0].code, "CALLER_UNKNOWN");
    assert!(
        elsewhere.reasons[0]
            .detail
            .contains("not a configured mesh proxy")
    );
    h.shutdown().await.unwrap();
}

/// From the proxy, a header that does not name one peer is refused: missing, given twice,
/// malformed, with no URI SAN, or naming a peer of another namespace.
#[tokio::test]
async fn a_missing_repeated_or_malformed_header_is_refused() {
    let mut h = harness(istio()).await;
    let good = istio_xfcc("billing-service");
    // (what, the headers sent, what the refusal says)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 6] = [
        ("missing", vec![], "has no `x-forwarded-client-cert`"),
        (
            "repeated",
            vec![(XFCC, &good), (XFCC, &good)],
            "given 2 times",
        ),
        (
            "unterminated quote",
            vec![(
                XFCC,
                "By=spiffe://cluster.local/ns/shop/sa/customer-data;Subject=\"CN=x;URI=spiffe://cluster.local/ns/shop/sa/billing-service",
            )],
            "unterminated quote",
        ),
        (
            "no URI",
            vec![(
                XFCC,
                "By=spiffe://cluster.local/ns/shop/sa/customer-data;Hash=8a8f;Subject=\"CN=billing-service\"",
            )],
            "no `URI`",
        ),
        (
            "another namespace",
            vec![(
                XFCC,
                "By=spiffe://cluster.local/ns/shop/sa/customer-data;Hash=8a8f;URI=spiffe://cluster.local/ns/other/sa/billing-service",
            )],
            "not under",
        ),
        (
            "unknown key",
            vec![(
                XFCC,
                "By=x;Hash=1;Issuer=y;URI=spiffe://cluster.local/ns/shop/sa/billing-service",
            )],
            "unknown key",
        ),
    ];
    for (what, headers, says) in cases {
        let (status, id) = call_from(ISTIO_PROXY, h.data_addr, &headers).await;
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
        assert_eq!(common::reason(&status), "CALLER_UNKNOWN", "{what}");
        assert!(
            status.message().contains(says),
            "{what}: {}",
            status.message()
        );
        let refused = record(&h, &id.unwrap());
        assert!(refused.detail.unwrap().contains(says), "{what}");
    }
    // A forged element before the proxy's own: the proxy's (last) one names the caller.
    let forged = format!(
        "By=spiffe://cluster.local/ns/shop/sa/customer-data;URI=spiffe://cluster.local/ns/shop/sa/fraud-service,{}",
        istio_xfcc("billing-service")
    );
    let (status, id) = call_from(ISTIO_PROXY, h.data_addr, &[(XFCC, &forged)]).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    assert_eq!(record(&h, &id.unwrap()).caller, "billing-service");
    assert_eq!(h.service.calls(), 1);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn linkerd_client_id_from_the_proxy_names_the_caller_and_from_elsewhere_is_refused() {
    let mut h = harness(linkerd()).await;
    let id_header = "billing-service.shop.serviceaccount.identity.linkerd.cluster.local";
    let (status, id) = call_from("127.0.0.1", h.data_addr, &[(L5D, id_header)]).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    assert_eq!(record(&h, &id.unwrap()).caller, "billing-service");

    let (status, _) = call_from("127.0.0.3", h.data_addr, &[(L5D, id_header)]).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(common::reason(&status), "CALLER_UNKNOWN");
    // An XFCC header means nothing to a Linkerd configuration.
    let (status, _) = call_from(
        "127.0.0.1",
        h.data_addr,
        &[(XFCC, &istio_xfcc("billing-service"))],
    )
    .await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(h.service.calls(), 1);
    h.shutdown().await.unwrap();
}

/// The configuration names what is wrong with `[mesh]`, and which key.
#[test]
fn mesh_configuration_is_validated_with_clear_errors() {
    let policy = common::policy_dir();
    let resolve = |text: &str| {
        let text = format!("policy = {:?}\n{text}", policy.display().to_string());
        let file: FileConfig = toml::from_str(&text).unwrap();
        file.resolve("pdgate.toml")
    };
    let ok = resolve(
        "identity = \"mesh\"\n[mesh]\nheader = \"x-forwarded-client-cert\"\nproxies = [\"127.0.0.6\"]\nuri_prefix = \"spiffe://cluster.local/ns/shop/sa/\"\n",
    )
    .unwrap();
    assert_eq!(ok.mesh, Some(istio()));
    let ok = resolve(
        "identity = \"mesh\"\n[mesh]\nheader = \"l5d-client-id\"\nproxies = [\"127.0.0.1\"]\ndns_suffix = \"shop.serviceaccount.identity.linkerd.cluster.local\"\n",
    )
    .unwrap();
    assert_eq!(ok.mesh, Some(linkerd()));

    for (text, key, says) in [
        ("identity = \"mesh\"\n", "mesh.header", "is required"),
        (
            "identity = \"mesh\"\n[mesh]\nheader = \"x-client-id\"\n",
            "mesh.header",
            "`x-client-id` is not a mesh identity header",
        ),
        (
            "identity = \"mesh\"\n[mesh]\nheader = \"l5d-client-id\"\n",
            "mesh.proxies",
            "is required",
        ),
        (
            "identity = \"mesh\"\n[mesh]\nheader = \"l5d-client-id\"\nproxies = [\"127.0.0.1:4143\"]\n",
            "mesh.proxies",
            "`127.0.0.1:4143` is not an IP address",
        ),
        (
            "identity = \"mesh\"\n[mesh]\nheader = \"l5d-client-id\"\nproxies = [\"0.0.0.0\"]\n",
            "mesh.proxies",
            "not one host's address",
        ),
        (
            "identity = \"mesh\"\n[mesh]\nheader = \"x-forwarded-client-cert\"\nproxies = [\"127.0.0.6\"]\n",
            "mesh.uri_prefix",
            "is required",
        ),
        (
            "identity = \"mesh\"\n[mesh]\nheader = \"l5d-client-id\"\nproxies = [\"127.0.0.1\"]\nuri_prefix = \"spiffe://x/\"\ndns_suffix = \"a.b\"\n",
            "mesh.uri_prefix",
            "applies only with",
        ),
        (
            "identity = \"mesh\"\n[mesh]\nheader = \"l5d-client-id\"\nproxies = [\"127.0.0.1\"]\ndns_suffix = \".shop.serviceaccount\"\n",
            "mesh.dns_suffix",
            "not a DNS name",
        ),
        (
            "identity = \"mtls\"\n[mesh]\nheader = \"l5d-client-id\"\n",
            "mesh",
            "`identity` is `mtls`",
        ),
        (
            "identity = \"mesh\"\n[tls]\ncert = \"c.pem\"\n[mesh]\nheader = \"l5d-client-id\"\nproxies = [\"127.0.0.1\"]\ndns_suffix = \"a.b\"\n",
            "tls",
            "mesh's proxy terminates",
        ),
    ] {
        let e = resolve(text).unwrap_err();
        assert_eq!(e.key, key, "{text}: {e}");
        assert!(e.message.contains(says), "{text}: {e}");
    }
}
