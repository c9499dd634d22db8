//! `pdgate audit`: verify the chain, query records, follow the log, and the disclosure report
//! for a data subject's request (§7).
//!
//! `verify`, `query` and `tail` read a log directory (`--audit DIR`) or ask a running sidecar
//! (`--admin ADDR`, the `AuditLog` API, as an identity with the `auditor` role); the output and
//! the exit codes are the same either way.

use super::admin_client::{AdminArgs, AdminClientError, report_status};
use super::{EXIT_DENIED, EXIT_OK, EXIT_USAGE, output, print_json, report};
use crate::api::audit_log::{MAX_LIMIT, is_reason_code, query_of};
use crate::audit::read::{self, Access, Break, Filter, Verification};
use crate::audit::{Anchor, AuditRecord, RecordKind};
use crate::proto::v1::audit_log_client::AuditLogClient;
use crate::proto::v1::{AuditTailRequest, AuditVerifyRequest, AuditVerifyResponse};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain: exit 0 whole; 1 naming the first modified, deleted, inserted or
    /// reordered record, or a log cut short.
    Verify(Source),
    /// Find records (every filter given must match).
    Query(QueryArgs),
    /// Print the last records, and with --follow the new ones as they are written.
    Tail(TailArgs),
    /// The disclosure report for a data subject: who accessed their data, when, for which
    /// purposes and categories, which joint users or third parties received it, and which of
    /// the person's requests the privacy office handled.
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
    /// Deprecated spelling of --audit.
    #[arg(id = "old_dir", long = "dir", value_name = "DIR", hide = true,
        value_parser = super::deprecated_flag::<PathBuf>("--dir", "--audit"))]
    old_dir: Option<PathBuf>,
}

impl DirArgs {
    fn path(&self) -> &Path {
        self.old_dir.as_deref().unwrap_or(&self.dir)
    }
}

/// `--dir`, the deprecated spelling of `--audit`.
fn old_dir_arg() -> Arg {
    Arg::new("old_dir")
        .long("dir")
        .value_name("DIR")
        .hide(true)
        .help("Deprecated spelling of --audit")
        .value_parser(super::deprecated_flag::<PathBuf>("--dir", "--audit"))
}

/// Where the records come from: a log directory, or a running sidecar's `AuditLog` API.
#[derive(Debug)]
pub struct Source {
    from: Origin,
    json: bool,
}

#[derive(Debug)]
enum Origin {
    Dir(PathBuf),
    /// Boxed: the flags of a connection are many, and most runs read a directory.
    Sidecar(Box<AdminArgs>),
}

// `AdminArgs` gives `--admin` a default address, so whether it was asked for can only be told
// from where its value came from: hence a hand-written `Args` over the derived one.
impl Args for Source {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        AdminArgs::augment_args(cmd)
            .arg(
                Arg::new("audit_dir")
                    .long("audit")
                    .value_name("DIR")
                    .env("PDGATE_AUDIT")
                    .value_parser(clap::value_parser!(PathBuf))
                    .help("The audit log directory (default `audit`); not with --admin"),
            )
            .arg(old_dir_arg())
            .arg(
                Arg::new("json")
                    .long("json")
                    .action(ArgAction::SetTrue)
                    .help("Print JSON instead of text"),
            )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for Source {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut matches.clone())
    }

    fn from_arg_matches_mut(matches: &mut ArgMatches) -> Result<Self, clap::Error> {
        let admin_source = matches.value_source("addr");
        let old_dir = matches.remove_one::<PathBuf>("old_dir");
        let dir_source = if old_dir.is_some() {
            Some(ValueSource::CommandLine)
        } else {
            matches.value_source("audit_dir")
        };
        let admin = AdminArgs::from_arg_matches_mut(matches)?;
        let dir = old_dir.or_else(|| matches.remove_one::<PathBuf>("audit_dir"));
        let json = matches.get_flag("json");
        let on_line = |s: Option<ValueSource>| s == Some(ValueSource::CommandLine);
        let from = match (dir, admin_source, dir_source) {
            (Some(_), a, d) if on_line(a) && on_line(d) => {
                return Err(clap::Error::raw(
                    clap::error::ErrorKind::ArgumentConflict,
                    "--audit DIR reads a log directory and --admin ADDR asks a running sidecar: give one of them\n",
                ));
            }
            (_, a, _) if on_line(a) => Origin::Sidecar(Box::new(admin)),
            (Some(dir), _, _) => Origin::Dir(dir),
            (None, Some(ValueSource::EnvVariable), _) => Origin::Sidecar(Box::new(admin)),
            (None, _, _) => Origin::Dir(PathBuf::from("audit")),
        };
        Ok(Self { from, json })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

#[derive(Debug, Args)]
#[command(
    after_help = "Times are RFC 3339 (2026-11-27T09:00:00Z) or a duration back from now (1h, 30m, 7days).\n\n\
Examples:\n  pdgate audit query --subject cust-1\n  pdgate audit query --purpose marketing --decision deny --since 24h --json\n  pdgate audit query --kind admin --admin 127.0.0.1:9090 --as audit-team"
)]
pub struct QueryArgs {
    #[command(flatten)]
    source: Source,
    /// Records about this data subject.
    #[arg(long)]
    subject: Option<String>,
    /// The caller (for admin records: the identity that acted).
    #[arg(long)]
    caller: Option<String>,
    /// This purpose or one below it (`marketing` finds `marketing.email`).
    #[arg(long)]
    purpose: Option<String>,
    /// This category, one below it or one above it.
    #[arg(long)]
    category: Option<String>,
    /// Only allowed or only denied decisions.
    #[arg(long, value_enum)]
    decision: Option<DecisionArg>,
    /// A reason code, e.g. CONSENT_REQUIRED (or ADMIN_ROLE_REQUIRED).
    #[arg(long)]
    reason: Option<String>,
    /// What produced the record: a data-plane call, a Check, an administrative action.
    #[arg(long, value_enum)]
    kind: Option<KindArg>,
    /// Records at or after TIME: RFC 3339 or a duration back from now (24h).
    #[arg(long, value_name = "TIME", value_parser = super::parse_time)]
    since: Option<u64>,
    /// Records at or before TIME: RFC 3339 or a duration back from now (1h).
    #[arg(long, value_name = "TIME", value_parser = super::parse_time)]
    until: Option<u64>,
    /// The W3C trace id of the call (32 hex digits, from its `traceparent`).
    #[arg(long, value_name = "HEX")]
    trace_id: Option<String>,
    /// The decision id the caller was given (`x-pdgate-decision-id`).
    #[arg(long, value_name = "ID")]
    decision_id: Option<String>,
    /// At most this many records (the first ones in log order; with --admin at most 10000).
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DecisionArg {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KindArg {
    Access,
    Check,
    Admin,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    source: Source,
    /// How many of the last records to print first.
    #[arg(short = 'n', long, default_value_t = 10)]
    lines: usize,
    /// Keep printing new records as they are written.
    #[arg(short, long)]
    follow: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "The report is written for the person it is about: descriptions and company \
names from the policy's taxonomy.toml (--policy), local time (--timezone), accesses grouped by \
purpose and by recipient (inside the company, joint users §2, third parties §3). The privacy \
office's own processing to answer the person (subject_request.*) and the refused attempts are \
left out (only counted); --audience auditor adds them in sections of their own.\n\n\
Examples:\n  pdgate audit report --subject cust-1 --format html > report.html\n  \
pdgate audit report --subject cust-1 --lang en --timezone Europe/London\n  \
pdgate audit report --subject cust-1 --audience auditor --json"
)]
pub struct ReportArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// The data subject whose request this answers.
    #[arg(long)]
    subject: String,
    /// `md` (Markdown), `html` (a standalone page) or `json`.
    #[arg(long, value_enum, default_value_t = report::Format::Md)]
    format: report::Format,
    /// Same as --format json.
    #[arg(long, conflicts_with = "format")]
    json: bool,
    /// The report's language.
    #[arg(long, value_enum, default_value_t = report::Lang::Ja)]
    lang: report::Lang,
    /// Times are shown in this IANA time zone.
    #[arg(long, value_name = "ZONE", default_value = "Asia/Tokyo")]
    timezone: String,
    /// `subject` (the person) or `auditor` (adds the privacy office's processing and the
    /// refused attempts).
    #[arg(long, value_enum, default_value_t = report::Audience::Subject)]
    audience: report::Audience,
    /// Policy directory whose taxonomy.toml names the purposes, data and companies.
    #[arg(
        long,
        value_name = "DIR",
        env = "PDGATE_POLICY",
        default_value = "policy"
    )]
    policy: PathBuf,
    /// Records at or after TIME: RFC 3339 or a duration back from now (365days).
    #[arg(long, value_name = "TIME", value_parser = super::parse_time)]
    since: Option<u64>,
}

pub async fn run(command: AuditCommand) -> u8 {
    match command {
        AuditCommand::Verify(args) => verify(&args),
        AuditCommand::Query(args) => query(args),
        AuditCommand::Tail(args) => tail(&args),
        AuditCommand::Report(args) => report(&args).await,
    }
}

/// Runs the gRPC side of a command. `run` is called synchronously from inside the CLI's
/// runtime, where blocking on a future is not allowed: the call gets a thread and a runtime of
/// its own.
fn remote<F>(call: F) -> u8
where
    F: std::future::Future<Output = u8> + Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(call),
                    Err(e) => {
                        eprintln!("error: cannot start the async runtime: {e}");
                        EXIT_DENIED
                    }
                }
            })
            .join()
            .unwrap_or(EXIT_DENIED)
    })
}

async fn client(
    admin: &AdminArgs,
) -> Result<AuditLogClient<super::admin_client::AdminChannel>, u8> {
    admin
        .connect()
        .await
        .map(AuditLogClient::new)
        .map_err(|e: AdminClientError| {
            eprintln!("error: {e}");
            e.exit_code()
        })
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

fn verify(args: &Source) -> u8 {
    let v = match &args.from {
        Origin::Dir(dir) => {
            if let Err(code) = check_dir(dir) {
                return code;
            }
            match read::verify(dir) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("error: {e}");
                    return EXIT_DENIED;
                }
            }
        }
        Origin::Sidecar(admin) => {
            let answer = remote_value(async {
                let mut client = client(admin).await?;
                client
                    .verify(AuditVerifyRequest {})
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|status| report_status(&status))
            });
            match answer {
                Ok(v) => verification_of(&v),
                Err(code) => return code,
            }
        }
    };
    print_verification(&v, args.json);
    if v.ok() { EXIT_OK } else { EXIT_DENIED }
}

/// `remote` for calls that answer something: the answer, or the exit code of the failure.
fn remote_value<T: Send, F>(call: F) -> Result<T, u8>
where
    F: std::future::Future<Output = Result<T, u8>> + Send,
{
    let mut out = Err(EXIT_DENIED);
    let code = remote(async {
        out = call.await;
        EXIT_OK
    });
    if code != EXIT_OK {
        return Err(code);
    }
    out
}

/// The API's verify answer as the local report, so both print alike.
fn verification_of(v: &AuditVerifyResponse) -> Verification {
    let mut anchor_hash = [0u8; 32];
    let anchor = (v.anchor_seq > 0
        && hex::decode_to_slice(&v.anchor_hash, &mut anchor_hash).is_ok())
    .then_some(Anchor {
        seq: v.anchor_seq,
        hash: anchor_hash,
        segment: 0,
    });
    Verification {
        segments: v.segments as usize,
        records: v.records,
        first_seq: v.first_seq.max(1),
        anchor,
        last_hash: v.last_hash.clone(),
        first_break: (!v.ok).then(|| Break {
            segment: (!v.bad_segment.is_empty()).then(|| v.bad_segment.clone()),
            line: (v.bad_line > 0).then_some(v.bad_line as usize),
            seq: v.first_bad_seq,
            what: v.problem.clone(),
        }),
    }
}

fn print_verification(v: &Verification, json: bool) {
    if json {
        print_json(&serde_json::json!({
            "ok": v.ok(), "segments": v.segments, "records": v.records,
            "first_seq": v.first_seq, "last_seq": v.last_seq(),
            "anchor": v.anchor.map(|a| serde_json::json!({"seq": a.seq, "hash": hex::encode(a.hash)})),
            "last_hash": v.last_hash, "first_break": v.first_break,
        }));
        return;
    }
    if let Some(b) = &v.first_break {
        let place = match (&b.segment, b.line) {
            (Some(s), Some(l)) => format!("{s}:{l}: "),
            _ => String::new(),
        };
        outln!(
            "BROKEN {place}{} ({} records verified before it)",
            b.what,
            v.records
        );
        return;
    }
    outln!(
        "ok: {} records in {} segments, chain whole, last hash {}",
        v.records,
        v.segments,
        v.last_hash
    );
    if let Some(a) = v.anchor {
        outln!(
            "the log starts at record {}: records 1 to {} were deleted by retention; the chain was verified from their last hash {} (ANCHOR)",
            v.first_seq,
            a.seq,
            hex::encode(a.hash)
        );
    }
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
    if let Some(d) = &b.detail {
        line.push_str(&format!("  ({d})"));
    }
    line.push_str(&format!("  decision {}", b.decision_id));
    line
}

fn print_record(r: &AuditRecord, json: bool) {
    if json {
        match serde_json::to_value(r) {
            Ok(v) => print_json(&v),
            Err(e) => eprintln!("error: {e}"),
        }
    } else {
        outln!("{}", line_of(r));
    }
}

/// A record sent by the API (its stored JSON line).
fn parse_line(json: &str) -> Result<AuditRecord, u8> {
    serde_json::from_str(json).map_err(|e| {
        eprintln!("error: the sidecar sent a record that does not parse: {e}");
        EXIT_DENIED
    })
}

fn query(args: QueryArgs) -> u8 {
    if let Origin::Dir(dir) = &args.source.from
        && let Err(code) = check_dir(dir)
    {
        return code;
    }
    let (since, until) = (args.since, args.until);
    if let (Some(s), Some(u)) = (since, until)
        && s > u
    {
        eprintln!("error: --since is later than --until");
        return EXIT_USAGE;
    }
    if let Some(code) = &args.reason
        && !is_reason_code(code)
    {
        eprintln!(
            "error: --reason `{code}` is not a reason code (e.g. CONSENT_REQUIRED, NO_GRANT, ADMIN_ROLE_REQUIRED)"
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
        kind: args.kind.map(|k| match k {
            KindArg::Access => RecordKind::Access,
            KindArg::Check => RecordKind::Check,
            KindArg::Admin => RecordKind::Admin,
        }),
    };
    let json = args.source.json;
    let mut found = 0usize;
    match &args.source.from {
        _ if args.limit == 0 => {}
        Origin::Dir(dir) => {
            let result = read::scan(dir, &filter, |r| {
                found += 1;
                print_record(&r, json);
                found < args.limit && !output::closed()
            });
            if let Err(e) = result {
                eprintln!("error: {e}");
                return EXIT_DENIED;
            }
        }
        Origin::Sidecar(admin) => {
            let limit = match u32::try_from(args.limit) {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    eprintln!(
                        "error: --limit `{}` with --admin: allowed 1 to {MAX_LIMIT}",
                        args.limit
                    );
                    return EXIT_USAGE;
                }
            };
            let answer = remote_value(async {
                let mut client = client(admin).await?;
                client
                    .query(query_of(&filter, limit))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|status| report_status(&status))
            });
            let answer = match answer {
                Ok(a) => a,
                Err(code) => return code,
            };
            for m in answer.records.iter().take_while(|_| !output::closed()) {
                match parse_line(&m.json) {
                    Ok(r) => {
                        found += 1;
                        print_record(&r, json);
                    }
                    Err(code) => return code,
                }
            }
        }
    }
    if !json && !output::closed() {
        eprintln!("{found} record{}", if found == 1 { "" } else { "s" });
    }
    EXIT_OK
}

fn tail(args: &TailArgs) -> u8 {
    let json = args.source.json;
    let dir = match &args.source.from {
        Origin::Dir(dir) => dir,
        Origin::Sidecar(admin) => return tail_remote(admin, args.lines, args.follow, json),
    };
    if let Err(code) = check_dir(dir) {
        return code;
    }
    let mut last = std::collections::VecDeque::with_capacity(args.lines);
    let mut seen = 0;
    if let Err(e) = read::scan(dir, &Filter::default(), |r| {
        seen = r.seq;
        if args.lines > 0 {
            if last.len() == args.lines {
                last.pop_front();
            }
            last.push_back(r);
        }
        true
    }) {
        eprintln!("error: {e}");
        return EXIT_DENIED;
    }
    last.iter().for_each(|r| print_record(r, json));
    if !args.follow {
        return EXIT_OK;
    }
    // Follows until interrupted (Ctrl-C ends the process) or the reader closes stdout. Each
    // look reads only the segments that may hold records after the last one printed.
    loop {
        if output::closed() {
            return EXIT_OK;
        }
        std::thread::sleep(Duration::from_millis(500));
        let result = read::scan_lines(dir, &Filter::default(), Access::Scan, seen, |r, _| {
            seen = r.seq;
            print_record(&r, json);
            !output::closed()
        });
        if let Err(e) = result {
            eprintln!("error: {e}");
            return EXIT_DENIED;
        }
    }
}

/// `tail --admin`: the last records, then (with --follow) new ones as the sidecar writes them,
/// until interrupted or the sidecar ends the stream (it shuts down): exit 0 then.
fn tail_remote(admin: &AdminArgs, lines: usize, follow: bool, json: bool) -> u8 {
    let Ok(last) = u32::try_from(lines).map(|n| n.min(MAX_LIMIT)) else {
        eprintln!("error: --lines `{lines}`: allowed 0 to {MAX_LIMIT} with --admin");
        return EXIT_USAGE;
    };
    remote(async {
        let mut client = match client(admin).await {
            Ok(c) => c,
            Err(code) => return code,
        };
        let request = AuditTailRequest {
            filter: None,
            from_seq: 0,
            last,
            no_follow: !follow,
        };
        let mut stream = match client.tail(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => return report_status(&status),
        };
        loop {
            match stream.message().await {
                Ok(Some(m)) => match parse_line(&m.json) {
                    Ok(r) => {
                        print_record(&r, json);
                        if output::closed() {
                            return EXIT_OK;
                        }
                    }
                    Err(code) => return code,
                },
                Ok(None) => return EXIT_OK,
                Err(status) => return report_status(&status),
            }
        }
    })
}

async fn report(args: &ReportArgs) -> u8 {
    if let Err(code) = check_dir(args.dir.path()) {
        return code;
    }
    let timezone = match report::parse_timezone(&args.timezone) {
        Ok(tz) => tz,
        Err(code) => return code,
    };
    if !args.policy.is_dir() {
        eprintln!(
            "error: --policy `{}` is not a policy directory (the report takes its names from taxonomy.toml)",
            args.policy.display()
        );
        return EXIT_USAGE;
    }
    let policy = match crate::policy::load_dir(&args.policy).await {
        Ok(p) => p,
        Err(problems) => {
            eprintln!(
                "error: the policy `{}` is not valid: {problems}",
                args.policy.display()
            );
            return EXIT_DENIED;
        }
    };
    report::run(&report::Request {
        dir: args.dir.path(),
        subject: &args.subject,
        since_us: args.since,
        policy: &policy,
        lang: args.lang,
        timezone: &timezone,
        timezone_name: &args.timezone,
        format: if args.json {
            report::Format::Json
        } else {
            args.format
        },
        audience: args.audience,
    })
}
