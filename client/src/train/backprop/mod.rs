//! Gradient sums for training, per-example clipped (DP-SGD) or plain (non-private local
//! training): one forward and one backward pass over the whole batch, written out for each
//! layer kind on plain arrays, with candle only multiplying the larger matrices.
//!
//! Why not candle's autograd: at the sizes sites train (an 8x8 image, a few dozen table
//! columns) a step's cost is per tensor operation (allocations, page faults, the generic
//! backward of max pooling alone was 45% of a CNN step), not per flop; and the per-example
//! gradients need each parameterised layer's input and output gradient, which autograd only
//! gives through extra "probe" additions. Here each layer keeps what its backward needs and
//! hands the gradient of its input to the layer before it; the backward stops at the first
//! layer with parameters (the data needs no gradient).
//!
//! Examples do not interact in any layer offered (batch normalisation is refused when a
//! study is created), so row i of a layer's output gradient is example i's own. From it and
//! the layer's input each layer's per-example parameter gradients follow in closed form:
//! - dense `z = a W^T + b`: `g_i a_i^T` and `g_i` (only their norms are formed; the clipped
//!   sum is one matmul);
//! - convolutions: `G_i U_i`, with `U_i` the example's unfolded input (im2col) and `G_i` its
//!   output gradient per position, and the bias as the sum over positions;
//! - layer and group norm: the scale's gradient is the sum over positions of `g_i * xhat_i`
//!   (the normalised input), the shift's the sum of `g_i`;
//! - embedding tables: `g_i`'s slice, at the example's row.
//!
//! The derivatives follow candle's where a function has a kink (relu's is 1 at 0), and max
//! pooling sends each window's gradient to its first maximum, as PyTorch and the autograd
//! path (`net::MaxPool`) do; `tests.rs` checks every layer kind against a one-example
//! autograd backward pass, and the autograd path against finite differences.
//!
//! Squared norms are summed over layers in f64. Each example's gradient is scaled to at most
//! the clip norm, and its contribution is checked again as it will be summed (f32 rounding
//! included); one whose norm is not finite, or whose rounded contribution exceeds the clip
//! norm, contributes nothing (a row's NaN or infinity stays in its row: every operation
//! here is row by row or a matmul with the parameters).

mod clip;
mod layers;
mod products;
mod spare;

use fedpriv_common::arch::Compiled;

use self::clip::{clip_scales, scaled_sum, Check};
use self::layers::{backward_step, forward_step, per_layer, PerLayer, Saved};
use self::spare::{copy_of, spare};
use super::{Head, TrainError};

/// How [`gradient_sum`] sums a batch's per-example gradients.
#[derive(Debug, Clone, Copy)]
pub(super) enum Summing {
    /// DP-SGD: each example's gradient scaled to at most `clip`; rows from `active` on are
    /// padding and count as zero.
    Clipped { clip: f64, active: usize },
    /// Non-private training: the plain sum, and the sum of the examples' losses.
    Plain,
}

/// What [`gradient_sum`] returns.
pub(super) struct Summed {
    /// The sum, flat in spec order.
    pub sum: Vec<f32>,
    /// Clipped: the active examples' unclipped norms (infinite for one that counts as zero).
    pub norms: Vec<f64>,
    /// Clipped: how many examples were scaled down.
    pub clipped: usize,
    /// Plain: the sum of the examples' training losses (half the squared error for
    /// regression).
    pub loss: f64,
}

/// What every part of a batch's pass shares: the model (`params`, its tensors in spec
/// order, `total_values` values in all), the head, how to sum, and the dropout seed.
#[derive(Clone, Copy)]
pub(super) struct Pass<'a> {
    pub compiled: &'a Compiled,
    pub params: &'a [&'a [f32]],
    pub head: Head,
    pub summing: Summing,
    pub seed: u64,
    pub total_values: usize,
}

/// The sum of a batch's per-example gradients, summed as `pass.summing` says. `x` is `[n,
/// input]`, `y` the labels (checked against the head by the caller).
///
/// A batch of at least [`ROWS_PER_THREAD`] rows per thread is split over rayon's threads
/// (examples do not interact) and the parts' sums added in order; the result then depends
/// on the number of threads in the last bits, never on the data's order of arrival.
pub(super) fn gradient_sum(pass: Pass<'_>, x: &[f32], y: &[f32]) -> Result<Summed, TrainError> {
    let n = y.len();
    let threads = rayon::current_num_threads().min(n / ROWS_PER_THREAD).max(1);
    let d = x.len() / n.max(1);
    let per = n.div_ceil(threads).max(1);
    let part = |row0: usize| {
        let rows = per.min(n - row0);
        let summing = match pass.summing {
            Summing::Clipped { clip, active } => Summing::Clipped {
                clip,
                active: active.saturating_sub(row0).min(rows),
            },
            Summing::Plain => Summing::Plain,
        };
        let (xs, ys) = (&x[row0 * d..(row0 + rows) * d], &y[row0..row0 + rows]);
        rows_sum(Pass { summing, ..pass }, xs, ys, row0)
    };
    if threads == 1 {
        return part(0);
    }
    use rayon::prelude::*;
    let parts: Vec<Result<Summed, TrainError>> = (0..n)
        .step_by(per)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(part)
        .collect();
    let mut whole = Summed {
        sum: vec![0f32; pass.total_values],
        norms: Vec::with_capacity(n),
        clipped: 0,
        loss: 0.0,
    };
    for p in parts {
        let p = p?;
        for (a, b) in whole.sum.iter_mut().zip(&p.sum) {
            *a += b;
        }
        whole.norms.extend(p.norms);
        whole.clipped += p.clipped;
        whole.loss += p.loss;
    }
    Ok(whole)
}

/// Rows per thread below which a batch is not split: smaller parts cost more in hand-over
/// than they save.
const ROWS_PER_THREAD: usize = 64;

/// [`gradient_sum`] of the rows `row0..row0 + y.len()` of a batch.
fn rows_sum(pass: Pass<'_>, x: &[f32], y: &[f32], row0: usize) -> Result<Summed, TrainError> {
    let Pass {
        compiled,
        params,
        head,
        summing,
        seed,
        total_values,
    } = pass;
    let n = y.len();
    let Some(first) = compiled.steps.iter().position(|s| !s.params.is_empty()) else {
        return Err(TrainError::Model("the model has no parameters".into()));
    };
    // Forward, keeping what each layer's backward needs.
    let mut h = copy_of(x);
    let mut saved = Vec::with_capacity(compiled.steps.len());
    for i in 0..compiled.steps.len() {
        let (out, s) = forward_step(compiled, params, i, h, row0, n, seed)?;
        saved.push(s);
        h = out;
    }
    let mut loss = 0f64;
    if let Summing::Plain = summing {
        for (z, &label) in h.chunks(compiled.outputs).zip(y) {
            let (l, _) = super::example_loss(z, label, head);
            loss += if head == Head::Identity { 0.5 * l } else { l };
        }
    }
    // Backward to the first layer with parameters.
    let mut g = output_gradient(&h, y, head, compiled.outputs);
    spare(h);
    let mut layers: Vec<PerLayer> = Vec::new();
    for i in (first..compiled.steps.len()).rev() {
        let s = saved
            .pop()
            .ok_or_else(|| TrainError::Model("a layer lost its state".into()))?;
        let step = &compiled.steps[i];
        if step.params.is_empty() {
            // Not the first parameterised layer, so some layer before it needs the gradient.
            g = backward_step(compiled, params, i, &s, g, n)?;
            s.recycle();
            continue;
        }
        let next = if i > first {
            Some(backward_step(compiled, params, i, &s, copy_of(&g), n)?)
        } else {
            None
        };
        layers.push(per_layer(step, s, &g, n)?);
        match next {
            Some(gi) => spare(std::mem::replace(&mut g, gi)),
            None => break,
        }
    }
    spare(g);
    saved.into_iter().for_each(Saved::recycle);
    layers.reverse();
    let (sum, norms, clipped) = match summing {
        Summing::Clipped { clip, active } => {
            let (mut scales, norms, clipped, others) = clip_scales(&layers, n, clip, active);
            let check = Check {
                clip,
                others: &others,
            };
            let sum = scaled_sum(layers, &mut scales, Some(check), total_values)?;
            (sum, norms, clipped)
        }
        Summing::Plain => {
            let sum = scaled_sum(layers, &mut vec![1.0; n], None, total_values)?;
            (sum, Vec::new(), 0)
        }
    };
    Ok(Summed {
        sum,
        norms,
        clipped,
        loss,
    })
}

/// The gradient of each example's loss with respect to the model's outputs `z` `[n, k]`:
/// softmax minus the one-hot label, sigmoid minus the label, or the residual.
fn output_gradient(z: &[f32], y: &[f32], head: Head, k: usize) -> Vec<f32> {
    let mut g = copy_of(z);
    for (row, &label) in g.chunks_mut(k).zip(y) {
        match head {
            Head::Softmax(_) => {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0f32;
                for v in row.iter_mut() {
                    *v = (*v - max).exp();
                    total += *v;
                }
                for v in row.iter_mut() {
                    *v /= total;
                }
                row[label as usize] -= 1.0;
            }
            Head::Sigmoid => {
                let v = row[0];
                // 1 / (1 + e^-v) without overflow for large |v|.
                let s = if v >= 0.0 {
                    1.0 / (1.0 + (-v).exp())
                } else {
                    let e = v.exp();
                    e / (1.0 + e)
                };
                row[0] = s - label;
            }
            Head::Identity => row[0] -= label,
        }
    }
    g
}
