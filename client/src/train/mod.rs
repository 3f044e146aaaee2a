//! Local training with candle on the CPU: any model `common::arch` describes (dense,
//! convolutional, pooling, normalisation, dropout layers), plain minibatch SGD (the local
//! step of site-level DP-FedAvg, whose caller clips and noises the delta), and DP-SGD for
//! record-level privacy (per-example clipped gradient sums without a backward pass per
//! example: see [`backprop`]).
//!
//! Loss per example, by task:
//! - binary: binary cross-entropy on the one logit, labels 0/1;
//! - multiclass: softmax cross-entropy over K logits, labels are class ids `0..K`;
//! - regression: half the squared error, so the output gradient is the residual.
//!   [`evaluate`] reports the mean squared error (and its root) instead.
//!
//! What this does not do: read data (see `crate::data`), draw noise or sample batches (the
//! caller's secure generator does, see [`DpSgdRound`]), or decide what a round may release.

mod backprop;
mod net;

use candle_core::{Device, Tensor};
use fedpriv_common::arch::{self, Compiled};
use fedpriv_common::config::Task;
use fedpriv_common::model::{Architecture, FlatModel, ModelSpec};

use crate::data::{is_class_id, Dataset, SplitMix64};

/// Each example's clipping factor is computed against its norm inflated by this relative
/// margin. The norm is exact to f64 rounding from the f32 factors; the margin covers the f32
/// rounding of the scaled factors (a few ulps, 1e-7 relative), so every clipped contribution
/// is at most C, as the accountant assumes, and not C plus rounding.
const CLIP_MARGIN: f64 = 1e-6;
/// Rows per forward pass in [`evaluate`], bounding its memory on large sites.
const EVAL_CHUNK: usize = 4096;

/// Settings of non-private local training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalTraining {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f32,
}

/// Diagnostics of one per-example-clipped batch. Computed from patients' records: log them
/// at the site, but releasing them costs privacy that the accountant does not count.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PerExampleStats {
    /// Examples in the batch.
    pub batch_n: usize,
    /// Share of examples whose gradient norm exceeded the clip norm (0 for an empty batch).
    pub clipped_fraction: f64,
    /// Mean per-example gradient norm before clipping, over the examples that counted
    /// (0 for an empty batch).
    pub mean_norm: f64,
}

/// Model quality on a dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    /// Mean cross-entropy (classification) or mean squared error (regression).
    pub loss: f64,
    /// Share of correct predictions (classification only).
    pub accuracy: Option<f64>,
    /// Root mean squared error (regression only), in the units of the labels as given.
    pub rmse: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("model does not fit: {0}")]
    Model(String),
    #[error("the model takes {expected} input values, the data has {got}")]
    FeatureMismatch { expected: usize, got: usize },
    #[error("batch of {batch_n} examples needs {expected} feature values and {batch_n} labels, got {got_x} and {got_y}")]
    BatchShape {
        batch_n: usize,
        expected: usize,
        got_x: usize,
        got_y: usize,
    },
    #[error("label of example {index} does not fit the model ({expected})")]
    InvalidLabel {
        index: usize,
        expected: &'static str,
    },
    #[error("noise has {got} values, the model has {expected}")]
    NoiseLength { expected: usize, got: usize },
    #[error("batch index {index} is out of range for {n} examples")]
    IndexOutOfRange { index: usize, n: usize },
    #[error("invalid setting: {0}")]
    Config(String),
    #[error("no examples")]
    EmptyData,
    #[error("training diverged: a parameter or gradient is not finite")]
    NonFinite,
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// How outputs become predictions and losses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    Sigmoid,
    Softmax(usize),
    Identity,
}

/// A model ready to train: its layers with their shapes, its tensor layout and its head.
#[derive(Debug, Clone, PartialEq)]
pub struct Learner {
    arch: Architecture,
    compiled: Compiled,
    spec: ModelSpec,
    head: Head,
}

impl Learner {
    /// `arch` on examples of shape `input` for `task` with `outputs` outputs (1 for binary
    /// and regression, K for K classes).
    pub fn new(
        arch: &Architecture,
        input: &[usize],
        task: Task,
        outputs: usize,
    ) -> Result<Self, TrainError> {
        let compiled =
            arch::compile(arch, input, outputs).map_err(|e| TrainError::Model(e.to_string()))?;
        Self::from_compiled(arch, compiled, task)
    }

    /// A learner for a compiled model (its input and outputs as compiled).
    fn from_compiled(
        arch: &Architecture,
        compiled: Compiled,
        task: Task,
    ) -> Result<Self, TrainError> {
        let head = match (task, compiled.outputs) {
            (Task::Binary, 1) => Head::Sigmoid,
            (Task::Regression, 1) => Head::Identity,
            (Task::Multiclass, k) if k >= 2 => Head::Softmax(k),
            (_, outputs) => {
                return Err(TrainError::Model(format!(
                    "{outputs} output(s) do not fit a {task:?} task"
                )))
            }
        };
        match (arch, task) {
            (Architecture::LinearRegression, Task::Regression) => {}
            (Architecture::LinearRegression, _) => {
                return Err(TrainError::Model(
                    "linear regression has one output and a squared loss".into(),
                ))
            }
            (Architecture::LogisticRegression, Task::Regression) => {
                return Err(TrainError::Model(
                    "logistic regression does not do regression".into(),
                ))
            }
            _ => {}
        }
        let spec = compiled
            .spec()
            .map_err(|e| TrainError::Model(e.to_string()))?;
        Ok(Self {
            arch: arch.clone(),
            compiled,
            spec,
            head,
        })
    }

    /// The learner for a flat feature vector of `n_features` values.
    pub fn flat(
        arch: &Architecture,
        n_features: usize,
        task: Task,
        outputs: usize,
    ) -> Result<Self, TrainError> {
        Self::new(arch, &[n_features], task, outputs)
    }

    /// The learner for a study's data contract.
    pub fn for_data(
        arch: &Architecture,
        data: &fedpriv_common::config::DataSpec,
    ) -> Result<Self, TrainError> {
        let compiled = arch::compile_for(arch, data, data.n_outputs())
            .map_err(|e| TrainError::Model(e.to_string()))?;
        Self::from_compiled(arch, compiled, data.task)
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    pub fn head(&self) -> Head {
        self.head
    }

    /// Values in one example's input.
    pub fn input_len(&self) -> usize {
        self.compiled.input.iter().product()
    }

    /// A fresh model (zeros for the convex families, uniform +-1/sqrt(fan_in) weights from
    /// `seed` otherwise).
    pub fn init(&self, seed: u64) -> Result<FlatModel, TrainError> {
        arch::init_compiled(&self.compiled, seed).map_err(|e| TrainError::Model(e.to_string()))
    }

    /// Checks that `model` has this learner's layout.
    fn check_model(&self, model: &FlatModel) -> Result<(), TrainError> {
        if model.spec != self.spec || model.values.len() != self.spec.num_values() {
            return Err(TrainError::Model(format!(
                "tensors {:?} do not match the model's {:?}",
                model.spec.tensors, self.spec.tensors
            )));
        }
        Ok(())
    }

    fn check_shape(&self, data: &Dataset) -> Result<(), TrainError> {
        if data.d != self.input_len() {
            return Err(TrainError::FeatureMismatch {
                expected: self.input_len(),
                got: data.d,
            });
        }
        let values = if data.images.is_some() {
            data.n * data.d
        } else {
            data.x.len()
        };
        if data.n.checked_mul(data.d) != Some(values) || data.y.len() != data.n {
            return Err(TrainError::BatchShape {
                batch_n: data.n,
                expected: data.n.saturating_mul(data.d),
                got_x: data.x.len(),
                got_y: data.y.len(),
            });
        }
        Ok(())
    }

    fn check_data(&self, data: &Dataset) -> Result<(), TrainError> {
        self.check_shape(data)?;
        check_labels(&data.y, self.head)
    }

    /// The gradient sum of a batch (`x` `[n, input]`, labels `y`, checked by the caller) at
    /// the model values `values` (spec order), by [`backprop`].
    fn gradient_sum(
        &self,
        values: &[f32],
        x: &[f32],
        y: &[f32],
        summing: backprop::Summing,
        seed: u64,
    ) -> Result<backprop::Summed, TrainError> {
        let params: Vec<&[f32]> = self
            .spec
            .layout()
            .map(|(_, _, off, len)| &values[off..off + len])
            .collect();
        let pass = backprop::Pass {
            compiled: &self.compiled,
            params: &params,
            head: self.head,
            summing,
            seed,
            total_values: values.len(),
        };
        backprop::gradient_sum(pass, x, y)
    }
}

fn check_labels(y: &[f32], head: Head) -> Result<(), TrainError> {
    let (classes, expected) = match head {
        Head::Sigmoid => (2, "0 or 1"),
        Head::Softmax(k) => (k, "an integer class id below the number of outputs"),
        Head::Identity => (0, "a finite number"),
    };
    let ok = |v: f32| match head {
        Head::Identity => v.is_finite(),
        _ => is_class_id(v, classes),
    };
    match y.iter().position(|&v| !ok(v)) {
        Some(index) => Err(TrainError::InvalidLabel { index, expected }),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// candle plumbing

/// The model's tensors, in spec order, with their shapes.
fn param_tensors(model: &FlatModel, dev: &Device) -> candle_core::Result<Vec<Tensor>> {
    model
        .spec
        .layout()
        .map(|(_, shape, off, len)| {
            let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            Tensor::from_slice(&model.values[off..off + len], shape, dev)
        })
        .collect()
}

/// One SGD step on the mean loss of a batch (`xb` `[n, input]`, labels `yb`), on `values` (in
/// spec order) in place, with the gradient from [`backprop`]; returns the batch's mean loss
/// before the step. Dropout masks come from `seed`.
fn plain_step(
    learner: &Learner,
    values: &mut [f32],
    xb: &[f32],
    yb: &[f32],
    learning_rate: f32,
    seed: u64,
) -> Result<f64, TrainError> {
    let n = yb.len();
    let summed = learner.gradient_sum(values, xb, yb, backprop::Summing::Plain, seed)?;
    let loss = summed.loss / n as f64;
    if !loss.is_finite() {
        return Err(TrainError::NonFinite);
    }
    let step = learning_rate / n as f32;
    for (v, g) in values.iter_mut().zip(&summed.sum) {
        *v -= step * g;
    }
    Ok(loss)
}

// ---------------------------------------------------------------------------------------
// Non-private training

fn check_lr(lr: f32) -> Result<(), TrainError> {
    if lr.is_finite() && lr > 0.0 {
        Ok(())
    } else {
        Err(TrainError::Config(format!(
            "learning rate {lr} is not a positive number"
        )))
    }
}

/// Plain minibatch SGD on the mean loss (gradients by [`backprop`]): `epochs` passes over the data
/// in an order shuffled from `seed`, the last batch of a pass possibly smaller. Returns the
/// trained model; the input model is not changed. Not private by itself: under site-level
/// DP the caller clips and noises the delta.
pub fn train_local(
    learner: &Learner,
    model: &FlatModel,
    data: &Dataset,
    cfg: &LocalTraining,
    seed: u64,
) -> Result<FlatModel, TrainError> {
    train_local_for(learner, model, data, cfg, seed, data.n)
}

/// [`train_local`] with a fixed amount of work: every pass takes `examples_per_epoch`
/// examples (the data shuffled, repeated or cut short to that length), so the time it takes
/// depends on a public number, not on how many records the site holds.
pub fn train_local_for(
    learner: &Learner,
    model: &FlatModel,
    data: &Dataset,
    cfg: &LocalTraining,
    seed: u64,
    examples_per_epoch: usize,
) -> Result<FlatModel, TrainError> {
    learner.check_model(model)?;
    learner.check_data(data)?;
    check_lr(cfg.learning_rate)?;
    if cfg.batch_size == 0 {
        return Err(TrainError::Config("batch size is 0".into()));
    }
    if data.n == 0 {
        return Err(TrainError::EmptyData);
    }
    if data.n > u32::MAX as usize {
        return Err(TrainError::Config("more than 2^32 examples".into()));
    }
    let mut values = model.values.clone();
    let mut order: Vec<u32> = (0..data.n as u32).collect();
    let mut pass: Vec<u32> = Vec::with_capacity(examples_per_epoch);
    let mut rng = SplitMix64::new(seed);
    let (mut xb, mut yb) = (Vec::new(), Vec::new());
    for _ in 0..cfg.epochs {
        pass.clear();
        while pass.len() < examples_per_epoch {
            rng.shuffle(&mut order);
            let take = (examples_per_epoch - pass.len()).min(order.len());
            pass.extend_from_slice(&order[..take]);
        }
        for batch in pass.chunks(cfg.batch_size) {
            // Rows are gathered per batch, so image rows are read only when used.
            let rows: Vec<usize> = batch.iter().map(|&i| i as usize).collect();
            xb.clear();
            data.rows_into(&rows, &mut xb);
            yb.clear();
            yb.extend(rows.iter().map(|&i| data.y[i]));
            plain_step(
                learner,
                &mut values,
                &xb,
                &yb,
                cfg.learning_rate,
                rng.next_u64(),
            )?;
        }
    }
    FlatModel::new(model.spec.clone(), values).map_err(|_| TrainError::NonFinite)
}

/// One non-private SGD step (mean loss) on the rows `batch` of `data`, in place.
/// Returns the batch's mean loss before the step. The same step [`train_local`] takes; here
/// for benchmarks and for callers that drive their own loop.
pub fn sgd_step(
    learner: &Learner,
    model: &mut FlatModel,
    data: &Dataset,
    batch: &[usize],
    learning_rate: f32,
) -> Result<f64, TrainError> {
    learner.check_model(model)?;
    learner.check_shape(data)?;
    check_lr(learning_rate)?;
    if batch.is_empty() {
        return Err(TrainError::EmptyData);
    }
    let (xb, yb) = gather(data, batch)?;
    check_labels(&yb, learner.head)?;
    let mut values = model.values.clone();
    let loss = plain_step(learner, &mut values, &xb, &yb, learning_rate, 0)?;
    *model = FlatModel::new(model.spec.clone(), values).map_err(|_| TrainError::NonFinite)?;
    Ok(loss)
}

/// Copies the rows `batch` of `data` out, checking the indices.
fn gather(data: &Dataset, batch: &[usize]) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    let mut xb = Vec::with_capacity(batch.len() * data.d);
    let mut yb = Vec::with_capacity(batch.len());
    for &i in batch {
        if i >= data.n {
            return Err(TrainError::IndexOutOfRange {
                index: i,
                n: data.n,
            });
        }
        yb.push(data.y[i]);
    }
    data.rows_into(batch, &mut xb);
    Ok((xb, yb))
}

// ---------------------------------------------------------------------------------------
// DP-SGD

/// The sum over a batch of each example's gradient clipped to L2 norm `clip`, flat in spec
/// order, plus diagnostics. See [`backprop`] for how, without a backward pass per example.
///
/// Never fails because of what an example holds (a coordinator chooses the model, and could
/// craft one that overflows for some records only): norms are computed in f64, and an
/// example whose gradient is not finite contributes zero.
///
/// `x_batch` is `batch_n x input` row-major, `y_batch` has `batch_n` labels. An empty batch
/// gives a zero sum. Dropout masks (if the model has dropout) come from `seed`.
pub fn per_example_clipped_grad_sum(
    learner: &Learner,
    model: &FlatModel,
    x_batch: &[f32],
    y_batch: &[f32],
    batch_n: usize,
    clip: f64,
) -> Result<(Vec<f32>, PerExampleStats), TrainError> {
    clipped_sum(learner, model, x_batch, y_batch, batch_n, batch_n, clip, 0)
}

/// [`per_example_clipped_grad_sum`] where only the first `active` rows are examples; the
/// rest are padding (any features, valid labels), computed like the others and weighted
/// zero, so that the time a step takes does not depend on how many examples it drew.
#[allow(clippy::too_many_arguments)]
fn clipped_sum(
    learner: &Learner,
    model: &FlatModel,
    x_batch: &[f32],
    y_batch: &[f32],
    batch_n: usize,
    active: usize,
    clip: f64,
    seed: u64,
) -> Result<(Vec<f32>, PerExampleStats), TrainError> {
    learner.check_model(model)?;
    let d = learner.input_len();
    let expected = batch_n.checked_mul(d);
    if expected != Some(x_batch.len()) || y_batch.len() != batch_n || active > batch_n {
        return Err(TrainError::BatchShape {
            batch_n,
            expected: expected.unwrap_or(usize::MAX),
            got_x: x_batch.len(),
            got_y: y_batch.len(),
        });
    }
    if !(clip.is_finite() && clip > 0.0) {
        return Err(TrainError::Config(format!(
            "clip norm {clip} is not a positive number"
        )));
    }
    check_labels(y_batch, learner.head)?;
    if batch_n == 0 {
        return Ok((vec![0.0; model.values.len()], PerExampleStats::default()));
    }
    let backprop::Summed {
        sum,
        norms,
        clipped,
        ..
    } = learner.gradient_sum(
        &model.values,
        x_batch,
        y_batch,
        backprop::Summing::Clipped { clip, active },
        seed,
    )?;
    let counted: Vec<f64> = norms.iter().copied().filter(|v| v.is_finite()).collect();
    let stats = PerExampleStats {
        batch_n: active,
        clipped_fraction: if active == 0 {
            0.0
        } else {
            clipped as f64 / active as f64
        },
        mean_norm: if counted.is_empty() {
            0.0
        } else {
            counted.iter().sum::<f64>() / counted.len() as f64
        },
    };
    Ok((sum, stats))
}

/// The number of rows every DP-SGD step computes, whatever its Poisson draw: the expected
/// batch plus six standard deviations and six. A step's time then does not depend on how
/// many examples it drew (which one record changes), except in a draw above this size,
/// whose probability is below 1e-9 per step; such a batch is computed whole.
pub fn padded_batch(expected_batch: f64) -> usize {
    (expected_batch + 6.0 * expected_batch.sqrt() + 6.0).ceil() as usize
}

/// One DP-SGD step on the rows `batch` of `data` (drawn by the caller's Poisson sampler), on
/// the working model `theta`, kept in f64:
/// `theta -= lr * (sum of clipped per-example gradients + noise) / expected_batch`.
///
/// The gradients are taken at `theta` rounded to f32 (saturated to the f32 range), a
/// function of earlier noised steps only. `noise` is one value per parameter, already scaled
/// (N(0, sigma^2 C^2) each), from the caller's secure generator, in f64: nothing is rounded
/// here, the caller rounds once when it releases the result. Dividing by the expected batch
/// size, not the drawn one, keeps the step's sensitivity fixed, as the accountant assumes;
/// an empty batch still applies the noise. The batch is padded to [`padded_batch`] rows;
/// dropout masks come from `seed`. Errors only for inputs that do not fit each other (a
/// caller's bug), never because of a record's values.
#[allow(clippy::too_many_arguments)]
pub fn dp_sgd_step(
    learner: &Learner,
    theta: &mut [f64],
    data: &Dataset,
    batch: &[usize],
    clip: f64,
    noise: &[f64],
    expected_batch: f64,
    learning_rate: f32,
    seed: u64,
) -> Result<PerExampleStats, TrainError> {
    dp_sgd_step_with(
        learner,
        theta,
        data,
        batch,
        clip,
        noise,
        expected_batch,
        learning_rate,
        seed,
        &mut |_, _| {},
    )
}

/// What a DP-SGD step lets an auditor do: add to the clipped gradient sum (canaries, each
/// at most C, sampled by the caller like records) and read the sum and the noise that is
/// added to it. Only a privacy audit uses it (`crate::privacy_audit`); training passes a
/// hook that does nothing.
pub type StepHook<'a> = dyn FnMut(&mut [f64], &[f64]) + 'a;

/// [`dp_sgd_step`] with a [`StepHook`] called on the clipped sum (f64) and the noise before
/// they are applied.
#[allow(clippy::too_many_arguments)]
pub fn dp_sgd_step_with(
    learner: &Learner,
    theta: &mut [f64],
    data: &Dataset,
    batch: &[usize],
    clip: f64,
    noise: &[f64],
    expected_batch: f64,
    learning_rate: f32,
    seed: u64,
    hook: &mut StepHook<'_>,
) -> Result<PerExampleStats, TrainError> {
    let at = FlatModel::new(learner.spec.clone(), saturated_f32(theta))
        .map_err(|e| TrainError::Model(e.to_string()))?;
    learner.check_shape(data)?;
    if noise.len() != theta.len() {
        return Err(TrainError::NoiseLength {
            expected: theta.len(),
            got: noise.len(),
        });
    }
    if !(expected_batch.is_finite() && expected_batch > 0.0) {
        return Err(TrainError::Config(format!(
            "expected batch size {expected_batch} is not a positive number"
        )));
    }
    check_lr(learning_rate)?;
    let (mut xb, mut yb) = gather(data, batch)?;
    let rows = batch.len().max(padded_batch(expected_batch));
    xb.resize(rows * data.d, 0.0);
    yb.resize(rows, 0.0);
    let (sum, stats) = clipped_sum(learner, &at, &xb, &yb, rows, batch.len(), clip, seed)?;
    let mut sum: Vec<f64> = sum.into_iter().map(f64::from).collect();
    hook(&mut sum, noise);
    let step = f64::from(learning_rate) / expected_batch;
    for ((v, &g), &e) in theta.iter_mut().zip(&sum).zip(noise) {
        *v -= step * (g + e);
    }
    Ok(stats)
}

/// The factor applied to every DP-SGD noise draw: 1. Only with the `audit-weak-noise`
/// feature, in a debug build, is it smaller, so that a test can check that a privacy audit
/// detects a mechanism that adds too little noise. A release build with the feature does
/// not compile.
#[cfg(not(feature = "audit-weak-noise"))]
pub fn noise_scale() -> f64 {
    1.0
}

#[cfg(all(feature = "audit-weak-noise", debug_assertions))]
pub fn noise_scale() -> f64 {
    0.05
}

#[cfg(all(feature = "audit-weak-noise", not(debug_assertions)))]
compile_error!(
    "the audit-weak-noise feature weakens the privacy noise: tests only, never a release build"
);

/// A clipped site-unit delta as it leaves a site under local noise: N(0, (sigma C)^2) added
/// to every value in f64 (scaled by [`noise_scale`]), rounded to f32 once.
pub fn noised_site_delta(
    clipped: &[f32],
    sigma_c: f64,
    noise: &mut fedpriv_common::dp::noise::NoiseSource,
) -> Vec<f32> {
    let mut wide: Vec<f64> = clipped.iter().map(|&v| f64::from(v)).collect();
    // Every core: the noise does not depend on how many.
    noise.add_gaussian_f64(
        &mut wide,
        sigma_c * noise_scale(),
        fedpriv_common::dp::noise::available_threads(),
    );
    saturated_f32(&wide)
}

/// f64 values rounded to f32, infinities and out-of-range values saturated to the largest
/// finite f32 (NaN cannot come out of a finite working model, but maps to zero if it did).
pub fn saturated_f32(values: &[f64]) -> Vec<f32> {
    values
        .iter()
        .map(|&v| {
            if v.is_nan() {
                0.0
            } else {
                v.clamp(f64::from(f32::MIN), f64::from(f32::MAX)) as f32
            }
        })
        .collect()
}

/// A [`StepHook`] for a whole round: also given the secure generator, so that it can
/// sample canaries exactly as records are sampled.
pub type RoundHook<'a> =
    dyn FnMut(&mut fedpriv_common::dp::noise::NoiseSource, &mut [f64], &[f64]) + 'a;

/// A DP-SGD round at a site: `steps` steps of [`dp_sgd_step`], each on a Poisson batch with
/// rate `q` drawn from the secure generator, with fresh noise N(0, (sigma C)^2) per
/// coordinate; returns the model delta, rounded to f32 once. `q` is the rate the ledger paid
/// for (expected batch over the *declared* record count), whatever the data's true size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSgdRound {
    pub steps: u64,
    pub q: f64,
    pub expected_batch: f64,
    pub learning_rate: f32,
    pub clip: f64,
    pub noise_multiplier: f64,
}

impl DpSgdRound {
    /// Runs the round from `global` on `data`. An error means the round could not run as
    /// planned (a bug or a resource failure, never a record's value); the caller then sends
    /// [`Self::noise_only`] instead.
    pub fn run(
        &self,
        learner: &Learner,
        global: &FlatModel,
        data: &Dataset,
        noise: &mut fedpriv_common::dp::noise::NoiseSource,
    ) -> Result<(Vec<f32>, u64), TrainError> {
        self.run_with(learner, global, data, noise, &mut |_, _, _| {})
    }

    /// [`Self::run`] with an audit hook, called at every step with the secure generator (to
    /// sample canaries like records), the clipped sum and the step's noise.
    pub fn run_with(
        &self,
        learner: &Learner,
        global: &FlatModel,
        data: &Dataset,
        noise: &mut fedpriv_common::dp::noise::NoiseSource,
        hook: &mut RoundHook<'_>,
    ) -> Result<(Vec<f32>, u64), TrainError> {
        use fedpriv_common::dp::noise::available_threads;
        use rand::RngCore;
        let start: Vec<f64> = global.values.iter().map(|&v| f64::from(v)).collect();
        let mut theta = start.clone();
        let mut taken = 0u64;
        for _ in 0..self.steps {
            let batch = fedpriv_common::dp::sampling::poisson_sample(data.n, self.q, noise.rng());
            let seed = noise.rng().next_u64();
            let mut z = vec![0f64; theta.len()];
            noise.add_gaussian_f64(
                &mut z,
                self.noise_multiplier * self.clip * noise_scale(),
                available_threads(),
            );
            // The hook may draw from the secure generator (canary sampling, like records).
            dp_sgd_step_with(
                learner,
                &mut theta,
                data,
                &batch,
                self.clip,
                &z,
                self.expected_batch,
                self.learning_rate,
                seed,
                &mut |sum, z| hook(noise, sum, z),
            )?;
            taken += 1;
        }
        let delta: Vec<f64> = theta.iter().zip(&start).map(|(a, b)| a - b).collect();
        Ok((saturated_f32(&delta), taken))
    }

    /// What the round releases when every example contributes nothing: the sum of its
    /// steps' noise times `-lr / expected_batch`, one Gaussian per coordinate with the same
    /// total variance, rounded once. Depends on no record, so it can stand in for a round
    /// that failed after it was paid for.
    pub fn noise_only(
        &self,
        values: usize,
        noise: &mut fedpriv_common::dp::noise::NoiseSource,
    ) -> Vec<f32> {
        let scale = f64::from(self.learning_rate) / self.expected_batch;
        let std = scale * self.noise_multiplier * self.clip * (self.steps as f64).sqrt();
        let mut z = vec![0f64; values];
        noise.add_gaussian_f64(&mut z, std, fedpriv_common::dp::noise::available_threads());
        saturated_f32(&z)
    }
}

// ---------------------------------------------------------------------------------------
// Evaluation

/// The model's outputs (logits, or the prediction for regression) on every row of `data`,
/// `[n, outputs]` row-major, in chunks that bound memory.
pub fn outputs(
    learner: &Learner,
    model: &FlatModel,
    data: &Dataset,
) -> Result<Vec<f32>, TrainError> {
    learner.check_model(model)?;
    learner.check_shape(data)?;
    let dev = Device::Cpu;
    let p = param_tensors(model, &dev)?;
    let mut out = Vec::with_capacity(data.n * learner.compiled.outputs);
    for start in (0..data.n).step_by(EVAL_CHUNK) {
        let rows = EVAL_CHUNK.min(data.n - start);
        let mut xb = Vec::with_capacity(rows * data.d);
        data.range_into(start, rows, &mut xb);
        let x = Tensor::from_vec(xb, (rows, data.d), &dev)?;
        let z = net::forward(&learner.compiled, &p, &x)?;
        out.extend(z.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Loss and accuracy (classification) or loss and RMSE (regression) of `model` on `data`.
pub fn evaluate(
    learner: &Learner,
    model: &FlatModel,
    data: &Dataset,
) -> Result<Metrics, TrainError> {
    learner.check_data(data)?;
    if data.n == 0 {
        return Err(TrainError::EmptyData);
    }
    let k = learner.compiled.outputs;
    let z = outputs(learner, model, data)?;
    let (mut loss, mut correct) = (0f64, 0usize);
    for (zi, &yi) in z.chunks(k).zip(&data.y) {
        let (l, ok) = example_loss(zi, yi, learner.head);
        loss += l;
        correct += usize::from(ok);
    }
    let n = data.n as f64;
    let loss = loss / n;
    if !loss.is_finite() {
        return Err(TrainError::NonFinite);
    }
    Ok(match learner.head {
        Head::Identity => Metrics {
            loss,
            accuracy: None,
            rmse: Some(loss.sqrt()),
        },
        _ => Metrics {
            loss,
            accuracy: Some(correct as f64 / n),
            rmse: None,
        },
    })
}

/// One example's evaluation loss (cross-entropy, or squared error) and whether the
/// predicted class is right; in f64 so that the figures do not depend on batch order.
pub fn example_loss(z: &[f32], y: f32, head: Head) -> (f64, bool) {
    let y64 = f64::from(y);
    match head {
        Head::Sigmoid => {
            let z = f64::from(z[0]);
            let loss = z.max(0.0) - y64 * z + (-z.abs()).exp().ln_1p();
            (loss, (z > 0.0) == (y > 0.5))
        }
        Head::Softmax(_) => {
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = f64::from(max)
                + z.iter()
                    .map(|&v| f64::from(v - max).exp())
                    .sum::<f64>()
                    .ln();
            let class = y as usize;
            let argmax = z
                .iter()
                .enumerate()
                .fold(0, |best, (i, &v)| if v > z[best] { i } else { best });
            (lse - f64::from(z[class]), argmax == class)
        }
        Head::Identity => {
            let r = f64::from(z[0]) - y64;
            (r * r, false)
        }
    }
}

#[cfg(test)]
mod tests;
