//! `pdgate routes generate`: writes `routes.yaml` from the protected service's annotated protos
//! (`policy::generate`). Prints to stdout, or writes a file (never over one that exists unless
//! told to), and says on stderr what to review.

use super::{EXIT_DENIED, EXIT_OK, EXIT_USAGE};
use crate::policy::{self, DESCRIPTORS_DIR, TAXONOMY_FILE};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
pdgate routes generate policy/ > routes.draft.yaml\n  \
pdgate routes generate policy/ --output policy/routes.yaml --force && pdgate policy validate policy/\n  \
pdgate routes generate policy/ --descriptors ../my-service/proto\n\n\
Exit codes: 0 generated, 1 the descriptors or the taxonomy have problems (listed on stderr), \
2 bad command-line input (an output file that exists without --force).")]
pub struct RoutesGenerateArgs {
    /// Policy directory: its taxonomy.toml names the categories the annotations may use, and
    /// its descriptors/ holds the service's protos (unless --descriptors says otherwise).
    #[arg(value_name = "DIR", env = "PDGATE_POLICY", default_value = "policy")]
    dir: PathBuf,
    /// Directory of the service's `.proto` files (annotated with pdgate/v1/annotations.proto)
    /// or FileDescriptorSets, instead of DIR/descriptors/.
    #[arg(long, value_name = "DIR")]
    descriptors: Option<PathBuf>,
    /// Write the routes to FILE instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<PathBuf>,
    /// Replace --output's FILE when it exists (a hand-edited routes.yaml is lost).
    #[arg(long, requires = "output")]
    force: bool,
}

pub fn generate(args: RoutesGenerateArgs) -> u8 {
    if let Some(output) = &args.output
        && output.exists()
        && !args.force
    {
        eprintln!(
            "error: {} exists; pass --force to replace it (its hand-written routes are lost), or write elsewhere",
            output.display()
        );
        return EXIT_USAGE;
    }
    let descriptors_dir = args
        .descriptors
        .clone()
        .unwrap_or_else(|| args.dir.join(DESCRIPTORS_DIR));
    let taxonomy_path = args.dir.join(TAXONOMY_FILE);
    let taxonomy = match std::fs::read_to_string(&taxonomy_path) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("error: {}: cannot be read: {e}", taxonomy_path.display());
            return EXIT_DENIED;
        }
    };
    let generated = policy::descriptor_files(&descriptors_dir)
        .and_then(|files| policy::generate::generate(&files, &taxonomy));
    let generated = match generated {
        Ok(generated) => generated,
        Err(problems) => {
            eprintln!(
                "error: no routes generated from {} ({} problem{}):",
                descriptors_dir.display(),
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            );
            for problem in problems {
                eprintln!("  {problem}");
            }
            return EXIT_DENIED;
        }
    };
    for note in &generated.notes {
        eprintln!("note: {note}");
    }
    match &args.output {
        None => out!("{}", generated.text),
        Some(path) => {
            if let Err(e) = write(path, &generated.text) {
                eprintln!("error: {}: cannot be written: {e}", path.display());
                return EXIT_DENIED;
            }
            eprintln!(
                "{}: {} route{} written; review the categories (move to `minimize` what a caller may go without), then `pdgate policy validate`",
                path.display(),
                generated.routed,
                if generated.routed == 1 { "" } else { "s" }
            );
        }
    }
    EXIT_OK
}

/// Writes through a temporary file and a rename, so that a watching sidecar never reads a
/// half-written routes.yaml.
fn write(path: &Path, text: &str) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".generating");
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}
