//! The module layers of `src/` (DESIGN §3: policy → decision → gate → doors → server → cli,
//! with the parts beside them placed where they are imported): every `crate::<module>` path
//! in a top-level module names a module of a lower layer. A new import that runs up the order
//! — the circle this prevents is a door imported by the engine, or the config by the gate —
//! fails here with the file and line.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a file that cannot be read fails the test"
)]

use std::collections::BTreeMap;
use std::path::Path;

/// Lowest first. A module may import modules of lower layers only, never its own layer's.
const LAYERS: &[&[&str]] = &[
    // Pure parts: no imports of the crate's other modules.
    &["subjects", "identity", "message"],
    &["policy"],
    &["decision"],
    &["audit", "registry"],
    &["telemetry"],
    // The running core: admission pipeline and policy lifecycle.
    &["gate"],
    &["proto", "transport", "replay", "client"],
    &["config"],
    // The doors, and the demo that drives them.
    &["sidecar", "api", "demo"],
    &["server"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level modules `text` names as `crate::<module>` (outside `//` comments), with
/// the line of the first mention.
fn imports(text: &str) -> BTreeMap<String, usize> {
    let mut found = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.entry(name).or_insert(n + 1);
            }
            // `use crate::{a, b::c}`: every name in the group.
            if let Some(group) = rest.strip_prefix('{') {
                for item in group.split('}').next().unwrap_or("").split(',') {
                    let name = item.trim().split("::").next().unwrap_or("").to_owned();
                    if !name.is_empty() {
                        found.entry(name).or_insert(n + 1);
                    }
                }
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_import_between_modules_runs_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut checked = 0;
    let mut problems = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(own) = layer_of(&top) else {
            problems.push(format!(
                "src/{top}: a top-level module with no layer; place it in LAYERS (tests/layers.rs)"
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (module, line) in imports(&text) {
            if module == top || module == "self" || module == "super" {
                continue;
            }
            checked += 1;
            match layer_of(&module) {
                Some(theirs) if theirs < own => {}
                Some(_) => problems.push(format!(
                    "{}:{line}: `{top}` imports `crate::{module}`, which is not below it",
                    rel.display()
                )),
                None => problems.push(format!(
                    "{}:{line}: `crate::{module}` is not a module with a layer",
                    rel.display()
                )),
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} imports found: is the parser broken?"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_parser_sees_single_and_grouped_imports() {
    let found = imports(
        "use crate::gate::Gate;\nuse crate::{audit, decision::Decision};\n// crate::cli in a comment\nlet x = crate::policy::load_dir;\n",
    );
    let names: Vec<&str> = found.keys().map(String::as_str).collect();
    assert_eq!(names, ["audit", "decision", "gate", "policy"]);
    assert_eq!(found["policy"], 4);
}
