//! Connecting the CLI to a running sidecar's API port (`--admin ADDR`): the commands
//! `policy push|status|rollback|explain`, `audit ... --admin` and `subjects ... --admin` share
//! these flags and this connection.
//!
//! The identity is the client certificate (`--cert`, `--key`, `--ca`: the sidecar runs with
//! `identity = "mtls"`) or, against a sidecar in the insecure development mode, the name given
//! with `--as` (sent as `x-caller`).

use clap::Args;
use std::path::PathBuf;
use std::time::Duration;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The shortest `--timeout` honoured: a zero timeout would fail every call before it starts.
const MIN_TIMEOUT: Duration = Duration::from_millis(100);

/// The API port of a running sidecar, and who the CLI is to it.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// The sidecar's API address (`api_listen` in pdgate.toml).
    #[arg(
        long = "admin",
        value_name = "ADDR",
        env = "PDGATE_ADMIN",
        default_value = crate::config::DEFAULT_API_LISTEN
    )]
    pub addr: String,
    /// The identity to claim (sent as `x-caller`); only a sidecar running with
    /// `identity = "insecure-header"` reads it. It must hold the role the command needs
    /// (pdgate.toml `[admin]`).
    #[arg(long = "as", value_name = "IDENTITY", env = "PDGATE_ADMIN_AS")]
    pub identity: Option<String>,
    /// PEM client certificate naming the identity (for a sidecar with `identity = "mtls"`).
    #[arg(long, value_name = "PEM", requires_all = ["key", "ca"])]
    pub cert: Option<PathBuf>,
    /// PEM private key of `--cert`.
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
    /// PEM CA certificate that signed the sidecar's certificate.
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub ca: Option<PathBuf>,
    /// The server name to expect in the sidecar's certificate (default: the host of ADDR).
    #[arg(long, value_name = "NAME", requires = "cert")]
    pub server_name: Option<String>,
    /// Give up when the sidecar does not answer within this long, e.g. 10s, 1m (a bare number,
    /// seconds, is deprecated).
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "10s",
        value_parser = super::parse_duration_or_seconds("--timeout")
    )]
    pub timeout: Duration,
}

/// A connection problem, worded for the command line (which flag, what was wrong).
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("`--admin {addr}`: {message}")]
    Address { addr: String, message: String },
    #[error("`{flag}`: cannot read `{path}`: {source}")]
    File {
        flag: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("`--as {0}`: not a valid identity (ASCII, no spaces)")]
    Identity(String),
    #[error("cannot reach the sidecar's API at `{addr}`: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
}

impl AdminClientError {
    /// Exit code: bad flags are usage errors (2); an unreachable sidecar is a failure (1).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Connect { .. } => super::EXIT_DENIED,
            _ => super::EXIT_USAGE,
        }
    }
}

/// Adds `x-caller` to every call when `--as` is given.
#[derive(Debug, Clone)]
pub struct ClaimIdentity(Option<AsciiMetadataValue>);

impl Interceptor for ClaimIdentity {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(identity) = &self.0 {
            request.metadata_mut().insert("x-caller", identity.clone());
        }
        Ok(request)
    }
}

/// A channel to the API port that claims the identity, ready for any generated client:
/// `PolicyAdminClient::new(channel)`.
pub type AdminChannel = InterceptedService<Channel, ClaimIdentity>;

impl AdminArgs {
    /// Connects (eagerly, so that an unreachable sidecar is reported as such).
    pub async fn connect(&self) -> Result<AdminChannel, AdminClientError> {
        let scheme = if self.cert.is_some() { "https" } else { "http" };
        let uri = if self.addr.contains("://") {
            self.addr.clone()
        } else {
            format!("{scheme}://{}", self.addr)
        };
        let address_error = |message: String| AdminClientError::Address {
            addr: self.addr.clone(),
            message,
        };
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| address_error(format!("not HOST:PORT or a URI ({e})")))?
            .connect_timeout(self.timeout.max(MIN_TIMEOUT))
            .timeout(self.timeout.max(MIN_TIMEOUT));
        if let (Some(cert), Some(key), Some(ca)) = (&self.cert, &self.key, &self.ca) {
            let read = |flag: &'static str, path: &PathBuf| {
                std::fs::read(path).map_err(|source| AdminClientError::File {
                    flag,
                    path: path.display().to_string(),
                    source,
                })
            };
            let mut tls = ClientTlsConfig::new()
                .identity(Identity::from_pem(
                    read("--cert", cert)?,
                    read("--key", key)?,
                ))
                .ca_certificate(Certificate::from_pem(read("--ca", ca)?));
            if let Some(name) = &self.server_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| address_error(format!("TLS cannot be set up ({e})")))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| AdminClientError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let identity = match &self.identity {
            None => None,
            Some(name) => Some(
                name.parse::<AsciiMetadataValue>()
                    .ok()
                    .filter(|_| !name.is_empty() && !name.contains(' '))
                    .ok_or_else(|| AdminClientError::Identity(name.clone()))?,
            ),
        };
        Ok(InterceptedService::new(channel, ClaimIdentity(identity)))
    }
}

/// A gRPC error from the sidecar, for the command line: the code, the message, and for a
/// missing role which role is needed. Returns the exit code: 2 for `INVALID_ARGUMENT`, 1
/// otherwise.
pub fn report_status(status: &tonic::Status) -> u8 {
    eprintln!("error: {:?}: {}", status.code(), status.message());
    if status.code() == tonic::Code::PermissionDenied {
        eprintln!(
            "hint: the identity needs the role named above in the sidecar's pdgate.toml [admin]"
        );
    }
    if status.code() == tonic::Code::InvalidArgument {
        super::EXIT_USAGE
    } else {
        super::EXIT_DENIED
    }
}
