//! Calibration in the round engine: a record study with `target_epsilon` gets its sigma
//! from the sites' declared sizes before anyone is charged.

use super::*;

impl StudyEngine {
    /// A record study with `target_epsilon`: once every enrolled site still in the study has
    /// declared its record count (or enough have, and the others had the gathering time to
    /// connect), chooses sigma so that all planned rounds fit the target at the largest
    /// sampling rate among them (the smallest site decides), before anyone is charged. The
    /// sites then hear the terms again and must agree anew: until they say so, none is ready.
    pub(super) fn calibrate(
        &mut self,
        target: fedpriv_common::dp::Epsilon,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let LocalPlan::DpSgd {
            steps,
            expected_batch,
            ..
        } = self.cfg.local
        else {
            return;
        };
        let active: Vec<&String> = self
            .cfg
            .enrolled
            .iter()
            .filter(|s| !self.retired.contains(*s))
            .collect();
        // A site smaller than the expected batch cannot be priced at all; it does not set q.
        let declared: Vec<(&String, u64)> = active
            .iter()
            .filter_map(|s| self.records.get(*s).map(|n| (*s, *n)))
            .filter(|(_, n)| *n as f64 >= expected_batch)
            .collect();
        let everyone = active.iter().all(|s| self.records.contains_key(*s));
        if !everyone {
            if declared.len() < self.cfg.min_sites {
                self.gathering_since = None;
                return;
            }
            let since = *self.gathering_since.get_or_insert(now_ms);
            let wait = GATHER_MS.min(self.cfg.round_timeout_secs.saturating_mul(1000));
            if now_ms < since.saturating_add(wait) {
                return;
            }
        }
        self.gathering_since = None;
        let smallest = declared
            .iter()
            .min_by_key(|(_, n)| *n)
            .map(|(s, n)| ((*s).clone(), *n));
        let Some((worst_site, worst)) = smallest else {
            let reason = "too few sites can take part: no enrolled site declared at least the expected batch of records, so no noise can be calibrated".to_string();
            return self.finish(reason, EndCause::TooFewSites, out);
        };
        let q = expected_batch / worst as f64;
        let total = steps.saturating_mul(self.cfg.rounds);
        let sigma = match self.cfg.calibrated_sigma(target, worst) {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("the noise could not be calibrated to epsilon {target}: {e}");
                return self.finish(reason, EndCause::TooFewSites, out);
            }
        };
        let mut cfg = (*self.cfg).clone();
        cfg.privacy.noise_multiplier = sigma;
        cfg.privacy.calibrate_to = None;
        self.cfg = Arc::new(cfg);
        // Ready meant ready for the terms before calibration; each site must accept these.
        self.ready.clear();
        self.calibrated_floor = Some(worst);
        out.push(Action::Calibrated {
            config: Arc::clone(&self.cfg),
            worst_site,
            records: worst,
            q,
            steps: total,
            target: target.get(),
        });
    }
}
