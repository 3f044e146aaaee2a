//! The tensor layout and the starting weights of each built-in architecture. Both sides
//! need them: the coordinator to create a study's first model and check updates against
//! it, the sites to train.

use crate::model::{Architecture, FlatModel, ModelError, ModelSpec, SpecError, TensorSpec};

/// The tensor layout of `arch` for this input width and number of outputs (1 for binary
/// classification and regression).
pub fn model_spec(
    arch: Architecture,
    n_features: usize,
    n_outputs: usize,
) -> Result<ModelSpec, SpecError> {
    if n_features == 0 || n_outputs == 0 {
        return Err(SpecError::Empty);
    }
    let (i, o) = (n_features as u64, n_outputs as u64);
    let tensors = match arch {
        Architecture::Mlp { hidden } => {
            let h = hidden as u64;
            vec![
                TensorSpec::new("hidden.weight", &[h, i]),
                TensorSpec::new("hidden.bias", &[h]),
                TensorSpec::new("out.weight", &[o, h]),
                TensorSpec::new("out.bias", &[o]),
            ]
        }
        Architecture::LogisticRegression | Architecture::LinearRegression => vec![
            TensorSpec::new("linear.weight", &[o, i]),
            TensorSpec::new("linear.bias", &[o]),
        ],
    };
    ModelSpec::new(tensors)
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

/// A fresh model. Logistic and linear regression start at zero (their loss is convex); the
/// MLP's weights are uniform in +-1/sqrt(fan_in) from `seed`, its biases zero.
pub fn init_model(
    arch: Architecture,
    n_features: usize,
    n_outputs: usize,
    seed: u64,
) -> Result<FlatModel, ModelError> {
    let spec = model_spec(arch, n_features, n_outputs)?;
    let mut values = vec![0f32; spec.num_values()];
    if let Architecture::Mlp { .. } = arch {
        let mut rng = SplitMix64(seed);
        for (name, shape, off, len) in spec.layout() {
            if name.ends_with(".weight") {
                let bound = 1.0 / (shape[1] as f64).sqrt();
                for v in &mut values[off..off + len] {
                    *v = ((rng.next_f64() * 2.0 - 1.0) * bound) as f32;
                }
            }
        }
    }
    FlatModel::new(spec, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_and_init() {
        let s = model_spec(Architecture::LogisticRegression, 30, 1).expect("spec");
        assert_eq!(s.num_values(), 31);
        let m = init_model(Architecture::Mlp { hidden: 8 }, 4, 1, 7).expect("model");
        assert_eq!(m.values.len(), 8 * 4 + 8 + 8 + 1);
        assert!(
            m.values[..32].iter().all(|v| v.abs() <= 0.5)
                && m.values[..32].iter().any(|v| *v != 0.0)
        );
        assert_eq!(
            m,
            init_model(Architecture::Mlp { hidden: 8 }, 4, 1, 7).expect("model")
        );
        assert!(model_spec(Architecture::LinearRegression, 0, 1).is_err());
    }
}
