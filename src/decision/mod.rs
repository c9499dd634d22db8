//! Decisions: the staged semantics of DESIGN §2, the decision cache, and the types a decision
//! is made of. Nothing here knows about transport.
//!
//! `decide` cannot fail: whatever it cannot evaluate becomes a deny with a reason.

mod cache;
mod engine;
pub mod fixtures;
mod key;
mod minimize;
mod reason;

pub use cache::{CacheSettings, CacheStats, Decider, Pending, ShadowStats};
pub use engine::{
    Explanation, Outcome, Requirements, Stage, StageOutcome, StageReport, decide_fresh, evaluate,
    explain, finish,
};
pub use key::CacheKey;
pub use reason::{Reason, ReasonCode};

use crate::policy::{MatchedRule, PolicyVersion};
use serde::Serialize;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a caller asks: may `caller` do `action` on `categories` of `subjects` for `purpose`?
/// Strings as they arrived; unknown or missing names are denied, not rejected.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub caller: String,
    #[serde(default)]
    pub purpose: String,
    pub action: String,
    pub categories: Vec<String>,
    #[serde(default)]
    pub subjects: Vec<String>,
    /// The company that receives the data when it is not the caller (an internal service that
    /// exports to a joint user or a third party names it here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// Categories the call may go without: where the purpose may not have one, the call is
    /// not denied for it but told to leave it out ([`Decision::minimized`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub minimizable: Vec<String>,
}

/// The answer: allow or deny, why, by which rules, under which policy version.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub decision_id: DecisionId,
    #[serde(rename = "decision", serialize_with = "ser_decision")]
    pub allowed: bool,
    /// Empty when allowed.
    pub reasons: Vec<Reason>,
    /// The rules that granted (when allowed) or denied (`DENIED_BY_RULE`) the request.
    pub matched_rules: Arc<[MatchedRule]>,
    /// `None` only when no policy was loaded.
    pub policy_version: Option<PolicyVersion>,
    /// Whether the subject-independent part came from the decision cache.
    pub cache_hit: bool,
    /// With a shadow policy loaded: what the shadow decided (`true` = allow), set only when it
    /// decided otherwise than the active policy. Never enforced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow_allowed: Option<bool>,
    /// Allowed only: the request's `minimizable` categories the caller's purpose may not
    /// have, to be left out (response fields cleared), in the request's order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub minimized: Vec<String>,
}

fn ser_decision<S: serde::Serializer>(allowed: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if *allowed { "allow" } else { "deny" })
}

impl Decision {
    pub fn codes(&self) -> Vec<ReasonCode> {
        self.reasons.iter().map(|r| r.code).collect()
    }

    /// The audit record's `shadow_decision`: `allow` or `deny` when a shadow policy decided
    /// otherwise than the active one, `None` otherwise.
    pub fn shadow_decision(&self) -> Option<String> {
        self.shadow_allowed
            .map(|allowed| if allowed { "allow" } else { "deny" }.to_owned())
    }
}

/// A decision id: unique across processes (random high half) and cheap to make (a counter in
/// the low half), printed like a UUID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DecisionId(pub u128);

impl fmt::Display for DecisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0.to_be_bytes();
        let h = hex::encode(b);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

impl fmt::Debug for DecisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for DecisionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Hands out decision ids. The random half comes from the OS once; if the OS has no
/// randomness the clock stands in (ids stay unique within the process either way).
#[derive(Debug)]
pub struct DecisionIds {
    high: u64,
    next: AtomicU64,
}

impl Default for DecisionIds {
    fn default() -> Self {
        let high = getrandom::u64().unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Self {
            high,
            next: AtomicU64::new(1),
        }
    }
}

impl DecisionIds {
    pub fn next(&self) -> DecisionId {
        let low = self.next.fetch_add(1, Ordering::Relaxed);
        DecisionId((u128::from(self.high) << 64) | u128::from(low))
    }
}
