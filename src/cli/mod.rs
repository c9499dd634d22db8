//! The `pdgate` command line. Exit codes: 0 ok or allowed, 1 denied or a failed check,
//! 2 bad input on the command line.

mod admin_client;
mod audit;
mod check;
mod policy_cmd;
mod policy_diff;
mod serve;
mod subjects;

use clap::{Args, Parser, Subcommand};
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
Exit codes: 0 allowed / ok, 1 denied / failed check, 2 bad command-line input.",
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
    /// Inspect the audit trail: verify, query, tail, disclosure report.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Record and inspect data subjects' consent and requests (§7) in the registry.
    #[command(subcommand)]
    Subjects(subjects::SubjectsCommand),
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy directory: every problem is listed with its file and line.
    Validate(PolicyDirArgs),
    /// Run the policy tests in DIR/tests/*.yaml against the policy in DIR.
    Test(PolicyTestArgs),
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

#[derive(Debug, Args)]
struct PolicyTestArgs {
    #[command(flatten)]
    policy: PolicyDirArgs,
    /// Directory of the test files (default: DIR/tests).
    #[arg(long, value_name = "TESTS")]
    tests: Option<PathBuf>,
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
            Command::Audit(command) => audit::run(command),
            Command::Subjects(command) => subjects::run(command).await,
            Command::Policy(PolicyCommand::Validate(args)) => {
                policy_cmd::validate(&args.dir, args.json).await
            }
            Command::Policy(PolicyCommand::Diff(args)) => policy_diff::run(args).await,
            Command::Policy(PolicyCommand::Test(args)) => {
                policy_cmd::test(&args.policy.dir, args.tests.as_deref(), args.policy.json).await
            }
            Command::Policy(PolicyCommand::Push(args)) => policy_cmd::push(args).await,
            Command::Policy(PolicyCommand::Status(args)) => policy_cmd::status(args).await,
            Command::Policy(PolicyCommand::Rollback(args)) => policy_cmd::rollback(args).await,
            Command::Policy(PolicyCommand::Explain(args)) => policy_cmd::explain(args).await,
            Command::Policy(PolicyCommand::Shadow(args)) => policy_cmd::shadow(args).await,
        }
    });
    ExitCode::from(code)
}

/// Prints `value` as one line of JSON on stdout.
fn print_json(value: &serde_json::Value) {
    println!("{value}");
}
