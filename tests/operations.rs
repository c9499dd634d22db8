//! What an operator's tools see: server reflection in both protocol versions (grpcurl 1.8,
//! grpc_cli and older GUI clients speak v1alpha, newer ones v1), and the logs of the real
//! binary.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::Harness;
use prost::Message;
use prost_types::FileDescriptorProto;
use std::collections::{BTreeMap, BTreeSet};

/// A reflection client of one protocol version: lists services and fetches files, as grpcurl
/// does (the file declaring a symbol, then its imports by name).
macro_rules! reflection_client {
    ($name:ident, $version:ident) => {
        mod $name {
            use tonic::transport::Channel;
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;

            /// The answer, or the gRPC code of an error (tonic ends the stream with a status
            /// where the protocol also allows an `ErrorResponse`: both are accepted).
            async fn ask(
                channel: &Channel,
                request: MessageRequest,
            ) -> Result<MessageResponse, tonic::Code> {
                let mut client = ServerReflectionClient::new(channel.clone());
                let request = ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(request),
                };
                let mut responses = client
                    .server_reflection_info(tokio_stream::iter(vec![request]))
                    .await
                    .unwrap()
                    .into_inner();
                match responses.message().await {
                    Ok(Some(r)) => match r.message_response.unwrap() {
                        MessageResponse::ErrorResponse(e) => Err(tonic::Code::from(e.error_code)),
                        other => Ok(other),
                    },
                    Ok(None) => panic!("no answer"),
                    Err(status) => Err(status.code()),
                }
            }

            pub async fn services(channel: &Channel) -> Vec<String> {
                match ask(channel, MessageRequest::ListServices(String::new())).await {
                    Ok(MessageResponse::ListServicesResponse(list)) => {
                        list.service.into_iter().map(|s| s.name).collect()
                    }
                    other => panic!("not a list of services: {other:?}"),
                }
            }

            /// The encoded files of one answer, or the gRPC code of its error.
            pub async fn files(
                channel: &Channel,
                symbol: Option<&str>,
                file: Option<&str>,
            ) -> Result<Vec<Vec<u8>>, tonic::Code> {
                let request = match (symbol, file) {
                    (Some(s), _) => MessageRequest::FileContainingSymbol(s.to_owned()),
                    (None, Some(f)) => MessageRequest::FileByFilename(f.to_owned()),
                    (None, None) => unreachable!(),
                };
                match ask(channel, request).await? {
                    MessageResponse::FileDescriptorResponse(f) => Ok(f.file_descriptor_proto),
                    other => panic!("not files: {other:?}"),
                }
            }
        }
    };
}

reflection_client!(v1, v1);
reflection_client!(v1alpha, v1alpha);

/// The files a client needs to describe `symbol`: the file declaring it and every import,
/// fetched one by one by name as grpcurl does, built into a pool that resolves them all.
async fn describe(
    channel: &tonic::transport::Channel,
    symbol: &str,
    alpha: bool,
) -> prost_reflect::DescriptorPool {
    let fetch = |symbol: Option<String>, file: Option<String>| {
        let channel = channel.clone();
        async move {
            let got = if alpha {
                v1alpha::files(&channel, symbol.as_deref(), file.as_deref()).await
            } else {
                v1::files(&channel, symbol.as_deref(), file.as_deref()).await
            };
            got.unwrap_or_else(|code| panic!("{symbol:?} {file:?}: error {code:?}"))
        }
    };
    let mut files: BTreeMap<String, FileDescriptorProto> = BTreeMap::new();
    let mut pending: Vec<Vec<u8>> = fetch(Some(symbol.to_owned()), None).await;
    while let Some(raw) = pending.pop() {
        let file = FileDescriptorProto::decode(raw.as_slice()).unwrap();
        for import in &file.dependency {
            if !files.contains_key(import) {
                pending.extend(fetch(None, Some(import.clone())).await);
            }
        }
        files.insert(file.name().to_owned(), file);
    }
    let mut pool = prost_reflect::DescriptorPool::new();
    pool.add_file_descriptor_protos(files.into_values())
        .unwrap_or_else(|e| panic!("the files describing `{symbol}` do not resolve: {e}"));
    pool
}

async fn reflection_describes_every_service_served(alpha: bool) {
    let h = Harness::start().await;
    let channel = h.channel(h.api_addr).await;
    let listed: BTreeSet<String> = if alpha {
        v1alpha::services(&channel).await
    } else {
        v1::services(&channel).await
    }
    .into_iter()
    .collect();
    let expected: BTreeSet<String> = [
        "pdgate.v1.AccessControl",
        "pdgate.v1.PolicyAdmin",
        "pdgate.v1.SubjectRights",
        "pdgate.v1.AuditLog",
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(listed, expected);
    assert_eq!(
        pdgate::api::SERVICES
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<BTreeSet<_>>(),
        expected
    );
    for service in &listed {
        let pool = describe(&channel, service, alpha).await;
        let described = pool
            .get_service_by_name(service)
            .unwrap_or_else(|| panic!("`{service}` is not in the files reflection gave"));
        assert!(described.methods().len() > 0, "`{service}` has no methods");
    }
    // A message symbol too, and Envoy's request as ext_authz sends it.
    let pool = describe(&channel, "envoy.service.auth.v3.CheckRequest", alpha).await;
    let check = pool
        .get_message_by_name("envoy.service.auth.v3.CheckRequest")
        .unwrap();
    assert!(check.get_field_by_name("attributes").is_some());
    let authorization = pool
        .get_service_by_name("envoy.service.auth.v3.Authorization")
        .unwrap();
    let method = authorization
        .methods()
        .find(|m| m.name() == "Check")
        .unwrap();
    assert_eq!(
        method.input().full_name(),
        "envoy.service.auth.v3.CheckRequest"
    );
    // An unknown symbol is NOT_FOUND.
    let missing = if alpha {
        v1alpha::files(&channel, Some("no.such.Service"), None).await
    } else {
        v1::files(&channel, Some("no.such.Service"), None).await
    };
    assert_eq!(missing, Err(tonic::Code::NotFound));
}

#[tokio::test]
async fn reflection_v1_describes_every_service_served() {
    reflection_describes_every_service_served(false).await;
}

#[tokio::test]
async fn reflection_v1alpha_describes_every_service_served() {
    reflection_describes_every_service_served(true).await;
}

/// `proto/third_party/` is a copy of the protos shipped in the `envoy-types` of Cargo.lock:
/// what reflection describes is what the Rust types encode.
#[test]
fn the_vendored_envoy_protos_are_those_of_envoy_types() {
    // Only this machine's platform: without the filter, cargo wants the manifest of every
    // package of every platform in Cargo.lock, which an offline machine may never have
    // downloaded (android_system_properties here).
    let rustc = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .unwrap();
    let rustc = String::from_utf8(rustc.stdout).unwrap();
    let host = rustc
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .unwrap_or_else(|| panic!("`rustc -vV` names no host: {rustc}"));
    let metadata = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline", "--locked"])
        .args(["--filter-platform", host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        metadata.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&metadata.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let manifest = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .unwrap()["manifest_path"]
        .as_str()
        .unwrap()
        .to_owned();
    let shipped = std::path::Path::new(&manifest)
        .parent()
        .unwrap()
        .join("proto");
    let vendored = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/third_party");
    let roots = ["data-plane-api", "xds", "googleapis", "protoc-gen-validate"];
    let mut checked = 0;
    let mut stack = vec![vendored.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "proto") {
                continue;
            }
            let relative = path.strip_prefix(&vendored).unwrap();
            let original = roots
                .iter()
                .map(|r| shipped.join(r).join(relative))
                .find(|p| p.is_file())
                .unwrap_or_else(|| panic!("`{}` is not in envoy-types", relative.display()));
            assert!(
                std::fs::read(&path).unwrap() == std::fs::read(&original).unwrap(),
                "`{}` differs from envoy-types' `{}`",
                relative.display(),
                original.display()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 19, "every vendored proto is checked");
}

// ---------------------------------------------------------------------------------------------
// Logs of the real binary, at the default level (no PDGATE_LOG)

/// `pdgate serve` on free ports at the default log level, with `extra` arguments; stderr is a
/// pipe, as under a container runtime or a supervisor.
fn serve_default_level(state: &std::path::Path, extra: &[&str]) -> common::bin::Running {
    common::bin::serve(&common::policy_dir(), state, extra)
        .env_remove("PDGATE_LOG")
        .spawn()
}

/// SIGTERM, then the exit status and stderr of a clean exit.
async fn stop(pdgate: common::bin::Running) -> String {
    pdgate.signal("TERM");
    let out = pdgate.exit_within(std::time::Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8(out.stderr).unwrap()
}

#[tokio::test]
async fn json_logs_parse_line_by_line_with_one_line_per_listener() {
    let state = tempfile::tempdir().unwrap();
    let mut pdgate = serve_default_level(state.path(), &["--log-format", "json"]);
    let data = pdgate.listening("data").await;
    let api = pdgate.listening("api").await;
    // The addresses are the bound ones, and the listeners answer there.
    for listening in [&data, &api] {
        assert_eq!(listening.identity, "insecure-header");
        assert_ne!(listening.addr.port(), 0);
        tokio::net::TcpStream::connect(listening.addr)
            .await
            .unwrap_or_else(|e| panic!("{listening:?}: {e}"));
    }
    let stderr = stop(pdgate).await;
    let records: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\n{stderr}"))
        })
        .collect();
    for record in &records {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(record[key].is_string(), "no `{key}` in {record}");
        }
    }
    let listening: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["message"] == "listening")
        .collect();
    assert_eq!(listening.len(), 2, "one line per listener: {stderr}");
    for record in listening {
        assert_eq!(record["level"], "INFO");
        assert_eq!(record["identity"], "insecure-header");
    }
    // The insecure mode is a warning at any level.
    assert!(
        records.iter().any(|r| r["level"] == "WARN"),
        "the insecure-header warning: {stderr}"
    );
}

#[tokio::test]
async fn the_log_format_comes_from_the_config_file_too() {
    let state = tempfile::tempdir().unwrap();
    let config = state.path().join("pdgate.toml");
    std::fs::write(&config, "[log]\nformat = \"json\"\n").unwrap();
    let mut pdgate = serve_default_level(state.path(), &["--config", config.to_str().unwrap()]);
    let api = pdgate.listening("api").await;
    assert_eq!(api.identity, "insecure-header");
    let stderr = stop(pdgate).await;
    for line in stderr.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON line: {line:?}"
        );
    }
}

#[tokio::test]
async fn text_logs_to_a_pipe_have_no_colour() {
    let state = tempfile::tempdir().unwrap();
    // The runner sets NO_COLOR for every run; without it, only stderr not being a terminal
    // keeps the escape codes out.
    let mut pdgate = common::bin::serve(&common::policy_dir(), state.path(), &[])
        .env_remove("PDGATE_LOG")
        .env_remove("NO_COLOR")
        .spawn();
    let data = pdgate.listening("data").await;
    let api = pdgate.listening("api").await;
    assert_ne!(data.addr, api.addr);
    let stderr = stop(pdgate).await;
    assert!(!stderr.is_empty());
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI escape codes in a piped log:\n{stderr:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The plaintext probe listener (`--admin-listen`)

/// `GET path` over HTTP/1.1 on a fresh connection: the status code and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status_line = head.lines().next().unwrap();
    let mut parts = status_line.split_whitespace();
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    (parts.next().unwrap().parse().unwrap(), body.to_owned())
}

#[tokio::test]
async fn readyz_is_503_while_the_policy_is_invalid_and_200_after_a_fix() {
    let policy = common::policy_copy();
    let csv = policy.path().join("policy.csv");
    let good = std::fs::read_to_string(&csv).unwrap();
    std::fs::write(&csv, "p, nobody, no.such.purpose, read, no.such.category\n").unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut pdgate = common::bin::serve(
        policy.path(),
        state.path(),
        &["--admin-listen", "127.0.0.1:0", "--log-format", "json"],
    )
    .spawn();
    let admin = pdgate.listening("admin").await;
    assert_eq!(admin.identity, "none");
    let (data, api) = pdgate.serving().await;
    assert!(admin.addr != data && admin.addr != api);

    assert_eq!(http_get(admin.addr, "/livez").await.0, 200);
    let (status, body) = http_get(admin.addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.lines().any(|l| l.starts_with("policy:")), "{body}");
    let (status, metrics) = http_get(admin.addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pdgate_decisions_total") || l.starts_with("# TYPE pdgate_")),
        "{metrics}"
    );
    assert_eq!(http_get(admin.addr, "/nothing").await.0, 404);

    // The watched policy directory is fixed: the reload makes the sidecar ready.
    std::fs::write(&csv, good).unwrap();
    common::wait::eventually("/readyz answers 200", || async {
        http_get(admin.addr, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(http_get(admin.addr, "/livez").await.0, 200);
    stop(pdgate).await;
}
