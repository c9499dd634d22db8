//! The client helpers against the real demo behind a real sidecar (docs/clients.md):
//! `pdgate::client` in Rust — the layer writes each call's declaration, the denial details
//! decode to the reason codes, clauses and the decision id the audit log holds — and the
//! page's Python, Node, Go and Java examples, run as written when python3 has grpcio,
//! grpcio-tools and grpcio-status, when node has the packages of examples/clients/node, when
//! go, protoc's Go plugins and Debian's grpc-go are installed, and when a JDK, the grpc-java
//! plugin and Debian's grpc-java jars are (each skipped with a message otherwise).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step fails the test"
)]

mod common;

use common::Harness;
use pdgate::client::{ClientError, Declaration, DeclareLayer, Denial, DenialReason};
use pdgate::decision::ReasonCode;
use pdgate::proto::demo::customer_data_client::CustomerDataClient;
use pdgate::proto::demo::{GetBillingStatementRequest, GetCallHistoryRequest, GetProfileRequest};
use std::path::PathBuf;
use std::time::Duration;

fn billing(customer: &str) -> GetBillingStatementRequest {
    GetBillingStatementRequest {
        customer_id: customer.into(),
        ..Default::default()
    }
}

fn profile(customer: &str) -> GetProfileRequest {
    GetProfileRequest {
        customer_id: customer.into(),
    }
}

#[tokio::test]
async fn the_layer_declares_each_call_and_denials_decode_to_their_reasons() {
    let h = Harness::start().await;
    let channel = h.channel(h.data_addr).await;
    // Calls without a declaration of their own are the marketing service's e-mail campaign.
    let layer = DeclareLayer::with_default(
        Declaration::purpose("marketing.email").insecure_caller("marketing-service"),
    );
    let mut client =
        CustomerDataClient::new(tower::ServiceBuilder::new().layer(layer).service(channel));

    // Allowed, with the declaration attached to the call.
    let declared = Declaration::purpose("service.billing").insecure_caller("billing-service");
    let answer = client
        .get_billing_statement(declared.attach(tonic::Request::new(billing("cust-1"))))
        .await
        .expect("billing reads a statement");
    let allowed_id = pdgate::client::decision_id(answer.metadata())
        .expect("a decision id on the answer")
        .to_owned();
    assert_eq!(h.service.calls(), 1);

    // The layer's default declaration: no consent to e-mail marketing (§1(2)).
    let status = client
        .get_profile(tonic::Request::new(profile("cust-1")))
        .await
        .expect_err("cust-1 never consented");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let denial = Denial::from_status(&status).expect("pdgate's details");
    assert_eq!(
        denial.reasons,
        [DenialReason::Known(ReasonCode::ConsentRequired)]
    );
    assert!(denial.has(ReasonCode::ConsentRequired));
    assert_eq!(denial.clauses, ["§1(2)"]);
    assert!(denial.policy_version.is_some());
    assert_eq!(h.service.calls(), 1, "a denied call reached the service");

    // Every reason in stage order: a joint user asking for call history.
    let joint = Declaration::purpose("joint_use.marketing_research").insecure_caller("softbank");
    let status = client
        .get_call_history(joint.attach(tonic::Request::new(GetCallHistoryRequest {
            customer_id: "cust-2".into(),
        })))
        .await
        .expect_err("never communications data for joint use");
    let secrecy = Denial::from_status(&status).unwrap();
    assert_eq!(
        secrecy.reasons,
        [
            DenialReason::Known(ReasonCode::NoGrant),
            DenialReason::Known(ReasonCode::SecrecyOfCommunications)
        ]
    );
    assert_eq!(secrecy.first().map(DenialReason::as_str), Some("NO_GRANT"));

    // The subjects the declaration names must be the message's.
    let mismatch = Declaration::purpose("service.support")
        .insecure_caller("support-service")
        .subject("cust-2");
    let status = client
        .get_profile(mismatch.attach(tonic::Request::new(profile("cust-1"))))
        .await
        .expect_err("header and message disagree");
    assert!(
        Denial::from_status(&status)
            .unwrap()
            .has(ReasonCode::SubjectMismatch)
    );
    let matching = Declaration::purpose("service.support")
        .insecure_caller("support-service")
        .subject("cust-1");
    client
        .get_profile(matching.attach(tonic::Request::new(profile("cust-1"))))
        .await
        .expect("support reads the profile it names");

    // The ids the denials carry are those of their audit records.
    let records = h.audit_records();
    let by_id = |id: &str| records.iter().find(|r| r.body.decision_id == id);
    assert!(by_id(&allowed_id).is_some_and(|r| r.body.reasons.is_empty()));
    let consent = by_id(denial.decision_id.as_deref().unwrap()).expect("the denial's record");
    assert_eq!(consent.body.purpose, "marketing.email");
    assert!(by_id(secrecy.decision_id.as_deref().unwrap()).is_some());
}

#[tokio::test]
async fn a_declaration_pdgate_would_refuse_never_leaves_the_client() {
    let h = Harness::start().await;
    let channel = h.channel(h.data_addr).await;
    let mut client = CustomerDataClient::new(
        tower::ServiceBuilder::new()
            .layer(DeclareLayer::new())
            .service(channel),
    );
    let records_before = h.audit_records().len();
    for (declaration, key) in [
        (Declaration::purpose(" service.billing"), "x-purpose"),
        (
            Declaration::purpose("service.billing").subject("cust-1,cust-4"),
            "x-data-subject",
        ),
        (Declaration::purpose(""), "x-purpose"),
        (
            Declaration::purpose("service.billing").insecure_caller("請求"),
            "x-caller",
        ),
    ] {
        let status = client
            .get_billing_statement(declaration.attach(tonic::Request::new(billing("cust-1"))))
            .await
            .expect_err("refused in the client");
        assert!(
            status.message().contains(&format!("`{key}`")),
            "{key}: {status:?}"
        );
        assert!(Denial::from_status(&status).is_none());
    }
    let refused = Declaration::purpose("service.billing\t").apply(tonic::Request::new(()));
    assert!(matches!(
        refused,
        Err(ClientError::Whitespace {
            key: "x-purpose",
            ..
        })
    ));
    assert_eq!(h.service.calls(), 0);
    assert_eq!(
        h.audit_records().len(),
        records_before,
        "nothing reached pdgate"
    );
    // A status that is not one of pdgate's refusals decodes to nothing.
    assert!(Denial::from_status(&tonic::Status::permission_denied("the service's own")).is_none());
}

// ---------------------------------------------------------------------------------------------
// Python

fn clients_page() -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/clients.md"))
        .unwrap()
}

fn python_example() -> String {
    clients_page()
        .split("<!-- clients:python -->\n```python\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("docs/clients.md marks its Python example")
        .to_owned()
}

/// python3 with the three packages the example needs, or why not.
fn python() -> Result<(), String> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools, grpc_status"])
        .output()
        .map_err(|e| format!("no python3: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

async fn run(cmd: &mut tokio::process::Command) -> std::process::Output {
    cmd.kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the example finished within 120 s")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_runs_against_the_demo() {
    if let Err(why) = python() {
        println!(
            "skipped: the Python example of docs/clients.md needs python3 with grpcio, \
             grpcio-tools and grpcio-status ({why}); `pip install grpcio grpcio-tools grpcio-status`"
        );
        return;
    }
    let h = Harness::start().await;
    let work = tempfile::tempdir().unwrap();
    let gen_dir = work.path().join("gen");
    std::fs::create_dir_all(&gen_dir).unwrap();
    // The stubs, generated as the page says.
    let out = run(tokio::process::Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-Iproto"])
        .arg(format!("--python_out={}", gen_dir.display()))
        .arg(format!("--grpc_python_out={}", gen_dir.display()))
        .args([
            "proto/demo/customer/v1/customer.proto",
            "proto/pdgate/v1/annotations.proto",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR")))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = work.path().join("client.py");
    std::fs::write(&script, python_example()).unwrap();

    let out = run(tokio::process::Command::new("python3")
        .arg(&script)
        .arg(h.data_addr.to_string())
        .env("PYTHONPATH", &gen_dir))
    .await;
    check_example_run(&h, "Python", &out);
}

/// What the Python, Node, Go and Java examples print: an allowed billing read and a refused
/// marketing read, each with its decision id, which must be the audit records of those calls;
/// the refused call never reached the service.
fn check_example_run(h: &Harness, language: &str, out: &std::process::Output) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the {language} example failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let id = |line: &str| line.rsplit("decision ").next().unwrap().to_owned();
    assert!(lines[0].starts_with("allowed: "), "{stdout}");
    assert!(
        lines[1].starts_with("denied: CONSENT_REQUIRED §1(2), decision "),
        "{stdout}"
    );
    // Both ids the example printed are the audit records of its two calls.
    let records = h.audit_records();
    let allowed = records
        .iter()
        .find(|r| r.body.decision_id == id(lines[0]))
        .unwrap();
    assert_eq!(
        (allowed.body.caller.as_str(), allowed.body.purpose.as_str()),
        ("billing-service", "service.billing")
    );
    let denied = records
        .iter()
        .find(|r| r.body.decision_id == id(lines[1]))
        .unwrap();
    assert_eq!(denied.body.caller, "marketing-service");
    assert_eq!(h.service.calls(), 1, "the denied call reached the service");
    println!("{language} example:\n{stdout}");
}

// ---------------------------------------------------------------------------------------------
// Node

/// The packages of the Node example, installed by `npm ci` in examples/clients/node, or why
/// they are not there.
fn node_modules() -> Result<PathBuf, String> {
    let modules =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/clients/node/node_modules");
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .map_err(|e| format!("no node: {e}"))?;
    if !node.status.success() {
        return Err("`node --version` failed".into());
    }
    if !modules.join("@grpc/grpc-js").is_dir() || !modules.join("@grpc/proto-loader").is_dir() {
        return Err(format!(
            "{} lacks @grpc/grpc-js or @grpc/proto-loader",
            modules.display()
        ));
    }
    Ok(modules)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_example_runs_against_the_demo() {
    let modules = match node_modules() {
        Ok(modules) => modules,
        Err(why) => {
            println!(
                "skipped: the Node example of docs/clients.md needs node and its packages ({why}); \
                 `cd examples/clients/node && npm ci`"
            );
            return;
        }
    };
    let example = clients_page()
        .split("<!-- clients:node -->\n```js\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("docs/clients.md marks its Node example")
        .to_owned();
    let h = Harness::start().await;
    let work = tempfile::tempdir().unwrap();
    let script = work.path().join("client.js");
    std::fs::write(&script, example).unwrap();
    let out = run(tokio::process::Command::new("node")
        .arg(&script)
        .arg(h.data_addr.to_string())
        .env("NODE_PATH", &modules)
        .env(
            "PROTO_DIR",
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto"),
        ))
    .await;
    check_example_run(&h, "Node", &out);
}

// ---------------------------------------------------------------------------------------------
// Go

/// Where Debian's Go packages put their sources (GOPATH mode builds from there offline).
const DEBIAN_GOCODE: &str = "/usr/share/gocode";

/// go, protoc with the Go and gRPC plugins, and Debian's grpc-go, genproto and protobuf 1.5
/// sources, or what is missing.
fn go_toolchain() -> Result<(), String> {
    for (tool, arg) in [
        ("go", "version"),
        ("protoc", "--version"),
        ("protoc-gen-go", "--version"),
        ("protoc-gen-go-grpc", "--version"),
    ] {
        let out = std::process::Command::new(tool)
            .arg(arg)
            .output()
            .map_err(|e| format!("no `{tool}`: {e}"))?;
        if !out.status.success() {
            return Err(format!("`{tool} {arg}` failed"));
        }
    }
    let gocode = PathBuf::from(DEBIAN_GOCODE).join("src");
    for (package, source) in [
        ("golang-google-grpc-dev", "google.golang.org/grpc/status"),
        (
            "golang-google-genproto-dev",
            "google.golang.org/genproto/googleapis/rpc/errdetails",
        ),
        (
            "golang-google-protobuf-dev",
            "google.golang.org/protobuf/proto",
        ),
        // 1.3 (which apt picks for grpc-go unless told) lacks it, and its runtime cannot
        // decode the messages protoc-gen-go writes today.
        (
            "golang-github-golang-protobuf-1-5-dev",
            "github.com/golang/protobuf/proto/registry.go",
        ),
    ] {
        if !gocode.join(source).exists() {
            return Err(format!(
                "no {} (from {package})",
                gocode.join(source).display()
            ));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_example_runs_against_the_demo() {
    if let Err(why) = go_toolchain() {
        println!(
            "skipped: the Go example of docs/clients.md needs go, protoc, its Go plugins and \
             Debian's Go gRPC packages ({why}); `apt-get install golang-go golang-google-grpc-dev \
             golang-google-genproto-dev golang-github-golang-protobuf-1-5-dev protoc-gen-go \
             protoc-gen-go-grpc protobuf-compiler`"
        );
        return;
    }
    let example = clients_page()
        .split("<!-- clients:go -->\n```go\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("docs/clients.md marks its Go example")
        .to_owned();
    let work = tempfile::tempdir().unwrap();
    let gen_src = work.path().join("gen/src");
    std::fs::create_dir_all(&gen_src).unwrap();
    // The stubs, generated as the page says.
    let customer = "Mdemo/customer/v1/customer.proto=pdgate.example/demo/customer/v1;customerv1";
    let annotations = "Mpdgate/v1/annotations.proto=pdgate.example/pdgate/v1";
    let out = run(tokio::process::Command::new("protoc")
        .arg("-Iproto")
        .arg(format!("--go_out={}", gen_src.display()))
        .arg(format!("--go-grpc_out={}", gen_src.display()))
        .arg(format!("--go_opt={customer}"))
        .arg(format!("--go_opt={annotations}"))
        .arg(format!("--go-grpc_opt={customer}"))
        .arg(format!("--go-grpc_opt={annotations}"))
        .args([
            "proto/demo/customer/v1/customer.proto",
            "proto/pdgate/v1/annotations.proto",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR")))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(work.path().join("client.go"), example).unwrap();
    // Built first, then run: a cold build of grpc-go takes its own time on a loaded machine.
    let gopath =
        std::env::join_paths([work.path().join("gen"), PathBuf::from(DEBIAN_GOCODE)]).unwrap();
    let out = run(tokio::process::Command::new("go")
        .args(["build", "-o", "client", "client.go"])
        .env("GO111MODULE", "off")
        .env("GOPATH", &gopath)
        .env("GOFLAGS", "")
        .current_dir(work.path()))
    .await;
    assert!(
        out.status.success(),
        "the Go example did not build:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let h = Harness::start().await;
    let out =
        run(tokio::process::Command::new(work.path().join("client")).arg(h.data_addr.to_string()))
            .await;
    check_example_run(&h, "Go", &out);
}

// ---------------------------------------------------------------------------------------------
// Java

/// The jars in /usr/share/java the Java example builds and runs with (Debian's grpc-java and
/// its dependencies), in the order of the page's `printf` line.
const JAVA_JARS: &[&str] = &[
    "grpc-api",
    "grpc-core",
    "grpc-context",
    "grpc-netty",
    "grpc-protobuf",
    "grpc-protobuf-lite",
    "grpc-stub",
    "protobuf",
    "proto-google-common-protos",
    "guava",
    "perfmark-api",
    "geronimo-annotation-1.3-spec",
    "netty-buffer",
    "netty-codec",
    "netty-codec-http",
    "netty-codec-http2",
    "netty-common",
    "netty-handler",
    "netty-resolver",
    "netty-transport",
];

const GRPC_JAVA_PLUGIN: &str = "/usr/bin/grpc_java_plugin";

/// javac, java, protoc, the grpc-java plugin and the jars, as a classpath, or what is missing.
fn java_toolchain() -> Result<String, String> {
    for (tool, arg) in [
        ("javac", "-version"),
        ("java", "-version"),
        ("protoc", "--version"),
    ] {
        let out = std::process::Command::new(tool)
            .arg(arg)
            .output()
            .map_err(|e| format!("no `{tool}`: {e}"))?;
        if !out.status.success() {
            return Err(format!("`{tool} {arg}` failed"));
        }
    }
    if !PathBuf::from(GRPC_JAVA_PLUGIN).exists() {
        return Err(format!("no {GRPC_JAVA_PLUGIN}"));
    }
    let mut classpath = Vec::new();
    for jar in JAVA_JARS {
        let path = PathBuf::from(format!("/usr/share/java/{jar}.jar"));
        if !path.exists() {
            return Err(format!("no {}", path.display()));
        }
        classpath.push(path);
    }
    Ok(std::env::join_paths(classpath)
        .unwrap()
        .into_string()
        .unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_java_example_runs_against_the_demo() {
    let page = clients_page();
    // The page builds with the jars this test does.
    assert!(
        page.contains(&format!(
            "CP=$(printf '/usr/share/java/%s.jar:' {})",
            JAVA_JARS.join(" ")
        )),
        "docs/clients.md's Java classpath differs from JAVA_JARS"
    );
    let classpath = match java_toolchain() {
        Ok(classpath) => classpath,
        Err(why) => {
            println!(
                "skipped: the Java example of docs/clients.md needs a JDK, protoc, the grpc-java \
                 plugin and Debian's grpc-java jars ({why}); `apt-get install \
                 default-jdk-headless libgrpc-java libgoogle-common-protos-java libguava-java \
                 libnetty-java libperfmark-java libgeronimo-annotation-1.3-spec-java \
                 libprotobuf-java protobuf-compiler protobuf-compiler-grpc-java-plugin`"
            );
            return;
        }
    };
    let example = page
        .split("<!-- clients:java -->\n```java\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("docs/clients.md marks its Java example")
        .to_owned();
    let work = tempfile::tempdir().unwrap();
    let gen_dir = work.path().join("gen");
    let classes = work.path().join("classes");
    std::fs::create_dir_all(&gen_dir).unwrap();
    std::fs::create_dir_all(&classes).unwrap();
    // The stubs, generated as the page says.
    let out = run(tokio::process::Command::new("protoc")
        .args(["-Iproto", "-Iexamples/clients/java"])
        .arg(format!("--java_out={}", gen_dir.display()))
        .arg(format!("--grpc-java_out={}", gen_dir.display()))
        .arg(format!("--plugin=protoc-gen-grpc-java={GRPC_JAVA_PLUGIN}"))
        .args([
            "proto/demo/customer/v1/customer.proto",
            "proto/pdgate/v1/annotations.proto",
            "examples/clients/java/google/rpc/error_info.proto",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR")))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = work.path().join("Client.java");
    std::fs::write(&client, example).unwrap();
    let mut sources = vec![client];
    let mut dirs = vec![gen_dir];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "java") {
                sources.push(path);
            }
        }
    }
    let out = run(tokio::process::Command::new("javac")
        .arg("-d")
        .arg(&classes)
        .args(["-cp", &classpath])
        .args(&sources))
    .await;
    assert!(
        out.status.success(),
        "the Java example did not compile:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let h = Harness::start().await;
    let run_classpath =
        std::env::join_paths(std::iter::once(classes).chain(std::env::split_paths(&classpath)))
            .unwrap();
    let out = run(tokio::process::Command::new("java")
        .arg("-cp")
        .arg(run_classpath)
        .arg("Client")
        .arg(h.data_addr.to_string()))
    .await;
    check_example_run(&h, "Java", &out);
}
