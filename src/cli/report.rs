//! `pdgate audit report --subject S`: the disclosure report for the person the data is about
//! (seed §7), in Japanese or English, in local time, in the words of the policy's taxonomy
//! (descriptions and company names, not ids), grouped by purpose and by recipient (inside the
//! company; joint users, §2; third parties, §3), with a summary and a small chart of accesses
//! over time.
//!
//! Left out of the person's report: the privacy office's own processing (reads for
//! `subject_request.*`, done to answer the person), refused attempts (only counted) and every
//! internal detail (commands, directories, rule lines). The auditor's version (`--audience
//! auditor`) adds them in sections of their own.
//!
//! The HTML and Markdown come from the templates in `templates/` (minijinja); JSON is the same
//! model serialized.

use super::{EXIT_DENIED, EXIT_OK, EXIT_USAGE, print_json};
use crate::audit::read::{self, Filter};
use crate::audit::{AuditRecord, RecordKind};
use crate::policy::{CallerKind, Snapshot};
use clap::ValueEnum;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const HTML_TEMPLATE: &str = include_str!("../../templates/report.html.j2");
const MD_TEMPLATE: &str = include_str!("../../templates/report.md.j2");

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    Ja,
    En,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Md,
    Html,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Audience {
    /// The person the data is about.
    Subject,
    /// An auditor: adds the privacy office's processing and the refused attempts.
    Auditor,
}

/// What the report is asked for.
pub struct Request<'a> {
    pub dir: &'a Path,
    pub subject: &'a str,
    pub since_us: Option<u64>,
    pub policy: &'a Snapshot,
    pub lang: Lang,
    pub timezone: &'a jiff::tz::TimeZone,
    pub timezone_name: &'a str,
    pub format: Format,
    pub audience: Audience,
}

/// The report's model: what the templates render and `--format json` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    pub lang: Lang,
    pub audience: Audience,
    pub subject: String,
    pub timezone: String,
    pub generated: String,
    pub period: Option<(String, String)>,
    pub summary: Summary,
    /// Accesses per period (day or month), oldest first, for the chart.
    pub timeline: Vec<Bucket>,
    pub by_purpose: Vec<Group>,
    pub inside: Vec<Group>,
    pub joint_users: Vec<Group>,
    pub third_parties: Vec<Group>,
    pub requests: Vec<Handled>,
    /// Auditor only: the privacy office's reads and writes to answer the person's requests.
    pub office_processing: Vec<Line>,
    /// Auditor only: the refused attempts.
    pub refused: Vec<Line>,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub accesses: usize,
    pub purposes: usize,
    pub companies_outside: usize,
    pub refused: usize,
}

#[derive(Debug, Serialize)]
pub struct Bucket {
    pub label: String,
    pub accesses: usize,
}

/// Accesses grouped under one purpose or one recipient.
#[derive(Debug, Serialize)]
pub struct Group {
    pub id: String,
    pub name: String,
    pub clause: String,
    pub accesses: usize,
    /// The other side: the services or companies (for a purpose), or the purposes (for a
    /// recipient).
    pub what: Vec<String>,
    pub categories: Vec<String>,
    pub first: String,
    pub last: String,
}

/// One of the person's own requests the privacy office recorded.
#[derive(Debug, Serialize)]
pub struct Handled {
    pub time: String,
    pub request: String,
    pub done: bool,
    /// Auditor only: who recorded it and the record's detail.
    pub by: Option<String>,
    pub detail: Option<String>,
}

/// One record, for the auditor's sections.
#[derive(Debug, Serialize)]
pub struct Line {
    pub time: String,
    pub caller: String,
    pub purpose: String,
    pub action: String,
    pub categories: Vec<String>,
    pub reasons: Vec<String>,
    pub seq: u64,
}

#[derive(Default)]
struct Tally {
    accesses: usize,
    what: BTreeSet<String>,
    categories: BTreeSet<String>,
    first: u64,
    last: u64,
}

impl Tally {
    fn add(&mut self, time_us: u64, what: String, categories: &[String]) {
        self.accesses += 1;
        self.what.insert(what);
        self.categories.extend(categories.iter().cloned());
        self.first = if self.first == 0 {
            time_us
        } else {
            self.first.min(time_us)
        };
        self.last = self.last.max(time_us);
    }
}

/// Reads the log and prints the report; the exit code.
pub fn run(req: &Request<'_>) -> u8 {
    let filter = Filter {
        subject: Some(req.subject.to_owned()),
        since_us: req.since_us,
        ..Filter::default()
    };
    let mut records = Vec::new();
    if let Err(e) = read::scan(req.dir, &filter, |r| {
        records.push(r);
        true
    }) {
        eprintln!("error: {e}");
        return EXIT_DENIED;
    }
    let report = build(req, &records);
    let text = match req.format {
        Format::Json => match serde_json::to_value(&report) {
            Ok(v) => {
                print_json(&v);
                return EXIT_OK;
            }
            Err(e) => Err(e.to_string()),
        },
        Format::Html => render("report.html", HTML_TEMPLATE, &report, req.lang),
        Format::Md => render("report.md", MD_TEMPLATE, &report, req.lang),
    };
    match text {
        Ok(text) => {
            // The engine drops the template's last newline.
            outln!("{text}");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: cannot render the report: {e}");
            EXIT_DENIED
        }
    }
}

/// The report of `records` (all about the subject, in log order).
pub fn build(req: &Request<'_>, records: &[AuditRecord]) -> Report {
    let p = req.policy;
    let when = |us: u64| local_time(us, req.timezone);
    // The taxonomy's description in the report's language (the English one where the taxonomy
    // has no Japanese one).
    let described = |en: &str, ja: &str| {
        if req.lang == Lang::Ja && !ja.is_empty() {
            ja.to_owned()
        } else {
            en.to_owned()
        }
    };
    let purpose_name = |id: &str| {
        p.purposes()
            .id(id)
            .map(|n| p.purposes().info(n))
            .map_or_else(
                || (id.to_owned(), String::new()),
                |i| {
                    (
                        described(&i.description, &i.description_ja),
                        i.clause.to_string(),
                    )
                },
            )
    };
    let category_name = |id: &str| {
        p.categories()
            .id(id)
            .map(|n| p.categories().info(n))
            .map(|i| described(&i.description, &i.description_ja))
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| id.to_owned())
    };
    // A joint user or third party by its company name; one of the company's own services as
    // the company, with what the service does (the taxonomy names no service otherwise).
    let our_company = labels(req.lang)
        .get("our_company")
        .copied()
        .unwrap_or_default();
    let caller_name = |id: &str| match p.caller(id) {
        Some(c) if c.kind == CallerKind::Internal && !c.description.is_empty() => {
            let what = described(&c.description, &c.description_ja);
            match req.lang {
                Lang::Ja => format!("{our_company}（{what}）"),
                Lang::En => format!("{our_company} ({what})"),
            }
        }
        Some(c) if !c.description.is_empty() => described(&c.description, &c.description_ja),
        _ => id.to_owned(),
    };
    let kind_of = |id: &str| p.caller(id).map(|c| c.kind);
    let office = |r: &AuditRecord| {
        r.body.purpose == "subject_request" || r.body.purpose.starts_with("subject_request.")
    };
    let line = |r: &AuditRecord| Line {
        time: when(r.body.time_us),
        caller: r.body.caller.clone(),
        purpose: r.body.purpose.clone(),
        action: r.body.action.clone(),
        categories: r.body.touched().cloned().collect(),
        reasons: r.body.reasons.iter().map(|x| x.code.clone()).collect(),
        seq: r.seq,
    };
    let auditor = req.audience == Audience::Auditor;

    let mut by_purpose: BTreeMap<String, Tally> = BTreeMap::new();
    let mut recipients: BTreeMap<(u8, String), Tally> = BTreeMap::new();
    let mut times: Vec<u64> = Vec::new();
    let mut report = Report {
        lang: req.lang,
        audience: req.audience,
        subject: req.subject.to_owned(),
        timezone: req.timezone_name.to_owned(),
        generated: when(now_us()),
        period: None,
        summary: Summary::default(),
        timeline: Vec::new(),
        by_purpose: Vec::new(),
        inside: Vec::new(),
        joint_users: Vec::new(),
        third_parties: Vec::new(),
        requests: Vec::new(),
        office_processing: Vec::new(),
        refused: Vec::new(),
    };
    for r in records {
        let b = &r.body;
        if b.kind == Some(RecordKind::Admin) {
            report.requests.push(Handled {
                time: when(b.time_us),
                request: request_name(&b.action, req.lang),
                done: b.decision == "allow",
                by: auditor.then(|| b.caller.clone()),
                detail: if auditor { b.detail.clone() } else { None },
            });
            continue;
        }
        if b.decision != "allow" {
            report.summary.refused += 1;
            if auditor {
                report.refused.push(line(r));
            }
            continue;
        }
        if office(r) {
            if auditor {
                report.office_processing.push(line(r));
            }
            continue;
        }
        times.push(b.time_us);
        // What the call handed out: what it needed, and what it could go without but was not
        // told to (a shipping read of a profile gets the address as well as the name).
        let categories: Vec<String> = b.touched().map(|c| category_name(c)).collect();
        // Who received the data: a named recipient, or the caller itself.
        let to = b.recipient.clone().unwrap_or_else(|| b.caller.clone());
        let (order, kind_to) = match kind_of(&to) {
            Some(CallerKind::JointUser) => (1, to.clone()),
            Some(CallerKind::ThirdParty) => (2, to.clone()),
            _ => (0, b.caller.clone()),
        };
        by_purpose.entry(b.purpose.clone()).or_default().add(
            b.time_us,
            caller_name(&kind_to),
            &categories,
        );
        recipients.entry((order, kind_to)).or_default().add(
            b.time_us,
            purpose_name(&b.purpose).0,
            &categories,
        );
    }
    let group = |id: &str, name: String, clause: String, t: Tally| Group {
        id: id.to_owned(),
        name,
        clause,
        accesses: t.accesses,
        what: t.what.into_iter().collect(),
        categories: t.categories.into_iter().collect(),
        first: when(t.first),
        last: when(t.last),
    };
    report.summary.accesses = times.len();
    report.summary.purposes = by_purpose.len();
    for (id, t) in by_purpose {
        let (name, clause) = purpose_name(&id);
        report.by_purpose.push(group(&id, name, clause, t));
    }
    for ((order, id), t) in recipients {
        let clause = match order {
            1 => "§2",
            2 => "§3",
            _ => "§1",
        };
        let g = group(&id, caller_name(&id), clause.to_owned(), t);
        match order {
            1 => report.joint_users.push(g),
            2 => report.third_parties.push(g),
            _ => report.inside.push(g),
        }
    }
    report.summary.companies_outside = report.joint_users.len() + report.third_parties.len();
    if let (Some(first), Some(last)) = (times.iter().min(), times.iter().max()) {
        report.period = Some((when(*first), when(*last)));
    }
    report.timeline = timeline(&times, req.timezone);
    report
}

/// Accesses per day, or per month when the times span more than 62 days.
fn timeline(times: &[u64], tz: &jiff::tz::TimeZone) -> Vec<Bucket> {
    let dates: Vec<jiff::civil::Date> = times
        .iter()
        .filter_map(|us| zoned(*us, tz))
        .map(|z| z.date())
        .collect();
    let (Some(first), Some(last)) = (dates.iter().min(), dates.iter().max()) else {
        return Vec::new();
    };
    let monthly = first
        .until(*last)
        .ok()
        .and_then(|span| span.total(jiff::Unit::Day).ok())
        .is_some_and(|days| days > 62.0);
    let key = |d: &jiff::civil::Date| {
        if monthly {
            format!("{:04}-{:02}", d.year(), d.month())
        } else {
            format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day())
        }
    };
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    // Every period from the first to the last, so that quiet ones show as gaps.
    let mut day = *first;
    while day <= *last {
        counts.entry(key(&day)).or_default();
        match day.tomorrow() {
            Ok(next) => day = next,
            Err(_) => break,
        }
    }
    for d in &dates {
        *counts.entry(key(d)).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(label, accesses)| Bucket { label, accesses })
        .collect()
}

/// The chart of the timeline as inline SVG: one bar per period, a `<title>` on each.
pub fn chart_svg(timeline: &[Bucket], lang: Lang) -> String {
    const W: usize = 640;
    const H: usize = 120;
    let max = timeline
        .iter()
        .map(|b| b.accesses)
        .max()
        .unwrap_or(0)
        .max(1);
    let n = timeline.len().max(1);
    let slot = W / n;
    let bar = (slot * 4 / 5).max(1);
    let label = match lang {
        Lang::Ja => "期間ごとの利用件数",
        Lang::En => "Accesses over time",
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" aria-label=\"{label}\" width=\"{W}\" height=\"{}\" viewBox=\"0 0 {W} {}\">",
        H + 20,
        H + 20
    );
    for (i, b) in timeline.iter().enumerate() {
        let h = (b.accesses * H / max).max(usize::from(b.accesses > 0));
        let x = i * slot;
        svg.push_str(&format!(
            "<rect x=\"{x}\" y=\"{}\" width=\"{bar}\" height=\"{h}\" fill=\"#3b6ea5\"><title>{}: {}</title></rect>",
            H - h,
            b.label,
            b.accesses
        ));
    }
    if let (Some(first), Some(last)) = (timeline.first(), timeline.last()) {
        svg.push_str(&format!(
            "<text x=\"0\" y=\"{}\" font-size=\"11\">{}</text><text x=\"{W}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            H + 15,
            first.label,
            H + 15,
            last.label
        ));
    }
    svg.push_str("</svg>");
    svg
}

fn render(name: &str, source: &str, report: &Report, lang: Lang) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    // A misspelt name in a template fails the render (and the tests) instead of printing
    // nothing.
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.add_template(name, source).map_err(|e| e.to_string())?;
    // Markdown cells: a `|` would end the cell.
    env.add_filter("cell", |s: String| s.replace('|', "\\|").replace('\n', " "));
    let template = env.get_template(name).map_err(|e| e.to_string())?;
    template
        .render(minijinja::context! {
            r => minijinja::Value::from(minijinja::value::Serde(report)),
            t => labels(lang),
            chart => minijinja::Value::from_safe_string(chart_svg(&report.timeline, lang)),
            sparkline => sparkline(&report.timeline),
        })
        .map_err(|e| e.to_string())
}

/// The timeline in block characters, for the Markdown report.
fn sparkline(timeline: &[Bucket]) -> String {
    const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = timeline
        .iter()
        .map(|b| b.accesses)
        .max()
        .unwrap_or(0)
        .max(1);
    timeline
        .iter()
        .map(|b| {
            if b.accesses == 0 {
                ' '
            } else {
                BLOCKS[((b.accesses * 8).div_ceil(max)).clamp(1, 8) - 1]
            }
        })
        .collect()
}

/// The words of the report in `lang`.
fn labels(lang: Lang) -> BTreeMap<&'static str, &'static str> {
    let pairs: &[(&str, &str, &str)] = &[
        (
            "title",
            "保有個人データの利用状況のお知らせ",
            "Disclosure of your personal data",
        ),
        (
            "intro",
            "お客さまの個人データを、いつ、どの目的で、どこが利用・提供したかをお知らせします（プライバシーポリシー第7項による開示）。",
            "This report tells you when, for which purpose and by whom your personal data was used or provided (disclosure under §7 of our privacy policy).",
        ),
        ("subject", "お客さま番号", "Customer id"),
        ("generated", "作成日時", "Generated"),
        ("timezone", "時間帯", "Time zone"),
        ("period", "対象期間", "Period"),
        ("summary", "概要", "Summary"),
        ("accesses", "利用件数", "Accesses"),
        ("purposes", "利用目的の数", "Purposes"),
        (
            "companies_outside",
            "提供先の社外企業数",
            "Companies outside the company that received it",
        ),
        ("refused", "お断りした利用の試み", "Attempts refused"),
        ("chart", "期間ごとの利用件数", "Accesses over time"),
        ("by_purpose", "利用目的ごとの利用", "Use by purpose"),
        ("purpose", "利用目的", "Purpose"),
        ("clause", "根拠条項", "Clause"),
        ("by", "利用したサービス・提供先", "Used by"),
        ("categories", "データの種類", "Kinds of data"),
        ("first", "最初", "First"),
        ("last", "最後", "Last"),
        ("recipients", "利用・提供先ごとの利用", "Use by recipient"),
        (
            "inside",
            "当社内での利用（第1項）",
            "Inside the company (§1)",
        ),
        (
            "joint_users",
            "共同利用者への提供（第2項）",
            "Joint users (§2)",
        ),
        (
            "third_parties",
            "第三者への提供（第3項）",
            "Third parties (§3)",
        ),
        ("recipient", "利用・提供先", "Recipient"),
        ("for", "利用目的", "Purposes"),
        ("none", "ありません。", "None."),
        (
            "requests",
            "お客さまからのご請求の処理",
            "Your requests we handled",
        ),
        ("time", "日時", "Time"),
        ("request", "ご請求", "Request"),
        ("outcome", "結果", "Outcome"),
        ("done", "対応済み", "Done"),
        ("not_done", "対応できませんでした", "Not done"),
        (
            "office",
            "プライバシー窓口の処理（監査用）",
            "Privacy office processing (auditors)",
        ),
        (
            "refused_list",
            "お断りした利用の試み（監査用）",
            "Refused attempts (auditors)",
        ),
        ("caller", "呼び出し元", "Caller"),
        ("action", "操作", "Action"),
        ("reasons", "理由コード", "Reason codes"),
        ("record", "記録番号", "Record"),
        ("our_company", "当社", "Our company"),
        (
            "contact",
            "ご不明な点はプライバシー窓口までお問い合わせください。",
            "If you have any questions, please contact our privacy office.",
        ),
    ];
    pairs
        .iter()
        .map(|(k, ja, en)| (*k, if lang == Lang::Ja { *ja } else { *en }))
        .collect()
}

/// The person's request an admin record carries out, in words.
fn request_name(action: &str, lang: Lang) -> String {
    let name = action.rsplit('/').next().unwrap_or(action);
    let (ja, en) = match name {
        "SetConsent" | "Consent" => ("同意の記録", "Consent recorded"),
        "WithdrawConsent" | "Withdraw" => ("同意の撤回", "Consent withdrawn"),
        "SuspendUse" => ("利用停止", "Stop using my data"),
        "ResumeUse" => ("利用停止の解除", "Use resumed"),
        "SuspendProvision" => (
            "第三者提供の停止",
            "Stop providing my data to third parties",
        ),
        "ResumeProvision" => ("第三者提供停止の解除", "Provision resumed"),
        "RequestDeletion" | "Delete" => ("削除", "Delete my data"),
        _ => return name.to_owned(),
    };
    if lang == Lang::Ja { ja } else { en }.to_owned()
}

fn zoned(us: u64, tz: &jiff::tz::TimeZone) -> Option<jiff::Zoned> {
    let us = i64::try_from(us).ok()?;
    jiff::Timestamp::from_microsecond(us)
        .ok()
        .map(|t| t.to_zoned(tz.clone()))
}

/// `2026-11-27 18:00 JST`.
fn local_time(us: u64, tz: &jiff::tz::TimeZone) -> String {
    zoned(us, tz).map_or_else(String::new, |z| z.strftime("%Y-%m-%d %H:%M %Z").to_string())
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// `--timezone`: an IANA name (`Asia/Tokyo`, `UTC`).
pub fn parse_timezone(name: &str) -> Result<jiff::tz::TimeZone, u8> {
    jiff::tz::TimeZone::get(name).map_err(|e| {
        eprintln!("error: --timezone `{name}`: not a known time zone ({e}); e.g. Asia/Tokyo, UTC");
        EXIT_USAGE
    })
}
