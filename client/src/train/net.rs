//! The model's forward pass with candle, for every layer kind of `common::arch`, as
//! used (evaluation, and the tests' autograd reference), and the host-side pieces both it
//! and the training passes (`backprop`) use: category slots, the unfolding of convolution
//! inputs, max pooling's window maxima and row normalisation.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use fedpriv_common::arch::{Activation, Compiled, Layer, Step};

/// The parameters of step `i` out of the model's tensors (in spec order).
pub(super) fn params_of<'a, T>(compiled: &Compiled, params: &'a [T], step: usize) -> &'a [T] {
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

/// Normalises one row in place to zero mean and unit variance (population variance plus
/// the epsilon); returns 1 / std.
pub(super) fn normalise_row(row: &mut [f32]) -> f32 {
    let m = row.len() as f32;
    let mean = row.iter().sum::<f32>() / m;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / m;
    let inv = 1.0 / (var + NORM_EPS as f32).sqrt();
    for v in row.iter_mut() {
        *v = (*v - mean) * inv;
    }
    inv
}

/// For max pooling over `planes` planes of `h x w` in windows `(kh, kw)` that tile them
/// exactly: per output value, in order, the index into `x` of its window's first maximum (a
/// NaN is passed over unless it comes first), appended to `from`.
pub(super) fn max_pool_argmax_into(
    x: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    (kh, kw): (usize, usize),
    from: &mut Vec<usize>,
) {
    let (oh, ow) = (h / kh, w / kw);
    for plane in 0..planes {
        let base = plane * h * w;
        for oy in 0..oh {
            for ox in 0..ow {
                let mut best = base + oy * kh * w + ox * kw;
                let mut top = x[best];
                for y in oy * kh..(oy + 1) * kh {
                    let row = base + y * w + ox * kw;
                    for (j, &v) in x[row..row + kw].iter().enumerate() {
                        if v > top {
                            top = v;
                            best = row + j;
                        }
                    }
                }
                from.push(best);
            }
        }
    }
}

/// [`max_pool_argmax_into`] into a new array.
fn max_pool_argmax(
    x: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    window: (usize, usize),
) -> Vec<usize> {
    let mut from = Vec::with_capacity(x.len() / (window.0 * window.1).max(1));
    max_pool_argmax_into(x, planes, h, w, window, &mut from);
    from
}

/// The contiguous f32 values of a tensor's storage, or an error naming the op.
fn f32_values<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => Err(candle_core::Error::Msg(format!(
            "{op} takes a contiguous f32 tensor"
        ))),
    }
}

/// Max pooling `[n, c, h, w]` with window = stride `(kh, kw)` tiling the input exactly, whose
/// gradient goes to each window's first maximum (as PyTorch's does). candle 0.9's own
/// backward multiplies the gradient by the share of the window that holds the maximum
/// (1/4 for a unique maximum in a 2x2 window), which trained every max-pooled network with
/// a shrunken gradient below the pool.
struct MaxPool {
    window: (usize, usize),
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "fedpriv-max-pool"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_values(self.name(), storage, layout)?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let from = max_pool_argmax(x, n * c, h, w, self.window);
        let out = from.iter().map(|&j| x[j]).collect();
        let shape = Shape::from((n, c, h / self.window.0, w / self.window.1));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(
            &grad,
            &MaxPoolGrad {
                window: self.window,
            },
        )?))
    }
}

/// The gradient of [`MaxPool`]: `(input, output gradient)` to the input's gradient.
struct MaxPoolGrad {
    window: (usize, usize),
}

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "fedpriv-max-pool-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_values(self.name(), s1, l1)?;
        let g = f32_values(self.name(), s2, l2)?;
        let (n, c, h, w) = l1.shape().dims4()?;
        let from = max_pool_argmax(x, n * c, h, w, self.window);
        if from.len() != g.len() {
            return Err(candle_core::Error::Msg(
                "max pool gradient of the wrong shape".into(),
            ));
        }
        let mut out = vec![0f32; x.len()];
        for (&j, &v) in from.iter().zip(g) {
            out[j] = v;
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Runs `x` (`[n, input]`, flat) through the model as it is used (dropout is the identity);
/// returns the outputs `[n, outputs]`.
pub(super) fn forward(
    compiled: &Compiled,
    params: &[Tensor],
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let n = x.dim(0)?;
    let dev = x.device().clone();
    let with_batch = |shape: &[usize]| -> Vec<usize> {
        let mut s = vec![n];
        s.extend_from_slice(shape);
        s
    };
    let mut h = x.reshape(with_batch(&compiled.input))?;
    for (i, step) in compiled.steps.iter().enumerate() {
        let p = params_of(compiled, params, i);
        h = match &step.layer {
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
                        t.contiguous()?.apply_op1(MaxPool { window: k })
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
            Layer::Dropout { .. } => h,
            Layer::LayerNorm => {
                let m = *step.input.last().unwrap_or(&1);
                let rows = step.input.iter().product::<usize>() / m * n;
                let xh = normalise(&h.reshape((rows, m))?)?.reshape(h.dims())?;
                xh.broadcast_mul(&p[0])?.broadcast_add(&p[1])?
            }
            Layer::GroupNorm { groups } => {
                let c = step.input[0];
                let per = step.input.iter().product::<usize>() / groups;
                let xh = normalise(&h.reshape((n * groups, per))?)?.reshape(h.dims())?;
                let mut bshape = vec![1, c];
                bshape.extend(std::iter::repeat_n(1, step.input.len() - 1));
                xh.broadcast_mul(&p[0].reshape(bshape.as_slice())?)?
                    .broadcast_add(&p[1].reshape(bshape.as_slice())?)?
            }
        };
    }
    h.reshape((n, compiled.outputs))
}

/// A categorical column's values as slot indices: a value that is not a whole number below
/// `slots` (the loader writes the "other" slot for anything it does not know) goes to the
/// last slot.
pub(super) fn category_ids(column: &Tensor, slots: usize) -> candle_core::Result<Vec<usize>> {
    Ok(column
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| category_id(v, slots))
        .collect())
}

/// One categorical value's slot (see [`category_ids`]).
pub(super) fn category_id(v: f32, slots: usize) -> usize {
    if v >= 0.0 && v.fract() == 0.0 && (v as usize) < slots {
        v as usize
    } else {
        slots - 1
    }
}

/// Where each value of a convolution's unfolded input (im2col, `[cols, positions]` per
/// example: the kernel's flattened `[C, k, (k)]` by output position, so that the
/// convolution is the kernel `[channels, cols]` times it) comes from: the index in the
/// example's input, or none where the window reaches into the padding.
pub(super) struct ConvIndex {
    /// Output positions per channel.
    pub positions: usize,
    /// Values per window: `C * k` or `C * k * k`.
    pub cols: usize,
    /// The example's input length.
    input: usize,
    /// `[cols, positions]` input indices; `usize::MAX` for padding.
    from: Vec<usize>,
}

impl ConvIndex {
    /// `None` for a step that is not a convolution of the shapes `compile` gives one.
    pub(super) fn new(step: &Step) -> Option<Self> {
        let input: usize = step.input.iter().product();
        // A 1-d convolution is a 2-d one of height 1.
        let (c, h, w, kh, k, stride, padding, ph) = match (&step.layer, &step.input[..]) {
            (
                Layer::Conv1d {
                    kernel,
                    stride,
                    padding,
                    ..
                },
                [l],
            ) => (1, 1, *l, 1, *kernel, *stride, *padding, 0),
            (
                Layer::Conv1d {
                    kernel,
                    stride,
                    padding,
                    ..
                },
                [c, l],
            ) => (*c, 1, *l, 1, *kernel, *stride, *padding, 0),
            (
                Layer::Conv2d {
                    kernel,
                    stride,
                    padding,
                    ..
                },
                [c, h, w],
            ) => (*c, *h, *w, *kernel, *kernel, *stride, *padding, *padding),
            _ => return None,
        };
        let (oh, ow) = match step.output[..] {
            [_, l] => (1, l),
            [_, oh, ow] => (oh, ow),
            _ => return None,
        };
        let cols = c * kh * k;
        let positions = oh * ow;
        let mut from = vec![usize::MAX; positions * cols];
        for y in 0..oh {
            for x in 0..ow {
                let pos = y * ow + x;
                for ch in 0..c {
                    for ky in 0..kh {
                        let iy = (y * stride + ky) as isize - ph as isize;
                        if iy < 0 || iy as usize >= h {
                            continue;
                        }
                        for kx in 0..k {
                            let ix = (x * stride + kx) as isize - padding as isize;
                            if ix >= 0 && (ix as usize) < w {
                                from[((ch * kh + ky) * k + kx) * positions + pos] =
                                    (ch * h + iy as usize) * w + ix as usize;
                            }
                        }
                    }
                }
            }
        }
        Some(Self {
            positions,
            cols,
            input,
            from,
        })
    }

    /// Examples' inputs `[n, input]` unfolded into `u` (`[n, cols, positions]`, zeroed),
    /// zero in the padding.
    pub(super) fn unfold_into(&self, x: &[f32], u: &mut [f32]) {
        for (src, dst) in x.chunks(self.input).zip(u.chunks_mut(self.from.len())) {
            for (v, &j) in dst.iter_mut().zip(&self.from) {
                if j != usize::MAX {
                    *v = src[j];
                }
            }
        }
    }

    /// The transpose of [`Self::unfold_into`]: each unfolded value of `u` (`[n, cols,
    /// positions]`) added to `x` (`[n, input]`, zeroed) where it came from.
    pub(super) fn fold_into(&self, u: &[f32], x: &mut [f32]) {
        for (src, dst) in u.chunks(self.from.len()).zip(x.chunks_mut(self.input)) {
            for (&v, &j) in src.iter().zip(&self.from) {
                if j != usize::MAX {
                    dst[j] += v;
                }
            }
        }
    }

    /// The example's input length.
    pub(super) fn input_len(&self) -> usize {
        self.input
    }
}
