//! `pdgate check`: decide one request against a policy directory, as the sidecar would.

use super::subjects::{StoreArgs, warn_absent};
use super::{EXIT_DENIED, EXIT_OK, EXIT_USAGE, policy_cmd::report_invalid, print_json};
use crate::decision::{CacheSettings, Decider, Decision, Request};
use crate::policy::{self, Snapshot};
use crate::registry::Preloaded;
use crate::subjects::{InMemorySubjects, SubjectState, SubjectStates};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Args)]
#[command(
    after_help = "The subject's state is read from the registry (--subjects-store, default subjects.db, \
or --database-url), as `pdgate subjects` recorded it; a registry that cannot be read denies \
SUBJECT_STATE_UNAVAILABLE. The flags --consent, --comms-consent, --suspend-use, \
--suspend-provision and --deletion-requested give the state inline instead (the registry is not \
read).\n\n\
An unknown caller, purpose, category or action is not an input error: it is denied with its \
reason code (exit 1), exactly as the sidecar decides it.\n\n\
Examples:\n  \
pdgate check --caller marketing-service --purpose marketing.email --action read \\\n      \
--category customer.contact.email --subject cust-1 --consent marketing\n  \
pdgate check --caller provisioning-service --purpose third_party.interconnect --action read \\\n      \
--category customer.name,customer.usage_history --subject cust-1 --recipient ntt-east --json"
)]
pub struct CheckArgs {
    #[command(flatten)]
    request: RequestArgs,
    /// Where the subject's state is read when no inline state flag is given.
    #[command(flatten)]
    store: StoreArgs,
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

/// The request to decide and the subject's state given inline: the flags `pdgate check` and
/// `pdgate policy explain` share.
#[derive(Debug, Args)]
pub struct RequestArgs {
    /// The calling service (a caller of taxonomy.toml), e.g. `billing-service`.
    #[arg(long, value_name = "CALLER")]
    pub caller: String,
    /// The purpose of use the call declares, e.g. `service.billing`.
    #[arg(long, value_name = "PURPOSE")]
    pub purpose: String,
    /// `read`, `write` or `delete`.
    #[arg(long, value_name = "ACTION")]
    pub action: String,
    /// A category of personal data, e.g. `customer.contact.email`; repeat it or separate with
    /// commas for several.
    #[arg(
        long = "category",
        value_name = "CATEGORY",
        required = true,
        value_delimiter = ','
    )]
    pub categories: Vec<String>,
    /// A data subject the call concerns; repeatable.
    #[arg(long = "subject", value_name = "SUBJECT")]
    pub subjects: Vec<String>,
    /// The company receiving the data when it is not the caller (joint user or third party).
    #[arg(long, value_name = "CALLER")]
    pub recipient: Option<String>,
    /// A category the call can do without: where the purpose may not have it, the call is
    /// allowed and told to leave it out (`minimized`) instead of denied; repeat it or separate
    /// with commas.
    #[arg(long = "minimizable", value_name = "CATEGORY", value_delimiter = ',')]
    pub minimizable: Vec<String>,
    /// The subject consented to PURPOSE (covers its children); repeatable.
    #[arg(
        long = "consent",
        value_name = "PURPOSE",
        requires = "subjects",
        value_delimiter = ','
    )]
    pub consent: Vec<String>,
    /// The subject consented to the use of communications data for PURPOSE; repeatable.
    #[arg(
        long = "comms-consent",
        value_name = "PURPOSE",
        requires = "subjects",
        value_delimiter = ','
    )]
    pub comms_consent: Vec<String>,
    /// The subject asked to stop the use of their data.
    #[arg(long, requires = "subjects")]
    pub suspend_use: bool,
    /// The subject asked to stop providing their data to third parties.
    #[arg(long, requires = "subjects")]
    pub suspend_provision: bool,
    /// The subject asked for their data to be deleted (§7).
    #[arg(long, requires = "subjects")]
    pub deletion_requested: bool,
}

impl RequestArgs {
    /// Whether a subject state flag was given (then the registry is not read).
    pub fn has_inline_state(&self) -> bool {
        !self.consent.is_empty()
            || !self.comms_consent.is_empty()
            || self.suspend_use
            || self.suspend_provision
            || self.deletion_requested
    }

    /// The state the inline flags give each subject.
    pub fn inline_state(&self) -> SubjectState {
        SubjectState {
            consent: self.consent.iter().cloned().collect(),
            comms_consent: self.comms_consent.iter().cloned().collect(),
            use_suspended: self.suspend_use,
            provision_suspended: self.suspend_provision,
            deletion_requested: self.deletion_requested,
        }
    }

    pub fn request(&self) -> Request {
        Request {
            caller: self.caller.clone(),
            purpose: self.purpose.clone(),
            action: self.action.clone(),
            categories: self.categories.clone(),
            subjects: self.subjects.clone(),
            recipient: self.recipient.clone(),
            minimizable: self.minimizable.clone(),
        }
    }
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
    let inline = args.request.has_inline_state();
    let subjects = if inline || args.request.subjects.is_empty() {
        let state = args.request.inline_state();
        let inline: InMemorySubjects = args
            .request
            .subjects
            .iter()
            .map(|s| (s.clone(), state.clone()))
            .collect();
        Subjects::Inline(inline)
    } else {
        match read_registry(&args.store, &args.request.subjects).await {
            Ok(loaded) => loaded,
            Err(code) => return code,
        }
    };
    let request = args.request.request();
    let decider = Decider::with_policy(snapshot.clone(), CacheSettings::default());
    let decision = decider.decide(&request, subjects.states());
    if let Subjects::Registry { loaded, absent } = &subjects
        && loaded.consulted()
    {
        // Only when the decision read a state: otherwise the registry did not matter to it.
        warn_about_registry(&args.store, loaded, *absent, &snapshot);
    }
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

/// Where this check reads the subjects' state.
enum Subjects {
    /// Given on the command line.
    Inline(InMemorySubjects),
    /// Read from the registry before deciding; `absent` when the SQLite file does not exist.
    Registry { loaded: Preloaded, absent: bool },
}

impl Subjects {
    fn states(&self) -> &dyn SubjectStates {
        match self {
            Self::Inline(s) => s,
            Self::Registry { loaded, .. } => loaded,
        }
    }
}

/// Reads the subjects' state from the registry. A store that cannot be opened or read is not
/// an input error: the subjects read as unavailable, so a decision that needs their state is
/// denied (`SUBJECT_STATE_UNAVAILABLE`) and one that does not is unaffected, as in the sidecar.
/// A malformed database URL is an input error (exit 2).
async fn read_registry(store: &StoreArgs, subjects: &[String]) -> Result<Subjects, u8> {
    match store.open(false).await {
        Ok(Some(registry)) => {
            let loaded = Preloaded::load(registry.as_ref(), subjects).await;
            registry.close().await;
            Ok(Subjects::Registry {
                loaded,
                absent: false,
            })
        }
        // Read-only: a registry never written to is empty, and checking creates no file.
        Ok(None) => Ok(Subjects::Registry {
            loaded: Preloaded::absent(subjects),
            absent: true,
        }),
        Err(e) if e.is_input() => {
            eprintln!("error: {e}");
            Err(EXIT_USAGE)
        }
        Err(e) => Ok(Subjects::Registry {
            loaded: Preloaded::unavailable(subjects, &e.to_string()),
            absent: false,
        }),
    }
}

/// Says on stderr why the registry answered as it did: a store that could not be read, no
/// store at all, or a consent to a purpose the policy does not have (it never matches; the
/// registry records purposes as given).
fn warn_about_registry(store: &StoreArgs, loaded: &Preloaded, absent: bool, snapshot: &Snapshot) {
    if absent {
        warn_absent(store);
    }
    let mut failures: Vec<_> = loaded.failures().collect();
    failures.sort_by_key(|(subject, _)| *subject);
    for (subject, e) in failures {
        eprintln!("warning: the state of subject `{subject}` could not be read: {e}");
    }
    let mut states: Vec<_> = loaded.states().collect();
    states.sort_by_key(|(subject, _)| *subject);
    for (subject, state) in states {
        let consents = state.consent.iter().map(|p| (p, ""));
        let comms = state
            .comms_consent
            .iter()
            .map(|p| (p, "the use of communications data for "));
        for (purpose, kind) in consents.chain(comms) {
            if snapshot.purposes().id(purpose).is_none() {
                eprintln!(
                    "warning: subject `{subject}` consented to {kind}`{purpose}`, which is not a \
                     purpose of the policy: that consent never matches"
                );
            }
        }
    }
}

pub(super) fn print_human(request: &Request, decision: &Decision) {
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
        outln!("ALLOW {what}");
        let rules: Vec<String> = decision
            .matched_rules
            .iter()
            .map(|r| format!("policy.csv:{} `{}`", r.line, r.rule))
            .collect();
        outln!("  granted by {}; {tail}", rules.join(", "));
        if !decision.minimized.is_empty() {
            outln!(
                "  minimized (leave out): `{}`",
                decision.minimized.join("`, `")
            );
        }
    } else {
        outln!("DENY {what}");
        for r in &decision.reasons {
            outln!("  {} {}: {}", r.code, r.clause, r.detail);
        }
        outln!("  {tail}");
    }
}
