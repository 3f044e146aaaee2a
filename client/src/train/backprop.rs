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

use std::cell::RefCell;

use candle_core::{Device, Tensor};
use fedpriv_common::arch::{Activation, Compiled, Layer, Step};

use super::net::{self, ConvIndex};
use super::{Head, TrainError, CLIP_MARGIN};

thread_local! {
    /// Arrays of this thread's earlier steps, kept for its next: a step allocates a few
    /// arrays of the batch's size per layer, and glibc hands freed memory of that size back
    /// to the OS, so that every step paid for fresh pages (a quarter of a small CNN's step).
    static SPARE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static SPARE_INDICES: RefCell<Vec<Vec<usize>>> = const { RefCell::new(Vec::new()) };
}

/// Arrays kept per thread, of each kind, and their total size per kind: a step whose
/// working set is larger allocates the rest afresh. rayon's threads live as long as the
/// process, so this is held for good on each of them.
const SPARE_KEPT: usize = 48;
const SPARE_BYTES: usize = 64 << 20;

/// The spare buffer that fits `len` most tightly, emptied.
fn take_spare<T>(spare: &RefCell<Vec<Vec<T>>>, len: usize) -> Option<Vec<T>> {
    let mut spare = spare.borrow_mut();
    let fit = spare
        .iter()
        .enumerate()
        .filter(|(_, v)| v.capacity() >= len)
        .min_by_key(|(_, v)| v.capacity())
        .map(|(i, _)| i)?;
    let mut v = spare.swap_remove(fit);
    v.clear();
    Some(v)
}

fn keep_spare<T>(spare: &RefCell<Vec<Vec<T>>>, v: Vec<T>) {
    let mut spare = spare.borrow_mut();
    let held: usize = spare.iter().map(Vec::capacity).sum::<usize>() + v.capacity();
    if spare.len() < SPARE_KEPT && v.capacity() > 0 && held * size_of::<T>() <= SPARE_BYTES {
        spare.push(v);
    }
}

/// An empty array with room for `len`, a spare one where one fits.
fn empty(len: usize) -> Vec<f32> {
    SPARE
        .with(|s| take_spare(s, len))
        .unwrap_or_else(|| Vec::with_capacity(len))
}

/// `len` zeros, in a spare array where one fits.
fn zeros(len: usize) -> Vec<f32> {
    let mut v = empty(len);
    v.resize(len, 0.0);
    v
}

/// An empty index array with room for `len`.
fn indices(len: usize) -> Vec<usize> {
    SPARE_INDICES
        .with(|s| take_spare(s, len))
        .unwrap_or_else(|| Vec::with_capacity(len))
}

/// Keeps `v` for a later step.
fn spare(v: Vec<f32>) {
    SPARE.with(|s| keep_spare(s, v));
}

/// A copy of `v` in a spare array.
fn copy_of(v: &[f32]) -> Vec<f32> {
    let mut c = empty(v.len());
    c.extend_from_slice(v);
    c
}

impl Saved {
    /// Keeps its arrays for a later step.
    fn recycle(self) {
        match self {
            Saved::Dense { a } => spare(a),
            Saved::Conv { u, .. } => spare(u),
            Saved::MaxPool { from, .. } => SPARE_INDICES.with(|s| keep_spare(s, from)),
            Saved::Activation { v, .. } => spare(v),
            Saved::Mask(m) => spare(m),
            Saved::Norm { xhat, .. } => spare(xhat),
            Saved::Nothing | Saved::AvgPool { .. } | Saved::Encode { .. } => {}
        }
    }
}

/// `a` `[rows, k]` times `w^T`, `w` `[outs, k]`: `[rows, outs]`.
fn mm_nt(
    a: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    outs: usize,
) -> candle_core::Result<Vec<f32>> {
    let dev = Device::Cpu;
    let a = Tensor::from_slice(a, (rows, k), &dev)?;
    let w = Tensor::from_slice(w, (outs, k), &dev)?;
    a.matmul(&w.t()?)?.flatten_all()?.to_vec1()
}

/// `a` `[rows, o]` times `w` `[o, k]`: `[rows, k]`.
fn mm_nn(a: &[f32], rows: usize, o: usize, w: &[f32], k: usize) -> candle_core::Result<Vec<f32>> {
    let dev = Device::Cpu;
    let a = Tensor::from_slice(a, (rows, o), &dev)?;
    let w = Tensor::from_slice(w, (o, k), &dev)?;
    a.matmul(&w)?.flatten_all()?.to_vec1()
}

/// Multiply-adds per example below which the per-example products are plain loops: for
/// small layers a library call per example costs more than the product.
const SMALL_PRODUCT: usize = 1 << 15;

/// Per example `c_i [m, n] = a [m, k] b_i [k, n]`, `a` shared, `b` `[count, k, n]`.
fn shared_times_each(
    a: &[f32],
    b: &[f32],
    count: usize,
    (m, k, n): (usize, usize, usize),
) -> candle_core::Result<Vec<f32>> {
    if m * k * n > SMALL_PRODUCT {
        let dev = Device::Cpu;
        let a = Tensor::from_slice(a, (m, k), &dev)?;
        let b = Tensor::from_slice(b, (count, k, n), &dev)?;
        return a.broadcast_matmul(&b)?.flatten_all()?.to_vec1();
    }
    let mut c = zeros(count * m * n);
    for (bi, ci) in b.chunks(k * n).zip(c.chunks_mut(m * n)) {
        for (arow, crow) in a.chunks(k).zip(ci.chunks_mut(n)) {
            for (&av, brow) in arow.iter().zip(bi.chunks(n)) {
                for (cv, &bv) in crow.iter_mut().zip(brow) {
                    *cv += av * bv;
                }
            }
        }
    }
    Ok(c)
}

/// Per example `c_i [m, k] = a_i [m, n] b_i^T`, `a` `[count, m, n]`, `b` `[count, k, n]`.
fn each_times_each_t(
    a: &[f32],
    b: &[f32],
    count: usize,
    (m, n, k): (usize, usize, usize),
) -> candle_core::Result<Vec<f32>> {
    if m * k * n > SMALL_PRODUCT {
        let dev = Device::Cpu;
        let a = Tensor::from_slice(a, (count, m, n), &dev)?;
        let b = Tensor::from_slice(b, (count, k, n), &dev)?;
        return a.matmul(&b.transpose(1, 2)?)?.flatten_all()?.to_vec1();
    }
    let mut c = empty(count * m * k);
    for (ai, bi) in a.chunks(m * n).zip(b.chunks(k * n)) {
        for arow in ai.chunks(n) {
            c.extend(bi.chunks(n).map(|brow| dot(arow, brow)));
        }
    }
    Ok(c)
}

/// `[n, a, b]` to `[n, b, a]`.
fn transpose(v: &[f32], n: usize, a: usize, b: usize) -> Vec<f32> {
    let mut out = zeros(v.len());
    for (src, dst) in v.chunks(a * b).zip(out.chunks_mut(a * b)).take(n) {
        for r in 0..a {
            for c in 0..b {
                dst[c * a + r] = src[r * b + c];
            }
        }
    }
    out
}

/// A dot product in eight lanes, so that it vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// What a layer keeps from the forward pass for its backward pass.
enum Saved {
    /// Flatten, and dropout that drops nothing: the gradient passes unchanged.
    Nothing,
    /// Dense: the input `[n, in]`.
    Dense { a: Vec<f32> },
    /// Convolutions: the unfolded input `[n, cols, positions]` and where its values came from.
    Conv { u: Vec<f32>, index: ConvIndex },
    /// Max pooling: per output value, the batch index of its window's first maximum.
    MaxPool { from: Vec<usize>, input_len: usize },
    /// Average pooling: the window `(kh, kw)` over `[planes, h, w]`.
    AvgPool {
        dims: (usize, usize, usize),
        window: (usize, usize),
    },
    /// Relu and gelu: the input; tanh and sigmoid: the tanh values they computed.
    Activation { kind: Activation, v: Vec<f32> },
    /// Dropout: the mask (0 or 1 / (1 - rate)).
    Mask(Vec<f32>),
    /// Layer and group norm: the normalised input and each normalised row's 1 / std.
    Norm { xhat: Vec<f32>, inv_std: Vec<f32> },
    /// The encoding layer: each embedded column's slot per example.
    Encode { ids: Vec<Vec<usize>> },
}

/// Values `start..start + len` of a dropout mask (0 or 1 / (1 - rate)) drawn from a
/// SplitMix64 stream: a batch split over threads draws the same mask as the whole batch.
/// Dropout's randomness is part of training, not of the privacy mechanism: it needs no
/// cryptographic strength.
fn dropout_values(start: usize, len: usize, rate: f32, seed: u64) -> Vec<f32> {
    let mut rng = crate::data::SplitMix64::new(seed);
    rng.skip(start as u64);
    let keep = 1.0 / (1.0 - f64::from(rate));
    (0..len)
        .map(|_| {
            if rng.next_f64() < f64::from(rate) {
                0.0
            } else {
                keep as f32
            }
        })
        .collect()
}

/// The seed of step `step`'s dropout mask in a pass seeded with `seed`.
fn dropout_seed(seed: u64, step: usize) -> u64 {
    seed ^ (step as u64) << 32
}

/// The planes, height and width a pooling layer works on, and its window.
type PoolGeometry = ((usize, usize, usize), (usize, usize));

fn pool_geometry(step: &Step, kernel: usize) -> Result<PoolGeometry, TrainError> {
    match step.input[..] {
        [c, l] => Ok(((c, 1, l), (1, kernel))),
        [c, h, w] => Ok(((c, h, w), (kernel, kernel))),
        _ => Err(shape_error(step)),
    }
}

/// A step whose shapes its layer kind does not take (`compile` refuses them: ours).
fn shape_error(step: &Step) -> TrainError {
    TrainError::Model(format!(
        "layer {} got an input of shape {:?}",
        step.layer.kind(),
        step.input
    ))
}

/// Runs step `i` forward on `h` (`[n, input]`), returning its output and what it keeps.
/// `h` holds `n` rows of the batch from row `first` on (dropout masks depend on where a row
/// is in the batch, not on how the batch was split).
#[allow(clippy::too_many_arguments)]
fn forward_step(
    compiled: &Compiled,
    params: &[&[f32]],
    i: usize,
    h: Vec<f32>,
    first: usize,
    n: usize,
    seed: u64,
) -> Result<(Vec<f32>, Saved), TrainError> {
    let step = &compiled.steps[i];
    let p = net::params_of(compiled, params, i);
    let in_len: usize = step.input.iter().product();
    let out_len: usize = step.output.iter().product();
    Ok(match &step.layer {
        Layer::Dense { units } => {
            let mut out = mm_nt(&h, n, in_len, p[0], *units)?;
            for row in out.chunks_mut(*units) {
                for (v, &b) in row.iter_mut().zip(p[1]) {
                    *v += b;
                }
            }
            (out, Saved::Dense { a: h })
        }
        Layer::Conv1d { channels, .. } | Layer::Conv2d { channels, .. } => {
            let index = ConvIndex::new(step).ok_or_else(|| shape_error(step))?;
            let mut u = zeros(n * index.cols * index.positions);
            index.unfold_into(&h, &mut u);
            spare(h);
            let (o, positions) = (*channels, index.positions);
            let mut out = shared_times_each(p[0], &u, n, (o, index.cols, positions))?;
            for (plane, &b) in out.chunks_mut(positions).zip(p[1].iter().cycle()) {
                for v in plane.iter_mut() {
                    *v += b;
                }
            }
            (out, Saved::Conv { u, index })
        }
        Layer::MaxPool { kernel } => {
            let (dims, window) = pool_geometry(step, *kernel)?;
            let mut from = indices(n * out_len);
            net::max_pool_argmax_into(&h, n * dims.0, dims.1, dims.2, window, &mut from);
            let mut out = zeros(n * out_len);
            for (o, &j) in out.iter_mut().zip(&from) {
                *o = h[j];
            }
            let input_len = h.len();
            spare(h);
            (out, Saved::MaxPool { from, input_len })
        }
        Layer::AvgPool { kernel } => {
            let (dims, window) = pool_geometry(step, *kernel)?;
            let (_, ht, wd) = dims;
            let (kh, kw) = window;
            let (oh, ow) = (ht / kh, wd / kw);
            let scale = 1.0 / (kh * kw) as f32;
            let mut out = zeros(n * out_len);
            for (src, dst) in h.chunks(ht * wd).zip(out.chunks_mut(oh * ow)) {
                for y in 0..ht {
                    for x in 0..wd {
                        dst[(y / kh) * ow + x / kw] += src[y * wd + x];
                    }
                }
                for v in dst.iter_mut() {
                    *v *= scale;
                }
            }
            spare(h);
            (out, Saved::AvgPool { dims, window })
        }
        Layer::Flatten => (h, Saved::Nothing),
        Layer::Activation(a) => {
            let kind = *a;
            let mut out = zeros(h.len());
            let mut h = h;
            match kind {
                Activation::Relu => {
                    for (o, &v) in out.iter_mut().zip(&h) {
                        *o = v.max(0.0);
                    }
                }
                Activation::Gelu => {
                    for (o, &v) in out.iter_mut().zip(&h) {
                        *o = gelu(v);
                    }
                }
                Activation::Tanh => {
                    for (o, v) in out.iter_mut().zip(h.iter_mut()) {
                        *v = v.tanh();
                        *o = *v;
                    }
                }
                Activation::Sigmoid => {
                    // As the autograd path: (1 + tanh(x/2)) / 2.
                    for (o, v) in out.iter_mut().zip(h.iter_mut()) {
                        *v = (*v * 0.5).tanh();
                        *o = *v * 0.5 + 0.5;
                    }
                }
            }
            (out, Saved::Activation { kind, v: h })
        }
        Layer::Dropout { rate } if *rate > 0.0 => {
            let mask = dropout_values(first * in_len, h.len(), *rate, dropout_seed(seed, i));
            let mut out = h;
            for (v, m) in out.iter_mut().zip(&mask) {
                *v *= m;
            }
            (out, Saved::Mask(mask))
        }
        Layer::Dropout { .. } => (h, Saved::Nothing),
        Layer::LayerNorm | Layer::GroupNorm { .. } => {
            let (row, slot_of) = norm_rows(step);
            let mut xhat = h;
            let mut inv_std = Vec::with_capacity(xhat.len() / row.max(1));
            for r in xhat.chunks_mut(row) {
                inv_std.push(net::normalise_row(r));
            }
            let mut out = zeros(xhat.len());
            for (j, (v, &x)) in out.iter_mut().zip(&xhat).enumerate() {
                let slot = slot_of(j % in_len);
                *v = x * p[0][slot] + p[1][slot];
            }
            (out, Saved::Norm { xhat, inv_std })
        }
        Layer::Encode(enc) => {
            let width = enc.width();
            let mut out = zeros(n * width);
            let mut ids = vec![Vec::with_capacity(n); enc.categorical.len()];
            for (src, dst) in h.chunks(in_len).zip(out.chunks_mut(width)) {
                dst[..enc.numeric].copy_from_slice(&src[..enc.numeric]);
                let (mut at, mut table) = (enc.numeric, 0);
                for (j, (slots, emb)) in enc.categorical.iter().enumerate() {
                    let id = net::category_id(src[enc.numeric + j], *slots);
                    ids[j].push(id);
                    match emb {
                        Some(w) => {
                            dst[at..at + w].copy_from_slice(&p[table][id * w..(id + 1) * w]);
                            table += 1;
                            at += w;
                        }
                        None => {
                            dst[at + id] = 1.0;
                            at += slots;
                        }
                    }
                }
            }
            (out, Saved::Encode { ids })
        }
    })
}

/// The row length a norm layer normalises and the map from a value's position in an
/// example to its scale and shift slot.
fn norm_rows(step: &Step) -> (usize, Box<dyn Fn(usize) -> usize>) {
    let len: usize = step.input.iter().product();
    match &step.layer {
        Layer::GroupNorm { groups } => {
            let per_channel = len / step.input[0].max(1);
            (len / groups, Box::new(move |j| j / per_channel))
        }
        _ => {
            let m = *step.input.last().unwrap_or(&1);
            (m, Box::new(move |j| j % m))
        }
    }
}

fn gelu(x: f32) -> f32 {
    (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x
}

/// d gelu / dx = Phi(x) + x phi(x).
fn gelu_grad(x: f32) -> f32 {
    let phi = (-0.5 * x * x).exp() * 0.398_942_3;
    0.5 + x * phi + 0.5 * candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2)
}

/// The gradient of step `i`'s input from the gradient `g` of its output.
fn backward_step(
    compiled: &Compiled,
    params: &[&[f32]],
    i: usize,
    saved: &Saved,
    mut g: Vec<f32>,
    n: usize,
) -> Result<Vec<f32>, TrainError> {
    let step = &compiled.steps[i];
    let p = net::params_of(compiled, params, i);
    let in_len: usize = step.input.iter().product();
    Ok(match (saved, &step.layer) {
        (Saved::Dense { .. }, Layer::Dense { units }) => {
            let gi = mm_nn(&g, n, *units, p[0], in_len)?;
            spare(g);
            gi
        }
        (
            Saved::Conv { index, .. },
            Layer::Conv1d { channels, .. } | Layer::Conv2d { channels, .. },
        ) => {
            let wt = transpose(p[0], 1, *channels, index.cols);
            let du = shared_times_each(&wt, &g, n, (index.cols, *channels, index.positions))?;
            let mut gi = zeros(n * index.input_len());
            index.fold_into(&du, &mut gi);
            spare(du);
            spare(g);
            gi
        }
        (Saved::MaxPool { from, input_len }, _) => {
            let mut gi = zeros(*input_len);
            for (&j, &v) in from.iter().zip(&g) {
                gi[j] = v;
            }
            spare(g);
            gi
        }
        (Saved::AvgPool { dims, window }, _) => {
            let (_, ht, wd) = *dims;
            let (kh, kw) = *window;
            let ow = wd / kw;
            let scale = 1.0 / (kh * kw) as f32;
            let mut gi = zeros(n * in_len);
            for (src, dst) in g.chunks((ht / kh) * ow).zip(gi.chunks_mut(ht * wd)) {
                for y in 0..ht {
                    for x in 0..wd {
                        dst[y * wd + x] = src[(y / kh) * ow + x / kw] * scale;
                    }
                }
            }
            spare(g);
            gi
        }
        (Saved::Nothing, _) => g,
        (Saved::Activation { kind, v }, _) => {
            for (gv, &x) in g.iter_mut().zip(v) {
                *gv *= match kind {
                    // candle's relu' is 1 at 0 (`x >= 0`).
                    Activation::Relu => {
                        if x >= 0.0 {
                            1.0
                        } else {
                            0.0
                        }
                    }
                    Activation::Gelu => gelu_grad(x),
                    Activation::Tanh => 1.0 - x * x,
                    Activation::Sigmoid => 0.25 * (1.0 - x * x),
                };
            }
            g
        }
        (Saved::Mask(mask), _) => {
            for (gv, m) in g.iter_mut().zip(mask) {
                *gv *= m;
            }
            g
        }
        (Saved::Norm { xhat, inv_std }, _) => {
            let (row, slot_of) = norm_rows(step);
            for (j, gv) in g.iter_mut().enumerate() {
                *gv *= p[0][slot_of(j % in_len)];
            }
            for ((gr, xr), &inv) in g.chunks_mut(row).zip(xhat.chunks(row)).zip(inv_std) {
                let m = row as f32;
                let mean_g = gr.iter().sum::<f32>() / m;
                let mean_gx = gr.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>() / m;
                for (gv, &x) in gr.iter_mut().zip(xr) {
                    *gv = inv * (*gv - mean_g - x * mean_gx);
                }
            }
            g
        }
        _ => {
            return Err(TrainError::Model(format!(
                "layer {} has no gradient with respect to its input",
                step.layer.kind()
            )))
        }
    })
}

/// One layer's per-example gradients, ready to be scaled and summed.
enum PerLayer {
    /// Dense: the factors `a` `[n, in]` and `g` `[n, out]` (the gradient is their outer
    /// product; the bias gradient is `g`).
    Dense {
        a: Vec<f32>,
        g: Vec<f32>,
        ins: usize,
        outs: usize,
    },
    /// Every other kind: each example's gradient of each of the layer's tensors, flat,
    /// `[n, len]` per tensor.
    Explicit { tensors: Vec<(Vec<f32>, usize)> },
    /// Embedding tables: per table `(slots, width, each example's row, each example's
    /// gradient of its row [n, width])`; an example's gradient of a table is zero but for
    /// its own row.
    Embedding {
        tables: Vec<(usize, usize, Vec<usize>, Vec<f32>)>,
    },
}

/// Step `i`'s per-example parameter gradients from what it kept and its output gradient.
fn per_layer(step: &Step, saved: Saved, g: &[f32], n: usize) -> Result<PerLayer, TrainError> {
    Ok(match (saved, &step.layer) {
        (Saved::Dense { a }, Layer::Dense { units }) => PerLayer::Dense {
            a,
            g: copy_of(g),
            ins: step.input[0],
            outs: *units,
        },
        (
            Saved::Conv { u, index },
            Layer::Conv1d { channels, .. } | Layer::Conv2d { channels, .. },
        ) => {
            let (o, positions) = (*channels, index.positions);
            let w = each_times_each_t(g, &u, n, (o, positions, index.cols))?;
            spare(u);
            let mut b = empty(n * o);
            b.extend(g.chunks(positions).map(|plane| plane.iter().sum::<f32>()));
            PerLayer::Explicit {
                tensors: vec![(w, o * index.cols), (b, o)],
            }
        }
        (Saved::Norm { xhat, .. }, Layer::LayerNorm | Layer::GroupNorm { .. }) => {
            let len: usize = step.input.iter().product();
            let width = step.params[0].numel().unwrap_or(0) as usize;
            let (_, slot_of) = norm_rows(step);
            let mut gamma = vec![0f32; n * width];
            let mut beta = vec![0f32; n * width];
            for i in 0..n {
                let (gi, xi) = (&g[i * len..(i + 1) * len], &xhat[i * len..(i + 1) * len]);
                for j in 0..len {
                    let slot = slot_of(j);
                    gamma[i * width + slot] += gi[j] * xi[j];
                    beta[i * width + slot] += gi[j];
                }
            }
            spare(xhat);
            PerLayer::Explicit {
                tensors: vec![(gamma, width), (beta, width)],
            }
        }
        (Saved::Encode { ids }, Layer::Encode(enc)) => {
            let width = enc.width();
            let mut tables = Vec::new();
            let mut at = enc.numeric;
            for (j, (slots, emb)) in enc.categorical.iter().enumerate() {
                let w = emb.unwrap_or(*slots);
                if emb.is_some() {
                    let mut seg = vec![0f32; n * w];
                    for i in 0..n {
                        seg[i * w..(i + 1) * w]
                            .copy_from_slice(&g[i * width + at..i * width + at + w]);
                    }
                    tables.push((*slots, w, ids[j].clone(), seg));
                }
                at += w;
            }
            PerLayer::Embedding { tables }
        }
        (_, other) => {
            return Err(TrainError::Model(format!(
                "layer {} has no parameters",
                other.kind()
            )))
        }
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

/// Sum of squares in f64.
fn sq(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

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
            let sum = scaled_sum(layers, &mut scales, &others, Some(clip), total_values)?;
            (sum, norms, clipped)
        }
        Summing::Plain => {
            let sum = scaled_sum(layers, &mut vec![1.0; n], &vec![0.0; n], None, total_values)?;
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

/// Each example's scale (at most `clip` / its norm; zero for padding from `active` on and for
/// a norm that is not finite), the active examples' norms, how many were scaled down, and
/// each example's squared norm outside dense layers.
fn clip_scales(
    layers: &[PerLayer],
    n: usize,
    clip: f64,
    active: usize,
) -> (Vec<f64>, Vec<f64>, usize, Vec<f64>) {
    // Squared norms per example, dense layers apart from the rest, in f64.
    let mut dense = vec![0f64; n];
    let mut others = vec![0f64; n];
    for layer in layers {
        match layer {
            PerLayer::Dense { a, g, ins, outs } => {
                for (i, norm) in dense.iter_mut().enumerate() {
                    *norm +=
                        sq(&g[i * outs..(i + 1) * outs]) * (sq(&a[i * ins..(i + 1) * ins]) + 1.0);
                }
            }
            PerLayer::Explicit { tensors } => {
                for (t, len) in tensors {
                    for (i, norm) in others.iter_mut().enumerate() {
                        *norm += sq(&t[i * len..(i + 1) * len]);
                    }
                }
            }
            PerLayer::Embedding { tables } => {
                for (_, w, _, seg) in tables {
                    for (i, norm) in others.iter_mut().enumerate() {
                        *norm += sq(&seg[i * w..(i + 1) * w]);
                    }
                }
            }
        }
    }
    let mut norms: Vec<f64> = dense.iter().zip(&others).map(|(d, o)| d + o).collect();
    let mut scales = vec![0f64; n];
    let mut clipped = 0usize;
    for (i, norm) in norms.iter_mut().enumerate() {
        *norm = norm.sqrt();
        if i >= active || !norm.is_finite() {
            *norm = if i >= active { 0.0 } else { f64::INFINITY };
            continue;
        }
        let padded = *norm * (1.0 + CLIP_MARGIN);
        scales[i] = if padded > clip {
            clipped += 1;
            clip / padded
        } else {
            1.0
        };
    }
    norms.truncate(active);
    (scales, norms, clipped, others)
}

/// The per-example gradients of every layer, each example's scaled by its factor, summed.
///
/// With a clip norm, each example's contribution is checked as it will be summed: dense
/// layers' scaled factors are rounded to f32 (the rest is scaled in f64), and a product
/// that lands among f32's subnormals can round up far beyond the margin (a gradient norm
/// beyond about 1e37 times the clip norm, which a crafted model can cause). An example whose
/// rounded contribution exceeds the clip norm counts as zero.
fn scaled_sum(
    layers: Vec<PerLayer>,
    scales: &mut [f64],
    others: &[f64],
    clip: Option<f64>,
    total_values: usize,
) -> Result<Vec<f32>, TrainError> {
    let n = scales.len();
    // Dense layers' scaled factors, zero rows for examples that count as zero (so that an
    // infinite factor times a zero scale cannot make a NaN).
    let mut factors: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
    for layer in &layers {
        if let PerLayer::Dense { a, g, ins, outs } = layer {
            let (ins, outs) = (*ins, *outs);
            let mut gs = zeros(n * outs);
            let mut aa = zeros(n * ins);
            for (i, &s) in scales.iter().enumerate() {
                if s > 0.0 {
                    for (o, &v) in gs[i * outs..(i + 1) * outs]
                        .iter_mut()
                        .zip(&g[i * outs..(i + 1) * outs])
                    {
                        *o = (f64::from(v) * s) as f32;
                    }
                    aa[i * ins..(i + 1) * ins].copy_from_slice(&a[i * ins..(i + 1) * ins]);
                }
            }
            factors.push((gs, aa));
        }
    }
    if let Some(clip) = clip {
        for (i, s) in scales.iter_mut().enumerate() {
            if *s == 0.0 {
                continue;
            }
            let mut total = *s * *s * others[i];
            for (gs, aa) in &factors {
                let (outs, ins) = (gs.len() / n, aa.len() / n);
                total +=
                    sq(&gs[i * outs..(i + 1) * outs]) * (sq(&aa[i * ins..(i + 1) * ins]) + 1.0);
            }
            // A NaN total counts as too large; the slack covers the rounding of the f32
            // products when the factors are multiplied out below.
            if total.is_nan() || total.sqrt() > clip * (1.0 - 4.0 * f64::from(f32::EPSILON)) {
                *s = 0.0;
                for (gs, aa) in &mut factors {
                    let (outs, ins) = (gs.len() / n, aa.len() / n);
                    gs[i * outs..(i + 1) * outs].fill(0.0);
                    aa[i * ins..(i + 1) * ins].fill(0.0);
                }
            }
        }
    }
    let dev = Device::Cpu;
    let mut sum = Vec::with_capacity(total_values);
    let mut factors = factors.into_iter();
    for layer in layers {
        match layer {
            PerLayer::Dense { a, g, ins, outs } => {
                let (gs, aa) = factors
                    .next()
                    .ok_or_else(|| TrainError::Model("a dense layer lost its factors".into()))?;
                let gt = Tensor::from_slice(&gs, (n, outs), &dev)?;
                let at = Tensor::from_slice(&aa, (n, ins), &dev)?;
                sum.extend(gt.t()?.matmul(&at)?.flatten_all()?.to_vec1::<f32>()?);
                sum.extend(gt.sum(0)?.to_vec1::<f32>()?);
                [gs, aa, a, g].into_iter().for_each(spare);
            }
            PerLayer::Explicit { tensors } => {
                for (t, len) in tensors {
                    let mut acc = vec![0f64; len];
                    for (i, &s) in scales.iter().enumerate() {
                        if s > 0.0 {
                            for (a, &v) in acc.iter_mut().zip(&t[i * len..(i + 1) * len]) {
                                *a += f64::from(v) * s;
                            }
                        }
                    }
                    sum.extend(acc.into_iter().map(|v| v as f32));
                    spare(t);
                }
            }
            PerLayer::Embedding { tables } => {
                for (slots, w, ids, seg) in tables {
                    let mut acc = vec![0f64; slots * w];
                    for (i, &s) in scales.iter().enumerate() {
                        if s > 0.0 {
                            let row = &mut acc[ids[i] * w..(ids[i] + 1) * w];
                            for (a, &v) in row.iter_mut().zip(&seg[i * w..(i + 1) * w]) {
                                *a += f64::from(v) * s;
                            }
                        }
                    }
                    sum.extend(acc.into_iter().map(|v| v as f32));
                    spare(seg);
                }
            }
        }
    }
    Ok(sum)
}
