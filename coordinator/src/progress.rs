//! The progress line `fedpriv-coordinator run` shows on a terminal (instead of the info
//! log): per study, the round of its plan, the sites that made it and the epsilon spent of
//! the budget. Pure: the caller decides when to draw it.

/// One study's progress as a line of at most about 100 columns.
pub fn line(
    study: &str,
    round: u64,
    planned: Option<u64>,
    sites: usize,
    epsilon: f64,
    budget: f64,
) -> String {
    const WIDTH: usize = 24;
    let bar = |done: f64| {
        let filled = ((done.clamp(0.0, 1.0)) * WIDTH as f64).round() as usize;
        format!("[{}{}]", "#".repeat(filled), ".".repeat(WIDTH - filled))
    };
    let rounds = match planned {
        Some(p) if p > 0 => format!("round {round}/{p} {}", bar(round as f64 / p as f64)),
        _ => format!("round {round}"),
    };
    // Names come from configs: keep control characters off the terminal.
    let name: String = study
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(32)
        .collect();
    format!(
        "{name}: {rounds} {sites} site(s), epsilon {epsilon:.3} of {budget} {}",
        bar(if budget > 0.0 { epsilon / budget } else { 1.0 })
    )
}

/// A study's DP evaluation as a line: the headline figure with the noise's standard
/// deviation on it (the figures are noised; the band is part of the reading).
pub fn evaluation_line(
    study: &str,
    model_round: u64,
    s: &fedpriv_common::evaluation::EvalSummary,
) -> String {
    let name: String = study
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(32)
        .collect();
    let (metric, value) = s.headline();
    let sd = match (s.accuracy_sd, s.rmse) {
        (Some(sd), _) => format!(" +- {sd:.3}"),
        _ => String::new(),
    };
    format!(
        "{name}: DP evaluation of the model after round {model_round}: {metric} {value:.3}{sd}, mean loss {:.3} ({} site(s), ~{:.0} held-out records, noised)",
        s.mean_loss, s.sites, s.examples
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_follow_rounds_and_budget() {
        let l = line("bc", 5, Some(20), 3, 1.0, 4.0);
        assert_eq!(
            l,
            "bc: round 5/20 [######..................] 3 site(s), epsilon 1.000 of 4 [######..................]"
        );
        let l = line("x\u{1b}[2J", 7, None, 2, 9.0, 4.0);
        assert!(l.starts_with("x?[2J: round 7 2 site(s)"), "{l}");
        assert!(l.ends_with(&format!("[{}]", "#".repeat(24))), "{l}");
    }
}
