//! Retention: deleting the oldest sealed segments (by count or by age) without breaking the
//! chain's verifiability.
//!
//! Before any segment is deleted, `ANCHOR` is written (to a temporary file, synced, renamed):
//! the sequence number and hash of the last record being deleted, and its segment's number.
//! `verify` then starts the chain from it and says the log starts at record `seq + 1`. A
//! segment deleted without a matching anchor stays a break. The active segment is never
//! deleted; only a prefix of the sealed ones is, so the anchor always sits at a segment
//! boundary. A crash between the anchor and the deletions leaves segments the anchor already
//! covers: `verify` skips them and the next pass deletes them.

use super::index::summary_of;
use super::record::split_line;
use super::{AuditError, segment_paths};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const ANCHOR_FILE: &str = "ANCHOR";

/// How much of the log to keep. Both limits apply; `None` keeps everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Sealed segments kept besides the active one.
    pub segments: Option<usize>,
    /// Sealed segments whose last record is older than this are deleted.
    pub max_age: Option<std::time::Duration>,
}

impl Retention {
    pub fn keeps_everything(&self) -> bool {
        self.segments.is_none() && self.max_age.is_none()
    }
}

/// The last record retention deleted: the chain continues from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Anchor {
    pub seq: u64,
    #[serde(serialize_with = "hex_hash")]
    pub hash: [u8; 32],
    /// The segment that held it; it and every segment before it are gone.
    pub segment: u64,
}

fn hex_hash<S: serde::Serializer>(hash: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(hash))
}

/// The anchor of `dir`, if retention ever deleted anything. An `ANCHOR` that cannot be read
/// is an error: without it the log's start cannot be vouched for.
pub fn read_anchor(dir: &Path) -> Result<Option<Anchor>, AuditError> {
    let path = dir.join(ANCHOR_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AuditError::io(&path, e)),
    };
    let mut parts = text.split_whitespace();
    let seq = parts.next().and_then(|s| s.parse().ok());
    let mut hash = [0u8; 32];
    let hash_ok = parts
        .next()
        .is_some_and(|h| hex::decode_to_slice(h, &mut hash).is_ok());
    let segment = parts.next().and_then(|s| s.parse().ok());
    match (seq, hash_ok, segment, parts.next()) {
        (Some(seq), true, Some(segment), None) => Ok(Some(Anchor { seq, hash, segment })),
        _ => Err(AuditError::Corrupt(format!(
            "{} is unreadable (expected `SEQ HASH SEGMENT`)",
            path.display()
        ))),
    }
}

fn write_anchor(dir: &Path, anchor: &Anchor) -> Result<(), AuditError> {
    let path = dir.join(ANCHOR_FILE);
    let tmp = dir.join("ANCHOR.tmp");
    let text = format!(
        "{:020} {} {:08}\n",
        anchor.seq,
        hex::encode(anchor.hash),
        anchor.segment
    );
    // Synced and renamed, and the directory synced, before any segment goes: a crash leaves
    // either the old anchor and every segment, or the new anchor.
    File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path))
        .and_then(|()| File::open(dir)?.sync_all())
        .map_err(|e| AuditError::io(&path, e))
}

/// The last complete record of a segment: its sequence number, hash and time.
pub(super) fn last_record(path: &Path) -> Result<Option<(u64, [u8; 32], u64)>, AuditError> {
    if let Some(s) = summary_of(path) {
        return Ok(Some((s.last_seq, s.last_hash, s.last_time_us)));
    }
    let file = File::open(path).map_err(|e| AuditError::io(path, e))?;
    let len = file.metadata().map_err(|e| AuditError::io(path, e))?.len();
    // Read back from the end in growing windows until a whole last line is in view.
    let mut window = 8192u64;
    loop {
        let from = len.saturating_sub(window);
        let mut buf = vec![0u8; usize::try_from(len - from).unwrap_or(usize::MAX)];
        file.read_exact_at(&mut buf, from)
            .map_err(|e| AuditError::io(path, e))?;
        // Only complete lines count: drop an unfinished tail.
        let complete = match memchr::memrchr(b'\n', &buf) {
            Some(i) => &buf[..=i],
            None if from == 0 => return Ok(None),
            None => {
                window *= 4;
                continue;
            }
        };
        let start = memchr::memrchr(b'\n', &complete[..complete.len() - 1]).map(|i| i + 1);
        let line = match start {
            Some(s) => &complete[s..],
            None if from == 0 => complete,
            None => {
                window *= 4;
                continue;
            }
        };
        #[derive(serde::Deserialize)]
        struct Last {
            seq: u64,
            #[serde(default)]
            time_us: u64,
        }
        let corrupt =
            || AuditError::Corrupt(format!("{}: the last record is unreadable", path.display()));
        let last: Last = serde_json::from_slice(line).map_err(|_| corrupt())?;
        let (_, hash) = std::str::from_utf8(line)
            .ok()
            .and_then(split_line)
            .ok_or_else(corrupt)?;
        return Ok(Some((last.seq, hash, last.time_us)));
    }
}

/// Deletes the sealed segments (numbers below `active`) that `retention` no longer keeps, and
/// the leftovers of an interrupted pass. Returns how many segments were deleted.
pub fn apply(
    dir: &Path,
    retention: &Retention,
    active: u64,
    now_us: u64,
) -> Result<usize, AuditError> {
    let anchor = read_anchor(dir)?;
    let sealed: Vec<(u64, std::path::PathBuf)> = segment_paths(dir)?
        .into_iter()
        .filter(|(n, _)| *n < active)
        .collect();
    // Segments an anchor already covers (a pass that was interrupted) go first.
    let covered = anchor.map_or(0, |a| a.segment);
    let (old, live): (Vec<_>, Vec<_>) = sealed.into_iter().partition(|(n, _)| *n <= covered);
    let mut cut = 0usize;
    if let Some(keep) = retention.segments {
        cut = cut.max(live.len().saturating_sub(keep));
    }
    if let Some(age) = retention.max_age {
        let limit = now_us.saturating_sub(u64::try_from(age.as_micros()).unwrap_or(u64::MAX));
        for (i, (_, path)) in live.iter().enumerate().skip(cut) {
            match last_record(path)? {
                Some((_, _, time)) if time < limit => cut = i + 1,
                // An empty sealed segment holds nothing to age; it goes with older ones.
                None => {}
                Some(_) => break,
            }
        }
    }
    let doomed = &live[..cut];
    if let Some((number, _)) = doomed.last() {
        // The newest record being deleted is the new anchor.
        let mut new = anchor;
        for (_, path) in doomed.iter().rev() {
            if let Some((seq, hash, _)) = last_record(path)? {
                new = Some(Anchor {
                    seq,
                    hash,
                    segment: *number,
                });
                break;
            }
        }
        if let Some(mut a) = new {
            a.segment = *number;
            write_anchor(dir, &a)?;
        }
    }
    let mut deleted = 0;
    for (_, path) in old.iter().chain(doomed) {
        match std::fs::remove_file(path) {
            Ok(()) => deleted += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AuditError::io(path, e)),
        }
        let _ = std::fs::remove_file(super::index::index_path(path));
    }
    if deleted > 0 {
        tracing::info!(deleted, "audit segments removed by retention");
    }
    Ok(deleted)
}
