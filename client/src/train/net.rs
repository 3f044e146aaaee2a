//! The model's forward pass with candle, for every layer kind of `common::arch`, and the
//! per-example gradients of each parameterised layer without a backward pass per example.
//!
//! Per-example gradients: the batch is run forward once with a *probe* (a zero variable)
//! added to the output of every parameterised layer, and the sum of the examples' losses is
//! differentiated once. Examples do not interact in any layer offered (batch normalisation is
//! refused when a study is created), so the gradient at a probe's row i is the gradient of
//! example i's own loss with respect to that layer's output. From it and the layer's input
//! (kept from the forward pass), each layer's per-example parameter gradients follow in
//! closed form:
//! - dense `z = a W^T + b`: `g_i a_i^T` and `g_i` (only their norms are formed; the clipped
//!   sum is one matmul);
//! - convolutions: `G_i U_i`, with `U_i` the example's unfolded input (im2col) and `G_i` its
//!   output gradient per position, and the bias as the sum over positions (formed for the
//!   whole batch with one batched matmul);
//! - layer and group norm: the scale's gradient is the sum over positions of `g_i * xhat_i`
//!   (the normalised input), the shift's the sum of `g_i`.
//!
//! Squared norms are summed over layers in f64. Each example's gradient is scaled to at most
//! the clip norm; one whose norm is not finite contributes nothing.

use candle_core::{DType, Device, Tensor, Var};
use fedpriv_common::arch::{Activation, Compiled, Layer, Step};

use super::{Head, TrainError, CLIP_MARGIN};

/// Values a layer needs from the forward pass for its per-example gradients.
pub(super) struct Tap {
    /// Index of the layer.
    pub step: usize,
    /// The layer's input, `[n, ...input shape]`.
    pub input: Tensor,
    /// The normalised input (layer and group norm).
    pub xhat: Option<Tensor>,
    /// The zero variable added to the layer's output.
    pub probe: Var,
}

/// How a forward pass runs.
pub(super) enum Mode {
    /// As the model is used: dropout is the identity.
    Eval,
    /// Training: dropout masks drawn from this seed.
    Train { seed: u64 },
    /// Training with probes on every parameterised layer, for per-example gradients.
    Probe { seed: u64 },
}

impl Mode {
    fn seed(&self) -> Option<u64> {
        match self {
            Self::Eval => None,
            Self::Train { seed } | Self::Probe { seed } => Some(*seed),
        }
    }
}

/// The parameters of step `i` out of the model's tensors (in spec order).
fn params_of<'a>(compiled: &Compiled, params: &'a [Tensor], step: usize) -> &'a [Tensor] {
    let start: usize = compiled.steps[..step].iter().map(|s| s.params.len()).sum();
    &params[start..start + compiled.steps[step].params.len()]
}

const NORM_EPS: f64 = 1e-5;

/// Normalises `x` (`[rows, m]`) over its last axis.
fn normalise(x: &Tensor) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(1)?;
    xc.broadcast_div(&var.affine(1.0, NORM_EPS)?.sqrt()?)
}

/// A dropout mask (0 or 1 / (1 - rate)) from a SplitMix64 stream. Dropout's randomness is
/// part of training, not of the privacy mechanism: it needs no cryptographic strength.
fn dropout_mask(
    shape: &[usize],
    rate: f32,
    seed: u64,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let mut rng = crate::data::SplitMix64::new(seed);
    let n: usize = shape.iter().product();
    let keep = 1.0 / (1.0 - f64::from(rate));
    let values: Vec<f32> = (0..n)
        .map(|_| {
            if rng.next_f64() < f64::from(rate) {
                0.0
            } else {
                keep as f32
            }
        })
        .collect();
    Tensor::from_vec(values, shape, dev)
}

/// Runs `x` (`[n, input]`, flat) through the model; returns the outputs `[n, outputs]` and,
/// in [`Mode::Probe`], the taps of every parameterised layer.
pub(super) fn forward(
    compiled: &Compiled,
    params: &[Tensor],
    x: &Tensor,
    mode: &Mode,
) -> candle_core::Result<(Tensor, Vec<Tap>)> {
    let n = x.dim(0)?;
    let dev = x.device().clone();
    let with_batch = |shape: &[usize]| -> Vec<usize> {
        let mut s = vec![n];
        s.extend_from_slice(shape);
        s
    };
    let mut h = x.reshape(with_batch(&compiled.input))?;
    let mut taps = Vec::new();
    let probing = matches!(mode, Mode::Probe { .. });
    for (i, step) in compiled.steps.iter().enumerate() {
        let p = params_of(compiled, params, i);
        let input = h.clone();
        let mut xhat = None;
        let mut out = match &step.layer {
            Layer::Dense { .. } => h.matmul(&p[0].t()?)?.broadcast_add(&p[1])?,
            Layer::Conv1d {
                channels,
                stride,
                padding,
                ..
            } => {
                let c = if step.input.len() == 1 {
                    1
                } else {
                    step.input[0]
                };
                let l = *step.input.last().unwrap_or(&1);
                let x3 = h.reshape((n, c, l))?;
                x3.conv1d(&p[0], *padding, *stride, 1, 1)?
                    .broadcast_add(&p[1].reshape((1, *channels, 1))?)?
            }
            Layer::Conv2d {
                channels,
                stride,
                padding,
                ..
            } => h
                .conv2d(&p[0], *padding, *stride, 1, 1)?
                .broadcast_add(&p[1].reshape((1, *channels, 1, 1))?)?,
            Layer::MaxPool { kernel } | Layer::AvgPool { kernel } => {
                let max = matches!(step.layer, Layer::MaxPool { .. });
                let pool = |t: &Tensor, k: (usize, usize)| {
                    if max {
                        t.max_pool2d_with_stride(k, k)
                    } else {
                        t.avg_pool2d_with_stride(k, k)
                    }
                };
                match step.input[..] {
                    [c, l] => pool(&h.reshape((n, c, 1, l))?, (1, *kernel))?
                        .reshape(with_batch(&step.output))?,
                    _ => pool(&h, (*kernel, *kernel))?,
                }
            }
            Layer::Flatten => h.reshape(with_batch(&step.output))?,
            Layer::Encode(enc) => {
                let mut parts = Vec::with_capacity(enc.categorical.len() + 1);
                if enc.numeric > 0 {
                    parts.push(h.narrow(1, 0, enc.numeric)?);
                }
                let mut tables = p.iter();
                for (j, (slots, emb)) in enc.categorical.iter().enumerate() {
                    let ids = category_ids(&h.narrow(1, enc.numeric + j, 1)?, *slots)?;
                    match emb {
                        Some(_) => {
                            let table = tables.next().ok_or_else(|| {
                                candle_core::Error::Msg("an embedding table is missing".into())
                            })?;
                            let ids = Tensor::from_vec(
                                ids.iter().map(|&i| i as u32).collect::<Vec<u32>>(),
                                n,
                                &dev,
                            )?;
                            parts.push(table.index_select(&ids, 0)?);
                        }
                        None => {
                            let mut onehot = vec![0f32; n * slots];
                            for (i, &id) in ids.iter().enumerate() {
                                onehot[i * slots + id] = 1.0;
                            }
                            parts.push(Tensor::from_vec(onehot, (n, *slots), &dev)?);
                        }
                    }
                }
                Tensor::cat(&parts, 1)?
            }
            Layer::Activation(a) => match a {
                Activation::Relu => h.relu()?,
                Activation::Gelu => h.gelu_erf()?,
                Activation::Tanh => h.tanh()?,
                // 1/(1 + e^-x) = (1 + tanh(x/2)) / 2, without e^-x overflowing.
                Activation::Sigmoid => h.affine(0.5, 0.0)?.tanh()?.affine(0.5, 0.5)?,
            },
            Layer::Dropout { rate } => match mode.seed() {
                Some(seed) if *rate > 0.0 => {
                    let mask = dropout_mask(h.dims(), *rate, seed ^ (i as u64) << 32, &dev)?;
                    h.mul(&mask)?
                }
                _ => h,
            },
            Layer::LayerNorm => {
                let m = *step.input.last().unwrap_or(&1);
                let rows = step.input.iter().product::<usize>() / m * n;
                let xh = normalise(&h.reshape((rows, m))?)?.reshape(h.dims())?;
                let y = xh.broadcast_mul(&p[0])?.broadcast_add(&p[1])?;
                xhat = Some(xh);
                y
            }
            Layer::GroupNorm { groups } => {
                let c = step.input[0];
                let per = step.input.iter().product::<usize>() / groups;
                let xh = normalise(&h.reshape((n * groups, per))?)?.reshape(h.dims())?;
                let mut bshape = vec![1, c];
                bshape.extend(std::iter::repeat_n(1, step.input.len() - 1));
                let y = xh
                    .broadcast_mul(&p[0].reshape(bshape.as_slice())?)?
                    .broadcast_add(&p[1].reshape(bshape.as_slice())?)?;
                xhat = Some(xh);
                y
            }
        };
        if probing && !step.params.is_empty() {
            let probe = Var::zeros(out.dims(), DType::F32, &dev)?;
            out = out.add(probe.as_tensor())?;
            taps.push(Tap {
                step: i,
                input,
                xhat,
                probe,
            });
        }
        h = out;
    }
    let out = h.reshape((n, compiled.outputs))?;
    Ok((out, taps))
}

/// A categorical column's values as slot indices: a value that is not a whole number below
/// `slots` (the loader writes the "other" slot for anything it does not know) goes to the
/// last slot.
pub(super) fn category_ids(column: &Tensor, slots: usize) -> candle_core::Result<Vec<usize>> {
    Ok(column
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| {
            if v >= 0.0 && v.fract() == 0.0 && (v as usize) < slots {
                v as usize
            } else {
                slots - 1
            }
        })
        .collect())
}

/// Unfolds one example's input for a convolution: `[positions, C * k...]`, zero where the
/// window reaches into the padding (the layout of the kernel's flattened `[C, k, (k)]`).
fn unfold(step: &Step, a: &[f32]) -> (Vec<f32>, usize, usize) {
    match &step.layer {
        Layer::Conv1d {
            kernel,
            stride,
            padding,
            ..
        } => {
            let (c, l) = match step.input[..] {
                [l] => (1, l),
                [c, l] => (c, l),
                _ => (0, 0),
            };
            let out_l = step.output[1];
            let cols = c * kernel;
            let mut u = vec![0f32; out_l * cols];
            for pos in 0..out_l {
                for ch in 0..c {
                    for k in 0..*kernel {
                        let at = (pos * stride + k) as isize - *padding as isize;
                        if at >= 0 && (at as usize) < l {
                            u[pos * cols + ch * kernel + k] = a[ch * l + at as usize];
                        }
                    }
                }
            }
            (u, out_l, cols)
        }
        Layer::Conv2d {
            kernel,
            stride,
            padding,
            ..
        } => {
            let [c, h, w] = step.input[..] else {
                return (Vec::new(), 0, 0);
            };
            let (oh, ow) = (step.output[1], step.output[2]);
            let k = *kernel;
            let cols = c * k * k;
            let mut u = vec![0f32; oh * ow * cols];
            for y in 0..oh {
                for x in 0..ow {
                    let row = (y * ow + x) * cols;
                    for ch in 0..c {
                        for ky in 0..k {
                            let iy = (y * stride + ky) as isize - *padding as isize;
                            if iy < 0 || iy as usize >= h {
                                continue;
                            }
                            for kx in 0..k {
                                let ix = (x * stride + kx) as isize - *padding as isize;
                                if ix >= 0 && (ix as usize) < w {
                                    u[row + (ch * k + ky) * k + kx] =
                                        a[(ch * h + iy as usize) * w + ix as usize];
                                }
                            }
                        }
                    }
                }
            }
            (u, oh * ow, cols)
        }
        _ => (Vec::new(), 0, 0),
    }
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

/// Sum of squares in f64.
fn sq(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// The per-example gradient sum, each example clipped to `clip`; rows from `active` on are
/// padding and count as zero. Returns the sum (spec order), the examples' unclipped norms
/// (infinite for one that counts as zero) and the number clipped.
#[allow(clippy::too_many_arguments)]
pub(super) fn clipped_sum(
    compiled: &Compiled,
    params: &[Tensor],
    x: &Tensor,
    targets: &super::Targets,
    head: Head,
    active: usize,
    clip: f64,
    seed: u64,
    total_values: usize,
) -> Result<(Vec<f32>, Vec<f64>, usize), TrainError> {
    let n = x.dim(0)?;
    let (z, taps) = forward(compiled, params, x, &Mode::Probe { seed })?;
    let loss = super::per_example_loss(&z, targets, head)?.sum_all()?;
    let grads = loss.backward()?;
    let mut layers: Vec<PerLayer> = Vec::with_capacity(taps.len());
    for tap in &taps {
        let step = &compiled.steps[tap.step];
        let g = grads
            .get(tap.probe.as_tensor())
            .cloned()
            .unwrap_or(tap.probe.as_tensor().zeros_like()?);
        let g_host = g.flatten_all()?.to_vec1::<f32>()?;
        let layer = match &step.layer {
            Layer::Dense { units } => PerLayer::Dense {
                a: tap.input.flatten_all()?.to_vec1::<f32>()?,
                g: g_host,
                ins: step.input[0],
                outs: *units,
            },
            Layer::Conv1d { channels, .. } | Layer::Conv2d { channels, .. } => {
                let a = tap.input.flatten_all()?.to_vec1::<f32>()?;
                let in_len: usize = step.input.iter().product();
                let mut us = Vec::new();
                let (mut positions, mut cols) = (0, 0);
                for i in 0..n {
                    let (u, p, c) = unfold(step, &a[i * in_len..(i + 1) * in_len]);
                    us.extend(u);
                    positions = p;
                    cols = c;
                }
                let o = *channels;
                let u = Tensor::from_vec(us, (n, positions, cols), x.device())?;
                let gm = g.reshape((n, o, positions))?;
                let w = gm.matmul(&u)?.flatten_all()?.to_vec1::<f32>()?;
                let b = gm.sum(2)?.flatten_all()?.to_vec1::<f32>()?;
                PerLayer::Explicit {
                    tensors: vec![(w, o * cols), (b, o)],
                }
            }
            Layer::LayerNorm | Layer::GroupNorm { .. } => {
                let xhat = tap.xhat.as_ref().ok_or_else(|| {
                    TrainError::Model("a norm layer lost its normalised input".into())
                })?;
                let xh = xhat.flatten_all()?.to_vec1::<f32>()?;
                let len: usize = step.input.iter().product();
                let width = step.params[0].numel().unwrap_or(0) as usize;
                let mut gamma = vec![0f32; n * width];
                let mut beta = vec![0f32; n * width];
                for i in 0..n {
                    let (gi, xi) = (&g_host[i * len..(i + 1) * len], &xh[i * len..(i + 1) * len]);
                    for j in 0..len {
                        // Layer norm: the last axis; group norm: the channel (first axis).
                        let slot = if matches!(step.layer, Layer::LayerNorm) {
                            j % width
                        } else {
                            j / (len / width)
                        };
                        gamma[i * width + slot] += gi[j] * xi[j];
                        beta[i * width + slot] += gi[j];
                    }
                }
                PerLayer::Explicit {
                    tensors: vec![(gamma, width), (beta, width)],
                }
            }
            Layer::Encode(enc) => {
                let width = enc.width();
                let mut tables = Vec::new();
                let mut at = enc.numeric;
                for (j, (slots, emb)) in enc.categorical.iter().enumerate() {
                    let w = emb.unwrap_or(*slots);
                    if emb.is_some() {
                        let ids = category_ids(&tap.input.narrow(1, enc.numeric + j, 1)?, *slots)?;
                        let mut seg = vec![0f32; n * w];
                        for i in 0..n {
                            seg[i * w..(i + 1) * w]
                                .copy_from_slice(&g_host[i * width + at..i * width + at + w]);
                        }
                        tables.push((*slots, w, ids, seg));
                    }
                    at += w;
                }
                PerLayer::Embedding { tables }
            }
            other => {
                return Err(TrainError::Model(format!(
                    "layer {} has no parameters",
                    other.kind()
                )))
            }
        };
        layers.push(layer);
    }
    // Squared norms per example, summed over layers, in f64.
    let mut norms = vec![0f64; n];
    for layer in &layers {
        match layer {
            PerLayer::Dense { a, g, ins, outs } => {
                for (i, norm) in norms.iter_mut().enumerate() {
                    *norm +=
                        sq(&g[i * outs..(i + 1) * outs]) * (sq(&a[i * ins..(i + 1) * ins]) + 1.0);
                }
            }
            PerLayer::Explicit { tensors } => {
                for (t, len) in tensors {
                    for (i, norm) in norms.iter_mut().enumerate() {
                        *norm += sq(&t[i * len..(i + 1) * len]);
                    }
                }
            }
            PerLayer::Embedding { tables } => {
                for (_, w, _, seg) in tables {
                    for (i, norm) in norms.iter_mut().enumerate() {
                        *norm += sq(&seg[i * w..(i + 1) * w]);
                    }
                }
            }
        }
    }
    let mut scales = vec![0f32; n];
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
            (clip / padded) as f32
        } else {
            1.0
        };
    }
    norms.truncate(active);
    let dev = x.device();
    let mut sum = Vec::with_capacity(total_values);
    for layer in layers {
        match layer {
            PerLayer::Dense { a, g, ins, outs } => {
                // Zero rows for examples that count as zero, so that an infinite factor times a
                // zero scale cannot make a NaN.
                let mut gs = vec![0f32; n * outs];
                let mut aa = vec![0f32; n * ins];
                for (i, &s) in scales.iter().enumerate() {
                    if s > 0.0 {
                        for (o, &v) in gs[i * outs..(i + 1) * outs]
                            .iter_mut()
                            .zip(&g[i * outs..(i + 1) * outs])
                        {
                            *o = v * s;
                        }
                        aa[i * ins..(i + 1) * ins].copy_from_slice(&a[i * ins..(i + 1) * ins]);
                    }
                }
                let gs = Tensor::from_vec(gs, (n, outs), dev)?;
                let aa = Tensor::from_vec(aa, (n, ins), dev)?;
                sum.extend(gs.t()?.matmul(&aa)?.flatten_all()?.to_vec1::<f32>()?);
                sum.extend(gs.sum(0)?.to_vec1::<f32>()?);
            }
            PerLayer::Explicit { tensors } => {
                for (t, len) in tensors {
                    let mut acc = vec![0f64; len];
                    for (i, &s) in scales.iter().enumerate() {
                        if s > 0.0 {
                            for (a, &v) in acc.iter_mut().zip(&t[i * len..(i + 1) * len]) {
                                *a += f64::from(v) * f64::from(s);
                            }
                        }
                    }
                    sum.extend(acc.into_iter().map(|v| v as f32));
                }
            }
            PerLayer::Embedding { tables } => {
                for (slots, w, ids, seg) in tables {
                    let mut acc = vec![0f64; slots * w];
                    for (i, &s) in scales.iter().enumerate() {
                        if s > 0.0 {
                            let row = &mut acc[ids[i] * w..(ids[i] + 1) * w];
                            for (a, &v) in row.iter_mut().zip(&seg[i * w..(i + 1) * w]) {
                                *a += f64::from(v) * f64::from(s);
                            }
                        }
                    }
                    sum.extend(acc.into_iter().map(|v| v as f32));
                }
            }
        }
    }
    Ok((sum, norms, clipped))
}
