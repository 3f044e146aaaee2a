//! DP evaluation in the round engine: each site's noised vector for a round that carries
//! an evaluation is checked and kept, and the round's sum is read when the round closes
//! (see [`fedpriv_common::evaluation`]).

use super::*;

impl StudyEngine {
    /// A site's noised evaluation vector: kept for the round's summary when the round
    /// carries an evaluation, the site was sent it and has not sent one yet, and the vector
    /// has the study's shape with finite values an honest site could send.
    pub(super) fn on_evaluation(
        &mut self,
        site: String,
        round: u64,
        values: Vec<f64>,
        out: &mut Vec<Action>,
    ) {
        let plan = self.cfg.evaluation;
        let layout = evaluation::Layout::of(&self.cfg.data);
        let records = self.records.get(&site).copied().unwrap_or(0);
        let problem = match (&self.phase, plan) {
            (_, None) => Some("the study has no evaluation".to_string()),
            (
                Phase::Collecting {
                    round: current,
                    selected,
                    evaluation,
                    evaluations,
                    closing,
                    ..
                },
                Some(plan),
            ) => {
                let bound = layout.value_bound(records, plan.loss_clip, plan.noise_sd(&layout));
                if *current != round || evaluation.is_none() || *closing {
                    Some(format!("round {round} takes no evaluation now"))
                } else if !selected.contains(&site) {
                    Some("the site was not sent this round".into())
                } else if evaluations.contains_key(&site) {
                    Some("the site already sent this round's evaluation".into())
                } else if values.len() != layout.len() {
                    Some(format!(
                        "{} values where the study's evaluation has {}",
                        values.len(),
                        layout.len()
                    ))
                } else if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    Some(format!("value {i} is not finite"))
                } else {
                    values.iter().position(|v| v.abs() > bound).map(|i| {
                        format!(
                            "value {i} is beyond {bound:.0}, more than {records} records and the noise explain"
                        )
                    })
                }
            }
            _ => Some(format!("round {round} takes no evaluation now")),
        };
        match problem {
            Some(reason) => out.push(Action::EvaluationRejected {
                site,
                round,
                reason,
            }),
            None => {
                if let Phase::Collecting { evaluations, .. } = &mut self.phase {
                    evaluations.insert(site, values);
                }
            }
        }
    }

    /// The round's evaluation, from the sum of the vectors that arrived.
    pub(super) fn summarize_evaluations(
        &self,
        round: u64,
        evaluations: &BTreeMap<String, Vec<f64>>,
        out: &mut Vec<Action>,
    ) {
        let Some(plan) = self.cfg.evaluation else {
            return;
        };
        if evaluations.is_empty() {
            return;
        }
        let layout = evaluation::Layout::of(&self.cfg.data);
        let mut sum = vec![0.0; layout.len()];
        for v in evaluations.values() {
            for (s, x) in sum.iter_mut().zip(v) {
                *s += x;
            }
        }
        let Some(summary) = evaluation::EvalSummary::from_sum(
            layout,
            &sum,
            evaluations.len(),
            plan.noise_sd(&layout),
            self.cfg.data.label_range,
        ) else {
            return;
        };
        out.push(Action::Evaluated {
            round,
            model_round: round - 1,
            sites: evaluations.keys().cloned().collect(),
            sum,
            summary,
        });
    }
}
