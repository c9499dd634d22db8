//! Enforcing what a call does, not what the caller says (DESIGN §2, §3), over real sockets
//! against the demo service: the subjects come from the request message (the metadata must
//! agree), each message of a client stream is decided before it goes on, and responses lose
//! the fields of the categories the caller's purpose may not have — checked by decoding them
//! with the service's own generated types.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::{Harness, call, reason};
use pdgate::proto::demo::{ContactUpdate, ExportRequest, GetProfileRequest, UpdateContactRequest};
use std::path::Path;
use tonic::Code;

fn profile(customer: &str) -> GetProfileRequest {
    GetProfileRequest {
        customer_id: customer.into(),
    }
}

/// The record of the decision the answer named.
fn record_of(h: &Harness, md: &tonic::metadata::MetadataMap) -> pdgate::audit::AuditRecord {
    let id = common::decision_id(md).expect("the answer names its decision");
    h.audit_records()
        .into_iter()
        .find(|r| r.body.decision_id == id)
        .unwrap_or_else(|| panic!("no record of decision {id}"))
}

#[tokio::test]
async fn a_consenting_subject_in_the_header_does_not_open_another_subjects_record() {
    // §1(2): cust-2 consented to marketing, cust-1 did not. The header names cust-2, the
    // message asks for cust-1.
    let h = Harness::start().await;
    let mut client = h.client().await;
    let status = client
        .get_profile(call(
            profile("cust-1"),
            "marketing-service",
            "marketing.email",
            &["cust-2"],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "SUBJECT_MISMATCH");
    assert_eq!(
        h.service.calls(),
        0,
        "a refused call never reaches the service"
    );
    // The audit trail names the person the message was about.
    let record = record_of(&h, status.metadata());
    assert_eq!(record.body.subjects, ["cust-1"]);
    assert_eq!(record.body.decision, "deny");

    // Without the header, the message decides: cust-1 has not consented.
    let status = client
        .get_profile(call(
            profile("cust-1"),
            "marketing-service",
            "marketing.email",
            &[],
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "CONSENT_REQUIRED");
    assert_eq!(record_of(&h, status.metadata()).body.subjects, ["cust-1"]);
    // And cust-2, who consented, is served — named by the message alone.
    let response = client
        .get_profile(call(
            profile("cust-2"),
            "marketing-service",
            "marketing.email",
            &[],
        ))
        .await
        .unwrap();
    assert_eq!(response.get_ref().customer_id, "cust-2");
    assert_eq!(h.service.calls(), 1);
}

#[tokio::test]
async fn a_suspended_subject_cannot_hide_behind_another_header() {
    // §7: cust-3 asked for use of their data to stop.
    let h = Harness::start().await;
    let mut client = h.client().await;
    let status = client
        .get_profile(call(
            profile("cust-3"),
            "support-service",
            "service.support",
            &["cust-1"],
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "SUBJECT_MISMATCH");
    let status = client
        .get_profile(call(
            profile("cust-3"),
            "support-service",
            "service.support",
            &[],
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "USE_SUSPENDED");
    assert_eq!(record_of(&h, status.metadata()).body.subjects, ["cust-3"]);
    assert_eq!(h.service.calls(), 0);
    // A header that names exactly the message's subject is fine.
    client
        .get_profile(call(
            profile("cust-1"),
            "support-service",
            "service.support",
            &["cust-1"],
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_shipping_read_of_a_profile_comes_without_the_email_address() {
    // §1(1): shipping equipment needs name and address; the policy gives logistics no
    // e-mail address. The profile is served with that field cleared instead of denied.
    let h = Harness::start().await;
    let mut client = h.client().await;
    let response = client
        .get_profile(call(
            profile("cust-1"),
            "logistics-service",
            "service.shipping",
            &[],
        ))
        .await
        .unwrap();
    let record = record_of(&h, response.metadata());
    let direct = h
        .direct_client()
        .await
        .get_profile(profile("cust-1"))
        .await
        .unwrap()
        .into_inner();
    let got = response.into_inner();
    assert!(
        !direct.email.is_empty(),
        "the service holds an e-mail address"
    );
    assert_eq!(got.email, "", "cleared");
    assert_eq!(got.name, direct.name);
    assert_eq!(got.address, direct.address);
    assert_eq!(got.customer_id, "cust-1");
    assert_eq!(record.body.decision, "allow");
    assert_eq!(record.body.minimized, ["customer.contact.email"]);
    // Whatever else the policy does not give logistics is cleared too, and only that.
    let expected_phone = if record
        .body
        .minimized
        .iter()
        .any(|c| c == "customer.contact.phone")
    {
        String::new()
    } else {
        direct.phone.clone()
    };
    assert_eq!(got.phone, expected_phone);
    // The record says what the read handed out: the name it needed, and the address it could
    // have gone without but was not told to; an auditor asking who read addresses finds it.
    assert_eq!(
        record.body.minimizable,
        [
            "customer.contact.email",
            "customer.contact.address",
            "customer.contact.phone"
        ]
    );
    let touched: Vec<&String> = record.body.touched().collect();
    assert!(
        touched.iter().any(|c| *c == "customer.contact.address"),
        "{touched:?}"
    );
    assert!(
        !touched.iter().any(|c| *c == "customer.contact.email"),
        "{touched:?}"
    );
    let wants = |category: &str| pdgate::audit::read::Filter {
        category: Some(category.into()),
        ..Default::default()
    };
    assert!(wants("customer.contact.address").matches(&record));
    assert!(wants("customer.contact").matches(&record));
    assert!(!wants("customer.contact.email").matches(&record));
    // Counted: the fields cleared (one or two), none unknown.
    let metrics = common::scrape(&h).await;
    let cleared = 1 + usize::from(!expected_phone.eq(&direct.phone));
    assert!(
        metrics.contains(&format!("pdgate_response_fields_cleared_total {cleared}\n")),
        "{metrics}"
    );
    assert!(
        metrics.contains("pdgate_response_fields_unknown_total 0\n"),
        "{metrics}"
    );

    // Support may read the whole profile: nothing is cleared.
    let whole = client
        .get_profile(call(
            profile("cust-1"),
            "support-service",
            "service.support",
            &[],
        ))
        .await
        .unwrap();
    assert!(record_of(&h, whole.metadata()).body.minimized.is_empty());
    assert_eq!(whole.into_inner(), direct);
}

#[tokio::test]
async fn a_client_stream_ends_at_the_first_message_about_a_subject_it_may_not_touch() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let update = |customer: &str, email: &str| ContactUpdate {
        customer_id: customer.into(),
        email: email.into(),
        ..ContactUpdate::default()
    };
    let call_task = {
        let request = call(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            "provisioning-service",
            "service.provision",
            &[],
        );
        tokio::spawn(async move { client.import_contacts(request).await })
    };
    tx.send(update("cust-1", "one@example.jp")).await.unwrap();
    tx.send(update("cust-2", "two@example.jp")).await.unwrap();
    // The service has applied both before the third is sent.
    let mut direct = h.direct_client().await;
    common::wait::eventually("the service applied the first two updates", || {
        let mut direct = direct.clone();
        async move {
            direct
                .get_profile(profile("cust-2"))
                .await
                .is_ok_and(|p| p.into_inner().email == "two@example.jp")
        }
    })
    .await;
    // §7: cust-3 asked for use of their data to stop.
    tx.send(update("cust-3", "three@example.jp")).await.unwrap();
    drop(tx);
    let status = call_task.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "USE_SUSPENDED");
    let emails = [
        direct
            .get_profile(profile("cust-1"))
            .await
            .unwrap()
            .into_inner()
            .email,
        direct
            .get_profile(profile("cust-3"))
            .await
            .unwrap()
            .into_inner()
            .email,
    ];
    assert_eq!(emails[0], "one@example.jp");
    assert_ne!(
        emails[1], "three@example.jp",
        "the refused message never reached the service"
    );
    // The refusal is recorded, naming cust-3.
    let records = h.audit_records();
    assert!(
        records.iter().any(|r| r.body.decision == "deny"
            && r.body.subjects == ["cust-3"]
            && r.body.reasons.iter().any(|c| c.code == "USE_SUSPENDED")),
        "{records:?}"
    );
}

#[tokio::test]
async fn a_write_may_set_only_the_fields_its_purpose_may_write() {
    // §1(1): shipping corrects a delivery address; it may not write the e-mail address.
    let h = Harness::start().await;
    let mut client = h.client().await;
    let update = |email: &str| UpdateContactRequest {
        customer_id: "cust-1".into(),
        address: "4-5-6 Minato, Tokyo".into(),
        email: email.into(),
        ..UpdateContactRequest::default()
    };
    let response = client
        .update_contact(call(
            update(""),
            "logistics-service",
            "service.shipping",
            &[],
        ))
        .await
        .unwrap();
    let record = record_of(&h, response.metadata());
    let profile = response.into_inner();
    assert_eq!(profile.address, "4-5-6 Minato, Tokyo");
    // What comes back is what the purpose may have: it writes no name, e-mail or phone.
    assert_eq!(
        (
            profile.name.as_str(),
            profile.email.as_str(),
            profile.phone.as_str()
        ),
        ("", "", "")
    );
    assert_eq!(record.body.categories, ["customer.contact.address"]);
    assert_eq!(
        record.body.minimized,
        [
            "customer.name",
            "customer.contact.email",
            "customer.contact.phone"
        ]
    );
    assert_eq!(h.service.calls(), 1);

    // The same update setting the e-mail address too needs that category: denied.
    let status = client
        .update_contact(call(
            update("new@example.jp"),
            "logistics-service",
            "service.shipping",
            &[],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "NO_GRANT");
    assert_eq!(
        h.service.calls(),
        1,
        "a refused write never reaches the service"
    );
    let record = record_of(&h, status.metadata());
    assert_eq!(
        record.body.categories,
        ["customer.contact.address", "customer.contact.email"]
    );
}

#[tokio::test]
async fn a_client_stream_ends_at_the_first_message_that_writes_what_the_purpose_may_not() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let call_task = {
        let request = call(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            "logistics-service",
            "service.shipping",
            &[],
        );
        tokio::spawn(async move { client.import_contacts(request).await })
    };
    tx.send(ContactUpdate {
        customer_id: "cust-1".into(),
        address: "4-5-6 Minato, Tokyo".into(),
        ..ContactUpdate::default()
    })
    .await
    .unwrap();
    let mut direct = h.direct_client().await;
    common::wait::eventually("the service applied the address", || {
        let mut direct = direct.clone();
        async move {
            direct
                .get_profile(profile("cust-1"))
                .await
                .is_ok_and(|p| p.into_inner().address == "4-5-6 Minato, Tokyo")
        }
    })
    .await;
    tx.send(ContactUpdate {
        customer_id: "cust-2".into(),
        phone: "+81-6-0000-0000".into(),
        ..ContactUpdate::default()
    })
    .await
    .unwrap();
    drop(tx);
    let status = call_task.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "NO_GRANT");
    let phone = direct
        .get_profile(profile("cust-2"))
        .await
        .unwrap()
        .into_inner()
        .phone;
    assert_ne!(
        phone, "+81-6-0000-0000",
        "the refused message never reached the service"
    );
    let records = h.audit_records();
    assert!(
        records.iter().any(|r| r.body.decision == "deny"
            && r.body.subjects == ["cust-2"]
            && r.body
                .categories
                .contains(&"customer.contact.phone".to_owned())),
        "{records:?}"
    );
}

#[tokio::test]
async fn a_gzip_compressed_request_is_read_like_any_other() {
    // The subjects and the minimization hold for a client that compresses its messages.
    let h = Harness::start().await;
    let mut client = h
        .client()
        .await
        .send_compressed(tonic::codec::CompressionEncoding::Gzip)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    let status = client
        .get_profile(call(
            profile("cust-1"),
            "marketing-service",
            "marketing.email",
            &["cust-2"],
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "SUBJECT_MISMATCH");
    assert_eq!(h.service.calls(), 0);
    let shipped = client
        .get_profile(call(
            profile("cust-1"),
            "logistics-service",
            "service.shipping",
            &[],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!shipped.name.is_empty() && !shipped.address.is_empty());
    assert_eq!(shipped.email, "", "minimized in a compressed call too");
    // A compressed message naming a suspended customer in a client stream.
    let updates = tokio_stream::iter(vec![ContactUpdate {
        customer_id: "cust-3".into(),
        address: "x".into(),
        ..ContactUpdate::default()
    }]);
    let status = client
        .import_contacts(call(
            updates,
            "provisioning-service",
            "service.provision",
            &[],
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "USE_SUSPENDED");
    assert_eq!(h.service.calls(), 1);
}

#[tokio::test]
async fn a_message_over_the_configured_inspection_limit_is_resource_exhausted() {
    // `[limits] inspect_message_bytes`: plain or decompressed, a larger message is not read.
    let h = Harness::with(common::Options {
        limits: pdgate::config::Limits {
            inspect_message_bytes: 1024,
            ..pdgate::config::Limits::default()
        },
        ..common::Options::default()
    })
    .await;
    let update = || UpdateContactRequest {
        customer_id: "cust-1".into(),
        address: "x".repeat(2048),
        ..UpdateContactRequest::default()
    };
    let plain = h.client().await;
    let zipped = h
        .client()
        .await
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    for mut client in [plain, zipped] {
        let status = client
            .update_contact(call(
                update(),
                "provisioning-service",
                "service.provision",
                &[],
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    assert_eq!(h.service.calls(), 0);
    // Under the limit, the same call goes through.
    let mut client = h.client().await;
    client
        .update_contact(call(
            UpdateContactRequest {
                address: "4-5-6 Minato, Tokyo".into(),
                ..update()
            },
            "provisioning-service",
            "service.provision",
            &[],
        ))
        .await
        .unwrap();
    assert_eq!(h.service.calls(), 1);
}

/// Envoy's `ext_authz` check of a call to `path` with `headers` (no body): the gRPC code
/// Envoy is told, and the one audit record it made.
async fn envoy_check(path: &str, headers: &[(&str, &str)]) -> (i32, pdgate::audit::AuditRecord) {
    use envoy_types::ext_authz::v3::pb::CheckRequest;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let h = Harness::start().await;
    let mut envoy = AuthorizationClient::new(h.channel(h.api_addr).await);
    let headers = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let answer = envoy
        .check(CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "POST".into(),
                        path: path.into(),
                        headers,
                        ..HttpRequest::default()
                    }),
                    ..Request::default()
                }),
                ..AttributeContext::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let mut records = h.audit_records();
    assert_eq!(records.len(), 1, "{records:?}");
    (answer.status.unwrap().code, records.remove(0))
}

#[tokio::test]
async fn the_envoy_door_cannot_decide_a_route_that_reads_its_message() {
    let (code, record) = envoy_check(
        "/demo.customer.v1.CustomerData/GetProfile",
        &[
            ("x-caller", "support-service"),
            ("x-purpose", "service.support"),
            ("x-data-subject", "cust-1"),
        ],
    )
    .await;
    // PERMISSION_DENIED, with the reason: Envoy sees the headers, never the message.
    assert_eq!(code, 7);
    assert_eq!(record.body.reasons[0].code, "MESSAGE_INSPECTION_REQUIRED");
}

#[tokio::test]
async fn the_envoy_door_refuses_an_export_whose_records_it_cannot_drop() {
    let (code, record) = envoy_check(
        "/demo.customer.v1.CustomerData/ExportForInterconnect",
        &[
            ("x-caller", "ntt-east"),
            ("x-purpose", "third_party.interconnect"),
        ],
    )
    .await;
    assert_eq!(code, 7);
    assert_eq!(record.body.reasons[0].code, "MESSAGE_INSPECTION_REQUIRED");
}

/// The customers of an interconnection export that reach `caller`, as the metadata names
/// them (`subjects`), and the answer's decision record.
async fn export(
    h: &Harness,
    caller: &str,
    subjects: &[&str],
) -> (Vec<String>, pdgate::audit::AuditRecord) {
    let mut client = h.client().await;
    let response = client
        .export_for_interconnect(call(
            ExportRequest {
                recipient: caller.into(),
                delay_ms: 0,
            },
            caller,
            "third_party.interconnect",
            subjects,
        ))
        .await
        .unwrap();
    let record = record_of(h, response.metadata());
    let mut stream = response.into_inner();
    let mut customers = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        customers.push(r.customer_id);
    }
    (customers, record)
}

/// The audit records of the records of the response to decision `call`.
fn records_of(h: &Harness, call: &str) -> Vec<pdgate::audit::AuditRecord> {
    h.audit_records()
        .into_iter()
        .filter(|r| {
            r.body
                .detail
                .as_deref()
                .is_some_and(|d| d.ends_with(&format!("decision {call}")))
        })
        .collect()
}

#[tokio::test]
async fn an_export_leaves_out_the_record_of_a_customer_who_stopped_provision() {
    // §3, §7: cust-4 asked to stop the provision of her data to third parties. The export
    // names her; the service streams her record; pdgate decides each record for the customer
    // it is about, and hers never reaches NTT East.
    let h = Harness::start().await;
    let (customers, call_record) = export(&h, "ntt-east", &["cust-1", "cust-4"]).await;
    assert_eq!(customers, ["cust-1"]);
    assert_eq!(h.service.calls(), 1, "the export itself is allowed");
    // The call is decided without subjects; each record for its own.
    assert_eq!(call_record.body.decision, "allow");
    assert!(call_record.body.subjects.is_empty(), "{call_record:?}");
    let records = records_of(&h, &call_record.body.decision_id);
    let by_subject = |s: &str| {
        records
            .iter()
            .find(|r| r.body.subjects == [s])
            .unwrap_or_else(|| panic!("no record decision about {s}: {records:?}"))
    };
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(by_subject("cust-1").body.decision, "allow");
    let dropped = by_subject("cust-4");
    assert_eq!(dropped.body.decision, "deny");
    assert_eq!(dropped.body.reasons[0].code, "PROVISION_SUSPENDED");
    assert_eq!(
        dropped.body.method.as_deref(),
        Some("/demo.customer.v1.CustomerData/ExportForInterconnect")
    );
}

#[tokio::test]
async fn an_export_of_every_customer_leaves_out_each_one_the_purpose_may_not_reach() {
    // Naming no one, the service exports every customer: cust-3 stopped all use, cust-4
    // third-party provision. The header does not decide who is in the export; the records do.
    let h = Harness::start().await;
    let (customers, call_record) = export(&h, "ntt-west", &[]).await;
    assert_eq!(customers, ["cust-1", "cust-2"]);
    let records = records_of(&h, &call_record.body.decision_id);
    let denied: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r.body.decision == "deny")
        .map(|r| (r.body.subjects[0].as_str(), r.body.reasons[0].code.as_str()))
        .collect();
    assert_eq!(
        denied,
        [
            ("cust-3", "USE_SUSPENDED"),
            ("cust-4", "PROVISION_SUSPENDED")
        ]
    );
    // Counted, too.
    let metrics = common::scrape(&h).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "pdgate_response_records_dropped_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn validation_refuses_records_on_a_method_that_streams_none() {
    let problems = validate_with(
        |t| {
            t.replacen(
                "    subjects: customer_id
",
                "    subjects: customer_id
    records: customer_id
",
                1,
            )
        },
        true,
    )
    .await;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].line, Some(line_of("CustomerData/GetProfile:")));
    assert!(
        problems[0].message.contains("server-streaming"),
        "{}",
        problems[0].message
    );
    let problems = validate_with(
        |t| t.replacen("records: customer_id", "records: customer", 1),
        true,
    )
    .await;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(
        problems[0].line,
        Some(line_of("CustomerData/ExportForInterconnect:"))
    );
}

#[test]
fn the_policys_descriptors_are_the_demo_services_protos() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let served = std::fs::read(root.join("proto/demo/customer/v1/customer.proto")).unwrap();
    for copy in [
        "policy/descriptors/customer.proto",
        "deploy/kubernetes/base/policy/descriptors/customer.proto",
    ] {
        assert!(
            std::fs::read(root.join(copy)).unwrap() == served,
            "{copy} differs from proto/demo/customer/v1/customer.proto: copy it over"
        );
    }
}

/// The default policy with `edit` applied to routes.yaml (and, unless `keep_descriptors`,
/// without its descriptors), validated: every problem, or none.
async fn validate_with(
    edit: impl FnOnce(String) -> String,
    keep_descriptors: bool,
) -> Vec<pdgate::policy::Problem> {
    let dir = common::policy_copy();
    let routes = dir.path().join("routes.yaml");
    let text = std::fs::read_to_string(&routes).unwrap();
    std::fs::write(&routes, edit(text)).unwrap();
    if !keep_descriptors {
        std::fs::remove_dir_all(dir.path().join("descriptors")).unwrap();
    }
    match pdgate::policy::load_dir(dir.path()).await {
        Ok(_) => Vec::new(),
        Err(problems) => problems.0,
    }
}

/// The line of `needle` in the repository's routes.yaml.
fn line_of(needle: &str) -> usize {
    let text = std::fs::read_to_string(common::policy_dir().join("routes.yaml")).unwrap();
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[tokio::test]
async fn validation_names_the_route_and_line_of_a_field_the_descriptors_do_not_have() {
    let problems = validate_with(
        |t| t.replacen("subjects: customer_id", "subjects: customer_idd", 1),
        true,
    )
    .await;
    assert_eq!(problems.len(), 1, "{problems:?}");
    let p = &problems[0];
    assert_eq!(p.file, "routes.yaml");
    assert_eq!(p.line, Some(line_of("CustomerData/GetProfile:")));
    assert!(p.message.contains("customer_idd"), "{}", p.message);
}

#[tokio::test]
async fn validation_refuses_a_route_that_disagrees_with_the_annotations() {
    // routes.yaml gives Profile.email another category than its annotation.
    let problems = validate_with(
        |t| {
            t.replacen(
                "    subjects: customer_id\n",
                "    subjects: customer_id\n    fields: {email: customer.contact.phone}\n",
                1,
            )
        },
        true,
    )
    .await;
    assert!(
        problems
            .iter()
            .any(|p| p.line == Some(line_of("CustomerData/GetProfile:"))
                && p.message.contains("demo.customer.v1.Profile.email")),
        "{problems:?}"
    );
}

#[tokio::test]
async fn a_route_that_reads_messages_needs_the_descriptors() {
    let problems = validate_with(|t| t, false).await;
    // Every route that names a request field is refused, each with its line.
    let lines: Vec<Option<usize>> = problems.iter().map(|p| p.line).collect();
    assert!(
        lines.contains(&Some(line_of("CustomerData/GetProfile:"))),
        "{problems:?}"
    );
    assert!(
        lines.contains(&Some(line_of("CustomerData/ImportContacts:"))),
        "{problems:?}"
    );
    assert!(problems.iter().all(|p| p.file == "routes.yaml"));
}

#[tokio::test]
async fn validation_refuses_a_route_whose_messages_carry_a_category_it_was_not_decided_for() {
    // Without `minimize`, GetProfile would forward the e-mail address, postal address and
    // phone number of a call decided for the name only.
    let problems = validate_with(
        |t| {
            t.replacen(
                "    minimize: [customer.contact.email, customer.contact.address, customer.contact.phone]\n",
                "",
                1,
            )
        },
        true,
    )
    .await;
    let on_profile: Vec<_> = problems
        .iter()
        .filter(|p| p.line == Some(line_of("CustomerData/GetProfile:")))
        .collect();
    for field in ["email", "address", "phone"] {
        assert!(
            on_profile.iter().any(|p| p
                .message
                .contains(&format!("`demo.customer.v1.Profile.{field}`"))),
            "{field}: {problems:?}"
        );
    }
    assert_eq!(on_profile.len(), 3, "{problems:?}");
}

#[tokio::test]
async fn validation_warns_of_an_annotated_method_that_has_no_route() {
    let dir = common::policy_copy();
    let routes = dir.path().join("routes.yaml");
    let text = std::fs::read_to_string(&routes).unwrap();
    let at = text
        .find("  /demo.customer.v1.CustomerData/SupportSession:")
        .unwrap();
    std::fs::write(&routes, &text[..at]).unwrap();
    let snapshot = pdgate::policy::load_dir(dir.path()).await.unwrap();
    let warnings: Vec<String> = snapshot
        .warnings()
        .iter()
        .map(|w| w.message.clone())
        .collect();
    assert!(
        warnings.iter().any(
            |w| w.contains("/demo.customer.v1.CustomerData/SupportSession")
                && w.contains("ROUTE_UNKNOWN")
        ),
        "{warnings:?}"
    );
    // The repository's policy routes every annotated method.
    let full = pdgate::policy::load_dir(&common::policy_dir())
        .await
        .unwrap();
    assert!(
        !full
            .warnings()
            .iter()
            .any(|w| w.message.contains("has no route")),
        "{:?}",
        full.warnings()
    );
}

/// `pdgate routes generate` over the demo's annotated protos.
fn generate(args: &[&str]) -> std::process::Output {
    let policy = common::policy_dir();
    let mut all = vec![
        "routes".to_owned(),
        "generate".to_owned(),
        policy.display().to_string(),
    ];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    common::bin::Pdgate::new(all).output()
}

#[tokio::test]
async fn routes_are_generated_from_the_annotated_protos_and_validate() {
    let out = tokio::task::spawn_blocking(|| generate(&[])).await.unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let file: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let route =
        |method: &str| file["routes"][format!("/demo.customer.v1.CustomerData/{method}")].clone();
    let strings = |v: &serde_yaml::Value| -> Vec<String> {
        v.as_sequence()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };

    // A read: every category the response carries is needed, the subject from the request.
    let profile = route("GetProfile");
    assert_eq!(profile["action"], "read");
    assert_eq!(
        strings(&profile["categories"]),
        [
            "customer.name",
            "customer.contact.email",
            "customer.contact.address",
            "customer.contact.phone"
        ]
    );
    assert_eq!(profile["subjects"], "customer_id");
    // A write: what the request sets and what the response gives back.
    let update = route("UpdateContact");
    assert_eq!(update["action"], "write");
    assert_eq!(strings(&update["categories"]).len(), 4, "{update:?}");
    // A server stream whose request names no one: each record is about its own subject.
    let export = route("ExportForInterconnect");
    assert_eq!(export["records"], "customer_id");
    assert!(export.get("subjects").is_none(), "{export:?}");
    // Nested messages: the disclosure carries the profile, statements, usage and calls.
    let disclosure = strings(&route("DiscloseHeldData")["categories"]);
    assert!(
        disclosure.contains(&"communications.call_history".to_owned()),
        "{disclosure:?}"
    );
    assert!(
        disclosure.contains(&"customer.billing".to_owned()),
        "{disclosure:?}"
    );
    // No subject field: the route says it trusts the metadata, and the note says so.
    assert_eq!(route("GetUsageStatistics")["subjects"], "metadata");
    // A method whose messages carry no category is left out (denied), with a note saying why.
    assert!(route("SupportSession").is_null(), "{text}");
    assert!(stderr.contains("SupportSession"), "{stderr}");
    assert!(
        text.contains("# /demo.customer.v1.CustomerData/SupportSession:"),
        "{text}"
    );

    // The generated file is a valid routes.yaml of the policy.
    let dir = common::policy_copy();
    std::fs::write(dir.path().join("routes.yaml"), &text).unwrap();
    let snapshot = pdgate::policy::load_dir(dir.path()).await.unwrap();
    let generated_route = |m: &str| {
        snapshot
            .route(&format!("/demo.customer.v1.CustomerData/{m}"))
            .unwrap()
            .clone()
    };
    assert!(generated_route("GetProfile").reads_messages());
    assert!(
        generated_route("ExportForInterconnect")
            .inspection
            .unwrap()
            .records
            .is_some()
    );
}

#[tokio::test]
async fn routes_generate_never_overwrites_a_file_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("routes.yaml");
    std::fs::write(&target, "# hand-written\n").unwrap();
    let path = target.display().to_string();
    let refused = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || generate(&["--output", &path]))
            .await
            .unwrap()
    };
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "# hand-written\n"
    );
    let forced = tokio::task::spawn_blocking(move || generate(&["--output", &path, "--force"]))
        .await
        .unwrap();
    assert!(forced.status.success(), "{forced:?}");
    assert!(
        std::fs::read_to_string(&target)
            .unwrap()
            .contains("/demo.customer.v1.CustomerData/GetProfile:")
    );
}

#[tokio::test]
async fn routes_generate_names_a_category_the_taxonomy_does_not_define() {
    let dir = common::policy_copy();
    let proto = dir.path().join("descriptors/customer.proto");
    let text = std::fs::read_to_string(&proto).unwrap();
    std::fs::write(
        &proto,
        text.replacen("\"customer.billing\"", "\"customer.bank_account\"", 1),
    )
    .unwrap();
    let policy = dir.path().display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        common::bin::Pdgate::new(["routes", "generate", &policy]).output()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("customer.bank_account") && stderr.contains("BillingStatement.month"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn every_message_of_a_streamed_response_loses_the_fields_its_purpose_may_not_have() {
    // A routes.yaml whose export may go without the telephone number and the usage history.
    // A marketing e-mail campaign (§1(2)) may have the names and contact details of the
    // customers who consented, never their usage: each streamed record comes without it, and
    // the record of a customer who did not consent is left out.
    let dir = common::policy_copy();
    let routes = dir.path().join("routes.yaml");
    let text = std::fs::read_to_string(&routes).unwrap();
    let needed = "    categories: [customer.name, customer.contact.address, customer.contact.phone, customer.usage_history]\n    records: customer_id\n";
    assert!(text.contains(needed), "the export's route changed: {text}");
    let minimizing = "    categories: [customer.name, customer.contact.address]\n    minimize: [customer.contact.phone, customer.usage_history]\n    records: customer_id\n";
    std::fs::write(&routes, text.replace(needed, minimizing)).unwrap();
    let h = Harness::with(common::Options {
        policy: dir.path().to_owned(),
        ..common::Options::default()
    })
    .await;
    let export = || ExportRequest {
        recipient: String::new(),
        delay_ms: 0,
    };
    let subjects = ["cust-1", "cust-2"];

    let response = h
        .client()
        .await
        .export_for_interconnect(call(
            export(),
            "marketing-service",
            "marketing.email",
            &subjects,
        ))
        .await
        .unwrap();
    let record = record_of(&h, response.metadata());
    assert_eq!(record.body.minimized, ["customer.usage_history"]);
    let mut stream = response.into_inner();
    let mut got = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        got.push(r);
    }
    let mut stream = h
        .direct_client()
        .await
        .export_for_interconnect(call(
            export(),
            "marketing-service",
            "marketing.email",
            &subjects,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut direct = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        direct.push(r);
    }
    assert_eq!(direct.len(), 2, "the service streams both customers");
    let held = direct.iter().find(|r| r.customer_id == "cust-2").unwrap();
    assert_ne!(
        held.data_mb_last_month, 0,
        "the service holds a usage figure"
    );

    // cust-1 gave no consent to marketing: her record is left out. cust-2's arrives whole
    // but for the usage history.
    assert_eq!(got.len(), 1, "{got:?}");
    let mut expected = held.clone();
    expected.data_mb_last_month = 0;
    assert_eq!(got[0], expected);
    let dropped = records_of(&h, &record.body.decision_id);
    assert!(
        dropped
            .iter()
            .any(|r| r.body.subjects == ["cust-1"] && r.body.reasons[0].code == "CONSENT_REQUIRED"),
        "{dropped:?}"
    );
}

#[tokio::test]
async fn a_response_field_the_descriptors_do_not_know_never_passes() {
    // The policy's descriptors are an older version of the service's protos: a Profile
    // without its phone number (field 5). The service sends it; pdgate cannot say what it
    // holds, so it drops it and counts it, even for a caller that may have every contact field.
    let dir = common::policy_copy();
    let proto = dir.path().join("descriptors/customer.proto");
    let text = std::fs::read_to_string(&proto).unwrap();
    let phone = "  string phone = 5 [(pdgate.v1.category) = \"customer.contact.phone\"];\n";
    assert!(text.contains(phone), "Profile changed: {text}");
    std::fs::write(&proto, text.replacen(phone, "", 1)).unwrap();
    let routes = dir.path().join("routes.yaml");
    let text = std::fs::read_to_string(&routes).unwrap();
    let minimize = "    minimize: [customer.contact.email, customer.contact.address, customer.contact.phone]\n";
    assert!(
        text.contains(minimize),
        "GetProfile's route changed: {text}"
    );
    std::fs::write(
        &routes,
        text.replacen(
            minimize,
            "    minimize: [customer.contact.email, customer.contact.address]\n",
            1,
        ),
    )
    .unwrap();
    let h = Harness::with(common::Options {
        policy: dir.path().to_owned(),
        ..common::Options::default()
    })
    .await;

    let got = h
        .client()
        .await
        .get_profile(call(
            profile("cust-1"),
            "support-service",
            "service.support",
            &[],
        ))
        .await
        .unwrap();
    let record = record_of(&h, got.metadata());
    assert!(
        record.body.minimized.is_empty(),
        "support may have the whole profile"
    );
    let got = got.into_inner();
    let direct = h
        .direct_client()
        .await
        .get_profile(profile("cust-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!direct.phone.is_empty(), "the service sends a phone number");
    assert_eq!(
        got.phone, "",
        "a field the descriptors do not know never passes"
    );
    let mut expected = direct.clone();
    expected.phone.clear();
    assert_eq!(got, expected, "every known field passes untouched");
    let metrics = common::scrape(&h).await;
    assert!(
        metrics.contains("pdgate_response_fields_unknown_total 1\n"),
        "{metrics}"
    );
}
