//! Per-segment indexes: `segment-NNNNNNNN.idx` next to each sealed segment, mapping subject
//! ids, decision ids and trace ids to the byte ranges of the lines that hold them, so a query
//! for one person reads a few lines of each sealed segment instead of all of them.
//!
//! An index is derived data. It is built in the background after a segment is sealed (never
//! on the writer's path), written to a temporary file and renamed into place. `verify` never
//! reads it. Every lookup checks it before trusting it — the header and directory against
//! their checksum, the bucket it reads against the bucket's checksum, the segment's length and
//! its last record's hash against what the index was built from — and a lookup that finds
//! anything wrong returns `None`: the segment is then scanned, so a missing, stale or corrupt
//! index costs time, never a wrong answer. Lines found through it are parsed and matched
//! against the whole filter like scanned ones, so a stray offset cannot add a record either.
//!
//! Layout (little-endian):
//!
//! | at | what |
//! |---|---|
//! | 0 | magic `PDGATE-AUDIT-IX1` |
//! | 16 | segment length in bytes, u64 |
//! | 24 | records, u64 |
//! | 32 | first and last sequence number, u64 each |
//! | 48 | last record's time (µs), u64 |
//! | 56 | last line's offset, u64 |
//! | 64 | last record's hash, 32 bytes |
//! | 96 | buckets, entries, u32 each |
//! | 104 | directory: per bucket its first entry, its entry count (u32 each), check (8 bytes) |
//! | then | check of everything above (8 bytes) |
//! | then | entries, grouped by bucket: key (u64), line offset (u64), line length (u32) |
//!
//! A key is the first 8 bytes of SHA-256 over a one-byte tag (`s` subject, `d` decision id,
//! `t` trace id) and the value; its bucket is `key % buckets`. Checks are the first 8 bytes of
//! SHA-256. Two values with the same key only make a lookup read a line it then discards.

use super::AuditError;
use super::record::split_line;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 16] = b"PDGATE-AUDIT-IX1";
const HEADER: usize = 104;
const DIR_ENTRY: usize = 16;
const ENTRY: usize = 20;
/// Entries per bucket, on average: a lookup reads and checks about this many.
const PER_BUCKET: usize = 32;

/// What is indexed: the tag of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    Subject(&'a str),
    DecisionId(&'a str),
    TraceId(&'a str),
}

impl Key<'_> {
    fn hash(self) -> u64 {
        let (tag, value) = match self {
            Key::Subject(v) => (b's', v),
            Key::DecisionId(v) => (b'd', v),
            Key::TraceId(v) => (b't', v),
        };
        let mut h = Sha256::new();
        h.update([tag]);
        h.update(value.as_bytes());
        let digest = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }
}

/// What an index says about its segment (also what retention needs to know of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub segment_len: u64,
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_time_us: u64,
    pub last_offset: u64,
    pub last_hash: [u8; 32],
}

/// `segment-NNNNNNNN.idx` for `segment-NNNNNNNN.jsonl`.
pub fn index_path(segment: &Path) -> PathBuf {
    segment.with_extension("idx")
}

fn check(bytes: &[u8]) -> [u8; 8] {
    let digest = Sha256::digest(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    first
}

/// The fields an index needs; the rest of the line is skipped unparsed.
#[derive(Deserialize)]
struct Keys<'a> {
    seq: u64,
    #[serde(default)]
    time_us: u64,
    #[serde(borrow, default)]
    decision_id: Cow<'a, str>,
    #[serde(borrow, default)]
    subjects: Vec<Cow<'a, str>>,
    #[serde(borrow, default)]
    trace_id: Option<Cow<'a, str>>,
}

/// Builds the index of a sealed segment and renames it into place. Refuses (an error, and no
/// index) a segment with an unfinished or unreadable line: such a segment is always scanned.
pub fn build(segment: &Path) -> Result<Summary, AuditError> {
    let bytes = std::fs::read(segment).map_err(|e| AuditError::io(segment, e))?;
    let corrupt = |what: String| AuditError::Corrupt(format!("{}: {what}", segment.display()));
    let mut entries: Vec<(u64, u64, u32)> = Vec::new();
    let mut summary = Summary {
        segment_len: bytes.len() as u64,
        records: 0,
        first_seq: 0,
        last_seq: 0,
        last_time_us: 0,
        last_offset: 0,
        last_hash: [0; 32],
    };
    let mut at = 0usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let Some(end) = memchr::memchr(b'\n', rest) else {
            return Err(corrupt(format!("unfinished line at byte {at}")));
        };
        let line = &rest[..=end];
        let len = u32::try_from(line.len()).map_err(|_| corrupt("a line over 4 GiB".into()))?;
        let keys: Keys<'_> = serde_json::from_slice(line)
            .map_err(|e| corrupt(format!("unreadable line at byte {at}: {e}")))?;
        let hash = std::str::from_utf8(line)
            .ok()
            .and_then(split_line)
            .map(|(_, h)| h)
            .ok_or_else(|| corrupt(format!("line at byte {at} has no hash")))?;
        let offset = at as u64;
        for s in &keys.subjects {
            entries.push((Key::Subject(s).hash(), offset, len));
        }
        if !keys.decision_id.is_empty() {
            entries.push((Key::DecisionId(&keys.decision_id).hash(), offset, len));
        }
        if let Some(t) = keys.trace_id.as_deref() {
            entries.push((Key::TraceId(t).hash(), offset, len));
        }
        if summary.records == 0 {
            summary.first_seq = keys.seq;
        }
        summary.records += 1;
        summary.last_seq = keys.seq;
        summary.last_time_us = keys.time_us;
        summary.last_offset = offset;
        summary.last_hash = hash;
        at += end + 1;
    }
    let buckets = (entries.len() / PER_BUCKET).clamp(1, 1 << 20);
    let bucket_of = |key: u64| (key % buckets as u64) as usize;
    entries.sort_unstable_by_key(|&(key, offset, _)| (bucket_of(key), key, offset));
    entries.dedup();
    let count = u32::try_from(entries.len()).map_err(|_| corrupt("too many keys".into()))?;

    let mut body = Vec::with_capacity(entries.len() * ENTRY);
    let mut directory = vec![(0u32, 0u32, [0u8; 8]); buckets];
    let mut i = 0usize;
    for (b, slot) in directory.iter_mut().enumerate() {
        let start = i;
        while i < entries.len() && bucket_of(entries[i].0) == b {
            let (key, offset, len) = entries[i];
            body.extend_from_slice(&key.to_le_bytes());
            body.extend_from_slice(&offset.to_le_bytes());
            body.extend_from_slice(&len.to_le_bytes());
            i += 1;
        }
        // Entry counts fit in u32: there are at most `count` of them.
        *slot = (
            u32::try_from(start).unwrap_or(u32::MAX),
            u32::try_from(i - start).unwrap_or(u32::MAX),
            check(&body[start * ENTRY..i * ENTRY]),
        );
    }
    let mut out = Vec::with_capacity(HEADER + buckets * DIR_ENTRY + 8 + body.len());
    out.extend_from_slice(MAGIC);
    for v in [
        summary.segment_len,
        summary.records,
        summary.first_seq,
        summary.last_seq,
        summary.last_time_us,
        summary.last_offset,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&summary.last_hash);
    out.extend_from_slice(&u32::try_from(buckets).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    for (start, n, c) in &directory {
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(c);
    }
    let c = check(&out);
    out.extend_from_slice(&c);
    out.extend_from_slice(&body);

    let path = index_path(segment);
    let tmp = path.with_extension("idx.tmp");
    let written = File::create(&tmp)
        .and_then(|mut f| f.write_all(&out))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(AuditError::io(&path, e));
    }
    Ok(summary)
}

/// An index opened and checked against its segment.
pub struct Index {
    file: File,
    pub summary: Summary,
    buckets: usize,
    /// Per bucket: first entry, entry count, check.
    directory: Vec<(u32, u32, [u8; 8])>,
    entries: u64,
    body_at: u64,
}

/// The longest last line an index is trusted to point at: sizes read from an index are
/// bounded before anything is allocated for them.
const MAX_LINE: u64 = 16 * 1024 * 1024;

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

impl Index {
    /// Opens the index of `segment` when there is one that is whole and was built from the
    /// segment as it is now; `None` otherwise (the segment must be scanned).
    pub fn open(segment: &Path, segment_file: &File) -> Option<Self> {
        let file = File::open(index_path(segment)).ok()?;
        let mut header = [0u8; HEADER];
        file.read_exact_at(&mut header, 0).ok()?;
        if &header[..16] != MAGIC {
            return None;
        }
        let mut last_hash = [0u8; 32];
        last_hash.copy_from_slice(&header[64..96]);
        let summary = Summary {
            segment_len: u64_at(&header, 16),
            records: u64_at(&header, 24),
            first_seq: u64_at(&header, 32),
            last_seq: u64_at(&header, 40),
            last_time_us: u64_at(&header, 48),
            last_offset: u64_at(&header, 56),
            last_hash,
        };
        let buckets = u32_at(&header, 96) as usize;
        let entries = u64::from(u32_at(&header, 100));
        if buckets == 0 || buckets > 1 << 20 {
            return None;
        }
        let mut head = vec![0u8; HEADER + buckets * DIR_ENTRY + 8];
        file.read_exact_at(&mut head, 0).ok()?;
        let (covered, claimed) = head.split_at(HEADER + buckets * DIR_ENTRY);
        if check(covered) != claimed {
            return None;
        }
        // Whole: as long as its header says (a cut-short index is not used at all).
        let body_at = (HEADER + buckets * DIR_ENTRY + 8) as u64;
        if file.metadata().ok()?.len() != body_at + entries * ENTRY as u64 {
            return None;
        }
        let directory = covered[HEADER..]
            .chunks_exact(DIR_ENTRY)
            .map(|d| {
                let mut c = [0u8; 8];
                c.copy_from_slice(&d[8..16]);
                (u32_at(d, 0), u32_at(d, 4), c)
            })
            .collect();
        // Built from this segment as it is now: same length, same last record.
        if segment_file.metadata().ok()?.len() != summary.segment_len
            || summary.records == 0
            || summary.last_offset >= summary.segment_len
            || summary.segment_len - summary.last_offset > MAX_LINE
        {
            return None;
        }
        let last_len = usize::try_from(summary.segment_len - summary.last_offset).ok()?;
        let mut last = vec![0u8; last_len];
        segment_file
            .read_exact_at(&mut last, summary.last_offset)
            .ok()?;
        let (_, hash) = std::str::from_utf8(&last).ok().and_then(split_line)?;
        if hash != summary.last_hash {
            return None;
        }
        Some(Self {
            file,
            summary,
            buckets,
            directory,
            entries,
            body_at,
        })
    }

    /// The lines (offset, length), in log order, that may hold `key`; `None` when the bucket
    /// is damaged (the segment must be scanned).
    pub fn lookup(&self, key: Key<'_>) -> Option<Vec<(u64, u32)>> {
        let key = key.hash();
        let (start, n, c) = *self.directory.get((key % self.buckets as u64) as usize)?;
        if u64::from(start) + u64::from(n) > self.entries {
            return None;
        }
        let mut bucket = vec![0u8; n as usize * ENTRY];
        self.file
            .read_exact_at(&mut bucket, self.body_at + u64::from(start) * ENTRY as u64)
            .ok()?;
        if check(&bucket) != c {
            return None;
        }
        let mut lines: Vec<(u64, u32)> = bucket
            .chunks_exact(ENTRY)
            .filter(|e| u64_at(e, 0) == key)
            .map(|e| (u64_at(e, 8), u32_at(e, 16)))
            .collect();
        if lines
            .iter()
            .any(|&(offset, len)| u64::from(len) > MAX_LINE || offset >= self.summary.segment_len)
        {
            return None;
        }
        lines.sort_unstable();
        Some(lines)
    }
}

/// The summary of a segment from its index when that is valid.
pub fn summary_of(segment: &Path) -> Option<Summary> {
    let file = File::open(segment).ok()?;
    Index::open(segment, &file).map(|i| i.summary)
}
