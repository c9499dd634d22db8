//! `pdgate serve` configuration: a TOML file (every key documented in `deploy/pdgate.toml`,
//! unknown keys rejected) with command-line flags on top. The whole configuration is checked
//! before any port is bound; a bad one names the key and what is allowed.

use crate::audit::{AuditSettings, Fsync, Overflow};
use crate::decision::CacheSettings;
use crate::identity::IdentityMode;
use crate::identity::{AdminRole, AdminRoles};
use crate::identity::{MeshHeader, MeshIdentity};
use crate::telemetry::TelemetrySettings;
use crate::telemetry::logs::LogFormat;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:9090";
/// The probe listener's example address (it is off unless configured).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9091";
pub const DEFAULT_UPSTREAM: &str = "127.0.0.1:50051";

/// The configuration file, as written. Every field is optional: flags and defaults fill in.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub api_listen: Option<String>,
    pub admin_listen: Option<String>,
    pub upstream: Option<String>,
    pub policy: Option<PathBuf>,
    pub routes: Option<PathBuf>,
    pub identity: Option<String>,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub cache: CacheSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub audit: AuditSection,
    #[serde(default)]
    pub telemetry: TelemetrySection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub subjects: SubjectsSection,
    #[serde(default)]
    pub fleet: FleetSection,
    #[serde(default)]
    pub reload: ReloadSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub mesh: MeshSection,
}

/// `identity = "mesh"`: the caller is named by the service mesh's proxy in the pod, in its
/// verified-peer header, on connections from that proxy only (see `identity::mesh`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSection {
    /// `x-forwarded-client-cert` (Envoy, Istio) or `l5d-client-id` (Linkerd).
    pub header: Option<String>,
    /// The IP addresses the local proxy connects to pdgate from.
    pub proxies: Option<Vec<String>>,
    /// With `x-forwarded-client-cert`: the peer URI SAN is `<uri_prefix><caller>`.
    pub uri_prefix: Option<String>,
    /// With `l5d-client-id`: the client id is `<caller>.<dns_suffix>`.
    pub dns_suffix: Option<String>,
}

/// pdgate's own log on stderr. Which events are written is `PDGATE_LOG` (an environment
/// variable: a filter is wanted for one run, not kept in the file).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `text` or `json`.
    pub format: Option<String>,
}

/// The subject registry as decisions read it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectsSection {
    /// The embedded SQLite registry (created on first run); not with `[fleet]`.
    pub path: Option<PathBuf>,
    /// How old a cached subject state may be, while the store cannot be read, before
    /// subject-dependent decisions are denied `SUBJECT_STATE_UNAVAILABLE`.
    pub stale_after_ms: Option<u64>,
    /// Subjects whose state is kept in memory.
    pub cache_max_entries: Option<u64>,
}

/// PostgreSQL shared by a fleet of sidecars: policy versions and the subject registry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    pub database_url: Option<String>,
    /// Longest a statement may run before it is cancelled (and the read counts as failed).
    pub statement_timeout_ms: Option<u64>,
    /// Most connections one sidecar opens (the change feed's included).
    pub max_connections: Option<u32>,
    /// A pooled connection unused this long is closed.
    pub idle_timeout_ms: Option<u64>,
    /// How changes reach the sidecar: `listen` (LISTEN/NOTIFY, direct to PostgreSQL) or `poll`
    /// (a cursor over the change table, through a transaction-mode pooler).
    pub change_feed: Option<String>,
    /// With `change_feed = "poll"`: how often the change table is read.
    pub poll_interval_ms: Option<u64>,
    /// `application_name` of the sidecar's connections (`pg_stat_activity` shows it).
    pub application_name: Option<String>,
}

/// Reloading the policy without a restart.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadSection {
    /// Watch the policy directory and reload when its files change.
    pub watch: Option<bool>,
    /// Wait for the files to be quiet this long before reloading (editors write in steps).
    pub debounce_ms: Option<u64>,
    /// Versions kept for `Rollback`, the active one included.
    pub keep_versions: Option<usize>,
}

/// The subject registry, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectsSettings {
    /// The SQLite file; unused in fleet mode.
    pub path: PathBuf,
    pub stale_after: Duration,
    pub cache_max_entries: u64,
}

impl Default for SubjectsSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("subjects.db"),
            stale_after: Duration::from_secs(5),
            cache_max_entries: 100_000,
        }
    }
}

// Fleet mode's settings are the registry's (it opens the pool and the change feed); the
// configuration resolves them.
pub use crate::registry::feed::{
    ChangeFeed, DEFAULT_FLEET_APPLICATION_NAME, DEFAULT_FLEET_IDLE_TIMEOUT,
    DEFAULT_FLEET_MAX_CONNECTIONS, DEFAULT_FLEET_POLL_INTERVAL, FleetSettings,
};

/// Policy reloads, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadSettings {
    pub watch: bool,
    pub debounce: Duration,
    pub keep_versions: usize,
}

impl Default for ReloadSettings {
    fn default() -> Self {
        Self {
            watch: true,
            debounce: Duration::from_millis(500),
            keep_versions: 10,
        }
    }
}

/// Who holds the administrative roles of the API port (see `api::admin`). Each key lists the
/// identities (caller names, as certificates or `x-caller` give them) holding that role.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub policy_admin: Option<Vec<String>>,
    pub auditor: Option<Vec<String>>,
    pub operator: Option<Vec<String>>,
    pub privacy_office: Option<Vec<String>>,
}

/// OpenTelemetry export (off unless `otlp_endpoint` is set). `/metrics` on the API port is
/// always served and needs no key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    /// An OTLP/gRPC collector, `http://HOST:PORT`.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans and metrics.
    pub service_name: Option<String>,
    /// Seconds between metric exports.
    pub metrics_interval_seconds: Option<u64>,
    /// Export every audit record, once written, as an OTLP log record.
    pub export_audit: Option<bool>,
}

/// The audit trail.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Directory of the audit log (created if missing).
    pub dir: Option<PathBuf>,
    /// `batch` (sync every batch before answering) or `interval`.
    pub fsync: Option<String>,
    /// With `fsync = "interval"`: sync at most this long after a write.
    pub fsync_interval_ms: Option<u64>,
    /// `deny` (a full queue denies the call) or `wait`.
    pub on_full: Option<String>,
    /// With `on_full = "wait"`: how long a call waits for room before it is denied.
    pub wait_ms: Option<u64>,
    pub queue_capacity: Option<usize>,
    pub batch_max: Option<usize>,
    pub segment_max_mib: Option<u64>,
    /// Sealed segments kept besides the active one (default: all).
    pub retain_segments: Option<usize>,
    /// Sealed segments whose last record is older than this many days are deleted (default:
    /// never).
    pub retain_days: Option<u64>,
}

/// TLS of the data plane and the API port; required by `identity = "mtls"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain pdgate presents.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA certificates that sign the callers' client certificates.
    pub client_ca: Option<PathBuf>,
    /// A caller is named by a URI SAN starting with this prefix (the rest is the caller id).
    pub uri_prefix: Option<String>,
    /// Or by a DNS SAN `<caller>` or `<caller>.<dns_suffix>`.
    pub dns_suffix: Option<String>,
    /// How often the three files are read again, for certificate rotation.
    pub reload_interval_ms: Option<u64>,
}

pub use crate::transport::TlsFiles;
pub use crate::transport::limits::Limits;

fn resolve_audit(
    a: AuditSection,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<AuditSettings, ConfigError> {
    let mut settings = AuditSettings::new(a.dir.unwrap_or_else(|| PathBuf::from("audit")));
    settings.fsync = match a.fsync.as_deref().unwrap_or("batch") {
        "batch" => {
            if a.fsync_interval_ms.is_some() {
                return Err(err(
                    "audit.fsync_interval_ms",
                    "applies only with `fsync = \"interval\"`".into(),
                ));
            }
            Fsync::EveryBatch
        }
        "interval" => {
            let ms = a.fsync_interval_ms.unwrap_or(100);
            if ms == 0 || ms > 60_000 {
                return Err(err(
                    "audit.fsync_interval_ms",
                    format!("`{ms}` is out of range; allowed: 1 to 60000"),
                ));
            }
            Fsync::Interval(Duration::from_millis(ms))
        }
        other => {
            return Err(err(
                "audit.fsync",
                format!("`{other}` is not a sync policy; allowed: `batch`, `interval`"),
            ));
        }
    };
    settings.overflow = match a.on_full.as_deref().unwrap_or("deny") {
        "deny" => {
            if a.wait_ms.is_some() {
                return Err(err(
                    "audit.wait_ms",
                    "applies only with `on_full = \"wait\"`".into(),
                ));
            }
            Overflow::Deny
        }
        "wait" => {
            let ms = a.wait_ms.unwrap_or(1000);
            if ms == 0 || ms > 60_000 {
                return Err(err(
                    "audit.wait_ms",
                    format!("`{ms}` is out of range; allowed: 1 to 60000"),
                ));
            }
            Overflow::Wait(Duration::from_millis(ms))
        }
        other => {
            return Err(err(
                "audit.on_full",
                format!("`{other}` is not allowed; allowed: `deny`, `wait`"),
            ));
        }
    };
    if let Some(n) = a.queue_capacity {
        if n == 0 || n > 10_000_000 {
            return Err(err(
                "audit.queue_capacity",
                format!("`{n}` is out of range; allowed: 1 to 10000000"),
            ));
        }
        settings.queue_capacity = n;
    }
    if let Some(n) = a.batch_max {
        if n == 0 || n > 100_000 {
            return Err(err(
                "audit.batch_max",
                format!("`{n}` is out of range; allowed: 1 to 100000"),
            ));
        }
        settings.batch_max = n;
    }
    if let Some(n) = a.segment_max_mib {
        if n == 0 || n > 1_048_576 {
            return Err(err(
                "audit.segment_max_mib",
                format!("`{n}` is out of range; allowed: 1 to 1048576"),
            ));
        }
        settings.segment_max_bytes = n * 1024 * 1024;
    }
    if let Some(n) = a.retain_segments {
        if n == 0 || n > 1_000_000 {
            return Err(err(
                "audit.retain_segments",
                format!("`{n}` is out of range; allowed: 1 to 1000000 (leave it out to keep all)"),
            ));
        }
        settings.retention.segments = Some(n);
    }
    if let Some(days) = a.retain_days {
        if days == 0 || days > 36_500 {
            return Err(err(
                "audit.retain_days",
                format!("`{days}` is out of range; allowed: 1 to 36500 (leave it out to keep all)"),
            ));
        }
        settings.retention.max_age = Some(Duration::from_secs(days * 86_400));
    }
    Ok(settings)
}

fn resolve_telemetry(
    t: TelemetrySection,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<TelemetrySettings, ConfigError> {
    let mut settings = TelemetrySettings::default();
    let Some(endpoint) = t.otlp_endpoint else {
        // Without an endpoint nothing is exported: a name or an interval would do nothing,
        // and was most likely meant to come with an endpoint that is missing.
        for (key, given) in [
            ("telemetry.service_name", t.service_name.is_some()),
            (
                "telemetry.metrics_interval_seconds",
                t.metrics_interval_seconds.is_some(),
            ),
            ("telemetry.export_audit", t.export_audit == Some(true)),
        ] {
            if given {
                return Err(err(key, "applies only with `otlp_endpoint`".into()));
            }
        }
        return Ok(settings);
    };
    if !otlp_endpoint_is_valid(&endpoint) {
        return Err(err(
            "telemetry.otlp_endpoint",
            format!(
                "`{endpoint}` is not an http:// URI with a host and a port, e.g. `http://127.0.0.1:4317` (OTLP over gRPC; https is not supported: run the collector on loopback or in the pod)"
            ),
        ));
    }
    settings.otlp_endpoint = Some(endpoint);
    settings.export_audit = t.export_audit.unwrap_or(false);
    if let Some(name) = t.service_name {
        if name.trim().is_empty() || name.len() > 255 {
            return Err(err(
                "telemetry.service_name",
                format!("`{name}` is not allowed; allowed: 1 to 255 characters, not all blank"),
            ));
        }
        settings.service_name = name;
    }
    if let Some(seconds) = t.metrics_interval_seconds {
        if seconds == 0 || seconds > 3600 {
            return Err(err(
                "telemetry.metrics_interval_seconds",
                format!("`{seconds}` is out of range; allowed: 1 to 3600"),
            ));
        }
        settings.metrics_interval = Duration::from_secs(seconds);
    }
    Ok(settings)
}

/// `http://host:port` (a path is allowed; the exporter adds none for gRPC).
fn otlp_endpoint_is_valid(endpoint: &str) -> bool {
    endpoint.starts_with("http://")
        && endpoint
            .parse::<http::Uri>()
            .is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty()) && u.port_u16().is_some())
        && tonic::transport::Endpoint::from_shared(endpoint.to_owned()).is_ok()
}

/// moka refuses a time-to-live over 1000 years.
const MAX_CACHE_TTL: Duration = Duration::from_secs(1000 * 365 * 24 * 3600);

/// `host:port`, or an `http://` URI that tonic can connect to.
fn upstream_is_valid(upstream: &str) -> bool {
    let uri = if upstream.contains("://") {
        if !upstream.starts_with("http://") {
            return false;
        }
        upstream.to_owned()
    } else {
        let has_port = upstream
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !has_port {
            return false;
        }
        format!("http://{upstream}")
    };
    uri.parse::<http::Uri>()
        .is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty()))
}

use crate::transport::tls::error_chain;

/// Default URI SAN prefix for callers: `spiffe://pdgate.local/caller/<caller>`.
pub const DEFAULT_URI_PREFIX: &str = "spiffe://pdgate.local/caller/";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    pub max_entries: Option<u64>,
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub max_concurrent_calls: Option<usize>,
    pub shutdown_grace_seconds: Option<u64>,
    // The bounds of `transport::Limits`; each documented (with its default) there.
    pub response_timeout_seconds: Option<u64>,
    pub keepalive_interval_seconds: Option<u64>,
    pub keepalive_timeout_seconds: Option<u64>,
    pub max_streams_per_connection: Option<u32>,
    pub max_calls_per_caller: Option<usize>,
    pub idle_timeout_seconds: Option<u64>,
    pub handshake_timeout_seconds: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_header_bytes: Option<u32>,
    pub inspect_message_bytes: Option<usize>,
    pub check_callers: Option<Vec<String>>,
    pub check_max_categories: Option<usize>,
    pub check_max_subjects: Option<usize>,
    pub check_max_batch: Option<usize>,
    pub check_max_value_bytes: Option<usize>,
}

/// Checks `[limits]`' bounds and fills in their defaults; `max_concurrent_calls` (already
/// checked) sets the default share of one caller.
fn resolve_limits(
    section: &LimitsSection,
    max_concurrent_calls: usize,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Limits, ConfigError> {
    const DAY: u64 = 86_400;
    let defaults = Limits::default();
    let seconds = |key: &str, value: Option<u64>, default: Duration, min: u64, max: u64| {
        value.map_or(Ok(default), |v| {
            in_range(&format!("limits.{key}"), v, min, max, err).map(Duration::from_secs)
        })
    };
    let count = |key: &str, value: Option<usize>, default: usize, max: usize| {
        value.map_or(Ok(default), |v| {
            in_range(&format!("limits.{key}"), v as u64, 1, max as u64, err).map(|_| v)
        })
    };
    let keepalive_interval = seconds(
        "keepalive_interval_seconds",
        section.keepalive_interval_seconds,
        defaults.keepalive_interval,
        1,
        DAY,
    )?;
    let keepalive_timeout = seconds(
        "keepalive_timeout_seconds",
        section.keepalive_timeout_seconds,
        defaults.keepalive_timeout,
        1,
        DAY,
    )?;
    let max_calls_per_caller = count(
        "max_calls_per_caller",
        section.max_calls_per_caller,
        max_concurrent_calls.div_ceil(4),
        max_concurrent_calls,
    )
    .map_err(|e| ConfigError {
        message: format!("{} (at most `max_concurrent_calls`)", e.message),
        ..e
    })?;
    let check_callers = match &section.check_callers {
        None => None,
        Some(callers) => {
            if let Some(bad) = callers
                .iter()
                .find(|c| c.is_empty() || c.trim() != c.as_str())
            {
                return Err(err(
                    "limits.check_callers",
                    format!("`{bad}` is not a caller name (empty, or surrounded by whitespace)"),
                ));
            }
            Some(callers.clone())
        }
    };
    Ok(Limits {
        response_timeout: seconds(
            "response_timeout_seconds",
            section.response_timeout_seconds,
            defaults.response_timeout,
            1,
            DAY,
        )?,
        keepalive_interval,
        keepalive_timeout,
        max_streams_per_connection: count(
            "max_streams_per_connection",
            section.max_streams_per_connection.map(|v| v as usize),
            defaults.max_streams_per_connection as usize,
            1_000_000,
        )? as u32,
        max_calls_per_caller,
        idle_timeout: seconds(
            "idle_timeout_seconds",
            section.idle_timeout_seconds,
            defaults.idle_timeout,
            1,
            DAY,
        )?,
        handshake_timeout: seconds(
            "handshake_timeout_seconds",
            section.handshake_timeout_seconds,
            defaults.handshake_timeout,
            1,
            3_600,
        )?,
        max_connections: count(
            "max_connections",
            section.max_connections,
            defaults.max_connections,
            1_000_000,
        )?,
        max_header_bytes: section
            .max_header_bytes
            .map_or(Ok(defaults.max_header_bytes), |v| {
                in_range("limits.max_header_bytes", u64::from(v), 1024, 1 << 24, err).map(|_| v)
            })?,
        inspect_message_bytes: section.inspect_message_bytes.map_or(
            Ok(defaults.inspect_message_bytes),
            |v| {
                let bytes = u64::try_from(v).unwrap_or(u64::MAX);
                in_range("limits.inspect_message_bytes", bytes, 1024, 1 << 26, err).map(|_| v)
            },
        )?,
        check_callers,
        check_max_categories: count(
            "check_max_categories",
            section.check_max_categories,
            defaults.check_max_categories,
            100_000,
        )?,
        check_max_subjects: count(
            "check_max_subjects",
            section.check_max_subjects,
            defaults.check_max_subjects,
            100_000,
        )?,
        check_max_batch: count(
            "check_max_batch",
            section.check_max_batch,
            defaults.check_max_batch,
            100_000,
        )?,
        check_max_value_bytes: count(
            "check_max_value_bytes",
            section.check_max_value_bytes,
            defaults.check_max_value_bytes,
            65_536,
        )?,
    })
}

/// The checked configuration the sidecar runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub api_listen: SocketAddr,
    /// The plaintext probe listener (`/metrics`, `/livez`, `/readyz`); `None`: off.
    pub admin_listen: Option<SocketAddr>,
    /// `host:port` or an `http://` URI.
    pub upstream: String,
    pub policy: PathBuf,
    pub routes: Option<PathBuf>,
    pub identity: IdentityMode,
    /// Present exactly when `identity` is `Mtls`.
    pub tls: Option<TlsFiles>,
    /// Present exactly when `identity` is `Mesh`.
    pub mesh: Option<MeshIdentity>,
    pub cache: CacheSettings,
    pub max_concurrent_calls: usize,
    pub shutdown_grace: Duration,
    /// The other `[limits]` bounds.
    pub limits: Limits,
    pub audit: AuditSettings,
    pub telemetry: TelemetrySettings,
    /// Who may call the admin services; nobody by default.
    pub admin_roles: AdminRoles,
    pub subjects: SubjectsSettings,
    /// `Some`: fleet mode (PostgreSQL); `None`: embedded (files and SQLite).
    pub fleet: Option<FleetSettings>,
    pub reload: ReloadSettings,
    pub log_format: LogFormat,
}

/// A configuration problem: which key, what was wrong, what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: `{key}`: {message}")]
pub struct ConfigError {
    /// The file, or `command line`.
    pub origin: String,
    pub key: String,
    pub message: String,
}

impl FileConfig {
    /// Reads `path`; a syntax error or an unknown key names its line.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: "command line".into(),
            key: "--config".into(),
            message: format!("cannot read `{origin}`: {e}"),
        })?;
        toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| crate::policy::line_of(&text, s.start))
                .map_or(String::new(), |l| format!(" (line {l})"));
            let message = e.message().trim();
            // serde names an unknown key as "unknown field `name`, expected ...".
            let key = message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split_once('`'))
                .map_or("config", |(name, _)| name);
            ConfigError {
                origin,
                key: key.into(),
                message: format!("{message}{line}"),
            }
        })
    }

    /// Checks every value and fills in the defaults.
    pub fn resolve(self, origin: &str) -> Result<Config, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            origin: origin.to_owned(),
            key: key.to_owned(),
            message,
        };
        let addr =
            |key: &str, value: Option<String>, default: &str| -> Result<SocketAddr, ConfigError> {
                let value = value.unwrap_or_else(|| default.to_owned());
                value.parse().map_err(|_| {
                    err(
                        key,
                        format!(
                            "`{value}` is not a socket address; expected IP:PORT, e.g. `{default}`"
                        ),
                    )
                })
            };
        let listen = addr("listen", self.listen, DEFAULT_LISTEN)?;
        let api_listen = addr("api_listen", self.api_listen, DEFAULT_API_LISTEN)?;
        if same_port(listen, api_listen) {
            return Err(err(
                "api_listen",
                format!(
                    "`{api_listen}` is also the data-plane address (`listen`); give them different ports"
                ),
            ));
        }
        let admin_listen = match self.admin_listen {
            None => None,
            Some(value) => {
                let admin = addr("admin_listen", Some(value), DEFAULT_ADMIN_LISTEN)?;
                for (other, taken) in [("listen", listen), ("api_listen", api_listen)] {
                    if same_port(admin, taken) {
                        return Err(err(
                            "admin_listen",
                            format!(
                                "`{admin}` is also the address of `{other}`; give them different ports"
                            ),
                        ));
                    }
                }
                Some(admin)
            }
        };
        let upstream = self.upstream.unwrap_or_else(|| DEFAULT_UPSTREAM.to_owned());
        if !upstream_is_valid(&upstream) {
            return Err(err(
                "upstream",
                format!(
                    "`{upstream}` is not HOST:PORT or an http:// URI, e.g. `{DEFAULT_UPSTREAM}`"
                ),
            ));
        }
        let policy = self.policy.unwrap_or_else(|| PathBuf::from("policy"));
        if !policy.is_dir() {
            return Err(err(
                "policy",
                format!(
                    "`{}` is not a directory holding model.conf, policy.csv and taxonomy.toml",
                    policy.display()
                ),
            ));
        }
        if let Some(routes) = &self.routes
            && !routes.is_file()
        {
            return Err(err(
                "routes",
                format!("`{}` is not a file", routes.display()),
            ));
        }
        let identity = match self.identity.as_deref().unwrap_or("insecure-header") {
            "insecure-header" => IdentityMode::InsecureHeader,
            "mtls" => IdentityMode::Mtls,
            "mesh" => IdentityMode::Mesh,
            other => {
                return Err(err(
                    "identity",
                    format!(
                        "`{other}` is not an identity mode; allowed: `mtls`, `mesh`, `insecure-header`"
                    ),
                ));
            }
        };
        let mesh = resolve_mesh(self.mesh, identity, &err)?;
        let tls = match identity {
            IdentityMode::InsecureHeader | IdentityMode::Mesh => {
                let t = &self.tls;
                if t.cert.is_some()
                    || t.key.is_some()
                    || t.client_ca.is_some()
                    || t.uri_prefix.is_some()
                    || t.dns_suffix.is_some()
                    || t.reload_interval_ms.is_some()
                {
                    return Err(err(
                        "tls",
                        format!(
                            "TLS files are given but `identity` is `{}`; set `identity = \"mtls\"` or remove [tls]{}",
                            identity.as_str(),
                            if identity == IdentityMode::Mesh {
                                " (in mesh mode the mesh's proxy terminates the callers' mTLS)"
                            } else {
                                ""
                            }
                        ),
                    ));
                }
                None
            }
            IdentityMode::Mtls => {
                let read = |key: &str, path: &Option<PathBuf>| -> Result<Vec<u8>, ConfigError> {
                    let path = path.as_ref().ok_or_else(|| {
                        err(
                            key,
                            "is required with `identity = \"mtls\"` (a PEM file)".into(),
                        )
                    })?;
                    let bytes = std::fs::read(path)
                        .map_err(|e| err(key, format!("cannot read `{}`: {e}", path.display())))?;
                    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN") {
                        return Err(err(key, format!("`{}` is not a PEM file", path.display())));
                    }
                    Ok(bytes)
                };
                let interval = match self.tls.reload_interval_ms {
                    None => crate::transport::tls::DEFAULT_RELOAD_INTERVAL,
                    Some(ms) if ms >= 100 => Duration::from_millis(ms),
                    Some(ms) => {
                        return Err(err(
                            "tls.reload_interval_ms",
                            format!("`{ms}` is too short; allowed: 100 or more (milliseconds)"),
                        ));
                    }
                };
                let files = TlsFiles {
                    cert_pem: read("tls.cert", &self.tls.cert)?,
                    key_pem: read("tls.key", &self.tls.key)?,
                    client_ca_pem: read("tls.client_ca", &self.tls.client_ca)?,
                    // Present: read above, so all three paths are set.
                    reload: match (&self.tls.cert, &self.tls.key, &self.tls.client_ca) {
                        (Some(cert), Some(key), Some(client_ca)) => {
                            Some(crate::transport::tls::TlsReload {
                                cert: cert.clone(),
                                key: key.clone(),
                                client_ca: client_ca.clone(),
                                interval,
                            })
                        }
                        _ => None,
                    },
                    uri_prefix: self
                        .tls
                        .uri_prefix
                        .unwrap_or_else(|| DEFAULT_URI_PREFIX.to_owned()),
                    dns_suffix: self.tls.dns_suffix,
                };
                // Build the TLS configuration now, so that a certificate and key that do not
                // parse or do not match fail here, before any port is bound.
                crate::transport::tls::ServerTls::new(&files).map_err(|e| {
                    err(
                        "tls",
                        format!(
                            "the certificate, key or client CA cannot be used: {}",
                            error_chain(&e)
                        ),
                    )
                })?;
                Some(files)
            }
        };
        let defaults = CacheSettings::default();
        let max_entries = self.cache.max_entries.unwrap_or(defaults.max_entries);
        if max_entries == 0 {
            return Err(err("cache.max_entries", "must be at least 1".into()));
        }
        let ttl = self
            .cache
            .ttl_seconds
            .map_or(defaults.ttl, Duration::from_secs);
        if ttl.is_zero() || ttl > MAX_CACHE_TTL {
            return Err(err(
                "cache.ttl_seconds",
                format!(
                    "`{}` is out of range; allowed: 1 to {}",
                    ttl.as_secs(),
                    MAX_CACHE_TTL.as_secs()
                ),
            ));
        }
        let max_concurrent_calls = self.limits.max_concurrent_calls.unwrap_or(1024);
        if max_concurrent_calls == 0 || max_concurrent_calls > 1_000_000 {
            return Err(err(
                "limits.max_concurrent_calls",
                format!("`{max_concurrent_calls}` is out of range; allowed: 1 to 1000000"),
            ));
        }
        let shutdown_grace = Duration::from_secs(self.limits.shutdown_grace_seconds.unwrap_or(30));
        let limits = resolve_limits(&self.limits, max_concurrent_calls, &err)?;
        let audit = resolve_audit(self.audit, &err)?;
        let telemetry = resolve_telemetry(self.telemetry, &err)?;
        let admin_roles = resolve_admin(self.admin, &err)?;
        let fleet = resolve_fleet(self.fleet, &err)?;
        let subjects = resolve_subjects(self.subjects, fleet.is_some(), &err)?;
        let reload = resolve_reload(self.reload, &err)?;
        let log_format = match self.log.format.as_deref() {
            None => LogFormat::default(),
            Some(value) => LogFormat::parse(value).ok_or_else(|| {
                err(
                    "log.format",
                    format!("`{value}` is not a log format; allowed: `text`, `json`"),
                )
            })?,
        };
        Ok(Config {
            listen,
            api_listen,
            admin_listen,
            upstream,
            policy,
            routes: self.routes,
            identity,
            tls,
            mesh,
            cache: CacheSettings { max_entries, ttl },
            max_concurrent_calls,
            shutdown_grace,
            limits,
            audit,
            telemetry,
            admin_roles,
            subjects,
            fleet,
            reload,
            log_format,
        })
    }
}

/// Whether two listeners would bind the same port (port 0 always picks a free one).
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    let overlap = a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
    overlap && a.port() == b.port() && a.port() != 0
}

/// `value` within `min..=max`, or an error naming `key` and the range.
fn in_range(
    key: &str,
    value: u64,
    min: u64,
    max: u64,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<u64, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(err(
            key,
            format!("`{value}` is out of range; allowed: {min} to {max}"),
        ))
    }
}

fn resolve_subjects(
    s: SubjectsSection,
    fleet: bool,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<SubjectsSettings, ConfigError> {
    let mut settings = SubjectsSettings::default();
    if let Some(path) = s.path {
        if fleet {
            return Err(err(
                "subjects.path",
                "the SQLite registry is not used in fleet mode (`[fleet] database_url` is set): subject state lives in PostgreSQL; remove one of them".into(),
            ));
        }
        if path.as_os_str().is_empty() || path.is_dir() {
            return Err(err(
                "subjects.path",
                format!("`{}` is not a file path", path.display()),
            ));
        }
        settings.path = path;
    }
    if let Some(ms) = s.stale_after_ms {
        settings.stale_after =
            Duration::from_millis(in_range("subjects.stale_after_ms", ms, 1, 3_600_000, err)?);
    }
    if let Some(n) = s.cache_max_entries {
        settings.cache_max_entries =
            in_range("subjects.cache_max_entries", n, 1, 100_000_000, err)?;
    }
    Ok(settings)
}

fn resolve_fleet(
    f: FleetSection,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Option<FleetSettings>, ConfigError> {
    let Some(url) = f.database_url else {
        for (key, given) in [
            (
                "fleet.statement_timeout_ms",
                f.statement_timeout_ms.is_some(),
            ),
            ("fleet.max_connections", f.max_connections.is_some()),
            ("fleet.idle_timeout_ms", f.idle_timeout_ms.is_some()),
            ("fleet.change_feed", f.change_feed.is_some()),
            ("fleet.poll_interval_ms", f.poll_interval_ms.is_some()),
            ("fleet.application_name", f.application_name.is_some()),
        ] {
            if given {
                return Err(err(key, "applies only with `database_url`".into()));
            }
        }
        return Ok(None);
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(err(
            "fleet.database_url",
            "expected a PostgreSQL URL, `postgres://USER@HOST:PORT/DATABASE`".into(),
        ));
    }
    let ms = f.statement_timeout_ms.unwrap_or(2000);
    let ms = in_range("fleet.statement_timeout_ms", ms, 1, 600_000, err)?;
    let change_feed = match f.change_feed.as_deref().unwrap_or("listen") {
        "listen" => {
            if f.poll_interval_ms.is_some() {
                return Err(err(
                    "fleet.poll_interval_ms",
                    "applies only with `change_feed = \"poll\"`".into(),
                ));
            }
            ChangeFeed::Listen
        }
        "poll" => {
            let default = u64::try_from(DEFAULT_FLEET_POLL_INTERVAL.as_millis()).unwrap_or(250);
            let every = f.poll_interval_ms.unwrap_or(default);
            ChangeFeed::Poll(Duration::from_millis(in_range(
                "fleet.poll_interval_ms",
                every,
                20,
                10_000,
                err,
            )?))
        }
        other => {
            return Err(err(
                "fleet.change_feed",
                format!(
                    "`{other}` is not a change feed; allowed: `listen` (direct to PostgreSQL), `poll` (through a transaction-mode pooler)"
                ),
            ));
        }
    };
    let max_connections = f.max_connections.unwrap_or(DEFAULT_FLEET_MAX_CONNECTIONS);
    // The listener holds one connection for good; reads need at least one more.
    let least = if change_feed == ChangeFeed::Listen {
        2
    } else {
        1
    };
    let max_connections = u32::try_from(in_range(
        "fleet.max_connections",
        u64::from(max_connections),
        least,
        100,
        err,
    )?)
    .unwrap_or(DEFAULT_FLEET_MAX_CONNECTIONS);
    let idle_default = u64::try_from(DEFAULT_FLEET_IDLE_TIMEOUT.as_millis()).unwrap_or(10_000);
    let idle = in_range(
        "fleet.idle_timeout_ms",
        f.idle_timeout_ms.unwrap_or(idle_default),
        100,
        3_600_000,
        err,
    )?;
    let application_name = f
        .application_name
        .unwrap_or_else(|| DEFAULT_FLEET_APPLICATION_NAME.to_owned());
    // PostgreSQL truncates beyond 63 bytes and shows non-ASCII as `?`: a name the operator
    // would then not find in `pg_stat_activity`.
    if application_name.is_empty()
        || application_name.len() > 63
        || !application_name
            .chars()
            .all(|c| c.is_ascii_graphic() || c == ' ')
    {
        return Err(err(
            "fleet.application_name",
            format!("`{application_name}` is not allowed; 1 to 63 printable ASCII characters"),
        ));
    }
    Ok(Some(FleetSettings {
        database_url: url,
        statement_timeout: Duration::from_millis(ms),
        max_connections,
        idle_timeout: Duration::from_millis(idle),
        change_feed,
        application_name,
    }))
}

fn resolve_reload(
    r: ReloadSection,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ReloadSettings, ConfigError> {
    let mut settings = ReloadSettings::default();
    if let Some(watch) = r.watch {
        settings.watch = watch;
    }
    if let Some(ms) = r.debounce_ms {
        settings.debounce =
            Duration::from_millis(in_range("reload.debounce_ms", ms, 10, 60_000, err)?);
    }
    if let Some(n) = r.keep_versions {
        let n = in_range("reload.keep_versions", n as u64, 1, 1000, err)?;
        settings.keep_versions = usize::try_from(n).unwrap_or(1000);
    }
    Ok(settings)
}

fn resolve_admin(
    a: AdminSection,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<AdminRoles, ConfigError> {
    let sections = [
        ("admin.policy_admin", AdminRole::PolicyAdmin, a.policy_admin),
        ("admin.auditor", AdminRole::Auditor, a.auditor),
        ("admin.operator", AdminRole::Operator, a.operator),
        (
            "admin.privacy_office",
            AdminRole::PrivacyOffice,
            a.privacy_office,
        ),
    ];
    for (key, _, identities) in &sections {
        for identity in identities.iter().flatten() {
            let valid = !identity.is_empty()
                && identity.len() <= 256
                && !identity
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control());
            if !valid {
                return Err(err(
                    key,
                    format!(
                        "`{identity}` is not an identity; expected a caller name as its certificate or `x-caller` gives it (1 to 256 characters, no spaces)"
                    ),
                ));
            }
        }
    }
    AdminRoles::new(
        sections
            .iter()
            .map(|(_, role, ids)| (*role, ids.as_deref().unwrap_or_default())),
    )
    .map_err(|message| err("admin", message))
}

fn resolve_mesh(
    m: MeshSection,
    identity: IdentityMode,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Option<MeshIdentity>, ConfigError> {
    if identity != IdentityMode::Mesh {
        let given = m.header.is_some()
            || m.proxies.is_some()
            || m.uri_prefix.is_some()
            || m.dns_suffix.is_some();
        if given {
            return Err(err(
                "mesh",
                format!(
                    "[mesh] is given but `identity` is `{}`; set `identity = \"mesh\"` or remove [mesh]",
                    identity.as_str()
                ),
            ));
        }
        return Ok(None);
    }
    let allowed = "allowed: `x-forwarded-client-cert` (Envoy, Istio), `l5d-client-id` (Linkerd)";
    let header = match m.header.as_deref() {
        None => {
            return Err(err(
                "mesh.header",
                format!("is required with `identity = \"mesh\"`; {allowed}"),
            ));
        }
        Some(value) => MeshHeader::parse(value).ok_or_else(|| {
            err(
                "mesh.header",
                format!("`{value}` is not a mesh identity header; {allowed}"),
            )
        })?,
    };
    let proxies = m.proxies.unwrap_or_default();
    if proxies.is_empty() {
        return Err(err(
            "mesh.proxies",
            "is required with `identity = \"mesh\"`: the IP addresses the mesh's proxy in the pod connects from, e.g. `[\"127.0.0.6\"]` (Istio) or `[\"127.0.0.1\"]` (Linkerd)".into(),
        ));
    }
    let mut addresses = Vec::with_capacity(proxies.len());
    for proxy in &proxies {
        let ip: std::net::IpAddr = proxy.parse().map_err(|_| {
            err(
                "mesh.proxies",
                format!("`{proxy}` is not an IP address (no port, no name), e.g. `127.0.0.6`"),
            )
        })?;
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(err(
                "mesh.proxies",
                format!("`{proxy}` is not one host's address; name the proxy's own address"),
            ));
        }
        addresses.push(ip);
    }
    let (uri_prefix, dns_suffix) = match header {
        MeshHeader::ForwardedClientCert => {
            if m.dns_suffix.is_some() {
                return Err(err(
                    "mesh.dns_suffix",
                    "applies only with `header = \"l5d-client-id\"`; x-forwarded-client-cert names callers by `uri_prefix`".into(),
                ));
            }
            let prefix = m.uri_prefix.ok_or_else(|| {
                err(
                    "mesh.uri_prefix",
                    "is required with `header = \"x-forwarded-client-cert\"`: the URI SAN before the caller, e.g. `spiffe://cluster.local/ns/shop/sa/`".into(),
                )
            })?;
            if !prefix.contains("://") || prefix.chars().any(char::is_whitespace) {
                return Err(err(
                    "mesh.uri_prefix",
                    format!(
                        "`{prefix}` is not a URI prefix, e.g. `spiffe://cluster.local/ns/shop/sa/`"
                    ),
                ));
            }
            (Some(prefix), None)
        }
        MeshHeader::LinkerdClientId => {
            if m.uri_prefix.is_some() {
                return Err(err(
                    "mesh.uri_prefix",
                    "applies only with `header = \"x-forwarded-client-cert\"`; l5d-client-id names callers by `dns_suffix`".into(),
                ));
            }
            let suffix = m.dns_suffix.ok_or_else(|| {
                err(
                    "mesh.dns_suffix",
                    "is required with `header = \"l5d-client-id\"`: the name after the caller, e.g. `shop.serviceaccount.identity.linkerd.cluster.local`".into(),
                )
            })?;
            let valid = !suffix.is_empty()
                && !suffix.starts_with('.')
                && !suffix.ends_with('.')
                && suffix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if !valid {
                return Err(err(
                    "mesh.dns_suffix",
                    format!(
                        "`{suffix}` is not a DNS name without leading or trailing dot, e.g. `shop.serviceaccount.identity.linkerd.cluster.local`"
                    ),
                ));
            }
            (None, Some(suffix))
        }
    };
    Ok(Some(MeshIdentity {
        header,
        proxies: addresses,
        uri_prefix,
        dns_suffix,
    }))
}
