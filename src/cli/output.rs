//! Everything the CLI prints on stdout goes through here, so that a reader that stops early
//! (`pdgate audit query … | head -n 1`) ends the command quietly instead of `println!`'s panic
//! ("failed printing to stdout: Broken pipe").
//!
//! Once stdout is found closed, every later write is skipped and [`closed`] turns true: loops
//! that could print for long (`audit query`, `audit tail --follow`, `policy diff`) stop there.
//! The command then exits with the code it had reached — `check` still exits 1 for a deny —
//! so a pipeline's status does not depend on how fast the reader closed the pipe.
//!
//! Deprecated spellings of flags and environment variables are reported here too, one line on
//! stderr each, so that every subcommand words them alike.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether a write found stdout closed by its reader.
pub fn closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// Writes `args` to stdout; a closed stdout (EPIPE) is remembered and every later write
/// skipped. Other write errors are reported once on stderr and treated the same way: the
/// output cannot continue.
pub fn write(args: std::fmt::Arguments<'_>) {
    if closed() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let result = out.write_fmt(args).and_then(|()| out.flush());
    if let Err(e) = result {
        CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write to stdout: {e}");
        }
    }
}

/// Writes raw bytes (a generated completion script or man page) to stdout, like [`write`].
pub fn write_bytes(bytes: &[u8]) {
    if closed() {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write to stdout: {e}");
        }
    }
}

/// One warning line for a deprecated flag or environment variable that was used.
pub fn deprecated(old: &str, new: &str) {
    eprintln!("warning: `{old}` is deprecated and will be removed; use `{new}`");
}

/// The value of environment variable `new`, or else of its deprecated spelling `old` (with
/// the warning).
pub fn env_var(new: &str, old: &str) -> Option<std::ffi::OsString> {
    if let Some(v) = std::env::var_os(new) {
        return Some(v);
    }
    let v = std::env::var_os(old)?;
    deprecated(old, new);
    Some(v)
}
