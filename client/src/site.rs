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
use fedpriv_common::dp::noise::{available_threads, NoiseSource};
use fedpriv_common::dp::sampling::poisson_sample;
use fedpriv_common::dp::{ClipNorm, Delta};
use fedpriv_common::model::{delta, FlatModel, ModelSpec};
use fedpriv_common::protocol::{DeclineReason, StudyAnnouncement, Task};

use crate::config::{SiteConfig, SiteStudy};
use crate::data::{self, ColumnSelection, Dataset, FeatureRange, LoadOptions};
use crate::identifiers::{ColumnCheck, ValueProfiler};
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

/// The outcome of preparing a study, with the identifier check for the audit log.
#[derive(Debug)]
pub struct Preparation {
    pub result: Result<PreparedStudy, DeclineReason>,
    /// The identifier check of the study's columns and its outcome; `None` when the study
    /// was refused before its columns were looked at (not configured at this site, delta
    /// too large, a model the site cannot build).
    pub columns: Option<ColumnCheck>,
}

/// Loads only the study's feature and label columns and scales them by the study's public
/// ranges (no statistic of the site's patients leaves the site or shapes the scaling).
///
/// Minimum necessary: a column that looks like a direct identifier by its name (checked
/// before the file is opened) or by its values (checked as it is read) is refused unless
/// `allowed` (the site's `allow_identifier_columns` for the study) lists it; see
/// [`crate::identifiers`]. Returns the check with the outcome, whatever the outcome.
pub fn load_study_data(
    ann: &StudyAnnouncement,
    path: &std::path::Path,
    allowed: &[String],
) -> (Result<Dataset, DeclineReason>, ColumnCheck) {
    let selection = ColumnSelection {
        features: ann.data.features.clone(),
        label: ann.data.label.clone(),
    };
    let mut check = ColumnCheck::by_names(&selection, allowed);
    if let Some(refusal) = check.refusal() {
        return (
            Err(DeclineReason::DataUnavailable(refusal.to_string())),
            check,
        );
    }
    let mut profiler = ValueProfiler::new(&selection);
    let loaded = load_and_scale(ann, path, &selection, &mut profiler);
    if loaded.is_ok() {
        check.add_values(&profiler);
        if let Some(refusal) = check.refusal() {
            return (
                Err(DeclineReason::DataUnavailable(refusal.to_string())),
                check,
            );
        }
    }
    (loaded, check)
}

fn load_and_scale(
    ann: &StudyAnnouncement,
    path: &std::path::Path,
    selection: &ColumnSelection,
    profiler: &mut ValueProfiler,
) -> Result<Dataset, DeclineReason> {
    let unavailable = |e: &dyn std::fmt::Display| DeclineReason::DataUnavailable(e.to_string());
    let options = match ann.data.task {
        TaskKind::Binary => LoadOptions::binary(),
        TaskKind::Regression => LoadOptions::regression(),
    };
    let mut ds = data::load_csv_observed(path, selection, &options, &mut |slot, cell| {
        profiler.observe(slot, cell)
    })
    .map_err(|e| unavailable(&e))?;
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
    prepare_study_with_check(cfg, ann).result
}

/// [`prepare_study`], also returning the identifier check of the study's columns so that
/// the caller can audit it.
pub fn prepare_study_with_check(cfg: &SiteConfig, ann: &StudyAnnouncement) -> Preparation {
    let local = match cfg.studies.get(&ann.study) {
        Some(local) => local.clone(),
        None => {
            return Preparation {
                result: Err(DeclineReason::StudyNotAllowed),
                columns: None,
            }
        }
    };
    if ann.delta > cfg.max_delta.get() {
        return Preparation {
            result: Err(DeclineReason::DeltaTooLarge {
                delta: ann.delta,
                max: cfg.max_delta.get(),
            }),
            columns: None,
        };
    }
    let spec = match arch::model_spec(ann.model, ann.data.features.len(), 1) {
        Ok(spec) => spec,
        Err(e) => {
            return Preparation {
                result: Err(DeclineReason::TaskMismatch(e.to_string())),
                columns: None,
            }
        }
    };
    let (data, check) = load_study_data(ann, &local.data, &local.allow_identifier_columns);
    let result = data.and_then(|data| accept(ann, spec, data, local));
    Preparation {
        result,
        columns: Some(check),
    }
}

fn accept(
    ann: &StudyAnnouncement,
    spec: ModelSpec,
    data: Dataset,
    local: SiteStudy,
) -> Result<PreparedStudy, DeclineReason> {
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
                // Every core: the noise does not depend on how many fill it.
                noise.add_gaussian(&mut d, sigma_c, available_threads());
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
            let mut taken = 0u64;
            for _ in 0..*steps {
                taken += 1;
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
            // The ledger was charged for `own.steps` steps; anything else must not leave.
            if taken != own.steps || q.to_bits() != own.q.get().to_bits() {
                return Err(DeclineReason::Internal(
                    "DP-SGD did not run the steps the ledger paid for".into(),
                ));
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::identifiers::IdentifierKind;
    use fedpriv_common::config::DataSpec;
    use fedpriv_common::model::Architecture;

    fn config(dir: &std::path::Path, allow: &str) -> SiteConfig {
        let toml = format!(
            "[site]\nname = \"st-marys\"\nstate_dir = \"state\"\nmax_delta = 1e-5\n\n\
             [coordinator]\naddress = \"127.0.0.1:7443\"\nserver_name = \"localhost\"\n\n\
             [tls]\nca = \"ca.pem\"\ncert = \"site.pem\"\nkey = \"site.key\"\n\n\
             [studies.s]\ndata = \"patients.csv\"\nepsilon_cap = 3.0\n{allow}\n"
        );
        SiteConfig::from_toml(&toml, dir).unwrap()
    }

    fn announcement(features: &[&str]) -> StudyAnnouncement {
        StudyAnnouncement {
            study: "s".into(),
            model: Architecture::LogisticRegression,
            data: DataSpec {
                task: TaskKind::Binary,
                label: "y".into(),
                features: features.iter().map(|f| f.to_string()).collect(),
                ranges: vec![[0.0, 100_000.0]; features.len()],
                label_range: None,
            },
            unit: PrivacyUnit::Site,
            placement: Placement::Local,
            delta: 1e-6,
        }
    }

    #[test]
    fn the_ledger_pays_exactly_the_dp_sgd_steps_taken_and_refuses_replays_and_underpricing() {
        use fedpriv_common::dp::SgmEvent;
        use fedpriv_common::wire::{Dtype, TensorHeader};
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::from("age,y\n");
        for i in 0..200 {
            text.push_str(&format!("{},{}\n", 30 + i % 50, i % 2));
        }
        std::fs::write(dir.path().join("patients.csv"), text).unwrap();
        let mut ann = announcement(&["age"]);
        ann.unit = PrivacyUnit::Record;
        let cfg = config(dir.path(), "");
        let study = prepare_study_with_check(&cfg, &ann).result.unwrap();
        let mut ledger = SiteLedger::open(dir.path().join("ledger.db")).unwrap();
        let mut noise = NoiseSource::from_os().unwrap();
        let plan = LocalPlan::DpSgd {
            steps: 7,
            expected_batch: 20.0,
            learning_rate: 0.5,
        };
        let cost = round_cost(
            PrivacyUnit::Record,
            Placement::Local,
            2.0,
            1.0,
            &plan,
            Some(200),
        )
        .unwrap();
        let mut task = Task {
            study: "s".into(),
            round: 1,
            header: TensorHeader::for_spec(&study.spec, Dtype::F32),
            cost,
            clip_norm: 1.0,
            noise_multiplier: 2.0,
            unit: PrivacyUnit::Record,
            placement: Placement::Local,
            local: plan,
            delta: ann.delta,
        };
        let global = vec![0.0f32; study.spec.num_values()];
        let update = run_task(
            &cfg,
            &study,
            &mut ledger,
            &mut noise,
            &task,
            global.clone(),
            "coordinator",
        )
        .unwrap();
        assert_eq!(update.len(), global.len());
        assert!(update.iter().any(|v| *v != 0.0));
        let paid = ledger.events("s").unwrap();
        assert_eq!(paid, vec![SgmEvent::new(0.1, 2.0, 7).unwrap()]);
        // A replayed task is refused and charges nothing.
        let again = run_task(
            &cfg,
            &study,
            &mut ledger,
            &mut noise,
            &task,
            global.clone(),
            "coordinator",
        );
        assert_eq!(again, Err(DeclineReason::AlreadySpent));
        // A coordinator that under-prices a round (fewer steps than the plan runs) is refused.
        task.round = 2;
        task.cost = SgmEvent::new(0.1, 2.0, 3).unwrap();
        let cheap = run_task(
            &cfg,
            &study,
            &mut ledger,
            &mut noise,
            &task,
            global,
            "coordinator",
        );
        assert!(
            matches!(cheap, Err(DeclineReason::TaskMismatch(_))),
            "{cheap:?}"
        );
        assert_eq!(ledger.events("s").unwrap().len(), 1);
    }

    /// 40 patients: an ordinary feature, a ZIP code stored as a number, a label.
    fn write_data(dir: &std::path::Path) -> Vec<String> {
        let zips: Vec<String> = (0..40).map(|i| format!("0{}", 2101 + i * 3)).collect();
        let mut text = String::from("age,lab_value,y\n");
        for (i, z) in zips.iter().enumerate() {
            text.push_str(&format!("{},{z},{}\n", 30 + i, i % 2));
        }
        std::fs::write(dir.join("patients.csv"), text).unwrap();
        zips
    }

    #[test]
    fn a_column_with_identifier_values_is_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let zips = write_data(dir.path());
        let ann = announcement(&["age", "lab_value"]);

        let p = prepare_study_with_check(&config(dir.path(), ""), &ann);
        let Err(DeclineReason::DataUnavailable(msg)) = &p.result else {
            panic!("{:?}", p.result)
        };
        assert!(msg.contains("lab_value") && msg.contains("ZIP"), "{msg}");
        let check = p.columns.unwrap();
        assert_eq!(check.refused.len(), 1);
        assert_eq!(check.refused[0].kind, IdentifierKind::ZipCode);
        assert!(check.values_checked);
        let details = check.details().to_string();
        for z in &zips {
            assert!(!msg.contains(z.as_str()) && !details.contains(z.as_str()));
        }

        let allowed = config(dir.path(), "allow_identifier_columns = [\"lab_value\"]");
        let p = prepare_study_with_check(&allowed, &ann);
        let prepared = p.result.unwrap();
        assert_eq!(prepared.data.n, 40);
        let check = p.columns.unwrap();
        assert!(check.passed());
        assert_eq!(check.allowed_by_config, ["lab_value"]);
        assert_eq!(check.allowed_matches[0].kind, IdentifierKind::ZipCode);
        assert!(prepare_study(&allowed, &ann).is_ok());
    }

    #[test]
    fn a_column_named_like_an_identifier_is_refused_before_the_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        // No data file at all: the names alone decide.
        let ann = announcement(&["age", "patient_ssn"]);
        let p = prepare_study_with_check(&config(dir.path(), ""), &ann);
        let Err(DeclineReason::DataUnavailable(msg)) = &p.result else {
            panic!("{:?}", p.result)
        };
        assert!(msg.contains("patient_ssn") && msg.contains("social security"));
        let check = p.columns.unwrap();
        assert!(!check.values_checked);
        assert_eq!(check.checked, ["age", "patient_ssn", "y"]);

        // A study the site does not take part in is refused before any column is looked at.
        let mut other = ann.clone();
        other.study = "other".into();
        let p = prepare_study_with_check(&config(dir.path(), ""), &other);
        assert_eq!(p.result.unwrap_err(), DeclineReason::StudyNotAllowed);
        assert!(p.columns.is_none());
    }
}
