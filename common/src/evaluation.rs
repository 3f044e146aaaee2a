//! DP federated evaluation: what a site reports about a global model on its held-out
//! records, and what the coordinator makes of the sum of the sites' reports.
//!
//! Every `every` rounds each site evaluates the model it was sent on a held-out part of its
//! own records and releases one vector of sums ([`Layout`]) with Gaussian noise calibrated
//! to the whole vector's joint L2 sensitivity under add/remove of one record. Nothing else
//! about the evaluation leaves the site: not the number of held-out records, not a
//! per-example figure. The release is one Gaussian mechanism at q = 1 with the study's
//! evaluation noise multiplier ([`EvaluationPlan::event`]), charged to the study's and the
//! data source's ledgers like a round of training.
//!
//! Which model a round's evaluation measures: the one the round's task carries, that is the
//! model after the previous round (evaluation rounds are 1 + k * every, k >= 1). The
//! model after the last round is not evaluated by the federation; `model evaluate` scores
//! an exported model on a labelled file the ML team holds.

use serde::{Deserialize, Serialize};

use crate::config::{DataSpec, Task};
use crate::dp::{NoiseMultiplier, SgmEvent};

/// A study's evaluation terms (`[evaluation]` in the study file).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvaluationPlan {
    /// Rounds 1 + every, 1 + 2 every, ... carry an evaluation.
    pub every: u64,
    /// Noise standard deviation over the vector's joint L2 sensitivity.
    pub noise_multiplier: NoiseMultiplier,
    /// Per-example losses are clipped to [0, loss_clip] before they are summed.
    pub loss_clip: f64,
}

impl EvaluationPlan {
    /// Whether `round`'s task carries an evaluation of the model it sends.
    pub fn is_due(&self, round: u64) -> bool {
        self.every > 0 && round > 1 && (round - 1).is_multiple_of(self.every)
    }

    /// What one evaluation costs a site, as the accountant sees it: one Gaussian mechanism
    /// at q = 1 with the plan's noise multiplier (the noise is scaled to the sensitivity).
    pub fn event(&self) -> SgmEvent {
        SgmEvent {
            q: crate::dp::SampleRate::new(1.0).unwrap_or_else(|_| unreachable!("1 is a rate")),
            sigma: self.noise_multiplier,
            steps: 1,
        }
    }

    /// The standard deviation of the noise on each value of one site's vector.
    pub fn noise_sd(&self, layout: &Layout) -> f64 {
        self.noise_multiplier.get() * layout.sensitivity(self.loss_clip)
    }
}

/// The released vector's shape for a study's task.
///
/// - Classification with K classes: `[correct, confusion (K x K, row = true class,
///   column = predicted), sum of losses]`. One record adds 1 to `correct` (at most), 1 to
///   one confusion cell and at most `loss_clip` to the loss: sensitivity
///   sqrt(2 + loss_clip^2).
/// - Regression: `[count, sum of squared errors]`, the error of the prediction clamped to
///   the label range, scaled by the range's width and clipped to [0, min(loss_clip, 1)]:
///   sensitivity sqrt(1 + min(loss_clip, 1)^2). RMSE is reported in label units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Classes { k: usize },
    Regression,
}

impl Layout {
    pub fn of(data: &DataSpec) -> Self {
        match data.task {
            Task::Binary => Self::Classes { k: 2 },
            Task::Multiclass => Self::Classes {
                k: data.n_outputs(),
            },
            Task::Regression => Self::Regression,
        }
    }

    /// Values in the released vector.
    pub fn len(&self) -> usize {
        match self {
            Self::Classes { k } => 2 + k * k,
            Self::Regression => 2,
        }
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The per-example loss bound this layout uses.
    pub fn loss_bound(&self, loss_clip: f64) -> f64 {
        match self {
            Self::Classes { .. } => loss_clip,
            Self::Regression => loss_clip.min(1.0),
        }
    }

    /// The joint L2 sensitivity of the vector under add/remove of one record.
    pub fn sensitivity(&self, loss_clip: f64) -> f64 {
        let l = self.loss_bound(loss_clip);
        match self {
            Self::Classes { .. } => (2.0 + l * l).sqrt(),
            Self::Regression => (1.0 + l * l).sqrt(),
        }
    }

    /// A bound on any honest value's magnitude, given the noise: sums over at most
    /// `records` examples, plus 40 noise standard deviations. Larger values are refused.
    pub fn value_bound(&self, records: u64, loss_clip: f64, noise_sd: f64) -> f64 {
        let per = self.loss_bound(loss_clip).max(1.0);
        records as f64 * per + 40.0 * noise_sd + 1.0
    }
}

/// A site's exact sums before noise. Never leaves the site.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSums {
    layout: Layout,
    loss_clip: f64,
    values: Vec<f64>,
}

impl EvalSums {
    pub fn new(layout: Layout, loss_clip: f64) -> Self {
        Self {
            layout,
            loss_clip,
            values: vec![0.0; layout.len()],
        }
    }

    /// One classified example: its true class, the predicted class and its loss (clipped
    /// here to the plan's bound; a non-finite loss counts as the bound). Out-of-range
    /// classes are ignored (the loader never yields them).
    pub fn add_classified(&mut self, truth: usize, predicted: usize, loss: f64) {
        let Layout::Classes { k } = self.layout else {
            return;
        };
        if truth >= k || predicted >= k {
            return;
        }
        if truth == predicted {
            self.values[0] += 1.0;
        }
        self.values[1 + truth * k + predicted] += 1.0;
        let l = self.layout.loss_bound(self.loss_clip);
        self.values[1 + k * k] += if loss.is_finite() {
            loss.clamp(0.0, l)
        } else {
            l
        };
    }

    /// One regression example, prediction and label in label units; both are clamped to
    /// `range` and the squared error is scaled by the range's width.
    pub fn add_regressed(&mut self, prediction: f64, label: f64, range: [f32; 2]) {
        if self.layout != Layout::Regression {
            return;
        }
        let (lo, hi) = (f64::from(range[0]), f64::from(range[1]));
        let width = (hi - lo).max(f64::MIN_POSITIVE);
        let p = if prediction.is_finite() {
            prediction.clamp(lo, hi)
        } else {
            // A prediction that is not a number is as wrong as the range allows.
            if label - lo > hi - label {
                lo
            } else {
                hi
            }
        };
        let y = label.clamp(lo, hi);
        let e = ((p - y) / width).powi(2);
        self.values[0] += 1.0;
        self.values[1] += e.clamp(0.0, self.layout.loss_bound(self.loss_clip));
    }

    pub fn values(&self) -> &[f64] {
        &self.values
    }

    pub fn into_values(self) -> Vec<f64> {
        self.values
    }
}

/// What the coordinator reads off the sum of the sites' noised vectors. Every figure is
/// post-processing of noised values; `noise_sd` is the standard deviation of the noise on
/// each value of the sum, and the `_sd` fields first-order standard deviations of the
/// derived figures (the denominator's own noise neglected).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    /// Sites whose vectors were summed.
    pub sites: usize,
    /// Held-out examples over all those sites (noised; at least 1 for the ratios).
    pub examples: f64,
    pub noise_sd: f64,
    /// Classification: the fraction classified correctly.
    pub accuracy: Option<f64>,
    pub accuracy_sd: Option<f64>,
    /// Classification: recall per class (NaN-free: 0 where a class has no examples).
    pub recall: Vec<f64>,
    /// Mean loss per example (cross-entropy, or the scaled squared error for regression).
    pub mean_loss: f64,
    pub mean_loss_sd: f64,
    /// Regression: root mean squared error in label units.
    pub rmse: Option<f64>,
}

impl EvalSummary {
    /// Reads the sum of `sites` noised vectors, each noised with `site_noise_sd`.
    pub fn from_sum(
        layout: Layout,
        sum: &[f64],
        sites: usize,
        site_noise_sd: f64,
        label_range: Option<[f32; 2]>,
    ) -> Option<Self> {
        if sum.len() != layout.len() || sites == 0 {
            return None;
        }
        let noise_sd = site_noise_sd * (sites as f64).sqrt();
        match layout {
            Layout::Classes { k } => {
                let cells = &sum[1..1 + k * k];
                let examples = cells.iter().sum::<f64>().max(1.0);
                let recall = (0..k)
                    .map(|t| {
                        let row = &cells[t * k..(t + 1) * k];
                        let n: f64 = row.iter().sum();
                        if n >= 1.0 {
                            (row[t] / n).clamp(0.0, 1.0)
                        } else {
                            0.0
                        }
                    })
                    .collect();
                Some(Self {
                    sites,
                    examples,
                    noise_sd,
                    accuracy: Some((sum[0] / examples).clamp(0.0, 1.0)),
                    accuracy_sd: Some(noise_sd / examples),
                    recall,
                    mean_loss: (sum[1 + k * k] / examples).max(0.0),
                    mean_loss_sd: noise_sd / examples,
                    rmse: None,
                })
            }
            Layout::Regression => {
                let examples = sum[0].max(1.0);
                let mse_scaled = (sum[1] / examples).max(0.0);
                let width = label_range.map_or(1.0, |r| f64::from(r[1]) - f64::from(r[0]));
                Some(Self {
                    sites,
                    examples,
                    noise_sd,
                    accuracy: None,
                    accuracy_sd: None,
                    recall: Vec::new(),
                    mean_loss: mse_scaled,
                    mean_loss_sd: noise_sd / examples,
                    rmse: Some(mse_scaled.sqrt() * width),
                })
            }
        }
    }

    /// The headline figure: accuracy for classification, RMSE for regression.
    pub fn headline(&self) -> (&'static str, f64) {
        match (self.accuracy, self.rmse) {
            (Some(a), _) => ("accuracy", a),
            (None, Some(r)) => ("rmse", r),
            (None, None) => ("loss", self.mean_loss),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn plan(every: u64) -> EvaluationPlan {
        EvaluationPlan {
            every,
            noise_multiplier: NoiseMultiplier::new(2.0).unwrap(),
            loss_clip: 3.0,
        }
    }

    #[test]
    fn evaluations_fall_on_every_kth_round_after_the_first() {
        let p = plan(3);
        let due: Vec<u64> = (1..=10).filter(|r| p.is_due(*r)).collect();
        assert_eq!(due, vec![4, 7, 10]);
        assert_eq!(
            (1..=4).filter(|r| plan(1).is_due(*r)).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
    }

    #[test]
    fn one_record_moves_the_vector_by_at_most_the_sensitivity() {
        // Every way one example can enter a 3-class vector, loss beyond the clip included.
        let layout = Layout::Classes { k: 3 };
        let s = layout.sensitivity(3.0);
        assert!((s - 11f64.sqrt()).abs() < 1e-12);
        for truth in 0..3 {
            for predicted in 0..3 {
                for loss in [0.0, 1.0, 3.0, 50.0, f64::INFINITY, f64::NAN] {
                    let mut sums = EvalSums::new(layout, 3.0);
                    sums.add_classified(truth, predicted, loss);
                    let norm = sums.values().iter().map(|v| v * v).sum::<f64>().sqrt();
                    assert!(norm <= s + 1e-12, "{truth} {predicted} {loss}: {norm}");
                }
            }
        }
        let r = Layout::Regression;
        for (p, y) in [(0.0, 10.0), (1e9, -1e9), (f64::NAN, 0.0), (5.0, 5.0)] {
            let mut sums = EvalSums::new(r, 3.0);
            sums.add_regressed(p, y, [0.0, 10.0]);
            let norm = sums.values().iter().map(|v| v * v).sum::<f64>().sqrt();
            assert!(norm <= r.sensitivity(3.0) + 1e-12, "{p} {y}: {norm}");
        }
    }

    #[test]
    fn the_summary_reads_accuracy_recall_and_rmse_off_exact_sums() {
        let layout = Layout::Classes { k: 2 };
        let mut sums = EvalSums::new(layout, 4.0);
        for (t, p, l) in [(0, 0, 0.1), (0, 1, 2.0), (1, 1, 0.3), (1, 1, 0.2)] {
            sums.add_classified(t, p, l);
        }
        let s = EvalSummary::from_sum(layout, sums.values(), 2, 1.0, None).unwrap();
        assert_eq!(s.examples, 4.0);
        assert_eq!(s.accuracy, Some(0.75));
        assert_eq!(s.recall, vec![0.5, 1.0]);
        assert!((s.mean_loss - 2.6 / 4.0).abs() < 1e-12);
        assert!((s.noise_sd - 2f64.sqrt()).abs() < 1e-12);

        let mut r = EvalSums::new(Layout::Regression, 1.0);
        r.add_regressed(12.0, 10.0, [0.0, 20.0]);
        r.add_regressed(8.0, 10.0, [0.0, 20.0]);
        let s = EvalSummary::from_sum(Layout::Regression, r.values(), 1, 0.5, Some([0.0, 20.0]))
            .unwrap();
        assert!((s.rmse.unwrap() - 2.0).abs() < 1e-9);
        assert!(EvalSummary::from_sum(layout, &[1.0], 1, 1.0, None).is_none());
    }
}
