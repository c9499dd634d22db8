//! The key of the decision cache: every input a subject-independent decision depends on.
//! A full struct, never a hash of the request: a hash collision would hand one request
//! another's decision.

use crate::policy::{Action, NodeId, PolicyVersion};
use smallvec::SmallVec;

/// Everything a subject-independent decision depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub version: PolicyVersion,
    pub caller: u32,
    pub purpose: NodeId,
    pub action: Action,
    /// Sorted, without duplicates.
    pub categories: SmallVec<[NodeId; 4]>,
    pub recipient: Option<u32>,
}
