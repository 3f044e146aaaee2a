//! The demo federation: `cargo run --release --example hospitals`.
//!
//! A throw-away PKI, a coordinator and three hospital daemons on loopback QUIC with mutual
//! TLS, the breast-cancer data split unevenly and non-IID across the hospitals, and a study
//! run until its privacy budget is spent. Each round prints the sites that took part, the
//! model's loss and accuracy on a held-out test set, epsilon spent and budget left; the end
//! prints the final accuracy next to the same federation without privacy.

use clap::Parser;
use fedpriv::demo::{self, DemoOptions};

#[derive(Debug, Parser)]
#[command(about = "Run the fedpriv demo federation on loopback")]
struct Args {
    /// Privacy unit: record (each patient, DP-SGD at the sites) or site (each hospital).
    #[arg(long, default_value = "record")]
    unit: String,
    /// The study's epsilon budget.
    #[arg(long, default_value_t = 2.0)]
    epsilon: f64,
    /// Most rounds to run (the budget may end the study first).
    #[arg(long, default_value_t = 40)]
    rounds: u64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Split the data evenly and IID instead of unevenly and non-IID.
    #[arg(long)]
    iid: bool,
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let opts = DemoOptions {
        unit: args.unit,
        epsilon: args.epsilon,
        rounds: args.rounds,
        seed: args.seed,
        non_iid: !args.iid,
        ..DemoOptions::default()
    };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    println!(
        "fedpriv demo: 3 hospitals, breast-cancer data ({} split), privacy unit {}, budget epsilon {} at delta {}",
        if opts.non_iid { "uneven non-IID" } else { "even IID" },
        opts.unit,
        opts.epsilon,
        opts.delta
    );
    println!(
        "{:>5}  {:<28} {:>8} {:>9} {:>9} {:>11}",
        "round", "sites", "loss", "accuracy", "epsilon", "budget left"
    );
    let report = demo::run(dir.path(), &opts, |r| {
        println!(
            "{:>5}  {:<28} {:>8.4} {:>8.1}% {:>9.4} {:>11.4}",
            r.round,
            r.sites.join(","),
            r.loss,
            100.0 * r.accuracy,
            r.epsilon,
            (r.budget - r.epsilon).max(0.0)
        );
    })
    .await?;
    println!("study ended: {}", report.end_reason);
    let baseline = demo::non_private_baseline(&opts, report.rounds.len() as u64)?;
    println!(
        "final test accuracy: {:.1}% with differential privacy (epsilon {:.3}), {:.1}% without privacy (same rounds and split)",
        100.0 * report.final_accuracy,
        report.rounds.last().map(|r| r.epsilon).unwrap_or(0.0),
        100.0 * baseline
    );
    Ok(())
}
