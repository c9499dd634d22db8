//! docs/quickstart.md, followed as a reader would: its shell steps (the block after
//! `<!-- quickstart:steps -->`) run as written in a directory holding the repository's
//! `policy/` and `examples/quickstart/`, building the loyalty-points policy bundle with the
//! real `pdgate` on PATH; then `pdgate serve` (the binary) runs that bundle in front of a real
//! tonic server of `examples/quickstart/proto/loyalty/v1/loyalty.proto`, and calls through it
//! declare their purpose with `pdgate::client`: an allow, a deny with its reason code that
//! never reaches the service, and a balance whose e-mail address is cleared.
//! (tests/docs.rs keeps the files the page shows equal to those in examples/quickstart/.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step fails the test"
)]

mod common;

use common::bin;
use pdgate::client::{Declaration, Denial};
use pdgate::decision::ReasonCode;
use prost_reflect::{DescriptorPool, DynamicMessage};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tonic::body::Body;
use tonic::transport::Channel;
use tonic_prost::ProstCodec;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The loyalty-points messages, as `tonic-prost-build` would generate them from
/// loyalty.proto (written out here: the test crate has no build script of its own;
/// [`messages_match_the_proto`] checks them against the proto's descriptors).
mod loyalty {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetBalanceRequest {
        #[prost(string, tag = "1")]
        pub customer_id: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Balance {
        #[prost(string, tag = "1")]
        pub customer_id: String,
        #[prost(int64, tag = "2")]
        pub points: i64,
        #[prost(string, tag = "3")]
        pub name: String,
        #[prost(string, tag = "4")]
        pub email: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AddPointsRequest {
        #[prost(string, tag = "1")]
        pub customer_id: String,
        #[prost(int64, tag = "2")]
        pub points: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AddPointsResponse {
        #[prost(int64, tag = "1")]
        pub points: i64,
    }
}

const GET_BALANCE: &str = "/loyalty.v1.LoyaltyPoints/GetBalance";
const ADD_POINTS: &str = "/loyalty.v1.LoyaltyPoints/AddPoints";

/// The shell block of docs/quickstart.md that builds and checks the bundle.
fn steps() -> String {
    let page = std::fs::read_to_string(repo().join("docs/quickstart.md")).unwrap();
    let after = page
        .split("<!-- quickstart:steps -->")
        .nth(1)
        .expect("docs/quickstart.md marks its steps with <!-- quickstart:steps -->");
    let block = after
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a ```sh block follows the marker");
    block.to_owned()
}

/// Runs the page's steps as a reader would, from a fresh checkout's files; the bundle dir.
fn build_bundle(work: &Path) -> PathBuf {
    common::copy_dir(&repo().join("policy"), &work.join("policy"));
    common::copy_dir(
        &repo().join("examples/quickstart"),
        &work.join("examples/quickstart"),
    );
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_pdgate")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = format!("set -euo pipefail\n{}", steps());
    // The one runner: no PDGATE_* of the machine, a time limit, a panic of any `pdgate` the
    // steps run fails the test.
    let out = bin::Pdgate::program("bash", ["-c", script.as_str()])
        .current_dir(work)
        .env("PATH", path)
        .output();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the quickstart's steps failed ({}):\n{script}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The steps end with validate and test: both said so.
    assert!(stdout.contains("loyalty-policy: valid"), "{stdout}");
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    work.join("loyalty-policy")
}

/// The loyalty-points service: a tonic server answering both methods, counting the calls
/// that reach it.
async fn loyalty_server(
    calls: Arc<AtomicUsize>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use loyalty::*;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = tower::service_fn(move |request: http::Request<Body>| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let response = match request.uri().path() {
                GET_BALANCE => {
                    let method =
                        tower::service_fn(|r: tonic::Request<GetBalanceRequest>| async move {
                            let customer_id = r.into_inner().customer_id;
                            Ok::<_, tonic::Status>(tonic::Response::new(Balance {
                                customer_id,
                                points: 1200,
                                name: "山田 太郎".into(),
                                email: "taro@example.jp".into(),
                            }))
                        });
                    tonic::server::Grpc::new(ProstCodec::<Balance, GetBalanceRequest>::default())
                        .unary(method, request)
                        .await
                }
                ADD_POINTS => {
                    let method =
                        tower::service_fn(|r: tonic::Request<AddPointsRequest>| async move {
                            Ok::<_, tonic::Status>(tonic::Response::new(AddPointsResponse {
                                points: 1200 + r.into_inner().points,
                            }))
                        });
                    tonic::server::Grpc::new(
                        ProstCodec::<AddPointsResponse, AddPointsRequest>::default(),
                    )
                    .unary(method, request)
                    .await
                }
                _ => tonic::Status::unimplemented("no such method").into_http(),
            };
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .serve_with_incoming(service, incoming)
            .await
            .unwrap();
    });
    (addr, task)
}

async fn unary<Req, Res>(
    channel: &Channel,
    path: &'static str,
    request: tonic::Request<Req>,
) -> Result<tonic::Response<Res>, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Res: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(path),
        ProstCodec::<Req, Res>::default(),
    )
    .await
}

fn balance_request(
    caller: &str,
    purpose: &str,
    customer: &str,
) -> tonic::Request<loyalty::GetBalanceRequest> {
    Declaration::purpose(purpose)
        .insecure_caller(caller)
        .apply(tonic::Request::new(loyalty::GetBalanceRequest {
            customer_id: customer.into(),
        }))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_protects_a_loyalty_points_service() {
    let work = tempfile::tempdir().unwrap();
    let bundle = build_bundle(work.path());

    let calls = Arc::new(AtomicUsize::new(0));
    let (upstream, server) = loyalty_server(calls.clone()).await;
    let state = tempfile::tempdir().unwrap();
    let mut pdgate = bin::serve(
        &bundle,
        state.path(),
        &[
            "--upstream",
            &upstream.to_string(),
            "--identity",
            "insecure-header",
        ],
    )
    .spawn();
    let (data, _api) = pdgate.serving().await;
    let channel = Channel::from_shared(format!("http://{data}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // Allowed: the members' app reads a balance, e-mail address included.
    let answer = unary::<_, loyalty::Balance>(
        &channel,
        GET_BALANCE,
        balance_request("loyalty-app", "service.provision", "cust-1"),
    )
    .await
    .expect("the members' app reads a balance");
    assert!(pdgate::client::decision_id(answer.metadata()).is_some());
    let balance = answer.into_inner();
    assert_eq!(
        (
            balance.points,
            balance.name.as_str(),
            balance.email.as_str()
        ),
        (1200, "山田 太郎", "taro@example.jp")
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Denied: marketing has no grant on loyalty balances; the service never sees the call.
    let status = unary::<_, loyalty::Balance>(
        &channel,
        GET_BALANCE,
        balance_request("marketing-service", "marketing.email", "cust-1"),
    )
    .await
    .expect_err("marketing may not read balances");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let denial = Denial::from_status(&status).expect("pdgate's denial details");
    assert!(denial.has(ReasonCode::NoGrant), "{denial:?}");
    assert!(denial.decision_id.is_some());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a denied call reached the service"
    );

    // Minimized: a reward shipment gets the balance and name, the e-mail address cleared.
    let shipped = unary::<_, loyalty::Balance>(
        &channel,
        GET_BALANCE,
        balance_request("logistics-service", "service.shipping", "cust-1"),
    )
    .await
    .expect("shipping reads a balance")
    .into_inner();
    assert_eq!(
        (
            shipped.points,
            shipped.name.as_str(),
            shipped.email.as_str()
        ),
        (1200, "山田 太郎", "")
    );

    // The subject comes from the message: a header naming someone else is refused.
    let mut mismatched = balance_request("loyalty-app", "service.provision", "cust-1");
    mismatched
        .metadata_mut()
        .insert("x-data-subject", "cust-2".parse().unwrap());
    let status = unary::<_, loyalty::Balance>(&channel, GET_BALANCE, mismatched)
        .await
        .expect_err("header and message disagree");
    let denial = Denial::from_status(&status).unwrap();
    assert!(denial.has(ReasonCode::SubjectMismatch), "{denial:?}");

    // A write the app may make goes through.
    let credited = unary::<_, loyalty::AddPointsResponse>(
        &channel,
        ADD_POINTS,
        Declaration::purpose("service.provision")
            .insecure_caller("loyalty-app")
            .apply(tonic::Request::new(loyalty::AddPointsRequest {
                customer_id: "cust-1".into(),
                points: 30,
            }))
            .unwrap(),
    )
    .await
    .expect("the app credits points")
    .into_inner();
    assert_eq!(credited.points, 1230);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    server.abort();
}

/// The hand-written messages above agree with loyalty.proto on the wire: encoded with prost,
/// decoded with the proto's own descriptors, every field lands under its name.
#[test]
fn messages_match_the_proto() {
    let mut compiler = protox::Compiler::new([
        repo().join("examples/quickstart/proto"),
        repo().join("proto"),
    ])
    .unwrap();
    compiler.include_imports(true);
    compiler.open_files(["loyalty/v1/loyalty.proto"]).unwrap();
    let pool = DescriptorPool::decode(compiler.encode_file_descriptor_set().as_slice()).unwrap();
    let decode = |name: &str, bytes: Vec<u8>| {
        DynamicMessage::decode(pool.get_message_by_name(name).unwrap(), bytes.as_slice()).unwrap()
    };
    use prost::Message;
    let balance = decode(
        "loyalty.v1.Balance",
        loyalty::Balance {
            customer_id: "c".into(),
            points: 7,
            name: "n".into(),
            email: "e".into(),
        }
        .encode_to_vec(),
    );
    let text = |m: &DynamicMessage, f: &str| m.get_field_by_name(f).unwrap().into_owned();
    assert_eq!(text(&balance, "customer_id").as_str(), Some("c"));
    assert_eq!(text(&balance, "points").as_i64(), Some(7));
    assert_eq!(text(&balance, "name").as_str(), Some("n"));
    assert_eq!(text(&balance, "email").as_str(), Some("e"));
    let request = decode(
        "loyalty.v1.AddPointsRequest",
        loyalty::AddPointsRequest {
            customer_id: "c".into(),
            points: 3,
        }
        .encode_to_vec(),
    );
    assert_eq!(text(&request, "customer_id").as_str(), Some("c"));
    assert_eq!(text(&request, "points").as_i64(), Some(3));
    let get = decode(
        "loyalty.v1.GetBalanceRequest",
        loyalty::GetBalanceRequest {
            customer_id: "c".into(),
        }
        .encode_to_vec(),
    );
    assert_eq!(text(&get, "customer_id").as_str(), Some("c"));
    let added = decode(
        "loyalty.v1.AddPointsResponse",
        loyalty::AddPointsResponse { points: 9 }.encode_to_vec(),
    );
    assert_eq!(text(&added, "points").as_i64(), Some(9));
    // Each message has exactly the fields written out above.
    for (name, count) in [
        ("loyalty.v1.GetBalanceRequest", 1),
        ("loyalty.v1.Balance", 4),
        ("loyalty.v1.AddPointsRequest", 2),
        ("loyalty.v1.AddPointsResponse", 1),
    ] {
        assert_eq!(
            pool.get_message_by_name(name).unwrap().fields().count(),
            count,
            "{name}"
        );
    }
}
