//! The docs cannot drift from the code silently.
//!
//! - `docs/reference/{cli,config,metrics,reason-codes}.md` are generated here: from pdgate's
//!   clap definitions, from `deploy/pdgate.toml` (which tests/config.rs keeps equal to the
//!   keys `FileConfig` accepts), from the metrics registry, and from `src/decision/reason.rs`
//!   with the admin refusals of `src/transport/rescue.rs`. A committed page that differs fails;
//!   `PDGATE_UPDATE_DOCS=1 cargo test --test docs` writes them anew.
//! - A file a page shows (`<!-- file: PATH -->` before a fenced block) is that file, byte for
//!   byte; every relative link of README.md and docs/ leads to a file and heading that exist.
//! - Every reason code is explained in docs/decisions.md; every metric in docs/operations.md.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed check fails the test"
)]

use clap::CommandFactory;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

const UPDATE: &str = "PDGATE_UPDATE_DOCS";

/// Compares a generated page with the committed one, or writes it with `PDGATE_UPDATE_DOCS=1`.
fn generated(path: &str, text: &str) {
    let file = repo().join(path);
    if std::env::var_os(UPDATE).is_some() {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, text).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&file).unwrap_or_default();
    if committed != text {
        let line = committed
            .lines()
            .zip(text.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(text.lines().count()));
        panic!(
            "{path} is not what the code generates (first difference at line {}):\n  \
             committed: {:?}\n  generated: {:?}\nregenerate it: {UPDATE}=1 cargo test --test docs",
            line + 1,
            committed.lines().nth(line).unwrap_or("<end>"),
            text.lines().nth(line).unwrap_or("<end>"),
        );
    }
}

fn banner(source: &str) -> String {
    format!(
        "<!-- Generated from {source} by tests/docs.rs: do not edit by hand. After a change, \
         run `{UPDATE}=1 cargo test --test docs`. -->\n\n"
    )
}

// ---------------------------------------------------------------------------------------------
// CLI

/// Every command's `--help`, as a terminal 100 columns wide shows it; environment variables by
/// name only (their values on the machine that generates the page are nobody's business).
fn cli_reference() -> String {
    fn prepare(cmd: &mut clap::Command) {
        let taken = std::mem::take(cmd);
        *cmd = taken.term_width(100).mut_args(|a| a.hide_env_values(true));
        for sub in cmd.get_subcommands_mut() {
            prepare(sub);
        }
    }
    fn walk(cmd: &clap::Command, path: &str, out: &mut String) {
        let mut cmd = cmd.clone();
        let help = cmd.render_long_help().to_string();
        let _ = write!(out, "## `{path}`\n\n```text\n{}\n```\n\n", help.trim_end());
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            walk(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }
    let mut cmd = pdgate::cli::Cli::command();
    prepare(&mut cmd);
    cmd.build();
    let mut out = banner("pdgate's clap definitions (`src/cli/`)");
    out.push_str(
        "# Command line reference\n\nEvery command of `pdgate` and its `--help`. Exit codes of \
         every command: 0 allowed / ok, 1 denied / a failed check, 2 bad command-line input.\n\n",
    );
    let mut index = Vec::new();
    fn names(cmd: &clap::Command, path: &str, index: &mut Vec<String>) {
        index.push(path.to_owned());
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            names(sub, &format!("{path} {}", sub.get_name()), index);
        }
    }
    names(&cmd, "pdgate", &mut index);
    for path in &index {
        let _ = writeln!(out, "- [`{path}`](#{})", slug(&format!("`{path}`")));
    }
    out.push('\n');
    walk(&cmd, "pdgate", &mut out);
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

#[test]
fn cli_reference_is_generated_from_clap() {
    generated("docs/reference/cli.md", &cli_reference());
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// docs/reference/config.md from deploy/pdgate.toml: its header as the introduction, each
/// section's comment as the section's, each key's comment and example line under the key.
fn config_reference() -> String {
    let text = read("deploy/pdgate.toml");
    let mut out = banner("`deploy/pdgate.toml`");
    out.push_str("# Configuration keys (`pdgate.toml`)\n\n");
    let mut comment: Vec<String> = Vec::new();
    let mut section = String::new();
    let mut intro_done = false;
    let mut index = Vec::new();
    let mut body = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            if !intro_done {
                // The file's header: how to use it, overrides, conventions.
                out.push_str(&prose(&comment[1..]));
                out.push_str(
                    "`deploy/pdgate.toml` is this page as a file, every key set to its \
                     default (or commented out where it needs files of your own).\n\n",
                );
                intro_done = true;
            } else if !comment.is_empty() {
                // Prose between keys (none today): kept where it stands.
                body.push_str(&prose(&comment));
            }
            comment.clear();
        } else if let Some(c) = trimmed.strip_prefix('#') {
            let c = c.strip_prefix(' ').unwrap_or(c);
            if let Some(key) = key_line(c) {
                key_entry(&mut body, &mut index, &section, key, c, &comment);
                comment.clear();
            } else {
                comment.push(c.to_owned());
            }
        } else if let Some(name) = trimmed.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            section = name.to_owned();
            index.push((format!("[{name}]"), slug(&format!("[{name}]"))));
            let _ = write!(body, "## [{name}]\n\n");
            body.push_str(&prose(&comment));
            comment.clear();
        } else if let Some(key) = key_line(trimmed) {
            key_entry(&mut body, &mut index, &section, key, trimmed, &comment);
            comment.clear();
        }
    }
    out.push_str("Keys: ");
    out.push_str(
        &index
            .iter()
            .map(|(name, anchor)| format!("[`{name}`](#{anchor})"))
            .collect::<Vec<_>>()
            .join(" · "),
    );
    out.push_str("\n\n## Top-level keys\n\n");
    out.push_str(&body);
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

/// The key of a `key = value` line.
fn key_line(line: &str) -> Option<&str> {
    let (key, _) = line.split_once(" = ")?;
    key.chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        .then_some(key)
}

fn key_entry(
    body: &mut String,
    index: &mut Vec<(String, String)>,
    section: &str,
    key: &str,
    line: &str,
    comment: &[String],
) {
    let full = if section.is_empty() {
        key.to_owned()
    } else {
        format!("{section}.{key}")
    };
    index.push((full.clone(), slug(&format!("`{full}`"))));
    let _ = write!(body, "### `{full}`\n\n");
    body.push_str(&prose(comment));
    let _ = write!(body, "```toml\n{line}\n```\n\n");
}

/// Comment lines as Markdown: sentences joined into paragraphs, `Allowed:` and `Default:` on
/// lines of their own, indented lines (tables of values) as a text block.
fn prose(lines: &[String]) -> String {
    let mut out = String::new();
    let mut paragraph: Vec<&str> = Vec::new();
    let mut block: Vec<&str> = Vec::new();
    let flush_paragraph = |out: &mut String, paragraph: &mut Vec<&str>| {
        if !paragraph.is_empty() {
            let _ = write!(out, "{}\n\n", paragraph.join(" "));
            paragraph.clear();
        }
    };
    let flush_block = |out: &mut String, block: &mut Vec<&str>| {
        if !block.is_empty() {
            let _ = write!(out, "```text\n{}\n```\n\n", block.join("\n"));
            block.clear();
        }
    };
    for line in lines {
        if line.is_empty() {
            flush_block(&mut out, &mut block);
            flush_paragraph(&mut out, &mut paragraph);
        } else if line.starts_with(' ') {
            flush_paragraph(&mut out, &mut paragraph);
            block.push(line);
        } else {
            flush_block(&mut out, &mut block);
            if line.starts_with("Allowed:") || line.starts_with("Default:") {
                flush_paragraph(&mut out, &mut paragraph);
            }
            paragraph.push(line);
        }
    }
    flush_block(&mut out, &mut block);
    flush_paragraph(&mut out, &mut paragraph);
    out
}

#[test]
fn config_reference_is_generated_from_the_example_configuration() {
    generated("docs/reference/config.md", &config_reference());
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// The metric families of a fresh registry, as `/metrics` announces them: name, type, help.
fn metric_families() -> Vec<(String, String, String)> {
    let dir = tempfile::tempdir().unwrap();
    let (audit, _writer, _) =
        pdgate::audit::AuditLog::open(pdgate::audit::AuditSettings::new(dir.path())).unwrap();
    let metrics = pdgate::telemetry::metrics::Metrics::new(Default::default(), audit);
    // The families a serving sidecar adds: its call slots, and a subject registry's reads.
    metrics.watch_call_slots(std::sync::Arc::new(tokio::sync::Semaphore::new(8)), 8);
    metrics.report_registry_reads(std::sync::Arc::default());
    let text = metrics.render_prometheus();
    let mut families = Vec::new();
    let mut help = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap();
            help.insert(name.to_owned(), text.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            families.push((
                name.to_owned(),
                kind.to_owned(),
                help.get(name).cloned().unwrap_or_default(),
            ));
        }
    }
    assert!(families.len() >= 10, "the registry announces its families");
    families
}

fn metrics_reference() -> String {
    let mut out = banner("the metrics registry (`src/telemetry/metrics.rs`)");
    out.push_str(
        "# Metrics\n\nWhat `GET /metrics` (the API port, and the probe listener when \
         `admin_listen` is set) serves, in the Prometheus text format. What each one counts, \
         and OpenTelemetry export: [operations.md](../operations.md#telemetry-and-metrics).\n\n\
         | metric | type | help |\n|---|---|---|\n",
    );
    for (name, kind, help) in metric_families() {
        let _ = writeln!(out, "| `{name}` | {kind} | {help} |");
    }
    out
}

#[test]
fn metrics_reference_is_generated_from_the_registry() {
    generated("docs/reference/metrics.md", &metrics_reference());
}

#[test]
fn every_metric_is_explained_in_the_operations_page() {
    let page = read("docs/operations.md");
    // The names in backticks in the first cell of the table's rows.
    let explained: BTreeSet<String> = page
        .lines()
        .filter(|l| l.starts_with("| `pdgate_") || l.starts_with("| `process_"))
        .flat_map(|l| {
            let cell = l.split('|').nth(1).unwrap_or("");
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(|m| m.split('{').next().unwrap_or("").to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    let served: BTreeSet<String> = metric_families().into_iter().map(|f| f.0).collect();
    assert_eq!(
        explained, served,
        "the metrics table of docs/operations.md and the metrics pdgate serves"
    );
}

// ---------------------------------------------------------------------------------------------
// Reason codes

/// The `ReasonCode` variants of src/decision/reason.rs in order, each with the comment of its
/// group (`// Stage 1: ...`).
fn reason_groups() -> Vec<(String, Vec<String>)> {
    let source = read("src/decision/reason.rs");
    let body = source
        .split("pub enum ReasonCode {")
        .nth(1)
        .and_then(|b| b.split("\n}").next())
        .expect("the ReasonCode enum");
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(c) = line.strip_prefix("//") {
            match groups.last_mut() {
                // A comment continued over several lines.
                Some((comment, variants)) if variants.is_empty() => {
                    comment.push(' ');
                    comment.push_str(c.trim());
                }
                _ => groups.push((c.trim().to_owned(), Vec::new())),
            }
        } else {
            let variant = line.trim_end_matches(',').to_owned();
            groups
                .last_mut()
                .expect("a comment opens a group")
                .1
                .push(variant);
        }
    }
    groups
}

/// `NoGrant` → `NO_GRANT`.
fn screaming(variant: &str) -> String {
    let mut out = String::new();
    for (i, c) in variant.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The `ErrorInfo` reasons of admin refusals: `pub const NAME: &str = "NAME";` in rescue.rs,
/// with the doc comment of its group.
fn admin_reasons() -> Vec<(String, String)> {
    let source = read("src/transport/rescue.rs");
    let mut out = Vec::new();
    let mut doc = String::new();
    for line in source.lines() {
        if let Some(d) = line.strip_prefix("/// ") {
            // "The `ErrorInfo` reason of an admin call refused for want of a role." → what
            // follows "of", as the table's cell.
            doc = d.split_once(" of ").map_or(d, |(_, what)| what).to_owned();
        } else if let Some(rest) = line.strip_prefix("pub const ")
            && let Some((_, value)) = rest.split_once(": &str = \"")
        {
            out.push((value.trim_end_matches("\";").to_owned(), doc.clone()));
        } else if !line.starts_with("pub const") {
            doc.clear();
        }
    }
    out
}

fn reason_codes_reference() -> String {
    let groups = reason_groups();
    let listed: Vec<String> = groups
        .iter()
        .flat_map(|g| g.1.iter().map(|v| screaming(v)))
        .collect();
    let all: Vec<&str> = pdgate::decision::ReasonCode::ALL
        .iter()
        .map(|c| c.as_str())
        .collect();
    assert_eq!(
        listed, all,
        "the variants read from reason.rs are ReasonCode::ALL, in order"
    );
    let mut out = banner("`src/decision/reason.rs` and `src/transport/rescue.rs`");
    out.push_str(
        "# Reason codes\n\nWhy pdgate refused a call: the `reasons` of a decision, the \
         `google.rpc.ErrorInfo` reason (the first code) and its `reasons` metadata (all of \
         them) in `grpc-status-details-bin`, the audit record's `reasons`. The names are a public \
         interface: codes are added, never renamed. Each stage and code is explained in \
         [decisions.md](../decisions.md); [clients.md](../clients.md) shows how to read them \
         in a client.\n\n## Decisions\n\n| code | where it comes from |\n|---|---|\n",
    );
    for (comment, variants) in &groups {
        for v in variants {
            let _ = writeln!(out, "| `{}` | {comment} |", screaming(v));
        }
    }
    out.push_str(
        "\n## Refusals of pdgate's admin API\n\nThe `ErrorInfo` reason of an admin call \
         (`PolicyAdmin`, `SubjectRights`, `AuditLog`) that pdgate refused:\n\n\
         | code | refused |\n|---|---|\n",
    );
    for (code, doc) in admin_reasons() {
        let _ = writeln!(out, "| `{code}` | {doc} |");
    }
    out
}

#[test]
fn reason_codes_reference_is_generated_from_the_code() {
    generated("docs/reference/reason-codes.md", &reason_codes_reference());
}

#[test]
fn every_reason_code_is_explained_in_the_decisions_page() {
    let page = read("docs/decisions.md");
    let missing: Vec<&str> = pdgate::decision::ReasonCode::ALL
        .iter()
        .map(|c| c.as_str())
        .filter(|code| !page.contains(&format!("`{code}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "reason codes docs/decisions.md does not explain: {missing:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Pages

fn pages() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    let mut out = vec![repo().join("README.md")];
    walk(&repo().join("docs"), &mut out);
    out.sort();
    out
}

/// GitHub's anchor of a heading: lowercase, punctuation dropped, spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The headings of a Markdown text outside fenced blocks, as anchors.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn files_shown_in_the_docs_are_the_files() {
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            // A marker is a line of its own; the fenced block follows it.
            let Some(path) = line
                .strip_prefix("<!-- file: ")
                .and_then(|l| l.strip_suffix(" -->"))
            else {
                continue;
            };
            assert!(
                lines.next().is_some_and(|l| l.starts_with("```")),
                "{}: a fenced block follows `{path}`",
                page.display()
            );
            let mut shown = String::new();
            for l in lines.by_ref().take_while(|l| !l.starts_with("```")) {
                shown.push_str(l);
                shown.push('\n');
            }
            assert_eq!(
                shown,
                read(path),
                "{} shows `{path}`: it must be the file, byte for byte",
                page.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 5, "the quickstart shows its five files");
}

#[test]
fn relative_links_lead_to_files_and_headings_that_exist() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let mut fenced = false;
        for line in text.lines() {
            if line.starts_with("```") {
                fenced = !fenced;
                continue;
            }
            if fenced {
                continue;
            }
            for part in line.split("](").skip(1) {
                let target = part.split(')').next().unwrap_or("");
                if target.starts_with("http") || target.starts_with("mailto:") {
                    continue;
                }
                let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
                let path = if file.is_empty() {
                    page.clone()
                } else {
                    page.parent().unwrap().join(file)
                };
                if !path.exists() {
                    broken.push(format!("{}: `{target}`: no such file", page.display()));
                    continue;
                }
                if !anchor.is_empty() {
                    let linked = std::fs::read_to_string(&path).unwrap();
                    if !anchors(&linked).contains(anchor) {
                        broken.push(format!("{}: `{target}`: no such heading", page.display()));
                    }
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn readme_starts_with_the_two_commands_and_the_install_step() {
    let readme = read("README.md");
    let first = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .unwrap();
    let commands: Vec<&str> = first
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .collect();
    assert_eq!(commands, ["cargo run -- demo", "cargo test"]);
    assert!(readme.contains("cargo install --path ."));
}
