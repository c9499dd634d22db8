//! `pdgate policy diff --candidate DIR --audit PATH`: which recorded decisions a candidate
//! policy would flip (see [`crate::replay`]).

use super::{EXIT_DENIED, EXIT_OK, EXIT_USAGE, print_json};
use crate::audit::read::Filter;
use crate::policy;
use crate::registry::{SqliteRegistry, SubjectRegistry};
use crate::replay::{self, Replay, SubjectBasis};
use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
pdgate policy diff --candidate ../policy-next --audit audit/\n  \
pdgate policy diff --candidate ../policy-next --audit audit/ --purpose marketing --json\n  \
pdgate policy diff --candidate ../policy-next --audit audit/ --subjects-store subjects.db\n\n\
Exit codes: 0 nothing flips (or --allow-flips), 1 decisions flip or the candidate is invalid, \
2 bad input.")]
pub struct DiffArgs {
    /// The candidate policy directory (model.conf, policy.csv, taxonomy.toml, routes.yaml).
    #[arg(long, value_name = "DIR")]
    candidate: PathBuf,
    /// The audit log directory whose decisions are replayed [default: audit].
    #[arg(long, value_name = "DIR", env = "PDGATE_AUDIT")]
    audit: Option<PathBuf>,
    /// Decide stage 5 against this subject registry's current state (a SQLite file) instead
    /// of a state that reproduces each recorded outcome.
    #[arg(long, value_name = "PATH")]
    subjects_store: Option<PathBuf>,
    /// Replay only records of this caller.
    #[arg(long, value_name = "CALLER")]
    caller: Option<String>,
    /// Replay only records of this purpose (or one below it).
    #[arg(long, value_name = "PURPOSE")]
    purpose: Option<String>,
    /// Replay only records at or after TIME: RFC 3339 or a duration back from now (24h, 7days).
    #[arg(long, value_name = "TIME", value_parser = super::parse_time)]
    since: Option<u64>,
    /// Deprecated: --since in microseconds since the Unix epoch.
    #[arg(long, value_name = "US", hide = true, conflicts_with = "since",
        value_parser = super::deprecated_flag::<u64>("--since-us", "--since"))]
    since_us: Option<u64>,
    /// Exit 0 even when decisions flip (a change meant to flip them).
    #[arg(long)]
    allow_flips: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(mut args: DiffArgs) -> u8 {
    // `PDGATE_AUDIT_DIR` was this command's own name for `PDGATE_AUDIT`.
    let audit = args
        .audit
        .take()
        .or_else(|| super::output::env_var("PDGATE_AUDIT", "PDGATE_AUDIT_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("audit"));
    if !args.candidate.is_dir() {
        eprintln!(
            "error: `--candidate {}`: not a policy directory",
            args.candidate.display()
        );
        return EXIT_USAGE;
    }
    if !audit.is_dir() {
        eprintln!(
            "error: `--audit {}`: not an audit log directory (pdgate.toml [audit] dir)",
            audit.display()
        );
        return EXIT_USAGE;
    }
    let candidate = match policy::load_dir(&args.candidate).await {
        Ok(s) => s,
        Err(problems) => {
            eprintln!(
                "error: the candidate `{}` is not a valid policy:",
                args.candidate.display()
            );
            for p in &problems.0 {
                eprintln!("  {p}");
            }
            return EXIT_DENIED;
        }
    };
    let registry = match &args.subjects_store {
        None => None,
        Some(path) => match SqliteRegistry::open_existing(path).await {
            Ok(Some(r)) => Some(r),
            Ok(None) => {
                eprintln!(
                    "error: `--subjects-store {}`: no subject registry there",
                    path.display()
                );
                return EXIT_USAGE;
            }
            Err(e) => {
                eprintln!("error: `--subjects-store {}`: {e}", path.display());
                return EXIT_DENIED;
            }
        },
    };
    let basis = match &registry {
        Some(r) => SubjectBasis::Registry(r as &dyn SubjectRegistry),
        None => SubjectBasis::AsRecorded,
    };
    let filter = Filter {
        caller: args.caller.clone(),
        purpose: args.purpose.clone(),
        since_us: args.since.or(args.since_us),
        ..Filter::default()
    };
    let result = replay::replay(&audit, &filter, &candidate, basis).await;
    if let Some(r) = registry {
        r.close().await;
    }
    let replay = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_DENIED;
        }
    };
    if args.json {
        print_json(&serde_json::to_value(&replay).unwrap_or_default());
    } else {
        print_text(&args, &audit, &replay);
    }
    if replay.flips == 0 || args.allow_flips {
        EXIT_OK
    } else {
        EXIT_DENIED
    }
}

fn print_text(args: &DiffArgs, audit: &std::path::Path, r: &Replay) {
    outln!(
        "replayed {} decisions from `{}` under candidate `{}` (policy {}); {} records skipped (admin actions, audit failures)",
        r.replayed,
        audit.display(),
        args.candidate.display(),
        &r.candidate_version[..r.candidate_version.len().min(12)],
        r.skipped
    );
    match &args.subjects_store {
        Some(path) => outln!(
            "subject state: the registry `{}` as it is now (a flip may come from a consent given or withdrawn since)",
            path.display()
        ),
        None => outln!(
            "subject state: as recorded (a consent requirement the candidate adds does not flip a recorded allow; pass --subjects-store to decide against the registry)"
        ),
    }
    if r.flips == 0 {
        outln!("no decision flips");
        return;
    }
    outln!(
        "{} {}: {} allow -> deny, {} deny -> allow (newly allowed)",
        r.flips,
        if r.flips == 1 {
            "decision flips"
        } else {
            "decisions flip"
        },
        r.allow_to_deny,
        r.deny_to_allow
    );
    let group = |title: &str, counts: &BTreeMap<String, u64>| {
        let mut sorted: Vec<(&String, &u64)> = counts.iter().collect();
        sorted.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        outln!("by {title}:");
        for (name, n) in sorted {
            let name = if name.is_empty() { "(none)" } else { name };
            outln!("  {n:>8}  {name}");
        }
    };
    group("purpose", &r.by_purpose);
    group("category", &r.by_category);
    group("caller", &r.by_caller);
    group("clause", &r.by_clause);
    outln!("first {} flips:", r.examples.len());
    for f in &r.examples {
        let recorded = if f.recorded_reasons.is_empty() {
            f.recorded.clone()
        } else {
            format!("{} ({})", f.recorded, f.recorded_reasons.join(", "))
        };
        let candidate = if f.candidate_reasons.is_empty() {
            f.candidate.clone()
        } else {
            format!("{} ({})", f.candidate, f.candidate_reasons.join(", "))
        };
        outln!(
            "  #{} {} {} {} {} [{}] subjects [{}]: {recorded} -> {candidate}",
            f.seq,
            f.caller,
            f.purpose,
            f.action,
            f.method.as_deref().unwrap_or("check"),
            f.categories.join(","),
            f.subjects.join(","),
        );
    }
}
