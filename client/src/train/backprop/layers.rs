//! Each layer kind's forward step, the gradient of its input, and its per-example parameter
//! gradients.

use fedpriv_common::arch::{Activation, Compiled, Layer, Step};

use super::products::{each_times_each_t, mm_nn, mm_nt, shared_times_each, transpose};
use super::spare::{copy_of, empty, indices, spare, spare_indices, zeros};
use crate::train::net::{self, ConvIndex};
use crate::train::TrainError;

/// What a layer keeps from the forward pass for its backward pass.
pub(super) enum Saved {
    /// Flatten, and dropout that drops nothing: the gradient passes unchanged.
    Nothing,
    /// Dense: the input `[n, in]`.
    Dense { a: Vec<f32> },
    /// Convolutions: the unfolded input `[n, cols, positions]` and where its values came from.
    Conv { u: Vec<f32>, index: ConvIndex },
    /// Max pooling: per output value, the batch index of its window's first maximum.
    MaxPool { from: Vec<usize> },
    /// Average pooling (its gradient needs only the layer's shapes).
    AvgPool,
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
pub(super) fn forward_step(
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
            spare(h);
            (out, Saved::MaxPool { from })
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
            (out, Saved::AvgPool)
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
pub(super) fn backward_step(
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
        (Saved::MaxPool { from }, _) => {
            let mut gi = zeros(n * in_len);
            for (&j, &v) in from.iter().zip(&g) {
                gi[j] = v;
            }
            spare(g);
            gi
        }
        (Saved::AvgPool, Layer::AvgPool { kernel }) => {
            let ((_, ht, wd), (kh, kw)) = pool_geometry(step, *kernel)?;
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
pub(super) enum PerLayer {
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
pub(super) fn per_layer(
    step: &Step,
    saved: Saved,
    g: &[f32],
    n: usize,
) -> Result<PerLayer, TrainError> {
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

impl Saved {
    /// Keeps its arrays for a later step.
    pub(super) fn recycle(self) {
        match self {
            Saved::Dense { a } => spare(a),
            Saved::Conv { u, .. } => spare(u),
            Saved::MaxPool { from, .. } => spare_indices(from),
            Saved::Activation { v, .. } => spare(v),
            Saved::Mask(m) => spare(m),
            Saved::Norm { xhat, .. } => spare(xhat),
            Saved::Nothing | Saved::AvgPool | Saved::Encode { .. } => {}
        }
    }
}
