//! Privacy loss distribution (PLD) accountant for the Poisson-subsampled Gaussian mechanism.
//!
//! **Discretisation.** Each mechanism's privacy loss is discretised on a grid of spacing
//! `interval` with the pessimistic "connect the dots" construction (Doroshenko, Ghazi,
//! Kamath, Kumar, Manurangsi, 2022): the mass between two grid points is split between them
//! so that the discrete pair's hockey-stick curve equals the true one at every grid point
//! and lies above it in between. Mass below the grid is rounded up to its lowest point, mass
//! above it goes to +infinity, so the discrete pair dominates the true one and every figure
//! here is an upper bound on the true epsilon.
//!
//! **Both directions from one grid.** Adjacency is add-or-remove one record: both directions
//! are composed and the larger epsilon is reported, as `dp_accounting`'s `PLDAccountant`
//! does. Only the remove pair (P = the mixture, Q = the plain Gaussian) is discretised; the
//! add pair is the same two distributions swapped, so its discrete loss distribution is the
//! remove grid mirrored, each atom carrying its Q-mass (P-mass times e^-loss, which the
//! construction keeps exactly). A discrete pair that dominates the remove pair at every
//! epsilon, negative ones included, dominates it as a pair (Blackwell), so the swapped
//! discrete pair dominates the add pair: one set of normal tail evaluations serves both
//! directions. Q-mass the grid does not hold (beyond its top, or lost by rounding the
//! bottom up) is put where P has none, i.e. at +infinity for the add direction.
//!
//! **Composition** is a product in the Fourier domain, per direction, over a window chosen by
//! Chernoff bounds on the composed loss (the exact log-moment-generating function of each
//! discrete pmf, evaluated by Horner's rule, minimised over lambda by golden section). What
//! the window leaves out above is added to the mass at infinity, i.e. to delta; what it
//! leaves out below only matters when the answer falls below the window, where it is rounded
//! up into the lowest point. Mass outside the window that the circular convolution folds
//! back into it only adds mass, which can only raise the figure.
//!
//! **Memory is bounded** whatever the step count: no FFT is longer than [`MAX_FFT_LEN`]
//! points and no single-mechanism grid longer than that either. When the composed loss
//! needs a longer window at the requested spacing, the spacing is doubled until it fits: a
//! coarser grid is still pessimistic (its dots are a subset of the finer grid's, and the
//! privacy curve is convex in e^epsilon), so the figure stays an upper bound and is never
//! below the fine-grid one (tested). The whole computation holds about
//! `40 * MAX_FFT_LEN` bytes at most (tested through the process's peak memory).
//!
//! **Inverse questions** ([`max_steps`], and the noise calibration in
//! `accountant`) reuse one mechanism's spectrum across step counts and search with
//! safeguarded interpolation, so a question costs a handful of inverse FFTs.
//!
//! What this module does not do: other mechanisms than the sampled Gaussian, or
//! substitution adjacency (callers price replace-one as sigma / 2 themselves).

use std::cell::RefCell;
use std::sync::Arc;

use realfft::num_complex::Complex64;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};

use super::special::erfc;
use super::{grouped, SgmEvent};
use crate::dp::accountant::AccountError;

/// Default grid spacing of the privacy loss, as in `dp_accounting`'s PLD accountant.
pub const DEFAULT_INTERVAL: f64 = 1e-4;
/// Largest probability mass that may be pushed off either end of a single mechanism's grid
/// (less when the step count is so large that it would add up to a noticeable part of
/// delta: see [`step_tail`]).
const TAIL_MASS: f64 = 1e-15;
/// Bound on what the composition window may leave out on either side.
const WINDOW_TAIL: f64 = 1e-14;
/// Longest FFT and longest single-mechanism grid, in points. This is what bounds memory:
/// a composition holds a few buffers of this many f64 (see the module doc).
pub const MAX_FFT_LEN: usize = 1 << 19;
/// Coarsening steps tried before giving up (2^40 times the starting spacing).
const MAX_COARSENINGS: u32 = 40;

/// Large buffers kept between calls. The accountant's own arithmetic is a few milliseconds;
/// without this, a third of that went to the kernel handing out and zeroing fresh pages for
/// the same few buffers on every call. What is kept is capped ([`SPARE_BYTES`]), so the
/// memory bound holds with it.
mod spare {
    use std::ops::{Deref, DerefMut};
    use std::sync::{Mutex, MutexGuard};

    use realfft::num_complex::Complex64;

    /// Most bytes kept for reuse.
    pub(super) const SPARE_BYTES: usize = 16 << 20;
    /// Largest buffer kept: those of FFTs up to 2^18 points, where fresh pages cost the most
    /// relative to the work. Larger ones are rare and go back to the allocator.
    const LARGEST: usize = 2 << 20;

    struct Kept {
        reals: Vec<Vec<f64>>,
        spectra: Vec<Vec<Complex64>>,
        bytes: usize,
    }

    static KEPT: Mutex<Kept> = Mutex::new(Kept {
        reals: Vec::new(),
        spectra: Vec::new(),
        bytes: 0,
    });

    fn kept() -> MutexGuard<'static, Kept> {
        // A panic elsewhere cannot leave the lists inconsistent: every change is one push,
        // one remove, or one addition.
        KEPT.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The smallest kept vector of at least `len`, or a new one; `len` long, its contents
    /// unspecified (zero, or what an earlier user left) unless `zeroed`.
    fn take<T: Copy + Default>(
        list: impl FnOnce(&mut Kept) -> &mut Vec<Vec<T>>,
        len: usize,
        zeroed: bool,
    ) -> Vec<T> {
        let mut k = kept();
        let l = list(&mut k);
        let best = l
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        let Some(i) = best else {
            drop(k);
            return vec![T::default(); len];
        };
        let mut v = l.swap_remove(i);
        k.bytes -= v.capacity() * std::mem::size_of::<T>();
        drop(k);
        if zeroed {
            v.clear();
        }
        v.resize(len, T::default());
        v.truncate(len);
        v
    }

    fn give<T>(list: impl FnOnce(&mut Kept) -> &mut Vec<Vec<T>>, v: Vec<T>) {
        let size = v.capacity() * std::mem::size_of::<T>();
        if !(1 << 16..=LARGEST).contains(&size) {
            return;
        }
        let mut k = kept();
        if k.bytes + size <= SPARE_BYTES {
            k.bytes += size;
            list(&mut k).push(v);
        }
    }

    /// A vector of f64 that returns to the spare list when dropped.
    #[derive(Debug, Default)]
    pub(super) struct Reals(Vec<f64>);

    impl Reals {
        /// Contents unspecified: for buffers that are written before they are read.
        pub(super) fn any(len: usize) -> Self {
            Self(take(|k| &mut k.reals, len, false))
        }
    }

    impl Clone for Reals {
        fn clone(&self) -> Self {
            let mut c = Self::any(self.0.len());
            c.0.copy_from_slice(&self.0);
            c
        }
    }

    impl Drop for Reals {
        fn drop(&mut self) {
            give(|k| &mut k.reals, std::mem::take(&mut self.0));
        }
    }

    impl Deref for Reals {
        type Target = Vec<f64>;
        fn deref(&self) -> &Vec<f64> {
            &self.0
        }
    }

    impl DerefMut for Reals {
        fn deref_mut(&mut self) -> &mut Vec<f64> {
            &mut self.0
        }
    }

    /// A vector of complex values that returns to the spare list when dropped.
    #[derive(Debug, Default)]
    pub(super) struct Spectrum(Vec<Complex64>);

    impl Spectrum {
        /// Contents unspecified: for buffers that are written before they are read.
        pub(super) fn any(len: usize) -> Self {
            Self(take(|k| &mut k.spectra, len, false))
        }
    }

    impl Clone for Spectrum {
        fn clone(&self) -> Self {
            let mut c = Self::any(self.0.len());
            c.0.copy_from_slice(&self.0);
            c
        }
    }

    impl Drop for Spectrum {
        fn drop(&mut self) {
            give(|k| &mut k.spectra, std::mem::take(&mut self.0));
        }
    }

    impl Deref for Spectrum {
        type Target = Vec<Complex64>;
        fn deref(&self) -> &Vec<Complex64> {
            &self.0
        }
    }

    impl DerefMut for Spectrum {
        fn deref_mut(&mut self) -> &mut Vec<Complex64> {
            &mut self.0
        }
    }
}

use spare::{Reals, Spectrum};

fn norm_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

fn norm_cdf(z: f64) -> f64 {
    0.5 * erfc(-z / std::f64::consts::SQRT_2)
}

/// Both tails of the standard normal at z, each accurate to relative precision.
#[derive(Debug, Clone, Copy)]
struct Tail {
    z: f64,
    sf: f64,
    cdf: f64,
}

impl Tail {
    fn at(z: f64) -> Self {
        if z >= 0.0 {
            let sf = norm_sf(z);
            Self {
                z,
                sf,
                cdf: 1.0 - sf,
            }
        } else {
            let cdf = norm_cdf(z);
            Self {
                z,
                sf: 1.0 - cdf,
                cdf,
            }
        }
    }

    /// Mass in (a, b], from whichever tails keep precision.
    fn mass(a: &Tail, b: &Tail) -> f64 {
        if b.z <= a.z {
            0.0
        } else if a.z >= 0.0 {
            a.sf - b.sf
        } else if b.z <= 0.0 {
            b.cdf - a.cdf
        } else {
            1.0 - a.cdf - b.sf
        }
    }
}

/// A discrete privacy loss distribution of a dominating pair (upper P, lower Q): P-mass
/// `mass[i]` at loss `(offset + i) * interval`, and `infinity`, P-mass where Q has none.
#[derive(Debug, Clone)]
struct Pmf {
    offset: i64,
    mass: Reals,
    infinity: f64,
}

impl Pmf {
    fn top(&self) -> i64 {
        self.offset + self.mass.len() as i64 - 1
    }
}

/// The sampled Gaussian mechanism with sensitivity 1 and noise std `sigma`, as the remove
/// pair: P = (1-q) N(0, s^2) + q N(1, s^2), Q = N(0, s^2). The loss is increasing in the
/// output x.
#[derive(Debug, Clone, Copy)]
struct Sgm {
    q: f64,
    sigma: f64,
    /// Mass that may be pushed off either end of the grid.
    tail: f64,
}

/// One mechanism's discrete loss distributions in both directions.
#[derive(Debug, Clone)]
struct Pair {
    remove: Pmf,
    add: Pmf,
}

impl Sgm {
    /// Normal tails at the output whose loss is `eps`: (centred, shifted by 1).
    fn tails_at(&self, eps: f64) -> (Tail, Tail) {
        let p = self.point(eps);
        (p.centred, p.shifted)
    }

    /// (P-mass, Q-mass) of the outputs whose loss is at most `eps`.
    fn masses_below(&self, eps: f64) -> (f64, f64) {
        let (c, s) = self.tails_at(eps);
        ((1.0 - self.q) * c.cdf + self.q * s.cdf, c.cdf)
    }

    /// P-mass of the outputs whose loss is above `eps`.
    fn upper_mass_above(&self, eps: f64) -> f64 {
        let (c, s) = self.tails_at(eps);
        (1.0 - self.q) * c.sf + self.q * s.sf
    }

    /// Smallest and largest loss worth a grid point.
    fn loss_range(&self) -> (f64, f64) {
        let lo = if self.q < 1.0 {
            (-self.q).ln_1p()
        } else {
            search(|e| self.masses_below(e).0 <= self.tail, -1.0, false)
        };
        let hi = search(|e| self.upper_mass_above(e) <= self.tail, 1.0, true);
        (lo, hi)
    }

    /// Grid indices of the first and last point at this spacing.
    fn grid(&self, interval: f64) -> (i64, i64) {
        let (lo, hi) = self.loss_range();
        (
            (lo / interval).floor() as i64,
            (hi / interval).ceil() as i64,
        )
    }

    /// What the split needs at one grid point: the normal tails at its output and e^loss.
    #[inline]
    fn point(&self, loss: f64) -> Point {
        let s = self.sigma;
        let em1 = loss.exp_m1();
        let x = if self.q >= 1.0 {
            s * s * loss + 0.5
        } else {
            // e^loss - (1 - q), without the cancellation near the lowest loss.
            let t = em1 + self.q;
            if t > 0.0 {
                s * s * (t / self.q).ln() + 0.5
            } else {
                f64::NEG_INFINITY
            }
        };
        Point {
            centred: Tail::at(x / s),
            shifted: Tail::at((x - 1.0) / s),
            ratio: em1 + 1.0,
        }
    }

    /// The Q-mass of the outputs between two neighbouring points, split between them so that
    /// both distributions keep their mass (connect the dots): (to `a`, to `b`).
    #[inline]
    fn split(&self, a: &Point, b: &Point) -> (f64, f64) {
        let q = self.q;
        let centred = Tail::mass(&a.centred, &b.centred);
        let mixture = (1.0 - q) * centred + q * Tail::mass(&a.shifted, &b.shifted);
        let u = ((mixture - a.ratio * centred) / (b.ratio - a.ratio)).clamp(0.0, centred);
        (centred - u, u)
    }

    fn pair(&self, interval: f64, max_len: usize) -> Result<Pair, AccountError> {
        let (i0, i1) = self.grid(interval);
        let n = usize::try_from(i1 - i0 + 1).map_err(|_| AccountError::Numerical("PLD grid"))?;
        if n > max_len {
            return Err(AccountError::GridTooLarge);
        }
        let loss = |i: usize| (i0 + i as i64) as f64 * interval;
        // Per bin (i, i+1): its Q-mass split (to i, to i+1) and e^{L_i}. The normal tails are
        // the whole cost of the accountant's preparation; long grids are cut in one piece
        // per core, each piece starting with one point of its own.
        // Three values per point, side by side.
        let mut bins = Reals::any(3 * n);
        let fill = |start: usize, out: &mut [f64]| {
            let mut prev = self.point(loss(start));
            for (k, slot) in out.chunks_exact_mut(3).enumerate() {
                let i = start + k;
                if i + 1 == n {
                    slot.copy_from_slice(&[0.0, 0.0, prev.ratio]);
                    break;
                }
                let next = self.point(loss(i + 1));
                let (to_a, to_b) = self.split(&prev, &next);
                slot.copy_from_slice(&[to_a, to_b, prev.ratio]);
                prev = next;
            }
        };
        let threads = cores().min(n / 8192).max(1);
        if threads == 1 {
            fill(0, &mut bins);
        } else {
            let piece = n.div_ceil(threads);
            std::thread::scope(|scope| {
                for (k, out) in bins.chunks_mut(3 * piece).enumerate() {
                    let fill = &fill;
                    scope.spawn(move || fill(k * piece, out));
                }
            });
        }
        // Everything at or below the lowest point is rounded up to it: its P-mass moves up,
        // carrying the Q-mass that loss implies (less than it had; the rest is the deficit).
        let (p_below, q_below) = self.masses_below(loss(0));
        let mut qmass = Reals::any(n);
        let mut remove = Reals::any(n);
        let mut carry = p_below * (-loss(0)).exp();
        // The Q-mass the grid does not hold, from the tails themselves (one minus the sum
        // of 10^4 to 10^5 atoms would carry their rounding, and a billion steps multiply
        // it): above the top, and what rounding the bottom up gave away.
        let deficit = self.tails_at(loss(n - 1)).0.sf + (q_below - carry).max(0.0);
        for (i, bin) in bins.chunks_exact(3).enumerate() {
            let (to_a, to_b, ratio) = (bin[0], bin[1], bin[2]);
            qmass[i] = carry + to_a;
            remove[i] = ratio * qmass[i];
            carry = to_b;
        }
        drop(bins);
        let remove = Pmf {
            offset: i0,
            mass: remove,
            infinity: self.upper_mass_above(loss(n - 1)),
        };
        // The add pair is (Q, P): its loss is minus this one, each atom weighted by its
        // Q-mass; Q-mass the grid does not hold is where P has none, add-loss +infinity.
        qmass.reverse();
        let add = Pmf {
            offset: -i1,
            mass: qmass,
            infinity: deficit,
        };
        Ok(Pair { remove, add })
    }
}

/// Normal tails at one grid point's output, and e^loss there.
#[derive(Debug, Clone, Copy)]
struct Point {
    centred: Tail,
    shifted: Tail,
    ratio: f64,
}

/// Cores this process may use.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Finds where a monotone predicate flips, starting at `start` and stepping outwards
/// (`up`: towards +infinity).
fn search(done: impl Fn(f64) -> bool, start: f64, up: bool) -> f64 {
    let sign = if up { 1.0 } else { -1.0 };
    let mut step = 1.0;
    let mut far = start;
    while !done(far) && step < 1e9 {
        far = start + sign * step;
        step *= 2.0;
    }
    let mut near = start;
    for _ in 0..200 {
        let mid = 0.5 * (near + far);
        if done(mid) {
            far = mid;
        } else {
            near = mid;
        }
        if (far - near).abs() < 1e-9 {
            break;
        }
    }
    far
}

/// sum_i m[i] * r^i by Horner's rule from the far end, in four interleaved chains (the
/// dependency chain of one would make this the slowest loop of the accountant). Plain
/// multiply-add, not `mul_add`: without the `fma` target feature that is a library call.
fn horner(m: &[f64], r: f64) -> f64 {
    let r4 = r * r * r * r;
    let mut acc = [0.0f64; 4];
    let full = m.len() / 4 * 4;
    // Chains hold sum_j m[4j + l] r4^j over the complete groups, highest j first.
    for c in m[..full].chunks_exact(4).rev() {
        for l in 0..4 {
            acc[l] = acc[l] * r4 + c[l];
        }
    }
    let mut head = acc[0] + r * (acc[1] + r * (acc[2] + r * acc[3]));
    // The incomplete group at the end: r^full * sum_k m[full + k] r^k.
    let mut tail = 0.0f64;
    for &v in m[full..].iter().rev() {
        tail = tail * r + v;
    }
    if tail > 0.0 {
        head += tail * r.powi(i32::try_from(full).unwrap_or(i32::MAX));
    }
    head
}

/// An upper bound on ln sum_i m_i e^{lambda L_i} over the finite atoms (the natural log of
/// the pmf's moment-generating function, infinity excluded).
fn log_mgf(pmf: &Pmf, interval: f64, lambda: f64) -> f64 {
    let n = pmf.mass.len();
    // Horner's relative error on non-negative terms is below 2n ulps (plus the powers of r):
    // inflate by more than that so the bound stays a bound.
    let slack = (1.0 + 8.0 * (n as f64 + 8.0) * f64::EPSILON).ln();
    let (s, anchor) = if lambda >= 0.0 {
        // Terms shrink downwards from the top: r = e^{-lambda * interval} <= 1.
        (horner_rev(&pmf.mass, (-lambda * interval).exp()), pmf.top())
    } else {
        (horner(&pmf.mass, (lambda * interval).exp()), pmf.offset)
    };
    if s <= 0.0 {
        return f64::NEG_INFINITY;
    }
    s.ln() + slack + lambda * anchor as f64 * interval
}

/// sum_i m[i] * r^(n-1-i): [`horner`] over the reversed slice, without reversing it.
fn horner_rev(m: &[f64], r: f64) -> f64 {
    let r4 = r * r * r * r;
    let mut acc = [0.0f64; 4];
    let n = m.len();
    let full = n / 4 * 4;
    // Groups counted from the top: group j holds m[n-1-4j-l] for l = 0..4.
    let (rest, groups) = m.split_at(n - full);
    for c in groups.chunks_exact(4) {
        // Lowest group first: it ends up with the highest power of r4.
        for l in 0..4 {
            acc[l] = acc[l] * r4 + c[3 - l];
        }
    }
    let mut head = acc[0] + r * (acc[1] + r * (acc[2] + r * acc[3]));
    let mut tail = 0.0f64;
    for &v in rest {
        tail = tail * r + v;
    }
    if tail > 0.0 {
        head += tail * r.powi(i32::try_from(full).unwrap_or(i32::MAX));
    }
    head
}

/// Chernoff window [lo, hi] (grid indices) of the composed loss, holding all but `tail`
/// of its finite mass on either side.
fn window(parts: &[(&Pmf, u64)], interval: f64, tail: f64) -> (i64, i64) {
    let c = -tail.ln();
    // Where to look for lambda: the optimum for a normal loss of the composed variance.
    let var: f64 = parts
        .iter()
        .map(|(p, t)| *t as f64 * index_variance(p))
        .sum::<f64>()
        * interval
        * interval;
    let guess = if var > 0.0 {
        (2.0 * c / var).sqrt().clamp(1e-8, 1e8)
    } else {
        1e8
    };
    let total = |lambda: f64| -> f64 {
        parts
            .iter()
            .map(|(p, t)| *t as f64 * log_mgf(p, interval, lambda))
            .sum()
    };
    // P(S > a) <= exp(K(l) - l a) for l > 0: a = (K(l) + c) / l. The objective is
    // quasi-convex in l (its derivative's sign is that of l K'(l) - K(l) - c, increasing),
    // so a golden section over ln l finds its minimum; any l gives a valid bound.
    let upper = golden_min(|l| (total(l) + c) / l, guess);
    // P(S < a) <= exp(K(-l) + l a): a = -(K(-l) + c) / l, maximised.
    let lower = -golden_min(|l| (total(-l) + c) / l, guess);
    let full_lo: i64 = parts
        .iter()
        .map(|(p, t)| p.offset.saturating_mul(*t as i64))
        .fold(0i64, i64::saturating_add);
    let full_hi: i64 = parts
        .iter()
        .map(|(p, t)| p.top().saturating_mul(*t as i64))
        .fold(0i64, i64::saturating_add);
    let lo = ((lower / interval).floor() as i64).clamp(full_lo, full_hi);
    let hi = ((upper / interval).ceil() as i64).clamp(full_lo, full_hi);
    (lo, hi.max(lo))
}

/// Variance of a pmf's finite part, in grid units squared.
fn index_variance(p: &Pmf) -> f64 {
    let (mut m0, mut m1, mut m2) = (0.0f64, 0.0f64, 0.0f64);
    for (i, &m) in p.mass.iter().enumerate() {
        let x = i as f64;
        m0 += m;
        m1 += m * x;
        m2 += m * x * x;
    }
    if m0 <= 0.0 {
        return 0.0;
    }
    let mean = m1 / m0;
    (m2 / m0 - mean * mean).max(0.0)
}

/// Minimum of a quasi-convex f over l from guess / 33 to 4.5 guess, by golden section over
/// ln l, and the smallest value seen (every evaluation is a valid bound; a minimum outside
/// the range only makes the window wider than it could be).
fn golden_min(f: impl Fn(f64) -> f64, guess: f64) -> f64 {
    let g = |t: f64| {
        let v = f(t.exp());
        if v.is_nan() {
            f64::INFINITY
        } else {
            v
        }
    };
    let phi = 0.5 * (5f64.sqrt() - 1.0);
    let (mut a, mut b) = (guess.ln() - 3.5, guess.ln() + 1.5);
    let mut x1 = b - phi * (b - a);
    let mut x2 = a + phi * (b - a);
    let (mut f1, mut f2) = (g(x1), g(x2));
    let mut best = f1.min(f2);
    while b - a > 0.1 {
        if f1 <= f2 {
            b = x2;
            x2 = x1;
            f2 = f1;
            x1 = b - phi * (b - a);
            f1 = g(x1);
        } else {
            a = x1;
            x1 = x2;
            f1 = f2;
            x2 = a + phi * (b - a);
            f2 = g(x2);
        }
        best = best.min(f1).min(f2);
    }
    best
}

/// Smallest even length >= `n` of the form 2^a 3^b 5^c, which the FFT handles fast.
fn fast_len(n: usize) -> usize {
    let mut best = n.next_power_of_two().max(2);
    let mut p5 = 1usize;
    while p5 < best {
        let mut p35 = p5;
        while p35 < best {
            let mut len = p35 * 2;
            while len < n {
                len *= 2;
            }
            best = best.min(len);
            p35 *= 3;
        }
        p5 *= 5;
    }
    best
}

/// A forward and an inverse real FFT plan of one length.
#[derive(Clone)]
struct Plans {
    n: usize,
    forward: Arc<dyn RealToComplex<f64>>,
    inverse: Arc<dyn ComplexToReal<f64>>,
}

impl std::fmt::Debug for Plans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plans").field("n", &self.n).finish()
    }
}

thread_local! {
    /// The plans last built on this thread. Questions come in runs at one length (an inverse
    /// search, a ledger re-reading its events), and building plans (a sine and a cosine per
    /// twiddle factor) costs about as much as the transforms. One entry, so the memory it
    /// keeps is bounded by [`MAX_FFT_LEN`].
    static PLANS: RefCell<Option<Plans>> = const { RefCell::new(None) };
}

impl Plans {
    fn new(n: usize) -> Self {
        PLANS.with(|cell| {
            let mut cached = cell.borrow_mut();
            if let Some(p) = cached.as_ref().filter(|p| p.n == n) {
                return p.clone();
            }
            // Drop the old plans before building new ones: never two sets at once.
            *cached = None;
            let mut planner = RealFftPlanner::<f64>::new();
            let p = Self {
                n,
                forward: planner.plan_fft_forward(n),
                inverse: planner.plan_fft_inverse(n),
            };
            *cached = Some(p.clone());
            p
        })
    }
}

/// One composition's working memory at one FFT length: the real signal, the transforms'
/// scratch, and a spectrum to work in.
#[derive(Debug)]
struct Buffers {
    real: Reals,
    scratch: Spectrum,
    work: Spectrum,
}

impl Buffers {
    /// No buffers: what a direction keeps after handing its set to the next.
    fn empty() -> Self {
        Self {
            real: Reals::default(),
            scratch: Spectrum::default(),
            work: Spectrum::default(),
        }
    }

    fn new(plans: &Plans) -> Self {
        let scratch = plans
            .forward
            .get_scratch_len()
            .max(plans.inverse.get_scratch_len());
        Self {
            real: Reals::any(plans.n),
            scratch: Spectrum::any(scratch),
            work: Spectrum::any(plans.n / 2 + 1),
        }
    }

    /// The spectrum of a pmf folded onto the circle of length n.
    fn spectrum(&mut self, plans: &Plans, pmf: &Pmf) -> Result<Spectrum, AccountError> {
        let n = plans.n;
        self.real.iter_mut().for_each(|v| *v = 0.0);
        // A pmf longer than the circle wraps around it.
        for piece in pmf.mass.chunks(n) {
            for (r, &m) in self.real.iter_mut().zip(piece) {
                *r += m;
            }
        }
        let mut out = Spectrum::any(n / 2 + 1);
        plans
            .forward
            .process_with_scratch(&mut self.real, &mut out, &mut self.scratch)
            .map_err(|_| AccountError::Numerical("FFT"))?;
        Ok(out)
    }

    /// Inverse transform of `self.work` (consumed) into `self.real`, unscaled.
    fn invert(&mut self, plans: &Plans) -> Result<(), AccountError> {
        // A real signal's spectrum has real DC and Nyquist terms; rounding may leave a trace
        // that the inverse would refuse.
        if let Some(first) = self.work.first_mut() {
            first.im = 0.0;
        }
        if plans.n.is_multiple_of(2) {
            if let Some(last) = self.work.last_mut() {
                last.im = 0.0;
            }
        }
        plans
            .inverse
            .process_with_scratch(&mut self.work, &mut self.real, &mut self.scratch)
            .map_err(|_| AccountError::Numerical("inverse FFT"))
    }
}

/// z^t by repeated squaring over a whole spectrum; entries whose power underflows are set
/// to zero first (repeated squaring through subnormals is both slow and pointless).
fn pow_into(dst: &mut [Complex64], src: &[Complex64], t: u64) {
    // |z|^t < 2^-1100 (far below the smallest normal) when t ln|z|^2 < -1524.
    let floor = if t == 0 {
        0.0
    } else {
        (-1524.0 / t as f64).exp()
    };
    for (d, s) in dst.iter_mut().zip(src) {
        *d = if s.norm_sqr() < floor {
            Complex64::new(0.0, 0.0)
        } else {
            pow_u64(*s, t)
        };
    }
}

/// z^t by repeated squaring: its rounding error grows like that of the polar form (about t
/// ulps).
fn pow_u64(mut z: Complex64, mut t: u64) -> Complex64 {
    let mut acc = Complex64::new(1.0, 0.0);
    while t > 0 {
        if t & 1 == 1 {
            acc *= z;
        }
        t >>= 1;
        if t > 0 {
            z *= z;
        }
    }
    acc
}

/// The composed distribution of one direction as the inverse FFT left it: the mass at grid
/// index `idx` in [lo, hi] is `real[(idx - base) mod n] * scale`.
struct Composed<'a> {
    real: &'a [f64],
    scale: f64,
    base: i64,
    lo: i64,
    hi: i64,
    /// P-mass at +infinity, including what the window leaves out above.
    infinity: f64,
    /// Bound on the P-mass below the window.
    below: f64,
}

/// Smallest epsilon >= 0 whose hockey-stick divergence is at most delta.
fn epsilon_for_delta(c: &Composed, interval: f64, delta: f64) -> Result<f64, AccountError> {
    if c.infinity > delta {
        return Err(AccountError::Unbounded);
    }
    // Scanning down from the top. With every atom above index i counted:
    //   a = infinity + sum p_j,   w = sum p_j e^{L_i - L_j}  (w <= a: no overflow),
    // and for epsilon in [L_i, L_{i+1}): delta(epsilon) = a - w e^{epsilon - L_i}.
    let shrink = (-interval).exp();
    let (mut a, mut w) = (c.infinity, 0.0f64);
    let mut idx = c.hi;
    let n = c.real.len();
    // Position of idx on the circle, walked down with idx.
    let mut pos = (idx - c.base).rem_euclid(n as i64) as usize;
    loop {
        // Here a and w count the atoms above idx.
        if a - w > delta {
            // delta(L_idx) > delta: the answer lies in (L_idx, L_{idx+1}].
            let eps = idx as f64 * interval + ((a - delta) / w).ln();
            return Ok(eps.max(0.0));
        }
        if idx < c.lo || (idx as f64) * interval < 0.0 {
            break;
        }
        let m = (c.real[pos] * c.scale).max(0.0);
        a += m;
        w = (w + m) * shrink;
        idx -= 1;
        pos = if pos == 0 { n - 1 } else { pos - 1 };
    }
    // delta(L_idx) <= delta with L_idx < 0 or below the window.
    if idx >= c.lo {
        return Ok(0.0);
    }
    // Below the window: what it left out is rounded up into its lowest atom, and there are
    // no atoms below that, so delta(epsilon) = a - w e^{epsilon - L_idx} for every epsilon
    // under L_lo.
    let m = c.below;
    let (a, w) = (a + m, w + m * shrink);
    if a <= delta || w <= 0.0 {
        return Ok(0.0);
    }
    Ok((idx as f64 * interval + ((a - delta) / w).ln()).max(0.0))
}

/// The Chernoff window of `parts`, with the steps of the last `steps.len()` parts replaced.
fn parts_window(parts: &[(Pmf, u64)], steps: &[u64], interval: f64) -> (i64, i64) {
    let first_varying = parts.len() - steps.len();
    let views: Vec<(&Pmf, u64)> = parts
        .iter()
        .enumerate()
        .map(|(i, (p, t))| {
            (
                p,
                if i >= first_varying {
                    steps[i - first_varying]
                } else {
                    *t
                },
            )
        })
        .collect();
    window(&views, interval, WINDOW_TAIL)
}

/// Everything one direction needs to answer "epsilon with these step counts of the last
/// parts", for many step counts: every part's spectrum at one FFT length, the parts whose
/// steps never change multiplied together once.
#[derive(Debug)]
struct Direction {
    /// (pmf, steps) of every part; the steps of the last `spectra.len()` are varied.
    parts: Vec<(Pmf, u64)>,
    /// Product of the spectra of the fixed parts, raised to their steps.
    fixed: Option<Spectrum>,
    /// Spectra of the varying parts.
    spectra: Vec<Spectrum>,
    /// The last window computed, by step counts of the varying parts.
    window: Option<(Vec<u64>, (i64, i64))>,
}

impl Direction {
    fn new(
        parts: Vec<(Pmf, u64)>,
        varying: usize,
        plans: &Plans,
        buf: &mut Buffers,
    ) -> Result<Self, AccountError> {
        let first_varying = parts.len() - varying;
        let mut fixed: Option<Spectrum> = None;
        for (pmf, t) in &parts[..first_varying] {
            let s = buf.spectrum(plans, pmf)?;
            pow_into(&mut buf.work, &s, *t);
            match fixed.as_mut() {
                None => fixed = Some(buf.work.clone()),
                Some(p) => {
                    for (acc, z) in p.iter_mut().zip(buf.work.iter()) {
                        *acc *= z;
                    }
                }
            }
        }
        let mut spectra = Vec::with_capacity(varying);
        for (pmf, _) in &parts[first_varying..] {
            spectra.push(buf.spectrum(plans, pmf)?);
        }
        Ok(Self {
            parts,
            fixed,
            spectra,
            window: None,
        })
    }

    fn window(&mut self, steps: &[u64], interval: f64) -> (i64, i64) {
        if let Some((t, w)) = &self.window {
            if t == steps {
                return *w;
            }
        }
        let w = parts_window(&self.parts, steps, interval);
        self.window = Some((steps.to_vec(), w));
        w
    }

    /// Composes with these steps of the varying parts into `buf.real`, or `None` when the
    /// composed window does not fit this FFT length.
    fn compose(
        &mut self,
        steps: &[u64],
        plans: &Plans,
        buf: &mut Buffers,
        interval: f64,
    ) -> Result<Option<Layout>, AccountError> {
        let (lo, hi) = self.window(steps, interval);
        if width((lo, hi)) > plans.n {
            return Ok(None);
        }
        let mut spectra = self.spectra.iter().zip(steps);
        match spectra.next() {
            Some((z, &t)) => pow_into(&mut buf.work, z, t),
            None => buf
                .work
                .iter_mut()
                .for_each(|w| *w = Complex64::new(1.0, 0.0)),
        }
        for (z, &t) in spectra {
            for (w, z) in buf.work.iter_mut().zip(z.iter()) {
                *w *= pow_u64(*z, t);
            }
        }
        if let Some(p) = &self.fixed {
            for (w, z) in buf.work.iter_mut().zip(p.iter()) {
                *w *= z;
            }
        }
        buf.invert(plans)?;
        let first_varying = self.parts.len() - steps.len();
        let mut base: i64 = 0;
        // ln of the probability that no step lands at infinity.
        let mut log_finite = 0.0f64;
        for (i, (p, t)) in self.parts.iter().enumerate() {
            let t = if i >= first_varying {
                steps[i - first_varying]
            } else {
                *t
            };
            base = base.saturating_add(p.offset.saturating_mul(t as i64));
            log_finite += t as f64 * (-p.infinity).ln_1p();
        }
        Ok(Some(Layout {
            scale: 1.0 / plans.n as f64,
            base,
            lo,
            hi,
            infinity: -log_finite.exp_m1() + WINDOW_TAIL,
            below: WINDOW_TAIL,
        }))
    }

    /// Epsilon with these steps of the varying parts, or `None` when the composed window
    /// does not fit this FFT length.
    fn epsilon(
        &mut self,
        steps: &[u64],
        plans: &Plans,
        buf: &mut Buffers,
        interval: f64,
        delta: f64,
    ) -> Result<Option<f64>, AccountError> {
        let Some(l) = self.compose(steps, plans, buf, interval)? else {
            return Ok(None);
        };
        let composed = Composed {
            real: &buf.real,
            scale: l.scale,
            base: l.base,
            lo: l.lo,
            hi: l.hi,
            infinity: l.infinity,
            below: l.below,
        };
        epsilon_for_delta(&composed, interval, delta).map(Some)
    }
}

/// Where a composition left its masses in the inverse FFT's output (see [`Composed`]).
#[derive(Debug, Clone, Copy)]
struct Layout {
    scale: f64,
    base: i64,
    lo: i64,
    hi: i64,
    infinity: f64,
    below: f64,
}

/// A composition prepared at one grid spacing and FFT length, for answering epsilon at
/// several step counts of its last mechanism.
#[derive(Debug)]
struct Prepared {
    interval: f64,
    plans: Plans,
    directions: Vec<Direction>,
    /// Per direction: `None` when the last mechanism is one part (its steps vary), or the
    /// block size its steps are cut into (whole blocks and a remainder: two varying parts).
    blocks: Vec<Option<u64>>,
    /// One set per direction when they run at the same time, else one.
    buffers: Vec<Buffers>,
}

/// Longest FFT at which the two directions are composed at the same time, each in its own
/// buffers (beyond it they take turns in one set, to stay within the memory bound).
const PARALLEL_MAX_LEN: usize = 1 << 18;

/// The varying parts' steps for `t` steps of the last mechanism.
fn varying_steps(block: Option<u64>, t: u64) -> Vec<u64> {
    match block {
        None => vec![t],
        Some(b) => vec![t / b, t % b],
    }
}

/// The finest spacing `interval * 2^k` at which every event's single grid fits `max_len`.
fn single_spacing(
    events: &[SgmEvent],
    interval: f64,
    max_len: usize,
    tail: f64,
) -> Result<f64, AccountError> {
    let mut interval = interval;
    for _ in 0..MAX_COARSENINGS {
        let longest = events
            .iter()
            .map(|e| {
                let (i0, i1) = sgm(e, tail).grid(interval);
                (i1 - i0 + 1).max(1) as f64
            })
            .fold(0.0f64, f64::max);
        if longest <= max_len as f64 {
            return Ok(interval);
        }
        interval *= 2f64.powf((longest / max_len as f64).log2().ceil().max(1.0));
    }
    Err(AccountError::GridTooLarge)
}

fn sgm(e: &SgmEvent, tail: f64) -> Sgm {
    Sgm {
        q: e.q.get(),
        sigma: e.sigma.get(),
        tail,
    }
}

/// The mass each step may push off its grid's ends: [`TAIL_MASS`], or less when `steps`
/// of them would add more than 1e-4 of delta (each such mass counts fully against delta).
/// The step count is rounded up to a power of two, so that epsilon stays monotone in the
/// step count between powers of two (the inverse questions search it).
fn step_tail(steps: u64, delta: f64) -> f64 {
    let rounded = steps.max(1).checked_next_power_of_two().unwrap_or(u64::MAX);
    TAIL_MASS.min(1e-4 * delta / rounded as f64)
}

/// Every event's discrete pmf per direction, each with its step count: the remove side, and
/// the add side unless every event has q = 1 (then the pair is symmetric and the add
/// direction is the remove direction).
fn sides(
    events: &[SgmEvent],
    interval: f64,
    max_len: usize,
    tail: f64,
) -> Result<Vec<Vec<(Pmf, u64)>>, AccountError> {
    let mut removes = Vec::with_capacity(events.len());
    let mut adds = Vec::with_capacity(events.len());
    for e in events {
        let pair = sgm(e, tail).pair(interval, max_len)?;
        adds.push((pair.add, e.steps));
        removes.push((pair.remove, e.steps));
    }
    let mut sides = vec![removes];
    if events.iter().any(|e| e.q.get() < 1.0) {
        sides.push(adds);
    }
    Ok(sides)
}

fn width((lo, hi): (i64, i64)) -> usize {
    usize::try_from(hi - lo + 1).unwrap_or(usize::MAX)
}

impl Prepared {
    /// Discretises `events` (grouped, non-empty, the last being the one whose steps vary,
    /// up to `cap_steps`) at the finest spacing `interval * 2^k` whose single grids fit
    /// `max_len` points. `None` when the composed window does not fit `max_len` points at
    /// that spacing: then [`Prepared::blocked`].
    fn new(
        events: &[SgmEvent],
        cap_steps: u64,
        interval: f64,
        max_len: usize,
        tail: f64,
    ) -> Result<Option<Self>, AccountError> {
        let interval = single_spacing(events, interval, max_len, tail)?;
        let mut sides = sides(events, interval, max_len, tail)?;
        for side in &mut sides {
            if let Some(last) = side.last_mut() {
                last.1 = cap_steps;
            }
        }
        let blocks = vec![None; sides.len()];
        Self::from_sides(sides, blocks, cap_steps, interval, max_len)
    }

    /// [`Prepared::new`] for compositions whose loss spreads wider than `max_len` points at
    /// the fine spacing (huge step counts). Each mechanism is composed at the fine spacing
    /// in blocks of 2^k steps, as many as fit; the block's pmf and the single step's are
    /// carried onto a coarser grid by connect-the-dots (which keeps them pessimistic), and
    /// the whole blocks and the remaining single steps are composed there. Rounding onto the
    /// coarse grid costs at most (coarse spacing)^2 / 8 of mean loss per block or remaining
    /// step, against (fine spacing)^2 / 8 per step for the fine grid itself: far less than
    /// coarsening every step, which is what a plain coarser grid would do.
    fn blocked(
        events: &[SgmEvent],
        cap_steps: u64,
        interval: f64,
        max_len: usize,
        tail: f64,
    ) -> Result<Self, AccountError> {
        // Half the length of the direct path: a blocked composition holds more spectra at
        // once (per direction a block's and a step's, and the fixed parts'), and the
        // memory bound is for both paths.
        let max_len = (max_len / 2).max(64);
        let fine = single_spacing(events, interval, max_len, tail)?;
        let mut sides = sides(events, fine, max_len, tail)?;
        let mut factor = 2u64;
        for side in &mut sides {
            if let Some(last) = side.last_mut() {
                last.1 = cap_steps;
            }
            let views: Vec<(&Pmf, u64)> = side.iter().map(|(p, t)| (p, *t)).collect();
            let whole = width(window(&views, fine, WINDOW_TAIL)) as f64 / max_len as f64;
            factor = factor.max(1u64 << whole.log2().ceil().clamp(1.0, 40.0) as u32);
        }
        let mut coarse_sides = Vec::with_capacity(sides.len());
        let mut blocks = Vec::with_capacity(sides.len());
        for side in sides {
            let k = side.len();
            let mut parts: Vec<(Pmf, u64)> = Vec::with_capacity(2 * k);
            let mut last_block = 1;
            for (i, (pmf, steps)) in side.into_iter().enumerate() {
                let block = largest_block(&pmf, steps, fine, max_len);
                let composed = compose_pmf(&pmf, block, fine, max_len)?;
                parts.push((coarsen(&composed, fine, factor), steps / block));
                drop(composed);
                // The last mechanism always keeps its remainder part: its steps vary.
                if steps % block > 0 || i + 1 == k {
                    parts.push((coarsen(&pmf, fine, factor), steps % block));
                }
                last_block = block;
            }
            coarse_sides.push(parts);
            blocks.push(Some(last_block));
        }
        let mut coarse = fine * factor as f64;
        for _ in 0..MAX_COARSENINGS {
            if let Some(p) = Self::from_sides(
                coarse_sides.clone(),
                blocks.clone(),
                cap_steps,
                coarse,
                max_len,
            )? {
                return Ok(p);
            }
            coarse_sides = coarse_sides
                .iter()
                .map(|side| {
                    side.iter()
                        .map(|(p, t)| (coarsen(p, coarse, 2), *t))
                        .collect()
                })
                .collect();
            coarse *= 2.0;
        }
        Err(AccountError::GridTooLarge)
    }

    fn from_sides(
        sides: Vec<Vec<(Pmf, u64)>>,
        blocks: Vec<Option<u64>>,
        cap_steps: u64,
        interval: f64,
        max_len: usize,
    ) -> Result<Option<Self>, AccountError> {
        let windows: Vec<(i64, i64)> = sides
            .iter()
            .zip(&blocks)
            .map(|(parts, &b)| parts_window(parts, &varying_steps(b, cap_steps), interval))
            .collect();
        let needed = windows.iter().map(|&w| width(w)).max().unwrap_or(1);
        if needed > max_len {
            return Ok(None);
        }
        let plans = Plans::new(fast_len(needed).min(max_len.max(2)));
        let parallel = sides.len() == 2 && plans.n <= PARALLEL_MAX_LEN && cores() >= 2;
        // Buffers are allocated here, not in the worker: memory allocated in a short-lived
        // thread's arena stays with that arena after the thread is gone.
        let build = |parts: Vec<(Pmf, u64)>, block: Option<u64>, mut buf: Buffers| {
            let varying = if block.is_some() { 2 } else { 1 };
            Direction::new(parts, varying, &plans, &mut buf).map(|d| (d, buf))
        };
        let mut built = Vec::with_capacity(2);
        if parallel {
            let mut it = sides.into_iter().zip(blocks.iter().copied());
            let (first, second) = (it.next(), it.next());
            let (b0, b1) = (Buffers::new(&plans), Buffers::new(&plans));
            std::thread::scope(|scope| {
                let build = &build;
                let other = second.map(|(p, b)| scope.spawn(move || build(p, b, b1)));
                if let Some((p, b)) = first {
                    built.push(build(p, b, b0));
                }
                if let Some(h) = other {
                    built.push(
                        h.join()
                            .unwrap_or(Err(AccountError::Numerical("PLD worker panicked"))),
                    );
                }
            });
        } else {
            let mut shared = Some(Buffers::new(&plans));
            for (p, b) in sides.into_iter().zip(blocks.iter().copied()) {
                let buf = match shared.take() {
                    Some(buf) => buf,
                    None => match built.last_mut() {
                        Some(Ok((_, buf))) => std::mem::replace(buf, Buffers::empty()),
                        _ => Buffers::new(&plans),
                    },
                };
                built.push(build(p, b, buf));
            }
        }
        let mut directions = Vec::with_capacity(2);
        let mut buffers = Vec::with_capacity(2);
        for b in built {
            let (d, buf) = b?;
            directions.push(d);
            // Taking turns, the directions share one set of buffers (the last holds it).
            if parallel || !buf.real.is_empty() {
                buffers.push(buf);
            }
        }
        Ok(Some(Self {
            interval,
            plans,
            directions,
            blocks,
            buffers,
        }))
    }

    /// Epsilon with `steps` steps of the last event (`None`: does not fit; prepare again).
    fn epsilon(&mut self, steps: u64, delta: f64) -> Result<Option<f64>, AccountError> {
        let (plans, interval) = (&self.plans, self.interval);
        let split: Vec<Vec<u64>> = self
            .blocks
            .iter()
            .map(|&b| varying_steps(b, steps))
            .collect();
        let results: Vec<Result<Option<f64>, AccountError>> =
            if self.buffers.len() == self.directions.len() && self.directions.len() == 2 {
                let (d0, d1) = self.directions.split_at_mut(1);
                let (d0, d1) = (&mut d0[0], &mut d1[0]);
                let (b0, b1) = self.buffers.split_at_mut(1);
                let (s0, s1) = (&split[0], &split[1]);
                std::thread::scope(|scope| {
                    let h = scope.spawn(|| d1.epsilon(s1, plans, &mut b1[0], interval, delta));
                    let r0 = d0.epsilon(s0, plans, &mut b0[0], interval, delta);
                    let r1 = h
                        .join()
                        .unwrap_or(Err(AccountError::Numerical("PLD worker panicked")));
                    vec![r0, r1]
                })
            } else {
                let buf = &mut self.buffers[0];
                self.directions
                    .iter_mut()
                    .zip(&split)
                    .map(|(d, s)| d.epsilon(s, plans, buf, interval, delta))
                    .collect()
            };
        let mut worst = 0.0f64;
        for r in results {
            match r? {
                Some(e) => worst = worst.max(e),
                None => return Ok(None),
            }
        }
        Ok(Some(worst))
    }
}

/// Epsilon of a composition at `delta`, with the default grid spacing, coarsened when the
/// composed loss would not fit in [`MAX_FFT_LEN`] points (a coarser grid is still an upper
/// bound).
pub fn epsilon(events: &[SgmEvent], delta: f64) -> Result<f64, AccountError> {
    epsilon_with(events, delta, DEFAULT_INTERVAL, MAX_FFT_LEN)
}

/// Epsilon with a chosen starting grid spacing.
pub fn epsilon_with_interval(
    events: &[SgmEvent],
    delta: f64,
    interval: f64,
) -> Result<f64, AccountError> {
    epsilon_with(events, delta, interval, MAX_FFT_LEN)
}

/// Epsilon with a chosen starting spacing and longest FFT (the memory bound). Tests use a
/// large `max_len` to get the fine-grid figure that the bounded one must never undercut.
pub fn epsilon_with(
    events: &[SgmEvent],
    delta: f64,
    interval: f64,
    max_len: usize,
) -> Result<f64, AccountError> {
    if !(interval > 0.0 && interval.is_finite()) {
        return Err(AccountError::Numerical("PLD grid spacing"));
    }
    let max_len = max_len.max(64);
    let events = grouped(events);
    let Some(last) = events.last() else {
        return Ok(0.0);
    };
    let total = events.iter().fold(0u64, |a, e| a.saturating_add(e.steps));
    let tail = step_tail(total, delta);
    let mut prepared = match Prepared::new(&events, last.steps, interval, max_len, tail)? {
        Some(p) => p,
        None => Prepared::blocked(&events, last.steps, interval, max_len, tail)?,
    };
    prepared
        .epsilon(last.steps, delta)?
        .ok_or(AccountError::Numerical("PLD window"))
}

/// Epsilon after `prior` and then `t` steps of one more mechanism, for many t: the
/// mechanism's spectrum is computed once per FFT length and reused, so each further step
/// count costs one inverse FFT and a scan.
#[derive(Debug)]
struct StepSession {
    /// The prior events, grouped, without the new mechanism.
    prior: Vec<SgmEvent>,
    /// Steps of the new mechanism already among the prior events.
    offset: u64,
    next: SgmEvent,
    delta: f64,
    /// (steps of the last event it was built for, its tail mass, the composition).
    prepared: Option<(u64, f64, Prepared)>,
}

impl StepSession {
    fn new(prior: &[SgmEvent], next: SgmEvent, delta: f64) -> Self {
        let mut offset = 0u64;
        let prior = grouped(prior)
            .into_iter()
            .filter(|e| {
                let same = e.q.get().to_bits() == next.q.get().to_bits()
                    && e.sigma.get().to_bits() == next.sigma.get().to_bits();
                if same {
                    offset = offset.saturating_add(e.steps);
                }
                !same
            })
            .collect();
        Self {
            prior,
            offset,
            next,
            delta,
            prepared: None,
        }
    }

    /// Epsilon with `t` more steps (infinite when unbounded).
    fn epsilon(&mut self, t: u64) -> Result<f64, AccountError> {
        let last = self.offset.saturating_add(t);
        let mut events = self.prior.clone();
        if last > 0 {
            events.push(SgmEvent {
                steps: last,
                ..self.next
            });
        }
        let unbounded = |r: Result<f64, AccountError>| match r {
            Err(AccountError::Unbounded) => Ok(f64::INFINITY),
            other => other,
        };
        if last == 0 {
            return unbounded(epsilon(&events, self.delta));
        }
        let total = events.iter().fold(0u64, |a, e| a.saturating_add(e.steps));
        let tail = step_tail(total, self.delta);
        if let Some((cap, t_mass, p)) = self.prepared.as_mut() {
            if last <= *cap && *t_mass == tail {
                match p.epsilon(last, self.delta) {
                    Ok(Some(e)) => return Ok(e),
                    // The window outgrew this FFT length: prepare again below.
                    Ok(None) => {}
                    Err(AccountError::Unbounded) => return Ok(f64::INFINITY),
                    Err(e) => return Err(e),
                }
            }
        }
        // Drop the old composition before building the next: never two at once.
        self.prepared = None;
        let mut p = match Prepared::new(&events, last, DEFAULT_INTERVAL, MAX_FFT_LEN, tail)? {
            Some(p) => p,
            None => Prepared::blocked(&events, last, DEFAULT_INTERVAL, MAX_FFT_LEN, tail)?,
        };
        let e = unbounded(
            p.epsilon(last, self.delta)?
                .ok_or(AccountError::Numerical("PLD window")),
        );
        self.prepared = Some((last, tail, p));
        e
    }
}

/// The number of further steps t of `next` (its own `steps` ignored) after `prior` such
/// that t fits within `budget` and t + 1 does not, found by safeguarded interpolation from
/// `hint` (a step count near the answer, e.g. the RDP accountant's), at most `cap`. The
/// caller confirms the answer with [`epsilon`]: this search may compose at another FFT
/// length, whose rounding differs in the last digits.
pub fn max_steps(
    prior: &[SgmEvent],
    next: SgmEvent,
    budget: f64,
    delta: f64,
    hint: u64,
    cap: u64,
) -> Result<u64, AccountError> {
    let mut session = StepSession::new(prior, next, delta);
    let e1 = session.epsilon(1)?;
    if e1 > budget {
        return Ok(0);
    }
    // lo fits, hi (when known) does not.
    let mut lo = (1u64, e1);
    let mut hi: Option<(u64, f64)> = None;
    let hint = hint.clamp(1, cap);
    if hint > 1 {
        let e = session.epsilon(hint)?;
        if e <= budget {
            lo = (hint, e);
        } else {
            hi = Some((hint, e));
        }
    }
    // Epsilon grows about like the square root of the step count: extrapolate that way,
    // by a factor between 1.25 and 16.
    while hi.is_none() {
        if lo.0 >= cap {
            return Ok(cap);
        }
        let grow = if lo.1 > 0.0 {
            (budget / lo.1).powi(2).clamp(1.25, 16.0)
        } else {
            16.0
        };
        let t = ((lo.0 as f64 * grow).ceil() as u64).clamp(lo.0 + 1, cap);
        let e = session.epsilon(t)?;
        if e <= budget {
            lo = (t, e);
        } else {
            hi = Some((t, e));
        }
    }
    let Some(mut hi) = hi else {
        return Ok(lo.0);
    };
    // Illinois false position on epsilon - budget, in whole steps.
    let (mut f_lo, mut f_hi) = (lo.1 - budget, hi.1 - budget);
    let mut last_side = 0i8;
    while hi.0 - lo.0 > 1 {
        let span = (hi.0 - lo.0) as f64;
        let guess = if f_hi.is_finite() && f_hi > f_lo {
            lo.0 as f64 + span * (-f_lo) / (f_hi - f_lo)
        } else {
            lo.0 as f64 + span / 2.0
        };
        let t = (guess.round() as u64).clamp(lo.0 + 1, hi.0 - 1);
        let e = session.epsilon(t)?;
        if e <= budget {
            lo = (t, e);
            f_lo = e - budget;
            if last_side < 0 {
                f_hi /= 2.0;
            }
            last_side = -1;
        } else {
            hi = (t, e);
            f_hi = e - budget;
            if last_side > 0 {
                f_lo /= 2.0;
            }
            last_side = 1;
        }
    }
    Ok(lo.0)
}

/// The largest power of two, at most `steps`, whose composed window fits `max_len` points.
fn largest_block(pmf: &Pmf, steps: u64, interval: f64, max_len: usize) -> u64 {
    let fits = |b: u64| width(window(&[(pmf, b)], interval, WINDOW_TAIL)) <= max_len;
    let (mut lo, mut hi) = (0u32, 63 - steps.max(1).leading_zeros());
    if fits(1 << hi) {
        return 1 << hi;
    }
    // Invariant: 2^lo fits (a single grid always does), 2^hi does not.
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(1 << mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    1 << lo
}

/// `steps` compositions of `pmf` as a pmf on the same grid: the window's masses, what it
/// leaves out above at infinity, and what it leaves out below rounded up into its lowest
/// point.
fn compose_pmf(pmf: &Pmf, steps: u64, interval: f64, max_len: usize) -> Result<Pmf, AccountError> {
    let parts = vec![(pmf.clone(), steps)];
    let w = parts_window(&parts, &[steps], interval);
    if width(w) > max_len {
        return Err(AccountError::Numerical("PLD block window"));
    }
    // Powers of two: the blocks of both directions then share one plan.
    let plans = Plans::new(width(w).next_power_of_two().min(max_len));
    let mut buf = Buffers::new(&plans);
    let mut d = Direction::new(parts, 1, &plans, &mut buf)?;
    let c = d
        .compose(&[steps], &plans, &mut buf, interval)?
        .ok_or(AccountError::Numerical("PLD block window"))?;
    let n = buf.real.len() as i64;
    let mut mass = Reals::any(width(w));
    for (k, m) in mass.iter_mut().enumerate() {
        let pos = (c.lo + k as i64 - c.base).rem_euclid(n) as usize;
        *m = (buf.real[pos] * c.scale).max(0.0);
    }
    if let Some(first) = mass.first_mut() {
        *first += c.below;
    }
    Ok(Pmf {
        offset: c.lo,
        mass,
        infinity: c.infinity.min(1.0),
    })
}

/// A pmf on spacing `interval` carried onto the grid `factor` times coarser by
/// connect-the-dots: an atom between two coarse points is split between them so that both
/// its P-mass and its Q-mass (P-mass times e^-loss) are kept, which makes the coarse pair
/// dominate the fine one.
fn coarsen(pmf: &Pmf, interval: f64, factor: u64) -> Pmf {
    let k = factor as i64;
    let lo = pmf.offset.div_euclid(k);
    let hi = pmf.top().div_euclid(k) + 1;
    let mut mass = Reals::any(width((lo, hi)));
    mass.iter_mut().for_each(|m| *m = 0.0);
    // An atom j fine steps above a coarse point a sends p (1 - e^{-j d}) / (1 - e^{-k d})
    // to a + 1 and the rest to a: then p_a + p_b = p and p_a e^{-a} + p_b e^{-a-kd} =
    // p e^{-a-jd}.
    let whole = (-(k as f64) * interval).exp_m1();
    let shares: Vec<f64> = (0..k)
        .map(|j| (-(j as f64) * interval).exp_m1() / whole)
        .collect();
    for (i, &p) in pmf.mass.iter().enumerate() {
        if p == 0.0 {
            continue;
        }
        let idx = pmf.offset + i as i64;
        let a = idx.div_euclid(k);
        let j = (idx - a * k) as usize;
        let up = p * shares[j];
        let at = (a - lo) as usize;
        mass[at] += p - up;
        if up > 0.0 {
            mass[at + 1] += up;
        }
    }
    Pmf {
        offset: lo,
        mass,
        infinity: pmf.infinity,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(q: f64, s: f64, t: u64) -> SgmEvent {
        SgmEvent::new(q, s, t).expect("valid")
    }

    #[test]
    fn fast_lengths_are_smooth_and_large_enough() {
        for n in [1usize, 2, 7, 1000, 377_430, 1 << 20] {
            let m = fast_len(n);
            assert!(m >= n && m.is_multiple_of(2), "{n} -> {m}");
            let mut r = m;
            for p in [2, 3, 5] {
                while r.is_multiple_of(p) {
                    r /= p;
                }
            }
            assert_eq!(r, 1, "{n} -> {m}");
        }
        assert_eq!(fast_len(377_430), 384_000);
    }

    #[test]
    fn horner_sums_match_the_direct_sums() {
        let m: Vec<f64> = (0..1003).map(|i| ((i * 37) % 101) as f64 * 1e-3).collect();
        for r in [0.0f64, 0.3, 0.999, 1.0] {
            let fwd: f64 = m
                .iter()
                .enumerate()
                .map(|(i, v)| v * r.powi(i as i32))
                .sum();
            let rev: f64 = m
                .iter()
                .enumerate()
                .map(|(i, v)| v * r.powi((m.len() - 1 - i) as i32))
                .sum();
            assert!((horner(&m, r) - fwd).abs() <= 1e-12 * fwd.max(1.0), "{r}");
            assert!(
                (horner_rev(&m, r) - rev).abs() <= 1e-12 * rev.max(1.0),
                "{r}"
            );
        }
    }

    #[test]
    fn single_pmfs_keep_mass_and_have_expected_exp_loss() {
        let sgm = Sgm {
            q: 0.05,
            sigma: 1.3,
            tail: TAIL_MASS,
        };
        let pair = sgm.pair(1e-3, MAX_FFT_LEN).expect("pmf");
        for p in [&pair.remove, &pair.add] {
            let total: f64 = p.mass.iter().sum::<f64>() + p.infinity;
            assert!((total - 1.0).abs() < 1e-9, "{total}");
            // E_upper[exp(-L)] is the lower distribution's total mass: 1.
            let e: f64 = p
                .mass
                .iter()
                .enumerate()
                .map(|(i, m)| m * (-((p.offset + i as i64) as f64 * 1e-3)).exp())
                .sum();
            assert!((e - 1.0).abs() < 1e-6, "{e}");
        }
    }

    /// Exact epsilon of one step in either direction, by bisection on the closed-form
    /// hockey-stick divergence (outside truth for the discretisation).
    fn exact_one_step(q: f64, s: f64, delta: f64, remove: bool) -> f64 {
        let sgm = Sgm {
            q,
            sigma: s,
            tail: TAIL_MASS,
        };
        let hockey = |eps: f64| -> f64 {
            if remove {
                // Loss above eps <=> x above x(eps).
                let (c, sh) = sgm.tails_at(eps);
                (1.0 - q) * c.sf + q * sh.sf - eps.exp() * c.sf
            } else {
                // Add: upper N(0), lower mixture; its loss is minus the remove loss, above
                // eps <=> x below x(-eps).
                let (c, sh) = sgm.tails_at(-eps);
                c.cdf - eps.exp() * ((1.0 - q) * c.cdf + q * sh.cdf)
            }
        };
        let (mut lo, mut hi) = (0.0f64, 50.0f64);
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if hockey(mid) > delta {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    }

    #[test]
    fn one_step_is_an_upper_bound_close_to_the_exact_figure_in_each_direction() {
        for (q, s) in [(0.5, 0.8), (0.1, 0.6), (0.01, 0.5), (1.0, 1.0)] {
            let events = grouped(&[ev(q, s, 1)]);
            let mut p = Prepared::new(&events, 1, 1e-4, MAX_FFT_LEN, TAIL_MASS)
                .expect("prepared")
                .expect("fits");
            for (k, remove) in [(0usize, true), (1, false)] {
                // With q = 1 the one direction stands for both.
                let k = k.min(p.directions.len() - 1);
                let d = &mut p.directions[k];
                let got = d
                    .epsilon(&[1], &p.plans, &mut p.buffers[0], p.interval, 1e-5)
                    .expect("eps")
                    .expect("fits");
                let want = exact_one_step(q, s, 1e-5, remove);
                assert!(
                    got >= want - 1e-9 && got <= want + 2e-3,
                    "q={q} s={s} remove={remove}: {got} vs exact {want}"
                );
            }
        }
    }

    #[test]
    fn gaussian_matches_analytic_value() {
        // Exact epsilon of the Gaussian mechanism, sigma = 1, delta = 1e-5 (Balle & Wang 2018):
        // 4.3772 as quoted from dp_accounting.
        let got = epsilon(&[ev(1.0, 1.0, 1)], 1e-5).expect("finite");
        assert!((got - 4.3772).abs() < 0.002, "{got}");
    }

    #[test]
    fn published_reference_rows() {
        let rows = [
            (0.01, 1.0, 1000, 1.8282),
            (0.01, 4.0, 10000, 0.9470),
            (0.001, 0.5, 1000, 3.2389),
        ];
        for (q, s, t, want) in rows {
            let got = epsilon(&[ev(q, s, t)], 1e-5).expect("finite");
            assert!(
                ((got - want) / want).abs() < 0.02,
                "q={q} s={s} t={t}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn huge_step_counts_give_large_finite_epsilons() {
        // Losses in the tens of thousands: e^{-L} underflows, the answer must not.
        let pld = epsilon(&[ev(0.01, 1.0, 1_000_000_000)], 1e-5).expect("finite");
        let rdp = crate::dp::rdp::epsilon(&[ev(0.01, 1.0, 1_000_000_000)], 1e-5).expect("finite");
        assert!(pld > 1e4 && pld <= rdp * 1.01, "pld {pld}, rdp {rdp}");
    }

    #[test]
    fn composition_of_gaussians_is_one_gaussian() {
        // k Gaussians with sigma compose to one with sigma / sqrt(k).
        let four = epsilon(&[ev(1.0, 2.0, 4)], 1e-5).expect("finite");
        let one = epsilon(&[ev(1.0, 1.0, 1)], 1e-5).expect("finite");
        assert!((four - one).abs() < 0.005, "{four} vs {one}");
    }

    #[test]
    fn the_memory_bounded_figure_is_never_below_the_fine_grid_one() {
        // Smaller FFT bounds force the blocked composition; the fine figure composes
        // everything at 1e-4 in up to 2^22 points.
        // Both are upper bounds by construction; the blocked one must not undercut the fine
        // one by more than the transforms' rounding (a few 1e-7 relative at these sizes).
        let cases = [
            vec![ev(0.01, 1.0, 100_000)],
            vec![ev(0.001, 1.0, 1_600_000)],
            vec![ev(1.0, 2.0, 1000)],
            vec![ev(0.01, 1.0, 50_000), ev(0.1, 2.0, 2000)],
        ];
        for events in cases {
            let fine = epsilon_with(&events, 1e-5, 1e-4, 1 << 22).expect("fine");
            for len in [1usize << 18, 1 << 17, 1 << 16] {
                let bounded = epsilon_with(&events, 1e-5, 1e-4, len).expect("bounded");
                assert!(
                    bounded >= fine * (1.0 - 1e-6),
                    "{events:?} at {len}: {bounded} below the fine {fine}"
                );
                // And it gives away little.
                assert!(
                    bounded <= fine * 1.01,
                    "{events:?} at {len}: {bounded} vs fine {fine}"
                );
            }
        }
    }

    #[test]
    fn blocks_are_used_and_stay_tight_at_huge_step_counts() {
        // 10^9 steps spread the composed loss over ~10^4 units: blocked at the default bound.
        let events = grouped(&[ev(0.01, 1.0, 1_000_000_000)]);
        let fine = single_spacing(&events, DEFAULT_INTERVAL, MAX_FFT_LEN, 1e-18).expect("fits");
        let prepared =
            Prepared::new(&events, 1_000_000_000, fine, MAX_FFT_LEN, 1e-18).expect("prepared");
        assert!(prepared.is_none(), "expected the blocked path");
        // A plain coarser grid (the same bound, single steps coarsened) is far looser.
        let blocked = epsilon(&events, 1e-5).expect("blocked");
        let coarse_steps = epsilon_with(&events, 1e-5, 0.0128, MAX_FFT_LEN).expect("coarse");
        assert!(blocked < coarse_steps * 0.8, "{blocked} vs {coarse_steps}");
    }

    #[test]
    fn add_direction_counts_when_it_is_the_larger() {
        // One step at q = 0.5, sigma = 0.8: both directions computed exactly above; the
        // reported figure is the larger, whichever direction it comes from.
        for (q, s) in [(0.5, 0.8), (0.9, 0.5), (0.05, 2.0)] {
            let got = epsilon(&[ev(q, s, 1)], 1e-5).expect("finite");
            let want = exact_one_step(q, s, 1e-5, true).max(exact_one_step(q, s, 1e-5, false));
            assert!(
                got >= want - 1e-9 && got <= want + 2e-3,
                "{q} {s}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn inverse_search_lands_next_to_the_forward_boundary() {
        // The session composes at another FFT length than the forward function: the same
        // figures up to the transforms' rounding, so its answer is the forward boundary or
        // a step from it (the accountant then settles it on the boundary exactly).
        for (q, s, e) in [(0.01, 1.0, 2.0), (0.001, 1.0, 8.0), (0.01, 4.0, 1.0)] {
            let t = max_steps(&[], ev(q, s, 1), e, 1e-5, 1, 1_000_000_000).expect("answer");
            let fits = |t: u64| epsilon(&[ev(q, s, t)], 1e-5).expect("eps") <= e;
            let near = (t.saturating_sub(1)..=t + 1).any(|b| fits(b) && !fits(b + 1));
            assert!(near, "{q} {s} {e}: {t}");
        }
    }
}
