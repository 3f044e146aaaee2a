//! The round state machine of one study. Pure: it never awaits, opens a socket, touches a
//! file or reads the clock. Time (`now_ms`) and the noise source are arguments; the network
//! layer feeds it [`Input`]s and carries out the [`Action`]s it returns, in order.
//!
//! A round goes: choose the sites that can afford it, emit [`Action::RecordSpend`], and only
//! after the store confirms with [`Input::SpendCommitted`] emit the [`Action::SendTask`]s. Then
//! collect updates (each checked and folded into one accumulator as it arrives) until all
//! chosen sites answered or the deadline passed; aggregate if at least `min_sites` updates
//! arrived, else abort. Spends are never refunded, whatever happens after they are recorded.
//!
//! ## Streaming aggregation
//!
//! An update arrives either whole ([`Input::Update`]: checked, then folded) or streamed
//! ([`Input::UpdateBegin`], [`Input::UpdateChunk`]s, [`Input::UpdateEnd`]), so that the
//! coordinator never holds a site's update: each chunk is checked (finite values, the
//! running norm against the bound) *before* it is folded into the round's single
//! accumulator. The norm only grows as values arrive, so a norm violation is seen at the
//! chunk that crosses the bound, and that chunk is not folded: whatever part of a refused
//! or interrupted upload was folded is finite and within the norm bound. To take it back
//! out, the engine asks for it with [`Action::Unfold`]; the network layer (which spooled
//! the upload's bytes as they arrived) feeds the folded prefix back as [`Input::Unfold`]
//! chunks, which are subtracted, then [`Input::UnfoldDone`]. The round cannot close while
//! an unfold is pending; if the prefix cannot be fed back, the round's aggregate is lost
//! and the round is aborted. Subtraction undoes the addition up to f32 rounding (at most
//! an ulp of the larger magnitude involved per value, the same order as the differences
//! between arrival orders that floating-point summation already has).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use fedpriv_common::config::{LocalPlan, Placement, PrivacyUnit, StudyConfig};
use fedpriv_common::dp::accountant::{self, AccountError};
use fedpriv_common::dp::noise::NoiseSource;
use fedpriv_common::dp::SgmEvent;
use fedpriv_common::evaluation;
use fedpriv_common::model::ModelSpec;
use fedpriv_common::protocol::{DeclineReason, Task};
use fedpriv_common::wire::TensorHeader;

use crate::strategy::{self, ServerOptimizer};

mod calibration;
mod drive;
mod evaluations;
mod reject;

pub use drive::{drive, UnfoldSource};
pub use reject::{NormFigures, RejectReason};

mod events;
pub use events::{Action, EndCause, Input};

/// One site's charge for one round.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendEntry {
    pub site: String,
    pub event: SgmEvent,
    /// What the round's evaluation costs the site, when the round carries one.
    pub evaluation: Option<SgmEvent>,
    /// The site's epsilon after this round, from the accountant over all its events.
    pub epsilon_after: f64,
}

#[derive(Debug)]
enum Phase {
    Idle,
    AwaitingSpend {
        round: u64,
        selected: Vec<String>,
        charged: BTreeMap<String, SgmEvent>,
        evaluation: Option<SgmEvent>,
    },
    Collecting {
        round: u64,
        selected: BTreeSet<String>,
        outstanding: BTreeSet<String>,
        received: Vec<String>,
        sum: Vec<f32>,
        deadline_ms: u64,
        /// Streamed uploads of this round that are in progress or being unfolded.
        uploads: BTreeMap<u64, Upload>,
        /// The round is due to close and waits only for unfolds.
        closing: bool,
        /// An unfold failed: the sum holds values that cannot be taken out.
        corrupt: bool,
        /// The round carries an evaluation (its cost), and the vectors received so far.
        evaluation: Option<SgmEvent>,
        evaluations: BTreeMap<String, Vec<f64>>,
    },
    Finished,
}

/// A streamed update of the current round.
#[derive(Debug)]
struct Upload {
    site: String,
    /// Values folded into the sum so far; the next chunk must start here.
    folded: usize,
    /// Sum of squares of the folded values.
    sq_norm: f64,
    /// Refused or cut short: its folded values are being taken out again.
    unfolding: bool,
}

/// Sum of squares of `values` in f64 (eight lanes, so it vectorises), or the index of the
/// first value that is not finite. Any NaN or infinity makes the sum non-finite, and a
/// sum of at most 2^31 squares of finite f32 values (each below 1.2e77) never overflows.
/// Least norm an honest update of `d` values can have: the noise the study's mechanism adds
/// (a d-dimensional Gaussian's norm is sigma C sqrt(d) give or take a unit; 9 below that
/// has probability under e^-32) less the most the clipped signal can cancel. A smaller
/// norm means the site left (some of) its noise out; 0 when no floor is meaningful (central
/// noise, or too few dimensions for the noise to dominate).
pub fn norm_floor(cfg: &StudyConfig, d: usize) -> f64 {
    let p = &cfg.privacy;
    let (c, sigma) = (p.clip_norm.get(), p.noise_multiplier.get());
    let chi = (d as f64).sqrt() - 9.0;
    let floor = match (&cfg.local, p.unit, p.placement) {
        (_, PrivacyUnit::Site, Placement::Local) => sigma * c * chi - c,
        (
            LocalPlan::DpSgd {
                steps,
                expected_batch,
                learning_rate,
            },
            PrivacyUnit::Record,
            _,
        ) => {
            // Steps' noises add up to N(0, steps (lr sigma C / B)^2); the clipped sums move
            // at most lr 3C per step (as in the upper bound).
            let lr = f64::from(*learning_rate);
            let steps = *steps as f64;
            lr * sigma * c * steps.sqrt() * chi / expected_batch - lr * steps * 3.0 * c
        }
        _ => 0.0,
    };
    floor.max(0.0)
}

fn sum_squares(values: &[f32]) -> Result<f64, usize> {
    let total = fedpriv_common::model::sum_squares(values);
    if total.is_finite() {
        Ok(total)
    } else {
        Err(values.iter().position(|v| !v.is_finite()).unwrap_or(0))
    }
}

fn fold_into(sum: &mut [f32], values: &[f32]) {
    for (s, v) in sum.iter_mut().zip(values) {
        *s += v;
    }
}

fn unfold_from(sum: &mut [f32], values: &[f32]) {
    for (s, v) in sum.iter_mut().zip(values) {
        *s -= v;
    }
}

/// The state of one study's rounds.
pub struct StudyEngine {
    cfg: Arc<StudyConfig>,
    spec: ModelSpec,
    global: Arc<Vec<f32>>,
    /// Number of the next round to start (rounds are numbered from 1).
    next_round: u64,
    spent: BTreeMap<String, Vec<SgmEvent>>,
    records: BTreeMap<String, u64>,
    ready: BTreeSet<String>,
    /// Sites that take no further part: they reached a cap, refused the study for good,
    /// or do not fit its delta.
    retired: BTreeSet<String>,
    /// Why each site that refused the study for good did (for the study's end reason).
    refused: BTreeMap<String, DeclineReason>,
    /// When the engine first ran, for the join timeout.
    started_ms: Option<u64>,
    /// Whether any round was ever started.
    any_round: bool,
    phase: Phase,
    /// The accumulator's allocation, kept between rounds.
    spare_sum: Vec<f32>,
    optimizer: Box<dyn ServerOptimizer>,
    eps_cache: HashMap<Vec<(u64, u64, u64)>, f64>,
    end_reason: Option<String>,
    end_cause: Option<EndCause>,
    /// When enough sites for a round first were ready, while others may still connect.
    gathering_since: Option<u64>,
    /// The smallest declared size the noise was calibrated for (this process's life): a
    /// smaller site would spend more than the target, and is left out.
    calibrated_floor: Option<u64>,
}

/// How long a round waits for the remaining enrolled sites once `min_sites` are ready.
pub const GATHER_MS: u64 = 2000;

impl std::fmt::Debug for StudyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StudyEngine")
            .field("study", &self.cfg.id)
            .field("next_round", &self.next_round)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

/// Where a study stands, for status displays.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub next_round: u64,
    pub epsilon: f64,
    pub finished: Option<String>,
}

fn key(events: &[SgmEvent]) -> Vec<(u64, u64, u64)> {
    events
        .iter()
        .map(|e| (e.q.get().to_bits(), e.sigma.get().to_bits(), e.steps))
        .collect()
}

impl StudyEngine {
    /// A study at the start, or resumed: `global` is the last completed model, `next_round`
    /// one past the highest round that was ever reserved, `spent` every recorded spend.
    pub fn new(
        cfg: Arc<StudyConfig>,
        spec: ModelSpec,
        global: Vec<f32>,
        next_round: u64,
        spent: BTreeMap<String, Vec<SgmEvent>>,
        records: BTreeMap<String, u64>,
    ) -> Self {
        let dim = global.len();
        let optimizer = strategy::for_study(cfg.strategy, cfg.server_learning_rate, dim);
        Self {
            cfg,
            spec,
            global: Arc::new(global),
            next_round: next_round.max(1),
            spent,
            records,
            ready: BTreeSet::new(),
            retired: BTreeSet::new(),
            refused: BTreeMap::new(),
            started_ms: None,
            any_round: false,
            phase: Phase::Idle,
            spare_sum: Vec::new(),
            optimizer,
            eps_cache: HashMap::new(),
            end_reason: None,
            end_cause: None,
            gathering_since: None,
            calibrated_floor: None,
        }
    }

    /// The server optimiser's state after the last completed round (FedAdam's moments),
    /// to be stored with that round's checkpoint.
    pub fn optimizer_state(&self) -> Option<Vec<f32>> {
        self.optimizer.state()
    }

    /// Resumes the server optimiser from a stored state.
    pub fn restore_optimizer(&mut self, state: &[f32]) -> Result<(), String> {
        self.optimizer.restore(state)
    }

    pub fn config(&self) -> &StudyConfig {
        &self.cfg
    }

    /// Why the study ended (`None` while it runs).
    pub fn end_cause(&self) -> Option<EndCause> {
        self.end_cause
    }

    pub fn global(&self) -> &Arc<Vec<f32>> {
        &self.global
    }

    /// Takes an operator's runtime change (rounds, timeout, min_sites, a lower budget; see
    /// [`fedpriv_common::admin::apply_changes`]); it applies from the next decision on.
    pub fn set_config(&mut self, cfg: Arc<StudyConfig>) {
        self.cfg = cfg;
    }

    /// Ends the study from outside (it ended before a restart, or its ledger failed).
    pub fn mark_ended(&mut self, reason: &str) {
        self.phase = Phase::Finished;
        self.end_reason = Some(reason.to_string());
        self.end_cause.get_or_insert(EndCause::Ended);
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// The round now in progress, if any.
    pub fn current_round(&self) -> Option<u64> {
        match &self.phase {
            Phase::AwaitingSpend { round, .. } | Phase::Collecting { round, .. } => Some(*round),
            _ => None,
        }
    }

    /// Record counts the sites reported (record unit).
    pub fn records(&self) -> &BTreeMap<String, u64> {
        &self.records
    }

    /// Whether streamed upload `upload` is being received and folded (admitted, not
    /// refused, not finished). The network layer stops reading uploads that are not.
    pub fn is_receiving(&self, upload: u64) -> bool {
        matches!(&self.phase, Phase::Collecting { uploads, .. } if uploads.get(&upload).is_some_and(|u| !u.unfolding))
    }

    /// Whether `site` has a task outstanding in the current round.
    pub fn expects_update(&self, site: &str, round: u64) -> bool {
        matches!(&self.phase, Phase::Collecting { round: r, outstanding, .. } if *r == round && outstanding.contains(site))
    }

    pub fn epsilon_of(&mut self, events: &[SgmEvent]) -> Result<f64, AccountError> {
        let k = key(events);
        if let Some(e) = self.eps_cache.get(&k) {
            return Ok(*e);
        }
        let e = accountant::epsilon(self.cfg.privacy.accountant, events, self.cfg.privacy.delta)?;
        self.eps_cache.insert(k, e);
        Ok(e)
    }

    /// The study's epsilon: the worst site's (sites hold disjoint patients).
    pub fn study_epsilon(&mut self) -> f64 {
        let all: Vec<Vec<SgmEvent>> = self.spent.values().cloned().collect();
        all.iter()
            .map(|ev| self.epsilon_of(ev).unwrap_or(f64::INFINITY))
            .fold(0.0, f64::max)
    }

    pub fn progress(&mut self) -> Progress {
        Progress {
            next_round: self.next_round,
            epsilon: self.study_epsilon(),
            finished: self.end_reason.clone(),
        }
    }

    /// When this study next needs an [`Input::Tick`] if nothing else happens before: the
    /// current round's deadline, or the end of the wait for more sites before a round.
    /// `None`: only an event (a site, the store, an operator) can move it. A tick before
    /// the time is harmless; one after it is late by as much.
    pub fn next_deadline(&self) -> Option<u64> {
        let phase = match &self.phase {
            Phase::Collecting { deadline_ms, .. } => Some(*deadline_ms),
            Phase::Idle => self.gathering_since.map(|since| {
                since
                    .saturating_add(GATHER_MS.min(self.cfg.round_timeout_secs.saturating_mul(1000)))
            }),
            Phase::AwaitingSpend { .. } => None,
            Phase::Finished => return None,
        };
        // Until a site joins, the study ends at its join timeout.
        let join = self.cfg.join_timeout_secs.and_then(|secs| {
            (!self.any_round && self.ready.is_empty()).then(|| {
                self.started_ms
                    .unwrap_or(0)
                    .saturating_add(secs.saturating_mul(1000))
            })
        });
        match (phase, join) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Feeds one input; returns what to do, in order.
    pub fn handle(&mut self, input: Input, now_ms: u64, noise: &mut NoiseSource) -> Vec<Action> {
        let mut out = Vec::new();
        if self.is_finished() {
            if let Input::Update { site, round, .. } | Input::UpdateBegin { site, round, .. } =
                input
            {
                out.push(Action::UpdateRejected {
                    site,
                    round,
                    reason: RejectReason::StudyEnded,
                });
            }
            return out;
        }
        let started = *self.started_ms.get_or_insert(now_ms);
        // An overdue round closes before anything that arrived after its deadline counts.
        if let Phase::Collecting { deadline_ms, .. } = &self.phase {
            if now_ms >= *deadline_ms {
                self.close_round(noise, &mut out);
            }
        }
        match input {
            Input::SiteReady { site, records } => {
                let record_unit = self.cfg.privacy.unit == PrivacyUnit::Record;
                let below_floor = self.calibrated_floor.filter(|floor| records < *floor);
                if !self.cfg.enrolled.contains(&site) {
                } else if let Some(floor) = below_floor {
                    self.retired.insert(site.clone());
                    out.push(Action::SiteExcluded {
                        site,
                        reason: format!(
                            "{records} declared records, fewer than the {floor} the noise was calibrated for: its sampling rate would spend more than the study's target epsilon"
                        ),
                    });
                } else if record_unit && self.cfg.privacy.delta.get() * records as f64 >= 1.0 {
                    // Record-level delta must be below 1/n_site, or one record could be
                    // given away outright with probability delta.
                    self.retired.insert(site.clone());
                    out.push(Action::SiteExcluded {
                        site,
                        reason: format!(
                            "delta {} is not below 1 / {records} declared records",
                            self.cfg.privacy.delta.get()
                        ),
                    });
                } else {
                    self.ready.insert(site.clone());
                    self.records.insert(site, records);
                }
            }
            Input::SiteGone { site } => {
                self.ready.remove(&site);
                if let Phase::Collecting { outstanding, .. } = &mut self.phase {
                    outstanding.remove(&site);
                }
            }
            Input::SpendCommitted { round } => self.on_spend_committed(round, now_ms, &mut out),
            Input::Update {
                site,
                round,
                values,
            } => self.on_update(site, round, values, &mut out),
            Input::UpdateBegin {
                site,
                round,
                upload,
            } => self.on_update_begin(site, round, upload, &mut out),
            Input::UpdateChunk {
                upload,
                offset,
                values,
            } => self.on_update_chunk(upload, offset, &values, &mut out),
            Input::UpdateEnd { upload, result } => self.on_update_end(upload, result, &mut out),
            Input::Unfold {
                upload,
                offset,
                values,
            } => self.on_unfold(upload, offset, &values),
            Input::UnfoldDone { upload, ok } => self.on_unfold_done(upload, ok),
            Input::Evaluation {
                site,
                round,
                values,
            } => self.on_evaluation(site, round, values, &mut out),
            Input::Declined {
                site,
                round,
                reason,
            } => {
                if reason.is_permanent() {
                    self.retired.insert(site.clone());
                    self.refused.insert(site.clone(), reason);
                }
                if let Phase::Collecting {
                    round: r,
                    outstanding,
                    ..
                } = &mut self.phase
                {
                    if *r == round {
                        outstanding.remove(&site);
                    }
                }
                out.push(Action::SiteDeclined {
                    site,
                    round,
                    reason,
                });
            }
            Input::Tick => {}
        }
        // No site joined in time: nobody will take part.
        if let Some(secs) = self.cfg.join_timeout_secs {
            let nobody = !self.any_round && self.ready.is_empty();
            if nobody && now_ms >= started.saturating_add(secs.saturating_mul(1000)) {
                let reason = format!("no enrolled site joined within the join timeout of {secs} s");
                self.finish(reason, EndCause::NobodyJoined, &mut out);
                return out;
            }
        }
        self.advance(now_ms, noise, &mut out);
        out
    }

    /// Closes the round when it is complete or overdue, and starts the next when it can.
    fn advance(&mut self, now_ms: u64, noise: &mut NoiseSource, out: &mut Vec<Action>) {
        if let Phase::Collecting {
            outstanding,
            deadline_ms,
            ..
        } = &self.phase
        {
            if outstanding.is_empty() || now_ms >= *deadline_ms {
                self.close_round(noise, out);
            }
        }
        if matches!(self.phase, Phase::Idle) {
            self.try_start_round(now_ms, out);
        }
    }

    fn finish(&mut self, reason: String, cause: EndCause, out: &mut Vec<Action>) {
        self.phase = Phase::Finished;
        self.end_reason = Some(reason.clone());
        self.end_cause = Some(cause);
        out.push(Action::StudyEnded { reason });
    }

    fn try_start_round(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let round = self.next_round;
        if round > self.cfg.rounds {
            let reason = format!("all {} planned rounds are done", self.cfg.rounds);
            return self.finish(reason, EndCause::AllRoundsDone, out);
        }
        if let Some(target) = self.cfg.privacy.calibrate_to {
            return self.calibrate(target, now_ms, out);
        }
        // Which enrolled sites could still pay for this round, whether connected or not.
        let mut affordable: BTreeMap<String, (SgmEvent, f64)> = BTreeMap::new();
        let budget = self.cfg.privacy.epsilon.get();
        let enrolled = self.cfg.enrolled.clone();
        let active: Vec<String> = enrolled
            .iter()
            .filter(|s| !self.retired.contains(*s))
            .cloned()
            .collect();
        // Sites that cannot be priced at all (not merely over budget), with why: if they
        // leave too few sites, that is the study's end reason, not the budget.
        let mut unpriceable: Vec<String> = Vec::new();
        let evaluation = self
            .cfg
            .evaluation
            .filter(|e| e.is_due(round))
            .map(|e| e.event());
        for site in &active {
            let records = self.records.get(site).copied();
            let cost = match self.cfg.privacy.round_cost(&self.cfg.local, records) {
                Ok(c) => c,
                // A site whose size we do not know yet cannot be priced; it may be later.
                Err(_) if records.is_none() => continue,
                Err(why) => {
                    unpriceable.push(format!("{site}: {why}"));
                    continue;
                }
            };
            let mut events = self.spent.get(site).cloned().unwrap_or_default();
            events.push(cost);
            events.extend(evaluation);
            match self.epsilon_of(&events) {
                Ok(e) if e <= budget => {
                    affordable.insert(site.clone(), (cost, e));
                }
                Ok(_) => {}
                Err(e) => unpriceable.push(format!("{site}: the accountant failed: {e}")),
            }
        }
        let unpriced = enrolled
            .iter()
            .filter(|s| !self.retired.contains(*s) && !self.records.contains_key(*s))
            .count();
        let record_unit = self.cfg.privacy.unit == PrivacyUnit::Record;
        let could_join = affordable.len() + if record_unit { unpriced } else { 0 };
        if could_join < self.cfg.min_sites {
            let capped: Vec<&str> = self
                .refused
                .iter()
                .filter(|(_, r)| **r == DeclineReason::OverCap)
                .map(|(s, _)| s.as_str())
                .collect();
            let others = self.refused.len() - capped.len();
            let cause = if unpriceable.is_empty() && others == 0 {
                EndCause::BudgetExhausted
            } else {
                EndCause::TooFewSites
            };
            let reason = if !unpriceable.is_empty() {
                format!(
                    "too few sites can take part: {} of the {} the study needs can do round {round}; cannot be priced: {}",
                    could_join,
                    self.cfg.min_sites,
                    unpriceable.join("; ")
                )
            } else if others == 0 {
                let own = if capped.is_empty() {
                    String::new()
                } else {
                    format!("; {} reached their own cap", capped.join(", "))
                };
                format!(
                    "budget exhausted: {} site(s) can afford round {round} within the study's epsilon {budget}, the study needs {}{own}",
                    affordable.len(),
                    self.cfg.min_sites
                )
            } else {
                // Sites that said they cannot take part: that, not the budget, ends it.
                let said: Vec<String> = self
                    .refused
                    .iter()
                    .map(|(s, r)| format!("{s}: {}", r.as_str()))
                    .collect();
                format!(
                    "too few sites can take part: {} of the {} the study needs can do round {round}; refused: {}",
                    could_join,
                    self.cfg.min_sites,
                    said.join(", ")
                )
            };
            return self.finish(reason, cause, out);
        }
        let candidates: Vec<String> = affordable
            .keys()
            .filter(|s| self.ready.contains(*s))
            .cloned()
            .collect();
        if candidates.len() < self.cfg.min_sites {
            self.gathering_since = None;
            return; // wait for more sites to connect
        }
        // Enough sites: give the others (also those not yet priced, which have not said
        // they are ready) a moment to connect before starting without them.
        if candidates.len() < could_join {
            let since = *self.gathering_since.get_or_insert(now_ms);
            if now_ms
                < since
                    .saturating_add(GATHER_MS.min(self.cfg.round_timeout_secs.saturating_mul(1000)))
            {
                return;
            }
        }
        self.gathering_since = None;
        // Every ready site that can afford the round takes part and pays (no site sampling:
        // participation is visible, so it would buy no amplification).
        let selected = candidates;
        let charged: BTreeMap<String, SgmEvent> = affordable
            .iter()
            .filter(|(s, _)| selected.contains(s))
            .map(|(s, (c, _))| (s.clone(), *c))
            .collect();
        let entries = charged
            .iter()
            .map(|(s, c)| SpendEntry {
                site: s.clone(),
                event: *c,
                evaluation,
                epsilon_after: affordable[s].1,
            })
            .collect();
        self.next_round += 1;
        self.any_round = true;
        out.push(Action::RecordSpend { round, entries });
        self.phase = Phase::AwaitingSpend {
            round,
            selected,
            charged,
            evaluation,
        };
    }

    fn on_spend_committed(&mut self, committed: u64, now_ms: u64, out: &mut Vec<Action>) {
        let Phase::AwaitingSpend {
            round,
            selected,
            charged,
            evaluation,
        } = &mut self.phase
        else {
            return;
        };
        if *round != committed {
            return;
        }
        let (round, selected, charged, evaluation) = (
            *round,
            std::mem::take(selected),
            std::mem::take(charged),
            *evaluation,
        );
        for (site, ev) in &charged {
            let events = self.spent.entry(site.clone()).or_default();
            events.push(*ev);
            events.extend(evaluation);
        }
        // The model goes out in the study's wire encoding; updates may come back in it.
        let header = TensorHeader::for_spec(&self.spec, self.cfg.encoding);
        let p = &self.cfg.privacy;
        for site in &selected {
            let Some(cost) = charged.get(site) else {
                continue;
            };
            let task = Task {
                study: self.cfg.id.clone(),
                round,
                header: header.clone(),
                cost: *cost,
                clip_norm: p.clip_norm.get(),
                noise_multiplier: p.noise_multiplier.get(),
                unit: p.unit,
                placement: p.placement,
                local: self.cfg.local.clone(),
                delta: p.delta.get(),
                evaluation,
            };
            out.push(Action::SendTask {
                site: site.clone(),
                task,
                model: Arc::clone(&self.global),
            });
        }
        let outstanding: BTreeSet<String> = selected.iter().cloned().collect();
        // Reuse the last round's accumulator: zeroing mapped pages is cheaper than mapping
        // (and faulting in) a fresh model-sized allocation every round.
        let mut sum = std::mem::take(&mut self.spare_sum);
        sum.clear();
        sum.resize(self.global.len(), 0.0);
        self.phase = Phase::Collecting {
            round,
            selected: outstanding.clone(),
            outstanding,
            received: Vec::new(),
            sum,
            deadline_ms: now_ms.saturating_add(self.cfg.round_timeout_secs.saturating_mul(1000)),
            uploads: BTreeMap::new(),
            closing: false,
            corrupt: false,
            evaluation,
            evaluations: BTreeMap::new(),
        };
    }

    /// Largest norm an honest update can have: C for a clipped delta, plus what the noise
    /// explains (a d-dimensional Gaussian's norm is about sigma C sqrt(d), with a sub-unit
    /// standard deviation; 8 more sigmas of slack).
    fn norm_bound(&self) -> f64 {
        let p = &self.cfg.privacy;
        let (c, sigma, d) = (
            p.clip_norm.get(),
            p.noise_multiplier.get(),
            self.global.len() as f64,
        );
        let noise = sigma * c * (d.sqrt() + 8.0);
        match (&self.cfg.local, p.unit, p.placement) {
            (_, PrivacyUnit::Site, Placement::Central) => c * (1.0 + 1e-5),
            (_, PrivacyUnit::Site, Placement::Local) => c + noise,
            (
                LocalPlan::DpSgd {
                    steps,
                    expected_batch,
                    learning_rate,
                },
                PrivacyUnit::Record,
                _,
            ) => {
                // Each step moves by lr * (clipped sum + noise) / B; a Poisson batch is
                // rarely above 3B for the batch sizes DP-SGD uses, so allow 3C per step.
                f64::from(*learning_rate) * *steps as f64 * (3.0 * c + noise / expected_batch)
            }
            _ => 0.0,
        }
    }

    /// Whether updates are un-noised clipped deltas (central placement): then no figure
    /// computed from one may appear in a reason, record or log.
    fn central(&self) -> bool {
        self.cfg.privacy.unit == PrivacyUnit::Site
            && self.cfg.privacy.placement == Placement::Central
    }

    /// Why an update's norm is refused, with the figures only when they may be told.
    fn norm_refusal(&self, norm: f64, bound: f64, after: Option<(usize, usize)>) -> RejectReason {
        RejectReason::NormExceeded {
            figures: (!self.central()).then_some(NormFigures { norm, bound, after }),
        }
    }

    /// Why `site` may not send an update for `round` now, if it may not.
    fn admission(&self, site: &str, round: u64) -> Result<(), RejectReason> {
        let Phase::Collecting {
            round: current,
            selected,
            outstanding,
            received,
            uploads,
            closing,
            ..
        } = &self.phase
        else {
            return Err(RejectReason::NotCollecting);
        };
        if round != *current {
            return Err(RejectReason::WrongRound {
                round,
                current: *current,
            });
        }
        if !selected.contains(site) {
            return Err(RejectReason::NotChosen);
        }
        if received.iter().any(|s| s == site) {
            return Err(RejectReason::Duplicate);
        }
        if !outstanding.contains(site) || *closing {
            return Err(RejectReason::LeftRound);
        }
        if uploads.values().any(|u| u.site == site) {
            return Err(RejectReason::AlreadySending);
        }
        Ok(())
    }

    fn on_update(&mut self, site: String, round: u64, values: Vec<f32>, out: &mut Vec<Action>) {
        let bound = self.norm_bound();
        let central = self.central();
        let reject = |reason: RejectReason| Action::UpdateRejected {
            site: site.clone(),
            round,
            reason,
        };
        if let Err(reason) = self.admission(&site, round) {
            return out.push(reject(reason));
        }
        let Phase::Collecting { sum, .. } = &self.phase else {
            return;
        };
        if values.len() != sum.len() {
            return out.push(reject(RejectReason::WrongLength {
                got: values.len(),
                model: sum.len(),
            }));
        }
        let norm = match sum_squares(&values) {
            Ok(sq) => sq.sqrt(),
            Err(index) => return out.push(reject(RejectReason::NotFinite { index })),
        };
        if norm > bound {
            let reason = self.norm_refusal(norm, bound, None);
            return out.push(reject(reason));
        }
        let Phase::Collecting {
            outstanding,
            received,
            sum,
            ..
        } = &mut self.phase
        else {
            return;
        };
        fold_into(sum, &values);
        outstanding.remove(&site);
        received.push(site.clone());
        out.push(Action::UpdateAccepted {
            site,
            round,
            norm: (!central).then_some(norm),
        });
    }

    fn on_update_begin(&mut self, site: String, round: u64, upload: u64, out: &mut Vec<Action>) {
        if let Err(reason) = self.admission(&site, round) {
            return out.push(Action::UpdateRejected {
                site,
                round,
                reason,
            });
        }
        if let Phase::Collecting { uploads, .. } = &mut self.phase {
            if uploads.contains_key(&upload) {
                return out.push(Action::UpdateRejected {
                    site,
                    round,
                    reason: RejectReason::UploadIdInUse { upload },
                });
            }
            uploads.insert(
                upload,
                Upload {
                    site,
                    folded: 0,
                    sq_norm: 0.0,
                    unfolding: false,
                },
            );
        }
    }

    /// Refuses upload `id`: reports why, and asks for what it folded (if anything) back.
    fn refuse_upload(
        round: u64,
        uploads: &mut BTreeMap<u64, Upload>,
        id: u64,
        reason: RejectReason,
        out: &mut Vec<Action>,
    ) {
        let Some(up) = uploads.get_mut(&id) else {
            return;
        };
        out.push(Action::UpdateRejected {
            site: up.site.clone(),
            round,
            reason,
        });
        if up.folded == 0 {
            uploads.remove(&id);
        } else {
            up.unfolding = true;
            out.push(Action::Unfold {
                site: up.site.clone(),
                round,
                upload: id,
                len: up.folded,
            });
        }
    }

    fn on_update_chunk(&mut self, id: u64, offset: usize, values: &[f32], out: &mut Vec<Action>) {
        let bound = self.norm_bound();
        let central = self.central();
        let Phase::Collecting {
            round,
            sum,
            uploads,
            ..
        } = &mut self.phase
        else {
            return;
        };
        // Chunks of refused, closed or unknown uploads are dropped unread.
        let Some(up) = uploads.get_mut(&id).filter(|u| !u.unfolding) else {
            return;
        };
        let d = sum.len();
        let end = offset.checked_add(values.len()).filter(|&e| e <= d);
        let problem = if offset != up.folded {
            Some(RejectReason::OutOfOrder {
                offset,
                expected: up.folded,
            })
        } else if end.is_none() {
            Some(RejectReason::TooManyValues { model: d })
        } else {
            match sum_squares(values) {
                Err(i) => Some(RejectReason::NotFinite { index: offset + i }),
                Ok(sq) if (up.sq_norm + sq).sqrt() > bound => Some(RejectReason::NormExceeded {
                    figures: (!central).then_some(NormFigures {
                        norm: (up.sq_norm + sq).sqrt(),
                        bound,
                        after: Some((offset + values.len(), d)),
                    }),
                }),
                Ok(sq) => {
                    fold_into(&mut sum[offset..offset + values.len()], values);
                    up.folded += values.len();
                    up.sq_norm += sq;
                    None
                }
            }
        };
        if let Some(reason) = problem {
            Self::refuse_upload(*round, uploads, id, reason, out);
        }
    }

    fn on_update_end(&mut self, id: u64, result: Result<(), String>, out: &mut Vec<Action>) {
        let central = self.central();
        let Phase::Collecting {
            round,
            outstanding,
            received,
            sum,
            uploads,
            ..
        } = &mut self.phase
        else {
            return;
        };
        let Some(up) = uploads.get_mut(&id).filter(|u| !u.unfolding) else {
            return;
        };
        let d = sum.len();
        let problem = match result {
            Err(reason) => Some(RejectReason::UploadFailed(reason)),
            Ok(()) if up.folded != d => Some(RejectReason::WrongLength {
                got: up.folded,
                model: d,
            }),
            Ok(()) => None,
        };
        if let Some(reason) = problem {
            return Self::refuse_upload(*round, uploads, id, reason, out);
        }
        let norm = up.sq_norm.sqrt();
        let site = up.site.clone();
        uploads.remove(&id);
        outstanding.remove(&site);
        received.push(site.clone());
        out.push(Action::UpdateAccepted {
            site,
            round: *round,
            norm: (!central).then_some(norm),
        });
    }

    fn on_unfold(&mut self, id: u64, offset: usize, values: &[f32]) {
        if let Phase::Collecting {
            sum,
            uploads,
            corrupt,
            ..
        } = &mut self.phase
        {
            let Some(up) = uploads.get(&id).filter(|u| u.unfolding) else {
                return;
            };
            match offset.checked_add(values.len()) {
                Some(end) if end <= up.folded => unfold_from(&mut sum[offset..end], values),
                // The network layer fed back values that were never folded: a bug there,
                // and the sum can no longer be trusted.
                _ => *corrupt = true,
            }
        }
    }

    fn on_unfold_done(&mut self, id: u64, ok: bool) {
        if let Phase::Collecting {
            uploads, corrupt, ..
        } = &mut self.phase
        {
            if uploads.get(&id).is_some_and(|u| u.unfolding) {
                uploads.remove(&id);
                if !ok {
                    *corrupt = true;
                }
            }
        }
    }

    fn close_round(&mut self, noise: &mut NoiseSource, out: &mut Vec<Action>) {
        // Streamed uploads still in flight do not count: what they folded comes out first,
        // and the round closes once every unfold is done.
        if let Phase::Collecting {
            round,
            uploads,
            closing,
            ..
        } = &mut self.phase
        {
            *closing = true;
            let active: Vec<u64> = uploads
                .iter()
                .filter(|(_, u)| !u.unfolding)
                .map(|(id, _)| *id)
                .collect();
            for id in active {
                Self::refuse_upload(*round, uploads, id, RejectReason::RoundClosed, out);
            }
            if !uploads.is_empty() {
                return;
            }
        }
        let Phase::Collecting {
            round,
            selected,
            received,
            sum,
            corrupt,
            evaluations,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return;
        };
        // Paid for and released whatever becomes of the round's model.
        self.summarize_evaluations(round, &evaluations, out);
        if corrupt {
            self.spare_sum = sum;
            out.push(Action::RoundAborted {
                round,
                reason: "an interrupted upload could not be taken back out of the aggregate".into(),
            });
            return;
        }
        if received.len() < self.cfg.min_sites {
            self.spare_sum = sum;
            out.push(Action::RoundAborted {
                round,
                reason: format!(
                    "{} of {} update(s) arrived, the study needs {}",
                    received.len(),
                    selected.len(),
                    self.cfg.min_sites
                ),
            });
            return;
        }
        let p = &self.cfg.privacy;
        let mut sum = sum;
        let denom = if p.unit == PrivacyUnit::Site && p.placement == Placement::Central {
            // Noise once on the sum, and a denominator fixed before any data was seen.
            // The noise is the same whatever the number of threads that fill it (fixed
            // chunks, each its own stream), so using every core changes no outcome.
            noise.add_gaussian(
                &mut sum,
                p.noise_multiplier.get() * p.clip_norm.get(),
                fedpriv_common::dp::noise::available_threads(),
            );
            // A public denominator: dividing by the number that took part would let the
            // noise scale tell who did.
            self.cfg.enrolled.len().max(1)
        } else {
            received.len()
        };
        let inv = 1.0 / denom as f32;
        sum.iter_mut().for_each(|v| *v *= inv);
        // In place unless someone still holds the previous model (a task still being sent,
        // an observer): then it is copied, as it must be.
        self.optimizer
            .apply(Arc::make_mut(&mut self.global).as_mut_slice(), &sum);
        self.spare_sum = sum;
        let epsilon = self.study_epsilon();
        let mut contributors = received;
        contributors.sort();
        out.push(Action::Checkpoint {
            round,
            model: Arc::clone(&self.global),
            contributors,
            epsilon,
        });
    }
}

#[cfg(test)]
mod stream_tests;
#[cfg(test)]
mod tests;
