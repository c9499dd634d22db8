//! A sidecar in front of the demo customer-data service, both in-process on `127.0.0.1:0`,
//! with real sockets and real gRPC clients.

#![allow(
    dead_code,
    reason = "each test file uses a different part of the harness"
)]

pub mod bin;
pub mod logs;
pub mod pg;
pub mod ports;
pub mod raw;
pub mod tls;
pub mod wait;

use pdgate::audit::{AuditLog, AuditSettings, AuditWriter};
use pdgate::config::{Config, ReloadSettings, SubjectsSettings, TlsFiles};
use pdgate::decision::CacheSettings;
use pdgate::demo::customer::CustomerService;
use pdgate::demo::walkthrough::demo_subjects;
use pdgate::gate::Subjects;
use pdgate::identity::IdentityMode;
use pdgate::identity::{AdminRole, AdminRoles};
use pdgate::proto::demo::customer_data_client::CustomerDataClient;
use pdgate::server::{self, Listeners, ServeError};
use pdgate::telemetry::TelemetrySettings;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

pub fn policy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policy")
}

pub struct Harness {
    pub service: CustomerService,
    pub upstream_addr: SocketAddr,
    pub data_addr: SocketAddr,
    pub api_addr: SocketAddr,
    stop: watch::Sender<bool>,
    pub sidecar: Option<JoinHandle<Result<(), ServeError>>>,
    upstream: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    pub audit_dir: PathBuf,
    /// The sidecar's audit log (a handle on the same writer): for what only it can tell, such
    /// as how many `Tail` calls have subscribed.
    pub audit: AuditLog,
    /// The running core, for state no API shows without being audited (the active policy
    /// when the audit log is broken).
    pub gate: Arc<pdgate::gate::Gate>,
    audit_writer: Option<AuditWriter>,
    /// A second handle on the data plane's listening socket, when
    /// [`Options::data_listener_handle`] asked for it.
    data_listener: Option<std::net::TcpListener>,
    /// Keeps the temporary audit directory (when the test did not choose one).
    _audit_tmp: Option<tempfile::TempDir>,
    /// Keeps the upstream's port reserved when the upstream is down.
    _closed_upstream: Option<ports::ClosedPort>,
}

pub struct Options {
    pub policy: PathBuf,
    /// Start the upstream service (false: the upstream address is a closed port).
    pub upstream_up: bool,
    /// An upstream the test runs itself (a silent one, say): when set, no demo service is
    /// started and `upstream_up` is not read.
    pub upstream: Option<SocketAddr>,
    pub max_concurrent_calls: usize,
    /// `[limits]`. Default: `Limits::default()`.
    pub limits: pdgate::config::Limits,
    pub shutdown_grace: Duration,
    /// `Some`: identity mode mTLS with these files.
    pub tls: Option<TlsFiles>,
    /// `Some` (and no `tls`): identity mode mesh.
    pub mesh: Option<pdgate::identity::MeshIdentity>,
    /// `None`: a fresh temporary directory with the default settings.
    pub audit: Option<AuditSettings>,
    /// Off by default (no OTLP endpoint): `/metrics` only.
    pub telemetry: TelemetrySettings,
    /// Default: [`test_admin_roles`].
    pub admin_roles: AdminRoles,
    /// Where subject state comes from. Default: the demo's subjects, in memory.
    pub subjects: SubjectsChoice,
    /// `[subjects] stale_after_ms` with a registry.
    pub stale_after: Duration,
    /// `[reload]`. Default: no file watch (the policy directory is the repository's).
    pub reload: ReloadSettings,
    /// Keep a second handle on the data plane's listening socket (which then stays bound
    /// until the harness is dropped). Default: no.
    pub data_listener_handle: bool,
}

/// Where a harness's sidecar reads subject state.
#[derive(Debug, Clone, Default)]
pub enum SubjectsChoice {
    /// `demo_subjects()` in memory; no registry (SubjectRights answers FAILED_PRECONDITION).
    #[default]
    Demo,
    /// The embedded registry in this SQLite file, as `pdgate serve` opens it.
    Sqlite(PathBuf),
    /// Fleet mode on this PostgreSQL URL, as `pdgate serve` connects to it.
    Postgres(String),
    /// Fleet mode with these settings (pool, change feed, application name).
    Fleet(pdgate::config::FleetSettings),
}

/// The admin identities of the tests: `security-team` (policy-admin), `audit-team` (auditor),
/// `sre` (operator), `privacy-office` (privacy-office). Anyone else holds no role.
pub fn test_admin_roles() -> AdminRoles {
    let one = |name: &str| vec![name.to_owned()];
    let (admins, auditors, operators, privacy) = (
        one("security-team"),
        one("audit-team"),
        one("sre"),
        one("privacy-office"),
    );
    AdminRoles::new([
        (AdminRole::PolicyAdmin, admins.as_slice()),
        (AdminRole::Auditor, auditors.as_slice()),
        (AdminRole::Operator, operators.as_slice()),
        (AdminRole::PrivacyOffice, privacy.as_slice()),
    ])
    .unwrap()
}

impl Default for Options {
    fn default() -> Self {
        Self {
            policy: policy_dir(),
            upstream_up: true,
            upstream: None,
            max_concurrent_calls: 64,
            limits: pdgate::config::Limits::default(),
            shutdown_grace: Duration::from_secs(10),
            tls: None,
            mesh: None,
            audit: None,
            telemetry: TelemetrySettings::default(),
            admin_roles: test_admin_roles(),
            subjects: SubjectsChoice::Demo,
            stale_after: Duration::from_secs(5),
            reload: ReloadSettings {
                watch: false,
                ..ReloadSettings::default()
            },
            data_listener_handle: false,
        }
    }
}

impl Harness {
    pub async fn start() -> Self {
        Self::with(Options::default()).await
    }

    pub async fn with(options: Options) -> Self {
        let service = CustomerService::new();
        let (stop, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let (upstream, upstream_addr, closed_upstream) = if let Some(addr) = options.upstream {
            (None, addr, None)
        } else if options.upstream_up {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let task = tokio::spawn(service.clone().serve(listener, stopped(stop_rx.clone())));
            (Some(task), addr, None)
        } else {
            // Reserved for the harness's life and refusing connections.
            let closed = ports::ClosedPort::new();
            (None, closed.addr, Some(closed))
        };
        let listeners = Listeners::bind(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        let data_addr = listeners.data_addr().unwrap();
        let api_addr = listeners.api_addr().unwrap();
        let data_listener = options.data_listener_handle.then(|| {
            use std::os::fd::AsFd;
            std::net::TcpListener::from(listeners.data.as_fd().try_clone_to_owned().unwrap())
        });
        let (audit_settings, audit_tmp) = match options.audit {
            Some(settings) => (settings, None),
            None => {
                let tmp = tempfile::tempdir().unwrap();
                (AuditSettings::new(tmp.path()), Some(tmp))
            }
        };
        let audit_dir = audit_settings.dir.clone();
        let (audit, audit_writer, _) = AuditLog::open(audit_settings.clone()).unwrap();
        let config = Config {
            listen: data_addr,
            api_listen: api_addr,
            upstream: upstream_addr.to_string(),
            policy: options.policy,
            routes: None,
            identity: if options.tls.is_some() {
                IdentityMode::Mtls
            } else if options.mesh.is_some() {
                IdentityMode::Mesh
            } else {
                IdentityMode::InsecureHeader
            },
            tls: options.tls,
            mesh: options.mesh,
            cache: CacheSettings::default(),
            max_concurrent_calls: options.max_concurrent_calls,
            limits: options.limits,
            shutdown_grace: options.shutdown_grace,
            audit: audit_settings,
            telemetry: options.telemetry,
            admin_roles: options.admin_roles,
            subjects: SubjectsSettings {
                path: match &options.subjects {
                    SubjectsChoice::Sqlite(path) => path.clone(),
                    _ => SubjectsSettings::default().path,
                },
                stale_after: options.stale_after,
                ..SubjectsSettings::default()
            },
            fleet: match &options.subjects {
                SubjectsChoice::Postgres(url) => Some(pdgate::config::FleetSettings::new(url)),
                SubjectsChoice::Fleet(settings) => Some(settings.clone()),
                _ => None,
            },
            reload: options.reload,
            log_format: Default::default(),
            admin_listen: None,
        };
        let policy = server::load_policy(&config).await;
        let subjects = match options.subjects {
            SubjectsChoice::Demo => Subjects::Fixed(Arc::new(demo_subjects())),
            SubjectsChoice::Sqlite(_) | SubjectsChoice::Postgres(_) | SubjectsChoice::Fleet(_) => {
                Subjects::Registry(server::open_subject_cache(&config).await.unwrap())
            }
        };
        let gate = server::gate(&config, policy, subjects, audit.clone()).unwrap();
        let sidecar_stop = stopped(stop_rx);
        let running = gate.clone();
        let sidecar =
            tokio::spawn(
                async move { server::run(&config, listeners, running, sidecar_stop).await },
            );
        Self {
            service,
            upstream_addr,
            data_addr,
            api_addr,
            stop,
            sidecar: Some(sidecar),
            upstream,
            audit_dir,
            audit,
            gate,
            audit_writer: Some(audit_writer),
            data_listener,
            _audit_tmp: audit_tmp,
            _closed_upstream: closed_upstream,
        }
    }

    pub async fn channel(&self, addr: SocketAddr) -> Channel {
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A client of the demo service, through the sidecar.
    pub async fn client(&self) -> CustomerDataClient<Channel> {
        CustomerDataClient::new(self.channel(self.data_addr).await)
    }

    /// A client of the demo service, directly (no sidecar).
    pub async fn direct_client(&self) -> CustomerDataClient<Channel> {
        CustomerDataClient::new(self.channel(self.upstream_addr).await)
    }

    /// Signals shutdown; returns what the sidecar's `run` returned.
    pub async fn shutdown(&mut self) -> Result<(), ServeError> {
        // `send_replace`: the signal is set even when every receiver is gone already.
        self.stop.send_replace(true);
        let result = match self.sidecar.take() {
            Some(task) => task.await.unwrap(),
            None => Ok(()),
        };
        if let Some(upstream) = self.upstream.take() {
            upstream
                .await
                .unwrap()
                .expect("the upstream service stops cleanly");
        }
        if let Some(writer) = self.audit_writer.take() {
            writer.close().await;
        }
        result
    }

    /// Every audit record written so far.
    pub fn audit_records(&self) -> Vec<pdgate::audit::AuditRecord> {
        let mut all = Vec::new();
        pdgate::audit::read::scan(&self.audit_dir, &Default::default(), |r| {
            all.push(r);
            true
        })
        .unwrap();
        all
    }

    /// The audit record of decision `id`; fails the test when the log holds none.
    pub fn audit_record(&self, id: &str) -> pdgate::audit::AuditRecord {
        self.audit_records()
            .into_iter()
            .find(|r| r.body.decision_id == id)
            .unwrap_or_else(|| panic!("no audit record of decision {id}"))
    }

    /// A second handle on the data plane's listening socket, for a test to shut it down
    /// under the running sidecar ([`Options::data_listener_handle`]).
    pub fn data_listener_handle(&self) -> std::net::TcpListener {
        self.data_listener
            .as_ref()
            .expect("start the harness with `data_listener_handle: true`")
            .try_clone()
            .unwrap()
    }

    pub fn signal_shutdown(&self) {
        self.stop.send_replace(true);
    }
}

/// A request with the metadata the sidecar reads.
pub fn call<T>(message: T, caller: &str, purpose: &str, subjects: &[&str]) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let md = request.metadata_mut();
    md.insert("x-caller", MetadataValue::try_from(caller).unwrap());
    if !purpose.is_empty() {
        md.insert("x-purpose", MetadataValue::try_from(purpose).unwrap());
    }
    for s in subjects {
        md.append("x-data-subject", MetadataValue::try_from(*s).unwrap());
    }
    request
}

/// The first reason code of a denial (`google.rpc.ErrorInfo.reason`).
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

pub fn decision_id(md: &tonic::metadata::MetadataMap) -> Option<String> {
    md.get("x-pdgate-decision-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A copy of the repository's policy directory (tests included) in a temporary directory, for
/// tests that change the policy (Apply writes into the directory).
pub fn policy_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&policy_dir(), tmp.path());
    tmp
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A `PolicyAdmin` client claiming `identity` (`x-caller`; empty: no identity).
pub async fn policy_admin(
    harness: &Harness,
    identity: &str,
) -> pdgate::proto::v1::policy_admin_client::PolicyAdminClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone + use<>,
    >,
> {
    let channel = harness.channel(harness.api_addr).await;
    let identity = identity.to_owned();
    pdgate::proto::v1::policy_admin_client::PolicyAdminClient::with_interceptor(
        channel,
        move |mut request: tonic::Request<()>| {
            if !identity.is_empty() {
                request.metadata_mut().insert(
                    "x-caller",
                    MetadataValue::try_from(identity.as_str()).unwrap(),
                );
            }
            Ok(request)
        },
    )
}

/// A directory made read-only for the guard's life, in a way that holds for root too:
/// permission bits first (enough for anyone else), then, when a write still succeeds (root
/// ignores permission bits), the immutable attribute (`chattr +i`, which stops root; it needs
/// a file system that has it, as ext4 does). Fails the test, rather than passing vacuously,
/// when neither makes the directory refuse a write.
pub struct ReadOnly {
    dir: PathBuf,
    immutable: bool,
}

impl ReadOnly {
    pub fn new(dir: &Path) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let mut guard = Self {
            dir: dir.to_owned(),
            immutable: false,
        };
        for path in walk(dir) {
            let mode = if path.is_dir() { 0o555 } else { 0o444 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        if guard.writable() {
            let out = std::process::Command::new("chattr")
                .arg("-R")
                .arg("+i")
                .arg(dir)
                .output()
                .expect("run chattr");
            guard.immutable = true;
            assert!(
                out.status.success(),
                "cannot make {} read-only for root: chattr +i failed: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(!guard.writable(), "{} is still writable", dir.display());
        guard
    }

    /// Whether a new file can be created in the directory (removed again if so).
    fn writable(&self) -> bool {
        let probe = self.dir.join(".pdgate-write-probe");
        match std::fs::write(&probe, b"x") {
            Ok(()) => {
                std::fs::remove_file(&probe).unwrap();
                true
            }
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::PermissionDenied
                            | std::io::ErrorKind::ReadOnlyFilesystem
                    ),
                    "{e}"
                );
                false
            }
        }
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        if self.immutable {
            let undone = std::process::Command::new("chattr")
                .arg("-R")
                .arg("-i")
                .arg(&self.dir)
                .status();
            assert!(
                undone.is_ok_and(|s| s.success()) || std::thread::panicking(),
                "chattr -i {} failed",
                self.dir.display()
            );
        }
        for path in walk(&self.dir) {
            let mode = if path.is_dir() { 0o755 } else { 0o644 };
            // Best effort while unwinding; the temporary directory is removed after this.
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
        }
    }
}

/// `dir` and everything under it.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![dir.to_owned()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                all.extend(walk(&path));
            } else {
                all.push(path);
            }
        }
    }
    all
}

/// `GET /metrics` of the harness's API port, over HTTP/1: the whole response.
pub async fn scrape(h: &Harness) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(h.api_addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: pdgate\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

/// `billing-service` reading `subject`'s billing statement for `service.billing` (allowed by
/// the default policy for every demo subject that has not suspended use).
pub fn billing_call(
    subject: &str,
) -> tonic::Request<pdgate::proto::demo::GetBillingStatementRequest> {
    call(
        pdgate::proto::demo::GetBillingStatementRequest {
            customer_id: subject.into(),
            month: String::new(),
        },
        "billing-service",
        "service.billing",
        &[subject],
    )
}
