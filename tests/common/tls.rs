//! Test certificates, made with rcgen for each test: one CA type for every test that needs
//! TLS files or an mTLS sidecar.

use pdgate::config::{DEFAULT_URI_PREFIX, TlsFiles};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate with these SANs: (cert PEM, key PEM).
    pub fn leaf(&self, sans: Vec<SanType>) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A server certificate for `name` with this CA as the client CA: the TLS files of an
    /// mTLS sidecar (callers named by the default URI prefix or under
    /// `callers.pdgate.local`).
    pub fn server_files(&self, name: &str) -> TlsFiles {
        let (cert, key) = self.leaf(vec![dns(name)]);
        TlsFiles {
            cert_pem: cert.into_bytes(),
            key_pem: key.into_bytes(),
            client_ca_pem: self.pem().into_bytes(),
            uri_prefix: DEFAULT_URI_PREFIX.to_owned(),
            dns_suffix: Some("callers.pdgate.local".to_owned()),
            reload: None,
        }
    }

    /// (cert, key, CA) PEM of a server certificate for `name`, as files on disk hold them.
    pub fn server_pems(&self, name: &str) -> (String, String, String) {
        let (cert, key) = self.leaf(vec![dns(name)]);
        (cert, key, self.pem())
    }
}

/// A caller named by a URI SAN under the default prefix.
pub fn uri(caller: &str) -> SanType {
    SanType::URI(format!("{DEFAULT_URI_PREFIX}{caller}").try_into().unwrap())
}

pub fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().unwrap())
}
