//! `fedpriv-coordinator report`: one self-contained HTML page about a study, for the ML
//! team, the privacy officer and the auditor: epsilon spent per round (per site where the
//! study's privacy semantics allow) against the budget, budget left, sites per round, model
//! versions with their digests and who exported them, refusals and alerts, and the privacy
//! terms in plain words.
//!
//! Two steps, each testable alone: [`gather`] reads the state directory (the database
//! read-only, the audit log) into a plain [`ReportData`], deciding there what the report may
//! show; [`render`] turns a `ReportData` into HTML and reads nothing.
//!
//! What stays hidden: under central placement (and any future placement where the
//! coordinator must not learn who took part, such as secure aggregation) the gathered data
//! holds no per-site figures and no per-round participants (names or counts), and no round
//! reason or refusal that would tell them; see [`Visibility`].
//!
//! The page: inline SVG drawn by `plotters` (SVG backend), inline CSS, no script, no
//! external resource, and a Content-Security-Policy that forbids both. Every string that
//! came from a config, a certificate, a peer or the audit log is HTML-escaped; none is
//! passed to `plotters` (captions and axis labels are fixed text and numbers; legends are
//! HTML beside the plot).

use std::path::{Path, PathBuf};

use serde::Serialize;

pub mod gather;
mod plot;
pub mod render;

pub use gather::gather;
pub use render::render;

/// What the report may show of individual sites, decided once from the study's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Per-site figures and per-round participants are shown: the record unit (each site
    /// runs DP-SGD on its own records and its participation is not what is protected), or
    /// the site unit with local noise (the coordinator sees who took part, the accountant
    /// assumes it does).
    PerSite,
    /// Study-level figures only: central placement, where who took part in a round is kept
    /// from the released models' readers (the aggregate is divided by the enrolled count,
    /// not by the number that took part, for that reason).
    StudyOnly,
}

impl Visibility {
    /// The rule. An exhaustive match: a new placement must decide here.
    pub fn of(
        unit: fedpriv_common::config::PrivacyUnit,
        placement: fedpriv_common::config::Placement,
    ) -> Self {
        use fedpriv_common::config::{Placement, PrivacyUnit};
        match (unit, placement) {
            (PrivacyUnit::Record, _) => Self::PerSite,
            (PrivacyUnit::Site, Placement::Local) => Self::PerSite,
            (PrivacyUnit::Site, Placement::Central) => Self::StudyOnly,
        }
    }
}

/// Everything the page shows, gathered before rendering.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportData {
    pub study: String,
    /// `active`, `completed` or `stopped`.
    pub status: String,
    pub end_reason: Option<String>,
    pub created_at: i64,
    /// When the report was made (unix seconds).
    pub generated_at: i64,
    pub terms: Terms,
    pub visibility: Visibility,
    /// Sites enrolled (how many; their names only with [`ReportData::per_site`]).
    pub enrolled: usize,
    /// The study's epsilon now: the worst site's, by the accountant over its recorded
    /// spends (what `ledger show` prints).
    pub epsilon_spent: f64,
    /// The study's epsilon after each round that charged any site: the worst site's epsilon
    /// over its spends up to and including that round.
    pub study_epsilon: Vec<EpsilonPoint>,
    /// Per-site figures; `None` under [`Visibility::StudyOnly`].
    pub per_site: Option<PerSite>,
    /// Every round's state.
    pub rounds: Vec<RoundInfo>,
    pub models: Vec<ModelInfo>,
    /// Refusals tied to this study (update rejections, refused requests and exports).
    pub refusals: Vec<AuditItem>,
    /// Alerts about this study.
    pub alerts: Vec<AuditItem>,
    /// Refusals and alerts the report withheld (they would tell who took part in a round
    /// under [`Visibility::StudyOnly`]): how many.
    pub withheld_records: usize,
    /// Refusals and alerts in the log that name no study (connection-level, other
    /// sources): how many, not what.
    pub service_wide_records: usize,
    /// Noised federated evaluation, one point per round and metric.
    pub evaluations: Vec<EvalPoint>,
    /// The audit log's verification, in words (`audit verify`'s line).
    pub audit_log: String,
}

/// The privacy terms, as numbers and in plain words.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Terms {
    /// The unit and placement in words (`study assess`'s line).
    pub unit: String,
    /// `local` or `central` (site unit); `local` for the record unit.
    pub placement: String,
    pub clip_norm: f64,
    /// What the clip norm bounds: `each record's gradient` or `each site's model update`.
    pub clipped: String,
    pub noise_multiplier: f64,
    pub epsilon_budget: f64,
    pub delta: f64,
    /// `rdp` or `pld`.
    pub accountant: String,
    /// Site unit: rate at which sites are sampled per round.
    pub site_sample_rate: f64,
    pub rounds_planned: u64,
    pub min_sites: usize,
    /// How each site trains in a round, in words.
    pub local_training: String,
    /// What the terms protect and against whom (a paragraph with `**bold**` and `` `code` ``
    /// marks; see [`crate::assess::protection_text`]).
    pub protection: String,
    /// SHA-256 of the mechanism's terms (what a privacy audit holds for).
    pub mechanism_sha256: String,
}

/// One point of an epsilon curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EpsilonPoint {
    pub round: u64,
    pub epsilon: f64,
}

/// Per-site figures (only under [`Visibility::PerSite`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerSite {
    /// Each enrolled site, by name.
    pub sites: Vec<SiteSeries>,
    /// Each round that charged any site: who was charged and whose update went into the
    /// model version.
    pub participants: Vec<RoundParticipants>,
}

/// One site's epsilon after each round it was charged for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteSeries {
    pub site: String,
    pub points: Vec<EpsilonPoint>,
    /// The accountant over all its spends (0 when it paid for nothing).
    pub epsilon: f64,
}

/// Who took part in one round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundParticipants {
    pub round: u64,
    /// Sites charged for the round (their tasks were sent).
    pub charged: Vec<String>,
    /// Sites whose updates made the round's model version (empty: no model).
    pub contributed: Vec<String>,
}

/// One round's state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundInfo {
    pub round: u64,
    /// `reserved`, `completed` or `aborted`.
    pub status: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// Why it aborted; `None` under [`Visibility::StudyOnly`] (the reason counts updates).
    pub reason: Option<String>,
}

/// One model version (checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    pub round: u64,
    pub sha256: String,
    pub created_at: i64,
    /// When the retention policy removed the file.
    pub pruned_at: Option<i64>,
    /// How many sites' updates made it; `None` under [`Visibility::StudyOnly`].
    pub contributors: Option<usize>,
    pub exports: Vec<ExportInfo>,
}

/// A `model_exported` record of the version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExportInfo {
    pub at: i64,
    pub by: String,
    pub to: String,
}

/// A refusal or an alert, from the audit log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditItem {
    pub seq: u64,
    pub at: i64,
    /// The audit event (`refused`, `update_rejected`, `alert`).
    pub event: String,
    /// Who or what it is about (an identity, a site, a study).
    pub subject: String,
    /// What was asked or which kind of alert.
    pub what: String,
    /// Why, or the alert's detail.
    pub detail: String,
}

/// One noised evaluation figure of one round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalPoint {
    pub round: u64,
    /// `accuracy`, `loss`, ...
    pub metric: String,
    pub value: f64,
    /// Standard deviation of the noise added to `value`.
    pub noise_sd: f64,
}

/// Why no report was made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "no state database at {} (is --state the coordinator's state directory?)",
        .0.display()
    )]
    NoState(PathBuf),
    #[error("no study {0:?} in the state database")]
    NoStudy(String),
    #[error("{0}")]
    State(String),
    #[error("drawing a plot: {0}")]
    Plot(String),
    #[error("{}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `report --study ID --state DIR --out FILE`: gathers, renders and writes the page;
/// returns the line to print.
pub fn run(study: &str, state: &Path, out: &Path) -> Result<String, ReportError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .map_err(|e| ReportError::State(format!("system clock before 1970: {e}")))?;
    let data = gather(state, study, now)?;
    let html = render(&data)?;
    std::fs::write(out, html).map_err(|source| ReportError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(format!(
        "wrote the report of study {study} to {}",
        out.display()
    ))
}
