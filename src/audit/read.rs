//! Reading the audit log: verifying the chain, and finding records.

use super::record::{AuditRecord, GENESIS, chain_hash, split_line};
use super::{AuditError, HEAD_FILE, segment_paths};
use serde::Serialize;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// The first thing wrong with a log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Break {
    /// The segment file and 1-based line, when the problem is on a line.
    pub segment: Option<String>,
    pub line: Option<usize>,
    /// The sequence number expected there.
    pub seq: u64,
    pub what: String,
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub segments: usize,
    pub records: u64,
    /// Hex hash of the last record.
    pub last_hash: String,
    /// `None` when the chain is whole.
    pub first_break: Option<Break>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.first_break.is_none()
    }
}

/// Checks the whole chain of `dir`: every record's hash, its link to the one before, the
/// sequence numbers, and that the log reaches what `HEAD` says was written. Stops at the first
/// break and names it.
pub fn verify(dir: &Path) -> Result<Verification, AuditError> {
    let segments = segment_paths(dir)?;
    let mut prev = GENESIS;
    let mut expected = 1u64;
    let mut report = Verification {
        segments: segments.len(),
        records: 0,
        last_hash: hex::encode(GENESIS),
        first_break: None,
    };
    let mut buf = String::new();
    for (_, path) in &segments {
        let name = file_name(path);
        let mut reader = BufReader::new(File::open(path).map_err(|e| AuditError::io(path, e))?);
        let mut line_no = 0usize;
        loop {
            buf.clear();
            let n = reader
                .read_line(&mut buf)
                .map_err(|e| AuditError::io(path, e))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            let broken = |what: String| Break {
                segment: Some(name.clone()),
                line: Some(line_no),
                seq: expected,
                what,
            };
            if !buf.ends_with('\n') {
                report.first_break = Some(broken(
                    "the last line is unfinished: the log was cut short".into(),
                ));
                return Ok(report);
            }
            let record: AuditRecord = match serde_json::from_str(&buf) {
                Ok(r) => r,
                Err(e) => {
                    report.first_break = Some(broken(format!("unreadable record: {e}")));
                    return Ok(report);
                }
            };
            let Some((body, claimed)) = split_line(&buf) else {
                report.first_break = Some(broken("the record has no hash".into()));
                return Ok(report);
            };
            if record.seq != expected {
                let what = if record.seq > expected {
                    format!(
                        "record {} appears where {expected} belongs: records were deleted or reordered",
                        record.seq
                    )
                } else {
                    format!(
                        "record {} appears where {expected} belongs: records were inserted or reordered",
                        record.seq
                    )
                };
                report.first_break = Some(broken(what));
                return Ok(report);
            }
            if record.prev != hex::encode(prev) {
                report.first_break = Some(broken(format!(
                    "record {} does not link to the record before it: a record was inserted, deleted or reordered",
                    record.seq
                )));
                return Ok(report);
            }
            if chain_hash(&prev, body.as_bytes()) != claimed {
                report.first_break = Some(broken(format!(
                    "record {} was modified: its hash does not match its content",
                    record.seq
                )));
                return Ok(report);
            }
            prev = claimed;
            expected += 1;
            report.records += 1;
        }
    }
    report.last_hash = hex::encode(prev);
    let head_path = dir.join(HEAD_FILE);
    match std::fs::read_to_string(&head_path) {
        Ok(text) => {
            let mut parts = text.split_whitespace();
            let seq: Option<u64> = parts.next().and_then(|s| s.parse().ok());
            let hash = parts.next();
            match (seq, hash) {
                (Some(seq), Some(hash)) => {
                    let end = Break {
                        segment: None,
                        line: None,
                        seq: report.records + 1,
                        what: String::new(),
                    };
                    if seq > report.records {
                        report.first_break = Some(Break {
                            what: format!(
                                "the log ends at record {} but HEAD says {seq} were written: the tail was cut off",
                                report.records
                            ),
                            ..end
                        });
                    } else if seq == report.records && hash != report.last_hash {
                        report.first_break = Some(Break {
                            what: format!(
                                "the last record's hash differs from the one HEAD holds for record {seq}"
                            ),
                            ..end
                        });
                    }
                }
                _ => {
                    report.first_break = Some(Break {
                        segment: None,
                        line: None,
                        seq: 0,
                        what: "HEAD is unreadable".into(),
                    });
                }
            }
        }
        Err(_) if report.records == 0 => {}
        Err(e) => {
            report.first_break = Some(Break {
                segment: None,
                line: None,
                seq: 0,
                what: format!(
                    "HEAD cannot be read ({e}): without it a log cut short cannot be told from a whole one"
                ),
            });
        }
    }
    Ok(report)
}

/// Which records a query wants. Every given field must match; purposes and categories match
/// their children too (`marketing` finds `marketing.email`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub subject: Option<String>,
    pub caller: Option<String>,
    pub purpose: Option<String>,
    pub category: Option<String>,
    pub decision: Option<String>,
    pub reason: Option<String>,
    pub since_us: Option<u64>,
    pub until_us: Option<u64>,
    pub trace_id: Option<String>,
    pub decision_id: Option<String>,
}

fn within(value: &str, tree: &str) -> bool {
    value == tree
        || value
            .strip_prefix(tree)
            .is_some_and(|rest| rest.starts_with('.'))
}

impl Filter {
    pub fn matches(&self, r: &AuditRecord) -> bool {
        let b = &r.body;
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        self.subject
            .as_deref()
            .is_none_or(|s| b.subjects.iter().any(|x| x == s))
            && eq(&self.caller, &b.caller)
            && self
                .purpose
                .as_deref()
                .is_none_or(|p| within(&b.purpose, p))
            && self
                .category
                .as_deref()
                .is_none_or(|c| b.categories.iter().any(|x| within(x, c) || within(c, x)))
            && eq(&self.decision, &b.decision)
            && self
                .reason
                .as_deref()
                .is_none_or(|c| b.reasons.iter().any(|r| r.code == c))
            && self.since_us.is_none_or(|t| b.time_us >= t)
            && self.until_us.is_none_or(|t| b.time_us < t)
            && self
                .trace_id
                .as_deref()
                .is_none_or(|t| b.trace_id.as_deref() == Some(t))
            && eq(&self.decision_id, &b.decision_id)
    }
}

/// Calls `each` with every record of `dir` that `filter` matches, in log order, until it
/// returns `false`.
pub fn scan(
    dir: &Path,
    filter: &Filter,
    mut each: impl FnMut(AuditRecord) -> bool,
) -> Result<(), AuditError> {
    // The wanted decision id or subject must appear in a matching line as a JSON string: with
    // one, a segment is searched as bytes (memchr's SIMD search) and only the lines that hold
    // it are parsed. Subject ids are short and selective, so this finds a person's records in
    // a million without parsing the million.
    let needle = filter
        .decision_id
        .as_ref()
        .or(filter.subject.as_ref())
        .map(|s| serde_json::to_string(s).unwrap_or_default());
    let finder = needle
        .as_deref()
        .map(|n| memchr::memmem::Finder::new(n.as_bytes()));
    for (_, path) in segment_paths(dir)? {
        let bytes = std::fs::read(&path).map_err(|e| AuditError::io(&path, e))?;
        let mut lines = Lines::new(&bytes);
        match &finder {
            None => {
                while let Some(line) = lines.next_line() {
                    if !offer(line, filter, &mut each) {
                        return Ok(());
                    }
                }
            }
            Some(finder) => {
                let mut from = 0;
                while let Some(hit) = finder.find(&bytes[from..]) {
                    let at = from + hit;
                    let start = memchr::memrchr(b'\n', &bytes[..at]).map_or(0, |i| i + 1);
                    let end =
                        memchr::memchr(b'\n', &bytes[at..]).map_or(bytes.len(), |i| at + i + 1);
                    if !offer(&bytes[start..end], filter, &mut each) {
                        return Ok(());
                    }
                    from = end;
                }
            }
        }
    }
    Ok(())
}

/// Parses one line and hands it on if it matches; `false` when `each` wants no more.
fn offer(line: &[u8], filter: &Filter, each: &mut impl FnMut(AuditRecord) -> bool) -> bool {
    // An unfinished last line (a crash mid-write, never acknowledged) is not a record.
    if !line.ends_with(b"\n") {
        return true;
    }
    match serde_json::from_slice::<AuditRecord>(line) {
        Ok(record) if filter.matches(&record) => each(record),
        _ => true,
    }
}

/// Lines of a segment, each with its newline.
struct Lines<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Lines<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn next_line(&mut self) -> Option<&'a [u8]> {
        if self.at >= self.bytes.len() {
            return None;
        }
        let rest = &self.bytes[self.at..];
        let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
        self.at += end;
        Some(&rest[..end])
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
