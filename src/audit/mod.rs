//! The audit trail: one record per decision (allowed and denied, through the sidecar or the
//! Check API), hash-chained, append-only, written by a background writer in batches.
//!
//! A call waits for its record to be written before it is answered, so a record is never lost
//! for a call that was answered — not even when the process is killed (the write has reached
//! the kernel; `fsync = "batch"` also survives a power loss). When the writer's queue is full
//! or the disk fails, the call is denied (`AUDIT_UNAVAILABLE`), or waits if so configured;
//! never is a record dropped silently.
//!
//! On disk: `segment-NNNNNNNN.jsonl` files of JSON lines (see [`record`]) and `HEAD`, the last
//! written sequence number and hash, which lets `verify` notice a log cut short. Beside them,
//! derived and rebuilt when missing: `segment-NNNNNNNN.idx`, the index of a sealed segment
//! (see [`index`]). After retention deleted old segments: `ANCHOR`, the last deleted record,
//! from which the chain continues (see [`retention`]).

pub mod index;
pub mod read;
pub mod record;
pub mod retention;
mod writer;

pub use record::{AuditRecord, RecordBody, RecordKind, RecordReason};
pub use retention::{Anchor, Retention};
pub use writer::{AuditStats, ChainHead, Published};

use crate::decision::Decision;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc, oneshot};

pub const HEAD_FILE: &str = "HEAD";
const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".jsonl";

/// When the writer syncs to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// After every batch, before its calls are answered.
    EveryBatch,
    /// At most this long after a write (a power loss may lose that much; a killed process not).
    Interval(Duration),
}

/// What a call does when the writer's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Denied at once (`AUDIT_UNAVAILABLE`).
    Deny,
    /// Waits up to this long for room, then is denied.
    Wait(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    pub dir: PathBuf,
    pub fsync: Fsync,
    pub overflow: Overflow,
    /// Records waiting for the writer, at most.
    pub queue_capacity: usize,
    /// Records written in one write, at most.
    pub batch_max: usize,
    /// A segment is closed and a new one begun beyond this size.
    pub segment_max_bytes: u64,
    /// Which sealed segments to keep (default: all).
    pub retention: Retention,
}

impl AuditSettings {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            fsync: Fsync::EveryBatch,
            overflow: Overflow::Deny,
            queue_capacity: 65_536,
            batch_max: 1024,
            segment_max_bytes: 64 * 1024 * 1024,
            retention: Retention::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error("audit log `{path}`: {message}")]
    Io { path: String, message: String },
    #[error("audit record cannot be encoded: {0}")]
    Encode(String),
    #[error("audit log is corrupt: {0}")]
    Corrupt(String),
    #[error("audit queue is full ({0} records waiting)")]
    QueueFull(usize),
    #[error("audit writer has stopped")]
    Stopped,
}

impl AuditError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

/// The handle the decision path writes through. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<writer::Message>,
    overflow: Overflow,
    capacity: usize,
    healthy: Arc<AtomicBool>,
    stats: Arc<AuditStats>,
    dir: PathBuf,
    /// Every batch once written, for `Tail`; the writer sends only while someone listens.
    published: broadcast::Sender<Arc<Published>>,
}

/// Batches a lagging subscriber may fall behind by before it has to catch up from the files.
const PUBLISHED_BACKLOG: usize = 1024;

/// Owns the writer thread; [`AuditWriter::close`] writes every queued record and stops it.
pub struct AuditWriter {
    tx: mpsc::Sender<writer::Message>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AuditLog {
    /// Opens (or creates) the log and starts its writer thread, which runs until
    /// [`AuditWriter::close`] (or until every handle is dropped).
    pub fn open(settings: AuditSettings) -> Result<(Self, AuditWriter, ChainHead), AuditError> {
        let healthy = Arc::new(AtomicBool::new(true));
        let stats = Arc::new(AuditStats::default());
        let (published, _) = broadcast::channel(PUBLISHED_BACKLOG);
        let writer = writer::Writer::open(
            settings.clone(),
            healthy.clone(),
            stats.clone(),
            published.clone(),
        )?;
        let head = writer.head();
        let (tx, rx) = mpsc::channel(settings.queue_capacity);
        let thread = std::thread::Builder::new()
            .name("pdgate-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::Io {
                path: settings.dir.display().to_string(),
                message: format!("cannot start the writer thread: {e}"),
            })?;
        let closer = tx.clone();
        Ok((
            Self {
                tx,
                overflow: settings.overflow,
                capacity: settings.queue_capacity,
                healthy,
                stats,
                dir: settings.dir.clone(),
                published,
            },
            AuditWriter {
                tx: closer,
                thread: Some(thread),
            },
            head,
        ))
    }

    /// Writes `body` and waits until it is written; returns its sequence number. An error
    /// means the record is not in the log: the call must be denied.
    pub async fn record(&self, body: RecordBody) -> Result<u64, AuditError> {
        self.submit(body).await?.written().await
    }

    /// Hands `body` to the writer and returns once it is queued, without waiting for it to
    /// be written: the caller may do work that has no effect of its own meanwhile (forward a
    /// read) and must await [`Receipt::written`] before anything of that work is answered.
    /// An error means the record was not queued: the call must be denied.
    pub async fn submit(&self, body: RecordBody) -> Result<Receipt, AuditError> {
        let (ack, written) = oneshot::channel();
        let pending = writer::Message::Record(writer::Pending {
            body,
            ack: Some(ack),
        });
        match self.overflow {
            Overflow::Deny => self.tx.try_send(pending).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    self.stats.refused_full.fetch_add(1, Ordering::Relaxed);
                    AuditError::QueueFull(self.capacity)
                }
                mpsc::error::TrySendError::Closed(_) => AuditError::Stopped,
            })?,
            Overflow::Wait(limit) => match tokio::time::timeout(limit, self.tx.send(pending)).await
            {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(AuditError::Stopped),
                Err(_) => {
                    self.stats.refused_full.fetch_add(1, Ordering::Relaxed);
                    return Err(AuditError::QueueFull(self.capacity));
                }
            },
        }
        Ok(Receipt(written))
    }

    /// Whether the last batch was written (false after a write failure, until one succeeds).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Records waiting for the writer.
    pub fn queue_depth(&self) -> usize {
        self.capacity - self.tx.capacity()
    }

    pub fn stats(&self) -> &AuditStats {
        &self.stats
    }

    /// The log's directory (for readers: query, verify, tail).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every batch written from now on. A receiver that falls more than
    /// `PUBLISHED_BACKLOG` batches behind gets `Lagged` and must read what it missed from the
    /// files (they hold every published batch: a batch is published after it is written).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.published.subscribe()
    }

    /// Subscribers now (open `Tail` calls).
    pub fn subscribers(&self) -> usize {
        self.published.receiver_count()
    }
}

/// A queued record, until the writer says it is written (or that it could not be).
pub struct Receipt(oneshot::Receiver<Result<u64, AuditError>>);

impl Receipt {
    /// Waits until the record is written (and synced, with `fsync = "batch"`); returns its
    /// sequence number. An error means the record is not in the log.
    pub async fn written(self) -> Result<u64, AuditError> {
        self.0.await.map_err(|_| AuditError::Stopped)?
    }
}

impl AuditWriter {
    /// Writes every record queued so far, syncs, and stops the writer; records offered later
    /// are refused. Call it after the servers have stopped.
    pub async fn close(mut self) {
        let _ = self.tx.send(writer::Message::Close).await;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The body of a decision's record.
pub fn body_of(
    decision: &Decision,
    request: &crate::decision::Request,
    kind: RecordKind,
) -> RecordBody {
    RecordBody {
        time_us: now_us(),
        kind: Some(kind),
        decision_id: decision.decision_id.to_string(),
        trace_id: None,
        span_id: None,
        caller: request.caller.clone(),
        purpose: request.purpose.clone(),
        action: request.action.clone(),
        method: None,
        categories: request.categories.clone(),
        subjects: request.subjects.clone(),
        recipient: request.recipient.clone(),
        decision: if decision.allowed { "allow" } else { "deny" }.to_owned(),
        reasons: decision
            .reasons
            .iter()
            .map(|r| RecordReason {
                code: r.code.as_str().to_owned(),
                clause: r.clause.to_string(),
            })
            .collect(),
        matched_rules: decision
            .matched_rules
            .iter()
            .map(|m| format!("policy.csv:{}", m.line))
            .collect(),
        policy_version: decision.policy_version.map(|v| v.to_string()),
        cache_hit: decision.cache_hit,
        latency_us: 0,
        detail: None,
        shadow_decision: None,
        minimized: decision.minimized.clone(),
        minimizable: request.minimizable.clone(),
    }
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

pub(crate) fn segment_name(number: u64) -> String {
    format!("{SEGMENT_PREFIX}{number:08}{SEGMENT_SUFFIX}")
}

/// The segments in `dir`, in order.
pub fn segment_paths(dir: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    let entries = std::fs::read_dir(dir).map_err(|e| AuditError::io(dir, e))?;
    let mut segments: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let number = name
                .strip_prefix(SEGMENT_PREFIX)?
                .strip_suffix(SEGMENT_SUFFIX)?
                .parse()
                .ok()?;
            Some((number, e.path()))
        })
        .collect();
    segments.sort();
    Ok(segments)
}
