//! `pdgate check`: decide one request against a policy directory, as the sidecar would.

use super::{EXIT_DENIED, EXIT_OK, EXIT_USAGE, policy_cmd::report_invalid, print_json};
use crate::decision::{CacheSettings, Decider, Decision, Request};
use crate::policy;
use crate::subjects::{InMemorySubjects, SubjectState};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Args)]
#[command(
    after_help = "The flags after --subject give that subject's state for this check \
(no flag: no consent, nothing suspended).\n\n\
An unknown caller, purpose, category or action is not an input error: it is denied with its \
reason code (exit 1), exactly as the sidecar decides it.\n\n\
Examples:\n  \
pdgate check --caller marketing-service --purpose marketing.email --action read \\\n      \
--category customer.contact.email --subject cust-1 --consent marketing\n  \
pdgate check --caller provisioning-service --purpose third_party.interconnect --action read \\\n      \
--category customer.name,customer.usage_history --subject cust-1 --recipient ntt-east --json"
)]
pub struct CheckArgs {
    /// The calling service (a caller of taxonomy.toml), e.g. `billing-service`.
    #[arg(long, value_name = "CALLER")]
    caller: String,
    /// The purpose of use the call declares, e.g. `service.billing`.
    #[arg(long, value_name = "PURPOSE")]
    purpose: String,
    /// `read`, `write` or `delete`.
    #[arg(long, value_name = "ACTION")]
    action: String,
    /// A category of personal data, e.g. `customer.contact.email`; repeat it or separate with
    /// commas for several.
    #[arg(
        long = "category",
        value_name = "CATEGORY",
        required = true,
        value_delimiter = ','
    )]
    categories: Vec<String>,
    /// A data subject the call concerns; repeatable.
    #[arg(long = "subject", value_name = "SUBJECT")]
    subjects: Vec<String>,
    /// The company receiving the data when it is not the caller (joint user or third party).
    #[arg(long, value_name = "CALLER")]
    recipient: Option<String>,
    /// The subject consented to PURPOSE (covers its children); repeatable.
    #[arg(
        long = "consent",
        value_name = "PURPOSE",
        requires = "subjects",
        value_delimiter = ','
    )]
    consent: Vec<String>,
    /// The subject consented to the use of communications data for PURPOSE; repeatable.
    #[arg(
        long = "comms-consent",
        value_name = "PURPOSE",
        requires = "subjects",
        value_delimiter = ','
    )]
    comms_consent: Vec<String>,
    /// The subject asked to stop the use of their data.
    #[arg(long, requires = "subjects")]
    suspend_use: bool,
    /// The subject asked to stop providing their data to third parties.
    #[arg(long, requires = "subjects")]
    suspend_provision: bool,
    /// Policy directory.
    #[arg(
        long,
        value_name = "DIR",
        env = "PDGATE_POLICY",
        default_value = "policy"
    )]
    policy: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: CheckArgs) -> u8 {
    if !args.policy.is_dir() {
        eprintln!(
            "error: --policy `{}` is not a directory (give --policy DIR or set PDGATE_POLICY)",
            args.policy.display()
        );
        return EXIT_USAGE;
    }
    let snapshot = match policy::load_dir(&args.policy).await {
        Ok(s) => Arc::new(s),
        Err(problems) => {
            report_invalid(&args.policy, &problems, args.json);
            return EXIT_DENIED;
        }
    };
    let state = SubjectState {
        consent: args.consent.iter().cloned().collect(),
        comms_consent: args.comms_consent.iter().cloned().collect(),
        use_suspended: args.suspend_use,
        provision_suspended: args.suspend_provision,
    };
    let subjects: InMemorySubjects = args
        .subjects
        .iter()
        .map(|s| (s.clone(), state.clone()))
        .collect();
    let request = Request {
        caller: args.caller,
        purpose: args.purpose,
        action: args.action,
        categories: args.categories,
        subjects: args.subjects,
        recipient: args.recipient,
    };
    let decider = Decider::with_policy(snapshot, CacheSettings::default());
    let decision = decider.decide(&request, &subjects);
    if args.json {
        match serde_json::to_value(&decision) {
            Ok(v) => print_json(&v),
            Err(e) => {
                eprintln!("error: cannot encode the decision: {e}");
                return EXIT_DENIED;
            }
        }
    } else {
        print_human(&request, &decision);
    }
    if decision.allowed {
        EXIT_OK
    } else {
        EXIT_DENIED
    }
}

fn print_human(request: &Request, decision: &Decision) {
    let subjects = if request.subjects.is_empty() {
        String::new()
    } else {
        format!(" (subject {})", request.subjects.join(", "))
    };
    let what = format!(
        "`{}` {} `{}` for `{}`{subjects}",
        request.caller,
        if decision.allowed { "may" } else { "may not" },
        format_args!("{} {}", request.action, request.categories.join("`, `")),
        request.purpose,
    );
    let tail = format!(
        "policy {}, decision {}",
        decision
            .policy_version
            .map_or_else(|| "none".to_owned(), |v| v.short()),
        decision.decision_id
    );
    if decision.allowed {
        println!("ALLOW {what}");
        let rules: Vec<String> = decision
            .matched_rules
            .iter()
            .map(|r| format!("policy.csv:{} `{}`", r.line, r.rule))
            .collect();
        println!("  granted by {}; {tail}", rules.join(", "));
    } else {
        println!("DENY {what}");
        for r in &decision.reasons {
            println!("  {} {}: {}", r.code, r.clause, r.detail);
        }
        println!("  {tail}");
    }
}
