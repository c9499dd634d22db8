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
                    if let Some(caller) = self.caller_in_uri(uri) {
                        uris.push(caller.to_owned());
                    }
                }
                GeneralName::DNSName(name) => dns.push(self.caller_in_dns(name).to_owned()),
                _ => {}
            }
        }
        uris.extend(dns);
        uris
    }

    /// The caller named by one peer name that a proxy has already verified: Envoy's
    /// `source.principal`, which Envoy takes from the certificate's URI SAN, else its DNS SAN,
    /// else its subject. The same rules as for a certificate apply, so a caller has one name
    /// whether it calls through pdgate or through Envoy. A name that maps to no caller (a URI
    /// outside `uri_prefix`) is returned whole, to be denied as `CALLER_UNKNOWN` with the name
    /// in the reason; an empty name gives an empty caller.
    pub fn caller_from_name(&self, name: &str) -> String {
        if name.contains("://") {
            self.caller_in_uri(name).unwrap_or(name).to_owned()
        } else {
            self.caller_in_dns(name).to_owned()
        }
    }

    /// `<uri_prefix><caller>`, the caller being one non-empty path segment.
    fn caller_in_uri<'a>(&self, uri: &'a str) -> Option<&'a str> {
        uri.strip_prefix(self.uri_prefix.as_str())
            .filter(|caller| !caller.is_empty() && !caller.contains('/'))
    }

    /// `<caller>` or `<caller>.<dns_suffix>`.
    fn caller_in_dns<'a>(&self, name: &'a str) -> &'a str {
        match &self.dns_suffix {
            Some(suffix) => name
                .strip_suffix(suffix.as_str())
                .and_then(|n| n.strip_suffix('.'))
                .unwrap_or(name),
            None => name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_principal_names_the_caller_as_a_certificate_would() {
        let naming = CallerNaming {
            uri_prefix: "spiffe://pdgate.local/caller/".into(),
            dns_suffix: Some("svc.cluster.local".into()),
        };
        let name = |n| naming.caller_from_name(n);
        assert_eq!(
            name("spiffe://pdgate.local/caller/billing-service"),
            "billing-service"
        );
        assert_eq!(name("billing-service.svc.cluster.local"), "billing-service");
        assert_eq!(name("billing-service"), "billing-service");
        // Outside the prefix, or more than one segment: named whole, so the deny says who.
        assert_eq!(
            name("spiffe://other.domain/ns/x/sa/billing-service"),
            "spiffe://other.domain/ns/x/sa/billing-service"
        );
        assert_eq!(
            name("spiffe://pdgate.local/caller/a/b"),
            "spiffe://pdgate.local/caller/a/b"
        );
        assert_eq!(name(""), "");
    }
}
