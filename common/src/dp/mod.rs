//! Differential privacy: validated parameters, clipping, secure Gaussian noise, Poisson
//! sampling and the privacy accountants.
//!
//! Everything here is pure computation. Parameters enter once through the newtypes below
//! (which refuse NaN, infinities and out-of-range values) and travel as types from then on.

pub mod accountant;
pub mod audit;
pub mod clip;
pub mod filter;
pub mod noise;
pub mod pld;
pub mod rdp;
pub mod sampling;
mod special;

use serde::{Deserialize, Serialize};

/// A privacy parameter outside its valid range. The operator's (or caller's) fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    #[error("{name} must be a finite number, got {value}")]
    NotFinite { name: &'static str, value: f64 },
    #[error("{name} must be {range}, got {value}")]
    OutOfRange {
        name: &'static str,
        range: &'static str,
        value: f64,
    },
}

macro_rules! bounded_f64 {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $range:literal, |$v:ident| $ok:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
        #[serde(try_from = "f64", into = "f64")]
        pub struct $ty(f64);

        impl $ty {
            pub fn new($v: f64) -> Result<Self, ParamError> {
                if !$v.is_finite() {
                    return Err(ParamError::NotFinite { name: $name, value: $v });
                }
                let within: bool = $ok;
                if !within {
                    return Err(ParamError::OutOfRange { name: $name, range: $range, value: $v });
                }
                Ok(Self($v))
            }

            pub fn get(self) -> f64 {
                self.0
            }
        }

        impl TryFrom<f64> for $ty {
            type Error = ParamError;
            fn try_from(v: f64) -> Result<Self, ParamError> {
                Self::new(v)
            }
        }

        impl From<$ty> for f64 {
            fn from(v: $ty) -> f64 {
                v.0
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

bounded_f64!(
    /// Privacy loss bound epsilon: finite and > 0.
    Epsilon, "epsilon", "greater than 0", |v| v > 0.0
);
bounded_f64!(
    /// Failure probability delta: strictly between 0 and 1.
    Delta, "delta", "strictly between 0 and 1", |v| v > 0.0 && v < 1.0
);
bounded_f64!(
    /// L2 clipping bound C: finite and > 0.
    ClipNorm, "clip norm", "greater than 0", |v| v > 0.0
);
bounded_f64!(
    /// Noise multiplier sigma (noise standard deviation divided by the sensitivity): > 0.
    NoiseMultiplier, "noise multiplier", "greater than 0", |v| v > 0.0
);
bounded_f64!(
    /// Poisson sampling rate q: in (0, 1].
    SampleRate, "sample rate", "in (0, 1]", |v| v > 0.0 && v <= 1.0
);

/// One Poisson-subsampled Gaussian mechanism (sampling rate q, noise multiplier sigma, for
/// sensitivity 1) applied `steps` times. This, not an epsilon, is what ledgers store.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SgmEvent {
    pub q: SampleRate,
    pub sigma: NoiseMultiplier,
    pub steps: u64,
}

impl SgmEvent {
    pub fn new(q: f64, sigma: f64, steps: u64) -> Result<Self, ParamError> {
        Ok(Self {
            q: SampleRate::new(q)?,
            sigma: NoiseMultiplier::new(sigma)?,
            steps,
        })
    }
}

/// Groups equal (q, sigma) pairs so that accountants compose each mechanism once.
pub(crate) fn grouped(events: &[SgmEvent]) -> Vec<SgmEvent> {
    let mut out: Vec<SgmEvent> = Vec::new();
    for e in events.iter().filter(|e| e.steps > 0) {
        match out.iter_mut().find(|g| {
            g.q.get().to_bits() == e.q.get().to_bits()
                && g.sigma.get().to_bits() == e.sigma.get().to_bits()
        }) {
            Some(g) => g.steps = g.steps.saturating_add(e.steps),
            None => out.push(*e),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newtypes_refuse_bad_values() {
        assert!(Epsilon::new(0.0).is_err());
        assert!(Epsilon::new(f64::NAN).is_err());
        assert!(Epsilon::new(f64::INFINITY).is_err());
        assert!(Delta::new(1.0).is_err());
        assert!(Delta::new(0.0).is_err());
        assert!(SampleRate::new(1.0).is_ok());
        assert!(SampleRate::new(1.0001).is_err());
        assert!(SampleRate::new(0.0).is_err());
        assert!(NoiseMultiplier::new(-1.0).is_err());
        assert!(ClipNorm::new(0.5).is_ok());
        let d: Result<Delta, _> = serde_json::from_str("1.5");
        assert!(d.is_err());
        let d: Delta = serde_json::from_str("1e-5").expect("valid delta");
        assert!((d.get() - 1e-5).abs() < 1e-20);
    }

    #[test]
    fn grouping_merges_equal_mechanisms() {
        let a = SgmEvent::new(0.01, 1.0, 10).expect("valid");
        let b = SgmEvent::new(0.02, 1.0, 5).expect("valid");
        let g = grouped(&[a, b, a, SgmEvent::new(0.5, 1.0, 0).expect("valid")]);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].steps, 20);
        assert_eq!(g[1].steps, 5);
    }
}
