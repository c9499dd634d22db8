//! Where the current policy is kept between restarts, behind one small trait so that the
//! embedded policy directory ([`FileStore`]) and a fleet's PostgreSQL store
//! ([`PostgresPolicyStore`](super::fleet::PostgresPolicyStore)) plug into the same
//! [`PolicyManager`](super::manager::PolicyManager).
//!
//! A store answers three questions: what is the stored policy now ([`PolicyStore::current`]),
//! has it perhaps changed ([`PolicyStore::marker`], cheap, polled by the watch), and keep this
//! one ([`PolicyStore::publish`], after an Apply or a Rollback).

use super::bundle::{Bundle, TESTS_DIR, is_test_name};
use crate::policy::{
    DESCRIPTORS_DIR, MODEL_FILE, POLICY_FILE, Problem, ROUTES_FILE, TAXONOMY_FILE,
};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the stored policy cannot be read: {}", join(.0))]
    Read(Vec<Problem>),
    #[error("`{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
}

fn join(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Who made a version active.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The policy directory: at start, or a change seen by the file watch.
    File,
    /// An admin identity, through `PolicyAdmin`.
    Admin(String),
    /// Another sidecar of the fleet, through the shared store.
    Fleet,
}

impl Origin {
    /// `applied_by` in `Status`: `file`, `fleet`, or the admin identity.
    pub fn applied_by(&self) -> String {
        match self {
            Self::File => "file".into(),
            Self::Admin(identity) => identity.clone(),
            Self::Fleet => "fleet".into(),
        }
    }
}

/// Whether a published policy survives a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persisted {
    Yes,
    /// Kept in memory only, and why (a read-only policy directory, say).
    No(String),
}

#[async_trait::async_trait]
pub trait PolicyStore: Send + Sync {
    /// `files` or `postgres` (`Status.store`).
    fn kind(&self) -> &'static str;

    /// The stored policy, `None` when the store holds none.
    async fn current(&self) -> Result<Option<Bundle>, StoreError>;

    /// A value that changes whenever the stored policy may have changed; cheap enough to be
    /// polled every debounce interval. `None` when the store never changes by itself.
    async fn marker(&self) -> Option<u64>;

    /// Keeps `bundle` as the stored policy. `Ok(Persisted::No(why))` when the store cannot
    /// keep it but the policy may still be applied in memory; `Err` when it must not be.
    async fn publish(&self, bundle: &Bundle) -> Result<Persisted, StoreError>;

    /// [`publish`](Self::publish), with who applied the bundle and why, for a store that keeps
    /// them (the fleet's table does; a directory has no place for them).
    async fn publish_by(
        &self,
        bundle: &Bundle,
        applied_by: &str,
        comment: &str,
    ) -> Result<Persisted, StoreError> {
        let _ = (applied_by, comment);
        self.publish(bundle).await
    }

    /// Woken when the stored policy may have changed, for a store that can tell (the fleet's
    /// NOTIFY); the watch then looks at once instead of at its next poll.
    fn wakeup(&self) -> Option<Arc<Notify>> {
        None
    }

    /// Whether a change must stay put for one poll interval before it is loaded. Files are
    /// written in several steps and must; a database row is whole when it is committed.
    fn settles(&self) -> bool {
        true
    }

    /// Whose change a change of the store is: the policy directory's, or the fleet's.
    fn origin(&self) -> Origin {
        Origin::File
    }
}

/// No store: policies live in memory only (tests, benchmarks, the `Shared` default).
#[derive(Debug, Default)]
pub struct MemoryStore;

#[async_trait::async_trait]
impl PolicyStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn current(&self) -> Result<Option<Bundle>, StoreError> {
        Ok(None)
    }

    async fn marker(&self) -> Option<u64> {
        None
    }

    async fn publish(&self, _bundle: &Bundle) -> Result<Persisted, StoreError> {
        Ok(Persisted::No(
            "no policy directory (in-memory store)".into(),
        ))
    }
}

/// The embedded store: the policy directory itself (and a `routes` file configured apart).
///
/// `publish` writes the bundle's files into the directory so that a restart loads the
/// applied policy and the watch, reading its own write, finds the active version (a no-op).
/// Every file is first written to a temporary name in its directory and only then renamed
/// over the old one: a failed write leaves the directory as it was, never half old and half
/// new (which the watch could otherwise load as a policy nobody wrote). `tests/` ends up
/// holding exactly the bundle's tests. A read-only directory (a Kubernetes ConfigMap) is not
/// an error: the policy is applied in memory and `Status` says so.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    /// `routes` from the configuration, when it is not `DIR/routes.yaml`.
    routes: Option<PathBuf>,
}

impl FileStore {
    pub fn new(dir: PathBuf, routes: Option<PathBuf>) -> Self {
        Self { dir, routes }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn routes_path(&self) -> PathBuf {
        self.routes
            .clone()
            .unwrap_or_else(|| self.dir.join(ROUTES_FILE))
    }

    /// The files whose metadata the marker covers.
    fn watched(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = [MODEL_FILE, POLICY_FILE, TAXONOMY_FILE]
            .iter()
            .map(|f| self.dir.join(f))
            .collect();
        paths.push(self.routes_path());
        let tests = self.dir.join(TESTS_DIR);
        paths.push(tests.clone());
        if let Ok(entries) = std::fs::read_dir(&tests) {
            let mut more: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            more.sort();
            paths.extend(more);
        }
        let descriptors = self.dir.join(DESCRIPTORS_DIR);
        paths.push(descriptors.clone());
        let mut more = Vec::new();
        files_below(&descriptors, &mut more);
        more.sort();
        paths.extend(more);
        paths
    }

    fn write_all(&self, bundle: &Bundle) -> Result<(), StoreError> {
        if self.routes.is_some() && bundle.source.routes.is_none() {
            return Err(StoreError::Refused(format!(
                "the sidecar reads its routes from `{}` (configuration `routes`); the bundle must carry routes",
                self.routes_path().display()
            )));
        }
        let tests_dir = self.dir.join(TESTS_DIR);
        let mut files: Vec<(PathBuf, &[u8])> = vec![
            (self.dir.join(MODEL_FILE), bundle.source.model.as_bytes()),
            (self.dir.join(POLICY_FILE), bundle.source.policy.as_bytes()),
            (
                self.dir.join(TAXONOMY_FILE),
                bundle.source.taxonomy.as_bytes(),
            ),
        ];
        if let Some(routes) = &bundle.source.routes {
            files.push((self.routes_path(), routes.as_bytes()));
        }
        let descriptors_dir = self.dir.join(DESCRIPTORS_DIR);
        for file in &bundle.source.descriptors {
            let safe = !file.name.is_empty()
                && file
                    .name
                    .split('/')
                    .all(|part| !part.is_empty() && part != ".." && !part.starts_with('.'));
            if !safe {
                return Err(StoreError::Refused(format!(
                    "descriptor file name `{}` is not a relative path inside `{DESCRIPTORS_DIR}/`",
                    file.name
                )));
            }
            let path = descriptors_dir.join(&file.name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| StoreError::Io {
                    path: parent.to_owned(),
                    source,
                })?;
            }
            files.push((path, &file.content));
        }
        if !bundle.tests.is_empty() {
            std::fs::create_dir_all(&tests_dir).map_err(|source| StoreError::Io {
                path: tests_dir.clone(),
                source,
            })?;
        }
        for test in &bundle.tests {
            if !is_test_name(&test.name) {
                return Err(StoreError::Refused(format!(
                    "test file name `{}` is not a plain `.yaml` file name",
                    test.name
                )));
            }
            files.push((tests_dir.join(&test.name), test.content.as_bytes()));
        }
        // Stage every file; on any failure remove what was staged and change nothing.
        let mut staged: Vec<(PathBuf, PathBuf)> = Vec::with_capacity(files.len());
        for (path, text) in &files {
            let tmp = temp_name(path);
            if let Err(source) = std::fs::write(&tmp, text) {
                let _ = std::fs::remove_file(&tmp);
                for (t, _) in &staged {
                    let _ = std::fs::remove_file(t);
                }
                return Err(StoreError::Io {
                    path: path.clone(),
                    source,
                });
            }
            staged.push((tmp, path.clone()));
        }
        for (tmp, path) in &staged {
            std::fs::rename(tmp, path).map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        }
        // What the bundle does not have goes: its routes, tests it no longer carries.
        if bundle.source.routes.is_none() {
            remove_if_present(&self.routes_path())?;
        }
        let mut present = Vec::new();
        files_below(&descriptors_dir, &mut present);
        for path in present {
            if !files.iter().any(|(kept, _)| *kept == path) {
                remove_if_present(&path)?;
            }
        }
        let keep: Vec<&str> = bundle.tests.iter().map(|t| t.name.as_str()).collect();
        if let Ok(entries) = std::fs::read_dir(&tests_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if is_test_name(&name) && !keep.contains(&name.as_str()) {
                    remove_if_present(&entry.path())?;
                }
            }
        }
        Ok(())
    }
}

/// Every file below `dir`, recursively (none when it does not exist).
fn files_below(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_below(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.pdgate-{}.tmp", std::process::id()))
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Whether an I/O error means "this directory cannot be written" (as opposed to a fault).
fn read_only(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
    )
}

#[async_trait::async_trait]
impl PolicyStore for FileStore {
    fn kind(&self) -> &'static str {
        "files"
    }

    async fn current(&self) -> Result<Option<Bundle>, StoreError> {
        let store = self.clone();
        let read = tokio::task::spawn_blocking(move || {
            Bundle::read_dir(&store.dir, store.routes.as_deref())
        })
        .await
        .map_err(|e| StoreError::Refused(format!("reading the policy directory failed: {e}")))?;
        read.map(Some).map_err(StoreError::Read)
    }

    async fn marker(&self) -> Option<u64> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            for path in store.watched() {
                path.hash(&mut hasher);
                // Follows symlinks: a ConfigMap update swaps the `..data` link, and the files'
                // targets (with new times) are what changes.
                match std::fs::metadata(&path) {
                    Ok(meta) => {
                        meta.len().hash(&mut hasher);
                        meta.modified().ok().hash(&mut hasher);
                        #[cfg(unix)]
                        {
                            use std::os::unix::fs::MetadataExt;
                            meta.ino().hash(&mut hasher);
                            meta.ctime_nsec().hash(&mut hasher);
                        }
                    }
                    Err(e) => e.kind().hash(&mut hasher),
                }
            }
            hasher.finish()
        })
        .await
        .ok()
    }

    async fn publish(&self, bundle: &Bundle) -> Result<Persisted, StoreError> {
        let store = self.clone();
        let bundle = bundle.clone();
        let written = tokio::task::spawn_blocking(move || store.write_all(&bundle))
            .await
            .map_err(|e| {
                StoreError::Refused(format!("writing the policy directory failed: {e}"))
            })?;
        match written {
            Ok(()) => Ok(Persisted::Yes),
            Err(StoreError::Io { path, source }) if read_only(&source) => {
                Ok(Persisted::No(format!(
                    "the policy directory cannot be written (`{}`: {source}); applied in memory only, a restart loads the directory's policy",
                    path.display()
                )))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::bundle::TestFile;
    use std::path::Path;

    fn default_bundle() -> Bundle {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
        Bundle::read_dir(&dir, None).unwrap()
    }

    #[tokio::test]
    async fn publish_writes_the_whole_bundle_and_current_reads_it_back() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::new(tmp.path().to_path_buf(), None);
        std::fs::create_dir_all(tmp.path().join(TESTS_DIR)).unwrap();
        std::fs::write(tmp.path().join("tests/stale.yaml"), "cases: []").unwrap();
        let before = store.marker().await;

        let mut bundle = default_bundle();
        bundle.tests.truncate(2);
        bundle.tests.push(TestFile {
            name: "new.yaml".into(),
            content: "cases: []\n".into(),
        });
        bundle.tests.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(store.publish(&bundle).await.unwrap(), Persisted::Yes);
        assert_ne!(store.marker().await, before);

        let read = store.current().await.unwrap().unwrap();
        assert_eq!(read.version(), bundle.version());
        // Exactly the bundle's tests: the stale file is gone, no temporary file is left.
        assert_eq!(read.tests, bundle.tests);
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());

        // A bundle without routes removes the directory's routes.yaml.
        let mut no_routes = bundle.clone();
        no_routes.source.routes = None;
        store.publish(&no_routes).await.unwrap();
        assert!(!tmp.path().join(ROUTES_FILE).exists());
    }

    #[tokio::test]
    async fn a_failed_write_leaves_the_directory_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::new(tmp.path().to_path_buf(), None);
        let bundle = default_bundle();
        store.publish(&bundle).await.unwrap();
        // `tests` is now a file: the test files cannot be staged, so nothing is renamed.
        std::fs::remove_dir_all(tmp.path().join(TESTS_DIR)).unwrap();
        std::fs::write(tmp.path().join(TESTS_DIR), "not a directory").unwrap();
        let mut changed = bundle.clone();
        changed.source.policy.push_str("\n# changed\n");
        assert!(store.publish(&changed).await.is_err());
        let policy = std::fs::read_to_string(tmp.path().join(POLICY_FILE)).unwrap();
        assert_eq!(policy, bundle.source.policy);
    }
}
