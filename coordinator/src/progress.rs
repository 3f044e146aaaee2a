//! The progress `fedpriv-coordinator run` shows on a terminal (instead of the info log):
//! per study a bar of rounds of its plan, the sites that made the last round, a bar of
//! epsilon spent of the budget and the last DP evaluation, redrawn in place as a block
//! ([`Board`]). Pure: the caller feeds it events and writes what it returns.

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

/// Every study's progress, drawn as one block of lines that each redraw replaces.
#[derive(Debug, Default)]
pub struct Board {
    /// Per study (in name order): its round line and, once it has one, its evaluation.
    studies: std::collections::BTreeMap<String, Row>,
    /// Lines the last drawing took (the cursor is below them).
    drawn: usize,
}

#[derive(Debug, Default)]
struct Row {
    line: String,
    evaluation: Option<String>,
    ended: Option<String>,
}

impl Board {
    pub fn new() -> Self {
        Self::default()
    }

    /// A round completed.
    pub fn round(
        &mut self,
        study: &str,
        round: u64,
        planned: Option<u64>,
        sites: usize,
        epsilon: f64,
        budget: f64,
    ) {
        self.studies.entry(study.to_string()).or_default().line =
            line(study, round, planned, sites, epsilon, budget);
    }

    /// A DP evaluation arrived.
    pub fn evaluation(
        &mut self,
        study: &str,
        model_round: u64,
        s: &fedpriv_common::evaluation::EvalSummary,
    ) {
        let (metric, value) = s.headline();
        let sd = s
            .accuracy_sd
            .map(|sd| format!(" +- {sd:.3}"))
            .unwrap_or_default();
        self.studies
            .entry(study.to_string())
            .or_default()
            .evaluation = Some(format!(
            "  evaluation of round {model_round}: {metric} {value:.3}{sd} (noised, {} site(s))",
            s.sites
        ));
    }

    /// The study ended.
    pub fn ended(&mut self, study: &str, reason: &str) {
        let reason: String = reason.chars().filter(|c| !c.is_control()).collect();
        self.studies.entry(study.to_string()).or_default().ended = Some(reason);
    }

    /// The text that replaces the last drawing with the current one: up over the lines
    /// drawn before, each line cleared and rewritten.
    pub fn redraw(&mut self) -> String {
        let mut lines = Vec::new();
        for (name, row) in &self.studies {
            let first = if row.line.is_empty() {
                line(name, 0, None, 0, 0.0, 0.0)
            } else {
                row.line.clone()
            };
            lines.push(first);
            if let Some(e) = &row.evaluation {
                lines.push(e.clone());
            }
            if let Some(r) = &row.ended {
                lines.push(format!("  ended: {r}"));
            }
        }
        let mut out = String::new();
        if self.drawn > 0 {
            out.push_str(&format!("\x1b[{}A", self.drawn));
        }
        for l in &lines {
            out.push_str("\r\x1b[2K");
            out.push_str(l);
            out.push('\n');
        }
        self.drawn = lines.len();
        out
    }
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

    #[test]
    fn the_board_redraws_its_block_in_place() {
        let mut b = Board::new();
        b.round("bc", 1, Some(4), 3, 0.5, 4.0);
        let first = b.redraw();
        assert!(
            !first.contains("\x1b[") || first.starts_with("\r\x1b[2K"),
            "{first:?}"
        );
        assert_eq!(first.matches('\n').count(), 1);
        b.round("bc", 2, Some(4), 3, 1.0, 4.0);
        b.round("wine", 1, Some(9), 2, 0.2, 8.0);
        let s = fedpriv_common::evaluation::EvalSummary {
            sites: 3,
            examples: 90.0,
            noise_sd: 4.5,
            accuracy: Some(0.8),
            accuracy_sd: Some(0.05),
            recall: vec![0.7, 0.9],
            mean_loss: 0.4,
            mean_loss_sd: 0.05,
            rmse: None,
        };
        b.evaluation("bc", 1, &s);
        let second = b.redraw();
        // Up over the one line drawn before, then three lines: bc, its evaluation, wine.
        assert!(
            second.starts_with("\x1b[1A\r\x1b[2Kbc: round 2/4"),
            "{second:?}"
        );
        assert_eq!(second.matches('\n').count(), 3);
        assert!(
            second.contains("evaluation of round 1: accuracy 0.800 +- 0.050"),
            "{second:?}"
        );
        b.ended("bc", "all 4 planned rounds are done\x1b[2J");
        let third = b.redraw();
        assert!(third.starts_with("\x1b[3A"), "{third:?}");
        assert!(
            third.contains("ended: all 4 planned rounds are done[2J"),
            "{third:?}"
        );
    }
}
