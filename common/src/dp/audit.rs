//! The empirical lower bound on epsilon of "Privacy Auditing with One (1) Training Run"
//! (Steinke, Nasr, Jagielski, NeurIPS 2023).
//!
//! An audit inserts `m` canaries, each by its own fair secret coin; after one training run
//! it scores every canary and guesses "in" for the `k+` highest scores and "out" for the
//! `k-` lowest (`r = k+ + k-` guesses, both numbers fixed before scoring), abstaining on the
//! rest. If the mechanism is (epsilon, delta)-DP, the number of correct guesses `v` is at
//! most what `r` flips of a coin with bias e^epsilon / (1 + e^epsilon) give, plus a term in
//! delta (their Theorem 3.1; the p-value below is their Algorithm 2). An epsilon whose
//! p-value is below `1 - confidence` is ruled out: the largest such epsilon is the lower
//! bound. It is a statistical statement about the code that ran, independent of the
//! accountant: a bound above the accountant's epsilon means the implementation leaks more
//! than it claims (a noise scale off by a factor, a missed clip, a reused draw).
//!
//! With `r` guesses the bound cannot exceed about ln(r / 3) however leaky the mechanism:
//! one run proves little about large epsilons.

/// ln C(n, k).
fn ln_binom(n: u64, k: u64) -> f64 {
    libm::lgamma(n as f64 + 1.0) - libm::lgamma(k as f64 + 1.0) - libm::lgamma((n - k) as f64 + 1.0)
}

/// P[Binomial(n, p) = k].
fn binom_pmf(k: u64, n: u64, p: f64) -> f64 {
    if k > n {
        return 0.0;
    }
    if p <= 0.0 {
        return if k == 0 { 1.0 } else { 0.0 };
    }
    if p >= 1.0 {
        return if k == n { 1.0 } else { 0.0 };
    }
    (ln_binom(n, k) + k as f64 * p.ln() + (n - k) as f64 * (-p).ln_1p()).exp()
}

/// P[Binomial(n, p) >= k].
fn binom_sf(k: u64, n: u64, p: f64) -> f64 {
    (k..=n).map(|j| binom_pmf(j, n, p)).sum::<f64>().min(1.0)
}

/// The probability, for an (epsilon, delta)-DP mechanism audited with `m` canaries, that an
/// auditor making `r` guesses gets at least `v` right (Algorithm 2 of Steinke et al.).
pub fn p_value(m: u64, r: u64, v: u64, epsilon: f64, delta: f64) -> f64 {
    if v == 0 {
        return 1.0;
    }
    let q = 1.0 / (1.0 + (-epsilon).exp());
    let beta = binom_sf(v, r, q);
    // alpha = max over i of P[v > Bin(r, q) >= v - i] / i.
    let (mut alpha, mut sum) = (0f64, 0f64);
    for i in 1..=v {
        sum += binom_pmf(v - i, r, q);
        if sum > i as f64 * alpha {
            alpha = sum / i as f64;
        }
    }
    (beta + alpha * delta * 2.0 * m as f64).min(1.0)
}

/// The largest epsilon that `v` correct guesses out of `r` (with `m` canaries) rule out at
/// `confidence` (e.g. 0.95): the mechanism is not (epsilon, delta)-DP for any smaller one.
/// 0 when nothing is ruled out.
pub fn epsilon_lower_bound(m: u64, r: u64, v: u64, delta: f64, confidence: f64) -> f64 {
    let p = 1.0 - confidence;
    if !(p > 0.0 && p < 1.0) || v == 0 || p_value(m, r, v, 0.0, delta) >= p {
        return 0.0;
    }
    let (mut lo, mut hi) = (0f64, 1f64);
    while p_value(m, r, v, hi, delta) < p {
        hi += 1.0;
        if hi > 100.0 {
            return hi;
        }
    }
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if p_value(m, r, v, mid, delta) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The auditor's guesses: "in" for the `k_in` highest scores and "out" for the `k_out`
/// lowest (counts fixed before scoring); returns (guesses made, correct guesses) against
/// the secret inclusions.
pub fn guess(scores: &[f64], included: &[bool], k_in: usize, k_out: usize) -> (u64, u64) {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let k_in = k_in.min(idx.len());
    let k_out = k_out.min(idx.len() - k_in);
    let right_in = idx[..k_in].iter().filter(|&&i| included[i]).count();
    let right_out = idx[idx.len() - k_out..]
        .iter()
        .filter(|&&i| !included[i])
        .count();
    ((k_in + k_out) as u64, (right_in + right_out) as u64)
}

/// The Clopper-Pearson interval for a binomial proportion: `k` successes in `n` trials, at
/// `confidence` (two-sided, exact: never narrower than the truth allows).
pub fn clopper_pearson(k: u64, n: u64, confidence: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let tail = (1.0 - confidence) / 2.0;
    // Both ends by bisection on the binomial tails, which are monotone in p.
    let solve = |f: &dyn Fn(f64) -> bool| {
        let (mut lo, mut hi) = (0f64, 1f64);
        for _ in 0..60 {
            let mid = (lo + hi) / 2.0;
            if f(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        (lo + hi) / 2.0
    };
    let lower = if k == 0 {
        0.0
    } else {
        // The smallest p with P[Bin(n, p) >= k] >= tail.
        solve(&|p| binom_sf(k, n, p) >= tail)
    };
    let upper = if k == n {
        1.0
    } else {
        // The largest p with P[Bin(n, p) <= k] >= tail.
        solve(&|p| 1.0 - binom_sf(k + 1, n, p) < tail)
    };
    (lower, upper)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_helpers_by_hand() {
        assert!((binom_pmf(2, 4, 0.5) - 6.0 / 16.0).abs() < 1e-12);
        assert!((binom_sf(3, 4, 0.5) - 5.0 / 16.0).abs() < 1e-12);
        assert!((binom_sf(0, 7, 0.3) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn chance_level_guessing_rules_nothing_out_and_perfect_guessing_is_capped_by_r() {
        // Half right: consistent with epsilon 0.
        assert_eq!(epsilon_lower_bound(1000, 100, 50, 1e-5, 0.95), 0.0);
        // All right: the bound grows with r but stays near ln(r) at most.
        let mut last = 0.0;
        for r in [10u64, 100, 1000] {
            let b = epsilon_lower_bound(1000, r, r, 0.0, 0.95);
            assert!(b > last && b < (r as f64).ln() + 1.0, "r {r}: {b}");
            last = b;
        }
    }

    #[test]
    fn the_bound_is_where_the_p_value_crosses() {
        let (m, r, v, d) = (1000, 200, 160, 1e-6);
        let b = epsilon_lower_bound(m, r, v, d, 0.95);
        assert!(b > 0.5);
        assert!(p_value(m, r, v, b - 1e-6, d) < 0.05);
        assert!(p_value(m, r, v, b + 1e-3, d) >= 0.05);
        // More delta makes the null harder to reject: a smaller bound.
        assert!(epsilon_lower_bound(m, r, v, 1e-3, 0.95) < b);
    }

    #[test]
    fn clopper_pearson_matches_published_values() {
        // scipy.stats.binomtest(5, 20).proportion_ci(method="exact"): (0.0866, 0.4910).
        let (lo, hi) = clopper_pearson(5, 20, 0.95);
        assert!(
            (lo - 0.086_571).abs() < 1e-4 && (hi - 0.491_046).abs() < 1e-4,
            "{lo} {hi}"
        );
        // 0 of 10: upper = 1 - 0.025^(1/10).
        let (lo, hi) = clopper_pearson(0, 10, 0.95);
        assert_eq!(lo, 0.0);
        assert!((hi - (1.0 - 0.025f64.powf(0.1))).abs() < 1e-6, "{hi}");
        assert_eq!(clopper_pearson(10, 10, 0.95).1, 1.0);
    }

    #[test]
    fn guesses_count_the_top_and_bottom() {
        let scores = [0.9, 0.1, 0.8, 0.2, 0.5];
        let included = [true, false, false, false, true];
        // Top 2: 0.9 (in, right), 0.8 (out, wrong); bottom 2: 0.1 (right), 0.2 (right).
        assert_eq!(guess(&scores, &included, 2, 2), (4, 3));
    }
}
