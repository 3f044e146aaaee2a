//! The demo federation, shared by `examples/hospitals.rs`, `examples/accuracy.rs` and the
//! end-to-end tests: a throw-away PKI, a bundled data set (breast cancer or diabetes) split
//! across three hospitals (uneven and non-IID, or even and IID), one coordinator and three
//! site daemons on loopback QUIC with mutual TLS, a study run to its budget or its planned
//! rounds, and a held-out test set (or, for hyperparameter selection, a validation set
//! carved out of the training part) to score every model version.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedpriv_client::config::SiteConfig;
use fedpriv_client::data::{self, ColumnSelection, Dataset, FeatureRange, LoadOptions};
use fedpriv_client::train::{self, LocalTraining};
use fedpriv_common::arch;
use fedpriv_common::config::StudyConfig;
use fedpriv_common::dp::accountant::{self, AccountantKind};
use fedpriv_common::dp::{Delta, Epsilon, SampleRate, SgmEvent};
use fedpriv_common::model::{Architecture, FlatModel};
use fedpriv_common::pki::{self, Identity, Role};
use fedpriv_coordinator::server::{self, Notification, Options};
use tokio::sync::{mpsc, watch};

/// The hospitals of the demo.
pub const SITES: [&str; 3] = ["st-marys", "general", "childrens"];

/// Where the bundled data lives (relative to the workspace root).
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join("data")
}

/// Which bundled data set the demo federation trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoData {
    /// Breast Cancer Wisconsin (binary, 30 features): logistic regression, scored by accuracy.
    BreastCancer,
    /// Diabetes progression (regression, 10 features): linear regression, scored by RMSE in
    /// the label's own units.
    Diabetes,
}

impl DemoData {
    fn csv(self) -> &'static str {
        match self {
            Self::BreastCancer => "breast_cancer_wisconsin.csv",
            Self::Diabetes => "diabetes_progression.csv",
        }
    }

    fn ranges(self) -> &'static str {
        match self {
            Self::BreastCancer => "breast_cancer_ranges.toml",
            Self::Diabetes => "diabetes_ranges.toml",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::BreastCancer => "malignant",
            Self::Diabetes => "progression",
        }
    }

    /// The study id the demo uses for this data set.
    pub fn study_id(self) -> &'static str {
        match self {
            Self::BreastCancer => "breast-cancer-demo",
            Self::Diabetes => "diabetes-demo",
        }
    }

    /// The linear model that goes with the data set's task.
    pub fn model(self) -> Architecture {
        match self {
            Self::BreastCancer => Architecture::LogisticRegression,
            Self::Diabetes => Architecture::LinearRegression,
        }
    }

    fn regression(self) -> bool {
        self == Self::Diabetes
    }
}

/// Local training of the record unit: DP-SGD with Poisson batches at every site.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordTraining {
    /// DP-SGD steps per site per round.
    pub local_steps: u64,
    /// Expected Poisson batch size B (each record is in a batch with probability B / n_site).
    pub expected_batch: f64,
    pub learning_rate: f32,
    /// Per-example gradient clip norm C.
    pub clip_norm: f64,
    pub server_learning_rate: f32,
}

impl Default for RecordTraining {
    /// The record unit's plan on the breast-cancer data that the README recommends below
    /// epsilon 2 (plan A; [`large_budget_record`] from 2 on), chosen on a validation split
    /// carved out of the training data (see docs/accuracy.md), never on test results: a
    /// small clip norm with a large learning rate, large Poisson batches, ten steps per round.
    fn default() -> Self {
        Self {
            local_steps: 10,
            expected_batch: 64.0,
            learning_rate: 5.0,
            clip_norm: 0.1,
            server_learning_rate: 1.0,
        }
    }
}

/// Local training of the site unit: plain minibatch SGD, then the delta is clipped and noised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SiteTraining {
    pub local_epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f32,
    /// Clip norm C of each site's model delta.
    pub clip_norm: f64,
    pub server_learning_rate: f32,
}

impl Default for SiteTraining {
    /// The site unit's recommended local training (with 3 planned rounds, see
    /// [`recommended_site`]), chosen on validation data like the record unit's.
    fn default() -> Self {
        Self {
            local_epochs: 2,
            batch_size: 16,
            learning_rate: 0.5,
            clip_norm: 1.0,
            server_learning_rate: 1.0,
        }
    }
}

/// The ten "worst" (largest of each image's cells) measurements of the breast-cancer data: a
/// feature set fixed before any experiment (one of the data set's three published groups of
/// ten), for studies that want fewer noised dimensions than all thirty.
pub const WORST_FEATURES: [&str; 10] = [
    "worst_radius",
    "worst_texture",
    "worst_perimeter",
    "worst_area",
    "worst_smoothness",
    "worst_compactness",
    "worst_concavity",
    "worst_concave_points",
    "worst_symmetry",
    "worst_fractal_dimension",
];

/// The ten "mean" measurements of the breast-cancer data (another published group of ten).
pub const MEAN_FEATURES: [&str; 10] = [
    "mean_radius",
    "mean_texture",
    "mean_perimeter",
    "mean_area",
    "mean_smoothness",
    "mean_compactness",
    "mean_concavity",
    "mean_concave_points",
    "mean_symmetry",
    "mean_fractal_dimension",
];

/// The feature columns the README recommends for each bundled data set (`None`: all),
/// chosen with the other hyperparameters on validation data.
pub fn recommended_features(data: DemoData) -> Option<Vec<String>> {
    match data {
        DemoData::BreastCancer => Some(WORST_FEATURES.iter().map(|f| f.to_string()).collect()),
        DemoData::Diabetes => None,
    }
}

/// A record-unit plan: planned rounds and local training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordPlan {
    pub rounds: u64,
    pub training: RecordTraining,
}

impl RecordPlan {
    /// A short label for tables.
    pub fn label(&self) -> String {
        let t = &self.training;
        format!(
            "R={} L={} B={} lr={} C={}",
            self.rounds, t.local_steps, t.expected_batch, t.learning_rate, t.clip_norm
        )
    }
}

/// A site-unit plan: planned rounds and local training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SitePlan {
    pub rounds: u64,
    pub training: SiteTraining,
}

impl SitePlan {
    /// A short label for tables.
    pub fn label(&self) -> String {
        let t = &self.training;
        format!(
            "R={} epochs={} batch={} lr={} C={}",
            self.rounds, t.local_epochs, t.batch_size, t.learning_rate, t.clip_norm
        )
    }
}

/// From this budget on (epsilon >= this), the breast-cancer record unit uses
/// [`large_budget_record`] instead of the small-budget plan; chosen on validation data by
/// the second selection in docs/accuracy.md.
pub const LARGE_BUDGET_FROM_EPSILON: f64 = 2.0;

/// The breast-cancer record unit's plan for budgets of epsilon 2 and more (plan B of
/// docs/accuracy.md): a larger clip norm than the small-budget plan, so that fewer examples'
/// gradients are clipped and DP-SGD heads for the logistic loss's own optimum once the noise
/// is small enough to allow it; at smaller budgets the small clip's lower noise wins.
pub fn large_budget_record() -> RecordPlan {
    RecordPlan {
        rounds: 20,
        training: RecordTraining {
            local_steps: 10,
            expected_batch: 48.0,
            learning_rate: 3.0,
            clip_norm: 0.5,
            server_learning_rate: 1.0,
        },
    }
}

/// The record-unit plan the README recommends for each bundled data set at budget
/// `epsilon`, chosen on a validation split of the training data (docs/accuracy.md says
/// how); the noise multiplier is then calibrated so that these rounds fit the budget.
pub fn recommended_record(data: DemoData, epsilon: f64) -> RecordPlan {
    match data {
        DemoData::BreastCancer if epsilon >= LARGE_BUDGET_FROM_EPSILON => large_budget_record(),
        DemoData::BreastCancer => RecordPlan {
            rounds: 20,
            training: RecordTraining::default(),
        },
        DemoData::Diabetes => RecordPlan {
            rounds: 20,
            training: RecordTraining {
                local_steps: 5,
                expected_batch: 64.0,
                learning_rate: 1.0,
                clip_norm: 0.1,
                server_learning_rate: 1.0,
            },
        },
    }
}

/// The site-unit plan (local noise) chosen the same way.
pub fn recommended_site(data: DemoData) -> SitePlan {
    match data {
        DemoData::BreastCancer | DemoData::Diabetes => SitePlan {
            rounds: 3,
            training: SiteTraining::default(),
        },
    }
}

/// How the study's noise multiplier is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NoisePlan {
    /// This noise multiplier; the study runs until its budget or its rounds run out.
    Fixed(f64),
    /// The smallest noise multiplier with which all planned rounds fit the budget: for the
    /// record unit, at the sampling rate of the smallest site (the largest q = B / n_site);
    /// for the site unit, through the study's `target_epsilon`.
    Calibrated,
    /// The study gives `target_epsilon` and the coordinator chooses sigma from the sites'
    /// declared sizes (the smallest decides) before any round.
    ByCoordinator,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// `record` (DP-SGD at each site, the default) or `site` (DP-FedAvg, local noise).
    pub unit: String,
    pub epsilon: f64,
    pub delta: f64,
    /// Planned rounds (the budget may end the study first).
    pub rounds: u64,
    /// Seed of the train/test split (and, unless `shard_seed` is set, of everything else).
    pub seed: u64,
    /// Seed of the assignment of training records to sites and of the validation carve-out;
    /// `None`: `seed`. Repeating a run with other shard seeds keeps the test set fixed.
    pub shard_seed: Option<u64>,
    /// Uneven, label-skewed split (true) or an even IID one.
    pub non_iid: bool,
    /// A site's own cap, applied to every site.
    pub site_cap: f64,
    pub data: DemoData,
    /// Feature columns to use; `None`: every feature with a declared range.
    pub features: Option<Vec<String>>,
    /// Hyperparameter selection: carve this fraction out of the training part as a
    /// validation set, train on the rest and score on it. The test set is then never used.
    pub validation: Option<f64>,
    pub record: RecordTraining,
    pub site: SiteTraining,
    pub noise: NoisePlan,
    /// Fewest sites a round needs.
    pub min_sites: usize,
    /// How the model and the updates travel (the study's `encoding`).
    pub encoding: fedpriv_common::wire::Dtype,
    /// DP evaluation (record unit): every k rounds, noise multiplier, loss clip; each site
    /// holds out 20% of its records for it.
    pub evaluation: Option<(u64, f64, f64)>,
}

impl Default for DemoOptions {
    /// The hospitals demo's own plan, as before the recommended plans existed: all 30
    /// features, a fixed noise multiplier of 2.5 with 5 DP-SGD steps of expected batch 16
    /// per round (learning rate 1, clip norm 1), run until the budget of epsilon 2 or 40
    /// rounds run out. [`DemoOptions::recommended`] gives the README's recommended plan.
    fn default() -> Self {
        Self {
            unit: "record".into(),
            epsilon: 2.0,
            delta: 1e-5,
            rounds: 40,
            seed: 42,
            shard_seed: None,
            non_iid: true,
            site_cap: 10.0,
            data: DemoData::BreastCancer,
            features: None,
            validation: None,
            record: RecordTraining {
                local_steps: 5,
                expected_batch: 16.0,
                learning_rate: 1.0,
                clip_norm: 1.0,
                server_learning_rate: 1.0,
            },
            site: SiteTraining::default(),
            noise: NoisePlan::Fixed(2.5),
            min_sites: 2,
            encoding: fedpriv_common::wire::Dtype::F32,
            evaluation: None,
        }
    }
}

impl DemoOptions {
    /// The recommended plan for `data` and `unit` (`record` or `site`) at budget `epsilon`:
    /// the recommended features, rounds and local training for that budget (chosen on
    /// validation data, see docs/accuracy.md), the noise multiplier calibrated so that every planned round fits
    /// the budget at every site, and all three sites in every round.
    pub fn recommended(data: DemoData, unit: &str, epsilon: f64) -> Self {
        let record = recommended_record(data, epsilon);
        let site = recommended_site(data);
        Self {
            unit: unit.into(),
            epsilon,
            rounds: if unit == "site" {
                site.rounds
            } else {
                record.rounds
            },
            data,
            features: recommended_features(data),
            record: record.training,
            site: site.training,
            noise: NoisePlan::Calibrated,
            // Every planned round fits every site's budget, so each round waits for all three.
            min_sites: SITES.len(),
            site_cap: epsilon.max(10.0),
            ..Self::default()
        }
    }
}

/// One completed round as the demo saw it.
#[derive(Debug, Clone)]
pub struct RoundReport {
    pub round: u64,
    pub sites: Vec<String>,
    pub loss: f64,
    /// Share of correct predictions (classification; NaN for regression).
    pub accuracy: f64,
    /// Root mean squared error in the label's own units (regression only).
    pub rmse: Option<f64>,
    pub epsilon: f64,
    pub budget: f64,
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub rounds: Vec<RoundReport>,
    pub end_reason: String,
    pub final_accuracy: f64,
    /// Regression only: the last model's RMSE in the label's units.
    pub final_rmse: Option<f64>,
    /// The noise multiplier the study ran with.
    pub noise_multiplier: f64,
    pub state_dir: PathBuf,
    pub site_state_dirs: Vec<PathBuf>,
    pub study_id: String,
}

type DemoResult<T> = Result<T, String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// A bundled data set (unscaled), the chosen feature names, their public ranges and
/// (regression) the label's public range.
pub type Loaded = (Dataset, Vec<String>, Vec<[f32; 2]>, Option<[f32; 2]>);

/// Loads a bundled data set (see [`Loaded`]).
pub fn load(which: DemoData, features: Option<&[String]>) -> DemoResult<Loaded> {
    let ranges = data::load_ranges(data_dir().join(which.ranges())).map_err(s)?;
    let features: Vec<String> = match features {
        Some(f) => f.to_vec(),
        None => ranges.features.keys().cloned().collect(),
    };
    let sel = ColumnSelection {
        features: features.clone(),
        label: which.label().into(),
    };
    let options = if which.regression() {
        LoadOptions::regression()
    } else {
        LoadOptions::binary()
    };
    let ds = data::load_csv(data_dir().join(which.csv()), &sel, &options).map_err(s)?;
    let fr = ranges.for_features(&features).map_err(s)?;
    let bounds = fr.iter().map(|r| [r.lo(), r.hi()]).collect();
    let label = if which.regression() {
        let r = ranges.for_label(which.label()).map_err(s)?;
        Some([r.lo(), r.hi()])
    } else {
        None
    };
    Ok((ds, features, bounds, label))
}

/// The bundled breast-cancer data: every feature, scaled by its public range.
pub fn breast_cancer() -> DemoResult<(Dataset, Vec<String>, Vec<[f32; 2]>)> {
    let (ds, features, bounds, _) = load(DemoData::BreastCancer, None)?;
    Ok((ds, features, bounds))
}

fn range(b: [f32; 2]) -> DemoResult<FeatureRange> {
    FeatureRange::new(f64::from(b[0]), f64::from(b[1])).map_err(s)
}

/// Scales a dataset by the declared ranges, as every site does.
pub fn scaled(mut ds: Dataset, bounds: &[[f32; 2]]) -> DemoResult<Dataset> {
    let fr = bounds
        .iter()
        .map(|b| range(*b))
        .collect::<Result<Vec<_>, _>>()?;
    data::scale_features(&mut ds, &fr).map_err(s)?;
    Ok(ds)
}

/// Scales features and (regression) the label by their declared ranges, as every site does.
pub fn scaled_with_label(
    ds: Dataset,
    bounds: &[[f32; 2]],
    label: Option<[f32; 2]>,
) -> DemoResult<Dataset> {
    let mut ds = scaled(ds, bounds)?;
    if let Some(l) = label {
        data::scale_label(&mut ds, &range(l)?).map_err(s)?;
    }
    Ok(ds)
}

/// The train shards (one per site, unscaled, as CSV files would hold them), the scaled
/// evaluation set (the held-out test set, or the validation set when the options ask for
/// one), and the feature names with their public ranges.
#[derive(Debug, Clone)]
pub struct Split {
    pub shards: Vec<Dataset>,
    pub test: Dataset,
    pub features: Vec<String>,
    pub bounds: Vec<[f32; 2]>,
    /// Regression: the label's public range (the evaluation set's labels are scaled by it).
    pub label_range: Option<[f32; 2]>,
}

impl Split {
    /// Multiply an error on the scaled label by this to get it in the label's units.
    pub fn label_scale(&self) -> DemoResult<f64> {
        match self.label_range {
            Some(l) => Ok(range(l)?.half_width()),
            None => Ok(1.0),
        }
    }

    /// The shards scaled as the sites scale them.
    pub fn scaled_shards(&self) -> DemoResult<Vec<Dataset>> {
        self.shards
            .iter()
            .map(|d| scaled_with_label(d.clone(), &self.bounds, self.label_range))
            .collect()
    }
}

/// Splits the bundled data as `opts` says: 20% test with `seed`; with `validation`, a part
/// of the rest as validation set; the rest over the sites with the shard seed.
pub fn split(opts: &DemoOptions) -> DemoResult<Split> {
    let (ds, features, bounds, label_range) = load(opts.data, opts.features.as_deref())?;
    let (train, test) = data::train_test_split(&ds, 0.2, opts.seed).map_err(s)?;
    let shard_seed = opts.shard_seed.unwrap_or(opts.seed);
    let (train, eval) = match opts.validation {
        Some(f) => data::train_test_split(&train, f, shard_seed ^ 0x005E_ED0F_7A11).map_err(s)?,
        None => (train, test),
    };
    let shards = if opts.non_iid {
        data::split_non_iid(&train, &[0.5, 0.3, 0.2], 0.6, shard_seed).map_err(s)?
    } else {
        data::split_iid(&train, SITES.len(), shard_seed).map_err(s)?
    };
    Ok(Split {
        shards,
        test: scaled_with_label(eval, &bounds, label_range)?,
        features,
        bounds,
        label_range,
    })
}

/// The noise multiplier of the study `opts` describes over these shards.
///
/// With [`NoisePlan::Calibrated`] and the record unit: the smallest sigma with which
/// `rounds * local_steps` DP-SGD steps at the largest sampling rate of any site (the
/// smallest site's) stay within the budget, checked with the study's own accountant on the
/// events the ledger will hold. `None` for the site unit, whose config calibrates itself.
pub fn noise_multiplier(opts: &DemoOptions, shards: &[Dataset]) -> DemoResult<Option<f64>> {
    if opts.evaluation.is_some() && !matches!(opts.noise, NoisePlan::Fixed(_)) {
        // A calibration covers the training's steps only; evaluations spend budget too.
        return Err(
            "DP evaluation needs a fixed noise multiplier (calibration covers training only)"
                .into(),
        );
    }
    match (opts.noise, opts.unit.as_str()) {
        (NoisePlan::Fixed(sigma), _) => Ok(Some(sigma)),
        (NoisePlan::Calibrated, "site") | (NoisePlan::ByCoordinator, _) => Ok(None),
        (NoisePlan::Calibrated, _) => {
            let smallest = shards.iter().map(|d| d.n).min().unwrap_or(0);
            if smallest == 0 {
                return Err("a site has no records".into());
            }
            if (smallest as f64) < opts.record.expected_batch {
                return Err(format!(
                    "the smallest site has {smallest} records, fewer than the expected batch {}",
                    opts.record.expected_batch
                ));
            }
            let q = opts.record.expected_batch / smallest as f64;
            let sigma = calibrate_record_noise(
                q,
                opts.record.local_steps,
                opts.rounds,
                opts.epsilon,
                opts.delta,
            )?;
            Ok(Some(sigma))
        }
    }
}

/// The smallest noise multiplier (to 0.1%) with which `rounds` rounds of `local_steps`
/// DP-SGD steps at rate `q` spend at most `epsilon` at `delta` under the PLD accountant.
pub fn calibrate_record_noise(
    q: f64,
    local_steps: u64,
    rounds: u64,
    epsilon: f64,
    delta: f64,
) -> DemoResult<f64> {
    let kind = AccountantKind::Pld;
    let q = SampleRate::new(q).map_err(s)?;
    let eps = Epsilon::new(epsilon).map_err(s)?;
    let delta = Delta::new(delta).map_err(s)?;
    let steps = rounds.saturating_mul(local_steps);
    let mut sigma = accountant::calibrate_noise(kind, q, steps, eps, delta)
        .map_err(s)?
        .get();
    // The ledger composes one event per round; make sure that is what fits, rounding up.
    for _ in 0..50 {
        let ev = SgmEvent::new(q.get(), sigma, local_steps).map_err(s)?;
        let events = vec![ev; rounds as usize];
        match accountant::epsilon(kind, &events, delta) {
            Ok(e) if e <= epsilon => return Ok(sigma),
            Ok(_) | Err(accountant::AccountError::Unbounded) => sigma *= 1.001,
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!(
        "no noise multiplier near {sigma} fits {rounds} rounds in epsilon {epsilon}"
    ))
}

/// The study's TOML for these options, feature set and noise multiplier (`None`: the
/// site unit's `target_epsilon` calibration).
pub fn study_toml(opts: &DemoOptions, split: &Split, sigma: Option<f64>) -> String {
    let ranges: Vec<String> = split
        .features
        .iter()
        .zip(&split.bounds)
        .map(|(f, b)| format!("{f} = [{:?}, {:?}]", b[0], b[1]))
        .collect();
    let enrolled: Vec<String> = SITES.iter().map(|s| format!("{s:?}")).collect();
    let (training, privacy) = match opts.unit.as_str() {
        "site" => {
            let t = &opts.site;
            (
                format!(
                    "strategy = \"fedavg\"\nlocal_epochs = {}\nbatch_size = {}\nlearning_rate = {:?}\nserver_learning_rate = {:?}",
                    t.local_epochs, t.batch_size, t.learning_rate, t.server_learning_rate
                ),
                format!(
                    "unit = \"site\"\nplacement = \"local\"\nsite_sample_rate = 1.0\nclip_norm = {:?}",
                    t.clip_norm
                ),
            )
        }
        _ => {
            let t = &opts.record;
            (
                format!(
                    "strategy = \"fedavg\"\nlocal_steps = {}\nexpected_batch = {:?}\nlearning_rate = {:?}\nserver_learning_rate = {:?}",
                    t.local_steps, t.expected_batch, t.learning_rate, t.server_learning_rate
                ),
                format!("unit = \"record\"\nclip_norm = {:?}", t.clip_norm),
            )
        }
    };
    let noise = match sigma {
        Some(sigma) => format!("noise_multiplier = {sigma:?}"),
        None => format!("target_epsilon = {:?}", opts.epsilon),
    };
    let (model, task, label_range) = match split.label_range {
        Some(l) => (
            "linear_regression",
            "regression",
            format!("label_range = [{:?}, {:?}]\n", l[0], l[1]),
        ),
        None => ("logistic_regression", "binary", String::new()),
    };
    format!(
        "[study]\nid = \"{}\"\nmodel = {{ kind = \"{model}\" }}\nrounds = {}\nmin_sites = {}\nround_timeout_secs = 60\nencoding = \"{}\"\n\n\
         [data]\ntask = \"{task}\"\nlabel = \"{}\"\nfeatures = [{}]\nranges = {{ {} }}\n{label_range}\n\
         [training]\n{training}\n\n[privacy]\n{privacy}\n{noise}\nepsilon = {:?}\ndelta = {:?}\naccountant = \"pld\"\n\n[sites]\nenrolled = [{}]\n{}",
        opts.data.study_id(),
        opts.rounds,
        opts.min_sites,
        opts.encoding.as_str(),
        opts.data.label(),
        split
            .features
            .iter()
            .map(|f| format!("{f:?}"))
            .collect::<Vec<_>>()
            .join(", "),
        ranges.join(", "),
        opts.epsilon,
        opts.delta,
        enrolled.join(", "),
        opts.evaluation
            .map(|(every, z, l)| format!(
                "\n[evaluation]\nevery = {every}\nnoise_multiplier = {z:?}\nloss_clip = {l:?}\n"
            ))
            .unwrap_or_default()
    )
}

fn write(path: &Path, bytes: &[u8]) -> DemoResult<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(s)?;
    }
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// A free UDP port on loopback (the coordinator binds it right after).
pub fn free_port() -> DemoResult<u16> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(s)?;
    Ok(sock.local_addr().map_err(s)?.port())
}

/// A throw-away study PKI for a federation on loopback: the coordinator's TLS config (its
/// certificate for `localhost` and `addr`'s IP), and for each site `root/<name>/` holding
/// `ca.pem`, `site.pem` and `site.key`. Valid for two days.
pub fn loopback_pki(
    root: &Path,
    sites: &[&str],
    addr: SocketAddr,
    ca_name: &str,
) -> DemoResult<rustls::ServerConfig> {
    let ca = pki::generate_ca(ca_name, 2).map_err(s)?;
    let server_cert =
        pki::issue_server_cert(&ca, &["localhost".to_string()], &[addr.ip()], 2).map_err(s)?;
    let tls = pki::server_config(
        ca.cert_pem.as_bytes(),
        server_cert.cert_pem.as_bytes(),
        server_cert.key_pem.as_bytes(),
        &[],
    )
    .map_err(s)?;
    for name in sites {
        let dir = root.join(name);
        let cert = pki::issue_identity_cert(&ca, &Identity::new(Role::Site, *name).map_err(s)?, 2)
            .map_err(s)?;
        write(&dir.join("ca.pem"), ca.cert_pem.as_bytes())?;
        write(&dir.join("site.pem"), cert.cert_pem.as_bytes())?;
        write(&dir.join("site.key"), cert.key_pem.as_bytes())?;
    }
    Ok(tls)
}

/// Creates the PKI, the site folders and configs; returns the server TLS config and the
/// site configs.
fn setup(
    root: &Path,
    opts: &DemoOptions,
    study: &StudyConfig,
    shards: &[Dataset],
    addr: SocketAddr,
) -> DemoResult<(rustls::ServerConfig, Vec<SiteConfig>)> {
    let names: Vec<&str> = SITES.iter().take(shards.len()).copied().collect();
    let tls = loopback_pki(root, &names, addr, "fedpriv demo CA")?;
    let mut sites = Vec::new();
    for (name, shard) in SITES.iter().zip(shards) {
        let dir = root.join(name);
        data::write_csv(shard, dir.join("patients.csv")).map_err(s)?;
        // Each hospital pins exactly the study's terms, declares its true record count (the
        // demo plays its operator, who knows it) and caps its one data source well above
        // the study's own cap: the source's filter is looser than the study's accountant.
        let toml = fedpriv_client::config::SiteSetup {
            name,
            coordinator: addr,
            ca: Path::new("ca.pem"),
            cert: Path::new("site.pem"),
            key: Path::new("site.key"),
            data: Path::new("patients.csv"),
            records: shard.n as u64,
            source_delta: study.privacy.delta.get(),
            source_cap: 3.0 * opts.site_cap,
        }
        .toml(&[(study, opts.site_cap)]);
        write(&dir.join("site.toml"), toml.as_bytes())?;
        sites.push(SiteConfig::load(&dir.join("site.toml")).map_err(s)?);
    }
    Ok((tls, sites))
}

/// A running coordinator started by [`Federation::start_coordinator`].
#[derive(Debug)]
pub struct CoordinatorHandle {
    stop: watch::Sender<bool>,
    pub notes: mpsc::UnboundedReceiver<Notification>,
    join: tokio::task::JoinHandle<Result<(), server::ServerError>>,
}

impl CoordinatorHandle {
    /// Asks the coordinator to stop and waits for it.
    pub async fn stop(self) -> DemoResult<()> {
        let _ = self.stop.send(true);
        self.join.await.map_err(s)?.map_err(s)
    }
}

/// The demo's pieces: PKI, site folders and configs, the study, the test set.
#[derive(Debug)]
pub struct Federation {
    pub addr: SocketAddr,
    tls: rustls::ServerConfig,
    study: (StudyConfig, String),
    pub arch: Architecture,
    pub spec: fedpriv_common::model::ModelSpec,
    /// The scaled evaluation set (the test set, or the validation set).
    pub test: Dataset,
    /// Multiply an RMSE on the scaled label by this for the label's units (1 when binary).
    pub label_scale: f64,
    pub regression: bool,
    /// The study's noise multiplier.
    pub noise_multiplier: f64,
    pub state_dir: PathBuf,
    /// The coordinator's at-rest key (a throw-away 0600 file under the demo's root).
    pub at_rest_key_file: PathBuf,
    at_rest_key: std::sync::Arc<fedpriv_common::seal::SealKey>,
    sites: Vec<SiteConfig>,
    site_stop: watch::Sender<bool>,
    daemons: Vec<tokio::task::JoinHandle<Result<(), fedpriv_client::daemon::DaemonError>>>,
}

impl Federation {
    /// The sites' configs (as their daemons load them).
    pub fn site_configs(&self) -> &[SiteConfig] {
        &self.sites
    }

    /// Writes the PKI, the site shards and configs under `root`; starts nothing.
    pub fn prepare(root: &Path, opts: &DemoOptions) -> DemoResult<Self> {
        let split = split(opts)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let sigma = noise_multiplier(opts, &split.shards)?;
        let toml = study_toml(opts, &split, sigma);
        let cfg = StudyConfig::from_toml(&toml).map_err(|e| format!("demo study config: {e}"))?;
        let (tls, sites) = setup(root, opts, &cfg, &split.shards, addr)?;
        let arch_kind = cfg.model.clone();
        let spec = arch::model_spec(&arch_kind, split.features.len(), 1).map_err(s)?;
        let label_scale = split.label_scale()?;
        let noise_multiplier = cfg.privacy.noise_multiplier.get();
        let (site_stop, _) = watch::channel(false);
        let at_rest_key_file = root.join("at-rest.key");
        if !at_rest_key_file.exists() {
            fedpriv_coordinator::at_rest::write_new_key_file(&at_rest_key_file).map_err(s)?;
        }
        let at_rest_key =
            fedpriv_coordinator::at_rest::load_key_from(Some(&at_rest_key_file), None)
                .map_err(s)?;
        Ok(Self {
            addr,
            tls,
            study: (cfg, toml),
            arch: arch_kind,
            spec,
            test: split.test,
            label_scale,
            regression: opts.data.regression(),
            noise_multiplier,
            state_dir: root.join("coordinator"),
            at_rest_key_file,
            at_rest_key: std::sync::Arc::new(at_rest_key),
            sites,
            site_stop,
            daemons: Vec::new(),
        })
    }

    pub fn study_id(&self) -> &str {
        &self.study.0.id
    }

    pub fn site_state_dirs(&self) -> Vec<PathBuf> {
        self.sites.iter().map(|c| c.state_dir.clone()).collect()
    }

    /// Starts the three site daemons (they dial the coordinator, retrying until it is up).
    pub fn start_sites(&mut self) {
        for c in &self.sites {
            self.daemons.push(tokio::spawn(fedpriv_client::daemon::run(
                c.clone(),
                self.site_stop.subscribe(),
            )));
        }
    }

    /// Stops the site daemons and waits for them.
    pub async fn stop_sites(&mut self) -> DemoResult<()> {
        let _ = self.site_stop.send(true);
        for d in self.daemons.drain(..) {
            d.await.map_err(s)?.map_err(s)?;
        }
        Ok(())
    }

    /// Starts (or restarts, over the same state directory) the coordinator.
    pub fn start_coordinator(&self) -> CoordinatorHandle {
        let (stop, stop_rx) = watch::channel(false);
        let (note_tx, notes) = mpsc::unbounded_channel();
        let opts = Options {
            listen: self.addr,
            state_dir: self.state_dir.clone(),
            tls: self.tls.clone(),
            studies: vec![self.study.clone()],
            max_concurrent_uploads: 2,
            at_rest_key: std::sync::Arc::clone(&self.at_rest_key),
        };
        let join = tokio::spawn(server::run(opts, stop_rx, Some(note_tx), false));
        CoordinatorHandle { stop, notes, join }
    }

    /// Loss and accuracy of a model version on the held-out test set (accuracy is NaN for
    /// regression; see [`score`](Self::score)).
    pub fn evaluate(&self, model: &[f32]) -> DemoResult<(f64, f64)> {
        let sc = self.score(model)?;
        Ok((sc.loss, sc.accuracy.unwrap_or(f64::NAN)))
    }

    /// Loss, accuracy (classification) and RMSE in the label's units (regression) of a model
    /// version on the evaluation set.
    pub fn score(&self, model: &[f32]) -> DemoResult<Score> {
        let m = FlatModel::new(self.spec.clone(), model.to_vec()).map_err(s)?;
        score_model(
            &m,
            &self.arch,
            &self.test,
            self.label_scale,
            self.regression,
        )
    }

    /// Follows the coordinator's notifications until the study ends.
    pub async fn follow(
        &self,
        coord: &mut CoordinatorHandle,
        rounds: &mut Vec<RoundReport>,
        mut on_round: impl FnMut(&RoundReport),
    ) -> DemoResult<String> {
        loop {
            let note = tokio::time::timeout(Duration::from_secs(300), coord.notes.recv())
                .await
                .map_err(|_| "no progress for 5 minutes".to_string())?;
            match note {
                Some(Notification::RoundCompleted {
                    round,
                    model,
                    contributors,
                    epsilon,
                    budget,
                    ..
                }) => {
                    let sc = self.score(&model)?;
                    let r = RoundReport {
                        round,
                        sites: contributors,
                        loss: sc.loss,
                        accuracy: sc.accuracy.unwrap_or(f64::NAN),
                        rmse: sc.rmse,
                        epsilon,
                        budget,
                    };
                    on_round(&r);
                    rounds.push(r);
                }
                Some(Notification::RoundAborted { round, reason, .. }) => {
                    tracing::warn!(round, %reason, "round aborted")
                }
                Some(Notification::Evaluated {
                    model_round,
                    summary,
                    ..
                }) => {
                    let (metric, value) = summary.headline();
                    tracing::info!(
                        model_round,
                        metric,
                        value,
                        noise_sd = summary.noise_sd,
                        "DP evaluation"
                    )
                }
                Some(Notification::StudyEnded { reason, .. }) => return Ok(reason),
                None => return Err("the coordinator stopped unexpectedly".into()),
            }
        }
    }
}

/// Runs the demo federation in `root`; `on_round` sees every completed round as it happens.
pub async fn run(
    root: &Path,
    opts: &DemoOptions,
    on_round: impl FnMut(&RoundReport),
) -> DemoResult<DemoReport> {
    let mut fed = Federation::prepare(root, opts)?;
    let mut coord = fed.start_coordinator();
    fed.start_sites();
    let mut rounds = Vec::new();
    let end_reason = fed.follow(&mut coord, &mut rounds, on_round).await?;
    fed.stop_sites().await?;
    coord.stop().await?;
    let final_accuracy = rounds.last().map(|r| r.accuracy).unwrap_or(f64::NAN);
    let final_rmse = rounds.last().and_then(|r| r.rmse);
    // The sigma the study ran with, as stored (the coordinator may have calibrated it).
    let noise_multiplier =
        fedpriv_coordinator::store::Store::open_read_only(fed.state_dir.join("coordinator.db"))
            .ok()
            .and_then(|st| st.study(fed.study_id()).ok().flatten())
            .and_then(|row| StudyConfig::from_toml(&row.config_toml).ok())
            .map_or(fed.noise_multiplier, |c| c.privacy.noise_multiplier.get());
    Ok(DemoReport {
        rounds,
        end_reason,
        final_accuracy,
        final_rmse,
        noise_multiplier,
        state_dir: fed.state_dir.clone(),
        site_state_dirs: fed.site_state_dirs(),
        study_id: fed.study_id().to_string(),
    })
}

/// A model's quality on an evaluation set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub loss: f64,
    /// Classification only.
    pub accuracy: Option<f64>,
    /// Regression only, in the label's own units.
    pub rmse: Option<f64>,
}

/// The demo's learner: its tasks are binary or regression on a flat feature vector.
fn learner(arch: &Architecture, d: usize, regression: bool) -> DemoResult<train::Learner> {
    let task = if regression {
        fedpriv_common::config::Task::Regression
    } else {
        fedpriv_common::config::Task::Binary
    };
    train::Learner::flat(arch, d, task, 1).map_err(s)
}

fn score_model(
    m: &FlatModel,
    arch: &Architecture,
    data: &Dataset,
    label_scale: f64,
    regression: bool,
) -> DemoResult<Score> {
    let l = learner(arch, data.d, regression)?;
    let metrics = train::evaluate(&l, m, data).map_err(s)?;
    Ok(Score {
        loss: metrics.loss,
        accuracy: if regression { None } else { metrics.accuracy },
        rmse: if regression {
            metrics.rmse.map(|r| r * label_scale)
        } else {
            None
        },
    })
}

/// The same federation without privacy: FedAvg (equal weights, as the coordinator averages)
/// of plain local SGD with `local`, for `rounds` rounds over the same split, scored on the
/// same evaluation set.
pub fn non_private(opts: &DemoOptions, rounds: u64, local: &LocalTraining) -> DemoResult<Score> {
    let split = split(opts)?;
    let arch_kind = opts.data.model();
    let l = learner(&arch_kind, split.test.d, opts.data.regression())?;
    let mut global = l.init(0).map_err(s)?;
    let shards = split.scaled_shards()?;
    for r in 0..rounds.max(1) {
        let mut sum = vec![0f32; global.values.len()];
        for (i, shard) in shards.iter().enumerate() {
            let trained = train::train_local(
                &l,
                &global,
                shard,
                local,
                opts.shard_seed.unwrap_or(opts.seed) ^ (r * 31 + i as u64),
            )
            .map_err(s)?;
            for ((acc, a), b) in sum.iter_mut().zip(&trained.values).zip(&global.values) {
                *acc += a - b;
            }
        }
        let k = shards.len() as f32;
        for (g, d) in global.values.iter_mut().zip(&sum) {
            *g += d / k;
        }
    }
    score_model(
        &global,
        &arch_kind,
        &split.test,
        split.label_scale()?,
        opts.data.regression(),
    )
}

/// The same federation without privacy, as the hospitals demo reports it: accuracy after
/// `rounds` rounds of one local epoch (batch 32, learning rate 0.5).
pub fn non_private_baseline(opts: &DemoOptions, rounds: u64) -> DemoResult<f64> {
    let local = LocalTraining {
        epochs: 1,
        batch_size: 32,
        learning_rate: 0.5,
    };
    Ok(non_private(opts, rounds, &local)?
        .accuracy
        .unwrap_or(f64::NAN))
}

/// The best constant model of the pooled training records: the majority class
/// (classification) or the mean label (regression), scored on the evaluation set. What a
/// model that learned nothing about the features gets.
pub fn constant_baseline(opts: &DemoOptions) -> DemoResult<Score> {
    let split = split(opts)?;
    let shards = split.scaled_shards()?;
    let (sum, n) = shards.iter().fold((0f64, 0usize), |(s, n), d| {
        (s + d.y.iter().map(|&v| f64::from(v)).sum::<f64>(), n + d.n)
    });
    let mean = sum / n.max(1) as f64;
    let arch_kind = opts.data.model();
    let spec = arch::model_spec(&arch_kind, split.test.d, 1).map_err(s)?;
    let mut values = vec![0f32; spec.num_values()];
    // Only the bias (the last value) is set: the label mean, or a logit whose sign is the
    // majority class.
    if let Some(bias) = values.last_mut() {
        *bias = if opts.data.regression() {
            mean as f32
        } else if mean > 0.5 {
            1.0
        } else {
            -1.0
        };
    }
    let m = FlatModel::new(spec, values).map_err(s)?;
    score_model(
        &m,
        &arch_kind,
        &split.test,
        split.label_scale()?,
        opts.data.regression(),
    )
}

/// Ordinary least squares on all the training records pooled (scaled as the sites scale
/// them), solved in closed form: the non-private, non-federated reference for regression.
/// Returns the evaluation-set score (RMSE in the label's units).
pub fn least_squares(opts: &DemoOptions) -> DemoResult<Score> {
    let split = split(opts)?;
    let shards = split.scaled_shards()?;
    let d = split.test.d;
    let p = d + 1;
    // Normal equations on [x, 1].
    let mut a = vec![0f64; p * p];
    let mut b = vec![0f64; p];
    for shard in &shards {
        for i in 0..shard.n {
            let row: Vec<f64> = shard
                .row(i)
                .iter()
                .map(|&v| f64::from(v))
                .chain(std::iter::once(1.0))
                .collect();
            let y = f64::from(shard.y[i]);
            for j in 0..p {
                b[j] += row[j] * y;
                for k in 0..p {
                    a[j * p + k] += row[j] * row[k];
                }
            }
        }
    }
    let w = solve(a, b, p)?;
    // Layout: linear.weight [1, d] then linear.bias [1], as [x, 1] above.
    let values: Vec<f32> = w.iter().map(|&v| v as f32).collect();
    let arch_kind = Architecture::LinearRegression;
    let spec = arch::model_spec(&arch_kind, d, 1).map_err(s)?;
    let m = FlatModel::new(spec, values).map_err(s)?;
    score_model(&m, &arch_kind, &split.test, split.label_scale()?, true)
}

/// Solves the symmetric system `a x = b` (`p x p`, row-major) by Gaussian elimination with
/// partial pivoting.
fn solve(mut a: Vec<f64>, mut b: Vec<f64>, p: usize) -> DemoResult<Vec<f64>> {
    for col in 0..p {
        let pivot = (col..p)
            .max_by(|&i, &j| a[i * p + col].abs().total_cmp(&a[j * p + col].abs()))
            .unwrap_or(col);
        if a[pivot * p + col].abs() < 1e-12 {
            return Err("least squares: the design matrix is singular".into());
        }
        if pivot != col {
            for k in 0..p {
                a.swap(col * p + k, pivot * p + k);
            }
            b.swap(col, pivot);
        }
        for r in col + 1..p {
            let f = a[r * p + col] / a[col * p + col];
            for k in col..p {
                a[r * p + k] -= f * a[col * p + k];
            }
            b[r] -= f * b[col];
        }
    }
    let mut x = vec![0f64; p];
    for r in (0..p).rev() {
        let tail: f64 = (r + 1..p).map(|k| a[r * p + k] * x[k]).sum();
        x[r] = (b[r] - tail) / a[r * p + r];
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibrated_noise_fits_the_planned_rounds_and_no_less_does() {
        let (q, steps, rounds, eps) = (64.0 / 151.0, 10, 20, 1.0);
        let sigma = calibrate_record_noise(q, steps, rounds, eps, 1e-5).expect("calibrates");
        let delta = Delta::new(1e-5).expect("delta");
        let spent = |s: f64| {
            let ev = SgmEvent::new(q, s, steps).expect("event");
            accountant::epsilon(AccountantKind::Pld, &vec![ev; rounds as usize], delta)
                .expect("epsilon")
        };
        assert!(spent(sigma) <= eps, "{}", spent(sigma));
        assert!(spent(sigma * 0.99) > eps, "{}", spent(sigma * 0.99));
    }

    #[test]
    fn the_recommended_plan_switches_at_the_selected_budget_and_fits_every_site() {
        let bc = DemoData::BreastCancer;
        let small = DemoOptions::recommended(bc, "record", 1.0);
        let large = DemoOptions::recommended(bc, "record", LARGE_BUDGET_FROM_EPSILON);
        assert_eq!(small.record, RecordTraining::default());
        assert_eq!(large.record, large_budget_record().training);
        assert_eq!(large.rounds, large_budget_record().rounds);
        assert_ne!(small.record, large.record);
        // The demo refuses a site smaller than the expected batch: every recommended plan
        // must fit the smallest site of the uneven split, validation carve-out included.
        for eps in [0.5, 1.0, 2.0, 4.0, 8.0] {
            let opts = DemoOptions {
                non_iid: true,
                validation: Some(0.2),
                ..DemoOptions::recommended(bc, "record", eps)
            };
            let smallest = split(&opts)
                .expect("split")
                .shards
                .iter()
                .map(|d| d.n)
                .min();
            assert!(
                smallest.is_some_and(|n| n as f64 >= opts.record.expected_batch),
                "epsilon {eps}: smallest site {smallest:?}, batch {}",
                opts.record.expected_batch
            );
        }
    }

    #[test]
    fn validation_is_carved_from_the_training_part_only() {
        let test_only = split(&DemoOptions::default()).expect("split");
        let opts = DemoOptions {
            validation: Some(0.2),
            non_iid: false,
            ..DemoOptions::default()
        };
        let val = split(&opts).expect("split");
        let n_train: usize = test_only.shards.iter().map(|d| d.n).sum();
        let n_fit: usize = val.shards.iter().map(|d| d.n).sum();
        assert_eq!(test_only.test.n, 114);
        assert_eq!(n_fit + val.test.n, n_train);
        // No validation row is a test row.
        let rows = |d: &Dataset| -> Vec<Vec<u32>> {
            (0..d.n)
                .map(|i| d.row(i).iter().map(|v| v.to_bits()).collect())
                .collect()
        };
        let test_rows = rows(&test_only.test);
        assert!(rows(&val.test).iter().all(|r| !test_rows.contains(r)));
    }

    #[test]
    fn diabetes_study_parses_and_least_squares_beats_the_mean() {
        let opts = DemoOptions::recommended(DemoData::Diabetes, "record", 4.0);
        let sp = split(&opts).expect("split");
        let sigma = noise_multiplier(&opts, &sp.shards).expect("sigma");
        let cfg = StudyConfig::from_toml(&study_toml(&opts, &sp, sigma)).expect("valid study");
        assert_eq!(cfg.model, Architecture::LinearRegression);
        assert_eq!(cfg.data.label_range, Some([0.0, 400.0]));
        let ls = least_squares(&opts).expect("ols").rmse.expect("rmse");
        let mean = constant_baseline(&opts).expect("mean").rmse.expect("rmse");
        assert!(ls > 40.0 && ls < 60.0 && mean > ls + 10.0, "{ls} {mean}");
    }
}
