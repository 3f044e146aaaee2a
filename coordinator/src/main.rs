//! `fedpriv-coordinator`: the ML team's side of fedpriv.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fedpriv_coordinator::budget_cli::{self, BudgetCommand};

/// Federated learning coordinator with differential privacy.
///
/// Start with `budget` to plan a study's privacy budget, `pki` to create the study's
/// certificates, then `run` a study with a TOML config.
#[derive(Debug, Parser)]
#[command(name = "fedpriv-coordinator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Privacy budget planning: epsilon after T steps, steps within a budget, noise for a target.
    #[command(subcommand)]
    Budget(BudgetCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Budget(cmd) => budget_cli::run(&cmd).map(|out| println!("{out}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("error: {reason}");
            ExitCode::from(2)
        }
    }
}
