//! `pdgate.v1.AuditLog`: the audit trail over gRPC, for the `auditor` role — `Query`, `Tail`
//! and `Verify`. Every call is itself audited (kind `admin`, the filters in `detail`) before it
//! reads anything; a call without the role is refused and that refusal is audited too.
//!
//! Reading the files is blocking work: it runs on tokio's blocking pool, never on the async
//! workers.
//!
//! `Tail` subscribes to the writer ([`crate::audit::AuditLog::subscribe`]) rather than polling
//! the segment files as `pdgate audit tail` does: a record reaches the tail as soon as it is
//! written, an idle tail costs nothing, and nothing is read twice. The files are still the
//! source of truth: the backlog (`from_seq`, `last`) is read from them after subscribing, and
//! a tail that falls behind the writer's backlog catches up from them, so it never skips a
//! record. A tail ends when its client goes away, when the server shuts down, and when the
//! writer stops.

use crate::api::admin::{self, ADMIN_ROLE_REQUIRED};
use crate::audit::read::{self, Access, Filter, Verification};
use crate::audit::{AuditError, AuditRecord, Published, RecordKind};
use crate::gate::Gate;
use crate::identity::AdminRole;
use crate::proto::v1::audit_log_server::{AuditLog, AuditLogServer};
use crate::proto::v1::{
    AuditQuery, AuditQueryResponse, AuditRecord as RecordMessage, AuditTailRequest,
    AuditVerifyRequest, AuditVerifyResponse,
};
use crate::transport::rescue::ApiError;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Records a `Query` returns when it names no limit.
pub const DEFAULT_LIMIT: u32 = 1000;
/// The most records one `Query` returns, and the most `last` of a `Tail`.
pub const MAX_LIMIT: u32 = 10_000;

const QUERY: &str = "/pdgate.v1.AuditLog/Query";
const TAIL: &str = "/pdgate.v1.AuditLog/Tail";
const VERIFY: &str = "/pdgate.v1.AuditLog/Verify";

/// Records a tail may have on its way to a slow client before the tail waits for it.
const TAIL_BUFFER: usize = 256;

pub struct AuditLogService {
    gate: Arc<Gate>,
    /// Turns true when the server shuts down: open tails end then.
    stop: watch::Receiver<bool>,
}

impl AuditLogService {
    pub fn new(gate: Arc<Gate>, stop: watch::Receiver<bool>) -> Self {
        Self { gate, stop }
    }

    pub fn into_server(self) -> AuditLogServer<Self> {
        AuditLogServer::new(self)
    }
}

fn invalid(field: &'static str, message: String) -> ApiError {
    ApiError::InvalidField { field, message }
}

fn none_if_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// The filter a query asks for, checked: every problem names its field and what is allowed.
pub fn filter_of(q: &AuditQuery) -> Result<Filter, ApiError> {
    let decision = match q.decision.trim() {
        "" => None,
        d @ ("allow" | "deny") => Some(d.to_owned()),
        other => {
            return Err(invalid(
                "decision",
                format!("`{other}` is not a decision; allowed: `allow`, `deny`"),
            ));
        }
    };
    let kind = match q.kind.trim() {
        "" => None,
        "access" => Some(RecordKind::Access),
        "check" => Some(RecordKind::Check),
        "admin" => Some(RecordKind::Admin),
        other => {
            return Err(invalid(
                "kind",
                format!("`{other}` is not a record kind; allowed: `access`, `check`, `admin`"),
            ));
        }
    };
    let reason = none_if_empty(&q.reason);
    if let Some(code) = &reason
        && !is_reason_code(code)
    {
        return Err(invalid(
            "reason",
            format!(
                "`{code}` is not a reason code; allowed: a decision's reason code (e.g. `CONSENT_REQUIRED`, `NO_GRANT`) or `{ADMIN_ROLE_REQUIRED}`"
            ),
        ));
    }
    if q.since_us != 0 && q.until_us != 0 && q.since_us > q.until_us {
        return Err(invalid(
            "since_us",
            format!(
                "`{}` is after `until_us` `{}`; since must not be later than until",
                q.since_us, q.until_us
            ),
        ));
    }
    Ok(Filter {
        subject: none_if_empty(&q.subject),
        caller: none_if_empty(&q.caller),
        purpose: none_if_empty(&q.purpose),
        category: none_if_empty(&q.category),
        decision,
        reason,
        since_us: (q.since_us != 0).then_some(q.since_us),
        until_us: (q.until_us != 0).then_some(q.until_us),
        trace_id: none_if_empty(&q.trace_id),
        decision_id: none_if_empty(&q.decision_id),
        kind,
    })
}

/// A reason code a record can hold: a decision's, or an admin refusal's.
pub fn is_reason_code(code: &str) -> bool {
    code == ADMIN_ROLE_REQUIRED || crate::decision::ReasonCode::parse(code).is_some()
}

/// The query message for `filter` (what `pdgate audit query --admin` sends).
pub fn query_of(filter: &Filter, limit: u32) -> AuditQuery {
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    AuditQuery {
        subject: s(&filter.subject),
        caller: s(&filter.caller),
        purpose: s(&filter.purpose),
        category: s(&filter.category),
        decision: s(&filter.decision),
        reason: s(&filter.reason),
        trace_id: s(&filter.trace_id),
        decision_id: s(&filter.decision_id),
        since_us: filter.since_us.unwrap_or(0),
        until_us: filter.until_us.unwrap_or(0),
        kind: filter
            .kind
            .map_or_else(String::new, |k| kind_name(k).to_owned()),
        limit,
    }
}

pub fn kind_name(kind: RecordKind) -> &'static str {
    match kind {
        RecordKind::Access => "access",
        RecordKind::Check => "check",
        RecordKind::Admin => "admin",
    }
}

/// The filters in words, for the `detail` of the call's own audit record.
fn describe(filter: &Filter) -> String {
    let mut parts = Vec::new();
    let mut add = |name: &str, v: &Option<String>| {
        if let Some(v) = v {
            parts.push(format!("{name}={v}"));
        }
    };
    add("subject", &filter.subject);
    add("caller", &filter.caller);
    add("purpose", &filter.purpose);
    add("category", &filter.category);
    add("decision", &filter.decision);
    add("reason", &filter.reason);
    add("trace_id", &filter.trace_id);
    add("decision_id", &filter.decision_id);
    if let Some(k) = filter.kind {
        parts.push(format!("kind={}", kind_name(k)));
    }
    if let Some(t) = filter.since_us {
        parts.push(format!("since_us={t}"));
    }
    if let Some(t) = filter.until_us {
        parts.push(format!("until_us={t}"));
    }
    if parts.is_empty() {
        "no filter".to_owned()
    } else {
        parts.join(" ")
    }
}

fn message_of(seq: u64, line: &[u8]) -> RecordMessage {
    RecordMessage {
        seq,
        json: String::from_utf8_lossy(line)
            .trim_end_matches('\n')
            .to_owned(),
    }
}

/// The verify report as the API answers it.
pub fn verify_response(v: &Verification) -> AuditVerifyResponse {
    let bad = v.first_break.as_ref();
    AuditVerifyResponse {
        ok: v.ok(),
        records: v.records,
        first_bad_seq: bad.map_or(0, |b| b.seq),
        problem: bad.map_or_else(String::new, |b| b.what.clone()),
        first_seq: v.first_seq,
        anchor_seq: v.anchor.map_or(0, |a| a.seq),
        anchor_hash: v.anchor.map_or_else(String::new, |a| hex::encode(a.hash)),
        last_hash: v.last_hash.clone(),
        segments: u32::try_from(v.segments).unwrap_or(u32::MAX),
        bad_segment: bad.and_then(|b| b.segment.clone()).unwrap_or_default(),
        bad_line: bad
            .and_then(|b| b.line)
            .map_or(0, |l| u32::try_from(l).unwrap_or(u32::MAX)),
    }
}

#[tonic::async_trait]
impl AuditLog for AuditLogService {
    async fn query(
        &self,
        request: Request<AuditQuery>,
    ) -> Result<Response<AuditQueryResponse>, Status> {
        let admin = admin::authorize(&self.gate, &request, QUERY, AdminRole::Auditor).await?;
        let q = request.into_inner();
        let filter = filter_of(&q)?;
        let limit = match q.limit {
            0 => DEFAULT_LIMIT,
            n if n > MAX_LIMIT => {
                return Err(invalid(
                    "limit",
                    format!("`{n}` is too many; allowed: 1 to {MAX_LIMIT} (0 = {DEFAULT_LIMIT})"),
                )
                .into());
            }
            n => n,
        } as usize;
        let detail = format!("Query {} limit={limit}", describe(&filter));
        admin
            .record(&self.gate, |b| b.detail = Some(detail))
            .await?;
        let dir = self.gate.audit().dir().to_owned();
        let found = tokio::task::spawn_blocking(move || {
            let mut records = Vec::new();
            let mut truncated = false;
            read::scan_lines(&dir, &filter, Access::Indexed, 0, |r, line| {
                if records.len() == limit {
                    truncated = true;
                    return false;
                }
                records.push(message_of(r.seq, line));
                true
            })
            .map(|()| AuditQueryResponse { records, truncated })
        })
        .await
        .map_err(|source| ApiError::Interrupted {
            what: "the query",
            source,
        })?;
        Ok(Response::new(found.map_err(ApiError::AuditRead)?))
    }

    type TailStream = ReceiverStream<Result<RecordMessage, Status>>;

    async fn tail(
        &self,
        request: Request<AuditTailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let admin = admin::authorize(&self.gate, &request, TAIL, AdminRole::Auditor).await?;
        let t = request.into_inner();
        let filter = filter_of(&t.filter.unwrap_or_default())?;
        if t.last > MAX_LIMIT {
            return Err(invalid(
                "last",
                format!("`{}` is too many; allowed: 0 to {MAX_LIMIT}", t.last),
            )
            .into());
        }
        let detail = format!(
            "Tail {} from_seq={} last={} follow={}",
            describe(&filter),
            t.from_seq,
            t.last,
            !t.no_follow
        );
        admin
            .record(&self.gate, |b| b.detail = Some(detail))
            .await?;
        // Subscribed before the files are read: a batch written in between is both in the
        // files and in the subscription, and the sequence numbers drop the second copy.
        let live = self.gate.audit().subscribe();
        let (tx, rx) = mpsc::channel(TAIL_BUFFER);
        let tail = Tail {
            dir: self.gate.audit().dir().to_owned(),
            filter,
            tx,
            stop: self.stop.clone(),
        };
        tokio::spawn(tail.run(live, t.from_seq, t.last as usize, !t.no_follow));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn verify(
        &self,
        request: Request<AuditVerifyRequest>,
    ) -> Result<Response<AuditVerifyResponse>, Status> {
        let admin = admin::authorize(&self.gate, &request, VERIFY, AdminRole::Auditor).await?;
        admin
            .record(&self.gate, |b| b.detail = Some("Verify".into()))
            .await?;
        let dir = self.gate.audit().dir().to_owned();
        let v = tokio::task::spawn_blocking(move || read::verify(&dir))
            .await
            .map_err(|source| ApiError::Interrupted {
                what: "verify",
                source,
            })?
            .map_err(ApiError::AuditRead)?;
        Ok(Response::new(verify_response(&v)))
    }
}

/// One open `Tail`. The task that runs it ends, dropping `tx` and so ending the stream, when
/// the client goes away (`tx` closed), at shutdown (`stop`), or when the writer stops.
struct Tail {
    dir: PathBuf,
    filter: Filter,
    tx: mpsc::Sender<Result<RecordMessage, Status>>,
    stop: watch::Receiver<bool>,
}

impl Tail {
    async fn run(
        mut self,
        mut live: broadcast::Receiver<Arc<Published>>,
        from_seq: u64,
        last: usize,
        follow: bool,
    ) {
        // The highest sequence number handled (sent or filtered out).
        let mut done = 0;
        if from_seq > 0 {
            match self.catch_up(from_seq).await {
                Some(seq) => done = seq,
                None => return,
            }
        } else if last > 0 {
            match self.last(last).await {
                Some(seq) => done = seq,
                None => return,
            }
        }
        if !follow {
            return;
        }
        loop {
            let batch = tokio::select! {
                () = self.tx.closed() => return,
                _ = self.stop.wait_for(|stop| *stop) => return,
                batch = live.recv() => batch,
            };
            match batch {
                Ok(batch) => {
                    for (seq, line) in batch.records() {
                        if seq <= done {
                            continue;
                        }
                        done = seq;
                        let Ok(record) = serde_json::from_str::<AuditRecord>(line) else {
                            continue;
                        };
                        if self.filter.matches(&record)
                            && !self.send(message_of(seq, line.as_bytes())).await
                        {
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "audit tail fell behind; catching up from the files");
                    match self.catch_up(done).await {
                        Some(seq) => done = done.max(seq),
                        None => return,
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Sends one record; `false` when the tail is to end.
    async fn send(&mut self, message: RecordMessage) -> bool {
        tokio::select! {
            sent = self.tx.send(Ok(message)) => sent.is_ok(),
            _ = self.stop.wait_for(|stop| *stop) => false,
        }
    }

    /// Sends the matching records after `after` from the files, on the blocking pool; returns
    /// the last sequence number read, or `None` when the tail is to end.
    async fn catch_up(&self, after: u64) -> Option<u64> {
        let (dir, filter, tx, stop) = (
            self.dir.clone(),
            self.filter.clone(),
            self.tx.clone(),
            self.stop.clone(),
        );
        let read = tokio::task::spawn_blocking(move || {
            let mut done = after;
            let mut open = true;
            let result =
                read::scan_lines(&dir, &Filter::default(), Access::Scan, after, |r, line| {
                    done = r.seq;
                    if *stop.borrow() {
                        open = false;
                    } else if filter.matches(&r) {
                        open = tx.blocking_send(Ok(message_of(r.seq, line))).is_ok();
                    }
                    open
                });
            (result, done, open)
        })
        .await;
        self.finish(read)
    }

    /// Sends the last `n` matching records already written.
    async fn last(&self, n: usize) -> Option<u64> {
        let (dir, filter, tx) = (self.dir.clone(), self.filter.clone(), self.tx.clone());
        let read = tokio::task::spawn_blocking(move || {
            let mut done = 0;
            let mut kept = std::collections::VecDeque::with_capacity(n);
            let result = read::scan_lines(&dir, &Filter::default(), Access::Scan, 0, |r, line| {
                done = r.seq;
                if filter.matches(&r) {
                    if kept.len() == n {
                        kept.pop_front();
                    }
                    kept.push_back(message_of(r.seq, line));
                }
                true
            });
            let mut open = true;
            for m in kept {
                if tx.blocking_send(Ok(m)).is_err() {
                    open = false;
                    break;
                }
            }
            (result, done, open)
        })
        .await;
        self.finish(read)
    }

    fn finish(
        &self,
        read: Result<(Result<(), AuditError>, u64, bool), tokio::task::JoinError>,
    ) -> Option<u64> {
        match read {
            Ok((Ok(()), done, true)) => Some(done),
            Ok((Ok(()), _, false)) => None,
            Ok((Err(e), _, _)) => {
                let _ = self.tx.try_send(Err(ApiError::AuditRead(e).into()));
                None
            }
            Err(e) => {
                let _ = self.tx.try_send(Err(ApiError::Interrupted {
                    what: "the tail",
                    source: e,
                }
                .into()));
                None
            }
        }
    }
}
