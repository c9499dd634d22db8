//! One audit record per decision, and the hash chain that ties each record to the one before.
//!
//! A record is one line of JSON. Its last field is `hash`: SHA-256 over the previous record's
//! hash and the exact bytes of this line up to that field, so any change to a line — a field
//! edited, added or removed, or a line moved, inserted or deleted — breaks the chain from there.
//! Records hold identifiers (caller, purpose, categories, subject ids), never personal data.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What produced the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A call through the sidecar's data plane.
    Access,
    /// A question to the AccessControl API.
    Check,
    /// An administrative action (policy, subject rights).
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordReason {
    pub code: String,
    pub clause: String,
}

/// A record as the decision path hands it over; the writer adds `seq`, `prev` and `hash`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordBody {
    /// Microseconds since the Unix epoch.
    pub time_us: u64,
    pub kind: Option<RecordKind>,
    pub decision_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    pub caller: String,
    pub purpose: String,
    pub action: String,
    /// The gRPC method, for calls through the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    pub categories: Vec<String>,
    pub subjects: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// `allow` or `deny`.
    pub decision: String,
    pub reasons: Vec<RecordReason>,
    /// `policy.csv:LINE` of each matched rule.
    pub matched_rules: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
    pub cache_hit: bool,
    pub latency_us: u64,
    /// What an admin action did, in words (`applied version … (was …): comment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// With a shadow policy loaded: `allow` or `deny` as the shadow decided, recorded only when
    /// it differs from the enforced decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_decision: Option<String>,
    /// Allowed calls only: the categories the caller went without (their response fields
    /// cleared; for a Check, to be left out by the service).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub minimized: Vec<String>,
    /// The categories the call could go without (a route's `minimize`, a Check's
    /// `minimizable`): on an allowed call, those not `minimized` were handed out as well as
    /// `categories` ([`RecordBody::touched`]). Records written before this field existed have
    /// none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub minimizable: Vec<String>,
}

impl RecordBody {
    /// The categories of personal data the call handed out (or wrote), as far as the decision
    /// goes: `categories`, and on an allowed call the `minimizable` ones it was not told to go
    /// without. A denied call touched nothing; its `categories` are what it asked for.
    pub fn touched(&self) -> impl Iterator<Item = &String> {
        let allowed = self.decision == "allow";
        self.categories.iter().chain(
            self.minimizable
                .iter()
                .filter(move |c| allowed && !self.minimized.contains(c)),
        )
    }
}

/// A record as stored: its place in the chain, the body, and the hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub prev: String,
    #[serde(flatten)]
    pub body: RecordBody,
}

/// The hash before the first record.
pub const GENESIS: [u8; 32] = [0; 32];

const HASH_FIELD: &str = ",\"hash\":\"";

/// Serialises `record` as a line chained to `prev`: returns the line (with `\n`) and its hash.
pub fn seal(
    record: &AuditRecord,
    prev: &[u8; 32],
) -> Result<(String, [u8; 32]), serde_json::Error> {
    let mut line = serde_json::to_string(record)?;
    // Drop the closing brace; the hash is the last field.
    line.pop();
    let hash = chain_hash(prev, line.as_bytes());
    line.push_str(HASH_FIELD);
    line.push_str(&hex::encode(hash));
    line.push_str("\"}\n");
    Ok((line, hash))
}

/// SHA-256 over the previous hash and the line's bytes before its hash field.
pub fn chain_hash(prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(body);
    hasher.finalize().into()
}

/// A stored line split into the part the hash covers and the hash it claims.
pub fn split_line(line: &str) -> Option<(&str, [u8; 32])> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let at = line.rfind(HASH_FIELD)?;
    let (body, rest) = line.split_at(at);
    let hex_hash = rest.strip_prefix(HASH_FIELD)?.strip_suffix("\"}")?;
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut hash).ok()?;
    Some((body, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> AuditRecord {
        AuditRecord {
            seq,
            prev: hex::encode(GENESIS),
            body: RecordBody {
                decision_id: format!("d{seq}"),
                caller: "billing-service".into(),
                decision: "allow".into(),
                ..RecordBody::default()
            },
        }
    }

    #[test]
    fn a_sealed_line_parses_and_verifies() {
        let (line, hash) = seal(&record(1), &GENESIS).unwrap();
        assert!(line.ends_with("\"}\n"));
        let (body, claimed) = split_line(&line).unwrap();
        assert_eq!(claimed, hash);
        assert_eq!(chain_hash(&GENESIS, body.as_bytes()), hash);
        let parsed: AuditRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed, record(1));
    }

    #[test]
    fn any_edit_changes_the_hash() {
        let (line, hash) = seal(&record(1), &GENESIS).unwrap();
        let edited = line.replace("billing-service", "billing-servicf");
        let (body, claimed) = split_line(&edited).unwrap();
        assert_eq!(claimed, hash);
        assert_ne!(chain_hash(&GENESIS, body.as_bytes()), hash);
    }
}
