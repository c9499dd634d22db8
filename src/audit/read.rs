//! Reading the audit log: verifying the chain, and finding records.

use super::index::{Index, Key};
use super::record::{AuditRecord, GENESIS, RecordKind, chain_hash, split_line};
use super::retention::{Anchor, read_anchor};
use super::{AuditError, HEAD_FILE, segment_paths};
use serde::Serialize;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
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
    /// The sequence number the verified log starts at: 1, or after retention deleted old
    /// segments, the one after the anchor.
    pub first_seq: u64,
    /// The last record retention deleted, when it did: the chain was verified from it.
    pub anchor: Option<Anchor>,
    /// Hex hash of the last record.
    pub last_hash: String,
    /// `None` when the chain is whole.
    pub first_break: Option<Break>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.first_break.is_none()
    }

    /// The last record's sequence number (0 for an empty log).
    pub fn last_seq(&self) -> u64 {
        (self.first_seq + self.records).saturating_sub(1)
    }
}

/// Checks the whole chain of `dir`: every record's hash, its link to the one before, the
/// sequence numbers, and that the log reaches what `HEAD` says was written. Stops at the first
/// break and names it.
///
/// After retention the chain starts from `ANCHOR` (the last deleted record): the first record
/// kept must follow it and link to its hash. Without an anchor the first record must be
/// record 1 — a segment deleted otherwise is a break, as is an anchor the log does not follow.
pub fn verify(dir: &Path) -> Result<Verification, AuditError> {
    // Retention may delete a segment while it is read; the anchor it wrote first then covers
    // it, so a second look sees a consistent log.
    let mut tries = 0;
    loop {
        match verify_once(dir) {
            Err(Vanished) if tries < 3 => tries += 1,
            Err(Vanished) => {
                return Err(AuditError::Corrupt(
                    "segments keep disappearing while the log is verified".into(),
                ));
            }
            Ok(result) => return result,
        }
    }
}

/// A segment listed a moment ago is gone (retention deleted it).
struct Vanished;

fn verify_once(dir: &Path) -> Result<Result<Verification, AuditError>, Vanished> {
    let segments = match segment_paths(dir) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    // Read after listing: an anchor written meanwhile covers more, never less, than listed.
    let anchor = match read_anchor(dir) {
        Ok(a) => a,
        Err(e) => {
            return Ok(Ok(Verification {
                segments: 0,
                records: 0,
                first_seq: 1,
                anchor: None,
                last_hash: hex::encode(GENESIS),
                first_break: Some(Break {
                    segment: None,
                    line: None,
                    seq: 0,
                    what: e.to_string(),
                }),
            }));
        }
    };
    // Segments the anchor covers are what an interrupted retention pass left: not verified.
    let segments: Vec<_> = segments
        .into_iter()
        .filter(|(n, _)| anchor.is_none_or(|a| *n > a.segment))
        .collect();
    let (mut prev, mut expected) = anchor.map_or((GENESIS, 1), |a| (a.hash, a.seq + 1));
    let mut report = Verification {
        segments: segments.len(),
        records: 0,
        first_seq: expected,
        anchor,
        last_hash: hex::encode(prev),
        first_break: None,
    };
    let mut buf = String::new();
    for (_, path) in &segments {
        let name = file_name(path);
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Vanished),
            Err(e) => return Ok(Err(AuditError::io(path, e))),
        };
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut line_no = 0usize;
        loop {
            buf.clear();
            let n = match reader.read_line(&mut buf) {
                Ok(n) => n,
                Err(e) => return Ok(Err(AuditError::io(path, e))),
            };
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
            if let Some(what) = check_line(&buf, &prev, expected, anchor, report.records == 0) {
                report.first_break = Some(broken(what));
                return Ok(Ok(report));
            }
            let Some((_, claimed)) = split_line(&buf) else {
                report.first_break = Some(broken("the record has no hash".into()));
                return Ok(Ok(report));
            };
            prev = claimed;
            expected += 1;
            report.records += 1;
        }
    }
    report.last_hash = hex::encode(prev);
    check_head(dir, &mut report);
    Ok(Ok(report))
}

/// The fields of a stored record that place it in the chain.
#[derive(serde::Deserialize)]
struct Link<'a> {
    seq: u64,
    #[serde(borrow)]
    prev: std::borrow::Cow<'a, str>,
}

/// What is wrong with one line, if anything, given the hash and sequence number it must
/// follow. `first` is the first record verified: there a gap means deleted segments.
fn check_line(
    line: &str,
    prev: &[u8; 32],
    expected: u64,
    anchor: Option<Anchor>,
    first: bool,
) -> Option<String> {
    if !line.ends_with('\n') {
        return Some("the last line is unfinished: the log was cut short".into());
    }
    // Only the chain's fields are decoded (the rest is checked as JSON, and by the hash):
    // decoding every field of a million records would double the time verify takes.
    let record: Link<'_> = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return Some(format!("unreadable record: {e}")),
    };
    let Some((body, claimed)) = split_line(line) else {
        return Some("the record has no hash".into());
    };
    if record.seq != expected {
        return Some(match (first, anchor) {
            (true, None) if record.seq > expected => format!(
                "the log starts at record {} with no ANCHOR: records 1 to {} were deleted, not by retention",
                record.seq,
                record.seq - 1
            ),
            (true, Some(a)) => format!(
                "the log starts at record {} but ANCHOR says retention deleted records up to {}: the anchor does not match the log",
                record.seq, a.seq
            ),
            _ if record.seq > expected => format!(
                "record {} appears where {expected} belongs: records were deleted or reordered",
                record.seq
            ),
            _ => format!(
                "record {} appears where {expected} belongs: records were inserted or reordered",
                record.seq
            ),
        });
    }
    let mut linked = [0u8; 32];
    if hex::decode_to_slice(record.prev.as_ref(), &mut linked).is_err() || &linked != prev {
        return Some(if first && anchor.is_some() {
            format!(
                "record {} does not link to the hash ANCHOR holds: the anchor does not match the log",
                record.seq
            )
        } else {
            format!(
                "record {} does not link to the record before it: a record was inserted, deleted or reordered",
                record.seq
            )
        });
    }
    if chain_hash(prev, body.as_bytes()) != claimed {
        return Some(format!(
            "record {} was modified: its hash does not match its content",
            record.seq
        ));
    }
    None
}

/// Compares the end of the verified chain with `HEAD`.
fn check_head(dir: &Path, report: &mut Verification) {
    let last = report.last_seq();
    let end = |what: String| Break {
        segment: None,
        line: None,
        seq: last + 1,
        what,
    };
    let head_path = dir.join(HEAD_FILE);
    match std::fs::read_to_string(&head_path) {
        Ok(text) => {
            let mut parts = text.split_whitespace();
            let seq: Option<u64> = parts.next().and_then(|s| s.parse().ok());
            let hash = parts.next();
            match (seq, hash) {
                (Some(seq), Some(hash)) => {
                    if seq > last {
                        report.first_break = Some(end(format!(
                            "the log ends at record {last} but HEAD says {seq} were written: the tail was cut off"
                        )));
                    } else if seq == last && hash != report.last_hash {
                        report.first_break = Some(end(format!(
                            "the last record's hash differs from the one HEAD holds for record {seq}"
                        )));
                    }
                }
                _ => {
                    report.first_break = Some(Break {
                        seq: 0,
                        ..end("HEAD is unreadable".into())
                    });
                }
            }
        }
        Err(_) if last == 0 => {}
        Err(e) => {
            report.first_break = Some(Break {
                seq: 0,
                ..end(format!(
                    "HEAD cannot be read ({e}): without it a log cut short cannot be told from a whole one"
                ))
            });
        }
    }
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
    /// Records of this kind only (`admin` finds administrative actions).
    pub kind: Option<RecordKind>,
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
                .is_none_or(|c| b.touched().any(|x| within(x, c) || within(c, x)))
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
            && self.kind.is_none_or(|k| b.kind == Some(k))
    }
}

/// How [`scan_lines`] finds the lines of a sealed segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Through the segment's index when the filter names a subject, decision id or trace id
    /// and the index is valid; by scanning otherwise.
    Indexed,
    /// Always by scanning (to measure the index, or to compare with it).
    Scan,
}

/// Calls `each` with every record of `dir` that `filter` matches, in log order, until it
/// returns `false`.
pub fn scan(
    dir: &Path,
    filter: &Filter,
    mut each: impl FnMut(AuditRecord) -> bool,
) -> Result<(), AuditError> {
    scan_lines(dir, filter, Access::Indexed, 0, |r, _| each(r))
}

/// Like [`scan`], with the line as stored (newline included) next to each record, records
/// after sequence number `after` only, and the choice of [`Access`].
pub fn scan_lines(
    dir: &Path,
    filter: &Filter,
    access: Access,
    after: u64,
    mut each: impl FnMut(AuditRecord, &[u8]) -> bool,
) -> Result<(), AuditError> {
    // The most selective indexed value the filter names.
    let key = filter
        .decision_id
        .as_deref()
        .map(Key::DecisionId)
        .or(filter.trace_id.as_deref().map(Key::TraceId))
        .or(filter.subject.as_deref().map(Key::Subject));
    // Without an index, the wanted decision id or subject must appear in a matching line as a
    // JSON string: a segment is searched as bytes (memchr's SIMD search) and only the lines
    // that hold it are parsed.
    let needle = filter
        .decision_id
        .as_ref()
        .or(filter.subject.as_ref())
        .map(|s| serde_json::to_string(s).unwrap_or_default());
    let finder = needle
        .as_deref()
        .map(|n| memchr::memmem::Finder::new(n.as_bytes()));
    for (_, path) in segment_paths(dir)? {
        let file = match File::open(&path) {
            Ok(f) => f,
            // Deleted by retention since it was listed: its records are no longer kept.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(AuditError::io(&path, e)),
        };
        let index = Index::open(&path, &file);
        if let Some(index) = &index
            && index.summary.last_seq <= after
        {
            continue;
        }
        if access == Access::Indexed
            && let (Some(key), Some(index)) = (key, &index)
            && let Some(lines) = index.lookup(key)
            // A value in a large share of the segment's records is found faster by reading
            // the segment whole than line by line.
            && (lines.len() as u64).saturating_mul(8) <= index.summary.records
            && let Some(lines) = read_lines(&file, &lines)
        {
            for line in &lines {
                if !offer(line, filter, after, &mut each) {
                    return Ok(());
                }
            }
            continue;
        }
        if !scan_lines_of(&path, filter, finder.as_ref(), after, &mut each)? {
            return Ok(());
        }
    }
    Ok(())
}

/// The lines at `(offset, length)` of a segment; `None` when one cannot be read (the index
/// points past the segment: it is not to be trusted after all, and the segment is scanned).
fn read_lines(file: &File, at: &[(u64, u32)]) -> Option<Vec<Vec<u8>>> {
    at.iter()
        .map(|&(offset, len)| {
            let mut line = vec![0u8; len as usize];
            file.read_exact_at(&mut line, offset).ok().map(|()| line)
        })
        .collect()
}

/// Scans one whole segment; `false` when `each` wants no more.
fn scan_lines_of(
    path: &Path,
    filter: &Filter,
    finder: Option<&memchr::memmem::Finder<'_>>,
    after: u64,
    each: &mut impl FnMut(AuditRecord, &[u8]) -> bool,
) -> Result<bool, AuditError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(AuditError::io(path, e)),
    };
    match finder {
        None => {
            let mut lines = Lines::new(&bytes);
            while let Some(line) = lines.next_line() {
                if !offer(line, filter, after, each) {
                    return Ok(false);
                }
            }
        }
        Some(finder) => {
            let mut from = 0;
            while let Some(hit) = finder.find(&bytes[from..]) {
                let at = from + hit;
                let start = memchr::memrchr(b'\n', &bytes[..at]).map_or(0, |i| i + 1);
                let end = memchr::memchr(b'\n', &bytes[at..]).map_or(bytes.len(), |i| at + i + 1);
                if !offer(&bytes[start..end], filter, after, each) {
                    return Ok(false);
                }
                from = end;
            }
        }
    }
    Ok(true)
}

/// The sequence number at the start of a stored line (`{"seq":N,...`), without parsing it.
fn seq_of(line: &[u8]) -> Option<u64> {
    let digits = line.strip_prefix(b"{\"seq\":")?;
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// Parses one line and hands it on if it matches; `false` when `each` wants no more.
fn offer(
    line: &[u8],
    filter: &Filter,
    after: u64,
    each: &mut impl FnMut(AuditRecord, &[u8]) -> bool,
) -> bool {
    // An unfinished last line (a crash mid-write, never acknowledged) is not a record.
    if !line.ends_with(b"\n") {
        return true;
    }
    if after > 0 && seq_of(line).is_some_and(|seq| seq <= after) {
        return true;
    }
    match serde_json::from_slice::<AuditRecord>(line) {
        Ok(record) if record.seq > after && filter.matches(&record) => each(record, line),
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
