//! Envoy ext_authz v3 on pdgate's API port, called over a real socket with the envoy-types
//! client as Envoy would call it: the answer is the data plane's decision (same reasons for
//! the same call), allowed calls get the caller and decision id headers, denials carry the
//! reasons for Envoy to send back, malformed metadata is INVALID_ARGUMENT / HTTP 400, every
//! decision is audited; with mTLS the caller is Envoy's verified principal. And the example
//! configuration `deploy/envoy/envoy.yaml` fails closed and points at pdgate's API port.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::{Harness, Options, call};
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap as EnvoyHeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use pdgate::config::{DEFAULT_API_LISTEN, DEFAULT_UPSTREAM, DEFAULT_URI_PREFIX, TlsFiles};
use pdgate::proto::demo::{GetCallHistoryRequest, GetProfileRequest};
use prost::Message;
use std::collections::HashMap;
use std::path::Path;
use tonic::transport::Channel;
use tonic_types::{ErrorDetails, StatusExt};

const PROFILE: &str = "/demo.customer.v1.CustomerData/GetProfile";
const BILLING: &str = "/demo.customer.v1.CustomerData/GetBillingStatement";
const CALLS: &str = "/demo.customer.v1.CustomerData/GetCallHistory";

/// google.rpc.Code values Envoy reads from `CheckResponse.status`.
const OK: i32 = 0;
const INVALID_ARGUMENT: i32 = 3;
const PERMISSION_DENIED: i32 = 7;

// ---------------------------------------------------------------------------------------------
// Building requests and reading answers

/// A CheckRequest as Envoy's HTTP filter builds it: the headers map (repeated headers joined
/// by `,`), the path, and the source principal when the downstream connection was mTLS.
fn check(path: &str, headers: &[(&str, &str)], principal: &str) -> CheckRequest {
    let mut map: HashMap<String, String> = HashMap::new();
    for (k, v) in headers {
        map.entry((*k).to_owned())
            .and_modify(|joined| {
                joined.push(',');
                joined.push_str(v);
            })
            .or_insert_with(|| (*v).to_owned());
    }
    map.insert(":path".into(), path.into());
    map.insert(":method".into(), "POST".into());
    map.insert("content-type".into(), "application/grpc".into());
    // The first request message, as Envoy sends it with `with_request_body` (gRPC-framed
    // bytes): the demo's requests name their customer in field 1, and the subject the
    // metadata names is the one the message names.
    let subject = headers
        .iter()
        .find(|(k, _)| *k == "x-data-subject")
        .map_or("", |(_, v)| *v);
    let message = GetProfileRequest {
        customer_id: subject.to_owned(),
    }
    .encode_to_vec();
    let mut raw_body = vec![0];
    raw_body.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    raw_body.extend_from_slice(&message);
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                principal: principal.to_owned(),
                ..Peer::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: path.into(),
                    protocol: "HTTP/2".into(),
                    headers: map,
                    raw_body,
                    ..HttpRequest::default()
                }),
                ..Request::default()
            }),
            ..AttributeContext::default()
        }),
    }
}

/// The same, with `encode_raw_headers`: repeated headers stay apart, values are bytes.
fn check_raw(path: &str, headers: &[(&str, &[u8])]) -> CheckRequest {
    let mut request = check(path, &[], "");
    let http = request
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .unwrap();
    http.headers.clear();
    http.header_map = Some(EnvoyHeaderMap {
        headers: headers
            .iter()
            .map(|(k, v)| HeaderValue {
                key: (*k).to_owned(),
                value: String::new(),
                raw_value: v.to_vec(),
            })
            .collect(),
    });
    request
}

async fn client(addr: std::net::SocketAddr) -> AuthorizationClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    AuthorizationClient::new(channel)
}

async fn ask(client: &mut AuthorizationClient<Channel>, request: CheckRequest) -> CheckResponse {
    client.check(request).await.unwrap().into_inner()
}

/// What a CheckResponse says, flattened for assertions.
#[derive(Debug)]
struct Answer {
    code: i32,
    /// HTTP status of a denial; 0 when allowed.
    http_status: i32,
    body: String,
    /// Headers to add upstream (allowed) or to the local reply (denied).
    headers: HashMap<String, String>,
    response_headers: HashMap<String, String>,
    headers_to_remove: Vec<String>,
    status_details: Details,
}

/// The encoded google.rpc.Status; its bytes are not worth printing.
struct Details(Vec<u8>);

impl std::fmt::Debug for Details {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl Answer {
    fn of(response: CheckResponse) -> Self {
        let status = response.status.unwrap();
        let pairs = |options: &[envoy_types::ext_authz::v3::pb::HeaderValueOption]| {
            options
                .iter()
                .map(|o| {
                    let h = o.header.as_ref().unwrap();
                    // A client must not be able to add its own value beside pdgate's.
                    assert_eq!(
                        o.append_action, 2,
                        "`{}` must be OVERWRITE_IF_EXISTS_OR_ADD",
                        h.key
                    );
                    (h.key.clone(), h.value.clone())
                })
                .collect::<HashMap<_, _>>()
        };
        let mut answer = Answer {
            code: status.code,
            http_status: 0,
            body: String::new(),
            headers: HashMap::new(),
            response_headers: HashMap::new(),
            headers_to_remove: Vec::new(),
            status_details: Details(status.encode_to_vec()),
        };
        match response.http_response.unwrap() {
            HttpResponse::OkResponse(ok) => {
                answer.headers = pairs(&ok.headers);
                answer.response_headers = pairs(&ok.response_headers_to_add);
                answer.headers_to_remove = ok.headers_to_remove;
            }
            HttpResponse::DeniedResponse(denied) => {
                answer.http_status = denied.status.unwrap().code;
                answer.body = denied.body;
                answer.headers = pairs(&denied.headers);
            }
            other => panic!("unexpected http_response {other:?}"),
        }
        answer
    }

    fn header(&self, key: &str) -> &str {
        self.headers
            .get(key)
            .unwrap_or_else(|| panic!("no `{key}` in {:?}", self.headers))
    }

    /// The reason codes, from `x-pdgate-reasons`.
    fn reasons(&self) -> Vec<String> {
        self.header("x-pdgate-reasons")
            .split(',')
            .map(str::to_owned)
            .collect()
    }

    /// The `google.rpc.ErrorInfo` of the status in the CheckResponse.
    fn error_info(&self) -> tonic_types::ErrorInfo {
        let status = tonic::Status::with_details(
            tonic::Code::Unknown,
            "",
            self.status_details.0.clone().into(),
        );
        let details: ErrorDetails = status.get_error_details();
        details.error_info().cloned().unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// Decisions

#[tokio::test]
async fn an_allowed_call_gets_the_caller_and_the_decision_id_and_is_audited() {
    let mut h = Harness::start().await;
    let mut envoy = client(h.api_addr).await;
    let answer = Answer::of(
        ask(
            &mut envoy,
            check(
                // The service routes on the path alone: a query string changes nothing.
                &format!("{BILLING}?month=2024-05"),
                &[
                    ("x-caller", "billing-service"),
                    ("x-purpose", "service.billing"),
                    ("x-data-subject", "cust-1"),
                    ("x-pdgate-caller", "forged"),
                ],
                "",
            ),
        )
        .await,
    );
    assert_eq!(answer.code, OK, "{answer:?}");
    assert_eq!(answer.header("x-pdgate-caller"), "billing-service");
    let id = answer.header("x-pdgate-decision-id").to_owned();
    assert_eq!(id.len(), 36, "a UUID-shaped decision id: {id}");
    assert_eq!(
        answer.response_headers.get("x-pdgate-decision-id"),
        Some(&id)
    );
    // insecure-header mode: the service may read x-caller, as through the data plane.
    assert!(answer.headers_to_remove.is_empty());

    let record = h.audit_record(&id);
    assert_eq!(record.body.decision, "allow");
    assert_eq!(record.body.method.as_deref(), Some(BILLING));
    assert_eq!(record.body.caller, "billing-service");
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn client_sent_pdgate_headers_never_reach_the_upstream() {
    let mut h = Harness::start().await;
    let mut envoy = client(h.api_addr).await;
    let answer = Answer::of(
        ask(
            &mut envoy,
            check(
                BILLING,
                &[
                    ("x-caller", "billing-service"),
                    ("x-purpose", "service.billing"),
                    ("x-data-subject", "cust-1"),
                    ("x-pdgate-decision-id", "forged-decision"),
                    ("x-pdgate-anything", "forged"),
                ],
                "",
            ),
        )
        .await,
    );
    assert_eq!(answer.code, OK, "{answer:?}");
    // pdgate's own id, overwriting the client's (OVERWRITE_IF_EXISTS_OR_ADD, checked in
    // `Answer::of`), and the one with a record.
    let id = answer.header("x-pdgate-decision-id").to_owned();
    assert_ne!(id, "forged-decision");
    assert!(h.audit_records().iter().any(|r| r.body.decision_id == id));
    // Any other x-pdgate-* header the client sent is removed.
    assert_eq!(answer.headers_to_remove, ["x-pdgate-anything"]);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_denied_call_carries_the_reasons_as_the_data_plane_would() {
    let mut h = Harness::start().await;
    let mut envoy = client(h.api_addr).await;
    // §1(2): no consent to marketing e-mail for cust-1.
    let answer = Answer::of(
        ask(
            &mut envoy,
            check(
                PROFILE,
                &[
                    ("x-caller", "marketing-service"),
                    ("x-purpose", "marketing.email"),
                    ("x-data-subject", "cust-1"),
                ],
                "",
            ),
        )
        .await,
    );
    assert_eq!(answer.code, PERMISSION_DENIED, "{answer:?}");
    assert_eq!(answer.http_status, 403);
    assert_eq!(answer.reasons(), vec!["CONSENT_REQUIRED"]);
    assert!(answer.body.contains("CONSENT_REQUIRED"), "{}", answer.body);
    // Envoy keeps these in its local reply to a gRPC client: PERMISSION_DENIED with the
    // ErrorInfo, as pdgate's data plane answers.
    assert_eq!(answer.header("grpc-status"), "7");
    assert!(!answer.header("grpc-status-details-bin").is_empty());
    let info = answer.error_info();
    assert_eq!(info.reason, "CONSENT_REQUIRED");
    assert_eq!(info.domain, "pdgate");
    let id = answer.header("x-pdgate-decision-id");
    assert_eq!(
        info.metadata.get("decision_id").map(String::as_str),
        Some(id)
    );

    let record = h.audit_record(id);
    assert_eq!(record.body.decision, "deny");
    assert_eq!(record.body.reasons[0].code, "CONSENT_REQUIRED");
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unknown_method_is_denied_route_unknown() {
    let mut h = Harness::start().await;
    let mut envoy = client(h.api_addr).await;
    let answer = Answer::of(
        ask(
            &mut envoy,
            check(
                "/demo.customer.v1.CustomerData/DropAllTables",
                &[
                    ("x-caller", "billing-service"),
                    ("x-purpose", "service.billing"),
                    ("x-data-subject", "cust-1"),
                ],
                "",
            ),
        )
        .await,
    );
    assert_eq!(answer.code, PERMISSION_DENIED);
    assert_eq!(answer.http_status, 403);
    assert_eq!(answer.reasons(), vec!["ROUTE_UNKNOWN"]);
    assert!(answer.headers.contains_key("x-pdgate-decision-id"));
    h.shutdown().await.unwrap();
}

/// Malformed metadata is `INVALID_ARGUMENT` with HTTP 400 (not a denial: nothing was decided),
/// and `grpc-status: 3` so that a gRPC client behind Envoy sees INVALID_ARGUMENT as from the
/// data plane (Envoy would otherwise map 400 to INTERNAL).
#[tokio::test]
async fn malformed_metadata_is_invalid_argument() {
    let mut h = Harness::start().await;
    let mut envoy = client(h.api_addr).await;
    let two_purposes = [
        ("x-caller", "billing-service"),
        ("x-purpose", "service.billing"),
        ("x-purpose", "marketing"),
    ];
    // Joined by Envoy into one map entry, and kept apart with raw headers.
    let raw: Vec<(&str, &[u8])> = two_purposes
        .iter()
        .map(|(k, v)| (*k, v.as_bytes()))
        .collect();
    for request in [check(BILLING, &two_purposes, ""), check_raw(BILLING, &raw)] {
        let answer = Answer::of(ask(&mut envoy, request).await);
        assert_eq!(answer.code, INVALID_ARGUMENT, "{answer:?}");
        assert_eq!(answer.http_status, 400);
        assert_eq!(answer.header("grpc-status"), "3");
        assert!(answer.body.contains("x-purpose"), "{}", answer.body);
        assert!(answer.headers.contains_key("x-pdgate-decision-id"));
    }
    // Non-UTF-8 bytes, and a request without HTTP attributes (the network filter).
    let answer = Answer::of(
        ask(
            &mut envoy,
            check_raw(
                BILLING,
                &[("x-caller", b"billing-service"), ("x-purpose", b"caf\xe9")],
            ),
        )
        .await,
    );
    assert_eq!(answer.code, INVALID_ARGUMENT);
    let answer = Answer::of(ask(&mut envoy, CheckRequest::default()).await);
    assert_eq!(answer.code, INVALID_ARGUMENT);
    assert_eq!(answer.http_status, 400);
    h.shutdown().await.unwrap();
}

/// For the same call, Envoy's answer is the data plane's decision: allowed or denied alike,
/// with the same reason codes.
#[tokio::test]
async fn envoy_and_the_data_plane_decide_alike() {
    let mut h = Harness::start().await;
    let mut envoy = client(h.api_addr).await;
    let mut data = h.client().await;
    let cases: [(&str, &str, &str, &[&str]); 9] = [
        (PROFILE, "support-service", "service.support", &["cust-1"]),
        (PROFILE, "marketing-service", "marketing.email", &["cust-2"]),
        (PROFILE, "marketing-service", "marketing.email", &["cust-1"]),
        (
            PROFILE,
            "marketing-service",
            "marketing.email",
            &["cust-2", "cust-3"],
        ),
        (
            PROFILE,
            "analytics-service",
            "research.statistics",
            &["cust-1"],
        ),
        (PROFILE, "nobody", "service.support", &["cust-1"]),
        (PROFILE, "support-service", "", &["cust-1"]),
        (CALLS, "marketing-service", "marketing", &["cust-2"]),
        (CALLS, "fraud-service", "fraud.investigation", &["cust-3"]),
    ];
    let (mut allowed, mut denied) = (0, 0);
    for (path, caller, purpose, subjects) in cases {
        let via_data = if path == PROFILE {
            data.get_profile(call(
                GetProfileRequest {
                    customer_id: subjects[0].into(),
                },
                caller,
                purpose,
                subjects,
            ))
            .await
            .map(|_| ())
        } else {
            data.get_call_history(call(
                GetCallHistoryRequest {
                    customer_id: subjects[0].into(),
                },
                caller,
                purpose,
                subjects,
            ))
            .await
            .map(|_| ())
        };
        let data_reasons: Vec<String> = match &via_data {
            Ok(()) => Vec::new(),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
                let info = status.get_error_details().error_info().cloned().unwrap();
                info.metadata["reasons"]
                    .split(',')
                    .map(str::to_owned)
                    .collect()
            }
        };
        let mut headers = vec![("x-caller", caller)];
        if !purpose.is_empty() {
            headers.push(("x-purpose", purpose));
        }
        for s in subjects {
            headers.push(("x-data-subject", s));
        }
        let answer = Answer::of(ask(&mut envoy, check(path, &headers, "")).await);
        let label = format!("{caller} {purpose} {subjects:?} {path}");
        if data_reasons.is_empty() {
            assert_eq!(
                answer.code, OK,
                "{label}: the data plane allowed: {answer:?}"
            );
            allowed += 1;
        } else {
            assert_eq!(answer.code, PERMISSION_DENIED, "{label}");
            assert_eq!(answer.reasons(), data_reasons, "{label}");
            denied += 1;
        }
    }
    // The cases cover both outcomes and several stages.
    assert!(
        allowed >= 2 && denied >= 5,
        "allowed {allowed}, denied {denied}"
    );
    h.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// mTLS: the caller is the principal Envoy verified

#[tokio::test]
async fn with_mtls_the_principal_names_the_caller_and_x_caller_is_ignored() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let ca = common::tls::Ca::new();
    let (cert, key) = ca.leaf(vec![common::tls::dns("localhost")]);
    let mut h = Harness::with(Options {
        tls: Some(TlsFiles {
            cert_pem: cert.into_bytes(),
            key_pem: key.into_bytes(),
            client_ca_pem: ca.pem().into_bytes(),
            uri_prefix: DEFAULT_URI_PREFIX.to_owned(),
            dns_suffix: Some("svc.cluster.local".to_owned()),
            reload: None,
        }),
        ..Options::default()
    })
    .await;
    // Envoy itself presents a certificate from the client CA to reach the API port.
    let (envoy_cert, envoy_key) = ca.leaf(vec![common::tls::dns("envoy")]);
    let channel = Channel::from_shared(format!("https://{}", h.api_addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca.pem()))
                .domain_name("localhost")
                .identity(Identity::from_pem(envoy_cert, envoy_key)),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut envoy = AuthorizationClient::new(channel);
    let billing = |principal: &str| {
        check(
            BILLING,
            &[
                // Claims another caller: ignored with mTLS.
                ("x-caller", "fraud-service"),
                ("x-purpose", "service.billing"),
                ("x-data-subject", "cust-1"),
            ],
            principal,
        )
    };

    for principal in [
        format!("{DEFAULT_URI_PREFIX}billing-service"),
        "billing-service.svc.cluster.local".to_owned(),
    ] {
        let answer = Answer::of(ask(&mut envoy, billing(&principal)).await);
        assert_eq!(answer.code, OK, "{principal}: {answer:?}");
        assert_eq!(answer.header("x-pdgate-caller"), "billing-service");
        // The service learns the authorized caller, not the claim.
        assert_eq!(answer.headers_to_remove, vec!["x-caller"]);
    }
    // A principal outside the URI prefix names no caller, whatever x-caller claims: it is
    // CALLER_UNKNOWN, and the reason names it.
    let answer = Answer::of(
        ask(
            &mut envoy,
            billing("spiffe://elsewhere.example/ns/x/sa/billing-service"),
        )
        .await,
    );
    assert_eq!(answer.code, PERMISSION_DENIED);
    assert_eq!(answer.reasons(), vec!["CALLER_UNKNOWN"]);
    assert!(
        answer.body.contains("spiffe://elsewhere.example/"),
        "{}",
        answer.body
    );
    // No principal (a plaintext downstream): no caller.
    let answer = Answer::of(ask(&mut envoy, billing("")).await);
    assert_eq!(answer.reasons(), vec!["CALLER_UNKNOWN"]);
    h.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The example Envoy configuration

fn envoy_yaml() -> serde_yaml::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy/envoy.yaml");
    serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every mapping in `value` (depth first) that has `key`.
fn with_key<'a>(value: &'a serde_yaml::Value, key: &str, out: &mut Vec<&'a serde_yaml::Value>) {
    match value {
        serde_yaml::Value::Mapping(m) => {
            if m.contains_key(key) {
                out.push(value);
            }
            for v in m.values() {
                with_key(v, key, out);
            }
        }
        serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| with_key(v, key, out)),
        _ => {}
    }
}

fn port_of(value: &str) -> u64 {
    value.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// The port of the cluster named `name`.
fn cluster_port(config: &serde_yaml::Value, name: &str) -> u64 {
    let clusters = config["static_resources"]["clusters"]
        .as_sequence()
        .unwrap();
    let cluster = clusters
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no cluster `{name}`"));
    let mut ports = Vec::new();
    with_key(cluster, "port_value", &mut ports);
    assert_eq!(ports.len(), 1, "cluster `{name}` has one endpoint");
    ports[0]["port_value"].as_u64().unwrap()
}

#[test]
fn the_example_envoy_config_fails_closed_and_asks_pdgates_api_port() {
    let config = envoy_yaml();
    let mut filters = Vec::new();
    with_key(&config, "name", &mut filters);
    let ext_authz: Vec<_> = filters
        .into_iter()
        .filter(|f| f["name"].as_str() == Some("envoy.filters.http.ext_authz"))
        .collect();
    assert_eq!(ext_authz.len(), 1, "one ext_authz filter");
    let authz = &ext_authz[0]["typed_config"];
    assert_eq!(
        authz["@type"].as_str(),
        Some("type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz")
    );
    assert_eq!(authz["transport_api_version"].as_str(), Some("V3"));
    // Written out, not left to a default: a failing pdgate must deny.
    assert_eq!(authz["failure_mode_allow"].as_bool(), Some(false));
    // pdgate reads the request's subjects from its first message: Envoy must send it whole,
    // as bytes (a partial message would be refused).
    let body = &authz["with_request_body"];
    assert_eq!(body["pack_as_bytes"].as_bool(), Some(true));
    assert_eq!(body["allow_partial_message"].as_bool(), Some(false));
    assert!(
        body["max_request_bytes"]
            .as_u64()
            .is_some_and(|n| n >= 4096)
    );
    let allowed: Vec<&str> = authz["allowed_headers"]["patterns"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["exact"].as_str().unwrap())
        .collect();
    for header in ["x-purpose", "x-data-subject", "x-recipient"] {
        assert!(allowed.contains(&header), "pdgate reads `{header}`");
    }

    let cluster = authz["grpc_service"]["envoy_grpc"]["cluster_name"]
        .as_str()
        .unwrap();
    assert_eq!(cluster_port(&config, cluster), port_of(DEFAULT_API_LISTEN));
    // pdgate's API port is mTLS in production (identity = "mtls"): Envoy needs a client
    // certificate to reach it.
    let clusters = config["static_resources"]["clusters"]
        .as_sequence()
        .unwrap();
    let api = clusters
        .iter()
        .find(|c| c["name"].as_str() == Some(cluster))
        .unwrap();
    assert_eq!(
        api["transport_socket"]["name"].as_str(),
        Some("envoy.transport_sockets.tls")
    );

    // Allowed calls go to the data service on loopback, where pdgate's `upstream` would be.
    let mut routes = Vec::new();
    with_key(&config, "route", &mut routes);
    let targets: Vec<&str> = routes
        .iter()
        .filter_map(|r| r["route"]["cluster"].as_str())
        .collect();
    assert_eq!(targets, vec!["customer_data"]);
    assert_eq!(
        cluster_port(&config, "customer_data"),
        port_of(DEFAULT_UPSTREAM)
    );
}
