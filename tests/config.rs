//! `pdgate serve` configuration: the example `deploy/pdgate.toml` documents exactly the keys
//! `FileConfig` accepts and resolves to the defaults; every bad value is a `ConfigError`
//! naming its key; and the binary checks the whole configuration before binding a port
//! (exit 2), serves health once started, and exits 0 on SIGTERM.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed setup aborts the test"
)]

mod common;

use common::bin::Pdgate;
use common::policy_dir;
use common::ports::ClosedPort;
use pdgate::config::{Config, ConfigError, DEFAULT_API_LISTEN, DEFAULT_URI_PREFIX, FileConfig};
use pdgate::identity::IdentityMode;
use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `resolve` only reads the TLS files and checks that they are PEM; the handshake is not part
/// of configuration, so a placeholder PEM block is enough for these tests.
const PLACEHOLDER_PEM: &str = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";

/// A CA, and a server certificate and key it signed: (cert, key, CA) as PEM.
fn real_tls_files() -> (String, String, String) {
    common::tls::Ca::new().server_pems("localhost")
}

fn example() -> PathBuf {
    repo().join("deploy/pdgate.toml")
}

// ---------------------------------------------------------------------------------------------
// The example file

/// A key line of the example: `key = value`, or `# key = value` when commented out.
#[derive(Debug)]
struct KeyLine {
    /// `""` before the first `[section]`.
    section: String,
    key: String,
    commented: bool,
}

/// The `[section]` headers and the key lines of a config text. A prose comment never starts
/// with `word =` (the example's own convention), so a commented key line is unambiguous.
fn key_lines(text: &str) -> (Vec<String>, Vec<KeyLine>) {
    let mut sections = Vec::new();
    let mut keys = Vec::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_owned();
            sections.push(section.clone());
            continue;
        }
        let (body, commented) = match line.strip_prefix('#') {
            Some(rest) => (rest.trim_start(), true),
            None => (line, false),
        };
        if let Some((key, _)) = body.split_once('=') {
            let key = key.trim();
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                keys.push(KeyLine {
                    section: section.clone(),
                    key: key.to_owned(),
                    commented,
                });
            }
        }
    }
    (sections, keys)
}

/// The field names `FileConfig` (or its table `section`) accepts, as serde lists them when it
/// rejects an unknown one: read from the code, so a field added without documenting it
/// fails `example_documents_exactly_the_keys_file_config_accepts`.
fn accepted_fields(section: &str) -> BTreeSet<String> {
    let text = if section.is_empty() {
        "not_a_key = 1\n".to_owned()
    } else {
        format!("[{section}]\nnot_a_key = 1\n")
    };
    let err = toml::from_str::<FileConfig>(&text).expect_err("unknown key rejected");
    let message = err.message();
    let (_, expected) = message
        .split_once("expected")
        .unwrap_or_else(|| panic!("serde lists the accepted fields: {message}"));
    let fields: BTreeSet<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert!(!fields.is_empty(), "no field names in: {message}");
    fields
}

fn resolve_example(file: FileConfig) -> Result<Config, ConfigError> {
    let mut file = file;
    // The example's paths are relative to the repository root; make them independent of the
    // directory the test runs in.
    file.policy = Some(policy_dir());
    file.routes = file.routes.map(|r| repo().join(r));
    file.resolve("deploy/pdgate.toml")
}

#[test]
fn example_parses_resolves_and_shows_the_defaults() {
    let file = FileConfig::read(&example()).expect("deploy/pdgate.toml parses");
    let policy = file
        .policy
        .clone()
        .expect("the example names the policy dir");
    assert!(
        repo().join(&policy).is_dir(),
        "`policy = {policy:?}` is a directory from the repository root"
    );
    let config = resolve_example(file).expect("deploy/pdgate.toml resolves");
    assert_eq!(config.identity, IdentityMode::InsecureHeader);
    assert!(config.tls.is_none());

    // Every value set in the example is the default it claims to be.
    let defaults = FileConfig {
        policy: Some(policy_dir()),
        ..FileConfig::default()
    }
    .resolve("defaults")
    .expect("defaults resolve");
    assert_eq!(config.listen, defaults.listen);
    assert_eq!(config.api_listen, defaults.api_listen);
    assert_eq!(config.upstream, defaults.upstream);
    assert_eq!(config.routes, defaults.routes);
    assert_eq!(config.identity, defaults.identity);
    assert_eq!(config.cache, defaults.cache);
    assert_eq!(config.max_concurrent_calls, defaults.max_concurrent_calls);
    assert_eq!(config.shutdown_grace, defaults.shutdown_grace);
    assert_eq!(config.telemetry, defaults.telemetry);
    assert_eq!(config.subjects, defaults.subjects);
    assert_eq!(config.fleet, None, "embedded mode by default");
    assert_eq!(config.reload, defaults.reload);
    assert_eq!(config.log_format, defaults.log_format);
    assert_eq!(
        config.admin_listen, None,
        "the probe listener is off by default"
    );
    assert_eq!(config.log_format, pdgate::telemetry::logs::LogFormat::Text);
    assert_eq!(config.admin_roles, defaults.admin_roles);
    assert!(
        !config.admin_roles.knows("security-team"),
        "nobody holds an admin role by default"
    );
    assert_eq!(
        config.telemetry.otlp_endpoint, None,
        "export is off by default"
    );
}

#[test]
fn example_documents_exactly_the_keys_file_config_accepts() {
    let text = std::fs::read_to_string(example()).unwrap();
    let (sections, keys) = key_lines(&text);

    let mut top: BTreeSet<String> = keys
        .iter()
        .filter(|k| k.section.is_empty())
        .map(|k| k.key.clone())
        .collect();
    top.extend(sections.iter().cloned());
    assert_eq!(
        top,
        accepted_fields(""),
        "top-level keys and [sections] of deploy/pdgate.toml"
    );
    for section in &sections {
        let documented: BTreeSet<String> = keys
            .iter()
            .filter(|k| &k.section == section)
            .map(|k| k.key.clone())
            .collect();
        assert_eq!(
            documented,
            accepted_fields(section),
            "keys of [{section}] in deploy/pdgate.toml"
        );
    }
    let mut seen = BTreeSet::new();
    for k in &keys {
        assert!(
            seen.insert((k.section.as_str(), k.key.as_str())),
            "`{}` is documented twice in [{}]",
            k.key,
            k.section
        );
    }
}

#[test]
fn example_with_every_key_uncommented_parses_and_resolves_with_mtls() {
    let text = std::fs::read_to_string(example()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Real PEM files: the TLS configuration is built while the config is checked.
    let (cert_pem, key_pem, ca_pem) = real_tls_files();
    let pem = |name: &str| {
        let path = dir.path().join(name);
        let content = match name {
            "cert" => &cert_pem,
            "key" => &key_pem,
            _ => &ca_pem,
        };
        std::fs::write(&path, content).unwrap();
        toml::Value::String(path.display().to_string()).to_string()
    };

    let mut uncommented = String::new();
    let mut section = String::new();
    let mut commented_keys = 0;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        }
        let (_, keys) = key_lines(line);
        let out = match keys.first() {
            Some(k) if k.commented => {
                commented_keys += 1;
                match (section.as_str(), k.key.as_str()) {
                    ("tls", file @ ("cert" | "key" | "client_ca")) => {
                        format!("{file} = {}", pem(file))
                    }
                    _ => trimmed.trim_start_matches('#').trim_start().to_owned(),
                }
            }
            _ => line.to_owned(),
        };
        uncommented.push_str(&out);
        uncommented.push('\n');
    }
    assert!(
        commented_keys >= 5,
        "the tls keys and routes are commented out"
    );

    let path = dir.path().join("pdgate.toml");
    std::fs::write(&path, &uncommented).unwrap();
    let mut file = FileConfig::read(&path)
        .unwrap_or_else(|e| panic!("every documented key is a FileConfig field: {e}"));
    assert!(file.routes.is_some());
    assert!(file.tls.cert.is_some() && file.tls.key.is_some() && file.tls.client_ca.is_some());
    assert!(file.tls.uri_prefix.is_some() && file.tls.dns_suffix.is_some());

    // The TLS files only make sense with mTLS, the sync interval with `fsync = "interval"` and
    // the wait with `on_full = "wait"` (the example says so).
    file.identity = Some("mtls".into());
    file.audit.fsync = Some("interval".into());
    file.audit.on_full = Some("wait".into());
    // The poll interval goes with `change_feed = "poll"` (the example says so).
    file.fleet.change_feed = Some("poll".into());
    // The SQLite registry's path and fleet mode exclude each other (the example says so).
    assert!(file.subjects.path.is_some() && file.fleet.database_url.is_some());
    file.subjects.path = None;
    // [mesh] goes with identity = "mesh" and without [tls], with the key of its header (the
    // example says so): resolved on its own, with the XFCC header.
    let mut mesh = std::mem::take(&mut file.mesh);
    assert!(mesh.uri_prefix.is_some() && mesh.dns_suffix.is_some());
    mesh.dns_suffix = None;
    let meshed = resolve_example(FileConfig {
        identity: Some("mesh".into()),
        mesh,
        ..FileConfig::default()
    })
    .expect("the example's [mesh] resolves with identity = \"mesh\"");
    assert!(meshed.mesh.is_some_and(|m| !m.proxies.is_empty()));
    let config = resolve_example(file).expect("the uncommented example resolves with mtls");
    assert_eq!(
        config.telemetry.otlp_endpoint.as_deref(),
        Some("http://127.0.0.1:4317")
    );
    assert_eq!(config.identity, IdentityMode::Mtls);
    assert!(config.fleet.is_some());
    assert!(
        config
            .admin_roles
            .has("security-team", pdgate::identity::AdminRole::PolicyAdmin)
    );
    let tls = config.tls.expect("mtls has TLS files");
    assert_eq!(tls.uri_prefix, DEFAULT_URI_PREFIX);
    assert_eq!(tls.dns_suffix.as_deref(), Some("svc.cluster.local"));
}

// ---------------------------------------------------------------------------------------------
// FileConfig::read

fn write_config(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("pdgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn unknown_keys_and_bad_syntax_are_rejected_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, usize)] = &[
        (
            "listen = \"127.0.0.1:8443\"\n\n[cache]\nmax_entrys = 10\n",
            "max_entrys",
            4,
        ),
        (
            "upstream = \"127.0.0.1:1\"\nlisten_addr = \"x\"\n",
            "listen_addr",
            2,
        ),
        ("[tsl]\ncert = \"a.pem\"\n", "tsl", 1),
        ("[limits]\nmax_concurrent_calls = \"many\"\n", "", 2),
        ("[cache]\nttl_seconds = -1\n", "", 2),
        ("identity = mtls\n", "", 1),
    ];
    for (text, named, line) in cases {
        let path = write_config(&dir, text);
        let err = FileConfig::read(&path).expect_err(text);
        assert_eq!(err.origin, path.display().to_string(), "{text}");
        assert!(
            err.message.contains(named),
            "names `{named}`: {err} ({text})"
        );
        assert!(
            err.message.contains(&format!("(line {line})")),
            "names line {line}: {err} ({text})"
        );
    }
}

#[test]
fn an_unreadable_config_file_blames_the_config_flag() {
    let dir = tempfile::tempdir().unwrap();
    let err = FileConfig::read(&dir.path().join("missing.toml")).expect_err("missing file");
    assert_eq!(err.key, "--config");
}

// ---------------------------------------------------------------------------------------------
// FileConfig::resolve

fn good() -> FileConfig {
    FileConfig {
        policy: Some(policy_dir()),
        ..FileConfig::default()
    }
}

fn with(change: impl FnOnce(&mut FileConfig)) -> FileConfig {
    let mut file = good();
    change(&mut file);
    file
}

#[test]
fn every_bad_value_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("ok.pem");
    std::fs::write(&pem, PLACEHOLDER_PEM).unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "just text\n").unwrap();
    let missing = dir.path().join("missing");
    let mtls = |cert: Option<&Path>, key: Option<&Path>, ca: Option<&Path>| {
        let (cert, key, ca) = (
            cert.map(Path::to_owned),
            key.map(Path::to_owned),
            ca.map(Path::to_owned),
        );
        with(move |f| {
            f.identity = Some("mtls".into());
            f.tls.cert = cert;
            f.tls.key = key;
            f.tls.client_ca = ca;
        })
    };

    let cases: Vec<(&str, FileConfig, &str)> = vec![
        (
            "host name",
            with(|f| f.listen = Some("localhost:8443".into())),
            "listen",
        ),
        (
            "no port",
            with(|f| f.listen = Some("127.0.0.1".into())),
            "listen",
        ),
        (
            "port only",
            with(|f| f.api_listen = Some("9090".into())),
            "api_listen",
        ),
        (
            "same address twice",
            with(|f| {
                f.listen = Some("127.0.0.1:7000".into());
                f.api_listen = Some("127.0.0.1:7000".into());
            }),
            "api_listen",
        ),
        (
            "no port",
            with(|f| f.upstream = Some("customer-data".into())),
            "upstream",
        ),
        (
            "https",
            with(|f| f.upstream = Some("https://customer-data:443".into())),
            "upstream",
        ),
        (
            "port out of range",
            with(|f| f.upstream = Some("customer-data:70000".into())),
            "upstream",
        ),
        (
            "empty uri",
            with(|f| f.upstream = Some("http://".into())),
            "upstream",
        ),
        (
            "missing dir",
            with(|f| f.policy = Some(missing.clone())),
            "policy",
        ),
        ("a file", with(|f| f.policy = Some(example())), "policy"),
        (
            "missing file",
            with(|f| f.routes = Some(missing.clone())),
            "routes",
        ),
        (
            "unknown mode",
            with(|f| f.identity = Some("tls".into())),
            "identity",
        ),
        (
            "case matters",
            with(|f| f.identity = Some("MTLS".into())),
            "identity",
        ),
        (
            "mtls without cert",
            mtls(None, Some(&pem), Some(&pem)),
            "tls.cert",
        ),
        (
            "mtls, cert missing",
            mtls(Some(&missing), Some(&pem), Some(&pem)),
            "tls.cert",
        ),
        (
            "mtls without key",
            mtls(Some(&pem), None, Some(&pem)),
            "tls.key",
        ),
        (
            "mtls without CA",
            mtls(Some(&pem), Some(&pem), None),
            "tls.client_ca",
        ),
        (
            "mtls, CA not PEM",
            mtls(Some(&pem), Some(&pem), Some(&not_pem)),
            "tls.client_ca",
        ),
        (
            "tls without mtls",
            with(|f| f.tls.cert = Some(pem.clone())),
            "tls",
        ),
        (
            "zero",
            with(|f| f.cache.max_entries = Some(0)),
            "cache.max_entries",
        ),
        (
            "zero",
            with(|f| f.cache.ttl_seconds = Some(0)),
            "cache.ttl_seconds",
        ),
        (
            "zero",
            with(|f| f.limits.max_concurrent_calls = Some(0)),
            "limits.max_concurrent_calls",
        ),
        (
            "over the limit",
            with(|f| f.limits.max_concurrent_calls = Some(1_000_001)),
            "limits.max_concurrent_calls",
        ),
        (
            "no scheme",
            with(|f| f.telemetry.otlp_endpoint = Some("127.0.0.1:4317".into())),
            "telemetry.otlp_endpoint",
        ),
        (
            "https",
            with(|f| f.telemetry.otlp_endpoint = Some("https://collector:4317".into())),
            "telemetry.otlp_endpoint",
        ),
        (
            "no port",
            with(|f| f.telemetry.otlp_endpoint = Some("http://collector".into())),
            "telemetry.otlp_endpoint",
        ),
        (
            "empty",
            with(|f| f.telemetry.otlp_endpoint = Some(String::new())),
            "telemetry.otlp_endpoint",
        ),
        (
            "name without endpoint",
            with(|f| f.telemetry.service_name = Some("pdgate-eu".into())),
            "telemetry.service_name",
        ),
        (
            "interval without endpoint",
            with(|f| f.telemetry.metrics_interval_seconds = Some(10)),
            "telemetry.metrics_interval_seconds",
        ),
        (
            "blank name",
            with(|f| {
                f.telemetry.otlp_endpoint = Some("http://127.0.0.1:4317".into());
                f.telemetry.service_name = Some(" ".into());
            }),
            "telemetry.service_name",
        ),
        (
            "zero",
            with(|f| {
                f.telemetry.otlp_endpoint = Some("http://127.0.0.1:4317".into());
                f.telemetry.metrics_interval_seconds = Some(0);
            }),
            "telemetry.metrics_interval_seconds",
        ),
        (
            "one identity both policy admin and auditor",
            with(|f| {
                f.admin.policy_admin = Some(vec!["sec".into()]);
                f.admin.auditor = Some(vec!["sec".into()]);
            }),
            "admin",
        ),
        (
            "blank identity",
            with(|f| f.admin.operator = Some(vec![" ".into()])),
            "admin.operator",
        ),
        (
            "sqlite path in fleet mode",
            with(|f| {
                f.fleet.database_url = Some("postgres://postgres@127.0.0.1/test".into());
                f.subjects.path = Some("subjects.db".into());
            }),
            "subjects.path",
        ),
        (
            "not a postgres url",
            with(|f| f.fleet.database_url = Some("mysql://db/x".into())),
            "fleet.database_url",
        ),
        (
            "timeout without database",
            with(|f| f.fleet.statement_timeout_ms = Some(100)),
            "fleet.statement_timeout_ms",
        ),
        (
            "zero staleness",
            with(|f| f.subjects.stale_after_ms = Some(0)),
            "subjects.stale_after_ms",
        ),
        (
            "no versions kept",
            with(|f| f.reload.keep_versions = Some(0)),
            "reload.keep_versions",
        ),
        (
            "debounce too short",
            with(|f| f.reload.debounce_ms = Some(1)),
            "reload.debounce_ms",
        ),
        (
            "probe listener not an address",
            with(|f| f.admin_listen = Some("localhost:9091".into())),
            "admin_listen",
        ),
        (
            "probe listener on the API port",
            with(|f| f.admin_listen = Some(DEFAULT_API_LISTEN.into())),
            "admin_listen",
        ),
        (
            "unknown log format",
            with(|f| f.log.format = Some("logfmt".into())),
            "log.format",
        ),
    ];
    for (what, file, key) in cases {
        let err = file.resolve("test.toml").expect_err(what);
        assert_eq!(err.key, key, "{what}: {err}");
        assert_eq!(err.origin, "test.toml", "{what}: {err}");
    }
}

#[test]
fn values_the_example_calls_allowed_resolve() {
    let cases: Vec<(&str, FileConfig)> = vec![
        (
            "port 0 on both",
            with(|f| {
                f.listen = Some("127.0.0.1:0".into());
                f.api_listen = Some("127.0.0.1:0".into());
            }),
        ),
        (
            "all interfaces",
            with(|f| f.listen = Some("0.0.0.0:8443".into())),
        ),
        ("ipv6", with(|f| f.listen = Some("[::1]:8443".into()))),
        ("json logs", with(|f| f.log.format = Some("json".into()))),
        (
            "probe listener",
            with(|f| f.admin_listen = Some("0.0.0.0:9091".into())),
        ),
        ("text logs", with(|f| f.log.format = Some("text".into()))),
        (
            "host name",
            with(|f| f.upstream = Some("customer-data:50051".into())),
        ),
        ("ipv6", with(|f| f.upstream = Some("[::1]:50051".into()))),
        (
            "uri",
            with(|f| f.upstream = Some("http://customer-data:50051".into())),
        ),
        (
            "routes file",
            with(|f| f.routes = Some(policy_dir().join("routes.yaml"))),
        ),
        ("one entry", with(|f| f.cache.max_entries = Some(1))),
        ("one second", with(|f| f.cache.ttl_seconds = Some(1))),
        (
            "1000 years",
            with(|f| f.cache.ttl_seconds = Some(31_536_000_000)),
        ),
        (
            "one call",
            with(|f| f.limits.max_concurrent_calls = Some(1)),
        ),
        (
            "a million calls",
            with(|f| f.limits.max_concurrent_calls = Some(1_000_000)),
        ),
        (
            "no grace",
            with(|f| f.limits.shutdown_grace_seconds = Some(0)),
        ),
        (
            "otlp to a host name, every telemetry key",
            with(|f| {
                f.telemetry.otlp_endpoint = Some("http://otel-collector.monitoring:4317".into());
                f.telemetry.service_name = Some("customer-data-pdgate".into());
                f.telemetry.metrics_interval_seconds = Some(3600);
            }),
        ),
    ];
    for (what, file) in cases {
        if let Err(e) = file.resolve("test.toml") {
            panic!("{what}: {e}");
        }
    }
}

// Values that once passed the check and failed only after the ports were bound.

#[test]
fn a_ttl_beyond_the_cache_limit_is_a_config_error() {
    let err = with(|f| f.cache.ttl_seconds = Some(40_000_000_000))
        .resolve("test.toml")
        .expect_err("over 1000 years");
    assert_eq!(err.key, "cache.ttl_seconds");
}

#[test]
fn an_upstream_that_is_no_uri_is_a_config_error() {
    for upstream in ["customer data:50051", "http://customer data:50051"] {
        let err = with(|f| f.upstream = Some(upstream.into()))
            .resolve("test.toml")
            .expect_err(upstream);
        assert_eq!(err.key, "upstream", "{upstream}");
    }
}

// ---------------------------------------------------------------------------------------------
// The binary

/// Runs `pdgate args` to the end through the one runner (scrubbed environment, time limit,
/// panic detection).
fn run(args: &[&str]) -> Output {
    Pdgate::new(args).output()
}

#[test]
fn serve_checks_the_whole_config_before_binding() {
    // pdgate cannot bind this port while we hold it: a bind attempt exits 1.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let policy = policy_dir().display().to_string();
    // Reserved (bound, not listening) for the whole test: no one else gets it meanwhile.
    let closed = ClosedPort::new().addr.to_string();
    let audit = tempfile::tempdir().unwrap();
    let audit_dir = audit.path().display().to_string();
    // The subject registry too goes to a temporary directory, never the repository.
    let subjects = audit.path().join("subjects.db").display().to_string();
    let serve = |extra: &[&str]| {
        let mut args = vec![
            "serve",
            "--listen",
            &listen,
            "--api-listen",
            "127.0.0.1:0",
            "--policy",
            &policy,
            "--audit",
            &audit_dir,
            "--subjects-store",
            &subjects,
        ];
        args.extend_from_slice(extra);
        run(&args)
    };

    // Control: a good configuration reaches the bind and fails there, with exit 1.
    let out = serve(&["--upstream", &closed]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&listen),
        "the failed bind names the address: {out:?}"
    );

    // A bad flag: exit 2, so the config was rejected before the held port was tried.
    let out = serve(&["--upstream", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("command line: `--upstream`"),
        "the flag is named: {stderr}"
    );

    // A bad key in the file: the same, naming the file and the key.
    let dir = tempfile::tempdir().unwrap();
    let bad = write_config(&dir, "[cache]\nmax_entries = 0\n");
    let bad = bad.display().to_string();
    let out = serve(&["--upstream", &closed, "--config", &bad]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`cache.max_entries`"), "{stderr}");
    assert!(stderr.contains(&bad), "{stderr}");

    // A bad value of another flag: the same, naming the flag. The fleet database is also
    // what the environment's PDGATE_DATABASE_URL stands for in a Kubernetes fleet.
    for (flag, bad) in [
        ("--otlp-endpoint", "collector:4317"),
        ("--database-url", "mysql://db/pdgate"),
        ("--log-format", "logfmt"),
    ] {
        let out = serve(&["--upstream", &closed, flag, bad]);
        assert_eq!(out.status.code(), Some(2), "{flag}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("command line: `{flag}`")),
            "the flag is named: {stderr}"
        );
    }

    // An unknown key: the same, naming the key.
    let unknown = write_config(&dir, "[limits]\nmax_calls = 10\n");
    let out = serve(&["--config", &unknown.display().to_string()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_calls"));
    drop(held);
}

#[test]
fn serve_help_points_to_the_example() {
    let out = run(&["serve", "--help"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("deploy/pdgate.toml"));
    assert!(example().is_file());
}

#[tokio::test]
async fn serve_reports_serving_and_exits_0_on_sigterm() {
    let closed = ClosedPort::new();
    let closed = closed.addr.to_string();
    // A grace far beyond the wait below: an exit within it shows that shutdown did not wait
    // for the idle health connection to close (it would wait the whole grace).
    let grace = Duration::from_secs(120);
    let state = tempfile::tempdir().unwrap();
    let mut child = common::bin::serve(
        &policy_dir(),
        state.path(),
        &[
            "--config",
            "deploy/pdgate.toml",
            "--upstream",
            &closed,
            "--shutdown-grace",
            &format!("{}s", grace.as_secs()),
        ],
    )
    .spawn();
    let (data, api) = child.serving().await;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{api}"))
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("the API port {api} does not answer: {e}"));
    let mut health = HealthClient::new(channel);
    for service in ["", "pdgate.v1.AccessControl"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health check `{service}`: {e}"))
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "`{service}`");
    }
    tokio::net::TcpStream::connect(data)
        .await
        .unwrap_or_else(|e| panic!("the data plane {data} does not listen: {e}"));

    // The health connection stays open: shutdown must not wait on idle connections.
    child.signal("TERM");
    let signalled = Instant::now();
    let out = child.exit_within(IDLE_EXIT_BOUND).await;
    let took = signalled.elapsed();
    println!("exited {took:?} after SIGTERM with an idle connection open (grace {grace:?})");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    drop(health);
}

/// How long `pdgate serve` may take to exit after SIGTERM with only idle connections open: far
/// more than a loaded 2-core machine needs, far less than the grace the test gives it.
const IDLE_EXIT_BOUND: Duration = Duration::from_secs(30);

#[test]
fn tls_files_that_do_not_make_a_tls_configuration_are_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = real_tls_files();
    let write = |name: &str, content: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    };
    let (cert, key, ca, junk) = (
        write("cert.pem", &cert),
        write("key.pem", &key),
        write("ca.pem", &ca),
        write("junk.pem", PLACEHOLDER_PEM),
    );
    let mtls = |cert: &Path, key: &Path, ca: &Path| {
        let (cert, key, ca) = (cert.to_owned(), key.to_owned(), ca.to_owned());
        with(move |f| {
            f.identity = Some("mtls".into());
            f.tls.cert = Some(cert);
            f.tls.key = Some(key);
            f.tls.client_ca = Some(ca);
        })
    };
    assert!(mtls(&cert, &key, &ca).resolve("test.toml").is_ok());
    for (what, file) in [
        ("a certificate that does not parse", mtls(&junk, &key, &ca)),
        ("a key that is a certificate", mtls(&cert, &ca, &ca)),
        ("a client CA that does not parse", mtls(&cert, &key, &junk)),
    ] {
        let err = file.resolve("test.toml").expect_err(what);
        assert_eq!(err.key, "tls", "{what}: {err}");
    }
}
