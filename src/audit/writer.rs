//! The audit writer: a dedicated thread that appends records in batches (group commit), chains
//! them, syncs them as configured, and acknowledges each record once it is written. A batch
//! that cannot be written is cut back off the file and every record in it is refused, so the
//! calls they belong to are denied: nothing is dropped silently.
//!
//! Work that may take long — indexing a sealed segment, deleting segments by retention — runs
//! on a second thread ([`Maintenance`]), so that it never holds up a batch.

use super::record::{AuditRecord, GENESIS, RecordBody, seal, split_line};
use super::retention::{self, Retention, read_anchor};
use super::{AuditError, AuditSettings, Fsync, HEAD_FILE, index, segment_name, segment_paths};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};

/// A record on its way to the writer, with whom to tell when it is written.
pub(super) struct Pending {
    pub body: RecordBody,
    pub ack: Option<oneshot::Sender<Result<u64, AuditError>>>,
}

/// What the writer receives: records, then at shutdown the order to finish.
#[expect(
    clippy::large_enum_variant,
    reason = "records are nearly every message; boxing them would cost an allocation per decision"
)]
pub(super) enum Message {
    Record(Pending),
    /// Write everything received before this, sync, and stop.
    Close,
}

/// Counters shared between the writer and the handle (and the metrics registry).
#[derive(Debug)]
pub struct AuditStats {
    pub written: AtomicU64,
    pub write_failures: AtomicU64,
    pub refused_full: AtomicU64,
    pub batches: AtomicU64,
    /// Seconds per batch write (one `write` of the batch's lines), and per sync (`fdatasync`:
    /// per batch, at rotation, or on the interval syncer's thread). Observed once per batch,
    /// not per record, so the histogram's lock is off the per-call path.
    pub write_seconds: prometheus_client::metrics::histogram::Histogram,
    pub sync_seconds: prometheus_client::metrics::histogram::Histogram,
}

/// Upper bounds of [`AuditStats`]' histograms: a page-cache write takes microseconds, a sync
/// on a busy or networked disk can take a second.
pub const IO_SECONDS_BUCKETS: [f64; 14] = [
    0.000_01, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.5, 2.5,
];

impl Default for AuditStats {
    fn default() -> Self {
        let histogram = || {
            prometheus_client::metrics::histogram::Histogram::new(
                IO_SECONDS_BUCKETS.iter().copied(),
            )
        };
        Self {
            written: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
            refused_full: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            write_seconds: histogram(),
            sync_seconds: histogram(),
        }
    }
}

/// Runs `io`, observing its duration in `histogram`.
fn timed<T>(
    histogram: &prometheus_client::metrics::histogram::Histogram,
    io: impl FnOnce() -> T,
) -> T {
    let began = std::time::Instant::now();
    let result = io();
    histogram.observe(began.elapsed().as_secs_f64());
    result
}

/// A batch as written: its first sequence number and its lines, each ending in `\n`, exactly
/// as stored.
#[derive(Debug)]
pub struct Published {
    pub first_seq: u64,
    pub lines: String,
}

impl Published {
    /// `(seq, line)` for each record of the batch (the line with its newline).
    pub fn records(&self) -> impl Iterator<Item = (u64, &str)> {
        self.lines
            .split_inclusive('\n')
            .zip(self.first_seq..)
            .map(|(line, seq)| (seq, line))
    }
}

/// Where the chain stands: the last record's sequence number and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: [u8; 32],
}

struct Segment {
    path: PathBuf,
    file: File,
    len: u64,
    number: u64,
}

pub(super) struct Writer {
    dir: PathBuf,
    settings: AuditSettings,
    segment: Segment,
    head: ChainHead,
    head_file: File,
    healthy: Arc<AtomicBool>,
    stats: Arc<AuditStats>,
    syncer: Arc<Syncer>,
    published: broadcast::Sender<Arc<Published>>,
    /// Indexing and retention; stopped and joined by [`Writer::run`] when it ends.
    maintenance: Option<Maintenance>,
}

/// The thread that indexes sealed segments and applies retention. It does a pass when it
/// starts, after every rotation, hourly while retention by age is on, and a last one when told
/// to stop. Its failures are logged and never reach the writer: an index is only a speed-up,
/// and a segment retention could not delete is still a whole part of the log.
struct Maintenance {
    tx: std::sync::mpsc::Sender<Chore>,
    thread: std::thread::JoinHandle<()>,
}

enum Chore {
    /// A segment was sealed; the active one is now this.
    Sealed(u64),
    Stop,
}

impl Maintenance {
    fn start(dir: PathBuf, retention: Retention, active: u64) -> Result<Self, AuditError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pdgate-audit-maint".into())
            .spawn(move || {
                let mut active = active;
                let every = if retention.max_age.is_some() {
                    Duration::from_secs(3600)
                } else {
                    Duration::MAX
                };
                loop {
                    maintain(&dir, &retention, active);
                    match rx.recv_timeout(every) {
                        Ok(Chore::Sealed(now_active)) => active = now_active,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Ok(Chore::Stop) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                            // Chores that came in meanwhile: the last pass covers them.
                            while let Ok(Chore::Sealed(n)) = rx.try_recv() {
                                active = n;
                            }
                            maintain(&dir, &retention, active);
                            return;
                        }
                    }
                }
            })
            .map_err(|e| AuditError::Io {
                path: String::new(),
                message: format!("cannot start the audit maintenance thread: {e}"),
            })?;
        Ok(Self { tx, thread })
    }

    fn stop(self) {
        let _ = self.tx.send(Chore::Stop);
        let _ = self.thread.join();
    }
}

/// One maintenance pass: retention, then an index for every sealed segment left without a
/// valid one (retention first, so that nothing is indexed only to be deleted).
fn maintain(dir: &Path, retention: &Retention, active: u64) {
    if !retention.keeps_everything()
        && let Err(e) = retention::apply(dir, retention, active, super::now_us())
    {
        tracing::error!(error = %e, "audit retention failed; old segments are kept");
    }
    match segment_paths(dir) {
        Ok(segments) => {
            for (_, path) in segments.iter().filter(|(n, _)| *n < active) {
                if index::summary_of(path).is_none()
                    && let Err(e) = index::build(path)
                {
                    tracing::warn!(segment = %path.display(), error = %e, "audit segment not indexed; queries scan it");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "audit segments not listed for indexing"),
    }
}

/// With `fsync = "interval"`: a thread that syncs the current segment when it has been
/// written to, at most `interval` after the write, whether or not more records come.
struct Syncer {
    dirty: AtomicBool,
    /// A second handle on the current segment (the writer replaces it at rotation).
    file: Mutex<Option<(PathBuf, File)>>,
    stop: AtomicBool,
}

impl Syncer {
    fn follow(&self, segment: &Segment) {
        let handle = segment
            .file
            .try_clone()
            .ok()
            .map(|f| (segment.path.clone(), f));
        *self.file.lock().unwrap_or_else(PoisonError::into_inner) = handle;
    }

    fn run(&self, interval: Duration, healthy: &AtomicBool, stats: &AuditStats) {
        while !self.stop.load(Ordering::Acquire) {
            std::thread::sleep(interval);
            if !self.dirty.swap(false, Ordering::AcqRel) {
                continue;
            }
            let file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((path, file)) = file.as_ref()
                && let Err(e) = timed(&stats.sync_seconds, || file.sync_data())
            {
                // Already acknowledged records may not survive a power loss: say so loudly,
                // and let the next batch find out whether the disk still takes writes.
                healthy.store(false, Ordering::Release);
                tracing::error!(segment = %path.display(), error = %e, "audit log sync failed");
            }
        }
    }
}

impl Writer {
    /// Opens the log in `settings.dir` (created if missing) and finds the head of the chain.
    pub(super) fn open(
        settings: AuditSettings,
        healthy: Arc<AtomicBool>,
        stats: Arc<AuditStats>,
        published: broadcast::Sender<Arc<Published>>,
    ) -> Result<Self, AuditError> {
        let dir = settings.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| AuditError::io(&dir, e))?;
        // After retention, the chain continues from the anchor: it is the head when no segment
        // after it holds a record.
        let anchor = read_anchor(&dir)?;
        let segments: Vec<(u64, PathBuf)> = segment_paths(&dir)?
            .into_iter()
            .filter(|(n, _)| anchor.is_none_or(|a| *n > a.segment))
            .collect();
        let start = anchor.map_or(
            ChainHead {
                seq: 0,
                hash: GENESIS,
            },
            |a| ChainHead {
                seq: a.seq,
                hash: a.hash,
            },
        );
        let (number, head) = match segments.last() {
            Some((number, path)) => (
                *number,
                match recover_tail(path)? {
                    Some(head) => head,
                    None => previous_head(&segments)?.unwrap_or(start),
                },
            ),
            None => (anchor.map_or(1, |a| a.segment + 1), start),
        };
        let segment = open_segment(&dir, number)?;
        let head_path = dir.join(HEAD_FILE);
        let head_file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&head_path)
            .map_err(|e| AuditError::io(&head_path, e))?;
        let syncer = Arc::new(Syncer {
            dirty: AtomicBool::new(false),
            file: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        syncer.follow(&segment);
        if let Fsync::Interval(every) = settings.fsync {
            let (syncer, healthy, stats) = (syncer.clone(), healthy.clone(), stats.clone());
            std::thread::Builder::new()
                .name("pdgate-audit-sync".into())
                .spawn(move || syncer.run(every, &healthy, &stats))
                .map_err(|e| AuditError::io(&dir, e))?;
        }
        let maintenance = Some(Maintenance::start(
            dir.clone(),
            settings.retention,
            segment.number,
        )?);
        let mut writer = Self {
            dir,
            settings,
            segment,
            head,
            head_file,
            healthy,
            stats,
            syncer,
            published,
            maintenance,
        };
        writer.write_head()?;
        Ok(writer)
    }

    pub(super) fn head(&self) -> ChainHead {
        self.head
    }

    /// Runs until every sender is gone, then syncs and returns.
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        let mut batch = Vec::with_capacity(self.settings.batch_max);
        let mut closing = false;
        while !closing {
            match rx.blocking_recv() {
                Some(Message::Record(first)) => batch.push(first),
                Some(Message::Close) | None => break,
            }
            while batch.len() < self.settings.batch_max {
                match rx.try_recv() {
                    Ok(Message::Record(p)) => batch.push(p),
                    Ok(Message::Close) => {
                        closing = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            let result = self.write_batch(&mut batch);
            match &result {
                Ok(_) => {
                    self.healthy.store(true, Ordering::Release);
                    self.stats
                        .written
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.healthy.store(false, Ordering::Release);
                    self.stats
                        .write_failures
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    tracing::error!(error = %e, records = batch.len(), "audit batch not written; its calls are denied");
                }
            }
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            for (i, pending) in batch.drain(..).enumerate() {
                if let Some(ack) = pending.ack {
                    let _ = ack.send(match &result {
                        Ok(first) => Ok(first + i as u64),
                        Err(e) => Err(e.clone()),
                    });
                }
            }
            // After the acknowledgements, which need only the segment: HEAD only helps
            // `verify` notice a cut, and a HEAD that lags is tolerated, so failing to update
            // it does not fail the batch.
            if result.is_ok()
                && let Err(e) = self.write_head()
            {
                tracing::warn!(error = %e, "audit HEAD not updated");
            }
        }
        // Later senders find the channel closed and are refused (their calls denied).
        rx.close();
        self.syncer.stop.store(true, Ordering::Release);
        if let Err(e) = self.sync() {
            tracing::error!(error = %e, "audit log not synced at shutdown");
        }
        if let Some(maintenance) = self.maintenance.take() {
            maintenance.stop();
        }
    }

    /// Appends `batch` as one write; returns the first sequence number. On failure the file is
    /// cut back to where it was and the chain does not advance. The records' bodies are moved
    /// out (no copy per record); only the acknowledgements are left to send.
    fn write_batch(&mut self, batch: &mut [Pending]) -> Result<u64, AuditError> {
        if self.segment.len >= self.settings.segment_max_bytes {
            self.rotate()?;
        }
        let mut buf = String::with_capacity(batch.len() * 512);
        let mut head = self.head;
        for pending in batch {
            let record = AuditRecord {
                seq: head.seq + 1,
                prev: hex::encode(head.hash),
                body: std::mem::take(&mut pending.body),
            };
            let (line, hash) =
                seal(&record, &head.hash).map_err(|e| AuditError::Encode(e.to_string()))?;
            buf.push_str(&line);
            head = ChainHead {
                seq: record.seq,
                hash,
            };
        }
        let start = self.segment.len;
        let stats = &self.stats;
        let file = &mut self.segment.file;
        let written = timed(&stats.write_seconds, || file.write_all(buf.as_bytes())).and_then(
            |()| match self.settings.fsync {
                Fsync::EveryBatch => timed(&stats.sync_seconds, || file.sync_data()),
                Fsync::Interval(_) => Ok(()),
            },
        );
        if let Err(e) = written {
            // Cut the batch back off: its calls are denied, so the log must not say they were
            // decided; and a partial line would break the chain.
            let cut = self.segment.file.set_len(start);
            if let Err(cut) = cut {
                tracing::error!(error = %cut, "audit segment cannot be cut back after a failed write");
            }
            return Err(AuditError::io(&self.segment.path, e));
        }
        self.segment.len += buf.len() as u64;
        if matches!(self.settings.fsync, Fsync::Interval(_)) {
            self.syncer.dirty.store(true, Ordering::Release);
        }
        let first = self.head.seq + 1;
        self.head = head;
        // Published after the write, so a subscriber that catches up from the files after
        // subscribing misses nothing; not built at all while nobody listens.
        if self.published.receiver_count() > 0 {
            let _ = self.published.send(Arc::new(Published {
                first_seq: first,
                lines: buf,
            }));
        }
        Ok(first)
    }

    /// Syncs the current segment (at rotation and shutdown).
    fn sync(&mut self) -> Result<(), AuditError> {
        self.syncer.dirty.store(false, Ordering::Release);
        let file = &self.segment.file;
        timed(&self.stats.sync_seconds, || file.sync_data())
            .map_err(|e| AuditError::io(&self.segment.path, e))
    }

    /// `HEAD` holds the last written sequence number and hash: `verify` uses it to notice a
    /// log cut short. Fixed width, rewritten in place.
    fn write_head(&mut self) -> Result<(), AuditError> {
        let text = format!("{:020} {}\n", self.head.seq, hex::encode(self.head.hash));
        // One positioned write (no seek first): fixed width, in place.
        self.head_file
            .write_all_at(text.as_bytes(), 0)
            .map_err(|e| AuditError::io(&self.dir.join(HEAD_FILE), e))
    }

    fn rotate(&mut self) -> Result<(), AuditError> {
        self.sync()?;
        self.segment = open_segment(&self.dir, self.segment.number + 1)?;
        self.syncer.follow(&self.segment);
        if let Some(m) = &self.maintenance {
            let _ = m.tx.send(Chore::Sealed(self.segment.number));
        }
        tracing::info!(segment = %self.segment.path.display(), "audit segment rotated");
        Ok(())
    }
}

fn open_segment(dir: &Path, number: u64) -> Result<Segment, AuditError> {
    let path = dir.join(segment_name(number));
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| AuditError::io(&path, e))?;
    let len = file.metadata().map_err(|e| AuditError::io(&path, e))?.len();
    Ok(Segment {
        path,
        file,
        len,
        number,
    })
}

/// The chain head at the end of `path`. A last line without its newline was never
/// acknowledged (the process died mid-write): it is cut off. Returns `None` for an empty file.
fn recover_tail(path: &Path) -> Result<Option<ChainHead>, AuditError> {
    let file = File::open(path).map_err(|e| AuditError::io(path, e))?;
    let meta = file.metadata().map_err(|e| AuditError::io(path, e))?;
    if !meta.is_file() {
        // A device or a pipe holds no records to recover; whether it takes writes, the first
        // batch will tell (and fail closed if not).
        tracing::warn!(segment = %path.display(), "audit segment is not a regular file");
        return Ok(None);
    }
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    let mut last: Option<ChainHead> = None;
    let mut complete_len = 0u64;
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| AuditError::io(path, e))?;
        if n == 0 {
            break;
        }
        if !line.ends_with('\n') {
            tracing::warn!(segment = %path.display(), bytes = n, "cutting an unfinished audit line left by a crash (never acknowledged)");
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| AuditError::io(path, e))?;
            file.set_len(complete_len)
                .map_err(|e| AuditError::io(path, e))?;
            break;
        }
        complete_len += n as u64;
        let record: AuditRecord = serde_json::from_str(&line).map_err(|e| {
            AuditError::Corrupt(format!("{}: unreadable record: {e}", path.display()))
        })?;
        let (_, hash) = split_line(&line).ok_or_else(|| {
            AuditError::Corrupt(format!(
                "{}: record {} has no hash",
                path.display(),
                record.seq
            ))
        })?;
        last = Some(ChainHead {
            seq: record.seq,
            hash,
        });
    }
    Ok(last)
}

/// The head at the end of the segment before the last (the last one is empty); `None` when no
/// segment holds a record.
fn previous_head(segments: &[(u64, PathBuf)]) -> Result<Option<ChainHead>, AuditError> {
    for (_, path) in segments.iter().rev().skip(1) {
        if let Some(head) = recover_tail(path)? {
            return Ok(Some(head));
        }
    }
    Ok(None)
}
