//! A Rényi privacy filter: a cap on epsilon that holds under fully adaptive composition.
//!
//! A site's data source is read by study after study, each chosen (by people, or by a
//! hostile coordinator) after seeing what the earlier ones released. Ordinary composition
//! theorems assume the mechanisms and their parameters were fixed in advance; a *filter*
//! (Rogers, Roth, Ullman, Vadhan 2016) is a stopping rule that keeps the whole adaptive
//! interaction within a budget. Feldman and Zrnic ("Individual Privacy Accounting via a
//! Rényi Filter", 2021) show that for a fixed order alpha, admitting mechanisms only while
//! the sum of their RDP at alpha stays within B keeps the interaction (alpha, B)-RDP, even
//! when each mechanism and its RDP are chosen adaptively.
//!
//! One order would waste budget (the best order depends on the mechanisms that come), so
//! this filter watches a fixed set of `k` orders and admits an event while *some* order has
//! room. Why that stays sound: let T be the last admitted event and alpha* an order that
//! admitted it. RDP sums only grow, so up to T the sum at alpha* never left its budget: the
//! interaction stopped at T is, on that outcome, the same as the one stopped by the
//! single-order filter at alpha*. Hence the event "privacy loss at T exceeds epsilon" lies in
//! the union over the orders of "the single-order-filtered loss exceeds epsilon", each of
//! probability at most exp((alpha-1)(B_alpha - epsilon)) (Markov's inequality on the
//! RDP moment). With B_alpha = epsilon - ln(k/delta)/(alpha-1) each is at most delta/k, and a
//! privacy loss that exceeds epsilon with probability at most delta gives (epsilon,
//! delta)-DP. The price of watching k orders is ln(k) in the conversion.
//!
//! The orders are part of the filter: changing them for a source that was already charged
//! would start a different filter, so the site ledger stores them with the source.

use super::accountant::AccountError;
use super::{rdp, SgmEvent};

/// The orders a new data source's filter watches: dense where Gaussian-like mechanisms
/// with moderate noise find their best order, sparse above.
pub const DEFAULT_ORDERS: [f64; 28] = [
    1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 20.0, 24.0, 28.0, 32.0,
    40.0, 48.0, 64.0, 80.0, 96.0, 128.0, 192.0, 256.0, 384.0, 512.0, 1024.0,
];

/// The filter's reading of a sequence of events: the smallest cap under which it would
/// have admitted every one of them (`min` over the orders of the RDP sum plus
/// ln(k/delta)/(alpha-1)), and the order that attains it. Infinite when no order bounds
/// the events.
pub fn level(events: &[SgmEvent], orders: &[f64], delta: f64) -> Result<(f64, f64), AccountError> {
    if orders.is_empty() || orders.iter().any(|&a| !(a > 1.0 && a.is_finite())) {
        return Err(AccountError::Numerical(
            "filter orders must be finite and above 1",
        ));
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(AccountError::Numerical("filter delta must be in (0, 1)"));
    }
    let sums = rdp::compose(events, orders)?;
    let penalty = (orders.len() as f64 / delta).ln();
    let mut best = (f64::INFINITY, f64::NAN);
    for (&a, &r) in orders.iter().zip(&sums) {
        let l = r + penalty / (a - 1.0);
        if l < best.0 {
            best = (l, a);
        }
    }
    Ok(best)
}

/// Whether the filter with cap `epsilon` at `delta` admits `next` after `spent` (every
/// event it admitted before). Equivalent to `level(spent + next) <= epsilon`.
pub fn admits(
    spent: &[SgmEvent],
    next: &[SgmEvent],
    orders: &[f64],
    epsilon: f64,
    delta: f64,
) -> Result<bool, AccountError> {
    let mut all = spent.to_vec();
    all.extend_from_slice(next);
    let (l, _) = level(&all, orders, delta)?;
    Ok(l <= epsilon)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(q: f64, sigma: f64, steps: u64) -> SgmEvent {
        SgmEvent::new(q, sigma, steps).expect("event")
    }

    #[test]
    fn the_level_is_a_valid_bound_never_below_the_non_adaptive_accountants() {
        // The filter pays ln(k) for adaptivity and uses the plain Markov conversion, so it
        // can only be above what RDP (tight conversion) and PLD say for the same events
        // composed non-adaptively.
        for events in [
            vec![ev(0.01, 1.0, 1000)],
            vec![ev(1.0, 2.0, 10), ev(0.1, 1.2, 200)],
            vec![ev(1.0, 0.5, 3)],
        ] {
            let (l, order) = level(&events, &DEFAULT_ORDERS, 1e-5).expect("level");
            let r = rdp::epsilon(&events, 1e-5).expect("rdp");
            let p = crate::dp::pld::epsilon(&events, 1e-5).expect("pld");
            assert!(l >= r && l >= p, "level {l} vs rdp {r}, pld {p}");
            assert!(DEFAULT_ORDERS.contains(&order));
            // ... and not absurdly so: the ln(k) and the looser conversion cost a bounded
            // amount over the tight RDP figure.
            assert!(l < r + 4.0, "level {l} vs rdp {r}");
        }
    }

    #[test]
    fn the_level_by_hand_for_one_gaussian_release() {
        // A Gaussian at q = 1 has RDP alpha / (2 sigma^2); the level is the minimum over the
        // orders of that plus ln(k/delta)/(alpha-1).
        let (sigma, delta) = (2.0f64, 1e-6f64);
        let penalty = (DEFAULT_ORDERS.len() as f64 / delta).ln();
        let want = DEFAULT_ORDERS
            .iter()
            .map(|&a| a / (2.0 * sigma * sigma) + penalty / (a - 1.0))
            .fold(f64::INFINITY, f64::min);
        let (got, _) = level(&[ev(1.0, sigma, 1)], &DEFAULT_ORDERS, delta).expect("level");
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }

    #[test]
    fn admission_stops_exactly_at_the_cap_and_grows_with_every_event() {
        let step = ev(1.0, 3.0, 1);
        let mut spent = Vec::new();
        let mut last = 0.0;
        let cap = 4.0;
        while admits(&spent, &[step], &DEFAULT_ORDERS, cap, 1e-5).expect("admits") {
            spent.push(step);
            let (l, _) = level(&spent, &DEFAULT_ORDERS, 1e-5).expect("level");
            assert!(l > last && l <= cap);
            last = l;
            assert!(spent.len() < 10_000);
        }
        let mut over = spent.clone();
        over.push(step);
        assert!(level(&over, &DEFAULT_ORDERS, 1e-5).expect("level").0 > cap);
        assert!(!spent.is_empty());
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(level(&[], &[], 1e-5).is_err());
        assert!(level(&[], &[1.0], 1e-5).is_err());
        assert!(level(&[], &[2.0], 0.0).is_err());
        let (l, _) = level(&[], &DEFAULT_ORDERS, 1e-5).expect("empty");
        assert!(l > 0.0 && l.is_finite());
    }
}
