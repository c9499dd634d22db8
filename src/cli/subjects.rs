//! `pdgate subjects`: record and inspect the data subjects' consent and requests (§7), directly
//! in the registry — the embedded SQLite file (`--store`, the default) or PostgreSQL
//! (`--database-url`) — or through a running sidecar's `SubjectRights` API (`--admin ADDR`,
//! with `--as IDENTITY` or a client certificate), which records the verified identity as the
//! actor and audits the change. Output and exit codes are the same either way.
//!
//! The admin mode is chosen when `--admin`, `--as` or `--cert` is given (or `PDGATE_ADMIN` is
//! set); `--admin` has a default address, so its mere default does not choose it.

use super::admin_client::{AdminArgs, AdminChannel, report_status};
use super::{EXIT_DENIED, EXIT_OK, EXIT_USAGE, print_json};
use crate::proto::v1::subject_rights_client::SubjectRightsClient;
use crate::proto::v1::{
    ConsentRequest, GetSubjectRequest, SubjectChangeRequest, SubjectStateResponse,
};
use crate::registry::{
    Action, Change, Event, PostgresRegistry, RegistryError, SqliteRegistry, SubjectRecord,
    SubjectRegistry,
};
use crate::subjects::SubjectState;
use clap::{ArgGroup, Args, Subcommand};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

#[derive(Debug, Subcommand)]
#[command(after_help = "Examples:\n  \
pdgate subjects consent cust-1 --purpose marketing --actor alice --source REQ-123\n  \
pdgate subjects consent cust-1 --purpose marketing.email --comms --actor alice\n  \
pdgate subjects suspend cust-1 --provision --actor alice --source REQ-124\n  \
pdgate subjects history cust-1 --json\n  \
pdgate subjects consent cust-1 --purpose marketing --source REQ-125 --admin 127.0.0.1:9090 --as privacy-office\n\n\
With --admin (or --as, --cert) the command goes through a running sidecar's SubjectRights API: \
the sidecar checks the privacy-office role, records the identity it verified as the actor, \
audits the change and honours it on its next call.")]
pub enum SubjectsCommand {
    /// Record the subject's consent to a purpose (it covers the purpose's children).
    Consent(ConsentArgs),
    /// Record the withdrawal of the subject's consent to a purpose.
    Withdraw(ConsentArgs),
    /// Record the subject's request to stop the use of their data (--use) or its provision to
    /// third parties (--provision).
    Suspend(SuspendArgs),
    /// End a suspension of use (--use) or of third-party provision (--provision).
    Resume(SuspendArgs),
    /// Record the subject's request for the deletion of their data.
    Delete(DeleteArgs),
    /// Print the subject's current state and its version.
    Show(ReadArgs),
    /// Print every change to the subject, oldest first, with time, actor and source.
    History(ReadArgs),
}

/// Where the registry is. Shared with `pdgate check`, which reads it.
#[derive(Debug, Args)]
pub(super) struct StoreArgs {
    /// The embedded registry: a SQLite file, created by the first change.
    #[arg(
        long = "subjects-store",
        value_name = "PATH",
        env = "PDGATE_SUBJECTS",
        default_value = "subjects.db"
    )]
    store: PathBuf,
    /// Deprecated spelling of --subjects-store.
    #[arg(
        long = "store",
        value_name = "PATH",
        hide = true,
        value_parser = super::deprecated_flag::<PathBuf>("--store", "--subjects-store")
    )]
    old_store: Option<PathBuf>,
    /// A PostgreSQL registry (fleet) instead of the file, e.g.
    /// `postgres://pdgate@db:5432/pdgate`.
    #[arg(
        long,
        value_name = "URL",
        env = "PDGATE_DATABASE_URL",
        hide_env_values = true,
        conflicts_with_all = ["store", "old_store"]
    )]
    database_url: Option<String>,
}

/// Who makes a change.
#[derive(Debug, Args)]
struct Who {
    /// Who makes the change (a person of the privacy office, a service): recorded in the
    /// history. Required with `--subjects-store`/`--database-url`; with `--admin` the actor is the
    /// identity the sidecar verified, and this flag is refused.
    #[arg(long, value_name = "NAME")]
    actor: Option<String>,
    /// Where the change comes from, e.g. the privacy office's request id.
    #[arg(long, value_name = "REF")]
    source: Option<String>,
    /// Print one JSON object (the new state) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("remote").multiple(true).args(["addr", "identity", "cert"]).conflicts_with_all(["store", "old_store", "database_url"])))]
pub struct ConsentArgs {
    /// The data subject's id, as in x-data-subject.
    #[arg(value_name = "SUBJECT")]
    subject: String,
    /// The purpose of use, e.g. `marketing` or `marketing.email`.
    #[arg(long, value_name = "PURPOSE")]
    purpose: String,
    /// Consent to the use of communications data (§5) for the purpose, which is recorded apart
    /// from ordinary consent.
    #[arg(long)]
    comms: bool,
    #[command(flatten)]
    who: Who,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["use", "provision"])))]
#[command(group(ArgGroup::new("remote").multiple(true).args(["addr", "identity", "cert"]).conflicts_with_all(["store", "old_store", "database_url"])))]
pub struct SuspendArgs {
    /// The data subject's id, as in x-data-subject.
    #[arg(value_name = "SUBJECT")]
    subject: String,
    /// The use of the subject's data, for every purpose except answering their own requests,
    /// billing for service given and fraud.
    #[arg(long = "use", id = "use")]
    use_: bool,
    /// The provision of the subject's data to third parties.
    #[arg(long)]
    provision: bool,
    #[command(flatten)]
    who: Who,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("remote").multiple(true).args(["addr", "identity", "cert"]).conflicts_with_all(["store", "old_store", "database_url"])))]
pub struct DeleteArgs {
    /// The data subject's id, as in x-data-subject.
    #[arg(value_name = "SUBJECT")]
    subject: String,
    #[command(flatten)]
    who: Who,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("remote").multiple(true).args(["addr", "identity", "cert"]).conflicts_with_all(["store", "old_store", "database_url"])))]
pub struct ReadArgs {
    /// The data subject's id, as in x-data-subject.
    #[arg(value_name = "SUBJECT")]
    subject: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    admin: AdminArgs,
}

impl StoreArgs {
    /// Opens the registry. With `create`, a missing SQLite file is created; without it, a
    /// missing file is `Ok(None)` (nothing recorded yet), so that reading leaves no file behind.
    pub(super) async fn open(
        &self,
        create: bool,
    ) -> Result<Option<Box<dyn SubjectRegistry>>, RegistryError> {
        if let Some(url) = &self.database_url {
            return Ok(Some(Box::new(PostgresRegistry::connect(url).await?)));
        }
        let store = if create {
            Some(SqliteRegistry::open(self.path()).await?)
        } else {
            SqliteRegistry::open_existing(self.path()).await?
        };
        Ok(store.map(|s| Box::new(s) as Box<dyn SubjectRegistry>))
    }

    /// The SQLite file, for the message that it does not exist.
    pub(super) fn path(&self) -> &std::path::Path {
        self.old_store.as_deref().unwrap_or(&self.store)
    }
}

pub async fn run(command: SubjectsCommand) -> u8 {
    match command {
        SubjectsCommand::Consent(a) => {
            let action = Action::Consent {
                purpose: a.purpose,
                communications: a.comms,
            };
            change(&a.store, &a.admin, a.subject, action, a.who).await
        }
        SubjectsCommand::Withdraw(a) => {
            let action = Action::Withdraw {
                purpose: a.purpose,
                communications: a.comms,
            };
            change(&a.store, &a.admin, a.subject, action, a.who).await
        }
        SubjectsCommand::Suspend(a) => {
            let action = if a.use_ {
                Action::SuspendUse
            } else {
                Action::SuspendProvision
            };
            change(&a.store, &a.admin, a.subject, action, a.who).await
        }
        SubjectsCommand::Resume(a) => {
            let action = if a.use_ {
                Action::ResumeUse
            } else {
                Action::ResumeProvision
            };
            change(&a.store, &a.admin, a.subject, action, a.who).await
        }
        SubjectsCommand::Delete(a) => {
            change(
                &a.store,
                &a.admin,
                a.subject,
                Action::RequestDeletion,
                a.who,
            )
            .await
        }
        SubjectsCommand::Show(a) if admin_mode(&a.admin) => remote_show(a).await,
        SubjectsCommand::History(a) if admin_mode(&a.admin) => remote_history(a).await,
        SubjectsCommand::Show(a) => show(a).await,
        SubjectsCommand::History(a) => history(a).await,
    }
}

/// Whether the command goes through a running sidecar: `--admin` given (on the command line
/// or in `PDGATE_ADMIN`), or an identity to present (`--as`, `--cert`). `--admin`'s default
/// address alone does not count, so that `pdgate subjects show cust-1` keeps reading the file.
fn admin_mode(admin: &AdminArgs) -> bool {
    admin.identity.is_some()
        || admin.cert.is_some()
        || std::env::var_os("PDGATE_ADMIN").is_some()
        || std::env::args_os().any(|a| {
            a.to_str()
                .is_some_and(|a| a == "--admin" || a.starts_with("--admin="))
        })
}

/// Exit code for a registry error, after printing it.
fn failed(e: &RegistryError) -> u8 {
    eprintln!("error: {e}");
    if e.is_input() {
        EXIT_USAGE
    } else {
        EXIT_DENIED
    }
}

async fn change(
    store: &StoreArgs,
    admin: &AdminArgs,
    subject: String,
    action: Action,
    who: Who,
) -> u8 {
    if admin_mode(admin) {
        return remote_change(admin, subject, action, who).await;
    }
    let Some(actor) = who.actor else {
        eprintln!(
            "error: `--actor NAME` is required when changing the registry directly (with \
             `--admin`, the actor is the identity the sidecar verifies)"
        );
        return EXIT_USAGE;
    };
    let change = Change {
        subject,
        action,
        actor,
        source: who.source,
    };
    // Refused before the store is opened, so bad input never creates a file.
    if let Err(e) = change.validate() {
        return failed(&RegistryError::Invalid(e));
    }
    let registry = match store.open(true).await {
        Ok(Some(r)) => r,
        Ok(None) => return failed(&not_created(store)),
        Err(e) => return failed(&e),
    };
    let applied = registry.apply(&change).await;
    registry.close().await;
    let record = match applied {
        Ok(r) => r,
        Err(e) => return failed(&e),
    };
    print_change(&change, &record, who.json);
    EXIT_OK
}

/// What a recorded change prints, the same in both modes.
fn print_change(change: &Change, record: &SubjectRecord, json: bool) {
    if json {
        print_json(&record_json(&change.subject, Some(record)));
    } else {
        let source = change
            .source
            .as_deref()
            .map_or_else(String::new, |s| format!(", source {s}"));
        outln!(
            "recorded {} for `{}` (version {}, by {}{source})",
            change.action,
            change.subject,
            record.version,
            change.actor
        );
        print_record(&change.subject, Some(record));
    }
    for note in withdrawal_notes(&change.action, record) {
        eprintln!("note: {note}");
    }
}

/// Connects to the sidecar's API; on failure prints why and returns the exit code.
async fn connect(admin: &AdminArgs) -> Result<SubjectRightsClient<AdminChannel>, u8> {
    match admin.connect().await {
        Ok(channel) => Ok(SubjectRightsClient::new(channel)),
        Err(e) => {
            eprintln!("error: {e}");
            Err(e.exit_code())
        }
    }
}

/// A change through `SubjectRights`. Checked here first (exit 2 without a round trip); the
/// sidecar checks again.
async fn remote_change(admin: &AdminArgs, subject: String, action: Action, who: Who) -> u8 {
    if who.actor.is_some() {
        eprintln!(
            "error: `--actor` cannot be used with `--admin`: the sidecar records the identity it \
             verified (`--as` or the client certificate) as the actor"
        );
        return EXIT_USAGE;
    }
    let actor = admin
        .identity
        .clone()
        .unwrap_or_else(|| "the client certificate's identity".to_owned());
    let change = Change {
        subject,
        action,
        actor,
        source: who.source,
    };
    if let Err(e) = change.validate() {
        return failed(&RegistryError::Invalid(e));
    }
    let mut client = match connect(admin).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let source = change.source.clone().unwrap_or_default();
    let subject = change.subject.clone();
    let answer = match &change.action {
        Action::Consent {
            purpose,
            communications,
        }
        | Action::Withdraw {
            purpose,
            communications,
        } => {
            let request = ConsentRequest {
                subject,
                purpose: purpose.clone(),
                communications: *communications,
                source,
            };
            if matches!(change.action, Action::Consent { .. }) {
                client.set_consent(request).await
            } else {
                client.withdraw_consent(request).await
            }
        }
        other => {
            let request = SubjectChangeRequest { subject, source };
            match other {
                Action::SuspendUse => client.suspend_use(request).await,
                Action::ResumeUse => client.resume_use(request).await,
                Action::SuspendProvision => client.suspend_provision(request).await,
                Action::ResumeProvision => client.resume_provision(request).await,
                _ => client.request_deletion(request).await,
            }
        }
    };
    match answer {
        Ok(response) => {
            let record = record_of(response.into_inner());
            print_change(&change, &record, who.json);
            EXIT_OK
        }
        Err(status) => report_status(&status),
    }
}

async fn remote_show(args: ReadArgs) -> u8 {
    if let Err(e) = crate::registry::validate_subject(&args.subject) {
        return failed(&RegistryError::Invalid(e));
    }
    let mut client = match connect(&args.admin).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let request = GetSubjectRequest {
        subject: args.subject.clone(),
    };
    let record = match client.get(request).await {
        Ok(response) => record_of(response.into_inner()),
        Err(status) => return report_status(&status),
    };
    // Version 0 is a subject never changed: no record, as the direct mode says.
    let record = (record.version > 0).then_some(record);
    if args.json {
        print_json(&record_json(&args.subject, record.as_ref()));
    } else {
        print_record(&args.subject, record.as_ref());
    }
    EXIT_OK
}

async fn remote_history(args: ReadArgs) -> u8 {
    if let Err(e) = crate::registry::validate_subject(&args.subject) {
        return failed(&RegistryError::Invalid(e));
    }
    let mut client = match connect(&args.admin).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let request = GetSubjectRequest {
        subject: args.subject.clone(),
    };
    let response = match client.history(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return report_status(&status),
    };
    let mut events = Vec::with_capacity(response.events.len());
    for e in response.events {
        let purpose = (!e.purpose.is_empty()).then_some(e.purpose);
        let Some(action) = Action::from_row(&e.change, purpose, e.communications) else {
            eprintln!(
                "error: the sidecar answered a change this version does not know: `{}`",
                e.change
            );
            return EXIT_DENIED;
        };
        events.push(Event {
            subject: args.subject.clone(),
            version: e.version,
            at: UNIX_EPOCH + Duration::from_micros(e.at_us),
            actor: e.actor,
            source: (!e.source.is_empty()).then_some(e.source),
            action,
        });
    }
    if args.json {
        print_json(&json!({ "subject": args.subject, "events": events }));
    } else {
        print_history(&args.subject, &events);
    }
    EXIT_OK
}

fn record_of(r: SubjectStateResponse) -> SubjectRecord {
    SubjectRecord {
        state: SubjectState {
            consent: r.consent.into_iter().collect(),
            comms_consent: r.comms_consent.into_iter().collect(),
            use_suspended: r.use_suspended,
            provision_suspended: r.provision_suspended,
            deletion_requested: r.deletion_requested,
        },
        version: r.version,
    }
}

/// `open(true)` always yields a store; this is the error if it ever does not.
fn not_created(store: &StoreArgs) -> RegistryError {
    RegistryError::Corrupt {
        location: format!("`{}`", store.path().display()),
        detail: "the file was not created".into(),
    }
}

/// The registry does not know the purpose tree, but purpose ids are dotted paths: after a
/// withdrawal, say which consents of the same kind still cover the purpose (a parent) or remain
/// below it (children), so the privacy office can tell whether the subject's wish is met.
fn withdrawal_notes(action: &Action, record: &SubjectRecord) -> Vec<String> {
    let Action::Withdraw {
        purpose,
        communications,
    } = action
    else {
        return Vec::new();
    };
    let consents = if *communications {
        &record.state.comms_consent
    } else {
        &record.state.consent
    };
    let mut notes = Vec::new();
    for other in consents {
        if purpose.starts_with(&format!("{other}.")) {
            notes.push(format!(
                "the consent to `{other}` still covers `{purpose}`: withdraw `{other}` to stop it"
            ));
        } else if other.starts_with(&format!("{purpose}.")) {
            notes.push(format!(
                "the consent to `{other}` (below `{purpose}`) remains: withdraw it too if the subject asked"
            ));
        }
    }
    notes
}

async fn show(args: ReadArgs) -> u8 {
    if let Err(e) = crate::registry::validate_subject(&args.subject) {
        return failed(&RegistryError::Invalid(e));
    }
    let record = match args.store.open(false).await {
        Ok(None) => {
            warn_absent(&args.store);
            None
        }
        Ok(Some(registry)) => {
            let got = registry.get(&args.subject).await;
            registry.close().await;
            match got {
                Ok(r) => r,
                Err(e) => return failed(&e),
            }
        }
        Err(e) => return failed(&e),
    };
    if args.json {
        print_json(&record_json(&args.subject, record.as_ref()));
    } else {
        print_record(&args.subject, record.as_ref());
    }
    EXIT_OK
}

async fn history(args: ReadArgs) -> u8 {
    if let Err(e) = crate::registry::validate_subject(&args.subject) {
        return failed(&RegistryError::Invalid(e));
    }
    let events = match args.store.open(false).await {
        Ok(None) => {
            warn_absent(&args.store);
            Vec::new()
        }
        Ok(Some(registry)) => {
            let got = registry.history(&args.subject).await;
            registry.close().await;
            match got {
                Ok(events) => events,
                Err(e) => return failed(&e),
            }
        }
        Err(e) => return failed(&e),
    };
    if args.json {
        print_json(&json!({ "subject": args.subject, "events": events }));
    } else {
        print_history(&args.subject, &events);
    }
    EXIT_OK
}

pub(super) fn warn_absent(store: &StoreArgs) {
    eprintln!(
        "warning: no subject registry at `{}` (it is created by the first change, or give \
         --subjects-store PATH / --database-url URL): nothing is recorded for anyone",
        store.path().display()
    );
}

/// `{"subject", "recorded", "version", "state", "deletion_requested"}`; version 0 and the
/// default state for a subject never changed.
fn record_json(subject: &str, record: Option<&SubjectRecord>) -> serde_json::Value {
    let none = SubjectRecord::default();
    let r = record.unwrap_or(&none);
    json!({
        "subject": subject,
        "recorded": record.is_some(),
        "version": r.version,
        "state": r.state,
        "deletion_requested": r.state.deletion_requested,
    })
}

fn print_record(subject: &str, record: Option<&SubjectRecord>) {
    let Some(r) = record else {
        outln!("`{subject}`: no record (no consent, nothing suspended)");
        return;
    };
    let list = |set: &std::collections::BTreeSet<String>| {
        if set.is_empty() {
            "none".to_owned()
        } else {
            set.iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let suspended = |b: bool| if b { "SUSPENDED" } else { "not suspended" };
    outln!("`{subject}` version {}", r.version);
    outln!("  consent: {}", list(&r.state.consent));
    outln!(
        "  consent to communications data: {}",
        list(&r.state.comms_consent)
    );
    outln!("  use: {}", suspended(r.state.use_suspended));
    outln!(
        "  third-party provision: {}",
        suspended(r.state.provision_suspended)
    );
    if r.state.deletion_requested {
        outln!("  deletion: REQUESTED");
    }
}

fn print_history(subject: &str, events: &[Event]) {
    if events.is_empty() {
        outln!("`{subject}`: no changes recorded");
        return;
    }
    outln!(
        "`{subject}`: {} change{}",
        events.len(),
        if events.len() == 1 { "" } else { "s" }
    );
    for e in events {
        let source = e
            .source
            .as_deref()
            .map_or_else(String::new, |s| format!(", source {s}"));
        outln!(
            "  v{:<4} {}  {} (by {}{source})",
            e.version,
            humantime::format_rfc3339_micros(e.at),
            e.action,
            e.actor
        );
    }
}
