//! Study configuration: raw TOML in, validated types out.
//!
//! Validation happens once, here; everything downstream takes [`StudyConfig`]. Privacy
//! parameters have no defaults: a study that does not state its clip norm, noise (or target
//! epsilon), budget and delta is refused. There is no setting that turns noise off.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::dp::accountant::{self, AccountantKind};
use crate::dp::{ClipNorm, Delta, Epsilon, NoiseMultiplier, SampleRate, SgmEvent};
use crate::model::Architecture;
use crate::pki::validate_name;

/// A config that cannot be used, with the field at fault. The operator's fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid TOML: {0}")]
    Parse(String),
    /// A layer of `study.model` that cannot be used, named by its index.
    #[error("study.model: {0}")]
    Layer(String),
    #[error("{field}: {reason}")]
    Field { field: &'static str, reason: String },
}

fn field(field: &'static str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Field {
        field,
        reason: reason.to_string(),
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Label is 0 or 1 (one output, sigmoid).
    Binary,
    /// One of K classes (K outputs, softmax): an integer id 0..K-1, or one of the study's
    /// declared label strings.
    Multiclass,
    /// Label is any finite number (one output).
    Regression,
}

/// The unit of privacy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyUnit {
    /// Each patient record (DP-SGD inside each site).
    Record,
    /// A whole site's contribution per round (DP-FedAvg).
    Site,
}

/// Where site-level noise is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Each site noises its own clipped delta; the coordinator never sees it un-noised.
    Local,
    /// The coordinator noises the sum once (it is trusted with clipped deltas).
    Central,
}

/// Server-side optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    FedAvg,
    FedAdam,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    study: RawStudy,
    data: RawData,
    training: RawTraining,
    privacy: RawPrivacy,
    sites: RawSites,
    #[serde(default)]
    release: Option<RawRelease>,
    #[serde(default)]
    evaluation: Option<RawEvaluation>,
}

/// `[evaluation]`: DP federated evaluation on the sites' held-out records (record unit).
/// Every key is required: these are privacy terms.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvaluation {
    every: u64,
    noise_multiplier: f64,
    loss_clip: f64,
}

/// `[release]`: what must hold before a model of the study leaves the coordinator.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelease {
    require_privacy_audit: bool,
}

/// What must hold before a model of the study is exported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasePolicy {
    /// A passing privacy audit of these exact terms (`fedpriv-coordinator privacy-audit
    /// --state`) must be on record.
    pub require_privacy_audit: bool,
}

/// The TOML spelling of a model: `{ kind = "logistic_regression" }`,
/// `{ kind = "mlp", hidden = [64, 32], activation = "relu" }` (`hidden = 32` is one layer of
/// 32; the activation defaults to tanh), or `{ kind = "layers", layers = [...] }`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
enum RawModel {
    LogisticRegression,
    LinearRegression,
    Mlp {
        hidden: RawHidden,
        activation: Option<crate::arch::Activation>,
    },
    Layers {
        layers: Vec<RawLayer>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawHidden {
    One(usize),
    Many(Vec<usize>),
}

/// One layer of `{ kind = "layers", layers = [...] }`: `{ type = "conv2d", channels = 8,
/// kernel = 3, padding = 1 }` and so on.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", deny_unknown_fields)]
enum RawLayer {
    Dense {
        units: usize,
    },
    Conv1d {
        channels: usize,
        kernel: usize,
        stride: Option<usize>,
        padding: Option<usize>,
    },
    Conv2d {
        channels: usize,
        kernel: usize,
        stride: Option<usize>,
        padding: Option<usize>,
    },
    MaxPool {
        kernel: usize,
    },
    AvgPool {
        kernel: usize,
    },
    Flatten,
    Relu,
    Gelu,
    Tanh,
    Sigmoid,
    LayerNorm,
    GroupNorm {
        groups: usize,
    },
    Dropout {
        rate: f32,
    },
    /// Named only to refuse it with the reason.
    BatchNorm {},
}

fn layer_of(index: usize, raw: RawLayer) -> Result<crate::arch::Layer, ConfigError> {
    use crate::arch::{Activation, Layer};
    Ok(match raw {
        RawLayer::Dense { units } => Layer::Dense { units },
        RawLayer::Conv1d {
            channels,
            kernel,
            stride,
            padding,
        } => Layer::Conv1d {
            channels,
            kernel,
            stride: stride.unwrap_or(1),
            padding: padding.unwrap_or(0),
        },
        RawLayer::Conv2d {
            channels,
            kernel,
            stride,
            padding,
        } => Layer::Conv2d {
            channels,
            kernel,
            stride: stride.unwrap_or(1),
            padding: padding.unwrap_or(0),
        },
        RawLayer::MaxPool { kernel } => Layer::MaxPool { kernel },
        RawLayer::AvgPool { kernel } => Layer::AvgPool { kernel },
        RawLayer::Flatten => Layer::Flatten,
        RawLayer::Relu => Layer::Activation(Activation::Relu),
        RawLayer::Gelu => Layer::Activation(Activation::Gelu),
        RawLayer::Tanh => Layer::Activation(Activation::Tanh),
        RawLayer::Sigmoid => Layer::Activation(Activation::Sigmoid),
        RawLayer::LayerNorm => Layer::LayerNorm,
        RawLayer::GroupNorm { groups } => Layer::GroupNorm { groups },
        RawLayer::Dropout { rate } => Layer::Dropout { rate },
        RawLayer::BatchNorm {} => {
            return Err(ConfigError::Layer(format!(
                "layer {index} (batch_norm): batch normalisation mixes the examples of a batch, \
                 so no example's gradient is its own and per-example clipping (hence DP-SGD's \
                 guarantee) breaks; use layer_norm or group_norm"
            )))
        }
    })
}

fn architecture_of(m: RawModel) -> Result<Architecture, ConfigError> {
    Ok(match m {
        RawModel::LogisticRegression => Architecture::LogisticRegression,
        RawModel::LinearRegression => Architecture::LinearRegression,
        RawModel::Mlp { hidden, activation } => Architecture::Mlp {
            hidden: match hidden {
                RawHidden::One(h) => vec![h],
                RawHidden::Many(v) => v,
            },
            activation: activation.unwrap_or(crate::arch::Activation::Tanh),
        },
        RawModel::Layers { layers } => Architecture::Layers(
            layers
                .into_iter()
                .enumerate()
                .map(|(i, l)| layer_of(i, l))
                .collect::<Result<_, _>>()?,
        ),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStudy {
    id: String,
    model: RawModel,
    rounds: u64,
    min_sites: usize,
    round_timeout_secs: u64,
    /// End the study if no enrolled site has joined this long after it started.
    join_timeout_secs: Option<u64>,
    /// Wire encoding of the broadcast model and of updates: "f32" (default), "f16", "bf16".
    encoding: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawData {
    task: Task,
    label: String,
    /// Numeric columns; `px0..px63` stands for px0, px1, ..., px63 (expanded here, so
    /// every site receives the explicit list). Empty for an image study.
    #[serde(default)]
    features: Vec<String>,
    /// Categorical columns: `ward = ["A", "B", "C"]` (one-hot, with an "other" slot for
    /// any other value) or `ward = { categories = [...], embedding = 4 }` (a learned
    /// embedding of that width).
    #[serde(default)]
    categorical: BTreeMap<String, RawCategorical>,
    /// An image study: each record is an image file named in `file_column`.
    image: Option<RawImage>,
    /// Multiclass: the number of classes (labels are ids 0..K-1) ...
    classes: Option<usize>,
    /// ... or the class labels as the data writes them (their order gives the outputs).
    labels: Option<Vec<String>>,
    /// Public value ranges used for scaling, per feature; `default_range` for the others.
    #[serde(default)]
    ranges: BTreeMap<String, [f32; 2]>,
    default_range: Option<[f32; 2]>,
    label_range: Option<[f32; 2]>,
    /// Public per-feature values that stand in for a missing or unreadable cell; a record
    /// with such a cell in a feature without a fill is skipped at the site.
    #[serde(default)]
    fills: BTreeMap<String, f32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawCategorical {
    OneHot(Vec<String>),
    Embedded {
        categories: Vec<String>,
        embedding: usize,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    file_column: String,
    channels: usize,
    height: usize,
    width: usize,
    /// Per channel, on pixel values scaled to [0, 1]: `(v - mean) / std`.
    mean: Vec<f32>,
    std: Vec<f32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTraining {
    strategy: Strategy,
    local_epochs: Option<usize>,
    batch_size: Option<usize>,
    learning_rate: f32,
    server_learning_rate: f32,
    /// Record unit only: DP-SGD steps per round and expected Poisson batch size.
    local_steps: Option<u64>,
    expected_batch: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivacy {
    unit: PrivacyUnit,
    clip_norm: f64,
    noise_multiplier: Option<f64>,
    target_epsilon: Option<f64>,
    placement: Option<Placement>,
    site_sample_rate: Option<f64>,
    epsilon: f64,
    delta: f64,
    accountant: Option<AccountantKind>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSites {
    enrolled: Vec<String>,
}

/// How each site trains in a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LocalPlan {
    /// Site unit: plain minibatch SGD, then the delta is clipped (and noised if local).
    Sgd {
        epochs: usize,
        batch_size: usize,
        learning_rate: f32,
    },
    /// Record unit: DP-SGD with Poisson batches of expected size `expected_batch`.
    DpSgd {
        steps: u64,
        expected_batch: f64,
        learning_rate: f32,
    },
}

/// The privacy side of a study, validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyPlan {
    pub unit: PrivacyUnit,
    pub placement: Placement,
    pub clip_norm: ClipNorm,
    pub noise_multiplier: NoiseMultiplier,
    /// Site unit: rate at which sites are sampled each round (1 = every eligible site).
    pub site_sample_rate: SampleRate,
    pub epsilon: Epsilon,
    pub delta: Delta,
    pub accountant: AccountantKind,
    /// Record unit with `target_epsilon`: the coordinator has yet to choose sigma from the
    /// sites' declared record counts (the smallest site decides). Until it does,
    /// `noise_multiplier` holds the sigma that fits the target even at q = 1 (more noise than
    /// any site will need), and no round starts.
    #[serde(default)]
    pub calibrate_to: Option<Epsilon>,
}

/// The data contract every site must meet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSpec {
    pub task: Task,
    pub label: String,
    /// Multiclass: the number of classes K (0 otherwise).
    pub classes: usize,
    /// Multiclass with named labels: the K labels, in output order (empty otherwise: the
    /// labels are integer ids).
    pub class_labels: Vec<String>,
    pub features: Vec<String>,
    pub ranges: Vec<[f32; 2]>,
    pub label_range: Option<[f32; 2]>,
    /// One per feature: the public value a missing or unreadable cell takes, or `None` (a
    /// record with such a cell is skipped, and counted only in the site's own log).
    pub fills: Vec<Option<f32>>,
    /// Categorical columns, by name, after the numeric features in the model's input.
    pub categorical: Vec<CategoricalColumn>,
    /// An image study's images (then `features` is empty).
    pub image: Option<ImageSpec>,
}

/// A categorical column: its public categories (any other value, or a missing one, goes to
/// an extra "other" slot), one-hot encoded or through a learned embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoricalColumn {
    pub name: String,
    pub categories: Vec<String>,
    /// The embedding's width, or `None` for one-hot (`categories + 1` values).
    pub embedding: Option<usize>,
}

impl CategoricalColumn {
    /// Slots, the "other" one included.
    pub fn slots(&self) -> usize {
        self.categories.len() + 1
    }

    /// The values this column contributes to the model's input.
    pub fn width(&self) -> usize {
        self.embedding.unwrap_or(self.slots())
    }
}

/// How a record's image becomes the model's input: decoded, converted to `channels` (1:
/// grey, 3: RGB), resized to `height` x `width`, scaled to [0, 1] and normalised per channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSpec {
    pub file_column: String,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// A validated study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyConfig {
    pub id: String,
    pub model: Architecture,
    pub rounds: u64,
    pub min_sites: usize,
    pub round_timeout_secs: u64,
    /// The study ends if no enrolled site has joined this long after it started (`None`:
    /// it waits).
    pub join_timeout_secs: Option<u64>,
    /// How the model and the updates travel (see [`crate::wire::Dtype`]). The 16-bit
    /// encodings halve the bytes; rounding already-noised values is post-processing and
    /// costs no privacy. The coordinator keeps and aggregates in f32 whatever this says.
    pub encoding: crate::wire::Dtype,
    pub data: DataSpec,
    pub strategy: Strategy,
    pub server_learning_rate: f32,
    pub local: LocalPlan,
    pub privacy: PrivacyPlan,
    pub enrolled: Vec<String>,
    pub release: ReleasePolicy,
    /// DP federated evaluation, if the study asks for it.
    #[serde(default)]
    pub evaluation: Option<crate::evaluation::EvaluationPlan>,
}

impl StudyConfig {
    /// Parses and validates a study's TOML.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        Self::validate(raw)
    }

    fn validate(raw: Raw) -> Result<Self, ConfigError> {
        let s = raw.study;
        let model = architecture_of(s.model)?;
        validate_name(&s.id).map_err(|e| field("study.id", e))?;
        if s.rounds == 0 {
            return Err(field("study.rounds", "must be at least 1"));
        }
        if s.round_timeout_secs == 0 {
            return Err(field("study.round_timeout_secs", "must be at least 1"));
        }
        if s.join_timeout_secs == Some(0) {
            return Err(field("study.join_timeout_secs", "must be at least 1"));
        }
        let encoding = match s.encoding.as_deref() {
            None => crate::wire::Dtype::F32,
            Some(name) => crate::wire::Dtype::from_name(name).ok_or_else(|| {
                field(
                    "study.encoding",
                    format!("{name:?}: use \"f32\", \"f16\" or \"bf16\""),
                )
            })?,
        };
        if let Architecture::Mlp { hidden, .. } = &model {
            if hidden.is_empty() || hidden.contains(&0) {
                return Err(field(
                    "study.model.hidden",
                    "list at least one hidden layer, each of at least 1 unit",
                ));
            }
        }
        match (&model, raw.data.task) {
            (Architecture::LinearRegression, Task::Regression) => {}
            (Architecture::LinearRegression, _) => {
                return Err(field(
                    "study.model",
                    "linear_regression goes with task = \"regression\"",
                ))
            }
            (Architecture::LogisticRegression, Task::Regression) => {
                return Err(field(
                    "study.model",
                    "logistic_regression goes with task = \"binary\" or \"multiclass\" (use linear_regression, an mlp or layers for regression)",
                ))
            }
            _ => {}
        }

        let mut enrolled = BTreeSet::new();
        for site in &raw.sites.enrolled {
            validate_name(site).map_err(|e| field("sites.enrolled", format!("{site:?}: {e}")))?;
            if !enrolled.insert(site.clone()) {
                return Err(field("sites.enrolled", format!("{site:?} is listed twice")));
            }
        }
        if s.min_sites == 0 || s.min_sites > enrolled.len() {
            return Err(field(
                "study.min_sites",
                format!(
                    "must be between 1 and the {} enrolled sites",
                    enrolled.len()
                ),
            ));
        }

        let mut d = raw.data;
        d.features = expand_features(&d.features).map_err(|e| field("data.features", e))?;
        let image = match d.image.take() {
            None => None,
            Some(im) => {
                if !d.features.is_empty() || !d.categorical.is_empty() {
                    return Err(field(
                        "data.image",
                        "an image study reads its images: leave features and categorical out",
                    ));
                }
                if !matches!(im.channels, 1 | 3) {
                    return Err(field("data.image.channels", "1 (grey) or 3 (RGB)"));
                }
                if im.height == 0 || im.width == 0 || im.height > 4096 || im.width > 4096 {
                    return Err(field("data.image", "height and width from 1 to 4096"));
                }
                if im.mean.len() != im.channels || im.std.len() != im.channels {
                    return Err(field("data.image", "one mean and one std per channel"));
                }
                if im.mean.iter().any(|m| !m.is_finite())
                    || im.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
                {
                    return Err(field("data.image", "finite means and positive stds"));
                }
                if im.file_column == d.label {
                    return Err(field("data.image.file_column", "cannot be the label"));
                }
                Some(ImageSpec {
                    file_column: im.file_column,
                    channels: im.channels,
                    height: im.height,
                    width: im.width,
                    mean: im.mean,
                    std: im.std,
                })
            }
        };
        let mut categorical = Vec::new();
        for (name, c) in std::mem::take(&mut d.categorical) {
            let (categories, embedding) = match c {
                RawCategorical::OneHot(c) => (c, None),
                RawCategorical::Embedded {
                    categories,
                    embedding,
                } => {
                    if embedding == 0 {
                        return Err(field(
                            "data.categorical",
                            format!("{name:?}: an embedding needs a width of at least 1"),
                        ));
                    }
                    (categories, Some(embedding))
                }
            };
            let unique: BTreeSet<&String> = categories.iter().collect();
            if categories.is_empty() || unique.len() != categories.len() {
                return Err(field(
                    "data.categorical",
                    format!("{name:?}: list each category once, at least one"),
                ));
            }
            if d.features.contains(&name) || name == d.label {
                return Err(field(
                    "data.categorical",
                    format!("{name:?} is also a feature or the label"),
                ));
            }
            categorical.push(CategoricalColumn {
                name,
                categories,
                embedding,
            });
        }
        if d.features.is_empty() && categorical.is_empty() && image.is_none() {
            return Err(field(
                "data.features",
                "at least one feature column is needed",
            ));
        }
        let mut seen = BTreeSet::new();
        for f in &d.features {
            if !seen.insert(f) {
                return Err(field("data.features", format!("{f:?} is listed twice")));
            }
        }
        if seen.contains(&d.label) {
            return Err(field("data.label", "the label cannot also be a feature"));
        }
        let range_ok = |r: &[f32; 2]| r[0].is_finite() && r[1].is_finite() && r[0] < r[1];
        if let Some(r) = &d.default_range {
            if !range_ok(r) {
                return Err(field("data.default_range", "need finite lo < hi"));
            }
        }
        let mut ranges = Vec::with_capacity(d.features.len());
        for f in &d.features {
            let r = d
                .ranges
                .get(f)
                .or(d.default_range.as_ref())
                .ok_or_else(|| {
                    field(
                        "data.ranges",
                        format!("no public range for feature {f:?} (and no data.default_range)"),
                    )
                })?;
            if !range_ok(r) {
                return Err(field("data.ranges", format!("{f:?}: need finite lo < hi")));
            }
            ranges.push(*r);
        }
        if let Some(extra) = d.ranges.keys().find(|k| !seen.contains(k)) {
            return Err(field("data.ranges", format!("{extra:?} is not a feature")));
        }
        if let Some(extra) = d.fills.keys().find(|k| !seen.contains(k)) {
            return Err(field("data.fills", format!("{extra:?} is not a feature")));
        }
        if let Some((f, _)) = d.fills.iter().find(|(_, v)| !v.is_finite()) {
            return Err(field("data.fills", format!("{f:?}: need a finite value")));
        }
        let (classes, class_labels) = match (d.task, d.classes, d.labels.take()) {
            (Task::Multiclass, Some(k), None) if k >= 2 => (k, Vec::new()),
            (Task::Multiclass, None, Some(labels)) if labels.len() >= 2 => {
                let mut unique = BTreeSet::new();
                for l in &labels {
                    if l.trim().is_empty() || l.trim() != l {
                        return Err(field(
                            "data.labels",
                            format!("{l:?}: labels are non-empty, without surrounding spaces"),
                        ));
                    }
                    if !unique.insert(l) {
                        return Err(field("data.labels", format!("{l:?} is listed twice")));
                    }
                }
                (labels.len(), labels)
            }
            (Task::Multiclass, _, _) => {
                return Err(field(
                    "data.classes",
                    "multiclass needs either classes = K (K >= 2, labels 0..K-1) or labels = [...] (at least 2)",
                ))
            }
            (_, None, None) => (0, Vec::new()),
            (_, _, _) => {
                return Err(field(
                    "data.classes",
                    "classes and labels belong to task = \"multiclass\"",
                ))
            }
        };
        if d.task != Task::Regression && d.label_range.is_some() {
            return Err(field(
                "data.label_range",
                "a label range belongs to task = \"regression\"",
            ));
        }
        let fills = d.features.iter().map(|f| d.fills.get(f).copied()).collect();
        if d.task == Task::Regression {
            match d.label_range {
                Some(r) if r[0].is_finite() && r[1].is_finite() && r[0] < r[1] => {}
                _ => {
                    return Err(field(
                        "data.label_range",
                        "regression needs a public label range [lo, hi]",
                    ))
                }
            }
        }

        let p = raw.privacy;
        let t = raw.training;
        let clip_norm = ClipNorm::new(p.clip_norm).map_err(|e| field("privacy.clip_norm", e))?;
        let epsilon = Epsilon::new(p.epsilon).map_err(|e| field("privacy.epsilon", e))?;
        let delta = Delta::new(p.delta).map_err(|e| field("privacy.delta", e))?;
        let accountant = p.accountant.unwrap_or_default();
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return Err(field("training.learning_rate", "must be a positive number"));
        }
        if !(t.server_learning_rate.is_finite() && t.server_learning_rate > 0.0) {
            return Err(field(
                "training.server_learning_rate",
                "must be a positive number",
            ));
        }

        let (placement, site_sample_rate, local) = match p.unit {
            PrivacyUnit::Site => {
                let placement = p.placement.ok_or_else(|| {
                    field(
                        "privacy.placement",
                        "site unit needs placement = \"local\" or \"central\"",
                    )
                })?;
                // Participation is visible to the coordinator under either placement (and
                // to each site), so sampling sites buys no amplification: every round is
                // priced at q = 1 and every site takes part.
                let rate = p.site_sample_rate.unwrap_or(1.0);
                let rate =
                    SampleRate::new(rate).map_err(|e| field("privacy.site_sample_rate", e))?;
                if rate.get() < 1.0 {
                    return Err(field(
                        "privacy.site_sample_rate",
                        "sampling sites is not supported: the coordinator sees who took part, so no amplification can be claimed and rounds are priced at q = 1 (use 1.0 or leave it out)",
                    ));
                }
                if t.local_steps.is_some() || t.expected_batch.is_some() {
                    return Err(field(
                        "training",
                        "local_steps and expected_batch belong to the record unit",
                    ));
                }
                let epochs = t
                    .local_epochs
                    .ok_or_else(|| field("training.local_epochs", "required for the site unit"))?;
                let batch_size = t
                    .batch_size
                    .ok_or_else(|| field("training.batch_size", "required for the site unit"))?;
                if epochs == 0 || batch_size == 0 {
                    return Err(field(
                        "training",
                        "local_epochs and batch_size must be at least 1",
                    ));
                }
                (
                    placement,
                    rate,
                    LocalPlan::Sgd {
                        epochs,
                        batch_size,
                        learning_rate: t.learning_rate,
                    },
                )
            }
            PrivacyUnit::Record => {
                if p.placement.is_some() || p.site_sample_rate.is_some() {
                    return Err(field(
                        "privacy",
                        "placement and site_sample_rate belong to the site unit",
                    ));
                }
                if t.local_epochs.is_some() || t.batch_size.is_some() {
                    return Err(field("training", "the record unit uses local_steps and expected_batch, not local_epochs and batch_size"));
                }
                let steps = t
                    .local_steps
                    .ok_or_else(|| field("training.local_steps", "required for the record unit"))?;
                let expected_batch = t.expected_batch.ok_or_else(|| {
                    field("training.expected_batch", "required for the record unit")
                })?;
                if steps == 0 {
                    return Err(field("training.local_steps", "must be at least 1"));
                }
                if !(expected_batch.is_finite() && expected_batch >= 1.0) {
                    return Err(field("training.expected_batch", "must be at least 1"));
                }
                let rate = SampleRate::new(1.0).map_err(|e| field("privacy", e))?;
                (
                    Placement::Local,
                    rate,
                    LocalPlan::DpSgd {
                        steps,
                        expected_batch,
                        learning_rate: t.learning_rate,
                    },
                )
            }
        };

        let mut calibrate_to = None;
        let noise_multiplier = match (p.noise_multiplier, p.target_epsilon) {
            (Some(n), None) => {
                NoiseMultiplier::new(n).map_err(|e| field("privacy.noise_multiplier", e))?
            }
            (None, Some(target)) => {
                let target =
                    Epsilon::new(target).map_err(|e| field("privacy.target_epsilon", e))?;
                if target > epsilon {
                    return Err(field(
                        "privacy.target_epsilon",
                        "cannot exceed the study budget privacy.epsilon",
                    ));
                }
                if let LocalPlan::DpSgd { steps, .. } = &local {
                    // Calibrated by the coordinator once the sites have declared their
                    // sizes; until then the sigma that fits at q = 1, every site's bound.
                    let total = steps.saturating_mul(s.rounds);
                    let q1 = SampleRate::new(1.0).map_err(|e| field("privacy", e))?;
                    let upper = accountant::calibrate_noise(accountant, q1, total, target, delta)
                        .map_err(|e| field("privacy.target_epsilon", e))?;
                    calibrate_to = Some(target);
                    upper
                } else {
                    let scale = if placement == Placement::Local {
                        2.0
                    } else {
                        1.0
                    };
                    let effective = accountant::calibrate_noise(
                        accountant,
                        site_sample_rate,
                        s.rounds,
                        target,
                        delta,
                    )
                    .map_err(|e| field("privacy.target_epsilon", e))?;
                    NoiseMultiplier::new(effective.get() * scale)
                        .map_err(|e| field("privacy.target_epsilon", e))?
                }
            }
            _ => {
                return Err(field(
                    "privacy",
                    "give exactly one of noise_multiplier and target_epsilon",
                ))
            }
        };

        let evaluation = match raw.evaluation {
            None => None,
            Some(e) => {
                if p.unit != PrivacyUnit::Record {
                    return Err(field(
                        "evaluation",
                        "DP evaluation is for record-unit studies: under the site unit a site's whole evaluation vector can change with its data, so no per-record noise protects it",
                    ));
                }
                if e.every == 0 {
                    return Err(field("evaluation.every", "must be at least 1"));
                }
                if !(e.loss_clip.is_finite() && e.loss_clip > 0.0) {
                    return Err(field("evaluation.loss_clip", "must be a number above 0"));
                }
                let noise_multiplier = NoiseMultiplier::new(e.noise_multiplier)
                    .map_err(|err| field("evaluation.noise_multiplier", err))?;
                Some(crate::evaluation::EvaluationPlan {
                    every: e.every,
                    noise_multiplier,
                    loss_clip: e.loss_clip,
                })
            }
        };

        if evaluation.is_some() && calibrate_to.is_some() {
            return Err(field(
                "privacy.target_epsilon",
                "calibrates the training noise over the planned rounds only, and [evaluation] spends budget too: give noise_multiplier (plan both with `fedpriv-coordinator budget`)",
            ));
        }
        let cfg = Self {
            evaluation,
            id: s.id,
            model,
            rounds: s.rounds,
            min_sites: s.min_sites,
            round_timeout_secs: s.round_timeout_secs,
            join_timeout_secs: s.join_timeout_secs,
            encoding,
            data: DataSpec {
                task: d.task,
                label: d.label,
                features: d.features,
                ranges,
                label_range: d.label_range,
                fills,
                classes,
                class_labels,
                categorical,
                image,
            },
            strategy: t.strategy,
            server_learning_rate: t.server_learning_rate,
            local,
            privacy: PrivacyPlan {
                unit: p.unit,
                placement,
                clip_norm,
                noise_multiplier,
                site_sample_rate,
                epsilon,
                delta,
                accountant,
                calibrate_to,
            },
            enrolled: enrolled.into_iter().collect(),
            release: ReleasePolicy {
                require_privacy_audit: raw
                    .release
                    .as_ref()
                    .is_some_and(|r| r.require_privacy_audit),
            },
        };
        if cfg.evaluation.is_some() {
            // The vector travels in one control frame (f64 values, postcard framing).
            let len = crate::evaluation::Layout::of(&cfg.data).len();
            if len * 9 + 1024 > crate::wire::MAX_CONTROL_FRAME {
                return Err(field(
                    "evaluation",
                    format!("{} classes make an evaluation vector of {len} values, more than one message carries; evaluate with `model evaluate` instead", cfg.data.n_outputs()),
                ));
            }
        }
        cfg.check_model_size()?;
        Ok(cfg)
    }

    /// The model's layers must fit the data (each layer's shapes are checked, and an error
    /// names the layer), and its size is bounded by the wire format's limit on values
    /// ([`MAX_MODEL_VALUES`](crate::model::MAX_MODEL_VALUES), 8 GiB of f32) and by this
    /// machine's address space, not by a fixed layer width: what fits in memory is the
    /// operator's to judge (the coordinator holds about two f32 copies, see
    /// docs/performance.md). Returns the number of parameters.
    fn check_model_size(&self) -> Result<u64, ConfigError> {
        let compiled = crate::arch::compile_for(&self.model, &self.data, self.n_outputs())
            .map_err(|e| match e {
                crate::arch::LayoutError::Spec(e) => field(
                    "study.model",
                    format!(
                        "{} over {} features is too large: {e} (at most {} parameters, {} GiB of f32 per copy)",
                        self.model.describe(),
                        self.data.features.len(),
                        crate::model::MAX_MODEL_VALUES,
                        (crate::model::MAX_MODEL_VALUES * 4) >> 30
                    ),
                ),
                other => ConfigError::Layer(other.to_string()),
            })?;
        let spec = compiled
            .spec()
            .map_err(|e| field("study.model", e.to_string()))?;
        let values = spec.num_values() as u64;
        // Every copy of the model is one allocation of f32: it must fit this machine's
        // address space (a 32-bit build cannot hold what a 64-bit one can).
        let fits = values
            .checked_mul(4)
            .and_then(|b| usize::try_from(b).ok())
            .is_some_and(|b| b <= isize::MAX as usize);
        if !fits {
            return Err(field(
                "study.model",
                format!("{values} parameters do not fit in this machine's address space"),
            ));
        }
        Ok(values)
    }

    /// Number of model outputs: 1 for binary and regression, K for K classes.
    pub fn n_outputs(&self) -> usize {
        self.data.n_outputs()
    }

    /// One example's input shape.
    pub fn input_shape(&self) -> Vec<usize> {
        self.data.input_shape()
    }

    /// The SHA-256 of everything that makes the study's mechanism (model, data contract,
    /// local plan, privacy plan, rounds): a privacy audit holds for these terms only.
    pub fn mechanism_digest(&self) -> String {
        let terms = serde_json::json!({
            "model": self.model,
            "data": self.data,
            "local": self.local,
            "privacy": self.privacy,
            "rounds": self.rounds,
        });
        crate::digest::sha256_hex(terms.to_string().as_bytes())
    }
}

impl DataSpec {
    /// Number of model outputs: 1 for binary and regression, K for K classes.
    pub fn n_outputs(&self) -> usize {
        match self.task {
            Task::Multiclass => self.classes.max(2),
            Task::Binary | Task::Regression => 1,
        }
    }

    /// One example's input as the data provides it: the image `[C, H, W]`, or the numeric
    /// features followed by one value per categorical column (its category's index).
    pub fn input_shape(&self) -> Vec<usize> {
        match &self.image {
            Some(im) => vec![im.channels, im.height, im.width],
            None => vec![self.features.len() + self.categorical.len()],
        }
    }

    /// How categorical columns enter the model (for `arch::compile_encoded`).
    pub fn encoding(&self) -> crate::arch::Encoding {
        crate::arch::Encoding {
            numeric: self.features.len(),
            categorical: self
                .categorical
                .iter()
                .map(|c| (c.slots(), c.embedding))
                .collect(),
        }
    }
}

/// Expands `prefix{a}..prefix{b}` entries (same prefix, a <= b, at most 100,000 names) into
/// the explicit column names; other entries are kept as written.
pub fn expand_features(features: &[String]) -> Result<Vec<String>, String> {
    fn split(s: &str) -> Option<(&str, u64, usize)> {
        let digits = s.bytes().rev().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        let (prefix, num) = s.split_at(s.len() - digits);
        Some((prefix, num.parse().ok()?, digits))
    }
    let mut out = Vec::new();
    for f in features {
        let Some((from, to)) = f.split_once("..") else {
            out.push(f.clone());
            continue;
        };
        let pattern = || format!("{f:?}: a pattern is written like px0..px63");
        let (Some((p1, a, wa)), Some((p2, b, wb))) = (split(from), split(to)) else {
            return Err(pattern());
        };
        if p1 != p2 || a > b {
            return Err(pattern());
        }
        if b - a >= 100_000 {
            return Err(format!("{f:?} expands to more than 100,000 columns"));
        }
        // Zero-padded patterns (px00..px63) keep their width.
        let width =
            if from.len() == to.len() && wa == wb && from.as_bytes()[p1.len()] == b'0' && wa > 1 {
                wa
            } else {
                0
            };
        for i in a..=b {
            out.push(format!("{p1}{i:0width$}"));
        }
    }
    Ok(out)
}

impl StudyConfig {
    /// A record study with `target_epsilon`: the sigma with which every planned round
    /// (`rounds` x `local_steps` DP-SGD steps) fits the target at q = expected batch /
    /// `records`. The coordinator calls it with the smallest declared site (whose q is the
    /// largest); a site with its own count gets the least sigma it can be asked for.
    pub fn calibrated_sigma(
        &self,
        target: Epsilon,
        records: u64,
    ) -> Result<NoiseMultiplier, String> {
        let LocalPlan::DpSgd {
            steps,
            expected_batch,
            ..
        } = &self.local
        else {
            return Err("only the record unit's noise is calibrated from the sites' sizes".into());
        };
        if (records as f64) < *expected_batch {
            return Err(format!(
                "{records} records are fewer than the expected batch {expected_batch}"
            ));
        }
        let q = SampleRate::new(expected_batch / records as f64).map_err(|e| e.to_string())?;
        let p = &self.privacy;
        accountant::calibrate_noise(
            p.accountant,
            q,
            steps.saturating_mul(self.rounds),
            target,
            p.delta,
        )
        .map_err(|e| e.to_string())
    }
}

impl PrivacyPlan {
    /// The mechanism one round costs a site, as the accountant must see it.
    ///
    /// - record unit: `steps` DP-SGD steps at q = expected_batch / records, noise sigma;
    /// - site unit, local noise: the coordinator sees the site's own noised delta, whose
    ///   sensitivity under replace-one adjacency is 2C, so the accountant gets sigma / 2;
    /// - site unit, central noise: add/remove-one-site adjacency on the noised sum,
    ///   sensitivity C, at q = 1 (participation is visible: no amplification is claimed).
    ///
    /// `records` is the record count the site declared (record unit only).
    pub fn round_cost(&self, local: &LocalPlan, records: Option<u64>) -> Result<SgmEvent, String> {
        round_cost(
            self.unit,
            self.placement,
            self.noise_multiplier.get(),
            local,
            records,
        )
    }
}

/// The mechanism one round costs a site (see [`PrivacyPlan::round_cost`]). Sites compute it
/// themselves from the task's parameters and their own declared record count, so a
/// coordinator cannot under-report what a round costs them.
pub fn round_cost(
    unit: PrivacyUnit,
    placement: Placement,
    sigma: f64,
    local: &LocalPlan,
    records: Option<u64>,
) -> Result<SgmEvent, String> {
    match (unit, local) {
        (
            PrivacyUnit::Record,
            LocalPlan::DpSgd {
                steps,
                expected_batch,
                ..
            },
        ) => {
            let n = records.ok_or("the site has not reported its record count")?;
            if (n as f64) < *expected_batch {
                return Err(format!(
                    "the site declared {n} records, fewer than the expected batch {expected_batch}"
                ));
            }
            SgmEvent::new(expected_batch / n as f64, sigma, *steps).map_err(|e| e.to_string())
        }
        (PrivacyUnit::Site, LocalPlan::Sgd { .. }) => {
            let s = if placement == Placement::Local {
                sigma / 2.0
            } else {
                sigma
            };
            SgmEvent::new(1.0, s, 1).map_err(|e| e.to_string())
        }
        _ => Err("the local training plan does not match the privacy unit".into()),
    }
}

/// The same event as a data source's ledger counts it: under record-level add/remove
/// adjacency, whatever the study's unit. A record-unit event already is one; a site-unit
/// event is the site's whole clipped delta, which one record can move anywhere within the
/// clip ball (sensitivity 2C): sigma / 2 at q = 1 under either placement.
pub fn source_event(
    unit: PrivacyUnit,
    placement: Placement,
    sigma: f64,
    study_event: SgmEvent,
) -> Result<SgmEvent, String> {
    match (unit, placement) {
        (PrivacyUnit::Record, _) => Ok(study_event),
        (PrivacyUnit::Site, _) => {
            SgmEvent::new(1.0, sigma / 2.0, study_event.steps).map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SITE_TOML: &str = r#"
[study]
id = "bc"
model = { kind = "logistic_regression" }
rounds = 10
min_sites = 2
round_timeout_secs = 30

[data]
task = "binary"
label = "malignant"
features = ["a", "b"]
ranges = { a = [0.0, 10.0], b = [-1.0, 1.0] }

[training]
strategy = "fedavg"
local_epochs = 1
batch_size = 16
learning_rate = 0.1
server_learning_rate = 1.0

[privacy]
unit = "site"
placement = "local"
site_sample_rate = 1.0
clip_norm = 1.0
noise_multiplier = 1.0
epsilon = 8.0
delta = 1e-5

[sites]
enrolled = ["st-marys", "general", "north"]
"#;

    #[test]
    fn valid_site_study_parses() {
        let c = StudyConfig::from_toml(SITE_TOML).expect("valid");
        assert_eq!(c.enrolled.len(), 3);
        assert_eq!(c.privacy.accountant, AccountantKind::Pld);
        let cost = c.privacy.round_cost(&c.local, None).expect("cost");
        assert!((cost.sigma.get() - 0.5).abs() < 1e-12 && cost.steps == 1);
    }

    #[test]
    fn evaluation_terms_are_required_and_only_for_the_record_unit() {
        use crate::test_util::StudyBuilder;
        let record = StudyBuilder::new("e")
            .record_unit(5, 10.0)
            .enrolled(["a", "b"])
            .evaluation(3, 2.0, 4.0);
        let cfg = record.config().expect("a record study with evaluation");
        let plan = cfg.evaluation.expect("the plan");
        assert_eq!(
            (plan.every, plan.noise_multiplier.get(), plan.loss_clip),
            (3, 2.0, 4.0)
        );
        let toml = record.toml();
        for (from, to, want) in [
            ("every = 3", "every = 0", "evaluation.every"),
            (
                "noise_multiplier = 2.0\nloss",
                "noise_multiplier = 0.0\nloss",
                "evaluation.noise_multiplier",
            ),
            (
                "loss_clip = 4.0",
                "loss_clip = -1.0",
                "evaluation.loss_clip",
            ),
        ] {
            assert!(toml.contains(from), "{from}");
            match StudyConfig::from_toml(&toml.replace(from, to)) {
                Err(ConfigError::Field { field, .. }) => assert_eq!(field, want),
                other => panic!("{to}: {other:?}"),
            }
        }
        // No silent default for a privacy term; no unknown key.
        assert!(matches!(
            StudyConfig::from_toml(&toml.replace("loss_clip = 4.0\n", "")),
            Err(ConfigError::Parse(_))
        ));
        assert!(matches!(
            StudyConfig::from_toml(&toml.replace("every = 3", "every = 3\nsplit = 0.1")),
            Err(ConfigError::Parse(_))
        ));
        // Calibration would leave the evaluations' spend out of the target: refused.
        let target = record.toml().replace(
            "noise_multiplier = 2.0\nepsilon",
            "target_epsilon = 2.0\nepsilon",
        );
        assert!(target.contains("target_epsilon"));
        match StudyConfig::from_toml(&target) {
            Err(ConfigError::Field { field, .. }) => assert_eq!(field, "privacy.target_epsilon"),
            other => panic!("{other:?}"),
        }
        let site = StudyBuilder::new("e")
            .enrolled(["a", "b"])
            .evaluation(3, 2.0, 4.0);
        match site.config() {
            Err(ConfigError::Field { field, .. }) => assert_eq!(field, "evaluation"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("delta = 1e-5", "delta = 1.5", "privacy.delta"),
            ("clip_norm = 1.0", "clip_norm = -1.0", "privacy.clip_norm"),
            ("min_sites = 2", "min_sites = 4", "study.min_sites"),
            ("noise_multiplier = 1.0", "", "privacy"),
            (
                "noise_multiplier = 1.0",
                "noise_multiplier = 1.0\ntarget_epsilon = 2.0",
                "privacy",
            ),
            ("b = [-1.0, 1.0]", "b = [1.0, -1.0]", "data.ranges"),
            ("\"north\"]", "\"north\", \"general\"]", "sites.enrolled"),
            (
                "site_sample_rate = 1.0",
                "site_sample_rate = 0.5",
                "privacy.site_sample_rate",
            ),
        ];
        for (from, to, want) in cases {
            let text = SITE_TOML.replace(from, to);
            match StudyConfig::from_toml(&text) {
                Err(ConfigError::Field { field, .. }) => assert_eq!(field, want, "{to}"),
                other => panic!("{to}: expected a {want} error, got {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_keys_and_missing_privacy_fields_are_refused() {
        let text = SITE_TOML.replace("delta = 1e-5", "delta = 1e-5\nnoise = false");
        assert!(
            matches!(StudyConfig::from_toml(&text), Err(ConfigError::Parse(m)) if m.contains("noise"))
        );
        let text = SITE_TOML.replace("epsilon = 8.0\n", "");
        assert!(
            matches!(StudyConfig::from_toml(&text), Err(ConfigError::Parse(m)) if m.contains("epsilon"))
        );
    }

    #[test]
    fn wire_encoding_defaults_to_f32_and_names_its_field() {
        use crate::wire::Dtype;
        assert_eq!(
            StudyConfig::from_toml(SITE_TOML).expect("valid").encoding,
            Dtype::F32
        );
        let text = SITE_TOML.replace(
            "round_timeout_secs = 30",
            "round_timeout_secs = 30\nencoding = \"bf16\"",
        );
        assert_eq!(
            StudyConfig::from_toml(&text).expect("valid").encoding,
            Dtype::Bf16
        );
        let text = SITE_TOML.replace(
            "round_timeout_secs = 30",
            "round_timeout_secs = 30\nencoding = \"int8\"",
        );
        assert!(matches!(
            StudyConfig::from_toml(&text),
            Err(ConfigError::Field {
                field: "study.encoding",
                ..
            })
        ));
    }

    #[test]
    fn model_size_is_bounded_by_the_value_limit_not_a_layer_width() {
        let mlp = |hidden: &str| {
            SITE_TOML.replace(
                "model = { kind = \"logistic_regression\" }",
                &format!("model = {{ kind = \"mlp\", hidden = {hidden} }}"),
            )
        };
        // 600M parameters over two features: hidden * (2 + 2) + 1 values.
        let c = StudyConfig::from_toml(&mlp("150000000")).expect("a 600M model is valid");
        assert_eq!(c.model, Architecture::mlp(150_000_000));
        // Just over 2^31 values, and the widest TOML integer (its value count overflows u64).
        for hidden in ["536870912", "9223372036854775807"] {
            match StudyConfig::from_toml(&mlp(hidden)) {
                Err(ConfigError::Field { field, reason }) => {
                    assert_eq!(field, "study.model");
                    assert!(reason.contains(&format!("MLP [{hidden}]")), "{reason}");
                    assert!(reason.contains("2147483648 parameters"), "{reason}");
                }
                other => panic!("hidden = {hidden}: expected a study.model error, got {other:?}"),
            }
        }
        assert!(matches!(
            StudyConfig::from_toml(&mlp("0")),
            Err(ConfigError::Field {
                field: "study.model.hidden",
                ..
            })
        ));
    }

    #[test]
    fn target_epsilon_calibrates_noise_for_the_planned_rounds() {
        let text = SITE_TOML.replace("noise_multiplier = 1.0", "target_epsilon = 4.0");
        let c = StudyConfig::from_toml(&text).expect("valid");
        let cost = c.privacy.round_cost(&c.local, None).expect("cost");
        let events = vec![cost; 10];
        let eps = accountant::epsilon(c.privacy.accountant, &events, c.privacy.delta).expect("eps");
        assert!(eps <= 4.0 && eps > 3.9, "{eps}");
    }

    #[test]
    fn deeper_models_multiclass_tasks_patterns_and_default_ranges() {
        let text = SITE_TOML
            .replace(
                "model = { kind = \"logistic_regression\" }",
                "model = { kind = \"mlp\", hidden = [16, 8], activation = \"relu\" }",
            )
            .replace(
                "task = \"binary\"",
                "task = \"multiclass\"\nlabels = [\"class_0\", \"class_1\", \"class_2\"]",
            )
            .replace(
                "features = [\"a\", \"b\"]",
                "features = [\"px0..px11\", \"b\"]",
            )
            .replace(
                "ranges = { a = [0.0, 10.0], b = [-1.0, 1.0] }",
                "ranges = { b = [-1.0, 1.0] }\ndefault_range = [0.0, 16.0]",
            );
        let c = StudyConfig::from_toml(&text).expect("valid");
        assert_eq!(c.data.features.len(), 13);
        assert_eq!(c.data.features[11], "px11");
        assert_eq!(c.data.ranges[3], [0.0, 16.0]);
        assert_eq!(c.data.ranges[12], [-1.0, 1.0]);
        assert_eq!(c.n_outputs(), 3);
        assert_eq!(c.data.class_labels.len(), 3);
        assert_eq!(
            c.model,
            Architecture::Mlp {
                hidden: vec![16, 8],
                activation: crate::arch::Activation::Relu
            }
        );
        // Zero-padded patterns keep their width; bad patterns are refused by field.
        assert_eq!(
            expand_features(&["px08..px11".into()]).expect("expands"),
            ["px08", "px09", "px10", "px11"]
        );
        for bad in ["px3..px1", "px1..qx3", "px..px3"] {
            assert!(expand_features(&[bad.into()]).is_err(), "{bad}");
        }
        let ids = text.replace(
            "labels = [\"class_0\", \"class_1\", \"class_2\"]",
            "classes = 10",
        );
        assert_eq!(StudyConfig::from_toml(&ids).expect("valid").n_outputs(), 10);
        let neither = text.replace("labels = [\"class_0\", \"class_1\", \"class_2\"]", "");
        assert!(matches!(
            StudyConfig::from_toml(&neither),
            Err(ConfigError::Field {
                field: "data.classes",
                ..
            })
        ));
    }

    #[test]
    fn a_layer_list_is_checked_layer_by_layer_and_batch_norm_is_refused_with_the_reason() {
        let with = |layers: &str| {
            SITE_TOML.replace(
                "model = { kind = \"logistic_regression\" }",
                &format!("model = {{ kind = \"layers\", layers = [{layers}] }}"),
            )
        };
        let ok = with("{ type = \"conv1d\", channels = 4, kernel = 2 }, { type = \"relu\" }, { type = \"flatten\" }, { type = \"dense\", units = 1 }");
        let c = StudyConfig::from_toml(&ok).expect("valid");
        assert!(matches!(c.model, Architecture::Layers(ref l) if l.len() == 4));
        let bn = with("{ type = \"batch_norm\" }, { type = \"dense\", units = 1 }");
        match StudyConfig::from_toml(&bn) {
            Err(ConfigError::Layer(m)) => {
                assert!(
                    m.contains("layer 0 (batch_norm)") && m.contains("per-example"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
        let bad = with("{ type = \"dense\", units = 4 }, { type = \"dense\", units = 2 }");
        match StudyConfig::from_toml(&bad) {
            Err(ConfigError::Layer(m)) => assert!(m.contains("layer 1 (dense)"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
