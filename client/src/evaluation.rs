//! The site's side of DP federated evaluation (see [`fedpriv_common::evaluation`]): the
//! held-out split, drawn once and kept, and the noised vector a paid-for evaluation
//! releases.
//!
//! Held-out records never train: a study with evaluation trains on the rest. The split is
//! a function of a seed the site draws from its secure generator the first time it
//! prepares the study and keeps in its ledger, and of each record's position in the loaded
//! data, so it stays the same across restarts as long as the data file does.

use fedpriv_common::config::DataSpec;
use fedpriv_common::dp::noise::NoiseSource;
use fedpriv_common::evaluation::{EvalSums, EvaluationPlan, Layout};
use fedpriv_common::model::FlatModel;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::data::Dataset;
use crate::train::{self, Head, Learner, TrainError};

/// The rows of `data` held out for evaluation, by a fixed draw from `seed`: each row with
/// probability `fraction`, independently.
pub fn holdout_mask(n: usize, fraction: f64, seed: u64) -> Vec<bool> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f64>() < fraction).collect()
}

/// `data` split into (training rows, held-out rows).
pub fn split(data: &Dataset, fraction: f64, seed: u64) -> Result<(Dataset, Dataset), String> {
    let mask = holdout_mask(data.n, fraction, seed);
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for (i, h) in mask.into_iter().enumerate() {
        if h {
            held.push(i);
        } else {
            train.push(i);
        }
    }
    let t = data.select_rows(&train).map_err(|e| e.to_string())?;
    let h = data.select_rows(&held).map_err(|e| e.to_string())?;
    Ok((t, h))
}

/// The exact sums of `model` on the held-out rows (never released as such). `pad_to`: the
/// number of rows the forward pass runs over whatever the held-out count (zero rows make
/// up the difference and are discarded), so the time it takes tracks the site's declared
/// size rather than its file.
pub fn exact_sums(
    learner: &Learner,
    model: &FlatModel,
    held: &Dataset,
    data: &DataSpec,
    plan: &EvaluationPlan,
    pad_to: usize,
) -> Result<Vec<f64>, TrainError> {
    let layout = Layout::of(data);
    let mut sums = EvalSums::new(layout, plan.loss_clip);
    if held.n > 0 {
        let head = learner.head();
        let k = match head {
            Head::Softmax(k) => k,
            Head::Sigmoid | Head::Identity => 1,
        };
        let z = train::outputs(learner, model, held)?;
        for (zi, &y) in z.chunks(k).zip(&held.y) {
            match head {
                Head::Identity => sums.add_regressed(f64::from(zi[0]), f64::from(y), [-1.0, 1.0]),
                Head::Sigmoid => {
                    let (loss, _) = train::example_loss(zi, y, head);
                    let predicted = usize::from(zi[0] > 0.0);
                    sums.add_classified(usize::from(y > 0.5), predicted, loss);
                }
                Head::Softmax(_) => {
                    let (loss, _) = train::example_loss(zi, y, head);
                    let predicted =
                        zi.iter()
                            .enumerate()
                            .fold(0, |best, (i, &v)| if v > zi[best] { i } else { best });
                    sums.add_classified(y as usize, predicted, loss);
                }
            }
        }
    }
    if pad_to > held.n {
        let rows = pad_to - held.n;
        let d = learner.input_len();
        let filler = Dataset {
            x: vec![0.0; rows * d],
            y: vec![0.0; rows],
            n: rows,
            d,
            feature_names: held.feature_names.clone(),
            label_name: held.label_name.clone(),
            images: None,
        };
        let _ = train::outputs(learner, model, &filler)?;
    }
    Ok(sums.into_values())
}

/// The released vector: `exact` (or, when the evaluation failed after it was paid for, a
/// zero vector that depends on no record) plus N(0, noise_sd^2) on every value.
pub fn noised(
    exact: Option<Vec<f64>>,
    data: &DataSpec,
    plan: &EvaluationPlan,
    noise: &mut NoiseSource,
) -> Vec<f64> {
    let layout = Layout::of(data);
    let mut v = match exact {
        Some(v) if v.len() == layout.len() => v,
        _ => vec![0.0; layout.len()],
    };
    noise.add_gaussian_f64(&mut v, plan.noise_sd(&layout) * train::noise_scale(), 1);
    v
}

/// How many rows the held-out forward pass covers: the expected held-out share of the
/// declared count plus six standard deviations, or the true count if larger.
pub fn padded_rows(declared: u64, fraction: f64, held: usize) -> usize {
    let n = declared as f64;
    let mean = n * fraction;
    let sd = (n * fraction * (1.0 - fraction)).sqrt();
    ((mean + 6.0 * sd).ceil() as usize).max(held)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_split_is_fixed_by_its_seed_and_near_the_fraction() {
        let a = holdout_mask(10_000, 0.2, 7);
        assert_eq!(a, holdout_mask(10_000, 0.2, 7));
        assert_ne!(a, holdout_mask(10_000, 0.2, 8));
        let held = a.iter().filter(|h| **h).count();
        // Binomial(10000, 0.2): sd 40; 6 sd either way.
        assert!((1760..=2240).contains(&held), "{held}");
    }

    /// The released vector's noise, under a statistical test: every value is the exact sum
    /// plus N(0, (sigma * sensitivity)^2), independently (sample means and variances within
    /// 5 standard errors over 4000 draws; the values' sample correlation near 0).
    #[test]
    fn the_evaluation_noise_has_the_calibrated_scale_on_every_value() {
        use fedpriv_common::config::Task as DataTask;
        use fedpriv_common::dp::NoiseMultiplier;
        let data = DataSpec {
            task: DataTask::Multiclass,
            label: "y".into(),
            classes: 3,
            class_labels: Vec::new(),
            features: vec!["a".into()],
            ranges: vec![[0.0, 1.0]],
            label_range: None,
            fills: vec![None],
            categorical: Vec::new(),
            image: None,
        };
        let plan = EvaluationPlan {
            every: 1,
            noise_multiplier: NoiseMultiplier::new(1.5).unwrap(),
            loss_clip: 3.0,
        };
        let layout = Layout::of(&data);
        assert_eq!(layout.len(), 11);
        let sd = 1.5 * 11f64.sqrt();
        assert!((plan.noise_sd(&layout) - sd).abs() < 1e-12);
        let exact: Vec<f64> = (0..11).map(f64::from).collect();
        let mut noise = NoiseSource::from_os().unwrap();
        let n = 4000;
        let draws: Vec<Vec<f64>> = (0..n)
            .map(|_| noised(Some(exact.clone()), &data, &plan, &mut noise))
            .collect();
        for j in 0..11 {
            let col: Vec<f64> = draws.iter().map(|d| d[j] - exact[j]).collect();
            let mean = col.iter().sum::<f64>() / n as f64;
            let var = col.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            assert!(
                mean.abs() < 5.0 * sd / (n as f64).sqrt(),
                "value {j}: mean {mean}"
            );
            // The sample variance's standard error is sd^2 sqrt(2 / (n - 1)).
            let se = sd * sd * (2.0 / (n - 1) as f64).sqrt();
            assert!(
                (var - sd * sd).abs() < 5.0 * se,
                "value {j}: variance {var}"
            );
        }
        let (a, b): (Vec<f64>, Vec<f64>) = draws.iter().map(|d| (d[0], d[1] - 1.0)).unzip();
        let corr = a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>() / (n as f64 * sd * sd);
        assert!(corr.abs() < 5.0 / (n as f64).sqrt(), "correlation {corr}");
        // A failed evaluation releases noise around zeros, of the same scale.
        let stand_ins: Vec<Vec<f64>> = (0..n)
            .map(|_| noised(None, &data, &plan, &mut noise))
            .collect();
        assert!(stand_ins.iter().all(|v| v.len() == 11));
        let all: Vec<f64> = stand_ins.into_iter().flatten().collect();
        let m = all.len() as f64;
        let mean = all.iter().sum::<f64>() / m;
        let var = all.iter().map(|x| x * x).sum::<f64>() / m;
        assert!(mean.abs() < 5.0 * sd / m.sqrt(), "stand-in mean {mean}");
        assert!(
            (var - sd * sd).abs() < 5.0 * sd * sd * (2.0 / m).sqrt(),
            "stand-in variance {var}"
        );
    }

    #[test]
    fn padding_covers_the_expected_share() {
        assert!(padded_rows(1000, 0.2, 0) >= 200 + 6 * 12);
        assert_eq!(padded_rows(10, 0.2, 50), 50);
    }
}
