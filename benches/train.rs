//! Examples per second of a non-private SGD step against a DP-SGD step with per-example
//! clipping, for the same model and batch, on one core. Prints one JSON object.
//!
//! Run: `RAYON_NUM_THREADS=1 cargo bench --bench train` (the bench sets the variable itself
//! when it is unset: candle's CPU matmul reads it on every call and runs single-threaded
//! at 1). `FEDPRIV_BENCH_SECONDS` sets the time per measurement (default 0.5);
//! `FEDPRIV_BENCH_MODEL` keeps only the models whose label contains it (`cnn`, `mlp`), for
//! a profile of one model.
//!
//! Measured, per model (logistic regression 30 -> 1, an MLP 30 -> 64 -> 1, and the digits
//! study's small CNN on 1x8x8 images: conv 8x3x3 (padding 1), relu, max pool 2, dense 10,
//! softmax; batch 256). `tools/opacus_bench.py` measures the same MLP and CNN with Opacus
//! for comparison (docs/performance.md):
//! - `train_local`: non-private minibatch SGD, the loop that site-level DP-FedAvg runs (one
//!   pass over the data per call, many steps);
//! - `sgd_step`: one non-private step per call on a batch gathered from the data, as
//!   `dp_sgd_step` gathers its batch;
//! - `dp_sgd_step`: per-example clipped gradients, summed, plus a noise vector (zeros here:
//!   drawing the noise is `common::dp`'s cost, not this step's).
//!
//! The ratios are time per example of the clipped step over the non-private one.

use std::time::Instant;

use fedpriv_client::data::Dataset;
use fedpriv_client::train::{dp_sgd_step, sgd_step, train_local, Learner, LocalTraining};
use fedpriv_common::model::Architecture;

const D: usize = 30;
const BATCH: usize = 256;
const BATCHES: usize = 8;
const REPEATS: usize = 5;

/// Synthetic, deterministic data: features uniform in [-1, 1], labels from a fixed linear
/// rule. Only the shapes matter for speed.
fn synthetic(n: usize) -> Dataset {
    let mut state = 0x5EED_u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
    };
    let x: Vec<f32> = (0..n * D).map(|_| next()).collect();
    let y = x
        .chunks(D)
        .map(|r| f32::from(r.iter().step_by(3).sum::<f32>() > 0.0))
        .collect();
    let names = (0..D).map(|i| format!("f{i}")).collect();
    Dataset::new(x, y, names, "y".into()).expect("valid synthetic data")
}

/// Synthetic 8x8 grey images in [-1, 1] with 10 classes (shapes matter, not content).
fn synthetic_images(n: usize) -> Dataset {
    let base = synthetic(n * 64 / D + 1);
    let x: Vec<f32> = base.x[..n * 64].to_vec();
    let y: Vec<f32> = (0..n).map(|i| (i % 10) as f32).collect();
    let names = (0..64).map(|i| format!("px{i}")).collect();
    Dataset::new(x, y, names, "digit".into()).expect("valid synthetic images")
}

/// The digits study's network (examples/studies.rs), from its study TOML.
fn cnn_learner() -> Learner {
    let toml = r#"
[study]
id = "bench"
model = { kind = "layers", layers = [{ type = "conv2d", channels = 8, kernel = 3, padding = 1 }, { type = "relu" }, { type = "max_pool", kernel = 2 }, { type = "flatten" }, { type = "dense", units = 10 }] }
rounds = 1
min_sites = 1
round_timeout_secs = 60

[data]
task = "multiclass"
classes = 10
label = "digit"
image = { file_column = "file", channels = 1, height = 8, width = 8, mean = [0.0], std = [1.0] }

[training]
strategy = "fedavg"
local_steps = 1
expected_batch = 256.0
learning_rate = 0.1
server_learning_rate = 1.0

[privacy]
unit = "record"
clip_norm = 1.0
noise_multiplier = 1.0
epsilon = 10.0
delta = 1e-5
accountant = "pld"

[sites]
enrolled = ["a"]
"#;
    let cfg = fedpriv_common::config::StudyConfig::from_toml(toml).expect("bench study");
    Learner::for_data(&cfg.model, &cfg.data).expect("cnn learner")
}

/// Median over `REPEATS` runs of examples per second; `run` processes `per_call` examples.
fn rate(seconds: f64, per_call: usize, mut run: impl FnMut()) -> f64 {
    run(); // warm-up
    let mut rates: Vec<f64> = (0..REPEATS)
        .map(|_| {
            let start = Instant::now();
            let mut calls = 0usize;
            while start.elapsed().as_secs_f64() < seconds {
                run();
                calls += 1;
            }
            (calls * per_call) as f64 / start.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[REPEATS / 2]
}

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Safe in edition 2021, and no other thread exists yet.
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let seconds: f64 = std::env::var("FEDPRIV_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.5);
    let data = synthetic(BATCH * BATCHES);
    let images = synthetic_images(BATCH * BATCHES);
    let batches: Vec<Vec<usize>> = (0..BATCHES)
        .map(|b| (b * BATCH..(b + 1) * BATCH).collect())
        .collect();
    let flat = |arch: Architecture| {
        Learner::flat(&arch, D, fedpriv_common::config::Task::Binary, 1).expect("learner")
    };
    let cnn = cnn_learner();
    let only = std::env::var("FEDPRIV_BENCH_MODEL").unwrap_or_default();
    let mut results = Vec::new();
    for (label, learner, data) in [
        (
            "logistic 30->1",
            flat(Architecture::LogisticRegression),
            &data,
        ),
        ("mlp 30->64->1", flat(Architecture::mlp(64)), &data),
        ("cnn 1x8x8 conv8 pool dense10", cnn, &images),
    ] {
        if !label.contains(only.as_str()) {
            continue;
        }
        let model = learner.init(1).expect("model");
        let cfg = LocalTraining {
            epochs: 1,
            batch_size: BATCH,
            learning_rate: 0.01,
        };
        let local = rate(seconds, data.n, || {
            train_local(&learner, &model, data, &cfg, 0).expect("train_local");
        });
        let mut m = model.clone();
        let mut b = 0;
        let step = rate(seconds, BATCH, || {
            sgd_step(&learner, &mut m, data, &batches[b % BATCHES], 0.01).expect("sgd_step");
            b += 1;
        });
        let noise = vec![0f64; model.values.len()];
        let mut theta: Vec<f64> = model.values.iter().map(|&v| f64::from(v)).collect();
        let mut b = 0;
        let clipped = rate(seconds, BATCH, || {
            dp_sgd_step(
                &learner,
                &mut theta,
                data,
                &batches[b % BATCHES],
                1.0,
                &noise,
                BATCH as f64,
                0.01,
                0,
            )
            .expect("dp_sgd_step");
            b += 1;
        });
        results.push(serde_json::json!({
            "model": label,
            "batch": BATCH,
            "examples_per_s": {
                "train_local": local.round(),
                "sgd_step": step.round(),
                "dp_sgd_step": clipped.round(),
            },
            "clipped_cost_vs_train_local": (local / clipped * 100.0).round() / 100.0,
            "clipped_cost_vs_sgd_step": (step / clipped * 100.0).round() / 100.0,
        }));
    }
    let out = serde_json::json!({
        "bench": "train",
        "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
        "seconds_per_measurement": seconds,
        "repeats": REPEATS,
        "results": results,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&out).expect("JSON of plain values")
    );
}
