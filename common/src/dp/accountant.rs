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
pub fn max_steps(
    kind: AccountantKind,
    prior: &[SgmEvent],
    q: SampleRate,
    sigma: NoiseMultiplier,
    budget: Epsilon,
    delta: Delta,
) -> Result<u64, AccountError> {
    let step = |t: u64| SgmEvent { q, sigma, steps: t };
    // RDP bounds the PLD from above, so its answer is a safe starting point for PLD.
    let mut lo = match kind {
        AccountantKind::Pld => max_steps(AccountantKind::Rdp, prior, q, sigma, budget, delta)?,
        AccountantKind::Rdp => 0,
    };
    if lo > 0 && !fits(kind, prior, step(lo), budget, delta)? {
        lo = 0;
    }
    if lo == 0 && !fits(kind, prior, step(1), budget, delta)? {
        return Ok(0);
    }
    lo = lo.max(1);
    let mut hi = lo.saturating_mul(2);
    while fits(kind, prior, step(hi), budget, delta)? {
        if hi >= MAX_STEPS {
            return Ok(MAX_STEPS);
        }
        lo = hi;
        hi = hi.saturating_mul(2).min(MAX_STEPS);
    }
    // Invariant: lo fits, hi does not.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(kind, prior, step(mid), budget, delta)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// Smallest noise multiplier (to 0.1% relative) whose epsilon over `steps` steps at rate q
/// is at most `target`.
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
    let ok = |sigma: f64| -> Result<bool, AccountError> {
        let ev = SgmEvent {
            q,
            sigma: NoiseMultiplier::new(sigma)?,
            steps,
        };
        match epsilon(kind, &[ev], delta) {
            Ok(e) => Ok(e <= target.get()),
            Err(AccountError::Unbounded) | Err(AccountError::GridTooLarge) => Ok(false),
            Err(e) => Err(e),
        }
    };
    let mut hi = match kind {
        AccountantKind::Pld => calibrate_noise(AccountantKind::Rdp, q, steps, target, delta)?.get(),
        AccountantKind::Rdp => 1.0,
    };
    while !ok(hi)? {
        hi *= 2.0;
        if hi > MAX_SIGMA {
            return Err(AccountError::Unreachable(format!(
                "no noise multiplier up to {MAX_SIGMA} reaches epsilon {target} in {steps} steps"
            )));
        }
    }
    let mut lo = hi / 2.0;
    while ok(lo)? {
        hi = lo;
        lo /= 2.0;
        if lo < MIN_SIGMA {
            return NoiseMultiplier::new(hi).map_err(Into::into);
        }
    }
    // Invariant: lo misses the target, hi reaches it.
    while (hi - lo) / hi > 1e-3 {
        let mid = 0.5 * (lo + hi);
        if ok(mid)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    NoiseMultiplier::new(hi).map_err(Into::into)
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
