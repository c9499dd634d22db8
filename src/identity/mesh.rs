//! Caller identity from a service mesh (`identity = "mesh"`): the mesh's proxy in the pod
//! terminates the caller's mTLS, verifies its certificate, and tells the workload who the peer
//! was in a header. pdgate believes that header only on connections that come from the proxy
//! itself (`[mesh] proxies`, the local addresses it connects from); from anywhere else the
//! header could be anyone's words, so the call is refused.
//!
//! | proxy | header | caller |
//! |---|---|---|
//! | Envoy, Istio | `x-forwarded-client-cert` (XFCC): elements `Key=Value;...`, comma-separated, the last added by the nearest proxy | the last element's `URI` (the peer certificate's URI SAN) minus `uri_prefix` |
//! | Linkerd | `l5d-client-id`: `<sa>.<ns>.serviceaccount.identity.<trust domain>` | the name minus `.<dns_suffix>` |
//!
//! The rest must be one non-empty name without `/` or `.` (a service account); a peer outside
//! the prefix or suffix (another namespace, another trust domain) is refused, not guessed.

use http::HeaderMap;
use std::fmt;
use std::net::IpAddr;

/// The verified-peer header pdgate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshHeader {
    /// Envoy's and Istio's `x-forwarded-client-cert`.
    ForwardedClientCert,
    /// Linkerd's `l5d-client-id`.
    LinkerdClientId,
}

impl MeshHeader {
    pub const ALL: [MeshHeader; 2] = [Self::ForwardedClientCert, Self::LinkerdClientId];

    /// The header's name, which is also its configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ForwardedClientCert => "x-forwarded-client-cert",
            Self::LinkerdClientId => "l5d-client-id",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|h| h.as_str() == s)
    }
}

impl fmt::Display for MeshHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Mesh identity, as configured (`[mesh]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshIdentity {
    pub header: MeshHeader,
    /// The addresses the local proxy connects from (Istio: `127.0.0.6`; Linkerd: `127.0.0.1`).
    pub proxies: Vec<IpAddr>,
    /// With `x-forwarded-client-cert`: the URI SAN prefix before the caller.
    pub uri_prefix: Option<String>,
    /// With `l5d-client-id`: the name's suffix after the caller.
    pub dns_suffix: Option<String>,
}

/// Why a call's mesh identity is refused. Each refusal is a deny (`CALLER_UNKNOWN`) with this
/// message, audited like any decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshRefusal {
    #[error(
        "the connection comes from `{0}`, which is not a configured mesh proxy (`[mesh] proxies`); the mesh's identity header is believed only from the local proxy"
    )]
    NotAProxy(IpAddr),
    #[error(
        "the connection's address is unknown; the mesh's identity header is believed only from the local proxy"
    )]
    NoAddress,
    #[error("no mesh is configured (`[mesh]`)")]
    NotConfigured,
    #[error("the call has no `{0}` header: the mesh proxy verified no peer")]
    Missing(MeshHeader),
    #[error("`{0}` is given {1} times; the mesh proxy sends it once")]
    Repeated(MeshHeader, usize),
    #[error("`{0}` cannot be read: {1}")]
    Malformed(MeshHeader, String),
    #[error("the peer `{name}` is not under `{expected}` (`[mesh] {key}`)")]
    Outside {
        name: String,
        expected: String,
        key: &'static str,
    },
}

impl MeshIdentity {
    /// The caller of a call that came from `remote` with `headers`, or why it is refused.
    pub fn caller(
        &self,
        remote: Option<IpAddr>,
        headers: &HeaderMap,
    ) -> Result<String, MeshRefusal> {
        let remote = remote.ok_or(MeshRefusal::NoAddress)?;
        // An IPv4 proxy address matches the same address seen on a dual-stack socket.
        let remote = match remote {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(remote, IpAddr::V4),
            v4 => v4,
        };
        if !self.proxies.contains(&remote) {
            return Err(MeshRefusal::NotAProxy(remote));
        }
        let header = self.header;
        let mut values = headers.get_all(header.as_str()).iter();
        let value = values.next().ok_or(MeshRefusal::Missing(header))?;
        let extra = values.count();
        if extra > 0 {
            return Err(MeshRefusal::Repeated(header, extra + 1));
        }
        let text = value
            .to_str()
            .map_err(|_| MeshRefusal::Malformed(header, "not ASCII text".into()))?;
        match header {
            MeshHeader::ForwardedClientCert => {
                let uri = peer_uri(text).map_err(|e| MeshRefusal::Malformed(header, e))?;
                let prefix = self.uri_prefix.as_deref().unwrap_or_default();
                name_in(&uri, uri.strip_prefix(prefix), prefix, "uri_prefix")
            }
            MeshHeader::LinkerdClientId => {
                if text.is_empty() || text.contains([',', ' ', '\t']) {
                    return Err(MeshRefusal::Malformed(
                        header,
                        format!("`{text}` is not one identity name"),
                    ));
                }
                let suffix = self.dns_suffix.as_deref().unwrap_or_default();
                let stripped = text
                    .strip_suffix(suffix)
                    .and_then(|rest| rest.strip_suffix('.'));
                name_in(text, stripped, suffix, "dns_suffix")
            }
        }
    }
}

/// `rest`, the caller left of or right of the prefix or suffix, when it is one name.
fn name_in(
    name: &str,
    rest: Option<&str>,
    expected: &str,
    key: &'static str,
) -> Result<String, MeshRefusal> {
    match rest {
        Some(caller) if !caller.is_empty() && !caller.contains(['/', '.']) => Ok(caller.to_owned()),
        _ => Err(MeshRefusal::Outside {
            name: name.to_owned(),
            expected: expected.to_owned(),
            key,
        }),
    }
}

/// The peer URI of an `x-forwarded-client-cert` value: the `URI` of its last element, which
/// the nearest proxy (the local one) appended; earlier elements were added by proxies further
/// away, or written by the client itself, and are not believed.
fn peer_uri(value: &str) -> Result<String, String> {
    let elements = split_outside_quotes(value, ',')?;
    let last = elements
        .last()
        .filter(|e| !e.trim().is_empty())
        .ok_or_else(|| "no element".to_owned())?;
    let mut uris = Vec::new();
    for pair in split_outside_quotes(last, ';')? {
        let (key, raw) = pair
            .split_once('=')
            .ok_or_else(|| format!("`{pair}` is not KEY=VALUE"))?;
        let key = key.trim();
        if !["By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS"]
            .iter()
            .any(|k| k.eq_ignore_ascii_case(key))
        {
            return Err(format!("unknown key `{key}`"));
        }
        if key.eq_ignore_ascii_case("URI") {
            uris.push(unquote(raw.trim())?);
        }
    }
    match uris.as_slice() {
        [uri] if !uri.is_empty() => Ok(uri.clone()),
        [] | [_] => Err("the peer's element has no `URI` (its certificate has no URI SAN)".into()),
        _ => Err("the peer's element has several `URI`s; pdgate takes one".into()),
    }
}

/// Splits on `sep` outside double quotes; a backslash escapes the next character in quotes.
fn split_outside_quotes(value: &str, sep: char) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in value.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            parts.push(&value[start..i]);
            start = i + c.len_utf8();
        }
    }
    if quoted {
        return Err("an unterminated quote".into());
    }
    parts.push(&value[start..]);
    Ok(parts)
}

/// A value, its quotes and escapes removed.
fn unquote(raw: &str) -> Result<String, String> {
    let Some(inner) = raw.strip_prefix('"') else {
        return Ok(raw.to_owned());
    };
    let inner = inner
        .strip_suffix('"')
        .ok_or_else(|| format!("`{raw}` is not quoted whole"))?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.extend(chars.next());
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn istio() -> MeshIdentity {
        MeshIdentity {
            header: MeshHeader::ForwardedClientCert,
            proxies: vec!["127.0.0.6".parse().unwrap()],
            uri_prefix: Some("spiffe://cluster.local/ns/shop/sa/".into()),
            dns_suffix: None,
        }
    }

    fn with(name: &str, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const PROXY: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 6)));

    #[test]
    fn the_last_xfcc_element_names_the_caller() {
        let xfcc = "By=spiffe://cluster.local/ns/shop/sa/customer-data;Hash=4b2ac7e5d8b1a0c4e7f1f0e6a4c3d2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5;Subject=\"CN=forged,O=x\";URI=spiffe://cluster.local/ns/shop/sa/fraud-service,By=spiffe://cluster.local/ns/shop/sa/customer-data;Hash=0123;Subject=\"\";URI=spiffe://cluster.local/ns/shop/sa/billing-service;DNS=billing.shop";
        let caller = istio().caller(PROXY, &with("x-forwarded-client-cert", &[xfcc]));
        assert_eq!(caller.as_deref(), Ok("billing-service"));
    }

    #[test]
    fn refusals_fail_closed() {
        let mesh = istio();
        let good = "By=spiffe://cluster.local/ns/shop/sa/customer-data;Hash=01;URI=spiffe://cluster.local/ns/shop/sa/billing-service";
        let other: IpAddr = "127.0.0.1".parse().unwrap();
        let h = with("x-forwarded-client-cert", &[good]);
        assert_eq!(
            mesh.caller(Some(other), &h),
            Err(MeshRefusal::NotAProxy(other))
        );
        assert_eq!(mesh.caller(None, &h), Err(MeshRefusal::NoAddress));
        assert!(matches!(
            mesh.caller(PROXY, &HeaderMap::new()),
            Err(MeshRefusal::Missing(_))
        ));
        assert!(matches!(
            mesh.caller(PROXY, &with("x-forwarded-client-cert", &[good, good])),
            Err(MeshRefusal::Repeated(_, 2))
        ));
        for bad in [
            "By=a;Hash=01",
            "By=a;URI=spiffe://cluster.local/ns/shop/sa/a;URI=spiffe://cluster.local/ns/shop/sa/b",
            "By=a;Subject=\"CN=x;URI=spiffe://cluster.local/ns/shop/sa/billing-service",
            "URI",
            "Foo=bar;URI=spiffe://cluster.local/ns/shop/sa/billing-service",
            "",
        ] {
            assert!(
                matches!(
                    mesh.caller(PROXY, &with("x-forwarded-client-cert", &[bad])),
                    Err(MeshRefusal::Malformed(..))
                ),
                "{bad}"
            );
        }
        for outside in [
            "URI=spiffe://cluster.local/ns/other/sa/billing-service",
            "URI=spiffe://cluster.local/ns/shop/sa/",
            "URI=spiffe://cluster.local/ns/shop/sa/a/b",
        ] {
            assert!(
                matches!(
                    mesh.caller(PROXY, &with("x-forwarded-client-cert", &[outside])),
                    Err(MeshRefusal::Outside { .. })
                ),
                "{outside}"
            );
        }
    }

    #[test]
    fn linkerd_names_the_service_account() {
        let mesh = MeshIdentity {
            header: MeshHeader::LinkerdClientId,
            proxies: vec!["127.0.0.1".parse().unwrap()],
            uri_prefix: None,
            dns_suffix: Some("shop.serviceaccount.identity.linkerd.cluster.local".into()),
        };
        let local = Some("127.0.0.1".parse().unwrap());
        let id = |v: &str| mesh.caller(local, &with("l5d-client-id", &[v]));
        assert_eq!(
            id("billing-service.shop.serviceaccount.identity.linkerd.cluster.local").as_deref(),
            Ok("billing-service")
        );
        assert!(matches!(
            id("billing-service.other.serviceaccount.identity.linkerd.cluster.local"),
            Err(MeshRefusal::Outside { .. })
        ));
        assert!(matches!(
            id(
                "a.shop.serviceaccount.identity.linkerd.cluster.local,b.shop.serviceaccount.identity.linkerd.cluster.local"
            ),
            Err(MeshRefusal::Malformed(..))
        ));
        // The same address, seen as IPv4-mapped IPv6 on a dual-stack listener.
        let mapped = Some("::ffff:127.0.0.1".parse().unwrap());
        assert!(
            mesh.caller(
                mapped,
                &with(
                    "l5d-client-id",
                    &["billing-service.shop.serviceaccount.identity.linkerd.cluster.local"]
                )
            )
            .is_ok()
        );
    }
}
