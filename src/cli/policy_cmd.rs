//! `pdgate policy validate` (local; `policy test` is in `policy_test.rs`), and `push`, `status`,
//! `rollback`, `explain`, `shadow` against a running sidecar's `PolicyAdmin`.

use super::admin_client::{AdminArgs, AdminChannel, report_status};
use super::check::RequestArgs;
use super::{EXIT_DENIED, EXIT_OK, EXIT_USAGE, print_json};
use crate::gate::Bundle;
use crate::policy::{self, Problems};
use crate::proto::v1::policy_admin_client::PolicyAdminClient;
use crate::proto::v1::{
    ApplyRequest, ApplyResponse, CheckRequest, ClearShadowRequest, ExplainRequest, ExplainSubject,
    PolicyBundle, PolicyVersionInfo, RollbackRequest, StatusRequest,
};
use clap::Args;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Validates `dir`; exit 0 valid, 1 invalid (every problem listed), 2 no such directory.
pub async fn validate(dir: &Path, json: bool) -> u8 {
    if !dir.is_dir() {
        return missing_dir(dir, json);
    }
    match policy::load_dir(dir).await {
        Ok(snapshot) => {
            if json {
                print_json(&json!({
                    "valid": true,
                    "policy": dir.display().to_string(),
                    "policy_version": snapshot.version().to_string(),
                    "rules": snapshot.rule_count(),
                    "purposes": snapshot.purposes().len(),
                    "categories": snapshot.categories().len(),
                    "callers": snapshot.callers().len(),
                    "problems": [],
                    "warnings": snapshot
                        .warnings()
                        .iter()
                        .map(|w| json!({"file": w.file, "line": w.line, "message": w.message}))
                        .collect::<Vec<_>>(),
                }));
            } else {
                outln!(
                    "{}: valid (policy {}; {} rules, {} purposes, {} categories, {} callers)",
                    dir.display(),
                    snapshot.version().short(),
                    snapshot.rule_count(),
                    snapshot.purposes().len(),
                    snapshot.categories().len(),
                    snapshot.callers().len()
                );
                for warning in snapshot.warnings() {
                    outln!("  warning: {warning}");
                }
            }
            EXIT_OK
        }
        Err(problems) => {
            report_invalid(dir, &problems, json);
            EXIT_DENIED
        }
    }
}

pub(super) fn missing_dir(dir: &Path, json: bool) -> u8 {
    let message = format!(
        "policy directory `{}` does not exist (give DIR, or set PDGATE_POLICY)",
        dir.display()
    );
    if json {
        print_json(&json!({ "valid": false, "error": message }));
    } else {
        eprintln!("error: {message}");
    }
    EXIT_USAGE
}

pub(super) fn report_invalid(dir: &Path, problems: &Problems, json: bool) {
    if json {
        print_json(&json!({
            "valid": false,
            "policy": dir.display().to_string(),
            "problems": problems.0.iter().map(|p| json!({
                "file": p.file, "line": p.line, "message": p.message,
            })).collect::<Vec<_>>(),
        }));
    } else {
        eprintln!("{}: invalid policy, {problems}", dir.display());
    }
}

// ---- Against a running sidecar (`--admin ADDR`): push, status, rollback, explain, shadow. ----

/// `pdgate policy push DIR`.
#[derive(Debug, Args)]
#[command(
    after_help = "Sends the policy directory (model.conf, policy.csv, taxonomy.toml, \
routes.yaml and tests/*.yaml) to the sidecar, which validates it, runs its tests and only then \
makes it active. On any problem the running policy stays and every problem is listed with its \
file and line (exit 1). Needs the `policy-admin` role.\n\n\
Example:\n  pdgate policy push policy/ --comment 'CHG-1234 marketing consent' --as security-team"
)]
pub struct PushArgs {
    /// Policy directory to push.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// Why (a change ticket); kept with the version and in the audit trail.
    #[arg(long, value_name = "TEXT", default_value = "")]
    comment: String,
    #[command(flatten)]
    admin: AdminArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// `pdgate policy status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// `pdgate policy rollback VERSION`.
#[derive(Debug, Args)]
#[command(
    after_help = "VERSION is one of the kept versions that `pdgate policy status` lists \
(the full version or at least 8 of its hex digits). Needs the `policy-admin` role."
)]
pub struct RollbackArgs {
    /// The version to make active again.
    #[arg(value_name = "VERSION")]
    version: String,
    /// Why; kept with the version and in the audit trail.
    #[arg(long, value_name = "TEXT", default_value = "")]
    comment: String,
    #[command(flatten)]
    admin: AdminArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// `pdgate policy explain`.
#[derive(Debug, Args)]
#[command(
    after_help = "Decides the request under the sidecar's active policy and shows the \
outcome of every stage (well_formed, grant, secrecy, deidentification, subject_state). The \
subject's state is the sidecar's registry, or the inline flags (--consent, ...) when given. \
Nothing is accessed; the explanation is audited as an admin action. Needs `policy-admin` or \
`operator`. Exit 0 allowed, 1 denied."
)]
pub struct ExplainArgs {
    #[command(flatten)]
    request: RequestArgs,
    #[command(flatten)]
    admin: AdminArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// `pdgate policy shadow DIR` | `pdgate policy shadow --clear`.
#[derive(Debug, Args)]
#[command(
    after_help = "A shadow policy decides every call alongside the active one and is \
never enforced: calls it would decide otherwise are counted (`pdgate policy status`, metric \
pdgate_shadow_differences_total) and their audit records carry `shadow_decision`. Its tests \
must pass. Needs the `policy-admin` role.\n\n\
Examples:\n  pdgate policy shadow candidate/ --as security-team\n  \
pdgate policy shadow --clear --as security-team"
)]
pub struct ShadowArgs {
    /// Policy directory to load as the shadow.
    #[arg(
        value_name = "DIR",
        required_unless_present = "clear",
        conflicts_with = "clear"
    )]
    dir: Option<PathBuf>,
    /// Stop shadow evaluation.
    #[arg(long)]
    clear: bool,
    /// Why; kept in the audit trail.
    #[arg(long, value_name = "TEXT", default_value = "")]
    comment: String,
    #[command(flatten)]
    admin: AdminArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

async fn client(admin: &AdminArgs, json: bool) -> Result<PolicyAdminClient<AdminChannel>, u8> {
    match admin.connect().await {
        Ok(channel) => Ok(PolicyAdminClient::new(channel)),
        Err(e) => {
            if json {
                print_json(&json!({ "ok": false, "error": e.to_string() }));
            } else {
                eprintln!("error: {e}");
            }
            Err(e.exit_code())
        }
    }
}

/// A refused or failed call: every problem (file:line) when the candidate was rejected.
fn failed(status: &tonic::Status, json: bool) -> u8 {
    use tonic_types::StatusExt;
    let details = status.get_error_details();
    let problems: Vec<(String, String)> = details
        .bad_request()
        .map(|b| {
            b.field_violations
                .iter()
                .map(|v| (v.field.clone(), v.description.clone()))
                .collect()
        })
        .unwrap_or_default();
    let reason = details.error_info().map(|i| i.reason.clone());
    let code = if status.code() == tonic::Code::InvalidArgument {
        EXIT_USAGE
    } else {
        EXIT_DENIED
    };
    if json {
        print_json(&json!({
            "ok": false,
            "code": format!("{:?}", status.code()),
            "reason": reason,
            "message": status.message(),
            "problems": problems.iter().map(|(l, m)| json!({"location": l, "message": m})).collect::<Vec<_>>(),
        }));
        return code;
    }
    if problems.is_empty() {
        return report_status(status);
    }
    eprintln!(
        "error: rejected ({}); the running policy is unchanged:",
        reason.as_deref().unwrap_or("FAILED_PRECONDITION")
    );
    for (location, message) in &problems {
        eprintln!("  {location}: {message}");
    }
    code
}

fn bundle_message(dir: &Path, json: bool) -> Result<PolicyBundle, u8> {
    if !dir.is_dir() {
        return Err(missing_dir(dir, json));
    }
    match Bundle::read_dir(dir, None) {
        Ok(bundle) => Ok(PolicyBundle::from(bundle)),
        Err(problems) => {
            report_invalid(dir, &Problems(problems), json);
            Err(EXIT_DENIED)
        }
    }
}

fn short(version: &str) -> &str {
    version.get(..12).unwrap_or(version)
}

fn print_applied(what: &str, r: &ApplyResponse, json: bool) {
    if json {
        print_json(&json!({
            "ok": true,
            "version": r.version,
            "previous_version": r.previous_version,
            "changed": r.changed,
            "tests_run": r.tests_run,
            "not_persisted": r.not_persisted,
        }));
        return;
    }
    if r.changed {
        let previous = if r.previous_version.is_empty() {
            "none"
        } else {
            short(&r.previous_version)
        };
        outln!(
            "{what} version {} (was {previous}); {} policy test cases passed",
            short(&r.version),
            r.tests_run
        );
    } else {
        outln!("unchanged: version {} is already active", short(&r.version));
    }
    if !r.not_persisted.is_empty() {
        outln!("note: {}", r.not_persisted);
    }
    outln!("full version: {}", r.version);
}

pub async fn push(args: PushArgs) -> u8 {
    let bundle = match bundle_message(&args.dir, args.json) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let mut client = match client(&args.admin, args.json).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client
        .apply(ApplyRequest {
            bundle: Some(bundle),
            comment: args.comment,
        })
        .await
    {
        Ok(r) => {
            print_applied("applied", r.get_ref(), args.json);
            EXIT_OK
        }
        Err(status) => failed(&status, args.json),
    }
}

pub async fn rollback(args: RollbackArgs) -> u8 {
    let mut client = match client(&args.admin, args.json).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client
        .rollback(RollbackRequest {
            version: args.version,
            comment: args.comment,
        })
        .await
    {
        Ok(r) => {
            print_applied("rolled back to", r.get_ref(), args.json);
            EXIT_OK
        }
        Err(status) => failed(&status, args.json),
    }
}

fn time_of(us: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(us);
    humantime::format_rfc3339_seconds(at).to_string()
}

fn info_json(i: &PolicyVersionInfo) -> serde_json::Value {
    json!({
        "version": i.version,
        "applied_at": time_of(i.applied_at_us),
        "applied_at_us": i.applied_at_us,
        "applied_by": i.applied_by,
        "comment": i.comment,
        "rules": i.rules,
        "not_persisted": i.not_persisted,
    })
}

fn info_line(i: &PolicyVersionInfo) -> String {
    let comment = if i.comment.is_empty() {
        String::new()
    } else {
        format!(" \"{}\"", i.comment)
    };
    format!(
        "{}  {}  by {}  ({} rules){comment}",
        short(&i.version),
        time_of(i.applied_at_us),
        i.applied_by,
        i.rules
    )
}

pub async fn status(args: StatusArgs) -> u8 {
    let mut client = match client(&args.admin, args.json).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let s = match client.status(StatusRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(status) => return failed(&status, args.json),
    };
    if args.json {
        print_json(&json!({
            "ok": true,
            "active": s.active.as_ref().map(info_json),
            "last_error": (!s.last_error.is_empty()).then(|| s.last_error.clone()),
            "last_error_at": (s.last_error_at_us > 0).then(|| time_of(s.last_error_at_us)),
            "history": s.history.iter().map(info_json).collect::<Vec<_>>(),
            "shadow": s.shadow.as_ref().map(info_json),
            "shadow_differences": s.shadow_differences,
            "store": s.store,
        }));
        return EXIT_OK;
    }
    match &s.active {
        Some(active) => {
            outln!("active:  {}", info_line(active));
            outln!("         version {}", active.version);
            if !active.not_persisted.is_empty() {
                outln!("         note: {}", active.not_persisted);
            }
        }
        None => {
            outln!("active:  none — no valid policy; every call is denied POLICY_UNAVAILABLE")
        }
    }
    outln!("store:   {}", s.store);
    if !s.last_error.is_empty() {
        outln!(
            "last reload error ({}): the running policy was kept\n  {}",
            time_of(s.last_error_at_us),
            s.last_error.replace('\n', "\n  ")
        );
    }
    match &s.shadow {
        Some(shadow) => outln!(
            "shadow:  {}; {} calls decided differently",
            info_line(shadow),
            s.shadow_differences
        ),
        None => outln!("shadow:  none"),
    }
    outln!("history (newest first; `pdgate policy rollback VERSION`):");
    for i in &s.history {
        outln!("  {}", info_line(i));
    }
    EXIT_OK
}

pub async fn explain(args: ExplainArgs) -> u8 {
    let request = args.request.request();
    let subjects = if args.request.has_inline_state() {
        let state = args.request.inline_state();
        request
            .subjects
            .iter()
            .map(|s| ExplainSubject {
                subject: s.clone(),
                consent: state.consent.iter().cloned().collect(),
                comms_consent: state.comms_consent.iter().cloned().collect(),
                use_suspended: state.use_suspended,
                provision_suspended: state.provision_suspended,
                deletion_requested: state.deletion_requested,
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut client = match client(&args.admin, args.json).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let check = CheckRequest {
        caller: request.caller.clone(),
        purpose: request.purpose.clone(),
        action: request.action.clone(),
        categories: request.categories.clone(),
        subjects: request.subjects.clone(),
        recipient: request.recipient.clone().unwrap_or_default(),
        minimizable: request.minimizable.clone(),
    };
    let r = match client
        .explain(ExplainRequest {
            request: Some(check),
            subjects,
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return failed(&status, args.json),
    };
    let decision = r.decision.unwrap_or_default();
    if args.json {
        print_json(&json!({
            "decision": if decision.allowed { "allow" } else { "deny" },
            "decision_id": decision.decision_id,
            "policy_version": decision.policy_version,
            "reasons": decision.reasons.iter().map(|x| json!({"code": x.code, "clause": x.clause, "detail": x.detail})).collect::<Vec<_>>(),
            "matched_rules": decision.matched_rules.iter().map(|m| json!({"rule": m.rule, "line": m.line})).collect::<Vec<_>>(),
            "stages": r.stages.iter().map(|s| json!({
                "stage": s.stage,
                "outcome": s.outcome,
                "reasons": s.reasons.iter().map(|x| json!({"code": x.code, "clause": x.clause, "detail": x.detail})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }));
    } else {
        let subjects = if request.subjects.is_empty() {
            String::new()
        } else {
            format!(" (subject {})", request.subjects.join(", "))
        };
        outln!(
            "{} `{}` {} `{} {}` for `{}`{subjects}",
            if decision.allowed { "ALLOW" } else { "DENY" },
            request.caller,
            if decision.allowed { "may" } else { "may not" },
            request.action,
            request.categories.join("`, `"),
            request.purpose
        );
        for stage in &r.stages {
            outln!("  {:<17} {}", stage.stage, stage.outcome);
            for reason in &stage.reasons {
                outln!("      {} {}: {}", reason.code, reason.clause, reason.detail);
            }
        }
        // Matched rules are the deny rows when a rule denied, else the grants that matched
        // (a later stage may still have denied).
        let by = if decision.reasons.iter().any(|r| r.code == "DENIED_BY_RULE") {
            "denied by"
        } else {
            "granted by"
        };
        for rule in &decision.matched_rules {
            outln!("  {by} policy.csv:{} `{}`", rule.line, rule.rule);
        }
        outln!(
            "  policy {}, decision {} (not an access: audited as an admin action)",
            short(&decision.policy_version),
            decision.decision_id
        );
    }
    if decision.allowed {
        EXIT_OK
    } else {
        EXIT_DENIED
    }
}

pub async fn shadow(args: ShadowArgs) -> u8 {
    let bundle = match (&args.dir, args.clear) {
        (Some(dir), false) => match bundle_message(dir, args.json) {
            Ok(b) => Some(b),
            Err(code) => return code,
        },
        _ => None,
    };
    let mut client = match client(&args.admin, args.json).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match bundle {
        Some(bundle) => match client
            .set_shadow(ApplyRequest {
                bundle: Some(bundle),
                comment: args.comment,
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                if args.json {
                    print_json(&json!({
                        "ok": true,
                        "shadow_version": r.version,
                        "active_version": r.previous_version,
                        "tests_run": r.tests_run,
                    }));
                } else {
                    outln!(
                        "shadow version {} loaded next to active {}; {} policy test cases passed",
                        short(&r.version),
                        if r.previous_version.is_empty() {
                            "none"
                        } else {
                            short(&r.previous_version)
                        },
                        r.tests_run
                    );
                    outln!("see the differences with `pdgate policy status`");
                }
                EXIT_OK
            }
            Err(status) => failed(&status, args.json),
        },
        None => match client.clear_shadow(ClearShadowRequest {}).await {
            Ok(r) => {
                let r = r.into_inner();
                if args.json {
                    print_json(&json!({
                        "ok": true,
                        "cleared_version": (!r.version.is_empty()).then(|| r.version.clone()),
                        "differences": r.differences,
                    }));
                } else if r.version.is_empty() {
                    outln!("no shadow policy was loaded");
                } else {
                    outln!(
                        "shadow version {} cleared; it decided {} calls differently",
                        short(&r.version),
                        r.differences
                    );
                }
                EXIT_OK
            }
            Err(status) => failed(&status, args.json),
        },
    }
}
