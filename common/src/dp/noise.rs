//! Gaussian noise from a cryptographically secure generator.
//!
//! The generator is ChaCha20 keyed from the operating system. Every call draws a fresh key
//! from it and splits the vector into fixed chunks, each with its own ChaCha20 stream, so
//! the chunks can be filled on several cores and the output does not depend on how many.
//!
//! Floating-point attack (Mironov 2012): a Gaussian sample computed in floating point takes
//! only some values, and which ones can reveal the unnoised input from the low bits of the
//! output. The defence here has two layers, both always on:
//! 1. each noise value is the sum of four independent standard normal draws divided by two
//!    (the construction of Opacus' secure mode), so no single sampler output, with its
//!    telltale low-bit pattern, appears in the result;
//! 2. the sum and the addition to the value are computed in f64 (53-bit mantissa) and the
//!    result is rounded once to the f32 that is sent, so the output grid is far coarser than
//!    the noise's resolution and every output near a value is reachable from its neighbours.
//!
//! A deterministic generator exists only behind the `insecure-test-seed` cargo feature (and
//! in this crate's own tests); production builds cannot construct one.

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::StandardNormal;

/// Values per independently seeded stream; fixed so output is independent of thread count.
pub const CHUNK: usize = 1 << 16;

/// The operating system could not provide entropy. Ours (the environment's), not the peer's.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the operating system's random generator failed: {0}")]
pub struct NoiseError(String);

/// A cryptographically secure source of Gaussian noise.
pub struct NoiseSource {
    rng: ChaCha20Rng,
}

impl std::fmt::Debug for NoiseSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print generator state: it would let anyone recompute the noise.
        f.write_str("NoiseSource { .. }")
    }
}

/// One noise value with standard deviation 1: four draws summed, then halved.
#[inline]
fn secure_standard_normal<R: Rng>(rng: &mut R) -> f64 {
    let a: f64 = rng.sample(StandardNormal);
    let b: f64 = rng.sample(StandardNormal);
    let c: f64 = rng.sample(StandardNormal);
    let d: f64 = rng.sample(StandardNormal);
    (a + b + c + d) * 0.5
}

impl NoiseSource {
    /// Keyed from the operating system's generator.
    pub fn from_os() -> Result<Self, NoiseError> {
        ChaCha20Rng::try_from_os_rng()
            .map(|rng| Self { rng })
            .map_err(|e| NoiseError(e.to_string()))
    }

    /// A deterministic source for tests only. Never available in production builds.
    #[cfg(any(test, feature = "insecure-test-seed"))]
    pub fn insecure_from_seed(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }

    /// The underlying secure generator, for sampling decisions (Poisson batches, site
    /// selection) that must be as unpredictable as the noise.
    pub fn rng(&mut self) -> &mut ChaCha20Rng {
        &mut self.rng
    }

    /// Adds N(0, std^2) to every value, in place, using up to `threads` cores.
    pub fn add_gaussian(&mut self, values: &mut [f32], std: f64, threads: usize) {
        let mut key = [0u8; 32];
        self.rng.fill_bytes(&mut key);
        let fill = |index: usize, chunk: &mut [f32]| {
            let mut rng = ChaCha20Rng::from_seed(key);
            rng.set_stream(index as u64);
            for v in chunk.iter_mut() {
                *v = (f64::from(*v) + std * secure_standard_normal(&mut rng)) as f32;
            }
        };
        let chunks: Vec<(usize, &mut [f32])> = values.chunks_mut(CHUNK).enumerate().collect();
        let threads = threads.clamp(1, chunks.len().max(1));
        if threads == 1 {
            for (i, c) in chunks {
                fill(i, c);
            }
            return;
        }
        let mut lanes: Vec<Vec<(usize, &mut [f32])>> = (0..threads).map(|_| Vec::new()).collect();
        for (n, item) in chunks.into_iter().enumerate() {
            lanes[n % threads].push(item);
        }
        std::thread::scope(|s| {
            for lane in lanes {
                s.spawn(|| {
                    for (i, c) in lane {
                        fill(i, c);
                    }
                });
            }
        });
    }

    /// A fresh vector of N(0, std^2) values.
    pub fn gaussian(&mut self, n: usize, std: f64) -> Vec<f32> {
        let mut v = vec![0.0f32; n];
        self.add_gaussian(&mut v, std, 1);
        v
    }

    /// Raw generator throughput helper for benchmarks: fills `buf` with generator output.
    pub fn raw_fill(&mut self, buf: &mut [u8]) {
        self.rng.fill_bytes(buf);
    }
}

/// The machine's core count, for callers that want all of them.
pub fn available_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal_cdf(x: f64) -> f64 {
        0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
    }

    /// Kolmogorov-Smirnov distance between the sample and N(0, 1).
    fn ks_distance(sample: &mut [f64]) -> f64 {
        sample.sort_by(f64::total_cmp);
        let n = sample.len() as f64;
        sample
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = normal_cdf(x);
                (f - i as f64 / n).abs().max(((i + 1) as f64 / n - f).abs())
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn noise_is_standard_normal_scaled() {
        let n = 200_000;
        let std = 2.5;
        let mut src = NoiseSource::insecure_from_seed(7);
        let v = src.gaussian(n, std);
        let xs: Vec<f64> = v.iter().map(|&x| f64::from(x) / std).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
        // Mean: 5 standard errors. Variance of the sample variance is 2/n for a normal.
        assert!(mean.abs() < 5.0 / (n as f64).sqrt(), "mean {mean}");
        assert!(
            (var - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(),
            "variance {var}"
        );
        // KS critical value at alpha = 0.001 is 1.95 / sqrt(n).
        let mut sorted = xs.clone();
        let d = ks_distance(&mut sorted);
        assert!(d < 1.95 / (n as f64).sqrt(), "KS distance {d}");
    }

    #[test]
    fn ks_test_detects_a_wrong_variance() {
        // The KS threshold above must be able to fail: noise with std 1.05 fails it.
        let n = 200_000;
        let mut src = NoiseSource::insecure_from_seed(8);
        let mut xs: Vec<f64> = src
            .gaussian(n, 1.05)
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        assert!(ks_distance(&mut xs) > 1.95 / (n as f64).sqrt());
    }

    #[test]
    fn tail_frequencies_match_chi_square() {
        // Chi-square over 10 equiprobable bins of N(0,1); df = 9, 0.999 quantile 27.88.
        let n = 100_000;
        let mut src = NoiseSource::insecure_from_seed(9);
        let v = src.gaussian(n, 1.0);
        let mut counts = [0f64; 10];
        for &x in &v {
            let bin = ((normal_cdf(f64::from(x)) * 10.0) as usize).min(9);
            counts[bin] += 1.0;
        }
        let expected = n as f64 / 10.0;
        let chi2: f64 = counts
            .iter()
            .map(|c| (c - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 27.88, "chi-square {chi2}");
    }

    #[test]
    fn output_does_not_depend_on_thread_count() {
        let base: Vec<f32> = (0..(3 * CHUNK + 17)).map(|i| i as f32 * 1e-3).collect();
        let mut one = base.clone();
        let mut two = base.clone();
        NoiseSource::insecure_from_seed(3).add_gaussian(&mut one, 1.0, 1);
        NoiseSource::insecure_from_seed(3).add_gaussian(&mut two, 1.0, 2);
        assert_eq!(one, two);
        assert_ne!(one, base);
        // Successive calls use fresh keys.
        let mut src = NoiseSource::insecure_from_seed(3);
        assert_ne!(src.gaussian(8, 1.0), src.gaussian(8, 1.0));
    }

    #[test]
    fn os_seeded_sources_differ() {
        let a = NoiseSource::from_os().expect("os rng").gaussian(4, 1.0);
        let b = NoiseSource::from_os().expect("os rng").gaussian(4, 1.0);
        assert_ne!(a, b);
    }
}
