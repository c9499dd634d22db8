//! The `pdgate` binary: everything lives in the library; see `pdgate --help`.

fn main() -> std::process::ExitCode {
    pdgate::cli::main()
}
