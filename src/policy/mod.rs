//! Policy: reading a policy directory, validating it whole, and compiling it into an immutable
//! [`Snapshot`]. Also the policy tests (`policy/tests/*.yaml`), the casbin reference that
//! the compiled index is checked against, and the lifecycle of a running sidecar's policy
//! ([`manager`]: reload, history, rollback, shadow; [`store`]: where it is kept, [`fleet`] in
//! PostgreSQL for a fleet; [`watch`]: the file watch, which also follows the fleet).

pub mod bundle;
mod compile;
pub mod fixtures;
pub mod fleet;
pub mod manager;
mod model;
mod problem;
pub mod reference;
pub mod routes;
mod rows;
mod snapshot;
mod source;
pub mod store;
pub mod synthetic;
mod taxonomy;
pub mod watch;

pub use bundle::{Bundle, CheckError, Checked, TestFile};
pub use compile::compile;
pub use fleet::PostgresPolicyStore;
pub use manager::{Applied, Origin, PolicyManager, ReloadError, Status, VersionInfo};
pub use model::SUPPORTED_MODEL;
pub use problem::{Problem, Problems, line_of};
pub use routes::{ROUTES_FILE, Route, SubjectSource};
pub use rows::{Action, Effect, GrantRow, LinkRow, POLICY_FILE, PolicyRows};
pub use snapshot::{
    CallerInfo, CategoryInfo, GrantCell, GrantKey, Limits, MatchedRule, MatchingRows, NodeId,
    PolicyVersion, PurposeInfo, SecrecyUse, Snapshot, Tree,
};
pub use source::{MODEL_FILE, PolicySource};
pub use store::{FileStore, MemoryStore, Persisted, PolicyStore, StoreError};
pub use taxonomy::{CallerKind, TAXONOMY_FILE};

use std::path::Path;

/// Reads and compiles the policy in `dir`: a snapshot, or every problem found.
pub async fn load_dir(dir: &Path) -> Result<Snapshot, Problems> {
    let source = PolicySource::read_dir(dir).map_err(Problems)?;
    compile(source).await
}
