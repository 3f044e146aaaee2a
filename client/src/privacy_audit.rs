//! An empirical privacy audit of a study's exact mechanism, in one training run
//! (Steinke, Nasr, Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023;
//! the statistics are in [`fedpriv_common::dp::audit`]).
//!
//! The run uses the study's unit, rates, noise multiplier, clip norm, steps, rounds and
//! placement, the site's own DP-SGD code ([`DpSgdRound::run_with`]) and the secure noise
//! generator, on synthetic records of the study's shape (never patient data). `m` canaries
//! each go in by a secret fair coin:
//!
//! - **gradient canaries** (white-box): a fixed direction of norm C each (one coordinate
//!   per canary while the model has enough, random directions otherwise), added to the
//!   clipped gradient sum as an extra example, Poisson-sampled at the same rate as every
//!   record: this tests the add/remove adjacency the accountant claims. A canary's score is
//!   the sum, over every step, of the log-likelihood ratio of its presence given the
//!   step's *noised* gradient sum (the view the accountant bounds). The canaries are also
//!   scored from the deltas a site sends (rounded to f32, the coordinator's view: the sum
//!   of the steps, projected on each direction), reported separately.
//! - **input canaries** (black-box, record unit): extra records with random features and
//!   labels, sampled like records; scored by the final model's loss on them.
//! - **site unit**: the canaries are sites. Under local noise a site's own noised delta is
//!   what leaves it (noised by the site's code, [`train::noised_site_delta`]), and the
//!   accountant prices replacement (sensitivity 2C), so a canary site sends +C or -C along
//!   its direction by the coin. Under central noise a canary site's delta (a direction of
//!   norm C) is in the sum or not, and the audit adds the one N(0, (sigma C)^2) draw the
//!   coordinator adds: that draw is the coordinator's code, which this crate does not hold
//!   (its scale is checked by the coordinator's own tests).
//!
//! After the run the auditor guesses "in" for the `k+` highest scores and "out" for the
//! `k-` lowest (both fixed before scoring); the correct guesses give an epsilon the
//! mechanism cannot have, at the stated confidence. A bound above the accountant's epsilon
//! means the code leaks more than it claims.
//!
//! What it does not do: prove privacy (a lower bound below the claim says only that this
//! test found no violation), audit the coordinator's own code (a hostile coordinator is
//! outside what any site-side test can check), or look at patient data.

use fedpriv_common::config::{round_cost, LocalPlan, Placement, PrivacyUnit, StudyConfig, Task};
use fedpriv_common::dp::accountant;
use fedpriv_common::dp::audit;
use fedpriv_common::dp::noise::{available_threads, NoiseSource};
use fedpriv_common::dp::SgmEvent;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

use crate::data::Dataset;
use crate::train::{self, DpSgdRound, Learner};

/// What an audit run is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditOptions {
    /// Canaries of each kind.
    pub canaries: usize,
    /// Seeds the auditor's choices (canary directions and coins, the synthetic records) so
    /// that a run can be repeated; `None`: seeded from the OS. The mechanism's own
    /// randomness (batches, canary sampling, noise) always comes from the secure generator,
    /// as at a site.
    pub seed: Option<u64>,
    /// Record unit: the record count of the site the audit stands for (it sets the
    /// sampling rate q = expected_batch / records, as at a real site).
    pub records: Option<u64>,
    /// The confidence of the whole audit, e.g. 0.95: every view's bound holds at once with
    /// this probability (each is computed at 1 - (1 - confidence) / 3).
    pub confidence: f64,
    /// Guesses "in" and "out" (`k+`, `k-`); `None`: a tenth of the canaries each.
    pub guesses: Option<(usize, usize)>,
}

/// Why an audit could not run: the operator's request does not fit the study, or (for
/// `Internal`) our code failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0}")]
    Request(String),
    #[error("internal: {0}")]
    Internal(String),
}

/// One view's guesses and the bound they give.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ViewResult {
    pub canaries: usize,
    pub guesses: u64,
    pub correct_guesses: u64,
    pub epsilon_lower_bound: f64,
}

/// How the gradient canaries point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CanaryDirections {
    /// One coordinate of the model per canary (no canary sees another).
    Coordinate,
    /// Random directions: more canaries than the model has values, so they overlap.
    Random,
}

impl std::fmt::Display for CanaryDirections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Coordinate => "coordinate",
            Self::Random => "random",
        })
    }
}

/// What an audit found. The top-level fields are the white-box view the accountant bounds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditReport {
    pub study: String,
    pub unit: PrivacyUnit,
    pub placement: Placement,
    pub accountant: String,
    /// The accountant's epsilon for everything the run did, at `delta`.
    pub epsilon_claimed: f64,
    pub epsilon_lower_bound: f64,
    pub delta: f64,
    pub confidence: f64,
    pub canaries: usize,
    pub guesses: u64,
    pub correct_guesses: u64,
    /// The sampling rate of each step (record unit) or of each round (site unit: 1).
    pub q: f64,
    pub noise_multiplier: f64,
    pub clip_norm: f64,
    /// Noised steps (record unit) or rounds (site unit) the canaries went through.
    pub steps: u64,
    pub canary_directions: CanaryDirections,
    /// The same canaries scored from what a site sends (its f32 deltas).
    pub released_view: ViewResult,
    /// Input canaries scored from the final model's loss (record unit only).
    pub black_box: Option<ViewResult>,
}

impl AuditReport {
    /// Whether the audit caught the mechanism leaking more than the accountant claims.
    pub fn failed(&self) -> bool {
        self.epsilon_lower_bound > self.epsilon_claimed
            || self.released_view.epsilon_lower_bound > self.epsilon_claimed
            || self
                .black_box
                .as_ref()
                .is_some_and(|b| b.epsilon_lower_bound > self.epsilon_claimed)
    }
}

fn req(m: impl Into<String>) -> AuditError {
    AuditError::Request(m.into())
}

fn internal(e: impl std::fmt::Display) -> AuditError {
    AuditError::Internal(e.to_string())
}

/// Canary directions of norm `clip` in `dim` values: distinct coordinates while `m <= dim`
/// (no canary sees another), otherwise random directions.
struct Canaries {
    /// `(coordinate, sign)` per canary, or dense directions.
    coords: Option<Vec<usize>>,
    dense: Vec<Vec<f64>>,
    clip: f64,
}

impl Canaries {
    /// `quiet`: how much the records move each coordinate (when known); coordinate canaries
    /// then go where the records move the model least, so that the records' own gradients
    /// drown as few canaries as possible. Chosen before the run, as the bound requires.
    fn new(m: usize, dim: usize, clip: f64, quiet: Option<&[f64]>, rng: &mut StdRng) -> Self {
        if m <= dim {
            let mut idx: Vec<usize> = (0..dim).collect();
            // A random order first, so that ties fall at random.
            idx.shuffle(rng);
            if let Some(q) = quiet {
                idx.sort_by(|&a, &b| q[a].total_cmp(&q[b]));
            }
            idx.truncate(m);
            Canaries {
                coords: Some(idx),
                dense: Vec::new(),
                clip,
            }
        } else {
            let dense = (0..m)
                .map(|_| {
                    // Box-Muller: a uniformly random direction.
                    let g: Vec<f64> = (0..dim)
                        .map(|_| {
                            let u: f64 = 1.0 - rng.random::<f64>();
                            let v: f64 = rng.random();
                            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
                        })
                        .collect();
                    let norm = g.iter().map(|v| v * v).sum::<f64>().sqrt();
                    g.iter().map(|&v| v * clip / norm).collect()
                })
                .collect();
            Canaries {
                coords: None,
                dense,
                clip,
            }
        }
    }

    fn kind(&self) -> CanaryDirections {
        if self.coords.is_some() {
            CanaryDirections::Coordinate
        } else {
            CanaryDirections::Random
        }
    }

    /// Adds `sign` times canary `i` to `v`.
    fn add(&self, i: usize, sign: f64, v: &mut [f64]) {
        match &self.coords {
            Some(c) => v[c[i]] += sign * self.clip,
            None => {
                for (a, &b) in v.iter_mut().zip(&self.dense[i]) {
                    *a += sign * b;
                }
            }
        }
    }

    /// Canary `i`'s direction (unit length) against `v`.
    fn dot(&self, i: usize, v: impl Fn(usize) -> f64) -> f64 {
        match &self.coords {
            Some(c) => v(c[i]),
            None => {
                self.dense[i]
                    .iter()
                    .enumerate()
                    .map(|(j, &d)| d * v(j))
                    .sum::<f64>()
                    / self.clip
            }
        }
    }
}

/// Synthetic records of the study's shape: numeric inputs uniform in the scaled range
/// [-1, 1], categorical columns a random slot, labels a random class or value.
fn synthetic(
    study: &StudyConfig,
    n: usize,
    d: usize,
    rng: &mut StdRng,
) -> Result<Dataset, AuditError> {
    let spec = &study.data;
    let numeric = if spec.image.is_some() {
        d
    } else {
        spec.features.len()
    };
    let mut x = Vec::with_capacity(n * d);
    let mut y = Vec::with_capacity(n);
    for _ in 0..n {
        for _ in 0..numeric {
            x.push(rng.random_range(-1.0f32..=1.0));
        }
        for c in &spec.categorical {
            x.push(rng.random_range(0..c.slots()) as f32);
        }
        y.push(match spec.task {
            Task::Binary => rng.random_range(0..2) as f32,
            Task::Multiclass => rng.random_range(0..spec.n_outputs()) as f32,
            Task::Regression => rng.random_range(-1.0f32..=1.0),
        });
    }
    if x.len() != n * d {
        return Err(internal(format!(
            "synthetic rows have {} values, the model takes {d}",
            x.len() / n.max(1)
        )));
    }
    Ok(Dataset {
        x,
        y,
        n,
        d,
        feature_names: (0..d).map(|i| format!("x{i}")).collect(),
        label_name: spec.label.clone(),
        images: None,
    })
}

/// The log-likelihood ratio, for one step's noised sum projected on a canary's unit
/// direction (`x`), of "the canary is in" against "it is out", under the mechanism the
/// accountant assumes: with probability q the sum holds C along the direction, and the
/// noise is N(0, (sigma C)^2). The most powerful score for that mechanism (Neyman-Pearson),
/// and fixed before the run, as the lower bound requires.
fn step_llr(x: f64, q: f64, clip: f64, sigma: f64) -> f64 {
    let a = (clip * x - clip * clip / 2.0) / (sigma * clip).powi(2);
    let (l0, l1) = ((-q).ln_1p(), q.ln() + a);
    let hi = l0.max(l1);
    if hi == f64::NEG_INFINITY {
        return hi;
    }
    hi + ((l0 - hi).exp() + (l1 - hi).exp()).ln()
}

/// How much one batch of records moves each coordinate at the start (the absolute clipped
/// gradient sum of up to 256 records, no noise): public to the auditor, who holds the
/// synthetic records and the initial model.
fn record_gradients(
    learner: &Learner,
    init: &fedpriv_common::model::FlatModel,
    data: &Dataset,
    clip: f64,
    expected_batch: f64,
    learning_rate: f32,
    seed: u64,
) -> Result<Vec<f64>, AuditError> {
    let batch: Vec<usize> = (0..data.n.min(256)).collect();
    let mut theta: Vec<f64> = init.values.iter().map(|&v| f64::from(v)).collect();
    let zeros = vec![0f64; theta.len()];
    let mut mags = vec![0f64; theta.len()];
    train::dp_sgd_step_with(
        learner,
        &mut theta,
        data,
        &batch,
        clip,
        &zeros,
        expected_batch,
        learning_rate,
        seed,
        &mut |sum, _| {
            for (m, s) in mags.iter_mut().zip(sum.iter()) {
                *m = s.abs();
            }
        },
    )
    .map_err(internal)?;
    Ok(mags)
}

fn view(
    scores: &[f64],
    included: &[bool],
    k: (usize, usize),
    delta: f64,
    confidence: f64,
) -> ViewResult {
    let (r, v) = audit::guess(scores, included, k.0, k.1);
    ViewResult {
        canaries: scores.len(),
        guesses: r,
        correct_guesses: v,
        epsilon_lower_bound: audit::epsilon_lower_bound(
            scores.len() as u64,
            r,
            v,
            delta,
            confidence,
        ),
    }
}

/// Runs the audit of `study` (see the module doc).
pub fn run(study: &StudyConfig, opts: &AuditOptions) -> Result<AuditReport, AuditError> {
    let m = opts.canaries;
    if m < 2 {
        return Err(req("an audit needs at least 2 canaries"));
    }
    if !(opts.confidence > 0.5 && opts.confidence < 1.0) {
        return Err(req("the confidence must be between 0.5 and 1"));
    }
    // Up to three views are tested (white-box, what a site sends, black-box); each at
    // 1 - (1 - confidence) / 3, so that an honest mechanism fails any of them with at most
    // the stated probability (Bonferroni).
    let each = 1.0 - (1.0 - opts.confidence) / 3.0;
    let k = opts.guesses.unwrap_or((m / 10, m / 10));
    if k.0 + k.1 == 0 || k.0 + k.1 > m {
        return Err(req(format!(
            "guesses in + out must be between 1 and the {m} canaries"
        )));
    }
    let p = &study.privacy;
    let records = match p.unit {
        PrivacyUnit::Record => Some(opts.records.ok_or_else(|| {
            req("a record-unit audit needs --records (the site's record count sets q)")
        })?),
        PrivacyUnit::Site => None,
    };
    let event = round_cost(
        p.unit,
        p.placement,
        p.noise_multiplier.get(),
        &study.local,
        records,
    )
    .map_err(req)?;
    let events: Vec<SgmEvent> = vec![event; study.rounds as usize];
    let claimed = accountant::epsilon(p.accountant, &events, p.delta).map_err(internal)?;
    let mut noise = NoiseSource::from_os().map_err(internal)?;
    let mut aux = StdRng::seed_from_u64(opts.seed.unwrap_or_else(|| noise.rng().next_u64()));
    let learner = Learner::for_data(&study.model, &study.data).map_err(req_display)?;
    let dim = learner.spec().num_values();
    let clip = p.clip_norm.get();
    let sigma = p.noise_multiplier.get();
    let included: Vec<bool> = (0..m).map(|_| aux.random_bool(0.5)).collect();
    let mut scores = vec![0f64; m];
    let mut released = vec![0f64; m];
    let mut global = fedpriv_common::arch::init_for_data(
        &study.model,
        &study.data,
        study.data.n_outputs(),
        aux.next_u64(),
    )
    .map_err(internal)?;

    let (q, steps, black_box, directions) = match (&study.local, records) {
        (
            LocalPlan::DpSgd {
                steps,
                expected_batch,
                learning_rate,
            },
            Some(n),
        ) => {
            let q = event.q.get();
            let d: usize = study.input_shape().iter().product();
            let n_real = usize::try_from(n).map_err(|_| req("--records is too large"))?;
            // Input canaries: records like the others, present by their own coins.
            let input_in: Vec<bool> = (0..m).map(|_| aux.random_bool(0.5)).collect();
            let input_rows = synthetic(study, m, d, &mut aux)?;
            let mut data = synthetic(study, n_real, d, &mut aux)?;
            for (i, &inside) in input_in.iter().enumerate() {
                if inside {
                    data.x.extend_from_slice(&input_rows.x[i * d..(i + 1) * d]);
                    data.y.push(input_rows.y[i]);
                    data.n += 1;
                }
            }
            let quiet = record_gradients(
                &learner,
                &global,
                &data,
                clip,
                *expected_batch,
                *learning_rate,
                aux.next_u64(),
            )?;
            let canaries = Canaries::new(m, dim, clip, Some(&quiet), &mut aux);
            let plan = DpSgdRound {
                steps: *steps,
                q,
                expected_batch: *expected_batch,
                learning_rate: *learning_rate,
                clip,
                noise_multiplier: sigma,
            };
            let back = -expected_batch / f64::from(*learning_rate);
            for _ in 0..study.rounds {
                let mut hook = |noise: &mut NoiseSource, sum: &mut [f64], z: &[f64]| {
                    for (i, &inside) in included.iter().enumerate() {
                        // Drawn for every canary, in or out, so the draws do not depend on
                        // the coins.
                        let sampled = noise.rng().random_bool(q);
                        if inside && sampled {
                            canaries.add(i, 1.0, sum);
                        }
                    }
                    for (i, s) in scores.iter_mut().enumerate() {
                        *s += step_llr(canaries.dot(i, |j| sum[j] + z[j]), q, clip, sigma);
                    }
                };
                let (delta, _) = plan
                    .run_with(&learner, &global, &data, &mut noise, &mut hook)
                    .map_err(internal)?;
                // delta = -(lr / B) * sum over steps of the noised sums.
                for (i, s) in released.iter_mut().enumerate() {
                    *s += canaries.dot(i, |j| back * f64::from(delta[j]));
                }
                for (g, dv) in global.values.iter_mut().zip(&delta) {
                    *g += dv;
                }
            }
            let out = train::outputs(&learner, &global, &input_rows).map_err(internal)?;
            let outs = out.len() / m;
            let bb_scores: Vec<f64> = out
                .chunks(outs)
                .zip(&input_rows.y)
                .map(|(z, &y)| -train::example_loss(z, y, learner.head()).0)
                .collect();
            let bb = view(&bb_scores, &input_in, k, p.delta.get(), each);
            (q, steps * study.rounds, Some(bb), canaries.kind())
        }
        (LocalPlan::Sgd { .. }, None) => {
            let canaries = Canaries::new(m, dim, clip, None, &mut aux);
            // Each round: the canary sites' deltas, noised as the placement says.
            let std = sigma * clip;
            for _ in 0..study.rounds {
                match p.placement {
                    Placement::Central => {
                        let mut sum = vec![0f64; dim];
                        for (i, &inside) in included.iter().enumerate() {
                            if inside {
                                canaries.add(i, 1.0, &mut sum);
                            }
                        }
                        noise.add_gaussian_f64(&mut sum, std, available_threads());
                        let sent = train::saturated_f32(&sum);
                        for i in 0..m {
                            scores[i] += canaries.dot(i, |j| sum[j]);
                            released[i] += canaries.dot(i, |j| f64::from(sent[j]));
                        }
                    }
                    Placement::Local => {
                        // The site's own code noises its delta; what it sends is the view.
                        for (i, &inside) in included.iter().enumerate() {
                            let mut own = vec![0f64; dim];
                            canaries.add(i, if inside { 1.0 } else { -1.0 }, &mut own);
                            let own: Vec<f32> = own.iter().map(|&v| v as f32).collect();
                            let sent = train::noised_site_delta(&own, std, &mut noise);
                            let score = canaries.dot(i, |j| f64::from(sent[j]));
                            scores[i] += score;
                            released[i] += score;
                        }
                    }
                }
            }
            (1.0, study.rounds, None, canaries.kind())
        }
        _ => {
            return Err(req(
                "the study's local training plan does not match its privacy unit",
            ))
        }
    };
    let white = view(&scores, &included, k, p.delta.get(), each);
    let released = view(&released, &included, k, p.delta.get(), each);
    Ok(AuditReport {
        study: study.id.clone(),
        unit: p.unit,
        placement: p.placement,
        accountant: format!("{:?}", p.accountant).to_lowercase(),
        epsilon_claimed: claimed,
        epsilon_lower_bound: white.epsilon_lower_bound,
        delta: p.delta.get(),
        confidence: opts.confidence,
        canaries: m,
        guesses: white.guesses,
        correct_guesses: white.correct_guesses,
        q,
        noise_multiplier: sigma,
        clip_norm: clip,
        steps,
        canary_directions: directions,
        released_view: released,
        black_box,
    })
}

fn req_display(e: impl std::fmt::Display) -> AuditError {
    AuditError::Request(e.to_string())
}

impl std::fmt::Display for AuditReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "study {} ({:?} unit, {:?} noise): {} steps at q = {}, sigma {}, clip {}",
            self.study,
            self.unit,
            self.placement,
            self.steps,
            self.q,
            self.noise_multiplier,
            self.clip_norm
        )?;
        writeln!(
            f,
            "accountant ({}): epsilon {:.3} at delta {:e}",
            self.accountant, self.epsilon_claimed, self.delta
        )?;
        writeln!(
            f,
            "white-box ({} {} canaries): {} of {} guesses right, epsilon >= {:.3} ({}% confidence for all views together)",
            self.canaries,
            self.canary_directions,
            self.correct_guesses,
            self.guesses,
            self.epsilon_lower_bound,
            self.confidence * 100.0
        )?;
        writeln!(
            f,
            "what a site sends: {} of {} right, epsilon >= {:.3}",
            self.released_view.correct_guesses,
            self.released_view.guesses,
            self.released_view.epsilon_lower_bound
        )?;
        if self.canary_directions == CanaryDirections::Random {
            writeln!(
                f,
                "note: the model has fewer values than canaries, so the canaries overlap and the audit has little power; use fewer canaries or a larger model"
            )?;
        }
        if let Some(b) = &self.black_box {
            writeln!(
                f,
                "black-box (input canaries, final model's loss): {} of {} right, epsilon >= {:.3}",
                b.correct_guesses, b.guesses, b.epsilon_lower_bound
            )?;
        }
        writeln!(
            f,
            "{}",
            if self.failed() {
                "FAILED: the mechanism leaks more than the accountant claims"
            } else {
                "passed: no bound above the claim (an audit cannot prove privacy, only find leaks)"
            }
        )
    }
}
