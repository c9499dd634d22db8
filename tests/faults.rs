//! Faults of the peers pdgate depends on (#14 adversarial suite), over real sockets: an upstream
//! that resets a call in the middle of its answer, or drops its connection there. The caller
//! gets an error status — never a hang, never a half answer passed off as whole — the call is
//! counted, and the sidecar serves the next call.
//!
//! The other faults of the suite are tested where their feature is: a silent upstream in
//! `tests/limits.rs` (`calls_without_a_deadline_do_not_hold_slots_on_a_silent_upstream`), a
//! full audit device (`/dev/full` as the segment) in `tests/audit.rs`
//! (`a_full_disk_denies_calls_instead_of_losing_records`) and `tests/gate.rs`
//! (`a_denial_that_cannot_be_recorded_is_audit_unavailable_without_an_id`).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::raw::{billing, frame};
use common::{Harness, Options, call, scrape};
use pdgate::proto::demo::{BillingStatement, ExportRecord, ExportRequest};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tonic::Code;

/// How an upstream breaks off its answer.
#[derive(Clone, Copy, Debug)]
enum Break {
    /// `RST_STREAM` (INTERNAL_ERROR) on the call's stream; the connection stays.
    Reset,
    /// The TCP connection is closed under the call.
    Drop,
}

/// An HTTP/2 upstream (h2, below any gRPC library) that answers each call with response
/// headers and `messages`, then breaks off the way `how` says, before any status; and how
/// many calls it took.
async fn breaking_upstream(
    messages: Vec<bytes::Bytes>,
    how: Break,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            let messages = messages.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                // Each call's answer goes out from a task of its own while this one drives the
                // connection (h2 sends nothing unless the connection is polled).
                let (dropped_tx, mut dropped) = tokio::sync::mpsc::channel::<()>(1);
                loop {
                    let accepted = tokio::select! {
                        accepted = conn.accept() => accepted,
                        _ = dropped.recv() => return,
                    };
                    let Some(Ok((_request, mut respond))) = accepted else {
                        return;
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                    let messages = messages.clone();
                    let dropped_tx = dropped_tx.clone();
                    tokio::spawn(async move {
                        let response = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let mut send = respond.send_response(response, false).unwrap();
                        for m in &messages {
                            send.send_data(m.clone(), false).unwrap();
                        }
                        // Mid-answer: what was sent has reached pdgate (and the caller) first.
                        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        match how {
                            Break::Reset => send.send_reset(h2::Reason::INTERNAL_ERROR),
                            // The connection task returns: the socket is closed under the call.
                            Break::Drop => drop(dropped_tx.send(()).await),
                        }
                    });
                }
            });
        }
    });
    (addr, calls)
}

/// The value of `pdgate_upstream_responses_total{code="…"}` on `/metrics`.
async fn upstream_responses(h: &Harness, code: &str) -> f64 {
    let text = scrape(h).await;
    let line = format!("pdgate_upstream_responses_total{{code=\"{code}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The status a caller gets when the upstream breaks off its answer: `INTERNAL` from pdgate,
/// saying what happened, in the trailers — not a reset of the caller's stream, which its client
/// reads as `CANCELLED` or an h2 protocol error.
fn broke_off(status: &tonic::Status, how: Break) {
    assert_eq!(status.code(), Code::Internal, "{how:?}: {status:?}");
    assert!(
        status
            .message()
            .contains("the service's response broke off"),
        "{how:?}: {status:?}"
    );
}

async fn harness(upstream: SocketAddr) -> Harness {
    Harness::with(Options {
        upstream: Some(upstream),
        ..Options::default()
    })
    .await
}

/// A unary call whose upstream resets it (or drops its connection) after the response
/// headers: the caller gets an error status at once, the call is counted as an upstream
/// failure, and pdgate serves the next call (here, a denial it answers itself).
#[tokio::test]
async fn an_upstream_that_breaks_off_a_unary_answer_is_an_error_not_a_hang() {
    for how in [Break::Reset, Break::Drop] {
        // Half of a message: a length prefix that promises more than is sent.
        let mut half = frame(&BillingStatement {
            customer_id: "cust-1".into(),
            ..BillingStatement::default()
        })
        .to_vec();
        half.truncate(half.len() - 2);
        let (upstream, calls) = breaking_upstream(vec![half.into()], how).await;
        let h = harness(upstream).await;
        let before = upstream_responses(&h, "UNKNOWN").await;
        let status = tokio::time::timeout(
            common::wait::LIMIT,
            h.client().await.get_billing_statement(call(
                billing("cust-1"),
                "billing-service",
                "service.billing",
                &["cust-1"],
            )),
        )
        .await
        .unwrap_or_else(|_| panic!("{how:?}: the call hangs"))
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "{how:?}");
        broke_off(&status, how);
        // Counted once, as what it is: the upstream failed the call (no status: `UNKNOWN`).
        common::wait::eventually("the broken call is counted", || async {
            upstream_responses(&h, "UNKNOWN").await == before + 1.0
        })
        .await;
        // The sidecar goes on: a must-deny call is denied by pdgate itself.
        let denied = h
            .client()
            .await
            .get_call_history(call(
                pdgate::proto::demo::GetCallHistoryRequest {
                    customer_id: "cust-1".into(),
                },
                "marketing-service",
                "marketing",
                &["cust-1"],
            ))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{how:?}: {denied:?}");
    }
}

/// A server stream whose upstream sends one record and then resets the stream (or drops the
/// connection): the caller gets the record the policy allows, then an error status — not the
/// end of a complete stream, and not a hang.
#[tokio::test]
async fn an_upstream_that_breaks_off_a_stream_ends_it_with_an_error() {
    for how in [Break::Reset, Break::Drop] {
        let record = frame(&ExportRecord {
            customer_id: "cust-1".into(),
            name: "Customer One".into(),
            ..ExportRecord::default()
        });
        let (upstream, calls) = breaking_upstream(vec![record], how).await;
        let h = harness(upstream).await;
        let before = upstream_responses(&h, "UNKNOWN").await;
        let mut stream = h
            .client()
            .await
            .export_for_interconnect(call(
                ExportRequest {
                    recipient: "ntt-east".into(),
                    delay_ms: 0,
                },
                "ntt-east",
                "third_party.interconnect",
                &["cust-1"],
            ))
            .await
            .unwrap_or_else(|s| panic!("{how:?}: {s:?}"))
            .into_inner();
        let read_all = async {
            let mut ids = Vec::new();
            loop {
                match stream.message().await {
                    Ok(Some(r)) => ids.push(r.customer_id),
                    Ok(None) => return (ids, None),
                    Err(status) => return (ids, Some(status)),
                }
            }
        };
        let (ids, end) = tokio::time::timeout(common::wait::LIMIT, read_all)
            .await
            .unwrap_or_else(|_| panic!("{how:?}: the stream hangs"));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "{how:?}");
        assert_eq!(ids, ["cust-1"], "{how:?}: the record before the break");
        let status = end
            .unwrap_or_else(|| panic!("{how:?}: a broken-off stream ended as if it were complete"));
        broke_off(&status, how);
        common::wait::eventually("the broken stream is counted", || async {
            upstream_responses(&h, "UNKNOWN").await == before + 1.0
        })
        .await;
    }
}
