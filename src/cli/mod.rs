//! The `pdgate` command line. Exit codes: 0 ok or allowed, 1 denied or a failed check,
//! 2 bad input on the command line.

/// `print!` for the CLI: see [`output`] (a closed stdout ends the output quietly).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::write(format_args!($($arg)*))
    };
}

/// `println!` for the CLI: see [`output`].
macro_rules! outln {
    () => {
        $crate::cli::output::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod admin_client;
mod audit;
mod check;
pub mod output;
mod policy_cmd;
mod policy_diff;
mod policy_test;
mod report;
mod routes_cmd;
mod serve;
mod subjects;

use clap::{Args, CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code: allowed, valid, passed.
pub const EXIT_OK: u8 = 0;
/// Exit code: denied, invalid policy, failed test.
pub const EXIT_DENIED: u8 = 1;
/// Exit code: bad input on the command line.
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "pdgate",
    version,
    about = "gRPC access-control sidecar for personal-data stores",
    long_about = "pdgate decides whether a caller may do an action on categories of personal data \
for the purpose of use it declares, from casbin purpose-based rules, within the secrecy of \
communications and the data subject's consent and requests.\n\n\
Exit codes: 0 allowed / ok, 1 denied / failed check, 2 bad command-line input. A reader that \
closes stdout early (`pdgate audit query | head -n 1`) ends the output quietly, and the exit code \
is the one the command had reached (`check` still exits 1 for a deny).\n\n\
Deprecated spellings (still accepted, with a warning on stderr): --store (--subjects-store), \
--dir and serve's --audit-dir (--audit), PDGATE_AUDIT_DIR (PDGATE_AUDIT), --since-us (--since), \
--cache-ttl-seconds (--cache-ttl), --shutdown-grace-seconds (--shutdown-grace), a bare number \
for --timeout (a duration such as 10s).",
    after_help = "Examples:\n  \
pdgate demo\n  \
pdgate check --caller billing-service --purpose service.billing --action read \\\n      \
--category customer.billing --subject cust-1\n  \
pdgate policy validate policy/\n  \
pdgate policy test policy/"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the demo: a customer-data service, pdgate in front of it, and a walkthrough.
    Demo(serve::DemoArgs),
    /// Run the sidecar in front of a gRPC service.
    Serve(serve::ServeArgs),
    /// Decide one request against a policy directory and explain the decision.
    Check(check::CheckArgs),
    /// Validate and test policy directories.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Write routes.yaml from the protected service's annotated protos.
    #[command(subcommand)]
    Routes(RoutesCommand),
    /// Inspect the audit trail: verify, query, tail, disclosure report.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Record and inspect data subjects' consent and requests (§7) in the registry.
    #[command(subcommand)]
    Subjects(subjects::SubjectsCommand),
    /// Print a shell completion script, e.g. `pdgate completions bash > ~/.local/share/bash-completion/completions/pdgate`.
    Completions(CompletionsArgs),
    /// Print the man page (roff), e.g. `pdgate man | man -l -`; with --dir, write one page per
    /// subcommand there (pdgate.1, pdgate-audit-query.1, ...).
    Man(ManArgs),
}

#[derive(Debug, Args)]
struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_name = "SHELL", value_enum)]
    shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
struct ManArgs {
    /// Write pdgate.1 and a page per subcommand into DIR instead of printing pdgate.1.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum RoutesCommand {
    /// Generate routes.yaml from the `(pdgate.v1.action)`, `(pdgate.v1.category)` and
    /// `(pdgate.v1.subject)` annotations of the service's protos: one route per annotated
    /// method, every category its messages carry needed.
    Generate(routes_cmd::RoutesGenerateArgs),
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy directory: every problem is listed with its file and line.
    Validate(PolicyDirArgs),
    /// Run the policy tests in DIR/tests/*.yaml against the policy in DIR, with coverage.
    Test(policy_test::PolicyTestArgs),
    /// Replay the decisions of an audit log under a candidate policy and report those that
    /// would flip, grouped by purpose, category, caller and clause.
    Diff(policy_diff::DiffArgs),
    /// Push a policy directory to a running sidecar: validated, tested, then swapped in.
    Push(policy_cmd::PushArgs),
    /// The sidecar's active policy version, last reload error, history and shadow.
    Status(policy_cmd::StatusArgs),
    /// Make a kept earlier version active again.
    Rollback(policy_cmd::RollbackArgs),
    /// Explain a decision of the running sidecar, stage by stage (flags as `pdgate check`).
    Explain(policy_cmd::ExplainArgs),
    /// Load a candidate as a shadow policy (decided, never enforced), or clear it.
    Shadow(policy_cmd::ShadowArgs),
    /// Print the JSON Schema of a policy file kind, for editors (the same files are in
    /// schemas/ of the repository).
    Schema(SchemaArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example (VS Code with the YAML extension, in .vscode/settings.json):\n  \
\"yaml.schemas\": { \"schemas/policy-tests.schema.json\": \"policy/tests/*.yaml\", \
\"schemas/routes.schema.json\": \"policy/routes.yaml\" }"
)]
struct SchemaArgs {
    /// Which file: `taxonomy` (taxonomy.toml), `routes` (routes.yaml) or `tests`
    /// (tests/*.yaml).
    #[arg(value_name = "FILE_KIND", value_enum)]
    kind: SchemaKind,
}

/// A policy file kind that has a JSON Schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchemaKind {
    Taxonomy,
    Routes,
    Tests,
}

impl SchemaKind {
    pub const ALL: [SchemaKind; 3] = [Self::Taxonomy, Self::Routes, Self::Tests];

    /// Its file under `schemas/` of the repository.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Taxonomy => "taxonomy.schema.json",
            Self::Routes => "routes.schema.json",
            Self::Tests => "policy-tests.schema.json",
        }
    }

    /// The schema, generated from the types the files are read into, as pretty JSON ending
    /// in a newline.
    pub fn schema_text(self) -> String {
        let schema = match self {
            Self::Taxonomy => crate::policy::taxonomy_schema(),
            Self::Routes => crate::policy::routes::schema(),
            Self::Tests => crate::decision::fixtures::schema(),
        };
        let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
        text.push('\n');
        text
    }
}

#[derive(Debug, Args)]
struct PolicyDirArgs {
    /// Policy directory (model.conf, policy.csv, taxonomy.toml).
    #[arg(value_name = "DIR", env = "PDGATE_POLICY", default_value = "policy")]
    dir: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Parses the command line, runs the command and maps the result to an exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help and version to stdout with exit 0, usage errors with exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { EXIT_OK });
        }
    };
    // `serve` reads its log format from its configuration, and starts its log once that is
    // checked; the other commands write their results to stdout and log warnings only.
    if !matches!(cli.command, Command::Serve(_)) {
        crate::telemetry::logs::init(crate::telemetry::logs::LogFormat::Text, "warn");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_DENIED);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Check(args) => check::run(args).await,
            Command::Serve(args) => serve::serve(args).await,
            Command::Demo(args) => serve::demo(args).await,
            Command::Audit(command) => audit::run(command).await,
            Command::Routes(RoutesCommand::Generate(args)) => routes_cmd::generate(args),
            Command::Subjects(command) => subjects::run(command).await,
            Command::Completions(args) => completions(args.shell),
            Command::Man(args) => man(args.dir.as_deref()),
            Command::Policy(PolicyCommand::Validate(args)) => {
                policy_cmd::validate(&args.dir, args.json).await
            }
            Command::Policy(PolicyCommand::Diff(args)) => policy_diff::run(args).await,
            Command::Policy(PolicyCommand::Test(args)) => policy_test::run(args).await,
            Command::Policy(PolicyCommand::Push(args)) => policy_cmd::push(args).await,
            Command::Policy(PolicyCommand::Status(args)) => policy_cmd::status(args).await,
            Command::Policy(PolicyCommand::Rollback(args)) => policy_cmd::rollback(args).await,
            Command::Policy(PolicyCommand::Explain(args)) => policy_cmd::explain(args).await,
            Command::Policy(PolicyCommand::Shadow(args)) => policy_cmd::shadow(args).await,
            Command::Policy(PolicyCommand::Schema(args)) => {
                out!("{}", args.kind.schema_text());
                EXIT_OK
            }
        }
    });
    ExitCode::from(code)
}

fn completions(shell: clap_complete::Shell) -> u8 {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "pdgate", &mut script);
    output::write_bytes(&script);
    EXIT_OK
}

fn man(dir: Option<&std::path::Path>) -> u8 {
    let result = match dir {
        Some(dir) => clap_mangen::generate_to(Cli::command(), dir),
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut page)
                .map(|()| output::write_bytes(&page))
        }
    };
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            let place = dir.map_or_else(|| "stdout".to_owned(), |d| format!("`{}`", d.display()));
            eprintln!("error: cannot write the man page to {place}: {e}");
            EXIT_DENIED
        }
    }
}

/// Prints `value` as one line of JSON on stdout.
fn print_json(value: &serde_json::Value) {
    outln!("{value}");
}

/// The value parser of a deprecated flag: parses its value as the new flag would, and says on
/// stderr which flag to use instead.
fn deprecated_flag<T>(
    old: &'static str,
    new: &'static str,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + Clone + Send + Sync + 'static,
    T::Err: std::fmt::Display,
{
    move |text| {
        output::deprecated(old, new);
        text.parse::<T>().map_err(|e| e.to_string())
    }
}

/// A duration flag's value: `30s`, `5m`, `1h 30m`, `7days` (humantime's units).
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| {
        format!(
            "`{text}` is not a duration ({e}); write it with a unit: 500ms, 30s, 5m, 24h, 7days"
        )
    })
}

/// A duration flag that used to take bare seconds: a bare number is still read as seconds,
/// with a deprecation warning.
fn parse_duration_or_seconds(
    flag: &'static str,
) -> impl Fn(&str) -> Result<std::time::Duration, String> + Clone + Send + Sync + 'static {
    move |text| match text.parse::<u64>() {
        Ok(seconds) => {
            output::deprecated(&format!("{flag} {text}"), &format!("{flag} {text}s"));
            Ok(std::time::Duration::from_secs(seconds))
        }
        Err(_) => parse_duration(text),
    }
}

/// A point in time, in microseconds since the Unix epoch: RFC 3339 (`2026-11-27T09:00:00Z`)
/// or a duration back from now (`24h`, `30m`, `7days`).
fn parse_time(text: &str) -> Result<u64, String> {
    use std::time::{SystemTime, UNIX_EPOCH};
    let micros = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    };
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(micros(t));
    }
    if let Ok(d) = humantime::parse_duration(text) {
        return Ok(micros(SystemTime::now())
            .saturating_sub(u64::try_from(d.as_micros()).unwrap_or(u64::MAX)));
    }
    Err(format!(
        "`{text}` is neither an RFC 3339 time (2026-11-27T09:00:00Z) nor a duration back from now (24h, 30m, 7days)"
    ))
}

/// A duration flag whose configuration key counts whole seconds: the duration, in seconds.
fn parse_seconds(text: &str) -> Result<u64, String> {
    let d = parse_duration(text)?;
    if d.subsec_nanos() == 0 {
        Ok(d.as_secs())
    } else {
        Err(format!("`{text}`: whole seconds only (e.g. 30s, 5m)"))
    }
}
