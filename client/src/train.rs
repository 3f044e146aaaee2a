//! Local training with candle on the CPU: the built-in models, plain minibatch SGD (the
//! local step of site-level DP-FedAvg, whose caller clips and noises the delta), and the
//! DP-SGD building blocks for record-level privacy (per-example clipped gradient sums).
//!
//! Loss per example, by head:
//! - logistic regression and the MLP with one output: binary cross-entropy on the logit,
//!   labels 0/1; with k >= 2 outputs: softmax cross-entropy, labels are class ids `0..k`;
//! - linear regression: half the squared error, so the output gradient is the residual.
//!   [`evaluate`] reports the mean squared error (and its root) instead.
//!
//! Tensors, in flat order: `linear.weight` [out, in], `linear.bias` [out]; for the MLP
//! `hidden.weight` [hidden, in], `hidden.bias` [hidden], `out.weight` [out, hidden],
//! `out.bias` [out]. The MLP's hidden activation is tanh.

use candle_core::{Device, Tensor, Var};
use fedpriv_common::model::{Architecture, FlatModel, ModelSpec, TensorSpec};

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
    /// Mean per-example gradient norm before clipping (0 for an empty batch).
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
    #[error("the model takes {expected} features, the data has {got}")]
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
enum Head {
    Sigmoid,
    Softmax(usize),
    Identity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dims {
    inputs: usize,
    head: Head,
}

fn head_for(arch: Architecture, n_outputs: usize) -> Result<Head, TrainError> {
    match (arch, n_outputs) {
        (_, 0) => Err(TrainError::Model(
            "a model needs at least one output".into(),
        )),
        (Architecture::LinearRegression, 1) => Ok(Head::Identity),
        (Architecture::LinearRegression, k) => Err(TrainError::Model(format!(
            "linear regression has one output, not {k}"
        ))),
        (_, 1) => Ok(Head::Sigmoid),
        (_, k) => Ok(Head::Softmax(k)),
    }
}

/// The tensor layout of `arch` for this input width and number of outputs (1 for binary
/// classification and regression, k for k-class softmax). The layout itself lives in
/// `common::arch`, shared with the coordinator; this adds the head checks training needs.
pub fn model_spec(
    arch: Architecture,
    n_features: usize,
    n_outputs: usize,
) -> Result<ModelSpec, TrainError> {
    if n_features == 0 {
        return Err(TrainError::Model("a model needs at least one input".into()));
    }
    if let Architecture::Mlp { hidden: 0 } = arch {
        return Err(TrainError::Model("an MLP needs hidden units".into()));
    }
    head_for(arch, n_outputs)?;
    fedpriv_common::arch::model_spec(arch, n_features, n_outputs)
        .map_err(|e| TrainError::Model(e.to_string()))
}

/// A fresh model (see `common::arch::init_model`: zeros for the convex models, uniform
/// +-1/sqrt(fan_in) weights from `seed` for the MLP).
pub fn init_model(
    arch: Architecture,
    n_features: usize,
    n_outputs: usize,
    seed: u64,
) -> Result<FlatModel, TrainError> {
    model_spec(arch, n_features, n_outputs)?;
    fedpriv_common::arch::init_model(arch, n_features, n_outputs, seed)
        .map_err(|e| TrainError::Model(e.to_string()))
}

/// Checks that `model` is exactly an `arch` model and returns its dimensions.
fn dims_of(model: &FlatModel, arch: Architecture) -> Result<Dims, TrainError> {
    let width = |t: Option<&TensorSpec>, axis: usize| {
        t.and_then(|t| t.shape.get(axis))
            .and_then(|&v| usize::try_from(v).ok())
            .ok_or_else(|| TrainError::Model(format!("tensors do not match a {arch:?} model")))
    };
    let inputs = width(model.spec.tensors.first(), 1)?;
    let outputs = width(model.spec.tensors.last(), 0)?;
    let expected = model_spec(arch, inputs, outputs)?;
    if expected != model.spec {
        return Err(TrainError::Model(format!(
            "tensors {:?} do not match a {arch:?} model",
            model.spec.tensors
        )));
    }
    if model.values.len() != expected.num_values() {
        return Err(TrainError::Model(format!(
            "{} values for a spec of {}",
            model.values.len(),
            expected.num_values()
        )));
    }
    Ok(Dims {
        inputs,
        head: head_for(arch, outputs)?,
    })
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

/// Checks that `data` is well formed and as wide as the model (not its labels).
fn check_shape(dims: &Dims, data: &Dataset) -> Result<(), TrainError> {
    if data.d != dims.inputs {
        return Err(TrainError::FeatureMismatch {
            expected: dims.inputs,
            got: data.d,
        });
    }
    if data.n.checked_mul(data.d) != Some(data.x.len()) || data.y.len() != data.n {
        return Err(TrainError::BatchShape {
            batch_n: data.n,
            expected: data.n.saturating_mul(data.d),
            got_x: data.x.len(),
            got_y: data.y.len(),
        });
    }
    Ok(())
}

fn check_data(dims: &Dims, data: &Dataset) -> Result<(), TrainError> {
    check_shape(dims, data)?;
    check_labels(&data.y, dims.head)
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

fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)?.broadcast_add(b)
}

/// Logits `[n, outputs]`, and for the MLP the hidden activations `[n, hidden]`.
fn forward(p: &[Tensor], x: &Tensor) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    match p {
        [w, b] => Ok((linear(x, w, b)?, None)),
        [w1, b1, w2, b2] => {
            let h = linear(x, w1, b1)?.tanh()?;
            Ok((linear(&h, w2, b2)?, Some(h)))
        }
        _ => Err(candle_core::Error::Msg(
            "unexpected number of tensors".into(),
        )),
    }
}

/// Labels as tensors: `[n]` values, and `[n, k]` one-hot rows for a softmax head.
struct Targets {
    y: Tensor,
    onehot: Option<Tensor>,
}

impl Targets {
    fn new(y: &[f32], head: Head, dev: &Device) -> candle_core::Result<Self> {
        let onehot = match head {
            Head::Softmax(k) => {
                let mut m = vec![0f32; y.len() * k];
                for (i, &c) in y.iter().enumerate() {
                    m[i * k + c as usize] = 1.0;
                }
                Some(Tensor::from_vec(m, (y.len(), k), dev)?)
            }
            _ => None,
        };
        Ok(Self {
            y: Tensor::from_slice(y, y.len(), dev)?,
            onehot,
        })
    }

    fn rows(&self, ids: &Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            y: self.y.index_select(ids, 0)?,
            onehot: self
                .onehot
                .as_ref()
                .map(|m| m.index_select(ids, 0))
                .transpose()?,
        })
    }
}

/// Per-example losses `[n]` from differentiable ops, for autograd.
fn per_example_loss(z: &Tensor, t: &Targets, head: Head) -> candle_core::Result<Tensor> {
    match (head, &t.onehot) {
        (Head::Softmax(_), Some(onehot)) => z.log_sum_exp(1)?.sub(&z.mul(onehot)?.sum(1)?),
        (Head::Sigmoid, _) => {
            // max(z, 0) - y z + ln(1 + e^-|z|): stable for any z. At z = 0 candle's
            // derivatives of relu and abs are both 1, which still sums to sigmoid(0) - y.
            let z = z.squeeze(1)?;
            let soft = z.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
            z.relu()?.sub(&t.y.mul(&z)?)?.add(&soft)
        }
        (Head::Identity, _) => z.squeeze(1)?.sub(&t.y)?.sqr()?.affine(0.5, 0.0),
        (Head::Softmax(_), None) => Err(candle_core::Error::Msg("missing one-hot labels".into())),
    }
}

/// d(loss_i)/d(logits_i) for every example, `[n, outputs]`, without autograd.
fn output_grad(z: &Tensor, t: &Targets, head: Head) -> candle_core::Result<Tensor> {
    let y = || t.y.unsqueeze(1);
    match (head, &t.onehot) {
        (Head::Sigmoid, _) => z.neg()?.exp()?.affine(1.0, 1.0)?.recip()?.sub(&y()?),
        (Head::Softmax(_), Some(onehot)) => {
            let e = z.broadcast_sub(&z.max_keepdim(1)?)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(1)?)?.sub(onehot)
        }
        (Head::Identity, _) => z.sub(&y()?),
        (Head::Softmax(_), None) => Err(candle_core::Error::Msg("missing one-hot labels".into())),
    }
}

/// One autograd SGD step on the mean loss of a batch; returns that loss.
fn autograd_step(
    vars: &[Var],
    x: &Tensor,
    t: &Targets,
    head: Head,
    lr: f64,
) -> candle_core::Result<f32> {
    let p: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (z, _) = forward(&p, x)?;
    let loss = per_example_loss(&z, t, head)?.mean_all()?;
    let grads = loss.backward()?;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            v.set(&v.as_tensor().sub(&g.affine(lr, 0.0)?)?)?;
        }
    }
    loss.to_scalar::<f32>()
}

/// Model values from candle variables, checked finite.
fn values_of(vars: &[Var], spec: &ModelSpec) -> Result<FlatModel, TrainError> {
    let mut values = Vec::with_capacity(spec.num_values());
    for v in vars {
        values.extend(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
    }
    FlatModel::new(spec.clone(), values).map_err(|_| TrainError::NonFinite)
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

/// Plain minibatch SGD on the mean loss, with candle autograd: `epochs` passes over the data
/// in an order shuffled from `seed`, the last batch of a pass possibly smaller. Returns the
/// trained model; the input model is not changed. Not private by itself: under site-level
/// DP the caller clips and noises the delta.
pub fn train_local(
    model: &FlatModel,
    arch: Architecture,
    data: &Dataset,
    cfg: &LocalTraining,
    seed: u64,
) -> Result<FlatModel, TrainError> {
    train_local_for(model, arch, data, cfg, seed, data.n)
}

/// [`train_local`] with a fixed amount of work: every pass takes `examples_per_epoch`
/// examples (the data shuffled, repeated or cut short to that length), so the time it takes
/// depends on a public number, not on how many records the site holds.
pub fn train_local_for(
    model: &FlatModel,
    arch: Architecture,
    data: &Dataset,
    cfg: &LocalTraining,
    seed: u64,
    examples_per_epoch: usize,
) -> Result<FlatModel, TrainError> {
    let dims = dims_of(model, arch)?;
    check_data(&dims, data)?;
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
    let dev = Device::Cpu;
    let vars = param_tensors(model, &dev)?
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let x = Tensor::from_slice(&data.x, (data.n, data.d), &dev)?;
    let targets = Targets::new(&data.y, dims.head, &dev)?;
    let mut order: Vec<u32> = (0..data.n as u32).collect();
    let mut pass: Vec<u32> = Vec::with_capacity(examples_per_epoch);
    let mut rng = SplitMix64::new(seed);
    for _ in 0..cfg.epochs {
        pass.clear();
        while pass.len() < examples_per_epoch {
            rng.shuffle(&mut order);
            let take = (examples_per_epoch - pass.len()).min(order.len());
            pass.extend_from_slice(&order[..take]);
        }
        for batch in pass.chunks(cfg.batch_size) {
            let ids = Tensor::from_slice(batch, batch.len(), &dev)?;
            let loss = autograd_step(
                &vars,
                &x.index_select(&ids, 0)?,
                &targets.rows(&ids)?,
                dims.head,
                f64::from(cfg.learning_rate),
            )?;
            if !loss.is_finite() {
                return Err(TrainError::NonFinite);
            }
        }
    }
    values_of(&vars, &model.spec)
}

/// One non-private SGD step (autograd, mean loss) on the rows `batch` of `data`, in place.
/// Returns the batch's mean loss before the step. The same step [`train_local`] takes; here
/// for benchmarks and for callers that drive their own loop.
pub fn sgd_step(
    model: &mut FlatModel,
    arch: Architecture,
    data: &Dataset,
    batch: &[usize],
    learning_rate: f32,
) -> Result<f64, TrainError> {
    let dims = dims_of(model, arch)?;
    check_shape(&dims, data)?;
    check_lr(learning_rate)?;
    if batch.is_empty() {
        return Err(TrainError::EmptyData);
    }
    let (xb, yb) = gather(data, batch)?;
    check_labels(&yb, dims.head)?;
    let dev = Device::Cpu;
    let vars = param_tensors(model, &dev)?
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let x = Tensor::from_vec(xb, (batch.len(), data.d), &dev)?;
    let targets = Targets::new(&yb, dims.head, &dev)?;
    let loss = autograd_step(&vars, &x, &targets, dims.head, f64::from(learning_rate))?;
    *model = values_of(&vars, &model.spec)?;
    Ok(f64::from(loss))
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
        xb.extend_from_slice(data.row(i));
        yb.push(data.y[i]);
    }
    Ok((xb, yb))
}

// ---------------------------------------------------------------------------------------
// DP-SGD building blocks

/// The sum over a batch of each example's gradient clipped to L2 norm `clip`, flat in spec
/// order, plus diagnostics.
///
/// No backward pass per example: for a linear layer `z = a W^T + b` the example's gradient
/// is `g_i a_i^T` (weights) and `g_i` (bias), where `g_i` is the gradient of its loss with
/// respect to `z_i`; its squared norm is `||g_i||^2 (||a_i||^2 + 1)`, computed without
/// forming the outer product. For the MLP the output gradient is carried back through the
/// tanh by hand (`delta_i = (g_i W2) * (1 - h_i^2)`) and the layers' squared norms add up.
/// Each example's `(a_i, g_i)` is then scaled by `min(1, C / norm_i)` and every layer's sum
/// is one matmul, `(s g)^T a`.
///
/// Never fails because of what an example holds (a coordinator chooses the model, and could
/// craft one that overflows for some records only): norms are computed in f64 from the f32
/// factors, and an example whose gradient is not finite contributes zero, as does a padding
/// row (see [`padded_batch`]).
///
/// `x_batch` is `batch_n x d` row-major, `y_batch` has `batch_n` labels. An empty batch
/// gives a zero sum.
pub fn per_example_clipped_grad_sum(
    model: &FlatModel,
    arch: Architecture,
    x_batch: &[f32],
    y_batch: &[f32],
    batch_n: usize,
    clip: f64,
) -> Result<(Vec<f32>, PerExampleStats), TrainError> {
    clipped_sum(model, arch, x_batch, y_batch, batch_n, batch_n, clip)
}

/// [`per_example_clipped_grad_sum`] where only the first `active` rows are examples; the
/// rest are padding (any features, valid labels), computed like the others and weighted
/// zero, so that the time a step takes does not depend on how many examples it drew.
fn clipped_sum(
    model: &FlatModel,
    arch: Architecture,
    x_batch: &[f32],
    y_batch: &[f32],
    batch_n: usize,
    active: usize,
    clip: f64,
) -> Result<(Vec<f32>, PerExampleStats), TrainError> {
    let dims = dims_of(model, arch)?;
    let expected = batch_n.checked_mul(dims.inputs);
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
    check_labels(y_batch, dims.head)?;
    if batch_n == 0 {
        return Ok((vec![0.0; model.values.len()], PerExampleStats::default()));
    }
    let dev = Device::Cpu;
    let p = param_tensors(model, &dev)?;
    let x = Tensor::from_slice(x_batch, (batch_n, dims.inputs), &dev)?;
    let t = Targets::new(y_batch, dims.head, &dev)?;
    let (z, h) = forward(&p, &x)?;
    let g = output_grad(&z, &t, dims.head)?;
    // (layer input, gradient at the layer's output), in spec order.
    let layers = match (p.as_slice(), h) {
        ([_, _, w2, _], Some(h)) => {
            let delta = g.matmul(w2)?.mul(&h.sqr()?.affine(-1.0, 1.0)?)?;
            vec![(x, delta), (h, g)]
        }
        _ => vec![(x, g)],
    };
    // Host copies of every layer's factors; the squared norms in f64.
    let mut host: Vec<(Vec<f32>, usize, Vec<f32>, usize)> = Vec::with_capacity(layers.len());
    for (a, g) in &layers {
        let (a_cols, g_cols) = (a.dim(1)?, g.dim(1)?);
        host.push((
            a.flatten_all()?.to_vec1::<f32>()?,
            a_cols,
            g.flatten_all()?.to_vec1::<f32>()?,
            g_cols,
        ));
    }
    let sq = |v: &[f32]| v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
    let mut scales = vec![0f32; batch_n];
    let (mut clipped, mut counted, mut norm_total) = (0usize, 0usize, 0f64);
    for (i, scale) in scales.iter_mut().enumerate().take(active) {
        let norm_sq: f64 = host
            .iter()
            .map(|(a, ac, g, gc)| {
                sq(&g[i * gc..(i + 1) * gc]) * (sq(&a[i * ac..(i + 1) * ac]) + 1.0)
            })
            .sum();
        let norm = norm_sq.sqrt();
        if !norm.is_finite() {
            // Counts as zero: the example adds nothing, whatever the model made of it.
            continue;
        }
        counted += 1;
        norm_total += norm;
        let padded = norm * (1.0 + CLIP_MARGIN);
        if padded > clip {
            clipped += 1;
            *scale = (clip / padded) as f32;
        } else {
            *scale = 1.0;
        }
    }
    let mut sum = Vec::with_capacity(model.values.len());
    for (a, ac, g, gc) in host {
        // Zero rows for examples that count as zero, so that an infinite factor times a
        // zero scale cannot make a NaN.
        let mut gs = vec![0f32; batch_n * gc];
        let mut aa = vec![0f32; batch_n * ac];
        for (i, &s) in scales.iter().enumerate() {
            if s > 0.0 {
                for (o, &v) in gs[i * gc..(i + 1) * gc]
                    .iter_mut()
                    .zip(&g[i * gc..(i + 1) * gc])
                {
                    *o = v * s;
                }
                aa[i * ac..(i + 1) * ac].copy_from_slice(&a[i * ac..(i + 1) * ac]);
            }
        }
        let gs = Tensor::from_vec(gs, (batch_n, gc), &dev)?;
        let aa = Tensor::from_vec(aa, (batch_n, ac), &dev)?;
        sum.extend(gs.t()?.matmul(&aa)?.flatten_all()?.to_vec1::<f32>()?);
        sum.extend(gs.sum(0)?.to_vec1::<f32>()?);
    }
    let stats = PerExampleStats {
        batch_n: active,
        clipped_fraction: if active == 0 {
            0.0
        } else {
            clipped as f64 / active as f64
        },
        mean_norm: if counted == 0 {
            0.0
        } else {
            norm_total / counted as f64
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
/// an empty batch still applies the noise. The batch is padded to
/// [`padded_batch`] rows. Errors only for inputs that do not fit each other (a caller's bug),
/// never because of a record's values.
#[allow(clippy::too_many_arguments)]
pub fn dp_sgd_step(
    theta: &mut [f64],
    spec: &ModelSpec,
    arch: Architecture,
    data: &Dataset,
    batch: &[usize],
    clip: f64,
    noise: &[f64],
    expected_batch: f64,
    learning_rate: f32,
) -> Result<PerExampleStats, TrainError> {
    let at = FlatModel::new(spec.clone(), saturated_f32(theta))
        .map_err(|e| TrainError::Model(e.to_string()))?;
    let dims = dims_of(&at, arch)?;
    check_shape(&dims, data)?;
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
    let (sum, stats) = clipped_sum(&at, arch, &xb, &yb, rows, batch.len(), clip)?;
    let step = f64::from(learning_rate) / expected_batch;
    for ((v, &g), &e) in theta.iter_mut().zip(&sum).zip(noise) {
        *v -= step * (f64::from(g) + e);
    }
    Ok(stats)
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
        global: &FlatModel,
        arch: Architecture,
        data: &Dataset,
        noise: &mut fedpriv_common::dp::noise::NoiseSource,
    ) -> Result<(Vec<f32>, u64), TrainError> {
        use fedpriv_common::dp::noise::available_threads;
        let start: Vec<f64> = global.values.iter().map(|&v| f64::from(v)).collect();
        let mut theta = start.clone();
        let mut taken = 0u64;
        for _ in 0..self.steps {
            let batch = fedpriv_common::dp::sampling::poisson_sample(data.n, self.q, noise.rng());
            let mut z = vec![0f64; theta.len()];
            noise.add_gaussian_f64(
                &mut z,
                self.noise_multiplier * self.clip,
                available_threads(),
            );
            dp_sgd_step(
                &mut theta,
                &global.spec,
                arch,
                data,
                &batch,
                self.clip,
                &z,
                self.expected_batch,
                self.learning_rate,
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

/// Loss and accuracy (classification) or loss and RMSE (regression) of `model` on `data`.
pub fn evaluate(
    model: &FlatModel,
    arch: Architecture,
    data: &Dataset,
) -> Result<Metrics, TrainError> {
    let dims = dims_of(model, arch)?;
    check_data(&dims, data)?;
    if data.n == 0 {
        return Err(TrainError::EmptyData);
    }
    let dev = Device::Cpu;
    let p = param_tensors(model, &dev)?;
    let (mut loss, mut correct) = (0f64, 0usize);
    for start in (0..data.n).step_by(EVAL_CHUNK) {
        let rows = EVAL_CHUNK.min(data.n - start);
        let x = &data.x[start * data.d..(start + rows) * data.d];
        let x = Tensor::from_slice(x, (rows, data.d), &dev)?;
        let z = forward(&p, &x)?.0.to_vec2::<f32>()?;
        for (zi, &yi) in z.iter().zip(&data.y[start..start + rows]) {
            let (l, ok) = example_loss(zi, yi, dims.head);
            loss += l;
            correct += usize::from(ok);
        }
    }
    let n = data.n as f64;
    let loss = loss / n;
    if !loss.is_finite() {
        return Err(TrainError::NonFinite);
    }
    Ok(match dims.head {
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
fn example_loss(z: &[f32], y: f32, head: Head) -> (f64, bool) {
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
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::data::{
        load_csv, load_ranges, scale_features, train_test_split, ColumnSelection, LoadOptions,
    };
    use fedpriv_common::model::l2_norm;

    const LOGISTIC: Architecture = Architecture::LogisticRegression;
    const LINEAR: Architecture = Architecture::LinearRegression;
    const MLP: Architecture = Architecture::Mlp { hidden: 5 };

    /// A model of `arch` with every value random (zero-initialised models would make the
    /// gradient test too easy).
    fn random_model(arch: Architecture, d: usize, k: usize, seed: u64) -> FlatModel {
        let mut m = init_model(arch, d, k, seed).unwrap();
        let mut rng = SplitMix64::new(seed ^ 0xABCD);
        for v in &mut m.values {
            *v = (rng.next_f64() * 2.0 - 1.0) as f32;
        }
        m
    }

    /// A batch of `n` examples of `d` features with labels fit for `head`.
    fn random_batch(
        n: usize,
        d: usize,
        arch: Architecture,
        k: usize,
        seed: u64,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut rng = SplitMix64::new(seed);
        let x = (0..n * d)
            .map(|_| (rng.next_f64() * 4.0 - 2.0) as f32)
            .collect();
        let y = (0..n)
            .map(|_| match (arch, k) {
                (Architecture::LinearRegression, _) => (rng.next_f64() * 6.0 - 3.0) as f32,
                (_, 1) => rng.below(2) as f32,
                (_, k) => rng.below(k) as f32,
            })
            .collect();
        (x, y)
    }

    /// Reference: the gradient of one example's loss by a full autograd backward pass.
    fn autograd_grad(model: &FlatModel, arch: Architecture, x: &[f32], y: f32) -> Vec<f32> {
        let dims = dims_of(model, arch).unwrap();
        let dev = Device::Cpu;
        let vars: Vec<Var> = param_tensors(model, &dev)
            .unwrap()
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let p: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let xt = Tensor::from_slice(x, (1, x.len()), &dev).unwrap();
        let t = Targets::new(&[y], dims.head, &dev).unwrap();
        let (z, _) = forward(&p, &xt).unwrap();
        let loss = per_example_loss(&z, &t, dims.head)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        vars.iter()
            .flat_map(|v| {
                grads
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * scale,
                "{what}: value {i}: {g} vs {w}"
            );
        }
    }

    const CASES: [(Architecture, usize); 5] = [
        (LOGISTIC, 1),
        (LOGISTIC, 3),
        (LINEAR, 1),
        (MLP, 1),
        (MLP, 3),
    ];

    #[test]
    fn per_example_gradients_equal_one_example_backward_pass() {
        let (n, d) = (9, 4);
        for (case, &(arch, k)) in CASES.iter().enumerate() {
            let model = random_model(arch, d, k, case as u64);
            let (x, y) = random_batch(n, d, arch, k, 100 + case as u64);
            let reference: Vec<Vec<f32>> = (0..n)
                .map(|i| autograd_grad(&model, arch, &x[i * d..(i + 1) * d], y[i]))
                .collect();
            // One example at a time, no clipping: exactly that example's gradient.
            for i in 0..n {
                let (g, stats) = per_example_clipped_grad_sum(
                    &model,
                    arch,
                    &x[i * d..(i + 1) * d],
                    &y[i..=i],
                    1,
                    1e9,
                )
                .unwrap();
                assert_close(
                    &g,
                    &reference[i],
                    1e-5,
                    &format!("{arch:?}/{k} example {i}"),
                );
                assert!(
                    (stats.mean_norm - l2_norm(&reference[i])).abs()
                        < 1e-4 * stats.mean_norm.max(1.0)
                );
            }
            // The whole batch with a clip norm that bites on some examples.
            let norms: Vec<f64> = reference.iter().map(|g| l2_norm(g)).collect();
            let mut sorted = norms.clone();
            sorted.sort_by(f64::total_cmp);
            let clip = sorted[n / 2];
            let mut want = vec![0f32; model.values.len()];
            for (g, &norm) in reference.iter().zip(&norms) {
                let s = (clip / norm).min(1.0) as f32;
                for (w, v) in want.iter_mut().zip(g) {
                    *w += s * v;
                }
            }
            let (got, stats) = per_example_clipped_grad_sum(&model, arch, &x, &y, n, clip).unwrap();
            assert_close(&got, &want, 1e-4, &format!("{arch:?}/{k} clipped sum"));
            let mean = norms.iter().sum::<f64>() / n as f64;
            assert!((stats.mean_norm - mean).abs() < 1e-4 * mean, "{arch:?}/{k}");
            let over = norms
                .iter()
                .filter(|&&v| v * (1.0 + CLIP_MARGIN) > clip)
                .count();
            assert!((stats.clipped_fraction - over as f64 / n as f64).abs() < 1e-12);
            assert_eq!(stats.batch_n, n);
        }
    }

    #[test]
    fn clipping_bounds_each_examples_contribution() {
        let d = 6;
        for (case, &(arch, k)) in CASES.iter().enumerate() {
            let model = random_model(arch, d, k, 7 + case as u64);
            let (mut x, y) = random_batch(20, d, arch, k, 300 + case as u64);
            // Some far-out examples, so that norms span orders of magnitude.
            for v in x.iter_mut().step_by(5) {
                *v *= 1000.0;
            }
            for clip in [1e-3, 0.1, 1.0, 5.0] {
                for i in 0..20 {
                    let (g, _) = per_example_clipped_grad_sum(
                        &model,
                        arch,
                        &x[i * d..(i + 1) * d],
                        &y[i..=i],
                        1,
                        clip,
                    )
                    .unwrap();
                    let norm = l2_norm(&g);
                    assert!(
                        norm <= clip * (1.0 + 1e-6),
                        "{arch:?}/{k} clip {clip}: {norm}"
                    );
                }
                // And the sum of 20 is within 20 C.
                let (g, _) = per_example_clipped_grad_sum(&model, arch, &x, &y, 20, clip).unwrap();
                assert!(l2_norm(&g) <= 20.0 * clip * (1.0 + 1e-6));
            }
        }
    }

    #[test]
    fn empty_batch_gives_zero_sum() {
        let model = random_model(MLP, 3, 1, 1);
        let (g, stats) = per_example_clipped_grad_sum(&model, MLP, &[], &[], 0, 1.0).unwrap();
        assert_eq!(g, vec![0.0; model.values.len()]);
        assert_eq!(stats, PerExampleStats::default());
    }

    fn toy_dataset(arch: Architecture, k: usize, n: usize, d: usize) -> Dataset {
        let (x, y) = random_batch(n, d, arch, k, 42);
        Dataset::new(x, y, (0..d).map(|i| format!("f{i}")).collect(), "y".into()).unwrap()
    }

    #[test]
    fn dp_sgd_step_applies_the_formula() {
        let (arch, d) = (MLP, 3);
        let data = toy_dataset(arch, 1, 10, d);
        let model = random_model(arch, d, 1, 5);
        let noise: Vec<f64> = (0..model.values.len())
            .map(|i| (i as f64 - 10.0) * 0.01)
            .collect();
        let batch = [1usize, 4, 4, 9];
        let (xb, yb) = gather(&data, &batch).unwrap();
        let (sum, _) = per_example_clipped_grad_sum(&model, arch, &xb, &yb, 4, 0.5).unwrap();
        let start: Vec<f64> = model.values.iter().map(|&v| f64::from(v)).collect();
        let mut theta = start.clone();
        let stats = dp_sgd_step(
            &mut theta,
            &model.spec,
            arch,
            &data,
            &batch,
            0.5,
            &noise,
            5.0,
            0.1,
        )
        .unwrap();
        assert_eq!(stats.batch_n, 4);
        for j in 0..model.values.len() {
            let want = start[j] - 0.1f64 * (f64::from(sum[j]) + noise[j]) / 5.0;
            // The padding rows change nothing but the matmul's summation order.
            assert!((theta[j] - want).abs() < 1e-6, "{} vs {want}", theta[j]);
        }
        // An empty Poisson batch: no gradient, but the noise is still added, in f64.
        let mut theta = start.clone();
        let stats = dp_sgd_step(
            &mut theta,
            &model.spec,
            arch,
            &data,
            &[],
            0.5,
            &noise,
            5.0,
            0.1,
        )
        .unwrap();
        assert_eq!(stats.batch_n, 0);
        for ((&before, &after), &e) in start.iter().zip(&theta).zip(&noise) {
            assert_eq!(after, before - 0.1f32 as f64 / 5.0 * e);
        }
        // Errors leave the model as it was.
        let mut m = start.clone();
        let step = |m: &mut Vec<f64>, batch: &[usize], noise: &[f64], b: f64, clip: f64| {
            dp_sgd_step(m, &model.spec, arch, &data, batch, clip, noise, b, 0.1)
        };
        assert!(matches!(
            step(&mut m, &batch, &noise[1..], 5.0, 0.5),
            Err(TrainError::NoiseLength { .. })
        ));
        assert!(matches!(
            step(&mut m, &[10], &noise, 5.0, 0.5),
            Err(TrainError::IndexOutOfRange { index: 10, n: 10 })
        ));
        assert!(matches!(
            step(&mut m, &batch, &noise, 0.0, 0.5),
            Err(TrainError::Config(_))
        ));
        assert!(matches!(
            step(&mut m, &batch, &noise, 5.0, -1.0),
            Err(TrainError::Config(_))
        ));
        assert_eq!(m, start);
    }

    #[test]
    fn an_example_the_model_overflows_for_counts_as_zero_and_never_fails_the_step() {
        // A crafted linear model whose output overflows f32 for records with both features
        // above 0.6 only: those examples' gradients are infinite.
        let model = FlatModel::new(
            model_spec(LINEAR, 2, 1).unwrap(),
            vec![f32::MAX / 1.5, f32::MAX / 1.5, 0.0],
        )
        .unwrap();
        let x = [0.9f32, 0.9, 0.1, 0.2, 0.95, 0.7, -0.3, 0.5];
        let y = [0.0f32, 1.0, 0.5, -1.0];
        let (sum, stats) = per_example_clipped_grad_sum(&model, LINEAR, &x, &y, 4, 1.0).unwrap();
        assert!(sum.iter().all(|v| v.is_finite()));
        // The same as a batch of only the two finite examples.
        let (finite, _) = per_example_clipped_grad_sum(
            &model,
            LINEAR,
            &[0.1, 0.2, -0.3, 0.5],
            &[0.5, -1.0],
            2,
            1.0,
        )
        .unwrap();
        assert_eq!(sum, finite);
        assert_eq!(stats.batch_n, 4);
    }

    #[test]
    fn padding_rows_change_nothing_but_the_time() {
        let (arch, d) = (MLP, 3);
        let model = random_model(arch, d, 1, 9);
        let (x, y) = random_batch(5, d, arch, 1, 3);
        let (plain, _) = per_example_clipped_grad_sum(&model, arch, &x, &y, 5, 0.7).unwrap();
        let (mut xp, mut yp) = (x.clone(), y.clone());
        let (junk_x, junk_y) = random_batch(20, d, arch, 1, 4);
        xp.extend(junk_x);
        yp.extend(junk_y);
        let (padded, stats) = clipped_sum(&model, arch, &xp, &yp, 25, 5, 0.7).unwrap();
        assert_close(&padded, &plain, 1e-6, "padded");
        assert_eq!(stats.batch_n, 5);
        assert!(padded_batch(48.0) >= 48 + 6 * 7);
    }

    #[test]
    fn shape_mismatches_are_errors() {
        let model = init_model(LOGISTIC, 3, 1, 0).unwrap();
        let data = toy_dataset(LOGISTIC, 1, 5, 2);
        let cfg = LocalTraining {
            epochs: 1,
            batch_size: 2,
            learning_rate: 0.1,
        };
        assert!(matches!(
            train_local(&model, LOGISTIC, &data, &cfg, 0),
            Err(TrainError::FeatureMismatch {
                expected: 3,
                got: 2
            })
        ));
        assert!(matches!(
            evaluate(&model, LOGISTIC, &data),
            Err(TrainError::FeatureMismatch { .. })
        ));
        // A logistic model is not an MLP, nor an MLP of another width.
        assert!(matches!(
            evaluate(&model, MLP, &data),
            Err(TrainError::Model(_))
        ));
        let mlp = init_model(MLP, 2, 1, 0).unwrap();
        assert!(matches!(
            evaluate(&mlp, Architecture::Mlp { hidden: 4 }, &data),
            Err(TrainError::Model(_))
        ));
        // Values that do not match the spec.
        let mut short = init_model(LOGISTIC, 2, 1, 0).unwrap();
        short.values.pop();
        assert!(matches!(
            evaluate(&short, LOGISTIC, &data),
            Err(TrainError::Model(_))
        ));
        // Batch slices that do not match batch_n.
        let ok = init_model(LOGISTIC, 2, 1, 0).unwrap();
        assert!(matches!(
            per_example_clipped_grad_sum(&ok, LOGISTIC, &[1.0; 5], &[0.0; 3], 3, 1.0),
            Err(TrainError::BatchShape { .. })
        ));
        // Labels that do not fit the head.
        assert!(matches!(
            per_example_clipped_grad_sum(&ok, LOGISTIC, &[1.0; 4], &[0.0, 2.0], 2, 1.0),
            Err(TrainError::InvalidLabel { index: 1, .. })
        ));
        let three = init_model(LOGISTIC, 2, 3, 0).unwrap();
        assert!(matches!(
            per_example_clipped_grad_sum(&three, LOGISTIC, &[1.0; 2], &[3.0], 1, 1.0),
            Err(TrainError::InvalidLabel { index: 0, .. })
        ));
        // Bad specs and settings.
        assert!(init_model(LINEAR, 2, 2, 0).is_err());
        assert!(init_model(LOGISTIC, 0, 1, 0).is_err());
        assert!(init_model(Architecture::Mlp { hidden: 0 }, 2, 1, 0).is_err());
        let bad = LocalTraining {
            batch_size: 0,
            ..cfg
        };
        assert!(matches!(
            train_local(&ok, LOGISTIC, &data, &bad, 0),
            Err(TrainError::Config(_))
        ));
        let bad = LocalTraining {
            learning_rate: f32::NAN,
            ..cfg
        };
        assert!(matches!(
            train_local(&ok, LOGISTIC, &data, &bad, 0),
            Err(TrainError::Config(_))
        ));
    }

    #[test]
    fn init_model_layout_and_determinism() {
        let m = init_model(LOGISTIC, 4, 1, 9).unwrap();
        let names: Vec<&str> = m.spec.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["linear.weight", "linear.bias"]);
        assert_eq!(m.spec.tensors[0].shape, vec![1, 4]);
        assert!(m.values.iter().all(|&v| v == 0.0));
        let a = init_model(Architecture::Mlp { hidden: 8 }, 4, 2, 9).unwrap();
        let names: Vec<&str> = a.spec.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]
        );
        let shapes: Vec<Vec<u64>> = a.spec.tensors.iter().map(|t| t.shape.clone()).collect();
        assert_eq!(shapes, vec![vec![8, 4], vec![8], vec![2, 8], vec![2]]);
        assert_eq!(
            a,
            init_model(Architecture::Mlp { hidden: 8 }, 4, 2, 9).unwrap()
        );
        assert_ne!(
            a,
            init_model(Architecture::Mlp { hidden: 8 }, 4, 2, 10).unwrap()
        );
        let w = a.tensor("hidden.weight").unwrap();
        assert!(w.iter().all(|v| v.abs() <= 0.5) && w.iter().any(|&v| v != 0.0));
        assert!(a.tensor("hidden.bias").unwrap().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn evaluate_matches_hand_computation() {
        let names = || vec!["a".to_string(), "b".to_string()];
        // Logistic: w = [1, -1], b = 0.5; logits 1.5 and -0.5, both labels 1.
        let mut m = init_model(LOGISTIC, 2, 1, 0).unwrap();
        m.values = vec![1.0, -1.0, 0.5];
        let data = Dataset::new(
            vec![1.0, 0.0, 0.0, 1.0],
            vec![1.0, 1.0],
            names(),
            "y".into(),
        )
        .unwrap();
        let got = evaluate(&m, LOGISTIC, &data).unwrap();
        let want = ((1.0 + (-1.5f64).exp()).ln() + (1.0 + 0.5f64.exp()).ln()) / 2.0;
        assert!((got.loss - want).abs() < 1e-6, "{} vs {want}", got.loss);
        assert_eq!(got.accuracy, Some(0.5));
        assert_eq!(got.rmse, None);
        // Softmax over 3 classes: logits [1, 0, 0] (w rows are one-hot on feature a) for
        // x = [1, 0]; label 0 is right, label 2 is wrong.
        let mut m = init_model(LOGISTIC, 2, 3, 0).unwrap();
        m.values = vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let data = Dataset::new(
            vec![1.0, 0.0, 1.0, 0.0],
            vec![0.0, 2.0],
            names(),
            "y".into(),
        )
        .unwrap();
        let got = evaluate(&m, LOGISTIC, &data).unwrap();
        let lse = (1f64.exp() + 2.0).ln();
        assert!((got.loss - ((lse - 1.0) + lse) / 2.0).abs() < 1e-6);
        assert_eq!(got.accuracy, Some(0.5));
        // Linear regression: w = [2, 0], b = 1; predictions 3 and 5 for labels 3 and 4.
        let mut m = init_model(LINEAR, 2, 1, 0).unwrap();
        m.values = vec![2.0, 0.0, 1.0];
        let data = Dataset::new(
            vec![1.0, 7.0, 2.0, -7.0],
            vec![3.0, 4.0],
            names(),
            "y".into(),
        )
        .unwrap();
        let got = evaluate(&m, LINEAR, &data).unwrap();
        assert!((got.loss - 0.5).abs() < 1e-9);
        assert!((got.rmse.unwrap() - 0.5f64.sqrt()).abs() < 1e-9);
        assert_eq!(got.accuracy, None);
    }

    fn breast_cancer() -> (Dataset, Dataset) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data");
        let ranges = load_ranges(dir.join("breast_cancer_ranges.toml")).unwrap();
        let selection = ColumnSelection {
            features: ranges.features.keys().cloned().collect(),
            label: "malignant".into(),
        };
        let mut data = load_csv(
            dir.join("breast_cancer_wisconsin.csv"),
            &selection,
            &LoadOptions::binary(),
        )
        .unwrap();
        let r = ranges.for_features(&data.feature_names).unwrap();
        scale_features(&mut data, &r).unwrap();
        train_test_split(&data, 0.2, 1).unwrap()
    }

    fn majority(data: &Dataset) -> f64 {
        let pos = data.y.iter().filter(|&&v| v > 0.5).count() as f64 / data.n as f64;
        pos.max(1.0 - pos)
    }

    #[test]
    fn non_private_training_learns_breast_cancer() {
        let (train, test) = breast_cancer();
        let base = majority(&test);
        let cfg = LocalTraining {
            epochs: 10,
            batch_size: 16,
            learning_rate: 0.5,
        };
        for arch in [LOGISTIC, Architecture::Mlp { hidden: 16 }] {
            let model = init_model(arch, train.d, 1, 3).unwrap();
            let before = evaluate(&model, arch, &test).unwrap();
            let trained = train_local(&model, arch, &train, &cfg, 4).unwrap();
            let after = evaluate(&trained, arch, &test).unwrap();
            let acc = after.accuracy.unwrap();
            assert!(
                acc > 0.93 && acc > base + 0.2,
                "{arch:?}: {acc} (baseline {base})"
            );
            assert!(after.loss < before.loss);
            // Deterministic given the seed.
            assert_eq!(trained, train_local(&model, arch, &train, &cfg, 4).unwrap());
        }
    }

    #[test]
    fn sgd_step_lowers_the_batch_loss() {
        let (train, _) = breast_cancer();
        let mut model = init_model(LOGISTIC, train.d, 1, 0).unwrap();
        let batch: Vec<usize> = (0..64).collect();
        let first = sgd_step(&mut model, LOGISTIC, &train, &batch, 0.5).unwrap();
        assert!(
            (first - 2f64.ln()).abs() < 1e-5,
            "zero model: loss ln 2, got {first}"
        );
        let second = sgd_step(&mut model, LOGISTIC, &train, &batch, 0.5).unwrap();
        assert!(second < first);
    }

    #[test]
    fn clipped_sgd_without_noise_learns_breast_cancer() {
        // DP-SGD's mechanics with the noise switched off (a zero slice): clipping alone must
        // not stop learning.
        let (train, test) = breast_cancer();
        let mut model = init_model(LOGISTIC, train.d, 1, 0).unwrap();
        let zeros = vec![0f64; model.values.len()];
        let mut theta: Vec<f64> = model.values.iter().map(|&v| f64::from(v)).collect();
        let mut rng = SplitMix64::new(11);
        let expected = 32.0;
        for _ in 0..150 {
            let q = expected / train.n as f64;
            let batch: Vec<usize> = (0..train.n).filter(|_| rng.next_f64() < q).collect();
            dp_sgd_step(
                &mut theta,
                &model.spec,
                LOGISTIC,
                &train,
                &batch,
                1.0,
                &zeros,
                expected,
                1.0,
            )
            .unwrap();
        }
        model.values = saturated_f32(&theta);
        let acc = evaluate(&model, LOGISTIC, &test).unwrap().accuracy.unwrap();
        assert!(acc > 0.93, "{acc}");
    }
}
