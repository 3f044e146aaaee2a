//! The matrix products of the training passes: candle's for the layer-wide ones, plain
//! loops for the many small per-example ones.

use candle_core::{Device, Tensor};

use super::spare::{empty, zeros};

/// `a` `[rows, k]` times `w^T`, `w` `[outs, k]`: `[rows, outs]`.
pub(super) fn mm_nt(
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
pub(super) fn mm_nn(
    a: &[f32],
    rows: usize,
    o: usize,
    w: &[f32],
    k: usize,
) -> candle_core::Result<Vec<f32>> {
    let dev = Device::Cpu;
    let a = Tensor::from_slice(a, (rows, o), &dev)?;
    let w = Tensor::from_slice(w, (o, k), &dev)?;
    a.matmul(&w)?.flatten_all()?.to_vec1()
}

/// Multiply-adds per example below which the per-example products are plain loops: for
/// small layers a library call per example costs more than the product.
const SMALL_PRODUCT: usize = 1 << 15;

/// Per example `c_i [m, n] = a [m, k] b_i [k, n]`, `a` shared, `b` `[count, k, n]`.
pub(super) fn shared_times_each(
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
pub(super) fn each_times_each_t(
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
pub(super) fn transpose(v: &[f32], n: usize, a: usize, b: usize) -> Vec<f32> {
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
