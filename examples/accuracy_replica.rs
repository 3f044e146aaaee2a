//! Exploration aid for the record unit's hyperparameters, on VALIDATION data only: an
//! in-process replica of the sites' DP-SGD loop (the client's own `DpSgdRound`: Poisson
//! batches, noise source, f64 working model) and the coordinator's FedAvg, with the noise calibrated as the
//! demo calibrates it. No QUIC, no ledgers: it only maps the landscape quickly; the
//! selection itself runs through the real federation (`accuracy -- --tune`).
//!
//! ```text
//! cargo run --release --example accuracy_replica -- --seeds 40 --epsilons 4 \
//!     --settings worst:20:10:64:5:0.1:1,all:40:10:64:1:1:1
//! ```
//! A setting is `features:rounds:steps:batch:lr:clip:server_lr` (features `worst`, `mean`
//! or `all`), or `np:worst` / `np:all` for the non-private federated reference
//! (`demo::non_private`, as `accuracy` runs it). Each line gives the mean validation
//! accuracy over the seeds with its sample sd and standard error, and the mean validation
//! loss. Fresh noise every run: figures move by about one standard error between runs.

use clap::Parser;
use fedpriv::demo::{self, DemoData, DemoOptions};
use fedpriv_client::train;
use fedpriv_common::dp::noise::NoiseSource;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 40)]
    seeds: u64,
    #[arg(long, value_delimiter = ',', default_value = "4")]
    epsilons: Vec<f64>,
    #[arg(long, value_delimiter = ',')]
    settings: Vec<String>,
    #[arg(long, default_value_t = 0.2)]
    validation: f64,
    #[arg(long, default_value_t = false)]
    non_iid: bool,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn sd(v: &[f64]) -> f64 {
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64).sqrt()
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let data = DemoData::BreastCancer;
    let arch_kind = data.model();
    let mut noise = NoiseSource::from_os().map_err(|e| e.to_string())?;
    for setting in &args.settings {
        let f: Vec<&str> = setting.split(':').collect();
        if f[0] == "np" {
            let mut o = DemoOptions::recommended(data, "record", 1.0);
            o.features = if f.get(1) == Some(&"all") {
                None
            } else {
                Some(demo::WORST_FEATURES.iter().map(|s| s.to_string()).collect())
            };
            o.validation = Some(args.validation);
            o.non_iid = args.non_iid;
            let local = fedpriv_client::train::LocalTraining {
                epochs: 1,
                batch_size: 32,
                learning_rate: 0.5,
            };
            let (mut accs, mut losses) = (Vec::new(), Vec::new());
            for seed in 1..=args.seeds {
                o.shard_seed = Some(seed);
                let sc = demo::non_private(&o, 100, &local)?;
                accs.push(sc.accuracy.unwrap_or(f64::NAN));
                losses.push(sc.loss);
            }
            println!(
                "{setting} acc={:.2}±{:.2} loss={:.4}",
                100.0 * mean(&accs),
                100.0 * sd(&accs),
                mean(&losses)
            );
            continue;
        }
        if f.len() != 7 {
            return Err(format!("bad setting {setting}"));
        }
        let p = |i: usize| f[i].parse::<f64>().map_err(|e| e.to_string());
        for &eps in &args.epsilons {
            let mut o = DemoOptions::recommended(data, "record", eps);
            o.features = match f[0] {
                "all" => None,
                "worst" => Some(demo::WORST_FEATURES.iter().map(|s| s.to_string()).collect()),
                "mean" => Some(demo::MEAN_FEATURES.iter().map(|s| s.to_string()).collect()),
                other => return Err(format!("features {other}")),
            };
            o.rounds = p(1)? as u64;
            o.record.local_steps = p(2)? as u64;
            o.record.expected_batch = p(3)?;
            o.record.learning_rate = p(4)? as f32;
            o.record.clip_norm = p(5)?;
            o.record.server_learning_rate = p(6)? as f32;
            o.validation = Some(args.validation);
            o.non_iid = args.non_iid;
            o.shard_seed = Some(1);
            let sp = demo::split(&o)?;
            let sigma = demo::noise_multiplier(&o, &sp.shards)?.ok_or("no sigma")?;
            let (mut accs, mut losses) = (Vec::new(), Vec::new());
            for seed in 1..=args.seeds {
                o.shard_seed = Some(seed);
                let sp = demo::split(&o)?;
                let shards = sp.scaled_shards()?;
                let learner = train::Learner::flat(
                    &arch_kind,
                    sp.test.d,
                    fedpriv_common::config::Task::Binary,
                    1,
                )
                .map_err(|e| e.to_string())?;
                let mut global = learner.init(0).map_err(|e| e.to_string())?;
                let c = o.record.clip_norm;
                for _ in 0..o.rounds {
                    let mut sum = vec![0f64; global.values.len()];
                    for shard in &shards {
                        let round = train::DpSgdRound {
                            steps: o.record.local_steps,
                            q: o.record.expected_batch / shard.n as f64,
                            expected_batch: o.record.expected_batch,
                            learning_rate: o.record.learning_rate,
                            clip: c,
                            noise_multiplier: sigma,
                        };
                        let (delta, _) = round
                            .run(&learner, &global, shard, &mut noise)
                            .map_err(|e| e.to_string())?;
                        for (s, d) in sum.iter_mut().zip(&delta) {
                            *s += f64::from(*d);
                        }
                    }
                    let k = shards.len() as f64;
                    let slr = f64::from(o.record.server_learning_rate);
                    for (g, s) in global.values.iter_mut().zip(&sum) {
                        *g = (f64::from(*g) + slr * s / k) as f32;
                    }
                }
                let m = train::evaluate(&learner, &global, &sp.test).map_err(|e| e.to_string())?;
                accs.push(m.accuracy.unwrap_or(f64::NAN));
                losses.push(m.loss);
            }
            println!(
                "{setting} eps={eps} sigma={sigma:.3} acc={:.2}±{:.2} (se {:.2}) loss={:.4}",
                100.0 * mean(&accs),
                100.0 * sd(&accs),
                100.0 * sd(&accs) / (accs.len() as f64).sqrt(),
                mean(&losses)
            );
        }
    }
    Ok(())
}
