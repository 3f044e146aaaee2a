//! Model architectures as data: the layer list a study declares, its shapes checked layer by
//! layer, its tensor layout and its starting weights. Both sides need them: the coordinator
//! to create a study's first model and check updates against it, the sites to train.
//!
//! A model is always a list of layers applied in order to one example's input (a flat
//! feature vector `[d]`, a sequence `[C, L]` or an image `[C, H, W]`); the named families
//! (`logistic_regression`, `linear_regression`, `mlp`) are shorthands for lists. Nothing here
//! runs a model: the site's trainer does, with candle. Batch normalisation is not offered
//! (it mixes examples, which breaks per-example clipping); pooling uses a stride equal to
//! its window.

use serde::{Deserialize, Serialize};

use crate::model::{Architecture, FlatModel, ModelError, ModelSpec, SpecError, TensorSpec};

/// A nonlinearity applied element-wise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    /// The exact (erf) GELU.
    Gelu,
    Tanh,
    Sigmoid,
}

impl Activation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Relu => "relu",
            Self::Gelu => "gelu",
            Self::Tanh => "tanh",
            Self::Sigmoid => "sigmoid",
        }
    }
}

/// One layer of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Layer {
    /// `z = a W^T + b` on a flat input.
    Dense {
        units: usize,
    },
    /// Convolution over a sequence `[C, L]` (a flat input is one channel).
    Conv1d {
        channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    /// Convolution over an image `[C, H, W]` with a square kernel.
    Conv2d {
        channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    /// Max over non-overlapping windows (stride = window), per channel.
    MaxPool {
        kernel: usize,
    },
    /// Mean over non-overlapping windows (stride = window), per channel.
    AvgPool {
        kernel: usize,
    },
    Flatten,
    Activation(Activation),
    /// Normalises each example over its last axis, then a learned scale and shift.
    LayerNorm,
    /// Normalises each example over groups of channels (and all positions), then a learned
    /// scale and shift per channel.
    GroupNorm {
        groups: usize,
    },
    /// Zeroes each value with probability `rate` in training (scaling the rest by
    /// 1 / (1 - rate)); the identity when the model is used.
    Dropout {
        rate: f32,
    },
    /// The input encoding of a table with categorical columns (inserted first, never
    /// written in a study): numeric values pass through, each categorical column's index
    /// becomes a one-hot vector or a learned embedding.
    Encode(Encoding),
}

/// How a table's values enter the model: `numeric` values, then one index per categorical
/// column, `(slots, embedding width or None for one-hot)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encoding {
    pub numeric: usize,
    pub categorical: Vec<(usize, Option<usize>)>,
}

impl Encoding {
    /// Values after encoding.
    pub fn width(&self) -> usize {
        self.numeric
            + self
                .categorical
                .iter()
                .map(|(slots, emb)| emb.unwrap_or(*slots))
                .sum::<usize>()
    }
}

impl Layer {
    /// The name a study's TOML gives the layer (used in error messages).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Dense { .. } => "dense",
            Self::Conv1d { .. } => "conv1d",
            Self::Conv2d { .. } => "conv2d",
            Self::MaxPool { .. } => "max_pool",
            Self::AvgPool { .. } => "avg_pool",
            Self::Flatten => "flatten",
            Self::Activation(a) => a.as_str(),
            Self::LayerNorm => "layer_norm",
            Self::GroupNorm { .. } => "group_norm",
            Self::Dropout { .. } => "dropout",
            Self::Encode(_) => "encode",
        }
    }
}

/// A layer with its shapes worked out.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub layer: Layer,
    /// One example's input and output shapes.
    pub input: Vec<usize>,
    pub output: Vec<usize>,
    /// The layer's tensors, in the model's flat order.
    pub params: Vec<TensorSpec>,
}

/// A model's layers with their shapes, for one input shape and number of outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    pub input: Vec<usize>,
    pub outputs: usize,
    pub steps: Vec<Step>,
    /// Whether the model starts at zero (the convex families) rather than at random weights.
    pub zero_init: bool,
}

/// A layer that does not fit: which one (0-based, in the expanded list), and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("layer {index} ({kind}): {reason}")]
    Layer {
        index: usize,
        kind: &'static str,
        reason: String,
    },
    #[error("{0}")]
    Model(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
}

impl Architecture {
    /// One hidden layer of `hidden` tanh units (the shorthand of earlier studies).
    pub fn mlp(hidden: usize) -> Self {
        Self::Mlp {
            hidden: vec![hidden],
            activation: Activation::Tanh,
        }
    }

    /// The layer list this architecture stands for, for `outputs` outputs on an input of
    /// rank `rank` (a flatten goes first when the input is not flat).
    pub fn layers(&self, rank: usize, outputs: usize) -> Vec<Layer> {
        let mut out = Vec::new();
        let flat_first = |out: &mut Vec<Layer>| {
            if rank > 1 {
                out.push(Layer::Flatten);
            }
        };
        match self {
            Self::LogisticRegression => {
                flat_first(&mut out);
                out.push(Layer::Dense { units: outputs });
            }
            Self::LinearRegression => {
                flat_first(&mut out);
                out.push(Layer::Dense { units: 1 });
            }
            Self::Mlp { hidden, activation } => {
                flat_first(&mut out);
                for &h in hidden {
                    out.push(Layer::Dense { units: h });
                    out.push(Layer::Activation(*activation));
                }
                out.push(Layer::Dense { units: outputs });
            }
            Self::Layers(layers) => out.clone_from(layers),
        }
        out
    }

    /// A short description for messages and metadata.
    pub fn describe(&self) -> String {
        match self {
            Self::LogisticRegression => "logistic regression".into(),
            Self::LinearRegression => "linear regression".into(),
            Self::Mlp { hidden, activation } => {
                format!("MLP {hidden:?} ({})", activation.as_str())
            }
            Self::Layers(l) => {
                let kinds: Vec<&str> = l.iter().map(Layer::kind).collect();
                format!("layers [{}]", kinds.join(", "))
            }
        }
    }
}

fn conv_out(len: usize, kernel: usize, stride: usize, padding: usize) -> Option<usize> {
    let padded = len.checked_add(padding.checked_mul(2)?)?;
    // Padding of a kernel's width or more adds windows that see only zeros (and lets a
    // study's spec grow a site's activations without bound).
    if kernel == 0 || stride == 0 || padding >= kernel || padded < kernel {
        return None;
    }
    Some((padded - kernel) / stride + 1)
}

/// Works out every layer's shapes and tensors for one example's `input` shape and the
/// task's number of outputs; errors name the layer.
pub fn compile(
    arch: &Architecture,
    input: &[usize],
    outputs: usize,
) -> Result<Compiled, LayoutError> {
    if input.is_empty() || input.contains(&0) || outputs == 0 {
        return Err(LayoutError::Model(format!(
            "a model needs a non-empty input (got {input:?}) and at least one output"
        )));
    }
    if let Architecture::Mlp { hidden, .. } = arch {
        if hidden.is_empty() || hidden.contains(&0) {
            return Err(LayoutError::Model(
                "an MLP needs at least one hidden layer, each of at least one unit".into(),
            ));
        }
    }
    let layers = arch.layers(input.len(), outputs);
    if layers.is_empty() {
        return Err(LayoutError::Model("the model has no layers".into()));
    }
    let mut shape = input.to_vec();
    let mut steps = Vec::with_capacity(layers.len());
    let last = layers.len() - 1;
    for (index, layer) in layers.into_iter().enumerate() {
        let kind = layer.kind();
        let bad = |reason: String| LayoutError::Layer {
            index,
            kind,
            reason,
        };
        let name = |what: &str| format!("{index}.{kind}.{what}");
        let u = |v: usize| v as u64;
        let (output, params) = match &layer {
            Layer::Dense { units } => {
                if *units == 0 {
                    return Err(bad("needs at least one unit".into()));
                }
                let [d] = shape[..] else {
                    return Err(bad(format!(
                        "needs a flat input, got shape {shape:?} (add a flatten layer before it)"
                    )));
                };
                (
                    vec![*units],
                    vec![
                        TensorSpec::new(name("weight"), &[u(*units), u(d)]),
                        TensorSpec::new(name("bias"), &[u(*units)]),
                    ],
                )
            }
            Layer::Conv1d {
                channels,
                kernel,
                stride,
                padding,
            } => {
                let (c, l) = match shape[..] {
                    [l] => (1, l),
                    [c, l] => (c, l),
                    _ => {
                        return Err(bad(format!(
                            "needs a sequence [channels, length], got shape {shape:?}"
                        )))
                    }
                };
                if *channels == 0 {
                    return Err(bad("needs at least one output channel".into()));
                }
                let out = conv_out(l, *kernel, *stride, *padding).ok_or_else(|| {
                    bad(format!(
                        "kernel {kernel} with stride {stride} and padding {padding} does not fit a length of {l} (the padding must be below the kernel)"
                    ))
                })?;
                (
                    vec![*channels, out],
                    vec![
                        TensorSpec::new(name("weight"), &[u(*channels), u(c), u(*kernel)]),
                        TensorSpec::new(name("bias"), &[u(*channels)]),
                    ],
                )
            }
            Layer::Conv2d {
                channels,
                kernel,
                stride,
                padding,
            } => {
                let [c, h, w] = shape[..] else {
                    return Err(bad(format!(
                        "needs an image [channels, height, width], got shape {shape:?}"
                    )));
                };
                if *channels == 0 {
                    return Err(bad("needs at least one output channel".into()));
                }
                let fit = |len: usize| {
                    conv_out(len, *kernel, *stride, *padding).ok_or_else(|| {
                        bad(format!(
                            "kernel {kernel} with stride {stride} and padding {padding} does not fit a {h}x{w} input (the padding must be below the kernel)"
                        ))
                    })
                };
                let (oh, ow) = (fit(h)?, fit(w)?);
                (
                    vec![*channels, oh, ow],
                    vec![
                        TensorSpec::new(
                            name("weight"),
                            &[u(*channels), u(c), u(*kernel), u(*kernel)],
                        ),
                        TensorSpec::new(name("bias"), &[u(*channels)]),
                    ],
                )
            }
            Layer::MaxPool { kernel } | Layer::AvgPool { kernel } => {
                let k = *kernel;
                let small =
                    |len: usize| bad(format!("a window of {k} does not fit a length of {len}"));
                // Windows tile the input exactly: what a ragged edge would do differs
                // between implementations (and breaks the gradient of max pooling).
                let divides =
                    |len: usize| bad(format!("a window of {k} must divide the length {len}"));
                match shape[..] {
                    _ if k == 0 => return Err(bad("needs a window of at least 1".into())),
                    [c, l] => {
                        if l < k {
                            return Err(small(l));
                        }
                        if !l.is_multiple_of(k) {
                            return Err(divides(l));
                        }
                        (vec![c, l / k], Vec::new())
                    }
                    [c, h, w] => {
                        if h < k || w < k {
                            return Err(small(h.min(w)));
                        }
                        if !h.is_multiple_of(k) || !w.is_multiple_of(k) {
                            return Err(divides(if h.is_multiple_of(k) { w } else { h }));
                        }
                        (vec![c, h / k, w / k], Vec::new())
                    }
                    _ => {
                        return Err(bad(format!(
                            "needs channels first ([C, L] or [C, H, W]), got shape {shape:?}"
                        )))
                    }
                }
            }
            Layer::Encode(enc) => {
                if index != 0 || shape != [enc.numeric + enc.categorical.len()] {
                    return Err(bad("an encoding only comes first, on a table".into()));
                }
                if let Some(j) = enc
                    .categorical
                    .iter()
                    .position(|(slots, emb)| *slots == 0 || *emb == Some(0))
                {
                    return Err(bad(format!(
                        "categorical column {j} needs at least one slot and an embedding of at least one value"
                    )));
                }
                let params = enc
                    .categorical
                    .iter()
                    .enumerate()
                    .filter_map(|(j, (slots, emb))| {
                        emb.map(|w| {
                            TensorSpec::new(name(&format!("embedding{j}")), &[u(*slots), u(w)])
                        })
                    })
                    .collect();
                (vec![enc.width()], params)
            }
            Layer::Flatten => (vec![shape.iter().product()], Vec::new()),
            Layer::Activation(_) => (shape.clone(), Vec::new()),
            Layer::Dropout { rate } => {
                if !(rate.is_finite() && *rate >= 0.0 && *rate < 1.0) {
                    return Err(bad(format!("rate {rate} is not in [0, 1)")));
                }
                (shape.clone(), Vec::new())
            }
            Layer::LayerNorm => {
                let last_dim = *shape.last().unwrap_or(&0);
                if last_dim < 2 {
                    return Err(bad("needs at least 2 values on the last axis".into()));
                }
                (
                    shape.clone(),
                    vec![
                        TensorSpec::new(name("gamma"), &[u(last_dim)]),
                        TensorSpec::new(name("beta"), &[u(last_dim)]),
                    ],
                )
            }
            Layer::GroupNorm { groups } => {
                if shape.len() < 2 {
                    return Err(bad(format!(
                        "needs channels first ([C, ...]), got shape {shape:?}"
                    )));
                }
                let c = shape[0];
                if *groups == 0 || !c.is_multiple_of(*groups) {
                    return Err(bad(format!("{groups} groups do not divide {c} channels")));
                }
                let per_group = (c / groups) * shape[1..].iter().product::<usize>();
                if per_group < 2 {
                    return Err(bad("each group needs at least 2 values".into()));
                }
                (
                    shape.clone(),
                    vec![
                        TensorSpec::new(name("gamma"), &[u(c)]),
                        TensorSpec::new(name("beta"), &[u(c)]),
                    ],
                )
            }
        };
        if index == last {
            match (&layer, &output[..]) {
                (Layer::Dense { .. }, [o]) if *o == outputs => {}
                _ => {
                    return Err(bad(format!(
                        "the last layer must be dense with {outputs} unit(s) (the task's outputs), got shape {output:?}"
                    )))
                }
            }
        }
        steps.push(Step {
            layer,
            input: shape.clone(),
            output: output.clone(),
            params,
        });
        shape = output;
    }
    let compiled = Compiled {
        input: input.to_vec(),
        outputs,
        steps,
        zero_init: matches!(
            arch,
            Architecture::LogisticRegression | Architecture::LinearRegression
        ),
    };
    compiled.spec()?;
    Ok(compiled)
}

/// [`compile`] for a study's data: an image's `[C, H, W]`, or a table whose categorical
/// columns are encoded first (one-hot or embedded).
pub fn compile_for(
    arch: &Architecture,
    data: &crate::config::DataSpec,
    outputs: usize,
) -> Result<Compiled, LayoutError> {
    let input = data.input_shape();
    let enc = data.encoding();
    if data.image.is_some() || enc.categorical.is_empty() {
        return compile(arch, &input, outputs);
    }
    // Compile the model on the encoded width, then put the encoding in front.
    let mut inner = compile(arch, &[enc.width()], outputs)?;
    let encode = compile(
        &Architecture::Layers(vec![Layer::Encode(enc.clone()), Layer::Dense { units: 1 }]),
        &input,
        1,
    )?;
    let mut first = encode.steps[0].clone();
    let mut steps = vec![first.clone()];
    // Later layers' tensor names carry their index: shift them by one.
    for (i, mut step) in inner.steps.drain(..).enumerate() {
        for t in &mut step.params {
            if let Some(rest) = t.name.split_once('.').map(|(_, r)| r.to_string()) {
                t.name = format!("{}.{rest}", i + 1);
            }
        }
        steps.push(step);
    }
    first.output = vec![enc.width()];
    steps[0] = first;
    let compiled = Compiled {
        input,
        outputs,
        steps,
        zero_init: inner.zero_init,
    };
    compiled.spec()?;
    Ok(compiled)
}

/// The tensor layout of `arch` for a study's data.
pub fn spec_for_data(
    arch: &Architecture,
    data: &crate::config::DataSpec,
    outputs: usize,
) -> Result<ModelSpec, LayoutError> {
    Ok(compile_for(arch, data, outputs)?.spec()?)
}

/// A fresh model for a study's data (see [`init_model`]).
pub fn init_for_data(
    arch: &Architecture,
    data: &crate::config::DataSpec,
    outputs: usize,
    seed: u64,
) -> Result<FlatModel, ModelError> {
    let compiled = compile_for(arch, data, outputs).map_err(|e| match e {
        LayoutError::Spec(s) => ModelError::Spec(s),
        _ => ModelError::Spec(SpecError::Empty),
    })?;
    init_compiled(&compiled, seed)
}

impl Compiled {
    /// The model's tensor layout.
    pub fn spec(&self) -> Result<ModelSpec, SpecError> {
        ModelSpec::new(
            self.steps
                .iter()
                .flat_map(|s| s.params.iter().cloned())
                .collect(),
        )
    }
}

/// The tensor layout of `arch` on a flat input of `n_features` with `n_outputs` outputs (1
/// for binary classification and regression, k for k classes).
pub fn model_spec(
    arch: &Architecture,
    n_features: usize,
    n_outputs: usize,
) -> Result<ModelSpec, SpecError> {
    model_spec_for(arch, &[n_features], n_outputs)
}

/// [`model_spec`] for any input shape. Layout errors that are not size limits are reported
/// as an empty model (use [`compile`] for the message).
pub fn model_spec_for(
    arch: &Architecture,
    input: &[usize],
    n_outputs: usize,
) -> Result<ModelSpec, SpecError> {
    match compile(arch, input, n_outputs) {
        Ok(c) => c.spec(),
        Err(LayoutError::Spec(e)) => Err(e),
        Err(_) => Err(SpecError::Empty),
    }
}

/// SplitMix64: a tiny deterministic generator for reproducible initial weights (public
/// values, so no cryptographic strength is needed).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A fresh model on a flat input. Logistic and linear regression start at zero (their loss
/// is convex); other models' weights are uniform in +-1/sqrt(fan_in) from `seed`, biases
/// and shifts zero, normalisation scales one.
pub fn init_model(
    arch: &Architecture,
    n_features: usize,
    n_outputs: usize,
    seed: u64,
) -> Result<FlatModel, ModelError> {
    init_model_for(arch, &[n_features], n_outputs, seed)
}

/// [`init_model`] for any input shape.
pub fn init_model_for(
    arch: &Architecture,
    input: &[usize],
    n_outputs: usize,
    seed: u64,
) -> Result<FlatModel, ModelError> {
    let compiled = compile(arch, input, n_outputs).map_err(|e| match e {
        LayoutError::Spec(s) => ModelError::Spec(s),
        _ => ModelError::Spec(SpecError::Empty),
    })?;
    init_compiled(&compiled, seed)
}

/// The starting weights of a compiled model.
pub fn init_compiled(compiled: &Compiled, seed: u64) -> Result<FlatModel, ModelError> {
    let spec = compiled.spec()?;
    let mut values = Vec::with_capacity(spec.num_values());
    let mut rng = SplitMix64(seed);
    for step in &compiled.steps {
        for t in &step.params {
            let n = t.numel().unwrap_or(0) as usize;
            let fill = if t.name.ends_with(".gamma") {
                vec![1.0f32; n]
            } else if t.name.contains(".encode.embedding") {
                (0..n)
                    .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
                    .collect()
            } else if t.name.ends_with(".weight") && !compiled.zero_init {
                let fan_in: u64 = t.shape[1..].iter().product::<u64>().max(1);
                let bound = 1.0 / (fan_in as f64).sqrt();
                (0..n)
                    .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            } else {
                vec![0.0f32; n]
            };
            values.extend(fill);
        }
    }
    FlatModel::new(spec, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_and_init() {
        let s = model_spec(&Architecture::LogisticRegression, 30, 1).expect("spec");
        assert_eq!(s.num_values(), 31);
        let m = init_model(&Architecture::mlp(8), 4, 1, 7).expect("model");
        assert_eq!(m.values.len(), 8 * 4 + 8 + 8 + 1);
        assert!(
            m.values[..32].iter().all(|v| v.abs() <= 0.5)
                && m.values[..32].iter().any(|v| *v != 0.0)
        );
        assert_eq!(
            m,
            init_model(&Architecture::mlp(8), 4, 1, 7).expect("model")
        );
        assert!(model_spec(&Architecture::LinearRegression, 0, 1).is_err());
        let deep = Architecture::Mlp {
            hidden: vec![64, 32],
            activation: Activation::Relu,
        };
        let s = model_spec(&deep, 10, 3).expect("spec");
        assert_eq!(s.num_values(), 64 * 10 + 64 + 32 * 64 + 32 + 3 * 32 + 3);
    }

    #[test]
    fn a_small_conv_net_on_8x8_images_has_the_shapes_worked_out() {
        let net = Architecture::Layers(vec![
            Layer::Conv2d {
                channels: 8,
                kernel: 3,
                stride: 1,
                padding: 1,
            },
            Layer::GroupNorm { groups: 2 },
            Layer::Activation(Activation::Relu),
            Layer::MaxPool { kernel: 2 },
            Layer::Flatten,
            Layer::Dropout { rate: 0.1 },
            Layer::Dense { units: 32 },
            Layer::LayerNorm,
            Layer::Activation(Activation::Gelu),
            Layer::Dense { units: 10 },
        ]);
        let c = compile(&net, &[1, 8, 8], 10).expect("compiles");
        let shapes: Vec<&[usize]> = c.steps.iter().map(|s| s.output.as_slice()).collect();
        assert_eq!(shapes[0], [8, 8, 8]);
        assert_eq!(shapes[3], [8, 4, 4]);
        assert_eq!(shapes[4], [128]);
        assert_eq!(shapes[9], [10]);
        let m = init_compiled(&c, 1).expect("init");
        assert_eq!(
            m.values.len(),
            8 * 9 + 8 + 8 + 8 + 32 * 128 + 32 + 32 + 32 + 10 * 32 + 10
        );
        // Group norm scales start at one, shifts at zero.
        let gamma = m.tensor("1.group_norm.gamma").expect("gamma");
        assert!(gamma.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn layout_errors_name_the_layer() {
        let cases: Vec<(Vec<Layer>, Vec<usize>, &str)> = vec![
            (
                vec![Layer::Dense { units: 4 }, Layer::Dense { units: 1 }],
                vec![1, 8, 8],
                "layer 0 (dense): needs a flat input",
            ),
            (
                vec![
                    Layer::Conv2d {
                        channels: 4,
                        kernel: 9,
                        stride: 1,
                        padding: 0,
                    },
                    Layer::Flatten,
                    Layer::Dense { units: 1 },
                ],
                vec![1, 8, 8],
                "layer 0 (conv2d): kernel 9",
            ),
            (
                vec![
                    Layer::Conv2d {
                        channels: 6,
                        kernel: 3,
                        stride: 1,
                        padding: 1,
                    },
                    Layer::GroupNorm { groups: 4 },
                    Layer::Flatten,
                    Layer::Dense { units: 1 },
                ],
                vec![1, 8, 8],
                "layer 1 (group_norm): 4 groups do not divide 6 channels",
            ),
            (
                vec![Layer::Dense { units: 3 }],
                vec![5],
                "layer 0 (dense): the last layer must be dense with 1 unit",
            ),
            (
                vec![Layer::MaxPool { kernel: 2 }, Layer::Dense { units: 1 }],
                vec![5],
                "layer 0 (max_pool): needs channels first",
            ),
            (
                vec![
                    Layer::Conv1d {
                        channels: 2,
                        kernel: 3,
                        stride: 1,
                        padding: 3,
                    },
                    Layer::Flatten,
                    Layer::Dense { units: 1 },
                ],
                vec![8],
                "layer 0 (conv1d): kernel 3 with stride 1 and padding 3 does not fit a length of 8 (the padding must be below the kernel)",
            ),
            (
                vec![
                    Layer::Encode(Encoding {
                        numeric: 1,
                        categorical: vec![(3, None), (0, None)],
                    }),
                    Layer::Dense { units: 1 },
                ],
                vec![3],
                "layer 0 (encode): categorical column 1 needs at least one slot",
            ),
        ];
        for (layers, input, want) in cases {
            let e = compile(&Architecture::Layers(layers), &input, 1)
                .expect_err(want)
                .to_string();
            assert!(e.starts_with(want), "{e}");
        }
    }
}
