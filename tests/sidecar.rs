//! The sidecar over real sockets: every streaming kind allowed and denied, a denied call never
//! reaches the upstream, metadata and deadlines pass through, cancellation and shutdown,
//! unknown routes, malformed metadata, an upstream that is down, overload, health and the
//! AccessControl API.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::wait::eventually;
use common::{Harness, Options, call, decision_id, reason};
use pdgate::proto::demo::{
    ContactUpdate, ExportRequest, GetBillingStatementRequest, GetProfileRequest, Profile,
    SupportMessage,
};
use pdgate::proto::v1::access_control_client::AccessControlClient;
use pdgate::proto::v1::{BatchCheckRequest, CheckRequest};
use std::time::Duration;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn unary_allowed_passes_metadata_and_carries_the_decision_id() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let mut request = call(
        GetBillingStatementRequest {
            customer_id: "cust-1".into(),
            month: String::new(),
        },
        "billing-service",
        "service.billing",
        &["cust-1"],
    );
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request
        .metadata_mut()
        .insert("x-pdgate-caller", "forged".parse().unwrap());
    let response = client.get_billing_statement(request).await.unwrap();
    assert!(response.get_ref().amount_yen > 0);
    assert!(decision_id(response.metadata()).is_some_and(|id| id.len() == 36));
    assert_eq!(h.service.calls(), 1);
    assert_eq!(
        h.service.last_metadata("traceparent").as_deref(),
        Some(traceparent)
    );
    assert_eq!(
        h.service.last_metadata("x-purpose").as_deref(),
        Some("service.billing")
    );
    // The upstream learns the caller pdgate authorized, never a value the caller sent.
    assert_eq!(
        h.service.last_metadata("x-pdgate-caller").as_deref(),
        Some("billing-service")
    );
}

#[tokio::test]
async fn unary_denied_never_reaches_the_upstream() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let status = client
        .get_profile(call(
            GetProfileRequest {
                customer_id: "cust-1".into(),
            },
            "marketing-service",
            "marketing.email",
            &["cust-1"],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "CONSENT_REQUIRED");
    // The clause, as the status details carry it (clients branch on those, not on the text).
    let details = tonic_types::StatusExt::get_error_details(&status);
    let info = details.error_info().expect("an ErrorInfo detail");
    assert_eq!(info.metadata["reasons"], "CONSENT_REQUIRED", "{info:?}");
    assert_eq!(info.metadata["clauses"], "§1(2)", "{info:?}");
    assert!(decision_id(status.metadata()).is_some());
    assert_eq!(h.service.calls(), 0, "a denied call reached the upstream");
}

#[tokio::test]
async fn server_streaming_allowed_and_denied() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let export = || ExportRequest {
        recipient: "ntt-east".into(),
        delay_ms: 0,
    };
    let mut stream = client
        .export_for_interconnect(call(
            export(),
            "ntt-east",
            "third_party.interconnect",
            &["cust-1", "cust-2"],
        ))
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(record) = stream.message().await.unwrap() {
        ids.push(record.customer_id);
    }
    assert_eq!(ids, vec!["cust-1", "cust-2"]);
    assert_eq!(h.service.calls(), 1);

    // cust-4 asked to stop third-party provision: the export goes on without her record
    // (tests/inspect.rs follows the records' decisions into the audit log).
    for subjects in [&["cust-1", "cust-4"][..], &["cust-1,cust-4"]] {
        let mut stream = client
            .export_for_interconnect(call(
                export(),
                "ntt-east",
                "third_party.interconnect",
                subjects,
            ))
            .await
            .unwrap()
            .into_inner();
        let mut ids = Vec::new();
        while let Some(record) = stream.message().await.unwrap() {
            ids.push(record.customer_id);
        }
        assert_eq!(ids, vec!["cust-1"], "{subjects:?}");
    }
    assert_eq!(h.service.calls(), 3);
    // A caller the policy does not grant the export is refused before the service sees it.
    let status = client
        .export_for_interconnect(call(
            export(),
            "softbank",
            "third_party.interconnect",
            &["cust-1"],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(h.service.calls(), 3);
}

#[tokio::test]
async fn client_streaming_allowed_and_denied() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let updates = || {
        tokio_stream::iter(vec![
            ContactUpdate {
                customer_id: "cust-1".into(),
                email: "new@example.jp".into(),
                ..Default::default()
            },
            ContactUpdate {
                customer_id: "cust-2".into(),
                phone: "090-0000-0099".into(),
                ..Default::default()
            },
        ])
    };
    let summary = client
        .import_contacts(call(
            updates(),
            "provisioning-service",
            "service.provision",
            &["cust-1", "cust-2"],
        ))
        .await
        .unwrap();
    assert_eq!(summary.get_ref().updated, 2);
    let status = client
        .import_contacts(call(
            updates(),
            "billing-service",
            "service.billing",
            &["cust-1", "cust-2"],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "NO_GRANT");
    assert_eq!(h.service.calls(), 1);
}

#[tokio::test]
async fn bidirectional_streaming_allowed_and_denied() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let messages = || {
        tokio_stream::iter(vec![
            SupportMessage {
                customer_id: "cust-1".into(),
                text: "my router blinks".into(),
            },
            SupportMessage {
                customer_id: "cust-1".into(),
                text: "still blinking".into(),
            },
        ])
    };
    let mut replies = client
        .support_session(call(
            messages(),
            "support-service",
            "service.support",
            &["cust-1"],
        ))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while replies.message().await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 2);
    let status = client
        .support_session(call(messages(), "support-service", "", &["cust-1"]))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "PURPOSE_NOT_DECLARED");
    assert_eq!(h.service.calls(), 1);
}

#[tokio::test]
async fn a_method_without_a_route_is_denied() {
    let h = Harness::start().await;
    let channel = h.channel(h.data_addr).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<GetProfileRequest, Profile>::default();
    let status = grpc
        .unary(
            call(
                GetProfileRequest {
                    customer_id: "cust-1".into(),
                },
                "privacy-office",
                "subject_request.deletion",
                &["cust-1"],
            ),
            http::uri::PathAndQuery::from_static("/demo.customer.v1.CustomerData/DeleteEverything"),
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "ROUTE_UNKNOWN");
    assert_eq!(h.service.calls(), 0);
}

#[tokio::test]
async fn malformed_metadata_is_invalid_argument() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let mut request = call(
        GetProfileRequest {
            customer_id: "cust-1".into(),
        },
        "support-service",
        "service.support",
        &["cust-1"],
    );
    request
        .metadata_mut()
        .append("x-purpose", "marketing".parse().unwrap());
    let status = client.get_profile(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // Refused and recorded as such: the record of the answer's decision id says why.
    let id = decision_id(status.metadata()).expect("a recorded refusal carries its id");
    let record = h.audit_record(&id);
    assert_eq!(record.body.decision, "deny");
    let codes: Vec<&str> = record
        .body
        .reasons
        .iter()
        .map(|r| r.code.as_str())
        .collect();
    assert_eq!(codes, ["METADATA_INVALID"], "{record:?}");
    // The message names the metadata at fault, for the person reading it.
    assert!(
        status.message().contains("`x-purpose`"),
        "{}",
        status.message()
    );
    let mut request = call(
        GetProfileRequest {
            customer_id: "cust-1".into(),
        },
        "support-service",
        "service.support",
        &[],
    );
    request
        .metadata_mut()
        .insert("x-data-subject", ",".parse().unwrap());
    let status = client.get_profile(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(h.service.calls(), 0);
}

#[tokio::test]
async fn upstream_down_is_unavailable_and_denials_still_deny() {
    let h = Harness::with(Options {
        upstream_up: false,
        ..Options::default()
    })
    .await;
    let mut client = h.client().await;
    let status = client
        .get_billing_statement(call(
            GetBillingStatementRequest {
                customer_id: "cust-1".into(),
                month: String::new(),
            },
            "billing-service",
            "service.billing",
            &["cust-1"],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(decision_id(status.metadata()).is_some());
    let status = client
        .get_profile(call(
            GetProfileRequest {
                customer_id: "cust-1".into(),
            },
            "marketing-service",
            "marketing.email",
            &["cust-1"],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn deadline_passes_through_and_cancels_the_upstream_stream() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    // One call first: the sidecar's lazy connect to the upstream is done before the deadline
    // starts counting, which then covers only the first record and an audit write.
    client
        .get_billing_statement(call(
            GetBillingStatementRequest {
                customer_id: "cust-1".into(),
                month: String::new(),
            },
            "billing-service",
            "service.billing",
            &["cust-1"],
        ))
        .await
        .unwrap();
    // The second record comes after a minute: only the deadline can end the stream.
    let mut request = call(
        ExportRequest {
            recipient: "ntt-east".into(),
            delay_ms: 60_000,
        },
        "ntt-east",
        "third_party.interconnect",
        &["cust-1", "cust-2"],
    );
    request.set_timeout(Duration::from_secs(3));
    assert!(request.metadata().get("grpc-timeout").is_some());
    let mut stream = client
        .export_for_interconnect(request)
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    let status = stream.message().await.unwrap_err();
    // pdgate's answer (the client's own timer bounds only the wait for response headers).
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    common::wait::until("every upstream stream closed", || {
        h.service.open_streams() == 0
    })
    .await;
}

#[tokio::test]
async fn client_cancellation_drops_the_upstream_stream() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let request = call(
        ExportRequest {
            recipient: "ntt-east".into(),
            delay_ms: 10_000,
        },
        "ntt-east",
        "third_party.interconnect",
        &["cust-1", "cust-2"],
    );
    let mut stream = client
        .export_for_interconnect(request)
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    assert_eq!(h.service.open_streams(), 1);
    drop(stream);
    common::wait::until("every upstream stream closed", || {
        h.service.open_streams() == 0
    })
    .await;
}

#[tokio::test]
async fn shutdown_drains_a_stream_in_flight() {
    let mut h = Harness::start().await;
    let mut client = h.client().await;
    let request = call(
        ExportRequest {
            recipient: "ntt-east".into(),
            delay_ms: 300,
        },
        "ntt-east",
        "third_party.interconnect",
        &["cust-1", "cust-2", "cust-1"],
    );
    let mut stream = client
        .export_for_interconnect(request)
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    h.signal_shutdown();
    let mut rest = 0;
    while let Some(_record) = stream.message().await.unwrap() {
        rest += 1;
    }
    assert_eq!(rest, 2, "the stream in flight finished");
    h.shutdown().await.unwrap();
    // New connections are refused once it has stopped.
    let refused = tokio::net::TcpStream::connect(h.data_addr)
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn overload_sheds_with_resource_exhausted() {
    let h = Harness::with(Options {
        max_concurrent_calls: 1,
        ..Options::default()
    })
    .await;
    let mut client = h.client().await;
    let request = call(
        ExportRequest {
            recipient: "ntt-east".into(),
            delay_ms: 2_000,
        },
        "ntt-east",
        "third_party.interconnect",
        &["cust-1", "cust-2"],
    );
    let mut stream = client
        .export_for_interconnect(request)
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    let status = client
        .get_billing_statement(call(
            GetBillingStatementRequest {
                customer_id: "cust-1".into(),
                month: String::new(),
            },
            "billing-service",
            "service.billing",
            &["cust-1"],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    drop(stream);
    common::wait::until("every upstream stream closed", || {
        h.service.open_streams() == 0
    })
    .await;
    // The permit came back with the cancelled stream: calls are accepted again (shed until
    // then, never failed otherwise).
    eventually("calls are accepted again once the stream is gone", || {
        let mut client = client.clone();
        async move {
            match client
                .get_billing_statement(call(
                    GetBillingStatementRequest {
                        customer_id: "cust-1".into(),
                        month: String::new(),
                    },
                    "billing-service",
                    "service.billing",
                    &["cust-1"],
                ))
                .await
            {
                Ok(_) => true,
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    false
                }
            }
        }
    })
    .await;
}

#[tokio::test]
async fn health_serves_with_a_valid_policy_and_not_before() {
    let h = Harness::start().await;
    let mut health = HealthClient::new(h.channel(h.api_addr).await);
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(status.get_ref().status(), ServingStatus::Serving);

    let broken = tempfile::tempdir().unwrap();
    for f in ["model.conf", "policy.csv", "taxonomy.toml", "routes.yaml"] {
        std::fs::copy(common::policy_dir().join(f), broken.path().join(f)).unwrap();
    }
    std::fs::write(
        broken.path().join("policy.csv"),
        "p, role:billing, nowhere, customer, read, allow\n",
    )
    .unwrap();
    let h = Harness::with(Options {
        policy: broken.path().to_path_buf(),
        ..Options::default()
    })
    .await;
    let mut health = HealthClient::new(h.channel(h.api_addr).await);
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(status.get_ref().status(), ServingStatus::NotServing);
    let status = h
        .client()
        .await
        .get_billing_statement(call(
            GetBillingStatementRequest {
                customer_id: "cust-1".into(),
                month: String::new(),
            },
            "billing-service",
            "service.billing",
            &["cust-1"],
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "POLICY_UNAVAILABLE");
    assert_eq!(h.service.calls(), 0);
}

#[tokio::test]
async fn access_control_check_and_batch_check() {
    let h = Harness::start().await;
    let mut api = AccessControlClient::new(h.channel(h.api_addr).await);
    let allowed = CheckRequest {
        caller: "billing-service".into(),
        purpose: "service.billing".into(),
        action: "read".into(),
        categories: vec!["customer.billing".into()],
        subjects: vec!["cust-1".into()],
        recipient: String::new(),
        minimizable: Vec::new(),
    };
    let response = api.check(allowed.clone()).await.unwrap().into_inner();
    assert!(response.allowed);
    assert_eq!(response.policy_version.len(), 64);
    assert!(!response.matched_rules.is_empty());
    let denied = CheckRequest {
        caller: "marketing-service".into(),
        purpose: "marketing".into(),
        categories: vec!["communications.call_history".into()],
        ..allowed.clone()
    };
    let batch = api
        .batch_check(BatchCheckRequest {
            requests: vec![allowed.clone(), denied],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.responses.len(), 2);
    assert!(batch.responses[0].allowed);
    assert!(!batch.responses[1].allowed);
    assert_eq!(batch.responses[1].reasons[0].code, "NO_GRANT");
    let too_many = BatchCheckRequest {
        requests: vec![allowed; pdgate::config::Limits::default().check_max_batch + 1],
    };
    assert_eq!(
        api.batch_check(too_many).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn the_demo_walkthrough_goes_as_the_policy_promises() {
    let h = Harness::start().await;
    let mut report = String::new();
    let summary = pdgate::demo::walkthrough::run(h.channel(h.data_addr).await, &mut report).await;
    assert!(
        summary.unexpected.is_empty(),
        "{:?}\n{report}",
        summary.unexpected
    );
    assert!(summary.allowed > 0 && summary.denied > 0);
}

// ---------------------------------------------------------------------------------------------
// The binary: signals

/// `pdgate serve` in front of an in-process demo service; SIGTERM or SIGINT while a stream is
/// in flight. The stream finishes, nothing new is accepted, and pdgate exits 0 well within
/// the grace period.
async fn a_signal_drains_a_call_in_flight(signal: &str) {
    let service = pdgate::demo::customer::CustomerService::new();
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap().to_string();
    tokio::spawn(service.clone().serve(upstream, std::future::pending()));
    let state = tempfile::tempdir().unwrap();
    let grace = Duration::from_secs(20);
    let mut pdgate = common::bin::serve(
        &common::policy_dir(),
        state.path(),
        &[
            "--upstream",
            &upstream_addr,
            "--shutdown-grace-seconds",
            &grace.as_secs().to_string(),
        ],
    )
    .spawn();
    let (data, _) = pdgate.serving().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{data}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pdgate::proto::demo::customer_data_client::CustomerDataClient::new(channel);
    // Three records 500 ms apart: the call is in flight for about a second after the first.
    let mut stream = client
        .export_for_interconnect(call(
            ExportRequest {
                recipient: "ntt-east".into(),
                delay_ms: 500,
            },
            "ntt-east",
            "third_party.interconnect",
            &["cust-1", "cust-2", "cust-1"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    assert_eq!(service.open_streams(), 1);
    pdgate.signal(signal);
    let signalled = std::time::Instant::now();
    let mut rest = 0;
    while let Some(_record) = stream.message().await.unwrap() {
        rest += 1;
    }
    assert_eq!(rest, 2, "the stream in flight finished after SIG{signal}");
    let out = pdgate.exit_within(grace).await;
    println!(
        "SIG{signal} with a stream in flight: drained and exited {:?} after {:?}",
        out.status.code(),
        signalled.elapsed()
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // Stopped: the data port refuses connections.
    let refused = tokio::net::TcpStream::connect(data).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn sigterm_drains_a_call_in_flight_and_exits_0() {
    a_signal_drains_a_call_in_flight("TERM").await;
}

#[tokio::test]
async fn sigint_drains_a_call_in_flight_and_exits_0() {
    a_signal_drains_a_call_in_flight("INT").await;
}
