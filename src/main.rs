//! The `pdgate` binary: everything lives in the library; see `pdgate --help`.

/// mimalloc rather than glibc's malloc: after a burst of connections closes, glibc keeps the
/// freed memory in its arenas (RSS stayed at +60 MiB after 5 000 idle connections closed, and
/// grew with each burst); mimalloc gives freed pages back to the system (docs/operations.md,
/// "Memory").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    pdgate::cli::main()
}
