//! Models as flat parameter vectors with named shapes.
//!
//! Every model that crosses the wire or is stored is a [`ModelSpec`] (ordered tensor names
//! and shapes) plus one contiguous `Vec<f32>` of values in that order. Aggregation, clipping
//! and noise all work on the flat vector; the names and shapes matter only at the edges
//! (safetensors files, candle training).

use serde::{Deserialize, Serialize};

/// Largest model the project accepts anywhere (values): 2^31, about 8.6 GB of f32. Checked
/// before any allocation sized by a peer's or a file's claim.
pub const MAX_MODEL_VALUES: u64 = 1 << 31;
/// Most tensors in one model.
pub const MAX_TENSORS: usize = 4096;
/// Longest tensor name (bytes).
pub const MAX_NAME_LEN: usize = 256;
/// Most dimensions of one tensor.
pub const MAX_RANK: usize = 8;

/// The model a study trains: a named family or a list of layers (see [`crate::arch`]). Input
/// shape and number of outputs come from the data the study declares, not from here.
///
/// Serialised as a plain enum (the wire format is not self-describing); the study TOML
/// spells it `model = { kind = "mlp", hidden = [64, 32], activation = "relu" }` or
/// `model = { kind = "layers", layers = [...] }` through the config module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Architecture {
    /// Binary (one output, sigmoid) or multi-class (softmax) logistic regression.
    LogisticRegression,
    /// Linear regression with squared loss (one output).
    LinearRegression,
    /// Dense hidden layers of these widths, each followed by the activation, then a dense
    /// output layer.
    Mlp {
        hidden: Vec<usize>,
        activation: crate::arch::Activation,
    },
    /// Any list of layers; the last is a dense layer with the task's number of outputs.
    Layers(Vec<crate::arch::Layer>),
}

/// One named tensor's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<u64>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: &[u64]) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    /// Number of values, or `None` on overflow.
    pub fn numel(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
}

/// The ordered list of tensors that make up a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub tensors: Vec<TensorSpec>,
}

/// A model spec that breaks a limit (too many tensors, values, a bad name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("model has {0} tensors, more than the limit of {MAX_TENSORS}")]
    TooManyTensors(usize),
    #[error("tensor name of {0} bytes is longer than the limit of {MAX_NAME_LEN}")]
    NameTooLong(usize),
    #[error("tensor name {0:?} appears twice")]
    DuplicateName(String),
    #[error("tensor {0:?} has rank {1}, more than the limit of {MAX_RANK}")]
    RankTooHigh(String, usize),
    #[error("model has more than {MAX_MODEL_VALUES} values")]
    TooLarge,
    #[error("model has no values")]
    Empty,
}

impl ModelSpec {
    pub fn new(tensors: Vec<TensorSpec>) -> Result<Self, SpecError> {
        let spec = Self { tensors };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every limit; call on anything that came from a peer or a file.
    pub fn validate(&self) -> Result<u64, SpecError> {
        if self.tensors.len() > MAX_TENSORS {
            return Err(SpecError::TooManyTensors(self.tensors.len()));
        }
        let mut seen = std::collections::HashSet::new();
        let mut total = 0u64;
        for t in &self.tensors {
            if t.name.len() > MAX_NAME_LEN {
                return Err(SpecError::NameTooLong(t.name.len()));
            }
            if t.shape.len() > MAX_RANK {
                return Err(SpecError::RankTooHigh(t.name.clone(), t.shape.len()));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(SpecError::DuplicateName(t.name.clone()));
            }
            total = t
                .numel()
                .and_then(|n| total.checked_add(n))
                .filter(|&n| n <= MAX_MODEL_VALUES)
                .ok_or(SpecError::TooLarge)?;
        }
        if total == 0 {
            return Err(SpecError::Empty);
        }
        Ok(total)
    }

    /// Total number of values. Only meaningful on a validated spec.
    pub fn num_values(&self) -> usize {
        self.tensors
            .iter()
            .map(|t| t.numel().unwrap_or(0) as usize)
            .sum()
    }

    /// `(name, shape, offset, len)` of each tensor in the flat vector.
    pub fn layout(&self) -> impl Iterator<Item = (&str, &[u64], usize, usize)> + '_ {
        let mut offset = 0usize;
        self.tensors.iter().map(move |t| {
            let len = t.numel().unwrap_or(0) as usize;
            let here = offset;
            offset += len;
            (t.name.as_str(), t.shape.as_slice(), here, len)
        })
    }
}

/// A model: its spec and its values, flat, in spec order.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatModel {
    pub spec: ModelSpec,
    pub values: Vec<f32>,
}

/// Values that do not fit the spec they came with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("model spec says {expected} values, got {got}")]
    Length { expected: usize, got: usize },
    #[error("value {index} is not finite")]
    NonFinite { index: usize },
}

impl FlatModel {
    pub fn new(spec: ModelSpec, values: Vec<f32>) -> Result<Self, ModelError> {
        let expected = spec.validate()? as usize;
        if values.len() != expected {
            return Err(ModelError::Length {
                expected,
                got: values.len(),
            });
        }
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite { index });
        }
        Ok(Self { spec, values })
    }

    pub fn zeros(spec: ModelSpec) -> Result<Self, ModelError> {
        let n = spec.validate()? as usize;
        Ok(Self {
            spec,
            values: vec![0.0; n],
        })
    }

    /// The slice of one tensor, by name.
    pub fn tensor(&self, name: &str) -> Option<&[f32]> {
        self.spec
            .layout()
            .find(|(n, ..)| *n == name)
            .map(|(_, _, off, len)| &self.values[off..off + len])
    }
}

/// L2 norm of a flat vector, accumulated in f64 so that large models do not lose precision.
pub fn l2_norm(values: &[f32]) -> f64 {
    sum_squares(values).sqrt()
}

/// Sum of squares in f64, over eight running sums: one sum in order would wait on each
/// addition's latency (about four times slower on a 10M-value update); the result differs
/// from the in-order sum only by rounding. NaN or infinity if any value is not finite.
pub fn sum_squares(values: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = values.chunks_exact(8);
    for c in &mut chunks {
        for (acc, &v) in lanes.iter_mut().zip(c) {
            let x = f64::from(v);
            *acc += x * x;
        }
    }
    let mut total: f64 = lanes.iter().sum();
    for &v in chunks.remainder() {
        total += f64::from(v) * f64::from(v);
    }
    total
}

/// `after - before`, element by element. Panics if the lengths differ (a bug, not input).
pub fn delta(after: &[f32], before: &[f32]) -> Vec<f32> {
    assert_eq!(
        after.len(),
        before.len(),
        "delta of vectors of different lengths"
    );
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// Index of the first NaN or infinite value, if any.
pub fn first_non_finite(values: &[f32]) -> Option<usize> {
    values.iter().position(|v| !v.is_finite())
}

// ---------------------------------------------------------------------------------------
// Safetensors I/O (interoperable with PyTorch / Hugging Face; f32 only).

/// Metadata key under which the spec's tensor order is stored (safetensors itself keeps
/// tensors sorted by dtype and name, which would lose the flat-vector order).
pub const SAFETENSORS_ORDER_KEY: &str = "fedpriv.tensor_order";

/// A safetensors file that cannot be read or written as a [`FlatModel`]. Reading errors
/// are the file's fault (or its author's); a spec mismatch names the first difference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SafetensorsError {
    #[error("safetensors file is malformed: {0}")]
    Malformed(String),
    #[error("tensor {name:?} has dtype {dtype}; only F32 is supported")]
    Dtype { name: String, dtype: String },
    #[error("safetensors file does not match the model: {0}")]
    Mismatch(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("internal error writing safetensors: {0}")]
    Internal(String),
}

impl FlatModel {
    /// Serialises the model as safetensors (f32, little-endian), keeping the spec's order in
    /// the file's metadata.
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>, SafetensorsError> {
        let expected = self.spec.validate().map_err(ModelError::from)? as usize;
        if self.values.len() != expected {
            return Err(ModelError::Length {
                expected,
                got: self.values.len(),
            }
            .into());
        }
        let bytes = crate::wire::f32_body_bytes(&self.values);
        let mut views = Vec::with_capacity(self.spec.tensors.len());
        for (name, shape, off, len) in self.spec.layout() {
            let shape = shape
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| SafetensorsError::Internal(format!("shape of {name:?}")))?;
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape,
                &bytes[off * 4..(off + len) * 4],
            )
            .map_err(|e| SafetensorsError::Internal(e.to_string()))?;
            views.push((name.to_owned(), view));
        }
        let order: Vec<&str> = self.spec.tensors.iter().map(|t| t.name.as_str()).collect();
        let order =
            serde_json::to_string(&order).map_err(|e| SafetensorsError::Internal(e.to_string()))?;
        let meta = std::collections::HashMap::from([(SAFETENSORS_ORDER_KEY.to_owned(), order)]);
        safetensors::serialize(views, Some(meta))
            .map_err(|e| SafetensorsError::Internal(e.to_string()))
    }

    /// Reads a safetensors file. With `expected`, the file must hold exactly those tensors
    /// and shapes (any order in the file); the result uses `expected`'s order. Without it,
    /// the order is the one this crate stored, else the order of the data in the file.
    /// Values must be f32 and finite.
    pub fn from_safetensors_bytes(
        bytes: &[u8],
        expected: Option<&ModelSpec>,
    ) -> Result<Self, SafetensorsError> {
        let malformed =
            |e: safetensors::SafeTensorError| SafetensorsError::Malformed(e.to_string());
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(malformed)?;
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(malformed)?;
        let names = st.names();

        let spec = match expected {
            Some(spec) => {
                spec.validate().map_err(ModelError::from)?;
                if names.len() != spec.tensors.len() {
                    return Err(SafetensorsError::Mismatch(format!(
                        "file has {} tensors, the model has {}",
                        names.len(),
                        spec.tensors.len()
                    )));
                }
                for t in &spec.tensors {
                    let view = st.tensor(&t.name).map_err(|_| {
                        SafetensorsError::Mismatch(format!("tensor {:?} is missing", t.name))
                    })?;
                    let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
                    if shape != t.shape {
                        return Err(SafetensorsError::Mismatch(format!(
                            "tensor {:?} has shape {shape:?}, the model expects {:?}",
                            t.name, t.shape
                        )));
                    }
                }
                spec.clone()
            }
            None => {
                let stored: Option<Vec<String>> = meta
                    .metadata()
                    .as_ref()
                    .and_then(|m| m.get(SAFETENSORS_ORDER_KEY))
                    .and_then(|s| serde_json::from_str(s).ok());
                let order = match stored {
                    Some(order)
                        if order.len() == names.len()
                            && order.iter().all(|n| names.contains(&n.as_str())) =>
                    {
                        order
                    }
                    _ => meta.offset_keys(),
                };
                let mut tensors = Vec::with_capacity(order.len());
                for name in order {
                    let view = st.tensor(&name).map_err(malformed)?;
                    let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
                    tensors.push(TensorSpec { name, shape });
                }
                ModelSpec::new(tensors).map_err(ModelError::from)?
            }
        };

        let mut values = Vec::with_capacity(spec.num_values());
        for t in &spec.tensors {
            let view = st.tensor(&t.name).map_err(malformed)?;
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(SafetensorsError::Dtype {
                    name: t.name.clone(),
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            values.extend(
                view.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(FlatModel::new(spec, values)?)
    }
}

#[cfg(test)]
mod safetensors_tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_and_checks() {
        let spec = ModelSpec::new(vec![
            TensorSpec::new("z.weight", &[2, 3]),
            TensorSpec::new("a.bias", &[3]),
        ])
        .expect("valid");
        let values: Vec<f32> = (0..9).map(|i| i as f32 - 4.5).collect();
        let m = FlatModel::new(spec.clone(), values).expect("valid");
        let bytes = m.to_safetensors_bytes().expect("writes");
        // Order survives without a spec (safetensors itself sorts by name).
        assert_eq!(
            FlatModel::from_safetensors_bytes(&bytes, None),
            Ok(m.clone())
        );
        assert_eq!(
            FlatModel::from_safetensors_bytes(&bytes, Some(&spec)),
            Ok(m.clone())
        );
        let other = ModelSpec::new(vec![
            TensorSpec::new("z.weight", &[3, 2]),
            TensorSpec::new("a.bias", &[3]),
        ])
        .expect("valid");
        let e = FlatModel::from_safetensors_bytes(&bytes, Some(&other)).expect_err("shape");
        assert!(
            e.to_string().contains("\"z.weight\" has shape [2, 3]"),
            "{e}"
        );
        let fewer = ModelSpec::new(vec![TensorSpec::new("a.bias", &[3])]).expect("valid");
        assert!(matches!(
            FlatModel::from_safetensors_bytes(&bytes, Some(&fewer)),
            Err(SafetensorsError::Mismatch(_))
        ));
        let renamed = ModelSpec::new(vec![
            TensorSpec::new("z.weight", &[2, 3]),
            TensorSpec::new("b.bias", &[3]),
        ])
        .expect("valid");
        let e = FlatModel::from_safetensors_bytes(&bytes, Some(&renamed)).expect_err("name");
        assert!(e.to_string().contains("\"b.bias\" is missing"), "{e}");
        for cut in [0, 7, 8, bytes.len() - 1] {
            assert!(FlatModel::from_safetensors_bytes(&bytes[..cut], None).is_err());
        }
    }

    #[test]
    fn safetensors_refuses_other_dtypes_and_nan() {
        let data = [0u8; 4];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![2], &data)
            .expect("view");
        let bytes = safetensors::serialize([("w", view)], None).expect("writes");
        assert!(matches!(
            FlatModel::from_safetensors_bytes(&bytes, None),
            Err(SafetensorsError::Dtype { .. })
        ));
        let nan = f32::NAN.to_le_bytes();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &nan)
            .expect("view");
        let bytes = safetensors::serialize([("w", view)], None).expect("writes");
        assert!(matches!(
            FlatModel::from_safetensors_bytes(&bytes, None),
            Err(SafetensorsError::Model(ModelError::NonFinite { index: 0 }))
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_limits_are_enforced() {
        let ok = ModelSpec::new(vec![
            TensorSpec::new("w", &[3, 2]),
            TensorSpec::new("b", &[2]),
        ]);
        assert_eq!(ok.expect("valid").num_values(), 8);
        let dup = ModelSpec::new(vec![TensorSpec::new("w", &[1]), TensorSpec::new("w", &[1])]);
        assert!(matches!(dup, Err(SpecError::DuplicateName(_))));
        let huge = ModelSpec::new(vec![TensorSpec::new("w", &[u64::MAX, 2])]);
        assert_eq!(huge, Err(SpecError::TooLarge));
        let big = ModelSpec::new(vec![TensorSpec::new("w", &[1 << 20, 1 << 12])]);
        assert_eq!(big, Err(SpecError::TooLarge));
        assert_eq!(ModelSpec::new(vec![]), Err(SpecError::Empty));
    }

    #[test]
    fn flat_model_rejects_wrong_length_and_nan() {
        let spec = ModelSpec::new(vec![TensorSpec::new("w", &[2])]).expect("valid");
        assert!(matches!(
            FlatModel::new(spec.clone(), vec![1.0]),
            Err(ModelError::Length {
                expected: 2,
                got: 1
            })
        ));
        assert_eq!(
            FlatModel::new(spec.clone(), vec![1.0, f32::NAN]),
            Err(ModelError::NonFinite { index: 1 })
        );
        let m = FlatModel::new(spec, vec![3.0, 4.0]).expect("valid");
        assert!((l2_norm(&m.values) - 5.0).abs() < 1e-12);
        assert_eq!(m.tensor("w"), Some(&[3.0f32, 4.0][..]));
    }

    #[test]
    fn sum_squares_is_the_in_order_sum_up_to_rounding() {
        let in_order = |v: &[f32]| v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
        // Every remainder length, and a long vector of mixed magnitudes.
        let long: Vec<f32> = (0..100_003)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5 + (i % 13) as f32 * 10.0)
            .collect();
        for n in (0..40).chain([long.len()]) {
            let v = &long[..n];
            let (got, want) = (sum_squares(v), in_order(v));
            // Each order's error is at most n * eps of the sum (squares are never negative).
            let bound = want * 2.0 * n as f64 * f64::EPSILON;
            assert!((got - want).abs() <= bound, "n {n}: {got} vs {want}");
        }
        // Exactly representable squares: exact.
        assert_eq!(sum_squares(&[3.0; 9]), 81.0);
        assert!(sum_squares(&[1.0, f32::NAN, 2.0]).is_nan());
        assert_eq!(sum_squares(&[1.0, f32::INFINITY]), f64::INFINITY);
        assert_eq!(sum_squares(&[]), 0.0);
    }
}
