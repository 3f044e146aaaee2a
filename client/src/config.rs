//! The site's own configuration: where the coordinator is, the site's certificate, where
//! its data and state live, and the site's own privacy terms, which no coordinator can
//! override.
//!
//! Two kinds of terms, both the site's decision alone:
//! - **data sources** (`[sources.NAME]`): a file of patient records, the record count the
//!   site declares for it (public: it sets every study's sampling rate; the true count never
//!   leaves), and one delta and epsilon cap for the source. Every study that reads the source
//!   composes into that cap, whatever its study id, so a new study is never a fresh budget
//!   for the same patients.
//! - **pinned study terms** (`[studies.ID]`): the source, the study's own cap, and what the
//!   site agreed to: unit, the placements it accepts (`local` unless `central` is listed),
//!   the mechanism (smallest noise multiplier, the clip norm, largest sampling rate and
//!   steps per round), the largest delta, the task, label and feature columns it allows
//!   (minimum necessary: anything else is refused), and the fill values. An announcement
//!   that asks for anything else is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use fedpriv_common::config::{Placement, PrivacyUnit, StudyConfig, Task};
use fedpriv_common::dp::accountant::AccountantKind;
use fedpriv_common::dp::{ClipNorm, Delta, Epsilon, NoiseMultiplier, SampleRate};
use fedpriv_common::pki::validate_name;
use serde::Deserialize;

/// A site config that cannot be used, with the field at fault. The operator's fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SiteConfigError {
    #[error("invalid TOML: {0}")]
    Parse(String),
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
}

fn field(f: impl Into<String>, reason: impl std::fmt::Display) -> SiteConfigError {
    SiteConfigError::Field {
        field: f.into(),
        reason: reason.to_string(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    site: RawSite,
    coordinator: RawCoordinator,
    tls: RawTls,
    sources: BTreeMap<String, RawSource>,
    #[serde(default)]
    studies: BTreeMap<String, RawStudy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: String,
    state_dir: PathBuf,
    accountant: Option<AccountantKind>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordinator {
    address: String,
    server_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    /// The data file: CSV with a header row (default), Parquet, a `.npy` array of features,
    /// or (format "images") a manifest CSV naming one image file per record.
    path: PathBuf,
    format: Option<SourceFormat>,
    /// npy: the labels array (`[n]`).
    labels: Option<PathBuf>,
    /// npy: the names of the features array's columns, in order (patterns allowed).
    columns: Option<Vec<String>>,
    /// images: the folder relative image paths start from (default: the manifest's).
    root: Option<PathBuf>,
    /// The record count the site declares (public).
    records: u64,
    delta: f64,
    epsilon_cap: f64,
}

/// How a data source's file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    Csv,
    Parquet,
    Npy,
    Images,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStudy {
    source: String,
    epsilon_cap: f64,
    unit: PrivacyUnit,
    placements: Option<Vec<Placement>>,
    task: Task,
    /// Multiclass: the number of classes (integer labels) or the class labels.
    classes: Option<usize>,
    labels: Option<Vec<String>>,
    label: String,
    #[serde(default)]
    features: Vec<String>,
    /// Which of the allowed features are categorical (read as text).
    #[serde(default)]
    categorical: Vec<String>,
    /// An image study: the manifest's column naming each record's image file.
    image_column: Option<String>,
    #[serde(default)]
    fills: BTreeMap<String, f32>,
    clip_norm: f64,
    min_noise_multiplier: f64,
    max_sample_rate: Option<f64>,
    max_steps_per_round: Option<u64>,
    max_delta: f64,
    /// Columns the site knows hold no direct identifier although their name or values look
    /// like one (see `crate::identifiers`).
    #[serde(default)]
    allow_identifier_columns: Vec<String>,
    /// `evaluation = { holdout = 0.2, min_noise_multiplier = 5.0 }`: the site takes part in
    /// the study's DP evaluation (record unit) on this held-out share of its records.
    evaluation: Option<RawSiteEvaluation>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSiteEvaluation {
    holdout: f64,
    min_noise_multiplier: f64,
}

/// What the site agreed to for a study's DP evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvaluationPins {
    /// The share of the source's records held out from training and evaluated on.
    pub holdout: f64,
    /// The least evaluation noise multiplier the site accepts.
    pub min_noise_multiplier: NoiseMultiplier,
}

/// One data source: a set of patients whose every use composes into one budget.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSource {
    pub path: PathBuf,
    pub format: SourceFormat,
    /// npy: the labels array and the features array's column names.
    pub labels: Option<PathBuf>,
    pub columns: Vec<String>,
    /// images: where relative image paths start.
    pub root: PathBuf,
    /// The record count the site declares: public, the denominator of every study's
    /// sampling rate. The file's true count never leaves the site.
    pub records: u64,
    /// The delta at which the source's cap holds.
    pub delta: Delta,
    /// Epsilon cap over every study reading this source (enforced by a Rényi filter).
    pub epsilon_cap: Epsilon,
}

/// What the site agreed to for one study; an announcement must fit within these.
#[derive(Debug, Clone, PartialEq)]
pub struct PinnedTerms {
    pub unit: PrivacyUnit,
    /// Placements the site accepts; `central` only when the site's config lists it.
    pub placements: Vec<Placement>,
    pub task: Task,
    /// Multiclass: the number of classes (0 otherwise), and the class labels as the data
    /// writes them (empty: integer ids).
    pub classes: usize,
    pub class_labels: Vec<String>,
    pub label: String,
    /// Feature columns the site allows the study to read (a study may use fewer).
    pub features: Vec<String>,
    /// Which allowed features are categorical.
    pub categorical: Vec<String>,
    /// An image study's file column.
    pub image_column: Option<String>,
    /// Public fill values for missing or unreadable cells, by feature.
    pub fills: BTreeMap<String, f32>,
    /// The clip norm, exactly.
    pub clip_norm: ClipNorm,
    pub min_noise_multiplier: NoiseMultiplier,
    /// Record unit: the largest sampling rate (expected batch / declared records).
    pub max_sample_rate: Option<SampleRate>,
    /// Record unit: the most DP-SGD steps per round.
    pub max_steps_per_round: Option<u64>,
    pub max_delta: Delta,
    /// The study's DP evaluation, if the site takes part in one (record unit only).
    pub evaluation: Option<EvaluationPins>,
}

/// One study the site takes part in.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteStudy {
    /// The name of the data source it reads (a key of [`SiteConfig::sources`]).
    pub source: String,
    /// This site's own cap for the study, at the study's delta.
    pub epsilon_cap: Epsilon,
    pub terms: PinnedTerms,
    /// Columns of the data file this study may read although the identifier check would
    /// refuse them (the site's decision, audited); empty by default.
    pub allow_identifier_columns: Vec<String>,
}

/// A validated site config; relative paths are resolved against the config file's folder.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteConfig {
    pub name: String,
    pub state_dir: PathBuf,
    pub accountant: AccountantKind,
    pub coordinator: std::net::SocketAddr,
    pub server_name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub sources: BTreeMap<String, DataSource>,
    pub studies: BTreeMap<String, SiteStudy>,
}

impl SiteConfig {
    pub fn load(path: &Path) -> Result<Self, SiteConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SiteConfigError::Parse(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text, path.parent().unwrap_or(Path::new(".")))
    }

    pub fn from_toml(text: &str, base: &Path) -> Result<Self, SiteConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| SiteConfigError::Parse(e.to_string()))?;
        validate_name(&raw.site.name).map_err(|e| field("site.name", e))?;
        let coordinator = raw
            .coordinator
            .address
            .parse()
            .map_err(|e| field("coordinator.address", format!("{e} (expected IP:port)")))?;
        if raw.coordinator.server_name.is_empty() {
            return Err(field(
                "coordinator.server_name",
                "must name the coordinator's certificate (e.g. localhost)",
            ));
        }
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let mut sources = BTreeMap::new();
        for (name, s) in raw.sources {
            let at = |k: &str| format!("sources.{name}.{k}");
            validate_name(&name).map_err(|e| field(format!("sources.{name}"), e))?;
            if s.records == 0 {
                return Err(field(at("records"), "must be at least 1"));
            }
            let delta = Delta::new(s.delta).map_err(|e| field(at("delta"), e))?;
            let epsilon_cap =
                Epsilon::new(s.epsilon_cap).map_err(|e| field(at("epsilon_cap"), e))?;
            let format = s.format.unwrap_or(SourceFormat::Csv);
            let path = abs(s.path);
            let columns = match (format, s.columns) {
                (SourceFormat::Npy, Some(c)) => fedpriv_common::config::expand_features(&c)
                    .map_err(|e| field(at("columns"), e))?,
                (SourceFormat::Npy, None) => {
                    return Err(field(at("columns"), "an npy source names its columns"))
                }
                (_, Some(_)) => {
                    return Err(field(at("columns"), "columns belong to format = \"npy\""))
                }
                (_, None) => Vec::new(),
            };
            let labels = match (format, s.labels) {
                (SourceFormat::Npy, Some(l)) => Some(abs(l)),
                (SourceFormat::Npy, None) => {
                    return Err(field(at("labels"), "an npy source needs its labels array"))
                }
                (_, Some(_)) => {
                    return Err(field(at("labels"), "labels belong to format = \"npy\""))
                }
                (_, None) => None,
            };
            let root = match (format, s.root) {
                (SourceFormat::Images, Some(r)) => abs(r),
                (SourceFormat::Images, None) => path
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| base.to_path_buf()),
                (_, Some(_)) => {
                    return Err(field(at("root"), "root belongs to format = \"images\""))
                }
                (_, None) => PathBuf::new(),
            };
            sources.insert(
                name,
                DataSource {
                    path,
                    format,
                    labels,
                    columns,
                    root,
                    records: s.records,
                    delta,
                    epsilon_cap,
                },
            );
        }
        let mut studies = BTreeMap::new();
        for (id, s) in raw.studies {
            validate_name(&id).map_err(|e| field(format!("studies.{id}"), e))?;
            let study = validate_study(&id, s, &sources)?;
            studies.insert(id, study);
        }
        Ok(Self {
            name: raw.site.name,
            state_dir: abs(raw.site.state_dir),
            accountant: raw.site.accountant.unwrap_or_default(),
            coordinator,
            server_name: raw.coordinator.server_name,
            ca: abs(raw.tls.ca),
            cert: abs(raw.tls.cert),
            key: abs(raw.tls.key),
            sources,
            studies,
        })
    }
}

fn validate_study(
    id: &str,
    s: RawStudy,
    sources: &BTreeMap<String, DataSource>,
) -> Result<SiteStudy, SiteConfigError> {
    let at = |k: &str| format!("studies.{id}.{k}");
    let source = sources.get(&s.source).ok_or_else(|| {
        field(
            at("source"),
            format!("no data source {:?} under [sources]", s.source),
        )
    })?;
    let epsilon_cap = Epsilon::new(s.epsilon_cap).map_err(|e| field(at("epsilon_cap"), e))?;
    let clip_norm = ClipNorm::new(s.clip_norm).map_err(|e| field(at("clip_norm"), e))?;
    let min_noise_multiplier = NoiseMultiplier::new(s.min_noise_multiplier)
        .map_err(|e| field(at("min_noise_multiplier"), e))?;
    let max_delta = Delta::new(s.max_delta).map_err(|e| field(at("max_delta"), e))?;
    let placements = s
        .placements
        .clone()
        .unwrap_or_else(|| vec![Placement::Local]);
    if placements.is_empty() {
        return Err(field(at("placements"), "list at least one placement"));
    }
    if placements.len() > 2 || placements.len() == 2 && placements[0] == placements[1] {
        return Err(field(at("placements"), "a placement is listed twice"));
    }
    let (max_sample_rate, max_steps_per_round) = match s.unit {
        PrivacyUnit::Record => {
            if placements != [Placement::Local] {
                return Err(field(
                    at("placements"),
                    "the record unit always noises at the site: only [\"local\"]",
                ));
            }
            let q = s.max_sample_rate.ok_or_else(|| {
                field(
                    at("max_sample_rate"),
                    "required for the record unit (largest expected batch / declared records)",
                )
            })?;
            let q = SampleRate::new(q).map_err(|e| field(at("max_sample_rate"), e))?;
            let steps = s
                .max_steps_per_round
                .ok_or_else(|| field(at("max_steps_per_round"), "required for the record unit"))?;
            if steps == 0 {
                return Err(field(at("max_steps_per_round"), "must be at least 1"));
            }
            // Record-level DP means little when delta is not well below 1/n: one record could
            // be given away outright with probability delta.
            if max_delta.get() * source.records as f64 >= 1.0 {
                return Err(field(
                    at("max_delta"),
                    format!(
                        "must be below 1/records of source {:?} ({} records)",
                        s.source, source.records
                    ),
                ));
            }
            (Some(q), Some(steps))
        }
        PrivacyUnit::Site => {
            if s.max_sample_rate.is_some() || s.max_steps_per_round.is_some() {
                return Err(field(
                    at("max_sample_rate"),
                    "max_sample_rate and max_steps_per_round belong to the record unit (a site-unit round is one release at q = 1)",
                ));
            }
            (None, None)
        }
    };
    if max_delta > source.delta {
        return Err(field(
            at("max_delta"),
            format!(
                "above the delta {} of source {:?}, whose cap could then not hold",
                source.delta, s.source
            ),
        ));
    }
    let features = fedpriv_common::config::expand_features(&s.features)
        .map_err(|e| field(at("features"), e))?;
    if features.is_empty() && s.image_column.is_none() {
        return Err(field(at("features"), "allow at least one feature column"));
    }
    if let Some(c) = s.categorical.iter().find(|c| !features.contains(c)) {
        return Err(field(
            at("categorical"),
            format!("{c:?} is not an allowed feature"),
        ));
    }
    match (&s.image_column, source.format) {
        (Some(_), SourceFormat::Images) if features.is_empty() => {}
        (Some(_), _) => {
            return Err(field(
                at("image_column"),
                "an image study reads a source of format = \"images\" and no other feature",
            ))
        }
        (None, SourceFormat::Images) => {
            return Err(field(
                at("image_column"),
                "an images source needs the file column",
            ))
        }
        (None, SourceFormat::Npy) if !s.categorical.is_empty() => {
            return Err(field(at("categorical"), "an npy source holds numbers only"))
        }
        _ => {}
    }
    validate_columns(&features).map_err(|e| field(at("features"), e))?;
    let s = RawStudy { features, ..s };
    let (classes, class_labels) = match (s.task, s.classes, &s.labels) {
        (Task::Multiclass, Some(k), None) if k >= 2 => (k, Vec::new()),
        (Task::Multiclass, None, Some(l)) if l.len() >= 2 => {
            validate_columns(l).map_err(|e| field(at("labels"), e))?;
            (l.len(), l.clone())
        }
        (Task::Multiclass, _, _) => {
            return Err(field(
                at("classes"),
                "multiclass needs classes = K (K >= 2) or labels = [...] (at least 2)",
            ))
        }
        (_, None, None) => (0, Vec::new()),
        _ => {
            return Err(field(
                at("classes"),
                "classes and labels belong to task = \"multiclass\"",
            ))
        }
    };
    validate_columns(std::slice::from_ref(&s.label)).map_err(|e| field(at("label"), e))?;
    if s.features.contains(&s.label) {
        return Err(field(at("label"), "the label cannot also be a feature"));
    }
    if let Some(extra) = s.fills.keys().find(|k| !s.features.contains(k)) {
        return Err(field(
            at("fills"),
            format!("{extra:?} is not an allowed feature"),
        ));
    }
    if let Some((f, _)) = s.fills.iter().find(|(_, v)| !v.is_finite()) {
        return Err(field(at("fills"), format!("{f:?}: need a finite value")));
    }
    let evaluation = match &s.evaluation {
        None => None,
        Some(e) => {
            if s.unit != PrivacyUnit::Record {
                return Err(field(
                    at("evaluation"),
                    "DP evaluation is for record-unit studies",
                ));
            }
            if !(e.holdout.is_finite() && e.holdout > 0.0 && e.holdout <= 0.5) {
                return Err(field(
                    at("evaluation.holdout"),
                    "a share of the records above 0 and at most 0.5",
                ));
            }
            Some(EvaluationPins {
                holdout: e.holdout,
                min_noise_multiplier: NoiseMultiplier::new(e.min_noise_multiplier)
                    .map_err(|err| field(at("evaluation.min_noise_multiplier"), err))?,
            })
        }
    };
    let allow_identifier_columns = validate_columns(&s.allow_identifier_columns)
        .map(|()| s.allow_identifier_columns)
        .map_err(|e| field(at("allow_identifier_columns"), e))?;
    Ok(SiteStudy {
        source: s.source,
        epsilon_cap,
        terms: PinnedTerms {
            unit: s.unit,
            placements,
            task: s.task,
            classes,
            class_labels,
            label: s.label,
            features: s.features,
            categorical: s.categorical,
            image_column: s.image_column,
            fills: s.fills,
            clip_norm,
            min_noise_multiplier,
            max_sample_rate,
            max_steps_per_round,
            max_delta,
            evaluation,
        },
        allow_identifier_columns,
    })
}

/// Column names as the CSV loader matches them: non-empty, no surrounding spaces (the
/// loader trims header names, so such an entry could never match), no control characters,
/// each listed once.
fn validate_columns(columns: &[String]) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for c in columns {
        if c.is_empty() {
            return Err("a column name is empty".into());
        }
        if c.trim() != c {
            return Err(format!(
                "column {c:?} has leading or trailing spaces (header names are trimmed)"
            ));
        }
        if c.chars().any(char::is_control) {
            return Err(format!("column {c:?} contains a control character"));
        }
        if !seen.insert(c.as_str()) {
            return Err(format!("column {c:?} is listed twice"));
        }
    }
    Ok(())
}

/// The `[studies.ID]` table that pins exactly the terms of `study` (what its study file
/// asks for), for a privacy officer to review before pasting it into the site config: the
/// noise multiplier, sampling rate and steps become the site's limits, the columns its
/// allowed columns. `epsilon_cap` is the site's own cap for the study.
pub fn pinned_terms_toml(
    study: &StudyConfig,
    source: &str,
    declared_records: u64,
    epsilon_cap: f64,
) -> String {
    use fedpriv_common::config::LocalPlan;
    use std::fmt::Write;
    let p = &study.privacy;
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let list = |v: &[String]| v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ");
    let mut t = String::new();
    let _ = writeln!(t, "[studies.{}]", study.id);
    let _ = writeln!(t, "source = {}", q(source));
    let _ = writeln!(t, "epsilon_cap = {epsilon_cap:?}");
    let unit = match p.unit {
        PrivacyUnit::Record => "record",
        PrivacyUnit::Site => "site",
    };
    let _ = writeln!(t, "unit = \"{unit}\"");
    if p.unit == PrivacyUnit::Site {
        let placement = match p.placement {
            Placement::Local => "local",
            Placement::Central => "central",
        };
        let _ = writeln!(t, "placements = [\"{placement}\"]");
    }
    let task = match study.data.task {
        Task::Binary => "binary",
        Task::Multiclass => "multiclass",
        Task::Regression => "regression",
    };
    let _ = writeln!(t, "task = \"{task}\"");
    if study.data.task == Task::Multiclass {
        if study.data.class_labels.is_empty() {
            let _ = writeln!(t, "classes = {}", study.data.classes);
        } else {
            let _ = writeln!(t, "labels = [{}]", list(&study.data.class_labels));
        }
    }
    let _ = writeln!(t, "label = {}", q(&study.data.label));
    let cats: Vec<String> = study
        .data
        .categorical
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let mut allowed = study.data.features.clone();
    allowed.extend(cats.iter().cloned());
    let _ = writeln!(t, "features = [{}]", list(&allowed));
    if !cats.is_empty() {
        let _ = writeln!(t, "categorical = [{}]", list(&cats));
    }
    if let Some(im) = &study.data.image {
        let _ = writeln!(t, "image_column = {}", q(&im.file_column));
    }
    let fills: Vec<String> = study
        .data
        .features
        .iter()
        .zip(&study.data.fills)
        .filter_map(|(f, v)| v.map(|v| format!("{} = {v:?}", q(f))))
        .collect();
    if !fills.is_empty() {
        let _ = writeln!(t, "fills = {{ {} }}", fills.join(", "));
    }
    let _ = writeln!(t, "clip_norm = {:?}", p.clip_norm.get());
    // A study whose sigma the coordinator will calibrate from the sites' sizes: the least
    // it can choose is what meets the target at this site's own rate (the smallest site's
    // rate, which decides, is at least this one's).
    let least = p
        .calibrate_to
        .and_then(|target| study.calibrated_sigma(target, declared_records).ok())
        .map_or(p.noise_multiplier.get(), |s| s.get());
    let _ = writeln!(t, "min_noise_multiplier = {least:?}");
    if let LocalPlan::DpSgd {
        steps,
        expected_batch,
        ..
    } = &study.local
    {
        let rate = (expected_batch / declared_records.max(1) as f64).min(1.0);
        let _ = writeln!(t, "max_sample_rate = {rate:?}");
        let _ = writeln!(t, "max_steps_per_round = {steps}");
    }
    let _ = writeln!(t, "max_delta = {:?}", p.delta.get());
    if let Some(e) = &study.evaluation {
        // The held-out share is the site's choice; 0.2 is a common one.
        let _ = writeln!(
            t,
            "evaluation = {{ holdout = 0.2, min_noise_multiplier = {:?} }}",
            e.noise_multiplier.get()
        );
    }
    t
}

/// A whole site config for a site that takes part in the given studies, all reading one
/// data source (`[sources.data]`): for the demo, tests and benchmarks, which play both the
/// ML team and the hospital. A real site writes its own (see `examples/configs/site.toml`
/// and `fedpriv-client terms`).
#[derive(Debug, Clone)]
pub struct SiteSetup<'a> {
    pub name: &'a str,
    pub coordinator: std::net::SocketAddr,
    /// TLS files and the data file, as written into the config (relative paths resolve
    /// against the config file's folder).
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
    pub data: &'a Path,
    /// The record count the site declares for its data.
    pub records: u64,
    /// The data source's delta and cap over every study.
    pub source_delta: f64,
    pub source_cap: f64,
}

impl SiteSetup<'_> {
    /// The config text; `studies` pins each study's exact terms with the site's cap for it.
    pub fn toml(&self, studies: &[(&StudyConfig, f64)]) -> String {
        use std::fmt::Write;
        let q = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
        let mut t = format!(
            "[site]\nname = \"{}\"\nstate_dir = \"state\"\n\n[coordinator]\naddress = \"{}\"\nserver_name = \"localhost\"\n\n\
             [tls]\nca = {}\ncert = {}\nkey = {}\n\n[sources.data]\npath = {}\nrecords = {}\ndelta = {:?}\nepsilon_cap = {:?}\n\n",
            self.name,
            self.coordinator,
            q(self.ca),
            q(self.cert),
            q(self.key),
            q(self.data),
            self.records,
            self.source_delta,
            self.source_cap
        );
        for (study, cap) in studies {
            let _ = writeln!(
                t,
                "{}",
                pinned_terms_toml(study, "data", self.records, *cap)
            );
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
[site]
name = "st-marys"
state_dir = "state"

[coordinator]
address = "127.0.0.1:7443"
server_name = "localhost"

[tls]
ca = "pki/ca.pem"
cert = "pki/st-marys.pem"
key = "pki/st-marys.key"

[sources.wards]
path = "/data/bc.csv"
records = 500
delta = 1e-5
epsilon_cap = 8.0

[studies.bc]
source = "wards"
epsilon_cap = 3.0
unit = "record"
task = "binary"
label = "y"
features = ["a", "b"]
clip_norm = 1.0
min_noise_multiplier = 1.0
max_sample_rate = 0.1
max_steps_per_round = 10
max_delta = 1e-6
"#;

    fn err_field(text: &str) -> String {
        match SiteConfig::from_toml(text, Path::new("/")) {
            Err(SiteConfigError::Field { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn parses_and_resolves_paths() {
        let c = SiteConfig::from_toml(TOML, Path::new("/etc/fedpriv")).expect("valid");
        assert_eq!(c.state_dir, PathBuf::from("/etc/fedpriv/state"));
        assert_eq!(c.sources["wards"].path, PathBuf::from("/data/bc.csv"));
        assert_eq!(c.sources["wards"].records, 500);
        let s = &c.studies["bc"];
        assert_eq!(s.epsilon_cap.get(), 3.0);
        assert_eq!(s.source, "wards");
        assert_eq!(s.terms.placements, [Placement::Local]);
        assert!(s.allow_identifier_columns.is_empty());
    }

    #[test]
    fn central_placement_is_only_ever_an_explicit_opt_in() {
        let site = TOML
            .replace("unit = \"record\"", "unit = \"site\"")
            .replace("max_sample_rate = 0.1\nmax_steps_per_round = 10\n", "");
        let c = SiteConfig::from_toml(&site, Path::new("/")).expect("valid");
        assert_eq!(c.studies["bc"].terms.placements, [Placement::Local]);
        let opted = site.replace(
            "unit = \"site\"",
            "unit = \"site\"\nplacements = [\"local\", \"central\"]",
        );
        let c = SiteConfig::from_toml(&opted, Path::new("/")).expect("valid");
        assert_eq!(
            c.studies["bc"].terms.placements,
            [Placement::Local, Placement::Central]
        );
        // The record unit never sends an un-noised update.
        let bad = TOML.replace(
            "unit = \"record\"",
            "unit = \"record\"\nplacements = [\"central\"]",
        );
        assert_eq!(err_field(&bad), "studies.bc.placements");
    }

    #[test]
    fn privacy_terms_have_no_defaults_and_errors_name_the_field() {
        for (from, to, want) in [
            (
                "epsilon_cap = 3.0",
                "epsilon_cap = 0.0",
                "studies.bc.epsilon_cap",
            ),
            (
                "max_delta = 1e-6",
                "max_delta = 1e-2",
                "studies.bc.max_delta",
            ),
            (
                "max_delta = 1e-6",
                "max_delta = 2e-5",
                "studies.bc.max_delta",
            ),
            ("max_sample_rate = 0.1\n", "", "studies.bc.max_sample_rate"),
            (
                "max_steps_per_round = 10",
                "max_steps_per_round = 0",
                "studies.bc.max_steps_per_round",
            ),
            (
                "source = \"wards\"",
                "source = \"icu\"",
                "studies.bc.source",
            ),
            ("records = 500", "records = 0", "sources.wards.records"),
            (
                "features = [\"a\", \"b\"]",
                "features = [\"a\", \"y\"]",
                "studies.bc.label",
            ),
            (
                "features = [\"a\", \"b\"]",
                "features = [\"a\", \"b\"]\nfills = { c = 1.0 }",
                "studies.bc.fills",
            ),
            (
                "clip_norm = 1.0",
                "clip_norm = -1.0",
                "studies.bc.clip_norm",
            ),
        ] {
            let text = TOML.replace(from, to);
            assert_eq!(err_field(&text), want, "{to}");
        }
        for missing in [
            "clip_norm = 1.0\n",
            "min_noise_multiplier = 1.0\n",
            "max_delta = 1e-6\n",
            "unit = \"record\"\n",
        ] {
            let text = TOML.replace(missing, "");
            assert!(
                matches!(
                    SiteConfig::from_toml(&text, Path::new("/")),
                    Err(SiteConfigError::Parse(_))
                ),
                "{missing}"
            );
        }
        let bad = TOML.replace("[tls]", "[tls]\ninsecure = true");
        assert!(matches!(
            SiteConfig::from_toml(&bad, Path::new("/")),
            Err(SiteConfigError::Parse(_))
        ));
    }

    #[test]
    fn allowed_identifier_columns_parse_and_are_validated() {
        let ok = TOML.replace(
            "epsilon_cap = 3.0",
            "epsilon_cap = 3.0\nallow_identifier_columns = [\"zip3\", \"admission year\"]",
        );
        let c = SiteConfig::from_toml(&ok, Path::new("/")).expect("valid");
        assert_eq!(
            c.studies["bc"].allow_identifier_columns,
            ["zip3", "admission year"]
        );
        for bad in [
            r#"[""]"#,
            r#"[" zip3"]"#,
            r#"["zip3", "zip3"]"#,
            r#"["a\u0007"]"#,
        ] {
            let text = TOML.replace(
                "epsilon_cap = 3.0",
                &format!("epsilon_cap = 3.0\nallow_identifier_columns = {bad}"),
            );
            assert_eq!(
                err_field(&text),
                "studies.bc.allow_identifier_columns",
                "{bad}"
            );
        }
    }

    #[test]
    fn pinned_terms_of_a_study_file_parse_back_as_the_same_terms() {
        let study = StudyConfig::from_toml(
            r#"
[study]
id = "bc"
model = { kind = "logistic_regression" }
rounds = 10
min_sites = 1
round_timeout_secs = 30
[data]
task = "binary"
label = "y"
features = ["a", "b"]
ranges = { a = [0.0, 10.0], b = [-1.0, 1.0] }
fills = { b = 0.5 }
[training]
strategy = "fedavg"
learning_rate = 0.5
server_learning_rate = 1.0
local_steps = 10
expected_batch = 25.0
[privacy]
unit = "record"
clip_norm = 1.0
noise_multiplier = 1.1
epsilon = 4.0
delta = 1e-6
[sites]
enrolled = ["st-marys"]
"#,
        )
        .expect("study");
        let table = pinned_terms_toml(&study, "wards", 500, 3.0);
        let head = TOML.split("[studies.bc]").next().expect("head");
        let c = SiteConfig::from_toml(&format!("{head}{table}"), Path::new("/")).expect(&table);
        let t = &c.studies["bc"].terms;
        assert_eq!(t.features, ["a", "b"]);
        assert_eq!(t.fills.get("b"), Some(&0.5));
        assert_eq!(t.min_noise_multiplier.get(), 1.1);
        assert_eq!(t.max_sample_rate.map(|q| q.get()), Some(0.05));
        assert_eq!(t.max_steps_per_round, Some(10));
        assert_eq!(t.max_delta.get(), 1e-6);
    }
}
