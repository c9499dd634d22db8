//! `pdgate audit`: verify the chain, query records, follow the log, and the disclosure report
//! for a data subject's request (§7).

use super::{EXIT_DENIED, EXIT_OK, EXIT_USAGE, print_json};
use crate::audit::AuditRecord;
use crate::audit::read::{self, Filter};
use clap::{Args, Subcommand, ValueEnum};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain: exit 0 whole; 1 naming the first modified, deleted, inserted or
    /// reordered record, or a log cut short.
    Verify(DirArgs),
    /// Find records (every filter given must match).
    Query(QueryArgs),
    /// Print the last records, and with --follow the new ones as they are written.
    Tail(TailArgs),
    /// The disclosure report for a data subject: who accessed their data, when, for which
    /// purposes and categories, and which joint users or third parties received it.
    Report(ReportArgs),
}

#[derive(Debug, Args)]
pub struct DirArgs {
    /// The audit log directory.
    #[arg(
        long = "audit",
        value_name = "DIR",
        env = "PDGATE_AUDIT",
        default_value = "audit"
    )]
    dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Times are RFC 3339 (2026-11-27T09:00:00Z) or a duration back from now (1h, 30m, 7days).\n\n\
Examples:\n  pdgate audit query --subject cust-1\n  pdgate audit query --purpose marketing --decision deny --since 24h --json"
)]
pub struct QueryArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// Records about this data subject.
    #[arg(long)]
    subject: Option<String>,
    #[arg(long)]
    caller: Option<String>,
    /// This purpose or one below it (`marketing` finds `marketing.email`).
    #[arg(long)]
    purpose: Option<String>,
    /// This category, one below it or one above it.
    #[arg(long)]
    category: Option<String>,
    #[arg(long, value_enum)]
    decision: Option<DecisionArg>,
    /// A reason code, e.g. CONSENT_REQUIRED.
    #[arg(long)]
    reason: Option<String>,
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    #[arg(long)]
    trace_id: Option<String>,
    #[arg(long)]
    decision_id: Option<String>,
    /// At most this many records (the first ones in log order).
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DecisionArg {
    Allow,
    Deny,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// How many of the last records to print first.
    #[arg(short = 'n', long, default_value_t = 10)]
    lines: usize,
    /// Keep printing new records as they are written.
    #[arg(short, long)]
    follow: bool,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// The data subject whose request this answers.
    #[arg(long)]
    subject: String,
    #[arg(long, value_enum, default_value_t = Format::Md)]
    format: Format,
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Md,
    Html,
}

pub fn run(command: AuditCommand) -> u8 {
    match command {
        AuditCommand::Verify(args) => verify(&args),
        AuditCommand::Query(args) => query(args),
        AuditCommand::Tail(args) => tail(&args),
        AuditCommand::Report(args) => report(&args),
    }
}

fn check_dir(dir: &Path) -> Result<(), u8> {
    if dir.is_dir() {
        Ok(())
    } else {
        eprintln!(
            "error: --audit `{}` is not a directory (give --audit DIR or set PDGATE_AUDIT)",
            dir.display()
        );
        Err(EXIT_USAGE)
    }
}

fn verify(args: &DirArgs) -> u8 {
    if let Err(code) = check_dir(&args.dir) {
        return code;
    }
    match read::verify(&args.dir) {
        Ok(v) => {
            if args.json {
                print_json(&serde_json::json!({
                    "ok": v.ok(), "segments": v.segments, "records": v.records,
                    "last_hash": v.last_hash, "first_break": v.first_break,
                }));
            } else if let Some(b) = &v.first_break {
                let place = match (&b.segment, b.line) {
                    (Some(s), Some(l)) => format!("{s}:{l}: "),
                    _ => String::new(),
                };
                println!(
                    "BROKEN {place}{} ({} records verified before it)",
                    b.what, v.records
                );
            } else {
                println!(
                    "ok: {} records in {} segments, chain whole, last hash {}",
                    v.records, v.segments, v.last_hash
                );
            }
            if v.ok() { EXIT_OK } else { EXIT_DENIED }
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_DENIED
        }
    }
}

/// RFC 3339, or a duration back from now.
fn parse_time(flag: &str, text: &str) -> Result<u64, u8> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(micros(t));
    }
    if let Ok(d) = humantime::parse_duration(text) {
        return Ok(micros(SystemTime::now())
            .saturating_sub(u64::try_from(d.as_micros()).unwrap_or(u64::MAX)));
    }
    eprintln!(
        "error: {flag} `{text}` is neither an RFC 3339 time (2026-11-27T09:00:00Z) nor a duration (1h, 30m)"
    );
    Err(EXIT_USAGE)
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn time_of(r: &AuditRecord) -> String {
    humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(r.body.time_us)).to_string()
}

fn line_of(r: &AuditRecord) -> String {
    let b = &r.body;
    let mut line = format!(
        "{}  #{}  {}  {} {} `{}` for `{}`",
        time_of(r),
        r.seq,
        b.decision.to_uppercase(),
        if b.caller.is_empty() {
            "(no caller)"
        } else {
            &b.caller
        },
        if b.action.is_empty() { "-" } else { &b.action },
        b.categories.join("`, `"),
        b.purpose
    );
    if !b.subjects.is_empty() {
        line.push_str(&format!("  subjects {}", b.subjects.join(",")));
    }
    if let Some(m) = &b.method {
        line.push_str(&format!("  {m}"));
    }
    if !b.reasons.is_empty() {
        let codes: Vec<String> = b
            .reasons
            .iter()
            .map(|r| format!("{} {}", r.code, r.clause))
            .collect();
        line.push_str(&format!("  [{}]", codes.join("; ")));
    }
    line.push_str(&format!("  decision {}", b.decision_id));
    line
}

fn query(args: QueryArgs) -> u8 {
    if let Err(code) = check_dir(&args.dir.dir) {
        return code;
    }
    let since = match args
        .since
        .as_deref()
        .map(|t| parse_time("--since", t))
        .transpose()
    {
        Ok(t) => t,
        Err(code) => return code,
    };
    let until = match args
        .until
        .as_deref()
        .map(|t| parse_time("--until", t))
        .transpose()
    {
        Ok(t) => t,
        Err(code) => return code,
    };
    if let Some(code) = &args.reason
        && crate::decision::ReasonCode::parse(code).is_none()
    {
        eprintln!(
            "error: --reason `{code}` is not a reason code (e.g. CONSENT_REQUIRED, NO_GRANT)"
        );
        return EXIT_USAGE;
    }
    let filter = Filter {
        subject: args.subject,
        caller: args.caller,
        purpose: args.purpose,
        category: args.category,
        decision: args.decision.map(|d| match d {
            DecisionArg::Allow => "allow".to_owned(),
            DecisionArg::Deny => "deny".to_owned(),
        }),
        reason: args.reason,
        since_us: since,
        until_us: until,
        trace_id: args.trace_id,
        decision_id: args.decision_id,
    };
    let mut found = 0usize;
    let result = read::scan(&args.dir.dir, &filter, |r| {
        found += 1;
        if args.dir.json {
            match serde_json::to_value(&r) {
                Ok(v) => print_json(&v),
                Err(e) => eprintln!("error: {e}"),
            }
        } else {
            println!("{}", line_of(&r));
        }
        found < args.limit
    });
    if let Err(e) = result {
        eprintln!("error: {e}");
        return EXIT_DENIED;
    }
    if !args.dir.json {
        eprintln!("{found} record{}", if found == 1 { "" } else { "s" });
    }
    EXIT_OK
}

fn tail(args: &TailArgs) -> u8 {
    if let Err(code) = check_dir(&args.dir.dir) {
        return code;
    }
    let print = |r: &AuditRecord| {
        if args.dir.json {
            if let Ok(v) = serde_json::to_value(r) {
                print_json(&v);
            }
        } else {
            println!("{}", line_of(r));
        }
    };
    let mut last = std::collections::VecDeque::with_capacity(args.lines);
    if let Err(e) = read::scan(&args.dir.dir, &Filter::default(), |r| {
        if last.len() == args.lines {
            last.pop_front();
        }
        last.push_back(r);
        true
    }) {
        eprintln!("error: {e}");
        return EXIT_DENIED;
    }
    let mut seen = last.back().map_or(0, |r: &AuditRecord| r.seq);
    last.iter().for_each(print);
    if !args.follow {
        return EXIT_OK;
    }
    // Follows until interrupted (Ctrl-C ends the process).
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let result = read::scan(&args.dir.dir, &Filter::default(), |r| {
            if r.seq > seen {
                seen = r.seq;
                print(&r);
            }
            true
        });
        if let Err(e) = result {
            eprintln!("error: {e}");
            return EXIT_DENIED;
        }
    }
}

/// One line of the report: a caller's use of the subject's data for one purpose.
#[derive(Default)]
struct Use {
    calls: usize,
    categories: std::collections::BTreeSet<String>,
    first: u64,
    last: u64,
}

fn report(args: &ReportArgs) -> u8 {
    if let Err(code) = check_dir(&args.dir.dir) {
        return code;
    }
    let since = match args
        .since
        .as_deref()
        .map(|t| parse_time("--since", t))
        .transpose()
    {
        Ok(t) => t,
        Err(code) => return code,
    };
    let filter = Filter {
        subject: Some(args.subject.clone()),
        since_us: since,
        ..Filter::default()
    };
    let mut uses: BTreeMap<(String, String, String), Use> = BTreeMap::new();
    let mut received: BTreeMap<(String, String), Use> = BTreeMap::new();
    let mut denied = 0usize;
    let mut total = 0usize;
    let result = read::scan(&args.dir.dir, &filter, |r| {
        total += 1;
        let b = &r.body;
        if b.decision != "allow" {
            denied += 1;
            return true;
        }
        let add = |u: &mut Use| {
            u.calls += 1;
            u.categories.extend(b.categories.iter().cloned());
            u.first = if u.first == 0 {
                b.time_us
            } else {
                u.first.min(b.time_us)
            };
            u.last = u.last.max(b.time_us);
        };
        add(uses
            .entry((b.caller.clone(), b.purpose.clone(), b.action.clone()))
            .or_default());
        // Provision outside the company: a joint-use or third-party purpose (§2, §3).
        if b.purpose.starts_with("joint_use") || b.purpose.starts_with("third_party") {
            let to = b.recipient.clone().unwrap_or_else(|| b.caller.clone());
            add(received.entry((to, b.purpose.clone())).or_default());
        }
        true
    });
    if let Err(e) = result {
        eprintln!("error: {e}");
        return EXIT_DENIED;
    }
    let when = |us: u64| {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_micros(us)).to_string()
    };
    let mut md = format!(
        "# Disclosure report for data subject `{}`\n\nGenerated {} from the audit log `{}` (seed §7: disclosure of held personal data; §6(3): audits).\n\n{total} decisions concern this person: {} allowed, {denied} denied.\n\n## Who used the data, for which purpose\n\n| caller | purpose | action | categories | calls | first | last |\n|---|---|---|---|---|---|---|\n",
        args.subject,
        humantime::format_rfc3339_seconds(SystemTime::now()),
        args.dir.dir.display(),
        total - denied,
    );
    for ((caller, purpose, action), u) in &uses {
        md.push_str(&format!(
            "| {caller} | {purpose} | {action} | {} | {} | {} | {} |\n",
            u.categories.iter().cloned().collect::<Vec<_>>().join(", "),
            u.calls,
            when(u.first),
            when(u.last)
        ));
    }
    md.push_str("\n## Joint users and third parties that received the data (§2, §3)\n\n");
    if received.is_empty() {
        md.push_str("None.\n");
    } else {
        md.push_str("| recipient | purpose | categories | times | first | last |\n|---|---|---|---|---|---|\n");
        for ((to, purpose), u) in &received {
            md.push_str(&format!(
                "| {to} | {purpose} | {} | {} | {} | {} |\n",
                u.categories.iter().cloned().collect::<Vec<_>>().join(", "),
                u.calls,
                when(u.first),
                when(u.last)
            ));
        }
    }
    md.push_str("\nDenied attempts are listed by `pdgate audit query --subject ");
    md.push_str(&args.subject);
    md.push_str(" --decision deny`.\n");
    match args.format {
        Format::Md => print!("{md}"),
        Format::Html => print!("{}", markdown_table_html(&md)),
    }
    EXIT_OK
}

/// The report's Markdown as a standalone HTML page (headings, paragraphs and tables only).
fn markdown_table_html(md: &str) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('`', "")
    };
    let mut html = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Disclosure report</title>\n<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #999;padding:.3em .6em}</style></head><body>\n",
    );
    let mut in_table = false;
    for line in md.lines() {
        if let Some(row) = line.strip_prefix('|') {
            if row.starts_with("---") {
                continue;
            }
            if !in_table {
                html.push_str("<table>\n");
                in_table = true;
            }
            let cells: Vec<String> = row
                .trim_end_matches('|')
                .split('|')
                .map(|c| format!("<td>{}</td>", esc(c.trim())))
                .collect();
            html.push_str(&format!("<tr>{}</tr>\n", cells.concat()));
            continue;
        }
        if in_table {
            html.push_str("</table>\n");
            in_table = false;
        }
        if let Some(h) = line.strip_prefix("## ") {
            html.push_str(&format!("<h2>{}</h2>\n", esc(h)));
        } else if let Some(h) = line.strip_prefix("# ") {
            html.push_str(&format!("<h1>{}</h1>\n", esc(h)));
        } else if !line.trim().is_empty() {
            html.push_str(&format!("<p>{}</p>\n", esc(line)));
        }
    }
    if in_table {
        html.push_str("</table>\n");
    }
    html.push_str("</body></html>\n");
    html
}
