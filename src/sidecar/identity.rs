//! Caller identity from an mTLS client certificate: a URI SAN `<uri_prefix><caller>` (SPIFFE
//! style) or a DNS SAN `<caller>` / `<caller>.<dns_suffix>`. The TLS handshake has already
//! verified the chain against the configured client CA; this only reads the name.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// How certificate names map to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerNaming {
    pub uri_prefix: String,
    pub dns_suffix: Option<String>,
}

impl CallerNaming {
    /// The caller named by the leaf certificate (DER). A name that matches a known caller
    /// (`known`) wins; otherwise the first candidate is returned, to be denied as
    /// `CALLER_UNKNOWN` with its name in the reason; no candidate gives an empty caller.
    pub fn caller(&self, leaf_der: &[u8], known: impl Fn(&str) -> bool) -> String {
        let candidates = self.candidates(leaf_der);
        candidates
            .iter()
            .find(|c| known(c))
            .or(candidates.first())
            .cloned()
            .unwrap_or_default()
    }

    fn candidates(&self, leaf_der: &[u8]) -> Vec<String> {
        let Ok((_, cert)) = X509Certificate::from_der(leaf_der) else {
            return Vec::new();
        };
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            return Vec::new();
        };
        let mut uris = Vec::new();
        let mut dns = Vec::new();
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => {
                    if let Some(caller) = uri.strip_prefix(self.uri_prefix.as_str())
                        && !caller.is_empty()
                        && !caller.contains('/')
                    {
                        uris.push(caller.to_owned());
                    }
                }
                GeneralName::DNSName(name) => {
                    let caller = match &self.dns_suffix {
                        Some(suffix) => name
                            .strip_suffix(suffix.as_str())
                            .and_then(|n| n.strip_suffix('.'))
                            .unwrap_or(name),
                        None => name,
                    };
                    dns.push(caller.to_owned());
                }
                _ => {}
            }
        }
        uris.extend(dns);
        uris
    }
}
