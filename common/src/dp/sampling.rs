//! Poisson sampling: every record joins a batch independently with probability q. This is
//! the sampling the accountants assume; a shuffled fixed-size batch would not match them.

use rand::Rng;

/// Indices (in order) of the records that join this batch.
pub fn poisson_sample<R: Rng>(n: usize, q: f64, rng: &mut R) -> Vec<usize> {
    (0..n).filter(|_| rng.random::<f64>() < q).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn batch_sizes_follow_the_binomial() {
        let (n, q, draws) = (500usize, 0.1f64, 4000usize);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
        let sizes: Vec<f64> = (0..draws)
            .map(|_| poisson_sample(n, q, &mut rng).len() as f64)
            .collect();
        let mean = sizes.iter().sum::<f64>() / draws as f64;
        let var = sizes.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (draws - 1) as f64;
        let (bm, bv) = (n as f64 * q, n as f64 * q * (1.0 - q));
        assert!(
            (mean - bm).abs() < 5.0 * (bv / draws as f64).sqrt(),
            "mean {mean} vs {bm}"
        );
        // Sample variance of draws has std about bv * sqrt(2 / draws).
        assert!(
            (var - bv).abs() < 5.0 * bv * (2.0 / draws as f64).sqrt(),
            "var {var} vs {bv}"
        );
        // A fixed-size batch would have zero variance: this test would catch it.
        assert!(var > 0.5 * bv);
    }

    #[test]
    fn extremes() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        assert_eq!(
            poisson_sample(10, 1.0, &mut rng),
            (0..10).collect::<Vec<_>>()
        );
        assert!(poisson_sample(10, 0.0, &mut rng).is_empty());
    }
}
