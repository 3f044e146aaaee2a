//! Gaussian noise from a cryptographically secure generator.
//!
//! The master generator is ChaCha20 keyed from the operating system. Every call draws a
//! fresh 256-bit key from it and splits the vector into fixed chunks, each with its own
//! keystream under that key, so the chunks can be filled on several cores and the output
//! does not depend on how many. The keystream ([`Generator`]) is AES-256 in counter mode
//! where the CPU has AES instructions, and ChaCha20 (the chunk index as its stream number)
//! elsewhere. The AES stream of a chunk is a sequence of messages of [`WORDS`] words, each
//! the counter-mode keystream E_K(nonce || 2), E_K(nonce || 3), ... under the nonce (chunk
//! index, message number). Two implementations give it, bit for bit the same (tested):
//! where the CPU has VAES with AVX-512, RustCrypto's `aes` encrypting the counter blocks
//! (it takes 512-bit VAES there); elsewhere, ring's AES-256-GCM over zeros, whose
//! ciphertext is exactly that keystream (the tag is discarded; ring uses 256-bit VAES or
//! AES-NI): `aes` measured faster on an Intel Xeon with AVX-512, ring on an AMD Zen 3
//! without it (docs/performance.md); the choice is by CPU feature. AES-CTR and ChaCha20
//! are stream ciphers used as the CSPRNGs they are: with a uniformly random key, their
//! output is indistinguishable from uniform bits without the key, and a key is used for one
//! call only, its nonces never repeated (a chunk reads a few hundred messages, 2 MiB).
//! AES-256-CTR under a fresh key per call is NIST's CTR_DRBG construction without its
//! reseeding bookkeeping. With AES instructions it is about three times faster than
//! ChaCha20's vectorised software; without them, software AES would be slower than
//! ChaCha20, hence the fallback. The output for a key is fixed per generator by known-answer
//! tests.
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
//! Each draw is `rand_distr`'s 256-layer ziggurat ([`StandardNormal`] in rand_distr 0.5),
//! re-implemented here over generator output taken in blocks: bit for bit the same values
//! from the same stream (the tests check it against rand_distr itself). A word's fast
//! result (its draw if it lies inside its layer's rectangle) depends on that word alone, so
//! it is worked out for a whole block of words in one branch-free pass, vectorised where
//! the CPU has AVX-512 or AVX2 (chosen at run time); the sampler then walks the block: in
//! about 94% of values all four draws are inside and the value is their sum; otherwise the
//! draws from the first that is not are finished one by one, in order, as rand_distr does.
//!
//! [`StandardNormal`]: https://docs.rs/rand_distr/0.5/rand_distr/struct.StandardNormal.html
//!
//! Fewer random bits per draw: not taken. A draw reads one 64-bit word and uses 60 of its
//! bits (8 for the layer, 52 for the uniform); the output distribution is a function of
//! exactly those bits, so a sampler reading 60-bit fields from the keystream would give the
//! same distribution with 6% less keystream. That saving is smaller than what cutting words
//! across boundaries costs here, so every draw still takes one word. Fewer than 60 bits
//! would change the distribution (the layer or the uniform's resolution).
//!
//! A deterministic generator exists only behind the `insecure-test-seed` cargo feature (and
//! in this crate's own tests); production builds cannot construct one.

use rand::{RngCore, SeedableRng};

/// The master generator, and the noise keystream where the CPU has no AES instructions.
/// ChaCha20 (20 rounds) on purpose: ChaCha12 (rand's `StdRng`) would be about a quarter
/// cheaper (docs/performance.md), at a smaller security margin.
type NoiseRng = rand_chacha::ChaCha20Rng;

/// Which keystream fills the noise's chunks. Both are cryptographically secure; they give
/// different (each fixed) outputs for the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generator {
    /// AES-256-CTR: the counter block is chunk index, message number, block number.
    Aes256Ctr,
    /// ChaCha20: the chunk index as its stream number.
    ChaCha20,
}

impl Generator {
    /// AES-256-CTR where the CPU has AES instructions, ChaCha20 elsewhere.
    pub fn detect() -> Self {
        if aes_instructions() {
            Self::Aes256Ctr
        } else {
            Self::ChaCha20
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aes256Ctr => "aes256-ctr",
            Self::ChaCha20 => "chacha20",
        }
    }

    /// Which code computes this keystream on this CPU (for benchmark records: the output
    /// is the same whichever it is).
    pub fn implementation(self) -> &'static str {
        match self {
            Self::Aes256Ctr => match AesImpl::detect() {
                AesImpl::CounterBlocks => "rustcrypto aes, 512-bit vaes, counter blocks",
                AesImpl::RingGcm => "ring aes-256-gcm over zeros",
            },
            Self::ChaCha20 => "rand_chacha chacha20",
        }
    }
}

mod keystream;
mod tables;

use keystream::{aes_instructions, AesImpl, Keystream};

/// Values per independently seeded stream; fixed so output is independent of thread count.
pub const CHUNK: usize = 1 << 16;

/// Generator words taken at once (8 KiB): the keystream and the fast pass work on whole
/// blocks, and fewer values straddle a block's end (which takes the slow path).
const WORDS: usize = 1024;

/// The operating system could not provide entropy. Ours (the environment's), not the peer's.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the operating system's random generator failed: {0}")]
pub struct NoiseError(String);

/// A cryptographically secure source of Gaussian noise.
pub struct NoiseSource {
    rng: NoiseRng,
    generator: Generator,
}

impl std::fmt::Debug for NoiseSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print generator state: it would let anyone recompute the noise.
        f.write_str("NoiseSource { .. }")
    }
}

/// One chunk's keystream, read a block of words at a time, in stream order.
///
/// With each block comes every word's fast ziggurat result, computed for the whole block in
/// one branch-free pass (a word's draw depends on that word alone, so it can be worked out
/// before the sampler knows whether it will read the word as a draw or as a wedge's or the
/// tail's uniform): the draw where it lies inside its layer's rectangle, NaN where not.
struct Words {
    stream: Keystream,
    buf: Aligned<[u64; WORDS]>,
    fast: Aligned<[f64; WORDS]>,
    pos: usize,
}

/// Cache-line aligned: the keystream's 32-byte stores and the fast pass's vector loads
/// never straddle two lines (a split access costs about twice as much).
#[repr(C, align(64))]
struct Aligned<T>(T);

impl Words {
    fn new(stream: Keystream) -> Self {
        Self {
            stream,
            buf: Aligned([0; WORDS]),
            fast: Aligned([0.0; WORDS]),
            pos: WORDS,
        }
    }

    #[inline]
    fn next(&mut self) -> u64 {
        if self.pos == WORDS {
            self.refill();
        }
        let w = self.buf.0[self.pos];
        self.pos += 1;
        w
    }

    #[inline(never)]
    fn refill(&mut self) {
        self.stream.fill(&mut self.buf.0[..]);
        // Compiled once per instruction set and chosen at run time (pulp): AVX-512 where
        // the CPU has it (its gathers and masked compares), else AVX2, four words at a time.
        let (fast, buf) = (&mut self.fast.0, &self.buf.0);
        pulp::Arch::new().dispatch(|| fast_pass(fast, buf));
        self.pos = 0;
    }

    /// The fast results of the next four words, if the block holds them.
    #[inline]
    fn peek4(&self) -> Option<&[f64; 4]> {
        self.fast.0.get(self.pos..self.pos + 4)?.try_into().ok()
    }
}

/// rand's conversions of a generator word to a float, reproduced exactly.
///
/// The top 52 bits as a value in [-1, 1) (the ziggurat's symmetric uniform; the low 8 bits
/// pick the layer).
#[inline(always)]
fn symmetric_unit(bits: u64) -> f64 {
    f64::from_bits((bits >> 12) | (1024u64 << 52)) - 3.0
}

/// rand's `Open01` for f64: (0, 1).
#[inline(always)]
fn open01(bits: u64) -> f64 {
    f64::from_bits((bits >> 12) | (1023u64 << 52)) - (1.0 - f64::EPSILON / 2.0)
}

/// rand's standard uniform f64: [0, 1) in steps of 2^-53.
#[inline(always)]
fn unit53(bits: u64) -> f64 {
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A draw where it lies inside its layer's rectangle (then it is the ziggurat's output as it
/// stands), NaN where it does not.
#[inline(always)]
fn ziggurat_fast_or_nan(bits: u64) -> f64 {
    let i = (bits & 0xff) as usize;
    let x = symmetric_unit(bits) * tables::ZIG_NORM_X[i];
    if x.abs() < tables::ZIG_NORM_X[i + 1] {
        x
    } else {
        f64::NAN
    }
}

/// Every word's [`ziggurat_fast_or_nan`], four lanes at a time for the vectoriser.
/// Element-wise arithmetic only (no fused operations), so every instruction set gives the
/// same bits.
#[inline(always)]
fn fast_pass(fast: &mut [f64], buf: &[u64]) {
    for (f, bits) in fast.chunks_exact_mut(4).zip(buf.chunks_exact(4)) {
        for k in 0..4 {
            f[k] = ziggurat_fast_or_nan(bits[k]);
        }
    }
}

/// One standard normal draw, the whole ziggurat: rand_distr's `StandardNormal` step for
/// step (layer, wedge, tail), taking words from `w` in the same order.
#[inline(never)]
fn ziggurat(w: &mut Words) -> f64 {
    let (x_tab, f_tab, r) = (&tables::ZIG_NORM_X, &tables::ZIG_NORM_F, tables::ZIG_NORM_R);
    loop {
        let bits = w.next();
        let i = (bits & 0xff) as usize;
        let u = symmetric_unit(bits);
        let x = u * x_tab[i];
        if x.abs() < x_tab[i + 1] {
            return x;
        }
        if i == 0 {
            // The tail beyond R (Marsaglia 1964).
            let mut tx = 1.0f64;
            let mut ty = 0.0f64;
            while -2.0 * ty < tx * tx {
                let a = open01(w.next());
                let b = open01(w.next());
                tx = a.ln() / r;
                ty = b.ln();
            }
            return if u < 0.0 { tx - r } else { r - tx };
        }
        if f_tab[i + 1] + (f_tab[i] - f_tab[i + 1]) * unit53(w.next()) < (-x * x / 2.0).exp() {
            return x;
        }
    }
}

/// One noise value with standard deviation 1: four draws summed (left to right, in f64),
/// then halved.
#[inline(always)]
fn secure_standard_normal(w: &mut Words) -> f64 {
    if let Some(f) = w.peek4() {
        // NaN marks a draw outside its rectangle, and NaN survives the sum: one branch for
        // the four tests, taken the same way 94% of the time.
        let sum = f[0] + f[1] + f[2] + f[3];
        if !sum.is_nan() {
            w.pos += 4;
            return sum * 0.5;
        }
    }
    finish_one_by_one(w)
}

/// Takes the four draws one by one, in the order rand_distr would consume the words: a word
/// whose draw lies inside its rectangle as it was worked out for the block, any other
/// through the whole ziggurat (which may read further words, and the next block).
#[inline(never)]
fn finish_one_by_one(w: &mut Words) -> f64 {
    let mut x = [0.0f64; 4];
    for slot in &mut x {
        *slot = match w.fast.0.get(w.pos) {
            Some(&f) if !f.is_nan() => {
                w.pos += 1;
                f
            }
            _ => ziggurat(w),
        };
    }
    (x[0] + x[1] + x[2] + x[3]) * 0.5
}

/// Adds `std` times secure standard normal noise to every value of one chunk, from the
/// chunk's own stream.
fn fill_chunk(generator: Generator, key: [u8; 32], index: usize, chunk: &mut [f32], std: f64) {
    let mut words = Words::new(Keystream::new(generator, key, index));
    for v in chunk.iter_mut() {
        *v = (f64::from(*v) + std * secure_standard_normal(&mut words)) as f32;
    }
}

/// [`fill_chunk`] for values kept in f64 (DP-SGD's working model): the noise is added in f64
/// and the caller rounds once, at the end.
fn fill_chunk_f64(generator: Generator, key: [u8; 32], index: usize, chunk: &mut [f64], std: f64) {
    let mut words = Words::new(Keystream::new(generator, key, index));
    for v in chunk.iter_mut() {
        *v += std * secure_standard_normal(&mut words);
    }
}

/// Runs `fill(chunk_index, chunk)` over `values` in [`CHUNK`]-sized chunks on up to
/// `threads` cores; the output does not depend on the number of threads.
fn fill_parallel<T: Send>(values: &mut [T], threads: usize, fill: impl Fn(usize, &mut [T]) + Sync) {
    let chunks: Vec<(usize, &mut [T])> = values.chunks_mut(CHUNK).enumerate().collect();
    let threads = threads.clamp(1, chunks.len().max(1));
    if threads == 1 {
        for (i, c) in chunks {
            fill(i, c);
        }
        return;
    }
    let mut lanes: Vec<Vec<(usize, &mut [T])>> = (0..threads).map(|_| Vec::new()).collect();
    for (n, item) in chunks.into_iter().enumerate() {
        lanes[n % threads].push(item);
    }
    let fill = &fill;
    std::thread::scope(|s| {
        for lane in lanes {
            s.spawn(move || {
                for (i, c) in lane {
                    fill(i, c);
                }
            });
        }
    });
}

impl NoiseSource {
    /// Keyed from the operating system's generator.
    pub fn from_os() -> Result<Self, NoiseError> {
        NoiseRng::try_from_os_rng()
            .map(|rng| Self {
                rng,
                generator: Generator::detect(),
            })
            .map_err(|e| NoiseError(e.to_string()))
    }

    /// A deterministic source for tests only. Never available in production builds.
    #[cfg(any(test, feature = "insecure-test-seed"))]
    pub fn insecure_from_seed(seed: u64) -> Self {
        Self {
            rng: NoiseRng::seed_from_u64(seed),
            generator: Generator::detect(),
        }
    }

    /// The keystream this source fills chunks with.
    pub fn generator(&self) -> Generator {
        self.generator
    }

    /// Fills chunks with the other secure keystream (benches, known-answer tests, and
    /// machines whose AES instructions are known to be unusable). Either is secure.
    pub fn with_generator(mut self, generator: Generator) -> Self {
        self.generator = generator;
        self
    }

    /// The underlying secure generator, for sampling decisions (Poisson batches, site
    /// selection) that must be as unpredictable as the noise.
    pub fn rng(&mut self) -> &mut NoiseRng {
        &mut self.rng
    }

    /// Adds N(0, std^2) to every value, in place, using up to `threads` cores.
    pub fn add_gaussian(&mut self, values: &mut [f32], std: f64, threads: usize) {
        let mut key = [0u8; 32];
        self.rng.fill_bytes(&mut key);
        let g = self.generator;
        fill_parallel(values, threads, |i, c| fill_chunk(g, key, i, c, std));
    }

    /// [`Self::add_gaussian`] on f64 values: nothing is rounded to f32 here, so a caller that
    /// keeps working in f64 rounds once, when it releases the result.
    pub fn add_gaussian_f64(&mut self, values: &mut [f64], std: f64, threads: usize) {
        let mut key = [0u8; 32];
        self.rng.fill_bytes(&mut key);
        let g = self.generator;
        fill_parallel(values, threads, |i, c| fill_chunk_f64(g, key, i, c, std));
    }

    /// A fresh vector of N(0, std^2) values, filled on every core when it spans several
    /// chunks.
    pub fn gaussian(&mut self, n: usize, std: f64) -> Vec<f32> {
        let mut v = vec![0.0f32; n];
        self.add_gaussian(&mut v, std, available_threads());
        v
    }

    /// Raw generator throughput helper for benchmarks: fills `buf` with the master
    /// generator's (ChaCha20) output.
    pub fn raw_fill(&mut self, buf: &mut [u8]) {
        self.rng.fill_bytes(buf);
    }

    /// Raw keystream throughput helper for benchmarks: fills `buf` with one chunk's
    /// keystream of this source's generator under a fresh key.
    pub fn raw_keystream(&mut self, buf: &mut [u64]) {
        let mut key = [0u8; 32];
        self.rng.fill_bytes(&mut key);
        // In the sampler's block size, as the sampler reads it.
        let mut stream = Keystream::new(self.generator, key, 0);
        buf.chunks_mut(WORDS).for_each(|c| stream.fill(c));
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
    use rand::Rng;

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

    const BOTH: [Generator; 2] = [Generator::Aes256Ctr, Generator::ChaCha20];

    fn source(seed: u64, g: Generator) -> NoiseSource {
        NoiseSource::insecure_from_seed(seed).with_generator(g)
    }

    #[test]
    fn noise_is_standard_normal_scaled() {
        for g in BOTH {
            let n = 200_000;
            let std = 2.5;
            let v = source(7, g).gaussian(n, std);
            let xs: Vec<f64> = v.iter().map(|&x| f64::from(x) / std).collect();
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
            // Mean: 5 standard errors. Variance of the sample variance is 2/n for a normal.
            assert!(mean.abs() < 5.0 / (n as f64).sqrt(), "{g:?}: mean {mean}");
            assert!(
                (var - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(),
                "{g:?}: variance {var}"
            );
            // KS critical value at alpha = 0.001 is 1.95 / sqrt(n).
            let mut sorted = xs.clone();
            let d = ks_distance(&mut sorted);
            assert!(d < 1.95 / (n as f64).sqrt(), "{g:?}: KS distance {d}");
        }
    }

    #[test]
    fn ks_test_detects_a_wrong_variance() {
        // The KS threshold above must be able to fail: noise with std 1.05 fails it.
        for g in BOTH {
            let n = 200_000;
            let mut xs: Vec<f64> = source(8, g)
                .gaussian(n, 1.05)
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            assert!(ks_distance(&mut xs) > 1.95 / (n as f64).sqrt(), "{g:?}");
        }
    }

    #[test]
    fn tail_frequencies_match_chi_square() {
        // Chi-square over 10 equiprobable bins of N(0,1); df = 9, 0.999 quantile 27.88.
        for g in BOTH {
            let n = 100_000;
            let v = source(9, g).gaussian(n, 1.0);
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
            assert!(chi2 < 27.88, "{g:?}: chi-square {chi2}");
        }
    }

    /// A chunk's keystream read word by word through rand's generator interface, for
    /// rand_distr's own sampler (taken from the stream in the sampler's [`WORDS`]-long
    /// messages, which is how the AES stream is defined).
    struct WordByWord(Keystream, Box<[u64; WORDS]>, usize);

    impl WordByWord {
        fn new(stream: Keystream) -> Self {
            Self(stream, Box::new([0; WORDS]), WORDS)
        }
    }

    impl RngCore for WordByWord {
        fn next_u32(&mut self) -> u32 {
            self.next_u64() as u32
        }
        fn next_u64(&mut self) -> u64 {
            if self.2 == WORDS {
                self.0.fill(&mut self.1[..]);
                self.2 = 0;
            }
            self.2 += 1;
            self.1[self.2 - 1]
        }
        fn fill_bytes(&mut self, dst: &mut [u8]) {
            for c in dst.chunks_mut(8) {
                c.copy_from_slice(&self.next_u64().to_le_bytes()[..c.len()]);
            }
        }
    }

    /// This file's sampler before block-wise generation: rand_distr's own ziggurat reading
    /// the chunk's stream word by word.
    fn reference_chunk(g: Generator, key: [u8; 32], index: usize, chunk: &mut [f32], std: f64) {
        use rand_distr::StandardNormal;
        let mut rng = WordByWord::new(Keystream::new(g, key, index));
        for v in chunk.iter_mut() {
            let a: f64 = rng.sample(StandardNormal);
            let b: f64 = rng.sample(StandardNormal);
            let c: f64 = rng.sample(StandardNormal);
            let d: f64 = rng.sample(StandardNormal);
            *v = (f64::from(*v) + std * ((a + b + c + d) * 0.5)) as f32;
        }
    }

    #[test]
    fn the_fast_pass_is_the_same_on_every_instruction_set() {
        let mut words = vec![0u64; 4 * WORDS];
        Keystream::new(Generator::ChaCha20, [3; 32], 1).fill(&mut words);
        let (mut best, mut scalar) = (vec![0.0; words.len()], vec![0.0; words.len()]);
        pulp::Arch::new().dispatch(|| fast_pass(&mut best, &words));
        pulp::Simd::vectorize(pulp::Scalar::new(), || fast_pass(&mut scalar, &words));
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&best), bits(&scalar));
        // Each x86 level this CPU has, whichever the dispatch picked (AVX-512 or AVX2).
        #[cfg(target_arch = "x86_64")]
        {
            let mut levels = 0;
            if let Some(v3) = pulp::x86::V3::try_new() {
                let mut out = vec![0.0; words.len()];
                pulp::Simd::vectorize(v3, || fast_pass(&mut out, &words));
                assert_eq!(bits(&out), bits(&scalar), "AVX2");
                levels += 1;
            }
            if let Some(v4) = pulp::x86::V4::try_new() {
                let mut out = vec![0.0; words.len()];
                pulp::Simd::vectorize(v4, || fast_pass(&mut out, &words));
                assert_eq!(bits(&out), bits(&scalar), "AVX-512");
                levels += 1;
            }
            eprintln!("x86 levels compared with the scalar pass: {levels}");
        }
        // Both kinds of word occur: inside (a draw) and outside (NaN) its rectangle.
        let outside = scalar.iter().filter(|x| x.is_nan()).count();
        assert!(outside > 10 && outside < words.len() / 20, "{outside}");
    }

    #[test]
    fn known_answers_fix_the_sampler_per_generator() {
        // The first noise values (std 1, on zeros) of chunk 3 under key [42; 32], as f32
        // bits. A change to the keystream, the sampler, the four-draw sum or the rounding
        // changes them.
        let want: [(Generator, [u32; 8]); 2] = [
            (Generator::Aes256Ctr, AES_KAT),
            (Generator::ChaCha20, CHACHA_KAT),
        ];
        for (g, want) in want {
            let mut got = [0.0f32; 8];
            fill_chunk(g, [42; 32], 3, &mut got, 1.0);
            let bits = got.map(f32::to_bits);
            assert_eq!(bits, want, "{g:?}: {got:?}");
        }
    }

    // The counter blocks are chunk || message || n from n = 2 (GCM's first keystream
    // block), the ones the earlier Ctr128BE stream had at block 2 onwards: these are its
    // values from the second on (the first message, before the stream's block-size matters).
    #[test]
    fn known_answers_reach_into_the_second_aes_message() {
        // Values 300..308 of chunk 3 under key [42; 32] read words past the first WORDS:
        // they fix the AES stream's message length as well as its first message.
        let mut got = [0.0f32; 308];
        fill_chunk(Generator::Aes256Ctr, [42; 32], 3, &mut got, 1.0);
        let bits: Vec<u32> = got[300..].iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits, AES_KAT_LATER, "{:?}", &got[300..]);
    }

    const AES_KAT_LATER: [u32; 8] = [
        1055802309, 3214789785, 1064252950, 3208832351, 3208249884, 3217649852, 3188974073,
        3208041777,
    ];

    const AES_KAT: [u32; 8] = [
        1063874185, 1066475339, 3221200616, 3198323542, 3196022155, 3215512096, 3193212148,
        3216757126,
    ];
    const CHACHA_KAT: [u32; 8] = [
        1074549551, 3207184111, 1048885984, 1074819859, 3219074635, 3196509947, 3208515823,
        1047548485,
    ];

    #[test]
    fn draws_equal_rand_distr_bit_for_bit() {
        // Single draws, every path: 2M draws take the wedge ~24,000 times and the tail
        // beyond R ~500 times.
        for g in BOTH {
            let mut rng = WordByWord::new(Keystream::new(g, [41; 32], 3));
            let mut words = Words::new(Keystream::new(g, [41; 32], 3));
            let mut tail = 0;
            for n in 0..2_000_000 {
                let want: f64 = rng.sample(rand_distr::StandardNormal);
                let got = ziggurat(&mut words);
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{g:?} draw {n}: {got} vs {want}"
                );
                tail += usize::from(got.abs() >= tables::ZIG_NORM_R);
            }
            assert!(
                tail > 100,
                "{g:?}: only {tail} tail draws: the tail path was barely tested"
            );
        }
    }

    #[test]
    fn noise_equals_the_word_by_word_sampler_bit_for_bit() {
        // Four-draw values through the fast path, the slow path, and the ends of blocks
        // reached mid-value; three chunks, each its own stream.
        for g in BOTH {
            for (index, std) in [(0usize, 1.0f64), (1, 0.37), (7, 12.5)] {
                let base: Vec<f32> = (0..CHUNK).map(|i| (i as f32 - 3e4) * 1e-4).collect();
                let (mut got, mut want) = (base.clone(), base);
                fill_chunk(g, [index as u8 + 9; 32], index, &mut got, std);
                reference_chunk(g, [index as u8 + 9; 32], index, &mut want, std);
                let differ = got
                    .iter()
                    .zip(&want)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(differ, 0, "{g:?} chunk {index}: {differ} values differ");
            }
        }
    }

    #[test]
    fn output_does_not_depend_on_thread_count() {
        for g in BOTH {
            let base: Vec<f32> = (0..(3 * CHUNK + 17)).map(|i| i as f32 * 1e-3).collect();
            let mut one = base.clone();
            let mut two = base.clone();
            source(3, g).add_gaussian(&mut one, 1.0, 1);
            source(3, g).add_gaussian(&mut two, 1.0, 2);
            assert_eq!(one, two);
            assert_ne!(one, base);
            // Successive calls use fresh keys.
            let mut src = source(3, g);
            assert_ne!(src.gaussian(8, 1.0), src.gaussian(8, 1.0));
        }
        // The two generators give different noise for the same key.
        assert_ne!(
            source(3, Generator::Aes256Ctr).gaussian(8, 1.0),
            source(3, Generator::ChaCha20).gaussian(8, 1.0)
        );
    }

    #[test]
    fn the_f64_path_is_the_f32_path_before_its_one_rounding() {
        for g in BOTH {
            let n = 2 * CHUNK + 5;
            let mut wide = vec![0.0f64; n];
            source(11, g).add_gaussian_f64(&mut wide, 0.7, 2);
            let mut narrow = vec![0.0f32; n];
            source(11, g).add_gaussian(&mut narrow, 0.7, 1);
            let rounded: Vec<f32> = wide.iter().map(|&v| v as f32).collect();
            assert_eq!(rounded, narrow, "{g:?}");
            // The f64 values keep bits the f32 output does not have.
            assert!(wide.iter().any(|&v| f64::from(v as f32) != v));
        }
    }

    #[test]
    fn os_seeded_sources_differ() {
        let a = NoiseSource::from_os().expect("os rng").gaussian(4, 1.0);
        let b = NoiseSource::from_os().expect("os rng").gaussian(4, 1.0);
        assert_ne!(a, b);
    }

    #[test]
    fn the_generator_follows_the_cpu() {
        let g = NoiseSource::from_os().expect("os rng").generator();
        assert_eq!(g, Generator::detect());
        assert_eq!(g == Generator::Aes256Ctr, aes_instructions());
    }
}
