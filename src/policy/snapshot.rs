//! The compiled, immutable policy: what `decide()` reads on every call.
//!
//! casbin's `enforce` scans every `p` row and evaluates the matcher for each (see STACK.md:
//! ~85 µs per category on the default policy, linear in the number of rows). The snapshot
//! instead indexes the grants by `(role, action, purpose, category)`: a decision walks the
//! caller's roles × the purpose's ancestors × each category's ancestors and looks each triple
//! up, so its cost depends on the depth of the trees, not on the number of rows. The
//! differential tests check this index against casbin itself.

use super::rows::{Action, PolicyRows};
use super::source::PolicySource;
use super::taxonomy::CallerKind;
use rustc_hash::FxHashMap;
use serde::Serialize;
use smallvec::SmallVec;
use std::fmt;
use std::sync::Arc;

/// The policy version: SHA-256 of the policy files as loaded. Equal versions decide equally.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyVersion(pub [u8; 32]);

impl PolicyVersion {
    /// The first 12 hex digits, for people.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Display for PolicyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PolicyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyVersion({})", self.short())
    }
}

impl Serialize for PolicyVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A rule of `policy.csv` as a decision reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MatchedRule {
    /// The row, normalised: `p, role:billing, service.billing, customer.billing, read, allow`.
    pub rule: Arc<str>,
    /// Its line in `policy.csv`.
    pub line: usize,
}

/// Index of a node in a [`Tree`].
pub type NodeId = u32;

/// A tree of ids (purposes or categories) from the `g2`/`g3` rows, with each node's ancestors
/// precomputed so that "is within" is a short scan and never a walk.
#[derive(Debug)]
pub struct Tree<T> {
    pub(crate) names: Vec<Arc<str>>,
    pub(crate) index: FxHashMap<Box<str>, NodeId>,
    /// `ancestors[n]` = n, its parent, ..., the root.
    pub(crate) ancestors: Vec<SmallVec<[NodeId; 4]>>,
    /// `descendants[n]` = every node below n (not n itself).
    pub(crate) descendants: Vec<Vec<NodeId>>,
    pub(crate) info: Vec<T>,
}

impl<T> Tree<T> {
    pub fn id(&self, name: &str) -> Option<NodeId> {
        self.index.get(name).copied()
    }

    pub fn name(&self, id: NodeId) -> &Arc<str> {
        &self.names[id as usize]
    }

    pub fn info(&self, id: NodeId) -> &T {
        &self.info[id as usize]
    }

    /// `id` and its ancestors, nearest first.
    pub fn ancestors(&self, id: NodeId) -> &[NodeId] {
        &self.ancestors[id as usize]
    }

    /// Every node below `id`, not `id` itself.
    pub fn descendants(&self, id: NodeId) -> &[NodeId] {
        &self.descendants[id as usize]
    }

    /// Whether `id` is `ancestor` or lies under it.
    pub fn is_within(&self, id: NodeId, ancestor: NodeId) -> bool {
        self.ancestors(id).contains(&ancestor)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn iter_names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.names.iter()
    }
}

/// How the secrecy of communications (§5) treats a purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecrecyUse {
    /// Communications data may be used for it.
    Allowed,
    /// Only with the subject's separate consent to communications data for it.
    NeedsConsent,
    /// Never.
    Never,
}

#[derive(Debug)]
pub struct PurposeInfo {
    pub clause: Arc<str>,
    pub description: Arc<str>,
    /// The description in Japanese; empty where the taxonomy gives none.
    pub description_ja: Arc<str>,
    /// The clause that makes consent necessary, from this purpose or its nearest ancestor.
    pub consent_clause: Option<Arc<str>>,
    /// Whom the data goes to, from this purpose or its nearest ancestor (with its clause).
    pub recipient: Option<(CallerKind, Arc<str>)>,
    pub secrecy: SecrecyUse,
    /// Only de-identified categories may be used for it.
    pub deidentified_only: bool,
    /// A suspension of use does not stop it.
    pub use_exempt: bool,
    /// A deletion request does not stop it.
    pub deletion_exempt: bool,
    /// Who is responsible for the data used for it, from this purpose or its nearest ancestor,
    /// and the clause that names them (§2(d) for joint use).
    pub manager: Option<(Arc<str>, Arc<str>)>,
    /// A suspension of third-party provision stops it.
    pub provision: bool,
    /// A call for it must name its data subject (answering a person's request, say).
    pub subject_required: bool,
}

#[derive(Debug)]
pub struct CategoryInfo {
    pub clause: Arc<str>,
    pub description: Arc<str>,
    /// The description in Japanese; empty where the taxonomy gives none.
    pub description_ja: Arc<str>,
    /// It is, or contains, communications data (§5).
    pub secrecy: bool,
    pub deidentified: bool,
}

#[derive(Debug)]
pub struct CallerInfo {
    pub name: Arc<str>,
    pub id: u32,
    pub kind: CallerKind,
    pub role: Arc<str>,
    pub clause: Arc<str>,
    pub description: Arc<str>,
    /// The description in Japanese; empty where the taxonomy gives none.
    pub description_ja: Arc<str>,
    /// The caller's role and every role it inherits (`g` rows), as role ids.
    pub roles: SmallVec<[u32; 2]>,
    /// The purposes it may declare; a purpose is registered when one of its ancestors is here.
    pub registered: SmallVec<[NodeId; 4]>,
}

/// Key of the grant index. A row `p, role, purpose, category, action, eft` sits under its own
/// key; a request matches it when the row's purpose and category are ancestors (or equal) of
/// the request's, exactly as casbin's `g2`/`g3` match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GrantKey {
    pub role: u32,
    pub purpose: NodeId,
    pub category: NodeId,
    pub action: Action,
}

/// The rows under one [`GrantKey`], as indexes into [`Snapshot::rules`].
#[derive(Debug, Default)]
pub struct GrantCell {
    pub allow: SmallVec<[u32; 1]>,
    pub deny: SmallVec<[u32; 1]>,
}

#[derive(Debug)]
pub struct Limits {
    pub secrecy_clause: Arc<str>,
    pub never_recipients: SmallVec<[CallerKind; 2]>,
    pub deidentification_clause: Arc<str>,
    pub suspension_clause: Arc<str>,
}

/// A whole policy, compiled and validated. Immutable: a new policy is a new snapshot.
#[derive(Debug)]
pub struct Snapshot {
    pub(crate) version: PolicyVersion,
    pub(crate) purposes: Tree<PurposeInfo>,
    pub(crate) categories: Tree<CategoryInfo>,
    /// Callers by id (`CallerInfo::id`), and their index by name.
    pub(crate) callers: Vec<CallerInfo>,
    pub(crate) caller_index: FxHashMap<Box<str>, u32>,
    pub(crate) roles: Vec<Arc<str>>,
    pub(crate) grants: FxHashMap<GrantKey, GrantCell>,
    pub(crate) rules: Vec<MatchedRule>,
    pub(crate) limits: Limits,
    /// gRPC method path -> route.
    pub(crate) routes: std::collections::BTreeMap<String, super::routes::Route>,
    /// What validation found worth saying but not refusing (a route that trusts the
    /// caller's `x-data-subject`), with where.
    pub(crate) warnings: Vec<super::problem::Problem>,
    /// The files it was built from (for overlays in policy tests and for the casbin reference).
    pub(crate) source: PolicySource,
    pub(crate) rows: PolicyRows,
}

impl Snapshot {
    pub fn version(&self) -> PolicyVersion {
        self.version
    }

    pub fn source(&self) -> &PolicySource {
        &self.source
    }

    pub fn rows(&self) -> &PolicyRows {
        &self.rows
    }

    pub fn purposes(&self) -> &Tree<PurposeInfo> {
        &self.purposes
    }

    pub fn categories(&self) -> &Tree<CategoryInfo> {
        &self.categories
    }

    pub fn caller(&self, name: &str) -> Option<&CallerInfo> {
        self.caller_index
            .get(name)
            .map(|id| &self.callers[*id as usize])
    }

    pub fn caller_by_id(&self, id: u32) -> &CallerInfo {
        &self.callers[id as usize]
    }

    /// Callers in taxonomy order.
    pub fn callers(&self) -> &[CallerInfo] {
        &self.callers
    }

    pub fn role_name(&self, role: u32) -> &Arc<str> {
        &self.roles[role as usize]
    }

    pub fn rule(&self, id: u32) -> &MatchedRule {
        &self.rules[id as usize]
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    pub fn route(&self, path: &str) -> Option<&super::routes::Route> {
        self.routes.get(path)
    }

    pub fn warnings(&self) -> &[super::problem::Problem] {
        &self.warnings
    }

    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The rows of stage 2 for one category: the allow and deny rows of every role the
    /// caller holds, for the purpose or an ancestor, on the category or an ancestor, for the
    /// action. casbin's `enforce` with this model allows exactly when `allow` is non-empty and
    /// `deny` is empty.
    pub fn matching_rows(
        &self,
        caller: &CallerInfo,
        purpose: NodeId,
        category: NodeId,
        action: Action,
    ) -> MatchingRows {
        let mut rows = MatchingRows::default();
        for &role in &caller.roles {
            for &p in self.purposes.ancestors(purpose) {
                for &c in self.categories.ancestors(category) {
                    let key = GrantKey {
                        role,
                        purpose: p,
                        category: c,
                        action,
                    };
                    if let Some(cell) = self.grants.get(&key) {
                        rows.allow.extend_from_slice(&cell.allow);
                        rows.deny.extend_from_slice(&cell.deny);
                    }
                }
            }
        }
        rows
    }
}

/// Rule ids that match one (caller, purpose, category, action).
#[derive(Debug, Default)]
pub struct MatchingRows {
    pub allow: SmallVec<[u32; 4]>,
    pub deny: SmallVec<[u32; 2]>,
}

impl MatchingRows {
    /// casbin's effect: some allow and no deny.
    pub fn allowed(&self) -> bool {
        !self.allow.is_empty() && self.deny.is_empty()
    }
}
