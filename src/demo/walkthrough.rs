//! The scripted walkthrough of `pdgate demo`: real calls through the sidecar, allowed and
//! denied, each printed with the decision pdgate made. Each step states the outcome the policy
//! promises; a step that comes out otherwise makes the demo fail.

use crate::gate::metadata::{CALLER, DECISION_ID, PURPOSE, SUBJECT};
use crate::proto::demo::customer_data_client::CustomerDataClient;
use crate::proto::demo::{
    DisclosureRequest, ExportRequest, GetBillingStatementRequest, GetCallHistoryRequest,
    GetProfileRequest, GetUsageHistoryRequest, UsageStatisticsRequest,
};
use crate::subjects::{InMemorySubjects, SubjectState};
use std::fmt::Write as _;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// The demo's data subjects: what each has consented to or asked for.
pub fn demo_subjects() -> InMemorySubjects {
    let subjects = InMemorySubjects::new();
    subjects.set("cust-1", SubjectState::default());
    subjects.set(
        "cust-2",
        SubjectState {
            consent: ["marketing".to_owned()].into(),
            ..SubjectState::default()
        },
    );
    subjects.set(
        "cust-3",
        SubjectState {
            use_suspended: true,
            ..SubjectState::default()
        },
    );
    subjects.set(
        "cust-4",
        SubjectState {
            provision_suspended: true,
            ..SubjectState::default()
        },
    );
    subjects
}

/// What a step expects: allowed, allowed with a subject's records left out of what came
/// back, or denied with this reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect<'a> {
    Allow,
    AllowWithout(&'a str),
    Deny(&'a str),
}

struct Step {
    caller: &'static str,
    purpose: &'static str,
    method: &'static str,
    /// The subjects the call names in `x-data-subject` (and its message names the first).
    subjects: &'static [&'static str],
    /// When the message asks for another subject than the metadata names.
    message_subject: Option<&'static str>,
    why: &'static str,
    expect: Expect<'static>,
}

const STEPS: &[Step] = &[
    Step {
        caller: "billing-service",
        purpose: "service.billing",
        method: "GetBillingStatement",
        subjects: &["cust-1"],
        why: "billing reads a statement to issue an invoice (§1(1))",
        message_subject: None,
        expect: Expect::Allow,
    },
    Step {
        caller: "marketing-service",
        purpose: "marketing.email",
        method: "GetProfile",
        subjects: &["cust-1"],
        why: "an email magazine to a customer who never consented (§1(2))",
        message_subject: None,
        expect: Expect::Deny("CONSENT_REQUIRED"),
    },
    Step {
        caller: "marketing-service",
        purpose: "marketing.email",
        method: "GetProfile",
        subjects: &["cust-2"],
        why: "the same, to a customer who consented to marketing",
        message_subject: None,
        expect: Expect::Allow,
    },
    Step {
        caller: "marketing-service",
        purpose: "marketing.email",
        method: "GetProfile",
        subjects: &["cust-2"],
        message_subject: Some("cust-1"),
        why: "the metadata names the customer who consented, the message asks for one who did not",
        expect: Expect::Deny("SUBJECT_MISMATCH"),
    },
    Step {
        caller: "logistics-service",
        purpose: "service.shipping",
        method: "GetProfile",
        subjects: &["cust-1"],
        message_subject: None,
        why: "shipping equipment needs the name and address, not the e-mail address (§1(1)): the profile comes without it",
        expect: Expect::Allow,
    },
    Step {
        caller: "support-service",
        purpose: "service.support",
        method: "GetProfile",
        subjects: &["cust-3"],
        why: "support for a customer who asked to stop the use of their data (§7)",
        message_subject: None,
        expect: Expect::Deny("USE_SUSPENDED"),
    },
    Step {
        caller: "billing-service",
        purpose: "service.billing",
        method: "GetCallHistory",
        subjects: &["cust-3"],
        why: "billing for service already given goes on, and may rate calls (§5)",
        message_subject: None,
        expect: Expect::Allow,
    },
    Step {
        caller: "marketing-service",
        purpose: "marketing",
        method: "GetCallHistory",
        subjects: &["cust-2"],
        why: "call history for marketing: no grant, and §5 refuses one",
        message_subject: None,
        expect: Expect::Deny("NO_GRANT"),
    },
    Step {
        caller: "ntt-east",
        purpose: "third_party.interconnect",
        method: "ExportForInterconnect",
        subjects: &["cust-1", "cust-4"],
        why: "interconnection export including a customer who stopped third-party provision (§3, §7): each record is decided for its customer, and hers is left out",
        message_subject: None,
        expect: Expect::AllowWithout("cust-4"),
    },
    Step {
        caller: "ntt-east",
        purpose: "third_party.interconnect",
        method: "ExportForInterconnect",
        subjects: &[],
        why: "an export of every customer: those who stopped third-party provision or all use are left out (§3, §7)",
        message_subject: None,
        expect: Expect::AllowWithout("cust-3"),
    },
    Step {
        caller: "analytics-service",
        purpose: "research.statistics",
        method: "GetUsageStatistics",
        subjects: &[],
        why: "statistics on de-identified data (§1(3), §4)",
        message_subject: None,
        expect: Expect::Allow,
    },
    Step {
        caller: "analytics-service",
        purpose: "research.statistics",
        method: "GetUsageHistory",
        subjects: &["cust-1"],
        why: "one person's usage history for research",
        message_subject: None,
        expect: Expect::Deny("NO_GRANT"),
    },
    Step {
        caller: "privacy-office",
        purpose: "subject_request.disclosure",
        method: "DiscloseHeldData",
        subjects: &["cust-3"],
        why: "disclosure at the person's own request, even while use is suspended (§7)",
        message_subject: None,
        expect: Expect::Allow,
    },
    Step {
        caller: "support-service",
        purpose: "",
        method: "GetProfile",
        subjects: &["cust-1"],
        why: "a call that declares no purpose of use (§1)",
        message_subject: None,
        expect: Expect::Deny("PURPOSE_NOT_DECLARED"),
    },
];

/// How the walkthrough went.
#[derive(Debug, Default)]
pub struct Summary {
    pub allowed: usize,
    pub denied: usize,
    /// Steps whose outcome differed from what the policy promises.
    pub unexpected: Vec<String>,
}

/// Runs every step through `sidecar` (a channel to the data plane), writing a report.
pub async fn run(sidecar: Channel, out: &mut String) -> Summary {
    let mut client = CustomerDataClient::new(sidecar);
    let mut summary = Summary::default();
    for (n, step) in STEPS.iter().enumerate() {
        let outcome = call(&mut client, step).await;
        let subjects = match (step.subjects, step.message_subject) {
            ([], _) => "-".to_owned(),
            (named, None) => named.join(","),
            (named, Some(asked)) => format!("{} (the message asks for {asked})", named.join(",")),
        };
        let purpose = if step.purpose.is_empty() {
            "(none)"
        } else {
            step.purpose
        };
        let _ = writeln!(
            out,
            "{:>2}. {}\n    {} -> {}  purpose={purpose}  subject={subjects}",
            n + 1,
            step.why,
            step.caller,
            step.method
        );
        let as_expected = match (&outcome, step.expect) {
            (Outcome::Allowed { decision, result }, expect) => {
                summary.allowed += 1;
                let _ = writeln!(out, "    ALLOW  {result}  (decision {decision})");
                match expect {
                    Expect::Allow => true,
                    Expect::AllowWithout(subject) => !result.contains(subject),
                    Expect::Deny(_) => false,
                }
            }
            (
                Outcome::Denied {
                    code,
                    message,
                    decision,
                },
                expect,
            ) => {
                summary.denied += 1;
                let _ = writeln!(out, "    DENY   {message}  (decision {decision})");
                expect == Expect::Deny(code.as_str())
            }
            (Outcome::Failed(status), _) => {
                let _ = writeln!(out, "    ERROR  {}: {}", status.code(), status.message());
                false
            }
        };
        if !as_expected {
            summary.unexpected.push(format!(
                "step {} ({} {}): expected {:?}",
                n + 1,
                step.caller,
                step.method,
                step.expect
            ));
        }
    }
    summary
}

enum Outcome {
    Allowed {
        decision: String,
        result: String,
    },
    Denied {
        code: String,
        message: String,
        decision: String,
    },
    Failed(tonic::Status),
}

fn request<T>(message: T, step: &Step) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let md = request.metadata_mut();
    md.insert(CALLER, MetadataValue::from_static(step.caller));
    if !step.purpose.is_empty() {
        md.insert(PURPOSE, MetadataValue::from_static(step.purpose));
    }
    for s in step.subjects {
        md.append(SUBJECT, MetadataValue::from_static(s));
    }
    request
}

/// The decision id of an allowed call and a line about what came back.
fn answered<T>(
    response: &tonic::Response<T>,
    describe: impl FnOnce(&T) -> String,
) -> (String, String) {
    (
        decision_of(response.metadata()),
        describe(response.get_ref()),
    )
}

fn decision_of(md: &tonic::metadata::MetadataMap) -> String {
    md.get(DECISION_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

async fn call(client: &mut CustomerDataClient<Channel>, step: &Step) -> Outcome {
    let subject = step
        .message_subject
        .or_else(|| step.subjects.first().copied())
        .unwrap_or("")
        .to_owned();
    let result: Result<(String, String), tonic::Status> = match step.method {
        "GetBillingStatement" => client
            .get_billing_statement(request(
                GetBillingStatementRequest {
                    customer_id: subject,
                    month: String::new(),
                },
                step,
            ))
            .await
            .map(|r| {
                answered(&r, |m| {
                    format!("statement {}: {} yen", m.month, m.amount_yen)
                })
            }),
        "GetProfile" => client
            .get_profile(request(
                GetProfileRequest {
                    customer_id: subject,
                },
                step,
            ))
            .await
            .map(|r| {
                answered(&r, |m| {
                    let shown = |field: &str| {
                        if field.is_empty() {
                            "withheld"
                        } else {
                            "shown"
                        }
                    };
                    format!(
                        "profile of {}: e-mail {}, address {}, phone {}",
                        m.name,
                        shown(&m.email),
                        shown(&m.address),
                        shown(&m.phone)
                    )
                })
            }),
        "GetCallHistory" => client
            .get_call_history(request(
                GetCallHistoryRequest {
                    customer_id: subject,
                },
                step,
            ))
            .await
            .map(|r| answered(&r, |m| format!("{} calls", m.calls.len()))),
        "GetUsageHistory" => client
            .get_usage_history(request(
                GetUsageHistoryRequest {
                    customer_id: subject,
                },
                step,
            ))
            .await
            .map(|r| answered(&r, |m| format!("{} months", m.records.len()))),
        "GetUsageStatistics" => client
            .get_usage_statistics(request(
                UsageStatisticsRequest {
                    month: String::new(),
                },
                step,
            ))
            .await
            .map(|r| {
                answered(&r, |m| {
                    format!("{} customers, {} MB in all", m.customers, m.total_data_mb)
                })
            }),
        "DiscloseHeldData" => client
            .disclose_held_data(request(
                DisclosureRequest {
                    customer_id: subject,
                },
                step,
            ))
            .await
            .map(|r| {
                answered(&r, |m| {
                    format!("disclosure with {} statements", m.statements.len())
                })
            }),
        "ExportForInterconnect" => {
            match client
                .export_for_interconnect(request(
                    ExportRequest {
                        recipient: step.caller.to_owned(),
                        delay_ms: 0,
                    },
                    step,
                ))
                .await
            {
                Ok(response) => {
                    let decision = decision_of(response.metadata());
                    let mut stream = response.into_inner();
                    let mut customers = Vec::new();
                    loop {
                        match stream.message().await {
                            Ok(Some(record)) => customers.push(record.customer_id),
                            Ok(None) => {
                                break Ok((
                                    decision,
                                    format!(
                                        "{} record{} streamed: {}",
                                        customers.len(),
                                        if customers.len() == 1 { "" } else { "s" },
                                        customers.join(", ")
                                    ),
                                ));
                            }
                            Err(e) => break Err(e),
                        }
                    }
                }
                Err(e) => Err(e),
            }
        }
        other => Err(tonic::Status::unimplemented(format!(
            "no step for `{other}`"
        ))),
    };
    match result {
        Ok((decision, result)) => Outcome::Allowed { decision, result },
        Err(status) if status.code() == tonic::Code::PermissionDenied => {
            let code = status
                .get_error_details()
                .error_info()
                .map(|i| i.reason.clone())
                .unwrap_or_default();
            Outcome::Denied {
                message: status
                    .message()
                    .trim_start_matches("denied by pdgate: ")
                    .to_owned(),
                decision: decision_of(status.metadata()),
                code,
            }
        }
        Err(status) => Outcome::Failed(status),
    }
}
