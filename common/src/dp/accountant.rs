//! One front for both accountants, and the inverse questions a study planner asks: how many
//! steps fit in a budget, and what noise multiplier reaches a target epsilon.
//!
//! Both inverses answer on the safe side: the returned step count's epsilon is within the
//! budget, and the returned noise multiplier's epsilon is at most the target.

use serde::{Deserialize, Serialize};

use super::{pld, rdp, Delta, Epsilon, NoiseMultiplier, ParamError, SampleRate, SgmEvent};

/// Largest step count the planner searches.
pub const MAX_STEPS: u64 = 1_000_000_000;
/// Noise multipliers the calibration searches between.
pub const MIN_SIGMA: f64 = 0.05;
pub const MAX_SIGMA: f64 = 1000.0;

/// Which accountant to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccountantKind {
    /// Rényi DP with the tight conversion; fast, slightly loose.
    Rdp,
    /// Privacy loss distribution; tighter, slower. The default for budgets.
    #[default]
    Pld,
}

impl AccountantKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rdp => "rdp",
            Self::Pld => "pld",
        }
    }
}

impl std::str::FromStr for AccountantKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rdp" => Ok(Self::Rdp),
            "pld" => Ok(Self::Pld),
            other => Err(format!(
                "unknown accountant {other:?} (expected rdp or pld)"
            )),
        }
    }
}

/// Why an accounting question has no finite answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AccountError {
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error(
        "epsilon is unbounded at this delta (the noise is too small for any finite guarantee)"
    )]
    Unbounded,
    #[error("numerical failure in the accountant: {0}")]
    Numerical(&'static str),
    #[error("the privacy loss grid does not fit in memory; use the rdp accountant")]
    GridTooLarge,
    #[error("{0}")]
    Unreachable(String),
}

/// Epsilon spent by a composition of sampled Gaussian mechanisms, at `delta`.
pub fn epsilon(
    kind: AccountantKind,
    events: &[SgmEvent],
    delta: Delta,
) -> Result<f64, AccountError> {
    match kind {
        AccountantKind::Rdp => rdp::epsilon(events, delta.get()),
        AccountantKind::Pld => pld::epsilon(events, delta.get()),
    }
}

fn fits(
    kind: AccountantKind,
    prior: &[SgmEvent],
    next: SgmEvent,
    budget: Epsilon,
    delta: Delta,
) -> Result<bool, AccountError> {
    let mut all = prior.to_vec();
    all.push(next);
    match epsilon(kind, &all, delta) {
        Ok(e) => Ok(e <= budget.get()),
        Err(AccountError::Unbounded) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Largest number of further steps of (q, sigma), after `prior`, whose total epsilon stays
/// within `budget`. Zero when not even one step fits; capped at [`MAX_STEPS`].
///
/// The answer is the boundary of [`epsilon`] itself: it fits and one more step does not.
/// The search that finds it is faster than bisecting [`epsilon`]: RDP solves each order's
/// affine sum directly, PLD interpolates from the RDP answer reusing one mechanism's
/// spectrum; both are then confirmed (and if need be corrected) by [`epsilon`].
pub fn max_steps(
    kind: AccountantKind,
    prior: &[SgmEvent],
    q: SampleRate,
    sigma: NoiseMultiplier,
    budget: Epsilon,
    delta: Delta,
) -> Result<u64, AccountError> {
    let next = SgmEvent { q, sigma, steps: 1 };
    let rdp_estimate = rdp::max_steps(prior, next, budget.get(), delta.get(), MAX_STEPS)?;
    let estimate = match kind {
        AccountantKind::Rdp => rdp_estimate,
        AccountantKind::Pld => pld::max_steps(
            prior,
            next,
            budget.get(),
            delta.get(),
            rdp_estimate,
            MAX_STEPS,
        )?,
    };
    settle(estimate, |t| {
        fits(kind, prior, SgmEvent { steps: t, ..next }, budget, delta)
    })
}

/// The t near `estimate` with `fits(t)` and not `fits(t + 1)` (0 when nothing fits, and
/// [`MAX_STEPS`] when that fits), for a monotone `fits`: gallop away from the estimate
/// until the answer is bracketed, then bisect.
fn settle(
    estimate: u64,
    mut fits: impl FnMut(u64) -> Result<bool, AccountError>,
) -> Result<u64, AccountError> {
    let estimate = estimate.min(MAX_STEPS);
    let (mut lo, mut hi);
    if fits(estimate)? {
        lo = estimate;
        let mut step = 1u64;
        loop {
            if lo >= MAX_STEPS {
                return Ok(MAX_STEPS);
            }
            let t = lo.saturating_add(step).min(MAX_STEPS);
            if fits(t)? {
                lo = t;
                step = step.saturating_mul(2);
            } else {
                hi = t;
                break;
            }
        }
    } else {
        hi = estimate;
        let mut step = 1u64;
        loop {
            if hi == 0 {
                return Ok(0);
            }
            let t = hi.saturating_sub(step);
            if fits(t)? {
                lo = t;
                break;
            }
            hi = t;
            step = step.saturating_mul(2);
        }
    }
    // Invariant: lo fits, hi does not.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// Smallest noise multiplier (to 0.1% relative) whose epsilon over `steps` steps at rate q
/// is at most `target`: the answer's epsilon is at most the target and that of a multiplier
/// 0.1% smaller is above it.
///
/// Safeguarded false position (Illinois) on epsilon in ln sigma, from a bracket around the
/// RDP answer for PLD: a handful of evaluations instead of a dozen bisection steps.
pub fn calibrate_noise(
    kind: AccountantKind,
    q: SampleRate,
    steps: u64,
    target: Epsilon,
    delta: Delta,
) -> Result<NoiseMultiplier, AccountError> {
    if steps == 0 {
        return Err(AccountError::Unreachable(
            "zero steps spend no budget: there is no noise multiplier to calibrate".into(),
        ));
    }
    let target_eps = target.get();
    // Epsilon minus the target (positive: too little noise); infinite when unbounded.
    let excess = |sigma: f64| -> Result<f64, AccountError> {
        let ev = SgmEvent {
            q,
            sigma: NoiseMultiplier::new(sigma)?,
            steps,
        };
        match epsilon(kind, &[ev], delta) {
            Ok(e) => Ok(e - target_eps),
            Err(AccountError::Unbounded) | Err(AccountError::GridTooLarge) => Ok(f64::INFINITY),
            Err(e) => Err(e),
        }
    };
    // RDP bounds PLD from above: its answer is a noise level PLD accepts, a little more
    // than PLD needs.
    let (start, shrink) = match kind {
        AccountantKind::Pld => (
            calibrate_noise(AccountantKind::Rdp, q, steps, target, delta)?.get(),
            0.8,
        ),
        AccountantKind::Rdp => (1.0, 0.5),
    };
    // Bracket: `hi` reaches the target, `lo` does not.
    let mut hi = (start, excess(start)?);
    let mut lo: Option<(f64, f64)> = None;
    while hi.1 > 0.0 {
        lo = Some(hi);
        let s = hi.0 * 2.0;
        if s > MAX_SIGMA {
            return Err(AccountError::Unreachable(format!(
                "no noise multiplier up to {MAX_SIGMA} reaches epsilon {target} in {steps} steps"
            )));
        }
        hi = (s, excess(s)?);
    }
    let mut lo = match lo {
        Some(lo) => lo,
        None => loop {
            let s = hi.0 * shrink;
            if s < MIN_SIGMA {
                return NoiseMultiplier::new(hi.0).map_err(Into::into);
            }
            let e = excess(s)?;
            if e > 0.0 {
                break (s, e);
            }
            hi = (s, e);
        },
    };
    const TOL: f64 = 1e-3;
    let (mut f_lo, mut f_hi) = (lo.1, hi.1);
    let mut last_side = 0i8;
    while (hi.0 - lo.0) / hi.0 > TOL {
        let (a, b) = (lo.0.ln(), hi.0.ln());
        let mut x = if f_lo.is_finite() && f_lo > f_hi {
            a + (b - a) * f_lo / (f_lo - f_hi)
        } else {
            0.5 * (a + b)
        };
        // An estimate at the reaching end cannot close the bracket: step just inside it.
        let inner = (hi.0 * (1.0 - 0.9 * TOL)).ln();
        if x > inner {
            x = inner;
        }
        let s = x.exp().clamp(lo.0, hi.0);
        let e = excess(s)?;
        if e <= 0.0 {
            hi = (s, e);
            f_hi = e;
            if last_side < 0 {
                f_lo /= 2.0;
            }
            last_side = -1;
        } else {
            lo = (s, e);
            f_lo = e;
            if last_side > 0 {
                f_hi /= 2.0;
            }
            last_side = 1;
        }
    }
    NoiseMultiplier::new(hi.0).map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Delta {
        Delta::new(1e-5).expect("valid")
    }

    #[test]
    fn max_steps_is_the_boundary() {
        let (q, s) = (
            SampleRate::new(0.01).expect("q"),
            NoiseMultiplier::new(1.0).expect("s"),
        );
        let budget = Epsilon::new(2.0).expect("eps");
        for kind in [AccountantKind::Rdp, AccountantKind::Pld] {
            let t = max_steps(kind, &[], q, s, budget, d()).expect("answer");
            assert!(t > 100, "{kind:?}: {t}");
            let at = epsilon(
                kind,
                &[SgmEvent {
                    q,
                    sigma: s,
                    steps: t,
                }],
                d(),
            )
            .expect("eps");
            let past = epsilon(
                kind,
                &[SgmEvent {
                    q,
                    sigma: s,
                    steps: t + 1,
                }],
                d(),
            )
            .expect("eps");
            assert!(at <= 2.0 && past > 2.0, "{kind:?}: {t} -> {at}, {past}");
        }
    }

    #[test]
    fn prior_spend_reduces_what_fits() {
        let (q, s) = (
            SampleRate::new(0.01).expect("q"),
            NoiseMultiplier::new(1.0).expect("s"),
        );
        let budget = Epsilon::new(2.0).expect("eps");
        let fresh = max_steps(AccountantKind::Rdp, &[], q, s, budget, d()).expect("t");
        let prior = [SgmEvent {
            q,
            sigma: s,
            steps: 500,
        }];
        let after = max_steps(AccountantKind::Rdp, &prior, q, s, budget, d()).expect("t");
        assert_eq!(after, fresh - 500);
        let none = max_steps(
            AccountantKind::Rdp,
            &[],
            SampleRate::new(1.0).expect("q"),
            s,
            Epsilon::new(0.1).expect("e"),
            d(),
        );
        assert_eq!(none, Ok(0));
    }

    #[test]
    fn calibrated_noise_hits_target_from_above() {
        let q = SampleRate::new(0.01).expect("q");
        let target = Epsilon::new(1.0).expect("eps");
        for kind in [AccountantKind::Rdp, AccountantKind::Pld] {
            let s = calibrate_noise(kind, q, 1000, target, d()).expect("sigma");
            let at = epsilon(
                kind,
                &[SgmEvent {
                    q,
                    sigma: s,
                    steps: 1000,
                }],
                d(),
            )
            .expect("eps");
            let below = NoiseMultiplier::new(s.get() * 0.99).expect("s");
            let under = epsilon(
                kind,
                &[SgmEvent {
                    q,
                    sigma: below,
                    steps: 1000,
                }],
                d(),
            )
            .expect("eps");
            assert!(
                at <= 1.0 && under > 1.0,
                "{kind:?}: sigma {s} -> {at}, {under}"
            );
        }
        assert!(calibrate_noise(AccountantKind::Rdp, q, 0, target, d()).is_err());
    }
}
