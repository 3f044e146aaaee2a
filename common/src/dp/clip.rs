//! L2 clipping of flat vectors and of batches of per-example gradients.
//!
//! The pre-clip norms are returned for aggregate metrics (fraction clipped, mean norm); they
//! describe individual records and must never be logged one by one.

use super::ClipNorm;
use crate::model::l2_norm;

/// What clipping did to one vector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clipped {
    /// L2 norm before clipping.
    pub pre_norm: f64,
    /// Whether the vector was scaled down.
    pub scaled: bool,
}

/// Scales `values` in place so that its L2 norm is at most `clip`.
pub fn clip_l2(values: &mut [f32], clip: ClipNorm) -> Clipped {
    let norm = l2_norm(values);
    match clip_factor(norm, clip) {
        Some(factor) => {
            scale(values, factor);
            Clipped {
                pre_norm: norm,
                scaled: true,
            }
        }
        None => Clipped {
            pre_norm: norm,
            scaled: false,
        },
    }
}

/// The factor [`clip_l2`] scales a vector of L2 norm `norm` by, or `None` when it is
/// within the bound. For callers that know the norm without holding the whole vector (a
/// vector produced and sent piece by piece): scaling every piece with [`scale`] gives
/// exactly what `clip_l2` gives on the whole.
pub fn clip_factor(norm: f64, clip: ClipNorm) -> Option<f64> {
    let c = clip.get();
    // Round the factor down so that float rounding cannot leave the norm above C.
    (norm > c).then(|| (c / norm) * (1.0 - 1e-6))
}

/// Multiplies every value by `factor` in f64, rounding once to f32.
pub fn scale(values: &mut [f32], factor: f64) {
    for v in values.iter_mut() {
        *v = (f64::from(*v) * factor) as f32;
    }
}

/// Clips each row of a row-major `rows x dim` batch; returns each row's pre-clip norm.
pub fn clip_rows(batch: &mut [f32], dim: usize, clip: ClipNorm) -> Vec<f64> {
    assert!(
        dim > 0 && batch.len().is_multiple_of(dim),
        "batch is not a whole number of rows"
    );
    batch
        .chunks_mut(dim)
        .map(|row| clip_l2(row, clip).pre_norm)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_bounds_the_norm_and_keeps_direction() {
        let c = ClipNorm::new(1.0).expect("valid");
        let mut v = vec![3.0f32, 4.0];
        let out = clip_l2(&mut v, c);
        assert!(out.scaled && (out.pre_norm - 5.0).abs() < 1e-12);
        assert!(l2_norm(&v) <= 1.0);
        assert!((v[0] / v[1] - 0.75).abs() < 1e-6);
        let mut small = vec![0.3f32, 0.4];
        assert!(!clip_l2(&mut small, c).scaled);
        assert_eq!(small, vec![0.3, 0.4]);
    }

    #[test]
    fn rows_are_clipped_independently() {
        let c = ClipNorm::new(2.0).expect("valid");
        let mut batch = vec![6.0f32, 8.0, 0.6, 0.8, 0.0, 0.0];
        let norms = clip_rows(&mut batch, 2, c);
        assert_eq!(norms.len(), 3);
        assert!(l2_norm(&batch[0..2]) <= 2.0 && l2_norm(&batch[0..2]) > 1.99);
        assert_eq!(&batch[2..4], &[0.6, 0.8]);
        assert_eq!(&batch[4..6], &[0.0, 0.0]);
    }

    #[test]
    fn piecewise_scaling_equals_clipping_the_whole() {
        let c = ClipNorm::new(0.5).expect("valid");
        let whole: Vec<f32> = (0..10_007)
            .map(|i| ((i % 13) as f32 - 6.0) * 1e-2)
            .collect();
        let mut clipped = whole.clone();
        let out = clip_l2(&mut clipped, c);
        let factor = clip_factor(l2_norm(&whole), c).expect("over the bound");
        let mut pieces = whole.clone();
        for piece in pieces.chunks_mut(1000) {
            scale(piece, factor);
        }
        assert!(out.scaled);
        assert_eq!(pieces, clipped);
        assert_eq!(clip_factor(0.4, c), None);
    }

    #[test]
    fn huge_vectors_clip_below_the_bound() {
        let c = ClipNorm::new(0.1).expect("valid");
        let mut v: Vec<f32> = (0..100_000)
            .map(|i| ((i % 17) as f32 - 8.0) * 1e3)
            .collect();
        clip_l2(&mut v, c);
        assert!(l2_norm(&v) <= 0.1);
    }
}
