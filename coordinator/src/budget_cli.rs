//! `fedpriv-coordinator budget`: plan a study's privacy budget before running it.

use clap::{Args, Subcommand};
use fedpriv_common::dp::accountant::{self, AccountantKind};
use fedpriv_common::dp::{Delta, Epsilon, NoiseMultiplier, SampleRate, SgmEvent};
use serde_json::json;

/// The three planning questions. Each takes the mechanism of one step: Poisson sampling at
/// rate Q followed by Gaussian noise with multiplier S (noise std / clip norm).
#[derive(Debug, Subcommand)]
pub enum BudgetCommand {
    /// Epsilon spent after T steps.
    Epsilon {
        #[arg(long = "sample-rate", value_name = "Q")]
        sample_rate: f64,
        #[arg(long = "noise-multiplier", value_name = "S")]
        noise_multiplier: f64,
        #[arg(long, value_name = "T")]
        steps: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Largest number of steps whose epsilon stays within E.
    Steps {
        #[arg(long = "sample-rate", value_name = "Q")]
        sample_rate: f64,
        #[arg(long = "noise-multiplier", value_name = "S")]
        noise_multiplier: f64,
        #[arg(long, value_name = "E")]
        epsilon: f64,
        #[command(flatten)]
        common: Common,
    },
    /// Smallest noise multiplier that keeps T steps within epsilon E.
    Noise {
        #[arg(long = "sample-rate", value_name = "Q")]
        sample_rate: f64,
        #[arg(long, value_name = "T")]
        steps: u64,
        #[arg(long, value_name = "E")]
        epsilon: f64,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Args)]
pub struct Common {
    /// Target delta (probability that the epsilon guarantee fails), e.g. 1e-5.
    #[arg(long, value_name = "D")]
    delta: f64,
    /// Accountant: pld (tighter, default) or rdp (faster, looser).
    #[arg(long, default_value = "pld", value_name = "rdp|pld")]
    accountant: AccountantKind,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
}

/// Answers the question; returns the text to print, or a one-line reason.
pub fn run(cmd: &BudgetCommand) -> Result<String, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    match cmd {
        BudgetCommand::Epsilon {
            sample_rate,
            noise_multiplier,
            steps,
            common,
        } => {
            let delta = Delta::new(common.delta).map_err(|e| err(&e))?;
            let ev = SgmEvent::new(*sample_rate, *noise_multiplier, *steps).map_err(|e| err(&e))?;
            let eps = accountant::epsilon(common.accountant, &[ev], delta).map_err(|e| err(&e))?;
            Ok(if common.json {
                json!({"epsilon": eps, "accountant": common.accountant.as_str(), "delta": common.delta,
                       "sample_rate": sample_rate, "noise_multiplier": noise_multiplier, "steps": steps})
                .to_string()
            } else {
                format!(
                    "epsilon = {eps:.4} at delta = {} after {steps} steps (q = {sample_rate}, sigma = {noise_multiplier}, {} accountant)",
                    common.delta, common.accountant.as_str()
                )
            })
        }
        BudgetCommand::Steps {
            sample_rate,
            noise_multiplier,
            epsilon,
            common,
        } => {
            let delta = Delta::new(common.delta).map_err(|e| err(&e))?;
            let q = SampleRate::new(*sample_rate).map_err(|e| err(&e))?;
            let s = NoiseMultiplier::new(*noise_multiplier).map_err(|e| err(&e))?;
            let budget = Epsilon::new(*epsilon).map_err(|e| err(&e))?;
            let t = accountant::max_steps(common.accountant, &[], q, s, budget, delta)
                .map_err(|e| err(&e))?;
            let capped = t >= accountant::MAX_STEPS;
            Ok(if common.json {
                json!({"steps": t, "capped": capped, "accountant": common.accountant.as_str(), "delta": common.delta,
                       "epsilon": epsilon, "sample_rate": sample_rate, "noise_multiplier": noise_multiplier})
                .to_string()
            } else {
                format!(
                    "{}{t} steps fit in epsilon = {epsilon} at delta = {} (q = {sample_rate}, sigma = {noise_multiplier}, {} accountant)",
                    if capped { "at least " } else { "" },
                    common.delta,
                    common.accountant.as_str()
                )
            })
        }
        BudgetCommand::Noise {
            sample_rate,
            steps,
            epsilon,
            common,
        } => {
            let delta = Delta::new(common.delta).map_err(|e| err(&e))?;
            let q = SampleRate::new(*sample_rate).map_err(|e| err(&e))?;
            let target = Epsilon::new(*epsilon).map_err(|e| err(&e))?;
            let s = accountant::calibrate_noise(common.accountant, q, *steps, target, delta)
                .map_err(|e| err(&e))?;
            Ok(if common.json {
                json!({"noise_multiplier": s.get(), "accountant": common.accountant.as_str(), "delta": common.delta,
                       "epsilon": epsilon, "sample_rate": sample_rate, "steps": steps})
                .to_string()
            } else {
                format!(
                    "noise multiplier {:.4} keeps {steps} steps (q = {sample_rate}) within epsilon = {epsilon} at delta = {} ({} accountant)",
                    s.get(), common.delta, common.accountant.as_str()
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: BudgetCommand,
    }

    fn answer(args: &[&str]) -> Result<String, String> {
        let cli = Cli::try_parse_from(std::iter::once("budget").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        run(&cli.cmd)
    }

    #[test]
    fn json_answers_carry_the_figures() {
        let out = answer(&[
            "epsilon",
            "--sample-rate",
            "0.01",
            "--noise-multiplier",
            "1.0",
            "--steps",
            "1000",
            "--delta",
            "1e-5",
            "--json",
        ])
        .expect("answer");
        let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
        let eps = v["epsilon"].as_f64().expect("epsilon");
        assert!((eps - 1.8282).abs() / 1.8282 < 0.02, "{eps}");
        assert_eq!(v["accountant"], "pld");
        let out = answer(&[
            "steps",
            "--sample-rate",
            "0.01",
            "--noise-multiplier",
            "1.0",
            "--epsilon",
            "2",
            "--delta",
            "1e-5",
            "--json",
            "--accountant",
            "rdp",
        ])
        .expect("answer");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        let t = v["steps"].as_u64().expect("steps");
        assert!(t > 500 && t < 1000, "{t}");
        let out = answer(&[
            "noise",
            "--sample-rate",
            "0.01",
            "--steps",
            "1000",
            "--epsilon",
            "1",
            "--delta",
            "1e-5",
            "--json",
        ])
        .expect("answer");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert!(v["noise_multiplier"].as_f64().expect("sigma") > 0.5);
    }

    #[test]
    fn bad_arguments_give_one_line_reasons() {
        for args in [
            &[
                "epsilon",
                "--sample-rate",
                "1.5",
                "--noise-multiplier",
                "1",
                "--steps",
                "1",
                "--delta",
                "1e-5",
            ][..],
            &[
                "epsilon",
                "--sample-rate",
                "0.1",
                "--noise-multiplier=-1",
                "--steps",
                "1",
                "--delta",
                "1e-5",
            ],
            &[
                "epsilon",
                "--sample-rate",
                "0.1",
                "--noise-multiplier",
                "1",
                "--steps",
                "1",
                "--delta",
                "0",
            ],
            &[
                "noise",
                "--sample-rate",
                "0.1",
                "--steps",
                "0",
                "--epsilon",
                "1",
                "--delta",
                "1e-5",
            ],
            &[
                "steps",
                "--sample-rate",
                "0.1",
                "--noise-multiplier",
                "1",
                "--epsilon",
                "NaN",
                "--delta",
                "1e-5",
            ],
        ] {
            let err = answer(args).expect_err("must be refused");
            assert!(
                !err.trim().is_empty() && !err.trim().contains('\n'),
                "{args:?}: {err}"
            );
        }
    }
}
