//! The server-streaming run of the load harness (issue #12's target): one client reads a
//! server stream of 1 KiB `ExportRecord` messages, call after call, for the run's duration,
//! directly, through the forward-only baseline, and through pdgate on two routes it reads:
//!
//! - `records`: the repository's policy, `ExportForInterconnect` with `records: customer_id`
//!   (each message is read for its subject; the two subjects of the stream are decided once
//!   each per call);
//! - `minimize`: a second pdgate whose policy copy routes `ExportForInterconnect` with
//!   `minimize: [customer.billing]`, a category the partner may not have, with the usage
//!   figure `data_mb_last_month` filed under it (`fields`): every streamed message is read
//!   and rewritten without it.
//!
//! The upstream's export is the harness's own ([`Upstream`]): the demo service answers every
//! other method, so direct, baseline and pdgate keep one upstream; its export streams
//! [`STREAM_MESSAGES`] ready-encoded messages per call (the upstream costs next to nothing).
//! A run checks what it received: every message through the `minimize` route must come
//! without the field (else the run failed: nothing was rewritten), every other with it.

use bytes::Bytes;
use pdgate::demo::customer::CustomerService;
use pdgate::proto::demo::customer_data_client::CustomerDataClient;
use pdgate::proto::demo::{ExportRecord, ExportRequest};
use prost::Message as _;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::body::Body;
use tonic::metadata::MetadataValue;

pub const EXPORT_PATH: &str = "/demo.customer.v1.CustomerData/ExportForInterconnect";
/// Encoded size of each streamed message (without its 5-byte gRPC prefix).
pub const MESSAGE_BYTES: usize = 1024;
/// Messages per streamed call.
pub const STREAM_MESSAGES: usize = 2000;
/// The usage figure each upstream message carries; cleared by the `minimize` route.
const USAGE_MB: i64 = 1234;
/// Messages/s through pdgate at least this share of the baseline's (issue #12).
pub const TARGET_STREAM_RATIO: f64 = 0.70;

/// The harness's upstream: the demo service, except for `ExportForInterconnect`, which
/// streams [`STREAM_MESSAGES`] messages of [`MESSAGE_BYTES`] about `cust-1` and `cust-2`.
#[derive(Clone)]
pub struct Upstream {
    demo: pdgate::proto::demo::customer_data_server::CustomerDataServer<CustomerService>,
    /// The two framed messages the export alternates (cust-1, cust-2).
    frames: [Bytes; 2],
}

impl Upstream {
    pub fn new() -> Self {
        Self {
            demo: CustomerService::new().into_server(),
            frames: [framed("cust-1"), framed("cust-2")],
        }
    }
}

/// One `ExportRecord` of exactly [`MESSAGE_BYTES`] bytes, with its gRPC prefix.
fn framed(customer: &str) -> Bytes {
    let mut record = ExportRecord {
        customer_id: customer.to_owned(),
        name: String::new(),
        address: "1-1 Otemachi, Chiyoda-ku, Tokyo".to_owned(),
        phone: "03-0000-0000".to_owned(),
        data_mb_last_month: USAGE_MB,
    };
    // The name pads the message: its length prefix takes two bytes from 128 on.
    let rest = MESSAGE_BYTES - record.encoded_len() - 3;
    record.name = "n".repeat(rest);
    let encoded = record.encode_to_vec();
    assert_eq!(encoded.len(), MESSAGE_BYTES, "export message size");
    let mut frame = Vec::with_capacity(5 + encoded.len());
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(encoded.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&encoded);
    Bytes::from(frame)
}

impl tower::Service<http::Request<Body>> for Upstream {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() == EXPORT_PATH {
            let body = Exported {
                frames: self.frames.clone(),
                sent: 0,
                done: false,
            };
            let response = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(Body::new(body))
                .expect("static response");
            return Box::pin(async move { Ok(response) });
        }
        let mut demo = self.demo.clone();
        Box::pin(async move { tower::Service::call(&mut demo, request).await })
    }
}

/// The export's response body: the messages, then `grpc-status: 0`.
struct Exported {
    frames: [Bytes; 2],
    sent: usize,
    done: bool,
}

impl http_body::Body for Exported {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        if self.sent < STREAM_MESSAGES {
            let frame = self.frames[self.sent % 2].clone();
            self.sent += 1;
            return Poll::Ready(Some(Ok(http_body::Frame::data(frame))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Serves [`Upstream`] on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(Upstream::new(), incoming, shutdown)
        .await
}

/// `policy` (a copy of the repository's) with `ExportForInterconnect` routed to minimize:
/// the route's lines are replaced, the rest is left as it is.
pub fn minimize_export(policy: &Path) -> Result<(), String> {
    let routes = policy.join("routes.yaml");
    let text =
        std::fs::read_to_string(&routes).map_err(|e| format!("`{}`: {e}", routes.display()))?;
    let head = format!("  {EXPORT_PATH}:");
    let mut out = String::new();
    let mut skipping = false;
    let mut found = false;
    for line in text.lines() {
        if line == head {
            found = true;
            skipping = true;
            out.push_str(&head);
            out.push_str(
                "\n    action: read\
                 \n    categories: [customer.name, customer.contact.address, customer.contact.phone]\
                 \n    minimize: [customer.billing]\
                 \n    subjects: metadata\
                 \n    fields: {name: customer.name, address: customer.contact.address, \
                 phone: customer.contact.phone, data_mb_last_month: customer.billing}\n",
            );
            continue;
        }
        if skipping && line.starts_with("    ") {
            continue;
        }
        skipping = false;
        out.push_str(line);
        out.push('\n');
    }
    if !found {
        return Err(format!(
            "no `{EXPORT_PATH}` route in `{}`",
            routes.display()
        ));
    }
    std::fs::write(&routes, out).map_err(|e| format!("`{}`: {e}", routes.display()))?;
    // The demo protos file the usage figure under `customer.usage_history`, which the partner
    // may have; the copy's descriptors leave it unannotated, so `fields` files it under
    // `customer.billing` without disagreeing with an annotation.
    let proto = policy.join("descriptors/customer.proto");
    let text =
        std::fs::read_to_string(&proto).map_err(|e| format!("`{}`: {e}", proto.display()))?;
    let annotated =
        "int64 data_mb_last_month = 5 [(pdgate.v1.category) = \"customer.usage_history\"];";
    if !text.contains(annotated) {
        return Err(format!("`{}` no longer has `{annotated}`", proto.display()));
    }
    std::fs::write(
        &proto,
        text.replace(annotated, "int64 data_mb_last_month = 5;"),
    )
    .map_err(|e| format!("`{}`: {e}", proto.display()))
}

/// What a streaming run measured.
pub struct StreamRow {
    pub label: &'static str,
    pub messages: u64,
    pub calls: u64,
    pub messages_per_s: f64,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Whether each message must come with the usage figure or without it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Whole,
    Minimized,
}

/// One client reads exports from `addr` back to back: a warm-up, then `duration` measured;
/// counts the messages that arrive in the measured window.
pub async fn run(
    label: &'static str,
    addr: SocketAddr,
    expect: Expect,
    warmup: Duration,
    duration: Duration,
) -> Result<StreamRow, String> {
    let channel = super::endpoint(addr)
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let mut client = CustomerDataClient::new(channel).max_decoding_message_size(64 * 1024);
    let measure_from = Instant::now() + warmup;
    let until = measure_from + duration;
    let mut row = StreamRow {
        label,
        messages: 0,
        calls: 0,
        messages_per_s: 0.0,
        errors: 0,
        first_error: None,
    };
    'calls: while Instant::now() < until {
        let response = tokio::time::timeout(
            super::CALL_TIMEOUT,
            client.export_for_interconnect(export_request()),
        )
        .await;
        let mut stream = match response {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => {
                fail(&mut row, format!("{:?}: {}", s.code(), s.message()));
                continue;
            }
            Err(_) => {
                fail(&mut row, "no answer in time".to_owned());
                continue;
            }
        };
        let mut received = 0;
        loop {
            let next = tokio::time::timeout(super::CALL_TIMEOUT, stream.message()).await;
            let now = Instant::now();
            match next {
                Ok(Ok(Some(message))) => {
                    received += 1;
                    let whole = message.data_mb_last_month == USAGE_MB;
                    if whole != (expect == Expect::Whole) {
                        fail(
                            &mut row,
                            format!(
                                "message {received}: data_mb_last_month {} (expected {})",
                                message.data_mb_last_month,
                                if expect == Expect::Whole {
                                    "kept"
                                } else {
                                    "cleared"
                                }
                            ),
                        );
                        break 'calls;
                    }
                    if now >= until {
                        break 'calls;
                    }
                    if now >= measure_from {
                        row.messages += 1;
                    }
                }
                Ok(Ok(None)) => break,
                Ok(Err(s)) => {
                    fail(&mut row, format!("{:?}: {}", s.code(), s.message()));
                    break;
                }
                Err(_) => {
                    fail(&mut row, "no message in time".to_owned());
                    break;
                }
            }
        }
        if received != STREAM_MESSAGES && row.errors == 0 {
            fail(
                &mut row,
                format!("{received} of {STREAM_MESSAGES} messages arrived"),
            );
        }
        row.calls += 1;
    }
    row.messages_per_s = row.messages as f64 / duration.as_secs_f64();
    Ok(row)
}

/// The export of the streaming run: a partner (`ntt-east`, §3) exporting `cust-1`, whom the
/// `minimize` route decides for; the `records` route decides each message's subject.
fn export_request() -> tonic::Request<ExportRequest> {
    let mut request = tonic::Request::new(ExportRequest {
        recipient: "ntt-east".to_owned(),
        delay_ms: 0,
    });
    let md = request.metadata_mut();
    md.insert("x-caller", MetadataValue::from_static("ntt-east"));
    md.insert(
        "x-purpose",
        MetadataValue::from_static("third_party.interconnect"),
    );
    md.insert("x-data-subject", MetadataValue::from_static("cust-1"));
    request
}

pub fn print_header() {
    println!(
        "\nserver stream of {STREAM_MESSAGES} × {MESSAGE_BYTES}-byte messages per call, one client:"
    );
    println!(
        "{:<28} {:>7} {:>10} {:>12} {:>9} {:>7}",
        "target", "calls", "messages", "messages/s", "MiB/s", "errors"
    );
}

pub fn print_row(row: &StreamRow) {
    println!(
        "{:<28} {:>7} {:>10} {:>12.0} {:>9.1} {:>7}",
        row.label,
        row.calls,
        row.messages,
        row.messages_per_s,
        row.messages_per_s * MESSAGE_BYTES as f64 / (1024.0 * 1024.0),
        row.errors
    );
}

/// Issue #12's target from the streaming rows: pdgate's messages/s on each route it reads
/// against the baseline's.
pub fn print_target(rows: &[StreamRow], baseline: &str) {
    let Some(b) = rows
        .iter()
        .find(|r| r.label == baseline && r.errors == 0 && r.messages_per_s > 0.0)
    else {
        println!("  #12. server stream: not measured (the baseline's run failed)");
        return;
    };
    for row in rows.iter().filter(|r| r.label.starts_with("(s) pdgate")) {
        if row.errors > 0 {
            println!("  #12. {}: not measured (its calls failed)", row.label);
            continue;
        }
        let ratio = row.messages_per_s / b.messages_per_s;
        println!(
            "  #12. {}: {:.1}% of the baseline's messages/s (≥ {:.0}%): {}",
            row.label,
            ratio * 100.0,
            TARGET_STREAM_RATIO * 100.0,
            if ratio >= TARGET_STREAM_RATIO {
                "met"
            } else {
                "MISSED"
            }
        );
    }
}

fn fail(row: &mut StreamRow, error: String) {
    row.errors += 1;
    row.first_error.get_or_insert(error);
}
