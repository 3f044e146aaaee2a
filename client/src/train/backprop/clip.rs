//! Clipping each example's gradient to the clip norm and summing the clipped gradients.

use candle_core::{Device, Tensor};

use super::layers::PerLayer;
use super::spare::{spare, zeros};
use crate::train::{TrainError, CLIP_MARGIN};

/// Sum of squares in f64.
fn sq(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// Each example's scale (at most `clip` / its norm; zero for padding from `active` on and for
/// a norm that is not finite), the active examples' norms, how many were scaled down, and
/// each example's squared norm outside dense layers.
pub(super) fn clip_scales(
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

/// What [`scaled_sum`] checks each example's contribution against: the clip norm, and the
/// example's squared norm outside dense layers (from [`clip_scales`]).
pub(super) struct Check<'a> {
    pub clip: f64,
    pub others: &'a [f64],
}

/// The per-example gradients of every layer, each example's scaled by its factor, summed.
///
/// With a clip norm, each example's contribution is checked as it will be summed: dense
/// layers' scaled factors are rounded to f32 (the rest is scaled in f64), and a product
/// that lands among f32's subnormals can round up far beyond the margin (a gradient norm
/// beyond about 1e37 times the clip norm, which a crafted model can cause). An example whose
/// rounded contribution exceeds the clip norm counts as zero.
pub(super) fn scaled_sum(
    layers: Vec<PerLayer>,
    scales: &mut [f64],
    check: Option<Check<'_>>,
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
    if let Some(Check { clip, others }) = check {
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
