//! Reading a policy directory: the three files a snapshot is compiled from.

use super::problem::Problem;
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
}

impl PolicySource {
    /// Reads `model.conf`, `policy.csv` and `taxonomy.toml` from `dir`. A missing directory or
    /// file is a problem of its own, named with its path.
    pub fn read_dir(dir: &Path) -> Result<Self, Vec<Problem>> {
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
        let source = Self {
            origin: dir.to_path_buf(),
            model: read(MODEL_FILE),
            policy: read(POLICY_FILE),
            taxonomy: read(TAXONOMY_FILE),
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
        hasher.finalize().into()
    }
}
