//! `fedpriv-coordinator study assess`: a privacy impact assessment of a study file, before
//! it runs, for the privacy officer who signs it off.
//!
//! [`assess`] is pure: a validated [`StudyConfig`] and the record counts the sites will
//! declare in, an [`Assessment`] out; [`Assessment::to_markdown`] renders it. The epsilon
//! figures are the accountant's for the study's exact terms, priced by the same
//! [`round_cost`] the coordinator and every site use and composed by the same
//! [`accountant::epsilon`] (and the coordinator's rule: a round starts for a site only if its
//! epsilon after the round stays within the budget).
//!
//! What it does not do: it reads no state directory and contacts no site, so it cannot see a
//! site's own caps (per study and per data source), which may stop a site sooner; it does not
//! decide whether the study may run (the sign-off block is for a person); and its accuracy
//! figures are measurements copied from docs/accuracy.md for a matching task, never
//! predictions for this study's plan.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Subcommand;
use fedpriv_common::config::{round_cost, LocalPlan, Placement, PrivacyUnit, StudyConfig, Task};
use fedpriv_common::dp::accountant::{self, AccountError};
use fedpriv_common::dp::SgmEvent;
use fedpriv_common::model::Architecture;

/// `fedpriv-coordinator study ...`.
#[derive(Debug, Subcommand)]
pub enum StudyCommand {
    /// Privacy impact assessment of a study file before it runs (Markdown): what the unit
    /// protects, epsilon per round and over the rounds for each site's declared record
    /// count, how many rounds the budget buys, the columns each site will read, retention,
    /// the measured accuracy of a matching task (docs/accuracy.md), and a sign-off block.
    Assess {
        /// The study's TOML, as `run --study` takes it.
        #[arg(long, value_name = "FILE")]
        study: PathBuf,
        /// The record counts the sites will declare (`[sources.NAME] records` in their
        /// configs): N1,N2,... one per site, or NAME=N,... by enrolled site name.
        #[arg(long, value_name = "N1,N2,...")]
        site_records: String,
        /// Write the assessment here (default: standard output).
        #[arg(long, value_name = "FILE.md")]
        out: Option<PathBuf>,
    },
}

/// Why no assessment was made. The operator's fault, except [`AssessError::Accountant`].
#[derive(Debug, thiserror::Error)]
pub enum AssessError {
    #[error("--site-records: {0}")]
    SiteRecords(String),
    #[error("{path}: {reason}")]
    Study { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The accountant could not answer (a numerical failure or a grid too large), as
    /// opposed to an unbounded epsilon, which the assessment reports.
    #[error("the accountant: {0}")]
    Accountant(AccountError),
}

/// One site's declared record count, by name when the operator gave names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteRecords {
    pub site: Option<String>,
    pub records: u64,
}

/// Parses `N1,N2,...` or `NAME=N,...` against the study's enrolled sites.
pub fn parse_site_records(text: &str, cfg: &StudyConfig) -> Result<Vec<SiteRecords>, AssessError> {
    let bad = |m: String| AssessError::SiteRecords(m);
    let mut out: Vec<SiteRecords> = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(bad("an empty entry (write N1,N2,... or NAME=N,...)".into()));
        }
        let (site, n) = match part.split_once('=') {
            Some((name, n)) => (Some(name.trim().to_string()), n.trim()),
            None => (None, part),
        };
        let records: u64 = n
            .parse()
            .ok()
            .filter(|&r| r >= 1)
            .ok_or_else(|| bad(format!("{n:?} is not a record count of at least 1")))?;
        if let Some(name) = &site {
            if !cfg.enrolled.contains(name) {
                return Err(bad(format!(
                    "{name:?} is not enrolled in study {} (enrolled: {})",
                    cfg.id,
                    cfg.enrolled.join(", ")
                )));
            }
            if out.iter().any(|s| s.site.as_ref() == Some(name)) {
                return Err(bad(format!("{name:?} is given twice")));
            }
        }
        if out
            .first()
            .is_some_and(|f| f.site.is_some() != site.is_some())
        {
            return Err(bad("give every count by name (NAME=N) or none".into()));
        }
        out.push(SiteRecords { site, records });
    }
    if out.len() > cfg.enrolled.len() {
        return Err(bad(format!(
            "{} record counts for the {} enrolled sites",
            out.len(),
            cfg.enrolled.len()
        )));
    }
    Ok(out)
}

/// What the accountant says about one site.
#[derive(Debug, Clone, PartialEq)]
pub struct Pricing {
    /// One round's mechanism, as the ledgers record it.
    pub round: SgmEvent,
    /// Epsilon after one round, at the study's delta (infinite: unbounded).
    pub epsilon_one_round: f64,
    /// Epsilon after every planned round.
    pub epsilon_planned: f64,
    /// The most rounds whose epsilon stays within the budget (capped: see `capped`).
    pub rounds_affordable: u64,
    pub capped: bool,
    /// Rounds the site takes part in: the planned ones, as far as its budget and the
    /// study's `min_sites` allow (every site taking part in every round).
    pub rounds_taken: u64,
    /// Epsilon after those rounds (0 for none).
    pub epsilon_spent: f64,
}

/// Whether a site can take part, and at what cost.
#[derive(Debug, Clone, PartialEq)]
pub enum SiteOutcome {
    /// The coordinator would exclude it or could not price its rounds.
    Excluded(String),
    Priced(Pricing),
}

#[derive(Debug, Clone, PartialEq)]
pub struct SiteAssessment {
    /// The site's name, or "site K" for unnamed counts.
    pub label: String,
    pub records: u64,
    pub outcome: SiteOutcome,
}

/// One column a site will read.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnUse {
    pub name: String,
    pub role: &'static str,
    /// Public range, categories, or image spec: what the study declares about it.
    pub declared: String,
    pub fill: Option<f32>,
}

/// A measured accuracy of a matching task in docs/accuracy.md.
#[derive(Debug, Clone, PartialEq)]
pub struct AccuracyMatch {
    pub data: &'static str,
    pub metric: &'static str,
    /// The measured budget used: the largest at or below what the study spends.
    pub epsilon: f64,
    pub plan: &'static str,
    pub iid: &'static str,
    pub non_iid: &'static str,
    pub references: &'static str,
    pub conditions: &'static str,
}

/// Whether docs/accuracy.md has something for this study, and if not why.
#[derive(Debug, Clone, PartialEq)]
pub enum Accuracy {
    Measured(AccuracyMatch),
    None(String),
}

/// The assessment of one study for given record counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    pub study: StudyConfig,
    pub sites: Vec<SiteAssessment>,
    /// Rounds the study runs (every site taking part every round).
    pub study_rounds: u64,
    /// The study's epsilon after those rounds: the worst site's.
    pub study_epsilon: f64,
    pub columns: Vec<ColumnUse>,
    pub accuracy: Accuracy,
}

/// Epsilon after `rounds` rounds of `event` and the evaluations those rounds carry, as the
/// ledgers compose them; an unbounded epsilon is infinite.
fn epsilon_after(cfg: &StudyConfig, event: SgmEvent, rounds: u64) -> Result<f64, AssessError> {
    if rounds == 0 {
        return Ok(0.0);
    }
    // Repeats of one mechanism compose as one event of as many steps.
    let mut events = vec![SgmEvent {
        steps: event.steps.saturating_mul(rounds),
        ..event
    }];
    if let Some(plan) = &cfg.evaluation {
        // Rounds 1 + every, 1 + 2 every, ... up to `rounds` (see `EvaluationPlan::is_due`).
        let evaluations = (rounds - 1) / plan.every.max(1);
        if evaluations > 0 {
            events.push(SgmEvent {
                steps: evaluations,
                ..plan.event()
            });
        }
    }
    match accountant::epsilon(cfg.privacy.accountant, &events, cfg.privacy.delta) {
        Ok(e) => Ok(e),
        Err(AccountError::Unbounded) => Ok(f64::INFINITY),
        Err(e) => Err(AssessError::Accountant(e)),
    }
}

/// Assesses `cfg` for sites declaring `records`.
pub fn assess(cfg: &StudyConfig, records: &[SiteRecords]) -> Result<Assessment, AssessError> {
    // A record study with `target_epsilon`: assessed at the sigma the coordinator would
    // choose from these declared sizes (the smallest site that can take part decides).
    let calibrated;
    let cfg = match cfg.privacy.calibrate_to {
        Some(target) => {
            let smallest = records
                .iter()
                .map(|s| s.records)
                .filter(|n| cfg.privacy.delta.get() * (*n as f64) < 1.0)
                .filter_map(|n| cfg.calibrated_sigma(target, n).ok().map(|s| (n, s)))
                .min_by_key(|(n, _)| *n);
            let mut c = cfg.clone();
            if let Some((_, sigma)) = smallest {
                c.privacy.noise_multiplier = sigma;
                c.privacy.calibrate_to = None;
            }
            calibrated = c;
            &calibrated
        }
        None => cfg,
    };
    let p = &cfg.privacy;
    let mut sites = Vec::new();
    for (i, s) in records.iter().enumerate() {
        let label = s.site.clone().unwrap_or_else(|| format!("site {}", i + 1));
        let n = s.records;
        // The coordinator's own admission rules (round.rs), in its order.
        if p.unit == PrivacyUnit::Record && p.delta.get() * n as f64 >= 1.0 {
            sites.push(SiteAssessment {
                label,
                records: n,
                outcome: SiteOutcome::Excluded(format!(
                    "excluded: delta {} is not below 1 / {n} declared records",
                    p.delta.get()
                )),
            });
            continue;
        }
        let declared = (p.unit == PrivacyUnit::Record).then_some(n);
        let event = match round_cost(
            p.unit,
            p.placement,
            p.noise_multiplier.get(),
            &cfg.local,
            declared,
        ) {
            Ok(e) => e,
            Err(reason) => {
                sites.push(SiteAssessment {
                    label,
                    records: n,
                    outcome: SiteOutcome::Excluded(format!("cannot be priced: {reason}")),
                });
                continue;
            }
        };
        let steps =
            accountant::max_steps(p.accountant, &[], event.q, event.sigma, p.epsilon, p.delta)
                .map_err(AssessError::Accountant)?;
        // A round is `event.steps` steps of one (q, sigma): r rounds fit exactly when
        // r * steps do; evaluations can only lower that (the largest r that still fits).
        let mut rounds_affordable = steps / event.steps.max(1);
        if cfg.evaluation.is_some() {
            let (mut lo, mut hi) = (0u64, rounds_affordable);
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                if epsilon_after(cfg, event, mid)? <= p.epsilon.get() {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            rounds_affordable = lo;
        }
        sites.push(SiteAssessment {
            label,
            records: n,
            outcome: SiteOutcome::Priced(Pricing {
                round: event,
                epsilon_one_round: epsilon_after(cfg, event, 1)?,
                epsilon_planned: epsilon_after(cfg, event, cfg.rounds)?,
                rounds_affordable,
                capped: steps >= accountant::MAX_STEPS,
                rounds_taken: 0,
                epsilon_spent: 0.0,
            }),
        });
    }
    // A round starts while at least min_sites sites can pay for it: with every site taking
    // part every round, the study runs as long as its min_sites-th best-funded site.
    let mut affordable: Vec<u64> = sites
        .iter()
        .filter_map(|s| match &s.outcome {
            SiteOutcome::Priced(p) => Some(p.rounds_affordable),
            SiteOutcome::Excluded(_) => None,
        })
        .collect();
    affordable.sort_unstable_by(|a, b| b.cmp(a));
    let study_rounds = affordable
        .get(cfg.min_sites.saturating_sub(1))
        .map_or(0, |&r| r.min(cfg.rounds));
    let mut study_epsilon = 0.0f64;
    for s in &mut sites {
        if let SiteOutcome::Priced(pr) = &mut s.outcome {
            pr.rounds_taken = pr.rounds_affordable.min(study_rounds);
            pr.epsilon_spent = epsilon_after(cfg, pr.round, pr.rounds_taken)?;
            study_epsilon = study_epsilon.max(pr.epsilon_spent);
        }
    }
    // What the study could spend with its budget as the only limit: the smaller of the
    // budget and what the planned rounds cost its worst site.
    let planned_worst = sites
        .iter()
        .filter_map(|s| match &s.outcome {
            SiteOutcome::Priced(p) => Some(p.epsilon_planned),
            SiteOutcome::Excluded(_) => None,
        })
        .fold(None, |acc: Option<f64>, e| {
            Some(acc.map_or(e, |a| a.max(e)))
        });
    let accuracy = match planned_worst {
        Some(e) if study_rounds > 0 => accuracy_for(cfg, e.min(p.epsilon.get())),
        _ => Accuracy::None(
            "the study cannot run with these record counts, so no accuracy applies".into(),
        ),
    };
    Ok(Assessment {
        study: cfg.clone(),
        sites,
        study_rounds,
        study_epsilon,
        columns: columns_of(cfg),
        accuracy,
    })
}

fn columns_of(cfg: &StudyConfig) -> Vec<ColumnUse> {
    let d = &cfg.data;
    let mut out = Vec::new();
    let label_declared = match (d.task, d.label_range, d.classes) {
        (Task::Regression, Some(r), _) => format!("public range [{}, {}]", r[0], r[1]),
        (Task::Multiclass, _, k) if d.class_labels.is_empty() => {
            format!("class ids 0..{}", k.saturating_sub(1))
        }
        (Task::Multiclass, _, _) => format!("classes {}", d.class_labels.join(", ")),
        (Task::Binary, _, _) => "0 or 1".into(),
        (Task::Regression, None, _) => String::new(),
    };
    out.push(ColumnUse {
        name: d.label.clone(),
        role: "label",
        declared: label_declared,
        fill: None,
    });
    for ((f, r), fill) in d.features.iter().zip(&d.ranges).zip(&d.fills) {
        out.push(ColumnUse {
            name: f.clone(),
            role: "numeric feature",
            declared: format!("public range [{}, {}]", r[0], r[1]),
            fill: *fill,
        });
    }
    for c in &d.categorical {
        let how = match c.embedding {
            Some(w) => format!("embedding of width {w}"),
            None => "one-hot".into(),
        };
        out.push(ColumnUse {
            name: c.name.clone(),
            role: "categorical feature",
            declared: format!(
                "categories {} (any other value: \"other\"), {how}",
                c.categories.join(", ")
            ),
            fill: None,
        });
    }
    if let Some(im) = &d.image {
        out.push(ColumnUse {
            name: im.file_column.clone(),
            role: "image file",
            declared: format!(
                "{} channel(s), resized to {} x {}",
                im.channels, im.height, im.width
            ),
            fill: None,
        });
    }
    out
}

/// A results row of docs/accuracy.md, its cells copied verbatim (a test checks they are
/// still there).
struct MeasuredRow {
    epsilon: f64,
    plan: &'static str,
    iid: &'static str,
    non_iid: &'static str,
}

const BC_CONDITIONS: &str = "Breast Cancer Wisconsin, logistic regression, 3 sites holding 80% of 569 records (IID: about 152 each; non-IID: about 228, 136 and 91, label skew 0.6), the 10 `worst_*` features, delta 1e-5, noise calibrated so that every planned round fits the budget at the smallest site; test accuracy in % on 114 held-out records, mean ± sd over 5 runs (min-max)";
const BC_REFERENCES: &str =
    "non-private federated model with the same features 99.1%; always the majority class 65.8%";
const DIABETES_CONDITIONS: &str = "diabetes progression, linear regression, 3 sites holding 80% of 442 records (IID: 118 each; non-IID: about 177, 106 and 71), all 10 features, delta 1e-5, noise calibrated as above; test RMSE in the label's units on 88 held-out records, mean ± sd over 5 runs (min-max)";
const DIABETES_REFERENCES: &str =
    "least squares on the pooled data 50.9; always the training mean 72.0";

const BC_RECORD: &[MeasuredRow] = &[
    MeasuredRow {
        epsilon: 0.5,
        plan: "plan A",
        iid: "94.6 ± 1.7 (93.0–97.4)",
        non_iid: "92.3 ± 3.1 (86.8–93.9)",
    },
    MeasuredRow {
        epsilon: 1.0,
        plan: "plan A",
        iid: "96.5 ± 0.9 (95.6–97.4)",
        non_iid: "96.3 ± 0.7 (95.6–97.4)",
    },
    MeasuredRow {
        epsilon: 2.0,
        plan: "plan B",
        iid: "96.8 ± 1.3 (94.7–98.2)",
        non_iid: "93.9 ± 2.2 (90.4–96.5)",
    },
    MeasuredRow {
        epsilon: 4.0,
        plan: "plan B",
        iid: "97.7 ± 1.8 (94.7–99.1)",
        non_iid: "96.7 ± 2.7 (92.1–98.2)",
    },
    MeasuredRow {
        epsilon: 8.0,
        plan: "plan B",
        iid: "98.1 ± 0.7 (97.4–99.1)",
        non_iid: "97.0 ± 1.9 (94.7–100.0)",
    },
];

const BC_SITE: &[MeasuredRow] = &[
    MeasuredRow {
        epsilon: 0.5,
        plan: "site-unit plan",
        iid: "49.8 ± 34.6 (6.1–92.1)",
        non_iid: "61.1 ± 15.8 (34.2–71.9)",
    },
    MeasuredRow {
        epsilon: 1.0,
        plan: "site-unit plan",
        iid: "49.8 ± 21.5 (24.6–72.8)",
        non_iid: "68.6 ± 22.4 (34.2–91.2)",
    },
    MeasuredRow {
        epsilon: 2.0,
        plan: "site-unit plan",
        iid: "69.8 ± 21.0 (34.2–88.6)",
        non_iid: "37.9 ± 19.6 (14.0–68.4)",
    },
    MeasuredRow {
        epsilon: 4.0,
        plan: "site-unit plan",
        iid: "35.1 ± 21.7 (8.8–68.4)",
        non_iid: "59.5 ± 23.5 (34.2–80.7)",
    },
    MeasuredRow {
        epsilon: 8.0,
        plan: "site-unit plan",
        iid: "67.4 ± 31.8 (11.4–90.4)",
        non_iid: "56.7 ± 30.3 (15.8–86.8)",
    },
];

const DIABETES_RECORD: &[MeasuredRow] = &[
    MeasuredRow {
        epsilon: 1.0,
        plan: "diabetes plan",
        iid: "54.2 ± 1.3 (52.6–55.9)",
        non_iid: "68.8 ± 6.2 (60.3–75.9)",
    },
    MeasuredRow {
        epsilon: 4.0,
        plan: "diabetes plan",
        iid: "51.1 ± 0.7 (50.2–51.9)",
        non_iid: "54.0 ± 1.5 (52.3–56.1)",
    },
    MeasuredRow {
        epsilon: 8.0,
        plan: "diabetes plan",
        iid: "51.4 ± 0.4 (50.9–51.9)",
        non_iid: "54.4 ± 1.5 (53.3–57.1)",
    },
];

/// The measured figures for a study of the same task, label, model and unit as one in
/// docs/accuracy.md, at the largest measured budget not above `effective` (the smaller of
/// the study's budget and what its planned rounds cost its worst site): a larger measured
/// budget would promise more than this study can have. The measured runs spent at least
/// 99.9% of their budgets.
fn accuracy_for(cfg: &StudyConfig, effective: f64) -> Accuracy {
    let d = &cfg.data;
    let p = &cfg.privacy;
    let table = match (d.task, d.label.as_str(), &cfg.model, p.unit, p.placement) {
        (Task::Binary, "malignant", Architecture::LogisticRegression, PrivacyUnit::Record, _) => {
            Some((
                "breast cancer",
                "test accuracy (%)",
                BC_RECORD,
                BC_CONDITIONS,
                BC_REFERENCES,
            ))
        }
        (
            Task::Binary,
            "malignant",
            Architecture::LogisticRegression,
            PrivacyUnit::Site,
            Placement::Local,
        ) => Some((
            "breast cancer",
            "test accuracy (%)",
            BC_SITE,
            BC_CONDITIONS,
            BC_REFERENCES,
        )),
        (
            Task::Regression,
            "progression",
            Architecture::LinearRegression,
            PrivacyUnit::Record,
            _,
        ) => Some((
            "diabetes progression",
            "test RMSE",
            DIABETES_RECORD,
            DIABETES_CONDITIONS,
            DIABETES_REFERENCES,
        )),
        _ => None,
    };
    let Some((data, metric, rows, conditions, references)) = table else {
        return Accuracy::None(
            "docs/accuracy.md has no measurement of a matching task (same task, label column, \
             model and privacy unit): no measured accuracy is available for this study"
                .into(),
        );
    };
    match rows.iter().rev().find(|r| r.epsilon <= effective) {
        Some(r) => Accuracy::Measured(AccuracyMatch {
            data,
            metric,
            epsilon: r.epsilon,
            plan: r.plan,
            iid: r.iid,
            non_iid: r.non_iid,
            references,
            conditions,
        }),
        None => Accuracy::None(format!(
            "docs/accuracy.md measured this task ({data}) at epsilon {} and above only; this \
             study can spend at most {}: no measured accuracy is available at so small a budget",
            rows.first().map_or(0.0, |r| r.epsilon),
            fmt_eps(effective)
        )),
    }
}

/// Text from a config, certificate or operator, safe anywhere in Markdown: inline markup,
/// HTML and table-cell delimiters are escaped, control characters shown as escapes.
pub fn md(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '|' | '#' | '&' | '~' | '!' | '$' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

fn fmt_eps(e: f64) -> String {
    if e.is_finite() {
        format!("{e:.4}")
    } else {
        "unbounded".into()
    }
}

impl Assessment {
    /// The assessment as a Markdown document.
    pub fn to_markdown(&self) -> String {
        let c = &self.study;
        let p = &c.privacy;
        let mut t = String::new();
        let _ = writeln!(t, "# Privacy impact assessment: study {}\n", md(&c.id));
        let _ = writeln!(
            t,
            "Made by `fedpriv-coordinator study assess` from the study file, before the study \
             runs. Every epsilon below is the {} accountant's, at delta = {}, for the study's \
             exact terms: the same computation the coordinator's and the sites' ledgers make. \
             The terms' SHA-256 (what a privacy audit and this sign-off hold for): `{}`.\n",
            p.accountant.as_str(),
            p.delta.get(),
            c.mechanism_digest()
        );

        let _ = writeln!(t, "## Summary\n");
        let _ = writeln!(t, "- Unit of privacy: {}", unit_text(c));
        let _ = writeln!(
            t,
            "- Budget: epsilon {} at delta {} per site ({} accountant)",
            p.epsilon.get(),
            p.delta.get(),
            p.accountant.as_str()
        );
        let _ = writeln!(
            t,
            "- Noise multiplier {}, clip norm {}",
            p.noise_multiplier.get(),
            p.clip_norm.get()
        );
        let _ = writeln!(t, "- Training at each site: {}", local_plan_text(c));
        let _ = writeln!(
            t,
            "- Planned rounds: {}; a round needs at least {} of the {} enrolled sites ({})",
            c.rounds,
            c.min_sites,
            c.enrolled.len(),
            c.enrolled
                .iter()
                .map(|s| md(s))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            t,
            "- Release: {}",
            if c.release.require_privacy_audit {
                "no model is exported until a passing privacy audit of these exact terms is on record (`[release] require_privacy_audit = true`)"
            } else {
                "models may be exported without a privacy audit on record (`[release] require_privacy_audit` is not set)"
            }
        );
        if self.study_rounds == 0 {
            let _ = writeln!(
                t,
                "- **The study cannot run: fewer than {} site(s) can afford even one round within the budget** (see below).\n",
                c.min_sites
            );
        } else {
            let _ = writeln!(
                t,
                "- **Outcome: the study runs {} of {} planned rounds and spends epsilon {} (the worst site's) at delta {}.**\n",
                self.study_rounds,
                c.rounds,
                fmt_eps(self.study_epsilon),
                p.delta.get()
            );
        }

        let _ = writeln!(t, "## What the unit protects\n");
        t.push_str(&protection_text(c));
        t.push('\n');

        let _ = writeln!(t, "## Epsilon per site\n");
        let _ = writeln!(
            t,
            "| site | declared records | one round: q, sigma, steps | epsilon, one round | epsilon, all {} planned rounds | rounds the budget buys | rounds taken part in | epsilon spent |",
            c.rounds
        );
        let _ = writeln!(t, "|---|---|---|---|---|---|---|---|");
        for s in &self.sites {
            match &s.outcome {
                SiteOutcome::Excluded(why) => {
                    let _ = writeln!(
                        t,
                        "| {} | {} | {} | - | - | 0 | 0 | 0 |",
                        md(&s.label),
                        s.records,
                        md(why)
                    );
                }
                SiteOutcome::Priced(pr) => {
                    let buys = if pr.capped {
                        format!("at least {}", pr.rounds_affordable)
                    } else {
                        pr.rounds_affordable.to_string()
                    };
                    let _ = writeln!(
                        t,
                        "| {} | {} | q = {}, sigma = {}, {} step(s) | {} | {} | {} | {} | {} |",
                        md(&s.label),
                        s.records,
                        pr.round.q.get(),
                        pr.round.sigma.get(),
                        pr.round.steps,
                        fmt_eps(pr.epsilon_one_round),
                        fmt_eps(pr.epsilon_planned),
                        buys,
                        pr.rounds_taken,
                        fmt_eps(pr.epsilon_spent)
                    );
                }
            }
        }
        t.push('\n');
        for s in &self.sites {
            if let SiteOutcome::Priced(pr) = &s.outcome {
                if pr.rounds_affordable == 0 {
                    let _ = writeln!(
                        t,
                        "- **{}: not even one round fits the budget** (epsilon {} for one round, against a budget of {}): this site never takes part.",
                        md(&s.label),
                        fmt_eps(pr.epsilon_one_round),
                        p.epsilon.get()
                    );
                } else if pr.rounds_affordable < c.rounds {
                    let _ = writeln!(
                        t,
                        "- {}: the budget buys {} of the {} planned rounds; the coordinator starts no round that would take this site over it.",
                        md(&s.label),
                        pr.rounds_affordable,
                        c.rounds
                    );
                }
            }
        }
        if self.sites.len() < c.enrolled.len() {
            let _ = writeln!(
                t,
                "- Record counts were given for {} of the {} enrolled sites; the others are not assessed here.",
                self.sites.len(),
                c.enrolled.len()
            );
        }
        let _ = writeln!(
            t,
            "- Rounds are counted with every site taking part in every round: a round starts while at least {} site(s) can pay for it. Each site's own caps (its `epsilon_cap` for the study and for its data source, over every study that reads the same patients) can stop it sooner; they are in the sites' configs, not here.",
            c.min_sites
        );
        if p.unit == PrivacyUnit::Record {
            let _ = writeln!(
                t,
                "- q = expected batch / the site's declared record count: a smaller site pays more per round. A patient treated at two sites is in both sites' data; their guarantee is the composition of both (at most twice the epsilon, with the deltas added)."
            );
        }
        let _ = writeln!(t, "\nTo reproduce a site's figure after R rounds:\n");
        let _ = writeln!(t, "```sh");
        for s in &self.sites {
            if let SiteOutcome::Priced(pr) = &s.outcome {
                let _ = writeln!(
                    t,
                    "fedpriv-coordinator budget epsilon --sample-rate {} --noise-multiplier {} --steps {} --delta {} --accountant {}   # {} R = {}",
                    pr.round.q.get(),
                    pr.round.sigma.get(),
                    pr.round.steps * pr.rounds_taken.max(1),
                    p.delta.get(),
                    p.accountant.as_str(),
                    s.label.replace(['\n', '\r', '`'], " "),
                    pr.rounds_taken.max(1)
                );
            }
        }
        let _ = writeln!(t, "```\n");

        let _ = writeln!(t, "## Columns each site will read\n");
        let _ = writeln!(
            t,
            "The study's data contract: each site reads these columns of its data source and no other; each site also pins the columns it allows in its own config and refuses a study asking for more. Scaling uses only the public ranges below, never a statistic of any site's records.\n"
        );
        let _ = writeln!(
            t,
            "| column | role | declared in the study | fill for a missing value |"
        );
        let _ = writeln!(t, "|---|---|---|---|");
        for col in &self.columns {
            let fill = match col.fill {
                Some(v) => v.to_string(),
                None if col.role == "numeric feature" => "none: the record is skipped".into(),
                None => "-".into(),
            };
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} |",
                md(&col.name),
                col.role,
                md(&col.declared),
                fill
            );
        }
        t.push('\n');

        let _ = writeln!(t, "## Retention\n");
        t.push_str(RETENTION_TEXT);
        let _ = writeln!(
            t,
            "- At each site: {}.\n",
            fedpriv_client::inventory::RETENTION_NOTE
        );

        let _ = writeln!(t, "## Expected accuracy\n");
        match &self.accuracy {
            Accuracy::Measured(a) => {
                let _ = writeln!(
                    t,
                    "docs/accuracy.md measured a matching task ({}, the same unit) at epsilon {}: the largest measured budget not above the smaller of this study's budget and what its planned rounds cost its worst site. Those are measurements of the plan recommended there ({}), not of this study's plan; other sites, data or settings can do better or worse.\n",
                    a.data,
                    a.epsilon,
                    a.plan
                );
                let _ = writeln!(
                    t,
                    "| {} at epsilon {} | sites alike (IID) | sites differ (non-IID) |",
                    a.metric, a.epsilon
                );
                let _ = writeln!(t, "|---|---|---|");
                let _ = writeln!(t, "| measured | {} | {} |\n", a.iid, a.non_iid);
                let _ = writeln!(
                    t,
                    "Conditions: {}. References: {}.\n",
                    a.conditions, a.references
                );
            }
            Accuracy::None(why) => {
                let _ = writeln!(t, "{}.\n", md(why));
            }
        }

        let _ = writeln!(t, "## Sign-off\n");
        let _ = writeln!(
            t,
            "The privacy officer's decision on study {} with the terms above (SHA-256 `{}`); a change to any privacy term, the model, the data contract or the rounds needs a new assessment.\n",
            md(&c.id),
            c.mechanism_digest()
        );
        let _ = writeln!(t, "| item | entry |");
        let _ = writeln!(t, "|---|---|");
        for item in [
            "Privacy officer (name, role)",
            "Decision (approved / approved with conditions / not approved)",
            "Conditions (e.g. each site's epsilon_cap, a privacy audit before release)",
            "Planned model retention (`prune --keep-models-days`, `--keep-last`)",
            "Date",
            "Signature",
        ] {
            let _ = writeln!(t, "| {item} | |");
        }
        t
    }
}

const RETENTION_TEXT: &str = "\
- Model checkpoints (in the coordinator's state directory, encrypted at rest) are kept until \
the operator runs `fedpriv-coordinator prune --state DIR --keep-models-days N [--keep-last K]`, \
stating the policy each time; there is no default age and nothing is pruned automatically. \
A run removes a version's file only when it is older than N days and not among the study's \
K latest (K >= 1: the latest version is always kept, a restart resumes from it). The \
version's row (its digest and lineage: which sites' updates made it) stays, marked pruned, \
and each run is recorded in the audit log before anything is deleted.
- The audit log is never pruned: no command removes, truncates or rotates audit records, \
which are kept at least six years.
- Exported models (`fedpriv-coordinator model export`) leave the state directory and any \
retention policy: each export is recorded in the audit log (`model_exported`, with the \
destination) before the file is written.
";

/// The unit of privacy and where the noise is added, in plain words (one line; also the
/// study report's).
pub fn unit_text(c: &StudyConfig) -> &'static str {
    match (c.privacy.unit, c.privacy.placement) {
        (PrivacyUnit::Record, _) => "record (each patient record; DP-SGD at each site)",
        (PrivacyUnit::Site, Placement::Local) => {
            "site (each hospital's whole contribution; each site noises its own update)"
        }
        (PrivacyUnit::Site, Placement::Central) => {
            "site (each hospital's whole contribution; the coordinator adds the noise)"
        }
    }
}

/// How each site trains in a round, in plain words.
pub fn local_plan_text(c: &StudyConfig) -> String {
    match &c.local {
        LocalPlan::DpSgd {
            steps,
            expected_batch,
            ..
        } => format!(
            "{steps} DP-SGD steps per round, Poisson batches of expected size {expected_batch}"
        ),
        LocalPlan::Sgd {
            epochs, batch_size, ..
        } => format!(
            "{epochs} epoch(s) of SGD per round, batch {batch_size}, then the update is clipped"
        ),
    }
}

/// What the study's terms protect and against whom, in plain words (one paragraph, with
/// Markdown's `**bold**` and `` `code` `` marks; only numbers from the config go into it).
pub fn protection_text(c: &StudyConfig) -> String {
    let p = &c.privacy;
    let eps = p.epsilon.get();
    let delta = p.delta.get();
    match (p.unit, p.placement) {
        (PrivacyUnit::Record, _) => format!(
            "Each patient record. At each site, every DP-SGD step samples each record with probability q = expected batch / the site's declared record count, clips each record's gradient to L2 norm {clip}, and adds Gaussian noise of standard deviation {sigma} x {clip} to the sum. Whether or not any one patient's record is used, every update a site sends and every model the coordinator publishes are almost equally likely: any conclusion about the patient is at most e^epsilon times more likely with the record than without (epsilon at most {eps} per site), except with probability delta = {delta}. Adjacency: adding or removing one record at one site. The coordinator never sees an un-noised update; the guarantee holds against the coordinator, the other sites and whoever receives the models. Sites hold disjoint patients, so the study's epsilon is the worst site's.\n",
            clip = p.clip_norm.get(),
            sigma = p.noise_multiplier.get(),
        ),
        (PrivacyUnit::Site, Placement::Local) => format!(
            "Each hospital's whole contribution to each round, and so each of its patients at the same epsilon. Each site clips its model update to L2 norm {clip} and adds Gaussian noise of standard deviation {sigma} x {clip} itself, so the coordinator never sees an un-noised update. The coordinator sees each site's own noised update, whose natural adjacency is replacing that site's data (sensitivity twice the clip norm): the accountant is given sigma / 2 = {half} at q = 1 (no amplification: the coordinator knows who took part). Budget: epsilon {eps} at delta {delta}. With few hospitals the noise must hide a whole hospital among them, which costs much accuracy (docs/accuracy.md).\n",
            clip = p.clip_norm.get(),
            sigma = p.noise_multiplier.get(),
            half = p.noise_multiplier.get() / 2.0,
        ),
        (PrivacyUnit::Site, Placement::Central) => format!(
            "Each hospital's whole contribution to each round, against whoever sees the released models, **not against the coordinator**: sites send their clipped updates (L2 norm at most {clip}) without noise, and the coordinator adds Gaussian noise of standard deviation {sigma} x {clip} once to their sum. The coordinator is trusted with every site's clipped, un-noised update; a site takes part only if its own config lists `central` in `placements`. Adjacency: adding or removing one site (sensitivity {clip}) at q = 1. Budget: epsilon {eps} at delta {delta}. Each site's data source is charged as if the site's update were released with sigma / 2 (one record can move it anywhere in the clip ball), so a site's own source cap is spent faster than the study's figures below.\n",
            clip = p.clip_norm.get(),
            sigma = p.noise_multiplier.get(),
        ),
    }
}

/// Runs `study assess`; returns what to print (nothing when written to `--out`).
pub fn run(cmd: &StudyCommand) -> Result<String, AssessError> {
    let StudyCommand::Assess {
        study,
        site_records,
        out,
    } = cmd;
    let text = std::fs::read_to_string(study).map_err(|e| AssessError::Study {
        path: study.clone(),
        reason: e.to_string(),
    })?;
    let cfg = StudyConfig::from_toml(&text).map_err(|e| AssessError::Study {
        path: study.clone(),
        reason: e.to_string(),
    })?;
    let records = parse_site_records(site_records, &cfg)?;
    let report = assess(&cfg, &records)?.to_markdown();
    match out {
        Some(path) => {
            std::fs::write(path, &report).map_err(|source| AssessError::Write {
                path: path.clone(),
                source,
            })?;
            Ok(format!(
                "wrote the assessment of study {} to {}",
                cfg.id,
                path.display()
            ))
        }
        None => Ok(report),
    }
}
