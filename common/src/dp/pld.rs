//! Privacy loss distribution (PLD) accountant for the Poisson-subsampled Gaussian mechanism.
//!
//! Each mechanism's privacy loss is discretised on a grid of spacing `interval` with the
//! pessimistic "connect the dots" construction (Doroshenko, Ghazi, Kamath, Kumar, Manurangsi,
//! 2022): the probability mass between two grid points is split between them so that the
//! discrete distribution's hockey-stick curve equals the true one at every grid point and lies
//! above it in between. Mass below the grid is rounded up to its lowest point, mass above it
//! goes to +infinity, so the result is an upper bound on the true epsilon. Compositions are
//! products in the Fourier domain, over a window chosen by a Chernoff bound on the composed
//! loss; what the window leaves out is added to the mass at infinity.
//!
//! Adjacency is add-or-remove one record: both directions (remove: the mixture against the
//! plain Gaussian; add: the reverse) are composed and the larger epsilon is reported, as
//! `dp_accounting`'s `PLDAccountant` does.

use realfft::num_complex::Complex64;
use realfft::RealFftPlanner;

use super::{grouped, SgmEvent};
use crate::dp::accountant::AccountError;

/// Default grid spacing of the privacy loss, as in `dp_accounting`'s PLD accountant.
pub const DEFAULT_INTERVAL: f64 = 1e-4;
/// Probability mass that may be pushed off either end of a single mechanism's grid.
const TAIL_MASS: f64 = 1e-15;
/// Bound on what the composition window may leave out.
const WINDOW_TAIL: f64 = 1e-14;
/// Grids larger than this make the accountant coarsen its interval (still pessimistic).
const MAX_GRID: usize = 1 << 22;

fn norm_sf(z: f64) -> f64 {
    0.5 * libm::erfc(z / std::f64::consts::SQRT_2)
}

fn norm_cdf(z: f64) -> f64 {
    0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
}

/// Mass of the standard normal in (a, b], computed in whichever tail keeps precision.
fn norm_mass(a: f64, b: f64) -> f64 {
    if b <= a {
        0.0
    } else if a >= 0.0 {
        norm_sf(a) - norm_sf(b)
    } else if b <= 0.0 {
        norm_cdf(b) - norm_cdf(a)
    } else {
        1.0 - norm_cdf(a) - norm_sf(b)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Direction {
    /// upper = (1-q) N(0, s^2) + q N(1, s^2), lower = N(0, s^2)
    Remove,
    /// upper = N(0, s^2), lower = (1-q) N(0, s^2) + q N(1, s^2)
    Add,
}

/// A discretised privacy loss distribution: `mass[i]` at loss `(offset + i) * interval`,
/// plus `infinity` at +infinity.
#[derive(Debug, Clone)]
struct Pmf {
    offset: i64,
    mass: Vec<f64>,
    infinity: f64,
}

/// The sampled Gaussian mechanism with sensitivity 1 and noise std `sigma`, in one
/// direction. `x` is the output; the loss is monotone in `x`.
struct Sgm {
    q: f64,
    sigma: f64,
    dir: Direction,
}

impl Sgm {
    /// The output x at which the loss equals `eps` (`None`: the loss never reaches eps, all
    /// x are above (remove) or below (add) it).
    fn x_at(&self, eps: f64) -> Option<f64> {
        let (q, s2) = (self.q, self.sigma * self.sigma);
        match self.dir {
            Direction::Remove => {
                if q >= 1.0 {
                    return Some(s2 * eps + 0.5);
                }
                let t = eps.exp() - (1.0 - q);
                (t > 0.0).then(|| s2 * (t / q).ln() + 0.5)
            }
            Direction::Add => {
                if q >= 1.0 {
                    return Some(0.5 - s2 * eps);
                }
                let t = (-eps).exp() - (1.0 - q);
                (t > 0.0).then(|| s2 * (t / q).ln() + 0.5)
            }
        }
    }

    /// (upper mass, lower mass) of the outputs whose loss lies in (e0, e1].
    fn bin(&self, e0: f64, e1: f64) -> (f64, f64) {
        let (q, s) = (self.q, self.sigma);
        // Output interval (xa, xb] for the loss interval.
        let (xa, xb) = match self.dir {
            Direction::Remove => (
                self.x_at(e0).unwrap_or(f64::NEG_INFINITY),
                self.x_at(e1).unwrap_or(f64::NEG_INFINITY),
            ),
            // Loss decreases in x: loss in (e0, e1] means x in [x(e1), x(e0)).
            Direction::Add => (
                self.x_at(e1).unwrap_or(f64::NEG_INFINITY),
                self.x_at(e0).unwrap_or(f64::NEG_INFINITY),
            ),
        };
        let centred = norm_mass(xa / s, xb / s);
        let shifted = norm_mass((xa - 1.0) / s, (xb - 1.0) / s);
        let mixture = (1.0 - q) * centred + q * shifted;
        match self.dir {
            Direction::Remove => (mixture, centred),
            Direction::Add => (centred, mixture),
        }
    }

    /// Upper-distribution mass with loss at most `eps`.
    fn upper_mass_below(&self, eps: f64) -> f64 {
        self.bin(f64::NEG_INFINITY, eps).0
    }

    /// Upper-distribution mass with loss above `eps`.
    fn upper_mass_above(&self, eps: f64) -> f64 {
        self.bin(eps, f64::INFINITY).0
    }

    /// Smallest and largest loss worth a grid point.
    fn loss_range(&self) -> (f64, f64) {
        let q = self.q;
        let lo = match self.dir {
            Direction::Remove if q < 1.0 => (-q).ln_1p(),
            _ => search(|e| self.upper_mass_below(e) <= TAIL_MASS, -1.0, false),
        };
        let hi = match self.dir {
            Direction::Add if q < 1.0 => -(-q).ln_1p(),
            _ => search(|e| self.upper_mass_above(e) <= TAIL_MASS, 1.0, true),
        };
        (lo, hi)
    }

    fn pmf(&self, interval: f64) -> Result<Pmf, AccountError> {
        let (lo, hi) = self.loss_range();
        let i0 = (lo / interval).floor() as i64;
        let i1 = (hi / interval).ceil() as i64;
        let n = usize::try_from(i1 - i0 + 1).map_err(|_| AccountError::Numerical("PLD grid"))?;
        if n > MAX_GRID {
            return Err(AccountError::GridTooLarge);
        }
        let grid = |i: usize| (i0 + i as i64) as f64 * interval;
        // One output threshold and two normal tails per grid point, shared by the two bins
        // that meet there (an erfc per tail, the other side as 1 - it where that is exact).
        let s = self.sigma;
        let points: Vec<(Tail, Tail)> = (0..n)
            .map(|i| {
                let x = self.x_at(grid(i)).unwrap_or(f64::NEG_INFINITY);
                (Tail::at(x / s), Tail::at((x - 1.0) / s))
            })
            .collect();
        let exps: Vec<f64> = (0..n).map(|i| grid(i).exp()).collect();
        let q = self.q;
        let mut mass = vec![0.0f64; n];
        // Everything at or below the lowest point is rounded up to it.
        mass[0] = self.upper_mass_below(grid(0));
        for i in 0..n - 1 {
            // Output interval of the bin: increasing x for remove, decreasing for add.
            let (a, b) = match self.dir {
                Direction::Remove => (&points[i], &points[i + 1]),
                Direction::Add => (&points[i + 1], &points[i]),
            };
            let centred = Tail::mass(&a.0, &b.0);
            let mixture = (1.0 - q) * centred + q * Tail::mass(&a.1, &b.1);
            let (upper, lower) = match self.dir {
                Direction::Remove => (mixture, centred),
                Direction::Add => (centred, mixture),
            };
            let (x0, x1) = (exps[i], exps[i + 1]);
            // Split the bin so that both the upper and the lower distribution keep their
            // mass: the lower mass u goes to e1, the rest to e0 (connect the dots).
            let u = ((upper - x0 * lower) / (x1 - x0)).clamp(0.0, lower);
            mass[i] += x0 * (lower - u);
            mass[i + 1] += x1 * u;
        }
        let infinity = self.upper_mass_above(grid(n - 1));
        Ok(Pmf {
            offset: i0,
            mass,
            infinity,
        })
    }
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

    /// Mass in (a, b], from whichever tails keep precision (as `norm_mass`).
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

/// (lowest loss, highest loss, mass) of a run of grid points.
type Bucket = (f64, f64, f64);

/// A coarse view of a pmf for the Chernoff bound: buckets of (lowest loss, highest loss,
/// mass), so that bounding the window costs little however fine the grid is.
fn coarse(pmf: &Pmf, interval: f64) -> Vec<Bucket> {
    let chunk = pmf.mass.len().div_ceil(2048).max(1);
    pmf.mass
        .chunks(chunk)
        .enumerate()
        .filter_map(|(c, ms)| {
            let m: f64 = ms.iter().sum();
            let first = pmf.offset + (c * chunk) as i64;
            let last = first + ms.len() as i64 - 1;
            (m > 0.0).then_some((first as f64 * interval, last as f64 * interval, m))
        })
        .collect()
}

/// log E[exp(lambda L)], rounding each bucket's loss the way that makes it an upper bound.
fn log_mgf(buckets: &[Bucket], lambda: f64) -> f64 {
    let exps: Vec<(f64, f64)> = buckets
        .iter()
        .map(|&(lo, hi, m)| (lambda * if lambda > 0.0 { hi } else { lo }, m))
        .collect();
    let top = exps.iter().map(|e| e.0).fold(f64::NEG_INFINITY, f64::max);
    top + exps
        .iter()
        .map(|&(x, m)| m * (x - top).exp())
        .sum::<f64>()
        .ln()
}

/// Chernoff window (in grid units) holding all but `WINDOW_TAIL` of the composed loss.
fn window(parts: &[(Pmf, u64)], interval: f64) -> (i64, i64) {
    let views: Vec<(Vec<Bucket>, f64)> = parts
        .iter()
        .map(|(p, t)| (coarse(p, interval), *t as f64))
        .collect();
    let lambdas: Vec<f64> = (-20..=20).map(|k| 10f64.powf(f64::from(k) / 5.0)).collect();
    let bound = |sign: f64| {
        lambdas
            .iter()
            .map(|&l| {
                let total: f64 = views.iter().map(|(v, t)| t * log_mgf(v, sign * l)).sum();
                sign * (total - WINDOW_TAIL.ln()) / l
            })
            .fold(f64::INFINITY * sign, |a, b| {
                if sign > 0.0 {
                    a.min(b)
                } else {
                    a.max(b)
                }
            })
    };
    // Never wider than the plain sum of supports.
    let full_lo: i64 = parts
        .iter()
        .map(|(p, t)| p.offset.saturating_mul(*t as i64))
        .sum();
    let full_hi: i64 = parts
        .iter()
        .map(|(p, t)| (p.offset + p.mass.len() as i64 - 1).saturating_mul(*t as i64))
        .sum();
    let lo = ((bound(-1.0) / interval).floor() as i64).max(full_lo);
    let hi = ((bound(1.0) / interval).ceil() as i64).min(full_hi);
    (lo, hi.max(lo))
}

/// z^t by repeated squaring: a few complex multiplications, and its rounding error grows
/// like that of the polar form (about t ulps).
fn pow_u64(mut z: Complex64, mut t: u64) -> Complex64 {
    let mut acc = Complex64::new(1.0, 0.0);
    while t > 0 {
        if t & 1 == 1 {
            acc *= z;
        }
        z *= z;
        t >>= 1;
    }
    acc
}

/// Composes the parts and returns the composed pmf over the Chernoff window.
fn compose(parts: &[(Pmf, u64)], interval: f64) -> Result<Pmf, AccountError> {
    let (lo, hi) = window(parts, interval);
    let width = usize::try_from(hi - lo + 1).map_err(|_| AccountError::Numerical("window"))?;
    if width > MAX_GRID * 4 {
        return Err(AccountError::GridTooLarge);
    }
    let n = fast_len(width);
    // The pmfs are real: a real-to-complex transform does half the work of a complex one.
    let mut planner = RealFftPlanner::<f64>::new();
    let fft = planner.plan_fft_forward(n);
    let ifft = planner.plan_fft_inverse(n);
    let mut product = fft.make_output_vec();
    product
        .iter_mut()
        .for_each(|p| *p = Complex64::new(1.0, 0.0));
    let mut spectrum = fft.make_output_vec();
    let mut base: i64 = 0;
    let mut infinity_survives = 1.0f64;
    for (pmf, t) in parts {
        let mut buf = fft.make_input_vec();
        for (i, &m) in pmf.mass.iter().enumerate() {
            buf[i % n] += m;
        }
        fft.process(&mut buf, &mut spectrum)
            .map_err(|_| AccountError::Numerical("FFT"))?;
        for (p, z) in product.iter_mut().zip(&spectrum) {
            *p *= pow_u64(*z, *t);
        }
        base = base.saturating_add(pmf.offset.saturating_mul(*t as i64));
        infinity_survives *= (1.0 - pmf.infinity).powf(*t as f64);
    }
    // A real signal's spectrum has real DC and Nyquist terms; rounding may leave a trace.
    if let Some(first) = product.first_mut() {
        first.im = 0.0;
    }
    if n.is_multiple_of(2) {
        if let Some(last) = product.last_mut() {
            last.im = 0.0;
        }
    }
    let mut out = ifft.make_output_vec();
    ifft.process(&mut product, &mut out)
        .map_err(|_| AccountError::Numerical("inverse FFT"))?;
    let scale = 1.0 / n as f64;
    let nn = n as i64;
    let mass: Vec<f64> = (lo..=hi)
        .map(|idx| {
            let pos = (idx - base).rem_euclid(nn) as usize;
            (out[pos] * scale).max(0.0)
        })
        .collect();
    Ok(Pmf {
        offset: lo,
        mass,
        infinity: (1.0 - infinity_survives) + WINDOW_TAIL,
    })
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

/// Smallest epsilon >= 0 whose hockey-stick divergence is at most delta.
fn epsilon_for_delta(pmf: &Pmf, interval: f64, delta: f64) -> Result<f64, AccountError> {
    if pmf.infinity > delta {
        return Err(AccountError::Unbounded);
    }
    // On the stretch above atom i, delta(eps) = a - b * exp(eps), with b = sum p_j e^{-L_j}
    // over the atoms above. b is kept as its logarithm: with losses in the thousands (huge
    // step counts) e^{-L} underflows, and a zero b would read as epsilon 0.
    let (mut a, mut log_b) = (pmf.infinity, f64::NEG_INFINITY);
    for i in (0..pmf.mass.len()).rev() {
        let loss = (pmf.offset + i as i64) as f64 * interval;
        // log_b + loss <= log a here (every atom counted lies above `loss`): no overflow.
        if log_b > f64::NEG_INFINITY && a - (log_b + loss).exp() > delta {
            return Ok(((a - delta).ln() - log_b).max(0.0));
        }
        let m = pmf.mass[i];
        if m > 0.0 {
            a += m;
            let term = m.ln() - loss;
            log_b = if log_b == f64::NEG_INFINITY {
                term
            } else {
                log_b.max(term) + (-(log_b - term).abs()).exp().ln_1p()
            };
        }
    }
    if a <= delta {
        return Ok(0.0);
    }
    if log_b == f64::NEG_INFINITY {
        return Err(AccountError::Numerical("empty privacy loss distribution"));
    }
    Ok(((a - delta).ln() - log_b).max(0.0))
}

fn epsilon_in(
    dir: Direction,
    events: &[SgmEvent],
    delta: f64,
    interval: f64,
) -> Result<f64, AccountError> {
    let mut parts = Vec::new();
    for e in events {
        let sgm = Sgm {
            q: e.q.get(),
            sigma: e.sigma.get(),
            dir,
        };
        parts.push((sgm.pmf(interval)?, e.steps));
    }
    let composed = compose(&parts, interval)?;
    epsilon_for_delta(&composed, interval, delta)
}

fn epsilon_at(events: &[SgmEvent], delta: f64, interval: f64) -> Result<f64, AccountError> {
    // With q = 1 both directions are the same Gaussian pair.
    if events.iter().all(|e| e.q.get() >= 1.0) {
        return epsilon_in(Direction::Remove, events, delta, interval);
    }
    // The two directions are independent: one core each.
    let (remove, add) = std::thread::scope(|s| {
        let add = s.spawn(|| epsilon_in(Direction::Add, events, delta, interval));
        let remove = epsilon_in(Direction::Remove, events, delta, interval);
        (remove, add.join())
    });
    let add = add.map_err(|_| AccountError::Numerical("PLD worker panicked"))?;
    Ok(remove?.max(add?))
}

/// Epsilon of a composition at `delta`, with the default grid spacing, coarsened when the
/// grid would not fit in memory (a coarser grid is still an upper bound).
pub fn epsilon(events: &[SgmEvent], delta: f64) -> Result<f64, AccountError> {
    epsilon_with_interval(events, delta, DEFAULT_INTERVAL)
}

/// Epsilon with a chosen starting grid spacing.
pub fn epsilon_with_interval(
    events: &[SgmEvent],
    delta: f64,
    interval: f64,
) -> Result<f64, AccountError> {
    let events = grouped(events);
    if events.is_empty() {
        return Ok(0.0);
    }
    let mut interval = interval;
    for _ in 0..12 {
        match epsilon_at(&events, delta, interval) {
            Err(AccountError::GridTooLarge) => interval *= 2.0,
            other => return other,
        }
    }
    Err(AccountError::GridTooLarge)
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
    fn single_pmf_keeps_mass_and_has_expected_exp_loss() {
        for dir in [Direction::Remove, Direction::Add] {
            let sgm = Sgm {
                q: 0.05,
                sigma: 1.3,
                dir,
            };
            let p = sgm.pmf(1e-3).expect("pmf");
            let total: f64 = p.mass.iter().sum::<f64>() + p.infinity;
            assert!((total - 1.0).abs() < 1e-9, "{dir:?}: {total}");
            // E_upper[exp(-L)] is the lower distribution's total mass: 1.
            let e: f64 = p
                .mass
                .iter()
                .enumerate()
                .map(|(i, m)| m * (-((p.offset + i as i64) as f64 * 1e-3)).exp())
                .sum();
            assert!((e - 1.0).abs() < 1e-6, "{dir:?}: {e}");
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
}
