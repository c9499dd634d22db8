//! Policy: reading a policy directory, validating it whole, and compiling it into an immutable
//! [`Snapshot`], and the casbin reference that the compiled index is checked against. Pure:
//! files in, a snapshot (or every problem) out. What runs a policy in a sidecar — reload,
//! history, rollback, the stores and the watch — is the gate's ([`crate::gate`]); the policy
//! tests are run by [`crate::decision::fixtures`].

mod compile;
pub mod generate;
pub mod inspect;
mod model;
mod problem;
pub mod reference;
pub mod routes;
mod rows;
mod snapshot;
mod source;
pub mod synthetic;
mod taxonomy;

pub use compile::compile;
pub use model::SUPPORTED_MODEL;
pub use problem::{Problem, Problems, line_of, yaml_error_line};
pub use routes::{ROUTES_FILE, Route, SubjectSource};
pub use rows::{Action, Effect, GrantRow, LinkRow, POLICY_FILE, PolicyRows};
pub use snapshot::{
    CallerInfo, CategoryInfo, GrantCell, GrantKey, Limits, MatchedRule, MatchingRows, NodeId,
    PolicyVersion, PurposeInfo, SecrecyUse, Snapshot, Tree,
};
pub use source::{DESCRIPTORS_DIR, DescriptorFile, MODEL_FILE, PolicySource, descriptor_files};
pub use taxonomy::schema as taxonomy_schema;
pub use taxonomy::{CallerKind, TAXONOMY_FILE};

use std::path::Path;

/// Reads and compiles the policy in `dir`: a snapshot, or every problem found.
pub async fn load_dir(dir: &Path) -> Result<Snapshot, Problems> {
    let source = PolicySource::read_dir(dir).map_err(Problems)?;
    compile(source).await
}
