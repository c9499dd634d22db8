//! Types and service stubs generated from `proto/` by `build.rs`.

/// `pdgate.v1`: the decision API.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("pdgate.v1");
}

/// `demo.customer.v1`: the demo customer-data service that `pdgate demo` protects.
pub mod demo {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("demo.customer.v1");
}

/// The encoded descriptors of pdgate's protos, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("pdgate_descriptor");

/// The encoded descriptors of Envoy's `envoy.service.auth.v3.Authorization` and its imports
/// (compiled by `build.rs` from `proto/third_party/`), for gRPC server reflection.
pub const ENVOY_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("envoy_ext_authz_descriptor");

use crate::decision::Decision;

impl From<&Decision> for v1::CheckResponse {
    fn from(d: &Decision) -> Self {
        Self {
            allowed: d.allowed,
            reasons: d
                .reasons
                .iter()
                .map(|r| v1::Reason {
                    code: r.code.as_str().to_owned(),
                    clause: r.clause.to_string(),
                    detail: r.detail.to_string(),
                })
                .collect(),
            policy_version: d.policy_version.map(|v| v.to_string()).unwrap_or_default(),
            decision_id: d.decision_id.to_string(),
            matched_rules: d
                .matched_rules
                .iter()
                .map(|m| v1::MatchedRule {
                    rule: m.rule.to_string(),
                    line: u32::try_from(m.line).unwrap_or(u32::MAX),
                })
                .collect(),
            minimized: d.minimized.clone(),
        }
    }
}

impl From<v1::CheckRequest> for crate::decision::Request {
    fn from(r: v1::CheckRequest) -> Self {
        Self {
            caller: r.caller,
            purpose: r.purpose,
            action: r.action,
            categories: r.categories,
            subjects: r.subjects,
            recipient: (!r.recipient.is_empty()).then_some(r.recipient),
            minimizable: r.minimizable,
        }
    }
}

/// A policy as the `PolicyAdmin` API carries it (`pdgate policy push`, tests).
impl From<crate::gate::Bundle> for v1::PolicyBundle {
    fn from(b: crate::gate::Bundle) -> Self {
        Self {
            model: b.source.model,
            policy: b.source.policy,
            taxonomy: b.source.taxonomy,
            routes: b.source.routes.unwrap_or_default(),
            tests: b
                .tests
                .into_iter()
                .map(|t| v1::PolicyTestFile {
                    name: t.name,
                    content: t.content,
                })
                .collect(),
            descriptors: b
                .source
                .descriptors
                .into_iter()
                .map(|d| v1::PolicyDescriptorFile {
                    name: d.name,
                    content: d.content,
                })
                .collect(),
        }
    }
}
