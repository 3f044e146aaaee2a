//! `fedpriv-client leakage-test`: a site tests a released model against its own patients,
//! locally. Membership inference, the attack a released model invites: given a record, was
//! it in the training data?
//!
//! - **Members**: the records this site trained the study with (its configured source,
//!   read and preprocessed exactly as for training).
//! - **Non-members**: a held-out file of the site's records that never took part (same
//!   columns). Split in two halves at random: half A trains the reference models, half B
//!   are the non-members the attacks are scored on.
//! - **Loss threshold** (Yeom et al. 2018): a record whose loss under the model is low is
//!   guessed a member.
//! - **Offline likelihood ratio** (LiRA, Carlini et al. 2022, offline variant with a fixed
//!   variance): `K` reference models trained without privacy on random halves of A (every
//!   scored record is outside all of them); a record's logit-scaled confidence under the
//!   released model, standardised by its mean under the references and the pooled
//!   variance, is its score.
//!
//! Per attack: the AUC, and the true-positive rate at 1% and 0.1% false positives only
//! where there are at least 10 / FPR non-members (fewer cannot measure such a rate), each
//! with a Clopper-Pearson interval, next to the largest rate any (epsilon, delta)-DP model
//! allows at that false-positive rate (epsilon from this site's own ledger). The report
//! stays at the site; only its summary goes to the site's audit log.
//!
//! What it does not do: prove the absence of leakage (stronger attacks exist: these are
//! the standard ones), or test records the site does not hold. The reference models are
//! trained without clipping or noise, so they differ from the released model in kind; that
//! weakens LiRA, never makes it claim leakage that is not there.

use std::path::Path;

use fedpriv_common::audit::AuditEvent;
use fedpriv_common::audit_file::AuditLog;
use fedpriv_common::dp::audit::clopper_pearson;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

use crate::config::SiteConfig;
use crate::data::Dataset;
use crate::inference::Released;
use crate::train::{self, LocalTraining};

/// How the test runs.
#[derive(Debug, Clone, PartialEq)]
pub struct LeakageOptions {
    /// Reference models for the likelihood-ratio attack.
    pub references: usize,
    /// Epochs, batch size and learning rate of each reference model.
    pub reference_training: LocalTraining,
    /// Seeds the split and the reference models (a repeatable run).
    pub seed: u64,
}

impl Default for LeakageOptions {
    fn default() -> Self {
        LeakageOptions {
            references: 8,
            reference_training: LocalTraining {
                epochs: 20,
                batch_size: 32,
                learning_rate: 0.2,
            },
            seed: 0,
        }
    }
}

/// A true-positive rate at a fixed false-positive rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateAt {
    pub fpr: f64,
    /// `None` when there are fewer than 10 / fpr non-members.
    pub tpr: Option<f64>,
    /// 95% Clopper-Pearson interval of the true-positive rate.
    pub tpr_interval: Option<[f64; 2]>,
    /// The most any (epsilon, delta)-DP model allows at this false-positive rate.
    pub max_tpr_under_dp: Option<f64>,
}

/// One attack's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttackResult {
    pub attack: &'static str,
    pub auc: f64,
    /// The most AUC any (epsilon, delta)-DP model allows (1 - the area under the best
    /// trade-off curve's complement).
    pub max_auc_under_dp: Option<f64>,
    pub rates: Vec<RateAt>,
}

/// What a leakage test found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeakageReport {
    pub study: String,
    pub model_study: String,
    pub model_round: u64,
    /// This site's epsilon for the study (its own ledger) and the study's delta.
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    pub members: usize,
    pub non_members: usize,
    pub reference_models: usize,
    pub reference_records: usize,
    pub attacks: Vec<AttackResult>,
}

/// The largest TPR at `fpr` of any test against an (epsilon, delta)-DP mechanism.
pub fn max_tpr(epsilon: f64, delta: f64, fpr: f64) -> f64 {
    let a = epsilon.exp() * fpr + delta;
    let b = 1.0 - (-epsilon).exp() * (1.0 - delta - fpr);
    a.min(b).clamp(0.0, 1.0)
}

/// The largest AUC any test against an (epsilon, delta)-DP mechanism reaches: the area
/// under [`max_tpr`], by the trapezoid rule on a fine grid.
pub fn max_auc(epsilon: f64, delta: f64) -> f64 {
    const N: usize = 10_000;
    let f = |i: usize| max_tpr(epsilon, delta, i as f64 / N as f64);
    (0..N).map(|i| (f(i) + f(i + 1)) / 2.0).sum::<f64>() / N as f64
}

/// The TPR of the threshold whose false-positive rate is at most `fpr`: the members scoring
/// above the `ceil(fpr * n)`-th highest non-member score's level, ties counted against.
fn tpr_at(members: &[f64], non: &[f64], fpr: f64) -> (u64, u64) {
    let mut sorted: Vec<f64> = non.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let allowed = (fpr * sorted.len() as f64).floor() as usize;
    // Strictly above the (allowed + 1)-th highest non-member: at most `allowed` false
    // positives.
    let threshold = sorted[allowed.min(sorted.len() - 1)];
    let hits = members.iter().filter(|&&s| s > threshold).count();
    (hits as u64, members.len() as u64)
}

fn attack(
    name: &'static str,
    members: &[f64],
    non: &[f64],
    dp: Option<(f64, f64)>,
) -> Result<AttackResult, String> {
    let scores: Vec<f64> = members.iter().chain(non).copied().collect();
    let positive: Vec<bool> = (0..scores.len()).map(|i| i < members.len()).collect();
    let auc = crate::inference::auroc(&scores, &positive).ok_or("no members or non-members")?;
    let rates = [0.01, 0.001]
        .into_iter()
        .map(|fpr| {
            let enough = non.len() as f64 >= 10.0 / fpr - 1e-9;
            let (tpr, tpr_interval) = if enough {
                let (k, n) = tpr_at(members, non, fpr);
                let (lo, hi) = clopper_pearson(k, n, 0.95);
                (Some(k as f64 / n as f64), Some([lo, hi]))
            } else {
                (None, None)
            };
            RateAt {
                fpr,
                tpr,
                tpr_interval,
                max_tpr_under_dp: dp.map(|(e, d)| max_tpr(e, d, fpr)),
            }
        })
        .collect();
    Ok(AttackResult {
        attack: name,
        auc,
        max_auc_under_dp: dp.map(|(e, d)| max_auc(e, d)),
        rates,
    })
}

/// Per record: the loss under `model` and the logit-scaled confidence
/// `ln p - ln(1 - p)` of its true label (regression: minus the squared error).
fn losses_and_confidences(
    r: &Released,
    model: &fedpriv_common::model::FlatModel,
    data: &Dataset,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let out = train::outputs(&r.learner, model, data).map_err(|e| e.to_string())?;
    let k = out.len() / data.n.max(1);
    let mut losses = Vec::with_capacity(data.n);
    let mut conf = Vec::with_capacity(data.n);
    for (z, &y) in out.chunks(k.max(1)).zip(&data.y) {
        let (l, _) = train::example_loss(z, y, r.learner.head());
        losses.push(l);
        conf.push(match r.learner.head() {
            train::Head::Identity => -l,
            // l = -ln p: ln p - ln(1 - p) = -l - ln(1 - e^-l), bounded away from infinity.
            _ => (-l - (-(-l).exp_m1()).max(1e-300).ln()).clamp(-1e3, 1e3),
        });
    }
    Ok((losses, conf))
}

/// Runs the test of `released` for `study` at this site (see the module doc).
pub fn run(
    cfg: &SiteConfig,
    study: &str,
    released: &Released,
    holdout: &Path,
    opts: &LeakageOptions,
) -> Result<LeakageReport, String> {
    let terms = cfg
        .studies
        .get(study)
        .ok_or_else(|| format!("the site config has no study {study:?}"))?;
    if released.card.study != study {
        return Err(format!(
            "the model is study {:?}'s, not {study:?}'s",
            released.card.study
        ));
    }
    if opts.references < 2 {
        return Err("the likelihood-ratio attack needs at least 2 reference models".into());
    }
    let spec = &released.card.data;
    let loaded = crate::site::load_study(cfg, terms)
        .result
        .map_err(|why| format!("the study's data cannot be read: {why}"))?;
    let members = crate::site::select_and_scale(&loaded, spec)?;
    let (pool, _) = crate::inference::load_data(spec, holdout, true)
        .map_err(|e| format!("held-out file: {e}"))?;
    if members.n == 0 || pool.n < 4 {
        return Err(format!(
            "too few records: {} members, {} held out (at least 4 needed)",
            members.n, pool.n
        ));
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut order: Vec<usize> = (0..pool.n).collect();
    order.shuffle(&mut rng);
    let half = pool.n / 2;
    let refs_data = pool
        .select_rows(&order[..half])
        .map_err(|e| e.to_string())?;
    let non = pool
        .select_rows(&order[half..])
        .map_err(|e| e.to_string())?;

    let (m_loss, m_conf) = losses_and_confidences(released, &released.model, &members)?;
    let (n_loss, n_conf) = losses_and_confidences(released, &released.model, &non)?;

    // Reference models, each on a random half of A; every scored record is out of all.
    let mut ref_m = vec![Vec::new(); members.n];
    let mut ref_n = vec![Vec::new(); non.n];
    for _ in 0..opts.references {
        let pick: Vec<usize> = (0..refs_data.n).filter(|_| rng.random_bool(0.5)).collect();
        let part = refs_data
            .select_rows(if pick.is_empty() { &[0] } else { &pick })
            .map_err(|e| e.to_string())?;
        let init = fedpriv_common::arch::init_for_data(
            &released.card.model,
            spec,
            spec.n_outputs(),
            rng.next_u64(),
        )
        .map_err(|e| e.to_string())?;
        let model = train::train_local(
            &released.learner,
            &init,
            &part,
            &opts.reference_training,
            rng.next_u64(),
        )
        .map_err(|e| format!("reference model: {e}"))?;
        let (_, cm) = losses_and_confidences(released, &model, &members)?;
        let (_, cn) = losses_and_confidences(released, &model, &non)?;
        for (v, c) in ref_m.iter_mut().zip(cm) {
            v.push(c);
        }
        for (v, c) in ref_n.iter_mut().zip(cn) {
            v.push(c);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let all_refs: Vec<&Vec<f64>> = ref_m.iter().chain(&ref_n).collect();
    let pooled_var = all_refs
        .iter()
        .map(|v| {
            let m = mean(v);
            v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64
        })
        .sum::<f64>()
        / all_refs.len() as f64;
    let sd = pooled_var.sqrt().max(1e-9);
    let lira = |conf: &[f64], refs: &[Vec<f64>]| -> Vec<f64> {
        conf.iter()
            .zip(refs)
            .map(|(c, r)| (c - mean(r)) / sd)
            .collect()
    };
    let m_lira = lira(&m_conf, &ref_m);
    let n_lira = lira(&n_conf, &ref_n);

    // This site's own figure, not the coordinator's.
    let ledger = crate::ledger_view::build(cfg)?;
    let own = ledger.studies.iter().find(|s| s.study == study);
    let epsilon = own.and_then(|s| s.epsilon);
    let delta = own.and_then(|s| s.delta);
    let dp = epsilon.zip(delta);
    let neg = |v: Vec<f64>| v.into_iter().map(|l| -l).collect::<Vec<f64>>();
    let attacks = vec![
        attack("loss_threshold", &neg(m_loss), &neg(n_loss), dp)?,
        attack("offline_lira", &m_lira, &n_lira, dp)?,
    ];
    Ok(LeakageReport {
        study: study.to_string(),
        model_study: released.card.study.clone(),
        model_round: released.card.round,
        epsilon,
        delta,
        members: members.n,
        non_members: non.n,
        reference_models: opts.references,
        reference_records: refs_data.n,
        attacks,
    })
}

/// Opens the site's audit log for the summary (refused while the daemon holds it).
pub fn open_log(cfg: &SiteConfig) -> Result<AuditLog, String> {
    let path = crate::daemon::audit_path(cfg);
    AuditLog::open(&path).map_err(|e| {
        format!(
            "{}: {e} (the summary of a leakage test goes to the site's audit log; stop the daemon first)",
            path.display()
        )
    })
}

/// Appends the report's summary to the site's audit log: counts and AUCs, never a score.
pub fn record(
    log: &mut AuditLog,
    cfg: &SiteConfig,
    report: &LeakageReport,
    model_file: &Path,
) -> Result<(), String> {
    let bytes = std::fs::read(model_file).map_err(|e| format!("{}: {e}", model_file.display()))?;
    let aucs: serde_json::Map<String, serde_json::Value> = report
        .attacks
        .iter()
        .map(|a| (a.attack.to_string(), serde_json::json!(a.auc)))
        .collect();
    log.append_now(
        &cfg.name,
        AuditEvent::LeakageTested,
        serde_json::json!({
            "study": report.study,
            "model_sha256": fedpriv_common::digest::sha256_hex(&bytes),
            "round": report.model_round,
            "members": report.members,
            "non_members": report.non_members,
            "reference_models": report.reference_models,
            "epsilon": report.epsilon,
            "delta": report.delta,
            "auc": aucs,
        }),
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

impl std::fmt::Display for LeakageReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "study {} (model of round {}): {} members, {} non-members, {} reference models on {} held-out records",
            self.study, self.model_round, self.members, self.non_members, self.reference_models, self.reference_records
        )?;
        match (self.epsilon, self.delta) {
            (Some(e), Some(d)) => {
                writeln!(f, "this site's guarantee: epsilon {e:.3} at delta {d:e}")?
            }
            _ => writeln!(
                f,
                "this site's ledger has no spend for the study: no DP bound to compare with"
            )?,
        }
        for a in &self.attacks {
            write!(f, "{}: AUC {:.3}", a.attack, a.auc)?;
            if let Some(m) = a.max_auc_under_dp {
                write!(f, " (at most {m:.3} under the guarantee)")?;
            }
            writeln!(f)?;
            for r in &a.rates {
                match (r.tpr, r.tpr_interval) {
                    (Some(t), Some([lo, hi])) => write!(
                        f,
                        "  TPR at {}% FPR: {t:.4} [{lo:.4}, {hi:.4}]",
                        r.fpr * 100.0
                    )?,
                    _ => write!(
                        f,
                        "  TPR at {}% FPR: not measurable with {} non-members (needs {})",
                        r.fpr * 100.0,
                        self.non_members,
                        (10.0 / r.fpr).round()
                    )?,
                }
                if let Some(m) = r.max_tpr_under_dp {
                    write!(f, "; at most {m:.4} under the guarantee")?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dp_bounds_by_hand() {
        // epsilon 0: no test beats chance.
        assert!((max_tpr(0.0, 0.0, 0.3) - 0.3).abs() < 1e-12);
        assert!((max_auc(0.0, 0.0) - 0.5).abs() < 1e-6);
        // ln 3 at fpr 0.1: min(0.3, 1 - (1/3)(0.9)) = 0.3.
        assert!((max_tpr(3f64.ln(), 0.0, 0.1) - 0.3).abs() < 1e-12);
        assert!(max_auc(8.0, 1e-5) > 0.99);
        assert!(max_auc(1.0, 1e-5) < 0.75);
    }

    #[test]
    fn rates_count_false_positives_honestly() {
        let non: Vec<f64> = (0..1000).map(|i| i as f64).collect();
        // Members all above every non-member but the top 10: at 1% FPR, 10 non-members may
        // pass, so the threshold is the 11th highest (989).
        let members = vec![989.5; 50];
        assert_eq!(tpr_at(&members, &non, 0.01), (50, 50));
        let members = vec![988.5; 50];
        assert_eq!(tpr_at(&members, &non, 0.01), (0, 50));
        let r = attack("t", &[2.0, 3.0], &non[..5], Some((1.0, 1e-5))).unwrap();
        assert!(r.rates.iter().all(|r| r.tpr.is_none()));
        assert!((r.auc - 0.6).abs() < 1e-12, "{}", r.auc);
    }
}
