//! Reading a policy directory: the files a snapshot is compiled from — `model.conf`,
//! `policy.csv`, `taxonomy.toml`, `routes.yaml`, and the protected service's descriptors in
//! `descriptors/`.

use super::problem::Problem;
use super::routes::ROUTES_FILE;
use super::rows::POLICY_FILE;
use super::taxonomy::TAXONOMY_FILE;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub const MODEL_FILE: &str = "model.conf";

/// The text of a policy, as read from its directory (or handed over whole by an admin API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySource {
    /// Where it came from, for messages.
    pub origin: PathBuf,
    pub model: String,
    pub policy: String,
    pub taxonomy: String,
    /// `routes.yaml`, when there is one (only the sidecar needs routes).
    pub routes: Option<String>,
    /// `descriptors/`: the protected service's `.proto` files or FileDescriptorSets, by
    /// name (the path below `descriptors/`, `/`-separated), sorted. Empty when there are none.
    pub descriptors: Vec<DescriptorFile>,
}

/// The directory of the protected service's descriptors, inside the policy directory.
pub const DESCRIPTORS_DIR: &str = "descriptors";

/// One file of `descriptors/`: a `.proto` file (compiled at load), or a FileDescriptorSet
/// (`.binpb`, `.pb`, `.desc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorFile {
    pub name: String,
    pub content: Vec<u8>,
}

impl PolicySource {
    /// Reads `model.conf`, `policy.csv` and `taxonomy.toml` from `dir`. A missing directory or
    /// file is a problem of its own, named with its path.
    pub fn read_dir(dir: &Path) -> Result<Self, Vec<Problem>> {
        Self::read(dir, None)
    }

    /// Like [`read_dir`](Self::read_dir), with the routes taken from `routes` instead of
    /// `dir/routes.yaml` (which is optional; a given `routes` file is not).
    pub fn read(dir: &Path, routes: Option<&Path>) -> Result<Self, Vec<Problem>> {
        if !dir.is_dir() {
            return Err(vec![Problem::in_file(
                &dir.display().to_string(),
                "is not a policy directory (expected a directory holding model.conf, policy.csv and taxonomy.toml)",
            )]);
        }
        let mut problems = Vec::new();
        let mut read = |name: &str| -> String {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    problems.push(Problem::in_file(
                        &path.display().to_string(),
                        format!("cannot be read: {e}"),
                    ));
                    String::new()
                }
            }
        };
        let model = read(MODEL_FILE);
        let policy = read(POLICY_FILE);
        let taxonomy = read(TAXONOMY_FILE);
        let routes_path = routes.map_or_else(|| dir.join(ROUTES_FILE), Path::to_path_buf);
        let routes = match std::fs::read_to_string(&routes_path) {
            Ok(text) => Some(text),
            Err(e) if routes.is_none() && e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                problems.push(Problem::in_file(
                    &routes_path.display().to_string(),
                    format!("cannot be read: {e}"),
                ));
                None
            }
        };
        let descriptors = read_descriptors(&dir.join(DESCRIPTORS_DIR), &mut problems);
        let source = Self {
            origin: dir.to_path_buf(),
            model,
            policy,
            taxonomy,
            routes,
            descriptors,
        };
        if problems.is_empty() {
            Ok(source)
        } else {
            Err(problems)
        }
    }

    /// SHA-256 over the three files, each prefixed by its name and length so that moving text
    /// from one file to another changes the version.
    pub fn digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for (name, text) in [
            (MODEL_FILE, &self.model),
            (POLICY_FILE, &self.policy),
            (TAXONOMY_FILE, &self.taxonomy),
        ] {
            hasher.update(name.as_bytes());
            hasher.update((text.len() as u64).to_be_bytes());
            hasher.update(text.as_bytes());
        }
        if let Some(routes) = &self.routes {
            hasher.update(ROUTES_FILE.as_bytes());
            hasher.update((routes.len() as u64).to_be_bytes());
            hasher.update(routes.as_bytes());
        }
        for file in &self.descriptors {
            let name = format!("{DESCRIPTORS_DIR}/{}", file.name);
            hasher.update(name.as_bytes());
            hasher.update((file.content.len() as u64).to_be_bytes());
            hasher.update(&file.content);
        }
        hasher.finalize().into()
    }
}

/// The descriptor files below `dir` (`.proto` files and FileDescriptorSets), sorted by name,
/// with their names relative to `dir`: what a policy's `descriptors/` holds.
pub fn descriptor_files(dir: &Path) -> Result<Vec<DescriptorFile>, Vec<Problem>> {
    if !dir.is_dir() {
        return Err(vec![Problem::in_file(
            &dir.display().to_string(),
            "is not a directory",
        )]);
    }
    let mut problems = Vec::new();
    let files = read_descriptors(dir, &mut problems);
    if problems.is_empty() {
        Ok(files)
    } else {
        Err(problems)
    }
}

/// The files below `dir` (none when it does not exist), sorted by name. Hidden files and
/// directories (a Kubernetes ConfigMap's `..data`) are skipped.
fn read_descriptors(dir: &Path, problems: &mut Vec<Problem>) -> Vec<DescriptorFile> {
    let mut files = Vec::new();
    if dir.is_dir() {
        walk(dir, dir, &mut files, problems);
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    files
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<DescriptorFile>, problems: &mut Vec<Problem>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            problems.push(Problem::in_file(
                &dir.display().to_string(),
                format!("cannot be read: {e}"),
            ));
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(root, &path, files, problems);
            continue;
        }
        let name = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        match std::fs::read(&path) {
            Ok(content) => files.push(DescriptorFile { name, content }),
            Err(e) => problems.push(Problem::in_file(
                &path.display().to_string(),
                format!("cannot be read: {e}"),
            )),
        }
    }
}
