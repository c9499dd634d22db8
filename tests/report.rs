//! The disclosure report (`pdgate audit report --subject S`) as the person it is about reads
//! it: Japanese or English, local time, the taxonomy's descriptions and company names instead
//! of ids, accesses by purpose and by recipient (inside the company, joint users §2, third
//! parties §3), a summary with a chart, no privacy-office processing and no internal text;
//! the auditor's version keeps what the person's leaves out. HTML, Markdown and JSON; the HTML
//! is also rendered by headless Chromium when it is installed.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::bin::Pdgate;
use pdgate::audit::{AuditLog, AuditSettings, RecordBody, RecordKind};
use std::path::Path;
use std::process::Output;

/// 2025-11-24T16:00:00Z, which is 2025-11-25 01:00 in Tokyo.
const T0: u64 = 1_764_000_000_000_000;
const DAY: u64 = 86_400_000_000;

fn access(
    time_us: u64,
    caller: &str,
    purpose: &str,
    categories: &[&str],
    recipient: Option<&str>,
) -> RecordBody {
    RecordBody {
        time_us,
        decision_id: format!("d-{time_us}"),
        caller: caller.into(),
        purpose: purpose.into(),
        action: "read".into(),
        categories: categories.iter().map(|c| (*c).to_owned()).collect(),
        subjects: vec!["cust-1".into()],
        recipient: recipient.map(str::to_owned),
        decision: "allow".into(),
        ..RecordBody::default()
    }
}

/// A log about `cust-1`: billing on three days, marketing email, SoftBank's joint use,
/// provisioning's export to NTT East, NTT West calling itself, the privacy office reading to
/// answer a disclosure request, a refused attempt, and a suspension the office recorded.
async fn log() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (log, writer, _) = AuditLog::open(AuditSettings::new(dir.path())).unwrap();
    let mut bodies = vec![
        access(
            T0,
            "billing-service",
            "service.billing",
            &["customer.billing"],
            None,
        ),
        access(
            T0 + DAY,
            "billing-service",
            "service.billing",
            &["customer.billing"],
            None,
        ),
        access(
            T0 + 3 * DAY,
            "billing-service",
            "service.billing",
            &["customer.billing"],
            None,
        ),
        access(
            T0 + DAY,
            "marketing-service",
            "marketing.email",
            &["customer.contact.email"],
            None,
        ),
        access(
            T0 + 2 * DAY,
            "softbank",
            "joint_use.marketing_research",
            &["customer.contact.address"],
            None,
        ),
        access(
            T0 + 2 * DAY,
            "provisioning-service",
            "third_party.interconnect",
            &["customer.name"],
            Some("ntt-east"),
        ),
        access(
            T0 + 3 * DAY,
            "ntt-west",
            "third_party.interconnect",
            &["customer.contact.phone"],
            None,
        ),
        access(
            T0 + 3 * DAY,
            "privacy-office",
            "subject_request.disclosure",
            &["communications.call_history"],
            None,
        ),
    ];
    let mut refused = access(
        T0 + 3 * DAY,
        "marketing-service",
        "marketing.direct_mail",
        &["customer.contact.address"],
        None,
    );
    refused.decision = "deny".into();
    bodies.push(refused);
    bodies.push(RecordBody {
        time_us: T0 + 3 * DAY,
        kind: Some(RecordKind::Admin),
        decision_id: "admin-1".into(),
        caller: "privacy-office".into(),
        action: "SuspendUse".into(),
        method: Some("/pdgate.v1.SubjectRights/SuspendUse".into()),
        subjects: vec!["cust-1".into()],
        decision: "allow".into(),
        detail: Some("use suspended at the person's request".into()),
        ..RecordBody::default()
    });
    for body in bodies {
        log.record(body).await.unwrap();
    }
    drop(log);
    writer.close().await;
    dir
}

fn report(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "audit",
        "report",
        "--subject",
        "cust-1",
        "--audit",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = Pdgate::new(args).output();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    out
}

fn text(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// What no version for the person may show: ids, the office's processing, internal text.
fn assert_for_the_person(page: &str, dir: &Path) {
    for internal in [
        "ntt-east",
        "softbank",
        "customer.contact.address",
        "service.billing",
        "subject_request",
        "privacy-office",
        "call_history",
        "pdgate ",
        "--subject",
        "audit query",
        &dir.display().to_string(),
        "use suspended at the person's request",
    ] {
        assert!(
            !page.contains(internal),
            "`{internal}` in the report:\n{page}"
        );
    }
}

#[tokio::test]
async fn the_english_report_names_purposes_data_and_companies_in_local_time() {
    let dir = log().await;
    let md = text(&report(dir.path(), &["--lang", "en"]));
    assert_for_the_person(&md, dir.path());
    // Descriptions and company names from taxonomy.toml.
    for name in [
        "Billing calculations and invoices related to transactions",
        "SoftBank Corporation, joint user",
        "Nippon Telegraph and Telephone East Corporation",
        "Nippon Telegraph and Telephone West Corporation",
        "Our company (Calculates charges and issues invoices)",
    ] {
        assert!(md.contains(name), "`{name}` missing:\n{md}");
    }
    // Tokyo time: the first billing read was at 01:00 on the 25th there.
    assert!(md.contains("2025-11-25 01:00 JST"), "{md}");
    assert!(!md.contains("16:00"), "no UTC times: {md}");
    // The recipients' sections: NTT East is a third party although provisioning called.
    let third = md.split("### Third parties (§3)").nth(1).unwrap();
    let third = third.split("## ").next().unwrap();
    assert!(
        third.contains("Nippon Telegraph and Telephone East"),
        "{third}"
    );
    assert!(
        third.contains("Nippon Telegraph and Telephone West"),
        "{third}"
    );
    let joint = md.split("### Joint users (§2)").nth(1).unwrap();
    let joint = joint.split("### ").next().unwrap();
    assert!(joint.contains("SoftBank Corporation"), "{joint}");
    assert!(!joint.contains("Nippon"), "{joint}");
    // Summary: 7 accesses (the office's read left out), 4 purposes, 3 companies outside, 1 refused.
    assert!(md.contains("| 7 | 4 | 3 | 1 |"), "summary row: {md}");
    // The person's own request, in words.
    assert!(md.contains("Stop using my data"), "{md}");

    // Another zone on request.
    let md = text(&report(dir.path(), &["--lang", "en", "--timezone", "UTC"]));
    assert!(md.contains("2025-11-24 16:00 UTC"), "{md}");
    let out = Pdgate::new([
        "audit",
        "report",
        "--subject",
        "cust-1",
        "--audit",
        dir.path().to_str().unwrap(),
        "--timezone",
        "Mars/Olympus",
    ])
    .output();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[tokio::test]
async fn the_japanese_report_is_the_default() {
    let dir = log().await;
    let md = text(&report(dir.path(), &[]));
    assert_for_the_person(&md, dir.path());
    assert!(
        md.starts_with("# 保有個人データの利用状況のお知らせ"),
        "{md}"
    );
    assert!(md.contains("第三者への提供（第3項）"), "{md}");
    assert!(md.contains("共同利用者への提供（第2項）"), "{md}");
    assert!(md.contains("利用停止"), "{md}");
    assert!(md.contains("2025-11-25 01:00 JST"), "{md}");
    // Purposes, data and companies in Japanese, from taxonomy.toml's `description_ja`.
    for name in [
        "取引に係る料金計算および請求書の発行",
        "ご請求金額・請求書・お支払い状況",
        "ソフトバンク株式会社（共同利用者）",
        "東日本電信電話株式会社（NTT東日本）",
        "（料金の計算および請求書の発行）",
    ] {
        assert!(md.contains(name), "`{name}` missing:\n{md}");
    }
    for english in [
        "Billing calculations",
        "SoftBank Corporation",
        "Nippon Telegraph",
        "Calculates charges",
    ] {
        assert!(
            !md.contains(english),
            "`{english}` in the Japanese report:\n{md}"
        );
    }
}

#[tokio::test]
async fn json_is_the_same_model_and_html_has_header_cells_and_a_chart() {
    let dir = log().await;
    let out = report(dir.path(), &["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["summary"]["accesses"], 7);
    assert_eq!(v["summary"]["refused"], 1);
    assert_eq!(v["third_parties"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["joint_users"][0]["id"], "softbank");
    assert_eq!(v["office_processing"].as_array().unwrap().len(), 0);
    // One bar per day from the first access to the last (4 days).
    let timeline: Vec<u64> = v["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["accesses"].as_u64().unwrap())
        .collect();
    assert_eq!(timeline, [1, 2, 2, 2], "{v}");
    assert_eq!(
        report(dir.path(), &["--format", "json"]).stdout,
        out.stdout.clone(),
        "--json is --format json"
    );

    let html = text(&report(dir.path(), &["--format", "html", "--lang", "en"]));
    assert_for_the_person(&html, dir.path());
    assert!(html.starts_with("<!doctype html>"), "{html}");
    assert!(html.contains("<html lang=\"en\">"));
    assert!(html.contains("<th scope=\"col\">Purpose</th>"), "{html}");
    assert!(!html.contains("<td>Purpose</td>"), "{html}");
    assert_eq!(html.matches("<svg ").count(), 1, "one inline chart");
    assert_eq!(html.matches("<rect ").count(), 4, "one bar per day");
    assert!(html.contains("<title>2025-11-26: 2</title>"), "{html}");
}

#[tokio::test]
async fn the_auditor_sees_the_office_processing_and_the_refusals_apart() {
    let dir = log().await;
    let md = text(&report(
        dir.path(),
        &["--lang", "en", "--audience", "auditor"],
    ));
    let office = md
        .split("## Privacy office processing (auditors)")
        .nth(1)
        .expect("a section for the office's processing");
    let office_section = office.split("## ").next().unwrap();
    assert!(
        office_section.contains("subject_request.disclosure"),
        "{md}"
    );
    assert!(office_section.contains("privacy-office"), "{md}");
    let refused = md.split("## Refused attempts (auditors)").nth(1).unwrap();
    assert!(refused.contains("marketing.direct_mail"), "{md}");
    // The uses themselves are the same as the person's.
    let uses = md.split("## Privacy office processing").next().unwrap();
    assert!(!uses.contains("subject_request.disclosure"), "{uses}");
    assert!(md.contains("use suspended at the person's request"), "{md}");
}

/// Renders the HTML in headless Chromium and checks the text a reader sees; saves a
/// screenshot at target/report.png. Skipped (with a message) where Chromium is not installed.
#[tokio::test]
async fn chromium_renders_the_html_report() {
    let chromium = Path::new("/usr/bin/chromium");
    if !chromium.exists() {
        println!("SKIPPED: /usr/bin/chromium is not installed (apt-get install -y chromium)");
        return;
    }
    let dir = log().await;
    let html = text(&report(dir.path(), &["--format", "html"]));
    let page = dir.path().join("report.html");
    std::fs::write(&page, &html).unwrap();
    let url = format!("file://{}", page.display());
    let profile = tempfile::tempdir().unwrap();
    let chromium_run = |extra: &[&str]| {
        let mut args = vec![
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.push(url.clone());
        // Through the one runner: a browser that hangs fails the test instead of CI.
        let out = Pdgate::program(chromium, &args)
            .limit(std::time::Duration::from_secs(120))
            .output();
        assert!(out.status.success(), "{out:?}");
        out
    };
    // The DOM after rendering: the text the reader sees, with its table headers.
    let dom = String::from_utf8(chromium_run(&["--dump-dom"]).stdout).unwrap();
    assert!(dom.contains("保有個人データの利用状況のお知らせ"), "{dom}");
    assert!(dom.contains("<th scope=\"col\">利用目的</th>"), "{dom}");
    assert!(dom.contains("東日本電信電話株式会社（NTT東日本）"), "{dom}");
    assert!(dom.contains("2025-11-25 01:00 JST"), "{dom}");
    assert!(!dom.contains("privacy-office"), "{dom}");
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/report.png");
    let _ = std::fs::remove_file(&shot);
    chromium_run(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=1100,1800",
    ]);
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    println!("screenshot: {}", shot.display());
}
