//! What a site does with a study and a task, synchronously: load its data once at start,
//! check an announcement against its own pinned terms, check a task, pay for it in its own
//! ledger, train, clip and noise. The daemon calls this from a blocking thread; nothing here
//! touches the network.
//!
//! The coordinator may be hostile, so:
//! - **data availability is decided once**, when the site starts ([`load_site_data`]), never
//!   per announcement: which columns a study may read, the identifier check and the loading
//!   of the file depend on the site's config alone, and a record that cannot be used is
//!   skipped (or takes the study's public fill) and counted only in the site's own log;
//! - **every check happens before the spend** (terms, task, model values, price) and the
//!   spend is durable before training starts;
//! - **nothing data-dependent after the spend**: once the ledger has paid, the site sends a
//!   correctly noised update, and if anything fails, a noise-only update of the right shape;
//! - **refusals are a fixed set** ([`DeclineReason`]); what exactly differed or failed is the
//!   [`Refusal::detail`], for the site's audit log only.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngCore;

use fedpriv_common::config::{
    round_cost, source_event, LocalPlan, Placement, PrivacyUnit, Task as TaskKind,
};
use fedpriv_common::dp::clip::clip_l2;
use fedpriv_common::dp::noise::NoiseSource;
use fedpriv_common::dp::{ClipNorm, Delta, SgmEvent};
use fedpriv_common::model::{delta, FlatModel, ModelSpec};
use fedpriv_common::protocol::{DeclineReason, StudyAnnouncement, Task};

use crate::config::{DataSource, SiteConfig, SiteStudy, SourceFormat};
use crate::data::{
    self, ColumnSelection, Dataset, FeatureRange, LabelKind, LoadOptions, LoadReport,
};
use crate::identifiers::{ColumnCheck, ValueProfiler};
use crate::store::{Cap, SiteLedger, SourceCap, Spend, StoreError};
use crate::train::{self, DpSgdRound, Learner, LocalTraining};

/// The largest magnitude a model value from the coordinator may have. Well above any trained
/// weight over inputs scaled to [-1, 1]; a model outside it is refused before the spend, so
/// that nothing a crafted model does to one record's arithmetic happens after it.
pub const MAX_MODEL_ABS: f32 = 1e6;

/// Most local epochs a site-unit round may ask for (its time is the site's to give).
pub const MAX_LOCAL_EPOCHS: usize = 1_000;

/// Why a site will not take part or do a task: the public reason the coordinator hears and
/// the detail that stays in the site's audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: DeclineReason,
    pub detail: String,
}

impl Refusal {
    fn new(reason: DeclineReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.reason, self.detail)
    }
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Loading, once, at start

/// A study's data as the site loaded it at start: every column the site allows the study,
/// unscaled (scaling uses the announcement's public ranges).
#[derive(Debug)]
pub struct LoadedStudy {
    /// The allowed columns; a categorical column holds the index of its value in
    /// `dictionaries` (-1 when missing); an image study holds no values (see `files`).
    pub data: Dataset,
    pub report: LoadReport,
    /// Per allowed feature: a categorical column's distinct values (empty for numbers).
    pub dictionaries: Vec<Vec<String>>,
    /// An image study: each kept record's image file.
    pub files: Option<Vec<std::path::PathBuf>>,
}

/// The outcome of loading one study's data at start, with what the audit log needs.
#[derive(Debug)]
pub struct StudyLoad {
    /// The data, or why it is unavailable (the detail, for the audit log).
    pub result: Result<LoadedStudy, String>,
    /// The identifier check of the study's allowed columns; `None` when it did not run.
    pub columns: Option<ColumnCheck>,
}

/// Loads every configured study's allowed columns from its data source, once. A study whose
/// data cannot be used (a file that cannot be read, a column missing from its header, a
/// column that looks like a direct identifier) is unavailable for the life of the process:
/// every announcement of it is answered [`DeclineReason::Unavailable`], whatever it asks.
pub fn load_site_data(cfg: &SiteConfig) -> BTreeMap<String, StudyLoad> {
    cfg.studies
        .iter()
        .map(|(id, study)| (id.clone(), load_study(cfg, study)))
        .collect()
}

pub(crate) fn load_study(cfg: &SiteConfig, study: &SiteStudy) -> StudyLoad {
    let Some(source) = cfg.sources.get(&study.source) else {
        return StudyLoad {
            result: Err(format!("no data source {:?}", study.source)),
            columns: None,
        };
    };
    let t = &study.terms;
    // An image study reads the manifest's file column as its one (text) feature.
    let features: Vec<String> = match &t.image_column {
        Some(c) => vec![c.clone()],
        None => t.features.clone(),
    };
    let selection = ColumnSelection {
        features: features.clone(),
        label: t.label.clone(),
    };
    let mut check = ColumnCheck::by_names(&selection, &study.allow_identifier_columns);
    if let Some(refusal) = check.refusal() {
        return StudyLoad {
            result: Err(refusal.to_string()),
            columns: Some(check),
        };
    }
    let mut options = match t.task {
        TaskKind::Binary => LoadOptions::new(LabelKind::Classes(2)),
        TaskKind::Multiclass if t.class_labels.is_empty() => {
            LoadOptions::new(LabelKind::Classes(t.classes))
        }
        TaskKind::Multiclass => LoadOptions::named(t.class_labels.clone()),
        TaskKind::Regression => LoadOptions::regression(),
    };
    options.text_features = features
        .iter()
        .map(|f| t.categorical.contains(f) || t.image_column.as_ref() == Some(f))
        .collect();
    let fills: Vec<Option<f32>> = features.iter().map(|f| t.fills.get(f).copied()).collect();
    let mut profiler = ValueProfiler::new(&selection);
    let mut observe = |slot: usize, cell: &str| profiler.observe(slot, cell);
    let loaded = match source.format {
        SourceFormat::Csv | SourceFormat::Images => {
            data::load_csv_lenient(&source.path, &selection, &options, &fills, &mut observe)
        }
        SourceFormat::Parquet => {
            crate::sources::load_parquet(&source.path, &selection, &options, &fills)
        }
        SourceFormat::Npy => crate::sources::load_npy(
            &source.path,
            source.labels.as_deref().unwrap_or(std::path::Path::new("")),
            &source.columns,
            &selection,
            &options,
            &fills,
        ),
    };
    let result = match loaded {
        Ok(l) => {
            check.add_values(&profiler);
            match check.refusal() {
                Some(refusal) => Err(refusal.to_string()),
                None if t.image_column.is_some() => Ok(image_study(source, l)),
                None => Ok(LoadedStudy {
                    data: l.data,
                    report: l.report,
                    dictionaries: l.dictionaries,
                    files: None,
                }),
            }
        }
        Err(e) => Err(format!("{}: {e}", source.path.display())),
    };
    StudyLoad {
        result,
        columns: Some(check),
    }
}

/// An image study's records: those whose image file can be read (checked from its header
/// now; a record whose file is missing or not an image is skipped and counted).
pub(crate) fn image_study(source: &DataSource, l: data::Loaded) -> LoadedStudy {
    let names = l.dictionaries.first().cloned().unwrap_or_default();
    let mut report = l.report;
    let (mut files, mut y) = (Vec::new(), Vec::new());
    for i in 0..l.data.n {
        let id = l.data.x[i];
        let file = (id >= 0.0)
            .then(|| names.get(id as usize))
            .flatten()
            .map(|name| source.root.join(name));
        match file {
            Some(path) if crate::sources::readable_image(&path) => {
                files.push(path);
                y.push(l.data.y[i]);
            }
            _ => report.skipped_malformed += 1,
        }
    }
    report.rows = files.len();
    let n = files.len();
    LoadedStudy {
        data: Dataset {
            x: Vec::new(),
            y,
            n,
            d: 0,
            feature_names: Vec::new(),
            label_name: l.data.label_name,
            images: None,
        },
        report,
        dictionaries: Vec::new(),
        files: Some(files),
    }
}

// ---------------------------------------------------------------------------------------
// Announcements

/// A study this site has agreed to, with its data selected and scaled for it.
#[derive(Debug)]
pub struct PreparedStudy {
    pub announcement: StudyAnnouncement,
    /// The announcement in the canonical text form the ledger pins.
    pub terms: String,
    pub learner: Learner,
    pub spec: ModelSpec,
    /// The records the study trains on (all of them unless it has an evaluation).
    pub data: Dataset,
    /// The held-out records a study with evaluation is evaluated on.
    pub holdout: Option<Dataset>,
    pub local: SiteStudy,
    pub source: DataSource,
}

/// The canonical text of an announcement's terms, as the ledger pins them: its JSON in field
/// order. A study without evaluation has no `evaluation` key (the last field), so terms
/// pinned before evaluation existed still match.
pub fn terms_text(ann: &StudyAnnouncement) -> String {
    let text = serde_json::to_string(ann).unwrap_or_default();
    match text.strip_suffix(",\"evaluation\":null}") {
        Some(head) => format!("{head}}}"),
        None => text,
    }
}

/// Checks an announcement against the site's pinned terms and, when the site already paid
/// for a round of the study, against the terms it paid under (`pinned`: the source and terms
/// text from the ledger); selects and scales the study's columns.
///
/// `holdout_seed`: the seed of the study's held-out split, as the ledger keeps it (used
/// only when the announcement asks for evaluation).
pub fn prepare_study(
    cfg: &SiteConfig,
    loaded: &BTreeMap<String, StudyLoad>,
    pinned: Option<&(String, String)>,
    ann: &StudyAnnouncement,
    holdout_seed: Option<u64>,
) -> Result<PreparedStudy, Refusal> {
    let Some(local) = cfg.studies.get(&ann.study) else {
        return Err(Refusal::new(
            DeclineReason::NotEnrolled,
            "no such study in the site config",
        ));
    };
    let data = match loaded.get(&ann.study).map(|l| &l.result) {
        Some(Ok(l)) => l,
        Some(Err(why)) => {
            return Err(Refusal::new(
                DeclineReason::Unavailable,
                format!("unavailable since start: {why}"),
            ))
        }
        None => {
            return Err(Refusal::new(
                DeclineReason::Unavailable,
                "not loaded at start",
            ))
        }
    };
    let Some(source) = cfg.sources.get(&local.source) else {
        return Err(Refusal::new(DeclineReason::Unavailable, "no data source"));
    };
    check_terms(ann, local, source).map_err(|d| Refusal::new(DeclineReason::TermsDiffer, d))?;
    let terms = terms_text(ann);
    if let Some((paid_source, paid_terms)) = pinned {
        if *paid_source != local.source {
            return Err(Refusal::new(
                DeclineReason::TermsDiffer,
                format!(
                    "the study was paid for from source {paid_source:?}, the config now says {:?}",
                    local.source
                ),
            ));
        }
        if *paid_terms != terms {
            return Err(Refusal::new(
                DeclineReason::TermsDiffer,
                format!(
                    "the announcement differs from the terms already paid under: {}",
                    describe_difference(paid_terms, &terms)
                ),
            ));
        }
    }
    let learner = Learner::for_data(&ann.model, &ann.data)
        .map_err(|e| Refusal::new(DeclineReason::TermsDiffer, format!("model: {e}")))?;
    let spec = learner.spec().clone();
    let data = select_and_scale(data, &ann.data)
        .map_err(|e| Refusal::new(DeclineReason::TermsDiffer, format!("data: {e}")))?;
    let (data, holdout) = match (&ann.evaluation, &local.terms.evaluation, holdout_seed) {
        (Some(_), Some(pins), Some(seed)) => {
            let (train, held) = crate::evaluation::split(&data, pins.holdout, seed)
                .map_err(|e| Refusal::new(DeclineReason::Internal, format!("holdout: {e}")))?;
            (train, Some(held))
        }
        (Some(_), _, _) => {
            return Err(Refusal::new(
                DeclineReason::Internal,
                "the held-out split has no seed",
            ))
        }
        (None, _, _) => (data, None),
    };
    Ok(PreparedStudy {
        announcement: ann.clone(),
        terms,
        learner,
        spec,
        data,
        holdout,
        local: local.clone(),
        source: source.clone(),
    })
}

/// Which top-level fields of two terms texts differ (for the audit log).
fn describe_difference(paid: &str, now: &str) -> String {
    let (Ok(a), Ok(b)) = (
        serde_json::from_str::<serde_json::Value>(paid),
        serde_json::from_str::<serde_json::Value>(now),
    ) else {
        return "unreadable terms".into();
    };
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return "unreadable terms".into();
    };
    let fields: Vec<&str> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .map(String::as_str)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    format!("fields {}", fields.join(", "))
}

/// Every privacy term of an announcement against what the site pinned. `Err` names the
/// first term that does not fit.
fn check_terms(
    ann: &StudyAnnouncement,
    local: &SiteStudy,
    source: &DataSource,
) -> Result<(), String> {
    let t = &local.terms;
    if ann.unit != t.unit {
        return Err(format!("unit {:?}, the site pinned {:?}", ann.unit, t.unit));
    }
    if !t.placements.contains(&ann.placement) {
        return Err(format!(
            "placement {:?} is not one the site accepts ({:?})",
            ann.placement, t.placements
        ));
    }
    if ann.unit == PrivacyUnit::Record && ann.placement != Placement::Local {
        return Err("the record unit noises at the site".into());
    }
    if ann.data.task != t.task {
        return Err(format!(
            "task {:?}, the site pinned {:?}",
            ann.data.task, t.task
        ));
    }
    if ann.data.label != t.label {
        return Err(format!(
            "label column {:?} is not the pinned one",
            ann.data.label
        ));
    }
    let d = &ann.data;
    if d.ranges.len() != d.features.len() || d.fills.len() != d.features.len() {
        return Err("features, ranges and fills do not line up".into());
    }
    match (&d.image, &t.image_column) {
        (Some(im), Some(col)) if im.file_column == *col && d.features.is_empty() => {}
        (None, None) if !(d.features.is_empty() && d.categorical.is_empty()) => {}
        (Some(_), _) => return Err("an image study the site has not pinned".into()),
        (None, Some(_)) => return Err("the site pinned an image study".into()),
        (None, None) => return Err("the study reads no column".into()),
    }
    for c in &d.categorical {
        if !t.categorical.contains(&c.name) {
            return Err(format!(
                "column {:?} is not one the site allows as categorical",
                c.name
            ));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, f) in d.features.iter().enumerate() {
        if !t.features.contains(f) || t.categorical.contains(f) {
            return Err(format!(
                "column {f:?} is not one the site allows as a number"
            ));
        }
        if !seen.insert(f) {
            return Err(format!("column {f:?} is listed twice"));
        }
        let want = t.fills.get(f).map(|v| v.to_bits());
        if d.fills[i].map(f32::to_bits) != want {
            return Err(format!("fill of {f:?} differs from the pinned one"));
        }
        let r = d.ranges[i];
        if !(r[0].is_finite() && r[1].is_finite() && r[0] < r[1]) {
            return Err(format!("range of {f:?} is not a finite lo < hi"));
        }
    }
    match (ann.data.task, ann.data.label_range) {
        (TaskKind::Regression, Some(r)) if r[0].is_finite() && r[1].is_finite() && r[0] < r[1] => {}
        (TaskKind::Regression, _) => return Err("regression needs a finite label range".into()),
        (_, None) => {}
        (_, Some(_)) => return Err("a label range belongs to regression".into()),
    }
    let delta = Delta::new(ann.delta).map_err(|e| format!("delta: {e}"))?;
    if delta > t.max_delta {
        return Err(format!(
            "delta {} is above the pinned {}",
            ann.delta, t.max_delta
        ));
    }
    if ann.clip_norm.to_bits() != t.clip_norm.get().to_bits() {
        return Err(format!(
            "clip norm {} is not the pinned {}",
            ann.clip_norm,
            t.clip_norm.get()
        ));
    }
    if !(ann.noise_multiplier.is_finite() && ann.noise_multiplier >= t.min_noise_multiplier.get()) {
        return Err(format!(
            "noise multiplier {} is below the pinned {}",
            ann.noise_multiplier,
            t.min_noise_multiplier.get()
        ));
    }
    match (&ann.evaluation, &t.evaluation) {
        (None, _) => {}
        (Some(_), None) => {
            return Err("the study asks for DP evaluation, which the site has not pinned".into())
        }
        (Some(e), Some(pins)) => {
            if e.noise_multiplier < pins.min_noise_multiplier {
                return Err(format!(
                    "evaluation noise multiplier {} is below the pinned {}",
                    e.noise_multiplier, pins.min_noise_multiplier
                ));
            }
            if e.every == 0 || !(e.loss_clip.is_finite() && e.loss_clip > 0.0) {
                return Err("the evaluation plan is malformed".into());
            }
        }
    }
    match (&ann.local, ann.unit) {
        (
            LocalPlan::DpSgd {
                steps,
                expected_batch,
                learning_rate,
            },
            PrivacyUnit::Record,
        ) => {
            if !(expected_batch.is_finite() && *expected_batch >= 1.0) {
                return Err("expected batch must be at least 1".into());
            }
            let q = expected_batch / source.records as f64;
            let max_q = t.max_sample_rate.map_or(0.0, |q| q.get());
            if q > max_q {
                return Err(format!(
                    "sampling rate {q} (expected batch {expected_batch} over {} declared records) is above the pinned {max_q}",
                    source.records
                ));
            }
            if *steps == 0 || Some(*steps) > t.max_steps_per_round {
                return Err(format!(
                    "{steps} steps per round, the site allows 1 to {:?}",
                    t.max_steps_per_round
                ));
            }
            if !(learning_rate.is_finite() && *learning_rate > 0.0) {
                return Err("learning rate must be a positive number".into());
            }
        }
        (
            LocalPlan::Sgd {
                epochs,
                batch_size,
                learning_rate,
            },
            PrivacyUnit::Site,
        ) => {
            if *epochs == 0 || *epochs > MAX_LOCAL_EPOCHS || *batch_size == 0 {
                return Err(format!(
                    "{epochs} epochs of batches of {batch_size}: need 1 to {MAX_LOCAL_EPOCHS} epochs and a batch of at least 1"
                ));
            }
            if !(learning_rate.is_finite() && *learning_rate > 0.0) {
                return Err("learning rate must be a positive number".into());
            }
        }
        _ => return Err("the training plan does not fit the privacy unit".into()),
    }
    Ok(())
}

/// The announced features, in the announced order, out of the columns loaded at start,
/// scaled by the announcement's public ranges (clamped: cannot fail on any record), then
/// each announced categorical column as the index of its value among the announced
/// categories (anything else, or missing, is the "other" slot). An image study's records
/// become rows read from their files when they are used.
pub fn select_and_scale(
    loaded: &LoadedStudy,
    spec_data: &fedpriv_common::config::DataSpec,
) -> Result<Dataset, String> {
    let all = &loaded.data;
    if let Some(spec) = &spec_data.image {
        let files = loaded.files.clone().ok_or("an image study on a table")?;
        return Ok(Dataset {
            x: Vec::new(),
            y: all.y.clone(),
            n: all.n,
            d: spec.channels * spec.height * spec.width,
            feature_names: Vec::new(),
            label_name: all.label_name.clone(),
            images: Some(std::sync::Arc::new(crate::sources::ImageRows {
                files,
                spec: spec.clone(),
            })),
        });
    }
    if loaded.files.is_some() {
        return Err("a table study on images".into());
    }
    let slot = |f: &str| {
        all.feature_names
            .iter()
            .position(|n| n == f)
            .ok_or_else(|| format!("column {f:?} was not loaded"))
    };
    let numeric: Vec<usize> = spec_data
        .features
        .iter()
        .map(|f| slot(f))
        .collect::<Result<_, _>>()?;
    // Per categorical column: its slot and, per dictionary entry, the category index.
    let mut cats: Vec<(usize, Vec<f32>, f32)> = Vec::new();
    for c in &spec_data.categorical {
        let at = slot(&c.name)?;
        let other = c.categories.len() as f32;
        let map = loaded
            .dictionaries
            .get(at)
            .map(|values| {
                values
                    .iter()
                    .map(|v| {
                        c.categories
                            .iter()
                            .position(|k| k == v)
                            .map_or(other, |i| i as f32)
                    })
                    .collect()
            })
            .unwrap_or_default();
        cats.push((at, map, other));
    }
    let d = numeric.len() + cats.len();
    let mut x = Vec::with_capacity(all.n * d);
    for i in 0..all.n {
        let row = all.row(i);
        x.extend(numeric.iter().map(|&s| row[s]));
        for (at, map, other) in &cats {
            let id = row[*at];
            x.push(if id >= 0.0 {
                map.get(id as usize).copied().unwrap_or(*other)
            } else {
                *other
            });
        }
    }
    let mut names = spec_data.features.clone();
    names.extend(spec_data.categorical.iter().map(|c| c.name.clone()));
    let mut ds = Dataset {
        x,
        y: all.y.clone(),
        n: all.n,
        d,
        feature_names: names,
        label_name: all.label_name.clone(),
        images: None,
    };
    let ranges = spec_data
        .ranges
        .iter()
        .map(|r| FeatureRange::new(f64::from(r[0]), f64::from(r[1])))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    data::scale_leading_features(&mut ds, &ranges).map_err(|e| e.to_string())?;
    if let Some(r) = spec_data.label_range {
        let r = FeatureRange::new(f64::from(r[0]), f64::from(r[1])).map_err(|e| e.to_string())?;
        data::scale_label(&mut ds, &r).map_err(|e| e.to_string())?;
    }
    Ok(ds)
}

// ---------------------------------------------------------------------------------------
// Tasks

/// What a paid-for round released.
#[derive(Debug, Clone, PartialEq)]
pub struct Released {
    /// The noised update (or, under central placement, the clipped delta) to send.
    pub update: Vec<f32>,
    /// The study's epsilon and the source's filter level after the spend.
    pub paid: crate::store::Paid,
    /// Why the update is a noise-only stand-in (something failed after the spend), if it is.
    pub fallback: Option<String>,
    /// Whether a site-unit delta was replaced by zero because training diverged.
    pub zeroed: bool,
    /// The noised evaluation vector, when the round carries an evaluation.
    pub evaluation: Option<Vec<f64>>,
}

/// What a round costs this site: the study-level event and the source-level event.
pub fn price(study: &PreparedStudy) -> Result<(SgmEvent, SgmEvent), String> {
    let ann = &study.announcement;
    let own = round_cost(
        ann.unit,
        ann.placement,
        ann.noise_multiplier,
        &ann.local,
        Some(study.source.records),
    )?;
    let at_source = source_event(ann.unit, ann.placement, ann.noise_multiplier, own)?;
    Ok((own, at_source))
}

/// Checks a task, pays for it in the site's ledger, trains and returns what to send.
/// `coordinator` is the coordinator's identity, kept in the ledger. `Err` only before the
/// spend: once paid, the result is always an update (a noise-only one if training failed).
pub fn run_task(
    cfg: &SiteConfig,
    study: &PreparedStudy,
    ledger: &mut SiteLedger,
    noise: &mut NoiseSource,
    task: &Task,
    global: Vec<f32>,
    coordinator: &str,
) -> Result<Released, Refusal> {
    let ann = &study.announcement;
    let terms = |d: &str| Refusal::new(DeclineReason::TermsDiffer, d);
    let invalid = |d: String| Refusal::new(DeclineReason::InvalidTask, d);
    if !ann.task_matches(task) {
        return Err(terms("the task's study, unit, placement, delta, clip, noise or plan differ from the announced terms"));
    }
    if let Some((i, v)) = global
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && v.abs() <= MAX_MODEL_ABS))
    {
        return Err(invalid(format!(
            "model value {i} ({v}) is outside +-{MAX_MODEL_ABS}"
        )));
    }
    let model = FlatModel::new(study.spec.clone(), global).map_err(|e| invalid(e.to_string()))?;
    let (own, at_source) = price(study).map_err(invalid)?;
    if own != task.cost {
        return Err(invalid(format!(
            "the coordinator priced the round at {:?}, the site at {own:?}",
            task.cost
        )));
    }
    // The evaluation a task may carry is the announced plan's, on exactly its rounds.
    let evaluation = ann
        .evaluation
        .filter(|e| e.is_due(task.round))
        .map(|e| e.event());
    if task.evaluation != evaluation {
        return Err(invalid(format!(
            "the task's evaluation {:?} is not the announced plan's for round {} ({evaluation:?})",
            task.evaluation, task.round
        )));
    }
    let clip = ClipNorm::new(ann.clip_norm).map_err(|e| invalid(e.to_string()))?;
    let delta_t = Delta::new(ann.delta).map_err(|e| invalid(e.to_string()))?;
    let study_cap = Cap {
        epsilon: study.local.epsilon_cap,
        delta: delta_t,
        accountant: cfg.accountant,
    };
    let source_cap = SourceCap {
        epsilon: study.source.epsilon_cap,
        delta: study.source.delta,
    };
    let spend = Spend {
        study: &task.study,
        round: task.round,
        event: own,
        source: &study.local.source,
        source_event: at_source,
        evaluation,
        terms: &study.terms,
        coordinator,
        instance: &ann.instance,
    };
    let paid = match ledger.pay(&spend, &study_cap, &source_cap, unix_now()) {
        Ok(p) => p,
        Err(e @ StoreError::OverCap { .. }) => {
            return Err(Refusal::new(DeclineReason::OverCap, e.to_string()))
        }
        Err(e @ StoreError::OtherInstance { .. }) => {
            return Err(Refusal::new(DeclineReason::OtherInstance, e.to_string()))
        }
        Err(e @ StoreError::AlreadySpent { .. }) => {
            return Err(Refusal::new(DeclineReason::AlreadyPaid, e.to_string()))
        }
        Err(e @ StoreError::TermsChanged { .. }) => {
            return Err(Refusal::new(DeclineReason::TermsDiffer, e.to_string()))
        }
        Err(e) => {
            return Err(Refusal::new(
                DeclineReason::Internal,
                format!("site ledger: {e}"),
            ))
        }
    };

    // Paid: from here on, something is released whatever happens. The evaluation first:
    // it measures the model as it came, before this site trains on it.
    let evaluation = match (&ann.evaluation, evaluation) {
        (Some(plan), Some(_)) => {
            let exact = study.holdout.as_ref().and_then(|held| {
                let pins = study.local.terms.evaluation?;
                let pad =
                    crate::evaluation::padded_rows(study.source.records, pins.holdout, held.n);
                crate::evaluation::exact_sums(&study.learner, &model, held, &ann.data, plan, pad)
                    .ok()
            });
            Some(crate::evaluation::noised(exact, &ann.data, plan, noise))
        }
        _ => None,
    };
    let sigma_c = ann.noise_multiplier * clip.get();
    let (update, fallback, zeroed) = match &ann.local {
        LocalPlan::Sgd {
            epochs,
            batch_size,
            learning_rate,
        } => {
            let seed = noise.rng().next_u64();
            let plan = LocalTraining {
                epochs: *epochs,
                batch_size: *batch_size,
                learning_rate: *learning_rate,
            };
            // The whole site is the unit: any function of its data is fine as long as the
            // result is clipped (and noised when local), so a delta that diverged, or
            // training that failed, becomes a zero delta rather than an error.
            let work = usize::try_from(study.source.records).unwrap_or(usize::MAX);
            let trained =
                train::train_local_for(&study.learner, &model, &study.data, &plan, seed, work);
            let zeros = || vec![0.0; model.values.len()];
            let (mut d, zeroed) = match trained {
                Ok(t) => {
                    let d = delta(&t.values, &model.values);
                    if d.iter().all(|v| v.is_finite()) {
                        (d, false)
                    } else {
                        (zeros(), true)
                    }
                }
                Err(_) => (zeros(), true),
            };
            clip_l2(&mut d, clip);
            if ann.placement == Placement::Local {
                d = train::noised_site_delta(&d, sigma_c, noise);
            }
            (d, None, zeroed)
        }
        LocalPlan::DpSgd {
            steps,
            expected_batch,
            learning_rate,
        } => {
            let round = DpSgdRound {
                steps: *steps,
                q: own.q.get(),
                expected_batch: *expected_batch,
                learning_rate: *learning_rate,
                clip: clip.get(),
                noise_multiplier: ann.noise_multiplier,
            };
            match round.run(&study.learner, &model, &study.data, noise) {
                // The ledger was charged for `own.steps` steps; anything else must not leave.
                Ok((d, taken)) if taken == own.steps => (d, None, false),
                Ok((_, taken)) => (
                    round.noise_only(model.values.len(), noise),
                    Some(format!("DP-SGD ran {taken} of {} steps", own.steps)),
                    false,
                ),
                Err(e) => (
                    round.noise_only(model.values.len(), noise),
                    Some(format!("DP-SGD failed: {e}")),
                    false,
                ),
            }
        }
    };
    Ok(Released {
        update,
        paid,
        fallback,
        zeroed,
        evaluation,
    })
}

#[cfg(test)]
mod tests;
