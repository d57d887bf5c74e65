//! The `apm` binary: command-line parsing and wiring of the library crates.

mod check;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit codes shared by every command (decisions: the CLI, rule 4).
pub mod exit {
    pub const OK: u8 = 0;
    /// The operation failed: a config has errors, a worker failed to start.
    pub const FAILED: u8 = 1;
    /// Bad flags, an unknown worker or code, a file that cannot be read.
    pub const USAGE: u8 = 2;
}

#[derive(Parser)]
#[command(
    name = "apm",
    version,
    about = "Process manager and L4/L7 load balancer",
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file and its includes; applies nothing and needs no daemon.
    Check(check::CheckArgs),
    /// Explain a diagnostic code such as E0004; without a code, list them all.
    Explain { code: Option<String> },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    ExitCode::from(match cli.command {
        Command::Check(args) => check::run(&args),
        Command::Explain { code } => check::explain(code.as_deref()),
    })
}
