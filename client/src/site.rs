//! What a site does with a study and a task, synchronously: prepare its data, check the task
//! against its own policy, pay for it in its own ledger, train, clip and noise. The daemon
//! calls this from a blocking thread; nothing here touches the network.
//!
//! Fail-closed: every check happens before the spend is recorded, the spend is durable
//! before training starts, and any failure after that returns a decline, never an un-noised
//! update.

use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngCore;

use fedpriv_common::arch;
use fedpriv_common::config::{round_cost, LocalPlan, Placement, PrivacyUnit, Task as TaskKind};
use fedpriv_common::dp::clip::clip_l2;
use fedpriv_common::dp::noise::NoiseSource;
use fedpriv_common::dp::sampling::poisson_sample;
use fedpriv_common::dp::{ClipNorm, Delta};
use fedpriv_common::model::{delta, FlatModel, ModelSpec};
use fedpriv_common::protocol::{DeclineReason, StudyAnnouncement, Task};

use crate::config::{SiteConfig, SiteStudy};
use crate::data::{self, ColumnSelection, Dataset, FeatureRange, LoadOptions};
use crate::store::{Cap, SiteLedger, StoreError};
use crate::train::{self, LocalTraining};

/// A study this site has agreed to and whose data it has loaded.
#[derive(Debug)]
pub struct PreparedStudy {
    pub announcement: StudyAnnouncement,
    pub spec: ModelSpec,
    pub data: Dataset,
    pub local: SiteStudy,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Loads only the study's feature and label columns and scales them by the study's public
/// ranges (no statistic of the site's patients leaves the site or shapes the scaling).
pub fn load_study_data(
    ann: &StudyAnnouncement,
    path: &std::path::Path,
) -> Result<Dataset, DeclineReason> {
    let unavailable = |e: &dyn std::fmt::Display| DeclineReason::DataUnavailable(e.to_string());
    let selection = ColumnSelection {
        features: ann.data.features.clone(),
        label: ann.data.label.clone(),
    };
    let options = match ann.data.task {
        TaskKind::Binary => LoadOptions::binary(),
        TaskKind::Regression => LoadOptions::regression(),
    };
    let mut ds = data::load_csv(path, &selection, &options).map_err(|e| unavailable(&e))?;
    let ranges = ann
        .data
        .ranges
        .iter()
        .map(|r| FeatureRange::new(f64::from(r[0]), f64::from(r[1])))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unavailable(&e))?;
    data::scale_features(&mut ds, &ranges).map_err(|e| unavailable(&e))?;
    if let Some(r) = ann.data.label_range {
        let r = FeatureRange::new(f64::from(r[0]), f64::from(r[1])).map_err(|e| unavailable(&e))?;
        data::scale_label(&mut ds, &r).map_err(|e| unavailable(&e))?;
    }
    Ok(ds)
}

/// Accepts or refuses a study the coordinator announced.
pub fn prepare_study(
    cfg: &SiteConfig,
    ann: &StudyAnnouncement,
) -> Result<PreparedStudy, DeclineReason> {
    let local = cfg
        .studies
        .get(&ann.study)
        .cloned()
        .ok_or(DeclineReason::StudyNotAllowed)?;
    if ann.delta > cfg.max_delta.get() {
        return Err(DeclineReason::DeltaTooLarge {
            delta: ann.delta,
            max: cfg.max_delta.get(),
        });
    }
    let spec = arch::model_spec(ann.model, ann.data.features.len(), 1)
        .map_err(|e| DeclineReason::TaskMismatch(e.to_string()))?;
    let data = load_study_data(ann, &local.data)?;
    if data.n == 0 {
        return Err(DeclineReason::DataUnavailable(
            "the data file has no records".into(),
        ));
    }
    // Record-level DP means little when delta is not well below 1/n: one record could be
    // given away outright with probability delta.
    if ann.unit == PrivacyUnit::Record && ann.delta >= 1.0 / data.n as f64 {
        return Err(DeclineReason::DeltaTooLarge {
            delta: ann.delta,
            max: 1.0 / data.n as f64,
        });
    }
    Ok(PreparedStudy {
        announcement: ann.clone(),
        spec,
        data,
        local,
    })
}

/// Checks a task, records its cost in the site's ledger, trains and returns the update to
/// send. `coordinator` is the coordinator's identity, kept in the ledger.
pub fn run_task(
    cfg: &SiteConfig,
    study: &PreparedStudy,
    ledger: &mut SiteLedger,
    noise: &mut NoiseSource,
    task: &Task,
    global: Vec<f32>,
    coordinator: &str,
) -> Result<Vec<f32>, DeclineReason> {
    let ann = &study.announcement;
    let mismatch = |m: &str| Err(DeclineReason::TaskMismatch(m.to_string()));
    if task.unit != ann.unit
        || task.placement != ann.placement
        || task.delta.to_bits() != ann.delta.to_bits()
    {
        return mismatch("privacy unit, noise placement or delta differ from the announced study");
    }
    if task.delta > cfg.max_delta.get() {
        return Err(DeclineReason::DeltaTooLarge {
            delta: task.delta,
            max: cfg.max_delta.get(),
        });
    }
    match (&task.local, ann.unit) {
        (LocalPlan::Sgd { .. }, PrivacyUnit::Site)
        | (LocalPlan::DpSgd { .. }, PrivacyUnit::Record) => {}
        _ => return mismatch("the training plan does not fit the privacy unit"),
    }
    // The site prices the round itself; a coordinator that under-reports is refused.
    let sample_rate = if ann.placement == Placement::Central {
        task.cost.q.get()
    } else {
        1.0
    };
    let own = round_cost(
        ann.unit,
        ann.placement,
        task.noise_multiplier,
        sample_rate,
        &task.local,
        Some(study.data.n as u64),
    )
    .map_err(DeclineReason::TaskMismatch)?;
    if own != task.cost {
        return mismatch("the coordinator's price of the round differs from the site's own");
    }
    let clip =
        ClipNorm::new(task.clip_norm).map_err(|e| DeclineReason::TaskMismatch(e.to_string()))?;
    let model = FlatModel::new(study.spec.clone(), global)
        .map_err(|e| DeclineReason::TaskMismatch(e.to_string()))?;
    let delta_t = Delta::new(task.delta).map_err(|e| DeclineReason::TaskMismatch(e.to_string()))?;

    let cap = Cap {
        epsilon: study.local.epsilon_cap,
        delta: delta_t,
        accountant: cfg.accountant,
    };
    match ledger.record_spend_within_cap(
        &task.study,
        task.round,
        own,
        coordinator,
        &cap,
        unix_now(),
    ) {
        Ok(_) => {}
        Err(StoreError::OverCap {
            epsilon_after, cap, ..
        }) => return Err(DeclineReason::OverSiteCap { epsilon_after, cap }),
        Err(StoreError::AlreadySpent { .. }) => return Err(DeclineReason::AlreadySpent),
        Err(e) => return Err(DeclineReason::Internal(format!("site ledger: {e}"))),
    }

    let internal = |e: &dyn std::fmt::Display| DeclineReason::Internal(e.to_string());
    let sigma_c = task.noise_multiplier * clip.get();
    let update = match &task.local {
        LocalPlan::Sgd {
            epochs,
            batch_size,
            learning_rate,
        } => {
            let seed = noise.rng().next_u64();
            let cfg = LocalTraining {
                epochs: *epochs,
                batch_size: *batch_size,
                learning_rate: *learning_rate,
            };
            let trained = train::train_local(&model, ann.model, &study.data, &cfg, seed)
                .map_err(|e| internal(&e))?;
            let mut d = delta(&trained.values, &model.values);
            clip_l2(&mut d, clip);
            if ann.placement == Placement::Local {
                noise.add_gaussian(&mut d, sigma_c, 1);
            }
            d
        }
        LocalPlan::DpSgd {
            steps,
            expected_batch,
            learning_rate,
        } => {
            let mut m = model.clone();
            let q = expected_batch / study.data.n as f64;
            for _ in 0..*steps {
                let batch = poisson_sample(study.data.n, q, noise.rng());
                let z = noise.gaussian(m.values.len(), sigma_c);
                train::dp_sgd_step(
                    &mut m,
                    ann.model,
                    &study.data,
                    &batch,
                    clip.get(),
                    &z,
                    *expected_batch,
                    *learning_rate,
                )
                .map_err(|e| internal(&e))?;
            }
            delta(&m.values, &model.values)
        }
    };
    if update.iter().any(|v| !v.is_finite()) {
        return Err(DeclineReason::Internal(
            "training produced a non-finite update".into(),
        ));
    }
    Ok(update)
}
